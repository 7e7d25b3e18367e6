"""The CLI as a user runs it.

- ``kill -9`` mid-epoch, then the same command again: the exported model is the one an
  uninterrupted run exports (<= 1e-5 on every float output of its serving signatures).
  Shipped configs, unchanged but for budgets (epochs, checkpoint interval, evaluation
  samples): dropout and augmentation stay on in ``lenet5-digits``; the GAN keeps its
  dropout and its latent noise. All three commands run in one workspace: the
  uninterrupted run finishes (and clears its resumption slot), the next identical command
  is killed with SIGKILL after a mid-epoch checkpoint, and the same command once more
  resumes it.
- A quiet start: nothing but our own lines before the first progress line (no TensorFlow,
  absl, CUDA or MLflow start-up notices), while errors written to stderr still show.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# config -> (budget overrides, the checkpoint to kill after). Checkpoints come every 10
# steps and at each epoch's end (lenet5-digits: 44 steps, 5 an epoch; gan-digits: 40
# steps, 4 an epoch): the kill lands in epoch 2 after its first mid-epoch checkpoint,
# with two more mid-epoch checkpoints to go (a slow machine's lag stays mid-epoch).
CASES = {
    "lenet5-digits": (["train.epochs=3", "train.checkpoint_every_steps=10"], 6),
    "gan-digits": (
        ["train.epochs=2", "train.checkpoint_every_steps=10", "task_options.fid_samples=100"],
        5,
    ),
}


def _command(config: str, sets: list[str], output_json: str) -> list[str]:
    cmd = [sys.executable, "-m", "pipelines.cli", "train", config, "--output-json", output_json]
    for item in [*sets, "train.verbose=0"]:
        cmd += ["--set", item]
    return cmd


def _checkpoints(root: Path) -> list[Path]:
    return list(root.glob("runs/*/.resume/*/checkpoints/*"))


def _latest_saved(root: Path) -> int:
    """The number of the newest checkpoint the manager has recorded (0: none yet); its
    state file is written atomically after the checkpoint itself."""
    numbers = [0]
    for state in root.glob("runs/*/.resume/*/checkpoints/*/checkpoint"):
        found = re.search(r'^model_checkpoint_path: "ckpt-(\d+)"', state.read_text(), re.M)
        numbers.append(int(found.group(1)) if found else 0)
    return max(numbers)


def _kill_after_checkpoint(cmd: list[str], cwd: Path, env: dict, count: int) -> None:
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 600
    while time.time() < deadline:
        if _latest_saved(cwd) >= count:
            proc.kill()  # SIGKILL: no handler, no last checkpoint
            proc.wait()
            return
        if proc.poll() is not None:
            raise AssertionError(f"ended before checkpoint {count}: {proc.stderr.read()[-3000:]}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"no checkpoint {count} within 10 minutes")


def _serving_outputs(path: str) -> dict[str, np.ndarray]:
    """Every float output of every signature that takes numbers, on fixed inputs."""
    import tensorflow as tf

    rng = np.random.default_rng(0)
    loaded = tf.saved_model.load(path)
    outputs = {}
    for name, fn in sorted(loaded.signatures.items()):
        specs = fn.structured_input_signature[1]
        if any(spec.dtype == tf.string for spec in specs.values()):
            continue  # encoded bytes: the same graph behind another input
        inputs = {}
        for key, spec in specs.items():
            shape = [8 if d is None else d for d in spec.shape]
            if spec.dtype.is_integer:
                inputs[key] = tf.constant(np.arange(np.prod(shape)).reshape(shape), spec.dtype)
            else:
                inputs[key] = tf.constant(rng.uniform(size=shape), spec.dtype)
        for key, value in fn(**inputs).items():
            if value.dtype.is_floating:
                outputs[f"{name}/{key}"] = value.numpy()
    assert outputs, f"{path}: no signature with numeric inputs and float outputs"
    return outputs


@pytest.mark.parametrize("config", sorted(CASES))
def test_kill_9_mid_epoch_then_the_same_command_exports_the_uninterrupted_model(
    tmp_path, tfds_dir, config
):
    from pipelines.loop import TrainingCheckpoint

    sets, kill_after = CASES[config]
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "DEEPTRENDS_TFDS_DIR": tfds_dir,
    }
    straight = subprocess.run(
        _command(config, sets, "straight.json"),
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert not _checkpoints(tmp_path), "a finished run clears its slot"

    cmd = _command(config, sets, "resumed.json")
    _kill_after_checkpoint(cmd, tmp_path, env, kill_after)
    [ckpt_dir] = _checkpoints(tmp_path)
    position = TrainingCheckpoint.peek(ckpt_dir)
    assert position.epoch >= 1 and position.step > 0, position  # killed mid-epoch, not at its end
    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]

    a = json.loads((tmp_path / "straight.json").read_text())
    b = json.loads((tmp_path / "resumed.json").read_text())
    ours, theirs = _serving_outputs(b["export_path"]), _serving_outputs(a["export_path"])
    assert ours.keys() == theirs.keys()
    diffs = {k: float(np.max(np.abs(ours[k] - theirs[k]))) for k in ours}
    assert max(diffs.values()) <= 1e-5, (position, diffs)
    for name, value in a["metrics"].items():  # evaluated on the same model: the same figures
        if name != "export_max_abs_diff":
            assert b["metrics"][name] == pytest.approx(value, rel=1e-4, abs=1e-5), name


def _user_env(tmp_path: Path, tfds_dir: str) -> dict:
    """The environment of a user's shell: none of the test session's quieting variables."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("TF_CPP_MIN_LOG_LEVEL", "MLFLOW_LOGGING_LEVEL", "PYTHONWARNINGS")
    }
    return {
        **env,
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",  # new: its notices too
        "DEEPTRENDS_TFDS_DIR": tfds_dir,
        "PYTHONUNBUFFERED": "1",  # stdout and stderr interleave as written
    }


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_FIRST_PROGRESS = re.compile(r"(^|[\r\n])\s*\d+/3\b")  # (per execution: steps_per_execution)


