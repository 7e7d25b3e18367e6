"""GoogLeNet, Inception v1 (Szegedy et al. 2015, "Going Deeper with Convolutions").

Stem: 7x7/2 convolution (64) -> 3x3/2 max-pool -> LRN -> 1x1 (64) -> 3x3 (192) -> LRN ->
3x3/2 max-pool; then inception modules 3a, 3b, pool, 4a-4e, pool, 5a, 5b (Table 1 of the
paper); 7x7 average pool -> dropout 0.4 -> linear -> softmax. An inception module
concatenates four branches: 1x1; 1x1 reduce -> 3x3; 1x1 reduce -> 5x5; 3x3/1 max-pool ->
1x1 pool projection. Every convolution has a bias and a ReLU.

Auxiliary classifiers (section 5) on the outputs of 4a and 4d: 5x5/3 average pool (4x4
at 224x224) -> 1x1 convolution (128) -> dense 1024 -> dropout 0.7 -> linear -> softmax.
During training their losses are added with weight 0.3; at inference they are discarded.
With ``aux_logits=True`` (the default) the model has three outputs, in this order:
``[main, aux1, aux2]``, from layers named ``predictions_act``, ``predictions_aux1_act``
and ``predictions_aux2_act`` (``predictions``, ``predictions_aux1``, ``predictions_aux2``
without a classifier activation), so the main output is first both in the list and in
name order. Only the main output should be served.

At 224x224x3 with 1,000 classes: 6,998,552 parameters without the auxiliary heads,
13,378,280 with both. Pooling rounds up as in Caffe (``models.layers.pool2d``), which
gives the paper's 112 -> 56 -> 28 -> 14 -> 7 maps; the final 7x7 average pool is a global
average pool (the same at 224), so the network also runs on 32x32 inputs, where the 3x3/2
pools take 16 -> 8 -> 4 -> 2 -> 1 and the auxiliary 5x5/3 pools see 2x2 maps (pooled,
with ``padding="same"``, to 1x1).
"""

from __future__ import annotations

import keras

from models.checks import (
    check_bool,
    check_choice,
    check_dropout,
    check_image_shape,
    check_num_classes,
)
from models.layers import (
    ACTIVATIONS,
    POOLINGS,
    LocalResponseNormalization,
    activation_layer,
    classifier_head,
    conv_bn_act,
    conv_initializer,
    feature_pooling,
    pool2d,
)
from models.registry import FeatureMap, register_model

# Table 1: #1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj; "pool" is a 3x3/2 max-pool.
INCEPTION_V1_SPECS = (
    ("3a", (64, 96, 128, 16, 32, 32)),
    ("3b", (128, 128, 192, 32, 96, 64)),
    ("pool", None),
    ("4a", (192, 96, 208, 16, 48, 64)),
    ("4b", (160, 112, 224, 24, 64, 64)),
    ("4c", (128, 128, 256, 24, 64, 64)),
    ("4d", (112, 144, 288, 32, 64, 64)),
    ("4e", (256, 160, 320, 32, 128, 128)),
    ("pool", None),
    ("5a", (256, 160, 320, 32, 128, 128)),
    ("5b", (384, 192, 384, 48, 128, 128)),
)
AUX_AFTER = {"4a": "aux1", "4d": "aux2"}
AUX_LOSS_WEIGHT = 0.3
"""The weight of each auxiliary classifier's loss in the total (section 5)."""
AUX_DROPOUT = 0.7


def inception_module(x, spec, name, activation, batch_norm):
    """One Inception v1 module: four branches concatenated on the channel axis.

    Args:
        x: tensor. The module input, channels last.
        spec: tuple. ``(#1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj)``.
        name: str. The prefix of the layer names, e.g. ``inception_3a``.
        activation: str. The activation after every convolution.
        batch_norm: bool. Whether to add BatchNorm after every convolution.
    """
    n1x1, n3x3r, n3x3, n5x5r, n5x5, npool = spec
    conv = dict(activation=activation, batch_norm=batch_norm)
    b1 = conv_bn_act(x, n1x1, 1, name=f"{name}_1x1", **conv)
    b2 = conv_bn_act(x, n3x3r, 1, name=f"{name}_3x3_reduce", **conv)
    b2 = conv_bn_act(b2, n3x3, 3, name=f"{name}_3x3", **conv)
    b3 = conv_bn_act(x, n5x5r, 1, name=f"{name}_5x5_reduce", **conv)
    b3 = conv_bn_act(b3, n5x5, 5, name=f"{name}_5x5", **conv)
    b4 = keras.layers.MaxPooling2D(3, strides=1, padding="same", name=f"{name}_pool")(x)
    b4 = conv_bn_act(b4, npool, 1, name=f"{name}_pool_proj", **conv)
    return keras.layers.Concatenate(axis=-1, name=f"{name}_output")([b1, b2, b3, b4])


def auxiliary_classifier(x, num_classes, name, activation, batch_norm, classifier_activation):
    """An auxiliary classifier (section 5 of the paper) on an intermediate map.

    Args:
        x: tensor. The output of inception 4a or 4d.
        num_classes: int. The number of output classes.
        name: str. ``aux1`` or ``aux2``; the output layer is ``predictions_{name}``.
        activation: str. The activation after the convolution and the dense layer.
        batch_norm: bool. Whether to add BatchNorm after the convolution.
        classifier_activation: str or None. ``softmax``, or None for logits.
    """
    x = pool2d(x, 5, 3, name=f"{name}_pool", kind="avg")  # 4x4x512 (528) at 224x224
    x = conv_bn_act(x, 128, 1, name=f"{name}_conv", activation=activation, batch_norm=batch_norm)
    x = keras.layers.Flatten(name=f"{name}_flatten")(x)
    x = keras.layers.Dense(
        1024, kernel_initializer=conv_initializer(activation), name=f"{name}_fc"
    )(x)
    x = activation_layer(activation, f"{name}_fc_act")(x)
    x = keras.layers.Dropout(AUX_DROPOUT, name=f"{name}_dropout")(x)
    return classifier_head(x, num_classes, f"predictions_{name}", classifier_activation)


