"""Security middleware end to end: auth matrix, lockout, limits, audit, token bootstrap, hostile input."""

from __future__ import annotations

import functools
import io
import itertools
import json
import os
import re
import signal
import socket
import stat
import subprocess
import time
import zipfile

import pytest

import abstractgateway as gw
from conftest import LiveServer, make_config, multipart, wait_for
from processes import run_gateway, spawn_gateway

API = "/api/gateway"
ALLOWED, DENIED = "http://localhost:5173", "https://evil.example"

CONFIGS = {
    "default": {},
    "read_open": {"protect_read": "0"},
    "dev_read_loopback": {"dev_read_no_auth": "1"},
    "write_open": {"protect_write": "0"},
    "security_off": {"security": "0"},
}


def expected_status(config: str, token: str, kind: str, origin: str) -> int:
    """What the spec says each combination must answer."""
    env = CONFIGS[config]
    if env.get("security") == "0":
        return 200
    if origin == "denied":
        return 403
    if kind == "write":
        required = env.get("protect_write") != "0"
    else:  # read and SSE are reads; the test client is on loopback
        required = env.get("protect_read") != "0" and env.get("dev_read_no_auth") != "1"
    return 401 if required and token != "right" else 200


@pytest.mark.parametrize("config", list(CONFIGS))
def test_auth_origin_matrix(tmp_path, config):
    server = LiveServer(tmp_path / config, lockout_after="1000", **CONFIGS[config])
    try:
        run_id = server.gateway.start_run(bundle_id="echo")
        wait_for(lambda: server.gateway.stores.runs.load(run_id).status.value == "completed")
        counter = itertools.count()
        for token, kind, origin in itertools.product(("none", "wrong", "right"), ("read", "write", "sse"),
                                                     ("none", "allowed", "denied")):
            headers = {"Origin": ALLOWED} if origin == "allowed" else {"Origin": DENIED} if origin == "denied" else {}
            tok = {"none": None, "wrong": "wrong-token-xxxxxxxxxxxx", "right": server.TOKEN}[token]
            if kind == "read":
                status, hdrs, body = server.request("GET", f"{API}/runs/{run_id}", headers=headers, token=tok)
            elif kind == "sse":
                status, hdrs, body = server.request("GET", f"{API}/runs/{run_id}/ledger/stream", headers=headers,
                                                    token=tok)
            else:
                status, hdrs, body = server.request("POST", f"{API}/commands", headers=headers, token=tok, body={
                    "command_id": f"m{next(counter)}", "run_id": run_id, "type": "pause"})
            want = expected_status(config, token, kind, origin)
            assert status == want, (config, token, kind, origin, status, body)
            if origin != "none":  # CORS headers even on rejections
                assert hdrs.get("Access-Control-Allow-Origin") == headers["Origin"]
            if status == 401:
                assert hdrs["WWW-Authenticate"] == "Bearer" and body["code"] == "unauthorized"
            if status in (401, 403):
                assert set(body) == {"detail", "code"}
            if want != 200 or kind != "sse":
                assert hdrs.get("X-Request-Id")
    finally:
        server.close()


def test_health_and_docs_need_no_token_and_preflight_is_answered(live_server):
    assert live_server.get("/api/health", token=None)[0] == 200
    assert live_server.get("/openapi.json", token=None)[0] == 200
    status, headers, body = live_server.request("OPTIONS", f"{API}/runs", token=None, headers={
        "Origin": ALLOWED, "Access-Control-Request-Method": "POST"})
    assert (status, body) == (200, b"OK") and headers["Access-Control-Allow-Origin"] == ALLOWED  # as Starlette
    assert "Access-Control-Request-Headers" in headers["Vary"]  # the answer echoes them: caches key on them
    status, headers, _ = live_server.get(f"{API}/runs")
    assert headers["X-Content-Type-Options"] == "nosniff" and headers["Cache-Control"] == "no-store"


def test_no_token_configured_answers_503(tmp_path):
    server = LiveServer(tmp_path / "d", auth_token="")
    try:
        status, _, body = server.get(f"{API}/runs", token=None)
        assert status == 503 and body["code"] == "no_token_configured"
    finally:
        server.close()


