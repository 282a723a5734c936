"""The table names checked against a converted graph (validate): a pure unit on a tiny ONNX graph."""
from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from pytest_tf2cntk import options, validate
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
    ({"outputs": {"logits": 1e-5}}, True, "no output 'logits', so the entry would be ignored\n  fix: correct the name"),
], ids=["no-onnx-op", "case", "setting", "scoped-absent-op", "output-misspelled", "scoped-absent-output"])
def test_a_name_that_would_be_ignored_is_refused_naming_the_entry(gemm_relu: onnx.ModelProto, table: dict,
                                                                  scoped: bool, says: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate.check_budgets(table, gemm_relu, SCOPED if scoped else PROJECT, scoped=scoped)
    assert says in str(err.value)


def test_inputs_misspelled_or_absent(gemm_relu: onnx.ModelProto) -> None:
    validate.check_inputs({"image": (0, 1)}, gemm_relu, "[tool.tf2cntk.inputs]", scoped=False)  # another model's
    with pytest.raises(ConfigError, match=r"no input 'xx', so the entry would be ignored\n  fix: did you mean x\?"):
        validate.check_inputs({"xx": (0, 1)}, gemm_relu, "[tool.tf2cntk.inputs]", scoped=False)
    with pytest.raises(ConfigError, match=r"\(inputs=\.\.\.\) image: this model has no input 'image'"):
        validate.check_inputs({"image": (0, 1)}, gemm_relu, "@pytest.mark.tf2cntk(inputs=...)", scoped=True)


def test_the_budget_settings_are_the_ones_the_budget_rule_reads() -> None:
    """BUDGET_SETTINGS (light, in options) and BudgetConfig.from_mapping (in the core) must agree."""
    from pytest_tf2cntk.parity.budgets import BudgetConfig

    assert BudgetConfig.from_mapping(dict.fromkeys(BUDGET_SETTINGS, 2.0)).op_ulps == {}


def test_check_project_checks_the_models_own_table_strictly(gemm_relu: onnx.ModelProto) -> None:
    tables = {"budgets": {"Conv": 4.0, "models": {"nets/a.keras": {"Conv": 4.0}}}, "inputs": {}}
    validate.check_project(tables, gemm_relu, "nets/b.keras")
    with pytest.raises(ConfigError, match='models."nets/a.keras"'):
        validate.project_budgets(tables, gemm_relu, "nets/a.keras")


@pytest.mark.parametrize("value, says", [
    ([1.0, 0.0], "needs finite low < high; give [0, 1]"), (0.5, "is two numbers [low, high]"),
    ("0,1", "is two numbers"), ([0, float("inf")], "needs finite low < high"), ([True, 2], "is two numbers"),
])
def test_a_bad_input_range_names_its_source(value: object, says: str) -> None:
    with pytest.raises(ConfigError) as err:
        options.parse_input_ranges({"x": value}, "@pytest.mark.tf2cntk(inputs=...)")
    assert str(err.value).startswith("@pytest.mark.tf2cntk(inputs=...) x = ") and says in str(err.value)


@pytest.mark.parametrize("table, says", [
    ({"Gemm": "abc"}, "Gemm = 'abc': a budget is a finite number >= 0"), ({"Gemm": -1}, "Gemm = -1"),
    ({"outputs": {"probs": -1e-5}}, "marker outputs: probs = -1e-05"), ({"Gemm": True}, "Gemm = True"),
])
def test_a_bad_budget_names_its_source(table: dict, says: str) -> None:
    with pytest.raises(ConfigError, match="a budget is a finite number") as err:
        options.parse_budget_table(table, "marker")
    assert says in str(err.value), str(err.value)


def test_devices_are_checked_when_parsed() -> None:
    opt = options.BY_NAME["devices"]
    assert opt.parse("CPU, gpu:1") == "cpu,gpu:1" and opt.parse(["cpu"]) == "cpu"
    with pytest.raises(ValueError, match="no device given"):
        opt.parse(",")
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        opt.parse("cpu,tpu")


def test_a_report_path_that_cannot_be_a_file_is_refused(tmp_path: Path) -> None:
    opt = options.BY_NAME["report"]
    assert opt.parse(str(tmp_path / "new" / "r.json")) == str(tmp_path / "new" / "r.json")
    with pytest.raises(ConfigError, match="is a directory, and the report is a file"):
        opt.parse(str(tmp_path))
    (tmp_path / "f").write_text("")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        opt.parse(str(tmp_path / "f" / "r.json"))


def test_cli_text_gives_the_commands_own_flags() -> None:
    text = "test it at --tf2cntk-batch 1; pass --tf2cntk-unsafe-load; --tf2cntk-input-shape=x:4, --tf2cntk-repairs=off"
    assert options.cli_text(text) == "test it at --batch 1; pass --unsafe-load; --input-shape=x:4, --repairs=off"
    pytest_only = "unless --tf2cntk-no-history, or --tf2cntk-report PATH"  # no such flag in the command
    assert options.cli_text(pytest_only) == pytest_only


def test_a_tool_table_outside_the_rootdir_is_found(tmp_path: Path) -> None:
    root = tmp_path / "proj"
    (root / "sub").mkdir(parents=True)
    (tmp_path / "pyproject.toml").write_text("[tool.tf2cntk]\nbatch = 2\n")
    (root / "pyproject.toml").write_text("[tool.tf2cntk]\nbatch = 4\n")  # the rootdir's: read, not reported
    (root / "sub" / "pyproject.toml").write_text("[project]\nname = 'x'\n")  # no table: nothing to say
    assert options.ignored_pyprojects(root / "sub", root) == [tmp_path / "pyproject.toml"]
    assert "Move the table into" in options.ignored_note(tmp_path / "pyproject.toml", root)


def test_the_command_finds_the_rootdir_pytest_would(tmp_path: Path) -> None:
    sub = tmp_path / "pkg" / "sub"
    sub.mkdir(parents=True)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "pkg" / "pyproject.toml").write_text("[project]\nname = 'pkg'\n")  # no pytest config
    assert options.find_rootdir(sub) == tmp_path  # pytest.ini wins over a nearer plain pyproject.toml
    (tmp_path / "pkg" / "pyproject.toml").write_text("[tool.pytest.ini_options]\n")
    assert options.find_rootdir(sub) == tmp_path / "pkg"
    (tmp_path / "pytest.ini").unlink()
    (tmp_path / "pkg" / "pyproject.toml").write_text("[project]\nname = 'pkg'\n")
    assert options.find_rootdir(sub) == tmp_path / "pkg"  # no pytest config anywhere: the nearest pyproject.toml
