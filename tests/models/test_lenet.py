"""LeNet-5: the paper's layout and parameter count."""

from __future__ import annotations

import pytest

keras = pytest.importorskip("keras")
import models  # noqa: E402


def test_parameter_count_and_layout():
    model = models.create_model("lenet5", input_shape=(32, 32, 1), num_classes=10)
    assert model.count_params() == 61_706
    shapes = {
        name: model.get_layer(name).output.shape[1:]
        for name in ("c1", "s2", "c3", "s4", "c5", "f6")
    }
    assert shapes == {
        "c1": (28, 28, 6),
        "s2": (14, 14, 6),
        "c3": (10, 10, 16),
        "s4": (5, 5, 16),
        "c5": (1, 1, 120),
        "f6": (84,),
    }


@pytest.mark.parametrize("activation", ["relu", "prelu", "sigmoid", "tanh"])
def test_activations(activation):
    model = models.create_model("lenet5", activation=activation)
    assert model.get_layer("c1_act") is not None
    assert model.output.shape == (None, 10)


def test_features_and_bad_arguments():
    features = models.create_model("lenet5", include_top=False)
    assert features.output.shape == (None, 84)
    with pytest.raises(ValueError, match="pooling"):
        models.create_model("lenet5", pooling="median")
    with pytest.raises(ValueError, match="activation"):
        models.create_model("lenet5", activation="swish")
    with pytest.raises(ValueError, match="input_shape"):
        models.create_model("lenet5", input_shape=(16, 16, 1))


def test_prelu_has_one_slope_per_channel(tmp_path):
    model = models.create_model("lenet5", activation="prelu")
    assert model.get_layer("c1_act").get_weights()[0].shape == (1, 1, 6)
    assert model.get_layer("f6_act").get_weights()[0].shape == (84,)
    path = tmp_path / "prelu.keras"
    model.save(path)
    assert keras.saving.load_model(path).count_params() == model.count_params()
