"""Enqueue benchmark: sqliteq against a hand-written apsw queue doing the same inserts.

Each run measures, on fresh database files and interleaved (sqliteq, raw, sqliteq, raw):

* single: `storage.jobs.enqueue` of N requests one call each (requests built before the
  timer), against raw apsw committing one `BEGIN IMMEDIATE; INSERT; COMMIT` per row;
* bulk: one `storage.jobs.enqueue_bulk` of N requests (built before the timer), against raw
  apsw inserting the same N rows with `executemany` in one transaction.

The raw side does the work any hand-written queue must do, inside the timer: compact JSON of
the payload and a ULID id (`str(ulid.ULID())`) per row. It inserts with sqliteq's own column
list (`sqliteq._JobStore.INSERT`) into a file whose schema sqliteq created, in WAL mode with
synchronous=NORMAL, like sqliteq's default.

    python bench/bench_enqueue.py --runs 5 --single 5000 --bulk 100000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable

import apsw
import ulid

import sqliteq

KIND, QUEUE = "email_send", "default"
SINGLE_RATIO_TARGET = 0.8
BULK_RATE_TARGET = 100_000
BULK_RATIO_TARGET = 0.5


def payload(n: int) -> dict:
    return {"to": f"user{n}@example.com", "template": "welcome", "n": n}


def requests(count: int) -> list[sqliteq.EnqueueRequest]:
    return [sqliteq.EnqueueRequest(KIND, payload(n)) for n in range(count)]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def raw_connection(path: str) -> apsw.Connection:
    """A file with sqliteq's schema, then a plain connection configured like sqliteq's."""
    sqliteq.Storage(path).close()
    conn = apsw.Connection(path)
    conn.setbusytimeout(5000)
    conn.execute("PRAGMA journal_mode = WAL").fetchall()
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("INSERT OR IGNORE INTO queues (name) VALUES (?)", (QUEUE,))
    return conn


def raw_row(item: dict, now: int) -> tuple:
    return (str(ulid.ULID()), KIND, QUEUE, json.dumps(item, separators=(",", ":")), "queued",
            0, now, 5, None, now)


# ------------------------------------------------------------- scenarios ----

def sqliteq_single(path: str, count: int) -> float:
    reqs = requests(count)
    with sqliteq.Storage(path) as storage:
        enqueue = storage.jobs.enqueue
        started = time.perf_counter()
        for req in reqs:
            enqueue(req)
        elapsed = time.perf_counter() - started
        assert storage.jobs.counts()["queued"] == count
    return count / elapsed


def raw_single(path: str, count: int) -> float:
    items = [payload(n) for n in range(count)]
    conn = raw_connection(path)
    insert = sqliteq._JobStore.INSERT
    started = time.perf_counter()
    for item in items:
        row = raw_row(item, now_ms())
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(insert, row)
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - started
    assert conn.execute("SELECT count(*) FROM jobs").fetchall()[0][0] == count
    conn.close()
    return count / elapsed


def sqliteq_bulk(path: str, count: int) -> float:
    reqs = requests(count)
    with sqliteq.Storage(path) as storage:
        started = time.perf_counter()
        storage.jobs.enqueue_bulk(reqs)
        elapsed = time.perf_counter() - started
        assert storage.jobs.counts()["queued"] == count
    return count / elapsed


def raw_bulk(path: str, count: int) -> float:
    items = [payload(n) for n in range(count)]
    conn = raw_connection(path)
    started = time.perf_counter()
    now = now_ms()
    rows = [raw_row(item, now) for item in items]
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany(sqliteq._JobStore.INSERT, rows)
    conn.execute("COMMIT")
    elapsed = time.perf_counter() - started
    assert conn.execute("SELECT count(*) FROM jobs").fetchall()[0][0] == count
    conn.close()
    return count / elapsed


# ------------------------------------------------------------------ main ----

def measure(folder: str, name: str, run: int, scenario: Callable[[str, int], float],
            count: int) -> float:
    path = os.path.join(folder, f"{name}-{run}.db")
    try:
        return scenario(path, count)
    finally:
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(path + suffix):
                os.remove(path + suffix)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="interleaved runs (default 5)")
    parser.add_argument("--single", type=int, default=5000, metavar="N",
                        help="jobs enqueued one call each, per run (default 5000)")
    parser.add_argument("--bulk", type=int, default=100_000, metavar="N",
                        help="jobs in the one bulk call, per run (default 100000)")
    parser.add_argument("--db-dir", help="folder for the database files (default: a temp dir)")
    args = parser.parse_args()

    own_dir = args.db_dir is None
    folder = tempfile.mkdtemp(prefix="sqliteq-bench-") if own_dir else args.db_dir
    os.makedirs(folder, exist_ok=True)
    print(f"sqliteq {sqliteq.__version__}, SQLite {apsw.sqlite_lib_version()}, "
          f"apsw {apsw.apsw_version()}, Python {platform.python_version()}, "
          f"{os.cpu_count()} CPUs (load {os.getloadavg()[0]:.2f}), files in {folder}")
    print(f"{args.runs} runs; single: {args.single} jobs, bulk: {args.bulk} jobs\n")

    results: dict[str, list[float]] = {k: [] for k in ("sq1", "raw1", "sqN", "rawN")}
    try:
        for run in range(1, args.runs + 1):
            results["sq1"].append(measure(folder, "sq1", run, sqliteq_single, args.single))
            results["raw1"].append(measure(folder, "raw1", run, raw_single, args.single))
            results["sqN"].append(measure(folder, "sqN", run, sqliteq_bulk, args.bulk))
            results["rawN"].append(measure(folder, "rawN", run, raw_bulk, args.bulk))
            print(f"run {run}: single sqliteq {results['sq1'][-1]:>9,.0f}/s  "
                  f"raw {results['raw1'][-1]:>9,.0f}/s   "
                  f"bulk sqliteq {results['sqN'][-1]:>9,.0f}/s  "
                  f"raw {results['rawN'][-1]:>9,.0f}/s", flush=True)
    finally:
        if own_dir:
            shutil.rmtree(folder, ignore_errors=True)

    median = {k: statistics.median(v) for k, v in results.items()}
    single_ratio = median["sq1"] / median["raw1"]
    bulk_ratio = median["sqN"] / median["rawN"]
    single_ok = single_ratio >= SINGLE_RATIO_TARGET
    bulk_ok = median["sqN"] >= BULK_RATE_TARGET and bulk_ratio >= BULK_RATIO_TARGET
    print()
    print("| scenario | sqliteq jobs/s (median) | raw jobs/s (median) | ratio | target | result |")
    print("|---|---:|---:|---:|---|---|")
    print(f"| single enqueue ({args.single:,}) | {median['sq1']:,.0f} | {median['raw1']:,.0f} "
          f"| {single_ratio:.2f} | >= {SINGLE_RATIO_TARGET} x raw "
          f"| {'PASS' if single_ok else 'MISS'} |")
    print(f"| bulk enqueue ({args.bulk:,}) | {median['sqN']:,.0f} | {median['rawN']:,.0f} "
          f"| {bulk_ratio:.2f} | >= {BULK_RATE_TARGET:,}/s and >= {BULK_RATIO_TARGET} x raw "
          f"| {'PASS' if bulk_ok else 'MISS'} |")


if __name__ == "__main__":
    main()
