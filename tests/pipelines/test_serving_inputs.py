"""Hostile input to an exported classifier, as TF Serving would pass it: every bad batch
gets an ``InvalidArgumentError`` naming the input (never a process abort, never a silent
answer), every good one the in-process answer; ``image_bytes`` reads sizes from headers
before decoding, takes the formats a colour model takes, and crops non-square images the
way training did."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    import models
    from pipelines.config import validate_config
    from pipelines.serving.export import write_saved_model
    from pipelines.tasks.base import RunContext, get_task

    config = validate_config(
        {"name": "x", "model": {"name": "lenet5"}, "export": {"max_image_pixels": 10_000}}
    )
    task = get_task("classification")(RunContext(config))
    model = models.create_model("lenet5", input_shape=(32, 32, 1), num_classes=10)
    info = task.Info(
        image_shape=[32, 32, 1],
        raw_shape=[28, 28, 1],
        num_classes=10,
        preprocessing={"crop_fraction": 1.0},
    )
    serving = task.serving(model, info)
    root = tmp_path_factory.mktemp("serving")
    result = write_saved_model(
        serving.model, serving.endpoints, root / "1", model_name="x", warmup_requests=0
    )
    return tf.saved_model.load(str(result.path)).signatures, serving, model


def _png(array: np.ndarray) -> bytes:
    return tf.io.encode_png(array).numpy()


@pytest.mark.parametrize(
    "batch, message",
    [
        (np.zeros((32, 32, 1), np.float32), "images"),  # rank 3: aborted the process before
        (np.zeros((2, 32, 32, 3), np.float32), "images"),  # 3 channels to a 1-channel model
        (np.zeros((2, 28, 28, 1), np.float32), "images"),
        (np.full((2, 32, 32, 1), np.nan, np.float32), "NaN or inf"),
        (np.full((1, 32, 32, 1), np.inf, np.float32), "NaN or inf"),
    ],
)
def test_images_signature_rejects_what_it_cannot_serve(exported, batch, message):
    signatures, _, _ = exported
    fn = signatures["serving_default"]
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match=message):
        fn(images=tf.constant(batch))


def test_empty_batches_give_empty_results(exported):
    signatures, _, _ = exported
    out = signatures["serving_default"](images=tf.zeros([0, 32, 32, 1]))
    assert out["probabilities"].shape == (0, 10)
    out = signatures["image_bytes"](image_bytes=tf.constant([], tf.string))
    assert out["classes"].shape == (0,)


def _huge_png_header(width: int, height: int) -> bytes:
    """A PNG whose header promises width x height (the body is a few zero rows): a
    decompression bomb as far as a decoder that trusts the header is concerned."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = zlib.compress(b"\0" * (width + 1) * 4)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "too short"),
        (b"not an image at all, just some bytes here", "not a JPEG, PNG"),
        (_huge_png_header(20000, 20000), "max_image_pixels"),
    ],
)
def test_image_bytes_rejects_garbage_and_bombs(exported, data, message):
    signatures, _, _ = exported
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        signatures["image_bytes"](image_bytes=tf.constant([data]))


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "WEBP", "JPEG", "PNG"])
def test_grayscale_model_takes_the_formats_a_colour_model_takes(exported, fmt):
    from PIL import Image

    signatures, _, _ = exported
    rgb = np.random.default_rng(0).integers(0, 256, size=(28, 28, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=fmt)
    out = signatures["image_bytes"](image_bytes=tf.constant([buf.getvalue()]))
    assert out["probabilities"].shape == (1, 10)
    assert np.isfinite(out["probabilities"].numpy()).all()


def test_non_square_images_are_cropped_as_in_training(exported):
    """Image folders store the centre square of each image; serving does the same."""
    from data.folders import square_resize
    from data.images import preprocess_images

    signatures, _, model = exported
    rng = np.random.default_rng(1)
    wide = rng.integers(0, 256, size=(28, 56, 1), dtype=np.uint8)
    served = signatures["image_bytes"](image_bytes=tf.constant([_png(wide)]))["probabilities"]
    trained_on = preprocess_images(square_resize(tf.constant(wide), 28)[None], 32, 1)
    expected = model(trained_on, training=False)
    np.testing.assert_allclose(served.numpy(), expected.numpy(), atol=1e-5)


def test_good_input_matches_the_keras_model(exported):
    signatures, _, model = exported
    x = np.random.default_rng(2).uniform(size=(3, 32, 32, 1)).astype(np.float32)
    got = signatures["serving_default"](images=tf.constant(x))["probabilities"].numpy()
    np.testing.assert_allclose(got, model(x, training=False).numpy(), atol=1e-5)
