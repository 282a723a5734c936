"""Per-op tolerance budgets, composed along the converted graph into one budget per output.

The rule (docs/budgets.md explains the reasoning):

  error metric   e = max|cntk - tf| / rms(tf)          (scaled error of one output)
  op term        t(n) = c(op) * g(n)                    c: ulps one application may differ by
                                                         g: sqrt(K) for ops reducing over K terms
  output budget  B = headroom * scale * u * (sum of t(n) over the output's ancestors)

u is the unit roundoff of the output dtype. An accumulation of K terms in another order differs
by about sqrt(K) ulps; each op's relative error travels to the output with a gain near one
through normalised layers, and the errors add (first-order forward error analysis). A
root-sum-square composition was measured to under-predict deep networks with realistic
activations 14-fold (ResNet50), so errors are summed. A deeper or wider model gets a
proportionate budget without hand-tuning. Exact ops (Relu, Transpose, Reshape, ...) cost
nothing: CNTK must reproduce them bit for bit.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from pytest_tf2cntk.codec import Jsonable
from pytest_tf2cntk.parity.metrics import UNIT_ROUNDOFF
from pytest_tf2cntk.parity.truth import FLOOR_ULPS, NOISE_FACTOR, RUN_FACTOR
from pytest_tf2cntk.convert import onnx_graph as og

# ulps one application of the op may differ by between two correct implementations
EXACT = 0.0
DEFAULT_OP_ULPS: dict[str, float] = {
    **{op: EXACT for op in (
        "Relu Transpose Reshape Flatten Concat Identity Squeeze Unsqueeze Slice Pad Gather "
        "MaxPool GlobalMaxPool Max Min Neg Abs Floor Ceil Dropout Cast ReduceMax ReduceMin "
        "ArgMax ArgMin DepthToSpace SpaceToDepth Equal Greater Less And Or Xor Not Hardmax "
        "Clip").split()},
    # correctly rounded elementwise arithmetic; Div may be computed as x * (1/y)
    **{op: 1.0 for op in "Add Sub Mul Sqrt Sum Mean LeakyRelu PRelu ImageScaler".split()},
    **{op: 2.0 for op in "Div Reciprocal ThresholdedRelu HardSigmoid".split()},
    # library transcendental functions: a few ulps each, and a different formula per library
    **{op: 4.0 for op in ("Exp Log Tanh Sigmoid Softplus Softsign Elu Selu Pow Sin Cos Tan Asin "
                          "Acos Atan Sinh Cosh Asinh Acosh Atanh Erf").split()},
    # accumulating ops: c per term, times sqrt(reduction length)
    **{op: 2.0 for op in ("MatMul Gemm Conv ConvTranspose AveragePool GlobalAveragePool ReduceSum "
                          "ReduceMean ReduceL1 ReduceL2 ReduceSumSquare ReduceProd ReduceLogSumExp "
                          "LRN MeanVarianceNormalization").split()},
    # exp + normalizing sum over the axis
    **{op: 6.0 for op in "Softmax LogSoftmax".split()},
    "BatchNormalization": 4.0,  # (x - mean) * scale / sqrt(var + eps) + bias, in some order
    "LSTM": 8.0, "GRU": 8.0, "RNN": 6.0,  # per time step: gates are MatMuls + sigmoid/tanh
}
UNKNOWN_OP_ULPS = 8.0  # an op not in the table gets a cautious budget, and is listed in the report
DEFAULT_HEADROOM = 12.0


@dataclass(frozen=True)
class BudgetConfig(Jsonable):
    """User overrides: ulps per op type, a fixed budget per output, a global scale."""

    op_ulps: dict[str, float] = field(default_factory=dict)
    outputs: dict[str, float] = field(default_factory=dict)
    scale: float = 1.0
    headroom: float = DEFAULT_HEADROOM
    noise_factor: float = NOISE_FACTOR  # the measured verdict's factor over the float32 noise
    floor_ulps: float = FLOOR_ULPS  # ... and its floor, in units of rounding of the output
    run_factor: float = RUN_FACTOR  # ... and its factor over the run's largest noise

    @classmethod
    def from_mapping(cls, data: dict[str, Any] | None, scale: float = 1.0) -> "BudgetConfig":
        """From ``[tool.tf2cntk.budgets]``: ``Conv = 4``, ``headroom = 16``, ``noise_factor = 10``,
        ``floor_ulps = 8``, ``run_factor = 4``, ``[...budgets.outputs]``."""
        data = dict(data or {})
        outputs = {str(k): float(v) for k, v in (data.pop("outputs", None) or {}).items()}
        headroom = float(data.pop("headroom", DEFAULT_HEADROOM))
        scale = scale * float(data.pop("scale", 1.0))
        factor = float(data.pop("noise_factor", NOISE_FACTOR))
        floor = float(data.pop("floor_ulps", FLOOR_ULPS))
        run = float(data.pop("run_factor", RUN_FACTOR))
        return cls({str(k): float(v) for k, v in data.items()}, outputs, scale, headroom, factor, floor, run)

    def scaled(self, factor: float) -> "BudgetConfig":
        """Every allowance times ``factor``: the a-priori budgets and the measured noise factors."""
        return dataclasses.replace(self, scale=self.scale * factor, noise_factor=self.noise_factor * factor,
                                   run_factor=self.run_factor * factor)

    def ulps(self, op_type: str) -> float:
        if op_type in self.op_ulps:
            return self.op_ulps[op_type]
        return DEFAULT_OP_ULPS.get(op_type, UNKNOWN_OP_ULPS)


@dataclass(frozen=True)
class NodeTerm:
    node: str
    op_type: str
    ulps: float
    reduction: int  # K, 1 for elementwise ops

    @property
    def term(self) -> float:
        return self.ulps * math.sqrt(self.reduction)


@dataclass(frozen=True)
class OutputBudget(Jsonable):
    output: str
    value: float  # allowed scaled error max|err| / rms(ref)
    unit_roundoff: float
    terms: int  # non-exact ancestor ops
    dominant: tuple[tuple[str, float], ...]  # op types with the largest share of the budget
    overridden: bool = False
    unknown_ops: tuple[str, ...] = ()

    def explain(self) -> str:
        if self.overridden:
            return f"{self.value:.3g} (set in [tool.tf2cntk.budgets.outputs])"
        share = ", ".join(f"{op} {frac:.0%}" for op, frac in self.dominant)
        return f"{self.value:.3g} from {self.terms} rounding ops ({share})"


def reduction_length(node: onnx.NodeProto, shapes: dict[str, tuple]) -> int:
    """How many terms one output element of the node sums (1 for elementwise ops)."""
    op = node.op_type

    def dims(name: str) -> tuple:
        return tuple(d or 1 for d in shapes.get(name, ()) or ())

    try:
        if op in ("MatMul", "Gemm"):
            a = dims(node.input[0])
            trans_a = og.attr(node, "transA", 0)
            return int(a[0] if (op == "Gemm" and trans_a) else a[-1])
        if op in ("Conv", "ConvTranspose"):
            w = dims(node.input[1])
            return int(np.prod(w[1:])) if op == "Conv" else int(w[0] * np.prod(w[2:]))
        if op in ("AveragePool", "LRN"):
            return int(np.prod(og.attr(node, "kernel_shape", [og.attr(node, "size", 1)])))
        if op == "GlobalAveragePool":
            return int(np.prod(dims(node.input[0])[2:]))
        if op.startswith("Reduce"):
            x = dims(node.input[0])
            axes = og.attr(node, "axes", None)
            return int(np.prod([x[a] for a in axes])) if axes else int(np.prod(x))
        if op in ("Softmax", "LogSoftmax"):
            x = dims(node.input[0])
            axis = og.attr(node, "axis", 1)
            return int(np.prod(x[axis:]))  # opset < 13: coerced to 2-D at axis
        if op in ("LSTM", "GRU", "RNN"):
            x, r = dims(node.input[0]), dims(node.input[2])
            return int(x[0] * (x[-1] + r[-1]))  # time steps x (input + hidden) per gate
        if op == "MeanVarianceNormalization":
            return int(np.prod(dims(node.input[0])[2:]))
    except (IndexError, TypeError, ValueError):
        pass
    return 1


def node_terms(model: onnx.ModelProto, config: BudgetConfig) -> dict[str, NodeTerm]:
    shapes = og.infer_shapes(model)
    return {node.name or node.output[0]: NodeTerm(node.name, node.op_type, config.ulps(node.op_type),
                                                 max(1, reduction_length(node, shapes)))
            for node in model.graph.node}


def op_budget(term: NodeTerm, config: BudgetConfig, unit_roundoff: float) -> float:
    """One node's own budget (layerwise localization uses it); never zero, even for exact ops."""
    return config.headroom * config.scale * unit_roundoff * max(term.term, 1.0)


