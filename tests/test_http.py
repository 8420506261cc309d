"""HTTP API end to end: a live werkzeug server on a loopback port over a real SQLite file."""

from __future__ import annotations

import http.client
import os
import json
import socket


import abstractgateway as gw
from conftest import LiveServer, multipart, wait_for

API = "/api/gateway"


def _start(server, **body):
    status, _, data = server.post(f"{API}/runs/start", body)
    assert status == 200, data
    return data["run_id"]


def _wait_status(server, run_id, wanted, timeout=10):
    return wait_for(lambda: (d := server.get(f"{API}/runs/{run_id}")[2])["status"] == wanted and d, timeout)


def _is_error(data, code=None):
    assert set(data) >= {"detail", "code"} and isinstance(data["detail"], str)
    if code:
        assert data["code"] == code, data
    return True


# -- meta -------------------------------------------------------------------------------------------


def test_health_ping_openapi_docs(live_server):
    status, headers, data = live_server.get("/api/health")
    assert status == 200 and data["status"] == "healthy" and data["runner"]["alive"] is True
    assert data["store"] == {"backend": "sqlite", "ok": True}
    status, headers, data = live_server.get(f"{API}/ping")
    assert status == 200 and data["ok"] is True and headers["X-Request-Id"]
    status, _, spec = live_server.get("/openapi.json")
    assert status == 200 and spec["openapi"].startswith("3.1")
    status, headers, page = live_server.get("/docs")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b"/openapi.json" in page and b"<script src" not in page and b"https://" not in page  # offline


def test_openapi_document_is_valid():
    from openapi_spec_validator import validate

    validate(gw.openapi_document())


def test_unknown_paths_and_methods_use_the_error_shape(live_server):
    status, _, data = live_server.get(f"{API}/nope")
    assert status == 404 and _is_error(data, "not_found")
    status, _, data = live_server.request("DELETE", f"{API}/runs/start")
    assert status == 405 and _is_error(data, "method_not_allowed")
    status, _, data = live_server.get("/api/gatewayX/bundles")
    assert status == 404 and _is_error(data)


def test_errors_below_http_carry_a_code_and_the_http_section_picks_the_status():
    assert not hasattr(gw.GatewayError("x"), "status")
    cases = [(gw.GatewayError("x", code="validation_error"), 400),
             (gw.Unprocessable("x", code="validation_error"), 422), (gw.NotFound("x", code="run_not_found"), 404),
             (gw.Conflict("x", code="not_waiting"), 409),
             (gw.GatewayError("x", code="path_escape"), 403), (gw.GatewayError("x", code="too_large"), 413),
             (gw.GatewayError("x", code="llm_failed"), 502), (gw.DiskFull("x"), 507), (gw.DatabaseBusy("x"), 503),
             (gw.StorageError("x"), 503), (gw.RequestTimeout("x"), 408), (gw.InvalidText("x"), 422)]
    assert [gw.error_status(exc) for exc, _ in cases] == [status for _, status in cases]


# -- bundles ----------------------------------------------------------------------------------------


