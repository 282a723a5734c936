"""pytest-tf2cntk: numerical parity testing for TensorFlow -> ONNX -> CNTK conversions.

The public API is imported lazily so that pytest loading the plugin stays cheap.
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "check_parity": ("parity.engine", "check_parity"),
    "ParityResult": ("parity.engine", "ParityResult"),
    "convert": ("convert.pipeline", "convert"),
    "Conversion": ("convert.pipeline", "Conversion"),
    "BudgetConfig": ("parity.budgets", "BudgetConfig"),
    "assert_parity": ("plugin", "assert_parity"),
    "replay": ("parity.reproducer", "replay"),
    "load_history": ("history.report", "load_history"),
}
__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f"{__name__}.{module}"), attr)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
