"""Loading the TensorFlow side: SavedModel directories, `.keras` archives and legacy `.h5` files.

Every way a path can be unusable is checked here before TensorFlow sees it, so the user gets one
paragraph naming the problem instead of a traceback from deep inside Keras.
"""
from __future__ import annotations

import json
import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from pytest_tf2cntk.codec import Jsonable
from pytest_tf2cntk.errors import ModelLoadError
from pytest_tf2cntk.tf_import import tensorflow

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
DEFAULT_SIGNATURE = "serving_default"
UNSAFE_HINT = "pass --tf2cntk-unsafe-load (API: unsafe_load=True) if you trust this file"
IMPORT_OPTION = '--tf2cntk-import (pyproject: [tool.tf2cntk] import = ["MODULE"])'  # the CLI shows --import
# Keras 3's and the legacy (h5) loader's words for a class no imported module registered
UNKNOWN_CLASS = re.compile(r"Could not locate (class|function) '([^']+)'|Unknown (\w+): '([^']+)'")


@dataclass(frozen=True)
class ModelTensor(Jsonable):
    """One input or output of the TensorFlow model. ``shape[0]`` is the batch (None = free)."""

    name: str
    dtype: str  # numpy dtype name, e.g. "float32"
    shape: tuple[int | None, ...]

    def with_batch(self, batch: int) -> tuple[int, ...]:
        dims = list(self.shape)
        if dims and dims[0] is None:
            dims[0] = batch
        if any(d is None for d in dims):
            example = "x".join(str(d or 64) for d in self.shape[1:])
            listed = ", ".join(str(d or 64) for d in self.shape[1:])
            raise ModelLoadError(
                f"Input '{self.name}' has free dimensions besides the batch ({_dims(self.shape)}, batch "
                "first); parity tests need static shapes.",
                hint=f"set them for the test with --tf2cntk-input-shape={self.name}:{example} (pyproject: "
                     f"[tool.tf2cntk.input_shapes] {self.name} = [{listed}]), "
                     "or give the model a fixed input shape (keras.Input(shape=...))")
        return tuple(int(d) for d in dims)  # type: ignore[arg-type]


def _dims(shape: tuple[int | None, ...]) -> str:
    return "[" + ", ".join("None" if d is None else str(d) for d in shape) + "]"


SHAPE_OPTION = "--tf2cntk-input-shape / [tool.tf2cntk.input_shapes]"  # the CLI shows its own flag (cli_text)


def fix_input_shapes(inputs: list[ModelTensor], shapes: tuple[tuple[str, tuple[int, ...]], ...],
                     path: Path) -> list[ModelTensor]:
    """The inputs with the configured shapes (batch axis excluded) in place of their free axes;
    ModelLoadError for a name the model lacks, a wrong rank or a contradicted fixed axis."""
    by_name = {i.name: i for i in inputs}
    known = ", ".join(f"{i.name} {_dims(i.shape)}" for i in inputs) or "none"
    fixed = dict(shapes)
    for name, dims in shapes:
        spec = f"{name}:{'x'.join(map(str, dims))}"
        t = by_name.get(name)
        if t is None:
            raise ModelLoadError(f"The input shape {spec} ({SHAPE_OPTION}) names an input {path} does not "
                                 f"have; its inputs are: {known}.", hint="name one of those inputs")
        if len(dims) != len(t.shape) - 1:
            raise ModelLoadError(
                f"The input shape {spec} ({SHAPE_OPTION}) gives {len(dims)} dimension(s), but input '{name}' "
                f"of {path} has {len(t.shape) - 1} besides the batch: {_dims(t.shape)}, batch first.",
                hint=f"give all {len(t.shape) - 1} dimensions after the batch, the fixed ones as they are")
        clash = [(k + 1, d, m) for k, (d, m) in enumerate(zip(dims, t.shape[1:])) if m is not None and d != m]
        if clash:
            axis, d, m = clash[0]
            raise ModelLoadError(
                f"The input shape {spec} ({SHAPE_OPTION}) contradicts input '{name}' of {path}: its axis {axis} "
                f"is fixed at {m}, not {d} (shape {_dims(t.shape)}, batch first).",
                hint="keep the model's fixed dimensions and choose only the free (None) ones")
    return [ModelTensor(i.name, i.dtype, (i.shape[0],) + tuple(fixed[i.name])) if i.name in fixed else i
            for i in inputs]



