"""Repair: AveragePool whose window overhangs the map on both sides of an axis.

CNTK's importer (ONNXToCNTK.cpp, "AveragePool") passes explicit ``pads`` to CNTK's Pooling as
lower/upper padding. CNTK then computes an output wrongly when its window, along some spatial
axis, starts before the map and ends after it (kernel wider than the map: 3x3 SAME on a 1x1 map,
5x5 SAME on 2x2 or 3x3): it reads one element past the map's end as if it were inside (the next
channel's memory on a 1-wide map) and counts it. Measured (CNTK 2.7, stride 1, pads 1 or 2): a
1x1 map with 3 channels gives (x0 + 2 x1 + x2) / 4 instead of x0; windows that overhang one side
only (the border of a 2x2 or 5x5 map under 3x3 SAME) are right. InceptionV3 at 75x75 has such a
pool on a 1x1 map.

The rewrite keeps every window inside the map CNTK sees: an explicit Pad with zeros, the pool
without pads (so each output is the window's sum / its area), then, unless the node counts the
padding (count_include_pad=1), a Mul by a constant of area / (the window's real elements) per
output position. Only nodes with such a window are touched.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from pytest_tf2cntk.convert import onnx_graph as og
from pytest_tf2cntk.convert.repairs import REPAIRS, Repair, replace_each


def _geometry(node: onnx.NodeProto, shape: tuple | None) -> tuple[list[int], list[int], list[int], list[int]] | None:
    """(spatial sizes, kernel, strides, pads) of a pool with explicit pads on a static map, else None."""
    auto_pad = og.attr(node, "auto_pad", b"NOTSET")
    if node.op_type != "AveragePool" or auto_pad not in (b"NOTSET", "NOTSET") or og.attr(node, "ceil_mode", 0):
        return None
    kernel = list(og.attr(node, "kernel_shape"))
    if not shape or len(shape) != len(kernel) + 2 or not all(isinstance(d, int) and d > 0 for d in shape):
        return None
    sizes = list(shape[2:])
    strides = list(og.attr(node, "strides", None) or [1] * len(kernel))
    pads = list(og.attr(node, "pads", None) or [0] * 2 * len(kernel))
    return sizes, kernel, strides, pads


def _windows(sizes: list[int], kernel: list[int], strides: list[int], pads: list[int]) -> list[list[int]]:
    """Per axis, the start of each output's window in map coordinates (ONNX's floor rule)."""
    n = len(sizes)
    return [[o * strides[i] - pads[i] for o in range((sizes[i] + pads[i] + pads[n + i] - kernel[i]) // strides[i] + 1)]
            for i in range(n)]


def has_defect(node: onnx.NodeProto, shape: tuple | None) -> bool:
    geometry = _geometry(node, shape)
    if geometry is None:
        return False
    sizes, kernel = geometry[0], geometry[1]
    return any(s < 0 and s + kernel[i] > sizes[i] for i, starts in enumerate(_windows(*geometry)) for s in starts)


def real_counts(sizes: list[int], kernel: list[int], strides: list[int], pads: list[int]) -> np.ndarray:
    """How many elements of the map each output's window covers (the divisor without padding)."""
    per_axis = [np.array([min(s + kernel[i], sizes[i]) - max(s, 0) for s in starts])
                for i, starts in enumerate(_windows(sizes, kernel, strides, pads))]
    counts = np.ones([len(a) for a in per_axis], dtype=np.int64)
    for i, a in enumerate(per_axis):
        counts = counts * a.reshape([-1 if j == i else 1 for j in range(len(per_axis))])
    return counts


def rewrite_nodes(model: onnx.ModelProto, node: onnx.NodeProto, shape: tuple,
                  float_type: int) -> list[onnx.NodeProto]:
    sizes, kernel, strides, pads = _geometry(node, shape)  # type: ignore[misc]
    n, base, x, y = len(kernel), node.name or node.output[0], node.input[0], node.output[0]
    padded, pooled = og.unique_name(model, f"{base}__padded"), og.unique_name(model, f"{base}__sum_over_area")
    nodes = [helper.make_node("Pad", [x], [padded], name=padded, mode="constant", value=0.0,
                              pads=[0, 0] + pads[:n] + [0, 0] + pads[n:]),
             helper.make_node("AveragePool", [padded], [pooled if not og.attr(node, "count_include_pad", 0) else y],
                              name=node.name if og.attr(node, "count_include_pad", 0) else pooled,
                              kernel_shape=kernel, strides=strides)]
    if og.attr(node, "count_include_pad", 0):
        return nodes  # the padding counts: sum / area is the answer
    area = int(np.prod(kernel))
    scale = og.unique_name(model, f"{base}__area_over_count")
    factor = (area / real_counts(sizes, kernel, strides, pads)).astype(og.np_dtype(float_type))
    model.graph.initializer.append(og.make_initializer(scale, factor.reshape((1, 1) + factor.shape)))
    return nodes + [helper.make_node("Mul", [pooled, scale], [y], name=node.name)]


def repair_avgpool_border(model: onnx.ModelProto) -> int:
    shapes, types = og.infer_shapes(model), og.elem_types(model)

    def rewrite(node: onnx.NodeProto) -> list[onnx.NodeProto] | None:
        shape = shapes.get(node.input[0]) if node.input else None
        if not has_defect(node, shape):
            return None
        return rewrite_nodes(model, node, shape, types[node.input[0]])  # type: ignore[arg-type]

    return replace_each(model, rewrite)


REPAIRS.append(Repair(
    "avgpool_border",
    defect="AveragePool with explicit pads whose window, along a spatial axis, starts before the map and "
           "ends after it (kernel wider than the map, e.g. 3x3 SAME on 1x1): CNTK 2.7 reads one element "
           "past the map as inside it and counts it",
    rewrite="Pad with zeros, AveragePool without pads (sum / area), Mul by a constant area / real count "
            "per output position (no Mul with count_include_pad=1)",
    apply=repair_avgpool_border,
))
