"""The verdict of a parity check, typed and JSON round-trip: per output the three comparisons
(TF vs CNTK decides; TF vs ONNX Runtime and ONNX Runtime vs CNTK say which stage broke)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pytest_tf2cntk.codec import Jsonable
from pytest_tf2cntk.convert.domains import InputDomain
from pytest_tf2cntk.convert.pipeline import ConversionSummary
from pytest_tf2cntk.parity.budgets import OutputBudget
from pytest_tf2cntk.parity.localize.report import LayerRow, Localization
from pytest_tf2cntk.parity.metrics import Metrics
from pytest_tf2cntk.tables import text_table

STAGE_OK = "none"
STAGE_CONVERTER = "converter (TF -> ONNX, tf2onnx)"
STAGE_CNTK = "CNTK importer/runtime (ONNX -> CNTK)"
STAGE_BOTH = "both converter and CNTK"
STAGE_COMBINED = "undetermined: converter and CNTK errors add up, neither alone exceeds the budget"
STAGE_UNKNOWN = "unknown (ONNX Runtime not run)"


@dataclass
class OutputCheck(Jsonable):
    """One output on one example: the three comparisons and the verdict."""

    JSON_EXTRA = ("passed", "reasons", "scaled_error", "headroom", "stage")
    output: str
    budget: OutputBudget
    tf_vs_cntk: Metrics
    tf_vs_ort: Metrics | None = None  # the converter's share
    ort_vs_cntk: Metrics | None = None  # CNTK's importer and runtime's share

    @property
    def scaled_error(self) -> float:
        return self.tf_vs_cntk.scaled_error

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
        if t.shape_ok and self.scaled_error > self.budget.value:
            out.append(f"scaled error {self.scaled_error:.3g} > budget {self.budget.value:.3g}")
        return out

    @property
    def passed(self) -> bool:
        return not self.reasons

    @property
    def headroom(self) -> float:
        return self.budget.value / self.scaled_error if self.scaled_error > 0 else float("inf")

    @property
    def stage(self) -> str:
        if self.passed:
            return STAGE_OK
        if self.tf_vs_ort is None or self.ort_vs_cntk is None:
            return STAGE_UNKNOWN
        conv, cntk = self.tf_vs_ort, self.ort_vs_cntk
        conv_bad = conv.scaled_error > self.budget.value or conv.nan_mismatch > 0
        cntk_bad = (cntk.scaled_error > self.budget.value or cntk.nan_mismatch > 0 or not cntk.dtype_ok
                    or not cntk.shape_ok)
        if conv_bad and cntk_bad:
            return STAGE_BOTH
        if not conv_bad and not cntk_bad:
            return STAGE_COMBINED
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

    @property
    def failing_outputs(self) -> list[OutputCheck]:
        return [c for c in self.outputs.values() if not c.passed]

    def layer_rows(self) -> list[LayerRow]:
        """Per-node rows of the localization, for the history (none without one)."""
        if self.localization is None or self.localization.error:
            return []
        return self.localization.layer_rows(self.model, self.device)

    def table(self) -> str:
        rows = [("output", "scaled err", "budget", "headroom", "max abs", "at", "max ulp", "cosine",
                 "top-1", "stage")]
        for c in self.outputs.values():
            t = c.tf_vs_cntk
            rows.append((c.output, f"{c.scaled_error:.3g}", f"{c.budget.value:.3g}", f"{c.headroom:.3g}x",
                         f"{t.max_abs:.3g}", str(list(t.max_abs_at)), f"{t.max_ulp:.0f}",
                         f"{t.cosine:.9f}", "-" if t.top1_agreement is None else f"{t.top1_agreement:.0%}",
                         c.stage))
        return "\n".join(text_table(rows))

    def __str__(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        lines = [f"tf2cntk parity {verdict}: {self.model} on {self.device} "
                 f"({self.examples} examples, {self.seconds:.1f} s)", self.table()]
        for c in self.failing_outputs:
            lines += _failure_lines(c)
        if not self.passed and self.inputs:
            lines.append("input: " + "; ".join(f"{k}: {v}" for k, v in self.inputs.items()))
        if self.localization is not None:
            lines.append(f"layerwise: {self.localization.summary()}")
            if not self.localization.error:
                lines.extend("  " + ln for ln in self.localization.table(5).splitlines())
        if self.reproducer:
            lines.append(f"reproducer: {self.reproducer}\n  replay: tf2cntk replay {self.reproducer}")
        return "\n".join(lines)


def _failure_lines(c: OutputCheck) -> list[str]:
    t = c.tf_vs_cntk
    lines = [f"output '{c.output}' failed: {'; '.join(c.reasons)}", f"  budget {c.budget.explain()}",
             f"  worst element {list(t.max_abs_at)}: |err| {t.max_abs:.3g} (output rms {t.ref_scale:.3g}); "
             f"{t.frac_over:.2%} of elements over budget"]
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

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks.values())
