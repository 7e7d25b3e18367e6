"""Shared fixtures. TensorFlow is imported only by the tests that need it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
from pipelines.runtime import prefer_onednn  # noqa: E402  (before any test imports TensorFlow)

prefer_onednn()  # the kernels `deeptrends` runs
REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    """$DEEPTRENDS_DATA_DIR, else ../shared/datasets beside the repo, if it exists."""
    env = os.environ.get("DEEPTRENDS_DATA_DIR")
    for candidate in (env, REPO.parent / "shared" / "datasets"):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory) -> str:
    """A TFDS data_dir private to the test session (prepared datasets land here)."""
    path = tmp_path_factory.mktemp("tfds")
    os.environ["DEEPTRENDS_TFDS_DIR"] = str(path)
    return str(path)


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    root = shared_data_dir()
    if root is None or not (root / "mnist_test").is_dir():
        pytest.skip(
            "MNIST idx files not found: set DEEPTRENDS_DATA_DIR to the folder holding mnist_test/"
        )
    os.environ["DEEPTRENDS_DATA_DIR"] = str(root)
    return root / "mnist_test"