def test_spoofed_forwarded_for_does_not_unlock_dev_reads(tmp_path):
    server = LiveServer(tmp_path / "d", dev_read_no_auth="1")
    try:
        # the socket peer is loopback, so reads are open; now pretend to be loopback from outside:
        # with trust-proxy off, X-Forwarded-For is ignored and cannot change who the client is
        assert server.get(f"{API}/runs", token=None, headers={"X-Forwarded-For": "10.1.2.3"})[0] == 200
    finally:
        server.close()
    server = LiveServer(tmp_path / "e", dev_read_no_auth="1", trust_proxy="1")
    try:  # behind a trusted proxy the address the proxy appended (rightmost) counts
        assert server.get(f"{API}/runs", token=None, headers={"X-Forwarded-For": "10.1.2.3"})[0] == 401
        assert server.get(f"{API}/runs", token=None, headers={"X-Forwarded-For": "127.0.0.1"})[0] == 200
        # a client cannot prepend a loopback address of its own choosing
        assert server.get(f"{API}/runs", token=None, headers={"X-Forwarded-For": "127.0.0.1, 10.1.2.3"})[0] == 401
        # nor make the header unparseable (an unbalanced quote) so that the proxy's own address counts
        assert server.get(f"{API}/runs", token=None, headers={"X-Forwarded-For": '"x, 10.1.2.3'})[0] == 401
    finally:
        server.close()


# -- lockout ----------------------------------------------------------------------------------------


def test_lockout_backoff_and_decay_with_a_fake_clock():
    now = [1000.0]
    tracker = gw.LockoutTracker(after=5, base_s=1.0, max_s=60.0, decay_s=600.0, clock=lambda: now[0])
    assert [tracker.failure("ip") for _ in range(4)] == [0.0, 0.0, 0.0, 0.0]
    assert tracker.failure("ip") == 1.0 and tracker.remaining("ip") == 1.0
    assert tracker.failure("ip") == 2.0
    assert tracker.failure("ip") == 4.0
    assert max(tracker.failure("ip") for _ in range(10)) == 60.0  # capped
    tracker.success("ip")
    assert tracker.remaining("ip") == 0.0
    # one mistake a week ago is forgotten: four fresh failures do not lock
    tracker.failure("old")
    now[0] += 7 * 24 * 3600
    assert [tracker.failure("old") for _ in range(4)] == [0.0] * 4
    # decay is gradual: 4 quick failures, then one half-life later the count is ~2, so 3 more to lock
    for _ in range(4):
        tracker.failure("mid")
    now[0] += 600
    assert tracker.failure("mid") == 0.0 and tracker.failure("mid") == 0.0 and tracker.failure("mid") == 1.0


def test_lockout_table_is_bounded():
    tracker = gw.LockoutTracker(after=5, base_s=1.0, max_s=60.0, decay_s=600.0, max_entries=100)
    for i in range(1000):
        tracker.failure(f"10.0.{i // 256}.{i % 256}")
    assert len(tracker._entries) == 100


def test_lockout_over_http_with_retry_after(tmp_path, monkeypatch):
    now = [1000.0]  # the server's lockout clock: the test moves it instead of waiting the lock out
    monkeypatch.setattr(gw, "LockoutTracker", functools.partial(gw.LockoutTracker, clock=lambda: now[0]))
    server = LiveServer(tmp_path / "d", lockout_base_s="2")
    try:
        codes = [server.get(f"{API}/runs", token="nope-nope-nope-nope")[0] for _ in range(4)]
        assert codes == [401] * 4
        status, headers, body = server.get(f"{API}/runs", token="nope-nope-nope-nope")
        assert status == 429 and headers["Retry-After"] == "2" and body["code"] == "auth_lockout"
        status, headers, _ = server.get(f"{API}/runs")  # even the right token waits out the lock
        assert status == 429 and headers["Retry-After"] == "2"
        now[0] += 1.0
        status, headers, _ = server.get(f"{API}/runs")
        assert status == 429 and headers["Retry-After"] == "1"
        now[0] += 1.0
        assert server.get(f"{API}/runs")[0] == 200  # success clears the counter
        assert server.get(f"{API}/runs", token="nope-nope-nope-nope")[0] == 401
    finally:
        server.close()


# -- body and concurrency limits -------------------------------------------------------------------


