"""The measured verdict's arithmetic: errors against the float64 truth, the floor, the noise, the
limit, and the attribution it gives (pure numbers, no model)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from pytest_tf2cntk.parity import budgets as B
from pytest_tf2cntk.parity.metrics import compare
from pytest_tf2cntk.parity.result import (RULE_BUDGET, RULE_MEASURED, RULE_RUN, RULE_USER, STAGE_BOTH,
                                          STAGE_CNTK, STAGE_CONVERTER, OutputCheck)
from pytest_tf2cntk.parity.truth import (FLOOR_ULPS, NOISE_FACTOR, RUN_FACTOR, RUN_MIN_EXAMPLES, RunTruth,
                                         TruthCheck, error_vs_truth, rounding_floor, truth_check)

U = 2.0 ** -24


def test_error_vs_truth_is_scaled_and_ignores_nonfinite_elements() -> None:
    truth = np.array([1.0, -1.0, 1.0, -1.0])
    assert error_vs_truth(truth, truth + np.array([0, 0, 1e-3, 0])) == pytest.approx(1e-3)
    got = np.array([np.nan, -1.0, 1.0, -1.0 + 2e-3])  # NaN placement is judged elsewhere (TF vs CNTK)
    assert error_vs_truth(truth, got) == pytest.approx(2e-3)
    assert error_vs_truth(truth, got[:3]) == math.inf
    assert error_vs_truth(np.zeros(3), np.zeros(3)) == 0.0


def test_the_floor_is_units_of_rounding_of_the_largest_element() -> None:
    truth = np.array([4.0, 0.0, 0.0, 0.0])  # rms 2, max 4
    assert rounding_floor(truth, np.dtype(np.float32)) == pytest.approx(FLOOR_ULPS * U * 4 / 2)
    assert rounding_floor(truth, np.dtype(np.float32), 1.0) == pytest.approx(U * 2)
    assert rounding_floor(np.array([np.inf, np.nan]), np.dtype(np.float32)) == 0.0


def test_cntk_passes_within_the_factor_of_the_float32_noise() -> None:
    t = TruthCheck("twin", tf32=1e-7, cntk=9e-7, floor=1e-8)
    assert t.noise == 1e-7 and t.limit == pytest.approx(NOISE_FACTOR * 1e-7) and t.passed
    assert not TruthCheck("twin", tf32=1e-7, cntk=1.1e-6, floor=1e-8).passed
    exact = TruthCheck("twin", tf32=0.0, cntk=3e-8, floor=4e-8)  # float32 was exact: the floor allows rounding
    assert exact.noise == 4e-8 and exact.passed and exact.ratio == pytest.approx(0.75)


def test_onnx_runtime_counts_only_when_the_converted_graph_is_right() -> None:
    noisy = TruthCheck("twin", tf32=1e-6, cntk=3e-5, floor=1e-8, ort32=5e-5, graph=2e-7)
    assert not noisy.converter_wrong and noisy.noise == 5e-5 and noisy.passed  # ORT32 rounds more: allowed
    wrong = TruthCheck("twin", tf32=1e-6, cntk=3e-5, floor=1e-8, ort32=5e-5, graph=4e-5)
    assert wrong.converter_wrong and wrong.noise == 1e-6 and not wrong.passed  # its error excuses nothing
    unknown = TruthCheck("twin", tf32=1e-6, cntk=3e-5, floor=1e-8, ort32=5e-5)  # graph not evaluated
    assert unknown.converter_wrong and not unknown.passed


def test_a_graph_that_folds_parameters_may_be_off_by_what_rounding_them_moves() -> None:
    """Calibrated ResNet50: tf2onnx folds BatchNorm into the Conv weights in float32, and the model
    amplifies that rounding to 2.2e-5, 11x TF32's error: the graph is right, ORT32's noise counts."""
    folded = TruthCheck("twin", tf32=1.98e-6, cntk=4.12e-5, floor=1.5e-6, ort32=6.08e-5, graph=2.23e-5)
    assert folded.converter_wrong and not folded.passed  # without knowing what rounding moves
    folded.params = 1.9e-5  # the float64 graph vs itself with every parameter rounded once more
    assert folded.graph_close == pytest.approx(NOISE_FACTOR * 1.9e-5)
    assert not folded.converter_wrong and folded.noise == 6.08e-5 and folded.passed
    folded.graph = 3e-4  # far beyond what rounding moves: a converter bug still shows
    assert folded.converter_wrong and not folded.passed


def _run(examples: list[TruthCheck]) -> RunTruth:
    run = RunTruth()
    for t in examples:
        run.add(t)
    return run


def test_the_run_rule_catches_a_systematic_error_no_single_example_shows() -> None:
    """A weight x(1+1e-4) in a well-conditioned ResNet50: CNTK's error is 3-6x the floor on every
    example, within the per-example factor 10, and its median ratio is above 2.5."""
    noise = [1e-7 * (1 + i % 3) for i in range(20)]
    faulty = _run([TruthCheck("twin", tf32=n, cntk=2e-6 + 1e-7 * i, floor=5e-7, ort32=n if i == 0 else None)
                   for i, n in enumerate(noise)])
    assert all(r < NOISE_FACTOR for r in faulty.ratios)
    assert faulty.median == pytest.approx(5.9) and faulty.over == 20 and not faulty.passed  # 4 to 7.8x
    assert faulty.worst == 19 and not faulty.complete  # ONNX Runtime ran on one: the engine runs it on all first
    correct = _run([TruthCheck("twin", tf32=n, cntk=1.5 * n, floor=5e-7) for n in noise])
    assert correct.passed and correct.median < 1


def test_the_run_rule_is_not_moved_by_a_heavy_tail_and_needs_enough_examples() -> None:
    """A chaotic recurrence: on a few inputs CNTK's error is 5-9x the noise (a correct one), on the
    rest below it. The largest error over the run is 9x the largest noise; the median is 0.5."""
    tail = [TruthCheck("twin", tf32=1e-3, cntk=5e-3 + 1e-3 * i, floor=1e-6) for i in range(5)]
    body = [TruthCheck("twin", tf32=1e-5, cntk=5e-6, floor=1e-6) for _ in range(16)]
    run = _run(tail + body)
    assert run.over == 5 and run.median == pytest.approx(0.5) and run.passed
    few = _run([TruthCheck("twin", tf32=1e-7, cntk=9e-7, floor=1e-8)] * (RUN_MIN_EXAMPLES - 1))
    assert not few.applies and few.passed and few.median == pytest.approx(9)
    # ORT32 rounds as much as CNTK: a correct float32 implementation does, the noise counts it
    ort = _run([TruthCheck("twin", tf32=1e-6, cntk=9e-6, floor=1e-8, ort32=8e-6, graph=1e-7)] * 12)
    assert ort.complete and ort.median < 1.2 and ort.passed


def test_the_run_rule_decides_only_where_it_alone_fails_and_says_so() -> None:
    check = _check(1e-7, 5e-7, 1e-7, 1e-8, 5e-7)  # 5x this example's noise: within its factor 10
    check.run = _run([TruthCheck("twin", tf32=1e-7, cntk=2e-7, floor=1e-9, ort32=1e-7)] * 12)
    assert check.passed and check.rule == RULE_MEASURED  # median 2x: within 2.5x
    check.run = _run([TruthCheck("twin", tf32=1e-7, cntk=5e-7, floor=1e-9, ort32=1e-8)] * 12)
    assert not check.passed and check.rule == RULE_RUN and check.stage == STAGE_CNTK
    assert check.scaled_error == 5e-7 and check.allowed == pytest.approx(RUN_FACTOR * 1e-7)
    assert check.ratio == pytest.approx(5.0)
    assert "on 12 of 12 examples CNTK's error" in check.reasons[0] and "median 5x, limit 2.5x" in check.reasons[0]
    assert OutputCheck.from_json(check.to_json()).run == check.run


def test_a_truth_from_the_converted_graph_counts_only_onnx_runtime() -> None:
    shared = TruthCheck("onnx", tf32=1e-2, cntk=3e-5, floor=1e-8, ort32=2e-6, independent=False)
    assert shared.noise == 2e-6 and not shared.passed  # TF32's distance may be the converter's bug
    assert not shared.converter_wrong


def _check(tf32: float, cntk: float, ort32: float | None, graph: float | None, ort_vs_cntk: float,
           overridden: bool = False) -> OutputCheck:
    budget = B.OutputBudget("y", 1e-4, U, 3, (("Gemm", 1.0),), overridden)
    ref = np.ones(4, np.float32)

    def metrics(e: float) -> object:
        return compare(ref, ref + np.float32(e))

    return OutputCheck("y", budget, metrics(cntk), metrics(ort32 or 0.0), metrics(ort_vs_cntk),
                       TruthCheck("twin", tf32, cntk, 1e-9, ort32=ort32, graph=graph))


def test_attribution_from_the_truth_numbers() -> None:
    assert _check(1e-7, 5e-5, 1e-7, 1e-8, 5e-5).stage == STAGE_CNTK  # graph right, CNTK far
    assert _check(1e-7, 5e-5, 5e-5, 5e-5, 1e-7).stage == STAGE_CONVERTER  # graph wrong, CNTK = ORT
    assert _check(1e-7, 5e-3, 5e-5, 5e-5, 5e-3).stage == STAGE_BOTH  # graph wrong, CNTK farther still
    assert _check(1e-7, 5e-7, 1e-7, 1e-8, 5e-7).stage == "none"
    ok = _check(1e-7, 5e-7, 1e-7, 1e-8, 5e-7)
    assert ok.rule == RULE_MEASURED and ok.scaled_error == 5e-7 and ok.allowed == pytest.approx(1e-6)


def test_the_rule_is_stated_and_a_user_budget_wins() -> None:
    user = _check(1e-7, 5e-5, None, None, 0.0, overridden=True)
    assert user.rule == RULE_USER and user.allowed == 1e-4 and user.passed  # 5e-5 < the user's 1e-4
    no_truth = OutputCheck("y", user.budget, user.tf_vs_cntk)
    assert OutputCheck("y", B.OutputBudget("y", 1e-4, U, 1, ()), user.tf_vs_cntk).rule == RULE_BUDGET
    assert no_truth.rule == RULE_USER


def test_truth_check_from_arrays() -> None:
    rng = np.random.default_rng(0)
    truth = rng.normal(size=100)
    tf32 = truth.astype(np.float32)
    cntk = (truth * (1 + 1e-3)).astype(np.float32)
    t = truth_check("twin", truth, tf32, cntk)
    assert t.tf32 < 1e-7 and t.cntk > 1e-4 and not t.passed and t.ratio > 100
