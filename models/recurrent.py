"""Recurrent networks: the simple RNN (Elman 1990) trained by backpropagation through time,
LSTM (Hochreiter & Schmidhuber 1997, "Long Short-Term Memory"; with the forget gate of
Gers et al. 2000) and GRU (Cho et al. 2014, "Learning Phrase Representations using RNN
Encoder-Decoder"; compared with LSTM by Chung et al. 2014).

Two heads over the same stacked recurrent body:

- sequence classification / regression (``rnn``, ``lstm``, ``gru``): the last recurrent
  layer returns its final state, a dense head maps it to ``num_outputs`` classes
  (``softmax``) or values (``linear``);
- language modelling (``rnn_lm``, ``lstm_lm``, ``gru_lm``): every time step predicts the
  next token (logits over the vocabulary). ``stateful=True`` (with a fixed ``batch_size``)
  carries the hidden state from one chunk to the next, which is truncated BPTT over a
  long stream: gradients flow back ``T`` steps, the state flows forward without end.

``chrono_init=T_max`` initialises the gates of an LSTM or GRU by the chrono
initialisation (Tallec & Ollivier 2018, "Can recurrent neural networks warp time?",
section 5): the forget-gate bias ``b_f ~ log(U(1, T_max - 1))`` and the input-gate bias
``b_i = -b_f`` (LSTM), or the GRU's update-gate bias ``b_z ~ log(U(1, T_max - 1))``
(Keras' GRU keeps ``z * h_{t-1}``). A unit then starts out remembering over time scales
spread between 1 and ``T_max`` steps instead of the ~e steps of a forget bias of 1, which
is what lets a gated cell leave the "predict the marginal" plateau of the copy-memory and
adding problems at long lags. The simple RNN has no gate to initialise.
"""

from __future__ import annotations

import keras

from models.checks import (
    check_bool,
    check_choice,
    check_dropout,
    check_optional_positive_int,
    check_positive_int,
)
from models.registry import register_model


@keras.saving.register_keras_serializable(package="deeptrends")
class ChronoBias(keras.initializers.Initializer):
    """The chrono bias of an LSTM (``[4 * units]``) or a GRU (``[2, 3 * units]``).

    Args:
        cell: str. ``lstm`` or ``gru`` (the bias layout of Keras' cells: LSTM gates
            ``i, f, c, o``; GRU rows ``input, recurrent`` of gates ``z, r, h``).
        max_timescale: int. ``T_max`` (>= 2): the longest time scale to start with,
            about the longest dependency the task has.
        seed: int or None. The seed of the uniform draw.
    """

    def __init__(self, cell: str, max_timescale: int, seed: int | None = None):
        check_choice("cell", cell, ("lstm", "gru"))
        check_positive_int("chrono_init", max_timescale)
        if max_timescale < 2:
            raise ValueError(
                f"`chrono_init` must be an int >= 2 (the longest time scale, in steps). "
                f"Received: chrono_init={max_timescale!r}"
            )
        self.cell = cell
        self.max_timescale = max_timescale
        self.seed = seed

    def __call__(self, shape, dtype=None):
        units = shape[-1] // (4 if self.cell == "lstm" else 3)
        scale = keras.ops.log(
            keras.random.uniform(
                (units,), 1.0, float(max(self.max_timescale - 1, 2)), dtype=dtype, seed=self.seed
            )
        )
        zeros = keras.ops.zeros((units,), dtype=dtype)
        if self.cell == "lstm":  # i, f, c, o
            return keras.ops.concatenate([-scale, scale, zeros, zeros])
        gates = keras.ops.concatenate([scale, zeros, zeros])  # z, r, h
        if len(shape) == 1:  # reset_after=False: one bias row
            return gates
        return keras.ops.stack([gates, keras.ops.zeros_like(gates)])

    def get_config(self):
        return {"cell": self.cell, "max_timescale": self.max_timescale, "seed": self.seed}


CELLS = {"rnn": keras.layers.SimpleRNN, "lstm": keras.layers.LSTM, "gru": keras.layers.GRU}
HEADS = ("classification", "regression", "language_model")


def recurrent_layer(cell: str, units: int, name: str, **kwargs) -> keras.layers.Layer:
    """One recurrent layer of type ``cell`` (``rnn``, ``lstm`` or ``gru``).

    Args:
        cell: str. ``rnn`` (tanh SimpleRNN), ``lstm`` or ``gru``.
        units: int. The size of the hidden state.
        name: str. The layer name.
        **kwargs: passed to the Keras layer (``return_sequences``, ``dropout``...).
    """
    check_choice("cell", cell, tuple(CELLS))
    return CELLS[cell](units, name=name, **kwargs)


