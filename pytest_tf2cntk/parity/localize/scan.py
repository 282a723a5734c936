"""Layerwise localization: name the first op whose *own* error breaks its budget.

A parity failure says that an output is wrong, not where it went wrong. ``localize`` reads
every intermediate tensor of the converted graph on both sides and, node by node in
topological order, separates the error a node *adds* from the error it *receives*:

  local reference  r(n) = ONNX Runtime running node n alone on CNTK's values of n's inputs
  local error      e(n) = max|cntk(n) - r(n)| / rms(r(n))    (metrics.compare's max_abs/ref_scale)
  own budget       b(n) = budgets.op_budget(node term of n, config, unit roundoff) x kappa(n)

Error already present in the inputs is in both ``cntk(n)`` and ``r(n)``, so it cancels: only
what n itself does differently remains. kappa(n) >= 1 is the condition number of a sum-of-
products op (Conv, MatMul, Gemm, pooling averages): rms of the node on |inputs|, |weights| over
rms of its result; where terms cancel, a correct implementation's rounding is that much larger
relative to the result (1 for every other op). The first node with e(n) > b(n) is the culprit
(a node CNTK cannot compute at all while it computes its inputs is one too, error inf); it is
mapped to its TF op (onnx_graph.tf_origin) and Keras layer, then confirmed by running it alone,
as a one-node ONNX model, in CNTK (the CNTK-bound graph's node) and in ONNX Runtime (the
converted graph's node) on the same inputs.

Mapping CNTK tensors to ONNX tensors (docs/layerwise.md has the full rule). CNTK keeps ONNX
*node* names as function names; the worker's ``nodes`` op lists every top-level CNTK function
with its inputs, outputs (uid, shape) and the ONNX tensors of the node it carries the name of.
An ONNX tensor T of node P is read in CNTK as:
  1. by name: output i of the CNTK function named P (when it has as many outputs as P), then
     moved forward through anonymous shape-preserving CNTK functions that are P's only
     consumer and read nothing else data-dependent (CNTK's separate bias Plus after a Conv);
  2. by structure, when no CNTK function has P's name (CNTK drops the names of Gemm blocks):
     the one anonymous, unclaimed CNTK function whose data inputs are exactly the CNTK tensors
     of P's data inputs and whose output shape is T's; several -> unmapped (ambiguous);
  2b. by consumer, when that fails too (an LSTM becomes a chain of anonymous sequence ops):
     what the CNTK function of a named consumer of T reads in T's place, i.e. the nearest
     variable with T's shape behind that input; consumers that disagree -> unmapped;
  3. a graph output not found so: the worker's own output matching;
and its value must then have T's shape (up to size-1 axes, which do not move elements; axis
order is ONNX's on both sides). Anything else is "unmapped: <reason>", never a guess; a
consumer of an unmapped tensor gets ONNX Runtime's value of it instead, and says so.

Memory: nodes are taken in chunks (``chunk`` nodes and about CHUNK_BYTES of tensors per side);
one CNTK eval and one ONNX Runtime run per chunk fetch that chunk's tensors, and a tensor is kept
after its chunk only while a later node still reads it (reference counts from consumers).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference

from pytest_tf2cntk.convert import onnx_graph as og
from pytest_tf2cntk.parity.budgets import UNIT_ROUNDOFF, BudgetConfig, node_terms, op_budget
from pytest_tf2cntk.parity.metrics import compare, nonfinite_mismatch

if TYPE_CHECKING:
    from pytest_tf2cntk.convert.pipeline import Conversion

DEFAULT_CHUNK = 64
CHUNK_BYTES = 32 << 20  # per side (CNTK, ONNX Runtime) and chunk, estimated from static shapes
SESSION_CACHE_SIZE = 512
# ops whose output is a sum of products of their inputs: their rounding error scales with the
# magnitude of the terms, so the budget gets the node's condition number (see _Pass.condition)
LINEAR_ACCUMULATING = {"Conv", "ConvTranspose", "MatMul", "Gemm", "AveragePool", "GlobalAveragePool",
                       "ReduceSum", "ReduceMean", "Sum"}
STATUS_OK = "ok"
STATUS_PENDING = "pending"
STATUS_OVER = "over budget"
STATUS_CONSTANT = "constant (no data inputs)"
STATUS_NOT_REACHED = "not reached (time budget)"
STATUS_SKIPPED = "not checked (stopped at culprit)"
CONFIRMED = "confirmed in isolation"
NOT_REPRODUCED = "not reproduced in isolation"


# ---------------------------------------------------------------------------------------------
# Report


@dataclass
class TensorMapping:
    """How one ONNX tensor of the converted graph is read on the CNTK side."""

    onnx: str                       # tensor name in the converted (reference) graph
    onnx_shape: tuple | None
    cntk_uid: str | None = None     # None: unmapped
    cntk_function: str = ""         # CNTK function name ("" = anonymous)
    cntk_op: str = ""
    cntk_shape: tuple | None = None  # declared by CNTK (None = free axis)
    rule: str = ""                  # name | name + forward | structure | graph output | graph input
    reason: str = ""                # why unmapped
    axis_order: str = "ONNX (same on both sides)"
    value_note: str = ""            # e.g. size-1 axes reshaped

    @property
    def mapped(self) -> bool:
        return self.cntk_uid is not None and not self.reason

    def to_json(self) -> dict[str, Any]:
        return {"onnx": self.onnx, "onnx_shape": _shape_json(self.onnx_shape), "cntk_uid": self.cntk_uid,
                "cntk_function": self.cntk_function, "cntk_op": self.cntk_op,
                "cntk_shape": _shape_json(self.cntk_shape), "rule": self.rule, "reason": self.reason,
                "axis_order": self.axis_order, "value_note": self.value_note, "mapped": self.mapped}

    def describe(self) -> str:
        if not self.mapped:
            return f"{self.onnx}: unmapped ({self.reason})"
        fn = repr(self.cntk_function) if self.cntk_function else "anonymous"
        note = f"; {self.value_note}" if self.value_note else ""
        return (f"{self.onnx} {list(self.onnx_shape or ())} <- CNTK {self.cntk_op} {fn} "
                f"{self.cntk_uid} {list(self.cntk_shape or ())} by {self.rule}{note}")


@dataclass
class NodeReport:
    node: str
    op_type: str
    tf_layer: str
    tf_op: str
    local_error: float | None = None
    budget: float | None = None
    status: str = STATUS_OK
    drift: float | None = None      # CNTK vs ONNX Runtime (whole graph): the accumulated error
    inputs_from_ort: list[str] = field(default_factory=list)
    mapping: list[TensorMapping] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    index: int = 0                  # position in topological order
    metrics: dict[str, Any] | None = None  # metrics.compare of the worst output (over-budget nodes)
    base_budget: float | None = None  # budgets.op_budget of the node
    condition: float = 1.0          # kappa of an accumulating op (budget = base_budget * kappa)

    @property
    def ratio(self) -> float | None:
        if self.local_error is None or self.budget is None:
            return None
        if self.budget <= 0:
            return float("inf") if self.local_error > 0 else 0.0
        return self.local_error / self.budget

    @property
    def over(self) -> bool:
        return self.status == STATUS_OVER

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "node": self.node, "op_type": self.op_type, "tf_layer": self.tf_layer,
                "tf_op": self.tf_op, "local_error": _num(self.local_error), "budget": _num(self.budget),
                "base_budget": _num(self.base_budget), "condition": _num(self.condition),
                "ratio": _num(self.ratio), "status": self.status, "drift": _num(self.drift),
                "inputs_from_ort": list(self.inputs_from_ort),
                "mapping": [m.to_json() for m in self.mapping], "notes": list(self.notes),
                "metrics": self.metrics}


@dataclass
class Confirmation:
    status: str                     # CONFIRMED | NOT_REPRODUCED | "not run: ..."
    isolated_error: float | None = None   # CNTK alone vs ONNX Runtime alone, same inputs
    budget: float | None = None
    in_graph_error: float | None = None   # CNTK alone vs CNTK in the graph
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "isolated_error": _num(self.isolated_error),
                "budget": _num(self.budget), "in_graph_error": _num(self.in_graph_error),
                "detail": self.detail}

    def describe(self) -> str:
        if self.isolated_error is None:
            return self.status + (f" ({self.detail})" if self.detail else "")
        text = f"{self.status}: CNTK alone vs ONNX Runtime alone {self.isolated_error:.3g}"
        if self.budget is not None:
            text += f" (budget {self.budget:.3g})"
        if self.in_graph_error is not None:
            text += f"; CNTK alone vs CNTK in the graph {self.in_graph_error:.3g}"
        return text + (f"; {self.detail}" if self.detail else "")


@dataclass
class Localization:
    model: str
    device: str
    onnx: str
    cntk_onnx: str
    culprit: NodeReport | None
    nodes: list[NodeReport]
    seconds: float = 0.0
    checked: int = 0                # nodes whose local error was computed or decided
    total: int = 0
    stopped_early: str = ""         # "" or the note saying why
    confirmation: Confirmation | None = None
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    suspects: list[str] = field(default_factory=list)  # culprit + unobservable producers upstream
    # peak_held_mb: most tensor bytes held at once (both sides); all_intermediates_mb: what holding
    # every intermediate of both sides would take; chunks: CNTK evals / ONNX Runtime runs made
    memory: dict[str, float] = field(default_factory=dict)

    @property
    def over_budget(self) -> list[NodeReport]:
        return [n for n in self.nodes if n.over]

    @property
    def unmapped(self) -> list[NodeReport]:
        return [n for n in self.nodes if n.status.startswith("unmapped")]

    def table(self, limit: int = 10) -> str:
        """The culprit first, then the nodes closest to (or over) their budgets."""
        rated = [n for n in self.nodes if n.ratio is not None]
        rated.sort(key=lambda n: (n is not self.culprit, -(n.ratio or 0.0), n.index))
        rows = [("#", "node", "op type", "TF layer", "local err", "budget", "ratio", "status")]
        for n in rated[:max(limit, 1)]:
            mark = "*" if n is self.culprit else ""
            rows.append((f"{mark}{n.index}", _short(n.node, 60), n.op_type, _short(n.tf_layer, 32),
                         _fmt(n.local_error), _fmt(n.budget), _fmt(n.ratio, "x"), _short(n.status, 40)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
        rest = rated[len(rows) - 1:]
        if rest:
            over = sum(1 for n in rest if n.over)
            lines.append(f"... {len(rest)} more checked node(s)" + (f", {over} of them over budget" if over
                                                                   else " within budget"))
        return "\n".join(lines)

    def summary(self) -> str:
        if self.culprit is None:
            head = "no node exceeds its own budget"
        else:
            c = self.culprit
            head = (f"culprit {c.node} ({c.op_type}), TF layer {c.tf_layer}, TF op {c.tf_op}: local "
                    f"error {_fmt(c.local_error)} > budget {_fmt(c.budget)} ({_fmt(c.ratio, 'x')})")
            if self.confirmation is not None:
                head += f"; {self.confirmation.status}"
        return head

    def __str__(self) -> str:
        lines = [f"tf2cntk localize: {self.summary()}",
                 f"model {self.model} on {self.device}: checked {self.checked} of {self.total} nodes "
                 f"in {self.seconds:.1f} s; {len(self.unmapped)} unmapped, "
                 f"{sum(1 for n in self.nodes if n.inputs_from_ort)} with inputs from ONNX Runtime",
                 self.table()]
        if self.culprit is not None:
            c = self.culprit
            if self.confirmation is not None:
                lines.append(f"confirmation: {self.confirmation.describe()}")
            if c.inputs_from_ort:
                lines.append(f"caution: input(s) {', '.join(c.inputs_from_ort)} of the culprit were not "
                             "observable in CNTK (ONNX Runtime's values were used): the error may belong "
                             f"to an upstream node: suspects {', '.join(self.suspects)}")
            if c.condition > 1.0 and c.base_budget is not None:
                lines.append(f"culprit budget: op budget {c.base_budget:.3g} x condition number "
                             f"{c.condition:.3g} (its terms cancel)")
            for note in c.notes:
                lines.append(f"culprit note: {note}")
            more = [n.node for n in self.over_budget if n is not c]
            if more:
                lines.append(f"also over budget: {', '.join(more[:5])}" + (" ..." if len(more) > 5 else ""))
        if self.stopped_early:
            lines.append(self.stopped_early)
        for n in self.unmapped[:5]:
            lines.append(f"{n.node}: {n.status}")
        if len(self.unmapped) > 5:
            lines.append(f"... and {len(self.unmapped) - 5} more unmapped node(s) (see the JSON report)")
        lines.extend(self.notes)
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "device": self.device, "onnx": self.onnx, "cntk_onnx": self.cntk_onnx,
                "culprit": self.culprit.to_json() if self.culprit else None,
                "summary": self.summary(), "table": self.table(),
                "confirmation": self.confirmation.to_json() if self.confirmation else None,
                "suspects": list(self.suspects), "seconds": self.seconds, "checked": self.checked,
                "total": self.total, "stopped_early": self.stopped_early, "notes": list(self.notes),
                "timings": dict(self.timings), "memory": dict(self.memory),
                "nodes": [n.to_json() for n in self.nodes]}

    def history_rows(self, model: str | None = None, device: str | None = None) -> list[dict[str, Any]]:
        """One row per checked node: model, device, node, op_type, tf_layer, local_error, budget."""
        return [{"model": model or self.model, "device": device or self.device, "node": n.node,
                 "op_type": n.op_type, "tf_layer": n.tf_layer, "local_error": n.local_error,
                 "budget": n.budget, "culprit": n is self.culprit}
                for n in self.nodes if n.local_error is not None]


def _num(x: float | None) -> float | None | str:
    if x is None:
        return None
    return x if math.isfinite(x) else str(x)


def _fmt(x: float | None, suffix: str = "") -> str:
    return "-" if x is None else f"{x:.3g}{suffix}"


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else "..." + text[-(n - 3):]


def _shape_json(shape: tuple | None) -> list | None:
    return None if shape is None else list(shape)


# ---------------------------------------------------------------------------------------------
# Graph facts


@dataclass
class _GraphFacts:
    model: onnx.ModelProto
    shapes: dict[str, tuple]
    types: dict[str, int]
    consts: dict[str, np.ndarray]
    inputs: list[str]
    by_name: dict[str, onnx.NodeProto]
    order: list[onnx.NodeProto]

    @classmethod
    def of(cls, model: onnx.ModelProto) -> "_GraphFacts":
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


def _np_dtype(elem_type: int | None) -> np.dtype:
    try:
        return og.np_dtype(elem_type) if elem_type else np.dtype(np.float32)
    except Exception:
        return np.dtype(np.float32)


_LAYER_CACHE: dict[str, set[str]] = {}


def _keras_layer_names(conversion: "Conversion") -> set[str]:
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
    import re

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


# ---------------------------------------------------------------------------------------------
# CNTK <-> ONNX mapping


def _compatible(cshape: Iterable | None, oshape: Iterable | None) -> bool:
    if cshape is None or oshape is None:
        return True
    c, o = list(cshape), list(oshape)
    if len(c) == len(o):
        return all(a is None or b is None or a == b for a, b in zip(c, o))
    cs = [d for d in c if d != 1]
    os_ = [d for d in o if d != 1]
    return len(cs) == len(os_) and all(a is None or b is None or a == b for a, b in zip(cs, os_))


class _CntkIndex:
    """The loaded CNTK function graph, from the worker's ``nodes`` op."""

    def __init__(self, loaded: Any, cnodes: list) -> None:
        self.funcs = [f for f in cnodes if f.op_name != "Combine"]
        self.out_of: dict[str, tuple[Any, int]] = {}
        self.users: dict[str, list] = {}
        for f in self.funcs:
            for i, o in enumerate(f.outputs):
                self.out_of[o.cntk_uid] = (f, i)
        for f in self.funcs:
            for u in dict.fromkeys(f.inputs):
                self.users.setdefault(u, []).append(f)
        self.arg_uid = {t.name: t.cntk_uid for t in loaded.inputs}
        self.output_info = {t.name: t for t in loaded.outputs}
        self.data = set(self.arg_uid.values())
        changed = True
        while changed:  # data-dependent variables: arguments and what is computed from them
            changed = False
            for f in self.funcs:
                if any(i in self.data for i in f.inputs):
                    for o in f.outputs:
                        if o.cntk_uid not in self.data:
                            self.data.add(o.cntk_uid)
                            changed = True


