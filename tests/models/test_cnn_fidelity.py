"""Fidelity of the survey's CNN classifiers to their papers.

Parameter counts at ImageNet size (trainable weights, 1,000 classes) and the papers' map
sizes; weights copied one-to-one from ``keras.applications`` give the same outputs; every
model runs on 32x32 inputs, serialises and rejects bad arguments by name. Models at
224x224 are only built (``keras.Input``), never run, except in the two peer checks.
"""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

import models.alexnet  # noqa: E402
import models.googlenet  # noqa: E402
import models.resnet  # noqa: E402
import models.vgg  # noqa: E402
from models import create_model  # noqa: E402
from models.alexnet import alexnet_family  # noqa: E402
from models.layers import LocalResponseNormalization  # noqa: E402
from models.resnet import resnet  # noqa: E402
from models.vgg import vgg  # noqa: E402
from tests import helpers  # noqa: E402

# The survey's ImageNet CNNs: every registered classifier but LeNet-5 (its own test file).
CNN_MODELS = [n for n in models.list_models(task="classification") if n != "lenet5"]


def trainable_count(model) -> int:
    return int(sum(np.prod(w.shape) for w in model.trainable_weights))


@pytest.fixture
def zero_init(monkeypatch):
    """Build with zero-filled kernels, for tests that need shapes or overwrite the weights:
    the He-normal (truncated normal) fill of a 100M-weight dense layer takes seconds."""
    for module in (models.alexnet, models.vgg, models.googlenet, models.resnet):
        monkeypatch.setattr(module, "conv_initializer", lambda activation: "zeros")


# (name, kwargs, expected trainable parameters, {layer: output shape without batch}).
PAPER_COUNTS = [
    (
        "alexnet",
        {"input_shape": (227, 227, 3)},
        62_378_344,
        {"conv1": (55, 55, 96), "pool1": (27, 27, 96), "pool2": (13, 13, 256)},
    ),
    ("alexnet", {"input_shape": (227, 227, 3), "groups": 2}, 60_965_224, {}),
    ("alexnet", {"input_shape": (224, 224, 3)}, 62_378_344, {"pool5": (6, 6, 256)}),
    # ZFNet at its paper's 224x224 crop: 110 -> 55 -> 26 -> 13 -> 6 (Figure 3).
    (
        "zfnet",
        {"input_shape": (224, 224, 3)},
        62_357_608,
        {
            "conv1": (110, 110, 96),
            "pool1": (55, 55, 96),
            "conv2": (26, 26, 256),
            "pool2": (13, 13, 256),
            "pool5": (6, 6, 256),
        },
    ),
    ("vgg11", {}, 132_863_336, {"block5_pool": (7, 7, 512)}),
    ("vgg13", {}, 133_047_848, {}),
    ("vgg16", {}, 138_357_544, {"block5_pool": (7, 7, 512)}),
    ("vgg19", {}, 143_667_240, {}),
    ("resnet18", {}, 11_689_512, {"pool1_pool": (56, 56, 64), "conv5_block2_out": (7, 7, 512)}),
    ("resnet34", {}, 21_797_672, {}),
    (
        "resnet50",
        {},
        25_557_032,
        {"conv2_block3_out": (56, 56, 256), "conv5_block3_out": (7, 7, 2048)},
    ),
    ("resnet101", {}, 44_549_160, {}),
    ("resnet152", {}, 60_192_808, {}),
    # The plain nets lack the three projection shortcuts (1x1 conv + BN): 173,824 weights.
    ("plain18", {}, 11_689_512 - 173_824, {}),
    ("plain34", {}, 21_797_672 - 173_824, {}),
    (
        "googlenet",
        {"aux_logits": False},
        6_998_552,
        {
            "conv1_7x7_s2": (112, 112, 64),
            "pool2_3x3_s2": (28, 28, 192),
            "pool3_3x3_s2": (14, 14, 480),
            "inception_5b_output": (7, 7, 1024),
        },
    ),
    ("googlenet", {"aux_logits": True}, 13_378_280, {"aux2_pool": (4, 4, 528)}),
]


@pytest.mark.parametrize(
    "name,kwargs,expected,shapes",
    PAPER_COUNTS,
    ids=[
        "-".join(
            [n, str(kw.get("input_shape", (224,))[0])]
            + [f"{k}={v}" for k, v in kw.items() if k != "input_shape"]
        )
        for n, kw, *_ in PAPER_COUNTS
    ],
)
def test_paper_parameter_counts_and_maps(name, kwargs, expected, shapes, zero_init):
    model = create_model(name, num_classes=1000, **kwargs)
    assert trainable_count(model) == expected
    for layer, shape in shapes.items():
        assert tuple(model.get_layer(layer).output.shape[1:]) == shape, layer
    keras.backend.clear_session()


