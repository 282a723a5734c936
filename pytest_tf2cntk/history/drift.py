"""Tolerance drift: is an output's error now significantly larger than at a baseline run?

A check can pass every time while its error creeps towards the budget (a new TF, a new tf2onnx,
a changed pass). Drift compares each output's scaled error with a baseline run from the history:

  baseline   ``latest``: for each output, the most recent earlier run that measured it;
             ``RUN_ID`` or ``TAG``: that run (an output it did not measure has no baseline).
  floor      errors below f = max(u, budget / 1000) count as f, u the output dtype's unit
             roundoff. A bit-exact baseline (error 0) would make any rounding an infinite ratio;
             below one rounding of the output, or a thousandth of its allowance, a change means
             nothing. For layer rows (no dtype stored) f = max(budget / 1000, 1e-12).
  ratio      r = max(current, f) / max(baseline, f).
  noise      the window: the baseline's error and those of up to ``window - 1`` earlier runs of
             the same output (all floored). Run-to-run jitter comes from different Hypothesis
             inputs (an error is the worst of a few examples, a noisy maximum), so the band's
             upper edge is U = max(max(window), exp(mean + 3 s)) over log errors, where s mixes
             the window's log standard deviation with a prior: jitter of up to 2.5x (s0 =
             ln(2.5) / 3), worth 3 runs. A short history is thus not mistaken for a quiet one;
             a long quiet one (derandomized CI) narrows the band to ~1.6x, below the factor.
  drift      significant iff r > factor AND current > U: the error grew by more than the
             factor, and beyond anything the history shows as noise.

Per-op drift applies the same rule to layerwise rows (node local errors), and reports the worst
node per op type. ``docs/drift.md`` explains the rule with examples.
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Iterable, Sequence

from pytest_tf2cntk.errors import HistoryError
from pytest_tf2cntk.history import store
from pytest_tf2cntk.history.records import DriftVerdict
from pytest_tf2cntk.options import default
from pytest_tf2cntk.parity.localize.report import LayerRow
from pytest_tf2cntk.parity.result import ParityResult

DEFAULT_FACTOR = default("factor")
DEFAULT_WINDOW = default("window")
NOISE_SIGMAS = 3.0
PRIOR_LOG_STD = math.log(2.5) / NOISE_SIGMAS  # until history shows otherwise, runs jitter up to 2.5x
PRIOR_RUNS = 3.0  # ... a belief worth this many runs of evidence
BUDGET_FLOOR_FRACTION = 1e-3
EPSILON = 1e-12


def error_floor(unit_roundoff: float | None = None, budget: float | None = None) -> float:
    """The smallest error worth comparing (see the module docstring)."""
    floor = EPSILON
    if unit_roundoff and unit_roundoff > 0:
        floor = max(floor, unit_roundoff)
    if budget and budget > 0 and math.isfinite(budget):
        floor = max(floor, budget * BUDGET_FLOOR_FRACTION)
    return floor


def noise_log_std(logs: Sequence[float]) -> float:
    """Log-error standard deviation: the window's, pooled with the prior (see the module docstring)."""
    dof = len(logs) - 1
    observed = statistics.variance(logs) if dof > 0 else 0.0
    return math.sqrt((PRIOR_RUNS * PRIOR_LOG_STD ** 2 + dof * observed) / (PRIOR_RUNS + dof))


def noise_upper(window: Sequence[float]) -> float:
    """Upper edge of the run-to-run noise band of already floored, finite errors."""
    if not window:
        return math.nan
    logs = [math.log(e) for e in window]
    return max(max(window), math.exp(statistics.fmean(logs) + NOISE_SIGMAS * noise_log_std(logs)))


