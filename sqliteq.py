"""sqliteq: a durable job queue in one file, on SQLite in WAL mode.

Programs enqueue jobs into a SQLite file; a thread-pool `Runtime` in any number of processes
runs them with retries, priorities, schedules, unique keys and queue pause/resume, and
cancellation that reaches a job running in another process.

Quick start::

    import sqliteq

    storage = sqliteq.Storage("jobs.db")
    rt = sqliteq.Runtime(storage, queues={"default": 4})

    @rt.handler("greet")
    def greet(ctx: sqliteq.JobCtx, payload: dict) -> dict:
        return {"greeting": f"hello {payload['name']}"}

    out = rt.enqueue(sqliteq.EnqueueRequest("greet", {"name": "ada"}))
    with rt:                                    # start() ... stop()
        job = storage.jobs.wait(out.job_id, timeout=10)
    print(job.state, job.result)                # done {'greeting': 'hello ada'}

Guarantees:

* At-least-once: a job whose `enqueue` returned is eventually `done`, `failed` or `cancelled`,
  even when worker processes are killed at any moment. A handler may therefore run more than
  once for one job (after a crash); make handlers idempotent.
* A job is finalized at most once per claim: every claim carries a fresh lease token and every
  finalize applies only where the token still matches, so a rescued job is never overwritten
  by its old, slow worker.
* What survives: with the default `synchronous=NORMAL`, every committed change survives a crash
  of the process (including SIGKILL). A power loss or OS crash may lose the last transactions
  committed before it; `Storage(path, durable=True)` uses `synchronous=FULL`, which makes every
  commit durable on return at the cost of one fsync per commit.

MIT License. Copyright (c) 2026 the sqliteq authors. Permission is hereby granted, free of
charge, to any person obtaining a copy of this software, to deal in it without restriction,
subject to including this notice; the software is provided "as is", without warranty of any
kind. Full text: https://opensource.org/license/mit
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from enum import Enum
from typing import Any, NamedTuple, Protocol, TypeVar

import apsw
import ulid

__version__ = "0.1.0"
__all__ = [
    "SqliteqError", "InvalidInput", "TransientError", "SchemaError", "ConfigError", "Cancelled",
    "JobState", "EnqueueRequest", "EnqueueOutcome", "Job", "Queue",
    "Storage", "Router", "DefaultRouter", "KindRouter", "PrefixRouter",
]

log = logging.getLogger("sqliteq")
T = TypeVar("T")


# ---------------------------------------------------------------- Errors ----

class SqliteqError(Exception):
    """Root of every error sqliteq raises on purpose."""


class InvalidInput(SqliteqError, ValueError):
    """A request or argument is malformed. Nothing was written."""


class TransientError(SqliteqError):
    """The writer lock stayed contended through every retry. Safe to try again later."""


class SchemaError(SqliteqError):
    """The database file cannot be used: not SQLite, newer schema, read-only, missing folder."""


class ConfigError(SqliteqError):
    """The runtime or a limiter is configured inconsistently."""


class Cancelled(SqliteqError):
    """Raised by a handler (or by a wait) to stop because its cancellation token fired."""


# ---------------------------------------------------------------- Values ----

class JobState(str, Enum):
    """Where a job is in its lifecycle. Compares equal to its string value."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value


ACTIVE_STATES = (JobState.QUEUED, JobState.RUNNING)
FINISHED_STATES = (JobState.DONE, JobState.FAILED, JobState.CANCELLED)
DEFAULT_QUEUE = "default"
DEFAULT_MAX_ATTEMPTS = 5

_json_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode
_json_decode = json.loads


def _encode_json(value: Any, what: str) -> str:
    try:
        return _json_encode(value)
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidInput(f"{what} is not JSON-serialisable: {exc}") from None


def now_ms() -> int:
    """The current time as integer milliseconds since the Unix epoch (the database's unit)."""
    return time.time_ns() // 1_000_000


def _epoch_seconds(value: datetime | float | int, what: str) -> float:
    """Accept an aware datetime or epoch seconds; reject naive datetimes and non-numbers."""
    if isinstance(value, datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise InvalidInput(f"{what} is a naive datetime; give it a timezone (e.g. UTC)")
        return value.timestamp()
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    raise InvalidInput(f"{what} must be an aware datetime or epoch seconds, not {value!r}")


def _duration_seconds(value: timedelta | float | int, what: str) -> float:
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1e12:
        return float(value)
    raise InvalidInput(f"{what} must be a non-negative number of seconds or a timedelta")


def _datetime_from_ms(ms: int | None) -> datetime | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, timezone.utc)


