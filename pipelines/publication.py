"""Publication: a trained model becomes a served, registered version, or nothing does.

``Publication.publish`` writes the SavedModel into a temporary folder, reloads it and
compares it with the Keras model (``serving.export``), logs and registers the model
(a new registry version), renames the export to ``<serving_dir>/<name>/<version>/``,
applies the quality gate (``champion`` or ``challenger``) and refreshes TF Serving's
``models.config``. Any failure on the way undoes all of it: the temporary folder, the
registry version and the renamed export are removed, and the exception propagates.
SIGTERM during publication is such a failure (``Preempted``: the run ends KILLED).

Publications of one registered model take turns (a file lock in the serving folder), and
each first reconciles what a process killed in the middle of an earlier one left behind:
temporary export folders, registry versions without an alias whose run never finished,
serving folders of versions the registry does not have. What it cleaned is logged and
returned (``Published.reconciled``, tag ``deeptrends.reconciled_publication``).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.config import ExperimentConfig
from pipelines.io import file_lock
from pipelines.tasks.base import Serving

log = logging.getLogger(__name__)


@dataclass
class Published:
    """What a publication produced (all None when export and registration are off)."""

    version: str | None = None
    export_path: str | None = None
    aliases: list[str] = field(default_factory=list)
    gate: dict[str, Any] = field(default_factory=dict)
    export_max_abs_diff: float | None = None
    export_metrics: dict[str, float] = field(default_factory=dict)  # bfloat16 agreement
    reconciled: list[str] = field(default_factory=list)


class Publication:
    """Export, register, gate: undone as a whole on failure."""

    STEPS = ("exported", "registered", "published", "gated", "configured")

    def __init__(self, config: ExperimentConfig, tracker, on_step=None):
        self.config = config
        self.tracker = tracker
        self.on_step = on_step  # called with each of STEPS as it completes (crash tests)
        self.serving_root = Path(config.export.serving_dir) / config.registered_model_name
        self._staged = None
        self._version: str | None = None
        self._export_path: Path | None = None
        self._eval_data = None

    def publish(self, serving: Serving, metrics: dict[str, float], eval_data=None) -> Published:
        """``eval_data``: the eval split, where a reduced-precision export (``serving.
        precision``) must agree with the float32 model before it is published."""
        self._eval_data = eval_data
        lock = Path(self.config.export.serving_dir) / f".{self.config.registered_model_name}.lock"
        with file_lock(lock), _sigterm_raises():
            try:
                out = Published(reconciled=self.reconcile())
                return self._publish(serving, metrics, out)
            except BaseException:
                self.undo()
                raise

    def reconcile(self) -> list[str]:
        """Remove what an interrupted publication of this model left (see the module doc)."""
        cleaned = []
        root, tracker = self.serving_root, self.tracker
        for tmp in sorted(root.glob(".tmp-*")) if root.exists() else []:
            shutil.rmtree(tmp, ignore_errors=True)
            cleaned.append(f"temporary export {tmp.name}")
        if tracker.registers:
            versions = tracker.registered_versions()
            for v in versions:
                if not v["aliases"] and v["run_status"] != "FINISHED":
                    tracker.delete_version(v["version"])
                    shutil.rmtree(root / v["version"], ignore_errors=True)
                    cleaned.append(
                        f"version {v['version']} (run {v['run_status'] or 'missing'}, no alias)"
                    )
            known = {v["version"] for v in versions}
            for folder in sorted(root.glob("[0-9]*")) if root.exists() else []:
                if folder.name.isdigit() and folder.name not in known:
                    shutil.rmtree(folder, ignore_errors=True)
                    cleaned.append(f"serving folder {folder.name} (not in the registry)")
        for line in cleaned:
            log.warning("%s: reconciled %s", self.config.registered_model_name, line)
        if cleaned:
            tracker.set_tags({"deeptrends.reconciled_publication": "; ".join(cleaned)[:5000]})
        return cleaned

    def _publish(self, serving: Serving, metrics: dict[str, float], out: Published) -> Published:
        from pipelines.serving import export

        config, tracker = self.config, self.tracker
        if config.export.enabled:
            self._staged = export.write_saved_model(
                serving.network,
                serving.endpoints,
                self.serving_root / "staging",
                model_name=config.registered_model_name,
                warmup_requests=config.export.warmup_requests,
                atol=export.tolerance(config.export.atol, config.runtime.mixed_precision),
                metadata={"precision": serving.precision, **serving.metadata},
                traced=serving.precision != "float32",
            )
            out.export_max_abs_diff = self._staged.max_abs_diff
            tracker.log_metrics({"export_max_abs_diff": self._staged.max_abs_diff})
            tracker.set_tags({"deeptrends.export_precision": serving.precision})
            if serving.precision != "float32":  # refused below the threshold: undone
                from pipelines.serving.precision import verify_agreement

                out.export_metrics = verify_agreement(
                    self._staged.path,
                    serving,
                    self._eval_data,
                    config.export.min_top1_agreement,
                    log_metrics=tracker.log_metrics,
                )
        self._step("exported")
        self._version = tracker.register(serving.model)
        self._step("registered")
        if self._version is None and self._staged is not None:
            self._version = str(export.next_version(self.serving_root))
        if self._staged is not None:
            self._export_path = export.publish(self._staged, self.serving_root / self._version)
            out.export_path = str(self._export_path.resolve())
        self._step("published")
        out.version = self._version
        if tracker.registers:
            decision = tracker.gate(self._version, metrics[config.tracking.gate.metric])
            out.gate, out.aliases = decision.tags(), tracker.aliases(self._version)
            self._step("gated")
            if self._export_path is not None:
                labels = tracker.served_labels()
                export.write_model_config(
                    Path(config.export.serving_dir),
                    config.registered_model_name,
                    list(labels.values()),
                    labels,
                    labels_of=tracker.labels_of,
                )
        self._step("configured")
        return out

    def _step(self, name: str) -> None:
        if self.on_step is not None:
            self.on_step(name)

    def undo(self) -> None:
        """Remove whatever this publication created so far."""
        from pipelines.serving import export

        export.discard(self._staged)
        if self._version is not None and self.tracker.registers:
            try:
                self.tracker.delete_version(self._version)
            except Exception:  # the original error matters more; the version stays visible
                pass
        if self._export_path is not None:
            shutil.rmtree(self._export_path, ignore_errors=True)


@contextlib.contextmanager
def _sigterm_raises():
    """SIGTERM raises ``Preempted`` (so the publication is undone and the run ends KILLED)
    instead of killing the process mid-write; main thread only, as Python requires."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    from pipelines.loop import Preempted

    def handler(signum, frame):
        raise Preempted("SIGTERM during publication; nothing was published")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
