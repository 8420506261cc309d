"""Issue 13's differences to the original gateway, end to end against a live server.

Each test pins the original's behaviour where ours used to differ: flows served as authored, removing a
flows-dir bundle, `GET /runs?include_metrics=true`, a schedule's wrapper VisualFlow, the audit tail shape.
"""

from __future__ import annotations

import json
import os
import zipfile

import abstractgateway as gw
from conftest import LiveServer, wait_for

API = "/api/gateway"


def _authored(flow_file, flow_id: str) -> dict:
    """A flow's JSON exactly as it sits inside a `.flow` archive."""
    with zipfile.ZipFile(flow_file) as archive:
        manifest = json.loads(archive.read("manifest.json"))
        return json.loads(archive.read(manifest["flows"][flow_id]))


def _wait_status(server, run_id, wanted, timeout=10):
    return wait_for(lambda: (d := server.get(f"{API}/runs/{run_id}")[2])["status"] == wanted and d, timeout)


# -- 1. flows as authored -----------------------------------------------------------------------------


def test_flow_json_is_served_exactly_as_authored(live_server, data_dir):
    parent_file = data_dir / "flows" / "parent@1.0.0.flow"
    for flow_id in ("parent", "child"):
        authored = _authored(parent_file, flow_id)
        status, _, data = live_server.get(f"{API}/bundles/parent/flows/{flow_id}")
        assert status == 200 and data["flow"] == authored and data["workflow_id"] == f"parent@1.0.0:{flow_id}"
        for wid in (f"parent@1.0.0:{flow_id}", f"parent:{flow_id}"):
            status, _, data = live_server.get(f"{API}/workflows/{wid}/flow")
            assert status == 200 and data["flow"] == authored, wid
            assert data["workflow_id"] == f"parent@1.0.0:{flow_id}" and data["bundle_ref"] == "parent@1.0.0"
    flow = live_server.get(f"{API}/bundles/parent/flows/parent")[2]["flow"]
    assert flow["id"] == "parent"
    assert [n["data"]["subflowId"] for n in flow["nodes"] if n["type"] == "subflow"] == ["child"]
    # the namespaced copy is still what runs: the parent starts its child and completes
    status, _, data = live_server.post(f"{API}/runs/start", {"bundle_id": "parent", "flow_id": "parent"})
    assert _wait_status(live_server, data["run_id"], "completed")


# -- 2. removing a bundle from the flows dir ----------------------------------------------------------


def test_delete_removes_a_flows_dir_bundle_under_the_originals_rules(data_dir, bundle_builder, tmp_path):
    flows = data_dir / "flows"
    server = LiveServer(data_dir)
    try:
        echo_file = flows / "echo@1.0.0.flow"
        assert echo_file.exists() and server.get(f"{API}/bundles/echo")[0] == 200
        status, _, data = server.request("DELETE", f"{API}/bundles/echo")
        assert status == 200 and data == {"ok": True, "bundle_ref": "echo", "removed": 1, "gateway_reloaded": True,
                                          "gateway_reload_error": None}
        assert not echo_file.exists() and server.get(f"{API}/bundles/echo")[0] == 404
        assert server.request("DELETE", f"{API}/bundles/echo")[0] == 404

        # recognised by manifest, not by file name; one version at a time; uploads and files together
        bundle_builder("ask", bundle_id="multi", version="1.0.0",
                       out_dir=tmp_path / "v1").rename(flows / "renamed.flow")
        bundle_builder("ask", bundle_id="multi", version="2.0.0", out_dir=flows)
        from conftest import multipart

        upload = bundle_builder("ask", bundle_id="multi", version="3.0.0", out_dir=tmp_path / "v3").read_bytes()
        body, ctype = multipart({}, {"file": ("m.flow", upload)})
        assert server.request("POST", f"{API}/bundles/upload", raw=body, headers={"Content-Type": ctype})[0] == 200
        assert len(server.get(f"{API}/bundles?all_versions=true")[2]["items"]) >= 3
        status, _, data = server.request("DELETE", f"{API}/bundles/multi?bundle_version=1.0.0")
        assert status == 200 and data["removed"] == 1 and not (flows / "renamed.flow").exists()
        assert (flows / "multi@2.0.0.flow").exists()
        status, _, data = server.request("DELETE", f"{API}/bundles/multi")
        assert status == 200 and data["removed"] == 2 and not (flows / "multi@2.0.0.flow").exists()

        # never deleted: a file that is not a bundle, a bundle in a subdirectory, a symlink's target
        (flows / "junk.flow").write_bytes(b"not a zip")
        (flows / "sub").mkdir()
        nested = bundle_builder("event", bundle_id="nested", out_dir=flows / "sub")
        outside = bundle_builder("wait_key", bundle_id="linked", out_dir=tmp_path / "outside")
        os.symlink(outside, flows / "linked.flow")
        assert server.request("DELETE", f"{API}/bundles/junk")[0] == 404
        assert server.request("DELETE", f"{API}/bundles/nested")[0] == 404
        status, _, data = server.request("DELETE", f"{API}/bundles/linked")
        assert status == 200 and data["removed"] == 1
        assert (flows / "junk.flow").exists() and nested.exists() and outside.exists()
        assert not os.path.lexists(flows / "linked.flow")
    finally:
        server.close()


