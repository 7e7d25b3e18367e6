"""Re-evaluate a registered generative model under the current evaluation protocol
(e.g. after changing the Fréchet-distance classifier), without training it again.

    DEEPTRENDS_DATA_DIR=../shared/datasets python benchmarks/reevaluate_generative.py \\
        models:/dcgan-mnist/1 --set task_options.fid_classifier_epochs=20

The config is the one logged with the version's run (``config.yaml``), with ``--set``
overrides; the metrics are printed as JSON and written to
``benchmarks/results/<name>-v<version>-reevaluated.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model_uri", help="models:/NAME/VERSION")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)

    import keras
    import mlflow
    import yaml

    from pipelines.config import apply_overrides, validate_config
    from pipelines.tasks.base import RunContext, get_task
    from pipelines.tracking import DEFAULT_URI

    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI)
    client = mlflow.MlflowClient()
    name, version = args.model_uri.removeprefix("models:/").split("/")
    mv = client.get_model_version(name, version)
    raw = yaml.safe_load(Path(client.download_artifacts(mv.run_id, "config.yaml")).read_text())
    config = validate_config(apply_overrides(raw, args.set), source=f"run {mv.run_id}")
    started = time.time()
    task = get_task(config.task)(RunContext(config=config))
    inputs = task.build_inputs()
    keras.utils.set_random_seed(config.runtime.seed)
    trainer = task.build_model(inputs)  # compiled: the RBM's compile initialises biases first
    trainer.network.set_weights(mlflow.keras.load_model(args.model_uri).get_weights())
    evaluation = task.evaluate(trainer, inputs)
    result = {
        "model_uri": args.model_uri,
        "run_id": mv.run_id,
        "overrides": args.set,
        "metrics": evaluation.metrics,
        "fid_classifier": {
            k.removeprefix("fid_classifier."): v
            for k, v in evaluation.tags.items()
            if k.startswith("fid_classifier.")
        },
        "seconds": round(time.time() - started, 1),
    }
    out = ROOT / "benchmarks" / "results" / f"{name}-v{version}-reevaluated.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
