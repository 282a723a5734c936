"""Validation before CNTK ever sees a model: onnx.checker, shape inference, and CNTK 2.7 support.

The support table follows CNTK 2.7's importer (ONNXToCNTK.cpp) as summarised in the project's
compat reference. Every offending node is reported at once, each with the TF op it came from,
the reason and a hint, so a model that would crash CNTK is known to fail first.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx

from pytest_tf2cntk.codec import Jsonable
from pytest_tf2cntk.convert import onnx_graph as og
from pytest_tf2cntk.errors import ValidationError

MAX_OPSET = 9
MAX_IR = 4
HINT_BATCH = "fix the batch dimension (--tf2cntk-batch) so shape subgraphs fold away"
HINT_OPSET = "convert at opset 9 (--tf2cntk-opset 9)"
HINT_LAYER = "replace the layer with one CNTK supports, or test that part of the model elsewhere"

# Ops CNTK 2.7's importer dispatches. Ops not listed are unsupported.
SUPPORTED = set("""
Conv ConvTranspose MaxPool AveragePool GlobalAveragePool GlobalMaxPool BatchNormalization Gemm
MatMul Reshape Flatten Slice Pad Softmax LogSoftmax Hardmax Transpose Concat Squeeze Unsqueeze Cast
Gather Clip Relu LeakyRelu Sigmoid Tanh Elu Selu Softplus Softsign PRelu HardSigmoid ThresholdedRelu
Add Sub Mul Div Pow Max Min Mean Sum And Or Xor Not Equal Greater Less Neg Abs Reciprocal Floor
Ceil Sqrt Exp Log Sin Cos Tan Asin Acos Atan Sinh Cosh Asinh Acosh Atanh Identity ReduceMax
ReduceMin ReduceSum ReduceMean ReduceProd ReduceL1 ReduceL2 ReduceSumSquare ReduceLogSum
ReduceLogSumExp ArgMax ArgMin TopK LRN DepthToSpace SpaceToDepth Dropout ImageScaler
MeanVarianceNormalization LSTM GRU RNN
""".split())

# Why an unsupported op is there and what to do about it.
UNSUPPORTED_HINTS: dict[str, tuple[str, str]] = {
    "Shape": ("CNTK has no Shape op (the batch is free, so shape arithmetic stayed dynamic)", HINT_BATCH),
    "Size": ("CNTK has no Size op", HINT_BATCH),
    "ConstantOfShape": ("CNTK has no ConstantOfShape op", HINT_BATCH),
    "Loop": ("CNTK cannot import control flow; tf2onnx emits Loop for Keras GRU and for LSTM at some "
             "batch sizes", "replace GRU with LSTM and test at batch size 1, or test the RNN part "
             "elsewhere"),
    "Scan": ("CNTK cannot import control flow (Scan)", HINT_LAYER),
    "If": ("CNTK cannot import control flow (If)", HINT_LAYER),
    "Upsample": ("CNTK 2.7 does not import Upsample (Keras UpSampling / tf.image.resize)",
                 "use Conv2DTranspose or a Reshape/Tile-free upsampling"),
    "Resize": ("CNTK 2.7 does not import Resize (opset 10+)", HINT_OPSET),
    "Split": ("CNTK 2.7 does not import Split", "use separate Slice ops (tf.slice) instead of tf.split"),
    "Tile": ("CNTK 2.7 does not import Tile", HINT_LAYER),
    "Expand": ("CNTK 2.7 does not import Expand", "rely on broadcasting instead of tf.broadcast_to"),
    "Where": ("CNTK 2.7 does not import Where", HINT_LAYER),
    "Erf": ("CNTK 2.7 does not import Erf (exact GELU)", "use approximate=True GELU (tanh form)"),
    "Sign": ("CNTK 2.7 does not import Sign", HINT_LAYER),
    "Mod": ("CNTK 2.7 does not import Mod", HINT_LAYER),
    "NonZero": ("CNTK 2.7 does not import NonZero", HINT_LAYER),
    "Range": ("CNTK 2.7 does not import Range", HINT_BATCH),
    "InstanceNormalization": ("CNTK 2.7 does not import InstanceNormalization", HINT_LAYER),
}

# Marks a Cast to an integer type whose input is already integral (the int_cast_truncation repair):
# CNTK's pass-through then computes it exactly.
EXACT_CAST = "tf2cntk repair int_cast_truncation: the input is integral, so CNTK's pass-through is exact"

# Element types CNTK can take as graph inputs (ints and bools arrive as float in CNTK).
_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16}
_INPUT_TYPES = _FLOAT_TYPES | {onnx.TensorProto.INT32, onnx.TensorProto.INT64, onnx.TensorProto.INT8,
                               onnx.TensorProto.UINT8, onnx.TensorProto.BOOL}


@dataclass(frozen=True)
class Problem(Jsonable):
    node: str
    op_type: str
    tf_op: str
    reason: str
    hint: str
    severity: str = "error"  # "error": CNTK fails or computes wrong; "warning": numbers at risk

    def __str__(self) -> str:
        where = f"{self.op_type} '{self.node}'" + (f" (TF: {self.tf_op})" if self.tf_op != self.node else "")
        return f"{self.severity}: {where}: {self.reason}; hint: {self.hint}"



Check = Callable[[onnx.NodeProto, "Context"], "str | None"]


@dataclass
class Context:
    consts: dict[str, np.ndarray]
    shapes: dict[str, tuple]
    opset: int
    used: set[str]  # tensors some node or graph output reads


def _attr_limits(node: onnx.NodeProto, ctx: Context) -> str | None:
    if node.op_type in ("MaxPool", "AveragePool"):
        if og.attr(node, "ceil_mode", 0):
            return "ceil_mode is an opset-10 attribute CNTK does not read"
        if og.attr(node, "dilations") and any(d != 1 for d in og.attr(node, "dilations")):
            return "pooling dilations are not read by CNTK"
    if node.op_type == "Pad":
        if len(node.input) > 1:
            return "Pad with pads as an input (opset 11 form); CNTK reads the attribute form"
        if og.attr(node, "mode", b"constant") in (b"edge", "edge"):
            return "Pad mode 'edge' is not implemented in CNTK"
    if node.op_type == "Clip" and len(node.input) > 1:
        return "Clip with min/max as inputs (opset 11 form); CNTK reads attributes"
    if node.op_type == "Slice" and len(node.input) > 1:
        return "Slice with starts/ends as inputs (opset 10 form); CNTK reads attributes"
    if node.op_type == "Reshape" and len(node.input) > 1 and node.input[1] not in ctx.consts:
        return "Reshape's shape is computed, but CNTK needs it as an initializer"
    if node.op_type.startswith("Reduce") and any(a < 0 for a in og.attr(node, "axes", []) or []):
        return "negative reduction axes are rejected by CNTK"
    if node.op_type == "ReduceLogSum":
        return "CNTK maps ReduceLogSum to log-sum-exp: numerically wrong"
    if node.op_type == "LRN" and og.attr(node, "size", 1) % 2 == 0:
        return "CNTK rejects LRN with an even size"
    if node.op_type == "ConvTranspose" and og.attr(node, "group", 1) > 1:
        return "grouped ConvTranspose is not implemented in CNTK"
    if node.op_type == "Conv" and og.attr(node, "group", 1) > 1:
        rank = len(ctx.shapes.get(node.input[0]) or ())
        if rank and rank != 4:
            return "grouped convolution on CPU is 2-D only in CNTK"
    if node.op_type == "BatchNormalization" and any(i not in ctx.consts for i in node.input[1:5]):
        return "BatchNormalization scale/bias/mean/var must be constants for CNTK"
    if node.op_type == "Gemm":
        for i in node.input[:2]:
            if len(ctx.shapes.get(i) or (0, 0)) != 2:
                return "Gemm needs rank-2 A and B in CNTK"
        if len(node.input) < 3:
            return "Gemm without C is not accepted by CNTK"
    if node.op_type in ("LSTM", "GRU", "RNN"):
        x = ctx.shapes.get(node.input[0]) or ()
        if len(x) == 3 and x[1] not in (1, None):
            return (f"CNTK's RNN importer assumes batch 1, this {node.op_type} runs batch {x[1]}")
        if any(i and i not in ctx.consts for i in node.input[1:4]):
            return f"{node.op_type} weights W/R/B must be initializers for CNTK"
        if any(o in ctx.used for o in node.output[1:] if o):
            return f"CNTK builds only Y of {node.op_type}; Y_h/Y_c consumers break"
    if node.op_type == "Cast" and og.attr(node, "to") not in _FLOAT_TYPES and node.doc_string != EXACT_CAST:
        return "CNTK makes casts to integer/bool a silent pass-through (no rounding)"
    return None


def _hint_for(node: onnx.NodeProto, reason: str) -> str:
    if node.op_type in ("LSTM", "GRU", "RNN") and "batch" in reason:
        return "test this model at --tf2cntk-batch 1"
    if "opset" in reason:
        return HINT_OPSET
    if node.op_type == "Reshape":
        return HINT_BATCH
    if node.op_type == "Cast":
        return "keep integer arithmetic out of the model or accept float semantics"
    return HINT_LAYER


def check_support(model: onnx.ModelProto) -> list[Problem]:
    """Every node CNTK 2.7 cannot import, or imports with wrong numbers."""
    problems: list[Problem] = []
    opset = og.opset_version(model)
    if opset > MAX_OPSET:
        problems.append(Problem("<model>", "opset", "", f"default-domain opset {opset} > {MAX_OPSET}: "
                                "CNTK 2.7 bundles onnx 1.4.1", HINT_OPSET))
    if model.ir_version > MAX_IR:
        problems.append(Problem("<model>", "ir_version", "", f"IR version {model.ir_version} > "
                                f"{MAX_IR}", "pytest-tf2cntk sets IR 4; re-convert"))
    real = set(og.graph_input_names(model))
    for vi in model.graph.input:
        if vi.name not in real:
            continue
        tt = vi.type.tensor_type
        free = [d.dim_param or "?" for d in tt.shape.dim if not d.HasField("dim_value") or d.dim_value <= 0]
        if free:
            problems.append(Problem(vi.name, "<input>", vi.name, f"dimension(s) {free} are not fixed; "
                                    "CNTK imports them as static dims", HINT_BATCH))
        if tt.elem_type not in _INPUT_TYPES:
            problems.append(Problem(vi.name, "<input>", vi.name, "input type "
                                    f"{onnx.TensorProto.DataType.Name(tt.elem_type)} cannot be fed to CNTK",
                                    "cast inputs to float32 outside the model"))
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    ctx = Context(og.constant_values(model), og.infer_shapes(model), opset, used)
    for node in model.graph.node:
        origin = og.tf_origin(node)
        if node.domain not in ("", "ai.onnx"):
            problems.append(Problem(node.name, node.op_type, origin, f"custom domain '{node.domain}'",
                                    HINT_LAYER))
            continue
        if node.op_type not in SUPPORTED:
            reason, hint = UNSUPPORTED_HINTS.get(
                node.op_type, (f"CNTK 2.7's ONNX importer has no {node.op_type}", HINT_LAYER))
            problems.append(Problem(node.name, node.op_type, origin, reason, hint))
            continue
        reason = _attr_limits(node, ctx)
        if reason:
            severity = "warning" if node.op_type == "Cast" else "error"
            problems.append(Problem(node.name, node.op_type, origin, reason, _hint_for(node, reason),
                                    severity))
    return problems


def validate(model: onnx.ModelProto, source: str = "model") -> list[Problem]:
    """Raise ValidationError listing every error; return the warnings."""
    try:
        onnx.checker.check_model(model)
    except Exception as exc:  # onnx raises ValidationError/ValueError variants
        raise ValidationError(f"The ONNX graph of {source} is not valid ONNX: "
                              f"{str(exc).strip().splitlines()[0]}",
                              hint="report it: tf2onnx produced an invalid graph") from None
    try:
        onnx.shape_inference.infer_shapes(model, strict_mode=True)
    except Exception as exc:
        raise ValidationError(f"Shape inference fails on the ONNX graph of {source}: "
                              f"{str(exc).strip().splitlines()[0]}", hint=HINT_BATCH) from None
    problems = check_support(model)
    if any(p.severity == "error" for p in problems):
        raise validation_error(source, problems)
    return problems


def validation_error(source: str, problems: list[Problem], note: str = "",
                     hint: str | None = None) -> ValidationError:
    """The error listing every problem of severity "error" (``note`` follows the list)."""
    errors = [p for p in problems if p.severity == "error"]
    lines = "\n".join(f"  - {p}" for p in errors)
    return ValidationError(f"{source}: {len(errors)} node(s) CNTK 2.7 cannot import correctly:\n"
                           f"{lines}{note}", problems=problems, hint=hint)
