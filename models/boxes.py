"""Box operations of the detectors in ``keras.ops`` (any backend): IoU, box coding,
anchors, clipping, RoI align, greedy NMS and smooth-L1.

Boxes are ``(ymin, xmin, ymax, xmax)`` throughout (the TF Object Detection API's order),
in pixels of the image the network sees unless a function says otherwise.

Box coding follows Girshick et al. (R-CNN, 2014, appendix C) and Ren et al. (Faster R-CNN,
2015, eq. 2): ``t_y = (y - y_a) / h_a``, ``t_x = (x - x_a) / w_a``, ``t_h = log(h / h_a)``,
``t_w = log(w / w_a)`` on box centres and sizes, each multiplied by ``weights`` (Detectron's
``(10, 10, 5, 5)`` for the RoI head, ``(1, 1, 1, 1)`` for the RPN). Decoding clips the size
deltas at ``log(1000 / 16)`` before the exponential, as Detectron does, so that an untrained
network cannot produce infinite boxes.

TensorFlow-only versions of two of these (``tf.image.crop_and_resize``,
``tf.image.combined_non_max_suppression``) run in the exported serving graph; the ones here
are the reference the tests compare them with and what runs on JAX.
"""

from __future__ import annotations

import math

import keras
from keras import ops

BBOX_XFORM_CLIP = math.log(1000.0 / 16.0)
RPN_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
HEAD_WEIGHTS = (10.0, 10.0, 5.0, 5.0)


# ----------------------------------------------------------------------- geometry


def box_area(boxes):
    """Areas of ``boxes`` [..., 4] (0 for empty boxes)."""
    h = ops.maximum(boxes[..., 2] - boxes[..., 0], 0.0)
    w = ops.maximum(boxes[..., 3] - boxes[..., 1], 0.0)
    return h * w


def pairwise_iou(boxes1, boxes2):
    """Intersection over union of every pair: ``boxes1`` [..., N, 4] and ``boxes2``
    [..., M, 4] -> [..., N, M]. Empty boxes have IoU 0 with everything."""
    b1 = ops.expand_dims(boxes1, -2)  # [..., N, 1, 4]
    b2 = ops.expand_dims(boxes2, -3)  # [..., 1, M, 4]
    top = ops.maximum(b1[..., 0], b2[..., 0])
    left = ops.maximum(b1[..., 1], b2[..., 1])
    bottom = ops.minimum(b1[..., 2], b2[..., 2])
    right = ops.minimum(b1[..., 3], b2[..., 3])
    inter = ops.maximum(bottom - top, 0.0) * ops.maximum(right - left, 0.0)
    union = ops.expand_dims(box_area(boxes1), -1) + ops.expand_dims(box_area(boxes2), -2) - inter
    return ops.where(union > 0.0, inter / ops.maximum(union, 1e-12), 0.0)


def clip_boxes(boxes, height, width):
    """``boxes`` [..., 4] clipped to ``[0, height] x [0, width]`` (scalars, or tensors that
    broadcast against ``boxes[..., 0]``)."""
    height = ops.cast(height, boxes.dtype)
    width = ops.cast(width, boxes.dtype)

    def clip(values, upper):
        return ops.minimum(ops.maximum(values, 0.0), upper)

    return ops.stack(
        [
            clip(boxes[..., 0], height),
            clip(boxes[..., 1], width),
            clip(boxes[..., 2], height),
            clip(boxes[..., 3], width),
        ],
        axis=-1,
    )


def _centres(boxes):
    h = boxes[..., 2] - boxes[..., 0]
    w = boxes[..., 3] - boxes[..., 1]
    return boxes[..., 0] + 0.5 * h, boxes[..., 1] + 0.5 * w, h, w


# ----------------------------------------------------------------------- coding


def encode_boxes(boxes, anchors, weights=RPN_WEIGHTS):
    """The regression targets ``(t_y, t_x, t_h, t_w) * weights`` of ``boxes`` relative to
    ``anchors`` (both [..., 4], broadcast). Sizes are floored at 1e-6 pixels."""
    cy, cx, h, w = _centres(boxes)
    acy, acx, ah, aw = _centres(anchors)
    ah, aw = ops.maximum(ah, 1e-6), ops.maximum(aw, 1e-6)
    h, w = ops.maximum(h, 1e-6), ops.maximum(w, 1e-6)
    wy, wx, wh, ww = weights
    return ops.stack(
        [
            wy * (cy - acy) / ah,
            wx * (cx - acx) / aw,
            wh * ops.log(h / ah),
            ww * ops.log(w / aw),
        ],
        axis=-1,
    )


