"""``export.precision: bfloat16`` against the float32 export of ResNet-50 (ours, from the
registry) at 224x224x3, batch 32: both written by the classification task's exporter,
reloaded with ``tf.saved_model.load`` and timed through ``serving_default`` in one
process, implementations alternating, the median of the rounds kept; with the matmul peak
of each precision measured in the same run, and two diagnostic exports that separate the
two changes the bfloat16 export makes (float32 with BatchNorm folded; bfloat16 without
folding). The ops of each serving graph are counted by dtype (Cast ops included).

Top-1 agreement is measured on a real eval split: ``resnet50-mnist`` (shipped; 2,000 MNIST
test images at 32x32) trained briefly by the pipeline with ``export.precision=bfloat16``,
whose publication gate compares the reloaded bfloat16 export with the float32 network.

    flock /tmp/deeptrends-bench.lock nice -n 19 .venv/bin/python benchmarks/bench_export_precision.py --part speed
    nice -n 19 .venv/bin/python benchmarks/bench_export_precision.py --part agreement  # times nothing

Writes (updates the part in) ``benchmarks/results/bench-export-precision.json``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines import runtime  # noqa: E402

runtime.quiet_tensorflow()

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import models  # noqa: E402
from pipelines.config import load_config, validate_config  # noqa: E402
from pipelines.reports.bench import matmul_peak_of  # noqa: E402
from pipelines.serving.export import write_saved_model  # noqa: E402
from pipelines.serving.precision import AGREEMENT_METRIC, inference_copy  # noqa: E402
from pipelines.serving.signatures import image_classifier_endpoints  # noqa: E402
from pipelines.tasks.base import RunContext, get_task  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DT = {1: "float32", 14: "bfloat16", 3: "int32", 9: "int64", 7: "string", 10: "bool"}


def op_counts(signature) -> dict:
    """Ops of a signature's graph (its function library included): Cast ops, and the
    convolution/matmul/elementwise ops by the dtype they compute in."""
    graph = signature.graph.as_graph_def()
    nodes = list(graph.node)
    for f in graph.library.function:
        nodes += list(f.node_def)
    by = collections.Counter()
    for n in nodes:
        if n.op in ("Const", "NoOp", "Identity", "Placeholder", "ReadVariableOp"):
            continue
        if n.op == "Cast":
            src, dst = DT.get(n.attr["SrcT"].type, "?"), DT.get(n.attr["DstT"].type, "?")
            by[f"Cast {src}->{dst}"] += 1
        elif "T" in n.attr and n.attr["T"].type in (1, 14):
            by[f"{n.op} {DT[n.attr['T'].type]}"] += 1
    return dict(sorted(by.items()))


def export_variants(size: int, root: Path) -> dict:
    """The shipped float32 and bfloat16 exports of one ResNet-50, and the diagnostics."""
    keras.utils.set_random_seed(0)
    network = models.create_model("resnet50", input_shape=(size, size, 3), num_classes=1000)
    info_cls = get_task("classification").Info
    info = info_cls(
        image_shape=[size, size, 3],
        raw_shape=[size, size, 3],
        num_classes=1000,
        preprocessing={"crop_fraction": 1.0},
    )
    out = {}
    for precision in ("float32", "bfloat16"):  # the task's own serving, as a run exports
        config = validate_config(
            {"name": "bench", "model": {"name": "resnet50"}, "export": {"precision": precision}}
        )
        serving = get_task("classification")(RunContext(config)).serving(network, info)
        out[precision] = (serving.network, serving.endpoints)
    for name, precision, fold in (
        ("float32_folded", "float32", True),
        ("bfloat16_bn", "bfloat16", False),
    ):
        copy, _ = inference_copy(network, precision, fold_batch_norm=fold)
        out[name] = (copy, image_classifier_endpoints(copy, info))
    loaded = {}
    for name, (model, endpoints) in out.items():
        result = write_saved_model(
            model, endpoints, root / name, model_name=name, warmup_requests=0, traced=True
        )
        loaded[name] = tf.saved_model.load(str(result.path)).signatures["serving_default"]
    return loaded


def time_inference(signatures: dict, batch: int, size: int, rounds: int, calls: int) -> dict:
    x = tf.constant(np.random.default_rng(0).uniform(size=(batch, size, size, 3)), tf.float32)
    for fn in signatures.values():  # warm up (first calls pick kernels)
        fn(images=x)["classes"].numpy()
        fn(images=x)["classes"].numpy()
    per_round = {name: [] for name in signatures}
    for _ in range(rounds):
        for name, fn in signatures.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                out = fn(images=x)
            out["classes"].numpy()
            per_round[name].append(batch * calls / (time.perf_counter() - t0))
    return per_round


def agreement_run(epochs: int, steps: int, root: Path) -> dict:
    from pipelines.train import run_experiment

    config = load_config(
        "resnet50-mnist",
        [
            f"train.epochs={epochs}",
            f"train.steps_per_epoch={steps}",
            "train.verbose=0",
            "export.precision=bfloat16",
            f"tracking.uri=sqlite:///{root / 'mlflow.db'}",
            f"runtime.work_dir={root / 'runs'}",
            f"export.serving_dir={root / 'serving'}",
        ],
    )
    old = Path.cwd()
    os.chdir(root)  # MLflow's artifact folder lands beside the temporary store
    try:
        summary = run_experiment(config)
    finally:
        os.chdir(old)
    meta = json.loads(
        (Path(summary.export_path) / "assets.extra/deeptrends_export.json").read_text()
    )
    return {
        "config": "resnet50-mnist",
        "overrides": f"train.epochs={epochs} train.steps_per_epoch={steps}",
        "eval_accuracy": summary.metrics["accuracy"],
        "top1_agreement": summary.metrics[AGREEMENT_METRIC],
        "images": meta["agreement_images"],
        "folded_batch_norm": meta["folded_batch_norm"],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=2, help="signature calls per round")
    parser.add_argument("--agreement-epochs", type=int, default=2)
    parser.add_argument("--agreement-steps", type=int, default=60)
    parser.add_argument("--part", choices=["all", "speed", "agreement"], default="all")
    parser.add_argument("--output", default=str(RESULTS / "bench-export-precision.json"))
    args = parser.parse_args(argv)
    output = Path(args.output)
    report = {}
    if args.part in ("all", "agreement"):
        with tempfile.TemporaryDirectory() as tmp:
            load = [os.getloadavg()[0]]
            report["agreement"] = agreement_run(
                args.agreement_epochs, args.agreement_steps, Path(tmp)
            )
            report["agreement"]["load_average_1m"] = [*load, os.getloadavg()[0]]
        a = report["agreement"]
        print(
            f"top-1 agreement on {a['images']} eval images of resnet50-mnist "
            f"(accuracy {a['eval_accuracy']:.4f}): {a['top1_agreement']:.4%}"
        )
    if args.part in ("all", "speed"):
        report.update(speed(args))
    if args.part != "all" and output.exists():  # the other part's figures stay
        report = {**json.loads(output.read_text()), **report}
    output.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def speed(args) -> dict:
    load = [os.getloadavg()[0]]
    peaks = {p: matmul_peak_of(p) / 1e9 for p in ("float32", "bfloat16")}
    print(f"matmul peak: float32 {peaks['float32']:.0f}, bfloat16 {peaks['bfloat16']:.0f} GFLOP/s")
    with tempfile.TemporaryDirectory() as tmp:
        signatures = export_variants(args.image_size, Path(tmp))
        ops = {name: op_counts(fn) for name, fn in signatures.items()}
        load.append(os.getloadavg()[0])
        rates = time_inference(
            signatures, args.batch_size, args.image_size, args.rounds, args.calls
        )
        load.append(os.getloadavg()[0])
        median = {name: statistics.median(r) for name, r in rates.items()}
    report = {
        "model": "resnet50 (deeptrends registry), 1000 classes",
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "calls_per_round": args.calls,
        "matmul_peak_gflops": peaks,
        "matmul_bf16_over_fp32": peaks["bfloat16"] / peaks["float32"],
        "infer_images_per_s_median": median,
        "infer_images_per_s_rounds": rates,
        "bf16_export_over_fp32_export": median["bfloat16"] / median["float32"],
        "diagnostics": {
            "bf16_without_bn_folding_over_fp32": median["bfloat16_bn"] / median["float32"],
            "fp32_folded_over_fp32": median["float32_folded"] / median["float32"],
            "bf16_over_fp32_both_folded": median["bfloat16"] / median["float32_folded"],
        },
        "serving_graph_ops": ops,
        "load_average_1m": load,
        "cpu_bf16_flags": sorted(runtime.cpu_flags() & {"avx512_bf16", "amx_bf16", "amx_tile"}),
    }
    print(f"matmul bf16/fp32: {report['matmul_bf16_over_fp32']:.2f}x")
    for name, rate in median.items():
        print(f"  {name:16s} {rate:7.1f} images/s  ({rate / median['float32']:.2f}x float32)")
    print(f"bfloat16 export / float32 export: {report['bf16_export_over_fp32_export']:.2f}x")
    for name, counts in ops.items():
        casts = sum(v for k, v in counts.items() if k.startswith("Cast"))
        print(f"  {name:16s} casts {casts:3d}  {counts}")
    print(f"load average (1 min): {' -> '.join(f'{v:.2f}' for v in load)}")
    return report


if __name__ == "__main__":
    raise SystemExit(main())
