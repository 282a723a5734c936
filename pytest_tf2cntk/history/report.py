"""`tf2cntk report`: the history as tables and plots (Markdown, HTML, CSV).

Sections: each output's current error against its budget (headroom), drift against a baseline
(drift.py's rule), the worst movers with the versions that changed since their baseline, per-op
headroom when layerwise rows exist, and skipped checks. "Current" is each output's newest row
within the ``--since``/``--model`` filters; baselines may be older than ``--since``.

HTML embeds PNG plots (base64, no files beside it): error over runs per output with its budget
line (log y), and headroom per op type. CSV is the current/drift table, or every row with
``--all``. pandas and matplotlib are imported when a report is built, not when this module is.
"""
from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_tf2cntk.history import store
from pytest_tf2cntk.history.drift import DEFAULT_FACTOR, DEFAULT_WINDOW, DriftJudge, error_floor
from pytest_tf2cntk.history.frame import load_history, load_layers, load_runs, load_unchecked
from pytest_tf2cntk.tables import markdown_table

KEY = ["model", "device", "output"]
MAX_PLOTS = 12  # error-over-runs panels: the most interesting outputs first
MOVERS = 10


# ---------------------------------------------------------------------------------------------
# building


@dataclass
class HistoryReport:
    path: Path
    baseline: str
    factor: float
    window: int
    history: Any  # load_history rows within the filters
    current: Any  # newest row per output, with drift columns
    layers: Any  # per model x device x op type (empty without layerwise rows)
    unchecked: Any  # checks of the newest run with no verdict (skipped or error)
    runs: Any
    plots: dict[str, str] = field(default_factory=dict)  # title -> base64 PNG (HTML only)

    @property
    def movers(self) -> Any:
        df = self.current[self.current["ratio"].notna()]
        return df.sort_values(["drift", "ratio"], ascending=False).head(MOVERS)

    @property
    def drifted(self) -> Any:
        return self.current[self.current["drift"]]


def build_report(path: str | Path, *, since: str | int | None = None, model: str | None = None,
                 baseline: str = "latest", factor: float = DEFAULT_FACTOR,
                 window: int = DEFAULT_WINDOW) -> HistoryReport:
    """Load the history and judge each output's newest row against ``baseline`` (drift.py's rule)."""
    import pandas as pd

    p = Path(path)
    h = load_history(p, since=since, model=model)
    runs = load_runs(p)
    current = h.groupby(KEY, sort=True).tail(1).sort_values(KEY).reset_index(drop=True)
    verdicts = _judge(p, current, baseline, factor, window, lambda j, r: j.judge(
        r.model, r.device, r.output, float(r.scaled_error) if pd.notna(r.scaled_error) else math.nan,
        budget=None if pd.isna(r.budget) else float(r.budget),
        unit_roundoff=None if pd.isna(r.unit_roundoff) else float(r.unit_roundoff)))
    current = _with_verdicts(current, verdicts)
    by_id = runs.set_index("run_id")
    current["changed"] = [_changes(by_id, r, b) for r, b in zip(current["run_id"], current["baseline_run"])]
    layers = _layer_table(p, since, model, baseline, factor, window)
    unchecked = load_unchecked(p, since=since, model=model)
    if not unchecked.empty:  # only the newest run's matter now (none, if it checked everything)
        unchecked = unchecked[unchecked["run_id"] == runs["run_id"].max()]
    return HistoryReport(p, str(baseline), float(factor), int(window), h, current, layers, unchecked, runs)


def _judge(path: Path, rows: Any, baseline: str, factor: float, window: int, fn: Any) -> list[Any]:
    """One DriftJudge per distinct current run (``latest`` is relative to the run judged)."""
    latest = str(baseline).strip().lower() == "latest"
    judges: dict[int | None, DriftJudge] = {}
    out = []
    for r in rows.itertuples(index=False):
        key = int(r.run_id) if latest else None
        if key not in judges:
            judges[key] = DriftJudge(path, baseline, factor, window, before=key)
        out.append(fn(judges[key], r))
    return out


