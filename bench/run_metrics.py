"""Cost of the `run_metrics` counters: ledger appends with and without the counting, and
`metrics_many` for a page of runs against parsing their ledgers (what listing would cost without them).

Records follow the runtime's pattern (`started` + `completed` per step, a 200-character result,
an LLM call every 4th step) and go through `append_json`, the path that must parse a completed
record to count it (the runtime's `append(StepRecord)` counts from the dataclass, without a parse).

A benchmark, not a test: it prints figures and never fails on a slow result.

    python bench/run_metrics.py            # 20,000 appends per case, 500 runs x 40 records
    python bench/run_metrics.py --quick    # counts scaled down 10x
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import abstractgateway as gw  # noqa: E402

RESULT = "x" * 200


def _record(run_id: str, i: int) -> str:
    """The runtime's pattern: a `started` then a `completed` record per step; every 4th step an LLM call."""
    status = "completed" if i % 2 else "started"
    effect = {"type": "llm_call", "payload": {"prompt": "hi"}} if i % 8 < 2 else None
    result = {"text": RESULT, "usage": {"total_tokens": 42}} if status == "completed" else None
    return gw.dataclass_json({"run_id": run_id, "step_id": f"s{i // 2}", "node_id": f"n{i % 7}", "status": status,
                              "effect": effect, "result": result, "idempotency_key": f"k{i // 2}"})


def _appends_per_s(db: gw.Database, n: int, batched: bool) -> float:
    store = gw.SqliteLedgerStore(db)
    records = [_record("bench-run", i) for i in range(n)]
    started = time.perf_counter()
    if batched:
        with db.transaction():
            for text in records:
                store.append_json("bench-run", text)
    else:
        for text in records:
            store.append_json("bench-run", text)
    return n / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    scale = 10 if args.quick else 1
    appends, runs, per_run = 20_000 // scale, 500 // scale, 40
    root = Path(tempfile.mkdtemp(prefix="ag-bench-metrics-"))
    original_counts = gw._step_counts_of_json
    try:
        print(f"appends per case: {appends}; listing: {runs} runs x {per_run} records; synchronous=NORMAL")
        for batched in (False, True):
            figures = {}
            for counted in (True, False):
                db = gw.Database(root / f"a-{batched}-{counted}.sqlite3", synchronous="NORMAL")
                if not counted:  # what appends cost before the counters existed: no parse, no upsert
                    gw._step_counts_of_json = lambda record_json: None
                figures[counted] = _appends_per_s(db, appends, batched)
                gw._step_counts_of_json = original_counts
                db.close()
            mode = "one transaction" if batched else "one commit each"
            print(f"appends/s ({mode}): with counters {figures[True]:,.0f}, without {figures[False]:,.0f} "
                  f"({(1 - figures[True] / figures[False]) * 100:+.1f}% cost)")

        db = gw.Database(root / "list.sqlite3", synchronous="NORMAL")
        store = gw.SqliteLedgerStore(db)
        ids = [f"run-{r}" for r in range(runs)]
        with db.transaction():
            for run_id in ids:
                for i in range(per_run):
                    store.append_json(run_id, _record(run_id, i))
        page = ids[:50]
        started = time.perf_counter()
        for _ in range(20):
            store.metrics_many(page)
        indexed_ms = (time.perf_counter() - started) / 20 * 1000
        started = time.perf_counter()
        for _ in range(20):
            for run_id in page:
                [json.loads(text) for text in store.page_json(run_id, 0, 1 << 30)]
        parsed_ms = (time.perf_counter() - started) / 20 * 1000
        print(f"metrics for a page of 50 runs: counters {indexed_ms:.2f} ms, parsing their ledgers {parsed_ms:.2f} ms")
        db.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
