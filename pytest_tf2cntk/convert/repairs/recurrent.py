"""Repairs of recurrent layers: the batch CNTK's RNN importer assumes, Keras GRU's Loop, and the
GRU form CNTK computes wrongly.

Facts from CNTK 2.7's importer (Source/CNTKv2LibraryDll/proto/onnx/RNNHelper.cpp, ONNXToCNTK.cpp):

- ``UnwrapRNNOps`` turns the recurrence's result, laid out [batch, time, dirs*hidden], into ONNX's Y
  [time, dirs, batch, hidden] by one Reshape to [free, dirs, FreeBatchSize()=1, hidden] with no
  transpose ("because FreeBatchSize = 1, we can skip transpose"): right only at batch 1. At batch B
  each row of Y holds another sample's time step (the batch-4 LSTM fixture is off by up to 0.17).
- An initial_h/initial_c initializer becomes one constant per direction copied from offset
  dir*hidden: the state of sample 0 only; for two directions ``GetInitialStateVariable`` uses
  direction 1's state for both.
- ``GRUCell`` computes h~ = g(W_h x + H1 (r * h)): ``linear_before_reset`` is never read, so a
  Keras GRU (reset_after=True, ONNX linear_before_reset=1: h~ = g(W_h x + r * (R_h h + Rb_h)))
  computes something else at every batch size.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from pytest_tf2cntk.convert import onnx_graph as og
from pytest_tf2cntk.convert.repairs import Repair

RNN_OPS = ("LSTM", "GRU", "RNN")
_DEFAULT_ACTIVATIONS = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"], "RNN": ["Tanh"]}


class _Emitter:
    """Builds the nodes and initializers that replace one node, under fresh names."""

    def __init__(self, model: onnx.ModelProto, taken: set[str], prefix: str):
        self.model, self.taken, self.prefix = model, taken, prefix
        self.nodes: list[onnx.NodeProto] = []
        self.count = 0

    def name(self, hint: str) -> str:
        while True:
            self.count += 1
            name = f"{self.prefix}__{hint}_{self.count}"
            if name not in self.taken:
                self.taken.add(name)
                return name

    def const(self, hint: str, value: np.ndarray) -> str:
        name = self.name(hint)
        self.model.graph.initializer.append(og.make_initializer(name, np.asarray(value)))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str, output: str | None = None, **attrs) -> str:
        out = output or self.name(hint)
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=self.name(hint), **attrs))
        return out

    def reshape(self, x: str, shape: list[int], output: str | None = None) -> str:
        return self.op("Reshape", [x, self.const("shape", np.array(shape, np.int64))], "reshape", output)

    def slice(self, x: str, axis: int, start: int, end: int) -> str:
        return self.op("Slice", [x], "slice", axes=[axis], starts=[start], ends=[end])


def _taken(model: onnx.ModelProto) -> set[str]:
    names = {t.name for t in model.graph.initializer} | {i.name for i in model.graph.input}
    for node in model.graph.node:
        names.update(node.output)
        names.add(node.name)
    return names


def _replace(model: onnx.ModelProto, replaced: dict[int, list[onnx.NodeProto]]) -> None:
    """Put each replaced node's new nodes where it stood (keeps the topological order)."""
    nodes = []
    for i, node in enumerate(model.graph.node):
        nodes.extend(replaced.get(i, [node]))
    copies = [onnx.NodeProto() for _ in nodes]
    for copy, node in zip(copies, nodes):
        copy.CopyFrom(node)
    del model.graph.node[:]
    model.graph.node.extend(copies)


def _input(node: onnx.NodeProto, i: int) -> str:
    return node.input[i] if len(node.input) > i else ""


def _directions(node: onnx.NodeProto) -> list[str]:
    direction = og.attr(node, "direction", b"forward")
    direction = direction.decode() if isinstance(direction, bytes) else direction
    return ["forward", "reverse"] if direction == "bidirectional" else [direction]


