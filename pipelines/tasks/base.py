"""The task interface: what a problem type (classification, detection, generation,
sequence modelling, translation, captioning) contributes to the shared driver.

A task builds its inputs and model (through ``models.create_model``, inside the
strategy scope), compiles it with its losses and metrics, evaluates it, writes its
artifacts, and declares the serving endpoints that the export writes. Tasks whose
training algorithm needs its own ``train_step`` return a ``keras.Model`` wrapper that
implements it; the driver does not care.
"""

from __future__ import annotations

import abc
import difflib
import importlib
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

from pipelines.config import ExperimentConfig

_TASKS: dict[str, type[Task]] = {}


def register_task(name: str):
    """Class decorator: register a ``Task`` subclass under ``name``."""

    def decorator(cls):
        if name in _TASKS and _TASKS[name] is not cls:
            raise ValueError(f"Task {name!r} is already registered by {_TASKS[name].__qualname__}.")
        cls.name = name
        _TASKS[name] = cls
        return cls

    return decorator


def _import_tasks() -> None:
    import pipelines.tasks as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name != "base":
            importlib.import_module(f"{pkg.__name__}.{mod.name}")


def get_task(name: str) -> type[Task]:
    _import_tasks()
    if name not in _TASKS:
        close = difflib.get_close_matches(name, sorted(_TASKS), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise KeyError(f"task: unknown task {name!r}.{hint} Registered tasks: {', '.join(sorted(_TASKS))}.")
    return _TASKS[name]


@dataclass
class Inputs:
    """A task's data: batched datasets and what the model and export need to know."""

    train: Any  # tf.data.Dataset, repeating; ``steps_per_epoch`` batches make an epoch
    eval: Any  # tf.data.Dataset, one pass
    steps_per_epoch: int
    info: dict[str, Any]  # JSON-serialisable; saved with the run so exports can be rebuilt
    fingerprint: str = ""


@dataclass
class Endpoint:
    """One serving signature: ``fn`` takes the tensors named by ``input_signature``."""

    name: str
    fn: Callable[..., Any]
    input_signature: list[Any]
    check_inputs: list[Any] = field(default_factory=list)  # a batch to compare saved vs in-process


class Task(abc.ABC):
    """Base class. Subclasses implement the abstract parts; the rest has defaults."""

    name: ClassVar[str] = ""
    metric_names: ClassVar[tuple[str, ...]] = ()  # what ``evaluate`` returns; the gate picks one

    # Whether ``build_inputs`` starts the train stream at ``start_epoch``/``start_step``
    # (cheap resumption). Otherwise the driver skips the batches already trained on.
    supports_start_position: ClassVar[bool] = False

    def __init__(self, config: ExperimentConfig):
        self.config = config
        # Set by the driver before ``build_inputs``: where a resumed run continues, and how
        # many replicas share each global batch (drop partial batches when more than one).
        self.start_epoch = 0
        self.start_step = 0
        self.num_replicas = 1

    # -- data and model -----------------------------------------------------------
    @abc.abstractmethod
    def build_inputs(self) -> Inputs:
        """The batched train/eval datasets and the info the model and export need."""

    @abc.abstractmethod
    def build_model(self, info: dict[str, Any]):
        """The network, through ``models.create_model`` (called in the strategy scope)."""

    @abc.abstractmethod
    def compile_model(self, model, inputs: Inputs) -> None:
        """Compile with the task's optimizer, losses and metrics."""

    def prepare_dataset(self, dataset):
        """Adapt a batched dataset to the compiled model (e.g. labels for auxiliary heads)."""
        return dataset

    def callbacks(self, run_dir: Path, inputs: Inputs) -> list:
        """Task-specific Keras callbacks (sample grids, gradient norms...)."""
        return []

    # -- evaluation and artifacts -----------------------------------------------------
    @abc.abstractmethod
    def evaluate(self, model, inputs: Inputs) -> dict[str, float]:
        """The task's metrics on the eval split (``metric_names``)."""

    def write_artifacts(self, model, history: dict[str, list[float]], inputs: Inputs, out_dir: Path) -> None:
        """Plots and tables beside the config in the run's artifact folder."""

    # -- serving ------------------------------------------------------------------
    def serving_model(self, model):
        """The network that is logged, registered and exported (a training wrapper may differ)."""
        return model

    @abc.abstractmethod
    def endpoints(self, model, info: dict[str, Any], check_batch: Any = None) -> list[Endpoint]:
        """The serving signatures; the first is ``serving_default``."""

    def check_batch(self, inputs: Inputs) -> Any:
        """A real eval batch to compare the SavedModel with the Keras model on."""
        for batch in inputs.eval.take(1):
            return batch
        return None
