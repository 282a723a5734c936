"""The run summary table and report formatting (pure: typed records in, text out)."""
from __future__ import annotations

import math

from pytest_tf2cntk.history.records import RunPayload
from pytest_tf2cntk.history.report import _fmt
from pytest_tf2cntk.plugin.summary import HEADER, summary_rows
from tests.support.synthetic import make_result


def test_the_summary_shows_the_batch_each_check_ran_at() -> None:
    (row,) = summary_rows(RunPayload(results=[make_result("m.keras", "cpu", {"y": 1e-7})]))
    assert len(row) == len(HEADER) and dict(zip(HEADER, row))["batch"] == "1"


def test_exact_agreement_reads_exact_not_infx() -> None:
    assert _fmt(math.inf, "headroom") == "exact" and _fmt(2.0, "headroom") == "2x" and _fmt(math.inf, "x") == "infx"
