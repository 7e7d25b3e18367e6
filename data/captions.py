"""Image captioning data: images with several reference captions each.

Sources (each returns a ``CaptionCorpus``):

- ``load_flickr8k``: a Flickr8k-layout folder. Captions from ``captions.txt`` (CSV with the
  header ``image,caption``, the Kaggle export) or the original ``Flickr8k.token.txt``
  (``image.jpg#N<TAB>caption``), in the folder or its ``Flickr8k_text/``; images in
  ``images/``, ``Images/``, ``Flicker8k_Dataset/`` (the original archive's spelling) or
  the folder itself. The official split lists ``Flickr_8k.{train,dev,test}Images.txt``
  (in ``splits/``, ``Flickr8k_text/`` or the folder) are used when present (images in no
  list are left out and counted); otherwise the images are split at random, seeded.
- ``load_coco_captions``: a COCO captions JSON (``images`` with ``id``/``file_name``,
  optionally ``split``; ``annotations`` with ``image_id``/``caption``) and its image folder.
- ``load_tfds_coco_captions``: the TFDS ``coco_captions`` set (Karpathy splits), prepared
  under ``data.dir`` (there is no network to download it).

Every error names the file and line (a caption for an image that is not there, a
malformed row, an empty caption). Images are decoded once and kept as their centre square
at ``load_size`` (uint8), the way the serving signature prepares a client's JPEG
(``pipelines.serving.signatures.decode_image_bytes`` with ``raw_size``).

``build_caption_datasets`` makes the vocabulary from the training captions only
(``data.text``: the in-graph ``standardize`` that serving uses, minimum count, size cap),
drops training captions longer than ``max_length`` words (counted), and builds the
tf.data streams: training yields one example per caption, ``((image or its cached
annotations, [START] w1 .. wn), w1 .. wn [END])``; validation the same over the
validation captions (teacher-forced loss); evaluation works per image with all its
references (``CaptionCorpus.references``).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tensorflow as tf

from data.catalog import source_root
from data.splits import DataError
from data.text import TARGET_RESERVED, build_vocabulary, encode_targets, tokenize, trim_padding

SPLITS = ("train", "validation", "test")
# file names of the official Flickr8k split lists, by our split names
FLICKR_LISTS = {
    "train": "Flickr_8k.trainImages.txt",
    "validation": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}
_IMAGE_DIRS = ("images", "Images", "Flicker8k_Dataset", "Flickr8k_Dataset", ".")
_TEXT_DIRS = ("splits", "Flickr8k_text", ".")


# ---------------------------------------------------------------- the corpus


@dataclass
class CaptionCorpus:
    """Images with their reference captions and the split of the images.

    Attributes:
        names: the image names (file names; unique), index = image id.
        captions: the raw reference captions of each image.
        splits: split name (``train``/``validation``/``test``) -> image ids.
        images: uint8 [N, load_size, load_size, 3], the centre square of each image.
        encoded: the encoded bytes of each image file (None for TFDS images).
        digests: sha256 of each image's bytes (feature-cache keys).
        fingerprint: a digest of names, captions, image bytes and splits.
    """

    names: list[str]
    captions: list[list[str]]
    splits: dict[str, np.ndarray]
    images: np.ndarray
    encoded: list[bytes] | None
    digests: list[str]
    fingerprint: str
    source: str
    stats: dict = field(default_factory=dict)

    def references(self, split: str) -> list[list[str]]:
        return [self.captions[i] for i in self.splits[split]]

    @property
    def load_size(self) -> int:
        return int(self.images.shape[1])


# ---------------------------------------------------------------- caption files


def read_captions_csv(path: Path) -> list[tuple[str, str, int]]:
    """``image,caption`` rows (with that header) -> (image, caption, line) triples."""
    text = _read_text(path)
    rows = []
    reader = csv.reader(io.StringIO(text))
    for row in reader:
        line = reader.line_num
        if line == 1:
            if [c.strip().lower() for c in row[:2]] != ["image", "caption"] or len(row) != 2:
                raise DataError(
                    f"{path}:1: expected the header 'image,caption', got {','.join(row)[:80]!r}"
                )
            continue
        if not row or not "".join(row).strip():
            continue
        if len(row) != 2:
            raise DataError(
                f"{path}:{line}: malformed row: expected 2 fields image,caption "
                f"(quote captions that contain commas), got {len(row)}: {','.join(row)[:80]!r}"
            )
        rows.append((row[0].strip(), row[1].strip(), line))
    return rows


def read_captions_token(path: Path) -> list[tuple[str, str, int]]:
    """Flickr8k's ``Flickr8k.token.txt`` (``image.jpg#N<TAB>caption``) -> triples."""
    rows = []
    for line, raw in enumerate(_read_text(path).splitlines(), start=1):
        if not raw.strip():
            continue
        key, tab, caption = raw.partition("\t")
        image, hash_, number = key.partition("#")
        if not tab or not hash_ or not number.strip().isdigit():
            raise DataError(
                f"{path}:{line}: malformed row: expected 'image.jpg#N<TAB>caption', "
                f"got {raw[:80]!r}"
            )
        rows.append((image.strip(), caption.strip(), line))
    return rows


