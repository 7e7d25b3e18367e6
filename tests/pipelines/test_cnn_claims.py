"""The CNN claim experiments and tools: claim/MNIST configs, family preprocessing, the
gradient-norm and epochs-to-target callbacks, compare's curves + artifact, bench."""

from __future__ import annotations

import pytest

from pipelines.config import ConfigError, load_config, shipped_config_paths, validate_config
from pipelines.variants import load_runs

CLAIMS = {
    "claim-activations": ["relu", "sigmoid", "tanh"],
    "claim-dropout": ["dropout-0.5", "no-dropout"],
    "claim-batchnorm": ["batchnorm", "no-batchnorm"],
    "claim-residual": ["plain18", "plain34", "resnet18", "resnet34"],
}
# every registered image classifier ships a <model>-mnist config (the list comes from the registry)
import models  # noqa: E402

CLASSIFIERS = models.list_models(task="classification")


@pytest.mark.parametrize("name", sorted(CLAIMS))
def test_claim_configs_validate_and_expand(name):
    from pipelines.train import check_config

    runs = load_runs(name)
    assert [c.tracking.run_name for c in runs] == CLAIMS[name]
    assert {c.experiment_name for c in runs} == {name}
    for c in runs:
        check_config(c)
        assert c.data.image_size == 32 and c.data.name in ("digits", "mnist")
    if name == "claim-activations":
        assert [c.model.kwargs()["activation"] for c in runs] == ["relu", "sigmoid", "tanh"]
        assert all(c.task_options["gradient_norm_every"] for c in runs)
    if name == "claim-residual":
        assert [c.model.name for c in runs] == CLAIMS[name]


@pytest.mark.parametrize("model", CLASSIFIERS)
def test_mnist_config_per_architecture(model):
    from pipelines.train import check_config

    config = load_config(f"{model}-mnist")
    check_config(config)
    assert (
        config.model.name == model and config.data.name == "mnist" and config.data.image_size == 32
    )


def test_family_preprocessing_and_overrides():
    pytest.importorskip("tensorflow")
    from pipelines.image_inputs import resolve_preprocessing

    raw = {"name": "x", "model": {"name": "resnet18"}, "data": {"name": "digits"}}
    assert resolve_preprocessing(validate_config(raw)) == {
        "crop_fraction": 0.875,
        "flip": True,
        "pca_jitter": 0.1,
    }
    raw["data"] = {"name": "digits", "crop_fraction": 1.0, "augment": {"flip": False}}
    assert resolve_preprocessing(validate_config(raw)) == {
        "crop_fraction": 1.0,
        "flip": False,
        "pca_jitter": 0.1,
    }
    raw["data"] = {"name": "digits", "preprocessing": "none"}
    assert resolve_preprocessing(validate_config(raw)) == {
        "crop_fraction": 1.0,
        "flip": False,
        "pca_jitter": 0.0,
    }
    lenet = validate_config({"name": "x", "model": {"name": "lenet5"}})
    assert resolve_preprocessing(lenet) == {"crop_fraction": 1.0, "flip": False, "pca_jitter": 0.0}
    with pytest.raises(ConfigError, match="data.crop_fraction"):
        validate_config({"name": "x", "model": {"name": "vgg11"}, "data": {"crop_fraction": 1.5}})


def test_classification_task_options_are_checked_before_anything_runs():
    from pipelines.train import check_config

    config = validate_config(
        {"name": "x", "model": {"name": "lenet5"}, "task_options": {"gradient_norms": 5}}
    )
    with pytest.raises(ConfigError, match="task_options.gradient_norms"):
        check_config(config)
    # a gate metric this run never produces is a config error, not a KeyError after training
    gap = {
        "name": "x",
        "model": {"name": "lenet5"},
        "tracking": {"gate": {"metric": "train_accuracy"}},
    }
    with pytest.raises(
        ConfigError, match="tracking.gate.metric.*evaluate_train|tracking.gate.metric"
    ):
        check_config(validate_config(gap))
    check_config(validate_config({**gap, "task_options": {"evaluate_train": True}}))


