"""Footprint benchmark: installed size, .pyz size, cold start, idle RSS, RSS with 100 SSE streams.

This is a benchmark, not a test: it prints figures and goals (met / not met) and exits 0
whatever they are (non-zero only if a phase cannot run at all, e.g. `pip install .` fails).

Phases:

1. Installed size: a fresh venv in a temporary directory (`python -m venv`), then
   `pip install <repo root>` (non-editable; needs PyPI). Size of what that install added to
   site-packages (every distribution except the venv's own pip/setuptools, measured from
   the files on disk, bytecode caches included) and the number of distributions, with a
   per-distribution breakdown.
2. `.pyz` size: `--pyz PATH`, else `dist/abstractgateway.pyz`, built with
   `packaging/build_pyz.sh` if missing.
3. Cold start to healthy: median (and min/max) of 10 spawns of
   `<venv>/bin/abstractgateway serve --port <free> --data-dir <fresh tmp dir>`, timed from
   just before the spawn to the first 200 of `GET /api/health` (polled every ~5 ms over a new
   loopback connection each time); then SIGTERM and wait for exit. Each run has an empty
   data dir, so the time includes creating the SQLite database, applying the schema and
   generating the API token.
4. Idle RSS: VmRSS from /proc/<pid>/status 1 s after the server became healthy (median).
5. RSS with 100 SSE streams: a server over a data dir holding `ask@1.0.0.flow` (packed from
   tests/flows/ask.json before the start; `ask` waits for a user answer), one run started
   with `POST /api/gateway/runs/start {"bundle_id": "ask"}`, then 100 raw-socket
   connections to `GET /api/gateway/runs/{id}/ledger/stream`, each read until its response
   headers (and first bytes) arrived. RSS and thread count once all are open.
   ABSTRACTGATEWAY_MAX_SSE is raised to 200 for this phase (the default, 32, would answer 429).

Usage (from the repository root):

    python bench/startup.py
    python bench/startup.py --pyz dist/abstractgateway.pyz --runs 10 --streams 100

Only loopback traffic; temporary directories are removed and every server is stopped.
"""

from __future__ import annotations

import os
import sys

# bench/http.py sits beside this file: when run as a script this directory is sys.path[0],
# where it would shadow the stdlib `http` package. Drop that entry before importing `http`.
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import argparse  # noqa: E402
import http.client  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Dict, List, Optional, Tuple  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
FLOWS = REPO / "tests" / "flows"
TOKEN = "bench-startup-" + "x" * 40

GOAL_INSTALLED_MB = 15.0
GOAL_HEALTHY_S = 0.25
GOAL_IDLE_RSS_MB = 35.0

MEASURE_SITE = r"""
import importlib.metadata as md, json, os, sys, sysconfig
site = sysconfig.get_paths()["purelib"]
out = {}
owned = set()
for dist in md.distributions():
    name = dist.metadata["Name"]
    total = 0
    dirs = set()
    for f in dist.files or ():
        p = os.path.normpath(os.path.join(site, str(f)))
        if not p.startswith(site + os.sep):
            continue  # console scripts in bin/
        owned.add(p)
        top = os.path.relpath(p, site).split(os.sep)[0]
        if not top.endswith(".dist-info") and os.path.isdir(os.path.join(site, top)):
            dirs.add(os.path.join(site, top))
        try:
            total += os.path.getsize(p)
        except OSError:
            pass
    # __pycache__ written after install (not in RECORD) counts for the package that owns the dir
    for d in dirs:
        for root, _sub, files in os.walk(d):
            for fn in files:
                p = os.path.join(root, fn)
                if p not in owned:
                    owned.add(p)
                    total += os.path.getsize(p)
    out[name] = out.get(name, 0) + total
grand = 0
for root, _sub, files in os.walk(site):
    for fn in files:
        grand += os.path.getsize(os.path.join(root, fn))
print(json.dumps({"site": site, "dists": out, "total": grand}))
"""

PACK_FLOW = r"""
import sys
from pathlib import Path
from abstractruntime.workflow_bundle import pack_workflow_bundle
flows, out = Path(sys.argv[1]), Path(sys.argv[2])
out.parent.mkdir(parents=True, exist_ok=True)
pack_workflow_bundle(root_flow_json=flows / "ask.json", out_path=out, bundle_id="ask",
                     bundle_version="1.0.0", flows_dir=flows)
"""