def inception_v1(
    input_shape=(224, 224, 3),
    num_classes: int = 1000,
    include_top: bool = True,
    activation: str = "relu",
    batch_norm: bool = False,
    dropout: float = 0.4,
    aux_logits: bool = True,
    lrn: bool = True,
    classifier_activation: str | None = "softmax",
    pooling: str | None = None,
    name: str = "googlenet",
):
    """Build GoogLeNet (Inception v1) as a Keras functional model.

    Args:
        input_shape: tuple. Image shape (H, W, C); H, W >= 32. None is allowed unless
            the auxiliary classifiers are built (their dense layer needs a fixed size).
        num_classes: int. The number of output classes.
        include_top: bool. Whether to end with the classifier(s); without them the model
            has one output, the 5b map (7x7x1024 at 224x224) or its global pooling (see
            ``pooling``), and ``aux_logits`` is ignored.
        activation: str. ``relu`` (the paper's), ``prelu``, ``sigmoid`` or ``tanh``.
        batch_norm: bool. Whether to add BatchNorm after every convolution (the paper has
            none; the convolutions then have no bias).
        dropout: float. The dropout rate before the main classifier; 0.4 in the paper.
            The auxiliary heads keep the paper's 0.7.
        aux_logits: bool. Whether to add the two auxiliary classifiers, making the model's
            outputs ``[main, aux1, aux2]``. Train with loss weights
            ``[1, AUX_LOSS_WEIGHT, AUX_LOSS_WEIGHT]``; serve the main output only.
        lrn: bool. Whether to keep the two local response normalisations of the stem.
        classifier_activation: str or None. ``softmax``, or None for logits.
        pooling: str or None. With ``include_top=False``: None returns the map, ``avg`` or
            ``max`` pools it globally.
        name: str. The model name.
    """
    check_bool("aux_logits", aux_logits)
    check_bool("batch_norm", batch_norm)
    check_bool("lrn", lrn)
    input_shape = check_image_shape(
        input_shape, min_size=32, allow_none=not (include_top and aux_logits)
    )
    check_num_classes(num_classes, include_top)
    check_dropout(dropout)
    check_choice("activation", activation, ACTIVATIONS)
    check_choice("pooling", pooling, POOLINGS)
    conv = dict(activation=activation, batch_norm=batch_norm)

    inputs = keras.Input(shape=input_shape, name="images")
    x = keras.layers.ZeroPadding2D(3, name="conv1_pad")(inputs)  # Caffe's pad 3
    x = conv_bn_act(x, 64, 7, name="conv1_7x7_s2", strides=2, padding="valid", **conv)  # 112
    x = pool2d(x, 3, 2, name="pool1_3x3_s2")  # 56x56x64
    if lrn:
        x = LocalResponseNormalization(name="pool1_norm1")(x)
    x = conv_bn_act(x, 64, 1, name="conv2_3x3_reduce", **conv)
    x = conv_bn_act(x, 192, 3, name="conv2_3x3", **conv)  # 56x56x192
    if lrn:
        x = LocalResponseNormalization(name="conv2_norm2")(x)
    x = pool2d(x, 3, 2, name="pool2_3x3_s2")  # 28x28x192

    aux_outputs = []
    pools = 2
    for key, spec in INCEPTION_V1_SPECS:
        if spec is None:
            pools += 1
            x = pool2d(x, 3, 2, name=f"pool{pools}_3x3_s2")  # 14x14, then 7x7
            continue
        x = inception_module(x, spec, f"inception_{key}", **conv)
        if include_top and aux_logits and key in AUX_AFTER:
            aux_outputs.append(
                auxiliary_classifier(
                    x,
                    num_classes,
                    AUX_AFTER[key],
                    classifier_activation=classifier_activation,
                    **conv,
                )
            )

    if not include_top:
        return keras.Model(inputs, feature_pooling(x, pooling), name=name)
    x = keras.layers.GlobalAveragePooling2D(name="pool5_7x7_s1")(x)  # 1024
    if dropout:
        x = keras.layers.Dropout(dropout, name="pool5_dropout")(x)
    x = classifier_head(x, num_classes, "predictions", classifier_activation)
    outputs = [x, *aux_outputs] if aux_logits else x
    return keras.Model(inputs, outputs, name=name)


# Input preprocessing (registry metadata, applied by the classification task): random crops
# of resized images (224 of 256) and flips; evaluation on the centre crop. The paper's
# aspect-ratio crops and photometric distortions (Howard 2013) are not reproduced.
# Feature map: the output of inception 4e, before the fourth pool (14x14x832 at 224x224).
@register_model(
    "googlenet",
    task="classification",
    family="googlenet",
    features={"stride16": FeatureMap(layer="inception_4e_output", stride=16, channels=832)},
    preprocessing={"crop_fraction": 0.875, "flip": True, "pca_jitter": 0.0},
)
def googlenet(**kwargs):
    return inception_v1(**kwargs)
