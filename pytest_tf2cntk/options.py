"""Every option, declared once: its default, help, validator and the group it belongs to.

One table feeds ``--tf2cntk-NAME`` on pytest's command line, its ini twin ``tf2cntk_NAME``, the
key ``NAME`` of ``[tool.tf2cntk]`` in pyproject.toml and, for the groups a command takes, the
``tf2cntk`` command's ``--NAME`` (after pytest-benchmark's ``add_*_options(prefix=...)`` and
Polygraphy's argument groups). Precedence: command line, then ini, then ``[tool.tf2cntk]``,
then the default. Budgets and input ranges are tables (``[tool.tf2cntk.budgets]``,
``[tool.tf2cntk.inputs]``), validated here too; an option with a syntax of its own has a
``parser`` (``input_shapes``: "name:64x64x3" texts, or the ``[tool.tf2cntk.input_shapes]`` table
under its own key). No pytest import: parsers are passed in.
"""
from __future__ import annotations

import argparse
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from pytest_tf2cntk.devices import normalize_device
from pytest_tf2cntk.errors import ConfigError
from pytest_tf2cntk.project_tables import parse_budget_table, parse_input_ranges

CONVERSION, CNTK, PARITY, HISTORY, PLUGIN = "conversion", "cntk", "parity", "history", "plugin"
CALIBRATE, REPORT = "calibrate", "report"  # `tf2cntk calibrate` / `tf2cntk report` only: not pytest options
TABLES = ("budgets", "inputs")  # [tool.tf2cntk.*] tables that are not options
# [tool.tf2cntk.budgets] keys that are settings of the rule, not op types (BudgetConfig.from_mapping)
BUDGET_SETTINGS = ("headroom", "scale", "noise_factor", "floor_ulps", "run_factor")
# files that make their directory pytest's rootdir when they hold pytest configuration (find_rootdir)
PYTEST_CONFIGS = ("pytest.toml", ".pytest.toml", "pytest.ini", ".pytest.ini", "pyproject.toml", "tox.ini", "setup.cfg")


@dataclass(frozen=True)
class Option:
    name: str  # dest, ini suffix and [tool.tf2cntk] key
    default: Any
    help: str
    kind: str = "str"  # str | int | float | bool | list
    metavar: str | None = None
    minimum: float | None = None  # numbers: the smallest value allowed
    strict: bool = False  # numbers: the value must be above ``minimum``, not equal to it
    shown: str | None = None  # the default as --help shows it, when the value itself says little
    group: str = PLUGIN
    pytest_flag: str | None = None  # when it differs from --tf2cntk-NAME
    choices: tuple[str, ...] = ()  # text options: the values allowed
    parser: Callable[[Any], Any] | None = None  # a syntax of its own: raw value -> value, ValueError if wrong
    spelled: str | None = None  # the ini suffix and [tool.tf2cntk] key when ``name`` cannot be ("import")

    @property
    def key(self) -> str:
        """The key of ``[tool.tf2cntk]`` and the ini suffix."""
        return self.spelled or self.name

    @property
    def in_pytest(self) -> bool:
        return self.group not in (CALIBRATE, REPORT)

    @property
    def flag(self) -> str:
        return self.pytest_flag or "--tf2cntk-" + self.name.replace("_", "-")

    @property
    def cli_flag(self) -> str:
        """The command's flag: the pytest flag without its prefix (--tf2cntk-input-shape -> --input-shape)."""
        return "--" + self.flag[len("--tf2cntk-"):]

    @property
    def ini(self) -> str:
        return "tf2cntk_" + self.key

    @property
    def shown_default(self) -> str:
        return str(self.shown if self.shown is not None else self.default)

    def parse(self, raw: Any) -> Any:
        """The value of ``raw`` (text or a TOML value); ValueError says what is allowed."""
        if raw is None or raw == "":
            return self.default
        if self.parser is not None:
            return self.parser(raw)
        if self.kind == "bool":
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                raise ValueError(f"must be true or false, not {raw!r}")
            return text in ("1", "true", "yes", "on")
        if self.kind == "list":
            items = [raw] if isinstance(raw, str) else list(raw)
            return tuple(str(i) for i in items)
        if self.kind not in ("int", "float"):
            if self.choices and str(raw) not in self.choices:
                raise ValueError(f"must be one of {', '.join(self.choices)}, not {raw!r}")
            return str(raw)
        try:
            value = int(raw) if self.kind == "int" else float(raw)
        except (TypeError, ValueError):
            raise ValueError(f"must be {'an integer' if self.kind == 'int' else 'a number'}, not {raw!r}") from None
        if self.kind == "float" and not math.isfinite(value):
            raise ValueError(f"must be a finite number, not {raw!r}")
        if self.minimum is not None and (value <= self.minimum if self.strict else value < self.minimum):
            raise ValueError(f"must be {'>' if self.strict else '>='} {self.minimum:g} (got {raw})")
        return value


