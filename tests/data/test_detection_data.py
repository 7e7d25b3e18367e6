"""Detection data: VOC folders (both layouts, with and without split lists), COCO JSON,
TFDS voc (mocked), their errors naming the file, the resize/flip/batch pipeline (keyed:
a resumed stream equals the uninterrupted one), and the proposal cache."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from data import detection as D  # noqa: E402
from data.splits import DataError  # noqa: E402

VOC_OBJECT = """  <object><name>{name}</name><difficult>{difficult}</difficult>
    <bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox>
  </object>
"""


def write_voc(
    root: Path, images: dict, layout: str = "voc", splits: dict | None = None, size=(60, 80)
) -> Path:
    """A VOC folder: ``images`` maps an image id to [(name, x0, y0, x1, y1, difficult)]."""
    from PIL import Image

    ann, img = ("Annotations", "JPEGImages") if layout == "voc" else ("annotations", "images")
    (root / ann).mkdir(parents=True, exist_ok=True)
    (root / img).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    h, w = size
    for image_id, objects in images.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
            root / img / f"{image_id}.jpg"
        )
        body = "".join(
            VOC_OBJECT.format(name=n, x0=x0, y0=y0, x1=x1, y1=y1, difficult=int(d))
            for n, x0, y0, x1, y1, d in objects
        )
        (root / ann / f"{image_id}.xml").write_text(
            f"<annotation><filename>{image_id}.jpg</filename>"
            f"<size><width>{w}</width><height>{h}</height><depth>3</depth></size>\n{body}</annotation>"
        )
    for split, ids in (splits or {}).items():
        if layout == "voc":
            (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
            (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
        else:
            (root / "data").mkdir(exist_ok=True)
            rows = ["filename,width,height,class,xmin,ymin,xmax,ymax"]
            rows += [f"{i}.jpg,{w},{h},x,1,1,2,2" for i in ids]
            (root / "data" / f"{split}_labels.csv").write_text("\n".join(rows) + "\n")
    return root


IMAGES = {
    "a": [("cat", 11, 21, 40, 50, 0), ("dog", 1, 1, 80, 60, 1)],
    "b": [("dog", 5, 5, 5, 30, 0), ("dog", 10, 10, 30, 30, 0)],  # a degenerate box
    "c": [("cat", 2, 2, 20, 20, 0)],
    "d": [],
}


def test_voc_folder_with_split_lists(tmp_path):
    write_voc(tmp_path / "VOC", IMAGES, splits={"trainval": ["a", "b", "d"], "test": ["c"]})
    splits = D.load_voc_folder(path=str(tmp_path))  # found one level down
    assert (splits.num_train, splits.num_eval) == (3, 1)
    assert splits.class_names == ["cat", "dog"]
    assert splits.dropped_boxes == 1
    a = splits.train_records[0]
    np.testing.assert_allclose(a.boxes[0], [20 / 60, 10 / 80, 49 / 60, 39 / 80], atol=1e-6)
    assert list(a.labels) == [0, 1] and list(a.difficult) == [False, True]
    assert len(splits.train_records[2].labels) == 0  # an image without objects is kept
    element = next(iter(splits.train))
    assert element["image"].shape == (60, 80, 3) and element["boxes"].shape == (2, 4)


def test_raccoon_layout_and_seeded_split(tmp_path):
    write_voc(
        tmp_path / "r", IMAGES, layout="raccoon", splits={"train": ["a", "b"], "test": ["c", "d"]}
    )
    splits = D.load_voc_folder(path=str(tmp_path / "r"))
    assert (splits.num_train, splits.num_eval) == (2, 2)
    write_voc(tmp_path / "plain", IMAGES)  # no split lists: a seeded split
    s1 = D.load_voc_folder(path=str(tmp_path / "plain"), test_fraction=0.25)
    s2 = D.load_voc_folder(path=str(tmp_path / "plain"), test_fraction=0.25)
    assert (s1.num_train, s1.num_eval) == (3, 1)
    assert [r.image_id for r in s1.eval_records] == [r.image_id for r in s2.eval_records]
    assert s1.fingerprint == s2.fingerprint


def test_errors_name_the_file(tmp_path):
    root = write_voc(tmp_path / "v", IMAGES)
    (root / "Annotations" / "c.xml").write_text("<annotation><object>\n<name>x</name>")
    with pytest.raises(DataError, match=r"c\.xml: broken XML at line"):
        D.load_voc_folder(path=str(root))

    root = write_voc(tmp_path / "w", IMAGES)
    os.remove(root / "JPEGImages" / "c.jpg")
    with pytest.raises(DataError, match=r"c\.xml: its image 'c\.jpg' is missing"):
        D.load_voc_folder(path=str(root))

    root = write_voc(tmp_path / "x", {**IMAGES, "c": [("cat", 2, 2, 200, 20, 0)]})
    with pytest.raises(DataError, match=r"c\.xml: object 1 \(cat\) box .* outside its 80x60 image"):
        D.load_voc_folder(path=str(root))

    root = write_voc(tmp_path / "y", IMAGES)
    with pytest.raises(DataError, match=r"a\.xml: unknown class 'dog'"):
        D.load_voc_folder(path=str(root), class_names=["cat"])

    with pytest.raises(DataError, match="no VOC folder here"):
        D.load_voc_folder(path=str(tmp_path / "x" / "JPEGImages"))
    with pytest.raises(DataError, match="no split list 'nope'"):
        D.load_voc_folder(path=str(root), train_split="nope")


def test_coco_json(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        (tmp_path / split).mkdir()
        Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(tmp_path / split / "1.jpg")
    (tmp_path / "annotations").mkdir()
    doc = {
        "images": [{"id": 7, "file_name": "1.jpg", "width": 50, "height": 40}],
        "categories": [{"id": 3, "name": "b"}, {"id": 1, "name": "a"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 3, "bbox": [5, 10, 20, 10], "iscrowd": 0},
            {"id": 2, "image_id": 7, "category_id": 1, "bbox": [0, 0, 50, 40], "iscrowd": 1},
            {"id": 3, "image_id": 7, "category_id": 1, "bbox": [1, 1, 0, 5], "iscrowd": 0},
        ],
    }
    for split in ("train", "val"):
        (tmp_path / "annotations" / f"instances_{split}.json").write_text(json.dumps(doc))
    splits = D.load_coco_json(path=str(tmp_path))
    assert splits.class_names == ["a", "b"] and splits.dropped_boxes == 2
    r = splits.train_records[0]
    np.testing.assert_allclose(r.boxes[0], [10 / 40, 5 / 50, 20 / 40, 25 / 50])
    assert list(r.labels) == [1, 0] and list(r.difficult) == [False, True]
    doc["annotations"][0]["bbox"] = [40, 10, 20, 10]
    (tmp_path / "annotations" / "instances_train.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"instances_train\.json: annotation 1 bbox .* outside"):
        D.load_coco_json(path=str(tmp_path))


def test_tfds_voc_mocked():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=3):
        splits = D.load_tfds_detection(tfds_name="voc/2007", train_split="train", eval_split="test")
        element = next(iter(splits.train))
    assert len(splits.class_names) == 20
    assert element["image"].shape[-1] == 3 and element["boxes"].shape[-1] == 4
    assert element["difficult"].dtype == tf.bool
    with pytest.raises(DataError, match="not a detection set"):
        D.load_tfds_detection(tfds_name="mnist")


def test_pipeline_resizes_flips_and_resumes_exactly(tmp_path):
    root = write_voc(
        tmp_path / "v",
        {f"i{k}": [("cat", 11, 21, 40, 50, 0)] for k in range(6)},
        splits={"train": [f"i{k}" for k in range(4)], "test": ["i4", "i5"]},
    )
    splits = D.load_voc_folder(path=str(root))
    spec = D.DetectionInputSpec(batch_size=2, min_size=30, max_size=60, seed=3)
    train, evals, info = D.build_detection_datasets(splits, spec)
    assert info.canvas == (32, 48)  # 60x80 -> 30x40, padded to a multiple of 16
    images, targets = next(iter(evals))
    assert images.shape == (2, 32, 48, 3)
    np.testing.assert_allclose(targets["boxes"][0, 0], [10.0, 5.0, 24.5, 19.5], atol=1e-4)
    assert list(targets["image_size"][0].numpy()) == [30, 40]
    assert list(targets["original_size"][0].numpy()) == [60, 80]
    batches = [b for b in train.take(8)]
    boxes = np.concatenate([b[1]["boxes"][:, 0].numpy() for b in batches])
    flipped = np.isclose(boxes[:, 1], 40 - 19.5, atol=1e-4)
    assert flipped.any() and (~flipped).any()  # some flipped, some not
    # a flipped image is the mirror of its own 40 columns, not of the padded canvas
    b = batches[0]
    assert float(tf.reduce_max(tf.abs(b[0][:, :, 40:]))) == 0.0
    # resumed at epoch 1 step 1: the same batches as the uninterrupted stream
    resumed, _, _ = D.build_detection_datasets(
        splits,
        D.DetectionInputSpec(
            batch_size=2, min_size=30, max_size=60, seed=3, start_epoch=1, start_step=1
        ),
    )
    again = [b for b in resumed.take(3)]
    for x, y in zip(again, batches[3:6], strict=True):
        np.testing.assert_array_equal(x[0].numpy(), y[0].numpy())
        np.testing.assert_array_equal(x[1]["boxes"].numpy(), y[1]["boxes"].numpy())


def test_flip_batch_moves_boxes_with_the_image():
    image = np.zeros((1, 4, 8, 3), np.float32)
    image[0, :, 1] = 1.0  # column 1 of a 6-pixel-wide image
    targets = {
        "boxes": tf.constant([[[0.0, 1.0, 4.0, 2.0]]]),
        "labels": tf.constant([[0]]),
        "image_size": tf.constant([[4, 6]]),
    }
    for seed in range(20):  # find a key that flips
        out, t = D.flip_batch(tf.constant(image), targets, tf.constant([seed, 0], tf.int64))
        if not np.array_equal(out.numpy(), image):
            break
    assert out.numpy()[0, 0, :, 0].tolist() == [0, 0, 0, 0, 1, 0, 0, 0]  # 6 - 1 - 1 = 4
    np.testing.assert_allclose(t["boxes"][0, 0], [0.0, 4.0, 4.0, 5.0])


def test_proposal_cache(tmp_path):
    pytest.importorskip("cv2")
    from data.proposals import ProposalCache, edge_maps

    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    image[10:30, 10:40] = 255
    cache = ProposalCache(tmp_path)
    boxes, seconds = cache.get(image, "edge_boxes", 50)
    assert cache.computed == 1 and seconds > 0
    assert boxes.ndim == 2 and boxes.shape[1] == 4 and (boxes >= 0).all() and (boxes <= 1).all()
    again, seconds_again = ProposalCache(tmp_path).get(image, "edge_boxes", 50)  # a second run
    np.testing.assert_array_equal(again, boxes)
    assert seconds_again == seconds  # the recorded time, nothing computed
    cache.get(image, "edge_boxes", 50)
    assert (cache.computed, cache.hits) == (1, 1)
    cache.get(image[::-1].copy(), "edge_boxes", 50)  # other content: computed
    assert cache.computed == 2
    ss, _ = cache.get(image, "selective_search_fast", 30)
    assert ss.shape[1] == 4 and len(ss) <= 30
    edges, orientation = edge_maps(image)
    assert edges.shape == orientation.shape == (48, 64)
    with pytest.raises(DataError, match="unknown method"):
        cache.get(image, "magic", 5)


REAL = os.environ.get("DEEPTRENDS_DATA_DIR")


@pytest.mark.skipif(
    not REAL or not Path(REAL, "bccd_voc").is_dir(), reason="needs $DEEPTRENDS_DATA_DIR/bccd_voc"
)
def test_real_bccd_and_raccoon():
    bccd = D.load_detection("bccd", None, {})
    assert (bccd.num_train, bccd.num_eval) == (292, 72)
    assert bccd.class_names == ["Platelets", "RBC", "WBC"]
    assert bccd.dropped_boxes == 2  # the two 1-pixel boxes
    raccoon = D.load_detection("raccoon", None, {})
    assert (raccoon.num_train, raccoon.num_eval) == (160, 40)
    assert sum(len(r.labels) for r in raccoon.train_records + raccoon.eval_records) == 217
