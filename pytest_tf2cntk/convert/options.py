"""The options that shape a conversion, as one frozen object (defaults from the option table)."""
from __future__ import annotations

from dataclasses import dataclass

from pytest_tf2cntk.codec import Jsonable
from pytest_tf2cntk.options import default


@dataclass(frozen=True)
class ConversionOptions(Jsonable):
    batch: int = default("batch")
    opset: int = default("opset")
    signature: str | None = default("signature")
    unsafe_load: bool = default("unsafe_load")
    cache_dir: str | None = default("cache_dir")
    # (input name, its dimensions after the batch): fixes free dimensions (--tf2cntk-input-shape)
    input_shapes: tuple[tuple[str, tuple[int, ...]], ...] = default("input_shapes")
    repairs: str = default("repairs")  # "on" | "off": the CNTK repairs (convert.repairs)
    imports: tuple[str, ...] = default("imports")  # modules imported before the model loads (custom layers)
