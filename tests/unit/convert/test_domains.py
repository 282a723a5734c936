"""Valid value domains of model inputs, read from the graph."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pytest_tf2cntk.convert.domains import derive_domains
from pytest_tf2cntk.convert.pipeline import convert
from pytest_tf2cntk.parity.inputs import InputRecipe
from tests.support.graphs import embedding_model
from tests.support.small_models import float_embedding


def test_integer_input_that_indexes_an_embedding_stays_in_vocabulary() -> None:
    doms = derive_domains(embedding_model(37), {"x": (-3.0, 5.0)})
    assert doms["ids"].kind == "index" and (doms["ids"].low, doms["ids"].high) == (0, 37)
    assert doms["x"].kind == "float" and (doms["x"].low, doms["x"].high) == (-3.0, 5.0)
    for dist in ("constant", "uniform", "normal", "ramp"):
        for seed in range(5):
            arr = InputRecipe(dist, seed, 0.0, 1.0, "none", 0.0).fill(doms["ids"])
            assert arr.dtype == np.int32 and arr.shape == (2, 5)
            assert arr.min() >= 0 and arr.max() < 37


@pytest.mark.parametrize("dtype", ["float32", "int32"])
def test_a_real_keras_embedding_gets_the_vocabulary_through_its_cast_and_id_wrap(tmp_path: Path,
                                                                                  dtype: str) -> None:
    """Keras' Embedding casts to int32 and wraps negative ids (where(ids < 0, ids + vocab, ids))
    before its Gather; a vocabulary of 7 is below the default int range, so both cases show."""
    path = float_embedding(tmp_path / "emb.keras", vocab=7, dtype=dtype)
    doms = derive_domains(convert(path, batch=2, cache_dir=tmp_path / "c").onnx_model)
    assert doms["ids"].kind == "index" and (doms["ids"].low, doms["ids"].high) == (0, 7), doms
    assert doms["ids"].dtype == dtype and "embedding of 7 rows" in doms["ids"].why
    arr = InputRecipe("uniform", 3, 0.0, 1.0, "none", 0.0).fill(doms["ids"])
    assert arr.dtype == np.dtype(dtype) and np.array_equal(arr, np.round(arr)) and 0 <= arr.min() <= arr.max() < 7


def test_a_float_input_scaled_before_its_cast_keeps_the_float_range() -> None:
    """Only ids reach a Gather unchanged (but for the wrap): x * 10 cast to an index is no id."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("Mul", ["x", "ten"], ["x10"], name="scale"),
             helper.make_node("Cast", ["x10"], ["i"], to=TensorProto.INT32, name="cast"),
             helper.make_node("Gather", ["table", "i"], ["y"], name="gather")]
    inits = [numpy_helper.from_array(np.zeros((5, 2), np.float32), "table"),
             numpy_helper.from_array(np.array(10.0, np.float32), "ten")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])], inits)
    doms = derive_domains(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)]))
    assert doms["x"].kind == "float"
