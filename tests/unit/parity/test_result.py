"""The verdict of one output: reasons, headroom, stage attribution."""
from __future__ import annotations

import numpy as np

from pytest_tf2cntk.parity import budgets as B
from pytest_tf2cntk.parity.metrics import compare


def test_stage_attribution_covers_every_combination() -> None:
    from pytest_tf2cntk.parity.result import STAGE_BOTH, STAGE_CNTK, STAGE_COMBINED, STAGE_CONVERTER, OutputCheck

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
