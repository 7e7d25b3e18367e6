"""The generation task: every family trains steps without NaN through its own
``train_step``, exports SavedModel signatures that reload with equal outputs, and samples
reproducibly; CD-1 lowers the free energy of the training data; the VAE's ELBO improves;
DCGAN's Fréchet distance beats the untrained generator's; latent tools return the right
shapes; bad task options are named. Runs on the embedded 8x8 digits (no MNIST needed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from pipelines.config import ConfigError, load_config  # noqa: E402
from pipelines.serving.export import write_saved_model  # noqa: E402
from pipelines.evaluation.sample_quality import (  # noqa: E402
    frechet_distance,
    interpolate,
    latent_arithmetic,
)
from pipelines.tasks.generation import GenerationTask  # noqa: E402

SMALL = {
    "rbm-digits": ["model.hidden_units=32"],
    "dbn": [
        "model.name=dbn",
        "model.hidden_units=[32,16]",
        "task_options.epochs_per_layer=[1,1]",
        "task_options.persistent=false",
    ],
    "vae-digits": [],
    "gan-digits": ["model.generator_units=[64]", "model.discriminator_units=[64]"],
    "dcgan-digits": [],
    "draw-digits": ["model.steps=4"],
    "draw_no_attention": [
        "model.name=draw_no_attention",
        "model.steps=4",
        "model.latent_dim=4",
        "model.encoder_units=32",
        "model.decoder_units=32",
    ],
}
BASE = {
    "rbm-digits": "rbm-digits",
    "dbn": "rbm-digits",
    "vae-digits": "vae-digits",
    "gan-digits": "gan-digits",
    "dcgan-digits": "dcgan-digits",
    "draw-digits": "draw-digits",
    "draw_no_attention": "draw-digits",
}


def make_task(key: str, tmp_path, *extra: str) -> GenerationTask:
    overrides = [
        *[o for o in SMALL[key] if not o.startswith("model.name=")],
        f"runtime.work_dir={tmp_path}",
        "train.verbose=0",
        "task_options.fid_samples=100",
        "task_options.iw_samples=3",
        "task_options.gibbs_steps=10",
        "task_options.sample_every=0",
        *extra,
    ]
    names = [o for o in SMALL[key] if o.startswith("model.name=")]
    config = load_config(BASE[key], names + overrides)
    return GenerationTask(config)


def build(task):
    keras.utils.set_random_seed(task.config.runtime.seed)
    inputs = task.build_inputs()
    model = task.build_model(inputs.info)
    task.compile_model(model, inputs)
    return inputs, model


@pytest.fixture(autouse=True)
def _digits(tfds_dir):
    return tfds_dir


@pytest.mark.parametrize("key", sorted(SMALL))
def test_trains_without_nan_exports_and_reloads(key, tmp_path):
    task = make_task(key, tmp_path, "train.steps_per_epoch=4", "train.epochs=2")
    inputs, model = build(task)
    history = model.fit(
        inputs.train,
        epochs=2,
        steps_per_epoch=4,
        validation_data=inputs.eval,
        callbacks=task.callbacks(tmp_path, inputs),
        verbose=0,
    ).history
    assert all(np.isfinite(v).all() for v in history.values()), history
    network = task.serving_model(model)
    endpoints = task.endpoints(network, inputs.info, task.check_batch(inputs))
    result = write_saved_model(
        network, endpoints, tmp_path / "serving" / "1", model_name=key, warmup_requests=1
    )
    names = {"serving_default"} | ({"generate_latents"} if task.family != "rbm" else set())
    names |= {"encode", "decode"} if task.family == "vae" else set()
    assert names <= set(result.signatures)
    assert result.max_abs_diff <= 1e-5
    reloaded = tf.saved_model.load(str(result.path))
    out = reloaded.signatures["serving_default"](seed=tf.constant([5, 6], tf.int64))
    assert out["images"].dtype == tf.uint8 and out["images"].shape[1:] == (8, 8, 1)
    if task.family == "draw":
        assert out["canvases"].shape[1] == network.get_layer("draw_core").steps
    # an image depends on its seed only, not on its batch
    alone = reloaded.signatures["serving_default"](seed=tf.constant([6], tf.int64))
    np.testing.assert_array_equal(out["images"][1].numpy(), alone["images"][0].numpy())


def test_every_model_of_the_task_has_a_case():
    """The cases above come from the task's own list of models and the registry: a model
    the generation task accepts, or a registered generative model, without a case fails."""
    import models
    from pipelines.tasks.generation import FAMILIES

    def model_name(key):
        named = [o.split("=", 1)[1] for o in SMALL[key] if o.startswith("model.name=")]
        return named[0] if named else load_config(BASE[key]).model.name

    assert {model_name(k) for k in SMALL} == set(FAMILIES)
    generative = {
        n for n in models.list_models() if models.model_module(n) in ("rbm", "vae", "gan", "draw")
    }
    # dbn_classifier is trained by the dbn_classification task (test_driver_runs_... below)
    assert generative - {"dbn_classifier"} == set(FAMILIES)


def test_gaussian_vae_trains_on_grey_pixels_and_exports(tmp_path):
    """``model.likelihood=gaussian``: grey pixels, a learned per-pixel scale, an ELBO that
    improves on its initial value; samples are the decoder's mean in [0, 1]."""
    with pytest.raises(ConfigError, match="task_options.binarize"):
        make_task("vae-digits", tmp_path, "model.likelihood=gaussian")
    task = make_task(
        "vae-digits", tmp_path, "model.likelihood=gaussian", "task_options.binarize=null"
    )
    inputs, model = build(task)
    x = task.arrays["fit"][0]
    assert 0.0 < np.mean((x > 0.05) & (x < 0.95)), "pixels should stay grey"
    initial = model.evaluate(inputs.eval, return_dict=True, verbose=0)["loss"]
    model.fit(inputs.train, epochs=4, steps_per_epoch=inputs.steps_per_epoch, verbose=0)
    final = model.evaluate(inputs.eval, return_dict=True, verbose=0)["loss"]
    assert np.isfinite(final) and final < initial - 50.0, (initial, final)
    scale = model.network.get_layer("decoder").get_layer("decoder_log_scale").log_scale
    assert not np.allclose(np.asarray(scale), np.log(0.1)), "the per-pixel scale did not learn"
    network = task.serving_model(model)
    endpoints = task.endpoints(network, inputs.info, task.check_batch(inputs))
    result = write_saved_model(
        network, endpoints, tmp_path / "serving" / "1", model_name="vae-gaussian", warmup_requests=1
    )
    assert {"serving_default", "encode", "decode"} <= set(result.signatures)
    assert result.max_abs_diff <= 1e-5


