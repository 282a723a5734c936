"""The CNTK worker process: ``<cntk python> -u server.py``, one request at a time.

Runs on CPython 3.6 with numpy 1.19 and cntk 2.7 (stdlib + numpy + cntk only). Frames come in
on stdin and go out on a private duplicate of stdout (see ``protocol``); fd 1 is pointed at
stderr first, so whatever CNTK's C++ code or Python prints cannot corrupt a frame.

Right after start-up the worker sends an unsolicited ``hello`` frame: ``ok: true`` with the
same facts as ``ping``, or ``ok: false, type: "EnvironmentProblem"`` when cntk cannot be
imported (then it exits 3). The host treats death before ``hello`` as an environment problem.

Requests (header ``op``), every reply echoes ``id`` and ``op`` and carries ``ok``:

``ping``      -> versions, pid, devices, warnings captured while importing cntk
``echo``      -> the arrays it received (tests the framing end to end), plus their layout;
              ``stdout_noise`` is printed to fd 1 first (tests the stdout guard)
``load``      ``path``, ``device`` ("cpu" | "gpu" | "gpu:N") -> ``handle``, ``inputs``, ``outputs``
``eval``      ``handle``, input arrays, optional ``outputs`` (ONNX tensor names, ONNX/CNTK
              node names or CNTK uids) -> arrays keyed by the requested names
``nodes``     ``handle`` -> the CNTK graph's functions (name, uid, op_name, inputs, outputs)
``bench``     ``handle``, input arrays, ``n`` -> seconds per in-process eval (no protocol)
``unload``    ``handle``
``shutdown``  reply, then exit 0

Errors: ``ok: false``, ``type`` ("ProtocolError", "CNTKError", "DeviceUnavailable",
"InternalError"), ``message`` (first line first), ``detail`` (native call stack, traceback).
"""
import collections
import io
import os
import re
import signal
import sys
import time
import traceback

if __package__:
    from . import protocol
    from .onnx_reader import read_onnx_graph, write_marked
    from .startup import import_cntk, protect_stdio, split_native
else:  # run as a script: this file's folder is sys.path[0]
    import protocol
    from onnx_reader import read_onnx_graph, write_marked
    from startup import import_cntk, protect_stdio, split_native

import numpy as np

cntk = None  # imported by startup.import_cntk once stdio is protected

EXIT_IMPORT_FAILED = 3
MAX_COMBOS = 2  # compiled output combinations kept per model


class RequestError(Exception):
    def __init__(self, type_, message, detail=""):
        Exception.__init__(self, message)
        self.type = type_
        self.message = message
        self.detail = detail


def _protocol_error(message):
    return RequestError("ProtocolError", message)


def _cntk_call(fn, *args, **kwargs):
    """Call into CNTK; its exceptions become CNTKError replies with the stack in ``detail``."""
    try:
        return fn(*args, **kwargs)
    except RequestError:
        raise
    except Exception as exc:
        message, native = split_native(str(exc))
        tb = traceback.format_exc()
        raise RequestError("CNTKError", message or type(exc).__name__,
                           "\n\n".join(p for p in (native, tb) if p))


def device_names():
    names = []
    for d in cntk.device.all_devices():
        names.append("cpu" if d.type() == cntk.device.DeviceKind.CPU else "gpu:%d" % d.id())
    return names


def parse_device(spec):
    if spec is None or spec == "cpu":
        return cntk.device.cpu()
    match = re.match(r"^gpu(?::(\d+))?$", spec) if isinstance(spec, str) else None
    if not match:
        raise _protocol_error("device must be 'cpu', 'gpu' or 'gpu:N', not %r" % (spec,))
    try:
        return cntk.device.gpu(int(match.group(1) or 0))
    except Exception as exc:
        message, native = split_native(str(exc))
        raise RequestError("DeviceUnavailable", message, native)


# ---------------------------------------------------------------------------------------------
# Models


def _shape(var):
    # CNTK marks free (-3) and inferred (-1) dimensions with negatives: None on the wire
    return [d if d >= 0 else None for d in var.shape]


def _dtype(var):
    return np.dtype(var.dtype).str


