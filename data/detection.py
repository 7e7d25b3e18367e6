"""Object-detection data: Pascal VOC folders, COCO JSON files and TFDS ``voc``/``coco``
-> one raw element, and the tf.data pipeline that resizes, flips and batches it.

Raw element (every loader): ``image`` uint8 [H, W, 3]; ``boxes`` float32 [N, 4] normalised
``(ymin, xmin, ymax, xmax)`` in [0, 1]; ``labels`` int32 [N] (0-based foreground class);
``difficult`` bool [N] (VOC's flag; COCO's ``iscrowd``: kept, excluded from AP);
``image_id`` string.

Folder layouts ``load_voc_folder`` understands (``path``):

* ``Annotations/*.xml`` + ``JPEGImages/`` (Pascal VOC, a user's own export), with or
  without ``ImageSets/Main/<split>.txt``; also one level down (``BCCD/``, ``VOC2007/``);
* ``annotations/*.xml`` + ``images/`` with ``data/<split>_labels.csv`` (the raccoon set);
* without split lists: a seeded ``test_fraction`` split.

Every error names the file: broken XML (with its line), a missing or unreadable image, a
box outside its image, an unknown class. Degenerate boxes (zero width or height, such as
BCCD's 1-pixel annotations) are dropped and counted.

The pipeline (``build_detection_datasets``): decode -> resize so that the shorter side is
``min_size`` and the longer at most ``max_size`` (Faster R-CNN: 600 / 1000) -> cache ->
seeded shuffle per epoch -> pad into a fixed canvas and batch (boxes padded to
``max_boxes`` with label -1) -> horizontal flip per image keyed by (seed, epoch, step), as
the classification pipeline's augmentation is, so a resumed run or a worker sees exactly
the same stream. Boxes in a batch are in pixels of the resized image.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tensorflow as tf

from data.catalog import check_options, get_dataset, source_root
from data.splits import DataError, epoch_shuffle

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
_SHARD = {
    "AUTO": tf.data.experimental.AutoShardPolicy.AUTO,
    "FILE": tf.data.experimental.AutoShardPolicy.FILE,
    "DATA": tf.data.experimental.AutoShardPolicy.DATA,
    "OFF": tf.data.experimental.AutoShardPolicy.OFF,
}


@dataclass
class DetectionRecord:
    """One annotated image of a folder dataset (boxes normalised, in image order)."""

    image_id: str
    path: str
    height: int
    width: int
    boxes: np.ndarray  # [N, 4] float32 ymin, xmin, ymax, xmax in [0, 1]
    labels: np.ndarray  # [N] int32
    difficult: np.ndarray  # [N] bool


@dataclass
class DetectionSplits:
    """The raw train/eval splits of a detection dataset (tf.data of raw elements)."""

    train: tf.data.Dataset
    eval: tf.data.Dataset
    num_train: int
    num_eval: int
    class_names: list[str]
    fingerprint: str
    source: str
    dropped_boxes: int = 0
    max_boxes: int = 100
    max_proposals: int = 0  # R-CNN: proposals per image attached to the raw elements
    image_sizes: list[tuple[int, int]] = field(
        default_factory=list
    )  # (H, W) of every image, if known
    train_records: list[DetectionRecord] = field(default_factory=list)
    eval_records: list[DetectionRecord] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# ----------------------------------------------------------------------- VOC XML


def parse_voc_xml(path: Path) -> dict:
    """filename, (height, width) as written, and objects (name, pixel box, difficult) of
    one VOC annotation; ``DataError`` naming the file (and line) when it is broken."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        line = exc.position[0] if exc.position else "?"
        raise DataError(f"{path}: broken XML at line {line}: {exc}") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror})") from None
    if root.tag != "annotation":
        raise DataError(f"{path}: not a VOC annotation (root element <{root.tag}>)")

    def text(node, tag, required=True):
        child = node.find(tag)
        if child is None or child.text is None or not child.text.strip():
            if required:
                raise DataError(f"{path}: <{tag}> is missing")
            return None
        return child.text.strip()

    def number(node, tag):
        value = text(node, tag)
        try:
            return float(value)
        except ValueError:
            raise DataError(f"{path}: <{tag}> is not a number: {value!r}") from None

    objects = []
    for i, obj in enumerate(root.findall("object")):
        box = obj.find("bndbox")
        if box is None:
            raise DataError(f"{path}: object {i + 1} has no <bndbox>")
        difficult = text(obj, "difficult", required=False)
        objects.append(
            {
                "name": text(obj, "name"),
                "box": [number(box, k) for k in ("xmin", "ymin", "xmax", "ymax")],
                "difficult": difficult not in (None, "0", "false", "False"),
            }
        )
    size = root.find("size")
    hw = None
    if size is not None and size.find("height") is not None and size.find("width") is not None:
        try:
            hw = (int(float(size.find("height").text)), int(float(size.find("width").text)))
        except (TypeError, ValueError):
            hw = None
    return {"filename": text(root, "filename", required=False), "size": hw, "objects": objects}


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) of an image file read from its header; ``DataError`` if missing."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise DataError(f"{path}: the image is missing")
    try:
        with Image.open(path) as img:
            width, height = img.size
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"{path}: not a readable image ({exc})") from None
    return height, width


