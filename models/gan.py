"""Generative adversarial networks: the MLP GAN of Goodfellow et al. 2014 ("Generative
Adversarial Nets") and the DCGAN of Radford, Metz & Chintala 2015 ("Unsupervised
Representation Learning with Deep Convolutional Generative Adversarial Networks").

Each builder returns one model ``latents -> [images, logits]`` that nests the two
players: ``get_layer("generator")`` (latents -> images in [-1, 1], tanh) and
``get_layer("discriminator")`` (images -> one real/fake logit). The minimax game
(non-saturating generator loss) is the training algorithm of the generation task.

DCGAN's guidelines, as in the paper: strided convolutions instead of pooling (fractionally
strided in G), batch norm in both nets except G's output and D's input layer, no fully
connected hidden layers beyond the projection of z, ReLU in G with tanh output, LeakyReLU 0.2
in D; weights from N(0, 0.02).
"""

from __future__ import annotations

import keras

from models.checks import check_dropout, check_image_shape, check_positive_int, check_positive_ints
from models.layers import FusedBatchNormalization
from models.registry import register_model

_DCGAN_INIT = keras.initializers.RandomNormal(stddev=0.02)


def _two_players(generator, discriminator, latent_dim: int, name: str):
    z = keras.Input(shape=(latent_dim,), name="latents")
    images = generator(z)
    logits = discriminator(images)
    return keras.Model(z, [images, logits], name=name)


# ---------------------------------------------------------------- MLP GAN (2014)


def mlp_generator(shape, latent_dim, units, name="generator"):
    z = keras.Input(shape=(latent_dim,), name="latents")
    x = z
    for i, u in enumerate(units, start=1):
        x = keras.layers.Dense(u, name=f"{name}_dense{i}")(x)
        x = keras.layers.LeakyReLU(0.2, name=f"{name}_act{i}")(x)
    size = shape[0] * shape[1] * shape[2]
    # The images in float32 under mixed precision, as DCGAN's (the discriminator's input).
    x = keras.layers.Dense(size, activation="tanh", dtype="float32", name=f"{name}_out")(x)
    x = keras.layers.Reshape(shape, dtype="float32", name=f"{name}_reshape")(x)
    return keras.Model(z, x, name=name)


def mlp_discriminator(shape, units, dropout, name="discriminator"):
    images = keras.Input(shape=shape, name="images")
    x = keras.layers.Flatten(name=f"{name}_flatten")(images)
    for i, u in enumerate(units, start=1):
        x = keras.layers.Dense(u, name=f"{name}_dense{i}")(x)
        x = keras.layers.LeakyReLU(0.2, name=f"{name}_act{i}")(x)
        if dropout:
            x = keras.layers.Dropout(dropout, name=f"{name}_dropout{i}")(x)
    logits = keras.layers.Dense(1, dtype="float32", name=f"{name}_logit")(x)
    return keras.Model(images, logits, name=name)


def mlp_gan(
    input_shape=(28, 28, 1),
    latent_dim: int = 100,
    generator_units=(256, 512, 1024),
    discriminator_units=(512, 256),
    dropout: float = 0.3,
    name: str = "gan",
):
    """The fully connected GAN of Goodfellow et al. 2014 (LeakyReLU hidden units in place
    of the paper's maxout discriminator; dropout in D as in the paper).

    Args:
        input_shape: tuple. Image shape (H, W, C).
        latent_dim: int. The dimension of the generator's input noise z.
        generator_units: list of int. Hidden widths of G.
        discriminator_units: list of int. Hidden widths of D.
        dropout: float. Dropout rate after each hidden layer of D.
        name: str. The model name.
    """
    shape = check_image_shape(input_shape)
    check_positive_int("latent_dim", latent_dim)
    check_dropout(dropout)
    g = mlp_generator(shape, latent_dim, check_positive_ints("generator_units", generator_units))
    d = mlp_discriminator(
        shape, check_positive_ints("discriminator_units", discriminator_units), dropout
    )
    return _two_players(g, d, latent_dim, name)


# ---------------------------------------------------------------- DCGAN (2015)


