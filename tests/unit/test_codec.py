"""Every result class round-trips through JSON: ``from_json(to_json(x)) == x``.

The objects come from real checks where that is cheap (a conversion, a parity result with its
localization, a reproducer) and from the synthetic records otherwise, and travel through
``json.dumps`` / ``json.loads`` as a report, the history or an xdist payload would.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from pytest_tf2cntk import codec
from pytest_tf2cntk.convert.domains import InputDomain
from pytest_tf2cntk.convert.options import ConversionOptions
from pytest_tf2cntk.convert.passes import PassRecord
from pytest_tf2cntk.convert.pipeline import CacheMeta, ConversionSummary
from pytest_tf2cntk.convert.tf_model import ModelTensor
from pytest_tf2cntk.convert.validation import Problem
from pytest_tf2cntk.history.records import CheckRecord, ConversionRecord, DriftVerdict, RunPayload, RunReport
from pytest_tf2cntk.parity.budgets import BudgetConfig, OutputBudget
from pytest_tf2cntk.parity.calibrate import Calibration, OutputCalibration
from pytest_tf2cntk.parity.inputs import InputRecipe
from pytest_tf2cntk.parity.localize.report import (Confirmation, LayerRow, Localization, NodeReport,
                                                   TensorMapping)
from pytest_tf2cntk.parity.reproducer import ReproducerMeta
from pytest_tf2cntk.parity.result import OutputCheck
from tests.support.synthetic import make_result, metrics


def round_trip(obj: object) -> object:
    return codec.from_json(type(obj), json.loads(json.dumps(codec.to_json(obj))))


def _localization() -> Localization:
    mapping = TensorMapping("t", (1, None, 3), "uid_1", "conv", "Convolution", (3, None, 1), "name")
    nodes = [NodeReport("conv", "Conv", "conv2d", "model/conv2d/Conv2D", 2.5e-7, 1e-6, mapping=[mapping],
                        metrics=metrics(2.5e-7), metrics_tensor="t", base_budget=1e-6, condition=1.0),
             NodeReport("relu", "Relu", "re_lu", "model/re_lu/Relu", math.inf, 1e-6, "over budget",
                        accumulated_error=0.5, inputs_from_ort=["t"], notes=["CNTK cannot evaluate it"], index=1)]
    return Localization("m.keras", "cpu", "m.onnx", "m.onnx", nodes, 1, 1.5, 2, 2,
                        confirmation=Confirmation("confirmed in isolation", 0.3, 1e-6, 0.0, "x"),
                        notes=["n"], timings={"cntk": 0.1}, suspects=["relu", "conv"],
                        memory={"peak_held_mb": 1.0, "chunks": 1})


def _examples() -> list[object]:
    check = make_result(errors={"probs": 2e-7, "logits": math.inf})
    result = dataclasses.replace(check.result, localization=_localization(), reproducer="r.npz",
                                 inputs={"x": "uniform in [-1, 1] seed=0"},
                                 input_domains={"x": InputDomain("x", "float32", (2, 16), -1.0, 1.0, "float")})
    check = dataclasses.replace(check, result=result,
                                drift={"probs": DriftVerdict(1e-7, 2.0, 1.6, True, "drift", 3, 10, 3.2e-7)})
    conversion = ConversionRecord("m.keras", True, "m.onnx", {"Gemm": 2}, [PassRecord("fold_constants", 3, "ORT 0")],
                                  [Problem("n", "Cast", "cast", "to int", "hint", "warning")], True, 0.1)
    failed = ConversionRecord("g.keras", False, error="Loop is not supported", type="ValidationError")
    payload = RunPayload([check, CheckRecord("m.keras", "gpu", skipped="no GPU visible to TensorFlow")],
                         [conversion, failed], [LayerRow("m.keras", "cpu", "conv", "Conv", "conv2d", 1e-7, 1e-6, True)])
    budget = OutputBudget("y", 1e-5, 2.0 ** -24, 3, (("Gemm", 0.9), ("Add", 0.1)), False, ("Foo",))
    return [
        ModelTensor("x", "float32", (None, 16)), ConversionOptions(4, 9, "serving_default", True, "/c"),
        ConversionSummary("m.onnx", "c.onnx", 4, 9, {"Gemm": 1}, [PassRecord("p", 1, "ok")], [], True, "k"),
        CacheMeta("m.keras", {"batch": 4}, [ModelTensor("x", "float32", (None, 16))], error={"type": "X"}),
        InputRecipe("normal", 3, 0.25, 0.75, "+inf", 0.1), BudgetConfig({"Conv": 3.0}, {"y": 1e-4}, 2.0, 16.0),
        budget, OutputCheck("y", budget, metrics(1e-6), None, metrics(1e-6)), result, check, payload,
        RunReport("2026-12-01T00:00:00+0000", 3.0, 1, False, {"batch": 4}, ["m.keras"], {"onnx": "1"},
                  payload.conversions, payload.results),
        ReproducerMeta("m.keras", "cpu", ConversionOptions(), "c.onnx", 1, {"cntk": "2.7"}, {"x": "constant 0"},
                       {"y": budget}, {"y": OutputCheck("y", budget, metrics(3e-3))}),
        Calibration("m.keras", "cpu", 4, 2, 3, 10.0, {"y": OutputCalibration("y", [1e-7, 2e-7], [2e-7], 1e-5, 1e-5,
                                                                            2.0 ** -24, 10.0)}, 1.0),
    ]


@pytest.mark.parametrize("obj", _examples(), ids=lambda o: type(o).__name__)
def test_every_result_class_round_trips_through_json(obj: object) -> None:
    assert round_trip(obj) == obj


def test_derived_values_are_written_for_readers_and_ignored_when_read() -> None:
    check = make_result(errors={"y": 2e-5}, budget=1e-5)
    data = json.loads(json.dumps(check.to_json()))
    out = data["result"]["outputs"]["y"]
    assert out["passed"] is False and out["scaled_error"] == pytest.approx(2e-5) and out["stage"]
    assert data["passed"] is False
    out["passed"] = True  # a reader cannot make a failing output pass: it is recomputed
    assert not CheckRecord.from_json(data).result.outputs["y"].passed


def test_non_finite_floats_are_valid_json() -> None:
    text = json.dumps(codec.to_json({"a": math.inf, "b": -math.inf, "c": math.nan}), allow_nan=False)
    back = codec.from_json(dict[str, float], json.loads(text))
    assert back["a"] == math.inf and back["b"] == -math.inf and math.isnan(back["c"])


def test_paths_tuples_and_enums_come_back_as_themselves() -> None:
    from pytest_tf2cntk.parity.options import Diagnose

    assert codec.from_json(Path, codec.to_json(Path("/x/y"))) == Path("/x/y")
    assert codec.from_json(tuple[int, ...], codec.to_json((1, 2))) == (1, 2)
    assert codec.from_json(Diagnose, codec.to_json(Diagnose.ALWAYS)) is Diagnose.ALWAYS
