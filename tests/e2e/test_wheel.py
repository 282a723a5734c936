"""The package as a user gets it: `make dist`, the wheel installed in a fresh venv outside the
checkout, `tf2cntk setup` into its per-user place, then pytest on a model in an unrelated folder."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

from tests.support.paths import FIXTURES, ROOT

NAME = "pytest_tf2cntk-0.1.0"


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    # -o: never (re)install the host venv from a test; PY: the interpreter running this test.
    done = subprocess.run(["make", "-o", ".venv/.tf2cntk-installed", "dist", f"DIST={out}",
                           f"PY={sys.executable}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return out


def package_files() -> set[str]:
    """What the package is made of: every tracked file under pytest_tf2cntk/."""
    listed = subprocess.run(["git", "ls-files", "pytest_tf2cntk"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.split()
    assert "pytest_tf2cntk/cntk/worker/server.py" in listed  # git answered for the checkout
    return set(listed)


def test_dist_ships_every_package_file(dist: Path) -> None:
    wheel = zipfile.ZipFile(dist / f"{NAME}-py3-none-any.whl")
    names = set(wheel.namelist())
    assert {n for n in names if n.startswith("pytest_tf2cntk/")} == package_files()
    entry_points = wheel.read(f"{NAME}.dist-info/entry_points.txt").decode()
    assert "tf2cntk = pytest_tf2cntk.plugin" in entry_points  # pytest finds the plugin
    assert "tf2cntk = pytest_tf2cntk.cli:main" in entry_points
    with tarfile.open(dist / f"{NAME}.tar.gz") as sdist:
        shipped = {n.removeprefix(f"{NAME}/") for n in sdist.getnames()}
    assert package_files() | {"pyproject.toml", "README.md"} <= shipped


def fresh_venv(where: Path, wheel: Path) -> Path:
    """A venv holding the wheel; the host lock's packages seen through a .pth, not reinstalled.

    A path in a .pth goes on sys.path without its own .pth files being run, so the host's editable
    finder for the checkout never loads: pytest_tf2cntk can only come from the wheel."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True, timeout=120)
    python = where / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "--disable-pip-version-check",
                    "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True, timeout=300)
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    host = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (site / "host-lock-packages.pth").write_text("".join(f"{p}\n" for p in host))
    return python


@pytest.mark.slow
@pytest.mark.needs_cntk
def test_wheel_in_a_fresh_venv_sets_up_and_checks_a_model(dist: Path, tmp_path: Path) -> None:
    python = fresh_venv(tmp_path / "venv", dist / f"{NAME}-py3-none-any.whl")
    bin_dir = python.parent
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONDONTWRITEBYTECODE", "PYTEST_ADDOPTS", "PYTEST_PLUGINS",
                        "TF2CNTK_CNTK_PYTHON", "VIRTUAL_ENV")}
    # The per-user CNTK venv goes under a temporary XDG cache; pip keeps the real cache (no download).
    pip_cache = os.environ.get("PIP_CACHE_DIR") or str(
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pip")
    env.update(XDG_CACHE_HOME=str(tmp_path / "cache"), PIP_CACHE_DIR=pip_cache,
               TF2CNTK_CACHE_DIR=str(tmp_path / "conversions"), PATH=f"{bin_dir}{os.pathsep}{env['PATH']}",
               TF_CPP_MIN_LOG_LEVEL="3")
    project = tmp_path / "project"  # no pyproject.toml, no conftest: nothing of the checkout
    project.mkdir()
    shutil.copy(FIXTURES / "mlp.keras", project)

    def run(*cmd: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=timeout)

    where = run(str(python), "-c", "import pytest_tf2cntk as p, pytest_tf2cntk.cntk.client as c; "
                                   "print(p.__file__); print(c.SERVER_SCRIPT)")
    assert where.returncode == 0, where.stderr
    package, server = map(Path, where.stdout.split())
    assert package.is_relative_to(tmp_path / "venv") and server.is_relative_to(tmp_path / "venv")
    worker_cache = server.parent / "__pycache__"
    assert not list(worker_cache.glob("*.cpython-36.pyc"))  # pip compiled for 3.11 only

    cntk_env = tmp_path / "cache" / "pytest-tf2cntk" / "venv-cntk"
    setup = run(str(bin_dir / "tf2cntk"), "setup")
    assert setup.returncode == 0, setup.stdout + setup.stderr
    assert f"CNTK environment ready at {cntk_env}" in setup.stdout, setup.stdout
    assert "lock-cntk.txt" in setup.stdout  # installed from the lock inside the wheel

    report = project / "report.json"
    test = run(str(python), "-m", "pytest", "--tf2cntk-model=mlp.keras", "--tf2cntk-devices=cpu",
               "--tf2cntk-max-examples=5", f"--tf2cntk-report={report}")
    assert test.returncode == 0, test.stdout + test.stderr
    assert f"rootdir: {project}" in test.stdout
    verdict = json.loads(report.read_text())
    assert verdict["passed"] and verdict["outcomes"].get("passed", 0) >= 1, verdict["outcomes"]
    # The worker ran from the wheel's copy: its Python 3.6 imported protocol.py from there.
    assert (worker_cache / "protocol.cpython-36.pyc").is_file()

    doctor = run(str(bin_dir / "tf2cntk"), "doctor")
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert "all good" in doctor.stdout
    assert str(python) in doctor.stdout and str(cntk_env / "bin" / "python") in doctor.stdout
