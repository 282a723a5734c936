"""Float64 twins of a model under test: the reference a measured parity verdict judges against.

A twin computes the same function as the float32 model with every weight and every intermediate
tensor in float64, so its output is the truth that TF32, ONNX Runtime float32 and CNTK float32 all
approximate. ``build.build_twin(conversion)`` tries three routes, most trustworthy first:

1. ``keras-float64`` (``keras64``): the Keras model rebuilt from its own config in float64, the
   weights copied in float64. Independent of tf2onnx.
2. ``tf-graph-float64`` (``tfgraph``): the TF function frozen, its GraphDef rewritten to double
   (inference FusedBatchNorm as Rsqrt/Mul/Add). Independent of tf2onnx; gives up, naming the node,
   on ops without a float64 CPU kernel or with float32 fixed by their definition.
3. ``onnx-float64`` (``onnx64``): the converted ONNX in double through onnx.reference (a numpy
   Conv) or ONNX Runtime. Inherits every converter bug: a last resort, labelled so.

Modules: ``core`` (Twin, TwinUnavailable, route names, scaled_error), ``source`` (the adapter over
the package's loaded TFModel, the self-check), ``keras64``, ``tfgraph``, ``onnx64`` (the routes;
``onnx64.one_node_float64`` evaluates one ONNX node in float64), ``build`` (the entry point).

Nothing is imported here: callers import from the modules (TensorFlow, Keras, onnx and
onnxruntime are imported inside the functions that need them, numpy at module level).
"""
