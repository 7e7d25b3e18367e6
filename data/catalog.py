"""The dataset registry: what each dataset is, its options and its auto-shard policy.

Entries are plain metadata (no TensorFlow import), so ``deeptrends datasets`` and config
validation stay instant; ``load`` is a ``"module:function"`` reference imported only
when the data is read. Add a dataset with ``register_dataset(DatasetEntry(...))``.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SHARD_POLICIES = ("AUTO", "FILE", "DATA", "OFF")


@dataclass(frozen=True)
class DatasetEntry:
    """One registered dataset.

    Attributes:
        name: str. The name configs use as ``data.name``.
        kind: str. What it feeds: ``image_classification``, ``translation``, ...
        load: str. ``"module:function"`` that builds the splits (imported lazily).
        description: str. One line for ``deeptrends datasets``.
        options: dict. Dataset-specific ``data.*`` keys and their defaults.
        shard_policy: str. tf.data auto-shard policy under multi-worker training:
            ``DATA`` (every worker reads everything and keeps its share of elements,
            right for small in-memory sets), ``FILE`` (workers split the files),
            ``AUTO`` or ``OFF``.
        source: str. Where the bytes come from.
    """

    name: str
    kind: str
    load: str
    description: str
    options: dict[str, Any] = field(default_factory=dict)
    shard_policy: str = "DATA"
    source: str = ""

    def __post_init__(self) -> None:
        if self.shard_policy not in SHARD_POLICIES:
            raise ValueError(
                f"DatasetEntry {self.name!r}: shard_policy must be one of {SHARD_POLICIES}. "
                f"Received: shard_policy={self.shard_policy!r}"
            )


_DATASETS: dict[str, DatasetEntry] = {}


def register_dataset(entry: DatasetEntry) -> DatasetEntry:
    if entry.name in _DATASETS:
        raise ValueError(f"Dataset name {entry.name!r} is already registered.")
    _DATASETS[entry.name] = entry
    return entry


def list_datasets() -> list[str]:
    return sorted(_DATASETS)


def get_dataset(name: str) -> DatasetEntry:
    if name in _DATASETS:
        return _DATASETS[name]
    close = difflib.get_close_matches(name, list_datasets(), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise KeyError(
        f"Unknown dataset {name!r}.{hint} Registered datasets: {', '.join(list_datasets())}."
    )


def check_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """Merge ``options`` over the dataset's defaults; unknown keys are an error."""
    entry = get_dataset(name)
    unknown = sorted(set(options) - set(entry.options))
    if unknown:
        accepted = ", ".join(sorted(entry.options)) or "none"
        raise ValueError(
            f"data.{unknown[0]}: dataset {name!r} has no option {unknown[0]!r}. "
            f"Its options: {accepted}."
        )
    return {**entry.options, **options}


def source_root() -> Path | None:
    """``$DEEPTRENDS_DATA_DIR``: the folder of real raw datasets (``mnist_test/``, ...)."""
    root = os.environ.get("DEEPTRENDS_DATA_DIR")
    return Path(root) if root else None


def default_tfds_dir() -> str:
    """Where TFDS builders write prepared data: ``$DEEPTRENDS_TFDS_DIR`` or TFDS' default."""
    return os.environ.get("DEEPTRENDS_TFDS_DIR") or str(Path.home() / "tensorflow_datasets")