def map_tensors(ref: _GraphFacts, cg: _GraphFacts, loaded: Any, cnodes: list,
                idx: _CntkIndex | None = None) -> dict[str, TensorMapping]:
    """ONNX tensor of the reference graph -> how CNTK exposes it (see the module docstring)."""
    idx = idx or _CntkIndex(loaded, cnodes)
    onnx_names = {n.name for n in cg.model.graph.node if n.name}
    claimed: set[str] = set()  # CNTK function uids that belong to some ONNX node
    cg_var: dict[str, TensorMapping] = {}  # cg tensor -> mapping (shape = ONNX shape)

    def shape_of(tensor: str) -> tuple | None:
        return cg.shapes.get(tensor)

    def record(tensor: str, uid: str, rule: str) -> None:
        f, i = idx.out_of.get(uid, (None, 0))
        info = f.outputs[i] if f is not None else None
        m = TensorMapping(tensor, shape_of(tensor), uid, f.name if f else "", f.op_name if f else "argument",
                          tuple(info.shape) if info is not None else None, rule)
        cg_var[tensor] = m

    cg_users = og.consumers(cg.model)

    def forward(tensor: str) -> None:
        """Move the mapping over anonymous shape-preserving functions that complete the node."""
        m = cg_var[tensor]
        hops = []
        if any(not c.name for c in cg_users.get(tensor, [])):
            return  # an unnamed ONNX consumer is an anonymous CNTK function too: cannot tell them apart
        while True:
            users = idx.users.get(m.cntk_uid or "", [])
            if len(users) != 1:
                break
            f = users[0]
            if f.uid in claimed or (f.name and f.name in onnx_names) or len(f.outputs) != 1:
                break
            if not _compatible(f.outputs[0].shape, m.onnx_shape):
                break
            if any(i in idx.data for i in f.inputs if i != m.cntk_uid):
                break
            claimed.add(f.uid)
            hops.append(f.op_name)
            m.cntk_uid = f.outputs[0].cntk_uid
            m.cntk_op = f.op_name
            m.cntk_shape = tuple(f.outputs[0].shape)
        if hops:
            m.rule += " + anonymous " + " -> ".join(hops) + " after it"

    # graph inputs
    for name in cg.inputs:
        uid = idx.arg_uid.get(name)
        if uid is not None:
            cg_var[name] = TensorMapping(name, shape_of(name), uid, name, "argument",
                                         shape_of(name), "graph input (CNTK argument of that name)")
    # 1. by name (the worker tells which ONNX tensors each CNTK function carries)
    named_fail: dict[str, str] = {}
    for f in idx.funcs:
        if not f.onnx_outputs:
            continue
        claimed.add(f.uid)
        node = cg.by_name.get(f.name)
        outs = [o for o in (node.output if node is not None else f.onnx_outputs)]
        if len(f.outputs) == len(outs):
            for i, t in enumerate(outs):
                if t:
                    record(t, f.outputs[i].cntk_uid, f"name (CNTK {f.op_name} function {f.name!r})")
        elif len(outs) == 1 or (len(f.outputs) == 1 and sum(1 for t in outs if t) == 1):
            t = next(t for t in outs if t)
            record(t, f.outputs[0].cntk_uid, f"name (CNTK {f.op_name} function {f.name!r})")
        else:
            for t in outs:
                named_fail[t] = (f"multi-output node: ONNX has {len(outs)} outputs, its CNTK function "
                                 f"{f.name!r} has {len(f.outputs)}")
    for t in list(cg_var):
        if cg_var[t].rule.startswith("name"):
            forward(t)

    # 2. by structure, in topological order (inputs first)
    def origin(uid: str, depth: int = 0) -> set[str]:
        if uid in mapped_uids or uid in idx.arg_uid.values() or depth > 16:
            return {uid}
        f = idx.out_of.get(uid, (None, 0))[0]
        if f is None or f.uid in claimed:
            return {uid}
        data_in = [i for i in dict.fromkeys(f.inputs) if i in idx.data]
        if len(data_in) != 1:
            return {uid}
        return origin(data_in[0], depth + 1)

    named_fn = {f.name: f for f in idx.funcs if f.onnx_outputs}

    def var_shape(uid: str) -> tuple | None:
        f, i = idx.out_of.get(uid, (None, 0))
        if f is not None:
            return tuple(f.outputs[i].shape)
        return shape_of(next((n for n, u in idx.arg_uid.items() if u == uid), ""))

    def by_consumer(tensor: str) -> tuple[str, str] | str:
        """(uid, consumer) of the variable a named CNTK consumer reads as ``tensor``, or why not."""
        found: set[tuple[str, str]] = set()
        for c in cg_users.get(tensor, []):
            f = named_fn.get(c.name)
            if f is None:
                continue
            others = [i for i in dict.fromkeys(c.input) if i and i != tensor and i not in cg.consts]
            if any(i not in cg_var for i in others):
                continue
            other_uids = {cg_var[i].cntk_uid for i in others}
            cands = []
            for x in [i for i in dict.fromkeys(f.inputs) if i in idx.data]:
                v: str | None = x
                for _ in range(32):
                    if v is None or v in other_uids:
                        v = None
                        break
                    if _compatible(var_shape(v), shape_of(tensor)):
                        break
                    g = idx.out_of.get(v, (None, 0))[0]
                    data_in = [i for i in dict.fromkeys(g.inputs) if i in idx.data] if g is not None else []
                    if g is None or g.uid in claimed or len(data_in) != 1:
                        v = None
                        break
                    v = data_in[0]
                if v is not None:
                    cands.append(v)
            if len(cands) == 1:
                found.add((cands[0], f.name))
        uids = {u for u, _ in found}
        if len(uids) == 1:
            return next(iter(found))
        if len(uids) > 1:
            return f"ambiguous: its consumers read {len(uids)} different CNTK variables in its place"
        return ""

    structure_fail: dict[str, str] = {}

    def by_structure(node: onnx.NodeProto, outs: list[str], why: str) -> str:
        """Map the outputs of ``node`` to the one matching anonymous CNTK function, or say why not."""
        data_inputs = [i for i in dict.fromkeys(node.input) if i and i not in cg.consts]
        missing = [i for i in data_inputs if i not in cg_var]
        if missing:
            return f"its input {missing[0]} is not mapped, so it cannot be found by structure"
        nonlocal mapped_uids
        mapped_uids = {m.cntk_uid for m in cg_var.values()}
        want = {cg_var[i].cntk_uid for i in data_inputs}
        cands, direct = [], []
        for f in idx.funcs:
            if f.uid in claimed or (f.name and f.name in onnx_names) or len(f.outputs) != len(outs):
                continue
            if not all(_compatible(o.shape, shape_of(t)) for o, t in zip(f.outputs, outs)):
                continue
            data_in = [i for i in dict.fromkeys(f.inputs) if i in idx.data]
            if not data_in:
                continue
            if set(data_in) == want:
                direct.append(f)
            got: set[str] = set()
            for i in data_in:
                got |= origin(i)
            if got == want:
                cands.append(f)
        if len(direct) == 1:  # reading the inputs themselves beats reading them through others
            cands = direct
        if len(cands) == 1:
            f = cands[0]
            claimed.add(f.uid)
            for i, t in enumerate(outs):
                record(t, f.outputs[i].cntk_uid, f"{why}structure (the one anonymous CNTK {f.op_name} "
                       "function reading the same inputs, with this output shape)")
                forward(t)
            return ""
        if cands:
            return (f"ambiguous: {len(cands)} anonymous CNTK functions "
                    f"({', '.join(sorted({c.op_name for c in cands}))}) read the same inputs with this output shape")
        return (f"no CNTK function carries the name {node.name!r} and none matches it by structure "
                "(fused away or not exposed)") if node.name else "no anonymous CNTK function matches it by structure"

    mapped_uids: set[str] = set()
    for node in cg.order:
        outs = [t for t in node.output if t]
        if not outs or all(t in cg_var for t in outs):
            continue
        if not any(i and i not in cg.consts for i in node.input):
            continue  # a constant subgraph: nothing to map
        why = "" if node.name else "unnamed ONNX node (CNTK drops the names of unnamed nodes); "
        if not any(t in named_fail for t in outs):
            failure = by_structure(node, outs, why)
            if not failure:
                continue
            for t in outs:
                structure_fail[t] = why + failure
        # 2b. what a named consumer reads in its place (CNTK built the node from several
        # anonymous functions, e.g. an LSTM over sequence axes, or it has fewer outputs)
        for t in outs:
            if t in cg_var:
                continue
            found = by_consumer(t)
            if isinstance(found, tuple):
                uid, cname = found
                record(t, uid, f"{why}consumer input (the value CNTK function {cname!r} reads in its "
                       "place: the nearest variable with this shape behind that input)")
                structure_fail.pop(t, None)
                named_fail.pop(t, None)
            elif found:
                key = named_fail if t in named_fail else structure_fail
                key[t] = key.get(t, "") + f"; {found}"

    # 3. graph outputs by the worker's output matching; a disagreement is reported, not resolved
    for out in cg.model.graph.output:
        info = idx.output_info.get(out.name)
        if info is None:
            continue
        if out.name in cg_var:
            if cg_var[out.name].cntk_uid != info.cntk_uid and info.matched == "name":
                structure_fail[out.name] = (f"ambiguous: mapped to {cg_var[out.name].cntk_uid} by "
                                            f"{cg_var[out.name].rule}, but the worker matched the graph "
                                            f"output to {info.cntk_uid}")
                del cg_var[out.name]
            continue
        record(out.name, info.cntk_uid, f"graph output (worker matched it by {info.matched or 'cntk'})")

    # back to the reference graph's tensor names (node names are kept by mutations)
    result: dict[str, TensorMapping] = {}
    for name in ref.inputs:
        m = cg_var.get(name)
        result[name] = m if m is not None else TensorMapping(name, ref.shapes.get(name), reason=(
            "no CNTK argument of that name"))
    for node in ref.order:
        cnode = cg.by_name.get(node.name) if node.name else None
        for i, t in enumerate(node.output):
            if not t:
                continue
            shape = ref.shapes.get(t)
            if not node.name:
                result[t] = TensorMapping(t, shape, reason="unnamed ONNX node: it cannot be matched "
                                                           "by name across the two graphs")
                continue
            if cnode is None:
                result[t] = TensorMapping(t, shape, reason="the node is not in the CNTK-bound graph")
                continue
            if i >= len(cnode.output) or not cnode.output[i]:
                result[t] = TensorMapping(t, shape, reason="the CNTK-bound graph's node has no such output")
                continue
            ct = cnode.output[i]
            m = cg_var.get(ct)
            if m is None:
                reason = named_fail.get(ct) or structure_fail.get(ct) or (
                    f"no CNTK function carries the name {node.name!r} (fused away or not exposed)")
                result[t] = TensorMapping(t, shape, reason=reason)
                continue
            m = TensorMapping(**{**m.__dict__, "onnx": t, "onnx_shape": shape})
            if not _compatible(m.cntk_shape, shape):
                m.reason = f"shape differs: CNTK {list(m.cntk_shape or ())} vs ONNX {list(shape or ())}"
            result[t] = m
    return result


