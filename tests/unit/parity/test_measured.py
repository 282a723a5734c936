"""The measured verdict on real models: a correct ill-conditioned conversion passes where the
composed budget alone fails it; a x(1+1e-3) weight error in a well-conditioned deep network fails
where the composed budget alone passes it; a converter fault is attributed to the converter.
Each case is forced on explicit inputs and judged both ways on the same evaluation."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from pytest_tf2cntk import check_parity
from pytest_tf2cntk.convert.pipeline import Conversion, convert
from pytest_tf2cntk.parity.engine import ParityEngine
from pytest_tf2cntk.parity.inputs import InputRecipe, materialize
from pytest_tf2cntk.parity.options import ParityOptions
from pytest_tf2cntk.parity.result import RULE_BUDGET, RULE_MEASURED, RULE_RUN, STAGE_CNTK, STAGE_CONVERTER, OutputCheck
from tests.support.faults import scale_weight
from tests.support.paths import FIXTURES

pytestmark = pytest.mark.needs_cntk


def budget_alone_passes(check: OutputCheck) -> bool:
    """What the composed a-priori budget says of the same evaluation."""
    t = check.tf_vs_cntk
    return t.shape_ok and not t.nan_mismatch and t.scaled_error <= check.budget.value


def evaluate(conv: Conversion, feeds: list[dict[str, np.ndarray]], **options: object) -> list:
    engine = ParityEngine(conv, "cpu", ParityOptions(**options))
    try:
        return [engine.evaluate(f, with_ort=True) for f in feeds]
    finally:
        engine.close()


def uniform_inputs(conv: Conversion, n: int) -> list[dict[str, np.ndarray]]:
    from pytest_tf2cntk.convert.domains import derive_domains

    doms = derive_domains(conv.onnx_model)
    return [materialize({k: InputRecipe("uniform", seed, 0.0, 1.0, "none", 0.0) for k in doms}, doms)
            for seed in range(n)]


def test_a_correct_ill_conditioned_model_passes_where_the_composed_budget_fails() -> None:
    """spectrogram_cnn: a log-magnitude front end, whose stop-band bins carry ~1e-2 rounding in
    float32 (fixtures/README.md). TF32 itself is ~1e-4 from the float64 truth."""
    conv = convert(FIXTURES / "spectrogram_cnn.keras", batch=1)
    evs = evaluate(conv, uniform_inputs(conv, 6))
    logits = [ev.checks["logits"] for ev in evs]
    assert all(c.rule == RULE_MEASURED and c.passed for c in logits), [c.reasons for c in logits]
    assert not all(budget_alone_passes(c) for c in logits), [c.tf_vs_cntk.scaled_error for c in logits]
    assert max(c.truth.tf32 for c in logits) > 1e-5  # the model really is noisy in float32
    result = check_parity(FIXTURES / "spectrogram_cnn.keras", "cpu", 10, batch=1, seed=0, layerwise="off",
                          conversion=conv)
    assert result.passed, str(result)
    assert result.reference.startswith("float64 twin: Keras model rebuilt in float64")


@pytest.mark.slow
def test_a_small_weight_error_in_a_deep_network_fails_where_the_composed_budget_passes(tmp_path: Path) -> None:
    """ResNet50 (weights=None): its composed budget is ~2e-3, its real float32 noise ~1e-7; one
    Conv weight x1.001 on the CNTK side moves the output ~2e-5: 200x the noise."""
    from tests.support.zoo import application_model

    conv = convert(application_model("resnet50_64"), batch=1)
    mutated = onnx.load(str(conv.onnx_path))
    scale_weight(mutated, 1.001, min_rank=4)
    path = tmp_path / "resnet_mutated.onnx"
    onnx.save(mutated, str(path))
    evs = evaluate(conv, uniform_inputs(conv, 2), cntk_onnx=str(path))
    for ev in evs:
        check = ev.checks["predictions"]
        assert not check.passed and check.stage == STAGE_CNTK, check.reasons
        assert check.truth.ratio > 2 * check.truth.factor
        assert budget_alone_passes(check), (check.tf_vs_cntk.scaled_error, check.budget.value)


def test_a_converter_fault_is_attributed_to_the_converter(tmp_path: Path) -> None:
    """The graph ONNX Runtime and CNTK share has one weight x1.001: the converted graph itself,
    evaluated in float64, is then far from the truth, and CNTK matches ONNX Runtime."""
    conv = convert(FIXTURES / "cnn_bn.keras", batch=4)
    mutated = onnx.load(str(conv.onnx_path))
    scale_weight(mutated, 1.001)
    path = tmp_path / "shared.onnx"
    onnx.save(mutated, str(path))
    conv._onnx = mutated  # ONNX Runtime and the float64 graph now run the wrong graph too
    conv._graph64 = {}
    ev = evaluate(conv, uniform_inputs(conv, 1), cntk_onnx=str(path))[0]
    check = ev.checks["logits"]
    assert not check.passed and check.stage == STAGE_CONVERTER, (check.reasons, check.truth)
    assert check.truth.converter_wrong and check.truth.graph > check.truth.close


def test_without_a_twin_the_verdict_is_the_labelled_a_priori_budget(tmp_path: Path) -> None:
    result = check_parity(FIXTURES / "quantized.keras", "cpu", 3, batch=4, seed=0, reference="off",
                          reproducer_dir=tmp_path, layerwise="off", repairs="off")  # the raw CNTK defect
    check = result.outputs["y"]
    assert check.rule == RULE_BUDGET and result.reference == "none: --tf2cntk-reference=off"
    text = str(result)
    assert "a-priori budget" in text and "(no float64 truth: none: --tf2cntk-reference=off)" in text


def test_the_known_cntk_bug_fails_by_the_measured_rule_too(tmp_path: Path) -> None:
    result = check_parity(FIXTURES / "quantized.keras", "cpu", 3, batch=4, seed=0, reproducer_dir=tmp_path,
                          layerwise="off", repairs="off")  # the raw CNTK defect
    check = result.outputs["y"]
    assert not result.passed and check.rule == RULE_MEASURED and check.stage == STAGE_CNTK
    assert check.truth.ratio > 1e4 and "vs the float64 truth" in str(result)


def test_a_twin_from_the_converted_graph_is_labelled_and_judges_the_converter_by_the_budget(tmp_path: Path) -> None:
    """When only the converted ONNX can be evaluated in float64, the verdict says so; ONNX Runtime is
    then the noise, and the converter leg (TF vs ONNX Runtime) is judged by the a-priori budget."""
    from pytest_tf2cntk.convert.twin.build import build_twin
    from pytest_tf2cntk.convert.twin.core import ROUTE_ONNX

    conv = convert(FIXTURES / "mlp.keras", batch=2)
    conv._twin = build_twin(conv, routes=(ROUTE_ONNX,))
    assert conv._twin and not conv._twin.independent
    ev = evaluate(conv, uniform_inputs(conv, 1))[0]
    check = ev.checks["probs"]
    assert check.passed and check.rule == RULE_MEASURED and not check.truth.independent
    assert "inherits converter bugs" in check.truth.reference and check.truth.ort32 is not None


def scale_output(model: onnx.ModelProto, factor: float) -> None:
    """CNTK's graph computes its first output times ``factor`` (a Mul appended to it)."""
    out = model.graph.output[0].name
    producer = next(n for n in model.graph.node if out in n.output)
    producer.output[list(producer.output).index(out)] = out + "_unscaled"
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array([factor], np.float32), "output_scale"))
    model.graph.node.append(onnx.helper.make_node("Mul", [out + "_unscaled", "output_scale"], [out]))


