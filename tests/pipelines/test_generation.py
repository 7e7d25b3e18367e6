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
from pipelines.evaluation.sample_quality import (  # noqa: E402
    frechet_distance,
    interpolate,
    latent_arithmetic,
)
from pipelines.loop import fit  # noqa: E402
from pipelines.serving.export import write_saved_model  # noqa: E402
from pipelines.tasks.base import RunContext  # noqa: E402
from pipelines.tasks.generation import GenerationInfo, GenerationTask  # noqa: E402
from tests.conftest import shared_data_dir  # noqa: E402

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
# the signatures each case exports, and the metrics only some families report
LATENT = {"serving_default", "generate_latents"}
SIGNATURES = {
    "rbm-digits": {"serving_default"},
    "dbn": {"serving_default"},
    "vae-digits": LATENT | {"encode", "decode"},
    "gan-digits": LATENT,
    "dcgan-digits": LATENT,
    "draw-digits": LATENT,
    "draw_no_attention": LATENT,
}
ELBO = {"neg_elbo", "iw_neg_elbo"}
PSEUDO = {"pseudo_log_likelihood"}
LIKELIHOODS = {
    "rbm-digits": PSEUDO,
    "dbn": PSEUDO,
    "vae-digits": ELBO,
    "gan-digits": set(),
    "dcgan-digits": set(),
    "draw-digits": ELBO,
    "draw_no_attention": ELBO,
}
# pictures every family writes, and those of some (vector arithmetic groups the VAE's
# encoded test images by label; GAN and DRAW samples by the classifier's labels, which
# after 8 steps need not cover the three groups: test_dcgan_... checks it after training)
ARTIFACTS = {"samples.png", "sample_quality.json"}
PICTURES = {
    "rbm-digits": {"rbm1_filters.png", "reconstructions.png"},
    "dbn": {"rbm1_filters.png", "reconstructions.png"},
    "vae-digits": {"interpolation.png", "arithmetic.png", "reconstructions.png"},
    "gan-digits": {"interpolation.png"},
    "dcgan-digits": {"interpolation.png"},
    "draw-digits": {"interpolation.png", "reconstructions.png", "canvas.gif"},
    "draw_no_attention": {"interpolation.png", "reconstructions.png", "canvas.gif"},
}


def make_config(key: str, tmp_path, *extra: str):
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
    return load_config(BASE[key], names + overrides)


def make_task(key: str, tmp_path, *extra: str) -> GenerationTask:
    return GenerationTask(RunContext(config=make_config(key, tmp_path, *extra)))


def build(task):
    keras.utils.set_random_seed(task.config.runtime.seed)
    inputs = task.build_inputs()
    return inputs, task.build_model(inputs)


def train(task, inputs, model, epochs: int, steps: int | None = None, callbacks=True):
    """Through the driver's loop (pipelines/loop.py), with the task's callbacks."""
    run_dir = Path(task.config.runtime.work_dir) / task.config.name / "test-run"
    extra = task.callbacks(inputs, run_dir) if callbacks else []
    return fit(
        model,
        tf.distribute.get_strategy(),
        inputs.train,
        epochs=epochs,
        steps_per_epoch=steps or inputs.steps_per_epoch,
        validation_data=inputs.eval,
        callbacks=extra,
        verbose=0,
    )


def write(evaluation, folder: Path) -> set[str]:
    folder.mkdir(parents=True, exist_ok=True)
    for writer in evaluation.artifacts:
        writer(folder)
    return {p.name for p in folder.iterdir()}


@pytest.fixture(autouse=True)
def _digits(tfds_dir):
    return tfds_dir


@pytest.fixture(scope="module")
def shared_work_dir(tmp_path_factory):
    """One work dir for the module: the LeNet-5 of the Fréchet distance is trained once."""
    return tmp_path_factory.mktemp("generation-work")