def test_a_single_file_flows_dir_is_never_deleted(data_dir, bundle_builder):
    only = bundle_builder("echo", bundle_id="solo")
    server = LiveServer(data_dir, flows_dir=str(only))
    try:
        assert server.get(f"{API}/bundles/solo")[0] == 200
        status, _, data = server.request("DELETE", f"{API}/bundles/solo")
        assert status == 404 and data["code"] == "bundle_not_found" and only.exists()
    finally:
        server.close()


# -- 4. run metrics -----------------------------------------------------------------------------------


def _llm_record(run_id: str, status: str, **extra) -> str:
    record = {"run_id": run_id, "step_id": os.urandom(4).hex(), "node_id": "n", "status": status, **extra}
    return json.dumps(record)


def test_runs_list_metrics_come_from_counters_kept_at_append_time(live_server):
    status, _, data = live_server.post(f"{API}/runs/start", {"bundle_id": "echo"})
    echo = data["run_id"]
    _wait_status(live_server, echo, "completed")
    status, _, data = live_server.post(f"{API}/runs/start", {"bundle_id": "ask"})
    ask = data["run_id"]
    _wait_status(live_server, ask, "waiting")
    ledger = live_server.get(f"{API}/runs/{echo}/ledger")[2]["items"]
    completed_steps = sum(1 for r in ledger if r["status"] == "completed")
    assert completed_steps >= 1

    # a run with LLM and tool steps (records as the runtime writes them), appended through the store
    store = live_server.gateway.stores.ledger
    llm = live_server.post(f"{API}/runs/start", {"bundle_id": "ask"})[2]["run_id"]
    _wait_status(live_server, llm, "waiting")
    before = sum(1 for r in live_server.get(f"{API}/runs/{llm}/ledger")[2]["items"] if r["status"] == "completed")
    store.append_json(llm, _llm_record(llm, "started", effect={"type": "llm_call", "payload": {}}))
    store.append_json(llm, _llm_record(llm, "completed", effect={"type": "llm_call", "payload": {}},
                                       result={"usage": {"total_tokens": 120}}))
    store.append_json(llm, _llm_record(llm, "completed", effect={"type": "llm_call", "payload": {}},
                                       result={"usage": {"total_tokens": 30}}))
    store.append_json(llm, _llm_record(llm, "completed", effect={"type": "tool_calls",
                                                                 "payload": {"tool_calls": [{}, {}, {}]}}))

    status, _, data = live_server.get(f"{API}/runs?include_metrics=true&limit=10")
    items = {i["run_id"]: i for i in data["items"]}
    assert status == 200
    assert {k: items[echo][k] for k in ("steps", "llm_calls", "tool_calls", "tokens_total")} == \
        {"steps": completed_steps, "llm_calls": 0, "tool_calls": 0, "tokens_total": 0}
    assert {k: items[llm][k] for k in ("steps", "llm_calls", "tool_calls", "tokens_total")} == \
        {"steps": before + 3, "llm_calls": 2, "tool_calls": 3, "tokens_total": 150}
    waiting_steps = sum(1 for r in live_server.get(f"{API}/runs/{ask}/ledger")[2]["items"]
                        if r["status"] == "completed")
    assert items[ask]["steps"] == (waiting_steps or None)
    # the original's default leaves them out
    assert "steps" not in live_server.get(f"{API}/runs?limit=10")[2]["items"][0]
    # counted from the index table, not by re-reading ledgers
    rows = live_server.gateway.stores.db.query("SELECT run_id, steps FROM run_metrics WHERE run_id = ?", (llm,))
    assert rows == [(llm, before + 3)]


