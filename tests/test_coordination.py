"""Cluster-wide coordination: the shared rate limiter, queue concurrency limits, Throttled
cool-downs, the janitor and its retention settings, and cluster chores.

Cross-process behaviour runs in real child processes (`tests/coord_workers.py`) on one
store (a SQLite file, or a PostgreSQL schema: every test runs on both unless it is about
SQLite); the test process acts as operator through its own `Storage`. Waits poll
conditions with generous deadlines; times compared across processes are wall-clock
`time.time()` values that the processes recorded themselves.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from coord_workers import Children, create_runs_table
from support import Target, raw, wait_until

import sqliteq
from sqliteq import EnqueueRequest

HOUR = 3600.0
COOL_DOWN = 3.0     # seconds: long enough for a slow machine to act within one cool-down


# ================================================================ helpers ====

@pytest.fixture
def children(tmp_path: Path) -> Iterator[Children]:
    kids = Children(tmp_path / "logs")
    try:
        yield kids
    finally:
        kids.close()        # SIGKILL every child still running, even when the test failed


@pytest.fixture
def db(target: Target) -> Target:
    create_runs_table(target)
    return target


def runs(db: Target, kind: str | None = None) -> list[dict[str, Any]]:
    rows = db.sql("SELECT job_id, kind, queue, attempt, pid, started, ended, what FROM runs"
                  " WHERE CAST(?1 AS TEXT) IS NULL OR kind = ?1 ORDER BY seq", kind)
    keys = ("job_id", "kind", "queue", "attempt", "pid", "started", "ended", "what")
    return [dict(zip(keys, row, strict=True)) for row in rows]


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """Most intervals open at one moment. At equal times an end counts before a start:
    an interval that ended when another began did not run alongside it."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals],
                    key=lambda event: (event[0], event[1]))
    open_now = most = 0
    for _, delta in events:
        open_now += delta
        most = max(most, open_now)
    return most


def wait_registered(storage: sqliteq.Storage, children: Children,
                    procs: list[subprocess.Popen[bytes]], timeout: float = 30) -> None:
    pids = {proc.pid for proc in procs}
    wait_until(lambda: pids <= {info.pid for info in storage.processes.list()}, timeout,
               "every child runtime to register", check=children.check_alive)


def start_runtimes(children: Children, db: Target, queue: str, slots: int, count: int
                   ) -> list[subprocess.Popen[bytes]]:
    return [children.start("runtime", *db.options(), "--queue", queue,
                           "--slots", str(slots)) for _ in range(count)]


# ======================================================= rate limiting ====

def test_rate_limit_is_shared_across_processes(db: Target, storage: sqliteq.Storage,
                                               children: Children, tmp_path: Path) -> None:
    capacity, refill = 10, 20
    storage.rate_limits.configure("api", capacity=capacity, refill_per_sec=refill)
    go = tmp_path / "go"
    ready = [tmp_path / f"ready{i}" for i in range(4)]
    procs = [children.start("ratelimit", *db.options(), "--go", str(go), "--ready",
                            str(flag), "--threads", "4", "--seconds", "3")
             for flag in ready]
    wait_until(lambda: all(flag.exists() for flag in ready), 30, "children to be ready",
               check=children.check_alive)
    go.touch()
    reports = [json.loads(children.finish(proc)) for proc in procs]

    assert all(report["errors"] == [] for report in reports)
    grants = [t for report in reports for t in report["grants"]]
    firsts = [t for report in reports for t in report["first_attempts"]]
    assert len(firsts) == 16
    # The real window of bucket activity, [first take, last take], lies inside
    # [earliest time taken before any acquire, latest time taken after a grant], so this
    # elapsed is an over-estimate and the bound computed from it is conservative.
    elapsed = max(grants) - min(firsts)
    bound = capacity + refill * elapsed + 1
    print(f"\n{len(grants)} grants in {elapsed:.3f} s; bound {bound:.1f}")
    assert 2.8 < elapsed < 4.5
    assert len(grants) <= bound, f"{len(grants)} grants in {elapsed:.3f} s"
    assert len(grants) >= 0.9 * bound, f"only {len(grants)} of {bound:.1f} in {elapsed:.3f} s"
    # Every process got a share (the bucket is one, not one per process).
    assert all(report["grants"] for report in reports)