@dataclass
class TFModel:
    """A loaded model, its signature, and a callable that runs it on named numpy inputs."""

    path: Path
    kind: str  # "savedmodel" | "keras" | "h5"
    inputs: list[ModelTensor]
    outputs: list[ModelTensor]
    obj: Any = field(repr=False)  # keras.Model or the SavedModel signature function
    _compiled: dict[tuple, Callable] = field(default_factory=dict, repr=False)
    # TF name scope -> Keras layer whose call ran in it, of the latest ``trace_for_conversion``
    layer_scopes: dict[str, str] = field(default_factory=dict, repr=False)

    def run(self, feeds: dict[str, np.ndarray], device: str = "cpu") -> dict[str, np.ndarray]:
        """Inference (training=False) on ``device`` ('cpu', 'gpu', 'gpu:N')."""
        tf = tensorflow()

        key = (device,) + tuple((i.name, feeds[i.name].shape) for i in self.inputs)
        fn = self._compiled.get(key)
        if fn is None:
            fn = self._trace(key, device)
            self._compiled[key] = fn
        with tf.device(tf_device_name(device)):
            result = fn(*[tf.constant(feeds[i.name]) for i in self.inputs])
        return {name: np.asarray(value) for name, value in zip([o.name for o in self.outputs], result)}

    def _trace(self, key: tuple, device: str) -> Callable:
        tf = tensorflow()

        specs = [tf.TensorSpec(shape, tf.as_dtype(i.dtype), name=i.name)
                 for i, (_, shape) in zip(self.inputs, key[1:])]
        names = [o.name for o in self.outputs]
        if self.kind == "savedmodel":
            sig = self.obj

            def call(*args: Any) -> list:
                out = sig(**{i.name: a for i, a in zip(self.inputs, args)})
                return [out[n] for n in names]
        else:
            model = self.obj

            def call(*args: Any) -> list:
                out = model(list(args) if len(args) > 1 else args[0], training=False)
                if isinstance(out, dict):
                    return [out[n] for n in names]
                return list(out) if isinstance(out, (list, tuple)) else [out]
        return tf.function(call, input_signature=specs, autograph=False)

    def tf_function(self, batch: int | None) -> tuple[Callable, list]:
        """A tf.function and its signature for tf2onnx.convert.from_function; batch None = free."""
        tf = tensorflow()

        shapes = [i.with_batch(batch) if batch else (None,) + i.with_batch(1)[1:] for i in self.inputs]
        key = ("cpu",) + tuple((i.name, s) for i, s in zip(self.inputs, shapes))
        fn = self._trace(key, "cpu")
        specs = [tf.TensorSpec(s, tf.as_dtype(i.dtype), name=i.name) for i, s in zip(self.inputs, shapes)]
        return fn, specs

    def trace_for_conversion(self, fn: Callable, specs: list) -> None:
        """Trace ``fn`` now (tf2onnx then reuses this trace), noting in ``layer_scopes`` the TF name
        scope each Keras layer's call ran in. The scope names alone cannot say it: Keras opens a
        layer's scope to build it and again to call it, so TF uniquifies the second ("dense" runs
        in ".../dense_1", "dense_1" in ".../dense_1_2")."""
        scopes: dict[str, str] = {}
        patched: list[tuple[Any, str, Any]] = []
        if self.kind != "savedmodel":
            for layer in _model_layers(self.obj):
                for attr in ("call", "quantized_call"):  # a quantized layer runs quantized_call
                    method = getattr(layer, attr, None)
                    if callable(method):
                        patched.append((layer, attr, vars(layer).get(attr)))
                        # past Keras' attribute tracking: this is undone right after the trace
                        object.__setattr__(layer, attr, _noting_scope(method, layer.name, scopes))
        try:
            fn.get_concrete_function(*specs)
        finally:
            for layer, attr, before in patched:
                if before is None:
                    object.__delattr__(layer, attr)
                else:
                    object.__setattr__(layer, attr, before)
        self.layer_scopes = scopes


