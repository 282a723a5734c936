"""The run history: every parity result of every run, in one embedded SQLite file.

The plugin passes the path (default ``<rootdir>/.tf2cntk/history.sqlite``). One row per run
(time, host, git commit, versions of both sides, options), one per model x device x output
with every metric, optional per-node rows from layerwise localization, and run tags.

Schema (version 5; ``tf2cntk_schema`` holds one row per applied version)::

  runs     run_id PK, time (ISO 8601 UTC), time_unix, host, git_commit, passed, exitstatus,
           duration, versions (JSON), options (JSON), and one TEXT column per version key:
           tensorflow tf2onnx onnx onnxruntime keras numpy python | cntk cntk_numpy cntk_python
  results  (run_id, model, device, output) PK, scaled_error, budget, headroom, max_abs, max_rel,
           max_ulp, cosine, top1, stage, passed, examples, unit_roundoff, budget_overridden,
           converter_error (TF vs ORT), importer_error (ORT vs CNTK), and since version 3 the
           measured verdict: rule (measured | a-priori budget | user budget), reference (the
           float64 twin, or why none), tf32_error and ort32_error (vs the truth), float32_noise;
           under the measured rule scaled_error is CNTK vs the truth and budget the limit; since
           version 5 repairs: the CNTK repairs the conversion used, a JSON list of names ('[]'
           for none, and for every row written before)
  layers   (run_id, model, device, node) PK, op_type, tf_layer, local_error, budget
  unchecked (run_id, model, device) PK, reason, outcome: the checks that reached no verdict,
           "skipped" (the device cannot be used) or "error" (a worker crash, a timeout, a bad
           configuration: reason is the message); until version 4 the table was ``skips``
  tags     name PK, run_id, tagged

Version 1 was the minimal first layout: runs(run_id, time, git_commit, versions, options) and
results(run_id, model, device, output, scaled_error, budget, passed). Version 2 rows read back
under version 3 with rule "a-priori budget" (what they were judged by). A new file is created by
running every migration from 0, so fresh and migrated files cannot differ.

Choices: a check with no verdict (skipped, or stopped by an error) goes to ``unchecked``, so an
unavailable device or a crashed worker shows in reports instead of silently having no rows, and
the run is not recorded as passed. The same output measured
twice in one run (a hand-written test checking a model again) keeps the worst error.

Concurrency: WAL journal, a busy timeout, every write in one ``BEGIN IMMEDIATE`` transaction that
is retried while the database is locked, so xdist workers and parallel pytest runs lose no rows.
``synchronous=NORMAL``: a power cut may lose the last run, never corrupt the file.

Safety: the file must carry our ``application_id`` and schema table. A corrupt file or another
application's database raises ``HistoryError`` naming the file and the fix, and is never written
to: identity is checked before anything (even the journal mode) is changed.
"""
from __future__ import annotations

import json
import math
import random
import socket
import sqlite3
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

from pytest_tf2cntk.errors import HistoryError
from pytest_tf2cntk.history.records import CheckRecord
from pytest_tf2cntk.parity.localize.report import LayerRow
from pytest_tf2cntk.parity.result import OutputCheck, ParityResult
from pytest_tf2cntk.versions import host_versions

APPLICATION_ID = 0x54463243  # "TF2C" in the SQLite header: tells our files from anyone else's
SCHEMA_VERSION = 5
SCHEMA_TABLE = "tf2cntk_schema"
DEFAULT_RELATIVE_PATH = Path(".tf2cntk") / "history.sqlite"
BUSY_TIMEOUT_S = 10.0  # SQLite waits this long for a lock before reporting "database is locked"
LOCK_RETRY_S = 120.0  # ... and we keep retrying that long: a slow CI box must not drop a run
HOST_VERSION_KEYS = ("tensorflow", "tf2onnx", "onnx", "onnxruntime", "keras", "numpy", "python")
CNTK_VERSION_KEYS = ("cntk", "cntk_numpy", "cntk_python")
VERSION_KEYS = HOST_VERSION_KEYS + CNTK_VERSION_KEYS
RESULT_COLUMNS = ("run_id", "model", "device", "output", "scaled_error", "budget", "headroom", "max_abs",
                  "max_rel", "max_ulp", "cosine", "top1", "stage", "passed", "examples", "unit_roundoff",
                  "budget_overridden", "converter_error", "importer_error", "rule", "reference", "tf32_error",
                  "ort32_error", "float32_noise", "repairs")
