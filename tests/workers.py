"""Child-process worker entry points for the crash and cluster tests, and the parent-side
helpers that start, signal and reap those children.

Run a child as ``python tests/workers.py --db PATH|URL [--schema S] [options]``: it opens
the store (a SQLite file, or a PostgreSQL schema), registers
every handler below on one `Runtime` and calls `rt.run()`, so SIGTERM stops it gracefully and
SIGKILL is a real crash. It exits 0 after a clean stop, 1 if anything logged at ERROR level
(or its producer thread failed), 70 if its parent test process disappeared.

Handlers report what they see into tables of the same store (created by
`create_test_tables` before any child starts):

* ``side(job_id, lease, at, attempt, host, pid)`` — one row per run of a ``record`` handler.
* ``events(job_id, what, attempt, host, pid, reason, at)`` — what other handlers saw.
* ``control(job_id, attempt, action)`` — the test releases blocked handlers here.
* ``audit(...)`` — filled by a trigger on every UPDATE of ``jobs``: the exact history of
  claims, finalizes and rescues, written in the same transaction as the change it records.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import apsw

import sqliteq

if TYPE_CHECKING:
    from support import Target

WORKERS = Path(__file__).resolve()
# Children import the very sqliteq the test process imported (the checkout, or whatever
# PYTHONPATH put first), whether or not it is pip-installed.
SQLITEQ_DIR = Path(sqliteq.__file__).resolve().parent

TEST_TABLES = """
CREATE TABLE IF NOT EXISTS side (
    job_id TEXT, lease INTEGER, at INTEGER, attempt INTEGER, host TEXT, pid INTEGER);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY, job_id TEXT, what TEXT, attempt INTEGER, host TEXT, pid INTEGER,
    reason TEXT, at INTEGER);
CREATE TABLE IF NOT EXISTS control (job_id TEXT, attempt INTEGER, action TEXT);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY, job_id TEXT, old_state TEXT, new_state TEXT, old_lease INTEGER,
    new_lease INTEGER, old_attempt INTEGER, new_attempt INTEGER, host TEXT, worker TEXT,
    result TEXT, errors TEXT, finished_at INTEGER);
CREATE TRIGGER IF NOT EXISTS audit_jobs AFTER UPDATE ON jobs BEGIN
    INSERT INTO audit (job_id, old_state, new_state, old_lease, new_lease, old_attempt,
                       new_attempt, host, worker, result, errors, finished_at)
    VALUES (NEW.id, OLD.state, NEW.state, OLD.lease, NEW.lease, OLD.attempt, NEW.attempt,
            NEW.host, NEW.worker, NEW.result, NEW.errors, NEW.finished_at);
END;
"""

# The same tables on PostgreSQL (the trigger in PL/pgSQL).
PG_TEST_TABLES = """
CREATE TABLE side (
    job_id text, lease bigint, at bigint, attempt integer, host text, pid integer);
CREATE TABLE events (
    seq bigserial PRIMARY KEY, job_id text, what text, attempt integer, host text,
    pid integer, reason text, at bigint);
CREATE TABLE control (job_id text, attempt integer, action text);
CREATE TABLE audit (
    seq bigserial PRIMARY KEY, job_id text, old_state text, new_state text, old_lease bigint,
    new_lease bigint, old_attempt integer, new_attempt integer, host text, worker text,
    result text, errors text, finished_at bigint);
CREATE FUNCTION audit_jobs() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO audit (job_id, old_state, new_state, old_lease, new_lease, old_attempt,
                       new_attempt, host, worker, result, errors, finished_at)
    VALUES (NEW.id, OLD.state, NEW.state, OLD.lease, NEW.lease, OLD.attempt, NEW.attempt,
            NEW.host, NEW.worker, NEW.result, NEW.errors, NEW.finished_at);
    RETURN NEW;
