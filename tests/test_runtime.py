"""The in-process runtime: handlers, outcomes, retries, scheduling, wake-ups, pause, cancel,
throttling, limits, shutdown and signals — on real database files with real threads.

Nothing is mocked and no assertion rests on a sleep: tests wait on conditions (`jobs.wait`,
`wait_until`) with generous deadlines and compare times the handlers recorded themselves.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import apsw
import pytest
import ulid
from support import FAST, buffered, rounds, wait_until

import sqliteq
from sqliteq import EnqueueRequest

REPO = Path(sqliteq.__file__).resolve().parent



# ------------------------------------------------------------- helpers ----

def ms(moment: datetime | float) -> int:
    """A datetime or epoch seconds as integer epoch milliseconds (the database's unit)."""
    seconds = moment.timestamp() if isinstance(moment, datetime) else moment
    return int(seconds * 1000)


def error_time_ms(entry: dict[str, Any]) -> int:
    return ms(datetime.fromisoformat(entry["at"].replace("Z", "+00:00")))


def state_of(storage: sqliteq.Storage, job_id: str) -> str:
    job = storage.jobs.get(job_id)
    assert job is not None
    return job.state.value


def fast_backoff(storage: sqliteq.Storage, queue: str = "default") -> None:
    storage.queues.set_backoff(queue, 0.01, 0.05)


# ------------------------------------------------------- handler results ----

def test_a_returned_value_becomes_the_result_of_a_done_job(storage, make_runtime):
    router = sqliteq.KindRouter({})
    rt = make_runtime({"default": 1}, router)
    seen: dict[str, Any] = {}

    @rt.handler("greet")
    def greet(ctx: sqliteq.JobCtx, payload: dict) -> dict:
        seen["ctx"] = ctx
        seen["cancelled_at_start"] = ctx.cancel.cancelled
        return {"greeting": f"hello {payload['name']}", "list": [1, 2.5, None, True],
                "nested": {"ü": "ß"}}

    with rt:
        job_id = rt.enqueue(EnqueueRequest("greet", {"name": "ada"})).job_id
        job = storage.jobs.wait(job_id, timeout=10)

    assert job.state == "done"
    assert job.result == {"greeting": "hello ada", "list": [1, 2.5, None, True],
                          "nested": {"ü": "ß"}}
    assert job.attempt == 1
    assert job.errors == []
    assert job.host == rt.host_id
    assert str(ulid.ULID.from_str(rt.host_id)) == rt.host_id
    ctx = seen["ctx"]
    assert job.worker == ctx.process_id
    assert re.fullmatch(rf"default-\d+-{re.escape(rt.host_id)}", ctx.process_id)
    assert job.started_at is not None and job.finished_at is not None
    assert job.created_at <= job.started_at <= job.finished_at

    assert ctx.job_id == job_id
    assert ctx.kind == "greet"
    assert ctx.queue == "default"
    assert ctx.attempt == 1
    assert ctx.host_id == rt.host_id
    assert ctx.storage is storage
    assert ctx.router is router
    assert isinstance(ctx.rate_limit, sqliteq.RateLimiter)
    assert isinstance(ctx.cancel, sqliteq.CancellationToken)
    assert seen["cancelled_at_start"] is False


def test_worker_threads_are_named_by_their_process_id(storage, make_runtime):
    rt = make_runtime({"default": 2, "other": 1})
    names: list[tuple[str, str, str]] = []

    @rt.handler("who")
    def who(ctx, payload):
        names.append((threading.current_thread().name, ctx.process_id, ctx.queue))

    with rt:
        ids = [rt.enqueue(EnqueueRequest("who", queue_name=q)).job_id
               for q in ("default", "default", "other")]
        for job_id in ids:
            storage.jobs.wait(job_id, timeout=10)

    assert len(names) == 3
    for thread_name, process_id, queue in names:
        assert thread_name == process_id
        assert process_id.startswith(f"{queue}-")


# --------------------------------------------------------- task objects ----

def test_a_task_enqueues_jobs_of_its_kind_and_stays_callable(storage, make_runtime):
    rt = make_runtime({"default": 1, "email": 1})

    @rt.task
    def double(ctx: sqliteq.JobCtx, payload: int) -> int:
        return payload * 2

    @rt.task(kind="mail.send", queue="email", priority=3, max_attempts=2)
    def send(ctx: sqliteq.JobCtx, payload: dict) -> str:
        return f"sent to {payload['to']}"

    assert (double.kind, send.kind) == ("double", "mail.send")
    assert double(None, 21) == 42 and double.__name__ == "double"   # the function, for tests
    with rt:
        first = double.enqueue(21).job_id
        urgent = send.enqueue({"to": "ada"}, priority=-1).job_id
        bulk = [out.job_id for out in send.enqueue_bulk({"to": n} for n in ("bo", "cy"))]
        jobs = [storage.jobs.wait(job_id, timeout=10) for job_id in (first, urgent, *bulk)]
    assert [job.result for job in jobs] == [42, "sent to ada", "sent to bo", "sent to cy"]
    assert [(job.kind, job.queue, job.priority, job.max_attempts) for job in jobs] == [
        ("double", "default", 0, sqliteq.DEFAULT_MAX_ATTEMPTS), ("mail.send", "email", -1, 2),
        ("mail.send", "email", 3, 2), ("mail.send", "email", 3, 2)]


def test_a_task_with_a_bad_default_is_refused_when_it_is_declared(storage, make_runtime):
    rt = make_runtime()
    with pytest.raises(sqliteq.InvalidInput, match="priority"):
        @rt.task(priority="high")  # type: ignore[call-overload]
        def bad(ctx: sqliteq.JobCtx, payload: Any) -> None:
            return None
    rt.register("other", lambda ctx, payload: None)
    assert set(rt._handlers) == {"other"}        # nothing registered for "bad"


# ------------------------------------------------------------- ordering ----

def test_lower_priority_values_run_first(storage, make_runtime):
    rt = make_runtime({"default": 1})
    order: list[int] = []

    @rt.handler("p")
    def record(ctx, payload):
        order.append(payload)

    ids = [rt.enqueue(EnqueueRequest("p", priority, priority=priority)).job_id
           for priority in (5, -1, 3, 0)]
    with rt:
        for job_id in ids:
            storage.jobs.wait(job_id, timeout=10)

    assert order == [-1, 0, 3, 5]


def test_a_scheduled_job_starts_at_its_run_at_not_before_and_without_polling(
        storage, make_runtime):
    # Polls and heartbeats far apart: only the runtime's own next-due timer can start the
    # job on time.
    rt = make_runtime({"default": 1}, poll_interval=5.0, heartbeat_interval=5.0,
                      lease_timeout=10.0)
    started: list[float] = []

    @rt.handler("later")
    def later(ctx, payload):
        started.append(time.time())

    with rt:
        due = time.time() + 0.5
        job_id = rt.enqueue(EnqueueRequest("later", run_at=due)).job_id
        job = storage.jobs.wait(job_id, timeout=3)

    assert job.state == "done"
    assert len(started) == 1
    # The database keeps milliseconds: the start may equal run_at at that resolution.
    assert ms(started[0]) >= ms(job.run_at)
    assert started[0] >= due - 0.001
    assert started[0] < due + 1.5


# --------------------------------------------------- failures and retries ----

def explode_on_attempt(attempt: int) -> None:
    raise ValueError(f"boom on attempt {attempt}")


def test_an_exception_is_retried_with_backoff_and_recorded(storage, make_runtime):
    fast_backoff(storage)
    rt = make_runtime({"default": 1})
    starts: list[float] = []

    @rt.handler("flaky")
    def flaky(ctx, payload):
        starts.append(time.time())
        if ctx.attempt < 3:
            explode_on_attempt(ctx.attempt)
        return "third time lucky"

    with rt:
        job_id = rt.enqueue(EnqueueRequest("flaky")).job_id
        job = storage.jobs.wait(job_id, timeout=10)

    assert job.state == "done"
    assert job.result == "third time lucky"
    assert job.attempt == 3
    assert len(job.errors) == 2
    for index, entry in enumerate(job.errors):
        attempt = index + 1
        assert set(entry) == {"at", "attempt", "error", "traceback"}
        assert entry["attempt"] == attempt
        assert "ValueError" in entry["error"]
        assert f"boom on attempt {attempt}" in entry["error"]
        assert "explode_on_attempt" in entry["traceback"]
        failed_at = error_time_ms(entry)
        assert ms(starts[index]) <= failed_at
        assert ms(starts[index + 1]) > failed_at, "a retry waits out its backoff"


def test_a_job_that_keeps_failing_ends_failed_after_max_attempts(storage, make_runtime):
    fast_backoff(storage)
    rt = make_runtime({"default": 1})
    calls: list[int] = []

    @rt.handler("broken")
    def broken(ctx, payload):
        calls.append(ctx.attempt)
        raise RuntimeError("always")

    with rt:
        job_id = rt.enqueue(EnqueueRequest("broken", max_attempts=2)).job_id
        job = storage.jobs.wait(job_id, timeout=10)

    assert job.state == "failed"
    assert job.attempt == 2
    assert calls == [1, 2]
    assert [e["attempt"] for e in job.errors] == [1, 2]
    assert all("RuntimeError: always" in e["error"] for e in job.errors)
    assert job.finished_at is not None


def test_only_the_latest_20_errors_are_kept(storage, make_runtime):
    storage.queues.set_backoff("default", 0.001, 0.001)
    rt = make_runtime({"default": 1}, heartbeat_interval=0.05)

    @rt.handler("broken")
    def broken(ctx, payload):
        raise RuntimeError(f"failure {ctx.attempt}")

    with rt:
        job_id = rt.enqueue(EnqueueRequest("broken", max_attempts=25)).job_id
        job = storage.jobs.wait(job_id, timeout=20)

    assert job.state == "failed"
    assert job.attempt == 25
    assert len(job.errors) == 20
    assert [e["attempt"] for e in job.errors] == list(range(6, 26))
    assert "failure 25" in job.errors[-1]["error"]


def test_retry_after_delays_the_next_attempt_and_counts_an_attempt(storage, make_runtime):
    rt = make_runtime({"default": 1})
    starts: list[tuple[int, float]] = []

    @rt.handler("later")
    def later(ctx, payload):
        starts.append((ctx.attempt, time.time()))
        if ctx.attempt == 1:
            raise sqliteq.Retry(after=0.3, reason="upstream busy")
        return "ok"

    with rt:
        job_id = rt.enqueue(EnqueueRequest("later")).job_id
        job = storage.jobs.wait(job_id, timeout=10)

    assert job.state == "done"
    assert job.attempt == 2
    assert [attempt for attempt, _ in starts] == [1, 2]
    assert starts[1][1] - starts[0][1] >= 0.3 - 0.005
    assert len(job.errors) == 1
    assert "upstream busy" in job.errors[0]["error"]


def test_retry_on_the_last_attempt_fails_the_job(storage, make_runtime):
    rt = make_runtime({"default": 1})

    @rt.handler("again")
    def again(ctx, payload):
        raise sqliteq.Retry(after=0.01)

    with rt:
        job_id = rt.enqueue(EnqueueRequest("again", max_attempts=1)).job_id
        job = storage.jobs.wait(job_id, timeout=10)

    assert job.state == "failed"
    assert job.attempt == 1
    assert len(job.errors) == 1


def test_snooze_runs_the_job_again_later_with_the_attempt_refunded(storage, make_runtime):
    rt = make_runtime({"default": 1})
    starts: list[tuple[int, float]] = []

    @rt.handler("dozy")
    def dozy(ctx, payload):
        starts.append((ctx.attempt, time.time()))
        if len(starts) <= 2:
            raise sqliteq.Snooze(0.2)
        return "awake"

    with rt:
        job_id = rt.enqueue(EnqueueRequest("dozy", max_attempts=1)).job_id
        job = storage.jobs.wait(job_id, timeout=10)

    assert job.state == "done"
    assert job.result == "awake"
    assert job.attempt == 1, "snoozes do not use up attempts"
    assert [attempt for attempt, _ in starts] == [1, 1, 1]
    for (_, before), (_, after) in itertools.pairwise(starts):
        assert after - before >= 0.2 - 0.005
    assert job.errors == [], "a snooze is not a failure"


def test_dead_fails_the_job_at_once_although_attempts_remain(storage, make_runtime):
    rt = make_runtime({"default": 1})
    calls: list[int] = []

    @rt.handler("doomed")
    def doomed(ctx, payload):
        calls.append(ctx.attempt)
        raise sqliteq.Dead("nope")

    with rt:
        job_id = rt.enqueue(EnqueueRequest("doomed", max_attempts=5)).job_id
        job = storage.jobs.wait(job_id, timeout=10)

    assert job.state == "failed"
    assert job.attempt == 1
    assert calls == [1]
    assert len(job.errors) == 1
    assert "nope" in job.errors[0]["error"]


def test_raising_cancelled_ends_the_job_cancelled(storage, make_runtime):
    rt = make_runtime({"default": 1})

    @rt.handler("quitter")
    def quitter(ctx, payload):
        raise sqliteq.Cancelled()

    with rt:
        job_id = rt.enqueue(EnqueueRequest("quitter", max_attempts=5)).job_id
        job = storage.jobs.wait(job_id, timeout=10)

    assert job.state == "cancelled"
    assert job.attempt == 1
    assert job.finished_at is not None


def test_a_job_of_an_unknown_kind_fails_its_attempt(storage, make_runtime):
    rt = make_runtime({"default": 1})

    with rt:
        job_id = rt.enqueue(EnqueueRequest("mystery", max_attempts=1)).job_id
        job = storage.jobs.wait(job_id, timeout=10)

    assert job.state == "failed"
    assert job.attempt == 1
    assert len(job.errors) == 1
    assert "no handler registered for kind" in job.errors[0]["error"]
    assert "mystery" in job.errors[0]["error"]


def test_an_unknown_kind_is_retried_so_a_newer_deploy_can_run_it(storage, make_runtime):
    # A long backoff keeps the second attempt from starting before the old runtime stops;
    # run_now makes it due for the new one.
    storage.queues.set_backoff("default", 60, 60)
    old = make_runtime({"default": 1})
    job_id = storage.jobs.enqueue(EnqueueRequest("new_feature", max_attempts=3)).job_id
    with old:
        wait_until(lambda: (job := storage.jobs.get(job_id)) and job.errors, 10,
                   "the first attempt to fail")
    job = storage.jobs.get(job_id)
    assert job.state == "queued"
    assert job.attempt == 1
    assert "no handler registered for kind" in job.errors[0]["error"]

    assert storage.jobs.run_now(job_id) is True
    new = make_runtime({"default": 1})
    new.register("new_feature", lambda ctx, payload: "shipped")
    with new:
        job = storage.jobs.wait(job_id, timeout=10)
    assert job.state == "done"
    assert job.result == "shipped"
    assert job.attempt == 2


class Weird(BaseException):
    """Not an Exception: escapes `except Exception`."""


def test_a_base_exception_from_a_handler_fails_the_job_but_not_the_worker(
        storage, make_runtime):
    rt = make_runtime({"default": 1})
    workers: list[str] = []

    @rt.handler("weird")
    def weird(ctx, payload):
        workers.append(ctx.process_id)
        raise Weird("odd thing")

    @rt.handler("fine")
    def fine(ctx, payload):
        workers.append(ctx.process_id)
        return "still here"

    with rt:
        bad = rt.enqueue(EnqueueRequest("weird", max_attempts=1)).job_id
        assert storage.jobs.wait(bad, timeout=10).state == "failed"
        good = rt.enqueue(EnqueueRequest("fine")).job_id
        assert storage.jobs.wait(good, timeout=10).result == "still here"

    error = storage.jobs.get(bad).errors[0]["error"]
    assert "Weird" in error and "odd thing" in error
    assert workers[0] == workers[1], "the single worker thread survived and ran the next job"


def test_a_result_that_is_not_json_fails_the_attempt_but_not_the_worker(
        storage, make_runtime):
    fast_backoff(storage)
    rt = make_runtime({"default": 1})
    calls: list[int] = []

    @rt.handler("opaque")
    def opaque(ctx, payload):
        calls.append(ctx.attempt)
        return object()

    @rt.handler("fine")
    def fine(ctx, payload):
        return "still here"

    with rt:
        bad = rt.enqueue(EnqueueRequest("opaque", max_attempts=2)).job_id
        job = storage.jobs.wait(bad, timeout=10)
        good = rt.enqueue(EnqueueRequest("fine")).job_id
        assert storage.jobs.wait(good, timeout=10).result == "still here"

    assert job.state == "failed"
    assert calls == [1, 2], "a bad result is a failed attempt, retried like any other"
    assert job.result is None
    assert all("json" in e["error"].lower() and "object" in e["error"] for e in job.errors)


def test_a_payload_that_is_not_json_fails_the_job_for_good_on_its_first_attempt(
        storage, make_runtime, sql):
    fast_backoff(storage)
    rt = make_runtime({"default": 1})
    ran: list[Any] = []
    rt.register("k", lambda ctx, payload: ran.append(payload))
    job_id = storage.jobs.enqueue(EnqueueRequest("k", "x")).job_id
    sql("UPDATE jobs SET payload = ? WHERE id = ?", "[" * 5000 + "]" * 5000, job_id)
    with rt:
        wait_until(lambda: sql("SELECT state FROM jobs WHERE id = ?", job_id)[0][0]
                   in ("done", "failed", "cancelled"), timeout=10, what="the job finalized")
    state, attempt, errors = sql("SELECT state, attempt, errors FROM jobs WHERE id = ?",
                                 job_id)[0]
    assert (state, attempt, ran) == ("failed", 1, [])
    assert "not JSON sqliteq can read" in json.loads(errors)[0]["error"]


@pytest.mark.parametrize("stored, expected", [
    (' {"a": [1, "\u00e9"]}\n', {"a": [1, "\u00e9"]}),  # written by hand, spaced out
    ('"caf\u00e9"', "caf\u00e9"), ("[1] [2]", None), ("", None)])
def test_a_payload_written_by_another_program_reads_as_json_does(
        storage, make_runtime, sql, stored, expected):
    """JSON as any writer may leave it: whitespace around the value is JSON; a second
    value or nothing at all is not, and fails the job for good."""
    rt = make_runtime({"default": 1})
    ran: list[Any] = []
    rt.register("k", lambda ctx, payload: ran.append(payload))
    job_id = storage.jobs.enqueue(EnqueueRequest("k", "x")).job_id
    sql("UPDATE jobs SET payload = ? WHERE id = ?", stored, job_id)
    with rt:
        wait_until(lambda: sql("SELECT state FROM jobs WHERE id = ?", job_id)[0][0]
                   in ("done", "failed"), timeout=10, what="the job finalized")
    state, errors = sql("SELECT state, errors FROM jobs WHERE id = ?", job_id)[0]
    if expected is None:
        assert (state, ran) == ("failed", [])
        assert "not JSON sqliteq can read" in json.loads(errors)[0]["error"]
    else:
        assert (state, ran) == ("done", [expected])


def test_a_result_nested_too_deep_is_an_error_of_the_attempt(storage, make_runtime):
    rt = make_runtime({"default": 1})
    too_deep: list = []
    for _ in range(sqliteq.MAX_JSON_DEPTH + 1):
        too_deep = [too_deep]
    rt.register("k", lambda ctx, payload: too_deep)
    with rt:
        job_id = rt.enqueue(EnqueueRequest("k", max_attempts=1)).job_id
        job = storage.jobs.wait(job_id, timeout=10)
    assert job.state == "failed" and job.result is None
    assert "result of job" in job.errors[0]["error"] and "deep" in job.errors[0]["error"]


# ------------------------------------------------------ follow-up work ----

def test_ctx_enqueue_routes_a_child_job_with_the_runtime_router(storage, make_runtime):
    rt = make_runtime({"default": 1, "other": 1}, sqliteq.KindRouter({"child": "other"}))
    child_queues: list[str] = []

    @rt.handler("parent")
    def parent(ctx, payload):
        return ctx.enqueue(EnqueueRequest("child", {"from": ctx.job_id})).job_id

    @rt.handler("child")
    def child(ctx, payload):
        child_queues.append(ctx.queue)
        return payload["from"]

    with rt:
        parent_id = storage.jobs.enqueue(EnqueueRequest("parent")).job_id
        child_id = storage.jobs.wait(parent_id, timeout=10).result
        child_job = storage.jobs.wait(child_id, timeout=10)

    assert child_job.queue == "other"
    assert child_job.state == "done"
    assert child_job.result == parent_id
    assert child_queues == ["other"]


def test_ctx_enqueue_bulk_fans_out_children_that_all_run(storage, make_runtime):
    rt = make_runtime({"default": 4})
    ran: list[int] = []

    @rt.handler("fan_out")
    def fan_out(ctx, payload):
        outcomes = ctx.enqueue_bulk(EnqueueRequest("leaf", n) for n in range(100))
        return [outcome.job_id for outcome in outcomes]

    @rt.handler("leaf")
    def leaf(ctx, payload):
        ran.append(payload)
        return payload * 2

    with rt:
        parent_id = rt.enqueue(EnqueueRequest("fan_out")).job_id
        child_ids = storage.jobs.wait(parent_id, timeout=10).result
        children = [storage.jobs.wait(child_id, timeout=20) for child_id in child_ids]

    assert len(child_ids) == len(set(child_ids)) == 100
    assert [child.result for child in children] == [n * 2 for n in range(100)]
    assert sorted(ran) == list(range(100))


# ------------------------------------------- dispatcher rounds, clock injected ----
# (See tests/support.py: the tests run the rounds themselves.)

def test_a_round_claims_a_scheduled_job_once_the_clock_reaches_its_run_at(storage):
    rt, dispatcher, clock = rounds(storage)
    job_id = storage.jobs.enqueue(EnqueueRequest("k", run_at=time.time() + 3600)).job_id
    run_at = int(storage.jobs.get(job_id).run_at.timestamp() * 1000)
    dispatcher.step(clock.now)
    assert buffered(rt) == []
    assert rt._queue_states["default"].next_due == run_at      # the sleep would end then
    clock.now = run_at - 1
    dispatcher.step(clock.now)
    assert buffered(rt) == []
    clock.now = run_at
    dispatcher.step(clock.now)
    assert [job.id for job in buffered(rt)] == [job_id]
    job = storage.jobs.get(job_id)
    assert job.state == "running" and job.started_at.timestamp() * 1000 == run_at


def test_a_retry_an_hour_later_is_claimed_again_when_the_clock_passes_the_hour(storage):
    def fails(ctx, payload):
        raise sqliteq.Retry(after=3600)

    rt, dispatcher, clock = rounds(storage, fails)
    job_id = storage.jobs.enqueue(EnqueueRequest("k")).job_id
    dispatcher.step(clock.now)
    (job,) = buffered(rt)
    # What a worker hands in:
    rt._finished.append(rt._execute(job, rt._handlers[job.kind], "default-0-test"))
    dispatcher.step(clock.now)
    assert storage.jobs.get(job_id).run_at.timestamp() * 1000 == clock.now + 3_600_000
    clock.now += 3_600_000 - 1
    dispatcher.step(clock.now)
    assert buffered(rt) == []
    clock.now += 1
    dispatcher.step(clock.now)
    (again,) = buffered(rt)
    assert (again.id, again.attempt) == (job_id, 2)


def test_a_round_commits_finishes_and_new_claims_in_one_transaction(storage):
    rt, dispatcher, clock = rounds(storage)
    first, second = (out.job_id for out in storage.jobs.enqueue_bulk(
        [EnqueueRequest("k", 1), EnqueueRequest("k", 2)]))
    dispatcher.step(clock.now)
    (job,) = buffered(rt)                   # one slot: one claim
    rt._finished.append(rt._execute(job, rt._handlers[job.kind], "default-0-test"))
    commits = storage.db._writes_committed
    dispatcher.step(clock.now)
    assert storage.db._writes_committed == commits + 1
    assert storage.jobs.get(first).state == "done"
    assert [job.id for job in buffered(rt)] == [second]


@pytest.mark.parametrize("why", ["shutdown", "paused"])
def test_a_claimed_job_no_worker_started_goes_back_to_its_place_in_the_queue(storage, why):
    # Claimed ahead, then the runtime stops (or its queue pauses) a minute later: the job
    # never ran, so it keeps its run_at and runs before the jobs enqueued after it.
    rt, dispatcher, clock = rounds(storage)
    first = storage.jobs.enqueue(EnqueueRequest("k", 1)).job_id
    run_at = storage.jobs.get(first).run_at
    dispatcher.step(clock.now)
    assert storage.jobs.get(first).state == "running"          # claimed: in the buffer
    storage.jobs.enqueue(EnqueueRequest("k", 2))
    clock.now += 60_000
    clock.ahead += 60
    if why == "shutdown":
        rt._stopping = True
    else:
        storage.queues.pause("default")
    dispatcher.step(clock.now)

    assert buffered(rt) == []
    job = storage.jobs.get(first)
    assert (job.state, job.run_at, job.attempt) == ("queued", run_at, 0)
    storage.queues.resume("default")
    rt, dispatcher, clock = rounds(storage)
    dispatcher.step(clock.now)
    assert [job.id for job in buffered(rt)] == [first]


# ------------------------------------------------------------- wake-up ----

def test_a_job_enqueued_in_process_wakes_an_idle_runtime_at_once(storage, make_runtime):
    # Polls and heartbeats 5 s apart: a start within 1 s proves the in-process wake-up.
    rt = make_runtime({"default": 1}, poll_interval=5.0, heartbeat_interval=5.0,
                      lease_timeout=10.0)
    started: list[float] = []

    @rt.handler("ping")
    def ping(ctx, payload):
        started.append(time.monotonic())

    with rt:
        time.sleep(0.2)             # let the dispatcher settle into its idle wait
        enqueued = time.monotonic()
        job_id = storage.jobs.enqueue(EnqueueRequest("ping")).job_id
        storage.jobs.wait(job_id, timeout=3)

    assert started[0] - enqueued < 1.0


def test_in_process_admin_writes_take_effect_while_the_dispatcher_commits_all_the_time(
        storage, make_runtime):
    # A backlog of quick jobs keeps the dispatcher committing, so the operator's writes in
    # this process share group commits with it (and a write that rides in the dispatcher's
    # own commit leaves its data_version unchanged). Heartbeats 30 s apart: retry and
    # run_now must still take effect within a few polls.
    rt = make_runtime({"busy": 2, "gated": 1}, heartbeat_interval=30.0, lease_timeout=60.0)
    failed_once: set[str] = set()

    @rt.handler("fails_once")
    def fails_once(ctx, payload):
        if ctx.job_id not in failed_once:
            failed_once.add(ctx.job_id)
            raise sqliteq.Dead("first run")
        return "ran"

    rt.register("quick", lambda ctx, payload: None)
    rt.enqueue_bulk([EnqueueRequest("quick", queue_name="busy") for _ in range(100_000)])
    gated = {"queue_name": "gated"}
    with rt:
        for _ in range(10):
            job_id = rt.enqueue(EnqueueRequest("fails_once", **gated)).job_id
            assert storage.jobs.wait(job_id, timeout=10).state == "failed"
            assert storage.jobs.retry(job_id)
            assert storage.jobs.wait(job_id, timeout=5).state == "done"

            later = rt.enqueue(EnqueueRequest("fails_once", run_at=time.time() + 3600,
                                              max_attempts=2, **gated)).job_id
            failed_once.add(later)
            assert storage.jobs.run_now(later)
            assert storage.jobs.wait(later, timeout=5).state == "done"
        assert storage.jobs.counts("busy")["queued"] > 0, "the backlog ran out too soon"


# ------------------------------------------------------------- shutdown ----

def test_stop_cancels_a_cooperative_handler_and_requeues_its_job_refunded(
        storage, make_runtime):
    rt = make_runtime({"default": 1})
    running = threading.Event()
    reasons: list[str | None] = []

    @rt.handler("long")
    def long(ctx, payload):
        running.set()
        while not ctx.cancel.wait(0.01):
            pass
        reasons.append(ctx.cancel.reason)
        raise sqliteq.Cancelled()

    rt.start()
    job_id = rt.enqueue(EnqueueRequest("long")).job_id
    assert running.wait(10)
    began = time.monotonic()
    rt.stop(timeout=5)

    assert time.monotonic() - began < 5
    assert reasons == ["shutdown"]
    job = storage.jobs.get(job_id)
    assert job.state == "queued"
    assert job.attempt == 0


def test_when_stop_returns_no_thread_of_the_runtime_is_left(storage, make_runtime):
    # Workers, dispatcher, heartbeat, scheduler and janitor: the storage may be closed now.
    # One handler ignores its token a little past the stop timeout: stop() gives up on its
    # job, but still waits (briefly) for its thread instead of leaving it running.
    rt = make_runtime({"default": 3, "other": 2})
    rt.register("quick", lambda ctx, payload: None)
    lingering = threading.Event()

    @rt.handler("linger")
    def linger(ctx, payload):
        lingering.set()
        time.sleep(0.5)                 # ignores the shutdown token
        return "late"

    with rt:
        outs = rt.enqueue_bulk([EnqueueRequest("quick") for _ in range(50)])
        for out in outs:
            storage.jobs.wait(out.job_id, timeout=10)
        names = [t.name for t in threading.enumerate() if rt.host_id in t.name]
        assert len(names) >= 3 + 5, names       # (a janitor sweep may have come and gone)
        late = rt.enqueue(EnqueueRequest("linger")).job_id
        assert lingering.wait(10)
        rt.stop(timeout=0.1)
    assert [t.name for t in threading.enumerate() if rt.host_id in t.name] == []
    job = storage.jobs.get(late)
    assert (job.state, job.attempt, job.result) == ("queued", 0, None)   # given up, refunded


def test_stop_gives_up_on_a_stuck_handler_and_its_late_finish_changes_nothing(
        storage, make_runtime):
    rt = make_runtime({"default": 1})
    running, release, returned = threading.Event(), threading.Event(), threading.Event()
    process_ids: list[str] = []

    @rt.handler("stuck")
    def stuck(ctx, payload):
        process_ids.append(ctx.process_id)
        running.set()
        try:
            release.wait(30)        # ignores its cancellation token
            return "too late"
        finally:
            returned.set()

    rt.start()
    try:
        job_id = rt.enqueue(EnqueueRequest("stuck")).job_id
        assert running.wait(10)
        began = time.monotonic()
        rt.stop(timeout=0.3)
        assert time.monotonic() - began < 5     # not the 30 s the handler would take
        job = storage.jobs.get(job_id)
        assert (job.state, job.attempt) == ("queued", 0)
    finally:
        release.set()

    assert returned.wait(10)
    wait_until(lambda: not any(t.name == process_ids[0] and t.is_alive()
                               for t in threading.enumerate()), 10, "the worker thread to end")
    job = storage.jobs.get(job_id)
    assert (job.state, job.attempt, job.result) == ("queued", 0, None)

    # The job is free for the next runtime.
    successor = make_runtime({"default": 1})
    successor.register("stuck", lambda ctx, payload: "done properly")
    with successor:
        job = storage.jobs.wait(job_id, timeout=10)
    assert (job.state, job.attempt, job.result) == ("done", 1, "done properly")


# ---------------------------------------------------------------- pause ----

def test_pausing_a_queue_stops_its_running_job_and_its_claims_until_resumed(
        storage, make_runtime):
    rt = make_runtime({"default": 1})
    first_run = threading.Event()
    reasons: list[str | None] = []
    runs: list[str] = []

    @rt.handler("coop")
    def coop(ctx, payload):
        runs.append("coop")
        if len(runs) > 1:
            return "resumed"
        first_run.set()
        while not ctx.cancel.wait(0.01):
            pass
        reasons.append(ctx.cancel.reason)
        raise sqliteq.Cancelled()

    @rt.handler("other")
    def other(ctx, payload):
        runs.append("other")
        return "ran"

    rt.register("warm_up", lambda ctx, payload: None)
    with rt:
        # A quick job first: a queue of fast handlers may claim ahead, so the second job
        # can sit claimed in memory when the pause comes; it must not start either.
        warm_up = rt.enqueue(EnqueueRequest("warm_up")).job_id
        storage.jobs.wait(warm_up, timeout=10)
        first = rt.enqueue(EnqueueRequest("coop")).job_id
        assert first_run.wait(10)
        second = rt.enqueue(EnqueueRequest("other")).job_id
        # Give the runtime a moment to claim it ahead (not asserted: prefetch is an
        # optimisation), so the pause finds it claimed but not started.
        claimed_ahead = time.monotonic() + 0.5
        while state_of(storage, second) == "queued" and time.monotonic() < claimed_ahead:
            time.sleep(0.005)
        storage.queues.pause("default")

        wait_until(lambda: reasons, 5, "the running handler's token to fire")
        assert reasons == ["paused"]
        wait_until(lambda: state_of(storage, first) == "queued", 5, "the job to be requeued")
        assert storage.jobs.get(first).attempt == 0

        # Negative check, bounded: nothing of the paused queue starts for several polls.
        quiet_until = time.monotonic() + max(0.3, 3 * rt.poll_interval)
        while time.monotonic() < quiet_until:
            assert state_of(storage, first) == "queued"
            assert state_of(storage, second) == "queued"
            time.sleep(0.01)
        assert runs == ["coop"]

        storage.queues.resume("default")
        first_job = storage.jobs.wait(first, timeout=10)
        second_job = storage.jobs.wait(second, timeout=10)

    assert (first_job.state, first_job.result, first_job.attempt) == ("done", "resumed", 1)
    assert (second_job.state, second_job.attempt) == ("done", 1)


# --------------------------------------------------------------- cancel ----

def test_a_cancellation_token_wakes_every_waiter_and_keeps_its_first_reason():
    token = sqliteq.CancellationToken()
    assert (token.cancelled, token.reason) == (False, None)
    assert token.wait(0.01) is False
    token.raise_if_cancelled()                  # not fired: does nothing
    results: list[bool] = []
    waiters = [threading.Thread(target=lambda: results.append(token.wait(30)))
               for _ in range(4)]
    for waiter in waiters:
        waiter.start()
    waiters[0].join(0.2)
    assert waiters[0].is_alive(), "a waiter returned before the token fired"
    token.cancel("paused")
    token.cancel("shutdown")
    for waiter in waiters:
        waiter.join(30)
    assert results == [True] * 4
    assert (token.cancelled, token.reason) == (True, "paused")
    assert token.wait(0) is True and token.wait() is True
    with pytest.raises(sqliteq.Cancelled, match="paused"):
        token.raise_if_cancelled()


def test_cancelling_a_running_job_reaches_its_handler_and_ends_it_cancelled(
        storage, make_runtime):
    rt = make_runtime({"default": 1})
    running = threading.Event()
    observed: list[tuple[str | None, float]] = []

    @rt.handler("coop")
    def coop(ctx, payload):
        running.set()
        while not ctx.cancel.wait(0.01):
            pass
        observed.append((ctx.cancel.reason, time.monotonic()))
        raise sqliteq.Cancelled()

    with rt:
        job_id = rt.enqueue(EnqueueRequest("coop")).job_id
        assert running.wait(10)
        requested = time.monotonic()
        assert storage.jobs.cancel(job_id) == "cancel_requested"
        wait_until(lambda: observed, 5, "the handler to see the cancellation")
        job = storage.jobs.wait(job_id, timeout=10)

    reason, seen_at = observed[0]
    assert reason == "cancelled"
    assert seen_at - requested < 5
    assert job.state == "cancelled"
    assert job.attempt == 1


def test_a_job_cancelled_while_queued_never_runs(storage, make_runtime):
    rt = make_runtime({"default": 1})
    ran: list[str] = []

    @rt.handler("k")
    def k(ctx, payload):
        ran.append(payload)

    doomed = rt.enqueue(EnqueueRequest("k", "doomed")).job_id
    assert storage.jobs.cancel(doomed) == "cancelled"
    with rt:
        later = rt.enqueue(EnqueueRequest("k", "later")).job_id
        storage.jobs.wait(later, timeout=10)

    assert ran == ["later"]
    job = storage.jobs.get(doomed)
    assert (job.state, job.attempt, job.started_at) == ("cancelled", 0, None)


# ------------------------------------------------- throttling and limits ----

def test_throttled_requeues_refunded_and_cools_the_whole_queue_down(storage, make_runtime):
    rt = make_runtime({"default": 1})
    starts: dict[str, list[float]] = {}
    throttled = threading.Event()

    @rt.handler("call")
    def call(ctx, payload):
        starts.setdefault(payload, []).append(time.time())
        if payload == "first" and len(starts[payload]) == 1:
            throttled.set()
            raise sqliteq.Throttled(0.5)
        return ctx.attempt

    with rt:
        first = rt.enqueue(EnqueueRequest("call", "first")).job_id
        assert throttled.wait(10)
        second = rt.enqueue(EnqueueRequest("call", "second")).job_id
        first_job = storage.jobs.wait(first, timeout=10)
        second_job = storage.jobs.wait(second, timeout=10)

    throttled_at = starts["first"][0]
    assert first_job.state == second_job.state == "done"
    assert first_job.attempt == 1, "a throttled attempt is refunded"
    assert first_job.result == 1
    assert starts["first"][1] - throttled_at >= 0.5 - 0.005
    assert starts["second"][0] - throttled_at >= 0.5 - 0.005


def test_a_throttled_queue_resumes_when_its_cool_down_ends(storage, make_runtime):
    # Heartbeats 10 s apart: only the runtime's own timer for the cool-down's end can start
    # the queue again in time.
    rt = make_runtime({"default": 1}, heartbeat_interval=10.0, lease_timeout=30.0)
    starts: dict[str, list[float]] = {}
    throttled = threading.Event()

    @rt.handler("call")
    def call(ctx, payload):
        starts.setdefault(payload, []).append(time.monotonic())
        if payload == "first" and len(starts[payload]) == 1:
            throttled.set()
            raise sqliteq.Throttled(0.3)

    with rt:
        rt.enqueue(EnqueueRequest("call", "first"))
        assert throttled.wait(10)
        rt.enqueue(EnqueueRequest("call", "second"))
        wait_until(lambda: "second" in starts and len(starts["first"]) == 2, 5,
                   "both jobs to start after the cool-down")
    throttled_at = starts["first"][0]
    assert 0.3 - 0.005 <= starts["second"][0] - throttled_at < 5
    assert 0.3 - 0.005 <= starts["first"][1] - throttled_at < 5


def test_a_queue_limit_caps_concurrency_across_slots(storage, make_runtime):
    storage.queues.set_limit("default", 1)
    rt = make_runtime({"default": 4})
    lock = threading.Lock()
    running = [0]
    peak = [0]

    @rt.handler("work")
    def work(ctx, payload):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.02)            # the work; long enough for overlaps to show
        with lock:
            running[0] -= 1

    ids = [rt.enqueue(EnqueueRequest("work", n)).job_id for n in range(10)]
    with rt:
        jobs = [storage.jobs.wait(job_id, timeout=20) for job_id in ids]

    assert all(job.state == "done" for job in jobs)
    assert peak[0] == 1


