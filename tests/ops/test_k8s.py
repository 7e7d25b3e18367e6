"""deploy/k8s validated offline against the Kubernetes API models of the ``kubernetes``
Python client (no cluster): every field known, required ones present, types right; the
CronJobs are what ``deeptrends schedule k8s`` generates; the pods' TF_CONFIG script."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from pipelines import schedule as sched
from tests.ops.conftest import REPO

K8S = REPO / "deploy" / "k8s"
KINDS = {
    ("v1", "Service"): "V1Service",
    ("batch/v1", "Job"): "V1Job",
    ("batch/v1", "CronJob"): "V1CronJob",
}
PRIMITIVES = {
    "str": str,
    "int": int,
    "bool": bool,
    "float": (int, float),
    "object": object,
    "datetime": str,
    "date": str,
}


def schema_errors(value, type_name: str, where: str) -> list[str]:
    """Unknown keys and wrongly typed values of ``value`` read as ``type_name``."""
    from kubernetes import client

    if type_name.startswith("list["):
        if not isinstance(value, list):
            return [f"{where}: expected a list"]
        return [
            e
            for i, v in enumerate(value)
            for e in schema_errors(v, type_name[5:-1], f"{where}[{i}]")
        ]
    if type_name.startswith(("dict(", "dict[")):
        inner = type_name[5:-1].split(", ", 1)[1]
        if not isinstance(value, dict):
            return [f"{where}: expected a mapping"]
        return [e for k, v in value.items() for e in schema_errors(v, inner, f"{where}.{k}")]
    if type_name in PRIMITIVES:
        ok = isinstance(value, PRIMITIVES[type_name]) and not (
            type_name in ("int", "float") and isinstance(value, bool)
        )
        return [] if ok else [f"{where}: expected {type_name}, got {value!r}"]
    model = getattr(client.models, type_name)
    if not isinstance(value, dict):
        return [f"{where}: expected a {type_name} mapping"]
    fields = {json_key: attr for attr, json_key in model.attribute_map.items()}
    errors = []
    for key, item in value.items():
        if key not in fields:
            errors.append(f"{where}.{key}: not a field of {type_name}")
        else:
            errors += schema_errors(item, model.openapi_types[fields[key]], f"{where}.{key}")
    return errors


def validate(doc: dict) -> list[str]:
    from kubernetes import client

    type_name = KINDS[(doc["apiVersion"], doc["kind"])]
    errors = schema_errors(doc, type_name, doc["kind"])
    try:  # the models' own checks: required fields, enum values
        client.ApiClient()._ApiClient__deserialize(doc, type_name)
    except (ValueError, TypeError) as exc:
        errors.append(f"{doc['kind']}: {exc}")
    return errors


def manifests() -> list[Path]:
    return sorted(K8S.rglob("*.yaml"))


@pytest.mark.parametrize("path", manifests(), ids=lambda p: str(p.relative_to(K8S)))
def test_manifests_are_valid_kubernetes_objects(path):
    pytest.importorskip("kubernetes")
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs
    for doc in docs:
        assert validate(doc) == []


def test_the_validator_catches_mistakes():
    pytest.importorskip("kubernetes")
    job = yaml.safe_load(sched_yaml("nightly-lenet5-digits"))
    job["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["imagePullPolice"] = "x"
    job["spec"]["schedule"] = 5
    errors = validate(job)
    assert any("imagePullPolice: not a field of V1Container" in e for e in errors)
    assert any("spec.schedule: expected str" in e for e in errors)
    del job["spec"]["jobTemplate"]
    assert any("job_template" in e for e in validate(job))


def sched_yaml(name: str) -> str:
    return yaml.safe_dump(sched.k8s_cronjob(sched.load_schedule(name)), sort_keys=False)


@pytest.mark.parametrize("name", sorted(sched.shipped_schedule_paths()))
def test_a_cronjob_per_schedule_as_generated(name):
    path = K8S / "cronjobs" / f"{name}.yaml"
    assert path.is_file(), f"run: deeptrends schedule k8s {name} > {path.relative_to(REPO)}"
    assert path.read_text() == sched_yaml(name), f"regenerate {path.relative_to(REPO)}"
    job = yaml.safe_load(path.read_text())
    s = sched.load_schedule(name)
    assert (job["spec"]["schedule"], job["spec"]["timeZone"]) == (s.cron, s.timezone)
    assert job["spec"]["concurrencyPolicy"] == "Forbid"


def test_each_training_pod_derives_its_tf_config(tmp_path):
    """The Job's script, run as pod 1 of 2 with a stand-in ``deeptrends`` on PATH."""
    docs = list(yaml.safe_load_all((K8S / "train-job.yaml").read_text()))
    (job,) = [d for d in docs if d["kind"] == "Job"]
    (service,) = [d for d in docs if d["kind"] == "Service"]
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert job["spec"]["completionMode"] == "Indexed" and service["spec"]["clusterIP"] == "None"
    assert pod["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["selector"] == {"job-name": job["metadata"]["name"]}
    workers = int(next(e["value"] for e in container["env"] if e["name"] == "WORKERS"))
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == workers
    fake = tmp_path / "deeptrends"
    fake.write_text('#!/bin/sh\nprintf \'%s\\n\' "$TF_CONFIG" "$@"\n')
    fake.chmod(0o755)
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    env.update(PATH=f"{tmp_path}:{os.environ['PATH']}", JOB_COMPLETION_INDEX="1")
    out = subprocess.run(
        [*container["command"], container["args"][0]],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    tf_config, *argv = out.stdout.splitlines()
    assert json.loads(tf_config) == {
        "cluster": {
            "worker": [
                "deeptrends-train-0.deeptrends-train:2222",
                "deeptrends-train-1.deeptrends-train:2222",
            ]
        },
        "task": {"type": "worker", "index": 1},
    }
    assert argv == ["train", "lenet5-digits", "--set", "runtime.strategy=multi_worker"]
