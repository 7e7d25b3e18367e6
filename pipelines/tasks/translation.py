"""Neural machine translation: teacher-forced training of an attentional encoder-decoder
(``models/seq2seq.py``), corpus BLEU (sacrebleu, lower-cased, 13a) with greedy and beam
decoding, exact match, attention heat-maps and a table of sample translations.

Serving is string to string: ``serving_default`` takes ``sentences`` (string [None]) and
returns ``translations`` (string [None]) and ``scores`` (float [None]). ``Translator``
holds the network and both vocabularies (built from the training split only), so the
SavedModel and the logged ``.keras`` model carry them; standardisation
(``data.translation.standardize``), token lookup, encoder, ``tf.while_loop`` decoding and
detokenisation are one graph. The same ``tf.function`` computes the evaluation metrics in
process, so the served translations are the evaluated ones.

Decoding defaults (``beam_width``, ``length_penalty``, ``max_decode_length``) are
arguments of the ``seq2seq`` builder (``model.beam_width: 5``), like keras-hub's
generation settings; they travel with the saved model.
"""

from __future__ import annotations

import importlib
import json
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

import models
import models.seq2seq  # noqa: F401 - registers Seq2Seq for loading saved translators
from data.catalog import check_options, get_dataset
from data.translation import END, START, build_translation_datasets, detokenize, standardize
from pipelines.config import ConfigError
from pipelines.decoding import beam_search_decode, greedy_decode
from pipelines.optim import build_optimizer
from pipelines.tasks.base import Endpoint, Inputs, Task, register_task
from pipelines.tasks.sequence import EpochTimer, log_run_metrics

# data options consumed here (tokenisation), not by the corpus loader
TEXT_OPTIONS = {
    "max_length": 40,
    "source_vocab_size": 20000,
    "target_vocab_size": 20000,
    "min_count": 1,
}
EVAL_BATCH = 256


class _Untracked:
    """A plain holder that TensorFlow's object tracking does not walk into."""

    def __init__(self):
        self.items: dict = {}


