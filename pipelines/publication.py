"""Publication: a trained model becomes a served, registered version, or nothing does.

``Publication.publish`` writes the SavedModel into a temporary folder, reloads it and
compares it with the Keras model (``serving.export``), logs and registers the model
(a new registry version), renames the export to ``<serving_dir>/<name>/<version>/``,
applies the quality gate (``champion`` or ``challenger``) and refreshes TF Serving's
``models.config``. Any failure on the way undoes all of it: the temporary folder, the
registry version and the renamed export are removed, and the exception propagates.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.config import ExperimentConfig
from pipelines.tasks.base import Serving


@dataclass
class Published:
    """What a publication produced (all None when export and registration are off)."""

    version: str | None = None
    export_path: str | None = None
    aliases: list[str] = field(default_factory=list)
    gate: dict[str, Any] = field(default_factory=dict)
    export_max_abs_diff: float | None = None


class Publication:
    """Export, register, gate: undone as a whole on failure."""

    def __init__(self, config: ExperimentConfig, tracker):
        self.config = config
        self.tracker = tracker
        self.serving_root = Path(config.export.serving_dir) / config.registered_model_name
        self._staged = None
        self._version: str | None = None
        self._export_path: Path | None = None

    def publish(self, serving: Serving, metrics: dict[str, float]) -> Published:
        try:
            return self._publish(serving, metrics)
        except BaseException:
            self.undo()
            raise

    def _publish(self, serving: Serving, metrics: dict[str, float]) -> Published:
        from pipelines.serving import export

        config, tracker, out = self.config, self.tracker, Published()
        if config.export.enabled:
            self._staged = export.write_saved_model(
                serving.model,
                serving.endpoints,
                self.serving_root / "staging",
                model_name=config.registered_model_name,
                warmup_requests=config.export.warmup_requests,
                atol=export.tolerance(config.export.atol, config.runtime.mixed_precision),
            )
            out.export_max_abs_diff = self._staged.max_abs_diff
            tracker.log_metrics({"export_max_abs_diff": self._staged.max_abs_diff})
        self._version = tracker.register(serving.model)
        if self._version is None and self._staged is not None:
            self._version = str(export.next_version(self.serving_root))
        if self._staged is not None:
            self._export_path = export.publish(self._staged, self.serving_root / self._version)
            out.export_path = str(self._export_path.resolve())
        out.version = self._version
        if tracker.registers:
            decision = tracker.gate(self._version, metrics[config.tracking.gate.metric])
            out.gate, out.aliases = decision.tags(), tracker.aliases(self._version)
            if self._export_path is not None:
                labels = tracker.served_labels()
                export.write_model_config(
                    Path(config.export.serving_dir),
                    config.registered_model_name,
                    list(labels.values()),
                    labels,
                )
        return out

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
