"""The sequence task through the driver (adding problem, truncated-BPTT language model),
its config checks and per-config metrics, several-run experiments (``variants:``, every
variant of the shipped claims validated) and ``deeptrends compare``."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from pipelines.config import ConfigError, load_config, validate_config  # noqa: E402
from pipelines.variants import load_runs  # noqa: E402

ADDING = {
    "name": "tiny-adding",
    "task": "sequence",
    "model": {"name": "gru", "units": 8},
    "data": {"name": "long_dependency", "length": 12, "num_train": 256, "num_eval": 64},
    "train": {"epochs": 1, "batch_size": 32, "global_clipnorm": 1.0, "verbose": 0},
    "tracking": {"enabled": False, "gate": {"metric": "mse", "mode": "min"}},
    "export": {"warmup_requests": 1},
}


def _lm_text(path):
    words = "the cat dog sat on a mat and ran to house".split()
    rng = np.random.default_rng(0)
    path.write_text(
        "".join(" ".join(rng.choice(words, size=6)) + f" {i}.\tx\n" for i in range(400))
    )
    return path


def _workdir(tmp_path, raw):
    raw = json.loads(json.dumps(raw))
    raw.setdefault("runtime", {})["work_dir"] = str(tmp_path / "runs")
    raw["export"]["serving_dir"] = str(tmp_path / "serving")
    return raw


@pytest.mark.slow
def test_adding_problem_runs_and_exports(tmp_path):
    from pipelines.train import run_experiment

    summary = run_experiment(validate_config(_workdir(tmp_path, ADDING)))
    assert set(summary.metrics) >= {"loss", "mse"} and np.isfinite(summary.metrics["mse"])
    served = tf.saved_model.load(summary.export_path).signatures["serving_default"]
    out = served(sequences=tf.zeros([3, 12, 2]))["predictions"]
    assert out.shape == (3, 1)


@pytest.mark.slow
def test_truncated_bptt_language_model(tmp_path):
    from pipelines.train import run_experiment

    raw = _workdir(
        tmp_path,
        {
            **ADDING,
            "name": "tiny-lm",
            "model": {"name": "lstm_lm", "units": 8, "embedding_dim": 8},
            "data": {"name": "text_lm", "path": str(_lm_text(tmp_path / "text.tsv"))},
            "train": {
                "epochs": 2,
                "batch_size": 8,
                "bptt_steps": 10,
                "clipnorm": 1.0,
                "verbose": 0,
            },
            "tracking": {"enabled": False, "gate": {"metric": "perplexity", "mode": "min"}},
        },
    )
    summary = run_experiment(validate_config(raw))
    info = json.loads(
        (tmp_path / "runs" / "tiny-lm").glob("*/artifacts/dataset_info.json").__next__().read_text()
    )
    assert info["stateful"] and info["seq_len"] == 10
    assert 1.0 < summary.metrics["perplexity"] < info["vocab_size"]  # better than uniform
    served = tf.saved_model.load(summary.export_path).signatures["serving_default"]
    out = served(
        tokens=tf.constant([[3, 4, 5, 0], [6, 0, 0, 0]], tf.int32)
    )  # any batch: the stateless twin
    assert out["next_token_log_probs"].shape[0] == 2


def test_bptt_is_for_language_models(tmp_path):
    from pipelines.tasks.sequence import SequenceTask
    from pipelines.train import check_config

    raw = _workdir(tmp_path, ADDING)
    raw["train"]["bptt_steps"] = 5
    config = validate_config(raw)
    with pytest.raises(ConfigError, match="train.bptt_steps"):
        SequenceTask.check(config, SequenceTask.parse_options(config))
    with pytest.raises(ConfigError, match="train.bptt_steps"):
        check_config(config)  # before anything runs


@pytest.mark.parametrize(
    ("data", "model", "metric"),
    [
        ({"name": "long_dependency"}, "gru", "mse"),
        ({"name": "long_dependency", "problem": "recall"}, "lstm", "accuracy"),
        ({"name": "text_lm"}, "gru_lm", "perplexity"),
        ({"name": "text_lm"}, "rnn", "perplexity"),  # a plain cell gets the next-token head
    ],
)
def test_metric_names_follow_the_config(tmp_path, data, model, metric):
    from pipelines.tasks.sequence import SequenceTask
    from pipelines.train import check_config

    raw = _workdir(tmp_path, {**ADDING, "data": data, "model": {"name": model}})
    config = validate_config(raw)
    assert SequenceTask.metric_names(config, None) == ("loss", metric)
    others = {"mse", "accuracy", "perplexity"} - {metric}
    for wrong in sorted(others):
        raw["tracking"] = {"gate": {"metric": wrong, "mode": "min"}}  # tracked: gate checked
        with pytest.raises(ConfigError, match="tracking.gate.metric"):
            check_config(validate_config(raw))


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"model": {"name": "lstm_lm"}}, "model.name"),  # an LM on one label per sequence
        ({"model": {"name": "seq2seq"}}, "model.name: 'seq2seq' is a translation model"),
        ({"data": {"name": "long_dependency", "problem": "copying"}}, "data.problem"),
        ({"data": {"name": "digits"}}, "data.name"),
        (
            {
                "data": {"name": "text_lm", "seq_len": 20},
                "model": {"name": "gru_lm"},
                "train": {"bptt_steps": 10},
            },
            "data.seq_len",
        ),
        (
            {"data": {"name": "text_lm"}, "model": {"name": "gru_lm", "bidirectional": True}},
            "model.bidirectional",
        ),
    ],
)
def test_cross_field_rules_name_the_field(tmp_path, change, field):
    from pipelines.train import check_config

    with pytest.raises(ConfigError, match=field):
        check_config(validate_config(_workdir(tmp_path, {**ADDING, **change})))


def test_claim_configs_validate_every_variant():
    from pipelines.train import check_config

    for name in ("claim-long-dependencies", "claim-lstm-vs-gru"):
        for config in load_runs(name):
            check_config(config)


def test_variants_expand_into_runs(tmp_path):
    configs = load_runs("claim-long-dependencies", ["train.epochs=1"])
    assert len(configs) == 15  # T = 10..200 x rnn, lstm, gru; rnn-noclip at T = 50..200
    first = configs[0]
    assert first.tracking.run_name == "rnn-T10" and first.model.name == "rnn"
    assert first.data.options()["length"] == 10 and first.train.epochs == 1
    assert first.tracking.registered_model == "claim-long-dependencies-rnn-T10"
    assert first.experiment_name == "claim-long-dependencies"
    only = load_runs("claim-lstm-vs-gru", only=["lm-lstm"])
    assert [c.task for c in only] == ["sequence"] and only[0].model.name == "lstm_lm"
    with pytest.raises(ConfigError, match="not a variant"):
        load_runs("claim-lstm-vs-gru", only=["nmt-rnn"])
    assert (
        load_config("claim-long-dependencies").name == "claim-long-dependencies"
    )  # the base config
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: {name: gru}\nvariants: [{name: a, sets: []}]\n")
    with pytest.raises(ConfigError, match=r"variants\[0\]"):
        load_runs(str(bad))


@pytest.mark.slow
def test_train_variants_then_compare(tmp_path, monkeypatch, capsys):
    import yaml

    from pipelines.cli import main

    monkeypatch.chdir(tmp_path)
    raw = _workdir(tmp_path, ADDING)
    raw["tracking"] = {
        "uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "gate": {"metric": "mse", "mode": "min"},
    }
    raw["variants"] = [
        {"name": "rnn-T12", "set": ["model.name=rnn"]},
        {"name": "gru-T12", "set": ["model.name=gru"]},
    ]
    path = tmp_path / "tiny-claim.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["train", str(path), "--set", "train.steps_per_epoch=2"]) == 0
    capsys.readouterr()
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    assert (
        main(
            [
                "compare",
                "tiny-adding",
                "--tracking-uri",
                raw["tracking"]["uri"],
                "--x",
                "data.length",
                "--group",
                "model.name",
                "--output",
                str(tmp_path / "cmp"),
            ]
        )
        == 0
    )
    table = capsys.readouterr().out
    assert "rnn-T12" in table and "gru-T12" in table and "eval_mse" in table
    assert (tmp_path / "cmp" / "compare.png").exists() and (tmp_path / "cmp" / "runs.csv").exists()
