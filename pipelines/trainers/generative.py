"""Training algorithms of the generative models, as ``keras.Model`` wrappers whose
``train_step`` implements them, and the sampling functions the task, its evaluation and
its serving signatures share.

- ``RBMTrainer``: contrastive divergence CD-k (Hinton 2002) or persistent CD (Tieleman
  2008) for one RBM, and the greedy layer-wise training of a DBN (Hinton et al. 2006):
  RBM ``l`` trains on the hidden probabilities of the frozen RBMs below it, one after the
  other (``GreedyLayerSchedule`` switches the layer at epoch boundaries).
- ``VAETrainer``: the ELBO with the reparameterisation trick (Kingma & Welling 2014).
- ``GANTrainer``: the two-player game, one discriminator step then one generator step
  with the non-saturating loss ``-log D(G(z))`` (Goodfellow et al. 2014, section 3);
  DCGAN uses it with Adam 2e-4, beta1 0.5 (Radford et al. 2015).
- ``DRAWTrainer``: DRAW's loss ``L^x + L^z`` (Gregor et al. 2015, eq. 9-12).

The networks come from ``models.create_model``; a wrapper only adds the algorithm. All
sampling is seeded: ``latents_from_seeds`` draws one latent per int64 seed with a
stateless generator, so an image depends on its seed alone, not on its batch.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf

from models.rbm import dbn_down_pass, dbn_up_pass, rbm_layers
from models.vae import decoder_mean, log_likelihood

LOG_2PI = math.log(2.0 * math.pi)


def _images(data):
    return data[0] if isinstance(data, (tuple, list)) else data


def gaussian_log_prob(z, mean, log_std, axes):
    return tf.reduce_sum(
        -0.5 * tf.square((z - mean) * tf.exp(-log_std)) - log_std - 0.5 * LOG_2PI, axis=axes
    )


class GenerativeTrainer(keras.Model):
    """Base of the wrappers: holds the registered ``network``, a seed generator and
    mean trackers; ``call`` runs the network, ``test_step`` reports the same losses as
    ``train_step`` without updating anything. Each trainer defines ``losses_of(x, training)``,
    the tracked losses of a batch."""

    tracked: tuple[str, ...] = ("loss",)

    def __init__(self, network, seed: int = 0, **kwargs):
        super().__init__(name=f"{network.name}_trainer", **kwargs)
        self.network = network
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.trackers = {k: keras.metrics.Mean(name=k) for k in self.tracked}
        self.built = True  # the network is a built functional model

    @property
    def metrics(self):
        return list(self.trackers.values())

    def call(self, inputs, training=False):
        return self.network(inputs, training=training)

    def _update(self, values: dict) -> dict:
        for k, v in values.items():
            self.trackers[k].update_state(v)
        return {k: t.result() for k, t in self.trackers.items()}

    def train_step(self, data):
        """One optimizer over the whole network minimising ``loss`` (the negative ELBO of
        the VAE and DRAW); the RBM and GAN trainers replace it with their own algorithms."""
        x = _images(data)
        with tf.GradientTape() as tape:
            values = self.losses_of(x, training=True)
        variables = self.network.trainable_variables
        self.optimizer.apply_gradients(
            zip(tape.gradient(values["loss"], variables), variables, strict=True)
        )
        return self._update(values)

    def test_step(self, data):
        return self._update(self.losses_of(_images(data), training=False))


# ------------------------------------------------------------------------- RBM / DBN


def init_visible_bias(rbm, x: np.ndarray) -> None:
    """Hinton's "practical guide" initialisation: ``b_i = log(p_i / (1 - p_i))`` of the
    training data's pixel means."""
    p = np.clip(x.reshape(len(x), -1).mean(0), 1e-3, 1 - 1e-3)
    rbm.visible_bias.assign(np.log(p / (1 - p)).astype(np.float32))


