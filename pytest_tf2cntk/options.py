"""Every plugin option in one place: ``--tf2cntk-NAME`` on the command line, ``tf2cntk_NAME`` in
the ini file, resolved once (command line over ini over default) into a frozen ``Settings``.

Budgets and input ranges are tables, so they live in ``[tool.tf2cntk.budgets]`` and
``[tool.tf2cntk.inputs]`` of pyproject.toml instead of ini lines. No pytest import here: the
parser and config objects are passed in.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

DEFAULT_DEVICES = "cpu,gpu"


@dataclass(frozen=True)
class Option:
    name: str  # dest and ini suffix
    default: Any
    help: str
    kind: str = "str"  # str | int | float | bool | list
    metavar: str | None = None
    minimum: float | None = None  # numbers: the smallest value allowed
    strict: bool = False  # numbers: the value must be above ``minimum``, not equal to it
    shown: str | None = None  # the default as --help shows it, when the value itself says little

    @property
    def flag(self) -> str:
        return "--tf2cntk-" + self.name.replace("_", "-")

    @property
    def ini(self) -> str:
        return "tf2cntk_" + self.name


OPTIONS: tuple[Option, ...] = (
    Option("models", (), "model to test: SavedModel dir, .keras or .h5 (repeatable; ini: one per line, "
                         "relative to rootdir)", "list", "PATH"),
    Option("devices", DEFAULT_DEVICES, "devices to test, comma separated: cpu, gpu, gpu:N", metavar="LIST"),
    Option("max_examples", 20, "Hypothesis examples per model and device", "int", "N", minimum=1),
    Option("batch", 1, "fixed batch size the model is converted and tested at", "int", "N", minimum=1),
    Option("opset", 9, "ONNX opset for tf2onnx (CNTK 2.7 imports <= 9)", "int", "K", minimum=1),
    Option("seed", None, "Hypothesis seed (default: random locally, derandomized when $CI is set)",
           "int", "N", minimum=0, shown="random"),
    Option("budget_scale", 1.0, "multiply every tolerance budget by this factor", "float", "X",
           minimum=0, strict=True),
    Option("cntk_python", None, "python of the CNTK 2.7 environment (default: $TF2CNTK_CNTK_PYTHON, "
                                "then the `tf2cntk setup` environment)", metavar="PATH"),
    Option("report", None, "write a JSON report of every conversion and parity check here",
           metavar="PATH"),
    Option("unsafe_load", False, "allow Keras models with Lambda layers (runs their Python code)", "bool"),
    Option("cache_dir", None, "conversion cache (default: $TF2CNTK_CACHE_DIR or "
                              "~/.cache/pytest-tf2cntk/conversions)", metavar="DIR"),
    Option("signature", None, "SavedModel signature to test (default: serving_default)", metavar="NAME"),
    Option("edge_values", False, "also generate zeros, range extremes, large and subnormal values", "bool"),
    Option("timeout", 600.0, "seconds one CNTK call may take before the worker is replaced", "float", "S",
           minimum=0),
    Option("layerwise", False, "localize every parity check layer by layer, not only failures "
                               "(failures are always localized, within 120 s)", "bool"),
    Option("history", None, "SQLite run history (default: .tf2cntk/history.sqlite under the rootdir)",
           metavar="PATH", shown=".tf2cntk/history.sqlite"),
    Option("no_history", False, "do not record this run in the history", "bool"),
    Option("baseline", "latest", "run the drift is measured against: latest, a RUN_ID or a TAG",
           metavar="SPEC"),
    Option("fail_on_drift", None, "fail an output whose error grew by more than FACTOR over the "
                                  "baseline (beyond run-to-run noise), even within budget", "float",
           "FACTOR", minimum=1, shown="off"),
)


@dataclass(frozen=True)
class Settings:
    models: tuple[Path, ...] = ()
    devices: tuple[str, ...] = ("cpu", "gpu")
    max_examples: int = 20
    batch: int = 1
    opset: int = 9
    seed: int | None = None
    budget_scale: float = 1.0
    cntk_python: str | None = None
    report: Path | None = None
    unsafe_load: bool = False
    cache_dir: str | None = None
    signature: str | None = None
    edge_values: bool = False
    timeout: float = 600.0
    layerwise: bool = False
    history: Path | None = None
    no_history: bool = False
    baseline: str = "latest"
    fail_on_drift: float | None = None
    budgets: dict[str, Any] = field(default_factory=dict)  # [tool.tf2cntk.budgets]
    inputs: dict[str, tuple[float, float]] = field(default_factory=dict)  # [tool.tf2cntk.inputs]


def register(parser: Any) -> None:
    """Add the options and their ini twins to a pytest parser."""
    group = parser.getgroup("tf2cntk", "TensorFlow -> CNTK conversion parity (pytest-tf2cntk)")
    for o in OPTIONS:
        if o.kind == "bool":
            group.addoption(o.flag, action="store_true", dest=f"tf2cntk_{o.name}", default=None,
                            help=f"{o.help} (ini: {o.ini})")
        elif o.kind == "list":
            group.addoption("--tf2cntk-model", action="append", dest="tf2cntk_models", default=None,
                            metavar=o.metavar, help=f"{o.help} (ini: {o.ini})")
        else:
            shown = o.shown if o.shown is not None else o.default
            group.addoption(o.flag, dest=f"tf2cntk_{o.name}", default=None, metavar=o.metavar,
                            help=f"{o.help} (default: {shown}; ini: {o.ini})")
        ini_type = {"bool": "bool", "list": "linelist"}.get(o.kind, "string")
        parser.addini(o.ini, help=o.help, type=ini_type, default=None if o.kind != "list" else [])


def _convert(o: Option, raw: Any) -> Any:
    if raw is None or raw == "":
        return o.default
    if o.kind == "bool":
        return raw if isinstance(raw, bool) else str(raw).lower() in ("1", "true", "yes", "on")
    if o.kind not in ("int", "float"):
        return raw
    value = int(raw) if o.kind == "int" else float(raw)
    if o.minimum is not None and (value <= o.minimum if o.strict else value < o.minimum):
        raise ValueError(f"must be {'>' if o.strict else '>='} {o.minimum:g}")
    return value


def resolve(getoption: Callable[[str], Any], getini: Callable[[str], Any], rootdir: Path,
            pyproject: dict[str, Any] | None = None) -> Settings:
    """Command line over ini over default. Raises ValueError naming the bad option."""
    values: dict[str, Any] = {}
    for o in OPTIONS:
        cli = getoption(f"tf2cntk_{o.name}")
        try:
            ini = getini(o.ini)
        except ValueError:
            ini = None
        try:
            if o.kind == "list":
                values[o.name] = tuple(cli) if cli else tuple(ini or ())
            else:
                values[o.name] = _convert(o, cli if cli is not None else ini)
        except ValueError as exc:
            source = o.flag if cli is not None else f"ini option {o.ini}"
            raise ValueError(f"{source}: {exc}") from None
    ini_models = not getoption("tf2cntk_models")
    base = rootdir if ini_models else Path(os.getcwd())
    values["models"] = tuple(Path(m) if Path(m).is_absolute() else base / m for m in values["models"])
    from pytest_tf2cntk.devices import normalize_device

    try:
        devices = [d.strip().lower() for d in str(values["devices"]).split(",") if d.strip()]
        for d in devices:
            normalize_device(d)  # validates; ids keep the user's spelling ("gpu", "gpu:1")
        values["devices"] = tuple(dict.fromkeys(devices))
    except ValueError as exc:
        raise ValueError(f"--tf2cntk-devices: {exc}") from None
    if values["report"]:
        values["report"] = Path(values["report"])
    history = Path(values["history"]) if values["history"] else rootdir / ".tf2cntk" / "history.sqlite"
    values["history"] = history if history.is_absolute() else rootdir / history
    tool = (pyproject or {}).get("tool", {}).get("tf2cntk", {})
    values["budgets"] = dict(tool.get("budgets", {}))
    values["inputs"] = {k: (float(v[0]), float(v[1])) for k, v in tool.get("inputs", {}).items()}
    return Settings(**values)


def read_pyproject(rootdir: Path) -> dict[str, Any]:
    import tomllib

    path = rootdir / "pyproject.toml"
    if not path.is_file():
        return {}
    with open(path, "rb") as fh:
        return tomllib.load(fh)

