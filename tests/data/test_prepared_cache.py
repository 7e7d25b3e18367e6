"""The prepared TFDS copy of local source files is keyed by their content: changed files
are prepared afresh, and what trains is what the logged fingerprint says."""

from __future__ import annotations

import gzip
import shutil

import pytest

pytest.importorskip("tensorflow")


@pytest.mark.slow
def test_changed_idx_files_are_prepared_afresh(mnist_dir, tmp_path, monkeypatch):
    from data.arrays import load_mnist

    source = tmp_path / "data" / "mnist_test"
    source.mkdir(parents=True)
    for f in mnist_dir.iterdir():
        shutil.copy(f, source / f.name)
    monkeypatch.setenv("DEEPTRENDS_DATA_DIR", str(tmp_path / "data"))
    tfds_dir = str(tmp_path / "tfds")

    def first_image_sum(splits):
        return int(next(iter(splits.train.take(1)))[0].numpy().sum())

    before = load_mnist(tfds_dir, source="local")
    images = source / "t10k-images-idx3-ubyte.gz"
    raw = gzip.open(images).read()
    with gzip.open(images, "wb") as f:  # the same files, every pixel inverted
        f.write(raw[:16] + bytes(255 - b for b in raw[16:]))
    after = load_mnist(tfds_dir, source="local")
    assert after.fingerprint != before.fingerprint
    first = first_image_sum(before)
    assert first_image_sum(after) == 255 * 28 * 28 - first