class RBMTrainer(GenerativeTrainer):
    """CD-k / PCD-k for each RBM of an ``rbm`` or ``dbn`` network, trained greedily.

    The CD gradient is that of ``mean F(v_data) - mean F(v_model)`` with ``v_model``
    (the end of a k-step Gibbs chain started at the data, or at the persistent chain)
    held constant, so any Keras optimizer applies it.

    ``loss`` is the mean squared reconstruction error per image of the layer in training
    (through the whole stack for ``recon_error``); ``free_energy`` is the mean F of the
    training data under that layer.
    """

    tracked = ("loss", "free_energy", "recon_error")

    def __init__(
        self, network, cd_k: int = 1, persistent: bool = False, batch_size: int = 64, seed: int = 0
    ):
        super().__init__(network, seed)
        self.rbms = rbm_layers(network)
        self.cd_k = cd_k
        self.persistent = persistent
        self.current_layer = 0
        self.chains = []
        if persistent:
            for i, rbm in enumerate(self.rbms):
                chain = self.add_weight(
                    name=f"chain_{i + 1}",
                    shape=(batch_size, rbm.visible_units),
                    trainable=False,
                    initializer=keras.initializers.RandomUniform(0, 1, seed=seed + i),
                )
                self.chains.append(chain)

    def compile(self, optimizers, **kwargs):
        super().compile(**kwargs)
        self.layer_optimizers = list(optimizers)

    def build_optimizers(self) -> None:
        """Create every layer optimizer's slots up front (in the strategy's scope)."""
        for rbm, optimizer in zip(self.rbms, self.layer_optimizers, strict=True):
            if not optimizer.built:
                optimizer.build([rbm.kernel, rbm.visible_bias, rbm.hidden_bias])

    @property
    def trace_key(self) -> int:
        """The RBM in training: ``train_step`` is traced for one layer (pipelines/loop.py
        retraces when this changes)."""
        return self.current_layer

    def set_layer(self, index: int) -> None:
        """Train RBM ``index`` from now on (retraces the train and test functions)."""
        if index != self.current_layer:
            self.current_layer = index
            self.make_train_function(force=True)
            self.make_test_function(force=True)

    def _flat(self, x):
        return tf.reshape(tf.cast(x, tf.float32), (tf.shape(x)[0], -1))

    def losses_of(self, x, training: bool) -> dict:
        v = self._flat(x)
        rbm = self.rbms[self.current_layer]
        data = dbn_up_pass(self.rbms, v, upto=self.current_layer)
        recon = rbm.reconstruct(data)
        up = dbn_up_pass(self.rbms, v)
        down = up
        for layer in reversed(self.rbms):
            down = layer.visible_probs(down)
        return {
            "loss": tf.reduce_mean(tf.reduce_sum(tf.square(data - recon), axis=-1)),
            "free_energy": tf.reduce_mean(rbm.free_energy(data)),
            "recon_error": tf.reduce_mean(tf.reduce_sum(tf.square(v - down), axis=-1)),
        }

    def train_step(self, data):
        v = self._flat(_images(data))
        index = self.current_layer
        rbm = self.rbms[index]
        positive = dbn_up_pass(self.rbms, v, upto=index)
        start = (
            self.chains[index]
            if self.persistent
            else rbm.sample(positive, seed=self.seed_generator)
        )
        negative = start
        for _ in range(self.cd_k):
            negative, _pv, _h = rbm.gibbs_step(negative, seed=self.seed_generator)
        negative = tf.stop_gradient(negative)
        variables = [rbm.kernel, rbm.visible_bias, rbm.hidden_bias]
        with tf.GradientTape() as tape:
            cd = tf.reduce_mean(rbm.free_energy(positive)) - tf.reduce_mean(
                rbm.free_energy(negative)
            )
        grads = tape.gradient(cd, variables)
        self.layer_optimizers[index].apply_gradients(zip(grads, variables, strict=True))
        if self.persistent:
            self.chains[index].assign(negative)
        return self._update(self.losses_of(v, training=True))


