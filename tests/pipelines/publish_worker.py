"""A publication in a process of its own, for the crash and concurrency tests:
``python publish_worker.py ROOT ACCURACY [KILL_AT]`` publishes a tiny model as ``life`` to
``ROOT/serving`` with the MLflow store ``ROOT/mlflow.db``; with ``KILL_AT`` (a step of
``Publication.STEPS``) the process kills itself with SIGKILL right after that step."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path


def config_for(root: Path, **sections):
    from pipelines.config import validate_config

    raw = {
        "name": "life",
        "model": {"name": "lenet5"},
        "data": {"name": "digits"},
        "runtime": {"work_dir": str(root / "runs")},
        "tracking": {"uri": f"sqlite:///{root / 'mlflow.db'}"},
        "export": {"serving_dir": str(root / "serving"), "warmup_requests": 1},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return validate_config(raw)


def tiny_serving(scale: float = 1.0):
    import keras
    import numpy as np
    import tensorflow as tf

    from pipelines.tasks.base import Endpoint, Serving

    inputs = keras.Input((3,), name="x")
    model = keras.Model(inputs, keras.layers.Dense(2, name="dense")(inputs))
    check = np.ones((2, 3), np.float32)

    def predict(x):
        return {"y": model(x) * scale}

    spec = [tf.TensorSpec([None, 3], tf.float32, name="x")]
    return Serving(model, [Endpoint("serving_default", predict, spec, [check])])


def main(root: str, accuracy: str, kill_at: str | None = None) -> int:
    from pipelines.publication import Publication
    from pipelines.tracking import RunTracker

    def on_step(step):
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    config = config_for(Path(root))
    with RunTracker(config) as tracker:
        published = Publication(config, tracker, on_step=on_step).publish(
            tiny_serving(), {"accuracy": float(accuracy)}
        )
    print(published.version, ",".join(published.aliases), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
