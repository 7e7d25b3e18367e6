"""DRAW: a recurrent variational auto-encoder that draws with attention (Gregor, Danihelka,
Graves, Rezende & Wierstra 2015, "DRAW: A Recurrent Neural Network For Image Generation").

At each of T steps (paper, eqs. 3-8):

    x_hat = x - sigmoid(c_{t-1})
    r_t   = read(x, x_hat, h_dec_{t-1})
    h_enc = LSTM_enc(h_enc_{t-1}, [r_t, h_dec_{t-1}])
    z_t   = mu(h_enc) + exp(log_sigma(h_enc)) * eps_t            (eps_t ~ N(0, I), given)
    h_dec = LSTM_dec(h_dec_{t-1}, z_t)
    c_t   = c_{t-1} + write(h_dec)

With attention, ``read`` extracts two N x N glimpses through a grid of Gaussian filters
whose centre, stride, variance and intensity are a linear function of ``h_dec`` (eqs.
19-27) and ``write`` paints an N x N patch back through the transposed filters; without it,
``read`` is the whole image and error image and ``write`` a dense map to the whole canvas.
The canvas ``c_T`` holds Bernoulli logits. Generation runs the decoder alone on z_t ~ N(0, I).

``draw`` returns a model ``[images, noise] -> [canvases, z_mean, z_log_sigma]``
(canvases: logits after every step, [B, T, H, W, C]); the ``DrawCore`` layer it wraps
(``get_layer("draw_core")``) also has ``generate(z)``.
"""

from __future__ import annotations

import keras
from keras import ops

from models.checks import check_bool, check_image_shape, check_positive_int
from models.registry import register_model


def gaussian_filterbank(center, delta, variance, size: int, n: int):
    """N Gaussian filters along one image axis of length ``size`` [B, N, size], each row
    normalised to sum to one. ``center``, ``delta``, ``variance`` are [B, 1]."""
    grid = ops.arange(n, dtype="float32") - n / 2.0 + 0.5  # i - N/2 - 0.5 for i = 1..N
    mu = center + grid[None, :] * delta  # [B, N]
    pos = ops.arange(size, dtype="float32")  # [size]
    f = ops.exp(-ops.square(pos[None, None, :] - mu[:, :, None]) / (2.0 * variance[:, :, None]))
    return f / ops.maximum(ops.sum(f, axis=-1, keepdims=True), 1e-8)


