"""Scheduled pipelines: one idempotent training pass per (schedule, logical date).

A schedule is data, ``pipelines/configs/schedules/<name>.yaml``::

    name: nightly-lenet5-digits
    config: lenet5-digits          # a shipped experiment or a YAML path
    set: [train.epochs=20]         # KEY=VALUE overrides, as a variant's `set`
    cron: "0 2 * * *"              # five-field cron, in `timezone`
    timezone: Europe/Berlin
    catchup: true                  # `run --catch-up` trains the missed fire times ...
    max_catchup: 3                 # ... the latest 3 at most, oldest first
    retries: 2                     # attempts after the first, delays doubling:
    retry_delay: 60                #   60 s, 120 s
    timeout: 3600                  # seconds per attempt (SIGTERM, then SIGKILL)

``deeptrends schedule run NAME`` trains the latest fire time at or before now (its
*logical date*, as Airflow's ``CronTriggerTimetable`` names it), ``--logical-date ISO`` a
given one, ``--catch-up`` every missed fire time of the last ``max_catchup``. Each run
carries the tags ``deeptrends.schedule`` and ``deeptrends.logical_date``; a FINISHED run
with both means "done": a rerun or a backfill of the same date trains nothing. A lock
per schedule (``<work_dir>/.locks/schedule-<name>.lock``) keeps two passes from running
at once. Each attempt trains in a child process (``python -m pipelines.schedule``), so a
timeout can stop it (SIGTERM checkpoints it; the retry resumes the same MLflow run) and
TensorFlow's memory goes with it. The gate gives the run its alias as for any run.

Exit codes of ``schedule run`` (for cron, Airflow, a k8s CronJob):

    0    every due date trained, or was done already (a dry run: nothing failed to load)
    2    the schedule or its config is invalid (not retried)
    4    the tracking store could not be read to find what is done
    75   another pass of this schedule holds its lock (EX_TEMPFAIL: try again later)
    124  the last attempt ran out of ``timeout``
    else the last failed attempt's code: 3 data, 5 diverged (not retried), 1 a crash,
         143 preempted (SIGTERM)

This module imports neither TensorFlow nor MLflow (the child process and ``tracking`` do).
"""

from __future__ import annotations

import difflib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pipelines.config import CONFIG_DIR, NAME_PATTERN, ConfigError, read_yaml, short_repr
from pipelines.io import file_lock

SCHEDULE_DIR = CONFIG_DIR / "schedules"
SCHEDULE_TAG, LOGICAL_DATE_TAG = "deeptrends.schedule", "deeptrends.logical_date"
EXIT_OK, EXIT_CONFIG, EXIT_TRACKING, EXIT_CRASH = 0, 2, 4, 1
EXIT_LOCKED, EXIT_TIMEOUT = 75, 124
NOT_RETRIED = (2, 5)  # a bad config and a diverged loss fail the same way every time
KILL_GRACE_SECONDS = 60  # after SIGTERM: time to checkpoint and end the run KILLED
SCAN_LIMIT = 10_000  # fire times counted when reporting what catch-up leaves out


