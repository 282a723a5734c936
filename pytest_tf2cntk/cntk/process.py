"""One CNTK worker process seen from the host: its pipes with deadlines, its stderr ring, and
how its exit and its error replies become the package's typed errors."""
from __future__ import annotations

import collections
import fcntl
import os
import select
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Mapping

from pytest_tf2cntk.cntk import env
from pytest_tf2cntk.cntk.worker import protocol
from pytest_tf2cntk.errors import (CNTKError, DeviceUnavailable, EnvironmentProblem, ProtocolError,
                                   WorkerError)

PIPE_SIZE = 1 << 20       # bigger pipes: fewer wake-ups per MiB of array data


class Deadline(Exception):
    pass


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "closed its output"
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


def environment_problem(python: Path, text: str, returncode: int | None) -> EnvironmentProblem:
    """The start-up failure of a worker, named with its fix."""
    return env.environment_problem(
        python, text, f"The CNTK worker ({python}) {describe_exit(returncode)} before it was ready: {{last}}")


def error_from_reply(reply: Mapping[str, Any]) -> Exception:
    kind = reply.get("type", "")
    message = reply.get("message") or kind or "error"
    detail = reply.get("detail", "")
    if kind == "CNTKError":
        return CNTKError(message, detail=detail)
    if kind == "ProtocolError":
        err: Exception = ProtocolError(message)
    elif kind == "DeviceUnavailable":
        err = DeviceUnavailable(message, hint="use device='cpu', or install cntk-gpu with "
                                              "`tf2cntk setup --gpu` on a CUDA machine")
    else:
        err = WorkerError(f"{kind}: {message}")
    err.detail = detail  # type: ignore[attr-defined]
    return err


class StderrRing:
    """Drains a worker's stderr on a thread into a bounded ring of lines."""

    def __init__(self, maxlen: int) -> None:
        self._lines: collections.deque[str] = collections.deque(maxlen=maxlen)
        self._lock = threading.Lock()

    def add(self, line: str) -> None:
        with self._lock:
            self._lines.append(line)

    def tail(self, n: int) -> list[str]:
        with self._lock:
            lines = list(self._lines)
        return lines[-n:] if n > 0 else []

    def drain(self, fd: int) -> threading.Thread:
        def run() -> None:
            partial = b""
            while True:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:
                    chunk = b""
                if not chunk:
                    break
                partial += chunk
                *lines, partial = partial.split(b"\n")
                for line in lines:
                    self.add(line.decode("utf-8", "replace"))
            if partial:
                self.add(partial.decode("utf-8", "replace"))

        thread = threading.Thread(target=run, name=f"tf2cntk-stderr-{fd}", daemon=True)
        thread.start()
        return thread


class WorkerProcess:
    """One running worker and its pipes."""

    def __init__(self, popen: subprocess.Popen, drain: threading.Thread) -> None:
        self.popen = popen
        self.drain = drain
        self.owner_pid = os.getpid()
        self.stdin_fd = popen.stdin.fileno()
        self.stdout_fd = popen.stdout.fileno()
        self.deadline = 0.0
        self.reader = protocol.FrameReader(self.recv_into)
        self.hello: dict[str, Any] = {}
        self.handles: dict[int, int] = {}   # client handle -> handle in this worker
        for fd in (self.stdin_fd, self.stdout_fd):
            try:
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
            except OSError:
                pass  # above /proc/sys/fs/pipe-max-size: the default still works
        os.set_blocking(self.stdin_fd, False)  # so a hung worker cannot block a write forever
        # poll, not select: no FD_SETSIZE limit in processes with many open files
        self._readable = select.poll()
        self._readable.register(self.stdout_fd, select.POLLIN)
        self._writable = select.poll()
        self._writable.register(self.stdin_fd, select.POLLOUT)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def _wait_ready(self, poller: select.poll) -> None:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0 or not poller.poll(max(1, int(remaining * 1000 + 0.999))):
            raise Deadline

    def recv_into(self, view: memoryview) -> int:
        while True:
            self._wait_ready(self._readable)
            try:
                return os.readv(self.stdout_fd, [view])
            except BlockingIOError:
                continue

    def write(self, view: memoryview) -> int:
        while True:
            self._wait_ready(self._writable)
            try:
                return os.write(self.stdin_fd, view)
            except BlockingIOError:
                continue

    def kill(self) -> int | None:
        if self.owner_pid != os.getpid():
            return None  # a forked child must not kill its parent's worker
        if self.popen.poll() is None:
            try:
                self.popen.kill()
            except ProcessLookupError:
                pass
        try:
            return self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            return None
        finally:
            self.close_pipes()

    def close_pipes(self) -> None:
        for stream in (self.popen.stdin, self.popen.stdout):
            try:
                stream.close()
            except OSError:
                pass
        self.drain.join(timeout=2)
        try:
            self.popen.stderr.close()
        except OSError:
            pass