def _var_info(name, var, matched):
    return {"name": name, "shape": _shape(var), "dtype": _dtype(var), "cntk_name": var.name,
            "cntk_uid": var.uid, "matched": matched}


class Model(object):
    def __init__(self, path, device_spec, device, function, graph, notes, markers=()):
        self.path = path
        self.device_spec = device_spec
        self.device = device
        self.function = function
        self.graph = graph  # parse_onnx_graph() result, or None
        self.markers = list(markers)  # write_marked() name per graph output
        self.notes = notes
        self.inputs = []   # [(onnx name, Variable, how matched)]
        self.outputs = []
        # tuple of requested names -> (combined function, index per name); least recently used
        # first, bounded: layerwise passes ask for many different combinations once each
        self.combos = collections.OrderedDict()
        self._index = None
        self._map_inputs()
        self.input_by_name = dict((n, v) for n, v, _ in self.inputs)
        self._map_outputs()
        self.output_by_name = dict((n, v) for n, v, _ in self.outputs)

    def _map_inputs(self):
        args = list(self.function.arguments)
        onnx_inputs = self.graph["inputs"] if self.graph else []
        by_name = dict((a.name, a) for a in args)
        named = [n for n in onnx_inputs if n in by_name]
        left_onnx = [n for n in onnx_inputs if n not in by_name]
        used = set(by_name[n].uid for n in named)
        left_args = [a for a in args if a.uid not in used]
        pairs = dict((n, (by_name[n], "name")) for n in named)
        if left_onnx and len(left_onnx) == len(left_args):
            self.notes.append("inputs %s matched to CNTK arguments by position" % left_onnx)
            pairs.update((n, (a, "order")) for n, a in zip(left_onnx, left_args))
            left_args = []
        order = onnx_inputs if self.graph else []
        self.inputs = [(n, pairs[n][0], pairs[n][1]) for n in order if n in pairs]
        self.inputs += [(a.name or a.uid, a, "cntk") for a in left_args]

    def _map_outputs(self):
        """Each ONNX graph output is the input of its marker, the Alias CNTK named after the
        Identity node ``write_marked`` put behind it: a tie no uid counter or output order can
        move. Without exactly one CNTK output per marker there is no mapping, and no guess."""
        outs = list(self.function.outputs)
        if not self.graph:
            self.outputs = [(o.name or o.uid, o, "cntk") for o in outs]
            return
        self.outputs = []
        for tensor, marker in zip(self.graph["outputs"], self.markers):
            found = [o for o in outs if o.name == marker]
            owner = found[0].owner if len(found) == 1 else None
            if owner is None or len(owner.inputs) != 1:
                raise RequestError("CNTKError", "cannot tell which CNTK output is the ONNX output %r of "
                                   "%s: CNTK's graph has %d output(s) named by its marker %r and the "
                                   "outputs %s" % (tensor, self.path, len(found), marker,
                                                   [o.name or o.uid for o in outs]))
            self.outputs.append((tensor, owner.inputs[0], "marker"))
        # the graph without the markers (they would show in 'nodes' as nodes ONNX lacks), rooted
        # as CNTK roots an unmarked import: the one producer, or a combine of several
        inner = list(collections.OrderedDict((v.uid, v) for _t, v, _m in self.outputs
                                             if not v.is_input).values())
        if len(inner) == 1 and inner[0].owner is not None:
            self.function = cntk.as_composite(inner[0].owner)
        elif inner:
            self.function = _cntk_call(cntk.combine, inner)

    def producers(self):
        """ONNX tensor name -> (node tuple, output index)."""
        out = {}
        for node in self.graph["nodes"]:
            for i, t in enumerate(node[3]):
                out[t] = (node, i)
        return out

    # -- the CNTK graph, indexed once on demand

    def index(self):
        if self._index is None:
            from cntk.logging.graph import depth_first_search
            found = depth_first_search(self.function, lambda n: True, depth=0)
            funcs = [n for n in found if isinstance(n, cntk.Function)]
            if funcs and funcs[0].op_name == "Combine" and funcs[0].uid == self.function.uid:
                funcs = funcs[1:]  # the root combine of a multi-output model is no real node
            by_name = {}
            for f in funcs:
                by_name.setdefault(f.name, []).append(f)
            var_by_uid = {}
            for f in funcs:
                for o in f.outputs:
                    var_by_uid[o.uid] = o
            for a in self.function.arguments:
                var_by_uid[a.uid] = a
            self._index = {"funcs": funcs, "by_name": by_name,
                           "by_uid": dict((f.uid, f) for f in funcs), "var_by_uid": var_by_uid}
        return self._index

    def node_named(self, name):
        """The CNTK function an ONNX node became: CNTK may build several functions with the
        node's name; the one whose output no other of them consumes is the node's result."""
        cands = self.index()["by_name"].get(name) or []
        if len(cands) <= 1:
            return cands[0] if cands else None
        fed = set()
        for f in cands:
            for i in f.inputs:
                if i.is_output:
                    fed.add(i.owner.uid)
        last = [f for f in cands if f.uid not in fed]
        return (last or cands)[0]

    def onnx_node_map(self):
        """CNTK function uid -> ONNX output tensors, for nodes whose ONNX node has a name."""
        out = {}
        if not self.graph:
            return out
        for name, _op, _ins, node_outs in self.graph["nodes"]:
            if name:
                f = self.node_named(name)
                if f is not None:
                    out.setdefault(f.uid, []).extend(node_outs)
        return out

    def resolve(self, name):
        """The CNTK variable for a requested output name."""
        if name in self.output_by_name:
            return self.output_by_name[name]
        if name in self.input_by_name:
            return self.input_by_name[name]
        if self.graph:
            produced = self.producers().get(name)
            if produced is not None:
                (node_name, op_type, _ins, node_outs), index = produced
                if not node_name:
                    raise _protocol_error(
                        "ONNX tensor %r comes from an unnamed %s node and CNTK drops the names "
                        "of unnamed nodes; name the node, or ask for a CNTK uid from 'nodes'"
                        % (name, op_type))
                f = self.node_named(node_name)
                if f is not None:
                    if len(f.outputs) == len(node_outs):
                        return f.outputs[index]
                    if index == 0:
                        return f.outputs[0]
                    raise _protocol_error("ONNX tensor %r is output %d of node %r, but its CNTK "
                                          "function %s has %d outputs"
                                          % (name, index, node_name, f.uid, len(f.outputs)))
        idx = self.index()
        f = self.node_named(name) or idx["by_uid"].get(name)
        if f is not None:
            if len(f.outputs) != 1:
                raise _protocol_error("node %r has %d outputs; ask for one by uid: %s"
                                      % (name, len(f.outputs), [o.uid for o in f.outputs]))
            return f.outputs[0]
        if name in idx["var_by_uid"]:
            return idx["var_by_uid"][name]
        raise _protocol_error("no output, ONNX tensor, node or uid named %r in %s (outputs: %s)"
                              % (name, self.path, [n for n, _v, _m in self.outputs]))

    def combo(self, names):
        key = tuple(names)
        hit = self.combos.get(key)
        if hit is not None:
            self.combos.move_to_end(key)
        else:
            variables = []
            slot = {}
            for name in names:
                var = self.resolve(name)
                if var.uid not in slot:
                    slot[var.uid] = len(variables)
                    variables.append(var)
            combined = _cntk_call(cntk.combine, variables)
            hit = (combined, [slot[self.resolve(n).uid] for n in names])
            self.combos[key] = hit
            while len(self.combos) > MAX_COMBOS:
                self.combos.popitem(last=False)  # frees CNTK's compiled graph for it
        return hit

    def feed(self, arrays):
        feed = {}
        for name, value in arrays.items():
            var = self.input_by_name.get(name)
            if var is None:
                raise _protocol_error("model %s has no input %r (inputs: %s)"
                                      % (self.path, name, [n for n, _v, _m in self.inputs]))
            feed[var] = value
        return feed

    def evaluate(self, names, feed):
        """[array per requested name]."""
        combined, slots = self.combo(names)
        result = _cntk_call(combined.eval, feed, device=self.device)
        outs = combined.outputs
        if not isinstance(result, dict):
            values = [result]
        else:
            values = [result[o] for o in outs]
        return [np.asarray(values[s]) for s in slots]


