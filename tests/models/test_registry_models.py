"""Generated from the registry: every registered network builds at a small size, trains
one step, round-trips ``.keras``, exports a SavedModel that gives its outputs, runs under
mixed precision with float32 outputs, and is the same network on the JAX backend (one
``fit`` step there, the weights loaded here, the same outputs within 1e-5).

Registering a model tests it: the cases come from ``tests/helpers.py``, sized by the
model's task and family in the registry. All checks of one network share one build (a
module-scoped fixture, so pytest runs them network by network); the JAX side runs in one
subprocess for every selected network (the backend is fixed when Keras is imported),
started by ``conftest.py`` after collection, while the other tests run.
"""

from __future__ import annotations

import pytest

keras = pytest.importorskip("keras")

from tests import helpers  # noqa: E402

NAMES = [
    pytest.param(name, marks=pytest.mark.slow) if name in helpers.HEAVY else name
    for name in helpers.registered()
]


def test_the_registry_covers_the_surveys_tasks():
    tasks = {helpers.models.model_info(n).task for n in helpers.registered()}
    assert {"classification", "generation", "sequence", "translation"} <= tasks


@pytest.fixture(scope="module", params=NAMES)
def network(request):
    """(name, model) of one registered network, built once for all its checks."""
    name = request.param
    yield name, helpers.build(name)
    keras.backend.clear_session()


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
