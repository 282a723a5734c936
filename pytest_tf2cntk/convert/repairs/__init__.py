"""CNTK repairs: rewrites of graphs CNTK 2.7 imports but computes wrongly (or refuses), into graphs
it computes correctly.

A compatibility pass (``convert.passes``) reshapes what tf2onnx emits into what CNTK reads; a
repair works around a stated CNTK defect. Each ``Repair`` names the defect, the rewrite and
touches only nodes that have the defect, so a graph that needs none is left byte for byte as it
was. ``run_repairs`` proves each applied repair in ONNX Runtime (outputs equal before and after,
as the passes are proved); the parity check then confirms it in CNTK. ``--tf2cntk-repairs=off``
converts without them, so the raw defect can still be shown and localized.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import onnx

from pytest_tf2cntk.codec import Jsonable
from pytest_tf2cntk.convert.passes import apply_proved, set_nodes
from pytest_tf2cntk.errors import PassMismatch

RepairFn = Callable[[onnx.ModelProto], int]  # rewrites in place; returns how many nodes it repaired
EdgeProofFn = Callable[[onnx.ModelProto], str]
REPAIRS_OFF_HINT = ("report it with the model; meanwhile --tf2cntk-repairs=off converts "  # the CLI: --repairs
                    "without the CNTK repairs (CNTK then computes the defect's nodes as before)")


@dataclass(frozen=True)
class Repair:
    name: str
    defect: str  # the CNTK 2.7 defect, precisely: which nodes have it and what CNTK does wrong
    rewrite: str  # what the repair puts in their place
    apply: RepairFn
    # random inputs rarely reach a defect's domain edges: this proves the rewrites found in the
    # repaired graph there, in ORT (PassMismatch if one differs), and says how
    edge_proof: EdgeProofFn | None = None


@dataclass(frozen=True)
class RepairRecord(Jsonable):
    """A repair that changed the graph: how many nodes, how it was proved, the defect it works around."""

    name: str
    changed: int
    proof: str
    defect: str = ""


# Filled by the repair modules, in the order they run (each sees the previous one's result).
REPAIRS: list[Repair] = []


def run_repairs(model: onnx.ModelProto, prove: bool = True, seed: int = 0,
                examples: int = 2) -> tuple[onnx.ModelProto, list[RepairRecord]]:
    """Apply every repair whose defect the graph has; each one applied is proved in ONNX Runtime."""
    by_name = {r.name: r for r in REPAIRS}
    try:
        model, applied = apply_proved(model, [(r.name, r.apply) for r in REPAIRS], "CNTK repair", prove, seed,
                                      examples)
    except PassMismatch as exc:  # the way out is the repairs' switch, not the passes'
        raise PassMismatch(exc.message, hint=REPAIRS_OFF_HINT) from None
    records = []
    for p in applied:
        repair, proof = by_name[p.name], p.proof
        if prove and repair.edge_proof is not None:
            proof += "; " + repair.edge_proof(model)
        records.append(RepairRecord(p.name, p.changed, proof, repair.defect))
    return model, records


def replace_each(model: onnx.ModelProto,
                 rewrite: Callable[[onnx.NodeProto], "list[onnx.NodeProto] | None"]) -> int:
    """Put ``rewrite(node)``'s nodes in the place of each node it returns nodes for (None: keep
    it); how many were replaced. The graph is not touched when none is."""
    out, changed = [], 0
    for node in list(model.graph.node):
        new = rewrite(node)
        if new is None:
            out.append(node)
        else:
            out += new
            changed += 1
    if changed:
        set_nodes(model, out)
    return changed


# The repair modules, one line each, in the order they run: each appends its Repairs to REPAIRS.
from pytest_tf2cntk.convert.repairs import int_cast  # noqa: E402,F401
from pytest_tf2cntk.convert.repairs import avgpool_border  # noqa: E402,F401
from pytest_tf2cntk.convert.repairs import recurrent  # noqa: E402,F401
from pytest_tf2cntk.convert.repairs import concat  # noqa: E402,F401
from pytest_tf2cntk.convert.repairs import slice_ends  # noqa: E402,F401
