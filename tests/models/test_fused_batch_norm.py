"""``models.layers.FusedBatchNormalization``: Keras' BatchNormalization, computed by the fused
kernel. Same outputs, gradients and moving statistics as Keras' layer with the same weights;
under ``mixed_bfloat16`` no float32 round trip of the activation map; Keras' path for what the
kernel does not take; saved and loaded as itself."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from models.layers import FusedBatchNormalization
from pipelines import kernels

kernels.install()  # TensorFlow's fused kernel (models/ itself may not import TensorFlow)


def _pair(shape, **kwargs):
    keras.utils.set_random_seed(0)
    ours = FusedBatchNormalization(momentum=0.9, **kwargs)
    theirs = keras.layers.BatchNormalization(momentum=0.9, **kwargs)
    ours.build(shape)
    theirs.build(shape)
    rng = np.random.default_rng(0)
    weights = [rng.uniform(0.5, 1.5, w.shape).astype("float32") for w in theirs.get_weights()]
    ours.set_weights(weights)
    theirs.set_weights(weights)
    return ours, theirs


def test_matches_keras_batch_norm_in_training_and_inference():
    shape = (4, 6, 5, 3)
    ours, theirs = _pair(shape, epsilon=1e-3)
    x = tf.constant(np.random.default_rng(1).normal(2.0, 3.0, shape).astype("float32"))
    for layer in (ours, theirs):
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = layer(x, training=True)
            loss = tf.reduce_sum(out * tf.range(out.shape[-1], dtype="float32"))
        layer.grads = tape.gradient(loss, [x, *layer.trainable_variables])
        layer.out = out
    np.testing.assert_allclose(ours.out, theirs.out, atol=1e-5)
    for a, b in zip(ours.grads, theirs.grads, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)
    # moving statistics: the same update, with the biased batch variance
    np.testing.assert_allclose(ours.moving_mean, theirs.moving_mean, rtol=1e-6)
    np.testing.assert_allclose(ours.moving_variance, theirs.moving_variance, rtol=1e-5)
    assert not np.allclose(theirs.moving_variance, 1.0)  # the update did happen
    np.testing.assert_allclose(ours(x, training=False), theirs(x, training=False), atol=1e-5)


def test_without_scale_or_center_and_keras_path_for_other_ranks():
    ours, theirs = _pair((4, 3, 3, 2), scale=False, center=False)
    x = tf.random.stateless_normal((4, 3, 3, 2), seed=(1, 2))
    np.testing.assert_allclose(ours(x, training=True), theirs(x, training=True), atol=1e-5)
    ours, theirs = _pair((8, 5))
    x = tf.random.stateless_normal((8, 5), seed=(3, 4))
    np.testing.assert_allclose(ours(x, training=True), theirs(x, training=True), atol=1e-6)
    np.testing.assert_allclose(ours.moving_variance, theirs.moving_variance, rtol=1e-6)


def _rank4_casts(layer_cls):
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        inputs = keras.Input((8, 8, 3))
        x = keras.layers.Conv2D(4, 3, padding="same", use_bias=False)(inputs)
        x = layer_cls()(x)
        x = keras.layers.ReLU()(x)
        model = keras.Model(inputs, x)
    finally:
        keras.mixed_precision.set_global_policy("float32")

    @tf.function
    def train(x):
        return model(x, training=True)

    graph = train.get_concrete_function(tf.TensorSpec((2, 8, 8, 3))).graph
    out = train(tf.ones((2, 8, 8, 3)))
    casts = [  # of the convolution's output map (not of the input or the kernel)
        op
        for op in graph.get_operations()
        if op.type == "Cast" and op.outputs[0].shape.as_list() == [2, 8, 8, 4]
    ]
    return out.dtype, len(casts), {op.type for op in graph.get_operations()}


def test_bfloat16_map_stays_bfloat16_through_the_fused_kernel():
    dtype, casts, ops = _rank4_casts(FusedBatchNormalization)
    assert dtype == tf.bfloat16 and casts == 0
    assert "FusedBatchNormV3" in ops
    _, keras_casts, _ = _rank4_casts(keras.layers.BatchNormalization)
    assert keras_casts == 2  # Keras: the map up to float32 and back


@pytest.mark.parametrize("training", [False, True])
def test_saved_and_loaded_as_itself(tmp_path, training):
    inputs = keras.Input((4, 4, 2))
    model = keras.Model(inputs, FusedBatchNormalization(name="bn")(inputs))
    model.get_layer("bn").set_weights([np.full(2, v, "float32") for v in (2.0, 0.5, 1.0, 4.0)])
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded.get_layer("bn")) is FusedBatchNormalization
    x = tf.random.stateless_normal((2, 4, 4, 2), seed=(5, 6))
    np.testing.assert_allclose(loaded(x, training=training), model(x, training=training), atol=1e-6)


def test_without_a_registered_kernel_it_is_keras_batch_norm(monkeypatch):
    # models/ is backend-agnostic: on a backend with no kernel (JAX, PyTorch, or TensorFlow
    # before pipelines.kernels.install) the layer is Keras' own, with the same results.
    import models.layers

    monkeypatch.setattr(models.layers, "_KERNELS", {})
    shape = (4, 3, 3, 2)
    ours, theirs = _pair(shape)
    x = tf.random.stateless_normal(shape, seed=(7, 8))

    @tf.function
    def train(x):
        return ours(x, training=True)

    ops = {op.type for op in train.get_concrete_function(x).graph.get_operations()}
    assert "FusedBatchNormV3" not in ops
    np.testing.assert_allclose(train(x), theirs(x, training=True), atol=1e-6)
