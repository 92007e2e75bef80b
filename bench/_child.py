"""Child-process entry points for bench/run.py, and the peer settings both sides share.

    python bench/_child.py stamp-worker SYSTEM DB   a worker whose handler prints the time.time()
                                                    it began, one JSON line per job
    python bench/_child.py drain-worker SYSTEM DB   a worker of 4 slots that starts on "go"
    python bench/_child.py idle SYSTEM DB [FSYNC]   idle worker; answers "cpu" lines on stdin
    python bench/_child.py rss SYSTEM DB N [FSYNC]  enqueue N jobs, drain them, print peak RSS
                                                    (VmHWM; ru_maxrss too, see ru_maxrss_mb)
    python bench/_child.py bulk-rss DB N            sqliteq: one enqueue_bulk of a generator
                                                    of N jobs; print peak RSS

SYSTEM is "sqliteq" or "huey-sqlite" (idle, rss), or for the two worker modes one of "sqliteq"
(DB is a file), "sqliteq-pg", "raw-psycopg", "procrastinate" or "pgqueuer" (DB is two
arguments: the server's URL and the schema). FSYNC is huey's fsync setting ("none" or "off").
Workers print "ready" once started and stop when stdin reaches end of file. Results are
printed as one JSON line on stdout.
"""

from __future__ import annotations

import contextlib
import json
import resource
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:       # benchmark the sqliteq.py next to this folder
    sys.path.insert(0, str(ROOT))

import sqliteq  # noqa: E402

SLOTS = 4
# huey's consumer polls SQLite when idle: it sleeps initial_delay after an empty poll, growing
# by `backoff` up to max_delay. These favour huey's latency and throughput (10 ms worst-case
# pickup) at some idle CPU cost. huey-redis blocks in BRPOP instead (read_timeout seconds).
HUEY_CONSUMER: dict[str, Any] = {
    "workers": SLOTS, "worker_type": "thread", "initial_delay": 0.001, "backoff": 1.15,
    "max_delay": 0.01, "periodic": False,
}
HUEY_REDIS_READ_TIMEOUT = 0.1
# huey's SqliteStorage: fsync=None leaves SQLite's default synchronous (FULL here: one fsync per
# commit); fsync=False sets synchronous=OFF. No setting gives NORMAL, which sqliteq uses.
HUEY_FSYNC = {"none": None, "off": False}


def make_huey(system: str, target: str, fsync: str = "off") -> Any:
    """A fresh huey instance without result storage: a SQLite file, or a Redis key prefix."""
    if system == "huey-sqlite":
        from huey import SqliteHuey
        return SqliteHuey(name="bench", filename=target, results=False, fsync=HUEY_FSYNC[fsync])
    if system == "huey-redis":
        from huey import RedisHuey
        return RedisHuey(name=target, results=False, read_timeout=HUEY_REDIS_READ_TIMEOUT)
    raise ValueError(f"not a huey system: {system}")


@contextlib.contextmanager
def huey_consumer(huey: Any) -> Iterator[Any]:
    """Run huey's consumer in this process (thread workers) and stop it gracefully.

    `consumer.start()` installs signal handlers; they are put back afterwards.
    """
    signals = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]
    saved = {sig: signal.getsignal(sig) for sig in signals}
    consumer = huey.create_consumer(**HUEY_CONSUMER)
    consumer.start()
    try:
        yield consumer
    finally:
        consumer.stop(graceful=True)
        for sig, handler in saved.items():
            signal.signal(sig, handler)


class Countdown:
    """Counts finished jobs across threads; `done` is set when `total` have finished."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.count = 0
        self.done = threading.Event()
        self._lock = threading.Lock()

    def tick(self) -> None:
        with self._lock:
            self.count += 1
            if self.count >= self.total:
                self.done.set()


def enqueue_noops(storage: sqliteq.Storage, n: int, chunk: int = 10_000) -> str:
    """n no-op jobs through enqueue_bulk, `chunk` per call; returns the last job id."""
    last = ""
    for low in range(0, n, chunk):
        high = min(n, low + chunk)
        requests = [sqliteq.EnqueueRequest("noop", {"i": i}) for i in range(low, high)]
        last = storage.jobs.enqueue_bulk(requests)[-1].job_id
    return last


_EMIT = threading.Lock()


def emit(data: dict[str, Any]) -> None:
    """One JSON line on stdout, whole even when several handler threads emit at once."""
    with _EMIT:
        sys.stdout.write(json.dumps(data) + "\n")
        sys.stdout.flush()


def ru_maxrss_mb() -> float:
    """Not this program's own peak when it was started by a bigger process: Linux keeps the
    larger of the parent's peak (at fork) and ours (signal->maxrss survives exec)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KiB on Linux


