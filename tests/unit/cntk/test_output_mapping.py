"""CNTK outputs tied to ONNX outputs whatever else the worker loaded first (issue 12, item 1).

CNTK names no Gemm output and orders a model's outputs by process-wide uid counters, so the
worker marks every graph output with a named Identity before CNTK loads it. Real converted Keras
models with Dense heads, several in one worker in different orders: each model's outputs must be
what it gives alone in a fresh worker, and each head must be its own head's numbers."""
from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pytest_tf2cntk.cntk.client import CNTKWorker
from pytest_tf2cntk.errors import CNTKError
from tests.support import keras_models
from tests.support.faults import feeds_for
from tests.support.paths import FIXTURES

pytestmark = pytest.mark.needs_cntk


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict:
    from pytest_tf2cntk.convert.pipeline import convert

    d = tmp_path_factory.mktemp("heads")
    models = {"twin": keras_models.twin_heads(d), "three": keras_models.three_heads(d),
              "mlp": FIXTURES / "mlp.keras"}
    return {k: convert(p, batch=2) for k, p in models.items()}


def _outputs(worker: CNTKWorker, conv, feeds) -> dict[str, np.ndarray]:
    return worker.eval(worker.load(conv.onnx_path), feeds)


def test_gemm_heads_are_unnamed_in_cntk(converted) -> None:
    """The premise: the heads reach CNTK as Gemm nodes whose outputs CNTK does not name."""
    graph = converted["twin"].onnx_model.graph
    producers = {o: n.op_type for n in graph.node for o in n.output}
    assert [producers[o.name] for o in graph.output] == ["Gemm", "Gemm"]
    with CNTKWorker(timeout=120) as w:
        loaded = w.load(converted["twin"].onnx_path)
        assert [t.cntk_name for t in loaded.outputs] == ["", ""]  # nothing to match by name
        assert [t.matched for t in loaded.outputs] == ["marker", "marker"]


def test_models_in_one_worker_in_any_order_give_what_each_gives_alone(converted) -> None:
    feeds = {k: feeds_for(c, seed=3) for k, c in converted.items()}
    alone = {}
    for k, conv in converted.items():
        with CNTKWorker(timeout=120) as w:
            alone[k] = _outputs(w, conv, feeds[k])
    # each head is its own head: TF's numbers, not its twin's of the same shape
    tf = converted["twin"].tf_model.run(feeds["twin"], "cpu")
    a, b = (o.name for o in converted["twin"].outputs)
    np.testing.assert_allclose(alone["twin"][a], tf[a], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(alone["twin"][b], tf[b], rtol=1e-4, atol=1e-5)
    assert np.abs(tf[a] - tf[b]).max() > 0.1  # swapped heads would show
    for order in itertools.permutations(converted):
        with CNTKWorker(timeout=120) as w:
            for k in order:
                got = _outputs(w, converted[k], feeds[k])
                assert sorted(got) == sorted(alone[k]), (order, k)
                for name, value in got.items():
                    np.testing.assert_array_equal(value, alone[k][name], err_msg=f"{order} {k} {name}")


def _gemm_pair(path, swap_outputs: bool) -> None:
    """x -> two unnamed Gemm heads of equal shape; graph outputs listed in either order."""
    rng = np.random.default_rng(5)
    inits = [numpy_helper.from_array(rng.standard_normal((3, 4)).astype(np.float32), n) for n in ("Wa", "Wb")]
    inits.append(numpy_helper.from_array(np.zeros(4, np.float32), "c"))
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 4]) for n in ("ya", "yb")]
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "Wa", "c"], ["ya"]),
                               helper.make_node("Gemm", ["x", "Wb", "c"], ["yb"])], "pair",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              outs[::-1] if swap_outputs else outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    model.ir_version = 4
    onnx.save(model, str(path))


def test_unnamed_nodes_in_any_output_order_map_by_marker(tmp_path) -> None:
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    with CNTKWorker(timeout=60) as w:
        for swap in (False, True, False):  # reloading moves CNTK's uid counters on
            path = tmp_path / f"pair_{swap}.onnx"
            _gemm_pair(path, swap)
            weights = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
            loaded = w.load(path)
            assert loaded.output_names == (["yb", "ya"] if swap else ["ya", "yb"])  # ONNX order
            got = w.eval(loaded, {"x": x})
            np.testing.assert_allclose(got["ya"], x @ weights["Wa"], rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(got["yb"], x @ weights["Wb"], rtol=1e-5, atol=1e-5)


def test_marker_name_clash_is_avoided(tmp_path) -> None:
    """A graph already using the marker's name keeps its own tensor; the marker takes another."""
    from pytest_tf2cntk.cntk.worker.onnx_reader import MARKER_PREFIX

    taken = MARKER_PREFIX + "0"
    graph = helper.make_graph([helper.make_node("Relu", ["x"], [taken], name=taken),
                               helper.make_node("Neg", [taken], ["y"])], "clash",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3]),
                               helper.make_tensor_value_info(taken, TensorProto.FLOAT, [2, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    model.ir_version = 4
    onnx.save(model, str(tmp_path / "clash.onnx"))
    x = np.random.default_rng(1).standard_normal((2, 3)).astype(np.float32)
    with CNTKWorker(timeout=60) as w:
        got = w.eval(w.load(tmp_path / "clash.onnx"), {"x": x})
    np.testing.assert_allclose(got[taken], np.maximum(x, 0), rtol=1e-6)
    np.testing.assert_allclose(got["y"], -np.maximum(x, 0), rtol=1e-6)
