"""n-gram blocking in the shared in-graph decoders (``pipelines/decoding.py``): the mask on
fixtures, and a toy step that loops ("a b c a b c ...") unless it is blocked, in greedy
decoding and beam search alike (beam width 1 still equals greedy)."""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from pipelines.decoding import (  # noqa: E402
    beam_search_decode,
    greedy_decode,
    repeated_ngram_mask,
)

VOCAB, START, END = 8, 1, 2


def test_repeated_ngram_mask_on_fixtures():
    history = tf.constant([[4, 5, 6, 4, 5], [4, 5, 6, 7, 4]], tf.int32)
    trigram = repeated_ngram_mask(history, 3, VOCAB).numpy()
    # row 0 ends "4 5", which was followed by 6: 6 is banned, nothing else
    assert np.flatnonzero(trigram[0]).tolist() == [6]
    assert not trigram[1].any()  # "7 4" never occurred before
    bigram = repeated_ngram_mask(history, 2, VOCAB).numpy()
    assert np.flatnonzero(bigram[1]).tolist() == [5]  # "4" was followed by 5
    # leading dims are kept (beam search's [B, K, t]); too short a history bans nothing
    beams = repeated_ngram_mask(tf.reshape(history, [1, 2, 5]), 3, VOCAB)
    assert beams.shape == (1, 2, VOCAB)
    np.testing.assert_array_equal(beams.numpy()[0], trigram)
    assert not repeated_ngram_mask(history[:, :2], 3, VOCAB).numpy().any()
    assert not repeated_ngram_mask(tf.zeros([2, 0], tf.int32), 3, VOCAB).numpy().any()


def _looping_step(token, states):
    """Prefers 4 -> 5 -> 6 -> 4 ... (4 after START): a loop that never ends on its own.
    7 is every token's second choice and END follows 7; END is third."""
    following = tf.constant([0, 4, 0, 0, 5, 6, 4, END], tf.int32)
    best = tf.one_hot(tf.gather(following, token), VOCAB) * 10.0
    others = tf.constant([0, 0, 3, 0, 0, 0, 0, 4], tf.float32)
    logits = tf.maximum(best, others[None, :])
    return logits, states, tf.zeros([tf.shape(token)[0], 1])


def _decode(beam_width, n):
    states = [tf.zeros([2, 1])]
    args = (_looping_step, states, [], 2, START, END, 12)
    if beam_width == 1:
        tokens, scores, _ = greedy_decode(*args, banned=(0, START), no_repeat_ngram=n)
    else:
        tokens, scores = beam_search_decode(
            *args, beam_width=beam_width, banned=(0, START), no_repeat_ngram=n
        )
    return tokens.numpy(), scores.numpy()


def _ngrams(tokens, n):
    words = [t for t in tokens if t not in (0, END)]
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def test_blocking_stops_a_loop_in_greedy_decoding():
    looped, _ = _decode(1, 0)
    assert looped[0].tolist() == [4, 5, 6] * 4  # to the length limit
    blocked, _ = _decode(1, 3)
    # after "4 5 6 4 5", 6 would repeat "4 5 6": the second choice 7, then END
    assert blocked[0].tolist() == [4, 5, 6, 4, 5, 7, END]
    bigram, _ = _decode(1, 2)  # after "4 5 6 4", 5 would repeat "4 5"
    assert bigram[0].tolist() == [4, 5, 6, 4, 7, END]


@pytest.mark.parametrize("n", [2, 3])
def test_beam_search_never_repeats_an_ngram(n):
    looped, _ = _decode(3, 0)
    assert looped[0].tolist() == [4, 5, 6] * 4
    blocked, _ = _decode(3, n)
    for row in blocked:
        grams = _ngrams(row.tolist(), n)
        assert len(grams) == len(set(grams)) and END in row.tolist()


@pytest.mark.parametrize("n", [0, 2, 3])
def test_beam_width_one_equals_greedy_with_blocking(n):
    greedy, greedy_scores = _decode(1, n)
    states = [tf.zeros([2, 1])]
    beam, beam_scores = beam_search_decode(
        _looping_step, states, [], 2, START, END, 12, 1, banned=(0, START), no_repeat_ngram=n
    )
    np.testing.assert_array_equal(greedy, beam.numpy())
    np.testing.assert_allclose(greedy_scores, beam_scores.numpy(), rtol=1e-6)
