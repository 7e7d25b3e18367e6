"""Sequence modelling with recurrent nets: classification and regression of generated
sequences (the long-term-dependency problems) and word-level language modelling.

Gradient clipping comes from ``train.clipnorm`` / ``train.global_clipnorm`` (the
optimizer). ``train.bptt_steps`` turns a language model into truncated BPTT: the model is
built stateful with a fixed batch, the data is laid out as ``batch_size`` parallel streams
cut into chunks of ``bptt_steps``, and the state is reset at every epoch and evaluation.
The served model is a stateless twin with the same weights (a request must not see the
state of the previous one).

Metrics, by what the data asks of the model: ``mse`` (regression: the adding problem),
``accuracy`` (classification: first-symbol recall), ``perplexity`` (language models;
``exp`` of the mean per-token cross-entropy; also the ``copy`` problem, whose labels are
scored at the recall steps only); ``loss`` always. Run metrics: ``num_params``,
``seconds_per_epoch``.

``task_options.gradient_through_time: true`` measures, on the first evaluation batch,
the norm of the loss gradient with respect to the network's input at every time step
(the embedding output for token inputs), ``||dL/dx_t||``, before training and after it:
the vanishing gradient of Bengio et al. (1994) made visible. The profiles are the
``gradient_through_time.json`` artifact; the run metrics ``grad_decay_init`` and
``grad_decay_trained`` are ``log10`` of the mean norm over the first tenth of the steps
over that of the last tenth (strongly negative: the early steps get no gradient).
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from pydantic import BaseModel, ConfigDict, Field

import models
from data.catalog import check_options, get_dataset
from data.sequences import PROBLEMS
from pipelines.callbacks import EpochTimer, ResetStates, reset_recurrent_states
from pipelines.config import ConfigError, ExperimentConfig
from pipelines.evaluation.text import Perplexity, masked_token_loss
from pipelines.optim import build_optimizer
from pipelines.tasks.base import (
    DatasetInfo,
    Endpoint,
    Evaluation,
    Inputs,
    Serving,
    Task,
    register_task,
)

LANGUAGE_MODEL = "language_model"
HEAD_METRIC = {"regression": "mse", "classification": "accuracy", LANGUAGE_MODEL: "perplexity"}


@dataclass
class SequenceInfo(DatasetInfo):
    """What a recurrent model and its serving signature need to know about the data."""

    kind: str = ""  # "regression", "classification" or "language_model"
    batch_size: int = 0  # the global batch (the parallel streams of a stateful model)
    input_dim: int | None = None  # real-valued inputs [B, T, input_dim]
    vocab_size: int | None = None  # token inputs
    num_outputs: int | None = None
    sequence_length: int | None = None
    problem: str | None = None
    seq_len: int | None = None  # language models: tokens per window
    stateful: bool = False  # truncated BPTT
    vocabulary: list[str] = field(default_factory=list)


@dataclass
class SequenceRecord:
    """``Inputs.data``: what the run records for ``evaluate`` (the epoch timer's seconds)."""

    epoch_seconds: list[float] = field(default_factory=list)
    gradient_profiles: dict[str, list[float]] = field(default_factory=dict)


class SequenceOptions(BaseModel):
    """``task_options`` of the sequence task."""

    model_config = ConfigDict(extra="forbid")
    gradient_through_time: bool = Field(
        False, description="log ||dL/dx_t|| per time step before and after training"
    )


def gradient_through_time(model, batch) -> list[float]:
    """``||dL/dx_t||`` for every step ``t`` of ``batch`` (x, y): the gradient of the
    compiled loss with respect to the recurrent body's input (the embedding output for
    token inputs), its norm over the batch and features. The networks of
    ``models/recurrent.py`` are a chain of layers, applied here one by one."""
    x, y = batch
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    h = tf.convert_to_tensor(x)
    if layers and isinstance(layers[0], keras.layers.Embedding):
        h, layers = layers[0](h), layers[1:]
    h = tf.cast(h, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(h)
        out = h
        for layer in layers:
            out = layer(out, training=False)
        loss_fn = keras.losses.get(model.loss) if isinstance(model.loss, str) else model.loss
        loss = tf.reduce_mean(loss_fn(tf.convert_to_tensor(y), out))
    grad = tape.gradient(loss, h)  # [B, T, D]
    return [float(v) for v in np.sqrt(np.sum(np.square(grad.numpy()), axis=(0, 2)))]


def gradient_decay(profile: list[float]) -> float:
    """``log10`` (mean norm of the first tenth of the steps / that of the last tenth)."""
    n = max(1, len(profile) // 10)
    first, last = float(np.mean(profile[:n])), float(np.mean(profile[-n:]))
    return float(np.log10(max(first, 1e-30) / max(last, 1e-30)))


class GradientThroughTime(keras.callbacks.Callback):
    """Measures :func:`gradient_through_time` on ``batch`` before training starts."""

    def __init__(self, batch, profiles: dict[str, list[float]]):
        super().__init__()
        self.batch, self.profiles = batch, profiles

    def on_train_begin(self, logs=None):
        if "init" not in self.profiles:
            self.profiles["init"] = gradient_through_time(self.model, self.batch)


def is_language_model_name(name: str) -> bool:
    """``rnn_lm``, ``lstm_lm``, ``gru_lm``: models built with the next-token head."""
    return name.endswith("_lm")


def _is_stateful(model) -> bool:
    return any(getattr(layer, "stateful", False) for layer in model.layers)


@register_task("sequence")
class SequenceTask(Task):
    """RNN/LSTM/GRU on sequences: regression, classification or language modelling."""

    Info = SequenceInfo
    Options = SequenceOptions

    # -- config checks -------------------------------------------------------------
    @classmethod
    def output_kind(cls, config: ExperimentConfig) -> str:
        """What the data asks of the model: ``regression``, ``classification`` or
        ``language_model`` (from the dataset entry and its ``problem`` option)."""
        entry = get_dataset(config.data.name)
        if entry.kind == LANGUAGE_MODEL:
            return LANGUAGE_MODEL
        if entry.kind != "sequence":
            raise ConfigError(
                f"data.name: task 'sequence' reads sequence or language_model datasets; "
                f"{config.data.name!r} is {entry.kind!r}."
            )
        problem = check_options(config.data.name, config.data.options()).get("problem")
        if problem not in PROBLEMS:
            raise ConfigError(
                f"data.problem must be one of {sorted(PROBLEMS)}. Received: problem={problem!r}"
            )
        return PROBLEMS[problem]

    @classmethod
    def check(cls, config: ExperimentConfig, options) -> None:
        name = config.model.name
        declared = models.model_info(name).task
        if declared != "sequence":
            raise ConfigError(
                f"model.name: {name!r} is a {declared} model; task 'sequence' trains rnn, "
                "lstm, gru or their _lm variants."
            )
        kind = cls.output_kind(config)
        if kind == LANGUAGE_MODEL:
            if config.model.kwargs().get("bidirectional"):
                raise ConfigError(
                    "model.bidirectional: a language model may not read the future; "
                    "remove model.bidirectional."
                )
            seq_len = config.data.options().get("seq_len")
            bptt = config.train.bptt_steps
            if bptt and seq_len is not None and seq_len != bptt:
                raise ConfigError(
                    f"data.seq_len: with train.bptt_steps={bptt} the windows are bptt_steps "
                    f"long; data.seq_len={seq_len} contradicts it. Remove data.seq_len."
                )
            return
        if is_language_model_name(name):
            raise ConfigError(
                f"model.name: {name!r} is a language model; dataset {config.data.name!r} "
                f"asks for {kind} (one label per sequence): use rnn, lstm or gru."
            )
        if config.train.bptt_steps:
            raise ConfigError(
                "train.bptt_steps: truncated BPTT applies to language models (a stream); "
                f"dataset {config.data.name!r} has one label per sequence. "
                "Remove train.bptt_steps."
            )

    @classmethod
    def metric_names(cls, config: ExperimentConfig, options) -> tuple[str, ...]:
        return ("loss", HEAD_METRIC[cls.output_kind(config)])

    # -- data --------------------------------------------------------------------------
    def build_inputs(self) -> Inputs:
        cfg = self.config
        entry = get_dataset(cfg.data.name)
        kwargs = check_options(cfg.data.name, cfg.data.options())
        kwargs["batch_size"] = cfg.train.batch_size
        if entry.kind == LANGUAGE_MODEL and cfg.train.bptt_steps:
            kwargs.update(seq_len=cfg.train.bptt_steps, stateful=True)
            if cfg.train.batch_size % self.context.num_replicas:
                raise ConfigError(
                    f"train.batch_size: truncated BPTT splits the {cfg.train.batch_size} "
                    f"parallel streams over {self.context.num_replicas} replicas; use a "
                    "multiple of the replica count."
                )
        module, _, fn = entry.load.partition(":")
        data = getattr(importlib.import_module(module), fn)(**kwargs)
        info = SequenceInfo.from_dict(
            {
                "dataset": cfg.data.name,
                "kind": data.kind,
                "num_train": data.num_train,
                "num_eval": data.num_eval,
                "source": data.source,
                "batch_size": cfg.train.batch_size,
                **data.info,
            }
        )
        steps = cfg.train.steps_per_epoch or data.steps_per_epoch
        start = self.context.start_epoch * steps + self.context.start_step
        check = next(iter(data.eval.take(1)), None)
        return Inputs(
            train=data.train.skip(start) if start else data.train,
            eval=data.eval,
            steps_per_epoch=steps,
            info=info,
            check_batch=None if check is None else np.asarray(check[0]),
            fingerprint=data.fingerprint,
            data=SequenceRecord(),
        )

    # -- model -------------------------------------------------------------------------
    def _model_kwargs(self, info: SequenceInfo, stateful: bool, batch_size: int | None):
        name = self.config.model.name
        kwargs: dict[str, Any] = {}
        if info.kind == LANGUAGE_MODEL:
            kwargs["vocab_size"] = int(info.vocab_size)
            if stateful:
                kwargs.update(stateful=True, batch_size=int(batch_size))
            if not is_language_model_name(name):
                kwargs["head"] = LANGUAGE_MODEL
        else:
            if info.input_dim is not None:
                kwargs["input_dim"] = int(info.input_dim)
            else:
                kwargs["vocab_size"] = int(info.vocab_size)
            kwargs["num_outputs"] = int(info.num_outputs)
            kwargs["sequence_length"] = int(info.sequence_length)
            kwargs["head"] = info.kind
        kwargs.update(self.config.model.kwargs())
        return kwargs

    def _network(self, info: SequenceInfo, stateful: bool = False, batch_size: int | None = None):
        return models.create_model(
            self.config.model.name, **self._model_kwargs(info, stateful, batch_size)
        )

    def _twin(self, model, info: SequenceInfo, stateful: bool, batch_size: int | None = None):
        """A copy of ``model``'s weights in a model of another statefulness/batch."""
        twin = self._network(info, stateful, batch_size)
        twin.set_weights(model.get_weights())
        return twin

    def build_model(self, inputs: Inputs):
        info: SequenceInfo = inputs.info
        # a stateful model holds the state of its replica's share of the parallel streams
        per_replica = info.batch_size // max(1, self.context.num_replicas)
        model = self._network(info, info.stateful, per_replica)
        if info.kind == "regression":
            loss, metrics = "mse", [keras.metrics.MeanSquaredError(name="mse")]
        elif info.kind == "classification":
            loss = "sparse_categorical_crossentropy"
            metrics = [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]
        else:
            loss, metrics = masked_token_loss, [Perplexity()]
        model.compile(
            optimizer=build_optimizer(self.config.train, inputs.steps_per_epoch),
            loss=loss,
            metrics=metrics,
            jit_compile=self.config.runtime.jit_compile,
        )
        return model

    def callbacks(self, inputs: Inputs, run_dir: Path) -> list:
        cbs: list = [EpochTimer(inputs.data.epoch_seconds)]
        if inputs.info.stateful:
            cbs.append(ResetStates())
        if self.options.gradient_through_time and not inputs.info.stateful:
            batch = next(iter(inputs.eval.take(1)))
            cbs.append(GradientThroughTime(batch, inputs.data.gradient_profiles))
        return cbs

    # -- evaluation ----------------------------------------------------------------------
    def evaluate(self, model, inputs: Inputs) -> Evaluation:
        info: SequenceInfo = inputs.info
        kind = info.kind
        net = model
        if info.stateful and model.inputs[0].shape[0] != info.batch_size:
            # trained per replica: evaluate the whole batch of streams in one stateful copy
            net = self._twin(model, info, True, info.batch_size)
        reset_recurrent_states(net)
        total, count, correct = 0.0, 0, 0
        for x, y in inputs.eval:
            pred = np.asarray(net(x, training=False), dtype=np.float64)
            y = np.asarray(y)
            if kind == "regression":
                total += float(np.sum((pred - y.reshape(pred.shape)) ** 2))
                count += pred.size
            elif kind == "classification":
                p = np.clip(pred[np.arange(len(y)), y], 1e-7, 1.0)
                total += float(-np.sum(np.log(p)))
                correct += int(np.sum(pred.argmax(-1) == y))
                count += len(y)
            else:
                logits = pred - pred.max(axis=-1, keepdims=True)
                logp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
                picked = np.take_along_axis(logp, y[..., None].astype(np.int64), axis=-1)[..., 0]
                mask = y != 0
                total += float(-np.sum(picked * mask))
                count += int(mask.sum())
        reset_recurrent_states(net)
        mean = total / max(1, count)
        metrics = {"loss": mean}
        if kind == "regression":
            metrics["mse"] = mean
        elif kind == "classification":
            metrics["accuracy"] = correct / max(1, count)
        else:
            metrics["perplexity"] = float(math.exp(min(mean, 50.0)))
        run_metrics = {"num_params": float(model.count_params())}
        seconds = inputs.data.epoch_seconds if inputs.data is not None else []
        if seconds:
            run_metrics["seconds_per_epoch"] = float(np.mean(seconds))
        artifacts = []
        if self.options.gradient_through_time and not info.stateful:
            profiles = inputs.data.gradient_profiles
            profiles["trained"] = gradient_through_time(model, next(iter(inputs.eval.take(1))))
            for when, profile in profiles.items():
                run_metrics[f"grad_decay_{when}"] = gradient_decay(profile)
            artifacts.append(lambda out: write_gradient_profiles(out, dict(profiles)))
        return Evaluation(metrics=metrics, run_metrics=run_metrics, artifacts=artifacts)

    # -- serving -------------------------------------------------------------------------
    def serving(self, model, info: DatasetInfo, check_batch: Any = None) -> Serving:
        """A stateful (truncated-BPTT) model is served as a stateless twin with its weights."""
        served = self._twin(model, info, False) if _is_stateful(model) else model
        return Serving(served, [self._endpoint(served, info, check_batch)])

    def _endpoint(self, model, info: SequenceInfo, check_batch: Any) -> Endpoint:
        if info.kind == LANGUAGE_MODEL:

            def serve(tokens):
                logits = tf.cast(model(tokens, training=False), tf.float32)  # [B, T, V]
                last = tf.maximum(tf.reduce_sum(tf.cast(tokens != 0, tf.int32), axis=1) - 1, 0)
                final = tf.gather(logits, last, batch_dims=1)
                logp = tf.nn.log_softmax(final, axis=-1)
                return {
                    "next_token_log_probs": logp,
                    "next_token": tf.argmax(logp, axis=-1, output_type=tf.int64),
                }

            spec = tf.TensorSpec([None, None], tf.int32, name="tokens")
            example = np.asarray(check_batch)[:4] if check_batch is not None else np.ones((2, 5))
            return Endpoint("serving_default", serve, [spec], [example.astype(np.int32)])

        length = int(info.sequence_length)
        if info.input_dim is not None:
            spec = tf.TensorSpec([None, length, int(info.input_dim)], tf.float32, name="sequences")
            dtype = np.float32
        else:
            spec = tf.TensorSpec([None, length], tf.int32, name="tokens")
            dtype = np.int32
        kind = info.kind

        def serve(x):
            out = tf.cast(model(x, training=False), tf.float32)
            if kind == "classification":
                return {
                    "probabilities": out,
                    "classes": tf.argmax(out, axis=-1, output_type=tf.int64),
                }
            return {"predictions": out}

        if check_batch is not None:
            example = np.asarray(check_batch)[:8].astype(dtype)
        else:
            example = np.zeros([2, *spec.shape[1:]], dtype)
        return Endpoint("serving_default", serve, [spec], [example])


def write_gradient_profiles(out: Path, profiles: dict[str, list[float]]) -> None:
    """``gradient_through_time.json`` and ``.png``: ||dL/dx_t|| against t (log scale)."""
    import json

    from pipelines.plots import _pyplot, save_figure

    (out / "gradient_through_time.json").write_text(json.dumps(profiles, indent=2))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for when, profile in profiles.items():
        ax.plot(range(1, len(profile) + 1), np.maximum(profile, 1e-30), label=when)
    ax.set_yscale("log")
    ax.set_xlabel("time step t")
    ax.set_ylabel("||dL/dx_t||")
    ax.legend()
    ax.grid(alpha=0.3)
    save_figure(fig, out / "gradient_through_time.png", "gradient norm through time")
