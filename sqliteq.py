"""sqliteq: a durable job queue in one file, on SQLite in WAL mode.

Programs enqueue jobs into a SQLite file; a thread-pool `Runtime` in any number of processes
runs them with retries, priorities, schedules, unique keys and queue pause/resume, and
cancellation that reaches a job running in another process. `Storage("postgresql://…")`
runs the same API on a PostgreSQL server, for workers on many machines.

Needs apsw and python-ulid; the `sqliteq` command also needs click, and PostgreSQL psycopg 3
with psycopg_pool (`pip install 'sqliteq[postgres]'`); both are imported only when used.

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

MIT License

Copyright (c) 2026 the sqliteq authors

Permission is hereby granted, free of charge, to any person obtaining a copy of this software
and associated documentation files (the "Software"), to deal in the Software without
restriction, including without limitation the rights to use, copy, modify, merge, publish,
distribute, sublicense, and/or sell copies of the Software, and to permit persons to whom the
Software is furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all copies or
substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING
BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND
NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM,
DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.
"""

from __future__ import annotations

import bisect
import builtins
import contextlib
import functools
import hashlib
import heapq
import hmac
import html
import http.cookies
import importlib
import inspect
import ipaddress
import itertools
import json
import logging
import math
import operator
import os
import queue as queue_module
import random
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.parse
import weakref
import zoneinfo
from collections.abc import Callable, Collection, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import date, datetime, timedelta, timezone, tzinfo
from enum import Enum
from typing import (
    TYPE_CHECKING,
    Any,
    ClassVar,
    Generic,
    NamedTuple,
    NoReturn,
    Protocol,
    TypeVar,
    cast,
    overload,
)

import apsw
import ulid

if TYPE_CHECKING:
    import asyncio  # imported where it is used: most programs never need it

__version__ = "0.1.0"
# (`map`, public too, stays out: `from sqliteq import *` must not hide the builtin.)
__all__ = [
    "CancellationToken", "Cancelled", "ConfigError", "CopyReport", "CronExpression",
    "CronSchedule", "CronSchedules", "Database", "Dead", "DefaultRouter", "EnqueueOutcome",
    "EnqueueRequest", "InvalidInput", "Job", "JobCtx", "JobProgress", "JobState", "Jobs",
    "KindRouter", "MapError", "MapItemFailed", "Metrics", "MetricsPoint", "MetricsTotal",
    "Outcome", "PrefixRouter", "ProcessInfo", "Processes", "Queue", "QueueStats", "Queues",
    "RateLimiter", "RateLimits", "Retry", "Router", "Runtime", "SchemaError", "Snooze",
    "SqliteqError", "Storage", "StorageError", "Task", "Throttled", "TimeLimitExceeded",
    "Timings", "TransientError", "main", "new_id", "now_ms", "parse_duration",
]

log = logging.getLogger("sqliteq")
job_log = logging.getLogger("sqliteq.jobs")    # one INFO line per finished job
T = TypeVar("T")


# ---------------------------------------------------------------- Errors ----

class SqliteqError(Exception):
    """Root of every error sqliteq raises on purpose."""


class InvalidInput(SqliteqError, ValueError):
    """A request or argument is malformed. Nothing was written."""


class TransientError(SqliteqError):
    """The writer lock stayed contended through every retry. Safe to try again later."""


class SchemaError(SqliteqError):
    """The database file cannot be used: not SQLite, corrupt, newer schema, read-only, a
    missing folder, or (opened with `create=False`) missing. A runtime that meets it stops."""


class StorageError(SqliteqError):
    """The disk failed the database file: disk full, an I/O error.

    Retrying helps only once an operator acts; a runtime backs off until then. A write that
    fails this way may still have taken effect (see README "Guarantees")."""


class ConfigError(SqliteqError):
    """The runtime or a limiter is configured inconsistently."""


class Cancelled(SqliteqError):
    """Raised by a handler to end its job as `cancelled`; raised by waits whose token fired."""


class TimeLimitExceeded(SqliteqError, TimeoutError):
    """Recorded as the error of an attempt that ran past its time limit (see
    `Runtime.register`); `stack` is where its handler was when the attempt was given up."""

    def __init__(self, message: str, stack: str | None = None) -> None:
        super().__init__(message)
        self.stack = stack


# ---------------------------------------------------------------- Values ----

class JobState(str, Enum):
    """Where a job is in its lifecycle. Compares equal to its string value."""

    WAITING = "waiting"         # for its parents (EnqueueRequest.depends_on)
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value


FINISHED_STATES = (JobState.DONE, JobState.FAILED, JobState.CANCELLED)
DEFAULT_QUEUE = "default"
DEFAULT_MAX_ATTEMPTS = 5
MAX_ERRORS_KEPT = 20            # a job keeps the last this-many attempt errors
MAX_PROGRESS_NOTE = 1000        # characters of a ctx.progress note
_HOSTNAME = socket.gethostname()

# ASCII output: compact, valid UTF-8 whatever the payload holds (even lone surrogates).
# No check for circular references: its memo doubles the cost of encoding a small value,
# and a value that contains itself fails anyway, as a RecursionError (see _encode_json).
_json_encoder = json.JSONEncoder(separators=(",", ":"), allow_nan=False, check_circular=False)
_c_make_encoder: Any = getattr(json.encoder, "c_make_encoder", None)
_c_encoder: Any = None if _c_make_encoder is None else _c_make_encoder(
    None, _json_encoder.default, json.encoder.encode_basestring_ascii, None, ":", ",",
    False, False, False)


def _json_encode_c(value: Any) -> str:
    """What _json_encoder.encode returns, from CPython's C encoder called directly: its
    Python layers cost as much as the encoding of a small payload. (The encoder keeps no
    state between calls, so threads share it.)"""
    return "".join(_c_encoder(value, 0))


_json_encode: Callable[[Any], str] = _json_encoder.encode
with contextlib.suppress(Exception):    # another Python, or another signature: the plain one
    if _c_encoder is not None and _json_encode_c({"a": [1, "é"]}) == '{"a":[1,"\\u00e9"]}':
        _json_encode = _json_encode_c
_json_scan: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


def _json_decode(data: str | bytes) -> Any:
    """What json.loads returns, from its scanner called directly when the text is one
    value and nothing more (as sqliteq writes it): sniffing the encoding of bytes and
    skipping whitespace cost four times a small payload's decoding. Any other text goes
    to json.loads, for its answer or its error."""
    try:
        text = data if isinstance(data, str) else data.decode()
        value, end = _json_scan(text, 0)
    except (ValueError, StopIteration):    # (UnicodeDecodeError, JSONDecodeError: ValueError)
        return json.loads(data)
    return value if end == len(text) else json.loads(data)


# Values nested deeper are refused: whatever reads them back (a handler's thread, the CLI's
# pretty-printer, a dashboard) has the Python stack to decode and print them.
MAX_JSON_DEPTH = 100


def _nests_deeper_than(value: Any, limit: int) -> bool:
    """Whether lists and dicts nest more than `limit` deep in `value` (without recursion;
    only containers are visited, and the walk stops at the first one too deep)."""
    containers = (dict, list, tuple)
    stack = [(value, 1)] if isinstance(value, containers) else []
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, containers))
    return False


def _encode_json(value: Any, what: str, *what_args: object) -> str:
    """`value` as compact JSON; InvalidInput naming `what % what_args` if it cannot be.
    (The name is formatted only for the error: enqueue calls this once a job.)"""
    try:
        text = _json_encode(value)
    except RecursionError:
        raise InvalidInput(f"{what % what_args} nests lists and objects more than "
                           f"{MAX_JSON_DEPTH} deep, or contains itself") from None
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"{what % what_args} is not JSON-serialisable: {exc}") from None
    # Only a text with that many brackets (so twice as many characters) can nest that
    # deep: most values need no count, and most of the rest no walk.
    if (len(text) > 2 * MAX_JSON_DEPTH
            and text.count("[") + text.count("{") > MAX_JSON_DEPTH
            and _nests_deeper_than(value, MAX_JSON_DEPTH)):
        raise InvalidInput(f"{what % what_args} nests lists and objects more than "
                           f"{MAX_JSON_DEPTH} deep; at most {MAX_JSON_DEPTH} levels are allowed")
    return text


def _decode_stored(text: str | bytes, what: str) -> Any:
    """JSON that sqliteq stored; a clear error if something else wrote it."""
    try:
        return _json_decode(text)
    except (ValueError, RecursionError) as exc:     # (UnicodeDecodeError is a ValueError)
        raise SqliteqError(f"{what} in the database is not JSON sqliteq can read "
                           f"({type(exc).__name__}: {exc})") from None


def _text_from_blob(data: bytes | str) -> str:
    """A text column read as bytes (see _JOB_COLUMNS); bytes that are not UTF-8 replaced.
    (PostgreSQL checks the encoding itself: its text comes as str.)"""
    return data if isinstance(data, str) else data.decode("utf-8", "replace")


def now_ms() -> int:
    """The current time as integer milliseconds since the Unix epoch (the database's unit)."""
    return time.time_ns() // 1_000_000


# 0001-01-01 .. the last millisecond of 9999-12-31, UTC: what datetime can read back.
_EARLIEST, _LATEST = -62_135_596_800, 253_402_300_799.999
_LATEST_MS = int(_LATEST * 1000)


def _epoch_seconds(value: datetime | float | int, what: str) -> float:
    """Accept an aware datetime or epoch seconds; reject naive datetimes and non-numbers."""
    if isinstance(value, datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise InvalidInput(f"{what} is a naive datetime; give it a timezone (e.g. UTC)")
        value = value.timestamp()
    if isinstance(value, (int, float)) and not isinstance(value, bool) \
            and _EARLIEST <= value <= _LATEST:
        return float(value)
    raise InvalidInput(f"{what} must be an aware datetime or epoch seconds, not {value!r}")


def _duration_seconds(value: timedelta | float | int, what: str) -> float:
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1e12:
        return float(value)
    raise InvalidInput(f"{what} must be a non-negative number of seconds or a timedelta")


def _time_limit(value: timedelta | float | int, what: str) -> float:
    """A time limit in seconds: positive, and at most a year."""
    seconds = _duration_seconds(value, what)
    if not 0 < seconds <= 366 * 86400:
        raise InvalidInput(f"{what} must be more than 0 s and at most a year, not {value!r}")
    return seconds


def _datetime_from_ms(ms: int | None) -> datetime | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, timezone.utc)


def _describe(exc: BaseException) -> str:
    """str(exc), even for exceptions whose __str__ raises."""
    try:
        return str(exc)
    except Exception:
        return f"<{type(exc).__name__} that cannot be shown>"


def _log_line(exc: BaseException) -> str:
    """An error for a log line: its first line, cut at 200 characters (a message may quote a
    payload; logs get a glimpse, the job's errors the whole)."""
    line = (f"{type(exc).__name__}: {_describe(exc)}".splitlines() or [""])[0]
    return line if len(line) <= 200 else line[:199] + "…"


def _iso_from_ms(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat(
        timespec="milliseconds").replace("+00:00", "Z")


def _check_name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value or value != value.strip():
        raise InvalidInput(f"{what} must be a non-empty string without surrounding spaces, "
                           f"not {value!r}")
    return _check_text(value, what)


def _check_text(value: str, what: str) -> str:
    """SQLite stores UTF-8: refuse strings that cannot be encoded (lone surrogates)."""
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidInput(f"{what} {value!r} is not valid Unicode text") from None
    return value


class _RequestFields(NamedTuple):
    kind: str
    payload: Any
    queue_name: str | None
    priority: int
    run_at: float | None
    max_attempts: int
    unique_key: str | None
    timeout: float | None
    job_id: str | None
    depends_on: tuple[str, ...]
    allow_parent_failure: bool


# A job id: a ULID in Crockford's base 32, as _mint_ids writes them.
_JOB_ID = re.compile(r"[0-7][0-9A-HJKMNP-TV-Z]{25}")


def _check_job_id(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _JOB_ID.fullmatch(value):
        raise InvalidInput(f"{what} must be a job id (a ULID, as new_id() makes), not {value!r}")
    return value


class EnqueueRequest(_RequestFields):
    """A job to enqueue, validated on construction and immutable afterwards.

    `run_at` is taken as an aware `datetime` or epoch seconds and kept as epoch seconds.
    `queue_name=None` lets the router (or "default") choose. Lower `priority` runs first.
    `timeout` (seconds) limits each attempt, overriding the handler's (see Runtime.register).
    `depends_on` names parent jobs: the job waits until every one is done; when one ends
    failed or cancelled, so is this job (cancelled, naming it), unless `allow_parent_failure`.
    Parents are existing jobs or requests of the same bulk call, named by the `job_id` given
    them (from `new_id()`); without one, an id is minted on insert. The payload is encoded
    as JSON when the request is built (that is its validation), and the job stores that
    text: changing the object afterwards does not change the job.
    """

    __slots__ = ()
    # The tuple holds one item past the fields: the payload's JSON, so that an enqueue does
    # not encode it a second time. Equality compares it too (it follows from the payload).

    def __new__(cls, kind: str, payload: Any = None, *, queue_name: str | None = None,
                priority: int = 0, run_at: datetime | float | None = None,
                max_attempts: int | None = None, unique_key: str | None = None,
                timeout: timedelta | float | None = None, job_id: str | None = None,
                depends_on: Iterable[str] = (), allow_parent_failure: bool = False
                ) -> EnqueueRequest:
        _check_name(kind, "kind")
        payload_json = _encode_json(payload, "payload of %r", kind)
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
        if unique_key is not None:
            if not isinstance(unique_key, str) or not unique_key:
                raise InvalidInput(f"unique_key must be a non-empty string, not {unique_key!r}")
            _check_text(unique_key, "unique_key")
        if timeout is not None:
            timeout = _time_limit(timeout, "timeout")
        if job_id is not None:
            _check_job_id(job_id, "job_id")
        if isinstance(depends_on, (str, bytes)):
            raise InvalidInput("depends_on must be a list of job ids, not a string")
        parents = () if depends_on == () else tuple(dict.fromkeys(
            _check_job_id(parent, "each of depends_on") for parent in depends_on))
        if not isinstance(allow_parent_failure, bool):
            raise InvalidInput(f"allow_parent_failure must be True or False, "
                               f"not {allow_parent_failure!r}")
        return tuple.__new__(cls, (kind, payload, queue_name, priority, run_at, max_attempts,
                                   unique_key, timeout, job_id, parents, allow_parent_failure,
                                   payload_json))

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={value!r}" for name, value in self._asdict().items())
        return f"EnqueueRequest({fields})"

    # Every way of building one goes through __new__'s validation.
    @classmethod
    def _make(cls, iterable: Iterable[Any]) -> EnqueueRequest:  # type: ignore[override]
        if isinstance(iterable, EnqueueRequest):    # its fields, without the payload's JSON
            iterable = iterable[:len(cls._fields)]
        return cls._from_fields(dict(zip(cls._fields, iterable, strict=True)))

    def _replace(self, **changes: Any) -> EnqueueRequest:
        return self._from_fields({**self._asdict(), **changes})

    def __getnewargs_ex__(self) -> tuple[tuple[Any, ...], dict[str, Any]]:   # pickle, copy
        fields = self._asdict()
        return (fields.pop("kind"), fields.pop("payload")), fields

    @classmethod
    def _from_fields(cls, fields: dict[str, Any]) -> EnqueueRequest:
        fields = dict(fields)
        return cls(fields.pop("kind"), fields.pop("payload"), **fields)


# An EnqueueRequest as the tuple it is: its fields, then the payload's JSON.
_RequestItems = tuple[str, Any, str | None, int, float | None, int, str | None,
                      float | None, str | None, tuple[str, ...], bool, str]


class JobProgress(NamedTuple):
    """What a handler last reported by `ctx.progress`: `done` of `total` (if known)."""

    done: float
    total: float | None = None
    note: str | None = None


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
    timeout: float | None = None            # seconds each attempt may run, if the job says
    progress: JobProgress | None = None     # of the running (or last) attempt
    depends_on: tuple[str, ...] = ()        # its parents (see EnqueueRequest)
    waiting_on: int = 0                     # how many of them have not ended yet


@dataclass(frozen=True, slots=True)
class QueueStats:
    """A queue's load: job counts by state, throughput and lag."""

    name: str
    ready: int                      # queued and due now
    scheduled: int                  # queued for later
    running: int
    done: int
    failed: int
    cancelled: int
    paused: bool
    limit: int | None
    jobs_per_minute: float          # finished (done or failed) over the last 5 minutes
    oldest_ready_age: float | None  # seconds the oldest ready job has waited


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


class Outcome(Exception):
    """Base of the outcomes a handler raises to steer what happens to its job."""


class Retry(Outcome):
    """Fail this attempt and retry after `after` seconds (default: the queue's backoff)."""

    def __init__(self, after: timedelta | float | None = None, reason: str = "") -> None:
        super().__init__(reason or "retry requested")
        self.after = None if after is None else _duration_seconds(after, "Retry.after")
        self.reason = reason


class Snooze(Outcome):
    """Run the job again after `after` seconds; the attempt is refunded."""

    def __init__(self, after: timedelta | float) -> None:
        super().__init__(f"snoozed for {after} s")
        self.after = _duration_seconds(after, "Snooze.after")


class Throttled(Outcome):
    """An upstream said "slow down": requeue (refunded) and cool the whole queue down."""

    def __init__(self, retry_after: timedelta | float) -> None:
        super().__init__(f"throttled for {retry_after} s")
        self.retry_after = _duration_seconds(retry_after, "Throttled.retry_after")


class Dead(Outcome):
    """Fail the job now, without further attempts."""

    def __init__(self, reason: str = "") -> None:
        super().__init__(reason or "dead")
        self.reason = reason


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
    (
        # Cluster-wide periodic chores (the janitor): whoever moves last_run_at runs it.
        """CREATE TABLE chores (
            name        TEXT PRIMARY KEY NOT NULL,
            last_run_at INTEGER NOT NULL
        )""",
    ),
    (
        # When a queue's next scheduled job is due, in O(log n) however many wait: lets an
        # idle dispatcher sleep until then instead of scanning the backlog on every poll.
        "CREATE INDEX jobs_due ON jobs (queue, run_at) WHERE state = 'queued'",
        # Each host is judged by the lease timeout it declared, not by the reaper's own.
        "ALTER TABLE processes ADD COLUMN lease_timeout_ms INTEGER NOT NULL DEFAULT 30000",
    ),
    (
        # The progress clock (see Processes): hosts are judged on it, not on wall time.
        "ALTER TABLE processes ADD COLUMN progress_at INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE processes ADD COLUMN heartbeat_interval_ms INTEGER NOT NULL DEFAULT 1000",
        "UPDATE processes SET progress_at = heartbeat_at",
    ),
    (
        # Storage engine v2: a single-job commit writes about two pages, as a bare queue
        # table does. The ULID is the key of a WITHOUT ROWID table (no second b-tree mapping
        # it to a rowid), and a queued job is either `queued` (ready: in jobs_claim only) or
        # `scheduled` (run_at in the future: in jobs_due only), so each new job enters one
        # index. Claims promote due scheduled jobs first (see _JobStore). Small fixed-size
        # columns come first: reading them never walks a large payload's overflow pages.
        """CREATE TABLE jobs_v2 (
            id               TEXT PRIMARY KEY NOT NULL,
            queue            TEXT NOT NULL,
            state            TEXT NOT NULL CHECK (state IN ('queued', 'scheduled', 'running',
                                                            'done', 'failed', 'cancelled')),
            priority         INTEGER NOT NULL DEFAULT 0,
            run_at           INTEGER NOT NULL,
            attempt          INTEGER NOT NULL DEFAULT 0,
            max_attempts     INTEGER NOT NULL DEFAULT 5,
            lease            INTEGER,
            cancel_requested INTEGER NOT NULL DEFAULT 0,
            created_at       INTEGER NOT NULL,
            started_at       INTEGER,
            finished_at      INTEGER,
            host             TEXT,
            worker           TEXT,
            unique_key       TEXT,
            kind             TEXT NOT NULL,
            payload          TEXT NOT NULL,
            result           TEXT,
            errors           TEXT
        ) WITHOUT ROWID""",
        """INSERT INTO jobs_v2 (id, queue, state, priority, run_at, attempt, max_attempts, lease,
                                cancel_requested, created_at, started_at, finished_at, host,
                                worker, unique_key, kind, payload, result, errors)
           SELECT id, queue,
                  CASE WHEN state = 'queued' AND run_at >
                            CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)
                       THEN 'scheduled' ELSE state END,
                  priority, run_at, attempt, max_attempts, lease, cancel_requested,
                  created_at, started_at, finished_at, host, worker, unique_key, kind,
                  payload, result, errors
           FROM jobs""",
        "DROP TABLE jobs",
        "ALTER TABLE jobs_v2 RENAME TO jobs",
        # The claim reads only this index; being partial, it stays as small as the ready
        # backlog however many finished rows the table keeps. (Its entries end with the key,
        # id, as every index of a WITHOUT ROWID table does: the claim order is complete.)
        "CREATE INDEX jobs_claim ON jobs (queue, priority, run_at) WHERE state = 'queued'",
        # When a queue's next scheduled job is due, and which are due now.
        "CREATE INDEX jobs_due ON jobs (queue, run_at) WHERE state = 'scheduled'",
        ("CREATE UNIQUE INDEX jobs_unique_active ON jobs (unique_key) WHERE unique_key"
         " IS NOT NULL AND state IN ('queued', 'scheduled', 'running')"),
        "CREATE INDEX jobs_running ON jobs (host, queue) WHERE state = 'running'",
        ("CREATE INDEX jobs_finished ON jobs (state, finished_at)"
         " WHERE state IN ('done', 'failed', 'cancelled')"),
    ),
    (
        # A job's own time limit per attempt (NULL: its handler's), and what its running
        # handler last reported by ctx.progress (JSON).
        "ALTER TABLE jobs ADD COLUMN timeout_ms INTEGER",
        "ALTER TABLE jobs ADD COLUMN progress TEXT",
    ),
    (
        # Per-minute rollups (see Metrics): durations in microseconds, histograms as JSON
        # objects of bucket -> count.
        """CREATE TABLE metrics (
            minute         INTEGER NOT NULL,
            queue          TEXT NOT NULL,
            kind           TEXT NOT NULL,
            done           INTEGER NOT NULL,
            failed         INTEGER NOT NULL,
            retried        INTEGER NOT NULL,
            cancelled      INTEGER NOT NULL,
            run_count      INTEGER NOT NULL,
            run_sum_us     INTEGER NOT NULL,
            run_max_us     INTEGER NOT NULL,
            run_histogram  TEXT NOT NULL,
            wait_count     INTEGER NOT NULL,
            wait_sum_us    INTEGER NOT NULL,
            wait_max_us    INTEGER NOT NULL,
            wait_histogram TEXT NOT NULL,
            PRIMARY KEY (minute, queue, kind)
        ) WITHOUT ROWID""",
        # Lifetime sums, never swept: what counters (Prometheus's) are made of.
        """CREATE TABLE metrics_totals (
            queue       TEXT NOT NULL,
            kind        TEXT NOT NULL,
            done        INTEGER NOT NULL,
            failed      INTEGER NOT NULL,
            retried     INTEGER NOT NULL,
            cancelled   INTEGER NOT NULL,
            run_count   INTEGER NOT NULL,
            run_sum_us  INTEGER NOT NULL,
            wait_count  INTEGER NOT NULL,
            wait_sum_us INTEGER NOT NULL,
            PRIMARY KEY (queue, kind)
        ) WITHOUT ROWID""",
    ),
    (
        # Failed jobs per queue and kind (the dashboard, /metrics, retry_failed) without
        # reading the finished rows; other jobs never enter it, so the hot path pays nothing.
        "CREATE INDEX jobs_failed ON jobs (queue, kind) WHERE state = 'failed'",
    ),
    (
        # Dependencies. A job with parents is `waiting` (in no claim index) until
        # `waiting_on`, its parents not yet settled, drops to 0. The state's CHECK is
        # widened by rebuilding the table, as SQLite alters no constraint in place.
        """CREATE TABLE jobs_v3 (
            id                   TEXT PRIMARY KEY NOT NULL,
            queue                TEXT NOT NULL,
            state                TEXT NOT NULL CHECK (state IN (
                                     'waiting', 'queued', 'scheduled', 'running', 'done',
                                     'failed', 'cancelled')),
            priority             INTEGER NOT NULL DEFAULT 0,
            run_at               INTEGER NOT NULL,
            attempt              INTEGER NOT NULL DEFAULT 0,
            max_attempts         INTEGER NOT NULL DEFAULT 5,
            lease                INTEGER,
            cancel_requested     INTEGER NOT NULL DEFAULT 0,
            created_at           INTEGER NOT NULL,
            started_at           INTEGER,
            finished_at          INTEGER,
            timeout_ms           INTEGER,
            waiting_on           INTEGER NOT NULL DEFAULT 0,
            allow_parent_failure INTEGER NOT NULL DEFAULT 0,
            has_parents          INTEGER NOT NULL DEFAULT 0,
            host                 TEXT,
            worker               TEXT,
            unique_key           TEXT,
            kind                 TEXT NOT NULL,
            payload              TEXT NOT NULL,
            result               TEXT,
            errors               TEXT,
            progress             TEXT
        ) WITHOUT ROWID""",
        """INSERT INTO jobs_v3 (id, queue, state, priority, run_at, attempt, max_attempts,
                                lease, cancel_requested, created_at, started_at, finished_at,
                                timeout_ms, host, worker, unique_key, kind, payload, result,
                                errors, progress)
           SELECT id, queue, state, priority, run_at, attempt, max_attempts, lease,
                  cancel_requested, created_at, started_at, finished_at, timeout_ms, host,
                  worker, unique_key, kind, payload, result, errors, progress
           FROM jobs""",
        "DROP TABLE jobs",
        "ALTER TABLE jobs_v3 RENAME TO jobs",
        "CREATE INDEX jobs_claim ON jobs (queue, priority, run_at) WHERE state = 'queued'",
        "CREATE INDEX jobs_due ON jobs (queue, run_at) WHERE state = 'scheduled'",
        ("CREATE UNIQUE INDEX jobs_unique_active ON jobs (unique_key) WHERE unique_key"
         " IS NOT NULL AND state IN ('waiting', 'queued', 'scheduled', 'running')"),
        "CREATE INDEX jobs_running ON jobs (host, queue) WHERE state = 'running'",
        ("CREATE INDEX jobs_finished ON jobs (state, finished_at)"
         " WHERE state IN ('done', 'failed', 'cancelled')"),
        "CREATE INDEX jobs_failed ON jobs (queue, kind) WHERE state = 'failed'",
        # One row per (parent, child), `position` its place in the child's depends_on;
        # `settled` once the parent's end has been counted (see _JobStore.settle). (Not a
        # JSON list in the child's row: each count-off rewrites that row, and a join of
        # 100,000 parents would be rewritten whole 100,000 times.)
        """CREATE TABLE job_deps (
            parent   TEXT NOT NULL,
            child    TEXT NOT NULL,
            settled  INTEGER NOT NULL DEFAULT 0,
            position INTEGER NOT NULL,
            PRIMARY KEY (parent, child)
        ) WITHOUT ROWID""",
        "CREATE INDEX job_deps_child ON job_deps (child, position)",
    ),
    (
        # Ended jobs, by queue, for the janitor's sweep. The old index's `state IN (...)`
        # was tested on every update of `state`, a third of a claim-and-finish's cost, and
        # no query used it: SQLite takes a partial index only where the query's WHERE
        # implies the index's, and neither `state = ?` nor `state = 'done'` implies an IN
        # list. An OR of equalities is implied by each of them.
        "DROP INDEX jobs_finished",
        ("CREATE INDEX jobs_ended ON jobs (state, queue, finished_at)"
         " WHERE state = 'done' OR state = 'failed' OR state = 'cancelled'"),
    ),
    (
        # The state's CHECK as an OR of equalities. SQLite tests a CHECK on every insert and
        # every change of state, and an IN list there cost about 30 % of the instructions of
        # a claim-and-finish and 14 % of a single enqueue; the ORs cost a tenth of that.
        # (Measured with bench/drain_instructions.py. In a partial index's WHERE, or in a
        # query, the IN list costs next to nothing.) The table is rebuilt, as for step 9.
        """CREATE TABLE jobs_v4 (
            id                   TEXT PRIMARY KEY NOT NULL,
            queue                TEXT NOT NULL,
            state                TEXT NOT NULL CHECK (
                                     state = 'waiting' OR state = 'queued'
                                     OR state = 'scheduled' OR state = 'running'
                                     OR state = 'done' OR state = 'failed'
                                     OR state = 'cancelled'),
            priority             INTEGER NOT NULL DEFAULT 0,
            run_at               INTEGER NOT NULL,
            attempt              INTEGER NOT NULL DEFAULT 0,
            max_attempts         INTEGER NOT NULL DEFAULT 5,
            lease                INTEGER,
            cancel_requested     INTEGER NOT NULL DEFAULT 0,
            created_at           INTEGER NOT NULL,
            started_at           INTEGER,
            finished_at          INTEGER,
            timeout_ms           INTEGER,
            waiting_on           INTEGER NOT NULL DEFAULT 0,
            allow_parent_failure INTEGER NOT NULL DEFAULT 0,
            has_parents          INTEGER NOT NULL DEFAULT 0,
            host                 TEXT,
            worker               TEXT,
            unique_key           TEXT,
            kind                 TEXT NOT NULL,
            payload              TEXT NOT NULL,
            result               TEXT,
            errors               TEXT,
            progress             TEXT
        ) WITHOUT ROWID""",
        "INSERT INTO jobs_v4 SELECT * FROM jobs",     # the same columns, in the same order
        "DROP TABLE jobs",
        "ALTER TABLE jobs_v4 RENAME TO jobs",
        "CREATE INDEX jobs_claim ON jobs (queue, priority, run_at) WHERE state = 'queued'",
        "CREATE INDEX jobs_due ON jobs (queue, run_at) WHERE state = 'scheduled'",
        ("CREATE UNIQUE INDEX jobs_unique_active ON jobs (unique_key) WHERE unique_key"
         " IS NOT NULL AND state IN ('waiting', 'queued', 'scheduled', 'running')"),
        "CREATE INDEX jobs_running ON jobs (host, queue) WHERE state = 'running'",
        ("CREATE INDEX jobs_ended ON jobs (state, queue, finished_at)"
         " WHERE state = 'done' OR state = 'failed' OR state = 'cancelled'"),
        "CREATE INDEX jobs_failed ON jobs (queue, kind) WHERE state = 'failed'",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)


def migrate(conn: apsw.Connection) -> None:
    """Bring the file to SCHEMA_VERSION. The caller holds a write transaction."""
    version = cast(int, conn.execute("PRAGMA user_version").fetchall()[0][0])
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
LEAD_HANDOFF_TIMEOUT = 0.1      # seconds a writer handed the group-commit lead has to take it
# Once a checkpoint lets the WAL start over, the file is cut back to this size. While a reader
# holds an old snapshot, no checkpoint can, and the WAL grows: past WAL_WARN_FACTOR times this,
# a runtime warns.
WAL_SIZE_LIMIT = 64 * 1024 * 1024
WAL_WARN_FACTOR = 4


def _storage_error(exc: apsw.Error, path: str) -> BaseException:
    """The SqliteqError that tells a caller what a database error means for them; errors
    of the SQL itself (a bug) stay as they are."""
    if isinstance(exc, apsw.ReadOnlyError):
        return SchemaError(f"database {path!r} is read-only")
    if isinstance(exc, apsw.NotADBError):
        return SchemaError(f"{path!r} is not a SQLite database")
    if isinstance(exc, apsw.CorruptError):
        return SchemaError(f"database {path!r} is corrupt ({exc}); restore it from a backup")
    if isinstance(exc, apsw.FullError):
        return StorageError(f"disk full writing {path!r} ({exc}); free space and retry")
    if isinstance(exc, (apsw.IOError, apsw.CantOpenError, apsw.NoLFSError)):
        return StorageError(f"I/O error on {path!r} ({exc})")
    return exc


class _WriteRequest:
    """One caller's write, waiting to be run in the next group commit."""

    __slots__ = ("after_commit", "done", "error", "gate", "result", "work")

    def __init__(self, work: Callable[[apsw.Connection], Any]) -> None:
        self.work = work
        self.result: Any = None
        self.error: BaseException | None = None
        self.done = False
        self.after_commit: list[Callable[[], None]] = []   # registered by this run of work
        self.gate = threading.Lock()    # released to wake the writer (done, or lead is free)
        self.gate.acquire()

    def wake(self) -> None:
        """Wake the waiting writer (call with the pending lock held: wakes never race)."""
        if self.gate.locked():
            self.gate.release()

    def run(self, conn: apsw.Connection) -> None:
        """Run alone in the transaction: any error aborts the transaction."""
        self.after_commit = []
        self.result = self.work(conn)

    def run_in_savepoint(self, conn: apsw.Connection) -> None:
        """Run beside other writes: an error rolls back this write only (busy errors still
        abort the whole transaction, to be retried)."""
        self.after_commit = []
        conn.execute("SAVEPOINT write")
        try:
            self.result, self.error = self.work(conn), None
        except (apsw.BusyError, apsw.LockedError):
            raise
        except Exception as exc:
            conn.execute("ROLLBACK TO write")
            self.result, self.error, self.after_commit = None, exc, []
        conn.execute("RELEASE write")

    def committed(self) -> None:
        """Run what the work asked to run once it committed."""
        for callback in self.after_commit:
            try:
                callback()
            except Exception:
                log.exception("an after-commit callback failed")


class _CommitNotices:
    """Wakes this process's waiters (Jobs.wait, and through it anyone polling) when a write
    commits. The writer announces only while someone waits."""

    def __init__(self) -> None:
        self._commit_cv = threading.Condition(threading.Lock())
        self._commit_seq = 0
        self._commit_waiters = 0

    def _announce_commit(self) -> None:
        with self._commit_cv:
            self._commit_seq += 1
            self._commit_cv.notify_all()

    def _wait_for_change(self, timeout: float) -> None:
        """Sleep until a write commits, or `timeout` seconds pass."""
        with self._commit_cv:
            self._commit_waiters += 1
            try:
                seq = self._commit_seq
                self._commit_cv.wait_for(lambda: self._commit_seq != seq, timeout)
            finally:
                self._commit_waiters -= 1


class Database(_CommitNotices):
    """Connections (one per thread), pragmas, and the single write-transaction helper.

    Every write goes through `write`. Threads of one process queue their writes in memory and
    one of them at a time (the leader) commits what has queued, so they neither sleep-poll in
    SQLite's busy handler nor pay a commit each; the busy timeout only arbitrates between
    processes. Each transaction is `BEGIN IMMEDIATE`: the writer lock is taken up front, so
    no lock upgrade can deadlock.
    """

    SCHEMA_PROBE = ("SELECT (SELECT user_version FROM pragma_user_version),"
                    " (SELECT count(*) FROM sqlite_master)")

    def __init__(self, path: str | os.PathLike[str], *, durable: bool = False,
                 busy_timeout: float = 5.0, vfs: str | None = None) -> None:
        if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
            raise InvalidInput(f"database path must be a non-empty str or os.PathLike, "
                               f"not {path!r}")
        if vfs is not None and vfs not in apsw.vfs_names():
            raise InvalidInput(f"unknown SQLite VFS {vfs!r}; registered: "
                               f"{', '.join(apsw.vfs_names())}")
        self.path = os.fspath(path)
        self.vfs = vfs
        self.durable = durable
        self.busy_timeout_ms = int(_duration_seconds(busy_timeout, "busy_timeout") * 1000)
        self._local = threading.local()
        self._connections: list[apsw.Connection] = []
        self._connections_lock = threading.Lock()
        self._pending_lock = threading.Lock()
        self._pending: list[_WriteRequest] = []
        self._leader: _WriteRequest | None = None   # whose writer commits the next batch
        self._leading = False           # that writer is committing now
        self._lead_handed_at = 0.0
        self._batch_committed = False   # whether the leader's last COMMIT took effect
        self._closed = False
        # Writes of this process that took effect. A thread that counts its own can tell
        # when other threads wrote, even when their writes rode in its own group commit
        # (which does not change its connection's data_version).
        self._writes_committed = 0
        super().__init__()
        self._check_path()
        try:
            self.write(migrate)
        except BaseException:
            self.close()
            raise

    def _check_path(self) -> None:
        folder = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(folder):
            raise SchemaError(f"cannot open database {self.path!r}: folder {folder!r} "
                              f"does not exist")
        if os.path.isdir(self.path):
            raise SchemaError(f"cannot open database {self.path!r}: it is a directory")
        # Checked before SQLite opens anything: refusing later would leave -wal and -shm
        # files behind, next to a file this process may not even write. SQLite puts them
        # beside the file a symlink points to, and writes with the effective user's rights.
        effective = os.access in os.supports_effective_ids
        target_folder = os.path.dirname(os.path.realpath(self.path))
        if not os.access(target_folder, os.W_OK | os.X_OK, effective_ids=effective):
            raise SchemaError(f"cannot open {self.path!r} for writing: folder "
                              f"{target_folder!r} is read-only; sqliteq needs write access to "
                              f"the file and its folder")
        if os.path.exists(self.path) and not os.access(self.path, os.W_OK,
                                                       effective_ids=effective):
            raise SchemaError(f"{self.path!r} is read-only; sqliteq needs write access to "
                              f"the file and its folder")

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
            conn = apsw.Connection(self.path, vfs=self.vfs)
        except (apsw.CantOpenError, apsw.PermissionsError) as exc:
            raise SchemaError(f"cannot open {self.path!r} ({exc}); sqliteq needs write access "
                              f"to the file and its folder") from None
        try:
            self._configure(conn)
        except BaseException:
            conn.close()
            raise
        with self._connections_lock:
            self._connections.append(conn)
        return conn

    def _configure(self, conn: apsw.Connection) -> None:
        """Refuse files that are not ours before changing anything, then set the pragmas."""
        try:
            conn.setbusytimeout(self.busy_timeout_ms)
            version, objects = cast("tuple[int, int]",
                                    conn.execute(self.SCHEMA_PROBE).fetchall()[0])
            if version > SCHEMA_VERSION:
                raise SchemaError(f"database {self.path!r} has schema version {version}, newer "
                                  f"than this sqliteq ({__version__}) understands "
                                  f"({SCHEMA_VERSION}); upgrade sqliteq")
            if version == 0 and objects:
                raise SchemaError(f"{self.path!r} is a SQLite database of another application "
                                  f"(it has tables but no sqliteq schema)")
            if conn.readonly("main"):
                raise SchemaError(f"{self.path!r} is read-only; sqliteq needs write access to "
                                  f"the file and its folder")
            self._use_wal(conn)
            conn.execute(f"PRAGMA synchronous = {'FULL' if self.durable else 'NORMAL'}")
            conn.execute("PRAGMA foreign_keys = OFF")
            conn.execute("PRAGMA temp_store = MEMORY")
            conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT:d}")
        except apsw.NotADBError:
            raise SchemaError(f"{self.path!r} is not a SQLite database") from None
        except (apsw.ReadOnlyError, apsw.CantOpenError, apsw.PermissionsError) as exc:
            raise SchemaError(f"cannot open {self.path!r} for writing ({exc}); sqliteq needs "
                              f"write access to the file and its folder") from None

    def _use_wal(self, conn: apsw.Connection) -> None:
        """Switch the file to WAL (a no-op once it is). Changing the journal mode needs an
        exclusive lock, and SQLite answers a conflict with BUSY at once (its busy handler
        would risk a deadlock), so retry here for up to the busy timeout."""
        deadline = time.monotonic() + self.busy_timeout_ms / 1000
        mode = cast(str, conn.execute("PRAGMA journal_mode").fetchall()[0][0])
        while mode.lower() != "wal":
            try:
                mode = cast(str, conn.execute("PRAGMA journal_mode = WAL").fetchall()[0][0])
            except (apsw.BusyError, apsw.LockedError) as exc:
                if time.monotonic() >= deadline:
                    raise TransientError(f"could not switch {self.path!r} to WAL: another "
                                         f"connection kept it locked ({exc})") from None
                time.sleep(0.01)
                continue
            if mode.lower() != "wal":
                raise SchemaError(f"cannot use {self.path!r}: journal_mode stays {mode!r}, "
                                  f"WAL is required")

    def write(self, work: Callable[[apsw.Connection], T]) -> T:
        """Run `work(conn)` in a BEGIN IMMEDIATE transaction, and return once it committed.

        Group commit: while one thread (the leader) commits, the writes other threads submit
        queue up; the next leader runs them all in one transaction, each in its own
        savepoint, so one commit serves many callers and an error in one write rolls back
        only that write. Busy/locked errors retry the whole transaction up to 3 times
        with jittered backoff, then raise TransientError; any other error propagates to its
        caller. `work` may run on another thread and more than once, so it must have no
        effects outside the database.

        A BaseException that interrupts this thread (KeyboardInterrupt, say) reaches only
        this caller: the transaction is rolled back unless its COMMIT already took effect,
        the other writes of the batch run again in the next one, and a write still queued
        is withdrawn, so it never happens behind the caller's back.
        """
        request = _WriteRequest(work)
        try:
            with self._pending_lock:
                self._pending.append(request)
                leading = self._leader is None
                if leading:
                    self._leader, self._leading = request, True
            while True:
                if leading:
                    self._lead(request)
                if request.done:
                    break
                request.gate.acquire(timeout=LEAD_HANDOFF_TIMEOUT)  # until done or handed lead
                with self._pending_lock:
                    leading = self._take_lead(request)
        except BaseException:
            self._withdraw(request)
            raise
        if request.error is not None:
            raise request.error
        return request.result  # type: ignore[no-any-return]

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Call `callback` (on some thread, soon) once the write transaction that the
        calling work runs in has committed; never, if it rolls back. Only for work that
        `write` runs."""
        request = getattr(self._local, "running", None)
        if request is None:
            raise SqliteqError("after_commit is for work run by Database.write")
        request.after_commit.append(callback)

    def _write_changes(self, statement: str, params: Sequence[Any], *,
                       repeatable: bool = False) -> int:
        """Run one statement in a write transaction; how many rows it changed. (`repeatable`
        is PostgreSQL's concern: see _PostgresDatabase._write_changes.)"""
        def run(conn: apsw.Connection) -> int:
            conn.execute(statement, params)
            return conn.changes()

        return self.write(run)

    def _take_lead(self, request: _WriteRequest) -> bool:
        """Whether `request`'s writer leads the next commit (call with the pending lock held).
        It does when it was handed the lead, or when the writer handed it has not taken it in
        time (interrupted while waiting, say): a lost hand-off must not stall every writer."""
        if request.done or self._leading:
            return False
        if self._leader is not request and (
                time.monotonic() - self._lead_handed_at < LEAD_HANDOFF_TIMEOUT):
            return False
        self._leader, self._leading = request, True
        return True

    def _withdraw(self, request: _WriteRequest) -> None:
        """An interrupted writer gives up: its write leaves the queue if no batch took it
        yet, and a lead it was given (or holds) passes on."""
        with self._pending_lock:
            if request in self._pending:
                self._pending.remove(request)
            if self._leader is request:
                self._hand_lead()

    def _hand_lead(self) -> None:
        """Pass the lead to the first queued writer (call with the pending lock held)."""
        self._leading = False
        self._leader = self._pending[0] if self._pending else None
        self._lead_handed_at = time.monotonic()
        if self._leader is not None:
            self._leader.wake()

    def _lead(self, own: _WriteRequest) -> None:
        """Commit everything queued so far in one transaction, then hand the lead to the
        first writer that queued meanwhile."""
        batch: list[_WriteRequest] = []
        again: list[_WriteRequest] = []
        error: BaseException | None = None
        self._batch_committed = False
        try:
            with self._pending_lock:
                batch, self._pending = self._pending, []
            error = self._commit_batch(batch)
        except BaseException:           # this thread was interrupted: only its writer sees it
            if not self._batch_committed:
                again = [request for request in batch if request is not own]
            raise
        finally:
            # Run to the end even if a second interrupt lands here: a half-finished batch
            # would leave its writers waiting forever.
            while True:
                try:
                    self._finish_batch(own, batch, again, error)
                    break
                except BaseException:
                    continue

    def _finish_batch(self, own: _WriteRequest, batch: list[_WriteRequest],
                      again: list[_WriteRequest], error: BaseException | None) -> None:
        """Mark a batch done (with `error`, if the whole transaction failed) and wake its
        writers; `again` go back to the head of the queue. Idempotent."""
        with self._pending_lock:
            for request in reversed(again):
                if request not in self._pending:
                    self._pending.insert(0, request)
            for request in batch:
                if request.done or request in again:
                    continue
                if error is not None:
                    request.result, request.error = None, error
                if isinstance(request.error, apsw.Error):
                    request.error = _storage_error(request.error, self.path)
                request.done = True
                request.wake()
            if self._leading and self._leader is own:
                self._hand_lead()

    def _commit_batch(self, batch: list[_WriteRequest]) -> BaseException | None:
        """Run a batch of writes in one transaction, each request getting its result or its
        own error; returns the error that failed the whole transaction, if one did.

        Whatever interrupts it, no transaction stays open on the connection (which would
        keep SQLite's writer lock from every process), and `_batch_committed` tells whether
        the COMMIT took effect."""
        try:
            conn = self.connection()
        except Exception as exc:
            return exc
        error: BaseException | None = None
        try:
            for delay in (*TRANSIENT_RETRY_DELAYS, None):
                try:
                    try:
                        conn.execute("BEGIN IMMEDIATE")
                        for request in batch:
                            self._local.running = request
                            if len(batch) == 1:
                                request.run(conn)
                            else:
                                request.run_in_savepoint(conn)
                        self._batch_committed = True    # from here the COMMIT may take effect
                        conn.execute("COMMIT")
                    finally:
                        self._local.running = None
                        if not conn.getautocommit():    # failed, or stopped before COMMIT
                            self._batch_committed = False
                            conn.execute("ROLLBACK")
                    for request in batch:
                        if request.error is None:
                            self._writes_committed += 1
                            request.committed()
                    break
                except (apsw.BusyError, apsw.LockedError) as exc:
                    self._batch_committed = False
                    if delay is None:
                        error = TransientError(f"database {self.path!r} stayed locked through "
                                               f"{len(TRANSIENT_RETRY_DELAYS)} retries: {exc}")
                        break
                    time.sleep(delay * random.uniform(0.5, 1.5))
                except Exception as exc:        # SQLite rolled back a COMMIT that failed
                    self._batch_committed = False
                    error = exc
                    break
        except BaseException:
            if not conn.getautocommit():        # interrupted in the cleanup itself
                self._batch_committed = False
                conn.execute("ROLLBACK")
            raise
        if self._commit_waiters:
            self._announce_commit()
        return error

    def read(self, statement: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """The rows of one statement, run outside any transaction on this thread's
        connection (so it sees every commit so far)."""
        try:
            return self.connection().execute(statement, params).fetchall()
        except UnicodeDecodeError as exc:   # text that something else stored
            raise SqliteqError(f"{self.path!r} holds text that is not UTF-8 ({exc})") from None
        except apsw.Error as exc:
            error = _storage_error(exc, self.path)
            if error is exc:
                raise
            raise error from exc

    def _wal_size(self) -> int:
        """Bytes in the file's write-ahead log now."""
        try:
            return os.stat(f"{self.path}-wal").st_size
        except FileNotFoundError:
            return 0

    def data_version(self) -> int:
        """Changes whenever another connection (any process) commits to the file."""
        return cast(int, self.read("PRAGMA data_version")[0][0])

    # -- what differs between stores (see _PostgresDatabase) --

    UNIQUE_VIOLATION: tuple[type[Exception], ...] = (apsw.ConstraintError,)
    # Seconds between re-reads for writes that data_version cannot show: none here, since
    # it moves on every commit to the file, by any connection.
    UNSEEN_WRITES_POLL: float | None = None

    def clock_ms(self, conn: apsw.Connection | None = None) -> int:
        """Now, by the clock the store's times are on (run_at, leases, heartbeats, rate
        limits): every process on a file shares this machine's."""
        return now_ms()

    def _serialize(self, conn: apsw.Connection, what: str) -> None:
        """Make the calling transaction the only one doing `what` until it ends: a no-op
        here, since every write transaction holds SQLite's single writer lock."""

    def _unannounced(self, conn: apsw.Connection) -> None:
        """Other processes need not hear of the calling transaction's commit (a heartbeat
        that rescued nothing): a no-op here, where every commit moves their data_version."""

    def _subscribe(self, callback: Callable[[], None]) -> None:
        """Call `callback` when another process commits: never, on SQLite, where runtimes
        notice other processes' commits by polling `data_version`."""

    def _unsubscribe(self, callback: Callable[[], None]) -> None:
        """Undo `_subscribe`."""

    def close(self) -> None:
        """Close every connection this object opened. Safe to call twice. A connection that
        another thread is using at that moment (a runtime not stopped, say) is left to close
        when that thread lets go of it, and SqliteqError says so once the rest are closed."""
        self._closed = True
        with self._connections_lock:
            connections, self._connections = self._connections, []
        in_use = 0
        for conn in connections:
            try:
                conn.close()
            except apsw.ThreadingViolationError:
                in_use += 1
        self._local = threading.local()
        if in_use:
            raise SqliteqError(f"closed {self.path!r} while {in_use} other thread(s) were "
                               f"using it; stop every Runtime on a Storage before closing it")


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
        self._last = 0                  # the last id minted, as an integer
        self._prefixes = (-1, "")       # (top 88 bits, their 18 characters), last used

    def mint(self, count: int = 1) -> list[str]:
        with self._lock:
            if time.time_ns() // 1_000_000 > self._last >> 80:
                seed = int(ulid.ULID()) & ~(1 << 79)    # leave room to increment
                if seed >> 80 <= self._last >> 80:      # python-ulid's clock lagged ours
                    seed = self._last + 1
            else:
                seed = self._last + 1
            self._last = seed + count - 1
        # Ids come in runs that differ only in their last two characters (10 bits): each
        # run is its 24-character head joined to a slice of the pair table.
        pairs = _CROCKFORD_PAIRS
        high, low = seed >> 40, seed & 0xFF_FFFF_FFFF
        prefix = self._prefix(high)
        ids: list[str] = []
        while count > 0:
            if low > 0xFF_FFFF_FFFF:
                high, low = high + 1, 0
                prefix = self._prefix(high)
            head = (prefix + pairs[low >> 30] + pairs[(low >> 20) & 1023]
                    + pairs[(low >> 10) & 1023])
            first = low & 1023
            run = min(count, 1024 - first)
            ids += [head + pair for pair in pairs[first:first + run]]
            low += run
            count -= run
        return ids

    def _prefix(self, high: int) -> str:
        """The first 18 characters of a 26-character ULID from its top 88 bits."""
        cached_high, prefix = self._prefixes
        if high != cached_high:
            prefix = str(ulid.ULID.from_int(high << 40))[:18]
            self._prefixes = (high, prefix)
        return prefix


# One minter per process, shared by every Storage: ids stay unique and ordered even between
# two Storage objects on the same file. (The only process-wide state besides the logger.)
_mint_ids = _IdMinter().mint


def new_id() -> str:
    """A fresh job id, for a request (`EnqueueRequest(job_id=…)`) that others in the same
    bulk call name in their depends_on."""
    return _mint_ids(1)[0]


# ------------------------------------------------------------- Job store ----

class _Verdict(Enum):
    """What the end of an attempt does to its job."""

    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    RETRY = "retry"             # back to its queue at run_at; the attempt counts
    REQUEUE = "requeue"         # back to its queue at run_at; the attempt is refunded


class _Finish(NamedTuple):
    """What the end of one attempt writes to its job; built by the named constructors.

    Every finish is fenced by the claim's lease: a job rescued and claimed again elsewhere
    is never overwritten by its old, slow claim.
    """

    verdict: _Verdict
    job_id: str
    lease: int
    at: int                     # ms, when the attempt ended
    worker: str | None          # the process_id that ran it (None: none started it)
    result: str | None = None   # DONE: the handler's return value, as JSON
    errors: str | None = None   # the job's error list after this attempt, as JSON
    run_at: int | None = None   # RETRY, REQUEUE: when the job is due again

    @classmethod
    def done(cls, job_id: str, lease: int, at: int, worker: str, result: str) -> _Finish:
        return cls(_Verdict.DONE, job_id, lease, at, worker, result=result)

    @classmethod
    def failed(cls, job_id: str, lease: int, at: int, worker: str, errors: str | None
               ) -> _Finish:
        return cls(_Verdict.FAILED, job_id, lease, at, worker, errors=errors)

    @classmethod
    def cancelled(cls, job_id: str, lease: int, at: int, worker: str, errors: str | None
                  ) -> _Finish:
        return cls(_Verdict.CANCELLED, job_id, lease, at, worker, errors=errors)

    @classmethod
    def retry(cls, job_id: str, lease: int, at: int, worker: str, errors: str,
              run_at: int) -> _Finish:
        return cls(_Verdict.RETRY, job_id, lease, at, worker, errors=errors, run_at=run_at)

    @classmethod
    def requeue(cls, job_id: str, lease: int, at: int, worker: str | None, errors: str | None,
                run_at: int) -> _Finish:
        return cls(_Verdict.REQUEUE, job_id, lease, at, worker, errors=errors, run_at=run_at)


class _ProgressReport(NamedTuple):
    """The latest `ctx.progress` of a running job, waiting to ride in the next commit."""

    job_id: str
    lease: int
    progress: str               # JobProgress as JSON


class _NewJob(NamedTuple):
    """A validated, serialised job, ready to insert."""

    id: str
    kind: str
    queue: str
    payload: str                # JSON
    state: str                  # queued (due now) or scheduled
    priority: int
    run_at: int
    max_attempts: int
    unique_key: str | None
    created_at: int
    timeout_ms: int | None
    waiting_on: int = 0                 # its parents not yet ended (`waiting` while > 0)
    allow_parent_failure: int = 0
    has_parents: int = 0                # its depends_on are edges in job_deps


# A bulk enqueue handles a hundred thousand jobs: these loop over them in C. (builtins.map,
# because this module's `map` is the durable map of Scripts below.)
_job_id_of = operator.itemgetter(_NewJob._fields.index("id"))
_unique_key_of = operator.itemgetter(_NewJob._fields.index("unique_key"))
_has_parents_of = operator.itemgetter(_NewJob._fields.index("has_parents"))
_new_tuple: Any = tuple.__new__     # a NamedTuple made without its Python-level __new__


def _created(jobs: Sequence[_NewJob]) -> list[EnqueueOutcome]:
    """`EnqueueOutcome(job.id, True)` for each job."""
    return list(builtins.map(_new_tuple, itertools.repeat(EnqueueOutcome),
                             zip(builtins.map(_job_id_of, jobs), itertools.repeat(True))))


class _QueueDepth(NamedTuple):
    """How many unfinished (and failed) jobs one queue holds, for a dashboard."""

    ready: int = 0
    scheduled: int = 0
    running: int = 0
    failed: int = 0
    oldest_run_at: int | None = None    # of the ready jobs, ms


class _RunningJob(NamedTuple):
    id: str
    kind: str
    queue: str
    host: str
    started_at: int


class _ClaimedRow(NamedTuple):
    """A job a claim moved to running, as the claim returned it."""

    id: str
    kind: str
    payload: bytes              # as stored: decoded (or found unreadable) when run
    attempt: int
    max_attempts: int
    errors: str | None
    priority: int
    run_at: int
    timeout_ms: int | None      # the job's own time limit, if it has one


class _Child(NamedTuple):
    """A job of an enqueue call that names parents."""

    request: int                # its request's index in the call, for error messages
    parents: tuple[str, ...]    # as its request named them
    allow_parent_failure: bool


class _Graph:
    """The jobs with parents of one enqueue call, linked to them once all its jobs are in
    (a parent may come later in the same call). Only these jobs are held, not the call."""

    def __init__(self) -> None:
        self.children: dict[str, _Child] = {}
        # The id of a request that a unique key merged into an active job -> that job.
        self.aliases: dict[str, str] = {}

    def __bool__(self) -> bool:
        return bool(self.children)

    def add(self, requests: Sequence[EnqueueRequest], jobs: Sequence[_NewJob],
            outcomes: Sequence[EnqueueOutcome], first_index: int) -> None:
        for index, (request, job, outcome) in enumerate(zip(requests, jobs, outcomes,
                                                            strict=True), first_index):
            if not outcome.created:
                self.aliases[job.id] = outcome.job_id
            elif request.depends_on:
                self.children[job.id] = _Child(index, request.depends_on,
                                               request.allow_parent_failure)

    def parents_of(self, child: str) -> tuple[str, ...]:
        """The child's parents, deduplicated jobs replaced by the jobs holding their keys."""
        parents = self.children[child].parents
        if not self.aliases:
            return parents
        return tuple(dict.fromkeys(self.aliases.get(parent, parent) for parent in parents))

    def find_cycle(self) -> str | None:
        """A job on a cycle of parents, if there is one. (Only jobs of this call can be on
        one: an earlier job's parents are all earlier still.) Kahn's algorithm, O(edges)."""
        pending = {child: 0 for child in self.children}
        below: dict[str, list[str]] = {}
        for child in self.children:
            for parent in self.parents_of(child):
                if parent in pending:
                    pending[child] += 1
                    below.setdefault(parent, []).append(child)
        ready = [child for child, n in pending.items() if n == 0]
        while ready:
            for child in below.get(ready.pop(), ()):
                pending[child] -= 1
                if pending[child] == 0:
                    ready.append(child)
        return next((child for child, n in pending.items() if n > 0), None)


# The states a job is stored in; `scheduled` is a queued job whose run_at has not come.
_STORED_STATES = {**{state.value: state for state in JobState}, "scheduled": JobState.QUEUED}

# JSON columns come as bytes, decoded by _decode_stored: text that is not UTF-8 (written by
# something else) is then one clear error about one job, not a failed query.
_JOB_COLUMNS = ("id, kind, queue, CAST(payload AS BLOB), state, priority, run_at, attempt,"
                " max_attempts, unique_key, CAST(result AS BLOB), CAST(errors AS BLOB),"
                " created_at, started_at, finished_at, worker, host, cancel_requested,"
                " timeout_ms, CAST(progress AS BLOB), waiting_on, CASE WHEN has_parents = 1 THEN"
                " (SELECT json_group_array(parent) FROM (SELECT parent FROM job_deps"
                " WHERE child = jobs.id ORDER BY position)) END")


def _job_from_row(row: Sequence[Any]) -> Job:
    (id_, kind, queue, payload, state, priority, run_at, attempt, max_attempts, unique_key,
     result, errors, created_at, started_at, finished_at, worker, host, cancel, timeout_ms,
     progress, waiting_on, parents) = row
    return Job(id_, kind, queue, _decode_stored(payload, f"the payload of job {id_}"),
               _STORED_STATES[state], priority,
               _datetime_from_ms(run_at), attempt, max_attempts, unique_key,  # type: ignore[arg-type]
               None if result is None else _decode_stored(result, f"the result of job {id_}"),
               [] if errors is None else _decode_stored(errors, f"the errors of job {id_}"),
               _datetime_from_ms(created_at), _datetime_from_ms(started_at),  # type: ignore[arg-type]
               _datetime_from_ms(finished_at), worker, host, bool(cancel),
               None if timeout_ms is None else timeout_ms / 1000,
               None if progress is None else JobProgress(
                   *_decode_stored(progress, f"the progress of job {id_}")),
               () if parents is None else tuple(
                   _decode_stored(parents, f"the parents of job {id_}")),
               waiting_on)


class _JobStore:
    """Every statement that reads or writes the jobs table, on SQLite.

    Callers decide and compose transactions (`Jobs`, `Processes`, `Runtime`); the store
    picks and runs the statements. Methods that take `conn` run inside the caller's write
    transaction (`Database.write`); the others read outside any transaction.

    Invariants: a `queued` job is due (its run_at has come) and sits in jobs_claim; a
    `scheduled` one sits in jobs_due until a claim of its queue finds it due and promotes
    it. A job's run_at never changes while it waits, so the claim order (priority, run_at,
    id) is the same whichever of the two states a job came through.
    """

    INSERT = (f"INSERT INTO jobs ({', '.join(_NewJob._fields)})"
              f" VALUES ({', '.join('?' * len(_NewJob._fields))})")
    INSERT_UNIQUE = INSERT + " ON CONFLICT DO NOTHING"
    # Run twice (a retry after the connection was lost), the second finds its id taken.
    INSERT_ONCE = INSERT + " ON CONFLICT (id) DO NOTHING"
    SELECT_ACTIVE_BY_KEY = ("SELECT id FROM jobs WHERE unique_key = ?"
                            " AND state IN ('waiting', 'queued', 'scheduled', 'running')")
    SELECT_ONE = f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?"
    SELECT_STATE = "SELECT state FROM jobs WHERE id = ?"
    COUNT_BY_QUEUE_AND_STATE = "SELECT queue, state, count(*) FROM jobs GROUP BY queue, state"
    COUNT_BY_STATE_IN_QUEUE = "SELECT state, count(*) FROM jobs WHERE queue = ? GROUP BY state"
    # NULL filters match everything, so one statement serves every combination.
    # (The casts tell PostgreSQL the type of a NULL parameter; SQLite ignores them.)
    LIST_FILTER = ("(CAST(?1 AS TEXT) IS NULL OR state = ?1"
                   " OR (?1 = 'queued' AND state = 'scheduled'))"
                   " AND (CAST(?2 AS TEXT) IS NULL OR queue = ?2)"
                   " AND (CAST(?3 AS TEXT) IS NULL OR kind = ?3)"
                   " AND (CAST(?5 AS TEXT) IS NULL OR id < ?5)"
                   " AND (CAST(?6 AS TEXT) IS NULL OR id >= ?6 AND id < ?6 || '~')"
                   " ORDER BY id DESC LIMIT ?4")
    LIST = f"SELECT {_JOB_COLUMNS} FROM jobs WHERE {LIST_FILTER}"
    # One branch per partial index (jobs_claim, jobs_due): `state IN (...)` would match
    # neither, and scan the whole table, finished jobs too.
    READINESS = ("SELECT queue, CAST(sum(ready) AS BIGINT), CAST(sum(later) AS BIGINT),"
                 " min(oldest) FROM ("
                 + " UNION ALL ".join(
                     "SELECT queue, count(*) FILTER (WHERE run_at <= ?1) AS ready,"
                     " count(*) FILTER (WHERE run_at > ?1) AS later,"
                     " min(CASE WHEN run_at <= ?1 THEN run_at END) AS oldest"
                     f" FROM jobs WHERE state = '{state}' GROUP BY queue"
                     for state in ("queued", "scheduled"))
                 + ") AS waiting GROUP BY queue")
    RUNNING_BY_QUEUE = "SELECT queue, count(*) FROM jobs WHERE state = 'running' GROUP BY queue"
    FAILED_BY_QUEUE = "SELECT queue, count(*) FROM jobs WHERE state = 'failed' GROUP BY queue"
    RUNNING_JOBS = ("SELECT id, kind, queue, host, started_at FROM jobs WHERE state = 'running'"
                    " ORDER BY started_at LIMIT ?")
    # (Each state spelled out, queue by queue, so that jobs_ended serves each count.)
    FINISHED_SINCE = ("SELECT q.name, (SELECT count(*) FROM jobs WHERE state = 'done'"
                      " AND queue = q.name AND finished_at >= ?1) + (SELECT count(*) FROM jobs"
                      " WHERE state = 'failed' AND queue = q.name AND finished_at >= ?1)"
                      " FROM queues q")
    CANCEL_WAITING = ("UPDATE jobs SET state = 'cancelled', finished_at = ?2"
                      " WHERE id = ?1 AND state IN ('waiting', 'queued', 'scheduled')")
    REQUEST_CANCEL = ("UPDATE jobs SET cancel_requested = 1"
                      " WHERE id = ? AND state = 'running'")
    # A retried job starts afresh (its error history stays, for the record).
    RETRY = ("UPDATE jobs SET state = 'queued', attempt = 0, run_at = ?2, started_at = NULL,"
             " finished_at = NULL, worker = NULL, host = NULL, result = NULL,"
             " cancel_requested = 0, lease = NULL WHERE id = ?1"
             " AND state IN ('failed', 'cancelled')")
    RETRY_FAILED = ("UPDATE OR IGNORE jobs SET state = 'queued', attempt = 0, run_at = ?2,"
                    " started_at = NULL, finished_at = NULL, worker = NULL, host = NULL,"
                    " result = NULL, cancel_requested = 0, lease = NULL"
                    " WHERE state = 'failed' AND (CAST(?1 AS TEXT) IS NULL OR queue = ?1)"
                    " AND (CAST(?3 AS TEXT) IS NULL OR kind = ?3)")
    # A retried job with parents waits again for those that have not ended as it needs
    # (done; or ended at all, if it allows failure). A parent deleted meanwhile has ended.
    FAILED_WITH_PARENTS = ("SELECT id FROM jobs WHERE state = 'failed' AND has_parents = 1"
                           " AND (CAST(?1 AS TEXT) IS NULL OR queue = ?1)"
                           " AND (CAST(?2 AS TEXT) IS NULL OR kind = ?2)")
    REOPEN_EDGES = ("UPDATE job_deps SET settled = CASE WHEN EXISTS (SELECT 1 FROM jobs p, jobs c"
                    " WHERE p.id = job_deps.parent AND c.id = job_deps.child"
                    " AND p.state != 'done' AND NOT (c.allow_parent_failure = 1"
                    " AND p.state IN ('failed', 'cancelled'))) THEN 0 ELSE 1 END"
                    " WHERE child = ?1")
    WAIT_AGAIN = ("UPDATE jobs SET"
                  " waiting_on = (SELECT count(*) FROM job_deps WHERE child = ?1 AND settled = 0),"
                  " state = CASE WHEN EXISTS (SELECT 1 FROM job_deps WHERE child = ?1"
                  " AND settled = 0) THEN 'waiting' ELSE state END"
                  " WHERE id = ?1 AND has_parents = 1 AND state = 'queued'")
    RUN_NOW = ("UPDATE jobs SET state = 'queued', run_at = ?2"
               " WHERE id = ?1 AND state = 'scheduled' AND run_at > ?2")
    DELETE = ("DELETE FROM jobs WHERE id = ? AND state != 'running'"
              " RETURNING state, has_parents")
    # Retention, one statement per ended state with the state spelled out: a `state = ?`
    # would not imply jobs_ended's WHERE, and SQLite would scan the table for each chunk.
    # The queues that hold jobs in a state, one index probe each (a skip-scan by hand).
    NEXT_QUEUE_ENDED: ClassVar[Mapping[str, str]] = {
        state.value: f"SELECT min(queue) FROM jobs WHERE state = '{state.value}' AND queue > ?"
        for state in FINISHED_STATES}
    DELETE_ENDED_CHUNK: ClassVar[Mapping[str, str]] = {
        state.value: ("DELETE FROM jobs WHERE id IN (SELECT id FROM jobs"
                      f" WHERE state = '{state.value}' AND queue = ?1 AND finished_at < ?2"
                      " LIMIT ?3) RETURNING id, has_parents")
        for state in FINISHED_STATES}
    # All due jobs, not only as many as the claim wants: a later one may have a higher
    # priority. (A queue's first claim after a big batch came due writes them all at once.)
    PROMOTE_DUE = ("UPDATE jobs SET state = 'queued'"
                   " WHERE queue = ?1 AND state = 'scheduled' AND run_at <= ?2")
    CLAIM = """
        UPDATE jobs SET state = 'running', attempt = attempt + 1, lease = ?1, host = ?2,
                        worker = NULL, started_at = ?3, cancel_requested = 0, progress = NULL
        WHERE id IN (SELECT id FROM jobs WHERE queue = ?4 AND state = 'queued'
                     ORDER BY priority, run_at, id LIMIT ?5)
        RETURNING id, CAST(kind AS BLOB), CAST(payload AS BLOB), attempt, max_attempts,
                  CAST(errors AS BLOB), priority, run_at, timeout_ms"""
    COUNT_RUNNING = "SELECT count(*) FROM jobs WHERE state = 'running' AND queue = ?"
    READY_EXISTS = ("SELECT EXISTS (SELECT 1 FROM jobs WHERE queue = ?1 AND state = 'queued')"
                    " OR EXISTS (SELECT 1 FROM jobs WHERE queue = ?1 AND state = 'scheduled'"
                    " AND run_at <= ?2)")
    NEXT_DUE = "SELECT min(run_at) FROM jobs WHERE queue = ? AND state = 'scheduled'"
    RUNNING_HERE = ("SELECT id, lease, cancel_requested FROM jobs"
                    " WHERE host = ? AND state = 'running'")
    FINISH_DONE = ("UPDATE jobs SET state = 'done', result = ?3, worker = ?4, finished_at = ?5"
                   " WHERE id = ?1 AND lease = ?2 AND state = 'running'")
    FINISH_WITH_ERRORS = ("UPDATE jobs SET state = ?3, errors = ?4, worker = ?5,"
                          " finished_at = ?6 WHERE id = ?1 AND lease = ?2 AND state = 'running'")
    SET_PROGRESS = ("UPDATE jobs SET progress = ?3"
                    " WHERE id = ?1 AND lease = ?2 AND state = 'running'")
    # A cancel request that arrives while a job is being put back ends it instead.
    REQUEUE = ("UPDATE jobs SET"
               " state = CASE WHEN cancel_requested = 1 THEN 'cancelled'"
               " WHEN ?3 > ?7 THEN 'scheduled' ELSE 'queued' END,"
               " finished_at = CASE WHEN cancel_requested = 1 THEN ?7 END,"
               " run_at = ?3, errors = ?4, worker = ?5, attempt = attempt - ?6, lease = NULL"
               " WHERE id = ?1 AND lease = ?2 AND state = 'running'")
    # A claim its runtime does not hold (its commit was reported failed but took effect):
    # back to the queue, the attempt refunded, unless a cancel request came meanwhile.
    RELEASE_ORPHAN = ("UPDATE jobs SET"
                      " state = CASE WHEN cancel_requested = 1 THEN 'cancelled' ELSE 'queued' END,"
                      " finished_at = CASE WHEN cancel_requested = 1 THEN ?3 END,"
                      " attempt = attempt - 1, lease = NULL, worker = NULL"
                      " WHERE id = ?1 AND lease = ?2 AND state = 'running'")
    # Jobs running on a host that is not alive go back to the queue (or fail, when that was
    # their last attempt), with an entry in their error list. ?4 is the progress clock.
    RESCUE = """
        UPDATE jobs SET
            state = CASE WHEN cancel_requested = 1 THEN 'cancelled'
                         WHEN attempt >= max_attempts THEN 'failed' ELSE 'queued' END,
            finished_at = CASE WHEN cancel_requested = 1 OR attempt >= max_attempts THEN ?1 END,
            run_at = ?1, lease = NULL, cancel_requested = 0,
            errors = (SELECT CASE WHEN json_array_length(e) > ?3 THEN json_remove(e, '$[0]')
                                  ELSE e END
                      FROM (SELECT json_insert(coalesce(errors, '[]'), '$[#]', json_object(
                          'at', ?2, 'attempt', attempt,
                          'error', 'worker lost: host ' || host || ' stopped heartbeating',
                          'traceback', NULL)) AS e))
        WHERE state = 'running' AND host NOT IN (
            SELECT host_id FROM processes WHERE progress_at >= ?4 - lease_timeout_ms)
        RETURNING id"""

    # -- dependencies (see settle) --
    # The unsettled links from the given jobs that have ended, to children still waiting.
    # (`+state`: SQLite would otherwise walk jobs_ended, every ended job, and test each
    # against the list; the list's ids are what must lead.)
    ENDED_LINKS = ("SELECT d.parent, d.child, p.state, c.allow_parent_failure FROM job_deps d"
                   " JOIN jobs p ON p.id = d.parent JOIN jobs c ON c.id = d.child"
                   " WHERE d.parent IN (SELECT value FROM json_each(?1)) AND d.settled = 0"
                   " AND +p.state IN ('done', 'failed', 'cancelled') AND +c.state = 'waiting'")
    SETTLE_LINK = "UPDATE job_deps SET settled = 1 WHERE parent = ? AND child = ?"
    ANY_LINK = "SELECT EXISTS (SELECT 1 FROM job_deps)"
    WAITING_CHILDREN = ("SELECT d.child FROM job_deps d JOIN jobs c ON c.id = d.child"
                        " WHERE d.parent = ? AND d.settled = 0 AND c.state = 'waiting'")
    DELETE_LINKS_OF = "DELETE FROM job_deps WHERE child IN (SELECT value FROM json_each(?1))"
    PARENT_STATES = "SELECT id, state FROM jobs WHERE id IN (SELECT value FROM json_each(?1))"
    INSERT_EDGE = "INSERT INTO job_deps (parent, child, settled, position) VALUES (?, ?, ?, ?)"
    SET_WAITING_ON = "UPDATE jobs SET waiting_on = ?2 WHERE id = ?1"
    COUNT_OFF_PARENTS = ("UPDATE jobs SET waiting_on = waiting_on - ?2,"
                         " state = CASE WHEN waiting_on > ?2 THEN 'waiting'"
                         " WHEN run_at > ?3 THEN 'scheduled' ELSE 'queued' END"
                         " WHERE id = ?1 AND state = 'waiting'")
    CANCEL_FOR_PARENT = ("UPDATE jobs SET state = 'cancelled', finished_at = ?2, errors = ?3"
                         " WHERE id = ?1 AND state = 'waiting'")
    CHILDREN = "SELECT child FROM job_deps WHERE parent = ? ORDER BY child"
    PARENT_RESULTS = ("SELECT d.parent, j.state, CAST(j.result AS BLOB) FROM job_deps d"
                      " JOIN jobs j ON j.id = d.parent WHERE d.child = ? ORDER BY d.position")
    EXISTING_IDS = "SELECT id FROM jobs WHERE id IN (SELECT value FROM json_each(?1))"
    # -- for map --
    OF_QUEUE = "SELECT id, state, CAST(payload AS BLOB) FROM jobs WHERE queue = ? ORDER BY id"
    ENDED_AMONG = ("SELECT id, state, CAST(result AS BLOB), CAST(errors AS BLOB) FROM jobs"
                   " WHERE id IN (SELECT value FROM json_each(?1))"
                   " AND +state IN ('done', 'failed', 'cancelled')")      # (as ENDED_LINKS)

    def __init__(self, db: Database) -> None:
        self._db = db

    # -- enqueue and administration (in the caller's transaction) --

    def insert_alone(self, job: _NewJob) -> None:
        """Insert one job without a unique key as a transaction of its own (on PostgreSQL,
        one round trip)."""
        self._db._write_changes(self.INSERT_ONCE, job, repeatable=True)

    def insert(self, conn: apsw.Connection, jobs: Sequence[_NewJob]) -> list[EnqueueOutcome]:
        """Insert jobs; a job whose unique key an active job holds is not inserted, and its
        outcome names that job instead."""
        if not any(builtins.map(_unique_key_of, jobs)):
            conn.executemany(self.INSERT, jobs)
            return _created(jobs)
        outcomes = []
        for job in jobs:
            if job.unique_key is None:
                conn.execute(self.INSERT, job)
                outcomes.append(EnqueueOutcome(job.id, True))
                continue
            outcomes.append(self._insert_unique(conn, job))
        return outcomes

    def existing_ids(self, conn: apsw.Connection, ids: Sequence[str]) -> set[str]:
        """Which of `ids` are taken by jobs."""
        return {row[0] for row in conn.execute(self.EXISTING_IDS, (_json_encode(list(ids)),))}

    def link(self, conn: apsw.Connection, graph: _Graph, now: int) -> None:
        """Record the parents of the call's jobs in `graph`, and count off (or cancel for)
        those already ended; InvalidInput, and nothing linked, for an unknown parent or a
        cycle. The caller's transaction rolls back the jobs with it."""
        states: dict[str, str] = {}
        wanted = list(dict.fromkeys(parent for child in graph.children
                                    for parent in graph.parents_of(child)))
        for start in range(0, len(wanted), 10_000):
            states.update(conn.execute(self.PARENT_STATES,
                                       (_json_encode(wanted[start:start + 10_000]),)))
        for child, (index, _, _) in graph.children.items():
            for parent in graph.parents_of(child):
                if parent not in states:
                    raise InvalidInput(f"request {index}: depends_on names {parent}, which is "
                                       f"not a job")
        if (looped := graph.find_cycle()) is not None:
            raise InvalidInput(f"request {graph.children[looped].request}: depends_on makes a "
                               f"cycle (job {looped} waits on itself through its parents)")
        conn.executemany(self.INSERT_EDGE, [
            (parent, child, 0, position) for child in graph.children
            for position, parent in enumerate(graph.parents_of(child))])
        for child, (_, declared, _) in graph.children.items():
            if len(graph.parents_of(child)) != len(declared):      # two merged into one
                conn.execute(self.SET_WAITING_ON, (child, len(graph.parents_of(child))))
        self.settle(conn, [parent for parent in wanted
                           if states[parent] in ("done", "failed", "cancelled")], now,
                    only=graph.children.keys())

    def settle(self, conn: apsw.Connection, ended: Sequence[str], now: int,
               only: Collection[str] | None = None) -> None:
        """Count jobs that have just ended off their waiting children (`only` these, if
        given): done (or, for a child that allows failure, any end) counts a parent off;
        failed or cancelled cancels the child, naming the parent, and that child's end is
        settled in turn. Every method here that ends jobs calls it in the same transaction,
        so each link is settled once, in the commit that ends its parent: O(links) in all.
        (A store that never had dependencies pays one cheap read per commit.)"""
        if not ended or not conn.execute(self.ANY_LINK).fetchall()[0][0]:
            return
        while ended:
            links = cast("list[tuple[str, str, str, int]]", conn.execute(
                self.ENDED_LINKS, (_json_encode(list(ended)),)).fetchall())
            if only is not None:
                links = [link for link in links if link[1] in only]
                only = None             # (cascades reach only this call's jobs anyway)
            if not links:
                return
            conn.executemany(self.SETTLE_LINK, [(parent, child) for parent, child, _, _
                                                in links])
            counted: dict[str, int] = {}
            cancelled: dict[str, str] = {}
            for parent, child, state, allow_failure in links:
                if state == "done" or allow_failure:
                    counted[child] = counted.get(child, 0) + 1
                elif child not in cancelled:
                    cancelled[child] = f"parent {parent} {state}"
            conn.executemany(self.COUNT_OFF_PARENTS, [(child, n, now) for child, n
                                                      in counted.items()
                                                      if child not in cancelled])
            ended = self._cancel_waiting(conn, cancelled, now)

    def _cancel_waiting(self, conn: apsw.Connection, reasons: Mapping[str, str], now: int
                        ) -> list[str]:
        """Cancel waiting jobs, each with its reason as its error; those it cancelled."""
        cancelled = []
        for job_id, reason in reasons.items():
            error = {"at": _iso_from_ms(now), "attempt": 0, "error": reason, "traceback": None}
            conn.execute(self.CANCEL_FOR_PARENT, (job_id, now, _json_encode([error])))
            if conn.changes():
                cancelled.append(job_id)
        return cancelled

    def _insert_unique(self, conn: apsw.Connection, job: _NewJob) -> EnqueueOutcome:
        # On PostgreSQL the job holding the key may finish between the two statements
        # (each sees the latest commits): then the key is free, and the insert goes again.
        while True:
            conn.execute(self.INSERT_UNIQUE, job)
            if conn.changes():
                return EnqueueOutcome(job.id, True)
            existing = conn.execute(self.SELECT_ACTIVE_BY_KEY, (job.unique_key,)).fetchall()
            if existing:
                return EnqueueOutcome(cast(str, existing[0][0]), False)

    def cancel(self, conn: apsw.Connection, job_id: str, now: int) -> str:
        """Cancel a waiting job, or flag a running one (its runtime delivers the request)."""
        conn.execute(self.CANCEL_WAITING, (job_id, now))
        if conn.changes():
            self.settle(conn, [job_id], now)
            return "cancelled"
        conn.execute(self.REQUEST_CANCEL, (job_id,))
        if conn.changes():
            return "cancel_requested"
        exists = conn.execute(self.SELECT_STATE, (job_id,)).fetchall()
        return "finished" if exists else "not_found"

    def retry(self, conn: apsw.Connection, job_id: str, now: int) -> bool:
        """Requeue a failed or cancelled job afresh; apsw.ConstraintError if an active job
        holds its unique key."""
        conn.execute(self.RETRY, (job_id, now))
        if not conn.changes():
            return False
        self._wait_again(conn, [job_id])
        return True

    def retry_failed(self, conn: apsw.Connection, queue: str | None, kind: str | None,
                     now: int) -> int:
        children = [row[0] for row in conn.execute(self.FAILED_WITH_PARENTS, (queue, kind))]
        conn.execute(self.RETRY_FAILED, (queue, now, kind))
        retried = conn.changes()
        self._wait_again(conn, children)
        return retried

    def _wait_again(self, conn: apsw.Connection, retried: Sequence[str]) -> None:
        """Retried jobs with parents go back to waiting for those not ended as needed."""
        for job_id in retried:
            conn.execute(self.REOPEN_EDGES, (job_id,))
            conn.execute(self.WAIT_AGAIN, (job_id,))

    def run_now(self, conn: apsw.Connection, job_id: str, now: int) -> bool:
        conn.execute(self.RUN_NOW, (job_id, now))
        return bool(conn.changes())

    def delete(self, conn: apsw.Connection, job_id: str, now: int) -> bool:
        """Delete a job that is not running. Children still waiting on it are cancelled,
        as they would be had it been cancelled; its own links go with it."""
        rows = conn.execute(self.DELETE, (job_id,)).fetchall()
        if not rows:
            return False
        state, has_parents = rows[0]
        if state not in ("done", "failed", "cancelled"):      # (its children: one lookup)
            children = [row[0] for row in conn.execute(self.WAITING_CHILDREN, (job_id,))]
            self.settle(conn, self._cancel_waiting(
                conn, {child: f"parent {job_id} deleted" for child in children}, now), now)
        if has_parents:
            conn.execute(self.DELETE_LINKS_OF, (_json_encode([job_id]),))
        return True

    def queues_ended(self, state: str) -> Iterator[str]:
        """The queues that hold jobs in the ended `state`, in name order, each found as it
        is asked for."""
        statement, queue = self.NEXT_QUEUE_ENDED[state], ""     # (no queue's name is empty)
        while (queue := self._db.read(statement, (queue,))[0][0]) is not None:
            yield queue

    def delete_finished(self, conn: apsw.Connection, state: str, cutoff: int,
                        queue: str, limit: int) -> int:
        """Delete up to `limit` jobs of `queue` in the ended `state` finished before
        `cutoff`, and their links to parents. (Links from them stay while their children
        do: they name them.)"""
        rows = conn.execute(self.DELETE_ENDED_CHUNK[state], (queue, cutoff, limit)).fetchall()
        if with_parents := [job_id for job_id, has_parents in rows if has_parents]:
            conn.execute(self.DELETE_LINKS_OF, (_json_encode(with_parents),))
        return len(rows)

    # -- reading --

    def get(self, job_id: str) -> Job | None:
        rows = self._db.read(self.SELECT_ONE, (job_id,))
        return _job_from_row(rows[0]) if rows else None

    def jobs_of_queue(self, queue: str) -> list[tuple[str, str, Any]]:
        """(id, stored state, payload) of every job of `queue`, in id order."""
        return [(job_id, state, _decode_stored(payload, f"the payload of job {job_id}"))
                for job_id, state, payload in self._db.read(self.OF_QUEUE, (queue,))]

    def ended_among(self, ids: Sequence[str]) -> dict[str, tuple[str, Any, list[Any]]]:
        """Which of `ids` have ended: id -> (state, result, errors)."""
        return {job_id: (state,
                         None if result is None else _decode_stored(result, f"the result of "
                                                                            f"job {job_id}"),
                         [] if errors is None else _decode_stored(errors, f"the errors of "
                                                                          f"job {job_id}"))
                for job_id, state, result, errors in self._db.read(
                    self.ENDED_AMONG, (_json_encode(list(ids)),))}

    def children(self, job_id: str) -> list[str]:
        """The jobs that named this one in depends_on (while both are kept)."""
        return [row[0] for row in self._db.read(self.CHILDREN, (job_id,))]

    def parent_results(self, job_id: str) -> dict[str, Any]:
        """Parent id -> its result (None unless done), in depends_on order; parents deleted
        meanwhile are left out."""
        return {parent: None if state != "done" or result is None
                else _decode_stored(result, f"the result of job {parent}")
                for parent, state, result in self._db.read(self.PARENT_RESULTS, (job_id,))}

    def newest(self, state: str | None, queue: str | None, kind: str | None, limit: int,
               before: str | None = None, id_prefix: str | None = None) -> list[Job]:
        """The newest jobs matching every filter that is not None (ids below `before`,
        ids starting with `id_prefix`). ('~' sorts after every character of an id.)"""
        return [_job_from_row(row) for row in self._db.read(
            self.LIST, (state, queue, kind, limit, before, id_prefix))]

    def counts(self, queue: str | None = None) -> dict[str, int]:
        """Jobs per state (every state present, zeros included)."""
        counts = dict.fromkeys((s.value for s in JobState), 0)
        if queue is None:
            rows = [(state, n) for _, state, n in self._db.read(self.COUNT_BY_QUEUE_AND_STATE)]
        else:
            rows = self._db.read(self.COUNT_BY_STATE_IN_QUEUE, (queue,))
        for state, n in rows:
            counts[_STORED_STATES[state].value] += n
        return counts

    def counts_by_queue(self) -> dict[str, dict[str, int]]:
        by_queue: dict[str, dict[str, int]] = {}
        for queue, state, n in self._db.read(self.COUNT_BY_QUEUE_AND_STATE):
            counts = by_queue.setdefault(queue, {})
            public = _STORED_STATES[state].value
            counts[public] = counts.get(public, 0) + n
        return by_queue

    def depths(self, now: int) -> dict[str, _QueueDepth]:
        """Per queue, each count read off its partial index, never the finished jobs."""
        readiness = self.readiness(now)
        running = dict(self._db.read(self.RUNNING_BY_QUEUE))
        failed = dict(self._db.read(self.FAILED_BY_QUEUE))
        depths = {}
        for queue in sorted({*readiness, *running, *failed}):
            ready, scheduled, oldest = readiness.get(queue, (0, 0, None))
            depths[queue] = _QueueDepth(ready, scheduled, running.get(queue, 0),
                                        failed.get(queue, 0), oldest)
        return depths

    def running_jobs(self, limit: int) -> list[_RunningJob]:
        """Running jobs, longest-running first."""
        return [_RunningJob(*row) for row in self._db.read(self.RUNNING_JOBS, (limit,))]

    def readiness(self, now: int) -> dict[str, tuple[int, int, int | None]]:
        """Per queue: waiting jobs due now, those due later, and the oldest due run_at."""
        return {queue: (ready, later, oldest) for queue, ready, later, oldest
                in self._db.read(self.READINESS, (now,))}

    def finished_since(self, since: int) -> dict[str, int]:
        """Per queue: jobs done or failed since `since`."""
        return dict(self._db.read(self.FINISHED_SINCE, (since,)))

    # -- the runtime's claims and finishes --

    def claim(self, conn: apsw.Connection, queue: str, limit: int, lease: int, host: str,
              now: int) -> list[_ClaimedRow]:
        """Move up to `limit` due jobs of `queue` to running, in claim order."""
        conn.execute(self.PROMOTE_DUE, (queue, now))
        rows = cast("list[tuple[str, bytes, bytes, int, int, bytes | None, int, int, int | None]]",
                    conn.execute(self.CLAIM, (lease, host, now, queue, limit)).fetchall())
        claimed = [_ClaimedRow(job_id, _text_from_blob(kind), payload, attempt, max_attempts,
                               None if errors is None else _text_from_blob(errors), priority,
                               run_at, timeout_ms)
                   for job_id, kind, payload, attempt, max_attempts, errors, priority, run_at,
                   timeout_ms in rows]
        claimed.sort(key=lambda row: (row.priority, row.run_at, row.id))   # RETURNING's order
        return claimed                                                     # is not the claim's

    def count_running(self, conn: apsw.Connection, queue: str) -> int:
        return cast(int, conn.execute(self.COUNT_RUNNING, (queue,)).fetchall()[0][0])

    def next_due(self, queue: str, conn: apsw.Connection | None = None) -> int | None:
        """When the earliest scheduled job of `queue` is due (None: none is scheduled)."""
        if conn is None:
            return cast("int | None", self._db.read(self.NEXT_DUE, (queue,))[0][0])
        return cast("int | None", conn.execute(self.NEXT_DUE, (queue,)).fetchall()[0][0])

    def ready_exists(self, queue: str, now: int) -> bool:
        """Whether a claim of `queue` would find a job now (a read: no writer lock)."""
        return bool(self._db.read(self.READY_EXISTS, (queue, now))[0][0])

    def running_here(self, host: str) -> dict[str, tuple[int, bool]]:
        """Job id -> (lease, cancel requested) of every job running on `host`."""
        return {job_id: (lease, bool(cancel)) for job_id, lease, cancel
                in self._db.read(self.RUNNING_HERE, (host,))}

    def finish(self, conn: apsw.Connection, finishes: Iterable[_Finish]) -> None:
        """Write the ends of attempts, one executemany per statement."""
        done, with_errors, requeued, ended, now = [], [], [], [], 0
        for f in finishes:
            if f.verdict is not _Verdict.RETRY:     # (a requeue may end in a cancel)
                ended.append(f.job_id)
                now = max(now, f.at)
            if f.verdict is _Verdict.DONE:
                done.append((f.job_id, f.lease, f.result, f.worker, f.at))
            elif f.verdict is _Verdict.FAILED or f.verdict is _Verdict.CANCELLED:
                with_errors.append((f.job_id, f.lease, f.verdict.value, f.errors, f.worker, f.at))
            else:
                requeued.append((f.job_id, f.lease, f.run_at, f.errors, f.worker,
                                 int(f.verdict is _Verdict.REQUEUE), f.at))
        for statement, params in ((self.FINISH_DONE, done),
                                  (self.FINISH_WITH_ERRORS, with_errors),
                                  (self.REQUEUE, requeued)):
            if params:
                conn.executemany(statement, params)
        if ended:
            self.settle(conn, ended, now)

    def report_progress(self, conn: apsw.Connection, reports: Iterable[_ProgressReport]
                        ) -> None:
        """Store what running handlers last reported (fenced by their claims' leases)."""
        conn.executemany(self.SET_PROGRESS, reports)

    def release_orphans(self, conn: apsw.Connection, claims: Iterable[tuple[str, int]],
                        now: int) -> None:
        """Put back (refunded) claims, given as (job id, lease), that no runtime holds."""
        params = [(job_id, lease, now) for job_id, lease in claims]
        conn.executemany(self.RELEASE_ORPHAN, params)
        self.settle(conn, [job_id for job_id, _, _ in params], now)   # (cancel requested)

    def rescue(self, conn: apsw.Connection, now: int, progress: int) -> int:
        """Requeue (or fail, on their last attempt) the jobs of hosts that the progress
        clock says are dead; how many."""
        rescued = [row[0] for row in conn.execute(
            self.RESCUE, (now, _iso_from_ms(now), MAX_ERRORS_KEPT, progress))]
        self.settle(conn, rescued, now)
        return len(rescued)


# ------------------------------------------------------------------ Jobs ----

class Jobs:
    """Enqueueing, reading and administering jobs: `storage.jobs`."""

    # A bulk enqueue validates, serialises and inserts this many requests at a time, so a
    # million-job generator streams through in bounded memory.
    INSERT_CHUNK = 2000
    DELETE_CHUNK_ROWS = 2000
    RETENTIONS = "SELECT name, retain_done_ms, retain_failed_ms FROM queues"

    def __init__(self, db: Database, store: _JobStore) -> None:
        self._db = db
        self._store = store
        self._known_queues: set[str] = set()
        # Called with the set of queue names after every committed enqueue in this process;
        # runtimes use it to wake their dispatcher at once instead of at the next poll.
        self._enqueue_listeners: list[Callable[[set[str]], None]] = []

    # -- enqueue --

    def enqueue(self, request: EnqueueRequest, router: Router | None = None) -> EnqueueOutcome:
        """Insert one job; committed when this returns (see Guarantees for durability)."""
        if type(request) is EnqueueRequest and (request.depends_on or request.job_id):
            return self._db.write(lambda conn: self.enqueue_in(conn, [request], router))[0]
        job = self._new_jobs([request], 0, router, {})[0]
        if job.unique_key is not None or job.queue not in self._known_queues:
            return self._db.write(functools.partial(self._enqueue_job_in, job))
        self._store.insert_alone(job)   # the common case, in as few round trips as can be
        self._announce({job.queue})
        return EnqueueOutcome(job.id, True)

    def enqueue_bulk(self, requests: Iterable[EnqueueRequest],
                     router: Router | None = None) -> list[EnqueueOutcome]:
        """Insert many jobs in one transaction: all of them, or (on any error) none.

        Takes any iterable and streams it: a generator of a million requests is never held
        in memory at once (the outcomes are).
        """
        if isinstance(requests, (list, tuple)):
            return self._db.write(lambda conn: self.enqueue_in(conn, requests, router))
        stream, started = iter(requests), False

        def enqueue_stream(conn: apsw.Connection) -> list[EnqueueOutcome]:
            nonlocal started
            if started:         # a retry of the transaction: the iterator cannot rewind
                raise TransientError("enqueue_bulk was interrupted after it began reading its "
                                     "iterable, which cannot be read again; nothing was "
                                     "written (pass a list to have it retried)")
            started = True
            return self.enqueue_in(conn, stream, router)

        return self._db.write(enqueue_stream)

    def enqueue_in(self, conn: apsw.Connection, requests: Iterable[EnqueueRequest],
                   router: Router | None = None) -> list[EnqueueOutcome]:
        """Enqueue inside a write transaction of your own (`storage.db.write(work)` calls
        `work(conn)`): the jobs commit or roll back with your other writes, and this
        process's runtimes wake once they commit."""
        stream = iter(requests)
        outcomes: list[EnqueueOutcome] = []
        queues: set[str] = set()
        routed: dict[str, str] = {}
        graph = _Graph()
        self._db.after_commit(functools.partial(self._announce, queues))
        given: set[str] = set()
        while chunk := list(itertools.islice(stream, self.INSERT_CHUNK)):
            jobs = self._new_jobs(chunk, len(outcomes), router, routed)
            self._check_given_ids(conn, chunk, len(outcomes), given)
            inserted = self._insert_in(conn, jobs, queues)
            if (any(builtins.map(_has_parents_of, jobs))
                    or any(builtins.map(_unique_key_of, jobs))):
                graph.add(chunk, jobs, inserted, len(outcomes))
            outcomes += inserted
        if graph:
            self._store.link(conn, graph, self._db.clock_ms())
        return outcomes

    def _enqueue_job_in(self, job: _NewJob, conn: apsw.Connection) -> EnqueueOutcome:
        queues: set[str] = set()
        self._db.after_commit(functools.partial(self._announce, queues))
        return self._insert_in(conn, [job], queues)[0]

    def _check_given_ids(self, conn: apsw.Connection, requests: list[EnqueueRequest],
                         first_index: int, given: set[str]) -> None:
        """Refuse a job_id given twice in one call, or taken by an existing job."""
        named = [(index, req.job_id) for index, req in enumerate(requests, first_index)
                 if req.job_id is not None]
        for index, job_id in named:
            if job_id in given:
                raise InvalidInput(f"request {index}: job_id {job_id} is given twice")
            given.add(job_id)
        if named and (taken := self._store.existing_ids(conn, [job_id for _, job_id in named])):
            index, job_id = next(pair for pair in named if pair[1] in taken)
            raise InvalidInput(f"request {index}: job_id {job_id} is taken by an existing job")

    def _insert_in(self, conn: apsw.Connection, jobs: list[_NewJob],
                   queues: set[str]) -> list[EnqueueOutcome]:
        """Insert jobs in the caller's transaction, creating the queues they name that this
        process has not seen; `queues` (those this transaction names) gains theirs."""
        for name in {job.queue for job in jobs} - queues:
            queues.add(name)
            if name not in self._known_queues:
                conn.execute(Queues.ENSURE, (name,))
        return self._store.insert(conn, jobs)

    def _new_jobs(self, requests: list[EnqueueRequest], first_index: int,
                  router: Router | None, routed: dict[str, str]) -> list[_NewJob]:
        """Validate, route and serialise requests, minting their ids. (A bulk enqueue runs
        this loop a hundred thousand times: per job it calls no function written in Python,
        and the router once a kind.)"""
        now = self._db.clock_ms()
        ids = _mint_ids(len(requests))
        route = router.route if router is not None else None
        jobs: list[_NewJob] = []
        items = cast("list[_RequestItems]", requests)   # the same, as the tuples they are
        for job_id, req, item in zip(ids, requests, items, strict=True):
            if type(req) is not EnqueueRequest:
                index = first_index + len(jobs)
                raise InvalidInput(f"request {index}: expected an EnqueueRequest, "
                                   f"got {type(req).__name__}")
            (kind, _, queue, priority, run_at, max_attempts, unique_key, timeout,
             given_id, parents, allow_parent_failure, payload_json) = item
            if queue is None:
                queue = routed.get(kind)
                if queue is None:
                    queue = DEFAULT_QUEUE if route is None else _check_name(
                        route(kind), f"queue chosen by the router for kind {kind!r}")
                    routed[kind] = queue
            due = now if run_at is None else min(round(run_at * 1000), _LATEST_MS)
            state = "waiting" if parents else "queued" if due <= now else "scheduled"
            jobs.append(_new_tuple(_NewJob, (
                given_id or job_id, kind, queue, payload_json, state, priority, due,
                max_attempts, unique_key, now,
                None if timeout is None else max(1, round(timeout * 1000)),
                len(parents) if parents else 0, 1 if allow_parent_failure else 0,
                1 if parents else 0)))
        return jobs

    def _announce(self, queues: set[str]) -> None:
        """After the commit: wake this process's runtimes serving the jobs' queues."""
        self._known_queues |= queues
        for listener in tuple(self._enqueue_listeners):    # a runtime may stop meanwhile
            listener(queues)

    # -- for asyncio callers: the same, with the write in a thread --

    async def aenqueue(self, request: EnqueueRequest, router: Router | None = None
                       ) -> EnqueueOutcome:
        """`enqueue`, awaitable: the write runs in a thread, the event loop stays free."""
        import asyncio
        return await asyncio.to_thread(self.enqueue, request, router)

    async def aenqueue_bulk(self, requests: Iterable[EnqueueRequest],
                            router: Router | None = None) -> list[EnqueueOutcome]:
        """`enqueue_bulk`, awaitable."""
        import asyncio
        return await asyncio.to_thread(self.enqueue_bulk, requests, router)

    # -- reading --

    def get(self, job_id: str) -> Job | None:
        """The job with this id, or None."""
        return self._store.get(job_id)

    def children(self, job_id: str) -> list[str]:
        """The ids of the jobs that name this one in their depends_on."""
        return self._store.children(job_id)

    def parent_results(self, job_id: str) -> dict[str, Any]:
        """The results of a job's parents: parent id -> result (None for a parent that is
        not done), in depends_on order."""
        return self._store.parent_results(job_id)

    def list(self, state: str | None = None, queue: str | None = None, kind: str | None = None,
             limit: int = 100, *, before: str | None = None, id_prefix: str | None = None
             ) -> list[Job]:
        """The newest jobs matching every given filter, newest first. Pages go by id:
        `before=` the last id of a page gives the next one (no OFFSET: every page costs
        the same). `id_prefix` matches ids that start with it (any case)."""
        if state is not None:
            state = _check_state(state)
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
            raise InvalidInput(f"limit must be a non-negative integer, not {limit!r}")
        for value, what in ((before, "before"), (id_prefix, "id_prefix")):
            if value is not None and (not isinstance(value, str) or len(value) > 26
                                      or not value.isalnum() or not value.isascii()):
                raise InvalidInput(f"{what} must be (the start of) a job id, not {value!r}")
        return self._store.newest(state, queue, kind, limit, before,
                                  None if id_prefix is None else id_prefix.upper())

    def counts(self, queue: str | None = None) -> dict[str, int]:
        """Number of jobs in each state (every state present, zeros included)."""
        return self._store.counts(queue)

    def wait(self, job_id: str, timeout: float | None = None) -> Job:
        """Block until the job is done, failed or cancelled, and return it.

        Wakes at once on this process's commits, and for other processes' on SQLite by
        polling `PRAGMA data_version` every 50 ms, on PostgreSQL by their NOTIFY: waiting
        costs next to nothing. Raises TimeoutError.
        """
        pauses = self._watch(job_id, timeout)
        try:
            while True:
                self._db._wait_for_change(next(pauses))
        except StopIteration as finished:
            return cast(Job, finished.value)

    def _watch(self, job_id: str, timeout: float | None) -> Generator[float, None, Job]:
        """The waiting of `wait`, as a generator: it yields how long to pause before it looks
        again, and returns the finished job."""
        deadline = None if timeout is None else time.monotonic() + timeout
        seen_version, reread_at = None, 0.0
        unseen_poll = self._db.UNSEEN_WRITES_POLL
        while True:
            version = self._db.data_version()
            if version != seen_version or (unseen_poll and time.monotonic() >= reread_at):
                seen_version = version
                reread_at = time.monotonic() + (unseen_poll or 0.0)
                job = self.get(job_id)
                if job is None:
                    raise InvalidInput(f"no job with id {job_id!r}")
                if job.state in FINISHED_STATES:
                    return job
                state = job.state
            remaining = 0.05 if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"job {job_id} still {state.value} after {timeout} s")
            yield min(remaining, 0.05)

    # -- for asyncio callers: waiting without a thread --

    async def await_job(self, job_id: str, timeout: float | None = None) -> Job:
        """`wait`, awaitable: the job once done, failed or cancelled. It holds no thread
        while it waits; it reads the job (by id, a fraction of a millisecond) when something
        was committed, at most every 50 ms."""
        import asyncio
        pauses = self._watch(job_id, timeout)
        try:
            while True:
                await asyncio.sleep(next(pauses))
        except StopIteration as finished:
            return cast(Job, finished.value)

    # -- administration --

    def cancel(self, job_id: str) -> str:
        """Cancel a queued job now, or ask a running one to stop.

        Returns "cancelled", "cancel_requested", "finished" or "not_found".
        """
        return self._db.write(lambda conn: self._store.cancel(conn, job_id, self._db.clock_ms()))

    def retry(self, job_id: str) -> bool:
        """Put a failed or cancelled job back in its queue with its attempts reset (one with
        parents waits again for those not done: retry a failed parent and its cancelled
        children, in any order, and they run in order).

        False if there is no such job or it is not failed/cancelled. InvalidInput if another
        active job now holds its unique key.
        """
        def retry(conn: apsw.Connection) -> bool:
            try:
                return self._store.retry(conn, job_id, self._db.clock_ms())
            except self._db.UNIQUE_VIOLATION:
                raise InvalidInput(f"job {job_id} cannot be retried: another queued or running "
                                   f"job holds its unique_key") from None

        return self._db.write(retry)

    def retry_failed(self, queue: str | None = None, kind: str | None = None) -> int:
        """Retry every failed job (of one queue and kind, if given). Jobs whose unique key
        is held by an active job are left failed. Returns how many were requeued."""
        return self._db.write(
            lambda conn: self._store.retry_failed(conn, queue, kind, self._db.clock_ms()))

    def run_now(self, job_id: str) -> bool:
        """Make a scheduled (queued, future run_at) job ready now. False if not applicable."""
        return self._db.write(lambda conn: self._store.run_now(conn, job_id, self._db.clock_ms()))

    def delete(self, job_id: str) -> bool:
        """Delete a job that is not running (cancel a running one first)."""
        return self._db.write(lambda conn: self._store.delete(conn, job_id,
                                                              self._db.clock_ms()))

    def purge(self, state: str, older_than: timedelta | float) -> int:
        """Delete jobs in a finished state that finished more than `older_than` ago.

        Deletes in chunks of short transactions so workers are never starved of the lock.
        Returns the number of rows deleted.
        """
        state = _check_state(state)
        if state not in FINISHED_STATES:
            raise InvalidInput(f"purge takes a finished state (done, failed, cancelled), "
                               f"not {state!r}")
        cutoff = self._db.clock_ms() - int(_duration_seconds(older_than, "older_than") * 1000)
        return sum(self._delete_finished(state, cutoff, queue)
                   for queue in self._store.queues_ended(state))

    def _delete_finished(self, state: str, cutoff: int, queue: str,
                         stop: threading.Event | None = None) -> int:
        """Delete `queue`'s jobs in `state` finished before `cutoff`, a chunk per
        transaction, so no writer waits long behind a big delete. Gives up between chunks
        once `stop` is set."""
        total = 0
        while stop is None or not stop.is_set():
            deleted = self._db.write(lambda conn: self._store.delete_finished(
                conn, state, cutoff, queue, self.DELETE_CHUNK_ROWS))
            total += deleted
            if deleted < self.DELETE_CHUNK_ROWS:
                break
        return total

    def sweep_expired(self, stop: threading.Event | None = None) -> int:
        """Delete finished jobs past their queue's retention: `done` ones after the queue's
        `retain_done`, `failed` and `cancelled` ones after `retain_failed`. In chunks of
        short transactions; once `stop` is set it gives up after the current chunk (the next
        sweep finishes the work). Returns the number of rows deleted."""
        now, total = self._db.clock_ms(), 0
        for queue, retain_done, retain_failed in self._db.read(self.RETENTIONS):
            for state, retain in (("done", retain_done), ("failed", retain_failed),
                                  ("cancelled", retain_failed)):
                total += self._delete_finished(state, now - retain, queue, stop)
        if total:
            log.info("janitor deleted %d finished job(s) past retention", total)
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

    ENSURE = "INSERT INTO queues (name) VALUES (?) ON CONFLICT DO NOTHING"
    SET_PAUSED = "UPDATE queues SET paused = ?2 WHERE name = ?1"
    SET_LIMIT = "UPDATE queues SET concurrency = ?2 WHERE name = ?1"
    SET_BACKOFF = "UPDATE queues SET backoff_base_ms = ?2, backoff_cap_ms = ?3 WHERE name = ?1"
    SET_RETENTION = ("UPDATE queues SET retain_done_ms = coalesce(?2, retain_done_ms),"
                     " retain_failed_ms = coalesce(?3, retain_failed_ms) WHERE name = ?1")
    SELECT_ALL = ("SELECT name, paused, concurrency, backoff_base_ms, backoff_cap_ms,"
                  " cooldown_until, retain_done_ms, retain_failed_ms FROM queues ORDER BY name")
    GATE = "SELECT paused, concurrency, cooldown_until FROM queues WHERE name = ?"
    SETTINGS = "SELECT name, paused, backoff_base_ms, backoff_cap_ms, cooldown_until FROM queues"
    COOL_DOWN = ("UPDATE queues SET cooldown_until = ?2 WHERE name = ?1 AND cooldown_until < ?2")

    def __init__(self, db: Database, store: _JobStore) -> None:
        self._db = db
        self._store = store

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
                                  or limit < 1):
            raise InvalidInput(f"limit must be a positive integer (pause a queue to stop it) "
                               f"or None, not {limit!r}")
        self._update(name, self.SET_LIMIT, limit)

    def set_backoff(self, name: str, base: timedelta | float, cap: timedelta | float) -> None:
        """Retry delay after the n-th failure: min(base * 2**(n-1), cap), jittered."""
        base_ms = int(_duration_seconds(base, "backoff base") * 1000)
        cap_ms = int(_duration_seconds(cap, "backoff cap") * 1000)
        if cap_ms < base_ms:
            raise InvalidInput("backoff cap must not be smaller than its base")
        self._update(name, self.SET_BACKOFF, base_ms, cap_ms)

    def set_retention(self, name: str, done: timedelta | float | None = None,
                      failed: timedelta | float | None = None) -> None:
        """How long finished jobs are kept: `done` ones, and `failed`/`cancelled` ones
        (defaults 7 and 30 days). None leaves a setting unchanged."""
        done_ms = None if done is None else int(_duration_seconds(done, "retention") * 1000)
        failed_ms = (None if failed is None
                     else int(_duration_seconds(failed, "retention") * 1000))
        self._update(name, self.SET_RETENTION, done_ms, failed_ms)

    THROUGHPUT_WINDOW_MS = 5 * 60_000

    def stats(self) -> list[QueueStats]:
        """Load of every queue, by name. Counting reads the whole table: for dashboards and
        the CLI, not for hot paths."""
        now = self._db.clock_ms()
        counts = self._store.counts_by_queue()
        readiness = self._store.readiness(now)
        finished = self._store.finished_since(now - self.THROUGHPUT_WINDOW_MS)
        stats = []
        for queue in self.list():
            ready, scheduled, oldest = readiness.get(queue.name, (0, 0, None))
            by_state = counts.get(queue.name, {})
            stats.append(QueueStats(
                queue.name, ready, scheduled, by_state.get("running", 0),
                by_state.get("done", 0), by_state.get("failed", 0),
                by_state.get("cancelled", 0), queue.paused, queue.limit,
                finished.get(queue.name, 0) / (self.THROUGHPUT_WINDOW_MS / 60_000),
                None if oldest is None else max(0.0, (now - oldest) / 1000)))
        return stats

    def _gate(self, conn: apsw.Connection, name: str) -> tuple[bool, int | None, int]:
        """(paused, concurrency limit, cooldown_until) of a queue, read in a transaction."""
        rows = cast("list[tuple[int, int | None, int]]",
                    conn.execute(self.GATE, (name,)).fetchall())
        return (bool(rows[0][0]), rows[0][1], rows[0][2]) if rows else (False, None, 0)

    def _settings(self) -> list[tuple[str, bool, int, int, int]]:
        """(name, paused, backoff base ms, backoff cap ms, cooldown_until) of every queue."""
        return [(name, bool(paused), base, cap, cooldown) for name, paused, base, cap, cooldown
                in self._db.read(self.SETTINGS)]

    def _cool_down(self, conn: apsw.Connection, name: str, until: int) -> None:
        """No process claims from the queue before `until` (ms)."""
        conn.execute(self.COOL_DOWN, (name, until))

    def list(self) -> list[Queue]:
        """Every queue that has settings or ever had a job enqueued, by name."""
        return [Queue(name, bool(paused), limit, base / 1000, cap / 1000,
                      _datetime_from_ms(cooldown) if cooldown else None, done / 1000, failed / 1000)
                for name, paused, limit, base, cap, cooldown, done, failed
                in self._db.read(self.SELECT_ALL)]


# ------------------------------------------------------------- Processes ----

@dataclass(frozen=True, slots=True)
class ProcessInfo:
    """One live (or recently live) runtime process."""

    host_id: str
    hostname: str
    pid: int
    queues: dict[str, int]
    started_at: datetime
    heartbeat_at: datetime


class Processes:
    """The heartbeat table, and the reaper that rescues jobs of silent hosts.

    Hosts are judged on a progress clock, not on wall time. Each beat advances the clock by
    the wall time since the last beat of any host (beats stamped in the future, after the
    wall clock stepped back, do not count), and stamps the beater's row with it. A host is
    dead when the clock has moved more than its lease timeout past its stamp. One beat
    advances the clock by at most the step that no live host can miss: twice the shortest
    heartbeat interval, and less than any host's lease timeout minus its interval. While an
    outside writer holds the writer lock, no host can beat and the clock stands still, so a
    stall that blocks everyone rescues no one, however long it lasts, and a jump of the wall
    clock rescues no one either. A host silent while the others beat is dead after its
    lease timeout, as on a wall clock (later when hosts with very different intervals share
    the file: the clock then advances at most one step per beat).
    """

    PROGRESS = ("SELECT max(progress_at), max(heartbeat_at) FILTER (WHERE heartbeat_at <= ?1),"
                " min(CASE WHEN 2 * heartbeat_interval_ms"
                " < lease_timeout_ms - heartbeat_interval_ms THEN 2 * heartbeat_interval_ms"
                " ELSE lease_timeout_ms - heartbeat_interval_ms END)"
                " FROM processes")
    UPSERT = ("INSERT INTO processes (host_id, hostname, pid, queues, started_at, heartbeat_at,"
              " lease_timeout_ms, progress_at, heartbeat_interval_ms)"
              " VALUES (?1, ?2, ?3, ?4, ?5, ?5, ?6, ?7, ?8)"
              " ON CONFLICT (host_id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at,"
              " progress_at = excluded.progress_at,"
              " heartbeat_interval_ms = excluded.heartbeat_interval_ms")
    DELETE = "DELETE FROM processes WHERE host_id = ?"
    SELECT_ALL = ("SELECT host_id, hostname, pid, queues, started_at, heartbeat_at"
                  " FROM processes ORDER BY started_at, host_id")
    DELETE_SILENT = "DELETE FROM processes WHERE progress_at < ?1 - lease_timeout_ms"
    CLAIM_CHORE = ("INSERT INTO chores (name, last_run_at) VALUES (?1, ?2)"
                   " ON CONFLICT (name) DO UPDATE SET last_run_at = ?2"
                   " WHERE chores.last_run_at <= ?3")
    CHORE_LAST_RUN = "SELECT last_run_at FROM chores WHERE name = ?"

    def __init__(self, db: Database, store: _JobStore) -> None:
        self._db = db
        self._store = store

    def _heartbeat(self, host_id: str, queues: Mapping[str, int], lease_timeout: float,
                   interval: float, reports: Sequence[_ProgressReport] = ()) -> int:
        """Record that `host_id` is alive and beats every `interval` seconds (it is to be
        deemed dead after `lease_timeout` seconds of progress without a beat), store its
        handlers' progress `reports`, and rescue the jobs of dead hosts. Returns how many
        jobs were rescued. Idempotent."""
        lease_ms, interval_ms = int(lease_timeout * 1000), int(interval * 1000)

        def beat(conn: apsw.Connection) -> int:
            self._db._serialize(conn, "heartbeat")
            now = self._db.clock_ms(conn)   # with the lock held: waiting for it ages no beat
            progress, last_beat, step = cast("tuple[int | None, int | None, int | None]",
                                             conn.execute(self.PROGRESS, (now,)).fetchall()[0])
            if progress is None:
                now_progress = now
            else:
                step = min(2 * interval_ms, lease_ms - interval_ms,
                           step if step is not None else 2 * interval_ms)
                since = 0 if last_beat is None else now - last_beat
                now_progress = progress + min(since, max(1, step))
            conn.execute(self.UPSERT, (host_id, _HOSTNAME, os.getpid(),
                                       _json_encode(dict(queues)), now, lease_ms, now_progress,
                                       interval_ms))
            if reports:
                self._store.report_progress(conn, reports)
            rescued = self._store.rescue(conn, now, now_progress)
            conn.execute(self.DELETE_SILENT, (now_progress,))
            if not rescued:
                self._db._unannounced(conn)
            return rescued

        rescued = self._db.write(beat)
        if rescued:
            log.warning("rescued %d job(s) from hosts that stopped heartbeating", rescued)
        return rescued

    def _claim_chore(self, name: str, interval: float) -> bool:
        """True for exactly one caller per `interval` seconds, cluster-wide."""
        now = self._db.clock_ms()
        cutoff = now - int(interval * 1000)
        last = self._db.read(self.CHORE_LAST_RUN, (name,))
        if last and last[0][0] > cutoff:
            return False        # read first: most calls need no writer lock
        return bool(self._db._write_changes(self.CLAIM_CHORE, (name, now, cutoff)))

    def remove(self, host_id: str) -> None:
        """Forget a host that stopped cleanly."""
        self._db.write(lambda conn: conn.execute(self.DELETE, (host_id,)))

    def list(self) -> list[ProcessInfo]:
        """Every registered process: live ones, and silent ones the reaper has not removed
        yet (a host is dead once the others have beaten for its lease timeout without it)."""
        return [ProcessInfo(host, hostname, pid, _json_decode(queues),
                            _datetime_from_ms(started), _datetime_from_ms(beat))  # type: ignore[arg-type]
                for host, hostname, pid, queues, started, beat
                in self._db.read(self.SELECT_ALL)]


# ----------------------------------------------------------- Cancellation ----

class CancellationToken:
    """Tells a running handler to stop. `reason` is "paused", "shutdown", "cancelled",
    "timeout" (its time limit passed) or "lost" (another process rescued the job). Handlers
    poll `cancelled` or `wait` on it; an async handler's task is cancelled."""

    __slots__ = ("_callbacks", "_event", "_lock", "reason")

    def __init__(self) -> None:
        # The Event is made by the first wait(): most tokens are never waited on, and one
        # is minted per claimed job.
        self._lock = threading.Lock()
        self._event: threading.Event | None = None
        self._callbacks: list[Callable[[], None]] | None = None    # made by _on_cancel
        self.reason: str | None = None

    @property
    def cancelled(self) -> bool:
        """Whether the token has fired."""
        return self.reason is not None

    def cancel(self, reason: str) -> None:
        """Fire the token; the first reason sticks."""
        with self._lock:
            if self.reason is not None:
                return
            self.reason = reason
            event, callbacks, self._callbacks = self._event, self._callbacks, None
        if event is not None:
            event.set()
        for callback in callbacks or ():
            callback()

    def _on_cancel(self, callback: Callable[[], None]) -> None:
        """Call `callback` (from the cancelling thread) when the token fires; at once if
        it has."""
        with self._lock:
            if self.reason is None:
                self._callbacks = [*(self._callbacks or ()), callback]
                return
        callback()

    def wait(self, timeout: float | None = None) -> bool:
        """Sleep until the token fires (True) or `timeout` seconds pass (False)."""
        with self._lock:
            if self.reason is not None:
                return True
            if self._event is None:
                self._event = threading.Event()
            event = self._event
        return event.wait(timeout)

    def raise_if_cancelled(self) -> None:
        """Raise `Cancelled` if the token has fired."""
        if self.reason is not None:
            raise Cancelled(f"job cancelled: {self.reason}")


# ----------------------------------------------------------- Rate limits ----

class RateLimits:
    """Token buckets shared by every process on the file: `storage.rate_limits`."""

    # Reconfiguring first banks what the old rate refilled so far: a new rate applies from
    # the change on, never retroactively.
    CONFIGURE = """
        INSERT INTO rate_limits (scope, capacity, refill_per_sec, tokens, updated_at)
        VALUES (?1, ?2, ?3, ?2, ?4)
        ON CONFLICT (scope) DO UPDATE SET
            capacity = ?2, refill_per_sec = ?3, updated_at = max(updated_at, ?4),
            tokens = min(?2, capacity,
                         tokens + max(0, ?4 - updated_at) / 1000.0 * refill_per_sec)"""
    SELECT = "SELECT capacity, refill_per_sec, tokens, updated_at FROM rate_limits WHERE scope = ?"
    SET_TOKENS = "UPDATE rate_limits SET tokens = ?2, updated_at = ?3 WHERE scope = ?1"

    def __init__(self, db: Database) -> None:
        self._db = db

    def configure(self, scope: str, capacity: float, refill_per_sec: float) -> None:
        """Create or change a bucket: at most `capacity` tokens, refilled continuously."""
        _check_name(scope, "rate-limit scope")
        for value, what in ((capacity, "capacity"), (refill_per_sec, "refill_per_sec")):
            if not isinstance(value, (int, float)) or isinstance(value, bool) \
                    or not 0 < value < 1e12:
                raise InvalidInput(f"{what} of scope {scope!r} must be a positive number")
        self._change(lambda conn: conn.execute(
            self.CONFIGURE, (scope, float(capacity), float(refill_per_sec),
                             self._db.clock_ms(conn))))

    def _change(self, work: Callable[[apsw.Connection], T]) -> T:
        """Run `work` in a write holding the buckets' lock: on PostgreSQL, where writes run
        side by side, a take, a drain and a configure must not interleave."""
        def locked(conn: apsw.Connection) -> T:
            self._db._serialize(conn, "rate_limits")
            return work(conn)

        return self._db.write(locked)

    def take(self, scope: str, tokens: float) -> float:
        """Take `tokens` if the bucket holds them: 0.0. Otherwise take nothing and return the
        seconds until it will. The refill is computed lazily inside the same transaction."""
        def take(conn: apsw.Connection) -> float:
            rows = conn.execute(self.SELECT, (scope,)).fetchall()
            if not rows:
                raise ConfigError(f"rate-limit scope {scope!r} is not configured; call "
                                  f"storage.rate_limits.configure({scope!r}, capacity, refill)")
            capacity, refill, available, updated_at = cast("tuple[float, float, float, int]",
                                                           rows[0])
            if tokens > capacity:
                raise InvalidInput(f"cannot take {tokens} tokens from scope {scope!r} "
                                   f"whose capacity is {capacity}")
            now = self._db.clock_ms(conn)
            available = min(capacity, available + max(0, now - updated_at) / 1000 * refill)
            if available < tokens:
                return (tokens - available) / refill
            conn.execute(self.SET_TOKENS, (scope, available - tokens, now))
            return 0.0

        return self._change(take)

    def drain(self, scope: str) -> None:
        """Empty the bucket, e.g. after an upstream answered HTTP 429."""
        def drain(conn: apsw.Connection) -> int:
            conn.execute(self.SET_TOKENS, (scope, 0.0, self._db.clock_ms(conn)))
            return conn.changes()

        if not self._change(drain):
            raise ConfigError(f"rate-limit scope {scope!r} is not configured")


def _check_tokens(tokens: float) -> None:
    if not isinstance(tokens, (int, float)) or isinstance(tokens, bool) or not tokens > 0:
        raise InvalidInput(f"tokens must be a positive number, not {tokens!r}")


class RateLimiter:
    """Blocking access to the token buckets in `storage.rate_limits`, shared cluster-wide."""

    def __init__(self, storage: Storage) -> None:
        self._rate_limits = storage.rate_limits

    def acquire(self, scope: str, tokens: float = 1, *, timeout: float | None = None,
                cancel: CancellationToken | None = None) -> None:
        """Take `tokens` from the bucket, sleeping until it can grant them.

        Raises TimeoutError at the deadline and Cancelled when `cancel` fires while waiting.
        """
        _check_tokens(tokens)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if cancel is not None and cancel.cancelled:
                raise Cancelled(f"cancelled ({cancel.reason}) while waiting for {scope!r}")
            wait = self._rate_limits.take(scope, tokens)
            if wait == 0.0:
                return
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no {tokens} token(s) of {scope!r} within {timeout} s")
                wait = min(wait, remaining)
            if cancel is not None:
                cancel.wait(wait)
            else:
                time.sleep(wait)

    def try_acquire(self, scope: str, tokens: float = 1) -> bool:
        """Take `tokens` if they are available now; never blocks on the bucket."""
        _check_tokens(tokens)
        return self._rate_limits.take(scope, tokens) == 0.0

    def drain(self, scope: str) -> None:
        """Empty the bucket (after a real HTTP 429), so every process backs off."""
        self._rate_limits.drain(scope)



# --------------------------------------------------------------- Metrics ----

METRICS_FLUSH_INTERVAL = 1.0    # seconds a runtime's rollups wait before riding in a commit
_MINUTE_MS = 60_000


class Timings(NamedTuple):
    """Durations of the jobs of one minute (or step), in seconds. The quantiles are read
    off a log-scale histogram (within 4.4 %); None when no job was measured."""

    jobs: int                   # how many were measured
    total: float
    p50: float | None
    p95: float | None
    p99: float | None
    max: float | None


class MetricsPoint(NamedTuple):
    """What the runtimes recorded in one step of a metrics series (see Metrics.series)."""

    start: datetime             # the step's first minute
    done: int                   # attempts that ended each way
    failed: int                 # (for good; an attempt that will be retried is `retried`)
    retried: int
    cancelled: int
    run: Timings                # how long their handlers ran
    wait: Timings               # from a job's run_at (when it was due) to its claim


class _Durations:
    """Count, sum, max and histogram of durations in microseconds. Bucket b > 0 holds
    durations d with floor(8 log2 d) = b - 1 (eight per doubling: a bucket's middle is
    within 4.4 % of all it holds); bucket 0 those under 1 us. Merges by addition, so the
    rollups of many processes combine exactly.

    A runtime appends seconds to `samples` (one list append per job, on the dispatcher's
    hot path); they are folded in once per flush, sorted, a bisection per bucket."""

    __slots__ = ("count", "total", "max", "histogram", "samples")

    def __init__(self) -> None:
        self.count = self.total = self.max = 0
        self.histogram: dict[int, int] = {}
        self.samples: list[float] = []

    def _fold(self) -> None:
        if not self.samples:
            return
        micros = sorted(sample * 1e6 for sample in self.samples)
        self.samples = []
        start = bisect.bisect_left(micros, 1.0)
        buckets = {0: start} if start else {}
        while start < len(micros):
            bucket = int(math.log2(micros[start]) * 8) + 1
            end = max(start + 1, bisect.bisect_left(micros, 2 ** (bucket / 8), start))
            buckets[bucket] = end - start
            start = end
        self.merge(len(micros), round(max(0.0, math.fsum(micros))), round(max(0.0, micros[-1])),
                   buckets)

    def merge(self, count: int, total: int, most: int, histogram: Mapping[int, int]) -> None:
        self.count += count
        self.total += total
        self.max = max(self.max, most)
        for bucket, n in histogram.items():
            self.histogram[bucket] = self.histogram.get(bucket, 0) + n

    def add_stored(self, count: int, total: int, most: int, histogram: str) -> None:
        """Add durations as stored: `histogram` is the JSON `columns()` writes."""
        if count:
            self.merge(count, total, most, {int(bucket): n for bucket, n
                                            in _json_decode(histogram).items()})

    def merge_from(self, other: _Durations) -> None:
        self.samples += other.samples
        if other.count:
            self.merge(other.count, other.total, other.max, other.histogram)

    def _quantile(self, q: float) -> float:
        """Seconds: the geometric middle of the bucket holding the q-th duration."""
        rank, seen = max(1, math.ceil(q * self.count)), 0
        for bucket in sorted(self.histogram):
            seen += self.histogram[bucket]
            if seen >= rank:
                middle = 0.0 if bucket == 0 else 2 ** ((bucket - 0.5) / 8)
                return min(middle, self.max) / 1_000_000
        return self.max / 1_000_000

    def timings(self) -> Timings:
        self._fold()
        if not self.count:
            return Timings(0, 0.0, None, None, None, None)
        return Timings(self.count, self.total / 1_000_000, self._quantile(0.5),
                       self._quantile(0.95), self._quantile(0.99), self.max / 1_000_000)

    def columns(self) -> tuple[int, int, int, str]:
        self._fold()
        return self.count, self.total, self.max, _json_encode(
            {str(bucket): n for bucket, n in sorted(self.histogram.items())})


class _Rollup:
    """One minute of one queue and kind, as recorded by one process (or a step of a
    series, merged from stored minutes). `ended` counts attempts by verdict."""

    __slots__ = ("ended", "run", "wait")

    def __init__(self) -> None:
        self.ended = dict.fromkeys(_Verdict, 0)     # (REQUEUE stays 0: not an end)
        self.run, self.wait = _Durations(), _Durations()

    def merge(self, other: _Rollup) -> None:
        for verdict, n in other.ended.items():
            self.ended[verdict] += n
        self.run.merge_from(other.run)
        self.wait.merge_from(other.wait)

    def counts(self) -> tuple[int, int, int, int]:
        """Attempts done, failed, retried and cancelled."""
        ended = self.ended
        return (ended[_Verdict.DONE], ended[_Verdict.FAILED], ended[_Verdict.RETRY],
                ended[_Verdict.CANCELLED])

    def columns(self) -> tuple[Any, ...]:
        return (*self.counts(), *self.run.columns(), *self.wait.columns())

    def add_columns(self, columns: Sequence[Any]) -> None:
        """Add a stored minute, given as the columns `columns()` writes. (A week of
        minutes goes through here for one chart: it adds in place, building nothing.)"""
        ended = self.ended
        ended[_Verdict.DONE] += columns[0]
        ended[_Verdict.FAILED] += columns[1]
        ended[_Verdict.RETRY] += columns[2]
        ended[_Verdict.CANCELLED] += columns[3]
        self.run.add_stored(*columns[4:8])
        self.wait.add_stored(*columns[8:12])

    def point(self, start: int) -> MetricsPoint:
        return MetricsPoint(cast(datetime, _datetime_from_ms(start)), *self.counts(),
                            self.run.timings(), self.wait.timings())


class MetricsTotal(NamedTuple):
    """What the runtimes ever recorded for one queue and kind (see Metrics.totals)."""

    queue: str
    kind: str
    done: int
    failed: int
    retried: int
    cancelled: int
    run_jobs: int
    run_seconds: float          # summed over run_jobs
    wait_jobs: int
    wait_seconds: float


_RollupKey = tuple[int, str, str]     # (minute in ms, queue, kind)


class _MetricsBuffer:
    """Rollups a runtime recorded since its last flush. Only the dispatcher thread uses
    it: it records the attempts each commit ends, and every METRICS_FLUSH_INTERVAL (or
    when stopping) adds the buffer to the stored minutes inside its next commit."""

    def __init__(self) -> None:
        self.rollups: dict[_RollupKey, _Rollup] = {}
        self.since: float | None = None     # monotonic time of the oldest unflushed record

    def rollup(self, key: _RollupKey, now: float) -> _Rollup:
        rollup = self.rollups.get(key)
        if rollup is None:
            rollup = self.rollups[key] = _Rollup()
            if self.since is None:
                self.since = now
        return rollup

    def due(self, now: float) -> bool:
        return self.since is not None and now - self.since >= METRICS_FLUSH_INTERVAL

    def merge(self, rollups: Mapping[_RollupKey, _Rollup], now: float) -> None:
        """Add copies of `rollups` to the buffer's."""
        for key, rollup in rollups.items():
            self.rollup(key, now).merge(rollup)

    def clear(self) -> None:
        self.rollups, self.since = {}, None


def _sqlite_merged_histogram(column: str) -> str:
    """SQL: the bucket-wise sum of the stored histogram and the one being added."""
    return f"""(SELECT json_group_object(key, n) FROM (
                SELECT key, sum(value) AS n FROM (
                    SELECT key, value FROM json_each(metrics.{column}) UNION ALL
                    SELECT key, value FROM json_each(excluded.{column})) GROUP BY key))"""


def _metrics_upsert(greatest: str, merged_histogram: Callable[[str], str]) -> str:
    """The statement that adds one rollup to its stored minute, in a dialect: its n-ary
    max function, and how it merges two histograms."""
    return f"""
        INSERT INTO metrics (minute, queue, kind, done, failed, retried, cancelled,
                             run_count, run_sum_us, run_max_us, run_histogram,
                             wait_count, wait_sum_us, wait_max_us, wait_histogram)
        VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
        ON CONFLICT (minute, queue, kind) DO UPDATE SET
            done = metrics.done + excluded.done, failed = metrics.failed + excluded.failed,
            retried = metrics.retried + excluded.retried,
            cancelled = metrics.cancelled + excluded.cancelled,
            run_count = metrics.run_count + excluded.run_count,
            run_sum_us = metrics.run_sum_us + excluded.run_sum_us,
            run_max_us = {greatest}(metrics.run_max_us, excluded.run_max_us),
            run_histogram = {merged_histogram("run_histogram")},
            wait_count = metrics.wait_count + excluded.wait_count,
            wait_sum_us = metrics.wait_sum_us + excluded.wait_sum_us,
            wait_max_us = {greatest}(metrics.wait_max_us, excluded.wait_max_us),
            wait_histogram = {merged_histogram("wait_histogram")}"""


class Metrics:
    """Per-minute rollups of what the runtimes did, per queue and kind: `storage.metrics`.

    Each runtime records the attempts it ends (how each ended, how long its handler ran
    and how long its job waited from run_at to the claim), unless it runs with
    `metrics=False`, and adds them to the stored minutes about once a second, inside a
    commit it makes anyway. Rows of several processes for the same minute merge by
    addition, histograms included, so a series is exact over any number of them. A
    crashed process loses at most its last second. The janitor deletes minutes older
    than the runtime's `metrics_retention` (default 7 days).
    """

    # The merge runs in the statement: two processes flushing the same minute at once
    # (PostgreSQL writes side by side) add up, neither overwrites the other.
    UPSERT = _metrics_upsert("max", _sqlite_merged_histogram)
    SELECT_RANGE = """
        SELECT minute, queue, kind, done, failed, retried, cancelled,
               run_count, run_sum_us, run_max_us, run_histogram,
               wait_count, wait_sum_us, wait_max_us, wait_histogram
        FROM metrics
        WHERE minute >= ?1 AND minute < ?2 AND (CAST(?3 AS TEXT) IS NULL OR queue = ?3)
              AND (CAST(?4 AS TEXT) IS NULL OR kind = ?4)
        ORDER BY minute"""
    DELETE_BEFORE = "DELETE FROM metrics WHERE minute < ?"
    ADD_TO_TOTALS = """
        INSERT INTO metrics_totals (queue, kind, done, failed, retried, cancelled,
                                    run_count, run_sum_us, wait_count, wait_sum_us)
        VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
        ON CONFLICT (queue, kind) DO UPDATE SET
            done = metrics_totals.done + excluded.done,
            failed = metrics_totals.failed + excluded.failed,
            retried = metrics_totals.retried + excluded.retried,
            cancelled = metrics_totals.cancelled + excluded.cancelled,
            run_count = metrics_totals.run_count + excluded.run_count,
            run_sum_us = metrics_totals.run_sum_us + excluded.run_sum_us,
            wait_count = metrics_totals.wait_count + excluded.wait_count,
            wait_sum_us = metrics_totals.wait_sum_us + excluded.wait_sum_us"""
    SELECT_TOTALS = """
        SELECT queue, kind, done, failed, retried, cancelled, run_count, run_sum_us,
               wait_count, wait_sum_us
        FROM metrics_totals ORDER BY queue, kind"""

    def __init__(self, db: Database) -> None:
        self._db = db

    def series(self, queue: str | None = None, kind: str | None = None,
               since: datetime | float | None = None, until: datetime | float | None = None,
               step: timedelta | float = 60) -> list[MetricsPoint]:
        """What the runtimes recorded from `since` (default: an hour ago) to `until`
        (default: now), merged over the queues and kinds that match (None: all), one
        point per `step` (seconds, a whole number of minutes) that saw any job, oldest
        first. Quantiles of a point are of all its jobs, not averages of minutes."""
        step_ms = round(_duration_seconds(step, "step") * 1000)
        if step_ms < _MINUTE_MS or step_ms % _MINUTE_MS:
            raise InvalidInput(f"step must be a whole number of minutes, not {step!r}")
        for value, what in ((queue, "queue"), (kind, "kind")):
            if value is not None:
                _check_name(value, what)
        now = self._db.clock_ms()
        until_ms = now if until is None else int(_epoch_seconds(until, "until") * 1000)
        since_ms = (until_ms - 3_600_000 if since is None
                    else int(_epoch_seconds(since, "since") * 1000))
        points: dict[int, _Rollup] = {}
        for minute, _, _, *columns in self._db.read(
                self.SELECT_RANGE, (since_ms - since_ms % _MINUTE_MS, until_ms, queue, kind)):
            start = minute - minute % step_ms
            points.setdefault(start, _Rollup()).add_columns(columns)
        return [point.point(start) for start, point in sorted(points.items())]

    def _by_key(self, since_ms: int, until_ms: int) -> dict[tuple[str, str], _Rollup]:
        """The minutes from `since_ms` to `until_ms`, merged per queue and kind."""
        merged: dict[tuple[str, str], _Rollup] = {}
        for _, queue, kind, *columns in self._db.read(
                self.SELECT_RANGE, (since_ms - since_ms % _MINUTE_MS, until_ms, None, None)):
            merged.setdefault((queue, kind), _Rollup()).add_columns(columns)
        return merged

    def totals(self) -> list[MetricsTotal]:
        """Per queue and kind, by name: everything the runtimes ever recorded (the
        janitor never deletes these sums; they are what counters are made of)."""
        return [MetricsTotal(queue, kind, done, failed, retried, cancelled, run_count,
                             run_sum / 1_000_000, wait_count, wait_sum / 1_000_000)
                for (queue, kind, done, failed, retried, cancelled, run_count, run_sum,
                     wait_count, wait_sum) in self._db.read(self.SELECT_TOTALS)]

    def _add(self, conn: apsw.Connection, rollups: Mapping[_RollupKey, _Rollup]) -> None:
        """Merge a runtime's rollups into the stored minutes and the totals, in key order
        (writers that lock several rows lock them in one order)."""
        conn.executemany(self.UPSERT, [(*key, *rollup.columns())
                                       for key, rollup in sorted(rollups.items())])
        totals: dict[tuple[str, str], _Rollup] = {}
        for (_, queue, kind), rollup in rollups.items():
            totals.setdefault((queue, kind), _Rollup()).merge(rollup)
        conn.executemany(self.ADD_TO_TOTALS, [
            (queue, kind, *total.counts(), total.run.count, total.run.total, total.wait.count,
             total.wait.total) for (queue, kind), total in sorted(totals.items())])

    def _sweep(self, retention: float) -> int:
        """Delete the minutes older than `retention` seconds; returns how many rows."""
        cutoff = self._db.clock_ms() - int(retention * 1000)

        def delete(conn: apsw.Connection) -> int:
            conn.execute(self.DELETE_BEFORE, (cutoff,))
            return conn.changes()

        return self._db.write(delete)


# ------------------------------------------------------- Cron expressions ----

_CRON_MACROS = {"@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *",
                "@weekly": "0 0 * * 0", "@daily": "0 0 * * *", "@midnight": "0 0 * * *",
                "@hourly": "0 * * * *"}
_CRON_FIELDS = (("second", 0, 59), ("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31),
                ("month", 1, 12), ("day of week", 0, 7))
_CRON_NAMES = {
    "month": {name: i for i, name in enumerate(
        ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"),
        start=1)},
    "day of week": {name: i for i, name in enumerate(
        ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"))},
}
_CRON_SEARCH_YEARS = 8      # Feb 29 recurs within 8 years (2096 -> 2104 skips 2100)


class CronExpression:
    """A parsed cron expression: `next_after(t)` is the first matching instant after `t`.

    Five fields (minute hour day-of-month month day-of-week) or six with leading seconds;
    `*`, `a`, `a-b`, `*/n`, `a-b/n`, `a/n`, lists with commas, names of months and days,
    and @hourly/@daily/@weekly/@monthly/@yearly. When both day fields are restricted, a day
    matching either runs (as in Vixie cron). Times are wall-clock times in `tz`:

    * a time skipped by a spring-forward DST change fires once, at the moment of the jump
      (a job at a fixed hour is never lost) - unless the hour field is `*`, whose schedule
      simply goes on in the next real hour;
    * a time repeated by a fall-back change fires once (its first occurrence), unless the
      hour field is `*`, in which case it fires in both passes (every real hour).
    """

    def __init__(self, expression: str, tz: str | None = None) -> None:
        self.expression = expression
        self.tz_name = tz
        try:
            self.tz = timezone.utc if tz is None else zoneinfo.ZoneInfo(tz)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError, TypeError):
            raise InvalidInput(f"unknown time zone {tz!r}; use an IANA name such as "
                               f"'Europe/Paris'") from None
        if not isinstance(expression, str):
            raise InvalidInput(f"cron expression must be a string, not {expression!r}")
        text = _CRON_MACROS.get(expression.strip().lower(), expression)
        parts = text.split()
        if len(parts) == 5:
            parts.insert(0, "0")
        elif len(parts) != 6:
            raise InvalidInput(f"cron expression {expression!r} has {len(parts)} fields; "
                               f"expected 5, or 6 with leading seconds, or a @macro")
        values = [self._parse_field(part, *spec) for part, spec in zip(parts, _CRON_FIELDS,
                                                                       strict=True)]
        self.seconds, self.minutes, self.hours, self.days, self.months, weekdays = values
        self.weekdays = frozenset(d % 7 for d in weekdays)      # 7 is Sunday too
        self.any_day = parts[3] in ("*", "?")
        self.any_weekday = parts[5] in ("*", "?")
        self.every_hour = parts[2] == "*"
        if self.any_weekday and not any(day <= _days_in_month(2000, month)
                                        for month in self.months for day in self.days):
            raise InvalidInput(f"cron expression {expression!r} never fires: no chosen month "
                               f"has the chosen days")

    def _parse_field(self, text: str, field: str, low: int, high: int) -> tuple[int, ...]:
        names = _CRON_NAMES.get(field, {})

        def number(token: str) -> int:
            value = names.get(token.upper())
            if value is None:
                if not (token.isascii() and token.isdigit()):
                    raise InvalidInput(f"cron expression {self.expression!r}: {field} field "
                                       f"{text!r}: {token!r} is not a number"
                                       + (" or a name" if names else ""))
                value = int(token)
            if not low <= value <= high:
                raise InvalidInput(f"cron expression {self.expression!r}: {field} field "
                                   f"{text!r}: {value} is out of range {low}-{high}")
            return value

        chosen: set[int] = set()
        for item in text.split(","):
            span, _, step_text = item.partition("/")
            step = 1
            if "/" in item:
                if not (step_text.isascii() and step_text.isdigit()) or int(step_text) == 0:
                    raise InvalidInput(f"cron expression {self.expression!r}: {field} field "
                                       f"{text!r}: step {step_text!r} must be a positive number")
                step = int(step_text)
            if span in ("*", "?"):
                first, last = low, high
            elif "-" in span:
                start, _, end = span.partition("-")
                first, last = number(start), number(end)
                if first > last:
                    raise InvalidInput(f"cron expression {self.expression!r}: {field} field "
                                       f"{text!r}: range {span!r} runs backwards")
            else:
                first = number(span)
                last = high if "/" in item else first
            chosen.update(range(first, last + 1, step))
        return tuple(sorted(chosen))

    def _day_matches(self, day: date) -> bool:
        in_days = day.day in self.days
        in_weekdays = (day.weekday() + 1) % 7 in self.weekdays
        if self.any_day:
            return in_weekdays
        if self.any_weekday:
            return in_days
        return in_days or in_weekdays

    def _wall_times_from(self, start: datetime) -> Iterator[datetime]:
        """Matching naive wall-clock times >= start, in order."""
        day = start.date()
        end = day.replace(day=1, year=day.year + _CRON_SEARCH_YEARS)
        first_day = True
        while day < end:
            if day.month not in self.months:
                day = (day.replace(day=1) + timedelta(days=32)).replace(day=1)
                first_day = False
                continue
            if self._day_matches(day):
                for hour in self.hours:
                    if first_day and hour < start.hour:
                        continue
                    same_hour = first_day and hour == start.hour
                    for minute in self.minutes:
                        if same_hour and minute < start.minute:
                            continue
                        same_minute = same_hour and minute == start.minute
                        for second in self.seconds:
                            if same_minute and second < start.second:
                                continue
                            yield datetime(day.year, day.month, day.day, hour, minute, second)
            day += timedelta(days=1)
            first_day = False

    def next_after(self, after: datetime) -> datetime | None:
        """The first firing instant strictly after `after` (aware), or None if there is none
        within the next 8 years. The result is in the expression's time zone."""
        # Aware datetimes sharing a tzinfo compare by wall time, ignoring DST folds: compare
        # in UTC only.
        after = after.astimezone(timezone.utc)
        local = after.astimezone(self.tz)
        start = local.replace(tzinfo=None, microsecond=0)
        # In a repeated hour, an every-hour schedule's second pass is still ahead: look back
        # over the repeated span for wall times whose second occurrence is after `after`.
        fold_span = local.utcoffset() - local.replace(fold=1).utcoffset()   # type: ignore[operator]
        if local.fold == 0 and fold_span > timedelta(0) and self.every_hour:
            start -= fold_span
        best: datetime | None = None
        best_wall = start
        for wall in self._wall_times_from(start):
            if best is not None and wall > best_wall + timedelta(hours=3):
                break
            for instant, second_pass in self._instants(wall):
                if instant > after and (best is None or instant < best):
                    best, best_wall = instant, wall
                    if not second_pass:
                        return best.astimezone(self.tz)
        return None if best is None else best.astimezone(self.tz)

    def _instants(self, wall: datetime) -> list[tuple[datetime, bool]]:
        """The UTC instants at which wall-clock time `wall` fires, each with whether it is
        the second pass of a repeated hour."""
        first = wall.replace(tzinfo=self.tz, fold=0).astimezone(timezone.utc)
        second = wall.replace(tzinfo=self.tz, fold=1).astimezone(timezone.utc)
        if first == second:
            return [(first, False)]
        if first.astimezone(self.tz).replace(tzinfo=None) == wall:      # repeated time
            return [(first, False), (second, True)] if self.every_hour else [(first, False)]
        if self.every_hour:                                             # skipped time
            return []
        return [(_transition_between(second, first, self.tz), False)]


def _transition_between(low: datetime, high: datetime, tz: tzinfo) -> datetime:
    """The UTC instant in (low, high] where tz's UTC offset changes, to the second."""
    offset = low.astimezone(tz).utcoffset()
    while high - low > timedelta(seconds=1):
        middle = low + (high - low) / 2
        if middle.astimezone(tz).utcoffset() == offset:
            low = middle
        else:
            high = middle
    return high.replace(microsecond=0)


def _days_in_month(year: int, month: int) -> int:
    following = date(year + month // 12, month % 12 + 1, 1)
    return (following - timedelta(days=1)).day


# ------------------------------------------------------------------ Cron ----

@dataclass(frozen=True, slots=True)
class CronSchedule:
    """A cron schedule as stored: what it enqueues, and when it fires next."""

    name: str
    expression: str
    timezone: str | None
    request: EnqueueRequest
    next_fire_at: datetime | None
    enabled: bool
    last_error: str | None


def _request_to_json(request: EnqueueRequest) -> str:
    fields = request._asdict()
    del fields["run_at"]        # a schedule's jobs run at their tick
    return _json_encode(fields)


def _request_from_json(text: str, run_at: float | None = None) -> EnqueueRequest:
    fields = _json_decode(text)
    return EnqueueRequest(fields.pop("kind"), fields.pop("payload"), run_at=run_at, **fields)


class CronSchedules:
    """Cron schedules shared by every process: `storage.cron`.

    Each tick is enqueued exactly once however many processes declare the schedule: the
    process that fires it moves `next_fire_at` with a compare-and-set in the same transaction
    as the enqueue, so a second process finds nothing left to fire.
    """

    # Re-declaring an unchanged schedule keeps its next tick; a changed one starts afresh.
    DECLARE = """
        INSERT INTO cron (name, expression, timezone, request, next_fire_at)
        VALUES (?1, ?2, ?3, ?4, ?5)
        ON CONFLICT (name) DO UPDATE SET expression = ?2, timezone = ?3, request = ?4,
                                         next_fire_at = ?5, enabled = 1, last_error = NULL
        WHERE cron.expression IS DISTINCT FROM ?2 OR cron.timezone IS DISTINCT FROM ?3
              OR cron.request IS DISTINCT FROM ?4"""
    SELECT_ALL = ("SELECT name, expression, timezone, request, next_fire_at, enabled, last_error"
                  " FROM cron ORDER BY name")
    SELECT_DUE = ("SELECT name, expression, timezone, request, next_fire_at FROM cron"
                  " WHERE enabled = 1 AND next_fire_at <= ?")
    NEXT_FIRES = ("SELECT name, next_fire_at FROM cron WHERE enabled = 1"
                  " AND next_fire_at IS NOT NULL")
    ADVANCE = ("UPDATE cron SET next_fire_at = ?3, last_error = ?4"
               " WHERE name = ?1 AND next_fire_at = ?2")
    SET_ERROR = "UPDATE cron SET last_error = ?2 WHERE name = ?1"
    DELETE = "DELETE FROM cron WHERE name = ?"
    DISABLE = "UPDATE cron SET enabled = 0 WHERE name = ?"
    SELECT_EXPRESSION = "SELECT expression, timezone, enabled FROM cron WHERE name = ?"
    ENABLE = "UPDATE cron SET enabled = 1, next_fire_at = ?2 WHERE name = ?1"
    # Ticks later than this were missed while no process ran the schedule: they collapse
    # into one run, then the schedule goes on from now (no catch-up storm).
    MISSED_AFTER_MS = 5_000

    def __init__(self, db: Database, jobs: Jobs) -> None:
        self._db = db
        self._jobs = jobs
        self._parsed: dict[tuple[str, str | None], CronExpression] = {}

    def declare(self, name: str, expression: CronExpression, request: EnqueueRequest) -> None:
        """Create or update the schedule `name`; its first tick is the next after now."""
        _check_name(name, "schedule name")
        first = expression.next_after(_datetime_from_ms(self._db.clock_ms()))  # type: ignore[arg-type]
        first_ms = None if first is None else int(first.timestamp() * 1000)
        params = (name, expression.expression, expression.tz_name, _request_to_json(request),
                  first_ms)
        self._db.write(lambda conn: conn.execute(self.DECLARE, params))

    def remove(self, name: str) -> bool:
        """Delete the schedule `name`; False if there is none. (A runtime that declares it
        declares it again when it starts.)"""
        return bool(self._db._write_changes(self.DELETE, (name,)))

    def disable(self, name: str) -> bool:
        """Stop the schedule `name` firing, in every process, until `enable`; False if there
        is none. It stays disabled when a runtime declares it unchanged."""
        return bool(self._db._write_changes(self.DISABLE, (name,)))

    def enable(self, name: str) -> bool:
        """Let the schedule `name` fire again from its next tick after now (the ticks it
        missed while disabled are not run); False if there is none."""
        def enable(conn: apsw.Connection) -> bool:
            rows = conn.execute(self.SELECT_EXPRESSION, (name,)).fetchall()
            if not rows:
                return False
            expression, tz, enabled = cast("tuple[str, str | None, int]", rows[0])
            if not enabled:
                now = _datetime_from_ms(self._db.clock_ms(conn))
                tick = self._expression(expression, tz).next_after(now)  # type: ignore[arg-type]
                conn.execute(self.ENABLE, (name, None if tick is None
                                           else int(tick.timestamp() * 1000)))
            return True

        return self._db.write(enable)

    def list(self) -> list[CronSchedule]:
        """Every stored schedule, by name."""
        return [CronSchedule(name, expression, tz, _request_from_json(request),
                             _datetime_from_ms(next_fire), bool(enabled), last_error)
                for name, expression, tz, request, next_fire, enabled, last_error
                in self._db.read(self.SELECT_ALL)]

    def _next_fire_ms(self, names: set[str]) -> int | None:
        """When the earliest of the named schedules fires next."""
        fires = [at for name, at in self._db.read(self.NEXT_FIRES) if name in names]
        return min(fires, default=None)

    def _fire_due(self, names: set[str], router: Router | None) -> int:
        """Enqueue one job for each due tick of the named schedules; returns how many ticks
        this process fired (ticks another process fired first are skipped)."""
        fired = 0
        while True:
            now = self._db.clock_ms()
            due = [row for row in self._db.read(self.SELECT_DUE, (now,)) if row[0] in names]
            if not due:
                return fired
            for name, expression, tz, request, tick in due:
                fired += self._fire(name, expression, tz, request, tick, router)

    def _expression(self, expression: str, tz: str | None) -> CronExpression:
        parsed = self._parsed.get((expression, tz))
        if parsed is None:
            parsed = self._parsed[(expression, tz)] = CronExpression(expression, tz)
        return parsed

    def _fire(self, name: str, expression: str, tz: str | None, request_json: str, tick: int,
              router: Router | None) -> int:
        now = self._db.clock_ms()
        missed = now - tick > self.MISSED_AFTER_MS
        following_ms: int | None = None
        request, error = None, None
        try:
            following = self._expression(expression, tz).next_after(
                datetime.fromtimestamp((now if missed else tick) / 1000, timezone.utc))
            following_ms = None if following is None else int(following.timestamp() * 1000)
            request = _request_from_json(request_json, (now if missed else tick) / 1000)
        except Exception as exc:    # a bad stored schedule: record it
            error = f"{type(exc).__name__}: {exc}"

        def fire(conn: apsw.Connection) -> tuple[int, str | None]:
            conn.execute(self.ADVANCE, (name, tick, following_ms, error))
            if not conn.changes():
                return 0, None      # another process fired this tick
            if request is None:
                return 1, error
            try:
                with conn:          # a savepoint: a failing router rolls back only the job
                    self._jobs.enqueue_in(conn, (request,), router)
            except Exception as exc:
                failure = f"{type(exc).__name__}: {exc}"
                conn.execute(self.SET_ERROR, (name, failure))
                return 1, failure
            return 1, None

        fired, failure = self._db.write(fire)
        if failure is not None:
            log.error("cron schedule %r cannot enqueue: %s", name, failure)
        elif fired and missed:
            log.info("cron schedule %r missed ticks since %s: ran once for the window",
                     name, _iso_from_ms(tick))
        return fired


# ------------------------------------------------------------ PostgreSQL ----
#
# The same queue on a PostgreSQL server, for workers on several machines. psycopg 3 and
# psycopg_pool (`pip install 'sqliteq[postgres]'`) are imported only when a URL is opened.
# Most statements above are written in the SQL both databases speak, with `?N` parameters
# that _pg_statement turns into PostgreSQL's `$N`; the store classes below replace the few
# that cannot be shared (the claim's row locks, JSON editing, casts). What differs:
#
# * no writer lock: transactions run side by side at READ COMMITTED, so claims skip rows
#   other claims locked (FOR UPDATE SKIP LOCKED), and what SQLite's single writer made
#   atomic (a heartbeat's progress clock, a rate-limit bucket, a global concurrency limit)
#   takes a transaction-scoped advisory lock (`_serialize`);
# * the database's clock, not each host's, judges leases, heartbeats and rate limits;
# * every write transaction sends a NOTIFY that fires on commit; a listener thread per
#   process turns other processes' notifications into the `data_version` a dispatcher
#   reads, and wakes it at once (polling stays, as a fallback);
# * connections come from a pool per Storage, not one per thread.

_PG_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")

# Like MIGRATIONS, for PostgreSQL; serialised by an advisory lock, so that many hosts
# starting at once migrate the schema once. Steps are never edited once released.
_PG_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE jobs (
            id               text COLLATE "C" PRIMARY KEY,
            queue            text COLLATE "C" NOT NULL,
            state            text NOT NULL CHECK (state IN ('queued', 'scheduled', 'running',
                                                            'done', 'failed', 'cancelled')),
            priority         bigint NOT NULL DEFAULT 0,
            run_at           bigint NOT NULL,
            attempt          integer NOT NULL DEFAULT 0,
            max_attempts     integer NOT NULL DEFAULT 5,
            lease            bigint,
            cancel_requested integer NOT NULL DEFAULT 0,
            created_at       bigint NOT NULL,
            started_at       bigint,
            finished_at      bigint,
            host             text COLLATE "C",
            worker           text,
            unique_key       text,
            kind             text COLLATE "C" NOT NULL,
            payload          text NOT NULL,
            result           text,
            errors           text
        )""",
        "CREATE INDEX jobs_claim ON jobs (queue, priority, run_at, id) WHERE state = 'queued'",
        "CREATE INDEX jobs_due ON jobs (queue, run_at) WHERE state = 'scheduled'",
        ("CREATE UNIQUE INDEX jobs_unique_active ON jobs (unique_key) WHERE unique_key"
         " IS NOT NULL AND state IN ('queued', 'scheduled', 'running')"),
        "CREATE INDEX jobs_running ON jobs (host, queue) WHERE state = 'running'",
        ("CREATE INDEX jobs_finished ON jobs (state, finished_at)"
         " WHERE state IN ('done', 'failed', 'cancelled')"),
        """CREATE TABLE queues (
            name             text COLLATE "C" PRIMARY KEY,
            paused           integer NOT NULL DEFAULT 0,
            concurrency      integer,
            backoff_base_ms  bigint NOT NULL DEFAULT 1000,
            backoff_cap_ms   bigint NOT NULL DEFAULT 3600000,
            cooldown_until   bigint NOT NULL DEFAULT 0,
            retain_done_ms   bigint NOT NULL DEFAULT 604800000,
            retain_failed_ms bigint NOT NULL DEFAULT 2592000000
        )""",
        """CREATE TABLE processes (
            host_id               text COLLATE "C" PRIMARY KEY,
            hostname              text NOT NULL,
            pid                   integer NOT NULL,
            queues                text NOT NULL,
            started_at            bigint NOT NULL,
            heartbeat_at          bigint NOT NULL,
            lease_timeout_ms      bigint NOT NULL DEFAULT 30000,
            progress_at           bigint NOT NULL DEFAULT 0,
            heartbeat_interval_ms bigint NOT NULL DEFAULT 1000
        )""",
        """CREATE TABLE cron (
            name         text COLLATE "C" PRIMARY KEY,
            expression   text NOT NULL,
            timezone     text,
            request      text NOT NULL,
            next_fire_at bigint,
            enabled      integer NOT NULL DEFAULT 1,
            last_error   text
        )""",
        """CREATE TABLE rate_limits (
            scope          text COLLATE "C" PRIMARY KEY,
            capacity       double precision NOT NULL,
            refill_per_sec double precision NOT NULL,
            tokens         double precision NOT NULL,
            updated_at     bigint NOT NULL
        )""",
        """CREATE TABLE chores (
            name        text COLLATE "C" PRIMARY KEY,
            last_run_at bigint NOT NULL
        )""",
    ),
    (
        "ALTER TABLE jobs ADD COLUMN timeout_ms bigint, ADD COLUMN progress text",
    ),
    (
        """CREATE TABLE metrics (
            minute         bigint NOT NULL,
            queue          text COLLATE "C" NOT NULL,
            kind           text COLLATE "C" NOT NULL,
            done           bigint NOT NULL,
            failed         bigint NOT NULL,
            retried        bigint NOT NULL,
            cancelled      bigint NOT NULL,
            run_count      bigint NOT NULL,
            run_sum_us     bigint NOT NULL,
            run_max_us     bigint NOT NULL,
            run_histogram  text NOT NULL,
            wait_count     bigint NOT NULL,
            wait_sum_us    bigint NOT NULL,
            wait_max_us    bigint NOT NULL,
            wait_histogram text NOT NULL,
            PRIMARY KEY (minute, queue, kind)
        )""",
        """CREATE TABLE metrics_totals (
            queue       text COLLATE "C" NOT NULL,
            kind        text COLLATE "C" NOT NULL,
            done        bigint NOT NULL,
            failed      bigint NOT NULL,
            retried     bigint NOT NULL,
            cancelled   bigint NOT NULL,
            run_count   bigint NOT NULL,
            run_sum_us  bigint NOT NULL,
            wait_count  bigint NOT NULL,
            wait_sum_us bigint NOT NULL,
            PRIMARY KEY (queue, kind)
        )""",
    ),
    (
        "CREATE INDEX jobs_failed ON jobs (queue, kind) WHERE state = 'failed'",
    ),
    (
        # Dependencies, as in MIGRATIONS.
        """ALTER TABLE jobs DROP CONSTRAINT jobs_state_check,
               ADD CONSTRAINT jobs_state_check CHECK (state IN (
                   'waiting', 'queued', 'scheduled', 'running', 'done', 'failed', 'cancelled')),
               ADD COLUMN waiting_on integer NOT NULL DEFAULT 0,
               ADD COLUMN allow_parent_failure integer NOT NULL DEFAULT 0,
               ADD COLUMN has_parents integer NOT NULL DEFAULT 0""",
        "DROP INDEX jobs_unique_active",
        ("CREATE UNIQUE INDEX jobs_unique_active ON jobs (unique_key) WHERE unique_key"
         " IS NOT NULL AND state IN ('waiting', 'queued', 'scheduled', 'running')"),
        """CREATE TABLE job_deps (
            parent   text COLLATE "C" NOT NULL,
            child    text COLLATE "C" NOT NULL,
            settled  integer NOT NULL DEFAULT 0,
            position integer NOT NULL,
            PRIMARY KEY (parent, child)
        )""",
        "CREATE INDEX job_deps_child ON job_deps (child, position)",
    ),
)

_PG_PARAMETER = re.compile(r"\?(\d*)")


@functools.lru_cache(maxsize=512)
def _pg_statement(statement: str) -> str:
    """A statement with SQLite's parameters (`?N`, or `?` counted from the left) written
    as PostgreSQL's `$N`. (No statement of sqliteq has a `?` inside a string literal.)"""
    counter = itertools.count(1)
    return _PG_PARAMETER.sub(lambda m: f"${m.group(1) or next(counter)}", statement)


def _is_pg_url(target: Any) -> bool:
    return isinstance(target, str) and target.startswith(("postgresql://", "postgres://"))


def _redacted_url(url: str) -> str:
    """The URL without its password (given before the host or as `?password=`), for
    messages and logs."""
    url = re.sub(r"(://[^:/@]+):[^@/]*@", r"\1:***@", url)
    return re.sub(r"([?&]password=)[^&]*", r"\1***", url)


def _without_password(message: str, url: str) -> str:
    """`message` (a server's or libpq's) with any copy of `url`'s password masked."""
    found = (re.search(r"://[^:/@]+:([^@/]+)@", url)
             or re.search(r"[?&]password=([^&]+)", url))
    return message.replace(found.group(1), "***") if found else message


class _PgTransaction:
    """A PostgreSQL transaction seen through the part of apsw.Connection that sqliteq's
    statements use: execute, executemany, changes, and `with` for a savepoint."""

    __slots__ = ("_conn", "_changes", "_savepoints", "_begun", "_pipelined", "notify")

    def __init__(self, conn: Any, pipelined: bool) -> None:
        self._conn = conn
        self._changes = 0
        self._savepoints = 0
        self._begun = False
        self._pipelined = pipelined     # libpq 14 and later can
        self.notify = True              # other processes hear of the commit

    def execute(self, statement: str, params: Sequence[Any] = ()) -> Any:
        cursor = self._run(_pg_statement(statement), params)
        self._changes = max(cursor.rowcount, 0)
        return cursor

    def executemany(self, statement: str, params: Iterable[Sequence[Any]]) -> None:
        if isinstance(params, Sequence) and len(params) == 1:
            self._run(_pg_statement(statement), params[0])
            return
        self._begin()
        self._conn.cursor().executemany(_pg_statement(statement), params)

    def copy_rows(self, statement: str, rows: Iterable[Sequence[Any]]) -> None:
        """COPY … FROM STDIN the rows."""
        self._begin()
        with self._conn.cursor().copy(statement) as copy:
            for row in rows:
                copy.write_row(row)

    def _run(self, statement: str, params: Sequence[Any]) -> Any:
        if self._begun:
            return self._conn.execute(statement, params)
        self._begun = True
        if not self._pipelined:
            self._conn.execute("BEGIN")
            return self._conn.execute(statement, params)
        # BEGIN and the first statement in one round trip (results are read at the sync).
        with self._conn.pipeline():
            self._conn.execute("BEGIN")
            return self._conn.execute(statement, params)

    def _begin(self) -> None:
        if not self._begun:
            self._begun = True
            self._conn.execute("BEGIN")

    def changes(self) -> int:
        """Rows the last `execute` changed."""
        return self._changes

    def __enter__(self) -> _PgTransaction:
        self._savepoints += 1
        self._run(f"SAVEPOINT s{self._savepoints}", ())
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        name = f"s{self._savepoints}"
        self._savepoints -= 1
        if exc_type is not None:
            self._conn.execute(f"ROLLBACK TO SAVEPOINT {name}")
        self._conn.execute(f"RELEASE SAVEPOINT {name}")

    def commit(self, notify_and_commit: str) -> None:
        """Send the NOTIFY (unless told not to) and COMMIT (BEGIN too, if the work ran no
        statement)."""
        statement = notify_and_commit if self.notify else "COMMIT"
        self._conn.execute(statement if self._begun else f"BEGIN; {statement}")


class _PostgresDatabase(_CommitNotices):
    """Database's counterpart on a PostgreSQL server: the same `write`, `read`,
    `after_commit`, `data_version` and clock, on a pool of connections.

    `write` runs its work in one transaction on a pooled connection. A serialization
    failure, a deadlock, a lock wait past `busy_timeout` or a connection lost before the
    COMMIT retries the whole transaction up to 3 times (jittered, as SQLite's busy errors
    are), then raises TransientError. A connection lost during the COMMIT is not retried:
    the write may have taken effect, and TransientError says so.
    """

    CLOCK = "SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint"
    CLOCK_RESYNC = 30.0     # seconds; clocks drift by far less than a millisecond in that
    # Writes by something other than sqliteq send no NOTIFY: waiters and dispatchers look
    # again this often all the same.
    UNSEEN_WRITES_POLL = 0.5
    # One round trip for both (a simple query, so no parameters: the channel is a checked
    # identifier, the token a ULID).
    NOTIFY_AND_COMMIT = "NOTIFY {channel}, '{token}'; COMMIT"
    WRITE_ALONE = ("WITH written AS ({statement} RETURNING 1)"
                   " SELECT n, CASE WHEN n > 0 THEN pg_notify('{channel}', '{token}') END"
                   " FROM (SELECT count(*) AS n FROM written) AS counted")

    def __init__(self, url: str, *, schema: str = "sqliteq", busy_timeout: float = 5.0,
                 pool_size: int = 10, create: bool = True) -> None:
        try:
            import psycopg
            import psycopg_pool
        except ImportError:
            raise ConfigError("a PostgreSQL URL needs psycopg 3 and psycopg_pool: "
                              "pip install 'sqliteq[postgres]'") from None
        if not isinstance(schema, str) or not _PG_SCHEMA_NAME.fullmatch(schema):
            raise InvalidInput(f"schema must be a lower-case PostgreSQL identifier "
                               f"(letters, digits, _), not {schema!r}")
        self._psycopg = psycopg
        self._pipelined = psycopg.Pipeline.is_supported()
        errors = psycopg.errors
        self.UNIQUE_VIOLATION = (errors.UniqueViolation,)
        # Worth a retry of the whole transaction: it may well work the next time.
        self._transient = (errors.SerializationFailure, errors.DeadlockDetected,
                           errors.LockNotAvailable, psycopg.OperationalError)
        self.url, self.schema = url, schema
        self.path = f"{_redacted_url(url)} (schema {schema})"
        self.durable = True
        busy_seconds = _duration_seconds(busy_timeout, "busy_timeout")
        # (At least 1 ms: PostgreSQL's lock_timeout 0 would wait for ever.)
        self.busy_timeout_ms = max(1, int(busy_seconds * 1000))
        self.channel = f"sqliteq_{schema}"
        self.application_name = f"sqliteq-{schema}"     # what pg_stat_activity shows
        self._token = _mint_ids(1)[0]   # this object's notifications carry it: not echoed
        self._notify_and_commit = self.NOTIFY_AND_COMMIT.format(channel=self.channel,
                                                                token=self._token)
        self._alone: dict[str, str] = {}     # _write_changes's statements, as sent
        self._local = threading.local()
        self._closed = False
        self._writes_committed = 0
        self._count_lock = threading.Lock()
        self._offset_ms, self._offset_due = 0, -math.inf   # measured once open
        super().__init__()
        self._remote_version = 0        # notifications from other processes seen
        self._subscribers: list[Callable[[], None]] = []
        self._listener: threading.Thread | None = None
        self._listener_lock = threading.Lock()
        self._pool = psycopg_pool.ConnectionPool(
            url, min_size=1, max_size=pool_size, open=False, configure=self._configure,
            kwargs={"autocommit": True, "cursor_factory": psycopg.RawCursor,
                    "application_name": self.application_name},
            name=f"sqliteq-{schema}")
        try:                    # one plain attempt first: a clear error, and at once
            psycopg.connect(url, connect_timeout=5).close()
            self._pool.open(wait=True, timeout=max(5.0, busy_seconds))
        except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
            self._pool.close()
            reason = " ".join(str(exc).split()) or "timed out"     # libpq's is multi-line
            raise StorageError(f"cannot connect to PostgreSQL at {self.path}: "
                               f"{_without_password(reason, url)}") from None
        try:
            version = self._schema_version()
            if version is None and not create:
                raise SchemaError(f"no sqliteq queue at {self.path}: it holds no sqliteq "
                                   f"tables")
            if version != len(_PG_MIGRATIONS):
                self.write(self._migrate)
            self._measure_offset(None)
        except BaseException:
            self._pool.close()
            raise

    def _configure(self, conn: Any) -> None:
        conn.execute(f"SET search_path TO {self.schema}")
        conn.execute(f"SET lock_timeout = {self.busy_timeout_ms:d}")

    def _schema_version(self) -> int | None:
        """The schema's migration step; None if it holds no sqliteq tables."""
        rows = self.read("SELECT to_regclass(?) IS NOT NULL", (f"{self.schema}.sqliteq_version",))
        if not rows[0][0]:
            return None
        rows = self.read(f"SELECT version FROM {self.schema}.sqliteq_version")
        return cast(int, rows[0][0]) if rows else 0

    def _migrate(self, tx: apsw.Connection) -> None:
        """Bring the schema to the last step, holding the schema's advisory lock. (Only
        run when the schema is behind: CREATE SCHEMA needs a privilege that a role which
        only uses the queue need not have.)"""
        tx.execute("SELECT pg_advisory_xact_lock(hashtext(?))", (f"sqliteq:{self.schema}",))
        tx.execute(f"CREATE SCHEMA IF NOT EXISTS {self.schema}")
        tx.execute("CREATE TABLE IF NOT EXISTS sqliteq_version (version integer NOT NULL)")
        rows = tx.execute("SELECT version FROM sqliteq_version").fetchall()
        version = cast(int, rows[0][0]) if rows else 0
        if version > len(_PG_MIGRATIONS):
            raise SchemaError(f"PostgreSQL schema {self.schema!r} has version {version}, newer "
                              f"than this sqliteq ({__version__}) understands "
                              f"({len(_PG_MIGRATIONS)}); upgrade sqliteq")
        for step in _PG_MIGRATIONS[version:]:
            for statement in step:
                tx.execute(statement)
        if not rows:
            tx.execute("INSERT INTO sqliteq_version VALUES (?)", (len(_PG_MIGRATIONS),))
        elif version < len(_PG_MIGRATIONS):
            tx.execute("UPDATE sqliteq_version SET version = ?", (len(_PG_MIGRATIONS),))

    # -- transactions --

    def write(self, work: Callable[[apsw.Connection], T]) -> T:
        """Run `work(tx)` in one transaction and return once it committed (see the class)."""
        def transaction(conn: Any) -> T:
            self._local.tx = tx = _PgTransaction(conn, self._pipelined)
            try:
                result = work(cast(apsw.Connection, tx))
            except BaseException:
                if not conn.closed:
                    with contextlib.suppress(Exception):
                        conn.execute("ROLLBACK")
                raise
            self._local.committing = True
            tx.commit(self._notify_and_commit)
            return result

        return self._committed(transaction)

    def _write_changes(self, statement: str, params: Sequence[Any], *,
                       repeatable: bool = False) -> int:
        """Run one INSERT, UPDATE or DELETE as a transaction of its own and return how many
        rows it changed: one statement in autocommit, its NOTIFY inside it (sent only if it
        changed a row), so one round trip where `write` takes two. A `repeatable` statement
        (a second run changes nothing the first did not) is retried even when the
        connection was lost while it ran."""
        alone = self._alone.get(statement)
        if alone is None:
            alone = self._alone[statement] = self.WRITE_ALONE.format(
                statement=_pg_statement(statement), channel=self.channel, token=self._token)

        def transaction(conn: Any) -> int:
            self._local.committing = not repeatable     # (it commits as it runs)
            return cast(int, conn.execute(alone, params).fetchall()[0][0])

        return self._committed(transaction)

    def _committed(self, transaction: Callable[[Any], T]) -> T:
        """`transaction(conn)` on a pooled connection, retried as the class says; then what
        follows every commit (after-commit callbacks, counts, waiters)."""
        if self._closed:
            raise SqliteqError("storage is closed")
        for delay in (*TRANSIENT_RETRY_DELAYS, None):
            self._local.committing = False
            after_commit: list[Callable[[], None]] = []
            self._local.after_commit = after_commit
            try:
                with self._pool.connection(timeout=self.busy_timeout_ms / 1000 + 5) as conn:
                    result = transaction(conn)
            except self._transient as exc:
                # A conflict the server reports rolled the transaction back; a connection
                # lost (or ended by the server) while committing leaves the outcome unknown.
                if self._local.committing and (exc.sqlstate is None
                                               or exc.sqlstate[:2] in ("08", "57")):
                    raise TransientError(f"the connection to {self.path} was lost during a "
                                         f"COMMIT: the write may or may not have taken effect "
                                         f"({exc})") from None
                if delay is None:
                    raise TransientError(f"{self.path}: the transaction failed through "
                                         f"{len(TRANSIENT_RETRY_DELAYS)} retries: {exc}") from None
                time.sleep(delay * random.uniform(0.5, 1.5))
                continue
            except self._pool_errors() as exc:
                raise StorageError(f"no PostgreSQL connection from the pool for {self.path} "
                                   f"({exc})") from None
            finally:
                self._local.after_commit = self._local.tx = None
            with self._count_lock:      # threads commit side by side here
                self._writes_committed += 1
            self._local.own_writes = getattr(self._local, "own_writes", 0) + 1
            for callback in after_commit:
                try:
                    callback()
                except Exception:
                    log.exception("an after-commit callback failed")
            if self._commit_waiters:
                self._announce_commit()
            return result
        raise AssertionError("unreachable")

    def _pool_errors(self) -> tuple[type[Exception], ...]:
        import psycopg_pool
        return (psycopg_pool.PoolTimeout, psycopg_pool.PoolClosed)

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Call `callback` once the write transaction the calling work runs in commits."""
        callbacks = getattr(self._local, "after_commit", None)
        if callbacks is None:
            raise SqliteqError("after_commit is for work run by Database.write")
        callbacks.append(callback)

    def read(self, statement: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """The rows of one statement, run outside any transaction."""
        if self._closed:
            raise SqliteqError("storage is closed")
        # A read has no effect to lose: a dropped connection is retried on another one.
        for delay in (*TRANSIENT_RETRY_DELAYS, None):
            try:
                with self._pool.connection(timeout=self.busy_timeout_ms / 1000 + 5) as conn:
                    return cast("list[tuple[Any, ...]]",
                                conn.execute(_pg_statement(statement), params).fetchall())
            except self._psycopg.OperationalError as exc:
                if delay is None:
                    raise StorageError(f"cannot read from {self.path} ({exc})") from None
                time.sleep(delay * random.uniform(0.5, 1.5))
            except self._pool_errors() as exc:
                raise StorageError(f"no PostgreSQL connection from the pool for {self.path} "
                                   f"({exc})") from None
        raise AssertionError("unreachable")

    # -- what differs between stores --

    def clock_ms(self, conn: apsw.Connection | None = None) -> int:
        """Now, by the server's clock: hosts whose clocks disagree still agree on it. In a
        transaction (`conn`), the server is asked; otherwise this host's clock is corrected
        by its offset from the server's, measured every CLOCK_RESYNC seconds."""
        if conn is not None:
            return cast(int, conn.execute(self.CLOCK).fetchall()[0][0])
        if time.monotonic() >= self._offset_due:
            self._measure_offset(getattr(self._local, "tx", None))
        return now_ms() + self._offset_ms

    def _measure_offset(self, tx: _PgTransaction | None) -> None:
        # Within a transaction, on its own connection: asking the pool for a second one
        # would deadlock a pool that every thread holds a connection of.
        def ask() -> int:
            rows = self.read(self.CLOCK) if tx is None else tx.execute(self.CLOCK).fetchall()
            return cast(int, rows[0][0])

        # The server read its clock somewhere in the round trip: assume halfway, and trust
        # the shortest of three round trips (the others may include a slow checkout).
        samples = []
        for _ in range(3):
            before = time.time_ns()
            server = ask()
            after = time.time_ns()
            samples.append((after - before, server - (before + after) / 2e6))
        self._offset_ms = round(min(samples)[1])
        self._offset_due = time.monotonic() + self.CLOCK_RESYNC

    def _serialize(self, conn: apsw.Connection, what: str) -> None:
        """Make the calling transaction the only one doing `what` until it commits."""
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(?))",
                     (f"sqliteq:{self.schema}:{what}",))

    def _unannounced(self, conn: apsw.Connection) -> None:
        """Commit the calling transaction without its NOTIFY: every host's heartbeat would
        otherwise wake every other host's dispatcher and waiters, each beat."""
        cast(_PgTransaction, conn).notify = False

    def _wal_size(self) -> int:
        return 0                        # the server manages its own log

    # -- noticing other processes' commits --

    def data_version(self) -> int:
        """Moves whenever another thread or process commits a write to the schema (as far
        as other processes' notifications have arrived), as SQLite's does for another
        connection."""
        self._listen()
        return (self._remote_version + self._writes_committed
                - getattr(self._local, "own_writes", 0))

    def _subscribe(self, callback: Callable[[], None]) -> None:
        """Call `callback` (on the listener thread) when another process commits."""
        self._listen()
        self._subscribers.append(callback)

    def _unsubscribe(self, callback: Callable[[], None]) -> None:
        with contextlib.suppress(ValueError):
            self._subscribers.remove(callback)

    def _wait_for_change(self, timeout: float) -> None:
        """Sleep until a write commits here or in another process, or `timeout` passes."""
        self._listen()
        super()._wait_for_change(timeout)

    def _listen(self) -> None:
        with self._listener_lock:
            if self._listener is None and not self._closed:
                self._listener = threading.Thread(
                    target=_PostgresDatabase._listen_loop, args=(weakref.ref(self),),
                    daemon=True, name=f"sqliteq-listen-{self.schema}")
                self._listener.start()

    @staticmethod
    def _listen_loop(ref: weakref.ref[_PostgresDatabase]) -> None:
        """LISTEN on a connection of its own; reconnect after losing it (and count that as
        a change: notifications may have been missed meanwhile). The loop holds the
        database only while it handles a notification, so a Storage dropped unclosed is
        still collected, and this thread then ends."""
        pause = 0.1
        while (db := ref()) is not None and not db._closed:
            url, channel, token, path = db.url, db.channel, db._token, db.path
            connect, application_name = db._psycopg.connect, db.application_name
            del db
            try:
                with connect(url, autocommit=True, connect_timeout=10,
                             application_name=application_name) as conn:
                    conn.execute(f"LISTEN {channel}")
                    pause = 0.1
                    changed = True
                    while True:
                        if (db := ref()) is None or db._closed:
                            return
                        if changed:
                            db._remote_changed()
                        del db
                        changed = any(note.payload != token
                                      for note in conn.notifies(timeout=0.5, stop_after=1))
            except Exception as exc:
                if (db := ref()) is None or db._closed:
                    return
                del db
                log.warning("listening for commits on %s failed (%s); polling until it "
                            "reconnects", path, exc)
                time.sleep(pause)
                pause = min(pause * 2, MAX_ERROR_BACKOFF)

    def _remote_changed(self) -> None:
        self._remote_version += 1
        self._announce_commit()
        for callback in tuple(self._subscribers):
            try:
                callback()
            except Exception:
                log.exception("a commit subscriber failed")

    def close(self) -> None:
        """Close the pool and stop listening. Safe to call twice."""
        with self._listener_lock:       # no listener starts after this
            self._closed = True
        self._pool.close()
        if self._listener is not None and self._listener is not threading.current_thread():
            self._listener.join(2.0)    # (a listener still connecting ends once it has)


# Parts of the jobs table's rows that SQLite reads as bytes (see _JOB_COLUMNS) are text here.
_PG_JOB_COLUMNS = ("id, kind, queue, payload, state, priority, run_at, attempt, max_attempts,"
                   " unique_key, result, errors, created_at, started_at, finished_at, worker,"
                   " host, cancel_requested, timeout_ms, progress, waiting_on, CASE WHEN"
                   " has_parents = 1 THEN (SELECT json_agg(parent ORDER BY position)::text"
                   " FROM job_deps WHERE child = jobs.id) END")


class _PgJobStore(_JobStore):
    """The job store on PostgreSQL: _JobStore's statements, with these replaced."""

    # New jobs without unique keys stream in by COPY: far cheaper per row than INSERTs.
    COPY_NEW = f"COPY jobs ({', '.join(_NewJob._fields)}) FROM STDIN"

    def insert(self, conn: apsw.Connection, jobs: Sequence[_NewJob]) -> list[EnqueueOutcome]:
        if len(jobs) < 2 or any(builtins.map(_unique_key_of, jobs)):
            return super().insert(conn, jobs)
        cast(_PgTransaction, conn).copy_rows(self.COPY_NEW, jobs)
        return _created(jobs)

    SELECT_ONE = f"SELECT {_PG_JOB_COLUMNS} FROM jobs WHERE id = ?"
    LIST = f"SELECT {_PG_JOB_COLUMNS} FROM jobs WHERE {_JobStore.LIST_FILTER}"
    # The parents stay locked until the links commit: a parent ending meanwhile, in a
    # transaction beside this one, would settle its links before they exist. (SQLite's
    # single writer orders the two.)
    PARENT_STATES = ("SELECT id, state FROM jobs"
                     " WHERE id IN (SELECT json_array_elements_text(CAST(?1 AS json)))"
                     " ORDER BY id FOR SHARE")
    PARENT_RESULTS = ("SELECT d.parent, j.state, j.result FROM job_deps d"
                      " JOIN jobs j ON j.id = d.parent WHERE d.child = ? ORDER BY d.position")
    EXISTING_IDS = ("SELECT id FROM jobs"
                    " WHERE id IN (SELECT json_array_elements_text(CAST(?1 AS json)))")
    OF_QUEUE = "SELECT id, state, payload FROM jobs WHERE queue = ? ORDER BY id"
    ENDED_LINKS = ("SELECT d.parent, d.child, p.state, c.allow_parent_failure FROM job_deps d"
                   " JOIN jobs p ON p.id = d.parent JOIN jobs c ON c.id = d.child"
                   " WHERE d.parent IN (SELECT json_array_elements_text(CAST(?1 AS json)))"
                   " AND d.settled = 0 AND p.state IN ('done', 'failed', 'cancelled')"
                   " AND c.state = 'waiting'")
    DELETE_LINKS_OF = ("DELETE FROM job_deps"
                       " WHERE child IN (SELECT json_array_elements_text(CAST(?1 AS json)))")
    ENDED_AMONG = ("SELECT id, state, result, errors FROM jobs"
                   " WHERE id IN (SELECT json_array_elements_text(CAST(?1 AS json)))"
                   " AND state IN ('done', 'failed', 'cancelled')")
    # Claims running at once skip each other's rows instead of waiting for them.
    CLAIM = """
        UPDATE jobs SET state = 'running', attempt = attempt + 1, lease = ?1, host = ?2,
                        worker = NULL, started_at = ?3, cancel_requested = 0, progress = NULL
        WHERE id IN (SELECT id FROM jobs WHERE queue = ?4 AND state = 'queued'
                     ORDER BY priority, run_at, id LIMIT ?5 FOR UPDATE SKIP LOCKED)
        RETURNING id, kind, payload, attempt, max_attempts, errors, priority, run_at,
                  timeout_ms"""
    # SQLite's UPDATE OR IGNORE skips the rows that would break a unique key; here the
    # statement leaves out, per key, all but the newest failed job, and any key an active
    # job holds.
    RETRY_FAILED = """
        UPDATE jobs SET state = 'queued', attempt = 0, run_at = ?2, started_at = NULL,
                        finished_at = NULL, worker = NULL, host = NULL, result = NULL,
                        cancel_requested = 0, lease = NULL
        WHERE state = 'failed' AND (CAST(?1 AS TEXT) IS NULL OR queue = ?1)
          AND (CAST(?3 AS TEXT) IS NULL OR kind = ?3)
          AND (unique_key IS NULL OR (
              id = (SELECT max(f.id) FROM jobs f WHERE f.unique_key = jobs.unique_key
                    AND f.state = 'failed' AND (CAST(?1 AS TEXT) IS NULL OR f.queue = ?1)
                    AND (CAST(?3 AS TEXT) IS NULL OR f.kind = ?3))
              AND NOT EXISTS (SELECT 1 FROM jobs a WHERE a.unique_key = jobs.unique_key
                              AND a.state IN ('waiting', 'queued', 'scheduled',
                                              'running'))))"""
    def retry_failed(self, conn: apsw.Connection, queue: str | None, kind: str | None,
                     now: int) -> int:
        # A job that takes a key after the statement began (committed after its snapshot)
        # breaks the unique index: then the statement goes again, and sees that job.
        while True:
            try:
                with conn:              # (a savepoint: the failed try leaves nothing)
                    return super().retry_failed(conn, queue, kind, now)
            except self._db.UNIQUE_VIOLATION:
                continue

    RESCUE = """
        UPDATE jobs SET
            state = CASE WHEN cancel_requested = 1 THEN 'cancelled'
                         WHEN attempt >= max_attempts THEN 'failed' ELSE 'queued' END,
            finished_at = CASE WHEN cancel_requested = 1 OR attempt >= max_attempts
                               THEN ?1::bigint END,
            run_at = ?1, lease = NULL, cancel_requested = 0,
            errors = (SELECT CASE WHEN jsonb_array_length(e) > ?3 THEN (e - 0)::text
                                  ELSE e::text END
                      FROM (SELECT coalesce(errors, '[]')::jsonb || jsonb_build_array(
                          jsonb_build_object('at', ?2::text, 'attempt', attempt,
                              'error', 'worker lost: host ' || host || ' stopped heartbeating',
                              'traceback', NULL)) AS e) AS appended)
        WHERE state = 'running' AND host NOT IN (
            SELECT host_id FROM processes WHERE progress_at >= ?4 - lease_timeout_ms)
        RETURNING id"""


class _PgRateLimits(RateLimits):
    """Token buckets on PostgreSQL (greatest/least are its n-ary max and min)."""

    CONFIGURE = """
        INSERT INTO rate_limits (scope, capacity, refill_per_sec, tokens, updated_at)
        VALUES (?1, ?2, ?3, ?2, ?4)
        ON CONFLICT (scope) DO UPDATE SET
            capacity = ?2, refill_per_sec = ?3,
            updated_at = greatest(rate_limits.updated_at, ?4),
            tokens = least(?2, rate_limits.capacity, rate_limits.tokens
                           + greatest(0, ?4 - rate_limits.updated_at) / 1000.0
                             * rate_limits.refill_per_sec)"""


def _pg_merged_histogram(column: str) -> str:
    return f"""coalesce((SELECT jsonb_object_agg(key, n)::text FROM (
                SELECT key, sum(value::bigint) AS n FROM (
                    SELECT key, value FROM jsonb_each_text(metrics.{column}::jsonb) UNION ALL
                    SELECT key, value FROM jsonb_each_text(excluded.{column}::jsonb)) AS b
                GROUP BY key) AS m), '{{}}')"""


class _PgMetrics(Metrics):
    """Metrics on PostgreSQL: the same merge, in its functions."""

    UPSERT = _metrics_upsert("greatest", _pg_merged_histogram)


# ------------------------------------------------- Copying between stores ----

class _CopiedTable(NamedTuple):
    """A table that Storage.copy_to copies: its key, the other columns copied, and which
    rows. (Leases, hosts, heartbeats and chores belong to one store's processes: not
    copied.) Both stores name and order these columns alike."""

    name: str
    key: str
    columns: str
    rows: str = "TRUE"
    cursor: str = ""            # what orders the pages, if not the key (alone not unique)

    def select_page(self) -> str:
        """The next rows after a cursor (?1), at most ?2 of them, in cursor order: the
        cursor first, then the row."""
        cursor = self.cursor or self.key
        return (f"SELECT {cursor}, {self.key}, {self.columns} FROM {self.name}"
                f" WHERE ({self.rows}) AND {cursor} > ?1 ORDER BY {cursor} LIMIT ?2")

    def insert_new(self) -> str:
        """Insert one row unless the table has its key (or, for jobs, an active job has its
        unique key)."""
        marks = ", ".join("?" * (self.columns.count(",") + 2))
        return (f"INSERT INTO {self.name} ({self.key}, {self.columns}) VALUES ({marks})"
                f" ON CONFLICT DO NOTHING")


_COPIED_TABLES = (
    _CopiedTable("queues", "name", "paused, concurrency, backoff_base_ms, backoff_cap_ms,"
                 " cooldown_until, retain_done_ms, retain_failed_ms"),
    _CopiedTable("cron", "name", "expression, timezone, request, next_fire_at, enabled,"
                 " last_error"),
    _CopiedTable("rate_limits", "scope", "capacity, refill_per_sec, tokens, updated_at"),
    # Unfinished jobs, with their ids, attempts, errors and pending cancel requests.
    _CopiedTable("jobs", "id", "kind, queue, payload, state, priority, run_at, attempt,"
                 " max_attempts, unique_key, errors, created_at, cancel_requested, timeout_ms,"
                 " waiting_on, allow_parent_failure, has_parents",
                 "state IN ('waiting', 'queued', 'scheduled')"),
    # The parents of those jobs (ids are of one length: the concatenation orders the edges).
    _CopiedTable("job_deps", "child", "parent, settled, position",
                 "child IN (SELECT id FROM jobs WHERE state = 'waiting')", "child || parent"),
)


@dataclass(frozen=True, slots=True)
class CopyReport:
    """What Storage.copy_to copied (with `dry_run`, would copy), by table. `kept` counts
    the rows the destination already had by key (or, for a job, an active job there with
    its unique key): those were left as they are."""

    queues: int
    cron_schedules: int
    rate_limits: int
    jobs: int
    kept: int
    dry_run: bool
    dependencies: int = 0       # parent-child links of the waiting jobs copied


class _RolledBack(Exception):
    """Ends a dry run's transaction, carrying what it would have written."""

    def __init__(self, rows: int) -> None:
        super().__init__(rows)
        self.rows = rows


def _insert_new_rows(statement: str, rows: list[tuple[Any, ...]], dry_run: bool,
                     conn: apsw.Connection) -> int:
    inserted = 0
    for row in rows:
        conn.execute(statement, row)
        inserted += conn.changes()
    if dry_run:
        raise _RolledBack(inserted)
    return inserted


def _copy_table(source: Database, destination: Database, table: _CopiedTable,
                dry_run: bool, chunk: int) -> tuple[int, int]:
    """Copy a table's rows page by page, one destination transaction per page (the
    destination's workers are not held up for the whole copy). Returns (copied, kept)."""
    select, insert = table.select_page(), table.insert_new()
    after, copied, kept = "", 0, 0
    while page := source.read(select, (after, chunk)):
        rows = [row[1:] for row in page]
        try:
            inserted = destination.write(functools.partial(_insert_new_rows, insert, rows,
                                                           dry_run))
        except _RolledBack as rolled_back:
            inserted = rolled_back.rows
        copied, kept, after = copied + inserted, kept + len(rows) - inserted, page[-1][0]
    return copied, kept


# --------------------------------------------------------------- Storage ----

class Storage:
    """The database file (or PostgreSQL schema) and everything stored in it.

    `path` is a SQLite file, or a `postgresql://` URL: the same API then runs on that server,
    with its tables in the PostgreSQL schema `schema` (default "sqliteq"; created if needed)
    and at most `pool_size` connections per Storage (needs `pip install 'sqliteq[postgres]'`).

    Opening creates the file (or schema) if needed and migrates it; with `create=False`, a
    missing one is a SchemaError instead. Thread-safe: share one Storage
    between threads; each thread gets its own connection. `durable=True` makes every commit
    durable on return (synchronous=FULL). `busy_timeout` is how long one attempt waits for
    another process's writer lock; a write gives up after 4 attempts (see `TransientError`).
    `vfs` names a registered SQLite VFS (apsw.VFS) to open the file through, e.g. a
    fault-injecting shim in tests.
    """

    def __init__(self, path: str | os.PathLike[str], *, durable: bool = False,
                 busy_timeout: float = 5.0, vfs: str | None = None, schema: str | None = None,
                 pool_size: int = 10, create: bool = True) -> None:
        if _is_pg_url(path):
            if vfs is not None:
                raise InvalidInput("vfs names a SQLite VFS: it does not apply to PostgreSQL")
            if not isinstance(pool_size, int) or isinstance(pool_size, bool) or pool_size < 1:
                raise InvalidInput(f"pool_size must be a positive integer, not {pool_size!r}")
            # (Duck-typed: _PostgresDatabase offers what the classes below use of Database.)
            self.db = cast(Database, _PostgresDatabase(
                cast(str, path), schema="sqliteq" if schema is None else schema,
                busy_timeout=busy_timeout, pool_size=pool_size, create=create))
            self._store: _JobStore = _PgJobStore(self.db)
            self.rate_limits: RateLimits = _PgRateLimits(self.db)
            self.metrics: Metrics = _PgMetrics(self.db)
        else:
            if schema is not None:
                raise InvalidInput("schema names a PostgreSQL schema: give a postgresql:// "
                                   "URL, or leave it out for a SQLite file")
            if not create and not os.path.exists(path):
                raise SchemaError(f"no sqliteq queue at {os.fspath(path)}: the file does "
                                  f"not exist")
            self.db = Database(path, durable=durable, busy_timeout=busy_timeout, vfs=vfs)
            self._store = _JobStore(self.db)
            self.rate_limits = RateLimits(self.db)
            self.metrics = Metrics(self.db)
        self.path = self.db.path
        self.jobs = Jobs(self.db, self._store)
        self.queues = Queues(self.db, self._store)
        self.processes = Processes(self.db, self._store)
        self.cron = CronSchedules(self.db, self.jobs)

    COPY_CHUNK = 1000       # rows per transaction of a copy

    def copy_to(self, destination: Storage, *, dry_run: bool = False, force: bool = False
                ) -> CopyReport:
        """Copy the queues (and their settings), cron schedules, rate limits and unfinished
        jobs (same ids, attempts and errors) into `destination`: another SQLite file or
        PostgreSQL schema, of either kind. Rows the destination already has are kept, so
        a copy can be run again to pick up jobs enqueued here since.

        Refused while jobs run here (stop the workers first: a graceful stop hands their
        jobs back) and, unless `force`, when the destination already holds jobs.
        `dry_run` counts what would be copied and writes nothing.
        """
        if os.path.realpath(destination.path) == os.path.realpath(self.path):  # (URLs too)
            raise InvalidInput(f"cannot copy {self.path} onto itself")
        running = self.jobs.counts()["running"]
        if running:
            raise InvalidInput(f"{running} job(s) are running in {self.path}: stop its "
                               f"workers first (a graceful stop hands their jobs back)")
        held = sum(destination.jobs.counts().values())
        if held and not force:
            raise InvalidInput(f"{destination.path} already holds {held} job(s); copy into "
                               f"it anyway with force=True (--force): rows it has are kept")
        copied, kept = [], 0
        for table in _COPIED_TABLES:
            rows, rows_kept = _copy_table(self.db, destination.db, table, dry_run,
                                          self.COPY_CHUNK)
            copied.append(rows)
            kept += rows_kept
        queues, cron_schedules, rate_limits, jobs, dependencies = copied
        return CopyReport(queues, cron_schedules, rate_limits, jobs, kept, dry_run, dependencies)

    def close(self) -> None:
        """Close all connections. The Storage cannot be used afterwards."""
        self.db.close()

    def __enter__(self) -> Storage:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Storage({self.path!r})"


# --------------------------------------------------------------- Routing ----

class Router(Protocol):
    """Chooses the queue for a request whose `queue_name` is None."""

    def route(self, kind: str) -> str:
        """The queue for jobs of `kind`."""
        ...


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


# -------------------------------------------------------- Handler context ----

class _ProgressReports:
    """The latest `ctx.progress` of each running job of a runtime, until one of the
    runtime's commits (a dispatcher round or a heartbeat) stores it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._latest: dict[tuple[str, int], str] = {}

    def report(self, job_id: str, lease: int, progress: str) -> None:
        with self._lock:
            self._latest[job_id, lease] = progress

    def take(self) -> list[_ProgressReport]:
        if not self._latest:            # (a report coming in now rides the next commit)
            return []
        with self._lock:
            latest, self._latest = self._latest, {}
        return [_ProgressReport(job_id, lease, progress)
                for (job_id, lease), progress in latest.items()]

    def restore(self, reports: Iterable[_ProgressReport]) -> None:
        """The commit that carried `reports` failed: keep them, unless newer ones came."""
        with self._lock:
            for job_id, lease, progress in reports:
                self._latest.setdefault((job_id, lease), progress)


def _progress_json(done: float, total: float | None, note: str | None) -> str:
    for value, what in ((done, "done"), (total, "total")):
        if (value is not None or what == "done") and not (
                isinstance(value, (int, float)) and not isinstance(value, bool)
                and math.isfinite(value) and value >= 0):
            raise InvalidInput(f"progress {what} must be a finite number >= 0, not {value!r}")
    if note is not None:
        if not isinstance(note, str) or len(note) > MAX_PROGRESS_NOTE:
            raise InvalidInput(f"a progress note must be a string of at most "
                               f"{MAX_PROGRESS_NOTE} characters")
        _check_text(note, "progress note")
    return _json_encode([done, total, note])


class JobCtx:
    """What a handler knows about the job it runs, and how it enqueues follow-up work."""

    __slots__ = ("storage", "router", "rate_limit", "job_id", "process_id", "host_id", "cancel",
                 "attempt", "kind", "queue", "_lease", "_reports")

    def __init__(self, storage: Storage, router: Router, rate_limit: RateLimiter, job_id: str,
                 process_id: str, host_id: str, cancel: CancellationToken, attempt: int,
                 kind: str, queue: str, *, _lease: int = 0,
                 _reports: _ProgressReports | None = None) -> None:
        self.storage = storage
        self.router = router
        self.rate_limit = rate_limit
        self.job_id = job_id
        self.process_id = process_id
        self.host_id = host_id
        self.cancel = cancel
        self.attempt = attempt
        self.kind = kind
        self.queue = queue
        self._lease, self._reports = _lease, _reports

    def progress(self, done: float, total: float | None = None, note: str | None = None
                 ) -> None:
        """Report how far the job has come (`done` of `total`, with an optional note). Cheap
        enough to call per item: only the latest report is kept, and it is stored by the
        runtime's next commit (within a heartbeat interval); `jobs.get` shows it."""
        progress = _progress_json(done, total, note)
        if self._reports is not None:       # None: a context made by hand, in a test
            self._reports.report(self.job_id, self._lease, progress)

    def parent_results(self) -> dict[str, Any]:
        """What this job's parents (its depends_on) returned: parent id -> result."""
        return self.storage.jobs.parent_results(self.job_id)

    def enqueue(self, request: EnqueueRequest) -> EnqueueOutcome:
        """Enqueue a follow-up job through the runtime's router (lock contention is retried
        3 times, as every write is)."""
        return self.storage.jobs.enqueue(request, self.router)

    def enqueue_bulk(self, requests: Iterable[EnqueueRequest]) -> list[EnqueueOutcome]:
        """Enqueue many follow-up jobs in one transaction (one writer-lock hold)."""
        return self.storage.jobs.enqueue_bulk(requests, self.router)

    async def aenqueue(self, request: EnqueueRequest) -> EnqueueOutcome:
        """`enqueue` for async handlers: the write runs in a thread."""
        return await self.storage.jobs.aenqueue(request, self.router)

    async def aenqueue_bulk(self, requests: Iterable[EnqueueRequest]) -> list[EnqueueOutcome]:
        """`enqueue_bulk` for async handlers: the write runs in a thread."""
        return await self.storage.jobs.aenqueue_bulk(requests, self.router)

    def __repr__(self) -> str:
        return f"JobCtx(job_id={self.job_id!r}, kind={self.kind!r}, attempt={self.attempt})"


# ---------------------------------------------------------------- Runtime ----

Handler = Callable[[JobCtx, Any], Any]
R = TypeVar("R")


class Task(Generic[R]):
    """A handler with its kind and its jobs' defaults, made by `@rt.task`: `.enqueue(payload)`
    queues a job of its kind through the runtime; calling it calls the function (for tests).
    """

    def __init__(self, fn: Callable[[JobCtx, Any], R], kind: str,
                 enqueue: Callable[[EnqueueRequest], EnqueueOutcome],
                 enqueue_bulk: Callable[[Iterable[EnqueueRequest]], list[EnqueueOutcome]],
                 defaults: dict[str, Any]) -> None:
        self.fn, self.kind = fn, kind
        self._enqueue, self._enqueue_bulk = enqueue, enqueue_bulk
        self._defaults = defaults
        functools.update_wrapper(self, fn)
        self.request()                      # the defaults are checked once, now

    def __call__(self, ctx: JobCtx, payload: Any) -> R:
        return self.fn(ctx, payload)

    def request(self, payload: Any = None, *, queue_name: str | None = None,
                priority: int | None = None, run_at: datetime | float | None = None,
                max_attempts: int | None = None, unique_key: str | None = None,
                timeout: timedelta | float | None = None) -> EnqueueRequest:
        """The EnqueueRequest for one job: the task's defaults, but for what is given. (A
        `timeout` given here is the job's own; the task's is its handler's.)"""
        given = {"queue_name": queue_name, "priority": priority, "run_at": run_at,
                 "max_attempts": max_attempts, "unique_key": unique_key, "timeout": timeout}
        return EnqueueRequest(self.kind, payload, **{
            **self._defaults, **{name: value for name, value in given.items()
                                 if value is not None}})

    def enqueue(self, payload: Any = None, *, queue_name: str | None = None,
                priority: int | None = None, run_at: datetime | float | None = None,
                max_attempts: int | None = None, unique_key: str | None = None,
                timeout: timedelta | float | None = None) -> EnqueueOutcome:
        """Enqueue one job of this task (committed when this returns); keywords override the
        task's defaults."""
        return self._enqueue(self.request(
            payload, queue_name=queue_name, priority=priority, run_at=run_at,
            max_attempts=max_attempts, unique_key=unique_key, timeout=timeout))

    def enqueue_bulk(self, payloads: Iterable[Any], *, queue_name: str | None = None,
                     priority: int | None = None) -> list[EnqueueOutcome]:
        """Enqueue one job per payload, in one transaction."""
        return self._enqueue_bulk(self.request(payload, queue_name=queue_name,
                                               priority=priority) for payload in payloads)

    async def aenqueue(self, payload: Any = None, *, queue_name: str | None = None,
                       priority: int | None = None, run_at: datetime | float | None = None,
                       max_attempts: int | None = None, unique_key: str | None = None,
                       timeout: timedelta | float | None = None) -> EnqueueOutcome:
        """`enqueue`, awaitable: the write runs in a thread."""
        import asyncio
        return await asyncio.to_thread(self._enqueue, self.request(
            payload, queue_name=queue_name, priority=priority, run_at=run_at,
            max_attempts=max_attempts, unique_key=unique_key, timeout=timeout))

    async def aenqueue_bulk(self, payloads: Iterable[Any], *, queue_name: str | None = None,
                            priority: int | None = None) -> list[EnqueueOutcome]:
        """`enqueue_bulk`, awaitable."""
        import asyncio
        return await asyncio.to_thread(self.enqueue_bulk, payloads, queue_name=queue_name,
                                       priority=priority)

    def __repr__(self) -> str:
        return f"Task({self.kind!r})"


# A queue of fast handlers claims ahead: beyond its free slots, as many jobs as its slots run
# in about PREFETCH_SECONDS (at most PREFETCH_PER_SLOT per slot). The extra jobs wait in
# memory, so workers are not idle while the dispatcher commits (a commit of a hundred
# finishes and claims takes milliseconds), and each commit carries more jobs. Slow handlers
# get no prefetch: a job never waits long in one process's buffer while another process has
# a free slot.
ABANDON_TIMEOUT = 10.0      # seconds stop() waits for the dispatcher to requeue stuck jobs
MAX_ERROR_BACKOFF = 5.0     # seconds a runtime loop waits at most between failed rounds
WORKER_EXIT_TIMEOUT = 1.0   # seconds stop() gives idle workers to exit, even after a timeout
PREFETCH_SECONDS = 0.005
PREFETCH_PER_SLOT = 128


class _Claimed(NamedTuple):
    """A job claimed by this process: running in the database, held by this runtime."""

    id: str
    kind: str
    payload: bytes                      # as stored: decoded (or found unreadable) when run
    attempt: int
    max_attempts: int
    errors: str | None
    lease: int
    queue: str
    token: CancellationToken
    timeout_ms: int | None              # the job's own time limit, if it has one
    run_at: int                         # where it stands in its queue (ms)
    waited: float                       # seconds from its run_at to its claim


class _Ended(NamedTuple):
    """A claimed job whose attempt ended, waiting for the dispatcher's next group commit."""

    finish: _Finish                     # what to write
    job: _Claimed
    outcome: str                        # for the job log: done, retry, snoozed, requeued (...)
    seconds: float = 0.0                # how long the handler ran
    cool_down_until: int | None = None  # set by Throttled: no claims from the queue until then


class _QueueClaim(NamedTuple):
    """What one claim in a dispatcher's commit found for one queue."""

    queue: str
    wanted: int
    rows: list[_ClaimedRow]
    next_due: int | None                # ms: when to claim again (a scheduled job, cool-down)


class _QueueState:
    """The dispatcher's view of one queue in this process."""

    __slots__ = ("name", "slots", "held", "buffer", "maybe_ready", "wakes", "claim_wakes",
                 "next_due",
                 "paused", "cooldown_until", "backoff", "avg_seconds")

    def __init__(self, name: str, slots: int) -> None:
        self.name = name
        self.slots = slots
        self.held = 0                   # claimed and not yet finished: running or buffered
        self.buffer: queue_module.SimpleQueue[_Claimed | None] = queue_module.SimpleQueue()
        self.maybe_ready = True         # a claim may find work; cleared when one comes short
        self.wakes = 0                  # enqueues seen in this process, to not lose a wake-up
        self.claim_wakes = 0            # of those, the ones the last claim already saw
        self.next_due: int | None = None    # earliest run_at of a scheduled job, when known
        self.paused = False
        self.cooldown_until = 0         # ms; buffered jobs wait until then (Throttled)
        self.backoff = (1000, 3_600_000)    # ms; refreshed from the queues table
        self.avg_seconds: float | None = None   # moving average of handler run time

    def claimable(self) -> int:
        prefetch = 0
        if self.avg_seconds is not None:
            prefetch = min(PREFETCH_PER_SLOT * self.slots,
                           int(PREFETCH_SECONDS * self.slots / max(self.avg_seconds, 1e-6)))
        return self.slots + prefetch - self.held

    def record_run_time(self, seconds: float) -> None:
        if self.avg_seconds is None:
            self.avg_seconds = seconds
        else:
            self.avg_seconds += (seconds - self.avg_seconds) * 0.2

    def drain_buffer(self) -> list[_Claimed]:
        """Take back the jobs no worker has started yet."""
        jobs: list[_Claimed] = []
        while True:
            try:
                job = self.buffer.get_nowait()
            except queue_module.Empty:
                return jobs
            if job is None:             # a worker's stop signal: leave it for the worker
                self.buffer.put(None)
                return jobs
            jobs.append(job)


class _LoopErrors:
    """The error policy of one runtime loop. After each failed round the loop waits twice as
    long as after the one before (from its interval up to MAX_ERROR_BACKOFF), and a streak of
    failures is logged once when it starts and once when it ends, not once per round. An
    error that means the file cannot be used at all (SchemaError) is raised instead: the
    runtime stops."""

    def __init__(self, loop: str, interval: float, path: str,
                 max_pause: float = MAX_ERROR_BACKOFF) -> None:
        self.loop, self.interval, self.path, self.max_pause = loop, interval, path, max_pause
        self.streak = 0
        self.since = 0.0

    def failed(self, exc: Exception) -> float:
        """Seconds to wait before the next round; raises the error if it is fatal."""
        error = _storage_error(exc, self.path) if isinstance(exc, apsw.Error) else exc
        if isinstance(error, SchemaError):
            raise error from exc
        self.streak += 1
        if self.streak == 1:
            self.since = time.monotonic()
            if isinstance(error, SqliteqError):     # the message says it all
                log.error("%s: %s; retrying until it works", self.loop, error)
            else:
                log.error("%s failed; retrying until it works", self.loop, exc_info=exc)
        return min(self.interval * (1 << min(self.streak - 1, 30)),
                   max(self.interval, self.max_pause))

    def succeeded(self) -> None:
        if self.streak:
            log.warning("%s works again after %d failed rounds in %.1f s", self.loop,
                        self.streak, time.monotonic() - self.since)
            self.streak = 0


class _Registered(NamedTuple):
    """A kind's handler, as registered."""

    fn: Handler
    timeout: float | None       # seconds each attempt may run, unless its job says
    is_async: bool              # an `async def`: awaited on the runtime's event loop


class _Attempt(NamedTuple):
    """A handler running under a time limit, as its worker registered it."""

    thread_id: int              # the worker thread's, to show where it is stuck
    process_id: str
    slot: int
    limit: float                # seconds


class _Watchdog:
    """Enforces time limits from a thread of its own, started by the first limited attempt.
    When an attempt has run for its limit, its token fires with reason "timeout"; if it
    still runs `grace` seconds later, `expire(job)` gives it up."""

    def __init__(self, grace: float, expire: Callable[[_Claimed], None], name: str) -> None:
        self._grace, self._expire, self._name = grace, expire, name
        self._cond = threading.Condition(threading.Lock())
        # (when, tie-breaker, job, whether it is the end of the grace), earliest first
        self._deadlines: list[tuple[float, int, _Claimed, bool]] = []
        self._armed: set[tuple[str, int]] = set()     # (job id, lease) still running
        self._order = itertools.count()
        self._thread: threading.Thread | None = None
        self._closed = False

    def arm(self, job: _Claimed, seconds: float) -> None:
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True, name=self._name)
                self._thread.start()
            self._armed.add((job.id, job.lease))
            heapq.heappush(self._deadlines,
                           (time.monotonic() + seconds, next(self._order), job, False))
            if self._deadlines[0][2] is job:
                self._cond.notify()

    def disarm(self, job: _Claimed) -> None:
        with self._cond:
            self._armed.discard((job.id, job.lease))

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while (due := self._next_due()) is not None:
            job, grace_over = due
            try:
                if grace_over:
                    self._expire(job)
                else:
                    job.token.cancel("timeout")
            except Exception:       # one job's trouble must not end every time limit
                log.exception("job %s (%s): enforcing its time limit failed", job.id, job.kind)

    def _next_due(self) -> tuple[_Claimed, bool] | None:
        """Sleep until an armed attempt reaches a deadline: its limit (then its grace is
        armed) or the end of its grace (True). None once closed."""
        with self._cond:
            while not self._closed:
                if not self._deadlines:
                    self._cond.wait()
                    continue
                when, _, job, grace_over = self._deadlines[0]
                delay = when - time.monotonic()
                if delay > 0:
                    self._cond.wait(delay)
                    continue
                heapq.heappop(self._deadlines)
                if (job.id, job.lease) not in self._armed:
                    continue                    # it ended in time
                if grace_over:
                    self._armed.discard((job.id, job.lease))
                else:
                    heapq.heappush(self._deadlines,
                                   (when + self._grace, next(self._order), job, True))
                return job, grace_over
            return None


class _EventLoop:
    """The runtime's asyncio event loop, in a thread of its own, started by the first async
    handler. Each async job still holds its worker thread (blocked on the result), so a
    queue runs at most its slots at once, and outcomes, retries and fencing are a sync
    handler's."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def run(self, awaitable: Any, token: CancellationToken) -> Any:
        """Await `awaitable` on the loop and return its result; when `token` fires, its
        task is cancelled (and this raises once the task has ended)."""
        import asyncio

        async def as_task() -> Any:
            task, loop = asyncio.current_task(), asyncio.get_running_loop()
            assert task is not None

            def cancel_task() -> None:      # called from the thread that fires the token
                loop.call_soon_threadsafe(task.cancel)

            token._on_cancel(cancel_task)
            return await awaitable

        return asyncio.run_coroutine_threadsafe(as_task(), self._started()).result()

    def _started(self) -> asyncio.AbstractEventLoop:
        import asyncio
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                                name=self._name)
                self._thread.start()
            return self._loop

    def close(self, timeout: float) -> None:
        """Stop the loop, waiting up to `timeout` seconds: a handler that blocks the loop
        (a sync call inside an `async def`) must not hang stop()."""
        import asyncio
        with self._lock:
            loop, thread, self._loop, self._thread = self._loop, self._thread, None, None
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        if not thread.is_alive() and not asyncio.all_tasks(loop):
            loop.close()                # else a handler outlived stop(): leave it be


class _Clock:
    """Where a runtime reads the time: the store's clock in milliseconds (what the database
    stores) and a monotonic clock in seconds (for intervals). Tests substitute their own."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def now_ms(self) -> int:
        return self._db.clock_ms()

    def monotonic(self) -> float:
        return time.monotonic()


class _Dispatcher:
    """A runtime's dispatcher thread: `run` loops over `wait` and `step(now)`, and owns the
    error policy (a failed round backs off, see _LoopErrors).

    Each round commits one transaction: the finishes workers handed in, claims released
    after a failed commit, and new claims for free slots (group commit). Between rounds it
    sleeps on the runtime's condition `_wake` until there is work, and the wake-ups cannot
    be lost because every flag below is set, and checked before sleeping, under that lock:

    * a worker appends to `_finished` and notifies;
    * an enqueue committed in this process marks its queues `maybe_ready` and counts
      `wakes`; a claim that came back short clears `maybe_ready` only if `wakes` did not
      move while it ran, so an enqueue racing the claim is not forgotten;
    * stop() and an abandoned shutdown set `_stopping` / `_abandon` and notify;
    * a scheduled job, a retry or a cool-down sets its queue's `next_due`: the sleep ends
      then, and the queue is marked `maybe_ready`;
    * commits by other processes show in `PRAGMA data_version`, and writes by other
      threads of this process (which may ride in the dispatcher's own group commit, unseen
      by data_version) in the count of committed writes: both are read every round, and a
      round comes at least every poll interval. Either marks every queue `maybe_ready` and
      schedules a sync of queue settings (pause, backoff) within a poll interval;
    * on PostgreSQL, other processes' commits arrive by NOTIFY on the store's listener
      thread, which sets `_remote_commit` and notifies; writes that send no NOTIFY (not
      sqliteq's) are looked for every `UNSEEN_WRITES_POLL` seconds.
    """

    def __init__(self, runtime: Runtime) -> None:
        self._rt = runtime
        self._db = runtime.storage.db
        self._seen_version: int | None = None   # None: sync on the first round
        self._own_writes = 0        # of the database's committed writes, the dispatcher's
        self._seen_others = 0
        self._sync_due = 0.0        # monotonic time of the next settings sync; 0: none due
        self._unseen_at = 0.0       # when to look for writes data_version cannot show
        self._stop_seen = False

    def run(self) -> None:
        """Rounds until the runtime may stop."""
        rt = self._rt
        errors = _LoopErrors("dispatcher", rt.poll_interval, self._db.path)
        while True:
            self.wait()
            try:
                if self.step(rt._clock.now_ms()):
                    return
                errors.succeeded()
            except Exception as exc:
                pause = errors.failed(exc)
                with rt._wake:
                    rt._wake.wait_for(lambda: rt._abandon, pause)

    def wait(self) -> None:
        """Sleep until there is work, or until the next poll, due job or settings sync."""
        rt = self._rt
        with rt._wake:
            if not self._busy():
                rt._wake.wait(self._idle_timeout())

    def _busy(self) -> bool:
        rt = self._rt
        return bool(rt._finished or rt._abandon or rt._remote_commit
                    or (rt._stopping and not self._stop_seen)
                    or (rt._metrics is not None and rt._metrics.due(rt._clock.monotonic()))
                    or (not rt._stopping and any(
                        qs.maybe_ready and not qs.paused and qs.claimable() > 0
                        for qs in rt._queue_states.values())))

    def _idle_timeout(self) -> float:
        rt = self._rt
        timeout = rt.poll_interval
        due = [qs.next_due for qs in rt._queue_states.values() if qs.next_due is not None]
        if due:
            timeout = min(timeout, (min(due) - rt._clock.now_ms()) / 1000)
        if self._sync_due:
            timeout = min(timeout, self._sync_due - rt._clock.monotonic())
        if rt._metrics is not None and rt._metrics.since is not None:
            timeout = min(timeout, rt._metrics.since + METRICS_FLUSH_INTERVAL
                          - rt._clock.monotonic())
        return max(0.0, timeout)

    def step(self, now: int) -> bool:
        """One round as of `now` (ms): notice changes, begin stopping if asked, and commit.
        True once the runtime may stop. A round that fails holds its finished jobs again
        (the next round commits them) and raises."""
        rt = self._rt
        with rt._wake:
            finished, rt._finished = rt._finished, []
            stopping, abandon = rt._stopping, rt._abandon
            rt._remote_commit = False   # _notice_changes reads what it announced
        rt._settle(finished)
        try:
            self._notice_changes()
            orphans: list[tuple[str, int]] = []
            # (At shutdown too: the host row goes, and orphans would wait for a reaper.)
            if ((self._sync_due and rt._clock.monotonic() >= self._sync_due)
                    or (stopping and not self._stop_seen)):
                self._sync_due = 0.0
                finished += rt._sync_queue_settings()
                orphans = rt._orphaned_claims(rt._sync_running(), finished)
            if stopping:
                self._stop_seen = True
                finished += rt._take_back_buffered("shutdown")
                for job in rt._held.values():
                    job.token.cancel("shutdown")
            self._mark_due(now)
            claim_from = [] if stopping else rt._queues_to_claim(bool(finished), now)
            # (Stopping, every commit flushes: the last one may come with the last ends.)
            flush = rt._metrics is not None and bool(rt._metrics.rollups or finished) and (
                stopping or rt._metrics.due(rt._clock.monotonic()))
            if finished or claim_from or orphans or flush:
                lease = random.getrandbits(62)
                wakes = {qs.name: qs.wakes for qs in rt._queue_states.values()}
                reports = rt._progress.take()
                metrics = rt._metrics_of(finished, flush)
                try:
                    claimed = self._db.write(functools.partial(
                        rt._commit, finished, claim_from, lease, orphans, reports, now,
                        metrics.rollups if flush else {}))
                except Exception:       # (`metrics` is a copy: the buffer stays as it was)
                    rt._progress.restore(reports)
                    raise
                self._own_writes += 1
                rt._metrics_committed(metrics, flush)
                rt._hand_out(claimed, lease, wakes, now)
                rt._note_requeues(finished)
                finished = []               # committed: nothing to hold again below
            if abandon:
                rt._requeue_abandoned()
                return True
            return stopping and not rt._held and not rt._finished
        except Exception:
            rt._unsettle(finished)
            # The failed commit may have taken effect: look for orphaned claims at once.
            self._sync_due = self._sync_due or rt._clock.monotonic()
            raise

    def _notice_changes(self) -> None:
        """Another connection committed, or another thread of this process wrote (a pause,
        say, that may have ridden in this connection's own commit)."""
        rt, db = self._rt, self._db
        version, others = db.data_version(), db._writes_committed - self._own_writes
        unseen = db.UNSEEN_WRITES_POLL is not None and rt._clock.monotonic() >= self._unseen_at
        if version != self._seen_version or others != self._seen_others or unseen:
            self._seen_version, self._seen_others = version, others
            if db.UNSEEN_WRITES_POLL is not None:
                self._unseen_at = rt._clock.monotonic() + db.UNSEEN_WRITES_POLL
            for qs in rt._queue_states.values():
                qs.maybe_ready = True
            self._sync_due = self._sync_due or rt._last_sync + rt.poll_interval

    def _mark_due(self, now: int) -> None:
        for qs in self._rt._queue_states.values():
            if qs.next_due is not None and qs.next_due <= now:
                qs.next_due = None
                qs.maybe_ready = True


class Runtime:
    """Runs handlers for jobs of the given queues in a pool of worker threads.

    Per queue, `slots` worker threads are fed by one dispatcher thread per process. The
    dispatcher claims jobs for free slots and commits finished jobs in the same transaction
    (group commit). A heartbeat thread keeps this process's row fresh, rescues jobs of silent
    hosts, and delivers cancellation requests to running handlers. A scheduler thread fires
    cron ticks and, once per `janitor_interval` across the cluster, deletes expired jobs.

    Database errors make a loop back off and retry (see `_LoopErrors`). When the file cannot
    be used at all, or a thread of the runtime dies, the runtime stops itself rather than
    look alive while it claims nothing: `error` tells why, and `run()` raises it.

    An attempt that runs past its time limit has its token fired (reason "timeout"); one
    still running `timeout_grace` seconds later is failed (retried per policy) and its slot
    goes to a new worker thread (see `register`).

    With `metrics` on (the default), it records per-minute rollups of the attempts it ends
    (see `Metrics`); its janitor sweeps delete minutes older than `metrics_retention`.
    """

    def __init__(self, storage: Storage, queues: Mapping[str, int] | None = None,
                 router: Router | None = None, *, poll_interval: float = 0.05,
                 heartbeat_interval: float = 1.0, lease_timeout: float = 30.0,
                 shutdown_timeout: float = 30.0, janitor_interval: float = 60.0,
                 timeout_grace: float = 5.0, metrics: bool = True,
                 metrics_retention: timedelta | float = timedelta(days=7)) -> None:
        self._started = False
        self.storage = storage
        self.router: Router = router if router is not None else DefaultRouter()
        self.rate_limit = RateLimiter(storage)
        self.queues: dict[str, int] = {}
        self._queue_states: dict[str, _QueueState] = {}
        self.set_queues({DEFAULT_QUEUE: 4} if queues is None else queues)
        self.poll_interval = _duration_seconds(poll_interval, "poll_interval")
        self.heartbeat_interval = _duration_seconds(heartbeat_interval, "heartbeat_interval")
        self.lease_timeout = _duration_seconds(lease_timeout, "lease_timeout")
        self.shutdown_timeout = _duration_seconds(shutdown_timeout, "shutdown_timeout")
        self.janitor_interval = _duration_seconds(janitor_interval, "janitor_interval")
        self.timeout_grace = _duration_seconds(timeout_grace, "timeout_grace")
        self.metrics_retention = _duration_seconds(metrics_retention, "metrics_retention")
        if self.lease_timeout <= self.heartbeat_interval:
            raise ConfigError("lease_timeout must be longer than heartbeat_interval")
        self.host_id: str = ""          # a ULID minted by start()
        self._handlers: dict[str, _Registered] = {}
        self._schedules: dict[str, tuple[CronExpression, EnqueueRequest]] = {}
        self._held: dict[str, _Claimed] = {}    # job id -> claim, until its finish commits
        self._last_sync = 0.0                   # when queue settings were last read
        self._finished: list[_Ended] = []
        self._remote_commit = False     # another process committed (PostgreSQL's NOTIFY)
        self._wake = threading.Condition(threading.Lock())
        self._stopping = False
        self._abandon = False
        self._stopped = threading.Event()
        self._dispatcher: threading.Thread | None = None
        self._heartbeat: threading.Thread | None = None
        self._scheduler: threading.Thread | None = None
        self._workers: list[threading.Thread] = []
        self._janitor: threading.Thread | None = None     # the current sweep, if one runs
        self._stop_lock = threading.Lock()
        self.error: SqliteqError | None = None   # why the runtime stopped itself, if it did
        self._wal_warned = False
        self._clock = _Clock(storage.db)    # tests replace it before start() to move time
        # Attempts under a time limit, until their worker hands in the end (or the watchdog
        # gives them up): whoever removes the entry, under _wake, ends the attempt.
        self._limited: dict[tuple[str, int], _Attempt] = {}
        self._watchdog = _Watchdog(self.timeout_grace, self._give_up, "sqliteq-watchdog")
        self._event_loop = _EventLoop("sqliteq-asyncio")
        self._progress = _ProgressReports()
        self._metrics = _MetricsBuffer() if metrics else None

    # -- registration and enqueueing --

    def set_queues(self, queues: Mapping[str, int]) -> None:
        """Serve these queues with this many worker slots each (only before start)."""
        if self._started:
            raise ConfigError("set_queues must be called before start")
        queues = dict(queues)
        if not queues:
            raise ConfigError("a runtime needs at least one queue")
        for name, slots in queues.items():
            _check_name(name, "queue name")
            if not isinstance(slots, int) or isinstance(slots, bool) or not 1 <= slots <= 1024:
                raise ConfigError(f"queue {name!r} needs 1 to 1024 slots, not {slots!r}")
        self.queues = queues
        self._queue_states = {name: _QueueState(name, n) for name, n in queues.items()}

    def handler(self, kind: str, *, timeout: timedelta | float | None = None
                ) -> Callable[[Handler], Handler]:
        """Decorator: `@rt.handler("email_send")` registers the function for that kind."""
        def register(fn: Handler) -> Handler:
            self.register(kind, fn, timeout=timeout)
            return fn
        return register

    @overload
    def task(self, fn: Callable[[JobCtx, Any], R], /) -> Task[R]: ...

    @overload
    def task(self, /, *, kind: str | None = None, queue: str | None = None, priority: int = 0,
             max_attempts: int | None = None, unique_key: str | None = None,
             timeout: timedelta | float | None = None
             ) -> Callable[[Callable[[JobCtx, Any], R]], Task[R]]: ...

    def task(self, fn: Callable[[JobCtx, Any], Any] | None = None, /, *,
             kind: str | None = None, queue: str | None = None, priority: int = 0,
             max_attempts: int | None = None, unique_key: str | None = None,
             timeout: timedelta | float | None = None) -> Any:
        """Decorator, bare (`@rt.task`) or with defaults (`@rt.task(queue="email")`):
        registers the function as the handler of `kind` (default: its name), with its time
        limit, and returns a Task, whose `.enqueue(payload, **overrides)` enqueues jobs of
        that kind. An `async def` function runs on the runtime's event loop."""
        defaults = {"queue_name": queue, "priority": priority, "max_attempts": max_attempts,
                    "unique_key": unique_key}

        def make(fn: Callable[[JobCtx, Any], Any]) -> Task[Any]:
            name = kind if kind is not None else cast(str, getattr(fn, "__name__", ""))
            task = Task(fn, name, self.enqueue, self.enqueue_bulk, defaults)
            self.register(task.kind, task, timeout=timeout)
            return task

        return make if fn is None else make(fn)

    def register(self, kind: str, fn: Handler, *, timeout: timedelta | float | None = None
                 ) -> None:
        """Run `fn(ctx, payload)` for jobs of `kind`; an `async def` handler (or a Task of
        one) is awaited on the runtime's event loop. A later registration replaces it.

        `timeout` (seconds) limits each attempt, unless the job has its own
        (`EnqueueRequest(timeout=...)`). When it passes, the token fires with reason
        "timeout" (an async handler's task is cancelled) and the attempt fails with
        TimeLimitExceeded, retried per policy. A handler still running `timeout_grace`
        seconds later is given up: its attempt fails the same way and a new worker thread
        takes its slot. Python cannot kill a thread: the old one runs on until its handler
        returns, and what it returns is dropped."""
        _check_name(kind, "kind")
        if not callable(fn):
            raise ConfigError(f"handler for {kind!r} is not callable")
        limit = None if timeout is None else _time_limit(timeout, f"timeout of {kind!r}")
        plain = inspect.unwrap(fn)      # a Task's function, say
        self._handlers[kind] = _Registered(fn, limit, inspect.iscoroutinefunction(plain) or
                                           inspect.iscoroutinefunction(type(plain).__call__))

    def cron(self, name: str, expression: str, request: EnqueueRequest,
             tz: str | None = None) -> None:
        """Enqueue `request` at every tick of the cron `expression` (in IANA time zone `tz`,
        default UTC). Each tick is enqueued once however many processes declare it; the job's
        run_at is its tick. An invalid expression raises InvalidInput here."""
        _check_name(name, "schedule name")
        if type(request) is not EnqueueRequest:
            raise InvalidInput(f"cron {name!r}: request must be an EnqueueRequest")
        parsed = CronExpression(expression, tz)
        self._schedules[name] = (parsed, request)
        if self._started:
            self.storage.cron.declare(name, parsed, request)

    def enqueue(self, request: EnqueueRequest) -> EnqueueOutcome:
        """Enqueue through this runtime's router."""
        return self.storage.jobs.enqueue(request, self.router)

    def enqueue_bulk(self, requests: Iterable[EnqueueRequest]) -> list[EnqueueOutcome]:
        """Enqueue many jobs in one transaction through this runtime's router."""
        return self.storage.jobs.enqueue_bulk(requests, self.router)

    # -- lifecycle --

    def start(self) -> None:
        """Register this process, then start the dispatcher, workers and heartbeat."""
        if self._started:
            raise ConfigError("a runtime starts once; create a new one to start again")
        self._started = True
        self.host_id = _mint_ids(1)[0]      # from the job ids' minter: never equal to one
        for name, (expression, request) in self._schedules.items():
            self.storage.cron.declare(name, expression, request)
        self.storage.processes._heartbeat(self.host_id, self.queues, self.lease_timeout,
                                          self.heartbeat_interval)
        self._dispatcher = threading.Thread(
            target=self._guarded, args=("dispatcher", _Dispatcher(self).run), daemon=True,
            name=f"sqliteq-dispatch-{self.host_id}")
        self._heartbeat = threading.Thread(
            target=self._guarded, args=("heartbeat", self._heartbeat_loop), daemon=True,
            name=f"sqliteq-heartbeat-{self.host_id}")
        self._scheduler = threading.Thread(
            target=self._guarded, args=("scheduler", self._schedule_loop), daemon=True,
            name=f"sqliteq-scheduler-{self.host_id}")
        self._workers = [threading.Thread(target=self._work_loop, args=(qs, slot),
                                          daemon=True, name=f"{qs.name}-{slot}-{self.host_id}")
                         for qs in self._queue_states.values() for slot in range(qs.slots)]
        self.storage.jobs._enqueue_listeners.append(self._on_enqueue)
        self.storage.db._subscribe(self._on_remote_commit)
        log.info("runtime %s starting on %s: slots %s", self.host_id, self.storage.path,
                 ", ".join(f"{name}={slots}" for name, slots in self.queues.items()))
        for thread in (self._dispatcher, self._heartbeat, self._scheduler, *self._workers):
            thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop claiming, ask running handlers to stop (reason "shutdown"), wait for them up
        to `timeout` (default `shutdown_timeout`) seconds, then put jobs still running back
        in their queue with the attempt refunded. Safe to call more than once.

        When it returns, no thread of this runtime uses the storage any more, except the
        handlers that outlived `timeout` (a warning names how many): close the storage only
        once they have returned."""
        with self._stop_lock:           # a second caller waits for the first to finish
            if self._dispatcher is not None and not self._stopped.is_set():
                self._stop(self.shutdown_timeout if timeout is None else timeout)

    def _stop(self, timeout: float) -> None:
        assert self._dispatcher and self._heartbeat and self._scheduler
        deadline = time.monotonic() + timeout
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        self._dispatcher.join(timeout)
        if self._dispatcher.is_alive():
            with self._wake:
                self._abandon = True
                self._wake.notify_all()
            self._dispatcher.join(ABANDON_TIMEOUT)
            if self._dispatcher.is_alive():
                log.error("runtime %s: the dispatcher did not stop; its running jobs are left "
                          "to the reaper of any other process", self.host_id)
        elif self.error is not None:    # it died: tell its handlers to stop
            for job in list(self._held.values()):
                job.token.cancel("shutdown")
        for qs in self._queue_states.values():
            for _ in range(qs.slots):
                qs.buffer.put(None)
        # Idle workers exit at once; the deadline gives them a moment even after a timeout.
        deadline = max(deadline, time.monotonic() + WORKER_EXIT_TIMEOUT)
        others = [worker for worker in self._workers if worker is not threading.current_thread()]
        for worker in others:           # (stop() may be called from a handler)
            worker.join(max(0.0, deadline - time.monotonic()))
        still_running = sum(worker.is_alive() for worker in others)
        if still_running:
            log.warning("runtime %s: %d handler(s) still running after stop; close the "
                        "storage only once they return", self.host_id, still_running)
        self._watchdog.close()
        self._event_loop.close(WORKER_EXIT_TIMEOUT)
        self._stopped.set()
        self._heartbeat.join()
        self._scheduler.join()          # no sweep can start after this
        if self._janitor is not None:   # a sweep stops after its current chunk
            self._janitor.join()
        if self._on_enqueue in self.storage.jobs._enqueue_listeners:
            self.storage.jobs._enqueue_listeners.remove(self._on_enqueue)
        self.storage.db._unsubscribe(self._on_remote_commit)
        try:
            self.storage.processes.remove(self.host_id)
        except Exception as exc:
            log.warning("runtime %s: cannot remove its process row (%s); it ages out",
                        self.host_id, exc)
        log.info("runtime %s stopped", self.host_id)

    def _guarded(self, loop: str, body: Callable[[], None]) -> None:
        """Run a loop of the runtime; if it ends by an exception, stop the runtime."""
        try:
            body()
        except BaseException as exc:
            error = exc if isinstance(exc, SqliteqError) else SqliteqError(
                f"the {loop} thread died of {type(exc).__name__}: {_describe(exc)}")
            log.error("runtime %s stops itself: %s", self.host_id, error,
                      exc_info=None if isinstance(exc, SqliteqError) else exc)
            with self._wake:
                self.error = self.error or error
                self._stopping = True
                self._wake.notify_all()
            threading.Thread(target=self.stop, name="sqliteq-stop", daemon=True).start()

    def run(self) -> None:
        """Start, and block until SIGINT or SIGTERM, then stop gracefully. A second signal
        exits the process at once. If the runtime stops itself, raises its `error`."""
        import signal

        signals: list[int] = []

        def on_signal(signum: int, frame: object) -> None:
            if signals:
                os._exit(128 + signum)
            signals.append(signum)      # only a flag: a signal handler must not take locks

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.start()
            while not signals and not self._stopping:
                time.sleep(0.1)
            if signals:
                log.info("stopping (signal again to exit at once)")
            self.stop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if self.error is not None:
            raise self.error

    def __enter__(self) -> Runtime:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- dispatcher: claims and group commit --

    def _on_enqueue(self, queues: set[str]) -> None:
        with self._wake:
            for name in queues:
                qs = self._queue_states.get(name)
                if qs is not None:
                    qs.maybe_ready = True
                    qs.wakes += 1
                    self._wake.notify()

    def _on_remote_commit(self) -> None:
        with self._wake:
            self._remote_commit = True
            self._wake.notify()

    def _settle(self, finished: list[_Ended]) -> None:
        """Free the slots of finished jobs (their finish commits next)."""
        for finish in finished:
            qs = self._queue_states[finish.job.queue]
            qs.held -= 1
            qs.maybe_ready = True       # a slot is free (and a global limit may allow more)
            if finish.seconds:
                qs.record_run_time(finish.seconds)
            if self._held.get(finish.job.id) is finish.job:    # not a newer claim of it
                del self._held[finish.job.id]

    def _note_requeues(self, committed: list[_Ended]) -> None:
        """Jobs this process put back for later (retries, snoozes) are due at their run_at;
        no other connection's commit may come to remind the dispatcher."""
        for ended in committed:
            run_at = ended.finish.run_at
            if run_at is not None:
                qs = self._queue_states[ended.job.queue]
                if qs.next_due is None or run_at < qs.next_due:
                    qs.next_due = run_at

    def _unsettle(self, finished: list[_Ended]) -> None:
        """The commit failed: hold the finished jobs again, to commit them next time."""
        with self._wake:
            self._finished = finished + self._finished
        for finish in finished:
            self._queue_states[finish.job.queue].held += 1
            self._held.setdefault(finish.job.id, finish.job)

    def _queues_to_claim(self, committing: bool, now: int) -> list[tuple[str, int, int]]:
        """(queue, jobs wanted, slots free now) for queues that may have ready jobs. Unless
        a commit happens anyway, a read-only check spares the writer lock when none are."""
        wanted = [qs for qs in self._queue_states.values()
                  if qs.maybe_ready and not qs.paused and qs.claimable() > 0]
        if not committing and wanted:
            store = self.storage._store
            for qs in list(wanted):
                wakes = qs.wakes
                if wakes != qs.claim_wakes:
                    continue            # just enqueued here: claim at once, no need to look
                if not store.ready_exists(qs.name, now):
                    wanted.remove(qs)
                    with self._wake:
                        qs.maybe_ready = qs.wakes != wakes
                    qs.next_due = store.next_due(qs.name)
        return [(qs.name, qs.claimable(), max(0, qs.slots - qs.held)) for qs in wanted]

    def _commit(self, finished: list[_Ended], claim_from: list[tuple[str, int, int]],
                lease: int, orphans: list[tuple[str, int]], reports: list[_ProgressReport],
                now: int, rollups: Mapping[_RollupKey, _Rollup], conn: apsw.Connection
                ) -> list[_QueueClaim]:
        """One transaction: store progress reports, apply finished jobs, release orphaned
        claims, claim (as of `now`, ms), then add metrics rollups (last: on PostgreSQL,
        their rows stay locked only until the commit). Re-runnable on busy retries."""
        store, queues = self.storage._store, self.storage.queues
        # Read again with the writer lock held: a job enqueued while the round waited for
        # it is never claimed "before" it was created.
        now = max(now, self._clock.now_ms())
        if orphans:
            store.release_orphans(conn, orphans, now)
        if reports:                     # before the finishes: a job's last report counts
            store.report_progress(conn, reports)
        store.finish(conn, [ended.finish for ended in finished])
        for ended in finished:
            if ended.cool_down_until is not None:
                queues._cool_down(conn, ended.job.queue, ended.cool_down_until)
        claimed = []
        # In name order: runtimes that take several queues' limit locks take them in one
        # order, so none waits for another that waits for it.
        for name, wanted, free_now in sorted(claim_from):
            paused, limit, cooldown_until = queues._gate(conn, name)
            if paused or cooldown_until > now:
                claimed.append(_QueueClaim(name, wanted, [],
                                           None if paused else cooldown_until))
                continue
            if limit is not None:       # no prefetch: buffered jobs would count as running
                self.storage.db._serialize(conn, f"limit:{name}")
                wanted = min(free_now, limit - store.count_running(conn, name))
            rows = (store.claim(conn, name, wanted, lease, self.host_id, now)
                    if wanted > 0 else [])
            next_due = store.next_due(name, conn) if len(rows) < wanted else None
            claimed.append(_QueueClaim(name, wanted, rows, next_due))
        if rollups:
            self.storage.metrics._add(conn, rollups)
        return claimed

    def _metrics_of(self, finished: list[_Ended], flush: bool) -> _MetricsBuffer:
        """The rollups of the attempts a commit is about to end (requeues are not ends),
        in the minute each ended; with everything recorded since the last flush when
        `flush`. (Per job: this loop is on the dispatcher's hot path.)"""
        metrics = _MetricsBuffer()
        if self._metrics is None:
            return metrics
        monotonic, requeue = self._clock.monotonic(), _Verdict.REQUEUE
        last_key, rollup = None, _Rollup()
        for ended in finished:
            finish, job = ended.finish, ended.job
            if finish.verdict is requeue:
                continue
            key = (finish.at - finish.at % _MINUTE_MS, job.queue, job.kind)
            if key != last_key:
                last_key, rollup = key, metrics.rollup(key, monotonic)
            rollup.ended[finish.verdict] += 1
            if ended.seconds:           # 0: the handler never ran, or was given up
                rollup.run.samples.append(ended.seconds)
            rollup.wait.samples.append(job.waited)
        if flush:
            metrics.merge(self._metrics.rollups, monotonic)
        return metrics

    def _metrics_committed(self, metrics: _MetricsBuffer, flushed: bool) -> None:
        """The commit of `metrics` succeeded: forget what it flushed, or keep its rollups
        for the next flush."""
        if self._metrics is None:
            return
        if flushed:
            self._metrics.clear()
        else:
            self._metrics.merge(metrics.rollups, self._clock.monotonic())

    def _hand_out(self, claimed: list[_QueueClaim], lease: int, wakes: dict[str, int],
                  now: int) -> None:
        for name, wanted, rows, due in claimed:
            qs = self._queue_states[name]
            qs.claim_wakes = wakes[name]
            if due is not None:     # claim again then: the next scheduled job, or cool-down end
                qs.next_due = due
            if len(rows) < wanted or not rows:
                with self._wake:    # unless an enqueue came in during the claim
                    qs.maybe_ready = qs.wakes != wakes[name]
            qs.held += len(rows)
            for row in rows:
                job = _Claimed(row.id, row.kind, row.payload, row.attempt, row.max_attempts,
                               row.errors, lease, name, CancellationToken(), row.timeout_ms,
                               row.run_at, (now - row.run_at) / 1000)
                self._held[row.id] = job
                qs.buffer.put(job)

    def _take_back_buffered(self, reason: str, qs: _QueueState | None = None) -> list[_Ended]:
        """Requeue (refunded) the claimed jobs that no worker has started yet, each at its
        own run_at: it never ran, so it keeps its place in its queue."""
        states = self._queue_states.values() if qs is None else (qs,)
        finishes = []
        for state in states:
            for job in state.drain_buffer():
                job.token.cancel(reason)
                finishes.append(self._requeue(job, job.run_at, None, f"requeued ({reason})"))
        self._settle(finishes)
        return finishes

    def _requeue_abandoned(self) -> None:
        """Shutdown timed out: commit what finished meanwhile, and put the jobs whose
        handlers still run back in their queues, refunded."""
        with self._wake:
            finished, self._finished = self._finished, []
        self._settle(finished)
        stuck = [self._requeue(job, self._clock.now_ms(), None, "requeued (shutdown timeout)")
                 for job in self._held.values()]
        metrics = self._metrics_of(finished, True)
        try:
            self.storage.db.write(functools.partial(self._commit, finished + stuck, [], 0, [],
                                                    [], self._clock.now_ms(), metrics.rollups))
        except Exception:
            self._unsettle(finished)        # held again: the next round commits them
            raise
        log.warning("shutdown timed out: %d running job(s) returned to their queues",
                    len(stuck))

    def _sync_queue_settings(self) -> list[_Ended]:
        """Refresh paused flags and backoff. A pause cancels the queue's running jobs and
        hands back its buffered ones (returned as finishes to commit)."""
        self._last_sync = self._clock.monotonic()
        finishes: list[_Ended] = []
        for name, paused, base, cap, cooldown_until in self.storage.queues._settings():
            qs = self._queue_states.get(name)
            if qs is None:
                continue
            qs.paused, qs.backoff = bool(paused), (base, cap)
            with self._wake:            # workers raise it too (Throttled)
                qs.cooldown_until = max(qs.cooldown_until, cooldown_until)
            if paused:
                finishes += self._take_back_buffered("paused", qs)
                for job in list(self._held.values()):
                    if job.queue == name:
                        job.token.cancel("paused")
        return finishes

    def _sync_running(self) -> dict[str, tuple[int, bool]]:
        """Deliver cancel requests to running handlers, and stop handlers whose job was
        rescued by another process (lease lost). Returns job id -> (lease, cancel
        requested) of every job the database says runs here."""
        held = self._held.copy()    # before the query: a claim held now has committed
        running = self.storage._store.running_here(self.host_id)
        for job_id, job in held.items():
            lease, cancel = running.get(job_id, (None, False))
            if lease != job.lease:
                job.token.cancel("lost")
            elif cancel:
                job.token.cancel("cancelled")
        return running

    def _orphaned_claims(self, running: Mapping[str, tuple[int, bool]],
                         finishing: list[_Ended]) -> list[tuple[str, int]]:
        """Claims in the database that this runtime neither holds nor is finishing: a
        commit reported failed took effect. Only the dispatcher may ask, between its
        commits, for only it changes what the runtime holds."""
        accounted = {(job.id, job.lease) for job in self._held.values()}
        accounted.update((finish.job.id, finish.job.lease) for finish in finishing)
        orphans = [(job_id, lease) for job_id, (lease, _) in running.items()
                   if (job_id, lease) not in accounted]
        if orphans:
            log.warning("releasing %d claimed job(s) this runtime does not hold (a commit"
                        " reported failed took effect)", len(orphans))
        return orphans

    # -- heartbeat --

    def _heartbeat_loop(self) -> None:
        # No backoff: a host that beats late looks dead to the others.
        errors = _LoopErrors("heartbeat", self.heartbeat_interval, self.storage.path,
                             max_pause=self.heartbeat_interval)
        pause = self.heartbeat_interval
        while not self._stopped.wait(pause):
            reports = self._progress.take()
            try:
                self.storage.processes._heartbeat(self.host_id, self.queues,
                                                 self.lease_timeout, self.heartbeat_interval,
                                                 reports)
                if self._held:
                    self._sync_running()
                self._watch_wal()
                errors.succeeded()
                pause = self.heartbeat_interval
            except Exception as exc:
                self._progress.restore(reports)
                pause = errors.failed(exc)

    def _watch_wal(self) -> None:
        """Warn once when the WAL has grown far past its limit, and once when it is back."""
        size = self.storage.db._wal_size()
        if not self._wal_warned and size > WAL_WARN_FACTOR * WAL_SIZE_LIMIT:
            self._wal_warned = True
            log.warning("the WAL of %s has grown to %d MB: a connection holds an old read "
                        "snapshot (a long read transaction, or a statement not run to its "
                        "end), or one transaction wrote that much; no checkpoint can recycle "
                        "it until the reader lets go", self.storage.path, size >> 20)
        elif self._wal_warned and size <= WAL_SIZE_LIMIT:
            self._wal_warned = False
            log.warning("the WAL of %s is back to %d MB", self.storage.path, size >> 20)

    # -- scheduler: cron ticks and the janitor --

    def _schedule_loop(self) -> None:
        cron_errors = _LoopErrors("cron", 1.0, self.storage.path)
        janitor_errors = _LoopErrors("janitor", 1.0, self.storage.path)
        timeout = 0.0
        while not self._stopped.wait(timeout) and not self._stopping:
            timeout = 1.0
            try:
                if self._schedules:
                    self.storage.cron._fire_due(set(self._schedules), self.router)
                    next_fire = self.storage.cron._next_fire_ms(set(self._schedules))
                    if next_fire is not None:
                        timeout = min(1.0, max(0.0, (next_fire - self._clock.now_ms()) / 1000))
                cron_errors.succeeded()
            except Exception as exc:
                timeout = cron_errors.failed(exc)
            try:
                sweeping = self._janitor is not None and self._janitor.is_alive()
                if not sweeping and self.storage.processes._claim_chore(
                        "janitor", self.janitor_interval):
                    # On its own thread: a long sweep must not make cron ticks late.
                    self._janitor = threading.Thread(target=self._sweep, daemon=True,
                                                     name=f"sqliteq-janitor-{self.host_id}")
                    self._janitor.start()
                janitor_errors.succeeded()
            except Exception as exc:
                timeout = max(timeout, janitor_errors.failed(exc))

    def _sweep(self) -> None:
        try:
            self.storage.jobs.sweep_expired(self._stopped)
            self.storage.metrics._sweep(self.metrics_retention)
        except SqliteqError as exc:         # the message says it all
            log.error("janitor sweep failed (%s); the next pass retries", exc)
        except Exception:
            log.exception("janitor sweep failed; the next pass retries")

    # -- workers --

    def _work_loop(self, qs: _QueueState, slot: int) -> None:
        process_id = f"{qs.name}-{slot}-{self.host_id}"
        while True:
            job = qs.buffer.get()
            if job is None:
                return
            handler = self._handlers.get(job.kind)
            limit = self._time_limit(job, handler)
            if limit is not None:
                with self._wake:
                    self._limited[job.id, job.lease] = _Attempt(threading.get_ident(),
                                                                process_id, slot, limit)
                self._watchdog.arm(job, limit)
            try:
                ended = self._execute(job, handler, process_id)
            except BaseException as exc:    # e.g. an exception whose str() raises
                log.error("job %s (%s): the verdict failed (%s); failing the job", job.id,
                          job.kind, type(exc).__name__)
                ended = _Ended(_Finish.failed(job.id, job.lease, self._clock.now_ms(), process_id,
                                              job.errors), job, "failed")
            if limit is not None:
                self._watchdog.disarm(job)
            with self._wake:
                if limit is not None and self._limited.pop((job.id, job.lease), None) is None:
                    given_up = True         # the watchdog ended the attempt, and took the slot
                else:
                    given_up = False
                    self._finished.append(ended)
                    if len(self._finished) == 1:    # else the dispatcher was woken already
                        self._wake.notify()
            if given_up:
                log.warning("job %s (%s): its handler returned %.1f s after its attempt was "
                            "given up; what it returned is dropped", job.id, job.kind,
                            ended.seconds - (limit or 0) - self.timeout_grace)
                return
            if job_log.isEnabledFor(logging.INFO):
                job_log.info("%s %s %s on %s in %.1f ms", job.id, job.kind, ended.outcome,
                             process_id, ended.seconds * 1000)

    def _time_limit(self, job: _Claimed, handler: _Registered | None) -> float | None:
        """Seconds the job's attempt may run: its own limit, else its handler's."""
        if job.timeout_ms is not None:
            return job.timeout_ms / 1000
        return None if handler is None else handler.timeout

    def _give_up(self, job: _Claimed) -> None:
        """The watchdog's verdict on a handler still running after its limit and the
        grace: fail the attempt (retried per policy), and start a worker for its slot."""
        with self._wake:
            attempt = self._limited.pop((job.id, job.lease), None)
        if attempt is None:
            return                      # its worker handed the end in meanwhile
        frame = sys._current_frames().get(attempt.thread_id)
        stack = None if frame is None else "".join(traceback.format_stack(frame))
        ended = self._verdict(job, TimeLimitExceeded(
            f"the handler ran past its {attempt.limit:g} s time limit and {self.timeout_grace:g} s"
            f" of grace; its thread was left running", stack), attempt.process_id)
        log.warning("job %s (%s): attempt %d given up after its %g s time limit; a new "
                    "worker takes its slot", job.id, job.kind, job.attempt, attempt.limit)
        qs = self._queue_states[job.queue]
        with self._wake:
            self._finished.append(ended)
            self._wake.notify()
            if self._stopping:          # stop() hands every slot its end-of-work marker
                return
            worker = threading.Thread(target=self._work_loop, args=(qs, attempt.slot),
                                      daemon=True, name=f"{qs.name}-{attempt.slot}-{self.host_id}")
            self._workers.append(worker)
        worker.start()

    def _execute(self, job: _Claimed, handler: _Registered | None, process_id: str) -> _Ended:
        """Run the handler and turn whatever happens into a finish. Never raises."""
        started = time.perf_counter()
        cooldown_until = self._queue_states[job.queue].cooldown_until
        if cooldown_until > self._clock.now_ms():   # throttled while it waited in the buffer
            return self._requeue(job, cooldown_until, process_id, "requeued (cool-down)")
        try:
            job.token.raise_if_cancelled()      # e.g. paused while it waited in the buffer
            if handler is None:
                raise LookupError(f"no handler registered for kind {job.kind!r}")
            ctx = JobCtx(self.storage, self.router, self.rate_limit, job.id, process_id,
                         self.host_id, job.token, job.attempt, job.kind, job.queue,
                         _lease=job.lease, _reports=self._progress)
            if job_log.isEnabledFor(logging.DEBUG):
                job_log.debug("%s %s attempt %d starting on %s", job.id, job.kind,
                              job.attempt, process_id)
            try:
                payload = _decode_stored(job.payload, f"the payload of job {job.id}")
            except SqliteqError as exc:     # no attempt can do better
                raise Dead(str(exc)) from None
            value = handler.fn(ctx, payload)
            if handler.is_async:
                value = self._event_loop.run(value, job.token)
            result = _encode_json(value, "the result of job %s", job.id)
            return _Ended(_Finish.done(job.id, job.lease, self._clock.now_ms(), process_id,
                                       result), job, "done", time.perf_counter() - started)
        except BaseException as exc:    # nothing a handler does may kill a worker thread
            # (SystemExit and KeyboardInterrupt too: only the main thread gets signals, so
            # in a worker they come from the handler, argparse on bad input, say.)
            return self._verdict(job, exc, process_id)._replace(
                seconds=time.perf_counter() - started)

    def _verdict(self, job: _Claimed, exc: BaseException, process_id: str) -> _Ended:
        now, token = self._clock.now_ms(), job.token
        if isinstance(exc, Snooze):
            return self._requeue(job, now + int(exc.after * 1000), process_id, "snoozed")
        if isinstance(exc, Throttled):
            until = now + int(exc.retry_after * 1000)
            qs = self._queue_states[job.queue]
            with self._wake:            # the dispatcher's settings sync raises it too
                qs.cooldown_until = max(qs.cooldown_until, until)
            return self._requeue(job, until, process_id, "throttled")._replace(
                cool_down_until=until)
        if token.cancelled and token.reason in ("paused", "shutdown"):
            return self._requeue(job, now, process_id, f"requeued ({token.reason})")
        if token.reason == "timeout" and not isinstance(exc, (Outcome, TimeLimitExceeded)):
            timed_out = TimeLimitExceeded(
                f"the handler ran past its "
                f"{self._time_limit(job, self._handlers.get(job.kind)) or 0:g} s time limit")
            timed_out.__cause__, exc = exc, timed_out      # the traceback shows where it was
        if isinstance(exc, Cancelled) or (token.cancelled and token.reason == "cancelled"):
            return _Ended(_Finish.cancelled(job.id, job.lease, now, process_id,
                                            self._errors_with(job, exc, now)), job, "cancelled")
        if isinstance(exc, Dead) or job.attempt >= job.max_attempts:
            log.warning("job %s (%s) failed for good on attempt %d: %s", job.id, job.kind,
                        job.attempt, _log_line(exc))
            return _Ended(_Finish.failed(job.id, job.lease, now, process_id,
                                         self._errors_with(job, exc, now)), job, "failed")
        if isinstance(exc, Retry) and exc.after is not None:
            delay_ms = int(exc.after * 1000)
        else:
            base, cap = self._queue_states[job.queue].backoff
            delay = min(base * 2 ** min(job.attempt - 1, 62), cap)
            delay_ms = int(delay / 2 + random.uniform(0, delay / 2))
        log.debug("job %s (%s) attempt %d failed (%s); retrying in %.1f s", job.id, job.kind,
                  job.attempt, _log_line(exc), delay_ms / 1000)
        return _Ended(_Finish.retry(job.id, job.lease, now, process_id,
                                    self._errors_with(job, exc, now), now + delay_ms),
                      job, "retry")

    def _requeue(self, job: _Claimed, run_at: int, process_id: str | None, outcome: str
                 ) -> _Ended:
        """Back to the queue at `run_at` with the attempt refunded."""
        return _Ended(_Finish.requeue(job.id, job.lease, self._clock.now_ms(), process_id,
                                      job.errors, run_at), job, outcome)

    @staticmethod
    def _errors_with(job: _Claimed, exc: BaseException, now: int) -> str:
        errors = [] if job.errors is None else _json_decode(job.errors)
        trace = exc.stack if isinstance(exc, TimeLimitExceeded) else None
        errors.append({"at": _iso_from_ms(now), "attempt": job.attempt,
                       "error": f"{type(exc).__name__}: {_describe(exc)}",
                       "traceback": trace or "".join(traceback.format_exception(
                           type(exc), exc, exc.__traceback__))})
        return _json_encode(errors[-MAX_ERRORS_KEPT:])


# ------------------------------------------------------------------- Map ----
#
# `map(fn, items)` for batch scripts: one job per item in a queue of the run's own, run by a
# Runtime in this process (threads) or in worker processes, results yielded in item order.
# A run is known by its name, so a script killed halfway and started again finds its jobs:
# what is done is read back, what failed runs afresh, what a dead run held goes back to
# the queue with its attempt refunded.

_MAP_KIND = "sqliteq.map"
_MAP_WINDOW = 1000              # pending items read per poll, from the next one to yield
_MAP_POLL = 0.02                # seconds between polls while the next item is not done
_MAP_SHUTDOWN = 2.0             # seconds a stopping worker waits for its running items


@dataclass(frozen=True, slots=True)
class MapError:
    """What `map(..., errors="return")` yields for an item that failed: its last error."""

    index: int
    item: Any
    job_id: str
    error: str
    traceback: str | None


class MapItemFailed(SqliteqError):
    """An item of `map` ended failed or cancelled; `failure` says which, and why."""

    def __init__(self, failure: MapError) -> None:
        super().__init__(f"item {failure.index} failed: {failure.error}")
        self.failure = failure


def _map_name(fn: Callable[[Any], Any], items: Sequence[Any]) -> str:
    digest = hashlib.sha256()
    for item in items:
        digest.update(_json_encode(item).encode())
        digest.update(b"\n")
    module, qualname = getattr(fn, "__module__", "?"), getattr(fn, "__qualname__", "?")
    return f"{module}.{qualname}:{digest.hexdigest()[:16]}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:             # someone else's process: alive
        return True
    return True


def _map_runtime(storage: Storage, queue: str, slots: int, fn: Callable[[Any], Any]
                 ) -> Runtime:
    """A runtime for one run's queue: short leases, so that a rerun after a crash of
    another machine's worker finds its jobs soon; a short shutdown, as items are
    refunded when stopped."""
    runtime = Runtime(storage, {queue: slots}, poll_interval=0.02, heartbeat_interval=0.5,
                      lease_timeout=5.0, shutdown_timeout=_MAP_SHUTDOWN)
    runtime.register(_MAP_KIND, lambda ctx, payload: fn(payload["item"]))
    return runtime


def _map_child(target: str, schema: str | None, queue: str, fn: Callable[[Any], Any],
               stop: Any) -> None:
    """A worker process of `map(processes=True)`: one slot, until told to stop or its
    parent is gone (then its running job goes back to the queue, refunded)."""
    import multiprocessing
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # the parent's Ctrl-C is the parent's
    parent = multiprocessing.parent_process()
    with Storage(target, schema=schema) as storage:
        runtime = _map_runtime(storage, queue, 1, fn)
        runtime.start()
        try:
            while not stop.wait(0.2) and (parent is None or parent.is_alive()) \
                    and runtime.error is None:
                pass
        finally:
            runtime.stop()


class _MapProgress:
    """A one-line progress bar on a terminal: done / failed / rate / ETA."""

    def __init__(self, total: int, stream: Any) -> None:
        self.total, self.stream = total, stream
        self.started = self.shown = time.monotonic()
        self.first: int | None = None   # items already done when this try began

    def show(self, done: int, failed: int, final: bool = False) -> None:
        now = time.monotonic()
        if self.first is None:
            self.first = done + failed
        if not final and now - self.shown < 0.2:
            return
        self.shown = now
        ran = done + failed - self.first
        rate = ran / max(now - self.started, 1e-9)
        left = self.total - done - failed
        eta = f"{left / rate:.0f} s" if rate > 0 else "?"
        self.stream.write(f"\r{done}/{self.total} done, {failed} failed, {rate:,.0f}/s, "
                          f"ETA {eta} \x1b[K" + ("\n" if final else ""))
        self.stream.flush()


class _MapRun:
    """One run of `map`: its jobs, and the workers that run them."""

    def __init__(self, storage: Storage, name: str, items: list[Any], max_attempts: int,
                 timeout: float | None) -> None:
        self.storage, self.name, self.items = storage, name, items
        self.queue = "map:" + name
        self.max_attempts, self.timeout = max_attempts, timeout
        self.ids: list[str] = []
        self.done = self.failed = 0

    def prepare(self) -> None:
        """Find the jobs of an earlier try, take back what a dead try held, and enqueue the
        items that have no job or whose job failed."""
        self._recover_dead_runs()
        latest: dict[int, tuple[str, str]] = {}
        for job_id, state, payload in self.storage.jobs._store.jobs_of_queue(self.queue):
            index = payload.get("index") if isinstance(payload, dict) else None
            if not isinstance(index, int) or not 0 <= index < len(self.items) \
                    or payload.get("item") != self.items[index]:
                raise InvalidInput(f"map {self.name!r} was started with other items (job "
                                   f"{job_id} does not match item {index}); give it "
                                   f"another name")
            latest[index] = (job_id, state)     # (ids ascend: the last try wins)
        again = [index for index in range(len(self.items))
                 if latest.get(index, ("", "failed"))[1] in ("failed", "cancelled")]
        outcomes = self.storage.jobs.enqueue_bulk([
            EnqueueRequest(_MAP_KIND, {"index": index, "item": self.items[index]},
                           queue_name=self.queue, max_attempts=self.max_attempts,
                           timeout=self.timeout) for index in again])
        for index, outcome in zip(again, outcomes, strict=True):
            latest[index] = (outcome.job_id, "queued")
        self.ids = [latest[index][0] for index in range(len(self.items))]

    def _recover_dead_runs(self) -> None:
        """Release the jobs of this run's dead processes on this machine (refunded: a kill
        is not a failed attempt). Refuse if one lives on: worker processes of a killed
        run stop on their own within _MAP_SHUTDOWN, so wait for that first."""
        store = self.storage.jobs._store
        deadline = time.monotonic() + _MAP_SHUTDOWN + 5
        while True:
            alive = []
            for process in self.storage.processes.list():
                if self.queue not in process.queues:
                    continue
                here = process.hostname == _HOSTNAME
                if here and process.pid != os.getpid() and not _pid_alive(process.pid):
                    claims = [(job_id, lease) for job_id, (lease, _)
                              in store.running_here(process.host_id).items()]
                    self.storage.db.write(functools.partial(
                        store.release_orphans, claims=claims, now=self.storage.db.clock_ms()))
                    self.storage.processes.remove(process.host_id)
                elif here or time.time() - process.heartbeat_at.timestamp() < 60:
                    alive.append(process)
            if not alive:
                return
            if time.monotonic() > deadline or alive[0].pid == os.getpid():
                raise SqliteqError(f"map {self.name!r} is running in process {alive[0].pid} "
                                   f"on {alive[0].hostname}; wait for it or stop it first")
            time.sleep(0.1)

    def results(self, errors: str, progress: _MapProgress | None) -> Iterator[Any]:
        """Each item's result in item order, as the jobs finish."""
        store = self.storage.jobs._store
        ended: dict[str, tuple[str, Any, Any]] = {}
        for index, job_id in enumerate(self.ids):
            while job_id not in ended:
                window = [i for i in self.ids[index:index + _MAP_WINDOW] if i not in ended]
                found = store.ended_among(window)
                ended.update(found)
                self.done += sum(state == "done" for state, _, _ in found.values())
                self.failed += sum(state != "done" for state, _, _ in found.values())
                if progress is not None:
                    progress.show(self.done, self.failed)
                if job_id not in ended:
                    time.sleep(_MAP_POLL)
            state, result, job_errors = ended.pop(job_id)
            if state == "done":
                yield result
                continue
            last = job_errors[-1] if job_errors else {}
            error = str(last.get("error") or state)
            failure = MapError(index, self.items[index], job_id, error, last.get("traceback"))
            if errors == "return":
                yield failure
            else:
                raise MapItemFailed(failure)


def map(fn: Callable[[Any], Any], items: Iterable[Any], *, db: str | Storage = "sqliteq.db",
        schema: str | None = None, name: str | None = None, workers: int | None = None,
        processes: bool = False, timeout: timedelta | float | None = None,
        max_attempts: int = 1, errors: str = "raise", progress: bool | None = None
        ) -> Iterator[Any]:
    """Run `fn(item)` for every item as durable jobs and yield the results in item order.

    Called again after a crash or Ctrl-C with the same run (`name`, by default derived from
    `fn` and the items), it runs only what did not finish: finished results are read back,
    failed items run again. Items and results are JSON. `db` is a path or a PostgreSQL URL
    (`schema` as for Storage), or a Storage (not with processes). `processes=True` runs `workers`
    worker processes (default: one per core; `fn` must be importable), else `workers`
    threads (default 8). A failed item raises MapItemFailed, or with `errors="return"` is
    yielded as a MapError. A progress line goes to stderr when it is a terminal.
    """
    # As the handlers will see them (and as a rerun finds them stored): JSON, decoded.
    items = [_json_decode(_encode_json(item, "item %d", index))
             for index, item in enumerate(items)]
    if errors not in ("raise", "return"):
        raise InvalidInput(f"errors must be 'raise' or 'return', not {errors!r}")
    if workers is not None and (not isinstance(workers, int) or isinstance(workers, bool)
                                or workers < 1):
        raise InvalidInput(f"workers must be an integer >= 1, not {workers!r}")
    if processes and isinstance(db, Storage):
        raise InvalidInput("map(processes=True) opens the database in each worker process: "
                           "pass db as a path or URL, not a Storage")
    name = _check_name(name, "name") if name is not None else _map_name(fn, items)
    EnqueueRequest(_MAP_KIND, None, max_attempts=max_attempts, timeout=timeout)   # validates
    if progress is None:
        progress = sys.stderr.isatty()
    return _map_results(fn, items, db, schema, name, workers, processes, timeout,
                        max_attempts, errors, progress)


def _map_results(fn: Callable[[Any], Any], items: list[Any], db: str | Storage,
                 schema: str | None, name: str, workers: int | None, processes: bool,
                 timeout: timedelta | float | None, max_attempts: int, errors: str,
                 progress: bool) -> Iterator[Any]:
    import multiprocessing
    storage = db if isinstance(db, Storage) else Storage(db, schema=schema)
    run = _MapRun(storage, name, items, max_attempts,
                  None if timeout is None else _time_limit(timeout, "timeout"))
    bar = _MapProgress(len(items), sys.stderr) if progress else None
    runtime: Runtime | None = None
    children: list[Any] = []
    stop = None
    try:
        run.prepare()
        if processes:
            context = multiprocessing.get_context("spawn")
            stop = context.Event()
            children = [context.Process(target=_map_child, name=f"sqliteq-map-{n}",
                                        args=(db, schema, run.queue, fn, stop), daemon=True)
                        for n in range(workers or os.cpu_count() or 1)]
            for child in children:
                child.start()
        else:
            runtime = _map_runtime(storage, run.queue, workers or 8, fn)
            runtime.start()
        yield from run.results(errors, bar)
    finally:
        if runtime is not None:
            runtime.stop()
        if stop is not None:
            stop.set()
        for child in children:
            child.join(_MAP_SHUTDOWN + 10)
        if bar is not None:
            bar.show(run.done, run.failed, final=True)
        if storage is not db:
            storage.close()


# ------------------------------------------------------------------- Demo ----

def _run_demo(storage: Storage, count: int = 10_000,
             progress: Callable[[int], Any] | None = None) -> dict[str, str]:
    """The workload behind `sqliteq demo`; returns a summary.

    A bootstrap job fans out `count` sub-jobs with `ctx.enqueue_bulk`; each sub-job takes a
    token from the rate-limited scope "demo-api"; one in a thousand fails on its first
    attempt and is retried; a cron schedule ticks every second. `progress(total)` may return
    a context manager with `update(n)` (a progress bar).
    """
    storage.rate_limits.configure("demo-api", capacity=100, refill_per_sec=5000)
    storage.queues.set_backoff("demo", 0.2, 1.0)
    rt = Runtime(storage, queues={"demo": 4, "demo-cron": 1}, poll_interval=0.02,
                 shutdown_timeout=5.0)
    lock = threading.Lock()
    tally = {"items": 0, "failures": 0, "ticks": 0}

    @rt.handler("demo_bootstrap")
    def bootstrap(ctx: JobCtx, payload: dict[str, int]) -> dict[str, int]:
        ctx.enqueue_bulk(EnqueueRequest("demo_item", {"n": n}, queue_name="demo")
                         for n in range(payload["jobs"]))
        return {"fanned_out": payload["jobs"]}

    @rt.handler("demo_item")
    def item(ctx: JobCtx, payload: dict[str, int]) -> dict[str, int]:
        ctx.rate_limit.acquire("demo-api", cancel=ctx.cancel)
        if payload["n"] % 1000 == 7 and ctx.attempt == 1:
            with lock:
                tally["failures"] += 1
            raise RuntimeError("flaky upstream (the demo fails this one once)")
        with lock:
            tally["items"] += 1
        return {"square": payload["n"] ** 2}

    @rt.handler("demo_tick")
    def tick(ctx: JobCtx, payload: None) -> None:
        with lock:
            tally["ticks"] += 1

    rt.cron("demo-tick", "* * * * * *", EnqueueRequest("demo_tick", queue_name="demo-cron"))
    started = time.perf_counter()
    with rt, (progress(count) if progress else contextlib.nullcontext()) as bar:
        rt.enqueue(EnqueueRequest("demo_bootstrap", {"jobs": count}, queue_name="demo"))
        shown = 0
        while True:
            time.sleep(0.1)
            if bar is not None:
                bar.update(tally["items"] - shown)
                shown = tally["items"]
            if tally["items"] >= count:
                counts = storage.jobs.counts("demo")
                if counts["queued"] == counts["running"] == 0:
                    break
    elapsed = time.perf_counter() - started
    return {"database": storage.path, "jobs run": f"{count + 1:,} (1 bootstrap + {count:,})",
            "retried after a failure": str(tally["failures"]), "cron ticks": str(tally["ticks"]),
            "time": f"{elapsed:.1f} s", "throughput": f"{(count + 1) / elapsed:,.0f} jobs/s"}


# -------------------------------------------------------------------- CLI ----

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_duration(text: str) -> float:
    """Seconds in "250ms", "30s", "5m", "2h", "7d", "1w" or a plain number of seconds."""
    stripped = text.strip().lower()
    for unit in sorted(_DURATION_UNITS, key=len, reverse=True):
        if stripped.endswith(unit):
            number, scale = stripped[: -len(unit)], _DURATION_UNITS[unit]
            break
    else:
        number, scale = stripped, 1.0
    try:
        seconds = float(number) * scale
    except ValueError:
        raise InvalidInput(f"bad duration {text!r}; use e.g. 30s, 5m, 2h, 7d") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise InvalidInput(f"bad duration {text!r}: must be a non-negative time")
    return seconds


def parse_instant(text: str) -> datetime:
    """An ISO 8601 time with a UTC offset ("2026-12-01T09:30:00Z", "...+01:00")."""
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise InvalidInput(f"bad time {text!r}; use ISO 8601 such as 2026-12-01T09:30:00Z"
                           ) from None
    if moment.tzinfo is None:
        raise InvalidInput(f"time {text!r} has no UTC offset; add Z or e.g. +01:00")
    return moment


def _request_from_line(fields: Any) -> EnqueueRequest:
    """An EnqueueRequest from one JSON Lines record of `sqliteq enqueue-bulk`."""
    if not isinstance(fields, dict):
        raise InvalidInput("expected a JSON object")
    fields = dict(fields)
    unknown = set(fields) - {"kind", "payload", "queue", "priority", "delay", "run_at",
                             "unique_key", "max_attempts", "timeout"}
    if unknown:
        raise InvalidInput(f"unknown field(s) {', '.join(sorted(unknown))}")
    if "kind" not in fields:
        raise InvalidInput("missing field 'kind'")
    run_at: datetime | float | None = None
    if "delay" in fields and "run_at" in fields:
        raise InvalidInput("give 'delay' or 'run_at', not both")
    if "delay" in fields:
        delay = fields["delay"]
        run_at = time.time() + (parse_duration(delay) if isinstance(delay, str)
                                else _duration_seconds(delay, "delay"))
    elif "run_at" in fields:
        value = fields["run_at"]
        run_at = parse_instant(value) if isinstance(value, str) else value
    timeout = fields.get("timeout")
    return EnqueueRequest(fields["kind"], fields.get("payload"), queue_name=fields.get("queue"),
                          priority=fields.get("priority", 0), run_at=run_at,
                          max_attempts=fields.get("max_attempts"),
                          unique_key=fields.get("unique_key"),
                          timeout=parse_duration(timeout) if isinstance(timeout, str) else timeout)


def _job_dict(job: Job, *, full: bool = False) -> dict[str, Any]:
    """A job as plain JSON-ready data (stable keys, times in ISO 8601)."""
    data: dict[str, Any] = {
        "id": job.id, "kind": job.kind, "queue": job.queue, "state": job.state.value,
        "priority": job.priority, "attempt": job.attempt, "max_attempts": job.max_attempts,
        "unique_key": job.unique_key, "run_at": _iso(job.run_at),
        "created_at": _iso(job.created_at), "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at), "worker": job.worker, "host": job.host,
        "cancel_requested": job.cancel_requested, "timeout": job.timeout,
        "progress": None if job.progress is None else job.progress._asdict(),
        "last_error": job.errors[-1]["error"] if job.errors else None,
    }
    if full:
        data.update(payload=job.payload, result=job.result, errors=job.errors)
    return data


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else _iso_from_ms(int(moment.timestamp() * 1000))


# Control characters in kinds, payloads or errors would drive the terminal they are printed
# on (colours, cursor moves, a rewritten title bar): the CLI prints them as escapes instead.
# Also lone surrogates (not text a terminal can take) and bidi overrides (they reorder what
# follows them on the line).
_UNPRINTABLE = "\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff"
_CONTROLS = re.compile(f"[\x00-\x08\x0b-\x1f{_UNPRINTABLE}]")     # all but tab and newline
_JSON_UNESCAPED_CONTROLS = re.compile(f"[{_UNPRINTABLE}]")      # json.dumps escapes the rest


def _printable(text: str) -> str:
    """`text` with its control characters (bar tab and newline) written as escapes."""
    return _CONTROLS.sub(lambda found: found.group().encode("unicode_escape").decode(), text)


def _printable_json(text: str) -> str:
    """JSON text with the characters above as \\u escapes too (the same JSON values)."""
    return _JSON_UNESCAPED_CONTROLS.sub(lambda found: f"\\u{ord(found.group()):04x}", text)


def _progress_text(progress: JobProgress) -> str:
    """`3/10 (30 %) resizing b.png`"""
    done, total, note = progress
    text = f"{done:g}" if total is None else f"{done:g}/{total:g}"
    if total:
        text += f" ({100 * done / total:.0f} %)"
    return _printable(f"{text} {note}" if note else text)


def _cell(value: Any) -> str:
    return "-" if value is None else _printable(str(value)).replace("\t", "\\t").replace(
        "\n", "\\n")


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("  ".join(value.ljust(width) for value, width in zip(row, widths,
                                                                         strict=True)).rstrip()
                     for row in cells)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.1f}s"


def _status_data(storage: Storage) -> dict[str, Any]:
    return {
        "queues": [{"name": q.name, "ready": q.ready, "scheduled": q.scheduled,
                    "running": q.running, "done": q.done, "failed": q.failed,
                    "cancelled": q.cancelled, "paused": q.paused, "limit": q.limit,
                    "jobs_per_minute": round(q.jobs_per_minute, 1),
                    "oldest_ready_age_seconds": (None if q.oldest_ready_age is None
                                                 else round(q.oldest_ready_age, 3))}
                   for q in storage.queues.stats()],
        "processes": [{"host_id": p.host_id, "hostname": p.hostname, "pid": p.pid,
                       "queues": p.queues, "started_at": _iso(p.started_at),
                       "heartbeat_at": _iso(p.heartbeat_at)}
                      for p in storage.processes.list()],
    }


def _status_text(data: dict[str, Any]) -> str:
    queues = _table(
        ("QUEUE", "READY", "SCHEDULED", "RUNNING", "DONE", "FAILED", "CANCELLED", "PAUSED",
         "LIMIT", "JOBS/MIN", "OLDEST READY"),
        [(q["name"], q["ready"], q["scheduled"], q["running"], q["done"], q["failed"],
          q["cancelled"], "yes" if q["paused"] else "no", q["limit"], q["jobs_per_minute"],
          _age(q["oldest_ready_age_seconds"])) for q in data["queues"]])
    processes = _table(("HOST", "PID", "HOSTNAME", "QUEUES", "HEARTBEAT"),
                       [(p["host_id"], p["pid"], p["hostname"],
                         ",".join(f"{k}={v}" for k, v in p["queues"].items()),
                         p["heartbeat_at"]) for p in data["processes"]])
    if not data["processes"]:
        return f"{queues}\n\nno live processes"
    return f"{queues}\n\n{len(data['processes'])} live process(es)\n{processes}"


# -------------------------------------------------------------- Dashboard ----
# A WSGI app (the standard library's wsgiref serves it for `sqliteq dashboard`): pages
# rendered here, every value escaped on the way out; a few lines of JS, served from the app
# itself, refresh the overview. The Content-Security-Policy allows no inline script at all,
# so even a value that escaped escaping could not run.

DASHBOARD_REFRESH_SECONDS = 2
DASHBOARD_PAGE_SIZE = 50
_TRUNCATED_PAYLOAD = 120        # characters of a payload shown in lists
_CHART_RANGES = {"hour": (3600, 60), "day": (86400, 1800), "week": (7 * 86400, 3 * 3600)}
_SECURITY_HEADERS = [
    ("Content-Security-Policy", ("default-src 'none'; script-src 'self'; style-src 'self';"
                                 " img-src 'self'; connect-src 'self'; form-action 'self';"
                                 " frame-ancestors 'none'; base-uri 'none'")),
    ("X-Content-Type-Options", "nosniff"), ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
]
_DASHBOARD_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 0; color: #1d2330; background: #f6f7f9 }
header { background: #1d2330; color: #fff; padding: 8px 20px; display: flex; gap: 20px }
header a { color: #fff; text-decoration: none } header b { margin-right: auto }
main { padding: 12px 20px } h2 { font-size: 16px; margin: 20px 0 6px }
table { border-collapse: collapse; background: #fff; width: 100% }
th, td { text-align: left; padding: 4px 8px; border-bottom: 1px solid #e3e6eb;
         vertical-align: top }
td.n { text-align: right; font-variant-numeric: tabular-nums }
pre { background: #fff; padding: 8px; overflow: auto; max-height: 30em; white-space: pre-wrap }
form.inline { display: inline } button { cursor: pointer }
.charts { display: flex; gap: 16px; flex-wrap: wrap } .chart { background: #fff; padding: 6px }
.failed, .error { color: #b42318 } .paused { color: #b54708 } .muted { color: #6b7280 }
nav.ranges a { margin-right: 8px }
"""
_DASHBOARD_JS = """
"use strict";
const live = document.getElementById("live");
if (live) {
  setInterval(async () => {
    try {
      const reply = await fetch(live.dataset.src, {credentials: "same-origin"});
      if (reply.ok) live.innerHTML = await reply.text();
    } catch (error) { /* the server is away: the next tick tries again */ }
  }, live.dataset.every * 1000);
}
document.addEventListener("submit", (event) => {
  const question = event.target.dataset.confirm;
  if (question && !window.confirm(question)) event.preventDefault();
});
"""


def _h(value: Any) -> str:
    """HTML text of any value, escaped (quotes too: safe inside attributes)."""
    return html.escape("-" if value is None else str(value), quote=True)


def _when(moment: datetime | None) -> str:
    return "-" if moment is None else moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _per_minute(value: float) -> str:
    return f"{value:,.3g}/min"


def _duration(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds:.3g} s" if seconds < 60 else _age(seconds)


def _svg_chart(title: str, values: Sequence[float | None], shown: Callable[[float], str]
               ) -> str:
    """A line chart of `values` (None: a gap), oldest left, as inline SVG; `shown` writes
    a value as text."""
    width, height, top = 380, 110, 12
    peak = max((v for v in values if v is not None), default=0.0)
    scale = peak or 1.0
    step = width / max(1, len(values) - 1)
    lines: list[list[str]] = []
    run: list[str] = []
    for i, value in enumerate(values):
        if value is None:
            lines, run = ([*lines, run] if run else lines), []
            continue
        run.append(f"{i * step:.1f},{top + (height - top) * (1 - value / scale):.1f}")
    lines = [*lines, run] if run else lines
    drawn = "".join(f'<polyline points="{" ".join(points)}" fill="none" stroke="#2563eb"'
                    f' stroke-width="1.5"/>' for points in lines)
    latest = next((v for v in reversed(values) if v is not None), None)
    return (f'<div class="chart"><div>{_h(title)}: <b>'
            f'{"-" if latest is None else _h(shown(latest))}</b>'
            f' <span class="muted">(peak {_h(shown(peak))})</span></div>'
            f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}"'
            f' role="img" aria-label="{_h(title)}"><line x1="0" y1="{height}" x2="{width}"'
            f' y2="{height}" stroke="#c7ccd4"/>{drawn}</svg></div>')


def _prometheus_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _prometheus_text(storage: Storage) -> str:
    """The store's state in Prometheus's text exposition format (version 0.0.4): queue
    depths and oldest ready age (gauges), attempts by outcome and the sums and counts of
    run and wait time (counters, from the never-swept totals), and run and wait quantiles
    over the last five minutes."""
    lines: list[str] = []

    def family(name: str, kind: str, text: str,
               samples: Iterable[tuple[str, dict[str, str], float | None]]) -> None:
        lines.extend((f"# HELP {name} {text}", f"# TYPE {name} {kind}"))
        for suffix, labels, value in samples:
            shown = ",".join(f'{k}="{_prometheus_label(v)}"' for k, v in labels.items())
            number = "NaN" if value is None else repr(float(value))
            lines.append(f"{name}{suffix}{{{shown}}} {number}" if shown
                         else f"{name}{suffix} {number}")

    now = storage.db.clock_ms()
    depths = storage._store.depths(now)
    queues = {q.name: q for q in storage.queues.list()}
    names = sorted({*queues, *depths})
    family("sqliteq_jobs", "gauge", "Jobs by queue and state.",
           (("", {"queue": name, "state": state}, depth)
            for name in names for state, depth in zip(
                ("ready", "scheduled", "running", "failed"),
                depths.get(name, _QueueDepth())[:4], strict=True)))
    family("sqliteq_oldest_ready_age_seconds", "gauge",
           "How long the oldest ready job of the queue has waited.",
           (("", {"queue": name}, max(0.0, (now - oldest) / 1000)) for name in names
            if (oldest := depths.get(name, _QueueDepth()).oldest_run_at) is not None))
    family("sqliteq_queue_paused", "gauge", "1 while the queue is paused.",
           (("", {"queue": name}, int(queue.paused)) for name, queue in queues.items()))
    family("sqliteq_processes", "gauge", "Runtime processes with a live heartbeat.",
           [("", {}, len(storage.processes.list()))])
    totals = storage.metrics.totals()
    family("sqliteq_attempts_total", "counter", "Attempts ended, by queue, kind and outcome.",
           (("", {"queue": t.queue, "kind": t.kind, "outcome": outcome}, n) for t in totals
            for outcome, n in (("done", t.done), ("failed", t.failed),
                               ("retried", t.retried), ("cancelled", t.cancelled))))
    recent = storage.metrics._by_key(now - 5 * _MINUTE_MS, now)
    for series, what in (("run", "How long handlers ran"),
                         ("wait", "How long jobs waited from run_at to their claim")):
        samples: list[tuple[str, dict[str, str], float | None]] = []
        for total in totals:
            labels = {"queue": total.queue, "kind": total.kind}
            rollup = recent.get((total.queue, total.kind))
            timings = None if rollup is None else getattr(rollup, series).timings()
            quantiles = (None, None, None) if timings is None else (
                timings.p50, timings.p95, timings.p99)
            samples += [("", {**labels, "quantile": q}, value)
                        for q, value in zip(("0.5", "0.95", "0.99"), quantiles, strict=True)]
            count, seconds = ((total.run_jobs, total.run_seconds) if series == "run"
                              else (total.wait_jobs, total.wait_seconds))
            samples += [("_sum", labels, seconds), ("_count", labels, count)]
        family(f"sqliteq_{series}_seconds", "summary",
               f"{what} (quantiles: the last 5 minutes).", samples)
    return "\n".join(lines) + "\n"


class _ClosedSteps:
    """A chart's points, the steps that ended kept: a stored minute changes only until
    every runtime has flushed it (about a second after it ends), so a week's chart reads
    once, then only its open step, not 30,000 minutes per refresh. Shared by the
    requests of one app, hence the lock."""

    SETTLED_MS = 2 * _MINUTE_MS         # a step that ended this long ago is final

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.lock = threading.Lock()
        self.final: dict[int, tuple[int, dict[int, MetricsPoint]]] = {}  # step -> upto, points

    def points(self, since_ms: int, now: int, step_ms: int) -> dict[int, MetricsPoint]:
        """Points by their start (ms) from `since_ms` (a step's start) to `now`."""
        settled = now - self.SETTLED_MS - (now - self.SETTLED_MS) % step_ms
        with self.lock:
            upto, final = self.final.get(step_ms, (since_ms, {}))
        if upto > now:                              # the clock went back: start over
            upto, final = since_ms, {}
        upto = max(upto, since_ms)                  # (older steps are no longer shown)
        fresh = {int(p.start.timestamp() * 1000): p for p in self.metrics.series(
            since=upto / 1000, until=now / 1000, step=step_ms / 1000)}
        final = {**{start: p for start, p in final.items() if start >= since_ms},
                 **{start: p for start, p in fresh.items() if start < settled}}
        with self.lock:
            self.final[step_ms] = (max(upto, settled), final)
        return {**final, **fresh}


class _Request:
    """What a handler of the dashboard reads of one WSGI request."""

    def __init__(self, environ: dict[str, Any]) -> None:
        self.method = str(environ.get("REQUEST_METHOD", "GET"))
        self.path = str(environ.get("PATH_INFO", "/")) or "/"
        self.query = {k: v[-1] for k, v in urllib.parse.parse_qs(
            str(environ.get("QUERY_STRING", ""))).items()}
        self.form: dict[str, str] = {}
        if self.method == "POST":
            length = int(environ.get("CONTENT_LENGTH") or 0)
            body = environ["wsgi.input"].read(min(length, 1 << 16)).decode("utf-8", "replace")
            self.form = {k: v[-1] for k, v in urllib.parse.parse_qs(body).items()}
        # Where the app is mounted, percent-encoded: safe in a link and a Location header.
        self.root = urllib.parse.quote(str(environ.get("SCRIPT_NAME", "")).rstrip("/"))
        self.authorization = str(environ.get("HTTP_AUTHORIZATION", ""))
        cookies = http.cookies.SimpleCookie(str(environ.get("HTTP_COOKIE", "")))
        self.cookie_token = cookies["sqliteq_token"].value if "sqliteq_token" in cookies else ""


class _Reply(NamedTuple):
    status: str
    body: str
    content_type: str = "text/html; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()


class _HttpError(Exception):
    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status


class _DashboardPages:
    """The dashboard's pages and actions for one request. `root` is where the app is
    mounted (WSGI's SCRIPT_NAME): every link starts with it; `back` fields do not."""

    def __init__(self, storage: Storage, read_only: bool, csrf: str, root: str,
                 charts: _ClosedSteps) -> None:
        self.storage, self.read_only, self.csrf, self.root = storage, read_only, csrf, root
        self.charts = charts

    def route(self, request: _Request) -> _Reply:
        parts = [part for part in request.path.split("/") if part]   # (PATH_INFO: decoded)
        if request.method == "POST":
            return self._act(request, parts)
        if request.method not in ("GET", "HEAD"):
            raise _HttpError("405 Method Not Allowed", f"{request.method} is not served here")
        if not parts:
            chart = request.query.get("range", "hour")
            return _Reply("200 OK", self.page("Overview", (
                f'<div id="live" data-every="{DASHBOARD_REFRESH_SECONDS}"'
                f' data-src="{self.root}/live?range={_h(urllib.parse.quote(chart))}">'
                f'{self._live(chart)}</div>')))
        if parts == ["live"]:
            return _Reply("200 OK", self._live(request.query.get("range", "hour")))
        if parts == ["jobs"]:
            return _Reply("200 OK", self.page("Jobs", self._jobs(request.query)))
        if len(parts) == 2 and parts[0] == "jobs":
            return _Reply("200 OK", self.page(f"Job {parts[1]}", self._job(parts[1])))
        if parts == ["metrics"]:
            return _Reply("200 OK", _prometheus_text(self.storage),
                          "text/plain; version=0.0.4; charset=utf-8")
        if parts == ["static", "app.css"]:
            return _Reply("200 OK", _DASHBOARD_CSS, "text/css; charset=utf-8")
        if parts == ["static", "app.js"]:
            return _Reply("200 OK", _DASHBOARD_JS, "text/javascript; charset=utf-8")
        raise _HttpError("404 Not Found", f"nothing at {request.path}")

    # -- pages --

    def page(self, title: str, content: str) -> str:
        root = self.root
        return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
                f'<meta name="viewport" content="width=device-width, initial-scale=1">'
                f'<title>{_h(title)} - sqliteq</title>'
                f'<link rel="stylesheet" href="{root}/static/app.css"></head><body>'
                f'<header><b>sqliteq</b><a href="{root}/">Overview</a>'
                f'<a href="{root}/jobs">Jobs</a><a href="{root}/metrics">Metrics</a></header>'
                f'<main><h1>{_h(title)}</h1>{content}</main>'
                f'<script src="{root}/static/app.js"></script></body></html>')

    def _button(self, label: str, back: str, confirm: str | None = None, **fields: str
                ) -> str:
        """A form that POSTs an action (`fields`: do=, and job= or queue=) to /action with
        the CSRF token, then returns to `back`; nothing when read-only."""
        if self.read_only:
            return ""
        hidden = "".join(f'<input type="hidden" name="{_h(k)}" value="{_h(v)}">'
                         for k, v in {"csrf": self.csrf, "back": back, **fields}.items())
        asks = f' data-confirm="{_h(confirm)}"' if confirm else ""
        return (f'<form class="inline" method="post" action="{self.root}/action"{asks}>{hidden}'
                f'<button type="submit">{_h(label)}</button></form>')

    def _live(self, chart: str) -> str:
        """The overview's part that refreshes: queues, charts, processes, cron."""
        if chart not in _CHART_RANGES:
            raise InvalidInput(f"range must be one of {', '.join(_CHART_RANGES)}, not {chart!r}")
        storage, now = self.storage, self.storage.db.clock_ms()
        depths = storage._store.depths(now)
        queues = {q.name: q for q in storage.queues.list()}
        rows = []
        for name in sorted({*queues, *depths}):
            ready, scheduled, running, failed, oldest = depths.get(name, _QueueDepth())
            queue = queues.get(name)
            paused = queue is not None and queue.paused
            link = f"{self.root}/jobs?queue={urllib.parse.quote(name, safe='')}"
            actions = self._button("Resume" if paused else "Pause", "/",
                                   do="resume" if paused else "pause", queue=name)
            if failed:
                actions += self._button("Retry failed", "/",
                                        f"Retry the {failed} failed job(s) of {name}?",
                                        do="retry-failed", queue=name)
            rows.append(
                f'<tr data-queue="{_h(name)}"><td><a href="{_h(link)}">{_h(name)}</a></td>'
                f'<td class="n ready">{ready}</td><td class="n scheduled">{scheduled}</td>'
                f'<td class="n running">{running}</td>'
                f'<td class="n failed"><a href="{_h(link)}&amp;state=failed">{failed}</a></td>'
                f'<td class="{"paused" if paused else ""}">{"paused" if paused else "active"}'
                f'</td><td class="n">{_h(None if queue is None else queue.limit)}</td>'
                f'<td class="n">{_age(None if oldest is None else (now - oldest) / 1000)}</td>'
                f'<td>{actions}</td></tr>')
        table = ('<table id="queues"><tr><th>queue</th><th>ready</th><th>scheduled</th>'
                 '<th>running</th><th>failed</th><th>state</th><th>limit</th>'
                 '<th>oldest ready</th><th></th></tr>' + "".join(rows) + "</table>")
        if not rows:
            table = '<p class="muted">No queues yet: enqueue a job.</p>'
        return (f"<h2>Queues</h2>{table}{self._charts(chart, now)}"
                f"<h2>Processes</h2>{self._processes(now)}<h2>Cron</h2>{self._cron()}")

    def _charts(self, chart: str, now: int) -> str:
        span, step = _CHART_RANGES[chart]
        start = now - span * 1000
        start -= start % (step * 1000)
        points = self.charts.points(start, now, step * 1000)
        slots = [start + i * step * 1000 for i in range((now - start) // (step * 1000) + 1)]
        ended = [(p.done + p.failed + p.retried + p.cancelled) / (step / 60) if p else 0.0
                 for p in (points.get(slot) for slot in slots)]
        waits = [p.wait.p95 if p else None for p in (points.get(slot) for slot in slots)]
        runs = [p.run.p95 if p else None for p in (points.get(slot) for slot in slots)]
        ranges = " ".join(f'<a href="{self.root}/?range={name}">'
                          f'{f"<b>{name}</b>" if name == chart else name}</a>'
                          for name in _CHART_RANGES)
        return (f'<h2>Last {chart}</h2><nav class="ranges">{ranges}</nav><div class="charts">'
                f'{_svg_chart("Attempts ended per minute", ended, _per_minute)}'
                f'{_svg_chart("Wait p95 (run_at to claim)", waits, _duration)}'
                f'{_svg_chart("Run time p95", runs, _duration)}</div>')

    def _processes(self, now: int) -> str:
        running: dict[str, list[tuple[str, str]]] = {}
        for job in self.storage._store.running_jobs(200):
            running.setdefault(job.host, []).append((job.id, job.kind))
        rows = "".join(
            f'<tr><td>{_h(p.host_id)}</td><td>{_h(p.hostname)}</td><td class="n">{p.pid}</td>'
            f'<td>{_h(", ".join(f"{k}={v}" for k, v in p.queues.items()))}</td>'
            f'<td>{_age(max(0.0, now / 1000 - p.heartbeat_at.timestamp()))} ago</td><td>'
            + " ".join(f'<a href="{self.root}/jobs/{_h(job_id)}">{_h(kind)}</a>'
                       for job_id, kind in running.get(p.host_id, []))
            + "</td></tr>" for p in self.storage.processes.list())
        if not rows:
            return '<p class="muted">No live processes.</p>'
        return ("<table><tr><th>host</th><th>hostname</th><th>pid</th><th>slots</th>"
                "<th>heartbeat</th><th>running</th></tr>" + rows + "</table>")

    def _cron(self) -> str:
        rows = "".join(
            f'<tr><td>{_h(c.name)}</td><td><code>{_h(c.expression)}</code></td>'
            f'<td>{_h(c.timezone or "UTC")}</td><td>{_h(c.request.kind)}</td>'
            f'<td>{_when(c.next_fire_at)}</td><td>{"yes" if c.enabled else "no"}</td>'
            f'<td class="error">{_h(c.last_error or "")}</td></tr>'
            for c in self.storage.cron.list())
        if not rows:
            return '<p class="muted">No cron schedules.</p>'
        return ("<table><tr><th>name</th><th>expression</th><th>time zone</th><th>kind</th>"
                "<th>next fire</th><th>enabled</th><th>last error</th></tr>" + rows + "</table>")

    def _jobs(self, query: Mapping[str, str]) -> str:
        filters = {key: query.get(key) or None for key in ("state", "queue", "kind", "id")}
        jobs = self.storage.jobs.list(filters["state"], filters["queue"], filters["kind"],
                                      DASHBOARD_PAGE_SIZE + 1, before=query.get("before") or None,
                                      id_prefix=filters["id"])
        more, jobs = len(jobs) > DASHBOARD_PAGE_SIZE, jobs[:DASHBOARD_PAGE_SIZE]
        options = "".join(f'<option{" selected" if filters["state"] == s else ""}>{s}</option>'
                          for s in ("", *(state.value for state in JobState)))
        form = (f'<form method="get" action="{self.root}/jobs">state <select name="state">'
                f'{options}</select> '
                + " ".join(f'{name} <input name="{name}" value="{_h(filters[name] or "")}"'
                           f' size="14">' for name in ("queue", "kind", "id"))
                + ' <button type="submit">Filter</button></form>')
        rows = []
        for job in jobs:
            payload = _json_encode(job.payload)
            if len(payload) > _TRUNCATED_PAYLOAD:
                payload = payload[:_TRUNCATED_PAYLOAD] + "…"
            rows.append(f'<tr><td><a href="{self.root}/jobs/{_h(job.id)}">'
                        f'<code>{_h(job.id)}</code></a></td><td>{_h(job.kind)}</td><td>{_h(job.queue)}</td>'
                        f'<td class="{_h(job.state.value)}">{_h(job.state.value)}</td>'
                        f'<td class="n">{job.attempt}/{job.max_attempts}</td>'
                        f'<td>{_when(job.created_at)}</td><td><code>{_h(payload)}</code></td></tr>')
        table = ("<table><tr><th>id</th><th>kind</th><th>queue</th><th>state</th>"
                 "<th>attempt</th><th>created</th><th>payload</th></tr>" + "".join(rows)
                 + "</table>") if rows else '<p class="muted">No jobs match.</p>'
        if more:
            following = {**{k: v for k, v in filters.items() if v}, "before": jobs[-1].id}
            older = f"{self.root}/jobs?{urllib.parse.urlencode(following)}"
            table += f'<p><a id="older" href="{_h(older)}">Older jobs →</a></p>'
        return form + table

    def _job(self, job_id: str) -> str:
        job = self.storage.jobs.get(job_id)
        if job is None:
            raise _HttpError("404 Not Found", f"no job {job_id}")
        back = f"/jobs/{job.id}"
        actions = []
        if job.state in (JobState.FAILED, JobState.CANCELLED):
            actions.append(self._button("Retry", back, do="retry", job=job.id))
        if job.state in (JobState.WAITING, JobState.QUEUED, JobState.RUNNING):
            actions.append(self._button("Cancel", back, do="cancel", job=job.id))
        due = job.run_at.timestamp() * 1000 <= self.storage.db.clock_ms()
        if job.state is JobState.QUEUED and not due:
            actions.append(self._button("Run now", back, do="run-now", job=job.id))
        if job.state is not JobState.RUNNING:
            actions.append(self._button("Delete", "/jobs", f"Delete job {job.id}?",
                                        do="delete", job=job.id))
        ran = (None if job.started_at is None or job.finished_at is None
               else (job.finished_at - job.started_at).total_seconds())
        fields = [("state", job.state.value), ("kind", job.kind), ("queue", job.queue),
                  ("priority", job.priority), ("attempt", f"{job.attempt} of {job.max_attempts}"),
                  ("unique key", job.unique_key), ("created", _when(job.created_at)),
                  ("run at", _when(job.run_at)), ("started", _when(job.started_at)),
                  ("finished", _when(job.finished_at)),
                  ("ran for", None if ran is None else f"{ran:.3f} s"),
                  ("host", job.host), ("worker", job.worker),
                  ("time limit", None if job.timeout is None else f"{job.timeout:g} s"),
                  ("progress", None if job.progress is None else _progress_text(job.progress)),
                  ("cancel requested", "yes" if job.cancel_requested else None),
                  ("waiting on", f"{job.waiting_on} of {len(job.depends_on)} parents"
                   if job.state is JobState.WAITING else None)]
        family = (("parents", job.depends_on), ("children", self.storage.jobs.children(job.id)))
        table = ("<table>" + "".join(f"<tr><th>{_h(k)}</th><td>{_h(v)}</td></tr>"
                                     for k, v in fields if v is not None)
                 + "".join(f"<tr><th>{name}</th><td>" + " ".join(
                     f'<a href="{self.root}/jobs/{_h(other)}"><code>{_h(other)}</code></a>'
                     for other in ids) + "</td></tr>" for name, ids in family if ids)
                 + "</table>")
        errors = "".join(
            f'<h3 class="error">Attempt {_h(e.get("attempt"))} at {_h(e.get("at"))}: '
            f'{_h(e.get("error"))}</h3><pre>{_h(e.get("traceback") or "")}</pre>'
            for e in job.errors if isinstance(e, dict))
        result = ("" if job.state is not JobState.DONE else
                  f"<h2>Result</h2><pre>{_h(json.dumps(job.result, indent=2))}</pre>")
        return (f'<p id="actions">{"".join(actions)}</p>{table}<h2>Payload</h2>'
                f'<pre id="payload">{_h(json.dumps(job.payload, indent=2))}</pre>{result}'
                + (f"<h2>Errors</h2>{errors}" if errors else ""))

    # -- actions --

    def _act(self, request: _Request, parts: list[str]) -> _Reply:
        """A POSTed action; then back to the page it came from."""
        if parts != ["action"]:
            raise _HttpError("404 Not Found", f"nothing to POST at {request.path}")
        if self.read_only:
            raise _HttpError("403 Forbidden", "this dashboard is read-only")
        if not hmac.compare_digest(request.form.get("csrf", ""), self.csrf):
            raise _HttpError("403 Forbidden", "the form's CSRF token is missing or stale:"
                             " reload the page")
        jobs, queues, form = self.storage.jobs, self.storage.queues, request.form
        job_actions: dict[str, Callable[[str], Any]] = {
            "retry": jobs.retry, "cancel": jobs.cancel, "run-now": jobs.run_now,
            "delete": jobs.delete}
        queue_actions: dict[str, Callable[[str], Any]] = {
            "pause": queues.pause, "resume": queues.resume,
            "retry-failed": lambda name: jobs.retry_failed(name, form.get("kind") or None)}
        action = form.get("do", "")
        if action in job_actions and form.get("job"):
            job_actions[action](form["job"])
        elif action in queue_actions and form.get("queue"):
            queue_actions[action](form["queue"])
        else:
            raise InvalidInput(f"unknown action {action!r}, or no job or queue for it")
        back = request.form.get("back", "/")
        if not back.startswith("/") or back.startswith("//"):
            back = "/"                  # never a redirect off this site
        return _Reply("303 See Other", "", headers=(("Location", self.root + back),))


class _Dashboard:
    """The WSGI app behind `dashboard_app`: the token, the error policy, the headers."""

    def __init__(self, storage: Storage, read_only: bool, token: str | None) -> None:
        self.storage = storage
        self.read_only = read_only
        self.token = token
        # Forms carry it; another site's page cannot read it (same-origin policy).
        self.csrf = secrets.token_urlsafe(32)
        self.charts = _ClosedSteps(storage.metrics)

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]
                 ) -> list[bytes]:
        request = _Request(environ)
        pages = _DashboardPages(self.storage, self.read_only, self.csrf, request.root,
                                self.charts)
        try:
            reply = self._authorized(request) or pages.route(request)
        except _HttpError as exc:
            reply = _Reply(exc.status, pages.page("Error", f"<p>{_h(exc)}</p>"))
        except InvalidInput as exc:
            reply = _Reply("400 Bad Request", pages.page("Error", f"<p>{_h(exc)}</p>"))
        except SqliteqError as exc:
            log.warning("dashboard: %s", exc)
            reply = _Reply("503 Service Unavailable", pages.page("Error", f"<p>{_h(exc)}</p>"))
        body = reply.body.encode("utf-8")
        start_response(reply.status, [("Content-Type", reply.content_type),
                                      ("Content-Length", str(len(body))),
                                      *_SECURITY_HEADERS, *reply.headers])
        return [body]

    def _authorized(self, request: _Request) -> _Reply | None:
        """None when the request may go on; else the reply that refuses or logs in."""
        if self.token is None:
            return None
        given = request.query.get("token")
        if given is not None and hmac.compare_digest(given, self.token):
            cookie = f"sqliteq_token={self.token}; HttpOnly; SameSite=Strict; Path=/"
            return _Reply("303 See Other", "", headers=(("Location", request.root + request.path),
                                                        ("Set-Cookie", cookie)))
        offered = request.authorization.removeprefix("Bearer ") or request.cookie_token
        if offered and hmac.compare_digest(offered, self.token):
            return None
        return _Reply("401 Unauthorized", "a token is required: open the dashboard's URL with"
                      " ?token=..., or send Authorization: Bearer ...\n", "text/plain",
                      (("WWW-Authenticate", "Bearer"),))


def dashboard_app(storage: Storage, *, read_only: bool = False, token: str | None = None
                  ) -> Callable[[dict[str, Any], Callable[..., Any]], list[bytes]]:
    """The dashboard as a WSGI app, to mount in any WSGI server behind your own auth.

    Pages: `/` (queues, charts, processes, cron; refreshes itself), `/jobs` (filters, pages
    by id), `/jobs/<id>`, and `/metrics` (Prometheus). Every action is a POST carrying
    the app's CSRF token; `read_only` shows none and refuses them. With `token`, every
    request must carry it: `Authorization: Bearer <token>`, or the cookie that visiting
    any page with `?token=<token>` sets."""
    if token is not None and (not isinstance(token, str) or len(token) < 8):
        raise InvalidInput("a dashboard token must be a string of at least 8 characters")
    return _Dashboard(storage, read_only, token)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _serve_dashboard(storage: Storage, host: str, port: int, *, read_only: bool,
                     token: str | None, ready: Callable[[str], None]) -> None:
    """Serve the dashboard on a thread per request until interrupted."""
    import socketserver
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    class Server(socketserver.ThreadingMixIn, WSGIServer):
        daemon_threads = True
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            log.debug("dashboard: " + format, *args)

    with make_server(host, port, dashboard_app(storage, read_only=read_only, token=token),
                     server_class=Server, handler_class=QuietHandler) as server:
        shown = f"[{host}]" if ":" in host else host
        ready(f"http://{shown}:{server.server_port}/")
        with contextlib.suppress(KeyboardInterrupt):
            server.serve_forever()


# ------------------------------------------------------- The sqliteq command ----

def _cli() -> Any:
    """Build the click command group (click is imported here only)."""
    import click

    def echo(text: str, err: bool = False) -> None:
        click.echo(_printable(text), err=err)

    def fail(message: str, code: int = 2) -> NoReturn:
        echo(f"sqliteq: error: {message}", err=True)
        raise SystemExit(code)

    class Group(click.Group):
        def invoke(self, ctx: click.Context) -> Any:
            try:
                return super().invoke(ctx)
            except (InvalidInput, SchemaError, ConfigError) as exc:
                fail(str(exc))
            except SqliteqError as exc:
                fail(str(exc), 1)
            except apsw.Error as exc:   # one the library let through: still one line
                error = _storage_error(exc, _redacted_url(ctx.obj["db"]))
                fail(str(error) if error is not exc else f"database error: {exc}",
                     2 if isinstance(error, SchemaError) else 1)
            except Exception as exc:
                if not type(exc).__module__.startswith("psycopg"):
                    raise
                message = " ".join(_describe(exc).split())
                for url in (ctx.obj["db"], *ctx.obj.get("urls", ())):
                    message = _without_password(message, url)
                fail(f"PostgreSQL error: {message}", 1)

    def open_storage(ctx: click.Context, *, create: bool = False) -> Storage:
        return open_target(ctx, ctx.obj["db"], ctx.obj["schema"], create=create,
                           db_option="--db", schema_option="--schema")

    def open_target(ctx: click.Context, path: str, schema: str | None, *, create: bool,
                    db_option: str, schema_option: str) -> Storage:
        if _is_pg_url(path):
            ctx.obj.setdefault("urls", []).append(path)     # (masked in error messages)
            storage = Storage(path, schema=schema, create=create)
            ctx.call_on_close(storage.close)
            return storage
        if schema is not None:
            fail(f"{schema_option} names a PostgreSQL schema: give {db_option} a "
                 f"postgresql:// URL")
        hint = " (set --db or SQLITEQ_DB)" if db_option == "--db" else ""
        if not create and not os.path.exists(path):
            fail(f"no database at {path!r}{hint}")
        if not create and os.path.isfile(path) and os.path.getsize(path) == 0:
            fail(f"{path!r} is an empty file, not a sqliteq database{hint}")
        storage = Storage(path)
        ctx.call_on_close(storage.close)
        return storage

    def open_destination(ctx: click.Context, destination: str, schema: str | None,
                         dry_run: bool) -> tuple[Storage, str]:
        """A copy's destination and how to name it. A dry run creates nothing: a missing
        destination is then a scratch file, thrown away."""
        names = {"db_option": "DESTINATION", "schema_option": "--to-schema"}
        if not dry_run:
            storage = open_target(ctx, destination, schema, create=True, **names)
            return storage, storage.path
        if _is_pg_url(destination):
            with contextlib.suppress(SchemaError):
                storage = open_target(ctx, destination, schema, create=False, **names)
                return storage, storage.path
            shown = f"{_redacted_url(destination)} (schema {schema or 'sqliteq'})"
        elif schema is not None or os.path.exists(destination):
            storage = open_target(ctx, destination, schema, create=False, **names)
            return storage, storage.path
        else:
            shown = destination
        scratch = tempfile.mkdtemp(prefix="sqliteq-dry-run-")
        ctx.call_on_close(functools.partial(shutil.rmtree, scratch, True))
        return open_target(ctx, os.path.join(scratch, "destination.db"), None, create=True,
                           **names), shown

    def known_queue(storage: Storage, name: str) -> str:
        names = [q.name for q in storage.queues.list()]
        if name not in names:
            fail(f"unknown queue {name!r}; queues: {', '.join(names) or 'none yet'}")
        return name

    def emit_json(data: Any, *, one_line: bool = False) -> None:
        click.echo(_printable_json(json.dumps(data, indent=None if one_line else 2,
                                              ensure_ascii=False)))

    json_option = click.option("--json", "as_json", is_flag=True,
                               help="Print the outcome as JSON (stable keys).")

    @click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
    @click.option("--db", default="sqliteq.db", envvar="SQLITEQ_DB", show_default=True,
                  help="Database file or postgresql:// URL (default $SQLITEQ_DB, else "
                       "./sqliteq.db).")
    @click.option("--schema", default=None, envvar="SQLITEQ_SCHEMA",
                  help="PostgreSQL schema of the queue (default $SQLITEQ_SCHEMA, else "
                       "sqliteq).")
    @click.version_option(__version__, prog_name="sqliteq")
    @click.pass_context
    def cli(ctx: click.Context, db: str, schema: str | None) -> None:
        """sqliteq: a durable job queue in one SQLite file.

        \b
        Example:
          sqliteq demo                   # run the built-in demo workload
          sqliteq --db jobs.db status    # what every queue is doing
        """
        ctx.obj = {"db": db, "schema": schema}

    @cli.command()
    @click.argument("kind")
    @click.argument("payload", required=False)
    @click.option("--queue", help="Queue name (default: 'default').")
    @click.option("--priority", type=int, default=0, show_default=True,
                  help="Lower runs first.")
    @click.option("--delay", help="Run after this long, e.g. 30s, 5m, 2h.")
    @click.option("--at", "at_time", help="Run at this ISO 8601 time, e.g. 2026-12-01T09:00Z.")
    @click.option("--unique-key", help="At most one queued-or-running job with this key.")
    @click.option("--max-attempts", type=int, help="Attempts before the job fails (default 5).")
    @click.option("--timeout", help="Time limit of each attempt, e.g. 90s (default: the "
                                    "handler's).")
    @json_option
    @click.pass_context
    def enqueue(ctx: click.Context, kind: str, payload: str | None, queue: str | None,
                priority: int, delay: str | None, at_time: str | None, unique_key: str | None,
                max_attempts: int | None, timeout: str | None, as_json: bool) -> None:
        """Enqueue one job and print its id.

        \b
        Example:
          sqliteq enqueue email_send '{"to": "ada@example.com"}' --delay 30s
        """
        try:
            data = None if payload is None else json.loads(payload)
        except json.JSONDecodeError as exc:
            fail(f"invalid JSON payload: {exc}")
        except RecursionError:
            fail(f"the payload nests lists and objects too deep; at most {MAX_JSON_DEPTH} "
                 f"levels are allowed")
        if delay is not None and at_time is not None:
            fail("give --delay or --at, not both")
        run_at: datetime | float | None = None
        if delay is not None:
            run_at = time.time() + parse_duration(delay)
        elif at_time is not None:
            run_at = parse_instant(at_time)
        request = EnqueueRequest(kind, data, queue_name=queue, priority=priority, run_at=run_at,
                                 max_attempts=max_attempts, unique_key=unique_key,
                                 timeout=None if timeout is None else parse_duration(timeout))
        storage = open_storage(ctx, create=True)
        if queue is not None and queue not in {q.name for q in storage.queues.list()}:
            echo(f"sqliteq: warning: queue {queue!r} is new: no worker serves it yet",
                 err=True)
        out = storage.jobs.enqueue(request)
        if as_json:
            emit_json({"job_id": out.job_id, "created": out.created})
        else:
            echo(out.job_id)
            if not out.created:
                echo(f"deduplicated: job {out.job_id} with unique key {unique_key!r} "
                     f"is already queued or running", err=True)

    @cli.command("enqueue-bulk")
    @click.argument("source", type=click.File("r"))
    @json_option
    @click.pass_context
    def enqueue_bulk(ctx: click.Context, source: Any, as_json: bool) -> None:
        """Enqueue jobs from JSON Lines (a file, or - for stdin), all or nothing.

        Each line: {"kind": ..., "payload": ..., "queue": ..., "priority": ...,
        "delay": "30s" | "run_at": ISO 8601, "unique_key": ..., "max_attempts": ...}.

        \b
        Example:
          printf '{"kind":"resize","payload":{"n":1}}\\n' | sqliteq enqueue-bulk -
        """
        try:
            lines = source.readlines()
        except UnicodeDecodeError as exc:
            fail(f"input is not valid UTF-8 text: {exc}")
        requests, error = [], None
        with click.progressbar(lines, label="validating", file=sys.stderr,
                               hidden=not sys.stderr.isatty()) as bar:
            for number, line in enumerate(bar, start=1):
                if not line.strip():
                    continue
                try:
                    requests.append(_request_from_line(json.loads(line)))
                except (json.JSONDecodeError, InvalidInput, TypeError) as exc:
                    error = f"line {number}: {exc}"
                    break
                except RecursionError:
                    error = (f"line {number}: nests lists and objects too deep; at most "
                             f"{MAX_JSON_DEPTH} levels are allowed")
                    break
        if error is not None:
            fail(error)
        outcomes = open_storage(ctx, create=True).jobs.enqueue_bulk(requests)
        created = sum(out.created for out in outcomes)
        if as_json:
            emit_json({"created": created, "deduplicated": len(outcomes) - created,
                       "job_ids": [out.job_id for out in outcomes]})
        else:
            echo(f"enqueued {created} job(s), {len(outcomes) - created} deduplicated")

    @cli.command("map")
    @click.argument("function")
    @click.argument("items", type=click.File("r", encoding="utf-8"))
    @click.option("--name", help="The run's name; the same name resumes it (default: from "
                                 "the function and the items).")
    @click.option("--workers", type=click.IntRange(1, 1024),
                  help="Threads (default 8), or processes (default: one per core).")
    @click.option("--processes", is_flag=True, help="Run the items in worker processes (for "
                                                    "CPU-bound Python).")
    @click.option("--max-attempts", type=click.IntRange(1, 1000), default=1, show_default=True)
    @click.option("--timeout", help="Time limit of each item, e.g. 30s or 5m.")
    @click.option("--keep-going", is_flag=True,
                  help='Write a failed item as {"error": ...} and go on, instead of stopping.')
    @click.pass_context
    def map_command(ctx: click.Context, function: str, items: Any, name: str | None,
                    workers: int | None, processes: bool, max_attempts: int,
                    timeout: str | None, keep_going: bool) -> None:
        """Run FUNCTION ("module:function") on each line of ITEMS (JSON lines; - reads
        stdin) and write each result as a JSON line, in item order. Killed or interrupted,
        run it again: what finished is not run again.

        \b
        Example:
          sqliteq --db sweep.db map sweep:measure params.jsonl > results.jsonl
        """
        module_name, _, attribute = function.partition(":")
        if not module_name or not attribute:
            fail(f"FUNCTION must be module:function, not {function!r}")
        parsed = []
        for number, line in enumerate(items, 1):
            if line.strip():
                try:
                    parsed.append(json.loads(line))
                except ValueError as exc:
                    fail(f"{items.name} line {number} is not JSON: {exc}")
        sys.path.append(os.getcwd())    # last: a local json.py must not shadow the stdlib
        try:
            fn = functools.reduce(getattr, attribute.split("."),
                                  importlib.import_module(module_name))
        except Exception as exc:        # the module's own import-time errors too
            fail(f"cannot load {function!r}: {type(exc).__name__}: {exc}")
        if not callable(fn):
            fail(f"{function!r} is not a function")
        open_storage(ctx, create=True).close()          # the CLI's checks and messages
        log.setLevel(logging.ERROR)     # a failed item is reported below, not also logged
        try:
            for result in map(fn, parsed, db=ctx.obj["db"], schema=ctx.obj["schema"],
                              name=name, workers=workers, processes=processes,
                              timeout=None if timeout is None else parse_duration(timeout),
                              max_attempts=max_attempts,
                              errors="return" if keep_going else "raise"):
                if isinstance(result, MapError):
                    result = {"error": result.error, "index": result.index,
                              "job_id": result.job_id}
                echo(json.dumps(result, ensure_ascii=False))
        except MapItemFailed as exc:
            failure = exc.failure
            fail(f"item {failure.index} failed: {(failure.error.splitlines() or [''])[0]}"
                 f" (sqliteq job {failure.job_id} shows its traceback)", code=1)

    @cli.command()
    @click.argument("app")
    @click.option("--queues", help="Queues and slots, e.g. default=4,email=2.")
    @click.option("-v", "--verbose", count=True,
                  help="-v: a line per finished job, and tracebacks of loading errors; "
                       "-vv: also each start and retry.")
    @click.pass_context
    def worker(ctx: click.Context, app: str, queues: str | None, verbose: int) -> None:
        """Run the Runtime APP ("module:attribute") until SIGINT/SIGTERM.

        The attribute is a Runtime, or a function taking the Storage (opened on --db) and
        returning one.

        \b
        Example:
          sqliteq --db jobs.db worker myapp.tasks:runtime --queues default=4,email=2 -v
        """
        slots = {}
        for item in (queues or "").split(",") if queues else ():
            name, _, count = item.partition("=")
            if not name.strip() or not count.strip().isdigit() \
                    or not 1 <= int(count) <= 1024:
                fail(f"bad --queues item {item!r}; use name=slots with 1 to 1024 slots")
            slots[name.strip()] = int(count)
        class PrintableFormatter(logging.Formatter):     # kinds may hold escape sequences
            def format(self, record: logging.LogRecord) -> str:
                return _printable(super().format(record))

        handler = logging.StreamHandler()
        handler.setFormatter(PrintableFormatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                            handlers=[handler])
        if verbose >= 2:
            log.setLevel(logging.DEBUG)     # sqliteq's own, not every library's
        module_name, _, attribute = app.partition(":")
        sys.path.append(os.getcwd())    # last: a local json.py must not shadow the stdlib
        try:
            target = getattr(importlib.import_module(module_name), attribute or "runtime")
        except Exception as exc:    # the app's own import-time errors too
            if verbose:
                traceback.print_exc()
            fail(f"cannot load {app!r}: {type(exc).__name__}: {exc}")
        runtime = target if isinstance(target, Runtime) else None
        if runtime is None and callable(target):
            try:
                runtime = target(open_storage(ctx, create=True))
            except SqliteqError:
                raise
            except Exception as exc:
                if verbose:
                    traceback.print_exc()
                fail(f"{app!r} raised {type(exc).__name__}: {exc}", 1)
        if not isinstance(runtime, Runtime):
            fail(f"{app!r} is neither a Runtime nor a function returning one")
        if slots:
            runtime.set_queues(slots)
        runtime.run()

    @cli.command()
    @click.option("--host", default="127.0.0.1", show_default=True,
                  help="Address to listen on; any but loopback needs --token.")
    @click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True,
                  help="Port to listen on (0: any free one).")
    @click.option("--token", envvar="SQLITEQ_DASHBOARD_TOKEN", default=None,
                  help="Require this token on every request (env SQLITEQ_DASHBOARD_TOKEN).")
    @click.option("--read-only", is_flag=True, help="Show no actions, and refuse them.")
    @click.pass_context
    def dashboard(ctx: click.Context, host: str, port: int, token: str | None,
                  read_only: bool) -> None:
        """Serve the web dashboard (and /metrics for Prometheus) until Ctrl-C.

        \b
        Example:
          sqliteq dashboard --port 8080
          SQLITEQ_DASHBOARD_TOKEN=... sqliteq dashboard --host 0.0.0.0 --read-only
        """
        if token is None and not _is_loopback(host):
            fail(f"refusing to serve on {host}, which is not a loopback address, without"
                 f" --token (anyone who reaches it could act on the queue)")
        storage = open_storage(ctx)
        try:
            _serve_dashboard(storage, host, port, read_only=read_only, token=token,
                             ready=lambda url: echo(f"dashboard on {url} (Ctrl-C stops)"))
        except OSError as exc:
            fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}", 1)

    @cli.command()
    @click.option("--watch", is_flag=True,
                  help="Refresh until Ctrl-C (with --json: one object per line).")
    @click.option("--interval", type=click.FloatRange(0.1, 3600), default=1.0,
                  show_default=True, help="Seconds between refreshes with --watch.")
    @json_option
    @click.pass_context
    def status(ctx: click.Context, watch: bool, interval: float, as_json: bool) -> None:
        """Per-queue counts, throughput and lag, and the live processes.

        \b
        Example:
          sqliteq status --watch --interval 5
        """
        storage = open_storage(ctx)
        try:                            # Ctrl-C ends a watch, during a refresh too
            while True:
                data = _status_data(storage)
                if as_json:
                    emit_json(data, one_line=watch)
                else:
                    if watch:
                        click.clear()
                    echo(_status_text(data))
                if not watch:
                    return
                time.sleep(interval)
        except KeyboardInterrupt:
            if not watch:
                raise

    @cli.command()
    @click.option("--state", type=click.Choice([s.value for s in JobState]))
    @click.option("--queue")
    @click.option("--kind")
    @click.option("--limit", type=click.IntRange(0), default=20, show_default=True)
    @json_option
    @click.pass_context
    def jobs(ctx: click.Context, state: str | None, queue: str | None, kind: str | None,
             limit: int, as_json: bool) -> None:
        """List the newest jobs, optionally filtered.

        \b
        Example:
          sqliteq jobs --state failed --queue email --limit 50
        """
        found = open_storage(ctx).jobs.list(state=state, queue=queue, kind=kind, limit=limit)
        if as_json:
            emit_json([_job_dict(job) for job in found])
            return
        echo(_table(("ID", "KIND", "QUEUE", "STATE", "ATTEMPT", "RUN AT", "LAST ERROR"),
                          [(job.id, job.kind, job.queue, job.state.value,
                            f"{job.attempt}/{job.max_attempts}", _iso(job.run_at),
                            (job.errors[-1]["error"].splitlines() or [""])[0][:60]
                            if job.errors else None) for job in found]))

    @cli.command()
    @click.argument("job_id")
    @json_option
    @click.pass_context
    def job(ctx: click.Context, job_id: str, as_json: bool) -> None:
        """Everything about one job, including each error's traceback.

        \b
        Example:
          sqliteq job 01JD7Q5V3W6Y8Z0A1B2C3D4E5F
        """
        storage = open_storage(ctx)
        found = storage.jobs.get(job_id)
        if found is None:
            fail(f"unknown job id {job_id!r}")
        data = _job_dict(found, full=True)
        parents = {parent: storage.jobs.get(parent) for parent in found.depends_on}
        data.update(
            parents=[{"id": parent, "state": None if job is None else job.state.value}
                     for parent, job in parents.items()],
            waiting_on=[parent for parent, job in parents.items()
                        if found.state is JobState.WAITING and job is not None
                        and job.state not in FINISHED_STATES],
            children=storage.jobs.children(job_id))
        if as_json:
            emit_json(data)
            return
        for key, value in data.items():
            if key == "progress" and found.progress is not None:
                value = _progress_text(found.progress)
            elif key == "parents":
                value = ", ".join(f"{p['id']} ({p['state'] or 'deleted'})" for p in value) or None
            elif key in ("waiting_on", "children"):
                value = ", ".join(value) or None
            if key not in ("payload", "result", "errors", "last_error"):
                echo(f"{key + ':':18}{'-' if value is None else value}")
        for key in ("payload", "result"):
            echo(f"{key + ':':18}{_printable_json(json.dumps(data[key], ensure_ascii=False))}")
        for error in found.errors:
            echo(f"\nattempt {error['attempt']} at {error['at']}: {error['error']}")
            if error.get("traceback"):
                echo(error["traceback"].rstrip())

    @cli.command()
    @click.argument("job_id", required=False)
    @click.option("--failed", "all_failed", is_flag=True, help="Retry every failed job.")
    @click.option("--queue", help="With --failed: only this queue.")
    @json_option
    @click.pass_context
    def retry(ctx: click.Context, job_id: str | None, all_failed: bool,
              queue: str | None, as_json: bool) -> None:
        """Requeue a failed or cancelled job (attempts reset), or all failed jobs.

        \b
        Example:
          sqliteq retry --failed --queue email
        """
        if all_failed == (job_id is not None):
            fail("give a job id or --failed (not both)")
        if queue is not None and not all_failed:
            fail("--queue goes with --failed")
        storage = open_storage(ctx)
        if job_id is None:
            if queue is not None:
                known_queue(storage, queue)
            count = storage.jobs.retry_failed(queue)
            if as_json:
                emit_json({"requeued": count, "queue": queue})
            else:
                echo(f"requeued {count} failed job(s)")
            return
        found = storage.jobs.get(job_id)
        if found is None:
            fail(f"unknown job id {job_id!r}")
        if not storage.jobs.retry(job_id):
            fail(f"job {job_id} is {found.state.value}; only failed or cancelled jobs can be "
                 f"retried")
        if as_json:
            emit_json({"requeued": 1, "job_id": job_id})
        else:
            echo(f"requeued {job_id}")

    @cli.command()
    @click.argument("job_id")
    @json_option
    @click.pass_context
    def cancel(ctx: click.Context, job_id: str, as_json: bool) -> None:
        """Cancel a queued job, or ask a running one to stop (any process).

        \b
        Example:
          sqliteq cancel 01JD7Q5V3W6Y8Z0A1B2C3D4E5F
        """
        outcome = open_storage(ctx).jobs.cancel(job_id)
        if outcome == "not_found":
            fail(f"unknown job id {job_id!r}")
        if as_json:
            emit_json({"job_id": job_id, "outcome": outcome})
            return
        echo({"cancelled": f"cancelled {job_id}",
                    "cancel_requested": f"asked the running job {job_id} to stop",
                    "finished": f"job {job_id} had already finished"}[outcome])

    @cli.command()
    @click.argument("queue")
    @json_option
    @click.pass_context
    def pause(ctx: click.Context, queue: str, as_json: bool) -> None:
        """Stop every process claiming from QUEUE; running jobs are asked to stop.

        \b
        Example:
          sqliteq pause email
        """
        storage = open_storage(ctx)
        storage.queues.pause(known_queue(storage, queue))
        if as_json:
            emit_json({"queue": queue, "paused": True})
        else:
            echo(f"paused {queue}")

    @cli.command()
    @click.argument("queue")
    @json_option
    @click.pass_context
    def resume(ctx: click.Context, queue: str, as_json: bool) -> None:
        """Let processes claim from QUEUE again.

        \b
        Example:
          sqliteq resume email
        """
        storage = open_storage(ctx)
        storage.queues.resume(known_queue(storage, queue))
        if as_json:
            emit_json({"queue": queue, "paused": False})
        else:
            echo(f"resumed {queue}")

    # ("-1" is a limit, wrong as it is, not an unknown option.)
    @cli.command(context_settings={"ignore_unknown_options": True})
    @click.argument("queue")
    @click.argument("limit")
    @json_option
    @click.pass_context
    def limit(ctx: click.Context, queue: str, limit: str, as_json: bool) -> None:
        """Run at most LIMIT jobs of QUEUE at once across all processes ("none": no cap).

        \b
        Example:
          sqliteq limit email 2
        """
        if limit.lower() != "none" and not limit.isdigit():
            fail(f"bad limit {limit!r}; use a whole number or 'none'")
        storage = open_storage(ctx)
        cap = None if limit.lower() == "none" else int(limit)
        storage.queues.set_limit(known_queue(storage, queue), cap)
        if as_json:
            emit_json({"queue": queue, "limit": cap})
        else:
            echo(f"limit of {queue}: {'none' if cap is None else cap}")

    @cli.command()
    @click.option("--state", type=click.Choice([s.value for s in FINISHED_STATES]),
                  default="done", show_default=True)
    @click.option("--older-than", required=True, help="Age, e.g. 7d, 12h.")
    @json_option
    @click.pass_context
    def purge(ctx: click.Context, state: str, older_than: str, as_json: bool) -> None:
        """Delete finished jobs older than a given age.

        \b
        Example:
          sqliteq purge --state done --older-than 7d
        """
        seconds = parse_duration(older_than)
        deleted = open_storage(ctx).jobs.purge(state, seconds)
        if as_json:
            emit_json({"state": state, "deleted": deleted})
        else:
            echo(f"deleted {deleted} {state} job(s)")

    @cli.command("copy")
    @click.argument("source")
    @click.argument("destination")
    @click.option("--from-schema", default=None,
                  help="PostgreSQL schema of SOURCE (default sqliteq).")
    @click.option("--to-schema", default=None,
                  help="PostgreSQL schema of DESTINATION (default sqliteq).")
    @click.option("--dry-run", is_flag=True, help="Count what would be copied; write nothing.")
    @click.option("--force", is_flag=True,
                  help="Copy even if DESTINATION already holds jobs (rows it has are kept).")
    @json_option
    @click.pass_context
    def copy(ctx: click.Context, source: str, destination: str, from_schema: str | None,
             to_schema: str | None, dry_run: bool, force: bool, as_json: bool) -> None:
        """Copy queues, cron schedules, rate limits and unfinished jobs to another store.

        SOURCE and DESTINATION are SQLite files or postgresql:// URLs. Stop the workers
        on SOURCE first; a copy can be run again (rows already copied are kept).

        \b
        Example:
          sqliteq copy jobs.db postgresql://app@db.internal/app --dry-run
        """
        src = open_target(ctx, source, from_schema, create=False, db_option="SOURCE",
                          schema_option="--from-schema")
        dst, shown = open_destination(ctx, destination, to_schema, dry_run)
        report = src.copy_to(dst, dry_run=dry_run, force=force)
        if as_json:
            emit_json(asdict(report))
            return
        echo(f"{'would copy' if dry_run else 'copied'} {report.queues} queue(s), "
             f"{report.cron_schedules} cron schedule(s), {report.rate_limits} rate "
             f"limit(s), {report.jobs} job(s) into {shown}; kept {report.kept} row(s) it "
             f"already had")

    @cli.group("cron", invoke_without_command=True)
    @json_option
    @click.pass_context
    def cron(ctx: click.Context, as_json: bool) -> None:
        """List the cron schedules (or remove, disable, enable one).

        \b
        Example:
          sqliteq cron --json
          sqliteq cron disable nightly-report
        """
        if ctx.invoked_subcommand is not None:
            return
        schedules = open_storage(ctx).cron.list()
        data = [{"name": s.name, "expression": s.expression, "timezone": s.timezone,
                 "kind": s.request.kind, "next_fire_at": _iso(s.next_fire_at),
                 "enabled": s.enabled, "last_error": s.last_error} for s in schedules]
        if as_json:
            emit_json(data)
            return
        echo(_table(("NAME", "EXPRESSION", "TIMEZONE", "KIND", "NEXT FIRE", "ENABLED",
                     "LAST ERROR"),
                    [(d["name"], d["expression"], d["timezone"] or "UTC", d["kind"],
                      d["next_fire_at"], "yes" if d["enabled"] else "no", d["last_error"])
                     for d in data]))

    def cron_change(verb: str, done: str) -> None:
        @cron.command(verb, help=f"{verb.capitalize()} the cron schedule NAME in every "
                                 f"process.\n\n\b\nExample:\n  sqliteq cron {verb} "
                                 f"nightly-report")
        @click.argument("name")
        @json_option
        @click.pass_context
        def change(ctx: click.Context, name: str, as_json: bool) -> None:
            if not getattr(open_storage(ctx).cron, verb)(name):
                fail(f"unknown cron schedule {name!r}")
            if as_json:
                emit_json({"name": name, done: True})
            else:
                echo(f"{done} {name}")

    cron_change("remove", "removed")
    cron_change("disable", "disabled")
    cron_change("enable", "enabled")

    @cli.command()
    @click.option("--jobs", "count", type=click.IntRange(1, 1_000_000), default=10_000,
                  show_default=True, help="How many sub-jobs the bootstrap job fans out.")
    @click.pass_context
    def demo(ctx: click.Context, count: int) -> None:
        """Run the built-in workload and print a summary.

        A bootstrap job fans out sub-jobs with ctx.enqueue_bulk; the sub-jobs share a
        rate-limited scope, a few fail once and are retried, and a cron schedule ticks.

        \b
        Example:
          sqliteq demo
        """
        summary = _run_demo(open_storage(ctx, create=True), count,
                           lambda total: click.progressbar(length=total, label="demo",
                                                           file=sys.stderr,
                                                           hidden=not sys.stderr.isatty()))
        width = max(len(line) for line in summary)
        for key, value in summary.items():
            echo(f"{key + ':':{width + 2}}{value}")

    bench_script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench", "run.py")

    # (Listed only in a source checkout: an installed package has no bench/ beside it.)
    @cli.command(hidden=not os.path.exists(bench_script))
    @click.pass_context
    def bench(ctx: click.Context) -> None:
        """Run the benchmark suite quickly (bench/run.py --quick) and print its table.

        \b
        Example:
          sqliteq bench
        """
        if not os.path.exists(bench_script):
            fail(f"no benchmark suite at {bench_script}: it ships with the source repository")
        raise SystemExit(subprocess.call([sys.executable, bench_script, "--quick"]))

    return cli


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the `sqliteq` command."""
    try:
        cli = _cli()
    except ImportError as exc:
        if exc.name != "click":
            raise
        print("sqliteq: error: the sqliteq command needs click: pip install click",
              file=sys.stderr)
        raise SystemExit(1) from None
    import click

    # Not click's own report of a usage error (usage, a hint and the error: four lines):
    # one line, as for every other error.
    try:
        code = cli.main(args=argv, prog_name="sqliteq", standalone_mode=False)
    except click.UsageError as exc:
        if type(exc).__name__ == "NoArgsIsHelpError" and exc.ctx is not None:
            click.echo(exc.ctx.get_help())      # `sqliteq` alone (click 8.2 and later)
            raise SystemExit(2) from None
        command = exc.ctx.command_path if exc.ctx is not None else "sqliteq"
        print(_printable(f"sqliteq: error: {exc.format_message()} (see '{command} --help')"),
              file=sys.stderr)
        raise SystemExit(2) from None
    except click.ClickException as exc:
        print(_printable(f"sqliteq: error: {exc.format_message()}"), file=sys.stderr)
        raise SystemExit(exc.exit_code) from None
    except click.Abort:
        raise SystemExit(130) from None     # Ctrl-C at a prompt or in a command
    raise SystemExit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    # Handlers that `import sqliteq` must see this module, not a second copy of the file.
    sys.modules.setdefault("sqliteq", sys.modules[__name__])
    main()
