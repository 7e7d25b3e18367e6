"""Evaluation tools of the generative models: the Fréchet distance in the 84-d F6 feature
space of the project's own LeNet-5, the share of confidently classified samples, sample
grids, latent interpolation and vector arithmetic, and DRAW's canvas as an animated GIF.

The Fréchet distance (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule")
between Gaussians fitted to two feature sets is
``|mu_1 - mu_2|^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2})``. Here the features are those of
LeNet-5's F6 layer (``lenet5``, ``include_top=False``) of a classifier trained on the same
training split (or a registered one), instead of Inception's pool3: an "FID" for digits.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tensorflow as tf

log = logging.getLogger(__name__)

CONFIDENCE = 0.9


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two [N, D] feature sets."""
    from scipy import linalg

    a = np.asarray(features_a, np.float64)
    b = np.asarray(features_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(
            f"features must be [N, D] with the same D. Received: {a.shape} and {b.shape}"
        )
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
    if not np.isfinite(covmean).all():  # near-singular product: regularise (as pytorch-fid does)
        offset = np.eye(a.shape[1]) * 1e-6
        covmean = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    covmean = np.real(covmean)
    return float(
        np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(covmean)
    )


def relative_distance(fid: float, floor: float, ceiling: float) -> float:
    """Where ``fid`` lies between the real-vs-real distance (0) and the untrained
    network's (1). Feature spaces differ in scale (another LeNet-5, another F6), so raw
    distances compare only within one classifier; this position compares across them."""
    span = ceiling - floor
    if not np.isfinite(span) or span <= 0.0:
        return float("nan")
    return float((fid - floor) / span)


@dataclass
class FeatureClassifier:
    """A LeNet-5 classifier and its F6 feature extractor, with where it came from."""

    model: object  # keras.Model images -> probabilities
    features_model: object  # keras.Model images -> 84-d F6 features
    record: dict = field(default_factory=dict)

    @property
    def input_size(self) -> tuple[int, int]:
        shape = self.model.input_shape
        return int(shape[1]), int(shape[2])

    def _prep(self, images: np.ndarray):
        x = tf.convert_to_tensor(np.asarray(images, np.float32))
        if tuple(x.shape[1:3]) != self.input_size:
            x = tf.image.resize(x, self.input_size, method="bilinear")
        channels = int(self.model.input_shape[-1])
        if x.shape[-1] != channels:
            x = tf.image.grayscale_to_rgb(x) if channels == 3 else tf.image.rgb_to_grayscale(x)
        return x

    def features_and_probs(
        self, images: np.ndarray, batch: int = 500
    ) -> tuple[np.ndarray, np.ndarray]:
        feats, probs = [], []
        for i in range(0, len(images), batch):
            x = self._prep(images[i : i + batch])
            feats.append(np.asarray(self.features_model(x, training=False)))
            probs.append(np.asarray(self.model(x, training=False)))
        return np.concatenate(feats), np.concatenate(probs)


def _wrap(model, record: dict) -> FeatureClassifier:
    import keras

    f6 = (
        model.get_layer("f6_act")
        if any(la.name == "f6_act" for la in model.layers)
        else model.get_layer("f6")
    )
    features = keras.Model(model.inputs, f6.output, name="lenet5_f6")
    return FeatureClassifier(model, features, record)


def train_feature_classifier(
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    cache_path: Path | None,
    seed: int = 0,
    epochs: int = 5,
    source: str = "",
) -> FeatureClassifier:
    """Train (or reload from ``cache_path``) ``lenet5`` (ReLU, max pooling, 32x32) on the
    training split in [0, 1]; the record holds its test accuracy and how it was made."""
    import keras

    import models

    if cache_path is not None and cache_path.exists() and cache_path.with_suffix(".json").exists():
        record = json.loads(cache_path.with_suffix(".json").read_text())
        return _wrap(keras.saving.load_model(cache_path), {**record, "reused_cache": True})
    x, y = train
    keras.utils.set_random_seed(seed)
    model = models.create_model(
        "lenet5",
        input_shape=(32, 32, int(x.shape[-1])),
        num_classes=int(y.max()) + 1,
        activation="relu",
        pooling="max",
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    clf = _wrap(model, {})
    resized = clf._prep(x).numpy()
    model.fit(resized, y, batch_size=128, epochs=epochs, verbose=0, shuffle=True)
    _, probs = clf.features_and_probs(test[0])
    accuracy = float(np.mean(probs.argmax(1) == test[1]))
    clf.record = {
        "kind": "trained_in_evaluation",
        "model": "lenet5",
        "activation": "relu",
        "pooling": "max",
        "input_shape": [32, 32, int(x.shape[-1])],
        "epochs": epochs,
        "seed": seed,
        "train_examples": int(len(x)),
        "test_accuracy": accuracy,
        "data": source,
    }
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_name(cache_path.stem + ".tmp.keras")
        model.save(tmp)
        tmp.replace(cache_path)
        cache_path.with_suffix(".json").write_text(
            json.dumps({**clf.record, "cache": str(cache_path)}, indent=2)
        )
        clf.record["cache"] = str(cache_path)
    return clf


def load_feature_classifier(uri: str, test: tuple[np.ndarray, np.ndarray]) -> FeatureClassifier:
    """A registered LeNet-5 (``models:/NAME/VERSION`` or ``models:/NAME@ALIAS``) or a
    ``.keras`` file; its registered version is recorded."""
    import keras

    record: dict = {"kind": "registered" if uri.startswith("models:/") else "file", "uri": uri}
    if uri.startswith("models:/"):
        from pipelines import tracking  # the registry is read through tracking only

        model = tracking.load_model(uri)
        record["version"] = tracking.registered_version(uri)
    else:
        if not Path(uri).is_file():
            raise FileNotFoundError(
                f"task_options.fid_classifier: {uri!r} is neither models:/... nor a .keras file"
            )
        model = keras.saving.load_model(uri)
    clf = _wrap(model, record)
    _, probs = clf.features_and_probs(test[0])
    clf.record["test_accuracy"] = float(np.mean(probs.argmax(1) == test[1]))
    return clf


def sample_quality(
    clf: FeatureClassifier, samples: np.ndarray, real_features: np.ndarray, prefix: str = ""
) -> dict:
    """Fréchet distance to the real features, share of samples classified with
    confidence > 0.9, and the smallest class share of the samples' predicted labels."""
    feats, probs = clf.features_and_probs(samples)
    num_classes = probs.shape[1]
    shares = np.bincount(probs.argmax(1), minlength=num_classes) / len(probs)
    return {
        f"{prefix}fid": frechet_distance(feats, real_features),
        f"{prefix}confident_share": float(np.mean(probs.max(1) > CONFIDENCE)),
        f"{prefix}min_class_share": float(shares.min()),
    }


# ------------------------------------------------------------------------ latents


def interpolate(
    a: np.ndarray, b: np.ndarray, steps: int = 8, spherical: bool = False
) -> np.ndarray:
    """``steps`` latents from ``a`` to ``b`` [steps, *a.shape]: linear, or spherical
    (slerp, for Gaussian latents)."""
    t = np.linspace(0.0, 1.0, steps)
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)
    if not spherical:
        return np.stack([(1 - s) * a + s * b for s in t]).astype(np.float32)
    fa, fb = a.ravel(), b.ravel()
    omega = np.arccos(np.clip(np.dot(fa / np.linalg.norm(fa), fb / np.linalg.norm(fb)), -1.0, 1.0))
    if omega < 1e-6:
        return np.stack([(1 - s) * a + s * b for s in t]).astype(np.float32)
    return np.stack(
        [(np.sin((1 - s) * omega) * a + np.sin(s * omega) * b) / np.sin(omega) for s in t]
    ).astype(np.float32)


def latent_arithmetic(
    latents: np.ndarray,
    groups: np.ndarray,
    a,
    b,
    c,
    noise_scale: float = 0.0,
    count: int = 1,
    seed: int = 0,
) -> dict:
    """DCGAN's vector arithmetic: ``mean(z | group a) - mean(z | group b) + mean(z | group c)``.

    Args:
        latents: array [N, *latent_shape].
        groups: array [N]. The group of each latent (a label, or a classifier's prediction).
        a, b, c: the three groups.
        noise_scale: float. Standard deviation of noise added to the result for ``count`` variations
            (the paper adds uniform noise of scale 0.25).
        count: int. The number of result latents.

    Returns a dict of the group means ``a``, ``b``, ``c`` [*latent_shape] and ``result``
    [count, *latent_shape]; raises ``ValueError`` if a group is empty.
    """
    latents = np.asarray(latents, np.float32)
    groups = np.asarray(groups)
    if len(latents) != len(groups):
        raise ValueError(f"latents and groups differ in length: {len(latents)} vs {len(groups)}")
    means = {}
    for key, g in (("a", a), ("b", b), ("c", c)):
        members = latents[groups == g]
        if len(members) == 0:
            raise ValueError(f"latent arithmetic: group {key}={g!r} has no members")
        means[key] = members.mean(0)
    result = means["a"] - means["b"] + means["c"]
    rng = np.random.default_rng(seed)
    results = result[None] + noise_scale * rng.standard_normal((count, *result.shape)).astype(
        np.float32
    )
    return {**means, "result": results.astype(np.float32)}


# ------------------------------------------------------------------------ pictures


def grid(images: np.ndarray, columns: int = 8, pad: int = 1) -> np.ndarray:
    """[N, H, W, C] in [0, 1] -> one uint8 image [rows*(H+pad), columns*(W+pad), C]."""
    images = np.clip(np.asarray(images, np.float32), 0.0, 1.0)
    n, h, w, c = images.shape
    rows = int(np.ceil(n / columns))
    out = np.ones((rows * (h + pad) + pad, columns * (w + pad) + pad, c), np.float32)
    for i in range(n):
        r, col = divmod(i, columns)
        out[
            pad + r * (h + pad) : pad + r * (h + pad) + h,
            pad + col * (w + pad) : pad + col * (w + pad) + w,
        ] = images[i]
    return np.round(out * 255).astype(np.uint8)


def _pil(image: np.ndarray, scale: int):
    from PIL import Image

    img = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale > 1 else img


def save_grid(images: np.ndarray, path: Path, columns: int = 8, scale: int = 2) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    _pil(grid(images, columns), scale).save(path)
    return path


def save_canvas_gif(
    canvases: np.ndarray, path: Path, columns: int = 8, scale: int = 2, ms: int = 120
) -> Path:
    """DRAW's canvases [N, T, H, W, C] in [0, 1] as an animated GIF, one frame per step
    (the last frame held longer)."""
    frames = [_pil(grid(canvases[:, t], columns), scale) for t in range(canvases.shape[1])]
    durations = [ms] * (len(frames) - 1) + [ms * 8]
    path.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=durations, loop=0)
    return path
