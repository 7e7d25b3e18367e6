"""The task interface: what a problem type (classification, detection, generation,
sequence modelling, translation, captioning) adds to the shared driver.

A task is built with the run's ``RunContext`` and answers five hooks, in this order::

    task = TaskClass(context)             # options validated (``Options``)
    inputs = task.build_inputs()          # -> Inputs: datasets, typed info, check batch
    model = task.build_model(inputs)      # in strategy.scope(): built *and* compiled
    task.callbacks(inputs, run_dir)       # optional Keras callbacks
    evaluation = task.evaluate(model, inputs)      # -> Evaluation: metrics, tags, artifacts
    serving = task.serving(model, info, check)     # -> Serving: model to log, endpoints

State flows through the values the hooks return (``Inputs.data`` carries what a task keeps
of its data for evaluation), never through private attributes. Tasks do not import MLflow:
the driver's ``RunTracker`` logs what ``evaluate`` returns. Tasks do not import each other.

``check_config`` (``Task.check``) validates ``task_options`` against ``Options`` and the
task's own cross-field rules for every variant of a config before anything runs, and
``metric_names(config)`` says which metrics this task returns *for this config*, so a
gate metric the run will never produce is a config error, not a ``KeyError`` after
training.
"""

from __future__ import annotations

import abc
import dataclasses
import difflib
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from pipelines.config import ConfigError, ExperimentConfig

_TASKS: dict[str, type[Task]] = {}


def register_task(name: str):
    """Class decorator: register a ``Task`` subclass under ``name``; returns the class."""

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


def list_tasks() -> list[str]:
    _import_tasks()
    return sorted(_TASKS)


