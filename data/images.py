"""tf.data input pipelines for image classification.

raw uint8 examples -> cache -> seeded shuffle (train) -> batch -> preprocess per batch
(scale to [0, 1], channels, resize) -> augment per batch (train) -> prefetch.

With ``crop_fraction`` < 1 (the ImageNet papers' "resize to 256, crop 224": 0.875) images
are resized to ``image_size / crop_fraction``; evaluation and serving take the centre
``image_size`` crop, training a random one (per image, keyed like the rest of the
augmentation). ``Augment.pca_jitter`` is AlexNet's colour augmentation: the principal
components of the training set's pixel colours, added with N(0, pca_jitter) weights.

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
from data.splits import RawSplits, epoch_shuffle

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
    pca_jitter: float = 0.0  # std of AlexNet's PCA colour weights (the paper: 0.1)

    @property
    def enabled(self) -> bool:
        return bool(self.pad_crop or self.flip or self.rotation or self.zoom or self.pca_jitter)


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
    drop_remainder: bool = True  # the same batches for any replica count (see build_image_datasets)
    start_epoch: int = 0  # resume: the stream continues at this epoch ...
    start_step: int = 0  # ... and at this batch within it
    crop_fraction: float = (
        1.0  # resize to size / crop_fraction, then crop (train: random, eval: centre)
    )


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
    pca: tuple | None = None  # (eigval, eigvec) of the training pixels, when PCA jitter is on


def _crop_source_size(
    height: int, width: int, image_size: int | None, crop_fraction: float
) -> tuple:
    """(target H, W) and the (H, W) to resize to before cropping the target out of it."""
    target = (image_size, image_size) if image_size is not None else (height, width)
    if crop_fraction >= 1.0:
        return target, target
    return target, tuple(max(t, int(round(t / crop_fraction))) for t in target)


def preprocess_images(
    images: tf.Tensor, image_size: int | None, channels: int | None, crop_fraction: float = 1.0
) -> tf.Tensor:
    """uint8 (or [0, 255] float) images [B, H, W, C] -> float32 in [0, 1], ``channels``
    channels, ``image_size`` x ``image_size`` (bilinear). With ``crop_fraction`` < 1 the
    images are resized to ``image_size / crop_fraction`` and the centre ``image_size``
    square is kept (evaluation by resize + centre crop). Used for evaluation and serving
    alike; training calls it with ``crop_fraction=1`` at the larger size and crops at random."""
    if not 0.0 < crop_fraction <= 1.0:
        raise ValueError(
            f"crop_fraction must be in (0, 1]. Received: crop_fraction={crop_fraction!r}"
        )
    if crop_fraction < 1.0:
        if image_size is None and (images.shape[1] is None or images.shape[2] is None):
            raise ValueError(
                "crop_fraction < 1 needs image_size or a static image height and width"
            )
        (th, tw), (sh, sw) = _crop_source_size(
            images.shape[1], images.shape[2], image_size, crop_fraction
        )
        x = _scale_channels(images, channels)
        x = tf.image.resize(x, (sh, sw), method="bilinear")
        top, left = (sh - th) // 2, (sw - tw) // 2
        return x[:, top : top + th, left : left + tw, :]
    x = _scale_channels(images, channels)
    if image_size is not None:
        x = tf.image.resize(x, (image_size, image_size), method="bilinear")
    return x


def _scale_channels(images: tf.Tensor, channels: int | None) -> tf.Tensor:
    x = tf.cast(images, tf.float32) / 255.0
    if channels is not None:
        c = x.shape[-1]
        if c == 3 and channels == 1:
            x = tf.image.rgb_to_grayscale(x)
        elif c == 1 and channels == 3:
            x = tf.image.grayscale_to_rgb(x)
        elif c == 4:
            x = x[..., :3] if channels == 3 else tf.image.rgb_to_grayscale(x[..., :3])
    return x


def random_crop_images(images: tf.Tensor, size: tuple[int, int], seed: tf.Tensor) -> tf.Tensor:
    """A random ``size`` crop of every image of a batch (whole-pixel offsets, stateless)."""
    height, width = images.shape[1], images.shape[2]
    th, tw = size
    if (height, width) == (th, tw):
        return images
    batch = tf.shape(images)[0]
    seeds = tf.random.experimental.stateless_split(seed, num=2)
    top = tf.random.stateless_uniform(
        tf.stack([batch]), seeds[0], 0, height - th + 1, dtype=tf.int32
    )
    left = tf.random.stateless_uniform(
        tf.stack([batch]), seeds[1], 0, width - tw + 1, dtype=tf.int32
    )
    top, left = tf.cast(top, tf.float32), tf.cast(left, tf.float32)
    # normalised boxes whose corners fall on pixel centres: bilinear sampling picks pixels exactly
    boxes = tf.stack(
        [
            top / (height - 1),
            left / (width - 1),
            (top + th - 1) / (height - 1),
            (left + tw - 1) / (width - 1),
        ],
        axis=1,
    )
    return tf.image.crop_and_resize(images, boxes, tf.range(batch), (th, tw), method="bilinear")


# The principal components of ImageNet's RGB pixels in [0, 1] as fb.resnet.torch gives
# them (the square roots of the covariance eigenvalues: the standard deviation along each
# component): the fallback when a dataset's own statistics are not given.
IMAGENET_PCA = (
    (0.2175, 0.0188, 0.0045),
    ((-0.5675, 0.7192, 0.4009), (-0.5808, -0.0045, -0.8140), (-0.5836, -0.6948, 0.4203)),
)


def pixel_pca(images) -> tuple[tuple[float, ...], tuple[tuple[float, ...], ...]]:
    """The standard deviations along the principal components (square roots of the
    eigenvalues, as in ``IMAGENET_PCA``) and the eigenvectors (columns) of the pixel colour
    covariance of float images in [0, 1] [N, H, W, C] (numpy or tensor)."""
    import numpy as np

    pixels = np.asarray(images, dtype=np.float64).reshape(-1, np.shape(images)[-1])
    cov = np.atleast_2d(np.cov(pixels, rowvar=False))
    eigval, eigvec = np.linalg.eigh(cov)
    order = np.argsort(eigval)[::-1]
    eigval = np.sqrt(np.clip(eigval[order], 0.0, None))
    return tuple(float(v) for v in eigval), tuple(
        tuple(float(v) for v in row) for row in eigvec[:, order]
    )


def pca_colour_jitter(images: tf.Tensor, seed: tf.Tensor, std: float, pca=None) -> tf.Tensor:
    """AlexNet's colour augmentation (Krizhevsky et al. 2012, section 4.1): add
    ``eigvec @ (alpha * eigval)`` to every pixel of an image, alpha ~ N(0, std) drawn per
    image and component. ``pca`` = (eigval, eigvec) from ``pixel_pca``; ImageNet's if None."""
    eigval, eigvec = pca or IMAGENET_PCA
    channels = images.shape[-1]
    eigval = tf.constant(eigval, tf.float32)
    eigvec = tf.constant(eigvec, tf.float32)
    if eigvec.shape != (channels, channels):
        raise ValueError(f"PCA of {eigvec.shape[0]} colours for images of {channels} channels")
    alpha = tf.random.stateless_normal(tf.stack([tf.shape(images)[0], channels]), seed, stddev=std)
    shift = tf.matmul(alpha * eigval, eigvec, transpose_b=True)  # [B, C]
    return tf.clip_by_value(images + shift[:, None, None, :], 0.0, 1.0)


