"""sqliteq.map and job dependencies, against a plain Runtime on the same machine.

    python bench/bench_map.py                 # all three, medians of 3 interleaved runs
    python bench/bench_map.py --runs 5 --only map,processes,fan-in

* map: 10,000 no-op items through `sqliteq.map` (8 threads), wall time from the call to the
  last result, against a plain Runtime (8 slots) draining the same 10,000 no-op jobs
  enqueued by one `enqueue_bulk` (timed from the enqueue to the last job done).
* processes: a CPU-bound function (pure Python, ~20 ms per item) over 400 items, with
  `processes=True` (one process per core, their start-up included) against threads; the
  limit is what this machine's cores give a `multiprocessing.Pool` over a plain loop.
* fan-in: N children joined by one parent-of-all (`depends_on` = all N), enqueued in one
  bulk call and drained by a Runtime; the link cost at enqueue and the drain's cost per
  child at N = 1k, 10k, 100k. O(children) bookkeeping shows as a flat cost per child.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import sqliteq
from sqliteq import EnqueueRequest

SLOTS = 8
RUNTIME = {"poll_interval": 0.02, "heartbeat_interval": 0.5, "lease_timeout": 5.0}


def noop(item: object) -> None:
    return None


def burn(item: int) -> int:
    total = 0
    for i in range(400_000):
        total += i % 7
    return item + total % 1


def fresh_db() -> str:
    return os.path.join(tempfile.mkdtemp(prefix="sqliteq-map-bench-"), "q.db")


def wait_all_done(storage: sqliteq.Storage, total: int) -> None:
    while storage.jobs.counts()["done"] < total:
        time.sleep(0.005)


def plain_drain(n: int) -> float:
    with sqliteq.Storage(fresh_db()) as storage:
        rt = sqliteq.Runtime(storage, {"default": SLOTS}, **RUNTIME)  # type: ignore[arg-type]
        rt.register("noop", lambda ctx, payload: None)
        rt.start()
        started = time.perf_counter()
        storage.jobs.enqueue_bulk([EnqueueRequest("noop", i) for i in range(n)])
        wait_all_done(storage, n)
        elapsed = time.perf_counter() - started
        rt.stop()
    return n / elapsed


def map_rate(n: int) -> float:
    started = time.perf_counter()
    results = list(sqliteq.map(noop, range(n), db=fresh_db(), workers=SLOTS, progress=False))
    elapsed = time.perf_counter() - started
    assert len(results) == n
    return n / elapsed


def cpu_rate(processes: bool, n: int = 400) -> float:
    started = time.perf_counter()
    results = list(sqliteq.map(burn, range(n), db=fresh_db(), processes=processes,
                               workers=os.cpu_count() if processes else SLOTS,
                               progress=False))
    elapsed = time.perf_counter() - started
    assert results == list(range(n))
    return n / elapsed


def cpu_limit(n: int = 400) -> float:
    """How much faster a spawned Pool of one process per core burns than one loop."""
    import multiprocessing
    started = time.perf_counter()
    for item in range(n // 2):
        burn(item)
    loop = (n // 2) / (time.perf_counter() - started)
    with multiprocessing.get_context("spawn").Pool(os.cpu_count()) as pool:
        pool.map(burn, range(os.cpu_count() or 1))          # (started up, not timed)
        started = time.perf_counter()
        pool.map(burn, range(n), chunksize=1)
        pooled = n / (time.perf_counter() - started)
    return pooled / loop


def fan_in(n: int) -> tuple[float, float]:
    """(ms to enqueue N children and the join, µs of drain per child)."""
    with sqliteq.Storage(fresh_db()) as storage:
        children = [sqliteq.new_id() for _ in range(n)]
        started = time.perf_counter()
        outcomes = storage.jobs.enqueue_bulk(
            [*(EnqueueRequest("leaf", job_id=child) for child in children),
             EnqueueRequest("join", depends_on=children)])
        enqueue_ms = (time.perf_counter() - started) * 1000
        join = outcomes[-1].job_id
        rt = sqliteq.Runtime(storage, {"default": SLOTS}, **RUNTIME)  # type: ignore[arg-type]
        rt.register("leaf", lambda ctx, payload: None)
        rt.register("join", lambda ctx, payload: None)
        started = time.perf_counter()
        rt.start()
        job = storage.jobs.wait(join, timeout=600)
        drain = time.perf_counter() - started
        rt.stop()
        assert job.state is sqliteq.JobState.DONE
    return enqueue_ms, drain / n * 1e6


def median(fn: Callable[[], float], runs: int) -> float:
    return statistics.median(fn() for _ in range(runs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", default="map,processes,fan-in")
    args = parser.parse_args()
    only = set(args.only.split(","))
    print(f"# sqliteq map and dependencies, median of {args.runs} runs, "
          f"{os.cpu_count()} cores\n")
    if "map" in only:
        plain, mapped = [], []
        for _ in range(args.runs):          # interleaved
            plain.append(plain_drain(10_000))
            mapped.append(map_rate(10_000))
        p, m = statistics.median(plain), statistics.median(mapped)
        print(f"| 10,000 no-op items | plain Runtime drain {p:,.0f} jobs/s | map {m:,.0f} "
              f"items/s | ratio {m / p:.2f} (target >= 0.5) |")
    if "processes" in only:
        threads, procs, limits = [], [], []
        for _ in range(args.runs):
            threads.append(cpu_rate(False))
            procs.append(cpu_rate(True))
            limits.append(cpu_limit())
        t, p = statistics.median(threads), statistics.median(procs)
        print(f"| 400 CPU-bound items | threads {t:.1f} items/s | processes {p:.1f} items/s "
              f"| ratio {p / t:.2f} (target >= 1.7 on 2 cores) | limit: a Pool over a loop "
              f"{statistics.median(limits):.2f}x |")
    if "fan-in" in only:
        for n in (1_000, 10_000, 100_000):
            runs = [fan_in(n) for _ in range(args.runs if n < 100_000 else 1)]
            enqueue_ms = statistics.median(r[0] for r in runs)
            per_child = statistics.median(r[1] for r in runs)
            print(f"| fan-in of {n:,} | enqueue with links {enqueue_ms:,.0f} ms "
                  f"({enqueue_ms * 1000 / n:.1f} µs/child) | drain {per_child:.0f} µs/child |")


if __name__ == "__main__":
    main()