class Schedule(BaseModel):
    """A scheduled pipeline (see the module doc for each field)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    description: str = ""
    config: str = Field(min_length=1, description="a shipped experiment name or a YAML path")
    set: list[str] = Field(default_factory=list, description="KEY=VALUE overrides")
    cron: str
    timezone: str = "UTC"
    start_date: datetime | None = Field(None, description="no fire time before this one is due")
    catchup: bool = False
    max_catchup: int = Field(1, ge=1, le=1000)
    retries: int = Field(0, ge=0, le=20)
    retry_delay: float = Field(60.0, ge=0.0, le=86_400.0, description="seconds; doubles per retry")
    timeout: float = Field(6 * 3600.0, gt=0.0, le=7 * 86_400.0, description="seconds per attempt")

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        from croniter import croniter

        if len(value.split()) != 5 or not croniter.is_valid(value):
            raise ValueError(
                "expected five cron fields (minute hour day month weekday), e.g. '0 2 * * *'"
            )
        return value

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError("expected an IANA time zone, e.g. UTC or Europe/Berlin") from None
        return value

    @field_validator("set", mode="before")
    @classmethod
    def _set(cls, value: Any) -> Any:
        value = [value] if isinstance(value, str) else value
        if isinstance(value, list):
            for item in value:
                if not isinstance(item, str) or "=" not in item:
                    raise ValueError(f"expected KEY=VALUE strings, got {short_repr(item)}")
        return value

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


# --------------------------------------------------------------------------- loading


def shipped_schedule_paths() -> dict[str, Path]:
    return {p.stem: p for p in sorted(SCHEDULE_DIR.glob("*.yaml"))}


def list_schedules() -> list[Schedule]:
    return [load_schedule(str(p)) for p in shipped_schedule_paths().values()]


def load_schedule(name_or_path: str) -> Schedule:
    """A shipped schedule by name, or a schedule YAML by path; errors name the field."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml") and not path.exists():
        shipped = shipped_schedule_paths()
        if name_or_path not in shipped:
            close = difflib.get_close_matches(name_or_path, list(shipped), n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(
                f"Unknown schedule {short_repr(name_or_path)}: not a shipped schedule nor a YAML "
                f"file.{hint} Shipped: {', '.join(shipped) or 'none'}."
            )
        path = shipped[name_or_path]
    if not path.is_file():
        raise ConfigError(f"Schedule file {str(path)!r} does not exist.")
    raw = read_yaml(path)
    try:
        return Schedule.model_validate(raw)
    except ValidationError as err:
        lines = [f"Invalid schedule {path}:"]
        for e in err.errors():
            where = ".".join(str(p) for p in e["loc"]) or "<root>"
            msg = e["msg"].removeprefix("Value error, ")
            if e["type"] == "extra_forbidden":
                msg = f"unknown key. Accepted keys: {', '.join(Schedule.model_fields)}"
            lines.append(f"  {where}: {msg} (got {short_repr(e.get('input'))})")
        raise ConfigError("\n".join(lines)) from None


def experiment_config(schedule: Schedule, logical_date: str | None = None):
    """The validated config one scheduled run trains (tagged with the schedule and date)."""
    from pipelines.variants import load_runs

    try:
        configs = load_runs(schedule.config, schedule.set)
    except ConfigError as exc:
        raise ConfigError(f"schedule {schedule.name!r}: {exc}") from None
    if len(configs) != 1:
        raise ConfigError(
            f"schedule {schedule.name!r}: config {schedule.config!r} has {len(configs)} variants; "
            "a schedule trains one run per date (point it at a config without variants)"
        )
    config = configs[0]
    if logical_date is not None:
        config.tracking.tags = {
            **config.tracking.tags,
            SCHEDULE_TAG: schedule.name,
            LOGICAL_DATE_TAG: logical_date,
        }
        config.tracking.run_name = f"{schedule.name} {logical_date}"
    return config


# --------------------------------------------------------------------------- time


def parse_date(text: str, tz: ZoneInfo | None = None) -> datetime:
    """An ISO date-time (naive: in ``tz``, else UTC), e.g. Airflow's ``{{ logical_date }}``."""
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ConfigError(
            f"date {short_repr(text)}: expected an ISO date-time such as 2026-12-01T02:00:00+01:00"
        ) from None
    return value if value.tzinfo else value.replace(tzinfo=tz or UTC)


def canonical(value: datetime) -> str:
    """The ``deeptrends.logical_date`` tag of a date: ISO 8601 in UTC, to the second."""
    return value.astimezone(UTC).replace(microsecond=0).isoformat()


def fire_times_before(schedule: Schedule, now: datetime, count: int) -> list[datetime]:
    """The latest ``count`` fire times at or before ``now`` (not before ``start_date``),
    oldest first."""
    from croniter import croniter

    it = croniter(schedule.cron, now.astimezone(schedule.tz) + _EPSILON)
    out = []
    for _ in range(count):
        t = it.get_prev(datetime)
        if schedule.start_date is not None and t < _aware(schedule.start_date, schedule):
            break
        out.append(t)
    return out[::-1]


def next_fire_times(schedule: Schedule, now: datetime, count: int = 1) -> list[datetime]:
    from croniter import croniter

    it = croniter(schedule.cron, now.astimezone(schedule.tz))
    return [it.get_next(datetime) for _ in range(count)]


def _aware(value: datetime, schedule: Schedule) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=schedule.tz)


