"""One node alone: as a one-node ONNX model in ONNX Runtime (a node's local reference, its
condition number) and in CNTK (confirming a culprit in isolation)."""
from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from pytest_tf2cntk.parity.localize.graph import GraphFacts, to_dtype
from pytest_tf2cntk.parity.localize.report import CONFIRMED, NOT_REPRODUCED, Confirmation, NodeReport
from pytest_tf2cntk.parity.metrics import scaled_error
from pytest_tf2cntk.parity.runners import cached_ort
from pytest_tf2cntk.parity.truth import error_vs_truth

# ops whose output is a sum of products of their inputs: their rounding error scales with the
# magnitude of the terms, so the budget gets the node's condition number (see ``condition``)
LINEAR_ACCUMULATING = {"Conv", "ConvTranspose", "MatMul", "Gemm", "AveragePool", "GlobalAveragePool",
                       "ReduceSum", "ReduceMean", "Sum"}


@dataclass
class NodeInputs:
    """The values a node was checked on: data inputs (CNTK's where observable) and constants."""

    inputs: dict[str, np.ndarray]
    consts: dict[str, np.ndarray]
    local: dict[str, np.ndarray] = field(default_factory=dict)  # ONNX Runtime's node-alone outputs
    truth: dict[str, np.ndarray] = field(default_factory=dict)  # the node alone in float64
    cntk: dict[str, np.ndarray] = field(default_factory=dict)  # CNTK's values of its outputs in the graph
    cntk_error: str = ""  # CNTK could not compute the node in the graph: why


def one_node_model(node: onnx.NodeProto, data: dict[str, np.ndarray], consts: dict[str, np.ndarray],
                   out_types: dict[str, int], opsets: Iterable[onnx.OperatorSetIdProto],
                   ir_version: int, list_initializers: bool = False) -> onnx.ModelProto:
    """``node`` alone: data inputs as graph inputs (shaped like the values), constants as
    initializers, outputs typed as in the full graph."""
    inputs, inits = [], []
    for name in dict.fromkeys(i for i in node.input if i):
        if name in data:
            v = data[name]
            inputs.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(v.dtype),
                                                        list(v.shape)))
        else:
            v = np.asarray(consts[name])
            inits.append(numpy_helper.from_array(v, name))
            if list_initializers:
                inputs.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(v.dtype),
                                                            list(v.shape)))
    outputs = [helper.make_tensor_value_info(o, out_types.get(o, onnx.TensorProto.FLOAT), None)
               if o in out_types else onnx.ValueInfoProto(name=o) for o in node.output if o]
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    graph = helper.make_graph([copy], f"one_node_{node.op_type}", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=list(opsets), producer_name="tf2cntk-layerwise")
    model.ir_version = ir_version
    return model


def run_alone(node: onnx.NodeProto, values: NodeInputs, ref: GraphFacts, device: str,
              outputs: list[str] | None = None) -> dict[str, np.ndarray]:
    """The node alone in ONNX Runtime on ``values`` (its local reference)."""
    model = one_node_model(node, values.inputs, values.consts, ref.types, ref.model.opset_import,
                           ref.model.ir_version)
    return cached_ort(model, device).run(values.inputs, outputs)


def run_alone_float64(node: onnx.NodeProto, values: NodeInputs, ref: GraphFacts) -> dict[str, np.ndarray] | None:
    """The node alone in float64 on ``values`` (its truth); None where it cannot be evaluated so
    (the node is then judged by its a-priori budget)."""
    from pytest_tf2cntk.convert.onnx_graph import opset_version
    from pytest_tf2cntk.convert.twin.onnx64 import one_node_float64

    try:
        return one_node_float64(node, values.inputs, values.consts, opset_version(ref.model))
    except Exception:
        return None


def condition(node: onnx.NodeProto, values: NodeInputs, out: np.ndarray, tensor: str, ref: GraphFacts,
              device: str) -> float:
    """kappa = rms(|node|(|inputs|)) / rms(node(inputs)) for accumulating ops, else 1.

    A sum's rounding error is bounded relative to the magnitudes it adds, not to its result
    (|fl(sum) - sum| <= gamma_K * sum|terms|): where the terms cancel (a depthwise conv on a
    smooth image, say) a correct implementation's error is kappa times larger relative to
    the result. The node's budget is scaled by kappa, computed by running the node alone on
    the absolute values of its inputs and constants."""
    if node.op_type not in LINEAR_ACCUMULATING or out.dtype.kind != "f":
        return 1.0
    absolute = NodeInputs({k: np.abs(v) for k, v in values.inputs.items()},
                          {k: np.abs(v) if np.issubdtype(np.asarray(v).dtype, np.floating) else v
                           for k, v in values.consts.items()})
    try:
        mags = np.abs(run_alone(node, absolute, ref, device, [tensor])[tensor]).astype(np.float64)
    except Exception:
        return 1.0
    denom = math.sqrt(float(np.mean(np.square(out.astype(np.float64)))))
    num = math.sqrt(float(np.mean(np.square(mags))))
    if not (denom > 0 and math.isfinite(num)):
        return 1.0
    return max(1.0, num / denom)


