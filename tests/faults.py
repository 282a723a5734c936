"""Shared pieces of the planted-fault catalogues (tests/test_layerwise.py, benchmarks/)."""
from __future__ import annotations

from typing import Any

import onnx
from onnx import helper


def set_attr(node: onnx.NodeProto, name: str, value: Any) -> None:
    """Set (replace or add) one attribute of a node."""
    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(helper.make_attribute(name, value))


def pad_shifts(pads: list[int], first_spatial: int = 0) -> list[list[int]]:
    """Each way of moving one pad from the end of an axis to its start (or back): the output
    shape stays the same, the values move by one position, as an off-by-one padding bug does."""
    half = len(pads) // 2
    shifted = []
    for ax in range(first_spatial, half):
        new = list(pads)
        if pads[half + ax] > 0:
            new[ax], new[half + ax] = pads[ax] + 1, pads[half + ax] - 1
        elif pads[ax] > 0:
            new[ax], new[half + ax] = pads[ax] - 1, pads[half + ax] + 1
        else:
            continue
        shifted.append(new)
    return shifted
