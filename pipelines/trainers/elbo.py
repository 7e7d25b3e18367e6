"""Variational training: the evidence lower bound (ELBO) of the VAE and of DRAW.

- ``VAETrainer``: the negative ELBO ``-E_q[log p(x|z)] + KL(q(z|x) || N(0, I))`` with the
  reparameterisation trick (Kingma & Welling 2014), one posterior sample per image.
- ``DRAWTrainer``: DRAW's loss ``L^x + L^z`` (Gregor et al. 2015, eq. 9-12): Bernoulli
  ``-log p(x|c_T)`` plus the KL of every step.

Both minimise ``loss`` with one optimizer over the whole network, report the ELBO and
the importance-weighted bound in nats (``pipelines.evaluation.likelihood``) from their
``log_weights``, and decode standard-normal latents into images.
"""

from __future__ import annotations

import math
from typing import ClassVar

import keras
import numpy as np
import tensorflow as tf

from models.vae import decoder_mean, log_likelihood
from pipelines.config import ConfigError
from pipelines.tasks.base import Endpoint
from pipelines.trainers.base import LatentTrainer, image_outputs, images_of

LOG_2PI = math.log(2.0 * math.pi)


def gaussian_log_prob(z, mean, log_std, axes):
    return tf.reduce_sum(
        -0.5 * tf.square((z - mean) * tf.exp(-log_std)) - log_std - 0.5 * LOG_2PI, axis=axes
    )


class ELBOTrainer(LatentTrainer):
    """One optimizer over the whole network minimising ``loss``, the negative ELBO.
    Subclasses define ``losses_of`` and ``log_weights(x, k, seed)`` [k, B]."""

    tracked: ClassVar[tuple[str, ...]] = ("loss", "reconstruction", "kl")
    likelihood_metric_names: ClassVar[tuple[str, ...]] = ("neg_elbo", "iw_neg_elbo")
    restore_best_weights: ClassVar[bool] = True

    def train_step(self, data):
        x = images_of(data)
        with tf.GradientTape() as tape:
            values = self.losses_of(x, training=True)
        variables = self.network.trainable_variables
        self.optimizer.apply_gradients(
            zip(tape.gradient(values["loss"], variables), variables, strict=True)
        )
        return self._update(values)

    def log_weights(self, x, k: int, seed: int = 0):
        """``log p(x|z) + log p(z) - log q(z|x)`` for ``k`` posterior samples [k, B]."""
        raise NotImplementedError

    def likelihood_metrics(self, images: np.ndarray, options, seed: int = 0) -> dict[str, float]:
        """``neg_elbo`` and ``iw_neg_elbo`` with ``task_options.iw_samples`` samples."""
        from pipelines.evaluation.likelihood import importance_weighted_bounds

        return importance_weighted_bounds(
            self.log_weights, images, options.iw_samples, options.eval_batch
        )


# ------------------------------------------------------------------------------- VAE


class VAETrainer(ELBOTrainer):
    """Negative ELBO ``-E_q[log p(x|z)] + KL(q(z|x) || N(0, I))`` in nats per image,
    one reparameterised sample per image; ``encode`` and ``decode`` signatures."""

    def __init__(self, network, seed: int = 0):
        super().__init__(network, seed)
        self.encoder = network.get_layer("encoder")
        self.decoder = network.get_layer("decoder")

    @classmethod
    def check(cls, config, options) -> None:
        likelihood = config.model.kwargs().get("likelihood", "bernoulli")
        if likelihood == "gaussian" and options.binarize is not None:
            raise ConfigError(
                "task_options.binarize: a Gaussian likelihood (model.likelihood: gaussian) "
                f"needs grey pixels, but binarize is {options.binarize}; "
                "set task_options.binarize: null."
            )

    def losses_of(self, x, training: bool) -> dict:
        mean, log_var = self.encoder(x, training=training)
        eps = keras.random.normal(tf.shape(mean), seed=self.seed_generator)
        z = mean + tf.exp(0.5 * log_var) * eps
        rec = -log_likelihood(self.decoder, x, self.decoder(z, training=training))
        kl = 0.5 * tf.reduce_sum(tf.exp(log_var) + tf.square(mean) - 1.0 - log_var, axis=-1)
        return {
            "loss": tf.reduce_mean(rec + kl),
            "reconstruction": tf.reduce_mean(rec),
            "kl": tf.reduce_mean(kl),
        }

    def log_weights(self, x, k: int, seed: int = 0):
        mean, log_var = self.encoder(x, training=False)
        log_std = 0.5 * log_var
        out = []
        for i in range(k):
            z = mean + tf.exp(log_std) * tf.random.stateless_normal(tf.shape(mean), [seed, i])
            ll = log_likelihood(self.decoder, x, self.decoder(z, training=False))
            out.append(
                ll + gaussian_log_prob(z, 0.0, 0.0, -1) - gaussian_log_prob(z, mean, log_std, -1)
            )
        return tf.stack(out)

    # -- latents ----------------------------------------------------------------------------
    def latent_shape(self) -> tuple[int, ...]:
        return (int(self.decoder.input_shape[-1]),)

    def decode(self, latents, all_steps: bool = False):
        """The decoder's mean image of ``p(x|z)``."""
        return decoder_mean(self.decoder, self.decoder(latents, training=False))

    def encode(self, images):
        mean, log_var = self.encoder(images, training=False)
        return {"z_mean": mean, "z_log_var": log_var}

    def reconstruct(self, images: np.ndarray) -> np.ndarray:
        return self._decode_numpy(self.encode(images)["z_mean"])

    def arithmetic_groups(self, test_images, test_labels, sample_labels):
        """The posterior means of encoded test images, grouped by their labels."""
        latents = np.asarray(self.encode(test_images[:2000])["z_mean"])
        return latents, test_labels[: len(latents)], "labels of encoded test images"

    def endpoints(self, check_images: np.ndarray | None = None) -> list[Endpoint]:
        h, w, c = (int(d) for d in self.network.input_shape[1:])
        images_spec = tf.TensorSpec([None, h, w, c], tf.float32, name="images")
        if check_images is not None:
            images = np.asarray(check_images, np.float32)[:4]
        else:
            images = np.random.default_rng(0).uniform(size=(4, h, w, c)).astype(np.float32)
        generate, from_latents = super().endpoints(check_images)
        decode = Endpoint(
            "decode", self.generated, from_latents.input_signature, from_latents.check_inputs
        )
        return [
            generate,
            from_latents,
            Endpoint("encode", self.encode, [images_spec], [images]),
            decode,
        ]


