"""The model registry: one decorator, one factory, one listing.

Model files register their variants with ``@register_model("name")``. Listing the
registry must stay cheap (``deeptrends models`` never imports Keras), so names are
discovered by reading the decorators in the package's source with ``ast``; the file
that declares a name is imported only when that model is built.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import inspect
from pathlib import Path
from typing import Any, Callable

_PACKAGE_DIR = Path(__file__).resolve().parent
_BUILDERS: dict[str, Callable[..., Any]] = {}
_INDEX: dict[str, str] | None = None


def _scan_index() -> dict[str, str]:
    """Map every registered name to the module that declares it, without importing."""
    index: dict[str, str] = {}
    for path in sorted(_PACKAGE_DIR.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                continue
            for deco in node.decorator_list:
                if (
                    isinstance(deco, ast.Call)
                    and getattr(deco.func, "id", None) == "register_model"
                    and deco.args
                    and isinstance(deco.args[0], ast.Constant)
                ):
                    name = deco.args[0].value
                    if name in index:
                        raise ValueError(
                            f"Model name {name!r} is registered twice: in models/{index[name]}.py "
                            f"and models/{path.stem}.py."
                        )
                    index[name] = path.stem
    return index


def _index() -> dict[str, str]:
    global _INDEX
    if _INDEX is None:
        _INDEX = _scan_index()
    return _INDEX


def register_model(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a model builder under ``name``; returns the builder unchanged.

    Args:
        name: str. The registry name, e.g. ``"lenet5"``. Must be unique.
    """

    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        existing = _BUILDERS.get(name)
        if existing is not None and existing.__qualname__ != fn.__qualname__:
            raise ValueError(
                f"Model name {name!r} is already registered by "
                f"{existing.__module__}.{existing.__qualname__}."
            )
        _BUILDERS[name] = fn
        return fn

    return decorator


def list_models() -> list[str]:
    """All registered model names, sorted. Does not import Keras."""
    return sorted(set(_index()) | set(_BUILDERS))


def model_module(name: str) -> str:
    """The file (``models/<module>.py``) that declares ``name``. Does not import Keras."""
    module = _index().get(name)
    if module is None:
        if name in _BUILDERS:
            return _BUILDERS[name].__module__.rsplit(".", 1)[-1]
        raise _unknown(name)
    return module


def _unknown(name: str) -> KeyError:
    close = difflib.get_close_matches(name, list_models(), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return KeyError(
        f"Unknown model {name!r}.{hint} Registered models: {', '.join(list_models())}."
    )


def get_model_builder(name: str) -> Callable[..., Any]:
    """The builder function registered as ``name`` (imports its module on first use)."""
    if name not in _BUILDERS:
        module = _index().get(name)
        if module is None:
            raise _unknown(name)
        importlib.import_module(f"{__package__}.{module}")
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


def check_model_kwargs(name: str, kwargs: dict[str, Any]) -> None:
    """Raise ``TypeError`` naming each argument the builder does not accept."""
    params = model_arguments(name)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        accepted = ", ".join(sorted(params))
        raise TypeError(
            f"model.{unknown[0]}: {name!r} does not take argument(s) {unknown}. "
            f"Accepted: {accepted}."
        )


def create_model(name: str, **kwargs: Any) -> Any:
    """Build the registered model ``name`` with ``kwargs`` passed to its builder."""
    builder = get_model_builder(name)
    check_model_kwargs(name, kwargs)
    return builder(**kwargs)