def _model_layers(model: Any) -> Iterator[Any]:
    """A Keras model, its layers and those of the models nested in it (not a layer's own
    sublayers: a user looks for the layers of model.summary())."""
    import keras

    yield model
    for layer in getattr(model, "layers", None) or []:
        if isinstance(layer, keras.Model):
            yield from _model_layers(layer)
        else:
            yield layer


def _noting_scope(method: Callable, name: str, scopes: dict[str, str]) -> Callable:
    import functools

    tf = tensorflow()

    @functools.wraps(method)
    def call(*args: Any, **kwargs: Any) -> Any:
        scopes.setdefault(tf.compat.v1.get_default_graph().get_name_scope(), name)
        return method(*args, **kwargs)
    return call


def tf_device_name(device: str) -> str:
    kind, _, index = device.partition(":")
    return f"/{'GPU' if kind == 'gpu' else 'CPU'}:{index or 0}"


# ---------------------------------------------------------------------------------------------


def detect_kind(path: Path) -> str:
    """'savedmodel' | 'keras' | 'h5', or a ModelLoadError saying exactly what is wrong."""
    if not path.exists():
        raise ModelLoadError(f"Model path {path} does not exist.",
                             hint="check the path (relative paths are resolved from the rootdir "
                                  "for the ini option, from the current directory otherwise)")
    if path.is_dir():
        if (path / "saved_model.pb").is_file() or (path / "saved_model.pbtxt").is_file():
            return "savedmodel"
        entries = [p.name for p in path.iterdir()]
        if not entries:
            raise ModelLoadError(f"Model directory {path} is empty.",
                                 hint="point at a SavedModel directory, a .keras file or an .h5 file")
        raise ModelLoadError(
            f"Directory {path} is not a TensorFlow SavedModel: it has no saved_model.pb "
            f"(found: {', '.join(sorted(entries)[:5])}{', ...' if len(entries) > 5 else ''}).",
            hint="export with model.export(dir) or tf.saved_model.save(obj, dir)")
    if not path.is_file():  # reading a FIFO would wait for a writer forever
        raise ModelLoadError(f"Model path {path} is not a regular file or directory (a FIFO, socket or "
                             "device), so it cannot be a model.",
                             hint="point at a SavedModel directory, a .keras file or an .h5 file")
    suffix = path.suffix.lower()
    if suffix == ".keras":
        if not zipfile.is_zipfile(path):
            raise ModelLoadError(f"{path} is not a valid .keras archive (not a zip file, or truncated).",
                                 hint="re-save the model with model.save('model.keras')")
        return "keras"
    if suffix in (".h5", ".hdf5"):
        with open(path, "rb") as fh:
            if fh.read(8) != HDF5_MAGIC:
                raise ModelLoadError(f"{path} is not an HDF5 file (bad signature bytes).",
                                     hint="re-save the model with model.save('model.h5') or use .keras")
        return "h5"
    if path.name == "saved_model.pb":
        return detect_kind(path.parent)
    raise ModelLoadError(f"Don't know how to load {path}: expected a SavedModel directory, a "
                         ".keras file or an .h5 file.")


def _walk_configs(node: Any) -> Iterator[dict]:
    if isinstance(node, dict):
        if "class_name" in node and isinstance(node.get("config"), dict):
            yield node
        for value in node.values():
            yield from _walk_configs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk_configs(value)


def _keras_config(path: Path, kind: str) -> Any:
    try:
        if kind == "keras":
            with zipfile.ZipFile(path) as zf:
                return json.loads(zf.read("config.json"))
        import h5py

        with h5py.File(path, "r") as f:
            raw = f.attrs.get("model_config")
            return json.loads(raw) if raw is not None else None
    except Exception:  # the loader itself will explain a broken file
        return None


