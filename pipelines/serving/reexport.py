"""Re-export a registered model version as a TF Serving SavedModel (``deeptrends export``).

The version's run holds the resolved ``config.yaml`` and ``dataset_info.json``; with them
the task rebuilds the same serving endpoints around the logged Keras model (a bfloat16
export, ``export.precision``, is compared with it on the rebuilt eval split first).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from pipelines.config import ConfigError, validate_config

_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w-]+))$")


def export_registered(model_uri: str, serving_dir: Path, tracking_uri: str | None = None) -> Path:
    """Export ``model_uri`` (models:/NAME/VERSION or models:/NAME@ALIAS) under
    ``serving_dir/NAME/VERSION``; the process's MLflow environment is left as found."""
    from pipelines.tracking import mlflow_environment_kept

    with mlflow_environment_kept():  # set_tracking_uri also writes os.environ
        return _export_registered(model_uri, serving_dir, tracking_uri)


def _export_registered(model_uri: str, serving_dir: Path, tracking_uri: str | None) -> Path:
    m = _URI.match(model_uri)
    if not m:
        raise ConfigError(
            f"MODEL_URI {model_uri!r}: expected models:/NAME/VERSION or models:/NAME@ALIAS"
        )
    import mlflow
    import yaml
    from mlflow import MlflowClient

    from pipelines import optim, runtime  # noqa: F401  (optim: custom schedules reload)
    from pipelines.serving import export
    from pipelines.tasks.base import RunContext, get_task
    from pipelines.tracking import resolve_uri

    runtime.quiet_tensorflow()
    mlflow.set_tracking_uri(resolve_uri(tracking_uri))
    client = MlflowClient()
    name = m["name"]
    try:
        mv = (
            client.get_model_version_by_alias(name, m["alias"])
            if m["alias"]
            else client.get_model_version(name, m["version"])
        )
    except mlflow.exceptions.MlflowException as exc:
        raise ConfigError(f"MODEL_URI {model_uri!r}: {exc.message}") from None
    local = Path(client.download_artifacts(mv.run_id, "config.yaml"))
    config = validate_config(yaml.safe_load(local.read_text()), source=f"run {mv.run_id}")
    info = json.loads(Path(client.download_artifacts(mv.run_id, "dataset_info.json")).read_text())

    task = get_task(config.task)(RunContext(config))  # imports the task's Keras classes first
    model = mlflow.keras.load_model(f"models:/{name}/{mv.version}")
    serving = task.serving(model, task.Info.from_dict(info))
    target = serving_dir / name / str(mv.version)
    staged = export.write_saved_model(
        serving.network,
        serving.endpoints,
        target,
        model_name=name,
        warmup_requests=config.export.warmup_requests,
        atol=config.export.atol,
        metadata={"precision": serving.precision, **serving.metadata},
        traced=serving.precision != "float32",
    )
    if serving.precision != "float32":  # the same agreement gate as a training run's
        from pipelines.serving.precision import verify_agreement

        try:
            inputs = task.build_inputs()
            verify_agreement(staged.path, serving, inputs.eval, config.export.min_top1_agreement)
        except BaseException:
            export.discard(staged)
            raise
    return export.publish(staged, target)
