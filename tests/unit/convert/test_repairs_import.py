"""Repairs of CNTK 2.7 import defects (issue 13 items 4 and 6): Concat of free- and static-batch
tensors, Slice ends past the dimension. Each rewrite is checked in ONNX Runtime
(before == after, and untouched when the defect is absent); the needs_cntk tests show each defect
in the real CNTK worker on the raw graph and its absence on the repaired one."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pytest_tf2cntk.convert import onnxrt
from pytest_tf2cntk.convert.repairs import REPAIRS, run_repairs
from pytest_tf2cntk.convert.repairs.concat import FREE, STATIC, batch_kinds

RNG = np.random.default_rng(0)
INT64_MAX = 2**63 - 1


def _model(nodes, x_shape, inits=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)], ir_version=4)


def concat_conv_and_input(batch: int = 2, channels: int = 3) -> onnx.ModelProto:
    """Concat(Conv(x), Relu(x)): CNTK gives the Conv output a free batch, Relu(x) a static one."""
    w = numpy_helper.from_array(RNG.standard_normal((channels, channels, 1, 1)).astype(np.float32), "W")
    nodes = [helper.make_node("Conv", ["x", "W"], ["a"], kernel_shape=[1, 1], name="conv"),
             helper.make_node("Relu", ["x"], ["b"], name="relu"),
             helper.make_node("Concat", ["a", "b"], ["y"], axis=1, name="cat")]
    return _model(nodes, [batch, channels, 2, 2], [w])


def concat_two_convs(batch: int = 2) -> onnx.ModelProto:
    w = numpy_helper.from_array(RNG.standard_normal((3, 3, 1, 1)).astype(np.float32), "W")
    nodes = [helper.make_node("Conv", ["x", "W"], ["a"], kernel_shape=[1, 1], name="conv"),
             helper.make_node("MaxPool", ["x"], ["b"], kernel_shape=[1, 1], name="pool"),
             helper.make_node("Concat", ["a", "b"], ["y"], axis=1, name="cat")]
    return _model(nodes, [batch, 3, 2, 2], [w])


def slice_to_the_end(end: int = INT64_MAX, batch: int = 4) -> onnx.ModelProto:
    """x[1:] along the batch, as tf2onnx writes it (end INT64_MAX)."""
    return _model([helper.make_node("Slice", ["x"], ["y"], axes=[0], starts=[1], ends=[end], name="slice")],
                  [batch, 5])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return onnxrt.run(model, {"x": x})["y"]


def _x(model: onnx.ModelProto) -> np.ndarray:
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    return RNG.standard_normal(shape).astype(np.float32)


def _repaired(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    fixed, records = run_repairs(model)
    assert [r.name for r in records] == [name]
    assert "ORT max |diff|" in records[0].proof
    return fixed


def test_import_repairs_are_registered() -> None:
    assert {"concat_static_batch", "slice_clamp_ends"} <= {r.name for r in REPAIRS}


def test_batch_kinds_follow_cntk() -> None:
    """As measured in CNTK 2.7: Conv/pool/BN free, inputs and Reshape static, an elementwise op
    static as soon as one operand is, a constant operand no batch at all."""
    model = concat_conv_and_input()
    model.graph.initializer.append(numpy_helper.from_array(np.full((1, 3, 1, 1), 2, np.float32), "k"))
    model.graph.initializer.append(numpy_helper.from_array(np.array([2, 3, 2, 2], np.int64), "shape"))
    model.graph.node.extend([helper.make_node("Add", ["a", "b"], ["a_plus_b"], name="add"),
                             helper.make_node("Mul", ["a", "k"], ["a_times_k"], name="mul"),
                             helper.make_node("Reshape", ["a", "shape"], ["a_static"], name="reshape")])
    kinds = batch_kinds(model)
    assert (kinds["x"], kinds["a"], kinds["b"]) == (STATIC, FREE, STATIC)
    assert (kinds["a_plus_b"], kinds["a_times_k"], kinds["a_static"]) == (STATIC, FREE, STATIC)


def test_concat_of_free_and_static_batch_gets_a_static_reshape_bit_identical() -> None:
    model = concat_conv_and_input()
    fixed = _repaired(model, "concat_static_batch")
    cat = next(n for n in fixed.graph.node if n.op_type == "Concat")
    producers = {o: n.op_type for n in fixed.graph.node for o in n.output}
    assert [producers[i] for i in cat.input] == ["Reshape", "Relu"]
    x = _x(model)
    assert np.array_equal(_run(fixed, x), _run(model, x))


@pytest.mark.parametrize("model", [concat_conv_and_input(batch=1), concat_two_convs()],
                         ids=["batch-1-broadcasts", "all-free"])
def test_concat_without_the_defect_keeps_its_bytes(model: onnx.ModelProto) -> None:
    fixed, records = run_repairs(model)
    assert records == [] and fixed.SerializeToString() == model.SerializeToString()


def test_slice_end_int64_max_is_clamped_to_the_dimension() -> None:
    model = slice_to_the_end()
    fixed = _repaired(model, "slice_clamp_ends")
    node = fixed.graph.node[0]
    assert helper.get_attribute_value(next(a for a in node.attribute if a.name == "ends")) == [4]
    x = _x(model)
    assert np.array_equal(_run(fixed, x), x[1:])


@pytest.mark.parametrize("end", [4, 2**31 - 1, -1])
def test_slice_ends_cntk_reads_right_are_untouched(end: int) -> None:
    model = slice_to_the_end(end)
    fixed, records = run_repairs(model)
    assert records == [] and fixed.SerializeToString() == model.SerializeToString()


# ---------------------------------------------------------------------------------------------
# In CNTK: the raw graph shows the defect, the repaired one computes what ONNX Runtime does.


@pytest.fixture(scope="module")
def worker():
    from pytest_tf2cntk.cntk.client import CNTKWorker

    with CNTKWorker(timeout=120) as w:
        yield w


def _in_cntk(worker, model: onnx.ModelProto, path: Path, x: np.ndarray) -> np.ndarray:
    onnx.save(model, str(path))
    loaded = worker.load(path)
    try:
        return worker.eval(loaded, {"x": x})[loaded.output_names[0]]
    finally:
        worker.unload(loaded)


@pytest.mark.needs_cntk
def test_cntk_refuses_the_raw_concat_and_computes_the_repaired_one(worker, tmp_path: Path) -> None:
    from pytest_tf2cntk.errors import CNTKError

    model = concat_conv_and_input()
    x = _x(model)
    with pytest.raises(CNTKError, match="Conflicting dimensionality of axis"):
        _in_cntk(worker, model, tmp_path / "raw.onnx", x)
    fixed, _ = run_repairs(model)
    got = _in_cntk(worker, fixed, tmp_path / "repaired.onnx", x)
    np.testing.assert_allclose(got, _run(model, x), rtol=1e-5, atol=1e-5)


@pytest.mark.needs_cntk
def test_cntk_drops_the_last_batch_row_of_a_raw_slice_and_not_of_the_repaired(worker, tmp_path: Path) -> None:
    model = slice_to_the_end()
    x = _x(model)
    raw = _in_cntk(worker, model, tmp_path / "raw.onnx", x)
    assert raw.shape == (2, 5) and np.array_equal(raw, x[1:-1])  # INT64_MAX read as -1
    fixed, _ = run_repairs(model)
    assert np.array_equal(_in_cntk(worker, fixed, tmp_path / "repaired.onnx", x), x[1:])


@pytest.mark.needs_cntk
def test_batch_kinds_agree_with_the_batch_cntk_gives_each_tensor(worker, tmp_path: Path) -> None:
    """CNTK reports a free batch as None in a loaded output's shape: every op the model knows,
    on a static and on a free operand, must get the kind CNTK gives it."""
    inits = [numpy_helper.from_array(np.eye(3, dtype=np.float32).reshape(3, 3, 1, 1), "W"),
             numpy_helper.from_array(np.ones(3, np.float32), "one"), numpy_helper.from_array(np.zeros(3, np.float32), "zero"),
             numpy_helper.from_array(np.full((1, 3, 1, 1), 2, np.float32), "k"),
             numpy_helper.from_array(np.array([2, 3, 2, 2], np.int64), "shape")]
    ops = [("Conv", ["x", "W"], {"kernel_shape": [1, 1]}), ("MaxPool", ["x"], {"kernel_shape": [1, 1]}),
           ("AveragePool", ["x"], {"kernel_shape": [1, 1]}), ("GlobalAveragePool", ["x"], {}),
           ("GlobalMaxPool", ["x"], {}), ("BatchNormalization", ["x", "one", "zero", "zero", "one"], {}),
           ("Relu", ["x"], {}), ("Relu", ["t0"], {}), ("Add", ["t0", "x"], {}), ("Mul", ["t0", "k"], {}),
           ("Reshape", ["t0", "shape"], {}), ("Transpose", ["t0"], {"perm": [0, 1, 3, 2]}),
           ("Concat", ["t0", "t1"], {"axis": 1})]
    nodes = [helper.make_node(op, ins, [f"t{i}"], name=f"n{i}", **attrs) for i, (op, ins, attrs) in enumerate(ops)]
    model = _model(nodes, [2, 3, 2, 2], inits)
    kinds = batch_kinds(model)
    for i, (op, ins, _) in enumerate(ops):
        single = onnx.ModelProto()
        single.CopyFrom(model)
        del single.graph.output[:]
        single.graph.output.append(helper.make_tensor_value_info(f"t{i}", TensorProto.FLOAT, None))
        path = tmp_path / f"t{i}.onnx"
        onnx.save(single, str(path))
        loaded = worker.load(path)
        worker.unload(loaded)
        cntk = FREE if loaded.outputs[0].shape[0] is None else STATIC
        assert kinds[f"t{i}"] == cntk, f"{op}({', '.join(ins)}): CNTK gives a {cntk} batch"
