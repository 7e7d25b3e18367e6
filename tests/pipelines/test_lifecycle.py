"""The driver's life-cycle objects, without training: the resume slot, the run tracker
(the run's end status by what ended it), and the publication (undone as a whole; a
process killed at any of its steps leaves nothing the next publication does not
reconcile; concurrent first runs and concurrent publications both finish)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.resume import ResumeSlot, run_key
from tests.pipelines.publish_worker import config_for, tiny_serving


def _config(tmp_path, **sections):
    return config_for(tmp_path, **sections)


ROOT = Path(__file__).resolve().parents[2]


class _Tracker:
    run_id = "abc"


# ------------------------------------------------------------------------ resume slot


def test_run_key_ignores_verbosity_and_the_resume_flag(tmp_path):
    base = _config(tmp_path)
    assert run_key(base) == run_key(_config(tmp_path, train={"verbose": 0}))
    assert run_key(base) == run_key(_config(tmp_path, runtime={"resume": False}))
    assert run_key(base) != run_key(_config(tmp_path, train={"epochs": 3}))


def test_run_key_unchanged_by_fields_left_at_their_defaults(tmp_path):
    # A field added to the schema with a default that keeps the old behaviour (as
    # export.precision was) must not change the key of runs made before it existed.
    base = _config(tmp_path)
    assert base.export.precision == "float32"
    assert run_key(base) == run_key(_config(tmp_path, export={"precision": "float32"}))
    assert run_key(base) != run_key(_config(tmp_path, export={"precision": "bfloat16"}))


def test_slot_kept_when_interrupted_and_cleared_when_finished_or_failed(tmp_path):
    pytest.importorskip("tensorflow")
    from pipelines.loop import Preempted

    config = _config(tmp_path)
    slot = ResumeSlot(config)
    assert not slot.resuming
    with pytest.raises(Preempted), slot.session(_Tracker()):
        slot.save_history({"loss": [1.0, 0.5]})
        raise Preempted("SIGTERM at epoch 2 step 1")
    again = ResumeSlot(config)
    assert again.resuming and again.run_id == "abc"
    assert json.loads((again.root / "run.json").read_text())["status"] == "interrupted"
    assert again.history(start_epoch=1) == {"loss": [1.0]}  # only epochs before the restart

    with pytest.raises(ValueError), again.session(_Tracker()):
        raise ValueError("boom")
    assert not again.root.exists() and not ResumeSlot(config).resuming

    slot = ResumeSlot(config)
    with slot.session(_Tracker()):
        assert slot.root.exists()
    assert not slot.root.exists()


def test_damaged_or_disabled_slot_starts_afresh(tmp_path):
    config = _config(tmp_path)
    slot = ResumeSlot(config)
    slot.open("abc")
    (slot.root / "run.json").write_text("{not json")
    assert not ResumeSlot(config).resuming
    slot.open("abc")
    assert ResumeSlot(config).resuming
    assert not ResumeSlot(_config(tmp_path, runtime={"resume": False})).resuming


# ------------------------------------------------------------------------ run tracker


def _status(config, run_id):
    import mlflow

    mlflow.set_tracking_uri(config.tracking.uri)
    run = mlflow.MlflowClient().get_run(run_id)
    return run.info.status, run.data.tags


@pytest.mark.parametrize(
    "error, status",
    [
        (None, "FINISHED"),
        (ValueError, "FAILED"),
        (KeyboardInterrupt, "KILLED"),
        ("preempted", "KILLED"),
    ],
)
def test_tracker_ends_the_run_by_what_ended_it(tmp_path, error, status):
    pytest.importorskip("mlflow")
    from pipelines.loop import Preempted
    from pipelines.tracking import RunTracker

    config = _config(tmp_path)
    exc = {None: None, "preempted": Preempted("SIGTERM at epoch 1 step 3")}.get(error, error)
    tracker = RunTracker(config)
    try:
        with tracker:
            tracker.log_start({"a": 1}, {"task": "classification"}, None)
            if exc is not None:
                raise exc
    except (ValueError, KeyboardInterrupt, Preempted):
        pass
    got, tags = _status(config, tracker.run_id)
    assert got == status
    assert tags["task"] == "classification"
    assert ("deeptrends.interrupted" in tags) == (error == "preempted")


def test_tracker_resumes_its_run_and_logs_nothing_when_disabled(tmp_path):
    pytest.importorskip("mlflow")
    from pipelines.tracking import RunTracker

    config = _config(tmp_path)
    with RunTracker(config) as first:
        pass
    with RunTracker(config, run_id=first.run_id) as second:
        second.log_start({"a": 1}, {}, resumed_at="epoch 3 step 0")
    assert second.run_id == first.run_id
    assert _status(config, first.run_id)[1]["deeptrends.resumed_at"] == "epoch 3 step 0"
    with RunTracker(config, enabled=False) as off:
        off.log_metrics({"x": 1.0})
        assert off.run_id is None and off.register(object()) is None and off.sink is None


# ------------------------------------------------------------------------ publication


def _serving(scale: float = 1.0):
    return tiny_serving(scale)


def test_publication_exports_registers_and_gates(tmp_path):
    pytest.importorskip("tensorflow")
    from pipelines.publication import Publication
    from pipelines.tracking import RunTracker

    config = _config(tmp_path)
    with RunTracker(config) as tracker:
        published = Publication(config, tracker).publish(_serving(), {"accuracy": 0.5})
    assert published.version == "1" and published.aliases == ["champion"]
    assert (tmp_path / "serving" / "life" / "1" / "saved_model.pb").exists()
    assert "life" in (tmp_path / "serving" / "models.config").read_text()


@pytest.mark.parametrize("where", ["gate", "export"])
def test_failed_publication_leaves_nothing(tmp_path, where):
    pytest.importorskip("tensorflow")
    import mlflow

    from pipelines.publication import Publication
    from pipelines.serving.export import ExportMismatch
    from pipelines.tracking import RunTracker

    config = _config(tmp_path)
    # "gate": the metric is missing after registration; "export": the saved model differs
    serving = _serving() if where == "gate" else _serving_that_drifts()
    metrics = {} if where == "gate" else {"accuracy": 0.5}
    with pytest.raises((KeyError, ExportMismatch)), RunTracker(config) as tracker:
        Publication(config, tracker).publish(serving, metrics)
    served = tmp_path / "serving" / "life"
    assert not any(p.name.isdigit() or p.name.startswith(".tmp") for p in served.glob("*"))
    client = mlflow.MlflowClient(config.tracking.uri)
    assert not client.search_model_versions("name='life'")
    assert _status(config, tracker.run_id)[0] == "FAILED"


def _serving_that_drifts():
    """An endpoint whose traced function differs from its eager one (a served model that
    would not reproduce the Keras model)."""
    import tensorflow as tf

    serving = _serving()
    endpoint = serving.endpoints[0]
    fn = endpoint.fn

    def drifting(x):
        out = fn(x)
        bump = 1.0 if tf.inside_function() else 0.0
        return {"y": out["y"] + bump}

    endpoint.fn = drifting
    return serving


# ------------------------------------------------------------------ crashes, concurrency

WORKER = [sys.executable, "-m", "tests.pipelines.publish_worker"]


def _consistent(root):
    """Registry, serving folders and models.config agree; nothing temporary is left."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    found = client.search_model_versions("name='life'")
    versions = [client.get_model_version("life", v.version) for v in found]  # with aliases
    served = root / "serving" / "life"
    folders = {p.name for p in served.iterdir()} if served.exists() else set()
    assert not {f for f in folders if f.startswith(".tmp")}, folders
    assert {f for f in folders if f.isdigit()} <= {str(v.version) for v in versions}
    for v in versions:  # a version either won an alias or belongs to a finished run
        assert v.aliases or client.get_run(v.run_id).info.status == "FINISHED"
    champions = [v for v in versions if "champion" in v.aliases]
    assert len(champions) == 1
    state = json.loads((root / "serving" / "models.json").read_text())
    assert all((served / str(v)).is_dir() for v in state["life"]["versions"])
    assert str(state["life"]["labels"]["champion"]) == str(champions[0].version)
    return versions


