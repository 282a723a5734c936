"""The float32 model the routes start from: an adapter over the package's loaded ``TFModel``
(``conversion.tf_model``, loaded once and shared by the routes and the parity run), and the
self-check that compares a twin with it on a probe input."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from pytest_tf2cntk.convert.twin.core import SELF_CHECK_LIMIT, RouteFailed, Twin, scaled_error
from pytest_tf2cntk.tf_import import tensorflow

if TYPE_CHECKING:
    from pytest_tf2cntk.convert.tf_model import TFModel

PROBE_SEED = 20261201


class SourceModel:
    """The float32 model: its Keras model or signature function, inputs and outputs in TFModel's
    order, a concrete float32 tf.function, a float32 run and probe inputs.

    ``tf_model`` is a TFModel or a callable returning one (``lambda: conversion.tf_model``): it is
    resolved on first use, so a model that fails to load is one route's reason, not a crash of
    ``build_twin`` (the ONNX route does not need it).
    """

    def __init__(self, tf_model: TFModel | Callable[[], TFModel], unsafe_load: bool = False,
                 probe_batch: int = 2) -> None:
        self._tf: TFModel | None = None if callable(tf_model) else tf_model
        self._load = tf_model if callable(tf_model) else None
        self.unsafe_load = unsafe_load
        self.probe_batch = probe_batch
        self._concrete: Any = None

    @classmethod
    def from_conversion(cls, conversion: Any) -> SourceModel:
        """Over a ``pipeline.Conversion`` (or anything with ``tf_model``, ``options.unsafe_load``
        and ``batch``): the probe runs at the conversion's batch."""
        options = getattr(conversion, "options", None)
        return cls(lambda: conversion.tf_model, bool(getattr(options, "unsafe_load", False)),
                   int(getattr(conversion, "batch", 2) or 2))

    @property
    def tf_model(self) -> TFModel:
        if self._tf is None:
            self._tf = self._load()  # type: ignore[misc]
        return self._tf

    @property
    def kind(self) -> str:
        return self.tf_model.kind

    @property
    def path(self) -> Any:
        return self.tf_model.path

    def keras_model(self) -> Any:
        if self.kind not in ("keras", "h5"):
            raise RouteFailed(f"not a Keras model ({self.kind})")
        return self.tf_model.obj

    def signature_fn(self) -> Any:
        if self.kind != "savedmodel":
            raise RouteFailed(f"not a SavedModel ({self.kind})")
        return self.tf_model.obj

    def io(self) -> tuple[list[tuple[str, str, tuple]], list[str]]:
        """[(input name, numpy dtype, shape with None batch)], [output names]: TFModel's order."""
        model = self.tf_model
        return ([(i.name, i.dtype, tuple(i.shape)) for i in model.inputs], [o.name for o in model.outputs])

    def tf_function(self) -> Any:
        """A concrete float32 function, inputs in ``io()`` order (free batch, and any other free
        dimension left free), outputs a list in ``io()`` order."""
        if self._concrete is None:
            self._concrete = self._trace()
        return self._concrete

    def _trace(self) -> Any:
        tf = tensorflow()

        ins, outs = self.io()
        specs = [tf.TensorSpec(shape, tf.as_dtype(dtype), name=name) for name, dtype, shape in ins]
        if self.kind == "savedmodel":
            sig = self.signature_fn()

            def call(*args: Any) -> list:
                out = sig(**{n: a for (n, _, _), a in zip(ins, args)})
                return [out[n] for n in outs]
        else:
            model = self.keras_model()

            def call(*args: Any) -> list:
                out = model(list(args) if len(args) > 1 else args[0], training=False)
                if isinstance(out, dict):
                    return [out[n] for n in outs]
                return list(out) if isinstance(out, (list, tuple)) else [out]
        return tf.function(call, input_signature=specs, autograph=False).get_concrete_function()

    def run32(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The float32 model's outputs by name (TFModel.run: its traces are shared with parity)."""
        return self.tf_model.run(feeds)

    def probe_feeds(self, batch: int | None = None, seed: int = PROBE_SEED) -> dict[str, np.ndarray]:
        """Uniform [-1, 1] floats, ids 0/1 for integers (inside any vocabulary), random bools;
        ``batch`` rows (default ``probe_batch``), free non-batch dimensions 1."""
        batch = batch or self.probe_batch
        rng = np.random.default_rng(seed)
        feeds = {}
        for name, dtype, shape in self.io()[0]:
            dims = tuple(batch if d is None and i == 0 else (d or 1) for i, d in enumerate(shape))
            if dtype == "bool":
                feeds[name] = rng.integers(0, 2, dims).astype(bool)
            elif np.issubdtype(np.dtype(dtype), np.integer):
                feeds[name] = rng.integers(0, 2, dims).astype(dtype)
            else:
                feeds[name] = rng.uniform(-1, 1, dims).astype(dtype)
        return feeds


def self_check(source: SourceModel, twin: Twin) -> float:
    """Scaled error of the float32 model against ``twin`` on a probe input; RouteFailed when an
    output is not float64 or the error exceeds ``SELF_CHECK_LIMIT`` (not the same function)."""
    feeds = source.probe_feeds()
    ref32 = source.run32(feeds)
    got64 = twin.run(feeds)
    worst = 0.0
    for name in twin.outputs:
        a, b = ref32[name], got64[name]
        if b.dtype != np.float64 and np.issubdtype(b.dtype, np.floating):
            raise RouteFailed(f"output '{name}' is {b.dtype}, not float64")
        if not np.issubdtype(b.dtype, np.floating):
            err = 0.0 if np.array_equal(a, b) else float("inf")
        else:
            err = scaled_error(a, b)
        worst = max(worst, err)
    if not worst <= SELF_CHECK_LIMIT:
        raise RouteFailed(f"twin differs from the float32 model by scaled error {worst:.3g} on a "
                          f"probe input (limit {SELF_CHECK_LIMIT:g}): not the same function")
    return worst
