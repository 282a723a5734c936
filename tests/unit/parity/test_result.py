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


def test_table_marks_an_onnx_runtime_noise_that_was_not_counted() -> None:
    """ORT32 far beyond what TF32 allows, with the converted graph not evaluated: it is shown but
    not counted, and the table says so (else "error < ORT32 noise" would read as a pass by it)."""
    from dataclasses import replace

    from pytest_tf2cntk.parity.truth import TruthCheck
    from tests.support.synthetic import U32, make_result

    result = make_result(errors={"y": 1e-5}, measured=("y",)).result
    counted = result.table()
    assert "*" not in counted
    lucky_tf32 = TruthCheck("float64 twin: test", 1e-6, 8e-6, U32, ort32=6e-5)  # 60x TF32, graph unknown
    result.outputs["y"] = replace(result.outputs["y"], truth=lucky_tf32)
    text = result.table()
    assert "6e-05*" in text and "* not counted as noise" in text
    assert result.outputs["y"].allowed == 10 * 1e-6  # the limit is TF32's alone
