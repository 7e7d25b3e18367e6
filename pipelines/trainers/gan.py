"""The adversarial game of the GAN and DCGAN.

``GANTrainer``: one discriminator step then one generator step per batch, with the
non-saturating generator loss ``-log D(G(z))`` (Goodfellow et al. 2014, section 3);
DCGAN uses it with Adam 2e-4, beta1 0.5 (Radford et al. 2015). Each player has its own
optimizer. No likelihood: the task scores the samples (Fréchet distance).
"""

from __future__ import annotations

from typing import ClassVar

import keras
import numpy as np
import tensorflow as tf

from pipelines.trainers.base import LatentTrainer, images_of


class GANTrainer(LatentTrainer):
    """One discriminator and one generator update per batch. Images are scaled to
    [-1, 1] for the tanh generator. ``label_smoothing`` softens the real labels
    (one-sided, Salimans et al. 2016); 0 is the paper's game."""

    tracked: ClassVar[tuple[str, ...]] = ("loss", "d_loss", "g_loss", "d_real", "d_fake")

    def __init__(self, network, label_smoothing: float = 0.0, seed: int = 0):
        super().__init__(network, seed)
        self.generator = network.get_layer("generator")
        self.discriminator = network.get_layer("discriminator")
        self.latent_dim = int(self.generator.input_shape[-1])
        self.label_smoothing = label_smoothing

    @classmethod
    def for_config(cls, network, config, options) -> GANTrainer:
        return cls(network, label_smoothing=config.train.label_smoothing, seed=config.runtime.seed)

    # -- training ---------------------------------------------------------------------------
    def compile_for(self, train, steps_per_epoch: int, images: np.ndarray, jit_compile: bool):
        """The discriminator's and the generator's optimizers, both from ``train``."""
        from pipelines.optim import build_optimizer

        self.compile(
            build_optimizer(train, steps_per_epoch),
            build_optimizer(train, steps_per_epoch),
            jit_compile=jit_compile,
        )

    def compile(self, d_optimizer, g_optimizer, **kwargs):
        super().compile(**kwargs)
        self.d_optimizer = d_optimizer
        self.g_optimizer = g_optimizer

    def build_optimizers(self) -> None:
        """Create both players' optimizer slots up front (in the strategy's scope)."""
        players = ((self.d_optimizer, self.discriminator), (self.g_optimizer, self.generator))
        for optimizer, player in players:
            if not optimizer.built:
                optimizer.build(player.trainable_variables)

    def _bce(self, target, logits):
        return tf.reduce_mean(
            tf.nn.sigmoid_cross_entropy_with_logits(tf.fill(tf.shape(logits), target), logits)
        )

    def losses_of(self, x, training: bool) -> dict:
        real = tf.cast(x, tf.float32) * 2.0 - 1.0
        z = keras.random.normal((tf.shape(real)[0], self.latent_dim), seed=self.seed_generator)
        fake = self.generator(z, training=training)
        d_real = self.discriminator(real, training=training)
        d_fake = self.discriminator(fake, training=training)
        d_loss = self._bce(1.0 - self.label_smoothing, d_real) + self._bce(0.0, d_fake)
        g_loss = self._bce(1.0, d_fake)
        return {
            "loss": d_loss + g_loss,
            "d_loss": d_loss,
            "g_loss": g_loss,
            "d_real": tf.reduce_mean(tf.sigmoid(d_real)),
            "d_fake": tf.reduce_mean(tf.sigmoid(d_fake)),
        }

    def train_step(self, data):
        real = tf.cast(images_of(data), tf.float32) * 2.0 - 1.0
        batch = tf.shape(real)[0]
        z = keras.random.normal((batch, self.latent_dim), seed=self.seed_generator)
        with tf.GradientTape() as tape:
            fake = self.generator(z, training=True)
            d_real = self.discriminator(real, training=True)
            d_fake = self.discriminator(fake, training=True)
            d_loss = self._bce(1.0 - self.label_smoothing, d_real) + self._bce(0.0, d_fake)
        d_vars = self.discriminator.trainable_variables
        self.d_optimizer.apply_gradients(zip(tape.gradient(d_loss, d_vars), d_vars, strict=True))
        z = keras.random.normal((batch, self.latent_dim), seed=self.seed_generator)
        with tf.GradientTape() as tape:
            g_logits = self.discriminator(self.generator(z, training=True), training=True)
            g_loss = self._bce(1.0, g_logits)  # non-saturating: maximise log D(G(z))
        g_vars = self.generator.trainable_variables
        self.g_optimizer.apply_gradients(zip(tape.gradient(g_loss, g_vars), g_vars, strict=True))
        return self._update(
            {
                "loss": d_loss + g_loss,
                "d_loss": d_loss,
                "g_loss": g_loss,
                "d_real": tf.reduce_mean(tf.sigmoid(d_real)),
                "d_fake": tf.reduce_mean(tf.sigmoid(d_fake)),
            }
        )

    # -- latents ----------------------------------------------------------------------------
    def latent_shape(self) -> tuple[int, ...]:
        return (self.latent_dim,)

    def decode(self, latents, all_steps: bool = False):
        """The generator's tanh output rescaled from [-1, 1] to [0, 1]."""
        return (self.generator(latents, training=False) + 1.0) / 2.0