def test_metrics_are_backfilled_when_an_older_database_is_upgraded(data_dir):
    import apsw

    path = data_dir / "old.sqlite3"
    conn = apsw.Connection(str(path))
    gw.apply_schema(conn, target=2)
    conn.execute("INSERT INTO ledger (run_id, seq, record_json) VALUES (?,?,?), (?,?,?), (?,?,?)",
                 ("r1", 1,
                  _llm_record("r1", "completed", effect={"type": "llm_call"}, result={"usage": {"total_tokens": 7}}),
                  "r1", 2, _llm_record("r1", "failed"), "r2", 1, _llm_record("r2", "started")))
    conn.close()
    db = gw.Database(path)
    try:
        metrics = gw.SqliteLedgerStore(db).metrics_many(["r1", "r2"])
        assert metrics == {"r1": {"steps": 1, "llm_calls": 1, "tool_calls": 0, "tokens_total": 7}}
    finally:
        db.close()


def test_metrics_of_runs_imported_by_migrate(tmp_path):
    from abstractruntime.core.models import StepRecord, StepStatus

    from conftest import make_config

    src = gw.open_stores(make_config(tmp_path / "upstream", store_backend="file", db_path=str(tmp_path / "x.sqlite3")))
    for status, effect, result in ((StepStatus.STARTED, {"type": "llm_call"}, None),
                                   (StepStatus.COMPLETED, {"type": "llm_call"}, {"usage": {"total_tokens": 9}}),
                                   (StepStatus.COMPLETED, {"type": "tool_calls", "payload": {"tool_calls": [1, 2]}},
                                    {})):
        src.ledger.append(StepRecord(run_id="imported", step_id="s", node_id="n", status=status, effect=effect,
                                     result=result))
    src.close()
    dest = gw.open_stores(make_config(tmp_path / "dest"))
    try:
        gw.migrate("file", dest, data_dir=tmp_path / "upstream", progress=None)
        assert dest.ledger.metrics_many(["imported"]) == {
            "imported": {"steps": 2, "llm_calls": 1, "tool_calls": 2, "tokens_total": 9}}
    finally:
        dest.close()


# -- 5. a schedule's wrapper flow ---------------------------------------------------------------------


def test_scheduled_run_serves_a_real_visualflow_wrapper(live_server):
    from abstractruntime.visualflow_compiler.visual.models import load_visualflow_json

    status, _, data = live_server.post(f"{API}/runs/schedule", {"bundle_id": "echo", "flow_id": "echo",
                                                               "interval": "1h", "repeat_count": 3})
    run = _wait_status(live_server, data["run_id"], "waiting")
    wid = run["workflow_id"]
    status, _, data = live_server.get(f"{API}/workflows/{wid}/flow")
    assert status == 200 and data["source"] == "dynamic" and data["workflow_id"] == wid
    flow = data["flow"]
    parsed = load_visualflow_json(flow)
    assert parsed.id == wid and parsed.entryNode == "start"
    nodes = {n["id"]: n for n in flow["nodes"]}
    assert nodes["wait_interval"]["type"] == "on_schedule"
    assert nodes["wait_interval"]["data"]["eventConfig"]["schedule"] == "1h"
    assert nodes["run_target"]["type"] == "subflow" and nodes["run_target"]["data"]["subflowId"] == "echo@1.0.0:echo"
    assert {(e["source"], e["target"]) for e in flow["edges"]} >= {
        ("start", "wait_start"), ("wait_start", "run_target"), ("run_target", "after_run"),
        ("after_run", "wait_interval"), ("wait_interval", "run_target"), ("after_run", "end")}
    ledger = live_server.get(f"{API}/runs/{run['run_id']}/ledger")[2]["items"]
    assert {r["node_id"] for r in ledger} <= set(nodes)  # every executed node is drawn
    assert "kind" not in flow  # not the private schedule definition

    # update_schedule shows in the served flow at once
    live_server.post(f"{API}/commands", {"command_id": "slower", "run_id": run["run_id"], "type": "update_schedule",
                                         "payload": {"interval": "2h"}})
    wait_for(lambda: live_server.get(f"{API}/commands/slower")[2]["status"] == "applied")
    flow = live_server.get(f"{API}/workflows/{wid}/flow")[2]["flow"]
    assert {n["id"]: n for n in flow["nodes"]}["wait_interval"]["data"]["eventConfig"]["schedule"] == "2h"


