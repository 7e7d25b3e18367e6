"""One training loop for every strategy and every task.

Keras ``Model.fit`` does not run under ``MultiWorkerMirroredStrategy`` in Keras 3
(keras-team/keras#20585: PerReplica values reach a tensor conversion). This loop is
the thin part of ``fit`` we need, written once for all strategies: it runs the model's
own ``train_step``/``test_step`` (so custom steps of GANs, VAEs, RBMs work unchanged)
under ``strategy.run`` inside a ``tf.function``, reduces the per-replica logs with a
cross-replica mean, and drives ordinary Keras callbacks (progress bar, History,
TerminateOnNaN, EarlyStopping, TensorBoard, MLflow) plus a checkpoint that stores the
model, the optimizer and the exact (epoch, step) position for resumption.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import weakref
from dataclasses import dataclass
from pathlib import Path

import keras
import tensorflow as tf

from pipelines import kernels

log = logging.getLogger(__name__)
kernels.install()  # every network trained through the loop gets the fused kernels


class Preempted(RuntimeError):
    """SIGTERM arrived; a checkpoint was written and the run can be resumed."""


@dataclass
class Position:
    """Where training stands: ``epoch`` (0-based) and ``step`` within it."""

    epoch: int = 0
    step: int = 0


def _reduce(strategy: tf.distribute.Strategy, logs):
    def reduce(value):
        if isinstance(value, tf.distribute.DistributedValues):
            return strategy.reduce(tf.distribute.ReduceOp.MEAN, value, axis=None)
        return value

    return tf.nest.map_structure(reduce, logs)


def optimizers_of(model) -> list:
    """Every optimizer a model trains with: ``model.optimizer`` and those a training
    wrapper holds as attributes (the GAN's two players, one per RBM of a DBN), in a
    fixed order, each once."""
    found: list = []

    def add(value) -> None:
        if isinstance(value, keras.optimizers.Optimizer) and all(value is not o for o in found):
            found.append(value)

    add(getattr(model, "optimizer", None))
    for name in sorted(vars(model)):
        value = vars(model)[name]
        if isinstance(value, (list, tuple)) or type(value).__name__ == "ListWrapper":
            for item in value:
                add(item)
        else:
            add(value)
    return found


def training_state(model) -> list:
    """Every variable a training step reads or moves, in a fixed order: ``model.variables``
    (weights, non-trainable state such as BatchNorm statistics and persistent chains, and
    the state of every ``keras.random.SeedGenerator`` the model, its wrapper and their
    layers hold: Dropout, recurrent dropout, GAN noise, Gibbs sampling, VAE/DRAW noise),
    the metric accumulators and every optimizer's variables (iterations, slots, loss
    scale). Without the seed states a resumed run would restart its random streams.

    ``keras.random`` calls without a ``seed`` draw from Keras' process-wide generator,
    which belongs to no model and is not checkpointed: a step that must resume exactly
    draws from a ``SeedGenerator`` it owns, as Dropout and the trainers do."""
    variables = list(model.variables) + list(model.metrics_variables)
    for optimizer in optimizers_of(model):
        variables += list(optimizer.variables)
    unique, seen = [], set()
    for v in variables:
        if id(v) not in seen:
            seen.add(id(v))
            unique.append(v)
    return unique


def average_replica_statistics(model, strategy: tf.distribute.Strategy | None = None) -> None:
    """Set every floating-point non-trainable variable of ``model`` (BatchNorm's moving
    mean and variance) to its mean over the replicas, on every replica.

    Keras 3 makes them ``MirroredVariable``s with aggregation NONE: each replica's
    BatchNormalization moves its own copy from its own share of the batch, and a read
    (checkpoint, export, evaluation) sees one replica's copy. tf.keras read their mean
    (``ON_READ``/``MEAN``); averaging the copies gives that value, and as the moving
    average is linear, when it is done does not change the result. Copies made equal
    at every checkpoint and epoch end are what a resumed run (whose restored copies are
    equal) continues from, so it continues exactly."""
    strategy = strategy or tf.distribute.get_strategy()
    if strategy.num_replicas_in_sync < 2:
        return
    variables = [
        v
        for v in model.non_trainable_variables
        if isinstance(getattr(v, "value", None), tf.distribute.DistributedValues)
        and "float" in str(v.dtype)
    ]
    if not variables:
        return
    sync = getattr(model, "_deeptrends_average_statistics", None)
    if sync is None or sync[0] is not strategy:

        def average():
            context = tf.distribute.get_replica_context()
            local = [tf.identity(v.value) for v in variables]
            means = context.all_reduce(tf.distribute.ReduceOp.MEAN, local)
            for v, mean in zip(variables, means, strict=True):
                v.assign(mean)

        sync = (strategy, tf.function(lambda: strategy.run(average)))
        model._deeptrends_average_statistics = sync
    sync[1]()


def _single_worker(strategy: tf.distribute.Strategy) -> bool:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None:
        return True
    spec = resolver.cluster_spec()
    return not spec.jobs or spec.num_tasks("worker") in (None, 0, 1)


def build_optimizers(model) -> None:
    """Create every optimizer slot now, so that checkpoints hold them from the start."""
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and not optimizer.built:
        optimizer.build(model.trainable_variables)
    if hasattr(model, "build_optimizers"):
        model.build_optimizers()


class TrainingCheckpoint(keras.callbacks.Callback):
    """Saves the whole training state and the position every epoch and every
    ``every_n_steps`` steps with ``tf.train.CheckpointManager``; ``restore`` returns the
    position to resume at.

    The state is what the next step depends on, so that a resumed run continues as if
    it had never stopped: the model, every optimizer, and ``training_state(model)``:
    the random seed generators (dropout masks, sampling noise), non-trainable statistics
    and metric accumulators included. Variables created after ``attach`` (compiled
    metrics are built by the loop's first ``build_state``) join at ``track_new_state``,
    which ``fit`` calls after building, and are restored then.

    In a multi-worker job every worker saves (saving reads distributed variables and
    must run everywhere) into its own folder, so it also works without a shared disk.
    """

    def __init__(
        self, directory: str | Path, every_n_steps: int | None = None, max_to_keep: int = 2
    ):
        super().__init__()
        self.directory = Path(directory)
        self.every_n_steps = every_n_steps
        self.max_to_keep = max_to_keep
        self._epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="ckpt_epoch")
        self._step = tf.Variable(0, dtype=tf.int64, trainable=False, name="ckpt_step")
        self._manager: tf.train.CheckpointManager | None = None
        self._state: tf.Module | None = None
        self._tracked: set[int] = set()
        self._parts = 0
        self._restored: str | None = None

    @staticmethod
    def peek(directory: str | Path) -> Position | None:
        """The saved position, read without building anything (None: nothing saved)."""
        latest = tf.train.latest_checkpoint(str(directory))
        if not latest:
            return None
        reader = tf.train.load_checkpoint(latest)
        return Position(
            int(reader.get_tensor("epoch/.ATTRIBUTES/VARIABLE_VALUE")),
            int(reader.get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE")),
        )

    def attach(self, model) -> None:
        self.set_model(model)
        build_optimizers(model)  # so their slots are checkpointed
        self._state = tf.Module(name="training_state")
        self._tracked, self._parts = set(), 0
        objects = {"model": model, "epoch": self._epoch, "step": self._step, "state": self._state}
        if model.optimizer is not None:
            objects["optimizer"] = model.optimizer
        ckpt = tf.train.Checkpoint(**objects)
        self._manager = tf.train.CheckpointManager(
            ckpt, str(self.directory), max_to_keep=self.max_to_keep
        )
        self.track_new_state()

    def track_new_state(self) -> int:
        """Add the variables of ``training_state`` not checkpointed yet (one new part,
        in order: a fresh run and its resumption add the same parts at the same points);
        after a ``restore`` they take their saved values. Returns how many were added."""
        assert self._manager is not None, "attach(model) first"
        new = [v for v in training_state(self.model) if id(v) not in self._tracked]
        if not new:
            return 0
        self._tracked.update(id(v) for v in new)
        setattr(self._state, f"part_{self._parts}", new)
        self._parts += 1
        if self._restored:
            self._manager.checkpoint.restore(self._restored).assert_existing_objects_matched()
        return len(new)

    def track(self, name: str, trackable) -> None:
        """Checkpoint ``trackable`` (a ``tf.Module`` a callback keeps, such as the best
        weights of model selection) as ``name``; before ``restore``, which restores it."""
        assert self._manager is not None, "attach(model) first"
        setattr(self._manager.checkpoint, name, trackable)

    @property
    def restored(self) -> bool:
        """True after ``restore`` found a checkpoint."""
        return self._restored is not None

    def restore(self) -> Position:
        assert self._manager is not None, "attach(model) first"
        latest = self._manager.latest_checkpoint
        if not latest:
            return Position()
        self._manager.checkpoint.restore(latest).assert_existing_objects_matched()
        self._restored = latest
        position = Position(int(self._epoch.numpy()), int(self._step.numpy()))
        log.info("resumed from %s at epoch %d step %d", latest, position.epoch + 1, position.step)
        return position

    def save(self, epoch: int, step: int, *, everywhere: bool = True) -> str:
        """``everywhere``: every worker saves at this point (epoch ends, step
        checkpoints), so the replicas' statistics are averaged first; a SIGTERM save on
        one worker of several cannot wait for the others."""
        strategy = getattr(self.model, "distribute_strategy", None) or tf.distribute.get_strategy()
        if everywhere or _single_worker(strategy):
            average_replica_statistics(self.model, strategy)
        self._epoch.assign(epoch)
        self._step.assign(step)
        return self._manager.save()

    def due(self, step: int) -> bool:
        """Whether a step checkpoint falls after ``step`` steps of an epoch of ``steps``
        (the epoch's end is saved by ``on_epoch_end``)."""
        last = step == (self.params or {}).get("steps")
        return bool(self.every_n_steps) and step % self.every_n_steps == 0 and not last

    def next_boundary(self, step: int) -> int | None:
        """The first step after ``step`` that ``due`` saves at (None: no step checkpoints)."""
        if not self.every_n_steps:
            return None
        return (step // self.every_n_steps + 1) * self.every_n_steps

    def after_steps(self, epoch: int, step: int) -> None:
        """Called by ``fit`` after every execution, on the main thread (not a batch hook:
        one would make Keras' ``CallbackList`` wait for every step's logs)."""
        if self.due(step):
            self.save(epoch, step)

    def on_epoch_end(self, epoch, logs=None):
        self.save(epoch + 1, 0)


class _SigtermFlag:
    """Turns SIGTERM into a flag the loop checks between steps (main thread only)."""

    def __init__(self):
        self.raised = False
        self._previous = None

    def __enter__(self):
        if hasattr(signal, "SIGTERM") and _in_main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handler)
        return self

    def _handler(self, signum, frame):
        self.raised = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def build_state(model, strategy: tf.distribute.Strategy, sample_batch=None) -> None:
    """Create every variable before the first step, in the strategy's scope, as ``fit``'s
    symbolic build does: compiled loss/metric trackers and optimizer slots created lazily
    inside a replica's step would not be mirrored. Training wrappers with optimizers of
    their own (GAN players, RBM layers) build them in a ``build_optimizers()`` hook."""
    with strategy.scope():
        if getattr(model, "_compile_loss", None) is not None and sample_batch is not None:
            replicas = strategy.num_replicas_in_sync  # a replica sees its share of the global batch
            per_replica = tf.nest.map_structure(
                lambda t: t[: max(1, t.shape[0] // replicas)], sample_batch
            )
            model._symbolic_build(data_batch=per_replica)  # what fit() does first
        build_optimizers(model)


def _metric_logs(model) -> dict:
    """The model's metric results, as its ``train_step`` returns them."""
    return dict(model.get_metrics_result())


def _trace_key(model):
    """A model whose step reads Python state at trace time (the DBN's RBM in training)
    exposes it as ``trace_key``; the loop retraces its step functions when the key changes
    at an epoch start, as Keras ``fit`` does after ``make_train_function(force=True)``."""
    return getattr(model, "trace_key", None)


def _multi_step_function(model, strategy, step_fn, jit_compile: bool):
    """``run(iterator, n)``: ``n`` (>= 1) steps of ``step_fn`` on the next ``n``
    batches of the distributed ``iterator``, in one ``tf.function`` call, as Keras ``fit``
    runs ``steps_per_execution``; returns the last step's logs, reduced across replicas
    once per execution. The batches are read inside the graph: no Python ``next`` and no
    per-step host work between steps."""
    inner = (
        tf.function(step_fn, jit_compile=True, reduce_retracing=True) if jit_compile else step_fn
    )

    @tf.function(reduce_retracing=True)  # variable-length batches (text) would retrace every shape
    def one(iterator):
        return _reduce(strategy, strategy.run(inner, args=(next(iterator),)))

    @tf.function(reduce_retracing=True)
    def many(iterator, n):
        for _ in tf.range(n - 1):  # their logs are not needed: only the last step's
            strategy.run(inner, args=(next(iterator),))
        return _reduce(strategy, strategy.run(inner, args=(next(iterator),)))

    counts: dict[int, tf.Tensor] = {}

    def run(iterator, n: int):
        if n == 1:  # no loop in the graph: a while op costs even when it runs no iteration
            return one(iterator)
        if n not in counts:
            counts[n] = tf.constant(n, tf.int32)
        return many(iterator, counts[n])

    return run


def _one_step_function(model, strategy, step_fn, jit_compile: bool):
    """``run(batch)``: one step on one distributed batch (validation)."""
    inner = (
        tf.function(step_fn, jit_compile=True, reduce_retracing=True) if jit_compile else step_fn
    )

    @tf.function(reduce_retracing=True)
    def run(batch):
        return _reduce(strategy, strategy.run(inner, args=(batch,)))

    return run


# Step functions of a model, kept across ``fit`` calls as Keras keeps ``train_function``
# (a new ``tf.function`` per call would trace again every time). Keyed weakly by the
# model; the functions hold it weakly too, so a dropped model frees its entry.
_STEP_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


_XLA_OFF_WARNED: set[int] = set()  # strategies already warned about (once per run)


def _xla_usable(strategy, jit_compile: bool) -> bool:
    """``jit_compile`` unless the strategy mirrors the step over several CPU devices of one
    process (virtual CPUs): XLA cannot compile a replica's step whose variables sit on
    another CPU device there (TensorFlow's known issue "tf.Variable on a different
    device"), so the step runs as a plain ``tf.function``, with a warning. One device per
    worker (multi-worker, one CPU each) and GPUs keep XLA."""
    if not jit_compile:
        return False
    try:
        devices = list(strategy.extended.worker_devices)
    except (AttributeError, RuntimeError):  # the default strategy has none: one device
        devices = []
    if len(devices) > 1 and all("CPU" in d.upper() for d in devices):
        if id(strategy) in _XLA_OFF_WARNED:
            return False
        _XLA_OFF_WARNED.add(id(strategy))
        log.warning(
            "runtime.jit_compile is off for this run: %s mirrors the step over %d CPU "
            "devices, which XLA cannot compile (tf.Variable on a different device); the "
            "numbers are the same, only slower",
            type(strategy).__name__,
            len(devices),
        )
        return False
    return True


def _step_functions(model, strategy, jit_compile: bool):
    jit_compile = _xla_usable(strategy, jit_compile)
    key = (strategy, jit_compile, _trace_key(model))
    cache = _STEP_CACHE.setdefault(model, {})
    if key not in cache:
        ref = weakref.ref(model)

        def train_step(batch):
            return ref().train_step(batch)

        def test_step(batch):
            return ref().test_step(batch)

        cache.clear()  # a new trace key (DBN stage) or strategy: the old traces are done
        cache[key] = (
            _multi_step_function(model, strategy, train_step, jit_compile),
            _one_step_function(model, strategy, test_step, jit_compile),
        )
    return cache[key]


def _executions(first: int, steps: int, per_execution: int, checkpoint):
    """The (begin, end) step ranges of one epoch from step ``first``: at most
    ``per_execution`` steps each, every step checkpoint at an execution's end."""
    step = first
    while step < steps:
        end = min(step + per_execution, steps)
        boundary = checkpoint.next_boundary(step) if checkpoint is not None else None
        if boundary is not None and boundary < end:
            end = boundary
        yield step, end
        step = end


def fit(
    model,
    strategy: tf.distribute.Strategy,
    train_data: tf.data.Dataset,
    *,
    epochs: int,
    steps_per_epoch: int,
    validation_data: tf.data.Dataset | None = None,
    validation_freq: int = 1,
    callbacks: list | None = None,
    checkpoint: TrainingCheckpoint | None = None,
    start: Position | None = None,
    verbose: int = 1,
    jit_compile: bool = False,
    steps_per_execution: int = 1,
) -> dict[str, list[float]]:
    """Train ``model`` from ``start`` (a restored position) to ``epochs``.

    ``train_data`` repeats without end and begins at ``start`` (the caller builds it so);
    ``steps_per_epoch`` batches make an epoch. ``steps_per_execution`` steps run in one
    ``tf.function`` call; callbacks see one batch per execution, as in Keras ``fit``
    (``on_train_batch_begin(first)``, ``on_train_batch_end(last, logs)``); an execution
    ends at every step checkpoint and at the epoch's end, so checkpoints, ``SIGTERM`` and
    ``stop_training`` fall where they fall with one step per execution. Returns the
    History dict of this call.
    """
    if steps_per_execution < 1:
        raise ValueError(f"steps_per_execution must be >= 1. Received: {steps_per_execution}")
    start = start or Position()
    build_state(model, strategy, next(iter(train_data.take(1))))
    if checkpoint is not None:
        with strategy.scope():
            checkpoint.track_new_state()  # compiled metrics exist now; restored if resuming
    # The checkpoint saves on epoch ends as a callback (after the others) and on step
    # boundaries from the loop itself (``after_steps``): it has no batch hook, so Keras'
    # CallbackList may hand batch logs to its thread without waiting for each step.
    all_callbacks = list(callbacks or []) + ([checkpoint] if checkpoint else [])
    cbs = keras.callbacks.CallbackList(
        all_callbacks,
        add_history=True,
        add_progbar=verbose != 0,
        verbose=verbose,
        epochs=epochs,
        steps=steps_per_epoch,
        model=model,
    )
    iterator = iter(strategy.experimental_distribute_dataset(train_data))
    dist_val = (
        strategy.experimental_distribute_dataset(validation_data)
        if validation_data is not None
        else None
    )

    resumed_mid_epoch = bool(start.step) and checkpoint is not None and checkpoint.restored
    model.stop_training = False
    cbs.on_train_begin()
    logs: dict = {}
    epoch_logs: dict = {}
    with _SigtermFlag() as sigterm:
        for epoch in range(start.epoch, epochs):
            if not (resumed_mid_epoch and epoch == start.epoch):
                model.reset_metrics()  # (mid-epoch, the restored sums of the epoch go on)
            cbs.on_epoch_begin(epoch)
            # first epoch, or the model's Python state moved (the DBN's stage): retrace
            train_fn, test_fn = _step_functions(model, strategy, jit_compile)
            first = start.step if epoch == start.epoch else 0
            if first >= steps_per_epoch:  # resumed after the epoch's last step: its restored sums
                logs = _metric_logs(model)
            for begin, end in _executions(first, steps_per_epoch, steps_per_execution, checkpoint):
                cbs.on_train_batch_begin(begin)
                logs = train_fn(iterator, end - begin)
                cbs.on_train_batch_end(end - 1, logs)
                if checkpoint is not None:
                    checkpoint.after_steps(epoch, end)
                if sigterm.raised:
                    where = checkpoint.save(epoch, end, everywhere=False) if checkpoint else None
                    raise Preempted(f"SIGTERM at epoch {epoch + 1} step {end}; checkpoint {where}")
                if model.stop_training:
                    break
            average_replica_statistics(model, strategy)  # validation reads them
            epoch_logs = {k: float(v) for k, v in logs.items()}
            if dist_val is not None and (epoch + 1) % validation_freq == 0:
                model.reset_metrics()
                val_logs: dict = {}
                cbs.on_test_begin()
                for i, batch in enumerate(dist_val):
                    cbs.on_test_batch_begin(i)
                    val_logs = test_fn(batch)
                    cbs.on_test_batch_end(i, val_logs)
                val_logs = {k: float(v) for k, v in val_logs.items()}
                cbs.on_test_end(val_logs)
                epoch_logs.update({f"val_{k}": v for k, v in val_logs.items()})
            cbs.on_epoch_end(epoch, epoch_logs)
            if model.stop_training:
                break
    cbs.on_train_end(logs=epoch_logs if logs else None)
    history = model.history.history if getattr(model, "history", None) else {}
    return {k: [float(v) for v in vals] for k, vals in history.items()}


def write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)
