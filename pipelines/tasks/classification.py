"""Image classification: top-1/top-5 accuracy, learning curves, confusion matrix, and the
``serving_default`` (preprocessed ``images``) and ``image_bytes`` (encoded PNG/JPEG)
serving signatures.

Preprocessing comes from the model's registry entry where the config leaves it unset
(``pipelines.image_inputs.resolve_preprocessing``). Networks with auxiliary heads
(GoogLeNet) train through ``trainers.aux_heads``.

``task_options`` (all optional): ``gradient_norm_every`` (log per-layer gradient norms
every N steps), ``target_accuracy`` (log ``epochs_to_target``), ``evaluate_train`` (also
evaluate the un-augmented training split: ``train_accuracy``, ``train_eval_gap``),
``max_train_minutes`` (stop training after this wall time).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

import models
from data.images import build_image_datasets, build_train_as_eval
from pipelines.callbacks import EpochsToTarget, GradientNorms, TimeLimit
from pipelines.evaluation import classification as metrics
from pipelines.image_inputs import ImageInfo, image_info, image_input_spec, resolve_preprocessing
from pipelines.optim import build_optimizer
from pipelines.serving.precision import PRECISIONS, inference_copy
from pipelines.serving.signatures import image_classifier_endpoints
from pipelines.tasks.base import Evaluation, Inputs, Serving, Task, first_batch, register_task
from pipelines.trainers.aux_heads import compile_classifier, served_network, with_aux_heads


class ClassificationOptions(BaseModel):
    """``task_options`` of the classification task."""

    model_config = ConfigDict(extra="forbid")
    gradient_norm_every: int | None = Field(
        None, ge=1, description="log grad_norm/<layer> on a fixed training batch every N steps"
    )
    target_accuracy: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="log epochs_to_target: the first epoch whose val_accuracy reaches it",
    )
    evaluate_train: bool = Field(False, description="also evaluate the un-augmented training split")
    max_train_minutes: float | None = Field(
        None, gt=0.0, description="stop training after this wall time"
    )


@register_task("classification")
class ClassificationTask(Task):
    """Supervised image classification with a softmax classifier."""

    Options = ClassificationOptions
    Info = ImageInfo
    export_precisions = PRECISIONS

    @classmethod
    def metric_names(cls, config, options) -> tuple[str, ...]:
        return metrics.METRICS + (metrics.TRAIN_METRICS if options.evaluate_train else ())

    def __init__(self, context):
        super().__init__(context)
        self.preprocessing = resolve_preprocessing(self.config)
        self.spec = image_input_spec(
            self.config, self.preprocessing, (context.start_epoch, context.start_step)
        )

    def build_inputs(self) -> Inputs:
        train, evals, info = build_image_datasets(self.spec)
        return Inputs(
            train=train,
            eval=evals,
            steps_per_epoch=self.config.train.steps_per_epoch or info.steps_per_epoch,
            info=image_info(info, self.preprocessing),
            check_batch=first_batch(evals),
            fingerprint=info.fingerprint,
        )

    def build_model(self, inputs: Inputs):
        info, cfg = inputs.info, self.config
        network = models.create_model(
            cfg.model.name,
            **{"input_shape": tuple(info.image_shape), "num_classes": info.num_classes},
            **cfg.model.kwargs(),
        )
        model = with_aux_heads(network)
        compile_classifier(
            model,
            build_optimizer(cfg.train, inputs.steps_per_epoch),
            info.num_classes,
            label_smoothing=cfg.train.label_smoothing,
            jit_compile=cfg.runtime.jit_compile,
        )
        return model

    def callbacks(self, inputs: Inputs, run_dir: Path) -> list:
        opts, sink = self.options, self.context.log_metrics
        out = []
        if opts.gradient_norm_every and self.context.chief:  # a measurement: the chief's
            batch = first_batch(inputs.train)
            out.append(
                GradientNorms(
                    batch,
                    opts.gradient_norm_every,
                    sink=sink,
                    plot_path=run_dir / "artifacts" / "gradient_norms.png",
                )
            )
        if opts.target_accuracy:
            out.append(EpochsToTarget(opts.target_accuracy, sink=sink))
        if opts.max_train_minutes:
            out.append(TimeLimit(opts.max_train_minutes * 60.0))
        return out

    def evaluate(self, model, inputs: Inputs) -> Evaluation:
        train = build_train_as_eval(self.spec) if self.options.evaluate_train else None
        values, probs, labels = metrics.evaluate_classifier(model, inputs.eval, train)
        writer = metrics.confusion_matrix_writer(probs, labels, inputs.info.class_names)
        return Evaluation(metrics=values, artifacts=[writer])

    def serving(self, model, info: ImageInfo, check_batch=None) -> Serving:
        network = served_network(model)
        precision, served, folded = self.config.export.precision, network, 0
        if precision != "float32":  # a bfloat16 inference copy behind the same signatures
            served, folded = inference_copy(network, precision)
        endpoints = image_classifier_endpoints(
            served, info, check_batch, self.config.export.max_image_pixels
        )
        return Serving(
            network,
            endpoints,
            exported=served if served is not network else None,
            precision=precision,
            metadata={"folded_batch_norm": folded} if served is not network else {},
        )
