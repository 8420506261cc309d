"""Ledger storage benchmark: AbstractGateway's stores vs abstractruntime's own stores.

This is a benchmark, not a test: it prints figures and never fails on a slow result
(it does exit non-zero if a store loses or duplicates records, since then the figures
would be meaningless).

What it measures, on the same workload for every store (a `StepRecord` with a
200-character result, serialised the way each store serialises it):

1. Single-appender durable appends: records/s for sequential `append()` calls to one run
   (default 2,000). Every append is its own committed transaction, acknowledged only
   after commit.
2. Concurrent appenders: records/s with 8 threads each appending to its own run
   (default 8 x 500), and with 8 threads all appending to the same run (where the store
   allows it; all of these do). Afterwards the per-run counts are checked (no lost or
   duplicated records; for SQLite stores the seq space is 1..N with no gaps).
3. Replay over a 100,000-record ledger of one run (built with a fast bulk path, not
   with `append()`):
   - records/s of reading the whole ledger with the store's `list(run_id)` (best of 3);
   - latency in ms (median of up to 50 calls, after one warm-up call) of reading one
     1,000-record page from the middle: ours `page(run_id, 50_000, 1000)`, upstream
     SQLite `list_after(run_id=..., after=50_000, limit=1000)`, JSONL `list()[50_000:51_000]`.
     Slow stores stop sampling after ~3 s of page calls (the sample count is printed).

Rows:
- ours sqlite, synchronous=FULL   (`gw.open_stores`, the default backend and default durability)
- ours sqlite, synchronous=NORMAL
- upstream sqlite, synchronous=FULL (abstractruntime `SqliteDatabase` with a subclass that
  re-applies `PRAGMA synchronous=FULL` after upstream's own pragmas; the fair durable baseline)
- upstream sqlite, synchronous=NORMAL (upstream's default)
- upstream JSONL (`JsonlLedgerStore`: one file per run, no fsync, so not durable)
- ours file backend (`gw.FileLedgerStore` via `open_stores` with store_backend=file:
  the upstream JSONL layout plus range reads)

Then the ratios "ours FULL / upstream sqlite FULL" for appends, and whether the goals are met:
- durable appends >= 3x the upstream sqlite3 store at synchronous=FULL;
- one 1,000-record page from a 100k-record ledger in < 5 ms.

How to run (from the repository root, with the project and abstractruntime installed):

    python bench/storage.py            # full run (a couple of minutes on 2 cores)
    python bench/storage.py --quick    # every count scaled down 10x

Everything is written under a temporary directory (in $TMPDIR, default /tmp; `--dir`
overrides) that is removed at the end. Note that fsync cost depends heavily on the disk:
on a disk with a volatile write cache fsync is cheap and FULL costs little over NORMAL;
on a disk that really flushes, every FULL commit pays a flush and group commit matters more.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

HERE = Path(__file__).resolve().parent
# bench/http.py would shadow the stdlib `http` package for scripts run from this directory.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

import abstractgateway as gw  # noqa: E402
from abstractruntime.core.models import StepRecord, StepStatus  # noqa: E402
from abstractruntime.storage.json_files import JsonlLedgerStore  # noqa: E402
from abstractruntime.storage.sqlite import SqliteDatabase, SqliteLedgerStore as UpstreamSqliteLedgerStore  # noqa: E402

THREADS = 8
PAGE_LIMIT = 1000
PAGE_SAMPLES = 50
PAGE_TIME_BUDGET_S = 3.0
REPLAY_REPEATS = 3


def make_record(run_id: str, n: int) -> StepRecord:
    return StepRecord(run_id=run_id, step_id=str(n), node_id="n", status=StepStatus.COMPLETED,
                      result={"text": "x" * 200})


class UpstreamFullDatabase(SqliteDatabase):
    """abstractruntime's SqliteDatabase, but with synchronous=FULL (it hard-codes NORMAL)."""

    def _apply_pragmas(self, conn: Any) -> None:
        super()._apply_pragmas(conn)
        conn.execute("PRAGMA synchronous=FULL")


