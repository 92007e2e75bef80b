"""unique_key: at most one active (queued or running) job per key."""

from __future__ import annotations

import multiprocessing

import pytest
from support import Target

import sqliteq
from sqliteq import EnqueueOutcome, EnqueueRequest


def active_with_key(sql, key: str) -> list[str]:
    return [row[0] for row in sql("SELECT id FROM jobs WHERE unique_key = ? AND state IN"
                                  " ('waiting', 'queued', 'scheduled', 'running')", key)]


def test_second_enqueue_while_first_is_queued_returns_the_first(storage):
    first = storage.jobs.enqueue(EnqueueRequest("report", {"day": 1}, unique_key="daily"))
    second = storage.jobs.enqueue(EnqueueRequest("report", {"day": 2}, unique_key="daily"))
    assert second == EnqueueOutcome(first.job_id, False)
    assert storage.jobs.counts()["queued"] == 1
    assert storage.jobs.get(first.job_id).payload == {"day": 1}


def test_second_enqueue_while_first_is_running_returns_the_first(storage, set_state):
    first = storage.jobs.enqueue(EnqueueRequest("report", unique_key="daily"))
    set_state(first.job_id, "running")
    second = storage.jobs.enqueue(EnqueueRequest("report", unique_key="daily"))
    assert second == EnqueueOutcome(first.job_id, False)
    assert sum(storage.jobs.counts().values()) == 1


@pytest.mark.parametrize("finished", ["done", "failed", "cancelled"])
def test_key_is_free_again_once_the_job_finished(storage, set_state, finished):
    first = storage.jobs.enqueue(EnqueueRequest("report", unique_key="daily"))
    set_state(first.job_id, finished)
    second = storage.jobs.enqueue(EnqueueRequest("report", unique_key="daily"))
    assert second.created is True and second.job_id != first.job_id
    assert storage.jobs.get(second.job_id).state == "queued"


def test_cancelling_through_the_api_frees_the_key(storage):
    first = storage.jobs.enqueue(EnqueueRequest("report", unique_key="daily"))
    assert storage.jobs.cancel(first.job_id) == "cancelled"
    assert storage.jobs.enqueue(EnqueueRequest("report", unique_key="daily")).created is True


def test_different_keys_and_no_key_do_not_collide(storage):
    outs = [storage.jobs.enqueue(EnqueueRequest("k", unique_key=key))
            for key in ("a", "b", None, None)]
    assert all(o.created for o in outs)
    assert len({o.job_id for o in outs}) == 4


def test_duplicates_inside_one_bulk_return_the_first_id(storage):
    outs = storage.jobs.enqueue_bulk([
        EnqueueRequest("k", 0, unique_key="a"),
        EnqueueRequest("k", 1, unique_key="b"),
        EnqueueRequest("k", 2, unique_key="a"),
        EnqueueRequest("k", 3),
        EnqueueRequest("k", 4, unique_key="a"),
    ])
    assert [o.created for o in outs] == [True, True, False, True, False]
    assert outs[2].job_id == outs[4].job_id == outs[0].job_id
    assert storage.jobs.counts()["queued"] == 3


def test_bulk_duplicate_of_an_existing_active_job_returns_its_id(storage):
    existing = storage.jobs.enqueue(EnqueueRequest("k", unique_key="a"))
    outs = storage.jobs.enqueue_bulk([EnqueueRequest("k", unique_key="a"), EnqueueRequest("k")])
    assert outs[0] == EnqueueOutcome(existing.job_id, False)
    assert outs[1].created is True


def test_bulk_with_a_bad_request_after_a_unique_one_writes_nothing(storage):
    # An unknown parent is refused after both rows are inserted: the rollback must undo
    # the unique job's insert too.
    reqs = [EnqueueRequest("k", unique_key="a"), EnqueueRequest("k", depends_on=[sqliteq.new_id()])]
    with pytest.raises(sqliteq.InvalidInput, match="not a job"):
        storage.jobs.enqueue_bulk(reqs)
    assert storage.jobs.enqueue(EnqueueRequest("k", unique_key="a")).created is True


# ------------------------------------------------------------ cross-process ----

RACE_ROUNDS = 200


def race_unique_enqueue(target: Target, barrier, results) -> None:
    """Child process: enqueue the same unique key RACE_ROUNDS times, report the outcomes."""
    with target.open() as storage:
        barrier.wait(timeout=60)
        outs = [tuple(storage.jobs.enqueue(EnqueueRequest("race", n, unique_key="the-key")))
                for n in range(RACE_ROUNDS)]
    results.put(outs)


def test_processes_racing_on_one_key_create_exactly_one_job(storage, target, sql):
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=race_unique_enqueue, args=(target, barrier, results))
             for _ in range(2)]
    for proc in procs:
        proc.start()
    outcomes = [results.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
    assert [proc.exitcode for proc in procs] == [0, 0]

    [winner] = active_with_key(sql, "the-key")
    everything = [out for outs in outcomes for out in outs]
    assert {job_id for job_id, _ in everything} == {winner}
    assert [created for _, created in everything].count(True) == 1
    assert sum(storage.jobs.counts().values()) == 1
