"""Sequence modelling with recurrent nets: classification and regression of generated
sequences (the long-term-dependency problems) and word-level language modelling.

Gradient clipping comes from ``train.clipnorm`` / ``train.global_clipnorm`` (the
optimizer). ``train.bptt_steps`` turns a language model into truncated BPTT: the model is
built stateful with a fixed batch, the data is laid out as ``batch_size`` parallel streams
cut into chunks of ``bptt_steps``, and the state is reset at every epoch and evaluation.
The served model is a stateless twin with the same weights (a request must not see the
state of the previous one).

Metrics: ``mse`` (regression), ``accuracy`` (classification), ``perplexity`` (language
models; ``exp`` of the mean per-token cross-entropy); ``loss`` always.
"""

from __future__ import annotations

import importlib
import math
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

import models
from data.catalog import check_options, get_dataset
from pipelines.config import ConfigError
from pipelines.optim import build_optimizer
from pipelines.tasks.base import Endpoint, Inputs, Task, register_task


class EpochTimer(keras.callbacks.Callback):
    """Seconds per training epoch (without validation), for same-budget comparisons."""

    def __init__(self):
        super().__init__()
        self.seconds: list[float] = []
        self._start = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self._last = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(getattr(self, "_last", time.perf_counter()) - self._start)


def log_run_metrics(values: dict[str, float]) -> None:
    """Log extra metrics to the active MLflow run, if there is one (the driver owns the run)."""
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.log_metrics({k: float(v) for k, v in values.items()})


def reset_recurrent_states(model) -> None:
    for layer in model.layers:
        if getattr(layer, "stateful", False) and hasattr(layer, "reset_states"):
            layer.reset_states()


class ResetStates(keras.callbacks.Callback):
    """Truncated BPTT: a fresh state at the start of every epoch and every evaluation."""

    def on_epoch_begin(self, epoch, logs=None):
        reset_recurrent_states(self.model)

    def on_test_begin(self, logs=None):
        reset_recurrent_states(self.model)

    def on_test_end(self, logs=None):
        reset_recurrent_states(self.model)


@keras.saving.register_keras_serializable(package="deeptrends")
class Perplexity(keras.metrics.Mean):
    """``exp`` of the mean token cross-entropy (from logits); padding (label 0) ignored."""

    def __init__(self, name="perplexity", **kwargs):
        super().__init__(name=name, **kwargs)

    def update_state(self, y_true, y_pred, sample_weight=None):
        ce = keras.losses.sparse_categorical_crossentropy(y_true, y_pred, from_logits=True)
        mask = keras.ops.cast(keras.ops.not_equal(y_true, 0), ce.dtype)
        return super().update_state(ce, sample_weight=mask)

    def result(self):
        return keras.ops.exp(super().result())


@keras.saving.register_keras_serializable(package="deeptrends")
def _masked_lm_loss(y_true, y_pred):
    ce = keras.losses.sparse_categorical_crossentropy(y_true, y_pred, from_logits=True)
    mask = keras.ops.cast(keras.ops.not_equal(y_true, 0), ce.dtype)
    return keras.ops.sum(ce * mask) / keras.ops.maximum(keras.ops.sum(mask), 1.0)


