"""The planted-fault catalogue: mutations of a CNTK-bound ONNX graph that look like conversion
bugs, shared by the tests and the benchmarks (which import this module, never a test module).

Two selections of it: ``fidelity_faults`` (benchmarks/fidelity.py: weight errors of 1e-2, 1e-3,
1e-4, bias shifts, activation parameters, pad shifts, transpose swaps, dropped nodes) and
``localization_faults`` (layerwise tests and benchmarks/layerwise.py: the same ideas plus scale
constants, Clip max, conv dilation, each active on the given inputs by construction).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from pytest_tf2cntk.convert import onnx_graph as og

FLOAT = onnx.TensorProto.FLOAT
WEIGHT_DELTAS = (1e-2, 1e-3, 1e-4)
FIDELITY_KINDS = ("weight 1e-2", "weight 1e-3", "weight 1e-4", "bias shift", "activation param", "pad shift",
                  "transpose swap", "drop node")
LOCALIZATION_KINDS = ("weight x1.01", "weight x1.001", "weight x1.0001", "bias shift", "scale constant x1.01",
                      "Add constant replaced", "Clip max", "LeakyRelu alpha", "Relu -> LeakyRelu", "conv pads shift",
                      "conv dilation", "transpose perm")


@dataclass
class Fault:
    kind: str
    node: str  # the mutated node: the right answer for localization
    detail: str
    apply: Callable[[onnx.ModelProto], None]

    def planted(self, model: onnx.ModelProto) -> onnx.ModelProto:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        self.apply(copy)
        return copy

    def save(self, model: onnx.ModelProto, path: Path) -> Path:
        onnx.save(self.planted(model), str(path))
        return path


# ------------------------------------------------------------------------------------------------
# graph edits


def node_named(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    for node in model.graph.node:
        if node.name == name:
            return node
    raise KeyError(name)


def set_attr(node: onnx.NodeProto, name: str, value: Any) -> None:
    """Set (replace or add) one attribute of a node."""
    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(helper.make_attribute(name, value))


def set_const(model: onnx.ModelProto, node_name: str, index: int, fn: Callable[[np.ndarray], np.ndarray]) -> None:
    """Replace the initializer feeding node.input[index] by fn(value), for this node only."""
    node = node_named(model, node_name)
    old = og.initializers(model)[node.input[index]]
    value = numpy_helper.to_array(old)
    new_value = np.asarray(fn(value)).astype(value.dtype)
    users = sum(1 for n in model.graph.node for i in n.input if i == old.name)
    if users == 1:
        old.CopyFrom(numpy_helper.from_array(new_value, old.name))
        return
    # shared constant (tf2onnx dedupes equal tensors): give this node its own copy
    new_name = og.unique_name(model, old.name + "_mutated")
    model.graph.initializer.append(numpy_helper.from_array(new_value, new_name))
    if any(i.name == old.name for i in model.graph.input):  # old IR: initializers listed as inputs
        model.graph.input.append(helper.make_tensor_value_info(new_name, old.data_type, list(old.dims)))
    node.input[index] = new_name


def float_const(inits: dict, name: str, min_rank: int = 0) -> bool:
    t = inits.get(name)
    return t is not None and t.data_type == FLOAT and len(t.dims) >= min_rank and int(np.prod(t.dims)) > 0


def scale_weight(model: onnx.ModelProto, factor: float, min_rank: int = 2) -> str:
    """Multiply the first float weight tensor of rank >= min_rank by ``factor``; return its name."""
    for init in model.graph.initializer:
        value = numpy_helper.to_array(init)
        if value.ndim >= min_rank and value.dtype == np.float32:
            init.CopyFrom(numpy_helper.from_array((value * factor).astype(np.float32), init.name))
            return init.name
    raise AssertionError("no weight tensor to mutate")


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


# ------------------------------------------------------------------------------------------------
# the fidelity selection


def fidelity_faults(model: onnx.ModelProto) -> dict[str, list[Fault]]:
    """Every applicable mutation of the graph, by kind (the caller samples a few)."""
    inits = og.initializers(model)
    shapes = og.infer_shapes(model)
    types = og.elem_types(model)
    out: dict[str, list[Fault]] = {k: [] for k in FIDELITY_KINDS}
    weight_slots = {"Conv": (1,), "Gemm": (1,), "MatMul": (0, 1), "LSTM": (1, 2), "GRU": (1, 2),
                    "RNN": (1, 2), "Gather": (0,), "ConvTranspose": (1,)}
    bias_slots = {"Conv": (2,), "Gemm": (2,), "LSTM": (3,), "GRU": (3,), "RNN": (3,),
                  "ConvTranspose": (2,), "Add": (0, 1), "Sub": (1,)}
    for node in model.graph.node:
        name = node.name
        for idx in weight_slots.get(node.op_type, ()):
            if idx < len(node.input) and float_const(inits, node.input[idx], 2):
                for d in WEIGHT_DELTAS:
                    out[f"weight {d:.0e}".replace("e-0", "e-")].append(Fault(
                        f"weight {d:.0e}".replace("e-0", "e-"), name,
                        f"{node.op_type} input {idx} ({node.input[idx]}) x (1{d:+.0e})",
                        lambda m, n=name, i=idx, d=d: set_const(m, n, i, lambda v: v * (1 + d))))
        for idx in bias_slots.get(node.op_type, ()):
            if idx < len(node.input) and float_const(inits, node.input[idx]):
                def shift(v: np.ndarray, key: str = f"{name}:{idx}") -> np.ndarray:
                    rms = float(np.sqrt(np.mean(np.square(v.astype(np.float64)))))
                    delta = 1e-3 * rms if rms > 1e-6 else 1e-3
                    # random signs: a uniform shift would vanish under Softmax / normalization
                    signs = np.random.default_rng(zlib.crc32(key.encode())).choice([-1.0, 1.0], v.shape)
                    return v + delta * signs
                out["bias shift"].append(Fault(
                    "bias shift", name, f"{node.op_type} input {idx} ({node.input[idx]}) += "
                    "1e-3 x rms (or 1e-3) x random signs",
                    lambda m, n=name, i=idx, f=shift: set_const(m, n, i, f)))
        if node.op_type == "Clip":
            hi = og.attr(node, "max", None)
            if hi is not None:
                out["activation param"].append(Fault(
                    "activation param", name, f"Clip max {hi:g} -> {hi * 0.99:g}",
                    lambda m, n=name, hi=hi: set_attr(node_named(m, n), "max", float(hi * 0.99))))
        elif node.op_type in ("LeakyRelu", "Elu"):
            alpha = og.attr(node, "alpha", 0.01 if node.op_type == "LeakyRelu" else 1.0)
            out["activation param"].append(Fault(
                "activation param", name, f"{node.op_type} alpha {alpha:g} -> {alpha * 1.01:g}",
                lambda m, n=name, a=alpha: set_attr(node_named(m, n), "alpha", float(a * 1.01))))
        elif node.op_type == "Relu":
            def to_leaky(m: onnx.ModelProto, n: str = name) -> None:
                nd = node_named(m, n)
                nd.op_type = "LeakyRelu"
                set_attr(nd, "alpha", 0.01)
            out["activation param"].append(Fault("activation param", name, "Relu -> LeakyRelu(0.01)",
                                                    to_leaky))
        if node.op_type in ("Pad", "Conv", "MaxPool", "AveragePool"):
            pads = og.attr(node, "pads", None)
            if pads:
                pads = list(pads)
                first_spatial = 2 if node.op_type == "Pad" else 0
                for new in pad_shifts(pads, first_spatial):
                    out["pad shift"].append(Fault(
                        "pad shift", name, f"{node.op_type} pads {pads} -> {new}",
                        lambda m, n=name, p=new: set_attr(node_named(m, n), "pads", p)))
        if node.op_type == "Transpose":
            perm = list(og.attr(node, "perm", []))
            oshape = shapes.get(node.output[0])
            if perm and oshape and None not in oshape:
                for i in range(len(perm)):
                    for j in range(i + 1, len(perm)):
                        if oshape[i] == oshape[j] and oshape[i] > 1:
                            new = list(perm)
                            new[i], new[j] = new[j], new[i]
                            out["transpose swap"].append(Fault(
                                "transpose swap", name, f"Transpose perm {perm} -> {new} "
                                f"(output {list(oshape)})",
                                lambda m, n=name, p=new: set_attr(node_named(m, n), "perm", p)))
        if node.op_type in ("Relu", "Clip", "LeakyRelu", "Elu", "Tanh", "Sigmoid", "Add", "Sub", "Mul") \
                and types.get(node.output[0]) == FLOAT:
            oshape = shapes.get(node.output[0])
            data = [i for i in node.input[:1 if node.op_type not in ("Add", "Sub", "Mul") else 2]
                    if i and shapes.get(i) == oshape and oshape and None not in oshape]
            data.sort(key=lambda i: i in inits)  # prefer a tensor over a constant
            if data and data[0] not in inits:
                keep = data[0]

                def drop(m: onnx.ModelProto, n: str = name, keep: str = keep) -> None:
                    nd = node_named(m, n)
                    nd.op_type = "Identity"
                    del nd.input[:]
                    nd.input.append(keep)
                    del nd.attribute[:]
                what = "bypass" if node.op_type in ("Add", "Sub", "Mul") else "remove"
                out["drop node"].append(Fault("drop node", name,
                                                 f"{what} {node.op_type} (output := {keep})", drop))
    return out


def sample_fidelity(cands: dict[str, list[Fault]], per_kind: int, seed_text: str) -> list[Fault]:
    """Up to ``per_kind`` different targets per kind, chosen with a seeded RNG; for the weight
    kinds the same tensors get all three deltas."""
    chosen: list[Fault] = []
    weight_targets: list[str] | None = None
    for kind in FIDELITY_KINDS:
        pool = cands[kind]
        if not pool:
            continue
        if kind.startswith("weight"):
            if weight_targets is None:
                keys = sorted({m.detail.split(" x (")[0] + "|" + m.node for m in pool})
                rng = np.random.default_rng(zlib.crc32(f"{seed_text}:weight".encode()))
                weight_targets = [keys[i] for i in sorted(rng.choice(len(keys), min(per_kind, len(keys)),
                                                                     replace=False))]
            chosen += [m for m in pool if m.detail.split(" x (")[0] + "|" + m.node in weight_targets]
        else:
            rng = np.random.default_rng(zlib.crc32(f"{seed_text}:{kind}".encode()))
            idx = sorted(rng.choice(len(pool), min(per_kind, len(pool)), replace=False))
            chosen += [pool[i] for i in idx]
    return chosen


# ------------------------------------------------------------------------------------------------
# the localization selection


def _signs(key: str, shape: tuple) -> np.ndarray:
    return np.random.default_rng(zlib.crc32(key.encode())).choice([-1.0, 1.0], shape)


def _clip_input_max(model: onnx.ModelProto, feeds: dict[str, np.ndarray], tensors: list[str]) -> dict[str, float]:
    from pytest_tf2cntk.convert import onnxrt

    if not tensors:
        return {}
    sess = onnxrt.session(model, "cpu", extra_outputs=tensors)
    values = sess.run(tensors, {k: feeds[k] for k in og.graph_input_names(model)})
    return {t: float(np.max(v)) for t, v in zip(tensors, values)}


def localization_faults(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, list[Fault]]:
    """Every fault of each kind that keeps the graph valid (same shapes) and is active on
    ``feeds`` by construction (a Clip's new max is below what its input reaches)."""
    inits = og.initializers(model)
    shapes = og.infer_shapes(model)
    out: dict[str, list[Fault]] = {k: [] for k in LOCALIZATION_KINDS}

    clips = [n for n in model.graph.node if n.op_type == "Clip" and n.name]
    clip_max = _clip_input_max(model, feeds, [n.input[0] for n in clips])
    for node in model.graph.node:
        name, op = node.name, node.op_type
        if not name:
            continue
        for idx in {"Conv": (1,), "Gemm": (1,), "MatMul": (1,), "Gather": (0,)}.get(op, ()):
            if idx < len(node.input) and float_const(inits, node.input[idx], 2):
                for kind, f in (("weight x1.01", 1.01), ("weight x1.001", 1.001), ("weight x1.0001", 1.0001)):
                    out[kind].append(Fault(kind, name, f"{op} input {idx} x {f}",
                                           lambda m, n=name, i=idx, f=f: set_const(m, n, i, lambda v: v * f)))
        for idx in {"Conv": (2,), "Gemm": (2,), "Add": (0, 1)}.get(op, ()):
            if idx < len(node.input) and float_const(inits, node.input[idx]):
                def shift(v: np.ndarray, key: str = f"{name}:{idx}") -> np.ndarray:
                    rms = float(np.sqrt(np.mean(np.square(v.astype(np.float64)))))
                    return v + (1e-3 * rms if rms > 1e-6 else 1e-3) * _signs(key, v.shape)
                out["bias shift"].append(Fault("bias shift", name, f"{op} input {idx} += 1e-3 rms x random signs",
                                               lambda m, n=name, i=idx, f=shift: set_const(m, n, i, f)))
                if op == "Add":
                    def replace(v: np.ndarray) -> np.ndarray:
                        flat = v.reshape(-1)
                        if flat.size > 1 and not np.all(flat == flat[0]):
                            return np.roll(flat, 1).reshape(v.shape)
                        return v * 1.1 + 0.1
                    out["Add constant replaced"].append(Fault(
                        "Add constant replaced", name, f"Add input {idx}: values rolled by one",
                        lambda m, n=name, i=idx: set_const(m, n, i, replace)))
        if op == "Mul":
            for idx in (0, 1):
                if float_const(inits, node.input[idx]):
                    out["scale constant x1.01"].append(Fault(
                        "scale constant x1.01", name, f"Mul input {idx} x 1.01",
                        lambda m, n=name, i=idx: set_const(m, n, i, lambda v: v * 1.01)))
        if op == "Clip":
            top = clip_max.get(node.input[0], 0.0)
            hi = og.attr(node, "max", None)
            if hi is not None and top > 0:
                new = float(min(hi, top) * 0.5)
                out["Clip max"].append(Fault("Clip max", name, f"Clip max {hi:g} -> {new:.3g} (input reaches {top:.3g})",
                                             lambda m, n=name, v=new: set_attr(node_named(m, n), "max", v)))
        if op == "LeakyRelu":
            a = og.attr(node, "alpha", 0.01)
            out["LeakyRelu alpha"].append(Fault("LeakyRelu alpha", name, f"alpha {a:g} -> {a * 1.5:g}",
                                                lambda m, n=name, a=a: set_attr(node_named(m, n), "alpha", float(a * 1.5))))
        if op == "Relu":
            def to_leaky(m: onnx.ModelProto, n: str = name) -> None:
                nd = node_named(m, n)
                nd.op_type = "LeakyRelu"
                set_attr(nd, "alpha", 0.01)
            out["Relu -> LeakyRelu"].append(Fault("Relu -> LeakyRelu", name, "Relu -> LeakyRelu(0.01)", to_leaky))
        if op == "Conv":
            pads = list(og.attr(node, "pads", []) or [])
            kernel = list(og.attr(node, "kernel_shape", []) or [])
            strides = list(og.attr(node, "strides", [1] * len(kernel)) or [])
            for new in pad_shifts(pads):  # one pad moved from the end to the start: same shape
                out["conv pads shift"].append(Fault("conv pads shift", name, f"pads {pads} -> {new}",
                                                    lambda m, n=name, p=new: set_attr(node_named(m, n), "pads", p)))
            if kernel and all(s == 1 for s in strides) and any(k > 1 and k % 2 for k in kernel):
                pads0 = pads or [0] * (2 * len(kernel))
                h = len(kernel)
                dil = [2 if k > 1 else 1 for k in kernel]
                newp = [pads0[a] + (kernel[a % h] - 1) // 2 * (dil[a % h] - 1) for a in range(2 * h)]
                if all(k % 2 for k, d in zip(kernel, dil) if d > 1):
                    def dilate(m: onnx.ModelProto, n: str = name, d: list = dil, p: list = newp) -> None:
                        set_attr(node_named(m, n), "dilations", d)
                        set_attr(node_named(m, n), "pads", p)
                    out["conv dilation"].append(Fault("conv dilation", name, f"dilations -> {dil}, pads -> {newp}",
                                                      dilate))
        if op == "Transpose":
            perm = list(og.attr(node, "perm", []))
            oshape = shapes.get(node.output[0])
            if perm and oshape and None not in oshape:
                pairs = [(i, j) for i in range(len(perm)) for j in range(i + 1, len(perm))
                         if oshape[i] == oshape[j] and oshape[i] > 1]
                if pairs:
                    i, j = pairs[0]
                    new = list(perm)
                    new[i], new[j] = new[j], new[i]
                    out["transpose perm"].append(Fault("transpose perm", name, f"perm {perm} -> {new}",
                                                       lambda m, n=name, p=new: set_attr(node_named(m, n), "perm", p)))
    return out


def pick_localization(cands: dict[str, list[Fault]], per_kind: int, seed: str) -> list[Fault]:
    """Up to ``per_kind`` faults of every kind, chosen with a seeded RNG."""
    chosen = []
    for kind in LOCALIZATION_KINDS:
        pool = cands.get(kind, [])
        if pool:
            rng = np.random.default_rng(zlib.crc32(f"{seed}:{kind}".encode()))
            chosen += [pool[i] for i in sorted(rng.choice(len(pool), min(per_kind, len(pool)), replace=False))]
    return chosen


def feeds_for(conv: Any, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs inside each input's domain (the layerwise tests' and benchmark's)."""
    from pytest_tf2cntk.convert.domains import derive_domains, random_feeds

    return random_feeds(derive_domains(conv.onnx_model), np.random.default_rng(seed))
