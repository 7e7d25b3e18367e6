"""Image classification: top-1/top-5 accuracy, learning curves, confusion matrix, and the
``serving_default`` (preprocessed ``images``) and ``image_bytes`` (encoded PNG/JPEG)
serving signatures.

Preprocessing: each model family declares ``PREPROCESSING`` (crop_fraction, flip,
pca_jitter) beside its builder; with ``data.preprocessing: model`` (the default) it fills
whatever the config leaves unset. The resolved values feed the training pipeline and the
``image_bytes`` signature alike and are saved in ``dataset_info.json``.

``task_options`` (all optional): ``gradient_norm_every`` (log per-layer gradient norms
every N steps), ``target_accuracy`` (log ``epochs_to_target``), ``evaluate_train`` (also
evaluate the un-augmented training split: ``train_accuracy``, ``train_eval_gap``),
``max_train_minutes`` (stop training after this wall time).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import keras
from pydantic import BaseModel, ConfigDict, Field
import numpy as np
import tensorflow as tf

import models
from data.images import Augment, ImageInputSpec, build_image_datasets, build_train_as_eval, preprocess_images
from pipelines.optim import build_optimizer
from pipelines.callbacks import TimeLimit
from pipelines.tasks.base import Endpoint, Inputs, Task, parse_options, register_task


def _main_output(outputs):
    """A model with auxiliary heads returns a list; the first output is the prediction."""
    return outputs[0] if isinstance(outputs, (list, tuple)) else outputs


class ClassificationOptions(BaseModel):
    """``task_options`` of the classification task."""

    model_config = ConfigDict(extra="forbid")
    gradient_norm_every: int | None = Field(
        None, ge=1, description="log grad_norm/<layer> on a fixed training batch every N steps"
    )
    target_accuracy: float | None = Field(
        None, gt=0.0, le=1.0, description="log epochs_to_target: the first epoch whose val_accuracy reaches it"
    )
    evaluate_train: bool = Field(False, description="also evaluate the un-augmented training split")
    max_train_minutes: float | None = Field(None, gt=0.0, description="stop training after this wall time")


def family_preprocessing(model_name: str) -> dict[str, Any]:
    """The ``PREPROCESSING`` dict declared in the model's file ({} if none)."""
    import importlib

    builder = models.get_model_builder(model_name)
    return dict(getattr(importlib.import_module(builder.__module__), "PREPROCESSING", {}))


def resolve_preprocessing(config) -> dict[str, Any]:
    """crop_fraction, flip and pca_jitter of a run: the config's where set, else (with
    ``data.preprocessing: model``) the family's, else none."""
    family = family_preprocessing(config.model.name) if config.data.preprocessing == "model" else {}
    data, aug = config.data, config.data.augment
    return {
        "crop_fraction": float(data.crop_fraction if data.crop_fraction is not None else family.get("crop_fraction", 1.0)),
        "flip": bool(aug.flip if aug.flip is not None else family.get("flip", False)),
        "pca_jitter": float(aug.pca_jitter if aug.pca_jitter is not None else family.get("pca_jitter", 0.0)),
    }