def _count_between(schedule: Schedule, after: datetime, before: datetime) -> int:
    """Fire times strictly between two dates (at most ``SCAN_LIMIT``)."""
    from croniter import croniter

    it, n = croniter(schedule.cron, after.astimezone(schedule.tz)), 0
    while n < SCAN_LIMIT and it.get_next(datetime) < before:
        n += 1
    return n


_EPSILON = timedelta(microseconds=1)  # get_prev from now + 1 us: a fire time equal to now counts


# --------------------------------------------------------------------------- a pass


@dataclass
class DateResult:
    logical_date: str
    status: str  # trained | skipped | would-run | failed
    attempts: int = 0
    seconds: float = 0.0
    exit_code: int = 0
    run_id: str | None = None
    version: str | None = None
    alias: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class PassResult:
    schedule: str
    started: str
    dates: list[DateResult] = field(default_factory=list)
    left_out: int = 0  # missed fire times older than the max_catchup window
    exit_code: int = EXIT_OK
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ScheduleLocked(RuntimeError):
    """Another pass of the schedule holds its lock."""


def due_dates(
    schedule: Schedule, now: datetime, done: dict[str, Any], catch_up: bool
) -> tuple[list[str], int]:
    """(logical dates to consider, oldest first; missed dates left out by ``max_catchup``).
    Without catch-up only the latest fire time; with it the latest ``max_catchup``."""
    window = fire_times_before(schedule, now, schedule.max_catchup if catch_up else 1)
    dates = [canonical(t) for t in window]
    left_out = 0
    if catch_up and window and done:
        last_done = max(datetime.fromisoformat(d) for d in done)
        if last_done < window[0]:
            left_out = _count_between(schedule, last_done, window[0])
    return dates, left_out


def run_schedule(
    schedule: Schedule,
    logical_date: str | None = None,
    catch_up: bool = False,
    dry_run: bool = False,
    now: datetime | None = None,
    retries: int | None = None,
    log=print,
) -> PassResult:
    """One pass of ``schedule`` (see the module doc); never raises for a failed training,
    the result's ``exit_code`` says what happened."""
    started = time.time()
    now = now or datetime.now(UTC)
    config = experiment_config(schedule)  # a bad schedule or config fails before the lock
    result = PassResult(schedule.name, canonical(now))
    lock = Path(config.runtime.work_dir) / ".locks" / f"schedule-{schedule.name}.lock"
    with file_lock(lock, blocking=False) as free:
        if not free:
            raise ScheduleLocked(f"schedule {schedule.name!r}: another pass holds {lock}")
        from pipelines.reports.compare import scheduled_runs  # MLflow, without TensorFlow

        done = scheduled_runs(config.tracking.uri, config.experiment_name, schedule.name)
        if logical_date is not None:
            dates = [canonical(parse_date(logical_date, schedule.tz))]
        else:
            dates, result.left_out = due_dates(schedule, now, done, catch_up)
        if result.left_out:
            log(
                f"schedule {schedule.name}: {result.left_out} missed fire time(s) older than "
                f"max_catchup={schedule.max_catchup} are left out"
            )
        for date in dates:
            if date in done:
                result.dates.append(DateResult(date, "skipped", **_run_fields(done[date])))
                log(f"schedule {schedule.name} {date}: done already (run {done[date]['run_id']})")
                continue
            if dry_run:
                result.dates.append(DateResult(date, "would-run"))
                continue
            outcome = train_date(
                schedule, date, schedule.retries if retries is None else retries, log
            )
            result.dates.append(outcome)
            if outcome.status == "failed":
                result.exit_code = outcome.exit_code
                break  # later dates stay missed: the next pass catches them up, in order
    result.seconds = round(time.time() - started, 2)
    return result


