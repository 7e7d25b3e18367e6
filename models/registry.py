"""The model registry: one decorator with the model's metadata, one factory, one listing.

Model files register their variants with::

    @register_model("vgg16", task="classification", family="vgg",
                    features={"stride16": FeatureMap("block5_conv3_act", 16, 512)},
                    preprocessing={"crop_fraction": 0.875, "flip": True, "pca_jitter": 0.1})
    def vgg16(**kwargs): ...

Listing the registry must stay cheap (``deeptrends models`` never imports Keras), so the
names and their metadata are read from the decorators in the package's source with
``ast``; the file that declares a model is imported only when the model is built. The
metadata is therefore written as literals (strings, numbers, dicts, lists, ``FeatureMap``
calls) or as names of module-level constants assigned such literals in the same file
(``**_FAMILY`` unpacks a dict of the keywords a family's variants share); the scan
refuses anything else, and a test checks that the scan and the decorator agree.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from models.checks import check_model_kwargs, check_positive_int

_PACKAGE_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class FeatureMap:
    """A feature map a CNN of the zoo declares (timm's ``feature_info``).

    Args:
        layer: str. The name of the layer whose output is the map (after its activation).
        stride: int. The map's reduction of the input: ``H / stride`` rows (up to the
            network's border effects), e.g. 16 for a 14x14 map of a 224x224 image.
        channels: int. The map's channels.
    """

    layer: str
    stride: int
    channels: int

    def __post_init__(self):
        if not isinstance(self.layer, str) or not self.layer:
            raise ValueError(f"`layer` must be a layer name. Received: layer={self.layer!r}")
        check_positive_int("stride", self.stride)
        check_positive_int("channels", self.channels)


@dataclass(frozen=True)
class ModelInfo:
    """What the registry knows about a model without building it.

    Attributes:
        name: str. The registry name.
        module: str. The file that declares it, ``models/<module>.py``.
        task: str. The problem type the network serves (a task of ``pipelines/tasks/``).
        family: str. The architecture family (``resnet``, ``vgg``; ``rbm``, ``gan``...).
        features: mapping of str to ``FeatureMap``. The feature maps a backbone can be cut
            at (``models.backbones.backbone``); empty for networks that are no backbone.
        preprocessing: mapping. The input preprocessing of the paper (``crop_fraction``,
            ``flip``, ``pca_jitter``) for image classifiers; empty otherwise.
    """

    name: str
    module: str
    task: str
    family: str
    features: Mapping[str, FeatureMap] = field(default_factory=lambda: MappingProxyType({}))
    preprocessing: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


_BUILDERS: dict[str, Callable[..., Any]] = {}
_INFOS: dict[str, ModelInfo] = {}
_SCANNED: dict[str, ModelInfo] | None = None
_METADATA = ("task", "family", "features", "preprocessing")


def _make_info(name, module, task, family, features, preprocessing) -> ModelInfo:
    """Validate the decorator's metadata (the same rules for the scan and the import)."""
    for arg, value in (("task", task), ("family", family)):
        if not isinstance(value, str) or not value.isidentifier():
            raise ValueError(
                f"Model {name!r}: `{arg}` must be a non-empty identifier. Received: {arg}={value!r}"
            )
    features = {} if features is None else features
    if not isinstance(features, Mapping) or not all(
        isinstance(k, str) and isinstance(v, FeatureMap) for k, v in features.items()
    ):
        raise ValueError(
            f"Model {name!r}: `features` must map names to FeatureMap. "
            f"Received: features={features!r}"
        )
    preprocessing = {} if preprocessing is None else preprocessing
    if not isinstance(preprocessing, Mapping):
        raise ValueError(
            f"Model {name!r}: `preprocessing` must be a dict. "
            f"Received: preprocessing={preprocessing!r}"
        )
    return ModelInfo(
        name=name,
        module=module,
        task=task,
        family=family,
        features=MappingProxyType(dict(features)),
        preprocessing=MappingProxyType(dict(preprocessing)),
    )


# ----------------------------------------------------------------------- the static scan


class _NotLiteral(ValueError):
    pass


def _literal(node: ast.AST, constants: dict[str, ast.AST], where: str) -> Any:
    """Evaluate a metadata expression: literals, ``FeatureMap(...)``, module constants."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_literal(node.operand, constants, where)
    if isinstance(node, (ast.List, ast.Tuple)):
        items = [_literal(e, constants, where) for e in node.elts]
        return items if isinstance(node, ast.List) else tuple(items)
    if isinstance(node, ast.Dict) and None not in node.keys:
        return {
            _literal(k, constants, where): _literal(v, constants, where)
            for k, v in zip(node.keys, node.values, strict=True)
        }
    if isinstance(node, ast.Name) and node.id in constants:  # a constant may name another
        others = {k: v for k, v in constants.items() if k != node.id}
        return _literal(constants[node.id], others, where)
    if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "FeatureMap":
        args = [_literal(a, constants, where) for a in node.args]
        kwargs = {k.arg: _literal(k.value, constants, where) for k in node.keywords}
        return FeatureMap(*args, **kwargs)
    raise _NotLiteral(
        f"{where}: register_model metadata must be literals, FeatureMap(...) or a module "
        f"constant, so that the registry can be listed without importing Keras. "
        f"Received: {ast.unparse(node)}"
    )


def _scan_file(path: Path) -> list[ModelInfo]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    constants = {
        node.targets[0].id: node.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        and len(node.targets) == 1
        and isinstance(node.targets[0], ast.Name)
    }
    infos = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            continue
        for deco in node.decorator_list:
            if not (
                isinstance(deco, ast.Call)
                and getattr(deco.func, "id", None) == "register_model"
                and deco.args
                and isinstance(deco.args[0], ast.Constant)
            ):
                continue
            name = deco.args[0].value
            where = f"models/{path.name}:{deco.lineno} ({name!r})"
            meta: dict[str, Any] = {}
            for keyword in deco.keywords:  # name=value, or **CONSTANT (a dict of them)
                value = _literal(keyword.value, constants, where)
                if keyword.arg is None and not isinstance(value, dict):
                    raise ValueError(f"{where}: ** must unpack a dict. Received: {value!r}")
                meta.update(value if keyword.arg is None else {keyword.arg: value})
            unknown = set(meta) - set(_METADATA)
            missing = {"task", "family"} - set(meta)
            if unknown or missing:
                raise ValueError(
                    f"{where}: register_model takes task=, family= (required), features= and "
                    f"preprocessing=. Missing: {sorted(missing)}; unknown: {sorted(unknown)}."
                )
            infos.append(
                _make_info(
                    name,
                    path.stem,
                    meta["task"],
                    meta["family"],
                    meta.get("features"),
                    meta.get("preprocessing"),
                )
            )
    return infos


def _scan_index(package_dir: Path = _PACKAGE_DIR) -> dict[str, ModelInfo]:
    """Every model declared in the package's source, with its metadata, without importing."""
    index: dict[str, ModelInfo] = {}
    for path in sorted(package_dir.glob("*.py")):
        for info in _scan_file(path):
            if info.name in index:
                raise ValueError(
                    f"Model name {info.name!r} is registered twice: in "
                    f"models/{index[info.name].module}.py and models/{path.stem}.py."
                )
            index[info.name] = info
    return index


def _index() -> dict[str, ModelInfo]:
    global _SCANNED
    if _SCANNED is None:
        _SCANNED = _scan_index()
    return _SCANNED


# ----------------------------------------------------------------------- registration


def register_model(
    name: str,
    *,
    task: str,
    family: str,
    features: Mapping[str, FeatureMap] | None = None,
    preprocessing: Mapping[str, Any] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a model builder under ``name`` with its metadata; returns the builder
    unchanged.

    Args:
        name: str. The registry name, e.g. ``"lenet5"``. Must be unique.
        task: str. The problem type the network serves: ``classification``,
            ``dbn_classification``, ``generation``, ``sequence``, ``translation``...
        family: str. The architecture family, e.g. ``resnet`` (the generation task picks
            its trainer by it: ``rbm``, ``vae``, ``gan``, ``draw``).
        features: dict or None. Feature-map name -> ``FeatureMap``, for backbones.
        preprocessing: dict or None. The paper's input preprocessing (image classifiers):
            ``crop_fraction``, ``flip``, ``pca_jitter``.
    """

    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        existing = _BUILDERS.get(name)
        if existing is not None and (
            existing.__module__,
            existing.__qualname__,
        ) != (fn.__module__, fn.__qualname__):
            raise ValueError(
                f"Model name {name!r} is already registered by "
                f"{existing.__module__}.{existing.__qualname__}."
            )
        module = fn.__module__.rsplit(".", 1)[-1]
        _INFOS[name] = _make_info(name, module, task, family, features, preprocessing)
        _BUILDERS[name] = fn
        return fn

    return decorator


# ----------------------------------------------------------------------- look-ups


def list_models(*, task: str | None = None, family: str | None = None) -> list[str]:
    """Registered model names, sorted; only those of ``task`` and/or ``family`` when
    given. Does not import Keras."""
    names = sorted(set(_index()) | set(_BUILDERS))
    if task is None and family is None:
        return names
    infos = [model_info(n) for n in names]
    return [
        i.name
        for i in infos
        if (task is None or i.task == task) and (family is None or i.family == family)
    ]


def model_info(name: str) -> ModelInfo:
    """The registry metadata of ``name`` (task, family, features, preprocessing). Does
    not import Keras."""
    info = _INFOS.get(name) or _index().get(name)
    if info is None:
        raise _unknown(name)
    return info


def model_module(name: str) -> str:
    """The file (``models/<module>.py``) that declares ``name``. Does not import Keras."""
    return model_info(name).module


def _unknown(name: str) -> KeyError:
    close = difflib.get_close_matches(name, list_models(), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return KeyError(f"Unknown model {name!r}.{hint} Registered models: {', '.join(list_models())}.")


def get_model_builder(name: str) -> Callable[..., Any]:
    """The builder function registered as ``name`` (imports its module on first use)."""
    if name not in _BUILDERS:
        info = _index().get(name)
        if info is None:
            raise _unknown(name)
        importlib.import_module(f"{__package__}.{info.module}")
    if name not in _BUILDERS:
        raise _unknown(name)
    return _BUILDERS[name]


def _signature_params(fn: Callable[..., Any]) -> dict[str, inspect.Parameter]:
    """The parameters ``fn`` accepts; a two-line variant ``def x(**kwargs): return base(...)``
    is resolved to the family builder it calls."""
    params = dict(inspect.signature(fn).parameters)
    only_var_kw = all(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if only_var_kw and params:
        for called in fn.__code__.co_names:
            base = fn.__globals__.get(called)
            if inspect.isfunction(base) and base is not fn:
                return _signature_params(base)
    return params


def model_arguments(name: str) -> dict[str, inspect.Parameter]:
    """The keyword arguments a registered builder accepts (its signature)."""
    return _signature_params(get_model_builder(name))


def create_model(name: str, **kwargs: Any) -> Any:
    """Build the registered model ``name`` with ``kwargs`` passed to its builder."""
    builder = get_model_builder(name)
    check_model_kwargs(name, kwargs)
    return builder(**kwargs)
