"""The HTTP server itself (HttpServer): keep-alive, request bodies, idle connections, SSE fan-out.

Every test talks raw HTTP/1.1 over loopback sockets to a real server on a real SQLite file.
"""

from __future__ import annotations

import contextlib
import functools
import json
import resource
import selectors
import socket
import threading
import time

import apsw
import pytest

import abstractgateway as gw
from conftest import LiveServer, wait_for

API = gw.API


class RawClient:
    """One TCP connection that sends raw bytes and parses HTTP/1.1 responses off it, in order."""

    def __init__(self, server: LiveServer, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", server.port), timeout=timeout)
        self.file = self.sock.makefile("rb")
        self.token = server.TOKEN

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request_bytes(self, method: str, path: str, body: bytes | None = None, chunked: bool = False,
                      headers: str = "") -> bytes:
        head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {self.token}\r\n{headers}"
        if body is None:
            return (head + "\r\n").encode()
        if chunked:
            pieces = [body[i:i + 7] for i in range(0, len(body), 7)]
            return ((head + "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
                    + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n")
        return (head + f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body

    def response(self) -> tuple[int, dict, bytes]:
        """(status, lower-cased headers, body) of the next response on the connection."""
        status_line = self.file.readline()
        assert status_line.startswith(b"HTTP/1.1 "), status_line
        headers = {}
        while True:
            line = self.file.readline().rstrip(b"\r\n")
            if not line:
                break
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            body = self.file.read(int(headers["content-length"]))
        elif headers.get("transfer-encoding") == "chunked":
            parts = []
            while True:
                size = int(self.file.readline().strip(), 16)
                data = self.file.read(size + 2)[:size]
                if not size:
                    break
                parts.append(data)
            body = b"".join(parts)
        else:
            body = self.file.read()
        return int(status_line.split()[1]), headers, body

    def closed_by_server(self) -> bool:
        """True once the server has closed its side (EOF; nothing more to read)."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@pytest.fixture
def client(live_server):
    clients = []

    def connect(**kw) -> RawClient:
        clients.append(RawClient(live_server, **kw))
        return clients[-1]

    yield connect
    for c in clients:
        c.close()


def _command(command_id: str) -> bytes:
    return json.dumps({"command_id": command_id, "run_id": "r", "type": "pause"}).encode()


# -- keep-alive ------------------------------------------------------------------------------------------


def test_pipelined_requests_on_one_connection_are_answered_in_order(live_server, client):
    run_id = live_server.gateway.start_run(bundle_id="echo")
    c = client()
    c.send(c.request_bytes("GET", "/api/health") + c.request_bytes("GET", f"{API}/runs/{run_id}")
           + c.request_bytes("POST", f"{API}/commands", _command("p1")) + c.request_bytes("GET", f"{API}/runs/nope"))
    status, headers, body = c.response()
    assert status == 200 and json.loads(body)["status"] in ("healthy", "ok") or "status" in json.loads(body)
    assert "close" not in headers.get("connection", "")
    status, _, body = c.response()
    assert status == 200 and json.loads(body)["run_id"] == run_id
    status, _, body = c.response()
    assert status == 200 and json.loads(body)["accepted"] is True
    status, _, body = c.response()
    assert status == 404 and json.loads(body)["code"] == "run_not_found"
    c.send(c.request_bytes("GET", f"{API}/runs/{run_id}"))  # still open after all four
    assert c.response()[0] == 200


def test_bodies_the_app_leaves_unread_are_drained_before_the_next_request(live_server, client):
    c = client()
    unread = b"x" * 5000
    # rejected before the body is read (bad token), then a body on a GET route that never reads it
    c.send(f"POST {API}/commands HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong-token-wrong-token\r\n"
           f"Content-Type: application/json\r\nContent-Length: {len(unread)}\r\n\r\n".encode() + unread)
    status, _, body = c.response()
    assert status == 401 and json.loads(body)["code"] == "unauthorized"
    c.send(c.request_bytes("GET", "/api/health", body=unread, chunked=True))
    assert c.response()[0] == 200
    # the next requests on the same connection are parsed from their own request line
    c.send(c.request_bytes("POST", f"{API}/commands", _command("after-unread")))
    status, _, body = c.response()
    assert status == 200 and json.loads(body)["accepted"] is True
    assert live_server.gateway.stores.commands.get("after-unread") is not None


def test_chunked_bodies_on_a_reused_connection(live_server, client):
    c = client()
    for i in range(3):
        c.send(c.request_bytes("POST", f"{API}/commands", _command(f"chunked-{i}"), chunked=True))
        status, _, body = c.response()
        assert status == 200 and json.loads(body)["accepted"] is True, body
    assert [live_server.gateway.stores.commands.get(f"chunked-{i}") is not None for i in range(3)] == [True] * 3


def test_http10_closes_unless_keep_alive_is_asked_for(live_server, client):
    c = client()
    c.send(b"GET /api/health HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    status, headers, _ = c.response()
    assert status == 200 and headers["connection"].lower() == "keep-alive"
    c.send(b"GET /api/health HTTP/1.0\r\n\r\n")
    status, headers, _ = c.response()
    assert status == 200 and headers["connection"] == "close" and c.closed_by_server()


def test_an_http10_stream_is_close_delimited_without_chunk_framing(live_server, client):
    """HTTP/1.0 has no chunked encoding (nginx speaks it to its upstreams by default): the stream's
    frames go out as they are and the end of the connection ends the body."""
    run_id = live_server.gateway.start_run(bundle_id="ask")
    wait_for(lambda: live_server.gateway.stores.runs.status_of(run_id) == "waiting")
    c = client()
    c.send(f"GET {API}/runs/{run_id}/ledger/stream?heartbeat_s=0.2 HTTP/1.0\r\n"
           f"Authorization: Bearer {live_server.TOKEN}\r\n\r\n".encode())
    head = c.file.readline()
    assert head.startswith(b"HTTP/1.1 200"), head
    headers = {}
    while (line := c.file.readline().rstrip(b"\r\n")):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    assert "transfer-encoding" not in headers and headers["connection"] == "close"
    assert headers["content-type"].startswith("text/event-stream")
    wait_for(lambda: b"keep-alive" in c.sock.recv(65536, socket.MSG_PEEK), timeout=5)  # a heartbeat came
    state = live_server.gateway.stores.runs.load(run_id)
    live_server.gateway.submit_command(command_id="http10-answer", run_id=run_id, type="resume",
                                       payload={"wait_key": state.waiting.wait_key, "payload": {"response": "hi"}})
    body = c.file.read()  # to the close: the stream ends with the run
    events = [block for block in body.decode().split("\n\n") if block]
    assert all(line.startswith(("id:", "event:", "data:", ":", "retry:"))
               for e in events for line in e.split("\n")), body
    assert events[-1].startswith("event: done") and any(e.startswith("id:") for e in events)


@pytest.mark.parametrize("path", [f"{API}/commands", f"{API}/runs/ledger/batch"])
def test_a_body_cut_short_by_the_client_closing_its_side_is_answered_400(live_server, client, path):
    """Whether the body is awaited on the selector thread (a command waiting for its shared commit)
    or by a worker, a client that stops sending mid-body is told why before the connection closes."""
    c = client()
    c.send(f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {live_server.TOKEN}\r\n"
           "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{".encode())
    c.sock.shutdown(socket.SHUT_WR)
    status, _, body = c.response()
    assert status == 400 and json.loads(body) == {"detail": "Request body ended early", "code": "bad_request_body"}


def test_an_absolute_form_target_names_the_host(live_server, client):
    """`GET http://host/path`: the authority is the Host, whatever the (one, still required) Host header says."""
    c = client()
    c.send(f"GET http://gateway.example/api/gateway/runs HTTP/1.1\r\nHost: other\r\n"
           f"Authorization: Bearer {live_server.TOKEN}\r\n\r\n".encode())
    status, _, body = c.response()
    assert status == 200 and "items" in json.loads(body)
    for head in (b"GET http://gateway.example/api/health HTTP/1.1\r\n\r\n",
                 b"GET http://gateway.example/api/health HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"):
        c = client()
        c.send(head)
        assert c.response()[0] == 400


def test_expect_continue_head_requests_and_refused_heads(live_server, client):
    c = client()
    body = _command("expect-1")
    c.send(f"POST {API}/commands HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {live_server.TOKEN}\r\n"
           f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n".encode())
    assert c.file.readline() == b"HTTP/1.1 100 Continue\r\n" and c.file.readline() == b"\r\n"
    c.send(body)
    status, _, data = c.response()
    assert status == 200 and json.loads(data)["accepted"] is True
    run_id = live_server.gateway.start_run(bundle_id="ask")
    c.send(c.request_bytes("HEAD", f"{API}/runs/{run_id}/ledger/stream"))  # HEAD never turns into a stream
    status_line = c.file.readline()
    headers = {}
    while (line := c.file.readline()) != b"\r\n":
        name, _, value = line.decode().partition(":")
        headers[name.lower()] = value.strip()
    assert status_line.startswith(b"HTTP/1.1 200") and "transfer-encoding" not in headers
    c.send(c.request_bytes("GET", "/api/health"))  # the connection is still in step
    assert c.response()[0] == 200
    for raw, status, code in ((b"GET / HTTP/2.0\r\n\r\n", 505, "http_version"),
                              (b"GET /\r\n\r\n", 400, "bad_request"),
                              (b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n", 431, "headers_too_large"),
                              (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501,
                               "unsupported_transfer_encoding"),
                              # only SP and HTAB are whitespace: a front proxy must not read a body differently
                              (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: \x0bchunked\r\n\r\n", 400,
                               "bad_request"),
                              (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, \xa0\r\n\r\n", 501,
                               "unsupported_transfer_encoding"),
                              # no control character in a value: `close\x00` is not `close` to this server,
                              # and a C proxy reads only `close`; an Origin with one would be echoed back
                              (b"GET /api/health HTTP/1.1\r\nHost: x\r\nConnection: close\x00\r\n\r\n", 400,
                               "bad_request"),
                              (b"GET /api/health HTTP/1.1\r\nHost: x\r\nOrigin: http://a\x01b\r\n\r\n", 400,
                               "bad_request"),
                              (b"GET /api/health HTTP/1.1\r\r\nHost: x\r\n\r\n", 400, "bad_request"),
                              (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: \xa05\r\n\r\n", 400, "bad_request"),
                              (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: \xb2\r\n\r\n", 400, "bad_request"),
                              # an HTTP/1.1 request has exactly one Host (RFC 9112 3.2)
                              (b"GET /api/health HTTP/1.1\r\n\r\n", 400, "bad_request"),
                              (b"GET /api/health HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, "bad_request"),
                              (b"GET /api/health HTTP/1.1\r\nHost: a b/c\r\n\r\n", 400, "bad_request"),
                              # a bare CR a proxy might take for a line break, smuggling a Content-Length
                              (b"GET /api/health HTTP/1.1\r\nHost: x\r\nX: a\rContent-Length: 5\r\n\r\n", 400,
                               "bad_request")):
        c = client()
        c.send(raw)
        got, _, data = c.response()
        assert (got, json.loads(data)["code"]) == (status, code)
        assert c.closed_by_server()


# -- bad framing and slow bodies ------------------------------------------------------------------


def test_bad_chunk_size_line_is_a_400_in_the_error_shape(live_server, client):
    c = client()
    c.send(f"POST {API}/commands HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {live_server.TOKEN}\r\n"
           "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nzz-not-hex\r\n{}\r\n0\r\n\r\n".encode())
    status, headers, body = c.response()
    assert status == 400 and json.loads(body)["code"] == "bad_request_body" and "detail" in json.loads(body)
    assert headers["connection"] == "close" and c.closed_by_server()
    c = client()  # chunk data not followed by CRLF
    c.send(f"POST {API}/commands HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {live_server.TOKEN}\r\n"
           "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}XX0\r\n\r\n".encode())
    status, _, body = c.response()
    assert status == 400 and json.loads(body)["code"] == "bad_request_body"
    for lines in (b"2\n{}\r\n0\r\n\r\n", b"2;ext\n{}\r\n0\r\n\r\n", b"2\r\r\n{}\r\n0\r\n\r\n",  # bare LF or CR
                  b" 2\r\n{}\r\n0\r\n\r\n",  # whitespace only before an extension
                  # trailer lines must be field lines: a request head there is the smuggled request
                  # of a front proxy that ends the body at the last chunk
                  b"2\r\n{}\r\n0\r\nPOST /hidden HTTP/1.1\r\nHost: x\r\n\r\n",
                  b"2\r\n{}\r\n0\r\n folded\r\n\r\n", b"2\r\n{}\r\n0\r\nX y: z\r\n\r\n",
                  b"2\r\n{}\r\n0\r\nX: a\x00\r\n\r\n"):
        c = client()
        c.send(f"POST {API}/commands HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {live_server.TOKEN}\r\n"
               "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".encode() + lines)
        status, _, body = c.response()
        assert status == 400 and json.loads(body)["code"] == "bad_request_body", lines
    c = client()  # a well-formed trailer is read and ignored
    c.send(f"POST {API}/commands HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {live_server.TOKEN}\r\n"
           "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n2;a=b\r\n{}\r\n0\r\n"
           "X-Check: 1\r\n\r\n".encode())
    status, _, body = c.response()
    assert status == 422 and json.loads(body)["code"] == "validation_error"
    c = client()  # smuggling-shaped framing is refused before the app
    c.send(b"POST /api/health HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    status, _, body = c.response()
    assert status == 400 and json.loads(body)["code"] == "bad_request"


def test_a_body_that_follows_its_head_a_moment_later_keeps_the_connection(live_server):
    """http.client (so requests and urllib3 too) sends a POST's head and body in two writes: a route
    that answers without reading the body (a 401, a 404) must still drop it and keep the connection."""
    import http.client

    auth = {"Authorization": f"Bearer {live_server.TOKEN}"}
    for path, headers, times in ((f"{API}/runs/start", {}, 3), (f"{API}/nope", auth, 10)):  # (401s lock out)
        for _ in range(times):
            conn = http.client.HTTPConnection("127.0.0.1", live_server.port, timeout=5)
            conn.request("POST", path, body=b'{"flow_id": "x"}', headers={"Content-Type": "application/json",
                                                                         **headers})
            first = conn.getresponse()
            first.read()
            assert first.status in (401, 404) and first.getheader("Connection") is None
            conn.request("GET", "/api/health")
            assert conn.getresponse().status == 200
            conn.close()
    c = RawClient(live_server)  # the body a tenth of a worker's patience later, as a slow client sends it
    c.send(f"POST {API}/nope HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {live_server.TOKEN}\r\n"
           "Content-Type: application/json\r\nContent-Length: 2\r\n\r\n".encode())
    time.sleep(gw._DRAIN_WAIT_S / 10)
    c.send(b"{}")
    status, headers, _ = c.response()
    assert status == 404 and "connection" not in headers
    c.send(c.request_bytes("GET", "/api/health"))
    assert c.response()[0] == 200


def test_clients_that_never_read_their_answers_hold_no_worker(tmp_path):
    """Each pipelines requests for a large answer and reads nothing: the socket buffers fill, and a
    worker blocked sending the rest was held up to the request timeout. The selector sends it now."""
    server = LiveServer(tmp_path / "d", http_workers="2")
    readers = []
    try:
        path = "/openapi.json"  # 70 kB
        for _ in range(6):
            c = RawClient(server)
            c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            c.send(c.request_bytes("GET", path) * 200)
            readers.append(c)
        wait_for(lambda: server.server._flushing, timeout=10)  # the selector holds their answers' rests
        for _ in range(3):
            started = time.monotonic()
            assert server.get(f"{API}/runs?limit=1")[0] == 200  # a worker's route
            assert time.monotonic() - started < 2
        c = readers[0]  # a reader that reads at last gets whole answers, in order
        status, _, first = c.response()
        assert status == 200 and c.response()[2] == first
    finally:
        for c in readers:
            c.sock.close()
        server.close()


def test_answers_kept_for_slow_readers_are_bounded_in_all(tmp_path):
    """Past the budget, the readers that went longest without taking anything are dropped: neither
    memory nor, by falling back to blocking sends, the workers are theirs to take."""
    server = LiveServer(tmp_path / "d", http_workers="2")
    flush = server.server
    readers = []

    def never_reading() -> None:
        c = RawClient(server)
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        c.send(c.request_bytes("GET", "/openapi.json") * 200)
        readers.append(c)

    try:
        for _ in range(2):
            never_reading()
        wait_for(lambda: len(flush._flushing) == 2)
        rest = max(len(c.unsent) for c in flush._flushing.values())  # what the sockets did not take
        flush.FLUSH_TOTAL_BYTES = 2 * rest + rest // 2  # room for two such rests
        for _ in range(4):
            never_reading()
        wait_for(lambda: flush._open <= 3 and not flush._ready.qsize())  # the stalest dropped to make room
        assert flush._flush_bytes <= flush.FLUSH_TOTAL_BYTES + rest
        started = time.monotonic()
        assert server.get(f"{API}/runs?limit=1")[0] == 200 and time.monotonic() - started < 2
    finally:
        for c in readers:
            c.sock.close()
        server.close()


def test_a_reader_too_slow_to_ever_free_its_answer_is_dropped(tmp_path):
    """Taking a few bytes now and then is not enough to keep a share of the budget: after the request
    timeout a client must average 64 KiB/s (or, while the kernel still holds what it was sent, take
    enough for the socket to accept more at all)."""
    server = LiveServer(tmp_path / "d", http_workers="2", request_timeout_s="0.5")
    c = RawClient(server)
    stop = threading.Event()

    def read_slowly() -> None:
        try:
            while not stop.is_set() and c.sock.recv(64):
                time.sleep(0.01)  # about 6 kB/s
        except OSError:
            pass

    reader = threading.Thread(target=read_slowly, daemon=True)
    try:
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        c.send(c.request_bytes("GET", "/openapi.json") * 200)
        wait_for(lambda: server.server._flushing)
        reader.start()
        wait_for(lambda: not server.server._flushing and server.server._flush_bytes == 0, timeout=5)
    finally:
        stop.set()
        c.sock.close()
        reader.join(5)
        server.close()


def test_bodies_trickled_to_refused_requests_hold_no_worker(tmp_path):
    """A 401 or 404 does not read the body; waiting for the rest of it to drop it held a worker until
    its deadline, and as many clients as workers (no token needed) held them all."""
    server = LiveServer(tmp_path / "d", http_workers="2")
    attackers = []
    try:
        for i in range(6):
            c = RawClient(server)
            head = ("POST /nope HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1000\r\na" if i % 2 else
                    f"POST {API}/commands HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 60000\r\n\r\n")
            c.send(head.encode())
            attackers.append(c)
        for i, c in enumerate(attackers):  # each is answered, and its connection closed rather than drained
            if not i % 2:
                assert c.file.readline() == b"HTTP/1.1 100 Continue\r\n" and c.file.readline() == b"\r\n"
            assert c.response()[0] == (404 if i % 2 else 401)
            assert c.closed_by_server()
        started = time.monotonic()
        assert server.get(f"{API}/runs?limit=1")[0] == 200  # a worker's route
        assert time.monotonic() - started < 2
    finally:
        for c in attackers:
            c.sock.close()
        server.close()


@pytest.mark.parametrize("trickle", [False, True], ids=["stalled", "endless"])
def test_a_chunked_body_that_never_ends_is_a_408_within_the_timeout(tmp_path, trickle):
    server = LiveServer(tmp_path / "d", request_timeout_s="1")
    c = RawClient(server)
    try:
        c.send(f"POST {API}/commands HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {server.TOKEN}\r\n"
               "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n{\r\n".encode())
        started = time.monotonic()
        c.sock.settimeout(0.1)
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            assert time.monotonic() - started < 5, reply
            if trickle:
                try:
                    c.sock.sendall(b"1\r\n \r\n")  # a valid chunk every 0.1 s, forever
                except OSError:
                    pass
            try:
                data = c.sock.recv(65536)
            except socket.timeout:
                continue
            except ConnectionResetError:
                break
            if not data:
                break
            reply += data
        assert time.monotonic() - started < 3
        assert reply.startswith(b"HTTP/1.1 408"), reply[:100]
        assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["code"] == "request_timeout"
        assert server.gateway.stores.commands.list_after(after=0)[0] == []
        assert server.get("/api/health")[0] == 200  # no worker left hanging
    finally:
        c.close()
        server.close()


# -- idle connections ------------------------------------------------------------------------------------


def test_idle_and_kept_alive_connections_are_evicted_after_the_idle_timeout(tmp_path):
    server = LiveServer(tmp_path / "d", idle_timeout_s="0.3")
    fresh, used = RawClient(server), RawClient(server)
    try:
        used.send(used.request_bytes("GET", "/api/health"))
        assert used.response()[0] == 200
        started = time.monotonic()
        assert fresh.closed_by_server() and used.closed_by_server()  # blocking reads end with EOF
        assert time.monotonic() - started < 2
    finally:
        fresh.close()
        used.close()
        server.close()


def test_300_idle_sockets_do_not_lock_new_clients_out(tmp_path):
    # fewer connection slots than idle sockets, and a small request cap: idle sockets count against neither
    server = LiveServer(tmp_path / "d", max_connections="200", max_threads="8")
    idle = []
    try:
        for i in range(300):
            s = socket.create_connection(("127.0.0.1", server.port))
            if i % 2:  # served once, then left open: kept alive
                s.sendall(b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n")
                assert s.recv(65536).startswith(b"HTTP/1.1 200")
            idle.append(s)
        for _ in range(5):
            started = time.perf_counter()
            assert server.get("/api/health")[0] == 200
            assert time.perf_counter() - started < 0.5
        c = RawClient(server)  # a keep-alive client keeps being served while idle sockets keep arriving
        for _ in range(20):
            idle.append(socket.create_connection(("127.0.0.1", server.port)))
            c.send(c.request_bytes("GET", f"{API}/runs?limit=1"))
            assert c.response()[0] == 200
        c.close()
    finally:
        for s in idle:
            s.close()
        server.close()


def test_sockets_that_trickle_their_heads_never_lock_new_clients_out(tmp_path):
    """Slowloris: more trickling heads than request slots, reconnecting when cut.
    When full, the head that has been arriving longest (over SLOW_HEAD_S) makes room: a 408 for it,
    an answer for the client that sends its request at once."""
    server = LiveServer(tmp_path / "d", max_threads="4")
    http = server.server
    http.SLOW_HEAD_S = 0.2
    slow: list = []

    def trickle() -> socket.socket:
        s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        s.sendall(b"GET /api/health HTTP/1.1\r\nX-Slow: ")  # and never the rest
        slow.append(s)
        return s

    def slots_held_long_by(socks: list) -> bool:
        arriving = list(http._partial.values())
        return ({c.addr[1] for c in arriving} == {s.getsockname()[1] for s in socks}
                and all(time.monotonic() - c.started > http.SLOW_HEAD_S for c in arriving))

    try:
        for round_ in range(3):
            latest = [trickle() for _ in range(4)]  # the attacker (re)connects
            wait_for(functools.partial(slots_held_long_by, latest))  # every slot: a head trickling for long
            assert server.get("/api/health")[0] == 200, round_
            wait_for(lambda: http._in_progress == len(http._partial))  # its slot is free again (not a race)
        evicted = []
        for s in slow:
            s.settimeout(0.05)
            try:
                evicted.append(s.recv(65536))
            except OSError:
                pass
        assert [r for r in evicted if r.startswith(b"HTTP/1.1 408")], evicted  # the cut ones were told why
    finally:
        for s in slow:
            s.close()
        server.close()


def test_a_whole_head_takes_the_slot_of_a_trickling_one_however_fast_they_rotate(tmp_path):
    """Trickling sockets reconnecting faster than SLOW_HEAD_S still never keep out a client that
    sends its whole head: it takes the slot of the oldest incomplete head."""
    server = LiveServer(tmp_path / "d", max_threads="4")
    http = server.server
    slow: list = []

    def held_by(ports: set) -> bool:  # the request slots hold exactly these sockets' heads
        return {c.addr[1] for c in list(http._partial.values())} == ports

    try:
        for round_ in range(5):
            for s in slow:
                s.close()  # the attacker rotates its sockets well within SLOW_HEAD_S (1 s)
            slow = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(4)]
            for s in slow:
                s.sendall(b"GET /api/health HTTP/1.1\r\nX-Slow: ")
            wait_for(functools.partial(held_by, {s.getsockname()[1] for s in slow}))
            wait_for(lambda: time.monotonic() - min(c.started for c in list(http._partial.values()))
                     > http.SLOW_HEAD_S / 20)
            assert server.get("/api/health")[0] == 200, round_
            wait_for(lambda: http._in_progress == len(http._partial))
    finally:
        for s in slow:
            s.close()
        server.close()


def test_a_full_request_cap_is_a_503_that_reaches_the_client(tmp_path):
    """With every slot held by a head too young to evict, a new request gets the JSON 503 with
    Retry-After, whole (its connection is closed gently), and is counted nowhere afterwards."""
    server = LiveServer(tmp_path / "d", max_threads="2")
    http = server.server
    http.SLOW_HEAD_S = 1000.0  # no head is ever slow enough to make room
    slow = []
    try:
        for _ in range(2):
            s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            s.sendall(b"GET /api/health HTTP/1.1\r\nX-Slow: ")
            slow.append(s)
        wait_for(lambda: http._in_progress == 2)
        status, headers, body = server.get("/api/health")
        assert (status, body["code"], headers["Retry-After"]) == (503, "busy", "1")
        assert http._in_progress == 2  # the refused request took no slot
    finally:
        for s in slow:
            s.close()
        server.close()
    assert http._open == 0


def test_closing_sockets_are_bounded(tmp_path):
    """Refused requests whose clients neither read nor close wait in `_closing` (a descriptor each):
    never more than CLOSE_LINGER_MAX of them; the oldest is closed at once to make room."""
    server = LiveServer(tmp_path / "d")
    http = server.server
    http.CLOSE_LINGER_MAX = 4
    rude = []
    try:
        for _ in range(12):
            s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            s.sendall(b"GET /api/health HTTP/1.1\r\n" + b"X-Pad: " + b"a" * 40_000 + b"\r\n")  # a 431
            rude.append(s)
        wait_for(lambda: all(s.recv(12, socket.MSG_PEEK) for s in rude[-4:]))  # the last four were answered
        assert len(http._closing) <= 4
        assert server.get("/api/health")[0] == 200
    finally:
        for s in rude:
            s.close()
        server.close()


@pytest.mark.parametrize("oversized", ["body", "head"])
def test_a_refused_request_s_answer_is_not_lost_to_a_reset(live_server, oversized):
    """A 413 (declared body over the cap) or 431 (headers too large) is sent while the client is still
    sending: the connection is shut for writing and its input drained, not closed with input unread
    (the kernel's reset would make the client's kernel drop the answer it has not read yet)."""
    for _ in range(5):
        sock = socket.create_connection(("127.0.0.1", live_server.port), timeout=10)
        try:
            if oversized == "body":
                sock.sendall((f"POST {API}/commands HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {live_server.TOKEN}"
                              "\r\nContent-Type: application/json\r\nContent-Length: 50000000\r\n\r\n").encode())
            else:
                sock.sendall(b"GET /api/health HTTP/1.1\r\nHost: x\r\n")
            sock.setblocking(False)
            sent = 0
            try:
                while sent < 512_000:  # keep sending (less than the server drains) while it answers
                    sent += sock.send(b"X-Pad: " + b"a" * 65_000 + b"\r\n")
            except BlockingIOError:
                pass
            sock.settimeout(10)
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
        finally:
            sock.close()
        expected = b"HTTP/1.1 413" if oversized == "body" else b"HTTP/1.1 431"
        assert reply.startswith(expected) and b'"code":' in reply, reply[:200]


def test_a_client_that_sends_a_whole_oversized_upload_before_reading_gets_the_413(tmp_path):
    """http.client (and requests) send the whole body, then read: the 413 answered after the head must
    still be there, so what follows it is drained, not reset (20 MiB here, as an 80 MiB bundle would be)."""
    import http.client

    server = LiveServer(tmp_path / "d", max_attachment_bytes="1000")
    try:
        body = b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"f\"\r\n\r\n" + b"x" * (20 << 20)
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.request("POST", f"{API}/attachments/upload", body=body, headers={
            "Authorization": f"Bearer {server.TOKEN}", "Content-Type": "multipart/form-data; boundary=b"})
        response = conn.getresponse()
        assert response.status == 413 and json.loads(response.read())["code"] == "too_large"
        conn.close()
    finally:
        server.close()


def _held_list_bundles(server):
    """Make `GET /bundles` wait until released (a slow model or upload); (entered list, release event)."""
    entered, release = [], threading.Event()
    real = server.app.list_bundles

    def held(request, *args, **kwargs):
        entered.append(1)
        release.wait(20)
        return real(request, *args, **kwargs)

    server.app.list_bundles = held
    return entered, release


def test_requests_held_long_on_every_worker_stall_no_other_client(tmp_path, monkeypatch):
    """Slow requests (a model answering an observer, a large upload) on every worker: more workers are
    started, so another client is answered at once; they end once idle. (The original serves others
    meanwhile too.)"""
    monkeypatch.setattr(gw.HttpServer, "ELASTIC_IDLE_S", 0.5)
    server = LiveServer(tmp_path / "d", runner=False, http_workers="2")
    http = server.server
    entered, release = _held_list_bundles(server)
    held = [threading.Thread(target=server.get, args=(f"{API}/bundles",), kwargs={"timeout": 30}) for _ in range(5)]
    try:
        for t in held:
            t.start()
        wait_for(lambda: len(entered) == 5)  # all five in the app at once, on 2 workers and 3 more
        began = time.monotonic()
        assert server.get(f"{API}/runs")[0] == 200
        assert time.monotonic() - began < 2.0
    finally:
        release.set()
        for t in held:
            t.join(30)
    wait_for(lambda: len(http._threads) == 2, timeout=10)  # the extra ones ended, idle
    server.close()


def test_past_max_concurrency_api_requests_are_refused_with_429(tmp_path):
    server = LiveServer(tmp_path / "d", runner=False, http_workers="2", max_concurrency="3")
    entered, release = _held_list_bundles(server)
    held = [threading.Thread(target=server.get, args=(f"{API}/bundles",), kwargs={"timeout": 30}) for _ in range(3)]
    try:
        for t in held:
            t.start()
        wait_for(lambda: len(entered) == 3)
        status, headers, body = server.get(f"{API}/runs")
        assert (status, body["code"], headers["Retry-After"]) == (429, "concurrency_limit", "1")
        assert server.get("/api/health")[0] == 200  # not an API request: never counted
    finally:
        release.set()
        for t in held:
            t.join(30)
    assert server.get(f"{API}/runs")[0] == 200
    server.close()


def test_workers_waiting_for_a_client_s_next_request_hold_no_request_slot(tmp_path):
    server = LiveServer(tmp_path / "d", max_threads="2")
    server.server.LINGER_S = 5.0  # each worker waits long for its client's next request
    conns = []
    try:
        for _ in range(4):  # more kept-alive clients than request slots, one after the other
            conns.append(RawClient(server))
            conns[-1].send(conns[-1].request_bytes("GET", "/api/health"))
            assert conns[-1].response()[0] == 200
            # its worker lingers for seconds yet holds no slot (it is freed once the reply is sent, not
            # before: hence the wait, not a race with the next client)
            wait_for(lambda: server.server._in_progress == 0, timeout=2)
    finally:
        for c in conns:
            c.close()
        server.close()


# -- SSE fan-out on the stream writer ----------------------------------------------------------------


def _raise_fd_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= wanted, "the hard fd limit is too low for this test"


def _stream_request(server: LiveServer, run_id: str, heartbeat_s: float = 30) -> bytes:
    return (f"GET {API}/runs/{run_id}/ledger/stream?heartbeat_s={heartbeat_s} HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {server.TOKEN}\r\n\r\n").encode()


def test_1000_concurrent_subscribers_all_get_every_record_and_done(tmp_path):
    _raise_fd_limit(4096)
    server = LiveServer(tmp_path / "d", max_sse="1100", max_concurrency="1100", max_threads="1100")
    received: dict = {}
    sel = selectors.DefaultSelector()

    def pump(done) -> bool:
        for key, _ in sel.select(0.05):
            try:
                data = key.fileobj.recv(65536)
            except BlockingIOError:
                continue
            received[key.fileobj].extend(data)
            if not data:
                sel.unregister(key.fileobj)
        return all(done(bytes(buf)) for buf in received.values())

    try:
        run_id = server.gateway.start_run(bundle_id="ask")
        wait_for(lambda: server.gateway.stores.runs.status_of(run_id) == "waiting")
        before = server.gateway.stores.ledger.count(run_id)
        request = _stream_request(server, run_id)
        for _ in range(1000):
            s = socket.create_connection(("127.0.0.1", server.port))
            s.sendall(request)
            s.setblocking(False)
            received[s] = bytearray()
            sel.register(s, selectors.EVENT_READ)
        wait_for(lambda: pump(lambda buf: f"id: {before}\n".encode() in buf), timeout=60)
        assert len(server.server.streams) == 1000 and server.app._streams == 1000
        waiting = server.get(f"{API}/runs/{run_id}")[2]["waiting"]
        assert server.post(f"{API}/commands", {"command_id": "go", "run_id": run_id, "type": "resume",
                                               "payload": {"wait_key": waiting["wait_key"],
                                                           "payload": {"response": "x"}}})[0] == 200
        wait_for(lambda: pump(lambda buf: b"event: done" in buf and buf.endswith(b"0\r\n\r\n")), timeout=60)
        total = server.gateway.stores.ledger.count(run_id)
        assert total > before
        for buf in received.values():
            ids = [int(line[4:]) for line in bytes(buf).split(b"\n") if line.startswith(b"id: ")]
            assert ids == list(range(1, total + 1))
            assert b'"status": "terminal"' in buf
        wait_for(lambda: len(server.server.streams) == 0 and server.app._streams == 0, timeout=10)
    finally:
        sel.close()
        for s in received:
            s.close()
        server.close()


def test_a_slow_reader_is_dropped_without_stalling_the_others(tmp_path):
    server = LiveServer(tmp_path / "d", request_timeout_s="1", sse_max_buffer_bytes="65536")
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a reader that stops reading fills up fast
    fast = None
    try:
        run_id = server.gateway.start_run(bundle_id="ask")
        wait_for(lambda: server.gateway.stores.runs.status_of(run_id) == "waiting")
        slow.connect(("127.0.0.1", server.port))
        slow.sendall(_stream_request(server, run_id))
        fast = RawClient(server)
        fast.send(_stream_request(server, run_id))
        assert fast.file.readline().startswith(b"HTTP/1.1 200")
        wait_for(lambda: len(server.server.streams) == 2)
        ledger = server.gateway.stores.ledger
        filler = json.dumps({"note": "y" * 20_000})
        started = time.monotonic()
        for _ in range(300):  # about 6 MB: far more than the slow client's buffers hold
            ledger.append_json(run_id, filler)
        total = ledger.count(run_id)
        seen = b""
        while f"id: {total}\n".encode() not in seen[-30_000:]:
            chunk = fast.file.read1(1 << 16)
            assert chunk, "the fast stream ended"
            seen += chunk
        fast_done = time.monotonic() - started
        wait_for(lambda: len(server.server.streams) == 1, timeout=5)  # the slow one was dropped
        ids = [int(line[4:]) for line in seen.split(b"\n") if line.startswith(b"id: ")]
        assert ids == list(range(1, total + 1))
        assert fast_done < 5
        ledger.append_json(run_id, json.dumps({"note": "after"}))  # the survivor keeps streaming
        line = b""
        while not line.startswith(f"id: {total + 1}".encode()):
            line = fast.file.readline()
    finally:
        slow.close()
        if fast is not None:
            fast.close()
        server.close()


# -- the write paths: one durable commit per acknowledged write ----------------------------------


def test_a_command_and_its_audit_row_commit_together_and_a_run_is_its_own_session(live_server):
    db = live_server.gateway.stores.db
    commits = []  # (how, thread) of each write transaction
    group_commit, shared = db._commit_batch, live_server.server.group
    def note(how):
        commits.append((how, threading.current_thread().name))

    db._commit_batch = lambda batch: (note("group"), group_commit(batch))[1]
    live_server.server.group = shared._replace(transaction=lambda: (note("tx"), shared.transaction())[1])
    try:
        status, _, body = live_server.post(f"{API}/commands", {"command_id": "one", "run_id": "r", "type": "pause"})
        assert status == 200 and body["accepted"] is True
        row = live_server.gateway.stores.audit.tail(1)[0]  # committed before the answer was sent
        assert (row["path"], row["status"]) == (f"{API}/commands", 200)
        # the command's own commit (its route shares commits) carried the audit row: no second one for it
        assert [how for how, thread in commits if thread.startswith("http")] == ["tx"]
    finally:
        del db._commit_batch
        live_server.server.group = shared
    status, _, body = live_server.post(f"{API}/runs/start", {"bundle_id": "echo"})
    run_id = body["run_id"]
    status, _, listed = live_server.get(f"{API}/runs?session_id={run_id}")
    assert [r["run_id"] for r in listed["items"]] == [run_id]
    assert live_server.gateway.stores.runs.load(run_id).session_id == run_id
    rejected = live_server.post(f"{API}/commands", {"command_id": "", "run_id": " ", "type": "pause"})[0]
    assert rejected == 400  # no write happened: the audit row is written on its own, after the response
    wait_for(lambda: live_server.gateway.stores.audit.tail(1)[0]["status"] == 400)


def test_the_stream_writer_outlives_a_failing_read(live_server):
    run_id = live_server.gateway.start_run(bundle_id="ask")
    wait_for(lambda: live_server.gateway.stores.runs.status_of(run_id) == "waiting")
    stream = RawClient(live_server)
    stream.send(_stream_request(live_server, run_id))
    assert stream.file.readline().startswith(b"HTTP/1.1 200")
    ledger = live_server.gateway.stores.ledger
    total = ledger.count(run_id)
    line = b""
    while not line.startswith(f"id: {total}".encode()):
        line = stream.file.readline()
    real_page = ledger.page_json
    failures = []

    def failing_once(*args):
        if not failures:
            failures.append(1)
            raise gw.apsw.BusyError("database is locked")
        return real_page(*args)

    ledger.page_json = failing_once
    try:
        ledger.append_json(run_id, json.dumps({"note": "after a failed read"}))
        while not line.startswith(f"id: {total + 1}".encode()):
            line = stream.file.readline()
        assert failures == [1]
    finally:
        ledger.page_json = real_page
        stream.close()


# -- quick reads on the selector thread; commands that share one commit ------------------------------


def _serve_in_thread(server: gw.HttpServer, name: str) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, name=name, daemon=True)
    thread.start()
    return thread


def _read_response(sock: socket.socket) -> tuple[bytes, bytes]:
    """(head, body) of one Content-Length response read off a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536) or _eof()
    head, _, body = data.partition(b"\r\n\r\n")
    lengths = [line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")]
    length = int(lengths[0])
    while len(body) < length:
        body += sock.recv(1 << 20) or _eof()
    return head, body


def _eof() -> bytes:
    raise ConnectionError("the server closed the connection mid-response")


def test_a_quick_read_is_answered_on_the_selector_thread_and_a_stalled_reader_never_blocks_it():
    big = bytes(range(256)) * (1 << 16)  # 16 MB: more than a socket takes while its client reads nothing
    served_by = []

    def app(environ, start_response):
        served_by.append(threading.current_thread().name)
        body = big if environ["PATH_INFO"] == "/big" else b"small"
        start_response("200 OK", [("Content-Type", "application/octet-stream"), ("Content-Length", str(len(body)))])
        return [body]

    server = gw.HttpServer(app, "127.0.0.1", 0, workers=2, quick=lambda environ: True)
    _serve_in_thread(server, "selector")
    stalled = socket.socket()
    try:
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        stalled.connect(("127.0.0.1", server.server_port))
        stalled.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_for(lambda: served_by)
        for _ in range(3):  # the loop answers others at once while the big answer waits for its reader
            with socket.create_connection(("127.0.0.1", server.server_port), timeout=5) as other:
                other.sendall(b"GET /small HTTP/1.1\r\nHost: x\r\n\r\n")
                assert _read_response(other)[1] == b"small"
        assert served_by == ["selector"] * 4  # every app call ran on the selector thread, none on a worker
        wait_for(lambda: server._in_progress == 1)  # the big answer's rest (too big to keep) is at a worker
        stalled.settimeout(30)
        head, body = _read_response(stalled)  # a worker sends the rest once the client reads
        assert head.startswith(b"HTTP/1.1 200") and body == big
    finally:
        stalled.close()
        server.shutdown()
        server.server_close()


def test_a_quick_path_that_proved_costly_is_served_by_workers_from_then_on():
    served_by = []

    def app(environ, start_response):
        served_by.append(threading.current_thread().name)
        if environ["QUERY_STRING"] == "deny":  # a cheap refusal of the same path
            start_response("401 Unauthorized", [("Content-Type", "text/plain"), ("Content-Length", "2")])
            return [b"no"]
        if environ["PATH_INFO"] == "/slow" and environ["QUERY_STRING"] != "cheap":  # e.g. a run grown large
            until = time.thread_time() + gw.HttpServer.QUICK_BUDGET_S * 2  # CPU, not a wait
            while time.thread_time() < until:
                pass
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
        return [b"ok"]

    server = gw.HttpServer(app, "127.0.0.1", 0, workers=2, quick=lambda environ: True)
    _serve_in_thread(server, "selector")
    try:
        # costly; a cheap answer clears that; costly; a cheap refusal proves nothing; costly again: demoted
        for target in ("/slow", "/slow?cheap", "/slow", "/slow?deny", "/slow", "/slow", "/fast"):
            with socket.create_connection(("127.0.0.1", server.server_port), timeout=5) as sock:
                sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                _read_response(sock)
        assert served_by[:5] == ["selector"] * 5 and served_by[6] == "selector"
        assert served_by[5].startswith("http-worker")  # twice over budget in a row: workers from then on
    finally:
        server.shutdown()
        server.server_close()


def test_a_route_declares_quick_or_shared_commit_only_where_it_can_hold():
    with pytest.raises(ValueError):
        gw.Route("POST", f"{API}/x", "x", "x", "x", quick=True)
    with pytest.raises(ValueError):
        gw.Route("GET", f"{API}/x", "x", "x", "x", stream=True, quick=True)
    with pytest.raises(ValueError):
        gw.Route("GET", f"{API}/x", "x", "x", "x", shared_commit=True)


def test_commands_that_arrive_together_share_one_transaction(live_server, client):
    server, shared, entered = live_server.server, live_server.server.group, []
    release = threading.Event()

    def first_waits():
        entered.append(threading.current_thread().name)
        if len(entered) == 1:
            release.wait(10)  # the first group holds on until the others have queued behind it
        return shared.transaction()

    server.group = shared._replace(transaction=first_waits)
    try:
        conns = [client() for _ in range(8)]
        conns[0].send(conns[0].request_bytes("POST", f"{API}/commands", _command("g0")))
        wait_for(lambda: entered)
        for i, conn in enumerate(conns[1:], 1):
            conn.send(conn.request_bytes("POST", f"{API}/commands", _command(f"g{i}")))
        wait_for(lambda: len(server._grouped) == 7)
        release.set()
        replies = [conn.response() for conn in conns]
    finally:
        release.set()
        server.group = shared
    assert [(status, json.loads(body)["accepted"]) for status, _, body in replies] == [(200, True)] * 8
    assert len(entered) == 2  # the first alone, then the seven that queued meanwhile in one transaction
    assert all(live_server.gateway.stores.commands.get(f"g{i}") is not None for i in range(8))
    assert {row["status"] for row in live_server.gateway.stores.audit.tail(8)} == {200}


def test_a_shared_transaction_that_cannot_commit_stores_nothing_and_tells_each_request(live_server, client):
    server, shared = live_server.server, live_server.server.group

    commands = live_server.gateway.stores.commands

    @contextlib.contextmanager
    def full_disk():
        """The disk is full for any commit that would store one of these commands, however the
        requests fall into groups; the audit rows written after the replies commit."""
        with shared.transaction():
            yield
            if any(commands.get(f"lost{i}") is not None for i in range(3)):  # this thread's own writes
                raise apsw.FullError("database or disk is full")

    server.group = shared._replace(transaction=full_disk)
    try:
        conns = [client() for _ in range(3)]
        for i, conn in enumerate(conns):
            conn.send(conn.request_bytes("POST", f"{API}/commands", _command(f"lost{i}")))
        replies = [conn.response() for conn in conns]
    finally:
        server.group = shared
    for status, headers, body in replies:  # the app's own error answer: shape, retry hint, request id
        assert status == 507 and json.loads(body)["code"] == "disk_full" and headers["connection"] == "close"
        assert headers["retry-after"] == "5" and headers["x-request-id"]
    # each failed request is audited after all: its row is written once the replies are out
    wait_for(lambda: [row["status"] for row in live_server.gateway.stores.audit.tail(3)] == [507] * 3)
    assert all(live_server.gateway.stores.commands.get(f"lost{i}") is None for i in range(3))
    status, _, body = live_server.post(f"{API}/commands", {"command_id": "lost0", "run_id": "r", "type": "pause"})
    assert status == 200 and body["accepted"] is True  # nothing of the failed group stands in its way


def test_pipelined_commands_then_a_half_close_get_every_reply(live_server):
    """The group gives a connection back with the next command buffered: that command is queued
    again, and the selector must not act on the connection meanwhile (a stale event of its select)."""
    for round_ in range(10):
        with socket.create_connection(("127.0.0.1", live_server.port), timeout=5) as sock:
            requests = b"".join(
                (f"POST {API}/commands HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {live_server.TOKEN}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
                for body in (_command(f"a{round_}"), _command(f"b{round_}")))
            sock.sendall(requests)
            sock.shutdown(socket.SHUT_WR)  # as `printf ... | nc` does
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        assert data.count(b"HTTP/1.1 200 OK") == 2, data
    wait_for(lambda: live_server.server._open == 0 and live_server.server._in_progress == 0)


def test_a_client_that_reads_no_reply_never_holds_up_other_commands(tmp_path):
    server = LiveServer(tmp_path / "d", request_timeout_s="10")
    greedy = socket.socket()
    try:
        greedy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        greedy.connect(("127.0.0.1", server.port))
        body = _command("x")
        origin = "http://" + "a" * 15_000  # echoed by the 403's CORS header: about 15 KB a reply
        request = (f"POST {API}/commands HTTP/1.1\r\nHost: x\r\nOrigin: {origin}\r\n"
                   f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
        greedy.setblocking(False)
        sent = 0
        for _ in range(400):  # one at a time, never reading: until its socket takes no more
            try:
                greedy.send(request)
            except BlockingIOError:
                break
            sent += 1
            wait_for(lambda: not server.server._group_busy)
        assert sent > 20
        for i in range(3):
            started = time.monotonic()
            status = server.post(f"{API}/commands", {"command_id": f"ok{i}", "run_id": "r", "type": "pause"})[0]
            assert status == 200 and time.monotonic() - started < 2
    finally:
        greedy.close()
        server.close()


def test_bodies_that_stall_hold_no_worker(tmp_path):
    server = LiveServer(tmp_path / "d", http_workers="2", request_timeout_s="1")
    stalled = []
    try:
        for _ in range(6):  # three times the workers: each sends its head and one byte of a 100-byte body
            s = socket.create_connection(("127.0.0.1", server.port))
            s.sendall(f"POST {API}/commands HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {server.TOKEN}\r\n"
                      "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{".encode())
            stalled.append(s)
        started = time.perf_counter()
        assert server.get("/api/health")[0] == 200
        assert time.perf_counter() - started < 0.5
        for s in stalled:  # each is answered 408 once the request deadline passes
            s.settimeout(5)
            assert s.recv(65536).startswith(b"HTTP/1.1 408")
    finally:
        for s in stalled:
            s.close()
        server.close()
