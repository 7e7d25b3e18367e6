"""``deeptrends bench``: training and inference speed of our ``resnet50`` and ``vgg16``
against ``keras.applications.ResNet50``/``VGG16`` on identical batches, in one process.

For every pair the same random batch is fed to both models, each compiled the same way
(SGD, sparse cross-entropy, same ``jit_compile``); the two are timed alternately, round
after round, so that a machine shared with other work slows both alike, and the best
round is kept. Reported: images/s (train, inference), the ratio ours / keras.applications,
and MFU: achieved FLOP/s (2 x multiply-adds of the convolutions and dense layers, x3 for a
training step) over the machine's measured fp32 matmul peak (the better of a measurement
before and one after the models, so that a busy moment does not understate it).

Our ``resnet50`` is built with ``use_bias=True`` so that both networks hold the same
weights (25,636,712 parameters); ``vgg16`` needs no option.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

from pipelines.io import print_table, write_text_atomic

PAIRS = {
    "resnet50": ({"use_bias": True}, "ResNet50"),
    "vgg16": ({}, "VGG16"),
}


@dataclass
class BenchResult:
    model: str
    implementation: str  # "deeptrends" or "keras.applications"
    params: int
    forward_gflops: float  # per image
    train_images_per_s: float
    infer_images_per_s: float
    train_mfu: float
    infer_mfu: float


def matmul_peak(n: int = 2048, seconds: float = 2.0) -> float:
    """Measured fp32 matmul FLOP/s of the default device: the best of repeated n x n x n
    products (each timed to completion)."""
    import tensorflow as tf

    a = tf.random.stateless_normal((n, n), seed=(1, 2))
    b = tf.random.stateless_normal((n, n), seed=(3, 4))

    @tf.function
    def chain(x, y):
        for _ in range(4):
            x = tf.matmul(x, y) * (1.0 / n)
        return x

    chain(a, b).numpy()  # trace + warm up
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        chain(a, b).numpy()
        dt = time.perf_counter() - t0
        best = max(best, 4 * 2.0 * n**3 / dt)
    return best


def forward_flops(model) -> float:
    """FLOPs (2 x multiply-adds) of one image's forward pass through the model's
    convolutions and dense layers (BatchNorm, activations and pooling left out)."""
    import keras

    from models.layers import leaf_layers

    total = 0.0
    for layer in leaf_layers(model):
        if isinstance(layer, keras.layers.Conv2D):
            kh, kw = layer.kernel_size
            cin = layer.input.shape[-1]
            out = layer.output.shape
            total += 2.0 * out[1] * out[2] * out[3] * kh * kw * cin / layer.groups
        elif isinstance(layer, keras.layers.Dense):
            total += 2.0 * layer.input.shape[-1] * layer.units
    return total


def _builders(name: str, image_size: int, num_classes: int):
    import keras

    import models

    kwargs, app = PAIRS[name]
    shape = (image_size, image_size, 3)

    def ours():
        return models.create_model(name, input_shape=shape, num_classes=num_classes, **kwargs)

    def theirs():
        return getattr(keras.applications, app)(
            weights=None, input_shape=shape, classes=num_classes
        )

    return ours, theirs


class _Timed:
    """A compiled model with its train and inference steps on one fixed batch."""

    def __init__(self, model, x, y, jit_compile: bool):
        import keras
        import tensorflow as tf

        self.model = model
        model.compile(
            optimizer=keras.optimizers.SGD(0.01),
            loss=keras.losses.SparseCategoricalCrossentropy(),
            jit_compile=jit_compile,
        )
        self.x, self.y = x, y
        self.infer_fn = tf.function(lambda t: model(t, training=False), jit_compile=jit_compile)
        self.train_s: list[float] = []
        self.infer_s: list[float] = []

    def warm_up(self) -> None:
        self.model.train_on_batch(self.x, self.y)
        self.infer_fn(self.x).numpy()

    def time_train(self, steps: int) -> None:
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = self.model.train_on_batch(self.x, self.y)
        float(loss if not isinstance(loss, (list, tuple)) else loss[0])  # wait for the last step
        self.train_s.append((time.perf_counter() - t0) / steps)

    def time_infer(self, steps: int) -> None:
        t0 = time.perf_counter()
        for _ in range(steps):
            out = self.infer_fn(self.x)
        out.numpy()
        self.infer_s.append((time.perf_counter() - t0) / steps)


def bench(
    models_to_run: list[str] | None = None,
    image_size: int = 224,
    batch_size: int = 8,
    steps: int = 3,
    rounds: int = 2,
    num_classes: int = 1000,
    jit_compile: bool = False,
    peak_seconds: float = 2.0,
    output_json: str | None = None,
    printer=print,
    precision: str = "float32",
) -> dict:
    """Run the benchmark under the Keras policy ``precision`` (MFU against the matmul peak
    in its compute dtype); returns (and prints) the results."""
    from pipelines import kernels

    kernels.install()
    import keras
    import numpy as np
    import tensorflow as tf

    names = list(models_to_run or PAIRS)
    unknown = [n for n in names if n not in PAIRS]
    if unknown:
        raise ValueError(f"--model {unknown[0]!r}: not benchmarked. Accepted: {', '.join(PAIRS)}")
    for what, value, low in (
        ("--image-size", image_size, 32),
        ("--batch-size", batch_size, 1),
        ("--steps", steps, 1),
        ("--rounds", rounds, 1),
    ):
        if value < low:
            raise ValueError(f"{what} must be >= {low}. Received: {value}")
    device = tf.config.list_logical_devices("GPU")
    device_name = device[0].name if device else "CPU"
    dtype = "bfloat16" if precision == "mixed_bfloat16" else "float32"
    keras.mixed_precision.set_global_policy(precision)
    peak = matmul_peak_of(dtype, seconds=peak_seconds)
    printer(f"{dtype} matmul peak ({device_name}), before: {peak / 1e9:.1f} GFLOP/s")
    rng = np.random.default_rng(0)
    x = tf.constant(rng.uniform(size=(batch_size, image_size, image_size, 3)).astype("float32"))
    y = tf.constant(rng.integers(0, num_classes, size=(batch_size,)))
    results: list[BenchResult] = []
    for name in names:
        ours_fn, theirs_fn = _builders(name, image_size, num_classes)
        timed = {}
        for impl, build in (("deeptrends", ours_fn), ("keras.applications", theirs_fn)):
            keras.utils.set_random_seed(0)
            timed[impl] = _Timed(build(), x, y, jit_compile)
            timed[impl].warm_up()
        for _ in range(rounds):  # alternate, so that background load hits both alike
            for t in timed.values():
                t.time_train(steps)
            for t in timed.values():
                t.time_infer(steps)
        for impl, t in timed.items():
            flops = forward_flops(t.model)
            train_ips = batch_size / min(t.train_s)
            infer_ips = batch_size / min(t.infer_s)
            results.append(
                BenchResult(
                    model=name,
                    implementation=impl,
                    params=int(t.model.count_params()),
                    forward_gflops=flops / 1e9,
                    train_images_per_s=train_ips,
                    infer_images_per_s=infer_ips,
                    train_mfu=3.0 * flops * train_ips / peak,
                    infer_mfu=flops * infer_ips / peak,
                )
            )
        keras.backend.clear_session()
    ratios = {}
    for name in names:
        ours = next(r for r in results if r.model == name and r.implementation == "deeptrends")
        theirs = next(
            r for r in results if r.model == name and r.implementation == "keras.applications"
        )
        ratios[name] = {
            "train": ours.train_images_per_s / theirs.train_images_per_s,
            "infer": ours.infer_images_per_s / theirs.infer_images_per_s,
        }
    header = (
        "model",
        "implementation",
        "params",
        "GFLOP/img",
        "train img/s",
        "infer img/s",
        "train MFU",
        "infer MFU",
    )

    def table_rows():
        return [
            (
                r.model,
                r.implementation,
                f"{r.params:,}",
                f"{r.forward_gflops:.2f}",
                f"{r.train_images_per_s:.2f}",
                f"{r.infer_images_per_s:.2f}",
                f"{r.train_mfu:.1%}",
                f"{r.infer_mfu:.1%}",
            )
            for r in results
        ]

    rows = table_rows()
    peak_after = matmul_peak_of(dtype, seconds=peak_seconds)  # a busy start would understate it
    if peak_after > peak:
        for r in results:
            r.train_mfu *= peak / peak_after
            r.infer_mfu *= peak / peak_after
        peak = peak_after
        rows = table_rows()
    printer(f"{dtype} matmul peak, the better of before and after: {peak / 1e9:.1f} GFLOP/s")
    keras.mixed_precision.set_global_policy("float32")
    print_table(rows, header, printer)
    for name, ratio in ratios.items():
        printer(
            f"{name}: ours / keras.applications = {ratio['train']:.2f} (train), {ratio['infer']:.2f} (inference)"
        )
    report = {
        "device": device_name,
        "precision": precision,
        "matmul_peak_gflops": peak / 1e9,
        "image_size": image_size,
        "batch_size": batch_size,
        "steps": steps,
        "rounds": rounds,
        "jit_compile": jit_compile,
        "results": [asdict(r) for r in results],
        "ratios": ratios,
    }
    if output_json:
        write_text_atomic(output_json, json.dumps(report, indent=2) + "\n")
    return report


# -- every family, through its shipped config ---------------------------------------------
# (family, shipped config, what one element is). Each is built as `deeptrends train` builds
# it: the task's input pipeline, the task's model and its own train/test step (the VAE's,
# the GAN's, DRAW's, Faster R-CNN's, the captioner's), run by the shared loop's step
# functions. Images/s for images, tokens/s (target tokens) for seq2seq.
FAMILIES = {
    "lenet5": ("lenet5-digits", "images"),
    "alexnet": ("alexnet-mnist", "images"),
    "vgg16": ("vgg16-mnist", "images"),
    "googlenet": ("googlenet-mnist", "images"),
    "resnet50": ("resnet50-mnist", "images"),
    "seq2seq": ("nmt-deu-eng", "tokens"),
    "vae": ("vae-mnist", "images"),
    "dcgan": ("dcgan-mnist", "images"),
    "draw": ("draw-mnist", "images"),
    "detection": ("faster-rcnn-bccd", "images"),
    "captioning": ("captioning-flickr8k", "images"),
}
# Trained on cached CNN features (the backbone runs once, before training): the backbone's
# FLOPs would overstate the step's, so no MFU.
NO_FLOPS = frozenset({"captioning"})
PRECISIONS = ("float32", "mixed_bfloat16")


@dataclass
class FamilyResult:
    family: str
    config: str
    precision: str
    unit: str  # what an element is: images or (target) tokens
    batch_size: int
    params: int
    forward_gflops: float | None  # per batch: convolutions and dense layers (None: not counted)
    train_per_s: float
    infer_per_s: float
    input_per_s: float  # the input pipeline alone
    input_over_train: float  # how many times what the train step consumes
    train_mfu: float | None
    infer_mfu: float | None


def matmul_peak_of(dtype: str, n: int = 2048, seconds: float = 1.5) -> float:
    """``matmul_peak`` in ``dtype`` (float32 or bfloat16)."""
    import tensorflow as tf

    a = tf.cast(tf.random.stateless_normal((n, n), seed=(1, 2)), dtype)
    b = tf.cast(tf.random.stateless_normal((n, n), seed=(3, 4)), dtype)

    @tf.function
    def chain(x, y):
        for _ in range(4):
            x = tf.matmul(x, y) * tf.cast(1.0 / n, dtype)
        return x

    chain(a, b).numpy()
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        chain(a, b).numpy()
        best = max(best, 4 * 2.0 * n**3 / (time.perf_counter() - t0))
    return best


def _elements(batch, unit: str) -> int:
    """Images (the leading dimension) or target tokens (non-padding ids) in a batch."""
    import numpy as np
    import tensorflow as tf

    x, y = (batch[0], batch[1]) if isinstance(batch, tuple) and len(batch) >= 2 else (batch, None)
    if unit == "tokens" and y is not None:
        return int(np.count_nonzero(tf.nest.flatten(y)[0].numpy()))
    return int(tf.nest.flatten(x)[0].shape[0])


def _timed(fn, seconds: float) -> tuple[float, int]:
    """Seconds per call of ``fn`` (which returns something to wait on), the best of
    repeated timings over about ``seconds``, and how many calls ran."""
    import tensorflow as tf

    best, calls, start = float("inf"), 0, time.perf_counter()
    while time.perf_counter() - start < seconds or calls < 2:
        t0 = time.perf_counter()
        out = fn()
        tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t, out)
        best = min(best, time.perf_counter() - t0)
        calls += 1
    return best, calls


def _network(model):
    """The network the FLOPs are counted on (a trainer's wrapped network, else the model)."""
    for name in ("network", "captioner", "detector"):
        inner = getattr(model, name, None)
        if inner is not None and hasattr(inner, "layers"):
            return inner
    return model


def build_family(family: str, precision: str, overrides=()):
    """``(config, strategy, inputs, model)`` of a family's shipped config in ``precision``,
    built as ``deeptrends train`` builds them (the global policy is left at ``precision``;
    the caller sets it back)."""
    import keras
    import tensorflow as tf

    from pipelines import runtime
    from pipelines.config import load_config
    from pipelines.tasks.base import RunContext, get_task
    from pipelines.train import build_model

    config = load_config(
        FAMILIES[family][0],
        [f"runtime.mixed_precision={precision}", "tracking.enabled=false", *overrides],
    )
    keras.backend.clear_session()
    keras.mixed_precision.set_global_policy(runtime.resolve_mixed_precision(precision))
    strategy = tf.distribute.get_strategy()
    context = RunContext(config, 1, 0, 0, chief=True, strategy=strategy)
    task = get_task(config.task)(context)
    inputs = task.build_inputs()
    return config, strategy, inputs, build_model(task, inputs, context)


def bench_family(family: str, precision: str, peak: float, seconds: float, overrides=()):
    """One family in one precision: input pipeline alone, train steps, inference steps
    (the fused kernels come with ``pipelines.loop``, imported below)."""
    import keras

    from pipelines import loop

    config_name, unit = FAMILIES[family]
    config, strategy, inputs, model = build_family(family, precision, overrides)

    # the input pipeline alone
    it = iter(inputs.train)
    first = next(it)
    per_batch = _elements(first, unit)
    input_s, _ = _timed(lambda: next(it), seconds / 2)
    # train: the loop's own step function, 1 step per call (the steps read the pipeline)
    loop.build_state(model, strategy, first)
    train_fn, test_fn = loop._step_functions(model, strategy, config.runtime.jit_compile)
    train_it = iter(inputs.train.repeat())
    train_fn(train_it, 1)
    train_s, _ = _timed(lambda: train_fn(train_it, 1), seconds)
    # inference: the task's test step (forward pass, loss and metrics) on a fixed batch
    batch = next(iter(inputs.eval))
    test_fn(batch)
    infer_s, _ = _timed(lambda: test_fn(batch), seconds)
    flops = None
    try:
        counted = (
            forward_flops(_network(model)) * per_batch
            if unit == "images" and family not in NO_FLOPS
            else 0.0
        )
        flops = counted or None
    except (AttributeError, ValueError, TypeError):  # layers without a static shape
        flops = None
    train_rate, infer_rate, input_rate = (
        per_batch / train_s,
        per_batch / infer_s,
        per_batch / input_s,
    )
    result = FamilyResult(
        family=family,
        config=config_name,
        precision=precision,
        unit=unit,
        batch_size=int(config.train.batch_size),
        params=int(model.count_params()),
        forward_gflops=flops / 1e9 if flops else None,
        train_per_s=train_rate,
        infer_per_s=infer_rate,
        input_per_s=input_rate,
        input_over_train=input_rate / train_rate,
        train_mfu=3.0 * flops / train_s / peak if flops else None,
        infer_mfu=flops / infer_s / peak if flops else None,
    )
    keras.mixed_precision.set_global_policy("float32")
    return result


def bench_all(
    families: list[str] | None = None,
    precisions: tuple[str, ...] = PRECISIONS,
    seconds: float = 2.0,
    peers: bool = True,
    peer_image_size: int = 96,
    output_json: str | None = None,
    track: bool = True,
    printer=print,
) -> dict:
    """Every family (its shipped config) in every precision, the keras.applications peers
    (ResNet-50, VGG-16) in the same run, MFU against the matmul peak measured here for each
    precision; results to ``output_json`` and, with ``track``, to MLflow as a bench run.

    The peers run last: after ``bench`` had run in the process, building the image tasks'
    ``tf.data`` pipelines failed (an AutoGraph conversion of ``data/images.py``'s epoch
    function; not investigated yet)."""
    import os
    import platform

    import tensorflow as tf

    from pipelines import runtime

    names = list(families or FAMILIES)
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        raise ValueError(
            f"--family {unknown[0]!r}: not benchmarked. Accepted: {', '.join(FAMILIES)}"
        )
    load_start = os.getloadavg()[0]
    report: dict = {
        "cpu": _cpu_name(),
        "machine": platform.machine(),
        "threads": tf.config.threading.get_intra_op_parallelism_threads() or os.cpu_count(),
        "onednn": runtime.onednn_enabled(),
        "load_average_1m_start": load_start,
        "seconds_per_measurement": seconds,
        "matmul_peak_gflops": {},
        "families": [],
        "peers": [],
        "errors": {},
    }
    for precision in precisions:
        dtype = "bfloat16" if precision == "mixed_bfloat16" else "float32"
        peak = matmul_peak_of(dtype)
        report["matmul_peak_gflops"][precision] = peak / 1e9
        printer(f"{dtype} matmul peak: {peak / 1e9:.1f} GFLOP/s")
        for family in names:
            t0 = time.perf_counter()
            try:
                r = bench_family(family, precision, peak, seconds)
            except Exception as exc:  # a family that cannot run here is reported, not fatal
                report["errors"][f"{family}/{precision}"] = f"{type(exc).__name__}: {exc}"[:500]
                printer(f"{family} ({precision}): failed: {type(exc).__name__}: {exc}")
                continue
            report["families"].append(asdict(r))
            printer(
                f"{family:11s} {precision:15s} train {r.train_per_s:9.1f} {r.unit}/s  "
                f"infer {r.infer_per_s:9.1f}  input {r.input_per_s:9.1f} "
                f"({r.input_over_train:.1f}x train)  MFU "
                + (f"{r.train_mfu:.1%}/{r.infer_mfu:.1%}" if r.train_mfu else "-")
                + f"  [{time.perf_counter() - t0:.0f} s]"
            )
    for precision in precisions if peers else ():  # after every family: see the note below
        peer = bench(
            image_size=peer_image_size,
            batch_size=8,
            steps=2,
            rounds=2,
            peak_seconds=1.0,
            printer=printer,
            precision=precision,
            num_classes=10,
        )
        report["peers"].append(peer)
    report["load_average_1m_end"] = os.getloadavg()[0]
    printer(
        f"load average (1 min): {load_start:.2f} at the start, "
        f"{report['load_average_1m_end']:.2f} at the end"
    )
    if output_json:
        write_text_atomic(output_json, json.dumps(report, indent=2) + "\n")
    if track:
        _track(report, output_json)
    return report


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


def _track(report: dict, output_json: str | None) -> None:
    """One MLflow run in the ``bench`` experiment: a metric per family, precision and
    measurement, the JSON as an artifact."""
    import mlflow

    from pipelines.tracking import mlflow_environment_kept, resolve_uri

    with mlflow_environment_kept():
        mlflow.set_tracking_uri(resolve_uri())
        mlflow.set_experiment("bench")
        _log_bench_run(report, output_json)


def _log_bench_run(report: dict, output_json: str | None) -> None:
    import mlflow

    with mlflow.start_run(run_name="deeptrends bench"):
        mlflow.set_tags({"deeptrends.kind": "bench", "cpu": report["cpu"]})
        mlflow.log_params(
            {
                "seconds_per_measurement": report["seconds_per_measurement"],
                "load_average_1m_start": round(report["load_average_1m_start"], 2),
                "onednn": report.get("onednn"),
            }
        )
        metrics = {f"matmul_peak_gflops.{k}": v for k, v in report["matmul_peak_gflops"].items()}
        for r in report["families"]:
            prefix = f"{r['family']}.{r['precision']}"
            for key in ("train_per_s", "infer_per_s", "input_per_s", "train_mfu", "infer_mfu"):
                if r[key] is not None:
                    metrics[f"{prefix}.{key}"] = float(r[key])
        mlflow.log_metrics(metrics)
        if output_json:
            mlflow.log_artifact(output_json)


def markdown_table(report: dict) -> str:
    """The README's Speed table from a ``bench_all`` JSON report."""
    lines = [
        "| family | precision | batch | train /s | inference /s | input pipeline /s "
        "| train MFU | inference MFU |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in report["families"]:
        unit = "tok" if r["unit"] == "tokens" else "img"
        mfu = (
            (f"{r['train_mfu']:.1%}", f"{r['infer_mfu']:.1%}")
            if r["train_mfu"] is not None
            else ("-", "-")
        )
        lines.append(
            f"| {r['family']} ({r['config']}) | {r['precision']} | {r['batch_size']} "
            f"| {r['train_per_s']:.1f} {unit} | {r['infer_per_s']:.1f} {unit} "
            f"| {r['input_per_s']:.0f} ({r['input_over_train']:.1f}x) | {mfu[0]} | {mfu[1]} |"
        )
    for peer in report.get("peers", []):
        for r in peer["results"]:
            lines.append(
                f"| {r['model']} {peer['image_size']}px, {r['implementation']} "
                f"| {peer['precision']} | {peer['batch_size']} | {r['train_images_per_s']:.1f} img "
                f"| {r['infer_images_per_s']:.1f} img | - | {r['train_mfu']:.1%} "
                f"| {r['infer_mfu']:.1%} |"
            )
    peaks = ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in report["matmul_peak_gflops"].items())
    lines.append("")
    lines.append(
        f"Matmul peak measured in the same run: {peaks}; {report['cpu']}; load average "
        f"{report['load_average_1m_start']:.2f} -> {report['load_average_1m_end']:.2f}."
    )
    return "\n".join(lines)


def comparison_table(before: dict, after: dict, labels: tuple[str, str]) -> str:
    """Train and inference rates of the families two ``bench_all`` reports share (same
    family and precision), with ``after`` / ``before``: e.g. oneDNN off and on."""
    key = lambda r: (r["family"], r["precision"])  # noqa: E731
    old = {key(r): r for r in before["families"]}
    a, b = labels
    lines = [
        f"| family | precision | train /s {a} | train /s {b} | {b} / {a} "
        f"| inference /s {a} | inference /s {b} | {b} / {a} |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in after["families"]:
        o = old.get(key(r))
        if o is None:
            continue
        unit = "tok" if r["unit"] == "tokens" else "img"
        lines.append(
            f"| {r['family']} ({r['config']}) | {r['precision']} "
            f"| {o['train_per_s']:.1f} {unit} | {r['train_per_s']:.1f} {unit} "
            f"| {r['train_per_s'] / o['train_per_s']:.2f}x "
            f"| {o['infer_per_s']:.1f} {unit} | {r['infer_per_s']:.1f} {unit} "
            f"| {r['infer_per_s'] / o['infer_per_s']:.2f}x |"
        )
    return "\n".join(lines)
