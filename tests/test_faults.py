"""Fault injection with real processes: SIGKILL under load, a stalled lease holder, a full disk,
damaged database files. Each loop is bounded so the suite stays well inside CI's time."""

from __future__ import annotations

import collections
import hashlib
import json
import os
import random
import resource
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

import abstractgateway as gw
from conftest import (TEST_BUNDLES, LiveServer, call_json, free_port, gateway_env, make_config, pack_bundle,
                      stop_outside_a_write, wait_for)
from processes import run_gateway, spawn_gateway, spawn_python

TOKEN = "fault-test-token-0123456789"


def _call(method: str, url: str, body=None, timeout: float = 5.0):
    return call_json(method, url, TOKEN, body, timeout)


def _env(data_dir: Path, **settings: str) -> dict:
    return gateway_env(data_dir, TOKEN, **settings)


def _spawn(args, env, *, write_failure_memory_s: float | None = None, **kw):
    """`abstractgateway ARGS` in a new process; `write_failure_memory_s` shortens how long its health
    keeps reporting a failed write (gw.WRITE_FAILURE_MEMORY_S, 10 s), so a test need not wait that long."""
    kw.update(env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if write_failure_memory_s is None:
        return spawn_gateway(args, **kw)
    return spawn_python("import sys, abstractgateway as gw; "
                        f"gw.WRITE_FAILURE_MEMORY_S = {write_failure_memory_s!r}; sys.exit(gw.main(sys.argv[1:]))",
                        *args, **kw)


def _healthy(base: str):
    try:
        status, body = _call("GET", f"{base}/api/health", timeout=2)
    except OSError:
        return None
    return body if status == 200 else None


def _stop(*procs) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


def _pack_test_bundles(data_dir: Path) -> None:
    for root in TEST_BUNDLES:
        pack_bundle(data_dir / "flows", root)


def _duplicated_step_records(stores: gw.Stores, run_id: str) -> list:
    """Records of one run that repeat an (idempotency key, status) pair: a step applied twice."""
    seen = collections.Counter((r.get("idempotency_key"), r.get("status"), r.get("attempt"))
                               for r in stores.ledger.list(run_id) if r.get("idempotency_key"))
    return [key for key, n in seen.items() if n > 1]


def _closing_record_missing(stores: gw.Stores, run_id: str) -> bool:
    """A completed run must end with its completion record and the runtime's terminal status event."""
    ledger = stores.ledger.list(run_id)
    keys = {r.get("idempotency_key") for r in ledger}
    completed = any((r.get("result") or {}).get("completed") is True for r in ledger) or any(
        r.get("status") == "completed" and r.get("effect") for r in ledger)
    return not (completed and "system:terminal_status:completed" in keys)


class _Load:
    """Client threads that start runs and send commands until told to stop (or the server dies).

    Only what the server acknowledged (a 2xx answer) is recorded: that is what must survive."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.runs: list = []
        self.commands: list = []
        self.stop = threading.Event()
        self._lock = threading.Lock()

    def _starter(self, seed: int) -> None:
        rnd = random.Random(seed)
        while not self.stop.is_set():
            bundle, data = rnd.choice([("echo", {"message": "m"}), ("ask", {"name": "k"}), ("parent", {"text": "p"}),
                                       ("timer-loop", {"n": 3, "delay": 0})])
            try:
                status, body = _call("POST", f"{self.base}/api/gateway/runs/start",
                                     {"bundle_id": bundle, "input_data": data})
            except OSError:
                return
            if status == 200:
                with self._lock:
                    self.runs.append(body["run_id"])

    def _commander(self, seed: int) -> None:
        rnd = random.Random(seed)
        while not self.stop.is_set():
            with self._lock:
                run_id = rnd.choice(self.runs) if self.runs else None
            if run_id is None:
                time.sleep(0.005)
                continue
            command_id = f"c-{seed}-{rnd.getrandbits(48):x}"
            kind = rnd.choice(["pause", "resume", "cancel", "resume"])
            try:
                status, _ = _call("POST", f"{self.base}/api/gateway/commands",
                                  {"command_id": command_id, "run_id": run_id, "type": kind, "payload": {}})
            except OSError:
                return
            if status == 200:
                with self._lock:
                    self.commands.append(command_id)

    def start(self, seed: int) -> list:
        threads = [threading.Thread(target=self._starter, args=(seed * 10 + i,), daemon=True) for i in range(3)]
        threads.append(threading.Thread(target=self._commander, args=(seed * 10 + 9,), daemon=True))
        for thread in threads:
            thread.start()
        return threads


@pytest.mark.slow
def test_sigkill_under_load_never_duplicates_steps_loses_closing_records_or_applies_twice(data_dir):
    _pack_test_bundles(data_dir)
    env = _env(data_dir)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    load = _Load(base)
    rnd = random.Random(7)
    kills = 0
    for cycle in range(8):
        proc = _spawn(["serve", "--port", str(port)], env)
        try:
            wait_for(lambda: _healthy(base), timeout=20)
            load.stop.clear()
            threads = load.start(cycle)
            time.sleep(rnd.uniform(0.2, 0.9))  # the load runs for a random while: the kill lands anywhere
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
        finally:
            load.stop.set()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for thread in threads:
            thread.join(10)
    assert len(load.runs) > 20 and len(load.commands) > 5

    proc = _spawn(["serve", "--port", str(port)], env)  # the survivor finishes what it can
    try:
        wait_for(lambda: _healthy(base), timeout=20)
        stores = gw.open_stores(make_config(data_dir))
        try:
            wait_for(lambda: all(stores.outcomes.get(c) for c in load.commands), timeout=30)
            wait_for(lambda: not stores.db.query("SELECT 1 FROM runs WHERE status = 'running' LIMIT 1"), timeout=30)
            duplicated = {rid: _duplicated_step_records(stores, rid) for rid in load.runs}
            assert not {rid: d for rid, d in duplicated.items() if d}
            completed = [rid for rid in load.runs if stores.runs.status_of(rid) == "completed"]
            assert completed and not [rid for rid in completed if _closing_record_missing(stores, rid)]
            outcomes = stores.db.query("SELECT command_id, COUNT(*) FROM command_outcomes GROUP BY command_id")
            assert all(n == 1 for _, n in outcomes)  # every acknowledged command applied (or refused) once
            _, problems = gw.check_database(stores.db)
            assert problems == []  # no ledger gap, file intact
        finally:
            stores.close()
    finally:
        _stop(proc)
    assert kills == 8


@pytest.mark.slow
def test_a_stopped_lease_holder_is_replaced_and_writes_nothing_once_continued(data_dir):
    _pack_test_bundles(data_dir)
    ttl = 1.5
    env = _env(data_dir, runner_lease_ttl_s=str(ttl))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    api = _spawn(["serve", "--no-runner", "--port", str(port)], env)
    runners = [_spawn(["runner"], env) for _ in range(2)]
    stores = None
    try:
        wait_for(lambda: _healthy(base), timeout=20)
        stores = gw.open_stores(make_config(data_dir))
        holder = wait_for(lambda: (h := stores.leases.holder("runner")) and h["live"] and h, timeout=20)
        # runs in flight when the holder stops: timer loops keep stepping, ask runs wait
        looping = [_call("POST", f"{base}/api/gateway/runs/start",
                         {"bundle_id": "timer-loop", "input_data": {"n": 200, "delay": 0.05}})[1]["run_id"]
                   for _ in range(3)]
        waiting = _call("POST", f"{base}/api/gateway/runs/start", {"bundle_id": "ask"})[1]["run_id"]
        wait_for(lambda: stores.runs.status_of(waiting) == "waiting", timeout=15)
        wait_for(lambda: all(stores.ledger.count(rid) > 4 for rid in looping), timeout=15)
        stale = next(p for p in runners if p.pid == int(holder["owner"].split("-")[0]))
        stopped_at = stop_outside_a_write(stale.pid, stores.db.path)
        assert stopped_at is not None, "the holder was inside a write transaction at every stop"
        new = wait_for(lambda: (h := stores.leases.holder("runner")) and h["owner"] != holder["owner"] and h["live"]
                       and h, timeout=ttl + 10)
        takeover_s = time.monotonic() - stopped_at
        assert new["epoch"] > holder["epoch"]
        assert takeover_s <= ttl + 1.0, f"takeover took {takeover_s:.2f}s"
        for rid in [*looping, waiting]:
            status, _ = _call("POST", f"{base}/api/gateway/commands",
                              {"command_id": f"cancel-{rid}", "run_id": rid, "type": "cancel", "payload": {}})
            assert status == 200
        wait_for(lambda: all(stores.runs.status_of(rid) == "cancelled" for rid in [*looping, waiting]), timeout=15)
        counts = {rid: stores.ledger.count(rid) for rid in [*looping, waiting]}
        stale.send_signal(signal.SIGCONT)
        # the stale holder wakes mid-tick: whatever it had in hand must not land. Watch it for a while
        # (its heartbeat, every ttl/3, notices the loss; a tick in hand commits or fails at once).
        deadline = time.monotonic() + 3 * ttl
        while time.monotonic() < deadline:
            assert all(stores.runs.status_of(rid) == "cancelled" for rid in [*looping, waiting])
            assert {rid: stores.ledger.count(rid) for rid in counts} == counts
            time.sleep(0.05)
        status, body = _call("POST", f"{base}/api/gateway/runs/start", {"bundle_id": "echo"})
        wait_for(lambda: stores.runs.status_of(body["run_id"]) == "completed", timeout=15)  # the new holder works
        print(f"takeover after SIGSTOP: {takeover_s:.2f}s (ttl {ttl}s)")
    finally:
        if stores is not None:
            stores.close()
        _stop(api, *runners)


@pytest.mark.slow
def test_a_killed_lease_holder_is_replaced_within_the_ttl(data_dir):
    _pack_test_bundles(data_dir)
    ttl = 1.5
    env = _env(data_dir, runner_lease_ttl_s=str(ttl))
    runners = [_spawn(["runner"], env) for _ in range(2)]
    stores = gw.open_stores(make_config(data_dir))
    try:
        holder = wait_for(lambda: (h := stores.leases.holder("runner")) and h["live"] and h, timeout=20)
        victim = next(p for p in runners if p.pid == int(holder["owner"].split("-")[0]))
        victim.kill()
        killed_at = time.monotonic()
        wait_for(lambda: (h := stores.leases.holder("runner")) and h["owner"] != holder["owner"] and h["live"],
                 timeout=ttl + 10)
        takeover_s = time.monotonic() - killed_at
        assert takeover_s <= ttl + 1.0, f"takeover took {takeover_s:.2f}s"
        print(f"takeover after SIGKILL: {takeover_s:.2f}s (ttl {ttl}s)")
    finally:
        stores.close()
        _stop(*runners)


def _limit_file_size(limit: int):
    def _apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    return _apply


def test_a_backup_to_a_full_disk_says_so_and_leaves_no_partial_copy(data_dir, tmp_path):
    stores = gw.open_stores(make_config(data_dir))
    try:
        stores.db.write(lambda conn: conn.execute(
            "INSERT INTO settings (key, value, updated_at) VALUES ('padding', ?, '')", ("x" * 1_000_000,)))
    finally:
        stores.close()
    dest = tmp_path / "backup" / "copy.sqlite3"
    out = run_gateway(["backup", str(dest)], env=_env(data_dir),
                      capture_output=True, text=True, preexec_fn=_limit_file_size(200_000), timeout=60)
    assert out.returncode == 1 and "could not be written" in out.stderr and "not an error" not in out.stderr, out.stderr
    assert list(dest.parent.iterdir()) == []  # no `.partial` or journal left to be taken for a backup
    assert gw.main(["check", "--data-dir", str(data_dir)]) == 0  # the source is untouched


@pytest.mark.slow
def test_a_full_disk_is_a_507_and_health_degrades_then_recovers(data_dir):
    _pack_test_bundles(data_dir)
    env = _env(data_dir)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    gw.Database(data_dir / "gateway.sqlite3").close()  # created whole before the limit applies
    limit = (data_dir / "gateway.sqlite3").stat().st_size + 600_000
    memory_s = 3.0  # long enough to see `degraded` right after the 507, short enough not to wait 10 s
    proc = _spawn(["serve", "--port", str(port)], env, preexec_fn=_limit_file_size(limit),
                  write_failure_memory_s=memory_s)
    try:
        wait_for(lambda: _healthy(base), timeout=20)
        big = {"message": "x" * 100_000}
        statuses = []
        for _ in range(40):
            status, body = _call("POST", f"{base}/api/gateway/runs/start", {"bundle_id": "echo", "input_data": big})
            statuses.append(status)
            if status != 200:
                break
        assert status == 507, (status, body)
        assert body["code"] == "disk_full" and "full" in body["detail"] and "Traceback" not in json.dumps(body)
        assert not [s for s in statuses if s >= 500 and s != 507]
        health = _call("GET", f"{base}/api/health")[1]
        assert health["status"] == "degraded" and health["store"]["write_failure"]["code"] == "disk_full"
        assert proc.poll() is None  # SIGXFSZ did not kill it
        resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        status, body = _call("POST", f"{base}/api/gateway/runs/start", {"bundle_id": "echo", "input_data": big})
        assert status == 200  # space is back: the next write goes through, no restart needed
        wait_for(lambda: _call("GET", f"{base}/api/health")[1]["status"] == "healthy",
                 timeout=memory_s + 10)
    finally:
        _stop(proc)
    out = run_gateway(["check"], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr  # nothing half-written


def test_a_clean_stop_on_a_full_disk_says_why_the_wal_stays_and_exits_0(data_dir):
    """SIGTERM while the database file cannot grow: the final checkpoint fails, which is one line
    (the WAL is folded in on the next start), not a traceback and exit 1."""
    _pack_test_bundles(data_dir)
    env = _env(data_dir)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    db_file = data_dir / "gateway.sqlite3"
    proc = _spawn(["serve", "--port", str(port)], env)
    try:
        wait_for(lambda: _healthy(base), timeout=20)
        run_ids = [_call("POST", f"{base}/api/gateway/runs/start",
                         {"bundle_id": "echo", "input_data": {"message": "x" * 50_000 + str(i)}})[1]["run_id"]
                   for i in range(10)]  # pages in the WAL that the file does not hold yet
        resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (db_file.stat().st_size, resource.RLIM_INFINITY))
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        _stop(proc)
    assert proc.returncode == 0 and "Traceback" not in stderr, stderr
    assert "the WAL stays (checkpoint failed" in stderr, stderr
    stores = gw.open_stores(make_config(data_dir))  # the next start folds the WAL in: nothing was lost
    try:
        assert all(stores.runs.load(run_id) is not None for run_id in run_ids)
    finally:
        stores.close()


def _populated_database(data_dir: Path) -> Path:
    _pack_test_bundles(data_dir)
    g = gw.Gateway(make_config(data_dir))
    try:
        for i in range(30):
            g.tick(g.start_run(bundle_id="echo", input_data={"message": "y" * 2000 + str(i)}))
        g.stores.db.checkpoint()
    finally:
        g.close()
    return data_dir / "gateway.sqlite3"


def _garble(path: Path) -> None:
    data = bytearray(path.read_bytes())
    rnd = random.Random(3)
    for page in range(2, len(data) // 4096):
        offset = page * 4096 + 16
        data[offset:offset + 64] = bytes(rnd.getrandbits(8) for _ in range(64))
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2 + 100)


DAMAGES = {
    "garbled pages": _garble,
    "truncated": _truncate,
    "zero bytes": lambda p: p.write_bytes(b""),
    "not sqlite": lambda p: p.write_text("these are my notes, not a database\n" * 50),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_damaged_database_is_refused_and_never_written(data_dir, damage):
    if damage in ("garbled pages", "truncated"):
        db_path = _populated_database(data_dir)
    else:
        _pack_test_bundles(data_dir)
        db_path = data_dir / "gateway.sqlite3"
    DAMAGES[damage](db_path)
    before = hashlib.sha256(db_path.read_bytes()).hexdigest()
    env = _env(data_dir)
    for args, code in ((["serve", "--port", str(free_port())], 2), (["runner"], 2), (["check"], 1), (["doctor"], 1)):
        out = run_gateway([*args], env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == code, (args, out.returncode, out.stderr)
        assert "Traceback" not in out.stderr and "Traceback" not in out.stdout
        said = out.stderr + out.stdout
        if args[0] in ("serve", "runner"):
            assert "backup" in said and str(db_path) in said
        else:
            assert "problem" in said.lower()
        assert hashlib.sha256(db_path.read_bytes()).hexdigest() == before, f"{args[0]} wrote to the file"
        assert not Path(f"{db_path}-wal").exists() or Path(f"{db_path}-wal").stat().st_size == 0


def _write_protect(paths, protect: bool) -> None:
    """Make files (and directories) unwritable, or writable again: `chattr +i` as root (whom modes do
    not stop), modes otherwise."""
    for path in paths:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "+i" if protect else "-i", str(path)], check=True)
        else:
            os.chmod(path, (0o555 if path.is_dir() else 0o444) if protect else (0o755 if path.is_dir() else 0o600))


def test_writes_resume_at_once_after_the_database_was_read_only_for_a_while(data_dir):
    """SQLite opens a write-protected file read-only without a word. A thread that opened its connection
    then must not keep it: once the file is writable again, every thread writes again."""
    server = LiveServer(data_dir, max_threads="8")
    db_path = server.gateway.stores.db.path
    protected = [data_dir, *(p for p in data_dir.iterdir() if p.name.startswith(db_path.name))]
    try:
        _write_protect(protected, True)
        try:
            def start_from_new_threads():
                results = []
                threads = [threading.Thread(target=lambda: results.append(server.post(
                    f"{gw.API}/runs/start", {"bundle_id": "echo", "input_data": {}}))) for _ in range(8)]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
                return results

            refused = start_from_new_threads()  # the workers' first connections open now, read-only
            assert refused and all(status == 503 and body["code"] == "storage_error" for status, _, body in refused)
            assert any("read-only" in body["detail"] for _, _, body in refused), refused
            # A read that opens a connection on a new thread meanwhile is refused too, and says why.
            outcome = []
            reader = threading.Thread(target=lambda: outcome.append(server.get(f"{gw.API}/runs")))
            reader.start()
            reader.join()
        finally:
            _write_protect(protected, False)
        after = start_from_new_threads()
        assert [status for status, _, _ in after] == [200] * 8, after
    finally:
        server.close()


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_database_file_deleted_or_replaced_under_a_running_gateway_takes_no_write(data_dir, tmp_path, how):
    """The gateway's connections would go on writing into the old file, which no restart sees: every
    write is refused (503, saying why) and health degrades, instead of acknowledging writes that are lost."""
    server = LiveServer(data_dir)
    db_path = server.gateway.stores.db.path
    try:
        assert server.post(f"{gw.API}/runs/start", {"bundle_id": "echo", "input_data": {}})[0] == 200
        server.gateway.stores.db.checkpoint()
        if how == "deleted":
            for end in ("", "-wal", "-shm"):
                Path(f"{db_path}{end}").unlink(missing_ok=True)
        else:
            copy = tmp_path / "copy.sqlite3"
            copy.write_bytes(db_path.read_bytes())
            os.replace(copy, db_path)
        status, _, body = server.post(f"{gw.API}/runs/start", {"bundle_id": "echo", "input_data": {}})
        assert status == 503 and body["code"] == "storage_error" and "deleted or replaced" in body["detail"], body
        status, _, body = server.post(f"{gw.API}/commands", {"command_id": "c-1", "run_id": "r", "type": "pause"})
        assert status == 503 and "deleted or replaced" in body["detail"], body
        health = server.get("/api/health")[2]
        assert health["status"] == "degraded" and "deleted or replaced" in health["store"]["error"], health
        assert f"delete {db_path}-wal" in health["store"]["error"]  # the old file's WAL must not meet the new file
        opened = []  # nor may a new connection read (and on close checkpoint) the new file through that WAL

        def open_one():
            try:
                opened.append(server.gateway.stores.db.query_one("SELECT COUNT(*) FROM runs"))
            except gw.StorageError as exc:
                opened.append(exc.detail)

        thread = threading.Thread(target=open_one)
        thread.start()
        thread.join()
        assert "deleted or replaced" in str(opened[0]), opened
        assert db_path.exists() == (how == "replaced")  # no new, empty file was made in its place
    finally:
        server.close()
