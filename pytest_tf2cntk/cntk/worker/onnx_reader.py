"""The ONNX graph's names, read without the onnx package (Python 3.6 worker: stdlib only).

CNTK keeps input names and ONNX *node* names, not output tensor names, and orders a model's
outputs its own way; so the worker reads the ONNX graph (a minimal protobuf walk) to map names
back. Some importers name nothing (CNTK's Gemm is an anonymous block) and CNTK's output order
follows process-wide uid counters, so ``write_marked`` also writes a copy in which every graph
output passes through an Identity node of a unique name: CNTK keeps that name (an Alias named
after the node), which ties each CNTK output to its ONNX output whatever else was loaded first.
"""
import mmap
import os
import tempfile

MARKER_PREFIX = "tf2cntk_output_"
_CHUNK = 1 << 24  # bytes copied at a time from the mapped file


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
    for field, value, _start, _end in _spans(buf, start, end):
        yield field, value


def _spans(buf, start, end):
    """(field number, value, start, end) per field, start/end spanning its key and value."""
    pos = start
    while pos < end:
        begin = pos
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
        yield field, value, begin, pos


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


def _mapped(path, use):
    with open(path, "rb") as f:
        try:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (ValueError, OSError):  # empty file, or not mappable
            return use(f.read())
    try:
        return use(mapped)
    finally:
        mapped.close()


def read_onnx_graph(path):
    return _mapped(path, parse_onnx_graph)


# ---------------------------------------------------------------------------------------------
# Writing: the same model with a named Identity behind every graph output


def _varint_bytes(n):
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        if not n:
            out.append(low)
            return bytes(out)
        out.append(low | 0x80)


def _string_field(number, text):
    data = text.encode("utf-8")
    return _varint_bytes(number << 3 | 2) + _varint_bytes(len(data)) + data


def _message_field(number, parts):
    """Key and length of a length-delimited field whose value is ``parts`` (bytes or spans)."""
    size = sum(len(p) if isinstance(p, bytes) else p[1] - p[0] for p in parts)
    return [_varint_bytes(number << 3 | 2) + _varint_bytes(size)] + list(parts)


def marker_names(graph):
    """A unique node-and-tensor name per graph output (position), clashing with no name in use."""
    used = set(graph["inputs"]) | set(graph["outputs"]) | set(graph["initializers"])
    for name, _op, ins, outs in graph["nodes"]:
        used.add(name)
        used.update(ins)
        used.update(outs)
    names = []
    for i in range(len(graph["outputs"])):
        name = "%s%d" % (MARKER_PREFIX, i)
        while name in used:
            name += "_"
        used.add(name)
        names.append(name)
    return names


def _marked_graph(buf, span, outputs, markers):
    """The GraphProto's parts: each output ValueInfo renamed to its marker, Identity nodes added."""
    parts, k = [], 0
    for field, value, start, end in _spans(buf, span[0], span[1]):
        if field != 12:
            parts.append((start, end))
            continue
        info = [_string_field(1, markers[k])]  # ValueInfoProto.name, then its type etc. as they were
        info += [(s, e) for f, _v, s, e in _spans(buf, value[0], value[1]) if f != 1]
        parts += _message_field(12, info)
        k += 1
    for tensor, marker in zip(outputs, markers):  # NodeProto: input 1, output 2, name 3, op_type 4
        node = [_string_field(1, tensor), _string_field(2, marker), _string_field(3, marker),
                _string_field(4, "Identity")]
        parts += _message_field(1, node)
    return parts


def _write_marked(buf, out, outputs, markers):
    spans = [(v, s, e) for f, v, s, e in _spans(buf, 0, len(buf)) if f == 7]
    if len(spans) != 1:
        raise ValueError("%d graph fields in the ONNX file" % len(spans))
    (value, start, end), = spans
    parts = [(0, start)] + _message_field(7, _marked_graph(buf, value, outputs, markers))
    parts.append((end, len(buf)))
    for part in parts:
        if isinstance(part, bytes):
            out.write(part)
            continue
        for pos in range(part[0], part[1], _CHUNK):
            out.write(buf[pos:min(part[1], pos + _CHUNK)])


def write_marked(path, graph):
    """(path of a temporary copy of the model with output markers, [marker per graph output]).
    The caller deletes the copy; CNTK reads it whole at load."""
    markers = marker_names(graph)
    fd, marked = tempfile.mkstemp(prefix="tf2cntk-marked-", suffix=".onnx")
    try:
        with os.fdopen(fd, "wb") as out:
            _mapped(path, lambda buf: _write_marked(buf, out, graph["outputs"], markers))
    except BaseException:
        os.unlink(marked)
        raise
    return marked, markers
