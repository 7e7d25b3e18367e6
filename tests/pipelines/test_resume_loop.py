"""Exact resumption at the level of the shared loop: train, crash mid-epoch some steps
after a checkpoint, rebuild the model from scratch, restore, continue; the weights (and
the resumed epoch's logged averages) equal those of a run that never stopped.

Two models cover the random state a step moves: a classifier with Dropout and
BatchNorm (one Keras optimizer, compiled metrics), and a trainer with its own
``train_step`` that draws GAN-like noise and RBM-like Bernoulli samples from its own
``keras.random.SeedGenerator`` and updates two optimizers and a persistent chain."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from pipelines import loop  # noqa: E402

EPOCHS, STEPS, EVERY, BATCH = 3, 6, 4, 16
CRASH_AT = (1, 5)  # (epoch, batch index): two steps after the checkpoint at epoch 1 step 4


class _Crash(RuntimeError):
    pass


class _CrashAt(keras.callbacks.Callback):
    """Stands in for ``kill -9``: training dies between two checkpoints (or, with
    ``sigterm``, is preempted there: the loop checkpoints and raises ``Preempted``)."""

    def __init__(self, epoch: int, batch: int, sigterm: bool = False):
        super().__init__()
        self.at, self.epoch, self.sigterm = (epoch, batch), 0, sigterm

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (self.epoch, batch) == self.at:
            if self.sigterm:
                os.kill(os.getpid(), signal.SIGTERM)
            else:
                raise _Crash(f"crashed at epoch {self.epoch} batch {batch}")


def _data(features: int = 12):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(STEPS * BATCH, features)).astype("float32")
    y = rng.integers(0, 3, size=STEPS * BATCH).astype("int64")

    def epoch(e):  # a new order every epoch, keyed by the epoch: the same stream on a rerun
        ds = tf.data.Dataset.from_tensor_slices((x, y))
        return ds.shuffle(len(x), seed=e + 1, reshuffle_each_iteration=False).batch(
            BATCH, drop_remainder=True
        )

    return tf.data.Dataset.range(2**31).flat_map(epoch)


def _classifier():
    inputs = keras.Input((12,))
    h = keras.layers.Dense(32, activation="relu")(inputs)
    h = keras.layers.Dropout(0.5)(h)
    h = keras.layers.BatchNormalization()(h)
    outputs = keras.layers.Dense(3, activation="softmax")(h)
    model = keras.Model(inputs, outputs)
    model.compile(
        keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy", metrics=["accuracy"]
    )
    return model


class _NoisyPair(keras.Model):
    """GAN-like and RBM-like at once: a generator fed ``keras.random.normal`` latents, a
    discriminator with dropout, Bernoulli samples with ``keras.random.uniform`` kept in a
    persistent chain, two optimizers, all random draws from the wrapper's own seed generator."""

    def __init__(self):
        super().__init__()
        self.generator = keras.Sequential(
            [keras.Input((4,)), keras.layers.Dense(12, activation="tanh")]
        )
        self.discriminator = keras.Sequential(
            [
                keras.Input((12,)),
                keras.layers.Dense(8, activation="relu"),
                keras.layers.Dropout(0.3),
                keras.layers.Dense(1),
            ]
        )
        self.seed_generator = keras.random.SeedGenerator(5)
        self.chain = self.add_weight(
            shape=(BATCH, 12), initializer="zeros", trainable=False, name="chain"
        )
        self.tracker = keras.metrics.Mean(name="loss")

    @property
    def metrics(self):
        return [self.tracker]

    def compile(self, d_optimizer, g_optimizer):
        super().compile()
        self.d_optimizer, self.g_optimizer = d_optimizer, g_optimizer

    def build_optimizers(self):
        for optimizer, player in (
            (self.d_optimizer, self.discriminator),
            (self.g_optimizer, self.generator),
        ):
            if not optimizer.built:
                optimizer.build(player.trainable_variables)

    def call(self, x, training=False):
        return self.discriminator(x, training=training)

    def train_step(self, data):
        real = data[0]
        z = keras.random.normal((BATCH, 4), seed=self.seed_generator)
        gibbs = tf.cast(
            keras.random.uniform((BATCH, 12), seed=self.seed_generator) < tf.sigmoid(real),
            tf.float32,
        )
        self.chain.assign(0.5 * self.chain + 0.5 * gibbs)
        bce = keras.losses.BinaryCrossentropy(from_logits=True)
        with tf.GradientTape() as tape:
            d_loss = bce(
                tf.ones((BATCH, 1)), self.discriminator(real + self.chain, training=True)
            ) + bce(
                tf.zeros((BATCH, 1)),
                self.discriminator(self.generator(z, training=True), training=True),
            )
        d_vars = self.discriminator.trainable_variables
        self.d_optimizer.apply_gradients(zip(tape.gradient(d_loss, d_vars), d_vars, strict=True))
        z = keras.random.normal((BATCH, 4), seed=self.seed_generator)
        with tf.GradientTape() as tape:
            g_loss = bce(
                tf.ones((BATCH, 1)),
                self.discriminator(self.generator(z, training=True), training=True),
            )
        g_vars = self.generator.trainable_variables
        self.g_optimizer.apply_gradients(zip(tape.gradient(g_loss, g_vars), g_vars, strict=True))
        self.tracker.update_state(d_loss + g_loss)
        return {"loss": self.tracker.result()}


