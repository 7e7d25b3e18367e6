"""Supervised classifiers, with auxiliary heads where the network has them (GoogLeNet's
auxiliary classifiers, Szegedy et al. 2014: each adds its loss with weight 0.3 and sees
the same labels; only the first output is the prediction and carries the metrics)."""

from __future__ import annotations

import keras

AUX_LOSS_WEIGHT = 0.3


class SmoothedSparseCE(keras.losses.Loss):
    """Sparse categorical cross-entropy with label smoothing on probabilities."""

    def __init__(self, num_classes: int, smoothing: float, name: str = "smoothed_ce"):
        super().__init__(name=name)
        self.num_classes = num_classes
        self.smoothing = smoothing

    def call(self, y_true, y_pred):
        labels = keras.ops.cast(keras.ops.reshape(y_true, (-1,)), "int32")
        y = keras.ops.one_hot(labels, self.num_classes)
        return keras.losses.categorical_crossentropy(y, y_pred, label_smoothing=self.smoothing)

    def get_config(self):
        return {
            **super().get_config(),
            "num_classes": self.num_classes,
            "smoothing": self.smoothing,
        }


def compile_classifier(
    model, optimizer, num_classes: int, label_smoothing: float = 0.0, jit_compile: bool = False
) -> None:
    """Compile a softmax classifier: cross-entropy (label-smoothed if asked), accuracy and
    top-5 accuracy on the main output; auxiliary outputs add weighted losses."""

    def loss_fn():
        if label_smoothing:
            return SmoothedSparseCE(num_classes, label_smoothing)
        return keras.losses.SparseCategoricalCrossentropy()

    def metric_fns():
        return [
            keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
            keras.metrics.SparseTopKCategoricalAccuracy(
                k=min(5, num_classes), name="top5_accuracy"
            ),
        ]

    heads = len(served_network(model).outputs)
    if heads > 1:
        loss = [loss_fn() for _ in range(heads)]
        weights = [1.0] + [AUX_LOSS_WEIGHT] * (heads - 1)
        metrics = [metric_fns()] + [[] for _ in range(heads - 1)]
    else:
        loss, weights, metrics = loss_fn(), None, metric_fns()
    model.compile(
        optimizer=optimizer,
        loss=loss,
        loss_weights=weights,
        metrics=metrics,
        jit_compile=jit_compile,
    )


@keras.saving.register_keras_serializable(package="deeptrends")
class AuxHeadsTrainer(keras.Model):
    """Trains a network with auxiliary heads on ``(images, labels)`` batches: the labels
    are fed to every head. The served model is ``network`` (all its outputs)."""

    def __init__(self, network, **kwargs):
        super().__init__(**kwargs)
        self.network = network

    def call(self, inputs, training=False):
        return self.network(inputs, training=training)

    @staticmethod
    def _per_head(y, y_pred):
        if isinstance(y_pred, (list, tuple)) and not isinstance(y, (list, tuple)):
            return [y] * len(y_pred)
        return y

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        return super().compute_loss(
            x=x,
            y=self._per_head(y, y_pred),
            y_pred=y_pred,
            sample_weight=sample_weight,
            training=training,
        )

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        return super().compute_metrics(x, self._per_head(y, y_pred), y_pred, sample_weight)

    def get_config(self):
        return {"network": keras.saving.serialize_keras_object(self.network)}

    @classmethod
    def from_config(cls, config):
        return cls(keras.saving.deserialize_keras_object(config.pop("network")), **config)


def with_aux_heads(network):
    """``network`` itself, or an ``AuxHeadsTrainer`` around it when it has several outputs."""
    return AuxHeadsTrainer(network) if len(network.outputs) > 1 else network


def served_network(model):
    """The network a classifier serves (the trainer's network, or the model itself)."""
    return model.network if isinstance(model, AuxHeadsTrainer) else model
