"""The pytest plugin end to end, in fresh pytest processes (pytester.runpytest_subprocess)."""
from __future__ import annotations

import json
import re
import shutil
import xml.etree.ElementTree as ET

import pytest

from tests.support.paths import FIXTURES

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.needs_cntk
QUIET = ("-p", "no:cacheprovider", "--tf2cntk-max-examples=5")
RAW = "--tf2cntk-repairs=off"  # quantized.keras keeps CNTK's Cast defect: the known-bad conversion


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    """A user project with copies of a few fixture models (stable, short node ids)."""
    for name in ("mlp.keras", "two_io.keras", "quantized.keras", "gru.keras"):
        shutil.copy(FIXTURES / name, pytester.path / name)
    return pytester


def test_model_option_alone_collects_convert_and_parity_items(project: pytest.Pytester) -> None:
    result = project.runpytest_subprocess("--tf2cntk-model=mlp.keras", "--tf2cntk-batch=2", "-v", *QUIET)
    result.assert_outcomes(passed=2, skipped=1)
    result.stdout.fnmatch_lines([
        "mlp.keras::convert PASSED*",
        "mlp.keras::parity?cpu? PASSED*",
        "mlp.keras::parity?gpu? SKIPPED*",
        "*tf2cntk parity summary*",
        "model*device*output*error*float32 noise*ratio*allowed*rule*examples*verdict",
        "mlp.keras*cpu*probs*measured*PASS",
        "mlp.keras*gpu*skipped: no GPU visible to TensorFlow*",
    ])
    assert "ERROR" not in result.stdout.str()  # an unusable device is a skip, one row, not an error
    assert result.ret == 0


def test_ini_option_pyproject_tables_and_selection(project: pytest.Pytester) -> None:
    project.makepyprojecttoml("""
        [tool.pytest.ini_options]
        tf2cntk_models = ["mlp.keras"]
        tf2cntk_devices = "cpu"
        tf2cntk_batch = "2"

        [tool.tf2cntk.inputs]
        x = [0.0, 0.25]
    """)
    project.makepyfile(test_user="def test_plain():\n    assert True\n")
    result = project.runpytest_subprocess("-p", "no:cacheprovider", "--tf2cntk-report=report.json", "-v")
    result.assert_outcomes(passed=3)  # convert, parity[cpu], the user's own test
    report = json.loads((project.path / "report.json").read_text())
    (check,) = report["results"]
    assert check["device"] == "cpu" and check["result"]["input_domains"]["x"]["high"] == 0.25
    from pytest_tf2cntk.history.records import RunReport

    typed = RunReport.from_json(report)  # the report reads back as typed records
    assert typed.results[0].result.input_domains["x"].high == 0.25 and typed.passed
    only = project.runpytest_subprocess("-p", "no:cacheprovider", "-k", "convert")
    only.assert_outcomes(passed=1, deselected=2)


def test_user_tests_with_fixtures_marker_and_assert_parity(project: pytest.Pytester) -> None:
    project.makepyfile(test_mine='''
        import numpy as np
        import pytest
        from hypothesis import given, settings, HealthCheck, strategies as st
        from pytest_tf2cntk import assert_parity


        @pytest.mark.tf2cntk(model="mlp.keras", inputs={"x": (0.0, 0.5)})
        def test_passes(tf2cntk_model):
            result = assert_parity(tf2cntk_model, "cpu", max_examples=5)
            assert result.input_domains["x"].high == 0.5
            feeds = {"x": np.full((1, 16), 0.25, np.float32)}
            np.testing.assert_allclose(tf2cntk_model.run_cntk(feeds)["probs"],
                                       tf2cntk_model.run_tf(feeds)["probs"], rtol=1e-5)
            assert tf2cntk_model.onnx.graph.output[0].name == "probs"


        @pytest.mark.tf2cntk(model="mlp.keras")
        @settings(max_examples=5, suppress_health_check=list(HealthCheck), deadline=None)
        @given(data=st.data())
        def test_strategy(tf2cntk_model, data):
            feeds = data.draw(tf2cntk_model.inputs_strategy())
            assert feeds["x"].shape == (1, 16) and feeds["x"].min() >= -1


        @pytest.mark.tf2cntk(model="quantized.keras")
        def test_fails_readably(tf2cntk_model):
            assert_parity(tf2cntk_model, "cpu", max_examples=5)
    ''')
    result = project.runpytest_subprocess("-p", "no:cacheprovider", RAW)
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["*ParityFailure: tf2cntk parity FAILED*quantized.keras on cpu*",
                                 "*output 'y' failed: error * vs the float64 truth is *x the float32 noise *",
                                 "*stage: CNTK importer/runtime*", "*replay: tf2cntk replay*"])
    assert "__tracebackhide__" not in result.stdout.str()
    assert "def assert_parity" not in result.stdout.str()  # the helper's frame is hidden


