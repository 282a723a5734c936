"""Fidelity of the parity verdict: false alarms on correct conversions, detection of planted bugs.

    .venv/bin/python benchmarks/fidelity.py [--quick] [--models mlp,cnn_bn] [--out-dir DIR]

(a) False alarms. Every fixture that CNTK computes correctly (fixtures/manifest.json: a batch in
    ``cntk_batches``; the LSTM at batch 1, gru skipped) plus MobileNetV2 96x96 (and ResNet50 64x64
    in the full run) is checked with the engine, one conversion per model, over many Hypothesis
    seeds. Every evaluation the engine makes is captured, and the same TF/CNTK output pairs are
    also judged by three reference rules:
      Polygraphy default  element fails if |a-b| > 1e-5 AND |a-b|/|b| > 1e-5
      torch float32       fails if |a-b| > 1e-5 + 1.3e-6*|b|
      tf2onnx tests       fails if |a-b| > 1e-5 + 1e-7*|b|      (b = TF, the reference)
    A run (model, seed) is a false alarm for a rule if any of its examples fails the rule.

(b) Detection. The CNTK-bound ONNX is mutated the way conversion bugs look (weight scaled by
    1+d, bias shifted, activation parameter changed, padding shifted, transpose axes swapped, node
    dropped); TF and ONNX Runtime keep the correct graph. Each mutation gets
      * the engine's own verdict: ``ParityEngine(conv, cntk_onnx=mutated).run(seed=...)`` (the same
        thing ``check_parity(..., cntk_onnx=mutated)`` does) and its stage attribution;
      * on a fixed set of inputs (uniform/normal over each input's whole domain), TF vs mutated
        CNTK, judged by the engine's rule (scaled error <= budget) and the three reference rules.
    A mutated graph CNTK refuses to load counts as "refused", not as detected.

Known-bad fixtures (manifest: no ``cntk_batches``, some ``cntk_mismatch_batches``, e.g.
quantized.keras) are a real CNTK bug: reported separately as a detection case.

Writes results/fidelity.{json,md} (results/fidelity_quick.* with --quick). Progress goes to stderr.
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.zoo builds the keras.applications models

import numpy as np
import onnx
from onnx import numpy_helper

from pytest_tf2cntk.parity import budgets as budgets_mod
from pytest_tf2cntk.convert.pipeline import Conversion, convert
from pytest_tf2cntk.parity.inputs import InputRecipe, materialize
from pytest_tf2cntk.parity.options import Diagnose
from pytest_tf2cntk.parity.engine import ParityEngine
from pytest_tf2cntk.parity.options import ParityOptions
from pytest_tf2cntk.parity.result import STAGE_CNTK, Evaluation
from tests.support.faults import FIDELITY_KINDS as KINDS
from tests.support.faults import Fault, fidelity_faults, sample_fidelity

FIXTURES = ROOT / "fixtures"
OFF = Diagnose.OFF
RESULTS = Path(__file__).resolve().parent / "results"
RULES = ("polygraphy", "torch", "tf2onnx")
RULE_TITLES = {"engine": "engine (budget)", "polygraphy": "Polygraphy default",
               "torch": "torch.testing fp32", "tf2onnx": "tf2onnx tests"}


def zoo_calibrated(name: str) -> Path:
    from tests.support.zoo import calibrated_model

    return calibrated_model(name)


def log(msg: str) -> None:
    print(f"[fidelity {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# reference rules


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


def judge(ev: Evaluation) -> dict[str, Any]:
    """All four verdicts on one evaluation (True = flagged), plus the engine's numbers."""
    out = {"engine": not ev.passed}
    flags = [rule_flags(ev.tf[name], ev.cntk.get(name, np.zeros(0, np.float32))) for name in ev.tf]
    for rule in RULES:
        out[rule] = any(f[rule] for f in flags)
    out["errors"] = {name: c.scaled_error for name, c in ev.checks.items()}
    out["budgets"] = {name: c.budget.value for name, c in ev.checks.items()}
    out["max_abs"] = {name: c.tf_vs_cntk.max_abs for name, c in ev.checks.items()}
    out["rms"] = {name: c.tf_vs_cntk.ref_scale for name, c in ev.checks.items()}
    return out


