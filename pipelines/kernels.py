"""TensorFlow kernels behind backend-agnostic layers of ``models/`` (which may not import
TensorFlow): ``install()`` registers them. ``runtime.configure`` (every run) and importing
``pipelines.loop`` (every bench and test that trains through the loop) install them; the
peer bench, which builds its models outside the loop, installs them itself.

- ``fused_batch_norm``: ``models.layers.FusedBatchNormalization`` through ``FusedBatchNormV3``.
- ``local_response_normalization``: ``models.layers.LocalResponseNormalization`` (AlexNet,
  GoogLeNet) through ``LRN`` / ``LRNGrad``.
"""

from __future__ import annotations


def fused_batch_norm(layer, inputs, training: bool):
    """``layer``'s (a ``FusedBatchNormalization``) output for channels-last rank-4 ``inputs``;
    with ``training``, normalised by the batch's statistics, and the moving mean and
    variance updated as Keras' ``BatchNormalization`` updates them."""
    import tensorflow as tf

    channels = layer.moving_mean.shape[0]
    scale = tf.cast(layer.gamma, "float32") if layer.scale else tf.ones([channels])
    offset = tf.cast(layer.beta, "float32") if layer.center else tf.zeros([channels])
    if training:
        outputs, mean, variance = tf.compat.v1.nn.fused_batch_norm(
            inputs, scale, offset, epsilon=layer.epsilon, is_training=True
        )[:3]
        # The kernel returns the Bessel-corrected variance; Keras' moving variance follows
        # the biased one that normalised the batch.
        count = tf.cast(tf.size(inputs) // channels, "float32")
        variance = variance * (count - 1.0) / tf.maximum(count, 1.0)
        momentum = layer.momentum
        layer.moving_mean.assign(layer.moving_mean * momentum + mean * (1.0 - momentum))
        layer.moving_variance.assign(layer.moving_variance * momentum + variance * (1.0 - momentum))
    else:
        outputs = tf.compat.v1.nn.fused_batch_norm(
            inputs,
            scale,
            offset,
            mean=tf.cast(layer.moving_mean, "float32"),
            variance=tf.cast(layer.moving_variance, "float32"),
            epsilon=layer.epsilon,
            is_training=False,
        )[0]
    return tf.cast(outputs, layer.compute_dtype)


def local_response_normalization(layer, x):
    """``layer``'s (a ``LocalResponseNormalization``) output for the float32 channels-last
    rank-4 ``x``: TensorFlow's ``LRN`` op, whose ``depth_radius`` is half the window and
    whose ``alpha`` multiplies the sum undivided, as the layer's."""
    import tensorflow as tf

    return tf.nn.local_response_normalization(
        x, depth_radius=layer.size // 2, bias=layer.k, alpha=layer.alpha, beta=layer.beta
    )


def install() -> None:
    """Register the kernels with ``models`` (idempotent)."""
    from models.layers import register_kernel

    register_kernel("batch_norm", "tensorflow", fused_batch_norm)
    register_kernel("lrn", "tensorflow", local_response_normalization)
