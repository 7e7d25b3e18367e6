"""``deeptrends``: train experiments, list what is registered, re-export registered models.

Listing commands (``--help``, ``configs``, ``models``, ``datasets``) import neither
TensorFlow nor MLflow; ``train`` and ``export`` import them when they run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from pipelines.io import print_table, write_text_atomic


def cmd_configs(args) -> int:
    from pipelines.config import read_yaml, shipped_config_paths

    rows = []
    for name, path in shipped_config_paths().items():
        raw = read_yaml(path)
        rows.append(
            (
                name,
                raw.get("task", ""),
                (raw.get("model") or {}).get("name", ""),
                (raw.get("data") or {}).get("name", ""),
                raw.get("description", ""),
            )
        )
    print_table(rows, ("config", "task", "model", "data", "description"))
    return 0


def cmd_models(args) -> int:
    import models

    rows = []
    for name in models.list_models():
        info = models.model_info(name)
        rows.append((name, info.task, info.family, ", ".join(info.features or ())))
    print_table(rows, ("model", "task", "family", "features"))
    return 0


def cmd_datasets(args) -> int:
    import data

    rows = []
    for name in data.list_datasets():
        e = data.get_dataset(name)
        rows.append(
            (
                name,
                e.kind,
                e.shard_policy,
                ", ".join(f"{k}={v}" for k, v in e.options.items()),
                e.description,
            )
        )
    print_table(rows, ("dataset", "kind", "shard", "options", "description"))
    return 0


def _summary_out(summary: dict, output_json: str | None) -> None:
    text = json.dumps(summary, indent=2, sort_keys=True)
    print(text)
    if output_json:
        write_text_atomic(output_json, text + "\n")


def _quiet_start() -> None:
    """Before a command's own output, only ours: TensorFlow starts without its notices
    (``runtime.quiet_tensorflow``; its errors still show) and MLflow logs warnings and
    errors only (its database and new-experiment notices: ``MLFLOW_LOGGING_LEVEL=INFO``)."""
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    from pipelines.runtime import quiet_tensorflow

    quiet_tensorflow()


def _split_overrides(text: str) -> list[str]:
    """``--overrides 'a=1 b="two words"'`` -> ``["a=1", "b=two words"]``."""
    import shlex

    from pipelines.config import ConfigError

    try:
        items = shlex.split(text or "")
    except ValueError as exc:
        raise ConfigError(f"--overrides: {exc} in {text[:200]!r}") from None
    bad = [item for item in items if "=" not in item]
    if bad:
        raise ConfigError(f"--overrides: expected KEY=VALUE items, got {bad[0][:200]!r}")
    return items


def _yes_no(text: str) -> bool:
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text[:50]!r}")


def cmd_train(args) -> int:
    _quiet_start()
    from pipelines.train import check_config, run_experiment
    from pipelines.variants import load_runs

    configs = load_runs(
        args.config, [*args.set, *_split_overrides(args.overrides)], only=args.variant
    )
    for config in configs:
        check_config(config)
    keys = (
        "run_id",
        "experiment",
        "metrics",
        "model_name",
        "model_version",
        "aliases",
        "export_path",
    )
    from pipelines.loop import Preempted

    outs = []
    for config in configs:
        try:
            summary = run_experiment(config)
        except Preempted as exc:
            print(
                f"deeptrends: interrupted ({exc}).\nThe run is checkpointed: run the same command again "
                "to resume it into the same MLflow run.",
                file=sys.stderr,
            )
            return EXIT_PREEMPTED
        outs.append({k: summary.to_dict()[k] for k in keys})
        if len(configs) > 1:
            outs[-1]["variant"] = config.tracking.run_name
    print("\n== deeptrends train: summary ==")
    _summary_out(outs[0] if len(outs) == 1 else outs, args.output_json)
    return 0


def cmd_compare(args) -> int:
    _quiet_start()
    from pipelines.reports.compare import compare

    compare(
        args.experiment,
        Path(args.output) if args.output else None,
        args.tracking_uri,
        args.param,
        args.x,
        args.group,
        metrics=args.metric,
        log_artifact=not args.no_log,
        where=args.where,
        filters=args.filter,
        all_params=args.all_params,
    )
    return 0


def cmd_report(args) -> int:
    """``deeptrends report claims``: run what is missing, decide, write the report."""
    _quiet_start()
    from pipelines.reports.claims import report_claims

    out, results = report_claims(
        only=args.only,
        quick=args.quick,
        output=Path(args.output) if args.output else None,
        tracking_uri=args.tracking_uri,
        overrides=args.set,
        log_artifact=not args.no_log,
        train=not args.no_train,
    )
    print_table([(r.name, r.verdict, r.why) for r in results], ("claim", "verdict", "why"))
    return 0


def _bench_output(families: list[str] | None, precisions: list[str] | None) -> str:
    """Where a family bench writes by default: the whole bench to ``bench-families.json``
    (the README table's source), a part of it beside it, never over it."""
    if not families and not precisions:
        return "benchmarks/results/bench-families.json"
    parts = [*(families or ["families"]), *(precisions or [])]
    return f"benchmarks/results/bench-{'-'.join(parts)}.json"


def cmd_bench(args) -> int:
    _quiet_start()
    from pipelines.reports.bench import bench, bench_all

    try:
        if args.family is not None or args.all:
            bench_all(
                args.family,
                tuple(args.precision or ("float32", "mixed_bfloat16")),
                seconds=args.seconds,
                peers=not args.no_peers,
                output_json=args.output_json or _bench_output(args.family, args.precision),
                track=not args.no_log,
            )
            return 0
        bench(
            args.model,
            args.image_size,
            args.batch_size,
            args.steps,
            args.rounds,
            jit_compile=args.jit_compile,
            output_json=args.output_json,
        )
    except ValueError as exc:
        print(f"deeptrends: error: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_export(args) -> int:
    _quiet_start()
    from pipelines.serving.reexport import export_registered

    path = export_registered(args.model_uri, Path(args.serving_dir), tracking_uri=args.tracking_uri)
    print(path)
    return 0


def cmd_schedule(args) -> int:
    """``deeptrends schedule list|next|run|crontab|k8s`` (pipelines/schedule.py)."""
    from datetime import UTC, datetime

    from pipelines import schedule as sched

    now = sched.parse_date(args.now) if getattr(args, "now", None) else datetime.now(UTC)
    if args.action == "list":
        rows = [
            (
                s.name,
                s.config,
                s.cron,
                s.timezone,
                "yes" if s.catchup else "no",
                s.max_catchup,
                s.retries,
                sched.next_fire_times(s, now)[0].isoformat(),
            )
            for s in sched.list_schedules()
        ]
        print_table(
            rows,
            (
                "schedule",
                "config",
                "cron",
                "timezone",
                "catchup",
                "max_catchup",
                "retries",
                "next fire time",
            ),
        )
        return 0
    if args.action == "crontab":
        names = args.names or list(sched.shipped_schedule_paths())
        repo = Path(args.repo).resolve() if args.repo else Path.cwd()
        binary = args.deeptrends or str(Path(sys.argv[0]).resolve())
        print("\n".join(sched.crontab_lines([sched.load_schedule(n) for n in names], repo, binary)))
        return 0
    schedule = sched.load_schedule(args.name)
    if args.action == "next":
        for t in sched.next_fire_times(schedule, now, args.count):
            print(f"{t.isoformat()}  (logical date {sched.canonical(t)})")
        return 0
    if args.action == "k8s":
        import yaml

        print(
            yaml.safe_dump(
                sched.k8s_cronjob(schedule, args.image, args.namespace), sort_keys=False
            ),
            end="",
        )
        return 0
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # the pass imports no TensorFlow
    try:
        result = sched.run_schedule(
            schedule,
            args.logical_date,
            args.catch_up,
            args.dry_run,
            now if args.now else None,
            args.retries,
        )
    except sched.ScheduleLocked as exc:
        print(f"deeptrends: {exc}; try again later", file=sys.stderr)
        return sched.EXIT_LOCKED
    rows = [
        (
            d.logical_date,
            d.status,
            d.attempts,
            d.seconds,
            d.run_id or "-",
            d.version or "-",
            d.alias or "-",
        )
        for d in result.dates
    ]
    print(
        f"\n== deeptrends schedule run {schedule.name}: {len(result.dates)} date(s), "
        f"{result.seconds:g} s =="
    )
    print_table(rows, ("logical date", "status", "attempts", "seconds", "run", "version", "alias"))
    if args.output_json:
        write_text_atomic(args.output_json, json.dumps(result.to_dict(), indent=2) + "\n")
    return result.exit_code


def cmd_launch(args) -> int:
    from pipelines.launch import launch

    return launch(args.workers, args.config, args.set, args.output_json, network=args.network)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deeptrends",
        description="Classic CNN/RNN architectures as Keras/TensorFlow training pipelines "
        "(tf.data, tf.distribute, MLflow, TF Serving).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train, evaluate, export and register one experiment")
    p.add_argument(
        "config", help="a registered experiment name (see `deeptrends configs`) or a YAML path"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.epochs=5 (repeatable)",
    )
    p.add_argument(
        "--overrides",
        default="",
        metavar="'KEY=VALUE ...'",
        help="several --set values in one argument, split as a shell would (what MLflow "
        "projects pass: mlflow/MLproject)",
    )
    p.add_argument("--output-json", metavar="FILE", help="also write the run summary as JSON here")
    p.add_argument(
        "--variant",
        action="append",
        default=None,
        metavar="NAME",
        help="run only this variant of a config with `variants:` (repeatable)",
    )
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser(
        "compare",
        help="finished runs of MLflow experiments side by side (table, plots, HTML report)",
    )
    p.add_argument("experiment", nargs="+", help="MLflow experiments (configs' names)")
    p.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="only runs whose param KEY (or tag, as tags.KEY) is VALUE (repeatable)",
    )
    p.add_argument(
        "--filter",
        action="append",
        default=[],
        metavar="EXPR",
        help='an MLflow filter, e.g. "metrics.eval_accuracy > 0.9" (repeatable)',
    )
    p.add_argument(
        "--all-params", action="store_true", help="show every param, not only those that differ"
    )
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="PARAM",
        help="a run param to show, e.g. model.name",
    )
    p.add_argument(
        "--x", default=None, metavar="PARAM", help="plot metrics over this param (e.g. data.length)"
    )
    p.add_argument(
        "--group",
        default=None,
        metavar="PARAM",
        help="one line per value of this param (e.g. model.name)",
    )
    p.add_argument(
        "--output",
        default=None,
        help="folder for runs.csv, the plots and report.html (default compare/EXPERIMENT)",
    )
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db",
    )
    p.add_argument(
        "--metric",
        action="append",
        default=[],
        metavar="M",
        help="overlay every run's logged curve of this metric in curves.png, e.g. loss (repeatable)",
    )
    p.add_argument(
        "--no-log", action="store_true", help="do not log the files as artifacts of a 'compare' run"
    )
    p.set_defaults(fn=cmd_compare)

    p = sub.add_parser("report", help="reports over many runs: the survey's claims, decided")
    rs = p.add_subparsers(dest="report", required=True, metavar="REPORT")
    q = rs.add_parser(
        "claims",
        help="run the claim configs' missing seeds, decide each claim, write claims.html/.md",
    )
    q.add_argument(
        "--quick", action="store_true", help="tiny budgets, one seed: every code path in minutes"
    )
    q.add_argument(
        "--only", action="append", default=None, metavar="NAME", help="only this claim (repeatable)"
    )
    q.add_argument(
        "--output",
        default=None,
        help="report folder (default reports/claims, or reports/claims-quick with --quick)",
    )
    q.add_argument(
        "--tracking-uri",
        default=None,
        help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db",
    )
    q.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a value of every run (e.g. runtime.work_dir=DIR; changes the run key)",
    )
    q.add_argument("--no-log", action="store_true", help="do not log the report to MLflow")
    q.add_argument(
        "--no-train",
        action="store_true",
        help="train nothing: decide on the finished runs there are (missing seeds left out)",
    )
    p.set_defaults(fn=cmd_report)

    p = sub.add_parser(
        "bench", help="images/s and MFU of our resnet50/vgg16 vs keras.applications, same batches"
    )
    p.add_argument(
        "--model",
        action="append",
        default=None,
        choices=["resnet50", "vgg16"],
        help="benchmark only this model (repeatable; default both)",
    )
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=3, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds; the best is kept")
    p.add_argument("--jit-compile", action="store_true", help="XLA-compile both implementations")
    p.add_argument("--output-json", metavar="FILE", help="also write the results as JSON here")
    p.add_argument(
        "--all",
        action="store_true",
        help="every family through its shipped config, float32 and bfloat16, with the peers",
    )
    p.add_argument(
        "--family",
        action="append",
        default=None,
        choices=["lenet5", "alexnet", "vgg16", "googlenet", "resnet50", "seq2seq", "vae"]
        + ["dcgan", "draw", "detection", "captioning"],
        help="benchmark this family (repeatable; implies the per-family bench)",
    )
    p.add_argument(
        "--precision", action="append", choices=["float32", "mixed_bfloat16"], default=None
    )
    p.add_argument("--seconds", type=float, default=2.0, help="per measurement (families)")
    p.add_argument("--no-peers", action="store_true", help="skip the keras.applications peers")
    p.add_argument("--no-log", action="store_true", help="do not log a bench run to MLflow")
    p.set_defaults(fn=cmd_bench)

    p = sub.add_parser(
        "launch", help="run CONFIG as a local multi-worker job (N processes, TF_CONFIG on loopback)"
    )
    p.add_argument(
        "--workers",
        type=int,
        required=True,
        help="number of worker processes (worker 0 is the chief)",
    )
    p.add_argument("config", help="a registered experiment name or a YAML path")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value"
    )
    p.add_argument("--output-json", metavar="FILE", help="the chief writes the run summary here")
    p.add_argument(
        "--network",
        choices=["auto", "private", "host", "inside"],
        default="auto",
        help="private: the job in its own network namespace (loopback only; TensorFlow's "
        "gRPC servers bind every interface); host: the host's network (a remote tracking "
        "server); auto: private where permitted and the tracking store is local",
    )
    p.set_defaults(fn=cmd_launch)

    p = sub.add_parser(
        "schedule", help="scheduled pipelines: list, next, run (idempotent per date), crontab, k8s"
    )
    ss = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = ss.add_parser("list", help="the shipped schedules and their next fire times")
    q.add_argument("--now", default=None, help=argparse.SUPPRESS)
    q = ss.add_parser("next", help="the next fire times (logical dates) of a schedule")
    q.add_argument("name", help="a shipped schedule (pipelines/configs/schedules/) or a YAML path")
    q.add_argument("--count", type=int, default=5)
    q.add_argument("--now", default=None, metavar="ISO", help="from this time instead of now")
    q = ss.add_parser(
        "run", help="train the due logical date(s) not done yet; exit code says what happened"
    )
    q.add_argument("name", help="a shipped schedule or a YAML path")
    q.add_argument(
        "--logical-date",
        default=None,
        metavar="ISO",
        help="train this date (Airflow: '{{ logical_date }}'); default: the latest fire time",
    )
    q.add_argument(
        "--catch-up",
        nargs="?",
        const=True,
        default=False,
        type=_yes_no,
        metavar="true|false",
        help="also the missed fire times (max_catchup); a bare --catch-up is true",
    )
    q.add_argument("--dry-run", action="store_true", help="show what would train; train nothing")
    q.add_argument(
        "--retries",
        type=int,
        default=None,
        help="override the schedule's retries (0 where a scheduler such as Airflow retries)",
    )
    q.add_argument(
        "--now", default=None, metavar="ISO", help="take this time as now (backfills, tests)"
    )
    q.add_argument("--output-json", metavar="FILE", help="also write the pass as JSON here")
    q = ss.add_parser("crontab", help="print crontab lines for plain cron")
    q.add_argument("names", nargs="*", help="schedules (default: every shipped one)")
    q.add_argument("--repo", default=None, help="the checkout cron cds into (default: here)")
    q.add_argument(
        "--deeptrends", default=None, help="the deeptrends executable (default: this one)"
    )
    q = ss.add_parser("k8s", help="print a Kubernetes CronJob for a schedule")
    q.add_argument("name", help="a shipped schedule or a YAML path")
    q.add_argument("--image", default="deeptrends:latest")
    q.add_argument("--namespace", default="deeptrends")
    p.set_defaults(fn=cmd_schedule)

    sub.add_parser("configs", help="list the shipped experiment configs").set_defaults(
        fn=cmd_configs
    )
    sub.add_parser("models", help="list the registered models").set_defaults(fn=cmd_models)
    sub.add_parser("datasets", help="list the registered datasets").set_defaults(fn=cmd_datasets)

    p = sub.add_parser(
        "export", help="re-export a registered model version as a SavedModel for TF Serving"
    )
    p.add_argument("model_uri", help="models:/NAME/VERSION or models:/NAME@ALIAS")
    p.add_argument("--serving-dir", required=True, help="writes <serving-dir>/<NAME>/<VERSION>/")
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db",
    )
    p.set_defaults(fn=cmd_export)
    return parser


