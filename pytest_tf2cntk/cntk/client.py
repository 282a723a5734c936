"""Host side of the CNTK worker: start it, talk to it, survive its death.

The worker (``worker/server.py``) runs in the CNTK Python 3.6 environment and speaks the framed
protocol of ``worker/protocol.py`` over its stdin/stdout. ``CNTKWorker`` starts it lazily on the
first call, gives every call a deadline (a hung worker is killed and ``WorkerTimeout`` raised),
turns worker death into ``WorkerCrashed`` and error replies into typed exceptions.

Handles survive restarts: ``load`` returns a ``LoadedModel`` whose ``handle`` belongs to this
client, not to a worker process. The client remembers each model's path and device; when a
worker dies (crash, timeout, ``shutdown``), the next ``eval``/``nodes`` on that handle starts a
new worker and loads the model again into it, mapping the client handle to the new worker
handle. A reloaded model whose inputs/outputs differ from the first load (the file changed)
raises ``ProtocolError`` instead of silently answering for a different model.
"""
from __future__ import annotations

import atexit
import concurrent.futures
import itertools
import os
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from pytest_tf2cntk.cntk.env import resolve_cntk_python, worker_environ
from pytest_tf2cntk.cntk.process import (Deadline, StderrRing, WorkerProcess, describe_exit, environment_problem,
                                         error_from_reply)
from pytest_tf2cntk.cntk.worker import protocol
from pytest_tf2cntk.errors import EnvironmentProblem, ProtocolError, WorkerCrashed, WorkerError, WorkerTimeout

SERVER_SCRIPT = Path(__file__).resolve().parent / "worker" / "server.py"
DEFAULT_TIMEOUT = 300.0   # load / eval / nodes
PING_TIMEOUT = 30.0
START_TIMEOUT = 120.0     # interpreter start + `import cntk` (about 0.5 s when warm)
STDERR_LINES = 2000
CRASH_TAIL_LINES = 20
_MARK = "[tf2cntk]"  # the client's own lines in the stderr ring (start-up markers)


@dataclass(frozen=True)
class CntkTensor:
    """One input or output of a model loaded in CNTK; ``shape`` has None for free (batch) dimensions."""
    name: str
    shape: tuple[int | None, ...]
    dtype: np.dtype
    cntk_name: str = ""
    cntk_uid: str = ""
    matched: str = ""   # how it was tied to ONNX: "name" (inputs), "marker" (outputs), "order", "cntk"

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> CntkTensor:
        return cls(d["name"], tuple(d["shape"]), np.dtype(d["dtype"]), d.get("cntk_name", ""),
                   d.get("cntk_uid", ""), d.get("matched", ""))

    def signature(self) -> tuple:
        return self.name, self.shape, self.dtype.str


@dataclass(frozen=True)
class LoadedModel:
    """A model loaded through a ``CNTKWorker``; ``handle`` stays valid across worker restarts."""
    handle: int
    path: str
    device: str
    inputs: list[CntkTensor]
    outputs: list[CntkTensor]
    notes: list[str] = field(default_factory=list)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


@dataclass(frozen=True)
class NodeInfo:
    """One function of the loaded CNTK graph (block functions are not opened)."""
    name: str
    uid: str
    op_name: str
    is_block: bool
    inputs: list[str]            # uids of the variables it reads
    outputs: list[CntkTensor]    # name = CNTK output name, cntk_uid = the output's uid
    onnx_outputs: list[str]      # ONNX tensors of the (named) ONNX node it implements


@dataclass
class _ModelRecord:
    path: str
    device: str
    model: LoadedModel


