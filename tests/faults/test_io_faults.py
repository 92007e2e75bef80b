"""Disk faults: an I/O error or a full disk at any write, sync or truncate of the database
or its WAL loses no acknowledged job, duplicates none, surfaces only as a SqliteqError, and
leaves a storage (and a runtime) that works again once the disk does.

The way SQLite tests itself: a fault-injecting VFS (tests/faults/vfs.py) fails the 1st, then
the 2nd, 3rd ... matching operation of one enqueue, until an enqueue runs to its end without
reaching the armed operation; after every fault point the file is checked behind sqliteq's
back (a raw connection on the real "unix" VFS):

* an enqueue that returned is in the file exactly once;
* an enqueue that raised is in the file at most once (a write that fails may still have
  taken effect, README "Guarantees"), and a bulk enqueue is all of its jobs or none;
* what it raised is a sqliteq.SqliteqError, never a raw apsw error;
* the storage enqueues again once the fault is gone (reopening it, if need be, works);
* the file passes PRAGMA integrity_check.

Which operations a commit reaches depends on the settings, so each combination is driven
where it lands: syncs with `durable=True` (synchronous=FULL syncs the WAL on every commit),
and main-file operations right after a raw connection has grown the WAL past the
auto-checkpoint threshold (the enqueue's commit then checkpoints, writing and syncing the
main file). Some operations a commit never reaches (a WAL truncate, usually): such a walk
ends at its first fault point, and its summary line says so.

A draining Runtime under random faults (p = 0.02) then shows that every job still reaches a
final state once the disk heals, none is finalized twice (an audit trigger records every
finalization), and the runtime either works on or has stopped with `error` set; it never
sits wedged. Run with `pytest -s` to see the figures; SQLITEQ_SOAK=1 adds a longer soak.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import apsw
import pytest
from support import assert_error, clean_env, raw, script, wait_until
from vfs import VFS_NAME, FaultVFS, fault_vfs

import sqliteq
from sqliteq import EnqueueRequest

OPS = ("write", "sync", "truncate")
KINDS = ("main", "wal")
ERRORS = (apsw.IOError, apsw.FullError)
MAX_FAULT_POINTS = 400          # a walk that has not ended by then is a bug of the walk
BULK = 50
FINAL = ("done", "failed", "cancelled")
DISPATCHER = "sqliteq-dispatch"     # the name prefix of a runtime's dispatcher thread


@pytest.fixture
def vfs() -> Iterator[FaultVFS]:
    shim = fault_vfs()
    shim.reset()
    yield shim
    shim.reset()


# ------------------------------------------------------------------ helpers ----

def grow_wal(db_path: Path, then: str | None = None, *params: object) -> None:
    """Append frames to the WAL through a raw connection that never checkpoints, until the
    WAL passes SQLite's auto-checkpoint threshold (1000 frames): the next commit of a
    sqliteq connection then runs the checkpoint. The frames rewrite the same few pages, so
    the checkpoint stays short. `then` is a last statement to run on that connection (one
    that must not checkpoint either)."""
    frames = [0]

    def wal_hook(conn: apsw.Connection, name: str, pages: int) -> int:
        frames[0] = pages           # replaces the auto-checkpoint: this one never runs one
        return apsw.SQLITE_OK

    conn = apsw.Connection(str(db_path))
    try:
        conn.setbusytimeout(20_000)
        conn.set_wal_hook(wal_hook)
        conn.execute("PRAGMA synchronous = OFF")
        conn.execute("CREATE TABLE IF NOT EXISTS fault_padding (x BLOB)")
        if not conn.execute("SELECT count(*) FROM fault_padding").fetchall()[0][0]:
            conn.execute("INSERT INTO fault_padding VALUES (zeroblob(16000))")
        while frames[0] < 1010:
            conn.execute("UPDATE fault_padding SET x = randomblob(16000)")
        if then is not None:
            conn.execute(then, params)
    finally:
        conn.close()


def copies_by_number(db_path: Path) -> Counter[int]:
    """How many rows of kind "k" the file holds for each payload number (read raw)."""
    rows = raw(db_path, "SELECT json_extract(payload, '$.i') FROM jobs WHERE kind = 'k'")
    return Counter(number for (number,) in rows)


def integrity(db_path: Path) -> str:
    return raw(db_path, "PRAGMA integrity_check")[0][0]


def describe(exc: BaseException) -> str:
    return f"{type(exc).__module__}.{type(exc).__name__}: {exc}"


@dataclass
class Walk:
    """What one walk over fault points saw."""

    points: int = 0                 # fault points that landed
    unreached: bool = False         # the armed operation never happened at all
    checked: int = 0                # jobs whose presence was checked
    lost: int = 0
    duplicated: int = 0
    raised: int = 0                 # fault points where the enqueue raised
    raised_but_committed: int = 0   # ... and its jobs were in the file all the same
    reopened: int = 0               # fault points after which the storage had to be reopened
    foreign: list[str] = field(default_factory=list)   # non-SqliteqError exceptions
    problems: list[str] = field(default_factory=list)

    def summary(self, name: str) -> str:
        reach = " (operation never reached by a commit)" if self.unreached else ""
        return (f"{name}: fault points tried: {self.points}{reach}, jobs checked: "
                f"{self.checked}, raised: {self.raised} (committed all the same: "
                f"{self.raised_but_committed}), reopened: {self.reopened}, "
                f"foreign errors: {len(self.foreign)}, lost: {self.lost}, "
                f"double-finalized: {self.duplicated}")


Enqueue = Callable[[sqliteq.Storage, list[int]], list[sqliteq.EnqueueOutcome]]


def enqueue_one(storage: sqliteq.Storage, numbers: list[int]) -> list[sqliteq.EnqueueOutcome]:
    (number,) = numbers
    return [storage.jobs.enqueue(EnqueueRequest("k", {"i": number}))]


def enqueue_many(storage: sqliteq.Storage, numbers: list[int]) -> list[sqliteq.EnqueueOutcome]:
    return storage.jobs.enqueue_bulk([EnqueueRequest("k", {"i": n}) for n in numbers])


def walk_fault_points(db_path: Path, vfs: FaultVFS, enqueue: Enqueue, size: int, op: str,
                      kind: str, error: type[apsw.Error]) -> Walk:
    """Fail the 1st, 2nd, ... `op` on the `kind` file during one enqueue of `size` jobs,
    until the enqueue no longer reaches it, checking the file after every fault point."""
    walk = Walk()
    durable = op == "sync"
    storage = sqliteq.Storage(db_path, vfs=VFS_NAME, durable=durable)
    acknowledged: set[int] = set()
    maybe: set[int] = set()         # raised: in the file at most once
    next_number = 0
    try:
        for nth in range(1, MAX_FAULT_POINTS + 1):
            if kind == "main":
                grow_wal(db_path)
            numbers = list(range(next_number, next_number + size))
            next_number += size
            vfs.arm(op=op, kind=kind, nth=nth, error=error)
            failure: BaseException | None = None
            try:
                outcomes = enqueue(storage, numbers)
            except Exception as exc:
                failure = exc
            finally:
                vfs.disarm()
            if not vfs.injected:
                walk.unreached = nth == 1
                if failure is not None:
                    walk.problems.append(f"nth={nth}: raised with no fault injected: "
                                         f"{describe(failure)}")
                else:
                    acknowledged.update(numbers)
                break
            walk.points += 1
            if failure is None:
                assert len(outcomes) == size and all(o.inserted for o in outcomes)
                acknowledged.update(numbers)
            else:
                walk.raised += 1
                maybe.update(numbers)
                if not isinstance(failure, sqliteq.SqliteqError):
                    walk.foreign.append(f"nth={nth}: {describe(failure)}")
            copies = copies_by_number(db_path)
            if failure is not None and all(copies[n] for n in numbers):
                walk.raised_but_committed += 1
            if failure is not None and size > 1:
                present = {copies[n] for n in numbers}
                if len(present) != 1:
                    walk.problems.append(f"nth={nth}: a failed bulk enqueue left part of "
                                         f"its jobs ({sorted(present)} copies)")
            # The storage works again: on the same object, or else on a reopened one.
            probe = [next_number]
            next_number += 1
            try:
                enqueue(storage, probe) if size == 1 else enqueue_one(storage, probe)
            except Exception as exc:
                walk.reopened += 1
                maybe.update(probe)
                try:
                    storage.close()
                except Exception:
                    pass
                storage = sqliteq.Storage(db_path, vfs=VFS_NAME, durable=durable)
                probe = [next_number]
                next_number += 1
                try:
                    enqueue_one(storage, probe)
                except Exception as again:
                    walk.problems.append(f"nth={nth}: no enqueue works after the fault "
                                         f"({describe(exc)}), even reopened: {describe(again)}")
                    break
            acknowledged.update(probe)
        else:
            walk.problems.append(f"the walk did not end within {MAX_FAULT_POINTS} points")
    finally:
        vfs.disarm()
        try:
            storage.close()
        except Exception:
            pass
    copies = copies_by_number(db_path)
    walk.checked = len(acknowledged) + len(maybe)
    walk.lost = sum(copies[n] == 0 for n in acknowledged)
    walk.duplicated = sum(copies[n] > 1 for n in acknowledged | maybe)
    for n in sorted(acknowledged):
        if copies[n] != 1:
            walk.problems.append(f"acknowledged job {n} is in the file {copies[n]} times")
    for n in sorted(maybe):
        if copies[n] > 1:
            walk.problems.append(f"failed job {n} is in the file {copies[n]} times")
    if (check := integrity(db_path)) != "ok":
        walk.problems.append(f"integrity_check: {check}")
    return walk


# ----------------------------------------------------------- enqueue faults ----

# Filled in from the runs: (op, kind, error name) where the suite found sqliteq at fault.
KNOWN_FOREIGN: dict[tuple[str, str, str], str] = {}


def fault_cases() -> list[object]:
    cases = []
    for op in OPS:
        for kind in KINDS:
            for error in ERRORS:
                reason = KNOWN_FOREIGN.get((op, kind, error.__name__))
                marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
                cases.append(pytest.param(op, kind, error, marks=marks,
                                          id=f"{op}-{kind}-{error.__name__}"))
    return cases


@pytest.mark.parametrize(("op", "kind", "error"), fault_cases())
def test_a_failed_disk_operation_in_an_enqueue_loses_nothing_and_raises_a_sqliteq_error(
        db_path: Path, vfs: FaultVFS, op: str, kind: str, error: type[apsw.Error]) -> None:
    walk = walk_fault_points(db_path, vfs, enqueue_one, 1, op, kind, error)
    print(f"\n{walk.summary(f'enqueue {op}/{kind}/{error.__name__}')}")
    assert walk.problems == []
    assert walk.lost == 0 and walk.duplicated == 0
    assert walk.foreign == []


@pytest.mark.parametrize(("op", "kind", "error"), fault_cases())
def test_a_failed_disk_operation_in_a_bulk_enqueue_commits_all_or_none(
        db_path: Path, vfs: FaultVFS, op: str, kind: str, error: type[apsw.Error]) -> None:
    walk = walk_fault_points(db_path, vfs, enqueue_many, BULK, op, kind, error)
    print(f"\n{walk.summary(f'enqueue_bulk {op}/{kind}/{error.__name__}')}")
    assert walk.problems == []
    assert walk.lost == 0 and walk.duplicated == 0
    assert walk.foreign == []


# ----------------------------------------------------------- runtime faults ----

AUDIT = """
CREATE TABLE IF NOT EXISTS fault_audit (job_id TEXT NOT NULL, state TEXT NOT NULL,
                                        attempt INTEGER NOT NULL);
