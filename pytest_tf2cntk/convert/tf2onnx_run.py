"""tf2onnx, called the way this package needs it.

- Only the model's own inputs become graph inputs. ``tf2onnx.convert.from_function`` lists every
  non-resource capture of the traced function as an input (e.g. the mean a Keras Normalization
  layer keeps as a tensor), and the constant's value is then lost; freezing first and converting
  the frozen graph keeps such captures as the constants they are.
- Its log is captured (off the user's terminal) and read: every TF op it leaves unconverted is
  named with tf2onnx's own reason, and with whether any opset CNTK 2.7 imports converts it.
"""
from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import onnx

from pytest_tf2cntk.convert import onnx_graph as og
from pytest_tf2cntk.convert.validation import MAX_OPSET
from pytest_tf2cntk.errors import ConversionError
from pytest_tf2cntk.tf_import import tensorflow

_NOT_SUPPORTED = re.compile(r"Tensorflow op \[(?P<node>.+): (?P<op>[^\]]+)\] is not supported")
_FAILED = re.compile(r"Failed to convert node '(?P<node>[^']+)'.*?OP=(?P<op>\w+)", re.S)
# What a user can change in the model, for ops new users meet (by op, then a word of the reason).
_TIPS: dict[tuple[str, str], str] = {
    ("Erfc", ""): "exact GELU (approximate=False) computes erfc: use gelu(approximate=True)",
    ("Erf", ""): "exact GELU (approximate=False) computes erf: use gelu(approximate=True)",
    ("StridedSlice", "new_axis_mask"): "index without tf.newaxis / None (tf.expand_dims or a Reshape "
                                       "add the axis instead)",
}


class LogCapture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def lines(self) -> list[str]:
        return [f"{r.levelname}: {r.getMessage()}" for r in self.records]


@contextmanager
def captured_log() -> Iterator[LogCapture]:
    """tf2onnx's log (loggers under "tf2onnx") into a list, not onto the user's terminal."""
    logger = logging.getLogger("tf2onnx")
    capture = LogCapture()
    old_level, old_propagate = logger.level, logger.propagate
    logger.addHandler(capture)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield capture
    finally:
        logger.removeHandler(capture)
        logger.setLevel(old_level)
        logger.propagate = old_propagate


def run_tf2onnx(fn: Callable, specs: list, opset: int) -> onnx.ModelProto:
    """The ONNX graph of a tf.function; graph inputs are the function's own arguments only."""
    tf = tensorflow()
    import tf2onnx.convert
    from tf2onnx import tf_loader
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    concrete = fn.get_concrete_function(*specs)
    try:
        frozen = convert_variables_to_constants_v2(concrete, lower_control_flow=False,
                                                   aggressive_inlining=True)
    except ValueError:  # tf2onnx has workarounds for TF's freezing bugs: let it try its way
        return tf2onnx.convert.from_function(fn, input_signature=specs, opset=opset)[0]
    graph_def = tf_loader.fix_freezing_errors_part2(frozen.graph.as_graph_def(add_shapes=True))
    inputs = [t.name for t in frozen.inputs if t.dtype != tf.resource]
    outputs = [t.name for t in frozen.outputs]
    return tf2onnx.convert.from_graph_def(graph_def, name=concrete.name, input_names=inputs,
                                          output_names=outputs, opset=opset)[0]


def convert_traced(fn: Callable, specs: list, opset: int, source: Any) -> tuple[onnx.ModelProto, list[Unconverted]]:
    """The ONNX graph and the TF ops tf2onnx left in it; a ConversionError quoting its log when
    it fails outright."""
    with captured_log() as log:
        try:
            proto = run_tf2onnx(fn, specs, opset)
        except Exception as exc:
            relevant = [ln for ln in log.lines() if "ERROR" in ln or "nsupported" in ln][-10:]
            text = "\n  tf2onnx log:\n    " + "\n    ".join(relevant) if relevant else ""
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConversionError(f"tf2onnx could not convert {source} at opset {opset}: {first}{text}",
                                  hint="ops unsupported at this opset need another opset or a "
                                       f"replacement layer; CNTK needs opset <= {MAX_OPSET}") from None
    return proto, unconverted_ops(proto, log.records, opset)


def unconverted_error(source: Any, opset: int, left: list[Unconverted]) -> ConversionError:
    lines = "\n".join(f"  - {u}" for u in left)
    return ConversionError(f"tf2onnx could not convert {len(left)} TensorFlow op(s) of {source} at opset "
                           f"{opset}; it left them in the graph as TF ops, which neither ONNX Runtime nor "
                           f"CNTK can run:\n{lines}", hint=unconverted_hint(left))


