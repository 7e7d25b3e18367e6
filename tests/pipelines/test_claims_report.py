"""``deeptrends report claims``: the claim blocks of the shipped configs, the verdict rules
on fixtures (holds / does not hold / mixed), the report with every claim present, the
copy-memory data and, slow, ``--quick`` end to end (then reused, nothing trained twice)."""

from __future__ import annotations

import base64
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest

from pipelines.config import ConfigError
from pipelines.reports import claims as C

CLAIMS = (
    "claim-activations",
    "claim-dropout",
    "claim-batchnorm",
    "claim-residual",
    "claim-long-dependencies",
    "claim-copy-memory",
    "claim-lstm-vs-gru",
    "claim-attention-translation",
    "claim-rcnn-vs-faster-rcnn",
    "claim-proposals",
    "claim-attention",
)


def _obs(variant, values, metric="m", status="finished"):
    return [C.Observation(variant, s, {metric: v}, status=status) for s, v in values.items()]


def _rule(**kw):
    base = {"name": "r", "metric": "m", "a": "a", "b": "b", "expect": "lower"}
    base.update(kw)
    rule = C.Rule.model_validate({"test": "every_seed", **base})
    rule.check()
    return rule


# ---------------------------------------------------------------------- the claim blocks


def test_every_claim_is_declared_and_valid():
    assert C.claim_names() == list(CLAIMS)
    for name in CLAIMS:
        claim = C.load_claim(name)
        spec = claim.spec
        assert spec.statement and spec.rules
        if spec.external:
            assert all(e.sources for e in spec.external)
            continue
        assert len(spec.seeds) >= 3 and len(set(spec.seeds)) == len(spec.seeds)
        assert spec.quick, f"{name}: --quick needs its small budget"


@pytest.mark.parametrize("quick", [False, True])
def test_planned_runs_validate_with_seeds_and_keys(quick):
    from pipelines.train import check_config

    for name in CLAIMS:
        claim = C.load_claim(name)
        runs = C.plan(claim, quick, [])
        if claim.spec.external:
            assert runs == []
            continue
        seeds = {s for _, s, _, _ in runs}
        assert len(seeds) == (1 if quick else len(claim.spec.seeds))
        keys = [k for _, _, k, _ in runs]
        assert len(set(keys)) == len(keys), f"{name}: two runs share a key"
        for variant, seed, key, config in runs:
            assert config.runtime.seed == seed and config.tracking.run_name == variant
            assert config.tracking.tags["claim.key"] == key
            check_config(config)
        if name == "claim-long-dependencies" and not quick:
            lengths = {c.data.options()["length"] for *_, c in runs}
            assert lengths == {50, 100, 200} and len(runs) == 36
            noclip = [c for v, *_, c in runs if "noclip" in v]
            assert noclip and all(c.train.global_clipnorm is None for c in noclip)
            assert all(c.task_options["gradient_through_time"] for *_, c in runs)
        if name == "claim-dropout":
            assert {c.data.options()["train_size"] for *_, c in runs} == {128 if quick else 1000}
        if name == "claim-attention-translation":
            models = {v: c.model.name for v, *_, c in runs}
            assert models == {"attention": "seq2seq", "no-attention": "seq2seq_no_attention"}
            # an equal budget: per seed the two runs differ in the model's name only
            for seed in seeds:
                pair = [c.to_dict() for _, s, _, c in runs if s == seed]
                for d in pair:
                    d["model"].pop("name")
                    d["tracking"] = {}
                assert len(pair) == 2 and pair[0] == pair[1]
            # the buckets are the shipped default's, which the plot and rules name
            assert {tuple(c.task_options["length_buckets"]) for *_, c in runs} == {(1, 5, 6, 7)}


def test_the_key_is_the_resolved_config():
    claim = C.load_claim("claim-dropout")
    a = {(v, s): k for v, s, k, _ in C.plan(claim, False, [])}
    b = {(v, s): k for v, s, k, _ in C.plan(claim, False, [])}
    c = {(v, s): k for v, s, k, _ in C.plan(claim, False, ["train.epochs=3"])}
    assert a == b and not set(a.values()) & set(c.values())