def _raw(server, data: bytes, read_timeout=5.0) -> bytes:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=read_timeout)
    try:
        sock.sendall(data)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            chunks.append(chunk)
            if b"\r\n\r\n" in b"".join(chunks) and b'"detail"' in chunks[-1] or b'"accepted"' in chunks[-1]:
                break
        return b"".join(chunks)
    finally:
        sock.close()


def test_body_caps_honest_lying_and_chunked(tmp_path):
    server = LiveServer(tmp_path / "d", max_body_bytes="1000")
    try:
        big = {"command_id": "big", "run_id": "r", "type": "pause", "payload": {"x": "y" * 3000}}
        status, _, body = server.post(f"{API}/commands", big)
        assert status == 413 and body["code"] == "too_large"
        auth = f"Authorization: Bearer {server.TOKEN}\r\n"
        payload = json.dumps(big).encode()
        # chunked: no Content-Length, the cap is enforced while reading
        chunked = b"".join(b"%x\r\n%s\r\n" % (len(payload[i:i + 500]), payload[i:i + 500])
                           for i in range(0, len(payload), 500)) + b"0\r\n\r\n"
        reply = _raw(server, (f"POST {API}/commands HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\n"
                              "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n").encode() + chunked)
        assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
        # lying: a small Content-Length only ever lets that many bytes in
        reply = _raw(server, (f"POST {API}/commands HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\n"
                              "Content-Length: 20\r\nConnection: close\r\n\r\n").encode() + payload)
        assert reply.startswith(b"HTTP/1.1 422"), reply[:200]  # 20 bytes of JSON: invalid, not 3 KB accepted
        assert server.gateway.stores.commands.get("big") is None
        # an honest small body passes
        assert server.post(f"{API}/commands", {"command_id": "ok", "run_id": "r", "type": "pause"})[0] == 200
    finally:
        server.close()


def test_sse_and_request_concurrency_caps(tmp_path):
    server = LiveServer(tmp_path / "d", max_sse="2", max_concurrency="1")
    socks = []
    try:
        run_id = server.gateway.start_run(bundle_id="ask")
        wait_for(lambda: server.gateway.stores.runs.load(run_id).status.value == "waiting")
        req = (f"GET {API}/runs/{run_id}/ledger/stream HTTP/1.1\r\nHost: x\r\n"
               f"Authorization: Bearer {server.TOKEN}\r\n\r\n").encode()
        for _ in range(2):
            s = socket.create_connection(("127.0.0.1", server.port))
            s.sendall(req)
            assert s.recv(20).startswith(b"HTTP/1.1 200")
            socks.append(s)
        status, headers, body = server.get(f"{API}/runs/{run_id}/ledger/stream")
        assert status == 429 and headers["Retry-After"] == "1" and body["code"] == "concurrency_limit"
        # hold the single request slot with a body that never arrives (not a command: a command's small
        # body is awaited before it takes a slot, as its route shares commits)
        slow = socket.create_connection(("127.0.0.1", server.port))
        slow.sendall((f"POST {API}/runs/start HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {server.TOKEN}\r\n"
                      "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{").encode())
        socks.append(slow)
        status, headers, body = wait_for(lambda: (reply := server.get(f"{API}/runs"))[0] == 429 and reply)
        assert headers["Retry-After"] == "1" and body["code"] == "concurrency_limit"
        for s in socks:
            s.close()
        socks.clear()
        wait_for(lambda: server.get(f"{API}/runs")[0] == 200, timeout=5)  # slots come back

        def stream_slot_free():
            s = socket.create_connection(("127.0.0.1", server.port), timeout=2)
            try:
                s.sendall(req)
                return s.recv(20).startswith(b"HTTP/1.1 200")
            finally:
                s.close()

        wait_for(stream_slot_free, timeout=5)
    finally:
        for s in socks:
            s.close()
        server.close()


def test_slow_idle_clients_do_not_block_a_normal_request(live_server):
    idle = []
    try:
        for _ in range(50):
            s = socket.create_connection(("127.0.0.1", live_server.port))
            s.sendall(b"GET /api/health HTTP/1.1\r\nHost: x\r\n")  # never finishes its headers
            idle.append(s)
        started = time.perf_counter()
        status, _, body = live_server.get("/api/health")
        assert status == 200 and time.perf_counter() - started < 1.0
    finally:
        for s in idle:
            s.close()