def _run_fields(found: dict[str, Any]) -> dict[str, Any]:
    return {
        "run_id": found.get("run_id"),
        "version": found.get("version"),
        "alias": found.get("alias"),
    }


def train_date(schedule: Schedule, date: str, retries: int, log=print) -> DateResult:
    """Train one logical date in a child process, retrying with doubling delays."""
    started = time.time()
    outcome = DateResult(date, "failed")
    for attempt in range(retries + 1):
        if attempt:
            delay = schedule.retry_delay * 2 ** (attempt - 1)
            log(
                f"schedule {schedule.name} {date}: attempt {attempt} failed (exit "
                f"{outcome.exit_code}); retrying in {delay:g} s"
            )
            time.sleep(delay)
        outcome.attempts = attempt + 1
        code, summary = _attempt(schedule, date)
        outcome.exit_code = code
        if code == EXIT_OK:
            outcome.status = "trained"
            outcome.run_id = summary.get("run_id")
            outcome.version = summary.get("model_version")
            outcome.alias = (summary.get("aliases") or [None])[0]
            outcome.metrics = summary.get("metrics") or {}
            break
        if code in NOT_RETRIED:
            break
    outcome.seconds = round(time.time() - started, 2)
    return outcome


def _attempt(schedule: Schedule, date: str) -> tuple[int, dict[str, Any]]:
    """One training attempt in a child process, stopped after ``schedule.timeout``."""
    with tempfile.TemporaryDirectory(prefix="deeptrends-schedule-") as tmp:
        summary_path = Path(tmp) / "summary.json"
        cmd = attempt_command(schedule, date, summary_path)
        proc = subprocess.Popen(cmd, start_new_session=True)
        try:
            code = proc.wait(timeout=schedule.timeout)
        except subprocess.TimeoutExpired:
            _stop(proc)
            return EXIT_TIMEOUT, {}
        except BaseException:  # Ctrl-C or SIGTERM of the pass: stop the attempt with it
            _stop(proc)
            raise
        summary = (
            json.loads(summary_path.read_text()) if code == 0 and summary_path.exists() else {}
        )
        return code, summary


def attempt_command(schedule: Schedule, date: str, summary_path: Path) -> list[str]:
    """The child process of one attempt: this interpreter, ``python -m pipelines.schedule``."""
    return [
        sys.executable,
        "-m",
        "pipelines.schedule",
        schedule.model_dump_json(),
        date,
        str(summary_path),
    ]


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM (the run checkpoints and ends KILLED), SIGKILL after a grace period."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=KILL_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def _attempt_main(argv: list[str]) -> int:
    """The child: train ``experiment_config(schedule, date)``; exit codes as ``train``'s."""
    schedule, date, summary_path = Schedule.model_validate_json(argv[0]), argv[1], argv[2]
    from pipelines import cli

    cli._quiet_start()
    from pipelines.loop import Preempted
    from pipelines.train import run_experiment

    try:
        summary = run_experiment(experiment_config(schedule, date))
    except Preempted as exc:
        print(f"deeptrends schedule: interrupted ({exc}); the retry resumes it", file=sys.stderr)
        return cli.EXIT_PREEMPTED
    except Exception as exc:
        code = cli._user_error(exc)
        if code is None:
            raise
        print(f"deeptrends schedule: error: {str(exc)[:4000]}", file=sys.stderr)
        return code
    Path(summary_path).write_text(json.dumps(summary.to_dict()))
    return EXIT_OK


# --------------------------------------------------------------------------- elsewhere


def crontab_lines(schedules: list[Schedule], repo: Path, deeptrends: str) -> list[str]:
    """Plain cron lines: each pass at the schedule's fire times (``CRON_TZ`` needs cronie;
    Debian's cron reads the times in the machine's zone)."""
    lines = [
        "# deeptrends schedules (deeptrends schedule crontab); logs under runs/schedules/",
        "SHELL=/bin/bash",
    ]
    for s in schedules:
        flags = " --catch-up" if s.catchup else ""
        lines += [
            "",
            f"# {s.name}: {s.description or s.config}",
            f"CRON_TZ={s.timezone}",
            f"{s.cron} cd {repo} && mkdir -p runs/schedules && {deeptrends} schedule run {s.name}"
            f"{flags} >> runs/schedules/{s.name}.log 2>&1",
        ]
    return lines


