"""Async handlers and asyncio callers: `async def` handlers on the runtime's event loop, beside
sync ones, with the same outcomes, retries, cancellation, time limits and shutdown; awaitable
enqueue and wait for coroutines.

Real threads and a real event loop on both stores; the tests wait on conditions.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from support import wait_until

import sqliteq
from sqliteq import EnqueueRequest


def test_async_handlers_run_at_once_up_to_their_queue_slots_beside_sync_handlers(
        storage, make_runtime):
    rt = make_runtime({"io": 3, "cpu": 1})
    running, most = [0], [0]
    gate = threading.Event()
    loops: set[int] = set()

    @rt.task(queue="io")
    async def fetch(ctx: sqliteq.JobCtx, n: int) -> int:
        loops.add(id(asyncio.get_running_loop()))
        running[0] += 1                 # one event loop: no lock needed
        most[0] = max(most[0], running[0])
        while not gate.is_set():
            await asyncio.sleep(0.005)
        running[0] -= 1
        return n * 2

    @rt.task(queue="cpu")
    def add(ctx: sqliteq.JobCtx, pair: list[int]) -> int:
        return pair[0] + pair[1]

    with rt:
        fetched = fetch.enqueue_bulk(range(6))
        # Three run at once (the queue's slots), and the sync queue is not held up.
        wait_until(lambda: running[0] == 3, 30, "three fetches running at once")
        assert storage.jobs.wait(add.enqueue([2, 3]).job_id, timeout=30).result == 5
        gate.set()
        results = [storage.jobs.wait(out.job_id, timeout=30).result for out in fetched]
    assert results == [0, 2, 4, 6, 8, 10]
    assert most[0] == 3
    assert len(loops) == 1


def test_an_async_handler_is_retried_and_steered_by_outcomes_like_a_sync_one(
        storage, make_runtime):
    storage.queues.set_backoff("default", 0.01, 0.05)
    rt = make_runtime()

    @rt.handler("flaky")
    async def flaky(ctx: sqliteq.JobCtx, payload: None) -> str:
        await asyncio.sleep(0)
        if ctx.attempt == 1:
            raise ValueError("first attempt fails")
        return f"attempt {ctx.attempt}"

    @rt.handler("dead")
    async def dead(ctx: sqliteq.JobCtx, payload: None) -> None:
        raise sqliteq.Dead("no point retrying")

    snoozed: list[int] = []

    @rt.handler("snooze")
    async def snooze(ctx: sqliteq.JobCtx, payload: None) -> str:
        if not snoozed:
            snoozed.append(ctx.attempt)
            raise sqliteq.Snooze(0.01)
        return "woke"

    with rt:
        jobs = {kind: storage.jobs.wait(rt.enqueue(EnqueueRequest(kind)).job_id, timeout=30)
                for kind in ("flaky", "dead", "snooze")}
    assert (jobs["flaky"].state, jobs["flaky"].result) == (sqliteq.JobState.DONE, "attempt 2")
    assert jobs["flaky"].errors[0]["error"] == "ValueError: first attempt fails"
    assert "first attempt fails" in jobs["flaky"].errors[0]["traceback"]
    assert (jobs["dead"].state, jobs["dead"].attempt) == (sqliteq.JobState.FAILED, 1)
    assert (jobs["snooze"].result, jobs["snooze"].attempt) == ("woke", 1)   # refunded
    assert snoozed == [1]


def test_cancelling_a_running_async_job_cancels_its_task(storage, make_runtime):
    rt = make_runtime()
    started, cleaned_up = threading.Event(), threading.Event()

    @rt.task
    async def wait_forever(ctx: sqliteq.JobCtx, payload: None) -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cleaned_up.set()
            raise

    with rt:
        job_id = wait_forever.enqueue().job_id
        assert started.wait(30)
        assert storage.jobs.cancel(job_id) == "cancel_requested"
        job = storage.jobs.wait(job_id, timeout=30)
    assert job.state is sqliteq.JobState.CANCELLED
    assert cleaned_up.is_set()


def test_an_async_handler_past_its_time_limit_is_cancelled_and_retried(storage, make_runtime):
    storage.queues.set_backoff("default", 0.01, 0.05)
    rt = make_runtime()

    @rt.task(timeout=0.2)
    async def slow(ctx: sqliteq.JobCtx, payload: None) -> str:
        if ctx.attempt == 1:
            await asyncio.sleep(3600)
        return "second time lucky"

    with rt:
        job = storage.jobs.wait(slow.enqueue().job_id, timeout=30)
    assert (job.state, job.attempt, job.result) == (sqliteq.JobState.DONE, 2, "second time lucky")
    assert job.errors[0]["error"] == "TimeLimitExceeded: the handler ran past its 0.2 s time limit"


def test_stop_cancels_running_async_handlers_and_requeues_their_jobs_refunded(
        storage, make_runtime):
    rt = make_runtime({"default": 2})
    started = threading.Semaphore(0)

    @rt.task
    async def long(ctx: sqliteq.JobCtx, payload: None) -> None:
        started.release()
        await asyncio.sleep(3600)

    rt.start()
    ids = [out.job_id for out in long.enqueue_bulk([None, None])]
    assert started.acquire(timeout=30) and started.acquire(timeout=30)
    rt.stop(timeout=10)
    for job_id in ids:
        job = storage.jobs.get(job_id)
        assert (job.state, job.attempt) == (sqliteq.JobState.QUEUED, 0)
    assert not [t for t in threading.enumerate() if t.name == "sqliteq-asyncio"]


def test_coroutines_enqueue_and_await_jobs_without_blocking_their_loop(storage, make_runtime):
    rt = make_runtime({"default": 2})

    @rt.task
    async def parent(ctx: sqliteq.JobCtx, n: int) -> str:
        child = await ctx.aenqueue(EnqueueRequest("child", n + 1))
        return child.job_id

    @rt.task(kind="child")
    def child(ctx: sqliteq.JobCtx, n: int) -> int:
        return n * 10

    async def main() -> dict[str, Any]:
        ticks = 0

        async def ticker() -> None:         # runs while the others wait: the loop is free
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.001)

        beat = asyncio.create_task(ticker())
        one = await storage.jobs.aenqueue(EnqueueRequest("parent", 1))
        more = await parent.aenqueue_bulk([2, 3])
        also = await parent.aenqueue(4, priority=-1)
        parents = await asyncio.gather(*(storage.jobs.await_job(out.job_id, timeout=30)
                                         for out in (one, *more, also)))
        children = [await storage.jobs.await_job(job.result, timeout=30) for job in parents]
        with pytest.raises(TimeoutError):
            await storage.jobs.await_job(
                (await storage.jobs.aenqueue(EnqueueRequest("nobody", queue_name="idle")))
                .job_id, timeout=0.1)
        beat.cancel()
        return {"children": [job.result for job in children], "ticks": ticks}

    with rt:
        outcome = asyncio.run(main())
    assert outcome["children"] == [20, 30, 40, 50]
    assert outcome["ticks"] > 1


def test_stop_returns_even_when_an_async_handler_blocks_the_event_loop(storage, make_runtime):
    rt = make_runtime()
    started, release = threading.Event(), threading.Event()

    @rt.task
    async def blocks(ctx: sqliteq.JobCtx, payload: None) -> None:
        started.set()
        release.wait(60)                # a sync call inside async def: the loop is stuck

    rt.start()
    job_id = blocks.enqueue().job_id
    assert started.wait(30)
    stopper = threading.Thread(target=rt.stop, kwargs={"timeout": 0.5})
    stopper.start()
    stopper.join(30)
    stopped = not stopper.is_alive()
    release.set()
    assert stopped, "stop() hung on the blocked event loop"
    job = storage.jobs.get(job_id)
    assert (job.state, job.attempt) == (sqliteq.JobState.QUEUED, 0)    # refunded
