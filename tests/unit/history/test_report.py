"""`tf2cntk report` in three formats over a synthetic history."""
from __future__ import annotations

import base64
import io
import math
import random
from pathlib import Path

import pytest

from pytest_tf2cntk import cli
from pytest_tf2cntk.history import report as R
from pytest_tf2cntk.history import store as H
from pytest_tf2cntk.history.records import CheckRecord
from tests.support.synthetic import make_result, make_run

from tests.support.histories import record_series


# -- the report -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def history_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 runs: 'stable' jitters, 'grows' jumps 8x in the last run when tf2onnx changes."""
    path = tmp_path_factory.mktemp("report") / "history.sqlite"
    rng = random.Random(1)
    stable = [2e-7 * math.exp(rng.gauss(0, 0.3)) for _ in range(12)]
    grows = [1e-6 * math.exp(rng.gauss(0, 0.2)) for _ in range(11)] + [8e-6]
    record_series(path, {"stable": stable, "grows": grows}, tf2onnx=["1.16.1"] * 11 + ["1.17.0"])
    H.record_run(path, make_run(12), [make_result("other.keras", "cpu", {"out": 1e-7}),
                                      CheckRecord("other.keras", "gpu", skipped="no GPU visible")])
    H.tag_run(path, 5, "release")
    return path


def test_report_markdown_tables(history_file: Path) -> None:
    import pandas as pd

    rep = R.build_report(history_file)
    md = R.render_markdown(rep)
    for title in ("## Current error vs budget", "## Drift vs baseline", "## Worst movers",
                  "## Headroom per op type (layerwise)", "## Not checked in the newest run (skipped or error)", "## Drift details"):
        assert title in md
    assert "13 runs (run 1 .. 13" in md and "**1 output(s) drifted**" in md
    movers = md.split("## Worst movers")[1].split("## ")[0]
    first = [line for line in movers.splitlines() if line.startswith("| m.keras")][0]
    assert "| grows |" in first and "DRIFT" in first and "tf2onnx 1.16.1 -> 1.17.0" in first
    assert "| other.keras | gpu | skipped | no GPU visible |" in md
    current = rep.current.set_index("output")
    assert current.loc["grows", "drift"] and not current.loc["stable", "drift"]
    assert pd.isna(current.loc["out", "ratio"])  # other.keras was never measured before: no baseline
    assert current.loc["grows", "headroom"] == pytest.approx(1e-5 / 8e-6)


def test_report_html_embeds_png_plots(history_file: Path) -> None:
    rep = R.build_report(history_file, baseline="release", model="m.keras")
    page = R.render_html(rep)
    assert page.startswith("<!DOCTYPE html>") and "<table>" in page and "other.keras" not in page
    images = page.split('<img src="data:image/png;base64,')
    assert len(images) == 3  # error over runs + headroom per op type
    for chunk in images[1:]:
        assert base64.b64decode(chunk.split('"')[0]).startswith(b"\x89PNG\r\n\x1a\n")
    assert "<tr class='drift'>" in page and "baseline `release`" not in page and "<code>release</code>" in page


def test_an_output_with_one_run_has_its_budget_line_and_no_foreign_baseline(history_file: Path) -> None:
    rep = R.build_report(history_file, baseline="release", model="other.keras")
    assert rep.current["baseline_run"].isna().all()  # run "release" never measured other.keras
    (ax,) = [a for a in R.error_history_figure(rep).axes if a.get_title()]
    (budget,) = [line for line in ax.get_lines() if line.get_label() == "budget"]
    assert len(budget.get_xdata()) == 2  # a line across the plot, not a step of one point (invisible)


def test_report_csv_current_and_all_rows(history_file: Path) -> None:
    import pandas as pd

    rep = R.build_report(history_file, since=10)
    df = pd.read_csv(io.StringIO(R.render_csv(rep)))
    assert sorted(df["output"]) == ["grows", "out", "stable"] and len(df) == 3
    assert {"scaled_error", "budget", "headroom", "baseline_error", "ratio", "noise", "drift", "changed"} <= set(df)
    assert df.set_index("output").loc["grows", "drift"]
    every = pd.read_csv(io.StringIO(R.render_csv(rep, all_runs=True)))
    assert len(every) == 3 * 2 + 1 and every["run_id"].min() == 10  # runs 10-12 of m, run 13 of other


def test_cli_report_writes_each_format(history_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture) -> None:
    for fmt in ("md", "csv"):
        out = tmp_path / f"report.{fmt}"
        assert cli.main(["report", "--history", str(history_file), "--format", fmt, "-o", str(out),
                         "--since", "2023-11-14", "--baseline", "release", "--factor", "3"]) == 0
        assert "written to" in capsys.readouterr().out and out.stat().st_size > 200
    assert "baseline `release`, drift factor 3" in (tmp_path / "report.md").read_text()
    assert cli.main(["report", "--history", str(history_file), "--since", "yesterday-ish"]) == cli.EXIT_USAGE
    assert "neither a run id nor a date" in capsys.readouterr().err
    assert cli.main(["report", "--history", str(history_file), "--baseline", "nope"]) == cli.EXIT_USAGE
    assert "tag 'nope' is not in" in capsys.readouterr().err
