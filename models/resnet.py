"""ResNet (He, Zhang, Ren & Sun 2016, "Deep Residual Learning for Image Recognition") and
the paper's plain baselines (the same stacks without shortcuts, section 4.1).

7x7/2 convolution (64) -> 3x3/2 max-pool -> four stages (64, 128, 256, 512 channels at
56, 28, 14, 7 pixels for a 224x224 input) -> global average pool -> classes. Basic blocks
(two 3x3 convolutions) for 18 and 34 layers, bottleneck blocks (1x1 reduce, 3x3, 1x1
expand by 4) for 50, 101 and 152; BatchNorm after every convolution, before the
activation. The first block of stages 3-5 downsamples with stride 2, on the first 1x1
of a bottleneck as in the paper (ResNet v1, not torchvision's v1.5), and projects the
shortcut with a 1x1 convolution + BatchNorm wherever its shape changes (option B).

Parameter counts at 224x224x3 with 1,000 classes, convolutions without bias (BN's beta
takes its place), trainable weights only: 11,689,512 / 21,797,672 / 25,557,032 /
44,549,160 / 60,192,808 (the torchvision counts). Padding and layer names follow
``keras.applications.ResNet50`` (``conv1_pad``, ``conv2_block1_1_conv``, ...), whose
weights load by name with ``use_bias=True``.

Small inputs need no change: with explicit zero padding every layer keeps a map of at
least 1x1 (32x32 gives 16 -> 8 -> 8, 4, 2, 1). H and W may be None (a fully
convolutional backbone).
"""

from __future__ import annotations

import keras

from models.checks import (
    check_bool,
    check_choice,
    check_dropout,
    check_image_shape,
    check_num_classes,
    check_positive_number,
    check_rate,
)
from models.layers import (
    ACTIVATIONS,
    BN_EPSILON,
    BN_MOMENTUM,
    POOLINGS,
    FusedBatchNormalization,
    activation_layer,
    classifier_head,
    conv_initializer,
    feature_pooling,
)
from models.registry import FeatureMap, register_model

# The registry metadata of every variant. The input preprocessing of the paper (section
# 3.4; applied by the classification task): random 224 crops of resized images, flips and
# the standard colour augmentation of AlexNet; evaluation on the centre crop (the paper's
# scale jitter [256, 480] is not reproduced).
_RESNET = {
    "task": "classification",
    "family": "resnet",
    "preprocessing": {"crop_fraction": 0.875, "flip": True, "pca_jitter": 0.1},
}

# depth -> (block kind, blocks per stage) (Table 1 of the paper).
RESNET_SPECS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
STAGE_FILTERS = (64, 128, 256, 512)
EXPANSION = {"basic": 1, "bottleneck": 4}


