"""What a run records, typed and JSON round-trip: each check (a parity result, or why it could
not run, with its drift verdicts), each conversion, and the run's JSON report. The history,
the JSON report and the xdist payload all carry these."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pytest_tf2cntk.codec import Jsonable
from pytest_tf2cntk.convert.passes import PassRecord
from pytest_tf2cntk.convert.repairs import RepairRecord
from pytest_tf2cntk.convert.validation import Problem
from pytest_tf2cntk.parity.localize.report import LayerRow
from pytest_tf2cntk.parity.result import ParityResult

REPORT_FORMAT = 3  # 3: every check a row with its outcome (errors too); passed only if all passed


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


OUTCOME_PASSED, OUTCOME_FAILED, OUTCOME_ERROR, OUTCOME_SKIPPED = "passed", "failed", "error", "skipped"
OUTCOMES = (OUTCOME_PASSED, OUTCOME_FAILED, OUTCOME_ERROR, OUTCOME_SKIPPED)


@dataclass
class CheckRecord(Jsonable):
    """One model on one device in one run: a result, or why there is none (an error: the
    check could not run; a skip: the device cannot be used). Neither is ever a pass."""

    JSON_EXTRA = ("passed", "outcome")
    model: str  # as the run names it (relative to the rootdir)
    device: str
    result: ParityResult | None = None
    skipped: str = ""  # why the check could not run (device unavailable): never a pass
    drift: dict[str, DriftVerdict] = field(default_factory=dict)
    error: str = ""  # the one-paragraph message of what stopped the check
    error_type: str = ""  # its class, e.g. WorkerCrashed, ConversionError

    @property
    def outcome(self) -> str:
        if self.error:
            return OUTCOME_ERROR
        if self.result is None:
            return OUTCOME_SKIPPED
        return OUTCOME_PASSED if self.result.passed else OUTCOME_FAILED

    @property
    def passed(self) -> bool | None:
        """True / False for a check that ran to a verdict or errored; None for a skip."""
        outcome = self.outcome
        return None if outcome == OUTCOME_SKIPPED else outcome == OUTCOME_PASSED


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
    repairs: list[RepairRecord] = field(default_factory=list)  # the CNTK repairs the conversion used


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
    outcomes: dict[str, int] = field(default_factory=dict)  # checks per outcome (passed, failed, error, skipped)
    format: int = REPORT_FORMAT
