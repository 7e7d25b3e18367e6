"""Text metrics shared by the tasks that read or write sentences (translation, language
modelling, captioning).

- ``corpus_bleu``: sacrebleu corpus BLEU, lower-cased, 13a tokenisation, with the
  signature that makes a score reproducible (``nrefs:1|case:lc|eff:no|tok:13a|...``);
  one or several references per hypothesis (captions have five).
- ``corpus_bleu(..., punctuation=False)``: the same BLEU with punctuation removed from
  both sides (``strip_punctuation``), the other convention seen in references (signature
  ``...|punct:removed``).
- ``corpus_chrf``: sacrebleu chrF (character 6-grams, beta 2), with its signature.
- ``bleu_by_length``: corpus BLEU (``corpus_bleu``) per source-length bucket, the
  buckets given by sorted lower bounds (``[1, 5, 6, 7]``: 1-4, 5, 6, 7+ tokens), as in
  Bahdanau et al.'s Fig. 2; ``check_length_buckets`` validates the bounds.
- ``exact_match``: the share of hypotheses equal to a reference after ``data.text``
  standardisation (case and punctuation spacing do not count).
- Keras training metrics over 0-padded token labels: ``MaskedAccuracy`` (teacher-forced
  next-token accuracy), ``Perplexity`` and the masked token loss ``masked_token_loss``.
  Their registered names are the ones models were saved with before the move.
- ``samples_markdown`` / ``write_jsonl``: sample tables of generated text as artifacts.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import keras


@dataclass(frozen=True)
class BleuScore:
    score: float  # 0..100
    signature: str


def _references_by_position(references: Sequence[str | Sequence[str]]) -> list[list[str]]:
    """Per-hypothesis references (str or list of str) -> sacrebleu's reference streams
    (stream k holds every hypothesis' k-th reference; a missing one is None)."""
    per_item = [[r] if isinstance(r, str) else list(r) for r in references]
    if any(not refs for refs in per_item):
        raise ValueError("corpus_bleu: every hypothesis needs at least one reference.")
    width = max((len(refs) for refs in per_item), default=1)
    return [[refs[k] if k < len(refs) else None for refs in per_item] for k in range(width)]


def strip_punctuation(text: str) -> str:
    """``text`` without Unicode punctuation (categories P*), single spaces."""
    kept = "".join(" " if unicodedata.category(c).startswith("P") else c for c in text)
    return " ".join(kept.split())


def _checked(name: str, hypotheses, references):
    if len(hypotheses) != len(references):
        raise ValueError(f"{name}: {len(hypotheses)} hypotheses but {len(references)} references.")
    return _references_by_position(references)


def corpus_bleu(
    hypotheses: Sequence[str],
    references: Sequence[str | Sequence[str]],
    punctuation: bool = True,
) -> BleuScore:
    """sacrebleu corpus BLEU, lower-cased, 13a tokenisation.

    Args:
        hypotheses: list of str. One generated sentence per example.
        references: list of str, or of lists of str. The reference(s) of each example.
        punctuation: bool. False: punctuation removed from both sides first
            (``strip_punctuation``; the signature ends in ``|punct:removed``).
    """
    import sacrebleu

    streams = _checked("corpus_bleu", hypotheses, references)
    hyps = list(hypotheses)
    if not punctuation:
        hyps = [strip_punctuation(h) for h in hyps]
        streams = [[None if r is None else strip_punctuation(r) for r in s] for s in streams]
    metric = sacrebleu.metrics.BLEU(lowercase=True, tokenize="13a")
    result = metric.corpus_score(hyps, streams)
    signature = str(metric.get_signature()) + ("" if punctuation else "|punct:removed")
    return BleuScore(float(result.score), signature)


def corpus_chrf(hypotheses: Sequence[str], references: Sequence[str | Sequence[str]]) -> BleuScore:
    """sacrebleu corpus chrF (character 6-grams, beta 2, case-sensitive), 0..100."""
    import sacrebleu

    streams = _checked("corpus_chrf", hypotheses, references)
    metric = sacrebleu.metrics.CHRF()
    result = metric.corpus_score(list(hypotheses), streams)
    return BleuScore(float(result.score), str(metric.get_signature()))


@dataclass(frozen=True)
class BucketBleu:
    """Corpus BLEU over the sentences whose source length lies in ``[lower, upper]``."""

    lower: int
    upper: int | None  # None: no upper bound (the last bucket)
    count: int
    score: float | None  # None for an empty bucket

    @property
    def label(self) -> str:
        """``1_4``, ``5``, ``7_plus``: the metric-name suffix (``bleu_len_<label>``)."""
        if self.upper is None:
            return f"{self.lower}_plus"
        return str(self.lower) if self.upper == self.lower else f"{self.lower}_{self.upper}"

    @property
    def span(self) -> str:
        """``1-4``, ``5``, ``7+``: the bucket as a reader writes it."""
        return self.label.replace("_plus", "+").replace("_", "-")


def check_length_buckets(bounds: Sequence[int], field: str = "length_buckets") -> list[int]:
    """Sorted, distinct, positive int lower bounds, else ``ValueError`` naming ``field``."""
    values = list(bounds) if isinstance(bounds, (list, tuple)) else None
    if (
        not values
        or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in values)
        or any(b >= c for b, c in zip(values, values[1:], strict=False))
    ):
        raise ValueError(
            f"{field} must be a non-empty, strictly increasing list of positive ints: the "
            f"lower bound (in source tokens) of each bucket, e.g. [1, 5, 6, 7] for 1-4, 5, 6, "
            f"7+. Received: {field}={bounds!r}"
        )
    return values


