"""LeNet-5 (LeCun, Bottou, Bengio & Haffner 1998, "Gradient-Based Learning Applied to
Document Recognition").

C1 (6 maps 5x5) - S2 (2x2 subsampling) - C3 (16 maps 5x5) - S4 - C5 (120 maps 5x5, a
convolution that sees the whole 5x5 map) - F6 (84) - output (10). At 32x32x1 with 10
classes this is 61,706 parameters. Two simplifications of the 1998 network, as is
usual: S2/S4 are plain (average or max) pooling without their per-map trainable
coefficient, C3 connects to all six S2 maps, and the output layer is a softmax
instead of Euclidean RBF units.
"""

from __future__ import annotations

import keras

from models.checks import check_choice, check_dropout, check_image_shape, check_num_classes
from models.layers import activation_layer, classifier_head, conv_initializer
from models.registry import register_model


def lenet(
    input_shape=(32, 32, 1),
    num_classes: int = 10,
    activation: str = "tanh",
    pooling: str = "avg",
    dropout: float = 0.0,
    include_top: bool = True,
    classifier_activation: str | None = "softmax",
    name: str = "lenet5",
):
    """Build LeNet-5 as a Keras functional model.

    Args:
        input_shape: tuple. Image shape (H, W, C); 32x32 is the paper's. Anything from
            28x28 up works (C5 then sees a map larger than 1x1 and is followed by
            global average pooling only when needed).
        num_classes: int. The number of output classes.
        activation: str. ``tanh`` (the paper's squashing function), ``relu``, ``prelu``
            or ``sigmoid``.
        pooling: str. ``avg`` (the paper's subsampling) or ``max``.
        dropout: float. Dropout rate before F6 and before the output; 0 disables it.
        include_top: bool. Whether to end with the classifier; without it the model
            returns the 84-d F6 features.
        classifier_activation: str or None. ``softmax`` or None for logits.
        name: str. The model name.
    """
    check_choice("pooling", pooling, ("avg", "max"))
    check_dropout(dropout)
    input_shape = check_image_shape(input_shape, min_size=28)
    check_num_classes(num_classes, include_top)
    pool = keras.layers.AveragePooling2D if pooling == "avg" else keras.layers.MaxPooling2D
    init = conv_initializer(activation)

    inputs = keras.Input(shape=input_shape, name="images")
    x = keras.layers.Conv2D(6, 5, kernel_initializer=init, name="c1")(inputs)  # 28x28x6
    x = activation_layer(activation, "c1_act")(x)
    x = pool(2, name="s2")(x)  # 14x14x6
    x = keras.layers.Conv2D(16, 5, kernel_initializer=init, name="c3")(x)  # 10x10x16
    x = activation_layer(activation, "c3_act")(x)
    x = pool(2, name="s4")(x)  # 5x5x16
    x = keras.layers.Conv2D(120, 5, kernel_initializer=init, name="c5")(x)  # 1x1x120
    x = activation_layer(activation, "c5_act")(x)
    if x.shape[1] == 1 and x.shape[2] == 1:
        x = keras.layers.Flatten(name="flatten")(x)
    else:
        x = keras.layers.GlobalAveragePooling2D(name="c5_pool")(x)
    if dropout:
        x = keras.layers.Dropout(dropout, name="c5_dropout")(x)
    x = keras.layers.Dense(84, kernel_initializer=init, name="f6")(x)
    x = activation_layer(activation, "f6_act")(x)
    if include_top:
        if dropout:
            x = keras.layers.Dropout(dropout, name="f6_dropout")(x)
        x = classifier_head(x, num_classes, "output", classifier_activation)
    return keras.Model(inputs, x, name=name)


# The input preprocessing of the paper: none beyond scaling to [0, 1] (LeCun et al. 1998
# feed whole 32x32 digits; no crops, flips or colour jitter).
@register_model(
    "lenet5",
    task="classification",
    family="lenet",
    preprocessing={"crop_fraction": 1.0, "flip": False, "pca_jitter": 0.0},
)
def lenet5(**kwargs):
    return lenet(**kwargs)