# -- backends ---------------------------------------------------------------------------------
#
# Each backend knows how to open its store in a directory, bulk-load a ledger, read a page
# and clean up. `append`, `list` and `count` are the LedgerStore interface every store has.


class Backend:
    name = ""
    durable = ""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.store: Any = None

    def append(self, record: StepRecord) -> None:
        self.store.append(record)

    def list(self, run_id: str) -> List[Dict[str, Any]]:
        return self.store.list(run_id)

    def count(self, run_id: str) -> int:
        return self.store.count(run_id)

    def seqs_gapless(self, run_id: str, n: int) -> Optional[bool]:
        return None  # not applicable

    def page(self, run_id: str, after: int, limit: int) -> List[Dict[str, Any]]:
        raise NotImplementedError

    page_raw: Optional[Callable[[str, int, int], List[str]]] = None  # unparsed JSON text, where the store has it

    def bulk_load(self, run_id: str, n: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class OursSqlite(Backend):
    durable = "yes"

    def __init__(self, root: Path, synchronous: str) -> None:
        super().__init__(root)
        self.name = f"ours sqlite ({synchronous})"
        self.durable = "yes" if synchronous == "FULL" else "no (power loss)"
        config = gw.Config.load(environ={
            "ABSTRACTGATEWAY_DATA_DIR": str(root),
            "ABSTRACTGATEWAY_STORE_BACKEND": "sqlite",
            "ABSTRACTGATEWAY_SQLITE_SYNCHRONOUS": synchronous,
        })
        self.stores = gw.open_stores(config)
        assert isinstance(self.stores.ledger, gw.SqliteLedgerStore)
        assert self.stores.db.synchronous == synchronous
        self.store = self.stores.ledger
        self.db = self.stores.db

    def page(self, run_id: str, after: int, limit: int) -> List[Dict[str, Any]]:
        return self.store.page(run_id, after, limit)

    def page_raw(self, run_id: str, after: int, limit: int) -> List[str]:
        return self.store.page_json(run_id, after, limit)

    def seqs_gapless(self, run_id: str, n: int) -> Optional[bool]:
        row = self.db.query_one("SELECT COUNT(*), MIN(seq), MAX(seq) FROM ledger WHERE run_id = ?", (run_id,))
        return tuple(row) == (n, 1, n)

    def bulk_load(self, run_id: str, n: int) -> None:
        template = asdict(make_record(run_id, 0))
        rows = []
        for seq in range(1, n + 1):
            template["step_id"] = str(seq)
            rows.append((run_id, seq, gw._json_dumps(template)))
        self.db.write(lambda conn: conn.executemany(gw.SqliteLedgerStore._INSERT, rows))

    def close(self) -> None:
        self.stores.close()


class UpstreamSqlite(Backend):
    def __init__(self, root: Path, synchronous: str) -> None:
        super().__init__(root)
        self.name = f"upstream sqlite ({synchronous})"
        self.durable = "yes" if synchronous == "FULL" else "no (power loss)"
        cls = UpstreamFullDatabase if synchronous == "FULL" else SqliteDatabase
        self.db = cls(root / "runtime.sqlite3")
        got = self.db.connection().execute("PRAGMA synchronous").fetchone()[0]
        assert got == {"FULL": 2, "NORMAL": 1}[synchronous], got
        self.store = UpstreamSqliteLedgerStore(self.db)

    def page(self, run_id: str, after: int, limit: int) -> List[Dict[str, Any]]:
        return self.store.list_after(run_id=run_id, after=after, limit=limit)[0]

    def seqs_gapless(self, run_id: str, n: int) -> Optional[bool]:
        row = self.db.connection().execute(
            "SELECT COUNT(*), MIN(seq), MAX(seq) FROM ledger WHERE run_id = ?", (run_id,)).fetchone()
        return tuple(row) == (n, 1, n)

    def bulk_load(self, run_id: str, n: int) -> None:
        template = asdict(make_record(run_id, 0))
        rows = []
        for seq in range(1, n + 1):
            template["step_id"] = str(seq)
            rows.append((run_id, seq, json.dumps(template, ensure_ascii=False)))
        conn = self.db.connection()
        with conn:
            conn.executemany("INSERT INTO ledger (run_id, seq, record_json) VALUES (?, ?, ?)", rows)
            conn.execute(
                "INSERT INTO ledger_heads (run_id, last_seq) VALUES (?, ?) "
                "ON CONFLICT(run_id) DO UPDATE SET last_seq = excluded.last_seq", (run_id, n))

    def close(self) -> None:
        conn = getattr(self.db._local, "conn", None)
        if conn is not None:
            conn.close()


class Jsonl(Backend):
    durable = "no (no fsync)"

    def __init__(self, root: Path, ours: bool) -> None:
        super().__init__(root)
        if ours:
            self.name = "ours file backend (JSONL)"
            config = gw.Config.load(environ={
                "ABSTRACTGATEWAY_DATA_DIR": str(root),
                "ABSTRACTGATEWAY_STORE_BACKEND": "file",
            })
            self.stores: Any = gw.open_stores(config)
            assert isinstance(self.stores.ledger, gw.FileLedgerStore)
            self.store = self.stores.ledger
        else:
            self.name = "upstream JSONL"
            self.stores = None
            self.store = JsonlLedgerStore(root)

    def page(self, run_id: str, after: int, limit: int) -> List[Dict[str, Any]]:
        if isinstance(self.store, gw.FileLedgerStore):
            return self.store.page(run_id, after, limit)
        return self.store.list(run_id)[after:after + limit]

    def bulk_load(self, run_id: str, n: int) -> None:
        template = asdict(make_record(run_id, 0))
        with self.store._path(run_id).open("w", encoding="utf-8") as f:
            for seq in range(1, n + 1):
                template["step_id"] = str(seq)
                f.write(json.dumps(template, ensure_ascii=False) + "\n")

    def close(self) -> None:
        if self.stores is not None:
            self.stores.close()


# -- measurements --------------------------------------------------------------------------


def run_threads(target: Callable[[int], None], n_threads: int) -> float:
    """Start `n_threads` threads on `target(i)` behind a barrier; return the wall time; re-raise errors."""
    barrier = threading.Barrier(n_threads + 1)
    errors: List[BaseException] = []

    def body(i: int) -> None:
        barrier.wait()
        try:
            target(i)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} appender thread(s) failed; first: {errors[0]!r}") from errors[0]
    return elapsed


