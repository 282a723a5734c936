"""The parity engine: one converted model on one device through the backends, judged per output.

With a float64 twin, CNTK's error against its truth is judged against the float32 noise of
TF32 and ONNX Runtime (``truth``), on each example and over the run; without one, TF vs CNTK
against each output's composed budget. TF vs ONNX Runtime (the converter) and ONNX Runtime vs
CNTK (CNTK's importer and runtime) say which stage broke. ORT runs on the first example, on every
failing one and on each output's worst one, and on all of them before the run-level rule fails
an output: on every example it would cost a third of the time.

``run`` is three steps (after Polygraphy's comparator): the search for a failing input
(``search``), the verdict built from what it kept, and the diagnosis of a failure (reproducer,
layerwise localization).
"""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pytest_tf2cntk.convert.domains import InputDomain, derive_domains
from pytest_tf2cntk.convert.options import ConversionOptions
from pytest_tf2cntk.convert.pipeline import Conversion, convert
from pytest_tf2cntk.devices import normalize_device
from pytest_tf2cntk.options import default
from pytest_tf2cntk.parity.budgets import BudgetConfig, output_budgets
from pytest_tf2cntk.parity.inputs import materialize
from pytest_tf2cntk.parity.metrics import compare, fraction_over
from pytest_tf2cntk.parity.options import Diagnose, ParityOptions
from pytest_tf2cntk.parity.result import Evaluation, OutputCheck, ParityResult
from pytest_tf2cntk.parity.runners import CNTKRunner, OrtRunner, TFRunner
from pytest_tf2cntk.parity.search import Search, SearchOutcome, add_to_run
from pytest_tf2cntk.parity.truth import PARAM_ROUNDING, error_vs_truth, truth_check
from pytest_tf2cntk.tf_import import tensorflow
from pytest_tf2cntk.versions import host_versions

LAYERWISE_TIME_BUDGET = 120.0  # seconds an automatic localization after a failure may take