def bleu_by_length(
    hypotheses: Sequence[str],
    references: Sequence[str | Sequence[str]],
    lengths: Sequence[int],
    bounds: Sequence[int],
) -> list[BucketBleu]:
    """Corpus BLEU (``corpus_bleu``) of each source-length bucket.

    Args:
        hypotheses: list of str. One generated sentence per example.
        references: list of str, or of lists of str. The reference(s) of each example.
        lengths: list of int. The source length of each example (tokens).
        bounds: list of int. Sorted lower bounds: bucket k holds lengths in
            ``[bounds[k], bounds[k + 1] - 1]``, the last one ``bounds[-1]`` and longer.
            Sources shorter than ``bounds[0]`` are in no bucket.

    Returns:
        One ``BucketBleu`` per bound, in order; an empty bucket has ``count`` 0 and
        ``score`` None.
    """
    bounds = check_length_buckets(bounds)
    _checked("bleu_by_length", hypotheses, references)
    if len(lengths) != len(hypotheses):
        raise ValueError(
            f"bleu_by_length: {len(hypotheses)} hypotheses but {len(lengths)} lengths."
        )
    out = []
    for k, lower in enumerate(bounds):
        upper = bounds[k + 1] - 1 if k + 1 < len(bounds) else None
        picks = [i for i, n in enumerate(lengths) if n >= lower and (upper is None or n <= upper)]
        score = (
            corpus_bleu([hypotheses[i] for i in picks], [references[i] for i in picks]).score
            if picks
            else None
        )
        out.append(BucketBleu(lower, upper, len(picks), score))
    return out


