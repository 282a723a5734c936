"""The drift rule on synthetic histories."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from pytest_tf2cntk.history import store as H
from pytest_tf2cntk.history.drift import DriftJudge, error_floor, judge_errors, noise_upper
from pytest_tf2cntk.parity.localize.report import LayerRow
from tests.support.synthetic import U32, make_result

from tests.support.histories import JITTER, record_series


# -- the rule ------------------------------------------------------------------------------------

def test_zero_and_tiny_baselines_are_floored_not_divided_by() -> None:
    floor = error_floor(U32, 1e-5)
    assert floor == U32  # one rounding of the output beats budget / 1000 here
    assert error_floor(U32, 1e-1) == pytest.approx(1e-4)  # ... and a thousandth of a loose budget wins
    assert error_floor(None, None) == 1e-12
    same = judge_errors(3e-8, [0.0], factor=2, floor=floor)
    assert same.ratio == 1.0 and not same.significant  # bit-exact before, sub-ulp now: nothing happened
    grown = judge_errors(1e-6, [0.0], factor=2, floor=floor)
    assert grown.ratio == pytest.approx(1e-6 / U32) and grown.significant and math.isfinite(grown.ratio)
    broken = judge_errors(math.inf, [1e-7], factor=2, floor=floor)
    assert broken.significant and broken.ratio == math.inf


def test_jitter_within_the_noise_band_is_not_drift_but_growth_is() -> None:
    history = [1e-6 * f for f in JITTER]  # newest first: the baseline happens to be a low run
    upper = noise_upper(history)
    assert upper >= 2e-6  # at least everything the window has seen
    jitter = judge_errors(1.8e-6, history, factor=2, floor=U32, label="y")
    assert jitter.ratio == pytest.approx(3.6) and not jitter.significant
    assert "within the noise band" in jitter.message
    grown = judge_errors(2e-5, history, factor=2, floor=U32, label="y", baseline_run=7)
    assert grown.significant and grown.ratio == pytest.approx(40)
    assert grown.message.startswith("y: error 2e-05 is 40x the baseline 5e-07 (run 7)") and "DRIFT" in grown.message
    assert grown.threshold == pytest.approx(max(2 * 5e-7, upper))
    # a long quiet history narrows the band below the factor: the factor alone decides
    quiet = judge_errors(2.5e-6, [1e-6] * 10, factor=2, floor=U32)
    assert 1.5 < quiet.noise < 1.7 and quiet.significant
    assert not judge_errors(1.9e-6, [1e-6] * 10, factor=2, floor=U32).significant
    # one run of history: the prior assumes up to 2.5x jitter, so 2.4x is not yet drift
    assert judge_errors(2.4e-6, [1e-6], factor=2, floor=U32).noise == pytest.approx(2.5)
    assert not judge_errors(2.4e-6, [1e-6], factor=2, floor=U32).significant
    # the real case behind the prior: three runs of mlp.keras, then an unchanged run at 2.4x the lowest
    assert not judge_errors(6.58e-7, [2.77e-7, 3.77e-7, 3.34e-7], factor=2, floor=U32).significant


def test_drift_judge_against_latest_and_a_tagged_baseline(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite"
    assert DriftJudge(path).judge("m.keras", "cpu", "y", 1e-6).message.endswith("no earlier run in the history")
    record_series(path, {"stable": [1e-6 * f for f in JITTER], "late": [None] * 9 + [1e-6]})
    H.tag_run(path, 3, "release")
    judge = DriftJudge(path, "latest", factor=2.0, window=10)
    assert judge.baseline_run == 10
    assert not judge.judge("m.keras", "cpu", "stable", 1.5e-6).significant
    v = judge.judge("m.keras", "cpu", "stable", 1e-5)
    assert v.significant and v.baseline_run == 10 and v.samples == 10 and v.baseline_error == pytest.approx(8e-7)
    assert judge.judge("m.keras", "cpu", "late", 1e-6).ratio == 1.0
    assert judge.judge("m.keras", "gpu", "stable", 1e-5).baseline_error is None  # never measured there
    tagged = DriftJudge(path, "release", factor=2.0)
    v = tagged.judge("m.keras", "cpu", "stable", 1.5e-6)  # run 3 measured 7e-7; window = runs 1-3
    assert v.baseline_run == 3 and v.samples == 3 and v.ratio == pytest.approx(1.5 / 0.7)
    unmeasured = tagged.judge("m.keras", "cpu", "late", 1e-6)
    assert "not measured in baseline run 3" in unmeasured.message
    assert unmeasured.baseline_run is None  # a table must not show run 3 as this output's baseline
    verdicts = judge.judge_result("m.keras", make_result("m.keras", "cpu", {"stable": 9e-6, "late": 1.1e-6}).result)
    assert verdicts["stable"].significant and not verdicts["late"].significant
    with pytest.raises(ValueError):
        DriftJudge(path, factor=1.0)


def test_per_op_drift_reports_the_worst_node_of_each_op_type(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite"
    record_series(path, {"y": [1e-6] * 10})
    judge = DriftJudge(path)
    rows = [LayerRow("m.keras", "cpu", "conv0", "Conv", "c0", 1.1e-7, 1e-5),
            LayerRow("m.keras", "cpu", "conv1", "Conv", "c1", 5e-6, 1e-5),
            LayerRow("m.keras", "cpu", "relu", "Relu", "r", 0.0, 5e-7)]
    by_op = judge.judge_layers(rows)
    conv = by_op[("m.keras", "cpu", "Conv")]
    assert conv.significant and "node conv1" in conv.message
    relu = by_op[("m.keras", "cpu", "Relu")]
    assert relu.ratio == 1.0 and not relu.significant  # 0 vs 0: floored at budget / 1000, no division
