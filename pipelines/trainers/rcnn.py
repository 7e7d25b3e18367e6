"""R-CNN training and inference (Girshick et al. 2014).

Fine-tuning (section 2.3): every proposal with IoU >= ``fg_iou`` (0.5) with a ground-truth
box is a positive of that box's class, the rest background; the ground-truth boxes join
the candidates. Each batch samples ``fg_per_batch`` (32) positive and ``bg_per_batch`` (96)
background regions over its images (per image: the batch's share; more background where
positives are short). Each region is dilated so that ``context_padding`` (16) pixels of
context surround it once warped to ``crop_size`` (``tf.image.crop_and_resize``: outside
the image it sees zeros), and classified. The box regressor (appendix C) learns on the
regions with IoU >= ``regression_iou`` (0.6), relative to the undilated proposal.

Inference: the first ``eval_proposals`` proposals of an image, warped and scored in one
batch; class-specific boxes; per-class NMS at ``detection_nms`` (0.3, the paper's).

Proposals come from ``data/proposals.py`` (selective search or EdgeBoxes), computed once
per image at the training scale and cached; ``attach_proposals`` adds them to the raw
elements of both splits. A SavedModel cannot run selective search, so R-CNN exports
``serving_default(images, proposals)``: the client sends the proposals.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import keras
import numpy as np
import tensorflow as tf

from models.boxes import HEAD_WEIGHTS, decode_boxes, encode_boxes, pairwise_iou, smooth_l1
from pipelines.trainers.faster_rcnn import detection_outputs, match, rank_sample

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RCNNSettings:
    """R-CNN's sampling and post-processing numbers (the paper's defaults)."""

    crop_size: int = 224
    context_padding: int = 16
    rcnn_fg_iou: float = 0.5
    rcnn_regression_iou: float = 0.6
    rcnn_fg_per_batch: int = 32
    rcnn_bg_per_batch: int = 96
    rcnn_eval_proposals: int = 500
    proposals_per_image: int = 2000
    proposal_method: str = "selective_search_fast"
    score_threshold: float = 0.05
    detection_nms: float = 0.3
    max_detections: int = 100

    def to_dict(self) -> dict:
        return asdict(self)


def attach_proposals(splits, options, spec):
    """``splits`` with each image's proposals (cached, computed at the training scale)."""
    import dataclasses

    from data.detection import resized_images, with_proposals
    from data.proposals import ProposalCache

    cache = ProposalCache(options.proposal_cache)
    method, count = options.proposal_method, options.proposals_per_image

    def compute(dataset, n):
        out = []
        for i, (_, image) in enumerate(resized_images(dataset, spec.min_size, spec.max_size)):
            boxes, _ = cache.get(image, method, count)
            out.append(boxes)
            if (i + 1) % 50 == 0:
                log.info("%s proposals: %d / %d images", method, i + 1, n)
        return out

    train = compute(splits.train, splits.num_train)
    evals = compute(splits.eval, splits.num_eval)
    log.info(
        "%s: %d computed, %d cached, %.2f s per image",
        method,
        cache.computed,
        cache.hits,
        cache.mean_seconds(method),
    )
    return dataclasses.replace(
        splits,
        train=with_proposals(splits.train, train, count),
        eval=with_proposals(splits.eval, evals, count),
        max_proposals=count,
    )


def warp_regions(images, boxes, box_index, crop_size: int, padding: int):
    """Crops of ``boxes`` [N, 4] (pixels) from ``images`` [B, H, W, 3], each dilated so
    that ``padding`` pixels of context surround it at ``crop_size`` (the paper's warp)."""
    shape = tf.cast(tf.shape(images)[1:3], tf.float32)
    scale = crop_size / max(crop_size - 2 * padding, 1)
    cy = (boxes[:, 0] + boxes[:, 2]) / 2.0
    cx = (boxes[:, 1] + boxes[:, 3]) / 2.0
    h = tf.maximum(boxes[:, 2] - boxes[:, 0], 1.0) * scale
    w = tf.maximum(boxes[:, 3] - boxes[:, 1], 1.0) * scale
    norm = tf.stack(
        [
            (cy - h / 2) / (shape[0] - 1),
            (cx - w / 2) / (shape[1] - 1),
            (cy + h / 2) / (shape[0] - 1),
            (cx + w / 2) / (shape[1] - 1),
        ],
        axis=1,
    )
    return tf.image.crop_and_resize(images, norm, box_index, (crop_size, crop_size))


