"""The history as pandas DataFrames (``pytest_tf2cntk.load_history``): one row per run x model x
device x output with the run's metadata, the layerwise rows, the runs. pandas is imported when
a frame is built, not when this module is."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pytest_tf2cntk.errors import HistoryError
from pytest_tf2cntk.history import store

_RUN_COLUMNS = ("run_id", "time", "time_unix", "host", "git_commit", "passed", "exitstatus", "duration")


def _filters(since: str | int | None, model: str | None, alias: str) -> tuple[str, list[Any]]:
    clauses, params = [], []
    if since is not None and str(since).strip():
        text = str(since).strip()
        if text.isdigit():
            clauses.append("r.run_id >= ?")
            params.append(int(text))
        else:
            try:
                params.append(store.parse_time(text).timestamp())
            except ValueError:
                raise HistoryError(f"--since {text!r} is neither a run id nor a date",
                                   "use a RUN_ID or a date such as 2025-01-31 or 2025-01-31T12:00") from None
            clauses.append("r.time_unix >= ?")
    if model:
        clauses.append(f"instr(lower({alias}.model), lower(?)) > 0")
        params.append(model)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


def _query(path: str | Path, sql: str, params: list[Any]) -> Any:
    import pandas as pd

    with store.reading(path) as con:
        try:
            return pd.read_sql_query(sql, con, params=params)
        except pd.errors.DatabaseError as exc:  # pandas wraps sqlite3 errors in its own
            raise HistoryError(f"history file {path} cannot be read: {exc}",
                               f"move it aside (mv '{path}' '{path}.broken'); tf2cntk never overwrites it") from exc


def _run_meta_sql() -> str:
    cols = ", ".join(f"r.{c}" for c in ("time", "time_unix", "host", "git_commit") + store.VERSION_KEYS)
    return (f"{cols}, r.passed AS run_passed, "
            "(SELECT group_concat(name, ',') FROM tags t WHERE t.run_id = r.run_id) AS tags")


def _finish(df: Any) -> Any:
    import pandas as pd

    df["time"] = pd.to_datetime(df["time"], utc=True, format="ISO8601")
    df["tags"] = df["tags"].fillna("")
    return df


def load_history(path: str | Path, *, since: str | int | None = None, model: str | None = None) -> Any:
    """pandas DataFrame, one row per run x model x device x output, oldest run first.

    Columns: run_id, run metadata (time as UTC datetime, time_unix, host, git_commit, the version
    keys, run_passed, tags), then model, device, output and every stored metric.
    ``since``: a RUN_ID (that run and later) or a date; ``model``: substring, case-insensitive.
    """
    where, params = _filters(since, model, "x")
    metrics = ", ".join(f"x.{c}" for c in store.RESULT_COLUMNS[1:])
    sql = (f"SELECT x.run_id, {_run_meta_sql()}, {metrics} FROM results x JOIN runs r ON r.run_id = x.run_id"
           f"{where} ORDER BY x.run_id, x.model, x.device, x.output")
    df = _finish(_query(path, sql, params))
    df["passed"] = df["passed"].astype(bool)
    return df


def load_layers(path: str | Path, *, since: str | int | None = None, model: str | None = None) -> Any:
    """pandas DataFrame of layerwise rows (run x model x device x node) with run metadata."""
    where, params = _filters(since, model, "x")
    cols = ", ".join(f"x.{c}" for c in store.LAYER_COLUMNS[1:])
    sql = (f"SELECT x.run_id, {_run_meta_sql()}, {cols} FROM layers x JOIN runs r ON r.run_id = x.run_id"
           f"{where} ORDER BY x.run_id, x.model, x.device, x.node")
    return _finish(_query(path, sql, params))


def load_runs(path: str | Path) -> Any:
    """pandas DataFrame, one row per run: metadata and versions (for what-changed columns)."""
    cols = ", ".join(_RUN_COLUMNS + store.VERSION_KEYS)
    return _query(path, f"SELECT {cols} FROM runs ORDER BY run_id", [])


def load_unchecked(path: str | Path, *, since: str | int | None = None, model: str | None = None) -> Any:
    """pandas DataFrame of the checks that reached no verdict: run_id, model, device, outcome
    (skipped or error), reason."""
    where, params = _filters(since, model, "s")
    return _query(path, "SELECT s.run_id, s.model, s.device, s.outcome, s.reason FROM unchecked s JOIN runs r ON "
                        f"r.run_id = s.run_id{where} ORDER BY s.run_id, s.model, s.device", params)
