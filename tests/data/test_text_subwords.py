"""WordPiece subwords (``data.tokenizer: wordpiece``): learned from the training text only,
every character of it kept, so unseen words made of seen characters split into pieces
instead of ``[UNK]``; ``detokenize`` inverts the pieces to the standardised text; a
tokenizer name outside ``word | wordpiece`` is a clear data error."""

from __future__ import annotations

import pytest

tf = pytest.importorskip("tensorflow")

from data.splits import DataError  # noqa: E402
from data.text import (  # noqa: E402
    SOURCE_RESERVED,
    SUFFIX,
    TARGET_RESERVED,
    UNK,
    check_tokenizer,
    detokenize,
    learn_bpe,
    learn_word_pieces,
    standardized,
    tokenize,
    tokenize_bpe,
    tokenize_pieces,
)

TRAIN = [
    "Ich habe Hunger.",
    "Tom hat einen Hund.",
    "Der Hund schläft im Haus.",
    "Wir haben keine Zeit!",
    "Hast du das Buch gelesen?",
    "Sie kauft Äpfel, Birnen und Brot.",
    "Das ist nicht mein Problem.",
    "Ich weiß, dass er's weiß.",
] * 3
UNSEEN = ["Hundehaus!", "Brotbuchproblem?", "Tom schläft, ich lese.", "Zeitäpfel"]


@pytest.fixture(scope="module")
def vocabulary():
    return learn_word_pieces(tokenize(TRAIN), TARGET_RESERVED, 200)


def _joined(token_lists):
    tokens = tf.ragged.constant(token_lists, dtype=tf.string).to_tensor("")
    return [s.decode() for s in detokenize(tokens, "wordpiece").numpy()]


def test_reserved_first_and_every_character_kept(vocabulary):
    assert tuple(vocabulary[: len(TARGET_RESERVED)]) == TARGET_RESERVED
    assert vocabulary[0] == ""  # padding is id 0 as in word vocabularies
    assert len(vocabulary) == len(set(vocabulary))
    for char in {c for s in standardized(TRAIN) for c in s.replace(" ", "")}:
        assert char in vocabulary and SUFFIX + char in vocabulary
    source = learn_word_pieces(tokenize(TRAIN), SOURCE_RESERVED, 200)
    assert tuple(source[:3]) == SOURCE_RESERVED


def test_round_trip_and_no_unk_for_seen_characters(vocabulary):
    texts = TRAIN[:8] + UNSEEN
    pieces = tokenize_pieces(texts, vocabulary)
    assert all(UNK not in p for p in pieces), pieces
    assert any(p.startswith(SUFFIX) for row in pieces for p in row)  # unseen words split
    words = [detokenize(tf.constant([s.split()])).numpy()[0].decode() for s in standardized(texts)]
    assert _joined(pieces) == words  # pieces -> the word-level text, exactly
    # a character never seen in training is the only way to [UNK]
    assert UNK in tokenize_pieces(["Ich habe Ωmega."], vocabulary)[0]


def test_bpe_round_trip_and_no_unk_for_seen_characters():
    proto, vocabulary = learn_bpe(standardized(TRAIN), 120)
    assert tuple(vocabulary[:4]) == TARGET_RESERVED
    texts = TRAIN[:8] + UNSEEN
    pieces = tokenize_bpe(texts, proto, vocabulary)
    assert all(UNK not in p for p in pieces), pieces
    tokens = tf.ragged.constant(pieces, dtype=tf.string).to_tensor("")
    got = [s.decode() for s in detokenize(tokens, "bpe").numpy()]
    words = [detokenize(tf.constant([s.split()])).numpy()[0].decode() for s in standardized(texts)]
    assert got == words
    assert UNK in tokenize_bpe(["Ich habe Ωmega."], proto, vocabulary)[0]


def test_unknown_tokenizer_is_a_data_error():
    with pytest.raises(
        DataError, match=r"data.tokenizer must be one of \['word', 'wordpiece', 'bpe'\]"
    ):
        check_tokenizer("sentencepiece")