def test_acquire_blocks_until_a_token_refills(storage: sqliteq.Storage) -> None:
    storage.rate_limits.configure("slow", capacity=1, refill_per_sec=2)
    limiter = sqliteq.RateLimiter(storage)
    started = time.monotonic()
    limiter.acquire("slow")                             # the full bucket's only token
    assert time.monotonic() - started < 0.2
    limiter.acquire("slow")                             # refills in 0.5 s
    waited = time.monotonic() - started
    assert 0.45 <= waited < 2.0


def test_acquire_timeout_raises_at_the_deadline(storage: sqliteq.Storage) -> None:
    storage.rate_limits.configure("slow", capacity=1, refill_per_sec=0.1)   # 10 s per token
    limiter = sqliteq.RateLimiter(storage)
    assert limiter.try_acquire("slow")
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        limiter.acquire("slow", timeout=0.5)
    assert 0.48 <= time.monotonic() - started < 1.5
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        limiter.acquire("slow", timeout=0)
    assert time.monotonic() - started < 0.5


def test_acquire_cancelled_from_another_thread(storage: sqliteq.Storage) -> None:
    storage.rate_limits.configure("slow", capacity=1, refill_per_sec=0.01)  # 100 s per token
    limiter = sqliteq.RateLimiter(storage)
    limiter.drain("slow")
    token = sqliteq.CancellationToken()
    fired_at: list[float] = []

    def fire() -> None:
        time.sleep(0.3)
        fired_at.append(time.monotonic())
        token.cancel("shutdown")

    threading.Thread(target=fire).start()
    started = time.monotonic()
    with pytest.raises(sqliteq.Cancelled, match="shutdown"):
        limiter.acquire("slow", cancel=token)
    raised_at = time.monotonic()
    assert raised_at - started >= 0.25
    assert raised_at - fired_at[0] < 0.5                # promptly after the token fired
    # An already-fired token raises before touching the bucket.
    with pytest.raises(sqliteq.Cancelled):
        limiter.acquire("slow", cancel=token)


def test_try_acquire_and_drain(storage: sqliteq.Storage) -> None:
    storage.rate_limits.configure("b", capacity=3, refill_per_sec=0.01)
    limiter = sqliteq.RateLimiter(storage)
    assert limiter.try_acquire("b", 2)
    assert limiter.try_acquire("b")
    assert not limiter.try_acquire("b")                 # empty: no blocking, just False
    storage.rate_limits.configure("c", capacity=5, refill_per_sec=0.01)
    assert limiter.try_acquire("c")                     # 4 left...
    limiter.drain("c")
    assert not limiter.try_acquire("c")                 # ...until drained
    assert not limiter.try_acquire("c", 0.5)


def test_rate_limit_errors(storage: sqliteq.Storage) -> None:
    limiter = sqliteq.RateLimiter(storage)
    with pytest.raises(sqliteq.ConfigError, match="'nowhere'"):
        limiter.acquire("nowhere")
    with pytest.raises(sqliteq.ConfigError, match="'nowhere'"):
        limiter.try_acquire("nowhere")
    storage.rate_limits.configure("small", capacity=2, refill_per_sec=1)
    with pytest.raises(sqliteq.InvalidInput, match="capacity"):
        limiter.acquire("small", 3)
    with pytest.raises(sqliteq.InvalidInput, match="capacity"):
        limiter.try_acquire("small", 2.5)
    for tokens in (0, -1, float("nan"), "1", True, None):
        with pytest.raises(sqliteq.InvalidInput):
            limiter.acquire("small", tokens)            # type: ignore[arg-type]
    for capacity, refill in ((0, 1), (-1, 1), (1, 0), (1, -2), (float("nan"), 1),
                             (1, float("inf")), ("10", 1), (1, None), (True, 1)):
        with pytest.raises(sqliteq.InvalidInput):
            storage.rate_limits.configure("bad", capacity, refill)   # type: ignore[arg-type]
    for scope in ("", " padded ", None):
        with pytest.raises(sqliteq.InvalidInput):
            storage.rate_limits.configure(scope, 1, 1)  # type: ignore[arg-type]
    with pytest.raises(sqliteq.ConfigError):            # nothing bad was written
        limiter.try_acquire("bad")
    assert limiter.try_acquire("small", 2)              # the failed calls took nothing