CREATE TRIGGER IF NOT EXISTS fault_audit_finish AFTER UPDATE OF state ON jobs
WHEN new.state IN ('done', 'failed', 'cancelled') AND old.state NOT IN ('done', 'failed',
                                                                         'cancelled')
BEGIN
    INSERT INTO fault_audit VALUES (new.id, new.state, new.attempt);
END;
"""


class WalPadder:
    """A raw connection that keeps appending to the WAL (never checkpointing itself), so
    sqliteq's connections keep running auto-checkpoints: main-file writes and syncs."""

    def __init__(self, db_path: Path) -> None:
        self.db_path = db_path
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True, name="wal-padder")

    def run(self) -> None:
        conn = apsw.Connection(str(self.db_path))
        try:
            conn.setbusytimeout(20_000)
            conn.execute("PRAGMA wal_autocheckpoint = 0")
            conn.execute("PRAGMA synchronous = OFF")
            conn.execute("CREATE TABLE IF NOT EXISTS fault_padding (x BLOB)")
            conn.executemany("INSERT INTO fault_padding VALUES (zeroblob(16000))",
                             [()] * 8)
            row = 0
            while not self.stop.wait(0.0005):
                conn.execute("UPDATE fault_padding SET x = randomblob(16000) WHERE rowid = ?",
                             (row % 8 + 1,))
                row += 1
        finally:
            conn.close()

    def __enter__(self) -> WalPadder:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop.set()
        self.thread.join(30)


