"""Array datasets read through TFDS: the bundled digits and MNIST.

Two local TFDS builders turn the offline data into TFDS datasets (prepared once, then
read like any TFDS name): ``deeptrends_digits`` from scikit-learn's bundled digits and
``deeptrends_mnist_test`` from the official MNIST test-set idx files. ``load_*`` return
the raw splits (uint8 images, int64 labels) and what the pipeline needs to know.
"""

from __future__ import annotations

import dataclasses
import gzip
import struct
from pathlib import Path

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from data.catalog import default_tfds_dir, source_root
from data.splits import SPLIT_SEED, DataError, RawSplits, fingerprint_arrays, stratified_split

MNIST_FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


# ---------------------------------------------------------------- idx (MNIST) files


def read_idx(path: Path, expected_magic: int) -> np.ndarray:
    """Read a gzipped idx file; a corrupt or truncated file raises ``DataError`` naming it."""
    try:
        with gzip.open(path, "rb") as f:
            payload = f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}: not a readable gzip file ({exc})") from None
    if len(payload) < 8:
        raise DataError(f"{path}: truncated header ({len(payload)} bytes)")
    magic, count = struct.unpack(">II", payload[:8])
    if magic != expected_magic:
        raise DataError(f"{path}: bad magic number {magic}, expected {expected_magic}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", payload[4:header])
    expected = int(np.prod(dims))
    body = payload[header:]
    if len(body) != expected:
        raise DataError(
            f"{path}: truncated or padded: {len(body)} data bytes, the header promises {expected} "
            f"({'x'.join(map(str, dims))})"
        )
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


# ---------------------------------------------------------------- TFDS builders

_CITATION_MNIST = "LeCun, Bottou, Bengio & Haffner (1998). Gradient-based learning applied to document recognition."


class DeeptrendsDigits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's bundled 8x8 handwritten digits (UCI optdigits test set), 1,797
    images, scaled 0..16 -> 0..255, split 80/20 stratified with a fixed seed."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(8, 8, 1)),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset",
        )

    def _split_generators(self, dl_manager):
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
        labels = bunch.target.astype(np.int64)
        train_idx, test_idx = stratified_split(labels, 0.2, SPLIT_SEED)
        return {
            "train": self._generate_examples(images, labels, train_idx),
            "test": self._generate_examples(images, labels, test_idx),
        }

    def _generate_examples(self, images, labels, indices):
        for i in indices:
            yield int(i), {"image": images[i], "label": int(labels[i])}


class DeeptrendsMnistTest(tfds.core.GeneratorBasedBuilder):
    """The official MNIST test set (10,000 digits) from local idx files, split
    8,000/2,000 stratified with a fixed seed; for machines without the full MNIST.

    The prepared copy is keyed by the source files' content: the builder config is named
    by their fingerprint, so changed files are prepared afresh instead of the old copy
    being read under a new fingerprint."""

    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, source_dir: str | Path | None = None, fingerprint: str = "", **kwargs):
        self._source_dir = Path(source_dir) if source_dir else None
        if fingerprint:
            kwargs["config"] = tfds.core.BuilderConfig(
                name=f"files-{fingerprint}", description="prepared from files with this content"
            )
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(28, 28, 1)),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="http://yann.lecun.com/exdb/mnist/",
            citation=_CITATION_MNIST,
        )

    def _split_generators(self, dl_manager):
        images, labels = read_mnist_idx(self._source_dir)
        train_idx, test_idx = stratified_split(labels, 2000, SPLIT_SEED)
        return {
            "train": self._generate_examples(images, labels, train_idx),
            "test": self._generate_examples(images, labels, test_idx),
        }

    def _generate_examples(self, images, labels, indices):
        for i in indices:
            yield int(i), {"image": images[i][..., None], "label": int(labels[i])}


def mnist_source_dir(source_dir: str | Path | None = None) -> Path:
    if source_dir:
        return Path(source_dir)
    root = source_root()
    if root is None:
        raise DataError(
            "MNIST: TFDS 'mnist' is not prepared and DEEPTRENDS_DATA_DIR is not set; set it to "
            "the folder holding mnist_test/ (t10k-*-idx*-ubyte.gz)."
        )
    return root / "mnist_test"


