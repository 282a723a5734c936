"""Which CNTK variable holds each ONNX tensor: recorded per tensor, never guessed.

CNTK keeps ONNX *node* names as function names; the worker's ``nodes`` op lists every top-level
CNTK function with its inputs, outputs (uid, shape) and the ONNX tensors of the node it carries
the name of. An ONNX tensor T of node P is read in CNTK as:
  1. by name: output i of the CNTK function named P (when it has as many outputs as P), then
     moved forward through anonymous shape-preserving CNTK functions that are P's only
     consumer and read nothing else data-dependent (CNTK's separate bias Plus after a Conv);
  2. by structure, when no CNTK function has P's name (CNTK drops the names of Gemm blocks):
     the one anonymous, unclaimed CNTK function whose data inputs are exactly the CNTK tensors
     of P's data inputs and whose output shape is T's; several -> unmapped (ambiguous);
  2b. by consumer, when that fails too (an LSTM becomes a chain of anonymous sequence ops):
     what the CNTK function of a named consumer of T reads in T's place, i.e. the nearest
     variable with T's shape behind that input; consumers that disagree -> unmapped;
  3. a graph output not found so: the worker's own output matching (its output markers);
and its value must then have T's shape (up to size-1 axes, which do not move elements; axis
order is ONNX's on both sides). Anything else is "unmapped: <reason>" (docs/layerwise.md).
"""
from __future__ import annotations

from typing import Any, Iterable

import onnx

from pytest_tf2cntk.convert import onnx_graph as og
from pytest_tf2cntk.parity.localize.graph import GraphFacts
from pytest_tf2cntk.parity.localize.report import TensorMapping


def compatible(cshape: Iterable | None, oshape: Iterable | None) -> bool:
    """Shapes that agree up to free (None) and size-1 axes."""
    if cshape is None or oshape is None:
        return True
    c, o = list(cshape), list(oshape)
    if len(c) == len(o):
        return all(a is None or b is None or a == b for a, b in zip(c, o))
    cs = [d for d in c if d != 1]
    os_ = [d for d in o if d != 1]
    return len(cs) == len(os_) and all(a is None or b is None or a == b for a, b in zip(cs, os_))


class CntkIndex:
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

    def data_inputs(self, f: Any) -> list[str]:
        return [i for i in dict.fromkeys(f.inputs) if i in self.data]


def map_tensors(ref: GraphFacts, cg: GraphFacts, loaded: Any, cnodes: list,
                idx: CntkIndex | None = None) -> dict[str, TensorMapping]:
    """ONNX tensor of the reference graph -> how CNTK exposes it (see the module docstring).

    ``cg`` is the graph CNTK loaded (the same as ``ref`` unless a patched graph is evaluated);
    node names are shared, so the result is keyed by the reference graph's tensor names."""
    mapper = _Mapper(cg, idx or CntkIndex(loaded, cnodes))
    mapper.map_inputs()
    mapper.map_by_name()
    mapper.map_the_rest()
    mapper.map_graph_outputs()
    return mapper.for_reference(ref)


