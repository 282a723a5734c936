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
def test_calibrate_mlp_prints_pasteable_toml_scoped_to_the_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture) -> None:
    import shutil

    monkeypatch.chdir(tmp_path)  # an empty project: defaults are the configured budgets
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "nets").mkdir()
    shutil.copy(FIXTURES / "mlp.keras", tmp_path / "nets" / "mlp.keras")
    stats = tmp_path / "cal.json"
    assert cli.main(["calibrate", "nets/mlp.keras", "--batch", "4", "--seeds", "2", "--examples", "4",
                     "--margin", "10", "--json", str(stats)]) == 0
    out = capsys.readouterr().out
    proposed = tomllib.loads(out)["tool"]["tf2cntk"]["budgets"]["models"]["nets/mlp.keras"]["outputs"]
    info = json.loads(stats.read_text())["outputs"]["probs"]
    assert set(proposed) == {"probs"} and info["n"] == 8 and len(info["seed_max"]) == 2
    assert 0 < info["max"] < info["default_budget"]
    assert proposed["probs"] == info["proposed"] >= 10 * max(info["max"], U32)
    assert proposed["probs"] <= 10 * max(info["max"], U32) * 1.1  # rounded up to 2 digits only
    assert info["default_budget"] == info["configured_budget"]
    assert "# proposed = margin 10 x max observed" in out and "(tighter)" in out


@pytest.mark.needs_cntk
def test_a_model_scoped_budget_judges_that_model_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture) -> None:
    """An impossible budget for probs of nets/mlp.keras fails that model (budget only, so the
    budget decides) and leaves a model of another path with the same output name alone."""
    import shutil

    monkeypatch.chdir(tmp_path)
    for name in ("mlp.keras", "other.keras"):
        shutil.copy(FIXTURES / "mlp.keras", tmp_path / name)
    (tmp_path / "pyproject.toml").write_text('[tool.tf2cntk.budgets.models."mlp.keras".outputs]\nprobs = 1e-30\n')
    check = ["--batch", "4", "--devices", "cpu", "--max-examples", "2", "--reference", "off"]
    assert cli.main(["check", "other.keras", *check]) == 0
    assert cli.main(["check", "mlp.keras", *check]) == 1
    assert "1e-30" in capsys.readouterr().out


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
    (scoped,) = tomllib.loads(text)["tool"]["tf2cntk"]["budgets"]["models"].values()
    assert scoped["outputs"].get("logits") is None
