"""Dilated Conv: CNTK 2.7 has no dilated convolution on CPU.

CNTK imports a Conv with ``dilations`` > 1 but fails at its first evaluation on CPU ("Dilated
convolution on CPU is not yet implemented"); tf2onnx emits one for Keras ``dilation_rate`` and for
atrous convolutions (DeepLab-style ASPP, WaveNet-style audio models).

The repair spreads the kernel: a kernel of size k dilated by d equals a dense kernel of size
(k - 1) * d + 1 holding the weights at every d-th tap and zeros between, with the same pads,
strides, groups and auto_pad (SAME pads are computed from that same effective size). The extra
taps multiply by zero, so the result equals the dilated one up to summation order, proved in ONNX
Runtime like every repair; the cost is the larger kernel ((k-1)d+1)^2 / k^2 the multiply-adds.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from pytest_tf2cntk.convert import onnx_graph as og
from pytest_tf2cntk.convert.repairs import REPAIRS, Repair


def conv_dense_kernel(model: onnx.ModelProto) -> int:
    consts = og.constant_values(model)
    repaired = 0
    for node in model.graph.node:
        dil = og.attr(node, "dilations")
        if node.op_type != "Conv" or not dil or all(d == 1 for d in dil) or node.input[1] not in consts:
            continue
        weights = consts[node.input[1]]
        spread = np.zeros(weights.shape[:2] + tuple((k - 1) * d + 1 for k, d in zip(weights.shape[2:], dil)),
                          weights.dtype)
        spread[(slice(None), slice(None)) + tuple(slice(None, None, d) for d in dil)] = weights
        old, name = node.input[1], og.unique_name(model, node.input[1] + "__dense")
        model.graph.initializer.append(og.make_initializer(name, spread))
        node.input[1] = name
        _drop_if_unused(model, old)
        kept = [a for a in node.attribute if a.name not in ("dilations", "kernel_shape")]
        del node.attribute[:]
        node.attribute.extend(kept + [helper.make_attribute("kernel_shape", list(spread.shape[2:]))])
        repaired += 1
    return repaired


def _drop_if_unused(model: onnx.ModelProto, tensor: str) -> None:
    if tensor not in og.consumers(model):
        at = [i for i, t in enumerate(model.graph.initializer) if t.name == tensor]
        for i in reversed(at):
            del model.graph.initializer[i]


REPAIRS.append(Repair(
    "conv_dense_kernel",
    defect="a Conv with dilations > 1: CNTK imports it but cannot run it on CPU ('Dilated convolution on "
           "CPU is not yet implemented')",
    rewrite="the equivalent undilated Conv: the kernel spread to (k-1)*d+1 taps with zeros between the weights",
    apply=conv_dense_kernel))
