"""``train.steps_per_execution``: N steps in one ``tf.function`` call give the weights of one
step per call; callbacks see one batch per execution; executions end at every step
checkpoint, so a crash after one resumes exactly, and SIGTERM checkpoints at an
execution's end. (Speed itself is measured in ``benchmarks/bench_loop.py``.)"""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from pipelines import loop  # noqa: E402
from tests.pipelines.test_resume_loop import (  # noqa: E402
    EPOCHS,
    EVERY,
    STEPS,
    _classifier,
    _Crash,
    _data,
    _noisy_pair,
)

SPE = 3  # STEPS = 6, EVERY = 4: executions [0, 3) [3, 4) [4, 6): one ends at the checkpoint


class _Batches(keras.callbacks.Callback):
    """Records (epoch, first, last) of every execution; crashes or sends SIGTERM after
    the execution that ends at ``at`` = (epoch, last batch index)."""

    def __init__(self, at=None, sigterm: bool = False):
        super().__init__()
        self.seen, self.epoch, self.begin, self.at, self.sigterm = [], 0, None, at, sigterm

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        self.begin = batch

    def on_train_batch_end(self, batch, logs=None):
        self.seen.append((self.epoch, self.begin, batch))
        if (self.epoch, batch) == self.at:
            if self.sigterm:
                import os
                import signal

                os.kill(os.getpid(), signal.SIGTERM)
            else:
                raise _Crash(f"crashed at epoch {self.epoch} batch {batch}")


def _train(build, directory, spe: int, callback=None, resume: bool = False, strategy=None):
    strategy = strategy or tf.distribute.get_strategy()
    keras.utils.set_random_seed(11)
    with strategy.scope():
        model = build()
        checkpoint = loop.TrainingCheckpoint(directory, every_n_steps=EVERY)
        checkpoint.attach(model)
        start = checkpoint.restore() if resume else loop.Position()
    history = loop.fit(
        model,
        strategy,
        _data().skip(start.epoch * STEPS + start.step),
        epochs=EPOCHS,
        steps_per_epoch=STEPS,
        checkpoint=checkpoint,
        start=start,
        verbose=0,
        callbacks=[callback] if callback else [],
        steps_per_execution=spe,
    )
    return model, start, history


def _max_diff(a, b) -> float:
    return max(
        float(np.max(np.abs(x - y))) for x, y in zip(a.get_weights(), b.get_weights(), strict=True)
    )


@pytest.mark.parametrize(
    "build", [_classifier, _noisy_pair], ids=["dropout-classifier", "gan-rbm-trainer"]
)
def test_n_steps_per_execution_give_the_weights_of_one(tmp_path, build):
    one, _, one_history = _train(build, tmp_path / "one", spe=1)
    batches = _Batches()
    many, _, many_history = _train(build, tmp_path / "many", spe=SPE, callback=batches)

    assert _max_diff(one, many) <= 1e-6
    assert many_history["loss"] == pytest.approx(one_history["loss"], abs=1e-6)
    # callbacks once per execution, Keras' (first, last) batch indices; the step
    # checkpoint after step 4 cuts the second execution short
    assert batches.seen[:3] == [(0, 0, 2), (0, 3, 3), (0, 4, 5)]
    assert len(batches.seen) == 3 * EPOCHS


def test_n_steps_per_execution_under_mirrored(tmp_path):
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    one, _, _ = _train(_classifier, tmp_path / "one", spe=1, strategy=strategy)
    many, _, _ = _train(_classifier, tmp_path / "many", spe=SPE, strategy=strategy)
    assert _max_diff(one, many) <= 1e-6


def test_a_step_checkpoint_ends_an_execution_and_resumes_exactly(tmp_path):
    straight, _, straight_history = _train(_classifier, tmp_path / "straight", spe=SPE)
    with pytest.raises(_Crash):  # dies after step 6 of epoch 1, the last checkpoint at step 4
        _train(_classifier, tmp_path / "crashed", spe=SPE, callback=_Batches(at=(1, STEPS - 1)))
    assert loop.TrainingCheckpoint.peek(tmp_path / "crashed") == loop.Position(1, EVERY)
    resumed, start, history = _train(_classifier, tmp_path / "crashed", spe=SPE, resume=True)

    assert start == loop.Position(1, EVERY)
    assert _max_diff(resumed, straight) <= 1e-6
    assert history["loss"] == pytest.approx(straight_history["loss"][1:], abs=1e-6)


def test_sigterm_checkpoints_at_the_end_of_its_execution(tmp_path):
    straight, _, _ = _train(_classifier, tmp_path / "straight", spe=SPE)
    with pytest.raises(loop.Preempted, match="epoch 1 step 3"):
        _train(_classifier, tmp_path / "cut", spe=SPE, callback=_Batches(at=(0, 2), sigterm=True))
    resumed, start, _ = _train(_classifier, tmp_path / "cut", spe=SPE, resume=True)

    assert start == loop.Position(0, 3)
    assert _max_diff(resumed, straight) <= 1e-6


def test_steps_per_execution_must_be_positive():
    model = _classifier()
    with pytest.raises(ValueError, match="steps_per_execution must be >= 1"):
        loop.fit(
            model,
            tf.distribute.get_strategy(),
            _data(),
            epochs=1,
            steps_per_epoch=STEPS,
            verbose=0,
            steps_per_execution=0,
        )


def test_xla_stays_on_one_device_and_is_off_over_virtual_cpus(caplog):
    """``runtime.jit_compile``: kept on one device (the default strategy) and on one device
    per worker; off, with one warning per strategy, where a strategy mirrors the step over
    several CPU devices of a process (XLA cannot compile it there; the end-to-end case is
    ``claim-long-dependencies`` in ``test_distribution``'s mirrored families)."""
    assert loop._xla_usable(tf.distribute.get_strategy(), True)
    assert not loop._xla_usable(tf.distribute.get_strategy(), False)

    class _Extended:
        def __init__(self, devices):
            self.worker_devices = devices

    class _Mirrored:
        def __init__(self, devices):
            self.extended = _Extended(devices)

    cpu = "/job:localhost/replica:0/task:0/device:CPU:{}"
    two_cpus = _Mirrored((cpu.format(0), cpu.format(1)))
    with caplog.at_level("WARNING", logger="pipelines.loop"):
        assert not loop._xla_usable(two_cpus, True)
        assert not loop._xla_usable(two_cpus, True)
    warned = [r for r in caplog.records if "jit_compile" in r.getMessage()]
    assert len(warned) == 1 and "2 CPU devices" in warned[0].getMessage()
    gpu = "/job:localhost/replica:0/task:0/device:GPU:{}"
    assert loop._xla_usable(_Mirrored((gpu.format(0), gpu.format(1))), True)
    assert loop._xla_usable(_Mirrored((cpu.format(0),)), True)
