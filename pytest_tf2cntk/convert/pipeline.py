"""TF model -> validated, CNTK-ready ONNX: load, convert (tf2onnx), passes, validation, cache."""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import onnx

from pytest_tf2cntk.codec import Jsonable
from pytest_tf2cntk.convert.cache import ConversionCache
from pytest_tf2cntk.convert.options import ConversionOptions
from pytest_tf2cntk.convert.passes import PassRecord
from pytest_tf2cntk.convert.repairs import RepairRecord
from pytest_tf2cntk.convert.tf_model import ModelTensor, TFModel, load_tf_model
from pytest_tf2cntk.convert.validation import MAX_OPSET, Problem
from pytest_tf2cntk.errors import ConversionError, ModelLoadError, ValidationError

CNTK_IR_VERSION = 4
CONTROL_FLOW = {"Loop", "Scan", "If"}
_ERRORS = {"ValidationError": ValidationError, "ConversionError": ConversionError, "ModelLoadError": ModelLoadError}


@dataclass(frozen=True)
class ConversionSummary(Jsonable):
    """What a parity result records about the conversion it checked."""

    onnx: str
    cntk_onnx: str  # the graph CNTK evaluated (another file with ``cntk_onnx=``)
    batch: int
    opset: int
    ops: dict[str, int]
    passes: list[PassRecord]
    warnings: list[Problem]
    from_cache: bool
    key: str
    repairs: list[RepairRecord] = field(default_factory=list)  # the CNTK repairs applied (convert.repairs)


@dataclass(frozen=True)
class CacheMeta(Jsonable):
    """meta.json of a cache entry: a conversion's facts, or the error it ended in."""

    source: str
    options: dict[str, Any]
    inputs: list[ModelTensor] = field(default_factory=list)
    outputs: list[ModelTensor] = field(default_factory=list)
    ops: dict[str, int] = field(default_factory=dict)
    passes: list[PassRecord] = field(default_factory=list)
    repairs: list[RepairRecord] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    error: dict[str, Any] | None = None  # type, message, hint, problems
    onnx_sha256: str | None = None
    layer_scopes: dict[str, str] = field(default_factory=dict)  # TF name scope -> Keras layer

    def raise_error(self, source: str | os.PathLike | None = None) -> None:
        """Raise the stored error, naming ``source``: the cache keys on content, so the entry may
        have been written for another file with the same bytes, whose path its text names."""
        if not self.error:
            return
        err = self.error

        def named(text: str | None) -> str | None:
            return text.replace(self.source, str(source)) if text and source is not None else text

        exc = _ERRORS.get(err["type"], ConversionError)(named(err["message"]), hint=named(err.get("hint")))
        if isinstance(exc, ValidationError):
            exc.problems = [dataclasses.replace(p, reason=named(p.reason), hint=named(p.hint))
                            for p in (Problem.from_json(j) for j in err.get("problems", []))]
        raise exc


