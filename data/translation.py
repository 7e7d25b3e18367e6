"""Parallel corpora for translation: tab-separated files and TFDS translation sets.

A tab-separated corpus has one ``column1<TAB>column2`` pair per line (UTF-8, LF or CRLF);
``direction`` says which column is the source (``forward``: column 1 -> column 2,
``reverse``: column 2 -> column 1; manythings.org's ``deu.txt`` is ``English<TAB>German``,
so German -> English is ``reverse``). A first line of two bare numbers (the ``1<TAB>2``
header of the deu_eng export) is skipped. A malformed line (not two non-empty fields) is
an error naming the file and line, or is skipped and counted with ``skip_bad_lines``.

Splits are seeded and grouped by source sentence: every pair of one source sentence lands
in the same split, so no test or validation source sentence occurs in training (Tatoeba
repeats sentences with several translations).

Tokenisation and vocabularies are ``data.text``'s (the same in-graph ``standardize`` runs
in the data pipeline and in the exported serving graph). Vocabularies come from the
training split only: words (``tokenizer: word``) or WordPiece subwords
(``tokenizer: wordpiece``). The tokenisation options (``tokenizer``, ``max_length``,
``source_vocab_size``, ``target_vocab_size``, ``min_count``) are declared, with their defaults, once: in the
dataset catalog's entries (``data/catalog.py``); ``build_translation_datasets`` takes them
as keyword arguments, the loaders take the rest.
"""

from __future__ import annotations

import collections
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tensorflow as tf

from data.catalog import source_root
from data.splits import DataError
from data.text import (
    SOURCE_RESERVED,
    TARGET_RESERVED,
    build_vocabulary,
    check_tokenizer,
    encode_ids,
    encode_targets,
    learn_bpe,
    learn_word_pieces,
    standardized,
    tokenize,
    tokenize_bpe,
    tokenize_pieces,
    trim_padding,
    utf8_payload,
)

DIRECTIONS = ("forward", "reverse")


# ---------------------------------------------------------------- parsing


@dataclass
class ParallelCorpus:
    sources: list[str]
    targets: list[str]
    path: str
    skipped_lines: list[int] = field(default_factory=list)
    header_skipped: bool = False


def read_parallel_corpus(
    path: str | Path,
    direction: str = "forward",
    skip_bad_lines: bool = False,
    ignore_extra_columns: bool = False,
) -> ParallelCorpus:
    """Read a ``column1<TAB>column2`` file into source and target sentences.

    Args:
        path: str. The file.
        direction: str. ``forward`` (column 1 is the source) or ``reverse``.
        skip_bad_lines: bool. Skip and count malformed lines instead of raising.
        ignore_extra_columns: bool. Accept lines with more than two columns (manythings'
            attribution column) and use the first two.
    """
    if direction not in DIRECTIONS:
        raise DataError(
            f"data.direction must be one of {list(DIRECTIONS)}. Received: direction={direction!r}"
        )
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"data.path: {path}: file not found") from None
    except OSError as exc:
        raise DataError(f"data.path: {path}: cannot read ({exc})") from None
    raw = utf8_payload(raw, path)
    sources: list[str] = []
    targets: list[str] = []
    skipped: list[int] = []
    header = False
    for number, line in enumerate(raw.split(b"\n"), start=1):
        line = line.rstrip(b"\r")
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            problem = f"not UTF-8 ({exc.reason} at byte {exc.start})"
            fields = None
        else:
            fields = text.split("\t")
            problem = None
            if len(fields) < 2:
                problem = "no tab: expected source<TAB>target"
            elif len(fields) > 2 and not ignore_extra_columns:
                problem = (
                    f"{len(fields)} tab-separated fields, expected 2 "
                    "(set data.ignore_extra_columns to use the first two)"
                )
            elif not fields[0].strip() or not fields[1].strip():
                problem = "an empty sentence"
        if problem is None and number == 1 and all(f.strip().isdigit() for f in fields[:2]):
            header = True  # the deu_eng export's "1<TAB>2" header line
            continue
        if problem is not None:
            if skip_bad_lines:
                skipped.append(number)
                continue
            shown = line[:80].decode("utf-8", "replace")
            raise DataError(
                f"{path}:{number}: malformed line ({problem}): {shown!r}. "
                "Fix the file or set data.skip_bad_lines=true to skip and count such lines."
            )
        first, second = fields[0].strip(), fields[1].strip()
        src, tgt = (first, second) if direction == "forward" else (second, first)
        sources.append(src)
        targets.append(tgt)
    if not sources:
        raise DataError(f"{path}: no sentence pairs found")
    return ParallelCorpus(sources, targets, str(path), skipped, header)


