"""Backbones: a CNN of the zoo cut at one of the feature maps its registry entry declares.

Every image classifier whose ``register_model`` call declares ``features`` (as timm's
``feature_info`` does) can serve a detector or a captioner without either knowing its
layer names::

    backbone("resnet50", "stride16")                         # Faster R-CNN's conv4, 1024 ch
    backbone("vgg16", "grid14", input_shape=(224, 224, 3))   # Show, Attend and Tell's 14x14

A feature is asked for by its declared name (``stride16``: the map at 1/16 of the input)
or as ``grid{N}``: the declared map that is N x N for this ``input_shape`` (checked on the
built model, since valid paddings can take a row off, as in ZFNet's 13x13 at 224).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import keras

from models.checks import check_image_shape
from models.registry import FeatureMap, create_model, list_models, model_info

_GRID = re.compile(r"grid(\d+)")


def list_backbones() -> list[str]:
    """The registered models that declare at least one feature map."""
    return [name for name in list_models() if model_info(name).features]


def feature_maps(name: str) -> Mapping[str, FeatureMap]:
    """The feature maps the registered model ``name`` declares (empty if none)."""
    return model_info(name).features


def _resolve(name: str, feature: str, input_shape: tuple) -> tuple[str, FeatureMap]:
    """The declared (name, map) that ``feature`` asks for at ``input_shape``."""
    declared = feature_maps(name)
    if not declared:
        raise ValueError(
            f"{name!r} declares no feature maps, so it cannot be a backbone. "
            f"Backbones: {', '.join(list_backbones())}. Received: name={name!r}"
        )
    if feature in declared:
        return feature, declared[feature]
    grid = _GRID.fullmatch(feature) if isinstance(feature, str) else None
    if grid and input_shape[0] is not None:
        size = int(grid.group(1))
        for key, fmap in declared.items():
            if round(input_shape[0] / fmap.stride) == size:
                return key, fmap
    accepted = [*declared, "grid<N> (an N x N map at input_shape)"]
    raise ValueError(
        f"`feature` must be one of {accepted} for {name!r} at input_shape={input_shape}. "
        f"Received: feature={feature!r}"
    )


def backbone(
    name: str,
    feature: str = "stride16",
    input_shape=(224, 224, 3),
    **kwargs,
) -> keras.Model:
    """Build the registered CNN ``name`` without its top and cut it at ``feature``.

    The result is a functional model ``images -> feature map`` whose layers keep the
    classifier's names, so weights of a trained classifier can be copied by layer name.

    Args:
        name: str. A registered model that declares feature maps (``list_backbones()``).
        feature: str. A declared feature-map name (``stride16``), or ``grid{N}`` for the
            declared map that is N x N at ``input_shape`` (``grid14`` at 224x224).
        input_shape: tuple. Image shape (H, W, C); H and W may be None where the network
            allows it (ResNet, VGG; not with ``grid{N}``).
        **kwargs: passed to the builder (``activation``, ``batch_norm``...). The declared
            channels are those of the builder's default widths.
    """
    input_shape = check_image_shape(input_shape, allow_none=True)
    for forbidden in ("include_top", "pooling", "num_classes"):
        if forbidden in kwargs:
            raise ValueError(
                f"`{forbidden}` is set by `backbone` (a headless, unpooled network). "
                f"Received: {forbidden}={kwargs[forbidden]!r}"
            )
    key, fmap = _resolve(name, feature, input_shape)
    network = create_model(name, input_shape=input_shape, include_top=False, **kwargs)
    output = network.get_layer(fmap.layer).output
    grid = _GRID.fullmatch(feature)
    if grid and tuple(output.shape[1:3]) != (int(grid.group(1)),) * 2:
        raise ValueError(
            f"{name!r} has no {grid.group(1)}x{grid.group(1)} map at input_shape={input_shape}: "
            f"its {key!r} map is {tuple(output.shape[1:3])}. Received: feature={feature!r}"
        )
    return keras.Model(network.input, output, name=f"{name}_{key}")
