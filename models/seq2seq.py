"""Encoder-decoder translation with additive attention (Bahdanau, Cho & Bengio 2014,
"Neural Machine Translation by Jointly Learning to Align and Translate").

- Encoder: source embedding -> bidirectional GRU/LSTM; its annotations ``h_j`` are the
  forward and backward states concatenated, ``[B, S, 2 * units]``.
- Bridge: the decoder's initial state ``s_0 = tanh(W [h_fwd_last; h_bwd_first])``.
- Decoder: target embedding -> GRU/LSTM (teacher forcing in training: the reference
  shifted right is the input). At every step the additive (Bahdanau) score
  ``e_ij = v^T tanh(W_k h_j + W_q s_i)`` over the source annotations gives the alignment
  ``a_ij = softmax_j(e_ij)`` and the context ``c_i = sum_j a_ij h_j``; the prediction is
  ``softmax(W_o tanh(W_c [c_i; s_i]))``. The query is the decoder state after the step
  (Luong et al. 2015's placement of the same additive score), so training runs the
  decoder over the whole target at once instead of a Python loop over time.

The RNN Encoder-Decoder without attention (Cho et al. 2014, "Learning Phrase
Representations using RNN Encoder-Decoder for Statistical Machine Translation"; the
``RNNencdec`` baseline of Bahdanau et al.'s Fig. 2) from the same class,
``use_attention=False`` (registered as ``seq2seq_no_attention``): the same encoder, bridge
and decoder cell, but the decoder sees only a fixed summary of the source, the context
``c = [h_fwd_last; h_bwd_first]`` (the encoder's final states, ``[B, 2 * units]``). As in
Cho et al. every step is conditioned on ``c``: the decoder reads ``[E y_{i-1}; c]`` and the
prediction is ``softmax(W_o tanh(W_c [c; s_i]))``, the attentional model's output layer with
``c`` in place of ``c_i``; ``s_0 = tanh(W c)`` is the shared bridge. The two variants
differ only in where the context comes from.

``Seq2Seq.encode`` and ``Seq2Seq.decode_step`` are what an in-graph greedy or beam-search
decoder needs; ``call([source, target_in])`` is the teacher-forced training pass. Token
id 0 is padding in both vocabularies.
"""

from __future__ import annotations

import keras
from keras import ops

from models.checks import (
    check_bool,
    check_choice,
    check_dropout,
    check_non_negative_number,
    check_optional_positive_int,
    check_positive_int,
)
from models.registry import register_model

CELLS = ("gru", "lstm")


@keras.saving.register_keras_serializable(package="deeptrends")
class AdditiveAttention(keras.layers.Layer):
    """Bahdanau's additive alignment model ``v^T tanh(W_k h_j + W_q s_i)``, masked softmax.

    Args:
        units: int. The size of the alignment layer (``W_k``, ``W_q`` outputs).
    """

    def __init__(self, units: int, **kwargs):
        super().__init__(**kwargs)
        self.supports_masking = True  # the source mask is an explicit argument
        self.units = units
        self.key_dense = keras.layers.Dense(units, use_bias=False, name="keys")
        self.query_dense = keras.layers.Dense(units, name="query")
        self.score_dense = keras.layers.Dense(1, use_bias=False, name="score")

    def build(self, query_shape, values_shape):
        self.key_dense.build(values_shape)
        self.query_dense.build(query_shape)
        self.score_dense.build((None, None, None, self.units))

    def project_keys(self, values):
        """``W_k h_j`` for all source positions, computed once per sentence: [B, S, A]."""
        return self.key_dense(values)

    def call(self, query, values, keys=None, mask=None):
        """query [B, T, Q], values [B, S, D], keys [B, S, A] (optional), mask [B, S] ->
        (context [B, T, D], weights [B, T, S])."""
        if keys is None:
            keys = self.project_keys(values)
        q = self.query_dense(query)  # [B, T, A]
        scores = self.score_dense(ops.tanh(keys[:, None, :, :] + q[:, :, None, :]))[..., 0]
        scores = ops.cast(scores, "float32")  # [B, T, S]
        if mask is not None:
            scores = ops.where(ops.cast(mask, "bool")[:, None, :], scores, -1e9)
        weights = ops.softmax(scores, axis=-1)
        context = ops.matmul(ops.cast(weights, values.dtype), values)
        return context, weights

    def compute_mask(self, *args, **kwargs):
        return None

    def get_config(self):
        return {**super().get_config(), "units": self.units}