def test_connection_cap_answers_503_and_timeout_drops_slow_clients(tmp_path):
    server = LiveServer(tmp_path / "d", max_threads="3", request_timeout_s="0.5")
    held = []
    try:
        for _ in range(3):
            s = socket.create_connection(("127.0.0.1", server.port))
            s.sendall(b"GET /api/health HTTP/1.1\r\nHost: x\r\n")
            held.append(s)
        # once the server has taken in the three heads, a fourth request is refused
        probe = b"GET /api/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        wait_for(lambda: _raw(server, probe, read_timeout=2).startswith(b"HTTP/1.1 503"))
        # the read timeout (0.5 s) frees the slow clients' places
        wait_for(lambda: server.get("/api/health")[0] == 200, timeout=5)
    finally:
        for s in held:
            s.close()
        server.close()


# -- every route's declared policy is the one enforced ----------------------------------------------


def _path(route: gw.Route) -> str:
    """The route's path with every variable set to an id nothing has (the checks come before the 404)."""
    return re.sub(r"<(?:[a-z]+:)?[a-z_]+>", "nope", route.path)


def _reply(server, route: gw.Route, head: str = "", body: bytes = b"", token: bool = True):
    """(status, JSON body or None) of `route` for a request with extra head lines and a raw body."""
    auth = f"Authorization: Bearer {server.TOKEN}\r\n" if token else ""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall((f"{route.method} {_path(route)} HTTP/1.1\r\nHost: x\r\n{auth}{head}"
                      "Connection: close\r\n\r\n").encode() + body)
        reply = b"".join(iter(functools.partial(sock.recv, 1 << 16), b""))  # until the server closes
    head_bytes, _, payload = reply.partition(b"\r\n\r\n")
    is_json = b"application/json" in head_bytes.lower()
    return int(reply.split(b" ", 2)[1]), json.loads(payload) if is_json and payload else None


def _status(server, route: gw.Route, head: str = "", body: bytes = b"", token: bool = True) -> int:
    return _reply(server, route, head, body, token)[0]


def _chunked(size: int) -> bytes:
    """A chunked JSON body of exactly `size` bytes that is not an object (every JSON route answers 422)."""
    data = b"[" + b" " * (size - 2) + b"]"
    step = 1 << 16
    return b"".join(b"%x\r\n%s\r\n" % (len(data[i:i + step]), data[i:i + step])
                    for i in range(0, len(data), step)) + b"0\r\n\r\n"


def test_route_declarations_keep_what_the_settings_promise():
    """Each upload is capped by its own setting, every event stream counts as a stream, and only the
    routes outside the API (pages, health, OpenAPI) are public."""
    assert {r.handler: r.max_body for r in gw.ROUTES if r.multipart is not None} == {
        "upload_bundle": "max_bundle_bytes", "attachments_upload": "max_attachment_bytes"}
    assert [r.handler for r in gw.ROUTES if r.stream] == [
        r.handler for r in gw.ROUTES if r.content_type == "text/event-stream"]
    assert [r.handler for r in gw.ROUTES if r.auth == "none"] == [r.handler for r in gw.ROUTES if not r.api]


def test_every_route_enforces_its_declared_auth_kind(tmp_path):
    """Without a token: `none` routes answer, `write` ones are 401, `read` ones 401 unless reads are open;
    an unknown path under the API is held to the same by its method."""
    fallback = [gw.Route("GET", f"{API}/nope", "", "", ""), gw.Route("POST", f"{API}/nope", "", "", "")]
    for protect_read in ("1", "0"):
        server = LiveServer(tmp_path / protect_read, runner=False, protect_read=protect_read, lockout_after="100000")
        try:
            for route in (*gw.ROUTES, *fallback):
                head = "Content-Length: 2\r\nContent-Type: application/json\r\n" if route.method != "GET" else ""
                status = _status(server, route, head, b"[]" if head else b"", token=False)
                required = route.auth == "write" or route.auth == "read" and protect_read == "1"
                assert (status == 401) is required, (protect_read, route.method, route.path, route.auth, status)
        finally:
            server.close()


