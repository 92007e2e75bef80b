"""Reading and administering jobs and queues: get, list, counts, cancel, retry, purge, wait."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone

import pytest
from support import Target

import sqliteq
from sqliteq import EnqueueRequest, InvalidInput

STATES = {"waiting", "queued", "running", "done", "failed", "cancelled"}
DAY_MS = 86_400_000


def enqueue(storage: sqliteq.Storage, kind: str = "k", **fields) -> str:
    payload = fields.pop("payload", None)
    return storage.jobs.enqueue(EnqueueRequest(kind, payload, **fields)).job_id


# -------------------------------------------------------- get, list, counts ----

def test_get_unknown_id_is_none(storage):
    assert storage.jobs.get("01HZZZZZZZZZZZZZZZZZZZZZZZ") is None


def test_list_is_newest_first_and_limited(storage):
    ids = [enqueue(storage, payload=n) for n in range(5)]
    assert [j.id for j in storage.jobs.list()] == ids[::-1]
    assert [j.id for j in storage.jobs.list(limit=2)] == ids[:2:-1]
    assert storage.jobs.list(limit=0) == []


def test_list_filters_by_state_queue_and_kind(storage, set_state):
    a_x = enqueue(storage, "x", queue_name="a")
    a_y = enqueue(storage, "y", queue_name="a")
    b_x = enqueue(storage, "x", queue_name="b")
    b_y = enqueue(storage, "y", queue_name="b")
    set_state(a_y, "done")
    set_state(b_y, "done")

    def ids(**filters):
        return {j.id for j in storage.jobs.list(**filters)}

    assert ids(state="done") == {a_y, b_y}
    assert ids(queue="a") == {a_x, a_y}
    assert ids(kind="x") == {a_x, b_x}
    assert ids(state="queued", queue="b") == {b_x}
    assert ids(state="done", queue="a", kind="y") == {a_y}
    assert ids(state="running") == set()
    assert ids(queue="nope") == set()


@pytest.mark.parametrize("filters", [{"state": "bogus"}, {"limit": -1}, {"limit": "10"}])
def test_list_rejects_bad_filters(storage, filters):
    with pytest.raises(InvalidInput):
        storage.jobs.list(**filters)


def test_counts_has_every_state_even_when_empty(storage):
    assert storage.jobs.counts() == dict.fromkeys(STATES, 0)


def test_counts_by_state_overall_and_per_queue(storage, set_state):
    for _ in range(3):
        enqueue(storage, queue_name="a")
    set_state(enqueue(storage, queue_name="a"), "running")
    set_state(enqueue(storage, queue_name="b"), "failed")
    enqueue(storage, queue_name="b")
    assert storage.jobs.counts() == {**dict.fromkeys(STATES, 0),
                                     "queued": 4, "running": 1, "failed": 1}
    assert storage.jobs.counts("a") == {**dict.fromkeys(STATES, 0), "queued": 3, "running": 1}
    assert storage.jobs.counts("b") == {**dict.fromkeys(STATES, 0), "queued": 1, "failed": 1}
    assert storage.jobs.counts("none") == dict.fromkeys(STATES, 0)


# ----------------------------------------------------------------- cancel ----

def test_cancel_queued_job_cancels_it_now(storage):
    job_id = enqueue(storage)
    before = datetime.now(timezone.utc) - timedelta(seconds=1)
    assert storage.jobs.cancel(job_id) == "cancelled"
    job = storage.jobs.get(job_id)
    assert job.state == "cancelled"
    assert before <= job.finished_at <= datetime.now(timezone.utc) + timedelta(seconds=1)


def test_cancel_running_job_asks_it_to_stop(storage, set_state):
    job_id = enqueue(storage)
    set_state(job_id, "running")
    assert storage.jobs.cancel(job_id) == "cancel_requested"
    job = storage.jobs.get(job_id)
    assert (job.state, job.cancel_requested, job.finished_at) == ("running", True, None)


@pytest.mark.parametrize("finished", ["done", "failed", "cancelled"])
def test_cancel_finished_job_changes_nothing(storage, set_state, finished):
    job_id = enqueue(storage)
    set_state(job_id, finished)
    before = storage.jobs.get(job_id)
    assert storage.jobs.cancel(job_id) == "finished"
    assert storage.jobs.get(job_id) == before


def test_cancel_unknown_job_is_not_found(storage):
    assert storage.jobs.cancel("01HZZZZZZZZZZZZZZZZZZZZZZZ") == "not_found"


# ------------------------------------------------------------------ retry ----

@pytest.mark.parametrize("finished", ["failed", "cancelled"])
def test_retry_requeues_a_failed_or_cancelled_job_with_attempts_reset(storage, sql, set_state,
                                                                      finished):
    job_id = enqueue(storage, run_at=time.time() + 3600)
    sql("UPDATE jobs SET attempt = 5, cancel_requested = 1 WHERE id = ?", job_id)
    set_state(job_id, finished)
    before = storage.db.clock_ms()                      # the store's clock, as run_at is
    assert storage.jobs.retry(job_id) is True
    job = storage.jobs.get(job_id)
    assert (job.state, job.attempt, job.finished_at, job.cancel_requested) == (
        "queued", 0, None, False)
    assert job.run_at.timestamp() * 1000 >= before     # ready now, not at the old run_at
    assert job.run_at.timestamp() * 1000 <= storage.db.clock_ms()


@pytest.mark.parametrize("state", ["queued", "running", "done"])
def test_retry_of_a_job_that_is_not_failed_or_cancelled_is_false(storage, set_state, state):
    job_id = enqueue(storage)
    set_state(job_id, state)
    before = storage.jobs.get(job_id)
    assert storage.jobs.retry(job_id) is False
    assert storage.jobs.get(job_id) == before


def test_retry_of_unknown_job_is_false(storage):
    assert storage.jobs.retry("01HZZZZZZZZZZZZZZZZZZZZZZZ") is False


def test_retry_is_refused_while_another_job_holds_the_unique_key(storage, set_state):
    old = enqueue(storage, unique_key="daily")
    set_state(old, "failed")
    new = enqueue(storage, unique_key="daily")
    with pytest.raises(InvalidInput):
        storage.jobs.retry(old)
    assert storage.jobs.get(old).state == "failed"
    assert storage.jobs.get(new).state == "queued"


# ---------------------------------------------------- run_now and delete ----

def test_run_now_makes_a_scheduled_job_ready(storage):
    job_id = enqueue(storage, run_at=datetime.now(timezone.utc) + timedelta(days=1))
    assert storage.jobs.run_now(job_id) is True
    assert storage.jobs.get(job_id).run_at <= datetime.now(timezone.utc)


def test_run_now_of_a_ready_or_finished_job_is_false(storage, set_state):
    ready = enqueue(storage, run_at=time.time() - 60)
    assert storage.jobs.run_now(ready) is False
    later = enqueue(storage, run_at=time.time() + 3600)
    set_state(later, "done")
    assert storage.jobs.run_now(later) is False
    assert storage.jobs.get(later).run_at > datetime.now(timezone.utc)
    assert storage.jobs.run_now("01HZZZZZZZZZZZZZZZZZZZZZZZ") is False


def test_delete_removes_a_job(storage, set_state):
    queued, done = enqueue(storage), enqueue(storage)
    set_state(done, "done")
    assert storage.jobs.delete(queued) is True
    assert storage.jobs.delete(done) is True
    assert storage.jobs.get(queued) is None and storage.jobs.get(done) is None
    assert storage.jobs.delete(queued) is False


def test_delete_refuses_a_running_job(storage, set_state):
    job_id = enqueue(storage)
    set_state(job_id, "running")
    assert storage.jobs.delete(job_id) is False
    assert storage.jobs.get(job_id).state == "running"


# ------------------------------------------------------------------ purge ----

def test_purge_deletes_exactly_the_rows_finished_before_the_cutoff(storage, set_state):
    now = sqliteq.now_ms()
    done_10d, done_2d, done_1h = (enqueue(storage) for _ in range(3))
    failed_10d, queued = enqueue(storage), enqueue(storage)
    set_state(done_10d, "done", now - 10 * DAY_MS)
    set_state(done_2d, "done", now - 2 * DAY_MS)
    set_state(done_1h, "done", now - 3_600_000)
    set_state(failed_10d, "failed", now - 10 * DAY_MS)

    assert storage.jobs.purge("done", older_than=timedelta(days=7)) == 1
    assert storage.jobs.get(done_10d) is None
    assert {j.id for j in storage.jobs.list()} == {done_2d, done_1h, failed_10d, queued}

    assert storage.jobs.purge("done", older_than=86_400) == 1       # seconds work too
    assert storage.jobs.get(done_2d) is None
    assert storage.jobs.purge("failed", older_than=0) == 1
    assert {j.id for j in storage.jobs.list()} == {done_1h, queued}


def test_purge_deletes_more_rows_than_one_chunk(storage, sql):
    storage.jobs.enqueue_bulk([EnqueueRequest("k", n) for n in range(4_500)])
    sql("UPDATE jobs SET state = 'cancelled', finished_at = ?", sqliteq.now_ms() - DAY_MS)
    assert storage.jobs.purge("cancelled", older_than=3600) == 4_500
    assert sum(storage.jobs.counts().values()) == 0


def test_purge_deletes_the_old_jobs_of_every_queue(storage, set_state):
    now = sqliteq.now_ms()
    old = {queue: [enqueue(storage, queue_name=queue) for _ in range(2)]
           for queue in ("alpha", "beta", "gamma")}
    recent = enqueue(storage, queue_name="beta")
    failed = enqueue(storage, queue_name="gamma")
    for job_id in (*old["alpha"], *old["beta"], *old["gamma"]):
        set_state(job_id, "done", now - 2 * DAY_MS)
    set_state(recent, "done", now)
    set_state(failed, "failed", now - 2 * DAY_MS)

    assert storage.jobs.purge("done", older_than=timedelta(days=1)) == 6
    assert {j.id: j.state.value for j in storage.jobs.list()} == {recent: "done",
                                                                   failed: "failed"}


@pytest.mark.parametrize("state", ["queued", "running", "bogus", ""])
def test_purge_takes_only_finished_states(storage, set_state, state):
    job_id = enqueue(storage)
    set_state(job_id, "running" if state == "running" else "queued")
    with pytest.raises(InvalidInput):
        storage.jobs.purge(state, older_than=0)
    assert storage.jobs.get(job_id) is not None


def test_purge_rejects_a_negative_age(storage):
    with pytest.raises(InvalidInput):
        storage.jobs.purge("done", older_than=-1)


# ------------------------------------------------------------------- wait ----

# Another process: a write through sqliteq (on PostgreSQL, its NOTIFY wakes the waiter).
FINISH_LATER = """
import sys, time, sqliteq
time.sleep(0.3)
url, schema, job_id = sys.argv[1:]
with sqliteq.Storage(url, schema=schema or None) as storage:
    storage.db.write(lambda conn: conn.execute(
        "UPDATE jobs SET state = 'done', result = '{\\"ok\\":true}', finished_at = ?"
        " WHERE id = ?", (int(time.time() * 1000), job_id)))