def test_bundle_routes(live_server, bundle_builder):
    status, _, data = live_server.get(f"{API}/bundles")
    assert status == 200 and {i["bundle_id"] for i in data["items"]} >= {"echo", "ask"}
    assert data["default_bundle_id"] is None
    status, _, data = live_server.get(f"{API}/bundles/echo")
    assert status == 200 and data["entrypoints"][0]["workflow_id"] == "echo@1.0.0:echo"
    assert data["entrypoints"][0]["inputs"] == [{"id": "message", "label": "message", "type": "string",
                                                 "default": "hello"}]
    assert live_server.get(f"{API}/bundles/nope")[0] == 404
    assert live_server.get(f"{API}/bundles/echo?bundle_version=9")[0] == 404
    status, _, data = live_server.get(f"{API}/bundles/echo@1.0.0?bundle_version=2.0.0")
    assert status == 400 and _is_error(data, "version_conflict")
    status, _, data = live_server.get(f"{API}/bundles/@1.0.0")  # a version without its bundle, as on the original
    assert status == 400 and _is_error(data, "bundle_id_required")
    status, _, data = live_server.get(f"{API}/bundles/echo/flows/echo")
    assert status == 200 and data["flow"]["id"] == "echo"  # as authored, not the namespaced execution copy
    assert live_server.get(f"{API}/bundles/echo/flows/missing")[0] == 404
    status, _, data = live_server.get(f"{API}/workflows/echo@1.0.0:echo/flow")
    assert status == 200 and data["workflow_id"] == "echo@1.0.0:echo"
    assert live_server.get(f"{API}/workflows/nope:x/flow")[0] == 404

    # deprecate / undeprecate
    status, _, data = live_server.post(f"{API}/bundles/echo/deprecate", {"flow_id": "echo", "reason": "old"})
    assert status == 200 and data["flow_id"] == "echo"
    assert "echo" not in {i["bundle_id"] for i in live_server.get(f"{API}/bundles")[2]["items"]}
    assert "echo" in {i["bundle_id"] for i in live_server.get(f"{API}/bundles?include_deprecated=true")[2]["items"]}
    status, _, data = live_server.post(f"{API}/runs/start", {"bundle_id": "echo"})
    assert status == 409 and _is_error(data, "deprecated") and "old" in data["detail"]
    assert live_server.post(f"{API}/bundles/echo/deprecate", {"flow_id": "nope"})[0] == 404
    status, _, data = live_server.post(f"{API}/bundles/echo/undeprecate", {"flow_id": "echo"})
    assert status == 200 and data["removed"] is True
    assert live_server.post(f"{API}/runs/start", {"bundle_id": "echo"})[0] == 200


def test_upload_then_run_after_restart(data_dir, bundle_builder):
    server = LiveServer(data_dir)
    try:
        content = bundle_builder("echo", bundle_id="uploaded", version="2.0.0").read_bytes()
        body, ctype = multipart({"overwrite": "false"}, {"file": ("x.flow", content)})
        status, _, data = server.request("POST", f"{API}/bundles/upload", raw=body, headers={"Content-Type": ctype})
        assert status == 200 and data["bundle_ref"] == "uploaded@2.0.0" and data["gateway_reloaded"] is True
        status, _, data = server.request("POST", f"{API}/bundles/upload", raw=body, headers={"Content-Type": ctype})
        assert status == 400 and _is_error(data, "bundle_exists")  # as the original's registry errors
        bad, ctype2 = multipart({}, {"file": ("x.flow", b"this is no zip")})
        status, _, data = server.request("POST", f"{API}/bundles/upload", raw=bad, headers={"Content-Type": ctype2})
        assert status == 400 and _is_error(data, "bundle_invalid")
        status, _, data = server.request("POST", f"{API}/bundles/upload", raw=b"", headers={"Content-Type": ctype2})
        assert status == 422 and _is_error(data, "validation_error")
    finally:
        server.close()
    server = LiveServer(data_dir)  # restart: the bundle lives in the database
    try:
        run_id = _start(server, bundle_id="uploaded", input_data={"message": "from the db"})
        _wait_status(server, run_id, "completed")
        status, _, data = server.request("DELETE", f"{API}/bundles/uploaded")
        assert status == 200 and data["removed"] == 1
        assert server.request("DELETE", f"{API}/bundles/uploaded")[0] == 404
        assert server.post(f"{API}/bundles/reload")[2]["ok"] is True
        status, _, data = server.get(f"{API}/runs/{run_id}/input_data")  # its flow is gone: its pins are unknown
        assert status == 200 and data["pin_ids"] == [] and data["input_data"]["message"] == "from the db"
        assert set(data["input_data"]) == {"message", "workspace_root"}  # every public var, as on the original
        assert (data["bundle_id"], data["bundle_version"], data["flow_id"]) == ("uploaded", "2.0.0", "echo")
    finally:
        server.close()


# -- runs -------------------------------------------------------------------------------------------