def test_reconfigured_rate_applies_from_the_change_on(storage: sqliteq.Storage) -> None:
    """Reconfiguring banks what the old rate refilled; the new rate is not retroactive."""
    storage.rate_limits.configure("r", capacity=10, refill_per_sec=0.01)
    limiter = sqliteq.RateLimiter(storage)
    limiter.drain("r")
    time.sleep(0.5)         # 0.005 tokens earned at the old rate: time passing is the setup
    storage.rate_limits.configure("r", capacity=10, refill_per_sec=20)
    changed = time.monotonic()
    granted = limiter.try_acquire("r", 5)       # at 20/s, 5 tokens take 250 ms from now
    assert time.monotonic() - changed < 0.2, "too slow to tell"
    assert not granted, "the new rate was applied to the half second before the change"


def test_acquire_sleeps_instead_of_spinning(storage: sqliteq.Storage) -> None:
    storage.rate_limits.configure("slow", capacity=1, refill_per_sec=1)
    limiter = sqliteq.RateLimiter(storage)
    limiter.drain("slow")
    measured: dict[str, float] = {}

    def wait_for_token() -> None:
        cpu, wall = time.thread_time(), time.monotonic()
        limiter.acquire("slow")
        measured["cpu"] = time.thread_time() - cpu
        measured["wall"] = time.monotonic() - wall

    thread = threading.Thread(target=wait_for_token)
    thread.start()
    thread.join(10)
    assert not thread.is_alive()
    assert measured["wall"] >= 0.9
    assert measured["cpu"] < 0.1, f"{measured['cpu']:.3f} s of CPU while waiting"


# ====================================================== concurrency limit ====

def test_queue_limit_holds_across_processes(db: Target, storage: sqliteq.Storage,
                                            children: Children) -> None:
    storage.queues.set_limit("limited", 2)
    assert [q.limit for q in storage.queues.list() if q.name == "limited"] == [2]
    procs = start_runtimes(children, db, "limited", slots=4, count=3)
    wait_registered(storage, children, procs)
    storage.jobs.enqueue_bulk([EnqueueRequest("sleep", {"ms": 50 + (i * 7) % 51},
                                              queue_name="limited") for i in range(30)])
    wait_until(lambda: storage.jobs.counts("limited")["done"] == 30, 60,
               "all 30 limited jobs to finish", check=children.check_alive)
    slept = runs(db, "sleep")
    assert len(slept) == 30
    assert max_overlap([(r["started"], r["ended"]) for r in slept]) == 2

    # Without the limit, the same three processes (12 slots) run more than 2 at once:
    # each "gather" job waits until 3 have started, so they all report "met" only if
    # at least 3 really ran at the same time.
    storage.queues.set_limit("limited", None)
    assert [q.limit for q in storage.queues.list() if q.name == "limited"] == [None]
    storage.jobs.enqueue_bulk([EnqueueRequest("gather", {"n": 3}, queue_name="limited")
                               for _ in range(6)])
    wait_until(lambda: storage.jobs.counts("limited")["done"] == 36, 60,
               "the gather jobs to finish", check=children.check_alive)
    gathered = runs(db, "gather")
    assert [r["what"] for r in gathered] == ["met"] * 6
    assert max_overlap([(r["started"], r["ended"]) for r in gathered]) >= 3
    for proc in procs:
        children.terminate(proc)