class GreedyLayerSchedule(keras.callbacks.Callback):
    """Switch the DBN's RBM in training at epoch boundaries: ``epochs_per_layer[i]``
    epochs for RBM i, bottom to top; the last RBM trains for any remaining epochs."""

    def __init__(self, epochs_per_layer: list[int]):
        super().__init__()
        self.bounds = np.cumsum(epochs_per_layer)

    def layer_at(self, epoch: int) -> int:
        return int(min(np.searchsorted(self.bounds, epoch, side="right"), len(self.bounds) - 1))

    def on_epoch_begin(self, epoch, logs=None):
        self.model.set_layer(self.layer_at(epoch))

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["layer"] = float(self.model.current_layer + 1)


def rbm_generate(network, seeds, gibbs_steps: int):
    """Pixel probabilities of a DBN (or RBM) sample per int64 seed: the top RBM's chain
    starts at uniform Bernoulli noise and runs ``gibbs_steps`` sweeps, then the down-pass.
    Each row's chain uses only its own seed."""
    rbms = rbm_layers(network)
    top = rbms[-1]
    visible, hidden = top.visible_units, top.units

    def one(seed):
        key = tf.stack([seed, tf.constant(0, tf.int64)])
        v = tf.cast(tf.random.stateless_uniform([1, visible], key) < 0.5, tf.float32)

        def body(step, v, pv):
            k = tf.random.experimental.stateless_fold_in(key, tf.cast(step, tf.int64) + 1)
            nh = tf.random.stateless_uniform([1, hidden], k)
            nv = tf.random.stateless_uniform(
                [1, visible], tf.random.experimental.stateless_fold_in(k, 7)
            )
            v, pv, _ = top.gibbs_step(v, nh, nv)
            return step + 1, v, pv

        _, _, pv = tf.while_loop(
            lambda s, *_: s < gibbs_steps, body, (tf.constant(0), v, tf.zeros([1, visible]))
        )
        return dbn_down_pass(rbms, pv)[0]

    flat = tf.map_fn(
        one, tf.cast(seeds, tf.int64), fn_output_signature=tf.TensorSpec([None], tf.float32)
    )
    shape = network.input_shape[1:]
    return tf.reshape(flat, (-1, *shape))


def rbm_generate_batch(network, n: int, seed: int, gibbs_steps: int, batch: int = 500):
    """Faster batch sampling for evaluation (noise keyed per batch, not per row)."""
    rbms = rbm_layers(network)
    top = rbms[-1]
    out = []

    @tf.function
    def chain(key, m):
        v = tf.cast(tf.random.stateless_uniform([m, top.visible_units], key) < 0.5, tf.float32)
        pv = tf.zeros_like(v)
        for step in tf.range(gibbs_steps):
            k = tf.random.experimental.stateless_fold_in(key, tf.cast(step, tf.int64) + 1)
            nh = tf.random.stateless_uniform([m, top.units], k)
            nv = tf.random.stateless_uniform(
                [m, top.visible_units], tf.random.experimental.stateless_fold_in(k, 7)
            )
            v, pv, _ = top.gibbs_step(v, nh, nv)
        return dbn_down_pass(rbms, pv)

    for i, start in enumerate(range(0, n, batch)):
        m = min(batch, n - start)
        key = tf.constant([seed, i], tf.int64)
        out.append(chain(key, tf.constant(m)).numpy())
    return np.concatenate(out).reshape((n, *network.input_shape[1:]))


def pseudo_log_likelihood(rbm, v, draws: int = 5, seed: int = 0) -> float:
    """Stochastic pseudo-log-likelihood per example, nats:
    ``V * log sigmoid(F(v~) - F(v))`` with one random bit of ``v`` flipped in ``v~``,
    averaged over ``draws`` flips (the estimator of scikit-learn's BernoulliRBM)."""
    v = tf.convert_to_tensor(v, tf.float32)
    n, dim = v.shape
    rng = np.random.default_rng(seed)
    total = 0.0
    for _ in range(draws):
        idx = rng.integers(0, dim, size=n)
        mask = tf.one_hot(idx, dim)
        flipped = v + mask * (1.0 - 2.0 * v)
        total += float(
            tf.reduce_mean(dim * tf.math.log_sigmoid(rbm.free_energy(flipped) - rbm.free_energy(v)))
        )
    return total / draws


# ------------------------------------------------------------------------------- VAE


