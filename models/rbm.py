"""Restricted Boltzmann machines and the Deep Belief Network (Hinton, Osindero & Teh 2006,
"A Fast Learning Algorithm for Deep Belief Nets"; Hinton & Salakhutdinov 2006, "Reducing the
Dimensionality of Data with Neural Networks"; Hinton 2002, "Training Products of Experts by
Minimizing Contrastive Divergence").

A Bernoulli-Bernoulli RBM has energy ``E(v, h) = -v.b - h.c - v W h``; its conditionals are
factorial, ``p(h=1|v) = sigmoid(v W + c)`` and ``p(v=1|h) = sigmoid(h W^T + b)``, and the free
energy is ``F(v) = -v.b - sum_j softplus(v W_j + c_j)``. The ``RBM`` layer holds ``W, b, c``
and exposes those functions in keras.ops; contrastive divergence (CD-k, persistent CD) and
greedy layer-wise stacking are training algorithms and live with the generation task's
trainers (``pipelines/trainers/``). Sampling functions take their uniform noise as an
argument (or a seed), so a caller controls reproducibility.

Registered: ``rbm`` (one RBM over flattened pixels), ``dbn`` (a stack of RBMs; the up-pass
gives the top layer's hidden probabilities) and ``dbn_classifier`` (the same stack as a
sigmoid MLP with a softmax on top, to be initialised from a pre-trained ``dbn`` with
``load_dbn_weights`` and fine-tuned by backpropagation).
"""

from __future__ import annotations

import keras
from keras import ops

from models.checks import check_dropout, check_positive_int, check_positive_ints, check_shape
from models.layers import classifier_head
from models.registry import register_model


@keras.saving.register_keras_serializable(package="deeptrends")
class RBM(keras.layers.Layer):
    """A Bernoulli-Bernoulli restricted Boltzmann machine: weights ``W`` [V, H], visible
    bias ``b`` [V] and hidden bias ``c`` [H]. Called on visible vectors it returns
    ``p(h=1|v)`` (the deterministic up-pass used to feed the next RBM of a DBN).

    The layer computes in float32 whatever the global dtype policy (its probabilities and
    free energies lose too much in 16 bits); pass ``dtype`` to choose otherwise.

    Args:
        units: int. The number of hidden units H.
        weight_stddev: float. Standard deviation of the initial weights (0.01 in Hinton's
            "A Practical Guide to Training RBMs").
    """

    def __init__(self, units: int, weight_stddev: float = 0.01, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.units = check_positive_int("units", units)
        self.weight_stddev = float(weight_stddev)

    def build(self, input_shape):
        visible = int(input_shape[-1])
        self.kernel = self.add_weight(
            name="kernel",
            shape=(visible, self.units),
            initializer=keras.initializers.RandomNormal(stddev=self.weight_stddev),
        )
        self.visible_bias = self.add_weight(
            name="visible_bias", shape=(visible,), initializer="zeros"
        )
        self.hidden_bias = self.add_weight(
            name="hidden_bias", shape=(self.units,), initializer="zeros"
        )

    @property
    def visible_units(self) -> int:
        return int(self.kernel.shape[0])

    # -- conditionals ----------------------------------------------------------------
    def hidden_logits(self, v):
        return ops.matmul(v, self.kernel) + self.hidden_bias

    def hidden_probs(self, v):
        """``p(h=1|v)`` [B, H]."""
        return ops.sigmoid(self.hidden_logits(v))

    def visible_logits(self, h):
        return ops.matmul(h, ops.transpose(self.kernel)) + self.visible_bias

    def visible_probs(self, h):
        """``p(v=1|h)`` [B, V]."""
        return ops.sigmoid(self.visible_logits(h))

    @staticmethod
    def sample(probs, noise=None, seed=None):
        """Bernoulli samples of ``probs``: ``noise < probs`` for uniform ``noise`` in [0, 1)
        (drawn from ``seed`` when not given)."""
        if noise is None:
            noise = keras.random.uniform(ops.shape(probs), seed=seed, dtype=probs.dtype)
        return ops.cast(noise < probs, probs.dtype)

    def gibbs_step(self, v, noise_h=None, noise_v=None, seed=None):
        """One Gibbs sweep v -> h -> v'. Returns ``(v_sample, v_probs, h_sample)``."""
        h = self.sample(self.hidden_probs(v), noise_h, seed)
        pv = self.visible_probs(h)
        return self.sample(pv, noise_v, seed), pv, h

    def gibbs_chain(self, v, steps: int, seed=None):
        """``steps`` Gibbs sweeps from ``v`` (a symbolic loop). Returns ``(v_sample, v_probs)``.

        ``seed``: a ``keras.random.SeedGenerator`` (or an int, made into one: create it
        outside a compiled function), so that every sweep draws fresh noise."""
        if isinstance(seed, int):
            seed = keras.random.SeedGenerator(seed)

        def body(_, state):
            vs, _pv = state
            vs, pv, _h = self.gibbs_step(vs, seed=seed)
            return vs, pv

        return ops.fori_loop(0, steps, body, (v, ops.zeros_like(v)))

    # -- energies ----------------------------------------------------------------------
    def free_energy(self, v):
        """``F(v) = -v.b - sum_j softplus(v W_j + c_j)`` per example [B]."""
        return -ops.matmul(v, ops.expand_dims(self.visible_bias, -1))[:, 0] - ops.sum(
            ops.softplus(self.hidden_logits(v)), axis=-1
        )

    def energy(self, v, h):
        """``E(v, h)`` per example [B]."""
        return (
            -ops.sum(v * self.visible_bias, axis=-1)
            - ops.sum(h * self.hidden_bias, axis=-1)
            - ops.sum(ops.matmul(v, self.kernel) * h, axis=-1)
        )

    def reconstruct(self, v):
        """Mean-field reconstruction ``p(v|p(h|v))`` [B, V]."""
        return self.visible_probs(self.hidden_probs(v))

    def call(self, inputs):
        return self.hidden_probs(inputs)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.units)

    def get_config(self):
        config = super().get_config()
        config.update({"units": self.units, "weight_stddev": self.weight_stddev})
        return config


