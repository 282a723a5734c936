"""`tf2cntk report | runs | tag`: the run history from the shell."""
from __future__ import annotations

import argparse
from pathlib import Path

from pytest_tf2cntk.options import (HISTORY, REPORT, add_arguments, find_rootdir, from_args, history_path,
                                    read_pyproject, tool_table)


def _history(args: argparse.Namespace) -> tuple[Path, dict]:
    """The history file and the other values: arguments over [tool.tf2cntk] over the defaults."""
    root = find_rootdir()
    values = from_args(args, HISTORY, REPORT, tool=tool_table(read_pyproject(root)))
    return history_path(root, values["history"]), values


def cmd_report(args: argparse.Namespace) -> int:
    from pytest_tf2cntk.errors import HistoryError
    from pytest_tf2cntk.history.report import build_report, render_csv, render_html, render_markdown

    path, values = _history(args)
    fmt = args.format or (Path(args.output).suffix.lstrip(".").lower() if args.output else "md")
    fmt = {"markdown": "md", "htm": "html"}.get(fmt, fmt)
    if fmt not in ("md", "html", "csv"):
        raise HistoryError(f"unknown report format {fmt!r}", "use --format md, html or csv")
    if args.model:
        _check_model_filter(path, args.model)
    rep = build_report(path, since=args.since, model=args.model, baseline=values["baseline"],
                       factor=values["factor"], window=values["window"])
    text = {"md": render_markdown, "html": render_html}[fmt](rep) if fmt != "csv" else render_csv(rep, args.all)
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, "utf-8")
        print(f"tf2cntk report: {fmt} report of {len(rep.current)} outputs over "
              f"{rep.history['run_id'].nunique()} runs written to {out} ({len(rep.drifted)} drifted)")
    else:
        print(text, end="")
    return 0


def _check_model_filter(path: Path, text: str) -> None:
    """--model that matches no recorded model is a typo, not an empty report."""
    import difflib

    from pytest_tf2cntk.errors import HistoryError
    from pytest_tf2cntk.history.store import recorded_models

    models = recorded_models(path)
    if any(text.lower() in m.lower() for m in models):
        return
    close = difflib.get_close_matches(text, models, n=1, cutoff=0.4)
    known = ", ".join(models[:10]) + (f" and {len(models) - 10} more" if len(models) > 10 else "")
    raise HistoryError(f"--model {text!r} matches no model in {path}"
                       + (f"; did you mean {close[0]!r}?" if close else ".")
                       + (f" The history has: {known}." if models else " The history has no models yet."),
                       "pass a part of one of these paths, or leave --model out for every model")


def cmd_tag(args: argparse.Namespace) -> int:
    from pytest_tf2cntk.history.store import tag_run

    path, _ = _history(args)
    old = tag_run(path, args.run_id, args.name, force=args.force)
    moved = f" (moved from run {old})" if old is not None and old != args.run_id else ""
    print(f"tagged run {args.run_id} as '{args.name.strip()}'{moved} in {path}")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from pytest_tf2cntk.history.store import list_runs
    from pytest_tf2cntk.tables import text_table

    path, _ = _history(args)
    rows = list_runs(path, args.limit)
    if not rows:
        print(f"no runs recorded in {path}")
        return 0
    table = [("run", "time (UTC)", "commit", "outputs", "failed", "tags")]
    table += [(str(r["run_id"]), str(r["time"])[:19], (r["git_commit"] or "-")[:10], str(r["outputs"]),
               str(r["failed"]), r["tags"] or "") for r in rows]
    for line in text_table(table):
        print(line)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="tables and plots of the parity history: headroom, drift, worst movers")
    add_arguments(p, HISTORY)
    p.add_argument("--format", choices=("md", "html", "csv"), default=None,
                   help="default: from the -o suffix, else md")
    p.add_argument("--since", default=None, metavar="DATE|RUN_ID", help="only runs from this date or run id on")
    p.add_argument("--model", default=None, metavar="SUBSTR", help="only models whose path contains this")
    add_arguments(p, REPORT)
    p.add_argument("--all", action="store_true", help="csv: every run's rows, not just the current table")
    p.add_argument("-o", "--output", default=None, metavar="FILE", help="write here (default: stdout)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("tag", help="name a recorded run (e.g. a release) to use it as a drift baseline")
    p.add_argument("run_id", type=int, metavar="RUN_ID")
    p.add_argument("name", metavar="NAME", help="tag name (an existing tag moves only with --force)")
    p.add_argument("--force", action="store_true", help="move the tag if it already names another run")
    add_arguments(p, "history")
    p.set_defaults(func=cmd_tag)

    p = sub.add_parser("runs", help="list the runs recorded in the history, newest first")
    p.add_argument("-n", "--limit", type=int, default=20, help="how many (default %(default)s; 0: all)")
    add_arguments(p, "history")
    p.set_defaults(func=cmd_runs)
