"""Per-op budgets composed along the graph."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pytest_tf2cntk.parity import budgets as B


def _chain(n_matmuls: int, k: int = 16) -> onnx.ModelProto:
    nodes, inits, prev = [], [], "x"
    for i in range(n_matmuls):
        inits.append(numpy_helper.from_array(np.eye(k, dtype=np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"], name=f"mm{i}"))
        nodes.append(helper.make_node("Relu", [f"m{i}"], [f"r{i}"], name=f"relu{i}"))
        prev = f"r{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, k])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [2, k])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)], ir_version=4)


def test_budget_sums_op_terms_over_ancestors() -> None:
    cfg = B.BudgetConfig()
    one = B.output_budgets(_chain(1), cfg)["r0"]
    four = B.output_budgets(_chain(4), cfg)["r3"]
    u = 2.0 ** -24
    # MatMul with K=16: 2 ulps * sqrt(16) = 8 per node; Relu is exact
    assert one.value == pytest.approx(cfg.headroom * u * 8)
    assert four.value == pytest.approx(cfg.headroom * u * 8 * 4)  # four MatMuls add up
    assert one.terms == 1 and four.terms == 4
    assert one.dominant[0][0] == "MatMul"


def test_wider_reduction_gets_a_larger_budget() -> None:
    cfg = B.BudgetConfig()
    narrow = B.output_budgets(_chain(1, k=4), cfg)["r0"].value
    wide = B.output_budgets(_chain(1, k=64), cfg)["r0"].value
    assert wide == pytest.approx(narrow * 4)  # sqrt(64 / 4)


def test_budget_overrides_from_mapping() -> None:
    cfg = B.BudgetConfig.from_mapping({"MatMul": 1, "headroom": 2, "outputs": {"r0": 1e-3}}, scale=3.0)
    assert cfg.ulps("MatMul") == 1 and cfg.ulps("Relu") == 0
    assert cfg.headroom == 2 and cfg.scale == 3
    fixed = B.output_budgets(_chain(1), cfg)["r0"]
    assert fixed.overridden and fixed.value == pytest.approx(3e-3)


def test_all_exact_chain_still_allows_one_ulp() -> None:
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="r")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    b = B.output_budgets(model, B.BudgetConfig())["y"]
    assert b.terms == 0 and b.value == pytest.approx(B.DEFAULT_HEADROOM * 2.0 ** -24)


def test_reduction_length_of_conv_is_kernel_volume_times_channels() -> None:
    w = numpy_helper.from_array(np.zeros((8, 3, 3, 3), np.float32), "w")
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="c")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    assert B.node_terms(model, B.BudgetConfig())["c"].reduction == 27
