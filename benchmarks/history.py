"""What the run history costs: recording a run, and reporting over a large history.

    .venv/bin/python benchmarks/history.py [--runs 100] [--outputs 100] [--json benchmarks/results/history.json]

* record: one run with 100 outputs (10 models x 10 outputs, plus 100 layerwise rows) into a file
  that already holds the history, i.e. what the plugin adds at the end of a pytest session;
  timed ``--records`` times (target: a few ms)
* report: ``--runs`` x ``--outputs`` result rows (10,000 by default): load_history, a drift
  judge, build_report, and rendering to Markdown, CSV and HTML (the HTML includes the PNG plots)

Prints a table and writes the results as JSON (default benchmarks/results/history.json).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.support builds the synthetic records

from pytest_tf2cntk.history import report as R  # noqa: E402
from pytest_tf2cntk.history import store as H  # noqa: E402
from pytest_tf2cntk.history.drift import DriftJudge  # noqa: E402
from pytest_tf2cntk.history.frame import load_history  # noqa: E402
from pytest_tf2cntk.history.records import CheckRecord  # noqa: E402
from pytest_tf2cntk.history.store import RunInfo  # noqa: E402
from pytest_tf2cntk.parity.localize.report import LayerRow  # noqa: E402
from tests.support.synthetic import VERSIONS, make_result  # noqa: E402

MODELS = 10


def one_run(rng: random.Random, outputs: int, i: int) -> tuple[RunInfo, list[CheckRecord], list[LayerRow]]:
    per_model = max(1, outputs // MODELS)
    results = [make_result(f"models/model_{m}.keras",
                           errors={f"out_{k}": 1e-7 * (1 + k) * math.exp(rng.gauss(0, 0.3)) for k in range(per_model)})
               for m in range(MODELS)]
    layers = [LayerRow(f"models/model_{m}.keras", "cpu", f"node_{k}", ("Conv", "Gemm", "Relu", "Add", "Softmax")[k % 5],
                       f"layer_{k}", 1e-7 * math.exp(rng.gauss(0, 0.3)), 1e-5)
              for m in range(MODELS) for k in range(per_model)]
    run = RunInfo(1.7e9 + 3600 * i, "bench", "%040x" % rng.getrandbits(160), dict(VERSIONS), {"max_examples": 20})
    return run, results, layers


def timed(fn: Callable[[], Any], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def summary(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {"n": len(times), "median_s": statistics.median(times), "p90_s": ordered[int(0.9 * (len(times) - 1))],
            "min_s": ordered[0]}


def bench(runs: int, outputs: int, records: int) -> dict[str, Any]:
    rng = random.Random(0)
    out: dict[str, Any] = {"env": {"python": platform.python_version(), "sqlite": sqlite3.sqlite_version,
                                   "platform": platform.platform()}}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "history.sqlite"
        t0 = time.perf_counter()
        for i in range(runs):
            H.record_run(path, *one_run(rng, outputs, i)[:2])
        out["build"] = {"runs": runs, "rows": runs * outputs, "seconds": time.perf_counter() - t0}

        # -- the report over runs x outputs rows (before the record timings add more)
        rows = len(load_history(path))
        report: dict[str, Any] = {"rows": rows}
        report["load_history"] = summary(timed(lambda: load_history(path), 5))
        report["drift_judge"] = summary(timed(lambda: DriftJudge(path, "latest"), 5))
        report["build_report"] = summary(timed(lambda: R.build_report(path), 3))
        rep = R.build_report(path)
        report["render_md"] = summary(timed(lambda: R.render_markdown(rep), 3))
        report["render_csv"] = summary(timed(lambda: R.render_csv(rep), 3))

        def html() -> None:
            rep.plots = {}  # force the plots to be drawn each time
            R.render_html(rep)

        report["render_html_with_plots"] = summary(timed(html, 3))
        report["end_to_end_html"] = summary(timed(lambda: R.render_html(R.build_report(path)), 3))
        out["report"] = report

        # -- recording one run of `outputs` outputs (+ as many layer rows) into the grown file
        samples = [one_run(rng, outputs, runs + i) for i in range(records)]
        it = iter(samples)
        out["record"] = {"outputs": outputs, "layer_rows": outputs, "history_rows_before": runs * outputs,
                         **summary(timed(lambda: H.record_run(path, *next(it)[:2]), records // 2))}
        def with_layers() -> None:
            run, results, layers = next(it)
            H.record_run(path, run, results, layerwise=layers)

        out["record_with_layers"] = summary(timed(with_layers, records - records // 2))
        out["file_mb"] = path.stat().st_size / 1e6
    return out


def print_table(r: dict[str, Any]) -> None:
    ms = 1e3
    rec = r["record"]
    print(f"history benchmark: Python {r['env']['python']}, SQLite {r['env']['sqlite']}")
    print(f"built {r['build']['runs']} runs x {rec['outputs']} outputs = {r['build']['rows']} rows in "
          f"{r['build']['seconds']:.1f} s; file {r['file_mb']:.1f} MB at the end\n")
    print(f"{'operation':<52}{'median':>10}{'p90':>10}{'min':>10}")
    target = "OK" if rec["median_s"] < 10e-3 else "OVER TARGET"
    rows = [(f"record_run: {rec['outputs']} outputs (target a few ms: {target})", rec),
            (f"record_run: {rec['outputs']} outputs + {rec['layer_rows']} layer rows", r["record_with_layers"])]
    rows += [(f"report over {r['report']['rows']} rows: {k.replace('_', ' ')}", r["report"][k])
             for k in ("load_history", "drift_judge", "build_report", "render_md", "render_csv",
                       "render_html_with_plots", "end_to_end_html")]
    for label, s in rows:
        print(f"{label:<52}{s['median_s'] * ms:8.1f}ms{s['p90_s'] * ms:8.1f}ms{s['min_s'] * ms:8.1f}ms")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100, help="runs in the history for the report")
    parser.add_argument("--outputs", type=int, default=100, help="outputs per run (10 models)")
    parser.add_argument("--records", type=int, default=60, help="record_run calls to time")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "history.json")
    args = parser.parse_args(argv)
    results = bench(args.runs, args.outputs, args.records)
    print_table(results)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nwritten {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
