"""`tf2cntk calibrate MODEL`: measure the error distribution, propose per-output budgets.

The composed budgets (budgets.py) are derived from the graph and are deliberately generous.
Calibration measures instead: the parity engine evaluates ``seeds`` x ``examples`` inputs drawn
by the same Hypothesis strategy the plugin uses (one seeded run per seed, no shrinking), and
records every example's scaled error per output. The proposal is

  budget = margin x max(max observed error, u)      (u: the output dtype's unit roundoff)

rounded up to two significant digits, printed as ``[tool.tf2cntk.budgets.outputs]`` TOML with
the statistics and the default composed budget in comments, so stdout can be pasted as is.
An output with a non-finite error (shape or NaN/Inf mismatch) gets no proposal: no budget fixes it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pytest_tf2cntk.errors import Tf2CntkError

DEFAULT_MARGIN = 10.0
DEFAULT_SEEDS = 5
DEFAULT_EXAMPLES = 40


@dataclass
class OutputCalibration:
    output: str
    errors: list[float]  # every example's scaled error, all seeds
    seed_max: list[float]  # worst error of each seed: how stable the maximum is
    default_budget: float  # composed from the graph with default settings
    configured_budget: float  # what the project's [tool.tf2cntk.budgets] gives today
    unit_roundoff: float
    margin: float
    nan_mismatches: int = 0

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
        import numpy as np

        return float(np.quantile(self.finite, q)) if self.finite else math.nan

    @property
    def proposed(self) -> float | None:
        if not self.usable:
            return None
        return round_up(self.margin * max(self.max, self.unit_roundoff))

    def to_json(self) -> dict[str, Any]:
        return {"output": self.output, "n": len(self.errors), "median": self.quantile(0.5),
                "p99": self.quantile(0.99), "max": self.max, "seed_max": self.seed_max,
                "default_budget": self.default_budget, "configured_budget": self.configured_budget,
                "unit_roundoff": self.unit_roundoff, "margin": self.margin, "proposed": self.proposed,
                "nan_mismatches": self.nan_mismatches}


@dataclass
class Calibration:
    model: str
    device: str
    batch: int
    seeds: int
    examples: int  # per seed
    margin: float
    outputs: dict[str, OutputCalibration] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def evaluations(self) -> int:
        return max((len(o.errors) for o in self.outputs.values()), default=0)

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
        widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
        lines += ["# " + "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in table]
        for o in self.outputs.values():
            if not o.usable:
                lines.append(f"# {o.output}: no proposal: {len(o.errors) - len(o.finite)} example(s) with a "
                             f"shape mismatch, {o.nan_mismatches} with NaN/Inf mismatches; no budget fixes that")
            elif o.max > o.configured_budget:
                lines.append(f"# {o.output}: max observed {o.max:.3g} is over today's budget "
                             f"{o.configured_budget:.3g}: this output fails now")
        lines += ["#", "# Paste into pyproject.toml (merge keys if the table exists). Output budgets apply to every",
                  "# model with an output of that name; per test: @pytest.mark.tf2cntk(budgets={'outputs': {...}})",
                  "[tool.tf2cntk.budgets.outputs]"]
        lines += [f"{json.dumps(name)} = {value:.2g}" for name, value in self.overrides().items()]
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "device": self.device, "batch": self.batch, "seeds": self.seeds,
                "examples": self.examples, "margin": self.margin, "seconds": self.seconds,
                "outputs": {k: v.to_json() for k, v in self.outputs.items()}, "overrides": self.overrides()}


def round_up(x: float, digits: int = 2) -> float:
    """``x`` rounded up to ``digits`` significant digits (a budget must not shrink when printed)."""
    if x <= 0 or not math.isfinite(x):
        return x
    q = 10.0 ** (math.floor(math.log10(x)) - digits + 1)
    return float(f"{math.ceil(x / q - 1e-9) * q:.{digits}g}")


def calibrate(model: str | os.PathLike, *, device: str = "cpu", batch: int = 1, seeds: int = DEFAULT_SEEDS,
              examples: int = DEFAULT_EXAMPLES, margin: float = DEFAULT_MARGIN, opset: int = 9,
              signature: str | None = None, unsafe_load: bool = False, cache_dir: str | os.PathLike | None = None,
              cntk_python: str | None = None, budgets: dict[str, Any] | None = None,
              inputs: dict[str, tuple[float, float]] | None = None, edge_values: bool = False,
              progress: Callable[[str], None] | None = None) -> Calibration:
    """Evaluate ``seeds`` x ``examples`` Hypothesis inputs and collect each output's errors.

    ``budgets``/``inputs``: the project's ``[tool.tf2cntk.budgets]`` / ``[tool.tf2cntk.inputs]``,
    so the inputs match the tests' and the "configured" column shows today's budget.
    """
    import numpy as np
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hyp_seed

    from pytest_tf2cntk.parity.budgets import BudgetConfig, output_budgets
    from pytest_tf2cntk.convert.pipeline import convert
    from pytest_tf2cntk.parity.inputs import inputs_strategy, materialize
    from pytest_tf2cntk.parity.engine import ParityEngine

    if seeds < 1 or examples < 1 or margin <= 0:
        raise Tf2CntkError(f"calibrate needs seeds >= 1, examples >= 1 and margin > 0 (got {seeds}, {examples}, "
                           f"{margin})")
    started = time.perf_counter()
    conv = convert(model, batch=batch, opset=opset, signature=signature, unsafe_load=unsafe_load,
                   cache_dir=cache_dir)
    configured = BudgetConfig.from_mapping(budgets)
    engine = ParityEngine(conv, device, configured, inputs, cntk_python)
    dtypes = {o.name: np.dtype(o.dtype) for o in conv.outputs}
    defaults = output_budgets(conv.onnx_model, BudgetConfig(), dtypes)
    cal = Calibration(str(model), engine.device, batch, seeds, examples, margin)
    for name, b in engine.budgets.items():
        cal.outputs[name] = OutputCalibration(name, [], [], defaults[name].value, b.value, b.unit_roundoff, margin)
    strategy = inputs_strategy(engine.domains, edge_values)
    per_seed: dict[str, list[float]] = {}

    def prop(recipes: dict[str, Any]) -> None:
        ev = engine.evaluate(materialize(recipes, engine.domains))
        for name, check in ev.checks.items():
            cal.outputs[name].errors.append(check.error)
            per_seed.setdefault(name, []).append(check.error)
            if check.target.nan_mismatch:
                cal.outputs[name].nan_mismatches += 1

    try:
        for s in range(seeds):
            per_seed.clear()
            # generate only: nothing fails, so nothing shrinks; no database, so every seed is fresh
            test = settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
                            suppress_health_check=list(HealthCheck), derandomize=False)(given(strategy)(prop))
            hyp_seed(s)(test)()
            for name, errs in per_seed.items():
                cal.outputs[name].seed_max.append(max(errs))
            if progress:
                progress(f"seed {s + 1}/{seeds}: {sum(len(v) for v in per_seed.values()) // max(len(per_seed), 1)} "
                         f"examples, worst " + ", ".join(f"{k} {max(v):.3g}" for k, v in per_seed.items()))
    finally:
        engine.close()
    cal.seconds = time.perf_counter() - started
    return cal


# ---------------------------------------------------------------------------------------------
# CLI: tf2cntk calibrate


def cmd_calibrate(args: argparse.Namespace) -> int:
    from pytest_tf2cntk.history.store import find_rootdir
    from pytest_tf2cntk.options import read_pyproject

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter is not the output
    tool = read_pyproject(find_rootdir()).get("tool", {}).get("tf2cntk", {})
    ranges = {k: (float(v[0]), float(v[1])) for k, v in tool.get("inputs", {}).items()}
    cal = calibrate(args.model, device=args.device, batch=args.batch, seeds=args.seeds, examples=args.examples,
                    margin=args.margin, opset=args.opset, signature=args.signature, unsafe_load=args.unsafe_load,
                    cache_dir=args.cache_dir, cntk_python=args.cntk_python, budgets=tool.get("budgets"),
                    inputs=ranges, edge_values=args.edge_values,
                    progress=lambda m: print(f"tf2cntk calibrate: {m}", file=sys.stderr, flush=True))
    print(cal.to_toml(), end="")
    if args.json:
        Path(args.json).write_text(json.dumps(cal.to_json(), indent=1), "utf-8")
    return 0 if cal.overrides() else 1


def _at_least(low: float, kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if value < low or (kind is float and value <= 0):
            raise argparse.ArgumentTypeError(f"must be {'> 0' if kind is float else f'>= {low}'}")
        return value
    return parse


def register_cli(sub: argparse._SubParsersAction) -> None:
    from pytest_tf2cntk.cli import _add_conversion_args  # same model/conversion options as convert and check

    p = sub.add_parser("calibrate", help="measure a model's error distribution and propose output budgets (TOML)")
    _add_conversion_args(p)
    p.add_argument("--device", default="cpu", help="cpu (default), gpu or gpu:N")
    p.add_argument("--seeds", type=_at_least(1, int), default=DEFAULT_SEEDS,
                   help="Hypothesis seeds, one run each (default %(default)s)")
    p.add_argument("--examples", type=_at_least(1, int), default=DEFAULT_EXAMPLES,
                   help="examples per seed (default %(default)s)")
    p.add_argument("--margin", type=_at_least(0, float), default=DEFAULT_MARGIN,
                   help="proposed budget = margin x max observed error (default %(default)s)")
    p.add_argument("--edge-values", action="store_true", help="also draw zeros, extremes, large and subnormal values")
    p.add_argument("--json", default=None, metavar="FILE", help="also write every statistic as JSON")
    p.set_defaults(func=cmd_calibrate)
