"""Airflow DAG factory: one DAG per deeptrends schedule (``pipelines/configs/schedules``).

Each DAG ``deeptrends-<name>`` has the schedule's cron as a ``CronTriggerTimetable`` in its
time zone, ``max_active_runs=1``, the schedule's ``catchup``, retries (exponential back-off
from ``retry_delay``) and ``timeout`` as the task's execution timeout. Its one task runs

    deeptrends schedule run <schedule.yaml> --retries 0 --logical-date '<logical date>'

(Airflow owns the retries; the logical date falls back to the run's start for manual runs,
whose ``logical_date`` may be None). A pass is idempotent per (schedule, logical date), so
a rerun, a backfill or a cleared task trains nothing that is done. Airflow's catch-up
creates every missed run since ``start_date``; the schedule's ``max_catchup`` bounds what
``deeptrends schedule run --catch-up`` does for cron and Kubernetes.

Task code runs in the project's interpreter, not Airflow's (Airflow's guidance for task
code with heavy dependencies): this file imports only PyYAML and Airflow, never
TensorFlow or MLflow, so the DAG processor parses it in milliseconds.

Environment (read at parse time):
  DEEPTRENDS_REPO       the checkout (default: two folders above this file)
  DEEPTRENDS_SCHEDULES  schedule folders or files, os.pathsep-separated
                        (default: $DEEPTRENDS_REPO/pipelines/configs/schedules)
  DEEPTRENDS_BIN        the deeptrends executable (default: $DEEPTRENDS_REPO/.venv/bin/deeptrends)
"""

from __future__ import annotations

import os
import shlex
from datetime import UTC, datetime, timedelta
from pathlib import Path

import yaml
from airflow.providers.standard.operators.bash import BashOperator
from airflow.sdk import DAG
from airflow.timetables.trigger import CronTriggerTimetable

REPO = Path(os.environ.get("DEEPTRENDS_REPO") or Path(__file__).resolve().parents[2])
SCHEDULES = os.environ.get("DEEPTRENDS_SCHEDULES") or str(REPO / "pipelines/configs/schedules")
DEEPTRENDS = os.environ.get("DEEPTRENDS_BIN") or str(REPO / ".venv/bin/deeptrends")
DEFAULT_START = datetime(2026, 1, 1, tzinfo=UTC)
KILL_GRACE = timedelta(seconds=90)  # deeptrends checkpoints on SIGTERM before it exits
LOGICAL_DATE = "{{ (logical_date or dag_run.start_date).isoformat() }}"


def schedule_files(spec: str = SCHEDULES) -> list[Path]:
    files: list[Path] = []
    for entry in filter(None, spec.split(os.pathsep)):
        path = Path(entry)
        files += sorted(path.glob("*.yaml")) if path.is_dir() else [path]
    return files


def _start_date(value) -> datetime:
    if value is None:
        return DEFAULT_START
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def make_dag(path: Path) -> DAG:
    """The DAG of one schedule file (its fields as ``pipelines.schedule.Schedule`` reads them;
    deeptrends validates the file again when the task runs)."""
    spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    name = spec["name"]
    timeout = timedelta(seconds=float(spec.get("timeout", 6 * 3600)))
    command = (
        f"{shlex.quote(DEEPTRENDS)} schedule run {shlex.quote(str(path.resolve()))} "
        f"--retries 0 --logical-date '{LOGICAL_DATE}'"
    )
    with DAG(
        dag_id=f"deeptrends-{name}",
        description=spec.get("description") or f"deeptrends schedule {name}",
        schedule=CronTriggerTimetable(spec["cron"], timezone=spec.get("timezone", "UTC")),
        start_date=_start_date(spec.get("start_date")),
        catchup=bool(spec.get("catchup", False)),
        max_active_runs=1,
        tags=["deeptrends"],
        default_args={
            "retries": int(spec.get("retries", 0)),
            "retry_delay": timedelta(seconds=float(spec.get("retry_delay", 60))),
            "retry_exponential_backoff": True,
            "execution_timeout": timeout + KILL_GRACE,
        },
    ) as dag:
        BashOperator(task_id="train", bash_command=command, cwd=str(REPO))
    return dag


for _path in schedule_files():
    _dag = make_dag(_path)
    globals()[_dag.dag_id.replace("-", "_")] = _dag
