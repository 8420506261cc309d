"""LLM benchmark: what the gateway adds to a model step, and how LLM-bound runs share a slow model.

This is a benchmark, not a test: it prints figures and exits 0 whatever they are (non-zero only if
runs fail or never finish, since then the figures would be meaningless).

The model is the stdlib fake OpenAI-compatible server of the tests (`tests/fake_llm.py`), run as
its own process on a loopback port (as a model server would be: it does not share this process's
GIL); no network, no real model. In this process: a `Gateway` + `Runner` with default settings over
a fresh SQLite file in a temporary directory, loading only the real `basic-llm-test` bundle
(on_flow_start -> llm_call -> on_flow_end). The `openai` provider is pointed at the fake through
OPENAI_BASE_URL; as the bundle pins no model, ABSTRACTGATEWAY_PROVIDER=openai and
ABSTRACTGATEWAY_MODEL=gpt-5-mini are set (every other setting is its default, e.g.
ABSTRACTGATEWAY_LLM_CONCURRENCY=128, 4 tick workers).

What it measures:

1. Overhead per LLM step: N runs (default 30) one after the other, with a model that answers at
   once. For each run, the time from `start_run` to the run being COMPLETED (its status column,
   polled every 0.5 ms) minus the time the fake server spent inside that run's completion request
   (its `served_s` counter).
   What is left is the gateway + runtime + abstractcore client cost of a run with one model step
   (three nodes, their ledger records and commits). Printed: p50, p90, max. One warm-up run first
   (it loads the provider client).
2. Concurrent runs on a slow model: N runs (default 100) started at once against a model that
   takes 1 s per answer. The clock runs from the first start until every run is COMPLETED.
   Printed: wall time, the most calls the fake served at once, runs per second, and a timeline
   (when the starts were all durable, when the model calls began). Goal with
   default settings: 100 runs in <= 2.5 s (the original gateway: 40 runs in 10.9 s, because its
   4 tick workers serialize the model calls).

3. Memory after big answers: a `serve` process (the CLI, with its allocator setting) and N runs
   (default 5) one after the other whose model answers 3 MB each; its RSS after each run. The same
   again with MALLOC_MMAP_THRESHOLD_=32 MiB and MALLOC_TRIM_THRESHOLD_=64 MiB, where glibc's own
   dynamic thresholds go once multi-megabyte blocks have been freed: the baseline the gateway's
   setting is measured against.

How to run (from the repository root, with `pip install -e '.[llm]'`):

    python bench/llm.py            # full run (about half a minute on 2 cores)
    python bench/llm.py --quick    # fewer sequential runs, 40 concurrent
    python bench/llm.py --synchronous NORMAL   # the same with fewer fsyncs
"""

from __future__ import annotations

import os
import sys

# bench/http.py sits next to this file: when run as a script, this directory is sys.path[0]
# and that file would shadow the stdlib `http` package. Drop it.
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import abstractgateway as gw  # noqa: E402

BUNDLE = ROOT / "tests" / "fixtures" / "bundles" / "basic-llm-test@0.0.0.flow"


def _status(gateway: gw.Gateway, run_id: str) -> str:
    return gateway.stores.db.query_one("SELECT status FROM runs WHERE run_id = ?", (run_id,))[0]


def _wait_completed(gateway: gw.Gateway, run_ids: list, timeout: float) -> None:
    pending = set(run_ids)
    deadline = time.monotonic() + timeout
    while pending:
        for run_id in list(pending):
            status = _status(gateway, run_id)
            if status == "completed":
                pending.discard(run_id)
            elif status in ("failed", "cancelled"):
                raise SystemExit(f"run {run_id} ended {status}: {gateway.stores.runs.load(run_id).error}")
        if time.monotonic() > deadline:
            raise SystemExit(f"{len(pending)} runs not completed within {timeout}s")
        time.sleep(0.0005)


