"""Errors, type conversion and the base class behind the config sections.

A :class:`Section` converts every field to its annotation on construction (see
:func:`coerce_field`) and checks the range kept in the field's metadata (``gt``, ``ge``, ``lt``); the sections
themselves are in :mod:`sparseham.config.schema`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import reprlib
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING
from typing import Any, Literal

from sparseham import method as _method

FLOAT32_MAX = 3.4028234663852886e38
_SHORT = reprlib.Repr()  # Python 3.11 takes no keyword arguments here
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = 3, 60, 60, 60
_SHORT.maxdict = _SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxset = 6

__all__ = [
    "ConfigError", "FieldError", "Section", "coerce_field", "describe", "field", "hints",
    "range_text", "show",
]

_NONE = type(None)
_NAMES = {
    int: ("an integer", "integers"), float: ("a float", "floats"),
    bool: ("true or false", "booleans"), str: ("a string", "strings"), _NONE: ("null", "nulls"),
}


class ConfigError(ValueError):
    """A problem in a config; ``str(e)`` is one line naming the source, key, value and fix."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).splitlines()))


class FieldError(ConfigError):
    """A bad field of one section; the loader prefixes the source and the section path.

    Args:
        key: the field name (dotted below the section).
        detail: the text that follows the key, e.g. ``" = -1.0: must be > 0"``.
    """

    def __init__(self, key: str, detail: str) -> None:
        self.key, self.detail = key, detail
        super().__init__(key + detail)

    @classmethod
    def bad(cls, key: str, value: Any, reason: str) -> FieldError:
        return cls(key, f" = {show(value)}: {reason}")


def show(value: Any) -> str:
    """A short one-line ``repr`` of a user value, with YAML's spelling of booleans and null."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    try:
        text = _SHORT.repr(value)  # bounded: never walks more than a few levels and items
    except ValueError:  # ints beyond Python's digit limit refuse repr
        return f"<{type(value).__name__} too long to show>"
    return text if len(text) <= 80 else text[:77] + "..."


class _Mismatch(Exception):
    """The value does not fit the annotated type."""


class _OutOfRange(_Mismatch):
    """The value has the right type but cannot be used; the message says why."""


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def describe(tp: Any, plural: bool = False) -> str:
    """English for what a type annotation accepts, e.g. ``"a float or null"``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if _is_union(tp):
        return " or ".join(describe(arg, plural) for arg in args)
    if origin is list or (origin is tuple and args[-1:] == (Ellipsis,)):
        return f"a list of {describe(args[0], True)}"
    if origin is tuple:
        return f"a list of {len(args)} {describe(args[0], True)}"
    if origin is dict:
        return f"a mapping of {describe(args[0], True)} to {describe(args[1], True)}"
    if tp in _NAMES:
        return _NAMES[tp][plural]
    return getattr(tp, "__name__", str(tp))


def _to_float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise _Mismatch
    try:
        number = float(value)
    except (ValueError, OverflowError):
        raise _Mismatch from None
    if not math.isfinite(number):
        raise _Mismatch
    if abs(number) > FLOAT32_MAX:
        raise _OutOfRange("outside float32's range (|x| <= 3.4e38), where training computes")
    return number


def _to_int(value: Any) -> int:
    if isinstance(value, bool):
        raise _Mismatch
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
    number = _to_float(value)
    if not number.is_integer():
        raise _Mismatch
    return int(number)


def _exact(value: Any, tp: type) -> Any:
    if not isinstance(value, tp):
        raise _Mismatch
    return value