@dataclass
class Conversion:
    """The result of converting one model: where the CNTK-ready ONNX is and how it was made."""

    source: Path
    onnx_path: Path
    options: ConversionOptions
    inputs: list[ModelTensor]
    outputs: list[ModelTensor]
    ops: dict[str, int]
    passes: list[PassRecord]
    warnings: list[Problem]
    from_cache: bool
    seconds: float
    key: str
    layer_scopes: dict[str, str] = field(default_factory=dict)  # TF name scope -> Keras layer (localization)
    repairs: list[RepairRecord] = field(default_factory=list)  # the CNTK repairs applied
    _onnx: onnx.ModelProto | None = field(default=None, repr=False)
    _tf: TFModel | None = field(default=None, repr=False)
    _twin: Any = field(default=None, repr=False)
    _graph64: dict[float, Any] = field(default_factory=dict, repr=False)  # by parameter perturbation

    @property
    def batch(self) -> int:
        return self.options.batch

    @property
    def opset(self) -> int:
        return self.options.opset

    @property
    def onnx_model(self) -> onnx.ModelProto:
        if self._onnx is None:
            self._onnx = onnx.load(str(self.onnx_path))
        return self._onnx

    @property
    def tf_model(self) -> TFModel:
        """Loaded on first use: a cache hit never pays for importing TensorFlow."""
        if self._tf is None:
            self._tf = load_tf_model(self.source, self.options.signature, self.options.unsafe_load,
                                     self.options.input_shapes, self.options.imports)
        return self._tf

    def float64_twin(self) -> Any:
        """The model's float64 twin (``convert.twin``), built on first use; a ``TwinUnavailable``
        saying why each route gave up when there is none."""
        if self._twin is None:
            from pytest_tf2cntk.convert.twin.build import build_twin

            self._twin = build_twin(self)
        return self._twin

    def float64_graph(self, perturb: float = 0.0) -> Any:
        """The converted graph itself in float64 (``convert.twin``'s ONNX route, unchecked): what
        it computes, rounding aside, to compare with the twin (a converter bug shows there).
        ``perturb``: every parameter times (1 + perturb x uniform(-1, 1)), seeded: how much
        rounding the parameters once more moves the output."""
        if perturb not in self._graph64:
            from pytest_tf2cntk.convert.twin.build import build_twin
            from pytest_tf2cntk.convert.twin.core import ROUTE_ONNX

            self._graph64[perturb] = build_twin(self, routes=(ROUTE_ONNX,), check=False, perturb=perturb)
        return self._graph64[perturb]

    def summary(self, cntk_onnx: str | os.PathLike | None = None) -> ConversionSummary:
        return ConversionSummary(str(self.onnx_path), str(cntk_onnx or self.onnx_path), self.batch, self.opset,
                                 dict(self.ops), list(self.passes), list(self.warnings), self.from_cache, self.key,
                                 list(self.repairs))

    def repairs_text(self) -> str:
        """The repairs line: "off", "none needed" or "name (nodes changed), ..."."""
        if self.options.repairs == "off":
            return "off"
        return ", ".join(f"{r.name} ({r.changed})" for r in self.repairs) or "none needed"

    def report(self) -> str:
        lines = [f"model     {self.source}",
                 f"onnx      {self.onnx_path} (opset {self.opset}, batch {self.batch}"
                 f"{', from cache' if self.from_cache else ''}, {self.seconds:.2f} s)",
                 "inputs    " + ", ".join(f"{i.name} {i.dtype}{list(i.with_batch(self.batch))}"
                                          for i in self.inputs),
                 "outputs   " + ", ".join(f"{o.name}" for o in self.outputs),
                 "ops       " + ", ".join(f"{k} x{v}" for k, v in self.ops.items()),
                 "passes    " + (", ".join(f"{p.name} ({p.changed})" for p in self.passes) or "none needed"),
                 "repairs   " + self.repairs_text()]
        lines += [f"warning   {w.describe()}" for w in self.warnings]
        return "\n".join(lines)


