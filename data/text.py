"""Text shared by every task that reads or writes sentences (translation, language
modelling, captioning): standardisation, tokenisation, vocabularies, ids <-> text.

Text is standardised in-graph by ``standardize`` (lower-case, typographic apostrophes
unified, punctuation split off as tokens, single spaces) and split on spaces; the same
TensorFlow function runs in the data pipeline, in evaluation and in an exported serving
graph, so a served model sees the tokens it was trained on. ``detokenize`` is its inverse
for generated tokens (no space before ``. , ! ? ; :``).

Tokenisers (``data.tokenizer``): ``word`` splits the standardised text on spaces (words
seen fewer than ``min_count`` times become ``[UNK]``); ``wordpiece`` splits each of those
words further into WordPiece subwords (keras-hub's ``compute_word_piece_vocabulary``
learns them from the training split, ``WordPieceTokenizer`` applies them, in the data
pipeline and in the serving graph). A WordPiece vocabulary holds every character of the
training text as a word start and as a ``##`` continuation, so any word made of seen
characters has pieces and never becomes ``[UNK]``. ``bpe`` learns byte-pair-encoding merges
of the standardised training text (SentencePiece BPE, every character kept) and applies
them with keras-hub's ``SentencePieceTokenizer``. ``detokenize`` joins the pieces back, so
``detokenize(tokens) == detokenize(words)`` of the standardised text for every tokeniser.

Vocabularies are lists, index = id: the reserved tokens first, then the words by falling
frequency (ties alphabetical). Id 0 is padding (``""``) everywhere. A sequence that a
model *reads* (a source sentence) ends in ``[END]``; a sequence that a model *writes*
(a translation, a caption) is ``[START] w1 .. wn`` as decoder input and ``w1 .. wn [END]``
as labels (teacher forcing).
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import tensorflow as tf

from data.splits import DataError

PAD, UNK, START, END = "", "[UNK]", "[START]", "[END]"
SOURCE_RESERVED = (PAD, UNK, END)  # text a model reads
TARGET_RESERVED = (PAD, UNK, START, END)  # text a model writes
_PUNCT = r"""([.?!,;:"()¿¡«»„“”])"""
TOKENIZERS = ("word", "wordpiece", "bpe")
SPACE = "\u2581"  # SentencePiece's word-start marker
SUFFIX = "##"  # WordPiece's continuation marker
_PIECE_PAD = "[PAD]"  # id 0 as keras-hub's tokenizer sees it (our vocabularies write "")


# ---------------------------------------------------------------- strings


def standardize(text: tf.Tensor) -> tf.Tensor:
    """string tensor -> lower-cased, punctuation split off as tokens, single spaces."""
    text = tf.strings.lower(text, encoding="utf-8")
    text = tf.strings.regex_replace(text, "[’‘`´]", "'")
    text = tf.strings.regex_replace(text, _PUNCT, r" \1 ")
    text = tf.strings.regex_replace(text, r"\s+", " ")
    return tf.strings.strip(text)


def detokenize(tokens: tf.Tensor, tokenizer: str = "word") -> tf.Tensor:
    """string tokens [B, T] ("" = none) -> sentences [B]: joined as ``tokenizer`` wrote
    them (``word``: with spaces; ``wordpiece``: ``##`` continuations glued to their word;
    ``bpe``: pieces concatenated, ``\u2581`` a space), no space before . , ! ? ; :"""
    if tokenizer == "bpe":
        text = tf.strings.reduce_join(tokens, axis=-1)
        text = tf.strings.regex_replace(text, SPACE, " ")
    else:
        text = tf.strings.reduce_join(tokens, axis=-1, separator=" ")
    text = tf.strings.regex_replace(text, r"\s+", " ")
    text = tf.strings.strip(text)
    if tokenizer == "wordpiece":  # (a leading continuation glues to nothing)
        text = tf.strings.regex_replace(text, r"(^| )" + SUFFIX, "")
    return tf.strings.regex_replace(text, r" ([.?!,;:])", r"\1")


def standardized(sentences: Sequence[str], batch: int = 4096) -> list[str]:
    """Python strings -> standardised Python strings (``standardize``, batched)."""
    out: list[str] = []
    for i in range(0, len(sentences), batch):
        std = standardize(tf.constant(list(sentences[i : i + batch]), dtype=tf.string)).numpy()
        out.extend(s.decode("utf-8") for s in std)
    return out


def tokenize(sentences: Sequence[str], batch: int = 4096) -> list[list[str]]:
    """Python strings -> token lists with ``standardize`` (the serving graph's function)."""
    return [s.split() for s in standardized(sentences, batch)]


def check_tokenizer(tokenizer: str) -> str:
    if tokenizer not in TOKENIZERS:
        raise DataError(
            f"data.tokenizer must be one of {list(TOKENIZERS)}. Received: tokenizer={tokenizer!r}"
        )
    return tokenizer


# ---------------------------------------------------------------- subwords


def learn_word_pieces(
    token_lists: Iterable[Sequence[str]], reserved: tuple[str, ...], size: int
) -> list[str]:
    """A WordPiece vocabulary (``reserved`` first, ``""`` padding at 0) learned from
    standardised words with keras-hub's ``compute_word_piece_vocabulary``.

    Args:
        token_lists: iterable of word lists (``tokenize``'s). The training text only.
        reserved: tuple. The tokens with fixed ids, first.
        size: int. The vocabulary size aimed at (reserved included); every character of
            the text is kept (as a word start and as a ``##`` continuation) even when
            that exceeds it.
    """
    from keras_hub.tokenizers import compute_word_piece_vocabulary

    words = [w for tokens in token_lists for w in tokens]
    if not words:
        raise DataError("data.tokenizer: wordpiece: the training text has no words to learn from")
    pieces = compute_word_piece_vocabulary(
        tf.data.Dataset.from_tensor_slices(tf.constant(words, dtype=tf.string)).batch(4096),
        vocabulary_size=size,
        lowercase=False,  # standardize() lower-cased already
        strip_accents=False,
        split=False,  # words are standardize()'s: punctuation is split off, apostrophes kept
        suffix_indicator=SUFFIX,
        reserved_tokens=[_PIECE_PAD if t == PAD else t for t in reserved],
    )
    learned = [p for p in pieces if p not in reserved and p != _PIECE_PAD]
    alphabet = sorted({c for w in set(words) for c in w})
    kept = set(learned)
    missing = [p for c in alphabet for p in (c, SUFFIX + c) if p not in kept]
    return [*reserved, *learned, *missing]


def word_piece_tokenizer(vocabulary: Sequence[str]):
    """keras-hub's ``WordPieceTokenizer`` over a vocabulary of ``learn_word_pieces``: it
    takes words (string, ragged [B, W]) and returns ids (ragged [B, W, P])."""
    from keras_hub.tokenizers import WordPieceTokenizer

    return WordPieceTokenizer(
        vocabulary=[_PIECE_PAD if t == PAD else t for t in vocabulary],
        lowercase=False,
        strip_accents=False,
        split=False,
        suffix_indicator=SUFFIX,
        oov_token=UNK,
        dtype="int32",
    )


def piece_ids(tokenizer, sentences: tf.Tensor) -> tf.RaggedTensor:
    """string [B] -> WordPiece ids, ragged [B, T]: ``standardize``, split on spaces, pieces
    (in a graph: keras-hub's tokenizers answer Python lists when called eagerly)."""
    if tf.executing_eagerly():
        return tf.function(lambda x: piece_ids(tokenizer, x))(sentences)
    words = tf.strings.split(standardize(sentences))
    return tokenizer(words)  # (keras-hub merges the word and piece dimensions)


@functools.lru_cache(maxsize=8)
def _piece_function(vocabulary: tuple[str, ...]):
    tokenizer = word_piece_tokenizer(vocabulary)
    return tf.function(lambda x: piece_ids(tokenizer, x), reduce_retracing=True)


def tokenize_pieces(sentences: Sequence[str], vocabulary: Sequence[str], batch: int = 4096):
    """Python strings -> WordPiece token lists (the serving graph's ``piece_ids``)."""
    fn = _piece_function(tuple(vocabulary))
    out: list[list[str]] = []
    for i in range(0, len(sentences), batch):
        ids = fn(tf.constant(list(sentences[i : i + batch]), dtype=tf.string))
        out.extend([vocabulary[j] for j in row] for row in ids.to_list())
    return out


def learn_bpe(sentences: Sequence[str], size: int) -> tuple[bytes, list[str]]:
    """A byte-pair-encoding model (SentencePiece BPE, every character of the text kept)
    learned from standardised training sentences, and its vocabulary (index = id: ``""``
    padding, ``[UNK]``, ``[START]``, ``[END]``, then the pieces; ``\u2581`` starts a word).

    Args:
        sentences: list of str. The training text only (``standardized``).
        size: int. The vocabulary size aimed at (fewer when the text has fewer pieces).
    """
    import io

    import sentencepiece as spm

    if not any(s.strip() for s in sentences):
        raise DataError("data.tokenizer: bpe: the training text has no words to learn from")
    writer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(sentences)),
        model_writer=writer,
        vocab_size=int(size),
        model_type="bpe",
        character_coverage=1.0,  # every training character is a piece: no [UNK] for them
        hard_vocab_limit=False,
        normalization_rule_name="identity",  # standardize() normalised already
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        pad_piece=_PIECE_PAD,
        unk_piece=UNK,
        bos_piece=START,
        eos_piece=END,
        minloglevel=2,
    )
    proto = writer.getvalue()
    processor = spm.SentencePieceProcessor(model_proto=proto)
    vocabulary = [processor.id_to_piece(i) for i in range(processor.get_piece_size())]
    return proto, [PAD, *vocabulary[1:]]


