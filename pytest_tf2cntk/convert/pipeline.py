"""TF model -> validated, CNTK-ready ONNX: load, convert (tf2onnx), passes, validation, cache."""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import onnx

from pytest_tf2cntk.convert.cache import ConversionCache
from pytest_tf2cntk.errors import ConversionError, ModelLoadError, ValidationError
from pytest_tf2cntk.convert.tf_model import TensorInfo, TFModel, load_tf_model
from pytest_tf2cntk.convert.validation import Problem

DEFAULT_OPSET = 9
DEFAULT_BATCH = 1
CNTK_IR_VERSION = 4


@dataclass
class Conversion:
    """The result of converting one model: where the CNTK-ready ONNX is and how it was made."""

    source: Path
    onnx_path: Path
    batch: int
    opset: int
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    ops: dict[str, int]
    passes: list[dict[str, Any]]
    warnings: list[dict[str, Any]]
    from_cache: bool
    seconds: float
    key: str
    signature: str | None = None
    unsafe_load: bool = False
    _onnx: onnx.ModelProto | None = field(default=None, repr=False)
    _tf: TFModel | None = field(default=None, repr=False)

    @property
    def onnx_model(self) -> onnx.ModelProto:
        if self._onnx is None:
            self._onnx = onnx.load(str(self.onnx_path))
        return self._onnx

    @property
    def tf_model(self) -> TFModel:
        """Loaded on first use: a cache hit never pays for importing TensorFlow."""
        if self._tf is None:
            self._tf = load_tf_model(self.source, self.signature, self.unsafe_load)
        return self._tf

    def report(self) -> str:
        lines = [f"model     {self.source}",
                 f"onnx      {self.onnx_path} (opset {self.opset}, batch {self.batch}"
                 f"{', from cache' if self.from_cache else ''}, {self.seconds:.2f} s)",
                 "inputs    " + ", ".join(f"{i.name} {i.dtype}{list(i.with_batch(self.batch))}"
                                          for i in self.inputs),
                 "outputs   " + ", ".join(f"{o.name}" for o in self.outputs),
                 "ops       " + ", ".join(f"{k} x{v}" for k, v in self.ops.items()),
                 "passes    " + (", ".join(f"{p['name']} ({p['changed']})" for p in self.passes)
                                 or "none needed")]
        for w in self.warnings:
            lines.append(f"warning   {Problem(**w)}")
        return "\n".join(lines)


def pipeline_fingerprint() -> str:
    """Hash of the code that shapes a conversion, so editing a pass or a rule invalidates the cache."""
    import hashlib

    here = Path(__file__).parent
    h = hashlib.sha256()
    for path in sorted(here.glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


class _LogCapture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname}: {record.getMessage()}")