def grouped_split(
    sources: list[str], test_size: int, validation_size: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices (train, validation, test) of a seeded split grouped by source sentence.

    Groups (all pairs of one source) are drawn in a seeded random order; test takes groups
    until it holds ``test_size`` pairs (filling the last places with smaller groups, so the
    size is exact whenever possible), then validation the same way, the rest is training.
    """
    groups: dict[str, list[int]] = collections.defaultdict(list)
    for i, s in enumerate(sources):
        groups[s].append(i)
    keys = sorted(groups)
    order = np.random.default_rng(seed).permutation(len(keys))
    remaining = [keys[i] for i in order]
    picked = []
    for size in (test_size, validation_size):
        chosen, rest, count = [], [], 0
        for key in remaining:
            n = len(groups[key])
            if count + n <= size:
                chosen.extend(groups[key])
                count += n
            else:
                rest.append(key)
        remaining = rest
        picked.append(np.array(sorted(chosen), dtype=np.int64))
    train = np.array(sorted(i for key in remaining for i in groups[key]), dtype=np.int64)
    if len(train) == 0:
        raise DataError(
            f"The corpus ({len(sources)} pairs) leaves no training pairs after "
            f"test_size={test_size} "
            f"and validation_size={validation_size}; lower them."
        )
    return train, picked[1], picked[0]


# ---------------------------------------------------------------- loaders


@dataclass
class ParallelSplits:
    """Raw sentence pairs per split (``train``/``validation``/``test``) and provenance."""

    splits: dict[str, tuple[list[str], list[str]]]
    fingerprint: str
    source: str
    stats: dict = field(default_factory=dict)


def default_corpus_path() -> Path:
    root = source_root()
    if root is None:
        raise DataError(
            "data.path is not set and DEEPTRENDS_DATA_DIR is not set: point data.path at a "
            "source<TAB>target file, or set DEEPTRENDS_DATA_DIR to the folder holding "
            "deu_eng/deu.txt."
        )
    return root / "deu_eng" / "deu.txt"


def load_tsv_translation(
    data_dir: str | None = None,
    path: str | None = None,
    direction: str = "reverse",
    skip_bad_lines: bool = False,
    ignore_extra_columns: bool = False,
    test_size: int = 2000,
    validation_size: int = 1000,
    split_seed: int = 2024,
    max_pairs: int | None = None,
) -> ParallelSplits:
    """A tab-separated corpus split train/validation/test, grouped by source sentence.

    Args:
        data_dir: unused (TFDS data_dir of the common loader interface).
        path: str. The corpus; default ``$DEEPTRENDS_DATA_DIR/deu_eng/deu.txt``.
        direction: str. ``forward`` (column 1 -> column 2) or ``reverse``.
        skip_bad_lines: bool. Skip and count malformed lines instead of raising.
        ignore_extra_columns: bool. Use the first two columns of longer lines.
        test_size: int. Pairs in the test split.
        validation_size: int. Pairs in the validation split.
        split_seed: int. The seed of the grouped split.
        max_pairs: int or None. Keep only a seeded sample of this many pairs (quick runs).
    """
    for name, value in (("test_size", test_size), ("validation_size", validation_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DataError(f"data.{name} must be a positive int. Received: {name}={value!r}")
    corpus = read_parallel_corpus(
        path or default_corpus_path(), direction, skip_bad_lines, ignore_extra_columns
    )
    sources, targets = corpus.sources, corpus.targets
    if max_pairs is not None and max_pairs < len(sources):
        keep = np.sort(np.random.default_rng(split_seed).permutation(len(sources))[:max_pairs])
        sources = [sources[i] for i in keep]
        targets = [targets[i] for i in keep]
    train, val, test = grouped_split(sources, test_size, validation_size, split_seed)
    splits = {
        name: ([sources[i] for i in idx], [targets[i] for i in idx])
        for name, idx in (("train", train), ("validation", val), ("test", test))
    }
    h = hashlib.sha256(
        f"{direction}/{split_seed}/{test_size}/{validation_size}/{max_pairs}".encode()
    )
    for s, t in zip(sources, targets, strict=False):
        h.update(s.encode() + b"\t" + t.encode() + b"\n")
    stats = {
        "pairs": len(sources),
        "skipped_lines": len(corpus.skipped_lines),
        "skipped_line_numbers": corpus.skipped_lines[:20],
        "header_skipped": corpus.header_skipped,
        "direction": direction,
        **{f"num_{k}": len(v[0]) for k, v in splits.items()},
    }
    return ParallelSplits(splits, h.hexdigest()[:16], f"tsv:{corpus.path}", stats)


def load_tfds_translation(
    data_dir: str | None = None,
    tfds_name: str = "ted_hrlr_translate/pt_to_en",
    source_language: str | None = None,
    target_language: str | None = None,
    test_split: str = "test",
    validation_split: str = "validation",
    max_pairs: int | None = None,
) -> ParallelSplits:
    """A TFDS translation set (``ted_hrlr_translate/*``, ``wmt14_translate/de-en``...) that is
    already prepared in ``data_dir`` (there is no network to download it).

    Args:
        data_dir: str. The TFDS data_dir.
        tfds_name: str. The TFDS name with config.
        source_language: str or None. The source feature; default the builder's first
            supervised key.
        target_language: str or None. The target feature; default its second.
        test_split: str. The split evaluated with BLEU.
        validation_split: str. The split monitored during training.
        max_pairs: int or None. Keep only the first this many training pairs.
    """
    import tensorflow_datasets as tfds

    from data.catalog import default_tfds_dir

    try:
        builder = tfds.builder(tfds_name, data_dir=data_dir or default_tfds_dir())
    except Exception as exc:  # noqa: BLE001 - TFDS raises several types for unknown names
        raise DataError(f"data.tfds_name: {tfds_name!r} is not a TFDS dataset ({exc})") from None
    if not builder.is_prepared():
        raise DataError(
            f"data.tfds_name: TFDS {tfds_name!r} is not prepared under {builder.data_dir} "
            "(no network to download it)."
        )
    keys = builder.info.supervised_keys or (None, None)
    src_key, tgt_key = source_language or keys[0], target_language or keys[1]
    splits = {}
    for name, split in (("train", "train"), ("validation", validation_split), ("test", test_split)):
        ds = builder.as_dataset(split=split, shuffle_files=False)
        if name == "train" and max_pairs:
            ds = ds.take(max_pairs)
        src, tgt = [], []
        for ex in ds.as_numpy_iterator():
            src.append(ex[src_key].decode("utf-8"))
            tgt.append(ex[tgt_key].decode("utf-8"))
        splits[name] = (src, tgt)
    fp = hashlib.sha256(f"{tfds_name}/{builder.version}/{src_key}/{tgt_key}".encode()).hexdigest()[
        :16
    ]
    stats = {f"num_{k}": len(v[0]) for k, v in splits.items()}
    return ParallelSplits(splits, fp, f"tfds:{tfds_name}", stats)


# ---------------------------------------------------------------- tf.data


@dataclass
class TranslationData:
    """Token-id datasets of a parallel corpus and everything the model and export need."""

    train: tf.data.Dataset  # repeating ((source, target_in), target_out) batches
    validation: tf.data.Dataset  # one pass
    raw: ParallelSplits
    source_vocab: list[str]
    target_vocab: list[str]
    max_source_length: int
    max_target_length: int
    num_train: int
    steps_per_epoch: int
    dropped_long: int
    tokenizer: str = "word"
    source_model: bytes = b""  # bpe: the source's SentencePiece model (serving tokenises with it)


def build_translation_datasets(
    raw: ParallelSplits,
    batch_size: int,
    *,
    max_length: int,
    source_vocab_size: int | None,
    target_vocab_size: int | None,
    min_count: int,
    tokenizer: str = "word",
    seed: int = 42,
) -> TranslationData:
    """Vocabularies from the training split, id tensors, batched tf.data pipelines.

    Training pairs with more than ``max_length`` tokens on either side are dropped (and
    counted); the source then gets ``[END]``, the target is ``[START] ...`` as decoder
    input and ``... [END]`` as label, both padded with 0 per batch.

    Args:
        raw: ParallelSplits. The sentence pairs per split.
        batch_size: int. The global batch size.
        max_length: int. The most tokens of a training sentence (either side).
        source_vocab_size: int or None. Cap of the source vocabulary (reserved included).
        target_vocab_size: int or None. Cap of the target vocabulary (reserved included).
        min_count: int. Rarer training words become ``[UNK]`` (``word`` only).
        tokenizer: str. ``word``, ``wordpiece`` or ``bpe`` (subwords learned from the
            training split, vocabulary sizes as aimed at; ``max_length`` counts pieces).
        seed: int. The shuffle seed of the training stream. The stream repeats before it
            is shuffled and batched, so no batch is partial (for any replica count); an
            epoch is ``ceil(pairs / batch_size)`` batches.
    """
    check_tokenizer(tokenizer)
    train_src, train_tgt = raw.splits["train"]
    src_tokens, tgt_tokens = tokenize(train_src), tokenize(train_tgt)
    source_model = b""
    if tokenizer == "bpe":  # merges learned from every standardised training sentence
        source_model, source_vocab = learn_bpe(standardized(train_src), source_vocab_size or 8000)
        target_model, target_vocab = learn_bpe(standardized(train_tgt), target_vocab_size or 8000)

        def split(sentences, vocab):
            model = source_model if vocab is source_vocab else target_model
            return tokenize_bpe(sentences, model, vocab)

        src_tokens, tgt_tokens = split(train_src, source_vocab), split(train_tgt, target_vocab)
    elif tokenizer == "wordpiece":  # pieces learned from every training sentence's words
        source_vocab = learn_word_pieces(src_tokens, SOURCE_RESERVED, source_vocab_size or 8000)
        target_vocab = learn_word_pieces(tgt_tokens, TARGET_RESERVED, target_vocab_size or 8000)

        def split(sentences, vocab):
            return tokenize_pieces(sentences, vocab)

        src_tokens, tgt_tokens = split(train_src, source_vocab), split(train_tgt, target_vocab)
    else:

        def split(sentences, vocab):
            return tokenize(sentences)

    keep = [
        i
        for i, (s, t) in enumerate(zip(src_tokens, tgt_tokens, strict=True))
        if len(s) <= max_length and len(t) <= max_length
    ]
    if not keep:
        raise DataError(
            f"data.max_length: no training pair has at most {max_length} tokens on both sides."
        )
    dropped = len(src_tokens) - len(keep)
    src_tokens = [src_tokens[i] for i in keep]
    tgt_tokens = [tgt_tokens[i] for i in keep]
    if tokenizer == "word":
        source_vocab = build_vocabulary(src_tokens, SOURCE_RESERVED, source_vocab_size, min_count)
        target_vocab = build_vocabulary(tgt_tokens, TARGET_RESERVED, target_vocab_size, min_count)
    s_len = max(len(s) for s in src_tokens) + 1
    t_len = max(len(t) for t in tgt_tokens) + 1

    def arrays(src_tok, tgt_tok):
        return (
            encode_ids(src_tok, source_vocab, s_len),
            *encode_targets(tgt_tok, target_vocab, t_len),
        )

    def trim(src, tin, tout):  # per batch: cut the all-padding tail columns
        (src,) = trim_padding(src)
        tout, tin = trim_padding(tout, tin)
        return (src, tin), tout

    src, tin, tout = arrays(src_tokens, tgt_tokens)
    n = len(src)
    train = (
        tf.data.Dataset.from_tensor_slices((src, tin, tout))
        .repeat()
        .shuffle(min(n, 50_000), seed=seed, reshuffle_each_iteration=True)
        .batch(batch_size)
        .map(trim, num_parallel_calls=tf.data.AUTOTUNE)
        .prefetch(tf.data.AUTOTUNE)
    )
    val_src, val_tgt = raw.splits["validation"]
    vs, vin, vout = (
        arrays(split(val_src, source_vocab), split(val_tgt, target_vocab))
        if val_src
        else arrays([[]], [[]])
    )
    validation = (
        tf.data.Dataset.from_tensor_slices((vs, vin, vout))
        .batch(batch_size)
        .map(trim)
        .prefetch(tf.data.AUTOTUNE)
    )
    return TranslationData(
        train=train,
        validation=validation,
        raw=raw,
        source_vocab=source_vocab,
        target_vocab=target_vocab,
        max_source_length=s_len,
        max_target_length=t_len,
        num_train=n,
        steps_per_epoch=max(1, -(-n // batch_size)),
        dropped_long=dropped,
        tokenizer=tokenizer,
        source_model=source_model,
    )