def test_start_get_list_input(live_server):
    run_id = _start(live_server, bundle_id="echo", input_data={"message": "yo"}, session_id="sess")
    data = _wait_status(live_server, run_id, "completed")
    assert data["workflow_id"] == "echo@1.0.0:echo" and data["session_id"] == "sess" and data["paused"] is False
    assert set(data) >= {"waiting", "limits", "is_scheduled", "schedule", "error", "current_node"}
    status, _, data = live_server.get(f"{API}/runs/{run_id}/input_data")
    assert status == 200 and data["input_data"] == {"message": "yo"} and data["pin_ids"] == ["message"]
    other = _start(live_server, bundle_id="event", input_data={"topic": "x", "n": 1})  # a flow with no start pins
    status, _, data = live_server.get(f"{API}/runs/{other}/input_data")
    assert status == 200 and data["pin_ids"] == [] and {"topic": "x", "n": 1}.items() <= data["input_data"].items()
    assert not [k for k in data["input_data"] if k.startswith("_")]  # its public vars, as on the original
    status, _, data = live_server.get(f"{API}/runs?session_id=sess")
    assert [i["run_id"] for i in data["items"]] == [run_id] and data["items"][0]["ledger_len"] >= 1
    assert live_server.get(f"{API}/runs/nope")[0] == 404
    assert live_server.get(f"{API}/runs/nope/input_data")[0] == 404
    status, _, data = live_server.get(f"{API}/runs?status=bogus")
    assert status == 400 and _is_error(data, "validation_error")
    status, _, data = live_server.get(f"{API}/runs?limit=0")
    assert status == 422 and "limit" in data["detail"]
    status, _, data = live_server.get(f"{API}/runs/{run_id}/history_bundle")
    assert status == 200 and data["root_run_id"] == run_id


def test_listed_runs_have_the_shape_and_values_of_a_run_read_alone(live_server):
    run_id = _start(live_server, bundle_id="wait-key", session_id="shape")
    _wait_status(live_server, run_id, "waiting")
    live_server.post(f"{API}/commands", {"command_id": "shape-pause", "run_id": run_id, "type": "pause",
                                         "payload": {"reason": "lunch"}})
    alone = wait_for(lambda: (d := live_server.get(f"{API}/runs/{run_id}")[2])["paused"] and d)
    listed = live_server.get(f"{API}/runs?session_id=shape&include_ledger_len=false")[2]["items"]
    assert listed == [alone] and alone["pause_reason"] == "lunch" and alone["current_node"]


def test_a_run_read_again_after_it_changes_shows_the_change_large_or_small(live_server):
    """GET /runs/{id} may answer an unchanged run from its stored text; any change shows at once,
    and a run too large to remember is read in full each time."""
    for size in (10, 40_000):
        run_id = _start(live_server, bundle_id="ask", input_data={"pad": "x" * size})
        waiting = _wait_status(live_server, run_id, "waiting")
        assert live_server.get(f"{API}/runs/{run_id}")[2] == waiting  # the same answer, unchanged run
        live_server.post(f"{API}/commands", {"command_id": f"a{size}", "run_id": run_id, "type": "resume", "payload": {
            "wait_key": waiting["waiting"]["wait_key"], "payload": {"response": "yes"}}})
        done = _wait_status(live_server, run_id, "completed")
        assert done["waiting"] is None and done["updated_at"] > waiting["updated_at"]
    status, _, data = live_server.get(f"{API}/runs/nope")
    assert status == 404 and _is_error(data, "run_not_found")


def test_start_errors(live_server):
    status, _, data = live_server.post(f"{API}/runs/start", {})
    assert status == 400 and _is_error(data, "flow_id_required")
    status, _, data = live_server.post(f"{API}/runs/start", {"bundle_id": "echo", "flow_id": "nope"})
    assert status == 404 and _is_error(data, "flow_not_found")
    status, _, data = live_server.post(f"{API}/runs/start", {"bundle_id": "echo", "input_data": "not an object"})
    assert status == 422 and "input_data" in data["detail"]
    status, _, data = live_server.request("POST", f"{API}/runs/start", raw=b"{not json",
                                          headers={"Content-Type": "application/json"})
    assert status == 422 and _is_error(data, "invalid_json")  # as the original (FastAPI)
    for empty in (b"", b"  \r\n"):  # a body is required, as by the original's request model
        status, _, data = live_server.request("POST", f"{API}/runs/start", raw=empty,
                                              headers={"Content-Type": "application/json"})
        assert status == 422 and _is_error(data, "validation_error") and "body" in data["detail"]


