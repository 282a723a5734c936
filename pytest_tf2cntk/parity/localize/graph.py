"""Facts of an ONNX graph that localization reads once: shapes, types, constants, topological
order, nodes by name; and which Keras layer a node belongs to."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from onnx import shape_inference

from pytest_tf2cntk.convert import onnx_graph as og

if TYPE_CHECKING:
    from pytest_tf2cntk.convert.pipeline import Conversion


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


_LAYER_CACHE: dict[str, set[str]] = {}


def keras_layer_names(conversion: "Conversion") -> set[str]:
    """Layer names from the saved Keras config (no TensorFlow import); empty for SavedModels."""
    key = str(conversion.source)
    if key not in _LAYER_CACHE:
        names: set[str] = set()
        try:
            from pytest_tf2cntk.convert.tf_model import _keras_config, _walk_configs, detect_kind

            kind = detect_kind(Path(conversion.source))
            if kind in ("keras", "h5"):
                config = _keras_config(Path(conversion.source), kind)
                top = config.get("config", {}).get("name") if isinstance(config, dict) else None
                names = {c["config"]["name"] for c in _walk_configs(config)
                         if isinstance(c["config"].get("name"), str)} - {top}
        except Exception:
            names = set()
        _LAYER_CACHE[key] = names
    return _LAYER_CACHE[key]


def _layer_of(path: str, layers: set[str]) -> str | None:
    for part in path.split("/"):
        base = re.sub(r"_\d+$", "", part)
        if part in layers:
            return part
        if base in layers:
            return base
    return None


def tf_layer_of(node: onnx.NodeProto, layers: set[str], consts: dict[str, Any] | None = None) -> str:
    """The Keras layer of a node (by its TF scope), plus the layers its weights come from when
    tf2onnx fused them in (a Conv carrying a BatchNorm's name reads the conv layer's kernel)."""
    own = _layer_of(og.tf_origin(node), layers) if layers else None
    if own is None:
        own = og.tf_layer(node)
    extra: list[str] = []
    if layers and consts is not None:
        for name in node.input:
            if name in consts:
                other = _layer_of(name, layers)
                if other and other != own and other not in extra:
                    extra.append(other)
    return own + (f" (+{', '.join(extra)})" if extra else "")
