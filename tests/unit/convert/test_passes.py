"""Graph passes and CNTK support validation on hand-built ONNX graphs (ONNX Runtime, no TF)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pytest_tf2cntk.convert import onnxrt
from pytest_tf2cntk.convert import passes
from pytest_tf2cntk.errors import PassMismatch, ValidationError
from pytest_tf2cntk.convert.validation import check_support, validate


def _model(nodes, inputs, outputs, inits=(), opset=9) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=4)


def _gap_squeeze() -> onnx.ModelProto:
    """tf2onnx's GlobalAveragePooling2D: GlobalAveragePool + Squeeze (CNTK rejects the Squeeze)."""
    nodes = [helper.make_node("GlobalAveragePool", ["x"], ["p"], name="gap"),
             helper.make_node("Squeeze", ["p"], ["s"], axes=[2, 3], name="sq"),
             helper.make_node("Relu", ["s"], ["y"], name="relu")]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 4, 4])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])])


def _shape_subgraph() -> onnx.ModelProto:
    """Flatten as tf2onnx writes it with shape arithmetic: Shape -> Gather -> Concat -> Reshape."""
    inits = [numpy_helper.from_array(np.array(0, np.int64), "zero"),
             numpy_helper.from_array(np.array([-1], np.int64), "minus1")]
    nodes = [helper.make_node("Shape", ["x"], ["shp"], name="shape"),
             helper.make_node("Gather", ["shp", "zero"], ["n"], axis=0, name="batch"),
             helper.make_node("Unsqueeze", ["n"], ["n1"], axes=[0], name="unsq"),
             helper.make_node("Concat", ["n1", "minus1"], ["target"], axis=0, name="cat"),
             helper.make_node("Reshape", ["x", "target"], ["y"], name="flatten")]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 2, 4])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 8])], inits)


def test_squeeze_becomes_static_reshape_and_is_proved() -> None:
    model, records = passes.run_passes(_gap_squeeze())
    assert [n.op_type for n in model.graph.node] == ["GlobalAveragePool", "Reshape", "Relu"]
    assert [r.name for r in records] == ["squeeze_to_reshape"]
    assert "ORT max |diff| 0" in records[0].proof
    assert check_support(model) == []


def test_shape_subgraph_folds_to_a_constant_reshape() -> None:
    original = _shape_subgraph()
    assert {p.op_type for p in check_support(original)} == {"Shape", "Reshape"}
    model, records = passes.run_passes(original)
    assert [n.op_type for n in model.graph.node] == ["Reshape"]
    assert "fold_constants" in [r.name for r in records]
    shape = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}[model.graph.node[0].input[1]]
    assert shape.tolist() == [3, -1]
    x = np.random.default_rng(0).normal(size=(3, 2, 4)).astype(np.float32)
    assert np.array_equal(onnxrt.run(model, {"x": x})["y"], x.reshape(3, 8))
    assert check_support(model) == []


def test_a_pass_that_changes_numbers_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(model: onnx.ModelProto) -> int:
        for node in model.graph.node:
            if node.op_type == "Relu":
                node.op_type = "Sigmoid"
                return 1
        return 0

    monkeypatch.setattr(passes, "PASSES", [("broken_pass", broken)])
    with pytest.raises(PassMismatch, match="broken_pass.*changed output 'y'"):
        passes.run_passes(_gap_squeeze())


def test_validation_reports_every_offending_node_at_once() -> None:
    inits = [numpy_helper.from_array(np.array([1, 2], np.float32), "scales")]
    nodes = [helper.make_node("Shape", ["x"], ["s"], name="tf/shape"),
             helper.make_node("Upsample", ["x", "scales"], ["u"], name="model/up_sampling2d/resize__12"),
             helper.make_node("MaxPool", ["x"], ["m"], kernel_shape=[2], ceil_mode=1, name="pool"),
             helper.make_node("Pad", ["x"], ["p"], pads=[0, 0, 1, 0, 0, 1], mode="edge", name="pad"),
             helper.make_node("Relu", ["x"], ["r"], name="ok")]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 4])],
                   [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("s", "u", "m", "p", "r")],
                   inits, opset=10)
    problems = check_support(model)
    by_node = {p.node: p for p in problems}
    assert {"<model>", "x", "tf/shape", "model/up_sampling2d/resize__12", "pool", "pad"} <= set(by_node)
    assert "ok" not in by_node
    assert by_node["model/up_sampling2d/resize__12"].tf_op == "model/up_sampling2d/resize"
    assert "ceil_mode" in by_node["pool"].reason
    assert "edge" in by_node["pad"].reason
    assert "batch" in by_node["x"].hint
    assert "opset 9" in by_node["<model>"].hint


def test_validate_raises_with_a_readable_list() -> None:
    nodes = [helper.make_node("Erf", ["x"], ["y"], name="gelu/erf")]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    with pytest.raises(ValidationError) as info:
        validate(model, "demo.keras")
    text = str(info.value)
    assert "demo.keras: 1 node(s)" in text and "Erf 'gelu/erf'" in text and "approximate=True" in text
    assert info.value.problems[0].op_type == "Erf"


def test_cast_to_int_is_a_warning_not_an_error() -> None:
    nodes = [helper.make_node("Cast", ["x"], ["c"], to=TensorProto.INT32, name="cast"),
             helper.make_node("Cast", ["c"], ["y"], to=TensorProto.FLOAT, name="back")]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    warnings = validate(model)
    assert [(w.node, w.severity) for w in warnings] == [("cast", "warning")]


def test_problems_read_cleanly_for_the_whole_model_and_without_a_tf_op() -> None:
    """No "opset '<model>' (TF: )", no IR complaint about the file the tool wrote above opset 9,
    and a report's warning line does not say "warning" twice."""
    from pytest_tf2cntk.convert.validation import Problem

    relu = [helper.make_node("Relu", ["x"], ["y"], name="r")]
    io = ([helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
    model = _model(relu, *io, opset=11)
    model.ir_version = 6  # what tf2onnx writes at opset 11
    (problem,) = check_support(model)
    assert str(problem).startswith("error: the model: default-domain opset 11 > 9") and "(TF: )" not in str(problem)
    warning = Problem("cast_1", "Cast", "", "pass-through", "keep it float", "warning")
    assert str(warning) == "warning: Cast 'cast_1': pass-through; hint: keep it float"
    assert warning.describe() == "Cast 'cast_1': pass-through; hint: keep it float"
