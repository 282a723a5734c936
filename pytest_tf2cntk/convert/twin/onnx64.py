"""Route 3, ``onnx-float64``, and one ONNX node in float64.

The *converted* ONNX graph with initializers, inputs, Constants and Cast targets in double,
evaluated by ONNX Runtime when every op has a double kernel there, else by
onnx.reference.ReferenceEvaluator (ONNX Runtime 1.32's CPU provider has no double
Conv/AveragePool/GlobalAveragePool/Clip-6/LeakyRelu/Elu/LSTM/GRU...), with a faster numpy Conv
(``conv_nd``). It inherits every converter bug: a last resort, labelled so.

``one_node_float64`` evaluates one ONNX node in float64 on given inputs (layerwise localization).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from pytest_tf2cntk.convert.twin.core import (ROUTE_ONNX, SELF_CHECK_LIMIT, RouteFailed, Twin, first_line,
                                              scaled_error)
from pytest_tf2cntk.convert.twin.source import SourceModel

_NP_OF = {1: "float32", 11: "float64", 6: "int32", 7: "int64", 9: "bool", 10: "float16"}  # TensorProto


# --------------------------------------------------------------------------------- the rewrite


def fixed_float_positions(node: Any, opset: int) -> tuple[set[int], set[int]]:
    """Input and output positions of ``node`` whose type its schema fixes to tensor(float)."""
    import onnx

    try:
        schema = onnx.defs.get_schema(node.op_type, opset, node.domain or "")
    except Exception:
        return set(), set()

    def fixed(params: Any, count: int) -> set[int]:
        out = set()
        for i in range(count):
            p = params[min(i, len(params) - 1)] if params else None
            if p is None:
                continue
            if p.type_str in ("tensor(float)", "tensor(float16)"):
                out.add(i)
        return out

    return fixed(schema.inputs, len(node.input)), fixed(schema.outputs, len(node.output))


def fixed_float_tensors(graph: Any, opset: int) -> set[str]:
    """Names of the tensors of ``graph`` (top level) feeding inputs that the op schema fixes to
    float (Upsample/Resize scales, ...): they stay float32 in the float64 model."""
    keep = set()
    for node in graph.node:
        fin, _ = fixed_float_positions(node, opset)
        keep.update(node.input[i] for i in fin if i < len(node.input))
    keep.discard("")
    return keep


def model_opset(model: Any) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 9)


def onnx_float64(model: Any) -> Any:
    """A copy of an ONNX model computing in double: float initializers, Constants, ConstantOfShape
    values, graph inputs/outputs and Cast(to=float) become double, except tensors feeding inputs
    that the op schema fixes to float (Upsample/Resize scales, ...). value_info is dropped."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    _double_graph(m.graph, model_opset(m))
    return m


def _double_graph(g: Any, opset: int) -> None:
    import onnx
    from onnx import TensorProto, numpy_helper

    FLOAT, DOUBLE = TensorProto.FLOAT, TensorProto.DOUBLE
    keep = fixed_float_tensors(g, opset)
    for i, init in enumerate(g.initializer):
        if init.data_type == FLOAT and init.name not in keep:
            arr = numpy_helper.to_array(init).astype(np.float64)
            g.initializer[i].CopyFrom(numpy_helper.from_array(arr, init.name))
    for vi in list(g.input) + list(g.output):
        tt = vi.type.tensor_type
        if tt.elem_type == FLOAT and vi.name not in keep:
            tt.elem_type = DOUBLE
    del g.value_info[:]
    for node in g.node:
        for a in node.attribute:
            if node.op_type == "Cast" and a.name == "to" and a.i == FLOAT:
                a.i = DOUBLE
            elif a.type == onnx.AttributeProto.TENSOR and a.t.data_type == FLOAT and not (
                    node.op_type == "Constant" and node.output[0] in keep):
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float64), a.t.name))
            elif a.name == "dtype" and a.type == onnx.AttributeProto.INT and a.i == FLOAT:
                a.i = DOUBLE  # RandomNormal/Uniform, EyeLike
            elif a.type == onnx.AttributeProto.GRAPH:
                _double_graph(a.g, opset)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for sub in a.graphs:
                    _double_graph(sub, opset)


