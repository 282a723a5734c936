"""What a parity check is asked to do, as one frozen object (after Hypothesis' ``settings``).

Defaults come from the option table (``pytest_tf2cntk.options``); ``check_parity`` keeps a
keyword signature on top of it, the plugin and the CLI build it from their settings.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_tf2cntk.options import default
from pytest_tf2cntk.parity.budgets import BudgetConfig

REPRODUCER_DIR = Path(".tf2cntk") / "reproducers"


class Diagnose(str, enum.Enum):
    """When a diagnosis runs: ONNX Runtime triage of an example, layerwise localization."""

    OFF = "off"
    ON_FAILURE = "on-failure"
    ALWAYS = "always"

    @classmethod
    def of(cls, value: "Diagnose | str | bool") -> "Diagnose":
        if isinstance(value, bool):
            return cls.ALWAYS if value else cls.OFF
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"{value!r} is not one of {', '.join(m.value for m in cls)}") from None


@dataclass(frozen=True)
class ParityOptions:
    max_examples: int = default("max_examples")
    seed: int | None = default("seed")
    reference: str = default("reference")  # "auto": measure against a float64 twin; "off": budget only
    derandomize: bool = False  # the same examples on every run (the default when $CI is set)
    budgets: BudgetConfig = field(default_factory=BudgetConfig)
    inputs: dict[str, tuple[float, float]] = field(default_factory=dict)  # value range per input
    edge_values: bool = default("edge_values")
    allow_nonfinite: bool = False  # also NaN/Inf: then their positions must agree exactly
    triage: Diagnose = Diagnose.ON_FAILURE  # ONNX Runtime on every example, or where needed
    layerwise: Diagnose = Diagnose.ON_FAILURE
    reproducer_dir: Path = REPRODUCER_DIR
    cntk_python: str | None = default("cntk_python")
    cntk_onnx: str | None = None  # evaluate this graph in CNTK instead of the converted one
    allow_tf32: bool = False  # TF on an Ampere+ GPU: TF32 off unless asked, it costs ~1e-3
    database: Any = field(default=None, compare=False)  # Hypothesis example database

    @classmethod
    def build(cls, *, budgets: BudgetConfig | dict | None = None, budget_scale: float = default("budget_scale"),
              triage: Diagnose | str = Diagnose.ON_FAILURE, layerwise: Diagnose | str | bool = Diagnose.ON_FAILURE,
              reproducer_dir: str | Path | None = None, cntk_onnx: Any = None,
              **values: Any) -> "ParityOptions":
        """From loose values: a budget mapping or BudgetConfig and a scale, mode strings, paths."""
        config = budgets if isinstance(budgets, BudgetConfig) else BudgetConfig.from_mapping(budgets)
        if budget_scale != 1.0:
            config = config.scaled(budget_scale)
        return cls(budgets=config, triage=Diagnose.of(triage), layerwise=Diagnose.of(layerwise),
                   reproducer_dir=Path(reproducer_dir) if reproducer_dir else REPRODUCER_DIR,
                   cntk_onnx=str(cntk_onnx) if cntk_onnx else None, **values)