def test_dbn_trains_each_layer_in_turn_through_the_training_loop(tmp_path):
    """Through pipelines/loop.py (the driver's loop, not Keras fit): epoch 1 trains RBM 1
    only, epoch 2 RBM 2 only. Before the loop retraced on ``trace_key``, its step stayed
    traced for RBM 1 and the upper RBMs never trained."""
    from pipelines.loop import fit

    task = make_task("dbn", tmp_path)
    inputs, model = build(task)
    snapshots = [[np.array(r.kernel) for r in model.rbms]]
    record = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: snapshots.append([np.array(r.kernel) for r in model.rbms])
    )
    fit(
        model,
        tf.distribute.get_strategy(),
        inputs.train,
        epochs=2,
        steps_per_epoch=3,
        callbacks=[*task.callbacks(tmp_path, inputs), record],
        verbose=0,
    )
    start, after_1, after_2 = snapshots
    assert not np.allclose(after_1[0], start[0]) and np.array_equal(after_1[1], start[1])
    assert np.array_equal(after_2[0], after_1[0]) and not np.allclose(after_2[1], after_1[1])


def test_each_rbm_schedule_spans_its_own_epochs(tmp_path):
    """Greedy training: RBM i's learning rate decays over its own epochs, not the run's."""
    task = make_task(
        "dbn",
        tmp_path,
        "train.schedule=cosine",
        "train.epochs=5",
        "task_options.epochs_per_layer=[1,2]",
    )
    inputs, model = build(task)
    steps = inputs.steps_per_epoch
    first, top = (opt._learning_rate for opt in model.layer_optimizers)  # the schedules
    lr = task.config.train.learning_rate
    # RBM 1: 1 epoch; the top RBM: the remaining 4 (the schedule gives it the rest)
    assert float(first(steps)) == pytest.approx(0.0, abs=1e-9)
    assert float(top(2 * steps)) == pytest.approx(lr / 2, rel=1e-4)
    assert float(top(4 * steps)) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("key", ["vae-digits", "dcgan-digits", "rbm-digits"])
