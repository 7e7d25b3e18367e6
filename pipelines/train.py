"""The training driver: config -> strategy -> resume slot -> tracked run -> data -> model
in scope -> fit -> evaluate -> publish. ``run_experiment`` reads top to bottom; each
life-cycle is one object that cleans up after itself (``ResumeSlot``, ``RunTracker``,
``Publication``), and ``fit_model`` is the part tests call directly."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipelines.config import ConfigError, ExperimentConfig

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite (TerminateOnNaN stopped training)."""


@dataclass
class RunSummary:
    run_id: str | None
    experiment: str
    metrics: dict[str, float]
    model_name: str | None
    model_version: str | None
    aliases: list[str]
    export_path: str | None
    run_dir: str = ""
    gate: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_config(config: ExperimentConfig) -> None:
    """Errors that need the registries (task options and rules, gate metric, model
    arguments, dataset options), raised before anything runs."""
    import data
    import models
    from pipelines.tasks.base import get_task

    try:
        task = get_task(config.task)
        options = task.parse_options(config)
        task.check(config, options)
        if config.export.precision not in task.export_precisions:
            raise ValueError(
                f"export.precision: {config.export.precision!r} is not supported by task "
                f"{config.task!r}. Accepted for this task: {', '.join(task.export_precisions)}."
            )
        if config.tracking.enabled and config.tracking.log_model:
            gate, produced = config.tracking.gate.metric, task.metric_names(config, options)
            if gate not in produced:
                raise ValueError(
                    f"tracking.gate.metric: {gate!r} is not a metric this run produces "
                    f"(task {config.task!r}, model {config.model.name!r}). "
                    f"Accepted: {', '.join(produced)}."
                )
        data.check_options(config.data.name, config.data.options())
        models.check_model_kwargs(config.model.name, config.model.kwargs())
    except ConfigError as exc:
        raise ConfigError(f"Invalid config {config.name!r}: {exc}") from None
    except (KeyError, ValueError, TypeError) as exc:
        msg = exc.args[0] if exc.args else str(exc)
        raise ConfigError(f"Invalid config {config.name!r}: {msg}") from None


def run_experiment(config: ExperimentConfig) -> RunSummary:
    """Train, evaluate, export and register one experiment. On failure the MLflow run
    ends FAILED and no registered version or export is left; SIGTERM checkpoints, ends
    the run KILLED and raises ``Preempted``; the same command resumes it."""
    check_config(config)
    from pipelines import runtime

    strategy = runtime.configure(config.runtime)
    import tensorflow_datasets as tfds

    from pipelines.loop import Position, TrainingCheckpoint
    from pipelines.publication import Publication
    from pipelines.resume import ResumeSlot
    from pipelines.tasks.base import RunContext, get_task
    from pipelines.tracking import RunTracker

    tfds.disable_progress_bar()
    started, chief = time.time(), runtime.is_chief()
    replicas = strategy.num_replicas_in_sync
    effective = effective_config(config, replicas)
    slot = ResumeSlot(config, runtime.worker_name(), chief)
    start = (TrainingCheckpoint.peek(slot.checkpoint_dir) if slot.resuming else None) or Position()
    tracker = RunTracker(config, enabled=chief, run_id=slot.run_id)
    context = RunContext(
        effective,
        replicas,
        start.epoch,
        start.step,
        chief=chief,
        strategy=strategy,
        log_metrics=tracker.sink,
    )
    task = get_task(config.task)(context)

    # -- data and model: before the MLflow run starts, so bad input leaves nothing behind --
    inputs = task.build_inputs()
    model = build_model(task, inputs, context)
    with tracker, slot.session(tracker):
        run_dir = Path(config.runtime.work_dir) / config.name / (tracker.run_id or _timestamp())
        resumed_at = resume_point(start, config.train.epochs) if slot.resuming else None
        tracker.log_start(
            run_params(config, effective, inputs, strategy), run_tags(config, inputs), resumed_at
        )
        tracker.log_dataset(config.data.name, inputs.fingerprint, inputs.info.source)

        # -- fit -------------------------------------------------------------------------
        model, history = fit_model(
            task, inputs, context, run_dir, model=model, slot=slot, tracker=tracker
        )
        tracker.log_best(history)
        train_seconds = time.time() - started
        if not chief:  # evaluation, export and registration are the chief's
            return RunSummary(
                tracker.run_id,
                config.experiment_name,
                {},
                None,
                None,
                [],
                None,
                str(run_dir),
                seconds=round(time.time() - started, 2),
            )
        if is_multi_worker(strategy):
            # The other workers leave now: the chief must not issue collectives, so it
            # evaluates and exports a copy of the trained weights outside the strategy.
            model = unreplicated_copy(task, inputs, model)

        # -- evaluate ----------------------------------------------------------------------
        evaluation = task.evaluate(model, inputs)
        artifacts = write_artifacts(
            run_dir / "artifacts", effective, inputs, model, history, evaluation
        )
        tracker.log_metrics({f"eval_{k}": v for k, v in evaluation.metrics.items()})
        tracker.log_metrics({"train_seconds": train_seconds, **evaluation.run_metrics})
        tracker.set_tags(evaluation.tags)
        tracker.log_artifacts(artifacts)

        # -- publish: export, register, gate (undone as a whole on failure) -----------------
        serving = task.serving(model, inputs.info, inputs.check_batch)
        published = Publication(config, tracker).publish(
            serving, evaluation.metrics, eval_data=inputs.eval
        )
    metrics = dict(evaluation.metrics)
    if published.export_max_abs_diff is not None:
        metrics["export_max_abs_diff"] = published.export_max_abs_diff
    metrics.update(published.export_metrics)
    return RunSummary(
        run_id=tracker.run_id,
        experiment=config.experiment_name,
        metrics=metrics,
        model_name=config.registered_model_name if published.version else None,
        model_version=published.version,
        aliases=published.aliases,
        export_path=published.export_path,
        run_dir=str(run_dir),
        gate=published.gate,
        seconds=round(time.time() - started, 2),
    )