def peak_rss_mb() -> float:
    """This process image's own peak resident set (VmHWM), in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return ru_maxrss_mb()                                   # not Linux: the best we have


# ------------------------------------------------------------------ modes ----

def open_storage(db: list[str]) -> sqliteq.Storage:
    """A file (one argument) or a PostgreSQL schema (URL, schema)."""
    return sqliteq.Storage(db[0]) if len(db) == 1 else sqliteq.Storage(db[0], schema=db[1])


def pg_conninfo(url: str, schema: str) -> str:
    """A conninfo whose connections use `schema` (for the peers, which take no schema option)."""
    import psycopg
    return psycopg.conninfo.make_conninfo(url, options=f"-c search_path={schema}")


# sqliteq on PostgreSQL polls once a second in the worker modes, so a start well under a second
# after an enqueue is the LISTEN/NOTIFY wake-up, not a poll.
PG_POLL_INTERVAL = 1.0
PG_SLOTS_CLAIM_BATCH = 10       # raw-psycopg claims this many rows a statement


class Raw:
    """The minimal queue's SQL on PostgreSQL (the limit): one table, one partial index that
    orders the claim, autocommit, SKIP LOCKED claims of 10, one UPDATE finishing them."""

    SCHEMA = ("CREATE TABLE q (id bigserial PRIMARY KEY, payload text NOT NULL,"
              " state smallint NOT NULL DEFAULT 0, run_at bigint NOT NULL);"
              " CREATE INDEX q_claim ON q (run_at, id) WHERE state = 0")
    INSERT = "INSERT INTO q (payload, run_at) VALUES (%s, %s)"
    COPY = "COPY q (payload, run_at) FROM STDIN"
    CLAIM = ("UPDATE q SET state = 1 WHERE id IN (SELECT id FROM q WHERE state = 0"
             f" ORDER BY run_at, id LIMIT {PG_SLOTS_CLAIM_BATCH} FOR UPDATE SKIP LOCKED)"
             " RETURNING id, payload")
    FINISH = "UPDATE q SET state = 2 WHERE id = ANY(%s)"
    DONE = "SELECT count(*) FROM q WHERE state = 2"

    @staticmethod
    def work(conninfo: str, stop: threading.Event) -> None:
        """Claim and finish until `stop` is set (the queue empty: wait 1 ms and look again)."""
        import psycopg
        with psycopg.connect(conninfo, autocommit=True) as conn:
            while not stop.is_set():
                rows = conn.execute(Raw.CLAIM).fetchall()
                if rows:
                    conn.execute(Raw.FINISH, ([row[0] for row in rows],))
                else:
                    stop.wait(0.001)


def procrastinate_app(conninfo: str) -> tuple[Any, Any, Any]:
    """procrastinate's App and two async tasks (its best: a sync task runs in a thread):
    `noop`, and `stamp`, which prints the time it began."""
    import procrastinate

    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=conninfo))

    @app.task(name="noop", queue="default")
    async def noop(i: int = 0) -> None:
        return None

    @app.task(name="stamp", queue="default")
    async def stamp() -> None:
        emit({"started": time.time()})

    return app, noop, stamp


PROCRASTINATE_WORKER: dict[str, Any] = {
    "queues": ["default"], "concurrency": SLOTS, "install_signal_handlers": False,
    "listen_notify": True, "fetch_job_polling_interval": 0.05,
}
PGQUEUER_BATCH = 10


def pgqueuer_manager(queries: Any) -> Any:
    """A QueueManager with `noop` and `stamp` entrypoints."""
    from pgqueuer.qm import QueueManager

    manager = QueueManager(queries)

    @manager.entrypoint("noop")
    async def noop(job: Any) -> None:
        return None

    @manager.entrypoint("stamp")
    async def stamp(job: Any) -> None:
        emit({"started": time.time()})

    return manager


async def pgqueuer_queries(url: str, schema: str) -> tuple[Any, Any]:
    """PgQueuer on asyncpg, its first driver. (On a psycopg connection its NOTIFY watcher holds
    the one connection for up to 1 s at a time, so a wake-up waited ~1 s: p50 1,006 ms.)"""
    import asyncpg
    from pgqueuer.queries import Queries

    conn = await asyncpg.connect(url, server_settings={"search_path": schema})
    return conn, Queries.from_asyncpg_connection(conn)


def serve(system: str, db: list[str], start_on_go: bool) -> None:
    """Run `system`'s worker (4 slots) until stdin reaches end of file; with `start_on_go`,
    print "ready" and start only on a "go" line, else start first and then print "ready"."""
    def wait_for_go() -> None:
        emit({"ready": True})
        if start_on_go and sys.stdin.readline().strip() != "go":
            raise SystemExit("expected go")

    if system in ("sqliteq", "sqliteq-pg"):
        with open_storage(db) as storage:
            rt = sqliteq.Runtime(storage, queues={"default": SLOTS},
                                 **({"poll_interval": PG_POLL_INTERVAL} if len(db) > 1 else {}))
            rt.register("noop", lambda ctx, payload: None)
            rt.register("stamp", lambda ctx, payload: emit({"started": time.time()}))
            if start_on_go:
                wait_for_go()
            with rt:
                if not start_on_go:
                    wait_for_go()
                sys.stdin.read()
    elif system == "raw-psycopg":
        stop = threading.Event()
        threads = [threading.Thread(target=Raw.work, args=(pg_conninfo(*db), stop))
                   for _ in range(SLOTS)]
        wait_for_go()
        for thread in threads:
            thread.start()
        sys.stdin.read()
        stop.set()
        for thread in threads:
            thread.join()
    elif system == "procrastinate":
        import asyncio

        async def run_procrastinate() -> None:
            app, _, _ = procrastinate_app(pg_conninfo(*db))
            async with app.open_async():
                if start_on_go:
                    await asyncio.to_thread(wait_for_go)
                worker = asyncio.create_task(app.run_worker_async(**PROCRASTINATE_WORKER))
                if not start_on_go:
                    await asyncio.sleep(0.5)        # its LISTEN is set up by then
                    await asyncio.to_thread(wait_for_go)
                await asyncio.to_thread(sys.stdin.read)
                worker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await worker
        asyncio.run(run_procrastinate())
    elif system == "pgqueuer":
        import asyncio

        async def run_pgqueuer() -> None:
            conn, queries = await pgqueuer_queries(*db)
            manager = pgqueuer_manager(queries)
            if start_on_go:
                await asyncio.to_thread(wait_for_go)
            worker = asyncio.create_task(manager.run(batch_size=PGQUEUER_BATCH))
            if not start_on_go:
                await asyncio.sleep(0.5)            # its LISTEN is set up by then
                await asyncio.to_thread(wait_for_go)
            await asyncio.to_thread(sys.stdin.read)
            manager.shutdown.set()
            await worker
            await conn.close()
        asyncio.run(run_pgqueuer())
    else:
        raise SystemExit(f"no worker for {system!r}")


def idle(system: str, db: str, fsync: str) -> None:
    """A started, idle worker; reports this process's CPU time whenever asked."""
    with contextlib.ExitStack() as stack:
        if system == "sqliteq":
            storage = stack.enter_context(sqliteq.Storage(db))
            stack.enter_context(sqliteq.Runtime(storage, queues={"default": SLOTS}))
        else:
            huey = make_huey(system, db, fsync)
            stack.callback(huey.storage.close)
            stack.enter_context(huey_consumer(huey))
        emit({"ready": True})
        for line in sys.stdin:
            if line.strip() == "cpu":
                emit({"cpu": time.process_time(), "wall": time.perf_counter()})


