"""Calibration: measured errors, proposed budgets as TOML."""
from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from pytest_tf2cntk import cli
from pytest_tf2cntk.parity import calibrate as C
from tests.support.paths import FIXTURES
from tests.support.synthetic import U32



# -- calibrate (real TensorFlow and CNTK) ---------------------------------------------------------

def test_round_up_never_shrinks_a_budget() -> None:
    assert C.round_up(5.26e-6) == 5.3e-6 and C.round_up(5.3e-6) == 5.3e-6 and C.round_up(9.96e-6) == 1e-5
    assert all(C.round_up(x) >= x for x in (1.01e-7, 3.333e-5, 7.77e-3, 0.1234))


@pytest.mark.needs_cntk
def test_calibrate_mlp_prints_pasteable_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture) -> None:
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


@pytest.mark.needs_cntk
def test_calibrate_never_proposes_a_budget_that_switches_the_check_off(tmp_path: Path) -> None:
    """spectrogram_cnn is ill-conditioned (TF32 up to ~1e-4..1e-3 from float64, by CPU); the margin
    1e6 forces the wanted budget above 1e-2 on any machine (1e6 x at least one unit roundoff): none
    is proposed, the cause is named, the measured verdict pointed to."""
    cal = C.calibrate(FIXTURES / "spectrogram_cnn.keras", seeds=1, examples=4, margin=1e6)
    o = cal.outputs["logits"]
    assert o.wanted is not None and o.wanted > C.MAX_PROPOSAL and o.proposed is None
    assert "logits" not in cal.overrides
    text = cal.to_toml()
    assert "# WARNING logits: a budget of" in text and "would switch the check off" in text
    assert "TF32 itself is up to" in text and "from the float64 twin" in text and "--tf2cntk-reference=auto" in text
    assert tomllib.loads(text)["tool"]["tf2cntk"]["budgets"]["outputs"].get("logits") is None
