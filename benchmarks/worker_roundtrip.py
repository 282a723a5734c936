"""What the worker protocol costs on top of CNTK itself.

    .venv/bin/python benchmarks/worker_roundtrip.py [--calls 2000] [--big-calls 5] [--json out.json]

Both sides are measured in one run against the same loaded model: ``eval`` through the
protocol (host clock) and the worker's ``bench`` op (the same eval code path, timed inside the
worker, no protocol). Prints a table; the last stdout line is the results as JSON.

* latency: a 1x1 float32 Relu model, per-call overhead = round trip - in-process (target < 1 ms)
* throughput: a 64 MiB float32 tensor through a Relu model, and through ``echo`` (protocol
  alone, no CNTK), in MiB/s (target: a few hundred MiB/s at least)
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from pytest_tf2cntk.cntk.client import CNTKWorker

MIB = 1 << 20


def relu_model(path: Path, shape: list[int]) -> Path:
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="relu")], "relu",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    model.ir_version = 4
    onnx.save(model, str(path))
    return path


def timed(fn, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def summary(times: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(times), "mean_s": statistics.fmean(times),
            "min_s": min(times)}


def run(calls: int, big_calls: int, python: str | None) -> dict:
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp, CNTKWorker(python) as worker:
        info = worker.ping()
        results["env"] = {k: info[k] for k in ("python", "numpy", "cntk", "devices")}

        # -- latency, 1x1
        small = worker.load(relu_model(Path(tmp) / "small.onnx", [1, 1]))
        x = np.array([[0.5]], np.float32)
        for _ in range(50):
            worker.eval(small, {"x": x})
        rt = summary(timed(lambda: worker.eval(small, {"x": x}), calls))
        inproc = summary(worker.bench(small, {"x": x}, n=calls))
        ping = summary(timed(worker.ping, min(calls, 500)))
        results["latency_1x1"] = {
            "calls": calls, "roundtrip": rt, "in_process": inproc, "ping": ping,
            "overhead_median_s": rt["median_s"] - inproc["median_s"],
            "overhead_mean_s": rt["mean_s"] - inproc["mean_s"]}

        # -- throughput, 64 MiB float32
        side = 4096
        big = worker.load(relu_model(Path(tmp) / "big.onnx", [side, side]))
        xb = np.random.default_rng(0).standard_normal((side, side)).astype(np.float32)
        nbytes = xb.nbytes
        worker.eval(big, {"x": xb})
        rt_big = summary(timed(lambda: worker.eval(big, {"x": xb}), big_calls))
        in_big = summary(worker.bench(big, {"x": xb}, n=big_calls, warmup=1))
        echo = summary(timed(lambda: worker.echo({"x": xb}), big_calls))
        overhead = rt_big["median_s"] - in_big["median_s"]
        results["throughput_64mib"] = {
            "bytes": nbytes, "calls": big_calls, "roundtrip": rt_big, "in_process": in_big,
            "echo": echo,
            "eval_mib_s": nbytes / MIB / rt_big["median_s"],
            "in_process_mib_s": nbytes / MIB / in_big["median_s"],
            "ratio_in_process_over_roundtrip": in_big["median_s"] / rt_big["median_s"],
            "overhead_s": overhead,
            # the protocol moves the tensor twice (request + reply) in that overhead
            "transport_mib_s": 2 * nbytes / MIB / overhead if overhead > 0 else float("inf"),
            "echo_mib_s": 2 * nbytes / MIB / echo["median_s"]}
    return results


def print_table(r: dict) -> None:
    lat, thr = r["latency_1x1"], r["throughput_64mib"]
    us = 1e6
    print(f"CNTK {r['env']['cntk']} on Python {r['env']['python']}, numpy {r['env']['numpy']}, "
          f"devices {r['env']['devices']}")
    print()
    head = f"latency, 1x1 float32 Relu, {lat['calls']} calls"
    print(f"{head:<44}   median        mean         min")
    for label, key in (("eval round trip", "roundtrip"), ("in-process eval (bench)", "in_process"),
                       ("ping round trip", "ping")):
        s = lat[key]
        print(f"  {label:<42}{s['median_s'] * us:9.1f} us{s['mean_s'] * us:9.1f} us"
              f"{s['min_s'] * us:9.1f} us")
    ok = "OK" if lat["overhead_median_s"] < 1e-3 else "OVER TARGET"
    label = "added per call (round trip - in-process)"
    print(f"  {label:<42}{lat['overhead_median_s'] * us:9.1f} us"
          f"{lat['overhead_mean_s'] * us:9.1f} us   target < 1000 us: {ok}")
    print()
    head = f"throughput, {thr['bytes'] / MIB:.0f} MiB float32 Relu, {thr['calls']} calls"
    print(f"{head:<44}   median      MiB/s")
    rows = (("eval round trip", thr["roundtrip"]["median_s"], thr["eval_mib_s"]),
            ("in-process eval (bench)", thr["in_process"]["median_s"], thr["in_process_mib_s"]),
            ("echo (protocol only, both ways)", thr["echo"]["median_s"], thr["echo_mib_s"]),
            ("transport (added time, both ways)", thr["overhead_s"], thr["transport_mib_s"]))
    for label, t, rate in rows:
        print(f"  {label:<42}{t * 1e3:8.1f} ms{rate:10.0f}")
    print(f"  ratio in-process / round trip: {thr['ratio_in_process_over_roundtrip']:.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="1x1 evals to time")
    parser.add_argument("--big-calls", type=int, default=5, help="64 MiB evals to time")
    parser.add_argument("--python", help="CNTK interpreter (default: as resolve_cntk_python)")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args(argv)
    results = run(args.calls, args.big_calls, args.python)
    print_table(results)
    text = json.dumps(results)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