def rss(system: str, db: str, n: int, fsync: str) -> None:
    """Enqueue n jobs (sqliteq: enqueue_bulk in chunks of 10k) and drain them with 4 slots."""
    baseline = peak_rss_mb()
    started = time.perf_counter()
    if system == "sqliteq":
        with sqliteq.Storage(db) as storage:
            last = enqueue_noops(storage, n)
            rt = sqliteq.Runtime(storage, queues={"default": SLOTS})
            rt.register("noop", lambda ctx, payload: None)
            with rt:
                storage.jobs.wait(last, timeout=600)
                while storage.jobs.counts()["done"] < n:
                    time.sleep(0.01)
    else:
        huey = make_huey(system, db, fsync)
        finished = Countdown(n)

        @huey.task()
        def noop(i: int) -> None:
            finished.tick()

        for i in range(n):
            noop(i)
        with huey_consumer(huey):
            if not finished.done.wait(600):
                raise RuntimeError(f"huey ran {finished.count} of {n} jobs in 600 s")
        huey.storage.close()
    emit({"peak_rss_mb": peak_rss_mb(), "baseline_mb": baseline, "ru_maxrss_mb": ru_maxrss_mb(),
          "seconds": time.perf_counter() - started})


def bulk_rss(db: str, n: int) -> None:
    """One enqueue_bulk call fed by a generator of n no-op requests."""
    baseline = peak_rss_mb()
    started = time.perf_counter()
    with sqliteq.Storage(db) as storage:
        outcomes = storage.jobs.enqueue_bulk(sqliteq.EnqueueRequest("noop", {"i": i})
                                             for i in range(n))
        if len(outcomes) != n:
            raise RuntimeError(f"enqueued {len(outcomes)} of {n}")
    emit({"peak_rss_mb": peak_rss_mb(), "baseline_mb": baseline,
          "seconds": time.perf_counter() - started})


def main(argv: list[str]) -> None:
    mode, *args = argv
    if mode in ("stamp-worker", "drain-worker"):
        serve(args[0], args[1:], start_on_go=mode == "drain-worker")
    elif mode == "idle":
        idle(args[0], args[1], args[2] if len(args) > 2 else "off")
    elif mode == "rss":
        rss(args[0], args[1], int(args[2]), args[3] if len(args) > 3 else "off")
    elif mode == "bulk-rss":
        bulk_rss(args[0], int(args[1]))
    else:
        raise SystemExit(f"unknown mode {mode!r}; see the docstring")


if __name__ == "__main__":
    main(sys.argv[1:])
