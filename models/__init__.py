"""Keras functional model builders behind one registry (backend-agnostic Keras 3).

Import this package freely: it does not import Keras. ``create_model`` imports the
file that declares the requested model.
"""

from models.registry import (
    check_model_kwargs,
    create_model,
    get_model_builder,
    list_models,
    model_arguments,
    model_module,
    register_model,
)

__all__ = [
    "check_model_kwargs",
    "create_model",
    "get_model_builder",
    "list_models",
    "model_arguments",
    "model_module",
    "register_model",
]