class Problems(list):
    def check(self, backend: Backend, what: str, run_id: str, expected: int) -> None:
        got = backend.count(run_id)
        if got != expected:
            self.append(f"{backend.name}: {what}: count({run_id}) = {got}, expected {expected}")
        gapless = backend.seqs_gapless(run_id, expected)
        if gapless is False:
            self.append(f"{backend.name}: {what}: seqs of {run_id} are not exactly 1..{expected}")


def bench_backend(backend: Backend, counts: Dict[str, int], problems: Problems) -> Dict[str, Any]:
    out: Dict[str, Any] = {"name": backend.name, "durable": backend.durable}

    # warm-up: open this thread's connection, prime statement caches
    for i in range(20):
        backend.append(make_record("warmup", i + 1))
    _bench_appends(backend, counts, problems, out)
    _bench_reads(backend, counts, problems, out)
    return out


def _bench_appends(backend: Backend, counts: Dict[str, int], problems: Problems, out: Dict[str, Any]) -> None:
    """Appends/s of one appender, of THREADS appenders on their own runs, and of THREADS on one run."""
    # 1. single appender
    n = counts["sequential"]
    records = [make_record("seq-run", i + 1) for i in range(n)]
    t0 = time.perf_counter()
    for rec in records:
        backend.append(rec)
    out["single"] = n / (time.perf_counter() - t0)
    problems.check(backend, "sequential", "seq-run", n)

    # 2a. concurrent appenders, one run each
    per = counts["per_thread"]
    own = [[make_record(f"own-{t}", i + 1) for i in range(per)] for t in range(THREADS)]

    def own_run(t: int) -> None:
        for rec in own[t]:
            backend.append(rec)

    out["conc_own"] = THREADS * per / run_threads(own_run, THREADS)
    for t in range(THREADS):
        problems.check(backend, "8 threads own runs", f"own-{t}", per)

    # 2b. concurrent appenders, all on the same run
    shared = [[make_record("shared", t * per + i + 1) for i in range(per)] for t in range(THREADS)]

    def same_run(t: int) -> None:
        for rec in shared[t]:
            backend.append(rec)

    out["conc_same"] = THREADS * per / run_threads(same_run, THREADS)
    problems.check(backend, "8 threads same run", "shared", THREADS * per)
    step_ids = {r.get("step_id") for r in backend.list("shared")}
    if len(step_ids) != THREADS * per:
        problems.append(f"{backend.name}: same run: {len(step_ids)} distinct records, expected {THREADS * per}")


