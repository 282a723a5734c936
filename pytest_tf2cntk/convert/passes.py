"""CNTK compatibility passes: small, named rewrites of what tf2onnx emits into what CNTK imports.

Every pass must preserve semantics. ``run_passes`` proves it: the graph runs in ONNX Runtime
before and after each pass that changed something, on random inputs inside each input's domain,
and an unequal result raises ``PassMismatch`` (a bug in the pass) instead of changing the model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
from onnx import helper

from pytest_tf2cntk.codec import Jsonable
from pytest_tf2cntk.convert import onnx_graph as og
from pytest_tf2cntk.convert.domains import derive_domains, random_feeds
from pytest_tf2cntk.errors import PassMismatch

_FOLD_LIMIT = 1 << 24  # never materialize folded constants bigger than this many elements
_NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                     "Multinomial"}


@dataclass(frozen=True)
class PassRecord(Jsonable):
    name: str
    changed: int
    proof: str  # how it was checked, e.g. "ORT max |diff| 0 on 2 inputs"


def constants_to_initializers(model: onnx.ModelProto) -> int:
    """Constant nodes -> initializers: CNTK's importer and the other passes see them as weights."""
    keep, changed = [], 0
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            tensor = onnx.TensorProto()
            tensor.CopyFrom(node.attribute[0].t)
            tensor.name = node.output[0]
            model.graph.initializer.append(tensor)
            changed += 1
        else:
            keep.append(node)
    if changed:
        set_nodes(model, keep)
    return changed


def fold_constants(model: onnx.ModelProto) -> int:
    """Evaluate nodes whose inputs are all known, and Shape/Size of statically shaped tensors.

    With the batch fixed, tf2onnx's shape subgraphs (Shape -> Gather -> Concat -> Reshape) become
    constants, which CNTK needs: it has no Shape op and wants Reshape's shape as an initializer.
    """
    from onnx.reference import ReferenceEvaluator

    consts = og.constant_values(model)
    shapes = og.infer_shapes(model)
    opset = og.opset_version(model)
    graph_outputs = {o.name for o in model.graph.output}
    keep, changed = [], 0
    for node in og.topo_nodes(model):
        value: list[np.ndarray] | None = None
        if graph_outputs.intersection(node.output):
            pass  # a graph output must stay computed by a node
        elif node.op_type == "Shape" and _static(shapes.get(node.input[0])):
            value = [np.array(shapes[node.input[0]], dtype=np.int64)]
        elif node.op_type == "Size" and _static(shapes.get(node.input[0])):
            value = [np.array(int(np.prod(shapes[node.input[0]])), dtype=np.int64)]
        elif (node.domain in ("", "ai.onnx") and node.op_type not in _NONDETERMINISTIC
              and node.input and all(i in consts for i in node.input if i)
              and not list(og.iter_subgraphs(node))):
            single = helper.make_model(
                helper.make_graph([node], "fold", [], [onnx.ValueInfoProto(name=o) for o in node.output],
                                  [og.make_initializer(i, consts[i]) for i in node.input if i]),
                opset_imports=[helper.make_opsetid("", opset)])
            try:
                value = list(ReferenceEvaluator(single).run(None, {}))
            except Exception:
                value = None  # leave it to the runtime rather than guess
        if value is not None and all(np.asarray(v).size <= _FOLD_LIMIT for v in value):
            for name, v in zip(node.output, value):
                consts[name] = np.asarray(v)
                model.graph.initializer.append(og.make_initializer(name, np.asarray(v)))
            changed += 1
        else:
            keep.append(node)
    if changed:
        set_nodes(model, keep)
        prune_unused(model)
    return changed


def squeeze_to_reshape(model: onnx.ModelProto) -> int:
    """Squeeze/Unsqueeze -> Reshape to the inferred static shape.

    CNTK's Squeeze maps axes as if the model had been exported by CNTK and fails on
    GlobalAveragePool + Squeeze ("cannot squeeze a static axis ... not 1").
    """
    shapes = og.infer_shapes(model)
    changed = 0
    for node in model.graph.node:
        if node.op_type not in ("Squeeze", "Unsqueeze"):
            continue
        target = shapes.get(node.output[0])
        if not _static(target):
            continue
        shape_name = og.unique_name(model, node.output[0] + "__shape")
        model.graph.initializer.append(og.make_initializer(shape_name, np.array(target, np.int64)))
        out, data, name = node.output[0], node.input[0], node.name
        node.CopyFrom(helper.make_node("Reshape", [data, shape_name], [out], name=name))
        changed += 1
    return changed


def prune_unused(model: onnx.ModelProto) -> int:
    """Drop nodes and initializers that no graph output depends on."""
    needed = {o.name for o in model.graph.output}
    live = []
    for node in reversed(og.topo_nodes(model)):
        if any(o in needed for o in node.output):
            live.append(node)
            needed.update(i for i in node.input if i)
            needed.update(og.subgraph_references(node))
    removed = len(model.graph.node) - len(live)
    if removed:
        set_nodes(model, list(reversed(live)))
    all_inits = {t.name for t in model.graph.initializer}
    inits = [t for t in model.graph.initializer if t.name in needed]
    removed += len(all_inits) - len(inits)
    if len(inits) != len(all_inits):
        del model.graph.initializer[:]
        model.graph.initializer.extend(inits)
    # IR < 4 also lists initializers among graph inputs; real inputs stay even when unused
    inputs = [i for i in model.graph.input if i.name not in all_inits or i.name in needed]
    if len(inputs) != len(model.graph.input):
        del model.graph.input[:]
        model.graph.input.extend(inputs)
    return removed