def _read_text(path: Path) -> str:
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text ({exc.reason})") from None


def group_captions(
    rows: Sequence[tuple[str, str, int]], path: Path, image_dir: Path | None = None
) -> tuple[list[str], list[list[str]]]:
    """Triples -> (image names in first-seen order, their captions); an empty caption or
    (with ``image_dir``) a caption for an image that is not in the folder is an error
    naming the file and line."""
    by_image: dict[str, list[str]] = {}
    present = None if image_dir is None else {p.name for p in image_dir.iterdir() if p.is_file()}
    for image, caption, line in rows:
        if not image:
            raise DataError(f"{path}:{line}: a caption without an image name")
        if not caption:
            raise DataError(f"{path}:{line}: an empty caption for image {image!r}")
        if present is not None and image not in present:
            raise DataError(
                f"{path}:{line}: a caption for image {image!r}, which is not in {image_dir}"
            )
        by_image.setdefault(image, []).append(caption)
    if not by_image:
        raise DataError(f"{path}: no captions found")
    names = list(by_image)
    return names, [by_image[n] for n in names]


# ---------------------------------------------------------------- images


def square_image(data: bytes, size: int, what: str = "image") -> np.ndarray:
    """Encoded image bytes -> uint8 [size, size, 3]: the centre square, resized (the same
    ops as the serving signature's ``raw_size`` step)."""
    from data.folders import square_resize

    try:
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
    except (tf.errors.InvalidArgumentError, ValueError) as exc:
        raise DataError(
            f"{what}: not a decodable image ({str(exc).splitlines()[0][:120]})"
        ) from None
    return square_resize(image, size).numpy()


def _load_files(image_dir: Path, names: list[str], size: int, cache_dir: str | None = None):
    """(uint8 squares [N, size, size, 3], encoded bytes, sha256 digests) of the files; the
    decoded squares are kept in ``cache_dir`` (keyed by the bytes and size) when given."""
    encoded, digests = [], []
    for name in names:
        path = image_dir / name
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise DataError(f"{path}: cannot read ({exc.strerror})") from None
        encoded.append(data)
        digests.append(hashlib.sha256(data).hexdigest())
    cached = None
    if cache_dir is not None:
        key = hashlib.sha256(f"{size}/".encode() + "".join(digests).encode()).hexdigest()[:20]
        cached = Path(cache_dir) / f"images-{key}.npy"
        if cached.is_file():
            images = np.load(cached)
            if images.shape == (len(names), size, size, 3):
                return images, encoded, digests
    images = np.zeros((len(names), size, size, 3), np.uint8)
    for i, (name, data) in enumerate(zip(names, encoded, strict=True)):
        images[i] = square_image(data, size, str(image_dir / name))
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f".{cached.stem}-{os.getpid()}.npy")
        np.save(tmp, images)
        os.replace(tmp, cached)
    return images, encoded, digests


def _fingerprint(names, captions, digests, splits, salt: str) -> str:
    h = hashlib.sha256(salt.encode())
    for name, caps, digest in zip(names, captions, digests, strict=True):
        h.update(f"{name}\t{digest}\t{'|'.join(caps)}\n".encode())
    for split in SPLITS:
        h.update(f"{split}:{','.join(map(str, splits[split]))}\n".encode())
    return h.hexdigest()[:16]


