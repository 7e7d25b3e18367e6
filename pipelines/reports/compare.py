"""``deeptrends compare EXPERIMENT [EXPERIMENT ...]``: finished runs side by side, across
experiments, as a table, plots and one self-contained HTML report.

Runs are the FINISHED runs of the named experiments (oldest first), narrowed by
``--where KEY=VALUE`` (a param, or ``tags.KEY=VALUE`` a tag; repeatable, ANDed) and
``--filter EXPR`` (an MLflow filter expression, e.g. ``"metrics.eval_accuracy > 0.9"``).
The table shows, per run, the params that differ between the runs (``--all-params``: every
param; ``--param P`` always shows ``P``), every ``eval_*`` metric, the ``best_*`` metrics
training logged (the best epoch, where the runs table shows only the last) and run
metrics such as ``train_seconds``. Written into ``--output`` (default
``compare/<experiment>[+...]/``):

- ``runs.csv``: the table;
- ``compare.png``: one panel per metric, a bar per run, or with ``--x PARAM`` a line per
  ``--group PARAM`` value over ``PARAM`` (metric against param);
- ``parallel.png``: parallel coordinates over the differing params and the metrics;
- ``curves.png``: the logged history of each ``--metric M`` (default: ``loss`` and
  ``val_loss``) of every run overlaid; the table gains ``M`` (last) and ``best_M``;
- ``report.html``: all of the above and the gate decisions (registry version, alias, the
  metric against the champion's), figures embedded, nothing to fetch.

The files are logged as artifacts of a run named ``compare`` (tag ``deeptrends.compare``)
in the experiment compared (in ``compare`` when several are), which later comparisons
leave out. ``scheduled_runs`` is the lookup a scheduled pass uses to skip dates done.
"""

from __future__ import annotations

import csv
import os
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipelines.io import print_table, write_text_atomic

EXTRA_METRICS = (
    "train_seconds",
    "seconds_per_epoch",
    "num_params",
    "export_max_abs_diff",
    "epochs_to_target",
    "reached_target",
)
COMPARE_TAG = "deeptrends.compare"
GATE_TAGS = (
    "registry.version",
    "registry.alias",
    "gate.metric",
    "gate.value",
    "gate.champion_version",
    "gate.champion_value",
)
DEFAULT_CURVES = ("loss", "val_loss")
MAX_RUNS = 5000


