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
    """Two models named model.keras in two directories outside the rootdir (one fails parity: the
    known-bad quantized.keras, converted without repairs):
    their items are told apart in -v, JUnit, xdist and --lf, which reruns exactly the failed one."""
    project = pytester.mkdir("project")
    (project / "pyproject.toml").write_text("[tool.tf2cntk]\n")
    good, bad = pytester.path / "good" / "model.keras", pytester.path / "bad" / "model.keras"
    for source, target in ((FIXTURES / "mlp.keras", good), (FIXTURES / "quantized.keras", bad)):
        target.parent.mkdir()
        shutil.copy(source, target)
    args = (f"--rootdir={project}", f"--tf2cntk-model={good}", f"--tf2cntk-model={bad}", *FAST, "-v",
            "--tf2cntk-repairs=off")
    first = pytester.runpytest_subprocess(*args, "--junitxml=first.xml")
    first.assert_outcomes(passed=3, failed=1)
    expected = {(_classname(m), name) for m in (good, bad) for name in ("convert", "parity[cpu]")}
    assert set(_junit_ids(pytester.path / "first.xml")) == expected  # four ids, each classname non-empty
    first.stdout.fnmatch_lines(["bad/model.keras::parity?cpu? FAILED*", "good/model.keras::convert PASSED*"])
    again = pytester.runpytest_subprocess(*args, "--lf", "--junitxml=again.xml", "-n", "2")
    assert _junit_ids(pytester.path / "again.xml") == [(_classname(bad), "parity[cpu]")]
    again.stdout.fnmatch_lines(["*[[]100%[]]*"])  # xdist counts items by id: shared ids stopped it short
    assert again.parseoutcomes().get("failed") == 1 and "passed" not in again.parseoutcomes()


CUSTOM_LAYERS = '''
import keras


@keras.saving.register_keras_serializable(package="tf2cntk_test")
class Scale(keras.layers.Layer):
    def __init__(self, factor=2.0, **kwargs):
        super().__init__(**kwargs)
        self.factor = factor

    def call(self, x):
        return x * self.factor

    def get_config(self):
        return {**super().get_config(), "factor": self.factor}
'''
BUILD_SCALED = '''
import os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
sys.path.insert(0, os.getcwd())
import keras
import custom_layers

keras.utils.set_random_seed(5)
x = keras.Input((4,), name="x")
y = custom_layers.Scale(1.5, name="scale")(keras.layers.Dense(3, bias_initializer="random_normal", name="dense")(x))
keras.Model(x, y).save("scaled.keras")
'''


@pytest.fixture
def custom_layer_project(pytester: pytest.Pytester) -> pytest.Pytester:
    """scaled.keras, whose layer Scale is registered by custom_layers.py beside it (built in a child:
    this process must not import TensorFlow inside pytester's window)."""
    import os
    import subprocess
    import sys

    (pytester.path / "custom_layers.py").write_text(CUSTOM_LAYERS)
    subprocess.run([sys.executable, "-c", BUILD_SCALED], cwd=pytester.path, check=True, capture_output=True,
                   timeout=300, env={**os.environ, "PYTHONPATH": ""})
    return pytester


def test_custom_layers_load_once_their_module_is_imported_in_every_process(
        custom_layer_project: pytest.Pytester) -> None:
    """Without the import the load error names the class and the option (not "re-save the model");
    with [tool.tf2cntk] import both items pass, each in its own xdist worker (each loads the model);
    a module that cannot be imported is one paragraph."""
    args = ("--tf2cntk-model=scaled.keras", *FAST)
    unknown = custom_layer_project.runpytest_subprocess(*args)
    unknown.assert_outcomes(failed=2)
    unknown.stdout.fnmatch_lines([
        "*scaled.keras uses the custom class 'Scale', which Keras does not know: the module that "
        "defines and registers it (@keras.saving.register_keras_serializable()) has not been imported.",
        '*fix: import it before the model loads: --tf2cntk-import=custom_layers (pyproject:*'])
    assert "re-save" not in unknown.stdout.str()
    custom_layer_project.makepyprojecttoml('[tool.tf2cntk]\nimport = ["custom_layers"]\n')
    loaded = custom_layer_project.runpytest_subprocess(*args, "-n", "2", "--dist=each", "-v")
    loaded.assert_outcomes(passed=4)  # --dist=each: convert and parity in both workers
    broken = custom_layer_project.runpytest_subprocess(*args, "--tf2cntk-import=no_such_layers")
    broken.assert_outcomes(failed=2)
    broken.stdout.fnmatch_lines([
        "The module 'no_such_layers' named by --tf2cntk-import (pyproject: [[]tool.tf2cntk[]] "
        "import = [[]\"MODULE\"[]]) could not be imported (ModuleNotFoundError: No module named 'no_such_layers'), "
        "so the model is not loaded.",
        "  fix: install it, or put the directory that holds it on the import path*"])
    assert "Traceback" not in broken.stdout.str()
