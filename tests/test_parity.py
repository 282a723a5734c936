"""The parity engine end to end: real TF, ONNX Runtime and CNTK through the worker."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pytest_tf2cntk import check_parity
from pytest_tf2cntk.convert.pipeline import convert
from pytest_tf2cntk.parity.engine import STAGE_CNTK, STAGE_CONVERTER
from pytest_tf2cntk.parity.reproducer import read_reproducer

from .conftest import FIXTURE_MODELS, FIXTURES


@pytest.mark.parametrize("name", sorted(FIXTURE_MODELS))
def test_fixture_models_pass_on_cpu(name: str, tmp_path: Path) -> None:
    result = check_parity(FIXTURES / name, "cpu", 10, batch=FIXTURE_MODELS[name], seed=0,
                          reproducer_dir=tmp_path)
    assert result.passed, str(result)
    assert result.examples >= 10
    for check in result.outputs.values():
        assert check.headroom > 2, str(result)  # correct conversions sit well inside the budget
        assert check.converter is not None and check.importer is not None  # worst example triaged
    assert not list(tmp_path.iterdir())  # no reproducer for a pass


def test_planted_fault_is_caught_named_and_replayable(tmp_path: Path, planted_fault) -> None:
    conv = convert(FIXTURES / "cnn_bn.keras", batch=4)
    mutated = planted_fault(conv.onnx_path, 1.001)  # a 0.1% weight error, as a converter bug makes
    result = check_parity(FIXTURES / "cnn_bn.keras", "cpu", 10, batch=4, seed=0, cntk_onnx=mutated,
                          reproducer_dir=tmp_path)
    assert not result.passed
    text = str(result)
    check = result.outputs["logits"]
    assert check.stage == STAGE_CNTK  # only CNTK got the mutated graph
    assert f"output 'logits' failed: scaled error {check.error:.3g} > budget {check.budget.value:.3g}" in text
    assert "stage: CNTK importer/runtime" in text and "input: image:" in text
    assert result.reproducer and f"tf2cntk replay {result.reproducer}" in text
    meta, groups = read_reproducer(result.reproducer)
    assert set(groups["input"]) == {"image"} and set(groups["tf"]) == {"logits"}
    assert meta["device"] == "cpu" and "cntk_onnx" in groups
    # the failure was localized to the node that reads the mutated weight, and confirmed alone
    import onnx

    mutated_graph = onnx.load(str(mutated))
    first_weight = next(t.name for t in mutated_graph.graph.initializer if len(t.dims) >= 2)
    reader = next(n.name for n in mutated_graph.graph.node if first_weight in n.input)
    assert result.localization["culprit"]["node"] == reader, text
    assert f"layerwise: culprit {reader}" in text and "confirmed in isolation" in text
    replay = subprocess.run([str(Path(sys.executable).parent / "tf2cntk"), "replay", result.reproducer],
                            capture_output=True, text=True, timeout=300)
    assert replay.returncode == 1, replay.stderr
    assert "still failing" in replay.stdout and "logits" in replay.stdout


def test_known_bad_conversion_fails_with_cntk_stage(tmp_path: Path) -> None:
    result = check_parity(FIXTURES / "quantized.keras", "cpu", 10, batch=4, seed=0, reproducer_dir=tmp_path)
    assert not result.passed
    check = result.outputs["y"]
    assert check.stage == STAGE_CNTK
    assert check.error > 1e3 * check.budget.value
    # Hypothesis shrank the failure to a simple input
    assert result.inputs["x"].startswith("constant")
    assert "Cast" in " ".join(w["op_type"] for w in result.conversion["warnings"])


def test_converter_stage_is_blamed_when_onnx_runtime_disagrees_with_tf(tmp_path: Path, planted_fault) -> None:
    """Make the graph that ONNX Runtime and CNTK share wrong: the converter stage broke."""
    from pytest_tf2cntk.parity.engine import ParityEngine

    conv = convert(FIXTURES / "mlp.keras", batch=2)
    mutated = planted_fault(conv.onnx_path, 1.01)
    import onnx

    conv._onnx = onnx.load(str(mutated))  # ORT now runs the wrong graph too
    engine = ParityEngine(conv, "cpu", cntk_onnx=str(mutated))
    try:
        ev = engine.evaluate({"x": np.linspace(-1, 1, 32, dtype=np.float32).reshape(2, 16)}, with_ort=True)
    finally:
        engine.close()
    assert not ev.passed and ev.checks["probs"].stage == STAGE_CONVERTER


def test_nan_policy_finds_tf_and_onnx_disagree_on_relu_of_nan(tmp_path: Path) -> None:
    """NaN/Inf only when asked, and then positions must match exactly. TF's Relu maps NaN to 0
    while ONNX Runtime and CNTK propagate it: a real TF->ONNX semantic gap, blamed on the converter."""
    result = check_parity(FIXTURES / "mlp.keras", "cpu", 15, batch=2, seed=3, allow_nonfinite=True,
                          edge_values=True, reproducer_dir=tmp_path)
    assert not result.passed
    check = result.outputs["probs"]
    assert check.target.nan_mismatch > 0 and "NaN/Inf element(s) differ" in str(result)
    assert check.stage == STAGE_CONVERTER
    assert check.importer is not None and check.importer.nan_mismatch == 0  # ORT and CNTK agree
    assert "nonfinite" in result.inputs["x"]


def test_gpu_is_unavailable_with_an_exact_reason() -> None:
    from pytest_tf2cntk.errors import DeviceUnavailable

    with pytest.raises(DeviceUnavailable, match="no GPU visible to TensorFlow"):
        check_parity(FIXTURES / "mlp.keras", "gpu", 2)


def test_result_json_is_complete() -> None:
    result = check_parity(FIXTURES / "two_io.keras", "cpu", 5, batch=2, seed=1)
    data = result.to_json()
    assert set(data["outputs"]) == {"score", "probs"}
    probs = data["outputs"]["probs"]
    assert {"scaled_error", "budget", "headroom", "stage", "tf_vs_cntk", "tf_vs_ort", "ort_vs_cntk"} <= set(probs)
    assert probs["tf_vs_cntk"]["top1_agreement"] == 1.0
    assert data["versions"]["cntk"].startswith("2.7")
    assert data["input_domains"]["image"]["low"] == -1.0  # default float range


def test_realistic_mobilenet_passes_and_a_planted_fault_is_caught(tmp_path: Path, planted_fault) -> None:
    """MobileNetV2 with calibrated BatchNorm statistics (activations O(1), like a trained net):
    no false alarm on the correct conversion, a 1% weight error in CNTK's graph is caught."""
    from .zoo import calibrated_model

    path = calibrated_model("mobilenetv2_96")
    ok = check_parity(path, "cpu", 4, batch=1, seed=0, reproducer_dir=tmp_path, layerwise="off")
    assert ok.passed, str(ok)
    conv = convert(path, batch=1)
    bad = check_parity(path, "cpu", 4, batch=1, seed=0, reproducer_dir=tmp_path, layerwise="off",
                       cntk_onnx=planted_fault(conv.onnx_path, 1.01))
    assert not bad.passed and bad.outputs["predictions"].stage == STAGE_CNTK
