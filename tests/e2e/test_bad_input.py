"""Bad configuration and bad files, end to end (#12 items 14-17): one case per input, each in a
fresh process (the tf2cntk command, or pytest through pytester), each asserting the exit code, the
one paragraph that names the problem and the way out, and that no traceback is shown.

Most cases fail before any conversion; those that need the converted model use mlp.keras, whose
conversion the session's cache ($TF2CNTK_CACHE_DIR, tests/conftest.py) shares."""
from __future__ import annotations

import os
import shutil
import sqlite3
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from tests.e2e.test_cli import run
from tests.support.paths import FIXTURES

pytest_plugins = ["pytester"]
MLP = str(FIXTURES / "mlp.keras")


def _no_traceback(text: str) -> None:
    assert "Traceback" not in text and "INTERNALERROR" not in text, text


# ---------------------------------------------------------------------------------------------
# the tf2cntk command: exit 2, its own flags


def _truncated_npz(tmp: Path) -> str:
    path = tmp / "trunc.npz"
    np.savez(path, meta=np.frombuffer(b'{"format": 2}', np.uint8), x=np.zeros(1000, np.float32))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert not zipfile.is_zipfile(path)
    return str(path)


def _not_executable(tmp: Path) -> str:
    path = tmp / "python"
    path.write_text("not a program")
    return str(path)


def _fifo(tmp: Path) -> str:
    path = tmp / "pipe.keras"
    os.mkfifo(path)
    return str(path)


def _with_lambda(tmp: Path) -> str:
    from tests.support.small_models import built_apart

    return str(built_apart("with_lambda", tmp / "lambda.keras"))


def _pyproject(text: str) -> Callable[[Path], str]:
    def write(tmp: Path) -> str:
        (tmp / "pyproject.toml").write_text(text)
        shutil.copy(FIXTURES / "mlp.keras", tmp / "mlp.keras")
        return "mlp.keras"
    return write


def _ignored_above(tmp: Path) -> str:
    """[tool.tf2cntk] one level above the rootdir (its pytest.ini makes proj the rootdir): not read."""
    (tmp / "pyproject.toml").write_text("[tool.tf2cntk]\nbatch = 4\n")
    (tmp / "proj").mkdir()
    (tmp / "proj" / "pytest.ini").write_text("[pytest]\n")
    return "nope.keras"


# (id, argv with {} for what the setup returns, setup, cwd is the project?, expected texts, refused texts)
CLI_CASES = [
    ("max-examples-0", ["check", MLP, "--max-examples", "0"], None, ["--max-examples: must be >= 1 (got 0)"], []),
    ("device-tpu", ["check", MLP, "--device", "tpu"], None, ["unknown device 'tpu'", "use cpu, gpu or gpu:N"],
     ["converting"]),  # refused before the (slow) conversion
    ("devices-comma", ["check", MLP, "--devices", ","], None, ["no device given", "e.g. cpu"], []),
    ("timeout-0", ["check", MLP, "--timeout", "0"], None, ["--timeout: must be > 0"], []),
    ("budget-scale-text", ["check", MLP, "--budget-scale", "abc"], None, ["--budget-scale: must be a number"], []),
    ("output-missing-dir", ["convert", MLP, "--no-load", "-o", "/missing-dir/x.onnx"], None,
     ["/missing-dir/x.onnx does not exist", "fix: create it first (mkdir -p /missing-dir)"], ["converting"]),
    ("replay-empty", ["replay", "{}"], lambda t: str((t / "empty.npz").touch() or t / "empty.npz"),
     ["is not a tf2cntk reproducer: the file is empty", "fix: reproducers are the .npz files"], ["allow_pickle"]),
    ("replay-truncated", ["replay", "{}"], _truncated_npz,
     ["not an .npz (zip) archive, or it is truncated", "run the failing test again"], ["allow_pickle"]),
    ("model-fifo", ["convert", "{}", "--no-load"], _fifo, ["is not a regular file or directory (a FIFO",
                                                           "fix: point at a SavedModel directory"], []),
    ("input-shape-hint-own-flag", ["convert", MLP, "--no-load", "--input-shape", "nope:4"], None,
     ["names an input", "--input-shape"], ["--tf2cntk-"]),
    ("batch-hint-own-flag", ["convert", str(FIXTURES / "lstm.keras"), "--batch", "2", "--no-load", "--repairs", "off"],
     None, ["CNTK's RNN importer assumes batch 1", "hint: test this model at --batch 1"], ["--tf2cntk-"]),
    ("unsafe-load-hint-own-flag", ["convert", "{}", "--no-load"], _with_lambda,
     ["Lambda", "pass --unsafe-load"], ["--tf2cntk-"]),
    ("budget-op-misspelled", ["check", "{}", "--devices", "cpu"], _pyproject("[tool.tf2cntk.budgets]\nGemmm = 4\n"),
     ["[tool.tf2cntk.budgets] Gemmm: 'Gemmm' is no ONNX op type", "fix: did you mean Gemm?"], []),
    ("input-misspelled", ["check", "{}", "--devices", "cpu"], _pyproject("[tool.tf2cntk.inputs]\nxx = [0.0, 1.0]\n"),
     ["[tool.tf2cntk.inputs] xx: this model has no input 'xx'", "fix: did you mean x? its inputs: x"], []),
    ("pyproject-not-rootdir", ["convert", "{}", "--no-load"], _ignored_above,
     ["has a [tool.tf2cntk] table that is ignored", "only from the pyproject.toml of the rootdir",
      "Move the table into"], []),
]


