"""Neural machine translation: teacher-forced training of an attentional encoder-decoder
(``models/seq2seq.py``), corpus BLEU (sacrebleu, lower-cased, 13a) with greedy and beam
decoding, exact match, attention heat-maps and a table of sample translations.

Serving is string to string: ``serving_default`` takes ``sentences`` (string [None]) and
returns ``translations`` (string [None]) and ``scores`` (float [None]). The served model
is a ``pipelines.serving.text.Translator``: the network and both vocabularies (built from
the training split only), so the SavedModel and the logged ``.keras`` model carry them;
standardisation (``data.text.standardize``), token lookup, encoder, ``tf.while_loop``
decoding (``pipelines.decoding``) and detokenisation are one graph. The same
``tf.function`` computes the evaluation metrics in process, so the served translations
are the evaluated ones.

Decoding defaults (``beam_width``, ``length_penalty``, ``max_decode_length``) are
arguments of the ``seq2seq`` builder (``model.beam_width: 5``), like keras-hub's
generation settings; they travel with the saved model. The tokenisation options
(``data.max_length``, ``data.source_vocab_size``, ``data.target_vocab_size``,
``data.min_count``) are declared once, in the dataset catalog; every other ``data.*``
option goes to the corpus loader.

Metrics: ``loss`` and ``accuracy`` (teacher-forced, validation split), ``bleu`` (the
model's decoding: beam search when ``beam_width > 1``), ``bleu_greedy``, ``exact_match``
(test split), and ``bleu_len_<bucket>`` (``bleu_len_1_4`` ... ``bleu_len_7_plus``): the
same BLEU over the test sentences of each source-length bucket (Bahdanau et al.'s Fig. 2),
the buckets' lower bounds in ``task_options.length_buckets``. A source's length is its
count of word and punctuation tokens after ``data.text.standardize``, whatever
``data.tokenizer`` the model reads, so a sentence is in the same bucket for every model.
An empty bucket logs no BLEU. Run metrics: ``num_params``, ``seconds_per_epoch``,
decoding seconds, ``sentences_len_<bucket>`` (the bucket's test sentences). Artifacts
include ``bleu_by_length.csv`` and ``bleu_by_length.png``.
Tags: ``bleu.signature``, ``decode.beam_width``, ``decode.length_penalty``.
"""

from __future__ import annotations

import base64
import importlib
import inspect
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

import models
import models.seq2seq  # noqa: F401 - registers Seq2Seq for loading saved translators
from data.catalog import check_options, get_dataset
from data.text import TOKENIZERS, tokenize
from data.translation import ParallelSplits, build_translation_datasets
from pipelines.callbacks import EpochTimer, ValidationMetric
from pipelines.config import ConfigError, ExperimentConfig
from pipelines.evaluation.text import (
    BucketBleu,
    MaskedAccuracy,
    SmoothedTokenLoss,
    bleu_by_length,
    check_length_buckets,
    corpus_bleu,
    corpus_chrf,
    exact_match,
    samples_markdown,
    write_jsonl,
)
from pipelines.optim import build_optimizer
from pipelines.serving.text import Translator
from pipelines.tasks.base import DatasetInfo, Evaluation, Inputs, Serving, Task, register_task

# what the export must answer too: an empty, an all-unknown and an over-long sentence
ODD_SENTENCES = ("", "Qwxzy blorft zzyzx.", " ".join(["sehr"] * 200))
NUM_CHECK_SENTENCES = 64
NUM_VALIDATION_BLEU = 1000  # validation pairs greedily decoded after each epoch (val_bleu)
NUM_SAMPLES = 30
NUM_ATTENTION_PLOTS = 4
# source-length buckets (lower bounds, tokens) for the shipped deu_eng test split, whose
# 2,000 German sources have 2-10 tokens: 1-4 (601), 5 (764), 6 (424), 7+ (211)
DEFAULT_LENGTH_BUCKETS = (1, 5, 6, 7)