def test_failing_model_gives_exit_1_and_a_readable_failure(project: pytest.Pytester) -> None:
    result = project.runpytest_subprocess("--tf2cntk-model=quantized.keras", "--tf2cntk-devices=cpu",
                                          "--junitxml=junit.xml", RAW, *QUIET)
    assert result.ret == 1
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([
        "*_ parity?cpu? _*",
        "tf2cntk parity FAILED: *quantized.keras on cpu*",
        "output*error*TF32 noise*ORT32 noise*ratio*allowed*rule*",
        "output 'y' failed: error * vs the float64 truth is *x the float32 noise * (limit 10x)",
        "  truth: float64 twin: Keras model rebuilt in float64*errors vs it: TF32 *, ONNX Runtime *, CNTK *",
        "*stage: CNTK importer/runtime (ONNX -> CNTK)*",
        "input: x: constant*",
        "reproducer: *.npz",
        "*replay: tf2cntk replay *.npz",
        "*quantized.keras*cpu*y*FAIL (CNTK importer/runtime*",
    ])
    props = {p.get("name"): p.get("value") for p in ET.parse(project.path / "junit.xml").iter("property")}
    assert props["tf2cntk_passed"] == "False" and float(props["tf2cntk_y_scaled_error"]) > 0.01
    assert props["tf2cntk_y_rule"] == "measured" and float(props["tf2cntk_y_noise_ratio"]) > 1e4
    assert props["tf2cntk_reproducer"].endswith(".npz")


def test_repairs_make_quantized_pass_and_off_shows_the_raw_cntk_defect(project: pytest.Pytester) -> None:
    args = ("--tf2cntk-model=quantized.keras", "--tf2cntk-devices=cpu", "--junitxml=junit.xml",
            "--tf2cntk-report=report.json", "--tf2cntk-history=h.sqlite", "-rP", *QUIET)
    repaired = project.runpytest_subprocess(*args)
    repaired.assert_outcomes(passed=2)
    repaired.stdout.fnmatch_lines(["*tf2cntk conversion*", "repairs   int_cast_truncation (1)",
                                   "*quantized.keras*cpu*y*PASS*"])
    props = [(p.get("name"), p.get("value")) for p in ET.parse(project.path / "junit.xml").iter("property")]
    assert ("tf2cntk_convert_repairs", "int_cast_truncation (1)") in props
    assert ("tf2cntk_repairs", "int_cast_truncation (1)") in props
    report = json.loads((project.path / "report.json").read_text())
    used = report["conversions"][0]["repairs"][0]
    assert used["name"] == "int_cast_truncation" and "ORT max |diff| 0" in used["proof"] and used["defect"]
    assert report["results"][0]["result"]["conversion"]["repairs"][0]["name"] == "int_cast_truncation"
    from pytest_tf2cntk.history.frame import load_history

    assert load_history(project.path / "h.sqlite")["repairs"].tolist() == ['["int_cast_truncation"]']

    raw = project.runpytest_subprocess(*args, RAW)  # exactly today's failure
    assert raw.ret == 1
    raw.assert_outcomes(passed=1, failed=1)
    raw.stdout.fnmatch_lines(["tf2cntk parity FAILED: *quantized.keras on cpu*",
                              "*stage: CNTK importer/runtime (ONNX -> CNTK)*", "repairs   off",
                              "*quantized.keras*cpu*y*FAIL (CNTK importer/runtime*"])
    assert load_history(project.path / "h.sqlite")["repairs"].tolist()[-1] == "[]"


