"""The history store: real SQLite files, several processes at once, broken and foreign files."""
from __future__ import annotations

import multiprocessing
import os
import sqlite3
from pathlib import Path

import pytest

from pytest_tf2cntk import cli
from pytest_tf2cntk.errors import HistoryError
from pytest_tf2cntk.history import store as H
from pytest_tf2cntk.history.drift import resolve_baseline
from pytest_tf2cntk.history.frame import load_history
from pytest_tf2cntk.history.records import CheckRecord
from pytest_tf2cntk.history.report import build_report, render_markdown
from pytest_tf2cntk.parity.localize.report import LayerRow
from tests.support.paths import ROOT
from tests.support.synthetic import U32, make_result, make_run


def table(path: Path, sql: str) -> list[tuple]:
    con = sqlite3.connect(str(path))
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


# -- recording ----------------------------------------------------------------------------------

def test_record_run_stores_every_metric_skips_and_layers(tmp_path: Path) -> None:
    path = tmp_path / ".tf2cntk" / "history.sqlite"
    results = [make_result(errors={"probs": 2e-7, "logits": 4e-6}, measured=("logits",)),
               CheckRecord("m.keras", "gpu", skipped="no GPU visible to TensorFlow")]
    layers = [LayerRow("m.keras", "cpu", "gemm_1", "Gemm", "dense", 3e-7, 1e-5)]
    run_id = H.record_run(path, make_run(1), results, layerwise=layers)
    assert run_id == 1 and path.is_file()
    row = table(path, "SELECT model, device, output, scaled_error, budget, headroom, max_abs, max_rel, max_ulp, "
                      "cosine, top1, stage, passed, examples, unit_roundoff, converter_error, importer_error "
                      "FROM results WHERE output = 'probs'")[0]
    assert row[:3] == ("m.keras", "cpu", "probs")
    assert row[3] == pytest.approx(2e-7) and row[4] == 1e-5 and row[5] == pytest.approx(50.0)
    assert row[6] == pytest.approx(1e-7) and row[7] == pytest.approx(8e-7) and row[9] == pytest.approx(1 - 2e-7)
    assert row[10] == 1.0 and row[11] == "none" and row[12] == 1 and row[13] == 20 and row[14] == U32
    assert row[15] == pytest.approx(1e-7) and row[16] == pytest.approx(1e-7)  # 0.25 x e / 0.5
    measured = table(path, "SELECT rule, reference, tf32_error, ort32_error, float32_noise, budget FROM results "
                           "WHERE output = 'logits'")[0]
    assert measured[:2] == ("measured", "float64 twin: test")
    assert measured[2:5] == pytest.approx((1e-6, 5e-7, 1e-6)) and measured[5] == pytest.approx(1e-5)  # 10 x noise
    assert table(path, "SELECT rule FROM results WHERE output = 'probs'") == [("a-priori budget",)]
    assert table(path, "SELECT model, device, reason FROM unchecked") == \
        [("m.keras", "gpu", "no GPU visible to TensorFlow")]
    assert table(path, "SELECT node, op_type, tf_layer, local_error FROM layers") == \
        [("gemm_1", "Gemm", "dense", 3e-7)]
    run = table(path, "SELECT host, git_commit, tensorflow, tf2onnx, cntk, cntk_numpy, cntk_python, passed, "
                      "options FROM runs")[0]
    assert run[:8] == ("ci", "1" * 40, "2.21.0", "1.17.0", "2.7", "1.19.5", "3.6.15", 1)
    assert '"max_examples": 20' in run[8]
    assert table(path, "PRAGMA journal_mode") == [("wal",)]
    assert table(path, "PRAGMA application_id") == [(H.APPLICATION_ID,)]
    assert table(path, f"SELECT version FROM {H.SCHEMA_TABLE} ORDER BY version") == \
        [(v,) for v in range(1, H.SCHEMA_VERSION + 1)]
    assert table(path, "SELECT DISTINCT repairs FROM results WHERE run_id < 3") == [("[]",)]  # none then