def _voc_layout(path: Path) -> tuple[Path, Path, Path | None]:
    """(annotations dir, images dir, split-list dir or None) of a VOC-style folder."""
    candidates = [path] + sorted(p for p in path.iterdir() if p.is_dir())
    for root in candidates:
        for ann, img in (("Annotations", "JPEGImages"), ("annotations", "images")):
            if (root / ann).is_dir():
                sets = root / "ImageSets" / "Main"
                return root / ann, root / img, sets if sets.is_dir() else None
    raise DataError(
        f"{path}: no VOC folder here: expected Annotations/ (+ JPEGImages/, optional "
        "ImageSets/Main/<split>.txt) or annotations/ + images/, at the top or one level down"
    )


def _split_ids(path: Path, sets: Path | None, split: str) -> list[str] | None:
    """The image ids of ``split`` from ImageSets/Main/<split>.txt or data/<split>_labels.csv."""
    if sets is not None and (sets / f"{split}.txt").is_file():
        ids = [
            line.split()[0]
            for line in (sets / f"{split}.txt").read_text().splitlines()
            if line.strip()
        ]
        return ids
    for folder in (path, path / "data"):
        csv_path = folder / f"{split}_labels.csv"
        if csv_path.is_file():
            with open(csv_path, newline="") as f:
                names = [row["filename"] for row in csv.DictReader(f) if row.get("filename")]
            return list(dict.fromkeys(Path(n).stem for n in names))
    return None


