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
from onnx import helper

from pytest_tf2cntk.convert import onnx_graph as og
from pytest_tf2cntk.convert.repairs import REPAIRS, Repair, replace_each

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


def _used(model: onnx.ModelProto) -> set[str]:
    """Tensors some node (or a Loop body inside it) or graph output reads."""
    used = {o.name for o in model.graph.output}
    for node in model.graph.node:
        used.update(node.input)
        used.update(og.subgraph_references(node))
    return used - {""}  # an omitted optional input is no tensor


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


def _splittable(node: onnx.NodeProto, shapes: dict, consts: dict, used: set) -> bool:
    x = shapes.get(node.input[0]) or ()
    if node.op_type not in RNN_OPS or len(x) != 3 or not all(isinstance(d, int) for d in x) or x[1] < 2:
        return False
    if node.op_type == "GRU" and og.attr(node, "linear_before_reset", 0):
        return False  # CNTK's GRU is wrong at every batch here: unroll_gru's case
    if any(_input(node, i) not in consts for i in (1, 2)) or (_input(node, 3) and _input(node, 3) not in consts):
        return False
    if _input(node, 4) or not _default_cell(node) or _initial_states(node, consts) is None:
        return False
    if len(_directions(node)) == 2 and not _same_directions(node, consts):
        return False  # CNTK gives both directions direction 1's state: another defect
    return not (len(node.output) > 2 and node.output[2] in used)  # CNTK builds no Y_c


def _same_directions(node: onnx.NodeProto, consts: dict) -> bool:
    states = [consts[_input(node, p)] for p in _initial_states(node, consts) or []]
    return all(np.array_equal(s[0], s[1]) for s in states)


def split_recurrent_batch(model: onnx.ModelProto) -> int:
    """LSTM/GRU/RNN with batch B > 1 -> B batch-1 nodes on Slice(X, batch b), Y joined by Concat."""
    shapes, consts, used = og.infer_shapes(model), og.constant_values(model), _used(model)
    taken = _taken(model)

    def rewrite(node: onnx.NodeProto) -> list[onnx.NodeProto] | None:
        if not _splittable(node, shapes, consts, used):
            return None
        em = _Emitter(model, taken, node.name or node.op_type)
        _split_one(em, node, shapes[node.input[0]], consts, used)
        return em.nodes

    return replace_each(model, rewrite)


def _split_one(em: _Emitter, node: onnx.NodeProto, x_shape: tuple, consts: dict, used: set) -> None:
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
    if len(node.output) > 1 and node.output[1] in used:
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


# ---------------------------------------------------------------------------------------------
# (2) Keras 3 GRU: tf2onnx's Loop -> the ONNX GRU op it computes.


class _KerasGRU:
    """What a tf2onnx Loop of a Keras GRU cell (reset_after=True) holds, read off its body."""

    def __init__(self, x: str, kernel: np.ndarray, recurrent: np.ndarray, bias: np.ndarray,
                 h0: np.ndarray, h_state: int, scan_out: int):
        self.x, self.kernel, self.recurrent, self.bias, self.h0 = x, kernel, recurrent, bias, h0
        self.h_state, self.scan_out = h_state, scan_out  # Loop output of the final h, of all h


def _keras_gru(loop: onnx.NodeProto, consts: dict, shapes: dict) -> _KerasGRU | None:
    """The Keras GRU in ``loop``, or None when the body is anything else.

    The body must compute x_t (Gather of an outer [T, B, I] tensor at the step counter) times a
    constant kernel [I, 3H] plus bias[0], and h times a constant recurrent kernel [H, 3H] plus
    bias[1] (a constant [2, 3H]: reset_after=True), with exactly two Sigmoids and one Tanh (the
    default activations). The ORT proof then checks the rest of the cell.
    """
    body = next(iter(og.iter_subgraphs(loop)), None)
    if body is None or len(loop.input) < 3:
        return None
    counts = {}
    for n in body.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    if (counts.get("Gemm"), counts.get("Sigmoid"), counts.get("Tanh"), counts.get("Gather")) != (2, 2, 1, 1):
        return None
    carried = {b.name: loop.input[k] for k, b in enumerate(body.input) if k >= 2}  # body input -> outer
    made = {o: n for n in body.node for o in n.output}
    gather = next(n for n in body.node if n.op_type == "Gather")
    x = gather.input[0]
    x_shape = shapes.get(x) or ()
    if x in made or x in carried or len(x_shape) != 3 or x_shape[0] not in (None, _const(loop.input[0], consts)):
        return None  # a Loop's scan output has no inferred time dim: the trip count gives it
    gemms = [n for n in body.node if n.op_type == "Gemm"]
    if any(og.attr(g, "transA", 0) or og.attr(g, "transB", 0) or og.attr(g, "alpha", 1.0) != 1.0
           or og.attr(g, "beta", 1.0) != 1.0 for g in gemms):
        return None
    x_gemm = next((g for g in gemms if g.input[0] == gather.output[0]), None)
    h_gemm = next((g for g in gemms if g.input[0] in carried), None)
    if x_gemm is None or h_gemm is None or x_gemm is h_gemm:
        return None
    weights = [consts.get(carried.get(g.input[1], "")) for g in (x_gemm, h_gemm)]
    bias = consts.get(carried.get(_split_source(h_gemm.input[2], made), ""))
    h0 = consts.get(carried[h_gemm.input[0]])
    if any(w is None or w.ndim != 2 for w in weights) or bias is None or h0 is None:
        return None
    hidden = weights[1].shape[0]
    if (bias.shape != (2, 3 * hidden) or weights[1].shape != (hidden, 3 * hidden) or h0.ndim != 2
            or h0.shape[1] != hidden or weights[0].shape[1] != 3 * hidden):
        return None
    return _gru_outputs(loop, body, x, weights, bias, h0, h_gemm.input[0])