def decode_boxes(deltas, anchors, weights=RPN_WEIGHTS, clip: float = BBOX_XFORM_CLIP):
    """The boxes that ``deltas`` [..., 4] encode relative to ``anchors`` (the inverse of
    ``encode_boxes``); the size deltas are clipped at ``clip`` before ``exp``."""
    acy, acx, ah, aw = _centres(anchors)
    wy, wx, wh, ww = weights
    dy = deltas[..., 0] / wy
    dx = deltas[..., 1] / wx
    dh = ops.minimum(deltas[..., 2] / wh, clip)
    dw = ops.minimum(deltas[..., 3] / ww, clip)
    cy = dy * ah + acy
    cx = dx * aw + acx
    h = ops.exp(dh) * ah
    w = ops.exp(dw) * aw
    return ops.stack([cy - 0.5 * h, cx - 0.5 * w, cy + 0.5 * h, cx + 0.5 * w], axis=-1)


# ----------------------------------------------------------------------- anchors


def anchor_shapes(sizes, ratios):
    """(heights, widths) of the ``len(sizes) * len(ratios)`` anchors of one position,
    size-major: each size at every ratio (``ratio`` = height / width, area ``size**2``)."""
    heights, widths = [], []
    for size in sizes:
        for ratio in ratios:
            heights.append(size * math.sqrt(ratio))
            widths.append(size / math.sqrt(ratio))
    return heights, widths


def generate_anchors(feature_height, feature_width, stride: int, sizes, ratios, dtype="float32"):
    """The anchors of a ``feature_height x feature_width`` map of ``stride``: [H * W * A, 4]
    in input pixels, position-major (row, column, then the ``A = len(sizes) * len(ratios)``
    anchors of ``anchor_shapes``), centred on ``(i + 0.5) * stride``: the order in which
    an RPN's ``[B, H, W, A]`` outputs are flattened."""
    heights, widths = anchor_shapes(sizes, ratios)
    half = ops.convert_to_tensor(
        [[-h / 2, -w / 2, h / 2, w / 2] for h, w in zip(heights, widths, strict=True)], dtype
    )
    ys = (ops.cast(ops.arange(feature_height), dtype) + 0.5) * stride
    xs = (ops.cast(ops.arange(feature_width), dtype) + 0.5) * stride
    cy = ops.repeat(ys, ops.shape(xs)[0])  # row-major positions
    cx = ops.tile(xs, [ops.shape(ys)[0]])
    centres = ops.stack([cy, cx, cy, cx], axis=-1)  # [H*W, 4]
    anchors = ops.expand_dims(centres, 1) + ops.expand_dims(half, 0)  # [H*W, A, 4]
    return ops.reshape(anchors, (-1, 4))


# ----------------------------------------------------------------------- RoI align


def roi_align(features, boxes, stride: int, output_size: int = 7, sampling_ratio: int = 2):
    """RoI align (He et al., Mask R-CNN 2017): ``features`` [B, H, W, C] of ``stride``,
    ``boxes`` [B, R, 4] in input pixels -> [B, R, output_size, output_size, C].

    Each output bin averages ``sampling_ratio**2`` bilinear samples at regularly spaced
    points (no quantisation of the box or the bins; half-pixel aligned, Detectron2's
    ``aligned=True``). Samples outside the map take the nearest border value."""
    dtype = features.dtype
    shape = ops.shape(features)
    batch, height, width, channels = shape[0], shape[1], shape[2], shape[3]
    num_rois = ops.shape(boxes)[1]
    points = output_size * sampling_ratio
    boxes = ops.cast(boxes, "float32") / float(stride) - 0.5
    # sample offsets in [0, 1]: the centres of points x points cells
    grid = (ops.cast(ops.arange(points), "float32") + 0.5) / float(points)
    y = boxes[..., 0:1] + (boxes[..., 2:3] - boxes[..., 0:1]) * grid  # [B, R, P]
    x = boxes[..., 1:2] + (boxes[..., 3:4] - boxes[..., 1:2]) * grid
    hmax = ops.cast(height - 1, "float32")
    wmax = ops.cast(width - 1, "float32")
    y = ops.clip(y, 0.0, hmax)
    x = ops.clip(x, 0.0, wmax)
    y0 = ops.floor(y)
    x0 = ops.floor(x)
    ly = y - y0
    lx = x - x0
    y1 = ops.minimum(y0 + 1.0, hmax)
    x1 = ops.minimum(x0 + 1.0, wmax)
    y0, y1 = ops.cast(y0, "int32"), ops.cast(y1, "int32")
    x0, x1 = ops.cast(x0, "int32"), ops.cast(x1, "int32")
    base = ops.reshape(ops.arange(batch, dtype="int32") * height * width, (-1, 1, 1, 1))
    flat = ops.reshape(features, (-1, channels))

    def gather(yi, xi):  # [B, R, P] x [B, R, P] -> [B, R, P, P, C]
        index = base + ops.expand_dims(yi * width, -1) + ops.expand_dims(xi, -2)
        values = ops.take(flat, ops.reshape(index, (-1,)), axis=0)
        return ops.reshape(values, (batch, num_rois, points, points, channels))

    wy = ops.cast(ops.expand_dims(ops.expand_dims(ly, -1), -1), dtype)  # [B, R, P, 1, 1]
    wx = ops.cast(ops.expand_dims(ops.expand_dims(lx, -2), -1), dtype)  # [B, R, 1, P, 1]
    top = gather(y0, x0) * (1 - wx) + gather(y0, x1) * wx
    bottom = gather(y1, x0) * (1 - wx) + gather(y1, x1) * wx
    value = top * (1 - wy) + bottom * wy
    value = ops.reshape(
        value, (batch, num_rois, output_size, sampling_ratio, output_size, sampling_ratio, channels)
    )
    return ops.mean(value, axis=(3, 5))


