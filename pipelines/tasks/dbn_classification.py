"""DBN classification: a ``dbn_classifier`` initialised from a greedily pre-trained DBN
(trained here, or loaded from the registry) and fine-tuned by backpropagation, the 2006
recipe (Hinton, Osindero & Teh 2006; Hinton & Salakhutdinov 2006).

The pre-trained DBN is this task's input beside the images: ``build_inputs`` loads it
(``task_options.pretrained``) or pre-trains it, RBM after RBM with contrastive divergence
(``trainers.rbm``), through the shared training loop under the run's distribution
strategy; ``build_model`` copies its recognition weights into the classifier, so building
the model again (the driver's un-replicated copy) pre-trains nothing. Evaluation and
serving are those of the image classifiers (``evaluation.classification``,
``serving.signatures``): top-1/top-5 accuracy, the confusion matrix, ``serving_default``
and ``image_bytes``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from pipelines.config import ConfigError, ExperimentConfig, TrainConfig
from pipelines.evaluation import classification as metrics
from pipelines.image_inputs import ImageInfo, image_input_spec, resolve_preprocessing
from pipelines.image_inputs import image_info as to_image_info
from pipelines.tasks.base import (
    Evaluation,
    Inputs,
    RunContext,
    Serving,
    Task,
    register_task,
)


class DBNOptions(BaseModel):
    """``task_options`` of ``dbn_classification``: the pre-training, and what the
    fine-tuning's evaluation adds."""

    model_config = ConfigDict(extra="forbid")
    pretrained: str | None = Field(
        None, description="models:/NAME@ALIAS or a .keras DBN; default: pre-train here"
    )
    epochs_per_layer: list[int] = Field(
        [5, 5, 5], description="greedy pre-training epochs of each RBM"
    )
    cd_k: int = Field(1, ge=1, description="Gibbs steps of contrastive divergence")
    persistent: bool = Field(False, description="persistent CD (Tieleman 2008)")
    binarize: float | None = Field(
        0.5, gt=0.0, lt=1.0, description="pre-training pixels thresholded at this value"
    )
    learning_rate: float = Field(0.05, gt=0.0, description="pre-training SGD learning rate")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="pre-training SGD momentum")
    batch_size: int = Field(64, ge=1, description="pre-training batch size")
    evaluate_train: bool = Field(False, description="also evaluate the un-augmented training split")
    max_train_minutes: float | None = Field(
        None, gt=0.0, description="stop fine-tuning after this wall time"
    )


@dataclass
class Pretrained:
    """The DBN the classifier starts from, and how it was made (``pretraining.json``)."""

    dbn: Any  # keras.Model: the ``dbn`` network
    record: dict[str, Any] = field(default_factory=dict)


def _first_batch_of_a_full_pass(dataset):
    """The first batch, read by a whole pass. A partial read of a dataset with an in-memory
    cache (``data.cache``) leaves the cache truncated to what the prefetching iterator had
    read (measured: 67 of MNIST's 2,000 eval images after ``first_batch``), so every later
    pass, the evaluation included, would see only those."""
    first = None
    for batch in dataset:
        first = batch if first is None else first
    return first


