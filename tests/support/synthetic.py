"""Typed parity results with chosen errors, for the history, drift and report tests (no model)."""
from __future__ import annotations

from pytest_tf2cntk.convert.pipeline import ConversionSummary
from pytest_tf2cntk.history.records import CheckRecord
from pytest_tf2cntk.history.store import RunInfo
from pytest_tf2cntk.parity.budgets import OutputBudget
from pytest_tf2cntk.parity.metrics import Metrics
from pytest_tf2cntk.parity.result import OutputCheck, ParityResult
from pytest_tf2cntk.parity.truth import TruthCheck

U32 = 2.0 ** -24
VERSIONS = {"tensorflow": "2.21.0", "tf2onnx": "1.17.0", "onnx": "1.17.0", "onnxruntime": "1.20", "keras": "3.5",
            "numpy": "2.1", "python": "3.11.7", "cntk": "2.7", "cntk_numpy": "1.19.5", "cntk_python": "3.6.15"}


def metrics(error: float, scale: float = 0.5) -> Metrics:
    """Metrics whose scaled error (max_abs / ref_scale) is ``error``."""
    return Metrics(True, True, error * scale, (0, 0), error * 4, (0, 0), 1e-3 * scale, error / U32, error * scale,
                   scale, 1.0 - error, 0, 1.0, 10)


def make_result(model: str = "m.keras", device: str = "cpu", errors: dict[str, float] | None = None,
                budget: float = 1e-5, examples: int = 20, measured: tuple[str, ...] = ()) -> CheckRecord:
    """A check of ``model`` whose outputs have the given scaled errors against one budget; the
    outputs in ``measured`` are judged against a float64 truth instead (TF32 noise = error / 4)."""
    outputs = {}
    for name, e in (errors or {"y": 1e-7}).items():
        b = OutputBudget(name, budget, U32, 3, (("Gemm", 1.0),))
        truth = TruthCheck("float64 twin: test", e / 4, e, U32, ort32=e / 8, graph=0.0) if name in measured else None
        outputs[name] = OutputCheck(name, b, metrics(e), metrics(e / 2), metrics(e / 2), truth)
    result = ParityResult(model, device, all(o.passed for o in outputs.values()), outputs, examples, 0.1,
                          ConversionSummary("m.onnx", "m.onnx", 1, 9, {"Gemm": 2}, [], [], False, "k"),
                          seed=1, versions=dict(VERSIONS),
                          reference="float64 twin: test" if measured else "none: --tf2cntk-reference=off")
    return CheckRecord(model, device, result)


def make_run(i: int = 0, **versions: str) -> RunInfo:
    return RunInfo(1.7e9 + 3600 * i, "ci", f"{i:x}" * 40, {**VERSIONS, **versions},
                   {"max_examples": 20, "devices": ["cpu"]})