def _with_verdicts(df: Any, verdicts: list[Any]) -> Any:
    df = df.copy()
    df["baseline_run"] = [v.baseline_run for v in verdicts]
    df["baseline_error"] = [v.baseline_error for v in verdicts]
    df["ratio"] = [v.ratio for v in verdicts]
    df["noise"] = [v.noise for v in verdicts]
    df["drift"] = [bool(v.significant) for v in verdicts]
    df["threshold"] = [v.threshold for v in verdicts]
    df["message"] = [v.message for v in verdicts]
    for col in ("baseline_run", "baseline_error", "ratio", "noise", "threshold"):
        df[col] = df[col].astype("Float64" if col != "baseline_run" else "Int64")
    return df


def _changes(by_id: Any, run_id: Any, base: Any) -> str:
    """Versions that differ between a run and its baseline run: 'tf2onnx 1.16.1 -> 1.17.0'."""
    import pandas as pd

    if pd.isna(base) or int(base) == int(run_id):
        return ""
    if int(base) not in by_id.index or int(run_id) not in by_id.index:
        return ""
    a, b = by_id.loc[int(base)], by_id.loc[int(run_id)]
    out = [f"{k} {a[k]} -> {b[k]}" for k in store.VERSION_KEYS
           if (pd.notna(a[k]) or pd.notna(b[k])) and a[k] != b[k]]
    if pd.notna(a["git_commit"]) and pd.notna(b["git_commit"]) and a["git_commit"] != b["git_commit"]:
        out.append(f"commit {str(a['git_commit'])[:8]} -> {str(b['git_commit'])[:8]}")
    return "; ".join(out)


def _layer_table(path: Path, since: Any, model: Any, baseline: str, factor: float, window: int) -> Any:
    import pandas as pd

    lay = load_layers(path, since=since, model=model)
    cols = ["model", "device", "op_type", "run_id", "nodes", "worst_node", "min_headroom",
            "baseline_min_headroom", "max_ratio", "drifted_nodes"]
    if lay.empty:
        return pd.DataFrame(columns=cols)
    cur = lay.groupby(["model", "device", "node"]).tail(1).reset_index(drop=True)
    verdicts = _judge(path, cur, baseline, factor, window, lambda j, r: j.judge_node(
        r.model, r.device, r.node, float(r.local_error) if pd.notna(r.local_error) else math.nan,
        budget=None if pd.isna(r.budget) else float(r.budget)))
    cur["op_type"] = cur["op_type"].fillna("?")
    floors = [error_floor(None, b if pd.notna(b) else None) for b in cur["budget"]]
    cur["headroom"] = [b / max(e, f) if pd.notna(b) and pd.notna(e) else math.nan
                       for b, e, f in zip(cur["budget"], cur["local_error"], floors)]
    cur["baseline_headroom"] = [b / max(v.baseline_error, f) if v.baseline_error is not None and pd.notna(b)
                                else math.nan for b, v, f in zip(cur["budget"], verdicts, floors)]
    cur["ratio"] = [v.ratio if v.ratio is not None else math.nan for v in verdicts]
    cur["drift"] = [v.significant for v in verdicts]
    rows = []
    for (m, d, op), g in cur.groupby(["model", "device", "op_type"], sort=True):
        worst = g.loc[g["headroom"].idxmin()] if g["headroom"].notna().any() else g.iloc[0]
        rows.append({"model": m, "device": d, "op_type": op, "run_id": int(g["run_id"].max()), "nodes": len(g),
                     "worst_node": worst["node"], "min_headroom": g["headroom"].min(),
                     "baseline_min_headroom": g["baseline_headroom"].min(), "max_ratio": g["ratio"].max(),
                     "drifted_nodes": int(g["drift"].sum())})
    return pd.DataFrame(rows, columns=cols).sort_values("min_headroom").reset_index(drop=True)


# ---------------------------------------------------------------------------------------------
# plots


def _png(fig: Any) -> str:
    import base64
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _plot_keys(rep: HistoryReport) -> list[tuple[str, str, str]]:
    df = rep.current.assign(_r=rep.current["ratio"].fillna(0.0), _h=rep.current["headroom"].fillna(math.inf))
    df = df.sort_values(["drift", "_r", "_h"], ascending=[False, False, True])
    return [tuple(k) for k in df[KEY].head(MAX_PLOTS).itertuples(index=False, name=None)]


def plot_error_history(rep: HistoryReport) -> str | None:
    """Small multiples: scaled error per run (log y) with the budget line and the baseline run."""
    fig = error_history_figure(rep)
    return None if fig is None else _png(fig)


