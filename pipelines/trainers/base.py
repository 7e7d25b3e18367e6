"""What every generative trainer shares, and the interface through which the generation
task asks a family for what differs.

A trainer is the ``keras.Model`` whose ``train_step`` is a family's training algorithm,
wrapped around the registered network (``network``, built by ``models.create_model``).
It also owns everything else that depends on the family, so the task chooses the trainer
once (``pipelines.trainers.trainer_class``) and never asks which family it has:

- class level, before anything runs: ``check`` (cross-field config rules),
  ``metric_names`` (what ``model.evaluate`` and ``likelihood_metrics`` report),
  ``for_config`` (the trainer of a config), ``callbacks``, ``for_network`` (a trainer
  around a loaded network, for export and reference samples);
- training: ``compile_for`` (the family's optimizers), ``train_step``;
- use: ``sample``, ``likelihood_metrics``, ``endpoints`` (serving signatures),
  ``artifacts`` (pictures of the trained model).

``LatentTrainer`` adds what the latent-variable families (VAE, GAN, DRAW) share:
``latent_shape``, ``decode``, seeded sampling through ``latents_from_seeds``, the
``generate_latents`` signature, interpolations and vector arithmetic. All sampling is
seeded: ``latents_from_seeds`` draws one latent per int64 seed with a stateless generator,
so an image depends on its seed alone, not on its batch.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import keras
import numpy as np
import tensorflow as tf

from pipelines.tasks.base import Endpoint

log = logging.getLogger(__name__)

Writer = Callable[[Path], Any]


def images_of(data):
    """The images of a batch: ``(x, y)`` batches and bare ``x`` alike."""
    return data[0] if isinstance(data, (tuple, list)) else data


def to_uint8(pixels):
    return tf.cast(tf.round(tf.clip_by_value(pixels, 0.0, 1.0) * 255.0), tf.uint8)


def image_outputs(pixels, canvases=None) -> dict:
    """The outputs of a ``generate`` signature: ``images`` (uint8), ``pixels`` (float32 in
    [0, 1]) and, for DRAW, every step's ``canvases`` (uint8)."""
    out = {"images": to_uint8(pixels), "pixels": tf.cast(pixels, tf.float32)}
    if canvases is not None:
        out["canvases"] = to_uint8(canvases)
    return out


def latents_from_seeds(seeds, shape: tuple[int, ...]):
    """One standard-normal latent of ``shape`` per int64 seed (stateless, row by row)."""
    size = int(np.prod(shape))

    def one(seed):
        return tf.random.stateless_normal([size], tf.stack([seed, tf.constant(0, tf.int64)]))

    flat = tf.map_fn(
        one, tf.cast(seeds, tf.int64), fn_output_signature=tf.TensorSpec([size], tf.float32)
    )
    return tf.reshape(flat, (-1, *shape))


SEED_SPEC = tf.TensorSpec([None], tf.int64, name="seed")
CHECK_SEEDS = np.arange(4, dtype=np.int64)


