"""The command line: serve from an empty home, graceful stop, split API and runner processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

import abstractgateway as gw
from conftest import TEST_BUNDLES, make_config, pack_bundle, wait_for
from processes import run_gateway, spawn_gateway


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 2.0):
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return resp.status, json.loads(resp.read())


TOKEN = "cli-test-token-0123456789"


def _post(url: str, body: dict):
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        return json.loads(resp.read())


def _spawn(args, env):
    return spawn_gateway(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _clean_env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ABSTRACTGATEWAY_", "XDG_"))}
    env.update(HOME=str(home), XDG_DATA_HOME=str(home / ".local" / "share"))
    return env


def test_version_and_help():
    # `python -m abstractgateway` itself, once: every other test forks its processes warm (tests/processes.py)
    out = subprocess.run([sys.executable, "-m", "abstractgateway", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"abstractgateway {gw.__version__}"
    out = run_gateway(["serve", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--db-path" in out.stdout
    subcommands = gw.build_parser()._subparsers._group_actions[0].choices  # the same parser, without 5 more processes
    for cmd in ("serve", "runner", "migrate", "backup", "check"):
        assert "--db-path" in subcommands[cmd].format_help()


def test_serve_from_an_empty_home_then_sigterm_exits_cleanly(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    port = _free_port()
    proc = _spawn(["serve", "--port", str(port)], _clean_env(home))
    try:
        status, data = wait_for(lambda: _try_get(f"http://127.0.0.1:{port}/api/health"), timeout=20)
        assert status == 200 and data["status"] == "healthy"
        db = home / ".local" / "share" / "abstractgateway" / "gateway.sqlite3"
        assert db.exists()  # the platformdirs data dir, with nothing configured
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert f"http://127.0.0.1:{port}" in out and str(db) in out
    assert not Path(str(db) + "-wal").exists() or Path(str(db) + "-wal").stat().st_size == 0  # checkpointed


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGINT], ids=["sighup", "sigint"])
def test_a_hangup_or_an_interrupt_is_a_clean_stop(data_dir, sig):
    """SIGHUP (a closed terminal) killed the process without releasing the runner lease: the next start
    waited out its TTL before running anything."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ABSTRACTGATEWAY_")}
    env.update(ABSTRACTGATEWAY_DATA_DIR=str(data_dir), ABSTRACTGATEWAY_AUTH_TOKEN=TOKEN)
    port = _free_port()
    proc = _spawn(["serve", "--port", str(port)], env)
    wait_for(lambda: _try_get(f"http://127.0.0.1:{port}/api/health"), timeout=20)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0 and "Traceback" not in err, (proc.returncode, err)
    stores = gw.open_stores(make_config(data_dir))
    try:
        holder = stores.leases.holder("runner")
        assert holder is not None and not holder["live"], holder  # released: the next start works at once
    finally:
        stores.close()
    if sig == signal.SIGHUP:  # under `nohup` (SIGHUP ignored from the start), a hangup changes nothing
        proc = subprocess.Popen(["nohup", sys.executable, "-m", "abstractgateway", "serve", "--port", str(port)],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda: _try_get(f"http://127.0.0.1:{port}/api/health"), timeout=20)
            proc.send_signal(signal.SIGHUP)
            with pytest.raises(subprocess.TimeoutExpired):  # a stop would begin at once: give it half a second
                proc.wait(timeout=0.5)
            assert _get(f"http://127.0.0.1:{port}/api/health")[0] == 200
        finally:
            proc.terminate()
            proc.wait(timeout=20)


def _try_get(url):
    try:
        return _get(url)
    except OSError:
        return None