def test_without_a_limit_the_slots_run_jobs_concurrently(storage, make_runtime):
    # The control for the limit test above: 4 slots do overlap when nothing caps them.
    rt = make_runtime({"default": 4})
    inside = threading.Barrier(4, timeout=10)

    @rt.handler("work")
    def work(ctx, payload):
        inside.wait()               # breaks (and fails the job) unless 4 run at once

    ids = [rt.enqueue(EnqueueRequest("work", n, max_attempts=1)).job_id for n in range(4)]
    with rt:
        jobs = [storage.jobs.wait(job_id, timeout=20) for job_id in ids]

    assert [job.state for job in jobs] == ["done"] * 4


# --------------------------------------------------------- configuration ----

@pytest.mark.parametrize("queues, options", [
    ({}, {}),
    ({"default": 0}, {}),
    ({"default": 1, "other": 0}, {}),
    ({"default": 1}, {"heartbeat_interval": 1.0, "lease_timeout": 1.0}),
    ({"default": 1}, {"heartbeat_interval": 2.0, "lease_timeout": 1.0}),
], ids=["no-queues", "zero-slots", "one-queue-zero-slots", "lease-equals-heartbeat",
        "lease-below-heartbeat"])
def test_inconsistent_runtime_configuration_is_a_config_error(storage, queues, options):
    with pytest.raises(sqliteq.ConfigError):
        sqliteq.Runtime(storage, queues, **options)


