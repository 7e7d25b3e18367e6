"""Optimizers and learning-rate schedules from ``config.train``."""

from __future__ import annotations

import math

import keras

from pipelines.config import TrainConfig


@keras.saving.register_keras_serializable(package="deeptrends")
class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from 0 for ``warmup_steps``, then ``after`` (a schedule or a float).
    Used only for step/exponential decay with warm-up; constant and cosine schedules use
    Keras' own ``CosineDecay`` (which has warm-up built in), so most saved models need
    nothing of ours to reload."""

    def __init__(self, peak: float, warmup_steps: int, after):
        self.peak = peak
        self.warmup_steps = warmup_steps
        self.after = after

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        after = self.after(step - self.warmup_steps) if callable(self.after) else self.after
        if self.warmup_steps <= 0:
            return after
        warm = self.peak * (step + 1.0) / float(self.warmup_steps)
        return keras.ops.where(step < self.warmup_steps, warm, after)

    def get_config(self):
        after = self.after
        if isinstance(after, keras.optimizers.schedules.LearningRateSchedule):
            after = keras.optimizers.schedules.serialize(after)
        return {"peak": self.peak, "warmup_steps": self.warmup_steps, "after": after}

    @classmethod
    def from_config(cls, config):
        after = config["after"]
        if isinstance(after, dict):
            after = keras.optimizers.schedules.deserialize(after)
        return cls(config["peak"], config["warmup_steps"], after)


def learning_rate(train: TrainConfig, steps_per_epoch: int, scale: float = 1.0):
    """The learning rate (a float or a schedule) for ``train`` at ``steps_per_epoch``."""
    lr = train.learning_rate * scale
    sched = train.schedule
    warmup = int(round(sched.warmup_epochs * steps_per_epoch))
    total = max(1, train.epochs * steps_per_epoch - warmup)
    if sched.name == "constant" and not warmup:
        return lr
    if sched.name in ("constant", "cosine"):
        # Keras' CosineDecay: linear warm-up 0 -> lr, then cosine to alpha * lr
        # (alpha = 1 keeps the rate constant after the warm-up).
        return keras.optimizers.schedules.CosineDecay(
            0.0 if warmup else lr,
            decay_steps=total,
            alpha=1.0 if sched.name == "constant" else sched.alpha,
            warmup_target=lr if warmup else None,
            warmup_steps=warmup,
        )
    decay_steps = max(
        1, int(round((sched.decay_epochs or max(1, train.epochs // 3)) * steps_per_epoch))
    )
    after = keras.optimizers.schedules.ExponentialDecay(
        lr, decay_steps=decay_steps, decay_rate=sched.decay_rate, staircase=sched.name == "step"
    )
    return WarmupSchedule(lr, warmup, after) if warmup else after


def build_optimizer(
    train: TrainConfig, steps_per_epoch: int, scale: float = 1.0
) -> keras.optimizers.Optimizer:
    """A Keras optimizer with the schedule, weight decay and gradient clipping of ``train``."""
    lr = learning_rate(train, steps_per_epoch, scale)
    opt = train.optimizer
    common = {
        "learning_rate": lr,
        "clipnorm": train.clipnorm,
        "global_clipnorm": train.global_clipnorm,
    }
    if train.weight_decay:
        common["weight_decay"] = train.weight_decay
    if opt.name == "sgd":
        return keras.optimizers.SGD(momentum=opt.momentum, nesterov=opt.nesterov, **common)
    if opt.name == "rmsprop":
        return keras.optimizers.RMSprop(momentum=0.0, **common)
    cls = {
        "adam": keras.optimizers.Adam,
        "adamw": keras.optimizers.AdamW,
        "nadam": keras.optimizers.Nadam,
    }[opt.name]
    return cls(beta_1=opt.beta_1, beta_2=opt.beta_2, **common)


def epochs_to_steps(epochs: float, steps_per_epoch: int) -> int:
    return int(math.ceil(epochs * steps_per_epoch))
