"""Faults end to end (real worker, fresh pytest processes): a broken check is one paragraph and
one row, never a traceback, never lost, never a pass, and the other models of the run still get
their verdicts. The broken check is forced: ``tests/support/faulty_worker`` misbehaves exactly
when a model with two inputs (a copy of two_io.keras) is evaluated."""
from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest

from tests.support.faulty_worker import faulty_worker
from tests.support.paths import FIXTURES

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.needs_cntk
NO_TRACEBACK = ("Traceback", "ExceptionGroup", "FlakyFailure", "INTERNALERROR")


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    # collected in name order: the broken model (two inputs) first, so the one after it must
    # still get its verdict from a new worker
    shutil.copy(FIXTURES / "two_io.keras", pytester.path / "dual.keras")
    shutil.copy(FIXTURES / "mlp.keras", pytester.path / "mlp.keras")
    return pytester


def run(project: pytest.Pytester, mode: str, *args: str) -> pytest.RunResult:
    worker = faulty_worker(project.path, mode)
    return project.runpytest_subprocess(
        "-p", "no:cacheprovider", "--tf2cntk-model=dual.keras", "--tf2cntk-model=mlp.keras",
        "--tf2cntk-devices=cpu", "--tf2cntk-max-examples=5", f"--tf2cntk-cntk-python={worker}",
        "--tf2cntk-report=report.json", "--tf2cntk-history=history.sqlite", *args)


def outcomes(project: pytest.Pytester) -> tuple[dict, dict[str, dict]]:
    report = json.loads((project.path / "report.json").read_text())
    return report, {r["model"]: r for r in report["results"]}


def unchecked(project: pytest.Pytester) -> list[tuple]:
    con = sqlite3.connect(str(project.path / "history.sqlite"))
    try:
        return con.execute("SELECT model, device, outcome, reason FROM unchecked").fetchall()
    finally:
        con.close()


def assert_one_paragraph(result: pytest.RunResult) -> None:
    text = result.stdout.str() + result.stderr.str()
    for bad in NO_TRACEBACK:
        assert bad not in text, text


@pytest.mark.parametrize("mode, error_type, words", [
    ("kill", "WorkerCrashed", "SIGKILL"),
    ("hang", "WorkerTimeout", "timeout"),
])
def test_a_crashed_or_hung_worker_is_an_error_row_and_the_next_model_passes(
        project: pytest.Pytester, mode: str, error_type: str, words: str) -> None:
    result = run(project, mode, "--tf2cntk-timeout=20", "-v")
    assert result.ret == 1
    result.stdout.fnmatch_lines(["*dual.keras::parity?cpu? FAILED*", "*mlp.keras::parity?cpu? PASSED*",
                                 f"*dual.keras*cpu*ERROR ({error_type})*"])
    assert_one_paragraph(result)
    report, by_model = outcomes(project)
    assert report["passed"] is False and report["outcomes"] == {"passed": 1, "failed": 0, "error": 1, "skipped": 0}
    assert by_model["dual.keras"]["outcome"] == "error" and by_model["dual.keras"]["passed"] is False
    assert by_model["dual.keras"]["error_type"] == error_type
    assert words.lower() in by_model["dual.keras"]["error"].lower()
    assert by_model["mlp.keras"]["outcome"] == "passed"
    ((model, device, outcome, reason),) = unchecked(project)
    assert (model, device, outcome) == ("dual.keras", "cpu", "error") and words.lower() in reason.lower()


@pytest.mark.parametrize("mode, error_type, words", [
    ("kill", "WorkerCrashed", "SIGKILL"),
    ("hang", "WorkerTimeout", "timeout"),
])
def test_under_xdist_a_crashed_or_hung_worker_is_an_error_row_and_the_other_model_passes(
        project: pytest.Pytester, mode: str, error_type: str, words: str) -> None:
    """Two xdist workers, each with its own CNTK worker: the broken one's check is an error row
    that reaches the controller's summary, JSON and history; the other model's verdict stands."""
    result = run(project, mode, "--tf2cntk-timeout=20", "-n", "2")
    assert result.ret == 1
    result.stdout.fnmatch_lines([f"*dual.keras*cpu*ERROR ({error_type})*"])
    assert_one_paragraph(result)
    report, by_model = outcomes(project)
    assert report["outcomes"] == {"passed": 1, "failed": 0, "error": 1, "skipped": 0}
    assert by_model["dual.keras"]["error_type"] == error_type
    assert words.lower() in by_model["dual.keras"]["error"].lower()
    assert by_model["mlp.keras"]["outcome"] == "passed"
    assert [r[:3] for r in unchecked(project)] == [("dual.keras", "cpu", "error")]


def test_an_xdist_worker_killed_mid_check_loses_nothing_it_finished(project: pytest.Pytester) -> None:
    """The CNTK worker kills the xdist worker that started it while the two-input model is checked: mlp's
    verdict (sent with its report) survives, it becomes an error row."""
    result = run(project, "kill-parent", "-n", "1")
    assert result.ret == 1
    report, by_model = outcomes(project)
    assert by_model["mlp.keras"]["outcome"] == "passed"
    assert by_model["dual.keras"]["outcome"] == "error" and by_model["dual.keras"]["error_type"] == "LostCheck"
    assert "ended before it reported" in by_model["dual.keras"]["error"]
    assert report["passed"] is False
    assert [r[:3] for r in unchecked(project)] == [("dual.keras", "cpu", "error")]


@pytest.mark.parametrize("mode, words", [("kill", "SIGKILL"), ("hang", "timeout")])
def test_check_command_reports_a_crashed_or_hung_worker_in_one_paragraph(
        project: pytest.Pytester, mode: str, words: str) -> None:
    import subprocess
    import sys

    worker = faulty_worker(project.path, mode)
    cli = str(Path(sys.executable).parent / "tf2cntk")
    done = subprocess.run([cli, "check", "dual.keras", "--devices", "cpu", "--timeout", "20",
                           "--max-examples", "5", "--cntk-python", worker.name],  # relative: the user's file
                          cwd=project.path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 4, done.stderr
    assert "tf2cntk check: error: The CNTK worker" in done.stderr, done.stderr
    assert words.lower() in done.stderr.lower(), done.stderr
    for bad in NO_TRACEBACK:
        assert bad not in done.stdout + done.stderr
