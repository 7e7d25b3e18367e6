"""MLflow, written from one place: ``RunTracker`` starts (or resumes) a run, logs its
parameters, tags, per-epoch metrics (one Keras callback, one ``log_metrics`` call per
epoch), evaluation and artifacts, logs and registers the model, applies the
champion/challenger quality gate on registry aliases, and ends the run FINISHED, FAILED
or KILLED by what ended it. Nothing else in ``pipelines/`` writes to MLflow (a test holds
it); reports read from it."""

from __future__ import annotations

import contextlib
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
from pipelines.io import file_lock

DEFAULT_URI = "sqlite:///mlflow.db"
CHAMPION, CHALLENGER = "champion", "challenger"


def resolve_uri(uri: str | None = None) -> str:
    """The tracking URI: the one given, else ``$MLFLOW_TRACKING_URI``, else ``DEFAULT_URI``."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


@contextlib.contextmanager
def _launcher_run_set_aside():
    """``MLFLOW_RUN_ID`` (set by ``mlflow run`` for its command) removed while the
    training run starts, so ``mlflow.start_run`` does not try to continue the launcher's
    run in another experiment; yields its value."""
    launcher = os.environ.pop("MLFLOW_RUN_ID", None)
    try:
        yield launcher
    finally:
        if launcher is not None:
            os.environ["MLFLOW_RUN_ID"] = launcher


# mlflow.set_tracking_uri / set_experiment also write these into os.environ (for child
# processes). A run restores them when it ends: a later run in the same process (a claims
# report, a test) or a child it starts (`mlflow run`) would otherwise inherit the last
# run's store and experiment id in place of their own.
_INHERITED_BY_CHILDREN = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID")


@contextlib.contextmanager
def mlflow_environment_kept():
    """Restores the MLflow variables of ``os.environ`` that ``set_tracking_uri`` and
    ``set_experiment`` write, as they were on entry (unset ones unset)."""
    before = {name: os.environ.get(name) for name in _INHERITED_BY_CHILDREN}
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def tracking_uri(config: ExperimentConfig) -> str:
    return resolve_uri(config.tracking.uri)


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
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in (
        "tensorflow",
        "keras",
        "keras-hub",
        "mlflow",
        "tensorflow-datasets",
        "numpy",
        "deeptrends",
    ):
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

    def on_epoch_end(self, epoch, logs=None):
        metrics = {k: float(v) for k, v in (logs or {}).items() if _is_number(v)}
        opt = getattr(self.model, "optimizer", None)
        if opt is not None and "learning_rate" not in metrics:
            try:
                metrics["learning_rate"] = float(keras.ops.convert_to_numpy(opt.learning_rate))
            except (TypeError, ValueError):
                pass
        if metrics:
            mlflow.log_metrics(metrics, step=epoch + 1)


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


def _champion_value(
    client: MlflowClient, name: str, metric: str
) -> tuple[str | None, float | None]:
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


def gate(
    client: MlflowClient, name: str, version: str, value: float, cfg: GateConfig
) -> GateDecision:
    """Give ``version`` the ``champion`` alias if it beats the current champion by
    ``min_delta`` on ``cfg.metric`` (in ``cfg.mode``), else ``challenger``; record why."""
    champ_version, champ_value = _champion_value(client, name, cfg.metric)
    if champ_value is None:
        wins = True
    elif cfg.mode == "max":
        wins = value > champ_value + cfg.min_delta
    else:
        wins = value < champ_value - cfg.min_delta
    decision = GateDecision(
        CHAMPION if wins else CHALLENGER, cfg.metric, value, champ_version, champ_value
    )
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


# ---------------------------------------------------------------------- the run tracker


class RunTracker:
    """The MLflow run of one training command (chief only; a no-op where disabled).

    As a context manager it starts the run (or resumes ``run_id``) and ends it by what
    ended the block: no exception -> FINISHED; ``Preempted`` (SIGTERM) -> KILLED with tag
    ``deeptrends.interrupted``; ``KeyboardInterrupt`` -> KILLED; anything else -> FAILED.
    The exception propagates."""

    def __init__(self, config: ExperimentConfig, enabled: bool = True, run_id: str | None = None):
        self.config = config
        self.enabled = enabled and config.tracking.enabled
        self._resume_id = run_id
        self.run_id: str | None = run_id
        self.reconciled: list[str] = []
        self._client: MlflowClient | None = None
        self._alive: contextlib.ExitStack | None = None

    # -- life cycle ---------------------------------------------------------------------
    def __enter__(self) -> RunTracker:
        if not self.enabled:
            return self
        uri = tracking_uri(self.config)
        self._alive = contextlib.ExitStack()
        self._alive.enter_context(mlflow_environment_kept())
        try:
            self._start(uri)
        except BaseException:
            self._alive.close()
            raise
        return self

    def _start(self, uri: str) -> None:
        with store_lock(uri):  # a fresh SQLite store is created (migrated) by one process
            mlflow.set_tracking_uri(uri)
            experiment = mlflow.set_experiment(self.config.experiment_name)
        self._client = MlflowClient()
        self.reconciled = self._end_abandoned_runs(experiment.experiment_id)
        with _launcher_run_set_aside() as launcher:
            if self._resume_id:
                run = mlflow.start_run(run_id=self._resume_id)
            else:
                tags = self._launcher_tags(launcher)
                run = mlflow.start_run(run_name=self.config.tracking.run_name, tags=tags)
        self.run_id = run.info.run_id
        self._alive.enter_context(file_lock(self._run_lock(self.run_id)))

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self.enabled and mlflow.active_run() is not None:
            status = end_status(exc)
            if status == "KILLED" and not isinstance(exc, KeyboardInterrupt):
                mlflow.set_tag("deeptrends.interrupted", str(exc))
            mlflow.end_run(status)
        if getattr(self, "_alive", None) is not None:
            self._alive.close()
        return False

    def _run_lock(self, run_id: str) -> Path:
        """Held by the process that runs ``run_id`` (the kernel drops it if it dies)."""
        return Path(self.config.runtime.work_dir) / ".locks" / f"run-{run_id}.lock"

    def _launcher_tags(self, launcher: str | None) -> dict[str, str] | None:
        """Under ``mlflow run`` (which starts a run and hands its id in ``MLFLOW_RUN_ID``)
        the training run is its child, in the config's experiment (where comparisons and
        the registry look); a launcher run in another store is only named."""
        if not launcher:
            return None
        tags = {"deeptrends.launcher_run": launcher}
        try:
            self._client.get_run(launcher)
        except mlflow.exceptions.MlflowException:
            return tags
        return {**tags, "mlflow.parentRunId": launcher}

    def _end_abandoned_runs(self, experiment_id: str) -> list[str]:
        """Runs of this experiment left RUNNING by a process that died (``kill -9``, a
        crash) in this work_dir: ended KILLED, tagged ``deeptrends.reconciled``."""
        ended = []
        runs = self._client.search_runs([experiment_id], "attributes.status = 'RUNNING'")
        for run in runs:
            run_id = run.info.run_id
            lock = self._run_lock(run_id)
            if run_id == self._resume_id or not lock.exists():
                continue  # resumed now, or run from elsewhere: not ours to judge
            with file_lock(lock, blocking=False) as free:
                if free:
                    self._client.set_tag(
                        run_id, "deeptrends.reconciled", "abandoned: its process died"
                    )
                    self._client.set_terminated(run_id, "KILLED")
                    ended.append(run_id)
                    lock.unlink(missing_ok=True)
        return ended

    # -- run data -------------------------------------------------------------------------
    def log_start(self, params: dict[str, Any], tags: dict[str, str], resumed_at: str | None):
        """Parameters and tags of a new run; only the resumption tag of a resumed one."""
        if not self.enabled:
            return
        if resumed_at:
            mlflow.set_tag("deeptrends.resumed_at", resumed_at)
            return
        log_params(params)
        mlflow.set_tags(
            {
                "git.commit": git_commit() or "none",
                **{f"version.{k}": v for k, v in package_versions().items()},
                **tags,
                **self.config.tracking.tags,
            }
        )

    def callbacks(self) -> list:
        return [MlflowMetrics()] if self.enabled else []

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.enabled and metrics:
            mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    @property
    def sink(self):
        """``log_metrics`` for callbacks, called once the run has started (None when this
        process tracks nothing)."""
        return self.log_metrics if self.enabled else None

    def set_tags(self, tags: dict[str, Any]) -> None:
        if self.enabled and tags:
            mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def log_artifacts(self, folder: Path) -> None:
        if self.enabled:
            mlflow.log_artifacts(str(folder))

    # -- registry -------------------------------------------------------------------------
    @property
    def registers(self) -> bool:
        return self.enabled and self.config.tracking.log_model

    def register(self, model) -> str | None:
        """Log ``model`` as the run's ``model`` artifact and register a new version of the
        config's registered model; returns the version (None when not registering)."""
        if not self.registers:
            return None
        info = mlflow.keras.log_model(
            model,
            name="model",
            pip_requirements=pip_requirements(),
            registered_model_name=self.config.registered_model_name,
        )
        return str(info.registered_model_version)

    def delete_version(self, version: str) -> None:
        if self.registers and self._client is not None:
            self._client.delete_model_version(self.config.registered_model_name, version)

    def gate(self, version: str, value: float) -> GateDecision:
        name, client = self.config.registered_model_name, self._client
        decision = gate(client, name, version, value, self.config.tracking.gate)
        self.set_tags({"registry.version": version, "registry.alias": decision.alias})
        return decision

    def aliases(self, version: str) -> list[str]:
        return aliases_of(self._client, self.config.registered_model_name, version)

    def served_labels(self) -> dict[str, int]:
        return self.labels_of(self.config.registered_model_name)

    def labels_of(self, name: str) -> dict[str, int]:
        """The champion/challenger versions of registered model ``name``."""
        return versions_with_aliases(self._client, name)

    def registered_versions(self) -> list[dict[str, Any]]:
        """Every version of the config's registered model: version, aliases, run status."""
        if not self.registers:
            return []
        out = []
        name = self.config.registered_model_name
        for found in self._client.search_model_versions(f"name='{name}'"):
            mv = self._client.get_model_version(name, found.version)  # search omits aliases
            try:
                status = self._client.get_run(mv.run_id).info.status if mv.run_id else None
            except mlflow.exceptions.MlflowException:
                status = None
            out.append(
                {
                    "version": str(mv.version),
                    "aliases": list(mv.aliases),
                    "run_status": status,
                    "run_id": mv.run_id,
                }
            )
        return out

    # -- best-of metrics and the dataset input (issue 16) -----------------------------------
    def log_best(self, history: dict[str, list[float]]) -> dict[str, float]:
        """Log ``best_<metric>`` of every per-epoch metric at the end of training (the runs
        table and ``search_runs`` show a metric's last value only); returns them."""
        best = best_of(history, self.config.tracking.gate)
        self.log_metrics(best)
        return best

    def log_dataset(self, name: str, fingerprint: str, source: str = "", **tags: Any) -> None:
        """Log the training data as the run's MLflow dataset input, its digest our own
        content fingerprint (MLflow's numpy digest hashes only the first 10,000 elements)."""
        if not self.enabled or not fingerprint:
            return
        mlflow.log_input(
            dataset_input(name, fingerprint, source),
            context="training",
            tags={k: str(v) for k, v in tags.items()} or None,
        )


