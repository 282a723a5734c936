"""The ``tf2cntk`` command: one registry of subcommands, each in the module of its family.

A command module imports only the standard library and the option table at import time; what a
command needs (TensorFlow, onnx, the worker) it imports when it runs. A family that cannot be
imported at all is still listed and answers with the reason (after Polygraphy's
``try_register_tool``), so ``tf2cntk doctor`` and ``tf2cntk setup`` work when onnx or
TensorFlow are broken, the very case they exist for.

Exit status: 0 success; 1 a check failed or ``doctor`` found a problem; 2 bad input or a
problem named with its fix (one paragraph, no traceback); 3 an internal error (a bug: the
message says how to report it); 130 interrupted.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Callable

EXIT_OK, EXIT_PROBLEM, EXIT_USAGE, EXIT_INTERNAL, EXIT_NO_VERDICT, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130
# command family -> its commands, in the order --help lists them
FAMILIES: dict[str, tuple[str, ...]] = {
    "environment": ("setup", "doctor"),
    "model": ("convert", "check", "replay", "localize", "calibrate"),
    "history": ("report", "runs", "tag"),
}


def _err(msg: str) -> None:
    from pytest_tf2cntk.options import cli_text

    print(cli_text(msg), file=sys.stderr, flush=True)  # a core message names pytest's flags: ours here


def _missing(family: str, exc: BaseException) -> Callable[[argparse._SubParsersAction], None]:
    """Commands whose module cannot be imported: listed, and they answer with the reason."""
    def register(sub: argparse._SubParsersAction) -> None:
        for name in FAMILIES[family]:
            p = sub.add_parser(name, help=f"(unavailable: {type(exc).__name__}: {exc})")
            p.set_defaults(func=lambda _args, e=exc: _unavailable(e))
    return register


def _unavailable(exc: BaseException) -> int:
    from pytest_tf2cntk.errors import Tf2CntkError

    raise Tf2CntkError(f"this command cannot run here: {type(exc).__name__}: {exc}",
                       hint="`tf2cntk doctor` shows what is missing; reinstall the package with its "
                            "dependencies (`pip install .` in its checkout, or `pip install` its wheel)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tf2cntk", description="TensorFlow -> ONNX -> CNTK parity tools",
                                     epilog="exit status: 0 ok, 1 a check failed or doctor found a problem, "
                                            "2 bad input (one paragraph with the fix), 3 internal error, "
                                            "4 no verdict: the CNTK worker crashed or hung")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for family in FAMILIES:
        try:
            register = importlib.import_module(f"{__name__}.{family}").register
        except Exception as exc:  # a broken family must not take the others down
            register = _missing(family, exc)
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pytest_tf2cntk.errors import Tf2CntkError

    from pytest_tf2cntk.errors import WorkerError

    try:
        return int(args.func(args) or 0)
    except WorkerError as exc:  # not the input's fault: the check could not reach a verdict
        _err(f"tf2cntk {args.command}: error: {exc}")
        return EXIT_NO_VERDICT
    except Tf2CntkError as exc:
        _err(f"tf2cntk {args.command}: error: {exc}")
        return EXIT_USAGE
    except ValueError as exc:  # an option's validator, e.g. a wrong value in [tool.tf2cntk]
        _err(f"tf2cntk {args.command}: error: {exc}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        _err("interrupted")
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug of ours: one paragraph, the traceback only on request
        if os.environ.get("TF2CNTK_DEBUG"):
            raise
        _err(f"tf2cntk {args.command}: internal error: {type(exc).__name__}: {exc}\n"
             "  this is a bug in pytest-tf2cntk: rerun with TF2CNTK_DEBUG=1 for the traceback and report it "
             "with the output of `tf2cntk doctor`")
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
