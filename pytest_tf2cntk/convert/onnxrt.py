"""ONNX Runtime as the reference for ONNX semantics (and the judge of graph passes)."""
from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from pytest_tf2cntk.errors import DeviceUnavailable


def providers_for(device: str) -> list[str]:
    import onnxruntime as ort

    if device.startswith("gpu"):
        available = ort.get_available_providers()
        if "CUDAExecutionProvider" not in available:
            raise DeviceUnavailable(
                f"ONNX Runtime has no CUDA provider (available: {', '.join(available)}).",
                hint="pip install onnxruntime-gpu on a machine with a GPU")
        return ["CUDAExecutionProvider"]
    return ["CPUExecutionProvider"]


def session(model: onnx.ModelProto | str | bytes, device: str = "cpu",
            extra_outputs: list[str] | None = None) -> Any:
    """An InferenceSession with graph optimizations off: we want the graph as written."""
    import onnxruntime as ort

    if extra_outputs:
        model = with_outputs(model if isinstance(model, onnx.ModelProto) else onnx.load(model),
                             extra_outputs)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 0
    payload = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    device_index = int(device.partition(":")[2] or 0)
    provs = providers_for(device)
    options = [{"device_id": device_index}] if provs[0] == "CUDAExecutionProvider" else None
    return ort.InferenceSession(payload, opts, providers=provs, provider_options=options)


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], device: str = "cpu") -> dict[str, np.ndarray]:
    sess = session(model, device)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph outputs also include the given intermediate tensors."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    existing = {o.name for o in copy.graph.output}
    for name in names:
        if name not in existing:
            copy.graph.output.append(onnx.ValueInfoProto(name=name))
    return copy
