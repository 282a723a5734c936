"""A CNTK worker that misbehaves on purpose, for the fault tests: an executable Python 3.6 script
given as ``--tf2cntk-cntk-python``. It runs the real worker (``server.py``) with its ``eval``
wrapped: when the model evaluated has two or more inputs (``two_io.keras``) and the inputs are
not all zeros (``::convert``'s load check feeds zeros; the parity search does not), it kills itself
(``kill``), stops itself (``hang``: SIGSTOP, a hung worker) or kills its parent (``kill-parent``:
the pytest or xdist process that started it). Every other model runs normally, so a run forces
exactly one broken check beside healthy ones."""
from __future__ import annotations

import os
import stat
from pathlib import Path

MODES = {"kill": "os.kill(os.getpid(), signal.SIGKILL)", "hang": "os.kill(os.getpid(), signal.SIGSTOP)",
         "kill-parent": "os.kill(os.getppid(), signal.SIGKILL)"}

TEMPLATE = '''#!{python}
import os, signal, sys
server_path = sys.argv[-1]  # the host runs: <this script> -u .../worker/server.py
sys.argv = [server_path]
sys.path.insert(0, os.path.dirname(server_path))
import server

_real_eval = server.HANDLERS["eval"]


def _eval(state, header, arrays):
    # ::convert's load check runs the graph on zeros: misbehave only inside the parity search
    if len(server._model(state, header).inputs) >= 2 and any(a.any() for a in arrays.values()):
        {action}
    return _real_eval(state, header, arrays)


server.HANDLERS["eval"] = _eval
code = server.main()
sys.stdout.flush()
os._exit(code)
'''


def faulty_worker(directory: Path, mode: str) -> Path:
    """Write the script for ``mode`` (see MODES) next to nothing else; its path."""
    from pytest_tf2cntk.cntk import env

    python = env.resolve_cntk_python(None)
    script = Path(directory) / f"cntk-python-{mode}"
    script.write_text(TEMPLATE.format(python=python, action=MODES[mode]), "utf-8")
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return script