def load_voc_folder(
    data_dir: str | None = None,
    path: str | None = None,
    train_split: str | None = None,
    eval_split: str | None = None,
    class_names: list[str] | None = None,
    test_fraction: float = 0.2,
    split_seed: int = 20240,
    default_folder: str | None = None,
) -> DetectionSplits:
    """A VOC folder's train and eval splits (see the module docstring for the layouts).

    Args:
        path: str. The folder; None: ``$DEEPTRENDS_DATA_DIR/<default_folder>``.
        train_split: str or None. The split list to train on (None: ``trainval``, else
            ``train``); without split lists, a seeded split.
        eval_split: str or None. The split to evaluate on (None: ``test``, else ``val``).
        class_names: list or None. The classes in label order; None: every name found,
            sorted. With a list, an object of another class is an error.
        test_fraction: float. Without split lists: the share of images evaluated on.
        split_seed: int. Without split lists: the split's seed.
    """
    folder = _resolve_path(path, default_folder)
    ann_dir, img_dir, sets = _voc_layout(folder)
    xmls = sorted(ann_dir.glob("*.xml"))
    if not xmls:
        raise DataError(f"{ann_dir}: no *.xml annotations")
    parsed = {p.stem: (p, parse_voc_xml(p)) for p in xmls}
    stems = list(parsed)
    root = ann_dir.parent

    def pick(split, fallbacks):
        for name in [split] if split else fallbacks:
            ids = _split_ids(root, sets, name)
            if ids is not None:
                return name, ids
        if split:
            raise DataError(
                f"{folder}: no split list {split!r} (ImageSets/Main/{split}.txt or "
                f"data/{split}_labels.csv)"
            )
        return None, None

    train_name, train_ids = pick(train_split, ["trainval", "train"])
    eval_name, eval_ids = pick(eval_split, ["test", "val"])
    if train_ids is None or eval_ids is None:
        order = np.random.default_rng(split_seed).permutation(len(stems))
        n_eval = max(1, int(round(len(stems) * test_fraction)))
        eval_ids = eval_ids or [stems[i] for i in sorted(order[:n_eval])]
        held = set(eval_ids)
        train_ids = train_ids or [s for s in stems if s not in held]
        how = f"seeded split (test_fraction={test_fraction}, seed={split_seed})"
    else:
        how = f"splits {train_name}/{eval_name}"

    names = sorted({o["name"] for _, p in parsed.values() for o in p["objects"]})
    if class_names is not None:
        known = list(class_names)
        for xml_path, p in parsed.values():
            for o in p["objects"]:
                if o["name"] not in known:
                    raise DataError(
                        f"{xml_path}: unknown class {o['name']!r}; data.class_names: {known}"
                    )
        names = known
    index = {n: i for i, n in enumerate(names)}

    dropped = 0

    def record(image_id: str) -> DetectionRecord:
        nonlocal dropped
        if image_id not in parsed:
            raise DataError(
                f"{ann_dir}: the split lists image {image_id!r}, which has no annotation"
            )
        xml_path, p = parsed[image_id]
        image_path = _find_image(img_dir, p["filename"], image_id, xml_path)
        height, width = image_size(image_path)
        boxes, labels, difficult = [], [], []
        for i, o in enumerate(p["objects"]):
            xmin, ymin, xmax, ymax = o["box"]
            if (
                min(xmin, ymin) < 0
                or xmax > width + 1
                or ymax > height + 1
                or xmin > xmax
                or ymin > ymax
            ):
                raise DataError(
                    f"{xml_path}: object {i + 1} ({o['name']}) box xmin={xmin:g} ymin={ymin:g} "
                    f"xmax={xmax:g} ymax={ymax:g} lies outside its {width}x{height} image "
                    f"{image_path.name}"
                )
            # VOC pixels are 1-based (the TFDS voc convention: subtract 1, then normalise)
            y0, x0 = max(ymin - 1, 0) / height, max(xmin - 1, 0) / width
            y1, x1 = min(ymax - 1, height) / height, min(xmax - 1, width) / width
            if y1 - y0 <= 0 or x1 - x0 <= 0:
                dropped += 1
                continue
            boxes.append([y0, x0, y1, x1])
            labels.append(index[o["name"]])
            difficult.append(o["difficult"])
        return DetectionRecord(
            image_id=image_id,
            path=str(image_path),
            height=height,
            width=width,
            boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
            labels=np.asarray(labels, np.int32),
            difficult=np.asarray(difficult, bool),
        )

    train = [record(i) for i in train_ids]
    evals = [record(i) for i in eval_ids]
    return splits_from_records(
        train, evals, names, source=f"VOC folder {folder} ({how})", dropped=dropped
    )


def _find_image(img_dir: Path, filename: str | None, image_id: str, xml_path: Path) -> Path:
    if filename:
        candidate = img_dir / Path(filename).name
        if candidate.is_file():
            return candidate
        if not Path(filename).suffix:
            for suffix in IMAGE_SUFFIXES:
                if (img_dir / f"{filename}{suffix}").is_file():
                    return img_dir / f"{filename}{suffix}"
    for suffix in IMAGE_SUFFIXES:
        if (img_dir / f"{image_id}{suffix}").is_file():
            return img_dir / f"{image_id}{suffix}"
    raise DataError(f"{xml_path}: its image {filename or image_id!r} is missing from {img_dir}")


def _resolve_path(path: str | None, default_folder: str | None) -> Path:
    if path is None:
        root = source_root()
        if default_folder is None or root is None:
            raise DataError(
                "data.path: the dataset folder is not set (and $DEEPTRENDS_DATA_DIR is unset); "
                "pass --set data.path=DIR"
            )
        folder = root / default_folder
    else:
        folder = Path(os.path.expanduser(path))
    if not folder.is_dir():
        raise DataError(f"data.path: {folder} is not a folder")
    return folder


