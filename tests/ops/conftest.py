"""Fixtures of the operations tests: the tracking server (mlflow/server.sh: PostgreSQL and
``mlflow server`` on free loopback ports, state in a temporary folder), a champion trained
through it once per session, and small helpers. The fixtures start and stop the services
themselves; where one truly cannot start (PostgreSQL not installed, say) the tests that
need it skip and say why."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DEEPTRENDS = str(BIN / "deeptrends")
TINY = ["train.epochs=1", "train.steps_per_epoch=2", "train.verbose=0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def quiet_env(**extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "MLFLOW_LOGGING_LEVEL": "WARNING",
        # the venv's tools (uvicorn for `mlflow models serve`) without an activated venv
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(extra)
    return env


def sets(*items: str) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def run_cli(args: list[str], env: dict[str, str], timeout: float = 900, cwd: Path | None = None):
    """``deeptrends ARGS`` under ``nice`` (the machine is shared); the completed process."""
    return subprocess.run(
        ["nice", "-n", "10", DEEPTRENDS, *args],
        env=env,
        cwd=cwd or REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def postgres_installed() -> bool:
    return bool(shutil.which("pg_ctl") or glob.glob("/usr/lib/postgresql/*/bin/initdb"))


@dataclass
class Server:
    url: str
    state: Path
    env: dict[str, str]  # what server.sh ran with (its ports and state folder)
    username: str | None = None
    password: str | None = None

    def client_env(self, **extra: str) -> dict[str, str]:
        """A training command's environment: the server, and credentials where auth is on."""
        env = quiet_env(MLFLOW_TRACKING_URI=self.url, **extra)
        if self.username:
            env.update(
                MLFLOW_TRACKING_USERNAME=self.username, MLFLOW_TRACKING_PASSWORD=self.password
            )
        return env


@contextlib.contextmanager
def tracking_server(auth: bool = False):
    """mlflow/server.sh start ... stop, on free ports with a fresh state folder."""
    if not postgres_installed():
        pytest.skip("PostgreSQL is not installed (make ops-deps installs Debian's postgresql)")
    state = Path(tempfile.mkdtemp(prefix="deeptrends-mlflow-"))
    state.chmod(0o755)  # PostgreSQL runs as the postgres user and must enter it
    port = free_port()
    env = {
        **os.environ,
        "DEEPTRENDS_STATE_DIR": str(state),
        "MLFLOW_PORT": str(port),
        "MLFLOW_PG_PORT": str(free_port()),
        "MLFLOW_WORKERS": "2",
        "MLFLOW_BIN": str(BIN / "mlflow"),
    }
    server = Server(f"http://127.0.0.1:{port}", state, env)
    if auth:
        server.username, server.password = "admin", secrets.token_urlsafe(16)
        env.update(
            MLFLOW_AUTH="1",
            MLFLOW_AUTH_ADMIN_USERNAME=server.username,
            MLFLOW_AUTH_ADMIN_PASSWORD=server.password,
        )
    script = str(REPO / "mlflow" / "server.sh")
    started = subprocess.run(
        ["bash", script, "start"], env=env, capture_output=True, text=True, timeout=600
    )
    try:
        if started.returncode != 0:
            pytest.fail(f"mlflow/server.sh start failed:\n{started.stderr[-4000:]}")
        yield server
    finally:
        subprocess.run(["bash", script, "stop"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="session")
def server():
    """A tracking server without auth, for the whole session."""
    with tracking_server() as s:
        yield s


@dataclass
class Champion:
    server: Server
    workdir: Path
    serving_dir: Path
    model_name: str
    experiment: str
    summary: dict
    train_seconds: float


@pytest.fixture(scope="session")
def champion(server, tmp_path_factory):
    """lenet5-digits as shipped but for a short budget (3 epochs: it tells digits apart),
    trained through the server over HTTP: run, artifacts, registered version, champion."""
    work = tmp_path_factory.mktemp("champion")
    serving = work / "serving"
    started = time.time()
    out = run_cli(
        [
            "train",
            "lenet5-digits",
            *sets(
                "train.epochs=3",
                "train.verbose=0",
                f"runtime.work_dir={work / 'runs'}",
                f"export.serving_dir={serving}",
            ),
            "--output-json",
            str(work / "summary.json"),
        ],
        server.client_env(),
        cwd=work,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    summary = json.loads((work / "summary.json").read_text())
    return Champion(
        server,
        work,
        serving,
        summary["model_name"],
        summary["experiment"],
        summary,
        time.time() - started,
    )


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    import urllib.error
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"{proc.args[0]} exited with {proc.returncode} before {url} answered"
            )
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:g} s")


def digits_batch(n: int = 64):
    """``n`` digits (the test split's images: 8x8 scaled to 0..255, resized to 32x32 in
    [0, 1], as the model takes them) and their labels."""
    import numpy as np
    from sklearn.datasets import load_digits

    from data.images import preprocess_images

    bunch = load_digits()
    idx = np.random.default_rng(0).choice(len(bunch.target), n, replace=False)
    images = np.round(bunch.images[idx] * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return preprocess_images(images, 32, 1).numpy(), bunch.target[idx]
