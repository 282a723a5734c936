"""The backends of a parity check, one protocol for the engine and for localization alike.

TensorFlow in-process is the model as trained, ONNX Runtime on the converted graph is the
reference for ONNX semantics, CNTK in the worker is the target. A device a backend cannot use
raises ``DeviceUnavailable`` with the exact reason (the pytest layer turns it into a skip),
except ONNX Runtime, which is a referee: it falls back to the CPU and says so (``fallback``).
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnx

from pytest_tf2cntk.convert.tf_model import TFModel
from pytest_tf2cntk.devices import normalize_device
from pytest_tf2cntk.errors import DeviceUnavailable
from pytest_tf2cntk.tf_import import tensorflow

Feeds = dict[str, np.ndarray]


class Runner(Protocol):
    """Named inputs in, named outputs out, on one device."""

    name: str
    device: str

    def run(self, feeds: Feeds) -> Feeds: ...

    def close(self) -> None: ...


class TFRunner:
    name = "tf"

    def __init__(self, model: TFModel, device: str = "cpu", allow_tf32: bool = False) -> None:
        self.model = model
        self.device = normalize_device(device)
        if self.device.startswith("gpu"):
            _check_tf_gpu(self.device, allow_tf32)

    def run(self, feeds: Feeds) -> Feeds:
        return self.model.run(feeds, self.device)

    def close(self) -> None:
        pass


def _check_tf_gpu(device: str, allow_tf32: bool) -> None:
    tf = tensorflow()

    gpus = tf.config.list_physical_devices("GPU")
    index = int(device.split(":")[1])
    if not gpus:
        built = tf.test.is_built_with_cuda()
        raise DeviceUnavailable("no GPU visible to TensorFlow" + ("" if built else " (this TensorFlow build has "
                                                                  "no CUDA support; install tensorflow[and-cuda])"))
    if index >= len(gpus):
        raise DeviceUnavailable(f"TensorFlow sees {len(gpus)} GPU(s); gpu:{index} does not exist")
    # TF enables TF32 matmuls/convs by default on Ampere+, which costs ~1e-3 relative error
    tf.config.experimental.enable_tensor_float_32_execution(allow_tf32)


class OrtRunner:
    """ONNX Runtime with graph optimizations off (the graph as written); the one CPU fall-back rule."""

    name = "ort"

    def __init__(self, model: onnx.ModelProto | Path | bytes, device: str = "cpu") -> None:
        from pytest_tf2cntk.convert import onnxrt

        self.device = normalize_device(device)
        payload = model.SerializeToString() if isinstance(model, onnx.ModelProto) else (
            model if isinstance(model, bytes) else Path(model).read_bytes())
        self.fallback = ""  # why ONNX Runtime runs on the CPU instead of the device asked for
        try:
            self.session = onnxrt.session(payload, self.device)
        except DeviceUnavailable as exc:
            self.fallback = exc.message
            self.device = "cpu"
            self.session = onnxrt.session(payload, "cpu")
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: Feeds, outputs: list[str] | None = None) -> Feeds:
        names = outputs or self.output_names
        return dict(zip(names, self.session.run(names, feeds)))

    def close(self) -> None:
        pass


_ORT_CACHE: "OrderedDict[str, OrtRunner]" = OrderedDict()
ORT_CACHE_SIZE = 512  # one-node models of localization: the same few graphs again and again


def cached_ort(model: onnx.ModelProto, device: str) -> OrtRunner:
    """An OrtRunner per distinct graph and device, the least recently used dropped first."""
    payload = model.SerializeToString()
    key = hashlib.sha1(payload).hexdigest() + ":" + device
    runner = _ORT_CACHE.get(key)
    if runner is None:
        runner = _ORT_CACHE[key] = OrtRunner(payload, device)
        while len(_ORT_CACHE) > ORT_CACHE_SIZE:
            _ORT_CACHE.popitem(last=False)
    _ORT_CACHE.move_to_end(key)
    return runner


class CNTKRunner:
    """A model loaded in the CNTK worker; ``submit`` lets CNTK compute while the host runs others."""

    name = "cntk"

    def __init__(self, onnx_path: Path | str, device: str = "cpu", cntk_python: str | None = None,
                 worker: Any = None, output_dtypes: dict[str, str] | None = None) -> None:
        from pytest_tf2cntk.cntk.client import get_worker

        self.device = normalize_device(device)
        self.worker = worker or get_worker(cntk_python)
        if self.device.startswith("gpu"):
            devices = self.worker.ping().get("devices", [])
            if not any(d.startswith("gpu") for d in devices):
                raise DeviceUnavailable(
                    f"CNTK has no GPU build or sees no GPU (CNTK devices: {', '.join(devices) or 'none'})",
                    hint="`tf2cntk setup --gpu` installs cntk-gpu (CUDA 10 runtime bundled)")
        try:
            self.loaded = self.worker.load(str(onnx_path), device=self.device)
        except DeviceUnavailable as exc:
            raise DeviceUnavailable(f"CNTK cannot use {self.device}: {exc.message}", hint=exc.hint) from None
        self.output_dtypes = output_dtypes or {}
        # CNTK computes integer and bool inputs as float: feed them in the dtype it declares
        self.input_dtypes = {i.name: np.dtype(i.dtype) for i in self.loaded.inputs}

    def feeds(self, feeds: Feeds) -> Feeds:
        return {k: v if k not in self.input_dtypes or v.dtype == self.input_dtypes[k]
                else v.astype(self.input_dtypes[k]) for k, v in feeds.items() if k in self.input_dtypes}

    def submit(self, feeds: Feeds) -> Any:
        """Start an eval in the worker and return at once (the host runs TF meanwhile)."""
        return self.worker.eval_async(self.loaded, self.feeds(feeds))

    def result(self, pending: Any) -> Feeds:
        """The outputs of a ``submit``, in the dtypes the graph declares."""
        return {name: self._restore_dtype(name, value) for name, value in pending.result().items()}

    def run(self, feeds: Feeds, outputs: list[str] | None = None) -> Feeds:
        """The graph's outputs, or the named intermediate tensors / CNTK uids ``outputs``."""
        if outputs is not None:
            return self.worker.eval(self.loaded, self.feeds(feeds), outputs=outputs)
        return self.result(self.submit(feeds))

    def nodes(self) -> list:
        return self.worker.nodes(self.loaded)

    def _restore_dtype(self, name: str, value: np.ndarray) -> np.ndarray:
        """CNTK computes integer and bool tensors as float; give back the declared type when the
        values are exactly representable (anything else stays float and fails the dtype check)."""
        want = self.output_dtypes.get(name)
        if not want or value.dtype == np.dtype(want):
            return value
        target = np.dtype(want)
        if target.kind in "iub" and np.all(np.isfinite(value)) and np.array_equal(value, np.round(value)):
            return value.astype(target)
        return value

    def close(self) -> None:
        try:
            self.worker.unload(self.loaded)
        except Exception:
            pass  # a dead worker has nothing to unload


