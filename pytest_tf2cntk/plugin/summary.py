"""What a run shows and writes: the summary table, the GitHub step summary, the JSON report and
the JUnit properties of an item. Reads the session's typed records only."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from pytest_tf2cntk.history.records import OUTCOME_PASSED, OUTCOMES, CheckRecord, RunPayload, RunReport
from pytest_tf2cntk.parity.result import OutputCheck
from pytest_tf2cntk.tables import markdown_table, text_table
from pytest_tf2cntk.versions import host_versions

HEADER = ("model", "device", "batch", "output", "error", "float32 noise", "ratio", "allowed", "rule", "examples",
          "verdict")


def summary_rows(run: RunPayload) -> list[tuple[str, ...]]:
    """Per output: CNTK's error (vs the float64 truth under the measured rule), the float32 noise
    (TF32 / ORT32 vs the truth), their ratio, what was allowed, by which rule."""
    rows = []
    for r in sorted(run.results, key=lambda r: (r.model, r.device)):
        if r.result is None:
            why = f"ERROR ({r.error_type}): {_first_line(r.error)}" if r.error else f"skipped: {r.skipped}"
            rows.append((r.model, r.device, "-", "-", "-", "-", "-", "-", "-", "-", why))
            continue
        for name, o in sorted(r.result.outputs.items()):
            rows.append((r.model, r.device, str(r.result.conversion.batch), name, f"{o.scaled_error:.3g}", *_noise(o), f"{o.allowed:.3g}", o.rule,
                         str(r.result.examples), "PASS" if o.passed else f"FAIL ({o.stage})"))
    checked = {r.model for r in run.results}
    for c in run.conversions:
        if not c.ok and c.model not in checked:  # else its check rows already say so
            rows.append((c.model,) + ("-",) * 9 + (f"conversion failed: {_first_line(c.error)}",))
    return rows


def _first_line(text: str) -> str:
    return text.splitlines()[0] if text else ""


def _noise(o: OutputCheck) -> tuple[str, str]:
    t = o.measured
    if t is None:
        return "-", "-"
    ort = "" if t.ort32 is None else f" / {t.ort32:.2g}"
    return f"{t.tf32:.2g}{ort}", f"{o.ratio:.3g}x"


def summary_lines(run: RunPayload) -> list[str]:
    rows = summary_rows(run)
    return text_table([HEADER] + rows) if rows else []


def markdown(run: RunPayload) -> str:
    return "\n".join(["## tf2cntk parity", ""] + markdown_table(HEADER, summary_rows(run))) + "\n"


def run_passed(run: RunPayload) -> bool:
    """Every check passed and every conversion succeeded: an error or a skip is not a pass."""
    return (bool(run.results) and all(r.outcome == OUTCOME_PASSED for r in run.results)
            and all(c.ok for c in run.conversions))


def outcome_counts(run: RunPayload) -> dict[str, int]:
    counts = dict.fromkeys(OUTCOMES, 0)
    for r in run.results:
        counts[r.outcome] += 1
    return counts


def report(run: RunPayload, *, started: float, exitstatus: int, settings: dict[str, Any],
           models: list[str]) -> RunReport:
    return RunReport(time.strftime("%Y-%m-%dT%H:%M:%S%z"), time.time() - started, int(exitstatus), run_passed(run),
                     settings, models, host_versions(), run.conversions, run.results, outcome_counts(run))


def write_report(path: Path, report_: RunReport) -> None:
    """Atomically: a reader never sees half a report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        tmp.write_text(json.dumps(report_.to_json(), indent=1), "utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # after a failed replace (path a directory): no .tmp left behind


def repair_names(repairs: list[Any]) -> str:
    """"name (nodes), ..." of the CNTK repairs a conversion used, or "none"."""
    return ", ".join(f"{r.name} ({r.changed})" for r in repairs) or "none"


def junit_properties(record: CheckRecord | None) -> list[tuple[str, Any]]:
    """Key numbers of a parity check for JUnit XML (record_property)."""
    if record is None:
        return []
    if record.result is None:
        return [("tf2cntk_outcome", record.outcome)] + (
            [("tf2cntk_error", record.error_type)] if record.error else [])
    result = record.result
    props: list[tuple[str, Any]] = [("tf2cntk_outcome", record.outcome), ("tf2cntk_passed", result.passed),
                                    ("tf2cntk_examples", result.examples),
                                    ("tf2cntk_repairs", repair_names(result.conversion.repairs))]
    for name, c in result.outputs.items():
        props += [(f"tf2cntk_{name}_scaled_error", f"{c.scaled_error:.6g}"),
                  (f"tf2cntk_{name}_allowed", f"{c.allowed:.6g}"), (f"tf2cntk_{name}_rule", c.rule),
                  (f"tf2cntk_{name}_budget", f"{c.budget.value:.6g}"),
                  (f"tf2cntk_{name}_headroom", f"{c.headroom:.6g}")]
        if c.measured is not None:
            props += [(f"tf2cntk_{name}_tf32_noise", f"{c.truth.tf32:.6g}"),
                      (f"tf2cntk_{name}_noise_ratio", f"{c.ratio:.6g}")]
        if c.run is not None and c.run.applies:
            props.append((f"tf2cntk_{name}_run_median_ratio", f"{c.run.median:.6g}"))
    if result.reproducer:
        props.append(("tf2cntk_reproducer", result.reproducer))
    props += [(f"tf2cntk_{name}_drift_ratio", f"{v.ratio:.4g}") for name, v in record.drift.items()
              if v.ratio is not None]
    return props
