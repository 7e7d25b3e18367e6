"""Building blocks shared by every model family: activations, classifier heads, the CNN
blocks (conv-BN-activation, ceil-mode pooling, LRN). Argument checks are in ``models.checks``."""

from __future__ import annotations

import keras

from models.checks import check_choice, check_positive_int

ACTIVATIONS = ("relu", "prelu", "sigmoid", "tanh")


@keras.saving.register_keras_serializable(package="deeptrends")
class ChannelPReLU(keras.layers.PReLU):
    """PReLU with one learned slope per channel, shared over the spatial axes
    (He et al. 2015), whatever the rank of its input; initialised at 0.25."""

    def build(self, input_shape):
        if self.shared_axes is None:
            self.shared_axes = list(range(1, len(input_shape) - 1))
        super().build(input_shape)


# Backend kernels behind layers of this module, by (layer kind, Keras backend). Backend code
# does not live in models/ (backend-agnostic Keras); pipelines/kernels.py registers
# TensorFlow's. Kinds and their signatures:
# - "batch_norm": ``kernel(layer, inputs, training) -> outputs`` for channels-last rank-4
#   ``inputs``, updating the moving statistics as Keras' ``BatchNormalization`` does when
#   ``training`` is true (``FusedBatchNormalization``);
# - "lrn": ``kernel(layer, x) -> y`` for a float32 channels-last rank-4 ``x``, in float32
#   (``LocalResponseNormalization``).
KERNEL_KINDS = ("batch_norm", "lrn")
_KERNELS: dict = {}


def register_kernel(kind: str, backend: str, kernel) -> None:
    """Let the layers of ``kind`` compute through ``kernel`` on Keras backend ``backend``.

    Args:
        kind: str. One of ``KERNEL_KINDS``; the comment above gives each one's signature.
        backend: str. A ``keras.backend.backend()`` name, e.g. ``tensorflow``.
        kernel: callable.
    """
    check_choice("kind", kind, KERNEL_KINDS)
    _KERNELS[(kind, backend)] = kernel


def _kernel(kind: str):
    """The kernel of ``kind`` registered for the running Keras backend, or None."""
    return _KERNELS.get((kind, keras.backend.backend()))


@keras.saving.register_keras_serializable(package="deeptrends")
class FusedBatchNormalization(keras.layers.BatchNormalization):
    """``keras.layers.BatchNormalization`` computed by the backend's fused kernel where one
    is registered (``register_kernel("batch_norm", ...)``; TensorFlow's ``FusedBatchNormV3``, oneDNN
    on CPU, from ``pipelines.kernels``) for channels-last rank-4 inputs: the same weights,
    moving-statistics update (biased batch variance, as Keras) and results to float
    round-off, in one op per direction instead of Keras' composite of moments and
    element-wise ops.

    Under ``mixed_bfloat16`` Keras casts every BatchNorm input up to float32 and its
    output back down (a pair of casts over each activation map); the fused kernel takes the
    bfloat16 map as it is (with float32 scale, offset and statistics), so the network stays
    in bfloat16 between its convolutions. Anything else (a mask, renorm, synchronized
    statistics, another rank or axis, a backend without a registered kernel) is Keras' own
    path, with the same results.
    """

    def call(self, inputs, training=None, mask=None):
        kernel = _kernel("batch_norm")
        fusable = (
            kernel is not None
            and mask is None
            and not self.renorm
            and not self.synchronized
            and len(inputs.shape) == 4
            and self.axis in (-1, 3)
        )
        if not fusable:
            return super().call(inputs, training=training, mask=mask)
        return kernel(self, inputs, bool(training and self.trainable))


def activation_layer(activation: str, name: str) -> keras.layers.Layer:
    """One activation layer by name.

    ``prelu`` is the parametric ReLU of He et al. 2015 ("Delving Deep into Rectifiers"):
    one learned slope per channel (shared over the spatial axes), initialised at 0.25.

    Args:
        activation: str. One of ``relu``, ``prelu``, ``sigmoid``, ``tanh``.
        name: str. The layer name.
    """
    check_choice("activation", activation, ACTIVATIONS)
    if activation == "prelu":
        return ChannelPReLU(alpha_initializer=keras.initializers.Constant(0.25), name=name)
    return keras.layers.Activation(activation, name=name)