def _coerce(value: Any, tp: Any) -> Any:
    """``value`` converted to the annotation ``tp``; raises ``_Mismatch`` if it does not fit."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if _is_union(tp):
        if value is None and _NONE in args:
            return None
        for arg in args:
            try:
                return _coerce(value, arg)
            except _Mismatch:
                pass
        raise _Mismatch
    if origin is Literal:
        if any(type(value) is type(choice) and value == choice for choice in args):
            return value
        raise _Mismatch
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        if origin is list:
            return [_coerce(item, args[0]) for item in value]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(item, args[0]) for item in value)
        if len(value) != len(args):
            raise _Mismatch
        return tuple(_coerce(item, arg) for item, arg in zip(value, args))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _Mismatch
        return {_coerce(k, args[0]): _coerce(v, args[1]) for k, v in value.items()}
    converters = {float: _to_float, int: _to_int, _NONE: lambda v: _exact(v, _NONE)}
    if tp in converters:
        return converters[tp](value)
    if tp in (bool, str) or (isinstance(tp, type) and dataclasses.is_dataclass(tp)):
        return _exact(value, tp)
    return value


def _choices_hint(value: Any, tp: Any) -> str:
    """A "did you mean" for a string that missed a ``Literal``."""
    literals = [a for a in (typing.get_args(tp) if _is_union(tp) else (tp,))
                if typing.get_origin(a) is Literal]
    if not isinstance(value, str) or not literals:
        return ""
    return _method.suggest(value, [str(c) for c in typing.get_args(literals[0])])


@functools.cache
def hints(cls: type) -> dict[str, Any]:
    """Resolved field annotations of a dataclass; unknown ones become ``Any``."""
    try:
        return typing.get_type_hints(cls)
    except Exception:  # a plug-in's Options may use names that do not resolve at module level
        return {}


def coerce_field(key: str, value: Any, tp: Any) -> Any:
    """Convert a field's value to its annotation ``tp``.

    Ints are accepted for floats; integral floats and numeric strings for ints (PyYAML reads
    ``1e-3`` as a string); bools are never numbers; non-finite floats are refused; lists and
    tuples are copied item by item; ``X | None`` accepts null; types not handled here pass
    unchanged.

    Raises:
        FieldError: naming ``key``, the value and what was expected (with a "did you mean"
            for a ``Literal`` typo).
    """
    try:
        return _coerce(value, tp)
    except _OutOfRange as e:
        raise FieldError.bad(key, value, str(e)) from None
    except _Mismatch:
        reason = f"expected {describe(tp)}{_choices_hint(value, tp)}"
        raise FieldError.bad(key, value, reason) from None


def range_text(meta: Mapping[str, Any]) -> str:
    """The range in a field's metadata as text: ``"> 0"``, ``"in [0, 1)"`` or ``""``."""
    low = ("(", meta["gt"]) if "gt" in meta else ("[", meta["ge"]) if "ge" in meta else None
    if low and "lt" in meta:
        return f"in {low[0]}{low[1]}, {meta['lt']})"
    if low:
        return f"{'>' if low[0] == '(' else '>='} {low[1]}"
    return f"< {meta['lt']}" if "lt" in meta else ""


def _in_range(meta: Mapping[str, Any], value: Any) -> bool:
    return not (
        ("gt" in meta and not value > meta["gt"])
        or ("ge" in meta and not value >= meta["ge"])
        or ("lt" in meta and not value < meta["lt"])
    )


def field(default: Any = MISSING, doc: str = "", *, factory: Any = MISSING, **limits: float) -> Any:
    """A dataclass field with its help text and an optional ``gt``/``ge``/``lt`` range."""
    meta = {"help": doc, **limits}
    return dataclasses.field(default=default, default_factory=factory, metadata=meta)


class Section:
    """Base of the config sections: converts and range-checks every field on construction."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = coerce_field(f.name, getattr(self, f.name), hints(type(self)).get(f.name, Any))
            if value is not None and range_text(f.metadata) and not _in_range(f.metadata, value):
                raise FieldError.bad(f.name, value, f"must be {range_text(f.metadata)}")
            setattr(self, f.name, value)
        self._check_relations()

    def _check_relations(self) -> None:
        """Checks that involve several fields or outside registries; sections override it."""


