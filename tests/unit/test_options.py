"""The option table: pytest options, ini twins, [tool.tf2cntk] and the tf2cntk command's arguments."""
from __future__ import annotations

from pathlib import Path

import pytest

from pytest_tf2cntk import options


def test_options_cli_overrides_ini_and_validates(tmp_path: Path) -> None:
    cli = {"tf2cntk_max_examples": "7", "tf2cntk_devices": None, "tf2cntk_models": None}
    ini = {"tf2cntk_max_examples": "3", "tf2cntk_devices": "cpu, gpu:1", "tf2cntk_models": ["m.keras"]}
    s = options.resolve(lambda k: cli.get(k), lambda k: ini.get(k), tmp_path,
                        {"tool": {"tf2cntk": {"inputs": {"x": [0, 255]}, "budgets": {"Conv": 3}}}})
    assert s.max_examples == 7 and s.devices == ("cpu", "gpu:1")
    assert s.models == (tmp_path / "m.keras",)  # ini paths are relative to the rootdir
    assert s.inputs == {"x": (0.0, 255.0)} and s.budgets == {"Conv": 3}
    with pytest.raises(ValueError, match="--tf2cntk-devices"):
        options.resolve(lambda k: "tpu" if k == "tf2cntk_devices" else None, lambda k: None, tmp_path)
    with pytest.raises(ValueError, match="--tf2cntk-max-examples"):
        options.resolve(lambda k: "0" if k == "tf2cntk_max_examples" else None, lambda k: None, tmp_path)


def test_every_option_is_prefixed_and_has_an_ini_twin() -> None:
    for o in options.PYTEST_OPTIONS:
        assert o.ini == "tf2cntk_" + o.name
        assert o.flag.startswith("--tf2cntk-")
