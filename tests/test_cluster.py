"""Cross-process behaviour: pause, cancel, shutdown and wake-up reach a runtime in another
process, and many processes with mixed load never see "database is locked".

Workers are real child processes (`tests/workers.py`); the test process acts as the
operator through its own `Storage`. Waits poll the database with generous deadlines.
"""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from collections.abc import Iterator

import pytest
from support import Target
from workers import events, heartbeat_at, query, release

import sqliteq
from sqliteq import EnqueueRequest

HEARTBEAT = 0.2


@pytest.fixture
def storage(cluster_db: Target) -> Iterator[sqliteq.Storage]:
    with cluster_db.open() as storage:
        yield storage


def state_and_attempt(storage: sqliteq.Storage, job_id: str) -> tuple[str, int]:
    job = storage.jobs.get(job_id)
    assert job is not None
    return job.state.value, job.attempt


def test_pause_from_another_process_stops_and_requeues_running_job(cluster_db, cluster, storage):
    w = cluster.start("W", slots=2, poll=0.05, heartbeat=HEARTBEAT, lease=2.0)
    host = cluster.wait_registered(w)
    job_id = storage.jobs.enqueue(EnqueueRequest("coop")).job_id
    cluster.wait_for(lambda: events(cluster_db, job_id, "started"), 20, "W to start the job")

    storage.queues.pause("default")
    stopped = cluster.wait_for(lambda: events(cluster_db, job_id, "stopped"), 10,
                               "the handler's token to fire after the pause")
    assert [e["reason"] for e in stopped] == ["paused"]
    cluster.wait_for(lambda: state_and_attempt(storage, job_id) == ("queued", 0), 10,
                     "the paused job to return to queued, attempt refunded")
    job = storage.jobs.get(job_id)
    assert job.errors == []

    # While paused nothing starts in W, though it is alive, polling, and has work: watch
    # over a window of many heartbeats and polls, during which another job arrives.
    other_id = storage.jobs.enqueue(EnqueueRequest("coop")).job_id
    first_beat = heartbeat_at(cluster_db, host)
    window_end = time.monotonic() + 8 * HEARTBEAT
    while time.monotonic() < window_end:
        assert len(events(cluster_db, what="started")) == 1
        assert state_and_attempt(storage, job_id) == ("queued", 0)
        assert state_and_attempt(storage, other_id) == ("queued", 0)
        time.sleep(0.05)
    cluster.wait_for(lambda: heartbeat_at(cluster_db, host) > first_beat, 10,
                     "W to keep heartbeating")
    assert len(events(cluster_db, what="started")) == 1

    release(cluster_db, job_id)
    release(cluster_db, other_id)
    storage.queues.resume("default")
    for jid in (job_id, other_id):
        job = storage.jobs.wait(jid, timeout=20)
        assert job.state == "done" and job.result == "finished"
        assert job.attempt == 1
    runs = events(cluster_db, job_id, "started")
    assert [e["attempt"] for e in runs] == [1, 1]
    assert {e["pid"] for e in runs} == {w.pid}
    assert w.terminate() == 0, w.stderr()


def test_cancel_from_another_process_reaches_running_handler(cluster_db, cluster, storage):
    w = cluster.start("W", slots=1, poll=0.05, heartbeat=HEARTBEAT, lease=2.0)
    job_id = storage.jobs.enqueue(EnqueueRequest("coop")).job_id
    cluster.wait_for(lambda: events(cluster_db, job_id, "started"), 20, "W to start the job")

    asked_at = sqliteq.now_ms()
    assert storage.jobs.cancel(job_id) == "cancel_requested"
    stopped = cluster.wait_for(lambda: events(cluster_db, job_id, "stopped"), 10,
                               "the handler's token to fire after the cancel")
    assert [e["reason"] for e in stopped] == ["cancelled"]
    # Seen within one heartbeat; the margin covers process scheduling on a busy machine.
    latency_ms = stopped[0]["at"] - asked_at
    assert latency_ms <= HEARTBEAT * 1000 + 1500, latency_ms
    job = storage.jobs.wait(job_id, timeout=10)
    assert job.state == "cancelled"
    assert storage.jobs.cancel(job_id) == "finished"
    assert w.terminate() == 0, w.stderr()


