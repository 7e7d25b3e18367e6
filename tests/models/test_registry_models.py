"""Generated from the registry: every registered network builds at a small size, trains
one step, round-trips ``.keras``, exports a SavedModel that gives its outputs, runs under
mixed precision with float32 outputs, and is the same network on the JAX backend (one
``fit`` step there, the weights loaded here, the same outputs within 1e-5).

Registering a model tests it: the cases come from ``tests/helpers.py``, sized by the
model's task and family in the registry. All checks of one network share one build (a
module-scoped fixture, so pytest runs them network by network); the JAX side runs in one
subprocess for every selected network (the backend is fixed when Keras is imported).
"""

from __future__ import annotations

import importlib.util

import pytest

keras = pytest.importorskip("keras")

from tests import helpers  # noqa: E402

NAMES = [
    pytest.param(name, marks=pytest.mark.slow) if name in helpers.HEAVY else name
    for name in helpers.registered()
]
JAX_TEST = "test_same_network_on_jax"


def test_every_task_and_family_is_registered():
    tasks = {helpers.models.model_info(n).task for n in helpers.registered()}
    assert {"classification", "generation", "sequence", "translation"} <= tasks


@pytest.fixture(scope="module", params=NAMES)
def network(request):
    """(name, model) of one registered network, built once for all its checks."""
    name = request.param
    yield name, helpers.build(name)
    keras.backend.clear_session()


@pytest.fixture(scope="module", autouse=True)
def jax_side(request, tmp_path_factory):
    """The JAX side of every network whose JAX test is selected: one subprocess, started
    with the module so that it runs while the TensorFlow checks do."""
    names = sorted(
        {
            item.callspec.params["network"]
            for item in request.session.items
            if item.originalname == JAX_TEST and item.module is request.module
        }
    )
    if not names or importlib.util.find_spec("jax") is None:
        yield None
        return
    out_dir = tmp_path_factory.mktemp("jax")
    proc = helpers.start_jax(names, out_dir)
    yield proc, names, out_dir
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def jax_runs(jax_side):
    if jax_side is None:
        pytest.skip("JAX is not installed (pip install -e .[dev])")
    return helpers.collect_jax(*jax_side)


def test_builds_and_runs(network):
    helpers.check_build(*network)


def test_one_train_step(network):
    helpers.check_train_step(*network)


def test_keras_round_trip(network, tmp_path):
    helpers.check_keras_round_trip(*network, tmp_path)


def test_saved_model_parity(network, tmp_path):
    if keras.backend.backend() != "tensorflow":
        pytest.skip("SavedModel export needs the TensorFlow backend")
    helpers.check_saved_model(*network, tmp_path)


def test_mixed_precision(network):
    helpers.check_mixed_precision(network[0])


def test_same_network_on_jax(network, jax_runs):
    name, model = network
    helpers.check_jax_parity(name, model, jax_runs[name])