# Exit codes: what a cron job, Airflow or a shell script can act on (README "Failure behaviour").
EXIT_OK, EXIT_CONFIG, EXIT_DATA, EXIT_TRACKING, EXIT_DIVERGED = 0, 2, 3, 4, 5
EXIT_INTERRUPTED, EXIT_PREEMPTED = 130, 143


def _user_error(exc: BaseException) -> int | None:
    """The exit code of an error that is the user's (config, data, tracking store), or None
    for a bug (which keeps its traceback). Checked by class name where the class lives in a
    module that imports TensorFlow or MLflow, so listing commands stay light."""
    from data.splits import DataError
    from pipelines.config import ConfigError

    names = {cls.__name__ for cls in type(exc).__mro__}
    if isinstance(exc, ConfigError) or "StrategyError" in names:
        return EXIT_CONFIG
    if isinstance(exc, DataError):
        return EXIT_DATA
    if "MlflowException" in names:
        return EXIT_TRACKING
    if "TrainingDiverged" in names:
        return EXIT_DIVERGED
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print("deeptrends: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        code = _user_error(exc)
        if code is None:
            raise
        from pipelines.config import short_repr

        message = getattr(exc, "message", None) or str(exc) or short_repr(exc)
        if len(message) > 4000:
            message = message[:4000] + f"... ({len(message)} characters)"
        print(f"deeptrends: error: {message}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
