"""The translation task end to end on a tiny synthetic corpus: over-fitting 200 pairs,
greedy = beam search of width 1, the SavedModel's string-to-string ``serving_default``
equal to the in-process decode, and odd inputs (empty, unknown words, over-long)
answered rather than crashed on."""

from __future__ import annotations

import random

import numpy as np
import pytest

pytestmark = pytest.mark.slow

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from pipelines.config import validate_config  # noqa: E402
from pipelines.decoding import beam_search_decode, greedy_decode  # noqa: E402
from pipelines.tasks.translation import TranslationTask, _normalise  # noqa: E402

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


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    keras.utils.set_random_seed(0)
    path = _corpus(tmp_path_factory.mktemp("nmt") / "tiny.tsv", 204)
    config = validate_config(
        {
            "name": "tiny-nmt",
            "task": "translation",
            "model": {
                "name": "seq2seq",
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
                "test_size": 2,
                "validation_size": 2,
            },
            "train": {"epochs": 1, "batch_size": 20, "learning_rate": 0.01, "global_clipnorm": 5.0},
            "tracking": {"enabled": False, "gate": {"metric": "bleu"}},
        }
    )
    task = TranslationTask(config)
    inputs = task.build_inputs()
    model = task.build_model(inputs.info)
    task.compile_model(model, inputs)
    model.fit(inputs.train, epochs=40, steps_per_epoch=inputs.steps_per_epoch, verbose=0)
    return task, inputs, model


def test_overfits_200_pairs(trained):
    task, inputs, model = trained
    sources, targets = task.data.raw.splits["train"]
    assert len(sources) == 200
    translations, scores = task.translate(
        task.translator(model, inputs.info), sources, beam_width=1
    )
    pairs = zip(_normalise(translations), _normalise(targets), strict=True)
    exact = np.mean([h == r for h, r in pairs])
    assert exact >= 0.9, list(zip(sources, translations, strict=False))[:5]
    assert np.all(np.isfinite(scores))


def test_beam_width_one_is_greedy(trained):
    task, inputs, model = trained
    translator = task.translator(model, inputs.info)
    ids = translator.tokenize(tf.constant(task.data.raw.splits["train"][0][:64] + ODD))
    annotations, keys, mask, states = model.encode(ids)
    args = (
        translator._step,
        states,
        [annotations, keys, mask],
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
    a = translator.translate_fn(beam_width=1)(tf.constant(ODD))["translations"].numpy()
    b = translator.translate_fn(beam_width=3)(tf.constant(ODD))["translations"].numpy()
    assert a.shape == b.shape == (len(ODD),)


def test_saved_model_equals_in_process_decode(trained, tmp_path):
    from pipelines.serving.export import write_saved_model

    task, inputs, model = trained
    task._info_for_serving = inputs.info
    translator = task.serving_model(model)
    endpoints = task.endpoints(translator, inputs.info, task.check_batch(inputs))
    result = write_saved_model(
        translator, endpoints, tmp_path / "1", model_name="tiny-nmt", warmup_requests=1
    )
    assert result.signatures == [
        "serving_default"
    ]  # write_saved_model compared every string already
    served = tf.saved_model.load(str(result.path)).signatures["serving_default"]
    sentences = task.data.raw.splits["train"][0][:32] + ODD
    got = served(sentences=tf.constant(sentences))
    want = translator.translate_fn()(tf.constant(sentences))
    assert set(got) == {"translations", "scores"}
    np.testing.assert_array_equal(got["translations"].numpy(), want["translations"].numpy())
    np.testing.assert_allclose(got["scores"].numpy(), want["scores"].numpy(), atol=1e-5)
    # odd inputs are answered: strings, finite scores
    assert got["translations"].shape == (len(sentences),)
    assert np.all(np.isfinite(got["scores"].numpy()))


def test_evaluate_and_artifacts(trained, tmp_path):
    task, inputs, model = trained
    metrics = task.evaluate(model, inputs)
    assert set(task.metric_names) <= set(metrics)
    assert 0.0 <= metrics["bleu"] <= 100.0 + 1e-6 and 0.0 <= metrics["exact_match"] <= 1.0
    assert "case:lc" in task.bleu_signature and "tok:13a" in task.bleu_signature
    task.write_artifacts(model, {"loss": [2.0, 1.0], "val_loss": [2.1, 1.2]}, inputs, tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert {
        "sample_translations.md",
        "bleu_signature.txt",
        "attention_0.png",
        "learning_curves.png",
    } <= names