def test_same_seed_same_samples(key, tmp_path):
    task = make_task(key, tmp_path)
    inputs, model = build(task)
    a = task.sample(model.network, 6, seed=11)
    b = task.sample(model.network, 6, seed=11)
    c = task.sample(model.network, 6, seed=12)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.shape == (6, 8, 8, 1) and 0.0 <= a.min() and a.max() <= 1.0


@pytest.mark.slow
def test_cd1_lowers_the_free_energy_of_training_data(tmp_path):
    """From zero biases (the free energy is then -H log 2 for every v), CD-1 lowers F of
    the training data, and F(noise) - F(data) = log p(data) / p(noise) grows."""
    task = make_task(
        "rbm-digits", tmp_path, "task_options.persistent=false", "train.learning_rate=0.1"
    )
    inputs, model = build(task)
    x = task.arrays["fit"][0].reshape(len(task.arrays["fit"][0]), -1)
    noise = (np.random.default_rng(0).uniform(size=x.shape) < x.mean()).astype("float32")
    rbm = model.rbms[0]
    rbm.visible_bias.assign(np.zeros(x.shape[1], "float32"))

    def free_energy(v):
        return float(np.mean(rbm.free_energy(v)))

    before, gap_before = free_energy(x), free_energy(noise) - free_energy(x)
    model.fit(
        inputs.train,
        epochs=4,
        steps_per_epoch=inputs.steps_per_epoch,
        verbose=0,
        callbacks=task.callbacks(tmp_path, inputs),
    )
    after, gap_after = free_energy(x), free_energy(noise) - free_energy(x)
    assert after < before - 5.0, (before, after)
    assert gap_after > gap_before + 5.0, (gap_before, gap_after)


@pytest.mark.slow
def test_vae_elbo_improves_on_its_initial_value(tmp_path):
    task = make_task("vae-digits", tmp_path)
    inputs, model = build(task)
    initial = model.evaluate(inputs.eval, return_dict=True, verbose=0)["loss"]
    model.fit(inputs.train, epochs=5, steps_per_epoch=inputs.steps_per_epoch, verbose=0)
    final = model.evaluate(inputs.eval, return_dict=True, verbose=0)["loss"]
    assert np.isfinite(final) and final < 0.7 * initial, (initial, final)
    metrics = task.evaluate(model, inputs)
    # the importance-weighted bound is at least as tight as the ELBO
    assert metrics["iw_neg_elbo"] <= metrics["neg_elbo"] + 1e-3


@pytest.mark.slow
def test_draw_with_attention_learns(tmp_path):
    """Attention DRAW learns through its glimpses: the bound falls far below its start
    and the KL term opens up (the posterior carries information it can only have read
    through the attention window). On 8x8 digits in
    8 epochs the KL is small (0.09 -> 0.39 measured); the MNIST figure is the benchmark's
    (benchmarks/generative_quality.py draw-mnist: 79 nats)."""
    task = make_task("draw-digits", tmp_path)
    inputs, model = build(task)
    initial = model.evaluate(inputs.eval, return_dict=True, verbose=0)
    model.fit(inputs.train, epochs=8, steps_per_epoch=inputs.steps_per_epoch, verbose=0)
    final = model.evaluate(inputs.eval, return_dict=True, verbose=0)
    assert np.isfinite(final["loss"]) and final["loss"] < 0.6 * initial["loss"], (initial, final)
    assert final["kl"] > max(0.2, 2.0 * initial["kl"]), (initial, final)