def test_resnet_downsamples_on_first_conv_of_block_as_in_paper():
    bottleneck = create_model("resnet50", input_shape=(64, 64, 3), num_classes=10)
    assert bottleneck.get_layer("conv3_block1_1_conv").strides == (2, 2)
    assert bottleneck.get_layer("conv3_block1_1_conv").kernel_size == (1, 1)
    assert bottleneck.get_layer("conv3_block1_2_conv").strides == (1, 1)
    assert bottleneck.get_layer("conv3_block1_0_conv").strides == (2, 2)
    bns = [
        layer for layer in bottleneck.layers if isinstance(layer, keras.layers.BatchNormalization)
    ]
    assert bns and all(bn.momentum == 0.9 and bn.epsilon == 1.001e-5 for bn in bns)
    assert not any(
        layer.use_bias for layer in bottleneck.layers if isinstance(layer, keras.layers.Conv2D)
    )
    basic = create_model("resnet18", input_shape=(64, 64, 3), num_classes=10)
    assert basic.get_layer("conv3_block1_1_conv").strides == (2, 2)
    assert basic.get_layer("conv3_block1_1_conv").kernel_size == (3, 3)
    plain = create_model("plain18", input_shape=(64, 64, 3), num_classes=10)
    assert not any(isinstance(layer, keras.layers.Add) for layer in plain.layers)


def _copy_weights_by_name(source, target) -> None:
    """Copy every weighted layer of ``source`` into the layer of ``target`` of that name."""
    src = {layer.name: layer for layer in source.layers if layer.weights}
    dst = {layer.name: layer for layer in target.layers if layer.weights}
    assert set(src) == set(dst)
    for layer_name, layer in src.items():
        dst[layer_name].set_weights(layer.get_weights())


def test_vgg16_matches_keras_applications(zero_init):
    reference = keras.applications.VGG16(weights=None, classifier_activation=None)
    ours = create_model("vgg16", classifier_activation=None)
    _copy_weights_by_name(reference, ours)
    # Pixel-range inputs (the caffe-style preprocessing VGG expects), so logits are O(1).
    images = np.random.default_rng(0).uniform(-128, 128, (2, 224, 224, 3)).astype("float32")
    expected = keras.ops.convert_to_numpy(reference(images, training=False))
    got = keras.ops.convert_to_numpy(ours(images, training=False))
    assert np.abs(expected).max() > 0.1  # the comparison is not between near-zeros
    assert np.abs(got - expected).max() <= 1e-4
    keras.backend.clear_session()


def test_resnet50_matches_keras_applications(zero_init):
    reference = keras.applications.ResNet50(weights=None, classifier_activation=None)
    rng = np.random.default_rng(0)
    for layer in reference.layers:  # non-trivial BN statistics, so inference mode matters
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, gamma.shape).astype("float32"),
                    rng.normal(0, 0.1, beta.shape).astype("float32"),
                    rng.normal(0, 0.1, mean.shape).astype("float32"),
                    rng.uniform(0.5, 1.5, var.shape).astype("float32"),
                ]
            )
    ours = create_model("resnet50", use_bias=True, classifier_activation=None)
    _copy_weights_by_name(reference, ours)
    images = rng.uniform(0, 1, (2, 224, 224, 3)).astype("float32")
    expected = keras.ops.convert_to_numpy(reference(images, training=False))
    got = keras.ops.convert_to_numpy(ours(images, training=False))
    assert np.abs(expected).max() > 0.1
    assert np.abs(got - expected).max() <= 1e-4
    keras.backend.clear_session()


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n in helpers.HEAVY else n for n in CNN_MODELS],
)
def test_full_width_probabilities_on_mnist_sized_images(name):
    """What the MNIST configs train: full width, 32x32x1; three-channel inputs and small
    widths are the registry-generated checks'."""
    model = create_model(name, input_shape=(32, 32, 1), num_classes=10)
    images = np.random.default_rng(0).uniform(0, 1, (2, 32, 32, 1)).astype("float32")
    outputs = model(images, training=False)
    for output in keras.tree.flatten(outputs):
        assert tuple(output.shape) == (2, 10)
        probs = keras.ops.convert_to_numpy(output)
        assert np.all(np.isfinite(probs))
        np.testing.assert_allclose(probs.sum(axis=-1), 1.0, rtol=1e-5)
    keras.backend.clear_session()


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("alexnet", {"groups": 2}),
        ("zfnet", {"batch_norm": True, "activation": "tanh"}),
        ("vgg11", {"width_multiplier": 0.25, "batch_norm": True}),
        ("googlenet", {}),
        ("resnet18", {"activation": "prelu"}),
        ("plain18", {"dropout": 0.2}),
    ],
)
def test_config_round_trip_and_keras_file(name, kwargs, tmp_path):
    model = create_model(name, input_shape=(32, 32, 3), num_classes=10, **kwargs)
    images = np.random.default_rng(0).uniform(0, 1, (2, 32, 32, 3)).astype("float32")
    expected = [keras.ops.convert_to_numpy(y) for y in keras.tree.flatten(model(images))]

    rebuilt = keras.Model.from_config(model.get_config())
    assert [layer.name for layer in rebuilt.layers] == [layer.name for layer in model.layers]
    assert rebuilt.count_params() == model.count_params()

    path = tmp_path / f"{name}.keras"
    model.save(path)
    reloaded = keras.models.load_model(path)
    got = [keras.ops.convert_to_numpy(y) for y in keras.tree.flatten(reloaded(images))]
    for e, g in zip(expected, got, strict=True):
        np.testing.assert_allclose(g, e, atol=1e-6)
    keras.backend.clear_session()


