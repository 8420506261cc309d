"""Benchmark of the routes thin clients call: workspace files, attachments, kg/query.

A benchmark, not a test: it prints figures and exits 0 whatever they are.

Setup, in this one process: a `Gateway` over a fresh SQLite file in a temporary directory and
the full WSGI stack (`build_wsgi`, security middlewares on) served by `HttpServer` on
127.0.0.1, no runner. One workspace mount `bench` holds `--files` small files in 100
directories plus one 16 MiB log; the KG store gets `--triples` assertions in one session.

Phases (one `http.client` keep-alive connection; medians of repeated calls):
a. `GET files/search` over the whole mount: cold (walks the tree) and warm (the file list is reused
   for `FILES_INDEX_TTL_S`).
b. `GET files/read` of the first page of the 16 MiB log, and of a range near the scan cap.
c. `GET files/skim` of the 16 MiB log (scans up to the 16 MiB cap).
d. `POST attachments/upload` of a 20 MiB file (multipart), MiB/s including the durable commit.
e. `POST kg/query` for the session scope, `limit=500`.

    python bench/client_routes.py            # about 30 s on 2 cores
    python bench/client_routes.py --quick
"""

from __future__ import annotations

import os
import sys

# bench/http.py would shadow the stdlib `http` package for a script run from this directory.
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import argparse  # noqa: E402
import http.client  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import abstractgateway as gw  # noqa: E402

TOKEN = "bench-token-0123456789abcdef0123"


def _timed(conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None = None,
           headers: dict | None = None) -> tuple[float, int, bytes]:
    hdrs = {"Authorization": f"Bearer {TOKEN}", **(headers or {})}
    start = time.perf_counter()
    conn.request(method, path, body=body, headers=hdrs)
    resp = conn.getresponse()
    data = resp.read()
    return time.perf_counter() - start, resp.status, data


def _median_ms(conn, reps: int, method: str, path: str, body=None, headers=None) -> str:
    times = []
    for _ in range(reps):
        elapsed, status, data = _timed(conn, method, path, body, headers)
        if status != 200:
            raise SystemExit(f"{method} {path}: HTTP {status}: {data[:200]!r}")
        times.append(elapsed)
    return f"{statistics.median(times) * 1000:.1f} ms (median of {reps})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--files", type=int, default=20_000)
    parser.add_argument("--triples", type=int, default=10_000)
    args = parser.parse_args()
    files, triples, reps = (2_000, 1_000, 3) if args.quick else (args.files, args.triples, 7)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "mount"
        for i in range(files):
            folder = root / f"dir{i % 100:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"file_{i:06d}.py").write_text(f"# file {i}\n")
        line = b"2026-01-01T00:00:00Z INFO something happened here\n"
        (root / "big.log").write_bytes(line * (16 * 1024 * 1024 // len(line)))
        data_dir = Path(tmp) / "data"
        config = gw.Config.load(environ={"ABSTRACTGATEWAY_DATA_DIR": str(data_dir), "ABSTRACTGATEWAY_AUTH_TOKEN": TOKEN,
                                         "ABSTRACTGATEWAY_WORKSPACE_MOUNTS": f"bench={root}"})
        gateway = gw.Gateway(config)
        from abstractmemory import SQLiteTripleStore, TripleAssertion

        store = SQLiteTripleStore(data_dir / "abstractmemory" / "kg.sqlite3")
        store.add([TripleAssertion(f"entity{i}", "schema:knows", f"entity{i + 1}", scope="session",
                                   owner_id="session_memory_bench") for i in range(triples)])
        store.close()
        wsgi, _app, _policy = gw.build_wsgi(gateway)
        server = gw.HttpServer(wsgi, "127.0.0.1", 0, **gw.server_options(gateway))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        conn = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=120)
        api = "/api/gateway"
        try:
            print(f"mount: {files:,} files in 100 dirs + a 16 MiB log; KG: {triples:,} assertions")
            cold, _status, _data = _timed(conn, "GET", f"{api}/files/search?query=file_0001&limit=20")
            print(f"a. files/search, cold (walks mount):  {cold * 1000:.1f} ms")
            print("   files/search, warm (cached list): ",
                  _median_ms(conn, reps, "GET", f"{api}/files/search?query=file_0002&limit=20"))
            print("b. files/read first page of 16 MiB:  ",
                  _median_ms(conn, reps, "GET", f"{api}/files/read?path=bench/big.log"))
            print("   files/read lines 300000-300010:   ",
                  _median_ms(conn, reps, "GET",
                             f"{api}/files/read?path=bench/big.log&start_line=300000&end_line=300010"))
            print("c. files/skim of 16 MiB:             ",
                  _median_ms(conn, reps, "GET", f"{api}/files/skim?path=bench/big.log"))
            payload = b"\x00\x01" * (10 * 1024 * 1024)
            boundary = uuid.uuid4().hex
            body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"session_id\"\r\n\r\nbench\r\n"
                    f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"blob.bin\"\r\n"
                    f"Content-Type: application/octet-stream\r\n\r\n").encode() + payload \
                + f"\r\n--{boundary}--\r\n".encode()
            times = []
            for _ in range(max(2, reps // 2)):
                elapsed, status, data = _timed(conn, "POST", f"{api}/attachments/upload", body,
                                               {"Content-Type": f"multipart/form-data; boundary={boundary}"})
                if status != 200:
                    raise SystemExit(f"upload: HTTP {status}: {data[:200]!r}")
                times.append(elapsed)
            best = min(times)
            print(f"d. attachments/upload of 20 MiB:      {best * 1000:.0f} ms best, {20 / best:.0f} MiB/s")
            query = json.dumps({"session_id": "bench", "limit": 500}).encode()
            print("e. kg/query session scope, limit 500:", _median_ms(conn, reps, "POST", f"{api}/kg/query", query,
                                                                      {"Content-Type": "application/json"}))
        finally:
            conn.close()
            server.shutdown()
            gateway.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