def bpe_tokenizer(proto: bytes):
    """keras-hub's ``SentencePieceTokenizer`` over a ``learn_bpe`` model: string [B] ->
    ids (ragged [B, T])."""
    from keras_hub.tokenizers import SentencePieceTokenizer

    return SentencePieceTokenizer(proto=proto, dtype="int32")


def bpe_ids(tokenizer, sentences: tf.Tensor) -> tf.RaggedTensor:
    """string [B] -> BPE ids, ragged [B, T], of the standardised text (in a graph)."""
    if tf.executing_eagerly():
        return tf.function(lambda x: bpe_ids(tokenizer, x))(sentences)
    return tokenizer(standardize(sentences))


def tokenize_bpe(sentences: Sequence[str], proto: bytes, vocabulary: Sequence[str], batch=4096):
    """Python strings -> BPE piece lists (the serving graph's ``bpe_ids``)."""
    tokenizer = bpe_tokenizer(proto)
    fn = tf.function(lambda x: bpe_ids(tokenizer, x), reduce_retracing=True)
    out: list[list[str]] = []
    for i in range(0, len(sentences), batch):
        ids = fn(tf.constant(list(sentences[i : i + batch]), dtype=tf.string))
        out.extend([vocabulary[j] for j in row] for row in ids.to_list())
    return out


