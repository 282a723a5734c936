"""The `tf2cntk` command: setup, doctor, convert, replay, report, tag, calibrate, localize.

Every subcommand imports what it needs when it runs, so `tf2cntk setup` never waits for
TensorFlow. Errors of ours print as one paragraph (message, then the fix) with exit status 2;
`doctor` exits 1 when something is wrong.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

from pytest_tf2cntk.errors import Tf2CntkError

EXIT_OK, EXIT_PROBLEM, EXIT_USAGE = 0, 1, 2


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# setup / doctor


def cmd_setup(args: argparse.Namespace) -> int:
    import time

    from pytest_tf2cntk.cntk import env as cntk_env

    started = time.perf_counter()
    result = cntk_env.setup(Path(args.env_dir) if args.env_dir else None, args.python, args.gpu,
                            args.force, log=lambda m: print(f"tf2cntk setup: {m}", flush=True))
    state = "already set up" if result.already_done else "ready"
    print(f"tf2cntk setup: CNTK environment {state} at {result.env_dir} "
          f"(cntk, numpy, python = {result.proof}; {time.perf_counter() - started:.1f} s)")
    print(f"  worker interpreter: {result.python}")
    return EXIT_OK


_DOCTOR_CNTK_SNIPPET = r"""
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


def _host_rows() -> list[tuple[str, str, str, str]]:
    import importlib

    rows = [("host", "python", sys.version.split()[0], sys.executable)]
    for name in ("numpy", "tensorflow", "keras", "tf2onnx", "onnx", "onnxruntime", "hypothesis", "pandas"):
        try:
            mod = importlib.import_module(name)
            rows.append(("host", name, getattr(mod, "__version__", "?"), os.path.dirname(mod.__file__ or "")))
        except Exception as exc:  # a missing optional package is a row, not a crash
            rows.append(("host", name, "MISSING", f"{type(exc).__name__}: {exc}"[:80]))
    return rows


