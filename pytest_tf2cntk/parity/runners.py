"""The three backends of a parity check, each on a device ('cpu', 'gpu', 'gpu:N').

TensorFlow in-process is the truth, ONNX Runtime on the converted graph is the reference for
ONNX semantics, CNTK in the worker is the target. A device a backend cannot use raises
``DeviceUnavailable`` with the exact reason (the pytest layer turns it into a skip).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx

from pytest_tf2cntk.devices import normalize_device
from pytest_tf2cntk.errors import DeviceUnavailable
from pytest_tf2cntk.convert.tf_model import TFModel


class TFRunner:
    name = "tf"

    def __init__(self, model: TFModel, device: str = "cpu", allow_tf32: bool = False) -> None:
        self.model = model
        self.device = normalize_device(device)
        if self.device.startswith("gpu"):
            import tensorflow as tf

            gpus = tf.config.list_physical_devices("GPU")
            index = int(self.device.split(":")[1])
            if not gpus:
                built = tf.test.is_built_with_cuda()
                raise DeviceUnavailable(
                    "no GPU visible to TensorFlow" + ("" if built else " (this TensorFlow build has no "
                                                      "CUDA support; install tensorflow[and-cuda])"))
            if index >= len(gpus):
                raise DeviceUnavailable(f"TensorFlow sees {len(gpus)} GPU(s); gpu:{index} does not exist")
            # TF enables TF32 matmuls/convs by default on Ampere+, which costs ~1e-3 relative error
            tf.config.experimental.enable_tensor_float_32_execution(allow_tf32)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.model.run(feeds, self.device)


class OrtRunner:
    name = "ort"

    def __init__(self, model: onnx.ModelProto | Path, device: str = "cpu") -> None:
        from pytest_tf2cntk.convert import onnxrt

        self.device = normalize_device(device)
        payload = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
        self.session = onnxrt.session(payload, self.device)
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.session.run(self.output_names, feeds)))


class CNTKRunner:
    name = "cntk"

    def __init__(self, onnx_path: Path, device: str = "cpu", cntk_python: str | None = None,
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

    def _feeds(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: v if k not in self.input_dtypes or v.dtype == self.input_dtypes[k]
                else v.astype(self.input_dtypes[k]) for k, v in feeds.items()}

    def submit(self, feeds: dict[str, np.ndarray]) -> Any:
        """Start an eval in the worker and return at once (the host runs TF meanwhile)."""
        return self.worker.eval_async(self.loaded, self._feeds(feeds))

    def result(self, pending: Any) -> dict[str, np.ndarray]:
        """The outputs of a ``submit``, in the dtypes the graph declares."""
        return {name: self._restore_dtype(name, value) for name, value in pending.result().items()}

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.result(self.submit(feeds))

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