@contextlib.contextmanager
def capture(engine: ParityEngine, sink: list[dict[str, Any]]):
    """Judge every evaluation the engine makes (its Hypothesis examples and shrinks) as it goes."""
    original = engine.evaluate

    def evaluate(feeds: dict[str, np.ndarray], with_ort: bool = False) -> Evaluation:
        ev = original(feeds, with_ort)
        sink.append(judge(ev))
        return ev

    engine.evaluate = evaluate  # type: ignore[method-assign]
    try:
        yield
    finally:
        del engine.evaluate


# ------------------------------------------------------------------------------------------------
# models


@dataclass
class ModelSpec:
    name: str
    path: Callable[[], Path]
    batch: int
    full_only: bool = False
    known_bad: bool = False


def model_specs() -> list[ModelSpec]:
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

    def zoo(name: str) -> Callable[[], Path]:
        def get() -> Path:
            from tests.support.zoo import application_model
            return application_model(name)
        return get

    specs.append(ModelSpec("mobilenetv2_96", zoo("mobilenetv2_96"), 1))
    specs.append(ModelSpec("mobilenetv2_96_cal", lambda: zoo_calibrated("mobilenetv2_96"), 1))
    specs.append(ModelSpec("resnet50_64", zoo("resnet50_64"), 1, full_only=True))
    specs.append(ModelSpec("resnet50_64_cal", lambda: zoo_calibrated("resnet50_64"), 1, full_only=True))
    return specs


def graph_fingerprint(model: onnx.ModelProto) -> str:
    """Same ops and the same weights = the same graph for mutation purposes (mlp, .h5, SavedModel)."""
    h = hashlib.sha256()
    for node in model.graph.node:
        h.update(node.op_type.encode())
    for data in sorted(numpy_helper.to_array(t).tobytes() for t in model.graph.initializer):
        h.update(data)
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------------
# the measurements


def fixed_inputs(engine: ParityEngine, n: int) -> list[dict[str, np.ndarray]]:
    """n input sets over each input's whole domain (uniform and normal alternately), seeded."""
    sets = []
    for k in range(n):
        recipes = {name: InputRecipe("uniform" if k % 2 == 0 else "normal", 7919 * (k + 1) + j,
                                     0.0, 1.0, "none", 0.0) for j, name in enumerate(engine.domains)}
        sets.append(materialize(recipes, engine.domains))
    return sets


def false_alarms(spec: ModelSpec, conv: Conversion, seeds: list[int], examples: int,
                 tmp: Path) -> dict[str, Any]:
    engine = ParityEngine(conv)
    runs = []
    try:
        for s in seeds:
            evs: list[dict[str, Any]] = []
            with capture(engine, evs):
                res = engine.run(max_examples=examples, seed=s, reproducer_dir=tmp / "repro", layerwise=OFF)
            run = {"seed": s, "engine_passed": res.passed, "examples": len(evs),
                   "flagged": {r: any(e[r] for e in evs) for r in ("engine",) + RULES},
                   "flagged_examples": {r: sum(e[r] for e in evs) for r in ("engine",) + RULES},
                   "max_error": {o: max(e["errors"][o] for e in evs) for o in evs[0]["errors"]},
                   "max_abs": {o: max(e["max_abs"][o] for e in evs) for o in evs[0]["max_abs"]},
                   "min_rms": {o: min(e["rms"][o] for e in evs) for o in evs[0]["rms"]},
                   "budget": evs[0]["budgets"], "seconds": res.seconds}
            if not res.passed:
                run["report"] = str(res)
                log(f"  FALSE ALARM {spec.name} seed {s}:\n{res}")
            runs.append(run)
    finally:
        engine.close()
    outs = list(runs[0]["budget"])
    per_output = {}
    for o in outs:
        err = max(r["max_error"][o] for r in runs)
        b = runs[0]["budget"][o]
        per_output[o] = {"budget": b, "max_error": err, "min_headroom": b / err if err > 0 else math.inf,
                         "error_over_raw_budget": err / (b / engine.config.headroom),
                         "max_abs": max(r["max_abs"][o] for r in runs),
                         "min_rms": min(r["min_rms"][o] for r in runs)}
    return {"model": spec.name, "batch": conv.batch, "runs": runs, "per_output": per_output,
            "n_runs": len(runs), "n_examples": sum(r["examples"] for r in runs),
            "failed_runs": {r: sum(run["flagged"][r] for run in runs) for r in ("engine",) + RULES},
            "failed_examples": {r: sum(run["flagged_examples"][r] for run in runs)
                                for r in ("engine",) + RULES}}


