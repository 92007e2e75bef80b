"""How fast the dashboard serves its pages with a million jobs in the table (issue target:
the overview in <= 100 ms at p95):

    python bench/dashboard_overview.py                      # SQLite, 1,000,000 jobs
    python bench/dashboard_overview.py --pg-url postgresql://postgres@127.0.0.1:5432/test

It fills a store the way a long-lived queue looks: mostly finished jobs (done, some failed,
a few cancelled), a backlog of ready and scheduled jobs over three queues, fifty running,
and a week of per-minute metrics. Then it starts `sqliteq dashboard` in a process of its own,
as a user would, and times GET requests over HTTP: the overview (`/`), its live part
(`/live`, what the page polls), the first page of jobs, a filtered page, and `/metrics`.
It prints p50 and p95 per page over `--requests` requests, after five warm-up requests,
and the query plan of each statement the overview runs (SQLite).
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))       # measure the sqliteq.py next to this folder

import sqliteq  # noqa: E402

QUEUES = ("default", "email", "images")
PAGES = ("/", "/live", "/?range=week", "/jobs", "/jobs?state=failed&queue=email",
         "/metrics")
SCHEMA = "bench_dashboard"


def fill(storage: sqliteq.Storage, jobs: int, execute: Any) -> None:
    """`jobs` jobs, of which 3 % wait ready, 1.5 % are scheduled, 50 run, and the rest
    finished (6 % of them failed, 3 % cancelled); a week of metrics minutes."""
    started = time.monotonic()
    later = time.time() + 86400
    scheduled = jobs * 15 // 1000
    chunk = 20_000
    for first in range(0, jobs, chunk):
        storage.jobs.enqueue_bulk([sqliteq.EnqueueRequest(
            "email_send" if n % 3 else "resize", {"n": n, "to": f"user{n}@example.com"},
            queue_name=QUEUES[n % 3], run_at=later if n < scheduled else None)
            for n in range(first, min(jobs, first + chunk))])
    waiting = jobs * 3 // 100
    now = sqliteq.now_ms()
    # The oldest ids finish; the newest `waiting` stay ready (ids grow with time).
    cut = jobs - waiting
    # A ULID's last character is random: 2 in 32 fail, 1 in 32 is cancelled.
    execute(f"UPDATE jobs SET state = CASE WHEN substr(id, 26, 1) IN ('0', '1') THEN 'failed'"
            f" WHEN substr(id, 26, 1) = 'Z' THEN 'cancelled' ELSE 'done' END,"
            f" attempt = 1, started_at = run_at + 50, finished_at = run_at + 80"
            f" WHERE state = 'queued' AND id IN (SELECT id FROM jobs WHERE state = 'queued'"
            f" ORDER BY id LIMIT {cut - scheduled})")
    seed_metrics(storage, execute)       # (before: its runtime would rescue these)
    execute(f"UPDATE jobs SET state = 'running', attempt = 1, started_at = {now},"
            f" host = 'bench-host', worker = 'default-0', lease = {now + 3600_000}"
            f" WHERE id IN (SELECT id FROM jobs WHERE state = 'queued' ORDER BY id LIMIT 50)")
    print(f"filled {jobs:,} jobs and a week of metrics in {time.monotonic() - started:.0f} s")


METRICS_COLUMNS = ("done, failed, retried, cancelled, run_count, run_sum_us, run_max_us,"
                   " run_histogram, wait_count, wait_sum_us, wait_max_us, wait_histogram")


def seed_metrics(storage: sqliteq.Storage, execute: Any) -> None:
    """A week of minutes per queue: a real runtime drains 200 jobs of a queue "seed" (so
    its rollup is what sqliteq writes), and that minute is copied to every minute of the
    week before it, for each of the three queues."""
    storage.jobs.enqueue_bulk([sqliteq.EnqueueRequest("email_send", n, queue_name="seed")
                               for n in range(200)])
    runtime = sqliteq.Runtime(storage, {"seed": 4})
    runtime.register("email_send", lambda ctx, payload: None)
    with runtime:
        while storage.jobs.counts(queue="seed").get("done", 0) < 200:
            time.sleep(0.05)
    for queue in QUEUES:
        execute(f"WITH RECURSIVE back(m) AS (SELECT 1 UNION ALL SELECT m + 1 FROM back"
                f" WHERE m < {7 * 24 * 60}) INSERT INTO metrics (minute, queue, kind,"
                f" {METRICS_COLUMNS}) SELECT minute - m * 60000, '{queue}', kind,"
                f" {METRICS_COLUMNS} FROM metrics, back WHERE queue = 'seed'")


def timed_gets(url: str, path: str, requests: int) -> list[float]:
    times = []
    for i in range(5 + requests):
        began = time.perf_counter()
        with urllib.request.urlopen(url + path) as reply:
            reply.read()
        if i >= 5:
            times.append((time.perf_counter() - began) * 1000)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--pg-url", help="measure on PostgreSQL (schema bench_dashboard)")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="sqliteq-dash-"))
    try:
        if args.pg_url:
            import psycopg
            with psycopg.connect(args.pg_url, autocommit=True) as conn:
                conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
            target = ["--db", args.pg_url, "--schema", SCHEMA]
            storage = sqliteq.Storage(args.pg_url, schema=SCHEMA)
            conn = psycopg.connect(args.pg_url, autocommit=True,
                                   options=f"-c search_path={SCHEMA}")
            execute: Any = conn.execute
        else:
            import apsw
            path = folder / "q.db"
            target = ["--db", str(path)]
            storage = sqliteq.Storage(path)
            conn = apsw.Connection(str(path))
            execute = conn.execute
        with storage:
            fill(storage, args.jobs, execute)
            if args.pg_url:
                # The fill enqueued every job before finishing most: the claim index grew
                # to a million-job backlog's size, which a queue whose backlog stays near
                # 30,000 never has, and PostgreSQL's planner would scan the table instead.
                # Rebuilt, it stands for that queue (autovacuum keeps it so).
                execute("REINDEX TABLE jobs")
                execute("VACUUM ANALYZE jobs")
            execute("ANALYZE")
            if not args.pg_url:
                store = sqliteq._JobStore
                for name in ("READINESS", "RUNNING_BY_QUEUE", "FAILED_BY_QUEUE",
                             "RUNNING_JOBS"):
                    sql = getattr(store, name)
                    bound = (0,) if "?" in sql else ()
                    plan = [row[3] for row in conn.execute(
                        f"EXPLAIN QUERY PLAN {sql}", bound)]
                    print(f"{name}: {'; '.join(plan)}")
        conn.close()
        server = subprocess.Popen([sys.executable, str(ROOT / "sqliteq.py"), *target,
                                   "dashboard", "--port", "0"], stdout=subprocess.PIPE,
                                  text=True)
        try:
            line = server.stdout.readline() if server.stdout else ""
            found = re.search(r"dashboard on (http://\S+)/", line)
            assert found, f"no URL from the dashboard: {line!r}"
            print(f"{'page':34} {'p50 ms':>8} {'p95 ms':>8}   ({args.requests} requests,"
                  f" {'PostgreSQL' if args.pg_url else 'SQLite'}, {args.jobs:,} jobs)")
            for page in PAGES:
                times = timed_gets(found.group(1), page, args.requests)
                p95 = statistics.quantiles(times, n=20)[-1]
                print(f"{page:34} {statistics.median(times):8.1f} {p95:8.1f}")
        finally:
            server.terminate()
            server.wait(10)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
