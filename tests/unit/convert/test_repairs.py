"""CNTK repairs (convert.repairs): each matched to its defect only, proved in ORT at its domain
edges, confirmed in CNTK on hand-built graphs; a graph that needs none keeps its bytes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from pytest_tf2cntk.convert import onnxrt
from pytest_tf2cntk.convert.repairs import REPAIRS, Repair, run_repairs
from pytest_tf2cntk.convert.repairs import avgpool_border as ap
from pytest_tf2cntk.convert.repairs import int_cast
from pytest_tf2cntk.convert.validation import check_support
from pytest_tf2cntk.errors import PassMismatch
from tests.support.paths import FIXTURES


def _model(nodes, inputs, outputs, inits=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)], ir_version=4)


def _quantizer(n: int, to: int = TensorProto.INT32) -> onnx.ModelProto:
    """quantized.keras' quantizer alone: Cast(x, to=int) -> Cast(float)."""
    return _model([helper.make_node("Cast", ["x"], ["q"], name="to_int", to=to),
                   helper.make_node("Cast", ["q"], ["y"], name="to_float", to=TensorProto.FLOAT)],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n])])


FORCED = np.array([-3.0, -2.5, -2.0, -1.75, -1.5, -0.5, -1e-7, -0.0, 0.0, 1e-7, 0.5, 0.999, 1.0, 1.5, 2.5,
                   3.0, 7.25, -7.25, 123456.5, -123456.5], np.float32)  # integers, k+0.5, negative fractions


def test_int_cast_truncates_toward_zero_at_forced_values_in_ort() -> None:
    model = _quantizer(len(FORCED))
    repaired, records = run_repairs(model)
    assert [r.name for r in records] == ["int_cast_truncation"] and records[0].changed == 1
    assert "exact on" in records[0].proof and "edge values" in records[0].proof
    got = onnxrt.run(repaired, {"x": FORCED})["y"]
    assert np.array_equal(got, np.trunc(FORCED)) and np.array_equal(got, onnxrt.run(model, {"x": FORCED})["y"])
    assert check_support(model) and not check_support(repaired)  # the repaired Cast is not flagged
    assert run_repairs(repaired)[1] == []  # applied once: the marked Cast has no defect left


def test_int_cast_saturates_out_of_range_and_leaves_integer_inputs_alone() -> None:
    x = np.array([300.7, -300.7, 127.9, -128.9], np.float32)
    repaired = run_repairs(_quantizer(4, TensorProto.INT8), prove=False)[0]
    assert onnxrt.run(repaired, {"x": x})["y"].tolist() == [127, -128, 127, -128]
    low, high = int_cast.saturation_range(TensorProto.FLOAT, TensorProto.INT32)
    assert float(high) == 2147483520.0 and float(low) == -2.0 ** 31  # floats inside int32's range
    from_int = _model([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.INT32)],
                      [helper.make_tensor_value_info("x", TensorProto.BOOL, [2])],
                      [helper.make_tensor_value_info("y", TensorProto.INT32, [2])])
    assert run_repairs(from_int)[1] == []  # bool -> int passes through exactly in CNTK: no defect


def test_a_wrong_truncation_is_caught_by_the_edge_proof(monkeypatch: pytest.MonkeyPatch) -> None:
    """The edge proof must be able to fail: Floor alone (no step for negatives) is wrong at -0.5."""
    real = int_cast.truncation_nodes

    def floor_only(model, cast, float_type):
        nodes = real(model, cast, float_type)
        zero = next(t.name for t in model.graph.initializer if t.name.endswith("__trunc_zero"))
        next(n for n in nodes if n.op_type == "Add").input[1] = zero  # Floor(c) + 0
        return nodes

    monkeypatch.setattr(int_cast, "truncation_nodes", floor_only)
    with pytest.raises(PassMismatch, match="int_cast_truncation"):
        int_cast.prove_edges(run_repairs(_quantizer(3), prove=False)[0])