def judge_errors(current: float, history: Sequence[float | None], *, factor: float = DEFAULT_FACTOR,
                 floor: float = EPSILON, label: str = "", baseline_run: int | None = None) -> DriftVerdict:
    """The drift rule. ``history``: errors newest first, ``history[0]`` the baseline's."""
    name = f"{label}: " if label else ""
    if not history or history[0] is None or (isinstance(history[0], float) and math.isnan(history[0])):
        return DriftVerdict(None, None, None, False, f"{name}no baseline error to compare with",
                            baseline_run, 0)
    base = max(float(history[0]), floor)
    cur = max(float(current), floor) if not math.isnan(current) else math.nan
    window = [max(float(e), floor) for e in history if e is not None and math.isfinite(e)]
    where = f" (run {baseline_run})" if baseline_run is not None else ""
    if not math.isfinite(base):
        return DriftVerdict(base, None, None, False, f"{name}baseline{where} had no finite error",
                            baseline_run, len(window))
    upper = noise_upper(window)
    threshold = max(factor * base, upper)
    if math.isnan(cur):
        return DriftVerdict(base, None, upper / base, False, f"{name}no current error (NaN)", baseline_run,
                            len(window), threshold)
    ratio = cur / base
    noise = upper / base
    significant = ratio > factor and cur > upper
    if significant:
        why = f"DRIFT: more than {factor:g}x and above the noise band"
    elif ratio <= factor:
        why = f"within the {factor:g}x drift factor"
    else:
        why = "within the noise band"
    message = (f"{name}error {cur:.3g} is {ratio:.3g}x the baseline {base:.3g}{where}; noise band up to "
               f"{noise:.3g}x over {len(window)} run(s): {why}")
    return DriftVerdict(float(history[0]), ratio, noise, significant, message, baseline_run, len(window),
                        threshold)


def resolve_baseline(path: str | Path, spec: str | int, *, before: int | None = None) -> int | None:
    """``latest`` (newest run before ``before``; None if there is none), a RUN_ID or a TAG.

    An unknown run id or tag is a HistoryError: a typo must not silently turn drift checks off.
    """
    text = str(spec).strip()
    p = Path(path)
    if text.lower() == "latest":
        if not p.exists():
            return None
        with store.reading(p) as con:
            if before is None:
                row = con.execute("SELECT MAX(run_id) FROM runs").fetchone()
            else:
                row = con.execute("SELECT MAX(run_id) FROM runs WHERE run_id < ?", (int(before),)).fetchone()
        return None if row[0] is None else int(row[0])
    if not p.exists():
        raise HistoryError(f"baseline {text!r}: no history at {p}",
                           "record runs first (pytest with pytest-tf2cntk), or use --tf2cntk-baseline latest")
    with store.reading(p) as con:
        if text.isdigit():
            if con.execute("SELECT 1 FROM runs WHERE run_id = ?", (int(text),)).fetchone() is None:
                raise HistoryError(f"baseline run {text} is not in {p}", "`tf2cntk runs` lists the recorded runs")
            return int(text)
        row = con.execute("SELECT run_id FROM tags WHERE name = ?", (text,)).fetchone()
        if row is None:
            known = ", ".join(r[0] for r in con.execute("SELECT name FROM tags ORDER BY name")) or "none"
            raise HistoryError(f"baseline tag {text!r} is not in {p} (tags: {known})",
                               "tag a run with `tf2cntk tag RUN_ID NAME`, or use a run id or 'latest'")
        return int(row[0])


