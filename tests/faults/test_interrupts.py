"""Interrupts: a KeyboardInterrupt (or any BaseException) that lands in a writing thread, at
any point of a write, leaves no transaction open, reaches no other thread, and never stalls
the other writers of the process.

Two ways in: a real SIGINT to a real process blocked on another process's writer lock, and a
BaseException injected at every point of the write path where CPython can deliver a signal
(a profile function raises it), the way SQLite's own tests walk fault points one by one.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import apsw
import pytest
from support import raw, wait_until
from workers import writer_lock_free

import sqliteq
from sqliteq import EnqueueRequest

ROOT = Path(sqliteq.__file__).resolve().parent


# ------------------------------------------------ a real SIGINT to a blocked writer ----

INTERRUPTED_ENQUEUER = """
import sys, time
import sqliteq
storage = sqliteq.Storage(sys.argv[1], busy_timeout=20)
print("ready", flush=True)
sys.stdin.readline()                      # the parent takes the writer lock meanwhile
print("enqueueing", flush=True)
try:
    storage.jobs.enqueue(sqliteq.EnqueueRequest("first"))
    print("not interrupted", flush=True)
except KeyboardInterrupt:
    print("interrupted", flush=True)
sys.stdin.readline()                      # the parent checks the writer lock meanwhile
storage.jobs.enqueue(sqliteq.EnqueueRequest("after"))
print("enqueued after", flush=True)
sys.stdin.readline()
"""


def test_sigint_while_waiting_for_the_writer_lock_leaves_no_lock_held(db_path, child_env):
    sqliteq.Storage(db_path).close()
    holder = apsw.Connection(str(db_path))
    child = subprocess.Popen([sys.executable, "-c", INTERRUPTED_ENQUEUER, str(db_path)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             env=child_env)
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline().strip() == "ready"
        holder.execute("BEGIN IMMEDIATE")
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "enqueueing"
        # Give the child a moment to enter SQLite's busy wait inside BEGIN IMMEDIATE: the
        # interrupt is then raised as that returns, right after it took the lock. (Where
        # else it lands, the assertions below hold all the same.)
        threading.Event().wait(0.3)
        child.send_signal(signal.SIGINT)
        threading.Event().wait(0.3)
        holder.execute("COMMIT")
        assert child.stdout.readline().strip() in ("interrupted", "not interrupted")
        # The process lives on (a REPL, a notebook): it must not keep the writer lock.
        wait_until(lambda: writer_lock_free(db_path), timeout=10, what="writer lock free")
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "enqueued after"
        assert writer_lock_free(db_path)
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.wait(timeout=30) == 0
    finally:
        holder.close()
        child.kill()
        child.wait()
    kinds = [kind for (kind,) in raw(db_path, "SELECT kind FROM jobs ORDER BY id")]
    assert kinds in (["after"], ["first", "after"])


# ------------------------------------- a BaseException at every point of a shared commit ---

WRITE_PATH = {"write", "_lead", "_commit_batch", "_finish_batch", "_hand_lead", "_withdraw",
              "_take_lead", "run", "run_in_savepoint", "wake", "connection"}


class Interrupt(KeyboardInterrupt):
    """The injected interrupt (a subclass, so that a real Ctrl-C is never mistaken for it)."""


def interrupt_at(point: int) -> tuple[Callable[..., Any], list[int]]:
    """A profile function that raises Interrupt at the `point`-th place of the write path
    where CPython could deliver a signal in the profiled thread, and a one-item list
    counting the places it saw.

    CPython runs signal handlers at a function's entry and right after a call returns, never
    in between, so those are the places: a call into the write path, a return from one of
    its functions, and a return from a C function it called (`conn.execute("COMMIT")`, a
    lock's acquire). Raising there is what a Ctrl-C does at that point."""
    seen = [0]

    def in_write_path(frame: Any) -> bool:
        return (frame is not None and frame.f_code.co_filename == sqliteq.__file__
                and frame.f_code.co_name in WRITE_PATH)

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event in ("call", "return"):     # (not a garbage collector's callback)
            here = in_write_path(frame) or (
                in_write_path(frame.f_back)
                and frame.f_code.co_filename in (sqliteq.__file__, __file__))
        else:
            here = event == "c_return" and in_write_path(frame)
        if here:
            seen[0] += 1
            if seen[0] == point:
                sys.setprofile(None)
                raise Interrupt(f"injected at {event} in line {frame.f_lineno} of "
                                f"{frame.f_code.co_name}")

    return profile, seen


def insert(name: str) -> Callable[[apsw.Connection], None]:
    return lambda conn: conn.execute("INSERT INTO marks (name) VALUES (?)", (name,))


def run_shared_commit(db: sqliteq.Database, point: int, bystander: Callable[[], None]
                      ) -> tuple[BaseException | None, int]:
    """Three writers: a blocker leads a commit that waits until `victim` and the bystander
    have queued behind it, so that `victim` leads the next commit with the bystander's write
    in it. `bystander()` starts the bystander (it must queue exactly one write). An interrupt
    is injected into `victim` at its `point`-th place. Returns what `victim` raised and how
    many places it passed."""
    release = threading.Event()
    outcome: dict[str, BaseException | None] = {}
    profile, seen = interrupt_at(point)

    def blocker(conn: apsw.Connection) -> None:
        release.wait(10)

    def victim() -> None:
        sys.setprofile(profile)
        try:
            db.write(insert("victim"))
            outcome["victim"] = None
        except BaseException as exc:
            outcome["victim"] = exc
        finally:
            sys.setprofile(None)

    threads = [threading.Thread(target=db.write, args=(blocker,), name="blocker"),
               threading.Thread(target=victim, name="victim")]
    threads[0].start()
    wait_until(lambda: db._leading, what="the blocker leading")
    threads[1].start()
    wait_until(lambda: len(db._pending) == 1 or "victim" in outcome, what="victim queued")
    bystander()
    wait_until(lambda: len(db._pending) == 2 or "victim" in outcome, what="bystander queued")
    release.set()
    for thread in threads:
        thread.join(20)
        assert not thread.is_alive(), f"{thread.name} wedged (interrupt at point {point})"
    return outcome["victim"], seen[0]


def check_victim(db_path: Path, raised: BaseException | None) -> bool:
    """The victim's write happened at most once, and surely if it was not interrupted;
    whether it was interrupted."""
    marks = [name for (name,) in raw(db_path, "SELECT name FROM marks")]
    assert marks.count("victim") <= 1, marks
    if raised is None:
        assert marks.count("victim") == 1, marks
        return False
    assert isinstance(raised, Interrupt), raised
    return True


def check_writers_unharmed(storage: sqliteq.Storage, db_path: Path, point: int) -> None:
    assert writer_lock_free(db_path), f"writer lock left held (point {point})"
    storage.db.write(insert("after"))               # this thread can still write,
    done = threading.Event()                        # and so can another one
    threading.Thread(target=lambda: (storage.db.write(insert("after")), done.set())).start()
    assert done.wait(10), f"writers stalled after an interrupt at point {point}"


def test_an_interrupt_at_any_point_of_a_shared_commit_reaches_only_its_thread(db_path):
    """The bug: BEGIN IMMEDIATE returned, then the interrupt, before the try that rolls back:
    the writer lock stayed held for good; and the leader's interrupt was handed to every
    write in its batch."""
    points = interrupted = 0
    with sqliteq.Storage(db_path, busy_timeout=2) as storage:
        storage.db.write(lambda conn: conn.execute("CREATE TABLE marks (name TEXT)"))
        for point in range(1, 10_000):
            raw(db_path, "DELETE FROM marks")
            failure: dict[str, BaseException] = {}

            def write_beside(failure: dict[str, BaseException]) -> None:
                try:
                    storage.db.write(insert("bystander"))
                except BaseException as exc:    # the failure this test looks for
                    failure["bystander"] = exc

            beside = threading.Thread(target=write_beside, args=(failure,))
            raised, places = run_shared_commit(storage.db, point, beside.start)
            beside.join(20)
            assert not beside.is_alive(), f"bystander wedged (interrupt at point {point})"
            assert not failure, f"interrupt at point {point} reached another thread: {failure}"
            marks = [name for (name,) in raw(db_path, "SELECT name FROM marks")]
            assert marks.count("bystander") == 1, (point, marks)
            interrupted += check_victim(db_path, raised)
            check_writers_unharmed(storage, db_path, point)
            points += 1
            if point > places:      # the interrupt came after the write was over
                break
    print(f"\ninterrupt points tried: {points}, interrupted writes: {interrupted}")
    assert interrupted >= 20        # the loop really walked the write path


def test_an_interrupt_in_a_commit_the_dispatcher_rides_in_leaves_the_runtime_running(db_path):
    """The bug: the dispatcher's finish rode in an interrupted thread's commit, got the
    KeyboardInterrupt, and died, while the heartbeat kept the host looking alive."""
    points = interrupted = 0
    with sqliteq.Storage(db_path, busy_timeout=2) as storage:
        storage.db.write(lambda conn: conn.execute("CREATE TABLE marks (name TEXT)"))
        rt = sqliteq.Runtime(storage, {"default": 1}, poll_interval=0.02,
                             heartbeat_interval=0.1, lease_timeout=30)
        proceed = threading.Event()
        started = threading.Semaphore(0)

        @rt.handler("held")
        def held(ctx: sqliteq.JobCtx, payload: None) -> str:
            started.release()
            proceed.wait(20)
            return "ok"

        with rt:
            for point in range(1, 10_000):
                raw(db_path, "DELETE FROM marks")
                proceed.clear()
                job_id = storage.jobs.enqueue(EnqueueRequest("held", max_attempts=1)).job_id
                assert started.acquire(timeout=20), "the job never started"
                # the bystander: the handler returns, the dispatcher commits its finish
                raised, places = run_shared_commit(storage.db, point, proceed.set)
                job = storage.jobs.wait(job_id, timeout=20)
                assert (job.state.value, job.attempt, job.result) == ("done", 1, "ok"), point
                assert rt._dispatcher is not None and rt._dispatcher.is_alive(), point
                assert rt.error is None
                interrupted += check_victim(db_path, raised)
                check_writers_unharmed(storage, db_path, point)
                points += 1
                if point > places:
                    break
    print(f"\ninterrupt points tried: {points}, interrupted writes: {interrupted}")
    assert interrupted >= 20


@pytest.mark.parametrize("exit_exception", [SystemExit(2), KeyboardInterrupt()],
                         ids=["SystemExit", "KeyboardInterrupt"])
def test_a_handler_raising_systemexit_or_keyboardinterrupt_fails_only_its_attempt(
        db_path, exit_exception):
    """The bug: argparse in a handler raised SystemExit on bad input, and the whole worker
    stopped (exit code 0); the job, back in its queue, then stopped the next worker too.
    Only the main thread receives signals, so in a worker these come from the handler."""
    with sqliteq.Storage(db_path) as storage:
        rt = sqliteq.Runtime(storage, {"default": 2}, poll_interval=0.02,
                             heartbeat_interval=0.1, lease_timeout=30)
        rt.register("exits", lambda ctx, payload: (_ for _ in ()).throw(exit_exception))
        rt.register("fine", lambda ctx, payload: "ok")
        with rt:
            storage.queues.set_backoff("default", 0.01, 0.01)
            exits = storage.jobs.enqueue(EnqueueRequest("exits", max_attempts=2)).job_id
            job = storage.jobs.wait(exits, timeout=30)
            assert (job.state.value, job.attempt) == ("failed", 2)
            assert [e["error"].split(":")[0] for e in job.errors] == [
                type(exit_exception).__name__] * 2
            fine = storage.jobs.enqueue(EnqueueRequest("fine")).job_id
            assert storage.jobs.wait(fine, timeout=30).state.value == "done"
            assert rt.error is None


class Death(BaseException):
    """What kills a runtime thread in the test below (no code of sqliteq raises it)."""


def test_a_runtime_thread_that_dies_stops_the_runtime_instead_of_looking_alive(db_path):
    with sqliteq.Storage(db_path) as storage:
        rt = sqliteq.Runtime(storage, {"default": 1}, poll_interval=0.02,
                             heartbeat_interval=0.05, lease_timeout=30)
        rt.start()
        assert [p.host_id for p in storage.processes.list()] == [rt.host_id]

        def dies(*args: Any) -> None:
            raise Death("injected")

        storage.processes._heartbeat = dies      # type: ignore[method-assign]
        wait_until(lambda: rt._stopped.is_set(), timeout=20, what="the runtime stopped")
        rt.stop()                               # returns once the runtime's own stop is over
        assert isinstance(rt.error, sqliteq.SqliteqError)
        assert "heartbeat thread died of Death" in str(rt.error)
        assert storage.processes.list() == []   # no host row to look alive
        assert rt._dispatcher is not None and not rt._dispatcher.is_alive()
