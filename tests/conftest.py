"""Shared fixtures: one conversion cache for the whole session (pytester subprocesses inherit it
through $TF2CNTK_CACHE_DIR), a planted-fault helper, and the ``needs_cntk`` gate: a test that
needs the CNTK worker fails under CI=true when the CNTK environment is missing (CI must have it)
and is skipped elsewhere, with the reason and the fix."""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Callable

# loaded before pytester snapshots sys.modules (and drops what a test imported): numpy's and
# protobuf's C extensions load once per process, a second import aborts the interpreter
import numpy  # noqa: F401
import onnx  # noqa: F401
import pytest



@functools.cache
def cntk_unavailable() -> str:
    """Why the CNTK worker cannot start here ("" when it can)."""
    from pytest_tf2cntk.cntk import env
    from pytest_tf2cntk.errors import Tf2CntkError

    try:
        python = env.resolve_cntk_python(None)
    except Tf2CntkError as exc:
        return str(exc)
    ok, desc = env.mpi_status(env.mpi_compat_dir_for(python))
    return "" if ok else f"OpenMPI compat: {desc} (fix: tf2cntk setup)"


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("needs_cntk") is None:
        return
    why = cntk_unavailable()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"CI must have the CNTK environment: {why}", pytrace=False)
        pytest.skip(f"no CNTK environment: {why}")


@pytest.fixture(scope="session", autouse=True)
def conversion_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("conversion-cache")
    old = os.environ.get("TF2CNTK_CACHE_DIR")
    os.environ["TF2CNTK_CACHE_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("TF2CNTK_CACHE_DIR", None)
    else:
        os.environ["TF2CNTK_CACHE_DIR"] = old


@pytest.fixture
def planted_fault(tmp_path: Path) -> Callable[[Path, float], Path]:
    """Write a copy of a converted ONNX file with one weight tensor scaled (a conversion bug)."""

    from tests.support.faults import scale_weight

    def make(onnx_path: Path, factor: float = 1.01) -> Path:
        model = onnx.load(str(onnx_path))
        scale_weight(model, factor)
        out = tmp_path / "mutated.onnx"
        onnx.save(model, str(out))
        return out
    return make

