"""The generative networks (models/rbm.py, vae.py, gan.py, draw.py): their output shapes,
bad arguments named, the RBM's free energy is the exact marginal of its energy, DBN
weights move into the classifier, DRAW's filters are normalised. Building, a training
step, serialisation, export, mixed precision and JAX are the registry-generated checks of
tests/models/test_registry_models.py; the training algorithms are tested in
tests/pipelines/."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

keras = pytest.importorskip("keras")

import models  # noqa: E402
from models.draw import gaussian_filterbank  # noqa: E402
from models.rbm import RBM, dbn_down_pass, load_dbn_weights, rbm_layers  # noqa: E402


def test_output_shapes():
    vae = models.create_model("vae", latent_dim=16)
    assert [tuple(t.shape) for t in vae.outputs] == [(None, 16), (None, 16), (None, 28, 28, 1)]
    dcgan = models.create_model("dcgan")
    assert dcgan.get_layer("generator").output_shape == (None, 28, 28, 1)
    assert dcgan.get_layer("discriminator").output_shape == (None, 1)
    draw = models.create_model("draw", steps=4, latent_dim=5)
    assert [tuple(t.shape) for t in draw.outputs] == [
        (None, 4, 28, 28, 1),
        (None, 4, 5),
        (None, 4, 5),
    ]
    z = np.zeros((3, 4, 5), "float32")
    assert tuple(draw.get_layer("draw_core").generate(z).shape) == (3, 4, 28, 28, 1)


@pytest.mark.parametrize(
    "name, kwargs, field",
    [
        ("vae", {"latent_dim": 0}, "latent_dim"),
        ("vae", {"likelihood": "poisson"}, "likelihood"),
        ("vae", {"input_shape": (30, 30, 1)}, "input_shape"),
        ("dcgan", {"filters": []}, "filters"),
        ("dcgan", {"input_shape": (30, 30, 1)}, "input_shape"),
        ("gan", {"dropout": 1.5}, "dropout"),
        ("dbn", {"hidden_units": [10, 0]}, "hidden_units"),
        ("rbm", {"hidden_units": "many"}, "hidden_units"),
        ("draw", {"steps": 0}, "steps"),
        ("draw", {"attention": "yes"}, "attention"),
    ],
)
def test_bad_arguments_name_the_field(name, kwargs, field):
    with pytest.raises(ValueError, match=field):
        models.create_model(name, **kwargs)


def test_unknown_argument_is_named():
    with pytest.raises(TypeError, match="latent_size"):
        models.create_model("vae", latent_size=3)


def test_rbm_free_energy_is_the_exact_marginal():
    """F(v) = -log sum_h exp(-E(v, h)), brute force over all h of a 4-hidden-unit RBM."""
    rng = np.random.default_rng(1)
    layer = RBM(4, weight_stddev=0.5)
    layer.build((None, 5))
    layer.visible_bias.assign(rng.normal(size=5).astype("float32"))
    layer.hidden_bias.assign(rng.normal(size=4).astype("float32"))
    v = (rng.uniform(size=(3, 5)) < 0.5).astype("float32")
    hs = np.array(list(itertools.product([0, 1], repeat=4)), "float32")
    exact = []
    for row in v:
        energies = np.asarray(layer.energy(np.repeat(row[None], len(hs), 0), hs))
        exact.append(-np.log(np.sum(np.exp(-energies))))
    np.testing.assert_allclose(np.asarray(layer.free_energy(v)), exact, rtol=1e-5, atol=1e-5)


def test_rbm_sampling_and_gibbs():
    layer = RBM(6)
    layer.build((None, 10))
    probs = np.full((2, 10), 0.3, "float32")
    noise = np.linspace(0, 0.99, 20, dtype="float32").reshape(2, 10)
    np.testing.assert_array_equal(
        np.asarray(layer.sample(probs, noise)), (noise < 0.3).astype("float32")
    )
    v = (np.random.default_rng(0).uniform(size=(4, 10)) < 0.5).astype("float32")
    sample, pv = layer.gibbs_chain(v, 3, seed=0)
    assert sample.shape == (4, 10) and pv.shape == (4, 10)
    assert set(np.unique(np.asarray(sample))) <= {0.0, 1.0}


def test_dbn_weights_move_into_the_classifier():
    dbn = models.create_model("dbn", input_shape=(8, 8, 1), hidden_units=[16, 8])
    clf = models.create_model("dbn_classifier", input_shape=(8, 8, 1), hidden_units=[16, 8])
    assert load_dbn_weights(clf, dbn) == 2
    np.testing.assert_array_equal(
        clf.get_layer("rbm_2_dense").get_weights()[0], np.asarray(rbm_layers(dbn)[1].kernel)
    )
    x = np.random.default_rng(0).uniform(size=(2, 8, 8, 1)).astype("float32")
    features = keras.Model(clf.input, clf.get_layer("rbm_2_dense").output)
    np.testing.assert_allclose(np.asarray(features(x)), np.asarray(dbn(x)), atol=1e-6)
    assert tuple(dbn_down_pass(rbm_layers(dbn), np.zeros((2, 16), "float32")).shape) == (2, 64)
    wrong = models.create_model("dbn_classifier", input_shape=(8, 8, 1), hidden_units=[12, 8])
    with pytest.raises(ValueError, match="hidden_units"):
        load_dbn_weights(wrong, dbn)


def test_draw_filterbank_rows_are_normalised():
    centre = np.array([[10.0], [3.0]], "float32")
    delta = np.array([[2.0], [1.0]], "float32")
    var = np.array([[1.0], [0.5]], "float32")
    f = np.asarray(gaussian_filterbank(centre, delta, var, 28, 5))
    assert f.shape == (2, 5, 28)
    np.testing.assert_allclose(f.sum(-1), 1.0, rtol=1e-5)
    # filter i is centred at centre + (i - N/2 - 0.5) * delta, i = 1..N
    np.testing.assert_array_equal(f[0].argmax(-1), [6, 8, 10, 12, 14])
