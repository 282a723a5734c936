"""Fidelity of the parity verdict: false alarms on correct conversions, detection of planted bugs.

    .venv/bin/python benchmarks/fidelity.py [--quick] [--models mlp,cnn_bn] [--seeds N] [--examples N]
                                            [--targets N] [--weight-targets N] [--out-dir DIR]
    .venv/bin/python benchmarks/fidelity.py --report-only results/fidelity.json

The engine's verdict is the measured rule (docs/budgets.md): per example and output, CNTK's error
against a float64 twin of the model must stay within 10x the float32 noise, noise = max(TF32's
error, ORT32's error, a floor of 8 units of rounding); over the run, the median of those ratios
within 2.5. Five verdicts judge exactly the same TF / CNTK outputs:

  engine            the measured verdict (each example, and the run-level rule over a run's
                    examples or over the fixed inputs)
  a-priori budget   the composed budget on the same evaluation (the fallback without a twin):
                    fails on a shape/dtype/NaN mismatch or TF-vs-CNTK scaled error > budget
  Polygraphy        an element fails if |a-b| > 1e-5 AND |a-b|/|b| > 1e-5
  torch fp32        fails if |a-b| > 1e-5 + 1.3e-6*|b| (or the dtypes differ)
  tf2onnx tests     fails if |a-b| > 1e-5 + 1e-7*|b|             (b = TF, the reference)

Models: every fixture of fixtures/manifest.json with ``cntk_batches`` (batch 4 where CNTK takes it,
else the first listed), MobileNetV2 96x96 and ResNet50 64x64 (tests/support/zoo.py), each raw and
with calibrated BatchNorm statistics (no ResNet50 in --quick). A model counts as ill-conditioned
when TF32's own error against the twin reaches 1e-5 on some example: measured here, not listed.

(a) False alarms. One conversion per model, many Hypothesis seeds, each seed one
    ``ParityEngine.run`` (a run). Every evaluation the engine makes is captured and judged by the
    five verdicts; ONNX Runtime is also run on every example, beside the engine and outside its
    verdict, to report ORT32's noise. A run is a false alarm for a verdict if any of its
    examples is flagged. Per model: the twin's route, TF32's noise range, the worst ratio CNTK
    error / noise of the correct conversion (how close it came to the factor 10), ORT32's worst
    noise, the a-priori budget, and every flagged example's numbers.

(b) Detection. The CNTK-bound ONNX is mutated the way conversion bugs look
    (tests/support/faults.fidelity_faults: weight x(1+d) for d = 1e-2, 1e-3, 1e-4, bias shift,
    activation parameter, pad shift, transpose swap, dropped node); TF, ONNX Runtime and the twin
    keep the correct model. Each mutation gets the engine's own Hypothesis run
    (``ParityEngine(conv, options=ParityOptions(cntk_onnx=mutated)).run(seed=...)``, what
    ``check_parity(..., cntk_onnx=mutated)`` does) with its stage attribution, and the five
    verdicts on fixed inputs (uniform / normal over each input's whole domain). A mutation is
    inert when CNTK's outputs on the fixed inputs are bit-identical to the unmutated graph's, and
    within the noise when it moves them, on every fixed input, by no more than the correct
    conversion's float32 noise there (TF32 or ORT32 is then farther from the truth than the
    mutation moves CNTK: no sound rule can tell it from rounding). Percentages are over the
    effective mutations (loaded, moving CNTK by more than the noise somewhere), the same
    denominator in every column; both other kinds are counted apart. A graph CNTK refuses counts
    as refused, not as detected.

Known-bad fixtures (manifest: no ``cntk_batches`` but ``cntk_mismatch_batches``: quantized.keras,
CNTK treats Cast-to-int as a pass-through) are a real CNTK bug, reported in their own section.

Writes results/fidelity.{json,md} (results/fidelity_quick.* with --quick); the Markdown is
rendered from the JSON alone. Progress goes to stderr.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.support builds the keras.applications models

import numpy as np
import onnx
from onnx import numpy_helper

from pytest_tf2cntk.convert.pipeline import Conversion, convert
from pytest_tf2cntk.parity import budgets as budgets_mod
from pytest_tf2cntk.parity import truth as truth_mod
from pytest_tf2cntk.parity.engine import ParityEngine
from pytest_tf2cntk.parity.inputs import InputRecipe, materialize
from pytest_tf2cntk.parity.options import Diagnose, ParityOptions
from pytest_tf2cntk.parity.result import STAGE_CNTK, Evaluation, OutputCheck, ParityResult
from pytest_tf2cntk.parity.search import add_to_run
from pytest_tf2cntk.parity.truth import RunTruth, error_vs_truth
from tests.support.faults import FIDELITY_KINDS as KINDS
from tests.support.faults import Fault, fidelity_faults, sample_fidelity

FIXTURES = ROOT / "fixtures"
RESULTS = Path(__file__).resolve().parent / "results"
OFF = Diagnose.OFF
RULES = ("polygraphy", "torch", "tf2onnx")  # the reference rules
VERDICTS = ("engine", "budget") + RULES
TITLES = {"engine": "engine", "budget": "a-priori budget", "polygraphy": "Polygraphy default",
          "torch": "torch fp32", "tf2onnx": "tf2onnx tests"}
RULE_TEXT = {"budget": "fail on shape/dtype/NaN mismatch or TF-vs-CNTK scaled error > composed budget",
             "polygraphy": "fail if |a-b| > 1e-5 and |a-b|/|b| > 1e-5 (elementwise)",
             "torch": "fail if |a-b| > 1e-5 + 1.3e-6*|b| (or dtype differs)",
             "tf2onnx": "fail if |a-b| > 1e-5 + 1e-7*|b|"}
ILL_CONDITIONED = 1e-5  # worst TF32 error vs the twin from which a model counts as ill-conditioned
RUN_FACTOR_TEXT = f"{truth_mod.RUN_FACTOR:g}"
TARGETS = {"weight 1e-3": 0.99, "weight 1e-4": 0.90}  # detection targets over effective mutations
MAX_DETAILS = 5  # flagged examples kept per run: a-priori budget only (engine false alarms: 4x as many)


def log(msg: str) -> None:
    print(f"[fidelity {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# the five verdicts on one evaluation


def rule_flags(ref: np.ndarray, got: np.ndarray) -> dict[str, bool]:
    """Would each reference rule flag this output pair? (True = reported as a mismatch)."""
    ref, got = np.asarray(ref), np.asarray(got)
    if ref.shape != got.shape:
        return {r: True for r in RULES}
    r = ref.astype(np.float64)
    g = got.astype(np.float64)
    nonfinite = bool(np.any(np.isfinite(r) != np.isfinite(g)) or
                     np.any(~np.isfinite(r) & ~((r == g) | (np.isnan(r) & np.isnan(g)))))
    with np.errstate(invalid="ignore", over="ignore"):
        absd = np.where(np.isfinite(r) & np.isfinite(g), np.abs(g - r), 0.0)
        absr = np.abs(np.where(np.isfinite(r), r, 0.0))
        # Polygraphy adds machine epsilon to zero reference values before dividing
        rel = absd / np.where(absr == 0, 2.220446049250313e-16, absr)
    return {"polygraphy": nonfinite or bool(np.any((absd > 1e-5) & (rel > 1e-5))),
            "torch": nonfinite or ref.dtype != got.dtype or bool(np.any(absd > 1e-5 + 1.3e-6 * absr)),
            "tf2onnx": nonfinite or bool(np.any(absd > 1e-5 + 1e-7 * absr))}


def apriori_flag(c: OutputCheck) -> bool:
    """The composed a-priori budget on this output, whatever rule the engine used."""
    t = c.tf_vs_cntk
    return not t.shape_ok or not t.dtype_ok or t.nan_mismatch > 0 or t.scaled_error > c.budget.value


def output_numbers(c: OutputCheck, ort32: float | None) -> dict[str, Any]:
    """One output's numbers: errors vs the twin, the noise, the budget, TF vs CNTK."""
    t, tr = c.tf_vs_cntk, c.truth
    row: dict[str, Any] = {"rule": c.rule, "passed": c.passed, "budget_flag": apriori_flag(c),
                           "err_tf": t.scaled_error, "budget": c.budget.value, "max_abs": t.max_abs,
                           "rms": t.ref_scale, "tf32": None, "cntk": None, "floor": None, "noise": None,
                           "ratio": None, "graph": None, "ort32_engine": None}
    if tr is not None:
        row.update(tf32=tr.tf32, cntk=tr.cntk, floor=tr.floor, noise=tr.noise, ratio=tr.ratio,
                   graph=tr.graph, ort32_engine=tr.ort32)
    row["ort32"] = ort32 if ort32 is not None else row["ort32_engine"]
    return row


