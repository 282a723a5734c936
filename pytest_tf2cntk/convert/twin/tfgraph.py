"""Route 2, ``tf-graph-float64``: the TF function (SavedModel signature, or the Keras model when
route 1 fails) frozen with ``convert_variables_to_constants_v2``; every DT_FLOAT attr of the
GraphDef (and its function library) becomes DT_DOUBLE, float Const tensors are cast,
inference-mode FusedBatchNorm* (no float64 CPU kernel) is rewritten into Rsqrt/Mul/Add; then
imported with ``wrap_function`` and pruned to the signature. Independent of tf2onnx.

It gives up, with the node named, on ops that have no float64 CPU kernel (LRN, MaxPool3D,
AvgPool3D, FakeQuant*, ...), ops whose definition fixes a float32 input/output (ResizeBilinear,
...), training-mode batch norm, Bitcast of floats, and graphs that cannot be frozen (resources,
tables). ``graph_float_leaks`` (also used by route 1) finds float32/16 tensors left in a graph.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from pytest_tf2cntk.convert.twin.core import ROUTE_GRAPH, RouteFailed, Twin, first_line, twin_input_dtypes
from pytest_tf2cntk.convert.twin.source import SourceModel, self_check
from pytest_tf2cntk.tf_import import tensorflow

_BATCHNORM_OPS = {"FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3"}
_LOW_FLOAT_ENUMS = {1: "DT_FLOAT", 19: "DT_HALF", 14: "DT_BFLOAT16"}  # types_pb2 values
_DT_DOUBLE = 2


# --------------------------------------------------------------------------------- the route


def graph_route(source: SourceModel, check: bool) -> Twin:
    tf = tensorflow()

    ins, outs = source.io()
    frozen = freeze(source.tf_function())
    in_tensors = [t.name for t in frozen.inputs]
    out_tensors = [t.name for t in frozen.outputs]
    if len(in_tensors) != len(ins):
        raise RouteFailed(f"frozen function has {len(in_tensors)} inputs, the signature {len(ins)}")
    gd64, notes = float64_graph_def(frozen.graph.as_graph_def())
    problems = unsupported_float64_ops(gd64)
    if problems:
        raise RouteFailed("no float64 CPU kernel: " + "; ".join(problems[:6]))
    pruned = _import_pruned(gd64, in_tensors, out_tensors)
    if check:
        leaks = graph_float_leaks(gd64)
        if leaks:
            raise RouteFailed("float64 graph still has float32/16 tensors at: " + "; ".join(leaks))
    names = [n for n, _, _ in ins]

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        result = pruned(*[tf.constant(feeds[n]) for n in names])
        result = result if isinstance(result, (list, tuple)) else [result]
        return {n: np.asarray(v) for n, v in zip(outs, result)}

    twin = Twin(ROUTE_GRAPH, twin_input_dtypes(ins), outs, run, notes=notes, model=gd64)
    if check:
        try:
            twin.self_check = self_check(source, twin)
        except RouteFailed:
            raise
        except Exception as exc:  # kernel missing at run time, shape errors
            raise RouteFailed(f"the float64 graph does not run: {first_line(exc)}") from None
    return twin


def freeze(concrete: Any) -> Any:
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    try:
        return convert_variables_to_constants_v2(concrete)
    except Exception as exc:
        raise RouteFailed(f"the function cannot be frozen (convert_variables_to_constants_v2: "
                          f"{first_line(exc)})") from None


def _import_pruned(gd64: Any, in_tensors: list[str], out_tensors: list[str]) -> Any:
    """The float64 GraphDef as a function from the signature's inputs to its outputs."""
    tf = tensorflow()

    def _import() -> None:
        tf.compat.v1.import_graph_def(gd64, name="")

    try:
        wrapped = tf.compat.v1.wrap_function(_import, [])
        return wrapped.prune([wrapped.graph.get_tensor_by_name(n) for n in in_tensors],
                             [wrapped.graph.get_tensor_by_name(n) for n in out_tensors])
    except Exception as exc:
        raise RouteFailed(f"the float64 graph does not import: {first_line(exc)}") from None


# --------------------------------------------------------------------------------- the rewrite


