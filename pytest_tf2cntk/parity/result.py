"""The verdict of a parity check, typed and JSON round-trip: per output the three comparisons
(TF vs CNTK decides; TF vs ONNX Runtime and ONNX Runtime vs CNTK say which stage broke)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from pytest_tf2cntk.codec import Jsonable
from pytest_tf2cntk.convert.domains import InputDomain
from pytest_tf2cntk.convert.pipeline import ConversionSummary
from pytest_tf2cntk.parity.budgets import OutputBudget
from pytest_tf2cntk.parity.localize.report import LayerRow, Localization
from pytest_tf2cntk.parity.metrics import Metrics
from pytest_tf2cntk.parity.truth import RunTruth, TruthCheck
from pytest_tf2cntk.tables import text_table

STAGE_OK = "none"
STAGE_CONVERTER = "converter (TF -> ONNX, tf2onnx)"
STAGE_CNTK = "CNTK importer/runtime (ONNX -> CNTK)"
STAGE_BOTH = "both converter and CNTK"
STAGE_COMBINED = "undetermined: converter and CNTK errors add up, neither alone exceeds the budget"
STAGE_UNKNOWN = "unknown (ONNX Runtime not run)"
STAGE_UNDETERMINED = ("undetermined: CNTK is far from the float64 truth but close to ONNX Runtime, which is "
                      "close to the truth")


RULE_MEASURED = "measured"  # against the float64 truth and the float32 noise
RULE_RUN = "measured (run)"  # the same, over the run: the median ratio of CNTK's error to the noise
RULE_BUDGET = "a-priori budget"  # composed from the graph (no float64 twin)
RULE_USER = "user budget"  # [tool.tf2cntk.budgets.outputs]


@dataclass
class OutputCheck(Jsonable):
    """One output on one example: the comparisons and the verdict by its rule."""

    JSON_EXTRA = ("passed", "reasons", "rule", "scaled_error", "allowed", "headroom", "stage")
    output: str
    budget: OutputBudget  # the a-priori (or the user's) budget, always computed
    tf_vs_cntk: Metrics
    tf_vs_ort: Metrics | None = None  # the converter's share
    ort_vs_cntk: Metrics | None = None  # CNTK's importer and runtime's share
    truth: TruthCheck | None = None  # against the float64 twin, when there is one
    run: RunTruth | None = None  # the same over every example of the run

    @property
    def rule(self) -> str:
        """The rule that decided: the run-level one only where it alone fails."""
        if self.budget.overridden:
            return RULE_USER
        if self.truth is None:
            return RULE_BUDGET
        return RULE_RUN if self.truth.passed and self.run is not None and not self.run.passed else RULE_MEASURED

    @property
    def measured(self) -> TruthCheck | None:
        """The numbers against the float64 truth, when a measured rule decides."""
        return self.truth if self.rule in (RULE_MEASURED, RULE_RUN) else None

    @property
    def scaled_error(self) -> float:
        """CNTK's error: against the truth (measured rules), else against TF32."""
        t = self.measured
        return t.cntk if t is not None else self.tf_vs_cntk.scaled_error

    @property
    def allowed(self) -> float:
        if self.rule == RULE_RUN:  # the run-level factor on this (the worst) example's noise
            return self.run.factor * self.truth.noise
        return self.truth.limit if self.rule == RULE_MEASURED else self.budget.value

    @property
    def ratio(self) -> float | None:
        """CNTK's error over the float32 noise, by the deciding measured rule."""
        if self.rule == RULE_RUN:
            return self.run.median
        return self.truth.ratio if self.rule == RULE_MEASURED else None

    @property
    def reasons(self) -> list[str]:
        t = self.tf_vs_cntk
        out = []
        if not t.shape_ok:
            out.append("shape differs")
        if not t.dtype_ok:
            out.append("dtype differs")
        if t.nan_mismatch:
            out.append(f"{t.nan_mismatch} NaN/Inf element(s) differ")
        if self.rule == RULE_MEASURED and not self.truth.independent and self.tf_vs_ort is not None \
                and self.tf_vs_ort.scaled_error > self.budget.value:
            out.append(f"TF vs ONNX Runtime {self.tf_vs_ort.scaled_error:.3g} > a-priori budget "
                       f"{self.budget.value:.3g} (the truth is the converted graph: the converter is judged so)")
        if t.shape_ok and self.scaled_error > self.allowed:
            if self.rule == RULE_MEASURED:
                out.append(f"error {self.scaled_error:.3g} vs the float64 truth is {self.truth.ratio:.3g}x the "
                           f"float32 noise {self.truth.noise:.3g} (limit {self.truth.factor:g}x)")
            elif self.rule == RULE_RUN:
                r = self.run
                out.append(f"on {r.over} of {r.examples} examples CNTK's error vs the float64 truth exceeds "
                           f"{r.factor:g}x their float32 noise (median {r.median:.3g}x, limit {r.factor:g}x): a "
                           f"systematic error, although each example alone is within {self.truth.factor:g}x; "
                           f"here {self.truth.ratio:.3g}x")
            else:
                out.append(f"scaled error {self.scaled_error:.3g} > {self.rule} {self.allowed:.3g}")
        return out

    @property
    def passed(self) -> bool:
        return not self.reasons

    @property
    def headroom(self) -> float:
        return self.allowed / self.scaled_error if self.scaled_error > 0 else float("inf")

    @property
    def severity(self) -> float:
        """How close to failing: error / allowed (a failing example always ranks above)."""
        return math.inf if not self.passed else (1.0 / self.headroom if self.headroom > 0 else math.inf)

    @property
    def stage(self) -> str:
        if self.passed:
            return STAGE_OK
        if self.tf_vs_ort is None or self.ort_vs_cntk is None:
            return STAGE_UNKNOWN
        if self.measured is not None:
            return self._measured_stage()
        conv, cntk = self.tf_vs_ort, self.ort_vs_cntk
        conv_bad = conv.scaled_error > self.budget.value or conv.nan_mismatch > 0
        cntk_bad = (cntk.scaled_error > self.budget.value or cntk.nan_mismatch > 0 or not cntk.dtype_ok
                    or not cntk.shape_ok)
        return _stage(conv_bad, cntk_bad, STAGE_COMBINED)

    def _measured_stage(self) -> str:
        """Converter: its graph (in float64) far from the truth, CNTK matching ORT32; CNTK: CNTK far
        from the truth while the graph is right."""
        truth, cntk = self.truth, self.ort_vs_cntk
        if truth.ort32 is None:
            return STAGE_UNKNOWN
        conv_bad = truth.converter_wrong or self.tf_vs_ort.nan_mismatch > 0 or (
            not truth.independent and self.tf_vs_ort.scaled_error > self.budget.value)
        cntk_bad = (cntk.scaled_error > truth.limit or cntk.nan_mismatch > 0 or not cntk.dtype_ok
                    or not cntk.shape_ok) if conv_bad else (not truth.passed or self.rule == RULE_RUN)
        return _stage(conv_bad, cntk_bad, STAGE_UNDETERMINED)


