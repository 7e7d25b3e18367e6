"""Serving the champion: over REST with ``mlflow models serve`` (the registry's
``models:/NAME@champion``), and the TF Serving folder as TF Serving would load it."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request

import numpy as np
import pytest

from tests.ops.conftest import BIN, REPO, digits_batch, free_port, wait_http

pytestmark = [pytest.mark.server, pytest.mark.slow]


def test_rest_serving_of_the_champion_returns_the_right_classes(champion, tmp_path):
    import mlflow

    port = free_port()  # never 5000: that is the tracking server's default
    uri = f"models:/{champion.model_name}@champion"
    env = champion.server.client_env(MLFLOW_HOME=str(tmp_path))
    proc = subprocess.Popen(
        [
            "nice",
            "-n",
            "10",
            str(BIN / "mlflow"),
            "models",
            "serve",
            "-m",
            uri,
            "--env-manager",
            "local",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        env=env,
        cwd=tmp_path,
        stdout=open(tmp_path / "serve.log", "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", 600, proc)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/version", timeout=10) as r:
            assert r.read().decode().strip() == mlflow.__version__
        images, labels = digits_batch(64)
        body = json.dumps({"inputs": images.tolist()}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=120) as r:
            predictions = np.asarray(json.loads(r.read())["predictions"])
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert predictions.shape == (64, 10)
    served = predictions.argmax(axis=1)
    mlflow.set_tracking_uri(champion.server.url)
    expected = mlflow.keras.load_model(uri).predict(images, verbose=0).argmax(axis=1)
    np.testing.assert_array_equal(served, expected)  # the registry's champion, as trained
    assert (served == labels).mean() >= 0.7, (served, labels)  # and it reads digits


def test_tf_serving_layout_loads_as_tf_serving_would(champion):
    """models.config parses with the serving protos; each version loads in a fresh process
    and its warm-up records replay against its signatures."""
    config = champion.serving_dir / "models.config"
    out = subprocess.run(
        [sys.executable, str(REPO / "deploy/tfserving/check_layout.py"), str(config)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads(out.stdout)
    entry = report["models"][champion.model_name]
    assert entry["labels"] == {"champion": int(champion.summary["model_version"])}
    (version,) = entry["versions"].values()
    assert {"serving_default", "image_bytes"} <= set(version["replayed"])
    assert {"classes", "probabilities"} <= set(version["outputs"]["serving_default"])