@dataclass
class Drain:
    """What one runtime run under random faults saw."""

    p: float = 0.0
    injected: int = 0
    jobs: int = 0
    acknowledged: int = 0
    lost: int = 0
    double_finalized: int = 0
    stopped_with: str | None = None
    foreign: list[str] = field(default_factory=list)

    def summary(self, name: str) -> str:
        state = "alive" if self.stopped_with is None else f"stopped ({self.stopped_with})"
        return (f"{name}: fault points tried: {self.injected} (random, p={self.p}), jobs checked: "
                f"{self.jobs}, acknowledged: {self.acknowledged}, runtime {state}, "
                f"foreign errors: {len(self.foreign)}, lost: {self.lost}, "
                f"double-finalized: {self.double_finalized}")


def drain_under_faults(db_path: Path, vfs: FaultVFS, op: str | None, kind: str | None,
                       error: type[apsw.Error], seconds: float, seed: int, p: float) -> Drain:
    """Run a Runtime while enqueues keep coming and faults fire at random, then heal the
    disk and check every job's fate."""
    drain = Drain(p=p)
    sqliteq.Storage(db_path).close()
    raw(db_path, AUDIT)
    storage = sqliteq.Storage(db_path, vfs=VFS_NAME, durable=op == "sync")
    runtime = sqliteq.Runtime(storage, {"default": 2}, poll_interval=0.02,
                              heartbeat_interval=0.1, lease_timeout=5)
    runs: Counter[int] = Counter()
    runs_lock = threading.Lock()

    def handler(ctx: sqliteq.JobCtx, payload: dict[str, int]) -> dict[str, int]:
        with runs_lock:
            runs[payload["i"]] += 1
        return {"i": payload["i"]}

    runtime.register("k", handler)
    acknowledged: dict[str, int] = {}
    number = 0
    try:
        runtime.start()
        with WalPadder(db_path):
            vfs.arm(op=op, kind=kind, p=p, error=error, seed=seed)
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                batch = list(range(number, number + 5))
                number += 5
                try:
                    outcomes = enqueue_many(storage, batch)
                except sqliteq.SqliteqError:
                    pass
                except Exception as exc:
                    drain.foreign.append(describe(exc))
                else:
                    acknowledged.update((o.job_id, n) for o, n in zip(outcomes, batch,
                                                                      strict=True))
                time.sleep(0.01)
            vfs.disarm()
            drain.injected = vfs.injected
        drain.acknowledged = len(acknowledged)

        def all_final() -> bool:
            rows = raw(db_path, "SELECT count(*) FROM jobs WHERE kind = 'k'"
                                " AND state NOT IN ('done', 'failed', 'cancelled')")
            return rows[0][0] == 0 or runtime.error is not None

        # The runtime either finishes everything or stops itself, well within the lease.
        try:
            wait_until(all_final, timeout=30, what="every job final, or the runtime stopped")
        except AssertionError:
            stuck = raw(db_path, "SELECT state, host = ?, count(*) FROM jobs WHERE kind = 'k'"
                        " AND state NOT IN ('done', 'failed', 'cancelled') GROUP BY 1, 2",
                        runtime.host_id)
            pytest.fail(f"runtime wedged, alive: {runtime.error is None}; jobs not final "
                        f"(state, on this host, count): {stuck}")
        if runtime.error is None:
            probe = storage.jobs.enqueue(EnqueueRequest("k", {"i": -1}))
            job = storage.jobs.wait(probe.job_id, timeout=30)
            assert job.state.value == "done", job
            assert runtime.error is None
            acknowledged[probe.job_id] = -1
        else:
            drain.stopped_with = describe(runtime.error)
            assert isinstance(runtime.error, sqliteq.SqliteqError)
    finally:
        vfs.disarm()
        runtime.stop(timeout=30)
        storage.close()
    if drain.stopped_with is not None:
        # A stopped runtime hands its jobs to the next one: a fresh runtime finishes them.
        with sqliteq.Storage(db_path) as healthy:
            with sqliteq.Runtime(healthy, {"default": 2}, poll_interval=0.02,
                                 heartbeat_interval=0.1, lease_timeout=5) as rescuer:
                rescuer.register("k", handler)
                wait_until(lambda: raw(db_path, "SELECT count(*) FROM jobs WHERE kind = 'k'"
                                       " AND state != 'done'")[0][0] == 0, timeout=60,
                           what="a fresh runtime finishing the stopped runtime's jobs")
    rows = dict(raw(db_path, "SELECT id, state FROM jobs WHERE kind = 'k'"))
    finals = Counter(job_id for (job_id,) in raw(db_path, "SELECT job_id FROM fault_audit"))
    drain.jobs = len(rows)
    drain.lost = sum(job_id not in rows for job_id in acknowledged)
    drain.double_finalized = sum(n > 1 for n in finals.values())
    assert all(state in FINAL for state in rows.values()), Counter(rows.values())
    assert all(finals[job_id] == 1 for job_id in rows), "a job finalized other than once"
    assert integrity(db_path) == "ok"
    return drain