LAYER_COLUMNS = ("run_id", "model", "device", "node", "op_type", "tf_layer", "local_error", "budget")

T = TypeVar("T")


# ---------------------------------------------------------------------------------------------
# migrations: MIGRATIONS[v] takes a file from version v to v + 1, inside the caller's transaction


def _migrate_0_to_1(con: sqlite3.Connection) -> None:
    con.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    con.execute(f"CREATE TABLE {SCHEMA_TABLE} (version INTEGER PRIMARY KEY, applied TEXT NOT NULL)")
    con.execute("CREATE TABLE runs (run_id INTEGER PRIMARY KEY AUTOINCREMENT, time TEXT NOT NULL, "
                "git_commit TEXT, versions TEXT NOT NULL DEFAULT '{}', options TEXT NOT NULL DEFAULT '{}')")
    con.execute("CREATE TABLE results (run_id INTEGER NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE, "
                "model TEXT NOT NULL, device TEXT NOT NULL, output TEXT NOT NULL, scaled_error REAL, "
                "budget REAL, passed INTEGER, PRIMARY KEY (run_id, model, device, output))")


def _migrate_1_to_2(con: sqlite3.Connection) -> None:
    run_cols = ["time_unix REAL", "host TEXT", "passed INTEGER", "exitstatus INTEGER", "duration REAL"]
    run_cols += [f"{k} TEXT" for k in VERSION_KEYS]
    for col in run_cols:
        con.execute(f"ALTER TABLE runs ADD COLUMN {col}")
    for col in ("headroom REAL", "max_abs REAL", "max_rel REAL", "max_ulp REAL", "cosine REAL", "top1 REAL",
                "stage TEXT", "examples INTEGER", "unit_roundoff REAL", "budget_overridden INTEGER",
                "converter_error REAL", "importer_error REAL"):
        con.execute(f"ALTER TABLE results ADD COLUMN {col}")
    con.execute("CREATE TABLE layers (run_id INTEGER NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE, "
                "model TEXT NOT NULL, device TEXT NOT NULL, node TEXT NOT NULL, op_type TEXT, tf_layer TEXT, "
                "local_error REAL, budget REAL, PRIMARY KEY (run_id, model, device, node))")
    con.execute("CREATE TABLE skips (run_id INTEGER NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE, "
                "model TEXT NOT NULL, device TEXT NOT NULL, reason TEXT, PRIMARY KEY (run_id, model, device))")
    con.execute("CREATE TABLE tags (name TEXT PRIMARY KEY, run_id INTEGER NOT NULL REFERENCES runs(run_id) "
                "ON DELETE CASCADE, tagged TEXT NOT NULL)")
    con.execute("CREATE INDEX results_by_key ON results (model, device, output, run_id)")
    con.execute("CREATE INDEX layers_by_key ON layers (model, device, node, run_id)")
    # backfill what v1 rows already imply (in Python: no dependency on SQLite's JSON1)
    updates = []
    for run_id, when, versions in con.execute("SELECT run_id, time, versions FROM runs").fetchall():
        try:
            v = json.loads(versions or "{}")
        except ValueError:
            v = {}
        updates.append((_unix(when), *(_version(v, k) for k in VERSION_KEYS), run_id))
    sets = ", ".join(f"{k} = ?" for k in ("time_unix",) + VERSION_KEYS)
    con.executemany(f"UPDATE runs SET {sets} WHERE run_id = ?", updates)
    con.execute("UPDATE results SET headroom = budget / scaled_error WHERE scaled_error > 0")
    con.execute("UPDATE runs SET passed = (SELECT MIN(passed) FROM results WHERE results.run_id = runs.run_id)")


def _migrate_2_to_3(con: sqlite3.Connection) -> None:
    for col in ("rule TEXT", "reference TEXT", "tf32_error REAL", "ort32_error REAL", "float32_noise REAL"):
        con.execute(f"ALTER TABLE results ADD COLUMN {col}")
    con.execute("UPDATE results SET rule = CASE WHEN budget_overridden THEN 'user budget' "
                "ELSE 'a-priori budget' END")


def _migrate_3_to_4(con: sqlite3.Connection) -> None:
    con.execute("ALTER TABLE skips RENAME TO unchecked")
    con.execute("ALTER TABLE unchecked ADD COLUMN outcome TEXT NOT NULL DEFAULT 'skipped'")