# ---------------------------------------------------------------------------------------------
# Request handlers: (state, header, arrays) -> (reply fields, reply arrays)


class State(object):
    def __init__(self, facts):
        self.facts = facts
        self.models = {}
        self.next_handle = 1
        self.started = time.time()


def _field(header, name, kind=None):
    if name not in header:
        raise _protocol_error("request %r lacks the field %r" % (header.get("op"), name))
    value = header[name]
    if kind is not None and (not isinstance(value, kind) or isinstance(value, bool)):
        raise _protocol_error("field %r must be %s, not %r" % (name, kind.__name__, value))
    return value


def _model(state, header):
    handle = _field(header, "handle", int)
    model = state.models.get(handle)
    if model is None:
        raise _protocol_error("no model with handle %d in this worker (pid %d; loaded: %s)"
                              % (handle, os.getpid(), sorted(state.models)))
    return model


def _names(header, model):
    names = header.get("outputs")
    if names is None:
        return [n for n, _v, _m in model.outputs]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or not names:
        raise _protocol_error("'outputs' must be a non-empty list of names, not %r" % (names,))
    return names


def op_ping(state, header, arrays):
    reply = dict(state.facts)
    reply.update(pid=os.getpid(), models=len(state.models),
                 uptime_s=time.time() - state.started)
    return reply, None