def test_queue_limit_is_global_not_per_process(db: Target, storage: sqliteq.Storage,
                                              children: Children) -> None:
    """One slot per process: every overlap is between processes, so the limit of 2 must
    hold the third process back, and nothing else does (without the limit all 3 run)."""
    storage.queues.set_limit("limited", 2)
    procs = start_runtimes(children, db, "limited", slots=1, count=3)
    wait_registered(storage, children, procs)
    storage.jobs.enqueue_bulk([EnqueueRequest("sleep", {"ms": 80}, queue_name="limited")
                               for _ in range(12)])
    wait_until(lambda: storage.jobs.counts("limited")["done"] == 12, 60,
               "the limited jobs to finish", check=children.check_alive)
    slept = runs(db, "sleep")
    assert len({r["pid"] for r in slept}) >= 2
    assert max_overlap([(r["started"], r["ended"]) for r in slept]) == 2

    storage.queues.set_limit("limited", None)
    storage.jobs.enqueue_bulk([EnqueueRequest("gather", {"n": 3}, queue_name="limited")
                               for _ in range(3)])
    wait_until(lambda: storage.jobs.counts("limited")["done"] == 15, 60,
               "the gather jobs to finish", check=children.check_alive)
    gathered = runs(db, "gather")
    assert [r["what"] for r in gathered] == ["met"] * 3
    assert len({r["pid"] for r in gathered}) == 3
    for proc in procs:
        children.terminate(proc)


# ============================================================ Throttled ====

def test_throttled_cools_the_queue_down_in_every_process(db: Target, storage: sqliteq.Storage,
                                                         children: Children) -> None:
    procs = start_runtimes(children, db, "thr", slots=2, count=2)
    wait_registered(storage, children, procs)
    throttled_id = storage.jobs.enqueue(
        EnqueueRequest("throttle_once", {"seconds": COOL_DOWN}, queue_name="thr")).job_id
    [throttle] = wait_until(lambda: [r for r in runs(db) if r["what"] == "throttled"], 20,
                            "the job to throttle", check=children.check_alive)
    thrown_at = throttle["ended"]           # taken just before `raise Throttled(COOL_DOWN)`
    # The cool-down is committed with the job's requeue; enqueue right after it is.
    [cooldown] = wait_until(lambda: [q.cooldown_until for q in storage.queues.list()
                                     if q.name == "thr" and q.cooldown_until], 10,
                            "the queue's cool-down to be committed")
    assert thrown_at + COOL_DOWN - 0.005 <= cooldown.timestamp() <= thrown_at + COOL_DOWN + 0.5
    others = [out.job_id for out in storage.jobs.enqueue_bulk(
        [EnqueueRequest("note", queue_name="thr") for _ in range(6)])]
    assert time.time() < thrown_at + COOL_DOWN - 0.1, "too slow to test the cool-down"

    for job_id in [throttled_id, *others]:
        assert storage.jobs.wait(job_id, timeout=20).state == sqliteq.JobState.DONE
    earliest = thrown_at + COOL_DOWN - 0.005
    started = [r for r in runs(db) if r["what"] == "ran"]
    assert len(started) == 7
    assert min(r["started"] for r in started) >= earliest
    for job_id in [throttled_id, *others]:      # claimed (not just started) after it, too
        claimed = storage.jobs.get(job_id).started_at.timestamp()
        assert claimed >= earliest, (job_id, claimed - thrown_at)

    job = storage.jobs.get(throttled_id)
    assert job.attempt == 1                     # the throttled attempt was refunded
    assert job.errors == []
    assert job.result == "ok"
    for proc in procs:
        children.terminate(proc)