class GenerativeTrainer(keras.Model):
    """Base of the trainers: holds the registered ``network``, a seed generator and mean
    trackers; ``call`` runs the network, ``test_step`` reports the same losses as
    ``train_step`` without updating anything. Each trainer defines ``losses_of(x,
    training)``, the tracked losses of a batch, and its ``train_step``."""

    tracked: ClassVar[tuple[str, ...]] = ("loss",)
    # metrics ``likelihood_metrics`` adds to the tracked ones in the task's evaluation
    likelihood_metric_names: ClassVar[tuple[str, ...]] = ()
    # whether ``val_loss`` is a bound worth restoring the best weights of (TimeLimit)
    restore_best_weights: ClassVar[bool] = False

    def __init__(self, network, seed: int = 0, **kwargs):
        super().__init__(name=f"{network.name}_trainer", **kwargs)
        self.network = network
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.trackers = {k: keras.metrics.Mean(name=k) for k in self.tracked}
        self.built = True  # the network is a built functional model

    # -- the config (class level: nothing built yet) ---------------------------------------
    @classmethod
    def check(cls, config, options) -> None:
        """Cross-field rules of this family (raise ``ConfigError`` naming the field)."""

    @classmethod
    def metric_names(cls, config, options) -> tuple[str, ...]:
        """The metrics the task's evaluation gets from this trainer for ``config``."""
        return (*cls.tracked, *cls.likelihood_metric_names)

    @classmethod
    def for_config(cls, network, config, options) -> GenerativeTrainer:
        """The trainer of ``network`` for an experiment config and its task options."""
        return cls(network, seed=config.runtime.seed)

    @classmethod
    def for_network(cls, network, info) -> GenerativeTrainer:
        """A trainer around a network built or loaded elsewhere (an untrained reference,
        a registered version being exported); ``info`` is the run's dataset info."""
        return cls(network)

    @classmethod
    def callbacks(cls, config, options) -> list:
        """Keras callbacks the algorithm needs during training."""
        return []

    # -- training ---------------------------------------------------------------------------
    def compile_for(self, train, steps_per_epoch: int, images: np.ndarray, jit_compile: bool):
        """Compile with the family's optimizers from ``config.train`` (one by default);
        ``images`` are the training images as the model sees them."""
        from pipelines.optim import build_optimizer

        self.compile(optimizer=build_optimizer(train, steps_per_epoch), jit_compile=jit_compile)

    @property
    def metrics(self):
        return list(self.trackers.values())

    def call(self, inputs, training=False):
        return self.network(inputs, training=training)

    def _update(self, values: dict) -> dict:
        for k, v in values.items():
            self.trackers[k].update_state(v)
        return {k: t.result() for k, t in self.trackers.items()}

    def test_step(self, data):
        return self._update(self.losses_of(images_of(data), training=False))

    # -- use ----------------------------------------------------------------------------------
    def sample(self, n: int, seed: int = 0, batch: int = 500) -> np.ndarray:
        """``n`` images in [0, 1], reproducible from ``seed``."""
        raise NotImplementedError

    def likelihood_metrics(self, images: np.ndarray, options, seed: int = 0) -> dict[str, float]:
        """Likelihood figures of test ``images`` (as the model sees them), named by
        ``likelihood_metric_names``."""
        return {}

    def endpoints(self, check_images: np.ndarray | None = None) -> list[Endpoint]:
        """The serving signatures (the first is ``serving_default``); ``check_images`` is
        a real batch for those that take images."""
        raise NotImplementedError

    def artifacts(
        self,
        test_images: np.ndarray,
        test_labels: np.ndarray,
        sample_labels: np.ndarray,
        arithmetic: tuple[int, int, int],
    ) -> list[Writer]:
        """Writers of the family's pictures into the artifact folder. ``sample_labels``
        are the feature classifier's labels of ``sample(len(sample_labels), seed=0)``."""
        return []


