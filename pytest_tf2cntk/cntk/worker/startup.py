"""Start-up of the CNTK worker (Python 3.6, stdlib only): guard stdio, import cntk quietly."""
import os
import sys
import tempfile
import traceback
import warnings


def split_native(text):
    """(message, native call stack) of a CNTK exception text."""
    idx = text.find("[CALL STACK]")
    if idx < 0:
        return text.strip(), ""
    return text[:idx].strip(), text[idx:].strip()



def protect_stdio():
    """(input fd, output fd) for frames; fd 1 -> stderr and fd 0 -> /dev/null from now on."""
    frames_in = os.dup(0)
    frames_out = os.dup(1)
    sys.stdout.flush()
    os.dup2(2, 1)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    return frames_in, frames_out


def import_cntk():
    """Import cntk with its warnings and banner captured: (module or None, facts, error reply or None)."""
    cntk = None
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(2)
    capture = tempfile.TemporaryFile()
    os.dup2(capture.fileno(), 1)
    os.dup2(capture.fileno(), 2)
    failure = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            import cntk
        except BaseException as exc:  # ImportError (libmpi), OSError, anything: report it
            failure = (exc, traceback.format_exc())
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.dup2(saved, 1)
            os.close(saved)
    capture.seek(0)
    text = capture.read().decode("utf-8", "replace")
    capture.close()
    if text:
        sys.stderr.write(text)  # still reaches the host's diagnostics ring buffer
        sys.stderr.flush()
    facts = {
        "import_warnings": [{"category": w.category.__name__, "message": str(w.message),
                             "filename": w.filename, "lineno": w.lineno} for w in caught],
        "import_stderr": text,
    }
    if failure is None:
        return cntk, facts, None
    exc, tb = failure
    message, native = split_native("%s: %s" % (type(exc).__name__, exc))
    return None, facts, {"ok": False, "type": "EnvironmentProblem", "message": message,
                   "detail": "\n\n".join(p for p in (native, tb, text) if p)}
