"""Matplotlib figures logged as run artifacts (Agg backend, no display needed)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def panel_grid(count: int, width: float = 5.0, height: float = 3.6, max_cols: int = 3):
    """A figure of ``count`` panels, up to ``max_cols`` a row; the spare panels hidden."""
    plt = _pyplot()
    cols = min(max_cols, max(1, count))
    rows = math.ceil(max(1, count) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in list(axes.flat)[count:]:
        ax.axis("off")
    return fig, list(axes.flat)


def save_figure(fig, path: Path, title: str = "") -> Path:
    """Title, lay out, write (dpi 110) and close ``fig``."""
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def learning_curves(history: dict[str, list[float]], path: Path, title: str = "") -> Path:
    """Loss and every other metric per epoch, train and validation overlaid."""
    plt = _pyplot()
    names = sorted({k.removeprefix("val_") for k in history if k != "learning_rate"})
    fig, axes = plt.subplots(
        1, max(1, len(names)), figsize=(4.2 * max(1, len(names)), 3.4), squeeze=False
    )
    for ax, name in zip(axes[0], names, strict=False):
        for key, style in ((name, "-"), (f"val_{name}", "--")):
            if key in history:
                ys = history[key]
                ax.plot(
                    range(1, len(ys) + 1),
                    ys,
                    style,
                    marker="o",
                    markersize=2.5,
                    label="eval" if key.startswith("val_") else "train",
                )
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    return save_figure(fig, path, title)


def confusion_matrix(
    labels: np.ndarray, predictions: np.ndarray, class_names: list[str], path: Path
) -> Path:
    from sklearn.metrics import ConfusionMatrixDisplay

    plt = _pyplot()
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(min(14, 2 + 0.5 * n), min(14, 2 + 0.5 * n)))
    ConfusionMatrixDisplay.from_predictions(
        labels,
        predictions,
        labels=list(range(n)),
        display_labels=class_names,
        ax=ax,
        colorbar=False,
        include_values=n <= 20,
    )
    ax.set_title(f"accuracy {np.mean(labels == predictions):.4f}")
    return save_figure(fig, path)


# ------------------------------------------------------------------ object detection (issue 14)

_BOX_COLOURS = (
    "#e6194b",
    "#3cb44b",
    "#4363d8",
    "#f58231",
    "#911eb4",
    "#46f0f0",
    "#f032e6",
    "#bcf60c",
    "#fabebe",
    "#008080",
)


def draw_boxes(
    ax, image: np.ndarray, boxes, labels, class_names, scores=None, dashed=False
) -> None:
    """``image`` [H, W, 3] in [0, 1] with pixel boxes (ymin, xmin, ymax, xmax) drawn on
    ``ax``: solid with ``class score`` for predictions, dashed for the ground truth."""
    from matplotlib.patches import Rectangle

    ax.imshow(np.clip(image, 0.0, 1.0))
    ax.axis("off")
    for i, (box, label) in enumerate(zip(boxes, labels, strict=False)):
        y0, x0, y1, x1 = (float(v) for v in box)
        colour = _BOX_COLOURS[int(label) % len(_BOX_COLOURS)]
        ax.add_patch(
            Rectangle(
                (x0, y0),
                x1 - x0,
                y1 - y0,
                fill=False,
                edgecolor=colour,
                linewidth=0.8 if dashed else 1.4,
                linestyle="--" if dashed else "-",
            )
        )
        if scores is not None:
            name = class_names[int(label)] if int(label) < len(class_names) else str(label)
            ax.text(
                x0,
                y0,
                f"{name} {float(scores[i]):.2f}",
                color="white",
                fontsize=5,
                bbox={"facecolor": colour, "alpha": 0.7, "pad": 0.5, "linewidth": 0},
            )


def detection_grid(
    images, results, class_names, path: Path, threshold: float = 0.5, title: str = ""
) -> Path:
    """Eval images with the true boxes (dashed) and the predictions scoring at least
    ``threshold`` (solid, labelled); ``results`` are ``evaluation.detection.ImageResult``
    in pixels of the original image, ``images`` the originals."""
    fig, axes = panel_grid(len(images), width=4.2, height=3.4, max_cols=3)
    for ax, image, res in zip(axes, images, results, strict=False):
        keep = res.scores >= threshold
        draw_boxes(ax, image, res.gt_boxes, res.gt_labels, class_names, dashed=True)
        draw_boxes(ax, image, res.boxes[keep], res.labels[keep], class_names, res.scores[keep])
        ax.set_title(
            f"{res.image_id}: {int(keep.sum())} found, {len(res.gt_labels)} true", fontsize=7
        )
    return save_figure(
        fig, path, title or f"predictions (score >= {threshold}) and ground truth (dashed)"
    )


def precision_recall_curves(curves: dict, aps: dict, path: Path, title: str = "") -> Path:
    """One precision-recall curve per class (``curves``: class -> (recall, precision)),
    labelled with its AP (``aps['ap/<class>']``)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.0, 4.0))
    for name, (recall, precision) in curves.items():
        ax.plot(recall, precision, label=f"{name} (AP {aps.get(f'ap/{name}', 0.0):.3f})")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(
        fig, path, title or f"precision-recall at IoU 0.5 (mAP {aps.get('map', 0.0):.3f})"
    )


def proposal_recall_curves(curves: dict, counts: list[int], path: Path, title: str = "") -> Path:
    """Recall against the number of proposals, one line per method and IoU
    (``curves``: method -> {IoU: recall per count})."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.4, 4.0))
    for method, by_iou in curves.items():
        for iou, recalls in sorted(by_iou.items()):
            ax.plot(
                counts,
                recalls,
                marker="o",
                linestyle="-" if iou < 0.6 else "--",
                label=f"{method} IoU {iou:g}",
            )
    ax.set_xscale("log")
    ax.set_xlabel("proposals per image")
    ax.set_ylabel("recall")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path, title or "proposal recall")


def attention_overlay(
    image: np.ndarray, words: list[str], maps: np.ndarray, path: Path, title: str = ""
) -> Path:
    """Show, Attend and Tell's figure: the image, then each generated word with its
    attention map (``maps`` [T, rows, cols]) stretched over the image, brighter where the
    decoder looked."""
    count = 1 + len(words)
    fig, axes = panel_grid(count, width=2.2, height=2.4, max_cols=6)
    height, width = image.shape[:2]
    axes[0].imshow(np.clip(image, 0.0, 1.0))
    axes[0].set_title("image", fontsize=9)
    axes[0].axis("off")
    for ax, word, weights in zip(axes[1:], words, maps, strict=False):
        ax.imshow(np.clip(image, 0.0, 1.0))
        scaled = weights / max(float(weights.max()), 1e-12)
        ax.imshow(
            scaled,
            cmap="gray",
            alpha=0.65,
            extent=(0, width, height, 0),
            interpolation="bicubic",
            vmin=0.0,
            vmax=1.0,
        )
        ax.set_title(word, fontsize=10)
        ax.axis("off")
    return save_figure(fig, path, title[:90])
