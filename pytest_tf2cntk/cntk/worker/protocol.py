"""Framing between the host and the CNTK worker. The ONE implementation, used by both sides.

Must run on the worker (CPython 3.6, numpy 1.19) and on the host (3.11, numpy 2): stdlib,
numpy, no annotations syntax 3.6 lacks.

A frame is::

    prefix   16 bytes  "<4sIQ": MAGIC, header length, payload length (little-endian)
    header   UTF-8 JSON object
    payload  raw bytes

Arrays travel in the payload as raw C-order little-endian bytes, described by the header's
``"arrays"`` list of ``{"name", "dtype", "shape", "offset", "nbytes"}`` (dtype is numpy's
``dtype.str``, e.g. ``"<f4"``). Offsets are 64-byte aligned so received arrays are aligned
views into one buffer: no pickle, no per-element work, no copy after ``readinto``.
"""
import json
import struct

import numpy as np

MAGIC = b"T2CK"
PROTOCOL_VERSION = 1
PREFIX = struct.Struct("<4sIQ")
PREFIX_SIZE = PREFIX.size
MAX_HEADER_BYTES = 16 << 20
MAX_PAYLOAD_BYTES = 1 << 40
ALIGN = 64
# bool, signed, unsigned, float, complex: plain bytes on the wire; never object/structured.
ARRAY_KINDS = "biufc"

_ZEROS = bytes(ALIGN)
_SMALL = 256 << 10  # buffers below this are joined so a small frame is one write()
_CHUNK = 64 << 10


class ProtocolViolation(Exception):
    """A frame that cannot be decoded. ``header`` is the decoded header when there was one
    (so a reply can echo its ``id``); ``synced`` says whether the stream is still aligned."""

    def __init__(self, message, header=None, synced=True):
        Exception.__init__(self, message)
        self.header = header
        self.synced = synced


class BadMagic(ProtocolViolation):
    """The bytes where a prefix should be are not one; the reader rescans for MAGIC next."""


class StreamClosed(EOFError):
    """End of stream; ``partial`` is True when it ended inside a frame."""

    def __init__(self, message, partial=False):
        EOFError.__init__(self, message)
        self.partial = partial


# ---------------------------------------------------------------------------------------------
# Encoding


def wire_array(value):
    """``value`` as a C-contiguous little-endian ndarray of a supported dtype (copies only when
    it has to: non-contiguous or big-endian input)."""
    a = np.asarray(value)
    if a.dtype.kind not in ARRAY_KINDS or a.dtype.fields is not None:
        raise TypeError("cannot send an array of dtype %s (only bool/int/uint/float/complex)"
                        % (a.dtype,))
    little = a.dtype.newbyteorder("<")
    if a.dtype != little:
        a = a.astype(little)
    if not a.flags.c_contiguous:
        a = a.copy(order="C")  # keeps 0-d arrays 0-d, unlike ascontiguousarray on numpy 1.x
    return a


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (tuple, set, frozenset)):
        return list(obj)
    raise TypeError("%r is not JSON serialisable" % (obj,))


def encode_header(header):
    return json.dumps(header, separators=(",", ":"), default=_json_default).encode("utf-8")


def encode_frame(header, arrays=None):
    """The frame as a list of buffers (big arrays as memoryviews, never concatenated)."""
    entries = []
    parts = []
    offset = 0
    for name, value in (arrays or {}).items():
        a = wire_array(value)
        pad = -offset % ALIGN
        if pad and a.nbytes:
            parts.append(memoryview(_ZEROS)[:pad])
            offset += pad
        entries.append({"name": str(name), "dtype": a.dtype.str, "shape": list(a.shape),
                        "offset": offset, "nbytes": int(a.nbytes)})
        if a.nbytes:
            parts.append(memoryview(a.reshape(-1).view(np.uint8)))
            offset += a.nbytes
    header = dict(header)
    header["arrays"] = entries
    head = encode_header(header)
    if len(head) > MAX_HEADER_BYTES:
        raise ValueError("frame header of %d bytes is over the %d limit"
                         % (len(head), MAX_HEADER_BYTES))
    buffers = [PREFIX.pack(MAGIC, len(head), offset), head] + parts
    return _coalesce(buffers)


def _coalesce(buffers):
    out = []
    small = []
    for buf in buffers:
        if len(buf) < _SMALL:
            small.append(buf)
            continue
        if small:
            out.append(b"".join(small))
            small = []
        out.append(buf)
    if small:
        out.append(b"".join(small))
    return out


def write_all(write, buffers):
    """Write every buffer; ``write(memoryview) -> n`` may write less than asked."""
    for buf in buffers:
        view = memoryview(buf)
        while len(view):
            n = write(view)
            if n is None:
                n = 0  # a non-blocking fd that was not ready: the writer retries
            view = view[n:]


def write_frame(write, header, arrays=None):
    write_all(write, encode_frame(header, arrays))


# ---------------------------------------------------------------------------------------------
# Decoding


