"""Item identity wherever a model lives, and the models whose loading needs the user's code."""
from __future__ import annotations

import shutil
from pathlib import Path
import xml.etree.ElementTree as ET

import pytest

from tests.support.paths import FIXTURES

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.needs_cntk
FAST = ("--tf2cntk-devices=cpu", "--tf2cntk-max-examples=3", "--tf2cntk-no-history")


def _junit_ids(path: Path) -> list[tuple[str, str]]:
    """(classname, name) of each test case of a JUnit file: pytest derives both from the item id."""
    return [(c.get("classname"), c.get("name")) for c in ET.parse(path).getroot().iter("testcase")]


def _classname(model: Path) -> str:
    return model.as_posix().replace("/", ".")


def test_models_outside_the_rootdir_have_distinct_ids_and_lf_reruns_the_failed_one(
        pytester: pytest.Pytester) -> None:
    """Two models named model.keras in two directories outside the rootdir (one fails parity):
    their items are told apart in -v, JUnit and --lf, which reruns exactly the failed one."""
    project = pytester.mkdir("project")
    (project / "pyproject.toml").write_text("[tool.tf2cntk]\n")
    good, bad = pytester.path / "good" / "model.keras", pytester.path / "bad" / "model.keras"
    for source, target in ((FIXTURES / "mlp.keras", good), (FIXTURES / "quantized.keras", bad)):
        target.parent.mkdir()
        shutil.copy(source, target)
    args = (f"--rootdir={project}", f"--tf2cntk-model={good}", f"--tf2cntk-model={bad}", *FAST, "-v")
    first = pytester.runpytest_subprocess(*args, "--junitxml=first.xml")
    first.assert_outcomes(passed=3, failed=1)
    expected = {(_classname(m), name) for m in (good, bad) for name in ("convert", "parity[cpu]")}
    assert set(_junit_ids(pytester.path / "first.xml")) == expected  # four ids, each classname non-empty
    first.stdout.fnmatch_lines(["bad/model.keras::parity?cpu? FAILED*", "good/model.keras::convert PASSED*"])
    again = pytester.runpytest_subprocess(*args, "--lf", "--junitxml=again.xml")
    assert _junit_ids(pytester.path / "again.xml") == [(_classname(bad), "parity[cpu]")]
    assert again.parseoutcomes().get("failed") == 1 and "passed" not in again.parseoutcomes()
