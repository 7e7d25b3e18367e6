"""Recurrent families (``models/recurrent.py``, ``models/seq2seq.py``): heads, stacking,
stateful truncated BPTT, the seq2seq decoder step reproduces teacher forcing (with
attention and without), bad arguments are named. Building, a training step, serialisation, export, mixed precision
and JAX are the registry-generated checks of tests/models/test_registry_models.py."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

import models  # noqa: E402

RNG = np.random.default_rng(0)


def test_the_registry_has_the_recurrent_family():
    assert models.list_models(family="recurrent") == [
        "gru",
        "gru_lm",
        "lstm",
        "lstm_lm",
        "rnn",
        "rnn_lm",
    ]
    assert models.list_models(task="translation") == ["seq2seq", "seq2seq_no_attention"]


def test_regression_head_on_real_valued_sequences():
    model = models.create_model(
        "gru", input_dim=2, num_outputs=1, head="regression", units=8, layers=2
    )
    out = np.asarray(model(RNG.uniform(size=(4, 12, 2)).astype("float32")))
    assert out.shape == (4, 1)
    assert model.get_layer("predictions").dtype_policy.compute_dtype == "float32"


def test_bidirectional_stacked_classifier_with_tokens():
    model = models.create_model(
        "lstm",
        vocab_size=10,
        num_outputs=3,
        units=4,
        layers=2,
        bidirectional=True,
        dropout=0.1,
        recurrent_dropout=0.1,
    )
    out = np.asarray(model(np.array([[1, 2, 3, 0, 0]], "int32")))
    assert out.shape == (1, 3) and np.isclose(out.sum(), 1.0, atol=1e-5)


def test_stateful_language_model_carries_state():
    model = models.create_model(
        "gru_lm", vocab_size=12, units=4, embedding_dim=4, stateful=True, batch_size=2
    )
    x = np.ones((2, 3), "int32")
    first, second = np.asarray(model(x)), np.asarray(model(x))
    assert not np.allclose(first, second)  # the state moved on
    for layer in model.layers:
        if getattr(layer, "stateful", False):
            layer.reset_states()
    np.testing.assert_allclose(np.asarray(model(x)), first, atol=1e-6)


@pytest.mark.parametrize("name", ["seq2seq", "seq2seq_no_attention"])
@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_seq2seq_decode_step_matches_teacher_forcing(name, cell):
    keras.utils.set_random_seed(1)
    model = models.create_model(
        name,
        source_vocab_size=15,
        target_vocab_size=11,
        cell=cell,
        embedding_dim=6,
        units=5,
        attention_units=4,
    )
    src = RNG.integers(1, 15, size=(3, 6)).astype("int32")
    src[1, 3:] = 0
    tin = RNG.integers(1, 11, size=(3, 4)).astype("int32")
    full = np.asarray(model([src, tin]))
    *context, states = model.encode(src)
    if name == "seq2seq_no_attention":  # the fixed summary c [B, 2U] and the mask
        assert [tuple(c.shape) for c in context] == [(3, 10), (3, 6)]
    for t in range(tin.shape[1]):
        logits, states, weights = model.decode_step(tin[:, t], states, *context)
        assert tuple(logits.shape) == (3, 11) and len(states) == (2 if cell == "lstm" else 1)
        assert all(tuple(s.shape) == (3, 5) for s in states)
        np.testing.assert_allclose(np.asarray(logits), full[:, t], atol=1e-5)
        w = np.asarray(weights)
        assert w.shape == (3, 6)
        if not model.use_attention:
            assert np.all(w == 0)  # the step protocol's "no attention"
            continue
        np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)
        assert np.all(w[1, 3:] < 1e-6)  # no attention on padding


def test_seq2seq_without_attention_reads_the_summary_at_every_step():
    """No attention layer; the decoder cell reads [E y; c] (E + 2U inputs); the flag
    round-trips through the config."""
    kwargs = {"source_vocab_size": 15, "target_vocab_size": 11, "embedding_dim": 6, "units": 5}
    plain = models.create_model("seq2seq_no_attention", **kwargs)
    assert not plain.use_attention and not hasattr(plain, "attention")
    assert not any("attention" in w.path.split("/")[1:] for w in plain.weights)
    assert tuple(plain.get_layer("decoder_gru").cell.kernel.shape) == (6 + 2 * 5, 3 * 5)
    config = plain.get_config()
    assert config["use_attention"] is False
    assert not type(plain).from_config(config).use_attention


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("gru", {"input_dim": 2, "units": 0}, "units"),
        ("gru", {"input_dim": 2, "vocab_size": 5}, "exactly one"),
        ("lstm", {"input_dim": 2, "dropout": 1.5}, "dropout"),
        ("gru_lm", {"vocab_size": 5, "bidirectional": True}, "bidirectional"),
        ("rnn_lm", {"vocab_size": 5, "stateful": True}, "batch_size"),
        ("seq2seq", {"source_vocab_size": 5, "target_vocab_size": 5, "cell": "rnn"}, "cell"),
        (
            "seq2seq",
            {"source_vocab_size": 5, "target_vocab_size": 5, "beam_width": 0},
            "beam_width",
        ),
        (
            "seq2seq",
            {"source_vocab_size": 5, "target_vocab_size": 5, "use_attention": "no"},
            "use_attention",
        ),
        (
            "seq2seq_no_attention",
            {"source_vocab_size": 5, "target_vocab_size": 5, "use_attention": True},
            "use seq2seq for attention",
        ),
    ],
)
def test_bad_arguments_are_named(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        models.create_model(name, **kwargs)


def test_chrono_init_spreads_the_gate_time_scales_between_1_and_t_max():
    keras.utils.set_random_seed(0)
    t_max, units = 120, 256
    lstm = models.recurrent.recurrent_network(
        cell="lstm", input_dim=2, units=units, chrono_init=t_max
    )
    bias = lstm.get_layer("lstm_1").cell.bias.numpy()
    b_i, b_f, b_c, b_o = np.split(bias, 4)
    assert np.all(b_f >= 0) and np.all(b_f <= np.log(t_max - 1) + 1e-6)
    assert b_f.std() > 0.5  # spread over time scales, not Keras' constant forget bias 1
    np.testing.assert_allclose(b_i, -b_f)
    assert not b_c.any() and not b_o.any()

    gru = models.recurrent.recurrent_network(
        cell="gru", input_dim=2, units=units, chrono_init=t_max
    )
    bias = gru.get_layer("gru_1").cell.bias.numpy()  # [input, recurrent] x [z, r, h]
    b_z = bias[0, :units]
    assert np.all(b_z >= 0) and b_z.std() > 0.5
    assert not bias[0, units:].any() and not bias[1].any()

    default = models.recurrent.recurrent_network(cell="lstm", input_dim=2, units=units)
    np.testing.assert_array_equal(
        np.split(default.get_layer("lstm_1").cell.bias.numpy(), 4)[1], 1.0
    )


def test_chrono_init_survives_a_save_and_reload(tmp_path):
    model = models.recurrent.recurrent_network(
        cell="lstm", head="language_model", vocab_size=11, units=8, chrono_init=70
    )
    model.save(tmp_path / "m.keras")
    again = keras.models.load_model(tmp_path / "m.keras")
    np.testing.assert_array_equal(
        again.get_layer("lstm_1").cell.bias.numpy(), model.get_layer("lstm_1").cell.bias.numpy()
    )


@pytest.mark.parametrize(
    ("cell", "value", "message"),
    [
        ("rnn", 50, "the simple RNN has none"),
        ("lstm", 1, "int >= 2"),
        ("gru", "long", "positive int"),
    ],
)
def test_chrono_init_rejects_what_it_cannot_do(cell, value, message):
    with pytest.raises(ValueError, match=message):
        models.recurrent.recurrent_network(cell=cell, input_dim=2, chrono_init=value)
