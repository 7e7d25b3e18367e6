"""Serving models that write text: raw strings in, strings out, in one graph.

``TextDecoder`` wraps a network that implements the step protocol of
``pipelines.decoding`` (``encode`` / ``decode_step``) and holds the target vocabulary, so
the SavedModel and the logged ``.keras`` model carry it. A subclass says how a raw string
input becomes the network's input (``prepare``) and names the signature's input and
output; the rest is shared:

    raw strings [B] --prepare--> network inputs --encode, greedy/beam--> ids [B, T]
        --detokenize--> strings [B]   (+ scores [B]: the best hypothesis' log-probability
                                         divided by the length penalty)

- ``Translator``: ``sentences`` -> ``translations`` around a ``Seq2Seq`` (the source
  vocabulary and its in-graph lookup added).
- An image captioner: ``image_bytes`` -> ``captions``, its ``prepare`` decoding and
  resizing the images as the image signatures do.

Decoding defaults (``beam_width``, ``length_penalty``, ``no_repeat_ngram``) are the network's attributes (its
builder's arguments), as keras-hub keeps generation settings with the model. The same
``tf.function`` (``generate_fn``) computes the evaluation metrics in process and is the
exported signature, so the served texts are the evaluated ones.

The Keras serialisable names (``deeptrends>Translator``) and the attribute under which a
network is kept (its weights' path in a ``.keras`` file: ``seq2seq`` for a translator)
are those of models logged before this module existed; keep them.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any, ClassVar

import keras
import numpy as np
import tensorflow as tf

from data.text import (
    END,
    START,
    UNK,
    bpe_ids,
    bpe_tokenizer,
    check_tokenizer,
    output_words,
    piece_ids,
    standardize,
    word_piece_tokenizer,
)
from data.text import detokenize as join_tokens
from pipelines.decoding import generate
from pipelines.tasks.base import Endpoint

GENERATE_BATCH = 256


class _Untracked:
    """A plain holder that TensorFlow's object tracking does not walk into."""

    def __init__(self):
        self.items: dict = {}