def decode_arrays(entries, payload, header=None):
    """Arrays described by ``entries`` as views of ``payload`` (a uint8 ndarray)."""
    if not isinstance(entries, list):
        raise ProtocolViolation("header field 'arrays' must be a list", header)
    out = {}
    size = len(payload)
    for entry in entries:
        try:
            name = entry["name"]
            dtype = np.dtype(str(entry["dtype"]))
            shape = tuple(int(d) for d in entry["shape"])
            offset = int(entry["offset"])
            nbytes = int(entry["nbytes"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolViolation("bad array entry %r: %s" % (entry, exc), header)
        if dtype.kind not in ARRAY_KINDS or dtype.fields is not None:
            raise ProtocolViolation("array %r: unsupported dtype %s" % (name, dtype), header)
        count = 1
        for d in shape:
            if d < 0:
                raise ProtocolViolation("array %r: negative dimension in %s" % (name, shape),
                                        header)
            count *= d
        if nbytes != count * dtype.itemsize or offset < 0 or offset + nbytes > size:
            raise ProtocolViolation("array %r: %d bytes at offset %d do not fit shape %s %s "
                                    "in a %d-byte payload"
                                    % (name, nbytes, offset, shape, dtype.str, size), header)
        if count == 0:
            out[name] = np.empty(shape, dtype)
        else:
            out[name] = np.frombuffer(payload, dtype=dtype, count=count,
                                      offset=offset).reshape(shape)
    return out


class FrameReader(object):
    """Reads frames from ``recv_into(memoryview) -> n`` (0 at end of stream).

    After a bad prefix it raises ``BadMagic`` once, then the next ``read_frame`` scans forward to
    the next MAGIC, so one garbage burst costs one error reply, not a dead stream.
    """

    def __init__(self, recv_into):
        self._recv_into = recv_into
        self._pending = b""
        self._desynced = False
        self._scratch = bytearray(_CHUNK)

    def _recv(self, view):
        n = self._recv_into(view)
        return 0 if n is None else n

    def _fill(self, view, at_boundary=False):
        """Fill ``view`` completely from pending bytes, then the stream."""
        got = 0
        want = len(view)
        if self._pending:
            take = min(want, len(self._pending))
            view[:take] = self._pending[:take]
            self._pending = self._pending[take:]
            got = take
        while got < want:
            rest = want - got
            if rest < _CHUNK:
                # read ahead: the prefix, header and small payload usually arrive together
                n = self._recv(memoryview(self._scratch))
                if n:
                    take = min(n, rest)
                    view[got:got + take] = self._scratch[:take]
                    if n > take:
                        self._pending = bytes(self._scratch[take:n])
            else:
                n = self._recv(view[got:])
            if not n:
                raise StreamClosed("stream closed", partial=not (at_boundary and got == 0))
            got += min(n, rest)

    def _scan(self):
        """Drop bytes until the stream starts with MAGIC."""
        buf = self._pending
        self._pending = b""
        while True:
            idx = buf.find(MAGIC)
            if idx >= 0:
                self._pending = buf[idx:]
                self._desynced = False
                return
            keep = buf[-(len(MAGIC) - 1):] if len(buf) >= len(MAGIC) else buf
            n = self._recv(memoryview(self._scratch))
            if not n:
                raise StreamClosed("stream closed while resynchronising", partial=True)
            buf = bytes(keep) + bytes(self._scratch[:n])

    def read_frame(self):
        """(header dict, {name: ndarray}) of the next frame."""
        if self._desynced:
            self._scan()
        prefix = bytearray(PREFIX_SIZE)
        self._fill(memoryview(prefix), at_boundary=True)
        magic, head_len, payload_len = PREFIX.unpack(bytes(prefix))
        if magic != MAGIC:
            self._desynced = True
            self._pending = bytes(prefix[1:]) + self._pending
            raise BadMagic("bad frame magic %r (expected %r); skipping to the next frame"
                           % (bytes(magic), MAGIC), synced=False)
        if head_len > MAX_HEADER_BYTES or payload_len > MAX_PAYLOAD_BYTES:
            self._desynced = True
            self._pending = bytes(prefix[1:]) + self._pending
            raise ProtocolViolation("frame lengths out of range (header %d, payload %d bytes)"
                                    % (head_len, payload_len), synced=False)
        head = bytearray(head_len)
        self._fill(memoryview(head))
        payload = self._read_payload(payload_len)
        try:
            header = json.loads(head.decode("utf-8"))
        except ValueError as exc:  # includes UnicodeDecodeError and JSONDecodeError
            raise ProtocolViolation("frame header is not UTF-8 JSON: %s" % (exc,))
        if not isinstance(header, dict):
            raise ProtocolViolation("frame header is JSON but not an object")
        if payload is None:
            raise ProtocolViolation("no memory for a %d-byte payload" % payload_len, header)
        arrays = decode_arrays(header.get("arrays", []), payload, header)
        return header, arrays

    def _read_payload(self, size):
        try:
            payload = np.empty(size, dtype=np.uint8)
        except MemoryError:
            # consume it anyway so the stream stays aligned
            sink = memoryview(bytearray(_CHUNK))
            while size:
                step = min(size, _CHUNK)
                self._fill(sink[:step])
                size -= step
            return None
        if size:
            self._fill(memoryview(payload))
        return payload