def test_split_api_and_two_runner_processes_share_one_database(data_dir):
    flows = data_dir / "flows"
    for root in TEST_BUNDLES:
        pack_bundle(flows, root)
    env = {**os.environ, "ABSTRACTGATEWAY_DATA_DIR": str(data_dir), "ABSTRACTGATEWAY_POLL_S": "0.05",
           "ABSTRACTGATEWAY_AUTH_TOKEN": TOKEN,
           "ABSTRACTGATEWAY_RUNNER_LEASE_TTL_S": "1.5"}
    port = _free_port()
    api = _spawn(["serve", "--no-runner", "--port", str(port)], env)
    runners = [_spawn(["runner"], env) for _ in range(2)]
    base = f"http://127.0.0.1:{port}/api/gateway"
    try:
        wait_for(lambda: _try_get(f"http://127.0.0.1:{port}/api/health"), timeout=20)
        run_ids = [_post(f"{base}/runs/start", {"bundle_id": "parent", "input_data": {"text": str(i)}})["run_id"]
                   for i in range(6)]
        for rid in run_ids:
            wait_for(lambda rid=rid: _get(f"{base}/runs/{rid}")[1]["status"] == "completed", timeout=30)
        stores = gw.open_stores(make_config(data_dir))
        try:
            holder = stores.leases.holder("runner")
            assert holder["live"]
            # no run was ticked twice: every node completed exactly once in each ledger
            for rid in run_ids:
                ledger = stores.ledger.list(rid)
                started = [r["step_id"] for r in ledger if r["status"] == "started"]
                assert len(started) == len(set(started))
                assert sum(1 for r in ledger if (r.get("result") or {}).get("completed") is True) == 1
        finally:
            stores.close()
        # kill the lease holder: the other runner takes over within a few seconds
        owner_pid = int(holder["owner"].split("-")[0])
        victim = next(p for p in runners if p.pid == owner_pid)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        rid = _post(f"{base}/runs/start", {"bundle_id": "echo"})["run_id"]
        wait_for(lambda: _get(f"{base}/runs/{rid}")[1]["status"] == "completed", timeout=15)
    finally:
        for proc in [api, *runners]:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in [api, *runners]:
            proc.communicate(timeout=20)
    assert api.returncode == 0


def test_doctor_reports_config_sources_and_problems(tmp_path):
    env = _clean_env(tmp_path / "home")
    env["ABSTRACTGATEWAY_DATA_DIR"] = str(tmp_path / "data")
    out = run_gateway(["doctor", "--port", "9999"], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ABSTRACTGATEWAY_DATA_DIR" in out.stdout and "[env]" in out.stdout and "9999  [flag]" in out.stdout
    assert "no database yet" in out.stdout and "llm" in out.stdout
    stores = gw.open_stores(make_config(tmp_path / "data"))
    stores.close()
    out = run_gateway(["doctor"], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and f"schema version {gw.SCHEMA_VERSION}" in out.stdout
    import apsw

    conn = apsw.Connection(str(tmp_path / "data" / "gateway.sqlite3"))
    conn.execute("INSERT INTO ledger VALUES ('r', 2, '{}')")  # a gap: seq 1 is missing
    conn.close()
    out = run_gateway(["doctor"], env=env, capture_output=True, text=True)
    assert out.returncode == 1 and "PROBLEM" in out.stdout and "gaps" in out.stdout


def test_sigterm_during_a_stream_and_a_running_flow_loses_nothing(data_dir):
    flows = data_dir / "flows"
    for root in TEST_BUNDLES:
        pack_bundle(flows, root)
    env = {**os.environ, "ABSTRACTGATEWAY_DATA_DIR": str(data_dir), "ABSTRACTGATEWAY_AUTH_TOKEN": TOKEN}
    port = _free_port()
    base = f"http://127.0.0.1:{port}/api/gateway"
    proc = _spawn(["serve", "--port", str(port)], env)
    wait_for(lambda: _try_get(f"http://127.0.0.1:{port}/api/health"), timeout=20)
    run_id = _post(f"{base}/runs/start", {"bundle_id": "timer-loop", "input_data": {"n": 4, "delay": 0.5}})["run_id"]
    wait_for(lambda: _get(f"{base}/runs/{run_id}")[1]["status"] == "waiting")
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", f"/api/gateway/runs/{run_id}/ledger/stream", headers={"Authorization": f"Bearer {TOKEN}"})
    resp = conn.getresponse()
    assert resp.status == 200
    before = int(_get(f"{base}/runs/{run_id}/ledger?limit=2000")[1]["next_after"])
    proc.send_signal(signal.SIGTERM)
    body = resp.read().decode()  # the stream ends on its own, with a final done event
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert body.rstrip().splitlines()[-1].startswith("data: ") and '"server_stopping"' in body
    steps = [line for line in body.splitlines() if line.startswith("id: ")]
    assert len(steps) >= before
    stores = gw.open_stores(make_config(data_dir))
    try:
        assert stores.runs.load(run_id).status.value in ("waiting", "running")
        assert stores.ledger.count(run_id) >= before
        assert not stores.leases.holder("runner")["live"]  # released on the way out
    finally:
        stores.close()
    proc = _spawn(["serve", "--port", str(port)], env)  # restart: the run carries on
    try:
        wait_for(lambda: _try_get(f"http://127.0.0.1:{port}/api/health"), timeout=20)
        wait_for(lambda: _get(f"{base}/runs/{run_id}")[1]["status"] == "completed", timeout=20)
        assert _get(f"{base}/runs/{run_id}")[1]["status"] == "completed"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
    assert proc.returncode == 0