def error_history_figure(rep: HistoryReport) -> Any:
    """The figure of ``plot_error_history`` (None without outputs)."""
    import pandas as pd
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    keys = _plot_keys(rep)
    handles: dict[str, Any] = {}
    if not keys:
        return None
    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig = Figure(figsize=(4.6 * ncols, 3.0 * nrows))
    grouped = rep.history.groupby(KEY)
    current = rep.current.set_index(KEY)
    for i, key in enumerate(keys):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        g = grouped.get_group(key)
        floor = [error_floor(u, b) for u, b in zip(g["unit_roundoff"].fillna(0), g["budget"].fillna(0))]
        top = 100 * float(g["budget"].max()) if g["budget"].notna().any() else 1.0
        # floored like the drift rule; a non-finite error (shape mismatch) is drawn off the chart's top
        err = [min(max(e, f), top) if e == e else math.nan for e, f in zip(g["scaled_error"], floor)]
        ax.plot(g["run_id"], err, marker="o", ms=3, lw=1, color="tab:blue", label="scaled error")
        bad = ~g["passed"]
        if bad.any():
            ax.plot(g["run_id"][bad], [e for e, b in zip(err, bad) if b], "x", color="red", ms=7, label="failed")
        if len(g) > 1:
            ax.step(g["run_id"], g["budget"], where="post", ls="--", color="tab:red", lw=1, label="budget")
        elif g["budget"].notna().any():  # one run: a step of one point draws nothing
            ax.axhline(float(g["budget"].iloc[0]), ls="--", color="tab:red", lw=1, label="budget")
        row = current.loc[key]
        if pd.notna(row["baseline_run"]):
            ax.axvline(int(row["baseline_run"]), color="gray", ls=":", lw=1, label="baseline run")
        if pd.notna(row["threshold"]):
            ax.axhline(float(row["threshold"]), color="tab:orange", ls="-.", lw=1,
                       label="drift threshold (current run)")
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=6))
        title = f"{Path(key[0]).name} [{key[1]}] {key[2]}"
        ax.set_title(("DRIFT  " if row["drift"] else "") + title, fontsize=9,
                     color="red" if row["drift"] else "black")
        ax.set_xlabel("run", fontsize=8)
        ax.tick_params(which="both", labelsize=7)
        ax.grid(True, which="major", alpha=0.3)
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.suptitle("scaled error per run (log) against the budget", fontsize=11)
    fig.tight_layout(rect=(0, 0.06 if nrows == 1 else 0.035, 1, 1))
    fig.legend(list(handles.values()), list(handles.keys()), loc="lower center", ncol=len(handles), fontsize=8,
               frameon=False)
    return fig


def plot_op_headroom(rep: HistoryReport) -> str | None:
    """Worst-node headroom per op type (log x), current next to baseline; < 1 is over budget."""
    from matplotlib.figure import Figure

    lay = rep.layers
    if lay.empty or lay["min_headroom"].notna().sum() == 0:
        return None
    lay = lay.sort_values("min_headroom", ascending=False)
    several = lay[["model", "device"]].drop_duplicates().shape[0] > 1
    labels = [f"{Path(m).name} [{d}] {op}" if several else op
              for m, d, op in zip(lay["model"], lay["device"], lay["op_type"])]
    fig = Figure(figsize=(7.5, 0.45 * len(lay) + 1.4))
    ax = fig.add_subplot(1, 1, 1)
    y = list(range(len(lay)))
    ax.barh([v + 0.2 for v in y], lay["baseline_min_headroom"].fillna(0), height=0.4, color="lightgray",
            label="baseline")
    colors = ["tab:red" if (h < 1 or n > 0) else "tab:blue" for h, n in zip(lay["min_headroom"], lay["drifted_nodes"])]
    ax.barh([v - 0.2 for v in y], lay["min_headroom"], height=0.4, color=colors, label="current")
    ax.axvline(1.0, color="red", ls="--", lw=1, label="budget (headroom 1)")
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("headroom of the worst node = budget / local error (log)")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18 - 0.3 / len(lay)), ncol=3,
              frameon=False)
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    return _png(fig)


# ---------------------------------------------------------------------------------------------
# rendering