@pytest.mark.slow
def test_dcgan_frechet_distance_beats_the_untrained_generator(tmp_path):
    task = make_task(
        "dcgan-digits",
        tmp_path,
        "task_options.fid_samples=300",
        "task_options.fid_classifier_epochs=3",
    )
    inputs, model = build(task)
    model.fit(inputs.train, epochs=12, steps_per_epoch=inputs.steps_per_epoch, verbose=0)
    metrics = task.evaluate(model, inputs)
    assert metrics["fid"] < 0.7 * metrics["fid_untrained"], metrics
    assert metrics["fid_relative"] < 0.7
    assert metrics["fid_real"] < metrics["fid"]
    assert 0.0 <= metrics["confident_share"] <= 1.0
    record = task.feature_classifier().record
    assert record["kind"] == "trained_in_evaluation" and record["test_accuracy"] > 0.8
    task.write_artifacts(model, {"loss": [1.0]}, inputs, tmp_path)
    assert (tmp_path / "arithmetic.png").exists() and (tmp_path / "interpolation.png").exists()


@pytest.mark.slow
def test_draw_writes_the_canvas_gif(tmp_path):
    task = make_task("draw-digits", tmp_path)
    inputs, model = build(task)
    model.fit(inputs.train, epochs=1, steps_per_epoch=5, verbose=0)
    task._eval = {"sample_labels": np.arange(100) % 10}
    task.write_artifacts(model, {"loss": [1.0]}, inputs, tmp_path)
    from PIL import Image

    gif = Image.open(tmp_path / "canvas.gif")
    assert gif.n_frames == task.config.model.kwargs()["steps"]


def test_latent_tools_shapes():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((30, 5)).astype("float32")
    groups = np.arange(30) % 3
    res = latent_arithmetic(z, groups, 0, 1, 2, noise_scale=0.25, count=4)
    assert res["a"].shape == (5,) and res["result"].shape == (4, 5)
    np.testing.assert_allclose(
        latent_arithmetic(z, groups, 0, 1, 2)["result"][0],
        z[groups == 0].mean(0) - z[groups == 1].mean(0) + z[groups == 2].mean(0),
        rtol=1e-5,
    )
    draw_z = rng.standard_normal((30, 4, 3)).astype("float32")
    assert latent_arithmetic(draw_z, groups, 0, 1, 2, count=2)["result"].shape == (2, 4, 3)
    with pytest.raises(ValueError, match="group"):
        latent_arithmetic(z, groups, 0, 1, 7)
    path = interpolate(z[0], z[1], 6, spherical=True)
    assert path.shape == (6, 5)
    np.testing.assert_allclose(path[0], z[0], atol=1e-5)
    np.testing.assert_allclose(path[-1], z[1], atol=1e-5)


def test_frechet_distance():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((500, 4))
    assert abs(frechet_distance(a, a)) < 1e-6
    # N(0, I) vs N(m, I): the distance is |m|^2 (up to sampling noise)
    assert frechet_distance(a, a + 3.0) == pytest.approx(36.0, rel=1e-6)
    with pytest.raises(ValueError, match="features"):
        frechet_distance(a, a[:, :3])


def test_relative_distance_places_fid_between_floor_and_ceiling():
    from pipelines.evaluation.sample_quality import relative_distance

    assert relative_distance(4.7, 4.7, 2863.0) == 0.0
    assert relative_distance(2863.0, 4.7, 2863.0) == 1.0
    # the DCGAN bound (150 between 4.7 and 2,863) sits at about 5 % of the span
    assert relative_distance(150.0, 4.7, 2863.0) == pytest.approx(0.0508, abs=1e-4)
    assert np.isnan(relative_distance(10.0, 5.0, 5.0))


