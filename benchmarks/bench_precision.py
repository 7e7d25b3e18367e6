"""Where bfloat16 gains and loses on ResNet-50 (ours, from the registry), float32 vs
mixed_bfloat16 in one process, alternating: the matmul peak, inference, the forward pass in
training mode (BatchNorm batch statistics), forward + backward (gradients), and the whole
train step (SGD update of float32 master weights); plus how many Cast ops the bfloat16
train step's graph holds. Each precision is built twice: with our BatchNorm
(``models.layers.FusedBatchNormalization``, TensorFlow's fused kernel) and with Keras'
``BatchNormalization`` (the composite that casts every map to float32 and back under
bfloat16), so what the fused kernel gains shows in the same run.

    flock /tmp/deeptrends-bench.lock nice -n 10 .venv/bin/python benchmarks/bench_precision.py
    ... benchmarks/bench_precision.py --image-size 224 --batch-size 32   # the ImageNet shape

Writes ``benchmarks/results/bench-precision.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines import runtime  # noqa: E402

runtime.quiet_tensorflow()

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import models  # noqa: E402
from pipelines import kernels  # noqa: E402
from pipelines.reports.bench import matmul_peak_of  # noqa: E402

kernels.install()

RESULTS = Path(__file__).resolve().parent / "results"


@contextlib.contextmanager
def batch_norm_class(kind: str):
    """Build with our fused BatchNorm (as shipped) or, for comparison, Keras' own."""
    import models.layers
    import models.resnet

    modules = (models.layers, models.resnet)
    saved = [m.FusedBatchNormalization for m in modules]
    if kind == "keras":
        for m in modules:
            m.FusedBatchNormalization = keras.layers.BatchNormalization
    try:
        yield
    finally:
        for m, cls in zip(modules, saved, strict=True):
            m.FusedBatchNormalization = cls


def parts(policy: str, size: int, batch: int, name: str, batch_norm: str = "fused"):
    keras.mixed_precision.set_global_policy(policy)
    keras.utils.set_random_seed(0)
    with batch_norm_class(batch_norm):
        model = models.create_model(name, input_shape=(size, size, 3), num_classes=10)
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="sparse_categorical_crossentropy")
    keras.mixed_precision.set_global_policy("float32")
    rng = np.random.default_rng(0)
    x = tf.constant(rng.uniform(size=(batch, size, size, 3)).astype("float32"))
    y = tf.constant(rng.integers(0, 10, size=(batch,)))
    loss_fn = keras.losses.SparseCategoricalCrossentropy()

    @tf.function
    def infer():
        return model(x, training=False)

    @tf.function
    def forward_train():
        return model(x, training=True)

    @tf.function
    def gradients():
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        return tape.gradient(loss, model.trainable_variables)[0]

    @tf.function
    def step():
        return model.train_step((x, y))["loss"]

    model.optimizer.build(model.trainable_variables)
    fns = {"infer": infer, "forward_train": forward_train, "gradients": gradients, "step": step}
    graph = step.get_concrete_function().graph.as_graph_def()
    ops = [n.op for n in graph.node]
    for f in graph.library.function:
        ops += [n.op for n in f.node_def]
    casts = ops.count("Cast")
    return fns, casts, len(ops)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-norm", choices=("fused", "keras", "both"), default="both")
    parser.add_argument("--output", default=str(RESULTS / "bench-precision.json"))
    args = parser.parse_args(argv)
    load = os.getloadavg()[0]
    peaks = {p: matmul_peak_of(p) / 1e9 for p in ("float32", "bfloat16")}
    print(f"matmul peak: float32 {peaks['float32']:.0f}, bfloat16 {peaks['bfloat16']:.0f} GFLOP/s")
    kinds = ("fused", "keras") if args.batch_norm == "both" else (args.batch_norm,)
    variants = [(p, k) for k in kinds for p in ("float32", "mixed_bfloat16")]
    built = {
        f"{p}/{k}": parts(p, args.image_size, args.batch_size, args.model, k) for p, k in variants
    }
    for fns, _, _ in built.values():
        for f in fns.values():
            tf.nest.map_structure(lambda t: t.numpy(), f())
    names = list(built)
    part_names = list(built[names[0]][0])
    best = {v: {k: float("inf") for k in part_names} for v in names}
    for _ in range(args.rounds):
        for part in part_names:
            for v in names:
                t0 = time.perf_counter()
                tf.nest.map_structure(lambda t: t.numpy(), built[v][0][part]())
                best[v][part] = min(best[v][part], time.perf_counter() - t0)
    speedups = {
        f"bf16 vs fp32 ({k} BN)": {
            part: best[f"float32/{k}"][part] / best[f"mixed_bfloat16/{k}"][part]
            for part in part_names
        }
        for k in kinds
    }
    if len(kinds) == 2:
        for p in ("float32", "mixed_bfloat16"):
            speedups[f"fused vs keras BN ({p})"] = {
                part: best[f"{p}/keras"][part] / best[f"{p}/fused"][part] for part in part_names
            }
    report = {
        "model": args.model,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "matmul_peak_gflops": peaks,
        "seconds": best,
        "speedups": speedups,
        "casts_in_step": {v: built[v][1] for v in names},
        "ops_in_step": {v: built[v][2] for v in names},
        "load_average_1m": [load, os.getloadavg()[0]],
    }
    print(f"matmul bf16/fp32: {peaks['bfloat16'] / peaks['float32']:.2f}x")
    print(f"{args.model} {args.image_size}px batch {args.batch_size}, best of {args.rounds}, ms:")
    for v in names:
        cells = "  ".join(f"{part} {best[v][part] * 1e3:8.1f}" for part in part_names)
        print(f"  {v:22s} {cells}  (Cast ops in the step: {built[v][1]} of {built[v][2]})")
    for label, ratios in speedups.items():
        cells = "  ".join(f"{part} {r:.2f}x" for part, r in ratios.items())
        print(f"  {label:30s} {cells}")
    print(f"load average (1 min): {load:.2f} -> {os.getloadavg()[0]:.2f}")
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
