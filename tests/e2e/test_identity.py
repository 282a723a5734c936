"""Item identity wherever a model lives, and the models whose loading needs the user's code."""
from __future__ import annotations

import shutil
import xml.etree.ElementTree as ET

import pytest

from tests.support.paths import FIXTURES

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.needs_cntk
FAST = ("--tf2cntk-devices=cpu", "--tf2cntk-max-examples=3", "--tf2cntk-no-history")


def _ran(result: pytest.RunResult) -> list[str]:
    """The item ids a -v run reports, in order."""
    return [line.split(" ")[0] for line in result.outlines
            if line.endswith(("PASSED", "FAILED")) or " PASSED " in line or " FAILED " in line]


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
    first = pytester.runpytest_subprocess(*args, "--junitxml=junit.xml")
    first.assert_outcomes(passed=3, failed=1)
    ids = {f"{m.as_posix()}::{name}" for m in (good, bad) for name in ("convert", "parity[cpu]")}
    assert set(_ran(first)) == ids
    cases = ET.parse(pytester.path / "junit.xml").getroot().iter("testcase")
    classnames = {(c.get("classname"), c.get("name")) for c in cases}
    assert len(classnames) == 4 and all(cls for cls, _ in classnames)
    again = pytester.runpytest_subprocess(*args, "--lf")
    assert _ran(again) == [f"{bad.as_posix()}::parity[cpu]"]
    assert again.parseoutcomes().get("failed") == 1 and "passed" not in again.parseoutcomes()
