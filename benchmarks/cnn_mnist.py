"""Quality of the CNNs on MNIST 8,000/2,000 at 32x32 (issue 3, item 5).

Trains ``resnet18-mnist`` and ``vgg11-mnist`` (VGG-11 at half width) through the real
driver (train -> evaluate -> export -> register), each under a 15-minute training budget
(``task_options.max_train_minutes``), and checks the targets: test accuracy >= 0.99 and
the un-augmented training accuracy within 2 points of it. Writes
``benchmarks/results/cnn-mnist-<config>.json`` and prints a summary.

    DEEPTRENDS_DATA_DIR=../shared/datasets python benchmarks/cnn_mnist.py
    python benchmarks/cnn_mnist.py --config resnet18-mnist --minutes 15 --set train.epochs=12
    python benchmarks/cnn_mnist.py --config resnet18-mnist --minutes 60 --tag fp32
    python benchmarks/cnn_mnist.py --config resnet18-mnist --minutes 60 --tag bf16 \
        --set runtime.mixed_precision=mixed_bfloat16   # the float32 vs bfloat16 accuracy

Without the full TFDS ``mnist`` prepared, the data is the official test set split
8,000/2,000 (stratified, seeded), from ``$DEEPTRENDS_DATA_DIR/mnist_test``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = ("resnet18-mnist", "vgg11-mnist")
TARGET_ACCURACY = 0.99
MAX_GAP = 0.02


def run_one(name: str, minutes: float, overrides: list[str], workdir: Path) -> dict:
    from pipelines.config import load_config
    from pipelines.train import run_experiment

    config = load_config(
        name,
        [
            f"task_options.max_train_minutes={minutes}",
            "task_options.evaluate_train=true",
            f"runtime.work_dir={workdir / 'runs'}",
            f"export.serving_dir={workdir / 'serving'}",
            "train.verbose=2",
            *overrides,
        ],
    )
    started = time.time()
    summary = run_experiment(config)
    wall = time.time() - started
    m = summary.metrics
    result = {
        "config": name,
        "overrides": overrides,
        "test_accuracy": m["accuracy"],
        "train_accuracy": m["train_accuracy"],
        "train_eval_gap": m["train_eval_gap"],
        "top5_accuracy": m["top5_accuracy"],
        "wall_seconds": round(wall, 1),
        "budget_minutes": minutes,
        "epochs": config.train.epochs,
        "run_id": summary.run_id,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "checks": {
            f"test_accuracy >= {TARGET_ACCURACY}": m["accuracy"] >= TARGET_ACCURACY,
            f"|train - test| <= {MAX_GAP}": abs(m["train_eval_gap"]) <= MAX_GAP,
        },
    }
    result["passed"] = all(result["checks"].values())
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", action="append", choices=CONFIGS, default=None, help="default: both"
    )
    parser.add_argument(
        "--minutes", type=float, default=15.0, help="training wall-time budget per model"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides"
    )
    parser.add_argument(
        "--tag", default="", help="suffix of the result file (cnn-mnist-<config>[-<tag>].json)"
    )
    parser.add_argument(
        "--workdir", default=None, help="runs, serving and mlflow.db (default: a temp folder)"
    )
    args = parser.parse_args(argv)

    from pipelines.runtime import quiet_tensorflow

    quiet_tensorflow()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="cnn-mnist-"))
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{workdir / 'mlflow.db'}")
    results = []
    for name in args.config or CONFIGS:
        result = run_one(name, args.minutes, args.set, workdir)
        suffix = f"-{args.tag}" if args.tag else ""
        out = ROOT / "benchmarks" / "results" / f"cnn-mnist-{name}{suffix}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        results.append(result)
    print("\n== CNN quality on MNIST 8,000/2,000 at 32x32 ==")
    for r in results:
        print(
            f"{r['config']}: test {r['test_accuracy']:.4f}, train {r['train_accuracy']:.4f} "
            f"(gap {r['train_eval_gap']:+.4f}), {r['wall_seconds'] / 60:.1f} min -> "
            f"{'PASS' if r['passed'] else 'FAIL'} {r['checks']}"
        )
    return 0 if all(r["passed"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
