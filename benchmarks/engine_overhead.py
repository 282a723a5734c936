"""What the parity engine costs on top of running TF and CNTK themselves.

    .venv/bin/python benchmarks/engine_overhead.py [--quick] [--profile]

For each model, in one process and on the same inputs, interleaved round by round after a
warm-up, it times:
  raw TF      conv.tf_model.run(feeds)               (in-process TensorFlow)
  raw CNTK    worker.eval(loaded, feeds)             (worker round trip, the engine's own worker)
  evaluate    ParityEngine.evaluate(feeds)           (CNTK submitted async, TF meanwhile, compare)
  run         ParityEngine.run(n, seed) / examples   (Hypothesis, inputs, ORT triage, verdict, report)
and reports medians and overhead = engine / (raw TF + raw CNTK) - 1. The engine overlaps CNTK
(another process) with TF, so it may come in under the sum; max(TF, CNTK) is the floor of that.
Every evaluate inside run is timed too, so the run figure comes two ways: the mean (what a user
waits, CPU stolen by other processes included) and a robust one (median evaluate inside run x
evaluations per example + time outside evaluate per example). On a shared 2-core machine a CNTK
eval sometimes takes 5x its median while another process runs; the robust figure ignores that.
Target: run overhead < 15 % for MobileNetV2 96x96 at batch 8.

--profile adds a cProfile of one engine.run per model (top functions by cumulative and own time).
Writes results/engine_overhead.json (engine_overhead_quick.json with --quick).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np

from pytest_tf2cntk.convert.pipeline import convert
from pytest_tf2cntk.parity.inputs import InputRecipe, materialize
from pytest_tf2cntk.parity.engine import ParityEngine

RESULTS = Path(__file__).resolve().parent / "results"
TARGET = 0.15


def log(msg: str) -> None:
    print(f"[overhead {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def models() -> list[tuple[str, Callable[[], Path], int]]:
    def zoo(name: str) -> Callable[[], Path]:
        def get() -> Path:
            from tests.support.zoo import application_model
            return application_model(name)
        return get

    return [("cnn_bn", lambda: ROOT / "fixtures" / "cnn_bn.keras", 4),
            ("mobilenetv2_96", zoo("mobilenetv2_96"), 8)]


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def profile_run(engine: ParityEngine, examples: int, seed: int) -> dict[str, Any]:
    prof = cProfile.Profile()
    prof.enable()
    res = engine.run(max_examples=examples, seed=seed)
    prof.disable()
    out: dict[str, Any] = {"seconds": res.seconds, "examples": res.examples}
    for key in ("cumulative", "tottime"):
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats(key).print_stats(25)
        out[key] = buf.getvalue()
    return out


def measure(name: str, path: Path, batch: int, reps: int, run_examples: int,
            profile: bool) -> dict[str, Any]:
    conv = convert(path, batch=batch)
    engine = ParityEngine(conv)
    try:
        worker, loaded = engine.cntk.worker, engine.cntk.loaded
        feeds_list = []
        for k in range(8):
            recipes = {n: InputRecipe("uniform" if k % 2 == 0 else "normal", 100 + 13 * k + j, 0.0, 1.0,
                                      "none", 0.0) for j, n in enumerate(engine.domains)}
            feeds_list.append(materialize(recipes, engine.domains))
        cntk_feeds = [engine.cntk.feeds(f) for f in feeds_list]  # the dtypes the engine sends

        # warm up every path (TF tracing, CNTK first eval, ORT session, Hypothesis import)
        for f, cf in zip(feeds_list[:3], cntk_feeds[:3]):
            conv.tf_model.run(f)
            worker.eval(loaded, cf)
            engine.evaluate(f)
        engine.run(max_examples=3, seed=12345)

        # time every evaluate the engine makes inside run() (a pure timing wrapper)
        in_run: list[float] = []
        original = engine.evaluate

        def evaluate(feeds: dict[str, np.ndarray], with_ort: bool = False) -> Any:
            t0 = time.perf_counter()
            ev = original(feeds, with_ort)
            in_run.append(time.perf_counter() - t0)
            return ev

        t_tf: list[float] = []
        t_cntk: list[float] = []
        t_eval: list[float] = []
        runs = []
        for r in range(reps):
            for i, (f, cf) in enumerate(zip(feeds_list, cntk_feeds)):
                # rotate the order so no path always runs right after another one
                steps = [lambda f=f: t_tf.append(timed(lambda: conv.tf_model.run(f))),
                         lambda cf=cf: t_cntk.append(timed(lambda: worker.eval(loaded, cf))),
                         lambda f=f: t_eval.append(timed(lambda: original(f)))]
                for s in steps[(r + i) % 3:] + steps[:(r + i) % 3]:
                    s()
            before = dict(engine.timings)
            del in_run[:]
            engine.evaluate = evaluate  # type: ignore[method-assign]
            try:
                res = engine.run(max_examples=run_examples, seed=r)
            finally:
                del engine.evaluate
            runs.append({"seconds": res.seconds, "examples": res.examples, "passed": res.passed,
                         "evaluations": len(in_run), "evaluate_s": list(in_run),
                         "outside_evaluate_s": res.seconds - sum(in_run),
                         "timings": {k: engine.timings[k] - before[k] for k in before}})
        tf_m, cntk_m, ev_m = med(t_tf), med(t_cntk), med(t_eval)
        raw = tf_m + cntk_m
        run_mean = med([ri["seconds"] / ri["examples"] for ri in runs])
        all_in_run = [t for ri in runs for t in ri["evaluate_s"]]
        evals_per_example = med([ri["evaluations"] / ri["examples"] for ri in runs])
        outside = med([ri["outside_evaluate_s"] / ri["examples"] for ri in runs])
        # robust to other processes stealing the CPU now and then: median evaluate inside run
        run_robust = med(all_in_run) * evals_per_example + outside
        out = {"model": name, "batch": batch,
               "input_shapes": {k: list(v.shape) for k, v in feeds_list[0].items()},
               "reps": reps, "raw_samples": len(t_tf), "run_examples": run_examples,
               "median_ms": {"tf": tf_m * 1e3, "cntk": cntk_m * 1e3, "raw_sum": raw * 1e3,
                             "raw_max": max(tf_m, cntk_m) * 1e3, "evaluate": ev_m * 1e3,
                             "evaluate_in_run": med(all_in_run) * 1e3,
                             "run_per_example": run_mean * 1e3, "run_per_example_robust": run_robust * 1e3,
                             "outside_evaluate_per_example": outside * 1e3},
               "evaluations_per_example": evals_per_example,
               "overhead": {"evaluate": ev_m / raw - 1, "run": run_mean / raw - 1,
                            "run_robust": run_robust / raw - 1},
               "spread_ms": {"tf_p90": float(np.percentile(t_tf, 90)) * 1e3,
                             "cntk_p90": float(np.percentile(t_cntk, 90)) * 1e3,
                             "evaluate_in_run_max": max(all_in_run) * 1e3},
               "target": TARGET, "runs": [{k: v for k, v in ri.items() if k != "evaluate_s"} for ri in runs]}
        tot = {k: sum(ri["timings"][k] for ri in runs) for k in runs[0]["timings"]}
        n_ex = sum(ri["examples"] for ri in runs)
        secs = sum(ri["seconds"] for ri in runs)
        out["run_breakdown_ms_per_example"] = {**{k: v / n_ex * 1e3 for k, v in tot.items()},
                                               "other": (secs - sum(tot.values())) / n_ex * 1e3,
                                               "total": secs / n_ex * 1e3}
        if profile:
            out["profile"] = profile_run(engine, run_examples, 999)
        return out
    finally:
        engine.close()


def table(results: list[dict[str, Any]]) -> str:
    lines = [("| model | batch | raw TF | raw CNTK | raw sum | engine.evaluate | overhead | run / example "
             "(median run) | overhead | (best run) | overhead | (robust) | overhead | target |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        m, o = r["median_ms"], r["overhead"]
        best = min(ri["seconds"] / ri["examples"] for ri in r["runs"]) * 1e3
        # the target is for a real model; a 2 ms fixture measures the engine's fixed costs
        target = "-" if r["model"] != "mobilenetv2_96" else \
            f"<{TARGET:.0%} {'OK' if o['run_robust'] < TARGET else 'OVER'}"
        lines.append(f"| {r['model']} | {r['batch']} | {m['tf']:.2f} ms | {m['cntk']:.2f} ms | {m['raw_sum']:.2f} ms "
                     f"| {m['evaluate']:.2f} ms | {o['evaluate']:+.1%} | {m['run_per_example']:.2f} ms "
                     f"| {o['run']:+.1%} | {best:.2f} ms | {best / m['raw_sum'] - 1:+.1%} "
                     f"| {m['run_per_example_robust']:.2f} ms | {o['run_robust']:+.1%} | {target} |")
    lines += ["", ("Run figures: `median run` = median over runs of run seconds / examples (what a user "
              "waits, CPU stolen by other processes included); `best run` = the fastest run; `robust` = "
              "median evaluate inside run x evaluations per example + the run's time outside evaluate "
              "per example. The target is judged on `robust`."), "",
              ("Where a run's time goes (ms per example, engine timers; `cntk` = wait for CNTK after TF "
              "finished; `other` = Hypothesis, verdict bookkeeping, report, version probe):"), "",
              "| model | evaluations / example | tf | cntk | ort | compare | inputs | other | total |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        b = r["run_breakdown_ms_per_example"]
        lines.append(f"| {r['model']} | {r['evaluations_per_example']:.2f} | {b['tf']:.2f} | {b['cntk']:.2f} "
                     f"| {b['ort']:.2f} | {b['compare']:.2f} | {b['inputs']:.2f} | {b['other']:.2f} "
                     f"| {b['total']:.2f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds (about a minute)")
    ap.add_argument("--profile", action="store_true", help="cProfile one engine.run per model")
    ap.add_argument("--out-dir", default=str(RESULTS))
    ap.add_argument("--report-only", metavar="JSON", help="rewrite the Markdown from a results JSON")
    args = ap.parse_args()
    if args.report_only:
        src = Path(args.report_only)
        data = json.loads(src.read_text())
        md = table(data["results"])
        load = data["host"].get("loadavg_at_start", [float("nan")])[0]
        src.with_suffix(".md").write_text(
            f"# Engine overhead ({data['date']}, {data['seconds']:.0f} s, load average {load:.1f} at start, "
            f"{data['host']['loadavg_at_end'][0]:.1f} at end)\n\n{md}\n")
        print(md)
        return 0
    reps = 3 if args.quick else 8
    run_examples = 10 if args.quick else 20
    started = time.perf_counter()
    load_start = os.getloadavg()
    results = []
    for name, path, batch in models():
        t0 = time.perf_counter()
        r = measure(name, path(), batch, reps, run_examples, args.profile)
        results.append(r)
        log(f"{name}: {json.dumps(r['median_ms'])} overhead {r['overhead']} ({time.perf_counter() - t0:.0f} s)")
        if args.profile:
            print(f"\n===== {name}: cProfile of one engine.run ({r['profile']['examples']} examples, "
                  f"{r['profile']['seconds']:.2f} s)\n{r['profile']['cumulative']}\n{r['profile']['tottime']}")
    data = {"date": time.strftime("%Y-%m-%d %H:%M"), "quick": args.quick, "seconds": time.perf_counter() - started,
            "host": {"python": platform.python_version(), "cpus": os.cpu_count(),
                     "loadavg_at_start": load_start, "loadavg_at_end": os.getloadavg()},
            "results": results}
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "engine_overhead_quick" if args.quick else "engine_overhead"
    (out_dir / f"{stem}.json").write_text(json.dumps(data, indent=1))
    md = table(results)
    (out_dir / f"{stem}.md").write_text(
        f"# Engine overhead ({data['date']}, {data['seconds']:.0f} s, load average "
        f"{load_start[0]:.1f} at start, {data['host']['loadavg_at_end'][0]:.1f} at end)\n\n{md}\n")
    print(md)
    log(f"wrote {out_dir / stem}.json/.md in {data['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