def _bench_reads(backend: Backend, counts: Dict[str, int], problems: Problems, out: Dict[str, Any]) -> None:
    """Bulk load, full replay and page latency of one big ledger."""
    # 3. replay a big ledger
    big = counts["ledger"]
    t0 = time.perf_counter()
    backend.bulk_load("big", big)
    out["bulk_load_s"] = time.perf_counter() - t0
    problems.check(backend, "bulk load", "big", big)

    best = float("inf")
    for _ in range(REPLAY_REPEATS):
        t0 = time.perf_counter()
        got = backend.list("big")
        best = min(best, time.perf_counter() - t0)
        if len(got) != big:
            problems.append(f"{backend.name}: list(big) returned {len(got)} records, expected {big}")
    out["replay"] = big / best

    after = big // 2
    first = backend.page("big", after, PAGE_LIMIT)  # warm-up (and correctness)
    if len(first) != PAGE_LIMIT or first[0].get("step_id") != str(after + 1):
        problems.append(f"{backend.name}: page(big, {after}, {PAGE_LIMIT}) returned the wrong records")
    out["page_ms"], out["page_n"] = time_page(backend.page, after)
    if backend.page_raw is not None:
        raw = backend.page_raw("big", after, PAGE_LIMIT)
        if len(raw) != PAGE_LIMIT or json.loads(raw[0]).get("step_id") != str(after + 1):
            problems.append(f"{backend.name}: page_json(big, {after}, {PAGE_LIMIT}) returned the wrong records")
        out["page_raw_ms"], _ = time_page(backend.page_raw, after)


def time_page(page: Callable[[str, int, int], List[Any]], after: int) -> "tuple[float, int]":
    """Median latency (ms) of `page("big", after, PAGE_LIMIT)` and the number of samples."""
    samples: List[float] = []
    budget_end = time.perf_counter() + PAGE_TIME_BUDGET_S
    while len(samples) < PAGE_SAMPLES and (len(samples) < 5 or time.perf_counter() < budget_end):
        t0 = time.perf_counter()
        page("big", after, PAGE_LIMIT)
        samples.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(samples), len(samples)


# -- report -----------------------------------------------------------------------------------


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover
        return "?"


def fmt_rate(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:,.0f}"


