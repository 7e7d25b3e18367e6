"""Image-folder and generic TFDS image datasets; random crops, centre crops and PCA colour
jitter (shapes, determinism, what they change)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from data.images import (  # noqa: E402
    Augment,
    ImageInputSpec,
    augment_images,
    build_image_datasets,
    pca_colour_jitter,
    pixel_pca,
    preprocess_images,
    random_crop_images,
)
from data.splits import DataError  # noqa: E402


def _write(path, size, colour, fmt="png"):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.zeros((*size, 3), np.uint8) + np.asarray(colour, np.uint8)
    image[: size[0] // 2] //= 2  # some structure
    data = tf.io.encode_png(image) if fmt == "png" else tf.io.encode_jpeg(image, quality=95)
    path.write_bytes(data.numpy())


@pytest.fixture()
def folder(tmp_path):
    colours = {"red": (220, 20, 20), "green": (20, 220, 20), "blue": (20, 20, 220)}
    for c, (name, colour) in enumerate(colours.items()):
        for i in range(5):
            size = (20 + 7 * i, 30 + 3 * c)  # any size, not square
            fmt = "jpg" if i % 2 else "png"
            _write(
                tmp_path / "imgs" / name / f"{i}.{fmt}",
                size,
                colour,
                "jpeg" if fmt == "jpg" else "png",
            )
    (tmp_path / "imgs" / "red" / "notes.txt").write_text("not an image, ignored")
    return tmp_path / "imgs"


def _spec(path, **kw):
    opts = {"path": str(path), "load_size": 16, **kw.pop("options", {})}
    return ImageInputSpec(
        name="image_folder", batch_size=4, seed=1, image_size=12, options=opts, **kw
    )


def test_image_folder_stratified_split(folder):
    train, evals, info = build_image_datasets(_spec(folder))
    assert info.class_names == ["blue", "green", "red"]
    assert (info.num_train, info.num_eval) == (12, 3)
    assert info.raw_shape == (16, 16, 3) and info.image_shape == (12, 12, 3)
    labels = np.concatenate([y.numpy() for _, y in evals])
    assert sorted(labels.tolist()) == [0, 1, 2]  # one of each class
    x, _ = next(iter(evals))
    blue = x.numpy()[labels[: len(x)] == 0]
    assert blue[..., 2].mean() > 2 * blue[..., 0].mean()  # colours survive decoding
    x, y = next(iter(train))
    assert x.shape == (4, 12, 12, 3) and y.dtype == tf.int64


def test_image_folder_train_test_layout_and_channels(tmp_path):
    for split, n in (("train", 3), ("test", 2)):
        for name in ("a", "b"):
            for i in range(n):
                _write(tmp_path / split / name / f"{i}.png", (10 + i, 12), (100, 150, 200))
    spec = dataclasses.replace(_spec(tmp_path, options={"grayscale": True}), channels=3)
    _, evals, info = build_image_datasets(spec)
    assert (info.num_train, info.num_eval) == (6, 4)
    assert info.raw_shape == (16, 16, 1) and info.image_shape == (12, 12, 3)
    x, _ = next(iter(evals))
    np.testing.assert_allclose(x.numpy()[..., 0], x.numpy()[..., 2])  # grey -> 3 equal channels


def test_corrupt_image_is_named(folder):
    bad = folder / "green" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    with pytest.raises(DataError, match="broken.jpg"):
        build_image_datasets(_spec(folder))


def test_image_folder_bad_input(tmp_path, folder):
    with pytest.raises(DataError, match="data.path"):
        build_image_datasets(_spec(tmp_path / "missing"))
    (folder / "empty").mkdir()
    with pytest.raises(DataError, match="empty.*no images"):
        build_image_datasets(_spec(folder))
    with pytest.raises(ValueError, match="data.colour"):
        build_image_datasets(_spec(folder, options={"colour": True}))


def test_tfds_name_reads_a_prepared_dataset(tfds_dir):
    from data.arrays import DeeptrendsDigits

    DeeptrendsDigits(data_dir=tfds_dir).download_and_prepare()  # a tiny locally built TFDS dataset
    spec = ImageInputSpec(
        name="tfds",
        batch_size=50,
        data_dir=tfds_dir,
        image_size=32,
        channels=3,
        options={"tfds_name": "deeptrends_digits"},
    )
    _, evals, info = build_image_datasets(spec)
    assert (info.num_train, info.num_eval, info.num_classes) == (1437, 360, 10)
    assert info.raw_shape == (8, 8, 1) and info.image_shape == (32, 32, 3)
    assert next(iter(evals))[0].shape == (50, 32, 32, 3)
    sliced = dataclasses.replace(
        spec,
        options={"tfds_name": "deeptrends_digits", "train_split": "train[:100]", "load_size": 16},
    )
    _, _, info = build_image_datasets(sliced)
    assert info.num_train == 100 and info.raw_shape == (16, 16, 1)


def test_tfds_name_errors(tfds_dir):
    spec = ImageInputSpec(name="tfds", batch_size=8, data_dir=tfds_dir, options={})
    with pytest.raises(DataError, match="data.tfds_name"):
        build_image_datasets(spec)
    with pytest.raises(DataError, match="not prepared"):
        build_image_datasets(dataclasses.replace(spec, options={"tfds_name": "mnist"}))


# ------------------------------------------------------------------- crops and colour


def test_random_crop_is_a_crop_and_deterministic():
    images = tf.reshape(tf.range(2 * 10 * 10, dtype=tf.float32), (2, 10, 10, 1))
    key = tf.constant([1, 2], tf.int64)
    a = random_crop_images(images, (6, 6), key).numpy()
    np.testing.assert_array_equal(a, random_crop_images(images, (6, 6), key).numpy())
    assert a.shape == (2, 6, 6, 1)
    for i in range(2):  # every crop is an exact window of its own image
        full = images.numpy()[i, ..., 0]
        top, left = np.argwhere(full == a[i, 0, 0, 0])[0]
        np.testing.assert_array_equal(a[i, ..., 0], full[top : top + 6, left : left + 6])


def test_centre_crop_for_eval_random_crop_for_training(tfds_dir):
    spec = ImageInputSpec(
        name="digits",
        batch_size=16,
        seed=5,
        data_dir=tfds_dir,
        image_size=24,
        channels=1,
        crop_fraction=0.75,
    )
    train, evals, info = build_image_datasets(spec)
    assert info.image_shape == (24, 24, 1)
    assert next(iter(train))[0].shape == (16, 24, 24, 1)
    x = next(iter(evals))[0].numpy()
    raw = tf.constant(np.zeros((1, 8, 8, 1), np.uint8) + 255)
    assert preprocess_images(raw, 24, 1, 0.75).shape == (1, 24, 24, 1)  # resize to 32, centre 24
    big = preprocess_images(
        tf.reshape(tf.range(64 * 64, dtype=tf.float32) % 256, (1, 64, 64, 1)), 32, 1, 0.5
    )
    assert big.shape == (1, 32, 32, 1)
    np.testing.assert_allclose(
        big.numpy()[0, ..., 0], (np.arange(64 * 64).reshape(64, 64) % 256)[16:48, 16:48] / 255
    )
    assert x.shape == (16, 24, 24, 1)
    again = _first(build_image_datasets(spec)[0])
    np.testing.assert_array_equal(next(iter(train))[0].numpy(), again)


def _first(ds):
    return next(iter(ds))[0].numpy()


def test_pca_colour_jitter_moves_colours_along_the_components():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.2, 0.8, size=(64, 4, 4, 1)).astype("float32")
    images = np.concatenate([base, base * 0.5, base * 0.25], axis=-1)  # colours on one line
    eigval, eigvec = pixel_pca(images)
    assert eigval[0] > 100 * max(eigval[1], 1e-12)
    principal = np.asarray(eigvec)[:, 0]
    np.testing.assert_allclose(
        np.abs(principal), np.array([1, 0.5, 0.25]) / np.linalg.norm([1, 0.5, 0.25]), atol=1e-6
    )
    key = tf.constant([3, 4], tf.int64)
    out = pca_colour_jitter(tf.constant(images), key, 0.1, (eigval, eigvec)).numpy()
    np.testing.assert_array_equal(
        out, pca_colour_jitter(tf.constant(images), key, 0.1, (eigval, eigvec)).numpy()
    )
    unclipped = ((out > 0) & (out < 1)).reshape(64, -1).all(axis=1)
    assert unclipped.sum() > 32
    shift = (out - images).reshape(64, -1, 3)[unclipped, 0]  # one shift per image
    assert np.abs(shift).max() > 1e-3
    residual = shift - np.outer(shift @ principal, principal)
    assert np.abs(residual).max() < 1e-5  # the shift lies along the principal component
    assert out.shape == images.shape and out.min() >= 0.0 and out.max() <= 1.0
    # ImageNet's components when none are given; with the geometric augmentation, per batch
    rgb = tf.constant(np.full((2, 8, 8, 3), 0.5, np.float32))
    jittered = augment_images(rgb, key, Augment(flip=True, pca_jitter=0.1)).numpy()
    assert jittered.shape == (2, 8, 8, 3) and not np.allclose(jittered, 0.5)


def test_pca_jitter_in_the_training_pipeline(tfds_dir):
    spec = ImageInputSpec(
        name="digits",
        batch_size=8,
        seed=2,
        data_dir=tfds_dir,
        image_size=16,
        channels=3,
        augment=Augment(pca_jitter=0.1),
    )
    train, _, info = build_image_datasets(spec)
    assert info.pca is not None and len(info.pca[0]) == 3
    a = _first(train)
    np.testing.assert_array_equal(a, _first(build_image_datasets(spec)[0]))
    plain = _first(build_image_datasets(dataclasses.replace(spec, augment=Augment()))[0])
    assert a.shape == plain.shape and not np.array_equal(a, plain)
