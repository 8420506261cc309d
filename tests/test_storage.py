"""Storage: schema, connection discipline, the runtime-facing stores, migrator, backup, check."""

from __future__ import annotations

import inspect
import json
import math
import os
import signal
import stat
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import apsw
import pytest

import abstractgateway as gw
from abstractruntime import Runtime, RunStatus
from abstractruntime.core.models import StepRecord, StepStatus
from abstractruntime.storage.commands import CommandRecord
from conftest import LiveServer, ask_then_echo_workflow, make_config, wait_for
from processes import spawn_python


def _normalise(records, run_id):
    """Ledger records without the fields that differ between two identical executions."""
    keep = ("node_id", "status", "effect", "result", "error", "attempt")
    return json.loads(json.dumps([{k: r.get(k) for k in keep} for r in records]).replace(run_id, "RUN"))


def _run_ask_echo(stores: gw.Stores) -> tuple[str, list]:
    rt = Runtime(run_store=stores.runs, ledger_store=stores.ledger, artifact_store=stores.artifacts)
    wf = ask_then_echo_workflow()
    run_id = rt.start(workflow=wf, vars={"name": "ada"})
    state = rt.tick(workflow=wf, run_id=run_id)
    assert state.status == RunStatus.WAITING
    state = rt.resume(workflow=wf, run_id=run_id, wait_key=state.waiting.wait_key, payload={"text": "ada"})
    state = rt.tick(workflow=wf, run_id=run_id)
    assert state.status == RunStatus.COMPLETED
    assert state.output["greeting"] == "hello ada"
    return run_id, stores.ledger.list(run_id)


def test_runtime_runs_a_workflow_on_sqlite_and_file_backends_with_the_same_ledger(data_dir, tmp_path):
    sqlite_stores = gw.open_stores(make_config(data_dir))
    file_dir = tmp_path / "filedata"
    file_dir.mkdir()
    file_stores = gw.open_stores(make_config(file_dir, store_backend="file"))
    try:
        rid_a, ledger_a = _run_ask_echo(sqlite_stores)
        rid_b, ledger_b = _run_ask_echo(file_stores)
        assert len(ledger_a) >= 4
        assert _normalise(ledger_a, rid_a) == _normalise(ledger_b, rid_b)
        assert sqlite_stores.ledger.count(rid_a) == len(ledger_a)
        assert sqlite_stores.runs.load(rid_a).status == RunStatus.COMPLETED
        # the file backend really wrote the upstream layout
        assert (file_dir / f"run_{rid_b}.json").exists()
        assert (file_dir / f"ledger_{rid_b}.jsonl").exists()
    finally:
        sqlite_stores.close()
        file_stores.close()


def test_database_is_wal_full_sync_and_versioned(stores):
    conn = stores.db.connection()
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert conn.execute("PRAGMA user_version").fetchone()[0] == gw.SCHEMA_VERSION
    for table in ("runs", "ledger", "commands", "command_cursors", "artifacts", "artifact_blobs", "bundles", "leases"):
        assert conn.execute("SELECT COUNT(*) FROM sqlite_master WHERE name = ?", (table,)).fetchone()[0] == 1


def test_synchronous_normal_override(data_dir):
    s = gw.open_stores(make_config(data_dir, sqlite_synchronous="normal"))
    try:
        assert s.db.connection().execute("PRAGMA synchronous").fetchone()[0] == 1
    finally:
        s.close()


def test_run_store_queries(stores):
    rt = Runtime(run_store=stores.runs, ledger_store=stores.ledger)
    wf = ask_then_echo_workflow()
    parent = rt.start(workflow=wf, session_id="s1")
    child = rt.start(workflow=wf, parent_run_id=parent, session_id="s1")
    rt.tick(workflow=wf, run_id=child)  # child now waits on the user
    assert [r.run_id for r in stores.runs.list_children(parent_run_id=parent)] == [child]
    waiting = stores.runs.list_runs(status=RunStatus.WAITING)
    assert [r.run_id for r in waiting] == [child]
    key = waiting[0].waiting.wait_key
    assert stores.runs.ids_waiting_on(key) == [child]
    assert stores.runs.child_ids(parent) == [child]
    index = stores.runs.list_run_index(session_id="s1", root_only=True)
    assert [row["run_id"] for row in index] == [parent]
    # keyset pagination walks every run exactly once
    page1 = stores.runs.list_run_index(limit=1)
    page2 = stores.runs.list_run_index(limit=1, before=(page1[0]["updated_at"], page1[0]["run_id"]))
    assert {page1[0]["run_id"], page2[0]["run_id"]} == {parent, child}
    assert stores.runs.delete(child) is True
    assert stores.runs.load(child) is None
    assert stores.runs.delete(child) is False


def test_due_wait_until_index(stores):
    from abstractruntime import RunState, WaitReason, WaitState

    due = RunState.new(workflow_id="w", entry_node="n")
    due.status = RunStatus.WAITING
    due.waiting = WaitState(reason=WaitReason.UNTIL, until="2000-01-01T00:00:00+00:00")
    later = RunState.new(workflow_id="w", entry_node="n")
    later.status = RunStatus.WAITING
    later.waiting = WaitState(reason=WaitReason.UNTIL, until="2999-01-01T00:00:00+00:00")
    stores.runs.save(due)
    stores.runs.save(later)
    got = stores.runs.list_due_wait_until(now_iso=gw.utc_now_iso())
    assert [r.run_id for r in got] == [due.run_id]


def _run_threads(threads, timeout: float = 60.0) -> None:
    """Start every thread, then wait for all of them (bounded)."""
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)


def _step(run_id: str, n: int) -> StepRecord:
    return StepRecord(run_id=run_id, step_id=f"s{n}", node_id=f"n{n}", status=StepStatus.COMPLETED)


def test_ledger_page_and_count(stores):
    for n in range(1, 26):
        stores.ledger.append(_step("r1", n))
    assert stores.ledger.count("r1") == 25
    assert stores.ledger.count("unknown") == 0
    pages, after = [], 0
    while True:
        page = stores.ledger.page("r1", after, 7)
        if not page:
            break
        pages.extend(page)
        after += len(page)
    assert pages == stores.ledger.list("r1")
    assert [p["step_id"] for p in pages] == [f"s{n}" for n in range(1, 26)]
    assert stores.ledger.page("r1", 25, 10) == []
    assert stores.ledger.count_many(["r1", "nope"]) == {"r1": 25}


def test_command_store_is_idempotent_by_command_id(stores):
    rec = CommandRecord(command_id="c1", run_id="r1", type="pause", payload={}, ts="")
    first = stores.commands.append(rec)
    again = stores.commands.append(CommandRecord(command_id="c1", run_id="other", type="cancel", payload={"x": 1},
                                                 ts=""))
    assert (first.accepted, first.duplicate) == (True, False)
    assert (again.accepted, again.duplicate, again.seq) == (False, True, first.seq)
    second = stores.commands.append(CommandRecord(command_id="c2", run_id="r1", type="resume", payload={}, ts=""))
    assert second.seq > first.seq
    items, cursor = stores.commands.list_after(after=0)
    assert [i.command_id for i in items] == ["c1", "c2"] and cursor == second.seq
    assert items[0].type == "pause"  # the duplicate did not overwrite the original
    with pytest.raises(ValueError):
        stores.commands.append(CommandRecord(command_id="c3", run_id="", type="pause", payload={}, ts=""))
    with pytest.raises(ValueError):
        stores.commands.append(CommandRecord(command_id="c4", run_id="r", type="pause", payload={"f": object()}, ts=""))
    stores.cursor.save(first.seq)
    assert stores.cursor.load() == first.seq


