"""The spine end to end against a temporary SQLite MLflow store: run, metrics, params,
tags, artifacts, registered version and alias, the quality gate, the TF Serving export
(reload + compare, warm-up records, saved_model_cli), re-export, and a NaN run that ends
FAILED and leaves nothing behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

tf = pytest.importorskip("tensorflow")
mlflow = pytest.importorskip("mlflow")

from pipelines.config import load_config  # noqa: E402
from pipelines.train import TrainingDiverged, run_experiment  # noqa: E402

TINY = ["train.epochs=3", "train.verbose=0", "export.warmup_requests=2"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tfds_dir):
    root = tmp_path_factory.mktemp("spine")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    old = Path.cwd()
    os.chdir(root)
    yield {"root": root, "uri": uri}
    os.chdir(old)


def _config(workspace, *overrides):
    return load_config(
        "lenet5-digits",
        [
            *TINY,
            f"tracking.uri={workspace['uri']}",
            f"runtime.work_dir={workspace['root'] / 'runs'}",
            f"export.serving_dir={workspace['root'] / 'serving'}",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def first_run(workspace):
    return run_experiment(_config(workspace))


@pytest.fixture(scope="module")
def second_run(workspace, first_run):
    # one step of a tiny learning rate: certainly worse than the first model
    return run_experiment(
        _config(
            workspace,
            "train.epochs=1",
            "train.steps_per_epoch=1",
            "train.learning_rate=1e-6",
            "data.augment.rotation=0",
        )
    )


def test_run_is_tracked(workspace, first_run):
    client = mlflow.MlflowClient(workspace["uri"])
    run = client.get_run(first_run.run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "lenet5-digits"
    # params: the flattened config plus the derived batch/replica figures
    assert run.data.params["train.epochs"] == "3"
    assert run.data.params["model.name"] == "lenet5"
    assert run.data.params["derived.replicas"] == "1"
    # tags: code version, data fingerprint, package versions
    assert run.data.tags["dataset.fingerprint"] == first_run_fingerprint()
    assert "git.commit" in run.data.tags
    assert run.data.tags["version.tensorflow"].startswith("2.")
    # per-epoch metrics at steps 1..3, final eval metrics
    history = client.get_metric_history(first_run.run_id, "val_accuracy")
    assert [m.step for m in history] == [1, 2, 3]
    assert run.data.metrics["eval_accuracy"] == pytest.approx(first_run.metrics["accuracy"])
    assert 0.5 < first_run.metrics["accuracy"] <= 1.0
    assert 0 <= first_run.metrics["top5_accuracy"] <= 1.0
    artifacts = {a.path for a in client.list_artifacts(first_run.run_id)}
    assert {
        "config.yaml",
        "model_summary.txt",
        "learning_curves.png",
        "confusion_matrix.png",
        "dataset_info.json",
    } <= artifacts


def first_run_fingerprint():
    from data.arrays import load_digits

    return load_digits().fingerprint


def test_registered_as_champion(workspace, first_run):
    client = mlflow.MlflowClient(workspace["uri"])
    assert first_run.model_name == "lenet5-digits" and first_run.model_version == "1"
    assert first_run.aliases == ["champion"]
    version = client.get_model_version_by_alias("lenet5-digits", "champion")
    assert str(version.version) == "1" and version.run_id == first_run.run_id
    assert version.tags["gate.decision"] == "champion"
    assert float(version.tags["gate.value"]) == pytest.approx(first_run.metrics["accuracy"])


def test_worse_model_is_refused_champion(workspace, first_run, second_run):
    client = mlflow.MlflowClient(workspace["uri"])
    assert second_run.model_version == "2"
    assert second_run.aliases == ["challenger"]
    assert second_run.metrics["accuracy"] < first_run.metrics["accuracy"]
    v2 = client.get_model_version("lenet5-digits", "2")
    assert v2.tags["gate.decision"] == "challenger"
    assert v2.tags["gate.champion_version"] == "1"
    assert float(v2.tags["gate.champion_value"]) == pytest.approx(first_run.metrics["accuracy"])
    assert str(client.get_model_version_by_alias("lenet5-digits", "champion").version) == "1"
    config = (workspace["root"] / "serving" / "models.config").read_text()
    assert "key: 'champion' value: 1" in config and "key: 'challenger' value: 2" in config


def test_export_loads_and_matches(workspace, first_run):
    export = Path(first_run.export_path)
    assert export == workspace["root"] / "serving" / "lenet5-digits" / "1"
    assert (export / "saved_model.pb").is_file()
    assert not list(export.parent.glob(".tmp-*"))  # nothing half-written left beside it
    assert first_run.metrics["export_max_abs_diff"] <= 1e-5

    reloaded = tf.saved_model.load(str(export))
    keras_model = mlflow.keras.load_model("models:/lenet5-digits/1")
    images = np.random.default_rng(0).uniform(size=(6, 32, 32, 1)).astype(np.float32)
    out = reloaded.signatures["serving_default"](images=tf.constant(images))
    np.testing.assert_allclose(
        out["probabilities"].numpy(), keras_model.predict(images, verbose=0), atol=1e-5
    )
    assert out["classes"].dtype == tf.int64 and out["top5_classes"].shape == (6, 5)
    np.testing.assert_array_equal(out["classes"].numpy(), out["top5_classes"].numpy()[:, 0])

    # image_bytes: PNGs decoded and preprocessed in-graph like the training pipeline
    from data.arrays import load_digits

    raw = load_digits()
    for img, _ in raw.eval.take(1):
        png = tf.io.encode_png(img)
        from data.images import preprocess_images

        expected = keras_model.predict(preprocess_images(img[None], 32, 1), verbose=0)
        got = reloaded.signatures["image_bytes"](image_bytes=tf.stack([png]))
        np.testing.assert_allclose(got["probabilities"].numpy(), expected, atol=1e-5)

    warmup = export / "assets.extra" / "tf_serving_warmup_requests"
    from tensorflow_serving.apis import prediction_log_pb2

    records = [
        prediction_log_pb2.PredictionLog.FromString(r.numpy())
        for r in tf.data.TFRecordDataset(str(warmup))
    ]
    assert {r.predict_log.request.model_spec.signature_name for r in records} == {
        "serving_default",
        "image_bytes",
    }


def test_saved_model_cli_lists_both_signatures(first_run):
    cli = Path(sys.executable).with_name("saved_model_cli")
    out = subprocess.run(
        [str(cli), "show", "--all", "--dir", first_run.export_path], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "signature_def['serving_default']" in out.stdout
    assert "signature_def['image_bytes']" in out.stdout
    assert "inputs['images']" in out.stdout and "inputs['image_bytes']" in out.stdout


def test_reexport_registered_version(workspace, first_run):
    from pipelines.serving.reexport import export_registered

    path = export_registered(
        "models:/lenet5-digits@champion", workspace["root"] / "reexport", workspace["uri"]
    )
    assert path == workspace["root"] / "reexport" / "lenet5-digits" / "1"
    a = tf.saved_model.load(str(path)).signatures["serving_default"]
    b = tf.saved_model.load(first_run.export_path).signatures["serving_default"]
    x = tf.random.uniform([3, 32, 32, 1], seed=1)
    np.testing.assert_allclose(
        a(images=x)["probabilities"].numpy(), b(images=x)["probabilities"].numpy(), atol=1e-6
    )


def test_generative_run_scores_in_the_registered_lenet5_and_reexports(workspace, first_run):
    """``task_options.fid_classifier=models:/lenet5-digits@champion``: the GAN's Fréchet
    distance is taken in the registered classifier's F6 space and its version is tagged on
    the run; ``deeptrends export`` rebuilds the generator's signatures from the registry."""
    from pipelines.serving.reexport import export_registered

    root = workspace["root"]
    summary = run_experiment(
        load_config(
            "gan-digits",
            [
                "train.epochs=2",
                "train.verbose=0",
                "export.warmup_requests=1",
                "model.generator_units=[64]",
                "model.discriminator_units=[64]",
                "task_options.fid_samples=100",
                "task_options.sample_every=0",
                "task_options.fid_classifier=models:/lenet5-digits@champion",
                f"tracking.uri={workspace['uri']}",
                f"runtime.work_dir={root / 'runs'}",
                f"export.serving_dir={root / 'serving'}",
            ],
        )
    )
    tags = mlflow.MlflowClient(workspace["uri"]).get_run(summary.run_id).data.tags
    assert tags["fid_classifier.kind"] == "registered"
    assert tags["fid_classifier.uri"] == "models:/lenet5-digits@champion"
    assert tags["fid_classifier.version"] == str(first_run.model_version)
    assert float(tags["fid_classifier.test_accuracy"]) > 0.5
    assert np.isfinite(summary.metrics["fid"]) and summary.metrics["fid"] >= 0.0

    path = export_registered("models:/gan-digits@champion", root / "reexport", workspace["uri"])
    assert path == root / "reexport" / "gan-digits" / "1"
    a = tf.saved_model.load(str(path)).signatures
    b = tf.saved_model.load(summary.export_path).signatures
    assert {"serving_default", "generate_latents"} <= set(a)
    seeds = tf.constant([3, 4, 5], tf.int64)
    images = a["serving_default"](seed=seeds)["images"]
    assert images.dtype == tf.uint8 and images.shape == (3, 8, 8, 1)
    np.testing.assert_array_equal(
        images.numpy(), b["serving_default"](seed=seeds)["images"].numpy()
    )


