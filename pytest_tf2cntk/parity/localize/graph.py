"""Facts of an ONNX graph that localization reads once: shapes, types, constants, topological
order, nodes by name; and which Keras layer a node belongs to."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import onnx
from onnx import shape_inference

from pytest_tf2cntk.convert import onnx_graph as og


@dataclass
class GraphFacts:
    model: onnx.ModelProto
    shapes: dict[str, tuple]
    types: dict[str, int]
    consts: dict[str, np.ndarray]
    inputs: list[str]
    by_name: dict[str, onnx.NodeProto]
    order: list[onnx.NodeProto]

    @classmethod
    def of(cls, model: onnx.ModelProto) -> "GraphFacts":
        try:
            inferred = shape_inference.infer_shapes(model)
        except Exception:  # a graph shape inference cannot read: shapes come from values
            inferred = model
        shapes: dict[str, tuple] = {}
        types: dict[str, int] = {}
        for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
            t = vi.type.tensor_type
            if t.elem_type:
                types[vi.name] = t.elem_type
            if t.HasField("shape"):
                shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)
        for init in model.graph.initializer:
            shapes[init.name] = tuple(init.dims)
            types[init.name] = init.data_type
        order = og.topo_nodes(model)
        return cls(model, shapes, types, og.constant_values(model), og.graph_input_names(model),
                   {n.name: n for n in model.graph.node if n.name}, order)

    def dtype(self, tensor: str) -> np.dtype:
        return np_dtype(self.types.get(tensor))

    def est_bytes(self, tensor: str) -> int:
        """Size of a tensor from its static shape (1 MiB when unknown)."""
        shape = self.shapes.get(tensor)
        if not shape or any(d is None for d in shape):
            return 1 << 20
        return int(np.prod(shape)) * self.dtype(tensor).itemsize

    def data_tensors(self) -> set[str]:
        """Graph inputs and what nodes compute from them (not constants)."""
        data = set(self.inputs)
        for node in self.order:
            if any(i in data for i in node.input if i):
                data.update(t for t in node.output if t)
        return data


def np_dtype(elem_type: int | None) -> np.dtype:
    try:
        return og.np_dtype(elem_type) if elem_type else np.dtype(np.float32)
    except Exception:
        return np.dtype(np.float32)


def to_dtype(value: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """A CNTK value (float for every integer or bool tensor) in the ONNX tensor's dtype."""
    value = np.asarray(value)
    if value.dtype == dtype:
        return value
    if dtype == np.bool_:
        return value != 0
    if dtype.kind in "iu":
        return np.rint(value).astype(dtype)
    return value.astype(dtype)


def layer_in_scope(op: str, scopes: Mapping[str, str]) -> str | None:
    """The Keras layer whose call created TF op ``op``: the innermost recorded scope holding it
    (``Conversion.layer_scopes``, noted while tracing; never guessed from the names)."""
    parts = op.split(":")[0].split("/")
    for k in range(len(parts), 0, -1):
        layer = scopes.get("/".join(parts[:k]))
        if layer is not None:
            return layer
    return None


def tf_layer_of(node: onnx.NodeProto, scopes: Mapping[str, str], consts: dict[str, Any] | None = None) -> str:
    """The Keras layer of a node (by the layer call scopes of the trace; without them, e.g. for a
    SavedModel, the scope after the model's), plus the layers its weights come from when tf2onnx
    fused them in (a Conv carrying a BatchNorm's name reads the conv layer's kernel)."""
    own = layer_in_scope(og.tf_origin(node), scopes) if scopes else None
    if own is None:
        own = og.tf_layer(node)
    extra: list[str] = []
    if scopes and consts is not None:
        for name in node.input:
            if name in consts:
                other = layer_in_scope(name, scopes)
                if other and other != own and other not in extra:
                    extra.append(other)
    return own + (f" (+{', '.join(extra)})" if extra else "")
