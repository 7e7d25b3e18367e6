"""Quality of Faster R-CNN (and R-CNN) on BCCD and raccoon (issue 14, item 9).

Trains a shipped detection config through the real driver (train -> evaluate -> export
-> register) under a training budget (``task_options.max_train_minutes``, 25 by default),
then serves the 72 BCCD test JPEGs (or raccoon's 40) one at a time through the exported
SavedModel's ``serving_default`` (``image_bytes``): seconds per image and the mAP of the
served detections against the annotations (the same number as the in-process evaluation,
up to the export's tolerance). Prints a summary and writes
``benchmarks/results/detection-<config>[-<tag>].json`` (+ the run's figures beside it).

    flock /tmp/deeptrends-bench.lock nice -n 0 \
        env DEEPTRENDS_DATA_DIR=../shared/datasets .venv/bin/python benchmarks/detection_bccd.py
    python benchmarks/detection_bccd.py --config faster-rcnn-raccoon --minutes 10
    python benchmarks/detection_bccd.py --set model.backbone=vgg16 \
        --set task_options.pretrained=hed --tag hed

Targets (printed, not asserted): BCCD test mAP@0.5 >= 0.60 within 25 minutes of training
on 2 cores; RPN recall at 300 proposals >= selective search's at 2,000 (IoU 0.5); served
inference <= 1 s per 512-px image.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
FIGURES = (
    "eval_detections.png",
    "precision_recall.png",
    "proposal_recall.png",
    "per_class_ap.csv",
    "learning_curves.png",
)


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def busy_processes() -> list[str]:
    """Other processes using a CPU now (``ps``), to say what ran beside the measurement."""
    try:
        out = subprocess.run(
            ["ps", "-eo", "pcpu,etime,args", "--sort=-pcpu"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.splitlines()[1:]
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip()[:160] for line in out if line.strip() and float(line.split()[0]) >= 20.0][
        :8
    ]


def _bytes_request(payload: bytes):
    """A Faster R-CNN request: the encoded image (decoding and resizing are in the graph)."""
    import tensorflow as tf

    return {"image_bytes": tf.constant([payload])}, 0.0


def _proposal_request(config):
    """An R-CNN request as a client makes it: decode the image, resize it as training did
    (``task_options.min_size``/``max_size``), compute its proposals with the config's method
    (uncached: their cost is part of R-CNN's time per image), send both. Returns the
    inputs and the seconds the proposals took."""
    import numpy as np
    import tensorflow as tf

    from data import proposals as props
    from data.detection import scaled_size

    opts = config.task_options
    method = opts.get("proposal_method", "selective_search_fast")
    count = int(opts.get("rcnn_eval_proposals", 500))
    low, high = int(opts.get("min_size", 600)), int(opts.get("max_size", 1000))  # the task's

    def request(payload: bytes):
        import cv2

        image = tf.io.decode_image(payload, channels=3, expand_animations=False).numpy()
        h, w = (int(v) for v in scaled_size(*image.shape[:2], low, high))
        small = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
        start = time.perf_counter()
        boxes = props.compute(small, method, count)
        proposing = time.perf_counter() - start
        padded = np.zeros((1, count, 4), np.float32)
        padded[0, : len(boxes)] = boxes[:count]
        images = tf.constant(image[None].astype(np.float32) / 255.0)
        return {"images": images, "proposals": tf.constant(padded)}, proposing

    return request


def serve_test_images(export_path: str, config, max_images: int | None = None) -> dict:
    """Seconds per image and mAP of the exported ``serving_default`` on the original test
    files, one request per image."""
    import numpy as np
    import tensorflow as tf

    from data.detection import load_detection
    from pipelines.evaluation.detection import DetectionAccumulator

    splits = load_detection(config.data.name, config.data.dir, config.data.options())
    model = tf.saved_model.load(export_path)
    serve = model.signatures["serving_default"]
    records = splits.eval_records[:max_images] if max_images else splits.eval_records
    acc = DetectionAccumulator(list(splits.class_names))
    payloads = [Path(r.path).read_bytes() for r in records]
    takes_proposals = "proposals" in serve.structured_input_signature[1]
    request = _proposal_request(config) if takes_proposals else _bytes_request
    serve(**request(payloads[0])[0])  # warm-up
    seconds, proposal_seconds = [], []
    for record, payload in zip(records, payloads, strict=True):
        start = time.perf_counter()
        inputs, proposing = request(payload)
        out = serve(**inputs)
        out = {k: np.asarray(v) for k, v in out.items()}
        seconds.append(time.perf_counter() - start)
        proposal_seconds.append(proposing)
        n = int(out["num_detections"][0])
        acc.add(
            record.image_id,
            record.height,
            record.width,
            record.boxes,
            record.labels,
            record.difficult,
            out["detection_boxes"][0][:n],
            out["detection_scores"][0][:n],
            out["detection_classes"][0][:n] - 1,
        )
    voc = acc.voc(0.5)
    return {
        "served_inputs": "images + proposals" if takes_proposals else "image_bytes",
        "served_proposal_seconds_per_image": float(np.mean(proposal_seconds)),
        "served_images": len(records),
        "served_seconds_per_image": float(np.mean(seconds)),
        "served_seconds_per_image_median": float(np.median(seconds)),
        "served_image_size": f"{records[0].width}x{records[0].height}" if records else "",
        "served_map": voc["map"],
        "served_ap": {k[3:]: v for k, v in voc.items() if k.startswith("ap/")},
        "served_coco": acc.coco(),
    }


def run(config_name: str, minutes: float, overrides: list[str], workdir: Path, tag: str) -> dict:
    from pipelines.config import load_config
    from pipelines.train import run_experiment

    config = load_config(
        config_name,
        [
            f"task_options.max_train_minutes={minutes}",
            f"runtime.work_dir={workdir / 'runs'}",
            f"export.serving_dir={workdir / 'serving'}",
            f"tracking.uri=sqlite:///{workdir / 'mlflow.db'}",
            "train.verbose=2",
            *overrides,
        ],
    )
    load_before, busy_before = load_average(), busy_processes()
    started = time.time()
    summary = run_experiment(config)
    wall = time.time() - started
    history = json.loads((Path(summary.run_dir) / "artifacts" / "history.json").read_text())
    m = summary.metrics
    result = {
        "config": config_name,
        "overrides": overrides,
        "model": config.model.model_dump(),
        "task_options": config.task_options,
        "budget_minutes": minutes,
        "epochs_configured": config.train.epochs,
        "epochs_trained": len(history.get("loss", [])),
        "final_loss": history.get("loss", [None])[-1],
        "train_seconds": None,
        "wall_seconds": round(wall, 1),
        "metrics": m,
        "run_id": summary.run_id,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "load_average_before": load_before,
        "busy_before": busy_before,
    }
    partial = RESULTS / f"detection-{config_name}{'-' + tag if tag else ''}.partial.json"
    partial.write_text(json.dumps(result, indent=2, default=str) + "\n")  # kept if serving fails
    if summary.export_path:
        result.update(serve_test_images(summary.export_path, config))
    partial.unlink(missing_ok=True)
    result["load_average_after"] = load_average()
    result["busy_after"] = busy_processes()
    recall300 = m.get("rpn/recall300_iou50")
    ss2000 = m.get("selective_search_fast/recall2000_iou50")
    result["checks"] = {
        "map >= 0.60": m.get("map", 0.0) >= 0.60,
        "rpn recall@300 >= selective search recall@2000 (IoU 0.5)": (
            None if recall300 is None or ss2000 is None else recall300 >= ss2000
        ),
        "served seconds per image <= 1": result.get("served_seconds_per_image", 9e9) <= 1.0,
    }
    # the run's figures, for the README
    figures = RESULTS / f"detection-{config_name}{'-' + tag if tag else ''}"
    figures.mkdir(parents=True, exist_ok=True)
    for name in FIGURES:
        src = Path(summary.run_dir) / "artifacts" / name
        if src.exists():
            shutil.copy(src, figures / name)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="faster-rcnn-bccd")
    parser.add_argument("--minutes", type=float, default=25.0, help="training budget")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--tag", default="", help="suffix of the result file")
    parser.add_argument(
        "--keep", action="store_true", help="keep the work folder (runs, export, MLflow)"
    )
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="deeptrends-detection-"))
    try:
        result = run(args.config, args.minutes, args.overrides, workdir, args.tag)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"detection-{args.config}{'-' + args.tag if args.tag else ''}.json"
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    m = result["metrics"]
    print(
        f"\n{args.config}: mAP@0.5 {m.get('map', 0):.3f}  mAP@0.7 {m.get('map_iou70', 0):.3f}  "
        f"COCO AP {m.get('coco_ap', 0):.3f}  epochs {result['epochs_trained']}  "
        f"served {result.get('served_seconds_per_image', float('nan')):.3f} s/image "
        f"(served mAP {result.get('served_map', float('nan')):.3f})"
    )
    print("per class:", {k: round(v, 3) for k, v in m.items() if k.startswith("ap/")})
    print("recall:", {k: round(v, 3) for k, v in m.items() if "recall" in k and "iou50" in k})
    print("checks:", result["checks"])
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