@keras.saving.register_keras_serializable(package="deeptrends")
class DrawCore(keras.layers.Layer):
    """The DRAW recurrence, unrolled over ``steps``.

    Args:
        image_shape: tuple. (H, W, C) of the images drawn.
        steps: int. T, the number of glimpses / canvas updates.
        latent_dim: int. The dimension of each z_t.
        encoder_units: int. Units of the encoder LSTM.
        decoder_units: int. Units of the decoder LSTM.
        attention: bool. Gaussian read/write attention; False reads the whole image and
            writes the whole canvas.
        read_size: int. N of the read glimpse (2 in the paper's MNIST model).
        write_size: int. N of the written patch (5 in the paper's MNIST model).
    """

    def __init__(
        self,
        image_shape,
        steps: int = 16,
        latent_dim: int = 10,
        encoder_units: int = 256,
        decoder_units: int = 256,
        attention: bool = True,
        read_size: int = 2,
        write_size: int = 5,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.image_shape = tuple(int(d) for d in image_shape)
        self.steps = steps
        self.latent_dim = latent_dim
        self.encoder_units = encoder_units
        self.decoder_units = decoder_units
        self.attention = bool(attention)
        self.read_size = read_size
        self.write_size = write_size
        h, w, c = self.image_shape
        self.encoder_cell = keras.layers.LSTMCell(encoder_units, name="encoder_lstm")
        self.decoder_cell = keras.layers.LSTMCell(decoder_units, name="decoder_lstm")
        self.z_mean = keras.layers.Dense(latent_dim, name="z_mean")
        self.z_log_sigma = keras.layers.Dense(latent_dim, name="z_log_sigma")
        if self.attention:
            self.read_params = keras.layers.Dense(5, name="read_attention")
            self.write_params = keras.layers.Dense(5, name="write_attention")
            self.write_patch = keras.layers.Dense(write_size * write_size * c, name="write_patch")
        else:
            self.write_patch = keras.layers.Dense(h * w * c, name="write_canvas")

    # -- sizes ------------------------------------------------------------------------
    @property
    def read_dim(self) -> int:
        h, w, c = self.image_shape
        return 2 * (self.read_size**2 if self.attention else h * w) * c

    def build(self, input_shape=None):
        h, w, c = self.image_shape
        self.encoder_cell.build((None, self.read_dim + self.decoder_units))
        self.decoder_cell.build((None, self.latent_dim))
        self.z_mean.build((None, self.encoder_units))
        self.z_log_sigma.build((None, self.encoder_units))
        self.write_patch.build((None, self.decoder_units))
        if self.attention:
            self.read_params.build((None, self.decoder_units))
            self.write_params.build((None, self.decoder_units))
        self.built = True

    # -- attention ----------------------------------------------------------------------
    def _filters(self, params_layer, h_dec, n: int):
        """The filterbanks ``fx`` [B, N, W], ``fy`` [B, N, H] and the intensity [B, 1], in
        the layer's compute dtype; computed in float32 (pixel coordinates and exponentials
        of log-variances lose their precision in 16 bits under mixed precision)."""
        h, w, _ = self.image_shape
        p = ops.cast(params_layer(h_dec), "float32")
        gx_, gy_, log_var, log_delta, log_gamma = (p[:, i : i + 1] for i in range(5))
        gx = (w + 1) / 2.0 * (gx_ + 1.0)
        gy = (h + 1) / 2.0 * (gy_ + 1.0)
        delta = (max(h, w) - 1) / max(n - 1, 1) * ops.exp(log_delta)
        var = ops.exp(log_var)
        fx = gaussian_filterbank(gx - 1.0, delta, var, w, n)  # 0-based pixel coordinates
        fy = gaussian_filterbank(gy - 1.0, delta, var, h, n)
        return tuple(ops.cast(t, self.compute_dtype) for t in (fx, fy, ops.exp(log_gamma)))

    def read(self, x, x_hat, h_dec):
        """The glimpse of the image and the error image, flattened [B, read_dim]."""
        batch = ops.shape(x)[0]
        if not self.attention:
            return ops.concatenate(
                [ops.reshape(x, (batch, -1)), ops.reshape(x_hat, (batch, -1))], axis=-1
            )
        fx, fy, gamma = self._filters(self.read_params, h_dec, self.read_size)

        def glimpse(img):  # [B, H, W, C] -> [B, N*N*C]
            patch = ops.einsum("bnh,bhwc,bmw->bnmc", fy, img, fx)
            return ops.reshape(patch, (batch, -1)) * gamma

        return ops.concatenate([glimpse(x), glimpse(x_hat)], axis=-1)

    def write(self, h_dec):
        """The canvas update [B, H, W, C] from the decoder state."""
        h, w, c = self.image_shape
        batch = ops.shape(h_dec)[0]
        patch = self.write_patch(h_dec)
        if not self.attention:
            return ops.reshape(patch, (batch, h, w, c))
        n = self.write_size
        fx, fy, gamma = self._filters(self.write_params, h_dec, n)
        patch = ops.reshape(patch, (batch, n, n, c))
        return ops.einsum("bnh,bnmc,bmw->bhwc", fy, patch, fx) / gamma[:, :, None, None]

    # -- the recurrence -----------------------------------------------------------------
    def _zeros(self, batch, units):
        return ops.zeros((batch, units), dtype=self.compute_dtype)

    def call(self, inputs):
        """``[images [B,H,W,C], noise [B,T,z]]`` -> ``(canvases [B,T,H,W,C], z_mean [B,T,z],
        z_log_sigma [B,T,z])``."""
        x, noise = inputs
        batch = ops.shape(x)[0]
        canvas = ops.zeros_like(x)
        h_enc, c_enc = (
            self._zeros(batch, self.encoder_units),
            self._zeros(batch, self.encoder_units),
        )
        h_dec, c_dec = (
            self._zeros(batch, self.decoder_units),
            self._zeros(batch, self.decoder_units),
        )
        canvases, means, log_sigmas = [], [], []
        for t in range(self.steps):
            x_hat = x - ops.sigmoid(canvas)
            r = self.read(x, x_hat, h_dec)
            h_enc, (h_enc, c_enc) = self.encoder_cell(
                ops.concatenate([r, h_dec], axis=-1), [h_enc, c_enc]
            )
            mu, log_sigma = self.z_mean(h_enc), self.z_log_sigma(h_enc)
            z = mu + ops.exp(log_sigma) * noise[:, t]
            h_dec, (h_dec, c_dec) = self.decoder_cell(z, [h_dec, c_dec])
            canvas = canvas + self.write(h_dec)
            canvases.append(canvas)
            means.append(mu)
            log_sigmas.append(log_sigma)
        # float32 outputs under mixed precision: the ELBO is computed from them
        return tuple(
            ops.cast(ops.stack(t, axis=1), "float32") for t in (canvases, means, log_sigmas)
        )

    def generate(self, z):
        """Decoder only: ``z [B, T, latent_dim] -> canvases [B, T, H, W, C]`` (logits)."""
        batch = ops.shape(z)[0]
        h, w, c = self.image_shape
        canvas = ops.zeros((batch, h, w, c), dtype=self.compute_dtype)
        h_dec, c_dec = (
            self._zeros(batch, self.decoder_units),
            self._zeros(batch, self.decoder_units),
        )
        canvases = []
        for t in range(self.steps):
            h_dec, (h_dec, c_dec) = self.decoder_cell(z[:, t], [h_dec, c_dec])
            canvas = canvas + self.write(h_dec)
            canvases.append(canvas)
        return ops.cast(ops.stack(canvases, axis=1), "float32")

    def compute_output_shape(self, input_shape):
        x_shape = input_shape[0]
        b = x_shape[0]
        return (
            (b, self.steps, *self.image_shape),
            (b, self.steps, self.latent_dim),
            (b, self.steps, self.latent_dim),
        )

    def compute_output_spec(self, inputs):
        shapes = self.compute_output_shape([tuple(t.shape) for t in inputs])
        return tuple(keras.KerasTensor(shape, dtype="float32") for shape in shapes)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "image_shape": list(self.image_shape),
                "steps": self.steps,
                "latent_dim": self.latent_dim,
                "encoder_units": self.encoder_units,
                "decoder_units": self.decoder_units,
                "attention": self.attention,
                "read_size": self.read_size,
                "write_size": self.write_size,
            }
        )
        return config


