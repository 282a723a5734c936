"""Versions of the host side, read from package metadata (importing TensorFlow costs seconds).

The CNTK side's versions come from the worker itself (``cntk.client.CNTKWorker.versions``).
"""
from __future__ import annotations

import platform
from importlib import metadata

CONVERSION_PACKAGES = ("tensorflow", "tensorflow-cpu", "keras", "tf2onnx", "onnx")  # shape a conversion
HOST_PACKAGES = CONVERSION_PACKAGES + ("onnxruntime", "numpy", "hypothesis")


def package_versions(names: tuple[str, ...] = CONVERSION_PACKAGES) -> dict[str, str]:
    """Installed versions of ``names``; a package that is not installed is left out."""
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def host_versions() -> dict[str, str]:
    """Versions of the host side for reports and the history: packages and Python."""
    return {**package_versions(HOST_PACKAGES), "python": platform.python_version()}
