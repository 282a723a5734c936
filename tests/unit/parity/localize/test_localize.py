"""Layerwise localization: real TF conversion, ONNX Runtime and CNTK through the worker.

Faults are planted in the ONNX graph given to CNTK only (the way a converter or importer bug
looks); the localizer must name the mutated node, by its own local error, and confirm it alone.
The catalogue of faults (``tests.support.faults.localization_faults``) is shared with
benchmarks/layerwise.py, which measures the hit rate over many more of them.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import onnx
import pytest
from onnx import helper

from pytest_tf2cntk.convert.pipeline import Conversion, convert
from pytest_tf2cntk.parity.localize.report import CONFIRMED, STATUS_NOT_REACHED, Localization
from pytest_tf2cntk.parity.localize.scan import localize
from tests.support.faults import feeds_for, localization_faults
from tests.support.paths import FIXTURES

pytestmark = pytest.mark.needs_cntk


def plant(conv: Conversion, fault, path: Path) -> Path:
    return fault.save(conv.onnx_model, path)


# ------------------------------------------------------------------------------------------------
# fixtures

FIXTURE_BATCH = 4


@pytest.fixture(scope="module")
def convs() -> dict[str, Conversion]:
    return {name: convert(FIXTURES / f"{name}.keras", batch=1 if name in ("lstm", "spectrogram_cnn") else FIXTURE_BATCH)
            for name in ("mlp", "cnn_bn", "two_io", "text_cnn", "lstm", "spectrogram_cnn")}


@pytest.fixture(scope="module")
def mobilenet() -> Conversion:
    from tests.support.zoo import application_model

    return convert(application_model("mobilenetv2_96"), batch=2)  # the batch test_conversion uses too


# ------------------------------------------------------------------------------------------------
# tests


@pytest.mark.parametrize("name", ["mlp", "cnn_bn", "two_io", "text_cnn", "lstm", "spectrogram_cnn"])
def test_correct_conversions_blame_nothing(convs: dict[str, Conversion], name: str) -> None:
    loc = localize(convs[name], feeds_for(convs[name]))
    assert loc.culprit is None, str(loc)
    assert loc.checked == loc.total == len(convs[name].onnx_model.graph.node)
    assert not loc.unmapped, str(loc)
    assert all(n.ratio is not None and n.ratio < 0.5 for n in loc.nodes), loc.table(50)
    # each node against itself in float64, by ONNX Runtime's own error on CNTK's inputs
    assert [n.node for n in loc.nodes if n.rule != "measured"] == [], loc.table(50)
    assert "no node exceeds its own budget" in str(loc)


def test_mapping_is_recorded_per_tensor(convs: dict[str, Conversion]) -> None:
    rules = {}
    for name in ("mlp", "cnn_bn", "lstm"):
        loc = localize(convs[name], feeds_for(convs[name]))
        for n in loc.nodes:
            for m in n.mapping:
                if not m.mapped:  # an LSTM's Y_h, Y_c: read by nothing, exposed by nothing
                    assert n.op_type == "LSTM" and m.onnx.endswith((":1", ":2")), m.describe()
                    continue
                assert m.cntk_uid and m.axis_order.startswith("ONNX"), m.describe()
                rules.setdefault((name, n.op_type), m.rule)
        data = json.loads(json.dumps(loc.to_json()))
        assert data["nodes"][0]["mapping"][0]["cntk_uid"]
    # CNTK drops Gemm names: found by structure; CNTK adds a Conv's bias in a separate Plus; an
    # LSTM becomes anonymous sequence functions: the value its consumer reads in its place
    assert rules[("mlp", "Gemm")].startswith("structure")
    assert rules[("cnn_bn", "Conv")].startswith("name") and "Plus" in rules[("cnn_bn", "Conv")]
    assert rules[("lstm", "LSTM")].startswith("consumer input")
    assert rules[("mlp", "Relu")].startswith("name")


def test_unnamed_node_is_unmapped_and_its_consumer_says_so(convs: dict[str, Conversion], tmp_path: Path) -> None:
    model = onnx.ModelProto()
    model.CopyFrom(convs["mlp"].onnx_model)
    relu = next(n for n in model.graph.node if n.op_type == "Relu")
    relu.name = ""
    path = tmp_path / "unnamed.onnx"
    onnx.save(model, str(path))
    conv = dataclasses.replace(convs["mlp"], onnx_path=path, _onnx=None)
    loc = localize(conv, feeds_for(conv))
    assert loc.culprit is None, str(loc)
    node = next(n for n in loc.nodes if n.op_type == "Relu")
    assert node.status.startswith("unmapped: unnamed ONNX node"), node.status
    consumer = next(n for n in loc.nodes if n.index == node.index + 1)
    assert consumer.inputs_from_ort == [relu.output[0]] and consumer.status == "ok"
    assert "from ONNX Runtime" in " ".join(consumer.notes)
    # a fault in the unobservable node shows up in its consumer, which is blamed with a caution
    relu.op_type = "LeakyRelu"
    relu.attribute.append(helper.make_attribute("alpha", 0.01))
    onnx.save(model, str(tmp_path / "unnamed_leaky.onnx"))
    loc = localize(conv, feeds_for(conv), cntk_onnx=tmp_path / "unnamed_leaky.onnx")
    assert loc.culprit is not None and loc.culprit.index == consumer.index, str(loc)
    assert len(loc.suspects) == 2 and loc.suspects[0] == consumer.node
    assert "caution: input(s)" in str(loc) and "the error may belong to an upstream node" in str(loc)


PLANTED = [  # (fixture, kind, index among that kind's candidates)
    ("mlp", "weight x1.001", 1), ("mlp", "bias shift", 0), ("mlp", "Relu -> LeakyRelu", 0),
    ("cnn_bn", "weight x1.01", 0), ("cnn_bn", "Add constant replaced", 1), ("cnn_bn", "conv pads shift", 0),
    ("cnn_bn", "conv dilation", 1), ("cnn_bn", "transpose perm", 0), ("cnn_bn", "scale constant x1.01", 0),
    ("two_io", "weight x1.001", 2), ("two_io", "Relu -> LeakyRelu", 1), ("two_io", "bias shift", 3),
    ("text_cnn", "weight x1.01", 0), ("text_cnn", "bias shift", 1), ("text_cnn", "conv dilation", 0),
]


def test_planted_faults_are_localized_to_the_mutated_node(convs: dict[str, Conversion], tmp_path: Path) -> None:
    hits, rows = 0, []
    for k, (name, kind, index) in enumerate(PLANTED):
        conv = convs[name]
        feeds = feeds_for(conv)
        fault = localization_faults(conv.onnx_model, feeds)[kind][index]
        loc = localize(conv, feeds, cntk_onnx=plant(conv, fault, tmp_path / f"planted{k}.onnx"))
        hit = loc.culprit is not None and loc.culprit.node == fault.node
        hits += hit
        rows.append(f"{'hit ' if hit else 'MISS'} {name:8} {kind:22} {fault.node} -> "
                    f"{loc.culprit.node if loc.culprit else None}")
        assert hit, f"{name} {kind} {fault.detail} at {fault.node}:\n{loc}"
        assert loc.confirmation is not None and loc.confirmation.status == CONFIRMED, str(loc)
        assert loc.culprit.ratio > 1
        # CNTK has no dilated convolution on CPU: the node it cannot compute is the culprit
        assert loc.culprit.metrics is not None or "not yet implemented" in " ".join(loc.culprit.notes)
        assert loc.culprit.tf_layer and loc.culprit.tf_op
    print(f"\nlayerwise hit rate on fixtures: {hits}/{len(PLANTED)}\n" + "\n".join(rows))


@pytest.mark.slow
def test_mobilenetv2_clean_then_planted(mobilenet: Conversion, tmp_path: Path) -> None:
    feeds = feeds_for(mobilenet)
    clean = localize(mobilenet, feeds)
    assert clean.culprit is None, str(clean)
    assert clean.checked == clean.total and not clean.unmapped
    assert clean.memory["chunks"] >= 2 and clean.memory["peak_held_mb"] < clean.memory["all_intermediates_mb"]
    cands = localization_faults(mobilenet.onnx_model, feeds)
    for kind, index in (("Clip max", 3), ("conv pads shift", 5), ("weight x1.001", 40)):
        fault = cands[kind][index]
        loc = localize(mobilenet, feeds, cntk_onnx=plant(mobilenet, fault, tmp_path / "mnv2.onnx"),
                       stop_at_culprit=True)
        assert loc.culprit is not None and loc.culprit.node == fault.node, f"{kind} at {fault.node}:\n{loc}"
        assert loc.confirmation.status == CONFIRMED, str(loc)
        assert loc.culprit.tf_layer.split(" ")[0] in fault.node


def test_tensors_are_streamed_in_chunks_and_released(convs: dict[str, Conversion]) -> None:
    conv = convs["cnn_bn"]
    whole = localize(conv, feeds_for(conv), chunk=1000)
    streamed = localize(conv, feeds_for(conv), chunk=1)
    assert whole.memory["chunks"] == 1 and streamed.memory["chunks"] == whole.total == 14
    # one node's tensors per side, plus what later nodes still read
    assert streamed.memory["peak_held_mb"] < whole.memory["all_intermediates_mb"] / 3, streamed.memory
    assert whole.memory["peak_held_mb"] == pytest.approx(whole.memory["all_intermediates_mb"], rel=0.05)
    assert [n.local_error for n in streamed.nodes] == [n.local_error for n in whole.nodes]


def test_real_cntk_bug_is_named_and_confirmed() -> None:
    """quantized.keras is a known-bad conversion (CNTK 2.7 mis-imports Cast): found without planting."""
    conv = convert(FIXTURES / "quantized.keras", batch=4, repairs="off")  # the raw CNTK defect
    loc = localize(conv, feeds_for(conv))
    assert loc.culprit is not None and loc.culprit.op_type == "Cast", str(loc)
    assert loc.confirmation.status == CONFIRMED
    text = str(loc)
    assert f"culprit {loc.culprit.node} (Cast)" in text and "confirmed in isolation" in text
    rows = loc.layer_rows()
    assert rows and rows[0].model == loc.model and any(r.culprit and r.op_type == "Cast" for r in rows)


def test_time_budget_stops_early_with_a_note(convs: dict[str, Conversion]) -> None:
    loc = localize(convs["cnn_bn"], feeds_for(convs["cnn_bn"]), time_budget_s=1e-9)
    assert loc.stopped_early.startswith(f"stopped after {loc.checked} of {loc.total} nodes (time budget")
    assert loc.checked < loc.total and loc.culprit is None
    assert all(n.status == STATUS_NOT_REACHED for n in loc.nodes[loc.checked:])
    assert loc.stopped_early in str(loc)


def test_cli_localize_reads_a_parity_reproducer(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from pytest_tf2cntk import check_parity

    conv = convert(FIXTURES / "cnn_bn.keras", batch=4)
    fault = localization_faults(conv.onnx_model, feeds_for(conv))["weight x1.001"][1]
    mutated = plant(conv, fault, tmp_path / "mutated.onnx")
    result = check_parity(FIXTURES / "cnn_bn.keras", "cpu", 3, batch=4, seed=0, cntk_onnx=mutated,
                          reproducer_dir=tmp_path)
    assert not result.passed and result.reproducer
    mutated.unlink()  # the reproducer carries the CNTK-bound graph itself
    from pytest_tf2cntk.cli import main

    report = tmp_path / "localize.json"
    assert main(["localize", str(FIXTURES / "cnn_bn.keras"), "--input", result.reproducer, "--json", str(report)]) == 1
    out = capsys.readouterr().out
    assert f"culprit {fault.node} (Conv)" in out and "confirmed in isolation" in out
    data = json.loads(report.read_text())
    assert data["culprit"]["node"] == fault.node and data["nodes"][0]["mapping"]
    assert Localization.from_json(data).culprit.node == fault.node  # typed, round trip
    # the correct graph: nothing to blame, exit 0
    assert main(["localize", str(FIXTURES / "cnn_bn.keras"), "--batch", "4", "--seed", "1"]) == 0
    assert "no node exceeds its own budget" in capsys.readouterr().out


def test_report_table_and_json_shape(convs: dict[str, Conversion], tmp_path: Path) -> None:
    conv = convs["two_io"]
    feeds = feeds_for(conv)
    fault = localization_faults(conv.onnx_model, feeds)["weight x1.01"][0]
    loc: Localization = localize(conv, feeds, cntk_onnx=plant(conv, fault, tmp_path / "m.onnx"))
    table = loc.table(limit=3).splitlines()
    assert table[0].split()[:4] == ["#", "node", "op", "type"] and table[1].startswith("*")
    assert len(table) == 5 and table[-1].startswith("...")
    data = loc.to_json()
    assert data["culprit"]["node"] == fault.node and data["summary"] == loc.summary()
    assert Localization.from_json(json.loads(json.dumps(data))) == loc
    for key in ("local_error", "budget", "ratio", "status", "tf_layer", "op_type", "mapping"):
        assert key in data["nodes"][0]
    json.dumps(data)
