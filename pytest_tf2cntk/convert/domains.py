"""Valid value domains of model inputs, read from the converted graph.

A float input defaults to a range; an integer input that indexes an embedding (reaches a
Gather's indices) gets ids inside the vocabulary, so generated inputs never ask the model a
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


@dataclass(frozen=True)
class InputDomain(Jsonable):
    name: str
    dtype: str
    shape: tuple[int, ...]
    low: float
    high: float  # inclusive for floats, exclusive for integers
    kind: str  # "float" | "int" | "index" | "bool"
    why: str = ""



def _gather_vocab(model: onnx.ModelProto, tensor: str) -> int | None:
    """Smallest vocabulary among the Gathers this tensor indexes (through pass-through ops)."""
    users = og.consumers(model)
    consts = og.constant_values(model)
    shapes: dict[str, tuple] | None = None
    vocabs: list[int] = []
    frontier, seen = [tensor], set()
    while frontier:
        name = frontier.pop()
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
            elif node.op_type in _INDEX_PASSTHROUGH:
                frontier.extend(node.output)
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
        elif np.issubdtype(dtype, np.integer):
            vocab = _gather_vocab(model, vi.name)
            if vocab:
                dom = InputDomain(vi.name, dtype.name, shape, 0, vocab, "index",
                                  f"indexes an embedding of {vocab} rows")
            else:
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
