"""Slice ends past the dimension: CNTK 2.7 reads them as 32-bit ints, then refuses or cuts wrongly.

ONNXToCNTK.cpp narrows Slice's int64 ``ends`` to ``int`` and only knows INT32_MAX as "to the
end". ONNX clamps an end past the dimension, and tf2onnx writes INT64_MAX for "to the end"
(``x[1:]``); in CNTK that INT64_MAX becomes -1 and the slice silently drops the last element
(at batch 4, a slice along the batch loses the last row), 2**32 + 2 becomes 2, and an end such as
2**31 or dim + 1 is refused ("Slice operation index range ... is invalid").

The repair clamps each such end to the static dimension, which is exactly what ONNX does.
"""
from __future__ import annotations

import onnx
from onnx import helper

from pytest_tf2cntk.convert import onnx_graph as og
from pytest_tf2cntk.convert.repairs import REPAIRS, Repair

INT32_MAX = 2**31 - 1  # the one out-of-range end CNTK reads as "to the end"


def slice_clamp_ends(model: onnx.ModelProto) -> int:
    shapes = og.infer_shapes(model)
    repaired = 0
    for node in model.graph.node:
        shape = shapes.get(node.input[0]) if node.op_type == "Slice" and node.input else None
        ends = og.attr(node, "ends")
        if shape is None or ends is None:  # opset >= 10 Slice takes ends as an input: not CNTK's form
            continue
        axes = og.attr(node, "axes") or list(range(len(ends)))
        clamped = [_clamp(e, shape[a]) for e, a in zip(ends, axes)]
        if clamped != list(ends):
            _set_ints(node, "ends", clamped)
            repaired += 1
    return repaired


def _clamp(end: int, dim: int | None) -> int:
    if dim is None or end <= dim or end == INT32_MAX:
        return end
    return dim


def _set_ints(node: onnx.NodeProto, name: str, values: list[int]) -> None:
    for i, a in enumerate(node.attribute):
        if a.name == name:
            node.attribute[i].CopyFrom(helper.make_attribute(name, values))


REPAIRS.append(Repair(
    "slice_clamp_ends",
    defect="a Slice end beyond its dimension other than INT32_MAX (tf2onnx writes INT64_MAX for 'to the "
           "end'): CNTK narrows it to a 32-bit int, so INT64_MAX becomes -1 and the last element is dropped, "
           "and other large ends wrap or are refused",
    rewrite="clamp the end to the static dimension, as ONNX does",
    apply=slice_clamp_ends))