def run_flag(evs: list[Evaluation]) -> tuple[bool, float | None]:
    """The run-level rule over these evaluations (ONNX Runtime ran on each): failed?, largest median."""
    run: dict[str, RunTruth] = {}
    for ev in evs:
        add_to_run(run, ev, budgets_mod.BudgetConfig())
    applied = [r for r in run.values() if r.applies]
    return any(not r.passed for r in applied), max((r.median for r in applied), default=None)


def judge(ev: Evaluation, ort32: dict[str, float] | None = None) -> dict[str, Any]:
    """All five verdicts on one evaluation (True = flagged) and every output's numbers."""
    outs = {n: output_numbers(c, (ort32 or {}).get(n)) for n, c in ev.checks.items()}
    flags = {"engine": not ev.passed, "budget": any(o["budget_flag"] for o in outs.values())}
    ref = [rule_flags(ev.tf[n], ev.cntk.get(n, np.zeros(0, np.float32))) for n in ev.tf]
    flags.update({r: any(f[r] for f in ref) for r in RULES})
    return {"flags": flags, "outputs": outs}


def ort_errors(engine: ParityEngine, ev: Evaluation) -> dict[str, float]:
    """ORT32's error vs the twin on this example (ONNX Runtime run here if the engine did not)."""
    if ev.truth is None:
        return {}
    ort = ev.ort if ev.ort is not None else engine.ort.run(ev.feeds)
    return {n: error_vs_truth(ev.truth[n], ort[n]) for n, c in ev.checks.items()
            if c.truth is not None and n in ort and n in ev.truth}


def describe_feeds(feeds: dict[str, np.ndarray]) -> dict[str, str]:
    out = {}
    for name, v in feeds.items():
        a = np.asarray(v)
        fin = a[np.isfinite(a)] if a.dtype.kind == "f" else a
        out[name] = (f"{a.dtype}{list(a.shape)} min {fin.min():.4g} max {fin.max():.4g} mean {fin.mean():.4g}"
                     if fin.size else f"{a.dtype}{list(a.shape)}")
    return out


@contextlib.contextmanager
def capture(engine: ParityEngine, sink: list[dict[str, Any]], measure_ort: bool = False):
    """Judge every evaluation the engine makes (Hypothesis examples, shrinks, triage) as it goes;
    ``measure_ort`` runs ONNX Runtime on each (without touching the engine's verdict)."""
    original = engine.evaluate

    def evaluate(feeds: dict[str, np.ndarray], with_ort: bool = False) -> Evaluation:
        ev = original(feeds, with_ort)
        judged = judge(ev, ort_errors(engine, ev) if measure_ort else None)
        if judged["flags"]["engine"] or judged["flags"]["budget"]:
            judged["inputs"] = describe_feeds(ev.feeds)
        sink.append(judged)
        return ev

    engine.evaluate = evaluate  # type: ignore[method-assign]
    try:
        yield
    finally:
        del engine.evaluate


# ------------------------------------------------------------------------------------------------
# aggregation of output numbers (over examples, then over runs: min of mins, max of maxes)

STATS: dict[str, tuple[str, Callable[[Iterable[float]], float]]] = {
    "tf32_min": ("tf32", min), "tf32_max": ("tf32", max), "ort32_max": ("ort32", max),
    "cntk_max": ("cntk", max), "floor_min": ("floor", min), "floor_max": ("floor", max),
    "ratio_max": ("ratio", max), "err_tf_max": ("err_tf", max), "budget": ("budget", max),
    "max_abs": ("max_abs", max), "rms_min": ("rms", min)}
WORST_KEYS = ("tf32", "ort32", "ort32_engine", "cntk", "floor", "noise", "ratio", "graph", "err_tf", "budget")


def _stat(values: Iterable[Any], fn: Callable) -> float | None:
    vals = [v for v in values if v is not None]
    return fn(vals) if vals else None


def aggregate_examples(evs: list[dict[str, Any]], seed: int) -> dict[str, dict[str, Any]]:
    """Per output over one run's examples; ``worst`` = the example closest to the factor."""
    out = {}
    for name in evs[0]["outputs"]:
        rows = [e["outputs"][name] for e in evs]
        agg: dict[str, Any] = {k: _stat((r[f] for r in rows), fn) for k, (f, fn) in STATS.items()}
        rated = [(r["ratio"], i) for i, r in enumerate(rows) if r["ratio"] is not None]
        if rated:
            _, i = max(rated)
            agg["worst"] = {"seed": seed, "example": i, **{k: rows[i][k] for k in WORST_KEYS}}
        out[name] = agg
    return out


