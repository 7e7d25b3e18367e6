"""What TensorFlow's ``LRN`` kernel buys the families with local response normalisation
(AlexNet, GoogLeNet): each family's shipped config, benched as ``deeptrends bench`` benches it
(the loop's train step, the test step on a fixed batch), with
``models.layers.LocalResponseNormalization`` computed by the layer's own composite of Keras ops
and by the registered ``LRN`` / ``LRNGrad`` kernel, alternating round after round in one
process; medians of the rounds and of the per-round ratios.

    DEEPTRENDS_DATA_DIR=../shared/datasets flock /tmp/deeptrends-bench.lock nice -n 5 \\
        .venv/bin/python benchmarks/bench_lrn.py [--family alexnet] [--rounds 3] [--seconds 1.5]

Writes ``benchmarks/results/bench-lrn.json`` (``--output`` to choose).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines import runtime  # noqa: E402

runtime.quiet_tensorflow()

import models.layers  # noqa: E402
from pipelines import kernels  # noqa: E402
from pipelines.io import write_text_atomic  # noqa: E402
from pipelines.reports.bench import _cpu_name, bench_family, matmul_peak_of  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
FAMILIES = ("alexnet", "googlenet")  # the families whose networks hold LRN layers
MODES = ("composite", "kernel")


def _set_mode(mode: str) -> None:
    kernels.install()
    if mode == "composite":
        models.layers._KERNELS.pop(("lrn", "tensorflow"), None)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", action="append", choices=FAMILIES)
    parser.add_argument("--precision", default="float32", choices=("float32", "mixed_bfloat16"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=1.5, help="per measurement")
    parser.add_argument("--output")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.seconds <= 0:
        parser.error("--rounds must be >= 1 and --seconds > 0")
    start = os.getloadavg()[0]
    peak = matmul_peak_of("bfloat16" if args.precision == "mixed_bfloat16" else "float32")
    report: dict = {
        "cpu": _cpu_name(),
        "onednn": runtime.onednn_enabled(),
        "precision": args.precision,
        "rounds": args.rounds,
        "seconds_per_measurement": args.seconds,
        "families": {},
    }
    for family in args.family or FAMILIES:
        rates = {m: {"train_per_s": [], "infer_per_s": []} for m in MODES}
        for _ in range(args.rounds):
            for mode in MODES:
                _set_mode(mode)
                result = bench_family(family, args.precision, peak, args.seconds)
                rates[mode]["train_per_s"].append(result.train_per_s)
                rates[mode]["infer_per_s"].append(result.infer_per_s)
        entry = {"config": result.config, "batch_size": result.batch_size, "rounds": rates}
        for key in ("train_per_s", "infer_per_s"):
            pairs = zip(rates["kernel"][key], rates["composite"][key], strict=True)
            entry[key] = {m: statistics.median(rates[m][key]) for m in MODES}
            entry[key]["kernel_over_composite"] = statistics.median(k / c for k, c in pairs)
        report["families"][family] = entry
        print(
            f"{family} ({result.config}), {args.precision}, batch {result.batch_size}, "
            f"images/s (median of {args.rounds} rounds):"
        )
        for key, label in (("train_per_s", "train"), ("infer_per_s", "inference")):
            r = entry[key]
            print(
                f"  {label:9s} composite {r['composite']:8.1f}  kernel {r['kernel']:8.1f}  "
                f"kernel / composite {r['kernel_over_composite']:.2f}x"
            )
    _set_mode("kernel")
    report["load_average_1m"] = [start, os.getloadavg()[0]]
    print(f"load average (1 min): {start:.2f} -> {report['load_average_1m'][1]:.2f}")
    out = Path(args.output or RESULTS / "bench-lrn.json")
    write_text_atomic(out, json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
