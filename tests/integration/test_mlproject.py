"""``mlflow/MLproject`` as users run it: ``mlflow run mlflow -e train --env-manager local``
with several overrides in one parameter (MLflow passes each parameter as one shell-quoted
argument), the training run a child of the launcher's run, and the overrides' errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_overrides_split_as_a_shell_would(capsys):
    from pipelines.cli import _split_overrides, main

    assert _split_overrides("") == []
    assert _split_overrides("a.b=1  c='two words'") == ["a.b=1", "c=two words"]
    assert main(["train", "lenet5-digits", "--overrides", "train.epochs=1 nonsense"]) == 2
    assert "--overrides: expected KEY=VALUE items, got 'nonsense'" in capsys.readouterr().err
    assert main(["train", "lenet5-digits", "--overrides", "train.epochs='1"]) == 2
    assert "--overrides: No closing quotation" in capsys.readouterr().err
    assert main(["train", "lenet5-digits", "--overrides", "train.epochs=zero"]) == 2
    assert "train.epochs" in capsys.readouterr().err


def test_schedule_catch_up_takes_a_value():
    from pipelines.cli import build_parser

    parser = build_parser()
    for argv, want in ([[], False], [["--catch-up"], True], [["--catch-up", "false"], False]):
        args = parser.parse_args(["schedule", "run", "nightly-lenet5-digits", *argv])
        assert args.catch_up is want
    with pytest.raises(SystemExit):
        parser.parse_args(["schedule", "run", "x", "--catch-up", "maybe"])


@pytest.mark.slow
@pytest.mark.integration
def test_mlflow_run_trains_the_entry_point(tmp_path, tfds_dir):
    mlflow = pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = " ".join(
        [
            "train.epochs=1",
            "train.steps_per_epoch=3",
            f"runtime.work_dir={tmp_path / 'runs'}",
            f"export.serving_dir={tmp_path / 'serving'}",
        ]
    )
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "MLFLOW_TRACKING_URI": uri,
        "PYTHONPATH": str(REPO),
        "DEEPTRENDS_TFDS_DIR": tfds_dir,
    }
    for inherited in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        env.pop(inherited, None)  # what an earlier test in this process may have left
    out = subprocess.run(
        [
            *(sys.executable, "-m", "mlflow", "run", "mlflow", "-e", "train"),
            *("-P", "config=lenet5-digits", "-P", f"overrides={overrides}"),
            *("--env-manager", "local"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    client = mlflow.MlflowClient(uri)
    [launcher] = client.search_runs([client.get_experiment_by_name("Default").experiment_id])
    assert launcher.info.status == "FINISHED"
    experiment = client.get_experiment_by_name("lenet5-digits")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == launcher.info.run_id
    assert run.data.params["train.steps_per_epoch"] == "3"
    assert client.get_model_version_by_alias("lenet5-digits", "champion").run_id == run.info.run_id