MODULE_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def parse_imports(raw: Any) -> tuple[str, ...]:
    """Dotted module names (--tf2cntk-import), in order, each once; ValueError names a bad one."""
    items = [raw] if isinstance(raw, str) else list(raw)
    names = [str(i).strip() for i in items]
    bad = [n for n in names if not MODULE_NAME.fullmatch(n)]
    if bad:
        raise ValueError(f"{bad[0]!r} is not a module name: give one as `import` takes it, e.g. pkg.layers")
    return tuple(dict.fromkeys(names))


SHAPE_SYNTAX = ("NAME:SHAPE, SHAPE the input's dimensions after the batch axis as positive integers "
                "joined by x, e.g. image:64x64x3")


def output_file(raw: Any, what: str, example: str = "report.json", makes_dirs: bool = True) -> str:
    """A file to be written at the end: refused now if it cannot be one, not after the (slow) work;
    ``makes_dirs``: its writer creates missing directories."""
    path = Path(str(raw))
    if path.is_dir():
        raise ConfigError(f"{path} is a directory, and {what} is a file: give a file path, e.g. "
                          f"{path / example}")
    blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise ConfigError(f"{path} cannot be created: {blocker} is a file, not a directory; give a path "
                          "in a directory")
    if not makes_dirs and not path.parent.is_dir():
        raise ConfigError(f"the directory of {what} {path} does not exist ({path.parent})",
                          hint=f"create it first (mkdir -p {path.parent}) or write elsewhere")
    return str(raw)


def parse_input_shapes(raw: Any) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """Fixed input shapes, sorted by name: "name:64x64x3" texts (command line, ini, a TOML list),
    a table {name: [64, 64, 3] or "64x64x3"} or (name, dims) pairs. ValueError names the entry."""
    if raw is None or raw == "":
        return ()
    if isinstance(raw, Mapping):
        items = [(str(k), v, f"{k} = {v!r}") for k, v in raw.items()]
    else:
        items = []
        for entry in [raw] if isinstance(raw, str) else list(raw):
            if isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], str):
                items.append((entry[0], entry[1], f"{entry[0]}:{entry[1]!r}"))  # as stored
                continue
            text = str(entry).strip()
            name, sep, dims = text.rpartition(":")
            if not sep or not name.strip():
                raise ValueError(f"{text!r} is not {SHAPE_SYNTAX}")
            items.append((name.strip(), dims, repr(text)))
    out: dict[str, tuple[int, ...]] = {}
    for name, dims, shown in items:
        shape = _shape_dims(dims, shown)
        if out.get(name, shape) != shape:
            raise ValueError(f"input {name!r} is given two shapes, {'x'.join(map(str, out[name]))} and "
                             f"{'x'.join(map(str, shape))}: give one")
        out[name] = shape
    return tuple(sorted(out.items()))