class VAETrainer(GenerativeTrainer):
    """Negative ELBO ``-E_q[log p(x|z)] + KL(q(z|x) || N(0, I))`` in nats per image,
    one reparameterised sample per image."""

    tracked = ("loss", "reconstruction", "kl")

    def __init__(self, network, seed: int = 0):
        super().__init__(network, seed)
        self.encoder = network.get_layer("encoder")
        self.decoder = network.get_layer("decoder")

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
        """``log p(x|z) + log p(z) - log q(z|x)`` for ``k`` posterior samples [k, B]."""
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


# ------------------------------------------------------------------------------- GAN


class GANTrainer(GenerativeTrainer):
    """One discriminator and one generator update per batch. Images are scaled to
    [-1, 1] for the tanh generator. ``label_smoothing`` softens the real labels
    (one-sided, Salimans et al. 2016); 0 is the paper's game."""

    tracked = ("loss", "d_loss", "g_loss", "d_real", "d_fake")

    def __init__(self, network, label_smoothing: float = 0.0, seed: int = 0):
        super().__init__(network, seed)
        self.generator = network.get_layer("generator")
        self.discriminator = network.get_layer("discriminator")
        self.latent_dim = int(self.generator.input_shape[-1])
        self.label_smoothing = label_smoothing

    def compile(self, d_optimizer, g_optimizer, **kwargs):
        super().compile(**kwargs)
        self.d_optimizer = d_optimizer
        self.g_optimizer = g_optimizer

    def build_optimizers(self) -> None:
        """Create both players' optimizer slots up front (in the strategy's scope)."""
        for optimizer, player in ((self.d_optimizer, self.discriminator), (self.g_optimizer, self.generator)):
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
        real = tf.cast(_images(data), tf.float32) * 2.0 - 1.0
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


# ------------------------------------------------------------------------------ DRAW


class DRAWTrainer(GenerativeTrainer):
    """DRAW's negative ELBO: Bernoulli ``-log p(x|c_T)`` plus the KL of every step."""

    tracked = ("loss", "reconstruction", "kl")

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
        """``log p(x|z) + log p(z) - log q(z|x)`` for ``k`` posterior samples [k, B]."""
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


# --------------------------------------------------------------- latents and samples


def latent_shape(family: str, network) -> tuple[int, ...]:
    """The shape of one latent of a network (none for RBM/DBN, whose state is a chain)."""
    if family == "vae":
        return (int(network.get_layer("decoder").input_shape[-1]),)
    if family == "gan":
        return (int(network.get_layer("generator").input_shape[-1]),)
    if family == "draw":
        core = network.get_layer("draw_core")
        return (core.steps, core.latent_dim)
    return ()


def latents_from_seeds(seeds, shape: tuple[int, ...]):
    """One standard-normal latent of ``shape`` per int64 seed (stateless, row by row)."""
    size = int(np.prod(shape))

    def one(seed):
        return tf.random.stateless_normal([size], tf.stack([seed, tf.constant(0, tf.int64)]))

    flat = tf.map_fn(
        one, tf.cast(seeds, tf.int64), fn_output_signature=tf.TensorSpec([size], tf.float32)
    )
    return tf.reshape(flat, (-1, *shape))


def decode_latents(family: str, network, latents, all_steps: bool = False):
    """Pixels in [0, 1] from latents: VAE decoder mean, GAN generator rescaled from
    [-1, 1], DRAW canvas sigmoid (every step's canvas with ``all_steps``)."""
    if family == "vae":
        decoder = network.get_layer("decoder")
        return decoder_mean(decoder, decoder(latents, training=False))
    if family == "gan":
        return (network.get_layer("generator")(latents, training=False) + 1.0) / 2.0
    if family == "draw":
        canvases = tf.sigmoid(network.get_layer("draw_core").generate(latents))
        return canvases if all_steps else canvases[:, -1]
    raise ValueError(f"family {family!r} has no latents")


def to_uint8(pixels):
    return tf.cast(tf.round(tf.clip_by_value(pixels, 0.0, 1.0) * 255.0), tf.uint8)