def test_bad_claim_blocks_are_config_errors(tmp_path, monkeypatch):
    good = "name: x\ntask: sequence\nmodel: {name: gru}\nvariants: [{name: a, set: []}, {name: b, set: []}]\n"
    cases = {
        "seeds": "claim: {statement: s, seeds: [1], rules: [{name: r, metric: m, a: a, b: b, expect: lower, test: every_seed}]}",
        "not a variant": "claim: {statement: s, seeds: [1, 2, 3], rules: [{name: r, metric: m, a: a, b: zz, expect: lower, test: every_seed}]}",
        "threshold": "claim: {statement: s, seeds: [1, 2, 3], rules: [{name: r, metric: m, a: a, b: b, expect: lower, test: threshold}]}",
        "claim.rules.0.test": "claim: {statement: s, seeds: [1, 2, 3], rules: [{name: r, metric: m, a: a, b: b, expect: lower, test: t}]}",
    }
    for match, block in cases.items():
        path = tmp_path / "c.yaml"
        path.write_text(good + block + "\n")
        with pytest.raises(ConfigError, match=match):
            C.load_claim(str(path))
    with pytest.raises(ConfigError, match="not a claim"):
        C.report_claims(only=["claim-nope"], log_artifact=False, train=False)


# ---------------------------------------------------------------------- verdict rules


def test_every_seed_holds_fails_mixed():
    rule = _rule()
    b = _obs("b", {1: 1.0, 2: 1.0, 3: 1.0})
    assert C.decide(rule, _obs("a", {1: 0.5, 2: 0.6, 3: 0.7}) + b).verdict == C.HOLDS
    assert C.decide(rule, _obs("a", {1: 1.5, 2: 1.6, 3: 1.7}) + b).verdict == C.FAILS
    mixed = C.decide(rule, _obs("a", {1: 0.5, 2: 1.6, 3: 0.7}) + b)
    assert mixed.verdict == C.MIXED and "2 of 3 seeds" in mixed.why
    # the margin: better, but not by enough
    assert C.decide(_rule(margin=0.6), _obs("a", {1: 0.5, 2: 0.6, 3: 0.7}) + b).verdict == C.FAILS
    # higher mirrors lower
    assert (
        C.decide(_rule(expect="higher"), _obs("a", {1: 2.0, 2: 3.0, 3: 4.0}) + b).verdict == C.HOLDS
    )
    # unpaired seeds are left out; none paired: not run
    assert C.decide(rule, _obs("a", {7: 0.1}) + b).verdict == C.NOT_RUN


def test_timing_rounds_are_rounds_not_seeds():
    """claim-lstm-vs-gru: 3 trained seeds carry num_params, 5 timing rounds carry the step
    time. The table counts them apart; the rules name rounds only where the values are
    rounds, and num_params has the 3 seeds' values, not the rounds'."""
    claim = C.load_claim("claim-lstm-vs-gru")
    obs = []
    for v, params, step in (("lm-gru", 1.066e6, 0.037), ("lm-lstm", 1.164e6, 0.044)):
        obs += [
            C.Observation(v, s, {"num_params": params, "eval_perplexity": 80.0 + s})
            for s in (1, 2, 3)
        ]
        obs += [
            C.Observation(v, r, {"seconds_per_step_alone": step}, status="measured")
            for r in (1, 2, 3, 4, 5)
        ]
    rules = {r.metric: C.decide(r, obs) for r in claim.spec.rules}
    assert rules["num_params"].verdict == C.HOLDS
    assert "in 3 of 3 seeds" in rules["num_params"].why and "round" not in rules["num_params"].why
    step = rules["seconds_per_step_alone"]
    assert step.verdict == C.HOLDS and "in 5 of 5 rounds" in step.why and "round 5:" in step.why
    assert "seed" not in step.why
    with tempfile.TemporaryDirectory() as tmp:
        result = C.decide_claim(claim, obs, Path(tmp))
    header, rows = C.table_rows(result)
    assert len(header) == len(set(header))  # the step time once, though a rule names it too
    runs = {row[0]: row[1] for row in rows}
    assert runs == {v: "3 (finished) + 5 timing rounds" for v in ("lm-gru", "lm-lstm")}
    cells = dict(zip(header, next(r for r in rows if r[0] == "lm-gru"), strict=True))
    # mean [interval] (the 3 seeds' values): no timing round among them
    assert cells["num_params"].split("(")[1].rstrip(")").split(", ") == ["1.066e+06"] * 3
    assert len(cells["seconds_per_step_alone"].split("(")[1].split(", ")) == 5