def _affine_transforms(
    seed: tf.Tensor, batch: tf.Tensor, height: int, width: int, aug: Augment
) -> tf.Tensor:
    """Per-image projective transforms [B, 8] (output -> input coordinates) composing a
    rotation and zoom about the centre with a translation, from a stateless seed."""
    seeds = tf.random.experimental.stateless_split(seed, num=4)
    shape = tf.stack([batch])
    theta = tf.random.stateless_uniform(shape, seeds[0], -1.0, 1.0) * (
        aug.rotation * math.pi / 180.0
    )
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


def augment_images(images: tf.Tensor, seed: tf.Tensor, aug: Augment, pca=None) -> tf.Tensor:
    """Random geometric (and PCA colour) augmentation of a float batch, reproducible from
    ``seed`` (shape [2]); ``pca`` as for ``pca_colour_jitter``."""
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
    if aug.pca_jitter:
        images = pca_colour_jitter(
            images, tf.random.experimental.stateless_fold_in(seed, 11), aug.pca_jitter, pca
        )
    return images


def load_raw(spec: ImageInputSpec) -> RawSplits:
    """Read the raw splits of ``spec.name`` through its registered loader."""
    import importlib

    entry = get_dataset(spec.name)
    options = check_options(spec.name, spec.options)
    module, _, fn = entry.load.partition(":")
    loader = getattr(importlib.import_module(module), fn)
    return loader(data_dir=spec.data_dir, **options)


