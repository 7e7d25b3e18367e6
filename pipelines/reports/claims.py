"""``deeptrends report claims [--quick] [--only NAME]``: the survey's claims, decided.

Each shipped ``claim-*`` config carries a ``claim:`` block beside its ``variants:``: the
survey's statement, the seeds (at least 3), which variants the report runs, overrides
for the report (``set``) and for ``--quick``, what to plot, and the verdict rules::

    claim:
      statement: Dropout curbs over-fitting ...
      seeds: [1, 2, 3]
      quick: [train.epochs=1, train.steps_per_epoch=2]
      plot: {curves: [val_loss], bars: [eval_train_eval_gap]}
      # or across: [eval_bleu_len_1_4, eval_bleu_len_5, ...]: a family of metrics (buckets)
      # along the x axis, a line per variant
      rules:
        - {name: ..., metric: eval_train_eval_gap, a: dropout-0.5, b: no-dropout,
           expect: lower, test: every_seed}

Rules (``a``/``b`` name variants; ``a`` may be a list for ``threshold``):

- ``every_seed``: ``metric(a) < metric(b) - margin`` (``expect: lower``; ``higher``
  mirrors it) in every seed, paired by seed. Holds when every seed agrees, does not hold
  when none does, mixed otherwise.
- ``bootstrap``: the paired differences ``a - b`` over seeds, a 95% percentile bootstrap
  interval of their mean (10,000 resamples, seeded). ``expect: lower``: holds when the
  interval lies below ``-margin``, does not hold when it lies above it, mixed when it
  straddles. ``expect: similar``: the relative difference ``(a - b) / b``; holds when the
  interval lies inside ``+-margin``, does not hold when wholly outside, mixed otherwise.
- ``threshold``: ``metric(v) < value`` (``lower``) or ``> value`` (``higher``) for every
  listed variant in every seed.

A run that diverged (NaN loss) counts as the worst value of its metric (``+inf`` for a
lower-is-better metric such as a loss or MSE); ``missing: high|low`` says what a metric
a finished run never logged counts as (``epochs_to_target`` when the target was never
reached); otherwise such a seed is left out. A claim holds when all its rules hold, does
not hold when none does, and is mixed otherwise; a rule with no data is "not run".

Claims about detection and captioning are not trained here (each is a 25-minute run of
its own config): ``external:`` fills their rows from benchmark results
(``benchmarks/results/*.json``) and from the finished MLflow runs of those configs.
``measure: recurrent_step_time`` times the LSTM and GRU alone, alternating in this
process on the same batch and length.

Runs go through ``pipelines.train.run_experiment`` (the config's variants, one seed at a
time: ``runtime.seed``); each is tagged ``claim.key`` (the run key of its resolved
config, ``pipelines.resume.run_key``), ``claim.seed`` and ``claim.mode``, and a finished
run with the same key is reused, so a second ``report claims`` trains nothing. The report,
``claims.html`` (self-contained: figures embedded) and ``claims.md`` (its Markdown twin,
figures beside it), plus ``claims.json``, goes to ``--output`` (default
``reports/claims/``, ``reports/claims-quick/`` with ``--quick``) and is logged as the
artifacts of a run named ``claims-report`` in the MLflow experiment ``claims``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pipelines.config import ConfigError, read_yaml, resolve_config_path, shipped_config_paths
from pipelines.io import write_text_atomic

log = logging.getLogger(__name__)

# the order of the report: the survey's CNN claims, then the recurrent ones, then the rows
# filled from detection and captioning
ORDER = (
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
HOLDS, FAILS, MIXED, NOT_RUN = "holds", "does not hold", "mixed", "not run"
REPORT_EXPERIMENT = "claims"
REPO_ROOT = Path(__file__).resolve().parents[2]  # where benchmarks/results/ lives
BOOTSTRAP_RESAMPLES = 10_000


# ---------------------------------------------------------------------- the claim block


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Rule(_Strict):
    """One verdict rule: the metric, the comparison, the threshold."""

    name: str
    metric: str
    a: str | list[str]
    b: str | None = None
    expect: Literal["lower", "higher", "similar"]
    test: Literal["every_seed", "bootstrap", "threshold"]
    margin: float = Field(0.0, ge=0.0)
    value: float | None = None
    missing: Literal["high", "low", "skip"] = "skip"

    @field_validator("a")
    @classmethod
    def _non_empty(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("a: name at least one variant")
        return v

    def variants_a(self) -> list[str]:
        return [self.a] if isinstance(self.a, str) else list(self.a)

    def check(self) -> None:
        if self.test == "threshold":
            if self.value is None or self.b is not None or self.expect == "similar":
                raise ValueError(
                    f"rule {self.name!r}: a threshold rule takes a, value and expect lower|higher"
                )
        else:
            if self.b is None or not isinstance(self.a, str):
                raise ValueError(f"rule {self.name!r}: a {self.test} rule compares a and b")
            if self.expect == "similar" and self.test != "bootstrap":
                raise ValueError(f"rule {self.name!r}: expect similar needs test bootstrap")


class Source(_Strict):
    """Where an external row's values come from: a results JSON file (``key`` a dotted
    path, the first dot after ``metrics`` only) or the finished runs of an MLflow
    experiment (``key`` a metric name; ``variant`` narrows by the run's variant tag)."""

    file: str | None = None
    experiment: str | None = None
    variant: str | None = None
    key: str


class External(_Strict):
    variant: str
    metric: str
    sources: list[Source] = Field(alias="from")


class PlotSpec(_Strict):
    curves: list[str] = Field(default_factory=list)
    bars: list[str] = Field(default_factory=list)
    x: str | None = None  # a param: metric against it, a line per group
    group: list[str] = Field(default_factory=list)  # variant-name prefixes
    across: list[str] = Field(default_factory=list)  # metrics along the x axis (buckets)
    gradient_through_time: bool = False


class ClaimSpec(_Strict):
    statement: str
    seeds: list[int] = Field(default_factory=list)
    variants: list[str] | None = None
    set: list[str] = Field(default_factory=list)
    quick: list[str] = Field(default_factory=list)
    quick_variants: list[str] | None = None
    quick_seeds: int = Field(1, ge=1)
    measure: Literal["recurrent_step_time"] | None = None
    external: list[External] = Field(default_factory=list)
    plot: PlotSpec = Field(default_factory=PlotSpec)
    rules: list[Rule]


@dataclass
class Claim:
    name: str
    description: str
    spec: ClaimSpec
    variant_names: list[str]


def claim_names() -> list[str]:
    """The shipped configs with a ``claim:`` block, in the report's order."""
    found = [
        n for n, p in shipped_config_paths().items() if n.startswith("claim-") and _has_claim(p)
    ]
    return sorted(found, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))