def cmd_doctor(args: argparse.Namespace) -> int:
    from pytest_tf2cntk.cntk import env as cntk_env

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    rows = _host_rows()
    problems: list[str] = [f"{r[1]} is missing on the host: pip install {r[1]}" for r in rows
                           if r[2] == "MISSING"]
    try:
        import tensorflow as tf

        gpus = [d.name for d in tf.config.list_physical_devices("GPU")]
        rows.append(("host", "TF devices", ", ".join(["cpu"] + gpus), "GPU: none visible" if not gpus else ""))
    except Exception:
        pass
    try:
        python = cntk_env.resolve_cntk_python(args.cntk_python)
    except Tf2CntkError as exc:
        python = None
        problems.append(str(exc))
    if python is not None:
        compat = cntk_env.mpi_compat_dir_for(python)
        ok, desc = cntk_env.mpi_status(compat)
        rows.append(("cntk", "OpenMPI compat", "ok" if ok else "BROKEN", desc))
        if not ok:
            problems.append(f"OpenMPI compat: {desc}\n  fix: {cntk_env.APT_FIX} && tf2cntk setup")
        done = subprocess.run([str(python), "-c", _DOCTOR_CNTK_SNIPPET], capture_output=True, text=True,
                              env=cntk_env.worker_environ(python), timeout=120, check=False)
        try:
            info = json.loads(done.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            info = {"error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
        rows.append(("cntk", "python", info.get("python", "?"), str(python)))
        for name in ("numpy", "cntk"):
            if name in info:
                rows.append(("cntk", name, info[name][0], os.path.dirname(info[name][1])))
        if "devices" in info:
            rows.append(("cntk", "CNTK devices", ", ".join(info["devices"]), ""))
        if "error" in info:
            rows.append(("cntk", "cntk", "BROKEN", info["error"][:100]))
            problems.append(f"CNTK does not import in {python}: {info['error']}\n  fix: tf2cntk setup")
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    print(f"{'side':<{widths[0]}}  {'component':<{widths[1]}}  {'version':<{widths[2]}}  location")
    for r in rows:
        print(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}")
    if problems:
        print("\nproblems:")
        for p in problems:
            print(f"  - {p}")
        return EXIT_PROBLEM
    print("\nall good")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# convert


def cmd_convert(args: argparse.Namespace) -> int:
    import shutil

    from pytest_tf2cntk.convert.pipeline import convert

    conv = convert(args.model, batch=args.batch, opset=args.opset, signature=args.signature,
                   unsafe_load=args.unsafe_load, cache_dir=args.cache_dir,
                   progress=lambda m: print(f"tf2cntk: {m}", file=sys.stderr, flush=True))
    print(conv.report())
    if args.output:
        shutil.copyfile(conv.onnx_path, args.output)
        print(f"written   {args.output}")
    if not args.no_load:
        from pytest_tf2cntk.cntk.client import get_worker

        loaded = get_worker(args.cntk_python).load(str(conv.onnx_path), device="cpu")
        print("cntk      loaded: inputs " + ", ".join(f"{i.name}{list(i.shape)}" for i in loaded.inputs)
              + "; outputs " + ", ".join(f"{o.name}{list(o.shape)}" for o in loaded.outputs))
    return EXIT_OK


def cmd_replay(args: argparse.Namespace) -> int:
    from pytest_tf2cntk.parity.reproducer import replay

    result = replay(args.file, cntk_python=args.cntk_python, cache_dir=args.cache_dir)
    print(result)
    print("\nstill failing" if not result.passed else "\npasses now (fixed, or the failure needs its "
          "original environment: compare the versions stored in the file)")
    return EXIT_OK if result.passed else EXIT_PROBLEM


def cmd_check(args: argparse.Namespace) -> int:
    from pytest_tf2cntk.parity.engine import check_parity

    for device in args.device or ["cpu"]:  # argparse's append would add to a list default
        result = check_parity(args.model, device, args.max_examples, batch=args.batch, opset=args.opset,
                              seed=args.seed, signature=args.signature, unsafe_load=args.unsafe_load,
                              cntk_python=args.cntk_python, cache_dir=args.cache_dir,
                              cntk_onnx=args.cntk_onnx, budget_scale=args.budget_scale)
        print(result)
        if not result.passed:
            return EXIT_PROBLEM
    return EXIT_OK


# ---------------------------------------------------------------------------------------------


def _add_conversion_args(p: argparse.ArgumentParser) -> None:
    from pytest_tf2cntk.convert.pipeline import DEFAULT_BATCH, DEFAULT_OPSET

    p.add_argument("model", help="SavedModel directory, .keras or .h5 file")
    p.add_argument("--batch", type=int, default=DEFAULT_BATCH, help="fixed batch size (default %(default)s)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset (default %(default)s)")
    p.add_argument("--signature", default=None, help="SavedModel signature (default serving_default)")
    p.add_argument("--unsafe-load", action="store_true", help="allow Keras Lambda layers (runs their code)")
    p.add_argument("--cache-dir", default=None, help="conversion cache (default $TF2CNTK_CACHE_DIR or "
                                                     "~/.cache/pytest-tf2cntk/conversions)")
    p.add_argument("--cntk-python", default=None, help="CNTK interpreter (default $TF2CNTK_CNTK_PYTHON "
                                                       "or the `tf2cntk setup` environment)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tf2cntk", description="TensorFlow -> ONNX -> CNTK parity tools")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("setup", help="create the CNTK (Python 3.6) environment")
    p.add_argument("--python", help="base CPython 3.6 (default: $TF2CNTK_PYTHON36, python3.6 on PATH, "
                                    "pyenv, conda)")
    p.add_argument("--env-dir", help="where to create the venv (default: .venv-cntk in a checkout, "
                                     "else ~/.cache/pytest-tf2cntk/venv-cntk)")
    p.add_argument("--gpu", action="store_true", help="install cntk-gpu instead of cntk")
    p.add_argument("--force", action="store_true", help="rebuild the environment from scratch")
    p.set_defaults(func=cmd_setup)

    p = sub.add_parser("doctor", help="show both environments and what is wrong")
    p.add_argument("--cntk-python", default=None)
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("convert", help="convert a model for CNTK and load it in the worker")
    _add_conversion_args(p)
    p.add_argument("-o", "--output", help="also write the CNTK-ready ONNX here")
    p.add_argument("--no-load", action="store_true", help="skip loading the result in CNTK")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("check", help="run a parity check outside pytest and print the verdict")
    _add_conversion_args(p)
    p.add_argument("--device", action="append", default=None, help="cpu (default), gpu or gpu:N; repeatable")
    p.add_argument("--max-examples", type=int, default=20)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--budget-scale", type=float, default=1.0)
    p.add_argument("--cntk-onnx", default=None, help="evaluate this ONNX file in CNTK instead")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("replay", help="re-run a reproducer .npz written by a parity failure")
    p.add_argument("file")
    p.add_argument("--cntk-python", default=None)
    p.add_argument("--cache-dir", default=None)
    p.set_defaults(func=cmd_replay)

    for register in _extra_commands():
        register(sub)
    return parser


def _extra_commands() -> list[Callable[[argparse._SubParsersAction], None]]:
    """Subcommands that live with their module (each imports its heavy parts when it runs)."""
    from pytest_tf2cntk.parity import calibrate
    from pytest_tf2cntk.history import store as history
    from pytest_tf2cntk.history import report as history_report
    from pytest_tf2cntk.parity.localize import scan as layerwise

    return [history.register_cli, history_report.register_cli, calibrate.register_cli,
            layerwise.register_cli]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except Tf2CntkError as exc:
        _err(f"tf2cntk {args.command}: error: {exc}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        _err("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