END $$;
CREATE TRIGGER audit_jobs AFTER UPDATE ON jobs FOR EACH ROW EXECUTE FUNCTION audit_jobs();
"""


# ======================================================= parent-side helpers ====

def raw_connection(db_path: Path | str) -> apsw.Connection:
    conn = apsw.Connection(str(db_path))
    conn.setbusytimeout(20_000)
    return conn


def create_test_tables(db: Target) -> None:
    """Create (and migrate) the store, then add the tables the handlers write."""
    db.open().close()
    if db.postgres:
        db.sql(PG_TEST_TABLES)          # (without parameters, several statements at once)
        return
    conn = raw_connection(db.url)
    try:
        conn.execute(TEST_TABLES)
    finally:
        conn.close()


def query(db: Target, statement: str, *params: Any) -> list[tuple[Any, ...]]:
    return [tuple(row) for row in db.sql(statement, *params)]


def release(db: Target, job_id: str, attempt: int | None = None) -> None:
    """Let a blocked handler of `job_id` (only of that attempt, if given) return."""
    query(db, "INSERT INTO control (job_id, attempt, action) VALUES (?, ?, 'release')",
          job_id, attempt)


def events(db: Target, job_id: str | None = None, what: str | None = None
           ) -> list[dict[str, Any]]:
    rows = query(db, "SELECT job_id, what, attempt, host, pid, reason, at FROM events"
                     " WHERE (CAST(?1 AS TEXT) IS NULL OR job_id = ?1)"
                     " AND (CAST(?2 AS TEXT) IS NULL OR what = ?2) ORDER BY seq", job_id, what)
    keys = ("job_id", "what", "attempt", "host", "pid", "reason", "at")
    return [dict(zip(keys, row, strict=True)) for row in rows]


def host_of(db: Target, pid: int) -> str | None:
    rows = query(db, "SELECT host_id FROM processes WHERE pid = ?", pid)
    return rows[0][0] if rows else None


def heartbeat_at(db: Target, host: str) -> int | None:
    rows = query(db, "SELECT heartbeat_at FROM processes WHERE host_id = ?", host)
    return rows[0][0] if rows else None


def no_transaction_open(db: Target) -> bool:
    """True if no process holds a write transaction on the store now: SQLite's writer lock
    can be taken; no sqliteq connection to the PostgreSQL schema is inside a transaction."""
    if db.postgres:
        return not query(db, "SELECT 1 FROM pg_stat_activity WHERE application_name = ?"
                             " AND state LIKE 'idle in transaction%'", f"sqliteq-{db.schema}")
    return writer_lock_free(db.url)


def writer_lock_free(db_path: Path | str) -> bool:
    """True if the SQLite writer lock can be taken now (nobody holds a write transaction)."""
    conn = apsw.Connection(str(db_path))
    try:
        conn.setbusytimeout(300)
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ROLLBACK")
        return True
    except apsw.BusyError:
        return False
    finally:
        conn.close()


class WaitTimeout(AssertionError):
    """A condition the test waited for did not come true before its deadline."""


class Child:
    """One worker process, with its output in files (no pipe can fill up and block it)."""

    def __init__(self, name: str, args: list[str], log_dir: Path) -> None:
        self.name = name
        self.stdout_path = log_dir / f"{name}.out"
        self.stderr_path = log_dir / f"{name}.err"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(SQLITEQ_DIR), *filter(None, [os.environ.get("PYTHONPATH")])])}
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, str(WORKERS), *args],
                                         cwd=WORKERS.parent.parent, env=env,
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        self.pid = self.proc.pid
        self.expected_dead = False      # set when the test kills or stops it on purpose

    def running(self) -> bool:
        return self.proc.poll() is None

    def is_stopped(self) -> bool:
        """True once every thread of the process is stopped (SIGSTOP is asynchronous)."""
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
        except OSError:                 # no procfs: assume the signal has landed
            time.sleep(0.1)
            return True
        return stat.rsplit(")", 1)[1].split()[0] in ("T", "t")

    def signal(self, sig: int) -> None:
        if self.running():
            self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL and reap."""
        self.expected_dead = True
        if self.running():
            self.proc.send_signal(signal.SIGCONT)   # a stopped process dies just the same
            self.proc.kill()
        self.proc.wait(30)

    def terminate(self, timeout: float = 30) -> int:
        """SIGTERM (graceful stop) and wait for the exit code."""
        self.expected_dead = True
        self.signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def __repr__(self) -> str:
        return f"Child({self.name}, pid={self.pid}, rc={self.proc.poll()})"