def _num(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def _client(tracking_uri: str | None):
    """An MLflow client on ``tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else the local
    store (``tracking.resolve_uri``'s rule, without importing Keras for it). Only the
    client is set to it: ``mlflow.set_tracking_uri`` would also write the URI into
    ``os.environ`` for every later child process."""
    import mlflow

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    return mlflow.MlflowClient(tracking_uri=uri)


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def where_clause(item: str) -> str:
    """``model.name=lenet5`` -> ``params.`model.name` = 'lenet5'``; ``tags.K=V`` -> a tag."""
    from pipelines.config import ConfigError

    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--where {item!r}: expected KEY=VALUE (a param) or tags.KEY=VALUE")
    kind = "params"
    for prefix, name in (
        ("tags.", "tags"),
        ("tag.", "tags"),
        ("params.", "params"),
        ("param.", "params"),
    ):
        if key.startswith(prefix):
            kind, key = name, key[len(prefix) :]
            break
    if "`" in key:
        raise ConfigError(f"--where {item!r}: a key cannot contain a backtick")
    return f"{kind}.`{key}` = {_quote(value.strip())}"


def search(client, experiment_ids: list[str], filters: list[str]) -> list:
    """Every FINISHED run matching ``filters`` (ANDed MLflow filter expressions), oldest first."""
    query = " and ".join(
        [
            "attributes.status = 'FINISHED'",
            *(f"({f})" if " or " in f.lower() else f for f in filters),
        ]
    )
    runs, token = [], None
    while len(runs) < MAX_RUNS:
        page = client.search_runs(
            experiment_ids,
            query,
            max_results=1000,
            page_token=token,
            order_by=["attributes.start_time ASC"],
        )
        runs.extend(page)
        token = page.token
        if not token:
            break
    return [r for r in runs if COMPARE_TAG not in r.data.tags]


def scheduled_runs(uri: str | None, experiment: str, schedule: str) -> dict[str, dict[str, Any]]:
    """The FINISHED runs of ``schedule`` in ``experiment`` by their ``deeptrends.logical_date``
    tag: run id, registry version and alias (what a scheduled pass skips as done)."""
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return {}
    out = {}
    for run in search(
        client, [exp.experiment_id], [where_clause(f"tags.deeptrends.schedule={schedule}")]
    ):
        date = run.data.tags.get("deeptrends.logical_date")
        if date:
            out[date] = {
                "run_id": run.info.run_id,
                "version": run.data.tags.get("registry.version"),
                "alias": run.data.tags.get("registry.alias"),
            }
    return out


# --------------------------------------------------------------------------- the rows


def collect(
    experiments: list[str] | str,
    tracking_uri: str | None = None,
    params: list[str] | None = None,
    filters: list[str] | None = None,
    all_params: bool = False,
):
    """(rows, metric names, param columns): one row per finished run, oldest first. A row
    holds ``run``, ``run_id``, ``experiment``, every param (numbers as floats), every
    ``eval_*``/``best_*``/run metric and the gate tags; the param columns are those that
    differ between the rows (all of them with ``all_params``) after ``params``."""
    from pipelines.config import ConfigError

    experiments = [experiments] if isinstance(experiments, str) else list(experiments)
    client = _client(tracking_uri)
    found = {}
    for name in experiments:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            names = sorted(e.name for e in client.search_experiments())
            raise ConfigError(
                f"EXPERIMENT {name!r}: no such MLflow experiment. "
                f"Experiments: {', '.join(names) or 'none'}"
            )
        found[exp.experiment_id] = name
    runs = search(client, list(found), list(filters or []))
    if not runs:
        where = f" matching {' and '.join(filters)}" if filters else ""
        raise ConfigError(f"EXPERIMENT {', '.join(experiments)}: no finished runs{where}")
    metric_names = sorted(
        {
            k
            for r in runs
            for k in r.data.metrics
            if k.startswith(("eval_", "best_")) or k in EXTRA_METRICS
        }
    )
    rows = []
    for r in runs:
        row = {
            "run": r.info.run_name or r.info.run_id[:8],
            "run_id": r.info.run_id,
            "experiment": found.get(r.info.experiment_id, r.info.experiment_id),
        }
        row["params"] = {k: _num(v) for k, v in r.data.params.items()}
        row.update({m: r.data.metrics.get(m) for m in metric_names})
        row["gate"] = {t: r.data.tags.get(t) for t in GATE_TAGS}
        rows.append(row)
    columns = list(dict.fromkeys([*(params or []), *differing_params(rows, all_params)]))
    for row in rows:
        row.update({p: row["params"].get(p) for p in columns})
    return rows, metric_names, columns


def differing_params(rows: list[dict], all_params: bool = False) -> list[str]:
    """The params whose value is not the same in every row (a missing one differs)."""
    keys = sorted({k for r in rows for k in r["params"]})
    if all_params:
        return keys
    return [k for k in keys if len({repr(r["params"].get(k)) for r in rows}) > 1]


def histories(rows, metrics: list[str], tracking_uri: str | None = None, required: bool = True):
    """{metric: {run label: [(step, value), ...]}}; each row gains ``M`` (last) and
    ``best_M`` (best by ``tracking.metric_mode``). A metric no run logged is an error
    naming it (``required``) or left out."""
    from pipelines.config import ConfigError
    from pipelines.tracking import metric_mode

    client = _client(tracking_uri)
    out: dict[str, dict[str, list]] = {}
    for m in metrics:
        curves = {}
        for r in rows:
            points = sorted((h.step, h.value) for h in client.get_metric_history(r["run_id"], m))
            if points:
                curves[_label(r, rows)] = points
                values = [p[1] for p in points]
                r[m] = values[-1]
                r[f"best_{m}"] = min(values) if metric_mode(m) == "min" else max(values)
        if not curves:
            if required:
                raise ConfigError(f"--metric {m!r}: no run of these experiments logged it")
            continue
        out[m] = curves
    return out


def _label(row: dict, rows: list[dict]) -> str:
    if len({r["experiment"] for r in rows}) > 1:
        return f"{row['experiment']}/{row['run']}"
    return row["run"]


# --------------------------------------------------------------------------- the plots


def plot_curves(curves: dict, path: Path, title: str) -> Path:
    """One panel per metric, one line per run (x: the logged step)."""
    from pipelines.plots import panel_grid, save_figure

    fig, axes = panel_grid(len(curves))
    for ax, (m, runs) in zip(axes, curves.items(), strict=False):
        for run, points in runs.items():
            ax.plot(
                [p[0] for p in points],
                [p[1] for p in points],
                "-",
                marker="." if len(points) < 40 else None,
                label=run,
            )
        if m.startswith("grad_norm") and all(p[1] > 0 for pts in runs.values() for p in pts):
            ax.set_yscale("log")
        ax.set_title(m)
        ax.set_xlabel("logged step (the epoch, for per-epoch metrics)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    return save_figure(fig, path, title)


def plot(
    rows, metric_names, path: Path, title: str, x: str | None = None, group: str | None = None
) -> Path:
    """Metric against param (``x``, a line per ``group`` value), or a bar per run."""
    from pipelines.plots import panel_grid, save_figure

    metrics = [m for m in metric_names if any(isinstance(r.get(m), float) for r in rows)]
    fig, axes = panel_grid(max(1, len(metrics)))
    for ax, m in zip(axes, metrics, strict=False):
        if x:
            groups: dict = {}
            for r in rows:
                if r.get(m) is not None and r.get(x) is not None:
                    groups.setdefault(r.get(group) if group else "runs", []).append((r[x], r[m]))
            for label, points in sorted(groups.items(), key=lambda kv: str(kv[0])):
                points.sort(key=lambda p: (isinstance(p[0], str), p[0]))
                ax.plot(
                    [str(p[0]) if isinstance(p[0], str) else p[0] for p in points],
                    [p[1] for p in points],
                    "o-",
                    label=str(label),
                )
            ax.set_xlabel(x)
            ax.legend(fontsize=8)
        else:
            names = [_label(r, rows) for r in rows]
            ax.bar(range(len(rows)), [r.get(m) or 0.0 for r in rows])
            ax.set_xticks(range(len(rows)), names, rotation=60, ha="right", fontsize=7)
        ax.set_title(m)
        ax.grid(alpha=0.3)
    return save_figure(fig, path, title)


def plot_parallel(rows, params: list[str], metrics: list[str], path: Path, title: str) -> Path:
    """Parallel coordinates: an axis per differing param and per metric (each scaled to its
    range; text values at their sorted positions), a line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_names = [*params, *[m for m in metrics if any(isinstance(r.get(m), float) for r in rows)]]
    axes_names = axes_names[:12] or ["run"]
    columns, ticks = [], []
    for name in axes_names:
        values = [r.get(name) if name != "run" else i for i, r in enumerate(rows)]
        if all(isinstance(v, (int, float)) or v is None for v in values):
            nums = [float(v) if v is not None else float("nan") for v in values]
            finite = [v for v in nums if v == v]
            lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
            span = hi - lo or 1.0
            columns.append([(v - lo) / span if v == v else 0.5 for v in nums])
            ticks.append((f"{lo:.3g}", f"{hi:.3g}"))
        else:
            levels = sorted({str(v) for v in values})
            pos = {v: i / max(1, len(levels) - 1) for i, v in enumerate(levels)}
            columns.append([pos[str(v)] for v in values])
            ticks.append((levels[0], levels[-1]))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(axes_names)), 4.5))
    colour_by = columns[-1]
    cmap = plt.get_cmap("viridis")
    for i, r in enumerate(rows):
        ax.plot(
            range(len(axes_names)),
            [c[i] for c in columns],
            "-o",
            color=cmap(colour_by[i]),
            alpha=0.8,
            label=_label(r, rows) if len(rows) <= 12 else None,
        )
    for j, (lo, hi) in enumerate(ticks):
        ax.axvline(j, color="#999", lw=0.8)
        ax.annotate(lo[:14], (j, -0.06), ha="center", fontsize=7, annotation_clip=False)
        ax.annotate(hi[:14], (j, 1.03), ha="center", fontsize=7, annotation_clip=False)
    ax.set_xticks(range(len(axes_names)), axes_names, rotation=30, ha="right", fontsize=8)
    ax.set_yticks([])
    ax.set_ylim(-0.1, 1.1)
    if len(rows) <= 12:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- the report


def write_report(path: Path, title: str, rows, params, table_metrics, figures, meta) -> Path:
    """``report.html``: runs (differing params, metrics last and best), plots, gate decisions."""
    from pipelines.reports import html

    header = ["experiment", "run", *params, *table_metrics]
    runs_table = html.table([[r.get(c) for c in header] for r in rows], header, "runs")
    gate_header = [
        "experiment",
        "run",
        "version",
        "alias",
        "metric",
        "value",
        "champion version",
        "champion value",
    ]
    gate_rows = [
        [r["experiment"], r["run"], *(r["gate"].get(t) for t in GATE_TAGS)]
        for r in rows
        if r["gate"].get("registry.version")
    ]
    gate_rows = [[*g[:5], _num(g[5]), g[6], _num(g[7])] for g in gate_rows]
    sections = [
        html.paragraph(meta, "meta"),
        html.section(
            f"Runs ({len(rows)})",
            runs_table,
            html.paragraph("Params shown: those that differ between the runs.", "meta"),
        ),
        *[
            html.section(caption, html.figure(png, caption, ident))
            for ident, caption, png in figures
        ],
        html.section(
            "Gate decisions",
            html.table(gate_rows, gate_header, "gate")
            if gate_rows
            else html.paragraph("No run of these was registered."),
        ),
    ]
    return write_text_atomic(path, html.page(title, *sections))


def log_artifacts(experiment: str, files: list[Path]) -> str:
    """Log the comparison's files into a ``compare`` run of ``experiment``; its run id."""
    import mlflow

    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(experiment)
    run = client.create_run(exp_id, run_name="compare", tags={COMPARE_TAG: "true"})
    try:
        for f in files:
            client.log_artifact(run.info.run_id, str(f))
    except BaseException:
        client.set_terminated(run.info.run_id, "FAILED")
        raise
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def compare(
    experiment: str | list[str],
    output: Path | None = None,
    tracking_uri: str | None = None,
    params: list[str] | None = None,
    x: str | None = None,
    group: str | None = None,
    metrics: list[str] | None = None,
    log_artifact: bool = True,
    where: list[str] | None = None,
    filters: list[str] | None = None,
    all_params: bool = False,
    log_experiment: str | None = None,
) -> Path:
    """Print the table and write the files of the module doc into ``output``; log them as
    artifacts of a ``compare`` run; returns the folder."""
    experiments = [experiment] if isinstance(experiment, str) else list(dict.fromkeys(experiment))
    params = list(
        dict.fromkeys([*(params or []), *([x] if x else []), *([group] if group else [])])
    )
    query = [*(where_clause(w) for w in where or []), *(filters or [])]
    rows, metric_names, columns = collect(experiments, tracking_uri, params, query, all_params)
    asked = list(dict.fromkeys(metrics or []))
    curves = histories(rows, asked or list(DEFAULT_CURVES), tracking_uri, required=bool(asked))
    title = " + ".join(experiments)
    out = output or Path("compare") / "+".join(experiments)
    out.mkdir(parents=True, exist_ok=True)
    extra = [m for c in curves for m in (c, f"best_{c}") if m not in metric_names]
    table_metrics = [*metric_names, *extra]
    shown = ["run", *columns, *table_metrics]
    if len(experiments) > 1:
        shown.insert(0, "experiment")
    print_table([[_fmt(r.get(c)) for c in shown] for r in rows], shown)
    with open(out / "runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(
            f,
            fieldnames=["experiment", "run", "run_id", *columns, *table_metrics],
            extrasaction="ignore",
        )
        writer.writeheader()
        writer.writerows(rows)
    main_metrics = [m for m in metric_names if not m.startswith("best_")] or metric_names
    figures = [
        (
            "metric-vs-param",
            f"Metrics against {x}" if x else "Metrics per run",
            plot(rows, main_metrics, out / "compare.png", title, x, group),
        ),
        (
            "parallel",
            "Parallel coordinates: differing params and eval metrics",
            plot_parallel(
                rows,
                [c for c in columns if c != group][:8],
                [m for m in metric_names if m.startswith("eval_")],
                out / "parallel.png",
                title,
            ),
        ),
    ]
    if curves:
        figures.append(
            (
                "curves",
                f"Learning curves overlaid: {', '.join(curves)}",
                plot_curves(curves, out / "curves.png", title),
            )
        )
    where_text = f"; runs where {' and '.join(query)}" if query else ""
    meta = (
        f"Generated {datetime.now(UTC).strftime('%Y-%m-%d %H:%M:%S UTC')} from "
        f"{_public_uri(tracking_uri)}{where_text}."
    )
    report = write_report(
        out / "report.html",
        f"deeptrends compare: {title}",
        rows,
        columns,
        table_metrics,
        figures,
        meta,
    )
    files = [out / "runs.csv", *(f[2] for f in figures), report]
    print(f"\nwrote {', '.join(str(f) for f in files)}")
    if log_artifact:
        target = log_experiment or (experiments[0] if len(experiments) == 1 else "compare")
        run_id = log_artifacts(target, files)
        print(f"logged them as artifacts of run {run_id} ('compare') in experiment {target!r}")
    return out


def _public_uri(uri: str | None) -> str:
    """The tracking URI without credentials."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    return re.sub(r"//[^/@]*@", "//", uri)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