@keras.saving.register_keras_serializable(package="deeptrends")
class RoIAlign(keras.layers.Layer):
    """``[features, boxes] -> [B, R, output_size, output_size, C]`` (see ``roi_align``).

    Args:
        stride: int. The feature map's stride in input pixels (16 for a conv4 backbone).
        output_size: int. Bins per side (7 in Faster R-CNN's head).
        sampling_ratio: int. Samples per bin per side (2, as Detectron).
    """

    def __init__(self, stride: int = 16, output_size: int = 7, sampling_ratio: int = 2, **kwargs):
        super().__init__(**kwargs)
        self.stride = int(stride)
        self.output_size = int(output_size)
        self.sampling_ratio = int(sampling_ratio)

    def call(self, inputs):
        features, boxes = inputs
        return roi_align(features, boxes, self.stride, self.output_size, self.sampling_ratio)

    def compute_output_shape(self, input_shape):
        features, boxes = input_shape
        return (features[0], boxes[1], self.output_size, self.output_size, features[-1])

    def get_config(self):
        return {
            **super().get_config(),
            "stride": self.stride,
            "output_size": self.output_size,
            "sampling_ratio": self.sampling_ratio,
        }


# ----------------------------------------------------------------------- NMS and losses


def non_max_suppression(
    boxes,
    scores,
    max_output: int,
    iou_threshold: float = 0.5,
    score_threshold: float = float("-inf"),
):
    """Greedy NMS of one image: ``boxes`` [N, 4], ``scores`` [N] -> (indices [max_output]
    int32 padded with -1, count). The kept boxes in order of decreasing score, each with
    IoU <= ``iou_threshold`` with every higher-scoring kept box (as
    ``tf.image.non_max_suppression``)."""
    n = ops.shape(scores)[0]
    order = ops.argsort(-scores)
    boxes = ops.take(boxes, order, axis=0)
    scores = ops.take(scores, order, axis=0)
    iou = pairwise_iou(boxes, boxes)
    index = ops.arange(n)
    later = ops.expand_dims(index, 0) > ops.expand_dims(index, 1)  # [i, j]: j after i
    suppress = ops.logical_and(iou > iou_threshold, later)
    keep0 = scores > score_threshold

    def body(i, keep):
        row = ops.logical_and(ops.take(suppress, i, axis=0), ops.take(keep, i))
        return ops.logical_and(keep, ops.logical_not(row))

    keep = ops.fori_loop(0, n, body, keep0)
    # kept indices first (stable, by score), then the rest
    rank = ops.where(keep, index, index + n)
    picked = ops.take(order, ops.argsort(rank)[:max_output])
    count = ops.minimum(ops.sum(ops.cast(keep, "int32")), max_output)
    slots = ops.arange(ops.shape(picked)[0])
    picked = ops.where(slots < count, ops.cast(picked, "int32"), -1)
    pad = max_output - ops.shape(picked)[0]
    if isinstance(pad, int) and pad > 0:
        picked = ops.concatenate([picked, -ops.ones((pad,), "int32")])
    return picked, count


def smooth_l1(x, beta: float = 1.0):
    """Huber-like smooth L1 of each element (Girshick, Fast R-CNN 2015, eq. 3), quadratic
    below ``beta``; ``beta`` = 1/9 for the RPN as in Detectron."""
    ax = ops.abs(x)
    return ops.where(ax < beta, 0.5 * ax * ax / beta, ax - 0.5 * beta)
