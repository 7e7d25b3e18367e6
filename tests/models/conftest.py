"""The JAX side of the registry-generated checks runs beside the rest of the session.

Right after collection, one subprocess with ``KERAS_BACKEND=jax`` starts on every network
whose JAX test is selected (``tests/helpers.py``); the JAX tests are moved to the end of
the run, so the TensorFlow tests run while it works and the JAX tests rarely wait.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from pathlib import Path

import pytest

from tests import helpers

JAX_TEST = "test_same_network_on_jax"
_JAX = pytest.StashKey[dict]()


def _jax_names(items) -> list[str]:
    return sorted(
        {i.callspec.params["network"] for i in items if getattr(i, "originalname", "") == JAX_TEST}
    )


@pytest.hookimpl(trylast=True)  # after pytest has grouped the tests by network
def pytest_collection_modifyitems(config, items):
    jax = [i for i in items if getattr(i, "originalname", "") == JAX_TEST]
    if jax:
        items[:] = [i for i in items if getattr(i, "originalname", "") != JAX_TEST] + jax


def pytest_collection_finish(session):
    names = _jax_names(session.items)
    if not names or importlib.util.find_spec("jax") is None:
        return
    out_dir = Path(tempfile.mkdtemp(prefix="deeptrends-jax-"))
    session.config.stash[_JAX] = {
        "proc": helpers.start_jax(names, out_dir),
        "names": names,
        "out_dir": out_dir,
    }


def pytest_sessionfinish(session):
    state = session.config.stash.get(_JAX, None)
    if state is None:
        return
    if state["proc"].poll() is None:
        state["proc"].kill()
        state["proc"].wait()
    shutil.rmtree(state["out_dir"], ignore_errors=True)


@pytest.fixture(scope="session")
def jax_runs(request):
    """name -> ``helpers.JaxRun`` (or the JAX side's error) for the selected networks."""
    state = request.config.stash.get(_JAX, None)
    if state is None:
        pytest.skip("JAX is not installed (pip install -e .[dev])")
    return helpers.collect_jax(state["proc"], state["names"], state["out_dir"])
