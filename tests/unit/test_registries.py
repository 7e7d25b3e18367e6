"""Model, dataset and task registries: listing, metadata, duplicates, close-match errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import data
import models
from models.registry import _INFOS, FeatureMap, ModelInfo, _scan_file, _scan_index

REPO = Path(__file__).resolve().parents[2]


def test_model_listing_is_static_and_complete():
    names = models.list_models()
    assert "lenet5" in names
    assert names == sorted(names)
    # every name in the source index is importable and registered by its module
    for name in _scan_index():
        assert callable(models.get_model_builder(name))


def test_listing_and_metadata_do_not_import_keras():
    code = (
        "import json, sys, models\n"
        "rows = [(n, models.model_info(n).task, models.model_info(n).family)"
        " for n in models.list_models()]\n"
        "print(json.dumps({'rows': len(rows), 'heavy': sorted(m for m in"
        " ('keras', 'tensorflow', 'jax') if m in sys.modules)}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["rows"] == len(models.list_models())
    assert result["heavy"] == []


def test_scanned_metadata_is_what_the_decorators_register():
    """The AST scan (listing without Keras) and the import agree on every model."""
    scanned = _scan_index()
    for name, info in scanned.items():
        models.get_model_builder(name)  # imports the module: the decorator registers
        assert _INFOS[name] == info, name


def test_model_info_fields():
    info = models.model_info("vgg16")
    assert isinstance(info, ModelInfo)
    assert (info.name, info.module, info.task, info.family) == (
        "vgg16",
        "vgg",
        "classification",
        "vgg",
    )
    assert info.features["stride16"] == FeatureMap("block5_conv3_act", 16, 512)
    assert dict(info.preprocessing) == {"crop_fraction": 0.875, "flip": True, "pca_jitter": 0.1}
    with pytest.raises(TypeError):
        info.preprocessing["flip"] = False  # read-only: the registry's own copy
    with pytest.raises(AttributeError):
        info.task = "generation"  # frozen


def test_generative_families_are_the_generation_tasks_table():
    families = {n: models.model_info(n).family for n in models.list_models(task="generation")}
    assert families == {
        "rbm": "rbm",
        "dbn": "rbm",
        "vae": "vae",
        "gan": "gan",
        "dcgan": "gan",
        "draw": "draw",
        "draw_no_attention": "draw",
    }
    assert models.model_info("dbn_classifier").task == "dbn_classification"


def test_every_model_serves_a_registered_task():
    pytest.importorskip("tensorflow")
    from pipelines.tasks.base import get_task

    for name in models.list_models():
        if not name.startswith("tests-"):
            get_task(models.model_info(name).task)  # raises KeyError for an unknown task


def test_list_models_filters():
    assert models.list_models(family="resnet") == [
        "plain18",
        "plain34",
        "resnet101",
        "resnet152",
        "resnet18",
        "resnet34",
        "resnet50",
    ]
    assert models.list_models(task="translation") == ["seq2seq", "seq2seq_no_attention"]
    assert models.list_models(task="translation", family="vgg") == []


def test_classifiers_declare_their_preprocessing():
    for name in models.list_models(task="classification"):
        assert set(models.model_info(name).preprocessing) == {"crop_fraction", "flip", "pca_jitter"}


def test_no_module_globals_carry_metadata():
    """The registry holds the metadata; nothing is left for a getattr to find."""
    for name in models.list_models():
        module = sys.modules[models.get_model_builder(name).__module__]
        assert not hasattr(module, "PREPROCESSING"), module.__name__


def test_unknown_model_suggests():
    with pytest.raises(KeyError, match="Did you mean 'lenet5'"):
        models.create_model("lenet")
    with pytest.raises(KeyError, match="Did you mean 'lenet5'"):
        models.model_info("lenet")


def test_duplicate_model_name_is_an_error():
    models.get_model_builder("lenet5")

    def impostor(**kwargs):
        return None

    with pytest.raises(ValueError, match="already registered"):
        models.register_model("lenet5", task="classification", family="lenet")(impostor)


def test_duplicate_in_source_is_an_error(tmp_path):
    for stem in ("one", "two"):
        (tmp_path / f"{stem}.py").write_text(
            '@register_model("same", task="classification", family="x")\ndef same(): ...\n'
        )
    with pytest.raises(ValueError, match="registered twice: in models/one.py and models/two.py"):
        _scan_index(tmp_path)


def test_register_model_returns_the_function_and_records_metadata():
    def tiny_builder(**kwargs):
        return "built"

    decorator = models.register_model(
        "tests-tiny-builder",
        task="classification",
        family="tiny",
        features={"stride4": FeatureMap(layer="conv", stride=4, channels=8)},
    )
    assert decorator(tiny_builder) is tiny_builder
    assert models.create_model("tests-tiny-builder") == "built"
    info = models.model_info("tests-tiny-builder")
    assert (info.task, info.family, info.features["stride4"].stride) == (
        "classification",
        "tiny",
        4,
    )
    assert dict(info.preprocessing) == {}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"family": "x"}, "task"),
        ({"task": "classification", "family": ""}, "family"),
        ({"task": "classification", "family": "x", "features": {"s": (1, 2)}}, "FeatureMap"),
        ({"task": "classification", "family": "x", "preprocessing": [1]}, "preprocessing"),
    ],
)
def test_register_model_checks_its_metadata(kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        models.register_model("tests-bad", **kwargs)(lambda: None)


def test_feature_map_checks_its_fields():
    with pytest.raises(ValueError, match="Received: stride=0"):
        FeatureMap("conv", 0, 8)


def test_scan_reads_constants_and_refuses_expressions(tmp_path):
    good = tmp_path / "good.py"
    good.write_text(
        "_PRE = {'crop_fraction': 0.5, 'flip': True, 'pca_jitter': 0.0}\n"
        "_FAMILY = {'task': 'classification', 'family': 'f', 'preprocessing': _PRE}\n"
        '@register_model("g", **_FAMILY,\n'
        '                features={"stride8": FeatureMap(layer="c", stride=8, channels=-(-4))})\n'
        "def g(): ...\n"
    )
    (info,) = _scan_file(good)
    assert (info.task, info.family, info.preprocessing["crop_fraction"]) == (
        "classification",
        "f",
        0.5,
    )
    assert info.features["stride8"] == FeatureMap("c", 8, 4)
    bad = tmp_path / "bad.py"
    bad.write_text('@register_model("b", task="x" + "y", family="f")\ndef b(): ...\n')
    with pytest.raises(ValueError, match="must be literals"):
        _scan_file(bad)
    missing = tmp_path / "missing.py"
    missing.write_text('@register_model("m", family="f")\ndef m(): ...\n')
    with pytest.raises(ValueError, match="Missing: \\['task'\\]"):
        _scan_file(missing)


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
    assert data.check_options("mnist", {}) == {"source": "auto", "train_size": None}


def test_task_registry():
    from pipelines.tasks.base import get_task

    assert get_task("classification").name == "classification"
    with pytest.raises(KeyError, match="Did you mean classification"):
        get_task("clasification")