@pytest.fixture()
def tracking(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("cnn-claims-tests")  # not an experiment id left active by an earlier test
    yield uri
    if mlflow.active_run():
        mlflow.end_run()


def _small_net(keras, batch_norm=True):
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, 3, name="conv_a")(inputs)
    if batch_norm:
        x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.Activation("sigmoid")(x)
    x = keras.layers.Conv2D(4, 3, name="conv_b", activation="sigmoid")(x)
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(3, activation="softmax", name="predictions")(x)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    return model


def test_gradient_norm_callback_logs_every_layer(tracking, tmp_path):
    import keras
    import mlflow
    import numpy as np

    from pipelines.callbacks import GradientNorms

    rng = np.random.default_rng(0)
    x, y = rng.uniform(size=(32, 8, 8, 1)).astype("float32"), rng.integers(0, 3, size=32)
    model = _small_net(keras)
    plot = tmp_path / "gradient_norms.png"
    callback = GradientNorms((x[:8], y[:8]), every_steps=2, sink=mlflow.log_metrics, plot_path=plot)
    with mlflow.start_run() as run:
        callback.set_model(model)
        bn_before = [v.numpy().copy() for v in model.non_trainable_variables]
        assert callback._compute() and all(
            np.array_equal(a, b.numpy())
            for a, b in zip(bn_before, model.non_trainable_variables, strict=True)
        )  # measuring leaves the BatchNorm moving statistics alone
        model.fit(x, y, batch_size=8, epochs=1, callbacks=[callback], verbose=0)  # 4 steps
    client = mlflow.MlflowClient()
    metrics = client.get_run(run.info.run_id).data.metrics
    assert {k for k in metrics if k.startswith("grad_norm/")} == {
        "grad_norm/conv_a",
        "grad_norm/bn",
        "grad_norm/conv_b",
        "grad_norm/predictions",
    }
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "grad_norm/conv_a")]
    assert steps == [0, 2, 4]
    assert [s for s, _ in callback.records] == [0, 2, 4]
    assert plot.exists()
    assert all(v > 0 for _, norms in callback.records for v in norms.values())


def test_epochs_to_target_and_no_sink(tracking):
    import mlflow

    from pipelines.callbacks import EpochsToTarget

    with mlflow.start_run() as run:
        cb = EpochsToTarget(0.9, sink=mlflow.log_metrics)
        for epoch, acc in enumerate([0.5, 0.92, 0.95]):
            cb.on_epoch_end(epoch, {"val_accuracy": acc})
        cb.on_train_end()
        silent = EpochsToTarget(0.1)  # a worker's: measures, logs nothing
        silent.on_epoch_end(0, {"val_accuracy": 0.5})
    assert cb.epoch == 2 and silent.epoch == 1
    metrics = mlflow.MlflowClient().get_run(run.info.run_id).data.metrics
    assert metrics["epochs_to_target"] == 2.0 and metrics["reached_target"] == 1.0


def test_compare_overlays_curves_and_logs_the_plot(tracking, tmp_path):
    import mlflow

    from pipelines.reports.compare import COMPARE_TAG, compare

    mlflow.set_experiment("claim-x")
    for name, scale in (("relu", 1.0), ("sigmoid", 2.0)):
        with mlflow.start_run(run_name=name):
            mlflow.log_param("model.activation", name)
            for step in range(1, 4):
                mlflow.log_metrics(
                    {"loss": scale / step, "grad_norm/block1_conv1": scale * 1e-3}, step=step
                )
            mlflow.log_metrics({"eval_accuracy": 0.5 * scale, "epochs_to_target": 3 - scale})
    out = compare(
        "claim-x",
        tmp_path / "cmp",
        tracking,
        ["model.activation"],
        metrics=["loss", "grad_norm/block1_conv1"],
    )
    assert (out / "compare.png").stat().st_size > 0 and (out / "curves.png").stat().st_size > 0
    text = (out / "runs.csv").read_text()
    assert "epochs_to_target" in text and "grad_norm/block1_conv1" in text
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("claim-x")
    logged = client.search_runs([exp.experiment_id], f"tags.`{COMPARE_TAG}` = 'true'")
    assert len(logged) == 1
    assert {a.path for a in client.list_artifacts(logged[0].info.run_id)} == {
        "runs.csv",
        "compare.png",
        "curves.png",
        "parallel.png",
        "report.html",
    }
    compare(
        "claim-x", tmp_path / "cmp2", tracking, metrics=["loss"], log_artifact=False
    )  # the compare run is left out
    assert (tmp_path / "cmp2" / "runs.csv").read_text().count("\n") == 3
    with pytest.raises(ConfigError, match="--metric 'nope'"):
        compare("claim-x", tmp_path / "cmp3", tracking, metrics=["nope"], log_artifact=False)


