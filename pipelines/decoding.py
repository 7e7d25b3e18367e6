"""In-graph autoregressive decoding: greedy and beam search as ``tf.while_loop``s, shared
by every model that writes text (translation, captioning).

The step protocol
-----------------
A network that ``generate`` decodes implements two methods (``models.seq2seq.Seq2Seq``
does; an image captioner implements the same pair over image features)::

    encode(inputs) -> (*context, states)
        context: tensors [B, ...], one row per example, that every step reads (e.g. the
            annotations [B, S, D], attention keys [B, S, A] and mask [B, S] of a source
            sentence, or the [B, L, D] feature map of an image); beam search tiles them
            ``beam_width`` times along the batch axis.
        states: a list of the decoder's initial states, each [B, ...] (beam search
            reorders them by hypothesis).
    decode_step(token, states, *context) -> (logits, new_states, attention)
        token: int32 [B], the previous token (``start_id`` first).
        logits: [B, V] over the target vocabulary (any float dtype; cast to float32).
        new_states: a list like ``states``.
        attention: [B, S] weights over the context positions (returned by greedy
            decoding as [B, T, S] for alignment plots; zeros if the network has none).

Generation defaults may be attributes of the network: ``beam_width`` (1: greedy),
``length_penalty`` (GNMT alpha), ``max_decode_length`` and ``no_repeat_ngram``.

Token ids: ``pad_id`` (0) is never predicted and fills finished rows, ``end_id`` ends a
sentence, ``banned`` ids (e.g. ``[START]``) are never predicted.

Beam search keeps the ``beam_width`` best partial hypotheses by total log-probability;
finished hypotheses are carried with their score unchanged. The final choice divides by
the GNMT length penalty ``((5 + length) / 6) ** alpha`` (Wu et al. 2016); ``alpha = 0``
picks the highest log-probability. With ``beam_width = 1`` the search is greedy decoding.

``no_repeat_ngram = n`` (> 0) never lets a hypothesis repeat one of its own n-grams: a token
that would complete an n-gram already in it is banned at that step (n-gram blocking, Paulus
et al. 2018), in greedy decoding and beam search alike; 0 (the default) blocks nothing. It
stops the loops a weak decoder falls into ("a man in a black shirt and a black shirt and a
black shirt ...").
"""

from __future__ import annotations

import tensorflow as tf

NEG = -1e9


def _ban(logp: tf.Tensor, banned: tuple[int, ...]) -> tf.Tensor:
    if not banned:
        return logp
    vocab = tf.shape(logp)[-1]
    hit = tf.reduce_any(
        tf.equal(tf.range(vocab)[:, None], tf.constant(banned, tf.int32)[None, :]), axis=1
    )
    return tf.where(hit, tf.constant(NEG, logp.dtype), logp)


def repeated_ngram_mask(history: tf.Tensor, n: int, vocab) -> tf.Tensor:
    """The tokens that would repeat an n-gram of each hypothesis.

    Args:
        history: int32 [..., t], the tokens of each hypothesis so far.
        n: int (>= 1). The n-gram length.
        vocab: int or scalar tensor. The vocabulary size.

    Returns:
        bool [..., vocab]: True where the token after the last ``n - 1`` tokens would make
        an n-gram that already occurs in the hypothesis (nothing before ``n - 1`` tokens).
    """
    lead = tf.shape(history)[:-1]
    flat = tf.reshape(history, [-1, tf.shape(history)[-1]])  # [N, t]
    rows, t = tf.shape(flat)[0], tf.shape(flat)[1]

    def mask():
        windows = t - n + 1  # the n-grams so far, j = 0 .. t - n
        match = tf.ones([rows, windows], tf.bool)
        for i in range(n - 1):  # window j's first n - 1 tokens equal the last n - 1
            match &= tf.equal(flat[:, i : i + windows], flat[:, t - n + 1 + i : t - n + 2 + i])
        where = tf.cast(tf.where(match), tf.int32)  # [M, 2] (row, j)
        follow = tf.gather_nd(flat[:, n - 1 :], where)  # the token that completed window j
        hits = tf.scatter_nd(
            tf.stack([where[:, 0], follow], axis=1),
            tf.ones_like(follow),
            tf.stack([rows, tf.cast(vocab, tf.int32)]),
        )
        return hits > 0

    def none():
        return tf.zeros(tf.stack([rows, tf.cast(vocab, tf.int32)]), tf.bool)

    banned = tf.cond(t >= n, mask, none)
    return tf.reshape(banned, tf.concat([lead, [tf.cast(vocab, tf.int32)]], axis=0))


