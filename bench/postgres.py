"""sqliteq on PostgreSQL against the limit and the PostgreSQL queues a user would pick instead.

    python bench/postgres.py [--runs 3] [--jobs 20000] [--url postgresql://…]

Systems, each measured in a fresh schema of the local server (dropped afterwards), in one
interleaved run (every repetition visits the systems in a new random order; the table shows
medians):

* ``sqliteq-pg`` — `Storage(url, schema=…)`, a `Runtime` of 4 slots;
* ``raw-psycopg`` — the limit: one table, one partial index ordering the claim, autocommit
  INSERTs, COPY for bulk, 4 threads claiming 10 rows a statement with
  ``FOR UPDATE SKIP LOCKED`` and finishing them with one UPDATE;
* ``procrastinate`` — its App on a PsycopgConnector, ``defer`` / ``batch_defer``, a worker of
  concurrency 4 run until the queue is empty (``wait=False``);
* ``pgqueuer`` — ``Queries.enqueue`` (lists for bulk), a QueueManager with batch size 10 and
  no bound on concurrent tasks (its default; it refuses 4 with that batch), in drain mode.

Scenarios: ``enqueue-1t`` (one job per call, jobs/s), ``bulk`` (one call for all, jobs/s),
``drain`` (no-op jobs, pre-enqueued and not timed, until all ran, jobs/s), and for sqliteq
``latency-xproc``: a worker in another process (poll interval 1 s) and single jobs enqueued
here; started_at - created_at, both on the server's clock (p50 and p99, ms).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import sqliteq  # noqa: E402

SCENARIOS = ("enqueue-1t", "bulk", "drain", "latency-xproc")


class NotApplicable(Exception):
    """This system has no way to do this scenario."""


@contextmanager
def fresh_schema(url: str) -> Iterator[str]:
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield schema
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


def in_schema(url: str, schema: str) -> str:
    """A conninfo whose connections use `schema` (for systems that take no schema option)."""
    return psycopg.conninfo.make_conninfo(url, options=f"-c search_path={schema}")


def rate(n: int, seconds: float) -> float:
    return n / seconds


# ------------------------------------------------------------- systems ----

class Sqliteq:
    name = "sqliteq-pg"

    def __init__(self, url: str) -> None:
        self.url = url

    def enqueue_1t(self, schema: str, n: int) -> float:
        with sqliteq.Storage(self.url, schema=schema) as storage:
            started = time.perf_counter()
            for i in range(n):
                storage.jobs.enqueue(sqliteq.EnqueueRequest("noop", {"i": i}))
            return rate(n, time.perf_counter() - started)

    def bulk(self, schema: str, n: int) -> float:
        with sqliteq.Storage(self.url, schema=schema) as storage:
            started = time.perf_counter()
            storage.jobs.enqueue_bulk(sqliteq.EnqueueRequest("noop", {"i": i})
                                      for i in range(n))
            return rate(n, time.perf_counter() - started)

    def drain(self, schema: str, n: int) -> float:
        with sqliteq.Storage(self.url, schema=schema) as storage:
            storage.jobs.enqueue_bulk([sqliteq.EnqueueRequest("noop", {"i": i})
                                       for i in range(n)])
            rt = sqliteq.Runtime(storage, {"default": 4})
            rt.register("noop", lambda ctx, payload: None)
            started = time.perf_counter()
            with rt:
                while storage.jobs.counts()["done"] < n:
                    time.sleep(0.01)
            return rate(n, time.perf_counter() - started)

    WORKER = ("import sys, sqliteq\n"
              "storage = sqliteq.Storage(sys.argv[1], schema=sys.argv[2])\n"
              "rt = sqliteq.Runtime(storage, {'default': 4}, poll_interval=1.0)\n"
              "rt.register('noop', lambda ctx, payload: None)\n"
              "rt.run()\n")

    def latency_xproc(self, schema: str, samples: int) -> list[float]:
        with sqliteq.Storage(self.url, schema=schema) as storage:
            child = subprocess.Popen([sys.executable, "-c", self.WORKER, self.url, schema],
                                     env={"PYTHONPATH": str(REPO)})
            try:
                while not storage.processes.list():
                    time.sleep(0.05)
                time.sleep(0.5)
                latencies = []
                for _ in range(samples):
                    time.sleep(random.uniform(0.02, 0.1))   # the worker idle in between
                    job_id = storage.jobs.enqueue(sqliteq.EnqueueRequest("noop")).job_id
                    job = storage.jobs.wait(job_id, timeout=30)
                    assert job.started_at is not None
                    latencies.append((job.started_at - job.created_at).total_seconds())
                return latencies
            finally:
                child.terminate()
                child.wait(30)


class RawPsycopg:
    name = "raw-psycopg"
    SCHEMA = ("CREATE TABLE q (id bigserial PRIMARY KEY, payload text NOT NULL,"
              " state smallint NOT NULL DEFAULT 0, run_at bigint NOT NULL);"
              " CREATE INDEX q_claim ON q (run_at, id) WHERE state = 0")
    INSERT = "INSERT INTO q (payload, run_at) VALUES (%s, %s)"
    CLAIM = ("UPDATE q SET state = 1 WHERE id IN (SELECT id FROM q WHERE state = 0"
             " ORDER BY run_at, id LIMIT 10 FOR UPDATE SKIP LOCKED) RETURNING id, payload")
    FINISH = "UPDATE q SET state = 2 WHERE id = ANY(%s)"

    def __init__(self, url: str) -> None:
        self.url = url

    def connect(self, schema: str) -> psycopg.Connection[Any]:
        return psycopg.connect(in_schema(self.url, schema), autocommit=True)

    def enqueue_1t(self, schema: str, n: int) -> float:
        with self.connect(schema) as conn:
            conn.execute(self.SCHEMA)
            started = time.perf_counter()
            for i in range(n):
                conn.execute(self.INSERT, (f'{{"i":{i}}}', sqliteq.now_ms()))
            return rate(n, time.perf_counter() - started)

    def bulk(self, schema: str, n: int) -> float:
        with self.connect(schema) as conn:
            conn.execute(self.SCHEMA)
            started = time.perf_counter()
            now = sqliteq.now_ms()
            with conn.cursor().copy("COPY q (payload, run_at) FROM STDIN") as copy:
                for i in range(n):
                    copy.write_row((f'{{"i":{i}}}', now))
            return rate(n, time.perf_counter() - started)

    def drain(self, schema: str, n: int) -> float:
        with self.connect(schema) as conn:
            conn.execute(self.SCHEMA)
            with conn.cursor().copy("COPY q (payload, run_at) FROM STDIN") as copy:
                for i in range(n):
                    copy.write_row((f'{{"i":{i}}}', i))

        def work() -> None:
            with self.connect(schema) as own:
                while rows := own.execute(self.CLAIM).fetchall():
                    own.execute(self.FINISH, ([row[0] for row in rows],))

        threads = [threading.Thread(target=work) for _ in range(4)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return rate(n, time.perf_counter() - started)

    def latency_xproc(self, schema: str, samples: int) -> list[float]:
        raise NotApplicable("no worker process")


class Procrastinate:
    name = "procrastinate"

    def __init__(self, url: str) -> None:
        self.url = url

    @contextmanager
    def app(self, schema: str) -> Iterator[tuple[Any, Any]]:
        import procrastinate

        app = procrastinate.App(connector=procrastinate.PsycopgConnector(
            conninfo=in_schema(self.url, schema)))

        @app.task(name="noop", queue="default")
        def noop(i: int) -> None:
            return None

        with app.open():
            app.schema_manager.apply_schema()
            yield app, noop

    def enqueue_1t(self, schema: str, n: int) -> float:
        with self.app(schema) as (_, noop):
            started = time.perf_counter()
            for i in range(n):
                noop.defer(i=i)
            return rate(n, time.perf_counter() - started)

    def bulk(self, schema: str, n: int) -> float:
        with self.app(schema) as (_, noop):
            started = time.perf_counter()
            noop.batch_defer(*({"i": i} for i in range(n)))
            return rate(n, time.perf_counter() - started)

    def drain(self, schema: str, n: int) -> float:
        with self.app(schema) as (app, noop):
            noop.batch_defer(*({"i": i} for i in range(n)))
            started = time.perf_counter()
            app.run_worker(queues=["default"], concurrency=4, wait=False,
                           install_signal_handlers=False)
            return rate(n, time.perf_counter() - started)

    def latency_xproc(self, schema: str, samples: int) -> list[float]:
        raise NotApplicable("not measured here")


class PgQueuer:
    name = "pgqueuer"

    def __init__(self, url: str) -> None:
        self.url = url

    async def queries(self, schema: str) -> tuple[Any, Any]:
        from pgqueuer.queries import Queries

        conn = await psycopg.AsyncConnection.connect(in_schema(self.url, schema),
                                                     autocommit=True)
        queries = Queries.from_psycopg_connection(conn)
        await queries.install()
        return conn, queries

    def timed(self, schema: str, n: int, body: Callable[[Any], Any]) -> float:
        """Jobs/s of `await body(queries)` for n jobs, on a fresh install."""
        async def go() -> float:
            conn, queries = await self.queries(schema)
            try:
                started = time.perf_counter()
                await body(queries)
                return rate(n, time.perf_counter() - started)
            finally:
                await conn.close()
        return asyncio.run(go())

    def enqueue_1t(self, schema: str, n: int) -> float:
        async def body(queries: Any) -> None:
            for i in range(n):
                await queries.enqueue("noop", f'{{"i":{i}}}'.encode())
        return self.timed(schema, n, body)

    def bulk(self, schema: str, n: int) -> float:
        async def body(queries: Any) -> None:
            await queries.enqueue(["noop"] * n, [f'{{"i":{i}}}'.encode() for i in range(n)],
                                  [0] * n)
        return self.timed(schema, n, body)

    def drain(self, schema: str, n: int) -> float:
        from pgqueuer.qm import QueueManager
        from pgqueuer.types import QueueExecutionMode

        async def go() -> float:
            conn, queries = await self.queries(schema)
            await queries.enqueue(["noop"] * n, [b"{}"] * n, [0] * n)
            manager = QueueManager(queries)

            @manager.entrypoint("noop")
            async def noop(job: Any) -> None:
                return None

            started = time.perf_counter()
            # (It refuses a bound below twice the batch size: its default, no bound, is
            # its best for handlers that await nothing.)
            await manager.run(batch_size=10, mode=QueueExecutionMode.drain)
            elapsed = time.perf_counter() - started
            await conn.close()
            return rate(n, elapsed)
        return asyncio.run(go())

    def latency_xproc(self, schema: str, samples: int) -> list[float]:
        raise NotApplicable("not measured here")


# ------------------------------------------------------------- the run ----

def measure(system: Any, scenario: str, schema: str, jobs: int) -> list[float]:
    if scenario == "enqueue-1t":
        return [system.enqueue_1t(schema, max(500, jobs // 10))]
    if scenario == "bulk":
        return [system.bulk(schema, jobs)]
    if scenario == "drain":
        return [system.drain(schema, jobs)]
    latencies = system.latency_xproc(schema, 40)
    return [statistics.median(latencies) * 1000, statistics.quantiles(latencies, n=100)[98] * 1000]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--systems", default="sqliteq-pg,raw-psycopg,procrastinate,pgqueuer")
    args = parser.parse_args()
    systems: list[Any] = [cls(args.url) for cls in (Sqliteq, RawPsycopg, Procrastinate, PgQueuer)
                          if cls.name in args.systems.split(",")]
    results: dict[tuple[str, str], list[list[float]]] = {}
    notes: dict[tuple[str, str], str] = {}
    for run in range(args.runs):
        for scenario in SCENARIOS:
            order = random.sample(systems, len(systems))
            for system in order:
                key = (scenario, system.name)
                if key in notes:
                    continue
                with fresh_schema(args.url) as schema:
                    try:
                        value = measure(system, scenario, schema, args.jobs)
                    except NotApplicable as exc:
                        notes[key] = f"n/a ({exc})"
                        continue
                    except Exception as exc:     # a peer that cannot run here: say why
                        notes[key] = f"error: {type(exc).__name__}: {exc}"[:120]
                        continue
                results.setdefault(key, []).append(value)
                print(f"run {run + 1} {scenario:13} {system.name:13} "
                      f"{', '.join(f'{v:,.1f}' for v in value)}", file=sys.stderr, flush=True)
    print_table(systems, results, notes, args)


def print_table(systems: list[Any], results: dict[tuple[str, str], list[list[float]]],
                notes: dict[tuple[str, str], str], args: argparse.Namespace) -> None:
    def median(key: tuple[str, str], index: int = 0) -> float | None:
        runs = results.get(key)
        return statistics.median(r[index] for r in runs) if runs else None

    print(f"\nPostgreSQL, local server; {args.jobs:,} jobs for bulk and drain, "
          f"{max(500, args.jobs // 10):,} single enqueues; median of {args.runs} interleaved "
          f"runs\n")
    print("| scenario | " + " | ".join(s.name for s in systems) + " | sqliteq / raw |")
    print("|---|" + "---|" * (len(systems) + 1))
    for scenario in SCENARIOS:
        cells = []
        for system in systems:
            key = (scenario, system.name)
            if key in notes:
                cells.append(notes[key])
            elif scenario == "latency-xproc":
                cells.append(f"p50 {median(key):.1f} ms, p99 {median(key, 1):.1f} ms")
            else:
                value = median(key)
                cells.append("-" if value is None else f"{value:,.0f} jobs/s")
        ours, limit = median((scenario, "sqliteq-pg")), median((scenario, "raw-psycopg"))
        ratio = f"{ours / limit:.2f}x" if ours and limit and scenario != "latency-xproc" else "-"
        print(f"| {scenario} | " + " | ".join(cells) + f" | {ratio} |")


if __name__ == "__main__":
    main()