def get_task(name: str) -> type[Task]:
    """The task registered as ``name``. A task lives in ``pipelines/tasks/<name>.py``, so
    only that module is imported; an unknown name imports them all to list the choices."""
    if name not in _TASKS and name.isidentifier() and name != "base":
        try:
            importlib.import_module(f"pipelines.tasks.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"pipelines.tasks.{name}":
                raise
    if name not in _TASKS:
        _import_tasks()
    if name not in _TASKS:
        close = difflib.get_close_matches(name, sorted(_TASKS), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise KeyError(
            f"task: unknown task {name!r}.{hint} Registered tasks: {', '.join(sorted(_TASKS))}."
        )
    return _TASKS[name]


# ---------------------------------------------------------------------- values


@dataclass(frozen=True)
class RunContext:
    """What the driver knows when it builds the task.

    ``config`` is the effective config (learning rate already scaled for the replicas);
    ``start_epoch``/``start_step`` is where a resumed run continues: ``build_inputs``
    returns a train stream that begins there (the driver builds the inputs before it
    starts the MLflow run, so bad data fails with nothing written). ``strategy`` is the ``tf.distribute``
    strategy (for tasks that run a training phase of their own through ``loop.fit``).
    ``log_metrics(metrics, step)`` is the run tracker's sink for what callbacks measure
    during training (None where nothing is tracked: a worker, tracking off)."""

    config: ExperimentConfig
    num_replicas: int = 1
    start_epoch: int = 0
    start_step: int = 0
    chief: bool = True
    strategy: Any = None
    log_metrics: Callable[[dict[str, float], int | None], None] | None = None


@dataclass
class DatasetInfo:
    """What the model and the export need to know about the data (JSON-serialisable).

    Each task subclasses it with its own fields; ``to_dict``/``from_dict`` round-trip it
    through ``dataset_info.json``, from which ``deeptrends export`` rebuilds signatures."""

    dataset: str = ""
    num_train: int = 0
    num_eval: int = 0
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


@dataclass
class Inputs:
    """A task's data: batched datasets and what the model and export need to know."""

    train: Any  # tf.data.Dataset, repeating from the context's start; steps_per_epoch make an epoch
    eval: Any  # tf.data.Dataset, one pass
    steps_per_epoch: int
    info: DatasetInfo
    check_batch: Any = None  # a real batch to compare the SavedModel with the Keras model on
    fingerprint: str = ""
    data: Any = None  # what the task keeps of its data for evaluate (arrays, a corpus)


@dataclass
class Evaluation:
    """What ``evaluate`` returns; the driver's tracker logs it.

    ``metrics`` are logged as ``eval_<name>`` (the gate reads them by ``name``);
    ``run_metrics`` as they are (e.g. ``num_params``); ``artifacts`` are writers called
    with the run's artifact folder."""

    metrics: dict[str, float]
    run_metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    artifacts: list[Callable[[Path], Any]] = field(default_factory=list)


@dataclass
class Endpoint:
    """One serving signature: ``fn`` takes the tensors named by ``input_signature``."""

    name: str
    fn: Callable[..., Any]
    input_signature: list[Any]
    check_inputs: list[Any] = field(default_factory=list)  # a batch to compare saved vs in-process


@dataclass
class Serving:
    """The network that is logged and registered, and the signatures exported for it
    (the first endpoint is ``serving_default``).

    ``exported``: the network the endpoints run when it is not ``model`` (the bfloat16
    inference copy of ``export.precision: bfloat16``); ``model`` is then the float32
    reference the export is compared with on the eval split before it is published.
    ``metadata``: what ``assets.extra/deeptrends_export.json`` records of the export."""

    model: Any
    endpoints: list[Endpoint]
    exported: Any = None
    precision: str = "float32"
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def network(self) -> Any:
        """The network the SavedModel holds."""
        return self.model if self.exported is None else self.exported


class NoOptions(BaseModel):
    """A task without ``task_options``."""

    model_config = ConfigDict(extra="forbid")


def parse_options(model: type[BaseModel], options: dict[str, Any], task: str) -> Any:
    """``task_options`` validated by ``model``; errors name the option and what is accepted."""
    try:
        return model.model_validate(options)
    except ValidationError as err:
        lines = [f"Invalid task_options for task {task!r}:"]
        for e in err.errors():
            path = "task_options." + ".".join(str(p) for p in e["loc"])
            msg = e["msg"]
            if e["type"] == "extra_forbidden":
                msg = f"unknown option. Accepted: {', '.join(sorted(model.model_fields))}"
            lines.append(f"  {path}: {msg} (got {e.get('input')!r})")
        raise ConfigError("\n".join(lines)) from None


# ---------------------------------------------------------------------- the interface


class Task(abc.ABC):
    """Base class of the tasks. Subclasses set ``Options`` and implement the hooks."""

    name: ClassVar[str] = ""
    Options: ClassVar[type[BaseModel]] = NoOptions
    Info: ClassVar[type[DatasetInfo]] = DatasetInfo
    # the ``export.precision`` values the task's ``serving`` honours
    export_precisions: ClassVar[tuple[str, ...]] = ("float32",)

    def __init__(self, context: RunContext):
        self.context = context
        self.config = context.config
        self.options = self.parse_options(context.config)

    # -- config checks (class level: no data, no TensorFlow) ----------------------------
    @classmethod
    def parse_options(cls, config: ExperimentConfig):
        return parse_options(cls.Options, config.task_options, cls.name)

    @classmethod
    def check(cls, config: ExperimentConfig, options) -> None:
        """Cross-field rules of this task (raise ``ConfigError`` naming the field); none by
        default."""
        return None

    @classmethod
    @abc.abstractmethod
    def metric_names(cls, config: ExperimentConfig, options) -> tuple[str, ...]:
        """The metrics ``evaluate`` returns for this config (what the gate may pick)."""

    # -- data and model -----------------------------------------------------------------
    @abc.abstractmethod
    def build_inputs(self) -> Inputs:
        """The batched train/eval datasets and the info the model and export need."""

    @abc.abstractmethod
    def build_model(self, inputs: Inputs):
        """The network (through ``models.create_model``), wrapped by a trainer where the
        algorithm needs its own ``train_step``, and compiled. Called in the strategy scope."""

    def callbacks(self, inputs: Inputs, run_dir: Path) -> list:
        """Task-specific Keras callbacks (sample grids, gradient norms...)."""
        return []

    # -- evaluation and serving ---------------------------------------------------------
    @abc.abstractmethod
    def evaluate(self, model, inputs: Inputs) -> Evaluation:
        """The task's metrics on the eval split, its tags and its artifact writers."""

    @abc.abstractmethod
    def serving(self, model, info: DatasetInfo, check_batch: Any = None) -> Serving:
        """The model to log and the serving signatures to export."""


def first_batch(dataset) -> Any:
    """The first batch of a dataset (None when it is empty): the usual check batch."""
    for batch in dataset.take(1):
        return batch
    return None