def _const(name: str, consts: dict) -> int | None:
    value = consts.get(name)
    return int(value) if value is not None and value.size == 1 else None


def _split_source(name: str, made: dict) -> str:
    """The tensor a Squeeze(Split(t)) came from (tf2onnx's reading of bias[0] / bias[1])."""
    node = made.get(name)
    while node is not None and node.op_type in ("Squeeze", "Split", "Reshape", "Identity"):
        name = node.input[0]
        node = made.get(name)
    return name


def _through_identities(name: str, made: dict) -> str:
    while name in made and made[name].op_type == "Identity":
        name = made[name].input[0]
    return name


def _gru_outputs(loop, body, x, weights, bias, h0, h_in) -> _KerasGRU | None:  # noqa: ANN001
    """Find which Loop outputs are the final h and the stacked h (tf2onnx's TensorList)."""
    k = [b.name for b in body.input].index(h_in)  # body input k <-> body output k - 1
    made = {o: n for n in body.node for o in n.output}
    h_new = _through_identities(body.output[k - 1].name, made)
    carried = len(loop.input) - 2
    for s, out in enumerate(body.output[1 + carried:]):
        if _through_identities(out.name, made) == h_new:
            return _KerasGRU(x, weights[0], weights[1], bias, h0, k - 2, carried + s)
    return None


def loop_to_gru(model: onnx.ModelProto) -> int:
    """Loop of a Keras GRU cell -> ONNX GRU (linear_before_reset=1) with the same weights."""
    consts, shapes, used = og.constant_values(model), og.infer_shapes(model), _used(model)
    taken = _taken(model)

    def rewrite(node: onnx.NodeProto) -> list[onnx.NodeProto] | None:
        gru = _keras_gru(node, consts, shapes) if node.op_type == "Loop" else None
        wanted = {j for j, o in enumerate(node.output) if o in used}
        if gru is None or not wanted <= {gru.h_state, gru.scan_out}:
            return None
        em = _Emitter(model, taken, node.name or "Loop")
        _emit_gru(em, node, gru, _const(node.input[0], consts), gru.h_state in wanted)
        return em.nodes

    return replace_each(model, rewrite)


def _emit_gru(em: _Emitter, loop: onnx.NodeProto, gru: _KerasGRU, steps: int, final_h: bool) -> None:
    batch, hidden = gru.h0.shape
    w = em.const("W", gru.kernel.T[None].astype(np.float32))  # ONNX W [1, 3H, I], z r h like Keras
    r = em.const("R", gru.recurrent.T[None].astype(np.float32))
    b = em.const("B", gru.bias.reshape(1, 6 * hidden).astype(np.float32))  # [Wb, Rb]
    h0 = em.const("initial_h", gru.h0[None].astype(np.float32))
    y, y_h = em.name("Y"), em.name("Y_h")
    em.nodes.append(helper.make_node("GRU", [gru.x, w, r, b, "", h0], [y, y_h], name=em.name("gru"),
                                     hidden_size=hidden, linear_before_reset=1))
    em.reshape(y, [steps, batch, hidden], output=loop.output[gru.scan_out])
    if final_h:
        em.reshape(y_h, [batch, hidden], output=loop.output[gru.h_state])


REPAIR_GRU_LOOP = Repair(
    "keras_gru_loop_to_gru",
    "tf2onnx emits a Keras 3 GRU as a Loop at every batch size, and CNTK 2.7 imports no Loop",
    "an ONNX GRU (linear_before_reset=1, Keras' reset_after=True) with the weights read off the "
    "Loop's body: W = kernel^T, R = recurrent_kernel^T, B = [bias[0], bias[1]]; the Loop's outputs "
    "become Reshapes of Y and Y_h",
    loop_to_gru)


# ---------------------------------------------------------------------------------------------
# (3) GRU with linear_before_reset=1: unrolled into the ops CNTK computes exactly.


def _unrollable(node: onnx.NodeProto, shapes: dict, consts: dict) -> bool:
    x = shapes.get(node.input[0]) or ()
    return (node.op_type == "GRU" and bool(og.attr(node, "linear_before_reset", 0)) and len(x) == 3
            and all(isinstance(d, int) for d in x) and all(_input(node, i) in consts for i in (1, 2))
            and (not _input(node, 3) or _input(node, 3) in consts) and not _input(node, 4)
            and _default_cell(node) and _initial_states(node, consts) is not None)


