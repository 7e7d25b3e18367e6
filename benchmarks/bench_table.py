"""Print the README's Speed table (Markdown) from a ``deeptrends bench --all`` JSON report,
or, with ``--compare``, the rates of two reports side by side (the oneDNN table).

.venv/bin/python benchmarks/bench_table.py [benchmarks/results/bench-families.json]
.venv/bin/python benchmarks/bench_table.py --compare benchmarks/results/bench-onednn-off.json \
    benchmarks/results/bench-onednn-on.json --labels off on
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.reports.bench import comparison_table, markdown_table  # noqa: E402

DEFAULT = Path(__file__).resolve().parent / "results" / "bench-families.json"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", nargs="?", default=str(DEFAULT))
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    parser.add_argument("--labels", nargs=2, default=["before", "after"])
    args = parser.parse_args(argv)
    if args.compare:
        before, after = (json.loads(Path(p).read_text()) for p in args.compare)
        print(comparison_table(before, after, tuple(args.labels)))
    else:
        print(markdown_table(json.loads(Path(args.report).read_text())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
