"""``deeptrends launch --workers N CONFIG``: a local multi-worker job.

Starts N worker processes of ``deeptrends train`` with ``TF_CONFIG`` on free loopback
ports (worker 0 is the chief: it alone logs to MLflow, registers and exports), streams
the chief's output, writes the others' to ``<work_dir>/<name>/launch/worker-<i>.log``, and
stops the whole job with a non-zero exit naming the worker as soon as any worker dies,
instead of leaving the rest blocked in a collective. SIGTERM/SIGINT are forwarded to the
workers (each checkpoints and exits; the same command resumes).

TensorFlow's gRPC server binds every interface whatever address the cluster spec names
(it has no bind option and no authentication). ``network="private"`` (what ``auto`` picks
where ``unshare`` may create a user and network namespace and the tracking store is local)
runs the whole job in a new network namespace whose only interface is loopback: the
workers reach each other and nothing outside reaches them. ``host`` keeps the host's
network (a remote tracking server needs it) and says so.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


NETWORKS = ("auto", "private", "host")


def can_isolate() -> bool:
    """Whether this user may run a command in a new user + network namespace."""
    try:
        probe = subprocess.run(
            ["unshare", "-rn", "ip", "link", "set", "lo", "up"],
            capture_output=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


def _local_store(uri: str) -> bool:
    return uri.split(":", 1)[0].lower() in ("sqlite", "file") or "://" not in uri


def launch(
    workers: int,
    config: str,
    overrides: list[str],
    output_json: str | None = None,
    grace_seconds: float = 20.0,
    network: str = "auto",
) -> int:
    from pipelines.config import load_config

    if workers < 1:
        print("deeptrends launch: --workers must be >= 1", file=sys.stderr)
        return 2
    user_overrides = list(overrides)
    overrides = [*overrides, "runtime.strategy=multi_worker"]
    cfg = load_config(config, overrides)  # fail on a bad config before starting anything
    if network in ("auto", "private"):
        from pipelines.tracking import tracking_uri

        local = not cfg.tracking.enabled or _local_store(tracking_uri(cfg))
        isolate = can_isolate()
        if network == "private" and not (isolate and local):
            why = "unshare -rn is not permitted here" if not isolate else "the tracking store"
            print(
                f"deeptrends launch: --network private: {why}"
                + ("" if not isolate else f" {tracking_uri(cfg)} is not reachable from it"),
                file=sys.stderr,
            )
            return 2
        if isolate and local:
            return _launch_private(workers, config, user_overrides, output_json)
    if network == "inside":  # re-executed by _launch_private: only loopback exists here
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    else:
        print(
            "deeptrends launch: the workers' TensorFlow gRPC servers listen on every interface "
            "without authentication (host network); firewall their ports, or use "
            "--network private where the tracking store is local",
            file=sys.stderr,
        )
    log_dir = Path(cfg.runtime.work_dir) / cfg.name / "launch"
    log_dir.mkdir(parents=True, exist_ok=True)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in free_ports(workers)]}

    procs: list[subprocess.Popen] = []
    logs: list[Path] = []
    pump = None
    for i in range(workers):
        env = {
            **os.environ,
            "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}}),
        }
        cmd = [sys.executable, "-m", "pipelines.cli", "train", config]
        for item in overrides:
            cmd += ["--set", item]
        if i == 0 and output_json:
            cmd += ["--output-json", output_json]
        log_path = log_dir / f"worker-{i}.log"
        logs.append(log_path)
        if i == 0:
            proc = subprocess.Popen(
                cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
            )
            pump = threading.Thread(target=_stream, args=(proc, log_path), daemon=True)
            pump.start()
        else:
            with open(log_path, "w") as fh:
                proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
        procs.append(proc)
    where = " (private network namespace)" if network == "inside" else ""
    print(
        f"deeptrends launch: {workers} workers on {', '.join(cluster['worker'])}{where}; "
        f"logs in {log_dir}",
        file=sys.stderr,
        flush=True,
    )
    (log_dir / "pids.json").write_text(
        json.dumps(
            {
                **{f"worker-{i}": p.pid for i, p in enumerate(procs)},
                "cluster": cluster["worker"],
                "network": "private" if network == "inside" else "host",
            }
        )
    )

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            codes = [p.poll() for p in procs]
            for i, rc in enumerate(codes):
                if rc not in (None, 0):
                    _stop(procs, grace_seconds)
                    print(
                        f"deeptrends launch: worker {i} died with exit code {rc}; stopped the job.\n"
                        f"--- last lines of {logs[i]} ---\n{_tail(logs[i])}",
                        file=sys.stderr,
                        flush=True,
                    )
                    return rc if rc > 0 else 128 - rc
            if all(rc == 0 for rc in codes):
                return 0
            time.sleep(0.3)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        if pump is not None:
            pump.join(timeout=5)


def _launch_private(
    workers: int, config: str, overrides: list[str], output_json: str | None
) -> int:
    """This launch again inside ``unshare -rn`` (a new user and network namespace: the
    workers' servers are reachable from the job only); signals are forwarded to it."""
    cmd = ["unshare", "-rn", sys.executable, "-m", "pipelines.cli", "launch"]
    cmd += ["--network", "inside", "--workers", str(workers), config]
    for item in overrides:
        cmd += ["--set", item]
    if output_json:
        cmd += ["--output-json", str(Path(output_json).resolve())]
    proc = subprocess.Popen(cmd)

    def forward(signum, frame):
        if proc.poll() is None:
            proc.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return proc.wait()
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def _stream(proc: subprocess.Popen, log_path: Path) -> None:
    with open(log_path, "w") as fh:
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            fh.write(line)


def _stop(procs: list[subprocess.Popen], grace: float) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.time() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