def test_schedule_wrapper_shapes(live_server):
    one_shot = gw.schedule_visualflow("scheduled:x", {"target_workflow_id": "b@1:f", "interval": None,
                                                       "repeat_count": None, "start_at": "2030-01-01T00:00:00+00:00"})
    ids = [n["id"] for n in one_shot["nodes"]]
    assert "wait_interval" not in ids and "end" in ids
    assert one_shot["nodes"][1]["data"]["eventConfig"]["schedule"] == "2030-01-01T00:00:00+00:00"
    forever = gw.schedule_visualflow("scheduled:y", {"target_workflow_id": "b@1:f", "interval": "5m",
                                                      "repeat_count": None})
    assert "end" not in [n["id"] for n in forever["nodes"]]  # a schedule repeating forever has no end
    assert live_server.get(f"{API}/workflows/scheduled:nope/flow")[0] == 404


# -- 6. the audit tail --------------------------------------------------------------------------------


def test_audit_tail_answers_in_the_originals_shape(live_server):
    for i in range(30):
        live_server.post(f"{API}/commands?secret=hunter2&x", {"command_id": f"a{i}", "run_id": "r", "type": "pause"},
                         headers={"User-Agent": "probe/1", "X-Client-Id": "cli"})
    live_server.post(f"{API}/commands", {"command_id": "b", "run_id": "r", "type": "pause"}, token="wrong-token-000000")
    wait_for(lambda: len(live_server.gateway.stores.audit.tail(40)) >= 31)
    status, _, data = live_server.get(f"{API}/audit/tail")
    assert status == 200 and data["ok"] is True and data["truncated"] is False
    assert data["bytes"] == len(data["content"].encode()) and data["content"].endswith("\n")
    lines = [json.loads(line) for line in data["content"].splitlines()]
    assert len(lines) == 31 and lines[-1]["status"] == 401 and "hunter2" not in data["content"]
    first = lines[0]
    assert set(first) >= {"ts", "request_id", "ip", "method", "path", "query", "status", "duration_ms",
                          "auth_required", "auth_token_fp", "user_agent", "bytes_in", "headers"}
    assert first["ip"] == "127.0.0.1" and first["auth_required"] is True and first["method"] == "POST"
    assert first["query"] == "secret=<redacted>&x=<redacted>" and first["user_agent"] == "probe/1"
    assert first["auth_token_fp"] == gw.token_fingerprint(LiveServer.TOKEN) and isinstance(first["duration_ms"], int)
    assert first["headers"] == {"x-client-id": "cli"}
    assert lines[-1]["auth_token_fp"] == gw.token_fingerprint("wrong-token-000000")
    assert data["items"][0]["status"] == 401  # the structured rows stay, newest first

    status, _, small = live_server.get(f"{API}/audit/tail?max_bytes=1024")
    assert status == 200 and small["truncated"] is True and 0 < small["bytes"] <= 1024
    assert small["content"] and data["content"].endswith(small["content"])  # the newest whole lines
    assert live_server.get(f"{API}/audit/tail?max_bytes=100")[0] == 422


def test_audit_rows_of_an_older_database_still_read(data_dir):
    import apsw

    path = data_dir / "old.sqlite3"
    conn = apsw.Connection(str(path))
    gw.apply_schema(conn, target=2)
    conn.execute("INSERT INTO audit_log (ts, request_id, client_ip, method, path, status, duration_ms, token_fp)"
                 " VALUES ('t', 'r', '::1', 'POST', '/api/gateway/commands', 200, 2.5, NULL)")
    conn.close()
    db = gw.Database(path)
    try:
        row = gw.AuditStore(db).tail(1)[0]
        assert gw.AuditStore.jsonl_entry(row) == {"ts": "t", "request_id": "r", "ip": "::1", "method": "POST",
                                                  "path": "/api/gateway/commands", "query": "", "status": 200,
                                                  "duration_ms": 2, "auth_required": False}
    finally:
        db.close()
