"""Fixed input shapes (--tf2cntk-input-shape): a fully convolutional Keras model with free H, W,
converted for real (TF, tf2onnx) at the shape asked for; wrong shapes refused in one paragraph."""
from __future__ import annotations

from pathlib import Path

import pytest

from pytest_tf2cntk.convert.pipeline import convert
from pytest_tf2cntk.convert.tf_model import ModelTensor, fix_input_shapes
from pytest_tf2cntk.errors import ModelLoadError
from pytest_tf2cntk.options import cli_text
from tests.support.small_models import fully_convolutional


@pytest.fixture(scope="module")
def fcn(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fully_convolutional(tmp_path_factory.mktemp("fcn") / "fcn.keras")


def _onnx_input_dims(conv) -> list[int]:
    (inp,) = conv.onnx_model.graph.input
    return [d.dim_value for d in inp.type.tensor_type.shape.dim]


def test_free_height_and_width_are_refused_naming_the_option(fcn: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as err:
        convert(fcn, batch=2, cache_dir=tmp_path)
    text = str(err.value)
    assert "Input 'image' has free dimensions besides the batch ([None, None, None, 3], batch first)" in text
    assert "--tf2cntk-input-shape=image:64x64x3" in text
    assert "--input-shape=image:64x64x3" in cli_text(text) and "--tf2cntk-" not in cli_text(text)  # the CLI's flag
    assert "[tool.tf2cntk.input_shapes] image = [64, 64, 3]" in text


def test_a_fixed_shape_converts_at_that_shape_and_is_part_of_the_cache_key(fcn: Path, tmp_path: Path) -> None:
    a = convert(fcn, batch=2, cache_dir=tmp_path, input_shapes={"image": (16, 12, 3)})
    assert _onnx_input_dims(a) == [2, 16, 12, 3]
    assert a.inputs[0].shape == (None, 16, 12, 3) and a.options.input_shapes == (("image", (16, 12, 3)),)
    assert a.tf_model.inputs[0].shape == (None, 16, 12, 3)  # the TF side runs at that shape too
    b = convert(fcn, batch=2, cache_dir=tmp_path, input_shapes=["image:8x8x3"])
    assert not b.from_cache and b.key != a.key and _onnx_input_dims(b) == [2, 8, 8, 3]
    again = convert(fcn, batch=2, cache_dir=tmp_path, input_shapes=["image:16x12x3"])
    assert again.from_cache and again.key == a.key and again.inputs == a.inputs


@pytest.mark.parametrize("shapes, says", [
    ({"img": (8, 8, 3)}, "The input shape img:8x8x3 (--tf2cntk-input-shape / [tool.tf2cntk.input_shapes]) "
                         "names an input"),
    ({"image": (8, 8)}, "gives 2 dimension(s), but input 'image' of"),
    ({"image": (1, 8, 8, 3)}, "gives 4 dimension(s), but input 'image' of"),
    ({"image": (8, 8, 4)}, "contradicts input 'image' of"),
    (["image=8x8x3"], "input_shapes: 'image=8x8x3' is not NAME:SHAPE"),
])
def test_wrong_shapes_are_one_paragraph_with_the_way_out(fcn: Path, tmp_path: Path, shapes, says: str) -> None:
    with pytest.raises(ModelLoadError) as err:
        convert(fcn, batch=1, cache_dir=tmp_path, input_shapes=shapes)
    assert says in err.value.message
    assert "\n" not in err.value.message and "Traceback" not in str(err.value)
    assert not list(tmp_path.glob("*/meta.json"))  # nothing cached for a configuration error


def test_fix_input_shapes_names_known_inputs_axis_and_batch_convention() -> None:
    inputs = [ModelTensor("image", "float32", (None, None, None, 3)), ModelTensor("k", "int32", (None, 4))]
    fixed = fix_input_shapes(inputs, (("image", (5, 6, 3)),), Path("m.keras"))
    assert [t.shape for t in fixed] == [(None, 5, 6, 3), (None, 4)]
    assert fix_input_shapes(inputs, (("k", (4,)),), Path("m.keras"))[1].shape == (None, 4)  # fixed as it is
    with pytest.raises(ModelLoadError) as err:
        fix_input_shapes(inputs, (("x", (4,)),), Path("m.keras"))
    assert "its inputs are: image [None, None, None, 3], k [None, 4]" in err.value.message
    with pytest.raises(ModelLoadError) as err:
        fix_input_shapes(inputs, (("image", (5, 6, 1)),), Path("m.keras"))
    assert "its axis 3 is fixed at 3, not 1" in err.value.message and err.value.hint