def print_table(results: List[Dict[str, Any]], counts: Dict[str, int]) -> None:
    per, big = counts["per_thread"], counts["ledger"]
    headers = [
        "store", "durable",
        f"1 appender rec/s ({counts['sequential']:,})",
        f"8 thr own runs rec/s ({THREADS}x{per:,})",
        f"8 thr same run rec/s ({THREADS}x{per:,})",
        f"replay {big // 1000}k rec/s",
        f"page 1k@{big // 2 // 1000}k ms (n)",
    ]
    rows = []
    for r in results:
        rows.append([
            r["name"], r["durable"], fmt_rate(r["single"]), fmt_rate(r["conc_own"]), fmt_rate(r["conc_same"]),
            fmt_rate(r["replay"]), f"{r['page_ms']:.2f} ({r['page_n']})",
        ])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(widths[0]) if i == 0 else h.rjust(widths[i]) for i, h in enumerate(headers))
    print(line)
    print("-" * len(line))
    for row in rows:
        print("  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row)))


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="scale every count down 10x")
    parser.add_argument("--rounds", type=int, default=3,
                        help="repeat the whole comparison N times and report medians (default 3)")
    parser.add_argument("--dir", default=None,
                        help="parent directory for the temporary stores (default: $TMPDIR or /tmp)")
    args = parser.parse_args(argv)

    scale = 10 if args.quick else 1
    counts = {
        "sequential": 2000 // scale,
        "per_thread": 500 // scale,
        "ledger": 100_000 // scale,
    }

    try:
        import apsw
        apsw_info = f"apsw {apsw.apsw_version()} (SQLite {apsw.sqlite_lib_version()})"
    except Exception:  # pragma: no cover
        apsw_info = "apsw ?"
    import sqlite3
    try:
        from importlib.metadata import version
        rt_version = version("abstractruntime")
    except Exception:  # pragma: no cover
        rt_version = "?"

    base = Path(tempfile.mkdtemp(prefix="abstractgateway-bench-", dir=args.dir))
    print(f"AbstractGateway storage benchmark{' (--quick)' if args.quick else ''}")
    print(f"python {platform.python_version()}, {os.cpu_count()} CPUs, {apsw_info}; "
          f"upstream: abstractruntime {rt_version}, sqlite3 module (SQLite {sqlite3.sqlite_version})")
    print(f"workdir: {base}")
    print(f"load average before: {loadavg()} (other work on the machine skews every figure)")
    print()

    factories: List[Callable[[Path], Backend]] = [
        lambda d: OursSqlite(d, "FULL"),
        lambda d: OursSqlite(d, "NORMAL"),
        lambda d: UpstreamSqlite(d, "FULL"),
        lambda d: UpstreamSqlite(d, "NORMAL"),
        lambda d: Jsonl(d, ours=False),
        lambda d: Jsonl(d, ours=True),
    ]
    problems = Problems()
    t_start = time.perf_counter()
    try:
        rounds, order = _run_rounds(args.rounds, factories, base, counts, problems)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"  total {time.perf_counter() - t_start:.1f}s; load average after: {loadavg()}")
    print()

    results = _medians(rounds, order)
    print(f"median of {args.rounds} round(s); page n = page calls timed over all rounds")
    print_table(results, counts)
    print()
    _print_ratios_and_goals(rounds, results, counts)

    if problems:
        print()
        print("CORRECTNESS PROBLEMS (figures above are suspect):")
        for p in problems:
            print(f"  - {p}")
        return 1
    print()
    print("correctness: every store kept every record (counts exact; SQLite seqs gapless 1..N)")
    return 0


