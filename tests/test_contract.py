"""Issue 13's differences to the original gateway, end to end against a live server.

Each test pins the original's behaviour where ours used to differ: flows served as authored, removing a
flows-dir bundle, `GET /runs?include_metrics=true`, a schedule's wrapper VisualFlow, the audit tail shape.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

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


def test_a_delete_that_cannot_remove_a_flows_dir_copy_deletes_no_upload(data_dir, bundle_builder, tmp_path,
                                                                        monkeypatch):
    """A read-only flows dir: the 400 says so, and the uploaded versions are still there and still start."""
    from conftest import multipart

    server = LiveServer(data_dir)
    try:
        upload = bundle_builder("echo", version="2.0.0", out_dir=tmp_path / "v2").read_bytes()
        body, ctype = multipart({}, {"file": ("e.flow", upload)})
        assert server.request("POST", f"{API}/bundles/upload", raw=body, headers={"Content-Type": ctype})[0] == 200
        real_unlink = Path.unlink

        def read_only(path, *args, **kwargs):
            if path.suffix == ".flow":
                raise OSError(30, "Read-only file system")
            return real_unlink(path, *args, **kwargs)

        monkeypatch.setattr(Path, "unlink", read_only)
        status, _, data = server.request("DELETE", f"{API}/bundles/echo")
        assert status == 400 and data["code"] == "bundle_remove_failed"
        monkeypatch.undo()
        assert server.post(f"{API}/runs/start", {"bundle_id": "echo@2.0.0"})[0] == 200
        server.close()
        server = LiveServer(data_dir)  # and after a restart
        assert server.get(f"{API}/bundles/echo@2.0.0")[0] == 200
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


# -- 6. reading values as the original's pydantic models and FastAPI read them --------------------------


def test_query_values_are_read_as_the_original_reads_them(live_server):
    """Choices ignore case and surrounding space, text filters are trimmed, flags take pydantic's words,
    a whole number may be written `1.0`, and a repeated parameter takes its last value."""
    run_id = live_server.post(f"{API}/runs/start", {"bundle_id": "echo", "input_data": {}})[2]["run_id"]
    _wait_status(live_server, run_id, "completed")
    for query in ("status=COMPLETED", "status=%20completed%20", "workflow_id=%20echo@1.0.0:echo%20",
                  "root_only=y", "root_only=T", "limit=1.0", "status=waiting&status=completed"):
        status, _, data = live_server.get(f"{API}/runs?{query}")
        assert status == 200 and [r["run_id"] for r in data["items"]] == [run_id], (query, data)
    assert live_server.get(f"{API}/runs?status=completed&status=waiting")[2]["items"] == []
    for query in ("root_only=", "root_only=maybe", "limit=1.5"):
        assert live_server.get(f"{API}/runs?{query}")[0] == 422, query
    assert live_server.get(f"{API}/runs/{run_id}/ledger?after=1&after=0")[2] == live_server.get(
        f"{API}/runs/{run_id}/ledger?after=0")[2]
    assert live_server.get(f"{API}/runs/{run_id}/history_bundle?ledger_mode=%20FULL%20")[0] == 200


def test_json_numbers_and_flags_are_read_as_pydantic_reads_them(live_server):
    status, _, data = live_server.post(f"{API}/runs/schedule", {"bundle_id": "echo", "flow_id": "echo",
                                                                "interval": "1H", "repeat_count": "2",
                                                                "share_context": "no"})
    assert status == 200, data
    sched = live_server.get(f"{API}/runs/{data['run_id']}")[2]["schedule"]
    assert sched["repeat_count"] == 2 and sched["share_context"] is False and sched["interval"] == "1H"
    for bad in ({"repeat_count": "two"}, {"repeat_count": 1.5}, {"repeat_count": "2."}, {"repeat_count": "1e3"},
                {"share_context": "maybe"}, {"share_context": 2}, {"share_context": " yes "}):
        status, _, data = live_server.post(f"{API}/runs/schedule", {"bundle_id": "echo", "flow_id": "echo", **bad})
        assert status == 422, (bad, data)


def test_schedule_start_and_interval_forms_the_original_takes(live_server):
    status, _, data = live_server.post(f"{API}/runs/schedule", {"bundle_id": "echo", "flow_id": "echo",
                                                                "start_at": " 1h ", "interval": " 500ms "})
    assert status == 200, data
    root = live_server.get(f"{API}/runs/{data['run_id']}")[2]
    sched = root["schedule"]
    assert sched["start_at"] == "1h" and sched["interval"] == "500ms"  # kept as given, trimmed
    wait_for(lambda: live_server.get(f"{API}/runs/{data['run_id']}")[2]["status"] == "waiting")
    until = gw.datetime.fromisoformat(sched["start_at_utc"])
    assert 3500 < (until - gw.datetime.now(gw.timezone.utc)).total_seconds() <= 3600
    status, _, data = live_server.post(f"{API}/runs/schedule", {"bundle_id": "echo", "flow_id": "echo",
                                                                "start_at": "2020-01-01T00:00:00Z", "interval": ""})
    assert status == 200, data
    sched = live_server.get(f"{API}/runs/{data['run_id']}")[2]["schedule"]
    assert sched["start_at"] == "2020-01-01T00:00:00Z" and sched["interval"] is None
    assert sched["start_at_utc"] == "2020-01-01T00:00:00+00:00"
    _wait_status(live_server, data["run_id"], "completed")  # a start in the past runs at once, once


def test_a_command_type_with_surrounding_space_is_that_command(live_server):
    run_id = live_server.post(f"{API}/runs/start", {"bundle_id": "ask"})[2]["run_id"]
    _wait_status(live_server, run_id, "waiting")
    status, _, data = live_server.post(f"{API}/commands", {"command_id": "spaced", "run_id": run_id,
                                                           "type": " pause "})
    assert status == 200 and data["accepted"], data
    assert wait_for(lambda: live_server.get(f"{API}/commands/spaced")[2]["status"] == "applied")


def test_an_upload_s_last_file_part_counts_and_a_missing_boundary_is_a_400(live_server, bundle_builder):
    first, second = bundle_builder("echo", bundle_id="first"), bundle_builder("echo", bundle_id="second")
    boundary = "b0undary"
    body = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{p.name}"\r\n'
                    f"Content-Type: application/octet-stream\r\n\r\n".encode() + p.read_bytes() + b"\r\n"
                    for p in (first, second)) + f"--{boundary}--\r\n".encode()
    status, _, data = live_server.request("POST", f"{API}/bundles/upload", raw=body,
                                          headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 200 and data["bundle_id"] == "second", data
    status, _, data = live_server.request("POST", f"{API}/bundles/upload", raw=body,
                                          headers={"Content-Type": "multipart/form-data"})
    assert status == 400 and data["code"] == "invalid_multipart", data


def test_deprecation_names_a_bundle_id_and_keeps_a_trimmed_reason(live_server):
    status, _, data = live_server.post(f"{API}/bundles/echo/deprecate", {"flow_id": "echo", "reason": "  old  "})
    assert status == 200 and data["reason"] == "old", data
    status, _, data = live_server.post(f"{API}/bundles/echo/deprecate", {"reason": "   "})
    assert status == 200 and data["reason"] is None, data
    status, _, data = live_server.post(f"{API}/bundles/echo@1.0.0/deprecate", {})  # a ref is no bundle id
    assert status == 404 and data["code"] == "bundle_not_found", data


def test_a_text_artifact_is_served_as_utf8_text(live_server):
    run_id = live_server.post(f"{API}/runs/start", {"bundle_id": "echo", "input_data": {}})[2]["run_id"]
    artifacts = live_server.gateway.stores.artifacts
    text = artifacts.store("héllo".encode(), content_type="text/plain", run_id=run_id).artifact_id
    data = artifacts.store(b"\x00\x01", content_type="application/octet-stream", run_id=run_id).artifact_id
    status, headers, body = live_server.get(f"{API}/runs/{run_id}/artifacts/{text}/content")
    assert status == 200 and headers["Content-Type"] == "text/plain; charset=utf-8" and body == "héllo".encode()
    status, headers, _ = live_server.get(f"{API}/runs/{run_id}/artifacts/{data}/content")
    assert status == 200 and headers["Content-Type"] == "application/octet-stream"


def test_node_index_names_and_colours_each_node_as_authored(data_dir):
    from conftest import FIXTURE_BUNDLES

    server = LiveServer(data_dir, flows_dir=str(FIXTURE_BUNDLES))
    try:
        status, _, data = server.get(f"{API}/bundles/basic")
        assert status == 200
        index = data["entrypoints"][0]["node_index"]
        flow = server.get(f"{API}/bundles/basic/flows/{data['entrypoints'][0]['flow_id']}")[2]["flow"]
        assert set(index) == {n["id"] for n in flow["nodes"]}
        for node in flow["nodes"]:  # observers colour ledger rows by node, from this index
            assert index[node["id"]] == {"type": node["data"].get("nodeType") or node["type"],
                                         "label": node["data"].get("label") or node["id"],
                                         "headerColor": node["data"]["headerColor"]}
    finally:
        server.close()


def test_a_body_not_sent_as_json_is_refused_as_on_the_original(live_server):
    before = live_server.get(f"{API}/runs")[2]["items"]
    for content_type in ("text/plain", None, "application/x-www-form-urlencoded"):
        headers = {"Content-Type": content_type} if content_type else {}
        status, _, data = live_server.request("POST", f"{API}/runs/start", raw=b'{"bundle_id": "echo"}',
                                              headers=headers)
        assert status == 422 and data["code"] == "validation_error", (content_type, data)
    assert live_server.get(f"{API}/runs")[2]["items"] == before  # nothing started (a form or a beacon can't)
    status, _, _ = live_server.request("POST", f"{API}/runs/start", raw=json.dumps({"bundle_id": "echo"}).encode(),
                                       headers={"Content-Type": "application/vnd.api+json; charset=utf-8"})
    assert status == 200
