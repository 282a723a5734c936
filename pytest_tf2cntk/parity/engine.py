"""The parity engine: Hypothesis inputs, three backends, budgets, verdict, attribution, reproducers.

TF vs CNTK decides pass/fail against each output's composed budget. TF vs ONNX Runtime (the
converter) and ONNX Runtime vs CNTK (CNTK's importer and runtime) say which stage broke. ORT runs
on the first example, on every failing one and on each output's worst one, not on every example:
it is only needed to attribute, and it would otherwise cost a third of the time.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pytest_tf2cntk.parity.budgets import BudgetConfig, OutputBudget, output_budgets
from pytest_tf2cntk.convert.pipeline import Conversion, convert
from pytest_tf2cntk.convert.domains import InputDomain, derive_domains
from pytest_tf2cntk.parity.inputs import InputRecipe, inputs_strategy, materialize
from pytest_tf2cntk.parity.metrics import Metrics, compare, fraction_over

STAGE_OK = "none"
STAGE_CONVERTER = "converter (TF -> ONNX, tf2onnx)"
STAGE_CNTK = "CNTK importer/runtime (ONNX -> CNTK)"
STAGE_BOTH = "both converter and CNTK"
STAGE_COMBINED = "undetermined: converter and CNTK errors add up, neither alone exceeds the budget"
DEFAULT_MAX_EXAMPLES = 20
MAX_SHRINK_EVALS = 40  # real evaluations spent on shrinking a failure, then it is minimal enough
LAYERWISE_TIME_BUDGET = 120.0  # seconds an automatic localization after a failure may take


def scaled_error(m: Metrics) -> float:
    """max|err| / rms(ref): the quantity budgets bound (see budgets.py)."""
    if not m.shape_ok:
        return float("inf")
    return m.max_abs / m.ref_scale if m.ref_scale > 0 else (0.0 if m.max_abs == 0 else float("inf"))


@dataclass
class OutputCheck:
    """One output on one example: the three comparisons and the verdict."""

    output: str
    budget: OutputBudget
    target: Metrics  # TF vs CNTK
    converter: Metrics | None = None  # TF vs ORT
    importer: Metrics | None = None  # ORT vs CNTK

    @property
    def error(self) -> float:
        return scaled_error(self.target)

    @property
    def reasons(self) -> list[str]:
        t = self.target
        out = []
        if not t.shape_ok:
            out.append("shape differs")
        if not t.dtype_ok:
            out.append("dtype differs")
        if t.nan_mismatch:
            out.append(f"{t.nan_mismatch} NaN/Inf element(s) differ")
        if t.shape_ok and self.error > self.budget.value:
            out.append(f"scaled error {self.error:.3g} > budget {self.budget.value:.3g}")
        return out

    @property
    def passed(self) -> bool:
        return not self.reasons

    @property
    def headroom(self) -> float:
        return self.budget.value / self.error if self.error > 0 else float("inf")

    @property
    def stage(self) -> str:
        if self.passed:
            return STAGE_OK
        if self.converter is None or self.importer is None:
            return "unknown (ONNX Runtime not run)"
        conv_bad = scaled_error(self.converter) > self.budget.value or self.converter.nan_mismatch > 0
        cntk_bad = scaled_error(self.importer) > self.budget.value or self.importer.nan_mismatch > 0 \
            or not self.importer.dtype_ok or not self.importer.shape_ok
        if conv_bad and cntk_bad:
            return STAGE_BOTH
        if not conv_bad and not cntk_bad:
            return STAGE_COMBINED
        return STAGE_CONVERTER if conv_bad else STAGE_CNTK

    def to_json(self) -> dict[str, Any]:
        return {"output": self.output, "passed": self.passed, "reasons": self.reasons,
                "scaled_error": self.error, "budget": self.budget.to_json(), "headroom": self.headroom,
                "stage": self.stage, "tf_vs_cntk": self.target.to_json(),
                "tf_vs_ort": self.converter.to_json() if self.converter else None,
                "ort_vs_cntk": self.importer.to_json() if self.importer else None}


@dataclass
class ParityResult:
    model: str
    device: str
    passed: bool
    outputs: dict[str, OutputCheck]
    examples: int
    seconds: float
    conversion: dict[str, Any]
    inputs: dict[str, str] = field(default_factory=dict)  # recipe of the reported example
    input_domains: dict[str, dict] = field(default_factory=dict)
    reproducer: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    seed: int | None = None
    versions: dict[str, str] = field(default_factory=dict)
    localization: dict[str, Any] | None = None  # layerwise.Localization.to_json()
    layer_rows: list[dict[str, Any]] = field(default_factory=list, repr=False)  # for the history

    @property
    def failing_outputs(self) -> list[OutputCheck]:
        return [c for c in self.outputs.values() if not c.passed]

    def table(self) -> str:
        rows = [("output", "scaled err", "budget", "headroom", "max abs", "at", "max ulp", "cosine",
                 "top-1", "stage")]
        for c in self.outputs.values():
            t = c.target
            rows.append((c.output, f"{c.error:.3g}", f"{c.budget.value:.3g}", f"{c.headroom:.3g}x",
                         f"{t.max_abs:.3g}", str(list(t.max_abs_at)), f"{t.max_ulp:.0f}",
                         f"{t.cosine:.9f}", "-" if t.top1_agreement is None else f"{t.top1_agreement:.0%}",
                         c.stage))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows)

    def __str__(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        lines = [f"tf2cntk parity {verdict}: {self.model} on {self.device} "
                 f"({self.examples} examples, {self.seconds:.1f} s)", self.table()]
        for c in self.failing_outputs:
            lines.append(f"output '{c.output}' failed: {'; '.join(c.reasons)}")
            lines.append(f"  budget {c.budget.explain()}")
            lines.append(f"  worst element {list(c.target.max_abs_at)}: |err| {c.target.max_abs:.3g} "
                         f"(output rms {c.target.ref_scale:.3g}); {c.target.frac_over:.2%} of elements "
                         "over budget")
            if c.converter and c.importer:
                lines.append(f"  stage: {c.stage}  [TF vs ORT {scaled_error(c.converter):.3g}, "
                             f"ORT vs CNTK {scaled_error(c.importer):.3g}]")
        if not self.passed and self.inputs:
            lines.append("input: " + "; ".join(f"{k}: {v}" for k, v in self.inputs.items()))
        if self.localization:
            lines.append(f"layerwise: {self.localization.get('summary', '')}")
            table = self.localization.get("table")
            if table:
                lines.extend("  " + ln for ln in str(table).splitlines())
        if self.reproducer:
            lines.append(f"reproducer: {self.reproducer}\n  replay: tf2cntk replay {self.reproducer}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "device": self.device, "passed": self.passed,
                "examples": self.examples, "seconds": self.seconds, "conversion": self.conversion,
                "outputs": {k: v.to_json() for k, v in self.outputs.items()}, "inputs": self.inputs,
                "input_domains": self.input_domains, "reproducer": self.reproducer,
                "timings": self.timings, "seed": self.seed, "versions": self.versions,
                "localization": self.localization}


class _ExampleFailed(Exception):
    def __init__(self, key: tuple) -> None:
        super().__init__("parity example failed")
        self.key = key


@dataclass
class Evaluation:
    feeds: dict[str, np.ndarray]
    tf: dict[str, np.ndarray]
    cntk: dict[str, np.ndarray]
    checks: dict[str, OutputCheck]
    ort: dict[str, np.ndarray] | None = None

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks.values())


class ParityEngine:
    """Runs one converted model on one device through the three backends."""

    def __init__(self, conversion: Conversion, device: str = "cpu", budgets: BudgetConfig | None = None,
                 input_ranges: dict[str, tuple[float, float]] | None = None,
                 cntk_python: str | None = None, worker: Any = None, cntk_onnx: str | None = None,
                 triage: str = "failures", allow_tf32: bool = False) -> None:
        from pytest_tf2cntk.devices import normalize_device
        from pytest_tf2cntk.parity.runners import CNTKRunner, TFRunner

        self.conversion = conversion
        self.device = normalize_device(device)
        self.config = budgets or BudgetConfig()
        onnx_model = conversion.onnx_model
        self.domains: dict[str, InputDomain] = derive_domains(onnx_model, input_ranges)
        dtypes = {o.name: np.dtype(o.dtype) for o in conversion.outputs}
        self.budgets = output_budgets(onnx_model, self.config, dtypes)
        self.triage = triage
        self.timings = {"tf": 0.0, "cntk": 0.0, "ort": 0.0, "compare": 0.0, "inputs": 0.0}
        self.tf = TFRunner(conversion.tf_model, self.device, allow_tf32)
        self.cntk = CNTKRunner(Path(cntk_onnx or conversion.onnx_path), self.device, cntk_python, worker,
                               {o.name: o.dtype for o in conversion.outputs})
        self.cntk_onnx = str(cntk_onnx or conversion.onnx_path)
        self._ort: Any = None
        self._ort_device = self.device

    @property
    def ort(self) -> Any:
        if self._ort is None:
            from pytest_tf2cntk.errors import DeviceUnavailable
            from pytest_tf2cntk.parity.runners import OrtRunner

            try:
                self._ort = OrtRunner(self.conversion.onnx_model, self._ort_device)
            except DeviceUnavailable:  # ORT is a referee: fall back to CPU rather than skip
                self._ort = OrtRunner(self.conversion.onnx_model, "cpu")
        return self._ort

    def evaluate(self, feeds: dict[str, np.ndarray], with_ort: bool = False) -> Evaluation:
        t0 = time.perf_counter()
        pending = self.cntk.submit(feeds)  # CNTK computes while TF does
        tf_out = self.tf.run(feeds)
        t1 = time.perf_counter()
        cntk_out = self.cntk.result(pending)
        t2 = time.perf_counter()
        self.timings["tf"] += t1 - t0
        self.timings["cntk"] += t2 - t1
        checks = {}
        for name, ref in tf_out.items():
            got = cntk_out.get(name)
            if got is None:
                got = np.full((0,), np.nan, np.float32)
            check = OutputCheck(name, self.budgets[name], compare(ref, got))
            check.target.frac_over = (fraction_over(ref, got, check.budget.value * check.target.ref_scale, 0.0)
                                      if check.target.shape_ok else 1.0)
            checks[name] = check
        ev = Evaluation(feeds, tf_out, cntk_out, checks)
        self.timings["compare"] += time.perf_counter() - t2
        if with_ort or not ev.passed or self.triage == "always":
            self.attribute(ev)
        return ev

    def attribute(self, ev: Evaluation) -> None:
        t0 = time.perf_counter()
        ev.ort = self.ort.run(ev.feeds)
        self.timings["ort"] += time.perf_counter() - t0
        for name, c in ev.checks.items():
            if name in ev.ort:
                c.converter = compare(ev.tf[name], ev.ort[name])
                if name in ev.cntk:
                    c.importer = compare(ev.ort[name], ev.cntk[name])

    def localize(self, result: ParityResult, feeds: dict[str, np.ndarray],
                 time_budget_s: float | None) -> None:
        """Attach the layerwise localization of ``feeds`` to ``result`` (never raises)."""
        from pytest_tf2cntk.parity.localize.scan import localize

        started = time.perf_counter()
        try:
            loc = localize(self.conversion, feeds, cntk_onnx=self.cntk_onnx, device=self.device,
                           budgets=self.config, worker=self.cntk.worker, time_budget_s=time_budget_s,
                           stop_at_culprit=not result.passed)
        except Exception as exc:  # localization is a diagnosis: it must not hide the verdict
            result.localization = {"summary": f"localization failed: {type(exc).__name__}: {exc}"}
            return
        result.localization = loc.to_json()
        result.localization["table"] = loc.table(5)
        result.layer_rows = loc.history_rows(result.model, result.device)
        self.timings["layerwise"] = time.perf_counter() - started

    def run(self, max_examples: int = DEFAULT_MAX_EXAMPLES, seed: int | None = None,
            derandomize: bool = False, database: Any = None, edge_values: bool = False,
            allow_nonfinite: bool = False, reproducer_dir: str | os.PathLike | None = None,
            progress: Callable[[int, int], None] | None = None,
            layerwise: str = "on-failure") -> ParityResult:
        """``layerwise``: "on-failure" (localize a failure within LAYERWISE_TIME_BUDGET),
        "always" (also the worst passing example, no time limit) or "off"."""
        from hypothesis import HealthCheck, Phase, given, settings
        from hypothesis import seed as hyp_seed

        started = time.perf_counter()
        strategy = inputs_strategy(self.domains, edge_values, allow_nonfinite)
        worst: dict[str, tuple[float, dict[str, InputRecipe], OutputCheck]] = {}
        failures: dict[tuple, tuple[dict[str, InputRecipe], Evaluation]] = {}
        state = {"evals": 0, "shrink_evals": 0}

        def key_of(recipes: dict[str, InputRecipe]) -> tuple:
            return tuple(sorted((k, tuple(v.__dict__.values())) for k, v in recipes.items()))

        def prop(recipes: dict[str, InputRecipe]) -> None:
            key = key_of(recipes)
            if key not in failures:
                evaluate(key, recipes)
            if key in failures:  # one raise site: Hypothesis tells failures apart by origin
                raise _ExampleFailed(key)

        def evaluate(key: tuple, recipes: dict[str, InputRecipe]) -> None:
            if failures and state["shrink_evals"] >= MAX_SHRINK_EVALS:
                return  # shrinking budget spent: the smallest failure so far is the answer
            t0 = time.perf_counter()
            feeds = materialize(recipes, self.domains)
            self.timings["inputs"] += time.perf_counter() - t0
            ev = self.evaluate(feeds, with_ort=state["evals"] == 0)
            state["evals"] += 1
            if failures:
                state["shrink_evals"] += 1
            elif progress:
                progress(state["evals"], max_examples)
            for name, c in ev.checks.items():
                # keep the worst passing example per output, but a failing one always wins
                held = worst.get(name)
                if held is None or (held[2].passed and (not c.passed or c.error > held[0])):
                    worst[name] = (c.error, recipes, c)
            if not ev.passed:
                failures[key] = (recipes, ev)

        phases = [Phase.explicit, Phase.generate, Phase.shrink]
        if database is not None:
            phases.insert(1, Phase.reuse)
        test = settings(max_examples=max_examples, deadline=None, derandomize=derandomize,
                        database=database, phases=phases, suppress_health_check=list(HealthCheck),
                        report_multiple_bugs=False, print_blob=False)(given(strategy)(prop))
        # separate example databases per model and device
        test.hypothesis.inner_test._hypothesis_internal_add_digest = (  # type: ignore[attr-defined]
            f"{self.conversion.key}:{self.device}".encode())
        if seed is not None and not derandomize:
            test = hyp_seed(seed)(test)
        failed_key = None
        from hypothesis.reporting import with_reporter

        with with_reporter(lambda _msg: None):  # our own report replaces Hypothesis' printout
            try:
                test()
            except _ExampleFailed as exc:
                failed_key = exc.key
        if failed_key is None:
            # plain uniform noise over each whole domain, the input most conversion bugs show on,
            # whatever the generated examples explored (after them, so their failures still shrink)
            full_range = {name: InputRecipe("uniform", 0, 0.0, 1.0, "none", 0.0) for name in self.domains}
            key = key_of(full_range)
            if key not in failures:
                evaluate(key, full_range)
            failed_key = key if key in failures else None
        if failed_key is not None:
            recipes, ev = failures[failed_key]
            checks = ev.checks
            if ev.ort is None:
                self.attribute(ev)
        else:
            checks = {}
            for name, (_err, recipes_w, check) in worst.items():
                checks[name] = check
                if check.converter is None:  # one more ORT run, on this output's worst example
                    ev = self.evaluate(materialize(recipes_w, self.domains), with_ort=True)
                    check.converter, check.importer = ev.checks[name].converter, ev.checks[name].importer
            recipes = next(iter(worst.values()))[1] if worst else {}
        result = ParityResult(
            model=str(self.conversion.source), device=self.device,
            passed=failed_key is None and all(c.passed for c in checks.values()), outputs=checks,
            examples=state["evals"], seconds=time.perf_counter() - started,
            conversion=conversion_summary(self.conversion, self.cntk_onnx),
            inputs={k: v.describe(self.domains.get(k)) for k, v in recipes.items()},
            input_domains={k: d.to_json() for k, d in self.domains.items()},
            timings=dict(self.timings), seed=seed, versions=versions())
        if failed_key is not None:
            from pytest_tf2cntk.parity.reproducer import write_reproducer

            result.reproducer = str(write_reproducer(result, failures[failed_key][1], reproducer_dir,
                                                     self.conversion, self.cntk_onnx))
            if layerwise != "off":
                self.localize(result, failures[failed_key][1].feeds, LAYERWISE_TIME_BUDGET
                              if layerwise == "on-failure" else None)
        elif layerwise == "always" and recipes:
            self.localize(result, materialize(recipes, self.domains), None)
        return result

    def close(self) -> None:
        self.cntk.close()


def conversion_summary(conv: Conversion, cntk_onnx: str | None = None) -> dict[str, Any]:
    return {"onnx": str(conv.onnx_path), "cntk_onnx": cntk_onnx or str(conv.onnx_path),
            "batch": conv.batch, "opset": conv.opset, "ops": conv.ops, "passes": conv.passes,
            "warnings": conv.warnings, "from_cache": conv.from_cache, "key": conv.key}


def versions() -> dict[str, str]:
    from pytest_tf2cntk.convert.cache import host_versions

    out = host_versions()
    try:
        from pytest_tf2cntk.cntk.client import get_worker

        info = get_worker().ping()
        out["cntk"] = str(info.get("cntk", ""))
        out["cntk_numpy"] = str(info.get("numpy", ""))
        out["cntk_python"] = str(info.get("python", ""))
    except Exception:
        pass
    return out


def check_parity(model_path: str | os.PathLike, device: str = "cpu", max_examples: int = DEFAULT_MAX_EXAMPLES,
                 *, batch: int = 1, opset: int = 9, seed: int | None = None, derandomize: bool | None = None,
                 budgets: BudgetConfig | dict | None = None, budget_scale: float = 1.0,
                 inputs: dict[str, tuple[float, float]] | None = None, edge_values: bool = False,
                 allow_nonfinite: bool = False, signature: str | None = None, unsafe_load: bool = False,
                 cntk_python: str | None = None, cache_dir: str | os.PathLike | None = None,
                 cntk_onnx: str | os.PathLike | None = None, reproducer_dir: str | os.PathLike | None = None,
                 database: Any = None, triage: str = "failures", layerwise: str = "on-failure",
                 conversion: Conversion | None = None,
                 progress: Callable[[int, int], None] | None = None) -> ParityResult:
    """Convert ``model_path`` and check CNTK against TensorFlow on Hypothesis-generated inputs.

    ``budgets`` takes a BudgetConfig or the ``[tool.tf2cntk.budgets]`` mapping; ``inputs`` maps
    input names to (low, high) value ranges; ``cntk_onnx`` evaluates another ONNX file in CNTK
    (e.g. a hand-patched graph) while TF and ONNX Runtime use the converted one. With
    ``derandomize`` (default: when $CI is set) the examples are the same on every run.
    ``layerwise``: "on-failure" (default), "always" or "off" (see ParityEngine.run).
    """
    if not isinstance(budgets, BudgetConfig):
        budgets = BudgetConfig.from_mapping(budgets, budget_scale)
    elif budget_scale != 1.0:
        budgets = BudgetConfig(budgets.op_ulps, budgets.outputs, budgets.scale * budget_scale, budgets.headroom)
    conv = conversion or convert(model_path, batch=batch, opset=opset, signature=signature,
                                 unsafe_load=unsafe_load, cache_dir=cache_dir)
    if derandomize is None:
        derandomize = bool(os.environ.get("CI")) and seed is None
    engine = ParityEngine(conv, device, budgets, inputs, cntk_python, None,
                          str(cntk_onnx) if cntk_onnx else None, triage)
    try:
        return engine.run(max_examples, seed, derandomize, database, edge_values, allow_nonfinite,
                          reproducer_dir, progress, layerwise=layerwise)
    finally:
        engine.close()