def unsafe_layers(path: Path, kind: str) -> list[str]:
    """Names of layers that need unsafe deserialization (Python lambdas)."""
    return [f"{c['config'].get('name', '?')} ({c['class_name']})"
            for c in _walk_configs(_keras_config(path, kind)) if c["class_name"] == "Lambda"]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def load_tf_model(path: str | os.PathLike, signature: str | None = None, unsafe_load: bool = False,
                  input_shapes: tuple[tuple[str, tuple[int, ...]], ...] = (), imports: tuple[str, ...] = ()) -> TFModel:
    """The model; ``input_shapes``: (name, dims without the batch) fixing free input dimensions;
    ``imports``: modules imported first (those registering the model's custom Keras layers)."""
    model = _load_tf_model(Path(path), signature, unsafe_load, tuple(imports))
    if input_shapes:
        model.inputs = fix_input_shapes(model.inputs, tuple(input_shapes), model.path)
    return model


def _load_tf_model(path: Path, signature: str | None, unsafe_load: bool, imports: tuple[str, ...]) -> TFModel:
    kind = detect_kind(path)
    if path.name == "saved_model.pb":
        path = path.parent
    tensorflow()  # quietly, before anything else imports it
    import logging

    # TF warns about "retracing" when many models are traced in one process: that is our design
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    import_modules(imports)  # here, so every process that loads the model has them (xdist workers too)
    if kind == "savedmodel":
        return _load_savedmodel(path, signature or DEFAULT_SIGNATURE)
    return _load_keras(path, kind, unsafe_load, imports)


def import_modules(names: tuple[str, ...]) -> None:
    """Import the user's modules: custom Keras layers register themselves when their module runs.
    Python imports each once per process; a failure is one paragraph naming the module."""
    import importlib

    for name in names:
        try:
            importlib.import_module(name)
        except Exception as exc:  # not found, or its own code failed
            missing = isinstance(exc, ModuleNotFoundError) and exc.name and name.startswith(exc.name)
            raise ModelLoadError(
                f"The module {name!r} named by {IMPORT_OPTION} could not be imported "
                f"({type(exc).__name__}: {_first_line(exc)}), so the model is not loaded.",
                hint="install it, or put the directory that holds it on the import path (PYTHONPATH=DIR; "
                     "pytest: the pythonpath ini option)" if missing else
                     f"fix the module: python -c 'import {name}' shows its traceback") from None


def _unknown_class(path: Path, kind: str, exc: BaseException, imports: tuple[str, ...]) -> ModelLoadError | None:
    """The load error for a custom class no imported module registered, naming the class and, from
    the model's config, the module it was saved from; None for another failure."""
    found = UNKNOWN_CLASS.search(str(exc))
    if found is None:
        return None
    what, name = (found.group(1), found.group(2)) if found.group(2) else (found.group(3), found.group(4))
    short = name.split(">")[-1]  # registered names read "package>Class"
    modules = [c.get("module") for c in _walk_configs(_keras_config(path, kind))
               if c["class_name"] == short and c.get("module")]
    module = modules[0] if modules else "MODULE"
    tried = f" (imported: {', '.join(imports)})" if imports else ""
    return ModelLoadError(
        f"{path} uses the custom {what} '{name}', which Keras does not know: the module that defines and "
        f"registers it (@keras.saving.register_keras_serializable()) has not been imported{tried}.",
        hint=f"import it before the model loads: --tf2cntk-import={module} "
             f'(pyproject: [tool.tf2cntk] import = ["{module}"])')


def _load_keras(path: Path, kind: str, unsafe_load: bool, imports: tuple[str, ...] = ()) -> TFModel:
    import keras

    lambdas = unsafe_layers(path, kind)
    if lambdas and not unsafe_load:
        raise ModelLoadError(
            f"{path} contains layers that need unsafe deserialization (they run arbitrary Python): "
            f"{', '.join(lambdas)}. Keras loads with safe_mode=True by default.", hint=UNSAFE_HINT)
    try:
        model = keras.models.load_model(path, compile=False, safe_mode=not unsafe_load)
    except Exception as exc:
        if "safe_mode" in str(exc):
            raise ModelLoadError(f"{path} needs unsafe deserialization: {_first_line(exc)}",
                                 hint=UNSAFE_HINT) from None
        unknown = _unknown_class(path, kind, exc, imports)
        if unknown is not None:
            raise unknown from None
        raise ModelLoadError(f"Keras could not load {path} ({kind}): {_first_line(exc)}. "
                             "The file may be truncated or written by an incompatible Keras.",
                             hint="re-save the model with the Keras version in use") from None
    inputs = []
    for t in model.inputs:
        if getattr(t, "sparse", False) or getattr(t, "ragged", False):
            raise ModelLoadError(f"Input '{t.name}' of {path} is sparse or ragged; only dense "
                                 "tensors can be compared.")
        inputs.append(_tensor_info(t.name, t.dtype, t.shape, path))
    names = list(getattr(model, "output_names", None) or [f"output_{i}" for i in range(len(model.outputs))])
    outputs = [_tensor_info(n, t.dtype, t.shape, path) for n, t in zip(names, model.outputs)]
    return TFModel(path, kind, inputs, outputs, model)