def op_echo(state, header, arrays):
    noise = header.get("stdout_noise")
    if noise:  # exercises the stdout guard: this must land on stderr, not in the frame stream
        print(noise)
        sys.stdout.flush()
        os.write(1, (str(noise) + "\n").encode("utf-8"))
    layout = [{"name": n, "dtype": a.dtype.str, "shape": list(a.shape),
               "aligned": bool(a.flags.aligned), "writeable": bool(a.flags.writeable)}
              for n, a in arrays.items()]
    return {"meta": header.get("meta"), "received": layout}, arrays


def op_load(state, header, arrays):
    path = _field(header, "path", str)
    spec = header.get("device", "cpu")
    device = parse_device(spec)
    notes = []
    graph, marked, markers = None, None, ()
    try:
        graph = read_onnx_graph(path)
        marked, markers = write_marked(path, graph)
    except Exception as exc:  # not ONNX we can read: CNTK's own load says what is wrong with it
        if graph is not None:
            raise RequestError("InternalError", "cannot write the output-marked copy of %s: %s: %s"
                               % (path, type(exc).__name__, exc), traceback.format_exc())
        notes.append("could not read ONNX names (%s: %s); using CNTK names" % (
            type(exc).__name__, exc))
    try:
        function = _cntk_call(cntk.Function.load, marked or path, device=device,
                              format=cntk.ModelFormat.ONNX)
    finally:
        if marked:
            os.unlink(marked)
    model = Model(path, spec, device, function, graph, notes, markers)
    handle = state.next_handle
    state.next_handle += 1
    state.models[handle] = model
    return {"handle": handle, "device": spec,
            "inputs": [_var_info(n, v, m) for n, v, m in model.inputs],
            "outputs": [_var_info(n, v, m) for n, v, m in model.outputs],
            "notes": notes}, None


def op_eval(state, header, arrays):
    model = _model(state, header)
    names = _names(header, model)
    feed = model.feed(arrays)
    started = time.perf_counter()
    values = model.evaluate(names, feed)
    elapsed = time.perf_counter() - started
    out = {}
    for name, value in zip(names, values):
        out[name] = value
    return {"eval_s": elapsed}, out


def op_bench(state, header, arrays):
    model = _model(state, header)
    n = _field(header, "n", int)
    names = _names(header, model)
    feed = model.feed(arrays)
    for _ in range(int(header.get("warmup", 3))):
        model.evaluate(names, feed)
    times = []
    clock = time.perf_counter
    for _ in range(n):
        t0 = clock()
        model.evaluate(names, feed)
        times.append(clock() - t0)
    return {"times_s": times}, None


