"""Faster R-CNN training (approximate joint training, Ren et al. 2015, section 3.2) and
inference.

Per image of a batch, in ``train_step``:

* RPN targets: anchors that cross the image border are ignored (section 3.1.3); an anchor
  is foreground with IoU >= ``rpn_fg_iou`` (0.7) with a ground-truth box, or when it is a
  box's best anchor; background below ``rpn_bg_iou`` (0.3). ``rpn_batch`` (256) anchors
  are sampled, at most half foreground. Losses: softmax cross-entropy over the 2k logits
  and smooth-L1 (beta 1/9, Detectron's) on the foreground deltas, both normalised by the
  sampled count.
* Proposals: the RPN's boxes decoded, clipped, the ``pre_nms`` best by objectness, NMS at
  ``rpn_nms`` (0.7), the ``post_nms`` best kept (12,000 / 2,000 in training, 6,000 / 300 at
  test time: the paper's counts), with the ground-truth boxes appended (as Detectron).
  No gradient flows through them (the "approximate" of approximate joint training).
* RoI targets: ``roi_batch`` (128) regions sampled per image, up to ``roi_fg_fraction``
  (25 %) foreground (IoU >= 0.5), the rest background (IoU < 0.5); cross-entropy over
  C + 1 classes, smooth-L1 on the deltas of the true class (weights 10, 10, 5, 5).

Random choices come from the trainer's ``SeedGenerator``, which the shared loop
checkpoints, so a resumed run draws the same samples. Under a ``tf.distribute`` strategy
the loss is divided by the replicas (Keras sums the replicas' gradients).

``detect`` is the whole detector at inference (the same function the task evaluates and
the SavedModel serves): proposals, head, class-specific boxes, per-class NMS
(``tf.image.combined_non_max_suppression``) and boxes normalised to the image.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import keras
import tensorflow as tf

from models.boxes import (
    HEAD_WEIGHTS,
    RPN_WEIGHTS,
    clip_boxes,
    decode_boxes,
    encode_boxes,
    pairwise_iou,
)
from models.boxes import smooth_l1 as _smooth_l1


@dataclass(frozen=True)
class DetectorSettings:
    """The sampling and post-processing numbers of Faster R-CNN (the paper's defaults)."""

    rpn_batch: int = 256
    rpn_fg_fraction: float = 0.5
    rpn_fg_iou: float = 0.7
    rpn_bg_iou: float = 0.3
    rpn_nms: float = 0.7
    train_pre_nms: int = 12000
    train_post_nms: int = 2000
    test_pre_nms: int = 6000
    test_post_nms: int = 300
    roi_batch: int = 128
    roi_fg_fraction: float = 0.25
    roi_fg_iou: float = 0.5
    score_threshold: float = 0.05
    detection_nms: float = 0.3
    max_detections: int = 100

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------- shared pieces


def rank_sample(candidates, counts, seed):
    """A random subset of each row's ``candidates`` [B, N] (bool) of ``counts`` [B] items
    (all of them where fewer): a mask [B, N]."""
    noise = keras.random.uniform(tf.shape(candidates), seed=seed)
    key = tf.where(candidates, noise, -1.0)
    order = tf.argsort(key, axis=1, direction="DESCENDING")
    rank = tf.argsort(order, axis=1)
    return candidates & (rank < counts[:, None])


def match(iou, valid_gt):
    """Each row's best ground truth: (max IoU [B, N], index [B, N]) where ``iou`` is
    [B, N, M] and ``valid_gt`` [B, M] masks the padding (IoU -1 there)."""
    iou = tf.where(valid_gt[:, None, :], iou, -1.0)
    return tf.reduce_max(iou, axis=2), tf.argmax(iou, axis=2, output_type=tf.int32)


def smooth_l1(x, beta):
    return _smooth_l1(x, beta)


def proposals_of(scores, deltas, anchors, image_size, pre_nms: int, post_nms: int, nms: float):
    """The RPN's proposals: boxes [B, post_nms, 4] in pixels (zeros past ``count``),
    objectness [B, post_nms] and ``count`` [B]."""
    objectness = tf.nn.softmax(scores, axis=-1)[..., 1]
    boxes = decode_boxes(deltas, anchors, RPN_WEIGHTS)
    size = tf.cast(image_size, tf.float32)
    boxes = clip_boxes(boxes, size[:, 0:1], size[:, 1:2])
    k = tf.minimum(pre_nms, tf.shape(objectness)[1])
    top, index = tf.math.top_k(objectness, k=k)
    boxes = tf.gather(boxes, index, batch_dims=1)
    # NMS in coordinates normalised by each image's size (IoU does not change)
    scale = tf.concat([size, size], axis=-1)[:, None, :]
    nmsed, nms_scores, _, count = tf.image.combined_non_max_suppression(
        (boxes / scale)[:, :, None, :],
        top[:, :, None],
        max_output_size_per_class=post_nms,
        max_total_size=post_nms,
        iou_threshold=nms,
        score_threshold=float("-inf"),
        pad_per_class=False,
        clip_boxes=False,
    )
    return nmsed * scale, nms_scores, count


# ----------------------------------------------------------------------- inference


def crop_and_resize_align(
    features, rois, stride: int, output_size: int = 7, sampling_ratio: int = 2
):
    """``models.boxes.roi_align`` with ``tf.image.crop_and_resize`` (8 times faster on a
    CPU than its gathers; a test checks they agree): ``features`` [B, H, W, C], ``rois``
    [B, R, 4] in pixels -> [B, R, S, S, C].

    roi_align samples the centres of ``S * sampling_ratio`` cells per side and clamps
    samples to the map; crop_and_resize samples a box's corners and puts zeros outside.
    So the boxes shrink by half a cell, and the map gets a one-pixel replicated border
    (the clamped value of any sample within a pixel of the map: all of a clipped box's)."""
    shape = tf.shape(features)
    batch, num = tf.shape(rois)[0], tf.shape(rois)[1]
    points = output_size * sampling_ratio
    y = tf.cast(rois, tf.float32) / float(stride) - 0.5 + 1.0  # +1: the padded border
    h = y[..., 2] - y[..., 0]
    w = y[..., 3] - y[..., 1]
    boxes = tf.stack(
        [
            y[..., 0] + h / (2 * points),
            y[..., 1] + w / (2 * points),
            y[..., 2] - h / (2 * points),
            y[..., 3] - w / (2 * points),
        ],
        axis=-1,
    )
    padded = tf.pad(features, [[0, 0], [1, 1], [1, 1], [0, 0]], mode="SYMMETRIC")
    last = tf.cast(tf.stack([shape[1] + 1, shape[2] + 1] * 2), tf.float32)  # padded H-1, W-1
    boxes = tf.reshape(boxes / last, [-1, 4])
    crops = tf.image.crop_and_resize(
        padded, boxes, tf.repeat(tf.range(batch), num), (points, points)
    )
    crops = tf.nn.avg_pool2d(crops, sampling_ratio, sampling_ratio, "VALID")
    channels = features.shape[-1]
    return tf.reshape(crops, tf.stack([batch, num, output_size, output_size, channels]))


def run_network(network, images, rois=None, training=False):
    """(features, rpn_scores, rpn_deltas, anchors) of ``network`` on ``images``."""
    features = network.get_layer("backbone")(images, training=training)
    scores, deltas, anchors = network.get_layer("rpn")(features, training=training)
    return features, scores, deltas, anchors


def detect(network, images, image_size, settings: DetectorSettings):
    """Detections of a batch: ``images`` [B, H, W, 3] in [0, 1] (each in its top-left
    ``image_size`` [B, 2] pixels) -> ``detection_boxes`` [B, K, 4] normalised to each
    image, ``detection_scores`` [B, K], ``detection_classes`` [B, K] (int64, 1-based: 0 is
    background) and ``num_detections`` [B] (int32); K = ``settings.max_detections``."""
    features, scores, deltas, anchors = run_network(network, images)
    rois, _, _ = proposals_of(
        scores,
        deltas,
        anchors,
        image_size,
        settings.test_pre_nms,
        settings.test_post_nms,
        settings.rpn_nms,
    )
    head = network.get_layer("roi_head")
    align = head.get_layer("roi_align")
    pooled = crop_and_resize_align(
        tf.cast(features, tf.float32), rois, align.stride, align.output_size, align.sampling_ratio
    )
    logits, box_deltas = head.get_layer("box_head")(pooled, training=False)
    return postprocess(logits, box_deltas, rois, image_size, settings)


def postprocess(logits, box_deltas, rois, image_size, settings: DetectorSettings):
    """Class-specific boxes of the head, per-class NMS, normalised detections."""
    probs = tf.nn.softmax(tf.cast(logits, tf.float32), axis=-1)[..., 1:]  # [B, R, C]
    num_classes = tf.shape(probs)[-1]
    anchors = tf.repeat(rois[:, :, None, :], num_classes, axis=2)
    boxes = decode_boxes(tf.cast(box_deltas, tf.float32), anchors, HEAD_WEIGHTS)
    size = tf.cast(image_size, tf.float32)
    scale = tf.concat([size, size], axis=-1)[:, None, None, :]
    boxes = tf.clip_by_value(boxes / scale, 0.0, 1.0)
    k = settings.max_detections
    nmsed, nms_scores, classes, count = tf.image.combined_non_max_suppression(
        boxes,
        probs,
        max_output_size_per_class=k,
        max_total_size=k,
        iou_threshold=settings.detection_nms,
        score_threshold=settings.score_threshold,
        pad_per_class=False,
        clip_boxes=True,
    )
    return detection_outputs(nmsed, nms_scores, classes, count)


def detection_outputs(boxes, scores, classes, count):
    """The standard detection outputs; classes 1-based, slots past ``count`` all zeros."""
    real = tf.range(tf.shape(scores)[1])[None, :] < count[:, None]
    return {
        "detection_boxes": tf.where(real[..., None], boxes, 0.0),
        "detection_scores": tf.where(real, scores, 0.0),
        "detection_classes": tf.where(real, tf.cast(classes, tf.int64) + 1, 0),
        "num_detections": tf.cast(count, tf.int32),
    }


def propose(network, images, image_size, count: int, settings: DetectorSettings):
    """The RPN's ``count`` best proposals after NMS, normalised: (boxes [B, count, 4],
    number [B]) (for proposal recall)."""
    _, scores, deltas, anchors = run_network(network, images)
    boxes, _, valid = proposals_of(
        scores, deltas, anchors, image_size, settings.test_pre_nms, count, settings.rpn_nms
    )
    size = tf.cast(image_size, tf.float32)
    return boxes / tf.concat([size, size], axis=-1)[:, None, :], valid


# ----------------------------------------------------------------------- training


class FasterRCNNTrainer(keras.Model):
    """Trains a registered ``faster_rcnn`` network on ``(images, targets)`` batches of
    ``data.detection.build_detection_datasets``; the served model is ``network``."""

    tracked = ("loss", "rpn_cls_loss", "rpn_box_loss", "cls_loss", "box_loss", "rpn_fg", "roi_fg")

    def __init__(self, network, settings: DetectorSettings | None = None, seed: int = 0, **kwargs):
        super().__init__(name="faster_rcnn_trainer", **kwargs)
        self.network = network
        self.settings = settings or DetectorSettings()
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.trackers = {k: keras.metrics.Mean(name=k) for k in self.tracked}
        self.backbone = network.get_layer("backbone")
        self.rpn = network.get_layer("rpn")
        head = network.get_layer("roi_head")
        self.box_head = head.get_layer("box_head")
        align = head.get_layer("roi_align")
        self.stride, self.roi_size = align.stride, align.output_size
        self.built = True

    @property
    def metrics(self):
        return list(self.trackers.values())

    def call(self, inputs, training=False):
        return self.network(inputs, training=training)

    # -- losses -------------------------------------------------------------------------------
    def rpn_targets(self, anchors, gt_boxes, valid_gt, image_size):
        """(labels [B, A]: 1 fg, 0 bg, -1 ignored; matched gt boxes [B, A, 4])."""
        s = self.settings
        size = tf.cast(image_size, tf.float32)
        inside = (
            (anchors[..., 0] >= 0.0)
            & (anchors[..., 1] >= 0.0)
            & (anchors[..., 2] <= size[:, 0:1])
            & (anchors[..., 3] <= size[:, 1:2])
        )
        iou = tf.where(valid_gt[:, None, :], pairwise_iou(anchors, gt_boxes), 0.0)  # [B, A, M]
        best, index = tf.reduce_max(iou, axis=2), tf.argmax(iou, axis=2, output_type=tf.int32)
        # a box's best anchors (among those inside) are foreground whatever their IoU
        gt_best = tf.reduce_max(tf.where(inside[:, :, None], iou, -1.0), axis=1, keepdims=True)
        is_best = tf.reduce_any(
            (iou >= gt_best - 1e-6) & (gt_best > 0.0) & valid_gt[:, None, :], axis=2
        )
        fg = inside & ((best >= s.rpn_fg_iou) | is_best)
        bg = inside & ~fg & (best < s.rpn_bg_iou)
        max_fg = int(s.rpn_batch * s.rpn_fg_fraction)
        fg = rank_sample(fg, tf.fill([tf.shape(fg)[0]], max_fg), self.seed_generator)
        num_fg = tf.reduce_sum(tf.cast(fg, tf.int32), axis=1)
        bg = rank_sample(bg, s.rpn_batch - num_fg, self.seed_generator)
        labels = tf.where(fg, 1, tf.where(bg, 0, -1))
        return labels, tf.gather(gt_boxes, index, batch_dims=1)

    def roi_targets(self, proposals, count, gt_boxes, gt_labels, valid_gt):
        """Sampled RoIs [B, R, 4] with their class [B, R] (0 background), box targets
        [B, R, 4] and weights [B, R] (0: padding where too few candidates)."""
        s = self.settings
        candidates = tf.concat([proposals, gt_boxes], axis=1)
        slots = tf.range(tf.shape(proposals)[1])[None, :] < count[:, None]
        valid = tf.concat([slots, valid_gt], axis=1)
        best, index = match(pairwise_iou(candidates, gt_boxes), valid_gt)
        fg = valid & (best >= s.roi_fg_iou)
        bg = valid & (best < s.roi_fg_iou)
        max_fg = int(round(s.roi_batch * s.roi_fg_fraction))
        fg = rank_sample(fg, tf.fill([tf.shape(fg)[0]], max_fg), self.seed_generator)
        num_fg = tf.reduce_sum(tf.cast(fg, tf.int32), axis=1)
        bg = rank_sample(bg, s.roi_batch - num_fg, self.seed_generator)
        # the sampled first (foreground, then background), padded with unsampled ones
        key = tf.cast(fg, tf.float32) * 2.0 + tf.cast(bg, tf.float32)
        key += keras.random.uniform(tf.shape(key), seed=self.seed_generator) * 0.5
        _, picked = tf.math.top_k(key, k=s.roi_batch)
        rois = tf.gather(candidates, picked, batch_dims=1)
        is_fg = tf.gather(fg, picked, batch_dims=1)
        weight = tf.cast(is_fg | tf.gather(bg, picked, batch_dims=1), tf.float32)
        matched = tf.gather(index, picked, batch_dims=1)
        labels = tf.where(is_fg, tf.gather(gt_labels, matched, batch_dims=1) + 1, 0)
        targets = encode_boxes(tf.gather(gt_boxes, matched, batch_dims=1), rois, HEAD_WEIGHTS)
        return tf.stop_gradient(rois), labels, tf.stop_gradient(targets), weight

    def losses_of(self, images, targets, training: bool):
        s = self.settings
        gt_boxes = tf.cast(targets["boxes"], tf.float32)
        gt_labels = tf.cast(targets["labels"], tf.int32)
        valid_gt = gt_labels >= 0
        image_size = targets["image_size"]
        features = self.backbone(images, training=training)
        scores, deltas, anchors = self.rpn(features, training=training)

        rpn_labels, rpn_matched = self.rpn_targets(anchors, gt_boxes, valid_gt, image_size)
        sampled = tf.cast(rpn_labels >= 0, tf.float32)
        n_rpn = tf.maximum(tf.reduce_sum(sampled), 1.0)
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(tf.maximum(rpn_labels, 0), scores)
        rpn_cls = tf.reduce_sum(ce * sampled) / n_rpn
        rpn_fg = tf.cast(rpn_labels == 1, tf.float32)
        rpn_box_targets = encode_boxes(rpn_matched, anchors, RPN_WEIGHTS)
        rpn_box = (
            tf.reduce_sum(
                tf.reduce_sum(smooth_l1(deltas - rpn_box_targets, 1.0 / 9.0), -1) * rpn_fg
            )
            / n_rpn
        )

        pre, post = (
            (s.train_pre_nms, s.train_post_nms) if training else (s.test_pre_nms, s.test_post_nms)
        )
        proposals, _, count = proposals_of(
            tf.stop_gradient(scores),
            tf.stop_gradient(deltas),
            anchors,
            image_size,
            pre,
            post,
            s.rpn_nms,
        )
        rois, roi_labels, roi_targets, weight = self.roi_targets(
            tf.stop_gradient(proposals), count, gt_boxes, gt_labels, valid_gt
        )
        logits, box_deltas = self.box_head(
            crop_and_resize_align(tf.cast(features, tf.float32), rois, self.stride, self.roi_size),
            training=training,
        )
        n_roi = tf.maximum(tf.reduce_sum(weight), 1.0)
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(roi_labels, logits)
        cls = tf.reduce_sum(ce * weight) / n_roi
        is_fg = tf.cast(roi_labels > 0, tf.float32)
        picked = tf.gather(box_deltas, tf.maximum(roi_labels - 1, 0), axis=2, batch_dims=2)
        box = tf.reduce_sum(tf.reduce_sum(smooth_l1(picked - roi_targets, 1.0), -1) * is_fg) / n_roi
        total = rpn_cls + rpn_box + cls + box
        return {
            "loss": total,
            "rpn_cls_loss": rpn_cls,
            "rpn_box_loss": rpn_box,
            "cls_loss": cls,
            "box_loss": box,
            "rpn_fg": tf.reduce_sum(rpn_fg) / tf.cast(tf.shape(images)[0], tf.float32),
            "roi_fg": tf.reduce_sum(is_fg * weight) / tf.cast(tf.shape(images)[0], tf.float32),
        }

    def _update(self, values: dict) -> dict:
        for k, v in values.items():
            self.trackers[k].update_state(v)
        return {k: t.result() for k, t in self.trackers.items()}

    def train_step(self, data):
        images, targets = data
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        with tf.GradientTape() as tape:
            values = self.losses_of(images, targets, training=True)
            loss = values["loss"] / replicas
        variables = self.network.trainable_variables
        gradients = tape.gradient(loss, variables)
        self.optimizer.apply_gradients(zip(gradients, variables, strict=True))
        return self._update(values)

    def test_step(self, data):
        images, targets = data
        return self._update(self.losses_of(images, targets, training=False))

    # -- use ----------------------------------------------------------------------------------
    def detect(self, images, image_size):
        return detect(self.network, images, image_size, self.settings)

    def propose(self, images, image_size, count: int):
        return propose(self.network, images, image_size, count, self.settings)


def trainer_for(network, settings: dict, seed: int) -> FasterRCNNTrainer:
    """The trainer of ``network`` with the run's settings (``DetectionInfo.settings``)."""
    return FasterRCNNTrainer(network, DetectorSettings(**settings), seed=seed)


class Predictor:
    """The trained detector as the task evaluates it and the SavedModel serves it."""

    def __init__(self, network, info):
        self.network = network
        self.info = info
        self.settings = DetectorSettings(**info.settings)
        self._batch = tf.function(self._detect, reduce_retracing=True)

    def _detect(self, images, image_size):
        from pipelines.serving.signatures import detection_output_signature

        def one(args):  # each image at its own size, unpadded: as the signature serves it
            image, size = args
            out = detect(self.network, image[None, : size[0], : size[1]], size[None], self.settings)
            return {k: v[0] for k, v in out.items()}

        signature = detection_output_signature(self.settings.max_detections)
        return tf.map_fn(one, (images, image_size), fn_output_signature=signature)

    def detect_batch(self, images, targets) -> dict:
        """Detections of an eval batch (padded canvas, ``targets['image_size']``): each
        image cropped to its size first, so that evaluation measures what is served."""
        return self._batch(images, targets["image_size"])

    def detect_one(self, image):
        """One image [H, W, 3] in [0, 1] of any size: resized as in training, detected."""
        from data.detection import resize_image

        resized = resize_image(image, self.info.min_size, self.info.max_size)[None]
        size = tf.shape(resized)[1:3][None]
        out = detect(self.network, resized, size, self.settings)
        return {k: v[0] for k, v in out.items()}

    def endpoints(self, check_images, max_pixels: int):
        from pipelines.serving.signatures import image_detector_endpoints

        return image_detector_endpoints(
            self.detect_one,
            self.info.class_names,
            check_images,
            self.settings.max_detections,
            max_pixels,
        )
