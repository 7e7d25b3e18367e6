"""Image-classification data from outside the bundled sets: a folder of images (a class
per sub-folder) and any prepared TFDS image-classification dataset.

Image folder::

    PATH/cat/001.jpg  PATH/dog/x.png ...                  (seeded stratified split), or
    PATH/train/cat/001.jpg ... PATH/test/cat/002.jpg ...  (the given split)

JPEG, PNG, BMP and GIF files of any size are decoded once, their shorter side resized to
``load_size`` and the centre square kept (the "resize" of resize + crop; the pipeline
then crops to ``data.image_size``), and held in memory as uint8. A file that does not
decode raises ``DataError`` naming it.

TFDS: ``data.name: tfds`` with ``data.tfds_name: NAME[/CONFIG][:VERSION]`` reads a dataset
already prepared under ``data.dir`` (no downloads here); images of varying size need
``data.load_size``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import tensorflow as tf

from data.catalog import default_tfds_dir
from data.splits import SPLIT_SEED, DataError, RawSplits, stratified_split

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
TRAIN_DIRS = ("train",)
EVAL_DIRS = ("test", "eval", "val", "validation")


def square_resize(image: tf.Tensor, size: int) -> tf.Tensor:
    """Resize an image [H, W, C] so its shorter side is ``size`` and keep the centre square (uint8)."""
    shape = tf.shape(image)
    h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    scale = float(size) / tf.minimum(h, w)
    new_h = tf.maximum(size, tf.cast(tf.round(h * scale), tf.int32))
    new_w = tf.maximum(size, tf.cast(tf.round(w * scale), tf.int32))
    resized = tf.image.resize(image, tf.stack([new_h, new_w]), method="bilinear", antialias=True)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    cropped = resized[top : top + size, left : left + size, :]
    return tf.cast(tf.clip_by_value(tf.round(cropped), 0.0, 255.0), tf.uint8)


def _class_folders(root: Path, where: str) -> list[Path]:
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(
            f"{where} {root}: no class sub-folders (expected {root}/<class>/<image>.jpg)"
        )
    return folders


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
    )


def _scan(
    root: Path, class_names: list[str] | None, where: str
) -> tuple[list[Path], list[int], list[str]]:
    folders = _class_folders(root, where)
    names = [f.name for f in folders]
    if class_names is not None:
        unknown = sorted(set(names) - set(class_names))
        if unknown:
            raise DataError(
                f"{where} {root}: class folder(s) {unknown} are not among the training classes {class_names}"
            )
    else:
        class_names = names
    files, labels = [], []
    for folder in folders:
        found = _image_files(folder)
        if not found and class_names is names:
            raise DataError(
                f"{where} {folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) in this class folder"
            )
        files += found
        labels += [class_names.index(folder.name)] * len(found)
    return files, labels, class_names


def _decode_all(files: list[Path], load_size: int, channels: int, digest) -> np.ndarray:
    out = np.empty((len(files), load_size, load_size, channels), np.uint8)
    for i, path in enumerate(files):
        data = path.read_bytes()
        digest.update(path.name.encode())
        digest.update(data)
        try:
            image = tf.io.decode_image(data, channels=channels, expand_animations=False)
        except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as exc:
            first = (exc.message or str(exc)).strip().splitlines()[0]
            raise DataError(f"{path}: not a decodable image ({first})") from None
        if image.shape[0] == 0 or image.shape[1] == 0:
            raise DataError(f"{path}: empty image ({image.shape[0]}x{image.shape[1]})")
        out[i] = square_resize(image, load_size).numpy()
    return out


def load_image_folder(
    data_dir: str | None = None,
    path: str | None = None,
    load_size: int = 64,
    grayscale: bool = False,
    test_fraction: float = 0.2,
    split_seed: int = SPLIT_SEED,
) -> RawSplits:
    """Read an image folder into memory.

    Args:
        data_dir: str. Unused (the TFDS data_dir of other datasets).
        path: str. The folder: ``<class>/<images>``, or ``train/<class>/...`` and
            ``test/<class>/...`` (``eval``, ``val`` or ``validation`` also name the eval split).
        load_size: int. Pixels of the square each image is resized and centre-cropped to.
        grayscale: bool. Decode to one channel instead of three.
        test_fraction: float. The share of each class held out for evaluation when the
            folder has no train/test split of its own.
        split_seed: int. The seed of that stratified split.
    """
    if not path:
        raise DataError("data.path: the image folder is required (data.path: /path/to/images)")
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"data.path: {str(root)!r} is not a folder")
    if not isinstance(load_size, int) or isinstance(load_size, bool) or load_size < 8:
        raise DataError(f"data.load_size must be an int >= 8. Received: load_size={load_size!r}")
    if not 0.0 < float(test_fraction) < 1.0:
        raise DataError(
            f"data.test_fraction must be in (0, 1). Received: test_fraction={test_fraction!r}"
        )
    channels = 1 if grayscale else 3
    digest = hashlib.sha256(
        f"image_folder/{load_size}/{channels}/{split_seed}/{test_fraction}".encode()
    )
    subdirs = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
    train_dir = next((subdirs[d] for d in TRAIN_DIRS if d in subdirs), None)
    eval_dir = next((subdirs[d] for d in EVAL_DIRS if d in subdirs), None)
    if train_dir is not None and eval_dir is not None:
        train_files, train_labels, class_names = _scan(train_dir, None, "data.path")
        eval_files, eval_labels, _ = _scan(eval_dir, class_names, "data.path")
        x_train = _decode_all(train_files, load_size, channels, digest)
        x_eval = _decode_all(eval_files, load_size, channels, digest)
        y_train, y_eval = np.asarray(train_labels, np.int64), np.asarray(eval_labels, np.int64)
        layout = "train/test folders"
    else:
        files, labels, class_names = _scan(root, None, "data.path")
        counts = np.bincount(labels, minlength=len(class_names))
        if counts.min() < 2:
            small = class_names[int(counts.argmin())]
            raise DataError(
                f"data.path {root / small}: a class needs at least 2 images to be split"
            )
        images = _decode_all(files, load_size, channels, digest)
        y = np.asarray(labels, np.int64)
        test_size = max(len(class_names), int(round(len(y) * float(test_fraction))))
        train_idx, eval_idx = stratified_split(y, test_size, split_seed)
        x_train, y_train, x_eval, y_eval = (
            images[train_idx],
            y[train_idx],
            images[eval_idx],
            y[eval_idx],
        )
        layout = f"stratified split, seed {split_seed}"
    if len(y_eval) == 0:
        raise DataError(f"data.path {eval_dir}: the eval split has no images")
    return RawSplits(
        train=tf.data.Dataset.from_tensor_slices((x_train, y_train)),
        eval=tf.data.Dataset.from_tensor_slices((x_eval, y_eval)),
        num_train=len(y_train),
        num_eval=len(y_eval),
        image_shape=(load_size, load_size, channels),
        class_names=class_names,
        fingerprint=digest.hexdigest()[:16],
        source=f"image folder {root} ({layout})",
    )


def load_tfds_images(
    data_dir: str | None = None,
    tfds_name: str | None = None,
    train_split: str = "train",
    eval_split: str = "test",
    image_key: str = "image",
    label_key: str = "label",
    load_size: int | None = None,
) -> RawSplits:
    """A prepared TFDS image-classification dataset (nothing is downloaded).

    Args:
        data_dir: str. The TFDS data_dir holding the prepared dataset.
        tfds_name: str. The TFDS name, e.g. ``mnist``, ``cifar10``, ``imagenette/320px``.
        train_split: str. The training split (TFDS slicing allowed: ``train[:90%]``).
        eval_split: str. The evaluation split.
        image_key: str. The image feature.
        label_key: str. The ``ClassLabel`` feature.
        load_size: int or None. Resize the shorter side to this and keep the centre
            square; required when the images vary in size.
    """
    import tensorflow_datasets as tfds

    if not tfds_name:
        raise DataError(
            "data.tfds_name: name the prepared TFDS dataset, e.g. data.tfds_name: mnist"
        )
    data_dir = data_dir or default_tfds_dir()
    try:
        builder = tfds.builder(tfds_name, data_dir=data_dir)
    except Exception as exc:  # DatasetNotFoundError and friends
        raise DataError(
            f"data.tfds_name: {tfds_name!r} is not a TFDS dataset found under {data_dir} ({exc})"
        ) from None
    if not builder.is_prepared():
        raise DataError(
            f"data.tfds_name: TFDS {tfds_name!r} is not prepared under {data_dir} (no network here to "
            "download it): prepare it elsewhere with tfds.builder(...).download_and_prepare() and copy it, "
            "or point data.dir at its data_dir."
        )
    info = builder.info
    features = info.features
    for key, what in ((image_key, "image_key"), (label_key, "label_key")):
        if key not in features:
            raise DataError(
                f"data.{what}: {tfds_name!r} has no feature {key!r}. Features: {', '.join(features)}"
            )
    label_feature = features[label_key]
    if not isinstance(label_feature, tfds.features.ClassLabel):
        raise DataError(
            f"data.label_key: {tfds_name}.{label_key} is not a ClassLabel ({type(label_feature).__name__})"
        )
    shape = tuple(features[image_key].shape)
    if len(shape) != 3:
        raise DataError(
            f"data.image_key: {tfds_name}.{image_key} has shape {shape}, expected (H, W, C)"
        )
    if load_size is None and (shape[0] is None or shape[1] is None):
        raise DataError(
            f"data.load_size: {tfds_name} images vary in size {shape}; set data.load_size (e.g. 256)"
        )
    if shape[2] is None:
        raise DataError(
            f"data.image_key: {tfds_name}.{image_key} has no fixed channel count {shape}"
        )
    splits = {}
    for split, what in ((train_split, "train_split"), (eval_split, "eval_split")):
        try:
            splits[split] = info.splits[split].num_examples
        except (KeyError, ValueError) as exc:
            raise DataError(
                f"data.{what}: {split!r} is not a split of {tfds_name} ({', '.join(info.splits)}): {exc}"
            ) from None

    def pick(example):
        image = example[image_key]
        if load_size is not None:
            image = square_resize(image, load_size)
        return image, tf.cast(example[label_key], tf.int64)

    read_config = tfds.ReadConfig(shuffle_seed=SPLIT_SEED, interleave_cycle_length=1)

    def read(split):
        ds = builder.as_dataset(split=split, shuffle_files=False, read_config=read_config)
        return ds.map(pick, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    image_shape = (load_size, load_size, shape[2]) if load_size else shape
    return RawSplits(
        train=read(train_split),
        eval=read(eval_split),
        num_train=splits[train_split],
        num_eval=splits[eval_split],
        image_shape=tuple(int(d) for d in image_shape),
        class_names=[str(n) for n in label_feature.names],
        fingerprint=f"tfds-{builder.name}-{builder.version}-{train_split}-{eval_split}-{load_size}",
        source=f"tfds:{tfds_name}",
    )