def _migrate_4_to_5(con: sqlite3.Connection) -> None:
    con.execute("ALTER TABLE results ADD COLUMN repairs TEXT NOT NULL DEFAULT '[]'")  # older rows: none


MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {0: _migrate_0_to_1, 1: _migrate_1_to_2,
                                                               2: _migrate_2_to_3, 3: _migrate_3_to_4,
                                                               4: _migrate_4_to_5}


# ---------------------------------------------------------------------------------------------
# opening: identity check first, then migrations, then WAL


def default_history_path(rootdir: str | Path) -> Path:
    return Path(rootdir) / DEFAULT_RELATIVE_PATH


def _is_locked(exc: BaseException) -> bool:
    msg = str(exc).lower()
    return isinstance(exc, sqlite3.OperationalError) and ("locked" in msg or "busy" in msg)


def _unwritable(path: Path, exc: BaseException) -> HistoryError:
    """The file is not there and cannot be made: its directory is the problem, not a file."""
    why = getattr(exc, "strerror", None) or str(exc)
    return HistoryError(f"history file {path} cannot be created: {why} (its directory {path.parent} is "
                        "not a directory this process can write to)",
                        "point --tf2cntk-history at a file in a writable directory, or turn the history off "
                        "for this run with --tf2cntk-no-history")


def _broken(path: Path, exc: BaseException) -> HistoryError:
    if not path.is_file():
        return _unwritable(path, exc)
    if any(w in str(exc) for w in ("readonly", "unable to open", "disk I/O error")):  # access, not content
        return HistoryError(f"history file {path} cannot be written: {exc} (the file or its directory "
                            f"{path.parent} is not writable by this process; the file itself was not judged)",
                            f"make both writable (chmod u+w '{path}' '{path.parent}'), point "
                            "--tf2cntk-history at a writable place, or use --tf2cntk-no-history")
    return HistoryError(f"history file {path} cannot be read: {exc} (the file is corrupt, truncated or "
                        "not an SQLite database)",
                        f"move it aside (mv '{path}' '{path}.broken'); the next run starts a new history. "
                        "tf2cntk never overwrites or repairs it")


def _retrying(path: Path, op: Callable[[], T]) -> T:
    """Run ``op``, retrying while SQLite says locked/busy; any other SQLite error is a HistoryError."""
    deadline = time.monotonic() + LOCK_RETRY_S
    delay = 0.002
    while True:
        try:
            return op()
        except sqlite3.OperationalError as exc:
            if _is_locked(exc) and time.monotonic() < deadline:
                time.sleep(delay * (0.5 + random.random()))  # jitter: waiting writers do not collide again
                delay = min(delay * 2, 0.25)
                continue
            if _is_locked(exc):
                raise HistoryError(f"history file {path} stayed locked for {LOCK_RETRY_S:.0f} s",
                                   "another process holds a write lock: stop it, or use another "
                                   "--tf2cntk-history path") from exc
            raise _broken(path, exc) from exc
        except sqlite3.DatabaseError as exc:
            raise _broken(path, exc) from exc


def _identify(path: Path, con: sqlite3.Connection) -> int | None:
    """Schema version of our file, None for a new empty one; HistoryError for anything else."""
    own = not con.in_transaction
    if own:  # one snapshot: another process may commit the schema between the two reads
        con.execute("BEGIN")
    try:
        app_id = con.execute("PRAGMA application_id").fetchone()[0]
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
    finally:
        if own:
            con.execute("COMMIT")
    if app_id == 0 and not tables:
        return None
    if app_id != APPLICATION_ID or SCHEMA_TABLE not in tables:
        shown = ", ".join(t for t in tables if not t.startswith("sqlite_")) or "none"
        raise HistoryError(f"{path} is an SQLite database but not a tf2cntk history (application_id "
                           f"{app_id:#x}, tables: {shown}); it was left untouched",
                           "point --tf2cntk-history at another file, or move this one aside")
    version = con.execute(f"SELECT MAX(version) FROM {SCHEMA_TABLE}").fetchone()[0] or 0
    if version > SCHEMA_VERSION:
        raise HistoryError(f"{path} has history schema version {version}, written by a newer "
                           f"pytest-tf2cntk; this one reads up to version {SCHEMA_VERSION}",
                           "upgrade pytest-tf2cntk, or point --tf2cntk-history at another file")
    return int(version)


