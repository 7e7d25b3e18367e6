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