class TranslationOptions(BaseModel):
    """``task_options`` of the translation task."""

    model_config = ConfigDict(extra="forbid")
    length_buckets: list[int] = Field(
        default_factory=lambda: list(DEFAULT_LENGTH_BUCKETS),
        description="sorted lower bounds (source tokens) of the BLEU-by-length buckets",
    )

    @field_validator("length_buckets", mode="before")
    @classmethod
    def _buckets(cls, value):
        return check_length_buckets(value)

    def bucket_labels(self) -> list[str]:
        """``["1_4", "5", "6", "7_plus"]``: the suffixes of ``bleu_len_<label>``."""
        bounds = self.length_buckets
        return [
            BucketBleu(lower, bounds[k + 1] - 1 if k + 1 < len(bounds) else None, 0, None).label
            for k, lower in enumerate(bounds)
        ]


@dataclass
class TranslationInfo(DatasetInfo):
    """What the translator and its serving signature need to know about the corpus."""

    num_validation: int = 0
    num_test: int = 0
    dropped_long_pairs: int = 0
    max_source_length: int = 0  # tokens, [END] included
    max_target_length: int = 0
    source_vocab_size: int = 0
    target_vocab_size: int = 0
    source_vocabulary: list[str] = field(default_factory=list)
    target_vocabulary: list[str] = field(default_factory=list)
    tokenizer: str = "word"
    source_model: str = ""  # bpe: the source's SentencePiece BPE model, base64
    corpus: dict[str, Any] = field(default_factory=dict)  # the loader's statistics


@dataclass
class TranslationRecord:
    """``Inputs.data``: the raw test pairs for BLEU and the epoch timer's seconds."""

    raw: ParallelSplits
    epoch_seconds: list[float] = field(default_factory=list)


def split_data_options(loader, options: dict[str, Any]) -> tuple[dict, dict]:
    """A translation dataset's merged ``data.*`` options -> (the corpus loader's,
    the tokenisation's): the loader takes what its signature names."""
    accepted = set(inspect.signature(loader).parameters)
    load = {k: v for k, v in options.items() if k in accepted}
    text = {k: v for k, v in options.items() if k not in accepted}
    return load, text


def translator_for(model, info: TranslationInfo) -> Translator:
    """The string-to-string model around a trained ``Seq2Seq`` (or ``model`` itself)."""
    if isinstance(model, Translator):
        return model
    max_decode = model.max_decode_length or int(info.max_target_length) + 5
    return Translator(
        model,
        info.source_vocabulary,
        info.target_vocabulary,
        int(info.max_source_length),
        max_decode,
        tokenizer=info.tokenizer,
        source_model=info.source_model,
        name="translator",
    )