class Cluster:
    """Starts worker children on one store and guarantees none outlives the test."""

    def __init__(self, db: Target, log_dir: Path) -> None:
        self.db = db
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.children: list[Child] = []

    def start(self, name: str | None = None, *, role: str = "", slots: int = 2,
              poll: float = 0.05, heartbeat: float = 0.2, lease: float = 1.0,
              produce: int = 0, max_life: float = 150.0) -> Child:
        name = name or f"w{len(self.children)}"
        args = ["--db", self.db.url, *(["--schema", self.db.schema] if self.db.schema else []),
                "--role", role, "--slots", str(slots),
                "--poll", str(poll), "--heartbeat", str(heartbeat), "--lease", str(lease),
                "--produce", str(produce), "--max-life", str(max_life)]
        child = Child(name, args, self.log_dir)
        self.children.append(child)
        return child

    def wait_registered(self, child: Child, timeout: float = 20) -> str:
        """Wait until the child's runtime has written its heartbeat row; its host_id."""
        return self.wait_for(lambda: host_of(self.db, child.pid), timeout,
                             f"{child.name} to register in the processes table")

    def check_alive(self) -> None:
        for child in self.children:
            if not child.expected_dead and not child.running():
                raise AssertionError(f"{child!r} died unexpectedly; stderr:\n{child.stderr()}")

    def wait_for(self, predicate: Callable[[], Any], timeout: float, what: str,
                 interval: float = 0.02) -> Any:
        """Poll `predicate` until it returns something truthy; fail after `timeout` s."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            self.check_alive()
            if time.monotonic() > deadline:
                raise WaitTimeout(f"timed out after {timeout} s waiting for {what}")
            time.sleep(interval)

    def freeze(self, child: Child) -> None:
        """SIGSTOP `child` at a moment it holds no write transaction.

        A process frozen inside BEGIN IMMEDIATE ... COMMIT would block every writer on the
        file (on PostgreSQL, everyone waiting for its row and advisory locks), which is the
        database, not sqliteq; these tests are about a worker frozen mid-handler.
        """
        for _ in range(50):
            child.signal(signal.SIGSTOP)
            self.wait_for(child.is_stopped, 10, f"{child.name} to stop")
            if no_transaction_open(self.db):
                return
            child.signal(signal.SIGCONT)
            time.sleep(random.uniform(0.01, 0.05))
        raise AssertionError(f"could not freeze {child!r} outside a write transaction")

    def close(self) -> None:
        for child in self.children:
            try:
                child.kill()
            except Exception:       # keep going: every other child must die too
                traceback.print_exc()


# ========================================================= child entry point ====

class _ErrorFlag(logging.Handler):
    """Remembers whether anything was logged at ERROR or above."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.seen = False

    def emit(self, record: logging.LogRecord) -> None:
        self.seen = True


def _watchdog(max_life: float) -> None:
    """Exit if the parent test process is gone or the child lived too long: no orphans."""
    parent, deadline = os.getppid(), time.monotonic() + max_life
    while True:
        time.sleep(0.25)
        if os.getppid() != parent or time.monotonic() > deadline:
            os._exit(70)