# ---------------------------------------------------------------------- the pieces


def effective_config(config: ExperimentConfig, replicas: int) -> ExperimentConfig:
    """The config the run trains with: the learning rate scaled by the replicas when
    ``train.scale_learning_rate`` asks for it (Goyal et al. 2017)."""
    effective = config.model_copy(deep=True)
    if config.train.scale_learning_rate and replicas > 1:
        effective.train.learning_rate = config.train.learning_rate * replicas
    return effective


def build_model(task, inputs, context):
    """The task's model, built and compiled in the strategy's scope from the run's seed.
    A model builder's argument error (``--set model.dropout=-1``) is a ``ConfigError``."""
    import keras

    # Seed again: preparing a dataset the first time may draw from the global generators,
    # and the initial weights must not depend on whether the data was already on disk.
    keras.utils.set_random_seed(context.config.runtime.seed)
    with context.strategy.scope():
        try:
            return task.build_model(inputs)
        except (ValueError, TypeError) as exc:
            if not _raised_in_models(exc):
                raise
            raise ConfigError(f"Invalid config {context.config.name!r}: model: {exc}") from None


def _raised_in_models(exc: BaseException) -> bool:
    """Whether ``exc`` was raised by a builder in ``models/`` (its argument checks)."""
    import models

    root = str(Path(models.__file__).resolve().parent)
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and str(Path(tb.tb_frame.f_code.co_filename).resolve()).startswith(root)


def fit_model(
    task,
    inputs,
    context,
    run_dir: Path | None = None,
    *,
    model=None,
    slot=None,
    tracker=None,
    extra_callbacks=(),
):
    """Train the task's model (built here unless given) with the shared loop under the
    config's budget, after restoring the slot's checkpoint; returns the model and the
    whole per-epoch history (earlier epochs of a resumed run included). Raises
    ``TrainingDiverged`` when the loss became NaN/inf."""
    import keras

    from pipelines import loop
    from pipelines.callbacks import HistoryRecorder

    config, strategy = context.config, context.strategy
    run_dir = Path(run_dir) if run_dir is not None else Path(config.runtime.work_dir) / config.name
    start = loop.Position(context.start_epoch, context.start_step)
    checkpoint = None
    if slot is not None:
        checkpoint = loop.TrainingCheckpoint(
            slot.checkpoint_dir, every_n_steps=config.train.checkpoint_every_steps
        )
    if model is None:
        model = build_model(task, inputs, context)
    selection = best_weights(config, model, tracker)
    with strategy.scope():
        if checkpoint is not None:
            checkpoint.attach(model)
            if selection is not None:  # the best weights and their value resume too
                checkpoint.track("best_weights", selection.state)
            restored = checkpoint.restore() if slot.resuming else loop.Position()
            if restored != start:
                raise RuntimeError(
                    f"checkpoint position {restored} differs from the peeked {start}"
                )
    history = slot.history(start.epoch) if slot is not None else {}
    callbacks = [
        *(tracker.callbacks() if tracker is not None else []),
        keras.callbacks.TerminateOnNaN(),
        *task.callbacks(inputs, run_dir),
        *extra_callbacks,
        *([selection] if selection is not None else []),
        HistoryRecorder(history, slot.save_history if slot is not None else None),
    ]
    if config.train.tensorboard and context.chief:
        callbacks.append(keras.callbacks.TensorBoard(str(run_dir / "tensorboard")))
    loop.fit(
        model,
        strategy,
        inputs.train,
        epochs=config.train.epochs,
        steps_per_epoch=inputs.steps_per_epoch,
        validation_data=inputs.eval,
        validation_freq=config.train.validation_freq,
        callbacks=callbacks,
        checkpoint=checkpoint,
        start=start,
        verbose=config.train.verbose if context.chief else 0,
        jit_compile=config.runtime.jit_compile,
        steps_per_execution=config.train.steps_per_execution,
    )
    if not all(math.isfinite(v) for k in ("loss", "val_loss") for v in history.get(k, [])):
        raise TrainingDiverged(
            f"{config.name}: the loss became NaN/inf (history: {history.get('loss', [])[-3:]}); "
            "lower train.learning_rate or set train.global_clipnorm."
        )
    return model, history


