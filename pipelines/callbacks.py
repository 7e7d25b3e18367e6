"""Keras callbacks shared by the tasks: per-layer gradient norms (vanishing gradients,
Glorot & Bengio 2010), epochs to a target accuracy (Ioffe & Szegedy 2015), a wall-time
limit, and the history recorder of the resume slot.

The measuring callbacks hand what they measure to a ``sink(metrics, step)`` (the run
tracker's, from ``RunContext.log_metrics``; None logs nothing), every value of one moment
in one call, and keep it on the callback for artifacts and tests. They never import MLflow.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf


def layer_of(variable) -> str:
    """The layer a variable belongs to: ``block1_conv1/kernel`` -> ``block1_conv1``."""
    path = getattr(variable, "path", None) or variable.name
    return path.rsplit("/", 1)[0] if "/" in path else path


class GradientNorms(keras.callbacks.Callback):
    """Logs the L2 norm of the loss gradient of every layer's weights, on one fixed
    training batch, before training and every ``every_steps`` steps: metrics
    ``grad_norm/<layer>`` (step = the global training step).

    The gradient is taken in training mode (dropout on, BatchNorm on batch statistics);
    the BatchNorm moving statistics that this forward pass updates are restored after it,
    so measuring does not change training.

    Args:
        batch: tuple. ``(images, labels)`` as the compiled model's loss expects them.
        every_steps: int. Steps between measurements.
        sink: callable or None. ``sink(metrics, step)`` receives each measurement.
        prefix: str. The metric name prefix.
        plot_path: path or None. Where ``plot`` draws the norms when training ends.
    """

    def __init__(
        self, batch, every_steps: int = 50, sink=None, prefix: str = "grad_norm", plot_path=None
    ):
        super().__init__()
        if every_steps < 1:
            raise ValueError(f"every_steps must be >= 1. Received: every_steps={every_steps!r}")
        self.batch = batch
        self.every_steps = int(every_steps)
        self.sink = sink
        self.prefix = prefix
        self.plot_path = plot_path
        self.records: list[tuple[int, dict[str, float]]] = []  # (step, {layer: norm})
        self._step = 0
        self._fn = None

    def _compute(self) -> dict[str, float]:
        model = self.model
        if self._fn is None:
            variables = list(model.trainable_variables)
            layers = [layer_of(v) for v in variables]
            order = list(dict.fromkeys(layers))

            @tf.function
            def norms(x, y):
                with tf.GradientTape() as tape:
                    y_pred = model(x, training=True)
                    loss = model.compute_loss(x=x, y=y, y_pred=y_pred, training=True)
                grads = tape.gradient(loss, variables)
                squares = {name: tf.constant(0.0, tf.float32) for name in order}
                for name, g in zip(layers, grads, strict=True):
                    if g is not None:
                        squares[name] += tf.reduce_sum(tf.square(tf.cast(g, tf.float32)))
                return {name: tf.sqrt(v) for name, v in squares.items()}

            self._fn = norms
        state = [v.numpy() for v in self.model.non_trainable_variables]
        values = self._fn(*self.batch)
        for v, s in zip(self.model.non_trainable_variables, state, strict=True):
            v.assign(s)
        return {k: float(v) for k, v in values.items()}

    def _measure(self) -> None:
        norms = self._compute()
        self.records.append((self._step, norms))
        metrics = {f"{self.prefix}/{k}": v for k, v in norms.items() if math.isfinite(v)}
        if self.sink is not None and metrics:
            self.sink(metrics, self._step)

    def on_train_begin(self, logs=None):
        self._measure()

    def on_train_batch_end(self, batch, logs=None):
        self._step += 1
        if self._step % self.every_steps == 0:
            self._measure()

    def on_train_end(self, logs=None):
        if self.plot_path is not None:
            from pathlib import Path

            Path(self.plot_path).parent.mkdir(parents=True, exist_ok=True)
            self.plot(self.plot_path)

    def plot(self, path) -> None:
        """Gradient norm per layer (x: depth), one line per measurement, log scale."""
        if not self.records:
            return
        from pipelines.plots import _pyplot

        plt = _pyplot()
        names = list(self.records[0][1])
        fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(names)), 4.0))
        picks = (
            self.records
            if len(self.records) <= 6
            else [self.records[int(i)] for i in np.linspace(0, len(self.records) - 1, 6)]
        )
        for step, norms in picks:
            ax.plot(
                range(len(names)),
                [max(norms.get(n, 0.0), 1e-12) for n in names],
                "o-",
                label=f"step {step}",
            )
        ax.set_yscale("log")
        ax.set_xticks(range(len(names)), names, rotation=75, ha="right", fontsize=7)
        ax.set_ylabel("||dL/dW|| per layer")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


class EpochsToTarget(keras.callbacks.Callback):
    """Logs ``epochs_to_target``: the first epoch whose ``monitor`` reaches ``target``
    (and ``reached_target`` 1/0 when training ends).

    Args:
        target: float. The accuracy to reach.
        monitor: str. The epoch log to watch (``val_accuracy``: eval accuracy).
        sink: callable or None. ``sink(metrics, step)`` receives the values.
    """

    def __init__(self, target: float, monitor: str = "val_accuracy", sink=None):
        super().__init__()
        self.target = float(target)
        self.monitor = monitor
        self.sink = sink
        self.epoch: int | None = None

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if self.epoch is None and value is not None and float(value) >= self.target:
            self.epoch = epoch + 1
            if self.sink is not None:
                self.sink({"epochs_to_target": float(self.epoch)}, self.epoch)

    def on_train_end(self, logs=None):
        if self.sink is not None:
            self.sink({"reached_target": 1.0 if self.epoch is not None else 0.0}, None)


class TimeLimit(keras.callbacks.Callback):
    """Stop training at the first batch end after ``seconds`` of wall time. With
    ``restore_best`` (likelihood models), the weights of the epoch with the lowest
    ``val_loss`` are restored when the limit stopped training."""

    def __init__(self, seconds: float, restore_best: bool = False):
        super().__init__()
        self.seconds = seconds
        self.restore_best = restore_best
        self.best, self.best_weights, self.stopped = float("inf"), None, False

    def on_train_begin(self, logs=None):
        import time

        self.start = time.monotonic()

    def on_train_batch_end(self, batch, logs=None):
        import time

        if time.monotonic() - self.start > self.seconds:
            self.model.stop_training = True
            self.stopped = True

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get("val_loss")
        if self.restore_best and value is not None and float(value) < self.best:
            self.best, self.best_weights = float(value), self.model.network.get_weights()

    def on_train_end(self, logs=None):
        if self.stopped and self.best_weights is not None:
            self.model.network.set_weights(self.best_weights)


class HistoryRecorder(keras.callbacks.Callback):
    """Appends every epoch's logs to ``history`` (a resumed run's earlier epochs already in
    it) and hands the whole history to ``save`` (the resume slot) after each epoch."""

    def __init__(self, history: dict[str, list[float]], save=None):
        super().__init__()
        self.history, self.save = history, save

    def on_epoch_end(self, epoch, logs=None):
        for key, value in (logs or {}).items():
            self.history.setdefault(key, []).append(float(value))
        if self.save is not None:
            self.save(self.history)


class EpochTimer(keras.callbacks.Callback):
    """Seconds of every training epoch (first to last training batch, without validation),
    appended to ``seconds`` (a list the caller keeps), for same-budget comparisons."""

    def __init__(self, seconds: list[float] | None = None):
        super().__init__()
        self.seconds: list[float] = [] if seconds is None else seconds
        self._start = self._last = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        import time

        self._start = self._last = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        import time

        self._last = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(self._last - self._start)


def reset_recurrent_states(model) -> None:
    """Reset the state of every stateful recurrent layer of ``model``."""
    for layer in model.layers:
        if getattr(layer, "stateful", False) and hasattr(layer, "reset_states"):
            layer.reset_states()


class ResetStates(keras.callbacks.Callback):
    """Truncated BPTT over a stateful model: a fresh state at the start of every epoch
    and before and after every evaluation."""

    def on_epoch_begin(self, epoch, logs=None):
        reset_recurrent_states(self.model)

    def on_test_begin(self, logs=None):
        reset_recurrent_states(self.model)

    def on_test_end(self, logs=None):
        reset_recurrent_states(self.model)


class ValidationMetric(keras.callbacks.Callback):
    """Adds ``name`` = ``compute(model)`` to every epoch's logs (after validation, every
    ``validation_freq`` epochs), where later callbacks (``BestWeights``, the history) see
    it, and hands it to ``sink`` with the epoch as step (the validation BLEU of
    translation on a fixed sample).

    Args:
        name: str. The log name (``val_bleu``).
        compute: callable. ``compute(model) -> float``.
        validation_freq: int. Epochs between computations.
        sink: callable or None. ``sink(metrics, step)``.
    """

    def __init__(self, name: str, compute, validation_freq: int = 1, sink=None):
        super().__init__()
        self.name, self.compute = name, compute
        self.validation_freq, self.sink = int(validation_freq), sink
        self.values: list[tuple[int, float]] = []

    def on_epoch_end(self, epoch, logs=None):
        if logs is None or (epoch + 1) % self.validation_freq:
            return
        value = float(self.compute(self.model))
        logs[self.name] = value
        self.values.append((epoch + 1, value))
        if self.sink is not None:
            self.sink({self.name: value}, epoch + 1)


def monitor_mode(monitor: str) -> str:
    """``min`` for losses and errors (``val_loss``, ``val_perplexity``...), else ``max``."""
    low = ("loss", "error", "perplexity", "mse", "mae", "fid", "elbo")
    return "min" if any(word in monitor for word in low) else "max"


class BestWeights(keras.callbacks.Callback):
    """Model selection by validation: keeps a copy of the weights of the epoch with the
    best ``monitor`` (``val_loss``, ``val_bleu``...) and puts them back when training ends,
    so they are the ones evaluated, exported and registered; with ``patience``, stops
    training after that many epochs without improvement (early stopping).

    The copy, the best value, its epoch and the patience count are ``tf.Variable``s in
    ``state`` (a ``tf.Module``), which the training checkpoint saves
    (``TrainingCheckpoint.track``): a run killed and resumed selects the same epoch as
    an uninterrupted one. Keras' ``EarlyStopping(restore_best_weights=True)`` keeps its
    copy in Python, lost at a restart.

    Args:
        model: keras.Model. The trained model (its ``weights`` are copied).
        monitor: str. The epoch log to select by; epochs without it (``validation_freq``)
            are skipped, a run that never has it is an error naming the logs it has.
        mode: str. ``min``, ``max`` or ``auto`` (``monitor_mode``).
        patience: int or None. Early stopping after this many epochs without improvement.
        sink: callable or None. ``sink(metrics, step)`` receives ``selected_epoch`` and
            ``selected_<monitor>`` when training ends.
    """

    def __init__(
        self, model, monitor: str = "val_loss", mode: str = "auto", patience=None, sink=None
    ):
        super().__init__()
        if not model.weights:
            raise RuntimeError("BestWeights: build the model first (it has no weights yet)")
        if mode not in ("min", "max", "auto"):
            raise ValueError(f"mode must be 'min', 'max' or 'auto'. Received: mode={mode!r}")
        self.monitor = monitor
        self.mode = monitor_mode(monitor) if mode == "auto" else mode
        self.patience = patience
        self.sink = sink
        worst = float("inf") if self.mode == "min" else float("-inf")
        state = tf.Module(name="best_weights")
        with tf.init_scope():
            state.value = tf.Variable(worst, dtype=tf.float64, trainable=False, name="best_value")
            state.epoch = tf.Variable(-1, dtype=tf.int64, trainable=False, name="best_epoch")
            state.wait = tf.Variable(0, dtype=tf.int64, trainable=False, name="best_wait")
            state.weights = [
                tf.Variable(tf.zeros(w.shape, w.dtype), trainable=False, name=f"best_{i}")
                for i, w in enumerate(model.weights)
            ]
        self.state = state
        self.set_model(model)

    @property
    def best(self) -> float:
        return float(self.state.value.numpy())

    @property
    def best_epoch(self) -> int | None:
        """The selected epoch, 1-based (None: none yet)."""
        epoch = int(self.state.epoch.numpy())
        return epoch + 1 if epoch >= 0 else None

    def _better(self, value: float) -> bool:
        return value < self.best if self.mode == "min" else value > self.best

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if self.monitor not in logs:
            if any(k.startswith("val_") for k in logs):
                from pipelines.config import ConfigError

                raise ConfigError(
                    f"train.select_best: {self.monitor!r} is not an epoch log of this run. "
                    f"Accepted: {', '.join(sorted(k for k in logs if k.startswith('val_')))}."
                )
            return  # no validation this epoch
        value = float(logs[self.monitor])
        if self._better(value):
            for copy, weight in zip(self.state.weights, self.model.weights, strict=True):
                copy.assign(weight)
            self.state.value.assign(value)
            self.state.epoch.assign(epoch)
            self.state.wait.assign(0)
        else:
            self.state.wait.assign_add(1)
            if self.patience and int(self.state.wait.numpy()) >= self.patience:
                self.model.stop_training = True

    def on_train_end(self, logs=None):
        if self.best_epoch is None:
            return
        for weight, copy in zip(self.model.weights, self.state.weights, strict=True):
            weight.assign(copy)
        if self.sink is not None:
            self.sink(
                {"selected_epoch": float(self.best_epoch), f"selected_{self.monitor}": self.best},
                None,
            )
