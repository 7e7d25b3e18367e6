"""Reduced-precision serving graphs (``export.precision: bfloat16``).

``inference_copy`` clones a trained functional classifier into an inference-only copy that
computes in bfloat16: every layer under the ``mixed_bfloat16`` policy (float32 variables,
bfloat16 arithmetic), except the layers that produce the model's outputs, which stay
float32 (the softmax over bfloat16 logits would round probabilities to 3 digits). The
inputs stay float32 (the first layer casts them), so the signatures built around the
copy take and return exactly what the float32 export does.

BatchNorm: Keras computes BatchNormalization in float32 even under a bfloat16 policy
(it casts its input up and its output back down), which leaves two casts and a float32
multiply-add on every activation map of the network. In an inference copy the moving
statistics are constants, so a BatchNorm right after a convolution is folded into that
convolution (``W * gamma / sqrt(var + eps)``, a bias ``(b - mean) * gamma / sqrt(var + eps)
+ beta``, computed in float64 from the float32 weights): the same function, without the
casts. A BatchNorm that does not directly follow a convolution it alone reads stays as
it is (float32 math inside).

``top1_agreement`` compares the reloaded export with the float32 network on a dataset
(the eval split); ``check_agreement`` refuses a publication below the threshold.
"""

from __future__ import annotations

import keras
import numpy as np

from models.layers import leaf_layers
from pipelines.evaluation.classification import main_output

PRECISIONS = ("float32", "bfloat16")
COMPUTE_POLICY = {"float32": "float32", "bfloat16": "mixed_bfloat16"}


class AgreementTooLow(RuntimeError):
    """The reduced-precision export disagrees with the float32 model too often."""


def _output_layers(model) -> set[str]:
    return {t._keras_history.operation.name for t in model.outputs}


def foldable_pairs(model) -> dict[str, str]:
    """``{batch_norm_name: conv_name}`` of each BatchNorm (channels last, inference) whose
    one input is a linear ``Conv2D`` that nothing else reads."""
    pairs = {}
    for layer in leaf_layers(model):
        if not isinstance(layer, keras.layers.BatchNormalization) or len(layer._inbound_nodes) != 1:
            continue
        parents = layer._inbound_nodes[0].parent_nodes
        if len(parents) != 1:
            continue
        conv = parents[0].operation
        axis = layer.axis if isinstance(layer.axis, int) else None
        if (
            type(conv) is keras.layers.Conv2D
            and conv.data_format == "channels_last"
            and conv.get_config()["activation"] == "linear"
            and len(conv._inbound_nodes) == 1
            and len(conv._outbound_nodes) == 1
            and axis in (-1, len(conv.output.shape) - 1)
        ):
            pairs[layer.name] = conv.name
    return pairs


def _folded(conv, bn) -> list[np.ndarray]:
    weights = conv.get_weights()
    kernel = weights[0].astype(np.float64)
    bias = weights[1].astype(np.float64) if conv.use_bias else np.zeros(kernel.shape[-1])
    mean, variance = (np.asarray(v, np.float64) for v in (bn.moving_mean, bn.moving_variance))
    gamma = np.asarray(bn.gamma, np.float64) if bn.scale else np.ones_like(mean)
    beta = np.asarray(bn.beta, np.float64) if bn.center else np.zeros_like(mean)
    scale = gamma / np.sqrt(variance + bn.epsilon)
    return [
        (kernel * scale).astype(np.float32),
        ((bias - mean) * scale + beta).astype(np.float32),
    ]


