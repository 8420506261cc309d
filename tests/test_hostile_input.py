"""Hostile probes against a live server: input that cannot be stored is a 4xx JSON error, never a 500.

Covers issue 9's input cases: lone surrogates (JSON `\\ud800` escapes or raw UTF-8-encoded surrogates) in
any body field, invalid UTF-8 in a path segment or query parameter, non-finite numbers, a blank
`command_id`, malformed `ledger/batch` requests, `Allow` on 405, and the schedule minimum interval.
"""

from __future__ import annotations

import json
import socket

import pytest

import abstractgateway as gw
from conftest import LiveServer, wait_for

API = "/api/gateway"
SURROGATE_ESCAPE = "\\ud800"  # as sent on the wire: a JSON escape that decodes to a lone surrogate


def _raw(server, method, path, text: str | bytes):
    """Send a JSON body verbatim (json.dumps cannot produce the hostile forms)."""
    data = text.encode() if isinstance(text, str) else text
    return server.request(method, path, raw=data, headers={"Content-Type": "application/json"})


def _assert_json_4xx(status, headers, data, code=None):
    assert 400 <= status < 500, (status, data)
    assert headers["Content-Type"].startswith("application/json"), headers
    assert set(data) >= {"detail", "code"} and isinstance(data["detail"], str), data
    if code is not None:
        assert data["code"] == code, data


def _start(server, **body):
    status, _, data = server.post(f"{API}/runs/start", body)
    assert status == 200, data
    return data["run_id"]


# -- unencodable text ---------------------------------------------------------------------------------


def test_lone_surrogates_in_any_body_field_are_refused_with_422(live_server):
    run_id = _start(live_server, bundle_id="echo")
    s = SURROGATE_ESCAPE
    probes = [
        ("POST", f"{API}/runs/start", f'{{"bundle_id": "echo", "session_id": "{s}"}}', "session_id"),
        ("POST", f"{API}/runs/start", f'{{"bundle_id": "echo", "input_data": {{"message": ["ok", "a{s}b"]}}}}',
         "input_data.message[1]"),
        ("POST", f"{API}/runs/start", f'{{"bundle_id": "echo", "input_data": {{"{s}": 1}}}}', "input_data"),
        ("POST", f"{API}/runs/start", f'{{"bundle_id": "{s}"}}', "bundle_id"),
        ("POST", f"{API}/runs/ledger/batch", f'{{"runs": [{{"run_id": "{s}"}}]}}', "runs[0].run_id"),
        ("POST", f"{API}/bundles/echo/deprecate", f'{{"flow_id": "echo", "reason": "{s}"}}', "reason"),
        ("POST", f"{API}/runs/schedule", f'{{"bundle_id": "echo", "flow_id": "echo", "session_id": "{s}"}}',
         "session_id"),
        ("POST", f"{API}/commands", f'{{"command_id": "{s}", "run_id": "{run_id}", "type": "pause"}}', "command_id"),
        ("POST", f"{API}/commands", f'{{"command_id": "c", "run_id": "{s}", "type": "pause"}}', "run_id"),
        ("POST", f"{API}/commands", f'{{"command_id": "c", "run_id": "{run_id}", "type": "emit_event", '
                                    f'"payload": {{"name": "{s}"}}}}', "payload.name"),
    ]
    for method, path, body, field in probes:
        status, headers, data = _raw(live_server, method, path, body)
        _assert_json_4xx(status, headers, data, "invalid_text")
        assert status == 422 and f"'{field}'" in data["detail"], (path, body, data)
    # the same surrogate as raw bytes (UTF-8-encoded U+D800: JSON decoders pass it through)
    status, headers, data = _raw(live_server, "POST", f"{API}/runs/start",
                                 b'{"bundle_id": "echo", "session_id": "\xed\xa0\x80"}')
    _assert_json_4xx(status, headers, data, "invalid_text")
    # nothing was stored: the deprecation was refused, the echo bundle still starts
    assert live_server.post(f"{API}/runs/start", {"bundle_id": "echo"})[0] == 200
    assert live_server.get(f"{API}/commands/c")[0] == 404


