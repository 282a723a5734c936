"""Valid value domains of model inputs, read from the converted graph.

A float input defaults to a range; an input that indexes an embedding (reaches a Gather's
indices) gets ids inside the vocabulary, integers as floats for a float input (Keras' default
Input dtype, cast to int32 by the Embedding), so generated inputs never ask the model a
question it cannot answer.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import onnx

from pytest_tf2cntk.codec import Jsonable
from pytest_tf2cntk.convert import onnx_graph as og

DEFAULT_FLOAT_RANGE = (-1.0, 1.0)
DEFAULT_INT_RANGE = (0, 10)
# Ops an index tensor may pass through on its way to a Gather without changing its values.
_INDEX_PASSTHROUGH = {"Cast", "Identity", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Transpose"}
# ...and, once it is an integer, the arithmetic of the wrap of negative ids Keras puts in front
# of every Gather (where(ids < 0, ids + vocab, ids), at opset 9 as masks times ids plus ...)
_INDEX_WRAP = {"Add", "Mul", "Where"}
# Nodes of the int_cast repair's truncation (Max, Min, Floor, ..., Add, then the Cast) are named
# with this mark: a float id truncated on its way to a Gather is still that Gather's id.
TRUNCATION_MARK = "__trunc_"
_INT_TYPES = {onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64,
              onnx.TensorProto.UINT8, onnx.TensorProto.UINT16, onnx.TensorProto.UINT32, onnx.TensorProto.UINT64}


@dataclass(frozen=True)
class InputDomain(Jsonable):
    name: str
    dtype: str
    shape: tuple[int, ...]
    low: float
    high: float  # inclusive for floats, exclusive for integers
    kind: str  # "float" | "int" | "index" | "bool"
    why: str = ""



def _gather_vocab(model: onnx.ModelProto, tensor: str, integer: bool) -> int | None:
    """Smallest vocabulary among the Gathers this tensor indexes (through pass-through ops, and
    the wrap of negative ids once it is an integer: a float is indexed only after a Cast)."""
    users = og.consumers(model)
    consts = og.constant_values(model)
    shapes: dict[str, tuple] | None = None
    vocabs: list[int] = []
    frontier, seen = [(tensor, integer)], set()
    while frontier:
        name, is_int = frontier.pop()
        if name in seen:
            continue
        seen.add(name)
        for node in users.get(name, []):
            if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == name:
                axis = og.attr(node, "axis", 0)
                if node.input[0] in consts:
                    vocabs.append(int(consts[node.input[0]].shape[axis]))
                else:
                    shapes = shapes if shapes is not None else og.infer_shapes(model)
                    dims = shapes.get(node.input[0])
                    if dims and dims[axis]:
                        vocabs.append(int(dims[axis]))
            elif node.op_type == "Cast":
                frontier.extend((t, og.attr(node, "to", 0) in _INT_TYPES) for t in node.output)
            elif (node.op_type in _INDEX_PASSTHROUGH or (is_int and node.op_type in _INDEX_WRAP)
                  or TRUNCATION_MARK in node.name):
                frontier.extend((t, is_int) for t in node.output)
    return min(vocabs) if vocabs else None


def derive_domains(model: onnx.ModelProto, overrides: dict[str, tuple[float, float]] | None = None,
                   default_float: tuple[float, float] = DEFAULT_FLOAT_RANGE) -> dict[str, InputDomain]:
    overrides = overrides or {}
    out: dict[str, InputDomain] = {}
    real = set(og.graph_input_names(model))
    for vi in model.graph.input:
        if vi.name not in real:
            continue
        tt = vi.type.tensor_type
        dtype = og.np_dtype(tt.elem_type)
        shape = tuple(int(d.dim_value) for d in tt.shape.dim)
        if dtype == np.bool_:
            dom = InputDomain(vi.name, "bool", shape, 0, 2, "bool")
        else:
            integer = bool(np.issubdtype(dtype, np.integer))
            vocab = _gather_vocab(model, vi.name, integer)
            if vocab:
                dom = InputDomain(vi.name, dtype.name, shape, 0, vocab, "index",
                                  f"indexes an embedding of {vocab} rows" + ("" if integer else " (ids as floats)"))
            elif integer:
                dom = InputDomain(vi.name, dtype.name, shape, *DEFAULT_INT_RANGE, "int")
            else:
                dom = InputDomain(vi.name, dtype.name, shape, *default_float, "float")
        if vi.name in overrides:
            low, high = overrides[vi.name]
            dom = replace(dom, low=float(low), high=float(high), why="configured")
        out[vi.name] = dom
    return out


def random_feeds(domains: dict[str, InputDomain], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Plain uniform samples inside each domain (for pass proofs and quick checks)."""
    feeds = {}
    for name, d in domains.items():
        if d.kind == "float":
            feeds[name] = rng.uniform(d.low, d.high, d.shape).astype(d.dtype)
        else:
            feeds[name] = rng.integers(int(d.low), int(d.high), d.shape).astype(d.dtype)
    return feeds