class TextDecoder(keras.Model):
    """Raw inputs -> generated text around a network with ``encode``/``decode_step``.

    Subclasses set ``network_attribute`` (where the network is kept), ``input_name`` /
    ``output_name`` (the signature's tensor names) and implement ``prepare`` and
    ``get_config``.

    Args:
        network: keras.Model. Implements ``pipelines.decoding``'s step protocol.
        target_vocabulary: list. Generated tokens, index = id (``""`` padding, ``[UNK]``,
            ``[START]``, ``[END]`` first).
        max_decode_length: int. The most tokens generated.
        tokenizer: str. ``word`` or ``wordpiece`` (``data.text``): how generated tokens
            join into text. With subwords ``[UNK]`` is never generated (every training
            character has pieces, so no training text needed it).
    """

    network_attribute: ClassVar[str] = "network"
    input_name: ClassVar[str] = "inputs"
    input_dtype: ClassVar[tf.DType] = tf.string
    output_name: ClassVar[str] = "texts"

    def __init__(self, network, target_vocabulary, max_decode_length, tokenizer="word", **kwargs):
        super().__init__(**kwargs)
        setattr(self, self.network_attribute, network)
        self.tokenizer = check_tokenizer(tokenizer)
        self.target_vocabulary = list(target_vocabulary)
        self.max_decode_length = int(max_decode_length)
        if self.max_decode_length < 1:
            raise ValueError(
                f"`max_decode_length` must be a positive int. Received: {max_decode_length!r}"
            )
        self.start_id = self.target_vocabulary.index(START)
        self.end_id = self.target_vocabulary.index(END)
        self.banned_ids = (0, self.start_id)
        if self.tokenizer != "word" and UNK in self.target_vocabulary:
            self.banned_ids += (self.target_vocabulary.index(UNK),)
        self._generate_fns = _Untracked()  # tf.functions per (beam_width, length_penalty)
        self.built = True  # the weights are the (built) network's

    # -- what a subclass provides ------------------------------------------------------
    def prepare(self, inputs):
        """Raw inputs [B] (``input_dtype``) -> what the network's ``encode`` takes."""
        raise NotImplementedError(f"{type(self).__name__} must implement prepare()")

    # -- the shared pipeline ---------------------------------------------------------
    def step_network(self):
        """The wrapped network (``encode`` / ``decode_step``)."""
        return getattr(self, self.network_attribute)

    def call(self, inputs, training=False):
        return self.step_network()(inputs, training=training)

    @property
    def beam_width(self) -> int:
        return int(getattr(self.step_network(), "beam_width", 1) or 1)

    @property
    def length_penalty(self) -> float:
        return float(getattr(self.step_network(), "length_penalty", 0.0) or 0.0)

    @property
    def no_repeat_ngram(self) -> int:
        """The network's n-gram blocking (``pipelines/decoding.py``); 0 where it has none."""
        return int(getattr(self.step_network(), "no_repeat_ngram", 0) or 0)

    def detokenize(self, ids):
        """target ids [B, T] -> string [B]; padding, [START] and [END] print as nothing."""
        words = tf.gather(tf.constant(output_words(self.target_vocabulary)), ids)
        return join_tokens(words, self.tokenizer)

    def decode(self, prepared, beam_width: int = 1, length_penalty: float = 0.0):
        """Network inputs -> (ids [B, T], scores [B], attention [B, T, S] or None)."""
        return generate(
            self.step_network(),
            prepared,
            self.start_id,
            self.end_id,
            self.max_decode_length,
            beam_width=beam_width,
            length_penalty=length_penalty,
            banned=self.banned_ids,
            no_repeat_ngram=self.no_repeat_ngram,
        )

    def generate_fn(self, beam_width: int | None = None, length_penalty: float | None = None):
        """The ``tf.function`` ``inputs -> {output_name: string [B], "scores": float [B]}``
        (one per decoding setting; the network's defaults when None)."""
        beam_width = self.beam_width if beam_width is None else int(beam_width)
        length_penalty = self.length_penalty if length_penalty is None else float(length_penalty)
        key = (beam_width, length_penalty)
        cache = self._generate_fns.items
        if key not in cache:
            spec = tf.TensorSpec([None], self.input_dtype, name=self.input_name)

            @tf.function(input_signature=[spec])
            def generate_text(inputs):
                ids, scores, _ = self.decode(self.prepare(inputs), beam_width, length_penalty)
                return {self.output_name: self.detokenize(ids), "scores": scores}

            cache[key] = generate_text
        return cache[key]

    def generate(
        self,
        inputs: Sequence[Any],
        beam_width: int | None = None,
        length_penalty: float | None = None,
        batch_size: int = GENERATE_BATCH,
    ) -> tuple[list[str], list[float]]:
        """Eager helper for evaluation: Python inputs -> (texts, scores), in batches."""
        fn = self.generate_fn(beam_width, length_penalty)
        texts: list[str] = []
        scores: list[float] = []
        for i in range(0, len(inputs), batch_size):
            chunk = tf.constant(list(inputs[i : i + batch_size]), dtype=self.input_dtype)
            result = fn(chunk)
            texts.extend(s.decode("utf-8") for s in result[self.output_name].numpy())
            scores.extend(float(v) for v in result["scores"].numpy())
        return texts, scores

    def endpoint(self, check_inputs: Any = None) -> Endpoint:
        """``serving_default``: the default decoding, compared on ``check_inputs``."""
        spec = tf.TensorSpec([None], self.input_dtype, name=self.input_name)
        checks = [] if check_inputs is None else [np.asarray(check_inputs, dtype=object)]
        return Endpoint("serving_default", self.generate_fn(), [spec], checks)