def conv_initializer(activation: str) -> keras.initializers.Initializer:
    """He initialisation for rectifiers (He et al. 2015), Glorot for saturating units."""
    if activation in ("relu", "prelu"):
        return keras.initializers.HeNormal()
    return keras.initializers.GlorotUniform()


def classifier_head(
    x,
    num_classes: int,
    name: str = "predictions",
    classifier_activation: str | None = "softmax",
):
    """The final dense layer and its activation, kept in float32 under mixed precision.

    Args:
        x: tensor. Rank-2 features.
        num_classes: int. The number of classes.
        name: str. The name of the dense layer.
        classifier_activation: str or None. ``softmax`` for probabilities, None for logits.
    """
    x = keras.layers.Dense(num_classes, name=name)(x)
    if classifier_activation is not None:
        x = keras.layers.Activation(classifier_activation, dtype="float32", name=f"{name}_act")(x)
    return x


# --- Blocks shared by the ImageNet CNN families (AlexNet, ZFNet, VGG, GoogLeNet, ResNet) ---

BN_MOMENTUM = 0.9
"""BatchNorm moving-average momentum. Keras' default 0.99 leaves the moving statistics
unsettled after the few hundred steps of a short training run; 0.9 is torchvision's."""

BN_EPSILON = 1.001e-5
"""BatchNorm epsilon, as in ``keras.applications`` (so their weights transfer one-to-one)."""

POOLINGS = (None, "avg", "max")


def pool2d(x, pool_size: int, strides: int, name: str, kind: str = "max"):
    """Max or average pooling with the ceil-mode rounding of cuda-convnet and Caffe.

    ``padding="valid"`` when the window tiles the map exactly, ``"same"`` otherwise. For
    the 3x3/2 windows of AlexNet, ZFNet and GoogLeNet ``"same"`` is exactly ceil-mode
    pooling (one trailing row/column of padding on an even map), so ImageNet inputs get
    the papers' map sizes (ZFNet 110 -> 55, 26 -> 13; GoogLeNet 112 -> 56 ...). It also
    means a map smaller than the window is pooled to 1x1 instead of collapsing to 0x0,
    which is how small inputs (32x32) pass through the ImageNet networks.

    Args:
        x: tensor. A rank-4 channels-last feature map.
        pool_size: int. The pooling window.
        strides: int. The pooling stride.
        name: str. The layer name.
        kind: str. ``max`` or ``avg``.
    """
    check_choice("kind", kind, ("max", "avg"))
    sizes = x.shape[1:3]
    exact = all(n is not None and n >= pool_size and (n - pool_size) % strides == 0 for n in sizes)
    padding = "valid" if exact else "same"
    layer = keras.layers.MaxPooling2D if kind == "max" else keras.layers.AveragePooling2D
    return layer(pool_size, strides=strides, padding=padding, name=name)(x)


def conv_bn_act(
    x,
    filters: int,
    kernel_size: int,
    name: str,
    strides: int = 1,
    padding: str = "same",
    activation: str | None = "relu",
    batch_norm: bool = False,
    groups: int = 1,
):
    """Conv2D, then BatchNorm (optional), then the activation.

    The convolution is named ``name``, the others ``{name}_bn`` and ``{name}_act``. The
    convolution has a bias only without BatchNorm (BN's beta replaces it).

    Args:
        x: tensor. A rank-4 channels-last input.
        filters: int. The number of output channels.
        kernel_size: int. The side of the square kernel.
        name: str. The name of the convolution layer.
        strides: int. The convolution stride.
        padding: str. ``same`` or ``valid``.
        activation: str or None. See ``activation_layer``; None for a linear output.
        batch_norm: bool. Whether to insert BatchNorm (Ioffe & Szegedy 2015) before the
            activation.
        groups: int. The number of channel groups (AlexNet's two-GPU layout uses 2).
    """
    x = keras.layers.Conv2D(
        filters,
        kernel_size,
        strides=strides,
        padding=padding,
        groups=groups,
        use_bias=not batch_norm,
        kernel_initializer=conv_initializer(activation or "relu"),
        name=name,
    )(x)
    if batch_norm:
        x = FusedBatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=f"{name}_bn")(x)
    if activation is not None:
        x = activation_layer(activation, f"{name}_act")(x)
    return x


