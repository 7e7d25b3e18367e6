"""Shared data types and split helpers: the raw splits every loader returns, the data
error every loader raises, seeded stratified splits and content fingerprints."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf

SPLIT_SEED = 20240


class DataError(ValueError):
    """Bad or missing data; the message names the file and what was expected."""


@dataclass
class RawSplits:
    """The raw train/eval splits of a dataset plus its description."""

    train: tf.data.Dataset
    eval: tf.data.Dataset
    num_train: int
    num_eval: int
    image_shape: tuple[int, int, int]
    class_names: list[str]
    fingerprint: str
    source: str
    extra: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def stratified_split(
    labels: np.ndarray, test_size: int | float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a seeded, stratified train/test split."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    train_idx, test_idx = train_test_split(
        idx, test_size=test_size, stratify=labels, random_state=seed, shuffle=True
    )
    return np.sort(train_idx), np.sort(test_idx)


def fingerprint_arrays(*arrays: np.ndarray, salt: str = "") -> str:
    """A short content hash of arrays (and a salt): the dataset fingerprint."""
    h = hashlib.sha256(salt.encode())
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


# The graph-level seed of an epoch stream when the global seed is 0 (``runtime.seed: 0``):
# there TF's ``get_seed`` compares the op seed with 0 in Python, which a tensor op seed
# (ours: seed and epoch) cannot answer inside ``flat_map``. Any value but 0 mod 2**31 - 1.
_ZERO_GLOBAL_SEED = 104_729


def epoch_shuffle(ds, buffer: int, seed: int, epoch):
    """``ds`` shuffled for ``epoch`` (a tensor inside ``flat_map``) by a key of (seed,
    epoch): the same stream whether a run starts fresh, resumes at an epoch or is rebuilt.
    The op seed is never 0 (+1), which TF reads as "unseeded" when the global seed is 0."""
    graph = tf.compat.v1.get_default_graph()  # the FuncGraph flat_map traces in
    if graph.seed == 0:
        graph.seed = _ZERO_GLOBAL_SEED
    return ds.shuffle(buffer, seed=seed * 1_000_003 + epoch + 1, reshuffle_each_iteration=False)