def test_invalid_utf8_in_path_or_query_is_refused_not_mangled(live_server):
    for path in (f"{API}/runs/%ED%A0%80", f"{API}/runs/%FF/ledger", f"{API}/commands/%C3",
                 f"{API}/runs?session_id=%ED%A0%80", f"{API}/runs?workflow_id=%FF",
                 f"{API}/bundles/%ED%A0%80/flows/x", f"{API}/workflows/a%FF:b/flow"):
        status, headers, data = live_server.get(path)
        _assert_json_4xx(status, headers, data, "invalid_text")
    # raw (unescaped) non-UTF-8 bytes in the request line
    sock = socket.create_connection(("127.0.0.1", live_server.port), timeout=5)
    sock.sendall(b"GET " + API.encode() + b"/runs/\xed\xa0\x80 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                 b"Authorization: Bearer " + LiveServer.TOKEN.encode() + b"\r\n\r\n")
    reply = b""
    while chunk := sock.recv(65536):
        reply += chunk
    sock.close()
    status = int(reply.split(b" ", 2)[1])
    assert 400 <= status < 500  # http.server itself refuses such a request line (the server layer's answer)


def test_valid_unicode_ids_echo_safely_in_404s(live_server):
    from urllib.parse import quote

    for text in ("é", "日本", "😀", "\ufffd", "a b"):
        status, headers, data = live_server.get(f"{API}/runs/{quote(text)}")
        _assert_json_4xx(status, headers, data, "run_not_found")
        assert text in data["detail"]
        status, headers, data = live_server.get(f"{API}/commands/{quote(text)}")
        _assert_json_4xx(status, headers, data, "command_not_found")


def test_error_details_that_echo_input_are_always_encodable():
    response = gw.error_response(404, "run_not_found", "Run '\ud800' not found")
    body = json.loads(response.body)
    assert body == {"detail": "Run '\ufffd' not found", "code": "run_not_found"}


def test_non_finite_numbers_are_not_json(live_server):
    for number in ("1e999", "-1e999"):
        status, headers, data = _raw(live_server, "POST", f"{API}/runs/start",
                                     f'{{"bundle_id": "echo", "input_data": {{"x": {number}}}}}')
        _assert_json_4xx(status, headers, data, "invalid_json")


# -- other input flaws --------------------------------------------------------------------------------


def test_a_blank_command_id_gets_a_generated_one_and_a_real_one_stays_idempotent(live_server):
    """As on the original: a blank `command_id` is replaced by a generated one (no idempotency);
    a blank `run_id` is the store's 400."""
    run_id = _start(live_server, bundle_id="ask")
    seqs = []
    for blank in ("", " ", "\t\n"):
        status, _, data = live_server.post(f"{API}/commands", {"command_id": blank, "run_id": run_id, "type": "pause"})
        assert status == 200 and data["accepted"] is True and data["duplicate"] is False, data
        seqs.append(data["seq"])
    assert len(set(seqs)) == 3  # three commands, each with its own generated id
    ids = [c["command_id"] for c in live_server.get(f"{API}/runs/{run_id}/commands")[2]["items"]]
    assert len(ids) == 3 and all(len(i) == 32 and i.strip() == i for i in ids), ids
    status, headers, data = live_server.post(f"{API}/commands", {"command_id": "c", "run_id": " ", "type": "pause"})
    _assert_json_4xx(status, headers, data, "invalid_command")
    assert status == 400 and "run_id" in data["detail"]
    body = {"command_id": "retry-me", "run_id": run_id, "type": "pause"}
    first, second = live_server.post(f"{API}/commands", body)[2], live_server.post(f"{API}/commands", body)[2]
    assert first["accepted"] and second == {"accepted": False, "duplicate": True, "seq": first["seq"]}


def test_ledger_batch_validates_limit_and_run_entries(live_server):
    run_id = _start(live_server, bundle_id="echo")
    for limit in (0, -1, 2001, 1.5, "x", "5.5", "1e999"):
        status, headers, data = live_server.post(f"{API}/runs/ledger/batch", {"runs": [{"run_id": run_id}],
                                                                              "limit": limit})
        _assert_json_4xx(status, headers, data)
        assert status == 422 and "limit" in data["detail"], (limit, data)
    for limit in ("5", 2.0, True):  # read as pydantic reads them on the original: 5, 2 and 1
        status, _, data = live_server.post(f"{API}/runs/ledger/batch", {"runs": [{"run_id": run_id}], "limit": limit})
        assert status == 200, (limit, data)
    for after in (True, "3", 2.0, 10**30):  # as the original reads them; past every cursor: an empty page
        status, _, data = live_server.post(f"{API}/runs/ledger/batch", {"runs": [{"run_id": run_id, "after": after}]})
        assert status == 200 and data["runs"][run_id]["next_after"] >= int(after), (after, data)
    for entry in ({}, {"after": 0}, {"run_id": 5}, {"run_id": None}, "x", {"run_id": run_id, "after": -1},
                  {"run_id": run_id, "after": "x"}, {"run_id": run_id, "after": 1.5}):
        status, headers, data = live_server.post(f"{API}/runs/ledger/batch", {"runs": [entry]})
        _assert_json_4xx(status, headers, data)
        assert status == 422 and "runs" in data["detail"], (entry, data)
    # as on the original: blank ids are skipped, no `runs` is no pages, an unknown run's page is empty
    for body in ({"runs": [{"run_id": ""}, {"run_id": "  "}]}, {}, {"limit": 5}):
        status, _, data = live_server.post(f"{API}/runs/ledger/batch", body)
        assert (status, data) == (200, {"runs": {}}), body
    wait_for(lambda: live_server.gateway.stores.ledger.count(run_id) > 0)
    status, _, data = live_server.post(f"{API}/runs/ledger/batch", {"runs": [{"run_id": run_id}, {"run_id": "gone",
                                                                                                 "after": 3}],
                                                                   "limit": 1})
    assert status == 200 and list(data["runs"]) == [run_id, "gone"] and len(data["runs"][run_id]["items"]) == 1
    assert data["runs"]["gone"] == {"items": [], "next_after": 3}


def test_405_lists_the_allowed_methods(live_server):
    for method, path, allowed in (("DELETE", f"{API}/runs/start", {"GET", "HEAD", "POST"}),  # also GET /runs/<id>
                                  ("GET", f"{API}/commands", {"POST"}),
                                  ("POST", f"{API}/runs", {"GET", "HEAD"}),
                                  ("PUT", f"{API}/bundles/echo", {"GET", "HEAD", "DELETE"})):
        status, headers, data = live_server.request(method, path)
        _assert_json_4xx(status, headers, data, "method_not_allowed")
        assert status == 405 and {m.strip() for m in headers["Allow"].split(",")} == allowed, headers


# -- schedule minimum interval ------------------------------------------------------------------------


def test_schedule_interval_below_the_minimum_is_refused(live_server):
    for interval in ("1ms", "50ms", "0.05s"):  # the minimum is 0.1 s unless set otherwise
        status, headers, data = live_server.post(f"{API}/runs/schedule", {"bundle_id": "echo", "flow_id": "echo",
                                                                         "interval": interval})
        _assert_json_4xx(status, headers, data, "interval_too_short")
        assert status == 422 and "ABSTRACTGATEWAY_SCHEDULE_MIN_INTERVAL_S" in data["detail"]
    assert live_server.get(f"{API}/runs?workflow_id=echo@1.0.0:echo")[2]["items"] == []  # no child was started
    status, _, data = live_server.post(f"{API}/runs/schedule", {"bundle_id": "echo", "flow_id": "echo",
                                                               "interval": "1h"})
    assert status == 200
    root = data["run_id"]
    live_server.post(f"{API}/commands", {"command_id": "too-fast", "run_id": root, "type": "update_schedule",
                                         "payload": {"interval": "1ms"}})
    outcome = wait_for(lambda: (d := live_server.get(f"{API}/commands/too-fast")[2])["status"] != "pending" and d)
    assert outcome["status"] == "failed" and "shorter than the minimum" in outcome["error"]
    assert live_server.get(f"{API}/runs/{root}")[2]["schedule"]["interval"] == "1h"


def test_schedule_minimum_is_a_setting(data_dir):
    assert gw.Config.load(environ={"ABSTRACTGATEWAY_DATA_DIR": str(data_dir)}).schedule_min_interval_s == 0.1
    server = LiveServer(data_dir, schedule_min_interval_s="0.05")
    try:
        status, _, data = server.post(f"{API}/runs/schedule", {"bundle_id": "echo", "flow_id": "echo",
                                                              "interval": "100ms", "repeat_count": 2})
        assert status == 200, data
        wait_for(lambda: server.get(f"{API}/runs/{data['run_id']}")[2]["status"] == "completed")
        status, _, data = server.post(f"{API}/runs/schedule", {"bundle_id": "echo", "flow_id": "echo",
                                                              "interval": "10ms"})
        assert status == 422 and data["code"] == "interval_too_short"
    finally:
        server.close()


# -- a sweep over every route -------------------------------------------------------------------------

HOSTILE_STRINGS = ('"\\ud800"', '"\\udfff\\ud800"', '"x\\u0000y"', '""', '"   "', '"' + "a" * 5000 + '"',
                   "1e999", "-1", "0", "9223372036854775808", "1.5", "true", "null", "[]", "{}", '"../../etc"')
HOSTILE_QUERY = ("%ED%A0%80", "%FF", "-1", "0", "99999999999999999999999", "nan", "inf", "true", "%00", "..%2F..")


def _route_path(route: gw.Route, segment: str) -> str:
    import re

    return re.sub(r"<(?:[a-z]+:)?[a-z_]+>", segment, route.path)


@pytest.mark.parametrize("route", [r for r in gw.ROUTES if r.body is not None], ids=lambda r: f"{r.method} {r.path}")
def test_every_body_field_refuses_hostile_values_without_a_5xx(live_server, route):
    run_id = _start(live_server, bundle_id="ask")
    path = _route_path(route, "echo" if "bundle" in route.path else run_id)
    probes = 0
    for name in route.body.get("properties", {}):
        for value in HOSTILE_STRINGS:
            base = {"bundle_id": "echo", "flow_id": "echo", "runs": [{"run_id": run_id}], "command_id": f"p{probes}",
                    "run_id": run_id, "type": "pause"}
            body = json.dumps({k: v for k, v in base.items() if k in route.body.get("properties", {}) and k != name})
            body = body[:-1] + (", " if body != "{}" else "") + f'"{name}": {value}}}'
            status, headers, data = _raw(live_server, route.method, path, body)
            probes += 1
            assert status < 500, (route.path, body[:200], status, data)
            assert headers["Content-Type"].startswith("application/json"), (route.path, body[:200])
    assert probes == len(route.body.get("properties", {})) * len(HOSTILE_STRINGS)


def test_every_route_refuses_hostile_path_segments_and_query_values_without_a_5xx(live_server):
    probes = 0
    for route in gw.ROUTES:
        for segment in ("%ED%A0%80", "%FF", "..", "%2e%2e%2f", "a" * 2000, "%00", "x:y@z", "scheduled:%F0%9F%98%80"):
            status, headers, _ = live_server.request(route.method, _route_path(route, segment))
            probes += 1
            assert status < 500 and (status == 200 or headers["Content-Type"].startswith("application/json")), \
                (route.method, route.path, segment, status)
        for param in route.query:
            for value in HOSTILE_QUERY:
                path = _route_path(route, "nope") + f"?{param.name}={value}"
                status, headers, data = live_server.request(route.method, path)
                probes += 1
                assert status < 500, (route.method, path, status, data)
    assert probes > 300


def test_a_failure_outside_the_handlers_is_still_a_json_500(live_server, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(gw.LockoutTracker, "remaining", broken)  # a middleware fails
    status, headers, data = live_server.get(f"{API}/runs")
    assert status == 500 and headers["Content-Type"].startswith("application/json")
    assert data["code"] == "internal_error" and "boom" not in json.dumps(data) and data["request_id"]
    monkeypatch.undo()

    run_id = _start(live_server, bundle_id="echo")
    artifact_id = live_server.gateway.stores.artifacts.store(b"bytes", content_type="text/plain",
                                                             run_id=run_id).artifact_id
    monkeypatch.setattr(gw.SqliteArtifactStore, "read_range", broken)  # a streamed body fails before its first byte
    status, headers, data = live_server.get(f"{API}/runs/{run_id}/artifacts/{artifact_id}/content")
    assert status == 500 and headers["Content-Type"].startswith("application/json") and data["code"] == "internal_error"
    assert live_server.get(f"{API}/runs/{run_id}")[0] == 200  # the server goes on


def test_hostile_workspace_paths_in_a_run_s_inputs_start_it_in_its_own_workspace(live_server):
    for path in ("/tmp/x\u0000y", "~no-such-user-here", "../" * 2000 + "etc", "a" * 5000):
        status, _, data = live_server.post(f"{API}/runs/start", {"bundle_id": "echo", "input_data": {
            "workspace_root": path, "workspace_allowed_paths": [path], "workspace_ignored_paths": path}})
        assert status == 200, data
        root = live_server.gateway.stores.runs.load(data["run_id"]).vars["workspace_root"]
        assert root.startswith(str(live_server.gateway.config.data_dir / "workspaces")), root
