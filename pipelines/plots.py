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
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(4.2 * max(1, len(names)), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        for key, style in ((name, "-"), (f"val_{name}", "--")):
            if key in history:
                ys = history[key]
                ax.plot(range(1, len(ys) + 1), ys, style, marker="o", markersize=2.5,
                        label="eval" if key.startswith("val_") else "train")
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    return save_figure(fig, path, title)


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, class_names: list[str], path: Path) -> Path:
    from sklearn.metrics import ConfusionMatrixDisplay

    plt = _pyplot()
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(min(14, 2 + 0.5 * n), min(14, 2 + 0.5 * n)))
    ConfusionMatrixDisplay.from_predictions(
        labels, predictions, labels=list(range(n)), display_labels=class_names, ax=ax, colorbar=False,
        include_values=n <= 20,
    )
    ax.set_title(f"accuracy {np.mean(labels == predictions):.4f}")
    return save_figure(fig, path)
