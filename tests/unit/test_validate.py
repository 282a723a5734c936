"""The table names checked against a converted graph (validate): a pure unit on a tiny ONNX graph."""
from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto, helper

from pytest_tf2cntk import validate
from pytest_tf2cntk.errors import ConfigError
from pytest_tf2cntk.options import BUDGET_SETTINGS


@pytest.fixture(scope="module")
def gemm_relu() -> onnx.ModelProto:
    """x -> Gemm -> Relu -> probs."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [2, 2], [1.0, 0.0, 0.0, 1.0])
    b = helper.make_tensor("b", TensorProto.FLOAT, [2], [0.0, 0.0])
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["h"]), helper.make_node("Relu", ["h"], ["probs"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [1, 2])], [w, b])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])


PROJECT, SCOPED = "[tool.tf2cntk.budgets]", '[tool.tf2cntk.budgets.models."m.keras"]'


@pytest.mark.parametrize("table", [
    {"Gemm": 4, "outputs": {"probs": 1e-5}},
    {"Conv": 4},  # an ONNX op this model lacks: the project's table covers other models too
    dict.fromkeys(BUDGET_SETTINGS, 2.0),
], ids=["own-names", "other-models-op", "settings"])
def test_the_project_table_takes_its_own_names_and_other_models_ops(gemm_relu: onnx.ModelProto, table: dict) -> None:
    validate.check_budgets(table, gemm_relu, PROJECT, scoped=False)


@pytest.mark.parametrize("table, scoped, says", [
    ({"Gemmm": 4}, False, "[tool.tf2cntk.budgets] Gemmm: 'Gemmm' is no ONNX op type nor a budget setting"),
    ({"gemm": 4}, False, "did you mean Gemm?"),
    ({"headrom": 4}, False, "did you mean headroom?"),
    ({"Conv": 4}, True, '[tool.tf2cntk.budgets.models."m.keras"] Conv: this model has no Conv op'),
    ({"outputs": {"prob": 1e-5}}, False, "[tool.tf2cntk.budgets.outputs] prob: this model has no output 'prob'"),
    ({"outputs": {"logits": 1e-5}}, True, "no output 'logits', so the entry would be ignored."),
], ids=["no-onnx-op", "case", "setting", "scoped-absent-op", "output-misspelled", "scoped-absent-output"])
def test_a_name_that_would_be_ignored_is_refused_naming_the_entry(gemm_relu: onnx.ModelProto, table: dict,
                                                                  scoped: bool, says: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate.check_budgets(table, gemm_relu, SCOPED if scoped else PROJECT, scoped=scoped)
    assert says in str(err.value)


def test_inputs_misspelled_or_absent(gemm_relu: onnx.ModelProto) -> None:
    validate.check_inputs({"image": (0, 1)}, gemm_relu, "[tool.tf2cntk.inputs]", scoped=False)  # another model's
    with pytest.raises(ConfigError, match=r"no input 'xx', so the entry would be ignored. did you mean x\?"):
        validate.check_inputs({"xx": (0, 1)}, gemm_relu, "[tool.tf2cntk.inputs]", scoped=False)
    with pytest.raises(ConfigError, match=r"\(inputs=\.\.\.\) image: this model has no input 'image'"):
        validate.check_inputs({"image": (0, 1)}, gemm_relu, "@pytest.mark.tf2cntk(inputs=...)", scoped=True)


def test_the_budget_settings_are_the_ones_the_budget_rule_reads() -> None:
    """BUDGET_SETTINGS (light, in options) and BudgetConfig.from_mapping (in the core) must agree."""
    from pytest_tf2cntk.parity.budgets import BudgetConfig

    assert BudgetConfig.from_mapping(dict.fromkeys(BUDGET_SETTINGS, 2.0)).op_ulps == {}
