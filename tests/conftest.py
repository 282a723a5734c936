"""Shared fixtures: one conversion cache for the whole session (pytester subprocesses inherit it
through $TF2CNTK_CACHE_DIR), fixture paths, a helper to plant faults in converted ONNX."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
# fixture -> batch it is tested at (the LSTM only imports correctly at batch 1)
FIXTURE_MODELS = {"mlp.keras": 4, "mlp_legacy.h5": 4, "mlp_savedmodel": 4, "cnn_bn.keras": 4,
                  "text_cnn.keras": 4, "two_io.keras": 4, "lstm.keras": 1}


@pytest.fixture(scope="session", autouse=True)
def conversion_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("conversion-cache")
    old = os.environ.get("TF2CNTK_CACHE_DIR")
    os.environ["TF2CNTK_CACHE_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("TF2CNTK_CACHE_DIR", None)
    else:
        os.environ["TF2CNTK_CACHE_DIR"] = old


def scale_weight(model: onnx.ModelProto, factor: float, min_rank: int = 2) -> str:
    """Multiply the first weight tensor of rank >= min_rank by ``factor``; return its name."""
    for init in model.graph.initializer:
        value = numpy_helper.to_array(init)
        if value.ndim >= min_rank and value.dtype == np.float32:
            init.CopyFrom(numpy_helper.from_array((value * factor).astype(np.float32), init.name))
            return init.name
    raise AssertionError("no weight tensor to mutate")


@pytest.fixture
def planted_fault(tmp_path: Path) -> Callable[[Path, float], Path]:
    """Write a copy of a converted ONNX file with one weight tensor scaled (a conversion bug)."""
    def make(onnx_path: Path, factor: float = 1.01) -> Path:
        model = onnx.load(str(onnx_path))
        scale_weight(model, factor)
        out = tmp_path / "mutated.onnx"
        onnx.save(model, str(out))
        return out
    return make