def test_an_errored_check_is_a_row_and_fails_the_run(tmp_path: Path) -> None:
    """A worker crash leaves no result: the check is recorded with its message, the run not as
    passed, and the report lists it; a skip beside it stays a skip."""
    path = tmp_path / "h.sqlite"
    crashed = CheckRecord("b.keras", "cpu", error="the CNTK worker died (signal 9) ...", error_type="WorkerCrashed")
    results = [make_result(errors={"y": 2e-7}), crashed, CheckRecord("b.keras", "gpu", skipped="no GPU")]
    H.record_run(path, make_run(1), results)
    assert table(path, "SELECT model, device, outcome, reason FROM unchecked ORDER BY device") == [
        ("b.keras", "cpu", "error", "the CNTK worker died (signal 9) ..."), ("b.keras", "gpu", "skipped", "no GPU")]
    assert table(path, "SELECT passed FROM runs") == [(0,)]
    assert crashed.outcome == "error" and crashed.passed is False
    assert CheckRecord.from_json(crashed.to_json()) == crashed
    text = render_markdown(build_report(path))
    assert "Not checked in the newest run" in text and "| error |" in text and "signal 9" in text


def test_a_version_3_file_keeps_its_skips(tmp_path: Path) -> None:
    path = tmp_path / "v3.sqlite"
    con = sqlite3.connect(str(path), isolation_level=None)
    for v in (0, 1, 2):
        H.MIGRATIONS[v](con)
        con.execute(f"INSERT INTO {H.SCHEMA_TABLE} (version, applied) VALUES (?, 'then')", (v + 1,))
    con.execute("INSERT INTO runs (time, versions, options) VALUES ('2026-11-27T10:00:00+00:00', '{}', '{}')")
    con.execute("INSERT INTO skips (run_id, model, device, reason) VALUES (1, 'm.keras', 'gpu', 'no GPU')")
    con.close()
    H.record_run(path, make_run(2), [make_result(errors={"y": 3e-7})])
    assert table(path, "SELECT run_id, outcome, reason FROM unchecked") == [(1, "skipped", "no GPU")]


