"""Pure units of the core: metrics, budgets, input recipes, domains, options. No TF, no CNTK."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pytest_tf2cntk.parity import budgets as B
from pytest_tf2cntk import options
from pytest_tf2cntk.convert.domains import derive_domains
from pytest_tf2cntk.parity.inputs import InputRecipe, inputs_strategy, materialize
from pytest_tf2cntk.parity.metrics import compare, fraction_over, ulp_distance


# -- metrics ----------------------------------------------------------------------------------

def test_ulp_distance_counts_representable_steps_across_zero() -> None:
    a = np.array([1.0, 0.0, -0.0, 1.0], np.float32)
    b = np.array([np.nextafter(np.float32(1), np.float32(2)), np.float32(1e-45),
                  np.float32(-1e-45), np.float32(1.0)], np.float32)
    assert ulp_distance(a, b).tolist() == [1.0, 1.0, 1.0, 0.0]
    neg = np.array([-1.0], np.float32)
    assert ulp_distance(neg, np.nextafter(neg, np.float32(-2))).tolist() == [1.0]


def test_compare_reports_worst_element_and_scale() -> None:
    ref = np.ones((2, 3), np.float32)
    got = ref.copy()
    got[1, 2] += 0.5
    m = compare(ref, got)
    assert m.shape_ok and m.dtype_ok
    assert m.max_abs == pytest.approx(0.5)
    assert m.max_abs_at == (1, 2) and m.max_rel_at == (1, 2)
    assert m.ref_scale == pytest.approx(1.0)
    assert m.top1_agreement == pytest.approx(0.5)  # row 1 argmax moved to the bumped element
    assert m.nan_mismatch == 0


def test_relative_error_uses_a_floor_for_tiny_references() -> None:
    ref = np.array([1.0, 1e-12], np.float32)
    got = np.array([1.0, 2e-12], np.float32)
    m = compare(ref, got)
    assert m.rel_floor == pytest.approx(1e-3 * np.sqrt(0.5), rel=1e-3)
    assert m.max_rel < 1e-8  # not 1.0: the difference is noise next to the output's scale


def test_nan_inf_must_match_position_and_sign() -> None:
    ref = np.array([np.nan, np.inf, 1.0], np.float32)
    assert compare(ref, ref.copy()).nan_mismatch == 0
    assert compare(ref, np.array([np.nan, -np.inf, 1.0], np.float32)).nan_mismatch == 1
    assert compare(ref, np.array([0.0, np.inf, 1.0], np.float32)).nan_mismatch == 1


def test_shape_and_dtype_mismatch_are_reported() -> None:
    m = compare(np.zeros((2, 2), np.float32), np.zeros((4,), np.float32))
    assert not m.shape_ok and m.max_abs == float("inf")
    assert not compare(np.zeros(3, np.float32), np.zeros(3, np.float64)).dtype_ok


def test_fraction_over_uses_numpy_rule() -> None:
    ref = np.zeros(10)
    got = np.zeros(10)
    got[:3] = 1.0
    assert fraction_over(ref, got, atol=0.5, rtol=0) == pytest.approx(0.3)
    assert fraction_over(ref, got, atol=1.0, rtol=0) == 0.0


# -- budgets ----------------------------------------------------------------------------------

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


# -- domains and inputs -----------------------------------------------------------------------

def _embedding_model(vocab: int = 37) -> onnx.ModelProto:
    table = numpy_helper.from_array(np.zeros((vocab, 4), np.float32), "table")
    nodes = [helper.make_node("Cast", ["ids"], ["ids64"], to=TensorProto.INT64, name="cast"),
             helper.make_node("Gather", ["table", "ids64"], ["emb"], name="gather")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT32, [2, 5]),
                                           helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("emb", TensorProto.FLOAT, [2, 5, 4])], [table])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])


def test_integer_input_that_indexes_an_embedding_stays_in_vocabulary() -> None:
    doms = derive_domains(_embedding_model(37), {"x": (-3.0, 5.0)})
    assert doms["ids"].kind == "index" and (doms["ids"].low, doms["ids"].high) == (0, 37)
    assert doms["x"].kind == "float" and (doms["x"].low, doms["x"].high) == (-3.0, 5.0)
    for dist in ("constant", "uniform", "normal", "ramp"):
        for seed in range(5):
            arr = InputRecipe(dist, seed, 0.0, 1.0, "none", 0.0).fill(doms["ids"])
            assert arr.dtype == np.int32 and arr.shape == (2, 5)
            assert arr.min() >= 0 and arr.max() < 37


def test_float_recipe_respects_sub_range_and_specials() -> None:
    doms = derive_domains(_embedding_model(), {"x": (-2.0, 2.0)})
    arr = InputRecipe("uniform", 1, 0.5, 0.75, "none", 0.0).fill(doms["x"])
    assert arr.dtype == np.float32 and ((arr >= 0.0) & (arr <= 1.0)).all()
    with_nan = InputRecipe("uniform", 1, 0.0, 1.0, "nonfinite", 0.3).fill(doms["x"])
    assert not np.isfinite(with_nan).all()
    sub = InputRecipe("constant", 0, 0.0, 1.0, "subnormal", 0.5).fill(doms["x"])
    tiny = np.abs(sub[sub != -2.0])
    assert tiny.size and (tiny < np.finfo(np.float32).tiny).all()


def test_recipe_is_reproducible_and_describes_itself() -> None:
    doms = derive_domains(_embedding_model(), {"x": (-1.0, 1.0)})
    r = InputRecipe("normal", 42, 0.0, 1.0, "zeros", 0.1)
    assert np.array_equal(r.fill(doms["x"]), r.fill(doms["x"]))
    assert "seed=42" in r.describe(doms["x"]) and "zeros" in r.describe(doms["x"])
    assert InputRecipe("constant", 0, 0.25, 1.0, "none", 0).describe(doms["x"]) == "constant -0.5"


def test_strategy_draws_valid_inputs() -> None:
    from hypothesis import given, settings

    doms = derive_domains(_embedding_model(11))
    seen = []

    @settings(max_examples=25, derandomize=True, database=None)
    @given(inputs_strategy(doms, edge_values=True))
    def check(recipes: dict) -> None:
        arrays = materialize(recipes, doms)
        assert set(arrays) == {"ids", "x"}
        assert arrays["ids"].max() < 11 and arrays["x"].shape == (2, 3)
        seen.append(recipes["x"].distribution)

    check()
    assert len(set(seen)) > 1


# -- options ----------------------------------------------------------------------------------

def test_options_cli_overrides_ini_and_validates(tmp_path: Path) -> None:
    cli = {"tf2cntk_max_examples": "7", "tf2cntk_devices": None, "tf2cntk_models": None}
    ini = {"tf2cntk_max_examples": "3", "tf2cntk_devices": "cpu, gpu:1", "tf2cntk_models": ["m.keras"]}
    s = options.resolve(lambda k: cli.get(k), lambda k: ini.get(k), tmp_path,
                        {"tool": {"tf2cntk": {"inputs": {"x": [0, 255]}, "budgets": {"Conv": 3}}}})
    assert s.max_examples == 7 and s.devices == ("cpu", "gpu:1")
    assert s.models == (tmp_path / "m.keras",)  # ini paths are relative to the rootdir
    assert s.inputs == {"x": (0.0, 255.0)} and s.budgets == {"Conv": 3}
    with pytest.raises(ValueError, match="--tf2cntk-devices"):
        options.resolve(lambda k: "tpu" if k == "tf2cntk_devices" else None, lambda k: None, tmp_path)
    with pytest.raises(ValueError, match="--tf2cntk-max-examples"):
        options.resolve(lambda k: "0" if k == "tf2cntk_max_examples" else None, lambda k: None, tmp_path)


def test_every_option_is_prefixed_and_has_an_ini_twin() -> None:
    for o in options.OPTIONS:
        assert o.ini == "tf2cntk_" + o.name
        assert o.flag.startswith("--tf2cntk-")


def test_stage_attribution_covers_every_combination() -> None:
    from pytest_tf2cntk.parity.engine import STAGE_BOTH, STAGE_CNTK, STAGE_COMBINED, STAGE_CONVERTER, OutputCheck

    budget = B.OutputBudget("y", 0.1, 2.0 ** -24, 1, ())
    ref = np.ones(4, np.float32)

    def check(tf_ort: float, ort_cntk: float) -> str:
        ort = ref + np.float32(tf_ort)
        cntk = ort + np.float32(ort_cntk)
        return OutputCheck("y", budget, compare(ref, cntk), compare(ref, ort), compare(ort, cntk)).stage

    assert check(0.0, 0.5) == STAGE_CNTK
    assert check(0.5, 0.0) == STAGE_CONVERTER
    assert check(0.5, 0.5) == STAGE_BOTH
    assert check(0.07, 0.07) == STAGE_COMBINED  # 0.14 in total, each leg within 0.1
    assert check(0.0, 0.01) == "none"  # passes
