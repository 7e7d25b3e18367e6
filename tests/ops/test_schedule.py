"""Scheduled pipelines: schedules as data, fire times in their zone, what a pass trains and
skips, the lock, retries with back-off, timeouts and exit codes; one pass end to end."""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from pipelines import schedule as sched
from pipelines.config import ConfigError
from pipelines.io import file_lock
from tests.ops.conftest import DEEPTRENDS, TINY, quiet_env, run_cli


def make(tmp_path: Path, **fields) -> Path:
    spec = {
        "name": "tiny",
        "config": "lenet5-digits",
        "cron": "0 2 * * *",
        "timezone": "UTC",
        "set": [
            *TINY,
            f"runtime.work_dir={tmp_path / 'runs'}",
            f"export.serving_dir={tmp_path / 'serving'}",
        ],
        **fields,
    }
    path = tmp_path / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_shipped_schedules_load_and_their_configs_validate():
    schedules = sched.list_schedules()
    assert {s.name for s in schedules} >= {"nightly-lenet5-digits", "weekly-resnet18-mnist"}
    for s in schedules:
        config = sched.experiment_config(s, "2026-12-01T01:00:00+00:00")
        assert config.tracking.tags["deeptrends.schedule"] == s.name
    from pipelines.config import list_configs

    assert not {s.name for s in schedules} & set(list_configs())  # not taken for experiments


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"cron": "0 2 * *"}, ["cron:", "expected five cron fields"]),
        ({"cron": "0 25 * * *"}, ["cron:", "expected five cron fields"]),
        ({"timezone": "Mars/Olympus"}, ["timezone:", "expected an IANA time zone"]),
        ({"max_catchup": 0}, ["max_catchup:", "greater than or equal to 1"]),
        ({"every": "day"}, ["every:", "unknown key"]),
        ({"set": ["train.epochs"]}, ["set:", "expected KEY=VALUE"]),
    ],
)
def test_bad_schedules_name_the_field(tmp_path, fields, words):
    with pytest.raises(ConfigError) as err:
        sched.load_schedule(str(make(tmp_path, **fields)))
    assert all(w in str(err.value) for w in words), str(err.value)


def test_unknown_schedule_lists_the_shipped_ones():
    with pytest.raises(ConfigError, match="Did you mean nightly-lenet5-digits"):
        sched.load_schedule("nightly-lenet5-digit")


def test_fire_times_follow_the_zone_across_daylight_saving():
    s = sched.Schedule(name="x", config="lenet5-digits", cron="0 2 * * *", timezone="Europe/Berlin")
    # 2026-03-29: CET -> CEST; 02:00 local does not exist that night: it fires at 03:00 CEST
    times = sched.next_fire_times(s, datetime(2026, 3, 27, 12, tzinfo=UTC), 3)
    assert [sched.canonical(t) for t in times] == [
        "2026-03-28T01:00:00+00:00",
        "2026-03-29T01:00:00+00:00",
        "2026-03-30T00:00:00+00:00",
    ]
    # a fire time equal to now is due now
    now = datetime(2026, 3, 31, 0, tzinfo=UTC)
    assert [sched.canonical(t) for t in sched.fire_times_before(s, now, 1)] == [
        "2026-03-31T00:00:00+00:00"
    ]


def test_due_dates_are_bounded_by_max_catchup():
    s = sched.Schedule(name="x", config="lenet5-digits", cron="0 2 * * *", max_catchup=3)
    now = datetime(2026, 12, 10, 12, tzinfo=UTC)
    dates, left_out = sched.due_dates(s, now, {}, catch_up=True)
    assert dates == [f"2026-12-{d:02d}T02:00:00+00:00" for d in (8, 9, 10)] and left_out == 0
    done = {"2026-12-03T02:00:00+00:00": {}}
    dates, left_out = sched.due_dates(s, now, done, catch_up=True)
    assert left_out == 4  # the 4th..7th are missed and older than the window
    assert sched.due_dates(s, now, done, catch_up=False) == (["2026-12-10T02:00:00+00:00"], 0)
    bounded = s.model_copy(update={"start_date": datetime(2026, 12, 9, tzinfo=UTC)})
    assert sched.due_dates(bounded, now, {}, catch_up=True)[0] == [
        "2026-12-09T02:00:00+00:00",
        "2026-12-10T02:00:00+00:00",
    ]


