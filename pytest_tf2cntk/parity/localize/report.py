"""What layerwise localization found: per node its own error against its budget, the mapping of
its tensors, the culprit and its confirmation in isolation. Typed, JSON round-trip."""
from __future__ import annotations

from dataclasses import dataclass, field

from pytest_tf2cntk.codec import Jsonable
from pytest_tf2cntk.parity.metrics import Metrics
from pytest_tf2cntk.tables import text_table

STATUS_OK = "ok"
STATUS_PENDING = "pending"
STATUS_OVER = "over budget"
STATUS_CONSTANT = "constant (no data inputs)"
STATUS_NOT_REACHED = "not reached (time budget)"
STATUS_SKIPPED = "not checked (stopped at culprit)"
CONFIRMED = "confirmed in isolation"
NOT_REPRODUCED = "not reproduced in isolation"


@dataclass
class TensorMapping(Jsonable):
    """How one ONNX tensor of the converted graph is read on the CNTK side."""

    JSON_EXTRA = ("mapped",)
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

    def describe(self) -> str:
        if not self.mapped:
            return f"{self.onnx}: unmapped ({self.reason})"
        fn = repr(self.cntk_function) if self.cntk_function else "anonymous"
        note = f"; {self.value_note}" if self.value_note else ""
        return (f"{self.onnx} {list(self.onnx_shape or ())} <- CNTK {self.cntk_op} {fn} "
                f"{self.cntk_uid} {list(self.cntk_shape or ())} by {self.rule}{note}")


@dataclass
class NodeReport(Jsonable):
    JSON_EXTRA = ("ratio",)
    node: str
    op_type: str
    tf_layer: str
    tf_op: str
    local_error: float | None = None
    budget: float | None = None
    status: str = STATUS_OK
    accumulated_error: float | None = None  # CNTK vs ONNX Runtime, whole graph up to this node
    inputs_from_ort: list[str] = field(default_factory=list)
    mapping: list[TensorMapping] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    index: int = 0                  # position in topological order
    metrics: Metrics | None = None  # metrics.compare of the worst output (over-budget nodes)
    metrics_tensor: str = ""  # ... and which output that is
    base_budget: float | None = None  # budgets.op_budget of the node
    condition: float = 1.0          # kappa of an accumulating op (budget = base_budget * kappa)
    noise: float | None = None      # measured rule: ONNX Runtime's own error vs the float64 node
    rule: str = ""                  # "measured" (budget = factor x noise) or "a-priori budget"

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


@dataclass
class Confirmation(Jsonable):
    status: str                     # CONFIRMED | NOT_REPRODUCED | "not run: ..."
    isolated_error: float | None = None   # CNTK alone vs the node's reference alone, same inputs
    budget: float | None = None
    in_graph_error: float | None = None   # CNTK alone vs CNTK in the graph
    detail: str = ""

    def describe(self) -> str:
        if self.isolated_error is None:
            return self.status + (f" ({self.detail})" if self.detail else "")
        text = f"{self.status}: CNTK alone vs the node alone in float64 (or ONNX Runtime) {self.isolated_error:.3g}"
        if self.budget is not None:
            text += f" (budget {self.budget:.3g})"
        if self.in_graph_error is not None:
            text += f"; CNTK alone vs CNTK in the graph {self.in_graph_error:.3g}"
        return text + (f"; {self.detail}" if self.detail else "")


@dataclass
class LayerRow(Jsonable):
    """One checked node of one model and device, as the history stores it."""

    model: str
    device: str
    node: str
    op_type: str
    tf_layer: str
    local_error: float | None
    budget: float | None
    culprit: bool = False