@pytest.mark.sqlite_only     # (its probe is a SQLite trigger)
def test_throttled_holds_back_jobs_already_claimed_ahead(db: Target,
                                                        storage: sqliteq.Storage) -> None:
    """A queue of fast handlers claims ahead of its free slots (prefetch). Jobs claimed in
    the same batch as the throttled one must not start during the cool-down either."""
    db.sql("CREATE TABLE claims (job_id TEXT, kind TEXT, at INTEGER)")
    db.sql("CREATE TRIGGER claimed AFTER UPDATE OF state ON jobs WHEN NEW.state = 'running'"
           " BEGIN INSERT INTO claims VALUES (NEW.id, NEW.kind, NEW.started_at); END")
    starts: list[float] = []
    thrown: list[float] = []
    rt = sqliteq.Runtime(storage, {"thr": 1}, poll_interval=0.02)
    rt.register("fast", lambda ctx, payload: starts.append(time.time()))

    def throttle(ctx: sqliteq.JobCtx, payload: Any) -> None:
        if not thrown:
            thrown.append(time.time())
            raise sqliteq.Throttled(1.0)

    rt.register("throttle", throttle)
    with rt:
        # Warm up: fast handlers make the dispatcher claim ahead of free slots.
        warm = rt.enqueue_bulk([EnqueueRequest("fast", queue_name="thr") for _ in range(50)])
        storage.jobs.wait(warm[-1].job_id, timeout=20)
        starts.clear()
        batch = rt.enqueue_bulk([EnqueueRequest("throttle", queue_name="thr", priority=-1),
                                 *[EnqueueRequest("fast", queue_name="thr")
                                   for _ in range(5)]])
        for out in batch:
            storage.jobs.wait(out.job_id, timeout=20)
    # The scenario happened: fast jobs were claimed together with the throttled one.
    fast_ids = {out.job_id for out in batch[1:]}
    claimed_early = [job_id for job_id, at in db.sql("SELECT job_id, at FROM claims")
                     if job_id in fast_ids and at < thrown[0] * 1000 + 500]
    assert claimed_early, "no job was claimed ahead: the test would prove nothing"
    assert len(starts) == 5
    assert min(starts) >= thrown[0] + 1.0 - 0.005, (
        f"a job started {min(starts) - thrown[0]:.3f} s after Throttled(1.0)")


# ======================================================== janitor ====

def finished_rows(storage: sqliteq.Storage, handlers: dict[str, Callable[..., Any]],
                  requests: list[EnqueueRequest], queues: dict[str, int]) -> list[str]:
    """Run `requests` to completion through a real Runtime; their job ids."""
    rt = sqliteq.Runtime(storage, queues, poll_interval=0.02)
    for kind, fn in handlers.items():
        rt.register(kind, fn)
    with rt:
        ids = [out.job_id for out in rt.enqueue_bulk(requests)]
        for job_id in ids:
            storage.jobs.wait(job_id, timeout=20)
    return ids


def ok(ctx: sqliteq.JobCtx, payload: Any) -> str:
    return "ok"


def dead(ctx: sqliteq.JobCtx, payload: Any) -> None:
    raise sqliteq.Dead("for good")


def cancel(ctx: sqliteq.JobCtx, payload: Any) -> None:
    raise sqliteq.Cancelled()


HANDLERS = {"ok": ok, "dead": dead, "cancel": cancel}


def age(db: Target, job_id: str, seconds: float) -> None:
    """Pretend the job finished `seconds` ago."""
    db.sql("UPDATE jobs SET finished_at = ? WHERE id = ?",
           sqliteq.now_ms() - int(seconds * 1000), job_id)


def remaining(storage: sqliteq.Storage, ids: list[str]) -> set[str]:
    return {job_id for job_id in ids if storage.jobs.get(job_id) is not None}