def test_a_runtime_starts_only_once(storage, make_runtime):
    rt = make_runtime()
    with rt, pytest.raises(sqliteq.ConfigError):
        rt.start()


def test_stop_before_start_and_a_second_stop_do_nothing(storage, make_runtime):
    rt = make_runtime()
    rt.stop()
    rt.stop(timeout=0.1)
    assert storage.processes.list() == []
    rt.start()
    rt.stop(timeout=5)
    rt.stop(timeout=5)
    assert storage.processes.list() == []


def test_the_context_manager_registers_the_process_and_removes_it_on_exit(
        storage, make_runtime):
    rt = make_runtime({"default": 2, "other": 1})
    with rt as entered:
        assert entered is rt
        processes = {p.host_id: p for p in storage.processes.list()}
        assert rt.host_id in processes
        assert processes[rt.host_id].pid == os.getpid()
        assert processes[rt.host_id].queues == {"default": 2, "other": 1}
    assert rt.host_id not in {p.host_id for p in storage.processes.list()}


# ------------------------------------------------------------ idle cost ----

def test_an_idle_runtime_does_not_spin(storage):
    with sqliteq.Runtime(storage, {"default": 4, "other": 2}):
        time.sleep(0.2)             # past start-up
        cpu_before = time.process_time()
        time.sleep(1.0)             # the measurement window
        cpu_used = time.process_time() - cpu_before
    assert cpu_used < 0.2, f"idle runtime used {cpu_used:.3f} s of CPU in 1 s"


