"""Process set-up from ``config.runtime``: seeds, precision, compilation, strategy.

Strategies: ``auto`` (mirrored over the GPUs when more than one is visible, else the
default strategy), ``default``, ``one_device``, ``mirrored`` (``runtime.devices``, or all
GPUs, or the ``runtime.virtual_cpus`` logical CPUs), ``multi_worker`` (cluster from
``TF_CONFIG`` or ``runtime.cluster``) and ``tpu``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import tempfile
import warnings

from pipelines.config import RuntimeConfig

log = logging.getLogger(__name__)


class StrategyError(RuntimeError):
    """The requested strategy cannot run here; the message says why and what to use."""


# What TensorFlow's C++ libraries print while they load and probe for CUDA. These lines
# come before TF_CPP_MIN_LOG_LEVEL applies (abseil writes everything to stderr until it
# is initialised: tensorflow/tensorflow#100442), so no setting hides them.
_START_UP_NOTICES = re.compile(
    r"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|\] oneDNN custom operations are on\."
    r"|\] Could not find cuda drivers on your machine, GPU will not be used\."
    r"|\] This TensorFlow binary is optimized to use available CPU instructions"
    r"|^To enable the following instructions: .* rebuild TensorFlow with the appropriate compiler"
    r"|\] Unable to register cu(DNN|FFT|BLAS) factory: Attempting to register factory for plugin"
    r"|TF-TRT Warning: Could not find TensorRT"
)
# cuInit fails on a machine without a GPU driver; it is only noise after the notice above.
_NO_DRIVER = re.compile(r"\] Could not find cuda drivers on your machine")
_CUINIT = re.compile(r"\] failed call to cuInit: ")
_quiet = {"done": False, "no_driver": False}


@contextlib.contextmanager
def _start_up_notices_filtered():
    """Send fd 2 (where C++ writes) to a temporary file for the duration, then write every
    line of it that is not a known start-up notice to the real stderr: errors still show,
    in order, only after the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = []
            for line in captured.read().decode(errors="replace").splitlines(keepends=True):
                if _NO_DRIVER.search(line):
                    _quiet["no_driver"] = True
                if _START_UP_NOTICES.search(line) or (_quiet["no_driver"] and _CUINIT.search(line)):
                    continue
                kept.append(line)
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def prefer_onednn() -> None:
    """Run TensorFlow's oneDNN CPU kernels on every x86-64 CPU, unless the environment
    sets ``TF_ENABLE_ONEDNN_OPTS`` (``0`` keeps TensorFlow's Eigen kernels).

    TensorFlow turns oneDNN on by itself only where the CPU has neural-network instructions
    (AVX512-VNNI, AVX512-BF16, AMX); elsewhere (an AVX2-only CPU) its own Eigen convolutions
    run, and the shipped LeNet-5 trains 1.6-1.9x slower (README, "Speed"). Must run before
    TensorFlow is imported: it reads the variable once."""
    import platform

    if platform.machine().lower() in ("x86_64", "amd64"):
        os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")


def onednn_enabled() -> bool:
    """Whether this process's TensorFlow runs oneDNN's kernels (logged as a derived param)."""
    from tensorflow.python.util import _pywrap_util_port

    return bool(_pywrap_util_port.IsMklEnabled())


def quiet_tensorflow() -> None:
    """Start TensorFlow without its start-up chatter, keeping its errors and warnings.

    ``TF_CPP_MIN_LOG_LEVEL=2`` (unless set) drops later C++ INFO lines; the notices printed
    while the libraries load and the first device probe runs (oneDNN, CUDA drivers, cuInit
    without a driver, CPU instructions) are filtered out of what they write to stderr,
    everything else is written back; Python warnings raised inside TensorFlow and TFDS
    (deprecations of their own internals) are ignored. Call it before TensorFlow is
    imported (later, only the environment is set). oneDNN: ``prefer_onednn``."""
    prefer_onednn()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    warnings.filterwarnings("ignore", module=r"(tensorflow|tensorflow_datasets|tf_keras)(\.|$)")
    if _quiet["done"] or "tensorflow" in sys.modules:
        _quiet["done"] = True
        return
    _quiet["done"] = True
    with _start_up_notices_filtered():
        import tensorflow as tf

        tf.config.list_physical_devices()  # probes CUDA (cuInit); creates no context yet


def configure(runtime: RuntimeConfig):
    """Seed every generator, set the precision policy and return the tf.distribute strategy."""
    quiet_tensorflow()
    import keras
    import tensorflow as tf

    from pipelines import kernels

    kernels.install()

    if runtime.strategy == "multi_worker" and runtime.cluster is not None:
        os.environ["TF_CONFIG"] = json.dumps(
            {
                "cluster": {"worker": runtime.cluster.workers},
                "task": {"type": "worker", "index": runtime.cluster.index},
            }
        )
    if runtime.virtual_cpus:
        split_cpu(runtime.virtual_cpus)
    strategy = make_strategy(runtime)  # first: multi-worker must configure collectives at start-up
    keras.utils.set_random_seed(runtime.seed)
    if runtime.deterministic_ops:
        tf.config.experimental.enable_op_determinism()
    keras.mixed_precision.set_global_policy(resolve_mixed_precision(runtime.mixed_precision))
    return strategy


# /proc/cpuinfo flags of CPUs with bfloat16 arithmetic: Intel AMX (Sapphire Rapids on),
# AVX512-BF16 (Cooper Lake, AMD Zen 4 on). oneDNN runs bfloat16 convolutions and matmuls
# with them; without them bfloat16 is emulated and slower than float32.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags (the first processor's ``flags`` line; empty where the file
    does not exist, as off Linux)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def resolve_mixed_precision(policy: str, cpuinfo: str = "/proc/cpuinfo") -> str:
    """The Keras precision policy ``runtime.mixed_precision`` names: ``auto`` is
    ``mixed_bfloat16`` on a CPU-only machine whose CPU reports AMX-BF16 or AVX512-BF16,
    else ``float32`` (a GPU run picks its precision explicitly); others are themselves."""
    if policy != "auto":
        return policy
    if _has_gpu():
        return "float32"
    return "mixed_bfloat16" if cpu_flags(cpuinfo) & set(BF16_CPU_FLAGS) else "float32"


def _has_gpu() -> bool:
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def split_cpu(n: int) -> None:
    """Expose the CPU as ``n`` logical devices (must run before TensorFlow initialises)."""
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    current = tf.config.get_logical_device_configuration(cpu)
    if current and len(current) == n:
        return
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * n
        )
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
                "runtime.strategy=multi_worker needs a cluster: set TF_CONFIG, give "
                "runtime.cluster, or start the job with `deeptrends launch --workers N CONFIG`."
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
                f"runtime.strategy=tpu: no TPU found ({exc}). "
                "Use auto, default, mirrored or multi_worker here."
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
