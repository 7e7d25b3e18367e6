"""Benchmark: captioning quality on the 125 official Flickr8k test images (not a test).

Trains a captioning config (default ``captioning-flickr8k``) through the normal pipeline
(``run_experiment``: MLflow run, evaluation, export, registry) with a wall-clock training
budget (``task_options.max_train_minutes``; the blind language model of the same run gets
the same budget), then reports BLEU-1..4, METEOR, ROUGE-L and CIDEr-D of the captioner,
its greedy decoding and both baselines, the bootstrap intervals, the checks of issue 15
and the exported ``serving_default`` latency (image bytes -> caption, batch 1, the
config's beam):

- bar: CIDEr-D above the blind LM's with the paired 95 % interval of the difference above
  0, and a lower per-word validation loss than the blind LM's;
- target: BLEU-4 >= 0.10 and CIDEr-D >= 0.25; latency <= 0.5 s per image.

The machine's load average is sampled during the run (other jobs beside it show there).
Hold the shared lock so measurements do not overlap::

    DEEPTRENDS_DATA_DIR=../shared/datasets flock /tmp/deeptrends-bench.lock \\
        python benchmarks/captioning_flickr8k.py --minutes 30 --tag soft [--set k=v ...]

Results: ``benchmarks/results/captioning-<tag>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


class LoadSampler(threading.Thread):
    """The 1-minute load average every ``every`` seconds while the benchmark runs."""

    def __init__(self, every: float = 30.0):
        super().__init__(daemon=True)
        self.every, self.samples, self.stop = every, [], threading.Event()

    def run(self):
        while not self.stop.wait(self.every):
            self.samples.append(round(os.getloadavg()[0], 2))


def serving_latency(export_path: str, data_path: Path, count: int = 20) -> dict:
    """Median seconds per image of the exported ``serving_default`` (batch 1) on the first
    ``count`` official test images' JPEG bytes, after one warm-up call."""
    import numpy as np
    import tensorflow as tf

    listed = (data_path / "splits" / "Flickr_8k.testImages.txt").read_text().split()
    files = [data_path / "images" / name for name in listed[:count]]
    served = tf.saved_model.load(export_path).signatures["serving_default"]
    served(image_bytes=tf.constant([files[0].read_bytes()]))
    seconds, captions = [], []
    for path in files:
        data = tf.constant([path.read_bytes()])
        started = time.perf_counter()
        out = served(image_bytes=data)
        captions.append(out["captions"].numpy()[0].decode())
        seconds.append(time.perf_counter() - started)
    return {
        "serving_seconds_per_image_median": round(float(np.median(seconds)), 3),
        "serving_seconds_per_image_max": round(float(np.max(seconds)), 3),
        "serving_images": len(files),
        "serving_examples": dict(zip([p.name for p in files[:5]], captions[:5], strict=False)),
    }


def checks(metrics: dict, latency: dict) -> dict:
    out = {}
    if "blind_cider" in metrics:
        out["bar_cider_above_blind"] = metrics["cider"] > metrics["blind_cider"]
        out["bar_cider_difference_interval_above_0"] = metrics["cider_vs_blind_low"] > 0
        out["bar_val_loss_below_blind"] = metrics["loss"] < metrics["blind_loss"]
        out["bar_met"] = all(out.values())
    out["target_bleu_4_0.10"] = metrics["bleu_4"] >= 0.10
    out["target_cider_0.25"] = metrics["cider"] >= 0.25
    if latency:
        out["target_latency_0.5s"] = latency["serving_seconds_per_image_median"] <= 0.5
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="captioning-flickr8k")
    parser.add_argument("--minutes", type=float, default=30.0, help="training budget (wall clock)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--tag", default=None, help="names the result file")
    parser.add_argument("--work-dir", default="/tmp/deeptrends-bench-captioning")
    parser.add_argument("--cache-dir", default=None, help="default <work-dir>/feature_cache")
    parser.add_argument("--latency-images", type=int, default=20)
    args = parser.parse_args(argv)

    from pipelines.runtime import quiet_tensorflow

    quiet_tensorflow()
    from pipelines.config import load_config
    from pipelines.train import run_experiment

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    sets = [
        f"runtime.work_dir={work / 'runs'}",
        f"export.serving_dir={work / 'serving'}",
        f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
        f"task_options.cache_dir={args.cache_dir or work / 'feature_cache'}",
        f"task_options.max_train_minutes={args.minutes}",
        *args.set,
    ]
    config = load_config(args.config, sets)
    sampler = LoadSampler()
    sampler.start()
    started = time.time()
    summary = run_experiment(config)
    total = time.time() - started
    sampler.stop.set()
    metrics = dict(summary.metrics)
    history = json.loads((Path(summary.run_dir) / "artifacts" / "history.json").read_text())
    intervals = json.loads(
        (Path(summary.run_dir) / "artifacts" / "caption_metrics.json").read_text()
    )
    latency = {}
    data_path = Path(config.data.options().get("path") or "")
    if not data_path.name:
        data_path = Path(os.environ.get("DEEPTRENDS_DATA_DIR", "")) / "flickr8k_1k"
    if summary.export_path and (data_path / "splits").is_dir():
        latency = serving_latency(summary.export_path, data_path, args.latency_images)
    result = {
        "config": args.config,
        "overrides": args.set,
        "budget_minutes": args.minutes,
        "total_seconds": round(total, 1),
        "epochs_done": len(history.get("loss", [])),
        "val_loss_per_epoch": [round(v, 4) for v in history.get("val_loss", [])],
        "load_average_1min": {
            "samples": len(sampler.samples),
            "mean": round(sum(sampler.samples) / max(1, len(sampler.samples)), 2),
            "max": max(sampler.samples, default=0.0),
        },
        "cpus": os.cpu_count(),
        "metrics": metrics,
        "intervals_95": intervals["intervals_95"],
        "notes": intervals.get("notes", {}),
        **latency,
        "checks": checks(metrics, latency),
        "run_id": summary.run_id,
        "run_dir": summary.run_dir,
    }
    text = json.dumps(result, indent=2)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    tag = args.tag or config.name
    (RESULTS / f"captioning-{tag}.json").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