def draw_network(
    input_shape=(28, 28, 1),
    steps: int = 16,
    latent_dim: int = 10,
    encoder_units: int = 256,
    decoder_units: int = 256,
    attention: bool = True,
    read_size: int = 2,
    write_size: int = 5,
    name: str = "draw",
):
    """Build DRAW as a functional model ``[images, noise] -> [canvases, z_mean, z_log_sigma]``.

    Args:
        input_shape: tuple. Image shape (H, W, C).
        steps: int. T, the number of drawing steps (64 in the paper's MNIST model).
        latent_dim: int. The dimension of each z_t (100 in the paper's MNIST model).
        encoder_units: int. Units of the encoder LSTM.
        decoder_units: int. Units of the decoder LSTM.
        attention: bool. Gaussian read/write attention (False: the no-attention variant).
        read_size: int. N of the read glimpse.
        write_size: int. N of the written patch.
        name: str. The model name.
    """
    shape = check_image_shape(input_shape)
    for arg, value in (
        ("steps", steps),
        ("latent_dim", latent_dim),
        ("encoder_units", encoder_units),
        ("decoder_units", decoder_units),
        ("read_size", read_size),
        ("write_size", write_size),
    ):
        check_positive_int(arg, value)
    check_bool("attention", attention)
    images = keras.Input(shape=shape, name="images")
    noise = keras.Input(shape=(steps, latent_dim), name="noise")
    core = DrawCore(
        shape,
        steps,
        latent_dim,
        encoder_units,
        decoder_units,
        attention,
        read_size,
        write_size,
        name="draw_core",
    )
    canvases, z_mean, z_log_sigma = core([images, noise])
    return keras.Model([images, noise], [canvases, z_mean, z_log_sigma], name=name)


@register_model("draw", task="generation", family="draw")
def draw(**kwargs):
    return draw_network(**kwargs)


@register_model("draw_no_attention", task="generation", family="draw")
def draw_no_attention(**kwargs):
    return draw_network(**{"attention": False, **kwargs})
