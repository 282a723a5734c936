"""TensorFlow, imported once per process without its C++ start-up chatter on stderr.

TF 2.21 logs through absl before absl is initialised, so TF_CPP_MIN_LOG_LEVEL does not silence
"oneDNN custom operations are on", "Could not find cuda drivers" or "failed call to cuInit", and
absl adds "All log messages before absl::InitializeLog() ...". These lines reach the user's
terminal and every captured stderr. The first import (and the first device query, which logs
cuInit) runs with file descriptor 2 sent to a temporary file; lines that are not known start-up
chatter are written back, so a real error on import still shows.
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from typing import Any, Iterator

_CHATTER = re.compile(
    r"WARNING: All log messages before absl::InitializeLog\(\) is called"
    r"|^[IWE]\d{4} [\d:. ]+\d+ (port|cudart_stub|cuda_platform|cuda_dnn|cuda_fft|cuda_blas|cuda_executor"
    r"|cpu_feature_guard|computation_placer|gpu_device|dso_loader)\.cc:\d+\]"
    r"|^To enable the following instructions: .* in other operations, rebuild TensorFlow")


def is_chatter(line: str) -> bool:
    return bool(_CHATTER.search(line))


def tensorflow() -> Any:
    """``import tensorflow``, quietly the first time in this process."""
    if sys.modules.get("tensorflow") is not None:  # None: blocked, and importing raises ImportError
        return sys.modules["tensorflow"]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with _filtered_stderr():
        import tensorflow as tf

        tf.config.list_physical_devices("GPU")  # its cuInit line now, while filtered
    return tf


@contextlib.contextmanager
def _filtered_stderr() -> Iterator[None]:
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no real fd 2 (an embedding host): import as is
        yield
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            kept = [line for line in sink.read().decode("utf-8", "replace").splitlines() if not is_chatter(line)]
            if kept:
                sys.stderr.write("\n".join(kept) + "\n")
