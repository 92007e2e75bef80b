"""Helpers the test modules share: waiting on a condition, raw SQL behind sqliteq's back, and
running the real `sqliteq` console script."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import apsw
import pytest

import sqliteq

REPO = Path(sqliteq.__file__).resolve().parent

# Short runtime intervals keep the suite fast; lease_timeout must exceed heartbeat_interval.
FAST = {"poll_interval": 0.02, "heartbeat_interval": 0.1, "lease_timeout": 5.0}

# `python -c HOLD_WRITER_LOCK DB SECONDS|until-told`: a process that takes the file's writer
# lock, prints "locked", and holds it that long (or until a line on stdin).
HOLD_WRITER_LOCK = """
import sys, time, apsw
conn = apsw.Connection(sys.argv[1])
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
if sys.argv[2] == "until-told":
    sys.stdin.readline()
else:
    time.sleep(float(sys.argv[2]))
conn.execute("ROLLBACK")
"""


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition",
               interval: float = 0.005, check: Callable[[], None] | None = None) -> Any:
    """Poll `predicate` until it returns something truthy and return that; fail with a
    message after `timeout` s. `check` runs on every round (e.g. children still alive)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if check is not None:
            check()
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def raw(db_path: Path, statement: str, *params: Any) -> list[tuple[Any, ...]]:
    """One statement on its own raw apsw connection (behind sqliteq's back)."""
    conn = apsw.Connection(str(db_path))
    try:
        conn.setbusytimeout(20_000)
        return conn.execute(statement, params).fetchall()
    finally:
        conn.close()


def file_at_schema(path: Path, version: int) -> apsw.Connection:
    """A SQLite file as sqliteq's schema `version` left it (migration steps 1 to `version`),
    in WAL mode; its open connection, for the rows that sqliteq would have written then."""
    conn = apsw.Connection(str(path))
    conn.execute("PRAGMA journal_mode = WAL")
    with conn:
        for step in sqliteq.MIGRATIONS[:version]:
            for statement in step:
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {version:d}")
    return conn


# ------------------------------------------------------------ PostgreSQL ----

