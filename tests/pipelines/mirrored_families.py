"""Script for test_distribution: every model family trains two steps under ``mirrored``
on 2 virtual CPUs, through its own task (custom train steps included). Run one case per
process (``python mirrored_families.py INDEX``): a process's devices are fixed at start-up.
Prints one JSON line per case: {"case", "loss", "replicas"}."""

from __future__ import annotations

import json
import math
import sys

from pipelines.config import ConfigError
from pipelines.variants import load_runs

MIRRORED = ["runtime.strategy=mirrored", "runtime.virtual_cpus=2", "train.epochs=1", "train.verbose=0"]

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
]


def main(indices: list[str]) -> int:
    from pipelines import loop, runtime
    from pipelines.tasks.base import get_task

    import keras

    for index, (config_name, variant, extra) in enumerate(CASES):
        if indices and str(index) not in indices:
            continue
        try:
            config = load_runs(config_name, MIRRORED + extra, only=[variant] if variant else None)[0]
        except ConfigError as exc:
            print(json.dumps({"case": config_name, "error": str(exc)}), flush=True)
            return 1
        strategy = runtime.configure(config.runtime)
        task = get_task(config.task)(config)
        task.num_replicas = strategy.num_replicas_in_sync
        inputs = task.build_inputs()
        with strategy.scope():
            model = task.build_model(inputs.info)
            task.compile_model(model, inputs)
        loop.fit(model, strategy, task.prepare_dataset(inputs.train), epochs=1, steps_per_epoch=2,
                 callbacks=[keras.callbacks.TerminateOnNaN()], verbose=0)
        logs = model.history.history
        loss_key = "loss" if "loss" in logs else sorted(logs)[0]
        loss = float(logs[loss_key][-1])
        print(json.dumps({"case": f"{config_name}/{variant or config.model.name}", "loss": loss,
                          "finite": math.isfinite(loss), "replicas": strategy.num_replicas_in_sync}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
