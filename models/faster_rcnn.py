"""Faster R-CNN (Ren, He, Girshick & Sun 2015, "Faster R-CNN: Towards Real-Time Object
Detection with Region Proposal Networks").

A zoo CNN cut at its stride-16 feature map (``models.backbones``: VGG-16 ``block5_conv3``,
ResNet-50 ``conv4``, or the narrower ResNet-18 ``conv4`` for a CPU) is shared by

* the region proposal network (section 3.1): a 3x3 convolution, then per position ``2k``
  objectness logits (background, object) and ``4k`` box deltas for ``k`` anchors of
  ``len(anchor_sizes)`` scales x ``len(anchor_ratios)`` aspect ratios (3 x 3 in the paper);
* the Fast R-CNN head (Girshick 2015): RoI align (He et al. 2017; the paper's RoI max
  pooling quantises the boxes) of each region to ``roi_size x roi_size``, two
  fully-connected layers, ``num_classes + 1`` class logits (0 is background) and
  class-specific box deltas.

For every backbone the head is the two fully-connected layers of the paper's VGG-16
(``head_units`` wide; the paper's ResNet variant runs conv5 on each region instead, which
costs 20 times more on a CPU).

The network is a functional model ``[images, rois] -> outputs`` so that it is built,
saved and tested like every registered model; the proposal step between the RPN and
the head (decode, clip, NMS) is not differentiable and runs outside it: in the trainer
(``pipelines/trainers/faster_rcnn.py``) and in the exported serving graph. Its parts are
sub-models ``backbone``, ``rpn`` and ``roi_head``, so that the trainer calls them in turn.

Outputs (a dict, float32 under any precision policy):
    ``rpn_scores`` [B, A, 2]: logits (background, object) of the A = H/16 * W/16 * k anchors.
    ``rpn_deltas`` [B, A, 4]: anchor deltas (``models.boxes.encode_boxes``, unit weights).
    ``anchors`` [B, A, 4]: the anchors in input pixels (ymin, xmin, ymax, xmax).
    ``class_logits`` [B, R, num_classes + 1]: of the ``rois`` input.
    ``box_deltas`` [B, R, num_classes, 4]: per class, ``HEAD_WEIGHTS`` coding.
"""

from __future__ import annotations

import keras
from keras import ops

from models.backbones import backbone as cut_backbone
from models.backbones import feature_maps
from models.boxes import RoIAlign, generate_anchors
from models.checks import check_dropout, check_image_shape, check_positive_int
from models.registry import register_model


