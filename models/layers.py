"""Building blocks shared by every model family: activations and classifier heads."""

from __future__ import annotations

import keras

ACTIVATIONS = ("relu", "prelu", "sigmoid", "tanh")


def check_choice(name: str, value: object, accepted: tuple) -> None:
    """Raise ``ValueError`` naming the argument, the value and what is accepted."""
    if value not in accepted:
        raise ValueError(f"`{name}` must be one of {list(accepted)}. Received: {name}={value!r}")


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
        return keras.layers.PReLU(
            alpha_initializer=keras.initializers.Constant(0.25), shared_axes=None, name=name
        )
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
