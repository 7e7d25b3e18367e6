"""MLflow: the tracking URI, run parameters and tags, per-epoch metrics as one Keras
callback (chief only, one ``log_metrics`` call per epoch), model logging, registration
and the champion/challenger quality gate on registry aliases."""

from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import mlflow
from mlflow import MlflowClient

from pipelines.config import ExperimentConfig, GateConfig

DEFAULT_URI = "sqlite:///mlflow.db"
CHAMPION, CHALLENGER = "champion", "challenger"


def tracking_uri(config: ExperimentConfig) -> str:
    return config.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parents[1]
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        if out.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("tensorflow", "keras", "keras-hub", "mlflow", "tensorflow-datasets", "numpy", "deeptrends"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def pip_requirements() -> list[str]:
    """What a model served through MLflow needs (given, so logging skips inference)."""
    v = package_versions()
    return [f"tensorflow=={v['tensorflow']}", f"keras=={v['keras']}", f"numpy=={v['numpy']}"]


def log_params(params: dict[str, Any]) -> None:
    items = [(k, "" if v is None else str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
        mlflow.log_params(dict(items[i : i + 100]))


class MlflowMetrics(keras.callbacks.Callback):
    """Logs every epoch's metrics (and the learning rate) in one ``log_metrics`` call."""

    def __init__(self, chief: bool = True, step_offset: int = 0):
        super().__init__()
        self.chief = chief
        self.step_offset = step_offset

    def on_epoch_end(self, epoch, logs=None):
        if not self.chief:
            return
        metrics = {k: float(v) for k, v in (logs or {}).items() if _is_number(v)}
        opt = getattr(self.model, "optimizer", None)
        if opt is not None and "learning_rate" not in metrics:
            try:
                metrics["learning_rate"] = float(keras.ops.convert_to_numpy(opt.learning_rate))
            except (TypeError, ValueError):
                pass
        if metrics:
            mlflow.log_metrics(metrics, step=epoch + 1 + self.step_offset)


def _is_number(v: Any) -> bool:
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False


@dataclass
class GateDecision:
    alias: str
    metric: str
    value: float
    champion_version: str | None
    champion_value: float | None

    def tags(self) -> dict[str, str]:
        return {
            "gate.metric": self.metric,
            "gate.value": repr(self.value),
            "gate.champion_version": str(self.champion_version or ""),
            "gate.champion_value": "" if self.champion_value is None else repr(self.champion_value),
            "gate.decision": self.alias,
        }


def _champion_value(client: MlflowClient, name: str, metric: str) -> tuple[str | None, float | None]:
    try:
        champ = client.get_model_version_by_alias(name, CHAMPION)
    except mlflow.exceptions.MlflowException:
        return None, None
    tag = champ.tags.get("gate.value")
    if tag and champ.tags.get("gate.metric") == metric:
        return champ.version, float(tag)
    run = client.get_run(champ.run_id) if champ.run_id else None
    value = run.data.metrics.get(f"eval_{metric}") if run else None
    return champ.version, value


def gate(client: MlflowClient, name: str, version: str, value: float, cfg: GateConfig) -> GateDecision:
    """Give ``version`` the ``champion`` alias if it beats the current champion by
    ``min_delta`` on ``cfg.metric`` (in ``cfg.mode``), else ``challenger``; record why."""
    champ_version, champ_value = _champion_value(client, name, cfg.metric)
    if champ_value is None:
        wins = True
    elif cfg.mode == "max":
        wins = value > champ_value + cfg.min_delta
    else:
        wins = value < champ_value - cfg.min_delta
    decision = GateDecision(CHAMPION if wins else CHALLENGER, cfg.metric, value, champ_version, champ_value)
    client.set_registered_model_alias(name, decision.alias, version)
    for key, val in decision.tags().items():
        client.set_model_version_tag(name, version, key, val)
    return decision


def aliases_of(client: MlflowClient, name: str, version: str) -> list[str]:
    return sorted(client.get_model_version(name, version).aliases)


def versions_with_aliases(client: MlflowClient, name: str) -> dict[str, int]:
    labels = {}
    for alias in (CHAMPION, CHALLENGER):
        try:
            labels[alias] = int(client.get_model_version_by_alias(name, alias).version)
        except mlflow.exceptions.MlflowException:
            pass
    return labels
