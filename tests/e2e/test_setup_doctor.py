"""`tf2cntk setup` and `tf2cntk doctor` against the real environments, and their failure messages."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.paths import ROOT

CLI = str(Path(sys.executable).parent / "tf2cntk")


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})})


@pytest.mark.needs_cntk
def test_setup_is_idempotent_and_proves_cntk() -> None:
    done = run("setup")
    assert done.returncode == 0, done.stderr
    assert "already set up" in done.stdout and "2.7" in done.stdout
    assert str(ROOT / ".venv-cntk") in done.stdout


def test_setup_names_a_bad_base_python(tmp_path: Path) -> None:
    done = run("setup", "--env-dir", str(tmp_path / "env"), "--python", "/nonexistent/python3.6")
    assert done.returncode == 2
    assert "--python /nonexistent/python3.6 is not a working CPython 3.6" in done.stderr
    assert "fix: pass the path of a python3.6 executable" in done.stderr


def test_setup_without_any_python36_says_how_to_get_one(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "PYENV_ROOT": str(tmp_path / "nopyenv"), "HOME": str(tmp_path),
           "TF2CNTK_PYTHON36": "", "CONDA_PREFIX": ""}
    done = run("setup", "--env-dir", str(tmp_path / "env"), env=env)
    assert done.returncode == 2
    assert "No CPython 3.6 found" in done.stderr and "pyenv install 3.6.15" in done.stderr
    assert not (tmp_path / "env").exists()  # nothing half-made


@pytest.mark.needs_cntk
def test_doctor_shows_both_sides() -> None:
    done = run("doctor")
    assert done.returncode == 0, done.stdout + done.stderr
    for needle in ("host", "tensorflow", "tf2onnx", "onnxruntime", "cntk", "2.7", "OpenMPI compat",
                   "CNTK devices", "TF devices", "all good"):
        assert needle in done.stdout, needle


def test_doctor_fails_with_the_fix_for_a_wrong_interpreter(tmp_path: Path) -> None:
    done = run("doctor", "--cntk-python", str(tmp_path / "python"))
    assert done.returncode == 1
    assert "does not exist" in done.stdout and "tf2cntk setup" in done.stdout
