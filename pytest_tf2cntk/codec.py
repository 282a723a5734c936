"""Typed results <-> JSON, one rule for every result class (after Polygraphy's ``struct``).

``to_json(obj)`` turns a dataclass (nested dataclasses, enums, tuples, paths, numpy scalars,
non-finite floats) into plain JSON values; ``from_json(cls, data)`` rebuilds it from the type
hints, so ``from_json(type(x), to_json(x)) == x`` for every result class (tested). Readers of a
report, the history, a reproducer or an xdist payload thus get typed objects, not string keys.

- Non-finite floats travel as the strings "inf", "-inf", "nan" (JSON has no literal for them).
- A class may list read-only properties (or methods without arguments) in ``JSON_EXTRA``: they
  are written for other readers of the JSON (e.g. an output's ``passed``) and ignored when read back.
- A field with ``metadata={"json": False}`` is not written (run-time handles, caches).
"""
from __future__ import annotations

import dataclasses
import enum
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
_NONFINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan, "Infinity": math.inf,
              "-Infinity": -math.inf, "NaN": math.nan}


def to_json(obj: Any) -> Any:
    """Plain JSON values (dict, list, str, int, float, bool, None) for ``obj``."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {f.name: to_json(getattr(obj, f.name)) for f in dataclasses.fields(obj)
               if f.metadata.get("json", True)}
        for name in getattr(obj, "JSON_EXTRA", ()):
            value = getattr(obj, name)
            out[name] = to_json(value() if callable(value) else value)
        return out
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, int) and not isinstance(obj, bool):
        return int(obj)
    if isinstance(obj, float) or _is_numpy_scalar(obj):
        return _float_json(obj)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, dict):
        return {str(to_json(k)) if not isinstance(k, str) else k: to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_json(v) for v in obj]
    raise TypeError(f"cannot encode {type(obj).__name__} as JSON")


def _is_numpy_scalar(obj: Any) -> bool:
    return type(obj).__module__ == "numpy" and hasattr(obj, "item")


def _float_json(value: Any) -> Any:
    if _is_numpy_scalar(value):
        value = value.item()
        if not isinstance(value, float):
            return value
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return float(value)


def from_json(cls: type[T], data: Any) -> T:
    """Rebuild a ``cls`` (a dataclass, or any type a field may have) from ``to_json`` output."""
    return _decode(cls, data)


def _hints(cls: type) -> dict[str, Any]:
    cached = _HINTS.get(cls)
    if cached is None:
        cached = typing.get_type_hints(cls)
        _HINTS[cls] = cached
    return cached


_HINTS: dict[type, dict[str, Any]] = {}


def _decode(tp: Any, data: Any) -> Any:
    if tp is Any or tp is object:
        return data
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _decode_union(typing.get_args(tp), data)
    if data is None:
        return None
    if origin is not None:
        return _decode_generic(origin, typing.get_args(tp), data)
    if dataclasses.is_dataclass(tp):
        return _decode_dataclass(tp, data)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return tp(data)
    if tp is float:
        return _NONFINITE[data] if isinstance(data, str) else float(data)
    if tp is Path:
        return Path(data)
    if tp in (tuple, list, set, frozenset):
        return tp(data)
    if tp in (int, str, bool):
        return tp(data)
    return data


def _decode_union(args: tuple, data: Any) -> Any:
    if data is None and type(None) in args:
        return None
    options = [a for a in args if a is not type(None)]
    if len(options) == 1:
        return _decode(options[0], data)
    for option in options:  # the first member whose shape fits the data
        if option is float and isinstance(data, (int, float, str)) and (not isinstance(data, str)
                                                                          or data in _NONFINITE):
            return _decode(float, data)
        if option is str and isinstance(data, str):
            return data
        if option in (int, bool) and isinstance(data, option):
            return data
        if dataclasses.is_dataclass(option) and isinstance(data, dict):
            return _decode(option, data)
    return data


def _decode_generic(origin: Any, args: tuple, data: Any) -> Any:
    if origin in (list, set, frozenset):
        item = args[0] if args else Any
        return origin(_decode(item, v) for v in data)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_decode(args[0], v) for v in data)
        if args:
            return tuple(_decode(a, v) for a, v in zip(args, data))
        return tuple(data)
    if origin is dict:
        key, value = args if args else (Any, Any)
        return {_decode(key, k): _decode(value, v) for k, v in data.items()}
    if origin is typing.Literal:
        return data
    return data


def _decode_dataclass(cls: type, data: dict[str, Any]) -> Any:
    hints = _hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if not f.init or not f.metadata.get("json", True) or f.name not in data:
            continue
        kwargs[f.name] = _decode(hints[f.name], data[f.name])
    return cls(**kwargs)


class Jsonable:
    """Mixin for result dataclasses: ``x.to_json()`` and ``Cls.from_json(data)`` by the rule above."""

    def to_json(self) -> Any:
        return to_json(self)

    @classmethod
    def from_json(cls: type[T], data: Any) -> T:
        return from_json(cls, data)