register_dataset(
    DatasetEntry(
        name="digits",
        kind="image_classification",
        load="data.arrays:load_digits",
        description="scikit-learn's bundled 8x8 digits (1,797), seeded stratified 80/20 split; embedded default",
        source="sklearn.datasets.load_digits (ships with scikit-learn)",
    )
)
register_dataset(
    DatasetEntry(
        name="mnist",
        kind="image_classification",
        load="data.arrays:load_mnist",
        description="MNIST: TFDS 'mnist' where prepared, else the official test set from "
        "$DEEPTRENDS_DATA_DIR/mnist_test split 8,000/2,000 (seeded, stratified)",
        options={"source": "auto", "train_size": None},
        source="TFDS mnist, or idx files in $DEEPTRENDS_DATA_DIR/mnist_test",
    )
)
register_dataset(
    DatasetEntry(
        name="image_folder",
        kind="image_classification",
        load="data.folders:load_image_folder",
        description="a folder of images, a class per sub-folder (JPEG/PNG, any size; train/ and test/ "
        "sub-folders or a seeded stratified split), resized to load_size and held in memory",
        options={
            "path": None,
            "load_size": 64,
            "grayscale": False,
            "test_fraction": 0.2,
            "split_seed": 20240,
        },
        source="any folder of images",
    )
)
register_dataset(
    DatasetEntry(
        name="tfds",
        kind="image_classification",
        load="data.folders:load_tfds_images",
        description="any prepared TFDS image-classification dataset (data.tfds_name: mnist, cifar10, ...)",
        options={
            "tfds_name": None,
            "train_split": "train",
            "eval_split": "test",
            "image_key": "image",
            "label_key": "label",
            "load_size": None,
        },
        source="TFDS (must be prepared under data.dir; no network)",
    )
)
# tokenisation options of every translation dataset (read by the translation task)
_TEXT_OPTIONS = {
    "tokenizer": "word",  # word | wordpiece | bpe (data/text.py)
    "max_length": 40,
    "source_vocab_size": 20000,
    "target_vocab_size": 20000,
    "min_count": 1,
}

register_dataset(
    DatasetEntry(
        name="long_dependency",
        kind="sequence",
        load="data.sequences:load_generated",
        description="generated long-term-dependency problems: the adding problem (regression) or "
        "first-symbol recall (classification) at a chosen sequence length",
        options={
            "problem": "adding",
            "length": 50,
            "num_train": 10_000,
            "num_eval": 1_000,
            "symbols": 8,
            "seed": 1234,
        },
        source="generated (Hochreiter & Schmidhuber 1997, experiment 4)",
    )
)
register_dataset(
    DatasetEntry(
        name="text_lm",
        kind="language_model",
        load="data.sequences:load_text_lm",
        description="word-level language modelling on a text/TSV column (default: the English side "
        "of $DEEPTRENDS_DATA_DIR/deu_eng/deu.txt), seeded 90/10 split by sentence",
        options={
            "path": None,
            "column": 0,
            "max_vocab": 10_000,
            "min_count": 1,
            "eval_fraction": 0.1,
            "max_lines": None,
            "seed": 1234,
            "seq_len": 35,
        },
        source="any UTF-8 text file",
    )
)
register_dataset(
    DatasetEntry(
        name="tsv_translation",
        kind="translation",
        load="data.translation:load_tsv_translation",
        description="a tab-separated parallel corpus (default $DEEPTRENDS_DATA_DIR/deu_eng/deu.txt, "
        "German->English), split train/validation/test grouped by source sentence",
        options={
            "path": None,
            "direction": "reverse",
            "skip_bad_lines": False,
            "ignore_extra_columns": False,
            "test_size": 2000,
            "validation_size": 1000,
            "split_seed": 2024,
            "max_pairs": None,
            **_TEXT_OPTIONS,
        },
        source="any source<TAB>target file (manythings.org/Tatoeba exports)",
    )
)
register_dataset(
    DatasetEntry(
        name="tfds_translation",
        kind="translation",
        load="data.translation:load_tfds_translation",
        description="a prepared TFDS translation set (ted_hrlr_translate/*, wmt*_translate/*)",
        options={
            "tfds_name": "ted_hrlr_translate/pt_to_en",
            "source_language": None,
            "target_language": None,
            "test_split": "test",
            "validation_split": "validation",
            "max_pairs": None,
            **_TEXT_OPTIONS,
        },
        source="TFDS (must be prepared under data.dir; no network)",
        shard_policy="DATA",
    )
)

# ------------------------------------------------------------------ object detection (issue 14)
# Folder options of every VOC-style dataset (data/detection.py:load_voc_folder).
_VOC_OPTIONS = {
    "path": None,
    "train_split": None,
    "eval_split": None,
    "class_names": None,
    "test_fraction": 0.2,
    "split_seed": 20240,
}