def rbm_layers(model) -> list[RBM]:
    """The RBM layers of an ``rbm`` or ``dbn`` model, bottom to top."""
    return [layer for layer in model.layers if isinstance(layer, RBM)]


def dbn_down_pass(layers: list[RBM], top_visible):
    """Propagate a sample of the top RBM's visible layer down the directed layers of the
    DBN (mean-field, with each RBM's generative weights ``W^T``) to pixel probabilities."""
    x = top_visible
    for layer in reversed(layers[:-1]):
        x = layer.visible_probs(x)
    return x


def dbn_up_pass(layers: list[RBM], v, upto: int | None = None):
    """Hidden probabilities of the first ``upto`` RBMs (all by default), bottom-up."""
    x = v
    for layer in layers[: len(layers) if upto is None else upto]:
        x = layer.hidden_probs(x)
    return x


def deep_belief_network(
    input_shape=(28, 28, 1),
    hidden_units=(500, 500, 2000),
    weight_stddev: float = 0.01,
    name: str = "dbn",
):
    """A stack of RBMs over flattened pixels; the output is the top hidden layer's
    probabilities under the deterministic up-pass.

    Args:
        input_shape: tuple. Image shape (H, W, C); pixels are flattened into the visible layer.
        hidden_units: list of int. Hidden units of each RBM, bottom to top; Hinton et al.
            2006 use 500-500-2000 on MNIST. One entry makes a single RBM.
        weight_stddev: float. Standard deviation of the initial weights.
        name: str. The model name.
    """
    shape = check_shape("input_shape", input_shape)
    units = check_positive_ints("hidden_units", hidden_units)
    inputs = keras.Input(shape=shape, name="images")
    x = keras.layers.Flatten(name="flatten")(inputs)
    for i, u in enumerate(units, start=1):
        x = RBM(u, weight_stddev=weight_stddev, name=f"rbm_{i}")(x)
    return keras.Model(inputs, x, name=name)


def dbn_classifier_network(
    input_shape=(28, 28, 1),
    num_classes: int = 10,
    hidden_units=(500, 500, 2000),
    dropout: float = 0.0,
    classifier_activation: str | None = "softmax",
    name: str = "dbn_classifier",
):
    """The DBN's recognition weights as a sigmoid MLP with a softmax classifier on top,
    fine-tuned by backpropagation (Hinton & Salakhutdinov 2006). Layer ``rbm_{i}_dense``
    takes the weights and hidden bias of RBM ``rbm_{i}`` (see ``load_dbn_weights``).

    Args:
        input_shape: tuple. Image shape (H, W, C).
        num_classes: int. The number of classes.
        hidden_units: list of int. Must match the pre-trained DBN.
        dropout: float. Dropout rate after each hidden layer; 0 disables it.
        classifier_activation: str or None. ``softmax`` or None for logits.
        name: str. The model name.
    """
    shape = check_shape("input_shape", input_shape)
    units = check_positive_ints("hidden_units", hidden_units)
    check_dropout(dropout)
    inputs = keras.Input(shape=shape, name="images")
    x = keras.layers.Flatten(name="flatten")(inputs)
    for i, u in enumerate(units, start=1):
        x = keras.layers.Dense(u, activation="sigmoid", name=f"rbm_{i}_dense")(x)
        if dropout:
            x = keras.layers.Dropout(dropout, name=f"rbm_{i}_dropout")(x)
    outputs = classifier_head(x, num_classes, "output", classifier_activation)
    return keras.Model(inputs, outputs, name=name)


def load_dbn_weights(classifier, dbn) -> int:
    """Copy each RBM's ``W`` and hidden bias into the classifier's ``rbm_{i}_dense``
    layers. Returns the number of layers copied; raises ``ValueError`` on a shape mismatch."""
    layers = rbm_layers(dbn)
    for i, layer in enumerate(layers, start=1):
        dense = classifier.get_layer(f"rbm_{i}_dense")
        kernel, bias = dense.get_weights()
        want = tuple(layer.kernel.shape)
        if kernel.shape != want:
            raise ValueError(
                f"`hidden_units` of the classifier and the DBN differ at layer {i}: "
                f"{kernel.shape} vs {want}."
            )
        dense.set_weights(
            [ops.convert_to_numpy(layer.kernel), ops.convert_to_numpy(layer.hidden_bias)]
        )
    return len(layers)


@register_model("rbm", task="generation", family="rbm")
def rbm(
    input_shape=(28, 28, 1), hidden_units: int = 500, weight_stddev: float = 0.01, name: str = "rbm"
):
    """One Bernoulli RBM. ``hidden_units``: int. The number of hidden units."""
    units = [check_positive_int("hidden_units", hidden_units)]
    return deep_belief_network(input_shape, units, weight_stddev, name)


@register_model("dbn", task="generation", family="rbm")
def dbn(**kwargs):
    return deep_belief_network(**kwargs)


@register_model("dbn_classifier", task="dbn_classification", family="rbm")
def dbn_classifier(**kwargs):
    return dbn_classifier_network(**kwargs)
