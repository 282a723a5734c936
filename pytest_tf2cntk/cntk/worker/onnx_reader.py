"""The ONNX graph's names, read without the onnx package (Python 3.6 worker: stdlib only).

CNTK keeps input names and ONNX *node* names, not output tensor names, and orders a model's
outputs its own way; so the worker reads the ONNX graph (a minimal protobuf walk) to map names
back.
"""
import mmap


def _varint(buf, pos):
    result = 0
    shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf, start, end):
    """(field number, value) of a protobuf message; length-delimited values as (start, end)."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value = (pos, pos + length)
            pos += length
        elif wire == 1:
            value, pos = None, pos + 8
        elif wire == 5:
            value, pos = None, pos + 4
        else:
            raise ValueError("unsupported protobuf wire type %d" % wire)
        yield field, value


def _text(buf, span):
    return bytes(buf[span[0]:span[1]]).decode("utf-8", "replace")


def _first_string(buf, span, number):
    for field, value in _fields(buf, span[0], span[1]):
        if field == number:
            return _text(buf, value)
    return ""


def parse_onnx_graph(buf):
    """{"inputs", "outputs", "initializers", "nodes": [(name, op_type, inputs, outputs)]}."""
    graph = None
    for field, value in _fields(buf, 0, len(buf)):
        if field == 7:  # ModelProto.graph
            graph = value
    if graph is None:
        raise ValueError("no graph in the ONNX file")
    inputs, outputs, nodes, initializers = [], [], [], set()
    for field, value in _fields(buf, graph[0], graph[1]):
        if field == 1:  # NodeProto
            name, op_type, ins, outs = "", "", [], []
            for f, v in _fields(buf, value[0], value[1]):
                if f == 1:
                    ins.append(_text(buf, v))
                elif f == 2:
                    outs.append(_text(buf, v))
                elif f == 3:
                    name = _text(buf, v)
                elif f == 4:
                    op_type = _text(buf, v)
            nodes.append((name, op_type, ins, outs))
        elif field == 5:  # TensorProto initializer, name = 8
            initializers.add(_first_string(buf, value, 8))
        elif field == 11:  # ValueInfoProto, name = 1
            inputs.append(_first_string(buf, value, 1))
        elif field == 12:
            outputs.append(_first_string(buf, value, 1))
    return {"inputs": [n for n in inputs if n not in initializers], "outputs": outputs,
            "initializers": initializers, "nodes": nodes}


def read_onnx_graph(path):
    with open(path, "rb") as f:
        try:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (ValueError, OSError):  # empty file, or not mappable
            return parse_onnx_graph(f.read())
    try:
        return parse_onnx_graph(mapped)
    finally:
        mapped.close()