def store_lock(uri: str):
    """A file lock beside a local SQLite store (first use creates its schema, which two
    processes must not do at once); nothing for a server URI."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        return file_lock(db.with_name(db.name + ".lock"))
    return contextlib.nullcontext()


def load_model(uri: str):
    """A Keras model logged to MLflow (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``,
    ``runs:/ID/model``): how tasks read the registry without importing MLflow."""
    return mlflow.keras.load_model(uri)


def registered_version(uri: str) -> str:
    """The version a ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS`` URI points at."""
    name, _, alias = uri.removeprefix("models:/").partition("@")
    if alias:
        return str(MlflowClient().get_model_version_by_alias(name, alias).version)
    return uri.rstrip("/").rsplit("/", 1)[-1]


def end_status(exc: BaseException | None) -> str:
    """The MLflow status of a run that ended with ``exc`` (None: it finished)."""
    if exc is None:
        return "FINISHED"
    from pipelines.loop import Preempted

    return "KILLED" if isinstance(exc, (Preempted, KeyboardInterrupt)) else "FAILED"


# ---------------------------------------------------------------------- best-of metrics

LOWER_IS_BETTER = ("loss", "error", "perplexity", "seconds", "distance", "mse", "mae", "nll")


def metric_mode(name: str, gate: GateConfig | None = None) -> str:
    """``"min"`` or ``"max"``: which value of metric ``name`` is the best. The gate's metric
    (and its ``val_`` twin) follow ``gate.mode``; losses, errors, distances and times are
    lower-is-better; anything else (accuracy, BLEU, ...) higher-is-better."""
    base = name[4:] if name.startswith("val_") else name
    base = base[5:] if base.startswith("eval_") else base
    if gate is not None and base == gate.metric:
        return gate.mode
    return "min" if any(word in base.lower() for word in LOWER_IS_BETTER) else "max"


def best_of(history: dict[str, list[float]], gate: GateConfig | None = None) -> dict[str, float]:
    """``{"best_<metric>": best finite value}`` of a per-epoch history (the learning rate
    is a setting, not a result, and is left out)."""
    import math

    out = {}
    for name, values in history.items():
        if name in ("learning_rate", "lr") or name.startswith("best_"):
            continue
        finite = [float(v) for v in values if _is_number(v) and math.isfinite(float(v))]
        if finite:
            out[f"best_{name}"] = (min if metric_mode(name, gate) == "min" else max)(finite)
    return out


def dataset_input(name: str, fingerprint: str, source: str = ""):
    """An MLflow dataset whose digest is ``fingerprint`` (the store keeps at most 36
    characters: a longer fingerprint, e.g. a TFDS name-version string, is hashed)."""
    import hashlib

    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.meta_dataset import MetaDataset

    digest = fingerprint
    if len(digest) > 36:
        digest = hashlib.sha256(fingerprint.encode()).hexdigest()[:32]
    source_tags = {"source": source or name, "fingerprint": fingerprint}
    return MetaDataset(CodeDatasetSource(source_tags), name=name, digest=digest)