def test_bootstrap_holds_fails_mixed():
    rule = _rule(test="bootstrap")
    b = _obs("b", {1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0})
    held = C.decide(rule, _obs("a", {1: 0.8, 2: 0.7, 3: 0.75, 4: 0.85}) + b)
    assert held.verdict == C.HOLDS and held.interval[1] < 0
    assert C.decide(rule, _obs("a", {1: 1.2, 2: 1.3, 3: 1.25, 4: 1.1}) + b).verdict == C.FAILS
    assert C.decide(rule, _obs("a", {1: 0.5, 2: 1.5, 3: 0.6, 4: 1.4}) + b).verdict == C.MIXED
    similar = _rule(test="bootstrap", expect="similar", margin=0.1)
    assert C.decide(similar, _obs("a", {1: 1.02, 2: 0.97, 3: 1.01, 4: 1.0}) + b).verdict == C.HOLDS
    assert C.decide(similar, _obs("a", {1: 1.5, 2: 1.4, 3: 1.6, 4: 1.45}) + b).verdict == C.FAILS
    assert C.decide(similar, _obs("a", {1: 1.0, 2: 1.3, 3: 0.9, 4: 1.2}) + b).verdict == C.MIXED
    lo, hi = C.bootstrap_interval(np.array([1.0, 2.0, 3.0]))
    assert 1.0 <= lo < 2.0 < hi <= 3.0


def test_threshold_diverged_and_missing_values():
    rule = _rule(test="threshold", b=None, value=0.1, expect="higher", metric="eval_mse")
    # a diverged run of a lower-is-better metric counts as +inf: it did not learn
    obs = _obs("a", {1: 0.16, 2: 0.17}, "eval_mse") + [C.Observation("a", 3, {}, status="diverged")]
    result = C.decide(rule, obs)
    assert result.verdict == C.HOLDS and "diverged" in result.why
    assert C.decide(rule, _obs("a", {1: 0.16, 2: 0.01}, "eval_mse")).verdict == C.MIXED
    both = _rule(test="threshold", a=["a", "c"], b=None, value=0.1, metric="eval_mse")
    partial = C.decide(both, _obs("a", {1: 0.01}, "eval_mse"))
    assert partial.verdict == C.MIXED and "not run: c" in partial.why
    # epochs_to_target never logged: missing=high counts it as never reached
    never = _rule(metric="epochs_to_target", missing="high")
    obs = _obs("a", {1: 3.0, 2: 4.0}, "epochs_to_target") + [
        C.Observation("b", 1, {}),
        C.Observation("b", 2, {}),
    ]
    assert C.decide(never, obs).verdict == C.HOLDS
    assert C.decide(_rule(metric="epochs_to_target"), obs).verdict == C.NOT_RUN


def test_attention_translation_rules_on_fixtures():
    """The claim's own rules: attention higher on the longest bucket in every seed, and a
    paired bootstrap interval of the overall BLEU difference above 0."""
    claim = C.load_claim("claim-attention-translation")
    longest, overall = claim.spec.rules
    assert longest.metric == "eval_bleu_len_7_plus" and longest.test == "every_seed"
    assert overall.metric == "eval_bleu" and overall.test == "bootstrap"

    def obs(att_long, none_long, att_all, none_all):
        """Per seed 1..3: (variant, 7+ bucket BLEU, overall BLEU)."""
        rows = [("attention", att_long, att_all), ("no-attention", none_long, none_all)]
        return [
            C.Observation(v, seed, {"eval_bleu_len_7_plus": long[i], "eval_bleu": all_[i]})
            for v, long, all_ in rows
            for i, seed in enumerate((1, 2, 3))
        ]

    holds = obs([30, 32, 31], [20, 22, 21], [40, 41, 42], [35, 36, 35])
    assert [C.decide(r, holds).verdict for r in (longest, overall)] == [C.HOLDS, C.HOLDS]
    result = C.decide_claim(claim, holds, Path(tempfile.mkdtemp()))
    assert result.verdict == C.HOLDS
    fails = obs([10, 12, 11], [20, 22, 21], [30, 31, 30], [35, 36, 35])
    assert [C.decide(r, fails).verdict for r in (longest, overall)] == [C.FAILS, C.FAILS]
    mixed = obs([30, 12, 31], [20, 22, 21], [40, 30, 42], [35, 36, 35])
    assert [C.decide(r, mixed).verdict for r in (longest, overall)] == [C.MIXED, C.MIXED]
    # an empty longest bucket in a run (no BLEU logged) leaves that seed out
    gap = [o for o in holds if not (o.seed == 2 and o.variant == "attention")]
    gap.append(C.Observation("attention", 2, {"eval_bleu": 41.0}))
    assert "in 2 of 2 seeds" in C.decide(longest, gap).why


