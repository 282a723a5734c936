"""Tiny real Keras models that tests build on the spot for one case each (seeded, saved as .keras)."""
from __future__ import annotations

import os
from pathlib import Path

from pytest_tf2cntk.tf_import import tensorflow


def _keras():  # noqa: ANN202
    tensorflow()  # quietly, before keras imports it
    import keras

    keras.utils.set_random_seed(7)
    return keras


def dense_stack(path: Path, names: tuple[str | None, str | None] = (None, None)) -> Path:
    """Sequential([Input((6,)), Dense(4, "sigmoid"), Dense(3, "tanh")]), default or given layer names."""
    keras = _keras()
    keras.backend.clear_session()  # default names count per process: "dense", "dense_1" from scratch
    first, second = ({"name": n} if n else {} for n in names)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4, "sigmoid", **first),
                              keras.layers.Dense(3, "tanh", **second)])
    model.save(path)
    return path


def float_embedding(path: Path, vocab: int = 23, dtype: str = "float32") -> Path:
    """Input((5,)) in Keras' default dtype float32 (or ``dtype``) -> Embedding(vocab, 4) -> Flatten
    -> Dense(3)."""
    keras = _keras()
    x = keras.Input((5,), name="ids", dtype=dtype)
    y = keras.layers.Embedding(vocab, 4, embeddings_initializer="uniform")(x)
    y = keras.layers.Dense(3)(keras.layers.Flatten()(y))
    keras.Model(x, y).save(path)
    return path


def fully_convolutional(path: Path) -> Path:
    """Input((None, None, 3), name="image") -> Conv2D 3x3 relu -> Conv2D 1x1: free H and W."""
    keras = _keras()
    x = keras.Input((None, None, 3), name="image")
    y = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(x)
    keras.Model(x, keras.layers.Conv2D(2, 1, name="heat")(y)).save(path)
    return path


def with_lambda(path: Path) -> Path:
    """Input((4,)) -> Lambda(x * 2) -> Dense(2): Keras' safe mode refuses to load it."""
    keras = _keras()
    x = keras.Input((4,), name="x")
    keras.Model(x, keras.layers.Dense(2)(keras.layers.Lambda(lambda t: t * 2.0)(x))).save(path)
    return path


def built_apart(builder: str, path: Path) -> Path:
    """``builder(path)`` in a fresh process: a pytester test must not import TensorFlow itself
    (pytester drops the modules a test imported; importing TF's C extensions again aborts)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    code = f"from tests.support.small_models import {builder}; {builder}(__import__('pathlib').Path({str(path)!r}))"
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True, capture_output=True, timeout=300,
                   env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(root)})
    return path


def same_avgpool(path: Path, size: int | tuple[int, int] = 5, pool: int = 3, channels: int = 2) -> Path:
    """Input((H, W, channels), name="image") -> AveragePooling2D(pool, strides 1, padding "same")
    -> Flatten: windows overhang the map at its border (on a 1x1 or 2x2 map, everywhere)."""
    keras = _keras()
    h, w = (size, size) if isinstance(size, int) else size
    x = keras.Input((h, w, channels), name="image")
    y = keras.layers.AveragePooling2D(pool, strides=1, padding="same", name="pool")(x)
    keras.Model(x, keras.layers.Flatten(name="flat")(y)).save(path)
    return path


def _sequence_model(path: Path, make, steps: int = 8, features: int = 3) -> Path:  # noqa: ANN001
    """Input((steps, features), name="seq") -> make(layers, x) -> Dense(2, name="out")."""
    keras = _keras()
    x = keras.Input((steps, features), name="seq")
    keras.Model(x, keras.layers.Dense(2, name="out")(make(keras.layers, x))).save(path)
    return path


def bilstm(path: Path) -> Path:
    """Bidirectional(LSTM(6)) over 8 steps of 3 features -> Dense(2): tf2onnx's bidirectional LSTM."""
    return _sequence_model(path, lambda L, x: L.Bidirectional(L.LSTM(6), name="bilstm")(x))


def stacked_lstm(path: Path) -> Path:
    """LSTM(6, return_sequences) -> LSTM(6) over 8 steps of 3 features -> Dense(2): two LSTM nodes."""
    return _sequence_model(path, lambda L, x: L.LSTM(6, name="lstm2")(L.LSTM(6, return_sequences=True,
                                                                           name="lstm1")(x)))


def gru_sequences(path: Path) -> Path:
    """GRU(6, return_sequences) -> GRU(6) over 8 steps of 3 features -> Dense(2): two GRU Loops."""
    return _sequence_model(path, lambda L, x: L.GRU(6, name="gru2")(L.GRU(6, return_sequences=True,
                                                                         name="gru1")(x)))


def keras2_optimizer_savedmodel(path: Path) -> Path:
    """A SavedModel (signature x -> y) carrying an optimizer's slot the way a Keras 2 model saved
    with its optimizer does: the object exposes get_slot_names/get_slot, so the saver records the
    slot as one, and tf.saved_model.load recreates it with add_slot, which a revived plain object
    lacks ("'_UserObject' object has no attribute 'add_slot'") unless tf_keras registers Keras 2's."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    class Untracked:  # as OptimizerV2's _slots: the slot is saved as a slot, not as a child
        pass

    class Optimizer(tf.Module):
        def __init__(self, var: tf.Variable) -> None:
            super().__init__()
            self._untracked = Untracked()
            self._untracked.slot, self._untracked.var = tf.Variable(tf.zeros_like(var)), var

        def get_slot_names(self) -> list[str]:
            return ["momentum"]

        def get_slot(self, var: tf.Variable, name: str) -> tf.Variable | None:
            return self._untracked.slot if var is self._untracked.var else None

    class Net(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = tf.Variable([[1.0, 2.0], [3.0, 4.0]])
            self.optimizer = Optimizer(self.w)

        @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.float32, name="x")])
        def serve(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
            return {"y": tf.matmul(x, self.w)}

    net = Net()
    tf.saved_model.save(net, str(path), signatures={"serving_default": net.serve})
    return path