def test_logical_dates_are_canonical_whatever_the_spelling():
    berlin = sched.Schedule(name="x", config="c", cron="0 2 * * *", timezone="Europe/Berlin").tz
    for text in (
        "2026-12-01T02:00:00+01:00",
        "2026-12-01 01:00:00+00:00",
        "2026-12-01T01:00:00Z",
        "2026-12-01T01:00:00.250000+00:00",
    ):
        assert sched.canonical(sched.parse_date(text)) == "2026-12-01T01:00:00+00:00"
    assert (
        sched.canonical(sched.parse_date("2026-12-01T02:00", berlin)) == "2026-12-01T01:00:00+00:00"
    )
    with pytest.raises(ConfigError, match="expected an ISO date-time"):
        sched.parse_date("yesterday")


def test_retries_back_off_and_stop_on_errors_that_repeat(monkeypatch):
    s = sched.Schedule(name="x", config="c", cron="0 2 * * *", retries=3, retry_delay=10)
    codes, slept = [1, 143, 0], []
    monkeypatch.setattr(
        sched, "_attempt", lambda *a: (codes.pop(0), {"run_id": "r", "aliases": ["champion"]})
    )
    monkeypatch.setattr(sched.time, "sleep", slept.append)
    outcome = sched.train_date(s, "2026-12-01T02:00:00+00:00", s.retries, log=lambda m: None)
    assert (outcome.status, outcome.attempts, outcome.alias) == ("trained", 3, "champion")
    assert slept == [10, 20]  # doubling delays
    for code in (2, 5):  # a bad config and a diverged loss are not retried
        monkeypatch.setattr(sched, "_attempt", lambda *a, c=code: (c, {}))
        outcome = sched.train_date(s, "d", s.retries, log=lambda m: None)
        assert (outcome.status, outcome.attempts, outcome.exit_code) == ("failed", 1, code)
    monkeypatch.setattr(sched, "_attempt", lambda *a: (4, {}))
    outcome = sched.train_date(s, "d", 1, log=lambda m: None)
    assert (outcome.attempts, outcome.exit_code) == (2, 4)


def test_an_attempt_past_its_timeout_is_stopped(monkeypatch):
    s = sched.Schedule(name="x", config="c", cron="0 2 * * *", timeout=1)
    monkeypatch.setattr(sched, "attempt_command", lambda *a: ["sleep", "60"])
    started = datetime.now(UTC)
    assert sched._attempt(s, "d") == (sched.EXIT_TIMEOUT, {})
    assert (datetime.now(UTC) - started).total_seconds() < 30


def test_a_held_lock_exits_75_and_a_bad_schedule_2(tmp_path):
    path = make(tmp_path)
    with file_lock(tmp_path / "runs" / ".locks" / "schedule-tiny.lock"):
        out = run_cli(["schedule", "run", str(path), "--dry-run"], quiet_env(), timeout=300)
    assert out.returncode == sched.EXIT_LOCKED, out.stderr[-2000:]
    assert "another pass holds" in out.stderr
    bad = make(tmp_path, name="bad", cron="every night")
    out = run_cli(["schedule", "run", str(bad)], quiet_env(), timeout=300)
    assert out.returncode == 2 and "cron: expected five cron fields" in out.stderr