def perturb_parameters(g: Any, rel: float, seed: int = 0) -> None:
    """Every double initializer and Constant of ``g`` times (1 + rel x uniform(-1, 1)), seeded:
    with ``rel`` one float32 rounding, what folding parameters in float32 may change."""
    from onnx import TensorProto, numpy_helper

    rng = np.random.default_rng(seed)

    def jitter(t: Any) -> None:
        if t.data_type == TensorProto.DOUBLE:
            arr = numpy_helper.to_array(t)
            t.CopyFrom(numpy_helper.from_array(arr * (1.0 + rel * rng.uniform(-1.0, 1.0, arr.shape)), t.name))

    for init in g.initializer:
        jitter(init)
    for node in g.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    jitter(a.t)


# --------------------------------------------------------------------------------- evaluators


def reference_ops() -> list[Any]:
    """Overrides for onnx.reference (onnx 1.23): a faster Conv; GlobalMaxPool, which reduces the
    channel axis of a rank-3 input (its axes are range(ndim-2, ndim) instead of 2..ndim); and LRN,
    which sums the squares for the first N channels only (its loop runs over the batch axis)."""
    from onnx.reference.op_run import OpRun

    class GlobalMaxPool(OpRun):
        op_domain = ""

        def _run(self, x):
            return (x.max(axis=tuple(range(2, x.ndim)), keepdims=True),)

    class LRN(OpRun):
        op_domain = ""

        def _run(self, x, alpha=None, beta=None, bias=None, size=None):
            return (lrn(x, 1e-4 if alpha is None else alpha, 0.75 if beta is None else beta,
                        1.0 if bias is None else bias, size),)

    return [_conv_op_class(), GlobalMaxPool, LRN]


def lrn(x: np.ndarray, alpha: float, beta: float, bias: float, size: int) -> np.ndarray:
    """ONNX LRN over the channel axis 1 of an (N, C, D1, ...) tensor, in x's dtype."""
    channels = x.shape[1]
    before, after = (size - 1) // 2, size // 2  # floor((size-1)/2), ceil((size-1)/2)
    squares = np.square(x)
    square_sum = np.zeros_like(x)
    for c in range(channels):
        square_sum[:, c] = squares[:, max(0, c - before):min(channels, c + after + 1)].sum(axis=1)
    return (x / (bias + (alpha / size) * square_sum) ** beta).astype(x.dtype, copy=False)


def _conv_op_class() -> Any:
    """A ReferenceEvaluator Conv that is an einsum over strided windows (onnx.reference's im2col
    builds index arrays per call: slower on big feature maps). float64 in, float64 out."""
    from onnx.reference.op_run import OpRun

    class Conv(OpRun):
        op_domain = ""

        def _run(self, X, W, B=None, auto_pad=None, dilations=None, group=None, kernel_shape=None,
                 pads=None, strides=None):
            return (conv_nd(X, W, B, auto_pad, dilations, group or 1, kernel_shape, pads, strides),)

    return Conv


