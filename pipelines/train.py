"""The training driver: config -> strategy -> data -> model in scope -> fit -> evaluate
-> export -> register. One function, in sections, readable in one sitting."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipelines.config import ExperimentConfig

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
    """Errors that need the registries (task, model arguments, dataset options), raised
    before anything runs."""
    import data
    import models
    from pipelines.config import ConfigError
    from pipelines.tasks.base import get_task

    try:
        task = get_task(config.task)
        gate = config.tracking.gate.metric
        if task.metric_names and gate not in task.metric_names:
            raise ValueError(
                f"tracking.gate.metric: {gate!r} is not a metric of task {config.task!r}. "
                f"Accepted: {', '.join(task.metric_names)}."
            )
        data.check_options(config.data.name, config.data.options())
        models.check_model_kwargs(config.model.name, config.model.kwargs())
    except (KeyError, ValueError, TypeError) as exc:
        msg = exc.args[0] if exc.args else str(exc)
        raise ConfigError(f"Invalid config {config.name!r}: {msg}") from None


def _history_is_finite(history: dict[str, list[float]]) -> bool:
    return all(math.isfinite(v) for key in ("loss", "val_loss") for v in history.get(key, []))


def run_key(config: ExperimentConfig) -> str:
    """Identifies "the same command": the resolved config minus what does not change the result."""
    import hashlib

    d = config.to_dict()
    d["train"].pop("verbose", None)
    d["runtime"].pop("resume", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


class _HistoryFile:
    """Keeps the per-epoch history of an interrupted run, so a resumed run's curves are whole."""

    def __init__(self, path: Path):
        self.path = path

    def load(self) -> dict[str, list[float]]:
        return json.loads(self.path.read_text()) if self.path.exists() else {}

    def callback(self, previous: dict[str, list[float]], start_epoch: int):
        import keras

        path, merged = self.path, {k: list(v[:start_epoch]) for k, v in previous.items()}

        class Writer(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                for k, v in (logs or {}).items():
                    merged.setdefault(k, []).append(float(v))
                from pipelines.loop import write_json_atomic

                write_json_atomic(path, merged)

        return Writer(), merged


def run_experiment(config: ExperimentConfig) -> RunSummary:
    """Train, evaluate, export and register one experiment. Raises on failure, after
    marking the MLflow run FAILED and leaving no registered version or export behind.

    The same command run again after a crash or ``kill -9`` resumes from the last
    checkpoint into the same MLflow run; SIGTERM checkpoints, marks the run KILLED with
    tag ``deeptrends.interrupted`` and raises ``Preempted``."""
    check_config(config)
    from pipelines import runtime

    strategy = runtime.configure(config.runtime)

    import mlflow
    import tensorflow as tf
    import tensorflow_datasets as tfds

    from pipelines import loop, tracking
    from pipelines.serving import export
    from pipelines.tasks.base import get_task

    tfds.disable_progress_bar()
    started = time.time()
    chief = runtime.is_chief()
    replicas = strategy.num_replicas_in_sync
    _, _, num_workers = runtime.task_info()
    multi_worker = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
    effective = config.model_copy(deep=True)
    if config.train.scale_learning_rate and replicas > 1:
        effective.train.learning_rate = config.train.learning_rate * replicas

    # -- resumption slot: shared by the workers of a job and by reruns of the command ------
    slot = Path(config.runtime.work_dir) / config.name / ".resume" / run_key(config)
    state_path = slot / "run.json"
    state = json.loads(state_path.read_text()) if config.runtime.resume and state_path.exists() else None
    ckpt_dir = slot / "checkpoints" / runtime.worker_name()
    position = (loop.TrainingCheckpoint.peek(ckpt_dir) if state else None) or loop.Position()

    task = get_task(config.task)(effective)
    task.num_replicas = replicas
    if task.supports_start_position:
        task.start_epoch, task.start_step = position.epoch, position.step

    track = config.tracking.enabled and chief
    run = None
    if track:
        mlflow.set_tracking_uri(tracking.tracking_uri(config))
        mlflow.set_experiment(config.experiment_name)
        if state and state.get("run_id"):
            run = mlflow.start_run(run_id=state["run_id"])
        else:
            run = mlflow.start_run(run_name=config.tracking.run_name)
    run_id = run.info.run_id if run else (state or {}).get("run_id")
    resumed = state is not None and (position.epoch or position.step)
    slot.mkdir(parents=True, exist_ok=True)
    if chief:
        loop.write_json_atomic(state_path, {"run_id": run_id, "status": "running", "config": config.name})

    run_dir = Path(config.runtime.work_dir) / config.name / (run_id or time.strftime("%Y%m%d-%H%M%S"))
    artifacts = run_dir / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    staged = version = export_path = decision = None
    aliases: list[str] = []
    model_name = config.registered_model_name
    client = mlflow.MlflowClient() if track else None
    try:
        # -- data ------------------------------------------------------------------------
        inputs = task.build_inputs()
        train_data = inputs.train
        if not task.supports_start_position and (position.epoch or position.step):
            train_data = train_data.skip(position.epoch * inputs.steps_per_epoch + position.step)
        eval_data = inputs.eval
        if multi_worker:  # every worker evaluates the whole split: equal step counts, no hang
            options = tf.data.Options()
            options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
            eval_data = eval_data.with_options(options)
        derived = {
            "derived.strategy": "MultiWorkerMirroredStrategy" if multi_worker else type(strategy).__name__,
            "derived.workers": num_workers,
            "derived.replicas": replicas,
            "derived.global_batch_size": config.train.batch_size,
            "derived.per_replica_batch_size": config.train.batch_size // max(1, replicas),
            "derived.learning_rate": effective.train.learning_rate,
            "derived.steps_per_epoch": inputs.steps_per_epoch,
        }
        if track and not resumed:
            tracking.log_params({**tracking.flatten(config.to_dict()), **derived})
            mlflow.set_tags(
                {
                    "git.commit": tracking.git_commit() or "none",
                    "dataset.fingerprint": inputs.fingerprint,
                    "dataset.name": config.data.name,
                    "task": config.task,
                    "model.name": config.model.name,
                    **{f"version.{k}": v for k, v in tracking.package_versions().items()},
                    **config.tracking.tags,
                }
            )
        if track and resumed:
            mlflow.set_tag("deeptrends.resumed_at", f"epoch {position.epoch + 1} step {position.step}")

        # -- model, in the strategy's scope ---------------------------------------------
        checkpoint = loop.TrainingCheckpoint(ckpt_dir, every_n_steps=config.train.checkpoint_every_steps)
        # Seed again: preparing a dataset the first time may draw from the global generators,
        # and the initial weights must not depend on whether the data was already on disk.
        import keras

        keras.utils.set_random_seed(config.runtime.seed)
        with strategy.scope():
            model = task.build_model(inputs.info)
            task.compile_model(model, inputs)
            checkpoint.attach(model)
            restored = checkpoint.restore() if state else loop.Position()
        if restored != position:
            raise RuntimeError(f"checkpoint position {restored} differs from the peeked {position}")

        # -- fit -------------------------------------------------------------------------
        history_file = _HistoryFile(slot / f"history-{runtime.worker_name()}.json")
        history_writer, history = history_file.callback(history_file.load() if state else {}, position.epoch)
        callbacks = [keras.callbacks.TerminateOnNaN(), *task.callbacks(run_dir, inputs), history_writer]
        if track:
            callbacks.insert(0, tracking.MlflowMetrics(chief=chief))
        if config.train.tensorboard and chief:
            callbacks.append(keras.callbacks.TensorBoard(str(run_dir / "tensorboard")))
        if config.train.early_stopping_patience:
            callbacks.append(
                keras.callbacks.EarlyStopping(patience=config.train.early_stopping_patience, restore_best_weights=True)
            )
        loop.fit(
            model,
            strategy,
            task.prepare_dataset(train_data),
            epochs=config.train.epochs,
            steps_per_epoch=inputs.steps_per_epoch,
            validation_data=task.prepare_dataset(eval_data),
            validation_freq=config.train.validation_freq,
            callbacks=callbacks,
            checkpoint=checkpoint,
            start=position,
            verbose=config.train.verbose if chief else 0,
            jit_compile=config.runtime.jit_compile,
        )
        if not _history_is_finite(history):
            raise TrainingDiverged(
                f"{config.name}: the loss became NaN/inf (history: {history.get('loss', [])[-3:]}); "
                "lower train.learning_rate or set train.global_clipnorm."
            )
        train_seconds = time.time() - started
        metrics: dict[str, float] = {}
        if chief and multi_worker:
            # The other workers leave now: evaluation, export and logging on the chief must
            # not issue collectives (model.predict/evaluate would), so they use a copy of
            # the trained weights outside the multi-worker strategy.
            model = _unreplicated_copy(task, model, inputs)
        if chief:
            metrics = _evaluate_and_log(task, model, inputs, history, effective, artifacts, track, train_seconds)

            # -- export, log, register, gate -------------------------------------------
            serving = task.serving_model(model)
            serving_root = Path(config.export.serving_dir) / model_name
            if config.export.enabled:
                endpoints = task.endpoints(serving, inputs.info, task.check_batch(inputs))
                staged = export.write_saved_model(
                    serving, endpoints, serving_root / "staging", model_name=model_name,
                    warmup_requests=config.export.warmup_requests,
                    atol=export.tolerance(config.export.atol, config.runtime.mixed_precision),
                )
                metrics["export_max_abs_diff"] = staged.max_abs_diff
                if track:
                    mlflow.log_metric("export_max_abs_diff", staged.max_abs_diff)
            if track and config.tracking.log_model:
                info = mlflow.keras.log_model(
                    serving, name="model", pip_requirements=tracking.pip_requirements(),
                    registered_model_name=model_name,
                )
                version = str(info.registered_model_version)
            elif staged is not None:
                existing = [int(p.name) for p in serving_root.glob("[0-9]*") if p.name.isdigit()]
                version = str(max(existing, default=0) + 1)
            if staged is not None:
                export_path = str(export.publish(staged, serving_root / version).resolve())
            if track and config.tracking.log_model:
                decision = tracking.gate(client, model_name, version, metrics[config.tracking.gate.metric],
                                         config.tracking.gate)
                aliases = tracking.aliases_of(client, model_name, version)
                mlflow.set_tags({"registry.version": version, "registry.alias": decision.alias})
                if export_path:
                    labels = tracking.versions_with_aliases(client, model_name)
                    export.write_model_config(Path(config.export.serving_dir), model_name, list(labels.values()), labels)
    except loop.Preempted as exc:
        if chief:
            loop.write_json_atomic(state_path, {"run_id": run_id, "status": "interrupted", "config": config.name})
        if track:
            mlflow.set_tag("deeptrends.interrupted", str(exc))
            mlflow.end_run("KILLED")
        raise
    except BaseException as exc:
        export.discard(staged)
        if version is not None and client is not None and config.tracking.log_model:
            client.delete_model_version(model_name, version)
        if export_path:
            import shutil

            shutil.rmtree(export_path, ignore_errors=True)
        interrupted = isinstance(exc, KeyboardInterrupt)
        if chief and not interrupted:  # a failed run starts afresh next time
            import shutil

            shutil.rmtree(slot, ignore_errors=True)
        if track:
            mlflow.end_run("KILLED" if interrupted else "FAILED")
        raise
    else:
        if track:
            mlflow.end_run("FINISHED")
        if chief:
            import shutil

            shutil.rmtree(slot, ignore_errors=True)

    return RunSummary(
        run_id=run_id,
        experiment=config.experiment_name,
        metrics=metrics,
        model_name=model_name if version else None,
        model_version=version,
        aliases=aliases,
        export_path=export_path,
        run_dir=str(run_dir),
        gate=decision.tags() if decision else {},
        seconds=round(time.time() - started, 2),
    )


def _unreplicated_copy(task, model, inputs):
    plain = task.build_model(inputs.info)
    task.compile_model(plain, inputs)
    plain.set_weights(model.get_weights())
    return plain


def _evaluate_and_log(task, model, inputs, history, config, artifacts: Path, track: bool, train_seconds: float):
    """Evaluate on the eval split and write/log the run's artifacts (chief only)."""
    import mlflow

    metrics = task.evaluate(model, inputs)
    (artifacts / "config.yaml").write_text(config.to_yaml())
    (artifacts / "dataset_info.json").write_text(json.dumps(inputs.info, indent=2))
    (artifacts / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (artifacts / "history.json").write_text(json.dumps(history, indent=2))
    lines: list[str] = []
    model.summary(print_fn=lambda line, *a, **k: lines.append(line))
    (artifacts / "model_summary.txt").write_text("\n".join(lines) + "\n")
    task.write_artifacts(model, history, inputs, artifacts)
    if track:
        mlflow.log_metrics({f"eval_{k}": v for k, v in metrics.items()})
        mlflow.log_metric("train_seconds", train_seconds)
        mlflow.log_artifacts(str(artifacts))
    return metrics