# -------------------------------------------------------------- signals ----

CHILD_RUNTIME = """
import sys
import sqliteq

storage = sqliteq.Storage(sys.argv[1], schema=sys.argv[2] or None)
rt = sqliteq.Runtime(storage, {"default": 1}, poll_interval=0.02, heartbeat_interval=0.1,
                     lease_timeout=5.0)

@rt.handler("long")
def long(ctx, payload):
    while not ctx.cancel.wait(0.01):
        pass
    raise sqliteq.Cancelled()

rt.run()
storage.close()
"""


def test_run_stops_gracefully_on_sigterm(storage, target):
    job_id = storage.jobs.enqueue(EnqueueRequest("long")).job_id
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    child = subprocess.Popen([sys.executable, "-c", CHILD_RUNTIME, target.url,
                              target.schema or ""], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: child.poll() is not None or state_of(storage, job_id) == "running",
                   15, "the child to start the job")
        assert child.poll() is None, f"child exited early: {child.communicate()}"
        child.send_signal(signal.SIGTERM)
        _, stderr = child.communicate(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()

    assert child.returncode == 0, stderr
    job = storage.jobs.get(job_id)
    assert (job.state, job.attempt) == ("queued", 0)
    assert storage.processes.list() == []


CHILD_STUBBORN_RUNTIME = """
import pathlib
import sys
import threading
import sqliteq

storage = sqliteq.Storage(sys.argv[1], schema=sys.argv[2] or None)
marker = pathlib.Path(sys.argv[3])
rt = sqliteq.Runtime(storage, {"default": 1}, poll_interval=0.02, heartbeat_interval=0.1,
                     lease_timeout=5.0, shutdown_timeout=60.0)

@rt.handler("stubborn")
def stubborn(ctx, payload):
    ctx.cancel.wait()
    marker.write_text(ctx.cancel.reason)    # saw the shutdown request...
    threading.Event().wait(120)             # ...and ignores it

rt.run()
"""


def test_a_second_signal_exits_at_once(storage, target, tmp_path):
    job_id = storage.jobs.enqueue(EnqueueRequest("stubborn")).job_id
    marker = tmp_path / "shutdown-seen"
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    child = subprocess.Popen([sys.executable, "-c", CHILD_STUBBORN_RUNTIME, target.url,
                              target.schema or "", str(marker)], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: child.poll() is not None or state_of(storage, job_id) == "running",
                   15, "the child to start the job")
        child.send_signal(signal.SIGTERM)
        # (write_text creates the file before it writes: wait for the text, not the file)
        wait_until(lambda: child.poll() is not None or (marker.exists() and marker.read_text()),
                   10, "the handler to see the shutdown")
        assert marker.read_text() == "shutdown"
        assert child.poll() is None, "a stop waiting for a handler must not exit by itself"
        child.send_signal(signal.SIGTERM)
        _, stderr = child.communicate(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()

    assert child.returncode == 128 + signal.SIGTERM, stderr


# ------------------------------------------- fixed bugs, kept as regression tests ----

def test_a_retried_job_starts_when_its_delay_ends_not_at_the_next_heartbeat(
        storage, make_runtime):
    # Heartbeats 10 s apart. Two retries in a row, so that one stray commit by another
    # connection (say, the janitor's at start-up) cannot rescue both.
    rt = make_runtime({"default": 1}, heartbeat_interval=10.0, lease_timeout=30.0)
    starts: list[float] = []

    @rt.handler("later")
    def later(ctx, payload):
        starts.append(time.monotonic())
        if ctx.attempt < 3:
            raise sqliteq.Retry(after=0.2)

    with rt:
        rt.enqueue(EnqueueRequest("later"))
        wait_until(lambda: len(starts) >= 3, 8, "the third attempt")
    for before, after in itertools.pairwise(starts):
        assert 0.2 - 0.005 <= after - before < 4


def test_prefetched_jobs_also_wait_out_a_cool_down(storage, make_runtime):
    rt = make_runtime({"default": 1})
    starts: dict[str, list[float]] = {}

    @rt.handler("call")
    def call(ctx, payload):
        starts.setdefault(payload, []).append(time.time())
        if payload == "throttler" and len(starts[payload]) == 1:
            raise sqliteq.Throttled(0.5)

    # Fast warm-up jobs first, so the queue prefetches the rest behind the throttler.
    ids = [rt.enqueue(EnqueueRequest("call", name, priority=priority)).job_id
           for name, priority in [("warm-up-1", -2), ("warm-up-2", -1), ("throttler", 0),
                                  ("after-1", 1), ("after-2", 1)]]
    with rt:
        for job_id in ids:
            storage.jobs.wait(job_id, timeout=10)

    throttled_at = starts["throttler"][0]
    for name in ("after-1", "after-2"):
        assert starts[name][0] - throttled_at >= 0.5 - 0.005, f"{name} ran during cool-down"


def test_stop_waits_for_a_slow_handler_without_spinning(storage, make_runtime):
    rt = make_runtime({"default": 1})
    running, release = threading.Event(), threading.Event()

    @rt.handler("slow")
    def slow(ctx, payload):
        running.set()
        release.wait(30)

    # Count the SQL statements the runtime's connections run: CPU time would be a poor
    # witness on a busy machine, where a spinning thread gets only a share of a core.
    statements = [0]

    def count(cursor: Any, sql: str, bindings: Any) -> bool:
        statements[0] += 1
        return True

    def trace(conn: apsw.Connection) -> None:
        conn.exec_trace = count

    apsw.connection_hooks.append(trace)
    try:
        rt.start()
        rt.enqueue(EnqueueRequest("slow"))
        assert running.wait(10)
        before = statements[0]
        rt.stop(timeout=1.0)
        during_stop = statements[0] - before
    finally:
        apsw.connection_hooks.remove(trace)
        release.set()
    # Polling every 20 ms and heartbeating every 100 ms costs well under 200 statements.
    assert during_stop < 500, f"{during_stop} statements while waiting 1 s for a handler"


def test_jobs_scheduled_while_the_slots_are_busy_start_at_their_run_at(
        storage, make_runtime):
    # Heartbeats 10 s apart. Two scheduled jobs, so that one stray commit by another
    # connection (say, the janitor's at start-up) cannot rescue both.
    rt = make_runtime({"default": 1}, heartbeat_interval=10.0, lease_timeout=30.0)
    starts: dict[str, float] = {}
    release = threading.Event()

    @rt.handler("k")
    def k(ctx, payload):
        starts[payload] = time.time()
        if payload == "blocker":
            release.wait(10)

    with rt:
        rt.enqueue(EnqueueRequest("k", "blocker"))
        wait_until(lambda: "blocker" in starts, 10, "the blocker to start")
        due = {"first": time.time() + 0.4, "second": time.time() + 0.8}
        for name, run_at in due.items():
            rt.enqueue(EnqueueRequest("k", name, run_at=run_at))
        release.set()               # the slot frees long before the scheduled jobs are due
        wait_until(lambda: "second" in starts, 8, "both scheduled jobs to start")
    for name, run_at in due.items():
        assert run_at - 0.001 <= starts[name] < run_at + 4


def test_a_limited_queue_claims_the_next_job_as_soon_as_one_finishes(storage, make_runtime):
    storage.queues.set_limit("default", 1)
    rt = make_runtime({"default": 4}, heartbeat_interval=10.0, lease_timeout=30.0)

    @rt.handler("quick")
    def quick(ctx, payload):
        return payload

    ids = [rt.enqueue(EnqueueRequest("quick", n)).job_id for n in range(5)]
    with rt:
        wait_until(lambda: storage.jobs.counts()["done"] == 5, 5, "5 quick jobs to finish")
    assert [storage.jobs.get(job_id).result for job_id in ids] == list(range(5))


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no text for this one")


def test_an_exception_that_cannot_be_printed_fails_the_job_and_spares_the_worker(
        storage, make_runtime):
    rt = make_runtime()                 # one slot: a dead worker would stall the next job
    rt.register("unprintable", lambda ctx, payload: (_ for _ in ()).throw(Unprintable()))
    rt.register("ok", lambda ctx, payload: "fine")
    bad = rt.enqueue(EnqueueRequest("unprintable", max_attempts=1)).job_id
    good = rt.enqueue(EnqueueRequest("ok")).job_id
    with rt:
        failed = storage.jobs.wait(bad, timeout=10)
        done = storage.jobs.wait(good, timeout=10)
    assert failed.state == "failed"
    assert failed.errors[-1]["error"].startswith("Unprintable: <Unprintable")
    assert (done.state, done.result) == ("done", "fine")


def test_a_cancel_requested_while_the_job_is_put_back_ends_it_cancelled(
        storage, make_runtime):
    runs = []

    def snooze_after_cancel(ctx: sqliteq.JobCtx, payload: Any) -> None:
        runs.append(ctx.attempt)
        assert ctx.storage.jobs.cancel(ctx.job_id) == "cancel_requested"
        raise sqliteq.Snooze(0.01)      # the attempt would be put back, but it was cancelled

    rt = make_runtime()
    rt.register("snoozer", snooze_after_cancel)
    job_id = rt.enqueue(EnqueueRequest("snoozer")).job_id
    with rt:
        job = storage.jobs.wait(job_id, timeout=10)
    assert job.state == "cancelled" and job.finished_at is not None
    assert runs == [1]


def test_a_host_id_is_never_equal_to_a_job_id_minted_in_the_same_millisecond(storage):
    """Host ids come from the job ids' minter. python-ulid's own generator, seeded alike,
    once handed out a host id equal to the next job id of the same millisecond."""
    for _ in range(20):
        before = [o.job_id for o in storage.jobs.enqueue_bulk(EnqueueRequest("k")
                                                              for _ in range(3))]
        rt = sqliteq.Runtime(storage, {"idle": 1}, **FAST)
        rt.start()
        try:
            after = storage.jobs.enqueue(EnqueueRequest("k")).job_id
            assert before[-1] < rt.host_id < after
        finally:
            rt.stop(timeout=5)
