"""Drift judgement on synthetic histories, the report in three formats, and calibrate on a real model."""
from __future__ import annotations

import base64
import io
import json
import math
import random
import tomllib
from pathlib import Path

import pytest

from pytest_tf2cntk.parity import calibrate as C
from pytest_tf2cntk import cli
from pytest_tf2cntk.history import store as H
from pytest_tf2cntk.history import report as R
from pytest_tf2cntk.history.drift import DriftJudge, error_floor, judge_errors, noise_upper

from .test_history import U32, make_result, make_run

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
JITTER = (0.5, 1.9, 0.7, 1.3, 2.0, 0.6, 1.1, 0.55, 1.6, 0.8)  # run-to-run: different Hypothesis inputs


# -- the rule ------------------------------------------------------------------------------------

def test_zero_and_tiny_baselines_are_floored_not_divided_by() -> None:
    floor = error_floor(U32, 1e-5)
    assert floor == U32  # one rounding of the output beats budget / 1000 here
    assert error_floor(U32, 1e-1) == pytest.approx(1e-4)  # ... and a thousandth of a loose budget wins
    assert error_floor(None, None) == 1e-12
    same = judge_errors(3e-8, [0.0], factor=2, floor=floor)
    assert same.ratio == 1.0 and not same.significant  # bit-exact before, sub-ulp now: nothing happened
    grown = judge_errors(1e-6, [0.0], factor=2, floor=floor)
    assert grown.ratio == pytest.approx(1e-6 / U32) and grown.significant and math.isfinite(grown.ratio)
    broken = judge_errors(math.inf, [1e-7], factor=2, floor=floor)
    assert broken.significant and broken.ratio == math.inf


def test_jitter_within_the_noise_band_is_not_drift_but_growth_is() -> None:
    history = [1e-6 * f for f in JITTER]  # newest first: the baseline happens to be a low run
    upper = noise_upper(history)
    assert upper >= 2e-6  # at least everything the window has seen
    jitter = judge_errors(1.8e-6, history, factor=2, floor=U32, label="y")
    assert jitter.ratio == pytest.approx(3.6) and not jitter.significant
    assert "within the noise band" in jitter.message
    grown = judge_errors(2e-5, history, factor=2, floor=U32, label="y", baseline_run=7)
    assert grown.significant and grown.ratio == pytest.approx(40)
    assert grown.message.startswith("y: error 2e-05 is 40x the baseline 5e-07 (run 7)") and "DRIFT" in grown.message
    assert grown.threshold == pytest.approx(max(2 * 5e-7, upper))
    # a long quiet history narrows the band below the factor: the factor alone decides
    quiet = judge_errors(2.5e-6, [1e-6] * 10, factor=2, floor=U32)
    assert 1.5 < quiet.noise < 1.7 and quiet.significant
    assert not judge_errors(1.9e-6, [1e-6] * 10, factor=2, floor=U32).significant
    # one run of history: the prior assumes up to 2.5x jitter, so 2.4x is not yet drift
    assert judge_errors(2.4e-6, [1e-6], factor=2, floor=U32).noise == pytest.approx(2.5)
    assert not judge_errors(2.4e-6, [1e-6], factor=2, floor=U32).significant
    # the real case behind the prior: three runs of mlp.keras, then an unchanged run at 2.4x the lowest
    assert not judge_errors(6.58e-7, [2.77e-7, 3.77e-7, 3.34e-7], factor=2, floor=U32).significant


def _record_series(path: Path, series: dict[str, list[float]], tf2onnx: list[str] | None = None) -> None:
    n = len(next(iter(series.values())))
    for i in range(n):
        errors = {k: v[i] for k, v in series.items() if v[i] is not None}
        layers = [{"model": "m.keras", "device": "cpu", "node": f"conv{j}", "op_type": "Conv", "tf_layer": f"c{j}",
                   "local_error": 1e-7 * JITTER[i % 10] * (j + 1), "budget": 1e-5} for j in range(2)]
        layers.append({"model": "m.keras", "device": "cpu", "node": "relu", "op_type": "Relu", "tf_layer": "r",
                       "local_error": 0.0, "budget": 5e-7})
        version = {"tf2onnx": tf2onnx[i]} if tf2onnx else {}
        H.record_run(path, make_run(i, **version), [make_result("m.keras", "cpu", errors)], layerwise=layers)


