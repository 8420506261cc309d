"""HTTP benchmark: AbstractGateway's API and SSE ledger streams over a real loopback socket.

This is a benchmark, not a test: it prints figures and exits 0 whatever they are (it exits
non-zero only if a phase cannot run at all, e.g. a request keeps failing).

Setup, all in this one process: a `Gateway` over a fresh SQLite file in a temporary
directory, its `Runner`, and the full WSGI stack that `abstractgateway serve` runs
(`build_wsgi`: `GatewayApp` behind the security middlewares: bearer auth, audit log of
writes, concurrency/SSE caps) served by `HttpServer` on 127.0.0.1 with port 0, in a thread.
`--bare` serves the plain `GatewayApp` instead (no middlewares). Settings are the defaults
except the ones a benchmark must raise: `max_sse` and `max_threads` (so 1,000 streams can
be held) and `max_concurrency` (printed at the start). The no-LLM test flows `echo`
(completes in one tick) and `ask` (waits for a user answer) are packed from `tests/flows/`.

Phases (clients are threads of this process using `http.client` keep-alive connections;
SSE clients are raw sockets multiplexed by one selector thread):

a. Requests/s of `GET /api/gateway/runs/{id}` and `POST /api/gateway/commands` (unique
   command ids, type `pause` against a completed run, so applying them is a no-op) with 1
   and 16 client threads, ~2 s each. Only 2xx answers count; others are reported.
b. `POST runs/start` -> SSE `event: done` latency p50/p99 for `echo` (~50 samples, one at a
   time): the stream `runs/{id}/ledger/stream` is opened right after the start returns.
c. Ledger replay over HTTP: one run's ledger is bulk-filled to 100,000 records of ~200 bytes
   (one `executemany` transaction), then read with `GET runs/{id}/ledger?after=N&limit=2000`
   on one connection, each page JSON-parsed by the client. Records/s (best of 2).
   Goal: >= 50,000 records/s.
d. SSE append -> client latency with 100 concurrent streams (one per WAITING `ask` run):
   records are appended with `gateway.stores.ledger.append(StepRecord(...))` carrying
   `time.perf_counter()` in `result`, paced, and each client computes receive time minus
   that stamp (so the figure includes the durable commit of the append). Goal: p99 <= 10 ms.
e. Concurrent SSE streams held: opens up to 1,000 streams (10 per `ask` run over the same
   100 runs), reports how many were held (and why not more), server RSS/threads/open files,
   then appends records to every run and reports delivery latency p50/p99 over all streams.

`--compare` measures server processes instead, one after the other in the same run, with the
clients in this process: this checkout, `--before DIR` (an earlier checkout, e.g.
`git archive main abstractgateway.py schema.sql | tar -x -C DIR`) and `--original EXE` (the
original gateway's `abstractgateway` executable, FastAPI on uvicorn, sqlite backend, its default
durability). All servers run at once. Per server: `GET runs/{id}` req/s with 1 and 16 keep-alive
client threads and acknowledged `POST commands`/s with 8 threads (ours at synchronous=FULL), taken
in turns server after server for `--rounds` rounds (median reported, so a machine whose speed drifts
skews every server alike); then, one server at a time, the 10-timer loop flow; the server's RSS with
1,000 SSE streams open (10 on each of 100 WAITING `ask` runs); and, with those streams open,
resume command -> first new record on each of the run's streams, p50/p99 over all streams.

How to run (from the repository root, with the project and abstractruntime installed):

    python bench/http.py            # full run (about 1-2 minutes on 2 cores)
    python bench/http.py --quick    # counts and durations scaled down
    python bench/http.py --console  # only the operator console in headless Chromium (its own section)
    python bench/http.py --compare --before /tmp/ag-main --original /path/to/venv/bin/abstractgateway

Caveat: the clients share the process (and the GIL) with the server, so every figure is a
little pessimistic compared with separate client machines. Only loopback traffic. The
temporary directory is removed, and the server, streams and runner are stopped, at the end.
"""

from __future__ import annotations

import os
import sys

# This file is named http.py: when run as a script its directory is sys.path[0], where it
# would shadow the stdlib `http` package. Drop that entry before anything imports `http`.
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import argparse  # noqa: E402
import http.client  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import selectors  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import abstractgateway as gw  # noqa: E402
from abstractruntime.core.models import StepRecord, StepStatus  # noqa: E402

FLOWS = ROOT / "tests" / "flows"
BUNDLES = ("echo", "ask", "timer_loop")
TOKEN = "bench-token-" + uuid.uuid4().hex
API = "/api/gateway"
STREAM_TARGET = 1000
GOAL_SSE_P99_MS = 10.0
GOAL_REPLAY_RPS = 50_000


# -- small helpers ---------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), int(round(q / 100.0 * len(ordered) + 0.4999))))
    return ordered[rank - 1]


def proc_status() -> Dict[str, Any]:
    """RSS (MiB), threads and open files of this process (Linux /proc; zeros elsewhere)."""
    out = {"rss_mib": 0.0, "threads": threading.active_count(), "fds": 0}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                out["rss_mib"] = int(line.split()[1]) / 1024
            elif line.startswith("Threads:"):
                out["threads"] = int(line.split()[1])
        out["fds"] = len(os.listdir("/proc/self/fd"))
    except OSError:
        pass
    return out


def raise_nofile(wanted: int) -> Tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def pack_flows(flows_dir: Path) -> None:
    from abstractruntime.workflow_bundle import pack_workflow_bundle

    flows_dir.mkdir(parents=True, exist_ok=True)
    for name in BUNDLES:
        pack_workflow_bundle(root_flow_json=FLOWS / f"{name}.json", out_path=flows_dir / f"{name}@1.0.0.flow",
                             bundle_id=name, bundle_version="1.0.0", flows_dir=FLOWS)


# -- the server ----------------------------------------------------------------------------------------