def _shape_dims(dims: Any, shown: str) -> tuple[int, ...]:
    parts = dims.lower().split("x") if isinstance(dims, str) else dims
    if not isinstance(parts, (list, tuple)) or not parts:
        raise ValueError(f"{shown}: expected {SHAPE_SYNTAX} (in a table: name = [64, 64, 3])")
    out = []
    for part in parts:
        try:
            if isinstance(part, bool) or (isinstance(part, float) and not part.is_integer()):
                raise ValueError
            d = int(part.strip()) if isinstance(part, str) else int(part)
        except (TypeError, ValueError):
            raise ValueError(f"{shown}: {part!r} is not a whole number; expected {SHAPE_SYNTAX}") from None
        if d < 1:
            raise ValueError(f"{shown}: dimension {d} must be >= 1; expected {SHAPE_SYNTAX}")
        out.append(d)
    return tuple(out)


OPTIONS: tuple[Option, ...] = (
    Option("models", (), "model to test: SavedModel dir, .keras or .h5 (repeatable; ini: one per line, "
                         "relative to rootdir)", "list", "PATH", pytest_flag="--tf2cntk-model"),
    Option("devices", "cpu,gpu", "devices to test, comma separated: cpu, gpu, gpu:N "
                                 "(a device that cannot be used is skipped with the reason)", metavar="LIST",
           group=PARITY, parser=lambda raw: ",".join(parse_devices(raw))),
    Option("max_examples", 20, "Hypothesis examples per model and device", "int", "N", minimum=1, group=PARITY),
    Option("batch", 1, "fixed batch size the model is converted and tested at", "int", "N", minimum=1,
           group=CONVERSION),
    Option("opset", 9, "ONNX opset for tf2onnx (CNTK 2.7 imports <= 9)", "int", "K", minimum=1,
           group=CONVERSION),
    Option("seed", None, "Hypothesis seed (default: random locally, derandomized when $CI is set)",
           "int", "N", minimum=0, shown="random", group=PARITY),
    Option("reference", "auto", "what the verdict measures CNTK against: auto (a float64 twin of the model, "
                                "built by the tool; where none can be built, the a-priori budget), off "
                                "(the a-priori budget only)", metavar="MODE", group=PARITY, choices=("auto", "off")),
    Option("budget_scale", 1.0, "multiply every tolerance budget by this factor", "float", "X",
           minimum=0, strict=True, group=PARITY),
    Option("cntk_python", None, "python of the CNTK 2.7 environment (default: $TF2CNTK_CNTK_PYTHON, "
                                "then the `tf2cntk setup` environment)", metavar="PATH", group=CNTK),
    Option("report", None, "write a JSON report of every conversion and parity check here",
           metavar="PATH", parser=lambda raw: output_file(raw, "the report")),
    Option("unsafe_load", False, "allow Keras models with Lambda layers (runs their Python code)", "bool",
           group=CONVERSION),
    Option("cache_dir", None, "conversion cache (default: $TF2CNTK_CACHE_DIR or "
                              "~/.cache/pytest-tf2cntk/conversions)", metavar="DIR", group=CONVERSION),
    Option("signature", None, "SavedModel signature to test (default: serving_default)", metavar="NAME",
           group=CONVERSION),
    Option("input_shapes", (), "fix an input's free dimensions for the test: NAME:SHAPE, the dimensions after "
                               "the batch joined by x, e.g. image:64x64x3 (repeatable; ini: one per line; "
                               "pyproject: [tool.tf2cntk.input_shapes] image = [64, 64, 3])", "list",
           "NAME:SHAPE", group=CONVERSION, pytest_flag="--tf2cntk-input-shape", parser=parse_input_shapes),
    Option("repairs", "on", "CNTK repairs: on rewrites the graphs CNTK 2.7 computes wrongly into ones it computes "
                            "correctly, each proved in ONNX Runtime; off converts without them, so the raw "
                            "CNTK defect shows", metavar="on|off", group=CONVERSION, choices=("on", "off")),
    Option("imports", (), "module to import before a model is loaded, e.g. the one that registers its custom "
                          "Keras layers (repeatable; ini: one per line; pyproject: import = [\"pkg.layers\"])",
           "list", "MODULE", group=CONVERSION, pytest_flag="--tf2cntk-import", spelled="import",
           parser=parse_imports),
    Option("edge_values", False, "begin with NaN/Inf-free edge patterns (zeros, range extremes, large and "
                                 "subnormal values) on each input, then let Hypothesis mix them in", "bool",
           group=PARITY),
    Option("timeout", 600.0, "seconds one CNTK call may take before the worker is replaced", "float", "S",
           minimum=0, strict=True, group=CNTK),
    Option("layerwise", False, "localize every parity check layer by layer, not only failures "
                               "(failures are always localized, within 120 s)", "bool"),
    Option("history", None, "SQLite run history (default: .tf2cntk/history.sqlite under the rootdir)",
           metavar="PATH", shown=".tf2cntk/history.sqlite", group=HISTORY),
    Option("no_history", False, "do not record this run in the history", "bool"),
    Option("baseline", "latest", "run the drift is measured against: latest, a RUN_ID or a TAG",
           metavar="SPEC", group=HISTORY),
    Option("fail_on_drift", None, "fail an output whose error grew by more than FACTOR over the "
                                  "baseline (beyond run-to-run noise), even within budget", "float",
           "FACTOR", minimum=1, strict=True, shown="off"),
    Option("factor", 2.0, "error ratio that counts as drift (beyond the noise band)", "float", "X", minimum=1,
           strict=True, group=REPORT),
    Option("window", 10, "runs used to measure run-to-run noise", "int", "N", minimum=1, group=REPORT),
    Option("seeds", 5, "Hypothesis seeds, one run each", "int", "N", minimum=1, group=CALIBRATE),
    Option("examples", 40, "examples per seed", "int", "N", minimum=1, group=CALIBRATE),
    Option("margin", 10.0, "proposed budget = margin x max observed error", "float", "X", minimum=0,
           strict=True, group=CALIBRATE),
)
BY_NAME: dict[str, Option] = {o.name: o for o in OPTIONS}
BY_KEY: dict[str, Option] = {o.key: o for o in OPTIONS}  # as [tool.tf2cntk] spells them
PYTEST_OPTIONS = tuple(o for o in OPTIONS if o.in_pytest)