def test_conversion_failure_fails_parity_items_with_its_message(project: pytest.Pytester) -> None:
    # with repairs on gru.keras converts (issue 13); off, it is the "unsupported op" example still
    result = project.runpytest_subprocess("--tf2cntk-model=gru.keras", "--tf2cntk-devices=cpu",
                                          "--tf2cntk-repairs=off", *QUIET)
    assert result.ret == 1
    result.assert_outcomes(failed=2, errors=0)
    result.stdout.fnmatch_lines(["*gru.keras: 1 node(s) CNTK 2.7 cannot import correctly:*",
                                 "*error: Loop 'gru*CNTK cannot import control flow*"])
    assert "INTERNALERROR" not in result.stdout.str()


def test_graph_cntk_cannot_run_fails_convert_at_the_batch_under_test(project: pytest.Pytester) -> None:
    """A graph that passes validation but that CNTK cannot run (a dilated Conv2D on the CPU) fails
    ::convert, at batch 4, with one paragraph; the parity item gives the same paragraph, not
    CNTK's text from inside a search, and the run's summary and JSON report carry the failure."""
    import subprocess
    import sys

    from tests.support.paths import ROOT

    # built in a child: TensorFlow must not be imported into this process inside pytester's window
    subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; from tests.support.keras_models "
                    "import dilated_conv; dilated_conv(Path(sys.argv[1]))", str(project.path)],
                   cwd=ROOT, check=True, capture_output=True, timeout=300)
    result = project.runpytest_subprocess("--tf2cntk-model=dilated_conv.keras", "--tf2cntk-batch=4",
                                          "--tf2cntk-devices=cpu", "--tf2cntk-report=r.json", "-v", *QUIET)
    assert result.ret == 1
    result.assert_outcomes(failed=2)
    paragraph = ["CNTK 2.7 cannot run the converted graph of *dilated_conv.keras at batch 4 on cpu: "
                 "Dilated convolution on CPU is not yet implemented.",
                 "  fix: replace the layer CNTK rejects, or convert at another batch or opset; the graph CNTK "
                 "was given is *.onnx"]
    result.stdout.fnmatch_lines(["dilated_conv.keras::convert FAILED*", "dilated_conv.keras::parity?cpu? FAILED*",
                                 "*_ convert _*", *paragraph, "*_ parity?cpu? _*", *paragraph,
                                 "*dilated_conv.keras*cpu*ERROR (CNTKLoadError): CNTK 2.7 cannot run the converted graph*"])
    out = result.stdout.str()
    assert "Traceback" not in out and "CALL STACK" not in out and "Falsifying" not in out
    report = json.loads((project.path / "r.json").read_text())
    (conversion,) = report["conversions"]
    assert conversion["ok"] is False and conversion["type"] == "CNTKLoadError" and not report["passed"]


def test_xdist_two_workers_one_merged_summary_and_report(project: pytest.Pytester) -> None:
    result = project.runpytest_subprocess("-n", "2", "--tf2cntk-model=mlp.keras", "--tf2cntk-model=two_io.keras",
                                          "--tf2cntk-report=merged.json", "--tf2cntk-devices=cpu", *QUIET)
    result.assert_outcomes(passed=4)
    out = result.stdout.str()
    assert out.count("tf2cntk parity summary") == 1
    result.stdout.fnmatch_lines(["*mlp.keras*cpu*probs*PASS", "*two_io.keras*cpu*probs*PASS",
                                 "*two_io.keras*cpu*score*PASS"])
    report = json.loads((project.path / "merged.json").read_text())
    assert sorted(r["model"] for r in report["results"]) == ["mlp.keras", "two_io.keras"]
    assert sorted(c["model"] for c in report["conversions"]) == ["mlp.keras", "two_io.keras"]


