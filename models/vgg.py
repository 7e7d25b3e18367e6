"""VGG (Simonyan & Zisserman 2015, "Very Deep Convolutional Networks for Large-Scale Image
Recognition"), configurations A, B, D and E of Table 1: VGG-11, -13, -16 and -19.

Five blocks of 3x3/1 convolutions (64, 128, 256, 512, 512 channels) each closed by a
2x2/2 max-pool, then 4096 -> 4096 -> classes. At 224x224x3 the last map is 7x7x512 and
the parameter counts are the paper's (Table 2): 133, 133, 138 and 144 million
(132,863,336 / 133,047,848 / 138,357,544 / 143,667,240). Layer names follow
``keras.applications.VGG16`` (``block1_conv1`` ... ``fc1``, ``fc2``, ``predictions``), so
its weights load by name.

Small inputs: the five pools halve 32x32 down to 1x1 exactly; a map already smaller than
the 2x2 window (inputs under 32, or odd sizes) is pooled with ``padding="same"`` so it
never collapses (see ``models.layers.pool2d``). ``width_multiplier`` narrows every layer,
convolutional and dense, for small-data training.
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
)
from models.layers import (
    ACTIVATIONS,
    POOLINGS,
    activation_layer,
    classifier_head,
    conv_bn_act,
    conv_initializer,
    feature_pooling,
    pool2d,
)
from models.registry import FeatureMap, register_model

# The registry metadata of every variant. The input preprocessing of the paper (section
# 3.1; applied by the classification task): random crops of rescaled images (224 of 256),
# random flips and AlexNet's random RGB colour shift; evaluation on the centre crop.
_VGG = {
    "task": "classification",
    "family": "vgg",
    "preprocessing": {"crop_fraction": 0.875, "flip": True, "pca_jitter": 0.1},
}

# depth -> convolutions per block (Table 1, configurations A, B, D, E).
VGG_SPECS = {
    11: (1, 1, 2, 2, 2),
    13: (2, 2, 2, 2, 2),
    16: (2, 2, 3, 3, 3),
    19: (2, 2, 4, 4, 4),
}
BLOCK_FILTERS = (64, 128, 256, 512, 512)
FC_UNITS = 4096


def vgg(
    depth: int,
    input_shape=(224, 224, 3),
    num_classes: int = 1000,
    include_top: bool = True,
    activation: str = "relu",
    batch_norm: bool = False,
    dropout: float = 0.5,
    width_multiplier: float = 1.0,
    classifier_activation: str | None = "softmax",
    pooling: str | None = None,
    name: str | None = None,
):
    """Build a VGG network as a Keras functional model.

    Args:
        depth: int. The number of weight layers: 11, 13, 16 or 19 (keys of ``VGG_SPECS``).
        input_shape: tuple. Image shape (H, W, C), H and W >= 32 (None allowed without
            the top, whose first dense layer needs a fixed map size).
        num_classes: int. The number of output classes.
        include_top: bool. Whether to end with the three dense layers; without them the
            model returns the last pooled map (7x7x512 at 224x224), or its global pooling
            (see ``pooling``).
        activation: str. ``relu`` (the paper's), ``prelu``, ``sigmoid`` or ``tanh``.
        batch_norm: bool. Whether to add BatchNorm after every convolution (VGG-BN; the
            convolutions then have no bias).
        dropout: float. The dropout rate after each 4096-unit layer; 0.5 in the paper.
        width_multiplier: float. Scales the number of channels of every convolution and
            the units of the two hidden dense layers (each rounded, at least 1); 1.0 is
            the paper's network.
        classifier_activation: str or None. ``softmax``, or None for logits.
        pooling: str or None. With ``include_top=False``: None returns the map, ``avg`` or
            ``max`` pools it globally.
        name: str. The model name; None for ``vgg{depth}``.
    """
    check_choice("depth", depth, sorted(VGG_SPECS))
    check_positive_number("width_multiplier", width_multiplier)
    input_shape = check_image_shape(input_shape, min_size=32, allow_none=not include_top)
    check_choice("activation", activation, ACTIVATIONS)
    check_num_classes(num_classes, include_top)
    check_dropout(dropout)
    check_bool("batch_norm", batch_norm)
    check_choice("pooling", pooling, POOLINGS)

    def width(units):
        return max(1, round(units * width_multiplier))

    inputs = keras.Input(shape=input_shape, name="images")
    x = inputs
    for block, (convs, filters) in enumerate(zip(VGG_SPECS[depth], BLOCK_FILTERS, strict=True), 1):
        for i in range(1, convs + 1):
            x = conv_bn_act(
                x,
                width(filters),
                3,
                name=f"block{block}_conv{i}",
                activation=activation,
                batch_norm=batch_norm,
            )
        x = pool2d(x, 2, 2, name=f"block{block}_pool")

    if not include_top:
        return keras.Model(inputs, feature_pooling(x, pooling), name=name or f"vgg{depth}")
    x = keras.layers.Flatten(name="flatten")(x)
    for i in (1, 2):
        x = keras.layers.Dense(
            width(FC_UNITS), kernel_initializer=conv_initializer(activation), name=f"fc{i}"
        )(x)
        x = activation_layer(activation, f"fc{i}_act")(x)
        if dropout:
            x = keras.layers.Dropout(dropout, name=f"fc{i}_dropout")(x)
    x = classifier_head(x, num_classes, "predictions", classifier_activation)
    return keras.Model(inputs, x, name=name or f"vgg{depth}")


# The last convolution of block 5 (after its activation), before the fifth pool:
# stride 16, the 14x14x512 map of a 224x224 image (detection's stride-16 map, captioning's
# 14x14 grid; Show, Attend and Tell use VGG-19's conv5_4).
@register_model(
    "vgg11",
    **_VGG,
    features={"stride16": FeatureMap(layer="block5_conv2_act", stride=16, channels=512)},
)
def vgg11(**kwargs):
    return vgg(11, **kwargs)


@register_model(
    "vgg13",
    **_VGG,
    features={"stride16": FeatureMap(layer="block5_conv2_act", stride=16, channels=512)},
)
def vgg13(**kwargs):
    return vgg(13, **kwargs)


@register_model(
    "vgg16",
    **_VGG,
    features={"stride16": FeatureMap(layer="block5_conv3_act", stride=16, channels=512)},
)
def vgg16(**kwargs):
    return vgg(16, **kwargs)


@register_model(
    "vgg19",
    **_VGG,
    features={"stride16": FeatureMap(layer="block5_conv4_act", stride=16, channels=512)},
)
def vgg19(**kwargs):
    return vgg(19, **kwargs)
