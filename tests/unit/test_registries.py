"""Model, dataset and task registries: listing, duplicates, close-match errors."""

from __future__ import annotations

import pytest

import data
import models
from models.registry import _scan_index


def test_model_listing_is_static_and_complete():
    names = models.list_models()
    assert "lenet5" in names
    assert names == sorted(names)
    # every name in the source index is importable and registered by its module
    for name in _scan_index():
        assert callable(models.get_model_builder(name))


def test_unknown_model_suggests():
    with pytest.raises(KeyError, match="Did you mean 'lenet5'"):
        models.create_model("lenet")


def test_duplicate_model_name_is_an_error():
    models.get_model_builder("lenet5")

    def impostor(**kwargs):
        return None

    with pytest.raises(ValueError, match="already registered"):
        models.register_model("lenet5")(impostor)


def test_register_model_returns_the_function():
    def tiny_builder(**kwargs):
        return "built"

    assert models.register_model("tests-tiny-builder")(tiny_builder) is tiny_builder
    assert models.create_model("tests-tiny-builder") == "built"


def test_unknown_model_kwargs_name_the_argument():
    with pytest.raises(TypeError, match=r"model\.colour.*Accepted: .*activation"):
        models.create_model("lenet5", colour="red")


def test_datasets_registry():
    assert {"digits", "mnist"} <= set(data.list_datasets())
    entry = data.get_dataset("mnist")
    assert entry.shard_policy in ("AUTO", "FILE", "DATA", "OFF")
    with pytest.raises(KeyError, match="Did you mean 'mnist'"):
        data.get_dataset("mnits")
    with pytest.raises(ValueError, match="already registered"):
        data.register_dataset(data.DatasetEntry("digits", "image_classification", "x:y", "dup"))
    with pytest.raises(ValueError, match="data.colour"):
        data.check_options("digits", {"colour": 1})
    assert data.check_options("mnist", {}) == {"source": "auto"}


def test_task_registry():
    from pipelines.tasks.base import get_task

    assert get_task("classification").name == "classification"
    with pytest.raises(KeyError, match="Did you mean classification"):
        get_task("clasification")
