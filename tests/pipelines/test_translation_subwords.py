"""Translation with WordPiece subwords (``data.tokenizer: wordpiece``) end to end on the
tiny synthetic corpus: vocabularies learned from the training split, the string-to-string
SavedModel equal to the in-process decode, and no ``[UNK]`` in the exported model's output
for sentences of words never seen in training (made of seen characters)."""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from data.text import SUFFIX, UNK  # noqa: E402
from pipelines.tasks.base import RunContext  # noqa: E402
from pipelines.tasks.translation import TranslationTask  # noqa: E402
from tests.pipelines.test_translation import ODD, _config, _corpus  # noqa: E402

# German words absent from the corpus, written with its characters only
UNSEEN = ["Hundebaum.", "Ich sehe einen Katzenhausbaum.", "Rotblau gross.", "Wirsiehtsie"]


@pytest.fixture(scope="module", params=["wordpiece", "bpe"])
def trained(tmp_path_factory, request):
    keras.utils.set_random_seed(0)
    path = _corpus(tmp_path_factory.mktemp("nmt-wp") / "tiny.tsv", 104)
    config = _config(path)
    config.data.tokenizer = request.param
    config.data.source_vocab_size = config.data.target_vocab_size = 60
    task = TranslationTask(RunContext(config))
    inputs = task.build_inputs()
    model = task.build_model(inputs)
    model.fit(inputs.train, epochs=3, steps_per_epoch=inputs.steps_per_epoch, verbose=0)
    return task, inputs, model


def test_subword_vocabularies_from_training(trained):
    task, inputs, _ = trained
    info = inputs.info
    assert info.tokenizer == task.config.data.tokenizer
    train_chars = {c for s in inputs.data.raw.splits["train"][0] for c in s.lower() if c != " "}
    pieces = "".join(info.source_vocabulary)
    assert all(c in pieces for c in train_chars)
    assert len(info.target_vocabulary) <= 60 + 2 * len(train_chars)  # subwords, not all words


@pytest.mark.slow
def test_exported_subword_model_never_writes_unk(trained, tmp_path):
    from pipelines.serving.export import write_saved_model

    task, inputs, model = trained
    serving = task.serving(model, inputs.info, inputs.check_batch)
    result = write_saved_model(
        serving.model, serving.endpoints, tmp_path / "1", model_name="tiny-nmt", warmup_requests=1
    )
    served = tf.saved_model.load(str(result.path)).signatures["serving_default"]
    sentences = UNSEEN + inputs.data.raw.splits["test"][0] + ODD
    got = served(sentences=tf.constant(sentences))
    want = serving.model.generate_fn()(tf.constant(sentences))
    np.testing.assert_array_equal(got["translations"].numpy(), want["translations"].numpy())
    texts = [t.decode() for t in got["translations"].numpy()]
    assert not [t for t in texts if UNK in t or SUFFIX in t or "\u2581" in t], texts
    # the unseen source words were split into pieces, not looked up as [UNK]
    ids = serving.model.prepare(tf.constant(UNSEEN)).numpy()
    assert 1 not in ids  # id 1 is [UNK]
    # the .keras round trip keeps the tokenizer
    path = tmp_path / "translator.keras"
    serving.model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.tokenizer == task.config.data.tokenizer
    assert loaded.generate(UNSEEN) == serving.model.generate(UNSEEN)


def test_tokenizer_is_checked_before_anything_runs(tmp_path):
    from pipelines.config import ConfigError, validate_config
    from pipelines.train import check_config

    raw = _config(tmp_path / "corpus.tsv").to_dict()
    raw["data"]["tokenizer"] = "sentencepiece"
    with pytest.raises(ConfigError, match=r"data.tokenizer must be one of \['word', 'wordpiece'"):
        check_config(validate_config(raw))
