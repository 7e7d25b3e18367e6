"""The argument checks every builder shares, in one place.

Each check raises ``ValueError`` naming the argument, what is accepted and what was
received (``"`units` must be a positive int. Received: units=0"``), as keras-hub's
builders do, and returns the value in its canonical form (a tuple for a shape or a list
of widths). ``check_model_kwargs`` is the check of the registry's entry point: it names
an argument the builder does not take. Pure Python: importing this module does not
import Keras.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fail(name: str, requirement: str, value: Any) -> ValueError:
    return ValueError(f"`{name}` must be {requirement}. Received: {name}={value!r}")


def check_positive_int(name: str, value: Any) -> int:
    """Raise unless ``value`` is an int >= 1 (a bool is not an int here)."""
    if not _is_int(value) or value < 1:
        raise _fail(name, "a positive int", value)
    return value


def check_optional_positive_int(name: str, value: Any) -> int | None:
    """Raise unless ``value`` is None or an int >= 1."""
    if value is None:
        return None
    if not _is_int(value) or value < 1:
        raise _fail(name, "a positive int or None", value)
    return value


def check_non_negative_int(name: str, value: Any) -> int:
    """Raise unless ``value`` is an int >= 0."""
    if not _is_int(value) or value < 0:
        raise _fail(name, "an int >= 0", value)
    return value


def check_positive_ints(name: str, values: Any) -> tuple[int, ...]:
    """Raise unless ``values`` is a non-empty list or tuple of ints >= 1; return a tuple."""
    items = tuple(values) if isinstance(values, (list, tuple)) else None
    if not items or not all(_is_int(v) and v >= 1 for v in items):
        raise _fail(name, "a non-empty list of positive ints", values)
    return items


def check_positive_number(name: str, value: Any) -> float:
    """Raise unless ``value`` is a number > 0."""
    if not _is_number(value) or not value > 0:
        raise _fail(name, "a positive number", value)
    return value


def check_non_negative_number(name: str, value: Any) -> float:
    """Raise unless ``value`` is a number >= 0."""
    if not _is_number(value) or value < 0:
        raise _fail(name, "a number >= 0", value)
    return value


def check_rate(name: str, value: Any) -> float:
    """Raise unless ``value`` is a number in [0, 1) (a dropout rate, a momentum)."""
    if not _is_number(value) or not 0.0 <= value < 1.0:
        raise _fail(name, "a float in [0, 1)", value)
    return value


def check_dropout(dropout: Any, name: str = "dropout") -> float:
    """Raise unless ``dropout`` is a rate in [0, 1)."""
    return check_rate(name, dropout)


def check_bool(name: str, value: Any) -> bool:
    """Raise unless ``value`` is a bool."""
    if not isinstance(value, bool):
        raise _fail(name, "a bool", value)
    return value


def check_choice(name: str, value: Any, accepted: Iterable[Any]) -> Any:
    """Raise unless ``value`` is one of ``accepted``."""
    accepted = tuple(accepted)
    if value not in accepted:
        raise _fail(name, f"one of {list(accepted)}", value)
    return value


def check_num_classes(num_classes: Any, include_top: bool = True) -> Any:
    """Raise unless ``num_classes`` is a positive int (checked only with a top)."""
    if include_top and (not _is_int(num_classes) or num_classes < 1):
        raise _fail("num_classes", "a positive int when include_top=True", num_classes)
    return num_classes


def check_shape(name: str, shape: Any, rank: int | None = None) -> tuple[int, ...]:
    """Raise unless ``shape`` is a non-empty tuple of positive ints (of ``rank`` entries
    when given); return it as a tuple."""
    dims = tuple(shape) if isinstance(shape, (list, tuple)) else None
    ok = bool(dims) and all(_is_int(d) and d >= 1 for d in dims)
    if not ok or (rank is not None and len(dims) != rank):
        what = f"a tuple of {rank} positive ints" if rank else "a tuple of positive ints"
        raise _fail(name, what, shape)
    return dims


def check_image_shape(
    input_shape: Any,
    min_size: int = 1,
    allow_none: bool = False,
    divisor: int = 1,
    name: str = "input_shape",
) -> tuple:
    """Validate an ``(H, W, C)`` channels-last image shape and return it as a tuple.

    Args:
        input_shape: tuple. The image shape.
        min_size: int. The smallest height and width accepted.
        allow_none: bool. Whether H and W may be None (fully convolutional models).
        divisor: int. H and W must be multiples of it (networks that halve the map
            ``log2(divisor)`` times and double it back).
        name: str. The argument's name in the error.
    """
    shape = tuple(input_shape) if isinstance(input_shape, (list, tuple)) else None
    ok = shape is not None and len(shape) == 3 and _is_int(shape[2]) and shape[2] > 0
    if ok:
        for size in shape[:2]:
            if size is None:
                ok = ok and allow_none
            else:
                ok = ok and _is_int(size) and size >= min_size and size % divisor == 0
    if not ok:
        spatial = f"H, W >= {min_size}" if min_size > 1 else "positive H, W"
        if divisor > 1:
            spatial += f" divisible by {divisor}"
        if allow_none:
            spatial += " (or None)"
        raise _fail(name, f"(H, W, C) with {spatial} and C >= 1", input_shape)
    return shape


def check_kwargs(owner: str, params: dict[str, inspect.Parameter], kwargs: dict) -> None:
    """Raise ``TypeError`` naming the first of ``kwargs`` that ``params`` does not accept
    (a signature with ``**kwargs`` accepts everything)."""
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        accepted = ", ".join(sorted(params))
        raise TypeError(
            f"model.{unknown[0]}: {owner!r} does not take argument(s) {unknown}. "
            f"Accepted: {accepted}."
        )


def check_model_kwargs(name: str, kwargs: dict) -> None:
    """Raise ``TypeError`` naming each argument the registered builder ``name`` does not
    accept (imports the model's file, not Keras' training machinery)."""
    from models.registry import model_arguments

    check_kwargs(name, model_arguments(name), kwargs)