def mb(n: float) -> float:
    return n / (1024 * 1024)


def goal(ok: bool) -> str:
    return "met" if ok else "NOT met"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kb(pid: int) -> Tuple[int, int]:
    """(VmRSS kB, threads) of a process."""
    rss = threads = 0
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
    return rss, threads


def health_once(port: int) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
        conn.request("GET", "/api/health")
        ok = conn.getresponse().status == 200
        conn.close()
        return ok
    except OSError:
        return False


class Served:
    """`abstractgateway serve` in a child process."""

    def __init__(self, exe: Path, data_dir: Path, env: Optional[Dict[str, str]] = None) -> None:
        self.port = free_port()
        self.data_dir = data_dir
        environ = {k: v for k, v in os.environ.items() if not k.startswith("ABSTRACTGATEWAY_")}
        environ.update(env or {})
        self.log = open(data_dir.parent / f"{data_dir.name}.log", "w")
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen([str(exe), "serve", "--port", str(self.port), "--data-dir", str(data_dir)],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=environ)

    def wait_healthy(self, timeout: float = 30.0) -> float:
        deadline = self.t0 + timeout
        while time.perf_counter() < deadline:
            if health_once(self.port):
                return time.perf_counter() - self.t0
            if self.proc.poll() is not None:
                break
            time.sleep(0.005)
        self.stop()
        raise RuntimeError(f"server not healthy (exit {self.proc.returncode}): "
                           f"{(self.data_dir.parent / f'{self.data_dir.name}.log').read_text()[-2000:]}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


def phase_install(tmp: Path) -> Tuple[Path, dict]:
    venv = tmp / "venv"
    print(f"[1] fresh venv + `pip install {REPO}` ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    t = time.perf_counter()
    subprocess.run([str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(REPO)],
                   check=True, stderr=subprocess.DEVNULL if os.environ.get("BENCH_QUIET_PIP") else None)
    took = time.perf_counter() - t
    info = json.loads(subprocess.run([str(py), "-c", MEASURE_SITE], check=True, capture_output=True,
                                     text=True).stdout)
    info["install_s"] = took
    return venv, info


def report_install(info: dict) -> float:
    base = {"pip", "setuptools"}
    dists = {k: v for k, v in info["dists"].items() if k.lower() not in base}
    venv_own = sum(v for k, v in info["dists"].items() if k.lower() in base)
    added = sum(dists.values())
    print(f"    pip install took {info['install_s']:.1f} s")
    print(f"    site-packages total {mb(info['total']):.2f} MB (of which the venv's own pip/setuptools "
          f"{mb(venv_own):.2f} MB)")
    print(f"    installed by `pip install .`: {mb(added):.2f} MB in {len(dists)} packages "
          f"(files on disk incl. __pycache__)")
    for name, size in sorted(dists.items(), key=lambda kv: -kv[1]):
        print(f"      {name:<22} {mb(size):7.2f} MB")
    print(f"    goal <= {GOAL_INSTALLED_MB:g} MB installed: {goal(mb(added) <= GOAL_INSTALLED_MB)}")
    return mb(added)


def phase_pyz(path: Optional[str]) -> Optional[Path]:
    pyz = Path(path) if path else REPO / "dist" / "abstractgateway.pyz"
    if not pyz.exists() and not path:
        print("[2] dist/abstractgateway.pyz missing: packaging/build_pyz.sh ...", flush=True)
        res = subprocess.run(["bash", str(REPO / "packaging" / "build_pyz.sh"), "--no-verify"],
                             capture_output=True, text=True)
        if res.returncode != 0:
            print(res.stdout[-2000:], res.stderr[-2000:])
            return None
    if not pyz.exists():
        print(f"[2] .pyz: {pyz} not found")
        return None
    print(f"[2] .pyz {pyz}: {mb(pyz.stat().st_size):.2f} MB")
    return pyz


def phase_start(exe: Path, tmp: Path, runs: int) -> Tuple[List[float], List[int]]:
    print(f"[3] cold start to healthy /api/health, {runs} runs (fresh data dir each) ...", flush=True)
    times: List[float] = []
    rss: List[int] = []
    for i in range(runs):
        srv = Served(exe, tmp / f"start-{i}")
        try:
            times.append(srv.wait_healthy())
            time.sleep(1.0)
            rss.append(rss_kb(srv.proc.pid)[0])
        finally:
            code = srv.stop()
        if code != 0:
            print(f"    run {i}: exit code {code} after SIGTERM")
    return times, rss


def open_stream(port: int, path: str) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: text/event-stream\r\n"
               f"Authorization: Bearer {TOKEN}\r\n\r\n").encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            raise RuntimeError(f"stream closed before headers: {data[:200]!r}")
        data += chunk
    status = data.split(b"\r\n", 1)[0]
    if b" 200 " not in status + b" ":
        raise RuntimeError(f"stream refused: {data[:300]!r}")
    return s


def phase_streams(venv: Path, exe: Path, tmp: Path, n: int) -> Optional[Tuple[int, int, int, int]]:
    print(f"[5] RSS with {n} open SSE streams on one waiting `ask` run ...", flush=True)
    data_dir = tmp / "sse"
    subprocess.run([str(venv / "bin" / "python"), "-c", PACK_FLOW, str(FLOWS),
                    str(data_dir / "flows" / "ask@1.0.0.flow")],
                   check=True)
    srv = Served(exe, data_dir, env={"ABSTRACTGATEWAY_AUTH_TOKEN": TOKEN,
                                     "ABSTRACTGATEWAY_MAX_SSE": str(n + 100),
                                     "ABSTRACTGATEWAY_MAX_THREADS": str(n + 200)})
    socks: List[socket.socket] = []
    try:
        srv.wait_healthy()
        time.sleep(0.5)
        before = rss_kb(srv.proc.pid)
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
        conn.request("POST", "/api/gateway/runs/start", body=json.dumps({"bundle_id": "ask"}),
                     headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
        if resp.status // 100 != 2:
            raise RuntimeError(f"runs/start answered {resp.status}: {body[:300]!r}")
        run_id = json.loads(body)["run_id"]
        path = f"/api/gateway/runs/{run_id}/ledger/stream"
        for _ in range(n):
            socks.append(open_stream(srv.port, path))
        time.sleep(1.0)
        after = rss_kb(srv.proc.pid)
        return before[0], before[1], after[0], after[1]
    finally:
        for s in socks:
            s.close()
        code = srv.stop()
        if code != 0:
            print(f"    server exit code {code} after SIGTERM")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--pyz", help="the .pyz to measure (default dist/abstractgateway.pyz, built if missing)")
    ap.add_argument("--runs", type=int, default=10, help="cold starts to time (default 10)")
    ap.add_argument("--streams", type=int, default=100, help="SSE streams to hold (default 100)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (venv, data dirs, logs)")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="abstractgateway-startup-"))
    try:
        print(f"python {sys.version.split()[0]} on {os.uname().sysname} {os.uname().machine}, "
              f"{os.cpu_count()} cpus; repo {REPO}")
        venv, info = phase_install(tmp)
        report_install(info)
        phase_pyz(args.pyz)
        exe = venv / "bin" / "abstractgateway"
        times, rss = phase_start(exe, tmp, args.runs)
        med = statistics.median(times)
        print(f"    to healthy: median {med * 1000:.0f} ms (min {min(times) * 1000:.0f}, "
              f"max {max(times) * 1000:.0f}; runs: {', '.join(f'{t * 1000:.0f}' for t in times)})")
        print(f"    goal <= {GOAL_HEALTHY_S:g} s to healthy: {goal(med <= GOAL_HEALTHY_S)}")
        idle = statistics.median(rss) / 1024
        print(f"[4] idle RSS 1 s after healthy: median {idle:.1f} MB (min {min(rss) / 1024:.1f}, "
              f"max {max(rss) / 1024:.1f})")
        print(f"    goal <= {GOAL_IDLE_RSS_MB:g} MB idle RSS: {goal(idle <= GOAL_IDLE_RSS_MB)}")
        sse = phase_streams(venv, exe, tmp, args.streams)
        if sse:
            b_rss, b_thr, a_rss, a_thr = sse
            print(f"    before streams: {b_rss / 1024:.1f} MB RSS, {b_thr} threads")
            print(f"    with {args.streams} streams: {a_rss / 1024:.1f} MB RSS, {a_thr} threads "
                  f"(+{(a_rss - b_rss) / 1024:.1f} MB, {(a_rss - b_rss) / max(args.streams, 1):.0f} kB/stream)")
        return 0
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