class DriftJudge:
    """Judges current errors against a baseline from the history; reads the file once, up front.

    ``before``: the current run's id when it is already recorded (judging a stored run), so
    ``latest`` means the run before it. A missing history file means no baselines: first run.
    """

    def __init__(self, path: str | Path, baseline_spec: str | int = "latest", factor: float = DEFAULT_FACTOR,
                 window: int = DEFAULT_WINDOW, *, before: int | None = None) -> None:
        if factor <= 1:
            raise ValueError(f"drift factor must be > 1, got {factor}")
        if window < 1:
            raise ValueError(f"drift window must be >= 1, got {window}")
        self.path = Path(path)
        self.spec = str(baseline_spec).strip()
        self.factor = float(factor)
        self.window = int(window)
        self.per_output = self.spec.lower() == "latest"
        self.baseline_run = resolve_baseline(self.path, self.spec, before=before)
        self._outputs: dict[tuple[str, str, str], list[tuple[int, float | None, float | None, float | None]]] = {}
        self._nodes: dict[tuple[str, str, str], list[tuple[int, float | None, float | None, str | None]]] = {}
        if self.baseline_run is not None:
            self._load()

    def _load(self) -> None:
        def newest(table: str, key: str, cols: str) -> str:
            return (f"SELECT model, device, {key}, run_id, {cols} FROM (SELECT *, ROW_NUMBER() OVER "
                    f"(PARTITION BY model, device, {key} ORDER BY run_id DESC) AS k FROM {table} "
                    f"WHERE run_id <= ?) WHERE k <= ? ORDER BY model, device, {key}, run_id DESC")

        with store.reading(self.path) as con:
            for m, d, o, run, err, budget, u in con.execute(
                    newest("results", "output", "scaled_error, budget, unit_roundoff"),
                    (self.baseline_run, self.window)):
                self._outputs.setdefault((m, d, o), []).append((run, err, budget, u))
            for m, d, n, run, err, budget, op in con.execute(
                    newest("layers", "node", "local_error, budget, op_type"), (self.baseline_run, self.window)):
                self._nodes.setdefault((m, d, n), []).append((run, err, budget, op))

    def _rows(self, table: dict, key: tuple[str, str, str]) -> list:
        rows = table.get(key, [])
        if not self.per_output and rows and rows[0][0] != self.baseline_run:
            return []  # the fixed baseline run did not measure this output
        return rows

    def _none(self, label: str) -> DriftVerdict:
        if self.baseline_run is None:
            return DriftVerdict(None, None, None, False, f"{label}: no earlier run in the history")
        # no baseline_run: that run has nothing of this output, so a table must not show it as one
        return DriftVerdict(None, None, None, False, f"{label}: not measured in baseline "
                            f"{'runs' if self.per_output else f'run {self.baseline_run}'}")

    def judge(self, model: str, device: str, output: str, scaled_error: float, *,
              budget: float | None = None, unit_roundoff: float | None = None) -> DriftVerdict:
        """Drift of one output. ``budget``/``unit_roundoff`` default to the baseline's (for the floor)."""
        label = f"{model} [{device}] {output}"
        rows = self._rows(self._outputs, (model, device, output))
        if not rows:
            return self._none(label)
        run, _, b_budget, b_u = rows[0]
        floor = error_floor(unit_roundoff if unit_roundoff is not None else b_u,
                            budget if budget is not None else b_budget)
        return judge_errors(scaled_error, [r[1] for r in rows], factor=self.factor, floor=floor, label=label,
                            baseline_run=run)

    def judge_result(self, model: str, result: ParityResult) -> dict[str, DriftVerdict]:
        """Every output of a parity result, ``model`` as the history names it."""
        return {name: self.judge(model, result.device, name, o.scaled_error, budget=o.budget.value,
                                 unit_roundoff=o.budget.unit_roundoff)
                for name, o in result.outputs.items()}

    def judge_node(self, model: str, device: str, node: str, local_error: float, *,
                   budget: float | None = None) -> DriftVerdict:
        label = f"{model} [{device}] node {node}"
        rows = self._rows(self._nodes, (model, device, node))
        if not rows:
            return self._none(label)
        run, _, b_budget, _ = rows[0]
        floor = error_floor(None, budget if budget is not None else b_budget)
        return judge_errors(local_error, [r[1] for r in rows], factor=self.factor, floor=floor, label=label,
                            baseline_run=run)

    def judge_layers(self, rows: Iterable[LayerRow]) -> dict[tuple[str, str, str], DriftVerdict]:
        """Per (model, device, op_type): the verdict of its most-drifted node."""
        worst: dict[tuple[str, str, str], DriftVerdict] = {}
        for r in rows:
            if r.local_error is None:
                continue
            v = self.judge_node(r.model, r.device, r.node, r.local_error, budget=r.budget)
            key = (r.model, r.device, r.op_type or "?")
            held = worst.get(key)
            if held is None or _rank(v) > _rank(held):
                worst[key] = v
        return worst


def _rank(v: DriftVerdict) -> tuple[int, float]:
    return (int(v.significant), v.ratio if v.ratio is not None else -1.0)
