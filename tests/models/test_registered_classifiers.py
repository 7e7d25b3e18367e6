"""Generated from the registry: every registered image classifier builds at a small
input, trains one step without NaN, round-trips ``.keras``, and exports a SavedModel
whose ``serving_default`` matches the Keras model. Registering a classifier tests it."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

import models  # noqa: E402


def _is_classifier(name: str) -> bool:
    params = models.model_arguments(name)
    return {"input_shape", "num_classes", "include_top"} <= set(params)


CLASSIFIERS = [n for n in models.list_models() if not n.startswith("tests-") and _is_classifier(n)]
CHANNELS = {"lenet5": 1}


def test_the_registry_has_classifiers():
    assert "lenet5" in CLASSIFIERS


@pytest.fixture(scope="module")
def task():
    from pipelines.config import load_config
    from pipelines.tasks.classification import ClassificationTask

    return ClassificationTask(load_config("lenet5-digits"))


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_train_save_reload_export(name, tmp_path, task):
    from pipelines.serving.export import write_saved_model

    keras.utils.set_random_seed(0)
    shape = (32, 32, CHANNELS.get(name, 3))
    model = models.create_model(name, input_shape=shape, num_classes=10)
    heads = len(model.outputs)
    x = np.random.default_rng(0).uniform(size=(4, *shape)).astype("float32")
    y = np.arange(4) % 10
    model.compile(
        optimizer=keras.optimizers.SGD(0.01), loss=["sparse_categorical_crossentropy"] * heads
    )
    logs = model.train_on_batch(x, [y] * heads if heads > 1 else y, return_dict=True)
    assert np.isfinite(logs["loss"]), logs

    expected = model.predict(x, verbose=0)
    path = tmp_path / f"{name}.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path)
    for a, b in zip(
        keras.tree.flatten(expected), keras.tree.flatten(reloaded.predict(x, verbose=0))
    ):
        np.testing.assert_allclose(a, b, atol=1e-5)

    info = {"image_shape": list(shape), "raw_shape": list(shape), "num_classes": 10}
    endpoints = task.endpoints(model, info, (x, y))
    result = write_saved_model(
        model, endpoints, tmp_path / "serving" / "1", model_name=name, warmup_requests=1
    )
    assert result.max_abs_diff <= 1e-5
    assert {"serving_default", "image_bytes"} <= set(result.signatures)