# ---------------------------------------------------------------------------------------------
# One-node models


_SESSIONS: "OrderedDict[str, Any]" = OrderedDict()


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
    outputs = []
    for o in node.output:
        if o:
            outputs.append(helper.make_tensor_value_info(o, out_types.get(o, onnx.TensorProto.FLOAT), None)
                           if o in out_types else onnx.ValueInfoProto(name=o))
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    graph = helper.make_graph([copy], f"one_node_{node.op_type}", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=list(opsets), producer_name="tf2cntk-layerwise")
    model.ir_version = ir_version
    return model


def _session(model: onnx.ModelProto, device: str) -> Any:
    from pytest_tf2cntk.convert import onnxrt
    from pytest_tf2cntk.errors import DeviceUnavailable

    payload = model.SerializeToString()
    key = hashlib.sha1(payload).hexdigest() + ":" + device
    sess = _SESSIONS.get(key)
    if sess is not None:
        _SESSIONS.move_to_end(key)
        return sess
    try:
        sess = onnxrt.session(payload, device)
    except DeviceUnavailable:
        sess = onnxrt.session(payload, "cpu")
    _SESSIONS[key] = sess
    while len(_SESSIONS) > SESSION_CACHE_SIZE:
        _SESSIONS.popitem(last=False)
    return sess