def unroll_gru(model: onnx.ModelProto) -> int:
    """GRU(linear_before_reset=1) -> per time step Gemm, Slice, Sigmoid, Tanh, Mul, Add, Sub."""
    shapes, consts, used = og.infer_shapes(model), og.constant_values(model), _used(model)
    taken = _taken(model)

    def rewrite(node: onnx.NodeProto) -> list[onnx.NodeProto] | None:
        if not _unrollable(node, shapes, consts):
            return None
        em = _Emitter(model, taken, node.name or "GRU")
        _unroll_one(em, node, shapes[node.input[0]], consts, used)
        return em.nodes

    return replace_each(model, rewrite)


def _unroll_one(em: _Emitter, node: onnx.NodeProto, x_shape: tuple, consts: dict, used: set) -> None:
    steps, batch, features = x_shape
    w, r = consts[node.input[1]], consts[node.input[2]]
    hidden = r.shape[-1]
    dirs = _directions(node)
    bias = consts[node.input[3]] if _input(node, 3) else np.zeros((len(dirs), 6 * hidden), w.dtype)
    h0 = consts[node.input[5]] if _input(node, 5) else np.zeros((len(dirs), batch, hidden), w.dtype)
    flat = em.reshape(node.input[0], [steps * batch, features])
    per_direction, lasts = [], []
    for d, direction in enumerate(dirs):
        # x W^T + Wb for every step at once: [T*B, 3H] -> [T, B, 3H]
        xw = em.reshape(em.op("Gemm", [flat, em.const("Wt", w[d].T), em.const("Wb", bias[d, :3 * hidden])],
                              "gemm"), [steps, batch, 3 * hidden])
        cell = (em.const("Rt", r[d].T), em.const("Rb", bias[d, 3 * hidden:]), hidden, batch)
        h, hs = em.const("initial_h", h0[d]), {}
        for t in (range(steps) if direction == "forward" else range(steps - 1, -1, -1)):
            h = hs[t] = _gru_step(em, em.reshape(em.slice(xw, 0, t, t + 1), [batch, 3 * hidden]), h, cell)
        per_direction.append(hs)
        lasts.append(h)
    if node.output[0] in used:
        ys = [em.op("Concat", [em.reshape(hs[t], [1, 1, batch, hidden]) for t in range(steps)], "concat", axis=0)
              for hs in per_direction]
        em.op("Concat" if len(ys) > 1 else "Identity", ys, "y", output=node.output[0],
              **({"axis": 1} if len(ys) > 1 else {}))
    if len(node.output) > 1 and node.output[1] in used:
        em.op("Concat", [em.reshape(h, [1, batch, hidden]) for h in lasts], "concat", output=node.output[1],
              axis=0)


def _gru_step(em: _Emitter, xw: str, h: str, cell: tuple) -> str:
    """One ONNX GRU step with linear_before_reset=1 (z r h gate order, as ONNX and Keras have):
    z, r = sigmoid(xw[:2H] + hr[:2H]); n = tanh(xw[2H:] + r * hr[2H:]); h' = (1 - z) n + z h,
    where hr = h R^T + Rb."""
    rt, rb, hidden, batch = cell
    hr = em.op("Gemm", [h, rt, rb], "gemm")
    zr = em.op("Sigmoid", [em.op("Add", [em.slice(xw, 1, 0, 2 * hidden), em.slice(hr, 1, 0, 2 * hidden)],
                                 "add")], "sigmoid")
    z, r = em.slice(zr, 1, 0, hidden), em.slice(zr, 1, hidden, 2 * hidden)
    n = em.op("Tanh", [em.op("Add", [em.slice(xw, 1, 2 * hidden, 3 * hidden),
                                     em.op("Mul", [r, em.slice(hr, 1, 2 * hidden, 3 * hidden)], "mul")],
                             "add")], "tanh")
    one = em.const("one", np.ones((batch, hidden), np.float32))
    return em.op("Add", [em.op("Mul", [em.op("Sub", [one, z], "sub"), n], "mul"), em.op("Mul", [z, h], "mul")],
                 "add")


REPAIR_UNROLL_GRU = Repair(
    "unroll_gru",
    "CNTK 2.7's GRU importer never reads linear_before_reset (RNNHelper.cpp GRUCell computes "
    "g(W_h x + H1 (r * h))), so a GRU with linear_before_reset=1 (every Keras GRU, reset_after=True) "
    "loads and computes another cell",
    "the GRU unrolled over its fixed time steps into Gemm, Slice, Sigmoid, Tanh, Mul, Add, Sub, "
    "Reshape and Concat (x W^T for all steps in one Gemm), giving Y and Y_h as the op does",
    unroll_gru)

# A GRU's Loop first becomes the GRU op, which is then unrolled; the split takes the other RNNs.
REPAIRS.extend([REPAIR_GRU_LOOP, REPAIR_UNROLL_GRU, REPAIR_SPLIT])