def test_plot_across_draws_a_line_per_variant(tmp_path):
    names = ["eval_bleu_len_1_4", "eval_bleu_len_5", "eval_bleu_len_7_plus"]
    obs = [
        C.Observation(v, s, {m: 10.0 + i + s for i, m in enumerate(names)})
        for v in ("attention", "no-attention")
        for s in (1, 2, 3)
    ]
    obs[0].metrics.pop("eval_bleu_len_5")  # a seed without a bucket still plots
    png = C.plot_across(obs, ["attention", "no-attention"], names, tmp_path / "a.png", "t")
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert C.plot_across(obs, ["attention"], ["eval_nothing"], tmp_path / "b.png", "t") is None
    assert not (tmp_path / "b.png").exists()


def test_claim_verdict():
    r = lambda v: C.RuleResult("r", v, "", "m")  # noqa: E731
    assert C.claim_verdict([r(C.HOLDS), r(C.HOLDS)])[0] == C.HOLDS
    assert C.claim_verdict([r(C.FAILS), r(C.FAILS)])[0] == C.FAILS
    assert C.claim_verdict([r(C.HOLDS), r(C.FAILS)])[0] == C.MIXED
    assert C.claim_verdict([r(C.HOLDS), r(C.MIXED)])[0] == C.MIXED
    verdict, why = C.claim_verdict([r(C.HOLDS), r(C.NOT_RUN)])
    assert verdict == C.HOLDS and "1 not run" in why
    assert C.claim_verdict([r(C.NOT_RUN)])[0] == C.NOT_RUN


# ---------------------------------------------------------------------- the report


def _fixture_observations(claim) -> list:
    """Every variant x seed with a value for every metric the claim's rules and bars use."""
    rng = np.random.default_rng(0)
    metrics = {r.metric for r in claim.spec.rules} | set(claim.spec.plot.bars)
    metrics |= set(claim.spec.plot.across)
    seeds = claim.spec.seeds or [1, 2, 3]
    out = []
    for v in claim.spec.variants or claim.variant_names:
        for s in seeds:
            o = C.Observation(v, s, {m: float(rng.uniform(0.01, 1.0)) for m in metrics})
            o.params = {"data.length": v.rsplit("-T", 1)[-1] if "-T" in v else "0"}
            o.curves = {
                m: [(e, float(rng.uniform())) for e in range(5)] for m in claim.spec.plot.curves
            }
            if claim.spec.plot.gradient_through_time:
                o.gradient_profiles = {"init": list(rng.uniform(size=10)), "trained": [1.0] * 10}
            out.append(o)
    out[0].status = "diverged"
    out[0].metrics = {}
    return out


def test_report_renders_every_claim(tmp_path):
    results = []
    for name in CLAIMS:
        claim = C.load_claim(name)
        results.append(C.decide_claim(claim, _fixture_observations(claim), tmp_path))
    files = C.write_report(results, tmp_path, "fixture values", quick=False)
    page = (tmp_path / "claims.html").read_text()
    markdown = (tmp_path / "claims.md").read_text()
    for r in results:
        assert r.verdict in (C.HOLDS, C.FAILS, C.MIXED)
        assert f"{r.name}: {r.verdict}" in page and f"## {r.name}: {r.verdict}" in markdown
        assert r.figures, f"{r.name}: no figure"
        for _, png in r.figures:
            assert png.exists() and f"]({png.relative_to(tmp_path).as_posix()})" in markdown
    # self-contained: every figure inline, nothing fetched
    images = page.count('src="data:image/png;base64,')
    assert images == sum(len(r.figures) for r in results)
    first = page.split('src="data:image/png;base64,')[1].split('"')[0]
    assert base64.b64decode(first)[:4] == b"\x89PNG" and "http" not in page.split("<body>")[1]
    assert "gradients.png" in markdown and "claims.json" in {f.name for f in files}
    assert "claim-attention-translation-across.png" in markdown
    # the long-dependency table shows mean [interval] (seeds) and the diverged run
    assert "diverged" in markdown


def test_report_is_logged_to_mlflow(tmp_path):
    pytest.importorskip("mlflow")
    claim = C.load_claim("claim-proposals")
    result = C.decide_claim(claim, _fixture_observations(claim), tmp_path)
    files = C.write_report([result], tmp_path, "m", quick=True)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = C.log_report(uri, files, tmp_path, True, [result])
    client = C._client(uri)
    names = {a.path for a in client.list_artifacts(run_id)}
    assert {"claims.html", "claims.md", "claims.json", "figures"} <= names
    assert client.get_run(run_id).data.tags[f"verdict.{claim.name}"] == result.verdict