def test_sweep_expired_deletes_exactly_the_expired(db: Target, storage: sqliteq.Storage) -> None:
    kinds = ["ok"] * 4 + ["dead"] * 4 + ["cancel"] * 4
    ids = finished_rows(storage, HANDLERS, [EnqueueRequest(k) for k in kinds],
                        {"default": 2})
    done, failed, cancelled = ids[0:4], ids[4:8], ids[8:12]
    assert {storage.jobs.get(i).state.value for i in done} == {"done"}
    assert {storage.jobs.get(i).state.value for i in failed} == {"failed"}
    assert {storage.jobs.get(i).state.value for i in cancelled} == {"cancelled"}
    ages_done = (0.5 * HOUR, 0.98 * HOUR, 1.02 * HOUR, 5 * HOUR)       # keep, keep, go, go
    ages_failed = (1.5 * HOUR, 1.98 * HOUR, 2.02 * HOUR, 24 * HOUR)    # keep, keep, go, go
    for job_id, seconds in zip(done, ages_done, strict=True):
        age(db, job_id, seconds)
    for group in (failed, cancelled):
        for job_id, seconds in zip(group, ages_failed, strict=True):
            age(db, job_id, seconds)

    # Active rows are never touched, whatever their timestamps say.
    queued = storage.jobs.enqueue(EnqueueRequest("ok", run_at=time.time() + HOUR)).job_id
    running = storage.jobs.enqueue(EnqueueRequest("ok", run_at=time.time() + HOUR)).job_id
    db.sql("UPDATE jobs SET state = 'running', started_at = 0 WHERE id = ?", running)
    for job_id in (queued, running):
        db.sql("UPDATE jobs SET created_at = 0, finished_at = 0 WHERE id = ?", job_id)

    storage.queues.set_retention("default", done=3600, failed=7200)
    [queue] = [q for q in storage.queues.list() if q.name == "default"]
    assert (queue.retain_done, queue.retain_failed) == (3600, 7200)
    assert storage.jobs.sweep_expired() == 6
    assert remaining(storage, [*ids, queued, running]) == {
        done[0], done[1], failed[0], failed[1], cancelled[0], cancelled[1], queued, running}
    assert storage.jobs.sweep_expired() == 0        # idempotent


def test_runtime_janitor_sweeps_by_itself(db: Target, storage: sqliteq.Storage) -> None:
    storage.queues.set_retention("default", done=3600, failed=7200)
    rt = sqliteq.Runtime(storage, {"default": 2}, poll_interval=0.02, janitor_interval=0.2)
    for kind, fn in HANDLERS.items():
        rt.register(kind, fn)
    with rt:
        ids = [out.job_id for out in rt.enqueue_bulk(
            [EnqueueRequest(k) for k in ("ok", "ok", "dead", "dead", "cancel")])]
        for job_id in ids:
            storage.jobs.wait(job_id, timeout=20)
        # Rows become expired while the runtime runs: it must sweep again by itself.
        age(db, ids[0], 2 * HOUR)
        age(db, ids[2], 3 * HOUR)
        age(db, ids[3], 1.5 * HOUR)         # failed, within its 2 h: stays
        age(db, ids[4], 3 * HOUR)
        wait_until(lambda: remaining(storage, ids) == {ids[1], ids[3]}, 15,
                   "the runtime's janitor to delete the expired rows")
        age(db, ids[1], 2 * HOUR)           # and again, later
        wait_until(lambda: remaining(storage, ids) == {ids[3]}, 15,
                   "the janitor's next sweep")


def test_stop_ends_a_janitor_sweep_in_progress(tmp_path: Path) -> None:
    # A big backlog of expired rows: the sweep is still deleting chunks when stop() runs.
    # stop() must end it after its current chunk, so closing the storage right after finds
    # no thread still using a connection; the next sweep deletes the rest.
    db = tmp_path / "sweep.db"
    rows = 150_000
    with sqliteq.Storage(db) as storage:
        storage.jobs.enqueue_bulk([EnqueueRequest("ok") for _ in range(rows)])
        raw(db, "UPDATE jobs SET state = 'done', finished_at = 0")
        rt = sqliteq.Runtime(storage, {"default": 1}, poll_interval=0.02)
        rt.start()
        wait_until(lambda: raw(db, "SELECT count(*) FROM jobs")[0][0] < rows, 30,
                   "the janitor to start deleting")
        rt.stop(timeout=5)
        assert not [t for t in threading.enumerate() if t.name.startswith("sqliteq-janitor")]
        left = raw(db, "SELECT count(*) FROM jobs")[0][0]
    assert 0 < left < rows, "the sweep should have been stopped part-way"
    with sqliteq.Storage(db) as storage:
        assert storage.jobs.sweep_expired() == left
    assert raw(db, "SELECT count(*) FROM jobs") == [(0,)]