def test_every_route_enforces_its_declared_body_cap(tmp_path):
    """A Content-Length over the cap its route names is refused up front, naming that cap; a JSON body of
    exactly the cap passes, also chunked (counted while reading), and one byte more is refused. Public
    routes are not capped."""
    caps = {"max_body_bytes": 1000, "max_bundle_bytes": 3000, "max_attachment_bytes": 5000}
    server = LiveServer(tmp_path / "d", runner=False, **{name: str(cap) for name, cap in caps.items()})
    json_head = "Content-Type: application/json\r\n"
    try:
        for route in gw.ROUTES:
            if not route.api:
                assert _status(server, route, "Content-Length: 99999999\r\n") != 413, route.path
                continue
            cap = caps[route.max_body] + (gw.MULTIPART_OVERHEAD if route.multipart is not None else 0)
            status, body = _reply(server, route, f"Content-Length: {cap + 1}\r\n")
            assert status == 413 and body == {"detail": f"Payload Too Large ({cap + 1} bytes > {cap} bytes)",
                                              "code": "too_large"}, (route.path, status, body)
            if route.multipart is not None:  # the upload routes' own file caps: tests/test_client_routes.py
                continue
            at_cap = b"[" + b" " * (cap - 2) + b"]"
            assert _status(server, route, f"{json_head}Content-Length: {cap}\r\n", at_cap) != 413, route.path
            if route.body is not None:  # the routes that read a JSON body
                chunked = f"{json_head}Transfer-Encoding: chunked\r\n"
                assert _reply(server, route, chunked, _chunked(cap + 1)) == (413, {
                    "detail": f"Payload Too Large (more than {cap} bytes)", "code": "too_large"}), route.path
                assert _status(server, route, chunked, _chunked(cap)) == 422, route.path
    finally:
        server.close()


def test_every_route_counts_against_its_declared_pool(tmp_path):
    """With the one SSE slot taken only stream routes are refused; with every request slot taken only
    the other API routes are. Public routes are never counted."""
    server = LiveServer(tmp_path / "d", max_sse="1", max_concurrency="3")
    held = []
    try:
        run_id = server.gateway.start_run(bundle_id="ask")
        wait_for(lambda: server.gateway.stores.runs.load(run_id).status.value == "waiting")
        stream = socket.create_connection(("127.0.0.1", server.port))
        stream.sendall(f"GET {API}/runs/{run_id}/ledger/stream HTTP/1.1\r\nHost: x\r\n"
                       f"Authorization: Bearer {server.TOKEN}\r\n\r\n".encode())
        assert stream.recv(20).startswith(b"HTTP/1.1 200")
        held.append(stream)
        body = "Content-Length: 2\r\nContent-Type: application/json\r\n"
        for route in gw.ROUTES:
            write = route.method != "GET"
            status = _status(server, route, body if write else "", b"[]" if write else b"")
            assert (status == 429) is (route.stream and route.api), (route.method, route.path, status)
        stream.close()
        held.clear()
        stream_route = next(r for r in gw.ROUTES if r.stream)
        wait_for(lambda: _status(server, stream_route) == 404)  # the stream slot is free again
        for _ in range(3):  # hold every request slot with a body that never arrives (see above: not a command)
            slow = socket.create_connection(("127.0.0.1", server.port))
            slow.sendall((f"POST {API}/runs/start HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {server.TOKEN}\r\n"
                          f"{body.replace('2', '100')}\r\n[").encode())
            held.append(slow)
        wait_for(lambda: server.get(f"{API}/runs")[0] == 429)
        for route in gw.ROUTES:
            status = _status(server, route)
            assert (status == 429) is (route.api and not route.stream), (route.method, route.path, status)
    finally:
        for s in held:
            s.close()
        server.close()


# -- audit --------------------------------------------------------------------------------------------