# ---------------------------------------------------------------- vocabularies


def build_vocabulary(
    token_lists: Iterable[Sequence[str]],
    reserved: tuple[str, ...],
    max_size: int | None,
    min_count: int = 1,
) -> list[str]:
    """``reserved`` then the words by falling frequency (ties alphabetical), capped.

    Args:
        token_lists: iterable of token lists. The training text only.
        reserved: tuple. The tokens with fixed ids, first (``SOURCE_RESERVED``...).
        max_size: int or None. The most entries, reserved ones included.
        min_count: int. Words seen fewer times are left out (they map to ``[UNK]``).
    """
    counts = collections.Counter(t for tokens in token_lists for t in tokens)
    words = sorted(
        (w for w, c in counts.items() if c >= min_count and w not in reserved),
        key=lambda w: (-counts[w], w),
    )
    if max_size is not None:
        words = words[: max(0, max_size - len(reserved))]
    return [*reserved, *words]


def output_words(vocabulary: Sequence[str]) -> list[str]:
    """The vocabulary as generated text prints it: padding, ``[START]`` and ``[END]``
    print as nothing (``[UNK]`` stays visible)."""
    return ["" if w in (PAD, START, END) else w for w in vocabulary]


# ---------------------------------------------------------------- ids


def encode_ids(
    token_lists: Sequence[Sequence[str]], vocab: Sequence[str], length: int, add_start: bool = False
) -> np.ndarray:
    """Token lists -> int32 ids [N, length] (+[END], optional [START]; truncated, 0-padded)."""
    index = {w: i for i, w in enumerate(vocab)}
    unk, end = index[UNK], index[END]
    out = np.zeros((len(token_lists), length), dtype=np.int32)
    for row, tokens in enumerate(token_lists):
        ids = ([index[START]] if add_start else []) + [index.get(t, unk) for t in tokens]
        ids = ids[: length - 1] + [end]
        out[row, : len(ids)] = ids
    return out