# ----------------------------------------------------------------------- COCO JSON


def parse_coco(annotations: Path, images: Path, class_names: list[str] | None = None):
    """Records of a COCO instances JSON (bbox x, y, w, h in pixels; iscrowd -> difficult)
    and the category names in label order (by category id)."""
    try:
        data = json.loads(Path(annotations).read_text())
    except OSError as exc:
        raise DataError(f"{annotations}: cannot be read ({exc.strerror})") from None
    except ValueError as exc:
        raise DataError(f"{annotations}: not valid JSON: {exc}") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{annotations}: missing the {key!r} list of a COCO instances file")
    categories = sorted(data["categories"], key=lambda c: c["id"])
    names = [c["name"] for c in categories]
    if class_names is not None:
        unknown = [n for n in names if n not in class_names]
        if unknown:
            raise DataError(
                f"{annotations}: unknown class {unknown[0]!r}; data.class_names: {class_names}"
            )
        names = list(class_names)
    label_of = {c["id"]: names.index(c["name"]) for c in categories}
    per_image: dict = {img["id"]: [] for img in data["images"]}
    for ann in data["annotations"]:
        if ann.get("image_id") not in per_image:
            raise DataError(
                f"{annotations}: annotation {ann.get('id')} names unknown image "
                f"{ann.get('image_id')}"
            )
        if ann.get("category_id") not in label_of:
            raise DataError(
                f"{annotations}: annotation {ann.get('id')}: unknown category "
                f"{ann.get('category_id')}"
            )
        per_image[ann["image_id"]].append(ann)
    records, dropped = [], 0
    for img in data["images"]:
        path = Path(images) / img["file_name"]
        height, width = image_size(path)
        boxes, labels, crowd = [], [], []
        for ann in per_image[img["id"]]:
            x, y, w, h = (float(v) for v in ann["bbox"])
            if x < -1 or y < -1 or x + w > width + 1 or y + h > height + 1:
                raise DataError(
                    f"{annotations}: annotation {ann.get('id')} bbox {ann['bbox']} lies outside "
                    f"its {width}x{height} image {img['file_name']}"
                )
            if w <= 0 or h <= 0:
                dropped += 1
                continue
            boxes.append(
                [
                    max(y, 0) / height,
                    max(x, 0) / width,
                    min(y + h, height) / height,
                    min(x + w, width) / width,
                ]
            )
            labels.append(label_of[ann["category_id"]])
            crowd.append(bool(ann.get("iscrowd", 0)))
        records.append(
            DetectionRecord(
                str(img["id"]),
                str(path),
                height,
                width,
                np.asarray(boxes, np.float32).reshape(-1, 4),
                np.asarray(labels, np.int32),
                np.asarray(crowd, bool),
            )
        )
    return records, names, dropped


def load_coco_json(
    data_dir: str | None = None,
    path: str | None = None,
    train_annotations: str = "annotations/instances_train.json",
    eval_annotations: str = "annotations/instances_val.json",
    train_images: str = "train",
    eval_images: str = "val",
    class_names: list[str] | None = None,
) -> DetectionSplits:
    """A COCO-format folder: ``train_annotations``/``eval_annotations`` (relative to
    ``path``) with their image folders."""
    folder = _resolve_path(path, None)
    train, names, d1 = parse_coco(folder / train_annotations, folder / train_images, class_names)
    evals, eval_names, d2 = parse_coco(folder / eval_annotations, folder / eval_images, names)
    return splits_from_records(train, evals, names, source=f"COCO JSON {folder}", dropped=d1 + d2)


# ----------------------------------------------------------------------- TFDS


TFDS_DETECTION = {
    "voc": ("image/filename", "is_difficult"),
    "coco": ("image/id", "is_crowd"),
}