def test_googlenet_outputs_main_first():
    model = create_model("googlenet", input_shape=(32, 32, 3), num_classes=10)
    assert model.output_names == ["predictions_act", "predictions_aux1_act", "predictions_aux2_act"]
    assert sorted(model.output_names) == model.output_names
    for layer in model.output_names:
        assert model.get_layer(layer).dtype_policy.compute_dtype == "float32"
    logits = create_model(
        "googlenet", input_shape=(32, 32, 3), num_classes=10, classifier_activation=None
    )
    assert logits.output_names == ["predictions", "predictions_aux1", "predictions_aux2"]
    single = create_model("googlenet", input_shape=(32, 32, 3), num_classes=10, aux_logits=False)
    assert single.output_names == ["predictions_act"]
    headless = create_model("googlenet", input_shape=(None, None, 3), include_top=False)
    assert tuple(headless.output.shape) == (None, None, None, 1024)
    keras.backend.clear_session()


def test_headless_backbones_return_maps_or_pooled_features():
    backbone = create_model("resnet50", input_shape=(None, None, 3), include_top=False)
    assert tuple(backbone.output.shape) == (None, None, None, 2048)
    pooled = create_model("vgg16", input_shape=(64, 64, 3), include_top=False, pooling="avg")
    assert tuple(pooled.output.shape) == (None, 512)
    narrow = create_model("vgg11", input_shape=(32, 32, 3), num_classes=10, width_multiplier=0.5)
    assert narrow.get_layer("block5_conv2").filters == 256
    assert narrow.get_layer("fc1").units == 2048


def test_local_response_normalization_matches_paper_formula():
    tf = pytest.importorskip("tensorflow")
    x = np.random.default_rng(0).normal(0, 30, (2, 5, 5, 16)).astype("float32")
    layer = LocalResponseNormalization()
    assert (layer.size, layer.k, layer.alpha, layer.beta) == (5, 2.0, 1e-4, 0.75)
    expected = tf.nn.local_response_normalization(
        x, depth_radius=2, bias=2.0, alpha=1e-4, beta=0.75
    )
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(x)), expected, rtol=1e-5, atol=1e-5)
    # Plain numpy: b_i = a_i / (k + alpha * sum_{|j - i| <= 2} a_j^2) ** beta.
    c = 7
    manual = np.stack(
        [x[..., c] / (2.0 + 1e-4 * (x[..., max(0, c - 2) : c + 3] ** 2).sum(-1)) ** 0.75],
        axis=-1,
    )
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(layer(x))[..., c : c + 1], manual, rtol=1e-5
    )
    clone = LocalResponseNormalization.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    # Squares of large activations would overflow float16; the layer works in float32.
    half = LocalResponseNormalization(dtype="mixed_float16")
    assert np.all(np.isfinite(keras.ops.convert_to_numpy(half(x * 10))))


@pytest.mark.parametrize(
    "build,argument",
    [
        (lambda: create_model("alexnet", groups=3), "groups"),
        (lambda: create_model("zfnet", groups=2), "groups"),
        (lambda: create_model("alexnet", input_shape=(16, 16, 3)), "input_shape"),
        (lambda: create_model("alexnet", input_shape=(None, None, 3)), "input_shape"),
        (lambda: create_model("vgg16", width_multiplier=0), "width_multiplier"),
        (lambda: create_model("vgg11", num_classes=0), "num_classes"),
        (lambda: create_model("vgg11", activation="gelu"), "activation"),
        (lambda: vgg(12), "depth"),
        (lambda: create_model("googlenet", dropout=1.0), "dropout"),
        (lambda: create_model("googlenet", aux_logits="yes"), "aux_logits"),
        (lambda: create_model("googlenet", include_top=False, pooling="min"), "pooling"),
        (lambda: create_model("resnet18", activation="swish"), "activation"),
        (lambda: create_model("resnet50", bn_momentum=1.0), "bn_momentum"),
        (lambda: create_model("resnet50", input_shape=(224, 224)), "input_shape"),
        (lambda: resnet(20), "depth"),
        (lambda: alexnet_family("lenet"), "variant"),
        (lambda: LocalResponseNormalization(size=4), "size"),
    ],
)
def test_bad_arguments_name_the_argument(build, argument):
    with pytest.raises(ValueError, match=f"Received: {argument}="):
        build()
