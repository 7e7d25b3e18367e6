"""Experiment configuration: YAML -> typed, validated ``ExperimentConfig`` (pydantic v2).

A config names a task, a model (``{name, ...kwargs}`` passed straight to
``models.create_model``), a dataset and the train/runtime/tracking/export settings.
Shipped experiments live as YAML in ``pipelines/configs/<task>/``; ``load_config`` takes a
registered name or a path, applies ``--set a.b=c`` overrides and validates the result.
Every error names the field path, the bad value and what is accepted.

This module imports neither TensorFlow nor MLflow.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

# Names that become folders (runs/<name>/, serving/<registered model>/), MLflow names and
# TF Serving model names: letters, digits, '_', '.', '-'; no leading dot, no quote or slash.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
INT32_MAX = 2**31 - 1

Name = Annotated[str, Field(pattern=NAME_PATTERN)]
Count = Annotated[int, Field(gt=0, le=INT32_MAX)]  # a positive count that fits an int32
NonNegative = Annotated[int, Field(ge=0, le=INT32_MAX)]


class ConfigError(ValueError):
    """A config that cannot run; the message names the field and the fix."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(BaseModel):
    """``name`` plus the builder's own keyword arguments (checked against its signature)."""

    model_config = ConfigDict(extra="allow")
    name: str

    def kwargs(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class AugmentConfig(_Section):
    """Training-time augmentation, applied per batch."""

    pad_crop: int = Field(
        0, ge=0, le=4096, description="pixels of padding before a random crop back to size"
    )
    flip: bool | None = Field(
        None, description="random horizontal flip; None: the model's registry preprocessing"
    )
    rotation: float = Field(0.0, ge=0.0, le=180.0, description="max rotation in degrees")
    zoom: float = Field(0.0, ge=0.0, lt=1.0, description="max relative zoom in/out")
    pca_jitter: float | None = Field(
        None, ge=0.0, description="AlexNet's PCA colour jitter std (paper: 0.1); None: the family's"
    )


class DataConfig(BaseModel):
    """Which dataset and how it is fed. Dataset-specific options (``path``,
    ``direction``...) are extra keys, checked against the dataset's declared options."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)
    name: str = "digits"
    dir: str | None = Field(
        None, description="TFDS data_dir; default $DEEPTRENDS_DATA_DIR-aware cache"
    )
    image_size: int | None = Field(
        None, gt=0, le=8192, description="resize images to this square size"
    )
    channels: Literal[1, 3] | None = None
    cache: bool = True
    shuffle_buffer: Count = 10_000
    deterministic: bool = True
    drop_remainder: bool = Field(
        True,
        description="drop the last partial train batch of each pass; one default for any replica "
        "count, so that 1 and N replicas train on the same batches",
    )
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    preprocessing: Literal["model", "none"] = Field(
        "model",
        description="model: unset crop_fraction/flip/pca_jitter come from the model's registry preprocessing",
    )
    crop_fraction: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="resize to image_size/crop_fraction, crop (eval: centre, train: random)",
    )

    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class OptimizerConfig(_Section):
    name: Literal["adam", "adamw", "sgd", "rmsprop", "nadam"] = "adam"
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    nesterov: bool = False
    beta_1: float = Field(0.9, ge=0.0, lt=1.0)
    beta_2: float = Field(0.999, ge=0.0, lt=1.0)


class ScheduleConfig(_Section):
    name: Literal["constant", "cosine", "step", "exponential"] = "constant"
    warmup_epochs: float = Field(0.0, ge=0.0)
    decay_epochs: float | None = Field(
        None, gt=0.0, description="step/exponential: epochs per decay"
    )
    decay_rate: float = Field(0.1, gt=0.0, le=1.0)
    alpha: float = Field(0.0, ge=0.0, le=1.0, description="cosine: final lr as a fraction")


class TrainConfig(_Section):
    epochs: int = Field(10, gt=0, le=1_000_000)
    batch_size: int = Field(32, gt=0, le=1_048_576, description="the global batch")
    steps_per_epoch: Count | None = Field(None, description="cap steps per epoch (tiny budgets)")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    learning_rate: float = Field(1e-3, gt=0.0)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    weight_decay: float = Field(0.0, ge=0.0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    clipnorm: float | None = Field(None, gt=0.0)
    global_clipnorm: float | None = Field(None, gt=0.0)
    bptt_steps: Count | None = Field(
        None, description="language models: truncated BPTT over stateful chunks of this many steps"
    )
    validation_freq: Count = 1
    checkpoint_every_steps: Count | None = Field(None, description="also checkpoint every N steps")
    steps_per_execution: int = Field(
        1, ge=1, le=10_000, description="training steps per tf.function call (callbacks per call)"
    )
    scale_learning_rate: bool = Field(False, description="linear scaling: lr x replicas")
    early_stopping_patience: Count | None = Field(
        None, description="stop after N epochs without a better select_best (default val_loss)"
    )
    select_best: str | None = Field(
        None,
        pattern=r"^val_[A-Za-z0-9_]+$",
        description="model selection: the weights of the epoch with the best value of this "
        "validation log (val_loss, val_bleu...) are evaluated, exported and registered; "
        "checkpointed, so a resumed run selects the same epoch",
    )
    tensorboard: bool = False
    verbose: Literal[0, 1, 2] = 1

    @field_validator("optimizer", mode="before")
    @classmethod
    def _optimizer_shorthand(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @field_validator("schedule", mode="before")
    @classmethod
    def _schedule_shorthand(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value


class ClusterConfig(_Section):
    """A multi-worker cluster spelled out in the config (else ``TF_CONFIG`` is used)."""

    workers: list[str] = Field(min_length=1, description="host:port of every worker, chief first")
    index: NonNegative = Field(0, description="this process's index in workers")


class RuntimeConfig(_Section):
    seed: NonNegative = Field(42, description="0 .. 2**31-1")
    strategy: Literal["auto", "default", "one_device", "mirrored", "multi_worker", "tpu"] = (
        "default"
    )
    devices: list[str] | None = Field(None, description="device list for one_device/mirrored")
    virtual_cpus: int | None = Field(
        None, ge=1, le=256, description="split the CPU into N logical devices"
    )
    cluster: ClusterConfig | None = None
    collective: Literal["auto", "ring", "nccl"] = "auto"
    # float32 by default: on an AVX512-BF16 CPU bfloat16 made the default network slower
    # (LeNet-5 0.90x) and moves every shipped config's numerics; `auto` is opt-in
    mixed_precision: Literal["auto", "float32", "mixed_float16", "mixed_bfloat16"] = Field(
        "float32", description="auto: mixed_bfloat16 where the CPU has AMX-BF16 or AVX512-BF16"
    )
    jit_compile: bool = False
    deterministic_ops: bool = False
    work_dir: str = Field("runs", description="run directories: <work_dir>/<name>/<run_id>/")
    resume: bool = Field(True, description="resume an interrupted run of the same config")


class GateConfig(_Section):
    metric: str = "accuracy"
    mode: Literal["max", "min"] = "max"
    min_delta: float = Field(0.0, ge=0.0)


class TrackingConfig(_Section):
    enabled: bool = True
    uri: str | None = Field(
        None, description="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db"
    )
    experiment: Name | None = Field(None, description="default: the config name")
    run_name: str | None = Field(None, max_length=250)
    registered_model: Name | None = Field(None, description="default: the config name")
    log_model: bool = Field(True, description="log and register the model (and gate it)")
    gate: GateConfig = Field(default_factory=GateConfig)
    tags: dict[str, str] = Field(default_factory=dict)


class ExportConfig(_Section):
    enabled: bool = True
    serving_dir: str = "serving"
    warmup_requests: int = Field(4, ge=0, le=1000)
    atol: float = Field(1e-5, gt=0.0, description="max |saved - keras| on the check batch")
    max_image_pixels: int = Field(
        50_000_000,
        gt=0,
        le=INT32_MAX,
        description="image_bytes signatures refuse images whose header promises more pixels",
    )
    precision: Literal["float32", "bfloat16"] = Field(
        "float32",
        description="bfloat16: the serving graph computes in bfloat16 (BatchNorm folded into "
        "its convolution) behind the same float32 inputs and outputs; classification only",
    )
    min_top1_agreement: float = Field(
        0.995,
        ge=0.0,
        le=1.0,
        description="a bfloat16 export is published only if its top-1 class equals the "
        "float32 model's on at least this fraction of the eval split",
    )


class ExperimentConfig(_Section):
    name: Name
    task: str = Field("classification", description="a registered task (pipelines/tasks/)")
    description: str = ""
    model: ModelConfig
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    task_options: dict[str, Any] = Field(
        default_factory=dict,
        description="task-specific settings (e.g. generation: cd_k, binarize); each task validates its own",
    )

    @property
    def experiment_name(self) -> str:
        return self.tracking.experiment or self.name

    @property
    def registered_model_name(self) -> str:
        return self.tracking.registered_model or self.name

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------- loading


def shipped_config_paths() -> dict[str, Path]:
    """The shipped experiments by name (``pipelines/configs/<task>/<name>.yaml``)."""
    return {p.stem: p for p in sorted(CONFIG_DIR.glob("*/*.yaml")) if p.parent.name != "schedules"}


def list_configs() -> list[str]:
    """Names of the shipped experiments."""
    return sorted(shipped_config_paths())


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"Invalid config {source}:"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        value = e.get("input")
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            parent = e["loc"][:-1]
            accepted = _accepted_keys(parent)
            msg = f"unknown key. Accepted keys here: {', '.join(accepted)}"
        elif e["type"] == "literal_error":
            msg = msg.replace("Input should be", "accepted values are")
        lines.append(f"  {path}: {msg} (got {short_repr(value)})")
    return "\n".join(lines)


def short_repr(value: Any, limit: int = 200) -> str:
    """``repr(value)`` cut to ``limit`` characters: errors never echo a huge input."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _accepted_keys(loc: tuple) -> list[str]:
    model: type[BaseModel] = ExperimentConfig
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not (
            isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
        ):
            return []
        model = field.annotation
    return sorted(model.model_fields)


def _parse_value(text: str) -> Any:
    """``--set`` values are YAML scalars/lists: 3, 0.1, true, null, [1, 2], relu."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set value {short_repr(text)} is not valid YAML: {exc}") from None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=c`` overrides to a raw config dict (validation happens afterwards)."""
    for item in overrides:
        key, sep, value = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(part.strip() for part in parts):
            raise ConfigError(f"--set {short_repr(item)}: expected KEY=VALUE, e.g. train.epochs=5")
        node = raw
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(parts[: i + 1])
                raise ConfigError(f"--set {short_repr(item)}: {where} is a value, not a section")
            node = child
        node[parts[-1]] = _parse_value(value)
    return raw


def resolve_config_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.is_dir():
        raise ConfigError(
            f"Config {str(path)!r} is a directory; expected a YAML file or a config name."
        )
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"Config file {str(path)!r} does not exist.")
        return path
    shipped = shipped_config_paths().get(name_or_path)
    if shipped is not None:
        return shipped
    close = difflib.get_close_matches(name_or_path, list_configs(), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ConfigError(
        f"Unknown config {short_repr(name_or_path)}: not a registered experiment nor a YAML file.{hint} "
        f"Registered: {', '.join(list_configs())}."
    )


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {exc.start}); save the config as UTF-8"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path}: a config must be a mapping of sections, got {type(raw).__name__}"
        )
    return raw


def validate_config(raw: dict[str, Any], source: str = "<dict>") -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def load_config(name_or_path: str, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load a registered experiment or YAML file, apply overrides, validate."""
    path = resolve_config_path(name_or_path)
    raw = read_yaml(path)
    raw.pop("variants", None)  # the base of a several-run experiment (pipelines/variants.py)
    raw.pop("claim", None)  # the claim's seeds and verdict rule (pipelines/reports/claims.py)
    raw = apply_overrides(raw, list(overrides or []))
    return validate_config(
        raw, source=str(path) if path.parent.parent != CONFIG_DIR else repr(path.stem)
    )