def test_runs_pagination_cursor_walks_everything_once(live_server):
    ids = {_start(live_server, bundle_id="ask") for _ in range(7)}
    for run_id in ids:  # a stable set: the keyset orders by updated_at, which each tick moves
        _wait_status(live_server, run_id, "waiting")
    seen, cursor = [], None
    while True:
        status, _, data = live_server.get(f"{API}/runs?limit=3" + (f"&cursor={cursor}" if cursor else ""))
        assert status == 200
        seen.extend(i["run_id"] for i in data["items"])
        cursor = data["next_cursor"]
        if not cursor:
            break
    assert sorted(seen) == sorted(ids) and len(seen) == len(set(seen))
    assert live_server.get(f"{API}/runs?cursor=%%%")[0] == 422


def test_artifacts_routes_with_range(live_server):
    run_id = _start(live_server, bundle_id="echo")
    meta = live_server.gateway.stores.artifacts.store(bytes(range(256)) * 10, content_type="application/x-test",
                                                      run_id=run_id)
    status, _, data = live_server.get(f"{API}/runs/{run_id}/artifacts")
    kinds = {i["artifact_id"]: i["tags"].get("kind") for i in data["items"]}
    assert status == 200 and kinds == {meta.artifact_id: None,
                                       **{a: k for a, k in kinds.items() if k == "workflow_snapshot"}}
    assert list(kinds.values()).count("workflow_snapshot") == 1  # the flow the run started from, as on the original
    status, _, data = live_server.get(f"{API}/runs/{run_id}/artifacts/{meta.artifact_id}")
    assert status == 200 and data["size_bytes"] == 2560
    status, headers, body = live_server.get(f"{API}/runs/{run_id}/artifacts/{meta.artifact_id}/content")
    assert status == 200 and body == bytes(range(256)) * 10 and headers["Content-Type"] == "application/x-test"
    assert headers["Content-Security-Policy"] == "sandbox"  # an HTML or SVG artifact runs no script on our origin
    status, headers, body = live_server.get(f"{API}/runs/{run_id}/artifacts/{meta.artifact_id}/content",
                                            headers={"Range": "bytes=10-19"})
    assert status == 206 and body == bytes(range(10, 20)) and headers["Content-Range"] == "bytes 10-19/2560"
    assert live_server.get(f"{API}/runs/{run_id}/artifacts/{meta.artifact_id}/content",
                           headers={"Range": "bytes=9999-"})[0] == 416
    status, _, data = live_server.get(f"{API}/runs/{run_id}/artifacts/bad.id")
    assert status == 400 and _is_error(data, "invalid_artifact_id")
    assert live_server.get(f"{API}/runs/{run_id}/artifacts/{'a' * 32}")[0] == 404
    assert live_server.get(f"{API}/runs/nope/artifacts")[0] == 404


# -- ledger -----------------------------------------------------------------------------------------


def _fill_ledger(server, n=57):
    from abstractruntime.core.models import StepRecord, StepStatus

    run_id = _start(server, bundle_id="ask")
    _wait_status(server, run_id, "waiting")
    for i in range(n):
        server.gateway.stores.ledger.append(StepRecord(run_id=run_id, step_id=f"x{i}", node_id="n",
                                                       status=StepStatus.COMPLETED))
    return run_id


def test_ledger_pagination_invariants(live_server):
    run_id = _fill_ledger(live_server)
    full = live_server.gateway.stores.ledger.list(run_id)
    for limit in (1, 7, 50, 2000):
        pages, after = [], 0
        while True:
            status, _, data = live_server.get(f"{API}/runs/{run_id}/ledger?after={after}&limit={limit}")
            assert status == 200 and data["next_after"] == after + len(data["items"])
            if not data["items"]:
                break
            pages.extend(data["items"])
            after = data["next_after"]
        assert pages == full
    status, _, data = live_server.get(f"{API}/runs/{run_id}/ledger?after=10000")
    assert data == {"items": [], "next_after": 10000}
    assert live_server.get(f"{API}/runs/nope/ledger?after=3")[2] == {"items": [], "next_after": 3}  # as the original
    assert live_server.get(f"{API}/runs/{run_id}/ledger?after=")[0] == 422  # an empty number, as the original
    assert live_server.get(f"{API}/runs/{run_id}/ledger?limit=2001")[0] == 422
    assert live_server.get(f"{API}/runs/{run_id}/ledger?after=-1")[0] == 422
    status, _, data = live_server.post(f"{API}/runs/ledger/batch", {"runs": [{"run_id": run_id, "after": 5},
                                                                            {"run_id": "unknown"}], "limit": 3})
    assert status == 200 and list(data["runs"]) == [run_id, "unknown"]
    assert data["runs"][run_id] == {"items": full[5:8], "next_after": 8}
    assert data["runs"]["unknown"] == {"items": [], "next_after": 0}
    assert live_server.post(f"{API}/runs/ledger/batch", {"runs": "x"})[0] == 422


