"""The entry point: ``build_twin(conversion)``, the most trustworthy float64 twin of a converted
model, or why there is none.

The routes are tried in order (``ROUTES``: Keras rebuild, TF graph rewrite, converted ONNX); a
route that gives up or crashes is recorded in ``attempts`` with its reason and the next is tried.
Every twin is checked when built: no float32/float16/bfloat16 tensor anywhere in its graph (routes
1 and 2: the traced GraphDef and its function library; route 3: every intermediate of one run),
and its output on a probe input is compared with the float32 model's (``Twin.self_check``, scaled
error max|a-b|/rms(twin)); above ``SELF_CHECK_LIMIT`` the route is rejected (a gross rebuild
mistake: lost weights, wrong layer), and the next one is tried.
"""
from __future__ import annotations

import time
from typing import Any

from pytest_tf2cntk.convert.twin.core import (LABELS, ROUTE_GRAPH, ROUTE_KERAS, ROUTE_ONNX, ROUTES,
                                              SELF_CHECK_LIMIT, RouteFailed, Twin, TwinUnavailable,
                                              first_line, scaled_error)
from pytest_tf2cntk.convert.twin.source import SourceModel, self_check
from pytest_tf2cntk.tf_import import tensorflow

__all__ = ["LABELS", "ROUTES", "ROUTE_GRAPH", "ROUTE_KERAS", "ROUTE_ONNX", "SELF_CHECK_LIMIT", "RouteFailed",
           "SourceModel", "Twin", "TwinUnavailable", "build_twin", "scaled_error", "self_check"]


def build_twin(conversion: Any, routes: tuple[str, ...] = ROUTES, check: bool = True,
               perturb: float = 0.0) -> Twin | TwinUnavailable:
    """The most trustworthy float64 twin of ``conversion``'s model, or why there is none.

    ``conversion``: a ``pipeline.Conversion`` (or anything with ``tf_model``, ``onnx_model``,
    ``options.unsafe_load`` and ``batch``): its loaded TFModel is the source, its converted ONNX
    the last resort. ``routes`` restricts/reorders the routes tried. ``check``: run the
    float64-purity and self checks (a few hundred ms; keep it on). ``perturb`` (ONNX route):
    every parameter of the graph times (1 + perturb x uniform(-1, 1)).
    """
    tensorflow()  # quietly, before a route imports it
    source = SourceModel.from_conversion(conversion)
    attempts: list[tuple[str, str]] = []
    for route in routes:
        started = time.perf_counter()
        try:
            twin = _run_route(route, source, conversion, check, perturb)
        except RouteFailed as exc:
            attempts.append((route, str(exc)))
            continue
        except Exception as exc:  # a route is an attempt: its crash is a reason, not the verdict
            attempts.append((route, f"{type(exc).__name__}: {first_line(exc)}"))
            continue
        twin.build_seconds = time.perf_counter() - started
        twin.attempts = attempts
        return twin
    return TwinUnavailable(f"no float64 twin of {_where(conversion)}: every route gave up", attempts)


def _run_route(route: str, source: SourceModel, conversion: Any, check: bool, perturb: float = 0.0) -> Twin:
    if route == ROUTE_KERAS:
        from pytest_tf2cntk.convert.twin.keras64 import keras_route

        return keras_route(source, check)  # "not a Keras model" for a SavedModel
    if route == ROUTE_GRAPH:
        from pytest_tf2cntk.convert.twin.tfgraph import graph_route

        return graph_route(source, check)
    if route == ROUTE_ONNX:
        from pytest_tf2cntk.convert.twin.onnx64 import onnx_route

        return onnx_route(source, _onnx_of(conversion), check, perturb)
    raise ValueError(f"unknown route {route!r}")


def _onnx_of(conversion: Any) -> Any:
    """The converted ONNX model, or RouteFailed when there is none."""
    try:
        model = getattr(conversion, "onnx_model", None)
    except Exception as exc:  # the file went missing, say
        raise RouteFailed(f"the converted ONNX model cannot be read: {first_line(exc)}") from None
    if model is None:
        raise RouteFailed("no converted ONNX model given")
    return model


def _where(conversion: Any) -> str:
    for attr in ("source", "onnx_path"):
        value = getattr(conversion, attr, None)
        if value is not None:
            return str(value)
    try:
        return str(conversion.tf_model.path)
    except Exception:
        return "the model"