def _run_rounds(n_rounds: int, factories: List[Callable[[Path], Backend]], base: Path, counts: Dict[str, int],
                problems: Problems) -> "tuple[List[Dict[str, Dict[str, Any]]], List[str]]":
    """Every store through `bench_backend` once a round; returns per round store name -> figures,
    and the store names in first-round order."""
    rounds: List[Dict[str, Dict[str, Any]]] = []  # per round: store name -> figures
    order: List[str] = []
    for rnd in range(n_rounds):
        # rotate the order every round so no store always runs first (cold disk, warm CPU, ...)
        shift = rnd % len(factories)
        figures: Dict[str, Dict[str, Any]] = {}
        print(f"  round {rnd + 1}/{n_rounds}:", end="", flush=True)
        for i, factory in list(enumerate(factories))[shift:] + list(enumerate(factories))[:shift]:
            backend = factory(base / f"r{rnd}-store{i}")
            try:
                t0 = time.perf_counter()
                figures[backend.name] = bench_backend(backend, counts, problems)
                print(f" [{backend.name} {time.perf_counter() - t0:.1f}s]", end="", flush=True)
                if rnd == 0:
                    order.append(backend.name)
            finally:
                backend.close()
                shutil.rmtree(backend.root, ignore_errors=True)
        print(flush=True)
        rounds.append(figures)
    return rounds, order


def _medians(rounds: List[Dict[str, Dict[str, Any]]], order: List[str]) -> List[Dict[str, Any]]:
    """Per store (in `order`), the median of each metric over the rounds."""
    metrics = ("single", "conc_own", "conc_same", "replay", "page_ms", "page_raw_ms")
    results: List[Dict[str, Any]] = []
    for name in order:
        merged: Dict[str, Any] = {"name": name, "durable": rounds[0][name]["durable"],
                                  "page_n": sum(r[name]["page_n"] for r in rounds)}
        for m in metrics:
            if m in rounds[0][name]:
                merged[m] = statistics.median(r[name][m] for r in rounds)
        results.append(merged)
    return results


def _print_ratios_and_goals(rounds: List[Dict[str, Dict[str, Any]]], results: List[Dict[str, Any]],
                            counts: Dict[str, int]) -> None:
    """Same-round ratios against upstream sqlite FULL, then which goals are met."""

    def ratio_of(metric: str, invert: bool = False) -> "tuple[float, float, float]":
        per_round = []
        for r in rounds:
            ours_v, up_v = r["ours sqlite (FULL)"][metric], r["upstream sqlite (FULL)"][metric]
            per_round.append(up_v / ours_v if invert else ours_v / up_v)
        return statistics.median(per_round), min(per_round), max(per_round)

    ratios = {
        "single appender": ratio_of("single"),
        "8 threads, own runs": ratio_of("conc_own"),
        "8 threads, same run": ratio_of("conc_same"),
    }
    print("ours FULL vs upstream sqlite FULL, same-round ratios (median [min..max]), higher is better:")
    for label, (med, lo, hi) in ratios.items():
        print(f"  {label:<22} {med:6.2f}x  [{lo:.2f}..{hi:.2f}]")
    for label, (med, lo, hi) in (("replay (list)", ratio_of("replay")),
                                 ("page latency", ratio_of("page_ms", invert=True))):
        print(f"  {label:<22} {med:6.2f}x  [{lo:.2f}..{hi:.2f}]")
    ratios = {k: v[0] for k, v in ratios.items()}
    print()
    for r in results:
        if "page_raw_ms" in r:
            print(f"{r['name']}: page_json (same page, stored JSON text, not parsed; what the HTTP "
                  f"stream sends) {r['page_raw_ms']:.2f} ms median")
    print()

    by_name = {r["name"]: r for r in results}
    print("goals:")
    for label, ratio in ratios.items():
        print(f"  durable appends >= 3x upstream sqlite FULL, {label:<20} "
              f"{'MET' if ratio >= 3 else 'NOT MET'} ({ratio:.2f}x)")
    for r in (by_name["ours sqlite (FULL)"], by_name["ours sqlite (NORMAL)"]):
        note = "" if counts["ledger"] == 100_000 else f" [ledger is {counts['ledger']:,} records, not 100k]"
        print(f"  1,000-record page < 5 ms, {r['name']:<20} "
              f"{'MET' if r['page_ms'] < 5 else 'NOT MET'} ({r['page_ms']:.2f} ms){note}")


if __name__ == "__main__":
    sys.exit(main())