def test_bad_task_options_are_named(tmp_path):
    with pytest.raises(ConfigError, match="task_options.cd_k"):
        GenerationTask(load_config("rbm-digits", ["task_options.cd_k=0"]))
    with pytest.raises(ConfigError, match="task_options.gibs_steps"):
        GenerationTask(load_config("rbm-digits", ["task_options.gibs_steps=3"]))
    with pytest.raises(ConfigError, match="model.name"):
        GenerationTask(load_config("rbm-digits", ["model.name=lenet5"]))
    from pipelines.tasks.generation import DBNClassificationTask

    with pytest.raises(ConfigError, match="task_options.cd_kk"):
        DBNClassificationTask(load_config("dbn-classifier-mnist", ["task_options.cd_kk=2"]))
    with pytest.raises(ConfigError, match="task_options.cd_k"):
        DBNClassificationTask(load_config("dbn-classifier-mnist", ["task_options.cd_k=0"]))
    with pytest.raises(ConfigError, match="epochs_per_layer"):
        make_task("dbn", tmp_path, "task_options.epochs_per_layer=[1,1,1]").build_model(
            {"image_shape": [8, 8, 1]}
        )


@pytest.mark.slow
@pytest.mark.integration
def test_driver_runs_vae_and_dbn_classifier_end_to_end(tmp_path, monkeypatch):
    """Through ``run_experiment``: MLflow run with sample artifacts, registered version
    gated on neg_elbo, TF Serving export with generate/encode/decode; then the DBN
    classifier, pre-trained greedily in the run, fine-tuned and exported."""
    mlflow = pytest.importorskip("mlflow")
    from pipelines.train import run_experiment

    monkeypatch.chdir(tmp_path)
    common = [
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"runtime.work_dir={tmp_path / 'runs'}",
        f"export.serving_dir={tmp_path / 'serving'}",
        "train.verbose=0",
        "export.warmup_requests=1",
    ]
    summary = run_experiment(
        load_config(
            "vae-digits",
            [
                *common,
                "train.epochs=2",
                "task_options.iw_samples=3",
                "task_options.fid_samples=100",
            ],
        )
    )
    assert summary.model_version == "1" and summary.aliases == ["champion"]
    assert summary.gate["gate.metric"] == "neg_elbo"
    for key in ("neg_elbo", "iw_neg_elbo", "fid", "fid_real", "fid_untrained", "confident_share"):
        assert np.isfinite(summary.metrics[key]), key
    artifacts = {p.name for p in (Path(summary.run_dir) / "artifacts").rglob("*")}
    assert {
        "samples.png",
        "epoch_001.png",
        "interpolation.png",
        "arithmetic.png",
        "reconstructions.png",
        "sample_quality.json",
    } <= artifacts
    logged = {a.path for a in mlflow.MlflowClient().list_artifacts(summary.run_id)}
    assert {"samples", "interpolation.png", "sample_quality.json"} <= logged
    saved = tf.saved_model.load(summary.export_path)
    assert {"serving_default", "generate_latents", "encode", "decode"} <= set(saved.signatures)

    clf = run_experiment(
        load_config(
            "dbn-classifier-mnist",
            [
                *common,
                "data.name=digits",
                "data.image_size=8",
                "model.hidden_units=[64,64]",
                "train.epochs=3",
                "task_options.epochs_per_layer=[5,5]",
                "model.dropout=0.0",
                "data.augment.pad_crop=0",
                "data.augment.rotation=0",
                "task_options.batch_size=32",
                "train.learning_rate=0.003",
            ],
        )
    )
    assert clf.metrics["accuracy"] > 0.5
    pretraining = json.loads((Path(clf.run_dir) / "artifacts" / "pretraining.json").read_text())
    assert pretraining["kind"] == "pretrained_in_run" and pretraining["layers_copied"] == 2
