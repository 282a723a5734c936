"""Error metrics between a reference tensor and a candidate."""
from __future__ import annotations

import numpy as np
import pytest

from pytest_tf2cntk.parity.metrics import compare, fraction_over, scaled_error, ulp_distance


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


def test_fast_scaled_error_is_compare_max_abs_over_rms() -> None:
    rng = np.random.default_rng(3)
    ref = rng.normal(size=(4, 50)).astype(np.float32)
    got = (ref + rng.normal(scale=1e-5, size=ref.shape)).astype(np.float32)
    m = compare(ref, got)
    assert scaled_error(ref, got) == pytest.approx(m.max_abs / m.ref_scale, rel=1e-12) == pytest.approx(m.scaled_error)
    ref[0, 0] = got[0, 0] = np.nan  # agreeing NaNs are fine, disagreeing ones are infinitely wrong
    assert np.isfinite(scaled_error(ref, got))
    got[0, 1] = np.inf
    assert scaled_error(ref, got) == float("inf") and compare(ref, got).nan_mismatch == 1  # one rule, two forms
    assert scaled_error(ref, got[:, :10]) == float("inf") == compare(ref, got[:, :10]).scaled_error
