"""Where bfloat16 gains and loses on ResNet-50 (ours, from the registry), float32 vs
mixed_bfloat16 in one process, alternating: the matmul peak, inference, the forward pass in
training mode (BatchNorm batch statistics), forward + backward (gradients), and the whole
train step (SGD update of float32 master weights); plus how many Cast ops the bfloat16
train step's graph holds.

    flock /tmp/deeptrends-bench.lock nice -n 10 .venv/bin/python benchmarks/bench_precision.py

Writes ``benchmarks/results/bench-precision.json``.
"""

from __future__ import annotations

import argparse
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
from pipelines.reports.bench import matmul_peak_of  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def parts(policy: str, size: int, batch: int, name: str):
    keras.mixed_precision.set_global_policy(policy)
    keras.utils.set_random_seed(0)
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
    parser.add_argument("--output", default=str(RESULTS / "bench-precision.json"))
    args = parser.parse_args(argv)
    load = os.getloadavg()[0]
    peaks = {p: matmul_peak_of(p) / 1e9 for p in ("float32", "bfloat16")}
    print(f"matmul peak: float32 {peaks['float32']:.0f}, bfloat16 {peaks['bfloat16']:.0f} GFLOP/s")
    built = {
        p: parts(p, args.image_size, args.batch_size, args.model)
        for p in ("float32", "mixed_bfloat16")
    }
    for fns, _, _ in built.values():
        for f in fns.values():
            tf.nest.map_structure(lambda t: t.numpy(), f())
    best = {p: {k: float("inf") for k in built[p][0]} for p in built}
    for _ in range(args.rounds):
        for part in built["float32"][0]:
            for p, (fns, _, _) in built.items():
                t0 = time.perf_counter()
                tf.nest.map_structure(lambda t: t.numpy(), fns[part]())
                best[p][part] = min(best[p][part], time.perf_counter() - t0)
    report = {
        "model": args.model,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "matmul_peak_gflops": peaks,
        "seconds": best,
        "bf16_speedup": {
            k: best["float32"][k] / best["mixed_bfloat16"][k] for k in best["float32"]
        },
        "casts_in_bf16_step": built["mixed_bfloat16"][1],
        "ops_in_bf16_step": built["mixed_bfloat16"][2],
        "casts_in_fp32_step": built["float32"][1],
        "load_average_1m": [load, os.getloadavg()[0]],
    }
    print(f"matmul bf16/fp32: {peaks['bfloat16'] / peaks['float32']:.2f}x")
    for k, v in report["bf16_speedup"].items():
        print(
            f"  {k:14s} fp32 {best['float32'][k] * 1e3:8.1f} ms  bf16 "
            f"{best['mixed_bfloat16'][k] * 1e3:8.1f} ms  -> {v:.2f}x"
        )
    print(
        f"Cast ops in the bf16 train step: {report['casts_in_bf16_step']} of "
        f"{report['ops_in_bf16_step']} (fp32: {report['casts_in_fp32_step']})"
    )
    print(f"load average (1 min): {load:.2f} -> {os.getloadavg()[0]:.2f}")
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
