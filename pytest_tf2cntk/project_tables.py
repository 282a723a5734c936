"""The tables of [tool.tf2cntk] that are not options: budgets (per op type, per output, per model)
and input ranges, parsed and checked once for pyproject.toml, the ini and a test's marker alike."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping

from pytest_tf2cntk.errors import ConfigError


def parse_input_ranges(table: Mapping[str, Any] | None, source: str) -> dict[str, tuple[float, float]]:
    """``{name: [low, high]}`` with finite low < high; ConfigError names the entry."""
    if table is not None and not isinstance(table, Mapping):
        raise ConfigError(f"{source} = {table!r}: expected a table of input = [low, high], e.g. x = [0.0, 1.0]")
    out = {}
    for name, value in (table or {}).items():
        try:
            if isinstance(value, (str, bytes)) or any(isinstance(v, bool) for v in value):
                raise TypeError
            low, high = (float(v) for v in value)
        except (TypeError, ValueError):
            raise ConfigError(f"{source} {name} = {value!r}: an input range is two numbers [low, high], "
                              f"e.g. {name} = [0.0, 1.0]") from None
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ConfigError(f"{source} {name} = {value!r}: an input range needs finite low < high; "
                              f"give [{min(low, high):g}, {max(low, high):g}] if that was meant")
        out[str(name)] = (low, high)
    return out


def parse_budget_table(table: Mapping[str, Any] | None, source: str = "[tool.tf2cntk.budgets]") -> dict[str, Any]:
    """``[tool.tf2cntk.budgets]`` (or a marker's ``budgets=``, named by ``source``): numbers >= 0
    per op type (and headroom, scale, noise_factor, floor_ulps, run_factor), a sub-table
    ``outputs`` of numbers >= 0 per output,
    and ``models``: per model path (relative to the rootdir), a budget table of its own that
    applies to that model only (``budgets_for``)."""
    if table is not None and not isinstance(table, Mapping):
        raise ConfigError(f"{source} = {table!r}: expected a table of op type = ulps, e.g. Gemm = 4")
    out: dict[str, Any] = {}
    for key, value in (table or {}).items():
        if key == "models" and source == "[tool.tf2cntk.budgets]":
            if not isinstance(value, Mapping) or not all(isinstance(v, Mapping) for v in value.values()):
                raise ConfigError('[tool.tf2cntk.budgets.models] must hold one table per model path, e.g. '
                                 '[tool.tf2cntk.budgets.models."models/net.keras".outputs]')
            out[key] = {model_key(k): parse_budget_table(v, f'[tool.tf2cntk.budgets.models."{k}"]')
                        for k, v in value.items()}
        elif key == "outputs":
            if not isinstance(value, Mapping):
                raise ConfigError(f"{_sub(source, 'outputs')} must be a table of output = budget, "
                                  "e.g. probs = 1e-5")
            out[key] = {str(k): _positive(f"{_sub(source, 'outputs')} {k}", v) for k, v in value.items()}
        else:
            out[str(key)] = _positive(f"{source} {key}", value)
    return out


def model_key(path: str | os.PathLike) -> str:
    """How [tool.tf2cntk.budgets.models] names a model: its path relative to the rootdir, with /."""
    return Path(os.path.normpath(str(path))).as_posix()


def budgets_for(table: Mapping[str, Any] | None, model: str | os.PathLike) -> dict[str, Any]:
    """The budget table one model is judged by: the project's, with that model's own entries of
    ``models`` over it (its ``outputs`` merged into the project's)."""
    merged = {k: v for k, v in (table or {}).items() if k != "models"}
    own = dict(((table or {}).get("models") or {}).get(model_key(model), {}))
    outputs = {**merged.get("outputs", {}), **own.pop("outputs", {})}
    merged.update(own)
    if outputs:
        merged["outputs"] = outputs
    return merged


def _sub(source: str, name: str) -> str:
    """The name of a sub-table: [tool.tf2cntk.budgets] -> [tool.tf2cntk.budgets.outputs]; a marker's
    budgets= -> its outputs entry."""
    return f"{source[:-1]}.{name}]" if source.endswith("]") else f"{source} {name}:"


def _positive(source: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{source} = {value!r}: a budget is a finite number >= 0 (a number, not a "
                          "text: write 4 or 1e-5, without quotes)")
    return float(value)