def _block_repeats(logp: tf.Tensor, history: tf.Tensor, n: int) -> tf.Tensor:
    """``logp`` [..., V] with the tokens that would repeat an n-gram of ``history`` banned."""
    if not n:
        return logp
    banned = repeated_ngram_mask(history, n, tf.shape(logp)[-1])
    return tf.where(banned, tf.constant(NEG, logp.dtype), logp)


def greedy_decode(
    step,
    states,
    context,
    batch,
    start_id,
    end_id,
    max_length,
    banned=(0,),
    no_repeat_ngram=0,
):
    """Greedy decoding. Returns (tokens int32 [B, T], scores float32 [B] = sum of log-probs,
    attention float32 [B, T, S]); tokens after ``end_id`` are 0."""
    token = tf.fill([batch], tf.constant(start_id, tf.int32))
    finished = tf.zeros([batch], tf.bool)
    score = tf.zeros([batch], tf.float32)
    tokens_ta = tf.TensorArray(tf.int32, size=0, dynamic_size=True, element_shape=[None])
    attn_ta = tf.TensorArray(tf.float32, size=0, dynamic_size=True, element_shape=[None, None])

    # the tokens so far, for n-gram blocking: [B, max_length], column t written at step t
    history = tf.zeros([batch, max_length if no_repeat_ngram else 0], tf.int32)

    def cond(t, token, states, finished, score, tokens_ta, attn_ta, history):
        return tf.logical_and(t < max_length, tf.logical_not(tf.reduce_all(finished)))

    def body(t, token, states, finished, score, tokens_ta, attn_ta, history):
        logits, new_states, attention = step(token, list(states), *context)
        logp = _ban(tf.nn.log_softmax(tf.cast(logits, tf.float32), axis=-1), banned)
        logp = _block_repeats(logp, history[:, :t], no_repeat_ngram)
        nxt = tf.argmax(logp, axis=-1, output_type=tf.int32)
        gained = tf.gather(logp, nxt, batch_dims=1)
        nxt = tf.where(finished, tf.zeros_like(nxt), nxt)
        score = score + tf.where(finished, tf.zeros_like(gained), gained)
        tokens_ta = tokens_ta.write(t, nxt)
        attn_ta = attn_ta.write(t, tf.cast(attention, tf.float32))
        finished = tf.logical_or(finished, tf.equal(nxt, end_id))
        if no_repeat_ngram:
            history += nxt[:, None] * tf.one_hot(t, max_length, dtype=tf.int32)[None, :]
        return t + 1, nxt, tuple(new_states), finished, score, tokens_ta, attn_ta, history

    _, _, _, _, score, tokens_ta, attn_ta, _ = tf.while_loop(
        cond,
        body,
        (tf.constant(0), token, tuple(states), finished, score, tokens_ta, attn_ta, history),
        maximum_iterations=max_length,
    )
    tokens = tf.transpose(tokens_ta.stack(), [1, 0])
    attention = tf.transpose(attn_ta.stack(), [1, 0, 2])
    return tokens, score, attention