# -- commands ---------------------------------------------------------------------------------------


def test_commands_and_their_outcomes(live_server):
    run_id = _start(live_server, bundle_id="ask")
    run = _wait_status(live_server, run_id, "waiting")
    body = {"command_id": "c-1", "run_id": run_id, "type": "resume",
            "payload": {"wait_key": run["waiting"]["wait_key"], "payload": {"response": "Ada"}}}
    status, _, data = live_server.post(f"{API}/commands", body)
    assert status == 200 and data["accepted"] is True and data["duplicate"] is False
    seq = data["seq"]
    status, _, data = live_server.post(f"{API}/commands", body)
    assert data == {"accepted": False, "duplicate": True, "seq": seq}
    _wait_status(live_server, run_id, "completed")
    status, _, data = wait_for(lambda: (r := live_server.get(f"{API}/commands/c-1"))[2]["status"] != "pending" and r)
    assert data["status"] == "applied"
    live_server.post(f"{API}/commands", {"command_id": "c-2", "run_id": run_id, "type": "resume",
                                         "payload": {"payload": {"response": "again"}}})
    data = wait_for(lambda: (d := live_server.get(f"{API}/commands/c-2")[2])["status"] != "pending" and d)
    assert data["status"] == "failed" and "not waiting" in data["error"]
    status, _, data = live_server.get(f"{API}/runs/{run_id}/commands")
    assert [i["command_id"] for i in data["items"]] == ["c-2", "c-1"]
    status, _, data = live_server.post(f"{API}/commands", {"command_id": "c-3", "run_id": run_id, "type": "explode"})
    assert status == 400 and _is_error(data, "validation_error")
    status, _, data = live_server.post(f"{API}/commands", {"run_id": run_id, "type": "pause"})
    assert status == 422 and "command_id" in data["detail"]
    assert live_server.get(f"{API}/commands/nope")[0] == 404


# -- SSE --------------------------------------------------------------------------------------------


class SSE:
    """A tiny SSE client over http.client (chunked decoding included)."""

    def __init__(self, server, path, headers=None, timeout=10):
        self.conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
        self.conn.request("GET", path, headers={"Authorization": f"Bearer {server.TOKEN}", **(headers or {})})
        self.resp = self.conn.getresponse()

    def events(self):
        event = {}
        while True:
            line = self.resp.readline()
            if not line:
                return
            line = line.decode().rstrip("\n")
            if not line:
                if event:
                    yield event
                event = {}
                continue
            if line.startswith(":"):
                yield {"comment": line[1:].strip()}
                continue
            key, _, value = line.partition(": ")
            event[key] = value

    def close(self):
        self.conn.close()


def test_sse_streams_every_record_in_order_and_closes_with_done(live_server):
    run_id = _start(live_server, bundle_id="ask")
    _wait_status(live_server, run_id, "waiting")
    stream = SSE(live_server, f"{API}/runs/{run_id}/ledger/stream?heartbeat_s=5")
    assert stream.resp.status == 200 and stream.resp.getheader("Content-Type").startswith("text/event-stream")
    assert stream.resp.getheader("Transfer-Encoding") == "chunked"
    events = stream.events()
    assert next(events) == {"retry": str(gw.SSE_RETRY_MS)}
    first = [next(events) for _ in range(live_server.gateway.stores.ledger.count(run_id))]
    wait_key = live_server.get(f"{API}/runs/{run_id}")[2]["waiting"]["wait_key"]
    live_server.post(f"{API}/commands", {"command_id": "go", "run_id": run_id, "type": "resume",
                                         "payload": {"wait_key": wait_key, "payload": {"response": "x"}}})
    rest = list(events)
    stream.close()
    steps = [e for e in first + rest if e.get("event") == "step"]
    assert [int(e["id"]) for e in steps] == list(range(1, len(steps) + 1))
    assert [json.loads(e["data"])["record"] for e in steps] == live_server.gateway.stores.ledger.list(run_id)
    assert rest[-1]["event"] == "done" and json.loads(rest[-1]["data"]) == {"run_id": run_id, "cursor": len(steps),
                                                                            "status": "terminal"}


