"""Experiments of several runs: a config's ``variants:`` list.

A config may end with a list of variants, each a name and ``--set`` overrides::

    variants:
      - name: gru-T100
        set: [model.name=gru, data.length=100]

``deeptrends train CONFIG`` then runs every variant as its own run in one MLflow
experiment (the config's), one after the other: run name = variant name, tag
``variant``, and a registered model of its own (``<config>-<variant>`` unless the variant
sets ``tracking.registered_model``), so that the quality gate compares like with like.
Command-line ``--set`` overrides apply to every variant, after the variant's own;
``--variant NAME`` (repeatable) runs only those. ``deeptrends compare EXPERIMENT`` puts
the runs side by side. A config without ``variants`` is one run, as before.

This module imports neither TensorFlow nor MLflow.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from pipelines.config import (
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    read_yaml,
    resolve_config_path,
    short_repr,
    validate_config,
)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _parse_variants(raw: Any, source: str) -> list[tuple[str, list[str]]]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{source}: variants must be a non-empty list of {{name, set}} mappings")
    out: list[tuple[str, list[str]]] = []
    for i, item in enumerate(raw):
        where = f"{source}: variants[{i}]"
        if not isinstance(item, dict) or set(item) - {"name", "set"} or "name" not in item:
            raise ConfigError(
                f"{where}: expected a mapping with keys 'name' and 'set' "
                f"(a list of KEY=VALUE). Got {short_repr(item)}"
            )
        name = item["name"]
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConfigError(f"{where}.name: {short_repr(name)} must match {_NAME.pattern}")
        sets = item.get("set") or []
        if isinstance(sets, str):
            sets = [sets]
        if not isinstance(sets, list) or not all(isinstance(s, str) for s in sets):
            raise ConfigError(
                f"{where}.set: expected a list of KEY=VALUE strings. Got {short_repr(sets)}"
            )
        if name in {n for n, _ in out}:
            raise ConfigError(f"{where}.name: {name!r} is used twice")
        out.append((name, sets))
    return out


def load_runs(
    name_or_path: str, overrides: list[str] | None = None, only: list[str] | None = None
) -> list[ExperimentConfig]:
    """The validated config of every run a config asks for (one without ``variants``)."""
    path = resolve_config_path(name_or_path)
    raw = read_yaml(path)
    source = str(path) if path.suffix else name_or_path
    variants = raw.pop("variants", None)
    raw.pop("claim", None)  # seeds and verdict rules, read by ``deeptrends report claims``
    overrides = list(overrides or [])
    if variants is None:
        if only:
            raise ConfigError(f"--variant {only[0]!r}: config {source} has no variants")
        return [validate_config(apply_overrides(raw, overrides), source=source)]
    parsed = _parse_variants(variants, source)
    names = [n for n, _ in parsed]
    if only:
        unknown = [n for n in only if n not in names]
        if unknown:
            raise ConfigError(
                f"--variant {unknown[0]!r}: not a variant of {source}. Variants: {', '.join(names)}"
            )
        parsed = [(n, s) for n, s in parsed if n in only]
    configs = []
    for name, sets in parsed:
        where = f"{source} variant {name!r}"
        run = apply_overrides(copy.deepcopy(raw), sets + overrides)
        tracking = run.get("tracking")
        tracking = {} if tracking is None else tracking
        if not isinstance(tracking, dict):
            raise ConfigError(
                f"Invalid config {where}: tracking: expected a mapping (got {short_repr(tracking)})"
            )
        tags = tracking.get("tags")
        tags = {} if tags is None else tags
        if not isinstance(tags, dict):
            raise ConfigError(
                f"Invalid config {where}: tracking.tags: expected a mapping of strings "
                f"(got {short_repr(tags)})"
            )
        run["tracking"] = tracking
        tracking.setdefault("run_name", name)
        tracking.setdefault("registered_model", f"{run.get('name', 'experiment')}-{name}")
        tracking["tags"] = {**tags, "variant": name}
        configs.append(validate_config(run, source=where))
    return configs