class Server:
    def __init__(self, data_dir: Path, bare: bool) -> None:
        pack_flows(data_dir / "flows")
        environ = {
            "ABSTRACTGATEWAY_DATA_DIR": str(data_dir),
            "ABSTRACTGATEWAY_AUTH_TOKEN": TOKEN,
            "ABSTRACTGATEWAY_MAX_SSE": str(STREAM_TARGET + 100),
            "ABSTRACTGATEWAY_MAX_THREADS": str(STREAM_TARGET + 200),
            "ABSTRACTGATEWAY_MAX_CONCURRENCY": "256",
        }
        self.gateway = gw.Gateway(gw.Config.load(environ=environ))
        self.runner = gw.Runner(self.gateway).start()
        if bare or not hasattr(gw, "build_wsgi"):
            self.app = gw.GatewayApp(self.gateway, self.runner)
            self.wsgi: Callable = self.app
            self.stack = "bare GatewayApp"
        else:
            self.wsgi, self.app, _policy = gw.build_wsgi(self.gateway, self.runner)
            self.stack = "build_wsgi (security middlewares on, audit on)"
        self.server = gw.HttpServer(self.wsgi, "127.0.0.1", 0, **gw.server_options(self.gateway))
        self.port = self.server.server_port
        self._thread = threading.Thread(target=self.server.serve_forever, name="http", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.app.stopping.set()
        self.server.shutdown()
        self.server.server_close()
        self.runner.stop()
        self.gateway.close()


def headers(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    h = {"Authorization": f"Bearer {TOKEN}"}
    h.update(extra or {})
    return h


class Client:
    """One keep-alive connection; `call` returns (status, parsed JSON or raw bytes)."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)

    def call(self, method: str, path: str, body: Any = None) -> Tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        hdrs = headers({"Content-Type": "application/json"} if data is not None else None)
        try:
            self.conn.request(method, path, body=data, headers=hdrs)
            resp = self.conn.getresponse()
        except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected):
            # the server closed the idle keep-alive connection (as servers do after a few seconds)
            self.conn.close()
            self.conn.request(method, path, body=data, headers=hdrs)
            resp = self.conn.getresponse()
        raw = resp.read()
        if resp.getheader("Content-Type", "").startswith("application/json"):
            return resp.status, json.loads(raw)
        return resp.status, raw

    def close(self) -> None:
        self.conn.close()


def checked(status_body: Tuple[int, Any], what: str) -> Any:
    status, body = status_body
    if not 200 <= status < 300:
        raise RuntimeError(f"{what}: HTTP {status}: {str(body)[:200]}")
    return body


# -- a minimal SSE client (raw socket, chunked decoding) -----------------------------------------------------


class SSEStream:
    """One `ledger/stream` response read from a raw socket; feeds complete events to `on_event`."""

    def __init__(self, port: int, run_id: str, after: int = 0, timeout: float = 10.0) -> None:
        self.run_id = run_id
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        req = (f"GET {API}/runs/{run_id}/ledger/stream?after={after}&heartbeat_s=60 HTTP/1.1\r\n"
               f"Host: 127.0.0.1:{port}\r\nAuthorization: Bearer {TOKEN}\r\nAccept: text/event-stream\r\n\r\n")
        self.sock.sendall(req.encode())
        self.status: Optional[int] = None
        self.chunked = False
        self.raw = b""
        self.body = b""
        self.ended = False
        self.done_seen = False
        self.events: List[Tuple[str, str]] = []  # (event, data) when nobody consumes them

    def feed(self, data: bytes, on_event: Optional[Callable[["SSEStream", str, str], None]] = None) -> None:
        if not data:
            self.ended = True
            return
        self.raw += data
        if self.status is None and not self._read_head():
            return
        if self.chunked:
            self._dechunk()
        else:
            self.body, self.raw = self.body + self.raw, b""
        self._emit_events(on_event)

    def _read_head(self) -> bool:
        """Parse the status line and headers once they are all in (False while they are not)."""
        head_end = self.raw.find(b"\r\n\r\n")
        if head_end < 0:
            return False
        head, self.raw = self.raw[:head_end].decode("latin-1"), self.raw[head_end + 4:]
        lines = head.split("\r\n")
        self.status = int(lines[0].split()[1])
        hdrs = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        self.chunked = hdrs.get("transfer-encoding", "").lower() == "chunked"
        return True

    def _dechunk(self) -> None:
        """Move every complete chunk from `raw` to `body`; the last (empty) chunk ends the stream."""
        while True:
            eol = self.raw.find(b"\r\n")
            if eol < 0:
                break
            size = int(self.raw[:eol].split(b";")[0], 16)
            if size == 0:
                self.ended = True
                self.raw = b""
                break
            if len(self.raw) < eol + 2 + size + 2:
                break
            self.body += self.raw[eol + 2:eol + 2 + size]
            self.raw = self.raw[eol + 2 + size + 2:]

    def _emit_events(self, on_event: Optional[Callable[["SSEStream", str, str], None]]) -> None:
        """Hand each complete SSE event in `body` to `on_event` (or keep it in `events`)."""
        while True:
            end = self.body.find(b"\n\n")
            if end < 0:
                break
            block, self.body = self.body[:end].decode(), self.body[end + 2:]
            event, data = "message", []
            for line in block.split("\n"):
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].lstrip())
            if not data and event == "message":
                continue  # comment / retry-only block
            if on_event is not None:
                on_event(self, event, "\n".join(data))
            else:
                self.events.append((event, "\n".join(data)))

    def read_until(self, event_name: str, timeout: float) -> bool:
        """Blocking read until an event called `event_name` arrives (True) or timeout/EOF (False)."""
        deadline = time.perf_counter() + timeout
        while True:
            for ev, _ in self.events:
                if ev == event_name:
                    return True
            if self.ended:
                return False
            left = deadline - time.perf_counter()
            if left <= 0:
                return False
            self.sock.settimeout(left)
            try:
                self.feed(self.sock.recv(65536))
            except socket.timeout:
                return False

    def wait_open(self, timeout: float) -> Optional[int]:
        """Block until the status line and headers are in; the HTTP status (None on timeout)."""
        deadline = time.perf_counter() + timeout
        while self.status is None and not self.ended:
            left = deadline - time.perf_counter()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                self.feed(self.sock.recv(65536))
            except (socket.timeout, OSError):
                return None
        return self.status

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class StreamHub:
    """Reads many SSE streams on one selector thread and records bench-record delivery latency."""

    def __init__(self) -> None:
        self.sel = selectors.DefaultSelector()
        self.lock = threading.Lock()
        self.latencies: List[float] = []
        self.stray = 0
        self.closed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sse-clients", daemon=True)
        self._pending: List[SSEStream] = []

    def start(self) -> "StreamHub":
        self._thread.start()
        return self

    def add(self, stream: SSEStream) -> None:
        stream.sock.setblocking(False)
        with self.lock:
            self._pending.append(stream)

    def reset(self) -> None:
        with self.lock:
            self.latencies = []
            self.stray = 0

    def count(self) -> int:
        with self.lock:
            return len(self.latencies)

    def _on_event(self, stream: SSEStream, event: str, data: str) -> None:
        now = time.perf_counter()
        if event != "step":
            if event == "done":
                stream.done_seen = True
                with self.lock:
                    self.closed += 1
            return
        try:
            result = json.loads(data)["record"].get("result")
        except (ValueError, KeyError, AttributeError):
            result = None
        with self.lock:
            if isinstance(result, dict) and "bench_t" in result:
                self.latencies.append((now - result["bench_t"]) * 1000)
            else:
                self.stray += 1

    def _loop(self) -> None:
        while not self._stop.is_set():
            with self.lock:
                pending, self._pending = self._pending, []
            for stream in pending:
                self.sel.register(stream.sock, selectors.EVENT_READ, stream)
            if not self.sel.get_map():
                time.sleep(0.005)
                continue
            for key, _ in self.sel.select(0.02):
                stream: SSEStream = key.data
                try:
                    data = stream.sock.recv(262144)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                stream.feed(data, self._on_event)
                if stream.ended:
                    self.sel.unregister(stream.sock)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for key in list(self.sel.get_map().values()):
            key.data.close()
        self.sel.close()


# -- phases ----------------------------------------------------------------------------------------------------


def wait_status(gateway: gw.Gateway, run_ids: Sequence[str], wanted: frozenset, timeout: float) -> List[str]:
    pending, deadline = set(run_ids), time.perf_counter() + timeout
    while pending and time.perf_counter() < deadline:
        ids = sorted(pending)
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            rows = gateway.stores.db.query(
                f"SELECT run_id, status FROM runs WHERE run_id IN ({','.join('?' * len(chunk))})", chunk)
            pending.difference_update(r for r, s in rows if s in wanted)
        if pending:
            time.sleep(0.005)
    return sorted(pending)


def wait_ledger_waiting(gateway: gw.Gateway, run_ids: Sequence[str], timeout: float) -> None:
    """WAITING is saved before the `waiting` record is appended: wait for that record too."""
    deadline = time.perf_counter() + timeout
    for run_id in run_ids:
        while time.perf_counter() < deadline:
            n = gateway.stores.ledger.count(run_id)
            last = gateway.stores.ledger.page_json(run_id, n - 1, 1) if n else []
            if last and json.loads(last[0]).get("status") == "waiting":
                break
            time.sleep(0.002)


def phase_requests(srv: Server, run_id: str, threads: int, seconds: float, kind: str) -> Dict[str, Any]:
    counts = [0] * threads
    errors: Dict[int, int] = {}
    lock = threading.Lock()
    barrier = threading.Barrier(threads + 1)
    stop_at = [0.0]
    tag = uuid.uuid4().hex[:8]

    def worker(idx: int) -> None:
        client = Client(srv.port)
        barrier.wait()
        i = 0
        try:
            while time.perf_counter() < stop_at[0]:
                i += 1
                try:
                    if kind == "GET":
                        status, _ = client.call("GET", f"{API}/runs/{run_id}")
                    else:
                        status, _ = client.call("POST", f"{API}/commands", {
                            "command_id": f"bench-{tag}-{idx}-{i}", "run_id": run_id, "type": "pause"})
                except (OSError, http.client.HTTPException):
                    status = -1
                    client.close()
                    client = Client(srv.port)
                if 200 <= status < 300:
                    counts[idx] += 1
                else:
                    with lock:
                        errors[status] = errors.get(status, 0) + 1
        finally:
            client.close()

    workers = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(threads)]
    for w in workers:
        w.start()
    stop_at[0] = time.perf_counter() + 3600  # set for real once everyone is connected
    barrier.wait()
    t0 = time.perf_counter()
    stop_at[0] = t0 + seconds
    for w in workers:
        w.join(seconds + 30)
    elapsed = time.perf_counter() - t0
    return {"kind": kind, "threads": threads, "ok": sum(counts), "rps": sum(counts) / elapsed, "errors": errors}


def phase_start_to_done(srv: Server, samples: int) -> Dict[str, Any]:
    client = Client(srv.port)
    latencies: List[float] = []
    failures = 0
    try:
        for _ in range(samples):
            t0 = time.perf_counter()
            run_id = checked(client.call("POST", f"{API}/runs/start", {"bundle_id": "echo"}), "runs/start")["run_id"]
            stream = SSEStream(srv.port, run_id)
            try:
                ok = stream.read_until("done", 10.0)
            finally:
                stream.close()
            if ok:
                latencies.append((time.perf_counter() - t0) * 1000)
            else:
                failures += 1
    finally:
        client.close()
    return {"n": len(latencies), "failures": failures, "p50": percentile(latencies, 50),
            "p99": percentile(latencies, 99), "max": max(latencies) if latencies else float("nan")}


def phase_replay(srv: Server, run_id: str, records: int) -> Dict[str, Any]:
    g = srv.gateway
    base = g.stores.ledger.count(run_id)
    pad = "x" * 60
    rows = []
    for i in range(1, records + 1):
        rec = {"run_id": run_id, "step_id": f"s{i:08d}", "node_id": "bench", "status": "completed",
               "result": {"i": i, "pad": pad}, "ended_at": "2026-01-01T00:00:00+00:00"}
        rows.append((run_id, base + i, json.dumps(rec, separators=(",", ":"))))
    avg_bytes = statistics.fmean(len(r[2]) for r in rows[:1000])
    t = time.perf_counter()
    g.stores.db.write(lambda conn: conn.executemany(gw.SqliteLedgerStore._INSERT, rows))
    insert_s = time.perf_counter() - t
    rows.clear()  # free the memory before reading
    total = base + records
    best = None
    for _ in range(2):
        client = Client(srv.port, timeout=30)
        after, got, nbytes = 0, 0, 0
        t0 = time.perf_counter()
        try:
            while after < total:
                client.conn.request("GET", f"{API}/runs/{run_id}/ledger?after={after}&limit=2000", headers=headers())
                resp = client.conn.getresponse()
                raw = resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"ledger page: HTTP {resp.status}")
                page = json.loads(raw)
                nbytes += len(raw)
                got += len(page["items"])
                if page["next_after"] == after:
                    break
                after = page["next_after"]
        finally:
            client.close()
        elapsed = time.perf_counter() - t0
        if got != total:
            raise RuntimeError(f"replay read {got} records, expected {total}")
        if best is None or elapsed < best["elapsed"]:
            best = {"records": got, "elapsed": elapsed, "rps": got / elapsed, "mib_s": nbytes / elapsed / 2**20}
    best.update(avg_bytes=avg_bytes, insert_s=insert_s)
    return best


def append_bench_record(gateway: gw.Gateway, run_id: str, k: int) -> float:
    """Append one StepRecord stamped with perf_counter(); returns the append (commit) time in ms."""
    t = time.perf_counter()
    gateway.stores.ledger.append(StepRecord(run_id=run_id, step_id=f"bench-{k}", node_id="bench",
                                            status=StepStatus.COMPLETED, result={"bench_t": t, "k": k}))
    return (time.perf_counter() - t) * 1000


def open_streams(srv: Server, hub: StreamHub, run_ids: Sequence[str], per_run: int, limit: int,
                 batch: int = 50) -> Dict[str, Any]:
    """Open up to `limit` streams (`per_run` on each run, round robin); stops at the first refusal."""
    held: List[SSEStream] = []
    refused: Dict[str, int] = {}
    targets = [r for _ in range(per_run) for r in run_ids][:limit]
    afters = {r: srv.gateway.stores.ledger.count(r) for r in run_ids}
    reason = None
    t0 = time.perf_counter()
    for i in range(0, len(targets), batch):
        opened = []
        for run_id in targets[i:i + batch]:
            try:
                opened.append(SSEStream(srv.port, run_id, after=afters[run_id], timeout=10))
            except OSError as exc:
                refused[f"connect: {exc.strerror or exc}"] = refused.get(f"connect: {exc.strerror or exc}", 0) + 1
        fresh = []
        for stream in opened:
            status = stream.wait_open(10.0)
            if status == 200:
                fresh.append(stream)
                hub.add(stream)
            else:
                key = f"HTTP {status}" if status is not None else "no answer in 10 s"
                refused[key] = refused.get(key, 0) + 1
                stream.close()
        # A stream the server gives up on ends within a stream-writer pass: check.
        time.sleep(0.4)
        for stream in fresh:
            if stream.ended:
                key = "server ended the stream without `done`"
                refused[key] = refused.get(key, 0) + 1
            else:
                held.append(stream)
        if refused:
            reason = ", ".join(f"{k} x{v}" for k, v in refused.items())
            break
    return {"held": held, "refused": refused, "reason": reason, "open_s": time.perf_counter() - t0,
            "max_fd": max((int(f) for f in os.listdir("/proc/self/fd")), default=0) if os.path.isdir("/proc/self/fd")
            else 0}


def phase_sse_latency(srv: Server, hub: StreamHub, run_ids: Sequence[str], rounds: int, rate: float,
                      streams: Sequence[SSEStream], settle_s: float = 10.0) -> Dict[str, Any]:
    """Append `rounds` records to each run at `rate` appends/s; latency at every live stream."""
    hub.reset()
    live: Dict[str, int] = {}
    for st in streams:
        if not st.ended:
            live[st.run_id] = live.get(st.run_id, 0) + 1
    commits: List[float] = []
    interval = 1.0 / rate
    k = 0
    next_at = time.perf_counter()
    for _ in range(rounds):
        for run_id in run_ids:
            delay = next_at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            next_at += interval
            k += 1
            commits.append(append_bench_record(srv.gateway, run_id, k))
    expected = rounds * sum(live.get(r, 0) for r in run_ids)
    deadline = time.perf_counter() + settle_s
    while hub.count() < expected and time.perf_counter() < deadline:
        time.sleep(0.01)
    with hub.lock:
        lat = list(hub.latencies)
    ended = sum(1 for st in streams if st.ended and not st.done_seen)
    return {"appends": k, "expected": expected, "delivered": len(lat), "live": sum(live.values()), "ended": ended,
            "p50": percentile(lat, 50),
            "p99": percentile(lat, 99), "max": max(lat) if lat else float("nan"),
            "commit_p50": percentile(commits, 50), "commit_p99": percentile(commits, 99)}


# -- main -------------------------------------------------------------------------------------------------------


# -- the operator console (issue 12): first load and a 10,000-record ledger in headless Chromium ----------
#
# `python bench/http.py --console` runs only this section (it needs Debian's chromium and the
# `playwright` package from the `test` extra; Playwright's own browser download is not used).
# `--console-screenshots DIR` also saves the README's screenshots of the main screens there.

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
CONSOLE_FILES = ("/console", "/console/console.js", "/console/console.css")
GOAL_CONSOLE_BYTES = 100 * 1024
GOAL_CONSOLE_TTI_MS = 300.0
GOAL_CONSOLE_LEDGER_S = 2.0
TOKEN_INIT = "sessionStorage.setItem('abstractgateway.token', %s)"


def console_first_load_bytes(port: int) -> Dict[str, int]:
    """Bytes of the page and its two assets, as served (the page loads nothing else)."""
    sizes = {}
    for path in CONSOLE_FILES:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
        if resp.status != 200:
            raise RuntimeError(f"GET {path}: HTTP {resp.status}")
        sizes[path] = len(body)
    return sizes


def console_time_to_interactive(browser: Any, base: str, loads: int, signed_in: bool,
                                html_ms: Optional[List[float]] = None) -> List[float]:
    """ms from navigation start until the page is interactive, each load in a fresh context (cold cache).

    Signed out: until the sign-in form is ready. Signed in (token already in sessionStorage): until
    the runs list shows its first row, i.e. after the page has pinged and listed runs. `html_ms`
    collects when the HTML had arrived (the part of the figure that is the browser's own start)."""
    out: List[float] = []
    html_ms = [] if html_ms is None else html_ms
    for _ in range(loads):
        context = browser.new_context()
        if signed_in:
            context.add_init_script(TOKEN_INIT % json.dumps(TOKEN))
        page = context.new_page()
        page.goto(base + "/")
        if signed_in:
            ms = page.wait_for_function(
                "() => document.querySelector('#runs-body tr') ? performance.now() : false", polling="raf").json_value()
        else:
            page.wait_for_selector("body[data-ready='1']")
            ms = page.evaluate("window.consoleReadyAt")
        out.append(float(ms))
        html_ms.append(float(page.evaluate("performance.getEntriesByType('navigation')[0].responseEnd")))
        context.close()
    return out


def console_ledger_render(browser: Any, base: str, run_id: str, expected: int) -> Dict[str, float]:
    """Open a run whose ledger holds `expected` records: time until the last one is on screen, the
    longest main-thread task meanwhile, and how long expanding the last record then takes."""
    context = browser.new_context()
    context.add_init_script(TOKEN_INIT % json.dumps(TOKEN))
    context.add_init_script("window.longest = 0; new PerformanceObserver(l => l.getEntries().forEach(e => "
                            "{ window.longest = Math.max(window.longest, e.duration); }))"
                            ".observe({type: 'longtask', buffered: true});")
    page = context.new_page()
    page.goto(f"{base}/#/run/{run_id}")
    page.wait_for_selector("body[data-ready='1']")
    stream_open_ms = page.evaluate("window.consoleReadyAt")
    done_ms = page.wait_for_function(
        f"() => document.querySelector('#ledger li[data-cursor=\"{expected}\"]') ? performance.now() : false",
        polling="raf", timeout=60_000).json_value()
    longest = page.evaluate("window.longest")
    t = time.perf_counter()
    last = page.locator(f"#ledger li[data-cursor='{expected}']")
    last.click()
    last.locator("pre").wait_for()
    expand_ms = (time.perf_counter() - t) * 1000
    context.close()
    return {"done_ms": float(done_ms), "after_ready_ms": float(done_ms) - float(stream_open_ms),
            "longest_task_ms": float(longest), "expand_ms": expand_ms}


def console_fill_ledger(gateway: gw.Gateway, run_id: str, records: int) -> int:
    """Bulk-append `records` realistic-looking records (~400 bytes each) to a run's ledger."""
    base = gateway.stores.ledger.count(run_id)
    rows = []
    for i in range(1, records + 1):
        rec = {"run_id": run_id, "step_id": f"s{i:08d}", "node_id": f"node_{i % 17}", "status": "completed",
               "effect": {"type": "llm_call" if i % 3 else "tool_calls", "payload": {"i": i}},
               "result": {"output": "x" * 120, "i": i}, "started_at": "2026-01-01T00:00:00+00:00",
               "ended_at": "2026-01-01T00:00:00.010000+00:00", "attempt": 1}
        rows.append((run_id, base + i, json.dumps(rec, separators=(",", ":"))))
    gateway.stores.db.write(lambda conn: conn.executemany(gw.SqliteLedgerStore._INSERT, rows))
    return base + records


def console_screenshots(browser: Any, srv: "Server", out_dir: Path) -> List[Path]:
    """The README's pictures: sign-in, the runs list, a run waiting on a question with its ledger."""
    g = srv.gateway
    base = f"http://127.0.0.1:{srv.port}"
    for _ in range(3):
        g.start_run(bundle_id="echo", input_data={"message": "nightly report"})
    done_ask = g.start_run(bundle_id="ask")
    asking = g.start_run(bundle_id="ask", input_data={"question": "Deploy build 1432 to production? (yes / no)"})
    wait_status(g, [asking, done_ask], frozenset({"waiting"}), 30)
    wait_ledger_waiting(g, [asking, done_ask], 30)
    key = g.stores.runs.load(done_ask).waiting.wait_key
    g.submit_command(command_id="shot-answer", run_id=done_ask, type="resume",
                     payload={"wait_key": key, "payload": {"response": "Ada"}})
    wait_status(g, [done_ask], frozenset({"completed"}), 30)
    out_dir.mkdir(parents=True, exist_ok=True)
    shots = []
    context = browser.new_context(viewport={"width": 1100, "height": 720})
    page = context.new_page()
    page.goto(base + "/")
    page.wait_for_selector("body[data-ready='1']")
    page.wait_for_function("() => document.getElementById('info-runner').textContent.includes('alive')")
    shots.append(out_dir / "console-sign-in.png")
    page.screenshot(path=str(shots[-1]))
    page.fill("#signin-token", TOKEN)
    page.click("#signin-button")
    page.wait_for_selector(f"tr[data-run='{asking}']")
    shots.append(out_dir / "console-runs.png")
    page.screenshot(path=str(shots[-1]))
    page.goto(f"{base}/#/run/{asking}")
    page.wait_for_selector("#wait-prompt")
    page.wait_for_function("() => document.querySelectorAll('#ledger li').length >= 2")
    page.locator("#ledger li").last.click()
    page.locator("#wait-answer").fill("yes")
    page.wait_for_timeout(300)
    shots.append(out_dir / "console-run-question.png")
    page.screenshot(path=str(shots[-1]), full_page=True)
    context.close()
    phone = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True,
                                device_scale_factor=1)
    phone.add_init_script(TOKEN_INIT % json.dumps(TOKEN))
    page = phone.new_page()
    page.goto(f"{base}/#/run/{asking}")
    page.wait_for_selector("#wait-prompt")
    shots.append(out_dir / "console-phone.png")
    page.screenshot(path=str(shots[-1]))
    phone.close()
    return shots


def console_main(records: int, loads: int, screenshots: Optional[Path]) -> int:
    """Run the console section on its own server; print figures and the three goals."""
    from playwright.sync_api import sync_playwright

    tmp = Path(tempfile.mkdtemp(prefix="abstractgateway-bench-console-"))
    srv = Server(tmp / "console", bare=False)
    base = f"http://127.0.0.1:{srv.port}"
    try:
        print(f"AbstractGateway console benchmark  (python {platform.python_version()}, {os.cpu_count()} CPUs, "
              f"chromium {CHROMIUM}, loopback {base})")
        sizes = console_first_load_bytes(srv.port)
        total = sum(sizes.values())
        print("\nFirst load (uncompressed, as served; the page requests nothing else)")
        for path, size in sizes.items():
            print(f"   {path:<24} {size:>8,} bytes")
        print(f"   {'total':<24} {total:>8,} bytes ({total / 1024:.1f} KB)")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                console_time_to_interactive(browser, base, 1, False)  # warm the browser process, not counted
                html_ms: List[float] = []
                signed_out = console_time_to_interactive(browser, base, loads, False, html_ms)
                run_id = srv.gateway.start_run(bundle_id="ask")
                wait_status(srv.gateway, [run_id], frozenset({"waiting"}), 30)
                wait_ledger_waiting(srv.gateway, [run_id], 30)
                signed_in = console_time_to_interactive(browser, base, loads, True)
                print(f"\nTime to interactive, headless Chromium, fresh context each load ({loads} loads)")
                print(f"   sign-in page ready           p50 {statistics.median(signed_out):7.1f} ms"
                      f"   max {max(signed_out):7.1f} ms")
                print(f"   signed in, runs list shown   p50 {statistics.median(signed_in):7.1f} ms"
                      f"   max {max(signed_in):7.1f} ms")
                print(f"   (of which the HTML arriving  p50 {statistics.median(html_ms):7.1f} ms:"
                      " navigation start in a fresh browser context to the last byte of /console)")
                t = time.perf_counter()
                expected = console_fill_ledger(srv.gateway, run_id, records)
                print(f"\nLedger rendering: one run with {expected:,} records (bulk-inserted in "
                      f"{time.perf_counter() - t:.2f} s), streamed over SSE into the run page")
                rounds = [console_ledger_render(browser, base, run_id, expected) for _ in range(2)]
                best = min(rounds, key=lambda r: r["done_ms"])
                print(f"   last record on screen        {best['done_ms'] / 1000:7.2f} s after navigation start "
                      f"({best['after_ready_ms'] / 1000:.2f} s after the page was interactive; best of 2)")
                print(f"   longest main-thread task     {best['longest_task_ms']:7.0f} ms")
                print(f"   expand the last record       {best['expand_ms']:7.0f} ms (click -> its JSON on screen)")
                if screenshots is not None:  # on a server of their own, with a few ordinary runs
                    shot_srv = Server(tmp / "screenshots", bare=False)
                    try:
                        shots = console_screenshots(browser, shot_srv, screenshots)
                    finally:
                        shot_srv.close()
                    print("\nScreenshots: " + ", ".join(str(s) for s in shots))
            finally:
                browser.close()
        print("\nGoals")
        tti = statistics.median(signed_out)
        goals = [
            (f"first load < {GOAL_CONSOLE_BYTES // 1024} KB", total < GOAL_CONSOLE_BYTES, f"{total / 1024:.1f} KB"),
            (f"interactive < {GOAL_CONSOLE_TTI_MS:g} ms on loopback", tti < GOAL_CONSOLE_TTI_MS,
             f"p50 {tti:.0f} ms signed out, {statistics.median(signed_in):.0f} ms to the runs list"),
            (f"{records:,} records on screen < {GOAL_CONSOLE_LEDGER_S:g} s",
             best["done_ms"] / 1000 < GOAL_CONSOLE_LEDGER_S,
             f"{best['done_ms'] / 1000:.2f} s"),
        ]
        for name, ok, detail in goals:
            print(f"   {name:<44} {'met' if ok else 'NOT met':>8}   ({detail})")
    finally:
        srv.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


# -- --compare: the same workloads against separate server processes --------------------------------


def _spawn_server(label: str, command: List[str], data_dir: Path, extra_env: Dict[str, str]) -> Tuple[Any, int]:
    import subprocess

    pack_flows(data_dir / "flows")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ABSTRACTGATEWAY_")}
    env.update({"ABSTRACTGATEWAY_DATA_DIR": str(data_dir), "ABSTRACTGATEWAY_FLOWS_DIR": str(data_dir / "flows"),
                "ABSTRACTGATEWAY_AUTH_TOKEN": TOKEN, "ABSTRACTGATEWAY_MAX_SSE": str(STREAM_TARGET + 100),
                "ABSTRACTGATEWAY_MAX_CONCURRENCY": "256", "ABSTRACTGATEWAY_HOST": "127.0.0.1",
                "ABSTRACTGATEWAY_PORT": str(port), **extra_env})
    proc = subprocess.Popen(command + ["--host", "127.0.0.1", "--port", str(port)], env=env, cwd=str(data_dir),
                            stdout=subprocess.DEVNULL, stderr=open(data_dir / "server.log", "wb"))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if Client(port, timeout=1).call("GET", "/api/health")[0] == 200:
                return proc, port
        except OSError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{label}: server did not start (see {data_dir / 'server.log'})")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) the process has used: per-request cost that a busy machine skews less."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rate(port: int, threads: int, seconds: float, call: Callable[[Client, int, int], Tuple[int, Any]]) -> float:
    """2xx answers per second from `threads` keep-alive clients calling `call(client, thread, i)`."""
    counts = [0] * threads
    stop = time.monotonic() + seconds

    def worker(idx: int) -> None:
        client = Client(port)
        i = 0
        while time.monotonic() < stop:
            if 200 <= call(client, idx, i)[0] < 300:
                counts[idx] += 1
            i += 1
        client.close()

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    started = time.monotonic()
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    return sum(counts) / (time.monotonic() - started)


def _wait_run(client: Client, run_id: str, wanted: str, timeout: float = 30) -> Dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, body = client.call("GET", f"{API}/runs/{run_id}")
        if status == 200 and body.get("status") == wanted:
            return body
        time.sleep(0.05)
    raise RuntimeError(f"run {run_id} did not reach {wanted}")


def _timer_loop_rate(port: int, runs: int, clients: int = 4) -> float:
    """Runs/s of a flow of 10 zero-length timers (`timer_loop`, n=10, delay=0), each started and then
    polled (GET every 50 ms) by one of `clients` client threads until it completes."""
    lock = threading.Lock()
    left = [runs]

    def client_loop() -> None:
        client = Client(port)
        while True:
            with lock:
                if left[0] <= 0:
                    break
                left[0] -= 1
            run_id = checked(client.call("POST", f"{API}/runs/start", {
                "bundle_id": "timer_loop", "input_data": {"n": 10, "delay": 0}}), "start timer_loop")["run_id"]
            _wait_run(client, run_id, "completed", timeout=120)
        client.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return runs / (time.perf_counter() - started)


def _completed_echo_run(port: int) -> str:
    client = Client(port)
    run_id = checked(client.call("POST", f"{API}/runs/start", {"bundle_id": "echo", "input_data": {}}),
                     "start")["run_id"]
    _wait_run(client, run_id, "completed")
    client.close()
    return run_id


def _measure_requests(proc: Any, port: int, run_id: str, seconds: float) -> Dict[str, float]:
    """One round of the request-rate phases on one server: GET with 1 and 16 threads (with the server's
    CPU per request), acknowledged POST commands with 8."""
    out: Dict[str, float] = {}
    for threads in (1, 16):
        cpu = _cpu_s(proc.pid)
        out[f"get{threads}"] = _rate(port, threads, seconds, lambda c, t, i: c.call("GET", f"{API}/runs/{run_id}"))
        out[f"get{threads}_cpu"] = (_cpu_s(proc.pid) - cpu) * 1000 / max(1.0, out[f"get{threads}"] * seconds)
    tag = uuid.uuid4().hex[:8]
    cpu = _cpu_s(proc.pid)
    out["post8"] = _rate(port, 8, seconds, lambda c, t, i: c.call("POST", f"{API}/commands", {
        "command_id": f"{tag}-{t}-{i}", "run_id": run_id, "type": "pause"}))
    out["post8_cpu"] = (_cpu_s(proc.pid) - cpu) * 1000 / max(1.0, out["post8"] * seconds)
    return out


def _measure_flows(proc: Any, port: int, seconds: float, streams: int) -> Dict[str, Any]:
    """The timer-loop flow and the SSE phase on one server."""
    client = Client(port)
    out: Dict[str, Any] = {"timer_runs_s": _timer_loop_rate(port, runs=12 if seconds < 2 else 30)}
    out.update(_measure_sse(client, proc, port, streams))
    client.close()
    return out


def _measure_sse(client: Client, proc: Any, port: int, streams: int) -> Dict[str, Any]:
    """SSE: `streams` streams over WAITING `ask` runs (10 per run), then one resume per run, paced:
    latency = first new record on each of the run's streams minus the moment the resume was sent."""
    out: Dict[str, Any] = {}
    runs = []
    for _ in range(max(1, streams // 10)):
        runs.append(checked(client.call("POST", f"{API}/runs/start", {"bundle_id": "ask", "input_data": {}}),
                            "start ask")["run_id"])
    waits = {r: _wait_run(client, r, "waiting")["waiting"]["wait_key"] for r in runs}
    opened: List[SSEStream] = []
    step_times: Dict[int, List[float]] = {}  # id(stream) -> arrival time of each step event
    sel = selectors.DefaultSelector()
    stop = threading.Event()

    def on_event(stream: SSEStream, event: str, _data: str) -> None:
        if event == "step":
            step_times[id(stream)].append(time.perf_counter())

    for r in runs:
        for _ in range(10):
            stream = SSEStream(port, r)
            stream.sock.setblocking(False)
            step_times[id(stream)] = []
            opened.append(stream)
    for stream in opened:
        sel.register(stream.sock, selectors.EVENT_READ, stream)
    reader = threading.Thread(target=_read_streams, args=(sel, stop, on_event), daemon=True)
    reader.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not all(step_times[id(s)] or s.ended for s in opened):
        time.sleep(0.1)
    time.sleep(1.0)
    out["streams_open"] = sum(1 for s in opened if s.status == 200 and not s.ended)
    out["rss_streams_mb"] = _rss_mb(proc.pid)
    latencies = _resume_latencies(client, runs, waits, opened, step_times)
    stop.set()
    reader.join(5)
    sel.close()
    for s in opened:
        s.close()
    out["sse_p50"], out["sse_p99"] = percentile(latencies, 50), percentile(latencies, 99)
    out["sse_samples"] = len(latencies)
    return out


def _read_streams(sel: selectors.BaseSelector, stop: threading.Event,
                  on_event: Callable[[SSEStream, str, str], None]) -> None:
    """Feed each readable stream registered on `sel` until `stop` is set; an ended one is dropped."""
    while not stop.is_set():
        for key, _ in sel.select(0.02):
            try:
                data = key.fileobj.recv(262144)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            key.data.feed(data, on_event)
            if key.data.ended:
                sel.unregister(key.fileobj)


def _resume_latencies(client: Client, runs: List[str], waits: Dict[str, str], opened: List[SSEStream],
                      step_times: Dict[int, List[float]]) -> List[float]:
    """Resume each run in turn; ms from the resume to the first new step on each of its open streams."""
    latencies: List[float] = []
    for r in runs:
        mine = [s for s in opened if s.run_id == r and s.status == 200 and not s.ended]
        seen = {id(s): len(step_times[id(s)]) for s in mine}
        sent = time.perf_counter()
        client.call("POST", f"{API}/commands", {"command_id": f"go-{r}", "run_id": r, "type": "resume",
                                                "payload": {"wait_key": waits[r], "payload": {"response": "x"}}})
        pending = set(seen)
        until = time.monotonic() + 10
        while pending and time.monotonic() < until:
            for key in list(pending):
                times = step_times[key]
                if len(times) > seen[key]:
                    latencies.append((times[seen[key]] - sent) * 1000)
                    pending.discard(key)
            time.sleep(0.0005)
    return latencies


def compare(args: argparse.Namespace) -> int:
    """Run the comparison workloads on this checkout, on `--before` (a checkout of an earlier version,
    e.g. `git archive main | tar -x -C DIR`), and on the original gateway (`--original`: its
    `abstractgateway` executable), each as its own server process."""
    raise_nofile(4 * STREAM_TARGET + 1024)
    seconds = 1.0 if args.quick else 3.0
    streams = 200 if args.quick else STREAM_TARGET
    tmp = Path(tempfile.mkdtemp(prefix="abstractgateway-bench-compare-"))
    ours_env = {"ABSTRACTGATEWAY_SQLITE_SYNCHRONOUS": "FULL", "ABSTRACTGATEWAY_MAX_THREADS": str(STREAM_TARGET + 200),
                "ABSTRACTGATEWAY_MAX_CONNECTIONS": str(4 * STREAM_TARGET)}
    targets = [("after (this checkout)", [sys.executable, str(ROOT / "abstractgateway.py"), "serve"], ours_env)]
    if args.before:
        targets.append(("before (" + args.before + ")",
                        [sys.executable, str(Path(args.before) / "abstractgateway.py"), "serve"], ours_env))
    if args.original:
        targets.append(("original 0.2.1 (uvicorn)", [args.original, "serve"],
                        {"ABSTRACTGATEWAY_STORE_BACKEND": "sqlite"}))
    results: List[Dict[str, Any]] = []
    servers: List[Tuple[str, Any, int]] = []
    try:
        for i, (label, command, env) in enumerate(targets):
            proc, port = _spawn_server(label, command, tmp / f"s{i}", env)
            servers.append((label, proc, port))
        # The request rates take turns, server after server, round after round, and the median of each
        # figure is reported: a machine whose speed drifts (a shared host) then skews every server alike.
        run_ids = [_completed_echo_run(port) for _label, _proc, port in servers]
        rounds: List[List[Dict[str, float]]] = [[] for _ in servers]
        for n in range(args.rounds):
            for i, (label, proc, port) in enumerate(servers):
                print(f"round {n + 1}/{args.rounds}: requests on {label} ...", flush=True)
                rounds[i].append(_measure_requests(proc, port, run_ids[i], seconds))
                time.sleep(1.0)  # its work after the acknowledgements (applying the commands) ends off the clock
        for i, (label, proc, port) in enumerate(servers):
            print(f"flows and streams on {label} ...", flush=True)
            out: Dict[str, Any] = {"label": label}
            out.update({key: statistics.median(r[key] for r in rounds[i]) for key in rounds[i][0]})
            try:
                out.update(_measure_flows(proc, port, seconds, streams))
            except Exception as exc:  # noqa: BLE001 - one server failing still prints the others
                print(f"   {label}: {type(exc).__name__}: {exc}")
                continue
            results.append(out)
    finally:
        for _label, proc, _port in servers:
            proc.terminate()
            try:
                proc.wait(10)
            except Exception:  # noqa: BLE001
                proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nSame run, same machine ({os.cpu_count()} cores); clients are threads of this process; "
          f"ours at synchronous=FULL, the original at its own default. Request rates: median of "
          f"{args.rounds} rounds taken in turns.")
    cols = [("GET runs/{id} 1 thr (req/s)", "get1", "{:,.0f}"), ("GET runs/{id} 16 thr (req/s)", "get16", "{:,.0f}"),
            ("  server CPU per GET, 1 thr (ms)", "get1_cpu", "{:.3f}"),
            ("  server CPU per GET, 16 thr (ms)", "get16_cpu", "{:.3f}"),
            ("POST commands 8 thr (acked/s)", "post8", "{:,.0f}"),
            ("  server CPU per command (ms)", "post8_cpu", "{:.3f}"),
            ("10-timer loop flow (runs/s)", "timer_runs_s", "{:.1f}"), ("SSE streams open", "streams_open", "{:,}"),
            ("RSS with those streams (MB)", "rss_streams_mb", "{:,.0f}"),
            ("resume->SSE record p50 (ms)", "sse_p50", "{:.1f}"), ("resume->SSE record p99 (ms)", "sse_p99", "{:.1f}")]
    print(f"   {'measure':<32}" + "".join(f"{r['label'][:26]:>28}" for r in results))
    for name, key, fmt in cols:
        print(f"   {name:<32}" + "".join(f"{fmt.format(r[key]):>28}" for r in results))
    return 0 if results else 1


def _print_request_rates(srv: Server, target: str, seconds: float, results: Dict[str, Any]) -> None:
    """Phase a.: GET and POST rates with 1 and 16 clients (kept in `results` as GET1, GET16, POST1, POST16)."""
    for kind, label in (("GET", f"GET {API}/runs/{{id}}"), ("POST", f"POST {API}/commands")):
        for threads in (1, 16):
            r = phase_requests(srv, target, threads, seconds, kind)
            results[f"{kind}{threads}"] = r
            errs = ", ".join(f"{k}: {v}" for k, v in sorted(r["errors"].items())) or "-"
            print(f"   {label:<34} {threads:>7} {r['ok']:>7} {r['rps']:>8.0f}  {errs}")


def _print_summary(results: Dict[str, Any], held: int) -> None:
    """The headline figures of every phase, then which goals are met."""
    b, c, d, e = results["done"], results["replay"], results["sse100"], results["sse_many"]
    print("\nResults")
    print(f"   {'measure':<52} {'value':>16}")
    rows = [
        ("GET runs/{id}, 1 client (req/s)", f"{results['GET1']['rps']:,.0f}"),
        ("GET runs/{id}, 16 clients (req/s)", f"{results['GET16']['rps']:,.0f}"),
        ("POST commands, 1 client (req/s)", f"{results['POST1']['rps']:,.0f}"),
        ("POST commands, 16 clients (req/s)", f"{results['POST16']['rps']:,.0f}"),
        ("runs/start -> SSE done p50 / p99 (ms)", f"{b['p50']:.1f} / {b['p99']:.1f}"),
        (f"ledger replay ({c['records']:,} records) (records/s)", f"{c['rps']:,.0f}"),
        ("SSE append->client, 100 streams p50 / p99 (ms)", f"{d['p50']:.2f} / {d['p99']:.2f}"),
        ("concurrent SSE streams held", f"{held:,}"),
        (f"SSE append->client, {e['live']:,} streams p50 / p99 (ms)", f"{e['p50']:.2f} / {e['p99']:.2f}"),
    ]
    for name, value in rows:
        print(f"   {name:<52} {value:>16}")
    print("\nGoals")
    goals = [
        (f"SSE p99 <= {GOAL_SSE_P99_MS:g} ms with 100 streams", d["p99"] <= GOAL_SSE_P99_MS and d["live"] >= 100
         and d["delivered"] == d["expected"],
         f"p99 {d['p99']:.2f} ms, {d['live']} live streams, {d['delivered']}/{d['expected']} delivered"),
        (f"ledger replay >= {GOAL_REPLAY_RPS:,} records/s", c["rps"] >= GOAL_REPLAY_RPS, f"{c['rps']:,.0f}/s"),
        (f"{STREAM_TARGET:,} concurrent SSE streams held", held >= STREAM_TARGET, f"{held:,} held"),
    ]
    for name, ok, detail in goals:
        print(f"   {name:<44} {'met' if ok else 'NOT met':>8}   ({detail})")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="scale counts and durations down")
    parser.add_argument("--bare", action="store_true", help="serve GatewayApp without the security middlewares")
    parser.add_argument("--console", action="store_true",
                        help="only the operator console section"
                             " (first load, time to interactive, 10,000-record ledger)")
    parser.add_argument("--console-screenshots", type=Path, metavar="DIR",
                        help="with --console: also save screenshots of the main screens in DIR")
    parser.add_argument("--compare", action="store_true",
                        help="compare server processes instead: this checkout, --before and --original")
    parser.add_argument("--before", help="with --compare: a directory holding an earlier abstractgateway.py")
    parser.add_argument("--original", help="with --compare: the original gateway's `abstractgateway` executable")
    parser.add_argument("--rounds", type=int, default=3,
                        help="with --compare: rounds of the request-rate phases, taken server after server")
    args = parser.parse_args(argv)
    if args.console:
        return console_main(records=10_000, loads=5 if args.quick else 15, screenshots=args.console_screenshots)
    if args.compare:
        return compare(args)
    q = args.quick
    seconds = 0.5 if q else 2.0
    done_samples = 15 if q else 50
    replay_records = 20_000 if q else 100_000
    sse_runs = 100
    sse_rounds = 3 if q else 10
    big_rounds = 1 if q else 3
    append_rate = 500.0

    nofile = raise_nofile(4 * STREAM_TARGET + 1024)
    tmp = Path(tempfile.mkdtemp(prefix="abstractgateway-bench-http-"))
    live: List[Any] = []  # the current phase's server and stream hub, closed in `finally`
    failed = False
    results: Dict[str, Any] = {}

    def fresh_server(name: str) -> Server:
        """Each phase gets its own server, so one phase's streams and connections never weigh on the next."""
        close_live()
        srv = Server(tmp / name, args.bare)
        live.append(srv)
        return srv

    def close_live() -> None:
        while live:
            item = live.pop()
            try:
                item.stop() if isinstance(item, StreamHub) else item.close()
            except Exception as exc:  # noqa: BLE001
                print(f"   (cleanup: {type(exc).__name__}: {exc})")

    def leak_note(srv: Server) -> str:
        st = proc_status()
        return (f"[process now: {st['fds']} open fds, {len(getattr(srv.gateway.stores.db, '_all_connections', []))} "
                f"SQLite connections, {st['threads']} threads]")

    try:
        srv = fresh_server("a")
        cfg = srv.gateway.config
        print(f"AbstractGateway HTTP benchmark  (python {platform.python_version()}, {os.cpu_count()} CPUs, "
              f"{platform.system()} {platform.release()}){'  [--quick]' if q else ''}")
        print(f"server 127.0.0.1, {srv.stack}; synchronous={cfg.synchronous} tick_workers={cfg.tick_workers} "
              f"max_threads={cfg.max_threads} max_sse={cfg.max_sse} max_concurrency={cfg.max_concurrency}; "
              f"RLIMIT_NOFILE={nofile[0]}; a fresh server (new temp data dir) per phase")
        boot = proc_status()

        # -- a. ---------------------------------------------------------------------------------------
        client = Client(srv.port)
        target = checked(client.call("POST", f"{API}/runs/start", {"bundle_id": "echo"}), "runs/start")["run_id"]
        client.close()
        if wait_status(srv.gateway, [target], gw.TERMINAL_STATUSES, 30):
            raise RuntimeError("the echo run never completed (is the runner working?)")
        print(f"\na. requests/s (http.client keep-alive clients, {seconds:g} s per row; 2xx only)")
        print(f"   {'request':<34} {'clients':>7} {'ok':>7} {'req/s':>8}  errors")
        _print_request_rates(srv, target, seconds, results)
        print(f"   {leak_note(srv)}")

        # -- b. ---------------------------------------------------------------------------------------
        srv = fresh_server("b")
        print(f"\nb. POST runs/start -> SSE `event: done` (echo flow, {done_samples} samples, sequential)")
        b = phase_start_to_done(srv, done_samples)
        results["done"] = b
        print(f"   n={b['n']} failures={b['failures']}  p50 {b['p50']:.2f} ms  p99 {b['p99']:.2f} ms  "
              f"max {b['max']:.2f} ms")

        # -- c. ---------------------------------------------------------------------------------------
        srv = fresh_server("c")
        print(f"\nc. ledger replay over HTTP ({replay_records:,} records, GET .../ledger?after=N&limit=2000, "
              "client parses JSON; best of 2)")
        client = Client(srv.port)
        replay_run = checked(client.call("POST", f"{API}/runs/start", {"bundle_id": "echo"}), "runs/start")["run_id"]
        client.close()
        wait_status(srv.gateway, [replay_run], gw.TERMINAL_STATUSES, 30)
        c = phase_replay(srv, replay_run, replay_records)
        results["replay"] = c
        print(f"   bulk insert {c['insert_s']:.2f} s; record ~{c['avg_bytes']:.0f} B; read {c['records']:,} records "
              f"in {c['elapsed']:.3f} s = {c['rps']:,.0f} records/s ({c['mib_s']:.1f} MiB/s)")

        # -- d. ---------------------------------------------------------------------------------------
        srv = fresh_server("de")
        g = srv.gateway
        ask_runs = [g.start_run(bundle_id="ask") for _ in range(sse_runs)]
        if wait_status(g, ask_runs, frozenset({"waiting"}), 60):
            raise RuntimeError("ask runs never reached WAITING")
        wait_ledger_waiting(g, ask_runs, 30)
        hub = StreamHub().start()
        live.append(hub)  # closed before the server
        print(f"\nd. SSE append -> client latency, {sse_runs} streams (one per waiting ask run), "
              f"{sse_rounds} appends per run at {append_rate:g} appends/s")
        opened = open_streams(srv, hub, ask_runs, 1, sse_runs)
        print(f"   streams held: {len(opened['held'])}/{sse_runs}" + (f" (refused: {opened['reason']})"
                                                                       if opened["reason"] else ""))
        d = phase_sse_latency(srv, hub, ask_runs, sse_rounds, append_rate, opened["held"])
        results["sse100"] = d
        print(f"   delivered {d['delivered']}/{d['expected']} to {d['live']} live streams  p50 {d['p50']:.2f} ms  "
              f"p99 {d['p99']:.2f} ms  max {d['max']:.2f} ms   (append commit p50 {d['commit_p50']:.2f} ms, "
              f"p99 {d['commit_p99']:.2f} ms)")
        print(f"   {leak_note(srv)}")

        # -- e. ---------------------------------------------------------------------------------------
        print(f"\ne. concurrent SSE streams (target {STREAM_TARGET:,}: up to {STREAM_TARGET // sse_runs} per run over "
              f"the same {sse_runs} ask runs, {len(opened['held'])} already open; opened in batches of 50, each "
              "batch checked alive after 0.4 s)")
        before = proc_status()
        more = open_streams(srv, hub, ask_runs, STREAM_TARGET // sse_runs - 1, STREAM_TARGET - len(opened["held"]))
        streams = [st for st in opened["held"] + more["held"] if not st.ended]
        held = len(streams)
        after = proc_status()
        per_stream = (after["rss_mib"] - before["rss_mib"]) * 1024 / max(1, len(more["held"]))
        print(f"   streams held: {held:,}/{STREAM_TARGET:,} (opened {len(more['held'])} more in {more['open_s']:.1f} s)"
              + (f"; stopped by: {more['reason']} (highest fd in the process {more['max_fd']})"
                 if more["reason"] else ""))
        print(f"   process: RSS {boot['rss_mib']:.0f} MiB at start -> {after['rss_mib']:.0f} MiB "
              f"(~{per_stream:.0f} KiB per extra stream)  {leak_note(srv)}")
        cpu0 = time.process_time()
        time.sleep(1.0)
        print(f"   CPU used by the process with {held:,} idle streams: {(time.process_time() - cpu0) * 100:.0f}% "
              "of one core")
        e = phase_sse_latency(srv, hub, ask_runs, big_rounds, append_rate / 2, streams)
        results["sse_many"] = e
        print(f"   {e['appends']} appends at {append_rate / 2:g}/s fanned out to {e['live']:,} live streams: delivered "
              f"{e['delivered']:,}/{e['expected']:,}  p50 {e['p50']:.2f} ms  p99 {e['p99']:.2f} ms  "
              f"max {e['max']:.2f} ms   (append commit p50 {e['commit_p50']:.2f} ms, p99 {e['commit_p99']:.2f} ms)")
        close_live()

        _print_summary(results, held)
    except Exception as exc:  # noqa: BLE001 - report, clean up, exit non-zero
        import traceback

        traceback.print_exc()
        print(f"\nbenchmark aborted: {type(exc).__name__}: {exc}")
        failed = True
    finally:
        close_live()
        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
