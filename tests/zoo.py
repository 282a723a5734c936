"""Larger real architectures (keras.applications, weights=None) built once into a local cache.

Not committed: they are megabytes. Built deterministically (fixed seed) the first time a test
asks for them, under ``.tf2cntk/test-models`` in the checkout (or $TF2CNTK_TEST_MODELS).
"""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
# (constructor, input shape) at small input sizes so that a 2-core CI machine copes
APPLICATIONS = {
    "mobilenetv2_96": ("MobileNetV2", (96, 96, 3)),
    "resnet50_64": ("ResNet50", (64, 64, 3)),
}


def zoo_dir() -> Path:
    return Path(os.environ.get("TF2CNTK_TEST_MODELS") or ROOT / ".tf2cntk" / "test-models")


def application_model(name: str) -> Path:
    """Path of the saved .keras model, building it on first use (file lock: xdist-safe)."""
    from filelock import FileLock

    path = zoo_dir() / f"{name}.keras"
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if not path.exists():
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
            import keras

            keras.utils.set_random_seed(1234)
            ctor, shape = APPLICATIONS[name]
            model = getattr(keras.applications, ctor)(input_shape=shape, weights=None, classes=10)
            tmp = path.with_suffix(".tmp.keras")
            model.save(tmp)
            os.replace(tmp, path)
    return path