@register_task("dbn_classification")
class DBNClassificationTask(Task):
    """Classification with a ``dbn_classifier`` whose layers start from a DBN pre-trained
    greedily with contrastive divergence (Hinton, Osindero & Teh 2006; fine-tuning by
    backpropagation as in Hinton & Salakhutdinov 2006)."""

    Options = DBNOptions
    Info = ImageInfo

    def __init__(self, context: RunContext):
        super().__init__(context)
        self.check(self.config, self.options)
        self.preprocessing = resolve_preprocessing(self.config)
        self.spec = image_input_spec(
            self.config, self.preprocessing, (context.start_epoch, context.start_step)
        )

    # -- config checks ------------------------------------------------------------------
    @classmethod
    def check(cls, config: ExperimentConfig, options: DBNOptions) -> None:
        import models
        from pipelines.trainers.rbm import layer_count

        task = models.model_info(config.model.name).task
        if task != cls.name:
            accepted = [n for n in models.list_models() if models.model_info(n).task == cls.name]
            raise ConfigError(
                f"model.name: task {cls.name!r} fine-tunes a DBN classifier "
                f"({', '.join(accepted)}); {config.model.name!r} is a {task} model."
            )
        layers = layer_count(config)
        if options.pretrained is None and len(options.epochs_per_layer) != layers:
            raise ConfigError(
                f"task_options.epochs_per_layer: {len(options.epochs_per_layer)} entries for "
                f"{layers} RBMs (model.hidden_units)."
            )

    @classmethod
    def metric_names(cls, config: ExperimentConfig, options: DBNOptions) -> tuple[str, ...]:
        return metrics.METRICS + (metrics.TRAIN_METRICS if options.evaluate_train else ())

    # -- data: the images, and the pre-trained DBN ---------------------------------------
    def build_inputs(self) -> Inputs:
        from data.images import build_image_datasets

        train, evals, info = build_image_datasets(self.spec)
        image_info = to_image_info(info, self.preprocessing)
        return Inputs(
            train=train,
            eval=evals,
            steps_per_epoch=self.config.train.steps_per_epoch or info.steps_per_epoch,
            info=image_info,
            check_batch=_first_batch_of_a_full_pass(evals),
            fingerprint=info.fingerprint,
            data=self.pretrained_dbn(image_info),
        )

    def pretrained_dbn(self, info: ImageInfo) -> Pretrained:
        """The DBN of ``task_options.pretrained``, else one pre-trained greedily here on
        the training split (binarised), RBM after RBM, through the shared loop."""
        import keras

        opts = self.options
        if opts.pretrained:
            if opts.pretrained.startswith("models:/"):
                from pipelines import tracking

                dbn = tracking.load_model(opts.pretrained)
            else:
                dbn = keras.saving.load_model(opts.pretrained)
            return Pretrained(dbn, {"kind": "loaded", "uri": opts.pretrained})

        import models
        from data.arrays import binarize, repeating_dataset
        from data.images import load_image_arrays
        from pipelines import loop
        from pipelines.trainers.rbm import GreedyLayerSchedule, RBMTrainer

        cfg, ctx = self.config, self.context
        strategy = ctx.strategy
        if strategy is None:
            import tensorflow as tf

            strategy = tf.distribute.get_strategy()
        arrays = load_image_arrays(image_input_spec(cfg, batch_size=opts.batch_size))
        x, y = arrays["train"]
        x = binarize(x, opts.binarize)
        units = cfg.model.kwargs().get("hidden_units")
        if units is None:
            units = models.model_arguments(cfg.model.name)["hidden_units"].default
        pretrain = TrainConfig.model_validate(
            {
                "learning_rate": opts.learning_rate,
                "optimizer": {"name": "sgd", "momentum": opts.momentum},
                "batch_size": opts.batch_size,
            }
        )
        steps = len(x) // opts.batch_size
        keras.utils.set_random_seed(cfg.runtime.seed)
        with strategy.scope():
            dbn = models.create_model(
                "dbn", input_shape=tuple(info.image_shape), hidden_units=list(units)
            )
            trainer = RBMTrainer(
                dbn,
                cd_k=opts.cd_k,
                persistent=opts.persistent,
                batch_size=opts.batch_size,
                seed=cfg.runtime.seed,
                epochs_per_layer=opts.epochs_per_layer,
            )
            trainer.compile_for(pretrain, steps, images=x, jit_compile=cfg.runtime.jit_compile)
        history = loop.fit(
            trainer,
            strategy,
            repeating_dataset(x, y, opts.batch_size, cfg.runtime.seed),
            epochs=sum(opts.epochs_per_layer),
            steps_per_epoch=steps,
            callbacks=[GreedyLayerSchedule(opts.epochs_per_layer)],
            verbose=cfg.train.verbose if ctx.chief else 0,
            jit_compile=cfg.runtime.jit_compile,
        )
        record = {
            "kind": "pretrained_in_run",
            "epochs_per_layer": opts.epochs_per_layer,
            "cd_k": opts.cd_k,
            "persistent": opts.persistent,
            "binarize": opts.binarize,
            "learning_rate": opts.learning_rate,
            "final_recon_error": float(history["recon_error"][-1]),
        }
        return Pretrained(dbn, record)

    # -- model ----------------------------------------------------------------------------
    def build_model(self, inputs: Inputs):
        import models
        from models.rbm import load_dbn_weights
        from pipelines.optim import build_optimizer
        from pipelines.trainers.aux_heads import compile_classifier

        info, cfg = inputs.info, self.config
        classifier = models.create_model(
            cfg.model.name,
            input_shape=tuple(info.image_shape),
            num_classes=info.num_classes,
            **cfg.model.kwargs(),
        )
        load_dbn_weights(classifier, inputs.data.dbn)
        compile_classifier(
            classifier,
            build_optimizer(cfg.train, inputs.steps_per_epoch),
            info.num_classes,
            label_smoothing=cfg.train.label_smoothing,
            jit_compile=cfg.runtime.jit_compile,
        )
        return classifier

    def callbacks(self, inputs: Inputs, run_dir: Path) -> list:
        from pipelines.callbacks import TimeLimit

        minutes = self.options.max_train_minutes
        return [TimeLimit(minutes * 60.0)] if minutes else []

    # -- evaluation and serving -------------------------------------------------------------
    def evaluate(self, model, inputs: Inputs) -> Evaluation:
        from data.images import build_train_as_eval
        from models.rbm import rbm_layers

        train = build_train_as_eval(self.spec) if self.options.evaluate_train else None
        values, probs, labels = metrics.evaluate_classifier(model, inputs.eval, train)
        record = {
            **inputs.data.record,
            "layers_copied": len(rbm_layers(inputs.data.dbn)),  # load_dbn_weights copies all
        }

        def write_pretraining(folder: Path) -> None:
            (folder / "pretraining.json").write_text(json.dumps(record, indent=2))

        return Evaluation(
            metrics=values,
            artifacts=[
                metrics.confusion_matrix_writer(probs, labels, inputs.info.class_names),
                write_pretraining,
            ],
        )

    def serving(self, model, info: ImageInfo, check_batch: Any = None) -> Serving:
        from pipelines.serving.signatures import image_classifier_endpoints

        return Serving(model, image_classifier_endpoints(model, info, check_batch))