@dataclass(frozen=True)
class Unconverted:
    """A TF op tf2onnx left in the graph as it was."""

    node: str
    op: str
    reason: str  # tf2onnx's words
    elsewhere: str  # which opsets convert it, said for CNTK's range
    opset: int | None  # an opset CNTK imports where tf2onnx converts it differently, if any
    tip: str = ""

    def __str__(self) -> str:
        tip = f"; {self.tip}" if self.tip else ""
        return f"{self.op} '{self.node}': {self.reason}; {self.elsewhere}{tip}"


def unconverted_ops(proto: onnx.ModelProto, records: list[logging.LogRecord], opset: int) -> list[Unconverted]:
    """Every node of ``proto`` that is still a TF op, with tf2onnx's reason from its log."""
    reasons: dict[str, tuple[str, str]] = {}  # node -> (op, reason)
    for rec in records:
        text = rec.getMessage()
        m = _NOT_SUPPORTED.search(text)
        if m:
            reasons[m["node"]] = (m["op"], f"tf2onnx: not supported at opset {opset}")
            continue
        m = _FAILED.search(text)
        if m:
            exc = rec.exc_info[1] if rec.exc_info else None
            said = str(exc).strip().splitlines()[0] if exc is not None and str(exc).strip() else ""
            reasons[m["node"]] = (m["op"], said or f"tf2onnx's {m['op']} converter failed")
    found = []
    for node in _all_nodes(proto.graph):
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.name in reasons:
            op, reason = reasons[node.name]
        elif not _is_onnx_op(node.op_type, opset):
            op, reason = node.op_type, "tf2onnx left it unconverted (its log gives no reason)"
        else:
            continue
        elsewhere, other = _elsewhere(op, opset)
        found.append(Unconverted(node.name, op, reason, elsewhere, other, _tip(op, reason)))
    return found


def _all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for sub in og.iter_subgraphs(node):
            yield from _all_nodes(sub)


def _is_onnx_op(op_type: str, opset: int) -> bool:
    try:
        onnx.defs.get_schema(op_type, opset, "")
        return True
    except Exception:  # SchemaError: no such op at or below this opset
        return False


def _converters(op: str) -> dict[int, Any]:
    """Opset -> the tf2onnx converter that handles ``op`` there (each holds until the next)."""
    tensorflow()  # tf2onnx imports it: quietly
    from tf2onnx.handler import tf_op

    table = tf_op.get_opsets().get("", [])
    out, current = {}, None
    for version, handlers in enumerate(table):
        if op in handlers:
            current = handlers[op][0]
        if current is not None and version:
            out[version] = current
    return out


def _elsewhere(op: str, opset: int) -> tuple[str, int | None]:
    """Where else tf2onnx converts ``op``, told for CNTK's range (opset <= 9), and the opset to
    suggest: only one CNTK imports where the converter differs from the one that failed."""
    table = _converters(op)
    here = table.get(opset)
    other = sorted(v for v, c in table.items() if v <= MAX_OPSET and v != opset and c != here)
    if other:
        pick = other[-1]
        verb = "converts it differently" if here is not None else "converts it"
        return f"tf2onnx {verb} at opset {pick}", pick
    above = sorted(v for v, c in table.items() if v > MAX_OPSET and c != here)
    if above:
        what = "tf2onnx's other converter for it starts at" if here is not None else "tf2onnx converts it only from"
        return (f"{what} opset {above[0]}, above the opset {MAX_OPSET} CNTK 2.7 imports, so no opset "
                "CNTK can take converts it"), None
    return f"tf2onnx has no {'other ' if here is not None else ''}converter for it at any opset", None


def _tip(op: str, reason: str) -> str:
    for (tip_op, word), tip in _TIPS.items():
        if tip_op == op and word in reason:
            return tip
    return ""


def unconverted_hint(items: list[Unconverted]) -> str:
    """One way out for all of them: an opset CNTK imports where every one converts, or the model."""
    opsets = {u.opset for u in items}
    if len(opsets) == 1 and None not in opsets:
        pick = opsets.pop()
        return (f"convert at opset {pick} (--tf2cntk-opset {pick}), where tf2onnx converts "
                f"{'it' if len(items) == 1 else 'them'}")
    return (f"no opset CNTK 2.7 imports (<= {MAX_OPSET}) converts every one of these ops: change the "
            "model where noted, or replace the layer and test it elsewhere")