RUNTIME_CASES = [pytest.param(op, kind, error, id=f"{op}-{kind}-{error.__name__}")
                 for op, kind in (("write", "wal"), ("sync", "wal"), ("write", "main"),
                                  ("sync", "main"), ("truncate", "wal"))
                 for error in ERRORS]


@pytest.mark.parametrize(("op", "kind", "error"), RUNTIME_CASES)
def test_a_draining_runtime_under_random_disk_faults_finishes_every_job_once(
        db_path: Path, vfs: FaultVFS, op: str, kind: str, error: type[apsw.Error]) -> None:
    # Main-file operations happen only in checkpoints, a few dozen a second: fail more of
    # them, so that some land. Those faults make a COMMIT that took effect raise (in the
    # dispatcher's commit too: the test below shows that case alone).
    p = 0.2 if kind == "main" else 0.02
    seed = zlib.crc32(f"{op}/{kind}/{error.__name__}".encode())
    drain = drain_under_faults(db_path, vfs, op, kind, error, seconds=1.0, seed=seed, p=p)
    print(f"\n{drain.summary(f'runtime {op}/{kind}/{error.__name__}')}")
    assert drain.foreign == []
    assert drain.lost == 0 and drain.double_finalized == 0


def claimed(db_path: Path, job_id: str) -> bool:
    return raw(db_path, "SELECT state FROM jobs WHERE id = ?", job_id)[0][0] != "queued"


