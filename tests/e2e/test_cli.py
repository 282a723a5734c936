"""The tf2cntk command in fresh processes: bad input in one paragraph with exit 2, convert, check,
and the commands that must work when the host's heavy packages cannot be imported."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.paths import FIXTURES, ROOT

CLI = str(Path(sys.executable).parent / "tf2cntk")


def run(*args: str, cwd: Path = ROOT, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=300, cwd=cwd,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **env})


def _bad_inputs(tmp: Path) -> dict[str, Path]:
    (tmp / "empty").mkdir()
    trunc = tmp / "trunc.keras"
    trunc.write_bytes((FIXTURES / "mlp.keras").read_bytes()[:300])
    rand_h5 = tmp / "random.h5"
    rand_h5.write_bytes(os.urandom(4096))
    sm = tmp / "randsm"
    sm.mkdir()
    (sm / "saved_model.pb").write_bytes(os.urandom(4096))
    nosig = tmp / "nosig"
    import tensorflow as tf

    class Plain(tf.Module):
        def __init__(self) -> None:
            self.v = tf.Variable(1.0)

    tf.saved_model.save(Plain(), str(nosig))
    return {"missing": tmp / "nope.keras", "empty dir": tmp / "empty", "truncated .keras": trunc,
            "random .h5": rand_h5, "random saved_model.pb": sm, "no signatures": nosig}


EXPECTED = {"missing": "does not exist", "empty dir": "is empty", "truncated .keras": "not a valid .keras",
            "random .h5": "not an HDF5 file", "random saved_model.pb": "could not read the SavedModel",
            "no signatures": "has no signatures"}


def test_bad_inputs_give_one_paragraph_and_exit_2(tmp_path: Path) -> None:
    for label, path in _bad_inputs(tmp_path).items():
        done = run("convert", str(path), "--cache-dir", str(tmp_path / "c"))
        assert done.returncode == 2, (label, done.stderr)
        assert EXPECTED[label] in done.stderr, (label, done.stderr)
        assert "Traceback" not in done.stderr, (label, done.stderr)
        ours = done.stderr[done.stderr.index("tf2cntk convert: error"):]
        assert len(ours.strip().splitlines()) <= 4, (label, ours)


@pytest.mark.needs_cntk
def test_convert_cli_reports_and_loads_in_cntk(tmp_path: Path) -> None:
    out = tmp_path / "cnn.onnx"
    done = run("convert", str(FIXTURES / "cnn_bn.keras"), "--batch", "2", "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert "squeeze_to_reshape" in done.stdout and "cntk      loaded" in done.stdout
    assert out.stat().st_size > 1000


@pytest.mark.needs_cntk
def test_convert_cli_lists_repairs_and_takes_repairs_off(tmp_path: Path) -> None:
    cache = ("--cache-dir", str(tmp_path / "c"))
    on = run("convert", str(FIXTURES / "quantized.keras"), *cache)
    assert on.returncode == 0, on.stderr
    assert "repairs   int_cast_truncation (1)" in on.stdout and "warning" not in on.stdout
    off = run("convert", str(FIXTURES / "quantized.keras"), "--repairs", "off", *cache)
    assert off.returncode == 0 and "repairs   off" in off.stdout and "warning   Cast '" in off.stdout
    assert "warning   warning" not in off.stdout  # the column says it once
    none = run("convert", str(FIXTURES / "mlp.keras"), "--no-load", *cache)
    assert "repairs   none needed" in none.stdout
    bad = run("convert", str(FIXTURES / "mlp.keras"), "--repairs", "maybe", *cache)
    assert bad.returncode == 2 and "must be one of on, off" in bad.stderr and "Traceback" not in bad.stderr


BLOCKED = ("import sys\n"
           "for name in {blocked!r}: sys.modules[name] = None  # importing it now raises ImportError\n"
           "from pytest_tf2cntk.cli import main\n"
           "sys.exit(main({argv!r}))\n")


def run_blocked(argv: list[str], blocked: tuple[str, ...] = ("onnx", "tensorflow", "tf2onnx")) -> subprocess.CompletedProcess:
    """The command in a host where ``blocked`` cannot be imported, as on a broken install."""
    return subprocess.run([sys.executable, "-c", BLOCKED.format(blocked=blocked, argv=argv)], capture_output=True,
                          text=True, timeout=300, cwd=ROOT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})


@pytest.mark.needs_cntk
def test_doctor_and_setup_answer_when_onnx_and_tensorflow_cannot_be_imported() -> None:
    doctor = run_blocked(["doctor"])
    assert doctor.returncode == 1, doctor.stderr
    assert "Traceback" not in doctor.stderr
    lines = doctor.stdout.splitlines()
    assert any(ln.split()[:3] == ["host", "onnx", "MISSING"] for ln in lines), doctor.stdout
    assert any(ln.split()[:3] == ["host", "tensorflow", "MISSING"] for ln in lines), doctor.stdout
    assert any(ln.split()[:2] == ["cntk", "cntk"] and "2.7" in ln for ln in lines), doctor.stdout
    assert "onnx cannot be imported on the host" in doctor.stdout and "pip install onnx" in doctor.stdout
    setup = run_blocked(["setup"])
    assert setup.returncode == 0 and "already set up" in setup.stdout, setup.stdout + setup.stderr
    listed = run_blocked(["--help"])
    assert listed.returncode == 0 and all(c in listed.stdout for c in ("check", "localize", "report"))


def test_a_wrong_value_in_pyproject_is_one_paragraph_with_exit_2(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text("[tool.tf2cntk]\nbatch = 0\n")
    done = run("convert", str(FIXTURES / "mlp.keras"), "--no-load", cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "[tool.tf2cntk] batch: must be >= 1 (got 0)" in done.stderr, done.stderr
    (tmp_path / "pyproject.toml").write_text("[tool.tf2cntk]\nbatchsize = 4\n")
    done = run("convert", str(FIXTURES / "mlp.keras"), "--no-load", cwd=tmp_path)
    assert done.returncode == 2 and "unknown key(s) batchsize" in done.stderr, done.stderr


@pytest.mark.needs_cntk
def test_check_reports_an_unusable_device_as_skipped_never_passed(tmp_path: Path) -> None:
    done = run("check", str(FIXTURES / "mlp.keras"), "--batch", "2", "--max-examples", "2", "--devices", "gpu",
               cwd=tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "gpu: skipped: no GPU visible to TensorFlow" in done.stdout
    assert "nothing was checked" in done.stdout and "PASSED" not in done.stdout
    both = run("check", str(FIXTURES / "mlp.keras"), "--batch", "2", "--max-examples", "2", cwd=tmp_path)
    assert both.returncode == 0, both.stdout + both.stderr
    assert "tf2cntk parity PASSED" in both.stdout and "gpu: skipped" in both.stdout


@pytest.mark.needs_cntk
def test_check_takes_input_shape_and_refuses_a_bad_one_in_one_paragraph(tmp_path: Path) -> None:
    from tests.support.small_models import fully_convolutional

    model = str(fully_convolutional(tmp_path / "fcn.keras"))
    ok = run("check", model, "--input-shape", "image:12x12x3", "--devices", "cpu", "--max-examples", "2",
             cwd=tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "tf2cntk parity PASSED" in ok.stdout
    (tmp_path / "pyproject.toml").write_text("[tool.tf2cntk.input_shapes]\nimage = [12, 12, 4]\n")
    clash = run("convert", model, "--no-load", cwd=tmp_path)
    assert clash.returncode == 2 and "Traceback" not in clash.stderr
    assert "contradicts input 'image'" in clash.stderr and "its axis 3 is fixed at 3, not 4" in clash.stderr
    syntax = run("convert", model, "--no-load", "--input-shape", "image:12x12", "--input-shape", "image:9x9",
                 cwd=tmp_path)
    assert syntax.returncode == 2 and "--input-shape: input 'image' is given two shapes" in syntax.stderr


def _two_runs(path: Path) -> None:
    from pytest_tf2cntk.history import store
    from tests.support.synthetic import make_result, make_run

    for i in range(2):
        store.record_run(path, make_run(i), [make_result("nets/pnet.keras", "cpu", {"prob": 1e-7})])


def test_tag_refuses_to_move_a_tag_without_force(tmp_path: Path) -> None:
    history = ("--history", str(tmp_path / "h.sqlite"))
    _two_runs(tmp_path / "h.sqlite")
    assert run("tag", "1", "release", *history).returncode == 0
    refused = run("tag", "2", "release", *history)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "tag 'release' already names run 1" in refused.stderr, refused.stderr
    assert "tf2cntk tag 2 release --force" in refused.stderr
    assert run("runs", *history).stdout.splitlines()[-1].endswith("release")  # still on run 1 (oldest, last)
    moved = run("tag", "2", "release", "--force", *history)
    assert moved.returncode == 0 and "moved from run 1" in moved.stdout, moved.stdout + moved.stderr
    assert run("runs", *history).stdout.splitlines()[1].endswith("release")  # now on run 2 (newest, first)


def test_report_of_a_model_the_history_does_not_have_is_exit_2_with_a_did_you_mean(tmp_path: Path) -> None:
    history = ("--history", str(tmp_path / "h.sqlite"))
    _two_runs(tmp_path / "h.sqlite")
    out = tmp_path / "r.md"
    typo = run("report", "--model", "nets/pnte.keras", "-o", str(out), *history)
    assert typo.returncode == 2 and "Traceback" not in typo.stderr and not out.exists()
    assert "--model 'nets/pnte.keras' matches no model" in typo.stderr, typo.stderr
    assert "did you mean 'nets/pnet.keras'?" in typo.stderr and "The history has: nets/pnet.keras." in typo.stderr
    part = run("report", "--model", "pnet", "-o", str(out), *history)
    assert part.returncode == 0 and "nets/pnet.keras" in out.read_text(), part.stderr


@pytest.mark.needs_cntk
def test_calibrate_proposes_a_table_that_pytest_applies_to_that_model_only(tmp_path: Path) -> None:
    """Two copies of one model share the output name 'probs': the budget calibrate proposes for
    nets/a.keras decides that model's check ("user budget") and leaves nets/b.keras on the
    measured rule."""
    import json
    import shutil
    import tomllib

    (tmp_path / "nets").mkdir()
    for name in ("a.keras", "b.keras"):
        shutil.copy(FIXTURES / "mlp.keras", tmp_path / "nets" / name)
    (tmp_path / "pyproject.toml").write_text("[tool.tf2cntk]\nbatch = 2\n")
    cache = ("--cache-dir", str(tmp_path / "cache"))
    cal = run("calibrate", "nets/a.keras", "--seeds", "1", "--examples", "3", "--margin", "50", *cache, cwd=tmp_path)
    assert cal.returncode == 0, cal.stdout + cal.stderr
    proposed = tomllib.loads(cal.stdout)["tool"]["tf2cntk"]["budgets"]["models"]["nets/a.keras"]["outputs"]["probs"]
    with (tmp_path / "pyproject.toml").open("a") as f:
        f.write(cal.stdout)  # pasted as calibrate says
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--tf2cntk-model=nets/a.keras",
                           "--tf2cntk-model=nets/b.keras", "--tf2cntk-devices=cpu", "--tf2cntk-max-examples=3",
                           "--tf2cntk-report=report.json", "--tf2cntk-no-history", "--tf2cntk-cache-dir=cache"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    checks = {r["model"]: r["result"]["outputs"]["probs"] for r in json.loads((tmp_path / "report.json").read_text())["results"]}
    assert checks["nets/a.keras"]["rule"] == "user budget", checks["nets/a.keras"]
    assert checks["nets/a.keras"]["budget"]["value"] == proposed
    assert checks["nets/b.keras"]["rule"] != "user budget" and checks["nets/b.keras"]["budget"]["value"] != proposed