@pytest.mark.parametrize("key", sorted(SMALL))
def test_trains_evaluates_exports_and_reexports(key, tmp_path, shared_work_dir):
    """Every family: steps without NaN through the driver's loop; ``evaluate`` returns
    exactly the metrics ``metric_names`` promised for the config (the gate is checked
    against them) and writes its pictures; the SavedModel reloads with equal outputs; the
    logged network, reloaded from ``.keras`` with its ``dataset_info.json``, exports the
    same signatures (``deeptrends export``)."""
    task = make_task(
        key,
        tmp_path,
        f"runtime.work_dir={shared_work_dir}",
        "train.steps_per_epoch=4",
        "train.epochs=2",
        "task_options.fid_classifier_epochs=2",
    )
    inputs, model = build(task)
    history = train(task, inputs, model, epochs=2)
    assert all(np.isfinite(v).all() for v in history.values()), history

    evaluation = task.evaluate(model, inputs)
    names = GenerationTask.metric_names(task.config, task.options)
    assert set(evaluation.metrics) == set(names), set(evaluation.metrics) ^ set(names)
    assert LIKELIHOODS[key] <= set(names) and not (ELBO | PSEUDO) - LIKELIHOODS[key] & set(names)
    assert all(np.isfinite(v) for v in evaluation.metrics.values()), evaluation.metrics
    assert evaluation.tags["fid_classifier.kind"] == "trained_in_evaluation"
    assert ARTIFACTS | PICTURES[key] <= write(evaluation, tmp_path / "artifacts")

    serving = task.serving(model, inputs.info, inputs.check_batch)
    assert serving.model is model.network
    result = write_saved_model(
        serving.model,
        serving.endpoints,
        tmp_path / "serving" / "1",
        model_name=key,
        warmup_requests=1,
    )
    assert set(result.signatures) == SIGNATURES[key]
    assert result.max_abs_diff <= 1e-5
    reloaded = tf.saved_model.load(str(result.path))
    out = reloaded.signatures["serving_default"](seed=tf.constant([5, 6], tf.int64))
    assert out["images"].dtype == tf.uint8 and out["images"].shape[1:] == (8, 8, 1)
    if "canvas.gif" in PICTURES[key]:
        assert out["canvases"].shape[1] == model.network.get_layer("draw_core").steps
    # an image depends on its seed only, not on its batch
    alone = reloaded.signatures["serving_default"](seed=tf.constant([6], tf.int64))
    np.testing.assert_array_equal(out["images"][1].numpy(), alone["images"][0].numpy())

    # re-export: the logged network and dataset_info.json, without the trainer
    model.network.save(tmp_path / "logged.keras")
    logged = keras.saving.load_model(tmp_path / "logged.keras")
    info = GenerationTask.Info.from_dict(json.loads(json.dumps(inputs.info.to_dict())))
    again = GenerationTask(RunContext(config=task.config)).serving(logged, info)
    assert [e.name for e in again.endpoints] == [e.name for e in serving.endpoints]
    redone = write_saved_model(
        again.model,
        again.endpoints,
        tmp_path / "serving" / "2",
        model_name=key,
        warmup_requests=0,
    )
    second = tf.saved_model.load(str(redone.path)).signatures["serving_default"]
    np.testing.assert_array_equal(
        second(seed=tf.constant([5, 6], tf.int64))["images"].numpy(), out["images"].numpy()
    )


def test_dataset_info_of_a_run_logged_before_the_move_reloads():
    """``dataset_info.json`` of a run logged by the old task (a plain dict, no
    ``num_eval``) still gives the info the signatures need."""
    old = {
        "dataset": "digits",
        "family": "rbm",
        "image_shape": [8, 8, 1],
        "raw_shape": [8, 8, 1],
        "num_classes": 10,
        "class_names": [str(i) for i in range(10)],
        "num_train": 1287,
        "num_validation": 150,
        "num_test": 360,
        "binarize": 0.5,
        "source": "tfds:deeptrends_digits",
        "gibbs_steps": 200,
    }
    info = GenerationInfo.from_dict(old)
    assert info.image_shape == [8, 8, 1] and info.gibbs_steps == 200 and info.num_test == 360


def test_every_generative_model_has_a_case():
    """The cases above come from the trainers' registry: a model the generation task
    accepts, or a registered generative model, without a case fails."""
    import models
    from pipelines.trainers import generative_models

    def model_name(key):
        named = [o.split("=", 1)[1] for o in SMALL[key] if o.startswith("model.name=")]
        return named[0] if named else load_config(BASE[key]).model.name

    assert {model_name(k) for k in SMALL} == set(generative_models())
    generative = {
        n for n in models.list_models() if models.model_module(n) in ("rbm", "vae", "gan", "draw")
    }
    # dbn_classifier is trained by the dbn_classification task (tests below)
    assert generative - {"dbn_classifier"} == set(generative_models())


