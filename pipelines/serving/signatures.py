"""Serving signatures shared by the image tasks: raw encoded images (PNG/JPEG bytes of
any size) decoded and preprocessed in the graph exactly as in training, and the
classification outputs ``probabilities``, ``classes``, ``top5_classes``,
``top5_probabilities``."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from data.images import preprocess_images
from pipelines.evaluation.classification import main_output
from pipelines.tasks.base import Endpoint


def decode_image_bytes(image_bytes, image_shape, raw_channels: int, crop_fraction: float = 1.0):
    """A batch of encoded images -> float32 ``[N, H, W, C]`` preprocessed as in training."""
    height, width, channels = (int(d) for d in image_shape)

    def decode(data):
        image = tf.io.decode_image(data, channels=raw_channels, expand_animations=False)
        image.set_shape([None, None, raw_channels])
        return preprocess_images(image[None], height, channels, crop_fraction)[0]

    spec = tf.TensorSpec([height, width, channels], tf.float32)
    return tf.map_fn(decode, image_bytes, fn_output_signature=spec)


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


def image_classifier_endpoints(model, info, check_batch=None) -> list[Endpoint]:
    """``serving_default`` (preprocessed ``images``) and ``image_bytes`` (encoded images)
    of an image classifier described by ``info`` (an ``ImageInfo``)."""
    image_shape = [int(d) for d in info.image_shape]
    raw_channels = int(info.raw_shape[-1])
    k = min(5, int(info.num_classes))

    def outputs(images):
        probs = tf.cast(main_output(model(images, training=False)), tf.float32)
        top_p, top_c = tf.math.top_k(probs, k=k)
        return {
            "probabilities": probs,
            "classes": tf.argmax(probs, axis=-1, output_type=tf.int64),
            "top5_classes": tf.cast(top_c, tf.int64),
            "top5_probabilities": top_p,
        }

    def serve_images(images):
        return outputs(images)

    def serve_bytes(image_bytes):
        return outputs(decode_image_bytes(image_bytes, image_shape, raw_channels, info.crop_fraction))

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