def _noisy_pair():
    model = _NoisyPair()
    model.compile(keras.optimizers.Adam(1e-2), keras.optimizers.Adam(1e-2))
    return model


def _train(build, strategy, directory, crash=None, resume: bool = False):
    """Build afresh (as a new process would), restore when resuming, fit."""
    keras.utils.set_random_seed(11)
    with strategy.scope():
        model = build()
        checkpoint = loop.TrainingCheckpoint(directory, every_n_steps=EVERY)
        checkpoint.attach(model)
        start = checkpoint.restore() if resume else loop.Position()
    data = _data().skip(start.epoch * STEPS + start.step)
    history = loop.fit(
        model,
        strategy,
        data,
        epochs=EPOCHS,
        steps_per_epoch=STEPS,
        checkpoint=checkpoint,
        start=start,
        verbose=0,
        callbacks=[crash] if crash else [],
    )
    return model, start, history


STRATEGIES = {
    "default": lambda: tf.distribute.get_strategy(),
    "mirrored-1": lambda: tf.distribute.MirroredStrategy(["/cpu:0"]),
}


@pytest.mark.parametrize("strategy_name", sorted(STRATEGIES))
@pytest.mark.parametrize(
    "build", [_classifier, _noisy_pair], ids=["dropout-classifier", "gan-rbm-trainer"]
)
def test_crash_mid_epoch_then_resume_equals_uninterrupted(tmp_path, build, strategy_name):
    strategy = STRATEGIES[strategy_name]()
    straight, _, straight_history = _train(build, strategy, tmp_path / "straight")
    with pytest.raises(_Crash):
        _train(build, strategy, tmp_path / "crashed", crash=_CrashAt(*CRASH_AT))
    resumed, start, history = _train(build, strategy, tmp_path / "crashed", resume=True)

    assert start == loop.Position(1, 4)  # mid-epoch, two steps before the crash
    diffs = [
        float(np.max(np.abs(a - b)))
        for a, b in zip(resumed.get_weights(), straight.get_weights(), strict=True)
    ]
    assert max(diffs) <= 1e-6, diffs
    seeds = [v for v in loop.training_state(resumed) if "seed_generator_state" in v.path]
    assert seeds, "the model draws random numbers: its seed generators are part of the state"
    # the resumed epoch's average goes on from the restored sums: the curves match too
    assert history["loss"] == pytest.approx(straight_history["loss"][1:], abs=1e-6)


def test_training_state_holds_seeds_statistics_metrics_and_every_optimizer():
    model = _noisy_pair()
    loop.build_optimizers(model)
    state = {id(v) for v in loop.training_state(model)}
    assert {id(v) for v in model.variables} <= state
    assert id(model.seed_generator.state) in state and id(model.chain) in state
    assert {id(v) for v in model.tracker.variables} <= state
    for optimizer in (model.d_optimizer, model.g_optimizer):
        assert optimizer in loop.optimizers_of(model)
        assert {id(v) for v in optimizer.variables} <= state


def test_sigterm_after_an_epochs_last_step_resumes_with_that_epochs_logs(tmp_path):
    strategy = tf.distribute.get_strategy()
    straight, _, straight_history = _train(_classifier, strategy, tmp_path / "straight")
    with pytest.raises(loop.Preempted):
        _train(_classifier, strategy, tmp_path / "cut", crash=_CrashAt(1, STEPS - 1, sigterm=True))
    resumed, start, history = _train(_classifier, strategy, tmp_path / "cut", resume=True)

    assert start == loop.Position(1, STEPS)  # no step left in epoch 1: its logs are restored
    diffs = [
        float(np.max(np.abs(a - b)))
        for a, b in zip(resumed.get_weights(), straight.get_weights(), strict=True)
    ]
    assert max(diffs) <= 1e-6, diffs
    assert history["loss"] == pytest.approx(straight_history["loss"][1:], abs=1e-6)
