"""R-CNN (Girshick, Donahue, Darrell & Malik 2014, "Rich feature hierarchies for accurate
object detection and semantic segmentation").

Each region proposal (selective search or EdgeBoxes, ``data/proposals.py``) is warped to
the CNN's input size with 16 pixels of context and classified by a zoo CNN: here a
registered backbone cut at its stride-16 map (``models.backbones``), globally averaged,
one fully-connected layer (the paper's fc7: AlexNet), then ``num_classes + 1`` class
logits (0 is background) and class-specific box deltas (``models.boxes`` coding,
weights 10, 10, 5, 5). The paper trains linear SVMs on fc7 and a ridge regressor on
pool5 after fine-tuning; we keep the fine-tuned softmax (its appendix: a little below the
SVMs) and train the regressor jointly: one network, trained by ``trainers/rcnn.py``.

Outputs (a dict, float32 under any precision policy):
    ``class_logits`` [N, num_classes + 1] and ``box_deltas`` [N, num_classes, 4] of the
    ``N`` warped regions.
"""

from __future__ import annotations

import keras

from models.backbones import backbone as cut_backbone
from models.checks import check_dropout, check_image_shape, check_positive_int
from models.registry import register_model


def rcnn(
    num_classes: int = 20,
    backbone: str = "resnet18",
    input_shape=(224, 224, 3),
    feature: str = "stride16",
    head_units: int = 1024,
    dropout: float = 0.5,
    backbone_kwargs: dict | None = None,
    name: str = "rcnn",
):
    """Build R-CNN's region classifier and box regressor.

    Args:
        num_classes: int. Foreground classes (20 for VOC); the head adds background.
        backbone: str. A registered CNN that declares ``feature``.
        input_shape: tuple. The warped region's (H, W, C) (the paper: 227 x 227).
        feature: str. The backbone's feature map to pool.
        head_units: int. Width of the fully-connected layer (fc7: 4,096 in AlexNet).
        dropout: float. Dropout before the outputs (0.5, as AlexNet's fc layers).
        backbone_kwargs: dict or None. Passed to the backbone's builder.
        name: str. The model name.
    """
    check_positive_int("num_classes", num_classes)
    input_shape = check_image_shape(input_shape, min_size=16)
    check_positive_int("head_units", head_units)
    check_dropout(dropout)
    if backbone_kwargs is not None and not isinstance(backbone_kwargs, dict):
        raise ValueError(
            "`backbone_kwargs` must be a dict or None. "
            f"Received: backbone_kwargs={backbone_kwargs!r}"
        )
    cnn = cut_backbone(backbone, feature, input_shape=input_shape, **(backbone_kwargs or {}))
    cnn = keras.Model(cnn.input, cnn.output, name="backbone")
    regions = keras.Input(input_shape, name="regions")
    x = cnn(regions)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dense(head_units, activation="relu", name="fc7")(x)
    if dropout:
        x = keras.layers.Dropout(dropout, name="fc7_dropout")(x)
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
    deltas = keras.layers.Reshape((num_classes, 4), dtype="float32", name="box_deltas")(deltas)
    return keras.Model(regions, {"class_logits": logits, "box_deltas": deltas}, name=name)


@register_model("rcnn", task="detection", family="rcnn")
def rcnn_detector(**kwargs):
    """R-CNN's region network on a zoo backbone (ResNet-18 by default)."""
    return rcnn(**kwargs)
