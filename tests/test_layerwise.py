"""Layerwise localization: real TF conversion, ONNX Runtime and CNTK through the worker.

Faults are planted in the ONNX graph given to CNTK only (the way a converter or importer bug
looks); the localizer must name the mutated node, by its own local error, and confirm it alone.
The catalogue of faults (``fault_candidates``) is shared with benchmarks/layerwise.py, which
measures the hit rate over many more of them.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from pytest_tf2cntk.convert import onnx_graph as og
from pytest_tf2cntk.convert.pipeline import Conversion, convert
from pytest_tf2cntk.convert.domains import derive_domains, random_feeds
from pytest_tf2cntk.parity.localize.scan import (CONFIRMED, STATUS_NOT_REACHED, Localization, localize, register_cli,
                                      scaled_error)
from pytest_tf2cntk.parity.metrics import compare

from .conftest import FIXTURES
from .faults import pad_shifts
from .faults import set_attr as _set_attr

# ------------------------------------------------------------------------------------------------
# planted faults (also used by benchmarks/layerwise.py)

KINDS = ("weight x1.01", "weight x1.001", "weight x1.0001", "bias shift", "scale constant x1.01", "Add constant replaced",
         "Clip max", "LeakyRelu alpha", "Relu -> LeakyRelu", "conv pads shift", "conv dilation",
         "transpose perm")


@dataclass
class Fault:
    kind: str
    node: str    # the mutated node: the right answer
    detail: str
    apply: Callable[[onnx.ModelProto], None]

    def planted(self, model: onnx.ModelProto) -> onnx.ModelProto:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        self.apply(copy)
        return copy


def _node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def _set_const(model: onnx.ModelProto, node_name: str, index: int, fn: Callable[[np.ndarray], np.ndarray]) -> None:
    """Replace the constant feeding input ``index`` of one node (a private copy if it is shared)."""
    node = _node(model, node_name)
    old = og.initializers(model)[node.input[index]]
    value = numpy_helper.to_array(old)
    new = np.asarray(fn(value)).astype(value.dtype)
    name = og.unique_name(model, old.name + "_planted")
    model.graph.initializer.append(numpy_helper.from_array(new, name))
    node.input[index] = name


def _signs(key: str, shape: tuple) -> np.ndarray:
    return np.random.default_rng(zlib.crc32(key.encode())).choice([-1.0, 1.0], shape)


def _clip_input_max(model: onnx.ModelProto, feeds: dict[str, np.ndarray], tensors: list[str]) -> dict[str, float]:
    from pytest_tf2cntk.convert import onnxrt

    if not tensors:
        return {}
    sess = onnxrt.session(model, "cpu", extra_outputs=tensors)
    values = sess.run(tensors, {k: feeds[k] for k in og.graph_input_names(model)})
    return {t: float(np.max(v)) for t, v in zip(tensors, values)}


def fault_candidates(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, list[Fault]]:
    """Every fault of each kind that keeps the graph valid (same shapes) and is active on
    ``feeds`` by construction (a Clip's new max is below what its input reaches)."""
    inits = og.initializers(model)
    shapes = og.infer_shapes(model)
    out: dict[str, list[Fault]] = {k: [] for k in KINDS}

    def float_const(name: str, min_rank: int = 0) -> bool:
        t = inits.get(name)
        return t is not None and t.data_type == onnx.TensorProto.FLOAT and len(t.dims) >= min_rank \
            and int(np.prod(t.dims)) > 0

    clips = [n for n in model.graph.node if n.op_type == "Clip" and n.name]
    clip_max = _clip_input_max(model, feeds, [n.input[0] for n in clips])
    for node in model.graph.node:
        name, op = node.name, node.op_type
        if not name:
            continue
        for idx in {"Conv": (1,), "Gemm": (1,), "MatMul": (1,), "Gather": (0,)}.get(op, ()):
            if idx < len(node.input) and float_const(node.input[idx], 2):
                for kind, f in (("weight x1.01", 1.01), ("weight x1.001", 1.001), ("weight x1.0001", 1.0001)):
                    out[kind].append(Fault(kind, name, f"{op} input {idx} x {f}",
                                           lambda m, n=name, i=idx, f=f: _set_const(m, n, i, lambda v: v * f)))
        for idx in {"Conv": (2,), "Gemm": (2,), "Add": (0, 1)}.get(op, ()):
            if idx < len(node.input) and float_const(node.input[idx]):
                def shift(v: np.ndarray, key: str = f"{name}:{idx}") -> np.ndarray:
                    rms = float(np.sqrt(np.mean(np.square(v.astype(np.float64)))))
                    return v + (1e-3 * rms if rms > 1e-6 else 1e-3) * _signs(key, v.shape)
                out["bias shift"].append(Fault("bias shift", name, f"{op} input {idx} += 1e-3 rms x random signs",
                                               lambda m, n=name, i=idx, f=shift: _set_const(m, n, i, f)))
                if op == "Add":
                    def replace(v: np.ndarray) -> np.ndarray:
                        flat = v.reshape(-1)
                        if flat.size > 1 and not np.all(flat == flat[0]):
                            return np.roll(flat, 1).reshape(v.shape)
                        return v * 1.1 + 0.1
                    out["Add constant replaced"].append(Fault(
                        "Add constant replaced", name, f"Add input {idx}: values rolled by one",
                        lambda m, n=name, i=idx: _set_const(m, n, i, replace)))
        if op == "Mul":
            for idx in (0, 1):
                if float_const(node.input[idx]):
                    out["scale constant x1.01"].append(Fault(
                        "scale constant x1.01", name, f"Mul input {idx} x 1.01",
                        lambda m, n=name, i=idx: _set_const(m, n, i, lambda v: v * 1.01)))
        if op == "Clip":
            top = clip_max.get(node.input[0], 0.0)
            hi = og.attr(node, "max", None)
            if hi is not None and top > 0:
                new = float(min(hi, top) * 0.5)
                out["Clip max"].append(Fault("Clip max", name, f"Clip max {hi:g} -> {new:.3g} (input reaches {top:.3g})",
                                             lambda m, n=name, v=new: _set_attr(_node(m, n), "max", v)))
        if op == "LeakyRelu":
            a = og.attr(node, "alpha", 0.01)
            out["LeakyRelu alpha"].append(Fault("LeakyRelu alpha", name, f"alpha {a:g} -> {a * 1.5:g}",
                                                lambda m, n=name, a=a: _set_attr(_node(m, n), "alpha", float(a * 1.5))))
        if op == "Relu":
            def to_leaky(m: onnx.ModelProto, n: str = name) -> None:
                nd = _node(m, n)
                nd.op_type = "LeakyRelu"
                _set_attr(nd, "alpha", 0.01)
            out["Relu -> LeakyRelu"].append(Fault("Relu -> LeakyRelu", name, "Relu -> LeakyRelu(0.01)", to_leaky))
        if op == "Conv":
            pads = list(og.attr(node, "pads", []) or [])
            kernel = list(og.attr(node, "kernel_shape", []) or [])
            strides = list(og.attr(node, "strides", [1] * len(kernel)) or [])
            for new in pad_shifts(pads):  # one pad moved from the end to the start: same shape
                out["conv pads shift"].append(Fault("conv pads shift", name, f"pads {pads} -> {new}",
                                                    lambda m, n=name, p=new: _set_attr(_node(m, n), "pads", p)))
            if kernel and all(s == 1 for s in strides) and any(k > 1 and k % 2 for k in kernel):
                pads0 = pads or [0] * (2 * len(kernel))
                h = len(kernel)
                dil = [2 if k > 1 else 1 for k in kernel]
                newp = [pads0[a] + (kernel[a % h] - 1) // 2 * (dil[a % h] - 1) for a in range(2 * h)]
                if all(k % 2 for k, d in zip(kernel, dil) if d > 1):
                    def dilate(m: onnx.ModelProto, n: str = name, d: list = dil, p: list = newp) -> None:
                        _set_attr(_node(m, n), "dilations", d)
                        _set_attr(_node(m, n), "pads", p)
                    out["conv dilation"].append(Fault("conv dilation", name, f"dilations -> {dil}, pads -> {newp}",
                                                      dilate))
        if op == "Transpose":
            perm = list(og.attr(node, "perm", []))
            oshape = shapes.get(node.output[0])
            if perm and oshape and None not in oshape:
                pairs = [(i, j) for i in range(len(perm)) for j in range(i + 1, len(perm))
                         if oshape[i] == oshape[j] and oshape[i] > 1]
                if pairs:
                    i, j = pairs[0]
                    new = list(perm)
                    new[i], new[j] = new[j], new[i]
                    out["transpose perm"].append(Fault("transpose perm", name, f"perm {perm} -> {new}",
                                                       lambda m, n=name, p=new: _set_attr(_node(m, n), "perm", p)))
    return out


def pick(cands: dict[str, list[Fault]], per_kind: int, seed: str) -> list[Fault]:
    """Up to ``per_kind`` faults of every kind, chosen with a seeded RNG."""
    chosen = []
    for kind in KINDS:
        pool = cands.get(kind, [])
        if pool:
            rng = np.random.default_rng(zlib.crc32(f"{seed}:{kind}".encode()))
            chosen += [pool[i] for i in sorted(rng.choice(len(pool), min(per_kind, len(pool)), replace=False))]
    return chosen


def feeds_for(conv: Conversion, seed: int = 0) -> dict[str, np.ndarray]:
    return random_feeds(derive_domains(conv.onnx_model), np.random.default_rng(seed))


def plant(conv: Conversion, fault: Fault, path: Path) -> Path:
    onnx.save(fault.planted(conv.onnx_model), str(path))
    return path


# ------------------------------------------------------------------------------------------------
# fixtures

FIXTURE_BATCH = 4


@pytest.fixture(scope="module")
def convs() -> dict[str, Conversion]:
    return {name: convert(FIXTURES / f"{name}.keras", batch=1 if name == "lstm" else FIXTURE_BATCH)
            for name in ("mlp", "cnn_bn", "two_io", "text_cnn", "lstm")}


@pytest.fixture(scope="module")
def mobilenet() -> Conversion:
    from .zoo import application_model

    return convert(application_model("mobilenetv2_96"), batch=2)  # the batch test_conversion uses too


# ------------------------------------------------------------------------------------------------
# tests


def test_scaled_error_is_metrics_compare_max_abs_over_rms() -> None:
    rng = np.random.default_rng(3)
    ref = rng.normal(size=(4, 50)).astype(np.float32)
    got = (ref + rng.normal(scale=1e-5, size=ref.shape)).astype(np.float32)
    m = compare(ref, got)
    assert scaled_error(ref, got) == pytest.approx(m.max_abs / m.ref_scale, rel=1e-12)
    ref[0, 0] = got[0, 0] = np.nan  # agreeing NaNs are fine, disagreeing ones are infinitely wrong
    assert np.isfinite(scaled_error(ref, got))
    got[0, 1] = np.inf
    assert scaled_error(ref, got) == float("inf")
    assert scaled_error(ref, got[:, :10]) == float("inf")


@pytest.mark.parametrize("name", ["mlp", "cnn_bn", "two_io", "text_cnn", "lstm"])
def test_correct_conversions_blame_nothing(convs: dict[str, Conversion], name: str) -> None:
    loc = localize(convs[name], feeds_for(convs[name]))
    assert loc.culprit is None, str(loc)
    assert loc.checked == loc.total == len(convs[name].onnx_model.graph.node)
    assert not loc.unmapped, str(loc)
    assert all(n.ratio is not None and n.ratio < 0.5 for n in loc.nodes), loc.table(50)
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
        fault = fault_candidates(conv.onnx_model, feeds)[kind][index]
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


def test_mobilenetv2_clean_then_planted(mobilenet: Conversion, tmp_path: Path) -> None:
    feeds = feeds_for(mobilenet)
    clean = localize(mobilenet, feeds)
    assert clean.culprit is None, str(clean)
    assert clean.checked == clean.total and not clean.unmapped
    assert clean.memory["chunks"] >= 2 and clean.memory["peak_held_mb"] < clean.memory["all_intermediates_mb"]
    cands = fault_candidates(mobilenet.onnx_model, feeds)
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
    conv = convert(FIXTURES / "quantized.keras", batch=4)
    loc = localize(conv, feeds_for(conv))
    assert loc.culprit is not None and loc.culprit.op_type == "Cast", str(loc)
    assert loc.confirmation.status == CONFIRMED
    text = str(loc)
    assert f"culprit {loc.culprit.node} (Cast)" in text and "confirmed in isolation" in text
    rows = loc.history_rows()
    assert {"model", "device", "node", "op_type", "tf_layer", "local_error", "budget"} <= set(rows[0])


def test_time_budget_stops_early_with_a_note(convs: dict[str, Conversion]) -> None:
    loc = localize(convs["cnn_bn"], feeds_for(convs["cnn_bn"]), time_budget_s=1e-9)
    assert loc.stopped_early.startswith(f"stopped after {loc.checked} of {loc.total} nodes (time budget")
    assert loc.checked < loc.total and loc.culprit is None
    assert all(n.status == STATUS_NOT_REACHED for n in loc.nodes[loc.checked:])
    assert loc.stopped_early in str(loc)


def test_cli_localize_reads_a_parity_reproducer(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from pytest_tf2cntk import check_parity

    conv = convert(FIXTURES / "cnn_bn.keras", batch=4)
    fault = fault_candidates(conv.onnx_model, feeds_for(conv))["weight x1.001"][1]
    mutated = plant(conv, fault, tmp_path / "mutated.onnx")
    result = check_parity(FIXTURES / "cnn_bn.keras", "cpu", 3, batch=4, seed=0, cntk_onnx=mutated,
                          reproducer_dir=tmp_path)
    assert not result.passed and result.reproducer
    mutated.unlink()  # the reproducer carries the CNTK-bound graph itself
    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers())
    report = tmp_path / "localize.json"
    args = parser.parse_args(["localize", str(FIXTURES / "cnn_bn.keras"), "--input", result.reproducer,
                              "--json", str(report)])
    assert args.func(args) == 1
    out = capsys.readouterr().out
    assert f"culprit {fault.node} (Conv)" in out and "confirmed in isolation" in out
    data = json.loads(report.read_text())
    assert data["culprit"]["node"] == fault.node and data["nodes"][0]["mapping"]
    # the correct graph: nothing to blame, exit 0
    args = parser.parse_args(["localize", str(FIXTURES / "cnn_bn.keras"), "--batch", "4", "--seed", "1"])
    assert args.func(args) == 0
    assert "no node exceeds its own budget" in capsys.readouterr().out


def test_report_table_and_json_shape(convs: dict[str, Conversion], tmp_path: Path) -> None:
    conv = convs["two_io"]
    feeds = feeds_for(conv)
    fault = fault_candidates(conv.onnx_model, feeds)["weight x1.01"][0]
    loc: Localization = localize(conv, feeds, cntk_onnx=plant(conv, fault, tmp_path / "m.onnx"))
    table = loc.table(limit=3).splitlines()
    assert table[0].split()[:4] == ["#", "node", "op", "type"] and table[1].startswith("*")
    assert len(table) == 5 and table[-1].startswith("...")
    data = loc.to_json()
    assert data["culprit"]["node"] == fault.node and data["table"] == loc.table()
    for key in ("local_error", "budget", "ratio", "status", "tf_layer", "op_type", "mapping"):
        assert key in data["nodes"][0]
    json.dumps(data)
