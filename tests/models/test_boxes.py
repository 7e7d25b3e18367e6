"""Box operations of the detectors (models/boxes.py): coding round trip, IoU against
hand values, anchor counts and placement, greedy NMS against TensorFlow's, RoI align
against ``tf.image.crop_and_resize`` (the trainer's fast path), and the detector
networks' output shapes."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")

from models import boxes as B  # noqa: E402


def _random_boxes(rng, n, extent=100.0, size=(5.0, 40.0)):
    corner = rng.uniform(0, extent, (n, 2))
    sizes = rng.uniform(*size, (n, 2))
    return np.concatenate([corner, corner + sizes], axis=1).astype("float32")


def test_encode_decode_round_trip():
    rng = np.random.default_rng(0)
    boxes, anchors = _random_boxes(rng, 64), _random_boxes(rng, 64)
    for weights in (B.RPN_WEIGHTS, B.HEAD_WEIGHTS):
        deltas = B.encode_boxes(boxes, anchors, weights)
        back = np.asarray(B.decode_boxes(deltas, anchors, weights))
        np.testing.assert_allclose(back, boxes, atol=1e-3)
    # an anchor encodes itself as zeros
    np.testing.assert_allclose(np.asarray(B.encode_boxes(anchors, anchors)), 0.0, atol=1e-6)


def test_decode_clips_huge_size_deltas():
    anchors = np.array([[0.0, 0.0, 16.0, 16.0]], "float32")
    out = np.asarray(B.decode_boxes(np.array([[0.0, 0.0, 1e4, 1e4]], "float32"), anchors))
    assert np.isfinite(out).all()
    assert out[0, 2] - out[0, 0] == pytest.approx(16.0 * 1000.0 / 16.0, rel=1e-4)


def test_iou_against_hand_values():
    a = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], [5, 5, 5, 5]], "float32")
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 10, 10]], "float32")
    iou = np.asarray(B.pairwise_iou(a, b))
    assert iou.shape == (4, 4)
    assert iou[0, 0] == pytest.approx(1.0)
    assert iou[1, 1] == pytest.approx(50.0 / 150.0)  # half overlap: 50 / (100 + 100 - 50)
    assert iou[2, 2] == 0.0  # disjoint
    assert iou[3, 3] == 0.0  # an empty box
    assert iou[0, 1] == pytest.approx(1.0 / 3.0)
    # batched: [B, N, 4] x [B, M, 4] -> [B, N, M]
    assert B.pairwise_iou(a[None].repeat(2, 0), b[None, :3].repeat(2, 0)).shape == (2, 4, 3)


def test_anchor_counts_shapes_and_centres():
    sizes, ratios = (32, 64, 128), (0.5, 1.0, 2.0)
    anchors = np.asarray(B.generate_anchors(3, 4, 16, sizes, ratios))
    assert anchors.shape == (3 * 4 * 9, 4)
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    np.testing.assert_allclose(centres[:9], [[8.0, 8.0]] * 9, atol=1e-4)  # position (0, 0)
    np.testing.assert_allclose(centres[9], [8.0, 24.0], atol=1e-4)  # then along the row
    np.testing.assert_allclose(centres[4 * 9], [24.0, 8.0], atol=1e-4)  # the next row
    heights = anchors[:9, 2] - anchors[:9, 0]
    widths = anchors[:9, 3] - anchors[:9, 1]
    np.testing.assert_allclose(heights * widths, np.repeat(np.square(sizes), 3), rtol=1e-4)
    np.testing.assert_allclose((heights / widths)[:3], ratios, rtol=1e-4)


@pytest.mark.parametrize("seed, threshold", [(0, 0.5), (1, 0.3), (2, 0.7)])
def test_nms_matches_tensorflow(seed, threshold):
    rng = np.random.default_rng(seed)
    boxes = _random_boxes(rng, 80)
    scores = rng.uniform(size=80).astype("float32")
    picked, count = B.non_max_suppression(boxes, scores, 30, threshold)
    want = tf.image.non_max_suppression(boxes, scores, 30, threshold).numpy()
    picked = np.asarray(picked)
    assert int(count) == len(want)
    np.testing.assert_array_equal(picked[: int(count)], want)
    assert (picked[int(count) :] == -1).all()


def test_nms_score_threshold():
    boxes = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], "float32")
    picked, count = B.non_max_suppression(boxes, np.array([0.9, 0.1], "float32"), 5, 0.5, 0.5)
    assert int(count) == 1 and list(np.asarray(picked)) == [0, -1, -1, -1, -1]


def test_roi_align_matches_crop_and_resize_path():
    from pipelines.trainers.faster_rcnn import crop_and_resize_align

    rng = np.random.default_rng(3)
    features = rng.normal(size=(2, 10, 12, 5)).astype("float32")
    rois = np.concatenate(
        [_random_boxes(rng, 20, extent=140.0, size=(1.0, 60.0)) for _ in range(2)]
    ).reshape(2, 20, 4)
    rois = np.minimum(rois, [160, 192, 160, 192]).astype("float32")
    rois[0, 0] = [0, 0, 160, 192]  # the whole map
    rois[1, 0] = [150, 180, 160, 192]  # a corner
    ours = np.asarray(B.roi_align(features, rois, 16, 7, 2))
    fast = crop_and_resize_align(tf.constant(features), tf.constant(rois), 16, 7, 2).numpy()
    assert ours.shape == (2, 20, 7, 7, 5)
    np.testing.assert_allclose(ours, fast, atol=1e-4)
    # a uniform map pools to itself
    const = np.full((1, 6, 6, 2), 3.0, "float32")
    np.testing.assert_allclose(
        np.asarray(B.roi_align(const, rois[:1, :3], 16, 7, 2)), 3.0, atol=1e-5
    )


def test_smooth_l1():
    x = np.array([-2.0, -0.5, 0.0, 0.05, 3.0], "float32")
    np.testing.assert_allclose(
        np.asarray(B.smooth_l1(x, 1.0)), [1.5, 0.125, 0.0, 0.00125, 2.5], atol=1e-6
    )


def test_faster_rcnn_outputs():
    import models

    net = models.create_model(
        "faster_rcnn",
        num_classes=3,
        anchor_sizes=[16, 32, 64],
        rpn_channels=16,
        head_units=32,
        input_shape=(None, None, 3),
    )
    out = net(
        [
            np.zeros((2, 64, 96, 3), "float32"),
            np.tile([[[0, 0, 32, 32]]], (2, 5, 1)).astype("float32"),
        ]
    )
    assert out["rpn_scores"].shape == (2, 4 * 6 * 9, 2)
    assert out["anchors"].shape == (2, 4 * 6 * 9, 4)
    assert out["class_logits"].shape == (2, 5, 4)
    assert out["box_deltas"].shape == (2, 5, 3, 4)
    with pytest.raises(ValueError, match="anchor_sizes"):
        models.create_model("faster_rcnn", anchor_sizes=[])


def test_rcnn_outputs():
    import models

    net = models.create_model("rcnn", num_classes=2, input_shape=(32, 32, 3), head_units=16)
    out = net(np.zeros((3, 32, 32, 3), "float32"))
    assert out["class_logits"].shape == (3, 3)
    assert out["box_deltas"].shape == (3, 2, 4)