def default(name: str) -> Any:
    """The one default of option ``name`` (dataclasses and signatures take it from here)."""
    return BY_NAME[name].default


def group(name: str) -> list[Option]:
    return [o for o in OPTIONS if o.group == name]


def parse_devices(text: str | list[str] | tuple[str, ...], source: str = "") -> tuple[str, ...]:
    """'cpu, gpu:1' (or a TOML list) -> ('cpu', 'gpu:1'); ids keep the user's spelling."""
    items = str(text).split(",") if isinstance(text, str) else [str(t) for t in text]
    devices = [d.strip().lower() for d in items if d.strip()]
    prefix = f"{source}: " if source else ""
    try:
        for d in devices:
            normalize_device(d)
    except ValueError as exc:
        raise ConfigError(f"{prefix}{exc}") from None
    if not devices:
        raise ConfigError(f"{prefix}no device given in {text!r}: name at least one, e.g. cpu or cpu,gpu:0")
    return tuple(dict.fromkeys(devices))



# ---------------------------------------------------------------------------------------------
# the plugin: pytest options and ini twins, resolved once into Settings


@dataclass(frozen=True)
class Settings:
    models: tuple[Path, ...] = ()
    devices: tuple[str, ...] = parse_devices(default("devices"), "default")
    max_examples: int = default("max_examples")
    batch: int = default("batch")
    opset: int = default("opset")
    seed: int | None = default("seed")
    reference: str = default("reference")
    budget_scale: float = default("budget_scale")
    cntk_python: str | None = default("cntk_python")
    report: Path | None = default("report")
    unsafe_load: bool = default("unsafe_load")
    cache_dir: str | None = default("cache_dir")
    signature: str | None = default("signature")
    input_shapes: tuple[tuple[str, tuple[int, ...]], ...] = default("input_shapes")
    repairs: str = default("repairs")
    imports: tuple[str, ...] = default("imports")
    edge_values: bool = default("edge_values")
    timeout: float = default("timeout")
    layerwise: bool = default("layerwise")
    history: Path | None = default("history")
    no_history: bool = default("no_history")
    baseline: str = default("baseline")
    fail_on_drift: float | None = default("fail_on_drift")
    budgets: dict[str, Any] = field(default_factory=dict)  # [tool.tf2cntk.budgets]
    inputs: dict[str, tuple[float, float]] = field(default_factory=dict)  # [tool.tf2cntk.inputs]

    def pick(self, names: list[Option] | tuple[str, ...]) -> dict[str, Any]:
        """The values of some options, e.g. ``settings.pick(group(CONVERSION))``."""
        return {(n.name if isinstance(n, Option) else n): getattr(self, n.name if isinstance(n, Option) else n)
                for n in names}