def load_image_arrays(spec: ImageInputSpec) -> dict:
    """A dataset's splits as preprocessed float32 arrays in [0, 1] with int64 labels, plus
    ``class_names``, ``fingerprint``, ``source`` and ``raw_shape`` (for models trained
    from arrays: the generative models, greedy RBM pre-training)."""
    import numpy as np

    raw = load_raw(spec)
    channels = spec.channels or int(raw.image_shape[-1])

    def arrays(ds):
        xs, ys = [], []
        for x, y in ds.batch(4096):
            xs.append(preprocess_images(x, spec.image_size, channels).numpy())
            ys.append(y.numpy())
        return np.concatenate(xs).astype(np.float32), np.concatenate(ys).astype(np.int64)

    return {
        "train": arrays(raw.train),
        "test": arrays(raw.eval),
        "class_names": raw.class_names,
        "fingerprint": raw.fingerprint,
        "source": raw.source,
        "raw_shape": list(raw.image_shape),
    }


def _cached(ds: tf.data.Dataset) -> tf.data.Dataset:
    """``ds`` cached in memory, the cache filled now by one whole pass.

    A cache that is still being filled can be truncated by a reader that stops early
    (a check batch, the loop's sample batch: ``take(1)``) when the stream carries a
    distribute option: TensorFlow says it discards the partial contents, yet later
    passes may see only the examples read so far (measured with TF 2.21: 34-48 of 360
    eval images, about 130 of 1,437 train images with a small shuffle buffer). Filled
    once here, every later iterator only reads it. The pass is the one the first epoch
    would have made."""
    cached = ds.cache()
    for _ in cached.batch(4096):
        pass
    return cached


def _options(spec: ImageInputSpec, shard_policy: str) -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = spec.deterministic
    options.experimental_distribute.auto_shard_policy = _SHARD[shard_policy]
    return options


