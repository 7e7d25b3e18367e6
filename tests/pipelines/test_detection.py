"""The detection task: mAP against a hand computation and pycocotools, proposal recall,
bad detection configs, and (in a subprocess: devices are fixed at start-up) a tiny
Faster R-CNN that trains two steps under ``mirrored`` on 2 virtual CPUs, resumes exactly
from a checkpoint, and exports ``image_bytes`` signatures that reproduce the in-process
detector; R-CNN the same on one device with its ``images`` + ``proposals`` export.

Run as ``python tests/pipelines/test_detection.py mirrored OUT_DIR`` this module is the
subprocess: it writes ``OUT_DIR/result.json``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from pipelines.config import ConfigError, validate_config  # noqa: E402
from pipelines.evaluation import detection as ev  # noqa: E402

# ----------------------------------------------------------------------- metrics


def _fixture_accumulator():
    """Two images, one class ``a`` (and ``b`` with one box). Image 1: gt boxes A1, A2
    (A2 difficult); image 2: gt A3, B1. Detections of ``a`` by score: 0.9 on A1 (TP), 0.8
    on A1 again (FP, duplicate), 0.7 on A2 (difficult: ignored), 0.6 on A3 (TP), 0.5
    nowhere (FP)."""
    acc = ev.DetectionAccumulator(["a", "b"])
    n = 100.0
    a1, a2 = [0, 0, 0.2, 0.2], [0.5, 0.5, 0.8, 0.8]
    a3, b1 = [0.1, 0.1, 0.4, 0.4], [0.6, 0.6, 0.9, 0.9]
    acc.add(
        "1",
        n,
        n,
        [a1, a2],
        [0, 0],
        [False, True],
        [a1, [0.01, 0.0, 0.2, 0.2], a2],
        [0.9, 0.8, 0.7],
        [0, 0, 0],
    )
    acc.add(
        "2",
        n,
        n,
        [a3, b1],
        [0, 1],
        [False, False],
        [a3, [0.0, 0.7, 0.1, 0.9], b1],
        [0.6, 0.5, 0.95],
        [0, 0, 1],
    )
    return acc


def test_voc_ap_against_hand_computation():
    acc = _fixture_accumulator()
    recall, precision, positives = acc.pr_curve(0, 0.5)
    assert positives == 2  # the difficult box is no positive
    # kept detections in score order: TP, FP, (difficult skipped), TP, FP
    np.testing.assert_allclose(recall, [0.5, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(precision, [1.0, 0.5, 2 / 3, 0.5])
    # area under the interpolated curve: 0.5 * 1 + 0.5 * 2/3
    voc = acc.voc(0.5)
    assert voc["ap/a"] == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert voc["ap/b"] == pytest.approx(1.0)
    assert voc["map"] == pytest.approx((0.5 + 1 / 3 + 1.0) / 2)
    # VOC2007 11 points: recall 0..0.5 -> precision 1 (6 points), 0.6..1.0 -> 2/3 (5 points)
    assert acc.voc(0.5, use_07=True)["ap/a"] == pytest.approx((6 * 1.0 + 5 * 2 / 3) / 11)


def test_coco_metrics_through_pycocotools():
    pytest.importorskip("pycocotools")
    perfect = ev.DetectionAccumulator(["a"])
    perfect.add(
        "1",
        100,
        100,
        [[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1]],
        [0, 0],
        [False, False],
        [[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1]],
        [0.9, 0.8],
        [0, 0],
    )
    coco = perfect.coco()
    assert coco["coco_ap"] == pytest.approx(1.0) and coco["coco_ap50"] == pytest.approx(1.0)
    acc = _fixture_accumulator()
    coco = acc.coco()
    # class b: one perfect detection (AP 1); class a at IoU 0.5: COCO's 101-point
    # interpolation of the curve above, with the difficult box an ignored crowd region
    assert 0.0 < coco["coco_ap50"] <= 1.0 and coco["coco_ap75"] <= coco["coco_ap50"]
    assert coco["coco_ap"] <= coco["coco_ap50"]
    empty = ev.DetectionAccumulator(["a"])
    empty.add("1", 10, 10, [[0, 0, 1, 1]], [0], [False], np.zeros((0, 4)), [], [])
    assert empty.coco() == dict.fromkeys(("coco_ap", "coco_ap50", "coco_ap75", "coco_ar100"), 0.0)
    metrics = acc.metrics()
    assert set(ev.METRICS) - {"seconds_per_image"} <= set(metrics)


def test_proposal_recall():
    gts = [np.array([[0, 0, 10, 10], [20, 20, 30, 30]], float)]
    props = [np.array([[0, 0, 10, 10], [0, 0, 10, 12], [21, 21, 30, 30], [50, 50, 60, 60]], float)]
    out = ev.proposal_recall(props, gts, counts=(1, 3), ious=(0.5, 0.85))
    assert out["recall1_iou50"] == 0.5 and out["recall3_iou50"] == 1.0
    assert out["recall3_iou85"] == 0.5  # the second box is found at IoU 0.81 only
    assert 0.5 < out["ar3"] < 1.0
    assert ev.recall_curve(props, gts, 0.5, (1, 3)) == [0.5, 1.0]


# ----------------------------------------------------------------------- configs


def _config(**over):
    raw = {
        "name": "det-test",
        "task": "detection",
        "model": {
            "name": "faster_rcnn",
            "anchor_sizes": [16, 32, 48],
            "rpn_channels": 16,
            "head_units": 32,
        },
        "data": {"name": "voc_folder", "path": "/nonexistent"},
        "train": {"epochs": 1, "batch_size": 2},
        "tracking": {"gate": {"metric": "map"}},
    }
    for key, value in over.items():
        node = raw
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return validate_config(raw)


@pytest.mark.parametrize(
    "over, message",
    [
        ({"model.name": "lenet5"}, "model.name: 'lenet5' is a classification model"),
        ({"data.name": "digits"}, "data.name: 'digits' is a image_classification dataset"),
        ({"task_options": {"min_size": 600, "max_size": 300}}, "task_options.max_size"),
        ({"task_options": {"rpn_nms": 2.0}}, "task_options.rpn_nms"),
        ({"task_options": {"anchors": 3}}, "task_options.anchors: unknown option"),
        ({"task_options": {"pretrained": "hed"}}, "task_options.pretrained"),
        ({"model.num_classes": 4}, "model.num_classes: set by the dataset"),
        ({"tracking.gate.metric": "accuracy"}, "tracking.gate.metric: 'accuracy' is not a metric"),
        ({"data.pth": "x"}, "data.pth: dataset 'voc_folder' has no option"),
    ],
)
def test_bad_detection_configs_get_clear_errors(over, message):
    from pipelines.train import check_config

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_config(_config(**over))


def test_good_config_and_shipped_configs_check():
    from pipelines.config import list_configs, load_config
    from pipelines.train import check_config
    from pipelines.variants import load_runs

    check_config(_config())
    for name in ("faster-rcnn-bccd", "faster-rcnn-raccoon", "rcnn-bccd", "rcnn-raccoon"):
        check_config(load_config(name))
    for name in ("claim-proposals", "claim-rcnn-vs-faster-rcnn"):
        assert name in list_configs()
        for config in load_runs(name, []):
            check_config(config)


def test_missing_data_folder_is_a_data_error(tmp_path):
    from data.splits import DataError
    from pipelines import runtime
    from pipelines.tasks.base import RunContext, get_task

    config = _config(**{"data.path": str(tmp_path / "none")})
    task = get_task("detection")(RunContext(config, strategy=runtime.configure(config.runtime)))
    with pytest.raises(DataError, match="is not a folder"):
        task.build_inputs()


# ----------------------------------------------------------------------- training


def make_voc(root: Path, count: int = 6, size=(64, 80)) -> Path:
    """A small VOC folder of bright rectangles (class by colour) on noise."""
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    h, w = size
    for i in range(count):
        image = rng.integers(0, 80, (h, w, 3), dtype=np.uint8)
        objects = []
        for k in range(1 + i % 2):
            y0, x0 = int(rng.integers(2, h - 30)), int(rng.integers(2, w - 30))
            bh, bw = int(rng.integers(14, 28)), int(rng.integers(14, 28))
            cls = ("red", "green")[(i + k) % 2]
            image[y0 : y0 + bh, x0 : x0 + bw, 0 if cls == "red" else 1] = 250
            objects.append(
                f"<object><name>{cls}</name><difficult>0</difficult><bndbox>"
                f"<xmin>{x0 + 1}</xmin><ymin>{y0 + 1}</ymin><xmax>{x0 + bw}</xmax>"
                f"<ymax>{y0 + bh}</ymax></bndbox></object>"
            )
        Image.fromarray(image).save(root / "JPEGImages" / f"im{i}.jpg", quality=95)
        (root / "Annotations" / f"im{i}.xml").write_text(
            f"<annotation><filename>im{i}.jpg</filename>{''.join(objects)}</annotation>"
        )
    return root


def tiny_overrides(data: Path, work: Path, model: str = "faster_rcnn") -> list[str]:
    common = [
        f"data.path={data}",
        "data.name=voc_folder",
        "data.test_fraction=0.34",
        "train.batch_size=2",
        "train.steps_per_epoch=1",
        "train.epochs=2",
        "train.verbose=0",
        "train.learning_rate=0.001",
        f"runtime.work_dir={work}",
        "task_options.min_size=64",
        "task_options.max_size=96",
        "task_options.score_threshold=0.0",
        "task_options.max_detections=10",
        "task_options.draw_images=1",
    ]
    if model == "faster_rcnn":
        return common + [
            "model.anchor_sizes=[16,32,48]",
            "model.rpn_channels=16",
            "model.head_units=32",
            "task_options.train_pre_nms=200",
            "task_options.train_post_nms=64",
            "task_options.test_pre_nms=200",
            "task_options.test_post_nms=32",
            "task_options.roi_batch=16",
            "task_options.rpn_batch=32",
        ]
    return common + [
        "model.head_units=16",
        "task_options.proposal_method=edge_boxes",
        "task_options.proposals_per_image=40",
        "task_options.crop_size=32",
        "task_options.rcnn_fg_per_batch=4",
        "task_options.rcnn_bg_per_batch=8",
        "task_options.rcnn_eval_proposals=20",
        "task_options.recall_methods=[edge_boxes]",
        "task_options.context_padding=2",
    ]


def _subprocess_main(out_dir: str, model: str, strategy: str) -> int:
    """Train 2 steps straight; again with a crash after step 1 and a resume from its
    checkpoint; compare; evaluate; export and check the served outputs."""
    import keras
    import tensorflow as tf

    from pipelines import loop, runtime
    from pipelines.config import load_config
    from pipelines.resume import ResumeSlot
    from pipelines.serving import export
    from pipelines.tasks.base import RunContext, get_task
    from pipelines.train import fit_model

    out = Path(out_dir)
    data = make_voc(out / "voc")
    config_name = "faster-rcnn-bccd" if model == "faster_rcnn" else "rcnn-bccd"
    sets = tiny_overrides(data, out / "runs", model) + ["train.checkpoint_every_steps=1"]
    if strategy == "mirrored":
        sets += ["runtime.strategy=mirrored", "runtime.virtual_cpus=2"]
    config = load_config(config_name, sets)
    strategy_obj = runtime.configure(config.runtime)
    replicas = strategy_obj.num_replicas_in_sync

    def task_at(start: loop.Position):
        context = RunContext(config, replicas, start.epoch, start.step, strategy=strategy_obj)
        return get_task("detection")(context), context

    task, context = task_at(loop.Position())
    straight, history = fit_model(task, task.build_inputs(), context, out / "straight")

    class Crash(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:
                raise RuntimeError("crash")

    slot = ResumeSlot(config)
    slot.open(None)
    task, context = task_at(loop.Position())
    try:
        fit_model(
            task,
            task.build_inputs(),
            context,
            out / "crashed",
            slot=slot,
            extra_callbacks=[Crash()],
        )
    except RuntimeError:
        pass
    slot = ResumeSlot(config)
    start = loop.TrainingCheckpoint.peek(slot.checkpoint_dir)
    task, context = task_at(start)
    inputs = task.build_inputs()
    resumed, _ = fit_model(task, inputs, context, out / "resumed", slot=slot)
    diffs = {
        v.path: float(np.max(np.abs(np.asarray(v) - np.asarray(w)), initial=0.0))
        for v, w in zip(straight.weights, resumed.weights, strict=True)
    }
    diff = max(diffs.values())
    worst = sorted(diffs, key=diffs.get)[-3:]
    moved = any(
        not np.array_equal(a, b)
        for a, b in zip(
            straight.network.get_weights(),
            task.build_model(inputs).network.get_weights(),
            strict=True,
        )
    )

    evaluation = task.evaluate(resumed, inputs)
    for writer in evaluation.artifacts:
        writer(out)
    serving = task.serving(resumed, inputs.info, inputs.check_batch)
    result = export.write_saved_model(
        serving.model,
        serving.endpoints,
        out / "serving" / "1",
        model_name="tiny",
        warmup_requests=1,
        atol=1e-4,
    )
    reloaded = tf.saved_model.load(str(result.path))
    served = {}
    if model == "faster_rcnn":
        jpeg = (data / "JPEGImages" / "im0.jpg").read_bytes()
        got = reloaded.signatures["serving_default"](image_bytes=tf.constant([jpeg, jpeg]))
        want = serving.endpoints[0].fn(tf.constant([jpeg, jpeg]))
        empty = reloaded.signatures["serving_default"](image_bytes=tf.constant([], tf.string))
        served["empty_shape"] = list(empty["detection_boxes"].shape)
        try:
            reloaded.signatures["serving_default"](image_bytes=tf.constant([b"not an image" * 4]))
            served["bad_bytes"] = "accepted"
        except tf.errors.InvalidArgumentError as exc:
            served["bad_bytes"] = exc.message[:3000]
    else:
        ep = serving.endpoints[0]
        args = [tf.constant(v) for v in ep.check_inputs]
        got = reloaded.signatures["serving_default"](images=args[0], proposals=args[1])
        want = ep.fn(*args)
    served["max_diff"] = max(
        float(
            np.max(
                np.abs(np.asarray(got[k], np.float64) - np.asarray(want[k], np.float64)), initial=0
            )
        )
        for k in ("detection_boxes", "detection_scores")
    )
    served["classes_equal"] = bool(
        np.array_equal(got["detection_classes"], want["detection_classes"])
    )
    served["num_detections"] = np.asarray(got["num_detections"]).tolist()
    served["boxes_shape"] = list(got["detection_boxes"].shape)
    served["classes_dtype"] = str(got["detection_classes"].dtype.name)
    served["num_dtype"] = str(got["num_detections"].dtype.name)
    served["class_names"] = [v.decode() for v in np.asarray(got["detection_class_names"])[0][:2]]
    (out / "result.json").write_text(
        json.dumps(
            {
                "replicas": replicas,
                "start": [start.epoch, start.step],
                "resume_diff": diff,
                "worst": {k: diffs[k] for k in worst},
                "loss": history["loss"],
                "trained": moved,
                "signatures": result.signatures,
                "export_max_abs_diff": result.max_abs_diff,
                "served": served,
                "metrics": {k: v for k, v in evaluation.metrics.items() if np.isfinite(v)},
                "artifacts": sorted(
                    p.name for p in out.iterdir() if p.suffix in (".png", ".csv", ".json")
                ),
            },
            indent=2,
        )
    )
    return 0


def _run(tmp_path: Path, model: str, strategy: str) -> dict:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "DEEPTRENDS_PROPOSAL_CACHE": str(tmp_path / "cache"),
    }
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "mirrored", str(tmp_path), model, strategy],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    return json.loads((tmp_path / "result.json").read_text())


@pytest.mark.slow
def test_tiny_faster_rcnn_mirrored_resumes_and_serves_image_bytes(tmp_path):
    pytest.importorskip("tensorflow")
    result = _run(tmp_path, "faster_rcnn", "mirrored")
    assert result["replicas"] == 2
    assert result["start"] == [1, 0]  # resumed from the first epoch's checkpoint
    assert result["trained"]
    assert result["resume_diff"] <= 1e-5, result
    assert all(np.isfinite(result["loss"]))
    assert result["signatures"] == ["images", "serving_default"]
    served = result["served"]
    assert served["max_diff"] <= 1e-4 and served["classes_equal"], served
    assert served["boxes_shape"] == [2, 10, 4]
    assert served["classes_dtype"] == "int64" and served["num_dtype"] == "int32"
    assert served["empty_shape"] == [0, 10, 4]
    assert "image_bytes: not a JPEG" in served["bad_bytes"]
    assert set(served["class_names"]) <= {"red", "green", ""}
    assert {
        "precision_recall.png",
        "per_class_ap.csv",
        "eval_detections.png",
        "proposal_recall.png",
    } <= set(result["artifacts"])
    assert "map" in result["metrics"] and "rpn/recall300_iou50" in result["metrics"]


@pytest.mark.slow
def test_tiny_rcnn_trains_resumes_and_serves_images_with_proposals(tmp_path):
    pytest.importorskip("cv2")
    result = _run(tmp_path, "rcnn", "default")
    assert result["start"] == [1, 0]
    assert result["resume_diff"] <= 1e-5, result
    assert result["signatures"] == ["serving_default"]
    assert result["served"]["max_diff"] <= 1e-4 and result["served"]["classes_equal"]
    assert "edge_boxes/recall300_iou50" in result["metrics"]


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] != "mirrored":
        sys.exit(
            "usage: python tests/pipelines/test_detection.py mirrored OUT_DIR [MODEL STRATEGY]"
        )
    model_name = sys.argv[3] if len(sys.argv) > 3 else "faster_rcnn"
    strategy_name = sys.argv[4] if len(sys.argv) > 4 else "mirrored"
    sys.exit(_subprocess_main(sys.argv[2], model_name, strategy_name))