def _fmt(v: Any, kind: str = "g") -> str:
    import pandas as pd

    if v is None or (not isinstance(v, str) and pd.isna(v)):
        return "-"
    if kind == "headroom" and math.isinf(float(v)):
        return "exact"  # no error at all: an infinite headroom says less than this
    if kind in ("x", "headroom"):
        return f"{float(v):.3g}x"
    if kind == "int":
        return str(int(v))
    if kind == "bool":
        return "DRIFT" if bool(v) else ""
    if kind == "pass":
        return "pass" if bool(v) else "FAIL"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


CURRENT_COLS = [("model", "s"), ("device", "s"), ("output", "s"), ("run_id", "int"), ("scaled_error", "g"),
                ("float32_noise", "g"), ("budget", "g"), ("headroom", "headroom"), ("rule", "s"), ("passed", "pass"),
                ("stage", "s")]
DRIFT_COLS = [("model", "s"), ("device", "s"), ("output", "s"), ("baseline_run", "int"), ("baseline_error", "g"),
              ("scaled_error", "g"), ("ratio", "x"), ("noise", "x"), ("drift", "bool")]
MOVER_COLS = [("model", "s"), ("device", "s"), ("output", "s"), ("ratio", "x"), ("noise", "x"), ("drift", "bool"),
              ("headroom", "headroom"), ("changed", "s")]
LAYER_COLS = [("model", "s"), ("device", "s"), ("op_type", "s"), ("nodes", "int"), ("worst_node", "s"),
              ("min_headroom", "headroom"), ("baseline_min_headroom", "headroom"), ("max_ratio", "x"), ("drifted_nodes", "int")]
SKIP_COLS = [("model", "s"), ("device", "s"), ("outcome", "s"), ("reason", "s")]
HEADERS = {"run_id": "run", "scaled_error": "error", "baseline_run": "baseline run", "budget": "allowed",
           "float32_noise": "float32 noise",
           "baseline_error": "baseline error", "noise": "noise band", "min_headroom": "min headroom",
           "baseline_min_headroom": "baseline", "max_ratio": "max ratio", "drifted_nodes": "drifted",
           "worst_node": "worst node", "op_type": "op type", "passed": "verdict", "scaled_error_now": "error"}


def _cells(df: Any, cols: list[tuple[str, str]]) -> list[list[str]]:
    return [[_fmt(getattr(r, c), k) for c, k in cols] for r in df.itertuples(index=False)]


def _summary_lines(rep: HistoryReport) -> list[str]:
    h = rep.history
    if h.empty:
        return [f"history {rep.path}: no results match the filters"]
    runs = sorted(h["run_id"].unique())
    first, last = h["time"].min(), h["time"].max()
    n_keys = len(rep.current)
    failing = int((~rep.current["passed"]).sum())
    lines = [f"history `{rep.path}`: {len(runs)} runs (run {runs[0]} .. {runs[-1]}, "
             f"{first:%Y-%m-%d %H:%M} .. {last:%Y-%m-%d %H:%M} UTC), {n_keys} outputs, {failing} failing now",
             f"baseline `{rep.baseline}`, drift factor {rep.factor:g}, noise window {rep.window} runs: "
             f"**{len(rep.drifted)} output(s) drifted**"]
    lowest = rep.current.sort_values("headroom").head(1)
    if not lowest.empty and lowest["headroom"].notna().all():
        r = lowest.iloc[0]
        lines.append(f"least headroom: {r['model']} [{r['device']}] {r['output']} at {_fmt(r['headroom'], 'headroom')}")
    return lines


def _sections(rep: HistoryReport) -> list[tuple[str, list[tuple[str, str]], Any, str]]:
    secs = [("Current error vs budget", CURRENT_COLS, rep.current,
             "Each output's newest result; headroom = budget / error (below 1x fails)."),
            ("Drift vs baseline", DRIFT_COLS, rep.current,
             "ratio = error / baseline error (both floored); noise band = the upper edge of the "
             "baseline's run-to-run jitter, as a multiple of its error. Drift when the ratio exceeds "
             f"{rep.factor:g}x and the error is above the band."),
            ("Worst movers", MOVER_COLS, rep.movers, "Largest ratios, with what changed since the baseline run.")]
    if not rep.layers.empty:
        secs.append(("Headroom per op type (layerwise)", LAYER_COLS, rep.layers,
                     "Worst node per op type: budget / local error, now and at the baseline."))
    if not rep.unchecked.empty:
        secs.append(("Not checked in the newest run (skipped or error)", SKIP_COLS, rep.unchecked, ""))
    return secs