def _has_claim(path: Path) -> bool:
    return "claim" in read_yaml(path)


def load_claim(name: str) -> Claim:
    """A claim config's ``claim:`` block, validated (every rule names known variants)."""
    path = resolve_config_path(name)
    raw = read_yaml(path)
    if "claim" not in raw:
        raise ConfigError(f"{path}: no claim: block (see pipelines/reports/claims.py)")
    try:
        spec = ClaimSpec.model_validate(raw["claim"])
        for rule in spec.rules:
            rule.check()
    except ValidationError as err:
        lines = [f"{path}: invalid claim block:"]
        for e in err.errors():
            where = "claim." + ".".join(str(p) for p in e["loc"])
            lines.append(f"  {where}: {e['msg']} (got {e.get('input')!r})")
        raise ConfigError("\n".join(lines)) from None
    except ValueError as exc:
        raise ConfigError(f"{path}: claim.{exc}") from None
    declared = [v["name"] for v in raw.get("variants") or [] if isinstance(v, dict)]
    names = sorted({*declared, *(e.variant for e in spec.external)})
    if not spec.external and len(spec.seeds) < 3:
        raise ConfigError(f"{path}: claim.seeds: at least 3 seeds. Got {spec.seeds}")
    for field_name, chosen in (
        ("variants", spec.variants),
        ("quick_variants", spec.quick_variants),
    ):
        for v in chosen or []:
            if v not in names:
                raise ConfigError(f"{path}: claim.{field_name}: {v!r} is not a variant ({names})")
    for rule in spec.rules:
        for v in [*rule.variants_a(), *([rule.b] if rule.b else [])]:
            if v not in names:
                raise ConfigError(
                    f"{path}: claim.rules {rule.name!r}: {v!r} is not a variant. "
                    f"Variants: {', '.join(names)}"
                )
    return Claim(name, raw.get("description", ""), spec, names)


# ---------------------------------------------------------------------- observations


@dataclass
class Observation:
    """One run of one variant and seed (or one external value)."""

    variant: str
    seed: int
    metrics: dict[str, float]
    params: dict[str, str] = field(default_factory=dict)
    run_id: str | None = None
    status: str = "finished"  # finished | reused | diverged | external
    seconds: float = 0.0
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    gradient_profiles: dict[str, list[float]] = field(default_factory=dict)
    source: str = ""


def series(observations: list[Observation], variant: str, metric: str, missing="skip"):
    """``{seed: value}`` of ``metric`` for ``variant``: a diverged run counts as the
    metric's worst value; a metric a finished run never logged as ``missing`` says."""
    from pipelines.tracking import metric_mode

    out: dict[int, float] = {}
    for o in observations:
        if o.variant != variant:
            continue
        value = o.metrics.get(metric)
        if o.status == "diverged" and (value is None or not math.isfinite(value)):
            value = math.inf if metric_mode(metric) == "min" else -math.inf
        if value is None:
            if missing == "skip":
                continue
            value = math.inf if missing == "high" else -math.inf
        out[o.seed] = float(value)
    return out


# ---------------------------------------------------------------------- verdicts


@dataclass
class RuleResult:
    name: str
    verdict: str
    why: str
    metric: str
    values: dict[str, dict[int, float]] = field(default_factory=dict)
    interval: tuple[float, float] | None = None