def float64_graph_def(graph_def: Any) -> tuple[Any, list[str]]:
    """A copy of a frozen GraphDef computing in float64, and notes on what was rewritten."""
    from tensorflow.core.framework import graph_pb2, types_pb2

    gd = graph_pb2.GraphDef()
    gd.CopyFrom(graph_def)
    notes: list[str] = []
    n_bn = rewrite_batchnorms(gd)
    if n_bn:
        notes.append(f"{n_bn} FusedBatchNorm node(s) rewritten as Rsqrt/Mul/Add (no float64 kernel)")
    low = {types_pb2.DT_FLOAT, types_pb2.DT_HALF, types_pb2.DT_BFLOAT16}
    promoted: set[str] = set()
    _double_nodes(gd.node, low, promoted)
    for fn in gd.library.function:
        _double_nodes(fn.node_def, low, promoted)
        for arg in list(fn.signature.input_arg) + list(fn.signature.output_arg):
            if arg.type in low:
                arg.type = types_pb2.DT_DOUBLE
    if promoted:
        notes.append(f"{len(promoted)} float16/bfloat16 node(s) promoted to float64 (mixed precision)")
    return gd, notes


def _double_nodes(nodes: Any, low: set[int], promoted: set[str]) -> None:
    """Every float32/16 type, type list and tensor attr of ``nodes`` becomes double (in place);
    the names of float16/bfloat16 nodes go to ``promoted``."""
    from tensorflow.core.framework import types_pb2

    for node in nodes:
        if node.op == "Bitcast" and any(v.type in low for v in node.attr.values()):
            raise RouteFailed(f"node {node.name} bitcasts a float tensor: its meaning depends on "
                              "the float32 bit layout")
        for key in list(node.attr):
            value = node.attr[key]
            kind = value.WhichOneof("value")
            if kind == "type" and value.type in low:
                if value.type != types_pb2.DT_FLOAT:
                    promoted.add(node.name)
                value.type = types_pb2.DT_DOUBLE
            elif kind == "list" and low & set(value.list.type):
                value.list.type[:] = [types_pb2.DT_DOUBLE if t in low else t for t in value.list.type]
            elif kind == "tensor" and value.tensor.dtype in low:
                value.tensor.CopyFrom(_double_tensor(value.tensor))


def _double_tensor(proto: Any) -> Any:
    tf = tensorflow()

    return tf.make_tensor_proto(tf.make_ndarray(proto).astype(np.float64))


# --------------------------------------------------------------------------------- batch norm


def rewrite_batchnorms(gd: Any) -> int:
    """Inference-mode FusedBatchNorm* -> x * (scale * rsqrt(var + eps)) + (offset - mean * that).

    Top-level graph only (freezing inlines the functions). The last node keeps the original name
    so that every consumer of output 0 still finds it; consumers of outputs 1..4 (the batch
    statistics, which in inference are the moving ones) are pointed at the mean/variance inputs.
    """
    targets = [n for n in gd.node if n.op in _BATCHNORM_OPS]
    if not targets:
        return 0
    for fn in gd.library.function:
        for n in fn.node_def:
            if n.op in _BATCHNORM_OPS:
                raise RouteFailed(f"FusedBatchNorm inside function {fn.signature.name}: not rewritten")
    redirect: dict[str, str] = {}
    new_nodes: list[Any] = []
    for bn in targets:
        redirect.update(_rewrite_one_batchnorm(bn, new_nodes))
    gd.node.extend(new_nodes)
    names = {t.name for t in targets}
    for n in gd.node:
        for i, name in enumerate(n.input):
            if name in redirect:
                n.input[i] = redirect[name]
            elif name.endswith(":5") and name[:-2] in names:
                raise RouteFailed(f"{n.name} reads the reserve space of a FusedBatchNorm")
    return len(targets)


def _bn_attr(bn: Any, name: str) -> Any:
    """An attr of a FusedBatchNorm node, or the op definition's default when the node has none."""
    from tensorflow.python.framework import op_def_registry

    if name in bn.attr:
        return bn.attr[name]
    op_def = op_def_registry.get(bn.op)
    default = [a.default_value for a in (op_def.attr if op_def else []) if a.name == name]
    return default[0] if default else None