def _conv_pads(X: np.ndarray, kshape: tuple, auto_pad: Any, dil: list[int], st: list[int],
               pads: Any) -> list[int]:
    """ONNX Conv padding [head..., tail...] for ``auto_pad`` (SAME_UPPER puts the odd one last)."""
    nd = X.ndim - 2
    auto = auto_pad.decode() if isinstance(auto_pad, bytes) else (auto_pad or "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        head, tail = [], []
        for i in range(nd):
            d = X.shape[2 + i]
            out = (d + st[i] - 1) // st[i]
            eff = (kshape[i] - 1) * dil[i] + 1
            need = max(0, (out - 1) * st[i] + eff - d)
            h = need // 2 if auto == "SAME_UPPER" else (need + 1) // 2
            head.append(h)
            tail.append(need - h)
        return head + tail
    if auto == "VALID":
        return [0] * (2 * nd)
    return list(pads or [0] * (2 * nd))


def conv_nd(X: np.ndarray, W: np.ndarray, B: np.ndarray | None, auto_pad: Any, dilations: Any,
            group: int, kernel_shape: Any, pads: Any, strides: Any) -> np.ndarray:
    """ONNX Conv in numpy (any rank, groups, dilations, strides, auto_pad), in X's and W's dtype.
    ``kernel_shape`` is taken from W."""
    nd = X.ndim - 2
    kshape = tuple(W.shape[2:])
    dil = list(dilations or [1] * nd)
    st = list(strides or [1] * nd)
    pad = _conv_pads(X, kshape, auto_pad, dil, st, pads)
    Xp = np.pad(X, [(0, 0), (0, 0)] + [(pad[i], pad[i + nd]) for i in range(nd)])
    n, c = X.shape[:2]
    m = W.shape[0]
    out_shape = [(Xp.shape[2 + i] - ((kshape[i] - 1) * dil[i] + 1)) // st[i] + 1 for i in range(nd)]
    # windows[n, c, o1.., k1..] via strides
    s = Xp.strides
    win = np.lib.stride_tricks.as_strided(
        Xp, shape=(n, c, *out_shape, *kshape),
        strides=(s[0], s[1], *[s[2 + i] * st[i] for i in range(nd)], *[s[2 + i] * dil[i] for i in range(nd)]),
        writeable=False)
    cg, mg = c // group, m // group
    dtype = np.result_type(X, W)
    if cg == 1:  # depthwise (Keras DepthwiseConv2D): one multiply-accumulate per kernel tap
        wg = W.reshape(group, mg, *kshape)
        y = np.zeros((n, group, mg, *out_shape), dtype)
        for tap in np.ndindex(*kshape):
            xs = win[(slice(None), slice(None)) + (slice(None),) * nd + tap]  # (n, c, *out)
            y += xs[:, :, None] * wg[(slice(None), slice(None)) + tap].reshape((1, group, mg) + (1,) * nd)
        y = y.reshape(n, m, *out_shape)
    else:  # im2col per group + one BLAS matmul (tensordot copies the windows once)
        k_axes = list(range(2 + nd, 2 + 2 * nd))
        parts = []
        for g in range(group):
            t = np.tensordot(win[:, g * cg:(g + 1) * cg], W[g * mg:(g + 1) * mg],
                             axes=([1] + k_axes, [1] + list(range(2, 2 + nd))))  # (n, *out, mg)
            parts.append(np.moveaxis(t, -1, 1))
        y = np.concatenate(parts, axis=1) if group > 1 else parts[0]
    if B is not None:
        y = y + B.reshape((1, -1) + (1,) * nd)
    return y.astype(dtype, copy=False)


def _ort_session(model: Any, threads: int | None = None) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 4
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


class OnnxFloat64:
    """Runs a float64 ONNX model: ONNX Runtime when every op has a double kernel there, else
    onnx.reference.ReferenceEvaluator (with the numpy Conv above)."""

    def __init__(self, model64: Any, fast_conv: bool = True) -> None:
        from onnx.reference import ReferenceEvaluator

        self.model = model64
        self.engine = "onnxruntime"
        self.ort_error: str | None = None
        self.output_names = [o.name for o in model64.graph.output]
        self._ref: Any = None
        try:
            self._sess = _ort_session(model64)
            self._probe_ort()
        except Exception as exc:
            self.ort_error = first_line(exc)
            self.engine = "onnx.reference"
            self._sess = None
            self._ref = ReferenceEvaluator(model64, new_ops=reference_ops() if fast_conv else None)

    def _probe_ort(self) -> None:
        # some double kernels exist but refuse at run time (LSTM/GRU: "does not support double yet")
        feeds = {}
        for i in self._sess.get_inputs():
            dtype = {"tensor(double)": np.float64, "tensor(float)": np.float32, "tensor(int64)": np.int64,
                     "tensor(int32)": np.int32, "tensor(bool)": np.bool_}.get(i.type, np.float64)
            feeds[i.name] = np.zeros([d if isinstance(d, int) else 1 for d in i.shape], dtype)
        self._sess.run(None, feeds)

    def run(self, feeds: dict[str, np.ndarray], intermediate: bool = False) -> dict[str, np.ndarray]:
        """The outputs by name; ``intermediate``: every tensor of the graph (onnx.reference)."""
        if self._sess is not None and not intermediate:
            return dict(zip(self.output_names, self._sess.run(self.output_names, feeds)))
        if self._ref is None:
            from onnx.reference import ReferenceEvaluator

            self._ref = ReferenceEvaluator(self.model, new_ops=reference_ops())
        if intermediate:
            return self._ref.run(None, feeds, intermediate=True)
        return dict(zip(self.output_names, self._ref.run(None, feeds)))


# --------------------------------------------------------------------------------- the route


def onnx_route(source: SourceModel, onnx_model: Any, check: bool, perturb: float = 0.0) -> Twin:
    """The twin over the converted ONNX (a ModelProto or a path), inputs and outputs named and
    ordered as the TFModel's (the ONNX graph's own when the TF model is not available);
    ``perturb``: its parameters perturbed (``perturb_parameters``)."""
    import onnx

    proto = onnx_model if isinstance(onnx_model, onnx.ModelProto) else onnx.load(str(onnx_model))
    m64 = onnx_float64(proto)
    if perturb:
        perturb_parameters(m64.graph, perturb)
    runner = OnnxFloat64(m64)
    inits = {i.name for i in m64.graph.initializer}
    real = [vi for vi in m64.graph.input if vi.name not in inits]
    ins = [(vi.name, _NP_OF.get(vi.type.tensor_type.elem_type, "float64")) for vi in real]
    outs = [o.name for o in m64.graph.output]
    ins, outs = _tf_order(source, ins, outs)
    twin = Twin(ROUTE_ONNX, ins, outs, runner.run, notes=[f"engine: {runner.engine}"], model=runner)
    if check:
        _check_onnx_twin(source, twin, runner, real, fixed_float_tensors(m64.graph, model_opset(m64)))
    return twin


def _tf_order(source: SourceModel, ins: list[tuple[str, str]],
              outs: list[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """The ONNX inputs/outputs in the TFModel's order and names; as they are when the TF model
    cannot be loaded; RouteFailed when the names differ (not the model's graph)."""
    try:
        tf_ins, tf_outs = source.io()
    except RouteFailed:
        raise
    except Exception:
        return ins, outs
    dtypes = dict(ins)
    names = [n for n, _, _ in tf_ins]
    if set(names) != set(dtypes) or not set(tf_outs) <= set(outs):
        raise RouteFailed(f"the ONNX graph's inputs ({', '.join(dtypes)}) / outputs ({', '.join(outs)}) are "
                          f"not the model's ({', '.join(names)} / {', '.join(tf_outs)})")
    return [(n, dtypes[n]) for n in names], list(tf_outs)


def _check_onnx_twin(source: SourceModel, twin: Twin, runner: OnnxFloat64, real: list[Any],
                     keep: set[str]) -> None:
    """No float32/16 intermediate (but the schema-fixed ones), and the self-check against the
    float32 model (skipped when that cannot run, e.g. it did not load)."""
    feeds = {}
    for vi in real:
        dims = [d.dim_value or 1 for d in vi.type.tensor_type.shape.dim]
        dtype = np.dtype(_NP_OF.get(vi.type.tensor_type.elem_type, "float64"))
        feeds[vi.name] = (np.random.default_rng(0).uniform(-1, 1, dims).astype(dtype)
                          if dtype.kind == "f" else np.zeros(dims, dtype))
    values = runner.run(feeds, intermediate=True)
    low = [k for k, v in values.items()
           if isinstance(v, np.ndarray) and v.dtype in (np.float32, np.float16) and k not in keep]
    if low:
        raise RouteFailed(f"float64 ONNX still computes in float32 at: {', '.join(low[:6])}")
    # self check against the float32 model: feed shapes are the ONNX ones (fixed batch)
    try:
        ref32 = source.run32({k: (v.astype(np.float32) if v.dtype == np.float64 else v) for k, v in feeds.items()})
        twin.self_check = max(scaled_error(ref32[n], values[n]) for n in twin.outputs if n in ref32)
    except RouteFailed:
        raise
    except Exception:
        twin.self_check = None  # the float32 model may be what failed to load: not fatal here
    if twin.self_check is not None and not twin.self_check <= SELF_CHECK_LIMIT:
        raise RouteFailed(f"float64 ONNX differs from the float32 model by {twin.self_check:.3g}")


# --------------------------------------------------------------------------------- one node


_ORT_DOUBLE: dict[tuple[str, str, int], bool] = {}  # (domain, op_type, opset) -> ORT runs it in double
_NODE_CACHE: dict[tuple, Any] = {}
_NODE_CACHE_SIZE = 1024


def one_node_float64(node: Any, inputs: dict[str, np.ndarray], consts: dict[str, np.ndarray] | None = None,
                     opset: int = 9, engine: str = "auto") -> dict[str, np.ndarray]:
    """Evaluate one ONNX node in float64: float inputs/consts are cast to double (integer ones
    stay), Cast(to=float) casts to double, inputs that the schema fixes to float stay float.

    ``inputs`` are fed at run time, ``consts`` become initializers (weights); an empty input name
    means an omitted optional input. ``engine``: "auto" (ONNX Runtime if it has a double kernel for
    the op, else onnx.reference), "ort" or "reference". Returns {output name: array}; the evaluator
    is cached per (node, input shapes/dtypes, const identities), so calling it again for the same
    node on new inputs costs one run.
    """
    consts = consts or {}
    fin, _ = fixed_float_positions(node, opset)
    fixed_names = {node.input[i] for i in fin if i < len(node.input)}

    def as64(name: str, value: np.ndarray) -> np.ndarray:
        value = np.asarray(value)
        if value.dtype.kind == "f" and name not in fixed_names:
            return value.astype(np.float64, copy=False)
        return value

    feeds = {k: as64(k, v) for k, v in inputs.items() if k}
    key = (node.SerializeToString(), opset, engine,
           tuple(sorted((k, v.shape, v.dtype.str) for k, v in feeds.items())),
           tuple(sorted((k, id(v)) for k, v in consts.items())))
    runner = _NODE_CACHE.get(key)
    if runner is None:
        inits = {k: as64(k, v) for k, v in consts.items() if k in set(node.input)}
        runner = _NodeRunner(_one_node_model(node, feeds, inits, opset), (node.domain, node.op_type, opset), engine)
        runner.pinned = list(consts.values())  # the key holds their ids: keep them alive
        if len(_NODE_CACHE) >= _NODE_CACHE_SIZE:
            _NODE_CACHE.pop(next(iter(_NODE_CACHE)))
        _NODE_CACHE[key] = runner
    return runner.run(feeds)


def _one_node_model(node: Any, feeds: dict[str, np.ndarray], inits: dict[str, np.ndarray], opset: int) -> Any:
    """A one-node ONNX model of ``node`` in double: ``feeds`` as graph inputs, ``inits`` as
    initializers, Cast(to=float) and float tensor attributes made double."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    n = onnx.NodeProto()
    n.CopyFrom(node)
    for a in n.attribute:
        if n.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT:
            a.i = TensorProto.DOUBLE
        elif a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TensorProto.FLOAT:
            a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float64), a.t.name))
    graph_inputs = [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
                    for k, v in feeds.items()]
    graph = helper.make_graph([n], "one_node", graph_inputs, [onnx.ValueInfoProto(name=o) for o in n.output if o],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(node.domain or "", opset)])
    model.ir_version = 4 if opset <= 9 else 7
    return model


class _NodeRunner:
    """One node's model in ONNX Runtime (while it runs it in double) or onnx.reference."""

    def __init__(self, model: Any, op_key: tuple[str, str, int], engine: str) -> None:
        self.model, self.op_key = model, op_key
        self.names = [o.name for o in model.graph.output]
        self.sess: Any = None
        self.ref: Any = None
        self.pinned: list[Any] = []
        self.engine = engine
        if engine == "ort" or (engine == "auto" and _ORT_DOUBLE.get(op_key, True)):
            try:
                self.sess = _ort_session(model, threads=1)
            except Exception:
                if engine == "ort":
                    raise
                _ORT_DOUBLE[op_key] = False
        if self.sess is None:
            self._make_ref()

    def _make_ref(self) -> None:
        from onnx.reference import ReferenceEvaluator

        self.ref = ReferenceEvaluator(self.model, new_ops=reference_ops())

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.sess is not None:
            try:
                out = self.sess.run(self.names, feeds)
                _ORT_DOUBLE[self.op_key] = True
                return dict(zip(self.names, out))
            except Exception:  # e.g. LSTM: "does not support double yet" at run time
                _ORT_DOUBLE[self.op_key] = False
                if self.engine == "ort":
                    raise
                self.sess = None
                self._make_ref()
        return dict(zip(self.names, self.ref.run(None, feeds)))