def merge_runs(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per output over a model's runs."""
    out = {}
    for name in runs[0]["outputs"]:
        aggs = [r["outputs"][name] for r in runs]
        merged: dict[str, Any] = {k: _stat((a[k] for a in aggs), fn) for k, (_f, fn) in STATS.items()}
        worst = [a["worst"] for a in aggs if "worst" in a]
        if worst:
            merged["worst"] = max(worst, key=lambda w: w["ratio"])
        out[name] = merged
    return out


# ------------------------------------------------------------------------------------------------
# models


@dataclass
class ModelSpec:
    name: str
    path: Callable[[], Path]
    batch: int
    full_only: bool = False
    known_bad: bool = False


def _zoo(name: str, calibrated: bool) -> Callable[[], Path]:
    def get() -> Path:
        from tests.support.zoo import application_model, calibrated_model

        return calibrated_model(name) if calibrated else application_model(name)
    return get


def model_specs() -> list[ModelSpec]:
    """The manifest's fixtures (correct ones, then known-bad ones kept apart), then the zoo."""
    manifest = json.loads((FIXTURES / "manifest.json").read_text())["fixtures"]
    specs = []
    for name, fx in manifest.items():
        path = FIXTURES / fx["file"]
        ok, bad = fx.get("cntk_batches") or [], fx.get("cntk_mismatch_batches") or []
        if ok:
            specs.append(ModelSpec(name, lambda p=path: p, 4 if 4 in ok else ok[0]))
        elif bad:  # loads in CNTK but computes the wrong thing at every batch: a real bug
            specs.append(ModelSpec(name, lambda p=path: p, 4 if 4 in bad else bad[0], known_bad=True))
        # else: cannot convert / load at all (gru): nothing to measure here
    for zoo, full_only in (("mobilenetv2_96", False), ("resnet50_64", True)):
        specs.append(ModelSpec(zoo, _zoo(zoo, False), 1, full_only=full_only))
        specs.append(ModelSpec(f"{zoo}_cal", _zoo(zoo, True), 1, full_only=full_only))
    return specs


def graph_fingerprint(model: onnx.ModelProto) -> str:
    """Same ops and the same weights = the same graph for mutation purposes (mlp, .h5, SavedModel)."""
    h = hashlib.sha256()
    for node in model.graph.node:
        h.update(node.op_type.encode())
    for data in sorted(numpy_helper.to_array(t).tobytes() for t in model.graph.initializer):
        h.update(data)
    return h.hexdigest()[:16]


def twin_route(engine: ParityEngine) -> str:
    return engine.twin.route if engine.twin is not None else "none"


# ------------------------------------------------------------------------------------------------
# (a) false alarms


def false_alarm_run(engine: ParityEngine, seed: int, examples: int, tmp: Path) -> dict[str, Any]:
    """One engine.run, every evaluation judged by the five verdicts."""
    evs: list[dict[str, Any]] = []
    with capture(engine, evs, measure_ort=True):
        res = engine.run(max_examples=examples, seed=seed, reproducer_dir=tmp / "repro", layerwise=OFF)
    alarms = [(i, e) for i, e in enumerate(evs) if e["flags"]["engine"]]
    budget_only = [(i, e) for i, e in enumerate(evs) if e["flags"]["budget"] and not e["flags"]["engine"]]
    flagged = {v: any(e["flags"][v] for e in evs) for v in VERDICTS}
    flagged["engine"] = not res.passed  # each example, or the run-level rule over all of them
    run = {"seed": seed, "passed": res.passed, "evaluations": len(evs), "seconds": round(res.seconds, 3),
           "flagged": flagged, "run_ratio": run_ratios(res),
           "flagged_examples": {v: sum(e["flags"][v] for e in evs) for v in VERDICTS},
           "outputs": aggregate_examples(evs, seed),
           "details": [{"example": i, **e} for i, e in alarms[:4 * MAX_DETAILS] + budget_only[:MAX_DETAILS]]}
    if not res.passed:
        run["report"] = str(res)
        run["inputs"] = res.inputs
    return run


def run_ratios(res: ParityResult) -> dict[str, float | None]:
    """Per output: the run's median of CNTK's error / the noise over its examples (the rule allows 2.5)."""
    return {n: (c.run.median if c.run is not None and c.run.applies else None) for n, c in res.outputs.items()}


def false_alarms(spec: ModelSpec, conv: Conversion, seeds: list[int], examples: int,
                 tmp: Path) -> dict[str, Any]:
    engine = ParityEngine(conv)
    runs = []
    try:
        for s in seeds:
            run = false_alarm_run(engine, s, examples, tmp)
            if not run["passed"]:
                log(f"  FALSE ALARM {spec.name} seed {s}:\n{run['report']}")
            runs.append(run)
        reference, route = engine.reference, twin_route(engine)
    finally:
        engine.close()
        shutil.rmtree(tmp / "repro", ignore_errors=True)
    outputs = merge_runs(runs)
    tf32 = _stat((o["tf32_max"] for o in outputs.values()), max)
    return {"model": spec.name, "batch": conv.batch, "reference": reference, "route": route,
            "runs": runs, "outputs": outputs, "n_runs": len(runs),
            "n_examples": sum(r["evaluations"] for r in runs),
            "failed_runs": {v: sum(r["flagged"][v] for r in runs) for v in VERDICTS},
            "failed_examples": {v: sum(r["flagged_examples"][v] for r in runs) for v in VERDICTS},
            "tf32_max": tf32, "ill_conditioned": tf32 is not None and tf32 >= ILL_CONDITIONED,
            "run_ratio_max": _stat((r for run in runs for r in run["run_ratio"].values()), max)}


# ------------------------------------------------------------------------------------------------
# (b) detection


@dataclass
class Baseline:
    """The unmutated conversion on the fixed inputs: CNTK's outputs and the full noise."""

    feeds: list[dict[str, np.ndarray]]
    cntk: list[dict[str, np.ndarray]]
    noise: list[dict[str, float]]  # max(TF32, ORT32, floor) per input and output (ONNX Runtime run)
    scale: list[dict[str, float]]  # rms of the truth (of TF without one) per input and output
    flags: dict[str, bool]  # the five verdicts on the correct conversion (a fixed-input false alarm)


def _rms(a: np.ndarray) -> float:
    a = np.asarray(a, np.float64)
    a = a[np.isfinite(a)]
    return float(np.sqrt(np.mean(np.square(a)))) if a.size else 0.0


def fixed_inputs(engine: ParityEngine, n: int) -> list[dict[str, np.ndarray]]:
    """n input sets over each input's whole domain (uniform and normal alternately), seeded."""
    sets = []
    for k in range(n):
        recipes = {name: InputRecipe("uniform" if k % 2 == 0 else "normal", 7919 * (k + 1) + j,
                                     0.0, 1.0, "none", 0.0) for j, name in enumerate(engine.domains)}
        sets.append(materialize(recipes, engine.domains))
    return sets


def baseline(conv: Conversion, n_fixed: int) -> Baseline:
    engine = ParityEngine(conv)
    try:
        feeds = fixed_inputs(engine, n_fixed)
        evs = [engine.evaluate(f, with_ort=True) for f in feeds]
    finally:
        engine.close()
    judged = [judge(ev) for ev in evs]
    flags = {v: any(j["flags"][v] for j in judged) for v in VERDICTS}
    flags["engine"] = flags["engine"] or run_flag(evs)[0]
    return Baseline(feeds, [ev.cntk for ev in evs],
                    [{n: c.truth.noise for n, c in ev.checks.items() if c.truth is not None} for ev in evs],
                    [{n: _rms(ev.truth[n] if ev.truth and n in ev.truth else ev.tf[n]) for n in ev.tf}
                     for ev in evs],
                    flags)


def output_effect(got: np.ndarray | None, was: np.ndarray | None, scale: float) -> float:
    """max|CNTK mutated - CNTK original| / rms(truth); inf for a shape or NaN/Inf change."""
    if got is None or was is None or got.shape != was.shape:
        return math.inf
    g, w = np.asarray(got, np.float64), np.asarray(was, np.float64)
    fg, fw = np.isfinite(g), np.isfinite(w)
    if np.any(fg != fw) or np.any(~fg & ~((g == w) | (np.isnan(g) & np.isnan(w)))):
        return math.inf
    d = float(np.max(np.abs(g[fg] - w[fg]))) if fg.any() else 0.0
    return d / (scale or 1.0)


def effect_record(evs: list[Evaluation], base: Baseline) -> dict[str, Any]:
    """How much the mutation moved CNTK on the fixed inputs, and how that compares to the noise."""
    effect, over = 0.0, (-1.0, None)  # (effect / noise, noise) at the largest ratio
    for k, ev in enumerate(evs):
        for name in ev.tf:
            e = output_effect(ev.cntk.get(name), base.cntk[k].get(name), base.scale[k][name])
            effect = max(effect, e)
            noise = base.noise[k].get(name)
            r = e / noise if noise else (math.inf if e else 0.0)
            if r > over[0]:
                over = (r, noise)
    return {"effect": effect, "inert": effect == 0.0, "effect_over_noise": max(over[0], 0.0), "noise": over[1],
            "within_noise": 0.0 < effect and over[0] <= 1.0}


def plant(conv: Conversion, mut: Fault, path: Path) -> str | None:
    """Write the mutated graph; the checker's complaint if the mutation itself is invalid."""
    model = mut.planted(conv.onnx_model)
    try:
        onnx.checker.check_model(model)
    except Exception as exc:  # noqa: BLE001 (a bug in the mutation itself: not counted)
        return str(exc).splitlines()[0]
    onnx.save(model, str(path))
    return None


def engine_record(res: ParityResult) -> dict[str, Any]:
    """The engine's own run on the mutated graph: detected?, by which stage, the numbers."""
    failing = res.failing_outputs
    stages = sorted({c.stage for c in failing})
    return {"detected": not res.passed, "stages": stages, "attribution_ok": (not failing) or stages == [STAGE_CNTK],
            "examples": res.examples, "seconds": round(res.seconds, 3), "reference": res.reference,
            "outputs": {k: {"rule": c.rule, "error": c.scaled_error, "allowed": c.allowed,
                            "ratio": c.truth.ratio if c.truth is not None else None,
                            "run_ratio": c.run.median if c.run is not None and c.run.applies else None,
                            "budget": c.budget.value} for k, c in res.outputs.items()},
            "reasons": {c.output: c.reasons for c in failing}}


def fixed_record(evs: list[Evaluation], base: Baseline) -> dict[str, Any]:
    judged = [judge(ev) for ev in evs]
    ratios = [o["ratio"] for j in judged for o in j["outputs"].values() if o["ratio"] is not None]
    flags = {v: any(j["flags"][v] for j in judged) for v in VERDICTS}
    run_failed, run_ratio = run_flag(evs)
    return {"n": len(evs), **flags, "engine": flags["engine"] or run_failed, "engine_examples": flags["engine"],
            "max_ratio": max(ratios) if ratios else None, "run_ratio": run_ratio,
            "max_err_tf": max(o["err_tf"] for j in judged for o in j["outputs"].values()),
            "budget_value": max(o["budget"] for j in judged for o in j["outputs"].values()),
            **effect_record(evs, base)}


def run_mutation(spec: ModelSpec, conv: Conversion, mut: Fault, index: int, seed: int, examples: int,
                 base: Baseline, tmp: Path) -> dict[str, Any]:
    rec: dict[str, Any] = {"model": spec.name, "kind": mut.kind, "target": mut.node, "detail": mut.detail,
                           "seed": seed}
    path = tmp / f"{spec.name}-mut{index}.onnx"
    invalid = plant(conv, mut, path)
    if invalid:
        return {**rec, "status": "invalid", "message": invalid}
    started = time.perf_counter()
    try:
        try:
            engine = ParityEngine(conv, options=ParityOptions(cntk_onnx=str(path)))
        except Exception as exc:  # noqa: BLE001 (whatever CNTK says, it refused the graph)
            return {**rec, "status": "refused at load",
                    "message": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]}
        try:
            res = engine.run(max_examples=examples, seed=seed, reproducer_dir=tmp / "repro", layerwise=OFF)
            fixed = [engine.evaluate(f, with_ort=True) for f in base.feeds]  # the run-level rule counts ORT32
        except Exception as exc:  # noqa: BLE001 (recorded, not detected)
            return {**rec, "status": "error at eval", "message": f"{type(exc).__name__}: {str(exc)[:300]}"}
        finally:
            engine.close()
    finally:
        path.unlink(missing_ok=True)
        shutil.rmtree(tmp / "repro", ignore_errors=True)
    return {**rec, "status": "ok", "engine": engine_record(res), "fixed": fixed_record(fixed, base),
            "seconds": round(time.perf_counter() - started, 3)}