def _migrate(path: Path, con: sqlite3.Connection) -> None:
    con.execute("BEGIN IMMEDIATE")
    try:
        version = _identify(path, con) or 0  # again, under the write lock: another process may have won
        for v in range(version, SCHEMA_VERSION):
            MIGRATIONS[v](con)
            con.execute(f"INSERT INTO {SCHEMA_TABLE} (version, applied) VALUES (?, ?)", (v + 1, _now_iso()))
        con.execute("COMMIT")
    except BaseException:
        if con.in_transaction:
            con.execute("ROLLBACK")
        raise


def _open(path: Path, create: bool) -> sqlite3.Connection:
    if not path.exists():
        if not create:
            raise HistoryError(f"no history at {path}",
                               "run pytest with pytest-tf2cntk (history is on unless --tf2cntk-no-history) "
                               "or pass --history PATH")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a file on the way (a/file/h.sqlite), no permission
            raise _unwritable(path, exc) from None
    if path.is_dir():
        raise HistoryError(f"history path {path} is a directory", "pass the path of a .sqlite file")

    def attempt() -> sqlite3.Connection:
        con = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_S, isolation_level=None)
        try:
            version = _identify(path, con)
            if version != SCHEMA_VERSION:
                _migrate(path, con)
            # only now that the file is known to be ours may anything be changed
            if con.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                con.execute("PRAGMA journal_mode = WAL")
            con.execute("PRAGMA synchronous = NORMAL")
            con.execute("PRAGMA foreign_keys = ON")
            return con
        except BaseException:
            con.close()
            raise

    return _retrying(path, attempt)


@contextmanager
def reading(path: str | Path) -> Iterator[sqlite3.Connection]:
    """A validated (and, if older, migrated) connection for queries; HistoryError if missing."""
    p = Path(path)
    con = _open(p, create=False)
    try:
        yield con
    except sqlite3.DatabaseError as exc:
        if _is_locked(exc):
            raise HistoryError(f"history file {p} is locked", "retry when the writing run is done") from exc
        raise _broken(p, exc) from exc
    finally:
        con.close()


def ensure_history(path: str | Path) -> Path:
    """Create or migrate the file now (e.g. at pytest start), so a broken one is reported early."""
    p = Path(path)
    _open(p, create=True).close()
    return p


def write(path: str | Path, fn: Callable[[sqlite3.Connection], T]) -> T:
    """Run ``fn`` in one BEGIN IMMEDIATE transaction, retried as a whole while the file is locked."""
    p = Path(path)
    con = _open(p, create=True)

    def attempt() -> T:
        con.execute("BEGIN IMMEDIATE")
        try:
            value = fn(con)
            con.execute("COMMIT")
            return value
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise

    try:
        return _retrying(p, attempt)
    finally:
        con.close()


# ---------------------------------------------------------------------------------------------
# runs


def git_commit(cwd: str | Path | None) -> str | None:
    """``git rev-parse HEAD`` in ``cwd``; None outside a repository or without git."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=str(cwd) if cwd else None, capture_output=True,
                              text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    out = done.stdout.strip()
    return out if done.returncode == 0 and out and all(c in "0123456789abcdef" for c in out) else None


@dataclass
class RunInfo:
    """One run's row: when, where, at which commit, with which versions and options."""

    time: float
    host: str
    git_commit: str | None
    versions: dict[str, str]
    options: dict[str, Any] = field(default_factory=dict)
    exitstatus: int | None = None
    duration: float | None = None
    passed: bool | None = None  # default: every check that ran passed


def run_info(cwd: str | Path | None, *, options: dict[str, Any] | None = None,
             results: Sequence[CheckRecord] = (), exitstatus: int | None = None,
             duration: float | None = None, started: float | None = None) -> RunInfo:
    """Now, this host, the git commit of ``cwd``, versions.

    Versions are the host's installed packages, overlaid with what a parity result measured
    (that is where the CNTK side's cntk/numpy/python come from: the worker reports them).
    """
    versions = host_versions()
    measured = next((r.result.versions for r in results if r.result is not None and r.result.versions), {})
    versions.update({k: str(v) for k, v in measured.items()})
    return RunInfo(time.time() if started is None else started, socket.gethostname(), git_commit(cwd), versions,
                   options or {}, exitstatus, duration)