def test_help_shows_every_option_with_its_default(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("--help")
    out = result.stdout.str()
    from pytest_tf2cntk.options import PYTEST_OPTIONS

    for option in PYTEST_OPTIONS:
        assert (option.flag if option.name != "models" else "--tf2cntk-model") in out
    result.stdout.fnmatch_lines(["*--tf2cntk-devices=LIST*", "*(default: cpu,gpu; ini: tf2cntk_devices)*"])


def test_missing_model_path_is_a_usage_error(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("--tf2cntk-model=no/such/model.keras")
    assert result.ret == 4
    result.stderr.fnmatch_lines(["*pytest-tf2cntk: model path *no/such/model.keras does not exist*"])


def test_github_step_summary_is_written(project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    summary = project.path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    project.runpytest_subprocess("--tf2cntk-model=mlp.keras", "--tf2cntk-devices=cpu", *QUIET).assert_outcomes(passed=2)
    text = summary.read_text()
    assert "## tf2cntk parity" in text and "| mlp.keras | cpu | 1 | probs |" in text


def test_history_records_runs_and_drift_fails_within_budget(project: pytest.Pytester) -> None:
    """Runs land in the history; a CNTK-bound graph whose error grows many times but stays within
    budget fails with --tf2cntk-fail-on-drift."""
    test = """
        import pytest
        from pytest_tf2cntk import assert_parity

        @pytest.mark.tf2cntk(model="mlp.keras")
        def test_mlp(tf2cntk_model):
            assert_parity(tf2cntk_model, "cpu", max_examples=5, seed=1, cntk_onnx={onnx!r})
    """
    project.makepyfile(test_drift=test.format(onnx=None))
    args = ("-p", "no:cacheprovider", "--junitxml=j.xml")
    project.runpytest_subprocess(*args).assert_outcomes(passed=1)
    project.runpytest_subprocess(*args).assert_outcomes(passed=1)
    from pytest_tf2cntk import load_history
    from pytest_tf2cntk.convert.pipeline import convert

    frame = load_history(project.path / ".tf2cntk" / "history.sqlite")
    assert sorted(frame["run_id"].unique()) == [1, 2] and set(frame["output"]) == {"probs"}

    import onnx

    from tests.support.faults import scale_weight

    graph = onnx.load(str(convert(project.path / "mlp.keras").onnx_path))
    scale_weight(graph, 1 + 1e-6)  # a small conversion error, within the budget
    onnx.save(graph, str(project.path / "drifted.onnx"))
    project.makepyfile(test_drift=test.format(onnx=str(project.path / "drifted.onnx")))
    result = project.runpytest_subprocess(*args, "--tf2cntk-fail-on-drift=3")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*tf2cntk parity PASSED*", "*error drift beyond --tf2cntk-fail-on-drift=3:*",
                                 "*probs*"])


def test_last_failed_and_exitfirst_select_model_items(project: pytest.Pytester) -> None:
    args = ("--tf2cntk-model=mlp.keras", "--tf2cntk-model=quantized.keras", "--tf2cntk-devices=cpu", RAW,
            "--tf2cntk-max-examples=3", "--tf2cntk-no-history")
    project.runpytest_subprocess(*args).assert_outcomes(passed=3, failed=1)
    again = project.runpytest_subprocess(*args, "--lf", "-v")
    assert again.parseoutcomes().get("failed") == 1 and "passed" not in again.parseoutcomes()
    again.stdout.fnmatch_lines(["quantized.keras::parity?cpu? FAILED*"])
    first = project.runpytest_subprocess(*args, "-x", "-p", "no:cacheprovider")
    first.assert_outcomes(passed=3, failed=1)  # mlp's items sort first; -x stops after the failure


def test_fully_convolutional_model_needs_and_takes_a_fixed_input_shape(pytester: pytest.Pytester) -> None:
    from tests.support.small_models import built_apart

    built_apart("fully_convolutional", pytester.path / "fcn.keras")
    args = ("--tf2cntk-model=fcn.keras", "--tf2cntk-devices=cpu", "--tf2cntk-batch=2", *QUIET)
    refused = pytester.runpytest_subprocess(*args)
    refused.assert_outcomes(failed=2)
    refused.stdout.fnmatch_lines([
        "*Input 'image' has free dimensions besides the batch ([[]None, None, None, 3[]], batch first)*",
        "*fix: set them for the test with --tf2cntk-input-shape=image:64x64x3*"])
    assert "Traceback" not in refused.stdout.str()
    passed = pytester.runpytest_subprocess(*args, "--tf2cntk-input-shape=image:16x16x3", "-v")
    passed.assert_outcomes(passed=2)
    passed.stdout.fnmatch_lines(["fcn.keras::convert PASSED*", "*fcn.keras*cpu*heat*PASS*"])
    pytester.makepyprojecttoml("[tool.tf2cntk.input_shapes]\nimage = [16, 16]\n")
    wrong = pytester.runpytest_subprocess(*args)
    wrong.assert_outcomes(failed=2)
    wrong.stdout.fnmatch_lines(["*The input shape image:16x16 (--tf2cntk-input-shape / "
                                "[[]tool.tf2cntk.input_shapes[]]) gives 2 dimension(s), but input 'image'*"])
    bad = pytester.runpytest_subprocess(*args, "--tf2cntk-input-shape=image=16x16x3")
    assert bad.ret == 4
    bad.stderr.fnmatch_lines(["*pytest-tf2cntk: --tf2cntk-input-shape: 'image=16x16x3' is not NAME:SHAPE*"])


def test_tensorflow_start_up_lines_are_in_no_output_nor_captured_stderr(project: pytest.Pytester,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """With no TF_CPP_MIN_LOG_LEVEL set (as a user's shell has it), TF's C++ start-up lines
    ("oneDNN custom operations are on", absl's "All log messages before absl::InitializeLog()")
    appear neither on the terminal nor in any test's captured stderr (-rA prints every one)."""
    from pytest_tf2cntk.tf_import import is_chatter

    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    project.makepyfile(test_mine="""
        import sys

        def test_writes_stderr(tf2cntk_model):
            sys.stderr.write("mine on stderr\\n")  # this section must show, and only this
    """)
    project.makeini("[pytest]\ntf2cntk_models = mlp.keras\n")
    result = project.runpytest_subprocess("-rA", "--tf2cntk-devices=cpu", "--tf2cntk-no-history", *QUIET)
    result.assert_outcomes(passed=3)
    text = result.stdout.str() + result.stderr.str()
    assert "Captured stderr call" in text and "mine on stderr" in text  # captured stderr is printed
    assert not [line for line in text.splitlines() if is_chatter(line)], text
    assert "oneDNN" not in text and "absl" not in text and "cuDNN factory" not in text, text


@pytest.mark.needs_cntk
def test_check_and_pytest_judge_a_model_by_the_same_project_tables(pytester: pytest.Pytester) -> None:
    """An impossible budget for probs in [tool.tf2cntk.budgets] (the a-priori rule, so the budget
    decides) and an input range: `tf2cntk check` fails the model as the parity item does, by
    that budget, on inputs drawn from that range (#12 item 16)."""
    from tests.e2e.test_cli import run

    shutil.copy(FIXTURES / "mlp.keras", pytester.path / "mlp.keras")
    pytester.makepyprojecttoml("[tool.tf2cntk]\nreference = 'off'\n[tool.tf2cntk.budgets.outputs]\nprobs = 1e-30\n"
                               "[tool.tf2cntk.inputs]\nx = [0.25, 0.5]\n")
    cli = run("check", "mlp.keras", "--devices", "cpu", "--max-examples", "2", cwd=pytester.path)
    plugin = pytester.runpytest_subprocess("--tf2cntk-model=mlp.keras", "--tf2cntk-devices=cpu", *QUIET)
    plugin.assert_outcomes(passed=1, failed=1)
    assert cli.returncode == 1, cli.stdout + cli.stderr
    for out in (cli.stdout, plugin.stdout.str()):
        assert "output 'probs' failed: scaled error" in out and "> user budget 1e-30" in out, out
        drawn = re.search(r"input: x: (?:constant (\S+)|\w+ in \[([^,]+), ([^\]]+)\])", out)
        assert drawn, out
        assert all(0.25 <= float(v) <= 0.5 for v in drawn.groups() if v), drawn.group(0)