@keras.saving.register_keras_serializable(package="deeptrends")
class Translator(TextDecoder):
    """Sentences in, translations out, around a ``Seq2Seq`` network.

    Args:
        seq2seq: keras.Model. The network (``encode`` / ``decode_step``).
        source_vocabulary: list. Source tokens, index = id (``""`` padding, ``[UNK]``,
            ``[END]`` first).
        target_vocabulary: list. Target tokens (``""``, ``[UNK]``, ``[START]``, ``[END]`` first).
        max_source_length: int. Longer inputs are truncated to this many tokens (with ``[END]``).
        max_decode_length: int. The most target tokens generated.
        tokenizer: str. ``word`` (the source looked up by word), ``wordpiece`` (split
            into the source vocabulary's WordPiece subwords, in the graph) or ``bpe``.
        source_model: str. ``bpe``: the source's SentencePiece BPE model, base64.
    """

    network_attribute = "seq2seq"
    input_name = "sentences"
    output_name = "translations"

    def __init__(
        self,
        seq2seq,
        source_vocabulary,
        target_vocabulary,
        max_source_length,
        max_decode_length,
        tokenizer="word",
        source_model="",
        **kwargs,
    ):
        super().__init__(seq2seq, target_vocabulary, max_decode_length, tokenizer, **kwargs)
        self.source_vocabulary = list(source_vocabulary)
        self.max_source_length = int(max_source_length)
        self.source_model = str(source_model or "")
        if self.tokenizer == "bpe":
            if not self.source_model:
                raise ValueError("Translator: tokenizer 'bpe' needs `source_model`.")
            self.source_bpe = bpe_tokenizer(base64.b64decode(self.source_model))
        elif self.tokenizer == "wordpiece":
            self.source_pieces = word_piece_tokenizer(self.source_vocabulary)
        else:
            self.source_lookup = keras.layers.StringLookup(
                vocabulary=self.source_vocabulary[2:],
                mask_token="",
                oov_token="[UNK]",
                name="source_lookup",
            )
        self.source_end = self.source_vocabulary.index(END)

    def source_ids(self, sentences):
        """string [B] -> source ids int32 [B, <= max_source_length - 1], 0-padded."""
        keep = self.max_source_length - 1
        if self.tokenizer == "bpe":
            ids = tf.cast(bpe_ids(self.source_bpe, sentences), tf.int32)
            return ids[:, :keep].to_tensor(default_value=0)
        if self.tokenizer == "wordpiece":
            ids = tf.cast(piece_ids(self.source_pieces, sentences), tf.int32)
            return ids[:, :keep].to_tensor(default_value=0)
        tokens = tf.strings.split(standardize(sentences))
        tokens = tokens[:, :keep].to_tensor(default_value="")
        return tf.cast(self.source_lookup(tokens), tf.int32)  # "" -> 0, unknown -> 1

    def prepare(self, sentences):
        """string [B] -> ids int32 [B, <= max_source_length] ending in [END], 0-padded."""
        ids = self.source_ids(sentences)
        lengths = tf.reduce_sum(tf.cast(ids > 0, tf.int32), axis=1)
        ids = tf.pad(ids, [[0, 0], [0, 1]])
        return ids + self.source_end * tf.one_hot(lengths, tf.shape(ids)[1], dtype=tf.int32)

    def greedy_with_attention(self, sentences: Sequence[str]):
        """Eager helper for heat-maps: (source ids, target ids, attention [T, S]) per sentence."""
        ids = self.prepare(tf.constant(list(sentences), dtype=tf.string))
        tokens, _, attention = self.decode(ids, 1)
        return ids.numpy(), tokens.numpy(), attention.numpy()

    def get_config(self):
        return {
            **super().get_config(),
            "seq2seq": keras.saving.serialize_keras_object(self.seq2seq),
            "source_vocabulary": self.source_vocabulary,
            "target_vocabulary": self.target_vocabulary,
            "max_source_length": self.max_source_length,
            "max_decode_length": self.max_decode_length,
            "tokenizer": self.tokenizer,
            "source_model": self.source_model,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["seq2seq"] = keras.saving.deserialize_keras_object(config["seq2seq"])
        return cls(**config)
