"""Benchmark: does the translation recipe hold on a smaller corpus? (not a test)

Trains a translation config (default ``nmt-deu-eng`` pointed at English->German with
about 15,000 training pairs: ``data.direction=forward``, ``data.max_pairs=18000``) through
the normal pipeline under a wall-clock training budget, then reports on the 2,000 test
pairs: BLEU as logged (sacrebleu, lower-cased, 13a, with its signature), BLEU with
punctuation removed from both sides, chrF, exact match, the selected epoch, and the
number of ``[UNK]`` in 200 translations of the exported SavedModel (served, not
in-process). ``--analyse RUN_DIR EXPORT`` recomputes the same figures for a finished run
(a run of an earlier version of the pipeline included).

    DEEPTRENDS_DATA_DIR=../shared/datasets flock /tmp/deeptrends-bench.lock \\
        python benchmarks/nmt_generalise.py --name en-de-15k-after [--minutes 10] [--set k=v]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SMALL_CORPUS = ["data.direction=forward", "data.max_pairs=18000", "train.epochs=12"]
NUM_SERVED = 200


def analyse(run_dir: str, export_path: str) -> dict:
    """Both BLEU conventions, chrF and exact match from ``test_translations.jsonl``, and
    the ``[UNK]`` count in ``NUM_SERVED`` test translations of the SavedModel."""
    import tensorflow as tf
    import tensorflow_text  # noqa: F401 - the WordPiece ops of a subword model

    from pipelines.evaluation.text import corpus_bleu, corpus_chrf, exact_match

    rows = [
        json.loads(line)
        for line in (Path(run_dir) / "artifacts" / "test_translations.jsonl")
        .read_text()
        .splitlines()
    ]
    hyps = [r["translation"] for r in rows]
    refs = [r["reference"] for r in rows]
    bleu, plain, chrf = (
        corpus_bleu(hyps, refs),
        corpus_bleu(hyps, refs, punctuation=False),
        corpus_chrf(hyps, refs),
    )
    served = tf.saved_model.load(export_path).signatures["serving_default"]
    sources = [r["source"] for r in rows[:NUM_SERVED]]
    out = served(sentences=tf.constant(sources))["translations"].numpy()
    texts = [t.decode("utf-8") for t in out]
    unk_examples = [(s, t) for s, t in zip(sources, texts, strict=True) if "[UNK]" in t][:5]
    return {
        "bleu": round(bleu.score, 2),
        "bleu_signature": bleu.signature,
        "bleu_nopunct": round(plain.score, 2),
        "bleu_nopunct_signature": plain.signature,
        "chrf": round(chrf.score, 2),
        "chrf_signature": chrf.signature,
        "exact_match": round(exact_match(hyps, refs), 4),
        "served_translations": len(texts),
        "served_unk_tokens": sum(t.count("[UNK]") for t in texts),
        "served_with_unk": sum("[UNK]" in t for t in texts),
        "served_unk_examples": unk_examples,
    }


def train(config_name: str, overrides: list[str], minutes: float) -> tuple[dict, object]:
    from nmt_deu_eng import budgeted_translation_task  # (benchmarks/ is the script's folder)

    from pipelines.config import load_config
    from pipelines.train import run_experiment

    timing: dict = {}
    budgeted_translation_task("translation_budgeted", minutes * 60.0, timing)

    config = load_config(config_name, ["task=translation_budgeted", *overrides])
    summary = run_experiment(config)
    history = json.loads((Path(summary.run_dir) / "artifacts" / "history.json").read_text())
    timing["history_val_bleu"] = [round(v, 2) for v in history.get("val_bleu", [])]
    timing["history_val_loss"] = [round(v, 3) for v in history.get("val_loss", [])]
    return timing, summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="results/nmt-<name>.json")
    parser.add_argument("--config", default="nmt-deu-eng")
    parser.add_argument("--minutes", type=float, default=10.0, help="training budget")
    parser.add_argument("--full-corpus", action="store_true", help="no small-corpus overrides")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--analyse", nargs=2, metavar=("RUN_DIR", "EXPORT"))
    args = parser.parse_args(argv)

    from pipelines.runtime import quiet_tensorflow

    quiet_tensorflow()
    overrides = ([] if args.full_corpus else SMALL_CORPUS) + args.set
    result: dict = {"name": args.name, "config": args.config, "load_before": os.getloadavg()}
    started = time.time()
    if args.analyse:
        run_dir, export = args.analyse
        result["overrides"] = "see the run's config.yaml"
    else:
        result["overrides"] = [f"name=nmt-{args.name}", *overrides]
        result["budget_minutes"] = args.minutes
        timing, summary = train(args.config, [f"name=nmt-{args.name}", *overrides], args.minutes)
        result.update(timing)
        result["logged_metrics"] = summary.metrics
        run_dir, export = summary.run_dir, summary.export_path
    result.update(analyse(run_dir, export))
    result["run_dir"], result["export_path"] = run_dir, export
    result["load_after"] = os.getloadavg()
    result["total_seconds"] = round(time.time() - started, 1)
    text = json.dumps(result, indent=2, ensure_ascii=False)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"nmt-{args.name}.json").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