"""


def finish_later(target: Target, job_id: str) -> threading.Thread:
    """Another thread, on its own raw connection, marks the job done a little later."""
    def finish() -> None:
        time.sleep(0.3)
        target.sql("UPDATE jobs SET state = 'done', finished_at = ? WHERE id = ?",
                   sqliteq.now_ms(), job_id)

    thread = threading.Thread(target=finish)
    thread.start()
    return thread


def test_wait_returns_the_job_once_another_thread_finishes_it(storage, target):
    job_id = enqueue(storage)
    thread = finish_later(target, job_id)
    job = storage.jobs.wait(job_id, timeout=30)
    thread.join()
    assert (job.id, job.state) == (job_id, "done")


def test_wait_returns_when_another_thread_cancels_through_the_same_storage(storage):
    job_id = enqueue(storage)
    timer = threading.Timer(0.3, storage.jobs.cancel, args=(job_id,))
    timer.start()
    job = storage.jobs.wait(job_id, timeout=30)
    timer.join()
    assert job.state == "cancelled"


def test_wait_returns_the_job_once_another_process_finishes_it(storage, target, run_python):
    job_id = enqueue(storage)
    waited: list = []
    waiter = threading.Thread(target=lambda: waited.append(storage.jobs.wait(job_id, 30)))
    waiter.start()
    proc = run_python(FINISH_LATER, target.url, target.schema or "", job_id)
    assert proc.returncode == 0, proc.stderr
    waiter.join(timeout=30)
    assert [(j.state, j.result) for j in waited] == [("done", {"ok": True})]


def test_wait_on_a_finished_job_returns_at_once(storage, set_state):
    job_id = enqueue(storage)
    set_state(job_id, "failed")
    assert storage.jobs.wait(job_id, timeout=0).state == "failed"


def test_wait_times_out_on_a_job_nobody_finishes(storage):
    job_id = enqueue(storage)
    with pytest.raises(TimeoutError):
        storage.jobs.wait(job_id, timeout=0.2)


def test_wait_on_unknown_job_is_invalid_input(storage):
    with pytest.raises(InvalidInput):
        storage.jobs.wait("01HZZZZZZZZZZZZZZZZZZZZZZZ", timeout=1)


def test_waiting_does_not_busy_spin(storage):
    job_id = enqueue(storage)
    measured: list = []

    def wait_one_second() -> None:
        cpu = time.thread_time()
        wall = time.monotonic()
        try:
            storage.jobs.wait(job_id, timeout=1.0)
        except TimeoutError:
            measured.append((time.thread_time() - cpu, time.monotonic() - wall))

    waiter = threading.Thread(target=wait_one_second)
    waiter.start()
    waiter.join(timeout=30)
    [(cpu_seconds, wall_seconds)] = measured
    assert wall_seconds >= 1.0
    assert cpu_seconds < 0.2


# ----------------------------------------------------------------- queues ----

def queue(storage: sqliteq.Storage, name: str) -> sqliteq.Queue:
    [found] = [q for q in storage.queues.list() if q.name == name]
    return found


def test_enqueue_creates_the_queue_with_defaults(storage):
    enqueue(storage, queue_name="email")
    assert queue(storage, "email") == sqliteq.Queue(
        "email", paused=False, limit=None, backoff_base=1.0, backoff_cap=3600.0,
        cooldown_until=None, retain_done=7 * 86400.0, retain_failed=30 * 86400.0)


def test_queues_are_listed_by_name(storage):
    for name in ("b", "c", "a"):
        enqueue(storage, queue_name=name)
    storage.queues.pause("0-settings-only")
    assert [q.name for q in storage.queues.list()] == ["0-settings-only", "a", "b", "c"]


def test_stats_count_each_queues_jobs_ended_in_the_last_five_minutes(storage, set_state):
    now = sqliteq.now_ms()
    ended = {"a": [("done", now), ("done", now - 60_000), ("failed", now),
                   ("cancelled", now), ("done", now - 10 * 60_000)],
             "b": [("failed", now - 60_000)], "c": []}
    for queue, jobs in ended.items():
        enqueue(storage, queue_name=queue)                  # one still queued in each
        for state, finished_at in jobs:
            set_state(enqueue(storage, queue_name=queue), state, finished_at)
    stats = {s.name: s for s in storage.queues.stats()}
    # Done and failed count; cancelled ones and those ended before the window do not.
    assert {name: s.jobs_per_minute for name, s in stats.items()} == {"a": 0.6, "b": 0.2,
                                                                       "c": 0.0}
    assert (stats["a"].ready, stats["a"].done, stats["a"].failed) == (1, 3, 1)


def test_pause_and_resume(storage):
    storage.queues.pause("email")
    assert queue(storage, "email").paused is True
    storage.queues.resume("email")
    assert queue(storage, "email").paused is False


def test_set_limit(storage):
    storage.queues.set_limit("email", 2)
    assert queue(storage, "email").limit == 2
    storage.queues.set_limit("email", None)
    assert queue(storage, "email").limit is None


def test_set_backoff(storage):
    storage.queues.set_backoff("email", base=2, cap=60)
    assert (queue(storage, "email").backoff_base, queue(storage, "email").backoff_cap) == (
        2.0, 60.0)
    storage.queues.set_backoff("email", base=timedelta(milliseconds=500),
                               cap=timedelta(minutes=5))
    assert (queue(storage, "email").backoff_base, queue(storage, "email").backoff_cap) == (
        0.5, 300.0)


def test_queue_settings_are_seen_by_another_storage_on_the_file(storage, target):
    storage.queues.pause("email")
    storage.queues.set_limit("email", 3)
    with target.open() as other:
        assert (queue(other, "email").paused, queue(other, "email").limit) == (True, 3)


def test_settings_of_one_queue_leave_others_alone(storage):
    enqueue(storage, queue_name="other")
    storage.queues.pause("email")
    storage.queues.set_limit("email", 1)
    assert (queue(storage, "other").paused, queue(storage, "other").limit) == (False, None)


@pytest.mark.parametrize("limit", [0, -1, True, 1.5, "2"])
def test_set_limit_rejects_bad_limits(storage, limit):
    with pytest.raises(InvalidInput):
        storage.queues.set_limit("email", limit)
    assert storage.queues.list() == []


@pytest.mark.parametrize("base, cap", [(10, 5), (-1, 5), (1, -1)])
def test_set_backoff_rejects_bad_values(storage, base, cap):
    with pytest.raises(InvalidInput):
        storage.queues.set_backoff("email", base=base, cap=cap)
    assert storage.queues.list() == []


@pytest.mark.parametrize("name", ["", " email", None])
def test_queue_settings_reject_bad_names(storage, name):
    with pytest.raises(InvalidInput):
        storage.queues.pause(name)
    assert storage.queues.list() == []
