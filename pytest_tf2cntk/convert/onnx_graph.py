"""Small helpers over onnx.ModelProto shared by conversion, passes, validation and budgets."""
from __future__ import annotations

import re
from typing import Any, Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference

_TF_SUFFIX = re.compile(r"(__\d+)+$|:\d+$")


def initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def constant_values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Every tensor whose value is known without inputs: initializers and Constant outputs."""
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute:
            attr = node.attribute[0]
            if attr.name == "value":
                values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def graph_input_names(model: onnx.ModelProto) -> list[str]:
    """Real inputs (old IR versions also list initializers as graph inputs)."""
    inits = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def infer_shapes(model: onnx.ModelProto) -> dict[str, tuple[int | None, ...]]:
    """Static shape of every tensor shape inference can resolve (None for unknown dims)."""
    inferred = shape_inference.infer_shapes(model)
    shapes: dict[str, tuple[int | None, ...]] = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None
                                    for d in t.shape.dim)
    for init in model.graph.initializer:
        shapes[init.name] = tuple(init.dims)
    return shapes


def elem_types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = shape_inference.infer_shapes(model)
    out = {vi.name: vi.type.tensor_type.elem_type for vi in
           list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    out.update({t.name: t.data_type for t in model.graph.initializer})
    return out


def consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    return users


def producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in model.graph.node for out in node.output}


def rename_tensor(model: onnx.ModelProto, old: str, new: str) -> None:
    """Rename a tensor everywhere it appears (node inputs/outputs, initializers, graph I/O, value_info)."""
    for init in model.graph.initializer:
        if init.name == old:
            init.name = new
    for node in model.graph.node:
        node.input[:] = [new if n == old else n for n in node.input]
        node.output[:] = [new if n == old else n for n in node.output]
    for vi in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        if vi.name == old:
            vi.name = new


def attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def opset_version(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 0


def tf_origin(node: onnx.NodeProto) -> str:
    """The TensorFlow op a tf2onnx node came from (tf2onnx keeps TF op names, adds __N suffixes)."""
    return _TF_SUFFIX.sub("", node.name) or node.name


def tf_layer(node: onnx.NodeProto) -> str:
    """Best-effort Keras layer name: the scope after the model's own scope."""
    parts = [p for p in tf_origin(node).split("/") if p and not p.startswith("StatefulPartitionedCall")]
    if len(parts) >= 3 and (parts[0].startswith("functional") or parts[0].startswith("sequential")
                            or parts[0].startswith("model")):
        return parts[1]
    return parts[0] if len(parts) > 1 else (parts[0] if parts else node.name)


def topo_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Nodes in topological order (tf2onnx already sorts; this guards hand-edited graphs)."""
    known = {t.name for t in model.graph.initializer} | {i.name for i in model.graph.input} | {""}
    pending = list(model.graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        progressed = []
        for node in pending:
            if all(i in known for i in node.input) and subgraph_references(node) <= known:
                ordered.append(node)
                known.update(node.output)
                progressed.append(id(node))
        if not progressed:
            ordered.extend(pending)  # a cycle or a dangling input: keep the rest as they are
            break
        pending = [n for n in pending if id(n) not in progressed]
    return ordered


def np_dtype(elem_type: int) -> np.dtype:
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))


def make_initializer(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def unique_name(model: onnx.ModelProto, base: str) -> str:
    taken = {n for node in model.graph.node for n in list(node.output) + [node.name]}
    taken |= {t.name for t in model.graph.initializer}
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    return name


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """How many nodes of each op type, sorted by op type."""
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def subgraph_references(node: onnx.NodeProto) -> set[str]:
    """Outer-scope tensors a Loop/If/Scan body reads implicitly (they are uses of those tensors)."""
    refs: set[str] = set()
    for g in iter_subgraphs(node):
        local = {i.name for i in g.input} | {t.name for t in g.initializer}
        for inner in g.node:
            local.update(inner.output)
        for inner in g.node:
            refs.update(i for i in inner.input if i and i not in local)
            refs.update(subgraph_references(inner) - local)
    return refs


def iter_subgraphs(node: onnx.NodeProto) -> Iterable[onnx.GraphProto]:
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a.g
        elif a.type == onnx.AttributeProto.GRAPHS:
            yield from a.graphs
