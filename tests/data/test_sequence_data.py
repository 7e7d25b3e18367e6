"""Text (standardisation, vocabularies, ids <-> text), parallel corpora (parsing, grouped
split) and the generated and text sequence datasets."""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from data.sequences import _chunks, generate_adding, load_generated, load_text_lm  # noqa: E402
from data.splits import DataError  # noqa: E402
from data.text import (  # noqa: E402
    TARGET_RESERVED,
    build_vocabulary,
    decode_ids,
    detokenize,
    encode_targets,
    standardize,
    tokenize,
    trim_padding,
)
from data.translation import (  # noqa: E402
    build_translation_datasets,
    grouped_split,
    load_tsv_translation,
    read_parallel_corpus,
)

# the tokenisation options as the catalog declares them
TEXT = {"max_length": 40, "source_vocab_size": 20000, "target_vocab_size": 20000, "min_count": 1}
from tests.conftest import shared_data_dir  # noqa: E402


def _write(tmp_path, text: str, name="corpus.tsv"):
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8"))
    return path


def test_header_crlf_and_direction(tmp_path):
    path = _write(tmp_path, "1\t2\r\nHi.\tHallo!\r\nGo.\tGeh.\r\n\r\n")
    fwd = read_parallel_corpus(path, "forward")
    assert (
        fwd.header_skipped and fwd.sources == ["Hi.", "Go."] and fwd.targets == ["Hallo!", "Geh."]
    )
    rev = read_parallel_corpus(path, "reverse")
    assert rev.sources == ["Hallo!", "Geh."] and rev.targets == ["Hi.", "Go."]


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("no tab here", "no tab"),
        ("a\tb\tc", "3 tab-separated fields"),
        ("a\t ", "an empty sentence"),
    ],
)
def test_malformed_line_is_named_or_skipped(tmp_path, line, problem):
    path = _write(tmp_path, f"Hi.\tHallo!\n{line}\nGo.\tGeh.\n")
    with pytest.raises(DataError, match=rf"corpus.tsv:2: malformed line \({problem}"):
        read_parallel_corpus(path)
    corpus = read_parallel_corpus(path, skip_bad_lines=True)
    assert corpus.skipped_lines == [2] and corpus.sources == ["Hi.", "Go."]


def test_bad_bytes_direction_and_missing_file(tmp_path):
    path = tmp_path / "bad.tsv"
    path.write_bytes(b"Hi.\tHallo!\n\xff\xfe\tx\n")
    with pytest.raises(DataError, match="bad.tsv:2: malformed line \\(not UTF-8"):
        read_parallel_corpus(path)
    with pytest.raises(DataError, match="direction"):
        read_parallel_corpus(path, direction="sideways")
    with pytest.raises(DataError, match="file not found"):
        read_parallel_corpus(tmp_path / "missing.tsv")


def test_grouped_split_has_no_source_leak_and_exact_sizes():
    rng = np.random.default_rng(0)
    sources = [f"s{int(i)}" for i in rng.integers(0, 300, size=1000)]  # many repeats
    train, val, test = grouped_split(sources, 100, 50, seed=3)
    assert len(test) == 100 and len(val) == 50
    assert len(train) + len(val) + len(test) == len(sources)
    train_src = {sources[i] for i in train}
    assert not train_src & {sources[i] for i in test}
    assert not train_src & {sources[i] for i in val}
    again = grouped_split(sources, 100, 50, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip((train, val, test), again, strict=False))


def test_text_standardisation_round_trip():
    std = standardize(tf.constant(["Ich bin's, Tom! Wo ist „Maria“?", "  ÄRGER  "])).numpy()
    assert std[0].decode() == "ich bin's , tom ! wo ist „ maria “ ?"
    assert std[1].decode() == "ärger"
    out = detokenize(tf.constant([["i'm", "tom", ".", ""], ["", "", "", ""]])).numpy()
    assert [s.decode() for s in out] == ["i'm tom.", ""]


def test_vocabulary_and_ids_round_trip():
    tokens = tokenize(["The cat sat.", "the dog, the cat!"])
    assert tokens[1] == ["the", "dog", ",", "the", "cat", "!"]
    vocab = build_vocabulary(tokens, TARGET_RESERVED, max_size=7, min_count=1)
    assert vocab[:4] == list(TARGET_RESERVED) and vocab[4:] == ["the", "cat", "!"]
    assert build_vocabulary(tokens, TARGET_RESERVED, None, min_count=2)[4:] == ["the", "cat"]
    inputs, labels = encode_targets(tokens, vocab, length=7)  # the longest + 1
    assert inputs[0, 0] == vocab.index("[START]") and labels[0, 4] == vocab.index("[END]")
    np.testing.assert_array_equal(inputs[:, 1:], labels[:, :-1])
    assert decode_ids(labels, vocab) == [
        ["the", "cat", "[UNK]", "[UNK]"],
        ["the"] + ["[UNK]"] * 2 + ["the", "cat", "!"],
    ]
    (a,) = trim_padding(tf.constant(inputs[:1]))
    b, c = trim_padding(tf.constant(labels[:1]), tf.constant(inputs[:1]))
    assert a.shape == (1, 6) and b.shape == c.shape == (1, 5)


