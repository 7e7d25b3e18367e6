"""Serving signatures shared by the image tasks: raw encoded images (JPEG, PNG, GIF, BMP
or WebP bytes of any size) decoded and preprocessed in the graph exactly as in training,
and the classification outputs ``probabilities``, ``classes``, ``top5_classes``,
``top5_probabilities``.

A signature rejects what it cannot serve with ``InvalidArgumentError`` naming the input:
a float batch of the wrong rank or shape, NaN/inf pixels, bytes that are no image, and an
image whose header promises more than ``export.max_image_pixels`` pixels (read from the
header before anything is decoded, so a small file that decodes to gigabytes costs
nothing). An empty batch gives empty outputs."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from data.images import preprocess_images
from pipelines.evaluation.classification import main_output
from pipelines.tasks.base import Endpoint

DEFAULT_MAX_IMAGE_PIXELS = 50_000_000


def _bytes_at(data, offset: int, count: int):
    return tf.cast(tf.io.decode_raw(tf.strings.substr(data, offset, count), tf.uint8), tf.int64)


def _le(data, offset: int, count: int):
    b = _bytes_at(data, offset, count)
    return tf.reduce_sum(b * tf.constant([256**i for i in range(count)], tf.int64))


def _be(data, offset: int, count: int):
    b = _bytes_at(data, offset, count)
    return tf.reduce_sum(b * tf.constant([256 ** (count - 1 - i) for i in range(count)], tf.int64))


def image_header_size(data):
    """(height, width) of one encoded image, read from its header only (JPEG, PNG, GIF,
    BMP, WebP); height -1 for anything else."""
    long_enough = tf.debugging.assert_greater_equal(
        tf.strings.length(data), 30, message="image_bytes: too short to be an image"
    )
    with tf.control_dependencies([long_enough]):
        data = tf.identity(data)
    head = tf.strings.substr(data, 0, 4)

    def jpeg():
        shape = tf.cast(tf.image.extract_jpeg_shape(data), tf.int64)
        return shape[0], shape[1]

    def webp():
        chunk = tf.strings.substr(data, 12, 4)
        bits = _le(data, 21, 4)  # VP8L: 14 bits width - 1, then 14 bits height - 1
        mask = tf.constant(0x3FFF, tf.int64)
        lossless = (
            1
            + tf.bitwise.bitwise_and(tf.bitwise.right_shift(bits, tf.constant(14, tf.int64)), mask),
            1 + tf.bitwise.bitwise_and(bits, mask),
        )
        return tf.case(
            [
                (tf.equal(chunk, b"VP8X"), lambda: (1 + _le(data, 27, 3), 1 + _le(data, 24, 3))),
                (tf.equal(chunk, b"VP8L"), lambda: lossless),
            ],
            default=lambda: (
                tf.bitwise.bitwise_and(_le(data, 28, 2), mask),
                tf.bitwise.bitwise_and(_le(data, 26, 2), mask),
            ),
        )

    def unknown():  # a negative height: the caller's check names the accepted formats
        return tf.constant(-1, tf.int64), tf.constant(1, tf.int64)

    is_webp = tf.logical_and(
        tf.equal(head, b"RIFF"), tf.equal(tf.strings.substr(data, 8, 4), b"WEBP")
    )
    return tf.case(
        [
            (tf.equal(tf.strings.substr(data, 0, 2), b"\xff\xd8"), jpeg),
            (tf.equal(head, b"\x89PNG"), lambda: (_be(data, 20, 4), _be(data, 16, 4))),
            (tf.equal(head, b"GIF8"), lambda: (_le(data, 8, 2), _le(data, 6, 2))),
            (
                tf.equal(tf.strings.substr(data, 0, 2), b"BM"),
                lambda: (tf.abs(_signed32(_le(data, 22, 4))), _le(data, 18, 4)),
            ),
            (is_webp, webp),
        ],
        default=unknown,
    )


def _signed32(value):
    return tf.where(value >= 2**31, value - 2**32, value)


def decode_image_bytes(
    image_bytes,
    image_shape,
    raw_channels: int,
    crop_fraction: float = 1.0,
    raw_size: int | None = None,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
):
    """A batch of encoded images -> float32 ``[N, H, W, C]`` preprocessed as in training.

    ``raw_size``: the square size the training images were stored at (image folders keep
    the centre square of each image at this size); serving does the same first, so a
    non-square photo is cropped, not squashed, as in training."""
    from data.folders import square_resize

    height, width, channels = (int(d) for d in image_shape)

    def decode(data):
        image = decode_any_image(data, max_pixels)
        if raw_channels == 1:
            image = tf.cast(
                tf.round(tf.image.rgb_to_grayscale(tf.cast(image, tf.float32))), tf.uint8
            )
        if raw_size is not None:
            image = square_resize(image, raw_size)
        return preprocess_images(image[None], height, channels, crop_fraction)[0]

    spec = tf.TensorSpec([height, width, channels], tf.float32)
    return tf.map_fn(decode, image_bytes, fn_output_signature=spec)


def checked_images(images, image_shape, name: str = "images"):
    """``images`` if it is a finite float batch of ``[N, *image_shape]``, else an
    ``InvalidArgumentError`` naming the input and the expected shape."""
    expected = [None, *(int(d) for d in image_shape)]
    tf.debugging.assert_rank(images, 4, message=f"{name}: expected shape {expected}")
    images = tf.ensure_shape(images, expected, name=f"{name}_shape")
    tf.debugging.assert_all_finite(images, message=f"{name}: NaN or inf values")
    return images


def encode_check_images(images: np.ndarray, raw_channels: int, count: int = 4) -> np.ndarray:
    """PNG bytes of preprocessed images in [0, 1], in the raw channel layout a client
    would send: the check inputs of an ``image_bytes`` signature."""
    out = []
    for img in images[:count]:
        if img.shape[-1] != raw_channels:
            img = preprocess_images(img[None] * 255.0, None, raw_channels)[0].numpy()
        out.append(tf.io.encode_png(tf.cast(tf.round(img * 255.0), tf.uint8)).numpy())
    return np.array(out, dtype=object)


def check_images(check_batch, image_shape, count: int = 8) -> np.ndarray:
    """The images of a real batch (or seeded noise) to compare saved and Keras models on."""
    if check_batch is not None:
        return np.asarray(check_batch[0], dtype=np.float32)[:count]
    return np.random.default_rng(0).uniform(size=(4, *image_shape)).astype(np.float32)


def predict_batch(model, images, output_shape):
    """The model's main float32 output, or an empty ``[0, *output_shape]`` for an empty
    batch (a zero-size batch would reach kernels that cannot take it)."""
    return tf.cond(
        tf.shape(images)[0] > 0,
        lambda: tf.cast(main_output(model(images, training=False)), tf.float32),
        lambda: tf.zeros([0, *output_shape], tf.float32),
    )


def image_classifier_endpoints(
    model, info, check_batch=None, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> list[Endpoint]:
    """``serving_default`` (preprocessed ``images``) and ``image_bytes`` (encoded images)
    of an image classifier described by ``info`` (an ``ImageInfo``)."""
    image_shape = [int(d) for d in info.image_shape]
    raw_channels = int(info.raw_shape[-1])
    raw_size = int(info.raw_shape[0]) if info.raw_shape[0] == info.raw_shape[1] else None
    k = min(5, int(info.num_classes))

    def outputs(images):
        probs = predict_batch(model, images, [int(info.num_classes)])
        top_p, top_c = tf.math.top_k(probs, k=k)
        return {
            "probabilities": probs,
            "classes": tf.argmax(probs, axis=-1, output_type=tf.int64),
            "top5_classes": tf.cast(top_c, tf.int64),
            "top5_probabilities": top_p,
        }

    def serve_images(images):
        return outputs(checked_images(images, image_shape))

    def serve_bytes(image_bytes):
        return outputs(
            decode_image_bytes(
                image_bytes, image_shape, raw_channels, info.crop_fraction, raw_size, max_pixels
            )
        )

    images = check_images(check_batch, image_shape)
    return [
        Endpoint(
            "serving_default",
            serve_images,
            [tf.TensorSpec([None, *image_shape], tf.float32, name="images")],
            [images],
        ),
        Endpoint(
            "image_bytes",
            serve_bytes,
            [tf.TensorSpec([None], tf.string, name="image_bytes")],
            [encode_check_images(images, raw_channels)],
        ),
    ]


# ------------------------------------------------------------------ object detection (issue 14)
# Detection outputs (TF Object Detection API names): ``detection_boxes`` [N, K, 4]
# normalised (ymin, xmin, ymax, xmax) in the image as sent, ``detection_scores`` [N, K],
# ``detection_classes`` [N, K] int64 (1-based: the i-th class name is class i; 0 pads),
# ``detection_class_names`` [N, K] string ("" pads) and ``num_detections`` [N] int32.
# Images of any size are decoded and detected one at a time (``tf.map_fn``), decoding,
# resizing, the network, box decoding and NMS all inside the signature.


def decode_any_image(data, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
    """One encoded image (JPEG, PNG, GIF, BMP, WebP) -> uint8 [H, W, 3] at its own size,
    refused (``InvalidArgumentError``) when its header is no image's or promises more
    than ``max_pixels`` pixels."""
    h, w = image_header_size(data)
    checks = [
        tf.debugging.assert_non_negative(
            h, message="image_bytes: not a JPEG, PNG, GIF, BMP or WebP image"
        ),
        tf.debugging.assert_less_equal(
            h * w,
            tf.constant(max_pixels, tf.int64),
            message=f"image_bytes: the image is larger than export.max_image_pixels={max_pixels}",
            summarize=2,
        ),
        tf.debugging.assert_positive(h * w, message="image_bytes: the image has no pixels"),
    ]
    # the checks run before the decoder (in a graph nothing else orders them): a refused
    # input fails with its own message, and a bomb is never decoded
    with tf.control_dependencies(checks):
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def detection_output_signature(max_detections: int) -> dict:
    k = int(max_detections)
    return {
        "detection_boxes": tf.TensorSpec([k, 4], tf.float32),
        "detection_scores": tf.TensorSpec([k], tf.float32),
        "detection_classes": tf.TensorSpec([k], tf.int64),
        "num_detections": tf.TensorSpec([], tf.int32),
    }


def with_class_names(outputs: dict, class_names) -> dict:
    """``outputs`` plus ``detection_class_names`` looked up from the 1-based classes."""
    table = tf.constant(["", *[str(c) for c in class_names]])
    return {**outputs, "detection_class_names": tf.gather(table, outputs["detection_classes"])}


def checked_any_images(images, name: str = "images"):
    """A finite float batch ``[N, H, W, 3]`` of any H, W, else ``InvalidArgumentError``."""
    tf.debugging.assert_rank(images, 4, message=f"{name}: expected shape [None, None, None, 3]")
    images = tf.ensure_shape(images, [None, None, None, 3], name=f"{name}_shape")
    tf.debugging.assert_all_finite(images, message=f"{name}: NaN or inf values")
    return images


def image_detector_endpoints(
    detect_one,
    class_names,
    check_images,
    max_detections: int,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> list[Endpoint]:
    """``serving_default`` (``image_bytes``: encoded images of any size) and ``images``
    (float [N, H, W, 3] in [0, 1]) of a detector; ``detect_one(image [H, W, 3] in [0, 1])``
    returns one image's outputs (``detection_output_signature``). ``check_images``: a few
    uint8 [H, W, 3] images to compare the saved signatures with the in-process ones."""
    signature = detection_output_signature(max_detections)

    def serve_bytes(image_bytes):
        def one(data):
            return detect_one(tf.cast(decode_any_image(data, max_pixels), tf.float32) / 255.0)

        outputs = tf.map_fn(one, image_bytes, fn_output_signature=signature)
        return with_class_names(outputs, class_names)

    def serve_images(images):
        images = checked_any_images(images)
        outputs = tf.map_fn(detect_one, images, fn_output_signature=signature)
        return with_class_names(outputs, class_names)

    encoded = np.array([tf.io.encode_png(img).numpy() for img in check_images], dtype=object)
    floats = np.stack([img.astype(np.float32) / 255.0 for img in check_images[:1]])
    return [
        Endpoint(
            "serving_default",
            serve_bytes,
            [tf.TensorSpec([None], tf.string, name="image_bytes")],
            [encoded],
        ),
        Endpoint(
            "images",
            serve_images,
            [tf.TensorSpec([None, None, None, 3], tf.float32, name="images")],
            [floats],
        ),
    ]


def proposal_detector_endpoints(
    detect_one, class_names, check_images, check_proposals, max_detections: int
) -> list[Endpoint]:
    """``serving_default`` of a detector that takes its region proposals from the client
    (R-CNN: selective search cannot run inside a SavedModel): ``images`` float [N, H, W, 3]
    in [0, 1] and ``proposals`` float [N, P, 4] normalised (ymin, xmin, ymax, xmax; rows of
    zeros pad). ``detect_one(image, proposals)`` returns one image's outputs."""
    signature = detection_output_signature(max_detections)

    def serve(images, proposals):
        images = checked_any_images(images)
        tf.debugging.assert_rank(proposals, 3, message="proposals: expected shape [None, None, 4]")
        proposals = tf.ensure_shape(proposals, [None, None, 4], name="proposals_shape")
        tf.debugging.assert_all_finite(proposals, message="proposals: NaN or inf values")
        tf.debugging.assert_equal(
            tf.shape(images)[0],
            tf.shape(proposals)[0],
            message="proposals: one row of proposals per image",
        )
        outputs = tf.map_fn(
            lambda args: detect_one(*args), (images, proposals), fn_output_signature=signature
        )
        return with_class_names(outputs, class_names)

    images = np.stack([img.astype(np.float32) / 255.0 for img in check_images])
    return [
        Endpoint(
            "serving_default",
            serve,
            [
                tf.TensorSpec([None, None, None, 3], tf.float32, name="images"),
                tf.TensorSpec([None, None, 4], tf.float32, name="proposals"),
            ],
            [images, np.asarray(check_proposals, np.float32)],
        ),
    ]
