"""Typed errors. Each carries a one-paragraph message and, where there is one, the fix."""
from __future__ import annotations


class Tf2CntkError(Exception):
    """Base of every error this package raises on purpose.

    ``hint`` is the way out (a command, an option); ``str()`` shows message then hint so a CLI
    can print it as one paragraph without a traceback.
    """

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  fix: {self.hint}"


class EnvironmentProblem(Tf2CntkError):
    """The CNTK side (Python 3.6, cntk, OpenMPI compat) is missing or broken."""


class WorkerError(Tf2CntkError):
    """Base for failures talking to the CNTK worker process."""


class WorkerCrashed(WorkerError):
    """The worker died (signal or exit code); ``stderr_tail`` holds its last words."""

    def __init__(self, message: str, *, returncode: int | None = None, stderr_tail: str = "",
                 hint: str | None = None) -> None:
        super().__init__(message, hint)
        self.returncode = returncode
        self.stderr_tail = stderr_tail


class WorkerTimeout(WorkerError):
    """A call took longer than its timeout; the worker was killed and will be replaced."""


class CNTKError(WorkerError):
    """CNTK itself raised; the message is CNTK's own, first line first."""

    def __init__(self, message: str, *, detail: str = "", hint: str | None = None) -> None:
        super().__init__(message, hint)
        self.detail = detail


class ProtocolError(WorkerError):
    """A malformed frame or an unknown request (the worker answers it; it does not die)."""


class LostCheck(Tf2CntkError):
    """A check whose process died before it reported (an xdist worker killed mid-check)."""


class ModelLoadError(Tf2CntkError):
    """The TensorFlow model cannot be found, read or tested."""


class ConversionError(Tf2CntkError):
    """tf2onnx failed or produced a graph that is not valid ONNX."""


class ValidationError(Tf2CntkError):
    """The converted graph contains nodes CNTK 2.7 cannot import; ``problems`` lists each."""

    def __init__(self, message: str, problems: list | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint)
        self.problems = list(problems or [])


class CNTKLoadError(Tf2CntkError):
    """CNTK cannot load or run the converted graph at the batch under test: found when the model
    is converted, before any parity example; a failed conversion like the others."""


class PassMismatch(Tf2CntkError):
    """A graph rewrite pass changed the numbers: a bug in the pass, reported, never applied."""


class DeviceUnavailable(Tf2CntkError):
    """A backend cannot use the requested device; the pytest layer turns this into a skip."""


class ConfigError(Tf2CntkError, ValueError):
    """A bad option value, table entry or name in the configuration (pytest options, the ini,
    pyproject tables, a marker, the CLI's flags). A ValueError too, so an option's validator
    raises it where a ValueError is expected. CLI: exit 2; pytest: a usage error (exit 4) before
    the run, or the failed item's one-paragraph message once the model is converted."""


class HistoryError(Tf2CntkError):
    """The history database cannot be used (corrupt, foreign, newer schema, unknown run or tag).

    The file is never overwritten or repaired: the message names it and says how to move it aside.
    """


class ParityFailure(AssertionError):
    """A parity verdict that failed (or drifted, with --tf2cntk-fail-on-drift); str() is the
    diagnostic table."""
