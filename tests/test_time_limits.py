"""Time limits: a handler's `timeout`, a job's own, the token that fires with reason "timeout",
and the grace after which a hung handler's attempt is given up and its slot served again.

Real threads on both stores; the tests wait on conditions, never on a sleep.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import pytest
from support import ok, wait_until

import sqliteq
from sqliteq import EnqueueRequest


def test_a_handler_that_heeds_its_token_fails_the_attempt_with_a_timeout_and_is_retried(
        storage, make_runtime):
    storage.queues.set_backoff("default", 0.01, 0.05)
    rt = make_runtime()
    reasons: list[str | None] = []

    @rt.task(timeout=0.2)
    def crunch(ctx: sqliteq.JobCtx, payload: None) -> str:
        if ctx.attempt == 1:
            assert ctx.cancel.wait(30), "the token never fired"
            reasons.append(ctx.cancel.reason)
            ctx.cancel.raise_if_cancelled()
        return "finished in time"

    with rt:
        job = storage.jobs.wait(crunch.enqueue().job_id, timeout=30)
    assert (job.state, job.attempt, job.result) == (sqliteq.JobState.DONE, 2, "finished in time")
    assert reasons == ["timeout"]
    [error] = job.errors
    assert error["error"] == ("TimeLimitExceeded: the handler ran past its 0.2 s time limit")
    assert "raise_if_cancelled" in error["traceback"]       # where the handler was


def test_a_hung_handler_is_given_up_after_the_grace_and_its_slot_serves_the_queue(
        storage, make_runtime, caplog):
    rt = make_runtime({"default": 1}, timeout_grace=0.2)
    release = threading.Event()
    returned = threading.Event()

    @rt.task(timeout=0.2, max_attempts=1)
    def hang(ctx: sqliteq.JobCtx, payload: None) -> str:
        release.wait(60)                # ignores its token
        returned.set()
        return "too late"

    @rt.task
    def quick(ctx: sqliteq.JobCtx, payload: None) -> str:
        return "ran"

    caplog.set_level(logging.WARNING, logger="sqliteq")
    with rt:
        hung = hang.enqueue().job_id
        after = quick.enqueue().job_id
        try:
            # The one slot is taken by the hung handler, yet the queue goes on.
            assert storage.jobs.wait(after, timeout=30).result == "ran"
            job = storage.jobs.wait(hung, timeout=30)
            assert not returned.is_set()
            assert job.state is sqliteq.JobState.FAILED
            [error] = job.errors
            assert error["error"].startswith("TimeLimitExceeded: the handler ran past its 0.2 s "
                                             "time limit and 0.2 s of grace")
            assert "release.wait(60)" in error["traceback"]     # the stack where it hung
        finally:
            release.set()
        wait_until(lambda: "what it returned is dropped" in caplog.text, 30,
                   "the old thread to return")
        assert storage.jobs.get(hung).state is sqliteq.JobState.FAILED
        assert storage.jobs.get(hung).result is None
        # The slot is one worker thread again: the old one has ended.
        wait_until(lambda: [thread.name for thread in threading.enumerate()].count(
            f"default-0-{rt.host_id}") == 1, 30, "the old worker thread to end")
        assert storage.jobs.wait(quick.enqueue().job_id, timeout=30).result == "ran"


def test_a_job_timeout_overrides_its_handler_timeout(storage, make_runtime):
    rt = make_runtime({"default": 2})
    seen: dict[str, Any] = {}

    @rt.handler("wait", timeout=30)
    def wait(ctx: sqliteq.JobCtx, payload: str) -> str:
        seen[payload] = ctx.cancel.wait(0.5 if payload == "lenient" else 30)
        ctx.cancel.raise_if_cancelled()
        return payload

    with rt:
        strict = rt.enqueue(EnqueueRequest("wait", "strict", timeout=0.2, max_attempts=1))
        rt.register("wait_short", wait, timeout=0.2)
        lenient = rt.enqueue(EnqueueRequest("wait_short", "lenient", timeout=30))
        strict_job = storage.jobs.wait(strict.job_id, timeout=30)
        lenient_job = storage.jobs.wait(lenient.job_id, timeout=30)
    assert strict_job.state is sqliteq.JobState.FAILED
    assert strict_job.timeout == 0.2
    assert strict_job.errors[0]["error"].startswith("TimeLimitExceeded")
    assert (lenient_job.state, lenient_job.result, lenient_job.timeout) == (
        sqliteq.JobState.DONE, "lenient", 30.0)
    assert seen == {"strict": True, "lenient": False}


def test_a_task_timeout_given_at_enqueue_is_the_jobs_own(storage, make_runtime):
    rt = make_runtime({"default": 2})

    @rt.task(timeout=60)
    def slow(ctx: sqliteq.JobCtx, payload: None) -> None:
        ctx.cancel.wait(30)
        ctx.cancel.raise_if_cancelled()

    default, own = slow.enqueue(), slow.enqueue(timeout=0.1, max_attempts=1)
    assert storage.jobs.get(default.job_id).timeout is None    # its handler's applies
    assert storage.jobs.get(own.job_id).timeout == 0.1
    with rt:
        assert storage.jobs.wait(own.job_id, timeout=30).state is sqliteq.JobState.FAILED
        assert storage.jobs.get(default.job_id).state is sqliteq.JobState.RUNNING


@pytest.mark.parametrize("bad", [0, -1, float("nan"), "10", True, 10**9])
def test_bad_time_limits_are_refused_and_nothing_is_written(storage, make_runtime, bad):
    with pytest.raises(sqliteq.InvalidInput, match="timeout"):
        EnqueueRequest("kind", timeout=bad)
    rt = make_runtime()
    with pytest.raises(sqliteq.InvalidInput, match="timeout"):
        rt.register("kind", lambda ctx, payload: None, timeout=bad)
    with pytest.raises(sqliteq.InvalidInput, match="timeout"):
        rt.task(timeout=bad)(lambda ctx, payload: None)
    assert storage.jobs.counts()["queued"] == 0


def test_the_cli_enqueues_with_a_timeout_and_shows_it(target):
    job_id = ok("enqueue", "resize", "{}", "--timeout", "90s", db=target).strip()
    with target.open() as storage:
        assert storage.jobs.get(job_id).timeout == 90.0
    assert "timeout:          90.0" in ok("job", job_id, db=target)