def _rewrite_one_batchnorm(bn: Any, new_nodes: list[Any]) -> dict[str, str]:
    """Rewrite ``bn`` in place as the AddV2 ending its float64 formula (the other nodes go to
    ``new_nodes``); returns the redirections of its outputs 1..4."""
    from tensorflow.core.framework import node_def_pb2, types_pb2

    training = _bn_attr(bn, "is_training")
    if training is None or training.b:
        raise RouteFailed(f"{bn.name}: training-mode FusedBatchNorm (batch statistics) in an "
                          "inference graph")
    x, scale, offset, mean, var = [i for i in bn.input if not i.startswith("^")][:5]
    controls = [i for i in bn.input if i.startswith("^")]
    eps_attr = _bn_attr(bn, "epsilon")
    eps = eps_attr.f if eps_attr is not None else 1e-4
    fmt_attr = _bn_attr(bn, "data_format")
    fmt = fmt_attr.s.decode() if fmt_attr is not None and fmt_attr.s else "NHWC"
    base = bn.name + "/twin64"

    def node(op: str, name: str, inputs: list[str], **attrs: Any) -> str:
        n = node_def_pb2.NodeDef(op=op, name=name, input=inputs)
        n.attr["T"].type = types_pb2.DT_DOUBLE
        for k, v in attrs.items():
            n.attr[k].CopyFrom(v)
        new_nodes.append(n)
        return name

    eps_name = _const(new_nodes, base + "/eps", np.float64(eps), types_pb2.DT_DOUBLE)
    inv = node("Rsqrt", base + "/rsqrt", [node("AddV2", base + "/var_eps", [var, eps_name])])
    factor = node("Mul", base + "/factor", [scale, inv])
    shift = node("Sub", base + "/shift", [offset, node("Mul", base + "/mean_factor", [mean, factor])])
    if fmt.startswith("NC"):
        from tensorflow.core.framework import attr_value_pb2

        rank = 4 if fmt == "NCHW" else 5
        shape = _const(new_nodes, base + "/bshape", np.array([-1] + [1] * (rank - 2), np.int32),
                       types_pb2.DT_INT32)
        tshape = attr_value_pb2.AttrValue(type=types_pb2.DT_INT32)
        factor = node("Reshape", base + "/factor_b", [factor, shape], Tshape=tshape)
        shift = node("Reshape", base + "/shift_b", [shift, shape], Tshape=tshape)
    scaled = node("Mul", base + "/scaled", [x, factor] + controls)
    bn_name = bn.name
    bn.Clear()
    bn.op, bn.name = "AddV2", bn_name
    bn.input.extend([scaled, shift])
    bn.attr["T"].type = types_pb2.DT_DOUBLE
    return {f"{bn_name}:{k}": src for k, src in ((1, mean), (2, var), (3, mean), (4, var))}


def _const(new_nodes: list[Any], name: str, value: np.ndarray, dtype: int) -> str:
    tf = tensorflow()
    from tensorflow.core.framework import node_def_pb2

    c = node_def_pb2.NodeDef(op="Const", name=name)
    c.attr["dtype"].type = dtype
    c.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(value))
    new_nodes.append(c)
    return name


# --------------------------------------------------------------------------------- kernel checks


def unsupported_float64_ops(gd: Any) -> list[str]:
    """Nodes with no CPU kernel for their (float64) attrs, or float32 fixed by their op definition."""
    functions = {f.signature.name for f in gd.library.function}
    cache: dict[str, Any] = {}
    problems: list[str] = []
    for nodes, where in [(gd.node, "")] + [(f.node_def, f"{f.signature.name}/") for f in gd.library.function]:
        for node in nodes:
            if node.op not in functions:
                problem = _kernel_problem(node, cache)
                if problem:
                    problems.append(where + problem)
    return problems


def _cpu_kernels(op: str, cache: dict[str, Any]) -> Any:
    """The op's registered CPU kernels (None: cannot tell), cached per op."""
    from tensorflow.python.framework import kernels

    if op not in cache:
        try:
            cache[op] = [k for k in kernels.get_registered_kernels_for_op(op).kernel
                         if k.device_type in ("CPU", "DEFAULT")]
        except Exception:
            cache[op] = None
    return cache[op]