def render_markdown(rep: HistoryReport) -> str:
    out = ["# tf2cntk history report", ""] + [f"- {line}" for line in _summary_lines(rep)]
    for title, cols, df, note in _sections(rep):
        out += ["", f"## {title}", ""] + ([note, ""] if note else [])
        out += markdown_table([HEADERS.get(c, c) for c, _ in cols], _cells(df, cols)) if not df.empty else ["(none)"]
    drifted = rep.drifted
    if not drifted.empty:
        out += ["", "## Drift details", ""] + [f"- {m}" + (f" (changed: {c})" if c else "")
                                               for m, c in zip(drifted["message"], drifted["changed"])]
    return "\n".join(out) + "\n"


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:left}th{background:#f3f3f3}
td.num{text-align:right;font-variant-numeric:tabular-nums}tr.drift td{background:#fde8e8}
tr.fail td{background:#fff3cd}p.note{color:#555;font-size:13px}img{max-width:100%}"""


def render_html(rep: HistoryReport) -> str:
    import re

    def md_inline(text: str) -> str:
        text = html.escape(text)
        text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
        return re.sub(r"`(.+?)`", r"<code>\1</code>", text)

    out = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'><title>tf2cntk history report</title>",
           f"<style>{_CSS}</style></head><body>", "<h1>tf2cntk history report</h1>", "<ul>"]
    out += [f"<li>{md_inline(line)}</li>" for line in _summary_lines(rep)] + ["</ul>"]
    if not rep.plots:
        rep.plots = {k: v for k, v in (("Error over runs", plot_error_history(rep)),
                                       ("Headroom per op type", plot_op_headroom(rep))) if v}
    for title, cols, df, note in _sections(rep):
        out.append(f"<h2>{html.escape(title)}</h2>")
        if note:
            out.append(f"<p class='note'>{html.escape(note)}</p>")
        if df.empty:
            out.append("<p>(none)</p>")
            continue
        out.append("<table><tr>" + "".join(f"<th>{html.escape(HEADERS.get(c, c))}</th>" for c, _ in cols) + "</tr>")
        for r, cells in zip(df.itertuples(index=False), _cells(df, cols)):
            cls = "drift" if getattr(r, "drift", False) is True else (
                "fail" if getattr(r, "passed", True) is False else "")
            tds = "".join(f"<td class='num'>{html.escape(v)}</td>" if k not in ("s", "bool", "pass")
                          else f"<td>{html.escape(v)}</td>" for v, (_, k) in zip(cells, cols))
            out.append(f"<tr class='{cls}'>{tds}</tr>" if cls else f"<tr>{tds}</tr>")
        out.append("</table>")
        if title.startswith("Current") and "Error over runs" in rep.plots:
            out.append("<h2>Error over runs</h2><p class='note'>The most drifted and least headroom outputs "
                       f"(up to {MAX_PLOTS}); dashed red: budget; dotted gray: baseline run; x: failed.</p>")
            out.append(f"<img src=\"data:image/png;base64,{rep.plots['Error over runs']}\" alt=\"error over runs\">")
        if title.startswith("Headroom per op") and "Headroom per op type" in rep.plots:
            out.append(f"<img src=\"data:image/png;base64,{rep.plots['Headroom per op type']}\" "
                       "alt=\"headroom per op type\">")
    drifted = rep.drifted
    if not drifted.empty:
        out.append("<h2>Drift details</h2><ul>")
        out += [f"<li>{html.escape(m)}{html.escape(f' (changed: {c})') if c else ''}</li>"
                for m, c in zip(drifted["message"], drifted["changed"])]
        out.append("</ul>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def render_csv(rep: HistoryReport, all_runs: bool = False) -> str:
    if all_runs:
        return rep.history.to_csv(index=False)
    cols = ["model", "device", "output", "run_id", "time", "git_commit", "scaled_error", "budget", "headroom",
            "passed", "stage", "max_abs", "max_ulp", "cosine", "baseline_run", "baseline_error", "ratio", "noise",
            "drift", "changed", "message"]
    return rep.current[cols].to_csv(index=False)


# ---------------------------------------------------------------------------------------------
# CLI: tf2cntk report
