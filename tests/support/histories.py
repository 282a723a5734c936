"""Synthetic run histories for the drift and report tests."""
from __future__ import annotations

from pathlib import Path

from pytest_tf2cntk.history import store as H
from pytest_tf2cntk.parity.localize.report import LayerRow
from tests.support.synthetic import make_result, make_run

JITTER = (0.5, 1.9, 0.7, 1.3, 2.0, 0.6, 1.1, 0.55, 1.6, 0.8)  # run-to-run: different Hypothesis inputs


def record_series(path: Path, series: dict[str, list[float]], tf2onnx: list[str] | None = None) -> None:
    n = len(next(iter(series.values())))
    for i in range(n):
        errors = {k: v[i] for k, v in series.items() if v[i] is not None}
        layers = [LayerRow("m.keras", "cpu", f"conv{j}", "Conv", f"c{j}", 1e-7 * JITTER[i % 10] * (j + 1), 1e-5)
                  for j in range(2)]
        layers.append(LayerRow("m.keras", "cpu", "relu", "Relu", "r", 0.0, 5e-7))
        version = {"tf2onnx": tf2onnx[i]} if tf2onnx else {}
        H.record_run(path, make_run(i, **version), [make_result("m.keras", "cpu", errors)], layerwise=layers)