def best_weights(config, model, tracker=None):
    """The model-selection callback of ``train.select_best`` / ``train.early_stopping_patience``
    (monitor ``val_loss`` unless ``select_best`` names another), or None."""
    from pipelines.callbacks import BestWeights

    train = config.train
    if not (train.select_best or train.early_stopping_patience):
        return None
    return BestWeights(
        model,
        monitor=train.select_best or "val_loss",
        patience=train.early_stopping_patience,
        sink=tracker.sink if tracker is not None else None,
    )


def resume_point(start, epochs: int) -> str | None:
    """Where a resumed run continues, as the ``deeptrends.resumed_at`` tag says it."""
    if not (start.epoch or start.step):
        return None
    if start.epoch >= epochs:  # interrupted after training, before publication
        return f"after training (all {epochs} epochs done)"
    return f"epoch {start.epoch + 1} step {start.step}"


def is_multi_worker(strategy) -> bool:
    import tensorflow as tf

    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def unreplicated_copy(task, inputs, model):
    """The trained weights in a model built outside the distribution strategy."""
    plain = task.build_model(inputs)
    plain.set_weights(model.get_weights())
    return plain


def run_params(config: ExperimentConfig, effective: ExperimentConfig, inputs, strategy) -> dict:
    """The resolved config, flattened, and what the run derived from it."""
    from pipelines import runtime
    from pipelines.tracking import flatten

    replicas = strategy.num_replicas_in_sync
    return {
        **flatten(config.to_dict()),
        "derived.strategy": (
            "MultiWorkerMirroredStrategy" if is_multi_worker(strategy) else type(strategy).__name__
        ),
        "derived.workers": runtime.task_info()[2],
        "derived.replicas": replicas,
        "derived.global_batch_size": config.train.batch_size,
        "derived.per_replica_batch_size": config.train.batch_size // max(1, replicas),
        "derived.learning_rate": effective.train.learning_rate,
        "derived.steps_per_epoch": inputs.steps_per_epoch,
        "derived.mixed_precision": runtime.resolve_mixed_precision(config.runtime.mixed_precision),
        "derived.onednn": runtime.onednn_enabled(),
    }


def run_tags(config: ExperimentConfig, inputs) -> dict[str, str]:
    return {
        "dataset.fingerprint": inputs.fingerprint,
        "dataset.name": config.data.name,
        "task": config.task,
        "model.name": config.model.name,
    }


def write_artifacts(folder: Path, config, inputs, model, history, evaluation) -> Path:
    """The run's artifacts: resolved config, dataset info, metrics, history, model
    summary, learning curves, and the task's own writers."""
    from pipelines import plots

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(config.to_yaml())
    (folder / "dataset_info.json").write_text(json.dumps(inputs.info.to_dict(), indent=2))
    (folder / "metrics.json").write_text(json.dumps(evaluation.metrics, indent=2))
    (folder / "history.json").write_text(json.dumps(history, indent=2))
    lines: list[str] = []
    model.summary(print_fn=lambda line, *a, **k: lines.append(line))
    (folder / "model_summary.txt").write_text("\n".join(lines) + "\n")
    if history:
        plots.learning_curves(history, folder / "learning_curves.png", title=config.name)
    for writer in evaluation.artifacts:
        writer(folder)
    return folder


def _timestamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")