def test_drift_judge_against_latest_and_a_tagged_baseline(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite"
    assert DriftJudge(path).judge("m.keras", "cpu", "y", 1e-6).message.endswith("no earlier run in the history")
    _record_series(path, {"stable": [1e-6 * f for f in JITTER], "late": [None] * 9 + [1e-6]})
    H.tag_run(path, 3, "release")
    judge = DriftJudge(path, "latest", factor=2.0, window=10)
    assert judge.baseline_run == 10
    assert not judge.judge("m.keras", "cpu", "stable", 1.5e-6).significant
    v = judge.judge("m.keras", "cpu", "stable", 1e-5)
    assert v.significant and v.baseline_run == 10 and v.samples == 10 and v.baseline_error == pytest.approx(8e-7)
    assert judge.judge("m.keras", "cpu", "late", 1e-6).ratio == 1.0
    assert judge.judge("m.keras", "gpu", "stable", 1e-5).baseline_error is None  # never measured there
    tagged = DriftJudge(path, "release", factor=2.0)
    v = tagged.judge("m.keras", "cpu", "stable", 1.5e-6)  # run 3 measured 7e-7; window = runs 1-3
    assert v.baseline_run == 3 and v.samples == 3 and v.ratio == pytest.approx(1.5 / 0.7)
    assert "not measured in baseline run 3" in tagged.judge("m.keras", "cpu", "late", 1e-6).message
    verdicts = judge.judge_result(make_result("m.keras", "cpu", {"stable": 9e-6, "late": 1.1e-6}))
    assert verdicts["stable"].significant and not verdicts["late"].significant
    with pytest.raises(ValueError):
        DriftJudge(path, factor=1.0)


def test_per_op_drift_reports_the_worst_node_of_each_op_type(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite"
    _record_series(path, {"y": [1e-6] * 10})
    judge = DriftJudge(path)
    rows = [{"model": "m.keras", "device": "cpu", "node": "conv0", "op_type": "Conv", "local_error": 1.1e-7,
             "budget": 1e-5},
            {"model": "m.keras", "device": "cpu", "node": "conv1", "op_type": "Conv", "local_error": 5e-6,
             "budget": 1e-5},
            {"model": "m.keras", "device": "cpu", "node": "relu", "op_type": "Relu", "local_error": 0.0,
             "budget": 5e-7}]
    by_op = judge.judge_layers(rows)
    conv = by_op[("m.keras", "cpu", "Conv")]
    assert conv.significant and "node conv1" in conv.message
    relu = by_op[("m.keras", "cpu", "Relu")]
    assert relu.ratio == 1.0 and not relu.significant  # 0 vs 0: floored at budget / 1000, no division


# -- the report -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def history_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 runs: 'stable' jitters, 'grows' jumps 8x in the last run when tf2onnx changes."""
    path = tmp_path_factory.mktemp("report") / "history.sqlite"
    rng = random.Random(1)
    stable = [2e-7 * math.exp(rng.gauss(0, 0.3)) for _ in range(12)]
    grows = [1e-6 * math.exp(rng.gauss(0, 0.2)) for _ in range(11)] + [8e-6]
    _record_series(path, {"stable": stable, "grows": grows}, tf2onnx=["1.16.1"] * 11 + ["1.17.0"])
    H.record_run(path, make_run(12), [make_result("other.keras", "cpu", {"out": 1e-7}),
                                      {"model": "other.keras", "device": "gpu", "skipped": "no GPU visible"}])
    H.tag_run(path, 5, "release")
    return path


def test_report_markdown_tables(history_file: Path) -> None:
    import pandas as pd

    rep = R.build_report(history_file)
    md = R.render_markdown(rep)
    for title in ("## Current error vs budget", "## Drift vs baseline", "## Worst movers",
                  "## Headroom per op type (layerwise)", "## Skipped in the newest run", "## Drift details"):
        assert title in md
    assert "13 runs (run 1 .. 13" in md and "**1 output(s) drifted**" in md
    movers = md.split("## Worst movers")[1].split("## ")[0]
    first = [line for line in movers.splitlines() if line.startswith("| m.keras")][0]
    assert "| grows |" in first and "DRIFT" in first and "tf2onnx 1.16.1 -> 1.17.0" in first
    assert "| other.keras | gpu | no GPU visible |" in md
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


# -- calibrate (real TensorFlow and CNTK) ---------------------------------------------------------

def test_round_up_never_shrinks_a_budget() -> None:
    assert C.round_up(5.26e-6) == 5.3e-6 and C.round_up(5.3e-6) == 5.3e-6 and C.round_up(9.96e-6) == 1e-5
    assert all(C.round_up(x) >= x for x in (1.01e-7, 3.333e-5, 7.77e-3, 0.1234))


def test_calibrate_mlp_prints_pasteable_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture) -> None:
    from pytest_tf2cntk.cntk.env import default_env_dir, env_python

    if not env_python(default_env_dir()).exists():
        pytest.skip("no CNTK environment (run `tf2cntk setup`)")
    monkeypatch.chdir(tmp_path)  # no project pyproject: defaults are the configured budgets
    stats = tmp_path / "cal.json"
    assert cli.main(["calibrate", str(FIXTURES / "mlp.keras"), "--batch", "4", "--seeds", "2", "--examples", "4",
                     "--margin", "10", "--json", str(stats)]) == 0
    out = capsys.readouterr().out
    proposed = tomllib.loads(out)["tool"]["tf2cntk"]["budgets"]["outputs"]
    info = json.loads(stats.read_text())["outputs"]["probs"]
    assert set(proposed) == {"probs"} and info["n"] == 8 and len(info["seed_max"]) == 2
    assert 0 < info["max"] < info["default_budget"]
    assert proposed["probs"] == info["proposed"] >= 10 * max(info["max"], U32)
    assert proposed["probs"] <= 10 * max(info["max"], U32) * 1.1  # rounded up to 2 digits only
    assert info["default_budget"] == info["configured_budget"]
    assert "# proposed = margin 10 x max observed" in out and "(tighter)" in out
