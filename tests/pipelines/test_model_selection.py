"""Model selection by validation (``train.select_best``, ``train.early_stopping_patience``):
the best epoch's weights are the ones left in the model when training ends, and the best
weights, their value, their epoch and the patience count are part of the training
checkpoint, so a resumed run (``kill -9`` mid-training, then the same command) selects
the same epoch and exports the same model as an uninterrupted one."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from pipelines.callbacks import BestWeights, monitor_mode  # noqa: E402
from pipelines.config import ConfigError, load_config  # noqa: E402
from pipelines.loop import TrainingCheckpoint  # noqa: E402


def _model():
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2, name="dense")(inputs))
    model.compile(optimizer="adam", loss="mse")
    return model


def _epoch(model, callback, epoch: int, val_loss: float) -> list[np.ndarray]:
    """One 'epoch': new weights, then the epoch's logs."""
    weights = [np.full(w.shape, epoch + 1.0, dtype="float32") for w in model.weights]
    model.set_weights(weights)
    callback.on_epoch_end(epoch, {"loss": 1.0, "val_loss": val_loss})
    return weights


def test_best_weights_survive_a_checkpoint_restore(tmp_path):
    """Epochs 1-3 in one process, checkpointed; epoch 4 in a fresh one restored from it:
    the selected epoch (2) and the patience count carry over."""
    first = _model()
    selection = BestWeights(first, "val_loss", patience=2)
    ckpt = TrainingCheckpoint(tmp_path / "ckpt")
    ckpt.attach(first)
    ckpt.track("best_weights", selection.state)
    kept = [_epoch(first, selection, e, v) for e, v in enumerate([0.5, 0.3, 0.4])][1]
    ckpt.save(3, 0)
    assert not first.stop_training

    second = _model()  # a new process: other weights, empty selection
    again = BestWeights(second, "val_loss", patience=2)
    assert again.best_epoch is None
    ckpt2 = TrainingCheckpoint(tmp_path / "ckpt")
    ckpt2.attach(second)
    ckpt2.track("best_weights", again.state)
    assert ckpt2.restore().epoch == 3
    assert again.best_epoch == 2 and again.best == pytest.approx(0.3)
    second.stop_training = False
    _epoch(second, again, 3, 0.45)
    assert second.stop_training  # two epochs without improvement: one before the restart
    again.on_train_end()
    for got, want in zip(second.get_weights(), kept, strict=True):
        np.testing.assert_array_equal(got, want)


def test_monitor_and_its_errors():
    assert monitor_mode("val_loss") == "min" and monitor_mode("val_bleu") == "max"
    model = _model()
    selection = BestWeights(model, "val_bleu")
    selection.on_epoch_end(0, {"loss": 1.0})  # no validation this epoch: skipped
    with pytest.raises(ConfigError, match=r"'val_bleu' is not an epoch log.*Accepted: val_loss"):
        selection.on_epoch_end(1, {"loss": 1.0, "val_loss": 0.5})
    with pytest.raises(ConfigError, match="train.select_best"):
        load_config("lenet5-digits", ["train.select_best=loss"])


@pytest.mark.slow
@pytest.mark.integration
def test_kill_9_and_resume_select_the_same_epoch(tmp_path, tfds_dir):
    """``lenet5-digits`` as shipped with ``train.select_best=val_loss`` (2 epochs of 44
    steps, a checkpoint every 10): killed after its first mid-epoch checkpoint of epoch 2
    (the selection of epoch 1 saved with it), then resumed."""
    from mlflow import MlflowClient

    from tests.pipelines.test_resume_cli import (
        _checkpoints,
        _command,
        _kill_after_checkpoint,
        _serving_outputs,
    )

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "DEEPTRENDS_TFDS_DIR": tfds_dir}
    sets = ["train.epochs=2", "train.checkpoint_every_steps=10", "train.select_best=val_loss"]
    straight = subprocess.run(
        _command("lenet5-digits", sets, "straight.json"),
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert straight.returncode == 0, straight.stderr[-3000:]
    cmd = _command("lenet5-digits", sets, "resumed.json")
    _kill_after_checkpoint(cmd, tmp_path, env, 6)
    [ckpt_dir] = _checkpoints(tmp_path)
    position = TrainingCheckpoint.peek(ckpt_dir)
    assert position.epoch == 1 and position.step > 0, position
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(ckpt_dir)))
    saved_epoch = int(reader.get_tensor("best_weights/epoch/.ATTRIBUTES/VARIABLE_VALUE"))
    assert saved_epoch == 0  # epoch 1's selection is in the checkpoint
    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]

    a = json.loads((tmp_path / "straight.json").read_text())
    b = json.loads((tmp_path / "resumed.json").read_text())
    client = MlflowClient(uri)
    runs = [client.get_run(s["run_id"]).data.metrics for s in (a, b)]
    assert runs[0]["selected_epoch"] == runs[1]["selected_epoch"]
    assert runs[0]["selected_val_loss"] == pytest.approx(runs[1]["selected_val_loss"], rel=1e-5)
    ours, theirs = _serving_outputs(b["export_path"]), _serving_outputs(a["export_path"])
    assert max(float(np.max(np.abs(ours[k] - theirs[k]))) for k in ours) <= 1e-5
