"""Config loading: every kind of bad input gives an error naming the field and the fix."""

from __future__ import annotations

import pytest

from pipelines.config import ConfigError, ExperimentConfig, list_configs, load_config


def _error(*overrides: str, name: str = "lenet5-digits") -> str:
    with pytest.raises(ConfigError) as info:
        load_config(name, list(overrides))
    return str(info.value)


def test_shipped_configs_validate():
    assert "lenet5-digits" in list_configs()
    for name in list_configs():
        cfg = load_config(name)
        assert isinstance(cfg, ExperimentConfig)
        assert cfg.name == name


def test_required_keys_and_defaults():
    cfg = load_config("lenet5-digits")
    assert cfg.model.name == "lenet5"
    assert cfg.registered_model_name == "lenet5-digits"
    assert cfg.experiment_name == "lenet5-digits"
    assert cfg.tracking.gate.metric == "accuracy" and cfg.tracking.gate.mode == "max"
    assert cfg.export.serving_dir == "serving"
    assert cfg.data.name == "digits" and cfg.data.dir is None


def test_overrides_are_typed():
    cfg = load_config(
        "lenet5-digits",
        [
            "train.epochs=3",
            "train.batch_size=64",
            "runtime.seed=7",
            "model.activation=tanh",
            "tracking.gate.min_delta=0.01",
            "train.optimizer=sgd",
        ],
    )
    assert cfg.train.epochs == 3 and isinstance(cfg.train.epochs, int)
    assert cfg.train.batch_size == 64 and cfg.runtime.seed == 7
    assert cfg.model.kwargs()["activation"] == "tanh"
    assert cfg.tracking.gate.min_delta == 0.01
    assert cfg.train.optimizer.name == "sgd"


def test_unknown_key_lists_accepted_keys():
    msg = _error("train.epoch=3")
    assert "train.epoch" in msg and "unknown key" in msg and "epochs" in msg and "batch_size" in msg


def test_wrong_type_names_field_and_value():
    msg = _error("train.batch_size=lots")
    assert "train.batch_size" in msg and "'lots'" in msg


def test_out_of_range_value():
    msg = _error("train.epochs=0")
    assert "train.epochs" in msg and "greater than 0" in msg


def test_bad_choice_lists_accepted_values():
    msg = _error("runtime.strategy=tpu_pod")
    assert (
        "runtime.strategy" in msg
        and "'default'" in msg
        and "'mirrored'" in msg
        and "tpu_pod" in msg
    )


def test_bad_set_syntax():
    assert "KEY=VALUE" in _error("train.epochs")
    assert "is a value, not a section" in _error("train.epochs.x=1")


def test_unknown_config_name_suggests_close_match():
    msg = _error(name="lenet5-digit")
    assert "lenet5-digits" in msg and "Unknown config" in msg


def test_yaml_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(str(listy))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))
    unsafe = tmp_path / "unsafe.yaml"
    unsafe.write_text("name: !!python/object/apply:os.system ['true']\nmodel: {name: lenet5}\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(unsafe))


def test_missing_model_section(tmp_path):
    path = tmp_path / "nomodel.yaml"
    path.write_text("name: nomodel\n")
    with pytest.raises(ConfigError, match="model: Field required"):
        load_config(str(path))


def test_registry_checks_before_running():
    """Unknown model arguments, dataset options, tasks and gate metrics fail in check_config."""
    from pipelines.train import check_config

    cases = {
        "model.width=3": ["model.width", "Accepted:", "activation"],
        "model.name=lenet6": ["Unknown model 'lenet6'", "lenet5"],
        "data.name=mnits": ["Unknown dataset 'mnits'", "mnist"],
        "data.colour=red": ["data.colour", "digits"],
        "task=clasification": ["unknown task", "classification"],
        "tracking.gate.metric=f1": ["tracking.gate.metric", "accuracy"],
    }
    for override, fragments in cases.items():
        cfg = load_config("lenet5-digits", [override])
        with pytest.raises(ConfigError) as info:
            check_config(cfg)
        for fragment in fragments:
            assert fragment in str(info.value), (override, str(info.value))