def test_a_failing_write_does_not_undo_its_batch_neighbours(stores):
    db = stores.db
    barrier = threading.Barrier(6)
    errors = []

    def good(i):
        barrier.wait()
        db.write(lambda c: c.execute("INSERT INTO leases VALUES (?, 'o', 0, 0, 0, 0)", (f"l{i}",)))

    def bad():
        barrier.wait()
        try:
            db.write(lambda c: (c.execute("INSERT INTO leases VALUES ('bad', 'o', 0, 0, 0, 0)"),
                                c.execute("INSERT INTO nope VALUES (1)")))
        except apsw.SQLError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=good, args=(i,)) for i in range(5)] + [threading.Thread(target=bad)]
    _run_threads(threads)
    assert len(errors) == 1
    names = {r[0] for r in db.query("SELECT name FROM leases")}
    assert names == {f"l{i}" for i in range(5)}


def test_transaction_groups_writes_atomically(stores):
    with pytest.raises(RuntimeError):
        with stores.db.transaction():
            stores.ledger.append(_step("tx", 1))
            stores.cursor.save(42)
            raise RuntimeError("crash before commit")
    assert stores.ledger.count("tx") == 0 and stores.cursor.load() == 0
    with stores.db.transaction():
        stores.ledger.append(_step("tx", 1))
        stores.cursor.save(42)
    assert stores.ledger.count("tx") == 1 and stores.cursor.load() == 42


def test_an_isolating_transaction_undoes_only_the_write_that_failed(stores):
    """Independent requests sharing one commit: a write failing after its first statement leaves
    nothing of itself, its neighbours commit, and its caller gets the error."""
    db = stores.db
    insert = "INSERT INTO leases VALUES (?, 'o', 0, 0, 0, 0)"
    with db.transaction(isolate_writes=True):
        db.write(lambda c: c.execute(insert, ("before",)))
        with pytest.raises(apsw.SQLError):
            db.write(lambda c: (c.execute(insert, ("half",)), c.execute("INSERT INTO nope VALUES (1)")))
        db.write(lambda c: c.execute(insert, ("after",)))
    assert {r[0] for r in db.query("SELECT name FROM leases")} == {"before", "after"}


def test_concurrent_appenders_lose_and_duplicate_nothing(stores):
    per_thread = 150
    errors = []

    def worker(t):
        try:
            for n in range(per_thread):
                stores.ledger.append(_step(f"run{t}", n))
                stores.commands.append(CommandRecord(command_id=f"t{t}-{n}", run_id=f"run{t}", type="pause", payload={},
                                                     ts=""))
        except Exception as exc:  # noqa: BLE001 - any error is a failure here
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    _run_threads(threads)
    assert errors == []
    for t in range(8):
        seqs = [r[0] for r in stores.db.query("SELECT seq FROM ledger WHERE run_id = ? ORDER BY seq", (f"run{t}",))]
        assert seqs == list(range(1, per_thread + 1))
        assert [r["step_id"] for r in stores.ledger.list(f"run{t}")] == [f"s{n}" for n in range(per_thread)]
    seqs = [r[0] for r in stores.db.query("SELECT seq FROM commands ORDER BY seq")]
    assert len(seqs) == 8 * per_thread == len(set(seqs))