def test_metric_names_follow_the_family():
    """What the gate may pick: an RBM reports no ELBO, a GAN no likelihood at all, the
    references only when asked for."""

    def names(config_name, *overrides):
        config = load_config(config_name, list(overrides))
        return set(GenerationTask.metric_names(config, GenerationTask.parse_options(config)))

    rbm, gan, vae = names("rbm-digits"), names("gan-digits"), names("vae-digits")
    assert "recon_error" in rbm and "pseudo_log_likelihood" in rbm and not ELBO & rbm
    assert not (ELBO | PSEUDO) & gan and {"fid", "d_loss"} <= gan
    assert ELBO <= vae and "pseudo_log_likelihood" not in vae
    assert "fid_real" not in names("gan-digits", "task_options.reference_fids=false")


def test_gaussian_vae_trains_on_grey_pixels_and_exports(tmp_path):
    """``model.likelihood=gaussian``: grey pixels, a learned per-pixel scale, an ELBO that
    improves on its initial value; samples are the decoder's mean in [0, 1]."""
    with pytest.raises(ConfigError, match="task_options.binarize"):
        make_task("vae-digits", tmp_path, "model.likelihood=gaussian")
    task = make_task(
        "vae-digits", tmp_path, "model.likelihood=gaussian", "task_options.binarize=null"
    )
    inputs, model = build(task)
    x = inputs.data.fit_images
    assert 0.0 < np.mean((x > 0.05) & (x < 0.95)), "pixels should stay grey"
    initial = model.evaluate(inputs.eval, return_dict=True, verbose=0)["loss"]
    train(task, inputs, model, epochs=4)
    final = model.evaluate(inputs.eval, return_dict=True, verbose=0)["loss"]
    assert np.isfinite(final) and final < initial - 50.0, (initial, final)
    scale = model.network.get_layer("decoder").get_layer("decoder_log_scale").log_scale
    assert not np.allclose(np.asarray(scale), np.log(0.1)), "the per-pixel scale did not learn"
    samples = model.sample(8)
    assert 0.0 <= samples.min() and samples.max() <= 1.0
    serving = task.serving(model, inputs.info, inputs.check_batch)
    result = write_saved_model(
        serving.model,
        serving.endpoints,
        tmp_path / "serving" / "1",
        model_name="vae-gaussian",
        warmup_requests=1,
    )
    assert {"serving_default", "encode", "decode"} <= set(result.signatures)
    assert result.max_abs_diff <= 1e-5


def test_dbn_trains_each_layer_in_turn_through_the_training_loop(tmp_path):
    """Through pipelines/loop.py (the driver's loop, not Keras fit): epoch 1 trains RBM 1
    only, epoch 2 RBM 2 only. Before the loop retraced on ``trace_key``, its step stayed
    traced for RBM 1 and the upper RBMs never trained."""
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
        callbacks=[*task.callbacks(inputs, tmp_path), record],
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


def test_a_resumed_stream_continues_where_the_run_stopped(tmp_path):
    """``build_inputs`` of a resumed run (epoch 1, step 2 of the context) yields the
    batches an uninterrupted run would train on from there."""
    config = make_config("vae-digits", tmp_path, "train.steps_per_epoch=3")
    whole = GenerationTask(RunContext(config=config)).build_inputs().train
    resumed = GenerationTask(RunContext(config=config, start_epoch=1, start_step=2))
    expected = [b[0].numpy() for b in whole.skip(5).take(2)]
    got = [b[0].numpy() for b in resumed.build_inputs().train.take(2)]
    for want, have in zip(expected, got, strict=True):
        np.testing.assert_array_equal(want, have)


class _Crash(RuntimeError):
    pass


