"""`tf2cntk convert | check | replay | localize | calibrate`: one model from the shell.

Options come from the option table (``--batch``, ``--max-examples``, ...), defaults from
``[tool.tf2cntk]`` of the project's pyproject.toml, then the table; a command imports
TensorFlow, onnx and the worker only when it runs.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pytest_tf2cntk.options import (CALIBRATE, CNTK, CONVERSION, PARITY, add_arguments, cli_text, find_rootdir,
                                    from_args, given, ignored_note, ignored_pyprojects, output_file, parse_devices,
                                    project_tables, read_pyproject, tool_table)


def _say(msg: str) -> None:
    print(f"tf2cntk: {cli_text(msg)}", file=sys.stderr, flush=True)


def _show(text: Any) -> None:
    """A result or report on stdout, its hints naming this command's flags."""
    print(cli_text(str(text)))


def _project() -> dict[str, Any]:
    """``[tool.tf2cntk]`` of the project around the current directory, validated; a table in
    another pyproject.toml on the way up is ignored, and said to be."""
    rootdir = find_rootdir()
    for path in ignored_pyprojects(Path.cwd(), rootdir):
        _say(f"note: {ignored_note(path, rootdir)}")
    return tool_table(read_pyproject(rootdir))


def _writable(path: str | None, what: str, example: str) -> None:
    """An output file is checked before the (slow) work that fills it; its directory must exist."""
    if path is not None:
        output_file(path, what, example, makes_dirs=False)


def _conversion(args: argparse.Namespace, tool: dict[str, Any], base: Any = None) -> Any:
    """ConversionOptions: given options over ``base`` (a reproducer's) over [tool.tf2cntk]."""
    import dataclasses

    from pytest_tf2cntk.convert.options import ConversionOptions

    if base is None:
        return ConversionOptions(**from_args(args, CONVERSION, tool=tool))
    return dataclasses.replace(base, **given(args, CONVERSION))


def _project_relative(model: str) -> str:
    """The model's path from the project root, as pytest names it (and budgets_for looks it up)."""
    path = Path(model).resolve()
    try:
        return str(path.relative_to(find_rootdir().resolve()))
    except ValueError:
        return str(path)


def _convert(model: str, options: Any) -> Any:
    from pytest_tf2cntk.convert.pipeline import convert

    return convert(model, **options.__dict__, progress=_say)


