"""The README's speed tables are the benchmark JSON files' tables, as the scripts print them:
a re-run bench that is not copied into the README, or a README figure edited by hand, fails."""

from __future__ import annotations

import json
from pathlib import Path

from pipelines.reports.bench import comparison_table, markdown_table

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results"


def _readme() -> str:
    return (REPO / "README.md").read_text()


def test_the_every_family_table_is_bench_families_json():
    report = json.loads((RESULTS / "bench-families.json").read_text())
    assert markdown_table(report) in _readme()


def test_the_onednn_table_is_the_two_benches():
    off, on = (json.loads((RESULTS / f"bench-onednn-{s}.json").read_text()) for s in ("off", "on"))
    assert off["onednn"] is False and on["onednn"] is True  # each ran the kernels it says
    assert comparison_table(off, on, ("off", "on")) in _readme()