def pipeline_fingerprint() -> str:
    """Hash of the code that shapes a conversion, so editing a pass or a rule invalidates the cache."""
    import hashlib

    here = Path(__file__).parent
    h = hashlib.sha256()
    # the pipeline's modules and its repairs; twin/ reads a conversion, it does not shape one
    for path in sorted([*here.glob("*.py"), *(here / "repairs").glob("*.py")]):
        h.update(str(path.relative_to(here)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def tf_to_onnx(model: TFModel, batch: int, opset: int, free_batch: bool = False) -> onnx.ModelProto:
    """tf2onnx at a fixed batch; its log names the reason when it fails or leaves TF ops behind.

    With ``free_batch`` the graph is converted with a free batch dimension which is then fixed
    in the ONNX graph (the passes fold the shape arithmetic that leaves behind).
    """
    from pytest_tf2cntk.convert.tf2onnx_run import convert_traced, unconverted_error

    fn, specs = model.tf_function(None if free_batch else batch)
    try:
        model.trace_for_conversion(fn, specs)  # notes each Keras layer's TF scope, for localization
    except Exception:  # noqa: BLE001 - the same trace fails inside tf2onnx, which explains it
        pass
    proto, left = convert_traced(fn, specs, opset, model.path)
    if left:
        raise unconverted_error(model.path, opset, left)
    _use_model_names(proto, model, batch if free_batch else None)
    if opset <= 9:
        proto.ir_version = min(proto.ir_version, CNTK_IR_VERSION)
    return proto


def _use_model_names(proto: onnx.ModelProto, model: TFModel, fix_batch: int | None) -> None:
    """tf2onnx names tensors after TF's ("Identity:0"); use the model's names, fix a free batch.

    Only the model's inputs stay graph inputs: below opset 9 tf2onnx also lists every weight
    there (IR 3 style); with IR 4 an initializer is a constant, so the copy in the inputs goes.
    """
    from pytest_tf2cntk.convert.onnx_graph import rename_tensor

    for out, info in zip(list(proto.graph.output), model.outputs):
        if out.name != info.name:
            rename_tensor(proto, out.name, info.name)
    inits = {t.name for t in proto.graph.initializer}
    real = [inp for inp in proto.graph.input if inp.name not in inits]
    del proto.graph.input[:]
    proto.graph.input.extend(real)
    for inp in proto.graph.input:
        if inp.name.endswith(":0"):
            rename_tensor(proto, inp.name, inp.name[:-2])
        dims = inp.type.tensor_type.shape.dim
        if fix_batch and dims and not dims[0].HasField("dim_value"):
            dims[0].Clear()
            dims[0].dim_value = fix_batch
    expected = {i.name for i in model.inputs}
    stray = [i.name for i in proto.graph.input if i.name not in expected]
    if stray:  # a constant tf2onnx lost: feeding it would test random weights
        raise ConversionError(f"tf2onnx made {', '.join(repr(n) for n in stray)} graph input(s) of "
                              f"{model.path}, but the model's inputs are {sorted(expected)}: these are "
                              "tensors of the model whose values tf2onnx lost.",
                              hint="report it to tf2onnx with the model; the names show the layer that keeps "
                                   "these tensors, which a replacement layer avoids")


def _has_control_flow(proto: onnx.ModelProto) -> bool:
    return any(n.op_type in CONTROL_FLOW for n in proto.graph.node)


_DEFAULTS = ConversionOptions()  # from the option table


def convert(path: str | os.PathLike, *, batch: int = _DEFAULTS.batch, opset: int = _DEFAULTS.opset,
            signature: str | None = _DEFAULTS.signature, unsafe_load: bool = _DEFAULTS.unsafe_load,
            cache_dir: str | os.PathLike | None = _DEFAULTS.cache_dir, use_cache: bool = True,
            apply_passes: bool = True, progress: Callable[[str], None] | None = None,
            input_shapes: Any = _DEFAULTS.input_shapes, repairs: str | bool = _DEFAULTS.repairs,
            imports: Any = _DEFAULTS.imports) -> Conversion:
    """Convert one model for CNTK. Raises ModelLoadError, ConversionError or ValidationError.

    ``input_shapes`` fixes free input dimensions: {name: dims without the batch}, or
    "name:64x64x3" texts (as --tf2cntk-input-shape takes them). ``repairs`` ("on"/"off", or a
    bool): the CNTK repairs (``convert.repairs``), each proved in ONNX Runtime. ``imports``: modules
    to import before the model loads (those registering its custom Keras layers; --tf2cntk-import)."""
    from pytest_tf2cntk.convert.tf_model import detect_kind
    from pytest_tf2cntk.options import parse_imports, parse_input_shapes

    source = Path(path)
    detect_kind(source)  # bad paths fail here, before any hashing or TF import
    if batch < 1:
        raise ModelLoadError(f"Batch size must be >= 1 (got {batch}).")
    shapes = _parsed("input_shapes", parse_input_shapes, input_shapes)
    modules = _parsed("imports", parse_imports, imports)
    repairs = _on_off(repairs)
    options = ConversionOptions(batch, opset, signature, unsafe_load, str(cache_dir) if cache_dir else None, shapes,
                                repairs, modules)
    cache = ConversionCache(Path(cache_dir) if cache_dir else None)
    keyed = {"batch": batch, "opset": opset, "signature": signature, "passes": apply_passes,
             "unsafe_load": unsafe_load, "input_shapes": [[n, list(d)] for n, d in shapes], "repairs": repairs,
             "imports": list(modules)}  # what the user's layers compute is theirs: a new module list converts anew
    key = cache.key(source, keyed, pipeline_fingerprint())
    started = time.perf_counter()

    def from_entry(onnx_path: Path, meta: CacheMeta, hit: bool) -> Conversion:
        meta.raise_error(source)
        return Conversion(source, onnx_path, options, meta.inputs, meta.outputs, meta.ops, meta.passes,
                          meta.warnings, hit, time.perf_counter() - started, key, dict(meta.layer_scopes),
                          list(meta.repairs))

    hit = _cached(cache, key) if use_cache else None
    if hit:
        return from_entry(*hit, hit=True)
    with cache.lock(key):
        hit = _cached(cache, key) if use_cache else None  # another process may have finished it
        if hit:
            return from_entry(*hit, hit=True)
        (progress or (lambda _m: None))(f"converting {source} (batch {batch}, opset {opset}) ...")
        tf_model = load_tf_model(source, signature, unsafe_load, shapes, modules)
        if not tf_model.inputs:
            raise ModelLoadError(f"{source} takes no inputs{f' (signature {signature!r})' if signature else ''}: "
                                 "a parity test runs TensorFlow and CNTK on generated inputs, so there is "
                                 "nothing to test.", hint="test a model, or a signature "
                                 "(--tf2cntk-signature), that takes at least one input")
        proto, meta = _convert_fresh(source, tf_model, keyed, apply_passes, progress)
        onnx_path = _store(cache, key, proto, meta, use_cache)
    result = from_entry(onnx_path, meta, hit=False)
    result._onnx, result._tf = proto, tf_model
    return result


def _on_off(value: str | bool) -> str:
    """``repairs`` as "on" / "off" (the option's text, or a bool from the API)."""
    from pytest_tf2cntk.options import BY_NAME

    if isinstance(value, bool):
        return "on" if value else "off"
    try:
        return BY_NAME["repairs"].parse(value)
    except ValueError as exc:
        raise ModelLoadError(f"repairs: {exc}", hint="pass repairs='on' or 'off'") from None


def _parsed(name: str, parse: Callable[[Any], Any], raw: Any) -> Any:
    try:
        return parse(raw)
    except ValueError as exc:
        raise ModelLoadError(f"{name}: {exc}") from None


def _cached(cache: ConversionCache, key: str) -> tuple[Path, CacheMeta] | None:
    entry = cache.get(key)
    if entry is None:
        return None
    try:
        return entry[0], CacheMeta.from_json(entry[1])
    except (KeyError, TypeError, ValueError):  # an entry of an older layout: convert again
        return None


def _convert_fresh(source: Path, tf_model: TFModel, keyed: dict[str, Any], apply_passes: bool,
                   progress: Callable[[str], None] | None) -> tuple[onnx.ModelProto | None, CacheMeta]:
    """tf2onnx, the free-batch retry, the passes and validation; errors end up in the meta."""
    from pytest_tf2cntk.convert.onnx_graph import op_counts
    from pytest_tf2cntk.convert.passes import run_passes
    from pytest_tf2cntk.convert.validation import validate

    meta = CacheMeta(str(source), keyed, tf_model.inputs, tf_model.outputs)
    batch, opset = keyed["batch"], keyed["opset"]
    try:
        proto = tf_to_onnx(tf_model, batch, opset)
        scopes = tf_model.layer_scopes
        records: list[PassRecord] = []
        if _has_control_flow(proto):
            # Keras 3 LSTM becomes a Loop at batch 1 but an ONNX LSTM with a free batch:
            # convert free, fix the batch in ONNX, and keep it if the Loop is gone.
            free = tf_to_onnx(tf_model, batch, opset, free_batch=True)
            if not _has_control_flow(free):
                proto, scopes = free, tf_model.layer_scopes
                records.append(PassRecord("free_batch_conversion", 1, "tf2onnx emitted Loop at a fixed batch; "
                                          "converted with a free batch, then fixed it"))
        if apply_passes:
            if progress:
                progress("applying CNTK compatibility passes ...")
            proto, applied = run_passes(proto)
            records += applied
        repairs: list[RepairRecord] = []
        if keyed["repairs"] == "on":
            proto, repairs = _repair(proto, progress)
        warnings = validate(proto, str(source))
    except (ConversionError, ValidationError) as exc:
        if opset > MAX_OPSET:
            exc = _unless_opset_nine_fails(exc, tf_model, batch, str(source))
        error = {"type": type(exc).__name__, "message": exc.message, "hint": exc.hint,
                 "problems": [p.to_json() for p in getattr(exc, "problems", [])]}
        return None, dataclasses.replace(meta, error=error)
    return proto, dataclasses.replace(meta, ops=op_counts(proto), passes=records,
                                      repairs=repairs, warnings=list(warnings),
                                      layer_scopes=dict(scopes))


def _repair(proto: onnx.ModelProto,
            progress: Callable[[str], None] | None) -> tuple[onnx.ModelProto, list[RepairRecord]]:
    """The CNTK repairs, each proved in ORT: the graph and what ran. When none was needed the
    graph is the one given, byte for byte."""
    from pytest_tf2cntk.convert.passes import prune_unused
    from pytest_tf2cntk.convert.repairs import run_repairs

    repaired, records = run_repairs(proto)
    if not records:
        return proto, []
    if progress:
        progress("applied CNTK repairs: " + ", ".join(f"{r.name} ({r.changed})" for r in records))
    prune_unused(repaired)  # a repaired node's old inputs may now be dead
    return repaired, records


def _unless_opset_nine_fails(exc: ConversionError | ValidationError, tf_model: TFModel, batch: int,
                             source: str) -> ConversionError | ValidationError:
    """An error above opset 9 that sends the user to opset 9, unless tf2onnx cannot convert the
    model there: then it says so, rather than send them round in circles."""
    from pytest_tf2cntk.convert.tf2onnx_run import convert_traced, unconverted_hint
    from pytest_tf2cntk.convert.validation import HINT_OPSET, validation_error

    problems = list(getattr(exc, "problems", []))
    if not (f"opset {MAX_OPSET}" in (exc.hint or "") or any(p.hint == HINT_OPSET for p in problems)):
        return exc
    fn, specs = tf_model.tf_function(batch)
    try:
        left = convert_traced(fn, specs, MAX_OPSET, source)[1]
    except ConversionError:
        return exc  # it fails differently there; opset 9's own error will tell
    if not left:
        return exc
    lines = "\n".join(f"  - {u}" for u in left)
    note = (f"\nOpset {MAX_OPSET}, the highest CNTK 2.7 imports, is no way out: there tf2onnx cannot "
            f"convert {len(left)} TensorFlow op(s):\n{lines}")
    if isinstance(exc, ValidationError):
        instead = f"not opset {MAX_OPSET}: tf2onnx cannot convert the model there (see below)"
        problems = [dataclasses.replace(p, hint=instead) if p.hint == HINT_OPSET else p for p in problems]
        return validation_error(source, problems, note, hint=unconverted_hint(left))
    return ConversionError(exc.message + note, hint=unconverted_hint(left))


def _store(cache: ConversionCache, key: str, proto: onnx.ModelProto | None, meta: CacheMeta,
           use_cache: bool) -> Path:
    """Write the entry (a failed conversion is cached as its error, then raised by the caller)."""
    data = proto.SerializeToString() if proto is not None else None
    if use_cache:
        return cache.put(key, data, meta.to_json())
    onnx_path = cache.root / "uncached" / f"{key}.onnx"
    if data is not None:
        onnx_path.parent.mkdir(parents=True, exist_ok=True)
        onnx_path.write_bytes(data)
    return onnx_path