def test_vocabulary_from_training_split_only(tmp_path):
    lines = [f"word{i} a.\tWort{i} b." for i in range(60)]
    path = _write(tmp_path, "\n".join(lines) + "\n")
    raw = load_tsv_translation(path=str(path), direction="forward", test_size=10, validation_size=5)
    data = build_translation_datasets(raw, batch_size=8, **TEXT)
    test_words = {t for s in tokenize(raw.splits["test"][0]) for t in s if t.startswith("word")}
    assert test_words and not test_words & set(data.source_vocab)
    (src, tin), tout = next(iter(data.train))
    assert src.shape[0] == 8 and np.all(tin.numpy()[:, 0] == data.target_vocab.index("[START]"))
    np.testing.assert_array_equal(tin.numpy()[:, 1:], tout.numpy()[:, :-1])


def test_real_deu_eng_split():
    root = shared_data_dir()
    if root is None or not (root / "deu_eng" / "deu.txt").exists():
        pytest.skip(
            "deu_eng not found: set DEEPTRENDS_DATA_DIR to the folder holding deu_eng/deu.txt"
        )
    raw = load_tsv_translation(path=str(root / "deu_eng" / "deu.txt"))
    assert (
        raw.stats["header_skipped"]
        and raw.stats["pairs"] == 50001
        and raw.stats["skipped_lines"] == 0
    )
    train, test = set(raw.splits["train"][0]), set(raw.splits["test"][0])
    assert len(raw.splits["test"][0]) == 2000 and not train & test
    assert raw.splits["train"][1][0].isascii()  # English targets


def test_adding_problem_and_recall():
    x, y = generate_adding(50, 20, np.random.default_rng(0))
    assert x.shape == (50, 20, 2) and np.all(x[..., 1].sum(axis=1) == 2)
    np.testing.assert_allclose(y[:, 0], (x[..., 0] * x[..., 1]).sum(axis=1), rtol=1e-6)
    data = load_generated("recall", length=7, num_train=20, num_eval=10, symbols=4, batch_size=5)
    xb, yb = next(iter(data.train))
    assert data.kind == "classification" and xb.shape == (5, 7)
    np.testing.assert_array_equal(yb.numpy(), xb.numpy()[:, 0] - 1)
    with pytest.raises(DataError, match="data.problem"):
        load_generated("copying")


def test_stateful_chunks_continue_each_row():
    ids = np.arange(1, 101, dtype=np.int32)
    x, y = _chunks(ids, seq_len=5, rows=2)
    # batch k holds window k of both rows; row r's windows are consecutive
    assert x.shape == (18, 5)
    np.testing.assert_array_equal(x[0], [1, 2, 3, 4, 5])
    np.testing.assert_array_equal(x[2], [6, 7, 8, 9, 10])
    np.testing.assert_array_equal(x[1], [50, 51, 52, 53, 54])
    np.testing.assert_array_equal(y[0], x[0] + 1)


def test_text_lm_vocabulary_and_stream(tmp_path):
    path = _write(
        tmp_path, "".join(f"The cat sat on mat {i}.\tx\n" for i in range(200)), "text.tsv"
    )
    data = load_text_lm(path=str(path), column=0, batch_size=4, seq_len=6, stateful=True)
    vocab = data.info["vocabulary"]
    assert vocab[:3] == ["<pad>", "<unk>", "<eos>"] and "cat" in vocab
    xb, yb = next(iter(data.train))
    assert xb.shape == (4, 6)
    with pytest.raises(DataError, match="no column 3"):
        load_text_lm(path=str(path), column=3)


@pytest.mark.parametrize(
    "payload, problem",
    [
        ("\ufeff1\t2\nHallo.\tHello.\nDanke.\tThanks.\n".encode(), None),  # a UTF-8 BOM
        ("Hallo.\tHello.\n".encode("utf-16"), "UTF-16"),
        ("Hallo.\tHello.\nDanke.\tThanks.\n".encode("utf-16-le"), "UTF-16/32"),
    ],
)
def test_tsv_encodings(tmp_path, payload, problem):
    from data.translation import read_parallel_corpus

    path = tmp_path / "corpus.tsv"
    path.write_bytes(payload)
    if problem is None:
        corpus = read_parallel_corpus(path)
        assert corpus.header_skipped and corpus.sources == ["Hallo.", "Danke."]
        return
    with pytest.raises(DataError, match=problem):
        read_parallel_corpus(path, skip_bad_lines=True)