# ------------------------------------------------------------------------------ DRAW


class DRAWTrainer(ELBOTrainer):
    """DRAW's negative ELBO: Bernoulli ``-log p(x|c_T)`` plus the KL of every step; its
    signatures also return every step's canvas, and its artifacts an animated GIF."""

    def __init__(self, network, seed: int = 0):
        super().__init__(network, seed)
        self.core = network.get_layer("draw_core")

    def _forward(self, x, noise, training):
        canvases, mean, log_sigma = self.network([x, noise], training=training)
        logits = canvases[:, -1]
        ll = tf.reduce_sum(x * logits - tf.nn.softplus(logits), axis=[1, 2, 3])
        return ll, mean, log_sigma

    def noise(self, batch):
        return keras.random.normal(
            (batch, self.core.steps, self.core.latent_dim), seed=self.seed_generator
        )

    def losses_of(self, x, training: bool) -> dict:
        x = tf.cast(x, tf.float32)
        ll, mean, log_sigma = self._forward(x, self.noise(tf.shape(x)[0]), training)
        kl = tf.reduce_sum(
            0.5 * (tf.square(mean) + tf.exp(2.0 * log_sigma) - 2.0 * log_sigma - 1.0), axis=[1, 2]
        )
        return {
            "loss": tf.reduce_mean(kl - ll),
            "reconstruction": tf.reduce_mean(-ll),
            "kl": tf.reduce_mean(kl),
        }

    def log_weights(self, x, k: int, seed: int = 0):
        x = tf.cast(x, tf.float32)
        out = []
        for i in range(k):
            eps = tf.random.stateless_normal(
                (tf.shape(x)[0], self.core.steps, self.core.latent_dim), [seed, i]
            )
            ll, mean, log_sigma = self._forward(x, eps, False)
            z = mean + tf.exp(log_sigma) * eps
            out.append(
                ll
                + gaussian_log_prob(z, 0.0, 0.0, [1, 2])
                - gaussian_log_prob(z, mean, log_sigma, [1, 2])
            )
        return tf.stack(out)

    # -- latents ----------------------------------------------------------------------------
    def latent_shape(self) -> tuple[int, ...]:
        return (self.core.steps, self.core.latent_dim)

    def decode(self, latents, all_steps: bool = False):
        """The last canvas through a sigmoid (every step's canvas with ``all_steps``)."""
        canvases = tf.sigmoid(self.core.generate(latents))
        return canvases if all_steps else canvases[:, -1]

    def generated(self, latents) -> dict:
        canvases = self.decode(latents, all_steps=True)
        return image_outputs(canvases[:, -1], canvases)

    def reconstruct(self, images: np.ndarray) -> np.ndarray:
        """The last canvas of the images read with zero posterior noise."""
        noise = np.zeros((len(images), *self.latent_shape()), np.float32)
        return tf.sigmoid(self.network([images, noise], training=False)[0][:, -1]).numpy()

    def artifacts(self, test_images, test_labels, sample_labels, arithmetic) -> list:
        return [
            *super().artifacts(test_images, test_labels, sample_labels, arithmetic),
            self._write_canvas_gif,
        ]

    def _write_canvas_gif(self, out_dir) -> None:
        from pipelines.evaluation import sample_quality as ev
        from pipelines.trainers.base import latents_from_seeds

        z = latents_from_seeds(tf.range(0, 16, dtype=tf.int64), self.latent_shape())
        canvases = np.asarray(self.decode(z, all_steps=True))
        ev.save_canvas_gif(canvases, out_dir / "canvas.gif", columns=8, scale=2)
