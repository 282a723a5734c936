"""pytest-tf2cntk: numerical parity testing for TensorFlow -> ONNX -> CNTK conversions.

The public API is imported lazily so that pytest loading the plugin stays cheap.
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "check_parity": ("parity", "check_parity"),
    "ParityResult": ("parity", "ParityResult"),
    "convert": ("conversion", "convert"),
    "Conversion": ("conversion", "Conversion"),
    "BudgetConfig": ("budgets", "BudgetConfig"),
    "assert_parity": ("plugin", "assert_parity"),
    "replay": ("reproducer", "replay"),
    "load_history": ("history", "load_history"),
}
__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f"{__name__}.{module}"), attr)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