def test_sse_resume_with_last_event_id_has_no_gap_or_duplicate(live_server):
    run_id = _fill_ledger(live_server, n=20)
    total = live_server.gateway.stores.ledger.count(run_id)
    stream = SSE(live_server, f"{API}/runs/{run_id}/ledger/stream")
    events = stream.events()
    got = [e for e in (next(events) for _ in range(9)) if e.get("event") == "step"]
    stream.close()
    last_id = got[-1]["id"]
    # a browser EventSource reconnects to the same URL (no `after`) with the last id it saw
    stream = SSE(live_server, f"{API}/runs/{run_id}/ledger/stream", headers={"Last-Event-ID": last_id})
    events = stream.events()
    more = []
    while len(got) + len(more) < total:
        e = next(events)
        if e.get("event") == "step":
            more.append(e)
    stream.close()
    assert [int(e["id"]) for e in got + more] == list(range(1, total + 1))
    # an explicit `after` wins over the header, and a header that is no cursor is ignored (as the original)
    for query, header, first in (("?after=3", "7", 4), ("", "x7", 1), ("", str(10**30), 1), ("", "", 1)):
        stream = SSE(live_server, f"{API}/runs/{run_id}/ledger/stream{query}", headers={"Last-Event-ID": header})
        step = next(e for e in stream.events() if e.get("event") == "step")
        stream.close()
        assert int(step["id"]) == first, (query, header)


def test_sse_keepalive_when_idle_and_unknown_run(live_server):
    run_id = _start(live_server, bundle_id="ask")
    _wait_status(live_server, run_id, "waiting")
    stream = SSE(live_server, f"{API}/runs/{run_id}/ledger/stream?heartbeat_s=0.2")
    events = stream.events()
    seen = []
    while not any("comment" in e for e in seen):
        seen.append(next(events))
    assert {"comment": "keep-alive"} in seen
    stream.close()
    status, _, data = live_server.get(f"{API}/runs/nope/ledger/stream")
    assert status == 404 and _is_error(data, "run_not_found")
    assert live_server.get(f"{API}/runs/{run_id}/ledger/stream?heartbeat_s=0")[0] == 422


def test_sse_dropped_client_is_cleaned_up(live_server):
    run_id = _start(live_server, bundle_id="ask")
    _wait_status(live_server, run_id, "waiting")
    topic = gw.ledger_topic(run_id)
    signals = live_server.gateway.stores.db.signals
    sock = socket.create_connection(("127.0.0.1", live_server.port))
    sock.sendall(f"GET {API}/runs/{run_id}/ledger/stream?heartbeat_s=30 HTTP/1.1\r\nHost: x\r\n"
                 f"Authorization: Bearer {live_server.TOKEN}\r\n\r\n".encode())
    assert sock.recv(100).startswith(b"HTTP/1.1 200")
    wait_for(lambda: topic in signals._topics)
    sock.close()
    wait_for(lambda: topic not in signals._topics, timeout=3)  # stream generator ended, subscription released


def test_schedule_route(live_server):
    status, _, data = live_server.post(f"{API}/runs/schedule", {"bundle_id": "echo", "flow_id": "echo",
                                                                "interval": "1s", "repeat_count": 2})
    assert status == 200
    run = _wait_status(live_server, data["run_id"], "completed")
    assert run["is_scheduled"] is True and run["schedule"]["repeat_count"] == 2
    status, _, flow = live_server.get(f"{API}/workflows/{run['workflow_id']}/flow")
    assert status == 200 and flow["source"] == "dynamic"
    status, _, inputs = live_server.get(f"{API}/runs/{run['run_id']}/input_data")
    assert inputs["workflow_id"] == run["workflow_id"] and inputs["workflow_id"].startswith("scheduled:")
    assert (inputs["bundle_id"], inputs["flow_id"], inputs["pin_ids"]) == ("echo", "echo", ["message"])
    status, _, data = live_server.post(f"{API}/runs/schedule", {"bundle_id": "echo"})
    assert status == 422 and "flow_id" in data["detail"]
    status, _, data = live_server.post(f"{API}/runs/schedule",
                                       {"bundle_id": "echo", "flow_id": "echo", "repeat_count": 0})
    assert status == 400 and _is_error(data, "invalid_schedule")


