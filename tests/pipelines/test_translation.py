"""The translation task on a tiny synthetic corpus, through the Task hooks: over-fitting
200 pairs, greedy = beam search of width 1, the SavedModel's string-to-string
``serving_default`` equal to the in-process decode, odd inputs (empty, unknown words,
over-long) answered rather than crashed on, the ``.keras`` round trip of the translator;
the config checks; the shared text metrics."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from pipelines.config import ConfigError, load_config, validate_config  # noqa: E402
from pipelines.decoding import beam_search_decode, greedy_decode  # noqa: E402
from pipelines.evaluation.text import corpus_bleu, exact_match  # noqa: E402
from pipelines.tasks.base import RunContext  # noqa: E402
from pipelines.tasks.translation import TranslationTask  # noqa: E402

DE = (
    "ich du er sie wir hund katze haus baum rot blau gross klein sieht hat mag den einen sehr nicht"
)
DE = DE.split()
EN = "i you he she we dog cat house tree red blue big small sees has likes the a very not".split()
ODD = ["", "   ", "Qwxzy blorft zzyzx!", " ".join(["sehr"] * 500), "?!.", "Ich"]


def _corpus(path, n: int, seed: int = 0):
    """``English<TAB>German`` lines (deu.txt layout, header and CRLF included)."""
    rng = random.Random(seed)
    mapping = dict(zip(DE, EN, strict=False))
    seen, lines = set(), ["1\t2"]
    while len(seen) < n:
        words = [rng.choice(DE) for _ in range(rng.randint(2, 6))]
        de = " ".join(words).capitalize() + "."
        if de not in seen:
            seen.add(de)
            lines.append(" ".join(mapping[w] for w in words).capitalize() + ".\t" + de)
    path.write_text("\r\n".join(lines) + "\r\n", encoding="utf-8")
    return path


def _config(path, model="seq2seq", task_options=None, test_size=2, **train):
    return validate_config(
        {
            "name": "tiny-nmt",
            "task": "translation",
            "model": {
                "name": model,
                "embedding_dim": 32,
                "units": 64,
                "attention_units": 32,
                "beam_width": 3,
                "length_penalty": 0.6,
            },
            "data": {
                "name": "tsv_translation",
                "path": str(path),
                "direction": "reverse",
                "test_size": test_size,
                "validation_size": 2,
            },
            "task_options": dict(task_options or {}),
            "train": {
                "epochs": 1,
                "batch_size": 20,
                "learning_rate": 0.01,
                "global_clipnorm": 5.0,
                **train,
            },
            "tracking": {"enabled": False, "gate": {"metric": "bleu"}},
        }
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    keras.utils.set_random_seed(0)
    path = _corpus(tmp_path_factory.mktemp("nmt") / "tiny.tsv", 204)
    task = TranslationTask(RunContext(_config(path)))
    inputs = task.build_inputs()
    model = task.build_model(inputs)  # built and compiled
    model.fit(inputs.train, epochs=40, steps_per_epoch=inputs.steps_per_epoch, verbose=0)
    return task, inputs, model


@pytest.mark.slow
def test_overfits_200_pairs(trained):
    task, inputs, model = trained
    sources, targets = inputs.data.raw.splits["train"]
    assert len(sources) == 200
    translator = task.serving(model, inputs.info, inputs.check_batch).model
    translations, scores = translator.generate(sources, beam_width=1)
    assert exact_match(translations, targets) >= 0.9, list(zip(sources, translations, strict=True))[
        :5
    ]
    assert np.all(np.isfinite(scores))


@pytest.mark.slow
def test_beam_width_one_is_greedy(trained):
    task, inputs, model = trained
    translator = task.serving(model, inputs.info).model
    ids = translator.prepare(tf.constant(inputs.data.raw.splits["train"][0][:64] + ODD))
    *context, states = model.encode(ids)  # the step protocol of pipelines.decoding
    args = (
        model.decode_step,
        states,
        context,
        tf.shape(ids)[0],
        translator.start_id,
        translator.end_id,
        translator.max_decode_length,
    )
    greedy, greedy_scores, _ = greedy_decode(*args, banned=(0, translator.start_id))
    beam, beam_scores = beam_search_decode(
        *args, beam_width=1, length_penalty=0.0, banned=(0, translator.start_id)
    )
    np.testing.assert_array_equal(greedy.numpy(), beam.numpy())
    np.testing.assert_allclose(greedy_scores.numpy(), beam_scores.numpy(), rtol=1e-5)
    a = translator.generate_fn(beam_width=1)(tf.constant(ODD))["translations"].numpy()
    b = translator.generate_fn(beam_width=3)(tf.constant(ODD))["translations"].numpy()
    assert a.shape == b.shape == (len(ODD),)


@pytest.mark.slow
def test_saved_model_equals_in_process_decode(trained, tmp_path):
    from pipelines.serving.export import write_saved_model

    task, inputs, model = trained
    serving = task.serving(model, inputs.info, inputs.check_batch)
    assert [e.name for e in serving.endpoints] == ["serving_default"]
    result = write_saved_model(
        serving.model, serving.endpoints, tmp_path / "1", model_name="tiny-nmt", warmup_requests=1
    )
    assert result.signatures == ["serving_default"]  # write_saved_model compared the strings
    served = tf.saved_model.load(str(result.path)).signatures["serving_default"]
    sentences = inputs.data.raw.splits["train"][0][:32] + ODD
    got = served(sentences=tf.constant(sentences))
    want = serving.model.generate_fn()(tf.constant(sentences))
    assert set(got) == {"translations", "scores"}
    np.testing.assert_array_equal(got["translations"].numpy(), want["translations"].numpy())
    np.testing.assert_allclose(got["scores"].numpy(), want["scores"].numpy(), atol=1e-5)
    # odd inputs are answered: strings, finite scores
    assert got["translations"].shape == (len(sentences),)
    assert np.all(np.isfinite(got["scores"].numpy()))


@pytest.mark.slow
def test_translator_keras_round_trip(trained, tmp_path):
    task, inputs, model = trained
    translator = task.serving(model, inputs.info).model
    path = tmp_path / "translator.keras"
    translator.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded).__name__ == "Translator" and loaded.seq2seq.beam_width == 3
    sentences = inputs.data.raw.splits["train"][0][:16] + ODD
    assert loaded.generate(sentences) == translator.generate(sentences)
    # reexport rebuilds the endpoints from the logged model and dataset_info.json
    info = TranslationTask.Info.from_dict(inputs.info.to_dict())
    again = task.serving(loaded, info)
    assert again.model is loaded


@pytest.mark.slow
def test_evaluate_and_artifacts(trained, tmp_path):
    task, inputs, model = trained
    evaluation = task.evaluate(model, inputs)
    metrics = evaluation.metrics
    _check_metric_names(task, evaluation)
    assert 0.0 <= metrics["bleu"] <= 100.0 + 1e-6 and 0.0 <= metrics["exact_match"] <= 1.0
    signature = evaluation.tags["bleu.signature"]
    assert "case:lc" in signature and "tok:13a" in signature
    assert evaluation.tags["decode.beam_width"] == "3"
    assert evaluation.run_metrics["num_params"] == model.count_params()
    for write in evaluation.artifacts:
        write(tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert {
        "sample_translations.md",
        "test_translations.jsonl",
        "bleu_signature.txt",
        "attention_0.png",
        "bleu_by_length.csv",
        "bleu_by_length.png",
    } <= names
    assert (tmp_path / "bleu_signature.txt").read_text().strip() == signature


def test_model_without_attention_evaluates_and_draws_no_attention_maps(tmp_path):
    """``seq2seq_no_attention`` through the same task: every metric, and every artifact
    but the attention maps (it has none)."""
    keras.utils.set_random_seed(0)
    path = _corpus(tmp_path / "tiny.tsv", 60)
    task = TranslationTask(RunContext(_config(path, model="seq2seq_no_attention")))
    inputs = task.build_inputs()
    model = task.build_model(inputs)
    assert not model.use_attention
    model.fit(inputs.train, epochs=2, steps_per_epoch=inputs.steps_per_epoch, verbose=0)
    evaluation = task.evaluate(model, inputs)
    _check_metric_names(task, evaluation)
    out = _write_artifacts(evaluation, tmp_path / "artifacts")
    names = {p.name for p in out.iterdir()}
    assert {"sample_translations.md", "bleu_signature.txt"} <= names
    assert not any(name.startswith("attention_") for name in names)


def _write_artifacts(evaluation, out):
    """Write every artifact of ``evaluation`` into the new folder ``out``; returns it."""
    out.mkdir()
    for write in evaluation.artifacts:
        write(out)
    return out


def _check_metric_names(task, evaluation):
    """``metric_names`` is what ``evaluate`` returns, less the BLEU of empty buckets."""
    names = set(TranslationTask.metric_names(task.config, task.options))
    empty = {
        "bleu_len_" + k.removeprefix("sentences_len_")
        for k, v in evaluation.run_metrics.items()
        if k.startswith("sentences_len_") and v == 0
    }
    assert set(evaluation.metrics) == names - empty


def test_bleu_by_source_length_bucket(tmp_path):
    """The task's bucket metrics and artifacts: each bucket's BLEU is sacrebleu's corpus
    BLEU over the test sentences whose source has that many tokens."""
    import csv
    import json

    import sacrebleu

    from data.text import tokenize

    keras.utils.set_random_seed(0)
    path = _corpus(tmp_path / "tiny.tsv", 80)
    buckets = {"length_buckets": [1, 5, 6, 40]}  # 40+: empty (sources have 3-7 tokens)
    config = _config(path, task_options=buckets, test_size=30, steps_per_epoch=3)
    task = TranslationTask(RunContext(config))
    inputs = task.build_inputs()
    model = task.build_model(inputs)
    model.fit(inputs.train, epochs=1, steps_per_epoch=3, verbose=0)
    evaluation = task.evaluate(model, inputs)
    _check_metric_names(task, evaluation)
    out = _write_artifacts(evaluation, tmp_path / "artifacts")
    records = [
        json.loads(line) for line in (out / "test_translations.jsonl").read_text().splitlines()
    ]
    lengths = [len(t) for t in tokenize([r["source"] for r in records])]
    metric = sacrebleu.metrics.BLEU(lowercase=True, tokenize="13a")
    rows = {r["bucket"]: r for r in csv.DictReader((out / "bleu_by_length.csv").open())}
    assert list(rows) == ["1-4", "5", "6-39", "40+"]
    for label, span, lo, hi in (("1_4", "1-4", 1, 4), ("5", "5", 5, 5), ("6_39", "6-39", 6, 39)):
        picks = [r for r, n in zip(records, lengths, strict=True) if lo <= n <= hi]
        assert picks, label  # the corpus has sources of every length 3-7
        want = metric.corpus_score(
            [r["translation"] for r in picks], [[r["reference"] for r in picks]]
        ).score
        assert evaluation.metrics[f"bleu_len_{label}"] == pytest.approx(want)
        assert evaluation.run_metrics[f"sentences_len_{label}"] == len(picks)
        assert int(rows[span]["sentences"]) == len(picks)
        assert float(rows[span]["bleu"]) == pytest.approx(want, abs=1e-4)
    # the empty bucket: a count of 0, no BLEU (not a 0 that would read as a result)
    assert "bleu_len_40_plus" not in evaluation.metrics
    assert evaluation.run_metrics["sentences_len_40_plus"] == 0
    assert rows["40+"]["sentences"] == "0" and rows["40+"]["bleu"] == ""
    assert (out / "bleu_by_length.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "buckets",
    [[5, 3], [], [0, 4], [1, 1, 4], "1,5", [1, 2.5], [True, 4], None],
)
def test_invalid_length_buckets_name_the_field(tmp_path, buckets):
    from pipelines.train import check_config

    config = _config(tmp_path / "corpus.tsv", task_options={"length_buckets": buckets})
    with pytest.raises(ConfigError, match=r"task_options\.length_buckets: .*strictly increasing"):
        check_config(config)


def test_length_buckets_default_and_unknown_options(tmp_path):
    from pipelines.train import check_config

    config = _config(tmp_path / "corpus.tsv")
    names = TranslationTask.metric_names(config, None)
    assert {"bleu_len_1_4", "bleu_len_5", "bleu_len_6", "bleu_len_7_plus"} <= set(names)
    config = _config(tmp_path / "corpus.tsv", task_options={"length_bucket": [1, 5]})
    with pytest.raises(
        ConfigError, match="task_options.length_bucket: unknown option.*length_buckets"
    ):
        check_config(config)


@pytest.mark.slow
def test_resumed_stream_continues_where_it_stopped(tmp_path):
    path = _corpus(tmp_path / "tiny.tsv", 104)
    config = _config(path, steps_per_epoch=3)
    fresh = TranslationTask(RunContext(config)).build_inputs()
    resumed = TranslationTask(RunContext(config, start_epoch=1, start_step=1)).build_inputs()
    want = [b[1].numpy() for b in fresh.train.take(6)][4:]
    got = [b[1].numpy() for b in resumed.train.take(2)]
    for w, g in zip(want, got, strict=True):
        np.testing.assert_array_equal(w, g)


@pytest.mark.slow
def test_through_the_driver_and_reexport(tmp_path, monkeypatch):
    """What a user runs: ``deeptrends train`` (tags, run metrics, artifacts, a served
    string-to-string SavedModel), then ``deeptrends export`` of the registered version."""
    from mlflow import MlflowClient

    from pipelines.serving.reexport import export_registered
    from pipelines.train import run_experiment

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    raw = _config(_corpus(tmp_path / "tiny.tsv", 64), steps_per_epoch=2, verbose=0).to_dict()
    raw["tracking"] = {"uri": uri, "gate": {"metric": "bleu", "mode": "max"}}
    raw["runtime"]["work_dir"] = str(tmp_path / "runs")
    raw["export"] = {"serving_dir": str(tmp_path / "serving"), "warmup_requests": 1}
    summary = run_experiment(validate_config(raw))
    assert {"bleu", "bleu_greedy", "exact_match"} <= set(summary.metrics)
    run = MlflowClient(uri).get_run(summary.run_id)
    assert "tok:13a" in run.data.tags["bleu.signature"]
    assert {"num_params", "seconds_per_epoch", "eval_bleu"} <= set(run.data.metrics)
    # the default buckets: a BLEU per non-empty bucket, a count per bucket
    counts = {k: v for k, v in run.data.metrics.items() if k.startswith("sentences_len_")}
    assert set(counts) == {f"sentences_len_{x}" for x in ("1_4", "5", "6", "7_plus")}
    assert sum(counts.values()) == 2  # the test split
    for name, count in counts.items():
        bleu = f"eval_bleu_len_{name.removeprefix('sentences_len_')}"
        assert (bleu in run.data.metrics) == (count > 0), (name, count)
    artifacts = Path(summary.run_dir) / "artifacts"
    assert {
        "bleu_signature.txt",
        "sample_translations.md",
        "learning_curves.png",
        "bleu_by_length.csv",
        "bleu_by_length.png",
    } <= {p.name for p in artifacts.iterdir()}
    sentences = tf.constant(["Ich sehe den Hund.", ""])
    served = tf.saved_model.load(summary.export_path).signatures["serving_default"]
    again = export_registered(f"models:/tiny-nmt/{summary.model_version}", tmp_path / "re", uri)
    reloaded = tf.saved_model.load(str(again)).signatures["serving_default"]
    np.testing.assert_array_equal(
        served(sentences=sentences)["translations"].numpy(),
        reloaded(sentences=sentences)["translations"].numpy(),
    )


def test_config_checks_name_the_field(tmp_path):
    from pipelines.train import check_config

    config = _config(tmp_path / "corpus.tsv")
    check_config(config)  # valid: nothing runs, no file is read
    assert "bleu" in TranslationTask.metric_names(config, None)
    raw = config.to_dict()
    with pytest.raises(ConfigError, match="train.bptt_steps"):
        check_config(validate_config({**raw, "train": {**raw["train"], "bptt_steps": 5}}))
    with pytest.raises(ConfigError, match="data.name"):
        check_config(validate_config({**raw, "data": {"name": "long_dependency"}}))
    with pytest.raises(ConfigError, match="model.name: 'gru_lm' is a sequence model"):
        check_config(validate_config({**raw, "model": {"name": "gru_lm"}}))
    gate = {**raw["tracking"], "enabled": True, "gate": {"metric": "perplexity", "mode": "min"}}
    with pytest.raises(ConfigError, match="tracking.gate.metric"):
        check_config(validate_config({**raw, "tracking": gate}))


def test_shipped_translation_configs_validate():
    from pipelines.train import check_config

    for name in ("nmt-deu-eng", "nmt-deu-eng-lstm", "claim-attention-translation"):
        check_config(load_config(name))


def test_bleu_by_length_is_sacrebleu_per_bucket():
    import sacrebleu

    from pipelines.evaluation.text import bleu_by_length, check_length_buckets

    hyps = ["a cat", "the dog runs", "he sees the red house", "we like it", "x", "big tree"]
    refs = ["a cat", "the dog ran", "he sees a red house", "we like that", "y", "a big tree"]
    lengths = [2, 3, 5, 4, 1, 9]
    got = bleu_by_length(hyps, refs, lengths, [2, 4, 6, 20])
    assert [b.label for b in got] == ["2_3", "4_5", "6_19", "20_plus"]
    assert [b.span for b in got] == ["2-3", "4-5", "6-19", "20+"]
    assert [b.count for b in got] == [2, 2, 1, 0]  # the 1-token source is in no bucket
    metric = sacrebleu.metrics.BLEU(lowercase=True, tokenize="13a")
    for bucket, picks in zip(got[:3], ([0, 1], [2, 3], [5]), strict=True):
        want = metric.corpus_score([hyps[i] for i in picks], [[refs[i] for i in picks]]).score
        assert bucket.score == pytest.approx(want)
    assert got[3].score is None  # empty
    assert got[0].score != got[1].score  # the buckets are scored apart
    assert bleu_by_length([], [], [], [1])[0].count == 0
    with pytest.raises(ValueError, match="2 hypotheses but 1 lengths"):
        bleu_by_length(hyps[:2], refs[:2], [1], [1])
    with pytest.raises(
        ValueError, match="length_buckets must be .*Received: length_buckets=\\[3, 2\\]"
    ):
        check_length_buckets([3, 2])


def test_text_metrics():
    hyps = ["the cat sat on the mat.", "a dog"]
    assert corpus_bleu(hyps, ["The cat sat on the mat.", "a dog"]).score == pytest.approx(100.0)
    several = corpus_bleu(hyps, [["no match at all here", "The cat sat on the mat."], ["a dog"]])
    assert several.score == pytest.approx(100.0) and "nrefs:var" in several.signature
    assert exact_match(["Hello , Tom!", "no"], ["hello, tom !", "yes"]) == 0.5
    assert exact_match(["b"], [["a", "B"]]) == 1.0 and exact_match([], []) == 0.0
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        corpus_bleu(hyps, ["x"])
