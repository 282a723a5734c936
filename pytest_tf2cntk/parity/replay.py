"""Replay a reproducer: the stored inputs through TF, ONNX Runtime and CNTK again."""
from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from pathlib import Path

from pytest_tf2cntk.convert.pipeline import convert
from pytest_tf2cntk.parity.engine import ParityEngine
from pytest_tf2cntk.parity.options import ParityOptions
from pytest_tf2cntk.parity.reproducer import read_reproducer
from pytest_tf2cntk.parity.result import ParityResult


def replay(path: str | os.PathLike, cntk_python: str | None = None,
           cache_dir: str | os.PathLike | None = None) -> ParityResult:
    """Re-run a stored failure, judged against the budgets recorded at failure time (a replay
    cannot pass because the budget rule changed since), and against the run's float32 noise
    recorded then (the example alone cannot show a run-level failure)."""
    rep = read_reproducer(path)
    meta = rep.meta
    c = meta.conversion
    conv = convert(meta.model, batch=c.batch, opset=c.opset, signature=c.signature, unsafe_load=c.unsafe_load,
                   cache_dir=cache_dir, input_shapes=c.input_shapes, repairs=c.repairs,
                   imports=c.imports)
    with tempfile.TemporaryDirectory(prefix="tf2cntk-replay-") as tmp:
        cntk_onnx = meta.cntk_onnx_path
        if rep.cntk_onnx is not None:  # the exact graph CNTK saw, even if the file is gone
            cntk_onnx = str(Path(tmp) / "cntk.onnx")
            Path(cntk_onnx).write_bytes(rep.cntk_onnx)
        engine = ParityEngine(conv, meta.device, ParityOptions(cntk_python=cntk_python, cntk_onnx=cntk_onnx))
        started = time.perf_counter()
        try:
            engine.budgets = dict(meta.budgets)
            ev = engine.evaluate(rep.inputs, with_ort=True)
        finally:
            engine.close()
        for name, check in ev.checks.items():
            held = meta.verdict.get(name)
            if held is not None and held.run is not None and held.run.ratios and check.truth is not None:
                run = dataclasses.replace(held.run, ratios=list(held.run.ratios))
                run.ratios[run.worst] = check.truth.ratio  # this example again, among the run's others
                check.run = run
        return ParityResult(model=meta.model, device=meta.device, passed=ev.passed, outputs=ev.checks, examples=1,
                            seconds=time.perf_counter() - started, conversion=conv.summary(cntk_onnx),
                            inputs=meta.inputs, timings=dict(engine.timings), seed=meta.seed,
                            versions=engine.versions())
