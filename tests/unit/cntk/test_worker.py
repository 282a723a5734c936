"""The CNTK worker and its client, against the real CNTK 2.7 environment (no mocks)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pytest_tf2cntk.cntk.env import default_env_dir, env_python
from pytest_tf2cntk.errors import (CNTKError, DeviceUnavailable, EnvironmentProblem, ProtocolError,
                                   WorkerCrashed, WorkerTimeout)
from pytest_tf2cntk.cntk.worker import protocol
from pytest_tf2cntk.cntk.client import CNTKWorker, LoadedModel, get_worker

pytestmark = pytest.mark.needs_cntk

RNG = np.random.default_rng(0)


# ---------------------------------------------------------------------------------------------
# ONNX models (opset 9, IR version 4: what CNTK 2.7 imports)


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)],
                              producer_name="test_worker")
    model.ir_version = 4
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _vi(name: str, shape: list, elem=TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


MLP_W = (RNG.standard_normal((3, 4)) * 0.5).astype(np.float32)
MLP_B = np.array([0.1, -0.2, 0.3, -0.4], np.float32)


def mlp_reference(x: np.ndarray) -> dict[str, np.ndarray]:
    mm = x @ MLP_W
    return {"mm": mm, "pre": mm + MLP_B, "y": np.maximum(mm + MLP_B, 0)}


def build_mlp(path: Path) -> Path:
    """x[2,3] -MatMul(W)-> mm -Add(b)-> pre -Relu-> y, every node named."""
    return _save(helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["mm"], name="matmul1"),
         helper.make_node("Add", ["mm", "b"], ["pre"], name="add1"),
         helper.make_node("Relu", ["pre"], ["y"], name="relu1")],
        "mlp", [_vi("x", [2, 3])], [_vi("y", [2, 4])],
        [numpy_helper.from_array(MLP_W, "W"), numpy_helper.from_array(MLP_B, "b")]), path)


def build_two(path: Path) -> Path:
    """Two inputs, three outputs listed in an order CNTK does not keep; two nodes unnamed."""
    return _save(helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["s"]),                  # unnamed on purpose
         helper.make_node("Mul", ["s", "b"], ["p"]),                  # unnamed, internal
         helper.make_node("Relu", ["p"], ["r"], name="relu"),
         helper.make_node("Sigmoid", ["r"], ["q"], name="sig")],
        "two", [_vi("a", [2, 3]), _vi("b", [2, 3])],
        [_vi("q", [2, 3]), _vi("r", [2, 3]), _vi("s", [2, 3])]), path)


def two_reference(a: np.ndarray, b: np.ndarray) -> dict[str, np.ndarray]:
    s = a + b
    p = s * b
    r = np.maximum(p, 0)
    return {"s": s, "p": p, "r": r, "q": 1 / (1 + np.exp(-r))}


def build_slow(path: Path, n: int = 1024, depth: int = 24) -> Path:
    """A chain of n x n MatMul + Tanh: about 0.5 s per eval on two cores."""
    w = (RNG.standard_normal((n, n)) / np.sqrt(n)).astype(np.float32)
    nodes, prev = [], "x"
    for i in range(depth):
        nodes += [helper.make_node("MatMul", [prev, "W"], [f"m{i}"], name=f"mm{i}"),
                  helper.make_node("Tanh", [f"m{i}"], [f"t{i}"], name=f"tanh{i}")]
        prev = f"t{i}"
    return _save(helper.make_graph(nodes, "slow", [_vi("x", [n, n])], [_vi(prev, [n, n])],
                                   [numpy_helper.from_array(w, "W")]), path)


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("worker_models")
    return {"mlp": build_mlp(d / "mlp.onnx"), "two": build_two(d / "two.onnx")}


@pytest.fixture(scope="module")
def worker():
    """One worker for the tests that leave it alive (destructive tests start their own)."""
    with CNTKWorker(timeout=60) as w:
        yield w


def _frame(header_bytes: bytes, payload: bytes = b"") -> bytes:
    prefix = protocol.PREFIX.pack(protocol.MAGIC, len(header_bytes), len(payload))
    return prefix + header_bytes + payload


# ---------------------------------------------------------------------------------------------
# Protocol (host-only, no worker)


def test_ping_reports_versions_and_captured_import_warnings(worker):
    info = worker.ping()
    assert info["cntk"] == "2.7"
    assert info["python"].startswith("3.6.")
    assert info["numpy"].startswith("1.")
    assert info["pid"] == worker.pid
    assert "cpu" in info["devices"]
    # cntk warns on import (distro, GPU libraries); captured, not shown
    assert any(w["category"] == "UserWarning" for w in info["import_warnings"])


ECHO_CASES = {
    "f16": np.array([1.5, -2.0, np.inf], np.float16),
    "f32": RNG.standard_normal((3, 4)).astype(np.float32),
    "f64": RNG.standard_normal((2, 3, 4)),
    "i8": np.array([-128, 0, 127], np.int8),
    "i32": np.arange(-5, 7, dtype=np.int32).reshape(3, 4),
    "i64": np.array([2 ** 62, -(2 ** 62)], np.int64),
    "u8": np.arange(256, dtype=np.uint8),
    "bool": np.array([[True, False], [False, True]]),
    "scalar0d": np.array(3.25, np.float32),
    "bool0d": np.array(True),
    "empty": np.zeros((0,), np.float32),
    "empty3d": np.zeros((3, 0, 2), np.int64),
    "transposed": np.arange(12, dtype=np.float32).reshape(3, 4).T,
    "strided": np.arange(40, dtype=np.float64).reshape(5, 8)[::2, 1::3],
    "fortran": np.asfortranarray(RNG.standard_normal((4, 5)).astype(np.float32)),
    "bigendian_f4": np.arange(6, dtype=">f4").reshape(2, 3),
    "bigendian_i8": np.array([1, -2, 3 << 40], dtype=">i8"),
    "big_3mib": RNG.standard_normal(3 * (1 << 18)).astype(np.float32),
}


def test_echo_round_trips_dtypes_and_shapes(worker):
    got = worker.echo(ECHO_CASES)
    assert list(got) == list(ECHO_CASES)
    for name, sent in ECHO_CASES.items():
        back = got[name]
        assert back.shape == sent.shape, name
        assert back.dtype == sent.dtype.newbyteorder("<"), name  # wire is little-endian
        assert back.flags.c_contiguous and back.flags.aligned, name
        np.testing.assert_array_equal(back, sent, err_msg=name)


def test_echo_layout_seen_by_the_worker(worker):
    reply, _ = worker.request("echo", {"x": np.ones((2, 3), ">f8"), "e": np.zeros(0, np.uint8)})
    layout = {r["name"]: r for r in reply["received"]}
    assert layout["x"] == {"name": "x", "dtype": "<f8", "shape": [2, 3], "aligned": True,
                           "writeable": True}
    assert layout["e"]["shape"] == [0]


def test_stdout_noise_in_the_worker_cannot_corrupt_frames(worker):
    pid = worker.ping()["pid"]  # started (it starts lazily), so the same process is compared after
    got = worker.echo({"v": np.arange(3)}, stdout_noise="T2CK noise printed on fd 1")
    np.testing.assert_array_equal(got["v"], np.arange(3))
    assert worker.ping()["pid"] == pid == worker.pid
    import time

    deadline = time.monotonic() + 10  # stderr is read by a thread: on a busy machine it lags the reply
    while "T2CK noise printed on fd 1" not in worker.stderr_tail(20) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "T2CK noise printed on fd 1" in worker.stderr_tail(20)


# ---------------------------------------------------------------------------------------------
# Models


def test_eval_mlp_matches_numpy(worker, models):
    model = worker.load(models["mlp"])
    assert isinstance(model, LoadedModel)
    assert [(t.name, t.shape, t.dtype) for t in model.inputs] == [("x", (2, 3), np.float32)]
    assert [(t.name, t.shape, t.cntk_name) for t in model.outputs] == [("y", (2, 4), "relu1")]
    x = RNG.standard_normal((2, 3)).astype(np.float32)
    got = worker.eval(model, {"x": x})
    assert list(got) == ["y"]
    np.testing.assert_allclose(got["y"], mlp_reference(x)["y"], rtol=1e-5, atol=1e-6)


def test_eval_async_returns_a_future(worker, models):
    model = worker.load(models["mlp"])
    xs = [RNG.standard_normal((2, 3)).astype(np.float32) for _ in range(3)]
    futures = [worker.eval_async(model, {"x": x}) for x in xs]
    for x, future in zip(xs, futures):
        np.testing.assert_allclose(future.result(timeout=30)["y"], mlp_reference(x)["y"],
                                   rtol=1e-5, atol=1e-6)
    bad = worker.eval_async(model, {"nope": xs[0]})
    with pytest.raises(ProtocolError, match="no input 'nope'"):
        bad.result(timeout=30)


def test_eval_two_inputs_maps_outputs_back_to_onnx_names(worker, models):
    model = worker.load(models["two"])
    assert model.input_names == ["a", "b"]
    assert model.output_names == ["q", "r", "s"]  # ONNX order, not CNTK's
    # every output, also 's' of an unnamed node, is tied to CNTK through its marker
    assert {t.name: t.matched for t in model.outputs} == {"q": "marker", "r": "marker", "s": "marker"}
    a, b = (RNG.standard_normal((2, 3)).astype(np.float32) for _ in range(2))
    ref = two_reference(a, b)
    got = worker.eval(model.handle, {"a": a, "b": b})
    for name in ("q", "r", "s"):
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_eval_internal_tensors_by_onnx_name_node_name_and_uid(worker, models):
    model = worker.load(models["mlp"])
    x = RNG.standard_normal((2, 3)).astype(np.float32)
    ref = mlp_reference(x)
    nodes = worker.nodes(model)
    add = next(n for n in nodes if n.name == "add1")
    assert add.onnx_outputs == ["pre"] and add.op_name == "Plus"
    assert {n.name: n.onnx_outputs for n in nodes}["matmul1"] == ["mm"]
    wanted = ["mm", "pre", "y", "add1", add.outputs[0].cntk_uid, "x"]
    got = worker.eval(model, {"x": x}, outputs=wanted)
    assert list(got) == wanted
    np.testing.assert_allclose(got["mm"], ref["mm"], rtol=1e-5, atol=1e-6)
    for name in ("pre", "add1", add.outputs[0].cntk_uid):
        np.testing.assert_allclose(got[name], ref["pre"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["y"], ref["y"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got["x"], x)


def test_errors_are_typed_and_the_worker_survives(worker, models, tmp_path):
    pid = worker.pid or worker.ping()["pid"]
    two = worker.load(models["two"])
    a = np.ones((2, 3), np.float32)
    with pytest.raises(CNTKError) as missing:
        worker.eval(two, {"a": a})  # b is required
    assert missing.value.message.startswith("Values for 1 required arguments")
    assert "[CALL STACK]" not in missing.value.message and "[CALL STACK]" in missing.value.detail
    with pytest.raises(ProtocolError, match="no input 'zzz'"):
        worker.eval(two, {"a": a, "b": a, "zzz": a})
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not onnx")
    with pytest.raises(CNTKError, match="Failed to load model"):
        worker.load(garbage)
    with pytest.raises(CNTKError, match="neither a file"):
        worker.load(tmp_path / "missing.onnx")
    if "gpu:0" not in worker.ping()["devices"]:
        with pytest.raises(DeviceUnavailable, match="Specified GPU device id \\(0\\) is invalid"):
            worker.load(models["mlp"], device="gpu:0")
    with pytest.raises(ProtocolError, match="device must be"):
        worker.load(models["mlp"], device="tpu")
    assert worker.ping()["pid"] == pid
    # CNTK's C++ chatter went to the stderr ring, not into the frame stream
    assert "About to throw exception" in worker.stderr_tail(200)


def test_unnamed_internal_tensor_is_a_clear_error(worker, models):
    two = worker.load(models["two"])
    a = np.ones((2, 3), np.float32)
    ref = two_reference(a, a)
    # graph outputs and tensors of named nodes resolve; 's' is an output of an unnamed node
    got = worker.eval(two, {"a": a, "b": a}, outputs=["relu", "s"])
    np.testing.assert_allclose(got["relu"], ref["r"])
    np.testing.assert_allclose(got["s"], ref["s"])
    # 'p' is internal and its node is unnamed: CNTK kept no name to find it by
    with pytest.raises(ProtocolError, match="unnamed Mul node"):
        worker.eval(two, {"a": a, "b": a}, outputs=["p"])
    with pytest.raises(ProtocolError, match="no output, ONNX tensor, node or uid named 'nope'"):
        worker.eval(two, {"a": a, "b": a}, outputs=["nope"])


def test_unload_forgets_the_handle(worker, models):
    model = worker.load(models["mlp"])
    worker.unload(model)
    with pytest.raises(ProtocolError, match="unknown model handle"):
        worker.eval(model, {"x": np.ones((2, 3), np.float32)})


# ---------------------------------------------------------------------------------------------
# Malformed input: an error reply, same worker afterwards


def test_malformed_frames_get_error_replies_from_the_same_worker(worker):
    pid = worker.ping()["pid"]
    cases = {
        "not json": _frame(b"{this is not json", b"payload"),
        "json, not an object": _frame(b"[1, 2, 3]"),
        "array out of payload": _frame(json.dumps({"op": "echo", "id": 7, "arrays": [
            {"name": "a", "dtype": "<f4", "shape": [4], "offset": 0, "nbytes": 16}]}).encode(),
            b"\0" * 8),
        "unknown op": _frame(json.dumps({"op": "explode", "id": 8}).encode()),
        "missing field": _frame(json.dumps({"op": "load", "id": 9}).encode()),
        "bad handle": _frame(json.dumps({"op": "eval", "id": 10, "handle": 999}).encode()),
        "bad magic": b"JUNK" * 8,
        "absurd header length": struct.pack("<4sIQ", protocol.MAGIC, 1 << 31, 0),
    }
    expected = {"not json": "not UTF-8 JSON", "json, not an object": "not an object",
                "array out of payload": "do not fit", "unknown op": "unknown op 'explode'",
                "missing field": "lacks the field 'path'", "bad handle": "no model with handle 999",
                "bad magic": "bad frame magic", "absurd header length": "out of range"}
    for name, data in cases.items():
        reply = worker.send_raw(data, timeout=10)
        assert reply["ok"] is False, name
        assert reply["type"] == "ProtocolError", name
        assert expected[name] in reply["message"], (name, reply["message"])
        assert worker.ping()["pid"] == pid, name
    with pytest.raises(ProtocolError, match="unknown op"):
        worker.request("explode")
    assert worker.pid == pid


# ---------------------------------------------------------------------------------------------
# Death, hangs, restarts


def test_kill_9_during_eval_raises_crashed_and_next_eval_reloads(models, tmp_path):
    slow = build_slow(tmp_path / "slow.onnx")
    with CNTKWorker(timeout=60) as w:
        mlp = w.load(models["mlp"])
        model = w.load(slow)
        x = RNG.standard_normal((1024, 1024)).astype(np.float32)
        caught: list[BaseException] = []

        def run() -> None:
            try:
                w.eval(model, {"x": x})
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                caught.append(exc)

        thread = threading.Thread(target=run)
        thread.start()
        deadline = time.monotonic() + 30
        while w.in_flight != "eval" and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(0.1)  # inside CNTK's eval by now (it takes ~0.5 s)
        old_pid = w.pid
        os.kill(old_pid, signal.SIGKILL)
        thread.join(30)
        assert len(caught) == 1 and isinstance(caught[0], WorkerCrashed), caught
        assert "killed by SIGKILL" in str(caught[0])
        assert caught[0].returncode == -signal.SIGKILL
        # the next call starts a new worker and reloads the model under the same handle
        x2 = RNG.standard_normal((2, 3)).astype(np.float32)
        got = w.eval(mlp, {"x": x2})
        assert w.pid != old_pid
        np.testing.assert_allclose(got["y"], mlp_reference(x2)["y"], rtol=1e-5, atol=1e-6)


def test_sigstop_hang_times_out_and_is_replaced(models):
    with CNTKWorker(timeout=60) as w:
        model = w.load(models["mlp"])
        old_pid = w.pid
        os.kill(old_pid, signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(WorkerTimeout, match="did not answer 'eval' within 1 s"):
            w.eval(model, {"x": np.ones((2, 3), np.float32)}, timeout=1.0)
        assert time.monotonic() - started < 1.0 + 1.5
        with pytest.raises(ProcessLookupError):
            os.kill(old_pid, 0)  # killed and reaped
        x = RNG.standard_normal((2, 3)).astype(np.float32)
        got = w.eval(model, {"x": x})
        assert w.pid != old_pid
        np.testing.assert_allclose(got["y"], mlp_reference(x)["y"], rtol=1e-5, atol=1e-6)


def test_shutdown_exits_zero_and_handles_survive(models):
    w = CNTKWorker(timeout=60)
    model = w.load(models["mlp"])
    assert w.shutdown() == 0
    assert w.pid is None
    x = np.ones((2, 3), np.float32)
    np.testing.assert_allclose(w.eval(model, {"x": x})["y"], mlp_reference(x)["y"], rtol=1e-5)
    assert w.starts == 2
    w.close()


# ---------------------------------------------------------------------------------------------
# Broken environments


def test_missing_python_is_an_environment_problem():
    with pytest.raises(EnvironmentProblem, match="/nonexistent/python"):
        CNTKWorker(python="/nonexistent/python").ping()


def test_missing_libmpi_is_an_environment_problem(tmp_path, monkeypatch):
    """A venv layout whose mpi-compat folder is empty: cntk finds no libmpi.so.12."""
    real = default_env_dir()
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").symlink_to(real / "bin" / "python")
    shutil.copy(real / "pyvenv.cfg", tmp_path / "pyvenv.cfg")  # makes it a venv, so cntk imports
    (tmp_path / "lib").symlink_to(real / "lib")
    (tmp_path / "mpi-compat").mkdir()  # its own, empty: no fallback to the working one
    monkeypatch.delenv("LD_LIBRARY_PATH", raising=False)
    with pytest.raises(EnvironmentProblem) as problem:
        CNTKWorker(python=tmp_path / "bin" / "python").ping()
    text = str(problem.value)
    assert "libmpi" in text and "libopenmpi3" in text and "tf2cntk setup" in text


def test_interpreter_without_cntk_is_an_environment_problem():
    """The host's own python (numpy, no cntk) runs the worker but cannot import cntk: a failed hello."""
    with pytest.raises(EnvironmentProblem, match="cntk is not installed in"):
        CNTKWorker(python=sys.executable).ping()


def test_interpreter_without_numpy_dies_before_hello(tmp_path):
    """A python without numpy (a bare venv, made here) dies before its first frame; stderr names
    what is missing."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "bare")], check=True)
    bare = tmp_path / "bare" / "bin" / "python"
    assert subprocess.run([str(bare), "-c", "import numpy"], capture_output=True).returncode != 0
    with pytest.raises(EnvironmentProblem, match="numpy is not installed"):
        CNTKWorker(python=bare).ping()


def test_get_worker_is_shared_per_interpreter():
    assert get_worker() is get_worker()
    assert get_worker() is get_worker(str(env_python(default_env_dir())))
