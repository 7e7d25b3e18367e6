"""Distribution and fault tolerance: mirrored on virtual CPUs, a 2-worker job on loopback
against a single process, the launcher's fail-fast, kill -9 and resume, SIGTERM, bfloat16.

These start real training processes (TensorFlow's devices and collectives are fixed at
process start-up), so each test runs the CLI in subprocesses in a temporary folder."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipelines import launch
from tests.pipelines.test_resume_cli import _serving_outputs

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# The shipped lenet5-digits with budgets only (dropout, augmentation, partial batches dropped).
# Its one-process reference keeps the two replicas (mirrored on 2 virtual CPUs): Keras draws
# each replica's dropout mask from the same seed, so the replica layout, not the process
# count, decides the masks.
BASE = ["train.epochs=2", "train.verbose=0", "export.warmup_requests=1"]
ONE_PROCESS_TWO_REPLICAS = ["runtime.strategy=mirrored", "runtime.virtual_cpus=2"]


def _cli(
    *args: str, cwd: Path, env: dict | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pipelines.cli", *args]
    return subprocess.run(
        cmd,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _sets(*items: str) -> list[str]:
    out: list[str] = []
    for item in items:
        out += ["--set", item]
    return out


def _weights(uri: str, model_uri: str) -> list[np.ndarray]:
    import mlflow

    mlflow.set_tracking_uri(uri)
    return mlflow.keras.load_model(model_uri).get_weights()


def _max_diff(a, b) -> float:
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b, strict=True))


@pytest.fixture()
def ws(tmp_path, tfds_dir):
    return {
        "cwd": tmp_path,
        "uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "env": {
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "DEEPTRENDS_TFDS_DIR": tfds_dir,
        },
    }


def test_two_workers_end_with_the_two_replica_process_weights(ws):
    # the single process first: it prepares the TFDS copy of the data, which two workers
    # starting together on an empty TFDS folder would both write
    single = _cli(
        "train",
        "lenet5-digits",
        *_sets(*BASE, *ONE_PROCESS_TWO_REPLICAS, "tracking.registered_model=sp"),
        "--output-json",
        "sp.json",
        cwd=ws["cwd"],
        env=ws["env"],
    )
    assert single.returncode == 0, single.stderr[-3000:]
    multi = _cli(
        "launch",
        "--workers",
        "2",
        "lenet5-digits",
        *_sets(*BASE, "tracking.registered_model=mw"),
        "--output-json",
        "mw.json",
        cwd=ws["cwd"],
        env=ws["env"],
    )
    assert multi.returncode == 0, multi.stderr[-3000:]
    diff = _max_diff(_weights(ws["uri"], "models:/mw/1"), _weights(ws["uri"], "models:/sp/1"))
    assert diff < 1e-4, diff  # same batches, same updates; only the all-reduce order differs
    exported = [
        json.loads((ws["cwd"] / f).read_text())["export_path"] for f in ("mw.json", "sp.json")
    ]
    ours, theirs = (_serving_outputs(p) for p in exported)
    out_diff = max(float(np.max(np.abs(ours[k] - theirs[k]))) for k in ours)
    assert out_diff <= 1e-5, out_diff

    import mlflow

    client = mlflow.MlflowClient(ws["uri"])
    runs = client.search_runs(
        [client.get_experiment_by_name("lenet5-digits").experiment_id],
        "params.`tracking.registered_model` = 'mw'",
    )
    assert len(runs) == 1  # one run per job: only the chief logs
    params = runs[0].data.params
    assert params["derived.workers"] == "2" and params["derived.replicas"] == "2"
    assert (
        params["derived.global_batch_size"] == "32"
        and params["derived.per_replica_batch_size"] == "16"
    )
    assert params["derived.strategy"] == "MultiWorkerMirroredStrategy"


def test_launcher_fails_fast_naming_the_dead_worker(ws):
    cmd = [
        sys.executable,
        "-m",
        "pipelines.cli",
        "launch",
        "--workers",
        "2",
        "lenet5-digits",
        *_sets("train.epochs=50", "train.verbose=0"),
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=ws["cwd"],
        env={**os.environ, **ws["env"]},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    pids = ws["cwd"] / "runs" / "lenet5-digits" / "launch" / "pids.json"
    deadline = time.time() + 120
    while not pids.exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(8)  # let the workers reach their collectives
    job = json.loads(pids.read_text())
    if launch.can_isolate():  # TF binds every interface: the job runs in its own network
        assert job["network"] == "private"
        for address in job["cluster"]:  # listening inside, unreachable from here
            host, port = address.rsplit(":", 1)
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((host, int(port)), timeout=2).close()
    os.kill(job["worker-1"], signal.SIGKILL)
    start = time.time()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "worker 1 died" in err
    assert time.time() - start < 60


def _wait_for_checkpoints(
    root: Path, count: int, proc: subprocess.Popen, timeout: float = 180
) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = [
            int(p.name.split("-")[1].split(".")[0])
            for p in root.glob("runs/*/.resume/*/checkpoints/*/ckpt-*.index")
        ]
        if max(found, default=0) >= count:  # the manager keeps only the newest two
            return
        if proc.poll() is not None:
            raise AssertionError(
                f"training ended before {count} checkpoints: {proc.stderr.read()[-2000:]}"
            )
        time.sleep(0.1)
    raise AssertionError("no checkpoint appeared")


# the shipped config with budgets only: dropout and augmentation on (exact resumption)
RESUME = [
    "train.epochs=3",
    "train.verbose=0",
    "export.warmup_requests=1",
    "train.checkpoint_every_steps=10",
]


def test_kill_9_then_same_command_resumes_into_the_same_run(ws):
    args = ["train", "lenet5-digits", *_sets(*RESUME, "tracking.registered_model=resumed")]
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", *args],
        cwd=ws["cwd"],
        env={**os.environ, **ws["env"]},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for_checkpoints(ws["cwd"], 3, proc)  # past the first epoch
    proc.kill()
    proc.wait()
    again = _cli(*args, "--output-json", "resumed.json", cwd=ws["cwd"], env=ws["env"])
    assert again.returncode == 0, again.stderr[-3000:]
    straight = _cli(
        "train",
        "lenet5-digits",
        *_sets(*RESUME, "tracking.registered_model=straight"),
        cwd=ws["cwd"],
        env=ws["env"],
    )
    assert straight.returncode == 0, straight.stderr[-3000:]

    import mlflow

    client = mlflow.MlflowClient(ws["uri"])
    run_id = json.loads((ws["cwd"] / "resumed.json").read_text())["run_id"]
    runs = client.search_runs(
        [client.get_experiment_by_name("lenet5-digits").experiment_id],
        "params.`tracking.registered_model` = 'resumed'",
    )
    assert [r.info.run_id for r in runs] == [run_id]  # no second run
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and "deeptrends.resumed_at" in run.data.tags
    assert sorted({m.step for m in client.get_metric_history(run_id, "loss")}) == [1, 2, 3]
    diff = _max_diff(
        _weights(ws["uri"], "models:/resumed/1"), _weights(ws["uri"], "models:/straight/1")
    )
    assert diff <= 1e-5, (diff, run.data.tags["deeptrends.resumed_at"], again.stderr[-1500:])


def test_sigterm_checkpoints_marks_interrupted_and_resumes(ws):
    args = ["train", "lenet5-digits", *_sets(*RESUME)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", *args],
        cwd=ws["cwd"],
        env={**os.environ, **ws["env"]},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for_checkpoints(ws["cwd"], 1, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143
    assert "run the same command again" in err

    import mlflow

    client = mlflow.MlflowClient(ws["uri"])
    [run] = client.search_runs([client.get_experiment_by_name("lenet5-digits").experiment_id])
    assert run.info.status == "KILLED" and "SIGTERM" in run.data.tags["deeptrends.interrupted"]
    again = _cli(*args, cwd=ws["cwd"], env=ws["env"])
    assert again.returncode == 0, again.stderr[-3000:]
    [run] = client.search_runs([client.get_experiment_by_name("lenet5-digits").experiment_id])
    assert run.info.status == "FINISHED"


def test_mirrored_on_two_virtual_cpus_and_bfloat16(ws):
    out = _cli(
        "train",
        "lenet5-digits",
        *_sets(
            "train.epochs=1",
            "train.steps_per_epoch=2",
            "train.verbose=0",
            "runtime.strategy=mirrored",
            "runtime.virtual_cpus=2",
            "runtime.mixed_precision=mixed_bfloat16",
            "train.scale_learning_rate=true",
        ),
        "--output-json",
        "m.json",
        cwd=ws["cwd"],
        env=ws["env"],
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((ws["cwd"] / "m.json").read_text())
    assert (
        summary["metrics"]["export_max_abs_diff"] <= 1e-2
    )  # bfloat16: graph and eager round differently

    import mlflow
    import tensorflow as tf

    run = mlflow.MlflowClient(ws["uri"]).get_run(summary["run_id"])
    assert run.data.params["derived.replicas"] == "2"
    assert float(run.data.params["derived.learning_rate"]) == pytest.approx(2 * 0.002)
    sig = tf.saved_model.load(summary["export_path"]).signatures["serving_default"]
    assert sig.structured_outputs["probabilities"].dtype == tf.float32  # outputs stay float32


def test_unavailable_strategies_fail_clearly(ws):
    out = _cli(
        "train",
        "lenet5-digits",
        *_sets("runtime.strategy=tpu", "train.epochs=1"),
        cwd=ws["cwd"],
        env=ws["env"],
    )
    assert out.returncode != 0 and "no TPU found" in out.stderr
    out = _cli(
        "train",
        "lenet5-digits",
        *_sets("runtime.strategy=multi_worker", "train.epochs=1"),
        cwd=ws["cwd"],
        env={**ws["env"], "TF_CONFIG": ""},
    )
    assert out.returncode != 0 and "deeptrends launch" in out.stderr


def _family_cases():
    from tests.pipelines.mirrored_families import CASES

    return [pytest.param(i, id=f"{c}-{v or 'default'}") for i, (c, v, _) in enumerate(CASES)]


@pytest.mark.parametrize("index", _family_cases())
def test_every_model_family_trains_two_steps_under_mirrored(ws, index):
    from tests.conftest import shared_data_dir

    root = shared_data_dir()
    if root is None:
        pytest.skip("DEEPTRENDS_DATA_DIR (mnist_test, deu_eng) not found")
    script = Path(__file__).with_name("mirrored_families.py")
    out = subprocess.run(
        [sys.executable, str(script), str(index)],
        cwd=ws["cwd"],
        capture_output=True,
        text=True,
        timeout=600,
        env={
            **os.environ,
            **ws["env"],
            "DEEPTRENDS_DATA_DIR": str(root),
            "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
        },
    )
    results = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert out.returncode == 0, (results, out.stderr[-3000:])
    [result] = results
    assert result["finite"] and result["replicas"] == 2, result
    # every replica ends with the same (averaged) BatchNorm statistics: what is checkpointed,
    # evaluated and exported does not depend on which replica is read
    assert result["statistics_spread"] == 0.0, result


@pytest.mark.parametrize(
    "config, budget",
    [
        # a custom train step (the ELBO trainer)
        ("vae-digits", ["train.epochs=3", "task_options.fid_samples=100"]),
        # the default pipeline as shipped: dropout, augmentation, drop_remainder, BatchNorm-free
        ("lenet5-digits", ["train.epochs=3"]),
    ],
)
def test_shipped_configs_under_two_workers(ws, config, budget):
    out = _cli(
        "launch",
        "--workers",
        "2",
        config,
        *_sets(*budget, "train.verbose=0", "export.warmup_requests=1"),
        "--output-json",
        "job.json",
        cwd=ws["cwd"],
        env=ws["env"],
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    import mlflow

    client = mlflow.MlflowClient(ws["uri"])
    runs = client.search_runs([client.get_experiment_by_name(config).experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    losses = [
        m.value
        for m in sorted(
            client.get_metric_history(runs[0].info.run_id, "loss"), key=lambda m: m.step
        )
    ]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert runs[0].data.params["derived.workers"] == "2"
    if config == "lenet5-digits":
        assert runs[0].data.metrics["val_accuracy"] > 0.9, runs[0].data.metrics
        assert json.loads((ws["cwd"] / "job.json").read_text())["model_version"] == "1"
