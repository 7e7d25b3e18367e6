"""Benchmark: German->English BLEU on the 2,000-pair deu_eng test set (not a test).

Trains the ``nmt-deu-eng`` config (or ``--config``) through the normal pipeline with a
wall-clock training budget (default 20 minutes; training stops at the first batch past
it), then reports sacrebleu BLEU (lower-cased, 13a) for greedy and beam decoding, the
signature, exact match, parameters and the seconds spent.

    DEEPTRENDS_DATA_DIR=../shared/datasets \
        python benchmarks/nmt_deu_eng.py [--minutes 20] [--set k=v ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def budgeted_translation_task(name: str, budget_seconds: float, timing: dict):
    """Register task ``name``: translation whose training stops after ``budget_seconds``
    (at a step), recording ``epochs_done`` and ``train_seconds`` into ``timing``."""
    import keras

    from pipelines.tasks.base import register_task
    from pipelines.tasks.translation import TranslationTask

    class Budget(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.start = time.time()

        def on_epoch_end(self, epoch, logs=None):
            timing["epochs_done"] = epoch + 1

        def on_train_batch_end(self, batch, logs=None):
            if time.time() - self.start > budget_seconds:
                self.model.stop_training = True

        def on_train_end(self, logs=None):
            timing["train_seconds"] = round(time.time() - self.start, 1)

    @register_task(name)
    class BudgetedTranslation(TranslationTask):
        def callbacks(self, inputs, run_dir):
            return [*super().callbacks(inputs, run_dir), Budget()]

    return BudgetedTranslation


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="nmt-deu-eng")
    parser.add_argument("--minutes", type=float, default=20.0, help="training budget (wall clock)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args(argv)

    from pipelines.runtime import quiet_tensorflow

    quiet_tensorflow()

    from pipelines.config import load_config
    from pipelines.train import run_experiment

    budget = args.minutes * 60.0

    timing: dict = {}
    budgeted_translation_task("translation_benchmark", budget, timing)

    config = load_config(args.config, ["task=translation_benchmark", *args.set])
    started = time.time()
    summary = run_experiment(config)
    result = {
        "config": args.config,
        "overrides": args.set,
        "budget_minutes": args.minutes,
        "total_seconds": round(time.time() - started, 1),
        **timing,
        **summary.metrics,
        "run_id": summary.run_id,
        "run_dir": summary.run_dir,
    }
    from pathlib import Path

    sig = Path(summary.run_dir) / "artifacts" / "bleu_signature.txt"
    if sig.exists():
        result["bleu_signature"] = sig.read_text().strip()
    text = json.dumps(result, indent=2)
    print(text)
    if args.output_json:
        Path(args.output_json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