def record_run(path: str | Path, run: RunInfo, results: Sequence[CheckRecord], *,
               layerwise: Sequence[LayerRow] | None = None) -> int:
    """Store one run and its checks in one transaction; its run_id."""
    outputs, unchecked = _result_rows(results)
    nodes: dict[tuple[str, str, str], tuple] = {}
    for lw in layerwise or ():
        row = (lw.model, lw.device, lw.node, lw.op_type, lw.tf_layer, _num(lw.local_error), _num(lw.budget))
        held = nodes.get(row[:3])
        if held is None or _worse(row[5], held[5]):  # the same node twice: the worst wins
            nodes[row[:3]] = row
    passed = run.passed
    verdicts = [r.passed for r in results if r.passed is not None]  # a skip is no verdict; an error fails
    if passed is None and verdicts:
        passed = all(verdicts)
    versions = {str(k): str(v) for k, v in run.versions.items()}
    run_row = (_iso(run.time), _unix(run.time), run.host, run.git_commit, None if passed is None else int(bool(passed)),
               run.exitstatus, _num(run.duration), json.dumps(versions, sort_keys=True),
               json.dumps(run.options, default=str, sort_keys=True), *(_version(versions, k) for k in VERSION_KEYS))
    run_cols = ("time", "time_unix", "host", "git_commit", "passed", "exitstatus", "duration", "versions",
                "options") + VERSION_KEYS

    def insert(con: sqlite3.Connection) -> int:
        cur = con.execute(f"INSERT INTO runs ({', '.join(run_cols)}) VALUES ({', '.join('?' * len(run_cols))})",
                          run_row)
        run_id = int(cur.lastrowid or 0)
        con.executemany(f"INSERT INTO results ({', '.join(RESULT_COLUMNS)}) "
                        f"VALUES ({', '.join('?' * len(RESULT_COLUMNS))})",
                        [(run_id, *row) for row in outputs.values()])
        con.executemany("INSERT INTO unchecked (run_id, model, device, reason, outcome) VALUES (?, ?, ?, ?, ?)",
                        [(run_id, m, d, why, outcome) for (m, d), (why, outcome) in unchecked.items()])
        con.executemany(f"INSERT INTO layers ({', '.join(LAYER_COLUMNS)}) "
                        f"VALUES ({', '.join('?' * len(LAYER_COLUMNS))})",
                        [(run_id, *row) for row in nodes.values()])
        return run_id

    return write(path, insert)


def _result_rows(results: Sequence[CheckRecord]) -> tuple[dict[tuple[str, str, str], tuple],
                                                           dict[tuple[str, str], tuple[str, str]]]:
    outputs: dict[tuple[str, str, str], tuple] = {}
    unchecked: dict[tuple[str, str], tuple[str, str]] = {}
    for r in results:
        if r.result is None:
            held = unchecked.get((r.model, r.device))
            if held is None or r.error:  # the same check twice: an error outweighs a skip
                unchecked[(r.model, r.device)] = (r.error or r.skipped, r.outcome)
            continue
        for name, o in r.result.outputs.items():
            row = _result_row(r.model, r.result, name, o)
            held = outputs.get(row[:3])
            if held is None or _worse(row[3], held[3]):  # the same output twice: the worst wins
                outputs[row[:3]] = row
    return outputs, unchecked


def _result_row(model: str, r: ParityResult, name: str, o: OutputCheck) -> tuple:
    t, b = o.tf_vs_cntk, o.budget
    return (model, r.device, name, _num(o.scaled_error), _num(b.value), _num(o.headroom), _num(t.max_abs),
            _num(t.max_rel), _num(t.max_ulp), _num(t.cosine), _num(t.top1_agreement), o.stage, int(o.passed),
            r.examples, _num(b.unit_roundoff), int(bool(b.overridden)),
            _num(o.tf_vs_ort.scaled_error) if o.tf_vs_ort else None,
            _num(o.ort_vs_cntk.scaled_error) if o.ort_vs_cntk else None, o.rule, r.reference,
            *_truth_columns(o), json.dumps([x.name for x in r.conversion.repairs]))


def _truth_columns(o: OutputCheck) -> tuple:
    t = o.measured
    return (None, None, None) if t is None else (_num(t.tf32), _num(t.ort32), _num(t.noise))


def _worse(a: float | None, b: float | None) -> bool:
    return a is not None and (b is None or a > b)


def _num(x: Any) -> float | None:
    if x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def _version(versions: dict[str, Any], key: str) -> str | None:
    v = versions.get(key)
    if v is None and key == "tensorflow":
        v = versions.get("tensorflow-cpu")
    return None if v is None else str(v)