def test_claim_chore_once_per_interval_cluster_wide(db: Target, storage: sqliteq.Storage,
                                                    children: Children) -> None:
    assert storage.processes._claim_chore("x", 60) is True
    assert storage.processes._claim_chore("x", 60) is False
    with db.open() as other:
        assert other.processes._claim_chore("x", 60) is False
    proc = children.start("chore", *db.options(), "--name", "x", "--interval", "60")
    assert json.loads(children.finish(proc)) is False
    assert storage.processes._claim_chore("y", 60) is True       # chores are independent

    # A race between processes for a fresh chore: exactly one wins.
    racers = [children.start("chore", *db.options(), "--name", "race", "--interval", "60")
              for _ in range(4)]
    results = [json.loads(children.finish(p)) for p in racers]
    results.append(storage.processes._claim_chore("race", 60))
    assert results.count(True) == 1, results

    # After the interval it can be claimed again, once.
    assert storage.processes._claim_chore("short", 0.3) is True
    claimed_at = time.monotonic()
    assert storage.processes._claim_chore("short", 0.3) is False
    wait_until(lambda: storage.processes._claim_chore("short", 0.3), 10,
               "the short chore to come due again")
    assert time.monotonic() - claimed_at >= 0.25
    assert storage.processes._claim_chore("short", 0.3) is False


def test_retention_is_per_queue(db: Target, storage: sqliteq.Storage) -> None:
    requests = [EnqueueRequest(kind, queue_name=queue)
                for queue in ("fast", "slow") for kind in ("ok", "ok", "dead", "dead")]
    ids = finished_rows(storage, HANDLERS, requests, {"fast": 1, "slow": 1})
    fast, slow = ids[:4], ids[4:]
    storage.queues.set_retention("fast", done=60, failed=120)
    storage.queues.set_retention("slow", done=3600, failed=7200)
    storage.queues.set_retention("slow", done=None)     # None leaves a setting unchanged
    settings = {q.name: (q.retain_done, q.retain_failed) for q in storage.queues.list()}
    assert settings["fast"] == (60, 120)
    assert settings["slow"] == (3600, 7200)
    for group in (fast, slow):
        age(db, group[0], 1800)      # done, 30 min: past fast's 1 min, within slow's 1 h
        age(db, group[1], 5400)      # done, 90 min: past both
        age(db, group[2], 1800)      # failed, 30 min: past fast's 2 min, within slow's 2 h
        age(db, group[3], 5400)      # failed, 90 min: past fast's, within slow's 2 h
    assert storage.jobs.sweep_expired() == 5
    assert remaining(storage, ids) == {slow[0], slow[2], slow[3]}


def test_limit_and_retention_settings_are_validated(storage: sqliteq.Storage) -> None:
    for bad in (0, -1, 1.5, True, "2"):           # 0 is refused: pause a queue instead
        with pytest.raises(sqliteq.InvalidInput):
            storage.queues.set_limit("q", bad)          # type: ignore[arg-type]
    for done, failed in ((-1, None), (None, -5), ("1h", None), (float("nan"), None)):
        with pytest.raises(sqliteq.InvalidInput):
            storage.queues.set_retention("q", done=done, failed=failed)  # type: ignore[arg-type]
    for name in ("", " q"):
        with pytest.raises(sqliteq.InvalidInput):
            storage.queues.set_limit(name, 1)
    assert [q.name for q in storage.queues.list()] == []    # nothing written
    storage.queues.set_limit("q", 1)
    storage.queues.set_retention("q", done=timedelta(minutes=5))
    [queue] = storage.queues.list()
    assert (queue.limit, queue.retain_done, queue.retain_failed) == (1, 300, 30 * 86400)