def _train_resumable(key, tmp_path, folder, crash_at=None):
    """3 epochs of 6 steps through the loop, checkpointing every 4 steps, as the driver
    does: the task is built for the checkpoint's position (``RunContext.start_*``)."""
    from pipelines import loop

    config = make_config(key, tmp_path, "train.steps_per_epoch=6", "train.epochs=3")
    start = loop.TrainingCheckpoint.peek(folder) or loop.Position()
    task = GenerationTask(RunContext(config, start_epoch=start.epoch, start_step=start.step))
    inputs = task.build_inputs()
    keras.utils.set_random_seed(config.runtime.seed)
    model = task.build_model(inputs)
    checkpoint = loop.TrainingCheckpoint(folder, every_n_steps=4)
    checkpoint.attach(model)
    assert checkpoint.restore() == start
    callbacks = task.callbacks(inputs, tmp_path)
    if crash_at is not None:

        def crash(batch, logs):
            if (model.history.epoch[-1] + 1 if model.history.epoch else 0, batch) == crash_at:
                raise _Crash()

        callbacks.append(keras.callbacks.LambdaCallback(on_train_batch_end=crash))
    fit(
        model,
        tf.distribute.get_strategy(),
        inputs.train,
        epochs=3,
        steps_per_epoch=6,
        validation_data=inputs.eval,
        callbacks=callbacks,
        checkpoint=checkpoint,
        start=start,
        verbose=0,
    )
    return model, start


@pytest.mark.parametrize("key", ["rbm-digits", "dbn", "dcgan-digits", "vae-digits"])
def test_a_crash_mid_epoch_resumes_to_the_uninterrupted_model(key, tmp_path):
    """Shipped configs as shipped (PCD chains and Gibbs noise, the DBN's layer switch,
    GAN noise, VAE sampling): crash two steps after a mid-epoch checkpoint, build the task
    again at the checkpoint's position, continue; the weights equal a straight run's."""
    straight, _ = _train_resumable(key, tmp_path, tmp_path / "straight")
    with pytest.raises(_Crash):
        _train_resumable(key, tmp_path, tmp_path / "crashed", crash_at=(1, 5))
    resumed, start = _train_resumable(key, tmp_path, tmp_path / "crashed")
    assert (start.epoch, start.step) == (1, 4)
    diffs = [
        float(np.max(np.abs(a - b), initial=0.0))
        for a, b in zip(resumed.get_weights(), straight.get_weights(), strict=True)
    ]
    assert max(diffs) <= 1e-5, diffs


@pytest.mark.parametrize("key", ["vae-digits", "dcgan-digits", "rbm-digits"])
def test_same_seed_same_samples(key, tmp_path):
    task = make_task(key, tmp_path)
    inputs, model = build(task)
    a = model.sample(6, seed=11)
    b = model.sample(6, seed=11)
    c = model.sample(6, seed=12)
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
    x = inputs.data.fit_images.reshape(len(inputs.data.fit_images), -1)
    noise = (np.random.default_rng(0).uniform(size=x.shape) < x.mean()).astype("float32")
    rbm = model.rbms[0]
    rbm.visible_bias.assign(np.zeros(x.shape[1], "float32"))

    def free_energy(v):
        return float(np.mean(rbm.free_energy(v)))

    before, gap_before = free_energy(x), free_energy(noise) - free_energy(x)
    train(task, inputs, model, epochs=4)
    after, gap_after = free_energy(x), free_energy(noise) - free_energy(x)
    assert after < before - 5.0, (before, after)
    assert gap_after > gap_before + 5.0, (gap_before, gap_after)


@pytest.mark.slow
def test_vae_elbo_improves_on_its_initial_value(tmp_path):
    task = make_task("vae-digits", tmp_path)
    inputs, model = build(task)
    initial = model.evaluate(inputs.eval, return_dict=True, verbose=0)["loss"]
    train(task, inputs, model, epochs=5)
    final = model.evaluate(inputs.eval, return_dict=True, verbose=0)["loss"]
    assert np.isfinite(final) and final < 0.7 * initial, (initial, final)
    metrics = task.evaluate(model, inputs).metrics
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
    train(task, inputs, model, epochs=8)
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
    train(task, inputs, model, epochs=12)
    evaluation = task.evaluate(model, inputs)
    metrics = evaluation.metrics
    assert metrics["fid"] < 0.7 * metrics["fid_untrained"], metrics
    assert metrics["fid_relative"] < 0.7
    assert metrics["fid_real"] < metrics["fid"]
    assert 0.0 <= metrics["confident_share"] <= 1.0
    tags = evaluation.tags
    assert tags["fid_classifier.kind"] == "trained_in_evaluation"
    assert float(tags["fid_classifier.test_accuracy"]) > 0.8
    assert {"arithmetic.png", "interpolation.png"} <= write(evaluation, tmp_path / "artifacts")