def mutations_for(spec: ModelSpec, conv: Conversion, targets: int, weight_targets: int) -> list[Fault]:
    """The seeded sample of faults: ``weight_targets`` tensors (each with all three deltas), up to
    ``targets`` nodes for every other kind."""
    cands = fidelity_faults(conv.onnx_model)
    weights = {k: v for k, v in cands.items() if k.startswith("weight")}
    others = {k: ([] if k.startswith("weight") else v) for k, v in cands.items()}
    chosen = sample_fidelity({k: weights.get(k, []) for k in cands}, weight_targets, spec.name)
    return chosen + sample_fidelity(others, targets, spec.name)


def detection(spec: ModelSpec, conv: Conversion, cfg: dict[str, Any], tmp: Path) -> tuple[dict, list[dict]]:
    muts = mutations_for(spec, conv, cfg["targets"], cfg["weight_targets"])
    base = baseline(conv, cfg["fixed"])
    if any(base.flags.values()):
        log(f"  correct conversion flagged on the fixed inputs: {[v for v in VERDICTS if base.flags[v]]}")
    log(f"  {len(muts)} mutations")
    recs = []
    for i, mut in enumerate(muts):
        rec = run_mutation(spec, conv, mut, i, 1000 + i, cfg["det_examples"], base, tmp)
        recs.append(rec)
        if rec["status"] == "ok":
            e, f = rec["engine"], rec["fixed"]
            log(f"    [{i + 1}/{len(muts)}] {mut.detail[:90]}: engine {'CAUGHT' if e['detected'] else 'missed'} "
                f"{e['stages'] if e['detected'] else ''} effect {f['effect']:.2g} ({f['effect_over_noise']:.3g}x "
                f"noise); fixed {{{', '.join(v for v in VERDICTS if f[v])}}}")
        else:
            log(f"    [{i + 1}/{len(muts)}] {mut.detail[:90]}: {rec['status']} {rec.get('message', '')[:120]}")
    return {"model": spec.name, "flags": base.flags, "n": len(base.feeds)}, recs


def known_bad(spec: ModelSpec, conv: Conversion, seed: int, examples: int, nfixed: int,
              tmp: Path) -> dict[str, Any]:
    engine = ParityEngine(conv)
    try:
        res = engine.run(max_examples=examples, seed=seed, reproducer_dir=tmp / "repro", layerwise=OFF)
        judged = [judge(ev) for ev in (engine.evaluate(f) for f in fixed_inputs(engine, nfixed))]
        route = twin_route(engine)
    finally:
        engine.close()
        shutil.rmtree(tmp / "repro", ignore_errors=True)
    return {"model": spec.name, "batch": conv.batch, "route": route, "reference": res.reference,
            "engine_detected": not res.passed, "stages": sorted({c.stage for c in res.failing_outputs}),
            "outputs": engine_record(res)["outputs"],
            "fixed": {v: any(j["flags"][v] for j in judged) for v in VERDICTS}}


# ------------------------------------------------------------------------------------------------
# report (from the JSON alone)


