"""Concat of a free-batch and a static-batch tensor: CNTK's Splice refuses it.

CNTK 2.7 imports a graph input with its batch as a static dimension, but Conv, ConvTranspose,
the pooling ops and BatchNormalization build their output with a *free* batch dimension
(``NDShape::FreeDimension``, printed -3); a Reshape makes it static again (its shape is an
initializer). A binary elementwise op with one static operand is static. ONNXToCNTK.cpp maps
Concat to ``Splice``, whose shape check accepts equal dimensions, 1 (broadcast) or an inferred
one, but not a free batch against a static batch > 1: ``Splice: Conflicting dimensionality of axis
3 between operand #2 (-3) and other(s) (2)``. keras.applications InceptionV3 at 75x75, batch 2,
meets it where its 1x1 maps reach the last blocks: tf2onnx writes those NHWC->NCHW transposes as
Reshapes (static), beside a MaxPool (free). At batch 1 the static dimension is 1 and Splice
broadcasts it, so only batch > 1 has the defect.

The repair reshapes each free-batch input of such a Concat to its own static shape: a Reshape
moves no data, so the result is bit-identical, and every Splice operand is then static.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from pytest_tf2cntk.convert import onnx_graph as og
from pytest_tf2cntk.convert.repairs import REPAIRS, Repair

# Ops whose CNTK output has a free batch dimension (measured on CNTK 2.7: tests/unit/convert/test_repairs_import.py).
FREE_BATCH_OPS = {"Conv", "ConvTranspose", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool",
                  "BatchNormalization", "LpPool", "GlobalLpPool"}
STATIC_BATCH_OPS = {"Reshape"}  # the target shape is an initializer, so CNTK fixes every dimension

STATIC, FREE = "static", "free"


def batch_kinds(model: onnx.ModelProto) -> dict[str, str]:
    """How CNTK 2.7 will see each tensor's batch dimension: static or free (constants: absent)."""
    consts = og.constant_values(model)
    kinds = {name: STATIC for name in og.graph_input_names(model)}
    for node in og.topo_nodes(model):
        seen = [kinds[i] for i in node.input if i and i not in consts and i in kinds]
        if node.op_type in FREE_BATCH_OPS:
            kind = FREE
        elif node.op_type in STATIC_BATCH_OPS or STATIC in seen:
            kind = STATIC  # CNTK's elementwise ops take the static operand's shape
        elif seen:
            kind = FREE
        else:
            continue
        kinds.update((o, kind) for o in node.output)
    return kinds


def concat_static_batch(model: onnx.ModelProto) -> int:
    """Reshape the free-batch inputs of a Concat that also joins static-batch inputs, at batch > 1."""
    kinds = batch_kinds(model)
    shapes = og.infer_shapes(model)
    repaired = 0
    for node in list(model.graph.node):
        if node.op_type != "Concat":
            continue
        inputs = [i for i in node.input if i in kinds]
        mixed = {kinds[i] for i in inputs} == {STATIC, FREE}
        if not mixed or not all(_static(shapes.get(i)) and shapes[i][0] > 1 for i in inputs):
            continue
        for pos, name in enumerate(node.input):
            if kinds.get(name) == FREE:
                node.input[pos] = _static_reshape(model, name, shapes[name])
        repaired += 1
    return repaired


def _static_reshape(model: onnx.ModelProto, tensor: str, shape: tuple[int, ...]) -> str:
    """A Reshape of ``tensor`` to its own shape (inserted after its producer); returns its output."""
    out = og.unique_name(model, tensor + "__static_batch")
    target = og.unique_name(model, out + "__shape")
    model.graph.initializer.append(og.make_initializer(target, np.array(shape, np.int64)))
    reshape = helper.make_node("Reshape", [tensor, target], [out], name=out)
    at = next((k + 1 for k, n in enumerate(model.graph.node) if tensor in n.output), 0)
    model.graph.node.insert(at, reshape)
    return out


def _static(shape: tuple | None) -> bool:
    return shape is not None and len(shape) > 0 and all(isinstance(d, int) and d > 0 for d in shape)


REPAIRS.append(Repair(
    "concat_static_batch",
    defect="a Concat at batch > 1 joining a tensor CNTK gives a free batch dimension (Conv, pooling, "
           "BatchNormalization outputs) with one it gives a static batch (graph inputs, Reshape outputs): "
           "CNTK's Splice refuses it ('Conflicting dimensionality of axis')",
    rewrite="reshape each free-batch input to its own static shape (no data moves)",
    apply=concat_static_batch))