@keras.saving.register_keras_serializable(package="deeptrends")
class Seq2Seq(keras.Model):
    """Bidirectional-RNN encoder, RNN decoder with or without additive attention (see the
    module docstring).

    Args:
        source_vocab_size: int. Source vocabulary size (id 0 = padding).
        target_vocab_size: int. Target vocabulary size (id 0 = padding).
        cell: str. ``gru`` or ``lstm`` for both encoder and decoder.
        embedding_dim: int. Size of the source and target embeddings.
        units: int. Decoder state size and encoder state size per direction.
        attention_units: int. Size of the additive alignment layer (unused without
            attention).
        dropout: float. Dropout on embeddings and before the output projection.
        use_attention: bool. True: additive attention over the annotations (Bahdanau et
            al.); False: the fixed summary ``c`` at every step (Cho et al.).
        beam_width: int. Generation default: 1 is greedy decoding, more is beam search.
        length_penalty: float. Generation default: the GNMT exponent ``alpha`` of the beam
            score ``log p / ((5 + length) / 6) ** alpha``; 0 ranks by ``log p`` alone.
        max_decode_length: int or None. Generation default: the most target tokens; None
            lets the decoder pick from the training data.
    """

    def __init__(
        self,
        source_vocab_size: int,
        target_vocab_size: int,
        cell: str = "gru",
        embedding_dim: int = 256,
        units: int = 512,
        attention_units: int = 256,
        dropout: float = 0.0,
        use_attention: bool = True,
        beam_width: int = 1,
        length_penalty: float = 0.0,
        max_decode_length: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        check_choice("cell", cell, CELLS)
        self.use_attention = check_bool("use_attention", use_attention)
        for arg, value in (
            ("source_vocab_size", source_vocab_size),
            ("target_vocab_size", target_vocab_size),
            ("embedding_dim", embedding_dim),
            ("units", units),
            ("attention_units", attention_units),
            ("beam_width", beam_width),
        ):
            check_positive_int(arg, value)
        check_dropout(dropout)
        check_non_negative_number("length_penalty", length_penalty)
        check_optional_positive_int("max_decode_length", max_decode_length)
        self.beam_width = beam_width
        self.length_penalty = float(length_penalty)
        self.max_decode_length = max_decode_length
        self.source_vocab_size = source_vocab_size
        self.target_vocab_size = target_vocab_size
        self.cell = cell
        self.embedding_dim = embedding_dim
        self.units = units
        self.attention_units = attention_units
        self.dropout = dropout
        self.num_states = 2 if cell == "lstm" else 1
        rnn = keras.layers.LSTM if cell == "lstm" else keras.layers.GRU

        self.source_embedding = keras.layers.Embedding(
            source_vocab_size, embedding_dim, name="source_embedding"
        )
        self.target_embedding = keras.layers.Embedding(
            target_vocab_size, embedding_dim, name="target_embedding"
        )
        self.encoder = keras.layers.Bidirectional(
            rnn(units, return_sequences=True, return_state=True, name=f"encoder_{cell}"),
            name="encoder",
        )
        self.bridges = [
            keras.layers.Dense(units, activation="tanh", name=f"bridge_{i}")
            for i in range(self.num_states)
        ]
        self.decoder = rnn(units, return_sequences=True, name=f"decoder_{cell}")
        if use_attention:
            self.attention = AdditiveAttention(attention_units, name="attention")
        self.combine = keras.layers.Dense(units, activation="tanh", name="attentional_hidden")
        self.output_projection = keras.layers.Dense(target_vocab_size, name="logits")
        self.embedding_dropout = keras.layers.Dropout(dropout, name="embedding_dropout")
        self.output_dropout = keras.layers.Dropout(dropout, name="output_dropout")

    def build(self, input_shape=None):
        e, u = self.embedding_dim, self.units
        self.source_embedding.build((None, None))
        self.target_embedding.build((None, None))
        self.encoder.build((None, None, e))
        for bridge in self.bridges:
            bridge.build((None, 2 * u))
        # without attention the decoder reads [E y_{i-1}; c] at every step
        self.decoder.build((None, None, e if self.use_attention else e + 2 * u))
        if self.use_attention:
            self.attention.build((None, None, u), (None, None, 2 * u))
        self.combine.build((None, None, 3 * u))
        self.output_projection.build((None, None, u))
        self.built = True

    # -- encoder -------------------------------------------------------------------
    def encode(self, source, training=False):
        """source int [B, S] -> the context of every decoder step, then the initial
        decoder states (a list of ``num_states`` tensors [B, U]).

        With attention the context is (annotations [B, S, 2U], keys [B, S, A], mask
        [B, S]); without, (summary ``c`` [B, 2U], mask [B, S]): the mask only shapes the
        (zero) attention weights that ``decode_step`` returns."""
        mask = ops.not_equal(source, 0)
        x = self.embedding_dropout(self.source_embedding(source), training=training)
        outputs = self.encoder(x, mask=mask, training=training)
        annotations, states = outputs[0], outputs[1:]
        forward, backward = states[: self.num_states], states[self.num_states :]
        initial = [
            bridge(ops.concatenate([f, b], axis=-1))
            for bridge, f, b in zip(self.bridges, forward, backward, strict=False)
        ]
        if not self.use_attention:
            # c: the hidden states (an LSTM's h, not its memory cell) of both directions
            summary = ops.concatenate([forward[0], backward[0]], axis=-1)  # [B, 2U]
            return summary, mask, initial
        return annotations, self.attention.project_keys(annotations), mask, initial

    # -- decoder -------------------------------------------------------------------
    def _output(self, context, decoded, training=False):
        """context [B, T, 2U], decoder states [B, T, U] -> float32 logits [B, T, V]."""
        hidden = self.combine(ops.concatenate([context, decoded], axis=-1))
        hidden = self.output_dropout(hidden, training=training)
        return ops.cast(self.output_projection(hidden), "float32")

    def _predict(self, decoded, annotations, keys, mask, training=False):
        context, weights = self.attention(decoded, annotations, keys=keys, mask=mask)
        return self._output(context, decoded, training=training), weights

    @staticmethod
    def _repeat_summary(summary, steps):
        """c [B, 2U] -> [B, T, 2U], ``steps`` being any [B, T, ...] tensor."""
        shape = ops.shape(steps)
        return ops.broadcast_to(summary[:, None, :], (shape[0], shape[1], summary.shape[-1]))

    def decode_step(self, token, states, *context):
        """One decoder step. token int [B], states list of [B, U], then the context that
        ``encode`` returned -> (logits [B, V], new states, attention weights [B, S]; zeros
        without attention)."""
        x = self.target_embedding(token)  # [B, E]
        if not self.use_attention:
            summary, mask = context
            x = ops.concatenate([x, ops.cast(summary, x.dtype)], axis=-1)  # [B, E + 2U]
        output, new_states = self.decoder.cell(x, list(states), training=False)
        if not isinstance(new_states, (list, tuple)):
            new_states = [new_states]
        if self.use_attention:
            logits, weights = self._predict(output[:, None, :], *context)
            return logits[:, 0, :], list(new_states), weights[:, 0, :]
        logits = self._output(ops.cast(summary, output.dtype)[:, None, :], output[:, None, :])
        return logits[:, 0, :], list(new_states), ops.zeros_like(mask, dtype="float32")

    def call(self, inputs, training=False):
        """Teacher forcing: [source [B, S], target_in [B, T]] -> logits [B, T, V]."""
        if isinstance(inputs, dict):
            source, target_in = inputs["source"], inputs["target_in"]
        else:
            source, target_in = inputs
        *context, initial = self.encode(source, training=training)
        y = self.embedding_dropout(self.target_embedding(target_in), training=training)
        if not self.use_attention:
            summary = self._repeat_summary(ops.cast(context[0], y.dtype), y)  # [B, T, 2U]
            decoded = self.decoder(
                ops.concatenate([y, summary], axis=-1), initial_state=initial, training=training
            )
            return self._output(ops.cast(summary, decoded.dtype), decoded, training=training)
        decoded = self.decoder(y, initial_state=initial, training=training)
        logits, _ = self._predict(decoded, *context, training=training)
        return logits

    def compute_output_shape(self, input_shape):
        target_shape = input_shape["target_in"] if isinstance(input_shape, dict) else input_shape[1]
        return (*target_shape, self.target_vocab_size)

    def get_config(self):
        return {
            **super().get_config(),
            "source_vocab_size": self.source_vocab_size,
            "target_vocab_size": self.target_vocab_size,
            "cell": self.cell,
            "embedding_dim": self.embedding_dim,
            "units": self.units,
            "attention_units": self.attention_units,
            "dropout": self.dropout,
            "use_attention": self.use_attention,
            "beam_width": self.beam_width,
            "length_penalty": self.length_penalty,
            "max_decode_length": self.max_decode_length,
        }


def seq2seq_network(
    source_vocab_size: int,
    target_vocab_size: int,
    cell: str = "gru",
    embedding_dim: int = 256,
    units: int = 512,
    attention_units: int = 256,
    dropout: float = 0.0,
    use_attention: bool = True,
    beam_width: int = 1,
    length_penalty: float = 0.0,
    max_decode_length: int | None = None,
    name: str = "seq2seq",
) -> Seq2Seq:
    """Build the encoder-decoder, with additive attention or without, its weights created.

    Args:
        source_vocab_size: int. Source vocabulary size including padding (0) and OOV.
        target_vocab_size: int. Target vocabulary size including padding, OOV, start, end.
        cell: str. ``gru`` or ``lstm``.
        embedding_dim: int. Size of the word embeddings.
        units: int. Recurrent state size (the encoder has ``units`` per direction).
        attention_units: int. Size of the additive alignment layer (unused without
            attention).
        dropout: float. Dropout on embeddings and before the output projection.
        use_attention: bool. Additive attention (Bahdanau et al. 2014); False: the fixed
            source summary at every step (Cho et al. 2014).
        beam_width: int. Generation default: 1 greedy, more beam search.
        length_penalty: float. Generation default: the GNMT length-penalty exponent.
        max_decode_length: int or None. Generation default: the most target tokens.
        name: str. The model name.
    """
    model = Seq2Seq(
        source_vocab_size,
        target_vocab_size,
        cell=cell,
        embedding_dim=embedding_dim,
        units=units,
        attention_units=attention_units,
        dropout=dropout,
        use_attention=use_attention,
        beam_width=beam_width,
        length_penalty=length_penalty,
        max_decode_length=max_decode_length,
        name=name,
    )
    model.build([(None, None), (None, None)])
    return model


@register_model("seq2seq", task="translation", family="seq2seq")
def seq2seq(**kwargs):
    """Bahdanau et al. 2014: additive attention over the source annotations."""
    return seq2seq_network(**kwargs)


@register_model("seq2seq_no_attention", task="translation", family="seq2seq")
def seq2seq_no_attention(**kwargs):
    """Cho et al. 2014: no attention; the decoder sees a fixed summary of the source."""
    if kwargs.get("use_attention", False):
        raise ValueError(
            "`use_attention` is False in seq2seq_no_attention (use seq2seq for attention). "
            f"Received: use_attention={kwargs['use_attention']!r}"
        )
    return seq2seq_network(**{"name": "seq2seq_no_attention", **kwargs, "use_attention": False})
