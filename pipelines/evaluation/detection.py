"""Detection metrics: an accumulator fed batch by batch, VOC AP/mAP, COCO AP through
pycocotools, proposal recall, and the artifact writers (precision-recall curves, per-class
AP table, proposal-recall curves, eval images with boxes).

VOC AP (Everingham et al. 2010): per class, detections sorted by score are matched to the
ground truth of their image greedily (IoU >= the threshold, each box once); a detection
matching a ``difficult`` box counts neither way and difficult boxes are not counted as
positives. AP is the area under the interpolated precision-recall curve (VOC2010+), or
the mean of the interpolated precision at recall 0, 0.1, ..., 1 (VOC2007's 11 points).
Boxes are compared in pixels of the original image, without VOC's +1 pixel convention
(COCO's), so both metrics see the same geometry.

COCO AP@[.5:.95], AP50, AP75 come from ``pycocotools.cocoeval.COCOeval`` on the same
detections (difficult boxes become ``iscrowd`` regions, which COCO ignores).
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

RECALL_COUNTS = (100, 300, 1000, 2000)
RECALL_IOUS = (0.5, 0.7)
AR_IOUS = tuple(np.round(np.arange(0.5, 1.0, 0.05), 2))


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every pair of (ymin, xmin, ymax, xmax) boxes: [N, 4] x [M, 4] -> [N, M]."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    top = np.maximum(a[:, None, 0], b[None, :, 0])
    left = np.maximum(a[:, None, 1], b[None, :, 1])
    bottom = np.minimum(a[:, None, 2], b[None, :, 2])
    right = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(bottom - top, 0, None) * np.clip(right - left, 0, None)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def average_precision(recall: np.ndarray, precision: np.ndarray, use_07: bool = False) -> float:
    """VOC AP from a precision-recall curve (detections in score order)."""
    if use_07:
        points = [
            precision[recall >= t].max() if np.any(recall >= t) else 0.0
            for t in np.linspace(0, 1, 11)
        ]
        return float(np.mean(points))
    r = np.concatenate([[0.0], recall, [1.0]])
    p = np.concatenate([[0.0], precision, [0.0]])
    p = np.maximum.accumulate(p[::-1])[::-1]  # the interpolated (monotone) precision
    steps = np.where(r[1:] != r[:-1])[0]
    return float(np.sum((r[steps + 1] - r[steps]) * p[steps + 1]))


@dataclass
class ImageResult:
    image_id: str
    height: int
    width: int
    gt_boxes: np.ndarray  # [M, 4] pixels of the original image
    gt_labels: np.ndarray  # [M] 0-based
    gt_difficult: np.ndarray  # [M]
    boxes: np.ndarray  # [K, 4] pixels
    scores: np.ndarray
    labels: np.ndarray  # 0-based


@dataclass
class DetectionAccumulator:
    """Ground truth and detections of every evaluated image, fed batch by batch."""

    class_names: list[str]
    images: list[ImageResult] = field(default_factory=list)

    def add(
        self, image_id, height, width, gt_boxes, gt_labels, gt_difficult, boxes, scores, labels
    ):
        """One image: boxes normalised (ymin, xmin, ymax, xmax); ``labels`` 0-based."""
        scale = np.array([height, width, height, width], np.float64)
        self.images.append(
            ImageResult(
                str(image_id),
                int(height),
                int(width),
                np.asarray(gt_boxes, np.float64).reshape(-1, 4) * scale,
                np.asarray(gt_labels, np.int64).reshape(-1),
                np.asarray(gt_difficult, bool).reshape(-1),
                np.asarray(boxes, np.float64).reshape(-1, 4) * scale,
                np.asarray(scores, np.float64).reshape(-1),
                np.asarray(labels, np.int64).reshape(-1),
            )
        )

    def add_batch(self, targets: dict, detections: dict) -> None:
        """A batch of ``data.detection`` targets (boxes in pixels of the resized image) and
        detector outputs (``detection_*``, classes 1-based, boxes normalised)."""
        t = {k: np.asarray(v) for k, v in targets.items()}
        d = {k: np.asarray(v) for k, v in detections.items()}
        for i in range(len(t["labels"])):
            keep = t["labels"][i] >= 0
            size = np.maximum(t["image_size"][i].astype(np.float64), 1.0)
            gt = t["boxes"][i][keep] / np.array([size[0], size[1], size[0], size[1]])
            n = int(d["num_detections"][i])
            image_id = t["image_id"][i]
            image_id = image_id.decode() if isinstance(image_id, bytes) else str(image_id)
            self.add(
                image_id,
                t["original_size"][i][0],
                t["original_size"][i][1],
                gt,
                t["labels"][i][keep],
                t["difficult"][i][keep],
                d["detection_boxes"][i][:n],
                d["detection_scores"][i][:n],
                d["detection_classes"][i][:n] - 1,
            )

    # -- VOC ----------------------------------------------------------------------------------
    def pr_curve(self, cls: int, iou_threshold: float = 0.5):
        """(recall, precision, number of positives) of class ``cls``."""
        positives = sum(
            int(np.sum((img.gt_labels == cls) & ~img.gt_difficult)) for img in self.images
        )
        detections = {
            n: (img.boxes[img.labels == cls], img.scores[img.labels == cls])
            for n, img in enumerate(self.images)
        }
        if not any(len(s) for _, s in detections.values()):
            return np.zeros(0), np.zeros(0), positives
        order = sorted(((-s, n, j) for n, (_, sc) in detections.items() for j, s in enumerate(sc)))
        used = {
            n: np.zeros(int(np.sum(img.gt_labels == cls)), bool)
            for n, img in enumerate(self.images)
        }
        tp, fp = [], []
        for _, n, j in order:
            img = self.images[n]
            sel = img.gt_labels == cls
            gt, diff = img.gt_boxes[sel], img.gt_difficult[sel]
            box = detections[n][0][j]
            if len(gt):
                ious = iou_matrix(box[None], gt)[0]
                k = int(np.argmax(ious))
                if ious[k] >= iou_threshold:
                    if diff[k]:
                        continue  # neither true nor false
                    if not used[n][k]:
                        used[n][k] = True
                        tp.append(1), fp.append(0)
                        continue
            tp.append(0), fp.append(1)
        tp, fp = np.cumsum(tp), np.cumsum(fp)
        recall = tp / max(positives, 1)
        precision = tp / np.maximum(tp + fp, 1e-12)
        return recall, precision, positives

    def voc(self, iou_threshold: float = 0.5, use_07: bool = False) -> dict[str, float]:
        """Per-class AP (``ap/<class>``) and ``map`` at ``iou_threshold``; a class without
        positives is left out of the mean."""
        out, aps = {}, []
        for c, name in enumerate(self.class_names):
            recall, precision, positives = self.pr_curve(c, iou_threshold)
            ap = average_precision(recall, precision, use_07) if len(recall) else 0.0
            out[f"ap/{name}"] = ap
            if positives:
                aps.append(ap)
        out["map"] = float(np.mean(aps)) if aps else 0.0
        return out

    # -- COCO ---------------------------------------------------------------------------------
    def coco_dicts(self) -> tuple[dict, list[dict]]:
        """pycocotools' ground-truth dict and result list (boxes x, y, w, h in pixels)."""
        images, annotations, results = [], [], []
        for n, img in enumerate(self.images):
            images.append(
                {"id": n + 1, "file_name": img.image_id, "height": img.height, "width": img.width}
            )
            for box, label, diff in zip(img.gt_boxes, img.gt_labels, img.gt_difficult, strict=True):
                y0, x0, y1, x1 = (float(v) for v in box)
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": n + 1,
                        "category_id": int(label) + 1,
                        "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "area": (x1 - x0) * (y1 - y0),
                        "iscrowd": int(diff),
                    }
                )
            for box, score, label in zip(img.boxes, img.scores, img.labels, strict=True):
                y0, x0, y1, x1 = (float(v) for v in box)
                results.append(
                    {
                        "image_id": n + 1,
                        "category_id": int(label) + 1,
                        "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "score": float(score),
                    }
                )
        categories = [{"id": i + 1, "name": name} for i, name in enumerate(self.class_names)]
        gt = {
            "info": {"description": "deeptrends evaluation"},
            "licenses": [],
            "images": images,
            "annotations": annotations,
            "categories": categories,
        }
        return gt, results

    def coco(self) -> dict[str, float]:
        """``coco_ap`` (AP@[.5:.95]), ``coco_ap50``, ``coco_ap75``, ``coco_ar100`` through
        pycocotools (all 0 without detections)."""
        keys = ("coco_ap", "coco_ap50", "coco_ap75", "coco_ar100")
        gt, results = self.coco_dicts()
        if not results or not gt["annotations"]:
            return dict.fromkeys(keys, 0.0)
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO()
            coco.dataset = gt
            coco.createIndex()
            dets = coco.loadRes(results)
            ev = COCOeval(coco, dets, "bbox")
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        stats = [max(float(s), 0.0) for s in ev.stats]  # -1: no ground truth in that range
        return dict(zip(keys, (stats[0], stats[1], stats[2], stats[8]), strict=True))

    def metrics(self) -> dict[str, float]:
        """Everything the detection task reports: ``map`` (VOC mAP@0.5), ``map_07``,
        ``map_iou70``, per-class ``ap/<class>``, the COCO figures, ``detections_per_image``."""
        voc = self.voc(0.5)
        out = {
            "map": voc["map"],
            "map_07": self.voc(0.5, use_07=True)["map"],
            "map_iou70": self.voc(0.7)["map"],
        }
        out.update({f"ap/{metric_safe(k[3:])}": v for k, v in voc.items() if k.startswith("ap/")})
        out.update(self.coco())
        out["detections_per_image"] = (
            float(np.mean([len(i.scores) for i in self.images])) if self.images else 0.0
        )
        return out