def check_cntk_runs(conversion: Any, device: str = "cpu", worker: Any = None, cntk_python: str | None = None) -> Any:
    """Load the converted graph in CNTK and run it once on zeros, at the conversion's batch: a
    graph CNTK cannot load, or cannot run (some failures only show at the first evaluation, when
    CNTK compiles it: "Dilated convolution on CPU is not yet implemented"), fails here in one
    paragraph (``CNTKLoadError``) instead of inside a parity search. Returns the LoadedModel."""
    from pytest_tf2cntk.errors import CNTKError, CNTKLoadError

    runner, stage = None, "load"
    try:
        runner = CNTKRunner(conversion.onnx_path, device, cntk_python, worker)
        stage = "run"
        zeros = {i.name: np.zeros([1 if d is None else d for d in i.shape], i.dtype) for i in runner.loaded.inputs}
        runner.run(zeros, outputs=runner.loaded.output_names)
        return runner.loaded
    except CNTKError as exc:
        said = " ".join(exc.message.split())
        raise CNTKLoadError(f"CNTK 2.7 cannot {stage} the converted graph of {conversion.source} at batch "
                            f"{conversion.batch} on {device}: {said[:400]}{'...' if len(said) > 400 else ''}",
                            hint="replace the layer CNTK rejects, or convert at another batch or opset; the "
                                 f"graph CNTK was given is {conversion.onnx_path}") from None
    finally:
        if runner is not None:
            runner.close()