@keras.saving.register_keras_serializable(package="deeptrends")
class Translator(keras.Model):
    """Strings in, strings out, around a ``Seq2Seq`` network.

    Args:
        seq2seq: keras.Model. The network (``encode`` / ``decode_step``).
        source_vocabulary: list. Source tokens, index = id (``""`` padding, ``[UNK]``,
            ``[END]`` first).
        target_vocabulary: list. Target tokens (``""``, ``[UNK]``, ``[START]``, ``[END]`` first).
        max_source_length: int. Longer inputs are truncated to this many tokens (with ``[END]``).
        max_decode_length: int. The most target tokens generated.
    """

    def __init__(
        self,
        seq2seq,
        source_vocabulary,
        target_vocabulary,
        max_source_length,
        max_decode_length,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.seq2seq = seq2seq
        self.source_vocabulary = list(source_vocabulary)
        self.target_vocabulary = list(target_vocabulary)
        self.max_source_length = int(max_source_length)
        self.max_decode_length = int(max_decode_length)
        self.source_lookup = keras.layers.StringLookup(
            vocabulary=self.source_vocabulary[2:],
            mask_token="",
            oov_token="[UNK]",
            name="source_lookup",
        )
        self.source_end = self.source_vocabulary.index(END)
        self.start_id = self.target_vocabulary.index(START)
        self.end_id = self.target_vocabulary.index(END)
        self._translate_fns = _Untracked()  # tf.functions per (beam_width, length_penalty)
        self.built = True  # the weights are the (built) network's

    def call(self, inputs, training=False):
        return self.seq2seq(inputs, training=training)

    # -- in-graph pipeline -----------------------------------------------------------
    def tokenize(self, sentences):
        """string [B] -> ids int32 [B, <= max_source_length] ending in [END], 0-padded."""
        tokens = tf.strings.split(standardize(sentences))
        tokens = tokens[:, : self.max_source_length - 1].to_tensor(default_value="")
        ids = tf.cast(self.source_lookup(tokens), tf.int32)  # "" -> 0, unknown -> 1
        lengths = tf.reduce_sum(tf.cast(ids > 0, tf.int32), axis=1)
        ids = tf.pad(ids, [[0, 0], [0, 1]])
        return ids + self.source_end * tf.one_hot(lengths, tf.shape(ids)[1], dtype=tf.int32)

    def detokenize(self, ids):
        """target ids [B, T] -> string [B]; padding, [START] and [END] print as nothing."""
        words = ["" if w in ("", START, END) else w for w in self.target_vocabulary]
        return detokenize(tf.gather(tf.constant(words), ids))

    def _step(self, token, states, annotations, keys, mask):
        return self.seq2seq.decode_step(token, states, annotations, keys, mask)

    def decode(self, ids, beam_width: int = 1, length_penalty: float = 0.0):
        """ids [B, S] -> (target ids [B, T], scores [B], attention [B, T, S] or None)."""
        annotations, keys, mask, states = self.seq2seq.encode(ids)
        batch = tf.shape(ids)[0]
        context = [annotations, keys, mask]
        banned = (0, self.start_id)
        max_length = self.max_decode_length
        if beam_width == 1:
            return greedy_decode(
                self._step, states, context, batch, self.start_id, self.end_id, max_length, banned
            )
        tokens, scores = beam_search_decode(
            self._step,
            states,
            context,
            batch,
            self.start_id,
            self.end_id,
            max_length,
            beam_width,
            length_penalty,
            banned,
        )
        return tokens, scores, None

    def translate_fn(self, beam_width: int | None = None, length_penalty: float | None = None):
        """The ``tf.function`` ``sentences -> {"translations", "scores"}`` (one per setting)."""
        beam_width = self.seq2seq.beam_width if beam_width is None else int(beam_width)
        length_penalty = (
            self.seq2seq.length_penalty if length_penalty is None else float(length_penalty)
        )
        key = (beam_width, length_penalty)
        cache = self._translate_fns.items
        if key not in cache:

            @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="sentences")])
            def translate(sentences):
                tokens, scores, _ = self.decode(
                    self.tokenize(sentences), beam_width, length_penalty
                )
                return {"translations": self.detokenize(tokens), "scores": scores}

            cache[key] = translate
        return cache[key]

    def greedy_with_attention(self, sentences):
        """Eager helper for heat-maps: (source ids, target ids, attention [T, S]) per sentence."""
        ids = self.tokenize(tf.constant(sentences))
        tokens, _, attention = self.decode(ids, 1)
        return ids.numpy(), tokens.numpy(), attention.numpy()

    def get_config(self):
        return {
            **super().get_config(),
            "seq2seq": keras.saving.serialize_keras_object(self.seq2seq),
            "source_vocabulary": self.source_vocabulary,
            "target_vocabulary": self.target_vocabulary,
            "max_source_length": self.max_source_length,
            "max_decode_length": self.max_decode_length,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["seq2seq"] = keras.saving.deserialize_keras_object(config["seq2seq"])
        return cls(**config)


@keras.saving.register_keras_serializable(package="deeptrends")
class MaskedAccuracy(keras.metrics.Mean):
    """Next-token accuracy over non-padding positions (teacher forcing)."""

    def __init__(self, name="accuracy", **kwargs):
        super().__init__(name=name, **kwargs)

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_true = keras.ops.cast(y_true, "int32")
        hit = keras.ops.cast(
            keras.ops.equal(keras.ops.cast(keras.ops.argmax(y_pred, axis=-1), "int32"), y_true),
            "float32",
        )
        return super().update_state(
            hit, sample_weight=keras.ops.cast(keras.ops.not_equal(y_true, 0), "float32")
        )


def corpus_bleu(hypotheses: list[str], references: list[str]):
    """sacrebleu corpus BLEU, lower-cased, 13a tokenisation: (score, signature)."""
    import sacrebleu

    metric = sacrebleu.metrics.BLEU(lowercase=True, tokenize="13a")
    result = metric.corpus_score(hypotheses, [references])
    return float(result.score), str(metric.get_signature())


def _normalise(texts: list[str]) -> list[str]:
    return (
        [s.decode("utf-8") for s in standardize(tf.constant(texts, dtype=tf.string)).numpy()]
        if texts
        else []
    )


@register_task("translation")
class TranslationTask(Task):
    """Sequence-to-sequence translation from a parallel corpus."""

    metric_names = ("loss", "accuracy", "bleu", "bleu_greedy", "exact_match")

    # -- data and model -------------------------------------------------------------
    def build_inputs(self) -> Inputs:
        cfg = self.config
        entry = get_dataset(cfg.data.name)
        if entry.kind != "translation":
            raise ConfigError(
                f"data.name: task 'translation' reads translation datasets; "
                f"{cfg.data.name!r} is {entry.kind!r}."
            )
        merged = check_options(cfg.data.name, cfg.data.options())
        options = {k: v for k, v in merged.items() if k not in TEXT_OPTIONS}
        text = {k: merged.get(k, default) for k, default in TEXT_OPTIONS.items()}
        module, _, fn = entry.load.partition(":")
        raw = getattr(importlib.import_module(module), fn)(data_dir=cfg.data.dir, **options)
        data = build_translation_datasets(raw, cfg.train.batch_size, seed=cfg.runtime.seed, **text)
        self.data = data
        info = {
            "dataset": cfg.data.name,
            "source": raw.source,
            "num_train": data.num_train,
            "num_validation": len(raw.splits["validation"][0]),
            "num_test": len(raw.splits["test"][0]),
            "dropped_long_pairs": data.dropped_long,
            "max_source_length": data.max_source_length,
            "max_target_length": data.max_target_length,
            "source_vocab_size": len(data.source_vocab),
            "target_vocab_size": len(data.target_vocab),
            "source_vocabulary": data.source_vocab,
            "target_vocabulary": data.target_vocab,
            **{f"corpus_{k}": v for k, v in raw.stats.items()},
        }
        return Inputs(
            train=data.train,
            eval=data.validation,
            steps_per_epoch=cfg.train.steps_per_epoch or data.steps_per_epoch,
            info=info,
            fingerprint=raw.fingerprint,
        )

    def build_model(self, info: dict[str, Any]):
        kwargs = {
            "source_vocab_size": info["source_vocab_size"],
            "target_vocab_size": info["target_vocab_size"],
        }
        kwargs.update(self.config.model.kwargs())
        return models.create_model(self.config.model.name, **kwargs)

    def compile_model(self, model, inputs: Inputs) -> None:
        model.compile(
            optimizer=build_optimizer(self.config.train, inputs.steps_per_epoch),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=0),
            metrics=[MaskedAccuracy()],
            jit_compile=self.config.runtime.jit_compile,
        )

    def callbacks(self, run_dir: Path, inputs: Inputs) -> list:
        self._timer = EpochTimer()
        return [self._timer]

    # -- the string-to-string model ----------------------------------------------------
    def translator(self, model, info: dict[str, Any]) -> Translator:
        if isinstance(model, Translator):
            return model
        cached = getattr(self, "_translator", None)
        if cached is not None and cached.seq2seq is model:
            return cached
        max_decode = model.max_decode_length or int(info["max_target_length"]) + 5
        self._translator = Translator(
            model,
            info["source_vocabulary"],
            info["target_vocabulary"],
            int(info["max_source_length"]),
            max_decode,
            name="translator",
        )
        return self._translator

    def serving_model(self, model):
        return self.translator(model, self._info_for_serving)

    def translate(
        self, translator: Translator, sentences: list[str], beam_width=None, length_penalty=None
    ):
        fn = translator.translate_fn(beam_width, length_penalty)
        out, scores = [], []
        for i in range(0, len(sentences), EVAL_BATCH):
            result = fn(tf.constant(sentences[i : i + EVAL_BATCH], dtype=tf.string))
            out.extend(s.decode("utf-8") for s in result["translations"].numpy())
            scores.extend(result["scores"].numpy().tolist())
        return out, scores

    # -- evaluation ----------------------------------------------------------------
    def evaluate(self, model, inputs: Inputs) -> dict[str, float]:
        self._info_for_serving = inputs.info
        translator = self.translator(model, inputs.info)
        val = model.evaluate(inputs.eval, verbose=0, return_dict=True)
        sources, references = self.data.raw.splits["test"]
        started = time.perf_counter()
        greedy, greedy_scores = self.translate(translator, sources, beam_width=1)
        greedy_seconds = time.perf_counter() - started
        bleu_greedy, signature = corpus_bleu(greedy, references)
        metrics = {
            "loss": float(val["loss"]),
            "accuracy": float(val.get("accuracy", 0.0)),
            "bleu_greedy": bleu_greedy,
        }
        width = model.beam_width
        if width > 1:
            started = time.perf_counter()
            best, best_scores = self.translate(translator, sources)
            beam_seconds = time.perf_counter() - started
            metrics["bleu"], _ = corpus_bleu(best, references)
        else:
            best, best_scores, beam_seconds = greedy, greedy_scores, greedy_seconds
            metrics["bleu"] = bleu_greedy
        refs_norm = _normalise(references)
        hyps_norm = _normalise(best)
        metrics["exact_match"] = (
            float(np.mean([h == r for h, r in zip(hyps_norm, refs_norm, strict=True)]))
            if refs_norm
            else 0.0
        )
        self._samples = {
            "sources": sources,
            "references": references,
            "greedy": greedy,
            "best": best,
            "scores": best_scores,
        }
        self.bleu_signature = signature
        extra = {
            "num_params": float(model.count_params()),
            "decode_seconds_greedy": greedy_seconds,
            "decode_seconds_beam": beam_seconds,
        }
        if getattr(self, "_timer", None) is not None and self._timer.seconds:
            extra["seconds_per_epoch"] = float(np.mean(self._timer.seconds))
        log_run_metrics(extra)
        import mlflow

        if mlflow.active_run() is not None:
            mlflow.set_tags(
                {
                    "bleu.signature": signature,
                    "decode.beam_width": str(width),
                    "decode.length_penalty": str(model.length_penalty),
                }
            )
        return metrics

    def write_artifacts(self, model, history, inputs: Inputs, out_dir: Path) -> None:
        from pipelines import plots

        plots.learning_curves(history, out_dir / "learning_curves.png", title=self.config.name)
        samples = getattr(self, "_samples", None)
        if not samples:
            return
        (out_dir / "bleu_signature.txt").write_text(self.bleu_signature + "\n")
        rng = np.random.default_rng(0)
        picks = sorted(
            rng.choice(
                len(samples["sources"]), size=min(30, len(samples["sources"])), replace=False
            )
        )
        lines = [
            "| # | source | reference | greedy | beam/best | score |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        esc = lambda s: s.replace("|", "\\|")  # noqa: E731
        for i in picks:
            lines.append(
                f"| {i} | {esc(samples['sources'][i])} | {esc(samples['references'][i])} | "
                f"{esc(samples['greedy'][i])} | {esc(samples['best'][i])} | "
                f"{samples['scores'][i]:.3f} |"
            )
        (out_dir / "sample_translations.md").write_text("\n".join(lines) + "\n")
        with open(out_dir / "test_translations.jsonl", "w", encoding="utf-8") as f:
            rows = zip(samples["sources"], samples["references"], samples["best"], strict=True)
            for s, r, h in rows:
                f.write(
                    json.dumps({"source": s, "reference": r, "translation": h}, ensure_ascii=False)
                    + "\n"
                )
        translator = self.translator(model, inputs.info)
        heat = [samples["sources"][i] for i in picks[:4]]
        src_ids, tgt_ids, attention = translator.greedy_with_attention(heat)
        rows = zip(heat, src_ids, tgt_ids, attention, strict=True)
        for n, (sentence, s_ids, t_ids, att) in enumerate(rows):
            s_words = [translator.source_vocabulary[i] or "<pad>" for i in s_ids if i != 0]
            t_words = []
            for i in t_ids:
                if i == 0:
                    break
                t_words.append(translator.target_vocabulary[i])
            plots_attention(
                att[: len(t_words), : len(s_words)],
                s_words,
                t_words,
                out_dir / f"attention_{n}.png",
                sentence,
            )

    # -- serving ------------------------------------------------------------------
    def check_batch(self, inputs: Inputs) -> Any:
        """The test batch: the first test sentences, and an empty, an unknown-word and an
        over-long sentence, which the server must answer too."""
        sources = list(self.data.raw.splits["test"][0][:64])
        sources += ["", "Qwxzy blorft zzyzx.", " ".join(["sehr"] * 200)]
        return np.array(sources, dtype=object)

    def endpoints(self, model, info: dict[str, Any], check_batch: Any = None) -> list[Endpoint]:
        self._info_for_serving = info
        translator = self.translator(model, info)
        fn = translator.translate_fn()
        if check_batch is None:
            check_batch = np.array(["", "hallo"], dtype=object)
        spec = tf.TensorSpec([None], tf.string, name="sentences")
        return [Endpoint("serving_default", fn, [spec], [np.asarray(check_batch, dtype=object)])]


def plots_attention(
    weights: np.ndarray, source: list[str], target: list[str], path: Path, title: str = ""
) -> Path:
    """One alignment matrix (target rows x source columns) as a heat map."""
    from pipelines.plots import _pyplot

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
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
