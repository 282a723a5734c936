"""TensorFlow's C++ start-up chatter stays off stderr; anything else written there still shows."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

from pytest_tf2cntk import tf_import

CHATTER = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "I0000 00:00:1796220394.892741   14235 port.cc:153] oneDNN custom operations are on. You may see ...",
    "I0000 00:00:1796220394.893497   14235 cudart_stub.cc:31] Could not find cuda drivers on your machine.",
    "E0000 00:00:1796220396.876095   14235 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error",
]


def test_start_up_chatter_is_dropped_and_other_lines_are_written_back(capfd) -> None:
    with tf_import._filtered_stderr():  # forced: these lines are written to fd 2 whatever the machine
        os.write(2, ("\n".join(CHATTER) + "\nE0000 00:00:1.0 1 other.cc:1] a real error\n").encode())
    err = capfd.readouterr().err
    assert err == "E0000 00:00:1.0 1 other.cc:1] a real error\n"


def test_the_first_import_in_a_process_is_quiet() -> None:
    done = subprocess.run([sys.executable, "-c", "from pytest_tf2cntk.tf_import import tensorflow; "
                           "tf = tensorflow(); print(tf.constant(2.0).numpy() * 2)"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": ""})
    assert done.returncode == 0 and done.stdout.strip() == "4.0", done.stderr
    assert not [line for line in done.stderr.splitlines() if tf_import.is_chatter(line)], done.stderr
    assert "absl" not in done.stderr and "oneDNN" not in done.stderr


def test_no_module_of_the_package_imports_tensorflow_but_tf_import() -> None:
    """One place sets the log level and filters the start-up lines: a plain ``import tensorflow``
    elsewhere could come first in a process and print them."""
    package = Path(tf_import.__file__).parent
    offenders = [f"{path.relative_to(package)}:{node.lineno}" for path in package.rglob("*.py")
                 if path.name != "tf_import.py" and "worker" not in path.parts
                 for node in ast.walk(ast.parse(path.read_text("utf-8")))
                 if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "tensorflow" for a in node.names)]
    assert not offenders, f"import tensorflow outside tf_import (use tf_import.tensorflow()): {offenders}"