def test_train_starts_quietly(tmp_path):
    """As on a fresh clone: a new MLflow store and a TFDS folder with nothing prepared."""
    cmd = [
        sys.executable,
        "-m",
        "pipelines.cli",
        "train",
        "lenet5-digits",
        "--set",
        "train.epochs=1",
        "--set",
        "train.steps_per_epoch=3",
    ]
    out = subprocess.run(
        cmd,
        cwd=tmp_path,
        env=_user_env(tmp_path, str(tmp_path / "tfds")),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
    )
    text = _ANSI.sub("", out.stdout)
    assert out.returncode == 0, text[-3000:]
    first = _FIRST_PROGRESS.search(text)
    assert first, f"no progress line: {text[:3000]}"
    before = [line for line in text[: first.start()].splitlines() if line.strip()]
    assert all(line.startswith("deeptrends") for line in before), before


_NOTICES = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "I0000 00:00:1.1 1 port.cc:153] oneDNN custom operations are on. You may see slightly ...",
    "I0000 00:00:1.2 1 cudart_stub.cc:31] Could not find cuda drivers on your machine, "
    "GPU will not be used.",
    "E0000 00:00:1.3 1 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error",
]
_ERROR = "E0000 00:00:1.4 1 some_kernel.cc:7] a real error"
_WRITE_THROUGH_THE_FILTER = """
import os, sys
from pipelines import runtime

with runtime._start_up_notices_filtered():
    for line in sys.argv[1:]:
        os.write(2, (line + "\\n").encode())
    os.write(1, b"inside\\n")
os.write(2, b"after\\n")
"""


def test_start_up_filter_drops_the_notices_and_keeps_errors():
    out = subprocess.run(
        [sys.executable, "-c", _WRITE_THROUGH_THE_FILTER, *_NOTICES, _ERROR],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stderr.splitlines() == [_ERROR, "after"]  # errors show, after the block
    assert out.stdout == "inside\n"
