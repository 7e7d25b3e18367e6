"""Generative modelling (the survey's section II.4): RBM/DBN, VAE, GAN, DCGAN and DRAW
trained through the shared driver, evaluated in nats and in LeNet-5 feature space, with
``generate`` serving signatures.

The model named in the config is built with ``models.create_model`` and wrapped in its
family's trainer (``pipelines.trainers``), the ``keras.Model`` whose ``train_step`` is its
training algorithm. The trainer is chosen once, from the model's family; everything that
differs by family (config rules, metrics, optimizers, sampling, likelihoods, signatures,
pictures) is a method of it, so this task never asks which family it trains.

Images come from the dataset catalog in [0, 1]; ``task_options.binarize`` thresholds
them (at 0.5 for the Bernoulli models, as the configs say) for training and the
likelihood evaluation, while the Fréchet distance always compares samples with the
un-binarised test images. ``task_options.validation_size`` images are held out of the
training split for ``val_*`` metrics and early stopping, so the test split stays unseen
until ``evaluate``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from pipelines.config import ConfigError, ExperimentConfig
from pipelines.tasks.base import (
    DatasetInfo,
    Evaluation,
    Inputs,
    RunContext,
    Serving,
    Task,
    first_batch,
    register_task,
)

SAMPLE_METRICS = ("fid", "confident_share", "min_class_share")
REFERENCE_METRICS = ("fid_real", "fid_untrained", "fid_relative", "confident_share_real")


class GenerationOptions(BaseModel):
    """``task_options`` of the generation task."""

    model_config = ConfigDict(extra="forbid")
    binarize: float | None = Field(
        None, gt=0.0, lt=1.0, description="threshold pixels in [0, 1] at this value"
    )
    validation_size: int = Field(
        1000, ge=0, description="training images held out for val_* metrics"
    )
    cd_k: int = Field(1, ge=1, description="RBM: Gibbs steps of contrastive divergence")
    persistent: bool = Field(False, description="RBM: persistent CD (Tieleman 2008)")
    epochs_per_layer: list[int] | None = Field(
        None, description="DBN: epochs of each RBM; default splits train.epochs"
    )
    gibbs_steps: int = Field(
        200, ge=1, description="RBM/DBN: Gibbs sweeps in the top RBM per sample"
    )
    iw_samples: int = Field(50, ge=1, description="VAE/DRAW: k of the importance-weighted bound")
    fid_samples: int = Field(2000, ge=10, description="generated images for the Fréchet distance")
    fid_classifier: str | None = Field(
        None, description="models:/NAME@ALIAS or .keras; default: train LeNet-5 here"
    )
    fid_classifier_epochs: int = Field(20, ge=1, description="epochs of the LeNet-5 trained here")
    reference_fids: bool = Field(
        True, description="also report real-vs-real and untrained-network distances"
    )
    sample_every: int = Field(1, ge=0, description="epochs between sample grids (0: none)")
    arithmetic: list[int] = Field(
        [7, 1, 9], min_length=3, max_length=3, description="groups A, B, C of A - B + C"
    )
    pll_draws: int = Field(5, ge=1, description="RBM/DBN: bit flips per pseudo-likelihood image")
    eval_batch: int = Field(500, ge=1, description="images per evaluation batch")
    max_train_minutes: float | None = Field(
        None, gt=0.0, description="stop training after this wall time"
    )


@dataclass
class GenerationInfo(DatasetInfo):
    """The generation task's ``dataset_info.json`` (``num_eval``: the validation images
    the driver evaluates each epoch; ``num_test``: the test images of ``evaluate``)."""

    family: str = ""
    image_shape: list[int] = field(default_factory=list)
    raw_shape: list[int] = field(default_factory=list)
    num_classes: int = 0
    class_names: list[str] = field(default_factory=list)
    num_validation: int = 0
    num_test: int = 0
    binarize: float | None = None
    gibbs_steps: int = 200


@dataclass
class GenerationData:
    """The arrays ``evaluate`` needs: the splits in [0, 1] (the feature classifier and the
    Fréchet distance see these) and the test images as the model sees them."""

    train: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]
    test_model: np.ndarray
    fit_images: np.ndarray  # the training images as the model sees them
    fingerprint: str


def _image_spec(config: ExperimentConfig):
    from data.images import ImageInputSpec

    return ImageInputSpec(
        name=config.data.name,
        batch_size=config.train.batch_size,
        seed=config.runtime.seed,
        data_dir=config.data.dir,
        image_size=config.data.image_size,
        channels=config.data.channels,
        options=config.data.options(),
    )


@register_task("generation")
class GenerationTask(Task):
    """Train a generative network with its own algorithm; evaluate likelihoods and
    sample quality; export ``generate`` signatures."""

    Options = GenerationOptions
    Info = GenerationInfo

    def __init__(self, context: RunContext):
        super().__init__(context)
        self.check(self.config, self.options)
        import models
        from pipelines.trainers import trainer_class

        self.family = models.model_info(self.config.model.name).family  # dataset_info.json
        self.trainer_class = trainer_class(self.config.model.name)  # chosen once

    # -- config checks ------------------------------------------------------------------
    @classmethod
    def check(cls, config: ExperimentConfig, options: GenerationOptions) -> None:
        from pipelines.trainers import trainer_class

        trainer_class(config.model.name).check(config, options)

    @classmethod
    def metric_names(cls, config: ExperimentConfig, options: GenerationOptions) -> tuple[str, ...]:
        from pipelines.trainers import trainer_class

        names = trainer_class(config.model.name).metric_names(config, options)
        references = REFERENCE_METRICS if options.reference_fids else ()
        return tuple(dict.fromkeys((*names, *SAMPLE_METRICS, *references)))

    # -- data ---------------------------------------------------------------------------
    def build_inputs(self) -> Inputs:
        from data.arrays import batched, binarize, repeating_dataset
        from data.images import load_image_arrays
        from data.splits import stratified_split

        cfg, opts, ctx = self.config, self.options, self.context
        arrays = load_image_arrays(_image_spec(cfg))
        x, y = arrays["train"]
        if opts.validation_size >= len(x):
            raise ConfigError(
                f"task_options.validation_size: {opts.validation_size} leaves no training images "
                f"(the training split has {len(x)})."
            )
        if opts.validation_size:
            train_idx, val_idx = stratified_split(y, opts.validation_size, cfg.runtime.seed)
        else:
            train_idx, val_idx = np.arange(len(x)), np.arange(0)
        model_x = binarize(x, opts.binarize)
        fit = (model_x[train_idx], y[train_idx])
        val = (model_x[val_idx], y[val_idx]) if len(val_idx) else fit
        batch = cfg.train.batch_size
        if batch > len(train_idx):
            raise ConfigError(
                f"train.batch_size: {batch} exceeds the {len(train_idx)} training images."
            )
        steps = cfg.train.steps_per_epoch or len(train_idx) // batch
        # the stream of an uninterrupted run, from where a resumed run continues
        train = repeating_dataset(*fit, batch, cfg.runtime.seed)
        if ctx.start_epoch or ctx.start_step:
            train = train.skip(ctx.start_epoch * steps + ctx.start_step)
        evals = batched(*val, batch)
        test = arrays["test"]
        return Inputs(
            train=train,
            eval=evals,
            steps_per_epoch=steps,
            info=GenerationInfo(
                dataset=cfg.data.name,
                num_train=int(len(train_idx)),
                num_eval=int(len(val[0])),
                source=arrays["source"],
                family=self.family,
                image_shape=list(x.shape[1:]),
                raw_shape=arrays["raw_shape"],
                num_classes=len(arrays["class_names"]),
                class_names=arrays["class_names"],
                num_validation=int(len(val_idx)),
                num_test=int(len(test[0])),
                binarize=opts.binarize,
                gibbs_steps=opts.gibbs_steps,
            ),
            check_batch=first_batch(evals),
            fingerprint=arrays["fingerprint"],
            data=GenerationData(
                train=arrays["train"],
                test=test,
                test_model=binarize(test[0], opts.binarize),
                fit_images=fit[0],
                fingerprint=arrays["fingerprint"],
            ),
        )

    # -- model ----------------------------------------------------------------------------
    def build_network(self, info: GenerationInfo):
        import models

        kwargs = {"input_shape": tuple(info.image_shape), **self.config.model.kwargs()}
        return models.create_model(self.config.model.name, **kwargs)

    def build_model(self, inputs: Inputs):
        cfg = self.config
        trainer = self.trainer_class.for_config(self.build_network(inputs.info), cfg, self.options)
        trainer.compile_for(
            cfg.train,
            inputs.steps_per_epoch,
            images=inputs.data.fit_images,
            jit_compile=cfg.runtime.jit_compile,
        )
        return trainer

    def callbacks(self, inputs: Inputs, run_dir: Path) -> list:
        from pipelines.callbacks import TimeLimit
        from pipelines.trainers.base import SampleGrids

        out = list(self.trainer_class.callbacks(self.config, self.options))
        if self.options.max_train_minutes:
            restore = self.trainer_class.restore_best_weights
            out.append(TimeLimit(self.options.max_train_minutes * 60.0, restore_best=restore))
        if self.options.sample_every:
            folder = run_dir / "artifacts" / "samples"
            out.append(SampleGrids(folder, self.options.sample_every))
        return out

    # -- evaluation ---------------------------------------------------------------------
    def feature_classifier(self, data: GenerationData):
        """The LeNet-5 whose F6 features the Fréchet distance compares: registered or a
        file (``task_options.fid_classifier``), else trained on the training split (and
        cached under the work dir, keyed by the data and its epochs)."""
        from pipelines.evaluation import sample_quality as ev

        cfg, opts = self.config, self.options
        if opts.fid_classifier:
            return ev.load_feature_classifier(opts.fid_classifier, data.test)
        shape = "x".join(str(d) for d in data.train[0].shape[1:])
        cache = (
            Path(cfg.runtime.work_dir)
            / "_fid_classifiers"
            / f"lenet5-{cfg.data.name}-{data.fingerprint}-{shape}"
            f"-e{opts.fid_classifier_epochs}.keras"
        )
        return ev.train_feature_classifier(
            data.train,
            data.test,
            cache,
            seed=cfg.runtime.seed,
            epochs=opts.fid_classifier_epochs,
            source=f"{cfg.data.name}:{data.fingerprint} train split",
        )

    def evaluate(self, model, inputs: Inputs) -> Evaluation:
        import keras

        from data.arrays import batched
        from pipelines.evaluation import sample_quality as ev

        cfg, opts, data = self.config, self.options, inputs.data
        test_x, test_y = data.test_model, data.test[1]
        batches = batched(test_x, test_y, opts.eval_batch)
        losses = model.evaluate(batches, return_dict=True, verbose=0)
        metrics = {k: float(v) for k, v in losses.items()}
        metrics.update(model.likelihood_metrics(test_x, opts, seed=cfg.runtime.seed))

        # sample quality in LeNet-5 feature space
        clf = self.feature_classifier(data)
        real = data.test[0]
        real_feats, real_probs = clf.features_and_probs(real)
        samples = model.sample(opts.fid_samples, seed=0)
        metrics.update(ev.sample_quality(clf, samples, real_feats))
        if opts.reference_fids:
            train_feats, _ = clf.features_and_probs(data.train[0][: len(real)])
            metrics["fid_real"] = ev.frechet_distance(train_feats, real_feats)
            metrics["confident_share_real"] = float(np.mean(real_probs.max(1) > ev.CONFIDENCE))
            keras.utils.set_random_seed(cfg.runtime.seed)
            untrained = self.trainer_class.for_network(self.build_network(inputs.info), inputs.info)
            untrained_samples = untrained.sample(opts.fid_samples, seed=0)
            metrics["fid_untrained"] = ev.sample_quality(clf, untrained_samples, real_feats)["fid"]
            metrics["fid_relative"] = ev.relative_distance(
                metrics["fid"], metrics["fid_real"], metrics["fid_untrained"]
            )
        _, probs = clf.features_and_probs(samples)
        labels = probs.argmax(1)
        record = {
            "class_shares": (np.bincount(labels, minlength=probs.shape[1]) / len(probs)).tolist(),
            "fid_classifier": clf.record,
            "protocol": f"{opts.fid_samples} samples (seeds 0..) vs the {len(real)} test "
            "images, LeNet-5 F6 features",
        }

        def write_samples(out_dir: Path) -> None:
            ev.save_grid(samples[:100], out_dir / "samples.png", columns=10)
            (out_dir / "sample_quality.json").write_text(json.dumps(record, indent=2))

        artifacts = [
            write_samples,
            *model.artifacts(test_x, test_y, labels, tuple(opts.arithmetic)),
        ]
        tags = {f"fid_classifier.{k}": str(v) for k, v in clf.record.items()}
        return Evaluation(metrics=metrics, tags=tags, artifacts=artifacts)

    # -- serving ------------------------------------------------------------------------
    def serving(self, model, info: GenerationInfo, check_batch: Any = None) -> Serving:
        """The network and its ``generate`` signatures. ``model`` is the trainer after
        training, or the logged network when a registered version is exported again."""
        from pipelines.trainers.base import GenerativeTrainer

        if isinstance(model, GenerativeTrainer):
            trainer = model
        else:
            trainer = self.trainer_class.for_network(model, info)
        images = None if check_batch is None else np.asarray(check_batch[0], np.float32)
        return Serving(model=trainer.network, endpoints=trainer.endpoints(images))