register_dataset(
    DatasetEntry(
        name="voc_folder",
        kind="detection",
        load="data.detection:load_voc_folder",
        description="a Pascal VOC folder (Annotations/*.xml + JPEGImages/, optional ImageSets/Main "
        "split lists; or annotations/ + images/ with data/<split>_labels.csv); data.path=DIR",
        options=dict(_VOC_OPTIONS),
        source="any VOC-format folder",
    )
)
register_dataset(
    DatasetEntry(
        name="bccd",
        kind="detection",
        load="data.detection:load_voc_folder",
        description="BCCD blood-cell detection (364 images 640x480; RBC, WBC, Platelets), VOC XML; "
        "trainval 292 / test 72 ($DEEPTRENDS_DATA_DIR/bccd_voc, or data.path)",
        options={**_VOC_OPTIONS, "default_folder": "bccd_voc"},
        source="Shenggan/BCCD_Dataset (MIT), $DEEPTRENDS_DATA_DIR/bccd_voc",
    )
)
register_dataset(
    DatasetEntry(
        name="raccoon",
        kind="detection",
        load="data.detection:load_voc_folder",
        description="raccoon detection (200 photos, 1 class), VOC XML; train 160 / test 40 from "
        "data/*_labels.csv ($DEEPTRENDS_DATA_DIR/raccoon_voc, or data.path)",
        options={**_VOC_OPTIONS, "default_folder": "raccoon_voc"},
        source="datitran/raccoon_dataset (research and tests only), $DEEPTRENDS_DATA_DIR/raccoon_voc",
    )
)
register_dataset(
    DatasetEntry(
        name="coco_json",
        kind="detection",
        load="data.detection:load_coco_json",
        description="a COCO-format folder: instances JSON files (bbox x, y, w, h) and image folders",
        options={
            "path": None,
            "train_annotations": "annotations/instances_train.json",
            "eval_annotations": "annotations/instances_val.json",
            "train_images": "train",
            "eval_images": "val",
            "class_names": None,
        },
        source="any COCO-format folder",
    )
)
register_dataset(
    DatasetEntry(
        name="tfds_detection",
        kind="detection",
        load="data.detection:load_tfds_detection",
        description="a prepared TFDS detection set: voc/2007, voc/2012, coco/2017 (data.tfds_name)",
        options={
            "tfds_name": "voc/2007",
            "train_split": "train+validation",
            "eval_split": "test",
            "max_boxes": 100,
        },
        source="TFDS (must be prepared under data.dir; no network)",
    )
)

# ------------------------------------------------------------------ image captioning (issue 15)
# The caption text options are translation's target-side ones (declared once, above).
_CAPTION_TEXT_OPTIONS = {
    k: _TEXT_OPTIONS[k] for k in ("max_length", "target_vocab_size", "min_count")
}
_CAPTION_IMAGE_OPTIONS = {
    "load_size": 256,
    "split_seed": 20240,
    "validation_fraction": 0.1,
    "test_fraction": 0.1,
    "max_images": None,
}

register_dataset(
    DatasetEntry(
        name="flickr8k",
        kind="captioning",
        load="data.captions:load_flickr8k",
        description="a Flickr8k-layout folder (captions.txt or Flickr8k.token.txt, images/, official "
        "split lists if present; default $DEEPTRENDS_DATA_DIR/flickr8k_1k: 753/113/125 images)",
        options={"path": None, **_CAPTION_IMAGE_OPTIONS, **_CAPTION_TEXT_OPTIONS},
        source="Flickr8k (Hodosh et al. 2013; research use) or any folder in its layout",
    )
)
register_dataset(
    DatasetEntry(
        name="coco_captions_json",
        kind="captioning",
        load="data.captions:load_coco_captions",
        description="a COCO captions JSON (data.path) and its image folder (data.images_dir); "
        "per-image 'split' keys (Karpathy) or a seeded split",
        options={
            "path": None,
            "images_dir": None,
            **_CAPTION_IMAGE_OPTIONS,
            **_CAPTION_TEXT_OPTIONS,
        },
        source="any COCO-format captions file",
    )
)
register_dataset(
    DatasetEntry(
        name="coco_captions",
        kind="captioning",
        load="data.captions:load_tfds_coco_captions",
        description="TFDS coco_captions (COCO 2014, Karpathy splits), prepared under data.dir",
        options={
            "tfds_name": "coco_captions",
            "train_split": "train",
            "validation_split": "val",
            "test_split": "test",
            "load_size": 256,
            "max_images": None,
            **_CAPTION_TEXT_OPTIONS,
        },
        source="TFDS (must be prepared under data.dir; no network)",
    )
)
