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
                                             must not excuse CNTK's). Where that graph was
                                             evaluated and is right, its own distance to the
                                             truth and ORT32's to it count too: an exact run of
                                             the converted graph is that far, and ORT32's
                                             rounding of it can cancel against it by luck
  pass    iff e(CNTK) <= NOISE_FACTOR x noise               on every example, and
          median of e(CNTK) / noise <= RUN_FACTOR        over the run (``RunTruth``, >= 10 examples)

A converter may legitimately round what it folds (BatchNorm into Conv weights, in float32): the
graph counts as right while its distance to the truth stays within the factor of what rounding
its parameters once more changes (``params``, measured on the float64 graph, only when needed).

One example's noise is a noisy estimate (TF32 can be lucky on an input, a chaotic model's error
is heavy-tailed), hence the factor 10 per example; the median ratio over a run is stable, so its
factor can be 2.5 and catch a systematic error a few times the noise. Both were chosen by
measurement (docs/budgets.md).

Attribution from the same numbers: the converter when its graph (in float64) is far from the
truth while CNTK matches ORT32; CNTK when CNTK is far while the graph is right; both, or
undetermined, stated.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

import numpy as np

from pytest_tf2cntk.codec import Jsonable
from pytest_tf2cntk.parity.metrics import UNIT_ROUNDOFF

NOISE_FACTOR = 10.0  # measured: correct CNTK <= 9.6x one example's noise (chaotic LSTM), x1.001 faults 50x up
FLOOR_ULPS = 8.0  # measured: TF32 and ORT32 reach 7.4 units on well-conditioned models
RUN_FACTOR = 2.5  # measured: a correct CNTK's median ratio <= 0.96 (calibrated MobileNetV2), faults 1.6-5.1
RUN_MIN_EXAMPLES = 10  # fewer examples: the median is not yet a stable estimate
PARAM_ROUNDING = 2.0 ** -24  # relative perturbation of every parameter for ``params``: one float32 rounding


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
    params: float | None = None  # the float64 graph vs itself with every parameter rounded once more
    ort32_graph: float | None = None  # ONNX Runtime float32 vs the converted graph in float64

    @property
    def close(self) -> float:
        """How far a correct float32 implementation may be, from TF32's error alone."""
        return self.factor * max(self.tf32, self.floor)

    @property
    def graph_close(self) -> float:
        """How far the converted graph (in float64) may be: a converter that folds parameters in
        float32 rounds them, which moves an ill-conditioned model's output by ``params``."""
        return self.factor * max(self.tf32, self.floor, self.params or 0.0)

    @property
    def converter_wrong(self) -> bool:
        """The converted graph computes another function (measured in float64); where that
        could not be evaluated, ONNX Runtime is farther from the truth than TF32 allows."""
        if not self.independent:
            return False
        if self.graph is not None:
            return self.graph > self.graph_close
        return self.ort32 is not None and self.ort32 > self.close

    @property
    def noise(self) -> float:
        """The float32 implementations' error. With a truth computed from the converted graph,
        TF32's distance to it includes any converter bug, so only ONNX Runtime (which runs that
        graph) counts, and the converter leg is judged by the a-priori budget instead."""
        if not self.independent:
            return max(self.ort32 or 0.0, self.floor)
        if self.converter_wrong:
            return max(self.tf32, self.floor)
        return max(self.tf32, self.ort32 or 0.0, self.graph or 0.0, self.ort32_graph or 0.0, self.floor)

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


@dataclass
class RunTruth(Jsonable):
    """One output over a whole run: how CNTK's error compares with the float32 noise on the
    typical example. A fault moves every example; rounding, even heavy-tailed (a chaotic
    recurrence, where one input amplifies a thousand times more than the next), only a few. So
    the rule is on the median of the per-example ratios e(CNTK) / noise: it stays at most 1 for
    a correct CNTK and lets a systematic error a few times the noise show, which no single
    example, judged on its own noise with the factor 10, can."""

    JSON_EXTRA = ("examples", "median", "over", "applies", "passed")
    factor: float = RUN_FACTOR
    min_examples: int = RUN_MIN_EXAMPLES
    ratios: list[float] = field(default_factory=list)  # per example, in the order added
    ort_examples: int = 0  # examples on which ONNX Runtime ran (its noise counted)

    def add(self, t: TruthCheck) -> None:
        self.ratios.append(t.ratio)
        self.ort_examples += t.ort32 is not None

    @property
    def examples(self) -> int:
        return len(self.ratios)

    @property
    def median(self) -> float:
        return float(statistics.median(self.ratios)) if self.ratios else 0.0

    @property
    def over(self) -> int:
        """Examples on which CNTK's error exceeds the factor times their noise."""
        return sum(r > self.factor for r in self.ratios)

    @property
    def worst(self) -> int:
        """Index of the example with the largest ratio (the one a failure is reported on)."""
        return max(range(len(self.ratios)), key=self.ratios.__getitem__) if self.ratios else -1

    @property
    def applies(self) -> bool:
        return self.examples >= self.min_examples

    @property
    def passed(self) -> bool:
        return not self.applies or self.median <= self.factor

    @property
    def complete(self) -> bool:
        """ONNX Runtime ran on every example: all the float32 noise is counted."""
        return self.ort_examples >= self.examples