def register(parser: Any) -> None:
    """Add the options and their ini twins to a pytest parser."""
    group_ = parser.getgroup("tf2cntk", "TensorFlow -> CNTK conversion parity (pytest-tf2cntk)")
    for o in PYTEST_OPTIONS:
        dest = f"tf2cntk_{o.name}"
        if o.kind == "bool":
            group_.addoption(o.flag, action="store_true", dest=dest, default=None, help=f"{o.help} (ini: {o.ini})")
        elif o.kind == "list":
            group_.addoption(o.flag, action="append", dest=dest, default=None, metavar=o.metavar,
                             help=f"{o.help} (ini: {o.ini})")
        else:
            group_.addoption(o.flag, dest=dest, default=None, metavar=o.metavar,
                             help=f"{o.help} ({'' if _says_default(o) else f'default: {o.shown_default}; '}ini: {o.ini})")
        parser.addini(o.ini, help=o.help, type={"bool": "bool", "list": "linelist"}.get(o.kind, "string"),
                      default=None if o.kind != "list" else [])


def resolve(getoption: Callable[[str], Any], getini: Callable[[str], Any], rootdir: Path,
            pyproject: dict[str, Any] | None = None) -> Settings:
    """Command line over ini over ``[tool.tf2cntk]`` over default. ValueError names the bad option."""
    tool = tool_table(pyproject)
    values: dict[str, Any] = {}
    for o in PYTEST_OPTIONS:
        cli = getoption(f"tf2cntk_{o.name}")
        try:
            ini = getini(o.ini)
        except ValueError:
            ini = None
        if ini == [] or ini == "":
            ini = None
        raw, source = next(((v, s) for v, s in ((cli, o.flag), (ini, f"ini option {o.ini}"),
                                                (tool.get(o.key), tool_source(o.key, tool)))
                            if v is not None), (None, ""))
        try:
            values[o.name] = o.parse(raw)
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from None
        if o.name == "models":  # ini and pyproject paths are relative to the rootdir
            base = Path(os.getcwd()) if cli else rootdir
            values["models"] = tuple(Path(m) if Path(m).is_absolute() else base / m for m in values["models"])
    values["devices"] = parse_devices(values["devices"], "--tf2cntk-devices")
    if values["report"]:
        values["report"] = Path(values["report"])
    values["history"] = history_path(rootdir, values["history"])
    values.update(project_tables(tool))
    return Settings(**values)


def history_path(rootdir: Path, value: str | Path | None) -> Path:
    path = Path(value) if value else Path(".tf2cntk") / "history.sqlite"
    return path if path.is_absolute() else rootdir / path


# ---------------------------------------------------------------------------------------------
# pyproject.toml