def read_mnist_idx(source_dir: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    folder = mnist_source_dir(source_dir)
    images = read_idx(folder / MNIST_FILES[0], 2051)
    labels = read_idx(folder / MNIST_FILES[1], 2049).astype(np.int64)
    if len(images) != len(labels):
        raise DataError(f"{folder}: {len(images)} images but {len(labels)} labels")
    if labels.max(initial=0) > 9:
        raise DataError(f"{folder / MNIST_FILES[1]}: label {labels.max()} outside 0..9")
    return images, labels


# ---------------------------------------------------------------- loaders


def prepare_quietly(make_builder):
    """``download_and_prepare`` under a file lock beside the data (two workers on an empty
    folder would both write it), with TFDS's own progress lines replaced by one of ours.

    Returns the builder to read from: one made after the lock was taken, so a worker
    that waited while another prepared the data reads what is on disk now (a builder
    made before may hold the empty dataset info: "splits is empty")."""
    import contextlib
    import fcntl
    import io
    import sys

    builder = make_builder()  # (its folder names the lock)
    lock = Path(str(builder.data_dir)).parent / ".prepare.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    notices = io.StringIO()
    with open(lock, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            # A builder reads its dataset info when it is made: one made before the lock
            # may predate what another process wrote meanwhile (even if the file is there
            # by the time it is checked), so the one read from is made under the lock.
            builder = make_builder()
            with contextlib.redirect_stdout(notices):
                builder.download_and_prepare()
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
    if notices.getvalue():
        print(
            f"deeptrends: prepared {builder.name} {builder.version} in {builder.data_dir}",
            file=sys.stderr,
        )
    return builder


def _from_builder(
    make_builder, train_split: str, eval_split: str, fingerprint: str, source: str
) -> RawSplits:
    builder = prepare_quietly(make_builder)
    info = builder.info
    read_config = tfds.ReadConfig(shuffle_seed=SPLIT_SEED, interleave_cycle_length=1)
    train = builder.as_dataset(
        split=train_split, as_supervised=True, shuffle_files=False, read_config=read_config
    )
    evals = builder.as_dataset(
        split=eval_split, as_supervised=True, shuffle_files=False, read_config=read_config
    )
    return RawSplits(
        train=train,
        eval=evals,
        num_train=info.splits[train_split].num_examples,
        num_eval=info.splits[eval_split].num_examples,
        image_shape=tuple(info.features["image"].shape),
        class_names=[str(n) for n in info.features["label"].names],
        fingerprint=fingerprint,
        source=source,
    )


def load_digits(data_dir: str | None = None) -> RawSplits:
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    fingerprint = fingerprint_arrays(bunch.images, bunch.target, salt=f"digits/{SPLIT_SEED}")
    data_dir = data_dir or default_tfds_dir()
    return _from_builder(
        lambda: DeeptrendsDigits(data_dir=data_dir),
        "train",
        "test",
        fingerprint,
        "tfds:deeptrends_digits",
    )


def load_mnist(
    data_dir: str | None = None, source: str = "auto", train_size: int | None = None
) -> RawSplits:
    """MNIST from TFDS ``mnist`` (60k/10k) when prepared in ``data_dir``, else from the
    local test-set idx files (8k/2k).

    Args:
        data_dir: str. The TFDS data_dir.
        source: str. ``auto``, ``tfds`` (require the public TFDS data) or ``local``.
        train_size: int or None. Train on only the first ``train_size`` examples of the
            (seeded, shuffled) training split: a small-data, over-fitting regime.
    """
    if source not in ("auto", "tfds", "local"):
        raise DataError(f"data.source must be 'auto', 'tfds' or 'local'. Received: {source!r}")
    if train_size is not None and (
        isinstance(train_size, bool) or not isinstance(train_size, int) or train_size < 1
    ):
        raise DataError(f"data.train_size must be an int >= 1. Received: {train_size!r}")
    raw = _load_mnist(data_dir, source)
    if train_size is None or train_size >= raw.num_train:
        return raw
    return dataclasses.replace(
        raw,
        train=raw.train.take(train_size),
        num_train=train_size,
        fingerprint=f"{raw.fingerprint}/train{train_size}",
    )


def _load_mnist(data_dir: str | None, source: str) -> RawSplits:
    data_dir = data_dir or default_tfds_dir()
    if source in ("auto", "tfds"):
        public = tfds.builder("mnist", data_dir=data_dir)
        if public.is_prepared():
            fp = f"tfds-mnist-{public.version}"
            return _from_builder(lambda: public, "train", "test", fp, "tfds:mnist")
        if source == "tfds":
            raise DataError(
                f"TFDS 'mnist' is not prepared under {data_dir} (no network to download it)."
            )
    images, labels = read_mnist_idx()
    fingerprint = fingerprint_arrays(images, labels, salt=f"mnist_test/{SPLIT_SEED}")
    source_dir = mnist_source_dir()

    def make():
        return DeeptrendsMnistTest(
            source_dir=source_dir, fingerprint=fingerprint, data_dir=data_dir
        )

    return _from_builder(make, "train", "test", fingerprint, "tfds:deeptrends_mnist_test")


# ---------------------------------------------------------------- arrays as tf.data


def binarize(x: np.ndarray, threshold: float | None) -> np.ndarray:
    return x if threshold is None else (x > threshold).astype(np.float32)


def repeating_dataset(
    x: np.ndarray, y: np.ndarray, batch_size: int, seed: int, drop_remainder: bool = True
):
    """Epoch after epoch of ``(x, y)`` batches, each epoch a permutation keyed by
    (seed, epoch) with a stateless generator (any seed, including 0, is reproducible)."""
    xs, ys = tf.constant(x), tf.constant(y)
    n = len(x)

    def one_epoch(epoch):
        key = tf.stack([tf.constant(seed, tf.int64), epoch])
        order = tf.argsort(tf.random.stateless_uniform([n], seed=key))
        return tf.data.Dataset.from_tensor_slices(order).batch(
            batch_size, drop_remainder=drop_remainder
        )

    return (
        tf.data.Dataset.range(0, 2**31)
        .flat_map(one_epoch)
        .map(
            lambda idx: (tf.gather(xs, idx), tf.gather(ys, idx)),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
        .prefetch(tf.data.AUTOTUNE)
    )


def batched(x: np.ndarray, y: np.ndarray, batch_size: int):
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size).prefetch(tf.data.AUTOTUNE)
