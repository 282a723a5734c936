"""Conversion time: cold (fresh cache dir) with and without the CNTK repairs vs cache hit, per
fixture, for MobileNetV2 96x96 and for InceptionV3 75x75 at batch 1 and 2.

    .venv/bin/python benchmarks/conversion.py [--quick]

In one warm process (TensorFlow, Keras and tf2onnx imported before timing; their import time is
reported on its own), for each model:
  cold           convert(path, batch, cache_dir=<fresh temp dir>): load the model, tf2onnx, passes
                 and repairs (with their numeric proofs), validation, cache write. Median of --cold
                 runs (one for InceptionV3).
  cold, off      the same with repairs="off" (--tf2cntk-repairs=off): what the repairs cost.
  hit            convert() again on the filled cache: key (hash of the model files, options,
                 versions, pipeline), metadata read, ONNX checksum. Median of --hits runs.
  hit, new proc  the same hit from a fresh interpreter (what a new pytest session pays), and
                 whether it imported TensorFlow (it should not).
Fixtures at the batch the tests use (4 where CNTK takes it), MobileNetV2 at batch 1. A model
that cannot be converted (without repairs: gru, InceptionV3 at batch 2) is timed too: its error
is cached like a result.
Writes results/conversion.json (conversion_quick.json with --quick).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESULTS = Path(__file__).resolve().parent / "results"

_HIT_SNIPPET = """
import json, sys, time
t0 = time.perf_counter()
from pytest_tf2cntk.convert.pipeline import convert
t1 = time.perf_counter()
try:
    convert(sys.argv[1], batch=int(sys.argv[2]), cache_dir=sys.argv[3])
    ok = True
except Exception as exc:
    ok = type(exc).__name__
t2 = time.perf_counter()
print(json.dumps({"import_ms": (t1 - t0) * 1e3, "hit_ms": (t2 - t1) * 1e3, "ok": ok,
                  "imported_tensorflow": "tensorflow" in sys.modules}))
