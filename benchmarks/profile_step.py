"""Where a family's training step spends its time: the loop's step function of the shipped
config, timed at 1 and N steps per execution (the host's cost per call and the graph's per
step split from the two) and traced by the TensorFlow profiler (op time by op type).

    flock /tmp/deeptrends-bench.lock nice -n 5 .venv/bin/python benchmarks/profile_step.py \
        [--family lenet5] [--precision float32] [--steps-per-execution 10] [--steps 100]

Writes ``benchmarks/results/profile-<family>-<precision>.json`` (``--output`` to choose).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines import runtime  # noqa: E402

runtime.quiet_tensorflow()

from pipelines.io import write_text_atomic  # noqa: E402
from pipelines.reports.bench import FAMILIES, PRECISIONS, _cpu_name  # noqa: E402
from pipelines.reports.profile import format_profile, profile_family  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="lenet5", choices=sorted(FAMILIES))
    parser.add_argument("--precision", default="float32", choices=PRECISIONS)
    parser.add_argument("--steps-per-execution", type=int, nargs="+", default=[10])
    parser.add_argument("--steps", type=int, default=100, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--trace-steps-per-execution", type=int, default=1)
    parser.add_argument("--output")
    args = parser.parse_args(argv)
    start = os.getloadavg()[0]
    try:
        profile = profile_family(
            args.family,
            args.precision,
            tuple(args.steps_per_execution),
            steps=args.steps,
            rounds=args.rounds,
            trace_steps_per_execution=args.trace_steps_per_execution,
        )
    except ValueError as err:
        parser.error(str(err))
    report = {
        **asdict(profile),
        "cpu": _cpu_name(),
        "cpu_flags": sorted(runtime.cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "amx_bf16"}),
        "load_average_1m": [start, os.getloadavg()[0]],
    }
    print(format_profile(profile))
    print(f"load average (1 min): {start:.2f} -> {report['load_average_1m'][1]:.2f}")
    out = Path(args.output or RESULTS / f"profile-{args.family}-{args.precision}.json")
    write_text_atomic(out, json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