# The local server every machine of the project runs (CI's included): a test that needs it
# fails, never skips, when it cannot be reached.
PG_URL = os.environ.get("SQLITEQ_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


def pg_execute(statement: str, *params: Any, schema: str | None = None) -> list[Any]:
    """One statement on its own psycopg connection (in `schema`, if given); its rows."""
    import psycopg

    with psycopg.connect(PG_URL, autocommit=True, connect_timeout=10,
                         cursor_factory=psycopg.RawCursor) as conn:
        if schema is not None:
            conn.execute(f"SET search_path TO {schema}")
        cursor = conn.execute(sqliteq._pg_statement(statement), params or None)
        return cursor.fetchall() if cursor.description is not None else []


@contextlib.contextmanager
def fresh_schema() -> Iterator[str]:
    """A schema name no test has used; the schema is dropped afterwards, if it was made."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    try:
        yield schema
    finally:
        pg_execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


class Target:
    """Where a test's store lives: a SQLite file (`schema` None) or a PostgreSQL schema."""

    def __init__(self, url: str, schema: str | None) -> None:
        self.url, self.schema = url, schema

    @property
    def postgres(self) -> bool:
        return self.schema is not None

    def open(self, **options: Any) -> sqliteq.Storage:
        return sqliteq.Storage(self.url, schema=self.schema, **options)

    def options(self) -> list[str]:
        """The command-line options that name this store (the CLI's and test children's)."""
        return ["--db", self.url, *(["--schema", self.schema] if self.schema else [])]

    def sql(self, statement: str, *params: Any) -> list[Any]:
        """One statement behind sqliteq's back, on a connection of its own."""
        if self.schema is not None:
            return pg_execute(statement, *params, schema=self.schema)
        return raw(Path(self.url), statement, *params)

    def __repr__(self) -> str:
        return "postgres" if self.postgres else "sqlite"



# ------------------------------------------------- dispatcher rounds, clock injected ----
# The dispatcher's `step(now)` is one round: tests run rounds themselves, on an unstarted
# runtime whose clock they move, so nothing waits for time to pass.

class ManualClock(sqliteq._Clock):
    """A runtime's clock that moves when the test says: `now` (ms) stands still, and the
    monotonic clock runs `ahead` seconds in front of the real one."""

    def __init__(self) -> None:
        self.now = sqliteq.now_ms()
        self.ahead = 0.0

    def now_ms(self) -> int:
        return self.now

    def monotonic(self) -> float:
        return time.monotonic() + self.ahead


def rounds(storage: sqliteq.Storage, handler: Callable[..., Any] = lambda ctx, payload: None,
           **options: Any) -> tuple[sqliteq.Runtime, Any, ManualClock]:
    """An unstarted runtime with one slot of queue "default", `handler` for kind "k", its
    dispatcher, and its clock."""
    rt = sqliteq.Runtime(storage, {"default": 1}, **options)
    rt.register("k", handler)
    rt._clock = clock = ManualClock()
    return rt, sqliteq._Dispatcher(rt), clock


def buffered(rt: sqliteq.Runtime) -> list[Any]:
    """Take the claimed jobs no worker has started (what the round handed out)."""
    return rt._queue_states["default"].drain_buffer()


def run_buffered(rt: sqliteq.Runtime) -> int:
    """Do a worker's part: run each handed-out job and hand its end to the dispatcher."""
    jobs = buffered(rt)
    for job in jobs:
        rt._finished.append(rt._execute(job, rt._handlers.get(job.kind), "default-0-test"))
    return len(jobs)


def minute_of(ms: int) -> int:
    return ms - ms % 60_000


def recorded(storage: sqliteq.Storage, minute: int, queue: str, kind: str,
             waits: list[float] = (), runs: list[float] = (), **ended: int) -> None:
    """Add what a runtime would have recorded, as one flush of its buffer; `ended` counts
    attempts by verdict (done=, failed=, retry=, cancelled=)."""
    buffer = sqliteq._MetricsBuffer()
    rollup = buffer.rollup((minute, queue, kind), 0.0)
    rollup.wait.samples += waits
    rollup.run.samples += runs
    for verdict, n in ended.items():
        rollup.ended[sqliteq._Verdict(verdict)] += n
    storage.db.write(lambda conn: storage.metrics._add(conn, buffer.rollups))


def failed_job(storage: sqliteq.Storage, payload: Any = None, kind: str = "k") -> str:
    """A job that failed for good, through a runtime's rounds (call it before other jobs
    are enqueued in queue "default": it runs the first one there)."""
    def fails(ctx: Any, payload: Any) -> None:
        raise RuntimeError("boom <b>bold</b>")

    rt, dispatcher, clock = rounds(storage, fails)
    rt.register(kind, fails)
    job_id = storage.jobs.enqueue(sqliteq.EnqueueRequest(kind, payload, max_attempts=1)).job_id
    dispatcher.step(clock.now)
    run_buffered(rt)
    rt._stopping = True                 # the round commits the end, and flushes metrics
    dispatcher.step(clock.now)
    assert storage.jobs.get(job_id).state == "failed"
    return job_id


# ------------------------------------------------------------------- CLI ----

def script() -> str:
    """The installed `sqliteq` console script (the one next to this Python first)."""
    found = shutil.which("sqliteq", path=os.pathsep.join(
        [str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if found is None:
        pytest.fail("the `sqliteq` console script is not on PATH: install the project with "
                    "`pip install -e .` in the repository first")
    return found


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without SQLITEQ_DB (so only what a test sets picks the file)."""
    env = {k: v for k, v in os.environ.items() if k != "SQLITEQ_DB"}
    env.update(extra)
    return env


def run(*args: str, db: Path | Target | None = None, cwd: Path | None = None,
        stdin: str | None = None, env: dict[str, str] | None = None, timeout: float = 30
        ) -> subprocess.CompletedProcess[str]:
    """`sqliteq [--db DB [--schema S]] ARGS...`; cwd defaults to the database file's
    folder."""
    if isinstance(db, Target):
        where, folder = db.options(), None if db.postgres else Path(db.url).parent
    else:
        where, folder = ([], None) if db is None else (["--db", str(db)], db.parent)
    command = [script(), *where, *args]
    if cwd is None:
        cwd = folder or REPO
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          input=stdin, env=clean_env() if env is None else env, check=False)


def describe(result: subprocess.CompletedProcess[str]) -> str:
    return (f"{' '.join(map(str, result.args))}\n-> exit {result.returncode}\n"
            f"stdout: {result.stdout!r}\nstderr: {result.stderr!r}")


def ok(*args: str, **kwargs: Any) -> str:
    """Run, insist on exit 0 and no crash traceback on stderr, return stdout (which may show
    a failed job's traceback: that is data)."""
    result = run(*args, **kwargs)
    assert result.returncode == 0, describe(result)
    assert "Traceback" not in result.stderr, describe(result)
    return result.stdout


def assert_error(result: subprocess.CompletedProcess[str], *names: str, code: int = 2) -> str:
    """Exit `code`, exactly one line on stderr naming the problem, nothing on stdout, no
    traceback. Returns that line."""
    assert result.returncode == code, describe(result)
    assert "Traceback" not in result.stdout + result.stderr, describe(result)
    assert result.stdout == "", describe(result)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, describe(result)
    for name in names:
        assert name in lines[0], describe(result)
    return lines[0]