def test_a_repair_that_changes_the_numbers_is_refused_with_the_way_out(monkeypatch: pytest.MonkeyPatch) -> None:
    def wrong(model: onnx.ModelProto) -> int:
        model.graph.node[0].attribute[0].i = TensorProto.FLOAT  # CNTK's own pass-through: no truncation
        return 1

    monkeypatch.setattr("pytest_tf2cntk.convert.repairs.REPAIRS", [Repair("wrong", "d", "r", wrong)])
    with pytest.raises(PassMismatch, match="CNTK repair 'wrong' changed output 'y'") as caught:
        run_repairs(_quantizer(3))
    assert "--tf2cntk-repairs=off" in caught.value.hint


def _pool(h: int, w: int, k: int, pad: int, channels: int = 3, include_pad: int = 0) -> onnx.ModelProto:
    """AveragePool k x k, stride 1, explicit pads (what tf2onnx emits for Keras padding="same")."""
    return _model([helper.make_node("AveragePool", ["x"], ["y"], name="pool", kernel_shape=[k, k],
                                    strides=[1, 1], pads=[pad] * 4, count_include_pad=include_pad)],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, h, w])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels, h, w])])


@pytest.mark.parametrize(("h", "w", "k", "pad", "defect"), [
    (1, 1, 3, 1, True), (1, 4, 3, 1, True), (2, 2, 5, 2, True), (3, 3, 5, 2, True),  # both sides overhang
    (2, 2, 3, 1, False), (5, 5, 3, 1, False), (4, 4, 2, 0, False)])  # one side at most
def test_avgpool_border_matches_only_windows_overhanging_both_sides(h, w, k, pad, defect) -> None:
    model = _pool(h, w, k, pad)
    assert ap.has_defect(model.graph.node[0], (1, 3, h, w)) is defect
    repaired, records = run_repairs(model)
    assert [r.name for r in records] == (["avgpool_border"] if defect else [])
    if not defect:
        assert repaired.SerializeToString() == model.SerializeToString()
        return
    assert [n.op_type for n in repaired.graph.node] == ["Pad", "AveragePool", "Mul"]
    x = np.random.default_rng(1).uniform(-1, 1, (1, 3, h, w)).astype(np.float32)
    np.testing.assert_allclose(onnxrt.run(repaired, {"x": x})["y"], onnxrt.run(model, {"x": x})["y"], rtol=1e-6)


def test_avgpool_real_counts_and_count_include_pad() -> None:
    assert ap.real_counts([3, 3], [5, 5], [1, 1], [2, 2, 2, 2]).tolist() == [[9, 9, 9]] * 3
    assert ap.real_counts([5], [3], [1], [1, 1]).tolist() == [2, 3, 3, 3, 2]
    repaired, records = run_repairs(_pool(1, 1, 3, 1, include_pad=1))
    assert records and [n.op_type for n in repaired.graph.node] == ["Pad", "AveragePool"]  # sum / area as is


def test_every_repair_states_its_defect_and_rewrite() -> None:
    names = [r.name for r in REPAIRS]
    assert {"int_cast_truncation", "avgpool_border"} <= set(names) and len(names) == len(set(names))
    assert all(r.defect and r.rewrite for r in REPAIRS)


# -- in CNTK: the defect shows without the repair and is gone with it ----------------------------

def _cntk_eval(model: onnx.ModelProto, feeds: dict, tmp_path: Path, name: str) -> np.ndarray:
    from pytest_tf2cntk.cntk.client import get_worker

    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    worker = get_worker()
    loaded = worker.load(path)
    try:
        return np.asarray(worker.eval(loaded, feeds)[model.graph.output[0].name])
    finally:
        worker.unload(loaded)


@pytest.mark.needs_cntk
def test_cntk_truncates_with_the_repair_and_passes_through_without(tmp_path: Path) -> None:
    model = _quantizer(len(FORCED))
    raw = _cntk_eval(model, {"x": FORCED}, tmp_path, "raw").ravel()
    assert not np.array_equal(raw, np.trunc(FORCED))  # the defect: 2.5 stays 2.5
    fixed = _cntk_eval(run_repairs(model)[0], {"x": FORCED}, tmp_path, "fixed").ravel()
    assert np.array_equal(fixed, np.trunc(FORCED))