class FakeModel:
    """tests/fake_llm.py in a process of its own, driven through its `_control` and `_stats` routes."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fake_llm.py")], stdout=subprocess.PIPE,
                                     text=True)
        self.base_url = self.proc.stdout.readline().strip()
        self.root = self.base_url.rsplit("/v1", 1)[0]

    def _call(self, path: str, body: dict = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.root + path, data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as resp:
            return json.loads(resp.read())

    def control(self, **body: object) -> dict:
        return self._call("/_control", body)

    def stats(self) -> dict:
        return self._call("/_stats")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def _pct(values: list, q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sequential", type=int, default=30)
    parser.add_argument("--concurrent", type=int, default=100)
    parser.add_argument("--delay", type=float, default=1.0, help="seconds the slow model takes per answer")
    parser.add_argument("--big-answers", type=int, default=5, help="runs with a 3 MB answer (phase 3)")
    parser.add_argument("--synchronous", choices=("FULL", "NORMAL"), default="FULL",
                        help="SQLite durability (default FULL, the gateway's default)")
    args = parser.parse_args()
    if args.quick:
        args.sequential, args.concurrent, args.big_answers = 10, 40, 3

    fake = FakeModel()
    os.environ.update(OPENAI_BASE_URL=fake.base_url, OPENAI_API_KEY="sk-fake-not-a-key")
    tmp = Path(tempfile.mkdtemp(prefix="agw-bench-llm-"))
    flows = tmp / "flows"
    flows.mkdir()
    shutil.copy(BUNDLE, flows / BUNDLE.name)
    config = gw.Config.load(environ={"ABSTRACTGATEWAY_DATA_DIR": str(tmp / "data"),
                                     "ABSTRACTGATEWAY_FLOWS_DIR": str(flows),
                                     "ABSTRACTGATEWAY_PROVIDER": "openai", "ABSTRACTGATEWAY_MODEL": "gpt-5-mini",
                                     "ABSTRACTGATEWAY_SQLITE_SYNCHRONOUS": args.synchronous})
    gateway = gw.Gateway(config)
    runner = gw.Runner(gateway).start()
    print(f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} cores; "
          f"llm_concurrency={config.llm_concurrency}, tick_workers={config.tick_workers}, "
          f"synchronous={config.synchronous}")
    try:
        def one(prompt: str) -> float:
            start = time.perf_counter()
            run_id = gateway.start_run(bundle_id="basic-llm-test", input_data={"prompt": prompt})
            _wait_completed(gateway, [run_id], 60)
            return time.perf_counter() - start

        one("warm-up")
        overheads = []
        for i in range(args.sequential):
            served = fake.stats()["served_s"]
            total = one(f"question {i}")
            overheads.append(total - (fake.stats()["served_s"] - served))
        ms = [o * 1000 for o in overheads]
        print(f"1. overhead per LLM step ({args.sequential} sequential runs of basic-llm-test, instant model): "
              f"p50 {statistics.median(ms):.1f} ms, p90 {_pct(ms, 0.9):.1f} ms, max {max(ms):.1f} ms "
              f"(start->completed minus the fake server's own time)")

        fake.control(delay_s=args.delay, reset_max_in_flight=True)
        served = len(fake.stats()["began"])
        start, epoch = time.perf_counter(), time.time()
        run_ids = [gateway.start_run(bundle_id="basic-llm-test", input_data={"prompt": f"q{i}"})
                   for i in range(args.concurrent)]
        started = time.perf_counter() - start
        _wait_completed(gateway, run_ids, 120)
        wall = time.perf_counter() - start
        stats = fake.stats()
        calls = sorted(t - epoch for t in stats["began"][served:])
        print(f"2. {args.concurrent} concurrent runs, {args.delay:g} s model: all completed in {wall:.2f} s "
              f"({args.concurrent / wall:.1f} runs/s), up to {stats['max_in_flight']} model calls at once "
              f"(goal for 100: <= 2.5 s)\n"
              f"   timeline: all {args.concurrent} starts durable at {started:.2f} s; model calls began from "
              f"{calls[0]:.2f} s to {calls[-1]:.2f} s (median {statistics.median(calls):.2f} s)")
        fake.control(delay_s=0, answer_bytes=3 * 2**20)
        for label, extra in (("the gateway's setting", {}),
                             ("glibc's thresholds after one big free", {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20),
                                                                       "MALLOC_TRIM_THRESHOLD_": str(64 * 2**20)})):
            rss = _serve_big_answers(fake, tmp / f"serve-{len(extra)}", flows, args.big_answers, extra)
            print(f"3. RSS of `serve` after each of {args.big_answers} runs with a 3 MB answer, {label}: "
                  + ", ".join(f"{mb:.0f}" for mb in rss) + " MB")
    finally:
        runner.stop()
        gateway.close()
        fake.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def _serve_big_answers(fake: "FakeModel", data_dir: Path, flows: Path, runs: int, extra_env: dict) -> list:
    """RSS (MB) of a `serve` process after each of `runs` runs of basic-llm-test, one after the other."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token = "bench-token-0123456789abcdef"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ABSTRACTGATEWAY_", "MALLOC_"))}
    env.update(ABSTRACTGATEWAY_DATA_DIR=str(data_dir), ABSTRACTGATEWAY_FLOWS_DIR=str(flows),
               ABSTRACTGATEWAY_PORT=str(port), ABSTRACTGATEWAY_AUTH_TOKEN=token, ABSTRACTGATEWAY_PROVIDER="openai",
               ABSTRACTGATEWAY_MODEL="gpt-5-mini", **extra_env)
    proc = subprocess.Popen([sys.executable, str(ROOT / "abstractgateway.py"), "serve"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}/api/gateway"

    def call(method: str, path: str, body: object = None) -> dict:
        request = urllib.request.Request(base + path, method=method,
                                         data=json.dumps(body).encode() if body is not None else None,
                                         headers={"Authorization": f"Bearer {token}",
                                                  "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as resp:
            return json.loads(resp.read())

    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                call("GET", "/ping")
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit("serve did not start") from None
                time.sleep(0.05)
        rss = []
        for i in range(runs):
            run_id = call("POST", "/runs/start", {"bundle_id": "basic-llm-test", "input_data": {"prompt": f"big {i}"}})[
                "run_id"]
            while (status := call("GET", f"/runs/{run_id}")["status"]) not in ("completed", "failed", "cancelled"):
                time.sleep(0.05)
            if status != "completed":
                raise SystemExit(f"run {run_id} ended {status}")
            with open(f"/proc/{proc.pid}/status") as f:
                rss.append(next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024)
        return rss
    finally:
        proc.terminate()
        proc.wait(30)


if __name__ == "__main__":
    raise SystemExit(main())