def test_audit_rows_for_writes_only_never_the_token(live_server):
    live_server.get(f"{API}/runs")
    live_server.post(f"{API}/commands", {"command_id": "a1", "run_id": "r", "type": "pause"},
                     headers={"X-Client-Id": "tui-1"})
    live_server.post(f"{API}/commands", {"command_id": "a2", "run_id": "r", "type": "pause"},
                     token="bad-bad-bad-bad-bad")
    rows = wait_for(lambda: len(r := live_server.gateway.stores.audit.tail(10)) >= 2 and r)
    assert [(r["method"], r["path"], r["status"]) for r in rows] == [("POST", f"{API}/commands", 401),
                                                                     ("POST", f"{API}/commands", 200)]
    assert rows[1]["token_fp"] == gw.token_fingerprint(live_server.TOKEN)
    assert rows[1]["headers"] == {"x-client-id": "tui-1"}
    assert rows[1]["client_ip"] == "127.0.0.1" and rows[1]["request_id"]
    dump = json.dumps(rows) + json.dumps(live_server.gateway.stores.db.query("SELECT * FROM audit_log"))
    assert live_server.TOKEN not in dump and "bad-bad-bad-bad-bad" not in dump
    status, _, body = live_server.get(f"{API}/audit/tail?limit=5")
    assert status == 200 and body["items"][0]["status"] == 401


def test_audit_log_is_size_bounded(stores):
    audit = gw.AuditStore(stores.db, max_bytes=20_000, prune_every=10)
    for i in range(500):
        audit.append((gw.utc_now_iso(), f"r{i}", "127.0.0.1", "POST", "/api/gateway/commands", 200, 1.0, None, "{}",
                      "", True, None, None, None, None))
    count = stores.db.query_one("SELECT COUNT(*) FROM audit_log")[0]
    assert count < 250 and audit.tail(1)[0]["request_id"] == "r499"


# -- token bootstrap and startup checks -------------------------------------------------------------


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean_env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ABSTRACTGATEWAY_")}
    env.update(ABSTRACTGATEWAY_DATA_DIR=str(tmp_path / "data"), **extra)
    return env


def _serve_once(env, *args):
    port = _free_port()
    proc = spawn_gateway(["serve", "--port", str(port), *args], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    import urllib.request

    def healthy():
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=1).status == 200
        except OSError:
            return False

    wait_for(healthy, timeout=20)
    return proc, port


def _stop(proc):
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    return out


def test_of_two_first_starts_only_the_one_that_stored_its_token_announces_it(tmp_path, monkeypatch):
    """Both read "no token yet", then each generates one: the second must not print a token that is not
    the stored one (its clients would be refused)."""
    config = make_config(tmp_path)
    stores = gw.open_stores(config)
    try:
        first, announced = gw.ensure_token(config, stores.settings)
        assert announced and stores.settings.get(gw.TOKEN_SETTING) == first
        monkeypatch.setattr(stores.settings, "get", lambda key: None)  # it read before the first one stored
        assert gw.ensure_token(config, stores.settings) == (None, False)
        monkeypatch.undo()
        assert stores.settings.get(gw.TOKEN_SETTING) == first
    finally:
        stores.close()


def test_first_serve_generates_a_token_once(tmp_path):
    import urllib.request

    env = _clean_env(tmp_path)
    proc, port = _serve_once(env)
    out = _stop(proc)
    line = next(ln for ln in out.splitlines() if "curl -H 'Authorization: Bearer " in ln)
    token = line.split("Bearer ", 1)[1].split("'", 1)[0]
    assert len(token) >= 40
    shown = run_gateway(["token", "show"], env=env, capture_output=True, text=True)
    assert shown.stdout.strip() == token
    proc, port = _serve_once(env)  # second start: no new token, the stored one works
    try:
        req = urllib.request.Request(f"http://127.0.0.1:{port}/api/gateway/ping",
                                     headers={"Authorization": f"Bearer {token}"})
        assert urllib.request.urlopen(req, timeout=5).status == 200
    finally:
        out = _stop(proc)
    assert token not in out and "from database" in out
    rotated = run_gateway(["token", "rotate"], env=env, capture_output=True, text=True)
    assert rotated.returncode == 0 and rotated.stdout.strip() != token
    env_token = _clean_env(tmp_path, ABSTRACTGATEWAY_AUTH_TOKEN="an-explicit-environment-token")
    shown = run_gateway(["token", "show"], env=env_token, capture_output=True, text=True)
    assert "environment" in shown.stdout and gw.token_fingerprint("an-explicit-environment-token") in shown.stdout