def load_tfds_detection(
    data_dir: str | None = None,
    tfds_name: str = "voc/2007",
    train_split: str = "train+validation",
    eval_split: str = "test",
    max_boxes: int = 100,
) -> DetectionSplits:
    """A prepared TFDS detection set (``voc/2007``, ``voc/2012``, ``coco/2017``): their
    ``objects/bbox`` are already normalised (ymin, xmin, ymax, xmax)."""
    import tensorflow_datasets as tfds

    from data.catalog import default_tfds_dir

    family = tfds_name.split("/")[0]
    if family not in TFDS_DETECTION:
        raise DataError(
            f"data.tfds_name: {tfds_name!r} is not a detection set; accepted: voc/*, coco/*"
        )
    id_key, difficult_key = TFDS_DETECTION[family]
    try:
        builder = tfds.builder(tfds_name, data_dir=data_dir or default_tfds_dir())
        train = builder.as_dataset(split=train_split, shuffle_files=False)
        evals = builder.as_dataset(split=eval_split, shuffle_files=False)
    except Exception as exc:  # noqa: BLE001 - TFDS raises many kinds; all mean "not prepared"
        raise DataError(
            f"TFDS {tfds_name!r} is not prepared under {data_dir or default_tfds_dir()}: {exc}"
        ) from None
    names = list(builder.info.features["objects"]["label"].names)

    def convert(example):
        objects = example["objects"]
        image = example["image"]
        if image.shape.rank == 3 and image.shape[-1] == 1:
            image = tf.image.grayscale_to_rgb(image)
        return {
            "image": image,
            "boxes": tf.reshape(tf.cast(objects["bbox"], tf.float32), [-1, 4]),
            "labels": tf.cast(objects["label"], tf.int32),
            "difficult": tf.cast(objects[difficult_key], tf.bool),
            "image_id": tf.strings.as_string(example[id_key])
            if example[id_key].dtype != tf.string
            else example[id_key],
        }

    n_train, n_eval = (
        _num_examples(builder, train_split, train),
        _num_examples(builder, eval_split, evals),
    )
    return DetectionSplits(
        train=train.map(convert),
        eval=evals.map(convert),
        num_train=n_train,
        num_eval=n_eval,
        class_names=names,
        fingerprint=hashlib.sha256(f"{tfds_name}:{builder.version}".encode()).hexdigest()[:16],
        source=f"TFDS {tfds_name} {builder.version}",
        max_boxes=max_boxes,
    )


def _num_examples(builder, split: str, dataset: tf.data.Dataset) -> int:
    """The split's size from the builder's metadata, else by counting (mocked data)."""
    try:
        return int(builder.info.splits[split].num_examples)
    except (KeyError, ValueError):
        return int(dataset.reduce(0, lambda n, _: n + 1))


# ----------------------------------------------------------------------- records -> tf.data


def records_dataset(records: list[DetectionRecord]) -> tf.data.Dataset:
    """Raw elements of folder records (images decoded from their files)."""
    count = max([len(r.labels) for r in records] + [1])
    n = len(records)
    boxes = np.zeros((n, count, 4), np.float32)
    labels = np.zeros((n, count), np.int32)
    difficult = np.zeros((n, count), bool)
    counts = np.zeros(n, np.int32)
    for i, r in enumerate(records):
        k = len(r.labels)
        boxes[i, :k], labels[i, :k], difficult[i, :k], counts[i] = r.boxes, r.labels, r.difficult, k
    slices = {
        "path": [r.path for r in records],
        "image_id": [r.image_id for r in records],
        "boxes": boxes,
        "labels": labels,
        "difficult": difficult,
        "count": counts,
    }

    def read(item):
        image = tf.io.decode_image(
            tf.io.read_file(item["path"]), channels=3, expand_animations=False
        )
        image.set_shape([None, None, 3])
        k = item["count"]
        return {
            "image": image,
            "boxes": item["boxes"][:k],
            "labels": item["labels"][:k],
            "difficult": item["difficult"][:k],
            "image_id": item["image_id"],
        }

    return tf.data.Dataset.from_tensor_slices(slices).map(read, num_parallel_calls=tf.data.AUTOTUNE)


