"""Contrastive divergence for RBMs and the greedy layer-wise training of a DBN.

- ``RBMTrainer``: CD-k (Hinton 2002) or persistent CD (Tieleman 2008) for each RBM of an
  ``rbm`` or ``dbn`` network, trained greedily (Hinton, Osindero & Teh 2006): RBM ``l``
  trains on the hidden probabilities of the frozen RBMs below it, one after the other
  (``GreedyLayerSchedule`` switches the layer at epoch boundaries; the shared training
  loop retraces the step when the trainer's ``trace_key`` changes).
- Sampling: Gibbs sweeps in the top RBM from uniform Bernoulli noise, then the DBN's
  down-pass (``rbm_generate`` per seed for serving, ``rbm_generate_batch`` for evaluation).
"""

from __future__ import annotations

import logging
from typing import ClassVar

import keras
import numpy as np
import tensorflow as tf

from models.rbm import dbn_down_pass, dbn_up_pass, rbm_layers
from pipelines.config import ConfigError
from pipelines.tasks.base import Endpoint
from pipelines.trainers.base import (
    CHECK_SEEDS,
    SEED_SPEC,
    GenerativeTrainer,
    image_outputs,
    images_of,
)

log = logging.getLogger(__name__)


def layer_count(config) -> int:
    """The RBMs of a config's ``rbm`` or ``dbn`` network (``model.hidden_units``, else the
    builder's default)."""
    import models

    units = config.model.kwargs().get("hidden_units")
    if units is None:
        units = models.model_arguments(config.model.name)["hidden_units"].default
    if isinstance(units, (list, tuple)) and not units:
        from pipelines.config import ConfigError

        raise ConfigError(
            f"model.hidden_units: {config.model.name!r} needs at least one layer of units. "
            "Received: hidden_units=[]"
        )
    return len(units) if isinstance(units, (list, tuple)) else 1


def init_visible_bias(rbm, x: np.ndarray) -> None:
    """Hinton's "practical guide" initialisation: ``b_i = log(p_i / (1 - p_i))`` of the
    training data's pixel means."""
    p = np.clip(x.reshape(len(x), -1).mean(0), 1e-3, 1 - 1e-3)
    rbm.visible_bias.assign(np.log(p / (1 - p)).astype(np.float32))


