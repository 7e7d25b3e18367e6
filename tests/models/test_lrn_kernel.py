"""``models.layers.LocalResponseNormalization`` through TensorFlow's ``LRN`` op (registered by
``pipelines.kernels``): the paper's formula on both paths, the same outputs and gradients as
the layer's own composite, one op per direction in the graph, the input's dtype kept under
mixed precision, XLA-compilable; inputs the kernel does not take go the composite's way."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import models.layers
from models.layers import LocalResponseNormalization
from pipelines import kernels

kernels.install()  # TensorFlow's LRN (models/ itself may not import TensorFlow)


@pytest.fixture
def composite(monkeypatch):
    """The layer as it computes on a backend without a registered kernel."""
    monkeypatch.setattr(models.layers, "_KERNELS", {})


def _paper(x, n=5, k=2.0, alpha=1e-4, beta=0.75):
    # b_i = a_i / (k + alpha * sum_{|j - i| <= n // 2} a_j^2) ** beta, clipped at the ends
    half, c = n // 2, x.shape[-1]
    window = np.stack(
        [(x[..., max(0, i - half) : i + half + 1] ** 2).sum(-1) for i in range(c)], axis=-1
    )
    return x / (k + alpha * window) ** beta


def _ops(fn, *args):
    return {op.type for op in fn.get_concrete_function(*args).graph.get_operations()}


def _value_and_grad(layer, x):
    weights = tf.range(x.shape[-1], dtype="float32") + 1.0
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
        loss = tf.reduce_sum(y * weights)
    return y, tape.gradient(loss, x)


@pytest.mark.parametrize("path", ["kernel", "composite"])
def test_both_paths_are_the_papers_formula(path, request):
    if path == "composite":
        request.getfixturevalue("composite")
    x = np.random.default_rng(0).normal(0, 30, (2, 5, 5, 16)).astype("float32")
    for n, k, alpha, beta in [(5, 2.0, 1e-4, 0.75), (3, 1.0, 1e-3, 0.5)]:
        layer = LocalResponseNormalization(size=n, k=k, alpha=alpha, beta=beta)
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(layer(x)), _paper(x, n, k, alpha, beta), rtol=1e-5
        )


def test_kernel_gives_the_composites_outputs_and_gradients(monkeypatch):
    x = tf.constant(np.random.default_rng(1).normal(0, 20, (3, 6, 6, 24)).astype("float32"))
    layer = LocalResponseNormalization()
    y_kernel, g_kernel = _value_and_grad(layer, x)
    with monkeypatch.context() as m:
        m.setattr(models.layers, "_KERNELS", {})
        y_comp, g_comp = _value_and_grad(layer, x)
    np.testing.assert_allclose(y_kernel, y_comp, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(g_kernel, g_comp, rtol=1e-5, atol=1e-6)


def test_kernel_is_one_op_per_direction_in_the_graph():
    layer = LocalResponseNormalization()
    x = tf.random.stateless_normal((2, 4, 4, 8), seed=(1, 2))

    @tf.function
    def train(x):
        return _value_and_grad(layer, x)

    ops = _ops(train, x)
    assert {"LRN", "LRNGrad"} <= ops
    assert not ops & {"Pow", "StridedSlice", "Pad", "Square"}  # the composite's ops


def test_other_ranks_take_the_composite():
    layer = LocalResponseNormalization()
    x = tf.random.stateless_normal((2, 7, 8), seed=(3, 4))  # (batch, time, channels)

    @tf.function
    def forward(x):
        return layer(x)

    assert "LRN" not in _ops(forward, x)
    np.testing.assert_allclose(forward(x), _paper(x.numpy()), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_keeps_the_dtype_and_float32_inside(policy):
    layer = LocalResponseNormalization(dtype=policy)
    x = np.random.default_rng(2).normal(0, 300, (2, 4, 4, 8)).astype("float32")
    y = layer(x)
    assert y.dtype == layer.compute_dtype
    out = keras.ops.convert_to_numpy(keras.ops.cast(y, "float32"))
    # squares of 300 * 10 overflow float16; the kernel works in float32 as the composite does
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, _paper(x), rtol=2e-2, atol=2e-2)


def test_kernel_compiles_with_xla():
    layer = LocalResponseNormalization()
    x = tf.random.stateless_normal((2, 4, 4, 8), seed=(5, 6))
    y, g = tf.function(lambda x: _value_and_grad(layer, x), jit_compile=True)(x)
    y_ref, g_ref = _value_and_grad(layer, x)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-6)


def test_an_unknown_kernel_kind_is_refused():
    with pytest.raises(ValueError, match="kind"):
        models.layers.register_kernel("layer_norm", "tensorflow", lambda layer, x: x)