def splits_from_records(
    train, evals, class_names, source: str, dropped: int = 0
) -> DetectionSplits:
    if not train:
        raise DataError(f"{source}: the training split has no images")
    if not evals:
        raise DataError(f"{source}: the evaluation split has no images")
    h = hashlib.sha256(source.split(" (")[0].encode())
    for r in train + evals:
        h.update(r.image_id.encode())
        h.update(r.boxes.tobytes())
        h.update(r.labels.tobytes())
    return DetectionSplits(
        train=records_dataset(train),
        eval=records_dataset(evals),
        num_train=len(train),
        num_eval=len(evals),
        class_names=list(class_names),
        fingerprint=h.hexdigest()[:16],
        source=source,
        dropped_boxes=dropped,
        max_boxes=max(len(r.labels) for r in train + evals),
        image_sizes=[(r.height, r.width) for r in train + evals],
        train_records=train,
        eval_records=evals,
    )


def load_detection(name: str, data_dir: str | None, options: dict) -> DetectionSplits:
    """The splits of the registered detection dataset ``name`` with its ``options``."""
    import importlib

    entry = get_dataset(name)
    if entry.kind != "detection":
        raise DataError(f"data.name: {name!r} is a {entry.kind} dataset, not a detection one")
    merged = check_options(name, options)
    module, _, fn = entry.load.partition(":")
    return getattr(importlib.import_module(module), fn)(data_dir=data_dir, **merged)


# ----------------------------------------------------------------------- resize, flip, batch


def scaled_size(height, width, min_size: int, max_size: int):
    """The (height, width) an image is resized to: shorter side ``min_size``, longer side
    at most ``max_size`` (tensors or Python numbers)."""
    if isinstance(height, (int, float)) and isinstance(width, (int, float)):
        scale = min(min_size / min(height, width), max_size / max(height, width))
        return max(1, int(round(height * scale))), max(1, int(round(width * scale)))
    h = tf.cast(height, tf.float32)
    w = tf.cast(width, tf.float32)
    scale = tf.minimum(min_size / tf.minimum(h, w), max_size / tf.maximum(h, w))
    return (
        tf.maximum(tf.cast(tf.round(h * scale), tf.int32), 1),
        tf.maximum(tf.cast(tf.round(w * scale), tf.int32), 1),
    )


def resize_image(image, min_size: int, max_size: int):
    """uint8 or float [H, W, 3] -> float32 [h, w, 3] in [0, 1] at ``scaled_size``."""
    shape = tf.shape(image)
    h, w = scaled_size(shape[0], shape[1], min_size, max_size)
    x = tf.cast(image, tf.float32)
    if image.dtype == tf.uint8:
        x = x / 255.0
    return tf.image.resize(x, tf.stack([h, w]), method="bilinear", antialias=True)


def canvas_size(sizes: list[tuple[int, int]], min_size: int, max_size: int, multiple: int = 16):
    """The fixed (H, W) batches are padded to: the largest resized image, rounded up to
    ``multiple``; without sizes, a ``max_size`` square."""
    if sizes:
        scaled = [scaled_size(h, w, min_size, max_size) for h, w in sizes]
        height, width = max(s[0] for s in scaled), max(s[1] for s in scaled)
    else:
        height = width = max_size
    return (
        int(math.ceil(height / multiple) * multiple),
        int(math.ceil(width / multiple) * multiple),
    )


@dataclass(frozen=True)
class DetectionInputSpec:
    """How to feed a detection dataset."""

    batch_size: int
    min_size: int = 600
    max_size: int = 1000
    flip: bool = True
    seed: int = 42
    cache: bool = True
    shuffle_buffer: int = 10_000
    deterministic: bool = True
    drop_remainder: bool = True
    start_epoch: int = 0
    start_step: int = 0
    steps_per_epoch: int | None = None  # a training epoch shorter (or longer) than a data pass
    shard_policy: str = "DATA"
    canvas: tuple[int, int] | None = None  # None: from the images' sizes


def resized_images(dataset: tf.data.Dataset, min_size: int, max_size: int):
    """(image_id, uint8 [h, w, 3] resized exactly as the pipeline resizes) of a raw split,
    in order: what proposals are computed on."""
    prep = _prepare(min_size, max_size, 10**6)
    for element in dataset.map(prep, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True):
        yield element["image_id"].numpy().decode(), element["image"].numpy()


