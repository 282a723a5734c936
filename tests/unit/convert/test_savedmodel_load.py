"""A Keras 2 SavedModel saved with its optimizer's state: loaded through tf_keras, else the instruction."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from pytest_tf2cntk.convert.tf_model import load_tf_model
from pytest_tf2cntk.errors import ModelLoadError

from tests.support.small_models import keras2_optimizer_savedmodel

HAS_TF_KERAS = importlib.util.find_spec("tf_keras") is not None


@pytest.mark.skipif(HAS_TF_KERAS, reason="tf_keras is installed: the model loads through it")
def test_optimizer_slots_without_tf_keras_name_the_package_to_install(tmp_path: Path) -> None:
    import tensorflow as tf

    path = keras2_optimizer_savedmodel(tmp_path / "sm")
    with pytest.raises(ModelLoadError) as caught:
        load_tf_model(path)
    version = ".".join(tf.__version__.split(".")[:2])
    text = str(caught.value)
    assert "saved by Keras 2 with its optimizer's state" in text and "add_slot" in text
    assert caught.value.hint.startswith(f"pip install tf_keras=={version}.* ")
    assert "corrupt" not in text


@pytest.mark.skipif(not HAS_TF_KERAS, reason="tf_keras is not installed (not in locks/host.txt)")
def test_optimizer_slots_load_through_tf_keras(tmp_path: Path) -> None:
    model = load_tf_model(keras2_optimizer_savedmodel(tmp_path / "sm"))
    assert [t.name for t in model.inputs] == ["x"] and [t.name for t in model.outputs] == ["y"]