@pytest.mark.slow
@pytest.mark.parametrize("step", ["exported", "registered", "published", "gated"])
def test_a_publication_killed_at_any_step_is_reconciled_by_the_next(tmp_path, step):
    pytest.importorskip("tensorflow")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    killed = subprocess.run(
        [*WORKER, str(tmp_path), "0.9", step],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    done = subprocess.run(
        [*WORKER, str(tmp_path), "0.5"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    versions = _consistent(tmp_path)
    # the killed run's version survives only if it had already won its alias
    assert len(versions) == (2 if step == "gated" else 1)


@pytest.mark.slow
def test_two_first_runs_on_a_fresh_store_both_publish(tmp_path):
    pytest.importorskip("tensorflow")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [*WORKER, str(tmp_path), acc],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for acc in ("0.6", "0.7")
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    assert len(_consistent(tmp_path)) == 2


def test_unreadable_models_json_is_rebuilt(tmp_path):
    from pipelines.serving.export import write_model_config

    serving = tmp_path / "serving"
    for name, version in (("a", 1), ("b", 3)):
        (serving / name / str(version)).mkdir(parents=True)
    (serving / "models.json").write_text('{"a": {"versions": [1], "lab')  # a torn write
    write_model_config(serving, "a", [1], {"champion": 1}, labels_of=lambda n: {"champion": 3})
    state = json.loads((serving / "models.json").read_text())
    assert state == {
        "a": {"versions": [1], "labels": {"champion": 1}},
        "b": {"versions": [3], "labels": {"champion": 3}},
    }
    text = (serving / "models.config").read_text()
    assert "name: 'a'" in text and "name: 'b'" in text


def test_resume_point_names_the_epoch_to_come():
    from pipelines.loop import Position
    from pipelines.train import resume_point

    assert resume_point(Position(0, 0), 3) is None
    assert resume_point(Position(1, 5), 3) == "epoch 2 step 5"
    assert resume_point(Position(3, 0), 3) == "after training (all 3 epochs done)"
