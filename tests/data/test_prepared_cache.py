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


@pytest.mark.slow
def test_processes_starting_together_on_an_empty_folder_all_read_it(tmp_path):
    """What two fresh workers of ``deeptrends launch`` do: one prepares under the lock,
    the others wait and then read what it wrote (they used to read the empty dataset
    info of a builder made before the data existed: "splits is empty")."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys; from data.arrays import load_digits; "
        "s = load_digits(sys.argv[1]); print(s.num_train, s.num_eval)"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path / "tfds")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-2000:]
        assert out.split() == ["1437", "360"]
    assert sum("deeptrends: prepared" in err for _, err in outs) == 1  # prepared once


def test_a_builder_made_before_another_process_prepared_is_not_read_from(tmp_path):
    """The race behind "splits is empty", made deterministic: the first builder is made on
    the empty folder, then another process prepares it (here, right after that builder
    was made), and only then is the lock taken. What is returned reads the splits."""
    from data.arrays import DeeptrendsDigits, prepare_quietly

    made = []

    def make():
        builder = DeeptrendsDigits(data_dir=str(tmp_path))
        made.append(builder)
        if len(made) == 1:  # "another process" prepares between our builder and our lock
            DeeptrendsDigits(data_dir=str(tmp_path)).download_and_prepare()
        return builder

    builder = prepare_quietly(make)
    assert builder is not made[0]
    assert builder.info.splits["train"].num_examples > 0
    assert builder.info.splits["test"].num_examples > 0
