"""Training algorithms with their own ``train_step``, one module per algorithm:
``rbm`` (CD-k, persistent CD, greedy DBN), ``elbo`` (VAE, DRAW), ``gan`` (GAN, DCGAN);
``base`` holds what the generative ones share and the interface the generation task
calls; ``aux_heads`` trains classifiers with auxiliary heads.

``trainer_class(model_name)`` chooses a generative model's trainer, once, from the model
registry's metadata (``models.model_info(name).family``). Importing this package imports
no TensorFlow; a trainer's module is imported when it is asked for.
"""

from __future__ import annotations

import importlib

from pipelines.config import ConfigError

# the trainer of each generative family: "module:class"
TRAINERS: dict[str, str] = {
    "rbm": "pipelines.trainers.rbm:RBMTrainer",
    "vae": "pipelines.trainers.elbo:VAETrainer",
    "gan": "pipelines.trainers.gan:GANTrainer",
    "draw": "pipelines.trainers.elbo:DRAWTrainer",
}
GENERATION = "generation"  # the task of the models trained by these trainers


def generative_models() -> list[str]:
    """The registered models of the generation task (no Keras imported)."""
    import models

    return [n for n in models.list_models() if models.model_info(n).task == GENERATION]


def trainer_class(model_name: str, field: str = "model.name"):
    """The trainer class of a registered generative model; a ``ConfigError`` naming
    ``field`` for any other model."""
    import models

    try:
        info = models.model_info(model_name)
    except KeyError as exc:
        raise ConfigError(f"{field}: {exc.args[0]}") from None
    path = TRAINERS.get(info.family) if info.task == GENERATION else None
    if path is None:
        raise ConfigError(
            f"{field}: {model_name!r} is a {info.task} model, not a generative one; the "
            f"generation task trains {', '.join(generative_models())}."
        )
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)