def metric_safe(name: str) -> str:
    """A class name as MLflow accepts it in a metric key (other characters become _)."""
    import re

    return re.sub(r"[^A-Za-z0-9_\-. :/]", "_", name)


METRICS = (
    "map",
    "map_07",
    "map_iou70",
    "coco_ap",
    "coco_ap50",
    "coco_ap75",
    "coco_ar100",
    "detections_per_image",
    "seconds_per_image",
)


# ----------------------------------------------------------------------- proposal recall


def proposal_recall(
    proposals: list[np.ndarray], gts: list[np.ndarray], counts=RECALL_COUNTS, ious=RECALL_IOUS
) -> dict[str, float]:
    """Recall of the ground-truth boxes by the first ``n`` proposals of each image (in
    score order) at each IoU of ``ious`` (``recall<n>_iou<t>``), and the average recall
    over IoU 0.5:0.05:0.95 (``ar<n>``, Hosang et al. 2016). Boxes in any common units."""
    out = {}
    best = {n: [] for n in counts}
    for props, gt in zip(proposals, gts, strict=True):
        gt = np.asarray(gt).reshape(-1, 4)
        if not len(gt):
            continue
        props = np.asarray(props).reshape(-1, 4)
        ious_all = iou_matrix(gt, props) if len(props) else np.zeros((len(gt), 0))
        for n in counts:
            sub = ious_all[:, :n]
            best[n].append(sub.max(axis=1) if sub.shape[1] else np.zeros(len(gt)))
    for n in counts:
        values = np.concatenate(best[n]) if best[n] else np.zeros(0)
        for t in ious:
            out[f"recall{n}_iou{int(round(t * 100))}"] = (
                float(np.mean(values >= t)) if len(values) else 0.0
            )
        out[f"ar{n}"] = (
            float(np.mean([np.mean(values >= t) for t in AR_IOUS])) if len(values) else 0.0
        )
    return out