def encode_targets(
    token_lists: Sequence[Sequence[str]], vocab: Sequence[str], length: int
) -> tuple[np.ndarray, np.ndarray]:
    """Token lists of generated text -> teacher-forcing pairs ``(inputs, labels)``, int32
    [N, length]: ``[START] w1 .. wn`` and ``w1 .. wn [END]``, 0-padded (``length``: the
    longest text + 1; where the labels are padding the inputs do not count)."""
    ids = encode_ids(token_lists, vocab, length + 1, add_start=True)
    return ids[:, :-1], ids[:, 1:]


def decode_ids(ids: np.ndarray, vocab: Sequence[str]) -> list[list[str]]:
    """Generated ids [N, T] -> token lists, stopping at ``[END]`` or padding, without
    ``[START]`` (the Python twin of the serving graph's detokenisation)."""
    end = list(vocab).index(END) if END in vocab else None
    start = list(vocab).index(START) if START in vocab else None
    out = []
    for row in np.asarray(ids):
        tokens = []
        for i in row.tolist():
            if i == 0 or i == end:
                break
            if i != start:
                tokens.append(vocab[i])
        out.append(tokens)
    return out


def trim_padding(ids: tf.Tensor, *aligned: tf.Tensor) -> tuple[tf.Tensor, ...]:
    """A batch of 0-padded ids [B, T] without its all-padding tail columns, and the
    ``aligned`` tensors [B, T, ...] cut to the same length (decoder inputs to their
    labels' length)."""
    length = tf.reduce_max(tf.reduce_sum(tf.cast(ids > 0, tf.int32), axis=1))
    return tuple(x[:, :length] for x in (ids, *aligned))


def utf8_payload(raw: bytes, path: Path) -> bytes:
    """The bytes of a text file without a UTF-8 byte-order mark; a UTF-16/32 file (its
    BOM, or NUL bytes between ASCII characters) is refused whole, naming the encoding,
    instead of being read line by line as garbage (``skip_bad_lines`` would skip it all)."""
    if raw.startswith(b"\xef\xbb\xbf"):
        return raw[3:]
    for bom, name in (
        (b"\xff\xfe\x00\x00", "UTF-32"),
        (b"\x00\x00\xfe\xff", "UTF-32"),
        (b"\xff\xfe", "UTF-16"),
        (b"\xfe\xff", "UTF-16"),
    ):
        if raw.startswith(bom):
            raise DataError(f"data.path: {path}: {name} text; save the file as UTF-8")
    if raw[:200].count(b"\x00") > 10:
        raise DataError(f"data.path: {path}: UTF-16/32 text without a BOM; save it as UTF-8")
    return raw