def evaluate_fixed(engine: ParityEngine, feeds: list[dict[str, np.ndarray]]) -> list[Evaluation]:
    return [engine.evaluate(f) for f in feeds]


def run_mutation(spec: ModelSpec, conv: Conversion, mut: Fault, index: int, seed: int,
                 examples: int, feeds: list[dict[str, np.ndarray]],
                 baseline_cntk: list[dict[str, np.ndarray]], tmp: Path) -> dict[str, Any]:
    rec: dict[str, Any] = {"model": spec.name, "kind": mut.kind, "target": mut.node,
                           "detail": mut.detail, "seed": seed}
    model = onnx.ModelProto()
    model.CopyFrom(conv.onnx_model)
    mut.apply(model)
    try:
        onnx.checker.check_model(model)
    except Exception as exc:  # noqa: BLE001 (a bug in the mutation itself: not counted)
        rec.update(status="invalid", message=str(exc).splitlines()[0])
        return rec
    path = tmp / f"{spec.name}-mut{index}.onnx"
    onnx.save(model, str(path))
    started = time.perf_counter()
    try:
        try:
            engine = ParityEngine(conv, options=ParityOptions(cntk_onnx=str(path)))
        except Exception as exc:  # noqa: BLE001 (whatever CNTK says, it refused the graph)
            rec.update(status="refused at load", message=f"{type(exc).__name__}: "
                       f"{str(exc).splitlines()[0] if str(exc) else ''}"[:300])
            return rec
        try:
            res = engine.run(max_examples=examples, seed=seed, reproducer_dir=tmp / "repro", layerwise=OFF)
            fixed = evaluate_fixed(engine, feeds)
        except Exception as exc:  # noqa: BLE001 (recorded, not detected)
            rec.update(status="error at eval", message=f"{type(exc).__name__}: {str(exc)[:300]}")
            return rec
        finally:
            engine.close()
    finally:
        path.unlink(missing_ok=True)
        shutil.rmtree(tmp / "repro", ignore_errors=True)
    failing = res.failing_outputs
    stages = sorted({c.stage for c in failing})
    rec["status"] = "ok"
    rec["engine"] = {"detected": not res.passed, "stages": stages,
                     "attribution_ok": (not failing) or stages == [STAGE_CNTK],
                     "examples": res.examples, "seconds": round(res.seconds, 3),
                     "scaled_error": {k: c.scaled_error for k, c in res.outputs.items()},
                     "budget": {k: c.budget.value for k, c in res.outputs.items()},
                     "reasons": {c.output: c.reasons for c in failing}}
    judged = [judge(ev) for ev in fixed]
    # how much the mutation changed CNTK's output at all (0 = inert on these inputs)
    effect = 0.0
    for ev, base in zip(fixed, baseline_cntk):
        for name, ref in ev.tf.items():
            got, was = ev.cntk.get(name), base.get(name)
            if got is None or was is None or got.shape != was.shape:
                effect = math.inf
                continue
            rms = float(np.sqrt(np.mean(np.square(ref.astype(np.float64))))) or 1.0
            effect = max(effect, float(np.max(np.abs(got.astype(np.float64) - was))) / rms)
    rec["fixed"] = {"n": len(fixed), **{r: any(j[r] for j in judged) for r in ("engine",) + RULES},
                    "max_scaled_error": max(max(j["errors"].values()) for j in judged),
                    "max_abs": max(max(j["max_abs"].values()) for j in judged),
                    "effect": effect, "inert": effect == 0.0}
    rec["seconds"] = round(time.perf_counter() - started, 3)
    return rec


