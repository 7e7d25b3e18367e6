"""The variational auto-encoder (Kingma & Welling 2014, "Auto-Encoding Variational Bayes";
Rezende, Mohamed & Wierstra 2014).

A convolutional encoder gives the mean and log-variance of a diagonal Gaussian
``q(z|x)``; a transposed-convolution decoder gives the parameters of ``p(x|z)``: Bernoulli
logits, or the mean of a Gaussian with one learned log-scale per pixel. The
reparameterisation ``z = mu + sigma * eps`` and the ELBO are the training algorithm's
(``pipelines/trainers/elbo.py``); this file holds the networks and the
likelihood in keras.ops.

``vae`` returns a model ``images -> [z_mean, z_log_var, decoded]`` whose nested
``encoder`` (images -> [z_mean, z_log_var]) and ``decoder`` (latents -> logits or
means) are reachable with ``get_layer``; the decoded output is of the posterior mean.
"""

from __future__ import annotations

import math

import keras
from keras import ops

from models.checks import check_choice, check_image_shape, check_positive_int, check_positive_ints
from models.registry import register_model

LIKELIHOODS = ("bernoulli", "gaussian")


@keras.saving.register_keras_serializable(package="deeptrends")
class PixelLogScale(keras.layers.Layer):
    """Passes its input through and owns a learned log standard deviation per pixel,
    for the Gaussian likelihood (initialised at ``log(0.1)``)."""

    def build(self, input_shape):
        self.log_scale = self.add_weight(
            name="log_scale",
            shape=tuple(input_shape[1:]),
            initializer=keras.initializers.Constant(math.log(0.1)),
        )

    def call(self, inputs):
        return inputs

    def compute_output_shape(self, input_shape):
        return input_shape


def log_likelihood(decoder, x, decoded):
    """``log p(x|z)`` per example [B] for the decoder's likelihood: Bernoulli with
    ``decoded`` logits, or Gaussian with mean ``decoded`` and the decoder's per-pixel
    log-scale."""
    axes = tuple(range(1, len(x.shape)))
    scale_layer = next((la for la in decoder.layers if isinstance(la, PixelLogScale)), None)
    if scale_layer is None:  # Bernoulli: -softplus(-l)*x - softplus(l)*(1-x)
        ll = x * decoded - ops.softplus(decoded)
    else:
        log_s = scale_layer.log_scale
        ll = -0.5 * ops.square((x - decoded) / ops.exp(log_s)) - log_s - 0.5 * math.log(2 * math.pi)
    return ops.sum(ll, axis=axes)


def decoder_mean(decoder, decoded):
    """The mean image of ``p(x|z)``: sigmoid of Bernoulli logits, or the Gaussian mean
    clipped to [0, 1]."""
    if any(isinstance(la, PixelLogScale) for la in decoder.layers):
        return ops.clip(decoded, 0.0, 1.0)
    return ops.sigmoid(decoded)


def _conv_encoder(shape, filters, latent_dim, name):
    inputs = keras.Input(shape=shape, name="images")
    x = inputs
    for i, f in enumerate(filters, start=1):
        x = keras.layers.Conv2D(
            f, 3, strides=2, padding="same", activation="relu", name=f"{name}_conv{i}"
        )(x)
    x = keras.layers.Flatten(name=f"{name}_flatten")(x)
    # The posterior's parameters in float32 under mixed precision (the ELBO's inputs).
    z_mean = keras.layers.Dense(latent_dim, dtype="float32", name="z_mean")(x)
    z_log_var = keras.layers.Dense(latent_dim, dtype="float32", name="z_log_var")(x)
    return keras.Model(inputs, [z_mean, z_log_var], name=name)


def _conv_decoder(shape, filters, latent_dim, likelihood, name):
    h, w, c = shape
    steps = len(filters)
    base_h, base_w = h // 2**steps, w // 2**steps
    z = keras.Input(shape=(latent_dim,), name="latents")
    x = keras.layers.Dense(base_h * base_w * filters[-1], activation="relu", name=f"{name}_dense")(
        z
    )
    x = keras.layers.Reshape((base_h, base_w, filters[-1]), name=f"{name}_reshape")(x)
    for i, f in enumerate(reversed(filters), start=1):
        x = keras.layers.Conv2DTranspose(
            f, 3, strides=2, padding="same", activation="relu", name=f"{name}_deconv{i}"
        )(x)
    # The likelihood's parameters in float32 under mixed precision.
    x = keras.layers.Conv2D(c, 3, padding="same", dtype="float32", name=f"{name}_out")(x)
    if likelihood == "gaussian":
        x = PixelLogScale(dtype="float32", name=f"{name}_log_scale")(x)
    return keras.Model(z, x, name=name)


def conv_vae(
    input_shape=(28, 28, 1),
    latent_dim: int = 16,
    filters=(32, 64),
    likelihood: str = "bernoulli",
    name: str = "vae",
):
    """Build the convolutional VAE.

    Args:
        input_shape: tuple. Image shape (H, W, C); H and W must be divisible by
            ``2 ** len(filters)``.
        latent_dim: int. The dimension of z.
        filters: list of int. Channels of the stride-2 encoder convolutions (mirrored by
            the decoder's transposed convolutions).
        likelihood: str. ``bernoulli`` (binarised pixels, decoder outputs logits) or
            ``gaussian`` (decoder outputs means; per-pixel learned scale).
        name: str. The model name.
    """
    check_choice("likelihood", likelihood, LIKELIHOODS)
    check_positive_int("latent_dim", latent_dim)
    filters = check_positive_ints("filters", filters)
    shape = check_image_shape(input_shape, divisor=2 ** len(filters))
    encoder = _conv_encoder(shape, filters, latent_dim, "encoder")
    decoder = _conv_decoder(shape, filters, latent_dim, likelihood, "decoder")
    inputs = keras.Input(shape=shape, name="images")
    z_mean, z_log_var = encoder(inputs)
    decoded = decoder(z_mean)
    return keras.Model(inputs, [z_mean, z_log_var, decoded], name=name)


@register_model("vae", task="generation", family="vae")
def vae(**kwargs):
    return conv_vae(**kwargs)
