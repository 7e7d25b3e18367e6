"""Print the README's captioning table (Markdown) from ``captioning_flickr8k.py`` results.

One row per result file (``benchmarks/results/captioning-<tag>.json``, in the order given),
then the blind language model and nearest-neighbour rows of the first file (each run trains
its own blind model: its rows are in every file, and the paired intervals are against it):

    .venv/bin/python benchmarks/captioning_table.py soft soft-early-stop soft-es-nounk ...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
COLUMNS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider")


def _f(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _interval(m: dict, key: str) -> str:
    low, high = m.get(f"{key}_low"), m.get(f"{key}_high")
    return "" if low is None or high is None else f" [{low:.3f}, {high:.3f}]"


def row(tag: str, data: dict) -> list[str]:
    m = data["metrics"]
    scores = [_f(m.get(c)) + (_interval(m, c) if c in ("bleu_4", "cider") else "") for c in COLUMNS]
    vs_blind = _f(m.get("cider_vs_blind")) + _interval(m, "cider_vs_blind")
    return [
        f"`{tag}`",
        ", ".join(data.get("overrides") or []) or "as shipped",
        str(data.get("epochs_done", "-")),
        f"{m['loss']:.3f} / {m['blind_loss']:.3f}" if "blind_loss" in m else f"{m['loss']:.3f}",
        *scores,
        vs_blind,
    ]


def baseline_rows(tag: str, data: dict) -> list[list[str]]:
    m, out = data["metrics"], []
    for prefix, label in (("blind", "blind LM"), ("nn", "nearest neighbour")):
        if f"{prefix}_cider" in m:
            cells = [_f(m.get(f"{prefix}_{c}")) for c in COLUMNS]
            out.append([f"{label} (of `{tag}`)", "", "", "", *cells, ""])
    return out


def markdown(tags: list[str]) -> str:
    head = [
        "run",
        "overrides",
        "epochs",
        "val loss / blind's",
        "BLEU-1",
        "BLEU-2",
        "BLEU-3",
        "BLEU-4 [95%]",
        "METEOR",
        "ROUGE-L",
        "CIDEr-D [95%]",
        "CIDEr-D - blind's [95%]",
    ]
    rows, first = [], None
    for tag in tags:
        data = json.loads((RESULTS / f"captioning-{tag}.json").read_text())
        first = first or (tag, data)
        rows.append(row(tag, data))
    if first:
        rows += baseline_rows(*first)
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if not argv:
        argv = sorted(p.stem.removeprefix("captioning-") for p in RESULTS.glob("captioning-*.json"))
    missing = [t for t in argv if not (RESULTS / f"captioning-{t}.json").exists()]
    if missing:
        print(f"no results for {missing} in {RESULTS} (captioning-<tag>.json)", file=sys.stderr)
        return 2
    print(markdown(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