def cmd_convert(args: argparse.Namespace) -> int:
    import shutil

    tool = _project()
    _writable(args.output, "-o/--output", "model.onnx")
    conv = _convert(args.model, _conversion(args, tool))
    _show(conv.report())
    if args.output:
        try:
            shutil.copyfile(conv.onnx_path, args.output)
        except OSError as exc:
            from pytest_tf2cntk.errors import ConfigError

            raise ConfigError(f"cannot write -o/--output {args.output}: {exc.strerror or exc}",
                              hint="write it to a directory you can write to") from None
        print(f"written   {args.output}")
    if not args.no_load:
        from pytest_tf2cntk.parity.runners import check_cntk_runs

        python = from_args(args, CNTK, tool=tool)["cntk_python"]
        loaded = check_cntk_runs(conv, "cpu", cntk_python=python)  # loads and runs it, as ::convert does
        print("cntk      loaded: inputs " + ", ".join(f"{i.name}{list(i.shape)}" for i in loaded.inputs)
              + "; outputs " + ", ".join(f"{o.name}{list(o.shape)}" for o in loaded.outputs))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Every device asked for; one that cannot be used is reported skipped, never passed."""
    from pytest_tf2cntk.errors import DeviceUnavailable
    from pytest_tf2cntk.parity.engine import run_check
    from pytest_tf2cntk.parity.options import ParityOptions

    from pytest_tf2cntk.validate import project_budgets

    tool = _project()
    values = from_args(args, PARITY, CNTK, tool=tool)  # every value checked before the conversion
    devices = parse_devices(values.pop("devices"), "--devices")
    values.pop("timeout")
    tables = project_tables(tool)
    conv = _convert(args.model, _conversion(args, tool))
    tables["budgets"] = project_budgets(tables, conv.onnx_model, _project_relative(args.model))  # as pytest
    options = ParityOptions.build(**values, **tables, cntk_onnx=args.cntk_onnx)
    ran, failed = 0, 0
    for device in devices:
        try:
            result = run_check(conv, device, options)
        except DeviceUnavailable as exc:
            _show(f"tf2cntk check: {device}: skipped: {exc.message}")
            continue
        ran += 1
        failed += not result.passed
        _show(result)
    if not ran:
        print(f"tf2cntk check: no device could run the check ({', '.join(devices)}): nothing was checked")
        return 1
    return 1 if failed else 0


def cmd_replay(args: argparse.Namespace) -> int:
    from pytest_tf2cntk.parity.replay import replay

    values = from_args(args, "cntk_python", "cache_dir", tool=_project())
    result = replay(args.file, cntk_python=values["cntk_python"], cache_dir=values["cache_dir"])
    _show(result)
    print("\nstill failing" if not result.passed else "\npasses now (fixed, or the failure needs its "
          "original environment: compare the versions stored in the file)")
    return 0 if result.passed else 1


def cmd_localize(args: argparse.Namespace) -> int:
    import tempfile

    import numpy as np

    from pytest_tf2cntk.parity.localize.scan import localize

    from pytest_tf2cntk.validate import project_budgets

    tool = _project()
    _writable(args.json, "--json", "result.json")
    rep = None
    if args.input:
        from pytest_tf2cntk.parity.reproducer import read_reproducer

        rep = read_reproducer(args.input)
    conv = _convert(args.model, _conversion(args, tool, rep.meta.conversion if rep else None))
    if rep is not None:
        feeds = dict(rep.inputs)
    else:
        from pytest_tf2cntk.convert.domains import derive_domains, random_feeds

        feeds = random_feeds(derive_domains(conv.onnx_model), np.random.default_rng(args.seed))
    device = args.device or (rep.meta.device if rep else "cpu")
    with tempfile.TemporaryDirectory(prefix="tf2cntk-localize-") as tmp:
        cntk_onnx = args.cntk_onnx
        if cntk_onnx is None and rep is not None:  # the graph CNTK saw when it failed
            if rep.cntk_onnx is not None:
                cntk_onnx = str(Path(tmp) / "cntk.onnx")
                Path(cntk_onnx).write_bytes(rep.cntk_onnx)
            elif Path(rep.meta.cntk_onnx_path).exists():
                cntk_onnx = rep.meta.cntk_onnx_path
        loc = localize(conv, feeds, cntk_onnx=cntk_onnx, device=device, confirm=not args.no_confirm,
                       time_budget_s=args.time_budget,
                       budgets=project_budgets(project_tables(tool), conv.onnx_model, _project_relative(args.model)),
                       cntk_python=from_args(args, CNTK, tool=tool)["cntk_python"])
    text = cli_text(str(loc))
    if args.limit != 10:
        text = text.replace(cli_text(loc.table()), cli_text(loc.table(args.limit)))
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(loc.to_json(), indent=1))
        print(f"report written to {args.json}")
    return 1 if loc.culprit is not None else 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from pytest_tf2cntk.parity.calibrate import calibrate
    tool = _project()
    _writable(args.json, "--json", "result.json")
    tables = project_tables(tool)
    values = from_args(args, CNTK, CALIBRATE, "edge_values", tool=tool)
    cal = calibrate(args.model, key=_project_relative(args.model), device=args.device,
                    conversion=_conversion(args, tool), seeds=values["seeds"],
                    examples=values["examples"], margin=values["margin"], cntk_python=values["cntk_python"],
                    budgets=tables["budgets"], inputs=tables["inputs"], edge_values=values["edge_values"],
                    progress=lambda m: _say(f"calibrate: {m}"))
    print(cli_text(cal.to_toml()), end="")  # its comments name the verdict flag: ours here
    if args.json:
        Path(args.json).write_text(json.dumps(cal.to_json(), indent=1), "utf-8")
    return 0 if cal.overrides else 1


def _at_least(low: float, kind: type, strict: bool = False) -> Any:
    def parse(text: str) -> Any:
        value = kind(text)
        if value < low or (strict and value <= low):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {low:g}")
        return value
    return parse


def _model_command(sub: argparse._SubParsersAction, name: str, help_: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_)
    p.add_argument("model", help="SavedModel directory, .keras or .h5 file")
    add_arguments(p, CONVERSION, CNTK)
    return p


def register(sub: argparse._SubParsersAction) -> None:
    p = _model_command(sub, "convert", "convert a model for CNTK and load it in the worker")
    p.add_argument("-o", "--output", help="also write the CNTK-ready ONNX here")
    p.add_argument("--no-load", action="store_true", help="skip loading and running the result in CNTK")
    p.set_defaults(func=cmd_convert)

    p = _model_command(sub, "check", "run a parity check outside pytest and print the verdict")
    add_arguments(p, PARITY)
    p.add_argument("--cntk-onnx", default=None, help="evaluate this ONNX file in CNTK instead")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("replay", help="re-run a reproducer .npz written by a parity failure")
    p.add_argument("file")
    add_arguments(p, "cntk_python", "cache_dir")
    p.set_defaults(func=cmd_replay)

    p = _model_command(sub, "localize", "name the first op whose own error in CNTK breaks its budget")
    p.add_argument("--input", default=None, help="a reproducer .npz written by a parity failure: its inputs, "
                                                 "options and embedded CNTK-bound graph are used")
    p.add_argument("--cntk-onnx", default=None, help="evaluate this ONNX file in CNTK instead")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs without --input (default 0)")
    p.add_argument("--device", default=None, help="cpu (default, or the reproducer's), gpu or gpu:N")
    p.add_argument("--time-budget", type=_at_least(0, float, strict=True), default=None,
                   help="stop after this many seconds")
    p.add_argument("--no-confirm", action="store_true", help="skip running the culprit alone")
    p.add_argument("--limit", type=_at_least(1, int), default=10, help="rows of the table (default %(default)s)")
    p.add_argument("--json", default=None, help="also write the full report (with the mapping) here")
    p.set_defaults(func=cmd_localize)

    p = _model_command(sub, "calibrate", "measure a model's error distribution and propose output budgets (TOML)")
    add_arguments(p, CALIBRATE, "edge_values")
    p.add_argument("--device", default="cpu", help="cpu (default), gpu or gpu:N")
    p.add_argument("--json", default=None, metavar="FILE", help="also write every statistic as JSON")
    p.set_defaults(func=cmd_calibrate)