def recurrent_network(
    cell: str = "lstm",
    head: str = "classification",
    vocab_size: int | None = None,
    input_dim: int | None = None,
    sequence_length: int | None = None,
    num_outputs: int = 2,
    embedding_dim: int = 64,
    units: int = 128,
    layers: int = 1,
    bidirectional: bool = False,
    dropout: float = 0.0,
    recurrent_dropout: float = 0.0,
    stateful: bool = False,
    batch_size: int | None = None,
    chrono_init: int | None = None,
    name: str | None = None,
):
    """Build an embedding (or dense) input -> stacked recurrent layers -> head model.

    Args:
        cell: str. The recurrent cell: ``rnn``, ``lstm`` or ``gru``.
        head: str. ``classification`` (softmax over ``num_outputs`` classes from the final
            state), ``regression`` (``num_outputs`` linear values from the final state) or
            ``language_model`` (next-token logits at every step).
        vocab_size: int or None. Token inputs: the vocabulary size (id 0 is padding and
            masked). Exactly one of ``vocab_size`` and ``input_dim`` is given.
        input_dim: int or None. Real-valued inputs ``[batch, time, input_dim]``.
        sequence_length: int or None. The fixed time length, or None for any length.
        num_outputs: int. Classes or regression targets (ignored by language models, which
            predict ``vocab_size`` tokens).
        embedding_dim: int. The token embedding size.
        units: int. The hidden state size of every recurrent layer.
        layers: int. The number of stacked recurrent layers.
        bidirectional: bool. Whether every layer reads the sequence both ways (not for
            language models, which may not see the future).
        dropout: float. Dropout on the inputs of every recurrent layer and before the head.
        recurrent_dropout: float. Dropout on the recurrent connections (Gal & Ghahramani 2016).
        stateful: bool. Carry the final state of each batch into the next (truncated BPTT
            over a stream); needs ``batch_size``.
        batch_size: int or None. The fixed batch size of a stateful model.
        chrono_init: int or None. ``T_max`` of the chrono gate initialisation (LSTM and GRU
            only; see the module docstring); None keeps Keras' (forget bias 1, LSTM).
        name: str or None. The model name; default ``{cell}`` or ``{cell}_lm``.
    """
    check_choice("cell", cell, tuple(CELLS))
    check_choice("head", head, HEADS)
    if (vocab_size is None) == (input_dim is None):
        raise ValueError(
            "Give exactly one of `vocab_size` (token inputs) and `input_dim` (real-valued inputs). "
            f"Received: vocab_size={vocab_size!r}, input_dim={input_dim!r}"
        )
    for arg, value in (("units", units), ("layers", layers), ("embedding_dim", embedding_dim)):
        check_positive_int(arg, value)
    check_optional_positive_int("vocab_size", vocab_size)
    check_optional_positive_int("input_dim", input_dim)
    if head != "language_model":
        check_positive_int("num_outputs", num_outputs)
    check_optional_positive_int("sequence_length", sequence_length)
    check_bool("bidirectional", bidirectional)
    check_bool("stateful", stateful)
    check_dropout(dropout)
    check_dropout(recurrent_dropout, "recurrent_dropout")
    lm = head == "language_model"
    if lm and vocab_size is None:
        raise ValueError(
            "A language model needs `vocab_size` (token inputs). Received: vocab_size=None"
        )
    if lm and bidirectional:
        raise ValueError("A language model cannot be bidirectional. Received: bidirectional=True")
    if stateful:
        check_positive_int("batch_size", batch_size)
    gate_init = {}
    if chrono_init is not None:
        if cell == "rnn":
            raise ValueError(
                "`chrono_init` initialises the gates of an LSTM or GRU; the simple RNN has "
                f"none. Received: cell='rnn', chrono_init={chrono_init!r}"
            )
        gate_init = {"bias_initializer": ChronoBias(cell, chrono_init)}
        if cell == "lstm":  # else Keras adds 1 to the forget bias
            gate_init["unit_forget_bias"] = False
    name = name or (f"{cell}_lm" if lm else cell)

    batch = batch_size if stateful else None
    if vocab_size is not None:
        inputs = keras.Input(
            shape=(sequence_length,), batch_size=batch, dtype="int32", name="tokens"
        )
        x = keras.layers.Embedding(vocab_size, embedding_dim, mask_zero=True, name="embedding")(
            inputs
        )
    else:
        inputs = keras.Input(shape=(sequence_length, input_dim), batch_size=batch, name="sequences")
        x = inputs
    for i in range(layers):
        last = i == layers - 1
        rnn = recurrent_layer(
            cell,
            units,
            name=f"{cell}_{i + 1}",
            return_sequences=lm or not last,
            dropout=dropout,
            recurrent_dropout=recurrent_dropout,
            stateful=stateful,
            **gate_init,
        )
        if bidirectional:
            rnn = keras.layers.Bidirectional(rnn, name=f"bi{cell}_{i + 1}")
        x = rnn(x)
    if dropout:
        x = keras.layers.Dropout(dropout, name="head_dropout")(x)
    if lm:
        outputs = keras.layers.Dense(vocab_size, dtype="float32", name="logits")(x)  # [B, T, V]
    elif head == "classification":
        x = keras.layers.Dense(num_outputs, name="predictions")(x)
        outputs = keras.layers.Activation("softmax", dtype="float32", name="predictions_act")(x)
    else:
        outputs = keras.layers.Dense(num_outputs, dtype="float32", name="predictions")(x)
    return keras.Model(inputs, outputs, name=name)


@register_model("rnn", task="sequence", family="recurrent")
def rnn(**kwargs):
    return recurrent_network(cell="rnn", **kwargs)


@register_model("lstm", task="sequence", family="recurrent")
def lstm(**kwargs):
    return recurrent_network(cell="lstm", **kwargs)


@register_model("gru", task="sequence", family="recurrent")
def gru(**kwargs):
    return recurrent_network(cell="gru", **kwargs)


@register_model("rnn_lm", task="sequence", family="recurrent")
def rnn_lm(**kwargs):
    return recurrent_network(cell="rnn", head="language_model", **kwargs)


@register_model("lstm_lm", task="sequence", family="recurrent")
def lstm_lm(**kwargs):
    return recurrent_network(cell="lstm", head="language_model", **kwargs)


@register_model("gru_lm", task="sequence", family="recurrent")
def gru_lm(**kwargs):
    return recurrent_network(cell="gru", head="language_model", **kwargs)