def _check_name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value or value != value.strip():
        raise InvalidInput(f"{what} must be a non-empty string without surrounding spaces, "
                           f"not {value!r}")
    return value


class _RequestFields(NamedTuple):
    kind: str
    payload: Any
    queue_name: str | None
    priority: int
    run_at: float | None
    max_attempts: int
    unique_key: str | None


class EnqueueRequest(_RequestFields):
    """A job to enqueue, validated on construction and immutable afterwards.

    `run_at` is taken as an aware `datetime` or epoch seconds and kept as epoch seconds.
    `queue_name=None` lets the router (or "default") choose. Lower `priority` runs first.
    """

    __slots__ = ()

    def __new__(cls, kind: str, payload: Any = None, *, queue_name: str | None = None,
                priority: int = 0, run_at: datetime | float | None = None,
                max_attempts: int | None = None, unique_key: str | None = None
                ) -> EnqueueRequest:
        if not isinstance(kind, str) or not kind:
            raise InvalidInput(f"kind must be a non-empty string, not {kind!r}")
        _encode_json(payload, f"payload of {kind!r}")
        if queue_name is not None:
            _check_name(queue_name, "queue_name")
        if not isinstance(priority, int) or isinstance(priority, bool) \
                or not -2**63 <= priority < 2**63:
            raise InvalidInput(f"priority must be an integer, not {priority!r}")
        if run_at is not None:
            run_at = _epoch_seconds(run_at, "run_at")
        if max_attempts is None:
            max_attempts = DEFAULT_MAX_ATTEMPTS
        elif not isinstance(max_attempts, int) or isinstance(max_attempts, bool) \
                or not 1 <= max_attempts < 2**31:
            raise InvalidInput(f"max_attempts must be an integer >= 1, not {max_attempts!r}")
        if unique_key is not None and (not isinstance(unique_key, str) or not unique_key):
            raise InvalidInput(f"unique_key must be a non-empty string, not {unique_key!r}")
        return tuple.__new__(cls, (kind, payload, queue_name, priority, run_at, max_attempts,
                                   unique_key))

    def _replace(self, **changes: Any) -> EnqueueRequest:  # type: ignore[override]
        fields = {**self._asdict(), **changes}
        return EnqueueRequest(fields.pop("kind"), fields.pop("payload"), **fields)


class EnqueueOutcome(NamedTuple):
    """The id of the job; `created` is False when a unique key matched an active job."""

    job_id: str
    created: bool


@dataclass(frozen=True, slots=True)
class Job:
    """A read-only snapshot of one job row."""

    id: str
    kind: str
    queue: str
    payload: Any
    state: JobState
    priority: int
    run_at: datetime
    attempt: int
    max_attempts: int
    unique_key: str | None
    result: Any
    errors: list[dict[str, Any]]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    worker: str | None
    host: str | None
    cancel_requested: bool


@dataclass(frozen=True, slots=True)
class Queue:
    """A queue's settings. Times and durations in seconds; `limit` None means no limit."""

    name: str
    paused: bool
    limit: int | None
    backoff_base: float
    backoff_cap: float
    cooldown_until: datetime | None
    retain_done: float
    retain_failed: float


# ------------------------------------------------------ Schema and migrations ----