class RCNNTrainer(keras.Model):
    """Fine-tunes a registered ``rcnn`` network on the warped proposals of
    ``(images, targets)`` batches; the served model is ``network``."""

    tracked = ("loss", "cls_loss", "box_loss", "fg_regions")

    def __init__(self, network, settings: RCNNSettings | None = None, seed: int = 0, **kwargs):
        super().__init__(name="rcnn_trainer", **kwargs)
        self.network = network
        self.settings = settings or RCNNSettings()
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.trackers = {k: keras.metrics.Mean(name=k) for k in self.tracked}
        self.built = True

    @property
    def metrics(self):
        return list(self.trackers.values())

    def call(self, inputs, training=False):
        return self.network(inputs, training=training)

    def sample(self, targets, batch: int):
        """Regions [B, K, 4], classes [B, K], box targets [B, K, 4], regression weights
        [B, K] and sample weights [B, K] (K = the batch's regions per image)."""
        s = self.settings
        gt_boxes = tf.cast(targets["boxes"], tf.float32)
        gt_labels = tf.cast(targets["labels"], tf.int32)
        valid_gt = gt_labels >= 0
        proposals = tf.cast(targets["proposals"], tf.float32)
        slots = tf.range(tf.shape(proposals)[1])[None, :] < targets["num_proposals"][:, None]
        candidates = tf.concat([proposals, gt_boxes], axis=1)
        valid = tf.concat([slots, valid_gt], axis=1)
        best, index = match(pairwise_iou(candidates, gt_boxes), valid_gt)
        per_image = max(1, (s.rcnn_fg_per_batch + s.rcnn_bg_per_batch) // batch)
        max_fg = max(1, s.rcnn_fg_per_batch // batch)
        fg = rank_sample(
            valid & (best >= s.rcnn_fg_iou), tf.fill([batch], max_fg), self.seed_generator
        )
        num_fg = tf.reduce_sum(tf.cast(fg, tf.int32), axis=1)
        bg = rank_sample(valid & (best < s.rcnn_fg_iou), per_image - num_fg, self.seed_generator)
        key = tf.cast(fg, tf.float32) * 2.0 + tf.cast(bg, tf.float32)
        key += keras.random.uniform(tf.shape(key), seed=self.seed_generator) * 0.5
        _, picked = tf.math.top_k(key, k=per_image)
        regions = tf.gather(candidates, picked, batch_dims=1)
        is_fg = tf.gather(fg, picked, batch_dims=1)
        weight = tf.cast(is_fg | tf.gather(bg, picked, batch_dims=1), tf.float32)
        matched = tf.gather(index, picked, batch_dims=1)
        classes = tf.where(is_fg, tf.gather(gt_labels, matched, batch_dims=1) + 1, 0)
        regress = tf.cast(
            is_fg & (tf.gather(best, picked, batch_dims=1) >= s.rcnn_regression_iou), tf.float32
        )
        box_targets = encode_boxes(
            tf.gather(gt_boxes, matched, batch_dims=1), regions, HEAD_WEIGHTS
        )
        return regions, classes, box_targets, regress, weight

    def losses_of(self, images, targets, training: bool):
        s = self.settings
        batch = images.shape[0] or tf.shape(images)[0]
        if not isinstance(batch, int):
            raise ValueError("R-CNN training needs a static batch size (drop_remainder=true)")
        regions, classes, box_targets, regress, weight = self.sample(targets, batch)
        per_image = tf.shape(regions)[1]
        flat = tf.reshape(regions, [-1, 4])
        index = tf.repeat(tf.range(batch), per_image)
        crops = warp_regions(images, tf.stop_gradient(flat), index, s.crop_size, s.context_padding)
        out = self.network(crops, training=training)
        logits = tf.reshape(out["class_logits"], [batch, per_image, -1])
        deltas = tf.reshape(out["box_deltas"], [batch, per_image, -1, 4])
        n = tf.maximum(tf.reduce_sum(weight), 1.0)
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(classes, logits)
        cls = tf.reduce_sum(ce * weight) / n
        picked = tf.gather(deltas, tf.maximum(classes - 1, 0), axis=2, batch_dims=2)
        box = tf.reduce_sum(tf.reduce_sum(smooth_l1(picked - box_targets, 1.0), -1) * regress) / n
        return {
            "loss": cls + box,
            "cls_loss": cls,
            "box_loss": box,
            "fg_regions": tf.reduce_sum(tf.cast(classes > 0, tf.float32) * weight),
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
        self.optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables, strict=True))
        return self._update(values)

    def test_step(self, data):
        images, targets = data
        return self._update(self.losses_of(images, targets, training=False))


def trainer_for(network, settings: dict, seed: int) -> RCNNTrainer:
    return RCNNTrainer(network, RCNNSettings(**settings), seed=seed)


def detect_regions(network, image, proposals, settings: RCNNSettings):
    """One image [H, W, 3] in [0, 1] and its proposals [P, 4] in its pixels (rows of zeros
    pad) -> the standard detection outputs of that image (boxes normalised)."""
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    k = tf.minimum(tf.shape(proposals)[0], settings.rcnn_eval_proposals)
    proposals = tf.cast(proposals[:k], tf.float32)
    real = (proposals[:, 2] > proposals[:, 0]) & (proposals[:, 3] > proposals[:, 1])
    crops = warp_regions(
        image[None],
        proposals,
        tf.zeros([k], tf.int32),
        settings.crop_size,
        settings.context_padding,
    )
    out = network(crops, training=False)
    probs = tf.nn.softmax(out["class_logits"], axis=-1)[:, 1:]  # [P, C]
    probs = tf.where(real[:, None], probs, 0.0)
    num_classes = tf.shape(probs)[1]
    anchors = tf.repeat(proposals[:, None, :], num_classes, axis=1)
    boxes = decode_boxes(out["box_deltas"], anchors, HEAD_WEIGHTS)
    scale = tf.concat([shape, shape], axis=0)
    boxes = tf.clip_by_value(boxes / scale, 0.0, 1.0)
    m = settings.max_detections
    nmsed, scores, classes, count = tf.image.combined_non_max_suppression(
        boxes[None],
        probs[None],
        max_output_size_per_class=m,
        max_total_size=m,
        iou_threshold=settings.detection_nms,
        score_threshold=settings.score_threshold,
        pad_per_class=False,
        clip_boxes=True,
    )
    out = detection_outputs(nmsed, scores, classes, count)
    return {key: value[0] for key, value in out.items()}


class Predictor:
    """The trained R-CNN as the task evaluates it and the SavedModel serves it."""

    def __init__(self, network, info):
        self.network = network
        self.info = info
        self.settings = RCNNSettings(**info.settings)
        self._batch = tf.function(self._detect, reduce_retracing=True)

    def _detect(self, images, proposals, image_size):
        def one(args):
            image, props, size = args
            return detect_regions(self.network, image[: size[0], : size[1]], props, self.settings)

        from pipelines.serving.signatures import detection_output_signature

        return tf.map_fn(
            one,
            (images, proposals, image_size),
            fn_output_signature=detection_output_signature(self.settings.max_detections),
        )

    def detect_batch(self, images, targets) -> dict:
        return self._batch(images, targets["proposals"], targets["image_size"])

    def detect_one(self, image, proposals):
        """One image of any size and its proposals normalised [P, 4]."""
        from data.detection import resize_image

        resized = resize_image(image, self.info.min_size, self.info.max_size)
        size = tf.cast(tf.shape(resized)[:2], tf.float32)
        return detect_regions(
            self.network, resized, proposals * tf.concat([size, size], 0), self.settings
        )

    def endpoints(self, check_images, max_pixels: int):
        from data.proposals import ProposalCache
        from pipelines.serving.signatures import proposal_detector_endpoints

        cache = ProposalCache()
        count = min(self.settings.rcnn_eval_proposals, 200)
        props = []
        for image in check_images[:1]:
            boxes, _ = cache.get(image, "edge_boxes", count)
            padded = np.zeros((count, 4), np.float32)
            padded[: len(boxes)] = boxes
            props.append(padded)
        return proposal_detector_endpoints(
            self.detect_one,
            self.info.class_names,
            check_images[:1],
            np.stack(props),
            self.settings.max_detections,
        )
