"""One command for every benchmark: sqliteq next to raw apsw and its peers, interleaved.

    python bench/run.py                    # full: warm-up + 5 repetitions (long: builds 5M rows)
    python bench/run.py --quick            # about a minute or two: smaller N, 3 repetitions
    python bench/run.py --only drain,bulk --runs 3 --out /tmp/r.json --chart /tmp/r.png
    python bench/run.py --systems raw-psycopg,sqliteq-pg,procrastinate,pgqueuer  # PostgreSQL

Every repetition runs every selected scenario for every system in turn (A B C D E, A B C D E,
...), each measurement on a fresh database file in a temporary folder (`--db-dir`). A warm-up
pass runs first and is not counted: the in-process scenarios at a quarter of N (it loads code
and caches, and builds the claim-latency tables); the child-process scenarios (latency-xproc,
idle-cpu, peak-rss) start a fresh interpreter every time, so they have nothing to warm and
skip it. Reported figures are medians. Output: a markdown table on stdout, JSON (`--out`), a
bar chart of the throughput scenarios (`--chart`); progress lines on stderr.

Each system is one adapter class below (RawApsw, Sqliteq, Huey, HueyRedis, PersistQueue,
LiteQueueSystem; on PostgreSQL RawPsycopg, SqliteqPg, Procrastinate, PgQueuer) with a method
per scenario; its `notes` (synchronous/fsync setting, thread model) are printed with the
results. The PostgreSQL systems run on `--pg-url` (default $SQLITEQ_BENCH_PG or the local
test server), each measurement in a fresh schema dropped afterwards; they are skipped when
the server or their package is missing. SCENARIOS is the registry; TARGETS are sqliteq's
goals, on SQLite against raw-apsw and on PostgreSQL against raw-psycopg. Child-process work
lives in bench/_child.py.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import platform
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import apsw
import ulid

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:       # benchmark the sqliteq.py next to this folder
    sys.path.insert(0, str(ROOT))

from _child import (  # noqa: E402
    PGQUEUER_BATCH,
    PROCRASTINATE_WORKER,
    SLOTS,
    Countdown,
    Raw,
    enqueue_noops,
    huey_consumer,
    make_huey,
    pg_conninfo,
    pgqueuer_manager,
    pgqueuer_queries,
    procrastinate_app,
)

import sqliteq  # noqa: E402

CHILD = HERE / "_child.py"
Metrics = dict[str, float]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def p50(values: list[float]) -> float:
    return statistics.median(values)


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


def size_label(n: int) -> str:
    if n >= 1_000_000 and n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    if n >= 1000 and n % 1000 == 0:
        return f"{n // 1000}k"
    return str(n)


# ------------------------------------------------------------ parameters ----

@dataclass(frozen=True)
class Sizes:
    enqueue_1t: int
    enqueue_8t: int
    bulk: int
    drain: int
    latency_inproc: int
    latency_xproc: int
    idle_seconds: float
    claim_tables: tuple[int, ...]
    claim_samples: int
    rss_jobs: int
    bulk_rss_jobs: int

    def warmup(self) -> Sizes:
        """A quarter of every N, same claim tables: the warm-up loads code and caches and
        builds the claim tables; its figures are not counted."""
        quarter = {name: max(10, value // 4) for name, value in asdict(self).items()
                   if isinstance(value, int)}
        return replace(self, **quarter)


FULL = Sizes(enqueue_1t=5000, enqueue_8t=16_000, bulk=100_000, drain=20_000, latency_inproc=500,
             latency_xproc=200, idle_seconds=10.0, claim_tables=(10_000, 1_000_000, 5_000_000),
             claim_samples=200, rss_jobs=200_000, bulk_rss_jobs=1_000_000)
QUICK = Sizes(enqueue_1t=1000, enqueue_8t=4000, bulk=20_000, drain=5000, latency_inproc=150,
              latency_xproc=60, idle_seconds=3.0, claim_tables=(10_000, 200_000),
              claim_samples=200, rss_jobs=50_000, bulk_rss_jobs=200_000)
# Not a measurement: every scenario once at a toy size, so a test can prove the bench still runs.
SMOKE = Sizes(enqueue_1t=40, enqueue_8t=80, bulk=200, drain=200, latency_inproc=5,
              latency_xproc=5, idle_seconds=0.5, claim_tables=(1000,), claim_samples=5,
              rss_jobs=200, bulk_rss_jobs=1000)
THREADS_8T = 8
IDLE_SETTLE_SECONDS = 0.5       # after "ready", before the idle window opens
LATENCY_GAP_SECONDS = 0.01      # random 0..this pause before each in-process probe
XPROC_POLL_INTERVAL = 0.05      # sqliteq's default poll_interval, used by the xproc child
PAYLOAD_SEPARATORS = (",", ":")


@dataclass
class Context:
    """What a measurement needs besides its own fresh database path."""

    sizes: Sizes
    run_dir: Path
    huey_fsync: str
    claim_tables: ClaimTables


class NotApplicable(Exception):
    """This system has no way to do this scenario (no bulk API, no worker, ...)."""


# --------------------------------------------------------------- helpers ----

def raw_connection(path: str, busy_timeout_ms: int = 5000) -> apsw.Connection:
    conn = apsw.Connection(path)
    conn.setbusytimeout(busy_timeout_ms)
    # One statement per execute: apsw runs the later statements of a multi-statement string
    # only as the cursor is iterated, so "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL"
    # would silently leave synchronous=FULL.
    conn.execute("PRAGMA journal_mode=WAL").fetchall()
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def create_sqliteq_file(path: str) -> None:
    """sqliteq's schema, created by opening and closing a Storage."""
    sqliteq.Storage(path).close()


def raw_row(i: int, now: int) -> tuple[Any, ...]:
    """What any queue must do per job: an id, the payload as compact JSON, the time."""
    payload = json.dumps({"i": i}, separators=PAYLOAD_SEPARATORS)
    return tuple(sqliteq._NewJob(str(ulid.ULID()), "noop", "default", payload, "queued", 0, now,
                                 5, None, now, None))   # in _JobStore.INSERT's column order


def fill_sqliteq(path: str, n: int) -> str:
    """Pre-enqueue n no-op jobs (not timed); returns the last job id."""
    with sqliteq.Storage(path) as storage:
        return enqueue_noops(storage, n)


def run_threads(count: int, setup: Callable[[int], Callable[[], None]]) -> float:
    """Start `count` threads; each runs setup(index) untimed, then the returned work, all
    released together. Returns the wall time from release until the last one finished."""
    barrier = threading.Barrier(count + 1)
    errors: list[BaseException] = []

    def body(index: int) -> None:
        try:
            work = setup(index)
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()
            return
        try:
            barrier.wait()
            work()
        except threading.BrokenBarrierError:
            return                              # another thread's setup failed
        except BaseException as exc:            # reported by the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    try:
        barrier.wait()
    except threading.BrokenBarrierError:
        pass
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{len(errors)} thread(s) failed: {errors[0]!r}") from errors[0]
    return elapsed