def with_proposals(dataset: tf.data.Dataset, proposals: list[np.ndarray], count: int):
    """``dataset`` (raw elements, in order) with ``proposals`` (normalised [P_i, 4] per
    element, the first ``count`` kept) added to each element."""
    padded = np.zeros((len(proposals), count, 4), np.float32)
    counts = np.zeros(len(proposals), np.int32)
    for i, p in enumerate(proposals):
        k = min(count, len(p))
        padded[i, :k], counts[i] = p[:k], k
    extra = tf.data.Dataset.from_tensor_slices((padded, counts))

    def merge(element, item):
        boxes, k = item
        return {**element, "proposals": boxes[:k]}

    return tf.data.Dataset.zip((dataset, extra)).map(merge)


def _prepare(min_size: int, max_size: int, max_boxes: int):
    def prep(element):
        image = element["image"]
        shape = tf.shape(image)
        resized = resize_image(image, min_size, max_size)
        size = tf.shape(resized)[:2]
        scale = tf.cast(tf.concat([size, size], 0), tf.float32)
        n = tf.minimum(tf.shape(element["labels"])[0], max_boxes)
        extra = {}
        if "proposals" in element:  # R-CNN: region proposals travel with their image
            extra = {
                "proposals": element["proposals"] * scale,
                "num_proposals": tf.shape(element["proposals"])[0],
            }
        return {
            **extra,
            "image": tf.cast(tf.round(resized * 255.0), tf.uint8),  # cached as uint8
            "boxes": element["boxes"][:n] * scale,
            "labels": element["labels"][:n],
            "difficult": element["difficult"][:n],
            "image_size": tf.cast(size, tf.int32),
            "original_size": tf.cast(shape[:2], tf.int32),
            "image_id": element["image_id"],
        }

    return prep


def _padded_shapes(canvas, max_boxes, max_proposals=None):
    extra = {}
    if max_proposals:
        extra = {"proposals": [max_proposals, 4], "num_proposals": []}
    return {
        **extra,
        "image": [canvas[0], canvas[1], 3],
        "boxes": [max_boxes, 4],
        "labels": [max_boxes],
        "difficult": [max_boxes],
        "image_size": [2],
        "original_size": [2],
        "image_id": [],
    }


_PADDING = {
    "image": tf.constant(0, tf.uint8),
    "boxes": tf.constant(0.0, tf.float32),
    "labels": tf.constant(-1, tf.int32),
    "difficult": tf.constant(False),
    "image_size": tf.constant(0, tf.int32),
    "original_size": tf.constant(0, tf.int32),
    "image_id": tf.constant(""),
    "proposals": tf.constant(0.0, tf.float32),
    "num_proposals": tf.constant(0, tf.int32),
}


def _padding(shapes: dict) -> dict:
    return {k: _PADDING[k] for k in shapes}


def flip_batch(images, targets, key):
    """Flip each image of a padded batch left-right within its own width with
    probability 1/2 (stateless, from ``key`` [2]); its boxes move with it."""
    batch = tf.shape(images)[0]
    canvas_w = tf.shape(images)[2]
    flip = tf.random.stateless_uniform(tf.stack([batch]), key) < 0.5
    width = targets["image_size"][:, 1]  # [B]
    cols = tf.range(canvas_w)[None, :]
    source = tf.where(cols < width[:, None], width[:, None] - 1 - cols, cols)
    source = tf.where(flip[:, None], source, tf.broadcast_to(cols, tf.shape(source)))
    images = tf.gather(images, source, axis=2, batch_dims=1)
    w = tf.cast(width, tf.float32)[:, None]
    b = targets["boxes"]
    flipped = tf.stack([b[..., 0], w - b[..., 3], b[..., 2], w - b[..., 1]], axis=-1)
    valid = (targets["labels"] >= 0)[..., None]
    boxes = tf.where(flip[:, None, None] & valid, flipped, b)
    out = {**targets, "boxes": boxes}
    if "proposals" in targets:
        p = targets["proposals"]
        real = (tf.range(tf.shape(p)[1])[None, :] < targets["num_proposals"][:, None])[..., None]
        moved = tf.stack([p[..., 0], w - p[..., 3], p[..., 2], w - p[..., 1]], axis=-1)
        out["proposals"] = tf.where(flip[:, None, None] & real, moved, p)
    return images, out