def _kernel_problem(node: Any, cache: dict[str, Any]) -> str | None:
    """Why ``node`` cannot run in float64 on the CPU, or None."""
    from tensorflow.core.framework import types_pb2
    from tensorflow.python.framework import op_def_registry

    op_def = op_def_registry.get(node.op)
    if op_def is None:
        return f"{node.name}: unknown op {node.op}"
    fixed = [a.name for a in list(op_def.input_arg) + list(op_def.output_arg)
             if a.type in (types_pb2.DT_FLOAT, types_pb2.DT_HALF, types_pb2.DT_BFLOAT16)]
    if fixed:
        return f"{node.name} ({node.op}): float32 fixed by the op definition ({', '.join(fixed)})"
    cpu = _cpu_kernels(node.op, cache)
    if cpu is None or node.op in ("Placeholder", "Const", "NoOp"):
        return None
    if not cpu:
        return f"{node.name} ({node.op}): no CPU kernel at all"
    if any(_kernel_satisfied(k, node, op_def) for k in cpu):
        return None
    types = {k: types_pb2.DataType.Name(v.type) for k, v in node.attr.items() if v.WhichOneof("value") == "type"}
    return f"{node.name} ({node.op} {types})"


def _kernel_satisfied(kernel: Any, node: Any, op_def: Any) -> bool:
    """Every type constraint of ``kernel`` holds for ``node``'s attrs (or the op def's defaults)."""
    for c in kernel.constraint:
        allowed = set(c.allowed_values.list.type)
        if c.name not in node.attr:
            default = [a.default_value for a in op_def.attr if a.name == c.name]
            if not default:
                continue
            value = default[0]
        else:
            value = node.attr[c.name]
        kinds = [value.type] if value.WhichOneof("value") == "type" else list(value.list.type)
        if allowed and any(k not in allowed for k in kinds):
            return False
    return True


# --------------------------------------------------------------------------------- float32 leak scan


def graph_float_leaks(graph_def: Any, limit: int = 8) -> list[str]:
    """Nodes of a GraphDef (and its function library) that compute in float32/16.

    A float32 Const whose every consumer is a Cast to float64 is not a leak: it is a constant
    stored in float32 (Keras' gelu/erf coefficients), which the float32 model uses too; nor is
    a Const nothing reads. Graph outputs are checked by the caller.
    """
    found = _scan_leaks(graph_def.node, "")
    for fn in graph_def.library.function:
        found += _scan_leaks(fn.node_def, f"{fn.signature.name}/")
        for arg in list(fn.signature.input_arg) + list(fn.signature.output_arg):
            if arg.type in _LOW_FLOAT_ENUMS:
                found.append(f"{fn.signature.name} signature arg {arg.name}={_LOW_FLOAT_ENUMS[arg.type]}")
    return found[:limit] + ([f"... {len(found) - limit} more"] if len(found) > limit else [])


def _attr_types(value: Any) -> list[int]:
    which = value.WhichOneof("value")
    if which == "type":
        return [value.type]
    if which == "tensor":
        return [value.tensor.dtype]
    return list(value.list.type) if which == "list" else []


def _scan_leaks(nodes: Any, where: str) -> list[str]:
    nodes = list(nodes)
    by_name = {n.name: n for n in nodes}
    consumers: dict[str, list[Any]] = {}
    for n in nodes:
        for i in n.input:
            consumers.setdefault(i.lstrip("^").split(":")[0], []).append(n)

    def benign_cast(n: Any) -> bool:  # Cast(float32 Const -> float64)
        src = by_name.get(n.input[0].split(":")[0]) if n.input else None
        return n.op == "Cast" and n.attr["DstT"].type == _DT_DOUBLE and src is not None and src.op == "Const"

    found = []
    for node in nodes:
        if node.op == "Const" and all(benign_cast(c) for c in consumers.get(node.name, [])):
            continue  # read only by Casts to float64, or by nothing (dead: Keras' Repeat)
        if benign_cast(node):
            continue
        for key, value in node.attr.items():
            bad = [_LOW_FLOAT_ENUMS[k] for k in _attr_types(value) if k in _LOW_FLOAT_ENUMS]
            if bad:
                found.append(f"{where}{node.name} ({node.op}) {key}={bad[0]}")
                break
    return found