def split(total: int, parts: int) -> list[range]:
    """range(total) cut into `parts` contiguous pieces (some empty when total < parts)."""
    return [range(total * k // parts, total * (k + 1) // parts) for k in range(parts)]


class Child:
    """A bench/_child.py process talking JSON lines over its stdin and stdout."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, str(CHILD), *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise RuntimeError(f"child {self.proc.args[2:]} exited with {self.proc.returncode}")
        return json.loads(line)  # type: ignore[no-any-return]

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def ask(self, line: str) -> dict[str, Any]:
        self.send(line)
        return self.read()

    def close(self, timeout: float = 60) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"child {self.proc.args[2:]} did not stop; killed") from None
        if self.proc.returncode:
            raise RuntimeError(f"child {self.proc.args[2:]} exited with {self.proc.returncode}")

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if exc_info[0] is None:
            self.close()
        else:
            self.proc.kill()
            self.proc.wait()


def idle_cpu_in_child(system: str, path: str, seconds: float, fsync: str) -> Metrics:
    """CPU time a started, idle worker uses, as % of one core, reported by the child."""
    with Child("idle", system, path, fsync) as child:
        child.read()                                    # {"ready": true}
        time.sleep(IDLE_SETTLE_SECONDS)
        first = child.ask("cpu")
        time.sleep(seconds)
        last = child.ask("cpu")
    return {"cpu_pct": (last["cpu"] - first["cpu"]) / (last["wall"] - first["wall"]) * 100}


def bulk_peak_rss(system: System, path: str, ctx: Context) -> Metrics:
    """Peak RSS of one bulk enqueue of a generator, in a fresh interpreter (sqliteq only:
    no peer has a bulk API)."""
    if system.name != "sqliteq":
        raise NotApplicable
    with Child("bulk-rss", path, str(ctx.sizes.bulk_rss_jobs)) as child:
        out = child.read()
    return {key: out[key] for key in ("peak_rss_mb", "baseline_mb")}


def peak_rss_in_child(system: str, path: str, n: int, fsync: str) -> Metrics:
    with Child("rss", system, path, str(n), fsync) as child:
        out = child.read()
    return {key: out[key] for key in ("peak_rss_mb", "baseline_mb", "ru_maxrss_mb")}


def drain_in_children(system: str, db: list[str], n: int, done: Callable[[], int],
                      processes: int = 2) -> Metrics:
    """Jobs/s of `processes` bench/_child.py drain workers (4 slots each) on n queued jobs:
    timed from "go" until `done()` (polled every 5 ms) reaches n."""
    with contextlib.ExitStack() as stack:
        children = [stack.enter_context(Child("drain-worker", system, *db))
                    for _ in range(processes)]
        for child in children:
            child.read()                                # {"ready": true}
        started = time.perf_counter()
        for child in children:
            child.send("go")
        deadline = started + 600
        while (finished := done()) < n:
            if time.perf_counter() > deadline:
                raise RuntimeError(f"{finished} of {n} jobs done after 600 s")
            time.sleep(0.005)
        elapsed = time.perf_counter() - started
    return {"jobs_per_s": n / elapsed}


def stamped_latency(system: str, db: list[str], samples: int,
                    enqueue: Callable[[], object]) -> Metrics:
    """Enqueue -> start across processes: a bench/_child.py stamp worker prints time.time()
    as each handler begins; we subtract time.time() taken before the enqueue (one machine,
    one wall clock). A random pause before each send avoids locking onto a poll phase."""
    delays = []
    with Child("stamp-worker", system, *db) as child:
        child.read()                                    # {"ready": true}
        for _ in range(samples):
            time.sleep(random.uniform(0, XPROC_POLL_INTERVAL))
            sent = time.time()
            enqueue()
            delays.append(child.read()["started"] - sent)
    return {"p50_ms": p50(delays) * 1000, "p99_ms": p99(delays) * 1000}


class ClaimTables:
    """sqliteq files holding N finished ("done") jobs, built once per run (it is expensive)
    and shared by the repetitions; the probe jobs a measurement adds are deleted after it."""

    INSERT_DONE = ("INSERT INTO jobs (id, kind, queue, payload, state, priority, run_at, attempt,"
                   " max_attempts, lease, worker, host, result, created_at, started_at,"
                   " finished_at) VALUES (?1, 'noop', 'default', ?2, 'done', 0, ?3, 1, 5, 1,"
                   " 'default-0-bench', 'bench', 'null', ?3, ?3, ?3 + 1)")
    CHUNK = 250_000

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.paths: dict[int, str] = {}
        self.build_seconds: dict[str, float] = {}

    def path(self, size: int) -> str:
        if size not in self.paths:
            self.paths[size] = self._build(size)
        return self.paths[size]

    def _build(self, size: int) -> str:
        path = str(self.folder / f"claim-table-{size_label(size)}.db")
        log(f"  building the claim-latency table: {size:,} done rows (once per run) ...")
        started = time.perf_counter()
        create_sqliteq_file(path)
        conn = raw_connection(path)
        conn.execute("PRAGMA cache_size = -65536")
        # An hour old, so the janitor (7-day retention) leaves them; ids "00..." sort before
        # every real ULID ("01..."), so new jobs never interleave with them.
        base = now_ms() - 3_600_000
        for low in range(0, size, self.CHUNK):
            rows = ((f"00{i:024d}", f'{{"i":{i}}}', base + i // 1000)
                    for i in range(low, min(size, low + self.CHUNK)))
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(self.INSERT_DONE, rows)
            conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        conn.close()
        seconds = time.perf_counter() - started
        self.build_seconds[size_label(size)] = round(seconds, 2)
        log(f"  built in {seconds:.1f} s ({os.path.getsize(path) / 1e6:,.0f} MB)")
        return path

    @staticmethod
    def remove_probes(path: str) -> None:
        conn = raw_connection(path)
        conn.execute("DELETE FROM jobs WHERE id >= '01'")
        conn.close()


def sqliteq_probe_latency(storage: sqliteq.Storage, samples: int, gap: float) -> list[float]:
    """Enqueue -> handler start, in seconds, for single jobs into an idle started Runtime."""
    rt = sqliteq.Runtime(storage, queues={"default": SLOTS})
    started: dict[str, float] = {}
    ran = threading.Event()

    def probe(ctx: sqliteq.JobCtx, payload: object) -> None:
        started[ctx.job_id] = time.perf_counter()
        ran.set()

    rt.register("probe", probe)
    delays = []
    with rt:
        for _ in range(samples):
            time.sleep(random.uniform(0, gap))
            ran.clear()
            t0 = time.perf_counter()
            job_id = storage.jobs.enqueue(sqliteq.EnqueueRequest("probe")).job_id
            if not ran.wait(10):
                raise RuntimeError("probe job did not start within 10 s")
            delays.append(started[job_id] - t0)
            storage.jobs.wait(job_id, timeout=10)       # idle again before the next probe
    return delays


# --------------------------------------------------------------- systems ----

class System:
    """One queue implementation. A scenario it cannot do raises NotApplicable."""

    name = ""
    notes = ""

    def unavailable(self) -> str | None:
        """Why this system cannot run on this machine, or None."""
        return None

    def fresh(self, path: Path) -> str:
        """The fresh database location for one measurement (a file, or a folder)."""
        return str(path.with_suffix(".db"))

    def cleanup(self, location: str) -> None:
        """Remove what `fresh` named, after the measurement."""
        remove_db(location)

    def enqueue_1t(self, path: str, n: int) -> Metrics:
        raise NotApplicable

    def enqueue_8t(self, path: str, n: int) -> Metrics:
        raise NotApplicable

    def bulk(self, path: str, n: int) -> Metrics:
        raise NotApplicable

    def drain(self, path: str, n: int) -> Metrics:
        raise NotApplicable

    def drain_2proc(self, path: str, n: int) -> Metrics:
        raise NotApplicable

    def latency_inproc(self, path: str, samples: int) -> Metrics:
        raise NotApplicable

    def latency_xproc(self, path: str, samples: int) -> Metrics:
        raise NotApplicable

    def idle_cpu(self, path: str, ctx: Context) -> Metrics:
        raise NotApplicable

    def claim_latency(self, ctx: Context) -> Metrics:
        raise NotApplicable

    def peak_rss(self, path: str, ctx: Context) -> Metrics:
        raise NotApplicable

    def metrics_cost(self, path: str, n: int) -> Metrics:
        raise NotApplicable


class RawApsw(System):
    name = "raw-apsw"
    notes = ("apsw on sqliteq's schema, WAL, synchronous=NORMAL; sqliteq's own INSERT / CLAIM /"
             " FINISH_DONE statements, rows built in the timer (json.dumps, str(ulid.ULID()),"
             " ms time). enqueue-8t: 8 threads, a connection each, busy_timeout 5 s. drain: one"
             " thread, claim 100 + complete them per transaction: the SQL limit.")
    # The statements, and how a row and a claim's parameters look: RawMinimal swaps them.
    INSERT = sqliteq._JobStore.INSERT
    CLAIM = sqliteq._JobStore.CLAIM
    FINISH = sqliteq._JobStore.FINISH_DONE

    def create(self, path: str) -> None:
        create_sqliteq_file(path)

    def row(self, i: int, now: int) -> tuple[Any, ...]:
        return raw_row(i, now)

    def claim_params(self, lease: int, now: int, limit: int) -> tuple[Any, ...]:
        return (lease, "raw", now, "default", limit)

    def finish_params(self, job_id: Any, lease: int, now: int) -> tuple[Any, ...]:
        return (job_id, lease, "null", "default-0-raw", now)

    def enqueue_1t(self, path: str, n: int) -> Metrics:
        self.create(path)
        conn = raw_connection(path)
        started = time.perf_counter()
        for i in range(n):
            row = self.row(i, now_ms())
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(self.INSERT, row)
            conn.execute("COMMIT")
        elapsed = time.perf_counter() - started
        conn.close()
        return {"jobs_per_s": n / elapsed}

    def enqueue_8t(self, path: str, n: int) -> Metrics:
        self.create(path)
        errors = [0] * THREADS_8T
        connections: list[apsw.Connection] = []

        def setup(index: int) -> Callable[[], None]:
            conn = raw_connection(path)
            connections.append(conn)

            def work() -> None:
                for i in split(n, THREADS_8T)[index]:
                    row = self.row(i, now_ms())
                    try:
                        conn.execute("BEGIN IMMEDIATE")
                        try:
                            conn.execute(self.INSERT, row)
                            conn.execute("COMMIT")
                        except BaseException:
                            # Left open, the write lock would stall every other thread
                            # for its busy timeout on each of its remaining inserts.
                            conn.execute("ROLLBACK")
                            raise
                    except (apsw.BusyError, apsw.LockedError):
                        errors[index] += 1
            return work

        elapsed = run_threads(THREADS_8T, setup)
        for conn in connections:
            conn.close()
        return {"jobs_per_s": (n - sum(errors)) / elapsed, "errors": sum(errors)}

    def bulk(self, path: str, n: int) -> Metrics:
        self.create(path)
        conn = raw_connection(path)
        started = time.perf_counter()
        now = now_ms()
        rows = [self.row(i, now) for i in range(n)]
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(self.INSERT, rows)
        conn.execute("COMMIT")
        elapsed = time.perf_counter() - started
        conn.close()
        return {"jobs_per_s": n / elapsed}

    def fill(self, path: str, n: int) -> None:
        fill_sqliteq(path, n)

    def drain(self, path: str, n: int) -> Metrics:
        self.fill(path, n)
        conn = raw_connection(path)
        done = lease = 0
        started = time.perf_counter()
        while done < n:
            lease += 1
            now = now_ms()
            conn.execute("BEGIN IMMEDIATE")
            rows = conn.execute(self.CLAIM, self.claim_params(lease, now, 100)).fetchall()
            conn.executemany(self.FINISH, [self.finish_params(row[0], lease, now)
                                           for row in rows])
            conn.execute("COMMIT")
            if not rows:
                raise RuntimeError(f"raw drain found no queued jobs after {done} of {n}")
            done += len(rows)
        elapsed = time.perf_counter() - started
        conn.close()
        return {"jobs_per_s": n / elapsed}

    def claim_latency(self, ctx: Context) -> Metrics:
        """sqliteq's claim statement alone (LIMIT 1), one transaction, per table size."""
        out: Metrics = {}
        for size in ctx.sizes.claim_tables:
            path = ctx.claim_tables.path(size)
            conn = raw_connection(path)
            times = []
            try:
                for lease in range(1, ctx.sizes.claim_samples + 1):
                    now = now_ms()
                    conn.execute(sqliteq._JobStore.INSERT, raw_row(lease, now))
                    t0 = time.perf_counter()
                    conn.execute("BEGIN IMMEDIATE")
                    rows = conn.execute(sqliteq._JobStore.CLAIM,
                                        (lease, "raw", now, "default", 1)).fetchall()
                    conn.execute("COMMIT")
                    times.append(time.perf_counter() - t0)
                    if len(rows) != 1:
                        raise RuntimeError(f"claim returned {len(rows)} rows")
            finally:
                conn.close()
                ClaimTables.remove_probes(path)
            out[f"p50_ms@{size_label(size)}"] = p50(times) * 1000
        sizes = ctx.sizes.claim_tables
        out["ratio"] = out[f"p50_ms@{size_label(sizes[-1])}"] / out[
            f"p50_ms@{size_label(sizes[0])}"]
        return out


class RawMinimal(RawApsw):
    name = "raw-minimal"
    notes = ("the limit of a queue on SQLite: apsw, one rowid table, one partial index that"
             " orders the claim; same payload, WAL, synchronous=NORMAL and loops as raw-apsw.")
    SCHEMA = (
        ("CREATE TABLE IF NOT EXISTS jobs (id INTEGER PRIMARY KEY, queue TEXT NOT NULL,"
         " kind TEXT NOT NULL, payload TEXT NOT NULL, state INTEGER NOT NULL DEFAULT 0,"
         " priority INTEGER NOT NULL DEFAULT 0, run_at INTEGER NOT NULL,"
         " attempt INTEGER NOT NULL DEFAULT 0, lease INTEGER, result TEXT)"),
        ("CREATE INDEX IF NOT EXISTS jobs_ready ON jobs (queue, priority, run_at, id)"
         " WHERE state = 0"),
    )
    INSERT = "INSERT INTO jobs (queue, kind, payload, run_at) VALUES (?, ?, ?, ?)"
    CLAIM = ("UPDATE jobs SET state = 1, attempt = attempt + 1, lease = ?1 WHERE id IN"
             " (SELECT id FROM jobs WHERE queue = ?2 AND state = 0 AND run_at <= ?3"
             " ORDER BY priority, run_at, id LIMIT ?4) RETURNING id")
    FINISH = "UPDATE jobs SET state = 2, result = ?3 WHERE id = ?1 AND lease = ?2"

    def create(self, path: str) -> None:
        conn = raw_connection(path)
        for statement in self.SCHEMA:
            conn.execute(statement)
        conn.close()

    def row(self, i: int, now: int) -> tuple[Any, ...]:
        return ("default", "noop", json.dumps({"i": i}, separators=PAYLOAD_SEPARATORS), now)

    def claim_params(self, lease: int, now: int, limit: int) -> tuple[Any, ...]:
        return (lease, "default", now, limit)

    def finish_params(self, job_id: Any, lease: int, now: int) -> tuple[Any, ...]:
        return (job_id, lease, "null")

    def fill(self, path: str, n: int) -> None:
        self.create(path)
        conn = raw_connection(path)
        now = now_ms()
        with conn:
            conn.executemany(self.INSERT, [self.row(i, now) for i in range(n)])
        conn.close()

    def claim_latency(self, ctx: Context) -> Metrics:
        raise NotApplicable         # its tables would need a second fill: the bench keeps one


class Sqliteq(System):
    name = "sqliteq"
    notes = ("public API: Storage (WAL, synchronous=NORMAL), EnqueueRequest, jobs.enqueue /"
             " enqueue_bulk, Runtime(queues={'default': 4}) = 4 worker threads fed by one"
             " dispatcher (group commit). enqueue-8t: 8 threads share one Storage.")

    def open(self, location: str) -> sqliteq.Storage:
        return sqliteq.Storage(location)

    def child_db(self, location: str) -> list[str]:
        """How bench/_child.py names this location (see its docstring)."""
        return [location]

    def enqueue_1t(self, path: str, n: int) -> Metrics:
        with self.open(path) as storage:
            enqueue, request = storage.jobs.enqueue, sqliteq.EnqueueRequest
            started = time.perf_counter()
            for i in range(n):
                enqueue(request("noop", {"i": i}))
            elapsed = time.perf_counter() - started
        return {"jobs_per_s": n / elapsed}

    def enqueue_8t(self, path: str, n: int) -> Metrics:
        with self.open(path) as storage:
            def setup(index: int) -> Callable[[], None]:
                storage.jobs.counts()           # open this thread's connection, untimed

                def work() -> None:
                    for i in split(n, THREADS_8T)[index]:
                        storage.jobs.enqueue(sqliteq.EnqueueRequest("noop", {"i": i}))
                return work

            elapsed = run_threads(THREADS_8T, setup)
            total = sum(storage.jobs.counts().values())
        if total != n:
            raise RuntimeError(f"{total} jobs in the table, expected {n}")
        return {"jobs_per_s": n / elapsed}

    def bulk(self, path: str, n: int) -> Metrics:
        with self.open(path) as storage:
            started = time.perf_counter()
            storage.jobs.enqueue_bulk([sqliteq.EnqueueRequest("noop", {"i": i})
                                       for i in range(n)])
            elapsed = time.perf_counter() - started
        return {"jobs_per_s": n / elapsed}

    def drain(self, path: str, n: int) -> Metrics:
        with self.open(path) as storage:
            return {"jobs_per_s": self.drained(storage, n, metrics=True)}

    @staticmethod
    def drained(storage: sqliteq.Storage, n: int, *, metrics: bool) -> float:
        """jobs/s of a Runtime that drains `n` new no-op jobs (the table may hold done ones)."""
        done_before = storage.jobs.counts()["done"]
        last = enqueue_noops(storage, n)
        rt = sqliteq.Runtime(storage, queues={"default": SLOTS}, metrics=metrics)
        rt.register("noop", lambda ctx, payload: None)
        started = time.perf_counter()
        with rt:
            storage.jobs.wait(last, timeout=600)
            while (done := storage.jobs.counts()["done"] - done_before) < n:
                time.sleep(0.002)
            elapsed = time.perf_counter() - started
        if done != n:
            raise RuntimeError(f"{done} jobs done, expected {n}")
        return n / elapsed

    metrics_first = False

    def metrics_cost(self, path: str, n: int) -> Metrics:
        """Drain n jobs with metrics on and n with them off, on one store; which goes first
        alternates from one repetition to the next (the second finds n done rows)."""
        self.metrics_first = not self.metrics_first
        with self.open(path) as storage:
            rates = {on: self.drained(storage, n, metrics=on)
                     for on in ((True, False) if self.metrics_first else (False, True))}
        return {"ratio": rates[True] / rates[False], "jobs_per_s": rates[True],
                "off_jobs_per_s": rates[False]}

    def drain_2proc(self, path: str, n: int) -> Metrics:
        with self.open(path) as storage:
            enqueue_noops(storage, n)
            return drain_in_children(self.name, self.child_db(path), n,
                                     lambda: storage.jobs.counts()["done"])

    def latency_inproc(self, path: str, samples: int) -> Metrics:
        with self.open(path) as storage:
            delays = sqliteq_probe_latency(storage, samples, LATENCY_GAP_SECONDS)
        return {"p50_ms": p50(delays) * 1000, "p99_ms": p99(delays) * 1000}

    def latency_xproc(self, path: str, samples: int) -> Metrics:
        with self.open(path) as storage:
            return stamped_latency(
                self.name, self.child_db(path), samples,
                lambda: storage.jobs.enqueue(sqliteq.EnqueueRequest("stamp")))

    def idle_cpu(self, path: str, ctx: Context) -> Metrics:
        return idle_cpu_in_child(self.name, path, ctx.sizes.idle_seconds, ctx.huey_fsync)

    def claim_latency(self, ctx: Context) -> Metrics:
        """Enqueue -> start p50 with a big table of finished jobs behind the queue."""
        out: Metrics = {}
        for size in ctx.sizes.claim_tables:
            path = ctx.claim_tables.path(size)
            try:
                with sqliteq.Storage(path) as storage:
                    delays = sqliteq_probe_latency(storage, ctx.sizes.claim_samples, 0.0)
            finally:
                ClaimTables.remove_probes(path)
            out[f"p50_ms@{size_label(size)}"] = p50(delays) * 1000
        sizes = ctx.sizes.claim_tables
        out["ratio"] = out[f"p50_ms@{size_label(sizes[-1])}"] / out[
            f"p50_ms@{size_label(sizes[0])}"]
        return out

    def peak_rss(self, path: str, ctx: Context) -> Metrics:
        return peak_rss_in_child(self.name, path, ctx.sizes.rss_jobs, ctx.huey_fsync)


class Huey(System):
    """huey with its consumer in this process: 4 thread workers (settings in _child.py)."""

    name = "huey-sqlite"

    def __init__(self, fsync: str) -> None:
        self.fsync = fsync
        self.notes = self.describe()

    def describe(self) -> str:
        sync = {"off": "fsync=False -> synchronous=OFF (never fsyncs; huey has no NORMAL)",
                "none": "fsync=None (its default) -> SQLite's default synchronous=FULL"}
        return (f"SqliteHuey(results=False), WAL, {sync[self.fsync]}; one shared sqlite3"
                " connection behind a lock; consumer in-process, 4 thread workers polling with"
                " initial_delay=1 ms, backoff 1.15, max_delay 10 ms, periodic=False; no bulk"
                " API. Payload pickled.")

    def open(self, path: str) -> Any:
        return make_huey(self.name, path, self.fsync)

    @contextlib.contextmanager
    def instance(self, path: str) -> Iterator[Any]:
        huey = self.open(path)
        try:
            yield huey
        finally:
            huey.storage.close()

    def enqueue_1t(self, path: str, n: int) -> Metrics:
        with self.instance(path) as huey:
            @huey.task()
            def noop(i: int) -> None:
                pass

            before = huey.pending_count()
            started = time.perf_counter()
            for i in range(n):
                noop(i)
            elapsed = time.perf_counter() - started
            if huey.pending_count() != before + n:
                raise RuntimeError(f"{huey.pending_count()} tasks pending, expected {before + n}")
        return {"jobs_per_s": n / elapsed}

    def enqueue_8t(self, path: str, n: int) -> Metrics:
        with self.instance(path) as huey:
            @huey.task()
            def noop(i: int) -> None:
                pass

            def setup(index: int) -> Callable[[], None]:
                def work() -> None:
                    for i in split(n, THREADS_8T)[index]:
                        noop(i)
                return work

            elapsed = run_threads(THREADS_8T, setup)
            if huey.pending_count() != n:
                raise RuntimeError(f"{huey.pending_count()} tasks pending, expected {n}")
        return {"jobs_per_s": n / elapsed}

    def drain(self, path: str, n: int) -> Metrics:
        with self.instance(path) as huey:
            finished = Countdown(n)

            @huey.task()
            def noop(i: int) -> None:
                finished.tick()

            for i in range(n):
                noop(i)
            started = time.perf_counter()
            with huey_consumer(huey):
                if not finished.done.wait(600):
                    raise RuntimeError(f"huey ran {finished.count} of {n} tasks in 600 s")
                elapsed = time.perf_counter() - started
        return {"jobs_per_s": n / elapsed}

    def latency_inproc(self, path: str, samples: int) -> Metrics:
        with self.instance(path) as huey:
            ran = threading.Event()
            started: list[float] = []

            @huey.task()
            def probe() -> None:
                started.append(time.perf_counter())
                ran.set()

            delays = []
            with huey_consumer(huey):
                for _ in range(samples):
                    time.sleep(random.uniform(0, LATENCY_GAP_SECONDS))
                    ran.clear()
                    t0 = time.perf_counter()
                    probe()
                    if not ran.wait(10):
                        raise RuntimeError("probe task did not start within 10 s")
                    delays.append(started[-1] - t0)
        return {"p50_ms": p50(delays) * 1000, "p99_ms": p99(delays) * 1000}

    def idle_cpu(self, path: str, ctx: Context) -> Metrics:
        return idle_cpu_in_child(self.name, path, ctx.sizes.idle_seconds, self.fsync)

    def peak_rss(self, path: str, ctx: Context) -> Metrics:
        return peak_rss_in_child(self.name, path, ctx.sizes.rss_jobs, self.fsync)


class HueyRedis(Huey):
    name = "huey-redis"

    def describe(self) -> str:
        return ("RedisHuey(results=False) on 127.0.0.1:6379 (durability: whatever the server's"
                " persistence is), a fresh key prefix per measurement, flushed before and after;"
                " same in-process consumer, 4 thread workers blocking in BRPOP (read_timeout"
                " 0.1 s). Payload pickled.")

    def unavailable(self) -> str | None:
        try:
            import redis
            redis.Redis(socket_connect_timeout=1).ping()
        except Exception as exc:
            return f"Redis does not answer on 127.0.0.1:6379 ({type(exc).__name__})"
        return None

    def fresh(self, path: Path) -> str:
        return f"sqliteq-bench-{uuid.uuid4().hex[:12]}"     # a key prefix, not a file

    def cleanup(self, location: str) -> None:
        pass                                    # instance() flushes the keys

    @contextlib.contextmanager
    def instance(self, path: str) -> Iterator[Any]:
        huey = self.open(path)
        huey.storage.flush_all()
        try:
            yield huey
        finally:
            huey.storage.flush_all()

    def idle_cpu(self, path: str, ctx: Context) -> Metrics:
        raise NotApplicable

    def peak_rss(self, path: str, ctx: Context) -> Metrics:
        raise NotApplicable


class PersistQueue(System):
    name = "persist-queue"
    notes = ("SQLiteAckQueue(multithreading=True, auto_commit=True): one put connection and one"
             " get connection, each behind a lock; WAL; it has no synchronous setting (SQLite's"
             " default FULL = an fsync per commit), so the bench sets synchronous=NORMAL on both"
             " connections, like sqliteq. put / get(raw=True) / ack(id); drain: 4 threads share"
             " the queue. No bulk API. Payload pickled.")

    def fresh(self, path: Path) -> str:
        return str(path.with_suffix(".pq"))             # persist-queue wants a folder

    @contextlib.contextmanager
    def instance(self, path: str) -> Iterator[Any]:
        import persistqueue
        queue = persistqueue.SQLiteAckQueue(path, multithreading=True, auto_commit=True)
        for conn in {id(c): c for c in (queue._putter, queue._getter)}.values():
            conn.execute("PRAGMA synchronous=NORMAL")
        try:
            yield queue
        finally:
            queue.close()

    def enqueue_1t(self, path: str, n: int) -> Metrics:
        with self.instance(path) as queue:
            started = time.perf_counter()
            for i in range(n):
                queue.put({"i": i})
            elapsed = time.perf_counter() - started
        return {"jobs_per_s": n / elapsed}

    def enqueue_8t(self, path: str, n: int) -> Metrics:
        with self.instance(path) as queue:
            def setup(index: int) -> Callable[[], None]:
                def work() -> None:
                    for i in split(n, THREADS_8T)[index]:
                        queue.put({"i": i})
                return work

            elapsed = run_threads(THREADS_8T, setup)
            if len(queue.queue()) != n:
                raise RuntimeError(f"{len(queue.queue())} items in the queue, expected {n}")
        return {"jobs_per_s": n / elapsed}

    def drain(self, path: str, n: int) -> Metrics:
        import persistqueue
        with self.instance(path) as queue:
            for i in range(n):
                queue.put({"i": i})

            def setup(index: int) -> Callable[[], None]:
                def work() -> None:
                    while True:
                        try:
                            item = queue.get(block=False, raw=True)
                        except persistqueue.Empty:
                            return
                        queue.ack(id=item["pqid"])
                return work

            elapsed = run_threads(SLOTS, setup)
            if queue.acked_count() != n:
                raise RuntimeError(f"{queue.acked_count()} items acked, expected {n}")
        return {"jobs_per_s": n / elapsed}


class LiteQueueSystem(System):
    name = "litequeue"
    notes = ("LiteQueue: WAL, synchronous=NORMAL (its own setting), autocommit; its sqlite3"
             " connection is opened with check_same_thread=False but has no lock, and pop() runs"
             " BEGIN IMMEDIATE on it, so threads cannot share one: every thread opens its own"
             " LiteQueue on the same file (SQLite's busy timeout arbitrates). put / pop / done;"
             " payload json.dumps'd by the caller. No bulk API.")

    @staticmethod
    def open(path: str) -> Any:
        from litequeue import LiteQueue
        return LiteQueue(path)

    def enqueue_1t(self, path: str, n: int) -> Metrics:
        queue = self.open(path)
        started = time.perf_counter()
        for i in range(n):
            queue.put(json.dumps({"i": i}, separators=PAYLOAD_SEPARATORS))
        elapsed = time.perf_counter() - started
        queue.close()
        return {"jobs_per_s": n / elapsed}

    def enqueue_8t(self, path: str, n: int) -> Metrics:
        self.open(path).close()                         # create the table once
        queues: list[Any] = []

        def setup(index: int) -> Callable[[], None]:
            queue = self.open(path)
            queues.append(queue)

            def work() -> None:
                for i in split(n, THREADS_8T)[index]:
                    queue.put(json.dumps({"i": i}, separators=PAYLOAD_SEPARATORS))
            return work

        elapsed = run_threads(THREADS_8T, setup)
        count = queues[0].qsize()
        for queue in queues:
            queue.close()
        if count != n:
            raise RuntimeError(f"{count} messages queued, expected {n}")
        return {"jobs_per_s": n / elapsed}

    def drain(self, path: str, n: int) -> Metrics:
        queue = self.open(path)
        for i in range(n):
            queue.put(json.dumps({"i": i}, separators=PAYLOAD_SEPARATORS))
        queue.close()
        queues: list[Any] = []

        def setup(index: int) -> Callable[[], None]:
            queue = self.open(path)
            queues.append(queue)

            def work() -> None:
                while (message := queue.pop()) is not None:
                    queue.done(message.message_id)
            return work

        elapsed = run_threads(SLOTS, setup)
        left = queues[0].qsize()
        for queue in queues:
            queue.close()
        if left:
            raise RuntimeError(f"{left} messages not done")
        return {"jobs_per_s": n / elapsed}


# ---------------------------------------------------- PostgreSQL systems ----

PG_URL = os.environ.get("SQLITEQ_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")


class PostgresSystem(System):
    """A queue on the PostgreSQL server at `url`. Every measurement gets a schema of its own,
    created by `fresh` and dropped by `cleanup`; the location a scenario receives is that
    schema's name."""

    requires: tuple[str, ...] = ()      # modules the system needs besides psycopg

    def __init__(self, url: str) -> None:
        self.url = url

    def unavailable(self) -> str | None:
        import importlib.util
        missing = [m for m in ("psycopg", *self.requires) if importlib.util.find_spec(m) is None]
        if missing:
            return f"not installed: {', '.join(missing)} (pip install -e '.[bench]')"
        import psycopg
        try:
            psycopg.connect(self.url, connect_timeout=5).close()
        except psycopg.Error as exc:
            return f"no PostgreSQL server at {self.url}: {str(exc).strip().splitlines()[0]}"
        return None

    def fresh(self, path: Path) -> str:
        schema = f"bench_{uuid.uuid4().hex[:12]}"
        self.admin(f"CREATE SCHEMA {schema}")
        return schema

    def cleanup(self, location: str) -> None:
        self.admin(f"DROP SCHEMA IF EXISTS {location} CASCADE")

    def admin(self, statement: str) -> None:
        import psycopg
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(statement)

    def connect(self, schema: str) -> Any:
        import psycopg
        return psycopg.connect(pg_conninfo(self.url, schema), autocommit=True)

    @contextlib.contextmanager
    def counter(self, schema: str, query: str) -> Iterator[Callable[[], int]]:
        """A function returning the first column of `query`, on a connection of its own."""
        with self.connect(schema) as conn:
            yield lambda: int(conn.execute(query).fetchone()[0])


class SqliteqPg(PostgresSystem, Sqliteq):
    name = "sqliteq-pg"
    notes = ("sqliteq on PostgreSQL: Storage(url, schema=...) (psycopg 3, a pool), the same"
             " calls as sqliteq; single enqueue is one autocommit statement with its NOTIFY,"
             " bulk is one COPY; Runtime(queues={'default': 4}); worker processes poll every"
             " 1 s, so faster starts are LISTEN/NOTIFY wake-ups.")

    def open(self, location: str) -> sqliteq.Storage:
        return sqliteq.Storage(self.url, schema=location)

    def child_db(self, location: str) -> list[str]:
        return [self.url, location]

    def enqueue_8t(self, path: str, n: int) -> Metrics:
        raise NotApplicable

    def idle_cpu(self, path: str, ctx: Context) -> Metrics:
        raise NotApplicable

    def claim_latency(self, ctx: Context) -> Metrics:
        raise NotApplicable

    def peak_rss(self, path: str, ctx: Context) -> Metrics:
        raise NotApplicable


class RawPsycopg(PostgresSystem):
    name = "raw-psycopg"
    notes = ("the limit on PostgreSQL: psycopg 3, one table (bigserial id, payload, state,"
             " run_at), one partial index ordering the claim; autocommit INSERTs, one COPY for"
             " bulk; drain: 4 threads, a connection each, claiming 10 rows a statement with"
             " FOR UPDATE SKIP LOCKED and finishing them with one UPDATE.")

    def created(self, schema: str) -> Any:
        conn = self.connect(schema)
        conn.execute(Raw.SCHEMA)
        return conn

    def enqueue_1t(self, path: str, n: int) -> Metrics:
        with self.created(path) as conn:
            started = time.perf_counter()
            for i in range(n):
                conn.execute(Raw.INSERT, (json.dumps({"i": i}, separators=PAYLOAD_SEPARATORS),
                                          now_ms()))
            return {"jobs_per_s": n / (time.perf_counter() - started)}

    def copy_in(self, conn: Any, n: int) -> None:
        now = now_ms()
        with conn.cursor().copy(Raw.COPY) as copy:
            for i in range(n):
                copy.write_row((json.dumps({"i": i}, separators=PAYLOAD_SEPARATORS), now))

    def bulk(self, path: str, n: int) -> Metrics:
        with self.created(path) as conn:
            started = time.perf_counter()
            self.copy_in(conn, n)
            return {"jobs_per_s": n / (time.perf_counter() - started)}

    def drain(self, path: str, n: int) -> Metrics:
        with self.created(path) as conn:
            self.copy_in(conn, n)
        stop = threading.Event()
        threads = [threading.Thread(target=Raw.work, args=(pg_conninfo(self.url, path), stop))
                   for _ in range(SLOTS)]
        with self.counter(path, Raw.DONE) as done:
            started = time.perf_counter()
            for thread in threads:
                thread.start()
            while done() < n:
                time.sleep(0.002)
            elapsed = time.perf_counter() - started
        stop.set()
        for thread in threads:
            thread.join()
        return {"jobs_per_s": n / elapsed}

    def drain_2proc(self, path: str, n: int) -> Metrics:
        with self.created(path) as conn:
            self.copy_in(conn, n)
        with self.counter(path, Raw.DONE) as done:
            return drain_in_children(self.name, [self.url, path], n, done)


class Procrastinate(PostgresSystem):
    name = "procrastinate"
    requires = ("procrastinate",)
    notes = ("procrastinate's App on a PsycopgConnector; async tasks (a sync task runs in a"
             " thread, slower); defer / batch_defer; a worker of concurrency 4 with"
             " LISTEN/NOTIFY (its default), fetch polling 50 ms (its default: 5 s); done = status"
             " 'succeeded'.")
    DONE = "SELECT count(*) FROM procrastinate_jobs WHERE status = 'succeeded'"

    @contextlib.contextmanager
    def app(self, schema: str) -> Iterator[tuple[Any, Any, Any]]:
        app, noop, stamp = procrastinate_app(pg_conninfo(self.url, schema))
        with app.open():
            app.schema_manager.apply_schema()
            yield app, noop, stamp

    def enqueue_1t(self, path: str, n: int) -> Metrics:
        with self.app(path) as (_, noop, _):
            started = time.perf_counter()
            for i in range(n):
                noop.defer(i=i)
            return {"jobs_per_s": n / (time.perf_counter() - started)}

    def bulk(self, path: str, n: int) -> Metrics:
        with self.app(path) as (_, noop, _):
            started = time.perf_counter()
            noop.batch_defer(*({"i": i} for i in range(n)))
            return {"jobs_per_s": n / (time.perf_counter() - started)}

    def drain(self, path: str, n: int) -> Metrics:
        """Its worker with wait=False: it returns once the queue is empty."""
        import asyncio
        with self.app(path) as (_, noop, _):
            noop.batch_defer(*({"i": i} for i in range(n)))

        async def run() -> float:
            app, _, _ = procrastinate_app(pg_conninfo(self.url, path))
            async with app.open_async():
                started = time.perf_counter()
                await app.run_worker_async(**{**PROCRASTINATE_WORKER, "wait": False})
                return time.perf_counter() - started
        seconds = asyncio.run(run())
        with self.counter(path, self.DONE) as done:
            if done() != n:
                raise RuntimeError(f"{done()} of {n} jobs done")
        return {"jobs_per_s": n / seconds}

    def drain_2proc(self, path: str, n: int) -> Metrics:
        with self.app(path) as (_, noop, _):
            noop.batch_defer(*({"i": i} for i in range(n)))
        with self.counter(path, self.DONE) as done:
            return drain_in_children(self.name, [self.url, path], n, done)

    def latency_xproc(self, path: str, samples: int) -> Metrics:
        with self.app(path) as (_, _, stamp):
            return stamped_latency(self.name, [self.url, path], samples, stamp.defer)


class PgQueuer(PostgresSystem):
    name = "pgqueuer"
    requires = ("pgqueuer", "asyncpg")
    notes = ("PgQueuer on an asyncpg connection (its first driver); Queries.enqueue (lists"
             f" for bulk); a QueueManager, batch size {PGQUEUER_BATCH}, no bound on concurrent"
             " tasks (its default: it refuses a bound below twice the batch), LISTEN/NOTIFY; a"
             " finished job leaves its table, so done = n - rows left.")

    def timed(self, schema: str, body: Callable[[Any], Any], install: bool = True) -> float:
        """Seconds `await body(queries)` takes (on a fresh install in `schema`)."""
        import asyncio

        async def go() -> float:
            conn, queries = await pgqueuer_queries(self.url, schema)
            try:
                if install:
                    await queries.install()
                started = time.perf_counter()
                await body(queries)
                return time.perf_counter() - started
            finally:
                await conn.close()
        return asyncio.run(go())

    @staticmethod
    def payload(i: int) -> bytes:
        return json.dumps({"i": i}, separators=PAYLOAD_SEPARATORS).encode()

    def enqueue_1t(self, path: str, n: int) -> Metrics:
        async def body(queries: Any) -> None:
            for i in range(n):
                await queries.enqueue("noop", self.payload(i))
        return {"jobs_per_s": n / self.timed(path, body)}

    def bulk(self, path: str, n: int) -> Metrics:
        async def body(queries: Any) -> None:
            await queries.enqueue(["noop"] * n, [self.payload(i) for i in range(n)], [0] * n)
        return {"jobs_per_s": n / self.timed(path, body)}

    def drain(self, path: str, n: int) -> Metrics:
        from pgqueuer.types import QueueExecutionMode
        self.bulk(path, n)

        async def body(queries: Any) -> None:
            manager = pgqueuer_manager(queries)
            await manager.run(batch_size=PGQUEUER_BATCH, mode=QueueExecutionMode.drain)
        return {"jobs_per_s": n / self.timed(path, body, install=False)}

    def drain_2proc(self, path: str, n: int) -> Metrics:
        self.bulk(path, n)
        with self.counter(path, "SELECT count(*) FROM pgqueuer") as left:
            return drain_in_children(self.name, [self.url, path], n, lambda: n - left())

    def latency_xproc(self, path: str, samples: int) -> Metrics:
        import asyncio

        async def go() -> Metrics:
            conn, queries = await pgqueuer_queries(self.url, path)
            await queries.install()
            loop = asyncio.get_running_loop()

            def enqueue() -> None:
                asyncio.run_coroutine_threadsafe(queries.enqueue("stamp", None), loop).result()
            try:
                return await asyncio.to_thread(stamped_latency, self.name, [self.url, path],
                                               samples, enqueue)
            finally:
                await conn.close()
        return asyncio.run(go())


# ------------------------------------------------------------- scenarios ----

@dataclass(frozen=True)
class Row:
    """One line of the results table: a metric of a scenario."""

    metric: str
    label: str
    unit: str


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    run: Callable[[System, str, Context], Metrics]
    rows: Callable[[Sizes], list[Row]]
    throughput: bool = False    # charted as jobs/s
    in_child: bool = False      # runs in a fresh child process: no warm-up


def jobs_per_s(sizes: Sizes) -> list[Row]:
    return [Row("jobs_per_s", "jobs/s", "jobs/s")]


def latency_rows(sizes: Sizes) -> list[Row]:
    return [Row("p50_ms", "p50 ms", "ms"), Row("p99_ms", "p99 ms", "ms")]


def claim_rows(sizes: Sizes) -> list[Row]:
    labels = [size_label(n) for n in sizes.claim_tables]
    return ([Row(f"p50_ms@{label}", f"p50 ms, {label} done rows", "ms") for label in labels]
            + [Row("ratio", f"ratio {labels[-1]}/{labels[0]}", "x")])


SCENARIOS: dict[str, Scenario] = {s.name: s for s in [
    Scenario("enqueue-1t", "single enqueue, 1 thread",
             lambda sys_, path, ctx: sys_.enqueue_1t(path, ctx.sizes.enqueue_1t),
             jobs_per_s, throughput=True),
    Scenario("enqueue-8t", "single enqueue, 8 threads",
             lambda sys_, path, ctx: sys_.enqueue_8t(path, ctx.sizes.enqueue_8t),
             lambda sizes: [*jobs_per_s(sizes), Row("errors", "busy errors", "n")],
             throughput=True),
    Scenario("bulk", "bulk enqueue, one call",
             lambda sys_, path, ctx: sys_.bulk(path, ctx.sizes.bulk),
             jobs_per_s, throughput=True),
    Scenario("drain", "drain no-op jobs, 4 slots",
             lambda sys_, path, ctx: sys_.drain(path, ctx.sizes.drain),
             jobs_per_s, throughput=True),
    Scenario("metrics-cost", "drain no-op jobs, metrics on vs off",
             lambda sys_, path, ctx: sys_.metrics_cost(path, ctx.sizes.drain),
             lambda sizes: [Row("ratio", "jobs/s on / off", "x"),
                            Row("jobs_per_s", "jobs/s, metrics on", "jobs/s"),
                            Row("off_jobs_per_s", "jobs/s, metrics off", "jobs/s")]),
    Scenario("drain-2proc", "drain no-op jobs, 2 worker processes of 4 slots",
             lambda sys_, path, ctx: sys_.drain_2proc(path, ctx.sizes.drain),
             jobs_per_s, throughput=True, in_child=True),
    Scenario("latency-inproc", "enqueue->start, in-process",
             lambda sys_, path, ctx: sys_.latency_inproc(path, ctx.sizes.latency_inproc),
             latency_rows),
    Scenario("latency-xproc", "enqueue->start, across processes",
             lambda sys_, path, ctx: sys_.latency_xproc(path, ctx.sizes.latency_xproc),
             latency_rows, in_child=True),
    Scenario("idle-cpu", "idle worker CPU",
             lambda sys_, path, ctx: sys_.idle_cpu(path, ctx),
             lambda sizes: [Row("cpu_pct", "% of a core", "%")], in_child=True),
    Scenario("claim-latency", "claim with many done rows",
             lambda sys_, path, ctx: sys_.claim_latency(ctx), claim_rows),
    Scenario("peak-rss", "peak RSS, bulk enqueue + drain",
             lambda sys_, path, ctx: sys_.peak_rss(path, ctx),
             lambda sizes: [Row("peak_rss_mb", "peak MB (VmHWM)", "MB"),
                            Row("baseline_mb", "MB after imports", "MB"),
                            Row("ru_maxrss_mb", "ru_maxrss MB (inflated)", "MB")],
             in_child=True),
    Scenario("bulk-rss", "peak RSS, one streamed bulk enqueue",
             lambda sys_, path, ctx: bulk_peak_rss(sys_, path, ctx),
             lambda sizes: [Row("peak_rss_mb", "peak MB (VmHWM)", "MB"),
                            Row("baseline_mb", "MB after imports", "MB")],
             in_child=True),
    Scenario("wal-per-enqueue", "WAL written per single-enqueue commit",
             lambda sys_, path, ctx: wal_per_enqueue(sys_, path, ctx),
             lambda sizes: [Row("wal_bytes", "WAL bytes", "B"),
                            Row("wal_pages", "WAL pages (page + frame header)", "pages")]),
]}


WAL_COMMITS = 200       # single enqueues measured by the wal-per-enqueue scenario


def sqlite_files(location: str) -> list[str]:
    """The SQLite database files at `location` (a file, or a folder holding some)."""
    candidates = ([os.path.join(location, name) for name in sorted(os.listdir(location))]
                  if os.path.isdir(location) else [location])
    found = []
    for name in candidates:
        if os.path.isfile(name) and not name.endswith(("-wal", "-shm", "-journal")):
            with open(name, "rb") as file:
                if file.read(16) == b"SQLite format 3\x00":
                    found.append(name)
    return found


# Holds a read snapshot on each file named, in its own process: POSIX locks are per process,
# so a second SQLite library in this one (the peers use the stdlib's) would not see the pin.
WAL_PIN = """
import sys, apsw
pins = []
for name in sys.argv[1:]:
    pin = apsw.Connection(name)
    pin.execute("BEGIN")
    pin.execute("SELECT count(*) FROM sqlite_master").fetchall()
    pins.append(pin)
print("pinned", flush=True)
sys.stdin.readline()
"""


def wal_per_enqueue(system: System, location: str, ctx: Context) -> Metrics:
    """WAL bytes one single-enqueue commit appends. A reader holding a snapshot keeps any
    checkpoint from recycling the WAL, so it grows by exactly what the commits write."""
    if isinstance(system, PostgresSystem):
        raise NotApplicable
    system.enqueue_1t(location, 1)          # creates the file(s) and the schema, untimed
    files = []
    for name in sqlite_files(location):
        conn = apsw.Connection(name)
        mode, page = (conn.execute("PRAGMA journal_mode").fetchall()[0][0],
                      conn.execute("PRAGMA page_size").fetchall()[0][0])
        conn.close()
        if mode == "wal":
            files.append(name)
    if not files:
        raise NotApplicable                 # not a SQLite queue in WAL mode

    def wal_bytes() -> int:     # (no -wal file yet: nothing written since the last close)
        return sum(os.path.getsize(f"{name}-wal") for name in files
                   if os.path.exists(f"{name}-wal"))

    pin = subprocess.Popen([sys.executable, "-c", WAL_PIN, *files], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True)
    try:
        assert pin.stdout is not None and pin.stdin is not None
        if pin.stdout.readline().strip() != "pinned":
            raise RuntimeError("the WAL pin did not start")
        before = wal_bytes()
        system.enqueue_1t(location, WAL_COMMITS)
        grown = wal_bytes() - before
        pin.stdin.write("done\n")
        pin.stdin.flush()
    finally:
        pin.wait(timeout=30)
    return {"wal_bytes": grown / WAL_COMMITS, "wal_pages": grown / WAL_COMMITS / (page + 24)}


def scenario_sizes(name: str, sizes: Sizes) -> str:
    return {
        "enqueue-1t": f"N={sizes.enqueue_1t:,}",
        "enqueue-8t": f"N={sizes.enqueue_8t:,} over {THREADS_8T} threads",
        "bulk": f"N={sizes.bulk:,} in one call",
        "drain": f"N={sizes.drain:,} pre-enqueued",
        "metrics-cost": f"N={sizes.drain:,} pre-enqueued, twice",
        "drain-2proc": f"N={sizes.drain:,} pre-enqueued",
        "latency-inproc": f"{sizes.latency_inproc} jobs, one at a time",
        "latency-xproc": f"{sizes.latency_xproc} jobs, one at a time",
        "idle-cpu": f"{sizes.idle_seconds:g} s window",
        "claim-latency": (f"{sizes.claim_samples} jobs per table of "
                          + ", ".join(size_label(n) for n in sizes.claim_tables) + " done rows"),
        "peak-rss": f"N={sizes.rss_jobs:,}",
        "bulk-rss": f"N={sizes.bulk_rss_jobs:,} from a generator, in one call",
        "wal-per-enqueue": f"{WAL_COMMITS} single enqueues, WAL pinned by a reader",
    }[name]


SCENARIO_NOTES = {
    "wal-per-enqueue": ("bytes each single-enqueue commit appends to the WAL (a reader holding a"
                        " snapshot keeps checkpoints from recycling it), and the same in 4 KB"
                        " pages with their 24-byte frame headers: what a commit costs in I/O."),
    "enqueue-1t": "one transaction per job; the timer covers building each request or row.",
    "enqueue-8t": "8 threads released together; raw counts busy errors (none expected).",
    "bulk": "the timer covers building the requests/rows and the one transaction.",
    "metrics-cost": ("drain as above, once with Runtime(metrics=True) (the default: per-minute"
                     " rollups ride in the dispatcher's commits) and once with metrics=False, on"
                     " one store, in alternating order; the ratio is the median of each"
                     " repetition's on/off."),
    "drain": ("pre-enqueue not timed; the timer runs from starting the worker until every job ran"
              " (sqliteq: jobs.wait on the last job, then counts() confirms all done)."),
    "latency-inproc": ("perf_counter before enqueue -> perf_counter at handler start; a random"
                       f" 0-{LATENCY_GAP_SECONDS * 1000:.0f} ms pause before each probe, and the"
                       " previous probe finished first, so the worker is idle."),
    "drain-2proc": ("two child processes, each a worker of 4 slots, started together on one"
                    " queue of pre-enqueued jobs; timed from their start until the parent sees"
                    " every job done (it polls every 5 ms). Not timed: starting the children."),
    "latency-xproc": ("a child process runs the worker (sqliteq on SQLite: poll_interval 50 ms,"
                      " its default; on PostgreSQL: poll 1 s, PgQueuer its default, procrastinate"
                      " 50 ms, all woken by LISTEN/NOTIFY); its handler prints time.time() as it"
                      " begins, the parent subtracts time.time() taken before the enqueue. One"
                      " machine, one wall clock. A random 0-50 ms pause before each send avoids"
                      " locking onto a poll phase."),
    "idle-cpu": (f"child process started and idle; after {IDLE_SETTLE_SECONDS} s it reports"
                 " time.process_time() at the start and end of the window."),
    "claim-latency": ("the tables of done rows (ids sorting before new jobs) are built once per"
                      " run, not per repetition - it is expensive - and shared by the"
                      " repetitions; the probe jobs are deleted after each measurement."
                      " sqliteq: enqueue->start p50 with a started Runtime; raw-apsw:"
                      " sqliteq's CLAIM statement alone (LIMIT 1) in one transaction."),
    "bulk-rss": ("child process; one storage.jobs.enqueue_bulk(generator) call in a fresh"
                 " interpreter, peak RSS = VmHWM afterwards (the outcomes list included)."),
    "peak-rss": ("child process; peak RSS = VmHWM from /proc/self/status after the run (and"
                 " after imports, for scale). ru_maxrss is shown too but is not the child's own"
                 " peak: Linux carries the parent's peak RSS into a child across fork/exec"
                 " (signal->maxrss), so it reports at least this bench process's size."
                 " sqliteq: enqueue_bulk in chunks of 10k, then a Runtime with 4 slots drains."
                 " huey-sqlite: single enqueues (no bulk API), then its consumer drains."),
}


# --------------------------------------------------------------- targets ----

Medians = dict[str, dict[str, dict[str, float]]]   # scenario -> system -> metric -> median


@dataclass(frozen=True)
class Target:
    """A goal for `system` (sqliteq on SQLite, or on PostgreSQL) in one row of the table."""

    system: str
    scenario: str
    metric: str
    text: str
    check: Callable[[Callable[[str, str, str], float | None]], bool | None]


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _all(*conditions: bool | None) -> bool | None:
    known = [c for c in conditions if c is not None]
    return None if not known else all(known)


SQLITE_PEERS = ("huey-sqlite", "persist-queue", "litequeue")
POSTGRES_PEERS = ("procrastinate", "pgqueuer")


def _ahead(scenario: str, m: Callable[[str, str, str], float | None],
           peers: Sequence[str], ours: str = "sqliteq") -> list[bool | None]:
    """Whether `ours`'s jobs/s beat each peer's (None where either was not measured)."""
    mine = m(scenario, ours, "jobs_per_s")
    return [_none_or(_ratio(mine, m(scenario, peer, "jobs_per_s")), 1.0) for peer in peers]


def _at_least(scenario: str, ours: str, limit: str, factor: float,
              m: Callable[[str, str, str], float | None]) -> bool | None:
    return _none_or(_ratio(m(scenario, ours, "jobs_per_s"), m(scenario, limit, "jobs_per_s")),
                    factor)


def _drain_target(scenario: str) -> Target:
    return Target("sqliteq-pg", scenario, "jobs_per_s",
                  ">= 0.5x raw-psycopg, ahead of procrastinate and PgQueuer",
                  lambda m: _all(_at_least(scenario, "sqliteq-pg", "raw-psycopg", 0.5, m),
                                 *_ahead(scenario, m, POSTGRES_PEERS, "sqliteq-pg")))


TARGETS = [
    Target("sqliteq", "enqueue-1t", "jobs_per_s", ">= 0.8x raw-minimal, ahead of the SQLite peers",
           lambda m: _all(_at_least("enqueue-1t", "sqliteq", "raw-minimal", 0.8, m),
                          *_ahead("enqueue-1t", m, SQLITE_PEERS))),
    Target("sqliteq", "enqueue-8t", "jobs_per_s",
           ">= 2x raw-minimal enqueue-1t, ahead of every peer",
           lambda m: _all(_none_or(_ratio(m("enqueue-8t", "sqliteq", "jobs_per_s"),
                                          m("enqueue-1t", "raw-minimal", "jobs_per_s")), 2.0),
                          *_ahead("enqueue-8t", m, (*SQLITE_PEERS, "huey-redis")))),
    Target("sqliteq", "bulk", "jobs_per_s", ">= 0.65x raw-minimal",
           lambda m: _at_least("bulk", "sqliteq", "raw-minimal", 0.65, m)),
    Target("sqliteq", "drain", "jobs_per_s", ">= 0.5x raw-minimal and >= 10x huey-sqlite",
           lambda m: _all(_at_least("drain", "sqliteq", "raw-minimal", 0.5, m),
                          _at_least("drain", "sqliteq", "huey-sqlite", 10.0, m))),
    Target("sqliteq", "latency-inproc", "p50_ms", "p50 <= 1 ms",
           lambda m: _none_or_max(m("latency-inproc", "sqliteq", "p50_ms"), 1.0)),
    Target("sqliteq", "latency-xproc", "p50_ms", "p50 <= 50 ms (the poll interval)",
           lambda m: _none_or_max(m("latency-xproc", "sqliteq", "p50_ms"), 50.0)),
    Target("sqliteq", "idle-cpu", "cpu_pct", "<= 1 % of a core",
           lambda m: _none_or_max(m("idle-cpu", "sqliteq", "cpu_pct"), 1.0)),
    Target("sqliteq", "claim-latency", "ratio", "largest table within 1.5x of 10k",
           lambda m: _none_or_max(m("claim-latency", "sqliteq", "ratio"), 1.5)),
    Target("sqliteq", "peak-rss", "peak_rss_mb", "<= 100 MB",
           lambda m: _none_or_max(m("peak-rss", "sqliteq", "peak_rss_mb"), 100.0)),
    Target("sqliteq", "bulk-rss", "peak_rss_mb", "<= 200 MB for 1M jobs",
           lambda m: _none_or_max(m("bulk-rss", "sqliteq", "peak_rss_mb"), 200.0)),
    Target("sqliteq", "wal-per-enqueue", "wal_pages", "<= 2.5 pages",
           lambda m: _none_or_max(m("wal-per-enqueue", "sqliteq", "wal_pages"), 2.5)),
    Target("sqliteq-pg", "enqueue-1t", "jobs_per_s", ">= 0.8x raw-psycopg",
           lambda m: _at_least("enqueue-1t", "sqliteq-pg", "raw-psycopg", 0.8, m)),
    Target("sqliteq-pg", "bulk", "jobs_per_s", ">= 0.5x raw-psycopg (COPY)",
           lambda m: _at_least("bulk", "sqliteq-pg", "raw-psycopg", 0.5, m)),
    _drain_target("drain"),
    _drain_target("drain-2proc"),
    *(Target(name, "metrics-cost", "ratio", ">= 0.95x (metrics cost <= 5 %)",
             lambda m, name=name: _none_or(m("metrics-cost", name, "ratio"), 0.95))
      for name in ("sqliteq", "sqliteq-pg")),
    Target("sqliteq-pg", "latency-xproc", "p50_ms", "p50 <= 10 ms (LISTEN/NOTIFY)",
           lambda m: _none_or_max(m("latency-xproc", "sqliteq-pg", "p50_ms"), 10.0)),
]


def _none_or(value: float | None, minimum: float) -> bool | None:
    return None if value is None else value >= minimum


def _none_or_max(value: float | None, maximum: float) -> bool | None:
    return None if value is None else value <= maximum


# ---------------------------------------------------------------- runner ----

@dataclass
class Cell:
    """Every repetition's metrics for one (scenario, system), or why there are none."""

    values: dict[str, list[float]] = field(default_factory=dict)
    status: str = "ok"          # ok | n/a (no API for it) | skipped (not available here)
    detail: str = ""
    errors: list[str] = field(default_factory=list)     # failed repetitions

    def medians(self) -> dict[str, float]:
        return {k: statistics.median(v) for k, v in self.values.items() if v}


def remove_db(location: str) -> None:
    if os.path.isdir(location):
        shutil.rmtree(location, ignore_errors=True)
        return
    for suffix in ("", "-wal", "-shm", "-journal"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(location + suffix)


def format_metrics(metrics: Metrics) -> str:
    parts = []
    for key, value in metrics.items():
        if key == "jobs_per_s":
            parts.append(f"{value:,.0f} jobs/s")
        elif key == "errors":
            parts.append(f"{value:.0f} errors")
        else:
            parts.append(f"{key} {value:,.2f}")
    return ", ".join(parts)


def run_all(systems: list[System], scenarios: list[Scenario], runs: int, ctx: Context,
            skipped: dict[str, str]) -> dict[str, dict[str, Cell]]:
    cells = {sc.name: {s.name: Cell() for s in systems} for sc in scenarios}
    for sc in scenarios:
        for name, reason in skipped.items():
            cells[sc.name][name] = Cell(status="skipped", detail=reason)
    counted_sizes = ctx.sizes
    for rep in range(runs + 1):
        warmup = rep == 0
        label = "warm-up" if warmup else f"run {rep}/{runs}"
        ctx.sizes = counted_sizes.warmup() if warmup else counted_sizes
        for sc in scenarios:
            if warmup and sc.in_child:
                continue
            for system in systems:
                cell = cells[sc.name][system.name]
                if cell.status != "ok":
                    continue
                path = system.fresh(ctx.run_dir / f"r{rep}-{sc.name}-{system.name}")
                started = time.perf_counter()
                try:
                    metrics = sc.run(system, path, ctx)
                except NotApplicable:
                    cell.status = "n/a"
                    continue
                except Exception as exc:
                    error = f"{label}: {type(exc).__name__}: {exc}"
                    cell.errors.append(error)
                    log(f"[{label}] {sc.name:<15} {system.name:<14} ERROR {error}")
                    continue
                finally:
                    system.cleanup(path)
                seconds = time.perf_counter() - started
                log(f"[{label}] {sc.name:<15} {system.name:<14} {format_metrics(metrics)}"
                    f"  ({seconds:.1f} s)")
                if not warmup:
                    for key, value in metrics.items():
                        cell.values.setdefault(key, []).append(value)
    ctx.sizes = counted_sizes
    return cells


# ---------------------------------------------------------------- output ----

def format_value(value: float, unit: str) -> str:
    if unit == "jobs/s":
        return f"{value:,.0f}"
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "n":
        return f"{value:,.0f}"
    if unit == "MB":
        return f"{value:.1f}"
    return f"{value:.2f}" if value < 100 else f"{value:,.0f}"


def markdown(cells: dict[str, dict[str, Cell]], systems: list[System], sizes: Sizes,
             verdicts: dict[tuple[str, str, str], tuple[str, bool | None]]) -> str:
    """One row per metric; a target column for each of sqliteq's stores that was measured,
    its goal followed by PASS, MISS or ? (a figure it needs was not measured)."""
    names = [s.name for s in systems]
    judged = [name for name in ("sqliteq", "sqliteq-pg") if name in names]
    lines = ["| " + " | ".join(["scenario", "metric", *names,
                                *(f"target: {name}" for name in judged)]) + " |",
             "|---|---|" + "---:|" * len(names) + "---|" * len(judged)]
    for scenario_name, by_system in cells.items():
        sc = SCENARIOS[scenario_name]
        for index, row in enumerate(sc.rows(sizes)):
            values = []
            for name in names:
                cell = by_system[name]
                value = cell.medians().get(row.metric)
                if value is not None:
                    values.append(format_value(value, row.unit) + ("*" if cell.errors else ""))
                elif cell.errors:
                    values.append("error")
                elif cell.status == "ok":
                    values.append("")
                else:
                    values.append(cell.status)
            if row.metric == "errors" and not any(v not in ("", "n/a", "skipped")
                                                  for v in values):
                continue
            goals = []
            for name in judged:
                text, ok = verdicts.get((name, scenario_name, row.metric), ("", None))
                verdict = "PASS" if ok else "MISS" if ok is False else "?"
                goals.append(f"{text}: {verdict}" if text else "")
            title = f"{scenario_name} ({scenario_sizes(scenario_name, sizes)})" if index == 0 \
                else ""
            lines.append("| " + " | ".join([title, row.label, *values, *goals]) + " |")
    return "\n".join(lines)


def draw_chart(cells: dict[str, dict[str, Cell]], systems: list[System], path: str,
               title: str) -> bool:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s.name for s in systems]
    groups = [name for name in cells if SCENARIOS[name].throughput
              and any(cells[name][n].medians().get("jobs_per_s") for n in names)]
    if not groups:
        return False
    values = {(g, n): cells[g][n].medians().get("jobs_per_s") for g in groups for n in names}
    present = [v for v in values.values() if v]
    if not present:
        return False
    fig, ax = plt.subplots(figsize=(11, 5.5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs = [g + (i - (len(names) - 1) / 2) * width for g in range(len(groups))]
        heights = [values[(g, name)] or 0 for g in groups]
        bars = ax.bar(xs, heights, width, label=name)
        for bar, height in zip(bars, heights, strict=True):
            text = (f"{height / 1000:,.1f}k" if height >= 1000 else f"{height:.0f}") if height \
                else "n/a"
            ax.annotate(text, (bar.get_x() + bar.get_width() / 2, height or 0), ha="center",
                        va="bottom", fontsize=7, rotation=90, xytext=(0, 2),
                        textcoords="offset points", xycoords=("data", "axes fraction")
                        if not height else "data")
    log_scale = max(present) / min(present) > 20
    if log_scale:
        ax.set_yscale("log")
    ax.set_ylim(top=max(present) * (2.5 if log_scale else 1.15))
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("jobs/s (median" + (", log scale)" if log_scale else ")"))
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=3)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def machine_info() -> dict[str, Any]:
    """The machine and the versions of what was measured (peers only if installed: a run of
    `--systems raw-apsw,sqliteq` needs none of them)."""
    from importlib import metadata

    info: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(), "platform": platform.platform(),
        "cpus": os.cpu_count(), "sqlite (apsw)": apsw.sqlite_lib_version(),
        "apsw": apsw.apsw_version(), "sqlite (sqlite3 module)": sqlite3.sqlite_version,
        "sqliteq": sqliteq.__version__,
    }
    for package in ("huey", "persist-queue", "litequeue", "psycopg", "procrastinate", "pgqueuer",
                    "asyncpg"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            info[package] = metadata.version(package)
    info["loadavg at start"] = os.getloadavg()
    return info


# ------------------------------------------------------------------ main ----

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="sqliteq benchmarks: every scenario x every system, interleaved.",
        epilog="scenarios: " + ", ".join(SCENARIOS)
        + "; systems: raw-minimal, raw-apsw, sqliteq, huey-sqlite, persist-queue, litequeue,"
        " huey-redis, raw-psycopg, sqliteq-pg, procrastinate, pgqueuer")
    parser.add_argument("--quick", action="store_true",
                        help="smaller N, 3 repetitions, 3 s idle window (~1-2 minutes)")
    parser.add_argument("--smoke", action="store_true",
                        help="toy N, 1 repetition: proves every adapter runs, measures nothing")
    parser.add_argument("--runs", type=int, default=None,
                        help="counted repetitions after the warm-up (default 5; --quick 3)")
    parser.add_argument("--only", default=None, help="comma-separated scenarios to run")
    parser.add_argument("--systems", default=None, help="comma-separated systems to run")
    parser.add_argument("--out", default=str(HERE / "results.json"), help="JSON results file")
    parser.add_argument("--chart", default=str(HERE / "results.png"),
                        help="PNG bar chart of the SQLite systems; the PostgreSQL ones go"
                             " beside it, named with -pg (results-pg.png); '' for none")
    parser.add_argument("--db-dir", default=None,
                        help="where the temporary database files go (default: system temp)")
    parser.add_argument("--huey-fsync", choices=("off", "none"), default="off",
                        help="SqliteHuey fsync: off = fsync=False (synchronous=OFF, closest to"
                             " sqliteq's NORMAL); none = huey's default (synchronous=FULL)")
    parser.add_argument("--keep", action="store_true", help="keep the database folder")
    parser.add_argument("--pg-url", default=PG_URL,
                        help="the PostgreSQL server of the PostgreSQL systems (default"
                             " $SQLITEQ_BENCH_PG or the local test database); each measurement"
                             " creates a schema there and drops it")
    args = parser.parse_args(argv)

    sizes = SMOKE if args.smoke else QUICK if args.quick else FULL
    runs = args.runs if args.runs is not None else (1 if args.smoke else 3 if args.quick else 5)
    if runs < 1:
        parser.error("--runs must be at least 1")
    all_systems: list[System] = [RawMinimal(), RawApsw(), Sqliteq(), Huey(args.huey_fsync),
                                 PersistQueue(), LiteQueueSystem(), HueyRedis(args.huey_fsync),
                                 RawPsycopg(args.pg_url), SqliteqPg(args.pg_url),
                                 Procrastinate(args.pg_url), PgQueuer(args.pg_url)]
    scenarios = list(SCENARIOS.values())
    if args.only:
        wanted = [name.strip() for name in args.only.split(",") if name.strip()]
        unknown = [name for name in wanted if name not in SCENARIOS]
        if unknown:
            parser.error(f"unknown scenario(s) {', '.join(unknown)}; choose from "
                         f"{', '.join(SCENARIOS)}")
        scenarios = [SCENARIOS[name] for name in wanted]
    systems = all_systems
    if args.systems:
        wanted = [name.strip() for name in args.systems.split(",") if name.strip()]
        known = {s.name: s for s in all_systems}
        unknown = [name for name in wanted if name not in known]
        if unknown:
            parser.error(f"unknown system(s) {', '.join(unknown)}; choose from "
                         f"{', '.join(known)}")
        systems = [known[name] for name in wanted]
    skipped = {s.name: reason for s in systems if (reason := s.unavailable()) is not None}
    for name, reason in skipped.items():
        log(f"skipping {name}: {reason}")

    if args.db_dir:
        Path(args.db_dir).mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="sqliteq-bench-", dir=args.db_dir))
    ctx = Context(sizes, run_dir, args.huey_fsync, ClaimTables(run_dir))
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    log(f"sqliteq bench ({mode}): {len(scenarios)} scenarios x {len(systems)} systems,"
        f" warm-up + {runs} runs, databases in {run_dir}")
    started = time.perf_counter()
    try:
        cells = run_all(systems, scenarios, runs, ctx, skipped)
    finally:
        if not args.keep:
            shutil.rmtree(run_dir, ignore_errors=True)
    wall = time.perf_counter() - started

    medians: Medians = {sc: {name: cell.medians() for name, cell in by_system.items()}
                        for sc, by_system in cells.items()}

    def median_of(scenario: str, system: str, metric: str) -> float | None:
        return medians.get(scenario, {}).get(system, {}).get(metric)

    verdicts = {(t.system, t.scenario, t.metric): (t.text, t.check(median_of)) for t in TARGETS
                if t.scenario in cells and t.system in cells[t.scenario]}
    shown = [s for s in systems if any(cells[sc][s.name].status != "n/a" for sc in cells)]

    print(f"# sqliteq benchmarks ({mode}: median of {runs} runs after a warm-up, {wall:.0f} s)\n")
    print(markdown(cells, shown, sizes, verdicts))
    print("\nn/a: the system has no API or worker for that scenario; skipped: not available"
          " here; error / *: every / some repetition failed (errors in the JSON and on"
          " stderr); ?: a figure the target needs was not measured.\n")
    print("## Systems\n")
    for system in shown:
        print(f"- **{system.name}**: "
              + (f"skipped ({skipped[system.name]})" if system.name in skipped
                 else system.notes))
    print("\n## Scenarios\n")
    for name in cells:
        print(f"- **{name}** ({scenario_sizes(name, sizes)}): {SCENARIO_NOTES[name]}")
    if ctx.claim_tables.build_seconds:
        print(f"- claim-latency tables built in (s): {ctx.claim_tables.build_seconds}")
    print(f"\nMachine: {os.cpu_count()} CPUs, Python {platform.python_version()}, SQLite"
          f" {apsw.sqlite_lib_version()} (apsw) / {sqlite3.sqlite_version}"
          " (sqlite3 module, used by the peers).")

    report = {
        "mode": mode, "runs": runs, "warmup": 1, "wall_seconds": round(wall, 1),
        "sizes": asdict(sizes), "machine": machine_info(), "huey_fsync": args.huey_fsync,
        "systems": {s.name: (f"skipped: {skipped[s.name]}" if s.name in skipped else s.notes)
                    for s in systems},
        "scenario_notes": {name: SCENARIO_NOTES[name] for name in cells},
        "claim_table_build_seconds": ctx.claim_tables.build_seconds,
        "results": {sc: {name: {"status": cell.status, "detail": cell.detail,
                                "median": cell.medians(), "values": cell.values,
                                "errors": cell.errors}
                         for name, cell in by_system.items()}
                    for sc, by_system in cells.items()},
        "targets": [{"scenario": t.scenario, "metric": t.metric, "target": t.text,
                     "system": t.system, "pass": verdicts[(t.system, t.scenario, t.metric)][1]}
                    for t in TARGETS if (t.system, t.scenario, t.metric) in verdicts],
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {args.out}")
    if not args.chart:
        return
    # One chart per store family: SQLite's and PostgreSQL's figures differ tenfold.
    chart = Path(args.chart)
    for family, path in (("SQLite", chart), ("PostgreSQL", chart.with_stem(chart.stem + "-pg"))):
        members = [s for s in shown if isinstance(s, PostgresSystem) == (family == "PostgreSQL")]
        if draw_chart(cells, members, str(path),
                      f"sqliteq bench, {family} ({mode}), median of {runs} runs"):
            log(f"wrote {path}")


if __name__ == "__main__":
    main()