# Each step moves the file from version i to i+1, in the same transaction that sets
# PRAGMA user_version, so a file is never half-migrated. Steps are never edited once released.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE jobs (
            id               TEXT PRIMARY KEY NOT NULL,
            kind             TEXT NOT NULL,
            queue            TEXT NOT NULL,
            payload          TEXT NOT NULL,
            state            TEXT NOT NULL DEFAULT 'queued'
                             CHECK (state IN ('queued','running','done','failed','cancelled')),
            priority         INTEGER NOT NULL DEFAULT 0,
            run_at           INTEGER NOT NULL,
            attempt          INTEGER NOT NULL DEFAULT 0,
            max_attempts     INTEGER NOT NULL DEFAULT 5,
            unique_key       TEXT,
            lease            INTEGER,
            worker           TEXT,
            host             TEXT,
            cancel_requested INTEGER NOT NULL DEFAULT 0,
            result           TEXT,
            errors           TEXT,
            created_at       INTEGER NOT NULL,
            started_at       INTEGER,
            finished_at      INTEGER
        )""",
        # The claim reads only this index; being partial, it stays as small as the backlog
        # however many finished rows the table keeps.
        "CREATE INDEX jobs_claim ON jobs (queue, priority, run_at, id) WHERE state = 'queued'",
        ("CREATE UNIQUE INDEX jobs_unique_active ON jobs (unique_key)"
         " WHERE unique_key IS NOT NULL AND state IN ('queued', 'running')"),
        "CREATE INDEX jobs_running ON jobs (host, queue) WHERE state = 'running'",
        ("CREATE INDEX jobs_finished ON jobs (state, finished_at)"
         " WHERE state IN ('done', 'failed', 'cancelled')"),
        """CREATE TABLE queues (
            name            TEXT PRIMARY KEY NOT NULL,
            paused          INTEGER NOT NULL DEFAULT 0,
            concurrency     INTEGER,
            backoff_base_ms INTEGER NOT NULL DEFAULT 1000,
            backoff_cap_ms  INTEGER NOT NULL DEFAULT 3600000,
            cooldown_until  INTEGER NOT NULL DEFAULT 0,
            retain_done_ms  INTEGER NOT NULL DEFAULT 604800000,
            retain_failed_ms INTEGER NOT NULL DEFAULT 2592000000
        )""",
        """CREATE TABLE processes (
            host_id      TEXT PRIMARY KEY NOT NULL,
            hostname     TEXT NOT NULL,
            pid          INTEGER NOT NULL,
            queues       TEXT NOT NULL,
            started_at   INTEGER NOT NULL,
            heartbeat_at INTEGER NOT NULL
        )""",
        """CREATE TABLE cron (
            name         TEXT PRIMARY KEY NOT NULL,
            expression   TEXT NOT NULL,
            timezone     TEXT,
            request      TEXT NOT NULL,
            next_fire_at INTEGER,
            enabled      INTEGER NOT NULL DEFAULT 1,
            last_error   TEXT
        )""",
        """CREATE TABLE rate_limits (
            scope          TEXT PRIMARY KEY NOT NULL,
            capacity       REAL NOT NULL,
            refill_per_sec REAL NOT NULL,
            tokens         REAL NOT NULL,
            updated_at     INTEGER NOT NULL
        )""",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)


def migrate(conn: apsw.Connection) -> None:
    """Bring the file to SCHEMA_VERSION. The caller holds a write transaction."""
    version = conn.execute("PRAGMA user_version").fetchall()[0][0]
    if version > SCHEMA_VERSION:
        raise SchemaError(f"database schema version {version} is newer than this sqliteq "
                          f"({__version__}) understands ({SCHEMA_VERSION}); upgrade sqliteq")
    for step in MIGRATIONS[version:]:
        for statement in step:
            conn.execute(statement)
    if version < SCHEMA_VERSION:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION:d}")
        log.info("migrated database from schema %d to %d", version, SCHEMA_VERSION)


# -------------------------------------------------------------- Database ----

TRANSIENT_RETRY_DELAYS = (0.1, 0.3, 1.0)   # seconds, each jittered by +-50 %


class Database:
    """Connections (one per thread), pragmas, and the single write-transaction helper.

    Every write goes through `write`: a process-local lock first, so threads queue in memory
    rather than sleep-polling in SQLite's busy handler, then `BEGIN IMMEDIATE`, so the writer
    lock is taken up front and no lock upgrade can deadlock. The busy timeout then only
    arbitrates between processes.
    """

    def __init__(self, path: str | os.PathLike[str], *, durable: bool = False,
                 busy_timeout: float = 5.0) -> None:
        self.path = os.fspath(path)
        self.durable = durable
        self.busy_timeout_ms = int(_duration_seconds(busy_timeout, "busy_timeout") * 1000)
        self._local = threading.local()
        self._connections: list[apsw.Connection] = []
        self._connections_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._closed = False
        # Commit notifications for in-process waiters (Jobs.wait, runtime wake-ups).
        self._commit_cv = threading.Condition(threading.Lock())
        self._commit_seq = 0
        self._commit_waiters = 0
        self._check_path()
        self.write(migrate)

    def _check_path(self) -> None:
        folder = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(folder):
            raise SchemaError(f"cannot open database {self.path!r}: folder {folder!r} "
                              f"does not exist")
        if os.path.isdir(self.path):
            raise SchemaError(f"cannot open database {self.path!r}: it is a directory")

    def connection(self) -> apsw.Connection:
        """This thread's connection, opened and configured on first use."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if self._closed:
                raise SqliteqError("storage is closed")
            conn = self._open()
            self._local.conn = conn
        return conn

    def _open(self) -> apsw.Connection:
        try:
            conn = apsw.Connection(self.path)
            conn.setbusytimeout(self.busy_timeout_ms)
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchall()[0][0]
            if mode.lower() != "wal":
                raise SchemaError(f"cannot use {self.path!r}: journal_mode stays {mode!r}, "
                                  f"WAL is required")
            conn.execute(f"PRAGMA synchronous = {'FULL' if self.durable else 'NORMAL'};"
                         "PRAGMA foreign_keys = OFF; PRAGMA temp_store = MEMORY")
        except apsw.NotADBError:
            raise SchemaError(f"{self.path!r} is not a SQLite database") from None
        except (apsw.ReadOnlyError, apsw.CantOpenError, apsw.PermissionsError) as exc:
            raise SchemaError(f"cannot open {self.path!r} for writing ({exc}); sqliteq needs "
                              f"write access to the file and its folder") from None
        with self._connections_lock:
            self._connections.append(conn)
        return conn

    def write(self, work: Callable[[apsw.Connection], T]) -> T:
        """Run `work(conn)` in one BEGIN IMMEDIATE transaction and commit it.

        Busy/locked errors roll back and retry the whole transaction up to 3 times with
        jittered backoff, then raise TransientError; any other error rolls back and
        propagates. `work` must therefore have no effects outside the database.
        """
        with self._write_lock:
            conn = self.connection()
            for delay in (*TRANSIENT_RETRY_DELAYS, None):
                try:
                    conn.execute("BEGIN IMMEDIATE")
                    try:
                        result = work(conn)
                        conn.execute("COMMIT")
                    except BaseException:
                        if not conn.getautocommit():
                            conn.execute("ROLLBACK")
                        raise
                except (apsw.BusyError, apsw.LockedError) as exc:
                    if delay is None:
                        raise TransientError(f"database {self.path!r} stayed locked through "
                                             f"{len(TRANSIENT_RETRY_DELAYS)} retries: {exc}"
                                             ) from None
                    time.sleep(delay * random.uniform(0.5, 1.5))
                    continue
                except apsw.ReadOnlyError as exc:
                    raise SchemaError(f"database {self.path!r} is read-only: {exc}") from None
                except apsw.NotADBError:
                    raise SchemaError(f"{self.path!r} is not a SQLite database") from None
                if self._commit_waiters:
                    self._announce_commit()
                return result
        raise AssertionError("unreachable")

    def _announce_commit(self) -> None:
        with self._commit_cv:
            self._commit_seq += 1
            self._commit_cv.notify_all()

    def wait_for_change(self, timeout: float) -> None:
        """Sleep until this process commits a write, or `timeout` seconds pass.

        Callers poll `PRAGMA data_version` after it to notice other processes' commits.
        """
        with self._commit_cv:
            self._commit_waiters += 1
            try:
                seq = self._commit_seq
                self._commit_cv.wait_for(lambda: self._commit_seq != seq, timeout)
            finally:
                self._commit_waiters -= 1

    def data_version(self) -> int:
        """Changes whenever another connection (any process) commits to the file."""
        return self.connection().execute("PRAGMA data_version").fetchall()[0][0]

    def close(self) -> None:
        """Close every connection this object opened. Safe to call twice."""
        self._closed = True
        with self._connections_lock:
            connections, self._connections = self._connections, []
        for conn in connections:
            conn.close()
        self._local = threading.local()