class RBMTrainer(GenerativeTrainer):
    """CD-k / PCD-k for each RBM of an ``rbm`` or ``dbn`` network, trained greedily.

    The CD gradient is that of ``mean F(v_data) - mean F(v_model)`` with ``v_model``
    (the end of a k-step Gibbs chain started at the data, or at the persistent chain)
    held constant, so any Keras optimizer applies it; each RBM has its own optimizer,
    whose learning-rate schedule spans that RBM's epochs.

    ``loss`` is the mean squared reconstruction error per image of the layer in training
    (through the whole stack for ``recon_error``); ``free_energy`` is the mean F of the
    training data under that layer.

    Args:
        network: keras.Model. An ``rbm`` or ``dbn`` network.
        cd_k: int. Gibbs steps of contrastive divergence.
        persistent: bool. Persistent chains (one per batch row) instead of chains started
            at the data.
        batch_size: int. Rows of the persistent chains.
        seed: int. Seed of the Gibbs sampling in training.
        epochs_per_layer: list of int. Epochs of each RBM, bottom to top.
        gibbs_steps: int. Sweeps in the top RBM per generated sample.
    """

    tracked: ClassVar[tuple[str, ...]] = ("loss", "free_energy", "recon_error")
    likelihood_metric_names: ClassVar[tuple[str, ...]] = ("pseudo_log_likelihood", "free_energy")

    def __init__(
        self,
        network,
        cd_k: int = 1,
        persistent: bool = False,
        batch_size: int = 64,
        seed: int = 0,
        epochs_per_layer: list[int] | None = None,
        gibbs_steps: int = 200,
    ):
        super().__init__(network, seed)
        self.rbms = rbm_layers(network)
        self.cd_k = cd_k
        self.persistent = persistent
        self.epochs_per_layer = list(epochs_per_layer or [1] * len(self.rbms))
        self.gibbs_steps = gibbs_steps
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

    # -- the config -------------------------------------------------------------------------
    @classmethod
    def epochs_per_layer_of(cls, config, options) -> list[int]:
        """``task_options.epochs_per_layer``, else ``train.epochs`` split evenly; the top
        RBM trains for any epochs left over (as ``GreedyLayerSchedule`` does)."""
        layers = layer_count(config)
        if options.epochs_per_layer is not None:
            if len(options.epochs_per_layer) != layers:
                raise ConfigError(
                    f"task_options.epochs_per_layer: {len(options.epochs_per_layer)} entries "
                    f"for {layers} RBMs (model.hidden_units of {config.model.name!r})."
                )
            epochs = list(options.epochs_per_layer)
        else:
            epochs = [max(1, config.train.epochs // layers)] * layers
        epochs[-1] = max(epochs[-1], config.train.epochs - sum(epochs[:-1]))
        return epochs

    @classmethod
    def check(cls, config, options) -> None:
        cls.epochs_per_layer_of(config, options)
        if options.binarize is None:
            log.warning(
                "%s: a Bernoulli RBM on grey pixels; set task_options.binarize: 0.5", config.name
            )

    @classmethod
    def for_config(cls, network, config, options) -> RBMTrainer:
        return cls(
            network,
            cd_k=options.cd_k,
            persistent=options.persistent,
            batch_size=config.train.batch_size,
            seed=config.runtime.seed,
            epochs_per_layer=cls.epochs_per_layer_of(config, options),
            gibbs_steps=options.gibbs_steps,
        )

    @classmethod
    def for_network(cls, network, info) -> RBMTrainer:
        return cls(network, gibbs_steps=int(info.gibbs_steps))

    @classmethod
    def callbacks(cls, config, options) -> list:
        return [GreedyLayerSchedule(cls.epochs_per_layer_of(config, options))]

    # -- training ---------------------------------------------------------------------------
    def compile_for(self, train, steps_per_epoch: int, images: np.ndarray, jit_compile: bool):
        """The visible biases from the data, and one optimizer per RBM whose schedule spans
        that RBM's own epochs."""
        from pipelines.optim import build_optimizer

        init_visible_bias(self.rbms[0], images)
        self.compile(
            [
                build_optimizer(train.model_copy(update={"epochs": e}), steps_per_epoch)
                for e in self.epochs_per_layer
            ],
            jit_compile=jit_compile,
        )

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
        down = dbn_up_pass(self.rbms, v)
        for layer in reversed(self.rbms):
            down = layer.visible_probs(down)
        return {
            "loss": tf.reduce_mean(tf.reduce_sum(tf.square(data - recon), axis=-1)),
            "free_energy": tf.reduce_mean(rbm.free_energy(data)),
            "recon_error": tf.reduce_mean(tf.reduce_sum(tf.square(v - down), axis=-1)),
        }

    def train_step(self, data):
        v = self._flat(images_of(data))
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

    # -- use ----------------------------------------------------------------------------------
    def sample(self, n: int, seed: int = 0, batch: int = 500) -> np.ndarray:
        return rbm_generate_batch(self.network, n, seed, self.gibbs_steps, batch)

    def likelihood_metrics(self, images: np.ndarray, options, seed: int = 0) -> dict[str, float]:
        """The first RBM's pseudo-log-likelihood and mean free energy of ``images``."""
        from pipelines.evaluation.likelihood import pseudo_log_likelihood

        flat = images.reshape(len(images), -1)
        first = self.rbms[0]
        return {
            "pseudo_log_likelihood": pseudo_log_likelihood(first, flat, options.pll_draws, seed),
            "free_energy": float(tf.reduce_mean(first.free_energy(tf.constant(flat)))),
        }

    def endpoints(self, check_images: np.ndarray | None = None) -> list[Endpoint]:
        steps = self.gibbs_steps

        def generate(seed):
            return image_outputs(rbm_generate(self.network, seed, steps))

        return [Endpoint("serving_default", generate, [SEED_SPEC], [CHECK_SEEDS])]

    def artifacts(self, test_images, test_labels, sample_labels, arithmetic) -> list:
        return [lambda out: self._write_filters_and_reconstructions(out, test_images)]

    def _write_filters_and_reconstructions(self, out_dir, test_images: np.ndarray) -> None:
        from pipelines.evaluation import sample_quality as ev

        first = self.rbms[0]
        shape = test_images.shape[1:]
        kernel = np.asarray(first.kernel).T[:100]  # [units, V]
        lo, hi = kernel.min(1, keepdims=True), kernel.max(1, keepdims=True)
        filters = ((kernel - lo) / np.maximum(hi - lo, 1e-8)).reshape((-1, *shape))
        ev.save_grid(filters, out_dir / "rbm1_filters.png", columns=10)
        x = test_images[:10].reshape(10, -1)
        for layer in self.rbms:
            x = layer.hidden_probs(x)
        for layer in reversed(self.rbms):
            x = layer.visible_probs(x)
        pairs = np.concatenate([test_images[:10], np.asarray(x).reshape((-1, *shape))])
        ev.save_grid(pairs, out_dir / "reconstructions.png", columns=10)


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