def _load_savedmodel(path: Path, signature: str) -> TFModel:
    tf = tensorflow()

    try:
        loaded = _read_savedmodel(tf, path)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"TensorFlow could not read the SavedModel in {path}: {_first_line(exc)}",
                             hint="re-export it; saved_model.pb may be corrupt") from None
    sigs = dict(getattr(loaded, "signatures", {}) or {})
    if not sigs:
        raise ModelLoadError(f"The SavedModel in {path} has no signatures, so its inputs and outputs "
                             "are unknown.",
                             hint="export with a signature: tf.saved_model.save(obj, dir, "
                                  "signatures={'serving_default': fn.get_concrete_function(spec)}) "
                                  "or keras model.export(dir)")
    if signature not in sigs:
        raise ModelLoadError(f"The SavedModel in {path} has no signature '{signature}' "
                             f"(it has: {', '.join(sorted(sigs))}).",
                             hint="choose one with --tf2cntk-signature")
    fn = sigs[signature]
    args, kwargs = fn.structured_input_signature
    if args:
        raise ModelLoadError(f"Signature '{signature}' of {path} takes positional inputs; "
                             "signatures with named inputs are required.")
    inputs = [_tensor_info(name, spec.dtype, spec.shape, path) for name, spec in sorted(kwargs.items())]
    outs = fn.structured_outputs
    outputs = [_tensor_info(name, spec.dtype, spec.shape, path) for name, spec in sorted(outs.items())]
    model = TFModel(path, "savedmodel", inputs, outputs, fn)
    model.loaded = loaded  # type: ignore[attr-defined]  # keeps variables alive
    return model


def _read_savedmodel(tf: Any, path: Path) -> Any:
    """tf.saved_model.load, through tf_keras for a Keras 2 SavedModel holding its optimizer's state:
    the loader recreates the slots with the optimizer's add_slot, which only Keras 2's classes have
    (tf_keras registers them when imported); without them the optimizer is a bare '_UserObject'."""
    try:
        return tf.saved_model.load(str(path))
    except AttributeError as exc:
        if "add_slot" not in str(exc):
            raise
        try:
            import tf_keras  # noqa: F401  # registers Keras 2's revived optimizer
        except ImportError:
            version = ".".join(tf.__version__.split(".")[:2])
            raise ModelLoadError(
                f"The SavedModel in {path} was saved by Keras 2 with its optimizer's state, which TensorFlow "
                f"{tf.__version__} can only restore with Keras 2's classes, and tf_keras is not installed "
                f"({_first_line(exc)}).",
                hint=f"pip install tf_keras=={version}.* (Keras 2 for TensorFlow {version}; it is used when "
                     "installed), or re-export the model without its optimizer") from None
        return tf.saved_model.load(str(path))


def _tensor_info(name: str, dtype: Any, shape: Any, path: Path) -> ModelTensor:
    tf = tensorflow()

    tf_dtype = tf.as_dtype(dtype)
    if tf_dtype in (tf.string, tf.variant, tf.resource) or not (
            tf_dtype.is_floating or tf_dtype.is_integer or tf_dtype.is_bool):
        raise ModelLoadError(f"Tensor '{name}' of {path} has dtype {tf_dtype.name}; only numeric and "
                             "bool tensors can be compared (preprocess strings outside the model).")
    dims = tuple(None if d is None else int(d) for d in tuple(shape))
    return ModelTensor(name.split(":")[0], tf_dtype.as_numpy_dtype.__name__
                      if tf_dtype != tf.bool else "bool", dims)
