"""``deeptrends compare EXPERIMENT``: the finished runs of one MLflow experiment side by side.

Prints a table (run name, chosen params, every ``eval_*`` metric plus ``train_seconds``,
``seconds_per_epoch`` and ``num_params`` where logged) and writes, into ``--output``
(default ``compare/<experiment>/``), ``runs.csv`` and ``compare.png``: one panel per
metric, a bar per run, or, with ``--x PARAM``, a line per ``--group PARAM`` value over
``PARAM`` (e.g. ``--x data.length --group model.name`` shows where each cell fails as
sequences grow). Generic over any experiment.

``--metric M`` (repeatable) adds training curves: the logged history of metric ``M``
(``loss``, ``val_accuracy``, ``grad_norm/block1_conv1``, ...) of every run, overlaid in
``curves.png``, and its last value in the table. The PNGs and ``runs.csv`` are also logged
as artifacts of a run named ``compare`` in the experiment (tag ``deeptrends.compare``),
which later comparisons leave out.
"""

from __future__ import annotations

import csv
from pathlib import Path

from pipelines.io import print_table

EXTRA_METRICS = ("train_seconds", "seconds_per_epoch", "num_params", "export_max_abs_diff", "epochs_to_target",
                 "reached_target")
COMPARE_TAG = "deeptrends.compare"


def _num(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def collect(experiment: str, tracking_uri: str | None = None, params: list[str] | None = None):
    """(rows, metric names): one row per finished run, oldest first."""

    import mlflow
    from pipelines.config import ConfigError
    from pipelines.tracking import resolve_uri

    mlflow.set_tracking_uri(resolve_uri(tracking_uri))
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ConfigError(
            f"EXPERIMENT {experiment!r}: no such MLflow experiment. "
            f"Experiments: {', '.join(names) or 'none'}"
        )
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string="attributes.status = 'FINISHED'",
        order_by=["attributes.start_time ASC"],
    )
    runs = [r for r in runs if COMPARE_TAG not in r.data.tags]
    if not runs:
        raise ConfigError(f"EXPERIMENT {experiment!r}: no finished runs")
    metric_names = sorted(
        {k for r in runs for k in r.data.metrics if k.startswith("eval_")}
        | {k for r in runs for k in r.data.metrics if k in EXTRA_METRICS}
    )
    rows = []
    for r in runs:
        row = {"run": r.info.run_name or r.info.run_id[:8], "run_id": r.info.run_id}
        for p in params or []:
            row[p] = _num(r.data.params.get(p))
        for m in metric_names:
            row[m] = r.data.metrics.get(m)
        rows.append(row)
    return rows, metric_names


def histories(experiment_rows, metrics: list[str], tracking_uri: str | None = None):
    """{metric: {run name: [(step, value), ...]}} of the runs in ``experiment_rows``
    (``collect`` set the tracking URI); a metric no run logged is an error naming it."""
    import mlflow
    from pipelines.config import ConfigError

    client = mlflow.MlflowClient()
    out: dict[str, dict[str, list]] = {}
    for m in metrics:
        curves = {}
        for r in experiment_rows:
            points = sorted((h.step, h.value) for h in client.get_metric_history(r["run_id"], m))
            if points:
                curves[r["run"]] = points
                r[m] = points[-1][1]
        if not curves:
            raise ConfigError(f"--metric {m!r}: no run of this experiment logged it")
        out[m] = curves
    return out


def plot_curves(curves: dict, path: Path, title: str) -> Path:
    """One panel per metric, one line per run (x: the logged step)."""
    from pipelines.plots import panel_grid, save_figure

    fig, axes = panel_grid(len(curves))
    for ax, (m, runs) in zip(axes, curves.items(), strict=False):
        for run, points in runs.items():
            ax.plot([p[0] for p in points], [p[1] for p in points], "-", marker="." if len(points) < 40 else None,
                    label=run)
        if m.startswith("grad_norm") and all(p[1] > 0 for pts in runs.values() for p in pts):
            ax.set_yscale("log")
        ax.set_title(m)
        ax.set_xlabel("logged step (the epoch, for per-epoch metrics)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    return save_figure(fig, path, title)


def log_artifacts(experiment: str, files: list[Path]) -> str:
    """Log the comparison's files into a ``compare`` run of the experiment; its run id."""
    import mlflow

    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    run = client.create_run(exp.experiment_id, run_name="compare", tags={COMPARE_TAG: "true"})
    try:
        for f in files:
            client.log_artifact(run.info.run_id, str(f))
    except BaseException:
        client.set_terminated(run.info.run_id, "FAILED")
        raise
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def plot(
    rows, metric_names, path: Path, title: str, x: str | None = None, group: str | None = None
) -> Path:
    from pipelines.plots import panel_grid, save_figure

    metrics = [m for m in metric_names if any(isinstance(r.get(m), float) for r in rows)]
    fig, axes = panel_grid(len(metrics))
    for ax, m in zip(axes, metrics, strict=False):
        if x:
            groups: dict = {}
            for r in rows:
                if r.get(m) is not None and r.get(x) is not None:
                    groups.setdefault(r.get(group) if group else "runs", []).append((r[x], r[m]))
            for label, points in sorted(groups.items(), key=lambda kv: str(kv[0])):
                points.sort(key=lambda p: p[0])
                ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=str(label))
            ax.set_xlabel(x)
            ax.legend(fontsize=8)
        else:
            names = [r["run"] for r in rows]
            ax.bar(range(len(rows)), [r.get(m) or 0.0 for r in rows])
            ax.set_xticks(range(len(rows)), names, rotation=60, ha="right", fontsize=7)
        ax.set_title(m)
        ax.grid(alpha=0.3)
    return save_figure(fig, path, title)


def compare(
    experiment: str,
    output: Path | None = None,
    tracking_uri: str | None = None,
    params: list[str] | None = None,
    x: str | None = None,
    group: str | None = None,
    metrics: list[str] | None = None,
    log_artifact: bool = True,
) -> Path:
    """Print the table and write ``runs.csv``, ``compare.png`` and (with ``metrics``)
    ``curves.png``, logged as artifacts of a ``compare`` run; returns the folder."""
    params = list(
        dict.fromkeys([*(params or []), *([x] if x else []), *([group] if group else [])])
    )
    rows, metric_names = collect(experiment, tracking_uri, params)
    metrics = list(dict.fromkeys(metrics or []))
    curves = histories(rows, metrics) if metrics else {}
    out = output or Path("compare") / experiment
    out.mkdir(parents=True, exist_ok=True)
    table_metrics = [*metric_names, *(m for m in metrics if m not in metric_names)]
    columns = ["run", *params, *table_metrics]
    print_table([[_fmt(r.get(c)) for c in columns] for r in rows], columns)
    with open(out / "runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["run", "run_id", *params, *table_metrics])
        writer.writeheader()
        writer.writerows(rows)
    files = [out / "runs.csv", plot(rows, metric_names, out / "compare.png", experiment, x, group)]
    if curves:
        files.append(plot_curves(curves, out / "curves.png", experiment))
    print(f"\nwrote {', '.join(str(f) for f in files)}")
    if log_artifact:
        run_id = log_artifacts(experiment, files)
        print(f"logged them as artifacts of run {run_id} ('compare') in experiment {experiment!r}")
    return out


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