def known_bad(spec: ModelSpec, conv: Conversion, seed: int, examples: int, nfixed: int,
              tmp: Path) -> dict[str, Any]:
    engine = ParityEngine(conv)
    try:
        res = engine.run(max_examples=examples, seed=seed, reproducer_dir=tmp / "repro", layerwise=OFF)
        judged = [judge(ev) for ev in evaluate_fixed(engine, fixed_inputs(engine, nfixed))]
    finally:
        engine.close()
        shutil.rmtree(tmp / "repro", ignore_errors=True)
    return {"model": spec.name, "batch": conv.batch, "engine_detected": not res.passed,
            "stages": sorted({c.stage for c in res.failing_outputs}),
            "scaled_error": {k: c.scaled_error for k, c in res.outputs.items()},
            "budget": {k: c.budget.value for k, c in res.outputs.items()},
            "fixed": {r: any(j[r] for j in judged) for r in ("engine",) + RULES}}


# ------------------------------------------------------------------------------------------------
# report


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
               for name in ("budgets.py", "engine.py", "result.py", "metrics.py")}}


def pct(k: int, n: int) -> str:
    return f"{k}/{n} ({100.0 * k / n:.0f}%)" if n else "-"


def markdown(data: dict[str, Any]) -> str:
    cfg = data["config"]
    ver = data.get("engine", {})
    lines = [(f"# Fidelity ({'quick' if cfg['quick'] else 'full'} run, {data['date']}, "
             f"{data['seconds'] / 60:.1f} min)"), "",
             (f"Engine at commit {ver.get('commit', '?')}"
             f"{' with local edits in pytest_tf2cntk/' if ver.get('package_modified') else ''} "
             f"(budgets.py {ver.get('budgets.py_sha256', '?')})."), "",
             (f"Budget headroom {cfg['headroom']:g} (budgets.DEFAULT_HEADROOM). False alarms: "
             f"{len(cfg['seeds'])} Hypothesis seeds x {cfg['examples']} examples per model. Detection: "
             f"up to {cfg['targets']} targets per mutation kind per distinct graph, engine run of "
             f"{cfg['det_examples']} examples, reference rules on {cfg['fixed']} fixed inputs "
             "(uniform/normal over the whole input domain)."), "",
             "## False alarms on correct conversions", "",
             ("A run (model, seed) counts as a false alarm if any of its examples is flagged; the "
             "reference rules judge exactly the TF/CNTK output pairs the engine produced. "
             "`err/(B/H)` is the worst observed scaled error divided by the budget before headroom "
             "(B / headroom): below 1 means the un-padded composed budget alone would have held."), "",
             ("| model | batch | runs | examples | engine | Polygraphy | torch fp32 | tf2onnx | worst output "
             "| max scaled err | budget B | min headroom | err/(B/H) | max abs err |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    tot = {r: 0 for r in ("engine",) + RULES}
    nruns = 0
    for fa in data["false_alarms"]:
        worst = max(fa["per_output"], key=lambda o: fa["per_output"][o]["error_over_raw_budget"])
        po = fa["per_output"][worst]
        nruns += fa["n_runs"]
        for r in tot:
            tot[r] += fa["failed_runs"][r]
        lines.append(f"| {fa['model']} | {fa['batch']} | {fa['n_runs']} | {fa['n_examples']} | "
                     + " | ".join(str(fa["failed_runs"][r]) for r in ("engine",) + RULES)
                     + f" | {worst} | {po['max_error']:.3g} | {po['budget']:.3g} | {po['min_headroom']:.3g}x "
                     f"| {po['error_over_raw_budget']:.3g} | {po['max_abs']:.2g} |")
    lines.append(f"| **all** | | {nruns} | {sum(f['n_examples'] for f in data['false_alarms'])} | "
                 + " | ".join(f"**{tot[r]}**" for r in ("engine",) + RULES) + " | | | | | | |")
    recs = [r for r in data["mutations"] if r["status"] == "ok"]
    lines += ["", "## Detection of planted CNTK-side bugs", "",
              ("`engine` = the engine's own Hypothesis run (`check_parity(..., cntk_onnx=mutated)`); "
              "the other columns judge TF vs mutated CNTK on the same fixed inputs: `engine rule` is "
              "scaled error <= budget, then the three reference rules. `inert` = the mutation did "
              "not change CNTK's output at all on the fixed inputs (no rule can see it there); "
              "`refused` = CNTK would not load or evaluate the mutated graph (not counted as detected)."),
              "",
              ("| mutation | n | refused | inert | engine | engine rule | Polygraphy | torch fp32 | tf2onnx "
              "| attribution CNTK |"), "|---|---|---|---|---|---|---|---|---|---|"]

    def row(label: str, sel: list[dict], refused: int) -> str:
        n = len(sel)
        det = sum(r["engine"]["detected"] for r in sel)
        att = sum(r["engine"]["detected"] and r["engine"]["attribution_ok"] for r in sel)
        cells = [pct(det, n)] + [pct(sum(r["fixed"][k] for r in sel), n) for k in ("engine",) + RULES]
        return (f"| {label} | {n} | {refused} | {sum(r['fixed']['inert'] for r in sel)} | "
                + " | ".join(cells) + f" | {att}/{det} |")

    for kind in KINDS:
        sel = [r for r in recs if r["kind"] == kind]
        refused = sum(1 for r in data["mutations"] if r["kind"] == kind and r["status"] != "ok")
        if sel or refused:
            lines.append(row(kind, sel, refused))
    lines.append(row("**overall**", recs, sum(1 for r in data["mutations"] if r["status"] != "ok")))
    eff = [r for r in recs if not r["fixed"]["inert"]]
    lines.append(row("overall, non-inert", eff, 0))
    fa_runs = {fa["model"]: fa for fa in data["false_alarms"]}
    lines += ["", "### Per model", "",
              ("`false alarms` repeats the engine / Polygraphy false-alarm runs of the unmutated model: "
              "a rule that already fails the correct conversion \"detects\" every mutation for free."), "",
              ("| model | n | inert | engine | engine rule | Polygraphy | torch fp32 | tf2onnx | weight 1e-4: engine "
              "| weight 1e-4: Polygraphy / torch / tf2onnx | false alarms (engine / Polygraphy) |"),
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for model in dict.fromkeys(r["model"] for r in data["mutations"]):
        sel = [r for r in recs if r["model"] == model]
        small = [r for r in sel if r["kind"] == "weight 1e-4"]
        fa = fa_runs.get(model)
        fa_txt = (f"{fa['failed_runs']['engine']}/{fa['n_runs']} / {fa['failed_runs']['polygraphy']}/{fa['n_runs']}"
                  if fa else "-")
        lines.append(f"| {model} | {len(sel)} | {sum(r['fixed']['inert'] for r in sel)} "
                     f"| {pct(sum(r['engine']['detected'] for r in sel), len(sel))} | "
                     + " | ".join(pct(sum(r["fixed"][k] for r in sel), len(sel)) for k in ("engine",) + RULES)
                     + f" | {pct(sum(r['engine']['detected'] for r in small), len(small))} | "
                     + " / ".join(pct(sum(r["fixed"][k] for r in small), len(small)) for k in RULES)
                     + f" | {fa_txt} |")
    missed = [r for r in recs if not r["engine"]["detected"] and not r["fixed"]["inert"]]
    if missed:
        lines += ["", "### Effective mutations the engine missed", "",
                  ("`effect` = max|CNTK mutated - CNTK original| / rms(TF) on the fixed inputs (largest over "
                  "outputs), to set against the budget (largest over outputs). `caught by` = rules that "
                  "flagged it on the fixed inputs (the engine's own run used Hypothesis inputs)."), "",
                  "| model | mutation | effect | budget | effect / budget | caught by |",
                  "|---|---|---|---|---|---|"]
        for r in missed:
            by = [k for k in ("engine rule",) + RULES if r["fixed"]["engine" if k == "engine rule" else k]]
            b = max(r["engine"]["budget"].values())
            lines.append(f"| {r['model']} | {r['detail']} | {r['fixed']['effect']:.3g} | {b:.3g} "
                         f"| {r['fixed']['effect'] / b:.2f} | {', '.join(by) or 'none'} |")
    wrong = [r for r in recs if r["engine"]["detected"] and not r["engine"]["attribution_ok"]]
    if wrong:
        lines += ["", "### Detections with a stage other than CNTK", ""]
        for r in wrong:
            lines.append(f"- {r['model']}: {r['detail']} -> {r['engine']['stages']}")
    bad = [r for r in data["mutations"] if r["status"] != "ok"]
    if bad:
        lines += ["", "### Refused / errored mutations", ""]
        for r in bad:
            lines.append(f"- {r['model']}: {r['detail']} -> {r['status']}: {r.get('message', '')[:160]}")
    if data["known_bad"]:
        lines += ["", "## Known-bad fixtures (real CNTK bugs)", "",
                  ("| model | batch | engine | stage | scaled err / budget | engine rule | Polygraphy | "
                  "torch fp32 | tf2onnx |"), "|---|---|---|---|---|---|---|---|---|"]
        for kb in data["known_bad"]:
            o = max(kb["scaled_error"], key=lambda k: kb["scaled_error"][k])
            lines.append(f"| {kb['model']} | {kb['batch']} | {'caught' if kb['engine_detected'] else 'MISSED'} "
                         f"| {', '.join(kb['stages']) or '-'} | {kb['scaled_error'][o]:.3g} / {kb['budget'][o]:.3g} | "
                         + " | ".join("yes" if kb["fixed"][k] else "no" for k in ("engine",) + RULES) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 seeds x 5 examples, 2 targets per kind, "
                    "no ResNet50 (a few minutes)")
    ap.add_argument("--models", help="comma-separated subset of model names")
    ap.add_argument("--seeds", type=int, help="Hypothesis seeds per model for false alarms")
    ap.add_argument("--examples", type=int, help="examples per seed")
    ap.add_argument("--targets", type=int, help="targets per mutation kind per model")
    ap.add_argument("--out-dir", default=str(RESULTS))
    ap.add_argument("--report-only", metavar="JSON", help="rewrite the Markdown from a results JSON")
    args = ap.parse_args()
    if args.report_only:
        src = Path(args.report_only)
        md = markdown(json.loads(src.read_text()))
        src.with_suffix(".md").write_text(md)
        print(md)
        return 0
    quick = args.quick
    n_seeds = args.seeds or (3 if quick else 10)
    examples = args.examples or (5 if quick else 20)
    targets = args.targets or (2 if quick else 4)
    det_examples = 5 if quick else 20
    n_fixed = 4 if quick else 10
    seeds = list(range(n_seeds))
    wanted = set(args.models.split(",")) if args.models else None
    specs = [s for s in model_specs() if (wanted is None and not (quick and s.full_only))
             or (wanted is not None and s.name in wanted)]
    started = time.perf_counter()
    data: dict[str, Any] = {
        "config": {"quick": quick, "seeds": seeds, "examples": examples, "targets": targets,
                   "det_examples": det_examples, "fixed": n_fixed, "headroom": budgets_mod.DEFAULT_HEADROOM,
                   "rules": {"polygraphy": "fail if |a-b| > 1e-5 and |a-b|/|b| > 1e-5 (elementwise)",
                             "torch": "fail if |a-b| > 1e-5 + 1.3e-6*|b| (or dtype differs)",
                             "tf2onnx": "fail if |a-b| > 1e-5 + 1e-7*|b|"}},
        "date": time.strftime("%Y-%m-%d %H:%M"), "engine": engine_version(), "host": {"python": platform.python_version(),
                                                          "cpus": os.cpu_count()},
        "false_alarms": [], "mutations": [], "known_bad": []}
    seen_graphs: dict[str, str] = {}
    tmp = Path(tempfile.mkdtemp(prefix="tf2cntk-fidelity-"))
    try:
        for spec in specs:
            t0 = time.perf_counter()
            conv = convert(spec.path(), batch=spec.batch)
            log(f"{spec.name}: batch {spec.batch}, conversion {'cached' if conv.from_cache else 'fresh'} "
                f"({conv.seconds:.1f} s)")
            if spec.known_bad:
                kb = known_bad(spec, conv, 0, det_examples, n_fixed, tmp)
                data["known_bad"].append(kb)
                log(f"  known-bad: engine {'caught' if kb['engine_detected'] else 'MISSED'} {kb['stages']}")
                continue
            fa = false_alarms(spec, conv, seeds, examples, tmp)
            data["false_alarms"].append(fa)
            log(f"  false alarms: {fa['failed_runs']} of {fa['n_runs']} runs "
                f"({time.perf_counter() - t0:.0f} s)")
            fp = graph_fingerprint(conv.onnx_model)
            if fp in seen_graphs:
                log(f"  same graph and weights as {seen_graphs[fp]}: mutations not repeated")
                continue
            seen_graphs[fp] = spec.name
            muts = sample_fidelity(fidelity_faults(conv.onnx_model), targets, spec.name)
            base_engine = ParityEngine(conv)
            try:
                feeds = fixed_inputs(base_engine, n_fixed)
                baseline = [ev.cntk for ev in evaluate_fixed(base_engine, feeds)]
            finally:
                base_engine.close()
            log(f"  {len(muts)} mutations")
            for i, mut in enumerate(muts):
                rec = run_mutation(spec, conv, mut, i, 1000 + i, det_examples, feeds, baseline, tmp)
                data["mutations"].append(rec)
                if rec["status"] == "ok":
                    e, f = rec["engine"], rec["fixed"]
                    log(f"    [{i + 1}/{len(muts)}] {mut.detail[:90]}: engine "
                        f"{'CAUGHT' if e['detected'] else 'missed'} {e['stages'] if e['detected'] else ''} "
                        f"effect {f['effect']:.2g}; fixed {{{', '.join(k for k in ('engine',) + RULES if f[k])}}}")
                else:
                    log(f"    [{i + 1}/{len(muts)}] {mut.detail[:90]}: {rec['status']} {rec.get('message', '')[:120]}")
            log(f"  {spec.name} done in {time.perf_counter() - t0:.0f} s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    data["seconds"] = time.perf_counter() - started
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "fidelity_quick" if quick else "fidelity"
    (out_dir / f"{stem}.json").write_text(json.dumps(data, indent=1, default=str))
    md = markdown(data)
    (out_dir / f"{stem}.md").write_text(md)
    print(md)
    log(f"wrote {out_dir / stem}.json and .md in {data['seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