class LatentTrainer(GenerativeTrainer):
    """A model that decodes standard-normal latents into images (VAE, GAN, DRAW)."""

    def latent_shape(self) -> tuple[int, ...]:
        """The shape of one latent."""
        raise NotImplementedError

    def decode(self, latents, all_steps: bool = False):
        """Pixels in [0, 1] from latents [B, *latent_shape]."""
        raise NotImplementedError

    def generated(self, latents) -> dict:
        """The outputs of the ``generate`` signatures for ``latents``."""
        return image_outputs(self.decode(latents))

    def reconstruct(self, images: np.ndarray) -> np.ndarray | None:
        """Reconstructions of ``images`` in [0, 1] (None: the family has no encoder)."""
        return None

    def arithmetic_groups(
        self, test_images: np.ndarray, test_labels: np.ndarray, sample_labels: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, str]:
        """Latents, their groups and how they were grouped, for vector arithmetic: the
        latents of seeds ``0..n-1`` grouped by the classifier's labels of their samples."""
        n = len(sample_labels)
        shape = self.latent_shape()
        if not n:
            return np.zeros((0, *shape), np.float32), np.zeros(0), ""
        latents = latents_from_seeds(tf.range(0, n, dtype=tf.int64), shape).numpy()
        return latents, np.asarray(sample_labels), "LeNet-5 labels of generated samples"

    def sample(self, n: int, seed: int = 0, batch: int = 500) -> np.ndarray:
        """Image ``i`` is that of seed ``seed + i``, whatever the batch."""
        shape = self.latent_shape()
        out = []
        for start in range(0, n, batch):
            seeds = tf.range(seed + start, seed + min(n, start + batch), dtype=tf.int64)
            out.append(np.asarray(self.decode(latents_from_seeds(seeds, shape))))
        return np.concatenate(out)

    def _decode_numpy(self, latents) -> np.ndarray:
        return np.asarray(self.decode(tf.constant(np.asarray(latents, np.float32))))

    def endpoints(self, check_images: np.ndarray | None = None) -> list[Endpoint]:
        shape = self.latent_shape()
        latent_spec = tf.TensorSpec([None, *shape], tf.float32, name="latents")
        latents = np.random.default_rng(0).standard_normal((4, *shape)).astype(np.float32)

        def generate(seed):
            return self.generated(latents_from_seeds(seed, shape))

        return [
            Endpoint("serving_default", generate, [SEED_SPEC], [CHECK_SEEDS]),
            Endpoint("generate_latents", self.generated, [latent_spec], [latents]),
        ]

    def artifacts(self, test_images, test_labels, sample_labels, arithmetic) -> list[Writer]:
        return [
            self._write_interpolation,
            lambda out: self._write_arithmetic(
                out, test_images, test_labels, sample_labels, arithmetic
            ),
            lambda out: self._write_reconstructions(out, test_images[:10]),
        ]

    def _write_interpolation(self, out_dir: Path) -> None:
        from pipelines.evaluation import sample_quality as ev

        z = latents_from_seeds(tf.range(0, 16, dtype=tf.int64), self.latent_shape()).numpy()
        rows = [ev.interpolate(z[2 * i], z[2 * i + 1], 10, spherical=True) for i in range(8)]
        ev.save_grid(
            self._decode_numpy(np.concatenate(rows)), out_dir / "interpolation.png", columns=10
        )

    def _write_arithmetic(self, out_dir, test_images, test_labels, sample_labels, arithmetic):
        from pipelines.evaluation import sample_quality as ev

        a, b, c = arithmetic
        latents, groups, how = self.arithmetic_groups(test_images, test_labels, sample_labels)
        try:
            res = ev.latent_arithmetic(latents, groups, a, b, c, noise_scale=0.25, count=7, seed=0)
        except ValueError as exc:
            log.warning("latent arithmetic skipped: %s", exc)
            return
        decode = self._decode_numpy
        panel = np.concatenate(
            [decode(np.stack([res["a"], res["b"], res["c"]])), decode(res["result"])]
        )
        ev.save_grid(panel, out_dir / "arithmetic.png", columns=10)
        (out_dir / "arithmetic.json").write_text(
            json.dumps(
                {
                    "expression": f"mean({a}) - mean({b}) + mean({c})",
                    "groups_by": how,
                    "panel": "A, B, C group means, then 7 results with noise 0.25",
                },
                indent=2,
            )
        )

    def _write_reconstructions(self, out_dir: Path, images: np.ndarray) -> None:
        from pipelines.evaluation import sample_quality as ev

        recon = self.reconstruct(images)
        if recon is not None:
            ev.save_grid(
                np.concatenate([images, recon]), out_dir / "reconstructions.png", columns=10
            )


class SampleGrids(keras.callbacks.Callback):
    """A grid of the trainer's samples from fixed seeds every ``every`` epochs, into
    ``folder``."""

    def __init__(self, folder: Path, every: int = 1, count: int = 64):
        super().__init__()
        self.folder, self.every, self.count = folder, every, count

    def on_epoch_end(self, epoch, logs=None):
        from pipelines.evaluation import sample_quality as ev

        if (epoch + 1) % self.every:
            return
        images = self.model.sample(self.count, seed=0, batch=self.count)
        ev.save_grid(images, self.folder / f"epoch_{epoch + 1:03d}.png")
