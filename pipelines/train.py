"""The training driver: config -> strategy -> data -> model in scope -> fit -> evaluate
-> export -> register. One function, in sections, readable in one sitting."""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import nullcontext
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


def run_experiment(config: ExperimentConfig) -> RunSummary:
    """Train, evaluate, export and register one experiment. Raises on failure, after
    marking the MLflow run FAILED and leaving no registered version or export behind."""
    check_config(config)
    from pipelines import runtime

    strategy = runtime.configure(config.runtime)

    import keras
    import mlflow
    import tensorflow_datasets as tfds

    from pipelines import export, tracking
    from pipelines.tasks.base import get_task

    tfds.disable_progress_bar()
    started = time.time()
    task = get_task(config.task)(config)
    chief = runtime.is_chief()
    track = config.tracking.enabled and chief
    if track:
        mlflow.set_tracking_uri(tracking.tracking_uri(config))
        mlflow.set_experiment(config.experiment_name)
    run_ctx = mlflow.start_run(run_name=config.tracking.run_name) if track else nullcontext()

    with run_ctx as run:
        run_id = run.info.run_id if run else None
        run_dir = Path(config.runtime.work_dir) / config.name / (run_id or time.strftime("%Y%m%d-%H%M%S"))
        artifacts = run_dir / "artifacts"
        artifacts.mkdir(parents=True, exist_ok=True)

        # -- data ------------------------------------------------------------------------
        inputs = task.build_inputs()
        replicas = strategy.num_replicas_in_sync
        derived = {
            "derived.replicas": replicas,
            "derived.global_batch_size": config.train.batch_size,
            "derived.per_replica_batch_size": config.train.batch_size // max(1, replicas),
            "derived.steps_per_epoch": inputs.steps_per_epoch,
            "derived.strategy": type(strategy).__name__,
        }
        if track:
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

        # -- model, in the strategy's scope ---------------------------------------------
        with strategy.scope():
            model = task.build_model(inputs.info)
            task.compile_model(model, inputs)

        # -- fit -------------------------------------------------------------------------
        callbacks = [
            keras.callbacks.TerminateOnNaN(),
            keras.callbacks.BackupAndRestore(str(run_dir / "backup")),
            *task.callbacks(run_dir, inputs),
        ]
        if track:
            callbacks.insert(0, tracking.MlflowMetrics(chief=chief))
        if config.train.tensorboard:
            callbacks.append(keras.callbacks.TensorBoard(str(run_dir / "tensorboard")))
        if config.train.early_stopping_patience:
            callbacks.append(
                keras.callbacks.EarlyStopping(
                    patience=config.train.early_stopping_patience, restore_best_weights=True
                )
            )
        fit = model.fit(
            task.prepare_dataset(inputs.train),
            epochs=config.train.epochs,
            steps_per_epoch=inputs.steps_per_epoch,
            validation_data=task.prepare_dataset(inputs.eval),
            validation_freq=config.train.validation_freq,
            callbacks=callbacks,
            verbose=config.train.verbose,
            shuffle=False,  # the tf.data pipeline shuffles, seeded
        )
        history = {k: [float(v) for v in vals] for k, vals in fit.history.items()}
        if not _history_is_finite(history):
            raise TrainingDiverged(
                f"{config.name}: the loss became NaN/inf (history: {history.get('loss', [])[-3:]}); "
                "lower train.learning_rate or set train.global_clipnorm."
            )
        train_seconds = time.time() - started

        # -- evaluate and write artifacts ------------------------------------------------
        metrics = task.evaluate(model, inputs)
        (artifacts / "config.yaml").write_text(config.to_yaml())
        (artifacts / "dataset_info.json").write_text(json.dumps(inputs.info, indent=2))
        (artifacts / "metrics.json").write_text(json.dumps(metrics, indent=2))
        summary_lines: list[str] = []
        model.summary(print_fn=lambda line, *a, **k: summary_lines.append(line))
        (artifacts / "model_summary.txt").write_text("\n".join(summary_lines) + "\n")
        task.write_artifacts(model, history, inputs, artifacts)
        if track:
            mlflow.log_metrics({f"eval_{k}": v for k, v in metrics.items()})
            mlflow.log_metric("train_seconds", train_seconds)
            mlflow.log_artifacts(str(artifacts))

        # -- export, log, register, gate -------------------------------------------------
        serving = task.serving_model(model)
        model_name = config.registered_model_name
        serving_root = Path(config.export.serving_dir) / model_name
        staged = None
        version: str | None = None
        aliases: list[str] = []
        decision = None
        export_path = None
        client = mlflow.MlflowClient() if track else None
        try:
            if config.export.enabled:
                endpoints = task.endpoints(serving, inputs.info, task.check_batch(inputs))
                staged = export.write_saved_model(
                    serving,
                    endpoints,
                    serving_root / "staging",
                    model_name=model_name,
                    warmup_requests=config.export.warmup_requests,
                    atol=config.export.atol,
                )
                metrics["export_max_abs_diff"] = staged.max_abs_diff
                if track:
                    mlflow.log_metric("export_max_abs_diff", staged.max_abs_diff)
            if track and config.tracking.log_model:
                info = mlflow.keras.log_model(
                    serving,
                    name="model",
                    pip_requirements=tracking.pip_requirements(),
                    registered_model_name=model_name,
                )
                version = str(info.registered_model_version)
            elif staged is not None:
                existing = [int(p.name) for p in serving_root.glob("[0-9]*") if p.name.isdigit()]
                version = str(max(existing, default=0) + 1)
            if staged is not None:
                export_path = str(export.publish(staged, serving_root / version))
            if track and config.tracking.log_model:
                gate_value = metrics[config.tracking.gate.metric]
                decision = tracking.gate(client, model_name, version, gate_value, config.tracking.gate)
                aliases = tracking.aliases_of(client, model_name, version)
                mlflow.set_tags({"registry.version": version, "registry.alias": decision.alias})
                if export_path:
                    labels = tracking.versions_with_aliases(client, model_name)
                    export.write_model_config(
                        Path(config.export.serving_dir), model_name, list(labels.values()), labels
                    )
        except BaseException:
            export.discard(staged)
            if version is not None and client is not None and config.tracking.log_model:
                client.delete_model_version(model_name, version)
            if export_path:
                import shutil

                shutil.rmtree(export_path, ignore_errors=True)
            raise

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
