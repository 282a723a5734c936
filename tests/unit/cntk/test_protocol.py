"""The worker's framed protocol, in process (no CNTK needed)."""
from __future__ import annotations

import io
import struct

import numpy as np
import pytest

from pytest_tf2cntk.cntk.worker import protocol


def _read_all(data: bytes) -> list:
    stream = io.BytesIO(data)
    reader = protocol.FrameReader(stream.readinto)
    out = []
    while True:
        try:
            out.append(reader.read_frame())
        except protocol.StreamClosed:
            return out
        except protocol.ProtocolViolation as exc:
            out.append(exc)


def test_protocol_frames_round_trip_in_process():
    arrays = {"a": np.arange(6, dtype="<f4").reshape(2, 3), "b": np.float64(2.5),
              "c": np.zeros((0, 4), np.int8)}
    data = b"".join(bytes(b) for b in protocol.encode_frame({"op": "x", "k": [1, 2]}, arrays))
    [(header, got)] = _read_all(data)
    assert header["op"] == "x" and header["k"] == [1, 2]
    for name, value in arrays.items():
        assert got[name].dtype == np.asarray(value).dtype
        np.testing.assert_array_equal(got[name], value)
    assert all(e["offset"] % protocol.ALIGN == 0 for e in header["arrays"] if e["nbytes"])


def test_protocol_resynchronises_after_garbage():
    good = b"".join(bytes(b) for b in protocol.encode_frame({"op": "ping"}))
    # garbage shorter than a prefix, garbage containing a partial magic, a bad length
    bad_len = struct.pack("<4sIQ", protocol.MAGIC, protocol.MAX_HEADER_BYTES + 1, 0)
    frames = _read_all(b"xyz" + good + b"JUNK" * 10 + b"T2C" + good + bad_len + good)
    kinds = [type(f).__name__ if isinstance(f, Exception) else f[0]["op"] for f in frames]
    assert kinds == ["BadMagic", "ping", "BadMagic", "ping", "ProtocolViolation", "ping"]


def test_protocol_rejects_object_arrays():
    with pytest.raises(TypeError, match="dtype object"):
        protocol.encode_frame({"op": "echo"}, {"o": np.array([{}], dtype=object)})