def exact_match(hypotheses: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """The share of hypotheses equal to (one of) their reference(s) after standardisation."""
    from data.text import standardized

    if len(hypotheses) != len(references):
        raise ValueError(
            f"exact_match: {len(hypotheses)} hypotheses but {len(references)} references."
        )
    if not hypotheses:
        return 0.0
    per_item = [[r] if isinstance(r, str) else list(r) for r in references]
    flat = standardized([r for refs in per_item for r in refs])
    hyps = standardized(list(hypotheses))
    hits, at = 0, 0
    for hyp, refs in zip(hyps, per_item, strict=True):
        hits += hyp in flat[at : at + len(refs)]
        at += len(refs)
    return hits / len(hyps)


# ---------------------------------------------------------------- Keras metrics


def _token_mask(y_true, dtype):
    return keras.ops.cast(keras.ops.not_equal(y_true, 0), dtype)


@keras.saving.register_keras_serializable(package="deeptrends")
class MaskedAccuracy(keras.metrics.Mean):
    """Next-token accuracy over non-padding positions (label 0 is padding)."""

    def __init__(self, name="accuracy", **kwargs):
        super().__init__(name=name, **kwargs)

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_true = keras.ops.cast(y_true, "int32")
        predicted = keras.ops.cast(keras.ops.argmax(y_pred, axis=-1), "int32")
        hit = keras.ops.cast(keras.ops.equal(predicted, y_true), "float32")
        return super().update_state(hit, sample_weight=_token_mask(y_true, "float32"))


@keras.saving.register_keras_serializable(package="deeptrends")
class Perplexity(keras.metrics.Mean):
    """``exp`` of the mean token cross-entropy (from logits); padding (label 0) ignored."""

    def __init__(self, name="perplexity", **kwargs):
        super().__init__(name=name, **kwargs)

    def update_state(self, y_true, y_pred, sample_weight=None):
        ce = keras.losses.sparse_categorical_crossentropy(y_true, y_pred, from_logits=True)
        return super().update_state(ce, sample_weight=_token_mask(y_true, ce.dtype))

    def result(self):
        return keras.ops.exp(super().result())


# registered under its pre-move name: language models saved before still load
@keras.saving.register_keras_serializable(package="deeptrends", name="_masked_lm_loss")
def masked_token_loss(y_true, y_pred):
    """The mean token cross-entropy (from logits) over non-padding labels."""
    ce = keras.losses.sparse_categorical_crossentropy(y_true, y_pred, from_logits=True)
    mask = _token_mask(y_true, ce.dtype)
    return keras.ops.sum(ce * mask) / keras.ops.maximum(keras.ops.sum(mask), 1.0)


@keras.saving.register_keras_serializable(package="deeptrends")
class SmoothedTokenLoss(keras.losses.Loss):
    """Token cross-entropy from logits with label smoothing (Szegedy et al. 2016; the
    target mixes ``1 - smoothing`` on the label with ``smoothing`` spread uniformly over
    the vocabulary), averaged over non-padding labels (label 0 is padding). With
    ``smoothing=0`` it is ``SparseCategoricalCrossentropy(ignore_class=0)``.

    Args:
        smoothing: float. 0 <= smoothing < 1.
    """

    def __init__(self, smoothing: float = 0.0, name: str = "smoothed_token_loss", **kwargs):
        super().__init__(name=name, **kwargs)
        if not 0.0 <= float(smoothing) < 1.0:
            raise ValueError(f"`smoothing` must be in [0, 1). Received: smoothing={smoothing!r}")
        self.smoothing = float(smoothing)

    def call(self, y_true, y_pred):
        labels = keras.ops.cast(y_true, "int32")
        log_probs = keras.ops.log_softmax(keras.ops.cast(y_pred, "float32"), axis=-1)
        nll = -keras.ops.squeeze(
            keras.ops.take_along_axis(log_probs, keras.ops.expand_dims(labels, -1), axis=-1), -1
        )
        loss = (1.0 - self.smoothing) * nll - self.smoothing * keras.ops.mean(log_probs, axis=-1)
        mask = _token_mask(labels, loss.dtype)
        return keras.ops.sum(loss * mask) / keras.ops.maximum(keras.ops.sum(mask), 1.0)

    def get_config(self):
        return {**super().get_config(), "smoothing": self.smoothing}


# ---------------------------------------------------------------- sample tables


def samples_markdown(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table of generated text (``|`` escaped, floats to 3 decimals)."""

    def cell(value) -> str:
        text = f"{value:.3f}" if isinstance(value, float) else str(value)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_jsonl(path: Path, records: Sequence[dict]) -> Path:
    """One JSON object per line, UTF-8 (non-ASCII kept as is)."""
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path
