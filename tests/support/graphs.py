"""Small hand-built ONNX graphs for unit tests."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def embedding_model(vocab: int = 37) -> onnx.ModelProto:
    table = numpy_helper.from_array(np.zeros((vocab, 4), np.float32), "table")
    nodes = [helper.make_node("Cast", ["ids"], ["ids64"], to=TensorProto.INT64, name="cast"),
             helper.make_node("Gather", ["table", "ids64"], ["emb"], name="gather")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT32, [2, 5]),
                                           helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("emb", TensorProto.FLOAT, [2, 5, 4])], [table])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
