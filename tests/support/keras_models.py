"""Small Keras models built on the fly for cases no fixture covers (saved once per directory)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from pytest_tf2cntk.tf_import import tensorflow


def _build(path: Path, make: Callable[[object, object], object], seed: int) -> Path:
    if not path.exists():
        tensorflow()  # quietly, before keras imports it
        import keras

        keras.utils.set_random_seed(seed)
        make(keras, keras.layers).save(path)
    return path


def _dense(L, units, name, activation=None):
    # a nonzero bias: with Keras' zero init tf2onnx drops the Add and emits MatMul, not Gemm
    return L.Dense(units, activation=activation, bias_initializer="random_normal", name=name)


def twin_heads(directory: Path) -> Path:
    """Two Dense heads of the same shape straight from a shared trunk: two Gemm outputs CNTK
    leaves unnamed, which only a name-independent mapping can tell apart."""
    def make(keras, L):
        x = keras.Input((6,), name="features")
        trunk = _dense(L, 8, "trunk", "tanh")(x)
        return keras.Model(x, [_dense(L, 3, "head_a")(trunk), _dense(L, 3, "head_b")(trunk)])
    return _build(Path(directory) / "twin_heads.keras", make, 11)


def three_heads(directory: Path) -> Path:
    """ONet-like: a trunk and three Dense heads of different shapes (unnamed Gemm outputs)."""
    def make(keras, L):
        x = keras.Input((5,), name="crop")
        trunk = _dense(L, 16, "trunk", "relu")(x)
        return keras.Model(x, [_dense(L, 4, "box")(trunk), _dense(L, 10, "marks")(trunk),
                               _dense(L, 2, "face", "softmax")(trunk)])
    return _build(Path(directory) / "three_heads.keras", make, 12)


def dilated_conv(directory: Path) -> Path:
    """A dilated Conv2D: valid ONNX that CNTK 2.7 loads but cannot run on the CPU ("Dilated
    convolution on CPU is not yet implemented"), at every batch size."""
    def make(keras, L):
        x = keras.Input((12, 12, 3), name="image")
        return keras.Model(x, L.Conv2D(4, 3, dilation_rate=2, name="atrous")(x))
    return _build(Path(directory) / "dilated_conv.keras", make, 13)


def mixed_batch_concat(directory: Path) -> Path:
    """A Concatenate of a Conv2D branch (CNTK: free batch) and a Dense -> Reshape branch (CNTK:
    static batch): CNTK refuses it at batch > 1 ("Splice: Conflicting dimensionality of axis")."""
    def make(keras, L):
        x = keras.Input((4, 4, 3), name="image")
        conv = L.Conv2D(5, 1, name="conv")(x)
        dense = L.Reshape((4, 4, 2), name="unflatten")(_dense(L, 32, "dense")(L.Flatten(name="flat")(x)))
        return keras.Model(x, L.Concatenate(name="join")([conv, dense]))
    return _build(Path(directory) / "mixed_batch_concat.keras", make, 14)