def _to_dtype(value: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """A CNTK value (float for every integer or bool tensor) in the ONNX tensor's dtype."""
    value = np.asarray(value)
    if value.dtype == dtype:
        return value
    if dtype == np.bool_:
        return value != 0
    if dtype.kind in "iu":
        return np.rint(value).astype(dtype)
    return value.astype(dtype)


def scaled_error(ref: np.ndarray, got: np.ndarray) -> float:
    """max|got - ref| / rms(ref): metrics.compare's ``max_abs / ref_scale`` with its NaN/Inf rule
    (non-finite values must agree exactly, else inf), without its other metrics (ulps, cosine,
    relative error), which cost 10x more on large tensors; tests check the two agree."""
    ref, got = np.asarray(ref), np.asarray(got)
    if ref.shape != got.shape:
        return float("inf")
    if ref.size == 0:
        return 0.0
    r = ref.astype(np.float64, copy=False)
    g = got.astype(np.float64, copy=False)
    fr, fg = np.isfinite(r), np.isfinite(g)
    if fr.all() and fg.all():
        max_abs = float(np.max(np.abs(r - g)))
        scale = math.sqrt(float(np.mean(np.square(r))))
    else:
        if nonfinite_mismatch(r, g).any():
            return float("inf")
        both = fr & fg
        max_abs = float(np.max(np.abs(r[both] - g[both]))) if both.any() else 0.0
        scale = math.sqrt(float(np.mean(np.square(np.where(fr, r, 0.0)))))
    if scale > 0:
        return max_abs / scale
    return 0.0 if max_abs == 0 else float("inf")



# ---------------------------------------------------------------------------------------------
# The pass


def localize(conversion: "Conversion", feeds: dict[str, np.ndarray], *, cntk_onnx: str | os.PathLike | None = None,
             device: str = "cpu", budgets: BudgetConfig | dict | None = None, worker: Any = None,
             confirm: bool = True, time_budget_s: float | None = None, chunk: int = DEFAULT_CHUNK,
             stop_at_culprit: bool = False, cntk_python: str | None = None) -> Localization:
    """Find the first node of ``conversion``'s graph whose own error in CNTK exceeds its budget.

    ``feeds`` are the model inputs (ONNX names, e.g. a failing parity example's); ``cntk_onnx``
    is the graph CNTK evaluates (default: the converted one), node names matching the converted
    graph's. ``time_budget_s`` stops the pass early (the report says where); ``chunk`` bounds
    how many nodes' tensors are fetched per CNTK eval.
    """
    return _Pass(conversion, feeds, cntk_onnx, device, budgets, worker, confirm, time_budget_s,
                 max(1, int(chunk)), stop_at_culprit, cntk_python).run()


class _Pass:
    def __init__(self, conversion: "Conversion", feeds: dict[str, np.ndarray], cntk_onnx: Any, device: str,
                 budgets: BudgetConfig | dict | None, worker: Any, confirm: bool, time_budget_s: float | None,
                 chunk: int, stop_at_culprit: bool, cntk_python: str | None) -> None:
        from pytest_tf2cntk.devices import normalize_device

        self.started = time.perf_counter()
        self.conversion = conversion
        self.device = normalize_device(device)
        self.config = budgets if isinstance(budgets, BudgetConfig) else BudgetConfig.from_mapping(budgets)
        self.cntk_onnx = str(cntk_onnx or conversion.onnx_path)
        self.confirm = confirm
        self.deadline = self.started + time_budget_s if time_budget_s else None
        self.time_budget_s = time_budget_s
        self.chunk = chunk
        self.stop_at_culprit = stop_at_culprit
        self.timings = {"setup": 0.0, "cntk": 0.0, "ort_graph": 0.0, "local": 0.0, "confirm": 0.0}
        self.ref = _GraphFacts.of(conversion.onnx_model)
        same = os.path.abspath(self.cntk_onnx) == os.path.abspath(str(conversion.onnx_path))
        self.cg = self.ref if same else _GraphFacts.of(onnx.load(self.cntk_onnx))
        self.feeds = {k: np.asarray(v) for k, v in feeds.items()}
        missing = [n for n in self.ref.inputs if n not in self.feeds]
        if missing:
            from pytest_tf2cntk.errors import Tf2CntkError

            raise Tf2CntkError(f"localize: no value for input(s) {', '.join(missing)} "
                               f"(got {', '.join(sorted(self.feeds)) or 'none'})")
        if worker is None:
            from pytest_tf2cntk.cntk.client import get_worker

            worker = get_worker(cntk_python)
        self.worker = worker
        self.layers = _keras_layer_names(conversion)
        self.terms = node_terms(self.ref.model, self.config)
        self._culprit_inputs: dict[str, Any] = {}
        self.poisoned: dict[str, str] = {}
        self.cidx: _CntkIndex | None = None

    # -- helpers ------------------------------------------------------------------------------

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.perf_counter() > self.deadline

    def budget_of(self, node: onnx.NodeProto) -> float:
        term = self.terms.get(node.name or node.output[0])
        out_dtype = _np_dtype(self.ref.types.get(node.output[0]))
        u = UNIT_ROUNDOFF.get(out_dtype, 2.0 ** -24)
        if term is None:
            return self.config.headroom * self.config.scale * u
        return op_budget(term, self.config, u)

    def est_bytes(self, tensor: str) -> int:
        shape = self.ref.shapes.get(tensor)
        if not shape or any(d is None for d in shape):
            return 1 << 20
        return int(np.prod(shape)) * _np_dtype(self.ref.types.get(tensor)).itemsize

    def cntk_eval(self, uids: list[str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """CNTK values by uid; uids CNTK cannot combine are bisected out and reported."""
        from pytest_tf2cntk.errors import WorkerCrashed, WorkerTimeout

        failed: dict[str, str] = {}
        if self.poisoned:  # downstream of a variable CNTK cannot evaluate: do not even ask
            keep = []
            for u in uids:
                if u in self.poisoned:
                    failed[u] = self.poisoned[u]
                else:
                    keep.append(u)
            uids = keep
        if not uids:
            return {}, failed
        try:
            return self.worker.eval(self.loaded, self.cntk_feeds, outputs=uids), failed
        except (WorkerCrashed, WorkerTimeout):
            raise
        except Exception as exc:
            if len(uids) == 1:
                failed[uids[0]] = f"CNTK cannot evaluate it: {str(exc).splitlines()[0][:200]}"
                return {}, failed
        half = len(uids) // 2
        a, fa = self.cntk_eval(uids[:half])
        b, fb = self.cntk_eval(uids[half:])
        a.update(b)
        fa.update(fb)
        fa.update(failed)
        for u, why in list(fa.items()):  # everything computed from a failing variable fails too
            stack = [u]
            while stack:
                for f in self.cidx.users.get(stack.pop(), []) if self.cidx else []:
                    for o in f.outputs:
                        if o.cntk_uid not in self.poisoned and o.cntk_uid not in fa:
                            self.poisoned[o.cntk_uid] = why + " (upstream)"
                            stack.append(o.cntk_uid)
        return a, fa

    # -- the pass ------------------------------------------------------------------------------

    def run(self) -> Localization:
        ref = self.ref
        t0 = time.perf_counter()
        self.loaded = self.worker.load(self.cntk_onnx, device=self.device)
        try:
            self.cntk_feeds = {i.name: _to_dtype(self.feeds[i.name], np.dtype(i.dtype))
                               for i in self.loaded.inputs if i.name in self.feeds}
            cnodes = self.worker.nodes(self.loaded)
            self.cidx = _CntkIndex(self.loaded, cnodes)
            self.mapping = map_tensors(ref, self.cg, self.loaded, cnodes, self.cidx)
            self.timings["setup"] += time.perf_counter() - t0
            loc = self.scan()
        finally:
            try:
                self.worker.unload(self.loaded)
            except Exception:
                pass
        if loc.culprit is not None and self.confirm:
            if self.out_of_time():
                loc.confirmation = Confirmation("not run: time budget spent")
            else:
                t1 = time.perf_counter()
                loc.confirmation = self.confirm_culprit(loc.culprit)
                self.timings["confirm"] += time.perf_counter() - t1
        loc.seconds = time.perf_counter() - self.started
        loc.timings = {k: round(v, 4) for k, v in self.timings.items()}
        return loc

    def scan(self) -> Localization:
        ref = self.ref
        order = ref.order
        # data-dependent tensors: graph inputs and what nodes compute from them
        data = set(ref.inputs)
        for node in order:
            if any(i in data for i in node.input if i):
                data.update(t for t in node.output if t)
        uses: dict[str, int] = {}
        for node in order:
            for i in dict.fromkeys(node.input):
                if i and i not in ref.consts and i not in ref.inputs:
                    uses[i] = uses.get(i, 0) + 1
        reports: list[NodeReport] = []
        report_of: dict[int, NodeReport] = {}
        for k, node in enumerate(order):
            r = NodeReport(node.name or f"<unnamed {node.op_type} -> {node.output[0]}>", node.op_type,
                           tf_layer_of(node, self.layers, ref.consts), og.tf_origin(node) if node.name else "",
                           index=k)
            r.mapping = [self.mapping[t] for t in node.output if t and t in self.mapping]
            cnode = self.cg.by_name.get(node.name) if node.name else None
            if cnode is not None and self.cg is not ref:
                diff = _node_diff(node, cnode, ref.consts, self.cg.consts)
                if diff:
                    r.notes.append(f"the CNTK-bound graph differs at this node: {diff}")
            reports.append(r)
            report_of[id(node)] = r
        cntk_held: dict[str, np.ndarray] = {}   # observable CNTK values still needed
        ort_held: dict[str, np.ndarray] = {}    # ONNX Runtime values of unobservable/constant tensors
        feeds_ort = {n: self.feeds[n] for n in ref.inputs}
        for r in reports:
            r.status = STATUS_PENDING
        culprit: NodeReport | None = None
        checked = 0
        stopped = ""
        pos = 0
        peak = 0
        chunks = 0
        while pos < len(order):
            if culprit is not None and self.stop_at_culprit:
                break
            if self.out_of_time():
                stopped = (f"stopped after {checked} of {len(order)} nodes (time budget "
                           f"{self.time_budget_s:g} s)")
                break
            # the next chunk: at most self.chunk nodes and about CHUNK_BYTES per side
            end, size = pos, 0
            while end < len(order) and end - pos < self.chunk:
                size += sum(self.est_bytes(t) for t in order[end].output if t)
                end += 1
                if size > CHUNK_BYTES:
                    break
            nodes = order[pos:end]
            pos = end
            wanted = [t for n in nodes for t in n.output if t and t in data]
            uids = sorted({self.mapping[t].cntk_uid for t in wanted
                           if t in self.mapping and self.mapping[t].mapped})
            t1 = time.perf_counter()
            by_uid, failed = self.cntk_eval(uids)
            self.timings["cntk"] += time.perf_counter() - t1
            t1 = time.perf_counter()
            ort_names = [t for n in nodes for t in n.output if t]
            ort_vals = self._ort_graph(ort_names, feeds_ort)
            self.timings["ort_graph"] += time.perf_counter() - t1
            chunks += 1
            peak = max(peak, sum(v.nbytes for d in (by_uid, ort_vals, cntk_held, ort_held)
                                 for v in d.values() if v is not None))
            for node in nodes:
                r = report_of[id(node)]
                if stopped or (culprit is not None and self.stop_at_culprit):
                    r.status = STATUS_SKIPPED
                    continue
                if self.out_of_time():
                    stopped = (f"stopped after {checked} of {len(order)} nodes (time budget "
                               f"{self.time_budget_s:g} s)")
                    r.status = STATUS_NOT_REACHED
                    continue
                t1 = time.perf_counter()
                self._check_node(node, r, data, by_uid, failed, ort_vals, cntk_held, ort_held)
                self.timings["local"] += time.perf_counter() - t1
                checked += 1
                if r.over and culprit is None:
                    culprit = r
                # release what no later node reads
                for i in dict.fromkeys(node.input):
                    if i in uses:
                        uses[i] -= 1
                        if uses[i] <= 0:
                            cntk_held.pop(i, None)
                            ort_held.pop(i, None)
                for t in node.output:
                    if t and uses.get(t, 0) <= 0:
                        cntk_held.pop(t, None)
                        ort_held.pop(t, None)
            del by_uid, ort_vals
        for r in reports:
            if r.status == STATUS_PENDING:
                r.status = STATUS_NOT_REACHED if stopped else STATUS_SKIPPED
        loc = Localization(str(self.conversion.source), self.device, str(self.conversion.onnx_path),
                           self.cntk_onnx, culprit, reports, checked=checked, total=len(order),
                           stopped_early=stopped)
        everything = 2 * sum(self.est_bytes(t) for n in order for t in n.output if t and t in data)
        loc.memory = {"peak_held_mb": round(peak / 1e6, 3), "all_intermediates_mb": round(everything / 1e6, 3),
                      "chunks": chunks}
        if culprit is not None:
            loc.suspects = self._suspects(culprit, order)
        if self.stop_at_culprit and culprit is not None:
            loc.notes.append(f"stopped at the culprit: {sum(r.status == STATUS_SKIPPED for r in reports)} "
                             "later node(s) not checked")
        odd = [r for r in reports if any("shape differs" in m.reason for m in r.mapping)]
        if odd:
            loc.notes.append(f"{len(odd)} node(s) have CNTK shapes that differ from ONNX (not compared): "
                             + ", ".join(r.node for r in odd[:3]) + (" ..." if len(odd) > 3 else ""))
        return loc

    def _ort_graph(self, names: list[str], feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from pytest_tf2cntk.convert import onnxrt
        from pytest_tf2cntk.errors import DeviceUnavailable

        if not names:
            return {}
        model = onnxrt.with_outputs(self.ref.model, names)
        keep = set(names)
        # only the requested tensors come back (the model's own outputs are dropped if not asked)
        del model.graph.output[:]
        for n in names:
            model.graph.output.append(onnx.ValueInfoProto(name=n))
        try:
            sess = onnxrt.session(model, self.device)
        except DeviceUnavailable:
            sess = onnxrt.session(model, "cpu")
        vals = sess.run(names, feeds)
        return {n: v for n, v in zip(names, vals) if n in keep}

    def _check_node(self, node: onnx.NodeProto, r: NodeReport, data: set[str], by_uid: dict[str, np.ndarray],
                    failed: dict[str, str], ort_vals: dict[str, np.ndarray], cntk_held: dict[str, np.ndarray],
                    ort_held: dict[str, np.ndarray]) -> None:
        ref = self.ref
        outs = [t for t in node.output if t]
        # the node's outputs on the CNTK side
        cntk_out: dict[str, np.ndarray] = {}
        unmapped: list[str] = []
        cntk_errors: list[str] = []
        for t in outs:
            m = self.mapping.get(t)
            ort_v = ort_vals.get(t)
            if t not in data:
                ort_held[t] = ort_v
                continue
            if m is None or not m.mapped:
                unmapped.append(m.reason if m is not None else "not mapped")
                ort_held[t] = ort_v
                continue
            if m.cntk_uid in failed:
                cntk_errors.append(failed[m.cntk_uid])
                unmapped.append(failed[m.cntk_uid])
                ort_held[t] = ort_v
                continue
            v = by_uid.get(m.cntk_uid)
            ref_shape = ort_v.shape if ort_v is not None else ref.shapes.get(t)
            if v is None:
                m.reason = "CNTK returned no value"
                unmapped.append(m.reason)
                ort_held[t] = ort_v
                continue
            if ref_shape is not None and tuple(v.shape) != tuple(ref_shape):
                if [d for d in v.shape if d != 1] == [d for d in ref_shape if d != 1]:
                    v = v.reshape(ref_shape)
                    m.value_note = f"CNTK value {list(by_uid[m.cntk_uid].shape)} has other size-1 axes: reshaped"
                else:
                    same = int(np.prod(v.shape)) == int(np.prod(ref_shape))
                    m.reason = (f"shape differs: CNTK {list(v.shape)} vs ONNX {list(ref_shape)}"
                                + (" (same element count: a permutation or reshape, ambiguous)" if same else ""))
                    unmapped.append(m.reason)
                    ort_held[t] = ort_v
                    continue
            v = _to_dtype(v, _np_dtype(ref.types.get(t)) if ort_v is None else ort_v.dtype)
            cntk_out[t] = v
            cntk_held[t] = v
            if ort_v is not None:
                r.drift = max(r.drift or 0.0, scaled_error(ort_v, v))
        if not any(i in data for i in node.input if i):
            r.status = STATUS_CONSTANT
            return
        if not cntk_out and not cntk_errors:
            r.status = "unmapped: " + (unmapped[0] if unmapped else "no output to compare")
            return
        # the node's inputs: CNTK's values where observable, else ONNX Runtime's (marked)
        inputs: dict[str, np.ndarray] = {}
        consts: dict[str, np.ndarray] = {}
        for i in dict.fromkeys(node.input):
            if not i:
                continue
            if i in ref.consts:
                consts[i] = ref.consts[i]
            elif i in self.feeds and i in ref.inputs:
                inputs[i] = np.asarray(self.feeds[i])
            elif i in cntk_held:
                inputs[i] = cntk_held[i]
            elif i in ort_held and ort_held[i] is not None:
                if i in data:
                    inputs[i] = ort_held[i]
                    r.inputs_from_ort.append(i)
                else:
                    consts[i] = ort_held[i]
            else:
                r.status = f"no local reference: input {i} has no value"
                return
        if not cntk_out:
            if r.inputs_from_ort:  # CNTK fails upstream already
                r.status = f"unmapped: {cntk_errors[0]} (an input is not evaluable either)"
                return
            # CNTK computes every input of the node but not the node itself: it is the culprit
            r.base_budget = r.budget = self.budget_of(node)
            r.local_error = float("inf")
            r.status = STATUS_OVER
            r.notes.append(cntk_errors[0])
            if not self._culprit_inputs:
                self._culprit_inputs = {"inputs": inputs, "consts": consts, "local": {}, "cntk": {},
                                        "cntk_error": cntk_errors[0]}
            return
        model = one_node_model(node, inputs, consts, ref.types, ref.model.opset_import, ref.model.ir_version)
        try:
            sess = _session(model, self.device)
            names = [o.name for o in sess.get_outputs()]
            local = dict(zip(names, sess.run(names, inputs)))
        except Exception as exc:
            r.status = f"no local reference: ONNX Runtime cannot run the node alone ({str(exc).splitlines()[0][:120]})"
            return
        errors = {t: scaled_error(local[t], v) for t, v in cntk_out.items() if t in local}
        if not errors:
            r.status = "no local reference: ONNX Runtime returned none of the mapped outputs"
            return
        worst = max(errors, key=lambda t: errors[t])
        r.local_error = errors[worst]
        r.base_budget = self.budget_of(node)
        r.condition = self.condition(node, inputs, consts, local[worst], worst) if r.local_error > 0.1 * r.base_budget \
            else 1.0
        r.budget = r.base_budget * r.condition
        if unmapped:
            r.notes.append(f"only {len(cntk_out)} of {len(outs)} outputs compared: {unmapped[0]}")
        if r.inputs_from_ort:
            r.notes.append("input(s) " + ", ".join(r.inputs_from_ort) + " from ONNX Runtime (not observable in CNTK)")
        r.status = STATUS_OVER if (r.ratio or 0.0) > 1.0 else STATUS_OK
        if r.over:
            m = compare(local[worst], cntk_out[worst])
            r.metrics = dict(m.to_json(), tensor=worst)
        if r.over and not self._culprit_inputs:
            self._culprit_inputs = {"inputs": inputs, "consts": consts, "local": local, "cntk": cntk_out}

    def condition(self, node: onnx.NodeProto, inputs: dict[str, np.ndarray], consts: dict[str, np.ndarray],
                  out: np.ndarray, tensor: str) -> float:
        """kappa = rms(|node|(|inputs|)) / rms(node(inputs)) for accumulating ops, else 1.

        A sum's rounding error is bounded relative to the magnitudes it adds, not to its result
        (|fl(sum) - sum| <= gamma_K * sum|terms|): where the terms cancel (a depthwise conv on a
        smooth image, say) a correct implementation's error is kappa times larger relative to
        the result. The node's budget is scaled by kappa, computed by running the node alone on
        the absolute values of its inputs and constants."""
        if node.op_type not in LINEAR_ACCUMULATING or out.dtype.kind != "f":
            return 1.0
        abs_in = {k: np.abs(v) for k, v in inputs.items()}
        abs_c = {k: np.abs(v) if np.issubdtype(np.asarray(v).dtype, np.floating) else v for k, v in consts.items()}
        try:
            model = one_node_model(node, abs_in, abs_c, self.ref.types, self.ref.model.opset_import,
                                   self.ref.model.ir_version)
            sess = _session(model, self.device)
            mags = np.abs(sess.run([tensor], abs_in)[0]).astype(np.float64)
        except Exception:
            return 1.0
        denom = math.sqrt(float(np.mean(np.square(out.astype(np.float64)))))
        num = math.sqrt(float(np.mean(np.square(mags))))
        if not (denom > 0 and math.isfinite(num)):
            return 1.0
        return max(1.0, num / denom)

    def _suspects(self, culprit: NodeReport, order: list[onnx.NodeProto]) -> list[str]:
        """The culprit, plus the unobservable producers whose error could hide in its inputs."""
        suspects = [culprit.node]
        producers = og.producers(self.ref.model)
        stack = list(culprit.inputs_from_ort)
        seen: set[str] = set()
        while stack:
            t = stack.pop()
            p = producers.get(t)
            if p is None or t in seen:
                continue
            seen.add(t)
            suspects.append(p.name or t)
            m = self.mapping.get(t)
            if m is None or not m.mapped:
                stack.extend(i for i in p.input if i and i not in self.ref.consts
                             and not (self.mapping.get(i) and self.mapping[i].mapped))
        return suspects

    def confirm_culprit(self, culprit: NodeReport) -> Confirmation:
        """The culprit alone, as a one-node ONNX model, in CNTK and in ONNX Runtime, on CNTK's inputs."""
        saved = self._culprit_inputs
        if not saved:
            return Confirmation("not run: the culprit's inputs were not kept")
        node = self.cg.by_name.get(culprit.node)
        if node is None:
            return Confirmation("not run: the culprit is not in the CNTK-bound graph by name")
        inputs, local, cntk_out = saved["inputs"], saved["local"], saved["cntk"]
        consts = dict(saved["consts"])
        for i in node.input:  # the CNTK-bound graph's own constants (it may differ from the reference)
            if i and i not in inputs:
                if i in self.cg.consts:
                    consts[i] = self.cg.consts[i]
                elif i not in consts:
                    return Confirmation(f"not run: input {i} of the CNTK-bound node has no value")
        model = one_node_model(node, inputs, consts, self.cg.types, self.cg.model.opset_import,
                               min(self.cg.model.ir_version or 4, 4), list_initializers=True)
        tmp = Path(tempfile.mkdtemp(prefix="tf2cntk-localize-"))
        path = tmp / "culprit.onnx"
        onnx.save(model, str(path))
        loaded = None
        try:
            loaded = self.worker.load(str(path), device=self.device)
            feeds = {i.name: _to_dtype(inputs[i.name], np.dtype(i.dtype)) for i in loaded.inputs
                     if i.name in inputs}
            got = self.worker.eval(loaded, feeds)
        except Exception as exc:
            message = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            if saved.get("cntk_error"):
                return Confirmation(CONFIRMED, detail=f"CNTK fails on the node alone too: {message}")
            return Confirmation(NOT_REPRODUCED, detail=f"CNTK could not run the node alone: {message}")
        finally:
            if loaded is not None:
                try:
                    self.worker.unload(loaded)
                except Exception:
                    pass
            try:
                path.unlink()
                tmp.rmdir()
            except OSError:
                pass
        errs, in_graph = [], []
        for t, ref_v in local.items():
            if t not in got:
                continue
            v = _to_dtype(got[t], ref_v.dtype)
            if v.shape != ref_v.shape and [d for d in v.shape if d != 1] == [d for d in ref_v.shape if d != 1]:
                v = v.reshape(ref_v.shape)
            errs.append(scaled_error(ref_v, v))
            if t in cntk_out:
                in_graph.append(scaled_error(cntk_out[t], v) if np.any(cntk_out[t]) else 0.0)
        if saved.get("cntk_error"):
            return Confirmation(NOT_REPRODUCED, detail="CNTK computes the node alone but not inside the graph")
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


def _node_diff(ref_node: onnx.NodeProto, cnode: onnx.NodeProto, ref_consts: dict[str, np.ndarray],
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


# ---------------------------------------------------------------------------------------------
# CLI: tf2cntk localize MODEL [--input FILE.npz] [--batch N] [--cntk-onnx PATH] [--seed S]


def register_cli(subparsers: Any) -> None:
    p = subparsers.add_parser("localize", help="name the first op whose own error in CNTK breaks its budget")
    p.add_argument("model", help="SavedModel directory, .keras or .h5 file")
    p.add_argument("--input", default=None, help="a reproducer .npz written by a parity failure: its inputs "
                                                 "(and its embedded CNTK-bound graph) are used")
    p.add_argument("--batch", type=int, default=None, help="fixed batch size (default: the reproducer's, else 1)")
    p.add_argument("--cntk-onnx", default=None, help="evaluate this ONNX file in CNTK instead")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs without --input")
    p.add_argument("--device", default=None, help="cpu (default, or the reproducer's), gpu or gpu:N")
    p.add_argument("--opset", type=int, default=None)
    p.add_argument("--signature", default=None)
    p.add_argument("--unsafe-load", action="store_true")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--cntk-python", default=None)
    p.add_argument("--time-budget", type=float, default=None, help="stop after this many seconds")
    p.add_argument("--no-confirm", action="store_true", help="skip running the culprit alone")
    p.add_argument("--limit", type=int, default=10, help="rows of the table (default %(default)s)")
    p.add_argument("--json", default=None, help="also write the full report (with the mapping) here")
    p.set_defaults(func=cmd_localize)


def cmd_localize(args: Any) -> int:
    from pytest_tf2cntk.convert.pipeline import DEFAULT_BATCH, DEFAULT_OPSET, convert

    meta: dict[str, Any] = {}
    feeds: dict[str, np.ndarray] | None = None
    cntk_onnx = args.cntk_onnx
    tmpdir = None
    if args.input:
        from pytest_tf2cntk.parity.reproducer import read_reproducer

        meta, groups = read_reproducer(args.input)
        feeds = dict(groups["input"])
        if cntk_onnx is None:
            if "cntk_onnx" in groups:
                tmpdir = tempfile.mkdtemp(prefix="tf2cntk-localize-")
                cntk_onnx = str(Path(tmpdir) / "cntk.onnx")
                Path(cntk_onnx).write_bytes(groups["cntk_onnx"]["bytes"].tobytes())
            elif meta.get("cntk_onnx_path") and os.path.exists(meta["cntk_onnx_path"]):
                cntk_onnx = meta["cntk_onnx_path"]
    batch = args.batch or meta.get("batch") or DEFAULT_BATCH
    conv = convert(args.model, batch=batch, opset=args.opset or meta.get("opset") or DEFAULT_OPSET,
                   signature=args.signature or meta.get("signature"),
                   unsafe_load=args.unsafe_load or bool(meta.get("unsafe_load")), cache_dir=args.cache_dir)
    if cntk_onnx and os.path.abspath(cntk_onnx) == os.path.abspath(str(conv.onnx_path)):
        cntk_onnx = None
    if feeds is None:
        from pytest_tf2cntk.convert.domains import derive_domains, random_feeds

        feeds = random_feeds(derive_domains(conv.onnx_model), np.random.default_rng(args.seed))
    device = args.device or meta.get("device") or "cpu"
    try:
        loc = localize(conv, feeds, cntk_onnx=cntk_onnx, device=device, confirm=not args.no_confirm,
                       time_budget_s=args.time_budget, cntk_python=args.cntk_python)
    finally:
        if tmpdir:
            for f in Path(tmpdir).iterdir():
                f.unlink()
            os.rmdir(tmpdir)
    text = str(loc)
    if args.limit != 10:
        text = text.replace(loc.table(), loc.table(args.limit))
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(loc.to_json(), indent=1, default=str))
        print(f"report written to {args.json}")
    return 1 if loc.culprit is not None else 0