def k8s_name(name: str) -> str:
    """A DNS-1123 label from a schedule name (CronJob names: 52 characters at most)."""
    label = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    return f"deeptrends-{label}"[:52].rstrip("-")


def k8s_cronjob(
    schedule: Schedule, image: str = "deeptrends:latest", namespace: str = "deeptrends"
) -> dict[str, Any]:
    """A ``batch/v1`` CronJob running ``deeptrends schedule run NAME`` at the schedule's fire
    times (deploy/k8s/README.md: the ConfigMap, Secret and volumes it expects)."""
    command = [
        "deeptrends",
        "schedule",
        "run",
        schedule.name,
        *(["--catch-up"] if schedule.catchup else []),
    ]
    attempts = schedule.retries + 1
    deadline = schedule.timeout * attempts + schedule.retry_delay * (2**schedule.retries - 1)
    labels = {
        "app.kubernetes.io/name": "deeptrends",
        "app.kubernetes.io/component": "schedule",
        "deeptrends/schedule": k8s_name(schedule.name).removeprefix("deeptrends-"),
    }
    labels = {"metadata": labels, "job": dict(labels), "pod": dict(labels)}  # no YAML aliases
    return {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": {
            "name": k8s_name(schedule.name),
            "namespace": namespace,
            "labels": labels["metadata"],
        },
        "spec": {
            "schedule": schedule.cron,
            "timeZone": schedule.timezone,
            "concurrencyPolicy": "Forbid",  # and the schedule's lock, for passes started by hand
            "startingDeadlineSeconds": 3600,
            "successfulJobsHistoryLimit": 3,
            "failedJobsHistoryLimit": 3,
            "jobTemplate": {
                "metadata": {"labels": labels["job"]},
                "spec": {
                    "backoffLimit": 0,  # deeptrends retries itself (retries, retry_delay)
                    "activeDeadlineSeconds": int(deadline + KILL_GRACE_SECONDS * attempts),
                    "template": {
                        "metadata": {"labels": labels["pod"]},
                        "spec": {
                            "restartPolicy": "Never",
                            "containers": [_k8s_container(command, image)],
                            "volumes": _k8s_volumes(),
                        },
                    },
                },
            },
        },
    }


def _k8s_container(command: list[str], image: str) -> dict[str, Any]:
    return {
        "name": "deeptrends",
        "image": image,
        "command": command,
        "workingDir": "/srv/deeptrends",
        "env": [
            {
                "name": "MLFLOW_TRACKING_URI",
                "valueFrom": {"configMapKeyRef": {"name": "deeptrends-tracking", "key": "uri"}},
            },
            {
                "name": "MLFLOW_TRACKING_USERNAME",
                "valueFrom": {
                    "secretKeyRef": {
                        "name": "deeptrends-mlflow-auth",
                        "key": "username",
                        "optional": True,
                    }
                },
            },
            {
                "name": "MLFLOW_TRACKING_PASSWORD",
                "valueFrom": {
                    "secretKeyRef": {
                        "name": "deeptrends-mlflow-auth",
                        "key": "password",
                        "optional": True,
                    }
                },
            },
        ],
        "resources": {"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"memory": "8Gi"}},
        "volumeMounts": [
            {"name": "runs", "mountPath": "/srv/deeptrends/runs"},
            {"name": "serving", "mountPath": "/srv/deeptrends/serving"},
        ],
    }


def _k8s_volumes() -> list[dict[str, Any]]:
    return [
        {"name": "runs", "persistentVolumeClaim": {"claimName": "deeptrends-runs"}},
        {"name": "serving", "persistentVolumeClaim": {"claimName": "deeptrends-serving"}},
    ]


if __name__ == "__main__":
    sys.exit(_attempt_main(sys.argv[1:]))
