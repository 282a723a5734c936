"""Device names shared by the options, the runners and the worker: cpu, gpu, gpu:N."""
from __future__ import annotations


def normalize_device(device: str) -> str:
    """'gpu' means 'gpu:0'; anything but cpu / gpu / gpu:N is a ValueError."""
    device = device.strip().lower()
    if device == "gpu":
        return "gpu:0"
    if device == "cpu" or (device.startswith("gpu:") and device[4:].isdigit()):
        return device
    raise ValueError(f"unknown device {device!r}: use cpu, gpu or gpu:N")