def dcgan_generator(shape, latent_dim, filters, kernel_size, name="generator"):
    h, w, c = shape
    steps = len(filters)
    base_h, base_w = h // 2**steps, w // 2**steps
    z = keras.Input(shape=(latent_dim,), name="latents")
    x = keras.layers.Dense(
        base_h * base_w * filters[0],
        use_bias=False,
        kernel_initializer=_DCGAN_INIT,
        name=f"{name}_project",
    )(z)
    x = keras.layers.Reshape((base_h, base_w, filters[0]), name=f"{name}_reshape")(x)
    x = FusedBatchNormalization(name=f"{name}_project_bn")(x)
    x = keras.layers.ReLU(name=f"{name}_project_act")(x)
    for i, f in enumerate(filters[1:], start=1):
        x = keras.layers.Conv2DTranspose(
            f,
            kernel_size,
            strides=2,
            padding="same",
            use_bias=False,
            kernel_initializer=_DCGAN_INIT,
            name=f"{name}_deconv{i}",
        )(x)
        x = FusedBatchNormalization(name=f"{name}_deconv{i}_bn")(x)
        x = keras.layers.ReLU(name=f"{name}_deconv{i}_act")(x)
    x = keras.layers.Conv2DTranspose(
        c,
        kernel_size,
        strides=2,
        padding="same",
        kernel_initializer=_DCGAN_INIT,
        name=f"{name}_out",
    )(x)
    x = keras.layers.Activation("tanh", dtype="float32", name=f"{name}_tanh")(x)
    return keras.Model(z, x, name=name)


def dcgan_discriminator(shape, filters, kernel_size, name="discriminator"):
    images = keras.Input(shape=shape, name="images")
    x = images
    for i, f in enumerate(reversed(filters), start=1):
        x = keras.layers.Conv2D(
            f,
            kernel_size,
            strides=2,
            padding="same",
            use_bias=i == 1,
            kernel_initializer=_DCGAN_INIT,
            name=f"{name}_conv{i}",
        )(x)
        if i > 1:  # no batch norm on the discriminator's input layer
            x = FusedBatchNormalization(name=f"{name}_conv{i}_bn")(x)
        x = keras.layers.LeakyReLU(0.2, name=f"{name}_conv{i}_act")(x)
    x = keras.layers.Flatten(name=f"{name}_flatten")(x)
    logits = keras.layers.Dense(
        1, dtype="float32", kernel_initializer=_DCGAN_INIT, name=f"{name}_logit"
    )(x)
    return keras.Model(images, logits, name=name)


def deep_conv_gan(
    input_shape=(28, 28, 1),
    latent_dim: int = 100,
    filters=(128, 64),
    kernel_size: int = 5,
    name: str = "dcgan",
):
    """The DCGAN, sized by ``filters``: G projects z to a (H / 2^n) x (W / 2^n) x
    ``filters[0]`` map and doubles its size n = len(filters) times (the last to the image);
    D mirrors it with stride-2 convolutions.

    Args:
        input_shape: tuple. Image shape (H, W, C); H and W divisible by ``2 ** len(filters)``.
        latent_dim: int. The dimension of z (100 in the paper).
        filters: list of int. Channels of G's projected map and its hidden transposed
            convolutions, widest first (the paper's 1024-512-256-128 at 64x64).
        kernel_size: int. Kernel side of every (transposed) convolution (5 in the paper).
        name: str. The model name.
    """
    filters = check_positive_ints("filters", filters)
    shape = check_image_shape(input_shape, divisor=2 ** len(filters))
    check_positive_int("latent_dim", latent_dim)
    check_positive_int("kernel_size", kernel_size)
    g = dcgan_generator(shape, latent_dim, filters, kernel_size)
    d = dcgan_discriminator(shape, filters, kernel_size)
    return _two_players(g, d, latent_dim, name)


@register_model("gan", task="generation", family="gan")
def gan(**kwargs):
    return mlp_gan(**kwargs)


@register_model("dcgan", task="generation", family="gan")
def dcgan(**kwargs):
    return deep_conv_gan(**kwargs)
