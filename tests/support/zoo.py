"""Larger real architectures (keras.applications, weights=None) built once into a local cache.

Not committed: they are megabytes. Built deterministically (fixed seed) the first time a test
asks for them, under ``.tf2cntk/test-models`` in the checkout (or $TF2CNTK_TEST_MODELS).
"""
from __future__ import annotations

import os
from pathlib import Path

from pytest_tf2cntk.tf_import import tensorflow

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "fixtures"
# (constructor, input shape) at small input sizes so that a 2-core CI machine copes
APPLICATIONS = {
    "mobilenetv2_96": ("MobileNetV2", (96, 96, 3)),
    "resnet50_64": ("ResNet50", (64, 64, 3)),
    "inceptionv3_75": ("InceptionV3", (75, 75, 3)),  # its smallest input: 1x1 maps in the last blocks
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
            tensorflow()  # quietly, before keras imports it
            import keras

            keras.utils.set_random_seed(1234)
            ctor, shape = APPLICATIONS[name]
            model = getattr(keras.applications, ctor)(input_shape=shape, weights=None, classes=10)
            tmp = path.with_suffix(".tmp.keras")
            model.save(tmp)
            os.replace(tmp, path)
    return path


def calibrated_model(name: str) -> Path:
    """The zoo model with BatchNorm statistics calibrated so activations stay O(1).

    keras.applications with weights=None has BN as identity (mean 0, var 1, gamma 1, beta 0); in
    MobileNetV2 the activations then shrink ~10x per block and the softmax output is exactly 0.1
    for every input (constant: no bug below it can show). Here each BN's moving mean/variance are
    set, layer by layer, to the statistics of its input on 16 uniform [-1, 1] images, gamma and
    beta are drawn at random (seeded) and the classifier gets a random bias: the model responds
    to its input the way a trained one does. Built once into the zoo dir.
    """
    import numpy as np
    from filelock import FileLock

    out = zoo_dir() / f"{name}_cal.keras"
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if out.exists():
            return out
        import keras

        model = keras.models.load_model(application_model(name))
        rng = np.random.default_rng(4321)
        x = rng.uniform(-1, 1, (16,) + tuple(model.input.shape[1:])).astype(np.float32)
        for layer in model.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                feats = np.asarray(keras.Model(model.input, layer.input)(x, training=False), np.float64)
                axes = tuple(range(feats.ndim - 1))
                mean, var = feats.mean(axis=axes), feats.var(axis=axes) + 1e-6
                c = mean.shape[0]
                gamma = rng.uniform(0.5, 1.5, c)
                beta = rng.uniform(-0.25, 0.25, c)
                layer.set_weights([w.astype(np.float32) for w in (gamma, beta, mean, var)])
        dense = model.layers[-1]
        kernel, bias = dense.get_weights()
        dense.set_weights([kernel, rng.normal(0, 0.1, bias.shape).astype(np.float32)])
        tmp = out.with_suffix(".tmp.keras")
        model.save(tmp)
        os.replace(tmp, out)
    return out
