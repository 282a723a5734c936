"""The float64 twin (convert/twin): every route forced on a model made for it, the checks that
reject a twin, the give-ups naming the op, and one ONNX node in float64. No CNTK needed."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pytest_tf2cntk.convert.options import ConversionOptions
from pytest_tf2cntk.convert.twin.core import (ROUTE_GRAPH, ROUTE_KERAS, ROUTE_ONNX, ROUTES, SELF_CHECK_LIMIT,
                                              TwinUnavailable, scaled_error)
from pytest_tf2cntk.convert.twin.build import build_twin
from pytest_tf2cntk.convert.twin.onnx64 import _ORT_DOUBLE, conv_nd, one_node_float64
from pytest_tf2cntk.convert.twin.source import SourceModel

from tests.support.paths import FIXTURE_MODELS, FIXTURES

EXPECTED_ROUTE = {"mlp.keras": ROUTE_KERAS, "mlp_legacy.h5": ROUTE_KERAS, "mlp_savedmodel": ROUTE_GRAPH,
                  "cnn_bn.keras": ROUTE_KERAS, "text_cnn.keras": ROUTE_KERAS, "two_io.keras": ROUTE_KERAS,
                  "lstm.keras": ROUTE_KERAS, "lstm_textgen.keras": ROUTE_KERAS}
TINY = 1e-5  # self-check of a correct twin: float32 rounding (observed <= 3e-7; lstm_textgen, 2 LSTMs over 40 steps: 2.2e-6)


@dataclass
class Loaded:
    """A model the package loaded but did not convert (tf2onnx cannot, or need not): what
    ``build_twin`` reads of a Conversion, without the ONNX (so route 3 gives up)."""

    tf_model: Any
    options: ConversionOptions = field(default_factory=ConversionOptions)
    onnx_model: Any = None

    @property
    def batch(self) -> int:
        return self.options.batch


def _load(path: Path, signature: str | None = None) -> Loaded:
    from pytest_tf2cntk.convert.tf_model import load_tf_model

    return Loaded(load_tf_model(path, signature))


@pytest.fixture(scope="module")
def conversions() -> dict[str, Any]:
    from pytest_tf2cntk.convert.pipeline import convert

    assert set(EXPECTED_ROUTE) == set(FIXTURE_MODELS)
    return {name: convert(FIXTURES / name, batch=batch) for name, batch in FIXTURE_MODELS.items()}


def _feeds(conv: Any, batch: int = 3, seed: int = 1) -> dict[str, np.ndarray]:
    return SourceModel(conv.tf_model).probe_feeds(batch=batch, seed=seed)


# --------------------------------------------------------------------------------- the fixtures


@pytest.mark.parametrize("name", sorted(FIXTURE_MODELS))
def test_every_fixture_gets_its_route_a_float64_output_and_a_tiny_self_check(conversions, name: str) -> None:
    conv = conversions[name]
    twin = conv.float64_twin()
    assert twin, str(twin)
    assert twin.route == EXPECTED_ROUTE[name] and twin.independent and twin.attempts == (
        [] if twin.route == ROUTE_KERAS else [(ROUTE_KERAS, "not a Keras model (savedmodel)")])
    assert twin.self_check is not None and twin.self_check < TINY
    assert [n for n, _ in twin.inputs] == [i.name for i in conv.tf_model.inputs]
    assert twin.outputs == [o.name for o in conv.tf_model.outputs]
    assert dict(twin.inputs) == {i.name: "float64" if i.dtype.startswith("float") else i.dtype
                                 for i in conv.tf_model.inputs}  # text_cnn's int32 ids stay int32
    feeds = _feeds(conv)
    out = twin.run(feeds)
    ref32 = conv.tf_model.run(feeds)
    assert list(out) == twin.outputs and all(v.dtype == np.float64 for v in out.values())
    assert all(scaled_error(ref32[n], out[n]) < TINY for n in out)


@pytest.mark.parametrize("name", sorted(n for n, r in EXPECTED_ROUTE.items() if r == ROUTE_KERAS))
def test_the_two_independent_routes_compute_the_same_float64_function(conversions, name: str) -> None:
    conv = conversions[name]
    keras64 = build_twin(conv, routes=(ROUTE_KERAS,))
    graph64 = build_twin(conv, routes=(ROUTE_GRAPH,))
    assert keras64.route == ROUTE_KERAS and graph64.route == ROUTE_GRAPH
    feeds = _feeds(conv)
    a, b = keras64.run(feeds), graph64.run(feeds)
    assert max(scaled_error(b[n], a[n]) for n in keras64.outputs) < 1e-12


def test_the_onnx_route_inherits_converter_bugs_and_is_used_only_when_the_others_are_excluded(conversions) -> None:
    conv = conversions["two_io.keras"]  # two inputs, two outputs: the order is TFModel's
    assert build_twin(conv, routes=(ROUTE_GRAPH, ROUTE_ONNX)).route == ROUTE_GRAPH
    twin = build_twin(conv, routes=(ROUTE_ONNX,))
    assert twin.route == ROUTE_ONNX and not twin.independent
    assert twin.label == "converted ONNX in float64 (inherits converter bugs)"
    assert "independent" in build_twin(conv).label and twin.self_check < TINY
    assert [n for n, _ in twin.inputs] == [i.name for i in conv.tf_model.inputs]
    assert twin.outputs == [o.name for o in conv.tf_model.outputs]
    feeds = _feeds(conv, batch=conv.batch)  # the ONNX graph has the conversion's fixed batch
    out, truth = twin.run(feeds), conv.float64_twin().run(feeds)
    assert all(v.dtype == np.float64 for v in out.values())
    assert max(scaled_error(out[n], truth[n]) for n in out) < 1e-12  # no float32 folding in two_io


def test_the_onnx_route_runs_convs_in_numpy_float64(conversions) -> None:
    conv = conversions["cnn_bn.keras"]  # ORT has no double Conv: onnx.reference with conv_nd
    twin = build_twin(conv, routes=(ROUTE_ONNX,))
    assert twin.route == ROUTE_ONNX and twin.notes == ["engine: onnx.reference"]
    feeds = _feeds(conv, batch=conv.batch)
    out, truth = twin.run(feeds), conv.float64_twin().run(feeds)
    # tf2onnx folds the inference BatchNorm into the conv weights in float32: ~1e-7, not 1e-16
    assert all(v.dtype == np.float64 for v in out.values())
    assert 0 < max(scaled_error(out[n], truth[n]) for n in out) < TINY


def test_a_twin_that_is_not_the_same_function_is_rejected_and_the_next_route_tried(conversions,
                                                                                   monkeypatch) -> None:
    from pytest_tf2cntk.convert.twin import keras64
    from pytest_tf2cntk.convert.twin.core import RouteFailed, Twin
    from pytest_tf2cntk.convert.twin.source import self_check

    conv = conversions["mlp.keras"]
    good = conv.float64_twin()
    source = SourceModel(conv.tf_model)

    def scaled(factor: float) -> Twin:
        return Twin(ROUTE_KERAS, good.inputs, good.outputs,
                    lambda f: {k: v * factor for k, v in good.run(f).items()})

    with pytest.raises(RouteFailed, match=r"scaled error .* \(limit 0.05\): not the same function"):
        self_check(source, scaled(1.2))
    assert 5e-3 < self_check(source, scaled(1.01)) < SELF_CHECK_LIMIT  # gross mistakes only
    single = Twin(ROUTE_KERAS, good.inputs, good.outputs,
                  lambda f: {k: v.astype(np.float32) for k, v in good.run(f).items()})
    with pytest.raises(RouteFailed, match="output 'probs' is float32, not float64"):
        self_check(source, single)

    def lose_a_bias(model: Any, twin_model: Any) -> None:
        keras64_copy(model, twin_model)
        twin_model.weights[-1].assign(np.zeros(twin_model.weights[-1].shape))

    keras64_copy = keras64.copy_weights
    monkeypatch.setattr(keras64, "copy_weights", lose_a_bias)
    twin = build_twin(conv)
    assert twin.route == ROUTE_GRAPH and twin.attempts[0][0] == ROUTE_KERAS
    assert twin.attempts[0][1].startswith("twin differs from the float32 model by scaled error ")


# --------------------------------------------------------------------------------- models made here


def _custom_layers() -> tuple[type, type]:
    import keras

    @keras.saving.register_keras_serializable(package="twintest")
    class ScaledDense(keras.layers.Layer):
        """Dense with a learned per-unit scale and a Python-float offset, written the Keras 3 way."""

        def __init__(self, units: int, offset: float = 0.1, **kw: Any) -> None:
            super().__init__(**kw)
            self.units, self.offset = units, offset

        def build(self, shape: Any) -> None:
            self.k = self.add_weight(name="k", shape=(shape[-1], self.units), initializer="glorot_uniform")
            self.s = self.add_weight(name="s", shape=(self.units,),
                                     initializer=keras.initializers.RandomUniform(0.5, 1.5))

        def call(self, x: Any) -> Any:
            return keras.ops.tanh(keras.ops.matmul(x, self.k) * self.s + self.offset)

        def get_config(self) -> dict:
            return {**super().get_config(), "units": self.units, "offset": self.offset}

    @keras.saving.register_keras_serializable(package="twintest")
    class Hardcoded32(keras.layers.Layer):
        """Casts to float32 inside: a float64 rebuild cannot make it compute in float64."""

        def call(self, x: Any) -> Any:
            import tensorflow as tf

            return tf.cast(tf.math.softplus(tf.cast(x, tf.float32)), x.dtype)

    return ScaledDense, Hardcoded32


def test_a_custom_layer_rebuilds_and_one_computing_in_float32_falls_back_to_the_graph_route(tmp_path) -> None:
    import keras

    scaled_dense, hardcoded32 = _custom_layers()
    keras.utils.set_random_seed(7)
    x = keras.Input((12,), name="x")
    keras.Model(x, keras.layers.Dense(3, name="out")(scaled_dense(8, name="sd")(x))).save(tmp_path / "good.keras")
    keras.Model(x, hardcoded32(name="hc")(scaled_dense(8, name="sd")(x))).save(tmp_path / "bad.keras")
    good = build_twin(_load(tmp_path / "good.keras"))
    assert good.route == ROUTE_KERAS and good.self_check < TINY
    bad = build_twin(_load(tmp_path / "bad.keras"))
    assert bad.route == ROUTE_GRAPH and bad.self_check < TINY
    (route, why), = bad.attempts
    assert route == ROUTE_KERAS and why.startswith("rebuilt model still computes in float32/16 at: ")
    assert "DT_FLOAT" in why and "Softplus" in why
    assert bad.run({"x": np.ones((2, 12))})[bad.outputs[0]].dtype == np.float64


def test_unsafe_load_reaches_the_rebuild_and_mixed_precision_is_promoted(tmp_path) -> None:
    import keras

    keras.utils.set_random_seed(9)
    x = keras.Input((4,), name="x")
    lam = keras.layers.Lambda(lambda t: t * 2.5 + 0.1)
    keras.Model(x, lam(keras.layers.Dense(3)(x))).save(tmp_path / "lambda.keras")
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        xm = keras.Input((10,), name="x")
        hm = keras.layers.Dense(16, activation="relu")(xm)
        mixed = keras.Model(xm, keras.layers.Dense(3, dtype="float32")(hm))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    mixed.save(tmp_path / "mixed.keras")
    from pytest_tf2cntk.convert.tf_model import load_tf_model

    unsafe = ConversionOptions(unsafe_load=True)
    twin = build_twin(Loaded(load_tf_model(tmp_path / "lambda.keras", unsafe_load=True), unsafe))
    assert twin.route == ROUTE_KERAS and twin.self_check < TINY
    twin = build_twin(_load(tmp_path / "mixed.keras"))
    assert twin.route == ROUTE_KERAS
    assert twin.notes == ["dtype(s) mixed_float16 promoted to float64 (mixed precision)"]
    assert 1e-5 < twin.self_check < 1e-2  # the float16 model's own rounding, measured against float64


def _fused_batchnorm_savedmodel(path: Path) -> Path:
    """A tf.Module with FusedBatchNormV3 (as Keras 2 exports): no float64 CPU kernel."""
    import tensorflow as tf

    r = np.random.default_rng(3)

    class BNModule(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = tf.Variable(r.normal(0, 0.3, (3, 3, 3, 8)).astype("float32"))
            self.scale = tf.Variable(r.uniform(0.5, 1.5, 8).astype("float32"))
            self.offset = tf.Variable(r.normal(0, 0.2, 8).astype("float32"))
            self.mean = tf.Variable(r.normal(0, 0.2, 8).astype("float32"))
            self.var = tf.Variable(r.uniform(0.5, 2, 8).astype("float32"))
            self.dense = tf.Variable(r.normal(0, 0.3, (8, 4)).astype("float32"))

        @tf.function(input_signature=[tf.TensorSpec([None, 10, 10, 3], tf.float32, name="image")])
        def serve(self, image: Any) -> dict:
            h = tf.nn.conv2d(image, self.w, 1, "SAME")
            h, _, _ = tf.compat.v1.nn.fused_batch_norm(h, self.scale, self.offset, self.mean, self.var,
                                                       epsilon=1e-3, is_training=False)
            h = tf.reduce_mean(tf.nn.relu6(h), axis=[1, 2])
            return {"logits": tf.matmul(h, self.dense)}

    module = BNModule()
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})
    return path


def test_fused_batchnorm_is_rewritten_into_float64_arithmetic(tmp_path) -> None:
    twin = build_twin(_load(_fused_batchnorm_savedmodel(tmp_path / "fusedbn")))
    assert twin.route == ROUTE_GRAPH and twin.self_check < TINY
    assert twin.notes[0] == "1 FusedBatchNorm node(s) rewritten as Rsqrt/Mul/Add (no float64 kernel)"
    assert not [n.name for n in twin.model.node if n.op.startswith("FusedBatchNorm")]


@pytest.fixture(scope="module")
def bad_savedmodel(tmp_path_factory) -> Path:
    """Signatures the graph route cannot make float64: LRN (no float64 CPU kernel),
    ResizeBilinear (float32 output fixed by the op definition), FakeQuant (float32 only)."""
    import tensorflow as tf

    class Bad(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.k = tf.Variable(np.ones((1, 1, 3, 4), np.float32))

        def conv(self, x: Any) -> Any:
            return tf.nn.conv2d(x, self.k, 1, "SAME")

        @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 3], tf.float32, name="x")])
        def lrn(self, x: Any) -> dict:
            return {"y": tf.nn.local_response_normalization(self.conv(x), depth_radius=2)}

        @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 3], tf.float32, name="x")])
        def resize(self, x: Any) -> dict:
            return {"y": tf.compat.v1.image.resize_bilinear(self.conv(x), [16, 16])}

        @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 3], tf.float32, name="x")])
        def fakequant(self, x: Any) -> dict:
            return {"y": tf.quantization.fake_quant_with_min_max_args(self.conv(x), -2.0, 2.0)}

    path = tmp_path_factory.mktemp("twin") / "bad_savedmodel"
    module = Bad()
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.lrn, "resize": module.resize,
                                                       "fakequant": module.fakequant})
    return path


@pytest.mark.parametrize("signature,op", [("serving_default", "LRN"), ("resize", "ResizeBilinear"),
                                          ("fakequant", "FakeQuantWithMinMaxArgs")])
def test_the_graph_route_gives_up_naming_the_op(bad_savedmodel: Path, signature: str, op: str) -> None:
    twin = build_twin(_load(bad_savedmodel, signature))
    assert isinstance(twin, TwinUnavailable) and not twin
    assert [r for r, _ in twin.attempts] == list(ROUTES)
    why = dict(twin.attempts)
    assert why[ROUTE_KERAS] == "not a Keras model (savedmodel)"
    assert why[ROUTE_GRAPH].startswith("no float64 CPU kernel: ") and f"({op}" in why[ROUTE_GRAPH]
    assert why[ROUTE_ONNX] == "no converted ONNX model given"
    text = str(twin)
    assert text.startswith(f"no float64 twin of {bad_savedmodel}: every route gave up")
    assert all(f"\n  {r}: {w}" in text for r, w in twin.attempts)


def test_when_both_independent_routes_give_up_the_converted_onnx_is_the_twin(bad_savedmodel: Path) -> None:
    from pytest_tf2cntk.convert.pipeline import convert

    conv = convert(bad_savedmodel, batch=2)  # LRN converts (ONNX LRN), but has no float64 TF kernel
    twin = conv.float64_twin()
    assert twin.route == ROUTE_ONNX and not twin.independent and twin.self_check < TINY
    assert [r for r, _ in twin.attempts] == [ROUTE_KERAS, ROUTE_GRAPH] and "LRN" in twin.attempts[1][1]
    feeds = _feeds(conv, batch=2)
    assert twin.run(feeds)["y"].dtype == np.float64


class _Unloadable:
    """A conversion whose TF model cannot be loaded (only its ONNX graph is there)."""

    options = ConversionOptions()
    batch = 1
    source = "unloadable"

    def __init__(self, onnx_model: Any) -> None:
        self.onnx_model = onnx_model

    @property
    def tf_model(self) -> Any:
        raise OSError("the model file went away")


def test_the_onnx_route_keeps_schema_fixed_floats_and_works_without_the_tf_model() -> None:
    from onnx import TensorProto, helper, numpy_helper

    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")  # tensor(float) at opset 9
    graph = helper.make_graph(
        [helper.make_node("Upsample", ["x", "scales"], ["up"], mode="nearest"),
         helper.make_node("Relu", ["up"], ["y"])],
        "upsample", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 6, 6])], [scales])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    twin = build_twin(_Unloadable(model))
    assert twin.route == ROUTE_ONNX and twin.self_check is None  # nothing to check it against
    assert [r for r, _ in twin.attempts] == [ROUTE_KERAS, ROUTE_GRAPH]
    assert all(why == "OSError: the model file went away" for _, why in twin.attempts)
    x = np.random.default_rng(0).standard_normal((1, 2, 3, 3))
    y = twin.run({"x": x})["y"]
    assert y.dtype == np.float64 and np.array_equal(y, np.maximum(x, 0).repeat(2, axis=2).repeat(2, axis=3))


@pytest.mark.slow
def test_a_keras_application_gets_the_same_twin_by_both_independent_routes(tmp_path) -> None:
    """MobileNetV2 (depthwise convs, ReLU6, 52 BatchNorms with statistics away from 0/1)."""
    import keras

    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(input_shape=(96, 96, 3), alpha=0.35, weights=None, classes=10)
    r = np.random.default_rng(0)
    for w in model.weights:
        if "moving_variance" in w.path:
            w.assign(r.uniform(0.5, 2, w.shape).astype("float32"))
        elif "moving_mean" in w.path or "beta" in w.path:
            w.assign(r.normal(0, 0.2, w.shape).astype("float32"))
    model.save(tmp_path / "mobilenet_v2.keras")
    loaded = _load(tmp_path / "mobilenet_v2.keras")
    keras64, graph64 = build_twin(loaded), build_twin(loaded, routes=(ROUTE_GRAPH,))
    assert keras64.route == ROUTE_KERAS and graph64.route == ROUTE_GRAPH
    assert keras64.self_check < TINY and graph64.self_check < TINY
    feeds = SourceModel(loaded.tf_model).probe_feeds(batch=2, seed=1)
    a, b = keras64.run(feeds), graph64.run(feeds)
    assert max(scaled_error(b[n], a[n]) for n in a) < 1e-12


# --------------------------------------------------------------------------------- one node


def test_conv_nd_matches_onnx_reference_conv() -> None:
    from onnx.reference.ops.op_conv import _conv_implementation

    r = np.random.default_rng(0)
    cases = [  # (c, m, group, kernel, strides, dilations, auto_pad, pads)
        (3, 4, 1, (3, 3), (1, 1), (1, 1), "NOTSET", (1, 1, 1, 1)),
        (4, 8, 2, (3, 2), (2, 1), (1, 2), "NOTSET", (0, 1, 1, 0)),
        (6, 6, 6, (3, 3), (2, 2), (1, 1), "SAME_UPPER", None),
        (5, 10, 5, (2, 2), (1, 1), (1, 1), "SAME_LOWER", None),
        (1, 3, 1, (3,), (1,), (2,), "VALID", None),
    ]
    for c, m, group, k, st, dil, auto, pads in cases:
        x = r.standard_normal((2, c) + (7,) * len(k))
        w = r.standard_normal((m, c // group) + k)
        b = r.standard_normal(m)
        got = conv_nd(x, w, b, auto, list(dil), group, list(k), list(pads) if pads else None, list(st))
        ref = _conv_implementation(x, w, b, auto, list(dil), group, list(k), list(pads) if pads else None,
                                   list(st))
        assert got.dtype == np.float64 and got.shape == ref.shape
        assert np.max(np.abs(got - ref)) < 1e-12, (c, m, group, k, auto)


def test_one_node_depthwise_conv_is_conv_nd_in_float64_and_add_runs_in_ort_double() -> None:
    from onnx import helper

    r = np.random.default_rng(0)
    x = r.standard_normal((1, 4, 6, 6)).astype(np.float32)
    w = r.standard_normal((4, 1, 3, 3)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], group=4, pads=[1, 1, 1, 1])
    y = one_node_float64(node, {"x": x}, {"w": w})["y"]
    ref = conv_nd(x.astype(np.float64), w.astype(np.float64), None, None, None, 4, None, [1, 1, 1, 1], None)
    assert y.dtype == np.float64 and np.array_equal(y, ref)
    assert _ORT_DOUBLE.get(("", "Conv", 9)) is False  # ORT has no double Conv: onnx.reference ran it
    again = one_node_float64(node, {"x": x * 2}, {"w": w})["y"]  # the cached evaluator, new inputs
    assert np.allclose(again, 2 * ref, rtol=0, atol=1e-12)
    add = helper.make_node("Add", ["a", "b"], ["c"])
    c = one_node_float64(add, {"a": x, "b": x})["c"]
    assert c.dtype == np.float64 and _ORT_DOUBLE[("", "Add", 9)] is True
    assert np.array_equal(c, x.astype(np.float64) * 2)


def test_one_node_lrn_is_onnx_lrn_in_float64() -> None:
    """onnx.reference's own LRN (onnx 1.23) sums the squares for the first N channels only; the
    twin's replaces it (else route 3 fails its self-check on any LRN model)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    x = np.random.default_rng(2).uniform(-1, 1, (2, 6, 3, 3)).astype(np.float32)
    node = helper.make_node("LRN", ["x"], ["y"], size=3, alpha=0.5, beta=0.75, bias=1.0)
    got = one_node_float64(node, {"x": x})["y"]
    graph = helper.make_graph([node], "lrn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    model.ir_version = 4
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ref32 = session.run(None, {"x": x})[0]
    assert got.dtype == np.float64 and scaled_error(ref32, got) < TINY


def _numpy_lstm(x: np.ndarray, w: np.ndarray, rec: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ONNX LSTM (forward, gates i o f c, sigmoid/tanh/tanh, zero initial state) in float64."""
    def sigmoid(v: np.ndarray) -> np.ndarray:
        return 1 / (1 + np.exp(-v))

    hidden = rec.shape[-1]
    h = np.zeros((x.shape[1], hidden))
    c = np.zeros_like(h)
    ys = []
    for t in range(x.shape[0]):
        g = x[t] @ w[0].T + h @ rec[0].T + b[0, :4 * hidden] + b[0, 4 * hidden:]
        i, o, f, cand = np.split(g, 4, axis=1)
        c = sigmoid(f) * c + sigmoid(i) * np.tanh(cand)
        h = sigmoid(o) * np.tanh(c)
        ys.append(h)
    return np.stack(ys)[:, None], h[None]


def test_one_node_lstm_evaluates_in_float64() -> None:
    from onnx import helper

    r = np.random.default_rng(1)
    seq, batch, size, hidden = 5, 2, 3, 4
    x = r.uniform(-1, 1, (seq, batch, size)).astype(np.float32)
    w = r.normal(0, 0.5, (1, 4 * hidden, size)).astype(np.float32)
    rec = r.normal(0, 0.5, (1, 4 * hidden, hidden)).astype(np.float32)
    b = r.normal(0, 0.2, (1, 8 * hidden)).astype(np.float32)
    node = helper.make_node("LSTM", ["x", "w", "r", "b"], ["y", "y_h"], hidden_size=hidden)
    out = one_node_float64(node, {"x": x}, {"w": w, "r": rec, "b": b})
    y, y_h = _numpy_lstm(*(a.astype(np.float64) for a in (x, w, rec, b)))
    assert out["y"].dtype == np.float64 and out["y_h"].dtype == np.float64
    assert np.max(np.abs(out["y"] - y)) < 1e-12 and np.max(np.abs(out["y_h"] - y_h)) < 1e-12
