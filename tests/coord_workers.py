"""Child-process entry points for tests/test_coordination.py and tests/test_cron.py.

Run as ``python tests/coord_workers.py COMMAND --db PATH|URL [--schema S] [options]`` (cwd =
repo root):

* ``ratelimit``: threads call `RateLimiter.acquire("api")` in a loop once the go file
  exists; prints one JSON line ``{"first_attempts": [...], "grants": [...]}`` (epoch s).
* ``runtime``: a `Runtime` on one queue with the handlers below, run with `rt.run()`
  (SIGTERM stops it gracefully).
* ``cron``: a `Runtime` that declares ``rt.cron("tick", EXPR, EnqueueRequest("tick"))``.
* ``chore``: prints ``storage.processes._claim_chore(NAME, INTERVAL)`` as JSON.

Handlers record what they see in the ``runs`` table of the same store
(`create_runs_table`): one row per handler run with its wall-clock start and end
(time.time(), seconds) and what it did. Every child exits on its own when its parent test
process goes away, so none outlives a crashed test run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import apsw

# A child started from a fresh clone imports the checkout's sqliteq even without
# `pip install -e .`: the repository root is this file's parent's parent.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from support import Target

import sqliteq

RUNS_TABLE = """
CREATE TABLE IF NOT EXISTS runs (
    seq {key}, job_id TEXT, kind TEXT, queue TEXT, attempt INTEGER,
    pid INTEGER, started {real}, ended {real}, what TEXT)
"""


def create_runs_table(target: Target) -> None:
    """Create (and migrate) the sqliteq store, then the table the handlers write."""
    target.open().close()
    if target.postgres:
        target.sql(RUNS_TABLE.format(key="bigserial PRIMARY KEY", real="double precision"))
    else:
        target.sql(RUNS_TABLE.format(key="INTEGER PRIMARY KEY", real="REAL"))


def _watchdog(max_life: float) -> None:
    """Exit if the parent test process is gone or this child lived too long."""
    parent, deadline = os.getppid(), time.monotonic() + max_life
    while True:
        time.sleep(0.2)
        if os.getppid() != parent or time.monotonic() > deadline:
            os._exit(70)


def _insert_run(ctx: sqliteq.JobCtx, started: float, ended: float | None, what: str) -> int:
    def insert(conn: apsw.Connection) -> int:
        return conn.execute("INSERT INTO runs (job_id, kind, queue, attempt, pid, started,"
                            " ended, what) VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING seq",
                            (ctx.job_id, ctx.kind, ctx.queue, ctx.attempt, os.getpid(),
                             started, ended, what)).fetchall()[0][0]

    return ctx.storage.db.write(insert)


def register_handlers(rt: sqliteq.Runtime) -> None:
    @rt.handler("sleep")
    def sleep(ctx: sqliteq.JobCtx, payload: dict[str, Any]) -> None:
        """Record the wall-clock interval in which this handler ran."""
        started = time.time()
        time.sleep(payload["ms"] / 1000)
        _insert_run(ctx, started, time.time(), "slept")

    @rt.handler("gather")
    def gather(ctx: sqliteq.JobCtx, payload: dict[str, Any]) -> None:
        """Start, then wait until `payload["n"]` gather jobs of the same round have started
        (or 15 s pass): proves that many ran at the same time when they all end waiting."""
        started = time.time()
        seq = _insert_run(ctx, started, None, "gathering")
        deadline = time.monotonic() + 15
        met = False
        while time.monotonic() < deadline:
            count = ctx.storage.db.read("SELECT count(*) FROM runs WHERE kind = 'gather'")[0][0]
            if count >= payload["n"]:
                met = True
                break
            time.sleep(0.01)
        ended = time.time()
        ctx.storage.db.write(lambda c: c.execute(
            "UPDATE runs SET ended = ?, what = ? WHERE seq = ?",
            (ended, "met" if met else "timed out", seq)))

    @rt.handler("throttle_once")
    def throttle_once(ctx: sqliteq.JobCtx, payload: Any) -> str:
        """The first run records its time and raises Throttled; later runs succeed."""
        started = time.time()
        throttled_before = ctx.storage.db.read(
            "SELECT 1 FROM runs WHERE job_id = ? AND what = 'throttled'", (ctx.job_id,))
        if not throttled_before:
            _insert_run(ctx, started, time.time(), "throttled")
            raise sqliteq.Throttled(payload["seconds"])
        _insert_run(ctx, started, time.time(), "ran")
        return "ok"

    @rt.handler("note")
    def note(ctx: sqliteq.JobCtx, payload: Any) -> None:
        started = time.time()
        _insert_run(ctx, started, time.time(), "ran")

    @rt.handler("tick")
    def tick(ctx: sqliteq.JobCtx, payload: Any) -> None:
        return None


def run_ratelimit(args: argparse.Namespace) -> int:
    storage = sqliteq.Storage(args.db, schema=args.schema)
    limiter = sqliteq.RateLimiter(storage)
    go = Path(args.go)
    Path(args.ready).touch()
    while not go.exists():
        time.sleep(0.002)
    first_attempts: list[float] = []
    grants: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop_at = time.time() + args.seconds

    def loop() -> None:
        mine: list[float] = []
        first = time.time()        # taken before the first acquire can reach the bucket
        try:
            while True:
                remaining = stop_at - time.time()
                if remaining <= 0:
                    break
                try:
                    limiter.acquire("api", timeout=remaining)
                except TimeoutError:
                    break
                mine.append(time.time())    # taken after the grant committed
        except BaseException as exc:
            with lock:
                errors.append(repr(exc))
        with lock:
            first_attempts.append(first)
            grants.extend(mine)

    threads = [threading.Thread(target=loop) for _ in range(args.threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    storage.close()
    print(json.dumps({"first_attempts": first_attempts, "grants": grants, "errors": errors}))
    return 1 if errors else 0


def run_runtime(args: argparse.Namespace, schedule: str | None = None) -> int:
    errors = _ErrorFlag()
    logging.getLogger().addHandler(errors)
    storage = sqliteq.Storage(args.db, schema=args.schema)
    rt = sqliteq.Runtime(storage, {args.queue: args.slots}, poll_interval=args.poll,
                         heartbeat_interval=0.2, lease_timeout=10.0, shutdown_timeout=10.0)
    register_handlers(rt)
    if schedule is not None:
        rt.cron("tick", schedule, sqliteq.EnqueueRequest("tick"))
    rt.run()
    storage.close()
    return 1 if errors.seen else 0


class _ErrorFlag(logging.Handler):
    """Remembers whether anything was logged at ERROR or above."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.seen = False

    def emit(self, record: logging.LogRecord) -> None:
        self.seen = True