def test_nan_run_fails_and_leaves_nothing(workspace, first_run, second_run):
    client = mlflow.MlflowClient(workspace["uri"])
    before = {str(v.version) for v in client.search_model_versions("name='lenet5-digits'")}
    cfg = _config(
        workspace,
        "train.optimizer=sgd",
        "train.learning_rate=1e30",
        "train.epochs=2",
        "tracking.run_name=nan-run",
    )
    with pytest.raises(TrainingDiverged, match="NaN"):
        run_experiment(cfg)
    runs = client.search_runs(
        [client.get_experiment_by_name("lenet5-digits").experiment_id],
        "attributes.run_name = 'nan-run'",
    )
    assert len(runs) == 1 and runs[0].info.status == "FAILED"
    after = {str(v.version) for v in client.search_model_versions("name='lenet5-digits'")}
    assert after == before
    served = sorted(p.name for p in (workspace["root"] / "serving" / "lenet5-digits").iterdir())
    assert served == ["1", "2"]


def test_cli_train_writes_summary_json(workspace, tmp_path):
    out = tmp_path / "summary.json"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'cli.db'}"}
    cmd = [
        sys.executable,
        "-m",
        "pipelines.cli",
        "train",
        "lenet5-digits",
        "--set",
        "train.epochs=1",
        "--set",
        "train.verbose=0",
        "--set",
        f"export.serving_dir={tmp_path / 'serving'}",
        "--set",
        f"runtime.work_dir={tmp_path / 'runs'}",
        "--output-json",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert set(summary) == {
        "run_id",
        "experiment",
        "metrics",
        "model_name",
        "model_version",
        "aliases",
        "export_path",
    }
    assert summary["model_version"] == "1" and summary["aliases"] == ["champion"]
    assert Path(summary["export_path"]).is_dir()
    assert '"run_id"' in proc.stdout  # the same summary is printed


def test_a_run_leaves_the_mlflow_environment_as_it_found_it(workspace, tmp_path, monkeypatch):
    """mlflow.set_tracking_uri / set_experiment write MLFLOW_TRACKING_URI and
    MLFLOW_EXPERIMENT_ID into os.environ; after a run they are as before, so a later run
    in this process or a child it starts (`mlflow run`) is not sent to this run's store
    and experiment."""
    from pipelines.tracking import RunTracker

    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
    config = _config(workspace, f"tracking.uri=sqlite:///{tmp_path / 'own.db'}")
    with RunTracker(config) as tracker:
        assert os.environ.get("MLFLOW_EXPERIMENT_ID")  # MLflow's, while the run is open
        assert tracker.run_id
    assert "MLFLOW_EXPERIMENT_ID" not in os.environ
    assert os.environ["MLFLOW_TRACKING_URI"] == "sqlite:///elsewhere.db"


def test_the_reports_and_the_re_export_leave_the_mlflow_environment_as_they_found_it(
    tmp_path, monkeypatch
):
    """`deeptrends compare`, `report claims` and `export` read another store than the
    environment names; afterwards MLFLOW_TRACKING_URI is as it was."""
    from pipelines.config import ConfigError
    from pipelines.reports import claims, compare
    from pipelines.serving.reexport import export_registered

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
    own = f"sqlite:///{tmp_path / 'own.db'}"
    assert compare._client(own).tracking_uri == own
    assert claims._client(own).tracking_uri == own
    with pytest.raises(ConfigError, match="no-such-model"):
        export_registered("models:/no-such-model/1", tmp_path / "serving", tracking_uri=own)
    assert os.environ["MLFLOW_TRACKING_URI"] == "sqlite:///elsewhere.db"