def find_rootdir(start: str | Path | None = None) -> Path:
    """The rootdir pytest would pick when run from ``start`` without arguments, so the command
    reads the same ``[tool.tf2cntk]`` and names models as pytest does: the nearest directory with
    a pytest configuration file, else the nearest pyproject.toml, else the nearest setup.py, else
    ``start`` (pytest's ``determine_setup``)."""
    here = Path(start or Path.cwd()).resolve()
    dirs = (here, *here.parents)
    for d in dirs:
        if any(_holds_pytest_config(d / name) for name in PYTEST_CONFIGS):
            return d
    for marker in ("pyproject.toml", "setup.py"):
        found = next((d for d in dirs if (d / marker).is_file()), None)
        if found is not None:
            return found
    return here


def _holds_pytest_config(path: Path) -> bool:
    import configparser

    if not path.is_file():
        return False
    if path.name in ("pytest.ini", ".pytest.ini", "pytest.toml", ".pytest.toml"):
        return True  # even empty: the file itself marks the rootdir
    try:
        if path.suffix == ".toml":
            import tomllib

            with open(path, "rb") as fh:
                return "pytest" in tomllib.load(fh).get("tool", {})
        parser = configparser.ConfigParser(interpolation=None)
        parser.read(path, encoding="utf-8")
        return parser.has_section("pytest" if path.name == "tox.ini" else "tool:pytest")
    except (OSError, ValueError, configparser.Error):
        return False  # pytest will say what is wrong with it


def read_pyproject(rootdir: Path) -> dict[str, Any]:
    """The parsed pyproject.toml of ``rootdir`` ({} without one); ValueError for broken TOML."""
    import tomllib

    path = rootdir / "pyproject.toml"
    if not path.is_file():
        return {}
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path} is not valid TOML: {exc}") from None


def ignored_pyprojects(start: str | Path, rootdir: Path) -> list[Path]:
    """pyproject.toml files with a ``[tool.tf2cntk]`` table between ``start`` and the filesystem
    root, other than the rootdir's: they are not read, and a user who wrote one should be told."""
    import tomllib

    own = (Path(rootdir) / "pyproject.toml").resolve()
    here = Path(start).resolve()
    found = []
    for d in (here, *here.parents):
        path = d / "pyproject.toml"
        if path.resolve() == own or not path.is_file():
            continue
        try:
            with open(path, "rb") as fh:
                table = tomllib.load(fh).get("tool", {}).get("tf2cntk")
        except (OSError, tomllib.TOMLDecodeError):
            continue  # not ours to judge: it is not read
        if table:
            found.append(path)
    return found


def ignored_note(path: Path, rootdir: Path) -> str:
    return (f"{path} has a [tool.tf2cntk] table that is ignored: pytest-tf2cntk and tf2cntk read "
            f"[tool.tf2cntk] only from the pyproject.toml of the rootdir, {rootdir}. Move the table "
            f"into {Path(rootdir) / 'pyproject.toml'}, or make {path.parent} the rootdir "
            f"(pytest --rootdir={path.parent}, or run from there)")


def tool_table(pyproject: Mapping[str, Any] | None) -> dict[str, Any]:
    """``[tool.tf2cntk]``, its keys checked against the option table."""
    tool = dict((pyproject or {}).get("tool", {}).get("tf2cntk", {}) or {})
    unknown = sorted(k for k in tool if k not in BY_KEY and k not in TABLES)
    if unknown:
        known = ", ".join(sorted(list(BY_KEY) + list(TABLES)))
        raise ValueError(f"[tool.tf2cntk] has unknown key(s) {', '.join(unknown)} (known: {known})")
    return tool


def tool_source(name: str, tool: Mapping[str, Any]) -> str:
    """How an error names a key of ``[tool.tf2cntk]``: a table as ``[tool.tf2cntk.NAME]``."""
    return f"[tool.tf2cntk.{name}]" if isinstance(tool.get(name), Mapping) else f"[tool.tf2cntk] {name}"