@register_task("translation")
class TranslationTask(Task):
    """Sequence-to-sequence translation from a parallel corpus."""

    Options = TranslationOptions
    Info = TranslationInfo

    # -- config checks -------------------------------------------------------------
    @classmethod
    def check(cls, config: ExperimentConfig, options) -> None:
        declared = models.model_info(config.model.name).task
        if declared != "translation":
            raise ConfigError(
                f"model.name: {config.model.name!r} is a {declared} model; task 'translation' "
                "trains an encoder-decoder with encode/decode_step (seq2seq)."
            )
        entry = get_dataset(config.data.name)
        if entry.kind != "translation":
            raise ConfigError(
                f"data.name: task 'translation' reads translation datasets; "
                f"{config.data.name!r} is {entry.kind!r}."
            )
        tokenizer = config.data.options().get("tokenizer", "word")
        if tokenizer not in TOKENIZERS:
            raise ConfigError(
                f"data.tokenizer must be one of {list(TOKENIZERS)}. Received: {tokenizer!r}"
            )
        if config.train.bptt_steps:
            raise ConfigError(
                "train.bptt_steps: truncated BPTT is for language models (task 'sequence'); "
                "a translation model reads whole sentences. Remove train.bptt_steps."
            )

    @classmethod
    def metric_names(cls, config: ExperimentConfig, options) -> tuple[str, ...]:
        options = options if options is not None else cls.parse_options(config)
        base = ("loss", "accuracy", "bleu", "bleu_nopunct", "bleu_greedy", "chrf", "exact_match")
        return base + tuple(f"bleu_len_{label}" for label in options.bucket_labels())

    # -- data and model ------------------------------------------------------------
    def build_inputs(self) -> Inputs:
        cfg = self.config
        entry = get_dataset(cfg.data.name)
        module, _, fn = entry.load.partition(":")
        loader = getattr(importlib.import_module(module), fn)
        load, text = split_data_options(loader, check_options(cfg.data.name, cfg.data.options()))
        raw = loader(**{**load, "data_dir": cfg.data.dir})
        data = build_translation_datasets(
            raw,
            cfg.train.batch_size,
            seed=cfg.runtime.seed,
            **text,
        )
        info = TranslationInfo(
            dataset=cfg.data.name,
            num_train=data.num_train,
            num_eval=len(raw.splits["validation"][0]),
            source=raw.source,
            num_validation=len(raw.splits["validation"][0]),
            num_test=len(raw.splits["test"][0]),
            dropped_long_pairs=data.dropped_long,
            max_source_length=data.max_source_length,
            max_target_length=data.max_target_length,
            source_vocab_size=len(data.source_vocab),
            target_vocab_size=len(data.target_vocab),
            source_vocabulary=data.source_vocab,
            target_vocabulary=data.target_vocab,
            tokenizer=data.tokenizer,
            source_model=base64.b64encode(data.source_model).decode("ascii"),
            corpus=dict(raw.stats),
        )
        steps = cfg.train.steps_per_epoch or data.steps_per_epoch
        start = self.context.start_epoch * steps + self.context.start_step
        # the export is checked on the first test sentences and on odd ones
        check = [*raw.splits["test"][0][:NUM_CHECK_SENTENCES], *ODD_SENTENCES]
        return Inputs(
            train=data.train.skip(start) if start else data.train,
            eval=data.validation,
            steps_per_epoch=steps,
            info=info,
            check_batch=np.array(check, dtype=object),
            fingerprint=raw.fingerprint,
            data=TranslationRecord(raw),
        )

    def build_model(self, inputs: Inputs):
        info: TranslationInfo = inputs.info
        model = models.create_model(
            self.config.model.name,
            source_vocab_size=info.source_vocab_size,
            target_vocab_size=info.target_vocab_size,
            **self.config.model.kwargs(),
        )
        model.compile(
            optimizer=build_optimizer(self.config.train, inputs.steps_per_epoch),
            loss=SmoothedTokenLoss(self.config.train.label_smoothing),
            metrics=[MaskedAccuracy()],
            jit_compile=self.config.runtime.jit_compile,
        )
        return model

    def callbacks(self, inputs: Inputs, run_dir: Path) -> list:
        sources, references = inputs.data.raw.splits["validation"]
        sample = (sources[:NUM_VALIDATION_BLEU], references[:NUM_VALIDATION_BLEU])
        translators: dict[int, Translator] = {}  # one per trained model: traced once

        def validation_bleu(model) -> float:
            translator = translators.setdefault(id(model), translator_for(model, inputs.info))
            hypotheses, _ = translator.generate(sample[0], beam_width=1)
            return corpus_bleu(hypotheses, sample[1]).score

        timer = EpochTimer(inputs.data.epoch_seconds)
        if not sources:
            return [timer]
        bleu = ValidationMetric(
            "val_bleu", validation_bleu, self.config.train.validation_freq, self.context.log_metrics
        )
        return [timer, bleu]

    # -- evaluation ----------------------------------------------------------------
    def evaluate(self, model, inputs: Inputs) -> Evaluation:
        info: TranslationInfo = inputs.info
        translator = translator_for(model, info)
        network = translator.seq2seq
        val = network.evaluate(inputs.eval, verbose=0, return_dict=True)
        sources, references = inputs.data.raw.splits["test"]
        started = time.perf_counter()
        greedy, greedy_scores = translator.generate(sources, beam_width=1)
        greedy_seconds = time.perf_counter() - started
        bleu_greedy = corpus_bleu(greedy, references)
        if translator.beam_width > 1:
            started = time.perf_counter()
            best, best_scores = translator.generate(sources)
            beam_seconds = time.perf_counter() - started
            bleu = corpus_bleu(best, references)
        else:
            best, best_scores, beam_seconds, bleu = (
                greedy,
                greedy_scores,
                greedy_seconds,
                bleu_greedy,
            )
        bleu_nopunct = corpus_bleu(best, references, punctuation=False)
        chrf = corpus_chrf(best, references)
        lengths = [len(tokens) for tokens in tokenize(sources)] if sources else []
        buckets = bleu_by_length(best, references, lengths, self.options.length_buckets)
        metrics = {
            "loss": float(val["loss"]),
            "accuracy": float(val.get("accuracy", 0.0)),
            "bleu": bleu.score,
            "bleu_nopunct": bleu_nopunct.score,
            "bleu_greedy": bleu_greedy.score,
            "chrf": chrf.score,
            "exact_match": exact_match(best, references),
            **{f"bleu_len_{b.label}": b.score for b in buckets if b.score is not None},
        }
        run_metrics = {
            "num_params": float(network.count_params()),
            "decode_seconds_greedy": greedy_seconds,
            "decode_seconds_beam": beam_seconds,
            **{f"sentences_len_{b.label}": float(b.count) for b in buckets},
        }
        if inputs.data.epoch_seconds:
            run_metrics["seconds_per_epoch"] = float(np.mean(inputs.data.epoch_seconds))
        tags = {
            "bleu.signature": bleu.signature,
            "bleu_nopunct.signature": bleu_nopunct.signature,
            "chrf.signature": chrf.signature,
            "decode.beam_width": str(translator.beam_width),
            "decode.length_penalty": str(translator.length_penalty),
        }
        samples = {
            "sources": list(sources),
            "references": list(references),
            "greedy": greedy,
            "best": best,
            "scores": best_scores,
        }
        artifacts = [
            lambda out: (out / "bleu_signature.txt").write_text(bleu.signature + "\n"),
            lambda out: (out / "metric_signatures.json").write_text(
                json.dumps(
                    {
                        "bleu": bleu.signature,
                        "bleu_nopunct": bleu_nopunct.signature,
                        "chrf": chrf.signature,
                    },
                    indent=2,
                )
                + "\n"
            ),
            lambda out: write_samples(out, samples),
            lambda out: write_bleu_by_length(out, buckets, bleu.score),
        ]
        if network.use_attention:  # a model without attention has no maps to draw
            artifacts.append(lambda out: write_attention_plots(out, translator, samples["sources"]))
        return Evaluation(metrics, run_metrics, tags, artifacts)

    # -- serving ---------------------------------------------------------------------
    def serving(self, model, info: DatasetInfo, check_batch: Any = None) -> Serving:
        translator = translator_for(model, info)
        if check_batch is None:
            check_batch = np.array(["", "hallo"], dtype=object)
        return Serving(translator, [translator.endpoint(check_batch)])


