"""`tf2cntk setup` and `tf2cntk doctor`: the two interpreters, made and checked.

Neither imports onnx or TensorFlow at import time, and doctor reports a host package that
cannot be imported as a row of its table, with the fix, instead of dying on it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from pytest_tf2cntk.options import CNTK, add_arguments, cli_text
from pytest_tf2cntk.tables import text_table
from pytest_tf2cntk.tf_import import tensorflow

HOST_PACKAGES = ("numpy", "tensorflow", "keras", "tf2onnx", "onnx", "onnxruntime", "hypothesis", "pandas")
_CNTK_SNIPPET = r"""
import json, sys, warnings
warnings.simplefilter('ignore')
info = {'python': sys.version.split()[0], 'executable': sys.executable}
try:
    import numpy; info['numpy'] = [numpy.__version__, numpy.__file__]
    import cntk; info['cntk'] = [cntk.__version__, cntk.__file__]
    info['devices'] = ['gpu:%d' % d.id() if d.type() == 1 else 'cpu' for d in cntk.device.all_devices()]
except Exception as exc:
    info['error'] = '%s: %s' % (type(exc).__name__, str(exc).splitlines()[0] if str(exc) else '')
print(json.dumps(info))
"""
Row = tuple[str, str, str, str]


def cmd_setup(args: argparse.Namespace) -> int:
    from pytest_tf2cntk.cntk import env

    started = time.perf_counter()
    result = env.setup(Path(args.env_dir) if args.env_dir else None, args.python, args.gpu, args.force,
                       log=lambda m: print(f"tf2cntk setup: {m}", flush=True))
    state = "already set up" if result.already_done else "ready"
    print(f"tf2cntk setup: CNTK environment {state} at {result.env_dir} "
          f"(cntk, numpy, python = {result.proof}; {time.perf_counter() - started:.1f} s)")
    print(f"  worker interpreter: {result.python}")
    return 0


def host_rows() -> list[Row]:
    """A row per host package: its version and place, or MISSING with the import error."""
    import importlib

    rows = [("host", "python", sys.version.split()[0], sys.executable)]
    for name in HOST_PACKAGES:
        try:
            mod = importlib.import_module(name)
            rows.append(("host", name, getattr(mod, "__version__", "?"), os.path.dirname(mod.__file__ or "")))
        except Exception as exc:  # a missing or broken package is a row, not a crash
            rows.append(("host", name, "MISSING", f"{type(exc).__name__}: {exc}"[:80]))
    return rows


def _tf_devices() -> list[Row]:
    try:
        tf = tensorflow()

        gpus = [d.name for d in tf.config.list_physical_devices("GPU")]
        return [("host", "TF devices", ", ".join(["cpu"] + gpus), "GPU: none visible" if not gpus else "")]
    except Exception:
        return []  # already a MISSING row above


def cntk_rows(python: Path, problems: list[str]) -> list[Row]:
    """The CNTK side: OpenMPI compat, its Python, numpy, cntk, devices (problems appended)."""
    from pytest_tf2cntk.cntk import env

    ok, desc = env.mpi_status(env.mpi_compat_dir_for(python))
    rows = [("cntk", "OpenMPI compat", "ok" if ok else "BROKEN", desc)]
    if not ok:
        problems.append(f"OpenMPI compat: {desc}\n  fix: {env.APT_FIX} && tf2cntk setup")
    done = subprocess.run([str(python), "-c", _CNTK_SNIPPET], capture_output=True, text=True,
                          env=env.worker_environ(python), timeout=120, check=False)
    try:
        info = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        info = {"error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
    rows.append(("cntk", "python", info.get("python", "?"), str(python)))
    rows += [("cntk", name, info[name][0], os.path.dirname(info[name][1])) for name in ("numpy", "cntk")
             if name in info]
    if "devices" in info:
        rows.append(("cntk", "CNTK devices", ", ".join(info["devices"]), ""))
    if "error" in info:
        rows.append(("cntk", "cntk", "BROKEN", info["error"][:100]))
        problems.append(f"CNTK does not import in {python}: {info['error']}\n  fix: tf2cntk setup")
    return rows


def cmd_doctor(args: argparse.Namespace) -> int:
    from pytest_tf2cntk.cntk import env
    from pytest_tf2cntk.errors import Tf2CntkError
    from pytest_tf2cntk.tf_import import tensorflow

    try:
        tensorflow()  # quietly: its start-up lines are not the doctor's findings
    except Exception:
        pass  # a broken TensorFlow is a MISSING row of host_rows, with the fix
    rows = host_rows()
    problems = [f"{r[1]} cannot be imported on the host ({r[3]}): pip install {r[1]}"
                for r in rows if r[2] == "MISSING"]
    rows += _tf_devices()
    try:
        rows += cntk_rows(env.resolve_cntk_python(args.cntk_python), problems)
    except Tf2CntkError as exc:
        problems.append(str(exc))
    for line in text_table([("side", "component", "version", "location")] + rows):
        print(line)
    if problems:
        print("\nproblems:")
        for p in problems:
            print(f"  - {cli_text(p)}")
        return 1
    print("\nall good")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("setup", help="create the CNTK (Python 3.6) environment")
    p.add_argument("--python", help="base CPython 3.6 (default: $TF2CNTK_PYTHON36, python3.6 on PATH, "
                                    "pyenv, conda)")
    p.add_argument("--env-dir", help="where to create the venv (default: .venv-cntk in a checkout, "
                                     "else ~/.cache/pytest-tf2cntk/venv-cntk)")
    p.add_argument("--gpu", action="store_true", help="install cntk-gpu instead of cntk")
    p.add_argument("--force", action="store_true", help="rebuild the environment from scratch")
    p.set_defaults(func=cmd_setup)

    p = sub.add_parser("doctor", help="show both environments and what is wrong (exit 1 with the fix)")
    add_arguments(p, CNTK, skip=("timeout",))
    p.set_defaults(func=cmd_doctor)
