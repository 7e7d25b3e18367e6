"""A seeded mutator over the shipped configs: every mutation ends in a valid config or a
``ConfigError`` naming what is wrong (never another exception type), checked the way
``deeptrends train`` checks before anything runs (schema, variants, task options and
rules, gate metric, model arguments, dataset options); and the CLI answers a user's
mistake with exit 2 and no traceback."""

from __future__ import annotations

import copy
import math
import random
import subprocess
import sys

import pytest

from pipelines.config import ConfigError, read_yaml, shipped_config_paths
from pipelines.variants import load_runs

MUTATIONS = 600
VALUES = [
    -1,
    0,
    1,
    3,
    -5,
    2**31,
    99999999999999999999,
    0.5,
    -0.1,
    1e308,
    math.nan,
    math.inf,
    True,
    False,
    None,
    "",
    "relu",
    "../../outside",
    "it's",
    "ü" * 300,
    "x" * 10_000,
    [],
    [1, 2],
    ["a"],
    {},
    {"a": 1},
    {"name": 3},
    [[1]],
    "1e3",
    "true",
]
NEW_KEYS = ["name", "dropout", "units", "epochs", "bogus", "seed", "metric", "path", "tags"]


def _paths(node, prefix=()):
    if isinstance(node, dict):
        for key, value in node.items():
            yield (*prefix, key)
            yield from _paths(value, (*prefix, key))


def _mutate(raw: dict, rng: random.Random) -> dict:
    raw = copy.deepcopy(raw)
    for _ in range(rng.choice([1, 1, 2, 3])):
        paths = list(_paths(raw))
        path = rng.choice(paths) if paths and rng.random() < 0.8 else (rng.choice(NEW_KEYS),)
        if rng.random() < 0.2 and len(path) < 4:
            path = (*path, rng.choice(NEW_KEYS))
        node = raw
        for part in path[:-1]:
            child = node.get(part) if isinstance(node, dict) else None
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[path[-1]] = copy.deepcopy(rng.choice(VALUES))
    return raw


def _check(raw: dict, tmp_path, index: int) -> None:
    import yaml

    from pipelines.train import check_config

    path = tmp_path / f"m{index}.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True))
    for config in load_runs(str(path)):
        check_config(config)


def test_every_mutation_is_a_valid_config_or_a_config_error(tmp_path):
    pytest.importorskip("tensorflow")  # the task checks import their task modules
    rng = random.Random(20261201)
    shipped = {name: read_yaml(path) for name, path in sorted(shipped_config_paths().items())}
    names = sorted(shipped)
    outcomes = {"valid": 0, "ConfigError": 0}
    for i in range(MUTATIONS):
        raw = _mutate(shipped[rng.choice(names)], rng)
        try:
            _check(raw, tmp_path, i)
            outcomes["valid"] += 1
        except ConfigError as exc:
            assert len(str(exc)) < 20_000, "an error message must not echo a huge value"
            outcomes["ConfigError"] += 1
        except Exception as exc:  # noqa: BLE001 - the point of the test
            pytest.fail(f"mutation {i} raised {type(exc).__name__}: {exc}\n{raw}")
    assert outcomes["valid"] and outcomes["ConfigError"], outcomes


@pytest.mark.parametrize(
    "args",
    [
        ["--set", "model.dropout=-1"],
        ["--set", "runtime.seed=-5"],
        ["--set", "train.batch_size=99999999999999999999"],
        ["--set", "tracking.registered_model=../../outside", "--set", "tracking.log_model=false"],
        ["--set", "runtime.strategy=tpu"],
        ["--set", "task_options.nope=1"],
        ["--set", "tracking.gate.metric=neg_elbo"],
    ],
)
def test_cli_user_errors_exit_2_without_a_traceback(args, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "train", "lenet5-digits", *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "deeptrends: error:" in proc.stderr
    assert not list(tmp_path.iterdir()), "nothing is written for a config error"