# ---------------------------------------------------------------------- artifacts


def _sample_indices(count: int) -> list[int]:
    rng = np.random.default_rng(0)
    return sorted(rng.choice(count, size=min(NUM_SAMPLES, count), replace=False).tolist())


def write_samples(out_dir: Path, samples: dict[str, list]) -> None:
    """``sample_translations.md`` (30 seeded picks) and ``test_translations.jsonl`` (all)."""
    picks = _sample_indices(len(samples["sources"]))
    rows = [
        (
            i,
            samples["sources"][i],
            samples["references"][i],
            samples["greedy"][i],
            samples["best"][i],
            float(samples["scores"][i]),
        )
        for i in picks
    ]
    header = ("#", "source", "reference", "greedy", "beam/best", "score")
    (out_dir / "sample_translations.md").write_text(samples_markdown(header, rows))
    records = [
        {"source": s, "reference": r, "translation": h}
        for s, r, h in zip(samples["sources"], samples["references"], samples["best"], strict=True)
    ]
    write_jsonl(out_dir / "test_translations.jsonl", records)


def write_bleu_by_length(out_dir: Path, buckets: list[BucketBleu], overall: float) -> None:
    """``bleu_by_length.csv`` (bucket, tokens, sentences, BLEU) and ``bleu_by_length.png``
    (a bar per bucket, its sentence count above it, the overall BLEU as a line)."""
    from pipelines.plots import _pyplot, save_figure

    lines = ["bucket,min_tokens,max_tokens,sentences,bleu"]
    for b in buckets:
        upper = "" if b.upper is None else str(b.upper)
        score = "" if b.score is None else f"{b.score:.4f}"
        lines.append(f"{b.span},{b.lower},{upper},{b.count},{score}")
    (out_dir / "bleu_by_length.csv").write_text("\n".join(lines) + "\n")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.5 + 0.9 * len(buckets), 3.6))
    xs = range(len(buckets))
    scores = [b.score or 0.0 for b in buckets]
    ax.bar(xs, scores, color="#8fb3d9")
    for x, b in zip(xs, buckets, strict=True):
        ax.annotate(f"n={b.count}", (x, scores[x]), ha="center", va="bottom", fontsize=7)
    ax.axhline(overall, color="k", linestyle="--", linewidth=1, label=f"all: {overall:.1f}")
    ax.set_xticks(list(xs), [b.span for b in buckets])
    ax.set_xlabel("source length (tokens)")
    ax.set_ylabel("BLEU")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    save_figure(fig, out_dir / "bleu_by_length.png", "BLEU by source length")