class ParityEngine:
    """Runs one converted model on one device through the three backends."""

    def __init__(self, conversion: Conversion, device: str = "cpu", options: ParityOptions | None = None,
                 worker: Any = None) -> None:
        self.conversion = conversion
        self.device = normalize_device(device)
        self.options = options or ParityOptions()
        self.config: BudgetConfig = self.options.budgets
        onnx_model = conversion.onnx_model
        self.domains: dict[str, InputDomain] = derive_domains(onnx_model, self.options.inputs)
        dtypes = {o.name: np.dtype(o.dtype) for o in conversion.outputs}
        self.budgets = output_budgets(onnx_model, self.config, dtypes)
        self.timings = {"tf": 0.0, "cntk": 0.0, "ort": 0.0, "compare": 0.0, "inputs": 0.0}
        self.tf = TFRunner(conversion.tf_model, self.device, self.options.allow_tf32)
        self.cntk_onnx = self.options.cntk_onnx or str(conversion.onnx_path)
        self.cntk = CNTKRunner(Path(self.cntk_onnx), self.device, self.options.cntk_python, worker,
                               {o.name: o.dtype for o in conversion.outputs})
        self._ort: OrtRunner | None = None
        self.twin, self.reference = self._reference()

    def _reference(self) -> tuple[Any, str]:
        """The float64 twin and what it is; or None and why there is none (the a-priori budget)."""
        if self.options.reference == "off":
            return None, "none: --tf2cntk-reference=off"
        t0 = time.perf_counter()
        twin = self.conversion.float64_twin()
        self.timings["twin_build"] = time.perf_counter() - t0
        return (twin, f"float64 twin: {twin.label}") if twin else (None, f"none: {twin}")

    @property
    def ort(self) -> OrtRunner:
        if self._ort is None:
            self._ort = OrtRunner(self.conversion.onnx_model, self.device)
        return self._ort

    # -- one example ---------------------------------------------------------------------------

    def evaluate(self, feeds: dict[str, np.ndarray], with_ort: bool = False) -> Evaluation:
        t0 = time.perf_counter()
        pending = self.cntk.submit(feeds)  # CNTK computes while TF and the float64 twin do
        tf_out = self.tf.run(feeds)
        t1 = time.perf_counter()
        truth = self._truth(feeds)
        t2 = time.perf_counter()
        cntk_out = self.cntk.result(pending)
        t3 = time.perf_counter()
        self.timings["tf"] += t1 - t0
        self.timings["twin"] = self.timings.get("twin", 0.0) + t2 - t1
        self.timings["cntk"] += t3 - t2
        checks = {name: self._check(name, ref, cntk_out.get(name), truth) for name, ref in tf_out.items()}
        ev = Evaluation(feeds, tf_out, cntk_out, checks, truth=truth)
        self.timings["compare"] += time.perf_counter() - t3
        shared_truth = self.twin is not None and not self.twin.independent  # ORT is the noise then
        if with_ort or not ev.passed or shared_truth or self.options.triage is Diagnose.ALWAYS:
            self.attribute(ev)
        return ev

    def _truth(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
        """The float64 twin's outputs; a twin that fails at run time hands over to the budget."""
        if self.twin is None:
            return None
        try:
            if self.device == "cpu" or not self.twin.independent:
                return self.twin.run(feeds)
            tf = tensorflow()

            with tf.device("/CPU:0"):  # the truth never depends on a GPU's kernels (TF32, cuDNN's choices)
                return self.twin.run(feeds)
        except Exception as exc:
            self.twin, self.reference = None, f"none: the float64 twin failed at run time ({type(exc).__name__}: " \
                                              f"{str(exc).splitlines()[0][:200] if str(exc) else ''})"
            return None

    def _check(self, name: str, ref: np.ndarray, got: np.ndarray | None,
               truth: dict[str, np.ndarray] | None) -> OutputCheck:
        if got is None:
            got = np.full((0,), np.nan, np.float32)
        check = OutputCheck(name, self.budgets[name], compare(ref, got))
        t = check.tf_vs_cntk
        t.frac_over = fraction_over(ref, got, check.budget.value * t.ref_scale, 0.0) if t.shape_ok else 1.0
        exact = truth is None or name not in truth or ref.dtype.kind != "f" or truth[name].shape != ref.shape
        if not exact and t.shape_ok:
            check.truth = truth_check(self.reference, truth[name], ref, got, factor=self.config.noise_factor,
                                      floor_ulps=self.config.floor_ulps, independent=self.twin.independent)
        return check

    def attribute(self, ev: Evaluation) -> None:
        """ONNX Runtime on the example: the converter's and CNTK's shares of the error."""
        if self.options.triage is Diagnose.OFF:
            return
        t0 = time.perf_counter()
        ev.ort = self.ort.run(ev.feeds)
        self.timings["ort"] += time.perf_counter() - t0
        # the graph in float64 only decides when CNTK is farther than TF32's noise allows
        graph = self._graph_in_float64(ev) if any(c.truth is not None and c.truth.independent
                                                  and c.truth.cntk > c.truth.close for c in ev.checks.values()) else {}
        for name, c in ev.checks.items():
            if name in ev.ort:
                c.tf_vs_ort = compare(ev.tf[name], ev.ort[name])
                if name in ev.cntk:
                    c.ort_vs_cntk = compare(ev.ort[name], ev.cntk[name])
                if c.truth is not None and ev.truth is not None:
                    c.truth.ort32 = error_vs_truth(ev.truth[name], ev.ort[name])
                    if name in graph:
                        c.truth.graph = error_vs_truth(ev.truth[name], graph[name])
                        c.truth.ort32_graph = error_vs_truth(graph[name], ev.ort[name])
        self._parameter_rounding(ev, graph)

    def _parameter_rounding(self, ev: Evaluation, graph: dict[str, np.ndarray]) -> None:
        """Where the converted graph looks off, how much rounding its parameters once more moves
        it: a converter that folds in float32 is not wrong by that much (``TruthCheck.params``)."""
        off = [c for name, c in ev.checks.items()
               if name in graph and c.truth is not None and c.truth.graph is not None and c.truth.graph > c.truth.close]
        if not off:
            return
        perturbed = self._graph_in_float64(ev, PARAM_ROUNDING)
        for c in off:
            if c.output in perturbed:
                c.truth.params = error_vs_truth(graph[c.output], perturbed[c.output])

    def _graph_in_float64(self, ev: Evaluation, perturb: float = 0.0) -> dict[str, np.ndarray]:
        """The converted graph evaluated in float64 on the example ({} where it cannot be): with
        the twin it tells a converter that changed the function from mere float32 rounding."""
        t0 = time.perf_counter()
        try:
            graph = self.conversion.float64_graph(perturb)
            return graph.run(ev.feeds) if graph else {}
        except Exception:  # a diagnosis: without it, ONNX Runtime's distance decides
            return {}
        finally:
            self.timings["graph64"] = self.timings.get("graph64", 0.0) + time.perf_counter() - t0

    # -- a whole check -------------------------------------------------------------------------

    def run(self, progress: Callable[[int, int], None] | None = None, **changes: Any) -> ParityResult:
        """Search, verdict, diagnosis. ``changes`` replace options for this run (e.g. ``seed=3``)."""
        options = dataclasses.replace(self.options, **changes) if changes else self.options
        started = time.perf_counter()
        outcome = Search(self, options, progress).run()
        result = self.verdict(outcome, options, started)
        self.diagnose(result, outcome, options)
        return result

    def verdict(self, outcome: SearchOutcome, options: ParityOptions, started: float) -> ParityResult:
        if outcome.failure is None:
            self.judge_run(outcome, options)
        if outcome.failure is not None:
            recipes, ev = outcome.failure
            checks = ev.checks
            if ev.ort is None:
                self.attribute(ev)
        else:
            checks = {}
            for name, (_severity, recipes_w, check) in outcome.worst.items():
                checks[name] = check
                if check.tf_vs_ort is None and options.triage is not Diagnose.OFF:
                    ev = self.evaluate(materialize(recipes_w, self.domains), with_ort=True)  # its worst example
                    checks[name] = ev.checks[name]  # the same numbers, and ONNX Runtime's
            recipes = next(iter(outcome.worst.values()))[1] if outcome.worst else {}
        for name, check in checks.items():
            check.run = outcome.run.get(name)
        return ParityResult(
            model=str(self.conversion.source), device=self.device,
            passed=outcome.failure is None and all(c.passed for c in checks.values()), outputs=checks,
            examples=outcome.evaluations, seconds=time.perf_counter() - started,
            conversion=self.conversion.summary(self.cntk_onnx),
            inputs={k: v.describe(self.domains.get(k)) for k, v in recipes.items()},
            input_domains=dict(self.domains), timings=dict(self.timings), seed=options.seed,
            versions=self.versions(), reference=self.reference)

    def judge_run(self, outcome: SearchOutcome, options: ParityOptions) -> None:
        """The run-level measured rule (``RunTruth``) on a run whose examples all passed. Before it
        fails an output, ONNX Runtime runs on every example, so that all the float32 noise counts;
        a failure is reported on the example with the largest ratio, as a per-example one is."""
        failing = [name for name, run in outcome.run.items() if not run.passed]
        if not failing:
            return
        if options.triage is not Diagnose.OFF and not all(outcome.run[n].complete for n in failing):
            outcome.run = {}
            for recipes in outcome.examples:
                add_to_run(outcome.run, self.evaluate(materialize(recipes, self.domains), with_ort=True), self.config)
            failing = [name for name, run in outcome.run.items() if not run.passed]
            if not failing:
                return
        recipes = outcome.examples[outcome.run[failing[0]].worst]
        outcome.failure = (recipes, self.evaluate(materialize(recipes, self.domains), with_ort=True))

    def diagnose(self, result: ParityResult, outcome: SearchOutcome, options: ParityOptions) -> None:
        """A reproducer for a failure; a layerwise localization as ``options.layerwise`` asks."""
        if outcome.failure is not None:
            from pytest_tf2cntk.parity.reproducer import write_reproducer

            ev = outcome.failure[1]
            result.reproducer = str(write_reproducer(result, ev, options.reproducer_dir, self.conversion,
                                                     self.cntk_onnx))
            if options.layerwise is not Diagnose.OFF:
                self.localize(result, ev.feeds, LAYERWISE_TIME_BUDGET if options.layerwise is Diagnose.ON_FAILURE
                              else None)
        elif options.layerwise is Diagnose.ALWAYS and outcome.worst:
            recipes = next(iter(outcome.worst.values()))[1]
            self.localize(result, materialize(recipes, self.domains), None)

    def localize(self, result: ParityResult, feeds: dict[str, np.ndarray], time_budget_s: float | None) -> None:
        """Attach the layerwise localization of ``feeds`` to ``result`` (never raises)."""
        from pytest_tf2cntk.parity.localize.report import Localization
        from pytest_tf2cntk.parity.localize.scan import localize

        started = time.perf_counter()
        try:
            result.localization = localize(self.conversion, feeds, cntk_onnx=self.cntk_onnx, device=self.device,
                                           budgets=self.config, worker=self.cntk.worker,
                                           time_budget_s=time_budget_s, stop_at_culprit=not result.passed)
        except Exception as exc:  # localization is a diagnosis: it must not hide the verdict
            result.localization = Localization(result.model, result.device, str(self.conversion.onnx_path),
                                               self.cntk_onnx, [], error=f"{type(exc).__name__}: {exc}")
        result.timings["layerwise"] = time.perf_counter() - started

    def versions(self) -> dict[str, str]:
        """Both sides' versions (the CNTK side's as the worker reports them)."""
        out = host_versions()
        try:
            out.update(self.cntk.worker.versions())
        except Exception:  # a dead worker: its versions are unknown, the result still stands
            pass
        return out

    def close(self) -> None:
        self.cntk.close()


_P, _C = ParityOptions(), ConversionOptions()  # the defaults, from the option table


def check_parity(model_path: str | os.PathLike, device: str = "cpu", max_examples: int = _P.max_examples, *,
                 batch: int = _C.batch, opset: int = _C.opset, signature: str | None = _C.signature,
                 unsafe_load: bool = _C.unsafe_load, cache_dir: str | os.PathLike | None = _C.cache_dir,
                 input_shapes: Any = _C.input_shapes, repairs: str | bool = _C.repairs,
                 imports: Any = _C.imports,
                 seed: int | None = _P.seed, derandomize: bool | None = None, reference: str = _P.reference,
                 budgets: BudgetConfig | dict | None = None, budget_scale: float = default("budget_scale"),
                 inputs: dict[str, tuple[float, float]] | None = None, edge_values: bool = _P.edge_values,
                 allow_nonfinite: bool = _P.allow_nonfinite, cntk_python: str | None = _P.cntk_python,
                 cntk_onnx: str | os.PathLike | None = _P.cntk_onnx,
                 reproducer_dir: str | os.PathLike | None = None, database: Any = _P.database,
                 triage: Diagnose | str = _P.triage, layerwise: Diagnose | str | bool = _P.layerwise,
                 conversion: Conversion | None = None,
                 progress: Callable[[int, int], None] | None = None) -> ParityResult:
    """Convert ``model_path`` and check CNTK against TensorFlow on Hypothesis-generated inputs.

    ``budgets`` takes a BudgetConfig or the ``[tool.tf2cntk.budgets]`` mapping; ``inputs`` maps
    input names to (low, high) value ranges; ``cntk_onnx`` evaluates another ONNX file in CNTK
    (e.g. a hand-patched graph) while TF and ONNX Runtime use the converted one; ``input_shapes``
    fixes free input dimensions ({"image": (64, 64, 3)}, without the batch); ``repairs`` "off"
    converts without the CNTK repairs (``convert.repairs``); ``imports`` names the modules that register the
    model's custom Keras layers (imported before it loads). With
    ``derandomize`` (default: when $CI is set and no seed is given) the examples are the same on
    every run. ``triage``/``layerwise``: "off", "on-failure" or "always" (``Diagnose``).
    """
    if derandomize is None:
        derandomize = bool(os.environ.get("CI")) and seed is None
    options = ParityOptions.build(budgets=budgets, budget_scale=budget_scale, triage=triage, layerwise=layerwise,
                                  reproducer_dir=reproducer_dir, cntk_onnx=cntk_onnx, max_examples=max_examples,
                                  seed=seed, derandomize=derandomize, reference=reference, inputs=dict(inputs or {}),
                                  edge_values=edge_values, allow_nonfinite=allow_nonfinite, cntk_python=cntk_python,
                                  database=database)
    conv = conversion or convert(model_path, batch=batch, opset=opset, signature=signature,
                                 unsafe_load=unsafe_load, cache_dir=cache_dir, input_shapes=input_shapes,
                                 repairs=repairs, imports=imports)
    return run_check(conv, device, options, progress)


def run_check(conversion: Conversion, device: str, options: ParityOptions,
              progress: Callable[[int, int], None] | None = None) -> ParityResult:
    """One parity check of a converted model: the engine made, run and closed."""
    engine = ParityEngine(conversion, device, options)
    try:
        return engine.run(progress)
    finally:
        engine.close()
