"""Process set-up from ``config.runtime``: seeds, precision, compilation, strategy."""

from __future__ import annotations

import logging
import os

from pipelines.config import RuntimeConfig

log = logging.getLogger(__name__)


def quiet_tensorflow() -> None:
    """Silence TensorFlow's C++ start-up chatter and TFDS progress bars."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def configure(runtime: RuntimeConfig):
    """Seed every generator, set the precision policy and return the tf.distribute strategy."""
    quiet_tensorflow()
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(runtime.seed)
    if runtime.deterministic_ops:
        tf.config.experimental.enable_op_determinism()
    keras.mixed_precision.set_global_policy(runtime.mixed_precision)
    return make_strategy(runtime)


def make_strategy(runtime: RuntimeConfig):
    import tensorflow as tf

    if runtime.strategy == "default":
        return tf.distribute.get_strategy()
    if runtime.strategy == "one_device":
        device = (runtime.devices or ["/cpu:0" if not tf.config.list_logical_devices("GPU") else "/gpu:0"])[0]
        return tf.distribute.OneDeviceStrategy(device)
    if runtime.strategy == "mirrored":
        return tf.distribute.MirroredStrategy(devices=runtime.devices)
    raise ValueError(f"runtime.strategy: unknown strategy {runtime.strategy!r}")


def is_chief() -> bool:
    """True in a single process and on the chief of a multi-worker job."""
    import json

    tf_config = json.loads(os.environ.get("TF_CONFIG", "{}") or "{}")
    task = tf_config.get("task", {})
    if not task:
        return True
    return task.get("type") == "chief" or (
        task.get("type") == "worker" and task.get("index", 0) == 0 and "chief" not in tf_config.get("cluster", {})
    )