def _record_event(ctx: sqliteq.JobCtx, what: str, reason: str | None = None) -> None:
    ctx.storage.db.write(lambda conn: conn.execute(
        "INSERT INTO events (job_id, what, attempt, host, pid, reason, at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (ctx.job_id, what, ctx.attempt, ctx.host_id, os.getpid(), reason, sqliteq.now_ms())))


def _released(ctx: sqliteq.JobCtx) -> bool:
    return bool(ctx.storage.db.read(
        "SELECT 1 FROM control WHERE job_id = ? AND action = 'release'"
        " AND (attempt IS NULL OR attempt = ?)", (ctx.job_id, ctx.attempt)))


def _register_handlers(rt: sqliteq.Runtime, role: str) -> None:
    pid = os.getpid()

    @rt.handler("record")
    def record(ctx: sqliteq.JobCtx, payload: dict) -> dict:
        """Crash test: note this run (and the lease of this claim) in `side`, then dawdle."""
        def note(conn: apsw.Connection) -> int | None:
            rows = conn.execute(
                "SELECT lease FROM jobs WHERE id = ? AND host = ? AND attempt = ?"
                " AND state = 'running'", (ctx.job_id, ctx.host_id, ctx.attempt)).fetchall()
            lease = rows[0][0] if rows else None     # None: this claim was already lost
            conn.execute("INSERT INTO side (job_id, lease, at, attempt, host, pid)"
                         " VALUES (?, ?, ?, ?, ?, ?)",
                         (ctx.job_id, lease, sqliteq.now_ms(), ctx.attempt, ctx.host_id, pid))
            return lease

        lease = ctx.storage.db.write(note)
        time.sleep(payload["ms"] / 1000)
        return {"host": ctx.host_id, "attempt": ctx.attempt, "lease": lease}

    @rt.handler("coop")
    def coop(ctx: sqliteq.JobCtx, payload: Any) -> str:
        """A cooperative long job: runs until released or until its token fires."""
        _record_event(ctx, "started")
        deadline = time.monotonic() + 60
        while not ctx.cancel.wait(0.05):
            if _released(ctx):
                _record_event(ctx, "finished")
                return "finished"
            if time.monotonic() > deadline:
                raise RuntimeError("coop handler was never released")
        _record_event(ctx, "stopped", ctx.cancel.reason)
        raise sqliteq.Cancelled(f"stopped: {ctx.cancel.reason}")

    @rt.handler("stubborn")
    def stubborn(ctx: sqliteq.JobCtx, payload: Any) -> str:
        """Ignores its token until released; then reports what the token says, returns role.

        From attempt `payload["coop_from"]` on (if given) it behaves like `coop` instead.
        """
        if payload and ctx.attempt >= payload.get("coop_from", 1 << 30):
            return coop(ctx, payload)
        _record_event(ctx, "started")
        deadline = time.monotonic() + 60
        while role != "B" and not _released(ctx):
            if time.monotonic() > deadline:
                raise RuntimeError("stubborn handler was never released")
            time.sleep(0.02)
        fired = ctx.cancel.wait(10) if role != "B" else ctx.cancel.cancelled
        _record_event(ctx, "released", ctx.cancel.reason if fired else None)
        return role

    @rt.handler("quick")
    def quick(ctx: sqliteq.JobCtx, payload: Any) -> str:
        _record_event(ctx, "started")
        return "quick"

    @rt.handler("fan")
    def fan(ctx: sqliteq.JobCtx, payload: dict) -> dict:
        """Mixed load: half of these enqueue a follow-up job from inside the handler."""
        if payload["follow"]:
            ctx.enqueue(sqliteq.EnqueueRequest("leaf", {"parent": ctx.job_id}))
        time.sleep(random.uniform(0, 0.002))
        return {"pid": pid}

    @rt.handler("leaf")
    def leaf(ctx: sqliteq.JobCtx, payload: dict) -> dict:
        return {"pid": pid, "parent": payload["parent"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", required=True)
    parser.add_argument("--schema", default=None)
    parser.add_argument("--role", default="")
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument("--poll", type=float, default=0.05)
    parser.add_argument("--heartbeat", type=float, default=0.2)
    parser.add_argument("--lease", type=float, default=1.0)
    parser.add_argument("--produce", type=int, default=0,
                        help="also enqueue this many 'fan' jobs from a thread while working")
    parser.add_argument("--max-life", type=float, default=150.0)
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format=f"%(asctime)s pid={os.getpid()} %(threadName)s %(levelname)s "
                               f"%(name)s: %(message)s")
    errors = _ErrorFlag()
    logging.getLogger().addHandler(errors)
    threading.Thread(target=_watchdog, args=(args.max_life,), daemon=True).start()

    storage = sqliteq.Storage(args.db, schema=args.schema)
    rt = sqliteq.Runtime(storage, {"default": args.slots}, poll_interval=args.poll,
                         heartbeat_interval=args.heartbeat, lease_timeout=args.lease,
                         shutdown_timeout=20)
    _register_handlers(rt, args.role)

    producer_failed = threading.Event()

    def produce() -> None:
        try:
            pid = os.getpid()
            for i in range(args.produce):
                rt.enqueue(sqliteq.EnqueueRequest("fan", {"i": i, "pid": pid,
                                                          "follow": i % 2 == 0}))
        except BaseException:
            producer_failed.set()
            traceback.print_exc()

    producer = threading.Thread(target=produce, name="producer", daemon=True)
    if args.produce:
        producer.start()
    rt.run()
    if args.produce:
        producer.join(30)
    storage.close()
    return 1 if errors.seen or producer_failed.is_set() else 0


if __name__ == "__main__":
    sys.exit(main())
