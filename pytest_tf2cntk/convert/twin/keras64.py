"""Route 1, ``keras-float64``: the Keras model (``.keras``/``.h5``) rebuilt from its own config
with every float dtype policy / InputLayer dtype / op dtype set to float64, then float64 copies of
the weights assigned by variable path. Independent of tf2onnx. Handles Sequential, functional,
nested models and registered custom layers (their ``get_config`` round trip); a layer that still
computes in float32 (a hard-coded cast) is caught by the leak scan and the route gives up."""
from __future__ import annotations

import copy
from typing import Any

import numpy as np

from pytest_tf2cntk.convert.twin.core import ROUTE_KERAS, RouteFailed, Twin, twin_input_dtypes
from pytest_tf2cntk.convert.twin.source import SourceModel, self_check
from pytest_tf2cntk.convert.twin.tfgraph import graph_float_leaks
from pytest_tf2cntk.tf_import import tensorflow

FLOAT_NAMES = {"float32", "float16", "bfloat16", "half", "mixed_float16", "mixed_bfloat16"}


def keras_route(source: SourceModel, check: bool) -> Twin:
    tf = tensorflow()

    model = source.keras_model()
    ins, outs = source.io()
    twin_model, notes = rebuild_float64(model, safe_mode=not source.unsafe_load)
    specs = [tf.TensorSpec(shape, tf.as_dtype(dtype), name=name)
             for (name, _, shape), (_, dtype) in zip(ins, twin_input_dtypes(ins))]

    def call(*args: Any) -> list:
        out = twin_model(list(args) if len(args) > 1 else args[0], training=False)
        if isinstance(out, dict):
            return [out[n] for n in outs]
        return list(out) if isinstance(out, (list, tuple)) else [out]

    concrete = tf.function(call, input_signature=specs, autograph=False).get_concrete_function()
    if check:
        _check_float64_trace(concrete)
    names = [n for n, _, _ in ins]

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        result = concrete(*[tf.constant(feeds[n]) for n in names])
        return {n: np.asarray(v) for n, v in zip(outs, result)}

    twin = Twin(ROUTE_KERAS, twin_input_dtypes(ins), outs, run, notes=notes, model=twin_model)
    if check:
        twin.self_check = self_check(source, twin)
    return twin


def rebuild_float64(model: Any, safe_mode: bool = True) -> tuple[Any, list[str]]:
    """A float64 copy of a keras.Model (config round trip, weights copied) and notes."""
    import keras

    config = keras.saving.serialize_keras_object(model)
    policy = str(getattr(getattr(model, "dtype_policy", None), "name", ""))
    if "int8" in policy or "int4" in policy or "float8" in policy:
        raise RouteFailed(f"quantized dtype policy {policy}: no float64 equivalent")
    twin_model = keras.saving.deserialize_keras_object(float64_config(config), safe_mode=safe_mode)
    copy_weights(model, twin_model)
    notes = []
    low = sorted({n for n in dtype_names(config) if n in FLOAT_NAMES - {"float32"}})
    if low:
        notes.append(f"dtype(s) {', '.join(low)} promoted to float64 (mixed precision)")
    return twin_model, notes


def _check_float64_trace(concrete: Any) -> None:
    """No float32/16 tensor in the traced twin (its GraphDef and function library) nor output."""
    tf = tensorflow()

    leaks = graph_float_leaks(concrete.graph.as_graph_def())
    if leaks:
        raise RouteFailed("rebuilt model still computes in float32/16 at: " + "; ".join(leaks))
    for t in concrete.outputs:
        if t.dtype.is_floating and t.dtype != tf.float64:
            raise RouteFailed(f"output {t.name} is {t.dtype.name}")


def float64_config(node: Any) -> Any:
    """A Keras config with every float dtype (policies, InputLayer, op dtypes) set to float64 and
    every float value rounded to the float32 the original model computes with.

    Integer/bool dtypes (Embedding ids, Cast-to-int ops) stay as they are.
    """
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "dtype" and isinstance(value, str) and value in FLOAT_NAMES:
                out[key] = "float64"
            elif (key == "dtype" and isinstance(value, dict) and "config" in value
                  and isinstance(value["config"], dict) and value["config"].get("name") in FLOAT_NAMES):
                value = copy.deepcopy(value)
                value["class_name"] = "DTypePolicy"  # a mixed/quantized policy becomes plain float64
                value["config"] = {"name": "float64"}
                out[key] = value
            else:
                out[key] = float64_config(value)
        return out
    if isinstance(node, list):
        return [float64_config(v) for v in node]
    if isinstance(node, float) and np.isfinite(node):
        # Python-float hyperparameters (BN epsilon, LeakyReLU alpha, Rescaling scale, ...) are
        # float32 constants in the float32 model: the twin evaluates *that* function exactly.
        # (Measured: MobileNetV2 calibrated moves by 6.5e-7 between eps=1e-3 and eps=fl32(1e-3).)
        return float(np.float32(node))
    return node


def dtype_names(node: Any) -> list[str]:
    """Every dtype name in a Keras config (plain strings and policies' names)."""
    if isinstance(node, dict):
        out = []
        for key, value in node.items():
            if key == "dtype" and isinstance(value, str):
                out.append(value)
            elif key == "dtype" and isinstance(value, dict) and isinstance(value.get("config"), dict):
                out.append(str(value["config"].get("name")))
            else:
                out.extend(dtype_names(value))
        return out
    if isinstance(node, list):
        return [n for v in node for n in dtype_names(v)]
    return []


def copy_weights(model: Any, twin_model: Any) -> None:
    """Float64 copies of ``model``'s variables into ``twin_model``'s, matched by path (else order)."""
    src, dst = list(model.weights), list(twin_model.weights)
    if len(src) != len(dst):
        raise RouteFailed(f"rebuilt model has {len(dst)} variables, the original {len(src)}")
    src_paths = [getattr(v, "path", None) for v in src]
    dst_paths = [getattr(v, "path", None) for v in dst]
    if None not in src_paths and len(set(src_paths)) == len(src) and set(src_paths) == set(dst_paths):
        by_path = dict(zip(src_paths, src))
        pairs = [(by_path[p], v) for p, v in zip(dst_paths, dst)]
    else:
        pairs = list(zip(src, dst))
    for s, d in pairs:
        value = np.asarray(s.numpy())
        if tuple(value.shape) != tuple(d.shape):
            raise RouteFailed(f"variable {getattr(d, 'path', d.name)}: shape {tuple(d.shape)} vs "
                              f"{value.shape} in the original")
        want = np.dtype(str(d.dtype).replace("tf.", ""))  # keras variables report e.g. 'float64'
        if np.issubdtype(value.dtype, np.floating):
            if want != np.float64:
                raise RouteFailed(f"variable {getattr(d, 'path', d.name)} was rebuilt as {want}")
            d.assign(value.astype(np.float64))
        else:
            d.assign(value)