def test_request_threads_do_not_leak_database_connections(live_server):
    db = live_server.gateway.stores.db
    for _ in range(300):
        assert live_server.get(f"{API}/runs")[0] == 200
    wait_for(lambda: len(db._all_connections) < 50, timeout=5)


def test_sse_works_on_file_descriptors_above_1024(live_server):
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1400:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    filler = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]  # push new sockets past FD_SETSIZE
    try:
        run_id = _start(live_server, bundle_id="ask")
        _wait_status(live_server, run_id, "waiting")
        stream = SSE(live_server, f"{API}/runs/{run_id}/ledger/stream?heartbeat_s=0.2")
        events = stream.events()
        seen = [next(events) for _ in range(6)]  # retry, records, then keep-alives: the stream stays up
        stream.close()
        assert {"comment": "keep-alive"} in seen
    finally:
        for fd in filler:
            os.close(fd)


def test_hostile_values_get_4xx_not_500(live_server):
    run_id = _start(live_server, bundle_id="echo")
    assert live_server.get(f"{API}/runs/{run_id}/ledger?after={10**30}")[0] == 422
    assert live_server.get(f"{API}/runs/{run_id}/ledger/stream?heartbeat_s=nan")[0] == 422
    status, _, data = live_server.post(f"{API}/runs/ledger/batch", {"runs": [{"run_id": run_id, "after": 10**30}]})
    assert status == 200 and data["runs"][run_id] == {"items": [], "next_after": 10**30}  # as on the original
    deep = b"[" * 50_000 + b"]" * 50_000
    status, _, data = live_server.request("POST", f"{API}/runs/ledger/batch", raw=deep[:200_000],
                                          headers={"Content-Type": "application/json"})
    assert status == 422 and data["code"] == "invalid_json"
    status, _, data = live_server.request("POST", f"{API}/runs/start",
                                          raw=b'{"bundle_id": "echo", "input_data": {"a": NaN}}',
                                          headers={"Content-Type": "application/json"})
    assert status == 422 and data["code"] == "invalid_json"


def test_a_writer_blocked_by_another_process_gets_503_database_busy(data_dir):
    """A stalled writer elsewhere (SIGSTOP, a hung disk) turns into a retryable 503, never a 500."""
    import apsw

    server = LiveServer(data_dir, runner=False, busy_timeout_s="0.3")
    other = apsw.Connection(str(server.gateway.stores.db.path))
    try:
        other.execute("BEGIN IMMEDIATE")  # holds the write lock, as a stopped process would
        status, headers, body = server.post("/api/gateway/runs/start", {"bundle_id": "echo"})
        assert status == 503 and body["code"] == "database_busy" and headers.get("Retry-After") == "1"
        status, _, health = server.get("/api/health")
        assert health["status"] == "degraded" and health["store"]["write_failure"]["code"] == "database_busy"
        other.execute("ROLLBACK")
        status, _, body = server.post("/api/gateway/runs/start", {"bundle_id": "echo"})
        assert status == 200 and body["run_id"]
    finally:
        other.close()
        server.close()


def test_health_names_the_lease_holder_and_its_age(live_server):
    _, _, health = live_server.get("/api/health")
    lease = health["runner"]["lease"]
    assert health["runner"]["has_lease"] and lease["owner"] == live_server.runner.owner and lease["live"]
    assert lease["held_for_s"] >= 0 and lease["epoch"] >= 1


def test_a_terminal_status_is_never_seen_before_the_final_records(live_server):
    """Status and closing records commit together: a client that sees `completed` reads them at once."""
    run_ids = [live_server.post("/api/gateway/runs/start", {"bundle_id": "echo", "input_data": {"message": str(i)}})[2]
               ["run_id"] for i in range(25)]
    for run_id in run_ids:
        wait_for(lambda rid=run_id: live_server.get(f"/api/gateway/runs/{rid}")[2]["status"] == "completed")
        items = live_server.get(f"/api/gateway/runs/{run_id}/ledger?after=0&limit=1000")[2]["items"]
        assert items[-1]["idempotency_key"] == "system:terminal_status:completed"
