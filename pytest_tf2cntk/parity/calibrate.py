"""`tf2cntk calibrate MODEL`: measure the error distribution, propose per-output budgets.

The composed budgets (budgets.py) are derived from the graph and are deliberately generous.
Calibration measures instead: the parity engine evaluates ``seeds`` x ``examples`` inputs drawn
by the same Hypothesis strategy the plugin uses (one seeded run per seed, no shrinking), and
records every example's scaled error per output. The proposal is

  budget = margin x max(max observed error, u)      (u: the output dtype's unit roundoff)

rounded up to two significant digits, printed as ``[tool.tf2cntk.budgets.outputs]`` TOML with
the statistics and the default composed budget in comments, so stdout can be pasted as is.
An output with a non-finite error (shape or NaN/Inf mismatch) gets no proposal: no budget fixes it.

A budget above MAX_PROPOSAL (1e-2) would switch the check off: it is never proposed. The output
gets a warning instead that names the cause, measured where a float64 twin exists (TF32's own
distance to the truth: an ill-conditioned model, whose float32 noise only the measured verdict
can tell from a fault) and points to the measured verdict (``--tf2cntk-reference=auto``).
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from pytest_tf2cntk.codec import Jsonable
from pytest_tf2cntk.convert.options import ConversionOptions
from pytest_tf2cntk.convert.pipeline import convert
from pytest_tf2cntk.errors import Tf2CntkError
from pytest_tf2cntk.options import default
from pytest_tf2cntk.project_tables import model_key
from pytest_tf2cntk.validate import project_budgets
from pytest_tf2cntk.parity.budgets import BudgetConfig, output_budgets
from pytest_tf2cntk.parity.engine import ParityEngine
from pytest_tf2cntk.parity.inputs import inputs_strategy, materialize
from pytest_tf2cntk.parity.options import ParityOptions
from pytest_tf2cntk.tables import text_table

DEFAULT_MARGIN = default("margin")
DEFAULT_SEEDS = default("seeds")
DEFAULT_EXAMPLES = default("examples")
MAX_PROPOSAL = 1e-2  # a fixed budget above this lets through errors no conversion should have


@dataclass
class OutputCalibration(Jsonable):
    JSON_EXTRA = ("n", "median", "p99", "max", "proposed", "too_loose")
    output: str
    errors: list[float]  # every example's scaled error, all seeds
    seed_max: list[float]  # worst error of each seed: how stable the maximum is
    default_budget: float  # composed from the graph with default settings
    configured_budget: float  # what the project's [tool.tf2cntk.budgets] gives today
    unit_roundoff: float
    margin: float
    nan_mismatches: int = 0
    tf32_noise: list[float] = field(default_factory=list)  # TF32 vs the float64 twin, per example

    @property
    def finite(self) -> list[float]:
        return [e for e in self.errors if math.isfinite(e)]

    @property
    def usable(self) -> bool:
        return bool(self.finite) and len(self.finite) == len(self.errors) and not self.nan_mismatches

    @property
    def max(self) -> float:
        return max(self.errors) if self.errors else math.nan

    def quantile(self, q: float) -> float:
        return float(np.quantile(self.finite, q)) if self.finite else math.nan

    @property
    def wanted(self) -> float | None:
        """margin x the worst error, rounded up: the budget a correct conversion needs."""
        return round_up(self.margin * max(self.max, self.unit_roundoff)) if self.usable else None

    @property
    def proposed(self) -> float | None:
        """``wanted``, unless it would switch the check off (above MAX_PROPOSAL)."""
        wanted = self.wanted
        return wanted if wanted is not None and wanted <= MAX_PROPOSAL else None

    def too_loose(self) -> str:
        """Why no budget is proposed although the errors are finite ("" when one is)."""
        wanted = self.wanted
        if wanted is None or wanted <= MAX_PROPOSAL:
            return ""
        if self.tf32_noise:
            cause = (f"TF32 itself is up to {max(self.tf32_noise):.3g} from the float64 twin: the model is "
                     "ill-conditioned, and a fixed budget cannot tell its float32 noise from a fault")
        else:
            cause = ("there is no float64 twin to tell whether that is the model's own float32 noise "
                     "(ill-conditioning) or a fault")
        return (f"a budget of {wanted:.2g} (> {MAX_PROPOSAL:g}) would switch the check off, so none is proposed: "
                f"{cause}; the measured verdict (--tf2cntk-reference=auto, the default) judges CNTK against "
                "that noise on each input instead")

    @property
    def n(self) -> int:
        return len(self.errors)

    @property
    def median(self) -> float:
        return self.quantile(0.5)

    @property
    def p99(self) -> float:
        return self.quantile(0.99)


@dataclass
class Calibration(Jsonable):
    JSON_EXTRA = ("overrides",)
    model: str
    device: str
    batch: int
    seeds: int
    examples: int  # per seed
    margin: float
    outputs: dict[str, OutputCalibration] = field(default_factory=dict)
    seconds: float = 0.0
    key: str = ""  # the model as [tool.tf2cntk.budgets.models] names it (its path from the rootdir)

    @property
    def evaluations(self) -> int:
        return max((len(o.errors) for o in self.outputs.values()), default=0)

    @property
    def overrides(self) -> dict[str, float]:
        return {name: o.proposed for name, o in self.outputs.items() if o.proposed is not None}

    def to_toml(self) -> str:
        lines = [f"# tf2cntk calibrate {self.model} on {self.device}, batch {self.batch}: {self.seeds} seed(s) x "
                 f"{self.examples} examples = {self.evaluations} evaluations ({self.seconds:.1f} s)",
                 "# scaled error = max|CNTK - TF| / rms(TF), one value per example",
                 f"# proposed = margin {self.margin:g} x max observed (at least one unit roundoff), rounded up",
                 "#"]
        table = [("output", "n", "median", "p99", "max", "worst/seed", "default", "configured", "proposed",
                  "vs default")]
        for o in self.outputs.values():
            p = o.proposed
            spread = (f"{min(o.seed_max):.2g}..{max(o.seed_max):.2g}" if o.seed_max else "-")
            table.append((o.output, str(len(o.errors)), f"{o.quantile(0.5):.3g}", f"{o.quantile(0.99):.3g}",
                          f"{o.max:.3g}", spread, f"{o.default_budget:.3g}", f"{o.configured_budget:.3g}",
                          "-" if p is None else f"{p:.2g}",
                          "-" if p is None else f"{p / o.default_budget:.3g}x "
                          f"({'tighter' if p < o.default_budget else 'looser'})"))
        lines += text_table(table, prefix="# ")
        for o in self.outputs.values():
            if o.too_loose():
                lines.append(f"# WARNING {o.output}: {o.too_loose()}")
            elif not o.usable:
                lines.append(f"# {o.output}: no proposal: {len(o.errors) - len(o.finite)} example(s) with a "
                             f"shape mismatch, {o.nan_mismatches} with NaN/Inf mismatches; no budget fixes that")
            elif o.max > o.configured_budget:
                lines.append(f"# {o.output}: max observed {o.max:.3g} is over today's budget "
                             f"{o.configured_budget:.3g}: this output fails now")
        lines += ["#", "# Paste into pyproject.toml (merge keys if the table exists). These budgets apply to this",
                  "# model only; per test: @pytest.mark.tf2cntk(budgets={'outputs': {...}})",
                  f"[tool.tf2cntk.budgets.models.{json.dumps(model_key(self.key or self.model))}.outputs]"]
        lines += [f"{json.dumps(name)} = {value:.2g}" for name, value in self.overrides.items()]
        return "\n".join(lines) + "\n"



def round_up(x: float, digits: int = 2) -> float:
    """``x`` rounded up to ``digits`` significant digits (a budget must not shrink when printed)."""
    if x <= 0 or not math.isfinite(x):
        return x
    q = 10.0 ** (math.floor(math.log10(x)) - digits + 1)
    return float(f"{math.ceil(x / q - 1e-9) * q:.{digits}g}")


def calibrate(model: str | os.PathLike, *, device: str = "cpu", conversion: ConversionOptions | None = None,
              seeds: int = DEFAULT_SEEDS, examples: int = DEFAULT_EXAMPLES, margin: float = DEFAULT_MARGIN,
              cntk_python: str | None = None, budgets: dict[str, Any] | None = None,
              inputs: dict[str, tuple[float, float]] | None = None, edge_values: bool = False,
              progress: Callable[[str], None] | None = None, key: str | None = None) -> Calibration:
    """Evaluate ``seeds`` x ``examples`` Hypothesis inputs and collect each output's errors.

    ``budgets``/``inputs``: the project's ``[tool.tf2cntk.budgets]`` / ``[tool.tf2cntk.inputs]``,
    so the inputs match the tests' and the "configured" column shows today's budget (the model's
    own, ``key`` naming it as [tool.tf2cntk.budgets.models] does: its path from the rootdir).
    """
    if seeds < 1 or examples < 1 or margin <= 0:
        raise Tf2CntkError(f"calibrate needs seeds >= 1, examples >= 1 and margin > 0 (got {seeds}, {examples}, "
                           f"{margin})")
    started = time.perf_counter()
    c = conversion or ConversionOptions()
    conv = convert(model, batch=c.batch, opset=c.opset, signature=c.signature, unsafe_load=c.unsafe_load,
                   cache_dir=c.cache_dir, input_shapes=c.input_shapes, repairs=c.repairs,
                   imports=c.imports)
    key = model_key(key or model)
    configured = BudgetConfig.from_mapping(project_budgets({"budgets": budgets, "inputs": inputs}, conv.onnx_model,
                                                           key))  # names checked as pytest and check do
    engine = ParityEngine(conv, device, ParityOptions(budgets=configured, inputs=dict(inputs or {}),
                                                      cntk_python=cntk_python, edge_values=edge_values))
    dtypes = {o.name: np.dtype(o.dtype) for o in conv.outputs}
    defaults = output_budgets(conv.onnx_model, BudgetConfig(), dtypes)
    cal = Calibration(str(model), engine.device, c.batch, seeds, examples, margin, key=key)
    for name, b in engine.budgets.items():
        cal.outputs[name] = OutputCalibration(name, [], [], defaults[name].value, b.value, b.unit_roundoff, margin)
    try:
        for s in range(seeds):
            per_seed = _one_seed(engine, cal, s, examples, edge_values)
            if progress:
                progress(f"seed {s + 1}/{seeds}: {sum(len(v) for v in per_seed.values()) // max(len(per_seed), 1)} "
                         f"examples, worst " + ", ".join(f"{k} {max(v):.3g}" for k, v in per_seed.items()))
    finally:
        engine.close()
    cal.seconds = time.perf_counter() - started
    return cal


def _one_seed(engine: ParityEngine, cal: Calibration, seed: int, examples: int,
              edge_values: bool) -> dict[str, list[float]]:
    """One seeded Hypothesis run, generate phase only (nothing fails, nothing shrinks; no
    database, so every seed is fresh); every example's errors go into ``cal``."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hyp_seed

    per_seed: dict[str, list[float]] = {}

    def prop(recipes: dict[str, Any]) -> None:
        ev = engine.evaluate(materialize(recipes, engine.domains))
        for name, check in ev.checks.items():
            error = check.tf_vs_cntk.scaled_error  # what an output budget bounds
            cal.outputs[name].errors.append(error)
            per_seed.setdefault(name, []).append(error)
            if check.truth is not None:
                cal.outputs[name].tf32_noise.append(check.truth.tf32)
            if check.tf_vs_cntk.nan_mismatch:
                cal.outputs[name].nan_mismatches += 1

    test = settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
                    suppress_health_check=list(HealthCheck), derandomize=False)(
        given(inputs_strategy(engine.domains, edge_values))(prop))
    hyp_seed(seed)(test)()
    for name, errs in per_seed.items():
        cal.outputs[name].seed_max.append(max(errs))
    return per_seed
