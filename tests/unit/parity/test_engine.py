"""The parity engine end to end: real TF, ONNX Runtime and CNTK through the worker."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from pytest_tf2cntk import check_parity
from pytest_tf2cntk.convert.pipeline import convert
from pytest_tf2cntk.parity.reproducer import read_reproducer
from pytest_tf2cntk.parity.result import STAGE_CNTK, STAGE_CONVERTER
from tests.support.paths import FIXTURE_MODELS, FIXTURES, ILL_CONDITIONED

pytestmark = pytest.mark.needs_cntk


@pytest.mark.parametrize("name", sorted(FIXTURE_MODELS) + sorted(ILL_CONDITIONED))
def test_fixture_models_pass_on_cpu(name: str, tmp_path: Path) -> None:
    batch = {**FIXTURE_MODELS, **ILL_CONDITIONED}[name]
    result = check_parity(FIXTURES / name, "cpu", 10, batch=batch, seed=0, reproducer_dir=tmp_path)
    assert result.passed, str(result)
    assert result.examples >= 10
    for check in result.outputs.values():
        # well-conditioned conversions sit well inside; on an ill-conditioned one an example may come
        # near the factor (lstm_chaos: up to 8x its TF32 noise, by CPU): passing is what it must do
        assert check.headroom > 2 or name in ILL_CONDITIONED, str(result)
        assert check.tf_vs_ort is not None and check.ort_vs_cntk is not None  # worst example triaged
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
    assert check.rule == "measured" and check.truth.ratio > check.truth.factor
    assert (f"output 'logits' failed: error {check.scaled_error:.3g} vs the float64 truth is "
            f"{check.truth.ratio:.3g}x the float32 noise {check.truth.noise:.3g} (limit 10x)") in text
    assert "stage: CNTK importer/runtime" in text and "input: image:" in text
    assert result.reproducer and f"tf2cntk replay {result.reproducer}" in text
    rep = read_reproducer(result.reproducer)
    assert set(rep.inputs) == {"image"} and set(rep.tf) == {"logits"}
    assert rep.meta.device == "cpu" and rep.cntk_onnx is not None
    assert rep.meta.verdict["logits"] == check and rep.meta.conversion.batch == 4  # typed, round trip
    # the failure was localized to the node that reads the mutated weight, and confirmed alone
    import onnx

    mutated_graph = onnx.load(str(mutated))
    first_weight = next(t.name for t in mutated_graph.graph.initializer if len(t.dims) >= 2)
    reader = next(n.name for n in mutated_graph.graph.node if first_weight in n.input)
    assert result.localization.culprit.node == reader, text
    assert f"layerwise: culprit {reader}" in text and "confirmed in isolation" in text
    replay = subprocess.run([str(Path(sys.executable).parent / "tf2cntk"), "replay", result.reproducer],
                            capture_output=True, text=True, timeout=300)
    assert replay.returncode == 1, replay.stderr
    assert "still failing" in replay.stdout and "logits" in replay.stdout


def test_known_bad_conversion_fails_with_cntk_stage(tmp_path: Path) -> None:
    result = check_parity(FIXTURES / "quantized.keras", "cpu", 10, batch=4, seed=0, reproducer_dir=tmp_path,
                          repairs="off")  # the raw CNTK defect
    assert not result.passed
    check = result.outputs["y"]
    assert check.stage == STAGE_CNTK
    assert check.scaled_error > 1e3 * check.budget.value
    # Hypothesis shrank the failure to a simple input
    assert result.inputs["x"].startswith("constant")
    assert "Cast" in " ".join(w.op_type for w in result.conversion.warnings)


def test_converter_stage_is_blamed_when_onnx_runtime_disagrees_with_tf(tmp_path: Path, planted_fault) -> None:
    """Make the graph that ONNX Runtime and CNTK share wrong: the converter stage broke."""
    from pytest_tf2cntk.parity.engine import ParityEngine
    from pytest_tf2cntk.parity.options import ParityOptions

    conv = convert(FIXTURES / "mlp.keras", batch=2)
    mutated = planted_fault(conv.onnx_path, 1.01)
    import onnx

    conv._onnx = onnx.load(str(mutated))  # ORT now runs the wrong graph too
    engine = ParityEngine(conv, "cpu", ParityOptions(cntk_onnx=str(mutated)))
    try:
        ev = engine.evaluate({"x": np.linspace(-1, 1, 32, dtype=np.float32).reshape(2, 16)}, with_ort=True)
    finally:
        engine.close()
    assert not ev.passed and ev.checks["probs"].stage == STAGE_CONVERTER


def linear_model(tmp_path: Path) -> Path:
    """Dense(3) without activation: NaN and Inf travel through it by IEEE 754 alone (no op that
    chooses, unlike Relu: TF 2.21's relu(NaN) is NaN on some CPUs and 0 on others)."""
    import keras

    keras.utils.set_random_seed(5)
    inp = keras.Input((6,), name="x")
    path = tmp_path / "linear.keras"
    keras.Model(inp, keras.layers.Dense(3, name="y")(inp)).save(path)
    return path


def _inf_becomes_nan(model: onnx.ModelProto, output: str) -> onnx.ModelProto:
    """The graph with ``output := output + 0 * output``: the same finite numbers, but NaN where
    the output is infinite (0 x Inf is NaN in IEEE 754; CNTK computes it so too)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    producer = next(n for n in out.graph.node if output in n.output)
    producer.output[list(producer.output).index(output)] = "pre"
    out.graph.initializer.append(numpy_helper.from_array(np.array(0.0, np.float32), "zero"))
    out.graph.node.extend([helper.make_node("Mul", ["pre", "zero"], ["nothing"], name="planted_mul"),
                           helper.make_node("Add", ["pre", "nothing"], [output], name="planted_add")])
    return out


def test_nan_positions_must_agree_and_a_converter_gap_is_blamed_on_the_converter(tmp_path: Path) -> None:
    """Forced, not hoped for: the ONNX graph that ONNX Runtime and CNTK both run turns Inf into
    NaN, on an input with one +Inf per row, where TF gives +-Inf."""
    from pytest_tf2cntk.parity.engine import ParityEngine
    from pytest_tf2cntk.parity.options import ParityOptions

    conv = convert(linear_model(tmp_path), batch=2, cache_dir=tmp_path / "cache")
    bad = _inf_becomes_nan(conv.onnx_model, "y")
    path = tmp_path / "inf_to_nan.onnx"
    onnx.save(bad, str(path))
    conv._onnx = bad  # ONNX Runtime runs the same graph: the converter's fault
    engine = ParityEngine(conv, "cpu", ParityOptions(cntk_onnx=str(path)))
    x = np.linspace(-1, 1, 12, dtype=np.float32).reshape(2, 6)
    x[:, 0] = np.inf
    try:
        ev = engine.evaluate({"x": x}, with_ort=True)
    finally:
        engine.close()
    check = ev.checks["y"]
    assert np.isinf(ev.tf["y"]).all() and np.isnan(ev.cntk["y"]).all() and np.isnan(ev.ort["y"]).all()
    assert check.tf_vs_cntk.nan_mismatch == 6 and not check.passed
    assert "6 NaN/Inf element(s) differ" in "; ".join(check.reasons)
    assert check.stage == STAGE_CONVERTER
    assert check.ort_vs_cntk is not None and check.ort_vs_cntk.nan_mismatch == 0  # ORT and CNTK agree


def test_special_patterns_are_the_first_examples_and_agreeing_nan_passes(tmp_path: Path) -> None:
    """With edge values and NaN/Inf asked for, the first examples are each pattern on each input in
    turn, whatever Hypothesis draws next; the linear model propagates them alike everywhere."""
    from pytest_tf2cntk.parity.engine import ParityEngine
    from pytest_tf2cntk.parity.inputs import materialize, special_examples
    from pytest_tf2cntk.parity.options import ParityOptions

    conv = convert(linear_model(tmp_path), batch=2, cache_dir=tmp_path / "cache")
    engine = ParityEngine(conv, "cpu", ParityOptions(max_examples=3, seed=0, edge_values=True, allow_nonfinite=True,
                                                     reproducer_dir=tmp_path))
    seen: list[dict[str, np.ndarray]] = []
    evaluate = engine.evaluate
    engine.evaluate = lambda feeds, with_ort=False: (seen.append(feeds), evaluate(feeds, with_ort))[1]
    try:
        result = engine.run()
    finally:
        engine.close()
    first = [materialize(e, engine.domains) for e in special_examples(engine.domains, True, True)]
    assert len(first) == 7 and result.examples >= 7
    for want, got in zip(first, seen):
        np.testing.assert_array_equal(want["x"], got["x"])  # NaN == NaN here
    assert result.passed, str(result)


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


@pytest.mark.slow
def test_realistic_mobilenet_passes_and_a_planted_fault_is_caught(tmp_path: Path, planted_fault) -> None:
    """MobileNetV2 with calibrated BatchNorm statistics (activations O(1), like a trained net):
    no false alarm on the correct conversion, a 1% weight error in CNTK's graph is caught."""
    from tests.support.zoo import calibrated_model

    path = calibrated_model("mobilenetv2_96")
    ok = check_parity(path, "cpu", 4, batch=1, seed=0, reproducer_dir=tmp_path, layerwise="off")
    assert ok.passed, str(ok)
    conv = convert(path, batch=1)
    bad = check_parity(path, "cpu", 4, batch=1, seed=0, reproducer_dir=tmp_path, layerwise="off",
                       cntk_onnx=planted_fault(conv.onnx_path, 1.01))
    assert not bad.passed and bad.outputs["predictions"].stage == STAGE_CNTK


def test_float_ids_into_an_embedding_are_whole_ids_inside_the_vocabulary(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Keras' default Input dtype is float32; the Embedding casts it: the ids drawn must be ids."""
    from pytest_tf2cntk.parity import engine
    from tests.support.small_models import float_embedding

    fed: list[np.ndarray] = []
    evaluate = engine.ParityEngine.evaluate

    def spy(self, feeds, *args, **kwargs):  # noqa: ANN001, ANN202
        fed.append(np.array(feeds["ids"]))
        return evaluate(self, feeds, *args, **kwargs)

    monkeypatch.setattr(engine.ParityEngine, "evaluate", spy)
    path = float_embedding(tmp_path / "emb.keras", vocab=23)
    result = check_parity(path, "cpu", 10, batch=2, seed=0, reproducer_dir=tmp_path, cache_dir=tmp_path / "c")
    assert result.passed, str(result)
    dom = result.input_domains["ids"]
    assert (dom.kind, dom.dtype, dom.low, dom.high) == ("index", "float32", 0, 23)
    assert len(fed) >= 10 and all(f.dtype == np.float32 and f.shape == (2, 5) for f in fed)
    ids = np.concatenate([f.ravel() for f in fed])
    assert np.array_equal(ids, np.round(ids)) and ids.min() >= 0 and ids.max() <= 22
    assert len(np.unique(ids)) > 5  # spread over the vocabulary, not every id truncated to 0


def test_a_fully_convolutional_model_is_tested_at_the_shape_given(tmp_path: Path) -> None:
    from pytest_tf2cntk.errors import ModelLoadError
    from tests.support.small_models import fully_convolutional

    path = fully_convolutional(tmp_path / "fcn.keras")
    with pytest.raises(ModelLoadError, match="--tf2cntk-input-shape=image:64x64x3"):
        check_parity(path, "cpu", 2, batch=2, cache_dir=tmp_path / "c")
    result = check_parity(path, "cpu", 5, batch=2, seed=0, cache_dir=tmp_path / "c", reproducer_dir=tmp_path,
                          input_shapes={"image": (20, 12, 3)})
    assert result.passed, str(result)
    assert result.input_domains["image"].shape == (2, 20, 12, 3)
    assert result.outputs["heat"].tf_vs_cntk is not None