def engine_version() -> dict[str, Any]:
    """Which engine produced the numbers: git commit, local edits, hashes of the rule's code."""
    import subprocess

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                                  timeout=30, check=False).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    pkg = ROOT / "pytest_tf2cntk" / "parity"
    return {"commit": git("rev-parse", "--short", "HEAD"),
            "package_modified": bool(git("status", "--porcelain", "--", "pytest_tf2cntk")),
            **{f"{name}_sha256": hashlib.sha256((pkg / name).read_bytes()).hexdigest()[:12]
               for name in ("truth.py", "budgets.py", "engine.py", "result.py", "metrics.py")}}


def pct(k: int, n: int) -> str:
    return f"{k}/{n} ({100.0 * k / n:.0f}%)" if n else "-"


def num(x: float | None, fmt: str = ".3g") -> str:
    return "-" if x is None else format(x, fmt)


def effective(recs: list[dict]) -> list[dict]:
    """Loaded, and moving CNTK by more than the float32 noise on some fixed input."""
    return [r for r in recs if r["status"] == "ok" and not r["fixed"]["inert"] and not within_noise(r)]


def non_inert(recs: list[dict]) -> list[dict]:
    """Loaded, and changing CNTK's outputs on the fixed inputs at all (within the noise or not)."""
    return [r for r in recs if r["status"] == "ok" and not r["fixed"]["inert"]]


def within_noise(r: dict) -> bool:
    return bool(r["fixed"].get("within_noise"))


def caught(r: dict, verdict: str) -> bool:
    """``run`` = the engine's own Hypothesis run; the five verdicts on the fixed inputs."""
    return r["engine"]["detected"] if verdict == "run" else r["fixed"][verdict]


DET_COLUMNS = ("run",) + VERDICTS
DET_TITLES = {"run": "engine (own run)", "engine": "engine (fixed)", **{v: TITLES[v] for v in VERDICTS[1:]}}


def _ill(data: dict[str, Any]) -> dict[str, bool]:
    return {fa["model"]: fa["ill_conditioned"] for fa in data["false_alarms"]}


def _name(model: str, ill: dict[str, bool]) -> str:
    return f"{model} (ill)" if ill.get(model) else model


def md_header(data: dict[str, Any]) -> list[str]:
    cfg, ver = data["config"], data.get("engine", {})
    changed = data.get("engine_end") not in (None, ver)
    nruns = sum(fa["n_runs"] for fa in data["false_alarms"])
    kind = "quick" if cfg["quick"] else ("subset" if cfg.get("models") else "full")
    return [f"# Fidelity ({kind} run, {data['date']}, {data['seconds'] / 60:.1f} min)", "",
            (f"Engine at commit {ver.get('commit', '?')}"
            f"{' with local edits in pytest_tf2cntk/' if ver.get('package_modified') else ''}"
            f"{' (**the engine code changed during the run**)' if changed else ''} "
            f"(truth.py {ver.get('truth.py_sha256', '?')}, engine.py {ver.get('engine.py_sha256', '?')}). "
            f"Measured rule: CNTK's error vs the float64 twin <= {cfg['noise_factor']:g} x noise, noise = "
            f"max(TF32, ORT32, floor of {cfg['floor_ulps']:g} units of rounding) on each example, and the median "
            f"of CNTK / noise over a run's examples <= {cfg.get('run_factor', 2.5):g}; a-priori budget headroom "
            f"{cfg['headroom']:g}."), "",
            (f"False alarms: {len(cfg['seeds'])} Hypothesis seeds x {cfg['examples']} examples per model "
            f"({nruns} runs). Detection: {cfg['weight_targets']} weight tensors (each x(1+1e-2), x(1+1e-3), "
            f"x(1+1e-4)) and up to {cfg['targets']} targets for every other kind per distinct graph; the "
            f"engine's own run has {cfg['det_examples']} examples, the five verdicts judge {cfg['fixed']} fixed "
            "inputs (uniform / normal over the whole input domain). `(ill)` marks an ill-conditioned model: "
            f"TF32's own error vs the twin reached {ILL_CONDITIONED:g} on some example."), ""]


def md_headline(data: dict[str, Any]) -> list[str]:
    fas, recs = data["false_alarms"], data["mutations"]
    nruns = sum(fa["n_runs"] for fa in fas)
    lines = ["## Headline", "",
             "| | target | " + " | ".join(DET_TITLES[c] for c in DET_COLUMNS) + " | engine meets it (own run / fixed) |",
             "|---|---|" + "---|" * len(DET_COLUMNS) + "---|"]
    tot = {v: sum(fa["failed_runs"][v] for fa in fas) for v in VERDICTS}
    met = "**NO**" if tot["engine"] else ("yes" if nruns >= 300 else f"0 alarms, but only {nruns} runs")
    lines.append(f"| false alarms (runs of correct conversions) | 0 in >= 300 | {tot['engine']}/{nruns} | - | "
                 + " | ".join(f"{tot[v]}/{nruns}" for v in VERDICTS[1:]) + f" | {met} |")
    for kind, target in TARGETS.items():
        mine = [r for r in recs if r["kind"] == kind]
        for label, sel in (("non-inert", non_inert(mine)), ("beyond the noise", effective(mine))):
            k = {c: sum(caught(r, c) for r in sel) for c in DET_COLUMNS}
            met = ["yes" if sel and k[c] >= target * len(sel) else "**NO**" for c in ("run", "engine")]
            lines.append(f"| detection {kind}, {label} | >= {target:.0%} | "
                         + " | ".join(pct(k[c], len(sel)) for c in DET_COLUMNS) + f" | {' / '.join(met)} |")
    return lines + ["", ("`non-inert` = every loaded mutation that changes CNTK's outputs on the fixed inputs at all; "
                         "`beyond the noise` leaves out those that move them, on every fixed input, by no more than "
                         "the correct conversion's own float32 noise (`within noise` below)."), ""]