def test_same_output_twice_in_a_run_keeps_the_worst(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite"
    H.record_run(path, make_run(), [make_result(errors={"y": 1e-7}), make_result(errors={"y": 5e-7}),
                                    make_result(errors={"y": 2e-7})])
    assert table(path, "SELECT scaled_error FROM results") == [(5e-7,)]


def test_load_history_is_one_row_per_run_model_device_output(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite"
    for i in range(3):
        H.record_run(path, make_run(i), [make_result("a.keras", errors={"p": 1e-7 * (i + 1), "q": 1e-6}),
                                         make_result("b.keras", "cpu", {"z": 3e-7})])
    H.tag_run(path, 2, "release")
    df = load_history(path)
    assert len(df) == 9 and list(df.columns[:3]) == ["run_id", "time", "time_unix"]
    assert {"git_commit", "host", "tensorflow", "tf2onnx", "cntk", "cntk_python", "tags", "model", "device",
            "output", "scaled_error", "budget", "headroom", "max_ulp", "cosine", "top1", "stage", "passed",
            "examples"} <= set(df.columns)
    assert str(df["time"].dt.tz) == "UTC" and df["passed"].dtype == bool
    assert df.groupby(["run_id", "model", "device", "output"]).size().max() == 1
    assert set(df.loc[df["run_id"] == 2, "tags"]) == {"release"}
    assert len(load_history(path, since=2, model="A.KERAS")) == 4  # runs 2-3, model a: p and q
    assert len(load_history(path, since="2023-11-14T23:00:00+00:00")) == 6  # 1.7e9 + 3600 is 23:13


def test_git_commit_inside_and_outside_a_repository(tmp_path: Path) -> None:
    commit = H.git_commit(ROOT)
    if (ROOT / ".git").exists():
        assert commit is not None and len(commit) == 40
    assert H.git_commit(tmp_path) is None


def test_run_info_has_host_commit_and_both_sides_versions() -> None:
    run = H.run_info(ROOT, options={"seed": 3}, results=[make_result()])
    assert run.host and run.options == {"seed": 3}
    assert run.versions["cntk"] == "2.7" and run.versions["python"]


# -- concurrency --------------------------------------------------------------------------------

def _writer(path: str, worker: int, runs: int) -> None:
    for i in range(runs):
        H.record_run(path, make_run(i), [make_result(f"model_{worker}.keras", errors={"a": 1e-7, "b": 2e-7}),
                                         CheckRecord(f"model_{worker}.keras", "gpu", skipped="x")],
                     layerwise=[LayerRow(f"model_{worker}.keras", "cpu", "n", "Gemm", "d", 1e-7, 1e-5)])


def test_concurrent_writers_lose_no_rows(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite"  # not created yet: the processes also race to create the schema
    workers, runs = 6, 20
    ctx = multiprocessing.get_context("spawn")  # no fork after TensorFlow may have started threads
    procs = [ctx.Process(target=_writer, args=(str(path), w, runs)) for w in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * workers
    assert table(path, "SELECT COUNT(*), COUNT(DISTINCT run_id), MAX(run_id) FROM runs") == [(120, 120, 120)]
    assert table(path, "SELECT COUNT(*) FROM results") == [(workers * runs * 2,)]
    assert table(path, "SELECT COUNT(*) FROM unchecked") == [(workers * runs,)]
    assert table(path, "SELECT COUNT(*) FROM layers") == [(workers * runs,)]
    assert table(path, "SELECT model, COUNT(*) FROM results GROUP BY model") == \
        [(f"model_{w}.keras", runs * 2) for w in range(workers)]
    assert table(path, "PRAGMA integrity_check") == [("ok",)]


# -- files that are not (or no longer) ours ------------------------------------------------------

def _assert_refused(path: Path, *words: str) -> None:
    before = path.read_bytes()
    for attempt in (lambda: H.record_run(path, make_run(), [make_result()]), lambda: load_history(path),
                    lambda: H.tag_run(path, 1, "x")):
        with pytest.raises(HistoryError) as info:
            attempt()
        text = str(info.value)
        assert str(path) in text and "fix:" in text
        for w in words:
            assert w in text
    assert path.read_bytes() == before  # never overwritten
    assert not Path(f"{path}-wal").exists()


def test_a_file_that_is_not_sqlite_is_refused_and_untouched(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite"
    path.write_bytes(b"this is a text file someone saved here\n" * 200)
    _assert_refused(path, "cannot be read", "mv")


def test_a_corrupted_history_is_refused_and_untouched(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite"
    for i in range(30):
        H.record_run(path, make_run(i), [make_result(errors={f"out{k}": 1e-7 for k in range(20)})])
    data = bytearray(path.read_bytes())
    page = table(path, "PRAGMA page_size")[0][0]
    assert not Path(f"{path}-wal").exists() and len(data) > 4 * page  # checkpointed when the last writer closed
    data[page:len(data)] = bytes(len(data) - page)  # keep the header and schema page, zero the rest
    path.write_bytes(bytes(data))
    _assert_refused(path, "corrupt")


def test_another_applications_sqlite_is_refused_and_untouched(tmp_path: Path) -> None:
    path = tmp_path / "app.sqlite"
    con = sqlite3.connect(str(path))
    con.execute("CREATE TABLE contacts (name TEXT)")
    con.execute("INSERT INTO contacts VALUES ('ada')")
    con.commit()
    con.close()
    _assert_refused(path, "not a tf2cntk history", "contacts")


def test_an_empty_database_of_another_application_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "app.sqlite"
    con = sqlite3.connect(str(path))
    con.execute("PRAGMA application_id = 1234")
    con.close()
    _assert_refused(path, "0x4d2")


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite"
    H.record_run(path, make_run(), [make_result()])
    con = sqlite3.connect(str(path))
    con.execute(f"INSERT INTO {H.SCHEMA_TABLE} VALUES (99, 'future')")
    con.commit()
    con.close()
    with pytest.raises(HistoryError, match="schema version 99"):
        H.record_run(path, make_run(), [make_result()])
    assert table(path, "SELECT COUNT(*) FROM runs") == [(1,)]


def test_a_missing_file_is_not_created_by_readers(tmp_path: Path) -> None:
    path = tmp_path / "none.sqlite"
    with pytest.raises(HistoryError, match="no history"):
        load_history(path)
    assert resolve_baseline(path, "latest") is None
    assert not path.exists()


# -- migration ----------------------------------------------------------------------------------

V1_SCHEMA = [  # the first layout, as version 1 wrote it
    f"PRAGMA application_id = {H.APPLICATION_ID}",
    "CREATE TABLE tf2cntk_schema (version INTEGER PRIMARY KEY, applied TEXT NOT NULL)",
    "INSERT INTO tf2cntk_schema VALUES (1, '2024-01-01T00:00:00+00:00')",
    "CREATE TABLE runs (run_id INTEGER PRIMARY KEY AUTOINCREMENT, time TEXT NOT NULL, git_commit TEXT, "
    "versions TEXT NOT NULL DEFAULT '{}', options TEXT NOT NULL DEFAULT '{}')",
    "CREATE TABLE results (run_id INTEGER NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE, model TEXT NOT NULL, "
    "device TEXT NOT NULL, output TEXT NOT NULL, scaled_error REAL, budget REAL, passed INTEGER, "
    "PRIMARY KEY (run_id, model, device, output))",
    "INSERT INTO runs (time, git_commit, versions, options) VALUES ('2024-01-01T10:00:00+00:00', 'abc', "
    "'{\"tensorflow\": \"2.15.0\", \"tf2onnx\": \"1.16.1\", \"cntk\": \"2.7\"}', '{}')",
    "INSERT INTO runs (time, git_commit, versions, options) VALUES ('2024-01-02T10:00:00+00:00', 'abd', "
    "'{\"tensorflow\": \"2.16.1\", \"tf2onnx\": \"1.16.1\", \"cntk\": \"2.7\"}', '{}')",
    "INSERT INTO results VALUES (1, 'm.keras', 'cpu', 'y', 2e-7, 1e-5, 1)",
    "INSERT INTO results VALUES (2, 'm.keras', 'cpu', 'y', 4e-7, 1e-5, 1)",
]


def test_a_version_2_file_reads_back_judged_by_the_a_priori_budget(tmp_path: Path) -> None:
    path = tmp_path / "v2.sqlite"
    con = sqlite3.connect(str(path), isolation_level=None)
    for v in (0, 1):
        H.MIGRATIONS[v](con)
        con.execute(f"INSERT INTO {H.SCHEMA_TABLE} (version, applied) VALUES (?, 'then')", (v + 1,))
    con.execute("INSERT INTO runs (time, versions, options) VALUES ('2026-11-27T10:00:00+00:00', '{}', '{}')")
    con.execute("INSERT INTO results (run_id, model, device, output, scaled_error, budget, passed, "
                "budget_overridden) VALUES (1, 'm.keras', 'cpu', 'y', 2e-7, 1e-5, 1, 0), "
                "(1, 'm.keras', 'cpu', 'z', 2e-7, 1e-4, 1, 1)")
    con.close()
    H.record_run(path, make_run(2), [make_result(errors={"y": 3e-7}, measured=("y",))])
    assert table(path, f"SELECT MAX(version) FROM {H.SCHEMA_TABLE}") == [(H.SCHEMA_VERSION,)]
    assert table(path, "SELECT run_id, output, rule FROM results ORDER BY run_id, output") == \
        [(1, "y", "a-priori budget"), (1, "z", "user budget"), (2, "y", "measured")]


def test_a_version_1_file_is_migrated_in_place(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    con = sqlite3.connect(str(path))
    for stmt in V1_SCHEMA:
        con.execute(stmt)
    con.commit()
    con.close()
    run_id = H.record_run(path, make_run(3), [make_result(errors={"y": 3e-7})])
    assert run_id == 3
    assert table(path, f"SELECT version FROM {H.SCHEMA_TABLE} ORDER BY version") == \
        [(v,) for v in range(1, H.SCHEMA_VERSION + 1)]
    assert table(path, "SELECT DISTINCT repairs FROM results WHERE run_id < 3") == [("[]",)]  # none then
    assert table(path, "SELECT run_id, tensorflow, tf2onnx, cntk, passed FROM runs ORDER BY run_id")[:2] == \
        [(1, "2.15.0", "1.16.1", "2.7", 1), (2, "2.16.1", "1.16.1", "2.7", 1)]
    df = load_history(path)
    assert df["run_id"].tolist() == [1, 2, 3]
    assert df["headroom"].tolist()[:2] == pytest.approx([50.0, 25.0])  # backfilled from budget / error
    assert df["time"].iloc[0].isoformat() == "2024-01-01T10:00:00+00:00"
    assert table(path, "PRAGMA integrity_check") == [("ok",)]
    H.tag_run(path, 1, "old-release")  # new tables work on the migrated file
    assert resolve_baseline(path, "old-release") == 1


# -- tags, baselines, CLI -------------------------------------------------------------------------

def test_tags_are_unique_and_move_only_with_force(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite"
    for i in range(3):
        H.record_run(path, make_run(i), [make_result()])
    assert H.tag_run(path, 1, "release") is None
    assert H.tag_run(path, 1, "release") == 1  # the same run again: nothing moves
    with pytest.raises(HistoryError, match="already names run 1") as exc:
        H.tag_run(path, 3, "release")
    assert "--force" in exc.value.hint and H.tags(path) == {"release": 1}
    assert H.tag_run(path, 3, "release", force=True) == 1
    assert H.tags(path) == {"release": 3}
    for bad in ("", "42", "latest"):
        with pytest.raises(HistoryError, match="bad tag name"):
            H.tag_run(path, 1, bad)
    with pytest.raises(HistoryError, match="no run 9"):
        H.tag_run(path, 9, "x")
    assert [r["run_id"] for r in H.list_runs(path)] == [3, 2, 1]
    assert H.list_runs(path)[0]["tags"] == "release"
    assert H.recorded_models(path) == sorted({make_result().model})


def test_resolve_baseline_latest_id_and_tag(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite"
    for i in range(4):
        H.record_run(path, make_run(i), [make_result()])
    H.tag_run(path, 2, "good")
    assert resolve_baseline(path, "latest") == 4
    assert resolve_baseline(path, "latest", before=4) == 3
    assert resolve_baseline(path, "latest", before=1) is None
    assert resolve_baseline(path, "3") == 3 and resolve_baseline(path, 1) == 1
    assert resolve_baseline(path, "good") == 2
    with pytest.raises(HistoryError, match="run 7 is not in"):
        resolve_baseline(path, "7")
    with pytest.raises(HistoryError, match=r"tag 'gold' is not in .*tags: good"):
        resolve_baseline(path, "gold")


def test_cli_tag_and_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "h.sqlite"
    for i in range(2):
        H.record_run(path, make_run(i), [make_result()])
    assert cli.main(["tag", "1", "v1.0", "--history", str(path)]) == 0
    capsys.readouterr()
    assert cli.main(["tag", "2", "v1.0", "--history", str(path)]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "tag 'v1.0' already names run 1" in err and "tf2cntk tag 2 v1.0 --force" in err
    assert cli.main(["tag", "2", "v1.0", "--force", "--history", str(path)]) == 0
    assert "moved from run 1" in capsys.readouterr().out
    assert cli.main(["runs", "--history", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:2] == ["run", "time"] and out[1].split()[0] == "2" and out[1].endswith("v1.0")
    assert cli.main(["tag", "5", "x", "--history", str(path)]) == cli.EXIT_USAGE
    assert "no run 5" in capsys.readouterr().err
    model = make_result().model
    assert cli.main(["report", "--model", model[1:-1], "--history", str(path)]) == 0
    assert model in capsys.readouterr().out
    assert cli.main(["report", "--model", model[:-1] + "zz", "--history", str(path)]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "matches no model" in err and f"did you mean {model!r}" in err and "Traceback" not in err
    monkeypatch.chdir(tmp_path)  # default path: .tf2cntk/history.sqlite under the project root
    (tmp_path / "pyproject.toml").write_text("")
    assert cli.main(["runs"]) == cli.EXIT_USAGE
    assert f"no history at {tmp_path / '.tf2cntk' / 'history.sqlite'}" in capsys.readouterr().err
    assert not (tmp_path / ".tf2cntk").exists()
    assert os.getcwd() == str(tmp_path)


def test_a_history_that_cannot_be_created_or_written_says_so_not_corrupt(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(HistoryError) as err:
        H.ensure_history(blocker / "history.sqlite")  # its directory would be a file
    assert "cannot be created" in str(err.value) and "corrupt" not in str(err.value) and "mv" not in str(err.value)
    assert "fix: point --tf2cntk-history at a file in a writable directory" in str(err.value)
    path = tmp_path / "history.sqlite"
    H.ensure_history(path)
    # as root a read-only file stays writable, so SQLite's own words for one are given here
    err2 = H._broken(path, sqlite3.OperationalError("attempt to write a readonly database"))
    assert "cannot be written" in str(err2) and "chmod u+w" in str(err2) and "corrupt" not in str(err2)
    assert "corrupt" in str(H._broken(path, sqlite3.DatabaseError("file is not a database")))
