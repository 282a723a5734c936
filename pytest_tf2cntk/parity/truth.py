"""The measured verdict: CNTK against the error a correct float32 implementation really makes.

A float64 twin of the model (``convert.twin``) computes the truth ``r`` that every float32
implementation approximates. On each example and output:

  e(x)    = max|x - r| / rms(r)             over the elements finite in both (scaled error)
  floor   = FLOOR_ULPS x u x max|r| / rms(r) a few units of rounding of the output's largest
                                             element, so an exact-op chain or an input on which
                                             float32 happens to be exact never demands less
  noise   = max(e(TF32), e(ORT32), floor)    what correct float32 implementations get wrong here;
                                             ORT32 counts only when the graph it runs is right:
                                             the converted graph evaluated in float64 must be
                                             within the factor of TF32's error of the truth
                                             (else the converter is wrong, and ORT32's error
                                             must not excuse CNTK's)
  pass    iff e(CNTK) <= NOISE_FACTOR x noise

The factor and the floor were chosen by measurement (docs/budgets.md): a correct CNTK stayed
within 0.3-4.6x TF32's own error on every model measured, planted weight errors sat at 6-970x.

Attribution from the same numbers: the converter when its graph (in float64) is far from the
truth while CNTK matches ORT32; CNTK when CNTK is far while the graph is right; both, or
undetermined, stated.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pytest_tf2cntk.codec import Jsonable
from pytest_tf2cntk.parity.metrics import UNIT_ROUNDOFF

NOISE_FACTOR = 10.0  # measured: correct CNTK <= 6.8x the noise (calibrated ResNet50), faults from 2.8x up
FLOOR_ULPS = 8.0  # measured: TF32 and ORT32 reach 7.4 units on well-conditioned models


@dataclass
class TruthCheck(Jsonable):
    """One output on one example, against the float64 truth."""

    JSON_EXTRA = ("noise", "limit", "ratio", "converter_wrong", "passed")
    reference: str  # how the truth was computed (the twin's route)
    tf32: float  # scaled error of TensorFlow float32 vs the truth
    cntk: float
    floor: float
    factor: float = NOISE_FACTOR
    ort32: float | None = None  # ONNX Runtime float32 vs the truth, when it ran on this example
    independent: bool = True  # False: the truth is the converted ONNX in float64 (see ``noise``)
    graph: float | None = None  # the converted graph evaluated in float64 vs the truth

    @property
    def close(self) -> float:
        """How far a correct float32 implementation may be, from TF32's error alone."""
        return self.factor * max(self.tf32, self.floor)

    @property
    def converter_wrong(self) -> bool:
        """The converted graph computes another function (measured in float64); where that
        could not be evaluated, ONNX Runtime is farther from the truth than TF32 allows."""
        if not self.independent:
            return False
        if self.graph is not None:
            return self.graph > self.close
        return self.ort32 is not None and self.ort32 > self.close

    @property
    def noise(self) -> float:
        """The float32 implementations' error. With a truth computed from the converted graph,
        TF32's distance to it includes any converter bug, so only ONNX Runtime (which runs that
        graph) counts, and the converter leg is judged by the a-priori budget instead."""
        if not self.independent:
            return max(self.ort32 or 0.0, self.floor)
        ort = self.ort32 if self.ort32 is not None and not self.converter_wrong else 0.0
        return max(self.tf32, ort, self.floor)

    @property
    def limit(self) -> float:
        return self.factor * self.noise

    @property
    def ratio(self) -> float:
        return self.cntk / self.noise if self.noise > 0 else (0.0 if self.cntk == 0 else math.inf)

    @property
    def passed(self) -> bool:
        return self.cntk <= self.limit


def error_vs_truth(truth: np.ndarray, got: np.ndarray) -> float:
    """max|got - truth| / rms(truth) over the elements finite in both (inf if shapes differ);
    where NaN/Inf sit is judged apart (TF vs CNTK positions must agree)."""
    t = np.asarray(truth, np.float64)
    g = np.asarray(got, np.float64)
    if t.shape != g.shape:
        return math.inf
    if not t.size:
        return 0.0
    finite_t = np.isfinite(t)
    both = finite_t & np.isfinite(g)
    scale = math.sqrt(float(np.mean(np.square(np.where(finite_t, t, 0.0)))))
    worst = float(np.max(np.abs(t[both] - g[both]))) if both.any() else 0.0
    if scale > 0:
        return worst / scale
    return 0.0 if worst == 0 else math.inf


def rounding_floor(truth: np.ndarray, dtype: np.dtype, ulps: float = FLOOR_ULPS) -> float:
    """``ulps`` units of rounding of the output's largest element, in scaled-error units."""
    t = np.asarray(truth, np.float64)
    t = t[np.isfinite(t)]
    if not t.size:
        return 0.0
    scale = math.sqrt(float(np.mean(np.square(t))))
    u = UNIT_ROUNDOFF.get(np.dtype(dtype), 2.0 ** -24)
    return ulps * u * float(np.max(np.abs(t))) / scale if scale > 0 else 0.0


def truth_check(reference: str, truth: np.ndarray, tf32: np.ndarray, cntk: np.ndarray, *,
                factor: float = NOISE_FACTOR, floor_ulps: float = FLOOR_ULPS,
                independent: bool = True) -> TruthCheck:
    return TruthCheck(reference, error_vs_truth(truth, tf32), error_vs_truth(truth, cntk),
                      rounding_floor(truth, np.asarray(tf32).dtype, floor_ulps), factor,
                      independent=independent)