def _default_cell(node: onnx.NodeProto) -> bool:
    """Default activations, no clip, no input_forget: the cell CNTK's importer builds."""
    acts = [a.decode() if isinstance(a, bytes) else a for a in og.attr(node, "activations", []) or []]
    default = _DEFAULT_ACTIVATIONS[node.op_type]
    if acts and acts != default * (len(acts) // len(default)):
        return False
    return (og.attr(node, "clip") is None and not og.attr(node, "input_forget", 0)
            and not og.attr(node, "activation_alpha") and not og.attr(node, "activation_beta"))


def _initial_states(node: onnx.NodeProto, consts: dict[str, np.ndarray]) -> list[int] | None:
    """Input positions of the initial states (all constants), or None when one is computed."""
    positions = [5, 6] if node.op_type == "LSTM" else [5]
    if any(_input(node, p) and _input(node, p) not in consts for p in positions):
        return None
    return [p for p in positions if _input(node, p)]


# ---------------------------------------------------------------------------------------------
# (1) Recurrent nodes at batch > 1: one batch-1 node per sample, sharing the weights.


def _splittable(node: onnx.NodeProto, shapes: dict, consts: dict, users: dict) -> bool:
    x = shapes.get(node.input[0]) or ()
    if node.op_type not in RNN_OPS or len(x) != 3 or not isinstance(x[1], int) or x[1] < 2:
        return False
    if node.op_type == "GRU" and og.attr(node, "linear_before_reset", 0):
        return False  # CNTK's GRU is wrong at every batch here: unroll_keras_gru's case
    if any(_input(node, i) not in consts for i in (1, 2)) or (_input(node, 3) and _input(node, 3) not in consts):
        return False
    if _input(node, 4) or not _default_cell(node) or _initial_states(node, consts) is None:
        return False
    if len(_directions(node)) == 2 and not _same_directions(node, consts):
        return False  # CNTK gives both directions direction 1's state: another defect
    return not (len(node.output) > 2 and node.output[2] in users)  # CNTK builds no Y_c


def _same_directions(node: onnx.NodeProto, consts: dict) -> bool:
    states = [consts[_input(node, p)] for p in _initial_states(node, consts) or []]
    return all(np.array_equal(s[0], s[1]) for s in states)


def split_recurrent_batch(model: onnx.ModelProto) -> int:
    """LSTM/GRU/RNN with batch B > 1 -> B batch-1 nodes on Slice(X, batch b), Y joined by Concat."""
    shapes, consts, users = og.infer_shapes(model), og.constant_values(model), og.consumers(model)
    taken, replaced = _taken(model), {}
    for i, node in enumerate(model.graph.node):
        if _splittable(node, shapes, consts, users):
            em = _Emitter(model, taken, node.name or node.op_type)
            _split_one(em, node, shapes[node.input[0]], consts, users)
            replaced[i] = em.nodes
    if replaced:
        _replace(model, replaced)
    return len(replaced)


def _split_one(em: _Emitter, node: onnx.NodeProto, x_shape: tuple, consts: dict, users: dict) -> None:
    steps, batch = x_shape[0], x_shape[1]
    states = _initial_states(node, consts) or []
    ys = []
    for b in range(batch):
        inputs = list(node.input) + [""] * (7 - len(node.input))
        inputs[0] = em.slice(node.input[0], 1, b, b + 1)
        for p in states:  # [dirs, B, hidden] -> this sample's [dirs, 1, hidden]
            inputs[p] = em.const("initial", consts[node.input[p]][:, b:b + 1])
        ys.append(em.name("y"))
        sample = onnx.NodeProto()
        sample.CopyFrom(node)
        sample.name, sample.input[:] = em.name("sample"), _trim(inputs)
        sample.output[:] = [ys[-1]]
        em.nodes.append(sample)
    y = node.output[0] if node.output[0] else em.name("y")
    em.op("Concat", ys, "concat", output=y, axis=2)
    if len(node.output) > 1 and node.output[1] in users:
        hidden = og.attr(node, "hidden_size") or consts[node.input[2]].shape[-1]
        _last_states(em, y, (steps, batch, hidden), _directions(node), node.output[1])


def _trim(inputs: list[str]) -> list[str]:
    while inputs and not inputs[-1]:
        inputs.pop()
    return inputs


def _last_states(em: _Emitter, y: str, dims: tuple, directions: list[str], y_h: str) -> None:
    """Y_h from Y [T, dirs, B, H]: a forward direction ends at step T-1, a reverse one at step 0."""
    steps, batch, hidden = dims
    parts = []
    for d, direction in enumerate(directions):
        t = steps - 1 if direction == "forward" else 0
        at_t = em.slice(y, 0, t, t + 1)
        parts.append(em.slice(at_t, 1, d, d + 1) if len(directions) > 1 else at_t)
    joined = parts[0] if len(parts) == 1 else em.op("Concat", parts, "concat", axis=1)
    em.reshape(joined, [len(directions), batch, hidden], output=y_h)  # CNTK's Squeeze maps axes wrongly


REPAIR_SPLIT = Repair(
    "split_recurrent_batch",
    "CNTK 2.7's LSTM/GRU/RNN importer assumes batch 1 (RNNHelper.cpp UnwrapRNNOps reshapes the "
    "[batch, time] result as [time, batch] without a transpose; an initial state keeps sample 0's "
    "only): at batch > 1 the node loads and computes the wrong rows",
    "one batch-1 copy of the node per sample, on Slice(X) of that sample and that sample's initial "
    "state, sharing W/R/B; Concat of their Y on the batch axis (Y_h sliced from Y)",
    split_recurrent_batch)

REPAIRS = [REPAIR_SPLIT]