def feature_pooling(x, pooling: str | None, name: str = "feature_pool"):
    """What a headless (``include_top=False``) model returns: the map, or it pooled.

    Args:
        x: tensor. The final rank-4 feature map.
        pooling: str or None. None keeps the map, ``avg``/``max`` pool it globally.
        name: str. The pooling layer's name.
    """
    check_choice("pooling", pooling, POOLINGS)
    if pooling == "avg":
        return keras.layers.GlobalAveragePooling2D(name=name)(x)
    if pooling == "max":
        return keras.layers.GlobalMaxPooling2D(name=name)(x)
    return x


@keras.saving.register_keras_serializable(package="deeptrends")
class LocalResponseNormalization(keras.layers.Layer):
    """Local response normalisation across channels (Krizhevsky, Sutskever & Hinton 2012,
    "ImageNet Classification with Deep Convolutional Neural Networks", section 3.3).

    ``b_i = a_i / (k + alpha * sum_{j=i-n/2}^{i+n/2} a_j^2) ** beta``, the sum over the
    ``n`` channels centred on ``i`` (clipped at the ends). Note that ``alpha`` is not
    divided by ``n`` (Caffe's convention is); this is ``tf.nn.local_response_normalization``
    with ``depth_radius=n // 2, bias=k``. Computed in float32 so squares of activations
    cannot overflow under mixed precision. Channels last.

    For rank-4 inputs the backend's kernel computes it where one is registered
    (``register_kernel("lrn", ...)``; TensorFlow's ``LRN`` and ``LRNGrad`` ops, from
    ``pipelines.kernels``): one op per direction instead of the composite below (a square,
    a pad, ``n`` channel slices and their sum, a power and a division, each with its
    gradient), with the same results to float round-off.

    Args:
        size: int. ``n``, the (odd) number of adjacent channels summed over; 5 in the paper.
        alpha: float. The scale of the sum; 1e-4 in the paper.
        beta: float. The exponent; 0.75 in the paper.
        k: float. The additive constant; 2 in the paper.
    """

    def __init__(self, size=5, alpha=1e-4, beta=0.75, k=2.0, **kwargs):
        super().__init__(**kwargs)
        if check_positive_int("size", size) % 2 == 0:
            raise ValueError(f"`size` must be a positive odd int. Received: size={size!r}")
        self.size = size
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.k = float(k)

    def call(self, inputs):
        x = keras.ops.cast(inputs, "float32")
        kernel = _kernel("lrn")
        if kernel is not None and len(x.shape) == 4:
            return keras.ops.cast(kernel(self, x), inputs.dtype)
        channels = x.shape[-1]
        half = self.size // 2
        padded = keras.ops.pad(keras.ops.square(x), [[0, 0]] * (len(x.shape) - 1) + [[half, half]])
        window = padded[..., 0:channels]
        for offset in range(1, self.size):
            window = window + padded[..., offset : offset + channels]
        y = x / keras.ops.power(self.k + self.alpha * window, self.beta)
        return keras.ops.cast(y, inputs.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"size": self.size, "alpha": self.alpha, "beta": self.beta, "k": self.k})
        return config


def leaf_layers(model):
    """Every layer of ``model`` that is not itself a model, nested models walked in order
    (a backbone inside a classifier, the encoder of a captioner)."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from leaf_layers(layer)
        else:
            yield layer