@dataclass
class Localization(Jsonable):
    JSON_EXTRA = ("culprit", "summary")
    model: str
    device: str
    onnx: str
    cntk_onnx: str
    nodes: list[NodeReport]
    culprit_index: int | None = None  # position in ``nodes``
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
    error: str = ""  # localization itself failed: why (the verdict stands regardless)

    @property
    def culprit(self) -> NodeReport | None:
        return None if self.culprit_index is None else self.nodes[self.culprit_index]

    @property
    def over_budget(self) -> list[NodeReport]:
        return [n for n in self.nodes if n.over]

    @property
    def unmapped(self) -> list[NodeReport]:
        return [n for n in self.nodes if n.status.startswith("unmapped")]

    def table(self, limit: int = 10) -> str:
        """The culprit first, then the nodes closest to (or over) their budgets."""
        culprit = self.culprit_index
        rated = [(i, n) for i, n in enumerate(self.nodes) if n.ratio is not None]
        rated.sort(key=lambda p: (p[0] != culprit, -(p[1].ratio or 0.0), p[1].index))
        rows: list[tuple[str, ...]] = [("#", "node", "op type", "TF layer", "local err", "ORT32 noise", "allowed",
                                        "ratio", "status")]
        shown = rated[:max(limit, 1)]
        for i, n in shown:
            mark = "*" if i == culprit else ""
            rows.append((f"{mark}{n.index}", _short(n.node, 60), n.op_type, _short(n.tf_layer, 32),
                         _fmt(n.local_error), _fmt(n.noise), _fmt(n.budget), _fmt(n.ratio, "x"), _short(n.status, 40)))
        lines = text_table(rows)
        rest = rated[len(shown):]
        if rest:
            over = sum(1 for _, n in rest if n.over)
            lines.append(f"... {len(rest)} more checked node(s)" + (f", {over} of them over budget" if over
                                                                   else " within budget"))
        return "\n".join(lines)

    def summary(self) -> str:
        if self.error:
            return f"localization failed: {self.error}"
        c = self.culprit
        if c is None:
            return "no node exceeds its own budget"
        allowed = "allowed" if c.rule == "measured" else "budget"
        head = (f"culprit {c.node} ({c.op_type}), TF layer {c.tf_layer}, TF op {c.tf_op}: local "
                f"error {_fmt(c.local_error)} > {allowed} {_fmt(c.budget)} ({_fmt(c.ratio, 'x')})")
        if self.confirmation is not None:
            head += f"; {self.confirmation.status}"
        return head

    def __str__(self) -> str:
        lines = [f"tf2cntk localize: {self.summary()}",
                 f"model {self.model} on {self.device}: checked {self.checked} of {self.total} nodes "
                 f"in {self.seconds:.1f} s; {len(self.unmapped)} unmapped, "
                 f"{sum(1 for n in self.nodes if n.inputs_from_ort)} with inputs from ONNX Runtime",
                 self.table()]
        lines += self._culprit_lines()
        if self.stopped_early:
            lines.append(self.stopped_early)
        for n in self.unmapped[:5]:
            lines.append(f"{n.node}: {n.status}")
        if len(self.unmapped) > 5:
            lines.append(f"... and {len(self.unmapped) - 5} more unmapped node(s) (see the JSON report)")
        lines.extend(self.notes)
        return "\n".join(lines)

    def _culprit_lines(self) -> list[str]:
        c = self.culprit
        if c is None:
            return []
        lines = []
        if self.confirmation is not None:
            lines.append(f"confirmation: {self.confirmation.describe()}")
        if c.inputs_from_ort:
            lines.append(f"caution: input(s) {', '.join(c.inputs_from_ort)} of the culprit were not "
                         "observable in CNTK (ONNX Runtime's values were used): the error may belong "
                         f"to an upstream node: suspects {', '.join(self.suspects)}")
        if c.condition > 1.0 and c.base_budget is not None:
            lines.append(f"culprit budget: op budget {c.base_budget:.3g} x condition number "
                         f"{c.condition:.3g} (its terms cancel)")
        lines += [f"culprit note: {note}" for note in c.notes]
        more = [n.node for n in self.over_budget if n is not c]
        if more:
            lines.append(f"also over budget: {', '.join(more[:5])}" + (" ..." if len(more) > 5 else ""))
        return lines

    def layer_rows(self, model: str | None = None, device: str | None = None) -> list[LayerRow]:
        """One row per checked node, for the history."""
        return [LayerRow(model or self.model, device or self.device, n.node, n.op_type, n.tf_layer,
                         n.local_error, n.budget, i == self.culprit_index)
                for i, n in enumerate(self.nodes) if n.local_error is not None]


def _fmt(x: float | None, suffix: str = "") -> str:
    return "-" if x is None else f"{x:.3g}{suffix}"


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else "..." + text[-(n - 3):]