def test_public_bind_with_a_weak_token_is_refused(tmp_path):
    env = _clean_env(tmp_path, ABSTRACTGATEWAY_AUTH_TOKEN="changeme")
    out = run_gateway(["serve", "--host", "0.0.0.0", "--port", "0"],
                      env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "weak auth token" in out.stderr and "token_urlsafe" in out.stderr


def test_a_token_no_client_can_send_is_refused_at_start(tmp_path):
    """A token with `=` before its end never comes out of the Authorization header parser, so every
    request would get 401: `serve` says so instead of starting. Other punctuation is fine."""
    for token in ("a-long-enough-token=with-an-equals-sign", "a=long-enough-token-starting-with-a-key"):
        env = _clean_env(tmp_path, ABSTRACTGATEWAY_AUTH_TOKEN=token)
        out = run_gateway(["serve", "--port", "0"], env=env, capture_output=True, text=True, timeout=30)
        assert out.returncode == 2 and "cannot be sent in an `Authorization: Bearer` header" in out.stderr, \
            out.stderr
    for token in ("ends-with-padding==", "S3cure!Token#With@Symbols"):
        config = gw.Config.load({"ABSTRACTGATEWAY_AUTH_TOKEN": token})
        assert gw.startup_problem(config, gw.SecurityPolicy.from_config(config)) is None


# -- hostile bundles ----------------------------------------------------------------------------------


def _zip(entries, symlink=None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, "/etc/passwd")
    return buf.getvalue()


def _manifest(**over):
    m = {"bundle_format_version": "1", "bundle_id": "evil", "bundle_version": "1.0.0", "created_at": "",
         "entrypoints": [{"flow_id": "main"}], "default_entrypoint": "main", "flows": {"main": "flows/main.json"}}
    m.update(over)
    return json.dumps(m)


FLOW = json.dumps({"id": "main", "nodes": [], "edges": []})
HOSTILE = {
    "zip_slip_entry": _zip({"manifest.json": _manifest(), "flows/main.json": FLOW, "../../escape.txt": "x"}),
    "absolute_entry": _zip({"manifest.json": _manifest(), "flows/main.json": FLOW, "/etc/cron.d/x": "x"}),
    "zip_slip_manifest_path": _zip({"manifest.json": _manifest(flows={"main": "../outside.json"}),
                                    "flows/main.json": FLOW}),
    "symlink": _zip({"manifest.json": _manifest(), "flows/main.json": FLOW}, symlink="flows/link.json"),
    "zip_bomb": _zip({"manifest.json": _manifest(), "flows/main.json": FLOW, "bomb.bin": b"\0" * (60 * 1024 * 1024)}),
    "bad_manifest": _zip({"manifest.json": _manifest(entrypoints=[]), "flows/main.json": FLOW}),
    "manifest_not_object": _zip({"manifest.json": "[1, 2]", "flows/main.json": FLOW}),
    "no_manifest": _zip({"flows/main.json": FLOW}),
    "unsafe_id": _zip({"manifest.json": _manifest(bundle_id="../../x"), "flows/main.json": FLOW}),
    "unsafe_version": _zip({"manifest.json": _manifest(bundle_version="1.0/../../x"), "flows/main.json": FLOW}),
    "flow_not_json": _zip({"manifest.json": _manifest(), "flows/main.json": "{nope"}),
    "not_a_zip": b"PK\x03\x04 definitely not a zip",
}


def test_hostile_bundles_are_rejected_and_nothing_is_stored(live_server):
    for name, content in HOSTILE.items():
        body, ctype = multipart({}, {"file": ("x.flow", content)})
        status, _, data = live_server.request("POST", f"{API}/bundles/upload", raw=body,
                                              headers={"Content-Type": ctype})
        assert 400 <= status < 500, (name, status, data)
        assert set(data) == {"detail", "code"} and data["code"].startswith("bundle_"), (name, data)
    assert live_server.gateway.stores.db.query_one("SELECT COUNT(*) FROM bundles")[0] == 0
    assert "evil" not in live_server.gateway.host.catalog.bundles


def test_bundle_upload_cap(tmp_path, bundle_builder):
    server = LiveServer(tmp_path / "d", max_bundle_bytes="1000")
    try:
        content = bundle_builder("echo").read_bytes() + b"\0" * 2000
        body, ctype = multipart({}, {"file": ("x.flow", content)})
        status, _, data = server.request("POST", f"{API}/bundles/upload", raw=body, headers={"Content-Type": ctype})
        assert status == 413 and data["code"] == "too_large"
    finally:
        server.close()
