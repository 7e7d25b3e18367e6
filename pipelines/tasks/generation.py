"""Generative modelling (the survey's section II.4): RBM/DBN, VAE, GAN, DCGAN and DRAW
trained through the shared driver, evaluated in nats and in LeNet-5 feature space, with
``generate`` serving signatures.

The model named in the config is built with ``models.create_model`` and wrapped in the
``keras.Model`` whose ``train_step`` is its training algorithm (``pipelines.trainers.generative``).
Images come from the dataset catalog in [0, 1]; ``task_options.binarize`` thresholds
them (at 0.5 for the Bernoulli models, as the configs say) for training and the
likelihood evaluation, while the Fréchet distance always compares samples with the
un-binarised test images. ``task_options.validation_size`` images are held out of the
training split for ``val_*`` metrics and early stopping, so the test split stays unseen
until ``evaluate``.

Also ``dbn_classification``: a ``dbn_classifier`` initialised from a greedily
pre-trained DBN (trained here, or loaded from the registry) and fine-tuned by
backpropagation, the 2006 recipe.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import keras
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

import models
from pipelines.config import ConfigError, ExperimentConfig
from data.arrays import batched, binarize, repeating_dataset
from data.images import ImageInputSpec, load_image_arrays
from pipelines.callbacks import TimeLimit
from pipelines.tasks.base import Endpoint, Inputs, Task, parse_options, register_task


def image_spec(config: ExperimentConfig) -> ImageInputSpec:
    """The image data of a config, read as arrays (no batching or augmentation here)."""
    return ImageInputSpec(
        name=config.data.name,
        batch_size=config.train.batch_size,
        seed=config.runtime.seed,
        data_dir=config.data.dir,
        image_size=config.data.image_size,
        channels=config.data.channels,
        options=config.data.options(),
    )

log = logging.getLogger(__name__)

FAMILIES = {
    "rbm": "rbm",
    "dbn": "rbm",
    "vae": "vae",
    "gan": "gan",
    "dcgan": "gan",
    "draw": "draw",
    "draw_no_attention": "draw",
}


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
    pll_draws: int = Field(5, ge=1)
    eval_batch: int = Field(500, ge=1)
    max_train_minutes: float | None = Field(
        None, gt=0.0, description="stop training after this wall time"
    )


# ------------------------------------------------------------------------------ task


@register_task("generation")
class GenerationTask(Task):
    """Train a generative network with its own algorithm; evaluate likelihoods and
    sample quality; export ``generate`` signatures."""

    metric_names = (
        "loss",
        "neg_elbo",
        "iw_neg_elbo",
        "recon_error",
        "pseudo_log_likelihood",
        "free_energy",
        "fid",
        "confident_share",
        "min_class_share",
        "fid_real",
        "fid_untrained",
        "fid_relative",
        "confident_share_real",
    )

    def __init__(self, config: ExperimentConfig):
        super().__init__(config)
        family = FAMILIES.get(config.model.name)
        if family is None:
            raise ConfigError(
                f"model.name: task 'generation' trains {', '.join(sorted(FAMILIES))}; "
                f"received {config.model.name!r}."
            )
        self.family = family
        self.options: GenerationOptions = parse_options(
            GenerationOptions, config.task_options, "generation"
        )
        likelihood = config.model.kwargs().get("likelihood", "bernoulli")
        if family == "vae" and likelihood == "gaussian" and self.options.binarize is not None:
            raise ConfigError(
                "task_options.binarize: a Gaussian likelihood (model.likelihood: gaussian) "
                "needs grey pixels, but binarize is "
                f"{self.options.binarize}; set task_options.binarize: null."
            )
        if family in ("rbm",) and self.options.binarize is None:
            log.warning(
                "%s: a Bernoulli RBM on grey pixels; set task_options.binarize: 0.5", config.name
            )
        self.arrays: dict[str, Any] | None = None
        self._classifier = None
        self._eval: dict[str, Any] = {}

    # -- data -------------------------------------------------------------------------
    def build_inputs(self) -> Inputs:
        from data.splits import stratified_split

        cfg, opts = self.config, self.options
        arrays = load_image_arrays(image_spec(cfg))
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
        arrays["fit"] = (model_x[train_idx], y[train_idx])
        arrays["val"] = (model_x[val_idx], y[val_idx]) if len(val_idx) else arrays["fit"]
        arrays["test_model"] = binarize(arrays["test"][0], opts.binarize)
        self.arrays = arrays
        batch = cfg.train.batch_size
        if batch > len(train_idx):
            raise ConfigError(
                f"train.batch_size: {batch} exceeds the {len(train_idx)} training images."
            )
        steps = cfg.train.steps_per_epoch or len(train_idx) // batch
        train = repeating_dataset(*arrays["fit"], batch, cfg.runtime.seed)
        evals = batched(*arrays["val"], batch)
        image_shape = list(x.shape[1:])
        return Inputs(
            train=train,
            eval=evals,
            steps_per_epoch=steps,
            info={
                "dataset": cfg.data.name,
                "family": self.family,
                "image_shape": image_shape,
                "raw_shape": arrays["raw_shape"],
                "num_classes": len(arrays["class_names"]),
                "class_names": arrays["class_names"],
                "num_train": int(len(train_idx)),
                "num_validation": int(len(val_idx)),
                "num_test": int(len(arrays["test"][0])),
                "binarize": opts.binarize,
                "source": arrays["source"],
                "gibbs_steps": opts.gibbs_steps,
            },
            fingerprint=arrays["fingerprint"],
        )

    # -- model ------------------------------------------------------------------------
    def build_network(self, info: dict[str, Any]):
        kwargs = {"input_shape": tuple(info["image_shape"]), **self.config.model.kwargs()}
        return models.create_model(self.config.model.name, **kwargs)

    def build_model(self, info: dict[str, Any]):
        from pipelines.trainers import generative as gen

        network = self.build_network(info)
        seed = self.config.runtime.seed
        if self.family == "rbm":
            trainer = gen.RBMTrainer(
                network,
                cd_k=self.options.cd_k,
                persistent=self.options.persistent,
                batch_size=self.config.train.batch_size,
                seed=seed,
            )
            self._layers = len(trainer.rbms)
            self.epochs_per_layer(self._layers)  # a bad list fails before training
            return trainer
        if self.family == "vae":
            return gen.VAETrainer(network, seed=seed)
        if self.family == "gan":
            return gen.GANTrainer(
                network, label_smoothing=self.config.train.label_smoothing, seed=seed
            )
        return gen.DRAWTrainer(network, seed=seed)

    def compile_model(self, model, inputs: Inputs) -> None:
        from pipelines.optim import build_optimizer
        from pipelines.trainers import generative as gen

        train, steps, jit = (
            self.config.train,
            inputs.steps_per_epoch,
            self.config.runtime.jit_compile,
        )
        if self.family == "rbm":
            gen.init_visible_bias(model.rbms[0], self.arrays["fit"][0])
            # each RBM's optimizer, and so its learning-rate schedule, spans its own epochs
            model.compile(
                [
                    build_optimizer(train.model_copy(update={"epochs": e}), steps)
                    for e in self.epochs_per_layer(len(model.rbms))
                ],
                jit_compile=jit,
            )
        elif self.family == "gan":
            model.compile(
                build_optimizer(train, steps), build_optimizer(train, steps), jit_compile=jit
            )
        else:
            model.compile(optimizer=build_optimizer(train, steps), jit_compile=jit)

    def epochs_per_layer(self, layers: int) -> list[int]:
        if self.options.epochs_per_layer is not None:
            if len(self.options.epochs_per_layer) != layers:
                raise ConfigError(
                    f"task_options.epochs_per_layer: {len(self.options.epochs_per_layer)} "
                    f"entries for {layers} RBMs."
                )
            epochs = list(self.options.epochs_per_layer)
        else:
            epochs = [max(1, self.config.train.epochs // layers)] * layers
        # the top RBM trains for any epochs left over (GreedyLayerSchedule does the same)
        epochs[-1] = max(epochs[-1], self.config.train.epochs - sum(epochs[:-1]))
        return epochs

    def callbacks(self, run_dir: Path, inputs: Inputs) -> list:
        from pipelines.trainers import generative as gen

        out = []
        if self.family == "rbm":
            out.append(gen.GreedyLayerSchedule(self.epochs_per_layer(self._layers)))
        if self.options.max_train_minutes:
            out.append(
                TimeLimit(
                    self.options.max_train_minutes * 60.0,
                    restore_best=self.family in ("vae", "draw"),
                )
            )
        if self.options.sample_every:
            out.append(
                SampleGrids(self, run_dir / "artifacts" / "samples", self.options.sample_every)
            )
        return out

    # -- sampling -----------------------------------------------------------------------
    def sample(self, network, n: int, seed: int = 0, batch: int = 500) -> np.ndarray:
        """``n`` images in [0, 1]; GAN/VAE/DRAW image ``i`` is that of seed ``seed + i``."""
        import tensorflow as tf

        from pipelines.trainers import generative as gen

        if self.family == "rbm":
            return gen.rbm_generate_batch(network, n, seed, self.options.gibbs_steps, batch)
        shape = gen.latent_shape(self.family, network)
        out = []
        for start in range(0, n, batch):
            seeds = tf.range(seed + start, seed + min(n, start + batch), dtype=tf.int64)
            z = gen.latents_from_seeds(seeds, shape)
            out.append(np.asarray(gen.decode_latents(self.family, network, z)))
        return np.concatenate(out)

    # -- evaluation ---------------------------------------------------------------------
    def feature_classifier(self):
        from pipelines.evaluation import sample_quality as ev

        if self._classifier is None:
            arrays, opts = self.arrays, self.options
            if opts.fid_classifier:
                self._classifier = ev.load_feature_classifier(opts.fid_classifier, arrays["test"])
            else:
                shape = "x".join(str(d) for d in arrays["train"][0].shape[1:])
                cache = (
                    Path(self.config.runtime.work_dir)
                    / "_fid_classifiers"
                    / f"lenet5-{self.config.data.name}-{arrays['fingerprint']}-{shape}"
                    f"-e{opts.fid_classifier_epochs}.keras"
                )
                self._classifier = ev.train_feature_classifier(
                    arrays["train"],
                    arrays["test"],
                    cache,
                    seed=self.config.runtime.seed,
                    epochs=opts.fid_classifier_epochs,
                    source=f"{self.config.data.name}:{arrays['fingerprint']} train split",
                )
        return self._classifier

    def evaluate(self, model, inputs: Inputs) -> dict[str, float]:
        import tensorflow as tf

        from pipelines.trainers import generative as gen
        from pipelines.evaluation import sample_quality as ev

        opts, arrays = self.options, self.arrays
        network = model.network
        test_x, test_y = arrays["test_model"], arrays["test"][1]
        metrics = {
            k: float(v)
            for k, v in model.evaluate(
                batched(test_x, test_y, opts.eval_batch), return_dict=True, verbose=0
            ).items()
        }
        if self.family in ("vae", "draw"):
            elbo, iw = [], []
            for i in range(0, len(test_x), opts.eval_batch):
                log_w = model.log_weights(
                    tf.constant(test_x[i : i + opts.eval_batch]), opts.iw_samples, seed=i
                )
                elbo.append(-tf.reduce_mean(log_w, axis=0).numpy())
                iw.append(-(tf.reduce_logsumexp(log_w, axis=0) - np.log(opts.iw_samples)).numpy())
            metrics["neg_elbo"] = float(np.mean(np.concatenate(elbo)))
            metrics["iw_neg_elbo"] = float(np.mean(np.concatenate(iw)))
        if self.family == "rbm":
            flat = test_x.reshape(len(test_x), -1)
            metrics["recon_error"] = metrics.pop("recon_error", float("nan"))
            first = model.rbms[0]
            metrics["pseudo_log_likelihood"] = gen.pseudo_log_likelihood(
                first, flat, opts.pll_draws, self.config.runtime.seed
            )
            metrics["free_energy"] = float(tf.reduce_mean(first.free_energy(tf.constant(flat))))
        # sample quality in LeNet-5 feature space
        clf = self.feature_classifier()
        real = arrays["test"][0]
        real_feats, real_probs = clf.features_and_probs(real)
        n = opts.fid_samples
        samples = self.sample(network, n, seed=0)
        metrics.update(ev.sample_quality(clf, samples, real_feats))
        if opts.reference_fids:
            train_feats, _ = clf.features_and_probs(arrays["train"][0][: len(real)])
            metrics["fid_real"] = ev.frechet_distance(train_feats, real_feats)
            metrics["confident_share_real"] = float(np.mean(real_probs.max(1) > ev.CONFIDENCE))
            import keras

            keras.utils.set_random_seed(self.config.runtime.seed)
            untrained = self.build_network(inputs.info)
            metrics["fid_untrained"] = ev.sample_quality(
                clf, self.sample(untrained, n, seed=0), real_feats
            )["fid"]
            metrics["fid_relative"] = ev.relative_distance(
                metrics["fid"], metrics["fid_real"], metrics["fid_untrained"]
            )
        _, probs = clf.features_and_probs(samples)
        self._eval = {
            "samples": samples,
            "sample_labels": probs.argmax(1),
            "class_shares": (
                np.bincount(probs.argmax(1), minlength=probs.shape[1]) / len(probs)
            ).tolist(),
            "classifier": clf.record,
        }
        self._tag_classifier(clf.record)
        return metrics

    def _tag_classifier(self, record: dict) -> None:
        try:
            import mlflow

            if mlflow.active_run() is not None:
                mlflow.set_tags({f"fid_classifier.{k}": str(v) for k, v in record.items()})
        except Exception as exc:  # tracking is optional here; the record is also an artifact
            log.warning("could not tag the FID classifier: %s", exc)

    def write_artifacts(self, model, history, inputs: Inputs, out_dir: Path) -> None:
        from pipelines.evaluation import sample_quality as ev
        from pipelines import plots

        plots.learning_curves(history, out_dir / "learning_curves.png", title=self.config.name)
        network = model.network
        ev_state = self._eval
        if "samples" in ev_state:
            ev.save_grid(ev_state["samples"][:100], out_dir / "samples.png", columns=10)
            (out_dir / "sample_quality.json").write_text(
                json.dumps(
                    {
                        "class_shares": ev_state["class_shares"],
                        "fid_classifier": ev_state["classifier"],
                        "protocol": f"{self.options.fid_samples} samples (seeds 0..) vs the "
                        f"{len(self.arrays['test'][0])} test images, LeNet-5 F6 features",
                    },
                    indent=2,
                )
            )
        test_x = self.arrays["test_model"]
        if self.family == "rbm":
            write_rbm_artifacts(model, test_x, out_dir)
        else:
            write_latent_artifacts(self, network, out_dir)

    # -- serving ------------------------------------------------------------------------
    def serving_model(self, model):
        return model.network

    def endpoints(self, model, info: dict[str, Any], check_batch: Any = None) -> list[Endpoint]:
        import tensorflow as tf

        from pipelines.trainers import generative as gen

        family = info.get("family", self.family)
        seed_spec = tf.TensorSpec([None], tf.int64, name="seed")
        seeds = np.arange(4, dtype=np.int64)

        def outputs(pixels, canvases=None):
            out = {"images": gen.to_uint8(pixels), "pixels": tf.cast(pixels, tf.float32)}
            if canvases is not None:
                out["canvases"] = gen.to_uint8(canvases)
            return out

        if family == "rbm":
            steps = int(info.get("gibbs_steps", self.options.gibbs_steps))

            def generate_rbm(seed):
                return outputs(gen.rbm_generate(model, seed, steps))

            return [Endpoint("serving_default", generate_rbm, [seed_spec], [seeds])]

        shape = gen.latent_shape(family, model)
        latent_spec = tf.TensorSpec([None, *shape], tf.float32, name="latents")
        latents = np.random.default_rng(0).standard_normal((4, *shape)).astype(np.float32)

        def from_latents(z):
            if family == "draw":
                canvases = gen.decode_latents(family, model, z, all_steps=True)
                return outputs(canvases[:, -1], canvases)
            return outputs(gen.decode_latents(family, model, z))

        def generate(seed):
            return from_latents(gen.latents_from_seeds(seed, shape))

        eps = [
            Endpoint("serving_default", generate, [seed_spec], [seeds]),
            Endpoint("generate_latents", from_latents, [latent_spec], [latents]),
        ]
        if family == "vae":
            h, w, c = (int(d) for d in info["image_shape"])
            images_spec = tf.TensorSpec([None, h, w, c], tf.float32, name="images")
            encoder = model.get_layer("encoder")
            if check_batch is not None:
                images = np.asarray(check_batch[0], np.float32)[:4]
            else:
                images = np.random.default_rng(0).uniform(size=(4, h, w, c)).astype(np.float32)

            def encode(images):
                mean, log_var = encoder(images, training=False)
                return {"z_mean": mean, "z_log_var": log_var}

            eps.append(Endpoint("encode", encode, [images_spec], [images]))
            eps.append(Endpoint("decode", from_latents, [latent_spec], [latents]))
        return eps


def write_rbm_artifacts(model, test_x: np.ndarray, out_dir: Path) -> None:
    from pipelines.evaluation import sample_quality as ev

    first = model.rbms[0]
    shape = test_x.shape[1:]
    kernel = np.asarray(first.kernel).T[:100]  # [units, V]
    lo, hi = kernel.min(1, keepdims=True), kernel.max(1, keepdims=True)
    filters = ((kernel - lo) / np.maximum(hi - lo, 1e-8)).reshape((-1, *shape))
    ev.save_grid(filters, out_dir / "rbm1_filters.png", columns=10)
    flat = test_x[:10].reshape(10, -1)
    x = flat
    for layer in model.rbms:
        x = layer.hidden_probs(x)
    for layer in reversed(model.rbms):
        x = layer.visible_probs(x)
    pairs = np.concatenate([test_x[:10], np.asarray(x).reshape((-1, *shape))])
    ev.save_grid(pairs, out_dir / "reconstructions.png", columns=10)


def write_latent_artifacts(task: GenerationTask, network, out_dir: Path) -> None:
    """Interpolations, vector arithmetic and (VAE/DRAW) reconstructions; DRAW's canvas GIF."""
    import tensorflow as tf

    from pipelines.trainers import generative as gen
    from pipelines.evaluation import sample_quality as ev

    family = task.family
    shape = gen.latent_shape(family, network)

    def decode(z):
        return np.asarray(
            gen.decode_latents(family, network, tf.constant(np.asarray(z, np.float32)))
        )

    seeds = tf.range(0, 16, dtype=tf.int64)
    z = gen.latents_from_seeds(seeds, shape).numpy()
    rows = [ev.interpolate(z[2 * i], z[2 * i + 1], 10, spherical=True) for i in range(8)]
    ev.save_grid(decode(np.concatenate(rows)), out_dir / "interpolation.png", columns=10)

    # vector arithmetic: groups by label (VAE: encoded test images) or by the classifier's
    # label of generated samples (GAN, DRAW)
    a, b, c = task.options.arithmetic
    if family == "vae":
        test_x, test_y = task.arrays["test_model"], task.arrays["test"][1]
        latents = np.asarray(network.get_layer("encoder")(test_x[:2000], training=False)[0])
        groups, how = test_y[: len(latents)], "labels of encoded test images"
    else:
        n = len(task._eval.get("sample_labels", []))
        latents = (
            gen.latents_from_seeds(tf.range(0, n, dtype=tf.int64), shape).numpy()
            if n
            else np.zeros((0, *shape))
        )
        groups, how = (
            task._eval.get("sample_labels", np.zeros(0)),
            "LeNet-5 labels of generated samples",
        )
    try:
        res = ev.latent_arithmetic(latents, groups, a, b, c, noise_scale=0.25, count=7, seed=0)
        panel = np.concatenate(
            [decode(np.stack([res["a"], res["b"], res["c"]])), decode(res["result"])]
        )
        ev.save_grid(panel, out_dir / "arithmetic.png", columns=10)
        (out_dir / "arithmetic.json").write_text(
            json.dumps(
                {
                    "expression": f"mean({a}) - mean({b}) + mean({c})",
                    "groups_by": how,
                    "panel": "A, B, C group means, then 7 results with noise 0.25",
                },
                indent=2,
            )
        )
    except ValueError as exc:
        log.warning("latent arithmetic skipped: %s", exc)
    if family in ("vae", "draw"):
        test_x = task.arrays["test_model"][:10]
        if family == "vae":
            mean, _ = network.get_layer("encoder")(test_x, training=False)
            recon = decode(mean)
        else:
            noise = np.zeros((len(test_x), *shape), np.float32)
            recon = tf.sigmoid(network([test_x, noise], training=False)[0][:, -1]).numpy()
        ev.save_grid(np.concatenate([test_x, recon]), out_dir / "reconstructions.png", columns=10)
    if family == "draw":
        canvases = np.asarray(gen.decode_latents(family, network, tf.constant(z), all_steps=True))
        ev.save_canvas_gif(canvases, out_dir / "canvas.gif", columns=8, scale=2)


class SampleGrids(keras.callbacks.Callback):
    """A grid of samples from fixed seeds every ``every`` epochs, into ``folder``."""

    def __init__(self, task: GenerationTask, folder: Path, every: int = 1, count: int = 64):
        super().__init__()
        self.task, self.folder, self.every, self.count = task, folder, every, count

    def on_epoch_end(self, epoch, logs=None):
        from pipelines.evaluation import sample_quality as ev

        if (epoch + 1) % self.every:
            return
        images = self.task.sample(self.model.network, self.count, seed=0, batch=self.count)
        ev.save_grid(images, self.folder / f"epoch_{epoch + 1:03d}.png")
