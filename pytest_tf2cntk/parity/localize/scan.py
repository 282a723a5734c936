"""Layerwise localization: name the first op whose *own* error breaks its budget.

A parity failure says that an output is wrong, not where it went wrong. ``localize`` reads
every intermediate tensor of the converted graph on both sides and, node by node in
topological order, separates the error a node *adds* from the error it *receives*:

  local reference  r(n) = ONNX Runtime running node n alone on CNTK's values of n's inputs
  local error      e(n) = max|cntk(n) - r(n)| / rms(r(n))    (metrics.scaled_error)
  own budget       b(n) = budgets.op_budget(node term of n, config, unit roundoff) x kappa(n)

Error already present in the inputs is in both ``cntk(n)`` and ``r(n)``, so it cancels: only
what n itself does differently remains. kappa(n) >= 1 is the condition number of a sum-of-
products op (``isolate.condition``). The first node with e(n) > b(n) is the culprit (a node
CNTK cannot compute at all while it computes its inputs is one too, error inf); it is mapped to
its TF op and Keras layer, then confirmed by running it alone in CNTK and in ONNX Runtime.
How CNTK tensors are found for ONNX tensors: ``mapping``. A consumer of an unmapped tensor gets
ONNX Runtime's value of it instead, and says so.

Memory: nodes are taken in chunks (``chunk`` nodes and about CHUNK_BYTES of tensors per side);
one CNTK eval and one ONNX Runtime run per chunk fetch that chunk's tensors, and a tensor is kept
after its chunk only while a later node still reads it (reference counts from consumers).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import onnx

from pytest_tf2cntk.convert import onnx_graph as og
from pytest_tf2cntk.devices import normalize_device
from pytest_tf2cntk.errors import Tf2CntkError, WorkerCrashed, WorkerTimeout
from pytest_tf2cntk.parity.budgets import UNIT_ROUNDOFF, BudgetConfig, node_terms, op_budget
from pytest_tf2cntk.parity.localize import isolate
from pytest_tf2cntk.parity.localize.graph import GraphFacts, tf_layer_of, to_dtype
from pytest_tf2cntk.parity.localize.isolate import NodeInputs
from pytest_tf2cntk.parity.localize.mapping import CntkIndex, map_tensors
from pytest_tf2cntk.parity.localize.report import (STATUS_CONSTANT, STATUS_NOT_REACHED, STATUS_OK, STATUS_OVER,
                                                   STATUS_PENDING, STATUS_SKIPPED, Confirmation, Localization,
                                                   NodeReport)
from pytest_tf2cntk.parity.metrics import compare, scaled_error
from pytest_tf2cntk.parity.truth import error_vs_truth, rounding_floor
from pytest_tf2cntk.parity.runners import CNTKRunner, OrtRunner

if TYPE_CHECKING:
    from pytest_tf2cntk.convert.pipeline import Conversion

DEFAULT_CHUNK = 64
CHUNK_BYTES = 32 << 20  # per side (CNTK, ONNX Runtime) and chunk, estimated from static shapes


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
    if worker is None:
        from pytest_tf2cntk.cntk.client import get_worker

        worker = get_worker(cntk_python)
    config = budgets if isinstance(budgets, BudgetConfig) else BudgetConfig.from_mapping(budgets)
    scan = LocalizationScan(conversion, feeds, str(cntk_onnx or conversion.onnx_path), normalize_device(device),
                            config, worker, time_budget_s, max(1, int(chunk)), stop_at_culprit)
    return scan.run(confirm)


@dataclass
class _Held:
    """Values kept after their chunk while a later node still reads them."""

    cntk: dict[str, np.ndarray] = field(default_factory=dict)  # observable CNTK values
    ort: dict[str, np.ndarray | None] = field(default_factory=dict)  # ORT values of unobservable/constant ones
    uses: dict[str, int] = field(default_factory=dict)  # readers still to come

    def release(self, node: onnx.NodeProto) -> None:
        for i in dict.fromkeys(node.input):
            if i in self.uses:
                self.uses[i] -= 1
                if self.uses[i] <= 0:
                    self._drop(i)
        for t in node.output:
            if t and self.uses.get(t, 0) <= 0:
                self._drop(t)

    def _drop(self, t: str) -> None:
        self.cntk.pop(t, None)
        self.ort.pop(t, None)

    def nbytes(self) -> int:
        return sum(v.nbytes for d in (self.cntk, self.ort) for v in d.values() if v is not None)


class LocalizationScan:
    """One localization: the graphs, the CNTK model, the mapping and the node-by-node scan."""

    def __init__(self, conversion: "Conversion", feeds: dict[str, np.ndarray], cntk_onnx: str, device: str,
                 config: BudgetConfig, worker: Any, time_budget_s: float | None, chunk: int,
                 stop_at_culprit: bool) -> None:
        self.started = time.perf_counter()
        self.conversion = conversion
        self.device = device
        self.config = config
        self.cntk_onnx = cntk_onnx
        self.deadline = self.started + time_budget_s if time_budget_s else None
        self.time_budget_s = time_budget_s
        self.chunk = chunk
        self.stop_at_culprit = stop_at_culprit
        self.timings = {"setup": 0.0, "cntk": 0.0, "ort_graph": 0.0, "local": 0.0, "confirm": 0.0}
        self.ref = GraphFacts.of(conversion.onnx_model)
        same = os.path.abspath(cntk_onnx) == os.path.abspath(str(conversion.onnx_path))
        self.cg = self.ref if same else GraphFacts.of(onnx.load(cntk_onnx))
        self.feeds = {k: np.asarray(v) for k, v in feeds.items()}
        missing = [n for n in self.ref.inputs if n not in self.feeds]
        if missing:
            raise Tf2CntkError(f"localize: no value for input(s) {', '.join(missing)} "
                               f"(got {', '.join(sorted(self.feeds)) or 'none'})")
        self.worker = worker
        self.layers = conversion.layer_scopes  # TF name scope -> Keras layer
        self.terms = node_terms(self.ref.model, self.config)
        self.culprit_inputs: NodeInputs | None = None
        self.poisoned: dict[str, str] = {}
        self.data = self.ref.data_tensors()

    # -- helpers ------------------------------------------------------------------------------

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.perf_counter() > self.deadline

    def stop_note(self, checked: int) -> str:
        return f"stopped after {checked} of {len(self.ref.order)} nodes (time budget {self.time_budget_s:g} s)"

    def budget_of(self, node: onnx.NodeProto) -> float:
        term = self.terms.get(node.name or node.output[0])
        u = UNIT_ROUNDOFF.get(self.ref.dtype(node.output[0]), 2.0 ** -24)
        if term is None:
            return self.config.headroom * self.config.scale * u
        return op_budget(term, self.config, u)

    def cntk_eval(self, uids: list[str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """CNTK values by uid; uids CNTK cannot combine are bisected out and reported."""
        failed = {u: self.poisoned[u] for u in uids if u in self.poisoned}
        uids = [u for u in uids if u not in self.poisoned]  # downstream of a failure: do not even ask
        if not uids:
            return {}, failed
        try:
            return self.cntk.run(self.feeds, outputs=uids), failed
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
        self._poison(fa)
        return a, fa

    def _poison(self, failed: dict[str, str]) -> None:
        """Everything computed from a failing variable fails too."""
        for u, why in list(failed.items()):
            stack = [u]
            while stack:
                for f in self.cidx.users.get(stack.pop(), []):
                    for o in f.outputs:
                        if o.cntk_uid not in self.poisoned and o.cntk_uid not in failed:
                            self.poisoned[o.cntk_uid] = why + " (upstream)"
                            stack.append(o.cntk_uid)

    # -- the pass ------------------------------------------------------------------------------

    def run(self, confirm: bool = True) -> Localization:
        t0 = time.perf_counter()
        self.cntk = CNTKRunner(self.cntk_onnx, self.device, worker=self.worker)
        try:
            cnodes = self.cntk.nodes()
            self.cidx = CntkIndex(self.cntk.loaded, cnodes)
            self.mapping = map_tensors(self.ref, self.cg, self.cntk.loaded, cnodes, self.cidx)
            self.timings["setup"] += time.perf_counter() - t0
            loc = self.scan()
        finally:
            self.cntk.close()
        if loc.culprit is not None and confirm:
            if self.out_of_time():
                loc.confirmation = Confirmation("not run: time budget spent")
            else:
                t1 = time.perf_counter()
                loc.confirmation = isolate.confirm_culprit(loc.culprit, self.culprit_inputs, self.cg, self.worker,
                                                           self.device)
                self.timings["confirm"] += time.perf_counter() - t1
        loc.seconds = time.perf_counter() - self.started
        loc.timings = {k: round(v, 4) for k, v in self.timings.items()}
        return loc

    def reports(self) -> list[NodeReport]:
        reports = []
        for k, node in enumerate(self.ref.order):
            r = NodeReport(node.name or f"<unnamed {node.op_type} -> {node.output[0]}>", node.op_type,
                           tf_layer_of(node, self.layers, self.ref.consts), og.tf_origin(node) if node.name else "",
                           index=k, status=STATUS_PENDING)
            r.mapping = [self.mapping[t] for t in node.output if t and t in self.mapping]
            cnode = self.cg.by_name.get(node.name) if node.name else None
            if cnode is not None and self.cg is not self.ref:
                diff = isolate.node_diff(node, cnode, self.ref.consts, self.cg.consts)
                if diff:
                    r.notes.append(f"the CNTK-bound graph differs at this node: {diff}")
            reports.append(r)
        return reports

    def chunks(self) -> Iterator[list[onnx.NodeProto]]:
        """At most ``self.chunk`` nodes and about CHUNK_BYTES of outputs per side each."""
        order, pos = self.ref.order, 0
        while pos < len(order):
            end, size = pos, 0
            while end < len(order) and end - pos < self.chunk:
                size += sum(self.ref.est_bytes(t) for t in order[end].output if t)
                end += 1
                if size > CHUNK_BYTES:
                    break
            yield order[pos:end]
            pos = end

    def scan(self) -> Localization:
        reports = self.reports()
        held = _Held(uses=self._uses())
        culprit, checked, stopped, peak, chunks = None, 0, "", 0, 0
        index_of = {id(n): k for k, n in enumerate(self.ref.order)}
        for nodes in self.chunks():
            if (culprit is not None and self.stop_at_culprit) or self.out_of_time():
                stopped = "" if culprit is not None and self.stop_at_culprit else self.stop_note(checked)
                break
            by_uid, failed, ort_vals = self._fetch(nodes)
            chunks += 1
            peak = max(peak, held.nbytes() + sum(v.nbytes for d in (by_uid, ort_vals) for v in d.values()))
            for node in nodes:
                r = reports[index_of[id(node)]]
                if stopped or (culprit is not None and self.stop_at_culprit):
                    r.status = STATUS_SKIPPED
                    continue
                if self.out_of_time():
                    stopped, r.status = self.stop_note(checked), STATUS_NOT_REACHED
                    continue
                t1 = time.perf_counter()
                self.check_node(node, r, by_uid, failed, ort_vals, held)
                self.timings["local"] += time.perf_counter() - t1
                checked += 1
                if r.over and culprit is None:
                    culprit = r
                held.release(node)
        return self._finish(reports, culprit, checked, stopped, peak, chunks)

    def _uses(self) -> dict[str, int]:
        uses: dict[str, int] = {}
        for node in self.ref.order:
            for i in dict.fromkeys(node.input):
                if i and i not in self.ref.consts and i not in self.ref.inputs:
                    uses[i] = uses.get(i, 0) + 1
        return uses

    def _fetch(self, nodes: list[onnx.NodeProto]) -> tuple[dict, dict, dict]:
        """One CNTK eval and one ONNX Runtime run for the tensors of a chunk."""
        wanted = [t for n in nodes for t in n.output if t and t in self.data]
        uids = sorted({self.mapping[t].cntk_uid for t in wanted if t in self.mapping and self.mapping[t].mapped})
        t1 = time.perf_counter()
        by_uid, failed = self.cntk_eval(uids)
        self.timings["cntk"] += time.perf_counter() - t1
        t1 = time.perf_counter()
        ort_vals = self._ort_graph([t for n in nodes for t in n.output if t])
        self.timings["ort_graph"] += time.perf_counter() - t1
        return by_uid, failed, ort_vals

    def _finish(self, reports: list[NodeReport], culprit: NodeReport | None, checked: int, stopped: str,
                peak: int, chunks: int) -> Localization:
        for r in reports:
            if r.status == STATUS_PENDING:
                r.status = STATUS_NOT_REACHED if stopped else STATUS_SKIPPED
        loc = Localization(str(self.conversion.source), self.device, str(self.conversion.onnx_path),
                           self.cntk_onnx, reports, culprit.index if culprit is not None else None,
                           checked=checked, total=len(self.ref.order), stopped_early=stopped)
        everything = 2 * sum(self.ref.est_bytes(t) for n in self.ref.order for t in n.output if t and t in self.data)
        loc.memory = {"peak_held_mb": round(peak / 1e6, 3), "all_intermediates_mb": round(everything / 1e6, 3),
                      "chunks": chunks}
        if culprit is not None:
            loc.suspects = self._suspects(culprit)
            if self.stop_at_culprit:
                loc.notes.append(f"stopped at the culprit: {sum(r.status == STATUS_SKIPPED for r in reports)} "
                                 "later node(s) not checked")
        odd = [r for r in reports if any("shape differs" in m.reason for m in r.mapping)]
        if odd:
            loc.notes.append(f"{len(odd)} node(s) have CNTK shapes that differ from ONNX (not compared): "
                             + ", ".join(r.node for r in odd[:3]) + (" ..." if len(odd) > 3 else ""))
        return loc

    def _ort_graph(self, names: list[str]) -> dict[str, np.ndarray]:
        """ONNX Runtime's values of intermediate tensors of the reference graph."""
        if not names:
            return {}
        model = onnx.ModelProto()
        model.CopyFrom(self.ref.model)
        del model.graph.output[:]  # only the requested tensors come back
        for n in names:
            model.graph.output.append(onnx.ValueInfoProto(name=n))
        return OrtRunner(model, self.device).run({n: self.feeds[n] for n in self.ref.inputs}, names)

    # -- one node ------------------------------------------------------------------------------

    def check_node(self, node: onnx.NodeProto, r: NodeReport, by_uid: dict[str, np.ndarray],
                   failed: dict[str, str], ort_vals: dict[str, np.ndarray], held: _Held) -> None:
        cntk_out, unmapped, cntk_errors = self._cntk_outputs(node, r, by_uid, failed, ort_vals, held)
        if not any(i in self.data for i in node.input if i):
            r.status = STATUS_CONSTANT
            return
        if not cntk_out and not cntk_errors:
            r.status = "unmapped: " + (unmapped[0] if unmapped else "no output to compare")
            return
        values = self._node_inputs(node, r, held)
        if values is None:
            return
        if not cntk_out:
            self._cannot_compute(node, r, values, cntk_errors[0])
            return
        self._judge(node, r, values, cntk_out, unmapped)

    def _cntk_outputs(self, node: onnx.NodeProto, r: NodeReport, by_uid: dict[str, np.ndarray],
                      failed: dict[str, str], ort_vals: dict[str, np.ndarray],
                      held: _Held) -> tuple[dict[str, np.ndarray], list[str], list[str]]:
        """The node's outputs on the CNTK side (shape-checked), why others are missing, CNTK's errors."""
        cntk_out: dict[str, np.ndarray] = {}
        unmapped: list[str] = []
        cntk_errors: list[str] = []
        for t in (t for t in node.output if t):
            m = self.mapping.get(t)
            ort_v = ort_vals.get(t)
            why = ""
            if t not in self.data:
                why = "-"  # a constant: ONNX Runtime's value is the value
            elif m is None or not m.mapped:
                why = m.reason if m is not None else "not mapped"
            elif m.cntk_uid in failed:
                why = failed[m.cntk_uid]
                cntk_errors.append(why)
            elif by_uid.get(m.cntk_uid) is None:
                why = m.reason = "CNTK returned no value"
            else:
                value = self._shaped(m, by_uid[m.cntk_uid], ort_v.shape if ort_v is not None else self.ref.shapes.get(t))
                if value is None:
                    why = m.reason
            if why:
                if why != "-":
                    unmapped.append(why)
                held.ort[t] = ort_v
                continue
            v = to_dtype(value, self.ref.dtype(t) if ort_v is None else ort_v.dtype)
            cntk_out[t] = held.cntk[t] = v
            if ort_v is not None:
                r.accumulated_error = max(r.accumulated_error or 0.0, scaled_error(ort_v, v))
        return cntk_out, unmapped, cntk_errors

    @staticmethod
    def _shaped(m: Any, v: np.ndarray, ref_shape: tuple | None) -> np.ndarray | None:
        """CNTK's value in the ONNX shape (size-1 axes may differ); None (reason recorded) if not."""
        if ref_shape is None or tuple(v.shape) == tuple(ref_shape):
            return v
        if [d for d in v.shape if d != 1] == [d for d in ref_shape if d != 1]:
            m.value_note = f"CNTK value {list(v.shape)} has other size-1 axes: reshaped"
            return v.reshape(ref_shape)
        same = int(np.prod(v.shape)) == int(np.prod(ref_shape))
        m.reason = (f"shape differs: CNTK {list(v.shape)} vs ONNX {list(ref_shape)}"
                    + (" (same element count: a permutation or reshape, ambiguous)" if same else ""))
        return None

    def _node_inputs(self, node: onnx.NodeProto, r: NodeReport, held: _Held) -> NodeInputs | None:
        """CNTK's values of the node's inputs where observable, else ONNX Runtime's (marked)."""
        values = NodeInputs({}, {})
        for i in dict.fromkeys(node.input):
            if not i:
                continue
            if i in self.ref.consts:
                values.consts[i] = self.ref.consts[i]
            elif i in self.feeds and i in self.ref.inputs:
                values.inputs[i] = np.asarray(self.feeds[i])
            elif i in held.cntk:
                values.inputs[i] = held.cntk[i]
            elif held.ort.get(i) is not None:
                if i in self.data:
                    values.inputs[i] = held.ort[i]
                    r.inputs_from_ort.append(i)
                else:
                    values.consts[i] = held.ort[i]
            else:
                r.status = f"no local reference: input {i} has no value"
                return None
        return values

    def _cannot_compute(self, node: onnx.NodeProto, r: NodeReport, values: NodeInputs, error: str) -> None:
        if r.inputs_from_ort:  # CNTK fails upstream already
            r.status = f"unmapped: {error} (an input is not evaluable either)"
            return
        # CNTK computes every input of the node but not the node itself: it is the culprit
        r.base_budget = r.budget = self.budget_of(node)
        r.local_error = float("inf")
        r.status = STATUS_OVER
        r.notes.append(error)
        if self.culprit_inputs is None:
            values.cntk_error = error
            self.culprit_inputs = values

    def _judge(self, node: onnx.NodeProto, r: NodeReport, values: NodeInputs, cntk_out: dict[str, np.ndarray],
               unmapped: list[str]) -> None:
        """The node's own error: CNTK against the node alone in float64 on CNTK's inputs, judged
        against ONNX Runtime's own error there (the measured rule); where the node cannot be
        evaluated in float64, CNTK against ONNX Runtime alone by the op's a-priori budget."""
        try:
            local = isolate.run_alone(node, values, self.ref, self.device)
        except Exception as exc:
            r.status = f"no local reference: ONNX Runtime cannot run the node alone ({str(exc).splitlines()[0][:120]})"
            return
        if not any(t in local for t in cntk_out):
            r.status = "no local reference: ONNX Runtime returned none of the mapped outputs"
            return
        truth = isolate.run_alone_float64(node, values, self.ref)
        worst = self._measured(r, truth, local, cntk_out) if truth else self._budgeted(node, r, values, local, cntk_out)
        if unmapped:
            r.notes.append(f"only {len(cntk_out)} of {len([t for t in node.output if t])} outputs compared: "
                           f"{unmapped[0]}")
        if r.inputs_from_ort:
            r.notes.append("input(s) " + ", ".join(r.inputs_from_ort) + " from ONNX Runtime (not observable in CNTK)")
        r.status = STATUS_OVER if (r.ratio or 0.0) > 1.0 else STATUS_OK
        if r.over:
            r.metrics = compare(local[worst], cntk_out[worst])
            r.metrics_tensor = worst
            if self.culprit_inputs is None:
                values.local, values.cntk, values.truth = local, cntk_out, truth or {}
                self.culprit_inputs = values

    def _measured(self, r: NodeReport, truth: dict[str, np.ndarray], local: dict[str, np.ndarray],
                  cntk_out: dict[str, np.ndarray]) -> str:
        """CNTK vs the float64 node, against factor x max(ORT32 vs the float64 node, floor)."""
        worst, worst_ratio = "", -1.0
        for t, v in cntk_out.items():
            if t not in local or t not in truth:
                continue
            error = error_vs_truth(truth[t], v)
            noise = error_vs_truth(truth[t], local[t])
            allowed = self.config.noise_factor * max(noise, rounding_floor(truth[t], local[t].dtype,
                                                                           self.config.floor_ulps))
            ratio = error / allowed if allowed > 0 else (0.0 if error == 0 else float("inf"))
            if ratio > worst_ratio:
                worst, worst_ratio = t, ratio
                r.local_error, r.noise, r.budget, r.base_budget = error, noise, allowed, allowed
        r.rule = "measured"
        return worst

    def _budgeted(self, node: onnx.NodeProto, r: NodeReport, values: NodeInputs, local: dict[str, np.ndarray],
                  cntk_out: dict[str, np.ndarray]) -> str:
        """CNTK vs ONNX Runtime alone, against the op's budget times its condition number."""
        errors = {t: scaled_error(local[t], v) for t, v in cntk_out.items() if t in local}
        worst = max(errors, key=lambda t: errors[t])
        r.local_error = errors[worst]
        r.base_budget = self.budget_of(node)
        r.condition = (isolate.condition(node, values, local[worst], worst, self.ref, self.device)
                       if r.local_error > 0.1 * r.base_budget else 1.0)
        r.budget = r.base_budget * r.condition
        r.rule = "a-priori budget"
        return worst

    def _suspects(self, culprit: NodeReport) -> list[str]:
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