def _conv_bn(x, filters, kernel_size, strides, name, opts):
    """Conv2D ``{name}_conv`` then (optionally) BatchNorm ``{name}_bn``; no activation.

    A strided 3x3 convolution pads one pixel on every side (``{name}_pad``), as the paper's
    and torchvision's do; ``padding="same"`` would pad only after an even map.
    """
    padding = "same"
    if strides > 1 and kernel_size > 1:
        x = keras.layers.ZeroPadding2D(kernel_size // 2, name=f"{name}_pad")(x)
        padding = "valid"
    x = keras.layers.Conv2D(
        filters,
        kernel_size,
        strides=strides,
        padding=padding,
        use_bias=opts["use_bias"],
        kernel_initializer=conv_initializer(opts["activation"]),
        name=f"{name}_conv",
    )(x)
    if opts["batch_norm"]:
        x = FusedBatchNormalization(
            momentum=opts["bn_momentum"], epsilon=opts["bn_epsilon"], name=f"{name}_bn"
        )(x)
    return x


def residual_block(x, filters, strides, kind, name, opts):
    """One basic or bottleneck block, with or without its shortcut.

    Args:
        x: tensor. The block input, channels last.
        filters: int. The number of channels of the 3x3 convolutions (the block outputs
            ``filters * EXPANSION[kind]``).
        strides: int. The stride of the first convolution (2 to downsample).
        kind: str. ``basic`` or ``bottleneck``.
        name: str. The prefix of the layer names, e.g. ``conv3_block1``.
        opts: dict. ``activation``, ``batch_norm``, ``use_bias``, ``bn_momentum``,
            ``bn_epsilon`` and ``residual`` (False for the plain baseline).
    """
    out_filters = filters * EXPANSION[kind]
    shortcut = x
    if opts["residual"] and (strides != 1 or x.shape[-1] != out_filters):
        shortcut = _conv_bn(x, out_filters, 1, strides, f"{name}_0", opts)
    if kind == "basic":
        x = _conv_bn(x, filters, 3, strides, f"{name}_1", opts)
        x = activation_layer(opts["activation"], f"{name}_1_act")(x)
        x = _conv_bn(x, filters, 3, 1, f"{name}_2", opts)
    else:
        x = _conv_bn(x, filters, 1, strides, f"{name}_1", opts)
        x = activation_layer(opts["activation"], f"{name}_1_act")(x)
        x = _conv_bn(x, filters, 3, 1, f"{name}_2", opts)
        x = activation_layer(opts["activation"], f"{name}_2_act")(x)
        x = _conv_bn(x, out_filters, 1, 1, f"{name}_3", opts)
    if opts["residual"]:
        x = keras.layers.Add(name=f"{name}_add")([shortcut, x])
    return activation_layer(opts["activation"], f"{name}_out")(x)


def resnet(
    depth: int,
    input_shape=(224, 224, 3),
    num_classes: int = 1000,
    include_top: bool = True,
    activation: str = "relu",
    batch_norm: bool = True,
    dropout: float = 0.0,
    use_bias: bool = False,
    residual: bool = True,
    bn_momentum: float = BN_MOMENTUM,
    bn_epsilon: float = BN_EPSILON,
    classifier_activation: str | None = "softmax",
    pooling: str | None = None,
    name: str | None = None,
):
    """Build a ResNet (or its plain counterpart) as a Keras functional model.

    Args:
        depth: int. The number of weight layers: 18, 34, 50, 101 or 152 (keys of
            ``RESNET_SPECS``).
        input_shape: tuple. Image shape (H, W, C); H, W >= 32, or None.
        num_classes: int. The number of output classes.
        include_top: bool. Whether to end with global average pooling and the classifier;
            without it the model returns the last stage's map (7x7x2048 for ResNet-50 at
            224x224), or its global pooling (see ``pooling``).
        activation: str. ``relu`` (the paper's), ``prelu``, ``sigmoid`` or ``tanh``.
        batch_norm: bool. Whether to use BatchNorm after each convolution, as the paper
            does. Without it, consider ``use_bias=True``.
        dropout: float. The dropout rate before the classifier; 0 (the paper has none).
        use_bias: bool. Whether the convolutions have a bias. False (redundant before
            BatchNorm, the torchvision counts); True matches ``keras.applications``.
        residual: bool. Whether the blocks have shortcuts; False builds the paper's
            plain network of the same depth.
        bn_momentum: float. The BatchNorm moving-average momentum; 0.9 (Keras' 0.99
            leaves the moving statistics unsettled in short runs).
        bn_epsilon: float. The BatchNorm epsilon; 1.001e-5 as in ``keras.applications``.
        classifier_activation: str or None. ``softmax``, or None for logits.
        pooling: str or None. With ``include_top=False``: None returns the map, ``avg`` or
            ``max`` pools it globally.
        name: str. The model name; None for ``resnet{depth}`` (``plain{depth}``).
    """
    check_choice("depth", depth, sorted(RESNET_SPECS))
    input_shape = check_image_shape(input_shape, min_size=32, allow_none=True)
    check_num_classes(num_classes, include_top)
    check_dropout(dropout)
    check_choice("pooling", pooling, POOLINGS)
    check_choice("activation", activation, ACTIVATIONS)
    check_bool("batch_norm", batch_norm)
    check_bool("use_bias", use_bias)
    check_bool("residual", residual)
    check_rate("bn_momentum", bn_momentum)
    check_positive_number("bn_epsilon", bn_epsilon)
    kind, blocks = RESNET_SPECS[depth]
    opts = {
        "activation": activation,
        "batch_norm": batch_norm,
        "use_bias": use_bias,
        "bn_momentum": bn_momentum,
        "bn_epsilon": bn_epsilon,
        "residual": residual,
    }

    inputs = keras.Input(shape=input_shape, name="images")
    x = keras.layers.ZeroPadding2D(3, name="conv1_pad")(inputs)
    x = keras.layers.Conv2D(
        64,
        7,
        strides=2,
        use_bias=use_bias,
        kernel_initializer=conv_initializer(activation),
        name="conv1_conv",
    )(x)  # 112x112x64
    if batch_norm:
        x = FusedBatchNormalization(momentum=bn_momentum, epsilon=bn_epsilon, name="conv1_bn")(x)
    x = activation_layer(activation, "conv1_act")(x)
    x = keras.layers.ZeroPadding2D(1, name="pool1_pad")(x)
    x = keras.layers.MaxPooling2D(3, strides=2, name="pool1_pool")(x)  # 56x56x64
    for stage, (count, filters) in enumerate(zip(blocks, STAGE_FILTERS, strict=True), 2):
        for block in range(1, count + 1):
            strides = 2 if block == 1 and stage > 2 else 1
            x = residual_block(x, filters, strides, kind, f"conv{stage}_block{block}", opts)

    default_name = f"resnet{depth}" if residual else f"plain{depth}"
    if not include_top:
        return keras.Model(inputs, feature_pooling(x, pooling), name=name or default_name)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    if dropout:
        x = keras.layers.Dropout(dropout, name="top_dropout")(x)
    x = classifier_head(x, num_classes, "predictions", classifier_activation)
    return keras.Model(inputs, x, name=name or default_name)


# Feature map: the output of stage 4 ("conv4", its last block), stride 16: 14x14 at 224x224,
# 256 channels for basic blocks, 1024 for bottlenecks (Faster R-CNN's ResNet backbone).
@register_model(
    "resnet18",
    **_RESNET,
    features={"stride16": FeatureMap(layer="conv4_block2_out", stride=16, channels=256)},
)
def resnet18(**kwargs):
    return resnet(18, **kwargs)


@register_model(
    "resnet34",
    **_RESNET,
    features={"stride16": FeatureMap(layer="conv4_block6_out", stride=16, channels=256)},
)
def resnet34(**kwargs):
    return resnet(34, **kwargs)


@register_model(
    "resnet50",
    **_RESNET,
    features={"stride16": FeatureMap(layer="conv4_block6_out", stride=16, channels=1024)},
)
def resnet50(**kwargs):
    return resnet(50, **kwargs)


@register_model(
    "resnet101",
    **_RESNET,
    features={"stride16": FeatureMap(layer="conv4_block23_out", stride=16, channels=1024)},
)
def resnet101(**kwargs):
    return resnet(101, **kwargs)


@register_model(
    "resnet152",
    **_RESNET,
    features={"stride16": FeatureMap(layer="conv4_block36_out", stride=16, channels=1024)},
)
def resnet152(**kwargs):
    return resnet(152, **kwargs)


# The plain baselines: the same stacks (and layer names) without shortcuts.
@register_model(
    "plain18",
    **_RESNET,
    features={"stride16": FeatureMap(layer="conv4_block2_out", stride=16, channels=256)},
)
def plain18(**kwargs):
    return resnet(18, residual=False, **kwargs)


@register_model(
    "plain34",
    **_RESNET,
    features={"stride16": FeatureMap(layer="conv4_block6_out", stride=16, channels=256)},
)
def plain34(**kwargs):
    return resnet(34, residual=False, **kwargs)
