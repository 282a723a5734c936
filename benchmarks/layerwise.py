"""Layerwise localization: its cost next to a parity example, and how often it names the right node.

    .venv/bin/python benchmarks/layerwise.py [--quick] [--per-kind N] [--skip-cost] [--skip-faults]

(a) Cost. MobileNetV2 96x96 at batch 8, one input: one plain parity example
    (``ParityEngine.evaluate``: TF + CNTK + compare) against one layerwise pass
    (``layerwise.localize``: every intermediate in CNTK and ONNX Runtime, every node alone in ONNX
    Runtime), each on a fresh CNTK worker, cold (first call: CNTK's first eval of a model is slow)
    then warm (second call). Memory: tracemalloc peak of the host's Python heap (numpy arrays
    included) during the call, and the worker's peak resident set (VmHWM of /proc/PID/status: a
    fresh worker per measurement, so the peak is that phase's). The layerwise pass is also run
    with a small chunk to show the memory/time trade of streaming.

(b) Hit rate. Faults of several kinds (tests/test_layerwise.py: fault_candidates) are planted in
    the ONNX graph given to CNTK only, in the fixtures mlp, cnn_bn, two_io, text_cnn and in
    MobileNetV2 96x96 (batch 2); per kind up to N mutated nodes, chosen with a seeded RNG. A fault
    is *active* when the mutated node's output differs from the original's on the input (ONNX
    Runtime on both graphs); a hit is ``localize(...).culprit.node == mutated node``. Inactive
    faults are listed apart (the right answer there is "no culprit"). Clean runs of every model
    on several inputs count false alarms.

Writes results/layerwise.{json,md} (layerwise_quick.* with --quick). Progress goes to stderr.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnx  # noqa: E402

from pytest_tf2cntk.cntk.client import CNTKWorker  # noqa: E402
from pytest_tf2cntk.convert import onnxrt  # noqa: E402
from pytest_tf2cntk.convert.pipeline import Conversion, convert  # noqa: E402
from pytest_tf2cntk.parity.engine import ParityEngine  # noqa: E402
from pytest_tf2cntk.parity.inputs import InputRecipe, materialize  # noqa: E402
from pytest_tf2cntk.parity.localize.report import CONFIRMED  # noqa: E402
from pytest_tf2cntk.parity.localize.scan import localize  # noqa: E402
from tests.support.faults import LOCALIZATION_KINDS as KINDS  # noqa: E402
from tests.support.faults import Fault, feeds_for, localization_faults, pick_localization  # noqa: E402
from tests.support.zoo import application_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
FIXTURES = ROOT / "fixtures"


def log(msg: str) -> None:
    print(f"[layerwise {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def vm_hwm_mb(pid: int | None) -> float | None:
    if not pid:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def measure(fn: Callable[[], Any], worker: CNTKWorker) -> tuple[Any, dict[str, float | None]]:
    gc.collect()
    tracemalloc.start()
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return out, {"seconds": round(seconds, 3), "host_python_peak_mb": round(peak / 1e6, 1),
                 "worker_vmhwm_mb": vm_hwm_mb(worker.pid),
                 "host_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)}


def image_feeds(conv: Conversion, seed: int = 11) -> dict[str, np.ndarray]:
    from pytest_tf2cntk.convert.domains import derive_domains

    doms = derive_domains(conv.onnx_model)
    return materialize({n: InputRecipe("uniform", seed, 0.0, 1.0, "none", 0.0) for n in doms}, doms)


# ------------------------------------------------------------------------------------------------
# (a) cost


def cost(batch: int, quick: bool) -> dict[str, Any]:
    conv = convert(application_model("mobilenetv2_96"), batch=batch)
    feeds = image_feeds(conv)
    out: dict[str, Any] = {"model": "mobilenetv2_96", "batch": batch, "nodes": len(conv.onnx_model.graph.node),
                           "load_average_before": [round(x, 2) for x in os.getloadavg()]}
    conv.tf_model  # load TF outside the measurements (the engine holds it already in real use)

    with CNTKWorker() as w:
        engine = ParityEngine(conv, "cpu", worker=w)
        try:
            _, out["parity_evaluate_cold"] = measure(lambda: engine.evaluate(feeds), w)
            ev, out["parity_evaluate_warm"] = measure(lambda: engine.evaluate(feeds), w)
            out["parity_passed"] = ev.passed
        finally:
            engine.close()
    log(f"parity evaluate: {out['parity_evaluate_cold']} / {out['parity_evaluate_warm']}")

    with CNTKWorker() as w:
        loc, out["localize_cold"] = measure(lambda: localize(conv, feeds, worker=w), w)
        loc2, out["localize_warm"] = measure(lambda: localize(conv, feeds, worker=w), w)
    out["localize_memory"] = loc.memory
    out["localize_timings_cold"] = loc.timings
    out["localize_timings_warm"] = loc2.timings
    out["localize_culprit"] = loc.culprit.node if loc.culprit else None
    out["localize_checked"] = f"{loc.checked}/{loc.total}"
    log(f"localize: {out['localize_cold']} / {out['localize_warm']} memory {loc.memory}")

    if not quick:
        with CNTKWorker() as w:
            localize(conv, feeds, worker=w, chunk=16)  # warm the worker and the session cache
            loc3, out["localize_chunk16_warm"] = measure(lambda: localize(conv, feeds, worker=w, chunk=16), w)
        out["localize_chunk16_memory"] = loc3.memory
        log(f"localize chunk=16: {out['localize_chunk16_warm']} memory {loc3.memory}")
    out["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    warm_p, warm_l = out["parity_evaluate_warm"]["seconds"], out["localize_warm"]["seconds"]
    out["localize_over_parity_warm"] = round(warm_l / warm_p, 2) if warm_p else None
    return out


# ------------------------------------------------------------------------------------------------
# (b) hit rate


def active(conv: Conversion, fault: Fault, planted: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> bool:
    """Does the mutated node compute something else on these inputs? (ORT on both graphs)."""
    node = next(n for n in conv.onnx_model.graph.node if n.name == fault.node)
    outs = [t for t in node.output if t]
    try:
        a = onnxrt.session(conv.onnx_model, "cpu", extra_outputs=outs).run(outs, feeds)
        b = onnxrt.session(planted, "cpu", extra_outputs=outs).run(outs, feeds)
    except Exception:
        return True  # ORT cannot run the mutated graph (e.g. a shape it rejects): it is different
    return any(x.shape != y.shape or not np.array_equal(x, y, equal_nan=True) for x, y in zip(a, b))


def run_faults(name: str, conv: Conversion, per_kind: int, tmp: Path, worker: CNTKWorker) -> list[dict[str, Any]]:
    feeds = feeds_for(conv)
    rows = []
    for k, fault in enumerate(pick_localization(localization_faults(conv.onnx_model, feeds), per_kind, name)):
        planted = fault.planted(conv.onnx_model)
        path = tmp / f"{name}-{k}.onnx"
        onnx.save(planted, str(path))
        row: dict[str, Any] = {"model": name, "kind": fault.kind, "node": fault.node, "detail": fault.detail,
                               "active": active(conv, fault, planted, feeds)}
        t0 = time.perf_counter()
        try:
            loc = localize(conv, feeds, cntk_onnx=path, worker=worker, stop_at_culprit=True)
        except Exception as exc:  # CNTK refuses the mutated graph: not a localization case
            row.update(outcome="refused", error=str(exc).splitlines()[0][:200])
            rows.append(row)
            continue
        row["seconds"] = round(time.perf_counter() - t0, 3)
        c = loc.culprit
        row.update(culprit=c.node if c else None, ratio=c.ratio if c else None,
                   confirmation=loc.confirmation.status if loc.confirmation else None,
                   culprit_tf_layer=c.tf_layer if c else None, cntk_error=bool(c and c.metrics is None))
        if row["active"]:
            row["outcome"] = "hit" if c is not None and c.node == fault.node else (
                "miss (no culprit)" if c is None else "miss (other node)")
        else:
            row["outcome"] = "inactive, no culprit" if c is None else "inactive, blamed a node"
        rows.append(row)
        log(f"{name} {fault.kind:22} {row['outcome']:18} {fault.node} -> {row['culprit']} "
            f"({row['seconds']:.1f} s)")
        path.unlink()
    return rows


def false_alarms(name: str, conv: Conversion, seeds: int, worker: CNTKWorker) -> dict[str, Any]:
    from pytest_tf2cntk.convert.domains import derive_domains

    doms = derive_domains(conv.onnx_model)
    runs, alarms, worst = 0, [], 0.0
    for k in range(seeds):
        dist = ("uniform", "normal", "ramp", "constant")[k % 4]
        feeds = materialize({n: InputRecipe(dist, 1000 + k, 0.0, 1.0, "none", 0.0) for n in doms}, doms)
        loc = localize(conv, feeds, worker=worker, confirm=False)
        runs += 1
        worst = max([worst] + [n.ratio for n in loc.nodes if n.ratio is not None and np.isfinite(n.ratio)])
        if loc.culprit is not None:
            alarms.append({"input": dist, "node": loc.culprit.node, "ratio": loc.culprit.ratio})
    return {"model": name, "runs": runs, "false_alarms": len(alarms), "alarms": alarms,
            "max_ratio": round(worst, 4)}


def hit_rate(per_kind: int, mnv2_per_kind: int, fa_seeds: int, mnv2_fa_seeds: int) -> dict[str, Any]:
    models = {name: convert(FIXTURES / f"{name}.keras", batch=4) for name in ("mlp", "cnn_bn", "two_io", "text_cnn")}
    mnv2 = convert(application_model("mobilenetv2_96"), batch=2)
    rows: list[dict[str, Any]] = []
    clean = []
    with tempfile.TemporaryDirectory(prefix="tf2cntk-layerwise-bench-") as tmp, CNTKWorker() as w:
        for name, conv in models.items():
            rows += run_faults(name, conv, per_kind, Path(tmp), w)
            clean.append(false_alarms(name, conv, fa_seeds, w))
        rows += run_faults("mobilenetv2_96", mnv2, mnv2_per_kind, Path(tmp), w)
        clean.append(false_alarms("mobilenetv2_96", mnv2, mnv2_fa_seeds, w))
    by_kind: dict[str, dict[str, int]] = {}
    for r in rows:
        k = by_kind.setdefault(r["kind"], {"planted": 0, "active": 0, "hit": 0, "refused": 0, "inactive_blamed": 0})
        k["planted"] += 1
        if r["outcome"] == "refused":
            k["refused"] += 1
            continue
        if r["active"]:
            k["active"] += 1
            k["hit"] += r["outcome"] == "hit"
        else:
            k["inactive_blamed"] += r["outcome"] == "inactive, blamed a node"
    total_active = sum(k["active"] for k in by_kind.values())
    total_hit = sum(k["hit"] for k in by_kind.values())
    return {"faults": rows, "by_kind": {k: by_kind[k] for k in KINDS if k in by_kind},
            "active": total_active, "hits": total_hit,
            "hit_rate": round(total_hit / total_active, 4) if total_active else None,
            "confirmed_in_isolation": sum(1 for r in rows if r.get("outcome") == "hit"
                                          and r.get("confirmation") == CONFIRMED),
            "clean": clean}


# ------------------------------------------------------------------------------------------------
# report


def markdown(data: dict[str, Any]) -> str:
    lines = ["# Layerwise localization", "",
             f"{data['when']} on {data['machine']}; `benchmarks/layerwise.py{' --quick' if data['quick'] else ''}`.",
             ""]
    c = data.get("cost")
    if c:
        def row(label: str, m: dict[str, Any]) -> str:
            return (f"| {label} | {m['seconds']:.2f} | {m['host_python_peak_mb']:.0f} | "
                    f"{(m['worker_vmhwm_mb'] or 0):.0f} |")
        lines += [f"## Cost: MobileNetV2 96x96, batch {c['batch']} ({c['nodes']} ONNX nodes), one input", "",
                  f"Load average (1, 5, 15 min) before {c.get('load_average_before')}, after "
                  f"{c.get('load_average_after')}: the 2 cores are shared, and a CNTK eval takes up to "
                  "25x longer while other processes run, so compare the rows with each other.", "",
                  "| measurement | seconds | host Python peak MB (tracemalloc) | CNTK worker peak RSS MB (VmHWM) |",
                  "|---|---:|---:|---:|",
                  row("parity example, cold (`ParityEngine.evaluate`)", c["parity_evaluate_cold"]),
                  row("parity example, warm", c["parity_evaluate_warm"]),
                  row("layerwise pass, cold (`localize`)", c["localize_cold"]),
                  row("layerwise pass, warm", c["localize_warm"])]
        if "localize_chunk16_warm" in c:
            lines.append(row("layerwise pass, warm, chunk=16", c["localize_chunk16_warm"]))
        lines += ["", f"Warm layerwise pass = {c['localize_over_parity_warm']}x a warm parity example. "
                  f"Tensors held at once: {c['localize_memory']['peak_held_mb']} MB (default chunk, "
                  f"{c['localize_memory']['chunks']} CNTK evals)"
                  + (f", {c['localize_chunk16_memory']['peak_held_mb']} MB with chunk=16 "
                     f"({c['localize_chunk16_memory']['chunks']} evals)" if "localize_chunk16_memory" in c else "")
                  + f", against {c['localize_memory']['all_intermediates_mb']} MB for every intermediate of "
                  "both sides. Phases of the warm pass (s): "
                  + ", ".join(f"{k} {v:.2f}" for k, v in c["localize_timings_warm"].items()) + ".", ""]
    h = data.get("hits")
    if h:
        lines += ["## Planted faults (CNTK-bound graph only)", "",
                  f"Hit rate: **{h['hits']}/{h['active']}** active faults localized to the mutated node "
                  f"({(h['hit_rate'] or 0):.0%}); {h['confirmed_in_isolation']} of the hits confirmed in isolation.", "",
                  "| kind | planted | active | hit | hit rate | CNTK refused | inactive but blamed |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for kind, k in h["by_kind"].items():
            rate = f"{k['hit'] / k['active']:.0%}" if k["active"] else "-"
            lines.append(f"| {kind} | {k['planted']} | {k['active']} | {k['hit']} | {rate} | {k['refused']} | "
                         f"{k['inactive_blamed']} |")
        lines += ["", "| model | kind | mutated node | outcome | culprit ratio | confirmation |", "|---|---|---|---|---:|---|"]
        for r in h["faults"]:
            ratio = "-" if r.get("ratio") is None else f"{r['ratio']:.3g}"
            node = "/".join(r["node"].split("/")[1:]) or r["node"]  # without the model's own scope
            lines.append(f"| {r['model']} | {r['kind']} | `{node}` | {r['outcome']} | {ratio} | "
                         f"{r.get('confirmation') or '-'} |")
        lines += ["", "## Clean conversions (false alarms)", "",
                  "| model | runs | false alarms | largest local error / budget |", "|---|---:|---:|---:|"]
        for cl in h["clean"]:
            lines.append(f"| {cl['model']} | {cl['runs']} | {cl['false_alarms']} | {cl['max_ratio']:.3g} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--per-kind", type=int, default=None, help="faults per kind and fixture (default 3, quick 1)")
    ap.add_argument("--skip-cost", action="store_true", help="keep the last cost measurement")
    ap.add_argument("--skip-faults", action="store_true", help="keep the last hit-rate measurement")
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    per_kind = args.per_kind or (1 if args.quick else 3)
    data: dict[str, Any] = {"when": time.strftime("%Y-%m-%d %H:%M"), "quick": args.quick,
                            "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"}
    started = time.perf_counter()
    if not args.skip_cost:
        data["cost"] = cost(args.batch, args.quick)
    if not args.skip_faults:
        data["hits"] = hit_rate(per_kind, 2 if args.quick else 3, 2 if args.quick else 4, 2 if args.quick else 4)
    data["seconds"] = round(time.perf_counter() - started, 1)
    RESULTS.mkdir(exist_ok=True)
    stem = "layerwise_quick" if args.quick else "layerwise"
    previous = RESULTS / f"{stem}.json"
    if previous.exists():  # a skipped part keeps its last measurement
        old = json.loads(previous.read_text())
        for part in ("cost", "hits"):
            if part not in data and part in old:
                data[part] = old[part]
    (RESULTS / f"{stem}.json").write_text(json.dumps(data, indent=1, default=str))
    (RESULTS / f"{stem}.md").write_text(markdown(data))
    print(markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