def test_list_next_crontab_and_k8s_commands():
    env = quiet_env()
    out = run_cli(["schedule", "list"], env, timeout=300)
    assert (
        out.returncode == 0
        and "nightly-lenet5-digits" in out.stdout
        and "Europe/Berlin" in out.stdout
    )
    out = run_cli(
        [
            "schedule",
            "next",
            "nightly-lenet5-digits",
            "--count",
            "2",
            "--now",
            "2026-06-30T12:00:00Z",
        ],
        env,
        timeout=300,
    )
    assert out.stdout.split("\n")[:2] == [
        "2026-07-01T02:00:00+02:00  (logical date 2026-07-01T00:00:00+00:00)",
        "2026-07-02T02:00:00+02:00  (logical date 2026-07-02T00:00:00+00:00)",
    ]
    out = run_cli(
        ["schedule", "crontab", "--repo", "/srv/deeptrends", "--deeptrends", "dt"], env, timeout=300
    )
    lines = out.stdout.splitlines()
    i = lines.index("CRON_TZ=Europe/Berlin")
    assert lines[i + 1] == (
        "0 2 * * * cd /srv/deeptrends && mkdir -p runs/schedules && dt schedule "
        "run nightly-lenet5-digits --catch-up >> runs/schedules/"
        "nightly-lenet5-digits.log 2>&1"
    )
    out = run_cli(
        ["schedule", "k8s", "nightly-lenet5-digits", "--image", "registry.local/dt:1"],
        env,
        timeout=300,
    )
    job = yaml.safe_load(out.stdout)
    assert job["kind"] == "CronJob" and job["spec"]["timeZone"] == "Europe/Berlin"
    assert job["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["command"] == [
        "deeptrends",
        "schedule",
        "run",
        "nightly-lenet5-digits",
        "--catch-up",
    ]


@pytest.mark.slow
def test_a_pass_trains_a_date_once_and_catch_up_skips_what_is_done(tmp_path):
    """One real training: the pass trains the date (tags, alias); the same date again, a
    backfill spelled differently and a catch-up pass over it all skip it."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = quiet_env(MLFLOW_TRACKING_URI=uri)
    path = make(tmp_path, catchup=True, max_catchup=2)
    out = run_cli(
        [
            "schedule",
            "run",
            str(path),
            "--now",
            "2026-12-01T12:00:00+00:00",
            "--output-json",
            str(tmp_path / "p1.json"),
        ],
        env,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    (first,) = json.loads((tmp_path / "p1.json").read_text())["dates"]
    assert (first["logical_date"], first["status"], first["alias"]) == (
        "2026-12-01T02:00:00+00:00",
        "trained",
        "champion",
    )
    run = mlflow.MlflowClient(tracking_uri=uri).get_run(first["run_id"])
    assert run.data.tags["deeptrends.schedule"] == "tiny"
    assert run.data.tags["deeptrends.logical_date"] == "2026-12-01T02:00:00+00:00"
    assert run.data.tags["registry.alias"] == "champion" and "best_loss" in run.data.metrics

    out = run_cli(
        [
            "schedule",
            "run",
            str(path),
            "--logical-date",
            "2026-12-01 03:00:00+01:00",
            "--output-json",
            str(tmp_path / "p2.json"),
        ],
        env,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    (again,) = json.loads((tmp_path / "p2.json").read_text())["dates"]
    assert (again["status"], again["run_id"]) == ("skipped", first["run_id"])

    out = run_cli(
        [
            "schedule",
            "run",
            str(path),
            "--catch-up",
            "--dry-run",
            "--now",
            "2026-12-02T12:00:00+00:00",
            "--output-json",
            str(tmp_path / "p3.json"),
        ],
        env,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    dates = json.loads((tmp_path / "p3.json").read_text())["dates"]
    assert [(d["logical_date"], d["status"]) for d in dates] == [
        ("2026-12-01T02:00:00+00:00", "skipped"),
        ("2026-12-02T02:00:00+00:00", "would-run"),
    ]
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("lenet5-digits")
    assert len(client.search_runs([exp.experiment_id])) == 1  # trained once


def test_the_attempt_runs_the_schedule_module():
    s = sched.Schedule(name="x", config="c", cron="0 2 * * *")
    cmd = sched.attempt_command(s, "d", Path("/tmp/summary.json"))
    assert cmd[1:3] == ["-m", "pipelines.schedule"] and json.loads(cmd[3])["name"] == "x"
    assert subprocess.run([cmd[0], "-c", "import pipelines.schedule"]).returncode == 0
    assert Path(DEEPTRENDS).exists()
