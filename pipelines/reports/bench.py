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

    total = 0.0
    for layer in _layers(model):
        if isinstance(layer, keras.layers.Conv2D):
            kh, kw = layer.kernel_size
            cin = layer.input.shape[-1]
            out = layer.output.shape
            total += 2.0 * out[1] * out[2] * out[3] * kh * kw * cin / layer.groups
        elif isinstance(layer, keras.layers.Dense):
            total += 2.0 * layer.input.shape[-1] * layer.units
    return total


def _layers(model):
    import keras

    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _layers(layer)
        else:
            yield layer


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
) -> dict:
    """Run the benchmark; returns (and prints) the results."""
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
    peak = matmul_peak(seconds=peak_seconds)
    printer(f"fp32 matmul peak ({device_name}), before: {peak / 1e9:.1f} GFLOP/s")
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
    peak_after = matmul_peak(
        seconds=peak_seconds
    )  # a busy machine at the start would understate it
    if peak_after > peak:
        for r in results:
            r.train_mfu *= peak / peak_after
            r.infer_mfu *= peak / peak_after
        peak = peak_after
        rows = table_rows()
    printer(f"fp32 matmul peak, the better of before and after: {peak / 1e9:.1f} GFLOP/s")
    print_table(rows, header, printer)
    for name, ratio in ratios.items():
        printer(
            f"{name}: ours / keras.applications = {ratio['train']:.2f} (train), {ratio['infer']:.2f} (inference)"
        )
    report = {
        "device": device_name,
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