def md_false_alarm_tables(data: dict[str, Any]) -> list[str]:
    fas = data["false_alarms"]
    lines = ["## False alarms on correct conversions", "",
             ("A run (model, seed) is a false alarm for a verdict if any of its evaluations is flagged; all five "
             "judge exactly the TF / CNTK outputs the engine produced (every Hypothesis example, shrink and triage "
             "re-evaluation, hence `evaluations` > runs x examples)."), "",
             "| model | batch | twin | runs | evaluations | " + " | ".join(TITLES[v] for v in VERDICTS) + " |",
             "|---|---|---|---|---|" + "---|" * len(VERDICTS)]
    for fa in fas:
        lines.append(f"| {fa['model']}{' (ill)' if fa['ill_conditioned'] else ''} | {fa['batch']} | {fa['route']} | "
                     f"{fa['n_runs']} | {fa['n_examples']} | "
                     + " | ".join(str(fa["failed_runs"][v]) for v in VERDICTS) + " |")
    lines.append(f"| **all** | | | {sum(f['n_runs'] for f in fas)} | {sum(f['n_examples'] for f in fas)} | "
                 + " | ".join(f"**{sum(f['failed_runs'][v] for f in fas)}**" for v in VERDICTS) + " |")
    lines += ["", ("The numbers behind the verdicts, all scaled errors (max |x - r| / rms(r), r = the twin): "
              "`TF32 noise` is TF32's error over every example of the output where it is largest (min - max); "
              "`ORT32 worst` ONNX Runtime's largest error on any output (run on every example); `floor` the "
              "rounding floor's range; `CNTK / noise` the worst ratio of the correct CNTK over all outputs and "
              f"examples (the rule allows {data['config']['noise_factor']:g}) with where; `run median` the largest "
              "run-level ratio, the median over a run's examples of CNTK / noise (the rule allows "
              f"{data['config'].get('run_factor', 2.5):g}); `a-priori budget` and "
              "`TF-CNTK err` the composed budget and the worst TF vs CNTK scaled error of the output with the "
              "smallest budget headroom."), "",
              ("| model | worst output | TF32 noise | ORT32 worst | floor | CNTK / noise | at (seed, output) "
              "| CNTK err there | run median | a-priori budget | TF-CNTK err | err / budget |"),
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for fa in fas:
        lines.append(false_alarm_numbers(fa))
    return lines + [""]


def false_alarm_numbers(fa: dict[str, Any]) -> str:
    outs = fa["outputs"]
    tf_out = max(outs, key=lambda o: outs[o]["tf32_max"] or 0.0)
    o = outs[tf_out]
    worst = [(n, a["worst"]) for n, a in outs.items() if "worst" in a]
    wn, w = max(worst, key=lambda x: x[1]["ratio"]) if worst else ("-", {})
    bn = max(outs, key=lambda n: outs[n]["err_tf_max"] / outs[n]["budget"] if outs[n]["budget"] else math.inf)
    b = outs[bn]
    ort = _stat((a["ort32_max"] for a in outs.values()), max)
    floors = (_stat((a["floor_min"] for a in outs.values()), min), _stat((a["floor_max"] for a in outs.values()), max))
    return (f"| {fa['model']}{' (ill)' if fa['ill_conditioned'] else ''} | {tf_out} | {num(o['tf32_min'])} - "
            f"{num(o['tf32_max'])} | {num(ort)} | {num(floors[0])} - {num(floors[1])} | "
            f"{num(w.get('ratio'))}x | {w.get('seed', '-')}, {wn} | {num(w.get('cntk'))} | "
            f"{num(fa.get('run_ratio_max'))}x | {num(b['budget'])} ({bn}) | "
            f"{num(b['err_tf_max'])} | {num(b['err_tf_max'] / b['budget'] if b['budget'] else None)} |")


def _alarm_rows(data: dict[str, Any]) -> dict[tuple, list[int]]:
    """Failing outputs of correct conversions; the same input evaluated again is one row."""
    rows: dict[tuple, list[int]] = {}
    for fa in data["false_alarms"]:
        for run in fa["runs"]:
            for d in run["details"]:
                for name, o in d["outputs"].items():
                    if not o["passed"]:
                        inputs = "; ".join(f"{k}: {v}" for k, v in d.get("inputs", {}).items())
                        key = (fa["model"], run["seed"], name, json.dumps(o, sort_keys=True), inputs)
                        rows.setdefault(key, []).append(d["example"])
    return rows


def md_false_alarm_details(data: dict[str, Any]) -> list[str]:
    """Every example of a correct conversion the engine failed, with the numbers it judged (the
    a-priori budget's flagged examples stay in the JSON: ``runs[].details``)."""
    rows = _alarm_rows(data)
    if not rows:
        return [(f"No example of a correct conversion failed the engine's verdict. (Examples the a-priori budget "
                 f"flagged are listed, up to {MAX_DETAILS} per run, in the JSON: `false_alarms[].runs[].details`.)"),
                ""] + _engine_reports(data)
    lines = ["### Engine false alarms: every failing example of a correct conversion", "",
             ("TF32, ORT32, CNTK and `graph` (the converted ONNX evaluated in float64) are scaled errors vs the twin. "
              "`ORT32 counted` = ORT32 is part of the noise (it is not when the graph is farther from the twin than "
              "the factor x max(TF32, floor): then the converter is taken to have changed the function)."), "",
             ("| model | seed | eval # | output | a-priori | TF32 | ORT32 | ORT32 counted | CNTK | floor | noise "
              "| CNTK / noise | graph | graph / max(TF32, floor) | TF-CNTK err / budget | input |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (model, seed, name, numbers, inputs), examples in rows.items():
        o = json.loads(numbers)
        counted = o["ort32_engine"] is not None and o["noise"] >= o["ort32_engine"]
        close = max(o["tf32"], o["floor"])
        lines.append(f"| {model} | {seed} | {', '.join(map(str, examples))} | {name} | "
                     f"{'**FAIL**' if o['budget_flag'] else 'pass'} | {num(o['tf32'])} | {num(o['ort32_engine'])} | "
                     f"{'yes' if counted else 'no'} | {num(o['cntk'])} | {num(o['floor'])} | {num(o['noise'])} | "
                     f"{num(o['ratio'])} | {num(o['graph'])} | {num(o['graph'] / close if o['graph'] is not None else None)} "
                     f"| {num(o['err_tf'])} / {num(o['budget'])} | {inputs} |")
    return lines + [""] + _engine_reports(data)


def _engine_reports(data: dict[str, Any]) -> list[str]:
    """The engine's own report of every failed run of a correct conversion (run-level ones too)."""
    lines = []
    for fa in data["false_alarms"]:
        for run in fa["runs"]:
            if "report" in run:
                lines += [f"Engine report, {fa['model']} seed {run['seed']}:", "", "```", run["report"], "```", ""]
    return lines


def kind_counts(sel_all: list[dict]) -> dict[str, Any]:
    ok = [r for r in sel_all if r["status"] == "ok"]
    eff = effective(sel_all)
    det = [r for r in eff if r["engine"]["detected"]]
    inert = [r for r in ok if r["fixed"]["inert"]]
    sub = [r for r in ok if within_noise(r)]
    return {"n": len(sel_all), "refused": len(sel_all) - len(ok), "inert": len(inert), "eff": eff,
            "k": {c: sum(caught(r, c) for r in eff) for c in DET_COLUMNS},
            "attr": sum(r["engine"]["attribution_ok"] for r in det), "det": len(det),
            "inert_run": sum(r["engine"]["detected"] for r in inert), "sub": len(sub),
            "sub_run": sum(r["engine"]["detected"] for r in sub),
            "sub_rules": {v: sum(r["fixed"][v] for r in sub) for v in RULES}}


def md_detection_kinds(data: dict[str, Any]) -> list[str]:
    recs = data["mutations"]
    lines = ["## Detection of planted CNTK-side bugs", "",
             ("`engine (own run)` = the engine's Hypothesis run on the mutated graph (`check_parity(..., "
             "cntk_onnx=mutated)`); the other five columns judge TF vs mutated CNTK on the same fixed inputs. "
             "Every percentage is over the `effective` mutations of the row: loaded by CNTK, and moving its "
             "outputs by more than the correct conversion's float32 noise on at least one fixed input. `inert` = "
             "CNTK's outputs bit-identical to the unmutated graph's on the fixed inputs; `within noise` = moved, "
             "but on every fixed input by less than TF32 or ORT32 is itself off the truth there (no sound rule "
             "can tell it from rounding; a rule that flags it flags the correct conversion too); in brackets "
             "how many of those the engine's own inputs exposed anyway, and for `within noise` how many "
             "Polygraphy / torch / tf2onnx flagged on the fixed inputs. `attribution CNTK` = the engine's "
             "detections blamed on the CNTK stage."), "",
             "| mutation | n | refused | inert (own run caught) | within noise (own run; P / t / o) | effective | "
             + " | ".join(DET_TITLES[c] for c in DET_COLUMNS) + " | attribution CNTK |",
             "|---|---|---|---|---|---|" + "---|" * len(DET_COLUMNS) + "---|"]

    def row(label: str, sel: list[dict]) -> str:
        c = kind_counts(sel)
        sub = " / ".join(str(c["sub_rules"][v]) for v in RULES)
        return (f"| {label} | {c['n']} | {c['refused']} | {c['inert']} ({c['inert_run']}) | {c['sub']} ({c['sub_run']}; "
                f"{sub}) | {len(c['eff'])} | "
                + " | ".join(pct(c["k"][col], len(c["eff"])) for col in DET_COLUMNS) + f" | {c['attr']}/{c['det']} |")

    for kind in KINDS:
        sel = [r for r in recs if r["kind"] == kind]
        if sel:
            lines.append(row(f"**{kind}**" if kind in TARGETS else kind, sel))
    lines.append(row("**overall**", recs))
    ill = _ill(data)
    lines.append(row("well-conditioned models", [r for r in recs if not ill.get(r["model"])]))
    lines.append(row("ill-conditioned models", [r for r in recs if ill.get(r["model"])]))
    return lines + [""] + md_engine_vs_rules(data)


def md_engine_vs_rules(data: dict[str, Any]) -> list[str]:
    """Per kind: does the engine catch at least as many as each reference rule, on the same outputs?"""
    recs = data["mutations"]
    base = {b["model"]: b["flags"] for b in data.get("baselines", [])}
    lines = ["### Engine vs each reference rule, per kind", "",
             ("Counts over the same effective mutations. A rule's `all` counts every fixed-input detection, "
              "`credible` only those on models whose correct conversion the rule passes on the same fixed inputs "
              "(where it fails the unmutated model too, it \"detects\" every mutation for free). The last three "
              "columns: is the engine at least as good as every reference rule, and if not, which rules beat it."),
             "", "| mutation | effective | engine (fixed) | engine (own run) | "
             + " | ".join(f"{TITLES[r]} all / credible" for r in RULES)
             + " | engine (fixed) >= every rule? | engine (own run) >= every rule? | own run >= every credible? |",
             "|---|---|---|---|" + "---|" * len(RULES) + "---|---|---|"]
    for kind in KINDS + ("overall",):
        sel = effective([r for r in recs if kind == "overall" or r["kind"] == kind])
        if not sel:
            continue
        k = {c: sum(caught(r, c) for r in sel) for c in DET_COLUMNS}
        cred = {r: sum(caught(m, r) and not base.get(m["model"], {}).get(r, False) for m in sel) for r in RULES}

        def beats(n: int, other: dict[str, int]) -> str:
            worse = [TITLES[r] for r in RULES if n < other[r]]
            return "yes" if not worse else "**NO**: " + ", ".join(worse)
        lines.append(f"| {kind} | {len(sel)} | {k['engine']} | {k['run']} | "
                     + " | ".join(f"{k[r]} / {cred[r]}" for r in RULES)
                     + f" | {beats(k['engine'], k)} | {beats(k['run'], k)} | {beats(k['run'], cred)} |")
    return lines + [""]


def md_detection_models(data: dict[str, Any]) -> list[str]:
    recs, ill = data["mutations"], _ill(data)
    fa_runs = {fa["model"]: fa for fa in data["false_alarms"]}
    lines = ["### Per model", "",
             ("Over the model's effective mutations. `false alarms` repeats the false-alarm runs of the unmutated "
             "model (engine / a-priori / Polygraphy / torch / tf2onnx): a rule that fails the correct conversion "
             "\"detects\" every mutation for free."), "",
             "| model | effective | inert | " + " | ".join(DET_TITLES[c] for c in DET_COLUMNS)
             + " | w 1e-3: own run | w 1e-4: own run / fixed | w 1e-4: Polygraphy / torch / tf2onnx | false alarms |",
             "|---|---|---|" + "---|" * len(DET_COLUMNS) + "---|---|---|---|"]
    for model in dict.fromkeys(r["model"] for r in recs):
        allm = [r for r in recs if r["model"] == model]
        sel = effective(allm)
        inert = sum(1 for r in allm if r["status"] == "ok" and r["fixed"]["inert"])
        w3 = [r for r in sel if r["kind"] == "weight 1e-3"]
        w4 = [r for r in sel if r["kind"] == "weight 1e-4"]
        fa = fa_runs.get(model)
        fa_txt = " / ".join(str(fa["failed_runs"][v]) for v in VERDICTS) + f" of {fa['n_runs']}" if fa else "-"
        lines.append(f"| {_name(model, ill)} | {len(sel)} | {inert} | "
                     + " | ".join(pct(sum(caught(r, c) for r in sel), len(sel)) for c in DET_COLUMNS)
                     + f" | {pct(sum(caught(r, 'run') for r in w3), len(w3))} | "
                     + " / ".join(pct(sum(caught(r, c) for r in w4), len(w4)) for c in ("run", "engine")) + " | "
                     + " / ".join(pct(sum(caught(r, c) for r in w4), len(w4)) for c in RULES) + f" | {fa_txt} |")
    return lines + [""]


def md_missed(data: dict[str, Any]) -> list[str]:
    recs, ill = data["mutations"], _ill(data)
    factor = data["config"]["noise_factor"]
    counted = effective(recs) + [r for r in recs if r["status"] == "ok" and within_noise(r)]
    missed = [r for r in counted if not r["engine"]["detected"] or not r["fixed"]["engine"]]
    lines = []
    if missed:
        lines += ["### Mutations the engine missed (own run or fixed inputs)", "",
                  ("`effect` = max |CNTK mutated - CNTK original| / rms(truth) on the fixed inputs (largest over inputs "
                  "and outputs); `noise` = the correct conversion's noise max(TF32, ORT32, floor) there; "
                  "`effect / noise` (largest over inputs and outputs) at most 1 = `within noise`, not counted as "
                  f"effective; below the factor {factor:g} no single example can show it. `CNTK / noise` = the "
                  "largest per-example ratio the engine saw on the fixed inputs, `run` the median ratio over "
                  f"them (the rule allows {RUN_FACTOR_TEXT}). `caught by` = verdicts that flagged it on the fixed inputs."), "",
                  ("| model | mutation | counted | own run | fixed | effect | noise | effect / noise | CNTK / noise | run "
                  "| caught by |"), "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in missed:
            f = r["fixed"]
            by = [TITLES[v] for v in VERDICTS if f[v]]
            lines.append(f"| {_name(r['model'], ill)} | {r['detail']} | {'within noise' if within_noise(r) else 'yes'} | "
                         f"{'caught' if r['engine']['detected'] else 'missed'}"
                         f" | {'caught' if f['engine'] else 'missed'} | {num(f['effect'])} | {num(f['noise'])} | "
                         f"{num(f['effect_over_noise'])} | {num(f['max_ratio'])} | {num(f.get('run_ratio'))} | "
                         f"{', '.join(by) or 'none'} |")
        lines.append("")
    wrong = [r for r in effective(recs) if r["engine"]["detected"] and not r["engine"]["attribution_ok"]]
    if wrong:
        lines += ["### Detections with a stage other than CNTK", ""]
        lines += [f"- {r['model']}: {r['detail']} -> {r['engine']['stages']}" for r in wrong] + [""]
    bad = [r for r in recs if r["status"] != "ok"]
    if bad:
        lines += ["### Refused / errored mutations", ""]
        lines += [f"- {r['model']}: {r['detail']} -> {r['status']}: {r.get('message', '')[:160]}" for r in bad] + [""]
    flagged = [b for b in data.get("baselines", []) if any(b["flags"].values())]
    if flagged:
        lines += ["### Correct conversions flagged on the fixed inputs", ""]
        lines += [f"- {b['model']}: {', '.join(TITLES[v] for v in VERDICTS if b['flags'][v])} (of {b['n']} inputs)"
                  for b in flagged] + [""]
    return lines


def md_known_bad(data: dict[str, Any]) -> list[str]:
    if not data["known_bad"]:
        return []
    lines = ["## Known-bad fixtures (real CNTK bugs)", "",
             ("`error / allowed` of the worst output in the engine's own run (its rule's numbers); the last five "
             "columns: flagged on the fixed inputs."), "",
             "| model | batch | twin | engine | stage | output | error / allowed (rule) | CNTK / noise | "
             + " | ".join(TITLES[v] for v in VERDICTS) + " |", "|---|---|---|---|---|---|---|---|" + "---|" * len(VERDICTS)]
    for kb in data["known_bad"]:
        outs = kb["outputs"]
        o = max(outs, key=lambda k: outs[k]["error"] / outs[k]["allowed"] if outs[k]["allowed"] else math.inf)
        w = outs[o]
        lines.append(f"| {kb['model']} | {kb['batch']} | {kb['route']} | {'caught' if kb['engine_detected'] else '**MISSED**'} "
                     f"| {', '.join(kb['stages']) or '-'} | {o} | {num(w['error'])} / {num(w['allowed'])} ({w['rule']}) | "
                     f"{num(w['ratio'])} | " + " | ".join("yes" if kb["fixed"][v] else "no" for v in VERDICTS) + " |")
    return lines + [""]


def markdown(data: dict[str, Any]) -> str:
    parts = (md_header, md_headline, md_false_alarm_tables, md_false_alarm_details, md_detection_kinds,
             md_detection_models, md_missed, md_known_bad)
    return "\n".join(line for part in parts for line in part(data)).rstrip("\n") + "\n"


# ------------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 seeds x 5 examples, 2 targets per kind, no ResNet50")
    ap.add_argument("--models", help="comma-separated subset of model names")
    ap.add_argument("--seeds", type=int, help="Hypothesis seeds per model for false alarms")
    ap.add_argument("--examples", type=int, help="examples per seed")
    ap.add_argument("--targets", type=int, help="targets per mutation kind per model (not weights)")
    ap.add_argument("--weight-targets", type=int, help="weight tensors per model (each gets 1e-2, 1e-3, 1e-4)")
    ap.add_argument("--no-detection", action="store_true", help="false alarms only")
    ap.add_argument("--out-dir", default=str(RESULTS))
    ap.add_argument("--report-only", metavar="JSON", help="rewrite the Markdown from a results JSON")
    return ap.parse_args()


def config(args: argparse.Namespace) -> dict[str, Any]:
    q = args.quick
    return {"quick": q, "seeds": list(range(args.seeds or (3 if q else 25))), "examples": args.examples or (5 if q else 20),
            "targets": args.targets or (2 if q else 4), "weight_targets": args.weight_targets or (2 if q else 6),
            "det_examples": 5 if q else 20, "fixed": 4 if q else 10, "detection": not args.no_detection,
            "headroom": budgets_mod.DEFAULT_HEADROOM, "noise_factor": truth_mod.NOISE_FACTOR,
            "floor_ulps": truth_mod.FLOOR_ULPS, "run_factor": truth_mod.RUN_FACTOR,
            "ill_conditioned_tf32": ILL_CONDITIONED,
            "rules": RULE_TEXT, "models": args.models}


def run_model(spec: ModelSpec, cfg: dict[str, Any], data: dict[str, Any], seen: dict[str, str], tmp: Path) -> None:
    t0 = time.perf_counter()
    # a known-bad fixture shows CNTK's raw defect: without the repair that fixes it
    conv = convert(spec.path(), batch=spec.batch, repairs="off" if spec.known_bad else "on")
    log(f"{spec.name}: batch {spec.batch}, conversion {'cached' if conv.from_cache else 'fresh'} ({conv.seconds:.1f} s)")
    if spec.known_bad:
        kb = known_bad(spec, conv, 0, cfg["det_examples"], cfg["fixed"], tmp)
        data["known_bad"].append(kb)
        log(f"  known-bad: engine {'caught' if kb['engine_detected'] else 'MISSED'} {kb['stages']}")
        return
    fa = false_alarms(spec, conv, cfg["seeds"], cfg["examples"], tmp)
    data["false_alarms"].append(fa)
    log(f"  twin {fa['route']}; false alarms {fa['failed_runs']} of {fa['n_runs']} runs; TF32 max {num(fa['tf32_max'])} "
        f"({time.perf_counter() - t0:.0f} s)")
    fp = graph_fingerprint(conv.onnx_model)
    if not cfg["detection"]:
        return
    if fp in seen:
        log(f"  same graph and weights as {seen[fp]}: mutations not repeated")
        return
    seen[fp] = spec.name
    base, recs = detection(spec, conv, cfg, tmp)
    data["baselines"].append(base)
    data["mutations"].extend(recs)
    log(f"  {spec.name} done in {time.perf_counter() - t0:.0f} s")


def main() -> int:
    args = parse_args()
    if args.report_only:
        src = Path(args.report_only)
        md = markdown(json.loads(src.read_text()))
        src.with_suffix(".md").write_text(md)
        print(md)
        return 0
    cfg = config(args)
    wanted = set(args.models.split(",")) if args.models else None
    specs = [s for s in model_specs() if (s.name in wanted if wanted else not (cfg["quick"] and s.full_only))]
    started = time.perf_counter()
    data: dict[str, Any] = {"config": cfg, "date": time.strftime("%Y-%m-%d %H:%M"), "engine": engine_version(),
                            "host": {"python": platform.python_version(), "cpus": os.cpu_count(),
                                     "load_start": os.getloadavg()},
                            "false_alarms": [], "mutations": [], "baselines": [], "known_bad": []}
    seen: dict[str, str] = {}
    tmp = Path(tempfile.mkdtemp(prefix="tf2cntk-fidelity-"))
    try:
        for spec in specs:
            run_model(spec, cfg, data, seen, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    data["seconds"] = time.perf_counter() - started
    data["host"]["load_end"] = os.getloadavg()
    data["engine_end"] = engine_version()  # differs from "engine" if the package was edited during the run
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "fidelity_quick" if cfg["quick"] else "fidelity"
    if args.models and not cfg["quick"]:
        stem = "fidelity_subset"
    (out_dir / f"{stem}.json").write_text(json.dumps(data, indent=1, default=str))
    md = markdown(data)
    (out_dir / f"{stem}.md").write_text(md)
    print(md)
    log(f"wrote {out_dir / stem}.json and .md in {data['seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
