"""The captioner's own checks (the registry-generated ones build, train, round-trip and
export it): the 14 x 14 grid of VGG-16 at 224 px, attention weights that sum to 1 over
the grid, the doubly stochastic penalty on a fixture and only in training, beam search of
width 1 equal to greedy decoding, and Show and Tell without attention."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

import models  # noqa: E402
from models.captioner import doubly_stochastic_penalty  # noqa: E402

VOCAB = 12
SMALL = {
    "vocab_size": VOCAB,
    "input_shape": (64, 64, 3),
    "backbone_kwargs": {"width_multiplier": 0.125},
    "embedding_dim": 8,
    "units": 16,
    "attention_units": 8,
    "dropout": 0.0,
}


def _batch(seed=0, batch=3, length=5):
    rng = np.random.default_rng(seed)
    images = rng.uniform(size=(batch, 64, 64, 3)).astype("float32")
    tokens = rng.integers(4, VOCAB, (batch, length)).astype("int32")
    tokens[:, 0] = 2  # [START]
    tokens[0, 3:] = 0  # a shorter caption
    return images, tokens


@pytest.fixture(scope="module")
def soft():
    keras.utils.set_random_seed(0)
    return models.create_model("show_attend_tell", **SMALL)


def test_vgg16_block5_conv3_is_the_14x14_grid():
    model = models.create_model(
        "show_attend_tell",
        vocab_size=VOCAB,
        input_shape=(224, 224, 3),
        backbone_kwargs={"width_multiplier": 0.125},
        units=8,
        embedding_dim=8,
        attention_units=8,
    )
    assert model.grid == (14, 14, 64)  # 196 annotations (512 channels at full width)
    assert model.encoder.layers[-1].name == models.model_info("vgg16").features["stride16"].layer
    assert model.encoder.layers[-1].name == "block5_conv3_act"
    with pytest.raises(ValueError, match="attention"):
        models.create_model("show_attend_tell", **{**SMALL, "attention": "hard"})
    with pytest.raises(ValueError, match="show_attend_tell for soft attention"):
        models.create_model("show_and_tell", **{**SMALL, "attention": "soft"})


def test_attention_sums_to_one_over_the_grid(soft):
    images, tokens = _batch()
    annotations = soft.annotate(images)
    assert tuple(annotations.shape) == (3, 16, 64)  # a 4 x 4 grid at 64 px
    _, alphas = soft.decoder.run(annotations, tokens)
    np.testing.assert_allclose(np.asarray(alphas).sum(axis=-1), 1.0, atol=1e-5)
    *context, states = soft.encode(images)
    logits, states, alpha = soft.decode_step(tokens[:, 0], states, *context)
    assert tuple(logits.shape) == (3, VOCAB)
    np.testing.assert_allclose(np.asarray(alpha).sum(axis=-1), 1.0, atol=1e-5)
    # the step protocol reproduces the teacher-forced pass, word by word
    teacher = np.asarray(soft([images, tokens]))
    *context, states = soft.encode(images)
    for t in range(tokens.shape[1]):
        logits, states, _ = soft.decode_step(tokens[:, t], states, *context)
        np.testing.assert_allclose(np.asarray(logits), teacher[:, t], atol=1e-4)


def test_doubly_stochastic_penalty_fixture():
    alphas = np.array(
        [
            [[0.5, 0.5], [0.5, 0.5], [0.3, 0.7]],  # last word is padding: covered exactly once
            [[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]],  # all on the first location
        ],
        "float32",
    )
    mask = np.array([[1, 1, 0], [1, 1, 1]], "float32")
    penalty = np.asarray(doubly_stochastic_penalty(alphas, mask))
    # (1 - 3)^2 + (1 - 0)^2 = 5, over 3 words
    np.testing.assert_allclose(penalty, [0.0, 5.0 / 3.0], rtol=1e-6)


def test_penalty_is_added_in_training_only():
    # layer norm: the same annotations in training and inference (batch norm would not be)
    soft = models.create_model("show_attend_tell", **{**SMALL, "annotation_norm": "layer"})
    images, tokens = _batch(1)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=0)
    labels = np.concatenate([tokens[:, 1:], np.zeros((3, 1), "int32")], axis=1)
    soft.compile(optimizer=keras.optimizers.SGD(0.0), loss=loss)
    evaluated = soft.evaluate([images, tokens], labels, verbose=0)
    trained = soft.train_on_batch([images, tokens], labels)
    _, alphas = soft.decoder.run(soft.annotate(images), tokens)
    expected = float(np.mean(doubly_stochastic_penalty(alphas, tokens != 0)))
    assert expected > 0
    assert trained == pytest.approx(evaluated + soft.attention_penalty * expected, rel=1e-4)
    free = models.create_model(
        "show_attend_tell", **{**SMALL, "attention_penalty": 0.0, "annotation_norm": "layer"}
    )
    free.compile(optimizer=keras.optimizers.SGD(0.0), loss=loss)
    assert free.train_on_batch([images, tokens], labels) == pytest.approx(
        free.evaluate([images, tokens], labels, verbose=0), rel=1e-5
    )


def test_beam_width_one_is_greedy(soft):
    tf = pytest.importorskip("tensorflow")
    from pipelines.decoding import beam_search_decode, greedy_decode

    images, _ = _batch(2, batch=4)
    *context, states = soft.encode(images)
    args = (soft.decode_step, states, context, 4, 2, 3, 8)
    greedy, greedy_scores, attention = greedy_decode(*args, banned=(0, 2))
    beam, beam_scores = beam_search_decode(*args, beam_width=1, length_penalty=0.0, banned=(0, 2))
    np.testing.assert_array_equal(greedy.numpy(), beam.numpy())
    np.testing.assert_allclose(greedy_scores.numpy(), beam_scores.numpy(), rtol=1e-5)
    assert attention.shape[-1] == 16
    wide, _ = beam_search_decode(*args, beam_width=3, length_penalty=0.6, banned=(0, 2))
    assert wide.shape[0] == 4 and tf.reduce_all(wide >= 0)


def test_show_and_tell_has_no_attention():
    model = models.create_model("show_and_tell", **SMALL)
    assert model.attention == "none" and not hasattr(model.decoder, "attend")
    images, tokens = _batch(3)
    assert tuple(model([images, tokens]).shape) == (3, 5, VOCAB)
    *context, states = model.encode(images)
    _, _, alpha = model.decode_step(tokens[:, 0], states, *context)
    assert np.all(np.asarray(alpha) == 0)  # the step protocol's "no attention"
    assert len(model.weights) < len(models.create_model("show_attend_tell", **SMALL).weights)


def test_annotation_dropout_drops_whole_channels_in_training_only():
    keras.utils.set_random_seed(0)
    model = models.create_model(
        "show_attend_tell", **{**SMALL, "annotation_norm": "none", "annotation_dropout": 0.5}
    )
    decoder = model.decoder
    annotations = np.ones((2, 6, model.grid[-1]), "float32")
    dropped, _, _ = decoder.encode(annotations, training=True)
    dropped = np.asarray(dropped)
    # the same channels are zero at every location; the kept ones scaled by 1 / (1 - rate)
    assert np.all(dropped == dropped[:, :1, :])
    assert set(np.unique(dropped)) <= {0.0, 2.0} and (dropped == 0).any()
    kept, _, _ = decoder.encode(annotations, training=False)
    np.testing.assert_array_equal(np.asarray(kept), annotations)
    # the setting round-trips through the config, and a bad rate names the field
    assert model.get_config()["annotation_dropout"] == 0.5
    assert decoder.get_config()["annotation_dropout"] == 0.5
    with pytest.raises(ValueError, match="annotation_dropout"):
        models.create_model("show_attend_tell", **{**SMALL, "annotation_dropout": 1.5})
    assert models.create_model("show_attend_tell", **SMALL).decoder.feature_dropout is None


def test_image_dropout_zeroes_whole_images_in_training_only_without_rescaling():
    keras.utils.set_random_seed(0)
    model = models.create_model(
        "show_attend_tell", **{**SMALL, "annotation_norm": "none", "image_dropout": 0.5}
    )
    decoder = model.decoder
    annotations = np.random.default_rng(0).uniform(1, 2, (64, 6, model.grid[-1]))
    annotations = annotations.astype("float32")
    dropped, _, states = decoder.encode(annotations, training=True)
    dropped = np.asarray(dropped)
    gone = np.all(dropped == 0, axis=(1, 2))
    # a caption's image is dropped whole, or kept exactly as it is (no 1 / (1 - rate))
    np.testing.assert_array_equal(dropped[~gone], annotations[~gone])
    assert 16 <= gone.sum() <= 48  # about half of 64
    # a dropped image starts the decoder where an image of zeros does
    blank = np.asarray(decoder.init_h(np.zeros((1, model.grid[-1]), "float32")))
    np.testing.assert_allclose(np.asarray(states[0])[gone], np.repeat(blank, gone.sum(), 0))
    kept, _, _ = decoder.encode(annotations, training=False)
    np.testing.assert_array_equal(np.asarray(kept), annotations)
    assert model.get_config()["image_dropout"] == 0.5
    assert decoder.get_config()["image_dropout"] == 0.5
    with pytest.raises(ValueError, match="image_dropout"):
        models.create_model("show_attend_tell", **{**SMALL, "image_dropout": 1.0})
    assert models.create_model("show_attend_tell", **SMALL).decoder.image_drop is None