def seeded_split(
    count: int, validation_fraction: float, test_fraction: float, seed: int
) -> dict[str, np.ndarray]:
    """A seeded random split of ``count`` images (at least one training image)."""
    for name, value in (
        ("validation_fraction", validation_fraction),
        ("test_fraction", test_fraction),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise DataError(f"data.{name} must be a number in [0, 1). Received: {name}={value!r}")
    order = np.random.default_rng(seed).permutation(count)
    n_test = int(round(count * test_fraction))
    n_val = int(round(count * validation_fraction))
    if n_test + n_val >= count:
        raise DataError(
            f"data.validation_fraction + data.test_fraction leave no training image of {count}."
        )
    return {
        "test": np.sort(order[:n_test]),
        "validation": np.sort(order[n_test : n_test + n_val]),
        "train": np.sort(order[n_test + n_val :]),
    }


def _limit(names, captions, max_images: int | None, seed: int):
    if max_images is None or max_images >= len(names):
        return names, captions
    if isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1:
        raise DataError(f"data.max_images must be a positive int. Received: {max_images!r}")
    keep = np.sort(np.random.default_rng(seed).permutation(len(names))[:max_images])
    return [names[i] for i in keep], [captions[i] for i in keep]


# ---------------------------------------------------------------- Flickr8k


def _find(folder: Path, candidates: Sequence[str], subdirs: Sequence[str]) -> Path | None:
    for sub in subdirs:
        for name in candidates:
            path = folder / sub / name
            if path.is_file():
                return path
    return None


def default_flickr_path() -> Path:
    root = source_root()
    if root is None:
        raise DataError(
            "data.path is not set and DEEPTRENDS_DATA_DIR is not set: point data.path at a "
            "Flickr8k-layout folder (captions.txt or Flickr8k.token.txt and the images), or set "
            "DEEPTRENDS_DATA_DIR to the folder holding flickr8k_1k/."
        )
    return root / "flickr8k_1k"


def load_flickr8k(
    data_dir: str | None = None,
    path: str | None = None,
    load_size: int = 256,
    split_seed: int = 20240,
    validation_fraction: float = 0.1,
    test_fraction: float = 0.1,
    max_images: int | None = None,
    cache_dir: str | None = None,
) -> CaptionCorpus:
    """A Flickr8k-layout folder (see the module docstring).

    Args:
        data_dir: unused (the TFDS data_dir of the common loader interface).
        path: str. The folder; default ``$DEEPTRENDS_DATA_DIR/flickr8k_1k``.
        load_size: int. Images are kept as their centre square at this size.
        split_seed: int. The seed of the random split (without split lists) and of
            ``max_images``.
        validation_fraction: float. Images for validation (random split only).
        test_fraction: float. Images for testing (random split only).
        max_images: int or None. Keep a seeded sample of this many images (quick runs).
        cache_dir: str or None. Keep the decoded images there (keyed by their bytes).
    """
    folder = Path(path) if path else default_flickr_path()
    if not folder.is_dir():
        raise DataError(f"data.path: {folder} is not a folder")
    if isinstance(load_size, bool) or not isinstance(load_size, int) or not 32 <= load_size <= 4096:
        raise DataError(f"data.load_size must be an int in [32, 4096]. Received: {load_size!r}")
    captions_file = _find(folder, ("captions.txt", "Flickr8k.token.txt"), ("", "Flickr8k_text"))
    if captions_file is None:
        raise DataError(
            f"data.path: {folder} has no captions.txt (CSV image,caption) nor Flickr8k.token.txt "
            "(in the folder or Flickr8k_text/)"
        )
    image_dir = next(
        (folder / d for d in _IMAGE_DIRS if (folder / d).is_dir() and _has_images(folder / d)),
        None,
    )
    if image_dir is None:
        raise DataError(f"data.path: {folder} has no image folder ({', '.join(_IMAGE_DIRS[:-1])})")
    reader = read_captions_csv if captions_file.name == "captions.txt" else read_captions_token
    names, captions = group_captions(reader(captions_file), captions_file, image_dir.resolve())
    names, captions = _limit(names, captions, max_images, split_seed)
    lists = {s: _find(folder, (f,), _TEXT_DIRS) for s, f in FLICKR_LISTS.items()}
    stats: dict = {"captions_file": str(captions_file), "image_dir": str(image_dir)}
    if all(lists.values()):
        index = {n: i for i, n in enumerate(names)}
        listed: dict[str, list[int]] = {}
        missing = 0
        for split, list_path in lists.items():
            entries = [line.strip() for line in _read_text(list_path).splitlines() if line.strip()]
            missing += sum(e not in index for e in entries)
            listed[split] = sorted(index[e] for e in entries if e in index)
        used = sorted(set().union(*listed.values()))
        if not listed["train"]:
            raise DataError(
                f"{lists['train']}: none of its images have captions in {captions_file}"
            )
        remap = {old: new for new, old in enumerate(used)}
        stats.update(
            split_lists=True,
            images_in_no_list=len(names) - len(used),
            listed_images_missing=missing,
        )
        names, captions = [names[i] for i in used], [captions[i] for i in used]
        splits = {s: np.array([remap[i] for i in listed[s]], np.int64) for s in SPLITS}
    else:
        splits = seeded_split(len(names), validation_fraction, test_fraction, split_seed)
        stats.update(split_lists=False, split_seed=split_seed)
    images, encoded, digests = _load_files(image_dir, names, load_size, cache_dir)
    stats.update({f"num_{s}_images": int(len(splits[s])) for s in SPLITS})
    stats["num_captions"] = int(sum(len(c) for c in captions))
    fp = _fingerprint(names, captions, digests, splits, f"flickr8k/{load_size}")
    return CaptionCorpus(
        names, captions, splits, images, encoded, digests, fp, f"flickr8k:{folder}", stats
    )


def _has_images(folder: Path) -> bool:
    return any(p.suffix.lower() in (".jpg", ".jpeg", ".png") for p in folder.iterdir())


# ---------------------------------------------------------------- COCO


def load_coco_captions(
    data_dir: str | None = None,
    path: str | None = None,
    images_dir: str | None = None,
    load_size: int = 256,
    split_seed: int = 20240,
    validation_fraction: float = 0.1,
    test_fraction: float = 0.1,
    max_images: int | None = None,
    cache_dir: str | None = None,
) -> CaptionCorpus:
    """A COCO captions JSON and its images.

    Args:
        data_dir: unused.
        path: str. The JSON (``captions_train2014.json`` layout). An image entry may have a
            ``split`` (``train``, ``val``/``validation``, ``test``; ``restval`` is train), as
            in the Karpathy split; without it the images are split at random, seeded.
        images_dir: str or None. The image folder; default the JSON's folder's ``images/``
            (or the JSON's folder).
        load_size, split_seed, validation_fraction, test_fraction, max_images, cache_dir:
            as ``load_flickr8k``.
    """
    if not path:
        raise DataError("data.path: the COCO captions JSON file is required")
    json_path = Path(path)
    try:
        doc = json.loads(_read_text(json_path))
    except json.JSONDecodeError as exc:
        raise DataError(f"{json_path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    if (
        not isinstance(doc, dict)
        or not isinstance(doc.get("images"), list)
        or not isinstance(doc.get("annotations"), list)
    ):
        raise DataError(
            f"{json_path}: expected a JSON object with 'images' and 'annotations' lists"
        )
    folder = (
        Path(images_dir)
        if images_dir
        else next(
            (d for d in (json_path.parent / "images", json_path.parent) if d.is_dir()),
            json_path.parent,
        )
    )
    files: dict[int, str] = {}
    split_of: dict[int, str] = {}
    for k, entry in enumerate(doc["images"]):
        if not isinstance(entry, dict) or "id" not in entry or "file_name" not in entry:
            raise DataError(f"{json_path}: images[{k}]: expected 'id' and 'file_name'")
        files[entry["id"]] = str(entry["file_name"])
        if "split" in entry:
            split = {"val": "validation", "restval": "train"}.get(entry["split"], entry["split"])
            if split not in SPLITS:
                raise DataError(
                    f"{json_path}: images[{k}]: split {entry['split']!r}; accepted: train, "
                    "restval, val, validation, test"
                )
            split_of[entry["id"]] = split
    present = {p.name for p in folder.iterdir() if p.is_file()} if folder.is_dir() else set()
    rows = []
    for k, ann in enumerate(doc["annotations"]):
        where = f"{json_path}: annotations[{k}]"
        if not isinstance(ann, dict) or "image_id" not in ann or "caption" not in ann:
            raise DataError(f"{where}: expected 'image_id' and 'caption'")
        if ann["image_id"] not in files:
            raise DataError(f"{where}: image_id {ann['image_id']!r} is not in 'images'")
        name = files[ann["image_id"]]
        if name not in present:
            raise DataError(f"{where}: a caption for image {name!r}, which is not in {folder}")
        caption = str(ann["caption"]).strip()
        if not caption:
            raise DataError(f"{where}: an empty caption for image {name!r}")
        rows.append((name, caption, k))
    if not rows:
        raise DataError(f"{json_path}: no captions found")
    names, captions = group_captions(rows, json_path)
    names, captions = _limit(names, captions, max_images, split_seed)
    ids = {v: k for k, v in files.items()}
    if split_of and all(ids[n] in split_of for n in names):
        splits = {
            s: np.array([i for i, n in enumerate(names) if split_of[ids[n]] == s], np.int64)
            for s in SPLITS
        }
    else:
        splits = seeded_split(len(names), validation_fraction, test_fraction, split_seed)
    images, encoded, digests = _load_files(folder, names, load_size, cache_dir)
    stats = {f"num_{s}_images": int(len(splits[s])) for s in SPLITS}
    stats["num_captions"] = int(sum(len(c) for c in captions))
    fp = _fingerprint(names, captions, digests, splits, f"coco/{load_size}")
    return CaptionCorpus(
        names, captions, splits, images, encoded, digests, fp, f"coco:{json_path}", stats
    )


def load_tfds_coco_captions(
    data_dir: str | None = None,
    tfds_name: str = "coco_captions",
    train_split: str = "train",
    validation_split: str = "val",
    test_split: str = "test",
    load_size: int = 256,
    max_images: int | None = None,
) -> CaptionCorpus:
    """The TFDS ``coco_captions`` set (COCO 2014 with the Karpathy splits), prepared under
    ``data_dir`` (no network to download it here).

    Args:
        data_dir: str. The TFDS data_dir.
        tfds_name: str. The TFDS name.
        train_split, validation_split, test_split: str. TFDS split names (``train+restval``
            for the larger training set).
        load_size: int. Images are kept as their centre square at this size.
        max_images: int or None. Read at most this many images of each split.
    """
    import tensorflow_datasets as tfds

    from data.catalog import default_tfds_dir
    from data.folders import square_resize

    try:
        builder = tfds.builder(tfds_name, data_dir=data_dir or default_tfds_dir())
    except Exception as exc:  # noqa: BLE001 - TFDS raises several types for unknown names
        raise DataError(f"data.tfds_name: {tfds_name!r} is not a TFDS dataset ({exc})") from None

    def read(split: str):
        try:  # (as_dataset, not is_prepared: TFDS' mock data for tests patches the former)
            return builder.as_dataset(split=split, shuffle_files=False)
        except (AssertionError, FileNotFoundError, ValueError) as exc:
            raise DataError(
                f"data.tfds_name: TFDS {tfds_name!r} is not prepared under {builder.data_dir} "
                f"(no network to download it), or has no split {split!r}: "
                f"{str(exc).splitlines()[0][:160]}"
            ) from None

    names: list[str] = []
    captions: list[list[str]] = []
    images: list[np.ndarray] = []
    splits: dict[str, list[int]] = {}
    for split, tfds_split in (
        ("train", train_split),
        ("validation", validation_split),
        ("test", test_split),
    ):
        ds = read(tfds_split)
        if max_images:
            ds = ds.take(max_images)
        splits[split] = []
        for ex in ds:
            texts = [t.decode("utf-8").strip() for t in ex["captions"]["text"].numpy()]
            texts = [t for t in texts if t]
            if not texts:
                continue
            name = ex["image/filename"].numpy().decode("utf-8")
            splits[split].append(len(names))
            names.append(name)
            captions.append(texts)
            images.append(square_resize(ex["image"], load_size).numpy())
    if not names or not splits["train"]:
        raise DataError(f"data.tfds_name: TFDS {tfds_name!r} split {train_split!r} has no captions")
    array = np.stack(images)
    digests = [hashlib.sha256(img.tobytes()).hexdigest() for img in array]
    split_arrays = {s: np.array(v, np.int64) for s, v in splits.items()}
    fp = _fingerprint(names, captions, digests, split_arrays, f"tfds/{tfds_name}/{builder.version}")
    stats = {f"num_{s}_images": len(v) for s, v in splits.items()}
    return CaptionCorpus(
        names, captions, split_arrays, array, None, digests, fp, f"tfds:{tfds_name}", stats
    )


# ---------------------------------------------------------------- tf.data


@dataclass
class CaptionData:
    """The token-id streams of a corpus and what the model and export need."""

    train: tf.data.Dataset  # repeating ((image or annotations, tokens_in), tokens_out) batches
    validation: tf.data.Dataset  # one pass over the validation captions
    vocabulary: list[str]
    max_length: int  # tokens of the longest training caption + 1 ([END])
    num_train_captions: int
    dropped_long: int
    steps_per_epoch: int
    train_rows: tuple[np.ndarray, np.ndarray, np.ndarray]  # image id, tokens in, tokens out


def caption_vocabulary(
    corpus: CaptionCorpus, max_length: int, target_vocab_size: int | None, min_count: int
) -> tuple[list[str], list[list[list[str]]], int]:
    """(vocabulary, the training captions' tokens per training image with those over
    ``max_length`` words removed, how many were removed)."""
    train_tokens, dropped = [], 0
    for caps in corpus.references("train"):
        kept = [t for t in tokenize(caps) if len(t) <= max_length]
        dropped += len(caps) - len(kept)
        train_tokens.append(kept)
    flat = [t for caps in train_tokens for t in caps]
    if not flat:
        raise DataError(f"data.max_length: no training caption has at most {max_length} words.")
    return (
        build_vocabulary(flat, TARGET_RESERVED, target_vocab_size, min_count),
        train_tokens,
        dropped,
    )


def _rows(image_ids: Sequence[int], token_lists: Sequence[Sequence[list[str]]], vocab, length):
    ids = [i for i, caps in zip(image_ids, token_lists, strict=True) for _ in caps]
    flat = [t for caps in token_lists for t in caps]
    if not flat:
        return (
            np.zeros(0, np.int64),
            np.zeros((0, length), np.int32),
            np.zeros((0, length), np.int32),
        )
    tin, tout = encode_targets(flat, vocab, length)
    return np.array(ids, np.int64), tin, tout


def build_caption_datasets(
    corpus: CaptionCorpus,
    batch_size: int,
    *,
    max_length: int,
    target_vocab_size: int | None,
    min_count: int,
    image_size: int = 224,
    features: np.ndarray | None = None,
    flip: bool = False,
    seed: int = 42,
    start_step: int = 0,
    length_buckets: int = 16,
) -> CaptionData:
    """Vocabulary, id tensors and batched streams of a corpus.

    Args:
        corpus: CaptionCorpus. The images and captions.
        batch_size: int. The global batch size (captions).
        max_length: int. Training captions with more words are dropped (and counted).
        target_vocab_size: int or None. Cap of the vocabulary, reserved tokens included.
        min_count: int. Rarer training words become ``[UNK]``.
        image_size: int. The square the model sees: training takes a random
            ``image_size`` crop of the stored ``load_size`` square (and a random flip with
            ``flip``), validation the centre crop.
        features: array or None. Cached annotations [V, N, L, D] of every image of the
            corpus (view 0: the centre crop; view 1, if present: its mirror image). When
            given, the streams carry annotations instead of images; training picks a view
            at random per caption.
        flip: bool. Random horizontal flips of the training images (image streams).
        seed: int. Seeds the shuffle (the stream repeats before it is shuffled and batched,
            so no batch is partial) and the per-step crops, flips and views.
        start_step: int. The first batch of the training stream (a resumed run's position):
            the stream is the same as a fresh one's from that batch on.
        length_buckets: int. Batches are drawn from windows of this many batches sorted
            by caption length (1: no sorting), so the decoder runs fewer padding steps.
    """
    if image_size > corpus.load_size:
        raise DataError(
            f"data.image_size={image_size} is larger than data.load_size={corpus.load_size}"
        )
    vocab, train_tokens, dropped = caption_vocabulary(
        corpus, max_length, target_vocab_size, min_count
    )
    length = max(len(t) for caps in train_tokens for t in caps) + 1
    train_ids, tin, tout = _rows(corpus.splits["train"], train_tokens, vocab, length)
    val_split = corpus.splits["validation"]
    val_tokens = [tokenize(corpus.captions[i]) for i in val_split]
    val_tokens = [[t[: length - 1] for t in caps] for caps in val_tokens]
    val_ids, vin, vout = _rows(val_split, val_tokens, vocab, length)

    crop_fraction = image_size / corpus.load_size
    if features is not None:
        table = tf.constant(features)  # [V, N, L, D]
        views = int(features.shape[0])
    else:
        table = tf.constant(corpus.images)  # [N, S, S, 3]
        views = 1

    def train_inputs(step, ids):
        key = tf.stack([tf.cast(seed, tf.int64), step])
        if features is not None:
            view = tf.random.stateless_uniform(tf.shape(ids), key, 0, views, tf.int64)
            return tf.cast(tf.gather_nd(table, tf.stack([view, ids], axis=1)), tf.float32)
        return _train_images(tf.gather(table, ids), image_size, flip, key)

    def eval_inputs(ids):
        if features is not None:
            return tf.cast(tf.gather(table[0], ids), tf.float32)
        return centre_crop(tf.gather(table, ids), image_size, crop_fraction)

    def train_batch(step, batch):
        ids, t_in, t_out = batch
        t_out, t_in = trim_padding(t_out, t_in)
        return (train_inputs(step, ids), t_in), t_out

    def eval_batch(ids, t_in, t_out):
        t_out, t_in = trim_padding(t_out, t_in)
        return (eval_inputs(ids), t_in), t_out

    n = len(train_ids)
    stream = (
        tf.data.Dataset.from_tensor_slices((train_ids, tin, tout))
        .repeat()
        .shuffle(min(n, 50_000), seed=seed, reshuffle_each_iteration=True)
    )
    if length_buckets > 1:
        # Captions of similar length share a batch (the decoder runs to the longest one):
        # windows of ``length_buckets`` batches are sorted by length, cut into batches,
        # and those batches shuffled again. Only ids move here, so skipping is cheap.
        def by_length(ids, t_in, t_out):
            order = tf.argsort(tf.reduce_sum(tf.cast(t_out > 0, tf.int32), axis=1), stable=True)
            return tf.gather(ids, order), tf.gather(t_in, order), tf.gather(t_out, order)

        stream = (
            stream.batch(batch_size * length_buckets)
            .map(by_length)
            .unbatch()
            .batch(batch_size)
            .shuffle(length_buckets, seed=seed + 1, reshuffle_each_iteration=True)
        )
    else:
        stream = stream.batch(batch_size)
    train = (
        stream.skip(start_step)
        .enumerate(start=start_step)
        .map(train_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .prefetch(tf.data.AUTOTUNE)
    )
    validation = (
        tf.data.Dataset.from_tensor_slices((val_ids, vin, vout))
        .batch(batch_size)
        .map(eval_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .prefetch(tf.data.AUTOTUNE)
    )
    return CaptionData(
        train=train,
        validation=validation,
        vocabulary=vocab,
        max_length=length,
        num_train_captions=n,
        dropped_long=dropped,
        steps_per_epoch=max(1, -(-n // batch_size)),
        train_rows=(train_ids, tin, tout),
    )


def centre_crop(images: tf.Tensor, size: int, crop_fraction: float | None = None) -> tf.Tensor:
    """uint8 squares [B, S, S, 3] -> float32 [B, size, size, 3] in [0, 1]: the centre crop,
    as ``data.images.preprocess_images`` (and so the serving signature) computes it."""
    from data.images import preprocess_images

    fraction = crop_fraction if crop_fraction is not None else size / int(images.shape[1])
    return preprocess_images(images, size, 3, fraction)


def _train_images(images: tf.Tensor, size: int, flip: bool, key: tf.Tensor) -> tf.Tensor:
    """uint8 squares [B, S, S, 3] -> float32 random crops [B, size, size, 3] in [0, 1]
    (and random flips), from the stateless ``key``: the same step gives the same batch."""
    from data.images import random_crop_images

    x = tf.cast(images, tf.float32) / 255.0
    if int(images.shape[1]) != size:
        x = random_crop_images(x, (size, size), key)
    if flip:
        coin = tf.random.stateless_uniform([tf.shape(x)[0]], key + 1) < 0.5
        x = tf.where(coin[:, None, None, None], tf.reverse(x, axis=[2]), x)
    return x