@pytest.mark.needs_cntk
@pytest.mark.parametrize(("h", "w", "k", "pad"), [(1, 1, 3, 1), (2, 2, 5, 2), (3, 3, 5, 2), (1, 4, 3, 1)])
def test_cntk_averages_overhanging_windows_right_only_with_the_repair(tmp_path: Path, h, w, k, pad) -> None:
    model = _pool(h, w, k, pad)
    x = np.random.default_rng(2).uniform(-1, 1, (1, 3, h, w)).astype(np.float32)
    want = onnxrt.run(model, {"x": x})["y"]
    raw = _cntk_eval(model, {"x": x}, tmp_path, "raw").reshape(want.shape)
    assert np.abs(raw - want).max() > 1e-2  # the defect
    fixed = _cntk_eval(run_repairs(model)[0], {"x": x}, tmp_path, "fixed").reshape(want.shape)
    np.testing.assert_allclose(fixed, want, rtol=1e-6, atol=1e-7)


# -- the conversion API: every fixture -------------------------------------------------------------

FIXTURE_FILES = sorted(p.name for p in FIXTURES.iterdir()
                       if p.suffix in (".keras", ".h5") or p.is_dir() and not p.name.startswith("_"))


@pytest.mark.parametrize("name", FIXTURE_FILES)
def test_a_fixture_needing_no_repair_converts_to_the_same_bytes(name: str, tmp_path: Path) -> None:
    """Repairs on differs from off only by the pipeline's repair step: given the graph converted
    without repairs, it must hand back the same bytes unless a repair applied. (Two conversions in
    one process differ anyway: tf2onnx numbers node names with a per-process counter.)"""
    from pytest_tf2cntk.convert.pipeline import _repair, convert
    from pytest_tf2cntk.errors import Tf2CntkError

    def attempt(repairs: str):
        try:
            return convert(FIXTURES / name, batch=1, repairs=repairs, cache_dir=tmp_path / repairs)
        except Tf2CntkError as exc:
            return exc

    off, on = attempt("off"), attempt("on")
    if isinstance(off, Exception):  # refused as today; with repairs the same refusal, or repaired
        assert str(on) == str(off) if isinstance(on, Exception) else on.repairs
        return
    assert off.repairs == [] and off.repairs_text() == "off"
    repaired, records = _repair(off.onnx_model, None)
    assert [r.name for r in records] == [r.name for r in on.repairs]
    if name == "quantized.keras":  # the forced case: its Cast needs the repair
        assert [r.name for r in records] == ["int_cast_truncation"]
    if records:
        assert repaired.SerializeToString() != off.onnx_path.read_bytes()
        return
    assert repaired.SerializeToString() == off.onnx_path.read_bytes() and on.repairs_text() == "none needed"


@pytest.mark.needs_cntk
def test_keras_same_avgpool_on_a_1x1_map_fails_parity_without_the_repair_and_passes_with_it(tmp_path: Path) -> None:
    from pytest_tf2cntk.parity.engine import check_parity
    from tests.support.small_models import same_avgpool

    model = same_avgpool(tmp_path / "pool1x1.keras", 1, channels=3)
    common = {"max_examples": 5, "seed": 0, "layerwise": "off", "reproducer_dir": tmp_path}
    raw = check_parity(model, "cpu", repairs="off", **common)
    assert not raw.passed and raw.conversion.repairs == []
    fixed = check_parity(model, "cpu", repairs="on", **common)
    assert fixed.passed, str(fixed)
    assert [r.name for r in fixed.conversion.repairs] == ["avgpool_border"]
    border_only = check_parity(same_avgpool(tmp_path / "pool5x5.keras", 5), "cpu", **common)
    assert border_only.passed and border_only.conversion.repairs == []  # one-sided overhang: right as is