def write_attention_plots(out_dir: Path, translator: Translator, sources: list[str]) -> None:
    """``attention_<n>.png``: greedy alignments of the first sampled test sentences."""
    if not sources:
        return
    heat = [sources[i] for i in _sample_indices(len(sources))[:NUM_ATTENTION_PLOTS]]
    src_ids, tgt_ids, attention = translator.greedy_with_attention(heat)
    rows = zip(heat, src_ids, tgt_ids, attention, strict=True)
    for n, (sentence, s_ids, t_ids, att) in enumerate(rows):
        s_words = [translator.source_vocabulary[i] or "<pad>" for i in s_ids if i != 0]
        t_words = []
        for i in t_ids:
            if i == 0:
                break
            t_words.append(translator.target_vocabulary[i])
        plot_attention(
            att[: len(t_words), : len(s_words)],
            s_words,
            t_words,
            out_dir / f"attention_{n}.png",
            sentence,
        )


def plot_attention(
    weights: np.ndarray, source: list[str], target: list[str], path: Path, title: str = ""
) -> Path:
    """One alignment matrix (target rows x source columns) as a heat map."""
    from pipelines.plots import _pyplot, save_figure

    plt = _pyplot()
    fig, ax = plt.subplots(
        figsize=(1.0 + 0.5 * max(4, len(source)), 1.0 + 0.45 * max(4, len(target)))
    )
    ax.imshow(weights, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(source)), source, rotation=60, ha="right")
    ax.set_yticks(range(len(target)), target)
    ax.set_xlabel("source")
    ax.set_ylabel("translation")
    ax.set_title(title[:60], fontsize=9)
    return save_figure(fig, path)