@pytest.mark.slow
def test_draw_writes_the_canvas_gif(tmp_path):
    task = make_task("draw-digits", tmp_path)
    inputs, model = build(task)
    train(task, inputs, model, epochs=1, steps=5)
    test = inputs.data.test
    for writer in model.artifacts(inputs.data.test_model, test[1], np.arange(100) % 10, (7, 1, 9)):
        writer(tmp_path)
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


def _check(config_name, *overrides: str) -> None:
    """What the driver's config check asks of a task class: options, then its rules."""
    from pipelines.tasks.base import get_task

    config = (
        load_config(config_name, list(overrides)) if isinstance(config_name, str) else config_name
    )
    task = get_task(config.task)
    task.check(config, task.parse_options(config))


def _without_hidden_units(config_name: str, *overrides: str):
    from pipelines.config import validate_config

    raw = load_config(config_name, list(overrides)).to_dict()
    del raw["model"]["hidden_units"]
    return validate_config(raw)


def test_bad_task_options_are_named_before_anything_runs():
    _check("rbm-digits")
    with pytest.raises(ConfigError, match="task_options.cd_k"):
        _check("rbm-digits", "task_options.cd_k=0")
    with pytest.raises(ConfigError, match="task_options.gibs_steps"):
        _check("rbm-digits", "task_options.gibs_steps=3")
    with pytest.raises(ConfigError, match="model.name"):
        _check("rbm-digits", "model.name=lenet5")
    with pytest.raises(ConfigError, match="model.name"):
        _check("rbm-digits", "model.name=dbn_classifier")
    with pytest.raises(ConfigError, match="task_options.binarize"):
        _check("vae-digits", "model.likelihood=gaussian")
    # the DBN's hidden_units: 2 RBMs here, 3 by the builder's default
    with pytest.raises(ConfigError, match="task_options.epochs_per_layer: 3 entries for 2"):
        _check("dbn-mnist", "model.hidden_units=[32,16]")
    with pytest.raises(ConfigError, match="task_options.epochs_per_layer: 2 entries for 3"):
        _check(_without_hidden_units("dbn-mnist", "task_options.epochs_per_layer=[1,1]"))
    with pytest.raises(ConfigError, match="task_options.epochs_per_layer: 2 entries for 1"):
        _check("rbm-digits", "task_options.epochs_per_layer=[1,1]")


# ------------------------------------------------------------------ DBN classification

DBN_SMALL = [
    "data.name=digits",
    "model.hidden_units=[32,16]",
    "task_options.epochs_per_layer=[1,2]",
    "task_options.batch_size=32",
    "train.steps_per_epoch=3",
    "train.epochs=1",
    "train.verbose=0",
]


def test_dbn_classification_options_and_rules_are_checked_before_anything_runs():
    _check("dbn-classifier-mnist")
    with pytest.raises(ConfigError, match="task_options.cd_kk"):
        _check("dbn-classifier-mnist", "task_options.cd_kk=2")
    with pytest.raises(ConfigError, match="task_options.cd_k"):
        _check("dbn-classifier-mnist", "task_options.cd_k=0")
    with pytest.raises(ConfigError, match="task_options.epochs_per_layer: 3 entries for 2"):
        _check("dbn-classifier-mnist", "model.hidden_units=[32,16]")
    # a loaded DBN has its own layers (checked when its weights are copied)
    _check("dbn-classifier-mnist", "model.hidden_units=[32,16]", "task_options.pretrained=x.keras")
    with pytest.raises(ConfigError, match="model.name"):
        _check("dbn-classifier-mnist", "model.name=lenet5")
    from pipelines.tasks.dbn_classification import DBNClassificationTask

    config = load_config("dbn-classifier-mnist")
    options = DBNClassificationTask.parse_options(config)
    assert "accuracy" in DBNClassificationTask.metric_names(config, options)
    assert "train_accuracy" not in DBNClassificationTask.metric_names(config, options)


