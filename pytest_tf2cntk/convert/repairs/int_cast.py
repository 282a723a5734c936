"""Repair: Cast from a float type to an integer type, which CNTK 2.7 makes a pass-through.

CNTK's importer (ONNXToCNTK.cpp, "Cast") builds a cast only to float, double and float16; for
any other ``to`` it returns the input unchanged, so ``Cast(2.7, to=INT32)`` is 2.7 in CNTK, not
2 (fixtures/quantized.keras: scaled error ~0.1). The rewrite computes the truncation with ops
CNTK computes exactly, in the input's float type:

    c = Min(Max(x, low), high)                  the integer type's range (saturation)
    t = Floor(c) + Cast(And(Less(c, 0), Less(Floor(c), c)), float)    toward zero
    y = Cast(t, to=INT*)                        exact in ORT, a pass-through of t in CNTK

(CNTK 2.7 imports neither Sign nor Where nor Mod.) Every step is exact for a finite float: Floor
and the comparisons are exact, and Floor(c) + 1 for a negative non-integer c is an integer of
smaller magnitude than c, so representable. Out of range, ONNX leaves a cast undefined (ORT on
x86 gives INT_MIN for int32); the repair saturates to the type's range, taken as the floats of
the input's type inside it (2147483520 for int32 from float32). NaN stays undefined.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from pytest_tf2cntk.convert import onnx_graph as og
from pytest_tf2cntk.convert.domains import TRUNCATION_MARK
from pytest_tf2cntk.convert.repairs import REPAIRS, REPAIRS_OFF_HINT, Repair, replace_each
from pytest_tf2cntk.convert.validation import EXACT_CAST

FLOATS = {TensorProto.FLOAT: np.float32, TensorProto.DOUBLE: np.float64, TensorProto.FLOAT16: np.float16}
INTEGERS = {TensorProto.INT8: np.int8, TensorProto.INT16: np.int16, TensorProto.INT32: np.int32,
            TensorProto.INT64: np.int64, TensorProto.UINT8: np.uint8, TensorProto.UINT16: np.uint16,
            TensorProto.UINT32: np.uint32, TensorProto.UINT64: np.uint64}


def has_defect(node: onnx.NodeProto, types: dict[str, int]) -> bool:
    return (node.op_type == "Cast" and og.attr(node, "to") in INTEGERS and node.doc_string != EXACT_CAST
            and types.get(node.input[0]) in FLOATS)


def saturation_range(float_type: int, int_type: int) -> tuple[np.floating, np.floating]:
    """The integer type's range as floats of the input's type that lie inside it."""
    f, info = FLOATS[float_type], np.iinfo(INTEGERS[int_type])
    low, high = f(info.min), f(info.max)
    if float(high) > info.max:  # rounded up out of the range: the next float down is inside
        high = np.nextafter(high, f(0))
    if np.isinf(high):  # float16 and the wide types: every finite float16 fits
        high = np.finfo(f).max
    if np.isinf(low):
        low = -np.finfo(f).max
    return low, high


def truncation_nodes(model: onnx.ModelProto, cast: onnx.NodeProto, float_type: int) -> list[onnx.NodeProto]:
    """The nodes replacing ``cast``: saturate, truncate toward zero in float, then the marked cast."""
    x, y, to = cast.input[0], cast.output[0], og.attr(cast, "to")
    low, high = saturation_range(float_type, to)
    base = cast.name or y

    def name(part: str) -> str:
        return og.unique_name(model, f"{base}{TRUNCATION_MARK}{part}")

    names = {p: name(p) for p in ("low", "high", "zero", "lo", "c", "floor", "neg", "frac", "both", "step", "t")}
    for part, value in (("low", low), ("high", high), ("zero", 0)):
        model.graph.initializer.append(og.make_initializer(names[part], np.array(value, FLOATS[float_type])))
    n = names
    nodes = [helper.make_node("Max", [x, n["low"]], [n["lo"]], name=n["lo"]),
             helper.make_node("Min", [n["lo"], n["high"]], [n["c"]], name=n["c"]),
             helper.make_node("Floor", [n["c"]], [n["floor"]], name=n["floor"]),
             helper.make_node("Less", [n["c"], n["zero"]], [n["neg"]], name=n["neg"]),
             helper.make_node("Less", [n["floor"], n["c"]], [n["frac"]], name=n["frac"]),
             helper.make_node("And", [n["neg"], n["frac"]], [n["both"]], name=n["both"]),
             helper.make_node("Cast", [n["both"]], [n["step"]], name=n["step"], to=float_type),
             helper.make_node("Add", [n["floor"], n["step"]], [n["t"]], name=n["t"])]
    final = helper.make_node("Cast", [n["t"]], [y], name=cast.name, to=to)
    final.doc_string = EXACT_CAST
    return nodes + [final]


def repair_int_casts(model: onnx.ModelProto) -> int:
    types = og.elem_types(model)
    return replace_each(model, lambda node: truncation_nodes(model, node, types[node.input[0]])
                        if has_defect(node, types) else None)


def edge_values(float_type: int, int_type: int) -> np.ndarray:
    """Where truncation goes wrong if it is wrong: integers, k + 0.5, negative non-integers,
    signed zeros, just inside and outside the range."""
    f = FLOATS[float_type]
    low, high = saturation_range(float_type, int_type)
    ks = np.arange(-6, 7, dtype=np.float64)
    near = [0.25, 0.5, 0.75, 0.999]
    values = list(ks) + [k + d for k in ks for d in near] + [-0.0, 0.0, 1e-7, -1e-7]
    values = [v for v in values if float(low) <= v <= float(high)]
    values += [float(low), float(high), float(np.nextafter(high, f(0))), float(np.nextafter(low, f(0)))]
    return np.array(values, dtype=f)


def prove_edges(model: onnx.ModelProto) -> str:
    """Each (float, int) pair of the repaired casts, alone, against ONNX Runtime's Cast on edge values."""
    from pytest_tf2cntk.convert import onnxrt
    from pytest_tf2cntk.errors import PassMismatch

    types = og.elem_types(model)
    pairs = sorted({(types[n.input[0]], og.attr(n, "to"))
                    for n in model.graph.node if n.op_type == "Cast" and n.doc_string == EXACT_CAST})
    count = 0
    for float_type, int_type in pairs:
        values = edge_values(float_type, int_type)
        single = _single_cast(float_type, int_type, len(values))
        want = onnxrt.run(single, {"x": values})["y"]
        repair_int_casts(single)
        got = onnxrt.run(single, {"x": values})["y"]
        if got.dtype != want.dtype or not np.array_equal(got, want):
            bad = values[got != want][:5]
            raise PassMismatch(f"CNTK repair 'int_cast_truncation' truncates {bad.tolist()} unlike ONNX "
                               f"Runtime's Cast to {TensorProto.DataType.Name(int_type)}. This is a bug in "
                               "pytest-tf2cntk's CNTK repair; it was not applied.",
                               hint=REPAIRS_OFF_HINT)
        count += len(values)
    return f"exact on {count} edge values (integers, k+0.5, negative non-integers, range ends)"


def _single_cast(float_type: int, int_type: int, n: int) -> onnx.ModelProto:
    graph = helper.make_graph([helper.make_node("Cast", ["x"], ["y"], name="cast", to=int_type)], "cast",
                              [helper.make_tensor_value_info("x", float_type, [n])],
                              [helper.make_tensor_value_info("y", int_type, [n])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)], ir_version=4)


REPAIRS.append(Repair(
    "int_cast_truncation",
    defect="Cast from a float type to an integer type: CNTK 2.7 imports it as a pass-through, so the value "
           "keeps its fraction (no truncation toward zero)",
    rewrite="Min(Max(x, low), high) to the integer range, then Floor(c) + Cast(c < 0 and Floor(c) < c): "
            "truncation toward zero in float, then the Cast (exact: its input is integral)",
    apply=repair_int_casts,
    edge_proof=prove_edges,
))