def bootstrap_interval(
    diffs: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """A percentile bootstrap interval of the mean of ``diffs``."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(diffs), size=(resamples, len(diffs)))
    means = diffs[picks].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and not math.isfinite(v):
        return "diverged" if v > 0 else "-inf"
    return f"{v:.4g}"


def _unit(observations: list[Observation], values: dict, metric: str) -> str:
    """What the numbers behind a rule are: "round" when every one is a timing round
    (status ``measured``), else "seed"."""
    behind = [o for o in observations if o.variant in values and o.metrics.get(metric) is not None]
    return "round" if behind and all(o.status == "measured" for o in behind) else "seed"


def decide(rule: Rule, observations: list[Observation]) -> RuleResult:
    """The rule's verdict on these observations, and why, in words."""
    lower = rule.expect == "lower"
    values = {
        v: series(observations, v, rule.metric, rule.missing)
        for v in [*rule.variants_a(), *([rule.b] if rule.b else [])]
    }
    result = RuleResult(rule.name, NOT_RUN, "", rule.metric, values)
    unit = _unit(observations, values, rule.metric)
    if rule.test == "threshold":
        sign = "<" if lower else ">"
        checks, missing = [], []
        for v in rule.variants_a():
            if not values[v]:
                missing.append(v)
            for seed, x in sorted(values[v].items()):
                checks.append((v, seed, x, x < rule.value if lower else x > rule.value))
        if not checks:
            result.why = f"no runs of {', '.join(missing)} with {rule.metric}"
            return result
        passed = sum(c[3] for c in checks)
        result.verdict = HOLDS if passed == len(checks) else FAILS if passed == 0 else MIXED
        detail = "; ".join(f"{v} {unit} {s}: {_fmt(x)}" for v, s, x, _ in checks)
        result.why = (
            f"{passed} of {len(checks)} runs have {rule.metric} {sign} {rule.value:g} ({detail})"
        )
        if missing:
            result.why += f"; not run: {', '.join(missing)}"
            if result.verdict == HOLDS:
                result.verdict = MIXED
        return result

    a, b = values[rule.a], values[rule.b]
    seeds = sorted(set(a) & set(b))
    if not seeds:
        result.why = f"no paired runs of {rule.a} and {rule.b} with {rule.metric}"
        return result
    pairs = [(s, a[s], b[s]) for s in seeds]
    detail = "; ".join(f"{unit} {s}: {_fmt(x)} vs {_fmt(y)}" for s, x, y in pairs)
    if rule.test == "every_seed":
        sign = "<" if lower else ">"
        ok = [(x < y - rule.margin) if lower else (x > y + rule.margin) for _, x, y in pairs]
        n = sum(ok)
        result.verdict = HOLDS if n == len(ok) else FAILS if n == 0 else MIXED
        margin = f" by more than {rule.margin:g}" if rule.margin else ""
        result.why = (
            f"{rule.a} {sign} {rule.b}{margin} on {rule.metric} in {n} of {len(ok)} {unit}s "
            f"({detail})"
        )
        return result
    # bootstrap over the paired differences
    finite = [(s, x, y) for s, x, y in pairs if math.isfinite(x) and math.isfinite(y)]
    if len(finite) < 2:
        result.why = f"fewer than 2 finite pairs for a bootstrap ({detail})"
        result.verdict = NOT_RUN if not finite else MIXED
        return result
    if rule.expect == "similar":
        diffs = np.array([(x - y) / abs(y) for _, x, y in finite if y != 0])
        lo, hi = bootstrap_interval(diffs)
        result.interval = (lo, hi)
        inside = -rule.margin <= lo and hi <= rule.margin
        outside = hi < -rule.margin or lo > rule.margin
        result.verdict = HOLDS if inside else FAILS if outside else MIXED
        result.why = (
            f"relative difference ({rule.a} - {rule.b}) / {rule.b} on {rule.metric}: mean "
            f"{diffs.mean():+.3f}, 95% bootstrap interval [{lo:+.3f}, {hi:+.3f}] against "
            f"+-{rule.margin:g} over {len(diffs)} {unit}s ({detail})"
        )
        return result
    diffs = np.array([x - y for _, x, y in finite])
    lo, hi = bootstrap_interval(diffs)
    result.interval = (lo, hi)
    if lower:
        good, bad = hi < -rule.margin, lo > -rule.margin
    else:
        good, bad = lo > rule.margin, hi < rule.margin
    result.verdict = HOLDS if good else FAILS if bad else MIXED
    result.why = (
        f"{rule.a} - {rule.b} on {rule.metric}: mean {diffs.mean():+.4g}, 95% bootstrap "
        f"interval [{lo:+.4g}, {hi:+.4g}] over {len(diffs)} {unit}s ({detail})"
    )
    return result


def claim_verdict(results: list[RuleResult]) -> tuple[str, str]:
    """Over the rules that had their runs: all hold -> holds; none holds -> does not hold;
    else mixed (``why`` says how many were not run)."""
    decided = [r for r in results if r.verdict != NOT_RUN]
    if not decided:
        return NOT_RUN, "no rule had the runs it needs"
    counts = {v: sum(r.verdict == v for r in decided) for v in (HOLDS, FAILS, MIXED)}
    why = f"{counts[HOLDS]} of {len(results)} rules hold, {counts[FAILS]} do not"
    if counts[MIXED]:
        why += f", {counts[MIXED]} mixed"
    if len(decided) < len(results):
        why += f", {len(results) - len(decided)} not run"
    if counts[HOLDS] == len(decided):
        return HOLDS, why
    if counts[FAILS] == len(decided):
        return FAILS, why
    return MIXED, why


# ---------------------------------------------------------------------- running


def _client(uri: str):
    """A client on ``uri`` alone (``mlflow.set_tracking_uri`` would also write it into
    ``os.environ`` for every later child process)."""
    import mlflow

    return mlflow.MlflowClient(tracking_uri=uri)


def _from_run(client, run, variant: str, seed: int, status: str, curves: list[str]):
    params = dict(run.data.params)
    obs = Observation(
        variant,
        seed,
        {k: float(v) for k, v in run.data.metrics.items()},
        params,
        run.info.run_id,
        status,
        seconds=((run.info.end_time or run.info.start_time) - run.info.start_time) / 1000.0,
    )
    for m in curves:
        points = sorted((h.step, h.value) for h in client.get_metric_history(run.info.run_id, m))
        if points:
            obs.curves[m] = points
    return obs


def _gradient_profiles(client, run_id: str) -> dict[str, list[float]]:
    import tempfile

    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = client.download_artifacts(run_id, "gradient_through_time.json", tmp)
            return json.loads(Path(path).read_text())
    except Exception as exc:  # an artifact store without it: the plot goes without this run
        log.info("no gradient_through_time.json in run %s: %s", run_id, exc)
        return {}


def _runs_with_key(client, experiment: str, key: str, max_results: int) -> list:
    """The newest runs tagged ``claim.key`` = ``key`` in ``experiment``, newest first."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return client.search_runs(
        [exp.experiment_id],
        f"tags.`claim.key` = '{key}'",
        order_by=["attributes.start_time DESC"],
        max_results=max_results,
    )


def find_run(client, experiment: str, key: str):
    """The latest finished run with ``claim.key`` = ``key`` (or one that diverged), or None."""
    for r in _runs_with_key(client, experiment, key, 20):
        if r.info.status == "FINISHED" or r.data.tags.get("claim.outcome") == "diverged":
            return r
    return None


def plan(claim: Claim, quick: bool, overrides: list[str]):
    """``[(variant, seed, config)]`` of the runs the claim asks for."""
    from pipelines.resume import run_key
    from pipelines.variants import load_runs

    spec = claim.spec
    if not claim.variant_names or spec.external:
        return []
    seeds = spec.seeds[: spec.quick_seeds] if quick else spec.seeds
    only = (spec.quick_variants or spec.variants) if quick else spec.variants
    sets = [*spec.set, *(spec.quick if quick else []), *overrides]
    out = []
    for seed in seeds:
        for config in load_runs(claim.name, [*sets, f"runtime.seed={seed}"], only=only):
            key = run_key(config)
            tags = {
                **config.tracking.tags,
                "claim.key": key,
                "claim.seed": str(seed),
                "claim.mode": "quick" if quick else "full",
            }
            config.tracking.tags = tags
            out.append((config.tracking.run_name, seed, key, config))
    return out


def run_claim(
    claim: Claim,
    uri: str,
    quick: bool = False,
    overrides: list[str] | None = None,
    train: bool = True,
):
    """Train what is missing of a claim's runs (reusing finished ones; with ``train``
    false only those, the rest left out); its observations."""
    from pipelines.train import TrainingDiverged, check_config, run_experiment

    client = _client(uri)
    runs = plan(claim, quick, list(overrides or []))
    for _, _, _, config in runs:
        config.tracking.uri = uri  # after the key: the same runs, whichever way the store is named
        check_config(config)  # every run's config is checked before the first trains
    curves = list(dict.fromkeys(claim.spec.plot.curves))
    out = []
    for variant, seed, key, config in runs:
        existing = find_run(client, config.experiment_name, key)
        status = "reused"
        if existing is None and not train:
            print(f"claims: {claim.name} {variant} seed {seed}: not run (--no-train)")
            continue
        if existing is None:
            started = time.time()
            status = "finished"
            try:
                run_experiment(config)
            except TrainingDiverged as exc:
                status = "diverged"
                log.warning("%s %s seed %s diverged: %s", claim.name, variant, seed, exc)
                latest = _latest_with_key(client, config.experiment_name, key)
                if latest is not None:
                    client.set_tag(latest.info.run_id, "claim.outcome", "diverged")
            existing = (
                find_run(client, config.experiment_name, key)
                if status == "finished"
                else _latest_with_key(client, config.experiment_name, key)
            )
            print(
                f"claims: {claim.name} {variant} seed {seed}: {status} in "
                f"{time.time() - started:.1f} s",
                flush=True,
            )
        else:
            print(f"claims: {claim.name} {variant} seed {seed}: reused run {existing.info.run_id}")
        if existing is None:
            continue
        obs = _from_run(client, existing, variant, seed, status, curves)
        if existing.data.tags.get("claim.outcome") == "diverged":
            obs.status = "diverged"
        if claim.spec.plot.gradient_through_time:
            obs.gradient_profiles = _gradient_profiles(client, existing.info.run_id)
        out.append(obs)
    return out


def _latest_with_key(client, experiment: str, key: str):
    runs = _runs_with_key(client, experiment, key, 1)
    return runs[0] if runs else None


def external_observations(claim: Claim, uri: str, root: Path | None = None) -> list[Observation]:
    """The rows a claim fills from results files and other configs' MLflow runs."""
    root = root or REPO_ROOT
    client = None
    out = []
    for ext in claim.spec.external:
        seed = 0
        for src in ext.sources:
            values: list[tuple[float, str]] = []
            if src.file:
                path = Path(src.file) if Path(src.file).is_absolute() else root / src.file
                if path.exists():
                    value = _json_key(json.loads(path.read_text()), src.key)
                    if value is not None:
                        values.append((float(value), src.file))
            else:
                client = client or _client(uri)
                exp = client.get_experiment_by_name(src.experiment)
                if exp is not None:
                    query = "attributes.status = 'FINISHED'"
                    if src.variant:
                        query += f" and tags.variant = '{src.variant}'"
                    for r in client.search_runs([exp.experiment_id], query, max_results=100):
                        if src.key in r.data.metrics:
                            values.append(
                                (
                                    r.data.metrics[src.key],
                                    f"mlflow {src.experiment}/{r.info.run_id}",
                                )
                            )
            for value, where in values:
                seed += 1
                out.append(
                    Observation(
                        ext.variant, seed, {ext.metric: value}, status="external", source=where
                    )
                )
    return out