class CNTKWorker:
    """A CNTK worker process, started on first use and replaced after it dies.

    Thread-safe: calls are serialised (the worker does one request at a time).
    """

    def __init__(self, python: str | os.PathLike | None = None, *,
                 timeout: float = DEFAULT_TIMEOUT, ping_timeout: float = PING_TIMEOUT,
                 start_timeout: float = START_TIMEOUT, stderr_lines: int = STDERR_LINES) -> None:
        self._python_arg = python
        self.timeout = timeout
        self.ping_timeout = ping_timeout
        self.start_timeout = start_timeout
        self._ring = StderrRing(stderr_lines)
        self._lock = threading.RLock()
        self._proc: WorkerProcess | None = None
        self._python: Path | None = None
        self._ids = itertools.count(1)
        self._handles = itertools.count(1)
        self._models: dict[int, _ModelRecord] = {}
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self.in_flight: str | None = None   # op being waited for (for diagnostics and tests)
        self.starts = 0
        self.last_exit: str | None = None   # how the previous worker ended

    # -- life cycle ------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None else None

    @property
    def python(self) -> Path:
        if self._python is None:
            self._python = resolve_cntk_python(self._python_arg)
        return self._python

    @property
    def running(self) -> bool:
        proc = self._proc
        return proc is not None and proc.popen.poll() is None

    def _ensure_started(self) -> WorkerProcess:
        proc = self._proc
        if proc is not None and proc.owner_pid != os.getpid():
            self._proc = proc = None  # forked: the pipes belong to the parent
        if proc is None:
            proc = self._proc = self._start()
        return proc

    def _start(self) -> WorkerProcess:
        python = self.python
        self._ring.add(f"{_MARK} starting CNTK worker: {python} {SERVER_SCRIPT}")
        try:
            popen = subprocess.Popen([str(python), "-u", str(SERVER_SCRIPT)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=worker_environ(python),
                                     bufsize=0, close_fds=True)
        except OSError as exc:
            raise EnvironmentProblem(
                f"Cannot start the CNTK Python interpreter {python}: {exc.strerror or exc}.",
                hint="run `tf2cntk setup`, or give the python of a working CNTK 2.7 venv "
                     "(--tf2cntk-cntk-python)") from exc
        proc = WorkerProcess(popen, self._ring.drain(popen.stderr.fileno()))
        proc.deadline = time.monotonic() + self.start_timeout
        try:
            hello, _ = proc.reader.read_frame()
        except protocol.StreamClosed:
            returncode = proc.kill()
            self.last_exit = describe_exit(returncode)
            raise environment_problem(python, self._tail_since_start(), returncode) from None
        except Deadline:
            proc.kill()
            raise WorkerTimeout(f"The CNTK worker ({python}) did not start within "
                                f"{self.start_timeout:g} s.\n{self._tail_since_start()}",
                                hint="run `tf2cntk doctor`") from None
        except protocol.ProtocolViolation as exc:
            proc.kill()
            raise ProtocolError(f"The CNTK worker ({python}) did not greet with a frame: {exc}",
                                hint="is TF2CNTK_CNTK_PYTHON the CNTK venv's python?") from None
        if not hello.get("ok"):
            returncode = proc.kill()
            text = "\n".join(filter(None, (hello.get("message"), hello.get("detail"),
                                           self._tail_since_start())))
            raise environment_problem(python, text, returncode)
        proc.hello = hello
        self.starts += 1
        self._ring.add(f"{_MARK} CNTK worker pid {proc.pid} ready")
        return proc

    def _tail_since_start(self, n: int = 200) -> str:
        lines = self._ring.tail(n)
        for i in range(len(lines) - 1, -1, -1):
            if lines[i].startswith(f"{_MARK} starting CNTK worker"):
                lines = lines[i + 1:]
                break
        return "\n".join(ln for ln in lines if not ln.startswith(_MARK))

    def _drop(self, proc: WorkerProcess, how: str) -> None:
        if self._proc is proc:
            self._proc = None
        self.last_exit = how

    def close(self) -> None:
        """Kill the worker now (no goodbye). The next call starts a new one."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False)
        proc = self._proc
        if proc is None:
            return
        returncode = proc.kill()
        with self._lock:
            self._drop(proc, f"closed ({describe_exit(returncode)})")

    def shutdown(self, timeout: float = 10.0) -> int | None:
        """Ask the worker to exit; kill it if it does not. Returns its exit code."""
        with self._lock:
            proc = self._proc
            if proc is None:
                return None
            try:
                self._exchange({"op": "shutdown"}, None, timeout)
                returncode = proc.popen.wait(timeout=timeout)
                proc.close_pipes()
            except (WorkerError, subprocess.TimeoutExpired):
                returncode = proc.kill()
            self._drop(proc, f"shut down ({describe_exit(returncode)})")
            return returncode

    def __enter__(self) -> CNTKWorker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # -- diagnostics -----------------------------------------------------------------------

    def stderr_tail(self, n_lines: int = 50) -> str:
        """The last lines the worker(s) wrote to stderr (CNTK's own chatter lands here)."""
        return "\n".join(self._ring.tail(n_lines))

    def diagnostics(self) -> dict[str, Any]:
        proc = self._proc
        return {"python": str(self._python or self._python_arg or ""),
                "pid": proc.pid if proc else None, "running": self.running,
                "starts": self.starts, "last_exit": self.last_exit, "in_flight": self.in_flight,
                "hello": dict(proc.hello) if proc else None,
                "models": {h: r.path for h, r in self._models.items()},
                "stderr_tail": self.stderr_tail(30)}

    # -- the exchange ----------------------------------------------------------------------

    def _exchange(self, header: dict[str, Any], arrays: Mapping[str, Any] | None,
                  timeout: float | None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """One request/reply with a deadline. Caller holds the lock."""
        timeout = self.timeout if timeout is None else timeout
        rid = next(self._ids)
        op = header.get("op", "?")
        buffers = protocol.encode_frame(dict(header, id=rid), arrays)  # bad arrays fail here
        proc = self._ensure_started()
        return self._roundtrip(proc, op, rid, timeout,
                               lambda: protocol.write_all(proc.write, buffers))

    def _roundtrip(self, proc: WorkerProcess, op: str, rid: int | None, timeout: float,
                   send: Callable[[], None], check: bool = True
                   ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        proc.deadline = time.monotonic() + timeout
        self.in_flight = op
        try:
            try:
                send()
            except (BrokenPipeError, ConnectionResetError):
                pass  # it died: reading its output reports how
            reply, arrays = proc.reader.read_frame()
        except Deadline:
            returncode = proc.kill()
            self._drop(proc, f"timed out in {op} ({describe_exit(returncode)})")
            raise WorkerTimeout(
                f"The CNTK worker (pid {proc.pid}) did not answer '{op}' within {timeout:g} s; "
                "it was killed and the next call starts a new one.",
                hint="pass a larger timeout if the model is only slow") from None
        except protocol.StreamClosed:
            raise self._crashed(proc, op) from None
        except protocol.ProtocolViolation as exc:
            proc.kill()
            self._drop(proc, f"sent a bad frame in {op}")
            raise ProtocolError(f"The CNTK worker (pid {proc.pid}) sent a malformed reply to "
                                f"'{op}': {exc}; it was killed.") from None
        except BaseException:
            # interrupted mid-frame (Ctrl-C): the stream position is unknown, start afresh
            proc.kill()
            self._drop(proc, f"interrupted in {op}")
            raise
        finally:
            self.in_flight = None
        if rid is not None and reply.get("id") != rid:
            proc.kill()
            self._drop(proc, "out of sync")
            raise ProtocolError(f"The CNTK worker (pid {proc.pid}) answered request "
                                f"{reply.get('id')!r} while {rid} ('{op}') was expected; it was "
                                "killed.")
        if check and not reply.get("ok"):
            raise error_from_reply(reply)
        reply.pop("arrays", None)  # framing detail, already decoded into `arrays`
        return reply, arrays

    def _crashed(self, proc: WorkerProcess, op: str) -> WorkerCrashed:
        try:
            returncode = proc.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            returncode = None
        returncode = proc.kill() if returncode is None else returncode
        proc.close_pipes()  # joins the stderr thread: the last words are in the ring now
        how = describe_exit(returncode)
        self._drop(proc, f"{how} during {op}")
        tail = self._tail_since_start(200)
        short = "\n".join(tail.splitlines()[-CRASH_TAIL_LINES:])
        message = f"The CNTK worker (pid {proc.pid}) {how} during '{op}'."
        if short:
            message += "\nits last stderr lines:\n" + short
        return WorkerCrashed(message, returncode=returncode, stderr_tail=tail,
                             hint="the next call starts a new worker and reloads the models; "
                                  "if it crashes again, the model itself crashes CNTK")

    # -- raw access (tests, tools) ---------------------------------------------------------

    def request(self, op: str, arrays: Mapping[str, Any] | None = None, *,
                timeout: float | None = None, **fields: Any
                ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Send one request as is (no handle translation); typed error if ``ok`` is false."""
        with self._lock:
            return self._exchange(dict(fields, op=op), arrays, timeout)

    def send_raw(self, data: bytes, timeout: float | None = None) -> dict[str, Any]:
        """Write raw bytes to the worker and return the next reply header as is (no raising)."""
        with self._lock:
            proc = self._ensure_started()
            reply, _ = self._roundtrip(proc, "raw", None, timeout or self.ping_timeout,
                                       lambda: protocol.write_all(proc.write, [data]),
                                       check=False)
            return reply

    # -- operations ------------------------------------------------------------------------

    def ping(self, timeout: float | None = None) -> dict[str, Any]:
        """Versions (python, numpy, cntk), pid, devices, warnings captured importing cntk."""
        reply, _ = self.request("ping", timeout=self.ping_timeout if timeout is None else timeout)
        return reply

    def versions(self) -> dict[str, str]:
        """The CNTK side's versions for reports and the history: cntk, its numpy and Python."""
        info = self.ping()
        return {"cntk": str(info.get("cntk", "")), "cntk_numpy": str(info.get("numpy", "")),
                "cntk_python": str(info.get("python", ""))}

    def echo(self, arrays: Mapping[str, Any], timeout: float | None = None,
             stdout_noise: str | None = None) -> dict[str, np.ndarray]:
        """The arrays as the worker received them, sent back (tests the framing).
        ``stdout_noise`` is printed to the worker's fd 1 first (tests the stdout guard)."""
        fields = {"stdout_noise": stdout_noise} if stdout_noise else {}
        _, out = self.request("echo", arrays, timeout=timeout, **fields)
        return out

    def load(self, onnx_path: str | os.PathLike, device: str = "cpu",
             timeout: float | None = None) -> LoadedModel:
        path = os.path.abspath(os.fspath(onnx_path))
        with self._lock:
            reply, _ = self._exchange({"op": "load", "path": path, "device": device}, None,
                                      timeout)
            handle = next(self._handles)
            model = LoadedModel(handle, path, device,
                                [CntkTensor.from_wire(d) for d in reply["inputs"]],
                                [CntkTensor.from_wire(d) for d in reply["outputs"]],
                                list(reply.get("notes", [])))
            self._models[handle] = _ModelRecord(path, device, model)
            self._ensure_started().handles[handle] = reply["handle"]
            return model

    def _worker_handle(self, model: LoadedModel | int, timeout: float | None) -> int:
        """The handle in the current worker, reloading the model into a new worker if needed."""
        handle = model.handle if isinstance(model, LoadedModel) else int(model)
        record = self._models.get(handle)
        if record is None:
            raise ProtocolError(f"unknown model handle {handle} (unloaded, or from another "
                                "CNTKWorker)")
        proc = self._ensure_started()
        if handle not in proc.handles:
            reply, _ = self._exchange({"op": "load", "path": record.path,
                                       "device": record.device}, None, timeout)
            before = [t.signature() for t in record.model.inputs + record.model.outputs]
            after = [CntkTensor.from_wire(d).signature()
                     for d in reply["inputs"] + reply["outputs"]]
            if before != after:
                raise ProtocolError(f"{record.path} changed since it was loaded (inputs/outputs "
                                    f"were {before}, now {after}); load it again")
            proc = self._ensure_started()
            proc.handles[handle] = reply["handle"]
        return proc.handles[handle]

    def eval(self, model: LoadedModel | int, inputs: Mapping[str, Any],
             outputs: Iterable[str] | None = None, timeout: float | None = None
             ) -> dict[str, np.ndarray]:
        """Evaluate with ``inputs`` keyed by ONNX input name; returns arrays keyed by the
        requested names (default: every graph output). ``outputs`` may name graph outputs,
        internal ONNX tensors of named nodes, CNTK node names or CNTK uids."""
        header: dict[str, Any] = {"op": "eval"}
        if outputs is not None:
            header["outputs"] = list(outputs)
        with self._lock:
            header["handle"] = self._worker_handle(model, timeout)
            _, out = self._exchange(header, inputs, timeout)
            return out

    def eval_async(self, model: LoadedModel | int, inputs: Mapping[str, Any],
                   outputs: Iterable[str] | None = None, timeout: float | None = None
                   ) -> concurrent.futures.Future[dict[str, np.ndarray]]:
        """``eval`` on a helper thread: returns a Future at once so the caller can compute
        something else (TensorFlow) meanwhile; ``.result()`` raises what ``eval`` raises."""
        with self._lock:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix="tf2cntk-eval")
            executor = self._executor
        return executor.submit(self.eval, model, inputs,
                               None if outputs is None else list(outputs), timeout)

    def bench(self, model: LoadedModel | int, inputs: Mapping[str, Any], n: int = 1000,
              outputs: Iterable[str] | None = None, warmup: int = 3,
              timeout: float | None = None) -> list[float]:
        """Seconds per eval measured inside the worker (same code path, no protocol)."""
        header: dict[str, Any] = {"op": "bench", "n": int(n), "warmup": int(warmup)}
        if outputs is not None:
            header["outputs"] = list(outputs)
        with self._lock:
            header["handle"] = self._worker_handle(model, timeout)
            reply, _ = self._exchange(header, inputs, timeout)
            return list(reply["times_s"])

    def nodes(self, model: LoadedModel | int, timeout: float | None = None) -> list[NodeInfo]:
        with self._lock:
            handle = self._worker_handle(model, timeout)
            reply, _ = self._exchange({"op": "nodes", "handle": handle}, None, timeout)
        return [NodeInfo(d["name"], d["uid"], d["op_name"], d["is_block"], list(d["inputs"]),
                         [CntkTensor(o["name"], tuple(o["shape"]), np.dtype(o["dtype"]),
                                     o["name"], o["uid"], "cntk") for o in d["outputs"]],
                         list(d["onnx_outputs"])) for d in reply["nodes"]]

    def unload(self, model: LoadedModel | int, timeout: float | None = None) -> None:
        handle = model.handle if isinstance(model, LoadedModel) else int(model)
        with self._lock:
            if self._models.pop(handle, None) is None:
                raise ProtocolError(f"unknown model handle {handle}")
            proc = self._proc
            if proc is not None and handle in proc.handles:
                self._exchange({"op": "unload", "handle": proc.handles.pop(handle)}, None,
                               timeout)


# ---------------------------------------------------------------------------------------------
# One shared worker per process and interpreter

_shared: dict[str, CNTKWorker] = {}
_shared_lock = threading.Lock()


def get_worker(python: str | os.PathLike | None = None) -> CNTKWorker:
    """The process-wide worker for ``python`` (resolved like ``resolve_cntk_python``); it is
    shut down at interpreter exit. Raises ``EnvironmentProblem`` if there is no interpreter."""
    resolved = str(resolve_cntk_python(python))
    with _shared_lock:
        worker = _shared.get(resolved)
        if worker is None:
            if not _shared:
                atexit.register(_shutdown_shared)
            worker = _shared[resolved] = CNTKWorker(resolved)
        return worker


def _shutdown_shared() -> None:
    with _shared_lock:
        workers = list(_shared.values())
        _shared.clear()
    for worker in workers:
        try:
            worker.shutdown(timeout=5)
        except Exception:
            pass
        worker.close()