def test_a_systematic_error_within_each_examples_factor_fails_over_the_run(tmp_path: Path) -> None:
    """CNTK's probabilities x(1 + 48u): 6 units of the floor on every example (the floor bounds
    mlp's noise from below), inside the per-example factor 10 by construction, and more than the
    run-level factor on most examples: the run-level rule fails it, reported on the example with
    the largest ratio, blamed on CNTK; the replay of that example fails by the same rule against
    the run recorded at failure time."""
    from pytest_tf2cntk.parity.replay import replay
    from pytest_tf2cntk.parity.truth import NOISE_FACTOR, RUN_FACTOR

    conv = convert(FIXTURES / "mlp.keras", batch=4)
    mutated = onnx.load(str(conv.onnx_path))
    scale_output(mutated, 1.0 + 48 * 2.0 ** -24)
    path = tmp_path / "scaled.onnx"
    onnx.save(mutated, str(path))
    result = check_parity(FIXTURES / "mlp.keras", "cpu", 20, batch=4, seed=0, cntk_onnx=str(path),
                          reproducer_dir=tmp_path, layerwise="off", conversion=conv)
    check = result.outputs["probs"]
    assert not result.passed and check.rule == RULE_RUN and check.stage == STAGE_CNTK, str(result)
    assert check.truth.passed and check.truth.ratio < NOISE_FACTOR  # the reported example alone passes
    assert check.run.complete and check.run.examples >= 10 and RUN_FACTOR < check.run.median < NOISE_FACTOR
    assert check.truth.ratio == max(check.run.ratios)  # reported on the example with the largest ratio
    assert "a systematic error" in str(result) and result.reproducer
    again = replay(result.reproducer).outputs["probs"]
    assert not again.passed and again.rule == RULE_RUN


def test_a_correct_model_passes_the_run_rule_with_room(tmp_path: Path) -> None:
    result = check_parity(FIXTURES / "mlp.keras", "cpu", 20, batch=4, seed=0, reproducer_dir=tmp_path,
                          layerwise="off")
    run = result.outputs["probs"].run
    assert result.passed and run.applies and run.median < 1, run
