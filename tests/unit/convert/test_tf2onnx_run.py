"""tf2onnx as the pipeline calls it, with real TensorFlow, tf2onnx, ONNX Runtime and CNTK: only
the model's inputs are graph inputs, and TF ops tf2onnx leaves behind are named with its reasons."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from pytest_tf2cntk.cntk.client import get_worker
from pytest_tf2cntk.convert import onnxrt
from pytest_tf2cntk.convert.domains import derive_domains, random_feeds
from pytest_tf2cntk.convert.pipeline import convert
from pytest_tf2cntk.errors import ConversionError, ModelLoadError, ValidationError
from pytest_tf2cntk.parity.engine import check_parity


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import keras
    import tensorflow as tf

    root = tmp_path_factory.mktemp("converted")
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    inp = keras.Input((6,), name="x")
    mlp = keras.Model(inp, keras.layers.Dense(3, "tanh", name="y")(keras.layers.Dense(4, "sigmoid")(inp)))
    mlp.set_weights([rng.normal(0, 1, w.shape).astype("float32") for w in mlp.get_weights()])  # biases too
    mlp.save(root / "mlp.keras")
    norm = keras.layers.Normalization()
    norm.adapt(rng.normal(3.0, 2.0, (64, 5)).astype("float32"))  # mean 3, std 2: a lost constant shows
    inp = keras.Input((5,), name="x")
    keras.Model(inp, keras.layers.Dense(2, name="y")(norm(inp))).save(root / "norm.keras")
    inp = keras.Input((6,), name="x")
    keras.Model(inp, keras.layers.Dense(3, activation="gelu", name="y")(inp)).save(root / "gelu.keras")

    class NewAxis(tf.Module):
        def __init__(self) -> None:
            self.w = tf.Variable(tf.ones((4, 3)))

        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")])
        def f(self, x: tf.Tensor) -> dict:
            return {"y": tf.matmul(x, self.w)[:, tf.newaxis, 1:]}  # StridedSlice with new_axis_mask

    class NoInput(tf.Module):
        def __init__(self) -> None:
            self.w = tf.Variable(tf.ones((2, 3)))

        @tf.function(input_signature=[])
        def f(self) -> dict:
            return {"y": self.w * 2.0}

    class Cosh(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")])
        def f(self, x: tf.Tensor) -> dict:
            return {"y": tf.math.cosh(x)}

    for name, cls in (("newaxis", NewAxis), ("noinput", NoInput), ("cosh", Cosh)):
        obj = cls()
        tf.saved_model.save(obj, str(root / name), signatures={"serving_default": obj.f})
    return {p.stem if p.suffix else p.name: p for p in root.iterdir()}


def _only_real_inputs(conv) -> None:
    model = conv.onnx_model
    inits = {t.name for t in model.graph.initializer}
    assert [i.name for i in model.graph.input] == ["x"]
    used = {i for n in model.graph.node for i in n.input if i}
    assert used <= inits | {"x"} | {o for n in model.graph.node for o in n.output}  # no value missing
    assert list(derive_domains(model)) == ["x"]
    feeds = random_feeds(derive_domains(model), np.random.default_rng(1))
    ref = conv.tf_model.run(feeds)["y"]
    np.testing.assert_allclose(onnxrt.run(model, feeds)["y"], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.needs_cntk
@pytest.mark.parametrize("name,opset", [("mlp", 7), ("mlp", 8), ("norm", 8), ("norm", 9)])
def test_weights_and_captured_constants_are_not_inputs(models: dict, name: str, opset: int,
                                                       tmp_path: Path) -> None:
    # opset 7/8: tf2onnx lists the weights among the graph inputs; Normalization: its mean is a
    # captured tensor that from_function made a graph input without a value
    conv = convert(models[name], batch=2, opset=opset, cache_dir=tmp_path)
    _only_real_inputs(conv)
    worker = get_worker()
    loaded = worker.load(str(conv.onnx_path))
    try:
        assert [i.name for i in loaded.inputs] == ["x"]
    finally:
        worker.unload(loaded)
    result = check_parity(models[name], "cpu", 5, batch=2, opset=opset, seed=0, cache_dir=tmp_path,
                          reproducer_dir=tmp_path / "repro", layerwise="off")
    assert result.passed, str(result)


def _unconverted(exc: BaseException) -> str:
    text = str(exc)
    assert "INVALID_GRAPH" not in text and "report it to tf2onnx" not in text and "Traceback" not in text
    return text


def test_erfc_of_exact_gelu_is_named_with_no_opset_to_try(models: dict, tmp_path: Path) -> None:
    for opset in (9, 13):  # above CNTK's range too: no opset has a converter, so none is suggested
        with pytest.raises(ConversionError) as info:
            convert(models["gelu"], batch=2, opset=opset, cache_dir=tmp_path)
        text = _unconverted(info.value)
        assert re.search(rf"Erfc '[^']*/Gelu/Erfc': tf2onnx: not supported at opset {opset};", text)
        assert "no converter for it at any opset" in text and "approximate=True" in text
        assert "--tf2cntk-opset" not in text


def test_strided_slice_new_axis_gives_tf2onnx_reason_and_no_circle(models: dict, tmp_path: Path) -> None:
    with pytest.raises(ConversionError) as info:
        convert(models["newaxis"], batch=2, opset=9, cache_dir=tmp_path)
    text = _unconverted(info.value)
    assert "StridedSlice: attribute new_axis_mask not supported" in text
    assert "other converter for it starts at opset 10, above the opset 9 CNTK 2.7 imports" in text and "--tf2cntk-opset" not in text
    # at opset 11 it converts, but CNTK cannot take opset 11: the hint must not send the user to 9
    with pytest.raises(ValidationError) as info:
        convert(models["newaxis"], batch=2, opset=11, cache_dir=tmp_path)
    text = str(info.value)
    assert "--tf2cntk-opset 9" not in text and "Opset 9, the highest CNTK 2.7 imports, is no way out" in text
    assert "StridedSlice: attribute new_axis_mask not supported" in text
    assert all("--tf2cntk-opset" not in p.hint for p in info.value.problems)


def test_an_op_convertible_at_opset_nine_is_sent_there(models: dict, tmp_path: Path) -> None:
    # tf2onnx converts Cosh from opset 9 on: at opset 8 the way out is opset 9, and it works
    with pytest.raises(ConversionError) as info:
        convert(models["cosh"], batch=2, opset=8, cache_dir=tmp_path)
    text = _unconverted(info.value)
    assert "Cosh '" in text and "tf2onnx: not supported at opset 8; tf2onnx converts it at opset 9" in text
    assert info.value.hint.startswith("convert at opset 9 (--tf2cntk-opset 9)")
    assert "Cosh" in convert(models["cosh"], batch=2, opset=9, cache_dir=tmp_path).ops


def test_a_model_without_inputs_has_its_own_message(models: dict, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as info:
        convert(models["noinput"], batch=2, cache_dir=tmp_path)
    text = str(info.value)
    assert "takes no inputs" in text and "nothing to test" in text and "tf2onnx" not in text