class _Mapper:
    def __init__(self, cg: GraphFacts, idx: CntkIndex) -> None:
        self.cg = cg
        self.idx = idx
        self.onnx_names = {n.name for n in cg.model.graph.node if n.name}
        self.claimed: set[str] = set()  # CNTK function uids that belong to some ONNX node
        self.found: dict[str, TensorMapping] = {}  # cg tensor -> mapping (shape = ONNX shape)
        self.users = og.consumers(cg.model)
        self.named_fn = {f.name: f for f in idx.funcs if f.onnx_outputs}
        self.named_fail: dict[str, str] = {}
        self.structure_fail: dict[str, str] = {}
        self.mapped_uids: set[str] = set()

    def shape_of(self, tensor: str) -> tuple | None:
        return self.cg.shapes.get(tensor)

    def record(self, tensor: str, uid: str, rule: str) -> None:
        f, i = self.idx.out_of.get(uid, (None, 0))
        info = f.outputs[i] if f is not None else None
        self.found[tensor] = TensorMapping(tensor, self.shape_of(tensor), uid, f.name if f else "",
                                           f.op_name if f else "argument",
                                           tuple(info.shape) if info is not None else None, rule)

    def forward(self, tensor: str) -> None:
        """Move the mapping over anonymous shape-preserving functions that complete the node."""
        m = self.found[tensor]
        hops = []
        if any(not c.name for c in self.users.get(tensor, [])):
            return  # an unnamed ONNX consumer is an anonymous CNTK function too: cannot tell them apart
        while True:
            users = self.idx.users.get(m.cntk_uid or "", [])
            if len(users) != 1:
                break
            f = users[0]
            if f.uid in self.claimed or (f.name and f.name in self.onnx_names) or len(f.outputs) != 1:
                break
            if not compatible(f.outputs[0].shape, m.onnx_shape):
                break
            if any(i in self.idx.data for i in f.inputs if i != m.cntk_uid):
                break
            self.claimed.add(f.uid)
            hops.append(f.op_name)
            m.cntk_uid = f.outputs[0].cntk_uid
            m.cntk_op = f.op_name
            m.cntk_shape = tuple(f.outputs[0].shape)
        if hops:
            m.rule += " + anonymous " + " -> ".join(hops) + " after it"

    # -- the rules, in order ---------------------------------------------------------------

    def map_inputs(self) -> None:
        for name in self.cg.inputs:
            uid = self.idx.arg_uid.get(name)
            if uid is not None:
                self.found[name] = TensorMapping(name, self.shape_of(name), uid, name, "argument",
                                                 self.shape_of(name), "graph input (CNTK argument of that name)")

    def map_by_name(self) -> None:
        """1. The worker tells which ONNX tensors each named CNTK function carries."""
        for f in self.idx.funcs:
            if not f.onnx_outputs:
                continue
            self.claimed.add(f.uid)
            node = self.cg.by_name.get(f.name)
            outs = list(node.output if node is not None else f.onnx_outputs)
            rule = f"name (CNTK {f.op_name} function {f.name!r})"
            if len(f.outputs) == len(outs):
                for i, t in enumerate(outs):
                    if t:
                        self.record(t, f.outputs[i].cntk_uid, rule)
            elif len(outs) == 1 or (len(f.outputs) == 1 and sum(1 for t in outs if t) == 1):
                self.record(next(t for t in outs if t), f.outputs[0].cntk_uid, rule)
            else:
                for t in outs:
                    self.named_fail[t] = (f"multi-output node: ONNX has {len(outs)} outputs, its CNTK "
                                          f"function {f.name!r} has {len(f.outputs)}")
        for t in list(self.found):
            if self.found[t].rule.startswith("name"):
                self.forward(t)

    def map_the_rest(self) -> None:
        """2. by structure, in topological order (inputs first); 2b. by consumer."""
        for node in self.cg.order:
            outs = [t for t in node.output if t]
            if not outs or all(t in self.found for t in outs):
                continue
            if not any(i and i not in self.cg.consts for i in node.input):
                continue  # a constant subgraph: nothing to map
            why = "" if node.name else "unnamed ONNX node (CNTK drops the names of unnamed nodes); "
            if not any(t in self.named_fail for t in outs):
                failure = self.by_structure(node, outs, why)
                if not failure:
                    continue
                for t in outs:
                    self.structure_fail[t] = why + failure
            # what a named consumer reads in its place (CNTK built the node from several anonymous
            # functions, e.g. an LSTM over sequence axes, or it has fewer outputs)
            for t in outs:
                if t not in self.found:
                    self._map_by_consumer(t, why)

    def _map_by_consumer(self, t: str, why: str) -> None:
        found = self.by_consumer(t)
        if isinstance(found, tuple):
            uid, cname = found
            self.record(t, uid, f"{why}consumer input (the value CNTK function {cname!r} reads in its "
                                "place: the nearest variable with this shape behind that input)")
            self.structure_fail.pop(t, None)
            self.named_fail.pop(t, None)
        elif found:
            fails = self.named_fail if t in self.named_fail else self.structure_fail
            fails[t] = fails.get(t, "") + f"; {found}"

    def map_graph_outputs(self) -> None:
        """3. The worker's own output matching; a disagreement is reported, not resolved."""
        for out in self.cg.model.graph.output:
            info = self.idx.output_info.get(out.name)
            if info is None:
                continue
            if out.name in self.found:
                m = self.found[out.name]
                if m.cntk_uid != info.cntk_uid and info.matched in ("marker", "name"):
                    self.structure_fail[out.name] = (f"ambiguous: mapped to {m.cntk_uid} by {m.rule}, but the "
                                                     f"worker matched the graph output to {info.cntk_uid}")
                    del self.found[out.name]
                continue
            self.record(out.name, info.cntk_uid, f"graph output (worker matched it by {info.matched or 'cntk'})")

    # -- structure and consumers -----------------------------------------------------------

    def origin(self, uid: str, depth: int = 0) -> set[str]:
        """The mapped variables an anonymous CNTK variable is computed from, through 1-input chains."""
        if uid in self.mapped_uids or uid in self.idx.arg_uid.values() or depth > 16:
            return {uid}
        f = self.idx.out_of.get(uid, (None, 0))[0]
        if f is None or f.uid in self.claimed:
            return {uid}
        data_in = self.idx.data_inputs(f)
        if len(data_in) != 1:
            return {uid}
        return self.origin(data_in[0], depth + 1)

    def by_structure(self, node: onnx.NodeProto, outs: list[str], why: str) -> str:
        """Map the outputs of ``node`` to the one matching anonymous CNTK function, or say why not."""
        data_inputs = [i for i in dict.fromkeys(node.input) if i and i not in self.cg.consts]
        missing = [i for i in data_inputs if i not in self.found]
        if missing:
            return f"its input {missing[0]} is not mapped, so it cannot be found by structure"
        self.mapped_uids = {m.cntk_uid for m in self.found.values()}
        want = {self.found[i].cntk_uid for i in data_inputs}
        cands, direct = self._structure_candidates(outs, want)
        if len(direct) == 1:  # reading the inputs themselves beats reading them through others
            cands = direct
        if len(cands) == 1:
            f = cands[0]
            self.claimed.add(f.uid)
            for i, t in enumerate(outs):
                self.record(t, f.outputs[i].cntk_uid, f"{why}structure (the one anonymous CNTK {f.op_name} "
                            "function reading the same inputs, with this output shape)")
                self.forward(t)
            return ""
        if cands:
            return (f"ambiguous: {len(cands)} anonymous CNTK functions "
                    f"({', '.join(sorted({c.op_name for c in cands}))}) read the same inputs with this output shape")
        return (f"no CNTK function carries the name {node.name!r} and none matches it by structure "
                "(fused away or not exposed)") if node.name else "no anonymous CNTK function matches it by structure"

    def _structure_candidates(self, outs: list[str], want: set[str]) -> tuple[list, list]:
        cands, direct = [], []
        for f in self.idx.funcs:
            if f.uid in self.claimed or (f.name and f.name in self.onnx_names) or len(f.outputs) != len(outs):
                continue
            if not all(compatible(o.shape, self.shape_of(t)) for o, t in zip(f.outputs, outs)):
                continue
            data_in = self.idx.data_inputs(f)
            if not data_in:
                continue
            if set(data_in) == want:
                direct.append(f)
            got: set[str] = set()
            for i in data_in:
                got |= self.origin(i)
            if got == want:
                cands.append(f)
        return cands, direct

    def var_shape(self, uid: str) -> tuple | None:
        f, i = self.idx.out_of.get(uid, (None, 0))
        if f is not None:
            return tuple(f.outputs[i].shape)
        return self.shape_of(next((n for n, u in self.idx.arg_uid.items() if u == uid), ""))

    def by_consumer(self, tensor: str) -> tuple[str, str] | str:
        """(uid, consumer) of the variable a named CNTK consumer reads as ``tensor``, or why not."""
        found: set[tuple[str, str]] = set()
        for c in self.users.get(tensor, []):
            f = self.named_fn.get(c.name)
            if f is None:
                continue
            others = [i for i in dict.fromkeys(c.input) if i and i != tensor and i not in self.cg.consts]
            if any(i not in self.found for i in others):
                continue
            other_uids = {self.found[i].cntk_uid for i in others}
            cands = [v for v in (self._behind(x, other_uids, tensor) for x in self.idx.data_inputs(f))
                     if v is not None]
            if len(cands) == 1:
                found.add((cands[0], f.name))
        uids = {u for u, _ in found}
        if len(uids) == 1:
            return next(iter(found))
        if len(uids) > 1:
            return f"ambiguous: its consumers read {len(uids)} different CNTK variables in its place"
        return ""

    def _behind(self, uid: str, other_uids: set[str], tensor: str) -> str | None:
        """The nearest variable with ``tensor``'s shape behind a consumer's input, through
        unclaimed one-input CNTK functions; None when the path meets another input first."""
        v: str | None = uid
        for _ in range(32):
            if v is None or v in other_uids:
                return None
            if compatible(self.var_shape(v), self.shape_of(tensor)):
                return v
            g = self.idx.out_of.get(v, (None, 0))[0]
            data_in = self.idx.data_inputs(g) if g is not None else []
            if g is None or g.uid in self.claimed or len(data_in) != 1:
                return None
            v = data_in[0]
        return v

    # -- back to the reference graph --------------------------------------------------------

    def for_reference(self, ref: GraphFacts) -> dict[str, TensorMapping]:
        """Keyed by the reference graph's tensor names (node names are kept by mutations)."""
        result: dict[str, TensorMapping] = {}
        for name in ref.inputs:
            m = self.found.get(name)
            result[name] = m if m is not None else TensorMapping(name, ref.shapes.get(name),
                                                                 reason="no CNTK argument of that name")
        for node in ref.order:
            cnode = self.cg.by_name.get(node.name) if node.name else None
            for i, t in enumerate(node.output):
                if t:
                    result[t] = self._reference_mapping(node, cnode, i, t, ref.shapes.get(t))
        return result

    def _reference_mapping(self, node: onnx.NodeProto, cnode: onnx.NodeProto | None, i: int, t: str,
                           shape: tuple | None) -> TensorMapping:
        if not node.name:
            return TensorMapping(t, shape, reason="unnamed ONNX node: it cannot be matched by name across "
                                                  "the two graphs")
        if cnode is None:
            return TensorMapping(t, shape, reason="the node is not in the CNTK-bound graph")
        if i >= len(cnode.output) or not cnode.output[i]:
            return TensorMapping(t, shape, reason="the CNTK-bound graph's node has no such output")
        ct = cnode.output[i]
        m = self.found.get(ct)
        if m is None:
            reason = self.named_fail.get(ct) or self.structure_fail.get(ct) or (
                f"no CNTK function carries the name {node.name!r} (fused away or not exposed)")
            return TensorMapping(t, shape, reason=reason)
        m = TensorMapping(**{**m.__dict__, "onnx": t, "onnx_shape": shape})
        if not compatible(m.cntk_shape, shape):
            m.reason = f"shape differs: CNTK {list(m.cntk_shape or ())} vs ONNX {list(shape or ())}"
        return m
