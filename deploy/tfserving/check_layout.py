"""Check a serving folder as TF Serving would load it (``tensorflow_model_server`` is
neither a Debian nor a PyPI package, so this does its loading steps with the same protos).

    python deploy/tfserving/check_layout.py serving/models.config

For every model in the ``model_config_list`` (parsed with
``tensorflow_serving.config.model_server_config_pb2``): the version policy is ``specific``,
its versions exist under ``base_path``, every version label names a served version; then
every version is loaded in a fresh process (``--version DIR``: ``tf.saved_model.load``)
and its warm-up records (``assets.extra/tf_serving_warmup_requests``, ``PredictionLog``
protos) replay against the signatures they name, each output finite. Prints one JSON
report; exit 0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

WARMUP = "assets.extra/tf_serving_warmup_requests"


def parse_config(path: Path):
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    return text_format.Parse(path.read_text(), model_server_config_pb2.ModelServerConfig())


def check_config(path: Path) -> dict:
    """Structure of models.config, then each version in its own process."""
    report: dict = {"config": str(path), "models": {}, "errors": []}
    for model in parse_config(path).model_config_list.config:
        entry: dict = {"versions": {}, "labels": dict(model.version_labels)}
        report["models"][model.name] = entry
        if model.model_platform != "tensorflow":
            report["errors"].append(f"{model.name}: model_platform {model.model_platform!r}")
        if model.model_version_policy.WhichOneof("policy_choice") != "specific":
            report["errors"].append(f"{model.name}: version policy is not 'specific'")
        served = list(model.model_version_policy.specific.versions)
        if not served:
            report["errors"].append(f"{model.name}: no version served")
        for label, version in model.version_labels.items():
            if version not in served:
                report["errors"].append(f"{model.name}: label {label} -> {version}, not served")
        for version in served:
            folder = Path(model.base_path) / str(version)
            if not (folder / "saved_model.pb").is_file():
                report["errors"].append(f"{model.name}/{version}: no saved_model.pb in {folder}")
                continue
            out = subprocess.run(
                [sys.executable, __file__, "--version", str(folder)],
                capture_output=True,
                text=True,
                timeout=600,
            )
            try:
                result = json.loads(out.stdout.strip().splitlines()[-1])
            except (IndexError, ValueError):
                result = {"error": f"exit {out.returncode}: {out.stderr[-1500:]}"}
            entry["versions"][str(version)] = result
            if "error" in result:
                report["errors"].append(f"{model.name}/{version}: {result['error']}")
    return report


def check_version(folder: Path) -> dict:
    """Load one SavedModel and replay its warm-up records (run in a fresh process)."""
    import numpy as np
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    loaded = tf.saved_model.load(str(folder))
    signatures = sorted(loaded.signatures.keys())
    warmup = folder / WARMUP
    if not warmup.is_file():
        return {"error": f"no warm-up file {WARMUP}", "signatures": signatures}
    replayed: dict[str, int] = {}
    outputs: dict[str, list[str]] = {}
    for record in tf.data.TFRecordDataset(str(warmup)):
        log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
        request = log.predict_log.request
        name = request.model_spec.signature_name or "serving_default"
        if name not in loaded.signatures:
            return {
                "error": f"warm-up request for unknown signature {name!r}",
                "signatures": signatures,
            }
        fn = loaded.signatures[name]
        inputs = {k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()}
        got = fn(**inputs)
        for key, value in got.items():
            array = value.numpy()
            if array.dtype.kind in "fc" and not np.all(np.isfinite(array)):
                return {"error": f"{name}/{key}: non-finite output on a warm-up request"}
        outputs[name] = sorted(got)
        replayed[name] = replayed.get(name, 0) + 1
    if not replayed:
        return {"error": "the warm-up file holds no request", "signatures": signatures}
    return {"signatures": signatures, "replayed": replayed, "outputs": outputs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "config", nargs="?", help="models.config (TF Serving's --model_config_file)"
    )
    parser.add_argument("--version", help=argparse.SUPPRESS)  # the fresh process of one version
    args = parser.parse_args(argv)
    if args.version:
        try:
            result = check_version(Path(args.version))
        except Exception as exc:  # reported, not raised: the parent collects every failure
            result = {"error": f"{type(exc).__name__}: {str(exc)[:1500]}"}
        print(json.dumps(result))
        return 0
    if not args.config:
        parser.error("give the models.config to check")
    report = check_config(Path(args.config))
    print(json.dumps(report, indent=2))
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