def test_a_dispatcher_commit_that_fails_after_taking_effect_strands_no_claimed_job(
        db_path: Path, vfs: FaultVFS, caplog: pytest.LogCaptureFixture) -> None:
    # The COMMIT's auto-checkpoint hits a main-file fault, which apsw reports at the COMMIT:
    # the claim took effect, but the runtime was told it failed and holds no such job. Its
    # heartbeat keeps the reaper away, so the runtime itself must put the job back.
    storage = sqliteq.Storage(db_path, vfs=VFS_NAME)
    runtime = sqliteq.Runtime(storage, {"default": 2}, poll_interval=0.02,
                              heartbeat_interval=1.0, lease_timeout=1.5)
    runtime.register("k", lambda ctx, payload: payload)
    try:
        runtime.start()
        warm = storage.jobs.enqueue(EnqueueRequest("k", {"i": 0}))
        assert storage.jobs.wait(warm.job_id, timeout=10).state.value == "done"
        job_id = ""
        for attempt in range(5):    # until the dispatcher's claim is what runs the checkpoint
            # The job arrives behind sqliteq's back with the WAL past the checkpoint
            # threshold: the dispatcher's claim commits it as running, then checkpoints,
            # and the checkpoint's first write to the main file fails.
            vfs.arm(op="write", kind="main", nth=1, thread=DISPATCHER)
            job_id = f"STRANDED{attempt}"
            now = sqliteq.now_ms()
            grow_wal(db_path, "INSERT INTO jobs (id, kind, queue, payload, state, run_at,"
                              " created_at) VALUES (?, 'k', 'default', '{\"i\": 1}', 'queued',"
                              " ?, ?)", job_id, now, now)
            wait_until(functools.partial(claimed, db_path, job_id), timeout=10,
                       what="the job claimed")
            vfs.disarm()
            if vfs.injected:
                break
        assert vfs.injected, "the fault never landed in the dispatcher's commit"
        assert runtime.error is None
        try:
            job = storage.jobs.wait(job_id, timeout=5 * runtime.lease_timeout)
        except TimeoutError:
            state, host = raw(db_path, "SELECT state, host FROM jobs WHERE id = ?", job_id)[0]
            pytest.fail(f"job {job_id} stranded: {state} on host {host} (this runtime: "
                        f"{runtime.host_id}, alive: {runtime.error is None})")
        assert job.state.value == "done"
        # Put back by this runtime, refunded: not rescued by a reaper (which burns attempts).
        assert (job.attempt, job.errors) == (1, [])
        assert "releasing 1 claimed job(s) this runtime does not hold" in caplog.text
    finally:
        vfs.disarm()
        runtime.stop(timeout=10)
        storage.close()