DOCTOR_CASES = [  # doctor reports a wrong interpreter as a problem it found: exit 1, the fix on stdout
    ("cntk-python-relative", ["doctor", "--cntk-python", "./no-such-python"], None,
     ["{tmp}/no-such-python given by --cntk-python does not exist", "fix: point it at the python"],
     ["--tf2cntk-"]),  # resolved against the current directory, not looked up on $PATH
    ("cntk-python-not-executable", ["doctor", "--cntk-python", "{}"], _not_executable,
     ["given by --cntk-python is not an executable file", "fix: point it at the python"], ["internal error"]),
]


@pytest.mark.parametrize("argv, setup, says, never", [c[1:] for c in CLI_CASES + DOCTOR_CASES],
                         ids=[c[0] for c in CLI_CASES + DOCTOR_CASES])
def test_the_command_refuses_bad_input_in_one_paragraph(tmp_path: Path, argv: list[str], setup: Callable | None,
                                                        says: list[str], never: list[str]) -> None:
    made = setup(tmp_path) if setup else ""
    cwd = tmp_path / "proj" if (tmp_path / "proj").is_dir() else tmp_path
    done = run(*[a.replace("{}", made) for a in argv], cwd=cwd)
    out = done.stdout + done.stderr
    assert done.returncode == (1 if argv[0] == "doctor" else 2), out
    for text in says:
        assert text.replace("{tmp}", str(tmp_path)) in out, (text, out)
    for text in never:
        assert text not in out, (text, out)
    _no_traceback(out)


# ---------------------------------------------------------------------------------------------
# the plugin: a usage error (exit 4) before the run, or a failed item / test in one paragraph

QUIET = ("-p", "no:cacheprovider", "--tf2cntk-devices=cpu", "--tf2cntk-max-examples=3")
MARKED = '''
import pytest

@pytest.mark.tf2cntk(model="mlp.keras", {kwargs})
def test_marked(tf2cntk_model):
    tf2cntk_model.check("cpu", max_examples=2)
'''

PLUGIN_CASES = [  # id, pyproject.toml, test file, arguments, exit code, expected texts
    ("budget-text-pyproject", "[tool.tf2cntk.budgets]\nGemm = 'abc'\n", None, (), 4,
     ["[tool.tf2cntk.budgets] Gemm = 'abc': a budget is a finite number >= 0", "without quotes"]),
    ("budget-negative-op", "[tool.tf2cntk.budgets]\nGemm = -1\n", None, (), 4,
     ["[tool.tf2cntk.budgets] Gemm = -1: a budget is a finite number >= 0"]),
    ("budget-negative-output", "[tool.tf2cntk.budgets.outputs]\nprobs = -1e-5\n", None, (), 4,
     ["[tool.tf2cntk.budgets.outputs] probs = -1e-05: a budget is a finite number >= 0"]),
    ("inputs-low-above-high", "[tool.tf2cntk.inputs]\nx = [1.0, 0.0]\n", None, (), 4,
     ["[tool.tf2cntk.inputs] x = [1.0, 0.0]: an input range needs finite low < high", "give [0, 1]"]),
    ("inputs-scalar", "[tool.tf2cntk.inputs]\nx = 0.5\n", None, (), 4,
     ["[tool.tf2cntk.inputs] x = 0.5: an input range is two numbers [low, high]"]),
    ("marker-budget-text", None, MARKED.format(kwargs='budgets={"Gemm": "abc"}'), (), 1,
     ["@pytest.mark.tf2cntk(budgets=...) Gemm = 'abc': a budget is a finite number >= 0"]),
    ("marker-inputs-low-above-high", None, MARKED.format(kwargs='inputs={"x": (1.0, 0.0)}'), (), 1,
     ["@pytest.mark.tf2cntk(inputs=...) x = (1.0, 0.0): an input range needs finite low < high"]),
    ("marker-inputs-scalar", None, MARKED.format(kwargs='inputs={"x": 0.5}'), (), 1,
     ["@pytest.mark.tf2cntk(inputs=...) x = 0.5: an input range is two numbers"]),
    ("history-under-a-file", None, None, ("--tf2cntk-history=mlp.keras/h.sqlite",), 4,
     ["mlp.keras/h.sqlite cannot be created", "fix: point --tf2cntk-history at a file"]),
    ("history-under-proc", None, None, ("--tf2cntk-history=/proc/h.sqlite",), 4,
     ["history file /proc/h.sqlite cannot be created", "--tf2cntk-no-history"]),
    ("report-a-directory", None, None, ("--tf2cntk-report=.",), 4,
     ["--tf2cntk-report: . is a directory, and the report is a file: give a file path"]),
    ("devices-comma", None, None, ("--tf2cntk-devices=,",), 4, ["--tf2cntk-devices: no device given"]),
    ("timeout-0", None, None, ("--tf2cntk-timeout=0",), 4, ["--tf2cntk-timeout: must be > 0 (got 0)"]),
    ("budget-scale-text", None, None, ("--tf2cntk-budget-scale=abc",), 4, ["--tf2cntk-budget-scale: must be a number"]),
]


