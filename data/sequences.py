"""Sequence datasets: generated long-term-dependency problems and word-level language
modelling text.

- ``adding`` (Hochreiter & Schmidhuber 1997, experiment 4): ``length`` steps of
  ``(value ~ U(0, 1), marker)``; exactly two markers, one in each half; the target is the
  sum of the two marked values. Predicting the mean (1.0) scores MSE ~0.167; a network
  that bridges the gap scores far below (solved: MSE < 0.01).
- ``recall``: ``length`` tokens from ``symbols`` symbols; the label is the first token, so
  the answer must be carried over ``length - 1`` steps of noise (chance 1 / symbols).
- ``copy`` (the copy-memory task of Arjovsky, Shah & Bengio 2016, after Hochreiter &
  Schmidhuber 1997): ``copy_length`` (10) symbols from ``symbols`` (8), then ``length``
  blanks, a delimiter, and ``copy_length - 1`` more blanks; at the last ``copy_length``
  steps the network must emit the symbols it saw ``length + copy_length`` steps earlier.
  Tokens: 0 padding (never in an input), 1..symbols the symbols, ``symbols + 1`` blank,
  ``symbols + 2`` delimiter. Labels are a token per step, 0 (not scored) except at the
  last ``copy_length`` steps, so the loss is the cross-entropy per recalled symbol:
  a network that only learns which symbols exist scores ``ln(symbols)`` (2.08 nats for
  8), one that copies scores ~0. (Arjovsky et al. also score the blanks, which dilutes
  the baseline to ``copy_length * ln(symbols) / (length + 2 * copy_length)``.) It is a
  per-step prediction, served and evaluated like a language model (``perplexity``:
  chance ``symbols``, solved ~1).
- ``text_lm``: a text file (one sentence per line, or a column of a tab-separated file)
  as a word stream, sentences ended by ``<eos>``; seeded 90/10 split by sentence;
  vocabulary from the training split. Chunked into windows of ``seq_len`` tokens, input
  ``x[t]`` and label ``x[t+1]``; ``stateful=True`` lays the stream out as ``batch_size``
  parallel rows read chunk after chunk (truncated BPTT: chunk ``k + 1`` of a row continues
  chunk ``k``).

Every training stream repeats before it is batched (a stateful one batches whole rows
only), so no training batch is partial, for any replica count: there is nothing for
``data.drop_remainder`` to drop. An epoch is ``ceil(examples / batch_size)`` batches.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tensorflow as tf

from data.splits import DataError
from data.text import utf8_payload

# each generated problem and the head it needs
PROBLEMS = {"adding": "regression", "recall": "classification", "copy": "language_model"}
COPY_LENGTH = 10
LM_RESERVED = ("<pad>", "<unk>", "<eos>")


@dataclass
class SequenceData:
    """Batched datasets of a sequence problem and what the model needs to know."""

    train: tf.data.Dataset  # repeating
    eval: tf.data.Dataset  # one pass
    kind: str  # "regression", "classification" or "language_model"
    steps_per_epoch: int
    num_train: int
    num_eval: int
    fingerprint: str
    source: str
    info: dict = field(default_factory=dict)  # input_dim / vocab_size / num_outputs ...


def _check_int(name: str, value, low: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise DataError(f"data.{name} must be an int >= {low}. Received: {name}={value!r}")


def generate_adding(n: int, length: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The adding problem: x [n, length, 2] float32, y [n, 1] float32."""
    values = rng.uniform(0.0, 1.0, size=(n, length)).astype(np.float32)
    half = max(1, length // 2)
    first = rng.integers(0, half, size=n)
    second = rng.integers(half, length, size=n) if length > 1 else first
    markers = np.zeros((n, length), np.float32)
    markers[np.arange(n), first] = 1.0
    markers[np.arange(n), second] = 1.0
    y = (values * markers).sum(axis=1, keepdims=True).astype(np.float32)
    return np.stack([values, markers], axis=-1), y


def generate_recall(
    n: int, length: int, symbols: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """First-symbol recall: x [n, length] int32 in 1..symbols, y [n] int32 in 0..symbols-1."""
    x = rng.integers(1, symbols + 1, size=(n, length)).astype(np.int32)
    return x, (x[:, 0] - 1).astype(np.int32)


def generate_copy(
    n: int, length: int, symbols: int, rng: np.random.Generator, copy_length: int = COPY_LENGTH
) -> tuple[np.ndarray, np.ndarray]:
    """Copy memory: x [n, length + 2 * copy_length] int32, y the same shape (0 = unscored)."""
    blank, delimiter = symbols + 1, symbols + 2
    steps = length + 2 * copy_length
    data = rng.integers(1, symbols + 1, size=(n, copy_length)).astype(np.int32)
    x = np.full((n, steps), blank, np.int32)
    x[:, :copy_length] = data
    x[:, length + copy_length] = delimiter
    y = np.zeros((n, steps), np.int32)
    y[:, -copy_length:] = data
    return x, y


def load_generated(
    problem: str = "adding",
    length: int = 50,
    num_train: int = 10_000,
    num_eval: int = 1_000,
    symbols: int = 8,
    seed: int = 1234,
    batch_size: int = 32,
) -> SequenceData:
    """A generated long-dependency problem as repeating train and one-pass eval datasets.

    Args:
        problem: str. ``adding`` (regression), ``recall`` (classification) or ``copy``
            (a symbol per step).
        length: int. The sequence length (the dependency spans up to this many steps);
            ``copy``: the blanks between the symbols and the delimiter (the sequence is
            ``length + 20`` steps).
        num_train: int. Training sequences (a fixed set, reshuffled each epoch).
        num_eval: int. Evaluation sequences (drawn from an independent stream).
        symbols: int. ``recall``: the number of symbols (classes).
        seed: int. The generator seed.
        batch_size: int. The batch size.
    """
    if problem not in PROBLEMS:
        raise DataError(
            f"data.problem must be one of {list(PROBLEMS)}. Received: problem={problem!r}"
        )
    for name, value in (("length", length), ("num_train", num_train), ("num_eval", num_eval)):
        _check_int(name, value)
    _check_int("symbols", symbols, 2)
    rng_train = np.random.default_rng([seed, 0])
    rng_eval = np.random.default_rng([seed, 1])
    if problem == "adding":
        train, evals = (
            generate_adding(num_train, length, rng_train),
            generate_adding(num_eval, length, rng_eval),
        )
        info = {"input_dim": 2, "num_outputs": 1, "sequence_length": length}
    elif problem == "copy":
        train = generate_copy(num_train, length, symbols, rng_train)
        evals = generate_copy(num_eval, length, symbols, rng_eval)
        info = {"vocab_size": symbols + 3, "sequence_length": length + 2 * COPY_LENGTH}
    else:
        train = generate_recall(num_train, length, symbols, rng_train)
        evals = generate_recall(num_eval, length, symbols, rng_eval)
        info = {"vocab_size": symbols + 1, "num_outputs": symbols, "sequence_length": length}
    train_ds = (
        tf.data.Dataset.from_tensor_slices(train)
        .repeat()
        .shuffle(min(num_train, 10_000), seed=seed)
        .batch(batch_size)
        .prefetch(tf.data.AUTOTUNE)
    )
    eval_ds = tf.data.Dataset.from_tensor_slices(evals).batch(batch_size).prefetch(tf.data.AUTOTUNE)
    fp = hashlib.sha256(
        f"{problem}/{length}/{num_train}/{num_eval}/{symbols}/{seed}".encode()
    ).hexdigest()[:16]
    return SequenceData(
        train_ds,
        eval_ds,
        PROBLEMS[problem],
        -(-num_train // batch_size),
        num_train,
        num_eval,
        fp,
        f"generated:{problem}",
        {**info, "problem": problem},
    )


def read_text_lines(path: Path, column: int | None) -> list[str]:
    """Non-empty lines of a UTF-8 file, or column ``column`` (0-based) of a TSV file."""
    try:
        text = utf8_payload(path.read_bytes(), path).decode("utf-8")
    except FileNotFoundError:
        raise DataError(f"data.path: {path}: file not found") from None
    except UnicodeDecodeError as exc:
        raise DataError(
            f"data.path: {path}: not UTF-8 ({exc.reason} at byte {exc.start})"
        ) from None
    lines = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if column is not None:
            fields = line.split("\t")
            if len(fields) <= column:
                raise DataError(f"{path}:{number}: no column {column} (0-based) in {line[:60]!r}")
            line = fields[column]
        lines.append(line.strip())
    return lines


def _chunks(ids: np.ndarray, seq_len: int, rows: int | None) -> tuple[np.ndarray, np.ndarray]:
    """A token stream -> (inputs, labels) windows [N, seq_len]. With ``rows``, the stream is
    laid out as ``rows`` parallel streams and windows are ordered so that batch ``k`` holds
    window ``k`` of every row (stateful truncated BPTT)."""
    if rows is None:
        n = (len(ids) - 1) // seq_len
        x = ids[: n * seq_len].reshape(n, seq_len)
        y = ids[1 : n * seq_len + 1].reshape(n, seq_len)
        return x, y
    per_row = (len(ids) - 1) // rows
    n = per_row // seq_len
    if n < 1:
        raise DataError(
            f"The token stream ({len(ids)}) is too short for "
            f"batch_size={rows} x bptt_steps={seq_len}."
        )
    xs = ids[: rows * per_row].reshape(rows, per_row)[:, : n * seq_len]
    ys = ids[1 : rows * per_row + 1].reshape(rows, per_row)[:, : n * seq_len]
    # [rows, n, T] -> [n, rows, T] -> [n * rows, T]: consecutive batches continue each row
    x = xs.reshape(rows, n, seq_len).transpose(1, 0, 2).reshape(-1, seq_len)
    y = ys.reshape(rows, n, seq_len).transpose(1, 0, 2).reshape(-1, seq_len)
    return x, y


def load_text_lm(
    path: str | None = None,
    column: int | None = 0,
    max_vocab: int = 10_000,
    min_count: int = 1,
    eval_fraction: float = 0.1,
    max_lines: int | None = None,
    seed: int = 1234,
    batch_size: int = 32,
    seq_len: int = 35,
    stateful: bool = False,
) -> SequenceData:
    """Word-level language-modelling data.

    Args:
        path: str or None. A text or TSV file; default ``$DEEPTRENDS_DATA_DIR/deu_eng/deu.txt``.
        column: int or None. The 0-based TSV column to read; None reads whole lines.
        max_vocab: int. Vocabulary cap including ``<pad>``, ``<unk>``, ``<eos>``.
        min_count: int. Rarer words become ``<unk>``.
        eval_fraction: float. The share of sentences held out (seeded, by sentence).
        max_lines: int or None. Use only a seeded sample of this many sentences.
        seed: int. The split seed.
        batch_size: int. The batch size (the number of parallel rows when stateful).
        seq_len: int. Tokens per window (``train.bptt_steps`` when truncated BPTT is used).
        stateful: bool. Lay the stream out for a stateful model (see the module docstring).
    """
    from data.text import build_vocabulary, tokenize
    from data.translation import default_corpus_path

    if not 0.0 < eval_fraction < 1.0:
        raise DataError(
            f"data.eval_fraction must be in (0, 1). Received: eval_fraction={eval_fraction!r}"
        )
    _check_int("seq_len", seq_len)
    file = Path(path) if path else default_corpus_path()
    lines = read_text_lines(file, column)
    # the deu_eng header "1<TAB>2" and exact duplicates carry nothing for a language model
    lines = list(dict.fromkeys(line for line in lines if not line.isdigit()))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lines))
    if max_lines is not None:
        order = order[:max_lines]
    n_eval = max(1, int(round(len(order) * eval_fraction)))
    eval_lines = [lines[i] for i in order[:n_eval]]
    train_lines = [lines[i] for i in order[n_eval:]]
    if not train_lines:
        raise DataError(f"{file}: too few sentences ({len(order)}) for a train/eval split")
    train_tok, eval_tok = tokenize(train_lines), tokenize(eval_lines)
    vocab = build_vocabulary(train_tok, LM_RESERVED, max_vocab, min_count)
    index = {w: i for i, w in enumerate(vocab)}

    def stream(token_lists):
        return np.array(
            [index.get(t, 1) for tokens in token_lists for t in [*tokens, "<eos>"]], dtype=np.int32
        )

    train_ids, eval_ids = stream(train_tok), stream(eval_tok)
    rows = batch_size if stateful else None
    tx, ty = _chunks(train_ids, seq_len, rows)
    ex, ey = _chunks(eval_ids, seq_len, rows)
    if len(ex) == 0:
        raise DataError(
            f"{file}: the evaluation stream ({len(eval_ids)} tokens) is shorter than "
            f"one window of {seq_len}"
        )
    if stateful:  # order matters: no shuffle, whole batches only
        train_ds = (
            tf.data.Dataset.from_tensor_slices((tx, ty))
            .batch(batch_size, drop_remainder=True)
            .repeat()
        )
        eval_ds = tf.data.Dataset.from_tensor_slices((ex, ey)).batch(
            batch_size, drop_remainder=True
        )
        steps = len(tx) // batch_size
    else:
        train_ds = (
            tf.data.Dataset.from_tensor_slices((tx, ty))
            .repeat()
            .shuffle(min(len(tx), 20_000), seed=seed)
            .batch(batch_size)
        )
        eval_ds = tf.data.Dataset.from_tensor_slices((ex, ey)).batch(batch_size)
        steps = -(-len(tx) // batch_size)
    h = hashlib.sha256(
        f"{file}/{column}/{max_vocab}/{min_count}/{eval_fraction}/{max_lines}/{seed}".encode()
    )
    h.update(train_ids.tobytes())
    return SequenceData(
        train_ds.prefetch(tf.data.AUTOTUNE),
        eval_ds.prefetch(tf.data.AUTOTUNE),
        "language_model",
        max(1, steps),
        len(train_ids),
        len(eval_ids),
        h.hexdigest()[:16],
        f"text:{file}",
        {"vocab_size": len(vocab), "vocabulary": vocab, "seq_len": seq_len, "stateful": stateful},
    )