def run_chore(args: argparse.Namespace) -> int:
    with sqliteq.Storage(args.db, schema=args.schema) as storage:
        print(json.dumps(storage.processes._claim_chore(args.name, args.interval)))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("ratelimit", "runtime", "cron", "chore"))
    parser.add_argument("--db", required=True)
    parser.add_argument("--schema", default=None)
    parser.add_argument("--go", default="")
    parser.add_argument("--ready", default="")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--queue", default="default")
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument("--poll", type=float, default=0.02)
    parser.add_argument("--schedule", default="* * * * * *")
    parser.add_argument("--name", default="x")
    parser.add_argument("--interval", type=float, default=60.0)
    parser.add_argument("--max-life", type=float, default=120.0)
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format=f"%(asctime)s pid={os.getpid()} %(threadName)s %(levelname)s "
                               f"%(name)s: %(message)s")
    threading.Thread(target=_watchdog, args=(args.max_life,), daemon=True).start()
    if args.command == "ratelimit":
        return run_ratelimit(args)
    if args.command == "runtime":
        return run_runtime(args)
    if args.command == "cron":
        return run_runtime(args, args.schedule)
    return run_chore(args)


# ------------------------------------------------- used by the test process ----

class Children:
    """Child processes started by a test, with output in files; all killed in `close`."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, *args: str) -> subprocess.Popen[bytes]:
        index = len(self.procs)
        with open(self.log_dir / f"{index}.out", "wb") as out, \
                open(self.log_dir / f"{index}.err", "wb") as err:
            proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *args],
                                    cwd=Path(sqliteq.__file__).resolve().parent,
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        self.procs.append(proc)
        return proc

    def stdout(self, proc: subprocess.Popen[bytes]) -> str:
        return (self.log_dir / f"{self.procs.index(proc)}.out").read_text(errors="replace")

    def stderr(self, proc: subprocess.Popen[bytes]) -> str:
        return (self.log_dir / f"{self.procs.index(proc)}.err").read_text(errors="replace")

    def check_alive(self) -> None:
        for proc in self.procs:
            if proc.poll() is not None:
                raise AssertionError(f"child {proc.pid} exited with {proc.returncode}:\n"
                                     f"{self.stderr(proc)}")

    def finish(self, proc: subprocess.Popen[bytes], timeout: float = 30) -> str:
        """Wait for a child that exits by itself; its stdout. Fails on a non-zero exit."""
        code = proc.wait(timeout)
        assert code == 0, f"child exited with {code}:\n{self.stderr(proc)}"
        return self.stdout(proc)

    def terminate(self, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
        """SIGTERM (graceful `rt.run()` stop); fails unless it exits cleanly."""
        proc.terminate()
        self.finish(proc, timeout)

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(30)


if __name__ == "__main__":
    sys.exit(main())
