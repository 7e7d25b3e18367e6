"""DBN classification: a ``dbn_classifier`` initialised from a greedily pre-trained DBN
(trained here, or loaded from the registry) and fine-tuned by backpropagation, the 2006
recipe (Hinton, Osindero & Teh 2006; Hinton & Salakhutdinov 2006)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

import models
from data.arrays import binarize, repeating_dataset
from data.images import ImageInputSpec, load_image_arrays
from pipelines.config import ConfigError, ExperimentConfig, TrainConfig
from pipelines.tasks.base import Inputs, parse_options, register_task
from pipelines.tasks.classification import ClassificationTask


class DBNOptions(BaseModel):
    """``task_options`` of ``dbn_classification``."""

    model_config = ConfigDict(extra="forbid")
    pretrained: str | None = Field(
        None, description="models:/NAME@ALIAS or a .keras DBN; default: pre-train here"
    )
    epochs_per_layer: list[int] = Field(
        [5, 5, 5], description="greedy pre-training epochs of each RBM"
    )
    cd_k: int = Field(1, ge=1)
    persistent: bool = False
    binarize: float | None = Field(0.5, gt=0.0, lt=1.0)
    learning_rate: float = Field(0.05, gt=0.0, description="pre-training SGD learning rate")
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    batch_size: int = Field(64, ge=1)


@register_task("dbn_classification")
class DBNClassificationTask(ClassificationTask):
    """Classification with a ``dbn_classifier`` whose layers start from a DBN pre-trained
    greedily with contrastive divergence (Hinton, Osindero & Teh 2006; fine-tuning by
    backpropagation as in Hinton & Salakhutdinov 2006)."""

    def __init__(self, config: ExperimentConfig):
        # The pre-training options are this task's; the rest go to the classification task.
        own = set(DBNOptions.model_fields)
        rest = {k: v for k, v in config.task_options.items() if k not in own}
        try:
            super().__init__(config.model_copy(update={"task_options": rest}))
        except ConfigError as exc:
            accepted = ", ".join(sorted(own))
            raise ConfigError(f"{exc}\n  (dbn_classification also accepts: {accepted})") from None
        self.config = config
        if config.model.name != "dbn_classifier":
            raise ConfigError(
                "model.name: task 'dbn_classification' fine-tunes 'dbn_classifier'; "
                f"received {config.model.name!r}."
            )
        mine = {k: v for k, v in config.task_options.items() if k in own}
        self.dbn_options: DBNOptions = parse_options(DBNOptions, mine, "dbn_classification")
        self.pretraining: dict[str, Any] = {}

    def build_model(self, info: dict[str, Any]):
        from models.rbm import load_dbn_weights

        classifier = super().build_model(info)
        dbn = self.pretrained_dbn(info)
        copied = load_dbn_weights(classifier, dbn)
        self.pretraining["layers_copied"] = copied
        return classifier

    def pretrained_dbn(self, info: dict[str, Any]):
        import keras

        opts = self.dbn_options
        units = self.config.model.kwargs().get("hidden_units", [500, 500, 2000])
        if opts.pretrained:
            if opts.pretrained.startswith("models:/"):
                import mlflow

                dbn = mlflow.keras.load_model(opts.pretrained)
            else:
                dbn = keras.saving.load_model(opts.pretrained)
            self.pretraining = {"kind": "loaded", "uri": opts.pretrained}
            return dbn
        from pipelines.trainers import generative as gen
        from pipelines.optim import build_optimizer

        cfg = self.config
        arrays = load_image_arrays(
            ImageInputSpec(
                name=cfg.data.name,
                batch_size=opts.batch_size,
                seed=cfg.runtime.seed,
                data_dir=cfg.data.dir,
                image_size=cfg.data.image_size,
                channels=cfg.data.channels,
                options=cfg.data.options(),
            )
        )
        x, y = arrays["train"]
        x = binarize(x, opts.binarize)
        dbn = models.create_model(
            "dbn", input_shape=tuple(info["image_shape"]), hidden_units=list(units)
        )
        trainer = gen.RBMTrainer(
            dbn,
            cd_k=opts.cd_k,
            persistent=opts.persistent,
            batch_size=opts.batch_size,
            seed=self.config.runtime.seed,
        )
        layers = len(trainer.rbms)
        if len(opts.epochs_per_layer) != layers:
            raise ConfigError(
                f"task_options.epochs_per_layer: {len(opts.epochs_per_layer)} entries "
                f"for {layers} RBMs."
            )
        gen.init_visible_bias(trainer.rbms[0], x)
        train_cfg = TrainConfig.model_validate(
            {
                "learning_rate": opts.learning_rate,
                "optimizer": {"name": "sgd", "momentum": opts.momentum},
                "batch_size": opts.batch_size,
            }
        )
        steps = len(x) // opts.batch_size
        trainer.compile([build_optimizer(train_cfg, steps) for _ in range(layers)])
        schedule = gen.GreedyLayerSchedule(opts.epochs_per_layer)
        hist = trainer.fit(
            repeating_dataset(x, y, opts.batch_size, self.config.runtime.seed),
            epochs=sum(opts.epochs_per_layer),
            steps_per_epoch=steps,
            callbacks=[schedule],
            verbose=self.config.train.verbose,
        )
        self.pretraining = {
            "kind": "pretrained_in_run",
            "epochs_per_layer": opts.epochs_per_layer,
            "cd_k": opts.cd_k,
            "persistent": opts.persistent,
            "binarize": opts.binarize,
            "learning_rate": opts.learning_rate,
            "final_recon_error": float(hist.history["recon_error"][-1]),
        }
        return dbn

    def write_artifacts(self, model, history, inputs: Inputs, out_dir: Path) -> None:
        super().write_artifacts(model, history, inputs, out_dir)
        (out_dir / "pretraining.json").write_text(json.dumps(self.pretraining, indent=2))
