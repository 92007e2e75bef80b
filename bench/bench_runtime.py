"""Runtime benchmark: drain throughput, enqueue->start latency, idle CPU.

Each run measures, on fresh database files and interleaved (sqliteq, raw, sqliteq, raw ...):

* drain: N pre-enqueued no-op jobs run by a started Runtime with 4 slots, in jobs/s, next to
  raw apsw claiming and completing the same rows in batches of 100 (the SQL limit here);
* latency: in-process enqueue -> handler start, p50 and p99 over many single jobs;
* idle CPU: process CPU time of a started, idle runtime over a few seconds, in % of one core.

    python bench/bench_runtime.py --runs 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time

import apsw

import sqliteq

CLAIM_100 = """
    UPDATE jobs SET state = 'running', attempt = attempt + 1, lease = ?1, host = 'raw',
                    started_at = ?2
    WHERE id IN (SELECT id FROM jobs WHERE queue = 'default' AND state = 'queued'
                 AND run_at <= ?2 ORDER BY priority, run_at, id LIMIT 100)
    RETURNING id"""
COMPLETE = ("UPDATE jobs SET state = 'done', result = 'null', finished_at = ?3"
            " WHERE id = ?1 AND lease = ?2 AND state = 'running'")


def fill(path: str, n: int) -> list[str]:
    with sqliteq.Storage(path) as storage:
        outs = storage.jobs.enqueue_bulk([sqliteq.EnqueueRequest("noop") for _ in range(n)])
    return [out.job_id for out in outs]


def drain_sqliteq(path: str, n: int) -> float:
    ids = fill(path, n)
    with sqliteq.Storage(path) as storage:
        rt = sqliteq.Runtime(storage, queues={"default": 4})
        rt.register("noop", lambda ctx, payload: None)
        started = time.perf_counter()
        rt.start()
        try:
            storage.jobs.wait(ids[-1], timeout=600)
            while storage.jobs.counts()["done"] < n:
                time.sleep(0.001)
            elapsed = time.perf_counter() - started
        finally:
            rt.stop()
    return n / elapsed


def drain_raw(path: str, n: int) -> float:
    fill(path, n)
    conn = apsw.Connection(path)
    conn.execute("PRAGMA journal_mode = WAL").fetchall()
    conn.execute("PRAGMA synchronous = NORMAL")
    started = time.perf_counter()
    done = 0
    lease = 0
    while done < n:
        lease += 1
        now = sqliteq.now_ms()
        conn.execute("BEGIN IMMEDIATE")
        ids = [row[0] for row in conn.execute(CLAIM_100, (lease, now))]
        conn.executemany(COMPLETE, [(job_id, lease, now) for job_id in ids])
        conn.execute("COMMIT")
        done += len(ids)
    elapsed = time.perf_counter() - started
    conn.close()
    return n / elapsed


def latency(path: str, samples: int) -> tuple[float, float]:
    with sqliteq.Storage(path) as storage:
        rt = sqliteq.Runtime(storage, queues={"default": 4})
        started: dict[str, float] = {}
        ran = threading.Event()

        def record(ctx: sqliteq.JobCtx, payload: object) -> None:
            started[ctx.job_id] = time.perf_counter()
            ran.set()

        rt.register("probe", record)
        delays = []
        with rt:
            for _ in range(samples):
                ran.clear()
                t0 = time.perf_counter()
                job_id = rt.enqueue(sqliteq.EnqueueRequest("probe")).job_id
                if not ran.wait(10):
                    raise RuntimeError("probe job did not start within 10 s")
                delays.append(started[job_id] - t0)
                time.sleep(0.002)
    delays.sort()
    return delays[len(delays) // 2] * 1000, delays[int(len(delays) * 0.99)] * 1000


def idle_cpu(path: str, seconds: float) -> float:
    with sqliteq.Storage(path) as storage:
        rt = sqliteq.Runtime(storage, queues={"default": 4})
        with rt:
            time.sleep(0.5)
            cpu0, wall0 = time.process_time(), time.perf_counter()
            time.sleep(seconds)
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    return cpu / wall * 100


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--idle-seconds", type=float, default=5.0)
    parser.add_argument("--db-dir", default=None)
    args = parser.parse_args()
    folder = args.db_dir or tempfile.mkdtemp(prefix="sqliteq-bench-")
    results: dict[str, list[float]] = {k: [] for k in ("drain", "raw", "p50", "p99", "idle")}
    for run in range(args.runs):
        paths = [os.path.join(folder, f"run{run}-{name}.db") for name in "abcd"]
        results["drain"].append(drain_sqliteq(paths[0], args.jobs))
        results["raw"].append(drain_raw(paths[1], args.jobs))
        p50, p99 = latency(paths[2], args.samples)
        results["p50"].append(p50)
        results["p99"].append(p99)
        results["idle"].append(idle_cpu(paths[3], args.idle_seconds))
        print(f"run {run + 1}: drain {results['drain'][-1]:,.0f}/s  raw {results['raw'][-1]:,.0f}/s"
              f"  p50 {p50:.2f} ms  p99 {p99:.2f} ms  idle {results['idle'][-1]:.2f} %",
              flush=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    ratio = med["drain"] / med["raw"]
    rows = [
        ("drain, 4 slots (jobs/s)", f"{med['drain']:,.0f}", f"{med['raw']:,.0f}",
         f"{ratio:.2f}x", ">= 10,000/s and >= 0.25x raw",
         med["drain"] >= 10_000 and ratio >= 0.25),
        ("enqueue->start p50 (ms)", f"{med['p50']:.2f}", "", "", "<= 5 ms", med["p50"] <= 5),
        ("enqueue->start p99 (ms)", f"{med['p99']:.2f}", "", "", "", True),
        ("idle CPU (% of a core)", f"{med['idle']:.2f}", "", "", "<= 2 %", med["idle"] <= 2),
    ]
    print(f"\nmedians of {args.runs} runs, {args.jobs:,} jobs, {args.samples} latency samples\n")
    print("| scenario | sqliteq | raw apsw | ratio | target | |")
    print("|---|---|---|---|---|---|")
    for name, ours, raw, r, target, ok in rows:
        print(f"| {name} | {ours} | {raw} | {r} | {target} | {'PASS' if ok else 'MISS'} |")


if __name__ == "__main__":
    main()