@pytest.mark.slow
def test_bench_runs_with_a_tiny_budget(tmp_path, capsys):
    pytest.importorskip("tensorflow")
    import json

    from pipelines.reports.bench import bench

    report = bench(
        ["vgg16"],
        image_size=32,
        batch_size=2,
        steps=1,
        rounds=1,
        num_classes=10,
        peak_seconds=0.2,
        output_json=str(tmp_path / "bench.json"),
    )
    assert json.loads((tmp_path / "bench.json").read_text())["ratios"]["vgg16"]["train"] > 0
    ours, theirs = report["results"]
    assert ours["params"] == theirs["params"]  # the same network
    assert abs(ours["forward_gflops"] - theirs["forward_gflops"]) < 1e-6
    assert 0 < ours["train_mfu"] < 1 and report["matmul_peak_gflops"] > 0
    assert "ours / keras.applications" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--model 'vgg19'"):
        bench(["vgg19"])


@pytest.mark.slow
def test_claim_run_logs_gradient_norms_and_gap(tmp_path, tfds_dir, tracking, monkeypatch):
    """One tiny claim-activations variant through the driver, on an image folder of digits."""
    import mlflow

    from pipelines.train import run_experiment

    monkeypatch.chdir(tmp_path)
    (config,) = load_runs(
        "claim-activations",
        [
            "train.epochs=2",
            "train.steps_per_epoch=3",
            "train.verbose=0",
            "task_options.gradient_norm_every=2",
            "task_options.evaluate_train=true",
            "task_options.target_accuracy=0.01",
            "tracking.log_model=false",
            f"data.dir={tfds_dir}",
            "model.width_multiplier=0.125",
        ],
        only=["sigmoid"],
    )
    summary = run_experiment(config)
    assert 0.0 <= summary.metrics["train_accuracy"] <= 1.0
    assert summary.metrics["train_eval_gap"] == pytest.approx(
        summary.metrics["train_accuracy"] - summary.metrics["accuracy"]
    )
    run = mlflow.MlflowClient().get_run(summary.run_id)
    grads = {k for k in run.data.metrics if k.startswith("grad_norm/")}
    assert len(grads) == 16 and "grad_norm/block1_conv1" in grads  # 13 conv + 3 dense layers
    assert run.data.metrics["epochs_to_target"] == 1.0
    assert (
        tmp_path
        / "runs"
        / "claim-activations"
        / summary.run_id
        / "artifacts"
        / "gradient_norms.png"
    ).exists()


def test_shipped_configs_dir_has_the_issue_names():
    names = set(shipped_config_paths())
    assert {"resnet18-mnist", "vgg11-mnist", *CLAIMS} <= names


def test_image_bytes_signature_applies_the_family_centre_crop():
    tf = pytest.importorskip("tensorflow")
    import numpy as np

    import models
    from data.images import preprocess_images
    from pipelines.tasks.base import RunContext, get_task

    config = validate_config(
        {"name": "x", "model": {"name": "lenet5"}, "data": {"crop_fraction": 0.75}}
    )
    task = get_task("classification")(RunContext(config))
    model = models.create_model("lenet5", input_shape=(32, 32, 1), num_classes=10)
    info = task.Info(
        image_shape=[32, 32, 1],
        raw_shape=[48, 48, 1],
        num_classes=10,
        preprocessing=task.preprocessing,
    )
    endpoints = {e.name: e for e in task.serving(model, info).endpoints}
    image = np.random.default_rng(0).integers(0, 256, size=(48, 48, 1), dtype=np.uint8)
    png = tf.io.encode_png(image).numpy()
    served = endpoints["image_bytes"].fn(tf.constant([png]))["probabilities"].numpy()
    expected = model(preprocess_images(image[None], 32, 1, 0.75), training=False).numpy()
    np.testing.assert_allclose(served, expected, atol=1e-6)