def op_nodes(state, header, arrays):
    model = _model(state, header)
    onnx_of = model.onnx_node_map()
    nodes = []
    for f in model.index()["funcs"]:
        nodes.append({
            "name": f.name, "uid": f.uid, "op_name": f.op_name, "is_block": bool(f.is_block),
            "inputs": [i.uid for i in f.inputs],
            "outputs": [{"name": o.name, "uid": o.uid, "shape": _shape(o), "dtype": _dtype(o)}
                        for o in f.outputs],
            "onnx_outputs": onnx_of.get(f.uid, []),
        })
    return {"nodes": nodes}, None


def op_unload(state, header, arrays):
    _model(state, header)
    del state.models[header["handle"]]
    return {}, None


def op_shutdown(state, header, arrays):
    return {}, None


HANDLERS = {"ping": op_ping, "echo": op_echo, "load": op_load, "eval": op_eval,
            "bench": op_bench, "nodes": op_nodes, "unload": op_unload, "shutdown": op_shutdown}


# ---------------------------------------------------------------------------------------------
# Loop


def error_reply(type_, message, detail=""):
    return {"ok": False, "type": type_, "message": message, "detail": detail}


def handle(state, header, arrays):
    op = header.get("op")
    handler = HANDLERS.get(op) if isinstance(op, str) else None
    try:
        if handler is None:
            raise _protocol_error("unknown op %r (known: %s)" % (op, ", ".join(sorted(HANDLERS))))
        fields, out = handler(state, header, arrays)
        reply = {"ok": True}
        reply.update(fields)
        return reply, out
    except RequestError as exc:
        return error_reply(exc.type, exc.message, exc.detail), None
    except Exception as exc:
        return error_reply("InternalError", "%s: %s" % (type(exc).__name__, exc),
                           traceback.format_exc()), None


def serve(frames_in, frames_out, facts):
    reader = protocol.FrameReader(io.FileIO(frames_in, "rb", closefd=False).readinto)
    write = io.FileIO(frames_out, "wb", closefd=False).write
    state = State(facts)
    while True:
        try:
            header, arrays = reader.read_frame()
        except protocol.StreamClosed:
            return 0  # the host went away
        except protocol.ProtocolViolation as exc:
            reply = error_reply("ProtocolError", str(exc))
            request = exc.header or {}
            reply.update(id=request.get("id"), op=request.get("op"))
            protocol.write_frame(write, reply)
            continue
        reply, out = handle(state, header, arrays)
        del arrays  # the request's payload buffer can go before the reply is built
        reply.update(id=header.get("id"), op=header.get("op"))
        try:
            buffers = protocol.encode_frame(reply, out)
        except Exception as exc:
            reply = error_reply("InternalError", "cannot encode the reply: %s: %s"
                                % (type(exc).__name__, exc), traceback.format_exc())
            reply.update(id=header.get("id"), op=header.get("op"))
            buffers = protocol.encode_frame(reply)
        protocol.write_all(write, buffers)
        if header.get("op") == "shutdown" and reply.get("ok"):
            return 0


def main():
    # Ctrl-C in a terminal reaches the whole process group; the host decides when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    frames_in, frames_out = protect_stdio()
    write = io.FileIO(frames_out, "wb", closefd=False).write
    global cntk
    cntk, facts, failure = import_cntk()
    base = {"op": "hello", "id": 0, "protocol": protocol.PROTOCOL_VERSION, "pid": os.getpid(),
            "python": sys.version.split()[0], "executable": sys.executable,
            "numpy": np.__version__}
    base.update(facts)
    if failure is not None:
        base.update(failure)
        protocol.write_frame(write, base)
        return EXIT_IMPORT_FAILED
    facts.update(python=base["python"], executable=sys.executable, numpy=np.__version__,
                 cntk=cntk.__version__, devices=device_names(),
                 protocol=protocol.PROTOCOL_VERSION)
    base.update(facts)
    base["ok"] = True
    protocol.write_frame(write, base)
    return serve(frames_in, frames_out, facts)


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # skip interpreter teardown: CNTK's native destructors are not worth the risk at exit
    os._exit(code)
