"""Per-step cost of the shared training loop against Keras ``Model.fit`` and a hand-written
``tf.function`` train step, on LeNet-5 (32x32x1, Adam, sparse cross-entropy + accuracy), in
one process: the implementations alternate, round after round, and the median round of each
is reported (ms/step), with the median of the per-round ratios to Keras ``fit`` and to the
hand-written step, so that background load hits all of them alike.

    flock /tmp/deeptrends-bench.lock nice -n 10 .venv/bin/python benchmarks/bench_loop.py

Every implementation reads the same repeated ``tf.data`` pipeline of in-memory batches
(prefetched), so only the loop differs. ``--steps-per-execution`` adds the loop and Keras
``fit`` with N steps per ``tf.function`` call. Writes ``benchmarks/results/bench-loop.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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
from pipelines import loop  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


class _EpochClock(keras.callbacks.Callback):
    """Seconds of the last epoch (its logs are Python floats at ``on_epoch_end``: every
    step has finished). Epoch hooks only: a batch hook would make Keras wait on each step."""

    def __init__(self):
        super().__init__()
        self.seconds = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._t0 = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds = time.perf_counter() - self._t0


def make_model(seed: int = 0):
    keras.utils.set_random_seed(seed)
    model = models.create_model("lenet5", input_shape=(32, 32, 1), num_classes=10)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(),
        metrics=["accuracy"],
    )
    return model


def dataset(batch: int):
    rng = np.random.default_rng(0)
    n = batch * 16
    x = rng.uniform(size=(n, 32, 32, 1)).astype("float32")
    y = rng.integers(0, 10, size=(n,)).astype("int32")
    return (
        tf.data.Dataset.from_tensor_slices((x, y))
        .batch(batch, drop_remainder=True)
        .cache()
        .repeat()
        .prefetch(tf.data.AUTOTUNE)
    )


class LoopRunner:
    def __init__(self, batch: int, steps: int, spe: int = 1):
        self.model, self.ds, self.steps, self.spe = make_model(), dataset(batch), steps, spe
        self.strategy = tf.distribute.get_strategy()

    def run(self) -> float:
        """Seconds of a steady-state epoch (the second of a fit call)."""
        clock = _EpochClock()
        extra = {"steps_per_execution": self.spe} if self.spe > 1 else {}
        loop.fit(
            self.model,
            self.strategy,
            self.ds,
            epochs=2,
            steps_per_epoch=self.steps,
            verbose=0,
            callbacks=[clock],
            **extra,
        )
        return clock.seconds


class KerasRunner:
    def __init__(self, batch: int, steps: int, spe: int = 1):
        self.model, self.ds, self.steps = make_model(), dataset(batch), steps
        if spe > 1:
            self.model.compile(
                optimizer=keras.optimizers.Adam(1e-3),
                loss=keras.losses.SparseCategoricalCrossentropy(),
                metrics=["accuracy"],
                steps_per_execution=spe,
            )

    def run(self) -> float:
        clock = _EpochClock()
        self.model.fit(self.ds, epochs=2, steps_per_epoch=self.steps, verbose=0, callbacks=[clock])
        return clock.seconds


class HandRunner:
    """The least a Keras-3 training step can be: loss, gradients, Adam update, accuracy."""

    def __init__(self, batch: int, steps: int, spe: int = 1):
        self.model, self.steps = make_model(), steps
        self.it = iter(dataset(batch))
        model = self.model
        opt = model.optimizer
        opt.build(model.trainable_variables)
        loss_fn = keras.losses.SparseCategoricalCrossentropy()
        acc = keras.metrics.SparseCategoricalAccuracy()

        @tf.function
        def step(it):
            x, y = next(it)
            with tf.GradientTape() as tape:
                pred = model(x, training=True)
                loss = loss_fn(y, pred)
            grads = tape.gradient(loss, model.trainable_variables)
            opt.apply(grads, model.trainable_variables)
            acc.update_state(y, pred)
            return loss

        self.step = step

    def run(self) -> float:
        t0 = time.perf_counter()
        for _ in range(self.steps):
            loss = self.step(self.it)
        float(loss)
        return time.perf_counter() - t0


def paired_ratios(times: dict[str, list[float]], ref: str) -> dict[str, float]:
    """Each implementation's median over rounds of its time / ``ref``'s time in the same
    round: the implementations of one round run back to back, so a slow spell of the
    machine (the rounds here spread by +-30 %) cancels out of the ratio."""
    return {
        k: statistics.median(a / b for a, b in zip(v, times[ref], strict=True))
        for k, v in times.items()
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--steps", type=int, default=60, help="steps per timed epoch")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps-per-execution", type=int, default=10)
    parser.add_argument("--output", default=str(RESULTS / "bench-loop.json"))
    args = parser.parse_args(argv)
    report = {"load_average_1m_start": os.getloadavg()[0], "rounds": args.rounds, "batches": {}}
    for batch in args.batch_sizes:
        runners = {
            "loop.fit": LoopRunner(batch, args.steps),
            "keras.fit": KerasRunner(batch, args.steps),
            "hand-written step": HandRunner(batch, args.steps),
        }
        if args.steps_per_execution > 1:
            n = args.steps_per_execution
            runners[f"loop.fit spe={n}"] = LoopRunner(batch, args.steps, n)
            runners[f"keras.fit spe={n}"] = KerasRunner(batch, args.steps, n)
        for r in runners.values():  # trace + warm up
            r.run()
        times: dict[str, list[float]] = {k: [] for k in runners}
        for _ in range(args.rounds):
            for name, r in runners.items():
                times[name].append(r.run() / args.steps * 1e3)
        med = {k: statistics.median(v) for k, v in times.items()}
        paired = {ref: paired_ratios(times, ref) for ref in ("keras.fit", "hand-written step")}
        report["batches"][str(batch)] = {
            "median_ms_per_step": med,
            "median_paired_ratio": paired,
            "all_ms_per_step": times,
        }
        print(f"batch {batch} (median of {args.rounds} rounds, ms/step; median per-round ratio):")
        for k, v in med.items():
            print(
                f"  {k:24s} {v:7.2f}  {paired['keras.fit'][k]:.2f}x keras.fit  "
                f"{paired['hand-written step'][k]:.2f}x hand-written"
            )
    report["load_average_1m_end"] = os.getloadavg()[0]
    print(
        f"load average (1 min): {report['load_average_1m_start']:.2f} -> "
        f"{report['load_average_1m_end']:.2f}"
    )
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