def recall_curve(proposals, gts, iou: float, counts) -> list[float]:
    """Recall at ``iou`` for each number of proposals in ``counts``."""
    return [
        proposal_recall(proposals, gts, (n,), (iou,))[f"recall{n}_iou{int(round(iou * 100))}"]
        for n in counts
    ]


# ----------------------------------------------------------------------- artifacts


def pr_curves_writer(acc: DetectionAccumulator, name: str = "precision_recall.png"):
    def write(folder: Path) -> None:
        from pipelines import plots

        curves = {}
        for c, cls in enumerate(acc.class_names):
            recall, precision, _ = acc.pr_curve(c, 0.5)
            curves[cls] = (recall, precision)
        plots.precision_recall_curves(curves, acc.voc(0.5), folder / name)

    return write


def ap_table_writer(acc: DetectionAccumulator, name: str = "per_class_ap"):
    """``per_class_ap.csv`` and ``.json``: AP@0.5, AP@0.7, VOC07 AP, positives, detections."""

    def write(folder: Path) -> None:
        at50, at70, v07 = acc.voc(0.5), acc.voc(0.7), acc.voc(0.5, use_07=True)
        rows = []
        for c, cls in enumerate(acc.class_names):
            _, _, positives = acc.pr_curve(c, 0.5)
            dets = int(sum(np.sum(i.labels == c) for i in acc.images))
            rows.append(
                {
                    "class": cls,
                    "ap50": at50[f"ap/{cls}"],
                    "ap70": at70[f"ap/{cls}"],
                    "ap50_voc07": v07[f"ap/{cls}"],
                    "positives": positives,
                    "detections": dets,
                }
            )
        lines = ["class,ap50,ap70,ap50_voc07,positives,detections"]
        lines += [
            f"{r['class']},{r['ap50']:.4f},{r['ap70']:.4f},{r['ap50_voc07']:.4f},"
            f"{r['positives']},{r['detections']}"
            for r in rows
        ]
        (folder / f"{name}.csv").write_text("\n".join(lines) + "\n")
        (folder / f"{name}.json").write_text(json.dumps(rows, indent=2))

    return write


def recall_curves_writer(
    curves: dict[str, dict[float, list[float]]], counts, name="proposal_recall.png"
):
    """``curves``: method -> {IoU: recall per count}."""

    def write(folder: Path) -> None:
        from pipelines import plots

        plots.proposal_recall_curves(curves, list(counts), folder / name)

    return write


def eval_images_writer(
    images: list[np.ndarray],
    results: list[ImageResult],
    class_names,
    threshold: float = 0.5,
    name: str = "eval_detections.png",
):
    """Eval images with predicted (score >= ``threshold``) and true boxes drawn."""

    def write(folder: Path) -> None:
        from pipelines import plots

        plots.detection_grid(images, results, class_names, folder / name, threshold)

    return write
