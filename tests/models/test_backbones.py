"""Backbones (``models/backbones.py``): generated from the registry, every declared feature
map is checked by building the backbone and reading its output shape: the declared
channels, and the declared stride measured as the growth of the map between two input
sizes (which border effects such as ZFNet's valid paddings cannot fake)."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

import models  # noqa: E402
from models.backbones import backbone, feature_maps, list_backbones  # noqa: E402
from tests import helpers  # noqa: E402

FEATURES = [
    pytest.param(name, feature, marks=[pytest.mark.slow] if name in helpers.HEAVY else [])
    for name in list_backbones()
    for feature in feature_maps(name)
]
SIZES = (64, 96)  # both multiples of 32: every stride up to 32 tiles them exactly


def test_the_survey_backbones_declare_their_maps():
    assert {"vgg16", "resnet18", "resnet34", "resnet50", "resnet101", "alexnet", "zfnet"} <= set(
        list_backbones()
    )
    assert feature_maps("vgg16")["stride16"].layer == "block5_conv3_act"
    assert feature_maps("resnet50")["stride16"] == models.FeatureMap("conv4_block6_out", 16, 1024)
    assert feature_maps("resnet101")["stride16"].channels == 1024
    assert feature_maps("resnet18")["stride16"].channels == 256
    assert "lenet5" not in list_backbones()


@pytest.mark.parametrize("name, feature", FEATURES)
def test_declared_feature_map(name, feature):
    fmap = feature_maps(name)[feature]
    try:  # one build where the network takes any size, else one per size
        net = backbone(name, feature, input_shape=(None, None, 3))
        shapes = [net.compute_output_spec(keras.KerasTensor((1, s, s, 3))).shape for s in SIZES]
    except ValueError:
        nets = [backbone(name, feature, input_shape=(s, s, 3)) for s in SIZES]
        shapes, net = [n.output.shape for n in nets], nets[-1]
    assert net.layers[-1].name == fmap.layer
    for shape in shapes:
        assert shape[-1] == fmap.channels, (name, feature, shape)
        assert shape[1] == shape[2], shape
    grown = shapes[1][1] - shapes[0][1]
    assert grown * fmap.stride == SIZES[1] - SIZES[0], (name, feature, shapes)
    keras.backend.clear_session()


def test_vgg16_serves_detection_and_captioning_with_one_map():
    detector = backbone("vgg16", "stride16", input_shape=(None, None, 3))
    captioner = backbone("vgg16", "grid14", input_shape=(224, 224, 3))
    assert tuple(captioner.output.shape) == (None, 14, 14, 512)
    assert captioner.layers[-1].name == detector.layers[-1].name == "block5_conv3_act"
    assert captioner.name == "vgg16_stride16"
    keras.backend.clear_session()


def test_resnet50_conv4_at_imagenet_size():
    net = backbone("resnet50", "stride16", input_shape=(224, 224, 3))
    assert tuple(net.output.shape) == (None, 14, 14, 1024)
    assert net.layers[-1].name == "conv4_block6_out"
    assert not any(layer.name.startswith("conv5") for layer in net.layers)
    keras.backend.clear_session()


def test_backbone_runs_trains_and_reloads(tmp_path):
    net = backbone(
        "vgg11", "stride16", input_shape=(64, 64, 3), activation="prelu", width_multiplier=0.125
    )
    x = np.random.default_rng(0).uniform(size=(2, 64, 64, 3)).astype("float32")
    net.compile(optimizer="sgd", loss="mse")
    net.fit(x, np.zeros((2, 4, 4, 64), "float32"), verbose=0)
    path = tmp_path / "backbone.keras"
    net.save(path)
    again = keras.saving.load_model(path)
    np.testing.assert_allclose(np.asarray(again(x)), np.asarray(net(x)), atol=1e-6)
    keras.backend.clear_session()


def test_backbone_layers_are_the_classifiers_so_weights_copy_by_name():
    classifier = models.create_model("alexnet", input_shape=(64, 64, 3), num_classes=3)
    net = backbone("alexnet", "stride16", input_shape=(64, 64, 3))
    for layer in net.layers:
        if layer.weights:
            layer.set_weights(classifier.get_layer(layer.name).get_weights())
    cut = keras.Model(classifier.input, classifier.get_layer("conv5_act").output)
    x = np.random.default_rng(0).uniform(size=(1, 64, 64, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(net(x)), np.asarray(cut(x)), atol=1e-6)
    keras.backend.clear_session()


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: backbone("lenet5", "stride16"), "declares no feature maps"),
        (lambda: backbone("vgg16", "stride8"), "Received: feature='stride8'"),
        (lambda: backbone("zfnet", "grid14"), "no 14x14 map"),
        (lambda: backbone("vgg16", "grid14", input_shape=(None, None, 3)), "feature"),
        (lambda: backbone("vgg16", include_top=True), "include_top"),
        (lambda: backbone("resnet18", input_shape=(64, 64)), "input_shape"),
        (lambda: backbone("vgg16", colour="red"), "colour"),
        (lambda: backbone("vgg99"), "Unknown model"),
    ],
)
def test_bad_requests_are_named(call, match):
    with pytest.raises((ValueError, KeyError, TypeError), match=match):
        call()