def beam_search_decode(
    step,
    states,
    context,
    batch,
    start_id,
    end_id,
    max_length,
    beam_width,
    length_penalty=0.0,
    banned=(0,),
    no_repeat_ngram=0,
):
    """Beam search. Returns (tokens int32 [B, T] of the best hypothesis, 0 after ``end_id``;
    scores float32 [B] = its log-probability divided by the length penalty)."""
    k = beam_width
    tile = lambda x: tf.repeat(x, k, axis=0)  # noqa: E731 - [B, ...] -> [B * K, ...]
    states = [tile(s) for s in states]
    context = [tile(c) for c in context]
    log_probs = tf.tile(
        tf.concat([[0.0], tf.fill([k - 1], NEG)], axis=0)[None, :], [batch, 1]
    )  # [B, K]
    token = tf.fill([batch * k], tf.constant(start_id, tf.int32))
    finished = tf.zeros([batch, k], tf.bool)
    lengths = tf.zeros([batch, k], tf.float32)
    history = tf.zeros([batch, k, 0], tf.int32)
    offsets = (tf.range(batch) * k)[:, None]  # [B, 1]

    def cond(t, token, states, log_probs, finished, lengths, history):
        return tf.logical_and(t < max_length, tf.logical_not(tf.reduce_all(finished)))

    def body(t, token, states, log_probs, finished, lengths, history):
        logits, new_states, _ = step(token, list(states), *context)
        logp = _ban(tf.nn.log_softmax(tf.cast(logits, tf.float32), axis=-1), banned)
        vocab = tf.shape(logp)[-1]
        logp = _block_repeats(tf.reshape(logp, [batch, k, vocab]), history, no_repeat_ngram)
        # a finished hypothesis continues only with padding, at no cost
        pad_only = tf.concat([tf.zeros([1]), tf.fill([vocab - 1], NEG)], axis=0)
        logp = tf.where(finished[:, :, None], pad_only[None, None, :], logp)
        total = tf.reshape(log_probs[:, :, None] + logp, [batch, k * vocab])
        log_probs, index = tf.math.top_k(total, k=k)  # [B, K]
        beam = index // vocab
        nxt = index % vocab
        was_finished = tf.gather(finished, beam, batch_dims=1)
        lengths = tf.gather(lengths, beam, batch_dims=1) + tf.where(was_finished, 0.0, 1.0)
        finished = tf.logical_or(was_finished, tf.equal(nxt, end_id))
        history = tf.concat([tf.gather(history, beam, batch_dims=1), nxt[:, :, None]], axis=2)
        flat = tf.reshape(offsets + beam, [-1])
        states = tuple(tf.gather(s, flat) for s in new_states)
        return t + 1, tf.reshape(nxt, [-1]), states, log_probs, finished, lengths, history

    _, _, _, log_probs, finished, lengths, history = tf.while_loop(
        cond,
        body,
        (tf.constant(0), token, tuple(states), log_probs, finished, lengths, history),
        shape_invariants=(
            tf.TensorShape([]),
            tf.TensorShape([None]),
            tuple(tf.TensorShape([None] + s.shape[1:].as_list()) for s in states),
            tf.TensorShape([None, k]),
            tf.TensorShape([None, k]),
            tf.TensorShape([None, k]),
            tf.TensorShape([None, k, None]),
        ),
        maximum_iterations=max_length,
    )
    penalty = tf.pow((5.0 + lengths) / 6.0, float(length_penalty))
    normalized = log_probs / penalty
    best = tf.argmax(normalized, axis=1, output_type=tf.int32)
    tokens = tf.gather(history, best, batch_dims=1)
    return tokens, tf.gather(normalized, best, batch_dims=1)


def generate(
    network,
    inputs,
    start_id: int,
    end_id: int,
    max_length: int,
    beam_width: int = 1,
    length_penalty: float = 0.0,
    banned: tuple[int, ...] = (0,),
    no_repeat_ngram: int = 0,
):
    """Encode ``inputs`` with ``network`` and decode them (the step protocol above):
    greedy for ``beam_width == 1``, else beam search; ``no_repeat_ngram`` as above.

    Returns (tokens int32 [B, T], 0 after ``end_id``; scores float32 [B]; attention
    float32 [B, T, S] for greedy decoding, None for beam search)."""
    *context, states = network.encode(inputs)
    states = list(states)
    batch = tf.shape(states[0])[0]
    if beam_width == 1:
        return greedy_decode(
            network.decode_step,
            states,
            context,
            batch,
            start_id,
            end_id,
            max_length,
            banned,
            no_repeat_ngram,
        )
    tokens, scores = beam_search_decode(
        network.decode_step,
        states,
        context,
        batch,
        start_id,
        end_id,
        max_length,
        beam_width,
        length_penalty,
        banned,
        no_repeat_ngram,
    )
    return tokens, scores, None
