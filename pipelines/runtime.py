"""Process set-up from ``config.runtime``: seeds, precision, compilation, strategy.

Strategies: ``auto`` (mirrored over the GPUs when more than one is visible, else the
default strategy), ``default``, ``one_device``, ``mirrored`` (``runtime.devices``, or all
GPUs, or the ``runtime.virtual_cpus`` logical CPUs), ``multi_worker`` (cluster from
``TF_CONFIG`` or ``runtime.cluster``) and ``tpu``.
"""

from __future__ import annotations

import json
import logging
import os

from pipelines.config import RuntimeConfig

log = logging.getLogger(__name__)


class StrategyError(RuntimeError):
    """The requested strategy cannot run here; the message says why and what to use."""


def quiet_tensorflow() -> None:
    """Silence TensorFlow's C++ start-up chatter and TFDS progress bars."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def configure(runtime: RuntimeConfig):
    """Seed every generator, set the precision policy and return the tf.distribute strategy."""
    quiet_tensorflow()
    import keras
    import tensorflow as tf

    if runtime.strategy == "multi_worker" and runtime.cluster is not None:
        os.environ["TF_CONFIG"] = json.dumps(
            {"cluster": {"worker": runtime.cluster.workers}, "task": {"type": "worker", "index": runtime.cluster.index}}
        )
    if runtime.virtual_cpus:
        split_cpu(runtime.virtual_cpus)
    strategy = make_strategy(runtime)  # first: multi-worker must configure collectives at start-up
    keras.utils.set_random_seed(runtime.seed)
    if runtime.deterministic_ops:
        tf.config.experimental.enable_op_determinism()
    keras.mixed_precision.set_global_policy(runtime.mixed_precision)
    return strategy


def split_cpu(n: int) -> None:
    """Expose the CPU as ``n`` logical devices (must run before TensorFlow initialises)."""
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    current = tf.config.get_logical_device_configuration(cpu)
    if current and len(current) == n:
        return
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * n)
    except RuntimeError as exc:
        raise StrategyError(
            f"runtime.virtual_cpus={n}: TensorFlow is already initialised in this process "
            f"with {len(tf.config.list_logical_devices('CPU'))} CPU device(s) ({exc})."
        ) from None


def make_strategy(runtime: RuntimeConfig):
    import tensorflow as tf

    kind = runtime.strategy
    if kind in ("multi_worker", "tpu"):
        gpus = []  # listing devices would initialise the context before collectives are set up
    else:
        gpus = tf.config.list_logical_devices("GPU")
    if kind == "auto":
        kind = "mirrored" if len(gpus) > 1 else "default"
    if kind == "default":
        return tf.distribute.get_strategy()
    if kind == "one_device":
        device = (runtime.devices or [gpus[0].name if gpus else "/cpu:0"])[0]
        return tf.distribute.OneDeviceStrategy(device)
    if kind == "mirrored":
        devices = runtime.devices
        if devices is None and not gpus and runtime.virtual_cpus:
            devices = [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices=devices)
    if kind == "multi_worker":
        if not os.environ.get("TF_CONFIG"):
            raise StrategyError(
                "runtime.strategy=multi_worker needs a cluster: set TF_CONFIG, give runtime.cluster, "
                "or start the job with `deeptrends launch --workers N CONFIG`."
            )
        impl = {
            "auto": tf.distribute.experimental.CommunicationImplementation.AUTO,
            "ring": tf.distribute.experimental.CommunicationImplementation.RING,
            "nccl": tf.distribute.experimental.CommunicationImplementation.NCCL,
        }[runtime.collective]
        options = tf.distribute.experimental.CommunicationOptions(implementation=impl)
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    if kind == "tpu":
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
        except (ValueError, RuntimeError, tf.errors.NotFoundError) as exc:
            raise StrategyError(
                f"runtime.strategy=tpu: no TPU found ({exc}). Use auto, default, mirrored or multi_worker here."
            ) from None
        return tf.distribute.TPUStrategy(resolver)
    raise StrategyError(f"runtime.strategy: unknown strategy {kind!r}")


def task_info() -> tuple[str, int, int]:
    """(type, index, number of workers) of this process in its cluster; ("chief", 0, 1) alone."""
    tf_config = json.loads(os.environ.get("TF_CONFIG", "{}") or "{}")
    task = tf_config.get("task") or {}
    cluster = tf_config.get("cluster") or {}
    workers = sum(len(v) for k, v in cluster.items() if k in ("chief", "worker"))
    if not task:
        return "chief", 0, 1
    return task.get("type", "worker"), int(task.get("index", 0)), max(1, workers)


def is_chief() -> bool:
    """True in a single process and on the chief of a multi-worker job (worker 0 when the
    cluster has no separate chief)."""
    kind, index, _ = task_info()
    if kind == "chief":
        return True
    tf_config = json.loads(os.environ.get("TF_CONFIG", "{}") or "{}")
    return kind == "worker" and index == 0 and "chief" not in tf_config.get("cluster", {})


def worker_name() -> str:
    kind, index, _ = task_info()
    return f"{kind}-{index}"
