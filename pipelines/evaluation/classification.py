"""Classification metrics shared by the image tasks: predictions over a dataset, loss,
top-1/top-5 accuracy and error, and the confusion-matrix artifact."""

from __future__ import annotations

from pathlib import Path

import numpy as np

METRICS = ("loss", "accuracy", "top5_accuracy", "top1_error", "top5_error")
TRAIN_METRICS = ("train_accuracy", "train_eval_gap")


def main_output(outputs):
    """A model with auxiliary heads returns a list; the first output is the prediction."""
    return outputs[0] if isinstance(outputs, (list, tuple)) else outputs


def predict(model, dataset) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities and labels of every ``(images, labels)`` batch of ``dataset``."""
    probs, labels = [], []
    for x, y in dataset:
        y = y[0] if isinstance(y, (list, tuple)) else y
        probs.append(np.asarray(main_output(model(x, training=False)), dtype=np.float32))
        labels.append(np.asarray(y))
    return np.concatenate(probs), np.concatenate(labels)


def classification_metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Cross-entropy, top-1/top-5 accuracy and error (top-5 is top-k for fewer classes)."""
    eps = 1e-7
    loss = float(-np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], eps, 1.0))))
    k = min(5, probs.shape[1])
    topk = np.argsort(-probs, axis=1)[:, :k]
    top1 = topk[:, 0] == labels
    top5 = np.any(topk == labels[:, None], axis=1)
    return {
        "loss": loss,
        "accuracy": float(np.mean(top1)),
        "top5_accuracy": float(np.mean(top5)),
        "top1_error": float(np.mean(~top1)),
        "top5_error": float(np.mean(~top5)),
    }


def evaluate_classifier(model, eval_data, train_as_eval=None):
    """Metrics on the eval split (and, given the un-augmented training split, the train
    accuracy and the train/eval gap); returns them with the eval probabilities and labels."""
    probs, labels = predict(model, eval_data)
    values = classification_metrics(probs, labels)
    if train_as_eval is not None:
        train_probs, train_labels = predict(model, train_as_eval)
        values["train_accuracy"] = float((train_probs.argmax(axis=1) == train_labels).mean())
        values["train_eval_gap"] = values["train_accuracy"] - values["accuracy"]
    return values, probs, labels


def confusion_matrix_writer(probs: np.ndarray, labels: np.ndarray, class_names: list[str]):
    """An artifact writer: ``confusion_matrix.png`` of the predictions."""

    def write(folder: Path) -> None:
        from pipelines import plots

        plots.confusion_matrix(
            labels, probs.argmax(axis=1), class_names, folder / "confusion_matrix.png"
        )

    return write
