"""The shape of the package, measured: no import circles (counting every import, also those
inside functions and under TYPE_CHECKING), no module over 600 lines, no function over 80, the
Python 3.6 worker importing nothing of the host side, and nothing heavy at plugin load."""
from __future__ import annotations

import subprocess
import sys

from tests.support import architecture as A


def test_no_import_circles() -> None:
    assert A.cycles(A.edges(A.modules())) == []


def test_modules_and_functions_stay_small() -> None:
    mods = A.modules()
    assert [(m.name, m.lines) for m in mods.values() if m.lines > 600] == []
    assert A.long_functions(80) == []


def test_the_worker_imports_nothing_of_the_host_side() -> None:
    worker = [m for m in A.modules().values() if A.WORKER in m.path.parents]
    assert worker and all(not m.imports or all(i.startswith("pytest_tf2cntk.cntk.worker") for i in m.imports)
                          for m in worker)


def test_stages_import_one_way() -> None:
    """convert and cntk know nothing of parity; parity nothing of history; the core nothing of the
    pytest shell or the CLI."""
    order = {"convert": 1, "cntk": 1, "parity": 2, "history": 3, "plugin": 4, "cli": 4}
    for m in A.modules().values():
        stage = m.name.split(".")[1] if m.name.count(".") else ""
        for target in m.imports:
            other = target.split(".")[1] if target.count(".") else ""
            if stage in order and other in order:
                assert order[other] <= order[stage] and (other == stage or order[other] < order[stage]), \
                    f"{m.name} imports {target}"


def test_plugin_load_and_cli_parse_import_nothing_heavy() -> None:
    code = ("import sys, pytest_tf2cntk.plugin, pytest_tf2cntk.cli as c; c.build_parser(); "
            "print(sorted(m for m in ('numpy', 'onnx', 'tensorflow', 'onnxruntime', 'pandas', 'hypothesis', "
            "'tf2onnx', 'keras') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]", done.stdout