def test_concurrent_writers_in_two_processes(data_dir):
    """A second process writing the same file never surfaces 'database is locked'."""
    db_path = data_dir / "gateway.sqlite3"
    gw.Database(db_path).close()
    code = (
        "import abstractgateway as gw, sys\n"
        "from abstractruntime.core.models import StepRecord, StepStatus\n"
        "db = gw.Database(sys.argv[1]); l = gw.SqliteLedgerStore(db)\n"
        "for n in range(200):"
        " l.append(StepRecord(run_id=sys.argv[2], step_id=str(n), node_id='n', status=StepStatus.COMPLETED))\n"
    )
    procs = [spawn_python(code, str(db_path), f"p{i}") for i in range(3)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    db = gw.Database(db_path)
    try:
        for i in range(3):
            assert gw.SqliteLedgerStore(db).count(f"p{i}") == 200
    finally:
        db.close()


CRASH_CHILD = """
import sys, abstractgateway as gw
from abstractruntime.core.models import StepRecord, StepStatus
from abstractruntime.storage.commands import CommandRecord
stores = gw.open_stores(gw.Config.load(environ={"ABSTRACTGATEWAY_DATA_DIR": sys.argv[1]}))
n = 0
while True:
    n += 1
    stores.ledger.append(StepRecord(run_id="crash", step_id=str(n), node_id="n", status=StepStatus.COMPLETED))
    stores.commands.append(CommandRecord(command_id=f"c{n}", run_id="crash", type="pause", payload={}, ts=""))
    print(n, flush=True)  # acknowledged
"""


def test_sigkill_loses_no_acknowledged_record(data_dir):
    proc = spawn_python(CRASH_CHILD, str(data_dir), stdout=subprocess.PIPE, text=True)
    acked = 0
    deadline = time.monotonic() + 60
    while acked < 300 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        acked = int(line)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert acked >= 300
    stores = gw.open_stores(make_config(data_dir))
    try:
        seqs = [r[0] for r in stores.db.query("SELECT seq FROM ledger WHERE run_id = 'crash' ORDER BY seq")]
        assert len(seqs) >= acked
        assert seqs == list(range(1, len(seqs) + 1))
        got = {r[0] for r in stores.db.query("SELECT command_id FROM commands")}
        assert {f"c{n}" for n in range(1, acked + 1)} <= got
        facts, problems = gw.check_database(stores.db)
        assert problems == []
    finally:
        stores.close()


def test_artifacts_live_in_the_database(stores):
    meta = stores.artifacts.store(b"x" * 5000, content_type="text/plain", run_id="r1", tags={"k": "v"})
    again = stores.artifacts.store(b"x" * 5000, content_type="text/plain", run_id="r2")
    assert meta.blob_id == again.blob_id and meta.artifact_id != again.artifact_id
    assert stores.db.query_one("SELECT COUNT(*) FROM artifact_blobs")[0] == 1
    loaded = stores.artifacts.load(meta.artifact_id)
    assert loaded.content == b"x" * 5000 and loaded.metadata.tags == {"k": "v"}
    assert stores.artifacts.read_range(meta.artifact_id, 10, 5) == b"xxxxx"
    assert [m.artifact_id for m in stores.artifacts.list_by_run("r1")] == [meta.artifact_id]
    assert stores.artifacts.get_metadata("../etc/passwd") is None
    assert stores.artifacts.delete(meta.artifact_id) is True
    assert stores.artifacts.exists(again.artifact_id)
    assert stores.artifacts.delete(again.artifact_id) is True
    assert stores.db.query_one("SELECT COUNT(*) FROM artifact_blobs")[0] == 0


def test_bundles_and_leases(stores):
    stores.bundles.put("demo", "1.0.0", b"zipbytes")
    with pytest.raises(FileExistsError):
        stores.bundles.put("demo", "1.0.0", b"other")
    stores.bundles.put("demo", "1.0.0", b"other", overwrite=True)
    assert [b.content for b in stores.bundles.list()] == [b"other"]
    assert stores.bundles.delete("demo") == 1

    assert stores.leases.acquire("runner", "a", ttl_s=0.3)
    assert not stores.leases.acquire("runner", "b", ttl_s=0.3)
    assert stores.leases.acquire("runner", "a", ttl_s=0.3)  # renew
    time.sleep(0.35)
    assert stores.leases.acquire("runner", "b", ttl_s=5)  # a's lease expired
    stores.leases.release("runner", "a")  # not a's any more: no effect
    assert stores.leases.holder("runner")["owner"] == "b"


def test_a_lease_left_by_a_clock_that_was_ahead_lapses_after_its_ttl_of_real_time(stores):
    """A holder that died with the wall clock an hour ahead (stepped back since, by NTP or a reboot)
    left a heartbeat in the future: its lease lapses `ttl` after another owner first sees it."""
    ahead = time.time() + 3600
    stores.db.write(lambda conn: conn.execute(
        "INSERT INTO leases (name, owner, acquired_at, heartbeat_at, expires_at, epoch) VALUES (?,?,?,?,?,?)",
        ("runner", "dead", ahead, ahead, ahead + 0.3, 1)))
    seen = time.monotonic()
    assert not stores.leases.acquire("runner", "b", ttl_s=5)
    token = wait_for(lambda: stores.leases.acquire("runner", "b", ttl_s=5), timeout=5)
    assert token.epoch == 2 and 0.25 <= time.monotonic() - seen < 3
    assert stores.leases.holder("runner")["owner"] == "b"


# -- schema versions --------------------------------------------------------------------------


def test_v1_database_is_upgraded_in_place(tmp_path):
    path = tmp_path / "old.sqlite3"
    conn = apsw.Connection(str(path))
    assert gw.apply_schema(conn, target=1) == 1
    conn.execute("INSERT INTO ledger VALUES ('r', 1, '{\"a\":1}')")
    conn.execute("INSERT INTO ledger VALUES ('damaged', 1, 'not json')")  # no later migration trips on it
    conn.close()
    db = gw.Database(path)
    try:
        assert db.schema_version == gw.SCHEMA_VERSION > 1
        assert db.query_one("PRAGMA user_version")[0] == gw.SCHEMA_VERSION
        assert gw.SqliteLedgerStore(db).list("r") == [{"a": 1}]
        assert db.query_one("SELECT COUNT(*) FROM command_outcomes")[0] == 0
        assert gw.SqliteLedgerStore(db).completed_record("r", "k") is None  # its index was built
    finally:
        db.close()


UPGRADING_CHILD = """
import sys, abstractgateway as gw
print("opening", flush=True)
gw.Database(sys.argv[1])
print("upgraded", flush=True)
"""


@pytest.mark.slow
def test_sigkill_during_a_schema_upgrade_leaves_the_old_version_or_the_new_one_whole(tmp_path):
    """The upgrade is one transaction with its version bump: killed at any point while it builds an
    index over a long ledger, the file is the old version intact, or the new one complete."""
    path = tmp_path / "v6.sqlite3"
    conn = apsw.Connection(str(path))
    gw.apply_schema(conn, target=gw.SCHEMA_VERSION - 1)
    record = json.dumps({"status": "waiting", "result": {"wait": {"wait_key": "k"}}, "pad": "x" * 300})
    with conn:
        conn.executemany("INSERT INTO ledger VALUES (?, ?, ?)", ((f"r{i % 50}", i // 50 + 1, record)
                                                                 for i in range(60_000)))
    conn.close()
    outcomes = []
    for delay in (0.0, 0.03, 0.08, None):  # after the open began: early, during the index build; after it
        child = spawn_python(UPGRADING_CHILD, str(path), stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline() == "opening\n"
        if delay is None:
            assert child.stdout.readline() == "upgraded\n"
        else:
            time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.wait()
        probe = apsw.Connection(str(path))
        version = probe.execute("PRAGMA user_version").fetchone()[0]
        assert probe.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        indexes = {r[0] for r in probe.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert ("ledger_waiting_by_key" in indexes) == (version == gw.SCHEMA_VERSION), version
        assert probe.execute("SELECT COUNT(*) FROM ledger").fetchone()[0] == 60_000
        probe.close()
        outcomes.append(version)
    db = gw.Database(path)  # the next start finishes what a killed one began
    try:
        assert db.schema_version == gw.SCHEMA_VERSION and len(gw.SqliteLedgerStore(db).waiting_records("r7", "k")) > 0
    finally:
        db.close()
    assert gw.SCHEMA_VERSION - 1 in outcomes and gw.SCHEMA_VERSION in outcomes  # kills before and after the commit


def test_database_from_a_newer_gateway_is_refused(tmp_path):
    path = tmp_path / "new.sqlite3"
    conn = apsw.Connection(str(path))
    conn.execute(f"PRAGMA user_version = {gw.SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(gw.SchemaError, match="newer than this gateway supports"):
        gw.Database(path)


# -- migrator ---------------------------------------------------------------------------------


def _make_upstream_file_dir(base: Path) -> dict:
    """A data dir in the upstream layout, written by the runtime's own file stores."""
    stores = gw.open_stores(make_config(base, store_backend="file", db_path=str(base / "ignored.sqlite3")))
    ids = []
    for _ in ("ada", "bob", "cyd"):
        rid, _ = _run_ask_echo(stores)
        ids.append(rid)
    for n in range(5):
        stores.commands.append(CommandRecord(command_id=f"cmd{n}", run_id=ids[0], type="pause", payload={"n": n},
                                             ts=""))
    stores.cursor.save(3)
    art = stores.artifacts.store(b"artifact-bytes", content_type="text/plain", run_id=ids[0])
    stores.close()
    (base / "ignored.sqlite3").unlink()
    for suffix in ("-wal", "-shm"):
        (base / f"ignored.sqlite3{suffix}").unlink(missing_ok=True)
    # a crash left a half-written last line
    with (base / f"ledger_{ids[1]}.jsonl").open("a") as fh:
        fh.write('{"run_id": "' + ids[1] + '", "step_id": "trunc')
    return {"runs": ids, "artifact": art.artifact_id}


def _snapshot(path: Path) -> dict:
    return {p.relative_to(path): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(path.rglob("*")) if p.is_file()}


def test_migrate_file_layout_round_trip_idempotent(tmp_path, capsys):
    src = tmp_path / "upstream"
    src.mkdir()
    made = _make_upstream_file_dir(src)
    before = _snapshot(src)
    db_path = tmp_path / "dest" / "gateway.sqlite3"
    argv = ["migrate", "--from=file", "--to=sqlite", "--data-dir", str(src), "--db-path", str(db_path)]
    assert gw.main(argv) == 0
    out, err = capsys.readouterr()
    assert "verification: ok" in out
    assert f"ledger_{made['runs'][1]}.jsonl:" in out  # the truncated line is reported with file:line
    assert _snapshot(src) == before  # the source is never modified

    dest = gw.open_stores(make_config(tmp_path / "dest", db_path=str(db_path)))
    src_stores = gw.open_stores(make_config(src, store_backend="file", db_path=str(tmp_path / "x.sqlite3")))
    try:
        for rid in made["runs"]:
            assert dest.runs.load(rid).status == RunStatus.COMPLETED
            assert dest.ledger.list(rid) == src_stores.ledger.list(rid)
        assert dest.commands.get_last_seq() == 5
        assert dest.cursor.load() == 3
        assert dest.artifacts.load(made["artifact"]).content == b"artifact-bytes"
        counts = gw.table_counts(dest.db)
    finally:
        dest.close()
        src_stores.close()

    assert gw.main(argv) == 0  # second run: nothing new
    out, _ = capsys.readouterr()
    assert "verification: ok" in out
    dest = gw.open_stores(make_config(tmp_path / "dest", db_path=str(db_path)))
    try:
        assert gw.table_counts(dest.db) == counts
    finally:
        dest.close()
    report_lines = {line.split()[0]: line.split()[1:] for line in out.splitlines()
                    if line.split() and line.split()[0] in gw.MIGRATION_KINDS}
    assert all(cols[1] == "0" for cols in report_lines.values())  # imported 0 of every kind


def test_migrate_resumes_after_interruption(tmp_path):
    src = tmp_path / "upstream"
    src.mkdir()
    made = _make_upstream_file_dir(src)
    dest = gw.open_stores(make_config(tmp_path / "dest"))
    try:
        # simulate an interrupted first run: one run and part of one ledger already imported
        full = gw.open_stores(make_config(src, store_backend="file", db_path=str(tmp_path / "x.sqlite3")))
        rid = made["runs"][0]
        dest.runs.save(full.runs.load(rid))
        for rec in full.ledger.list(rid)[:2]:
            dest.ledger.append_json(rid, json.dumps(rec))
        full.close()
        report = gw.migrate("file", dest, data_dir=src, progress=None)
        assert report.ok, report.render()
        assert report.imported["runs"] == 2 and report.present["runs"] == 3
        assert dest.ledger.count(rid) == len(gw.FileLedgerStore(src, gw.Signals()).list(rid))
    finally:
        dest.close()


def test_migrate_from_upstream_sqlite(tmp_path):
    from abstractruntime.storage.sqlite import (
        SqliteCommandCursorStore, SqliteCommandStore, SqliteDatabase, SqliteLedgerStore, SqliteRunStore)

    updb = SqliteDatabase(tmp_path / "upstream.sqlite3")
    up = SimpleNamespace(runs=SqliteRunStore(updb), ledger=SqliteLedgerStore(updb), artifacts=None,
                         commands=SqliteCommandStore(updb), cursor=SqliteCommandCursorStore(updb))
    rid, ledger = _run_ask_echo(up)
    up.commands.append(CommandRecord(command_id="u1", run_id=rid, type="cancel", payload={}, ts=""))
    up.cursor.save(1)
    dest = gw.open_stores(make_config(tmp_path / "dest"))
    try:
        report = gw.migrate("sqlite-upstream", dest, source_db=tmp_path / "upstream.sqlite3", progress=None)
        assert report.ok, report.render()
        assert dest.ledger.list(rid) == ledger
        assert dest.commands.get("u1").type == "cancel"
        assert dest.cursor.load() == 1
        again = gw.migrate("sqlite-upstream", dest, source_db=tmp_path / "upstream.sqlite3", progress=None)
        assert sum(again.imported.values()) == 0
    finally:
        dest.close()


# -- backup and check -------------------------------------------------------------------------


def test_backup_while_writing_restores_cleanly(stores, tmp_path):
    stop = threading.Event()
    written = []

    def writer():
        n = 0
        while not stop.is_set():
            n += 1
            stores.ledger.append(_step("busy", n))
            written.append(n)

    t = threading.Thread(target=writer)
    t.start()
    try:
        while len(written) < 50:
            time.sleep(0.01)
        dest = stores.db.backup_to(tmp_path / "backup" / "copy.sqlite3")
        time.sleep(0.05)
    finally:
        stop.set()
        t.join()
    restored = gw.Database(dest)
    try:
        facts, problems = gw.check_database(restored)
        assert problems == []
        n = gw.SqliteLedgerStore(restored).count("busy")
        assert 50 <= n <= len(written)
        seqs = [r[0] for r in restored.query("SELECT seq FROM ledger WHERE run_id='busy' ORDER BY seq")]
        assert seqs == list(range(1, n + 1))
    finally:
        restored.close()


def test_two_backups_to_one_destination_each_leave_a_whole_owner_only_copy(stores, tmp_path):
    """Each copy is written under a name of its own and renamed over the destination whole: what a backup
    reports written is a sound database, readable by its owner only (it holds the token), and no
    partial file is left beside it."""
    for n in range(300):
        stores.ledger.append(StepRecord(run_id="big", step_id=f"s{n}", node_id="n", status=StepStatus.COMPLETED,
                                        result={"text": "x" * 2000}))
    dest = tmp_path / "backups" / "gateway.sqlite3"
    seen: list = []

    def backup():
        written = stores.db.backup_to(dest)
        with open(written, "rb") as f:
            seen.append(f.read(16))  # right after it returned: another backup may be writing meanwhile

    for _ in range(3):
        threads = [threading.Thread(target=backup) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert seen == [b"SQLite format 3\x00"] * 9
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600
    assert [p.name for p in dest.parent.iterdir()] == ["gateway.sqlite3"]
    restored = gw.Database(dest)
    try:
        assert gw.check_database(restored)[1] == [] and gw.SqliteLedgerStore(restored).count("big") == 300
    finally:
        restored.close()


def test_check_and_backup_commands(data_dir, tmp_path, capsys):
    db_path = data_dir / "gateway.sqlite3"
    assert gw.main(["check", "--db-path", str(db_path)]) == 1  # no database yet
    s = gw.open_stores(make_config(data_dir))
    s.ledger.append(_step("r", 1))
    s.close()
    capsys.readouterr()
    assert gw.main(["check", "--db-path", str(db_path)]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["counts"]["ledger"] == 1 and facts["problems"] == [] and facts["schema_version"] == gw.SCHEMA_VERSION
    assert gw.main(["backup", str(tmp_path / "b.sqlite3"), "--db-path", str(db_path)]) == 0
    assert gw.main(["check", "--db-path", str(tmp_path / "b.sqlite3")]) == 0
    # a gap in a ledger is a problem `check` reports
    conn = apsw.Connection(str(db_path))
    conn.execute("INSERT INTO ledger VALUES ('r', 3, '{}')")
    conn.close()
    capsys.readouterr()
    assert gw.main(["check", "--db-path", str(db_path)]) == 1
    assert "gaps" in capsys.readouterr().out


def test_new_database_file_is_owner_only(stores):
    assert (stores.db.path.stat().st_mode & 0o777) == 0o600


def test_a_failing_leader_never_strands_waiting_writers(stores):
    db = stores.db
    real = db.connection
    armed = threading.Event()
    armed.set()

    def flaky():
        if armed.is_set() and threading.current_thread().name.startswith("w"):
            armed.clear()
            raise apsw.CantOpenError("simulated: out of file handles")
        return real()

    db.connection = flaky
    outcomes = {}

    def writer(i):
        try:
            stores.ledger.append(_step(f"lead{i}", 1))
            outcomes[i] = "ok"
        except gw.StorageError as exc:  # apsw's error, translated: no SQL detail leaks upwards
            outcomes[i] = type(exc.__cause__).__name__

    threads = [threading.Thread(target=writer, args=(i,), name=f"w{i}") for i in range(6)]
    _run_threads(threads)
    assert not any(t.is_alive() for t in threads)
    assert len(outcomes) == 6 and "CantOpenError" in outcomes.values()
    assert db.write_failure["code"] == "storage_error"  # health reports it for a while, then forgets


def test_what_a_killed_creation_or_backup_left_is_removed_once_its_process_is_gone(tmp_path):
    """A kill -9 while a fresh database or a backup is written whole leaves its temp file (and side files);
    the next open, or backup to the same place, removes those of dead processes, never a live one's nor
    one written to within the last minute."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    names = [f".gateway.sqlite3.{dead.pid}.abc123.new", f".gateway.sqlite3.{dead.pid}.abc123.new-wal",
             f".gateway.sqlite3.{os.getpid()}.def456.new", f".copy.sqlite3.{dead.pid}.abc123.partial",
             f".copy.sqlite3.{dead.pid}.abc123.partial-journal", "unrelated.new",
             ".gateway.sqlite3.1\u00b2.abc123.new", f".gateway.sqlite3.{10**20}.abc123.new"]  # not ours: left
    for name in names:
        (tmp_path / name).write_bytes(b"x")
        os.utime(tmp_path / name, (time.time() - 120,) * 2)  # untouched for two minutes
    fresh = tmp_path / f".gateway.sqlite3.{dead.pid}.aaaaaa.new"  # maybe another pid namespace's, being written
    fresh.write_bytes(b"x")
    names.append(fresh.name)
    db = gw.Database(tmp_path / "gateway.sqlite3")
    try:
        db.backup_to(tmp_path / "copy.sqlite3")
    finally:
        db.close()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name not in ("gateway.sqlite3", "copy.sqlite3")) == sorted(
        [f".gateway.sqlite3.{os.getpid()}.def456.new", fresh.name, "unrelated.new",
         ".gateway.sqlite3.1\u00b2.abc123.new", f".gateway.sqlite3.{10**20}.abc123.new"])


def test_backup_and_check_never_create_or_migrate(tmp_path, capsys):
    missing = tmp_path / "typo.sqlite3"
    assert gw.main(["backup", str(tmp_path / "out.sqlite3"), "--db-path", str(missing)]) == 1
    assert not missing.exists() and not (tmp_path / "out.sqlite3").exists()
    old = tmp_path / "v1.sqlite3"
    conn = apsw.Connection(str(old))
    gw.apply_schema(conn, target=1)
    conn.close()
    assert gw.main(["check", "--db-path", str(old)]) == 1  # reports the old schema...
    assert apsw.Connection(str(old)).execute("PRAGMA user_version").fetchone()[0] == 1  # ...without upgrading it


def test_migrate_into_a_database_with_its_own_commands_reports_and_protects_them(tmp_path):
    src = tmp_path / "upstream"
    src.mkdir()
    _make_upstream_file_dir(src)
    dest = gw.open_stores(make_config(tmp_path / "dest"))
    try:
        dest.commands.append(CommandRecord(command_id="local-1", run_id="r", type="pause", payload={}, ts=""))
        report = gw.migrate("file", dest, data_dir=src, progress=None)
        assert not report.ok
        assert any("taken by another command" in m for m in report.mismatches)
        assert dest.cursor.load() == 0  # the local command (seq 1) is still to be applied
        assert dest.commands.get("local-1").seq == 1
    finally:
        dest.close()


def test_dataclass_json_matches_asdict():
    from dataclasses import asdict

    from abstractruntime import RunState, WaitReason, WaitState

    run = RunState.new(workflow_id="w", entry_node="n", vars={"a": [1, {"b": (2, 3)}], "s": "é"})
    run.waiting = WaitState(reason=WaitReason.USER, wait_key="k", details={"x": 1})
    record = _step("r", 1)
    record.effect = {"type": "ask_user", "payload": {"nested": {"deep": [1, 2]}}}
    for value in (run, record):
        assert json.loads(gw.dataclass_json(value)) == json.loads(json.dumps(asdict(value)))


def test_a_failing_single_statement_write_in_a_batch_spares_its_neighbours(stores):
    db = stores.db
    barrier = threading.Barrier(5)
    errors = []

    def append(i):
        barrier.wait()
        stores.ledger.append(_step("batch", i))

    def duplicate():
        barrier.wait()
        try:
            db.write(lambda c: c.execute("INSERT INTO leases VALUES"
                                         " ('dup', 'o', 0, 0, 0, 0), ('dup', 'o', 0, 0, 0, 0)"),
                     single_statement=True)
        except apsw.ConstraintError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=append, args=(i,)) for i in range(4)] + [threading.Thread(target=duplicate)]
    _run_threads(threads)
    assert len(errors) == 1 and stores.ledger.count("batch") == 4
    assert db.query_one("SELECT COUNT(*) FROM leases")[0] == 0  # the failed statement left no half row


def test_check_never_writes_even_a_leftover_wal(tmp_path, data_dir):
    """A crashed gateway leaves a WAL; inspecting the file must not fold it in (read-only open)."""
    import shutil

    live = gw.open_stores(make_config(data_dir))
    for i in range(20):
        live.ledger.append(_step("r", i + 1))
    copy = tmp_path / "copy"
    copy.mkdir()
    for suffix in ("", "-wal", "-shm"):  # the files as a kill -9 would leave them
        shutil.copy(str(live.db.path) + suffix, copy / ("gateway.sqlite3" + suffix))
    live.close()
    data_files = ("gateway.sqlite3", "gateway.sqlite3-wal")  # (-shm is an index SQLite may rebuild)
    before = {name: (copy / name).read_bytes() for name in data_files}
    assert gw.main(["check", "--db-path", str(copy / "gateway.sqlite3")]) == 0
    assert {name: (copy / name).read_bytes() for name in data_files} == before


def _crashed_copy(data_dir: Path, into: Path, records: int = 40) -> Path:
    """The database files as a kill -9 leaves them: committed writes still in the WAL."""
    import shutil

    live = gw.open_stores(make_config(data_dir))
    for i in range(records):
        live.ledger.append(_step("r", i + 1))
    into.mkdir()
    for suffix in ("", "-wal"):
        shutil.copy(str(live.db.path) + suffix, into / ("gateway.sqlite3" + suffix))
    live.close()
    return into / "gateway.sqlite3"


def _ledger_count(db_path: Path) -> int:
    db = gw.Database(db_path, migrate=False)
    try:
        return db.query_one("SELECT COUNT(*) FROM ledger")[0]
    finally:
        db.close()


def test_a_damaged_wal_is_reported_a_copy_kept_and_a_torn_tail_is_not(tmp_path, data_dir, capsys):
    """SQLite silently drops a WAL's frames from the first one that does not check out. A crash only
    tears the uncommitted tail (not reported); a commit beyond a bad frame, or a bad header in front
    of frames, is damage: `check` lists it, and opening it warns and keeps a copy before the WAL is reused."""
    intact = _crashed_copy(data_dir, tmp_path / "intact")
    wal = Path(f"{intact}-wal")
    assert gw.wal_damage(intact) is None and _ledger_count(intact) == 40
    page_size = int.from_bytes(wal.read_bytes()[8:12], "big")
    frame = 24 + page_size
    frames = (wal.stat().st_size - 32) // frame

    torn = tmp_path / "torn"
    torn.mkdir()
    (torn / "gateway.sqlite3").write_bytes(intact.read_bytes())
    Path(f"{torn / 'gateway.sqlite3'}-wal").write_bytes(wal.read_bytes()[:32 + frames * frame - frame // 2])
    assert gw.wal_damage(torn / "gateway.sqlite3") is None  # a crash mid-write: the last commit is not acknowledged
    data = wal.read_bytes()  # a crash between the last commit frame's header and its page: not damage either
    Path(f"{torn / 'gateway.sqlite3'}-wal").write_bytes(data[:32 + (frames - 1) * frame + 24] + b"\xee" * page_size)
    assert gw.wal_damage(torn / "gateway.sqlite3") is None

    for name, garble in (("header", lambda b: b[:16] + bytes(8) + b[24:]), ("zeroed", lambda b: bytes(512) + b[512:]),
                         ("frame", lambda b: b[:32 + frame + 40] + b"\xff" * 64 + b[32 + frame + 104:])):
        damaged = tmp_path / name
        damaged.mkdir()
        (damaged / "gateway.sqlite3").write_bytes(intact.read_bytes())
        Path(f"{damaged / 'gateway.sqlite3'}-wal").write_bytes(garble(wal.read_bytes()))
        db_path = damaged / "gateway.sqlite3"
        reason = gw.wal_damage(db_path)
        assert reason and ("frame 2 of" in reason if name == "frame" else "header" in reason), reason
        assert gw.main(["check", "--db-path", str(db_path)]) != 0
        assert "WAL" in capsys.readouterr().out
        db = gw.Database(db_path)  # as serve opens it: the damage is told and the WAL kept aside first
        try:
            assert db.wal_damage["detail"] == reason
            assert Path(db.wal_damage["copy"]).read_bytes() == garble(wal.read_bytes())
        finally:
            db.close()
        assert _ledger_count(db_path) < 40  # what SQLite could not read is gone: hence the copy


def test_a_damaged_wal_is_found_however_large_the_file(tmp_path, data_dir):
    """A WAL keeps the size of its largest transaction (an attachment of 20 MB): the frames SQLite
    would read are checked whatever the file's size, and only the headers of the stale rest are read."""
    intact = _crashed_copy(data_dir, tmp_path / "intact")
    data = Path(f"{intact}-wal").read_bytes()
    frame = 24 + int.from_bytes(data[8:12], "big")
    stale = bytes(frame) * ((20 << 20) // frame)  # frames of an older run through the file (other salts)
    damaged = tmp_path / "large"
    damaged.mkdir()
    (damaged / "gateway.sqlite3").write_bytes(intact.read_bytes())
    wal = Path(f"{damaged / 'gateway.sqlite3'}-wal")
    wal.write_bytes(data + stale)
    assert wal.stat().st_size > 20 << 20 and gw.wal_damage(damaged / "gateway.sqlite3") is None
    wal.write_bytes(data[:32 + frame + 40] + b"\xff" * 64 + data[32 + frame + 104:] + stale)
    assert "frame 2 of" in (gw.wal_damage(damaged / "gateway.sqlite3") or "")


def test_a_file_restored_beside_the_old_files_wal_is_refused_untouched(tmp_path, data_dir):
    """The restore's mistake the guide warns of (the old `-wal` left beside the copy): `serve` refuses
    the file, says why, and leaves it and the WAL as they were, so deleting the WAL is the whole fix."""
    import shutil

    live = gw.open_stores(make_config(data_dir))
    for i in range(40):
        live.ledger.append(_step("r", i + 1))
    backup = tmp_path / "backup.sqlite3"
    assert gw.main(["backup", str(backup), "--db-path", str(live.db.path)]) == 0
    for i in range(40, 400):
        live.ledger.append(_step("r", i + 1))
    restored = tmp_path / "restored"
    restored.mkdir()
    shutil.copy(f"{live.db.path}-wal", restored / "gateway.sqlite3-wal")  # as a kill -9 left it
    live.close()
    shutil.copy(backup, restored / "gateway.sqlite3")
    db_path = restored / "gateway.sqlite3"
    files = {name: (restored / name).read_bytes() for name in ("gateway.sqlite3", "gateway.sqlite3-wal")}
    with pytest.raises(gw.SchemaError, match="may be the old file's"):
        gw.Database(db_path)
    assert {name: (restored / name).read_bytes() for name in files} == files
    for leftover in ("gateway.sqlite3-wal", "gateway.sqlite3-shm"):
        (restored / leftover).unlink(missing_ok=True)
    assert gw.main(["check", "--db-path", str(db_path)]) == 0 and _ledger_count(db_path) == 40


# -- one store interface: the same checks on both backends -------------------------------------------

PROTOCOLS = (("runs", gw.RunStorage), ("ledger", gw.LedgerStorage), ("commands", gw.CommandStorage),
             ("cursor", gw.CursorStorage), ("artifacts", gw.ArtifactStorage))


@pytest.fixture(params=["sqlite", "file"])
def any_stores(request, data_dir):
    s = gw.open_stores(make_config(data_dir, store_backend=request.param))
    yield s
    s.close()


def _protocol_methods(protocol) -> list:
    return [name for name, value in vars(protocol).items() if not name.startswith("_") and callable(value)]


@pytest.mark.parametrize("field,protocol", PROTOCOLS, ids=[name for name, _ in PROTOCOLS])
def test_each_store_satisfies_its_protocol_with_the_same_signatures(any_stores, field, protocol):
    """The `Stores` field holds a store that has every method of its Protocol, each taking the same
    parameters (names, kinds, defaults), so a caller written against the Protocol works on both."""
    store = getattr(any_stores, field)
    assert isinstance(store, protocol)
    methods = _protocol_methods(protocol)
    assert len(methods) >= 2
    for name in methods:
        want = inspect.signature(getattr(protocol, name)).parameters.values()
        got = inspect.signature(getattr(type(store), name)).parameters.values()
        assert [(p.name, p.kind, p.default) for p in got] == [(p.name, p.kind, p.default) for p in want], name


def _run(workflow_id: str = "w", *, status=RunStatus.RUNNING, updated_at: str = "2024-01-01T00:00:00+00:00",
         until: str | None = None, paused: bool = False, session_id: str | None = None,
         parent_run_id: str | None = None):
    from abstractruntime import RunState, WaitReason, WaitState

    run = RunState.new(workflow_id=workflow_id, entry_node="n", session_id=session_id, parent_run_id=parent_run_id)
    run.status = status
    run.updated_at = updated_at
    if until is not None:
        run.waiting = WaitState(reason=WaitReason.UNTIL, until=until)
    if paused:
        run.vars["_runtime"] = {"control": {"paused": True}}
    return run


def test_runnable_ids_on_both_backends(any_stores):
    runs = any_stores.runs
    running = _run()
    due = _run(status=RunStatus.WAITING, until="2000-01-01T00:00:00+00:00")
    for other in (running, due, _run(paused=True), _run(status=RunStatus.COMPLETED),
                  _run(status=RunStatus.WAITING, until="2999-01-01T00:00:00+00:00"),
                  _run(status=RunStatus.WAITING, until="2000-01-01T00:00:00+00:00", paused=True)):
        runs.save(other)
    got = runs.runnable_ids(now_iso=gw.utc_now_iso(), limit=100)
    assert sorted(got) == sorted([running.run_id, due.run_id])
    assert len(runs.runnable_ids(now_iso=gw.utc_now_iso(), limit=1)) == 1


def test_run_index_pages_alike_on_both_backends(any_stores):
    """Keyset pages walk every run once, newest first (ties broken by run id), internal runs hidden
    on request; the filters and the single-run queries answer alike."""
    runs = any_stores.runs
    saved = [_run(updated_at=f"2024-01-0{1 + n // 2}T00:00:00+00:00", session_id="s1") for n in range(7)]
    for run in saved:
        runs.save(run)
    runs.save(_run("__internal__", updated_at="2030-01-01T00:00:00+00:00"))
    child = _run(updated_at="2020-01-01T00:00:00+00:00", parent_run_id=saved[0].run_id, session_id="s1")
    runs.save(child)
    expected = sorted(saved + [child], key=lambda r: (r.updated_at, r.run_id), reverse=True)
    seen, before = [], None
    while True:
        page = runs.list_run_index(limit=3, before=before, exclude_internal=True)
        if not page:
            break
        seen.extend(row["run_id"] for row in page)
        before = (page[-1]["updated_at"], page[-1]["run_id"])
    assert seen == [r.run_id for r in expected]
    assert runs.list_run_index(limit=100)[0]["workflow_id"] == "__internal__"
    roots = runs.list_run_index(session_id="s1", root_only=True, limit=100)
    assert child.run_id not in {row["run_id"] for row in roots} and len(roots) == 7
    assert runs.child_ids(saved[0].run_id) == [child.run_id]
    assert runs.status_of(child.run_id) == "running" and runs.status_of("nope") is None
    assert runs.exists(child.run_id) and json.loads(runs.load_json(child.run_id))["run_id"] == child.run_id
    runs.save_row(gw.run_row(_run()))
    assert len(runs.list_run_index(limit=100)) == 10


def test_run_pages_walk_every_run_on_both_backends(any_stores):
    """`list_run_page` follows `list_run_index`'s order and keyset, and says where the next page starts."""
    runs = any_stores.runs
    saved = [_run(updated_at=f"2024-01-0{1 + n // 2}T00:00:00+00:00") for n in range(5)]
    for run in saved:
        runs.save(run)
    seen, before = [], None
    while True:
        page = runs.list_run_page(limit=2, before=before)
        seen.extend(run.run_id for run in page.runs)
        if page.next_before is None:
            break
        before = page.next_before
    assert seen == [r.run_id for r in sorted(saved, key=lambda r: (r.updated_at, r.run_id), reverse=True)]


def test_a_run_row_that_no_longer_reads_does_not_end_the_run_list(stores):
    """An unreadable row is left out of its page, and the pages after it are still reached."""
    saved = [_run(updated_at=f"2024-01-0{n + 1}T00:00:00+00:00") for n in range(3)]
    for run in saved:
        stores.runs.save(run)
    stores.db.write(lambda conn: conn.execute("UPDATE runs SET run_json = '{\"run_id\": 1}' WHERE run_id = ?",
                                              (saved[1].run_id,)))
    seen, before, pages = [], None, 0
    while True:
        page = stores.runs.list_run_page(limit=1, before=before)
        pages += 1
        seen.extend(run.run_id for run in page.runs)
        if page.next_before is None:
            break
        before = page.next_before
    assert pages == 3 and seen == [saved[2].run_id, saved[0].run_id]


def test_ledger_on_both_backends(any_stores):
    ledger = any_stores.ledger
    for n in range(1, 6):
        ledger.append(_step("r1", n))
    llm = {"run_id": "r1", "status": "completed", "effect": {"type": "llm_call"},
           "result": {"usage": {"total_tokens": 42}}}
    tools = {"run_id": "r1", "status": "completed",
             "effect": {"type": "tool_calls", "payload": {"tool_calls": [{}, {}]}}}
    assert ledger.append_json("r1", json.dumps(llm)) == 6
    assert ledger.append_json("r1", json.dumps(tools)) == 7
    assert ledger.append_json("r2", json.dumps({"run_id": "r2", "status": "running"})) == 1
    assert ledger.count("r1") == 7 and ledger.count("nope") == 0
    assert [r["step_id"] for r in ledger.page("r1", 2, 2)] == ["s3", "s4"]
    assert [json.loads(t) for t in ledger.page_json("r1", 5, 10)] == [llm, tools]
    assert ledger.list("r1") == ledger.page("r1", 0, 100)
    assert ledger.count_many(["r1", "r2", "nope", ""]) == {"r1": 7, "r2": 1}
    assert ledger.metrics_many(["r1", "r2"]) == {"r1": {"steps": 7, "llm_calls": 1, "tool_calls": 2,
                                                       "tokens_total": 42}}
    assert ledger.delete("r1") == 7 and ledger.count("r1") == 0


def test_a_completed_record_is_found_by_its_idempotency_key_on_both_backends(any_stores):
    """The runtime's rule: the first record with the key whose status is completed; any other is skipped."""
    ledger = any_stores.ledger

    def record(key, status, result):
        return json.dumps({"run_id": "r1", "idempotency_key": key, "status": status, "result": result})

    ledger.append_json("r1", record("k1", "started", None))
    ledger.append_json("r1", record("k1", "completed", {"n": 1}))
    ledger.append_json("r1", record("k1", "completed", {"n": 2}))
    ledger.append_json("r1", record("k2", "failed", {"n": 3}))
    ledger.append_json("r2", record("k3", "completed", {"n": 4}))
    assert ledger.completed_record("r1", "k1")["result"] == {"n": 1}
    assert ledger.completed_record("r1", "k2") is None  # failed: the effect runs again
    assert ledger.completed_record("r1", "k3") is None and ledger.completed_record("r2", "k3")["result"] == {"n": 4}
    assert ledger.completed_record("nope", "k1") is None


def test_waiting_records_are_found_by_their_wait_key_on_both_backends(any_stores):
    """A run's waiting records with a wait key, in order; other statuses, keys and runs are left out."""
    ledger = any_stores.ledger

    def record(run_id, status, wait_key, n):
        wait = {"wait_key": wait_key, "reason": "event"} if wait_key is not None else None
        return json.dumps({"run_id": run_id, "status": status, "result": {"wait": wait, "n": n}}, ensure_ascii=n % 2)

    key = 'tool_calls:r1:act "é"'
    for args in (("r1", "waiting", key, 1), ("r1", "completed", key, 2), ("r1", "waiting", "other", 3),
                 ("r1", "waiting", None, 4), ("r2", "waiting", key, 5), ("r1", "waiting", key, 6)):
        ledger.append_json(args[0], record(*args))
    assert [r["result"]["n"] for r in ledger.waiting_records("r1", key)] == [1, 6]  # whichever encoder wrote them
    assert ledger.waiting_records("r1", "nope") == [] and ledger.waiting_records("nope", key) == []


def test_a_step_s_own_completed_records_are_found_after_the_stored_ones(stores):
    """Inside a step, appends are buffered: the lookup sees them too, after the stored ones, whatever the
    key holds (quotes, backslashes, non-ASCII)."""
    from abstractruntime.core.models import StepRecord as Record

    uow = gw.UnitOfWork(stores.runs, stores.ledger)
    key = 'k "1" \\ é'
    stored = Record(run_id="r1", step_id="s0", node_id="n", status="completed", idempotency_key="other",
                    result={"n": 0})
    stores.ledger.append(stored)
    with uow.collect():
        for n, status in enumerate(("started", "completed", "completed"), start=1):
            uow.ledger.append(Record(run_id="r1", step_id=f"s{n}", node_id="n", status=status, idempotency_key=key,
                                     result={"n": n}))
        assert uow.ledger.completed_record("r1", key)["result"] == {"n": 2}
        assert uow.ledger.completed_record("r1", "other")["result"] == {"n": 0}  # the stored one
        assert uow.ledger.completed_record("r1", 'k "1"') is None and uow.ledger.completed_record("r2", key) is None
    assert stores.ledger.completed_record("r1", key) is None  # nothing of the step was stored


def test_a_completed_record_lookup_reads_one_record_and_survives_one_that_is_not_json(stores):
    """The lookup is an indexed search (not a read of the whole ledger), and the index leaves out a
    damaged record instead of failing its insert."""
    conn = stores.db.connection()
    plan = " ".join(str(row) for row in conn.execute("EXPLAIN QUERY PLAN " + gw.SqliteLedgerStore._COMPLETED,
                                                     ("r1", "k")))
    assert "USING INDEX ledger_completed_by_key" in plan and "SCAN" not in plan
    stores.db.write(lambda c: c.execute("INSERT INTO ledger VALUES ('r1', 1, 'not json {')"))
    stores.ledger.append_json("r1", json.dumps({"idempotency_key": "k", "status": "completed", "result": float("nan")}))
    assert math.isnan(stores.ledger.completed_record("r1", "k")["result"])  # as Python wrote it (JSON5 NaN)
    # a file whose index was dropped: the same answer by a scan (damaged record skipped), and `check` says so
    stores.db.write(lambda c: c.execute("DROP INDEX ledger_completed_by_key"))
    assert math.isnan(stores.ledger.completed_record("r1", "k")["result"])
    assert stores.ledger.completed_record("r1", "other") is None
    _facts, problems = gw.check_database(stores.db)
    assert any("index ledger_completed_by_key is missing" in p for p in problems), problems
    # the same for the waiting records' index
    stores.ledger.append_json("r1", json.dumps({"status": "waiting", "result": {"wait": {"wait_key": "w"}}}))
    stores.db.write(lambda c: c.execute("DROP INDEX ledger_waiting_by_key"))
    assert [r["status"] for r in stores.ledger.waiting_records("r1", "w")] == ["waiting"]
    _facts, problems = gw.check_database(stores.db)
    assert any("index ledger_waiting_by_key is missing" in p for p in problems), problems


def test_commands_and_cursor_on_both_backends(any_stores):
    commands, cursor = any_stores.commands, any_stores.cursor
    first = commands.append(CommandRecord(command_id="c1", run_id="r1", type="pause", payload={}, ts="t", seq=0))
    again = commands.append(CommandRecord(command_id="c1", run_id="r1", type="pause", payload={}, ts="t", seq=0))
    assert first.accepted and again.duplicate and again.seq == first.seq
    commands.append(CommandRecord(command_id="c2", run_id="r2", type="resume", payload={"a": 1}, ts="t", seq=0))
    commands.append(CommandRecord(command_id="c3", run_id="r1", type="cancel", payload={}, ts="t", seq=0))
    assert commands.get("c2").payload == {"a": 1} and commands.get("nope") is None
    assert [c.command_id for c in commands.for_run("r1")] == ["c3", "c1"]
    records, last = commands.list_after(after=first.seq, limit=10)
    assert [c.command_id for c in records] == ["c2", "c3"] and last == commands.get_last_seq()
    assert cursor.load() == 0
    cursor.save(last)
    assert cursor.load() == last
    assert commands.delete_by_run("r1") == 2
    assert [c.command_id for c in commands.list_after(after=0)[0]] == ["c2"]


def test_artifacts_on_both_backends(any_stores):
    artifacts = any_stores.artifacts
    older = artifacts.store(b"first", content_type="text/plain", run_id="r1")
    wait_for(lambda: gw.utc_now_iso() > older.created_at)  # a later created_at, to check the order
    meta = artifacts.store(bytes(range(256)) * 4, content_type="application/x-test", run_id="r1", tags={"k": "v"})
    assert artifacts.read_range(meta.artifact_id, 10, 5) == bytes(range(10, 15))
    assert artifacts.read_range(meta.artifact_id, 1020, 100) == bytes(range(252, 256))
    assert artifacts.read_range(meta.artifact_id, 5000, 10) == b""
    assert artifacts.read_range("a" * 32, 0, 10) == b"" and artifacts.read_range("../x", 0, 10) == b""
    assert artifacts.load(meta.artifact_id).content == bytes(range(256)) * 4
    assert artifacts.get_metadata(meta.artifact_id).tags == {"k": "v"}
    assert artifacts.get_metadata("../etc/passwd") is None and artifacts.load("../etc/passwd") is None
    assert [m.artifact_id for m in artifacts.list_by_run("r1")] == [meta.artifact_id, older.artifact_id]
    assert {m.artifact_id for m in artifacts.list_all(limit=10)} == {meta.artifact_id, older.artifact_id}
    assert artifacts.delete("../etc/passwd") is False
    assert artifacts.delete(older.artifact_id) is True and not artifacts.exists(older.artifact_id)
    assert artifacts.exists(meta.artifact_id)


def test_file_backend_serves_paging_ping_and_ranges_like_sqlite(data_dir):
    """End to end on the file backend: the run list's page cursor, ping's data location and artifact
    ranges, through the same handlers as on SQLite."""
    server = LiveServer(data_dir, runner=False, store_backend="file")
    try:
        runs = [_run(updated_at=f"2024-01-0{1 + n}T00:00:00+00:00") for n in range(5)]
        for run in runs:
            server.gateway.stores.runs.save(run)
        seen, cursor = [], ""
        while True:
            status, _, data = server.get(f"/api/gateway/runs?limit=2{cursor}")
            assert status == 200
            seen.extend(item["run_id"] for item in data["items"])
            if not data["next_cursor"]:
                break
            cursor = f"&cursor={data['next_cursor']}"
        assert seen == [r.run_id for r in reversed(runs)]
        status, _, data = server.get("/api/gateway/ping")
        assert status == 200 and data["backend"] == "file" and data["db_path"] == str(data_dir)
        meta = server.gateway.stores.artifacts.store(bytes(range(256)) * 10, run_id=runs[0].run_id)
        status, headers, body = server.get(f"/api/gateway/runs/{runs[0].run_id}/artifacts/{meta.artifact_id}/content",
                                           headers={"Range": "bytes=10-19"})
        assert status == 206 and body == bytes(range(10, 20)) and headers["Content-Range"] == "bytes 10-19/2560"
    finally:
        server.close()


def test_signals_wake_subscribers_and_watchers_by_topic():
    signals = gw.Signals()
    called = []
    signals.watch("work", called.append)
    with signals.subscribe("ledger:r1") as sub:
        seen = sub.version
        signals.bump(["ledger:r2", "work"])  # nobody subscribed to r2: not tracked, not counted
        assert sub.version == seen and not sub.wait(seen, 0.01)
        signals.bump(["ledger:r1"])
        assert sub.wait(seen, 0.01) and sub.version == seen + 1
    assert called == ["work"]
    signals.unwatch("work", called.append)
    signals.bump(["work"])
    assert called == ["work"] and signals._topics == {}


def test_an_io_error_opening_a_file_on_a_full_disk_is_called_that_not_damage(data_dir, monkeypatch):
    """Told "damaged, restore from a backup", an operator may copy a backup over a good file."""
    import collections
    import shutil

    path = data_dir / "gateway.sqlite3"
    gw.Database(path).close()

    def io_error(path, conn):
        raise apsw.IOError("disk I/O error")

    monkeypatch.setattr(gw, "_refuse_damaged", io_error)  # as SQLite answers when it cannot make its -shm
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: usage(8 << 20, 8 << 20, 0))
    with pytest.raises(gw.SchemaError, match="disk holding .* is full"):
        gw.Database(path)
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: usage(8 << 30, 1 << 30, 7 << 30))
    with pytest.raises(gw.SchemaError, match="is damaged") as refused:
        gw.Database(path)
    assert "may be the old file's" not in str(refused.value)  # no stray WAL: an empty one is the open's own