def output_budgets(model: onnx.ModelProto, config: BudgetConfig,
                   dtypes: dict[str, np.dtype] | None = None) -> dict[str, OutputBudget]:
    terms = node_terms(model, config)
    producer = og.producers(model)
    budgets = {}
    for out in model.graph.output:
        dtype = np.dtype((dtypes or {}).get(out.name, np.float32))
        u = UNIT_ROUNDOFF.get(dtype, 2.0 ** -24)
        # ancestors of the output
        seen: set[str] = set()
        stack = [out.name]
        ancestors = []
        while stack:
            t = stack.pop()
            node = producer.get(t)
            if node is None:
                continue
            key = node.name or node.output[0]
            if key in seen:
                continue
            seen.add(key)
            ancestors.append(terms[key])
            stack.extend(i for i in node.input if i)
        total = sum(t.term for t in ancestors)
        by_op: dict[str, float] = {}
        for t in ancestors:
            by_op[t.op_type] = by_op.get(t.op_type, 0.0) + t.term
        dominant = tuple(sorted(((op, v / total) for op, v in by_op.items() if v > 0),
                                key=lambda x: -x[1])[:3]) if total else ()
        unknown = tuple(sorted({t.op_type for t in ancestors if t.op_type not in DEFAULT_OP_ULPS
                                and t.op_type not in config.op_ulps}))
        if out.name in config.outputs:
            budgets[out.name] = OutputBudget(out.name, config.outputs[out.name] * config.scale, u, 0, (),
                                             True, unknown)
            continue
        # at least one ulp of the output's own rounding, even for an all-exact chain
        value = config.headroom * config.scale * u * max(total, 1.0)
        budgets[out.name] = OutputBudget(out.name, value, u, sum(1 for t in ancestors if t.term),
                                         dominant, False, unknown)
    return budgets