def confirm_culprit(culprit: NodeReport, saved: NodeInputs | None, cg: GraphFacts, worker: Any,
                    device: str) -> Confirmation:
    """The culprit alone, as a one-node ONNX model, in CNTK and in ONNX Runtime, on CNTK's inputs."""
    if saved is None:
        return Confirmation("not run: the culprit's inputs were not kept")
    node = cg.by_name.get(culprit.node)
    if node is None:
        return Confirmation("not run: the culprit is not in the CNTK-bound graph by name")
    consts = dict(saved.consts)
    for i in node.input:  # the CNTK-bound graph's own constants (it may differ from the reference)
        if i and i not in saved.inputs:
            if i in cg.consts:
                consts[i] = cg.consts[i]
            elif i not in consts:
                return Confirmation(f"not run: input {i} of the CNTK-bound node has no value")
    model = one_node_model(node, saved.inputs, consts, cg.types, cg.model.opset_import,
                           min(cg.model.ir_version or 4, 4), list_initializers=True)
    try:
        got = _cntk_alone(model, saved.inputs, worker, device)
    except Exception as exc:
        message = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        if saved.cntk_error:
            return Confirmation(CONFIRMED, detail=f"CNTK fails on the node alone too: {message}")
        return Confirmation(NOT_REPRODUCED, detail=f"CNTK could not run the node alone: {message}")
    if saved.cntk_error:
        return Confirmation(NOT_REPRODUCED, detail="CNTK computes the node alone but not inside the graph")
    return _judge_alone(culprit, saved, got)


def _cntk_alone(model: onnx.ModelProto, inputs: dict[str, np.ndarray], worker: Any,
                device: str) -> dict[str, np.ndarray]:
    with tempfile.TemporaryDirectory(prefix="tf2cntk-localize-") as tmp:
        path = Path(tmp) / "culprit.onnx"
        onnx.save(model, str(path))
        loaded = worker.load(str(path), device=device)
        try:
            feeds = {i.name: to_dtype(inputs[i.name], np.dtype(i.dtype)) for i in loaded.inputs if i.name in inputs}
            return worker.eval(loaded, feeds)
        finally:
            try:
                worker.unload(loaded)
            except Exception:
                pass


def _judge_alone(culprit: NodeReport, saved: NodeInputs, got: dict[str, np.ndarray]) -> Confirmation:
    """CNTK alone against the node's reference (the float64 node under the measured rule, else
    ONNX Runtime alone), by the culprit's own limit."""
    errs, in_graph = [], []
    reference = saved.truth or saved.local
    for t, ref_v in reference.items():
        if t not in got:
            continue
        v = to_dtype(got[t], saved.local[t].dtype if t in saved.local else ref_v.dtype)
        if v.shape != ref_v.shape and [d for d in v.shape if d != 1] == [d for d in ref_v.shape if d != 1]:
            v = v.reshape(ref_v.shape)
        errs.append(error_vs_truth(ref_v, v) if saved.truth else scaled_error(ref_v, v))
        if t in saved.cntk:
            in_graph.append(scaled_error(saved.cntk[t], v) if np.any(saved.cntk[t]) else 0.0)
    if not errs:
        return Confirmation(NOT_REPRODUCED, detail="CNTK returned none of the node's outputs")
    err = max(errs)
    status = CONFIRMED if culprit.budget is not None and err > culprit.budget else NOT_REPRODUCED
    detail = "" if status == CONFIRMED else ("CNTK computes the node correctly alone: the error comes "
                                             "from how it runs inside the graph (fusion, layout, "
                                             "or an input the mapping did not see)")
    if status != CONFIRMED and in_graph and culprit.budget is not None and max(in_graph) > culprit.budget:
        detail += ("; the value read for it in the graph is not what CNTK computes for it alone: "
                   "check the mapping of its output (JSON report, nodes[].mapping)")
    return Confirmation(status, err, culprit.budget, max(in_graph) if in_graph else None, detail)


def node_diff(ref_node: onnx.NodeProto, cnode: onnx.NodeProto, ref_consts: dict[str, np.ndarray],
              cg_consts: dict[str, np.ndarray]) -> str:
    """What differs between a node of the converted graph and its namesake in the CNTK-bound one."""
    out = []
    if ref_node.op_type != cnode.op_type:
        out.append(f"op {ref_node.op_type} -> {cnode.op_type}")
    ra = {a.name: helper.get_attribute_value(a) for a in ref_node.attribute}
    ca = {a.name: helper.get_attribute_value(a) for a in cnode.attribute}
    for k in sorted(set(ra) | set(ca)):
        if ra.get(k) != ca.get(k):
            out.append(f"attribute {k} {ra.get(k)!r} -> {ca.get(k)!r}")
    for j, (a, b) in enumerate(zip(ref_node.input, cnode.input)):
        if a in ref_consts and b in cg_consts:
            va, vb = ref_consts[a], cg_consts[b]
            if va.shape != vb.shape or not np.array_equal(va, vb):
                out.append(f"constant input {j} ({a})")
    return "; ".join(out)