# ------------------------------------------------------------------- Ids ----

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_CROCKFORD_PAIRS = tuple(a + b for a in _CROCKFORD for b in _CROCKFORD)  # 10 bits -> 2 chars


class _IdMinter:
    """Monotonic ULID strings: sortable by creation time, strictly increasing per process.

    A ULID is 48 bits of milliseconds then 80 random bits. Within one millisecond (and for a
    bulk enqueue) the previous value is incremented instead of drawing new randomness, as the
    ULID spec's monotonic mode says. python-ulid supplies the seed; the encoding of the low
    40 bits is table-driven because bulk enqueues mint a hundred thousand ids at a time.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = 0

    def mint(self, count: int = 1) -> list[str]:
        with self._lock:
            seed = int(ulid.ULID())
            if seed >> 80 <= self._last >> 80:
                seed = self._last + 1
            else:
                seed &= ~(1 << 79)      # leave room to increment without overflowing the time
            self._last = seed + count - 1
        pairs = _CROCKFORD_PAIRS
        ids = []
        prefix_of = self._prefix
        high, low = seed >> 40, seed & 0xFF_FFFF_FFFF
        prefix = prefix_of(high)
        for _ in range(count):
            if low > 0xFF_FFFF_FFFF:
                high, low = high + 1, 0
                prefix = prefix_of(high)
            ids.append(prefix + pairs[low >> 30] + pairs[(low >> 20) & 1023]
                       + pairs[(low >> 10) & 1023] + pairs[low & 1023])
            low += 1
        return ids

    def _prefix(self, high: int) -> str:
        """The first 18 characters of a 26-character ULID from its top 88 bits."""
        return str(ulid.ULID.from_int(high << 40))[:18]


# --------------------------------------------------------------- Routing ----

class Router(Protocol):
    """Chooses the queue for a request whose `queue_name` is None."""

    def route(self, kind: str) -> str: ...


class DefaultRouter:
    """Every kind goes to the "default" queue."""

    def route(self, kind: str) -> str:
        return DEFAULT_QUEUE


class KindRouter:
    """An explicit kind -> queue table, with a default for the rest."""

    def __init__(self, routes: Mapping[str, str], default: str = DEFAULT_QUEUE) -> None:
        self.routes = {k: _check_name(q, f"queue for kind {k!r}") for k, q in routes.items()}
        self.default = _check_name(default, "default queue")

    def route(self, kind: str) -> str:
        return self.routes.get(kind, self.default)


class PrefixRouter:
    """Routes by kind prefix ({"gh_": "gh"}); the longest matching prefix wins."""

    def __init__(self, prefixes: Mapping[str, str] | None = None,
                 default: str = DEFAULT_QUEUE) -> None:
        items = (prefixes or {}).items()
        self.prefixes = sorted(((p, _check_name(q, f"queue for prefix {p!r}")) for p, q in items),
                               key=lambda item: -len(item[0]))
        self.default = _check_name(default, "default queue")

    def route(self, kind: str) -> str:
        for prefix, queue in self.prefixes:
            if kind.startswith(prefix):
                return queue
        return self.default


# ------------------------------------------------------------------ Jobs ----

_JOB_COLUMNS = ("id, kind, queue, payload, state, priority, run_at, attempt, max_attempts,"
                " unique_key, result, errors, created_at, started_at, finished_at, worker, host,"
                " cancel_requested")


def _job_from_row(row: Sequence[Any]) -> Job:
    (id_, kind, queue, payload, state, priority, run_at, attempt, max_attempts, unique_key,
     result, errors, created_at, started_at, finished_at, worker, host, cancel) = row
    return Job(id_, kind, queue, _json_decode(payload), JobState(state), priority,
               _datetime_from_ms(run_at), attempt, max_attempts, unique_key,  # type: ignore[arg-type]
               None if result is None else _json_decode(result),
               [] if errors is None else _json_decode(errors),
               _datetime_from_ms(created_at), _datetime_from_ms(started_at),  # type: ignore[arg-type]
               _datetime_from_ms(finished_at), worker, host, bool(cancel))


class Jobs:
    """Enqueueing, reading and administering jobs: `storage.jobs`."""

    INSERT = ("INSERT INTO jobs (id, kind, queue, payload, priority, run_at, max_attempts,"
              " unique_key, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")
    INSERT_UNIQUE = INSERT + " ON CONFLICT DO NOTHING"
    SELECT_ACTIVE_BY_KEY = ("SELECT id FROM jobs WHERE unique_key = ?"
                            " AND state IN ('queued', 'running')")
    ENSURE_QUEUE = "INSERT OR IGNORE INTO queues (name) VALUES (?)"
    SELECT_ONE = f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?"
    SELECT_STATE = "SELECT state FROM jobs WHERE id = ?"
    COUNT_BY_STATE = "SELECT state, count(*) FROM jobs GROUP BY state"
    COUNT_BY_STATE_IN_QUEUE = "SELECT state, count(*) FROM jobs WHERE queue = ? GROUP BY state"
    # NULL filters match everything, so one statement serves every combination.
    LIST = (f"SELECT {_JOB_COLUMNS} FROM jobs WHERE (?1 IS NULL OR state = ?1)"
            " AND (?2 IS NULL OR queue = ?2) AND (?3 IS NULL OR kind = ?3)"
            " ORDER BY id DESC LIMIT ?4")
    CANCEL_QUEUED = ("UPDATE jobs SET state = 'cancelled', finished_at = ?2"
                     " WHERE id = ?1 AND state = 'queued'")
    REQUEST_CANCEL = ("UPDATE jobs SET cancel_requested = 1"
                      " WHERE id = ? AND state = 'running'")
    RETRY = ("UPDATE jobs SET state = 'queued', attempt = 0, run_at = ?2, finished_at = NULL,"
             " cancel_requested = 0, lease = NULL WHERE id = ?1"
             " AND state IN ('failed', 'cancelled')")
    RUN_NOW = "UPDATE jobs SET run_at = ?2 WHERE id = ?1 AND state = 'queued' AND run_at > ?2"
    DELETE = "DELETE FROM jobs WHERE id = ? AND state != 'running'"
    PURGE_CHUNK = ("DELETE FROM jobs WHERE rowid IN (SELECT rowid FROM jobs"
                   " WHERE state = ?1 AND finished_at < ?2 LIMIT ?3)")
    PURGE_CHUNK_ROWS = 2000

    def __init__(self, db: Database) -> None:
        self._db = db
        self._mint = _IdMinter().mint
        self._known_queues: set[str] = set()

    # -- enqueue --

    def enqueue(self, request: EnqueueRequest, router: Router | None = None) -> EnqueueOutcome:
        """Insert one job; durable when this returns."""
        return self.enqueue_bulk((request,), router)[0]

    def enqueue_bulk(self, requests: Iterable[EnqueueRequest],
                     router: Router | None = None) -> list[EnqueueOutcome]:
        """Insert many jobs in one transaction: all of them, or (on any error) none."""
        requests = list(requests)
        rows, queues = self._rows_for(requests, router)
        new_queues = queues - self._known_queues

        def insert(conn: apsw.Connection) -> list[EnqueueOutcome]:
            for name in new_queues:
                conn.execute(self.ENSURE_QUEUE, (name,))
            if not any(row[7] for row in rows):
                conn.executemany(self.INSERT, rows)
                return [EnqueueOutcome(row[0], True) for row in rows]
            outcomes = []
            for row in rows:
                if row[7] is None:
                    conn.execute(self.INSERT, row)
                    outcomes.append(EnqueueOutcome(row[0], True))
                    continue
                conn.execute(self.INSERT_UNIQUE, row)
                if conn.changes():
                    outcomes.append(EnqueueOutcome(row[0], True))
                else:
                    existing = conn.execute(self.SELECT_ACTIVE_BY_KEY, (row[7],)).fetchall()
                    outcomes.append(EnqueueOutcome(existing[0][0], False))
            return outcomes

        outcomes = self._db.write(insert)
        self._known_queues |= new_queues
        return outcomes

    def _rows_for(self, requests: list[EnqueueRequest], router: Router | None
                  ) -> tuple[list[tuple[Any, ...]], set[str]]:
        """Validate and serialise every request before any write: all or nothing."""
        now = now_ms()
        ids = self._mint(len(requests))
        route = router.route if router is not None else None
        routed: dict[str, str] = {}
        rows = []
        for index, (job_id, req) in enumerate(zip(ids, requests, strict=True)):
            if type(req) is not EnqueueRequest:
                raise InvalidInput(f"request {index}: expected an EnqueueRequest, "
                                   f"got {type(req).__name__}")
            kind, payload, queue, priority, run_at, max_attempts, unique_key = req
            try:
                payload_json = _json_encode(payload)
            except (TypeError, ValueError, RecursionError) as exc:
                raise InvalidInput(f"request {index}: payload of {kind!r} is not "
                                   f"JSON-serialisable: {exc}") from None
            if queue is None:
                queue = routed.get(kind)
                if queue is None:
                    queue = DEFAULT_QUEUE if route is None else _check_name(
                        route(kind), f"queue chosen by the router for kind {kind!r}")
                    routed[kind] = queue
            rows.append((job_id, kind, queue, payload_json, priority,
                         now if run_at is None else int(run_at * 1000), max_attempts,
                         unique_key, now))
        return rows, {row[2] for row in rows}

    # -- reading --

    def get(self, job_id: str) -> Job | None:
        """The job with this id, or None."""
        rows = self._db.connection().execute(self.SELECT_ONE, (job_id,)).fetchall()
        return _job_from_row(rows[0]) if rows else None

    def list(self, state: str | None = None, queue: str | None = None, kind: str | None = None,
             limit: int = 100) -> list[Job]:
        """The newest jobs matching every given filter, newest first."""
        if state is not None:
            state = _check_state(state)
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
            raise InvalidInput(f"limit must be a non-negative integer, not {limit!r}")
        cursor = self._db.connection().execute(self.LIST, (state, queue, kind, limit))
        return [_job_from_row(row) for row in cursor]

    def counts(self, queue: str | None = None) -> dict[str, int]:
        """Number of jobs in each state (every state present, zeros included)."""
        conn = self._db.connection()
        cursor = (conn.execute(self.COUNT_BY_STATE) if queue is None
                  else conn.execute(self.COUNT_BY_STATE_IN_QUEUE, (queue,)))
        counts = dict.fromkeys((s.value for s in JobState), 0)
        counts.update(cursor)
        return counts

    def wait(self, job_id: str, timeout: float | None = None) -> Job:
        """Block until the job is done, failed or cancelled, and return it.

        Wakes at once on this process's commits and polls `PRAGMA data_version` every 50 ms
        for other processes', so waiting costs next to nothing. Raises TimeoutError.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        seen_version = None
        while True:
            version = self._db.data_version()
            if version != seen_version:
                seen_version = version
                job = self.get(job_id)
                if job is None:
                    raise InvalidInput(f"no job with id {job_id!r}")
                if job.state in FINISHED_STATES:
                    return job
            remaining = 0.05 if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"job {job_id} still {job.state.value} after {timeout} s")
            self._db.wait_for_change(min(remaining, 0.05))

    # -- administration --

    def cancel(self, job_id: str) -> str:
        """Cancel a queued job now, or ask a running one to stop.

        Returns "cancelled", "cancel_requested", "finished" or "not_found".
        """
        def cancel(conn: apsw.Connection) -> str:
            conn.execute(self.CANCEL_QUEUED, (job_id, now_ms()))
            if conn.changes():
                return "cancelled"
            conn.execute(self.REQUEST_CANCEL, (job_id,))
            if conn.changes():
                return "cancel_requested"
            exists = conn.execute(self.SELECT_STATE, (job_id,)).fetchall()
            return "finished" if exists else "not_found"

        return self._db.write(cancel)

    def retry(self, job_id: str) -> bool:
        """Put a failed or cancelled job back in its queue with its attempts reset.

        False if there is no such job or it is not failed/cancelled. InvalidInput if another
        active job now holds its unique key.
        """
        def retry(conn: apsw.Connection) -> bool:
            try:
                conn.execute(self.RETRY, (job_id, now_ms()))
            except apsw.ConstraintError:
                raise InvalidInput(f"job {job_id} cannot be retried: another queued or running "
                                   f"job holds its unique_key") from None
            return bool(conn.changes())

        return self._db.write(retry)

    def run_now(self, job_id: str) -> bool:
        """Make a scheduled (queued, future run_at) job ready now. False if not applicable."""
        return self._db.write(lambda conn: bool(
            conn.execute(self.RUN_NOW, (job_id, now_ms())) and conn.changes()))

    def delete(self, job_id: str) -> bool:
        """Delete a job that is not running (cancel a running one first)."""
        return self._db.write(lambda conn: bool(
            conn.execute(self.DELETE, (job_id,)) and conn.changes()))

    def purge(self, state: str, older_than: timedelta | float) -> int:
        """Delete jobs in a finished state that finished more than `older_than` ago.

        Deletes in chunks of short transactions so workers are never starved of the lock.
        Returns the number of rows deleted.
        """
        state = _check_state(state)
        if state not in FINISHED_STATES:
            raise InvalidInput(f"purge takes a finished state (done, failed, cancelled), "
                               f"not {state!r}")
        cutoff = now_ms() - int(_duration_seconds(older_than, "older_than") * 1000)
        total = 0
        while True:
            deleted = self._db.write(lambda conn: conn.execute(
                self.PURGE_CHUNK, (state, cutoff, self.PURGE_CHUNK_ROWS)) and conn.changes())
            total += deleted
            if deleted < self.PURGE_CHUNK_ROWS:
                return total


