"""The CNTK import repairs end to end in the plugin (issue 13 item 4, and InceptionV3): models
CNTK refuses pass with repairs on, and fail as before with them off."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.paths import ROOT

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.needs_cntk
QUIET = ("-p", "no:cacheprovider", "--tf2cntk-max-examples=5", "--tf2cntk-devices=cpu", "-v")
RAW = "--tf2cntk-repairs=off"


def _in_child(code: str, *args: str) -> str:
    """Build models in a child: TensorFlow must not be imported into this process inside pytester's window."""
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, check=True, capture_output=True,
                          text=True, timeout=900)
    return done.stdout.strip()


def test_mixed_batch_concat_passes_with_repairs_and_fails_convert_without(pytester: pytest.Pytester) -> None:
    _in_child("import sys; from pathlib import Path; from tests.support.keras_models import mixed_batch_concat; "
              "mixed_batch_concat(Path(sys.argv[1]))", str(pytester.path))
    model = ("--tf2cntk-model=mixed_batch_concat.keras", "--tf2cntk-batch=4")
    repaired = pytester.runpytest_subprocess(*model, "-rP", *QUIET)
    repaired.assert_outcomes(passed=2)
    repaired.stdout.fnmatch_lines(["repairs   concat_static_batch (1)", "*mixed_batch_concat.keras*cpu*join*PASS*"])
    raw = pytester.runpytest_subprocess(*model, RAW, *QUIET)
    raw.assert_outcomes(failed=2)
    raw.stdout.fnmatch_lines([
        "*CNTK 2.7 cannot load the converted graph of *mixed_batch_concat.keras at batch 4 on cpu: Splice: "
        "Conflicting dimensionality of axis 3 between operand #1 (4) and other(s) (-3).*"])


@pytest.fixture(scope="module")
def inception() -> Path:
    return Path(_in_child("from tests.support.zoo import application_model; "
                          "print(application_model('inceptionv3_75'))"))


@pytest.mark.slow
@pytest.mark.parametrize("batch,used", [(1, "avgpool_border (2)"), (2, "avgpool_border (2), concat_static_batch (3)")])
def test_inceptionv3_passes_with_repairs(pytester: pytest.Pytester, inception: Path, batch: int, used: str) -> None:
    result = pytester.runpytest_subprocess(f"--tf2cntk-model={inception}", f"--tf2cntk-batch={batch}", "-rP", *QUIET)
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines([f"repairs   {used}", "*inceptionv3_75.keras*cpu*PASS*"])


@pytest.mark.slow
def test_inceptionv3_at_batch_2_without_repairs_fails_convert_with_cntks_splice_text(
        pytester: pytest.Pytester, inception: Path) -> None:
    result = pytester.runpytest_subprocess(f"--tf2cntk-model={inception}", "--tf2cntk-batch=2", RAW, *QUIET)
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(["*CNTK 2.7 cannot load the converted graph of *inceptionv3_75.keras at batch 2 "
                                 "on cpu: Splice: Conflicting dimensionality of axis 3 between operand #2 (-3) "
                                 "and other(s) (2).*"])
