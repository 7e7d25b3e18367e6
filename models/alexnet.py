"""AlexNet (Krizhevsky, Sutskever & Hinton 2012, "ImageNet Classification with Deep
Convolutional Neural Networks") and ZFNet (Zeiler & Fergus 2013, "Visualizing and
Understanding Convolutional Networks"), one family: five convolutions, three fully
connected layers, ReLU, local response normalisation, overlapping 3x3/2 max-pooling and
dropout 0.5 in the first two fully connected layers.

AlexNet at 227x227x3 (the size its 11x11/4 first layer implies; 224 gives the same maps
here): 55x55x96 -> pool 27 -> 27x27x256 -> pool 13 -> 13x13x384 -> 13x13x384 -> 13x13x256
-> pool 6x6x256 -> 4096 -> 4096 -> 1000, 62,378,344 parameters; 60,965,224 with
``groups=2``, the paper's two-GPU layout in which conv2, conv4 and conv5 see only the
kernels on their own GPU (conv3 and the dense layers connect across GPUs).

ZFNet at 224x224x3 (the paper's crop): 7x7/2 first layer (1-pixel zero padding) ->
110x110x96 -> pool 55 -> 5x5/2 conv2 -> 26x26x256 -> pool 13 -> three 3x3 layers ->
pool 6x6x256 -> 4096 -> 4096 -> 1000, 62,357,608 parameters (Figure 3 of the paper;
pooling comes before the contrast normalisation there). The paper's renormalisation of
filters whose RMS exceeds 0.1 is a training-time constraint and is not part of the model.

Pooling rounds up (ceil mode, as in cuda-convnet and Caffe; see ``models.layers.pool2d``):
this gives the papers' map sizes and, on small inputs, pools a map smaller than the
window to 1x1 instead of failing. At 32x32 AlexNet's maps are 6 -> 3 -> 3 -> 1 -> 1 and
the first dense layer sees 1x1x256.
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

# The registry metadata of both variants. The feature map: the last convolution (after its
# ReLU) at stride 16, 13x13x256 at 227 (AlexNet) or 224 (ZFNet). The input preprocessing of
# the papers (applied by the classification task): random 224 crops of images resized to
# 256 (crop_fraction 224/256), random flips, PCA colour jitter (alpha ~ N(0, 0.1));
# evaluation on the centre crop.
_ALEXNET = {
    "task": "classification",
    "family": "alexnet",
    "features": {"stride16": FeatureMap(layer="conv5_act", stride=16, channels=256)},
    "preprocessing": {"crop_fraction": 0.875, "flip": True, "pca_jitter": 0.1},
}

# Per convolution: (filters, kernel, stride, zero padding: int or "same",
#                   split over two GPUs, LRN after, max-pool after).
ALEXNET_SPECS = {
    "alexnet": {
        "input_shape": (227, 227, 3),
        "pool_before_norm": False,  # AlexNet: conv -> ReLU -> LRN -> pool
        "convs": [
            (96, 11, 4, 0, False, True, True),
            (256, 5, 1, "same", True, True, True),
            (384, 3, 1, "same", False, False, False),
            (384, 3, 1, "same", True, False, False),
            (256, 3, 1, "same", True, False, True),
        ],
    },
    "zfnet": {
        "input_shape": (224, 224, 3),
        "pool_before_norm": True,  # ZFNet: conv -> ReLU -> pool -> contrast norm
        "convs": [
            (96, 7, 2, 1, False, True, True),
            (256, 5, 2, 0, False, True, True),
            (384, 3, 1, "same", False, False, False),
            (384, 3, 1, "same", False, False, False),
            (256, 3, 1, "same", False, False, True),
        ],
    },
}
FC_UNITS = 4096


def alexnet_family(
    variant: str = "alexnet",
    input_shape=None,
    num_classes: int = 1000,
    include_top: bool = True,
    activation: str = "relu",
    batch_norm: bool = False,
    dropout: float = 0.5,
    lrn: bool = True,
    groups: int = 1,
    classifier_activation: str | None = "softmax",
    pooling: str | None = None,
    name: str | None = None,
):
    """Build AlexNet or ZFNet as a Keras functional model.

    Args:
        variant: str. ``alexnet`` or ``zfnet``, a key of ``ALEXNET_SPECS``.
        input_shape: tuple. Image shape (H, W, C), H and W >= 32; None for the paper's
            (227x227x3 for AlexNet, 224x224x3 for ZFNet).
        num_classes: int. The number of output classes.
        include_top: bool. Whether to end with the three dense layers and the classifier;
            without them the model returns the last (pooled, 6x6x256 at ImageNet size)
            convolutional map, or its global pooling (see ``pooling``).
        activation: str. ``relu`` (the papers'), ``prelu``, ``sigmoid`` or ``tanh``.
        batch_norm: bool. Whether to add BatchNorm after every convolution (the papers
            have none; the convolutions then have no bias).
        dropout: float. The dropout rate after the two 4096-unit layers; 0.5 in the papers.
        lrn: bool. Whether to keep local response normalisation (k=2, n=5, alpha=1e-4,
            beta=0.75) after the first two convolutional stages.
        groups: int. 1, or 2 for AlexNet's two-GPU layout: conv2, conv4 and conv5 as
            grouped convolutions (60,965,224 parameters instead of 62,378,344).
        classifier_activation: str or None. ``softmax``, or None for logits.
        pooling: str or None. With ``include_top=False``: None returns the map, ``avg`` or
            ``max`` pools it globally.
        name: str. The model name; None for ``variant``.
    """
    check_choice("variant", variant, tuple(ALEXNET_SPECS))
    check_choice("activation", activation, ACTIVATIONS)
    spec = ALEXNET_SPECS[variant]
    input_shape = check_image_shape(
        spec["input_shape"] if input_shape is None else input_shape, min_size=32
    )
    check_num_classes(num_classes, include_top)
    check_dropout(dropout)
    check_choice("groups", groups, (1, 2))
    if groups != 1 and not any(conv[4] for conv in spec["convs"]):
        raise ValueError(
            f"`groups` applies to AlexNet's two-GPU layout only; {variant} has dense "
            f"connections throughout. Received: groups={groups!r}"
        )
    check_choice("pooling", pooling, POOLINGS)
    check_bool("batch_norm", batch_norm)
    check_bool("lrn", lrn)
    name = name or variant

    inputs = keras.Input(shape=input_shape, name="images")
    x = inputs
    for i, (filters, kernel, stride, pad, split, norm, pool) in enumerate(spec["convs"], 1):
        if isinstance(pad, int) and pad > 0:
            x = keras.layers.ZeroPadding2D(pad, name=f"conv{i}_pad")(x)
        x = conv_bn_act(
            x,
            filters,
            kernel,
            name=f"conv{i}",
            strides=stride,
            padding="same" if pad == "same" else "valid",
            activation=activation,
            batch_norm=batch_norm,
            groups=groups if split else 1,
        )
        if norm and lrn and not spec["pool_before_norm"]:
            x = LocalResponseNormalization(name=f"conv{i}_lrn")(x)
        if pool:
            x = pool2d(x, 3, 2, name=f"pool{i}")
        if norm and lrn and spec["pool_before_norm"]:
            x = LocalResponseNormalization(name=f"conv{i}_lrn")(x)

    if not include_top:
        return keras.Model(inputs, feature_pooling(x, pooling), name=name)
    x = keras.layers.Flatten(name="flatten")(x)
    for i in (6, 7):
        x = keras.layers.Dense(
            FC_UNITS, kernel_initializer=conv_initializer(activation), name=f"fc{i}"
        )(x)
        x = activation_layer(activation, f"fc{i}_act")(x)
        if dropout:
            x = keras.layers.Dropout(dropout, name=f"fc{i}_dropout")(x)
    x = classifier_head(x, num_classes, "predictions", classifier_activation)
    return keras.Model(inputs, x, name=name)


@register_model("alexnet", **_ALEXNET)
def alexnet(**kwargs):
    return alexnet_family("alexnet", **kwargs)


@register_model("zfnet", **_ALEXNET)
def zfnet(**kwargs):
    return alexnet_family("zfnet", **kwargs)
