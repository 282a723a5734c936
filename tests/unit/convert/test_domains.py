"""Valid value domains of model inputs, read from the graph."""
from __future__ import annotations

import numpy as np

from pytest_tf2cntk.convert.domains import derive_domains
from pytest_tf2cntk.parity.inputs import InputRecipe
from tests.support.graphs import embedding_model


def test_integer_input_that_indexes_an_embedding_stays_in_vocabulary() -> None:
    doms = derive_domains(embedding_model(37), {"x": (-3.0, 5.0)})
    assert doms["ids"].kind == "index" and (doms["ids"].low, doms["ids"].high) == (0, 37)
    assert doms["x"].kind == "float" and (doms["x"].low, doms["x"].high) == (-3.0, 5.0)
    for dist in ("constant", "uniform", "normal", "ramp"):
        for seed in range(5):
            arr = InputRecipe(dist, seed, 0.0, 1.0, "none", 0.0).fill(doms["ids"])
            assert arr.dtype == np.int32 and arr.shape == (2, 5)
            assert arr.min() >= 0 and arr.max() < 37