def _json_key(data: dict, key: str):
    """``metrics.rpn/recall300_iou50`` -> data["metrics"]["rpn/recall300_iou50"]."""
    head, _, rest = key.partition(".")
    value = data.get(head) if isinstance(data, dict) else None
    if rest and isinstance(value, dict):
        return value.get(rest)
    return value if not rest else None


def measure_recurrent_step_time(quick: bool = False) -> list[Observation]:
    """Seconds per training step of the LSTM and the GRU alone: the same batch (32),
    length (35), embedding and units as ``claim-lstm-vs-gru``'s language models, timed
    alternately in this process after a warm-up. Each round is one ``measured``
    observation (its ``seed`` is the round's number; tables and rules call it a round).
    ``num_params`` comes from the trained runs, not from here."""
    import keras

    import models

    vocab, length, batch = 2000, 35, 32
    steps, rounds = (2, 2) if quick else (10, 5)
    rng = np.random.default_rng(0)
    x = rng.integers(1, vocab, size=(batch, length)).astype("int32")
    y = rng.integers(1, vocab, size=(batch, length)).astype("int32")
    nets = {}
    for cell in ("gru", "lstm"):
        net = models.create_model(f"{cell}_lm", vocab_size=vocab, embedding_dim=128, units=256)
        net.compile(
            optimizer="adam",
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        net.train_on_batch(x, y)
        nets[cell] = net
    out = []
    for r in range(rounds):
        for cell, net in nets.items():
            started = time.perf_counter()
            for _ in range(steps):
                net.train_on_batch(x, y)
            seconds = (time.perf_counter() - started) / steps
            out.append(
                Observation(
                    f"lm-{cell}",
                    r + 1,
                    {"seconds_per_step_alone": seconds},
                    status="measured",
                    source=f"timed alone, batch {batch} x {length}, vocab {vocab}",
                )
            )
    return out


# ---------------------------------------------------------------------- figures


def _stats(values: list[float]) -> tuple[float, float, float]:
    """Mean and a 95% t interval (min/max with one value)."""
    from scipy import stats

    arr = np.array([v for v in values if math.isfinite(v)], dtype=float)
    if len(arr) == 0:
        return math.nan, math.nan, math.nan
    mean = float(arr.mean())
    if len(arr) < 2:
        return mean, mean, mean
    half = float(stats.t.ppf(0.975, len(arr) - 1) * arr.std(ddof=1) / math.sqrt(len(arr)))
    return mean, mean - half, mean + half


def plot_bars(observations, variants, metrics, path: Path, title: str) -> Path | None:
    """A panel per metric: a bar per variant (mean over seeds, 95% t interval), the seeds
    as points; a diverged run as a red x at the top."""
    from pipelines.plots import panel_grid, save_figure

    metrics = [m for m in metrics if any(m in o.metrics for o in observations)]
    if not metrics:
        return None
    fig, axes = panel_grid(len(metrics))
    for ax, m in zip(axes, metrics, strict=False):
        names = [v for v in variants if series(observations, v, m)]
        for i, v in enumerate(names):
            vals = list(series(observations, v, m).values())
            mean, lo, hi = _stats(vals)
            if math.isfinite(mean):
                ax.bar(i, mean, color="#8fb3d9", yerr=[[mean - lo], [hi - mean]], capsize=4)
            finite = [x for x in vals if math.isfinite(x)]
            ax.plot([i] * len(finite), finite, "k.", ms=5)
            if len(finite) < len(vals):
                top = max([*finite, 0.0]) or 1.0
                ax.plot([i], [top], "rx", ms=8)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
        ax.set_title(m, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    return save_figure(fig, path, title)


def plot_curves(observations, variants, metrics, path: Path, title: str) -> Path | None:
    """A panel per metric: the mean curve over seeds per variant, min-max band."""
    from pipelines.plots import panel_grid, save_figure

    metrics = [m for m in metrics if any(m in o.curves for o in observations)]
    if not metrics:
        return None
    fig, axes = panel_grid(len(metrics))
    for ax, m in zip(axes, metrics, strict=False):
        for v in variants:
            runs = [o.curves[m] for o in observations if o.variant == v and m in o.curves]
            if not runs:
                continue
            n = min(len(r) for r in runs)
            steps = [p[0] for p in runs[0][:n]]
            vals = np.array([[p[1] for p in r[:n]] for r in runs], dtype=float)
            (line,) = ax.plot(steps, np.nanmean(vals, axis=0), label=f"{v} ({len(runs)})")
            if len(runs) > 1:
                ax.fill_between(
                    steps, np.nanmin(vals, 0), np.nanmax(vals, 0), alpha=0.2, color=line.get_color()
                )
        if m.startswith("grad_norm") or "loss" in m:
            ax.set_yscale("log")
        ax.set_title(m, fontsize=9)
        ax.set_xlabel("logged step (the epoch for per-epoch metrics)", fontsize=7)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    return save_figure(fig, path, title)


def _group_of(variant: str, groups: list[str]) -> str | None:
    # the longest matching prefix: rnn-noclip-T50 is "rnn-noclip", not "rnn"
    matches = [g for g in groups if variant.startswith(g + "-") or variant == g]
    return max(matches, key=len) if matches else None


def plot_against(observations, spec: PlotSpec, metrics, path: Path, title: str) -> Path | None:
    """Metric against ``spec.x`` (a param), a line per variant group, 95% t intervals."""
    from pipelines.plots import panel_grid, save_figure

    metrics = [m for m in metrics if any(m in o.metrics for o in observations)]
    if not metrics or not spec.x:
        return None
    fig, axes = panel_grid(len(metrics))
    for ax, m in zip(axes, metrics, strict=False):
        for g in spec.group:
            points: dict[float, list[float]] = {}
            for o in observations:
                if _group_of(o.variant, spec.group) != g or spec.x not in o.params:
                    continue
                value = series([o], o.variant, m).get(o.seed)
                if value is not None:
                    points.setdefault(float(o.params[spec.x]), []).append(value)
            if not points:
                continue
            xs = sorted(points)
            st = [_stats(points[x]) for x in xs]
            means = np.array([s[0] for s in st])
            err = np.array([[s[0] - s[1] for s in st], [s[2] - s[0] for s in st]])
            ax.errorbar(xs, means, yerr=np.nan_to_num(err), marker="o", capsize=3, label=g)
        ax.set_xlabel(spec.x)
        ax.set_title(m, fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    return save_figure(fig, path, title)


def _common_affix(names: list[str]) -> tuple[str, str]:
    import os

    prefix = os.path.commonprefix(names)
    suffix = os.path.commonprefix([n[::-1] for n in names])[::-1] if len(names) > 1 else ""
    return prefix, suffix


def plot_across(observations, variants, metrics, path: Path, title: str) -> Path | None:
    """A family of metrics (``eval_bleu_len_1_4``, ``eval_bleu_len_5``, ...) along the x
    axis in the given order, a line per variant: the mean over seeds, 95% t intervals
    (Bahdanau et al.'s Fig. 2: BLEU against sentence length, with and without attention)."""
    from pipelines.plots import panel_grid, save_figure

    metrics = [m for m in metrics if any(m in o.metrics for o in observations)]
    if not metrics:
        return None
    prefix, suffix = _common_affix(metrics)
    # eval_bleu_len_1_4 -> 1-4, eval_bleu_len_7_plus -> 7+
    labels = [
        (m[len(prefix) : len(m) - len(suffix)] or m).replace("_plus", "+").replace("_", "-")
        for m in metrics
    ]
    fig, axes = panel_grid(1, width=max(5.0, 1.2 * len(metrics)))
    ax = axes[0]
    for v in variants:
        points = [(i, series(observations, v, m)) for i, m in enumerate(metrics)]
        points = [(i, list(vals.values())) for i, vals in points if vals]
        if not points:
            continue
        st = [_stats(vals) for _, vals in points]
        means = np.array([s[0] for s in st])
        err = np.array([[s[0] - s[1] for s in st], [s[2] - s[0] for s in st]])
        xs = [i for i, _ in points]
        runs = max(len(vals) for _, vals in points)
        ax.errorbar(
            xs, means, yerr=np.nan_to_num(err), marker="o", capsize=3, label=f"{v} ({runs})"
        )
    ax.set_xticks(range(len(metrics)), labels)
    ax.set_xlabel(f"{prefix}*{suffix}".strip("_") if prefix or suffix else "metric", fontsize=8)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return save_figure(fig, path, title)


def plot_gradient_profiles(observations, spec: PlotSpec, path: Path, title: str) -> Path | None:
    """``||dL/dx_t||`` against t: a panel per length, a line per group (mean over seeds),
    before training (dashed) and after (solid)."""
    from pipelines.plots import panel_grid, save_figure

    by_length: dict[str, dict[str, list[dict]]] = {}
    for o in observations:
        if o.gradient_profiles:
            length = o.params.get(spec.x or "", "?")
            group = _group_of(o.variant, spec.group) or o.variant
            by_length.setdefault(length, {}).setdefault(group, []).append(o.gradient_profiles)
    if not by_length:
        return None
    lengths = sorted(by_length, key=lambda s: float(s) if s.replace(".", "").isdigit() else 0)
    fig, axes = panel_grid(len(lengths))
    for ax, length in zip(axes, lengths, strict=False):
        for g, profiles in by_length[length].items():
            colour = None
            for when, style in (("trained", "-"), ("init", "--")):
                curves = [p[when] for p in profiles if when in p]
                if not curves:
                    continue
                n = min(len(c) for c in curves)
                mean = np.mean([c[:n] for c in curves], axis=0)
                (line,) = ax.plot(
                    range(1, n + 1),
                    np.maximum(mean, 1e-30),
                    style,
                    color=colour,
                    label=f"{g} {when}",
                )
                colour = line.get_color()
        ax.set_yscale("log")
        ax.set_xlabel("time step t")
        ax.set_ylabel("||dL/dx_t||")
        ax.set_title(f"{spec.x} = {length}", fontsize=9)
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3)
    return save_figure(fig, path, title)


# ---------------------------------------------------------------------- the report


@dataclass
class ClaimResult:
    name: str
    statement: str
    setup: str
    verdict: str
    why: str
    rules: list[RuleResult]
    observations: list[Observation]
    figures: list[tuple[str, Path]] = field(default_factory=list)
    table_metrics: list[str] = field(default_factory=list)
    variants: list[str] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["figures"] = [[c, str(p)] for c, p in self.figures]
        for o in d["observations"]:
            o.pop("curves", None)
            o.pop("gradient_profiles", None)
        return d


def setup_text(claim: Claim, observations: list[Observation], quick: bool) -> str:
    spec = claim.spec
    if spec.external:
        sources = sorted({o.source for o in observations}) or ["none found"]
        return f"{claim.description}. Filled from: {'; '.join(sources)}."
    variants = (spec.quick_variants or spec.variants) if quick else spec.variants
    seeds = spec.seeds[: spec.quick_seeds] if quick else spec.seeds
    sets = [*spec.set, *(spec.quick if quick else [])]
    text = (
        f"{claim.description}. Config {claim.name}; variants "
        f"{', '.join(variants or claim.variant_names)}; seeds {', '.join(map(str, seeds))}"
    )
    if sets:
        text += f"; with --set {' '.join(sets)}"
    return text + "."


def decide_claim(
    claim: Claim, observations: list[Observation], out: Path, quick: bool = False
) -> ClaimResult:
    """Verdicts, figures and the table of one claim from its observations."""
    spec = claim.spec
    rules = [decide(rule, observations) for rule in spec.rules]
    verdict, why = claim_verdict(rules)
    seen = list(dict.fromkeys(o.variant for o in observations))
    variants = [v for v in (spec.variants or claim.variant_names) if v in seen] + [
        v for v in seen if v not in (spec.variants or claim.variant_names)
    ]
    metrics = list(
        dict.fromkeys([*(r.metric for r in spec.rules), *spec.plot.bars, *spec.plot.across])
    )
    if spec.measure and "seconds_per_step_alone" not in metrics:  # a rule may name it already
        metrics.append("seconds_per_step_alone")
    figures = []
    folder = out / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    title = f"{claim.name} ({verdict})"
    if spec.plot.x:
        png = plot_against(observations, spec.plot, metrics, folder / f"{claim.name}-x.png", title)
        if png:
            figures.append(
                (f"metrics against {spec.plot.x}, a line per cell (95% t intervals)", png)
            )
    else:
        png = plot_bars(observations, variants, metrics, folder / f"{claim.name}-bars.png", title)
        if png:
            figures.append(
                ("a bar per variant: mean over seeds, 95% t interval, seeds as dots", png)
            )
    if spec.plot.across:
        png = plot_across(
            observations, variants, spec.plot.across, folder / f"{claim.name}-across.png", title
        )
        if png:
            figures.append(
                ("a line per variant across the metrics (mean over seeds, 95% t interval)", png)
            )
    png = plot_curves(
        observations, variants, spec.plot.curves, folder / f"{claim.name}-curves.png", title
    )
    if png:
        figures.append(("curves: the mean over seeds, min-max band", png))
    if spec.plot.gradient_through_time:
        png = plot_gradient_profiles(
            observations, spec.plot, folder / f"{claim.name}-gradients.png", title
        )
        if png:
            figures.append(("||dL/dx_t|| through time, before (dashed) and after training", png))
    return ClaimResult(
        claim.name,
        " ".join(spec.statement.split()),
        setup_text(claim, observations, quick),
        verdict,
        why,
        rules,
        observations,
        figures,
        metrics,
        variants,
        seconds=sum(o.seconds for o in observations if o.status == "finished"),
    )


def _runs_cell(obs: list[Observation]) -> str:
    """``3 (finished)``; timing rounds counted apart: ``3 (finished) + 5 timing rounds``."""
    runs = [o for o in obs if o.status != "measured"]
    rounds = len(obs) - len(runs)
    cell = f"{len(runs)} ({', '.join(sorted({o.status for o in runs}))})" if runs else ""
    if rounds:
        cell += f"{' + ' if cell else ''}{rounds} timing round{'s' if rounds > 1 else ''}"
    return cell


def table_rows(result: ClaimResult) -> tuple[list[str], list[list[Any]]]:
    """A row per variant: for each metric the mean, the 95% t interval and the seeds."""
    header = ["variant", "runs", *result.table_metrics]
    rows = []
    for v in result.variants:
        obs = [o for o in result.observations if o.variant == v]
        row: list[Any] = [v, _runs_cell(obs)]
        for m in result.table_metrics:
            vals = list(series(result.observations, v, m).values())
            if not vals:
                row.append(None)
                continue
            mean, lo, hi = _stats(vals)
            seeds = ", ".join(_fmt(x) for x in vals)
            row.append(
                f"{_fmt(mean)} [{_fmt(lo)}, {_fmt(hi)}] ({seeds})" if len(vals) > 1 else seeds
            )
        rows.append(row)
    return header, rows


def render_html(results: list[ClaimResult], meta: str, title: str) -> str:
    from pipelines.reports import html

    summary = html.table(
        [[r.name, r.verdict, r.why, r.statement] for r in results],
        ["claim", "verdict", "why", "the survey's claim"],
        "summary",
    )
    sections = [html.paragraph(meta, "meta"), html.section("Verdicts", summary)]
    for r in results:
        header, rows = table_rows(r)
        parts = [
            html.paragraph(f"Claim: {r.statement}"),
            html.paragraph(f"Setup: {r.setup}", "meta"),
            html.paragraph(f"Verdict: {r.verdict} ({r.why}).", verdict_css(r.verdict)),
        ]
        if r.error:
            parts.append(html.paragraph(f"Error: {r.error}", "meta"))
        parts += [html.figure(png, caption) for caption, png in r.figures]
        parts.append(html.table(rows, header))
        parts.append(
            html.table([[x.name, x.verdict, x.why] for x in r.rules], ["rule", "verdict", "why"])
        )
        sections.append(html.section(f"{r.name}: {r.verdict}", *parts))
    return html.page(title, *sections)


def verdict_css(verdict: str) -> str:
    return {HOLDS: "champion", FAILS: "challenger"}.get(verdict, "meta")


def _md(value: Any) -> str:
    text = "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(results: list[ClaimResult], meta: str, title: str, out: Path) -> str:
    lines = [f"# {title}", "", meta, "", "| claim | verdict | why |", "| --- | --- | --- |"]
    lines += [f"| {r.name} | **{r.verdict}** | {_md(r.why)} |" for r in results]
    for r in results:
        header, rows = table_rows(r)
        lines += ["", f"## {r.name}: {r.verdict}", "", f"**Claim.** {r.statement}", ""]
        lines += [f"**Setup.** {r.setup}", "", f"**Verdict: {r.verdict}** ({r.why}).", ""]
        if r.error:
            lines += [f"Error: {r.error}", ""]
        for caption, png in r.figures:
            lines += [f"![{caption}]({png.relative_to(out).as_posix()})", ""]
        lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        lines += ["| " + " | ".join(_md(c) for c in row) + " |" for row in rows]
        lines += ["", "| rule | verdict | why |", "| --- | --- | --- |"]
        lines += [f"| {_md(x.name)} | {x.verdict} | {_md(x.why)} |" for x in r.rules]
    return "\n".join(lines) + "\n"


def write_report(results: list[ClaimResult], out: Path, meta: str, quick: bool) -> list[Path]:
    title = "deeptrends: the survey's claims" + (" (--quick: code paths only)" if quick else "")
    out.mkdir(parents=True, exist_ok=True)
    html_path = write_text_atomic(out / "claims.html", render_html(results, meta, title))
    md_path = write_text_atomic(out / "claims.md", render_markdown(results, meta, title, out))
    json_path = write_text_atomic(
        out / "claims.json",
        json.dumps(
            {"meta": meta, "quick": quick, "claims": [r.to_dict() for r in results]},
            indent=2,
            default=str,
        )
        + "\n",
    )
    return [html_path, md_path, json_path, *(p for r in results for _, p in r.figures)]


def log_report(uri: str, files: list[Path], out: Path, quick: bool, results) -> str:
    """The report's files as the artifacts of a ``claims-report`` run in ``claims``."""
    client = _client(uri)
    exp = client.get_experiment_by_name(REPORT_EXPERIMENT)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(REPORT_EXPERIMENT)
    tags = {"deeptrends.compare": "true", "claim.mode": "quick" if quick else "full"}
    tags.update({f"verdict.{r.name}": r.verdict for r in results})
    run = client.create_run(exp_id, run_name="claims-report", tags=tags)
    try:
        for f in files:
            rel = f.parent.relative_to(out).as_posix() if f.parent != out else None
            client.log_artifact(run.info.run_id, str(f), rel if rel not in (None, ".") else None)
    except BaseException:
        client.set_terminated(run.info.run_id, "FAILED")
        raise
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def report_claims(
    only: list[str] | None = None,
    quick: bool = False,
    output: Path | None = None,
    tracking_uri: str | None = None,
    overrides: list[str] | None = None,
    log_artifact: bool = True,
    train: bool = True,
) -> tuple[Path, list[ClaimResult]]:
    """Run what is missing (``train`` false: nothing, the report is decided on the runs
    there are), decide every claim, write and log the report."""
    from pipelines.tracking import resolve_uri

    uri = resolve_uri(tracking_uri)
    names = claim_names()
    if only:
        unknown = [n for n in only if n not in names]
        if unknown:
            raise ConfigError(f"--only {unknown[0]!r}: not a claim. Claims: {', '.join(names)}")
        names = [n for n in names if n in only]
    claims = [load_claim(n) for n in names]  # every claim block checked before anything runs
    out = output or Path("reports") / ("claims-quick" if quick else "claims")
    started = time.time()
    results = []
    for claim in claims:
        t0 = time.time()
        error = None
        try:
            if claim.spec.external:
                observations = external_observations(claim, uri)
            else:
                observations = run_claim(claim, uri, quick, overrides, train)
            if claim.spec.measure == "recurrent_step_time":
                observations += measure_recurrent_step_time(quick)
        except ConfigError:
            raise
        except Exception as exc:  # one claim's failure is reported, the others still run
            if type(exc).__name__ == "Preempted":  # SIGTERM: checkpointed; the same command resumes
                raise
            log.exception("claim %s failed", claim.name)
            observations, error = [], f"{type(exc).__name__}: {exc}"
        result = decide_claim(claim, observations, out, quick)
        result.error = error
        result.seconds = time.time() - t0
        print(f"claims: {claim.name}: {result.verdict} ({result.why})", flush=True)
        results.append(result)
    load = _load_average()
    meta = (
        f"Generated {datetime.now(UTC).strftime('%Y-%m-%d %H:%M:%S UTC')}; "
        f"{'--quick (tiny budgets: the code paths, not the claims)' if quick else 'full budgets'}; "
        f"{time.time() - started:.0f} s for this report (training included), load average "
        f"{load} at the end; runs in {_public(uri)}."
    )
    files = write_report(results, out, meta, quick)
    print(f"claims: wrote {out / 'claims.html'} and {out / 'claims.md'}")
    if log_artifact:
        run_id = log_report(uri, files, out, quick, results)
        print(f"claims: logged as artifacts of run {run_id} in experiment {REPORT_EXPERIMENT!r}")
    return out, results


def _load_average() -> str:
    try:
        import os

        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def _public(uri: str) -> str:
    import re

    return re.sub(r"//[^/@]*@", "//", uri)
