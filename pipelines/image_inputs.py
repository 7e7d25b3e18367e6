"""The image inputs shared by the image tasks (classification, DBN classification, and
detection and captioning to come): the resolved preprocessing of a run, the
``data.images.ImageInputSpec`` of a config, and the typed ``ImageInfo`` saved with a run.

Preprocessing: each model declares ``preprocessing`` (crop_fraction, flip, pca_jitter)
in its registry entry; with ``data.preprocessing: model`` (the default) it fills whatever
the config leaves unset. The resolved values feed the training pipeline and the
``image_bytes`` signature alike and are saved in ``dataset_info.json``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipelines.config import ExperimentConfig
from pipelines.tasks.base import DatasetInfo


@dataclass
class ImageInfo(DatasetInfo):
    """What an image model and its serving signatures need to know about the data."""

    num_classes: int = 0
    class_names: list[str] = field(default_factory=list)
    image_shape: list[int] = field(default_factory=list)  # [H, W, C] the model sees
    raw_shape: list[int] = field(default_factory=list)  # [H, W, C] of the stored images
    shard_policy: str = "DATA"
    preprocessing: dict[str, Any] = field(default_factory=dict)

    @property
    def crop_fraction(self) -> float:
        return float(self.preprocessing.get("crop_fraction", 1.0))


def image_info(info, preprocessing: dict[str, Any]) -> ImageInfo:
    """The ``ImageInfo`` of a ``data.images.ImageDatasetInfo`` and the resolved preprocessing."""
    return ImageInfo(
        dataset=info.name,
        num_train=info.num_train,
        num_eval=info.num_eval,
        source=info.source,
        num_classes=info.num_classes,
        class_names=list(info.class_names),
        image_shape=list(info.image_shape),
        raw_shape=list(info.raw_shape),
        shard_policy=info.shard_policy,
        preprocessing=preprocessing,
    )


def resolve_preprocessing(config: ExperimentConfig) -> dict[str, Any]:
    """crop_fraction, flip and pca_jitter of a run: the config's where set, else (with
    ``data.preprocessing: model``) the model's registry entry, else none."""
    import models

    declared = models.model_info(config.model.name).preprocessing or {}
    family = dict(declared) if config.data.preprocessing == "model" else {}
    data, aug = config.data, config.data.augment
    crop = (
        data.crop_fraction if data.crop_fraction is not None else family.get("crop_fraction", 1.0)
    )
    flip = aug.flip if aug.flip is not None else family.get("flip", False)
    jitter = aug.pca_jitter if aug.pca_jitter is not None else family.get("pca_jitter", 0.0)
    return {"crop_fraction": float(crop), "flip": bool(flip), "pca_jitter": float(jitter)}


def image_input_spec(
    config: ExperimentConfig,
    preprocessing: dict[str, Any] | None = None,
    start: tuple[int, int] = (0, 0),
    batch_size: int | None = None,
):
    """The ``ImageInputSpec`` of a config: its data section, the resolved preprocessing,
    and where the train stream starts (a resumed run's epoch and step)."""
    from data.images import Augment, ImageInputSpec

    data = config.data
    pre = preprocessing if preprocessing is not None else {}
    augment = {
        **data.augment.model_dump(),
        "flip": pre.get("flip"),
        "pca_jitter": pre.get("pca_jitter"),
    }
    augment = {k: v for k, v in augment.items() if v is not None}
    return ImageInputSpec(
        name=data.name,
        batch_size=batch_size or config.train.batch_size,
        seed=config.runtime.seed,
        data_dir=data.dir,
        image_size=data.image_size,
        channels=data.channels,
        cache=data.cache,
        shuffle_buffer=data.shuffle_buffer,
        deterministic=data.deterministic,
        augment=Augment(**augment),
        options=data.options(),
        drop_remainder=True if data.drop_remainder is None else data.drop_remainder,
        start_epoch=start[0],
        start_step=start[1],
        crop_fraction=float(pre.get("crop_fraction", 1.0)),
    )