def inference_copy(model, precision: str = "bfloat16", fold_batch_norm: bool = True):
    """An inference copy of a functional ``model`` that computes in ``precision`` (see
    the module doc; float32 only folds BatchNorm, for comparison); ``model`` itself is
    left as it is. Returns ``(copy, folded)``: the copy and the number of BatchNorm
    layers folded into their convolutions."""
    if precision not in PRECISIONS:
        raise ValueError(f"export.precision: accepted values are {PRECISIONS}; got {precision!r}")
    if not (isinstance(model, keras.Model) and hasattr(model, "_nodes_by_depth")):
        raise ValueError(
            f"export.precision: {precision} needs a functional Keras model; "
            f"received {type(model).__name__}"
        )
    keep_float32 = _output_layers(model)
    pairs = foldable_pairs(model) if fold_batch_norm else {}
    convs = set(pairs.values())

    def clone(layer):
        policy = "float32" if layer.name in keep_float32 else COMPUTE_POLICY[precision]
        if layer.name in pairs:
            return keras.layers.Identity(name=layer.name, dtype=policy)
        config = {**layer.get_config(), "dtype": policy}
        if layer.name in convs:
            config["use_bias"] = True
        return layer.__class__.from_config(config)

    def call(layer, *args, **kwargs):  # a folded BatchNorm's Identity takes no mask
        return layer(*args) if layer.name in pairs else layer(*args, **kwargs)

    copy = keras.models.clone_model(model, clone_function=clone, call_function=call, recursive=True)
    source = {layer.name: layer for layer in leaf_layers(model)}
    folded_into = {conv: bn for bn, conv in pairs.items()}
    for layer in leaf_layers(copy):
        original = source[layer.name]
        if layer.name in folded_into:
            layer.set_weights(_folded(original, source[folded_into[layer.name]]))
        elif layer.name not in pairs:
            layer.set_weights(original.get_weights())
    return copy, len(pairs)


def top1_agreement(reference, signature, input_name: str, dataset) -> tuple[float, int]:
    """The fraction of ``dataset``'s images (``(images, labels)`` batches) on which
    ``signature`` (a reloaded serving signature with a ``classes`` output) predicts the
    class the float32 ``reference`` network predicts, and how many images were compared."""
    import tensorflow as tf

    same = total = 0
    for batch in dataset:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        want = np.argmax(np.asarray(main_output(reference(x, training=False))), axis=-1)
        got = np.asarray(signature(**{input_name: tf.cast(x, tf.float32)})["classes"])
        same += int(np.sum(want == got))
        total += int(want.shape[0])
    if total == 0:
        raise AgreementTooLow("top-1 agreement: the eval split is empty, nothing was compared")
    return same / total, total


def check_agreement(agreement: float, threshold: float, images: int, precision: str) -> None:
    """Raise ``AgreementTooLow`` when ``agreement`` is below ``threshold``."""
    if agreement < threshold:
        raise AgreementTooLow(
            f"export.precision={precision}: the export agrees with the float32 model on "
            f"{agreement:.4%} of {images} eval images, below "
            f"export.min_top1_agreement={threshold:g}; nothing was published "
            "(export in float32, or lower the threshold)"
        )


AGREEMENT_METRIC = "export_bf16_top1_agreement"


def verify_agreement(
    path, serving, eval_data, threshold: float, log_metrics=None
) -> dict[str, float]:
    """Reload the export at ``path`` and compare its ``serving_default`` with the float32
    ``serving.model`` on ``eval_data``; record the result in the export's metadata, pass
    the metrics to ``log_metrics`` and raise ``AgreementTooLow`` below ``threshold``.
    Returns the metrics."""
    import tensorflow as tf

    from pipelines.serving.export import write_metadata

    if eval_data is None:
        raise AgreementTooLow(
            f"export.precision={serving.precision}: no eval split to compare the export "
            "with the float32 model on; nothing was published"
        )
    endpoint = serving.endpoints[0]
    reloaded = tf.saved_model.load(str(path))
    agreement, images = top1_agreement(
        serving.model,
        reloaded.signatures[endpoint.name],
        endpoint.input_signature[0].name,
        eval_data,
    )
    write_metadata(
        path,
        {"top1_agreement": agreement, "agreement_images": images, "min_top1_agreement": threshold},
    )
    metrics = {AGREEMENT_METRIC: agreement, "export_agreement_images": float(images)}
    if log_metrics is not None:
        log_metrics(metrics)
    check_agreement(agreement, threshold, images, serving.precision)
    return metrics