def _to_model(element):
    images = tf.cast(element["image"], tf.float32) / 255.0
    targets = {k: v for k, v in element.items() if k != "image"}
    return images, targets


@dataclass
class DetectionDatasetInfo:
    class_names: list[str]
    canvas: tuple[int, int]
    max_boxes: int
    num_train: int
    num_eval: int
    steps_per_epoch: int
    fingerprint: str
    source: str
    dropped_boxes: int


def build_detection_datasets(splits: DetectionSplits, spec: DetectionInputSpec):
    """The batched train (repeating from ``spec.start_epoch``/``start_step``) and eval (one
    pass) datasets of ``(images float32 [B, H, W, 3] in [0, 1], targets)``; ``targets``:
    ``boxes`` [B, M, 4] (pixels of the resized image), ``labels`` [B, M] (-1: padding),
    ``difficult``, ``image_size`` [B, 2] (resized), ``original_size`` [B, 2], ``image_id``."""
    if spec.drop_remainder and splits.num_train < spec.batch_size:
        raise DataError(
            f"the training split has {splits.num_train} images, fewer than one batch of "
            f"{spec.batch_size} (data.drop_remainder): lower train.batch_size"
        )
    max_boxes = int(splits.max_boxes)
    canvas = (
        tuple(spec.canvas)
        if spec.canvas
        else canvas_size(splits.image_sizes, spec.min_size, spec.max_size)
    )
    options = tf.data.Options()
    options.deterministic = spec.deterministic
    options.experimental_distribute.auto_shard_policy = _SHARD[spec.shard_policy]
    prep = _prepare(spec.min_size, spec.max_size, max_boxes)
    train_raw = splits.train.map(prep, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if spec.cache:
        train_raw = train_raw.cache()
    buffer = max(1, min(spec.shuffle_buffer, splits.num_train))
    shapes = _padded_shapes(canvas, max_boxes, splits.max_proposals)

    def one_epoch(epoch):
        ds = epoch_shuffle(train_raw, buffer, spec.seed, epoch)
        ds = ds.padded_batch(
            spec.batch_size,
            padded_shapes=shapes,
            padding_values=_padding(shapes),
            drop_remainder=spec.drop_remainder,
        )
        ds = ds.map(
            _to_model, num_parallel_calls=tf.data.AUTOTUNE, deterministic=spec.deterministic
        )
        if not spec.flip:
            return ds

        def aug(step, batch):
            key = tf.stack([tf.cast(spec.seed, tf.int64), epoch * 1_000_000 + step])
            key = tf.random.experimental.stateless_fold_in(key, 7)
            return flip_batch(batch[0], batch[1], key)

        return ds.enumerate().map(
            aug, num_parallel_calls=tf.data.AUTOTUNE, deterministic=spec.deterministic
        )

    steps = (
        splits.num_train // spec.batch_size
        if spec.drop_remainder
        else math.ceil(splits.num_train / spec.batch_size)
    )
    # Where the stream starts: the data pass and batch of the training position (a capped
    # train.steps_per_epoch makes a training epoch shorter than a pass over the data).
    trained = spec.start_epoch * (spec.steps_per_epoch or steps) + spec.start_step
    first_pass, offset = divmod(trained, max(steps, 1))
    train = (
        tf.data.Dataset.range(first_pass, 2**31)
        .flat_map(one_epoch)
        .skip(offset)
        .prefetch(tf.data.AUTOTUNE)
        .with_options(options)
    )
    evals = splits.eval.map(prep, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if spec.cache:
        evals = evals.cache()
    evals = (
        evals.padded_batch(spec.batch_size, padded_shapes=shapes, padding_values=_padding(shapes))
        .map(_to_model, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .prefetch(tf.data.AUTOTUNE)
        .with_options(options)
    )
    info = DetectionDatasetInfo(
        class_names=list(splits.class_names),
        canvas=canvas,
        max_boxes=max_boxes,
        num_train=splits.num_train,
        num_eval=splits.num_eval,
        steps_per_epoch=steps,
        fingerprint=splits.fingerprint,
        source=splits.source,
        dropped_boxes=splits.dropped_boxes,
    )
    return train, evals, info
