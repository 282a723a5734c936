"""What a twin is: the route names and labels, ``Twin``, ``TwinUnavailable``, the error a route
gives up with, and the scaled error the self-check and the parity budgets use."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

ROUTE_KERAS = "keras-float64"
ROUTE_GRAPH = "tf-graph-float64"
ROUTE_ONNX = "onnx-float64"
ROUTES = (ROUTE_KERAS, ROUTE_GRAPH, ROUTE_ONNX)
LABELS = {
    ROUTE_KERAS: "Keras model rebuilt in float64 (independent of the converter)",
    ROUTE_GRAPH: "TF graph rewritten to float64 (independent of the converter)",
    ROUTE_ONNX: "converted ONNX in float64 (inherits converter bugs)",
}
# A twin whose output differs from the float32 model's by more than this (scaled error) is not
# a twin: float32 rounding on real models stays below ~1e-2 even with long recurrences; a lost
# bias, weight or activation gives O(0.1-1).
SELF_CHECK_LIMIT = 5e-2


class RouteFailed(Exception):
    """A route gives up; the message is the reason recorded in ``attempts``."""


@dataclass
class TwinUnavailable:
    """No route could build a float64 twin; ``attempts`` says why each one gave up."""

    reason: str
    attempts: list[tuple[str, str]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return False

    def __str__(self) -> str:
        return self.reason + "".join(f"\n  {r}: {why}" for r, why in self.attempts)


@dataclass
class Twin:
    """A float64 model: ``run`` takes the float32 model's feeds and returns float64 outputs.

    ``inputs``/``outputs`` are named and ordered as the TFModel's. ``model`` is what the route
    built, for inspection: the float64 keras.Model (route 1), the float64 GraphDef (route 2) or
    the ``OnnxFloat64`` runner (route 3).
    """

    route: str
    inputs: list[tuple[str, str]]  # (name, dtype the twin takes: float64 or the integer/bool type)
    outputs: list[str]
    _fn: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] = field(repr=False)
    build_seconds: float = 0.0
    self_check: float | None = None  # scaled error of the float32 model against this twin, probe input
    notes: list[str] = field(default_factory=list)
    attempts: list[tuple[str, str]] = field(default_factory=list)  # routes that gave up first
    model: Any = field(default=None, repr=False)

    @property
    def label(self) -> str:
        return LABELS[self.route]

    @property
    def independent(self) -> bool:
        """False for the ONNX route: the twin shares the converter's bugs."""
        return self.route != ROUTE_ONNX

    def __bool__(self) -> bool:
        return True

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cast = {}
        for name, dtype in self.inputs:
            if name not in feeds:
                raise KeyError(f"twin input '{name}' not fed (feeds: {', '.join(feeds)})")
            cast[name] = np.asarray(feeds[name]).astype(dtype, copy=False)
        out = self._fn(cast)
        return {n: np.asarray(out[n]) for n in self.outputs}


def first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:400]


def twin_input_dtypes(ins: list[tuple[str, str, tuple]]) -> list[tuple[str, str]]:
    """(name, dtype the twin takes): float inputs become float64, integer/bool ones stay."""
    return [(n, "float64" if np.issubdtype(np.dtype(d), np.floating) else d) for n, d, _ in ins]


def scaled_error(got: np.ndarray, ref: np.ndarray) -> float:
    """max|got - ref| / rms(ref), the quantity parity budgets bound."""
    g, r = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    if g.shape != r.shape:
        return float("inf")
    if r.size == 0:
        return 0.0
    rms = float(np.sqrt(np.mean(np.square(r))))
    err = float(np.max(np.abs(g - r)))
    return err / rms if rms > 0 else (0.0 if err == 0 else float("inf"))