def test_dbn_classifier_pretrains_through_the_shared_loop_and_fine_tunes(tmp_path, monkeypatch):
    """The greedy pre-training runs through ``pipelines.loop.fit`` under the run's
    strategy (never Keras ``fit``), trains every RBM, and the classifier starts from the
    DBN's recognition weights; building the model again pre-trains nothing; the run
    evaluates, writes ``pretraining.json`` and exports ``image_bytes``."""
    from models.rbm import rbm_layers
    from pipelines import loop
    from pipelines.tasks.dbn_classification import DBNClassificationTask
    from pipelines.train import fit_model

    calls, real_fit = [], loop.fit

    def spy(model, strategy, *args, **kwargs):
        calls.append((type(model).__name__, strategy, kwargs["epochs"]))
        return real_fit(model, strategy, *args, **kwargs)

    monkeypatch.setattr(loop, "fit", spy)
    monkeypatch.setattr(keras.Model, "fit", lambda *a, **k: pytest.fail("Keras fit was called"))
    strategy = tf.distribute.get_strategy()
    config = load_config("dbn-classifier-mnist", [*DBN_SMALL, f"runtime.work_dir={tmp_path}"])
    context = RunContext(config=config, strategy=strategy)
    task = DBNClassificationTask(context)
    inputs = task.build_inputs()
    assert calls == [("RBMTrainer", strategy, 3)]
    assert sum(len(y) for _, y in inputs.eval) == inputs.info.num_eval  # the whole eval split
    dbn = inputs.data.dbn
    keras.utils.set_random_seed(config.runtime.seed)
    import models

    fresh = models.create_model("dbn", input_shape=(8, 8, 1), hidden_units=[32, 16])
    for trained, initial in zip(rbm_layers(dbn), rbm_layers(fresh), strict=True):
        assert not np.allclose(np.asarray(trained.kernel), np.asarray(initial.kernel))

    model, history = fit_model(task, inputs, context)
    assert [c[0] for c in calls] == ["RBMTrainer", "Functional"]  # the fine-tuning: the driver's
    copy = task.build_model(inputs)  # the driver's un-replicated copy: no second pre-training
    assert len(calls) == 2
    for i, rbm in enumerate(rbm_layers(dbn), start=1):
        kernel, bias = copy.get_layer(f"rbm_{i}_dense").get_weights()
        np.testing.assert_array_equal(kernel, np.asarray(rbm.kernel))
        np.testing.assert_array_equal(bias, np.asarray(rbm.hidden_bias))

    evaluation = task.evaluate(model, inputs)
    assert set(evaluation.metrics) == set(task.metric_names(config, task.options))
    written = write(evaluation, tmp_path / "artifacts")
    assert {"confusion_matrix.png", "pretraining.json"} <= written
    record = json.loads((tmp_path / "artifacts" / "pretraining.json").read_text())
    assert record["kind"] == "pretrained_in_run" and record["layers_copied"] == 2
    assert np.isfinite(record["final_recon_error"])

    serving = task.serving(model, inputs.info, inputs.check_batch)
    result = write_saved_model(
        serving.model,
        serving.endpoints,
        tmp_path / "serving" / "1",
        model_name="dbn",
        warmup_requests=1,
    )
    assert set(result.signatures) == {"serving_default", "image_bytes"}
    assert result.max_abs_diff <= 1e-5


@pytest.mark.slow
@pytest.mark.integration
def test_driver_runs_vae_and_dbn_classifier_end_to_end(tmp_path, monkeypatch, tfds_dir):
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

    # the shipped config on its own data (dropout and augmentation as shipped), smaller
    if shared_data_dir() is None or not (shared_data_dir() / "mnist_test").is_dir():
        pytest.skip("MNIST idx files not found: set DEEPTRENDS_DATA_DIR")
    monkeypatch.setenv("DEEPTRENDS_DATA_DIR", str(shared_data_dir()))
    clf = run_experiment(
        load_config(
            "dbn-classifier-mnist",
            [
                *common,
                "model.hidden_units=[64,64]",
                "task_options.epochs_per_layer=[1,1]",
                "train.epochs=3",
            ],
        )
    )
    assert clf.metrics["accuracy"] > 0.5
    pretraining = json.loads((Path(clf.run_dir) / "artifacts" / "pretraining.json").read_text())
    assert pretraining["kind"] == "pretrained_in_run" and pretraining["layers_copied"] == 2
