"""Print the README's Speed table (Markdown) from a ``deeptrends bench --all`` JSON report.

.venv/bin/python benchmarks/bench_table.py [benchmarks/results/bench-families.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.reports.bench import markdown_table  # noqa: E402

DEFAULT = Path(__file__).resolve().parent / "results" / "bench-families.json"


def main(argv: list[str]) -> int:
    path = Path(argv[0]) if argv else DEFAULT
    print(markdown_table(json.loads(path.read_text())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