@pytest.mark.skipif(not os.environ.get("SQLITEQ_SOAK"), reason="set SQLITEQ_SOAK=1 to soak")
@pytest.mark.parametrize("seed", range(8))
def test_soak_a_runtime_under_random_faults_of_every_kind(db_path: Path, vfs: FaultVFS,
                                                          seed: int) -> None:
    error = ERRORS[seed % 2]
    drain = drain_under_faults(db_path, vfs, None, None, error, seconds=15.0, seed=seed,
                               p=0.02)
    print(f"\n{drain.summary(f'soak seed {seed} any/any/{error.__name__}')}")
    assert drain.foreign == []
    assert drain.lost == 0 and drain.double_finalized == 0


# ------------------------------------------------------- a file that cannot grow ----

# Runs a command with writes past a size failing (EFBIG), as on a full disk: SIGXFSZ ignored
# (an error, not a killed process); both survive the exec.
CANNOT_GROW = """
import os, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]),) * 2)
os.execv(sys.argv[2], sys.argv[2:])
"""


def test_the_cli_on_a_file_that_cannot_grow_prints_one_line_and_loses_nothing(
        db_path: Path) -> None:
    with sqliteq.Storage(db_path) as storage:
        kept = storage.jobs.enqueue(EnqueueRequest("k", "kept")).job_id
    lines = "".join(json.dumps({"kind": "k", "payload": {"pad": "x" * 1000}}) + "\n"
                    for _ in range(5000))
    limit = str(db_path.stat().st_size + 100_000)
    result = subprocess.run([sys.executable, "-c", CANNOT_GROW, limit, script(), "--db",
                             str(db_path), "enqueue-bulk", "-"], input=lines,
                            capture_output=True, text=True, timeout=60, env=clean_env())
    assert_error(result, "I/O error", code=1)
    assert raw(db_path, "SELECT id FROM jobs") == [(kept,)]
    assert integrity(db_path) == "ok"
