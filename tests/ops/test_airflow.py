"""The Airflow DAG factory (deploy/airflow/deeptrends_dags.py) in Airflow's own virtualenv
(``make airflow-venv``: Airflow 3.3): the DagBag imports without errors and without
TensorFlow or MLflow, one DAG per schedule with its cron; ``airflow dags test`` of a tiny
schedule trains end to end, and a second run for the same logical date trains nothing."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from pipelines import schedule as sched
from tests.ops.conftest import REPO, TINY

AIRFLOW_BIN = Path(os.environ.get("DEEPTRENDS_AIRFLOW_VENV", REPO / ".venv-airflow")) / "bin"
DAGS = REPO / "deploy" / "airflow"
pytestmark = pytest.mark.skipif(
    not (AIRFLOW_BIN / "airflow").exists(),
    reason=f"Airflow is not installed in {AIRFLOW_BIN.parent} (make airflow-venv installs it)",
)

DAGBAG = r"""
import json, sys
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
dags = {}
for dag_id, dag in bag.dags.items():
    task = dag.tasks[0]
    dags[dag_id] = {"timetable": type(dag.timetable).__name__,
                    "cron": dag.timetable._expression, "timezone": str(dag.timetable._timezone),
                    "max_active_runs": dag.max_active_runs, "catchup": dag.catchup,
                    "retries": task.retries, "command": task.bash_command}
heavy = sorted(m for m in ("tensorflow", "mlflow", "keras") if m in sys.modules)
errors = {k: str(v) for k, v in bag.import_errors.items()}
print(json.dumps({"errors": errors, "dags": dags, "heavy": heavy}))
"""


def airflow_env(home: Path, **extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "DEEPTRENDS_BIN": str(REPO / ".venv" / "bin" / "deeptrends"),
        **extra,
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(extra)
    return env


def test_dagbag_has_one_dag_per_schedule_and_no_heavy_imports(tmp_path):
    out = subprocess.run(
        [str(AIRFLOW_BIN / "python"), "-c", DAGBAG, str(DAGS)],
        env=airflow_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    bag = json.loads(out.stdout.strip().splitlines()[-1])
    assert bag["errors"] == {} and bag["heavy"] == []
    schedules = {s.name: s for s in sched.list_schedules()}
    assert set(bag["dags"]) == {f"deeptrends-{n}" for n in schedules}
    for name, s in schedules.items():
        dag = bag["dags"][f"deeptrends-{name}"]
        assert (dag["timetable"], dag["cron"], dag["timezone"]) == (
            "CronTriggerTimetable",
            s.cron,
            s.timezone,
        )
        assert (dag["max_active_runs"], dag["catchup"], dag["retries"]) == (1, s.catchup, s.retries)
        assert "schedule run" in dag["command"] and "--retries 0" in dag["command"]
        assert "{{ (logical_date or dag_run.start_date).isoformat() }}" in dag["command"]


@pytest.mark.slow
def test_dags_test_trains_once_per_logical_date(tmp_path):
    import mlflow

    home, uri = tmp_path / "airflow", f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = {
        "name": "airflow-tiny",
        "config": "lenet5-digits",
        "cron": "0 3 * * *",
        "timezone": "UTC",
        "retries": 1,
        "retry_delay": 1,
        "timeout": 900,
        "set": [
            *TINY,
            f"runtime.work_dir={tmp_path / 'runs'}",
            f"export.serving_dir={tmp_path / 'serving'}",
        ],
    }
    (tmp_path / "airflow-tiny.yaml").write_text(yaml.safe_dump(spec))
    env = airflow_env(
        home, DEEPTRENDS_SCHEDULES=str(tmp_path / "airflow-tiny.yaml"), MLFLOW_TRACKING_URI=uri
    )
    migrate = subprocess.run(
        ["nice", "-n", "10", str(AIRFLOW_BIN / "airflow"), "db", "migrate"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert migrate.returncode == 0, migrate.stderr[-3000:]
    date = "2026-11-30T03:00:00+00:00"
    logs = []
    for _ in range(2):
        out = subprocess.run(
            [
                "nice",
                "-n",
                "10",
                str(AIRFLOW_BIN / "airflow"),
                "dags",
                "test",
                "deeptrends-airflow-tiny",
                date,
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=1200,
        )
        assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
        assert "state=success" in out.stdout + out.stderr, (out.stdout + out.stderr)[-4000:]
        logs.append(out.stdout + out.stderr)
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("lenet5-digits").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["deeptrends.logical_date"] == date
    assert runs[0].data.tags["deeptrends.schedule"] == "airflow-tiny"
    assert " trained " in logs[0] and "done already" in logs[1] and " skipped " in logs[1]