def _stage(conv_bad: bool, cntk_bad: bool, neither: str) -> str:
    if conv_bad and cntk_bad:
        return STAGE_BOTH
    if not conv_bad and not cntk_bad:
        return neither
    return STAGE_CONVERTER if conv_bad else STAGE_CNTK


@dataclass
class ParityResult(Jsonable):
    model: str
    device: str
    passed: bool
    outputs: dict[str, OutputCheck]
    examples: int
    seconds: float
    conversion: ConversionSummary
    inputs: dict[str, str] = field(default_factory=dict)  # recipe of the reported example
    input_domains: dict[str, InputDomain] = field(default_factory=dict)
    reproducer: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    seed: int | None = None
    versions: dict[str, str] = field(default_factory=dict)
    localization: Localization | None = None
    reference: str = ""  # the float64 twin's route, or why there is none (then the a-priori budget)

    @property
    def failing_outputs(self) -> list[OutputCheck]:
        return [c for c in self.outputs.values() if not c.passed]

    def layer_rows(self) -> list[LayerRow]:
        """Per-node rows of the localization, for the history (none without one)."""
        if self.localization is None or self.localization.error:
            return []
        return self.localization.layer_rows(self.model, self.device)

    def table(self) -> str:
        rows = [("output", "error", "TF32 noise", "ORT32 noise", "ratio", "run median", "allowed", "rule", "max abs",
                 "at", "top-1", "stage")]
        uncounted = False
        for c in self.outputs.values():
            t, truth = c.tf_vs_cntk, c.measured
            run = c.run if truth and c.run is not None and c.run.applies else None
            ort = "-" if truth is None or truth.ort32 is None else _g(truth.ort32)
            if truth is not None and truth.ort32 is not None and truth.converter_wrong:
                ort, uncounted = ort + "*", True
            rows.append((c.output, _g(c.scaled_error), _g(truth.tf32) if truth else "-", ort,
                         f"{truth.ratio:.3g}x" if truth else "-", f"{run.median:.3g}x" if run else "-",
                         _g(c.allowed), c.rule,
                         _g(t.max_abs), str(list(t.max_abs_at)),
                         "-" if t.top1_agreement is None else f"{t.top1_agreement:.0%}", c.stage))
        lines = text_table(rows)
        if uncounted:
            lines.append("* not counted as noise: farther from the truth than TF32 allows, and the converted "
                         "graph is not known to be right there")
        return "\n".join(lines)

    def __str__(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        lines = [f"tf2cntk parity {verdict}: {self.model} on {self.device} "
                 f"({self.examples} example{'s' if self.examples != 1 else ''}, {self.seconds:.1f} s)", self.table()]
        for c in self.failing_outputs:
            lines += _failure_lines(c, self.reference)
        if not self.passed and self.inputs:
            lines.append("input: " + "; ".join(f"{k}: {v}" for k, v in self.inputs.items()))
        if self.localization is not None:
            lines.append(f"layerwise: {self.localization.summary()}")
            if not self.localization.error:
                lines.extend("  " + ln for ln in self.localization.table(5).splitlines())
        if self.reproducer:
            lines.append(f"reproducer: {self.reproducer}\n  replay: tf2cntk replay {self.reproducer}")
        return "\n".join(lines)


def _g(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def _failure_lines(c: OutputCheck, reference: str) -> list[str]:
    t = c.tf_vs_cntk
    lines = [f"output '{c.output}' failed: {'; '.join(c.reasons)}"]
    if c.measured is not None:
        tr = c.truth
        ort = "" if tr.ort32 is None else f", ONNX Runtime {tr.ort32:.3g}" + (
            " (not counted: the converted graph is off)" if tr.converter_wrong else "")
        graph = "" if tr.graph is None else f"; the converted graph in float64 {tr.graph:.3g}" + (
            "" if tr.ort32_graph is None else f" (ONNX Runtime vs it {tr.ort32_graph:.3g})") + (
            "" if tr.params is None else f", its parameters rounded once more move it {tr.params:.3g}")
        lines.append(f"  truth: {tr.reference}; errors vs it: TF32 {tr.tf32:.3g}{ort}, CNTK {tr.cntk:.3g}{graph}; "
                     f"floor {tr.floor:.3g}")
    else:
        lines.append(f"  {c.rule} {c.budget.explain()}" + (f" (no float64 truth: {reference})" if reference
                                                           and c.rule == RULE_BUDGET else ""))
    lines.append(f"  worst element {list(t.max_abs_at)}: |CNTK - TF| {t.max_abs:.3g} (output rms {t.ref_scale:.3g})")
    if c.tf_vs_ort and c.ort_vs_cntk:
        lines.append(f"  stage: {c.stage}  [TF vs ORT {c.tf_vs_ort.scaled_error:.3g}, "
                     f"ORT vs CNTK {c.ort_vs_cntk.scaled_error:.3g}]")
    return lines


@dataclass
class Evaluation:
    """One example through the backends: the inputs, every output, and the checks."""

    feeds: dict[str, np.ndarray]
    tf: dict[str, np.ndarray]
    cntk: dict[str, np.ndarray]
    checks: dict[str, OutputCheck]
    ort: dict[str, np.ndarray] | None = None
    truth: dict[str, np.ndarray] | None = None  # the float64 twin's outputs

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks.values())
