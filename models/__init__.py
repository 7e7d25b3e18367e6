"""Keras functional model builders behind one registry (backend-agnostic Keras 3).

Import this package freely: it does not import Keras. ``create_model`` imports the
file that declares the requested model; ``model_info`` and ``list_models`` read the
registry's metadata (task, family, feature maps, preprocessing) from the source.
"""

from models.checks import check_model_kwargs
from models.registry import (
    FeatureMap,
    ModelInfo,
    create_model,
    get_model_builder,
    list_models,
    model_arguments,
    model_info,
    model_module,
    register_model,
)

__all__ = [
    "FeatureMap",
    "ModelInfo",
    "check_model_kwargs",
    "create_model",
    "get_model_builder",
    "list_models",
    "model_arguments",
    "model_info",
    "model_module",
    "register_model",
]