@pytest.mark.parametrize("pyproject, testfile, args, code, says", [c[1:] for c in PLUGIN_CASES],
                         ids=[c[0] for c in PLUGIN_CASES])
def test_the_plugin_refuses_bad_configuration_in_one_paragraph(pytester: pytest.Pytester, pyproject: str | None,
                                                              testfile: str | None, args: tuple[str, ...],
                                                              code: int, says: list[str]) -> None:
    shutil.copy(FIXTURES / "mlp.keras", pytester.path / "mlp.keras")
    if pyproject:
        pytester.makepyprojecttoml(pyproject)
    if testfile:
        pytester.makepyfile(test_marked=testfile)
    model = () if testfile else ("--tf2cntk-model=mlp.keras",)
    result = pytester.runpytest_subprocess(*model, *QUIET, *args)
    out = result.stdout.str() + result.stderr.str()
    assert result.ret == code, out
    for text in says:
        assert text in out, (text, out)
    assert "corrupt" not in out and "mv '" not in out, out  # a history that cannot be made is no broken file
    _no_traceback(out)


def test_tool_table_outside_the_rootdir_is_named_as_ignored(pytester: pytest.Pytester,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    (pytester.path / "pytest.ini").write_text("[pytest]\n")
    sub = pytester.mkdir("sub")
    (sub / "pyproject.toml").write_text("[tool.tf2cntk.budgets]\nGemm = 4\n")
    (sub / "test_plain.py").write_text("def test_plain():\n    pass\n")
    monkeypatch.chdir(sub)  # pytest.ini above makes the parent the rootdir
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    out = result.stdout.str()
    assert result.ret == 0, out
    assert f"{sub / 'pyproject.toml'} has a [tool.tf2cntk] table that is ignored" in out, out
    assert f"Move the table into {pytester.path / 'pyproject.toml'}" in out
    _no_traceback(out)


@pytest.mark.needs_cntk
@pytest.mark.parametrize("pyproject, says", [
    ("[tool.tf2cntk.budgets]\nGemmm = 4\n", "[tool.tf2cntk.budgets] Gemmm: 'Gemmm' is no ONNX op type"),
    ("[tool.tf2cntk.inputs]\nxx = [0.0, 1.0]\n", "[tool.tf2cntk.inputs] xx: this model has no input 'xx'"),
    ('[tool.tf2cntk.budgets.models."mlp.keras"]\nConv = 4\n',
     '[tool.tf2cntk.budgets.models."mlp.keras"] Conv: this model has no Conv op'),
], ids=["op-misspelled", "input-misspelled", "scoped-op-absent"])
def test_a_name_the_converted_model_lacks_fails_its_parity_item(pytester: pytest.Pytester, pyproject: str,
                                                                says: str) -> None:
    shutil.copy(FIXTURES / "mlp.keras", pytester.path / "mlp.keras")
    pytester.makepyprojecttoml(pyproject)
    result = pytester.runpytest_subprocess("--tf2cntk-model=mlp.keras", *QUIET)
    out = result.stdout.str()
    assert result.ret == 1, out
    result.assert_outcomes(passed=1, failed=1)  # convert passes; parity[cpu] fails with the paragraph
    assert says in out, out
    assert "fix: did you mean" in out or "fix: correct the name; its ops: Gemm, Relu, Softmax" in out
    _no_traceback(out)


@pytest.mark.needs_cntk
def test_a_report_that_cannot_be_written_at_the_end_keeps_the_history_row(pytester: pytest.Pytester) -> None:
    """The report path becomes a directory during the run: the row is still recorded, no .tmp."""
    shutil.copy(FIXTURES / "mlp.keras", pytester.path / "mlp.keras")
    pytester.makepyfile(test_late="import os\n\ndef test_makes_the_report_a_directory():\n"
                                  "    os.mkdir('report.json')\n")
    result = pytester.runpytest_subprocess("--tf2cntk-model=mlp.keras", "--tf2cntk-report=report.json", *QUIET)
    out = result.stdout.str()
    assert result.ret == 0, out
    assert "tf2cntk: JSON report not written to report.json" in out and "--tf2cntk-report a file path" in out
    assert not list(pytester.path.glob("*.tmp")), list(pytester.path.iterdir())
    with sqlite3.connect(pytester.path / ".tf2cntk" / "history.sqlite") as con:
        assert con.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 1
    _no_traceback(out)