@register_task("classification")
class ClassificationTask(Task):
    """Supervised image classification with a softmax classifier."""

    supports_start_position = True
    metric_names = ("loss", "accuracy", "top5_accuracy", "top1_error", "top5_error", "train_accuracy",
                    "train_eval_gap")
    aux_loss_weight = 0.3  # GoogLeNet's auxiliary classifiers (Szegedy et al. 2014)

    def __init__(self, config):
        super().__init__(config)
        self.options = parse_options(ClassificationOptions, config.task_options, "classification")
        self.preprocessing = resolve_preprocessing(config)
        self._grad_norms = None

    def input_spec(self) -> ImageInputSpec:
        cfg = self.config
        pre = self.preprocessing
        augment = {**cfg.data.augment.model_dump(), "flip": pre["flip"], "pca_jitter": pre["pca_jitter"]}
        return ImageInputSpec(
            name=cfg.data.name,
            batch_size=cfg.train.batch_size,
            seed=cfg.runtime.seed,
            data_dir=cfg.data.dir,
            image_size=cfg.data.image_size,
            channels=cfg.data.channels,
            cache=cfg.data.cache,
            shuffle_buffer=cfg.data.shuffle_buffer,
            deterministic=cfg.data.deterministic,
            augment=Augment(**augment),
            options=cfg.data.options(),
            drop_remainder=cfg.data.drop_remainder if cfg.data.drop_remainder is not None else self.num_replicas > 1,
            start_epoch=self.start_epoch,
            start_step=self.start_step,
            crop_fraction=pre["crop_fraction"],
        )

    def build_inputs(self) -> Inputs:
        train, evals, info = build_image_datasets(self.input_spec())
        steps = self.config.train.steps_per_epoch or info.steps_per_epoch
        return Inputs(
            train=train,
            eval=evals,
            steps_per_epoch=steps,
            info={
                "dataset": info.name,
                "num_classes": info.num_classes,
                "class_names": info.class_names,
                "image_shape": list(info.image_shape),
                "raw_shape": list(info.raw_shape),
                "num_train": info.num_train,
                "num_eval": info.num_eval,
                "source": info.source,
                "shard_policy": info.shard_policy,
                "preprocessing": self.preprocessing,
            },
            fingerprint=info.fingerprint,
        )

    def build_model(self, info: dict[str, Any]):
        kwargs = {"input_shape": tuple(info["image_shape"]), "num_classes": info["num_classes"]}
        kwargs.update(self.config.model.kwargs())
        return models.create_model(self.config.model.name, **kwargs)

    def compile_model(self, model, inputs: Inputs) -> None:
        num_classes = inputs.info["num_classes"]
        outputs = model.outputs
        smoothing = self.config.train.label_smoothing

        def loss_fn():
            if smoothing:
                return _SmoothedSparseCE(num_classes, smoothing)
            return keras.losses.SparseCategoricalCrossentropy()

        def metric_fns():
            k = min(5, num_classes)
            return [
                keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
                keras.metrics.SparseTopKCategoricalAccuracy(k=k, name="top5_accuracy"),
            ]

        if len(outputs) > 1:
            loss = [loss_fn() for _ in outputs]
            weights = [1.0] + [self.aux_loss_weight] * (len(outputs) - 1)
            metrics = [metric_fns()] + [[] for _ in outputs[1:]]
        else:
            loss, weights, metrics = loss_fn(), None, metric_fns()
        model.compile(
            optimizer=build_optimizer(self.config.train, inputs.steps_per_epoch),
            loss=loss,
            loss_weights=weights,
            metrics=metrics,
            jit_compile=self.config.runtime.jit_compile,
        )
        if len(outputs) > 1:  # feed the same labels to every head
            self._num_heads = len(outputs)

    def prepare_dataset(self, ds):
        heads = getattr(self, "_num_heads", 1)
        if heads > 1:
            return ds.map(lambda x, y: (x, tuple([y] * heads)))
        return ds

    def callbacks(self, run_dir: Path, inputs: Inputs) -> list:
        from pipelines import callbacks
        from pipelines.runtime import is_chief

        out = []
        if self.options.gradient_norm_every and is_chief():  # a measurement, logged by the chief only
            batch = next(iter(self.prepare_dataset(inputs.train).take(1)))
            self._grad_norms = callbacks.GradientNorms(batch, self.options.gradient_norm_every, chief=is_chief())
            out.append(self._grad_norms)
        if self.options.target_accuracy:
            out.append(callbacks.EpochsToTarget(self.options.target_accuracy, chief=is_chief()))
        if self.options.max_train_minutes:
            out.append(TimeLimit(self.options.max_train_minutes * 60.0))
        return out

    # -- evaluation -------------------------------------------------------------
    def predict(self, model, dataset) -> tuple[np.ndarray, np.ndarray]:
        probs, labels = [], []
        for x, y in dataset:
            probs.append(np.asarray(_main_output(model(x, training=False)), dtype=np.float32))
            labels.append(np.asarray(y))
        return np.concatenate(probs), np.concatenate(labels)

    def evaluate(self, model, inputs: Inputs) -> dict[str, float]:
        probs, labels = self.predict(model, inputs.eval)
        eps = 1e-7
        loss = float(-np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], eps, 1.0))))
        k = min(5, probs.shape[1])
        topk = np.argsort(-probs, axis=1)[:, :k]
        self._last_eval = (probs, labels)
        metrics = {
            "loss": loss,
            "accuracy": float(np.mean(topk[:, 0] == labels)),
            "top5_accuracy": float(np.mean(np.any(topk == labels[:, None], axis=1))),
            "top1_error": float(np.mean(topk[:, 0] != labels)),
            "top5_error": float(np.mean(~np.any(topk == labels[:, None], axis=1))),
        }
        if self.options.evaluate_train:
            train_probs, train_labels = self.predict(model, build_train_as_eval(self.input_spec()))
            metrics["train_accuracy"] = float(np.mean(train_probs.argmax(axis=1) == train_labels))
            metrics["train_eval_gap"] = metrics["train_accuracy"] - metrics["accuracy"]
        return metrics

    def write_artifacts(self, model, history, inputs: Inputs, out_dir: Path) -> None:
        from pipelines import plots

        plots.learning_curves(history, out_dir / "learning_curves.png", title=self.config.name)
        probs, labels = getattr(self, "_last_eval", None) or self.predict(model, inputs.eval)
        plots.confusion_matrix(
            labels, probs.argmax(axis=1), inputs.info["class_names"], out_dir / "confusion_matrix.png"
        )
        if self._grad_norms is not None:
            self._grad_norms.plot(out_dir / "gradient_norms.png")

    # -- serving ------------------------------------------------------------------
    def endpoints(self, model, info: dict[str, Any], check_batch: Any = None) -> list[Endpoint]:
        height, width, channels = (int(d) for d in info["image_shape"])
        raw_channels = int(info["raw_shape"][-1])
        crop_fraction = float((info.get("preprocessing") or {}).get("crop_fraction", 1.0))
        k = min(5, int(info["num_classes"]))

        def outputs(images):
            probs = tf.cast(_main_output(model(images, training=False)), tf.float32)
            top_p, top_c = tf.math.top_k(probs, k=k)
            return {
                "probabilities": probs,
                "classes": tf.argmax(probs, axis=-1, output_type=tf.int64),
                "top5_classes": tf.cast(top_c, tf.int64),
                "top5_probabilities": top_p,
            }

        def decode(data):
            image = tf.io.decode_image(data, channels=raw_channels, expand_animations=False)
            image.set_shape([None, None, raw_channels])
            return preprocess_images(image[None], height, channels, crop_fraction)[0]

        def serve_images(images):
            return outputs(images)

        def serve_bytes(image_bytes):
            images = tf.map_fn(
                decode, image_bytes, fn_output_signature=tf.TensorSpec([height, width, channels], tf.float32)
            )
            return outputs(images)

        images_spec = tf.TensorSpec([None, height, width, channels], tf.float32, name="images")
        bytes_spec = tf.TensorSpec([None], tf.string, name="image_bytes")
        if check_batch is not None:
            images = np.asarray(check_batch[0], dtype=np.float32)[:8]
        else:
            images = np.random.default_rng(0).uniform(size=(4, height, width, channels)).astype(np.float32)
        pngs = [tf.io.encode_png(tf.cast(tf.round(img * 255.0), tf.uint8)).numpy() for img in images[:4]]
        if channels != raw_channels:  # encode in the raw channel layout the client would send
            pngs = [
                tf.io.encode_png(
                    tf.cast(tf.round(preprocess_images(img[None] * 255.0, None, raw_channels)[0] * 255.0), tf.uint8)
                ).numpy()
                for img in images[:4]
            ]
        return [
            Endpoint("serving_default", serve_images, [images_spec], [images]),
            Endpoint("image_bytes", serve_bytes, [bytes_spec], [np.array(pngs, dtype=object)]),
        ]


class _SmoothedSparseCE(keras.losses.Loss):
    """Sparse categorical cross-entropy with label smoothing on probabilities."""

    def __init__(self, num_classes: int, smoothing: float, name: str = "smoothed_ce"):
        super().__init__(name=name)
        self.num_classes = num_classes
        self.smoothing = smoothing

    def call(self, y_true, y_pred):
        y = keras.ops.one_hot(keras.ops.cast(keras.ops.reshape(y_true, (-1,)), "int32"), self.num_classes)
        return keras.losses.categorical_crossentropy(y, y_pred, label_smoothing=self.smoothing)
