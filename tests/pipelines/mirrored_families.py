"""Script for test_distribution: every model family trains two steps under ``mirrored``
on 2 virtual CPUs, through its own task (custom train steps included). Run one case per
process (``python mirrored_families.py INDEX``): a process's devices are fixed at start-up.
Each case trains through the driver's ``fit_model``, as ``deeptrends train`` does.
Prints one JSON line per case: {"case", "loss", "replicas"}."""

from __future__ import annotations

import json
import math
import sys

from pipelines.config import ConfigError
from pipelines.variants import load_runs

MIRRORED = [
    "runtime.strategy=mirrored",
    "runtime.virtual_cpus=2",
    "train.epochs=1",
    "train.steps_per_epoch=2",
    "train.verbose=0",
]

# (config, variant or None, extra overrides): one per model family and task
CASES = [
    ("lenet5-digits", None, []),
    ("claim-dropout", None, []),  # alexnet
    ("claim-batchnorm", None, []),  # vgg
    ("claim-residual", "plain18", []),  # plain nets
    ("claim-residual", "resnet18", []),  # resnet, basic blocks
    ("googlenet-mnist", None, []),  # auxiliary heads
    ("claim-long-dependencies", "gru-T10", []),  # rnn/lstm/gru on a generated task
    ("claim-lstm-vs-gru", "lm-lstm", []),  # language model, truncated BPTT
    ("nmt-deu-eng", None, ["model.units=32", "model.embedding_dim=16"]),  # seq2seq + attention
    ("rbm-digits", None, []),
    ("vae-digits", None, []),
    ("gan-digits", None, []),
    ("dcgan-digits", None, []),
    ("draw-digits", None, []),
    (
        "dbn-classifier-mnist",
        None,
        ["data.name=digits", "task_options.epochs_per_layer=[1,1,1]"],
    ),  # greedy + fine-tune
]


def _replica_spread(model, strategy) -> float:
    """The largest difference between two replicas' copies of a non-trainable variable
    (BatchNorm statistics) after training: 0 when the loop averaged them."""
    import numpy as np

    spread = 0.0
    for v in model.non_trainable_variables:
        copies = [np.asarray(c) for c in strategy.experimental_local_results(v.value)]
        if "float" in str(v.dtype):
            spread = max(spread, *(float(np.max(np.abs(c - copies[0]), initial=0)) for c in copies))
    return spread


def main(indices: list[str]) -> int:
    from pipelines import runtime
    from pipelines.tasks.base import RunContext, get_task
    from pipelines.train import fit_model

    for index, (config_name, variant, extra) in enumerate(CASES):
        if indices and str(index) not in indices:
            continue
        try:
            config = load_runs(config_name, MIRRORED + extra, only=[variant] if variant else None)[
                0
            ]
        except ConfigError as exc:
            print(json.dumps({"case": config_name, "error": str(exc)}), flush=True)
            return 1
        strategy = runtime.configure(config.runtime)
        replicas = strategy.num_replicas_in_sync
        context = RunContext(config, num_replicas=replicas, strategy=strategy)
        task = get_task(config.task)(context)
        model, history = fit_model(task, task.build_inputs(), context)
        loss_key = "loss" if "loss" in history else sorted(history)[0]
        loss = float(history[loss_key][-1])
        case = f"{config_name}/{variant or config.model.name}"
        print(
            json.dumps(
                {
                    "case": case,
                    "loss": loss,
                    "finite": math.isfinite(loss),
                    "replicas": replicas,
                    "statistics_spread": _replica_spread(model, strategy),
                }
            ),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
