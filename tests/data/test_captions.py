"""Caption loaders on small generated folders (Flickr8k CSV and token layouts, split lists,
COCO JSON), their errors (file and line), the vocabulary, and the tf.data streams: one
example per training caption, a resumed stream that continues where it stopped; and the
shared real folder (``flickr8k_1k``) when ``DEEPTRENDS_DATA_DIR`` has it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from data.captions import (  # noqa: E402
    build_caption_datasets,
    caption_vocabulary,
    load_coco_captions,
    load_flickr8k,
    load_tfds_coco_captions,
    read_captions_csv,
)
from data.splits import DataError  # noqa: E402

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
SHAPES = ("square", "stripe")


def _image(colour, shape, size=(48, 64), seed=0):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 40, (*size, 3)).astype(np.uint8)
    h, w = size
    if shape == "square":
        image[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = COLOURS[colour]
    else:
        image[:, w // 3 : 2 * w // 3] = COLOURS[colour]
    return image


def make_flickr_folder(root: Path, count: int = 24, lists: bool = True, token: bool = False):
    """A Flickr8k-layout folder of coloured shapes with 3 captions each."""
    (root / "images").mkdir(parents=True)
    rows, names = [], []
    for i in range(count):
        colour = list(COLOURS)[i % 3]
        shape = SHAPES[(i // 3) % 2]
        name = f"{1000 + i}_img.{'png' if i % 2 else 'jpg'}"
        encoded = (tf.io.encode_png if i % 2 else tf.io.encode_jpeg)(_image(colour, shape, seed=i))
        (root / "images" / name).write_bytes(encoded.numpy())
        names.append(name)
        rows += [
            (name, f"A {colour} {shape} on a dark background ."),
            (name, f"a {shape} , {colour}"),
            (name, f"The {colour} {shape} ."),
        ]
    if token:
        text = "".join(f"{n}#{k % 3}\t{c}\n" for k, (n, c) in enumerate(rows))
        (root / "Flickr8k.token.txt").write_text(text)
    else:
        lines = ["image,caption"] + [f'{n},"{c}"' if "," in c else f"{n},{c}" for n, c in rows]
        (root / "captions.txt").write_text("\n".join(lines) + "\n")
    if lists:
        (root / "splits").mkdir()
        split = {
            "train": names[: count - 8],
            "dev": names[count - 8 : count - 4],
            "test": names[count - 4 :],
        }
        for key, items in split.items():
            extra = ["999_not_here.jpg"] if key == "train" else []
            (root / "splits" / f"Flickr_8k.{key}Images.txt").write_text(
                "\n".join(items + extra) + "\n"
            )
    return root


def test_flickr_csv_with_split_lists(tmp_path):
    folder = make_flickr_folder(tmp_path / "f")
    corpus = load_flickr8k(path=str(folder), load_size=40)
    assert len(corpus.names) == 24 and corpus.images.shape == (24, 40, 40, 3)
    assert [len(corpus.splits[s]) for s in ("train", "validation", "test")] == [16, 4, 4]
    assert corpus.stats["split_lists"] and corpus.stats["listed_images_missing"] == 1
    assert all(len(c) == 3 for c in corpus.captions)
    assert corpus.captions[1][1] == "a stripe , green" or "," in corpus.captions[1][1]
    refs = corpus.references("test")
    assert len(refs) == 4 and all(len(r) == 3 for r in refs)
    again = load_flickr8k(path=str(folder), load_size=40)
    assert again.fingerprint == corpus.fingerprint


def test_flickr_token_file_and_seeded_split(tmp_path):
    folder = make_flickr_folder(tmp_path / "f", lists=False, token=True)
    corpus = load_flickr8k(
        path=str(folder), load_size=32, validation_fraction=0.25, test_fraction=0.25
    )
    sizes = [len(corpus.splits[s]) for s in ("train", "validation", "test")]
    assert sizes == [12, 6, 6] and not corpus.stats["split_lists"]
    all_ids = np.concatenate([corpus.splits[s] for s in ("train", "validation", "test")])
    assert sorted(all_ids.tolist()) == list(range(24))
    other = load_flickr8k(
        path=str(folder), load_size=32, validation_fraction=0.25, test_fraction=0.25, split_seed=1
    )
    assert not np.array_equal(other.splits["test"], corpus.splits["test"])


def test_errors_name_the_file_and_line(tmp_path):
    folder = make_flickr_folder(tmp_path / "f", lists=False)
    captions = folder / "captions.txt"
    lines = captions.read_text().splitlines()
    captions.write_text("\n".join([*lines[:5], "missing.jpg,A cat .", *lines[5:]]) + "\n")
    with pytest.raises(DataError, match=r"captions\.txt:6: a caption for image 'missing\.jpg'"):
        load_flickr8k(path=str(folder))
    captions.write_text("\n".join([*lines[:3], "1000_img.jpg,a,b", *lines[3:]]) + "\n")
    with pytest.raises(DataError, match=r"captions\.txt:4: malformed row"):
        load_flickr8k(path=str(folder))
    captions.write_text("\n".join([*lines[:2], "1000_img.jpg,", *lines[2:]]) + "\n")
    with pytest.raises(DataError, match=r"captions\.txt:3: an empty caption"):
        load_flickr8k(path=str(folder))
    captions.write_text("picture,text\n" + "\n".join(lines[1:]))
    with pytest.raises(DataError, match=r"captions\.txt:1: expected the header 'image,caption'"):
        read_captions_csv(captions)
    token = tmp_path / "g"
    make_flickr_folder(token, lists=False, token=True)
    text = (token / "Flickr8k.token.txt").read_text().splitlines()
    (token / "Flickr8k.token.txt").write_text("\n".join([text[0], "no tab here", *text[1:]]))
    with pytest.raises(DataError, match=r"Flickr8k\.token\.txt:2: malformed row"):
        load_flickr8k(path=str(token))
    with pytest.raises(DataError, match="is not a folder"):
        load_flickr8k(path=str(tmp_path / "nowhere"))
    (folder / "images" / "1000_img.jpg").write_bytes(b"not an image at all, just some bytes")
    captions.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"1000_img\.jpg: not a decodable image"):
        load_flickr8k(path=str(folder))


def test_coco_json(tmp_path):
    folder = make_flickr_folder(tmp_path / "f", lists=False)
    names = sorted(p.name for p in (folder / "images").iterdir())
    doc = {
        "images": [
            {"id": k, "file_name": n, "split": ["train", "restval", "val", "test"][k % 4]}
            for k, n in enumerate(names)
        ],
        "annotations": [
            {"image_id": k, "id": 10 * k + j, "caption": f"caption {j} of image {k}"}
            for k in range(len(names))
            for j in range(2)
        ],
    }
    path = folder / "captions_train.json"
    path.write_text(json.dumps(doc))
    corpus = load_coco_captions(path=str(path), images_dir=str(folder / "images"), load_size=32)
    assert [len(corpus.splits[s]) for s in ("train", "validation", "test")] == [12, 6, 6]
    assert corpus.captions[0] == ["caption 0 of image 0", "caption 1 of image 0"]
    doc["annotations"].append({"image_id": 99, "caption": "lost"})
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"annotations\[48\]: image_id 99 is not in 'images'"):
        load_coco_captions(path=str(path), images_dir=str(folder / "images"))
    path.write_text("{not json")
    with pytest.raises(DataError, match=r"captions_train\.json:1: not valid JSON"):
        load_coco_captions(path=str(path))


def test_tfds_coco_captions(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with pytest.raises(DataError, match="not prepared"):
        load_tfds_coco_captions(data_dir=str(tmp_path), tfds_name="coco_captions")
    with pytest.raises(DataError, match="is not a TFDS dataset"):
        load_tfds_coco_captions(data_dir=str(tmp_path), tfds_name="no_such_set_anywhere")
    # the real builder's features and splits, with generated examples
    with tfds.testing.mock_data(num_examples=3, policy=tfds.testing.MockPolicy.USE_CODE):
        corpus = load_tfds_coco_captions(data_dir=str(tmp_path), load_size=32)
    assert [len(corpus.splits[s]) for s in ("train", "validation", "test")] == [3, 3, 3]
    assert corpus.images.shape == (9, 32, 32, 3) and corpus.encoded is None
    assert all(corpus.captions) and corpus.source == "tfds:coco_captions"


def test_vocabulary_min_count_cap_and_long_captions(tmp_path):
    corpus = load_flickr8k(path=str(make_flickr_folder(tmp_path / "f")), load_size=32)
    vocab, tokens, dropped = caption_vocabulary(corpus, 40, None, 1)
    assert vocab[:4] == ["", "[UNK]", "[START]", "[END]"]
    assert {"red", "green", "blue", "square", "stripe", ",", "."} <= set(vocab)
    capped, _, _ = caption_vocabulary(corpus, 40, 8, 1)
    assert len(capped) == 8 and capped[4] in ("a", ".")
    # "dark" and "background" appear in one caption of each of the 16 training images
    rare, _, _ = caption_vocabulary(corpus, 40, None, 17)
    assert "dark" not in rare and "a" in rare
    short, _, dropped = caption_vocabulary(corpus, 4, None, 1)
    assert dropped == 16  # "A <colour> <shape> on a dark background ." is 8 words
    with pytest.raises(DataError, match="no training caption"):
        caption_vocabulary(corpus, 1, None, 1)


def test_streams_one_example_per_caption_and_resume(tmp_path):
    corpus = load_flickr8k(path=str(make_flickr_folder(tmp_path / "f")), load_size=40)
    data = build_caption_datasets(
        corpus, 8, max_length=40, target_vocab_size=None, min_count=1, image_size=32, flip=True
    )
    assert data.num_train_captions == 48 and data.steps_per_epoch == 6
    (images, tokens_in), tokens_out = next(iter(data.train))
    assert images.shape == (8, 32, 32, 3) and images.dtype == tf.float32
    start = data.vocabulary.index("[START]")
    assert np.all(tokens_in.numpy()[:, 0] == start)
    np.testing.assert_array_equal(tokens_in.numpy()[:, 1:], tokens_out.numpy()[:, :-1])
    val = list(data.validation)
    assert sum(int(t.shape[0]) for (_, t), _ in val) == 12  # 4 images x 3 captions
    fresh = build_caption_datasets(
        corpus, 8, max_length=40, target_vocab_size=None, min_count=1, image_size=32, flip=True
    )
    resumed = build_caption_datasets(
        corpus,
        8,
        max_length=40,
        target_vocab_size=None,
        min_count=1,
        image_size=32,
        flip=True,
        start_step=5,
    )
    want = list(fresh.train.take(7))[5:]  # (a new iterator of a dataset reshuffles)
    got = list(resumed.train.take(2))
    for (w_x, w_t), w_y in want:
        (g_x, g_t), g_y = got.pop(0)
        np.testing.assert_array_equal(w_x.numpy(), g_x.numpy())  # same crops and flips
        np.testing.assert_array_equal(w_t.numpy(), g_t.numpy())
        np.testing.assert_array_equal(w_y.numpy(), g_y.numpy())
    features = np.random.default_rng(0).normal(size=(2, 24, 4, 6)).astype(np.float16)
    cached = build_caption_datasets(
        corpus,
        8,
        max_length=40,
        target_vocab_size=None,
        min_count=1,
        image_size=32,
        features=features,
    )
    (annotations, _), _ = next(iter(cached.train))
    assert annotations.shape == (8, 4, 6)
    (val_annotations, _), _ = next(iter(cached.validation))
    valid = corpus.splits["validation"]
    np.testing.assert_allclose(val_annotations.numpy()[0], features[0, valid[0]].astype(np.float32))


def test_shared_flickr8k_1k():
    from tests.conftest import shared_data_dir

    root = shared_data_dir()
    if root is None or not (root / "flickr8k_1k").is_dir():
        pytest.skip("flickr8k_1k not found: set DEEPTRENDS_DATA_DIR")
    corpus = load_flickr8k(path=str(root / "flickr8k_1k"), load_size=64)
    assert [len(corpus.splits[s]) for s in ("train", "validation", "test")] == [753, 113, 125]
    assert corpus.stats["images_in_no_list"] == 9
    assert all(len(c) == 5 for c in corpus.captions)