"""


def log(msg: str) -> None:
    print(f"[conversion {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def models() -> list[tuple[str, Callable[[], Path], int]]:
    manifest = json.loads((ROOT / "fixtures" / "manifest.json").read_text())["fixtures"]
    out: list[tuple[str, Callable[[], Path], int]] = []
    for name, fx in manifest.items():
        batches = fx.get("cntk_batches") or fx.get("cntk_mismatch_batches") or [4]
        batch = 4 if 4 in batches else batches[0]
        out.append((name, lambda p=ROOT / "fixtures" / fx["file"]: p, batch))

    def mobilenet() -> Path:
        from tests.support.zoo import application_model
        return application_model("mobilenetv2_96")

    def inception() -> Path:
        from tests.support.zoo import application_model
        return application_model("inceptionv3_75")

    out.append(("mobilenetv2_96", mobilenet, 1))
    out += [("inceptionv3_75", inception, 1), ("inceptionv3_75", inception, 2)]
    return out


HEAVY = {"inceptionv3_75"}  # ~20 s a conversion: one cold run each way


def timed_convert(path: Path, batch: int, cache_dir: Path, repairs: str = "on") -> tuple[float, Any]:
    from pytest_tf2cntk.convert.pipeline import convert

    t0 = time.perf_counter()
    try:
        conv = convert(path, batch=batch, cache_dir=cache_dir, repairs=repairs)
        status: Any = conv
    except Exception as exc:  # noqa: BLE001 (a fixture that cannot convert: its error is cached too)
        status = exc
    return time.perf_counter() - t0, status


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 cold run and 3 hits per model")
    ap.add_argument("--cold", type=int, help="cold conversions per model (default 3, quick 1)")
    ap.add_argument("--hits", type=int, help="cache hits per model (default 7, quick 3)")
    ap.add_argument("--out-dir", default=str(RESULTS))
    args = ap.parse_args()
    n_cold = args.cold or (1 if args.quick else 3)
    n_hits = args.hits or (3 if args.quick else 7)
    started = time.perf_counter()

    t0 = time.perf_counter()
    import tensorflow  # noqa: F401
    t1 = time.perf_counter()
    import keras  # noqa: F401
    import tf2onnx  # noqa: F401
    t2 = time.perf_counter()
    imports = {"tensorflow_ms": (t1 - t0) * 1e3, "keras_tf2onnx_ms": (t2 - t1) * 1e3}
    log(f"imports: {imports}")

    rows = []
    with tempfile.TemporaryDirectory(prefix="tf2cntk-convbench-") as tmp:
        # one throw-away conversion so that first-use costs inside TF/tf2onnx are not charged to
        # whichever model comes first
        timed_convert(ROOT / "fixtures" / "mlp.keras", 4, Path(tmp) / "warmup")
        for name, get_path, batch in models():
            path = get_path()
            cold, cold_off, status, status_off = [], [], None, None
            for k in range(1 if name in HEAVY else n_cold):
                seconds, status = timed_convert(path, batch, Path(tmp) / f"{name}-{batch}-cold{k}")
                cold.append(seconds)
                seconds, status_off = timed_convert(path, batch, Path(tmp) / f"{name}-{batch}-off{k}", "off")
                cold_off.append(seconds)
            cache = Path(tmp) / f"{name}-{batch}-cold0"
            hits = []
            for _ in range(n_hits):
                seconds, hit = timed_convert(path, batch, cache)
                hits.append(seconds)
                if not isinstance(hit, Exception) and not hit.from_cache:
                    raise SystemExit(f"{name}: expected a cache hit")
            proc = subprocess.run([sys.executable, "-c", _HIT_SNIPPET, str(path), str(batch), str(cache)],
                                  capture_output=True, text=True, cwd=str(ROOT), env=dict(os.environ), check=False)
            try:
                fresh = json.loads(proc.stdout.strip().splitlines()[-1])
            except (IndexError, ValueError):
                fresh = {"error": proc.stderr[-500:]}
            size = path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*")
                                                                  if p.is_file())
            row = {"model": name, "batch": batch, "model_bytes": size,
                   "status": "ok" if not isinstance(status, Exception) else
                   f"{type(status).__name__} (cached error)",
                   "onnx_bytes": status.onnx_path.stat().st_size if not isinstance(status, Exception) else None,
                   "status_repairs_off": "ok" if not isinstance(status_off, Exception) else
                   f"{type(status_off).__name__} (cached error)",
                   "passes": [p.name for p in status.passes] if not isinstance(status, Exception) else [],
                   "repairs": [f"{r.name} ({r.changed})" for r in status.repairs]
                   if not isinstance(status, Exception) else [],
                   "cold_ms": [s * 1e3 for s in cold], "hit_ms": [s * 1e3 for s in hits],
                   "cold_median_ms": statistics.median(cold) * 1e3,
                   "cold_off_ms": [s * 1e3 for s in cold_off],
                   "cold_off_median_ms": statistics.median(cold_off) * 1e3,
                   "hit_median_ms": statistics.median(hits) * 1e3,
                   "hit_fresh_process": fresh}
            row["speedup"] = row["cold_median_ms"] / row["hit_median_ms"]
            rows.append(row)
            log(f"{name} b{batch}: cold {row['cold_median_ms']:.0f} ms (repairs off "
                f"{row['cold_off_median_ms']:.0f} ms), hit {row['hit_median_ms']:.1f} ms, "
                f"fresh-process hit {fresh.get('hit_ms', float('nan')):.1f} ms "
                f"(TF imported: {fresh.get('imported_tensorflow')})")
    data = {"date": time.strftime("%Y-%m-%d %H:%M"), "quick": args.quick,
            "seconds": time.perf_counter() - started, "imports": imports,
            "host": {"python": platform.python_version(), "cpus": os.cpu_count()},
            "cold_runs": n_cold, "hit_runs": n_hits, "results": rows}
    lines = [(f"# Conversion time ({data['date']}; median of {n_cold} cold, {n_hits} hits; "
             f"TF import {imports['tensorflow_ms']:.0f} ms not included)"), "",
             ("| model | batch | status | repairs | cold | cold, repairs off (status) | cache hit | speedup "
              "| hit, new process (+ package import) | new process imports TF |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f = r["hit_fresh_process"]
        fresh_txt = (f"{f['hit_ms']:.1f} ms (+{f['import_ms']:.0f} ms)" if "hit_ms" in f else "error")
        lines.append(f"| {r['model']} | {r['batch']} | {r['status']} | {', '.join(r['repairs']) or '-'} "
                     f"| {r['cold_median_ms']:.0f} ms | {r['cold_off_median_ms']:.0f} ms ({r['status_repairs_off']}) "
                     f"| {r['hit_median_ms']:.1f} ms | {r['speedup']:.0f}x | {fresh_txt} "
                     f"| {'yes' if f.get('imported_tensorflow') else 'no'} |")
    md = "\n".join(lines)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "conversion_quick" if args.quick else "conversion"
    (out_dir / f"{stem}.json").write_text(json.dumps(data, indent=1))
    (out_dir / f"{stem}.md").write_text(md + "\n")
    print(md)
    log(f"wrote {out_dir / stem}.json/.md in {data['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