def test_sigterm_with_running_job_exits_cleanly_and_refunds(cluster_db, cluster, storage):
    w = cluster.start("W", slots=1, poll=0.05, heartbeat=HEARTBEAT, lease=2.0)
    host = cluster.wait_registered(w)
    job_id = storage.jobs.enqueue(EnqueueRequest("coop")).job_id
    cluster.wait_for(lambda: events(cluster_db, job_id, "started"), 20, "W to start the job")
    assert state_and_attempt(storage, job_id) == ("running", 1)

    assert w.terminate(timeout=30) == 0, w.stderr()
    assert [e["reason"] for e in events(cluster_db, job_id, "stopped")] == ["shutdown"]
    assert state_and_attempt(storage, job_id) == ("queued", 0)
    job = storage.jobs.get(job_id)
    assert job.errors == [] and job.finished_at is None
    assert heartbeat_at(cluster_db, host) is None, "a cleanly stopped process removes its row"


def test_idle_worker_wakes_up_for_a_job_enqueued_by_another_process(cluster_db, cluster, storage):
    w = cluster.start("W", slots=1, poll=0.05, heartbeat=HEARTBEAT, lease=2.0)
    cluster.wait_registered(w)
    warm_up = storage.jobs.enqueue(EnqueueRequest("quick")).job_id
    assert storage.jobs.wait(warm_up, timeout=20).state == "done"
    for _ in range(3):
        time.sleep(0.5)                 # let W go idle: nothing queued, nothing running
        job_id = storage.jobs.enqueue(EnqueueRequest("quick")).job_id
        job = storage.jobs.wait(job_id, timeout=20)
        assert job.state == "done"
        delay = (job.started_at - job.created_at).total_seconds()
        assert delay < 1.0, f"an idle worker took {delay:.3f} s to start a job"
    assert w.terminate() == 0, w.stderr()


PROCESSES = 4
PER_PROCESS = 500


def test_many_processes_mixed_load_never_locked(cluster_db, cluster, storage):
    """4 processes x (runtime of 2 slots + a thread enqueuing 500 jobs one by one); half of
    the jobs enqueue a follow-up from their handler. Everything ends done at the first
    attempt, and no process logged an error or saw a busy/locked database."""
    workers = [cluster.start(f"W{i}", slots=2, poll=0.02, heartbeat=HEARTBEAT, lease=2.0,
                             produce=PER_PROCESS) for i in range(PROCESSES)]
    total = PROCESSES * PER_PROCESS * 3 // 2

    def all_done() -> bool:
        return storage.jobs.counts() == {"waiting": 0, "queued": 0, "running": 0, "done": total,
                                         "failed": 0, "cancelled": 0}

    try:
        cluster.wait_for(all_done, 60, f"{total} jobs to be done", interval=0.1)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; counts: {storage.jobs.counts()}") from None
    for w in workers:
        code = w.terminate()
        err = w.stderr()
        for symptom in ("locked", "TransientError", "BusyError", "Traceback", "ERROR"):
            assert symptom not in err, f"{w.name}: {err}"
        assert code == 0, f"{w.name} exited {code}: {err}"

    rows = query(cluster_db, "SELECT kind, attempt, errors, payload FROM jobs")
    assert Counter(kind for kind, *_ in rows) == {"fan": PROCESSES * PER_PROCESS,
                                                 "leaf": PROCESSES * PER_PROCESS // 2}
    assert all(attempt == 1 and errors is None for _, attempt, errors, _ in rows)
    producers = Counter(json.loads(payload)["pid"] for kind, _, _, payload in rows
                        if kind == "fan")
    assert producers == {w.pid: PER_PROCESS for w in workers}
    ran_on = Counter(json.loads(r)["pid"] for (r,) in query(cluster_db, "SELECT result FROM jobs"))
    assert len(ran_on) == PROCESSES, f"work was not shared by every process: {ran_on}"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_idle_runtime_cleanly(cluster_db, cluster, storage, signum):
    w = cluster.start("W", slots=1, poll=0.05, heartbeat=HEARTBEAT, lease=2.0)
    host = cluster.wait_registered(w)
    w.expected_dead = True
    w.signal(signum)
    assert w.proc.wait(30) == 0, w.stderr()
    assert heartbeat_at(cluster_db, host) is None
