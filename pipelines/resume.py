"""The resumption slot of "the same command".

A run's slot is ``<work_dir>/<config name>/.resume/<run key>/``, where the run key hashes
the resolved config minus what does not change the result (verbosity, the resume flag).
It holds ``run.json`` (the MLflow run id and status), each worker's checkpoints and the
per-epoch history, so a rerun after a crash, ``kill -9`` or SIGTERM continues the same
MLflow run from the last checkpoint with whole learning curves. A finished run and a
failed one (NaN, an exception) clear the slot: the next command starts afresh; an
interrupted one (SIGTERM, Ctrl-C) keeps it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from pipelines.config import ExperimentConfig
from pipelines.io import write_json_atomic


def run_key(config: ExperimentConfig) -> str:
    """Identifies "the same command": the resolved config minus what does not change the result.

    Only the fields that differ from their defaults are hashed, so a field added to the schema
    later (with a default that keeps the old behaviour) leaves every earlier run's key, and so
    its reuse by ``resume`` and ``report claims``, as it was. The price: changing a default's
    value changes results without changing keys, so a default is never changed in place."""
    d = config.model_dump(mode="json", exclude_defaults=True)
    for section, field in (("train", "verbose"), ("runtime", "resume")):
        d.get(section, {}).pop(field, None)
        if d.get(section) == {}:
            del d[section]
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


class ResumeSlot:
    """Where an interrupted run of ``config`` left off, for worker ``worker``."""

    def __init__(self, config: ExperimentConfig, worker: str = "worker-0", chief: bool = True):
        self.config = config
        self.chief = chief
        self.root = Path(config.runtime.work_dir) / config.name / ".resume" / run_key(config)
        self.checkpoint_dir = self.root / "checkpoints" / worker
        self.history_path = self.root / f"history-{worker}.json"
        self._state_path = self.root / "run.json"
        state = None
        if config.runtime.resume and self._state_path.exists():
            try:
                state = json.loads(self._state_path.read_text())
            except (OSError, ValueError):
                state = None  # a damaged slot: start afresh rather than guess
        self.state: dict[str, Any] | None = state

    @property
    def resuming(self) -> bool:
        """True when an earlier run of this command left a checkpointable slot."""
        return self.state is not None

    @property
    def run_id(self) -> str | None:
        return (self.state or {}).get("run_id")

    def history(self, start_epoch: int) -> dict[str, list[float]]:
        """The per-epoch history of the epochs before ``start_epoch`` (empty when fresh)."""
        if not self.resuming or not self.history_path.exists():
            return {}
        previous = json.loads(self.history_path.read_text())
        return {k: list(v[:start_epoch]) for k, v in previous.items()}

    def save_history(self, history: dict[str, list[float]]) -> None:
        write_json_atomic(self.history_path, history)

    def _write(self, run_id: str | None, status: str) -> None:
        if self.chief:
            write_json_atomic(
                self._state_path, {"run_id": run_id, "status": status, "config": self.config.name}
            )

    def open(self, run_id: str | None) -> None:
        """Record that the command runs (into MLflow run ``run_id``)."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._write(run_id, "running")

    def interrupted(self, run_id: str | None) -> None:
        """Keep the slot: the same command resumes."""
        self._write(run_id, "interrupted")

    @contextlib.contextmanager
    def session(self, tracker):
        """Open the slot for ``tracker``'s run; on leaving, keep it when the run was
        interrupted (SIGTERM, Ctrl-C), clear it when it finished or failed."""
        from pipelines.loop import Preempted

        self.open(tracker.run_id)
        try:
            yield self
        except (Preempted, KeyboardInterrupt):
            self.interrupted(tracker.run_id)
            raise
        except BaseException:
            self.clear()
            raise
        self.clear()

    def clear(self) -> None:
        """Remove the slot (finished, or failed: the next command starts afresh)."""
        if self.chief:
            shutil.rmtree(self.root, ignore_errors=True)