def _check_state(state: Any) -> str:
    try:
        return JobState(state).value
    except ValueError:
        raise InvalidInput(f"unknown job state {state!r}; expected one of "
                           f"{', '.join(s.value for s in JobState)}") from None


# ---------------------------------------------------------------- Queues ----

class Queues:
    """Per-queue settings shared by every process: `storage.queues`."""

    ENSURE = "INSERT OR IGNORE INTO queues (name) VALUES (?)"
    SET_PAUSED = "UPDATE queues SET paused = ?2 WHERE name = ?1"
    SET_LIMIT = "UPDATE queues SET concurrency = ?2 WHERE name = ?1"
    SET_BACKOFF = "UPDATE queues SET backoff_base_ms = ?2, backoff_cap_ms = ?3 WHERE name = ?1"
    SET_RETENTION = ("UPDATE queues SET retain_done_ms = coalesce(?2, retain_done_ms),"
                     " retain_failed_ms = coalesce(?3, retain_failed_ms) WHERE name = ?1")
    SELECT_ALL = ("SELECT name, paused, concurrency, backoff_base_ms, backoff_cap_ms,"
                  " cooldown_until, retain_done_ms, retain_failed_ms FROM queues ORDER BY name")

    def __init__(self, db: Database) -> None:
        self._db = db

    def _update(self, name: str, statement: str, *values: Any) -> None:
        _check_name(name, "queue name")

        def update(conn: apsw.Connection) -> None:
            conn.execute(self.ENSURE, (name,))
            conn.execute(statement, (name, *values))

        self._db.write(update)

    def pause(self, name: str) -> None:
        """Stop every process claiming from this queue; running jobs are asked to stop."""
        self._update(name, self.SET_PAUSED, 1)

    def resume(self, name: str) -> None:
        """Let processes claim from this queue again."""
        self._update(name, self.SET_PAUSED, 0)

    def set_limit(self, name: str, limit: int | None) -> None:
        """At most `limit` jobs of this queue run at once across all processes (None: no cap)."""
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool)
                                  or limit < 0):
            raise InvalidInput(f"limit must be a non-negative integer or None, not {limit!r}")
        self._update(name, self.SET_LIMIT, limit)

    def set_backoff(self, name: str, base: timedelta | float, cap: timedelta | float) -> None:
        """Retry delay after the n-th failure: min(base * 2**(n-1), cap), jittered."""
        base_ms = int(_duration_seconds(base, "backoff base") * 1000)
        cap_ms = int(_duration_seconds(cap, "backoff cap") * 1000)
        if cap_ms < base_ms:
            raise InvalidInput("backoff cap must not be smaller than its base")
        self._update(name, self.SET_BACKOFF, base_ms, cap_ms)

    def list(self) -> list[Queue]:
        """Every queue that has settings or ever had a job enqueued, by name."""
        return [Queue(name, bool(paused), limit, base / 1000, cap / 1000,
                      _datetime_from_ms(cooldown) if cooldown else None, done / 1000, failed / 1000)
                for name, paused, limit, base, cap, cooldown, done, failed
                in self._db.connection().execute(self.SELECT_ALL)]


# --------------------------------------------------------------- Storage ----

class Storage:
    """The database file and everything stored in it.

    Opening creates the file if needed and migrates it. Thread-safe: share one Storage
    between threads; each thread gets its own connection.
    """

    def __init__(self, path: str | os.PathLike[str], *, durable: bool = False,
                 busy_timeout: float = 5.0) -> None:
        self.db = Database(path, durable=durable, busy_timeout=busy_timeout)
        self.path = self.db.path
        self.jobs = Jobs(self.db)
        self.queues = Queues(self.db)

    def close(self) -> None:
        """Close all connections. The Storage cannot be used afterwards."""
        self.db.close()

    def __enter__(self) -> Storage:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Storage({self.path!r})"