@keras.saving.register_keras_serializable(package="deeptrends")
class Anchors(keras.layers.Layer):
    """Feature map [B, H, W, C] -> the anchors of its positions [B, H * W * k, 4] in input
    pixels (``models.boxes.generate_anchors``), repeated over the batch.

    Args:
        stride: int. The map's stride in input pixels.
        sizes: list of float. Anchor sizes (square roots of the areas) in pixels.
        ratios: list of float. Height / width ratios.
    """

    def __init__(self, stride: int = 16, sizes=(128, 256, 512), ratios=(0.5, 1.0, 2.0), **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.stride = int(stride)
        self.sizes = [float(s) for s in sizes]
        self.ratios = [float(r) for r in ratios]

    @property
    def num_anchors(self) -> int:
        return len(self.sizes) * len(self.ratios)

    def call(self, features):
        shape = ops.shape(features)
        anchors = generate_anchors(shape[1], shape[2], self.stride, self.sizes, self.ratios)
        return ops.broadcast_to(ops.expand_dims(anchors, 0), (shape[0], ops.shape(anchors)[0], 4))

    def compute_output_shape(self, input_shape):
        b, h, w = input_shape[:3]
        count = None if h is None or w is None else h * w * self.num_anchors
        return (b, count, 4)

    def get_config(self):
        return {
            **super().get_config(),
            "stride": self.stride,
            "sizes": self.sizes,
            "ratios": self.ratios,
        }


def region_proposal_network(
    channels: int, feature_channels: int, stride: int, sizes, ratios, name: str = "rpn"
) -> keras.Model:
    """The RPN of section 3.1: features -> (``rpn_scores`` [B, A, 2], ``rpn_deltas`` [B, A, 4],
    ``anchors`` [B, A, 4]).

    Args:
        channels: int. Width of the 3x3 convolution (512 for VGG-16 in the paper).
        feature_channels: int. Channels of the backbone's map.
        stride: int. The map's stride.
        sizes: list. Anchor sizes in pixels.
        ratios: list. Anchor aspect ratios.
    """
    k = len(sizes) * len(ratios)
    features = keras.Input((None, None, feature_channels), name="features")
    init = keras.initializers.RandomNormal(stddev=0.01)  # the paper's initialisation
    x = keras.layers.Conv2D(
        channels, 3, padding="same", activation="relu", kernel_initializer=init, name="rpn_conv"
    )(features)
    scores = keras.layers.Conv2D(
        2 * k, 1, kernel_initializer=init, dtype="float32", name="rpn_cls"
    )(x)
    deltas = keras.layers.Conv2D(
        4 * k, 1, kernel_initializer=init, dtype="float32", name="rpn_bbox"
    )(x)
    scores = keras.layers.Reshape((-1, 2), dtype="float32", name="rpn_scores")(scores)
    deltas = keras.layers.Reshape((-1, 4), dtype="float32", name="rpn_deltas")(deltas)
    anchors = Anchors(stride, sizes, ratios, name="anchors")(features)
    return keras.Model(features, [scores, deltas, anchors], name=name)


def box_head(
    num_classes: int,
    feature_channels: int,
    roi_size: int,
    units: int,
    dropout: float = 0.0,
    name: str = "box_head",
) -> keras.Model:
    """The Fast R-CNN head after RoI pooling: pooled regions [B, R, S, S, C] ->
    (``class_logits`` [B, R, C + 1], ``box_deltas`` [B, R, C, 4]).

    Args:
        num_classes: int. Foreground classes C.
        feature_channels: int. Channels of the backbone's map.
        roi_size: int. RoI align output bins per side (S).
        units: int. Width of the two fully-connected layers.
        dropout: float. Dropout after each of them (the paper's VGG head: 0.5).
    """
    pooled = keras.Input((None, roi_size, roi_size, feature_channels), name="pooled")
    x = keras.layers.Reshape((-1, roi_size * roi_size * feature_channels), name="roi_flatten")(
        pooled
    )
    for i in (1, 2):
        x = keras.layers.Dense(units, activation="relu", name=f"head_fc{i}")(x)
        if dropout:
            x = keras.layers.Dropout(dropout, name=f"head_dropout{i}")(x)
    logits = keras.layers.Dense(
        num_classes + 1,
        kernel_initializer=keras.initializers.RandomNormal(stddev=0.01),
        dtype="float32",
        name="class_logits",
    )(x)
    deltas = keras.layers.Dense(
        4 * num_classes,
        kernel_initializer=keras.initializers.RandomNormal(stddev=0.001),
        dtype="float32",
        name="box_dense",
    )(x)
    deltas = keras.layers.Reshape((-1, num_classes, 4), dtype="float32", name="box_deltas")(deltas)
    return keras.Model(pooled, [logits, deltas], name=name)


def roi_head(
    num_classes: int,
    feature_channels: int,
    stride: int,
    roi_size: int,
    units: int,
    dropout: float = 0.0,
    name: str = "roi_head",
) -> keras.Model:
    """RoI align then ``box_head``: [features, rois] -> (``class_logits``, ``box_deltas``).
    The ``box_head`` sub-model can be called on regions pooled another way (the trainer
    and the serving graph pool with ``tf.image.crop_and_resize``, the same numbers)."""
    features = keras.Input((None, None, feature_channels), name="features")
    rois = keras.Input((None, 4), name="rois")
    pooled = RoIAlign(stride, roi_size, 2, dtype="float32", name="roi_align")([features, rois])
    logits, deltas = box_head(num_classes, feature_channels, roi_size, units, dropout)(pooled)
    return keras.Model([features, rois], [logits, deltas], name=name)


def faster_rcnn(
    num_classes: int = 20,
    backbone: str = "resnet18",
    input_shape=(None, None, 3),
    feature: str = "stride16",
    anchor_sizes=(128, 256, 512),
    anchor_ratios=(0.5, 1.0, 2.0),
    rpn_channels: int = 512,
    roi_size: int = 7,
    head_units: int = 1024,
    dropout: float = 0.0,
    backbone_kwargs: dict | None = None,
    name: str = "faster_rcnn",
):
    """Build Faster R-CNN as a functional model ``[images, rois] -> outputs`` (see the
    module docstring).

    Args:
        num_classes: int. Foreground classes (20 for VOC); the head adds background.
        backbone: str. A registered CNN that declares ``feature`` (``models.backbones``).
        input_shape: tuple. (H, W, C); H and W None for images of any size.
        feature: str. The backbone's feature map (``stride16``).
        anchor_sizes: list of number. Anchor sizes in input pixels (the paper: 128, 256,
            512 at 600 px).
        anchor_ratios: list of number. Height / width ratios (the paper: 0.5, 1, 2).
        rpn_channels: int. Width of the RPN's 3x3 convolution (512 for VGG-16).
        roi_size: int. RoI align bins per side (7).
        head_units: int. Width of the head's two fully-connected layers (4,096 in the
            paper's VGG-16; 1,024 as in Detectron's box head).
        dropout: float. Dropout in the head.
        backbone_kwargs: dict or None. Passed to the backbone's builder (``activation``,
            ``width_multiplier``...).
        name: str. The model name.
    """
    check_positive_int("num_classes", num_classes)
    input_shape = check_image_shape(input_shape, allow_none=True)
    sizes = _positive_numbers("anchor_sizes", anchor_sizes)
    ratios = _positive_numbers("anchor_ratios", anchor_ratios)
    check_positive_int("rpn_channels", rpn_channels)
    check_positive_int("roi_size", roi_size)
    check_positive_int("head_units", head_units)
    check_dropout(dropout)
    if backbone_kwargs is not None and not isinstance(backbone_kwargs, dict):
        raise ValueError(
            "`backbone_kwargs` must be a dict or None. "
            f"Received: backbone_kwargs={backbone_kwargs!r}"
        )

    cnn = cut_backbone(backbone, feature, input_shape=input_shape, **(backbone_kwargs or {}))
    cnn = keras.Model(cnn.input, cnn.output, name="backbone")
    if feature not in feature_maps(backbone):
        raise ValueError(
            f"`feature` must be a declared feature map of {backbone!r}: "
            f"{list(feature_maps(backbone))}. Received: feature={feature!r}"
        )
    stride = int(feature_maps(backbone)[feature].stride)
    channels = int(cnn.output.shape[-1])
    rpn = region_proposal_network(rpn_channels, channels, stride, sizes, ratios)
    head = roi_head(num_classes, channels, stride, roi_size, head_units, dropout)

    images = keras.Input(input_shape, name="images")
    rois = keras.Input((None, 4), name="rois")
    features = cnn(images)
    scores, deltas, anchors = rpn(features)
    logits, box_deltas = head([features, rois])
    outputs = {
        "rpn_scores": scores,
        "rpn_deltas": deltas,
        "anchors": anchors,
        "class_logits": logits,
        "box_deltas": box_deltas,
    }
    return keras.Model([images, rois], outputs, name=name)


def _positive_numbers(name: str, values) -> list[float]:
    items = list(values) if isinstance(values, (list, tuple)) else None
    if not items or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in items
    ):
        raise ValueError(
            f"`{name}` must be a non-empty list of positive numbers. Received: {name}={values!r}"
        )
    return [float(v) for v in items]


@register_model("faster_rcnn", task="detection", family="faster_rcnn")
def faster_rcnn_detector(**kwargs):
    """Faster R-CNN on a zoo backbone (``backbone`` argument; ResNet-18 by default)."""
    return faster_rcnn(**kwargs)