def build_image_datasets(
    spec: ImageInputSpec,
) -> tuple[tf.data.Dataset, tf.data.Dataset, ImageDatasetInfo]:
    """The batched train and eval datasets of an image-classification spec, and their info.

    The train dataset repeats without end (epoch after epoch, each reshuffled with a
    seed derived from ``spec.seed`` and the epoch); iterate it ``info.steps_per_epoch``
    batches per epoch. The eval dataset is one pass.

    ``drop_remainder`` (the default) drops each epoch's last partial batch: every global
    batch then splits evenly over any number of replicas, so one process and N workers
    take the same gradient steps on the same examples. A partial batch would be split
    unevenly (or left to one worker) and averaged per replica, which changes the update.
    """
    raw = load_raw(spec)
    if spec.drop_remainder and raw.num_train < spec.batch_size:
        raise ValueError(
            f"{spec.name}: the training split has {raw.num_train} examples, fewer than one "
            f"batch of {spec.batch_size}, and partial batches are dropped "
            "(data.drop_remainder): lower train.batch_size or set data.drop_remainder=false."
        )
    shard_policy = get_dataset(spec.name).shard_policy
    raw_shape = tuple(int(d) for d in raw.image_shape)
    size = spec.image_size
    channels = spec.channels or raw_shape[-1]
    out_shape = (size or raw_shape[0], size or raw_shape[1], channels)

    def prep(images, labels):
        return preprocess_images(images, size, channels, spec.crop_fraction), labels

    # training resizes to the larger size and crops at random (crop_fraction < 1)
    target, source = _crop_source_size(raw_shape[0], raw_shape[1], size, spec.crop_fraction)
    cropping = source != target

    def train_prep_sized(images, labels):
        x = preprocess_images(images, None, channels)
        if (raw_shape[0], raw_shape[1]) != source:
            x = tf.image.resize(x, source, method="bilinear")
        return x, labels

    options = _options(spec, shard_policy)
    train_raw = _cached(raw.train) if spec.cache else raw.train
    buffer = min(spec.shuffle_buffer, raw.num_train)
    pca = None
    if spec.augment.pca_jitter:
        pca = pixel_pca(
            preprocess_images(next(iter(raw.train.batch(2048).take(1)))[0], None, channels)
        )

    def one_epoch(epoch: tf.Tensor) -> tf.data.Dataset:
        # Shuffle and augmentation are keyed by (seed, epoch, batch): the same stream
        # whether the run starts fresh, resumes at an epoch, or is rebuilt.
        ds = epoch_shuffle(train_raw, buffer, spec.seed, epoch)
        ds = ds.batch(spec.batch_size, drop_remainder=spec.drop_remainder)
        ds = ds.map(
            train_prep_sized if cropping else prep,
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=spec.deterministic,
        )
        if not (spec.augment.enabled or cropping):
            return ds

        def aug(step, batch):
            key = tf.stack([tf.cast(spec.seed, tf.int64), epoch * 1_000_000 + step])
            images = batch[0]
            if cropping:
                images = random_crop_images(
                    images, target, tf.random.experimental.stateless_fold_in(key, 13)
                )
            if spec.augment.enabled:
                images = augment_images(images, key, spec.augment, pca)
            return images, batch[1]

        return ds.enumerate().map(
            aug, num_parallel_calls=tf.data.AUTOTUNE, deterministic=spec.deterministic
        )

    train = (
        tf.data.Dataset.range(spec.start_epoch, 2**31)
        .flat_map(one_epoch)
        .skip(spec.start_step)
        .prefetch(tf.data.AUTOTUNE)
        .with_options(options)
    )
    evals = _cached(raw.eval) if spec.cache else raw.eval
    evals = (
        evals.batch(spec.batch_size)
        .map(prep, num_parallel_calls=tf.data.AUTOTUNE, deterministic=spec.deterministic)
        .prefetch(tf.data.AUTOTUNE)
        .with_options(options)
    )
    steps = (
        raw.num_train // spec.batch_size
        if spec.drop_remainder
        else math.ceil(raw.num_train / spec.batch_size)
    )
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
        pca=pca,
    )
    return train, evals, info


def build_train_as_eval(spec: ImageInputSpec) -> tf.data.Dataset:
    """The training split as one un-augmented pass, preprocessed like the eval split (for
    the train/eval gap of a trained model)."""
    raw = load_raw(spec)
    channels = spec.channels or int(raw.image_shape[-1])
    return (
        raw.train.batch(spec.batch_size)
        .map(
            lambda x, y: (preprocess_images(x, spec.image_size, channels, spec.crop_fraction), y),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        .prefetch(tf.data.AUTOTUNE)
    )