def project_tables(tool: Mapping[str, Any]) -> dict[str, Any]:
    """``budgets`` and ``inputs`` from ``[tool.tf2cntk]``, validated."""
    return {"budgets": parse_budget_table(tool.get("budgets", {})),
            "inputs": parse_input_ranges(tool.get("inputs", {}), "[tool.tf2cntk.inputs]")}


# ---------------------------------------------------------------------------------------------
# the tf2cntk command: the same options as --NAME, by group


def cli_text(text: str) -> str:
    """A core message as the tf2cntk command shows it: each pytest flag (--tf2cntk-batch) becomes
    the command's own (--batch). The core names pytest's flags; the CLI translates on output, so a
    message stored in the conversion cache reads right in both front ends."""
    import re

    flags = {o.flag: o.cli_flag for o in PYTEST_OPTIONS if o.group != PLUGIN}  # PLUGIN: pytest's alone
    return re.sub(r"--tf2cntk-[a-z0-9-]+", lambda m: flags.get(m.group(0), m.group(0)), text)


def selected(*picks: str, skip: tuple[str, ...] = ()) -> list[Option]:
    """The options of the groups or names in ``picks`` (e.g. ``CONVERSION, "edge_values"``)."""
    return [o for o in OPTIONS if (o.group in picks or o.name in picks) and o.name not in skip]


def add_arguments(parser: argparse.ArgumentParser, *picks: str, skip: tuple[str, ...] = ()) -> None:
    """Add options to a command's parser (``--batch``, ``--max-examples``, ...), by group or name.
    Defaults stay None here so ``from_args`` can tell "not given" from the default."""
    for o in selected(*picks, skip=skip):
        if o.kind == "bool":
            parser.add_argument(o.cli_flag, dest=o.name, action="store_true", default=None, help=o.help)
        elif o.kind == "list":  # repeatable: each value checked as given, the list by from_args/given
            parser.add_argument(o.cli_flag, dest=o.name, action="append", default=None, metavar=o.metavar,
                                type=_itemtype(o), help=o.help)
        else:
            parser.add_argument(o.cli_flag, dest=o.name, default=None, metavar=o.metavar, type=_argtype(o),
                                help=o.help if _says_default(o) else f"{o.help} (default: {o.shown_default})")


def _says_default(o: Option) -> bool:
    """The help names the default itself: appending "(default: None)" would contradict it."""
    return "default" in o.help


def _argtype(o: Option) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return o.parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    parse.__name__ = o.kind  # argparse names the type in its error message
    return parse


def _itemtype(o: Option) -> Callable[[str], Any]:
    def check(text: str) -> str:
        try:
            o.parse([text])
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return text
    check.__name__ = o.metavar or "value"
    return check


def _given_value(o: Option, value: Any) -> Any:
    """A command-line value; a repeatable option's list parsed as a whole (e.g. one input given twice)."""
    if o.kind != "list" or value is None:
        return value
    try:
        return o.parse(value)
    except ValueError as exc:
        raise ValueError(f"{o.cli_flag}: {exc}") from None


def given(args: argparse.Namespace, *picks: str) -> dict[str, Any]:
    """The options of ``picks`` that the command line set."""
    return {o.name: _given_value(o, getattr(args, o.name)) for o in selected(*picks)
            if getattr(args, o.name, None) is not None}


def from_args(args: argparse.Namespace, *picks: str, tool: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Values for a command: its arguments over ``[tool.tf2cntk]`` over the defaults."""
    out = {}
    for o in selected(*picks):
        value = _given_value(o, getattr(args, o.name, None))
        if value is None:
            try:
                value = o.parse((tool or {}).get(o.key))
            except ValueError as exc:
                raise ValueError(f"{tool_source(o.key, tool or {})}: {exc}") from None
        out[o.name] = value
    return out