def tf_to_onnx(model: TFModel, batch: int, opset: int, free_batch: bool = False) -> onnx.ModelProto:
    """tf2onnx at a fixed batch; its log becomes part of the error when it fails.

    With ``free_batch`` the graph is converted with a free batch dimension which is then fixed
    in the ONNX graph (the passes fold the shape arithmetic that leaves behind).
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tf2onnx

    fn, specs = model.tf_function(None if free_batch else batch)
    logger = logging.getLogger("tf2onnx")
    capture = _LogCapture()
    old_level, old_propagate = logger.level, logger.propagate
    logger.addHandler(capture)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # keep tf2onnx's chatter off the user's terminal
    try:
        proto, _ = tf2onnx.convert.from_function(fn, input_signature=specs, opset=opset)
    except Exception as exc:
        relevant = [ln for ln in capture.lines if "ERROR" in ln or "nsupported" in ln][-10:]
        log = ("\n  tf2onnx log:\n    " + "\n    ".join(relevant)) if relevant else ""
        raise ConversionError(f"tf2onnx could not convert {model.path} at opset {opset}: "
                              f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}"
                              f"{log}", hint="ops unsupported at this opset need another opset or a "
                                             "replacement layer; CNTK needs opset <= 9") from None
    finally:
        logger.removeHandler(capture)
        logger.setLevel(old_level)
        logger.propagate = old_propagate
    # tf2onnx names outputs after TF tensors ("Identity:0"); use the model's output names.
    from pytest_tf2cntk.convert.onnx_graph import rename_tensor

    for out, info in zip(list(proto.graph.output), model.outputs):
        if out.name != info.name:
            rename_tensor(proto, out.name, info.name)
    for inp in proto.graph.input:
        if inp.name.endswith(":0"):
            rename_tensor(proto, inp.name, inp.name[:-2])
    if free_batch:
        for inp in proto.graph.input:
            dims = inp.type.tensor_type.shape.dim
            if dims and not dims[0].HasField("dim_value"):
                dims[0].Clear()
                dims[0].dim_value = batch
    if opset <= 9:
        proto.ir_version = min(proto.ir_version, CNTK_IR_VERSION)
    return proto


CONTROL_FLOW = {"Loop", "Scan", "If"}


def _has_control_flow(proto: onnx.ModelProto) -> bool:
    return any(n.op_type in CONTROL_FLOW for n in proto.graph.node)


def convert(path: str | os.PathLike, *, batch: int = DEFAULT_BATCH, opset: int = DEFAULT_OPSET,
            signature: str | None = None, unsafe_load: bool = False,
            cache_dir: str | os.PathLike | None = None, use_cache: bool = True,
            apply_passes: bool = True, progress: Callable[[str], None] | None = None) -> Conversion:
    """Convert one model for CNTK. Raises ModelLoadError, ConversionError or ValidationError."""
    from pytest_tf2cntk.convert.passes import run_passes
    from pytest_tf2cntk.convert.tf_model import detect_kind
    from pytest_tf2cntk.convert.validation import validate

    say = progress or (lambda _msg: None)
    source = Path(path)
    detect_kind(source)  # bad paths fail here, before any hashing or TF import
    if batch < 1:
        raise ModelLoadError(f"Batch size must be >= 1 (got {batch}).")
    cache = ConversionCache(Path(cache_dir) if cache_dir else None)
    options = {"batch": batch, "opset": opset, "signature": signature, "passes": apply_passes,
               "unsafe_load": unsafe_load}
    key = cache.key(source, options, pipeline_fingerprint())
    started = time.perf_counter()

    def from_entry(onnx_path: Path, meta: dict[str, Any], hit: bool) -> Conversion:
        if meta.get("error"):
            err = meta["error"]
            cls = {"ValidationError": ValidationError, "ConversionError": ConversionError,
                   "ModelLoadError": ModelLoadError}.get(err["type"], ConversionError)
            exc = cls(err["message"], hint=err.get("hint"))
            if isinstance(exc, ValidationError):
                exc.problems = [Problem(**p) for p in err.get("problems", [])]
            raise exc
        return Conversion(source, onnx_path, batch, opset,
                          [TensorInfo.from_json(i) for i in meta["inputs"]],
                          [TensorInfo.from_json(o) for o in meta["outputs"]], meta["ops"],
                          meta["passes"], meta["warnings"], hit, time.perf_counter() - started, key,
                          signature, unsafe_load)

    if use_cache:
        hit = cache.get(key)
        if hit:
            return from_entry(*hit, hit=True)
    with cache.lock(key):
        if use_cache:  # another process may have finished it while we waited
            hit = cache.get(key)
            if hit:
                return from_entry(*hit, hit=True)
        say(f"converting {source} (batch {batch}, opset {opset}) ...")
        tf_model = load_tf_model(source, signature, unsafe_load)
        meta: dict[str, Any] = {"source": str(source), "options": options,
                                "inputs": [i.to_json() for i in tf_model.inputs],
                                "outputs": [o.to_json() for o in tf_model.outputs]}
        try:
            proto = tf_to_onnx(tf_model, batch, opset)
            records: list = []
            if _has_control_flow(proto):
                # Keras 3 LSTM becomes a Loop at batch 1 but an ONNX LSTM with a free batch:
                # convert free, fix the batch in ONNX, and keep it if the Loop is gone.
                free = tf_to_onnx(tf_model, batch, opset, free_batch=True)
                if not _has_control_flow(free):
                    from pytest_tf2cntk.convert.passes import PassRecord

                    proto = free
                    records.append(PassRecord("free_batch_conversion", 1,
                                              "tf2onnx emitted Loop at a fixed batch; converted with "
                                              "a free batch, then fixed it"))
            if apply_passes:
                say("applying CNTK compatibility passes ...")
                proto, applied = run_passes(proto)
                records += applied
            warnings = validate(proto, str(source))
        except (ConversionError, ValidationError) as exc:
            meta["error"] = {"type": type(exc).__name__, "message": exc.message, "hint": exc.hint,
                             "problems": [p.to_json() for p in getattr(exc, "problems", [])]}
            if use_cache:
                cache.put(key, None, meta)
            raise
        from pytest_tf2cntk.convert.onnx_graph import node_names_by_op

        meta.update(ops=node_names_by_op(proto), passes=[r.to_json() for r in records],
                    warnings=[w.to_json() for w in warnings])
        data = proto.SerializeToString()
        if use_cache:
            onnx_path = cache.put(key, data, meta)
        else:
            onnx_path = cache.root / "uncached" / f"{key}.onnx"
            onnx_path.parent.mkdir(parents=True, exist_ok=True)
            onnx_path.write_bytes(data)
    result = from_entry(onnx_path, meta, hit=False)
    result._onnx, result._tf = proto, tf_model
    return result