@register_task("sequence")
class SequenceTask(Task):
    """RNN/LSTM/GRU on sequences: regression, classification or language modelling."""

    metric_names = ("loss", "mse", "accuracy", "perplexity")

    def _load(self):
        cfg = self.config
        entry = get_dataset(cfg.data.name)
        kwargs = check_options(cfg.data.name, cfg.data.options())
        kwargs["batch_size"] = cfg.train.batch_size
        if entry.kind == "language_model":
            if cfg.train.bptt_steps:
                kwargs["seq_len"] = cfg.train.bptt_steps
                kwargs["stateful"] = True
        elif entry.kind == "sequence":
            if cfg.train.bptt_steps:
                raise ConfigError(
                    "train.bptt_steps: truncated BPTT applies to language models (a stream); "
                    f"dataset {cfg.data.name!r} has one label per sequence. "
                    "Remove train.bptt_steps."
                )
        else:
            raise ConfigError(
                f"data.name: task 'sequence' reads sequence or language_model datasets; "
                f"{cfg.data.name!r} is {entry.kind!r}."
            )
        module, _, fn = entry.load.partition(":")
        return getattr(importlib.import_module(module), fn)(**kwargs)

    def build_inputs(self) -> Inputs:
        data = self._load()
        info = {
            "dataset": self.config.data.name,
            "kind": data.kind,
            "num_train": data.num_train,
            "num_eval": data.num_eval,
            "source": data.source,
            "batch_size": self.config.train.batch_size,
            **data.info,
        }
        return Inputs(
            train=data.train,
            eval=data.eval,
            steps_per_epoch=self.config.train.steps_per_epoch or data.steps_per_epoch,
            info=info,
            fingerprint=data.fingerprint,
        )

    def _model_kwargs(self, info: dict[str, Any], stateful: bool | None = None) -> dict[str, Any]:
        name = self.config.model.name
        kind = info["kind"]
        kwargs: dict[str, Any] = {}
        if kind == "language_model":
            kwargs["vocab_size"] = int(info["vocab_size"])
            stateful = info.get("stateful", False) if stateful is None else stateful
            if stateful:
                # the data holds batch_size parallel streams; each replica carries its share
                kwargs.update(stateful=True, batch_size=int(info["batch_size"]) // max(1, self.num_replicas))
            if not name.endswith("_lm"):
                kwargs["head"] = "language_model"
        else:
            if "input_dim" in info:
                kwargs["input_dim"] = int(info["input_dim"])
            else:
                kwargs["vocab_size"] = int(info["vocab_size"])
            kwargs["num_outputs"] = int(info["num_outputs"])
            kwargs["sequence_length"] = int(info["sequence_length"])
            if name.endswith("_lm"):
                raise ConfigError(
                    f"model.name: {name!r} is a language model; "
                    f"dataset kind {kind!r} needs rnn, lstm or gru."
                )
            kwargs["head"] = kind
        kwargs.update(self.config.model.kwargs())
        return kwargs

    def build_model(self, info: dict[str, Any]):
        self._info = info
        return models.create_model(self.config.model.name, **self._model_kwargs(info))

    def compile_model(self, model, inputs: Inputs) -> None:
        kind = inputs.info["kind"]
        if kind == "regression":
            loss, metrics = "mse", [keras.metrics.MeanSquaredError(name="mse")]
        elif kind == "classification":
            loss, metrics = (
                "sparse_categorical_crossentropy",
                [keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
            )
        else:
            loss, metrics = _masked_lm_loss, [Perplexity()]
        model.compile(
            optimizer=build_optimizer(self.config.train, inputs.steps_per_epoch),
            loss=loss,
            metrics=metrics,
            jit_compile=self.config.runtime.jit_compile,
        )

    def callbacks(self, run_dir: Path, inputs: Inputs) -> list:
        self._timer = EpochTimer()
        cbs = [self._timer]
        if inputs.info.get("stateful"):
            cbs.append(ResetStates())
        return cbs

    # -- evaluation ---------------------------------------------------------------
    def evaluate(self, model, inputs: Inputs) -> dict[str, float]:
        kind = inputs.info["kind"]
        reset_recurrent_states(model)
        total, count, correct = 0.0, 0, 0
        for x, y in inputs.eval:
            pred = np.asarray(model(x, training=False), dtype=np.float64)
            y = np.asarray(y)
            if kind == "regression":
                total += float(np.sum((pred - y.reshape(pred.shape)) ** 2))
                count += pred.size
            elif kind == "classification":
                p = np.clip(pred[np.arange(len(y)), y], 1e-7, 1.0)
                total += float(-np.sum(np.log(p)))
                correct += int(np.sum(pred.argmax(-1) == y))
                count += len(y)
            else:
                logits = pred - pred.max(axis=-1, keepdims=True)
                logp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
                picked = np.take_along_axis(logp, y[..., None].astype(np.int64), axis=-1)[..., 0]
                mask = y != 0
                total += float(-np.sum(picked * mask))
                count += int(mask.sum())
        reset_recurrent_states(model)
        mean = total / max(1, count)
        metrics = {"loss": mean}
        if kind == "regression":
            metrics["mse"] = mean
        elif kind == "classification":
            metrics["accuracy"] = correct / max(1, count)
        else:
            metrics["perplexity"] = float(math.exp(min(mean, 50.0)))
        timer = getattr(self, "_timer", None)
        extra = {"num_params": float(model.count_params())}
        if timer is not None and timer.seconds:
            extra["seconds_per_epoch"] = float(np.mean(timer.seconds))
        log_run_metrics(extra)
        return metrics

    def write_artifacts(self, model, history, inputs: Inputs, out_dir: Path) -> None:
        from pipelines import plots

        plots.learning_curves(history, out_dir / "learning_curves.png", title=self.config.name)

    # -- serving ------------------------------------------------------------------
    def serving_model(self, model):
        """A stateless twin of a stateful (truncated-BPTT) model, with the same weights."""
        info = getattr(self, "_info", None)
        if info is None or not info.get("stateful"):
            return model
        twin = models.create_model(
            self.config.model.name, **self._model_kwargs(info, stateful=False)
        )
        twin.set_weights(model.get_weights())
        return twin

    def endpoints(self, model, info: dict[str, Any], check_batch: Any = None) -> list[Endpoint]:
        kind = info["kind"]
        if kind == "language_model":

            def serve(tokens):
                logits = tf.cast(model(tokens, training=False), tf.float32)  # [B, T, V]
                last = tf.maximum(tf.reduce_sum(tf.cast(tokens != 0, tf.int32), axis=1) - 1, 0)
                final = tf.gather(logits, last, batch_dims=1)
                logp = tf.nn.log_softmax(final, axis=-1)
                return {
                    "next_token_log_probs": logp,
                    "next_token": tf.argmax(logp, axis=-1, output_type=tf.int64),
                }

            spec = tf.TensorSpec([None, None], tf.int32, name="tokens")
            example = (
                np.asarray(check_batch[0])[:4]
                if check_batch is not None
                else np.ones((2, 5), np.int32)
            )
            return [Endpoint("serving_default", serve, [spec], [example.astype(np.int32)])]

        length = int(info["sequence_length"])
        if "input_dim" in info:
            spec = tf.TensorSpec(
                [None, length, int(info["input_dim"])], tf.float32, name="sequences"
            )
            dtype = np.float32
        else:
            spec = tf.TensorSpec([None, length], tf.int32, name="tokens")
            dtype = np.int32

        def serve(x):
            out = tf.cast(model(x, training=False), tf.float32)
            if kind == "classification":
                return {
                    "probabilities": out,
                    "classes": tf.argmax(out, axis=-1, output_type=tf.int64),
                }
            return {"predictions": out}

        if check_batch is not None:
            example = np.asarray(check_batch[0])[:8].astype(dtype)
        else:
            example = np.zeros([2, *spec.shape[1:]], dtype)
        return [Endpoint("serving_default", serve, [spec], [example])]
