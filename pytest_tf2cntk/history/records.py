"""What a run records, typed and JSON round-trip: each check (a parity result, or why it could
not run, with its drift verdicts), each conversion, and the run's JSON report. The history,
the JSON report and the xdist payload all carry these."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pytest_tf2cntk.codec import Jsonable
from pytest_tf2cntk.convert.passes import PassRecord
from pytest_tf2cntk.convert.validation import Problem
from pytest_tf2cntk.parity.localize.report import LayerRow
from pytest_tf2cntk.parity.result import ParityResult

REPORT_FORMAT = 2


@dataclass(frozen=True)
class DriftVerdict(Jsonable):
    baseline_error: float | None  # None: no baseline for this output
    ratio: float | None  # current / baseline, both floored
    noise: float | None  # upper edge of the noise band, as a multiple of the baseline error
    significant: bool
    message: str
    baseline_run: int | None = None
    samples: int = 0  # runs in the noise window
    threshold: float | None = None  # errors above this would be drift: max(factor x baseline, band)


@dataclass
class CheckRecord(Jsonable):
    """One model on one device in one run."""

    JSON_EXTRA = ("passed",)
    model: str  # as the run names it (relative to the rootdir)
    device: str
    result: ParityResult | None = None
    skipped: str = ""  # why the check could not run (device unavailable): never a pass
    drift: dict[str, DriftVerdict] = field(default_factory=dict)

    @property
    def passed(self) -> bool | None:
        return None if self.result is None else self.result.passed


@dataclass
class ConversionRecord(Jsonable):
    model: str
    ok: bool
    onnx: str = ""
    ops: dict[str, int] = field(default_factory=dict)
    passes: list[PassRecord] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    from_cache: bool = False
    seconds: float = 0.0
    error: str = ""
    type: str = ""  # the error's class


@dataclass
class RunPayload(Jsonable):
    """What an xdist worker hands the controller (and what one run holds)."""

    results: list[CheckRecord] = field(default_factory=list)
    conversions: list[ConversionRecord] = field(default_factory=list)
    layers: list[LayerRow] = field(default_factory=list)


@dataclass
class RunReport(Jsonable):
    """``--tf2cntk-report`` JSON."""

    created: str
    duration: float
    exitstatus: int
    passed: bool
    settings: dict[str, Any]
    models: list[str]
    versions: dict[str, str]
    conversions: list[ConversionRecord]
    results: list[CheckRecord]
    format: int = REPORT_FORMAT