def test_external_rows_come_from_results_files(tmp_path):
    import json

    (tmp_path / "r.json").write_text(json.dumps({"metrics": {"a/x": 0.9, "b/x": 0.5}}))
    raw = {
        "statement": "s",
        "external": [
            {"variant": "a", "metric": "x", "from": [{"file": "r.json", "key": "metrics.a/x"}]},
            {"variant": "b", "metric": "x", "from": [{"file": "r.json", "key": "metrics.b/x"}]},
            {"variant": "b", "metric": "x", "from": [{"file": "gone.json", "key": "metrics.b/x"}]},
        ],
        "rules": [
            {
                "name": "r",
                "metric": "x",
                "a": "a",
                "b": "b",
                "expect": "higher",
                "test": "every_seed",
            }
        ],
    }
    claim = C.Claim("c", "d", C.ClaimSpec.model_validate(raw), ["a", "b"])
    obs = C.external_observations(claim, f"sqlite:///{tmp_path / 'm.db'}", root=tmp_path)
    assert [(o.variant, o.metrics["x"]) for o in obs] == [("a", 0.9), ("b", 0.5)]
    assert C.decide(claim.spec.rules[0], obs).verdict == C.HOLDS
    # the shipped proposals claim reads the committed BCCD benchmark
    shipped = C.external_observations(
        C.load_claim("claim-proposals"), f"sqlite:///{tmp_path / 'm.db'}"
    )
    assert {o.variant for o in shipped} == {"rpn@300", "selective-search@2000"}


# ---------------------------------------------------------------------- copy memory


def test_copy_memory_data():
    pytest.importorskip("tensorflow")
    from data.sequences import generate_copy, load_generated

    x, y = generate_copy(4, 30, 8, np.random.default_rng(0))
    assert x.shape == y.shape == (4, 50)
    assert (x[:, :10] == y[:, -10:]).all() and (x[:, 40] == 10).all() and (y[:, :-10] == 0).all()
    assert x.min() >= 1 and set(np.unique(x[:, 10:40])) == {9}
    data = load_generated("copy", length=30, num_train=64, num_eval=16, batch_size=8)
    assert data.kind == "language_model" and data.info["vocab_size"] == 11
    assert data.info["sequence_length"] == 50


def test_gradient_through_time_profile():
    pytest.importorskip("tensorflow")
    import keras

    import models
    from pipelines.tasks.sequence import gradient_decay, gradient_through_time

    net = models.create_model(
        "rnn", input_dim=2, num_outputs=1, sequence_length=12, head="regression", units=8
    )
    net.compile(optimizer="adam", loss="mse")
    x = np.random.default_rng(0).uniform(size=(4, 12, 2)).astype("float32")
    profile = gradient_through_time(net, (x, np.ones((4, 1), "float32")))
    assert len(profile) == 12 and all(v >= 0 and math.isfinite(v) for v in profile)
    assert gradient_decay([1e-6] * 5 + [1.0] * 5) == pytest.approx(-6.0)
    lm = models.create_model("lstm", vocab_size=11, head="language_model", units=8)
    lm.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    tokens = np.random.default_rng(1).integers(1, 11, size=(3, 15)).astype("int32")
    assert len(gradient_through_time(lm, (tokens, tokens))) == 15


# ---------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_quick_report_end_to_end_then_reused(tmp_path, monkeypatch, capsys, mnist_dir, tfds_dir):
    from pipelines.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["report", "claims", "--quick", "--tracking-uri", uri, "--output", str(tmp_path / "r")]
    args += ["--set", f"runtime.work_dir={tmp_path / 'runs'}", "--set", "train.verbose=0"]
    assert main(args) == 0
    out = capsys.readouterr().out
    for name in CLAIMS:
        assert f"claims: {name}: " in out
    page = (tmp_path / "r" / "claims.html").read_text()
    for name in CLAIMS[:8]:  # the claims this report trains: every code path ran
        assert f"{name}: not run" not in page and f"{name}: " in page
    assert "Error:" not in page
    # the proposal rows come from the committed benchmark result
    assert "claim-proposals: not run" not in page
    # a second report trains nothing: the runs are found by their key
    assert main([*args, "--only", "claim-dropout", "--no-log"]) == 0
    again = capsys.readouterr().out
    assert "reused run" in again and "finished in" not in again


def test_no_train_decides_on_the_runs_there_are(tmp_path, capsys):
    pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out, results = C.report_claims(
        only=["claim-dropout", "claim-proposals"],
        output=tmp_path / "r",
        tracking_uri=uri,
        log_artifact=False,
        train=False,
    )
    verdicts = {r.name: r.verdict for r in results}
    assert verdicts == {"claim-dropout": C.NOT_RUN, "claim-proposals": C.HOLDS}
    assert "not run (--no-train)" in capsys.readouterr().out
    assert (out / "claims.html").exists() and (out / "claims.md").exists()
