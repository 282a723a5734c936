"""The names in the budget and input tables, checked against the converted model, once for every
front end (pytest's items and fixture, ``tf2cntk check``): a misspelled op, output or input
would otherwise be ignored without a word and the model judged by defaults.

The project's tables cover every model, so a name this model lacks is only an error when it is
close to one of the model's own (a misspelling) or is no ONNX op at all; a table scoped to one
model (``[tool.tf2cntk.budgets.models."PATH"]``, a marker's ``budgets=``/``inputs=``) must name
what that model has. The tables' values are checked where they are parsed (``options``).
"""
from __future__ import annotations

import difflib
import functools
from typing import Any, Iterable, Mapping

from pytest_tf2cntk.errors import ConfigError
from pytest_tf2cntk.options import BUDGET_SETTINGS
from pytest_tf2cntk.project_tables import budgets_for, model_key


@functools.cache
def onnx_op_types() -> frozenset[str]:
    """Every op type of the default ONNX domain, any opset."""
    import onnx

    return frozenset(s.name for s in onnx.defs.get_all_schemas_with_history() if s.domain in ("", "ai.onnx"))


def _close(name: str, candidates: Iterable[str]) -> list[str]:
    pool = sorted(set(candidates))
    by_lower = {c.lower(): c for c in pool}
    if name.lower() in by_lower:  # gemm -> Gemm
        return [by_lower[name.lower()]]
    return difflib.get_close_matches(name, pool, n=3, cutoff=0.6)


def _way_out(name: str, candidates: Iterable[str], listed: str) -> str:
    """The fix: the close names first, then what there is."""
    close = _close(name, candidates)
    return (f"did you mean {' or '.join(close)}? " if close else "correct the name; ") + listed


def check_budgets(table: Mapping[str, Any] | None, onnx_model: Any, source: str, scoped: bool) -> None:
    """Op types and ``outputs`` of one budget table against the model; ConfigError names the key."""
    graph_ops = {n.op_type for n in onnx_model.graph.node}
    for key, value in (table or {}).items():
        if key in BUDGET_SETTINGS or key == "models":
            continue
        if key == "outputs":
            _check_names(value, [o.name for o in onnx_model.graph.output], "output",
                         source[:-1] + ".outputs]" if source.endswith("]") else f"{source} outputs", scoped)
            continue
        if key in graph_ops or (key in onnx_op_types() and not scoped):
            continue
        if key not in onnx_op_types():
            raise ConfigError(
                f"{source} {key}: {key!r} is no ONNX op type nor a budget setting, so it would be ignored",
                hint=_way_out(key, [*graph_ops, *onnx_op_types(), *BUDGET_SETTINGS],
                              f"this model's ops: {', '.join(sorted(graph_ops))}; settings: "
                              f"{', '.join(BUDGET_SETTINGS)}"))
        raise ConfigError(f"{source} {key}: this model has no {key} op, so the budget would be ignored",
                          hint=_way_out(key, graph_ops, f"its ops: {', '.join(sorted(graph_ops))}"))


def check_inputs(table: Mapping[str, Any] | None, onnx_model: Any, source: str, scoped: bool) -> None:
    from pytest_tf2cntk.convert import onnx_graph as og

    _check_names(table, list(og.graph_input_names(onnx_model)), "input", source, scoped)


def _check_names(table: Mapping[str, Any] | None, names: list[str], kind: str, source: str, scoped: bool) -> None:
    for key in table or {}:
        if key in names:
            continue
        close = _close(key, names)
        if scoped or close:
            raise ConfigError(f"{source} {key}: this model has no {kind} {key!r}, so the entry would be ignored",
                              hint=_way_out(key, names, f"its {kind}s: {', '.join(names)}"))


def check_project(tables: Mapping[str, Any], onnx_model: Any, model: str) -> None:
    """``[tool.tf2cntk.budgets]`` (and the model's own table under ``models``) and
    ``[tool.tf2cntk.inputs]`` against the converted model at ``model`` (relative to the rootdir)."""
    budgets = tables.get("budgets") or {}
    check_budgets(budgets, onnx_model, "[tool.tf2cntk.budgets]", scoped=False)
    own = (budgets.get("models") or {}).get(model_key(model))
    if own is not None:
        check_budgets(own, onnx_model, f'[tool.tf2cntk.budgets.models."{model_key(model)}"]', scoped=True)
    check_inputs(tables.get("inputs"), onnx_model, "[tool.tf2cntk.inputs]", scoped=False)


def project_budgets(tables: Mapping[str, Any], onnx_model: Any, model: str) -> dict[str, Any]:
    """The budget table ``model`` is judged by, its names checked first (pytest and the CLI alike)."""
    check_project(tables, onnx_model, model)
    return budgets_for(tables.get("budgets"), model)