def parse_time(when: Any) -> datetime:
    """A UTC datetime from epoch seconds, a datetime or ISO 8601 text (naive means local time)."""
    if when is None:
        return datetime.now(timezone.utc)
    if isinstance(when, datetime):
        dt = when
    elif isinstance(when, (int, float)):
        return datetime.fromtimestamp(float(when), timezone.utc)
    else:
        text = str(when).strip().replace("Z", "+00:00")
        try:
            dt = datetime.fromisoformat(text)
        except ValueError:
            dt = datetime.strptime(text, "%Y-%m-%dT%H:%M:%S%z")  # session.report()'s "created"
    return (dt if dt.tzinfo else dt.astimezone()).astimezone(timezone.utc)


def _iso(when: Any) -> str:
    return parse_time(when).isoformat(timespec="microseconds")


def _unix(when: Any) -> float:
    try:
        return parse_time(when).timestamp()
    except ValueError:
        return math.nan


def _now_iso() -> str:
    return _iso(None)


# ---------------------------------------------------------------------------------------------
# queries: tags and runs


def _check_tag_name(name: str) -> str:
    name = name.strip()
    if not name or name.isdigit() or name.lower() == "latest":
        raise HistoryError(f"bad tag name {name!r}: a tag must not be empty, a number or 'latest' "
                           "(those already mean a run)", "pick a name such as 'release-1.2' or 'good'")
    return name


def tag_run(path: str | Path, run_id: int, name: str, force: bool = False) -> int | None:
    """Point tag ``name`` at ``run_id``; the run it left. Tags are unique: one that names another
    run moves only with ``force`` (a baseline must not move by a slip)."""
    name = _check_tag_name(name)

    def do(con: sqlite3.Connection) -> int | None:
        if con.execute("SELECT 1 FROM runs WHERE run_id = ?", (int(run_id),)).fetchone() is None:
            raise HistoryError(f"no run {run_id} in {path}", "`tf2cntk runs` lists the recorded runs")
        old = con.execute("SELECT run_id FROM tags WHERE name = ?", (name,)).fetchone()
        if old is not None and int(old[0]) != int(run_id) and not force:
            raise HistoryError(f"tag {name!r} already names run {old[0]} in {path}; it was left there",
                               f"`tf2cntk tag {run_id} {name} --force` moves it to run {run_id}, or pick "
                               "another name")
        con.execute("INSERT INTO tags (name, run_id, tagged) VALUES (?, ?, ?) ON CONFLICT(name) DO UPDATE "
                    "SET run_id = excluded.run_id, tagged = excluded.tagged", (name, int(run_id), _now_iso()))
        return None if old is None else int(old[0])

    if not Path(path).exists():
        raise HistoryError(f"no history at {path}", "run pytest with pytest-tf2cntk first, or pass --history")
    return write(path, do)


def recorded_models(path: str | Path) -> list[str]:
    """Every model the history has a row for, sorted."""
    with reading(path) as con:
        return [m for (m,) in con.execute("SELECT DISTINCT model FROM results UNION "
                                          "SELECT DISTINCT model FROM unchecked ORDER BY 1")]


def tags(path: str | Path) -> dict[str, int]:
    with reading(path) as con:
        return {n: int(r) for n, r in con.execute("SELECT name, run_id FROM tags ORDER BY name")}


def list_runs(path: str | Path, limit: int | None = 20) -> list[dict[str, Any]]:
    """Newest first: run_id, time, host, git_commit, passed, outputs, failed, tags."""
    sql = ("SELECT r.run_id, r.time, r.host, r.git_commit, r.passed, "
           "(SELECT COUNT(*) FROM results x WHERE x.run_id = r.run_id), "
           "(SELECT COUNT(*) FROM results x WHERE x.run_id = r.run_id AND x.passed = 0), "
           "(SELECT group_concat(name, ',') FROM tags t WHERE t.run_id = r.run_id) "
           "FROM runs r ORDER BY r.run_id DESC" + (" LIMIT ?" if limit else ""))
    with reading(path) as con:
        rows = con.execute(sql, (int(limit),) if limit else ()).fetchall()
    keys = ("run_id", "time", "host", "git_commit", "passed", "outputs", "failed", "tags")
    return [dict(zip(keys, r)) for r in rows]
