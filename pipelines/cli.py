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
        rows.append((name, raw.get("task", ""), (raw.get("model") or {}).get("name", ""),
                     (raw.get("data") or {}).get("name", ""), raw.get("description", "")))
    print_table(rows, ("config", "task", "model", "data", "description"))
    return 0


def cmd_models(args) -> int:
    import models

    for name in models.list_models():
        print(name)
    return 0


def cmd_datasets(args) -> int:
    import data

    rows = []
    for name in data.list_datasets():
        e = data.get_dataset(name)
        rows.append((name, e.kind, e.shard_policy, ", ".join(f"{k}={v}" for k, v in e.options.items()), e.description))
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


def cmd_train(args) -> int:
    _quiet_start()
    from pipelines.train import check_config, run_experiment
    from pipelines.variants import load_runs

    configs = load_runs(args.config, args.set, only=args.variant)  # one, or one per variant
    for config in configs:
        check_config(config)
    keys = ("run_id", "experiment", "metrics", "model_name", "model_version", "aliases", "export_path")
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
    from pipelines.reports.compare import compare

    compare(args.experiment, Path(args.output) if args.output else None, args.tracking_uri,
            args.param, args.x, args.group, metrics=args.metric, log_artifact=not args.no_log)
    return 0


def cmd_bench(args) -> int:
    _quiet_start()
    from pipelines.reports.bench import bench

    try:
        bench(args.model, args.image_size, args.batch_size, args.steps, args.rounds,
              jit_compile=args.jit_compile, output_json=args.output_json)
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


def cmd_launch(args) -> int:
    from pipelines.launch import launch

    return launch(args.workers, args.config, args.set, args.output_json)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deeptrends",
        description="Classic CNN/RNN architectures as Keras/TensorFlow training pipelines "
        "(tf.data, tf.distribute, MLflow, TF Serving).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train, evaluate, export and register one experiment")
    p.add_argument("config", help="a registered experiment name (see `deeptrends configs`) or a YAML path")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.epochs=5 (repeatable)")
    p.add_argument("--output-json", metavar="FILE", help="also write the run summary as JSON here")
    p.add_argument("--variant", action="append", default=None, metavar="NAME",
                   help="run only this variant of a config with `variants:` (repeatable)")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("compare", help="the finished runs of one MLflow experiment side by side (table + plot)")
    p.add_argument("experiment", help="the MLflow experiment (a config's name)")
    p.add_argument("--param", action="append", default=[], metavar="PARAM", help="a run param to show, e.g. model.name")
    p.add_argument("--x", default=None, metavar="PARAM", help="plot metrics over this param (e.g. data.length)")
    p.add_argument("--group", default=None, metavar="PARAM", help="one line per value of this param (e.g. model.name)")
    p.add_argument("--output", default=None, help="folder for runs.csv and compare.png (default compare/EXPERIMENT)")
    p.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    p.add_argument("--metric", action="append", default=[], metavar="M",
                   help="overlay every run's logged curve of this metric in curves.png, e.g. loss (repeatable)")
    p.add_argument("--no-log", action="store_true", help="do not log the files as artifacts of a 'compare' run")
    p.set_defaults(fn=cmd_compare)

    p = sub.add_parser("bench", help="images/s and MFU of our resnet50/vgg16 vs keras.applications, same batches")
    p.add_argument("--model", action="append", default=None, choices=["resnet50", "vgg16"],
                   help="benchmark only this model (repeatable; default both)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=3, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds; the best is kept")
    p.add_argument("--jit-compile", action="store_true", help="XLA-compile both implementations")
    p.add_argument("--output-json", metavar="FILE", help="also write the results as JSON here")
    p.set_defaults(fn=cmd_bench)

    p = sub.add_parser("launch", help="run CONFIG as a local multi-worker job (N processes, TF_CONFIG on loopback)")
    p.add_argument("--workers", type=int, required=True, help="number of worker processes (worker 0 is the chief)")
    p.add_argument("config", help="a registered experiment name or a YAML path")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    p.add_argument("--output-json", metavar="FILE", help="the chief writes the run summary here")
    p.set_defaults(fn=cmd_launch)

    sub.add_parser("configs", help="list the shipped experiment configs").set_defaults(fn=cmd_configs)
    sub.add_parser("models", help="list the registered models").set_defaults(fn=cmd_models)
    sub.add_parser("datasets", help="list the registered datasets").set_defaults(fn=cmd_datasets)

    p = sub.add_parser("export", help="re-export a registered model version as a SavedModel for TF Serving")
    p.add_argument("model_uri", help="models:/NAME/VERSION or models:/NAME@ALIAS")
    p.add_argument("--serving-dir", required=True, help="writes <serving-dir>/<NAME>/<VERSION>/")
    p.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
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