def set_nodes(model: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> None:
    kept = [onnx.NodeProto() for _ in nodes]
    for copy, node in zip(kept, nodes):
        copy.CopyFrom(node)  # protobuf repeated fields own their elements: copy before clearing
    del model.graph.node[:]
    model.graph.node.extend(kept)


def _static(shape: tuple | None) -> bool:
    return shape is not None and all(isinstance(d, int) and d > 0 for d in shape)


PASSES: list[tuple[str, Callable[[onnx.ModelProto], int]]] = [
    ("constants_to_initializers", constants_to_initializers),
    ("fold_constants", fold_constants),
    ("squeeze_to_reshape", squeeze_to_reshape),
    ("prune_unused", prune_unused),
]


def run_passes(model: onnx.ModelProto, prove: bool = True, seed: int = 0,
               examples: int = 2) -> tuple[onnx.ModelProto, list[PassRecord]]:
    """Apply every pass in order; return the rewritten model and what each pass did."""
    return apply_proved(model, PASSES, "Graph pass", prove, seed, examples)


RewriteFn = Callable[[onnx.ModelProto], int]


def apply_proved(model: onnx.ModelProto, steps: list[tuple[str, RewriteFn]], what: str = "Graph pass",
                 prove: bool = True, seed: int = 0,
                 examples: int = 2) -> tuple[onnx.ModelProto, list[PassRecord]]:
    """Apply each rewrite to a copy; keep it only if ONNX Runtime gives the same outputs before
    and after on random inputs inside each input's domain (else PassMismatch, model unchanged).
    A rewrite that changes nothing leaves the model untouched, byte for byte (and costs no ORT run)."""
    records: list[PassRecord] = []
    reference: tuple[list[dict], list[dict]] | None = None  # feeds and outputs, once a step changes something
    for name, fn in steps:
        candidate = onnx.ModelProto()
        candidate.CopyFrom(model)
        changed = fn(candidate)
        if not changed:
            continue
        proof = "not proved (prove=False)"
        if prove:
            reference = reference or _reference(model, seed, examples)
            worst = _worst_difference(name, what, candidate, *reference)
            proof = f"ORT max |diff| {worst:.3g} on {len(reference[0])} inputs"
        model = candidate
        records.append(PassRecord(name, changed, proof))
    return model, records


def _reference(model: onnx.ModelProto, seed: int, examples: int) -> tuple[list[dict], list[dict]]:
    """Random feeds inside each input's domain and the graph's outputs on them, in ORT."""
    from pytest_tf2cntk.convert import onnxrt

    rng = np.random.default_rng(seed)
    feeds = [random_feeds(derive_domains(model), rng) for _ in range(examples)]
    try:
        return feeds, [onnxrt.run(model, f) for f in feeds]
    except Exception as exc:
        from pytest_tf2cntk.errors import ConversionError

        raise ConversionError("ONNX Runtime cannot run the graph tf2onnx produced, so it cannot be "
                              f"used as the reference: {str(exc).strip().splitlines()[0][:400]}",
                              hint="report it to tf2onnx with the model; try another opset or batch") from None


def _worst_difference(name: str, what: str, candidate: onnx.ModelProto, feeds: list[dict],
                      reference: list[dict]) -> float:
    """The largest |after - before| over every output and feed; PassMismatch when they differ."""
    from pytest_tf2cntk.convert import onnxrt

    worst = 0.0
    for f, before in zip(feeds, reference):
        try:
            after = onnxrt.run(candidate, f)
        except Exception as exc:
            raise PassMismatch(f"{what} '{name}' produced a graph ONNX Runtime cannot run "
                               f"({str(exc).strip().splitlines()[0][:300]}). This is a bug in "
                               f"pytest-tf2cntk's {what.lower()}; it was not applied.") from None
        for out, ref in before.items():
            got = after[out]
            if got.shape != ref.shape or not np.allclose(got, ref, rtol=1e-6, atol=1e-7, equal_nan=True):
                diff = (float(np.nanmax(np.abs(got.astype(np.float64) - ref)))
                        if got.shape == ref.shape else float("inf"))
                raise PassMismatch(
                    f"{what} '{name}' changed output '{out}' (max |diff| {diff:.3g}, shapes {ref.shape} -> "
                    f"{got.shape}). This is a bug in pytest-tf2cntk's {what.lower()}, not in your model; "
                    "it was not applied.",
                    hint="report it with the model; meanwhile the API's convert(path, apply_passes=False) "
                         "converts without the CNTK rewrites (CNTK may then refuse the graph)")
            if got.size:
                worst = max(worst, float(np.nanmax(np.abs(got.astype(np.float64) - ref))))
    return worst
