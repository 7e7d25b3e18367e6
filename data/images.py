"""tf.data input pipelines for image classification.

raw uint8 examples -> cache -> seeded shuffle (train) -> batch -> preprocess per batch
(scale to [0, 1], channels, resize) -> augment per batch (train) -> prefetch.

``preprocess_images`` is the one definition of preprocessing: the training pipeline and
the exported serving signatures (``image_bytes``) both call it.

Auto-sharding: each dataset declares its policy in the catalog (``DATA`` for the small
in-memory sets here: every worker reads the data and keeps every N-th element of it;
``FILE`` for file-sharded sets). The policy is set on the dataset options and used by
``tf.distribute`` when the dataset is distributed over workers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import tensorflow as tf

from data.catalog import check_options, get_dataset
from data.sources import RawSplits

_SHARD = {
    "AUTO": tf.data.experimental.AutoShardPolicy.AUTO,
    "FILE": tf.data.experimental.AutoShardPolicy.FILE,
    "DATA": tf.data.experimental.AutoShardPolicy.DATA,
    "OFF": tf.data.experimental.AutoShardPolicy.OFF,
}


@dataclass(frozen=True)
class Augment:
    """Per-image random geometric augmentation, applied to a batch at once."""

    pad_crop: int = 0  # random translation by up to this many pixels (pad + random crop)
    flip: bool = False  # random horizontal flip
    rotation: float = 0.0  # degrees
    zoom: float = 0.0  # relative

    @property
    def enabled(self) -> bool:
        return bool(self.pad_crop or self.flip or self.rotation or self.zoom)


@dataclass(frozen=True)
class ImageInputSpec:
    """How to feed an image-classification dataset."""

    name: str
    batch_size: int
    seed: int = 42
    data_dir: str | None = None
    image_size: int | None = None
    channels: int | None = None
    cache: bool = True
    shuffle_buffer: int = 10_000
    deterministic: bool = True
    augment: Augment = field(default_factory=Augment)
    options: dict = field(default_factory=dict)
    drop_remainder: bool = False
    start_epoch: int = 0  # resume: the stream continues at this epoch ...
    start_step: int = 0  # ... and at this batch within it


@dataclass
class ImageDatasetInfo:
    """What a task needs to know about its data."""

    name: str
    num_classes: int
    class_names: list[str]
    image_shape: tuple[int, int, int]  # after preprocessing: the model's input
    raw_shape: tuple[int, int, int]
    num_train: int
    num_eval: int
    steps_per_epoch: int
    fingerprint: str
    source: str
    shard_policy: str


def preprocess_images(images: tf.Tensor, image_size: int | None, channels: int | None) -> tf.Tensor:
    """uint8 (or [0, 255] float) images [B, H, W, C] -> float32 in [0, 1], ``channels``
    channels, ``image_size`` x ``image_size`` (bilinear). Used for training, evaluation and
    serving alike."""
    x = tf.cast(images, tf.float32) / 255.0
    if channels is not None:
        c = x.shape[-1]
        if c == 3 and channels == 1:
            x = tf.image.rgb_to_grayscale(x)
        elif c == 1 and channels == 3:
            x = tf.image.grayscale_to_rgb(x)
        elif c == 4:
            x = x[..., :3] if channels == 3 else tf.image.rgb_to_grayscale(x[..., :3])
    if image_size is not None:
        x = tf.image.resize(x, (image_size, image_size), method="bilinear")
    return x


def _affine_transforms(seed: tf.Tensor, batch: tf.Tensor, height: int, width: int, aug: Augment) -> tf.Tensor:
    """Per-image projective transforms [B, 8] (output -> input coordinates) composing a
    rotation and zoom about the centre with a translation, from a stateless seed."""
    seeds = tf.random.experimental.stateless_split(seed, num=4)
    shape = tf.stack([batch])
    theta = tf.random.stateless_uniform(shape, seeds[0], -1.0, 1.0) * (aug.rotation * math.pi / 180.0)
    scale = 1.0 + tf.random.stateless_uniform(shape, seeds[1], -1.0, 1.0) * aug.zoom
    shift = tf.random.stateless_uniform(
        tf.stack([batch, 2]), seeds[2], -float(aug.pad_crop), float(aug.pad_crop) + 1.0
    )
    shift = tf.floor(shift)  # whole pixels, as a pad-and-crop would move them
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    cos, sin = tf.cos(theta) / scale, tf.sin(theta) / scale
    a0, a1, b0, b1 = cos, sin, -sin, cos
    a2 = cx - a0 * cx - a1 * cy + shift[:, 0]
    b2 = cy - b0 * cx - b1 * cy + shift[:, 1]
    zeros = tf.zeros_like(a0)
    return tf.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1)


def augment_images(images: tf.Tensor, seed: tf.Tensor, aug: Augment) -> tf.Tensor:
    """Random geometric augmentation of a float batch, reproducible from ``seed`` (shape [2])."""
    batch = tf.shape(images)[0]
    height, width = images.shape[1], images.shape[2]
    if aug.pad_crop or aug.rotation or aug.zoom:
        transforms = _affine_transforms(seed, batch, height, width, aug)
        images = tf.raw_ops.ImageProjectiveTransformV3(
            images=images,
            transforms=transforms,
            output_shape=tf.constant([height, width], tf.int32),
            fill_value=0.0,
            interpolation="BILINEAR",
            fill_mode="CONSTANT",
        )
    if aug.flip:
        flip_seed = tf.random.experimental.stateless_fold_in(seed, 7)
        mask = tf.random.stateless_uniform(tf.stack([batch, 1, 1, 1]), flip_seed) < 0.5
        images = tf.where(mask, tf.reverse(images, axis=[2]), images)
    return images


def load_raw(spec: ImageInputSpec) -> RawSplits:
    """Read the raw splits of ``spec.name`` through its registered loader."""
    import importlib

    entry = get_dataset(spec.name)
    options = check_options(spec.name, spec.options)
    module, _, fn = entry.load.partition(":")
    loader = getattr(importlib.import_module(module), fn)
    return loader(data_dir=spec.data_dir, **options)


def _options(spec: ImageInputSpec, shard_policy: str) -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = spec.deterministic
    options.experimental_distribute.auto_shard_policy = _SHARD[shard_policy]
    return options


def build_image_datasets(spec: ImageInputSpec) -> tuple[tf.data.Dataset, tf.data.Dataset, ImageDatasetInfo]:
    """The batched train and eval datasets of an image-classification spec, and their info.

    The train dataset repeats without end (epoch after epoch, each reshuffled with a
    seed derived from ``spec.seed`` and the epoch); iterate it ``info.steps_per_epoch``
    batches per epoch. The eval dataset is one pass.
    """
    raw = load_raw(spec)
    shard_policy = get_dataset(spec.name).shard_policy
    raw_shape = tuple(int(d) for d in raw.image_shape)
    size = spec.image_size
    channels = spec.channels or raw_shape[-1]
    out_shape = (size or raw_shape[0], size or raw_shape[1], channels)

    def prep(images, labels):
        return preprocess_images(images, size, channels), labels

    options = _options(spec, shard_policy)
    train_raw = raw.train.cache() if spec.cache else raw.train
    buffer = min(spec.shuffle_buffer, raw.num_train)

    def one_epoch(epoch: tf.Tensor) -> tf.data.Dataset:
        # Shuffle and augmentation are keyed by (seed, epoch, batch): the same stream
        # whether the run starts fresh, resumes at an epoch, or is rebuilt.
        ds = train_raw.shuffle(buffer, seed=spec.seed * 1_000_003 + epoch, reshuffle_each_iteration=False)
        ds = ds.batch(spec.batch_size, drop_remainder=spec.drop_remainder)
        ds = ds.map(prep, num_parallel_calls=tf.data.AUTOTUNE, deterministic=spec.deterministic)
        if not spec.augment.enabled:
            return ds

        def aug(step, batch):
            key = tf.stack([tf.cast(spec.seed, tf.int64), epoch * 1_000_000 + step])
            return augment_images(batch[0], key, spec.augment), batch[1]

        return ds.enumerate().map(aug, num_parallel_calls=tf.data.AUTOTUNE, deterministic=spec.deterministic)

    train = (
        tf.data.Dataset.range(spec.start_epoch, 2**31)
        .flat_map(one_epoch)
        .skip(spec.start_step)
        .prefetch(tf.data.AUTOTUNE)
        .with_options(options)
    )
    evals = raw.eval.cache() if spec.cache else raw.eval
    evals = (
        evals.batch(spec.batch_size)
        .map(prep, num_parallel_calls=tf.data.AUTOTUNE, deterministic=spec.deterministic)
        .prefetch(tf.data.AUTOTUNE)
        .with_options(options)
    )
    steps = raw.num_train // spec.batch_size if spec.drop_remainder else math.ceil(raw.num_train / spec.batch_size)
    info = ImageDatasetInfo(
        name=spec.name,
        num_classes=raw.num_classes,
        class_names=raw.class_names,
        image_shape=out_shape,
        raw_shape=raw_shape,
        num_train=raw.num_train,
        num_eval=raw.num_eval,
        steps_per_epoch=steps,
        fingerprint=raw.fingerprint,
        source=raw.source,
        shard_policy=shard_policy,
    )
    return train, evals, info
