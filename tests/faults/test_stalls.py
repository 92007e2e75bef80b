"""Stalls: when an outside writer holds SQLite's writer lock, every host's heartbeat waits
alike. A host is judged dead relative to the progress the others could make, so a stall
that blocks everyone rescues no one, however long it lasts; a host that is really silent
while the others beat is still rescued within its lease timeout.

Runtimes are real child processes (`tests/workers.py`); the writer lock is held by another
real process.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
from support import HOLD_WRITER_LOCK, Target, wait_until
from workers import Cluster, events, heartbeat_at, query, release

import sqliteq
from sqliteq import EnqueueRequest

# Long enough that a child descheduled on a loaded CI machine is not judged dead; the 3x stall
# outlasts the busy timeout (5 s), so the stalled writes go through their retries too.
LEASE = 2.0
HEARTBEAT = 0.25


def start_two_hosts_running_jobs(cluster_db: Target, cluster: Cluster
                                 ) -> tuple[dict[str, str], list[str]]:
    """Two runtimes in two processes, each running two long jobs that have one attempt
    only: any rescue fails a job. Returns host name -> host id, and the job ids."""
    children = {name: cluster.start(name, slots=2, heartbeat=HEARTBEAT, lease=LEASE)
                for name in ("A", "B")}
    hosts = {name: cluster.wait_registered(child) for name, child in children.items()}
    with cluster_db.open() as storage:
        jobs = [storage.jobs.enqueue(EnqueueRequest("coop", max_attempts=1)).job_id
                for _ in range(4)]
    cluster.wait_for(lambda: len(events(cluster_db, what="started")) == 4, 30, "four jobs started")
    started_on = {event["host"] for event in events(cluster_db, what="started")}
    assert started_on == set(hosts.values()), "each host runs two of the jobs"
    return hosts, jobs


def hold_the_writer_lock(cluster_db: Target, seconds: float, env: dict[str, str]) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLD_WRITER_LOCK, cluster_db.url,
                               str(seconds)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "locked"
        assert holder.wait(timeout=seconds + 30) == 0
    finally:
        holder.kill()
        holder.wait()


def rescues(cluster_db: Target) -> list[tuple[str, str]]:
    return query(cluster_db, "SELECT id, errors FROM jobs WHERE errors LIKE '%worker lost%'")


@pytest.mark.sqlite_only                # (PostgreSQL has no writer lock to stall)
@pytest.mark.parametrize("factor", [0.5, 1.0, 3.0])
def test_a_stall_that_blocks_every_host_rescues_no_job(cluster_db: Target, cluster: Cluster,
                                                       child_env: dict[str, str],
                                                       factor: float) -> None:
    hosts, jobs = start_two_hosts_running_jobs(cluster_db, cluster)
    hold_the_writer_lock(cluster_db, factor * LEASE, child_env)
    # After the stall both hosts beat again; give a reaper every chance to act: two lease
    # timeouts' worth of beats.
    beats = {host: heartbeat_at(cluster_db, host) for host in hosts.values()}
    cluster.wait_for(lambda: all(heartbeat_at(cluster_db, host) > beats[host] + 2 * LEASE * 1000
                                 for host in hosts.values()), 30,
        "both hosts to heartbeat for two lease timeouts after the stall")
    assert rescues(cluster_db) == []
    assert [e for e in events(cluster_db) if e["what"] == "stopped"] == []
    for job_id in jobs:
        release(cluster_db, job_id)
    with cluster_db.open() as storage:
        finished = [storage.jobs.wait(job_id, timeout=30) for job_id in jobs]
    assert [(job.state.value, job.attempt) for job in finished] == [("done", 1)] * 4


@pytest.mark.sqlite_only
def test_a_host_silent_while_the_others_beat_is_still_rescued(cluster_db: Target, cluster: Cluster,
                                                              child_env: dict[str, str]) -> None:
    hosts, jobs = start_two_hosts_running_jobs(cluster_db, cluster)
    hold_the_writer_lock(cluster_db, LEASE, child_env)
    frozen = cluster.children[1]                # B: its jobs must be rescued, A's must not
    cluster.freeze(frozen)
    try:
        cluster.wait_for(lambda: len(rescues(cluster_db)) == 2, 30, "B's two jobs rescued")
    finally:
        frozen.signal(signal.SIGCONT)
    rescued = {job_id for job_id, _ in rescues(cluster_db)}
    on_b = {e["job_id"] for e in events(cluster_db, what="started") if e["host"] == hosts["B"]}
    assert rescued == on_b
    with cluster_db.open() as storage:
        for job_id in rescued:          # one attempt only: the rescue failed them
            job = storage.jobs.get(job_id)
            assert job is not None and job.state.value == "failed"
        for job_id in set(jobs) - rescued:
            release(cluster_db, job_id)
            assert storage.jobs.wait(job_id, timeout=30).state.value == "done"


def test_a_host_left_from_long_ago_is_rescued_only_after_the_others_beat_for_its_lease(
        storage: sqliteq.Storage, sql: Callable[..., list[Any]]) -> None:
    """Nobody beat for an hour (the file sat idle after a crash, or the wall clock jumped):
    the first beat after that rescues no one; beats spanning the dead host's lease do."""
    hour_ago = sqliteq.now_ms() - 3_600_000
    sql("INSERT INTO processes (host_id, hostname, pid, queues, started_at, heartbeat_at,"
        " lease_timeout_ms, heartbeat_interval_ms, progress_at)"
        " VALUES ('gone', 'h', 1, '{}', ?1, ?1, 300, 100, ?1)", hour_ago)
    job_id = storage.jobs.enqueue(EnqueueRequest("k")).job_id
    sql("UPDATE jobs SET state = 'running', attempt = 1, host = 'gone', lease = 7 WHERE id = ?",
        job_id)
    assert storage.processes._heartbeat("reaper", {}, 1.0, 0.1) == 0
    assert sql("SELECT state FROM jobs WHERE id = ?", job_id) == [("running",)]
    wait_until(lambda: storage.processes._heartbeat("reaper", {}, 1.0, 0.1) == 1, timeout=30,
               what="the rescue, once the reaper has beaten for the dead host's lease")
    assert sql("SELECT state, attempt FROM jobs WHERE id = ?", job_id) == [("queued", 1)]
    assert [p.host_id for p in storage.processes.list()] == ["reaper"]


def insert_host(sql: Callable[..., list[Any]], host: str, beat: int, progress: int,
                lease_ms: int, interval_ms: int) -> None:
    sql("INSERT INTO processes (host_id, hostname, pid, queues, started_at, heartbeat_at,"
        " lease_timeout_ms, heartbeat_interval_ms, progress_at)"
        " VALUES (?1, 'h', 1, '{}', ?2, ?2, ?3, ?4, ?5)", host, beat, lease_ms, interval_ms,
        progress)


def running_on(storage: sqliteq.Storage, sql: Callable[..., list[Any]], host: str) -> str:
    job_id = storage.jobs.enqueue(EnqueueRequest("k")).job_id
    sql("UPDATE jobs SET state = 'running', attempt = 1, host = ?, lease = 7 WHERE id = ?",
        host, job_id)
    return job_id


def test_a_stall_rescues_no_host_whose_interval_is_shorter_than_the_first_beaters(
        storage: sqliteq.Storage, sql: Callable[..., list[Any]]) -> None:
    """A beats every 0.1 s (lease 0.5 s), B every 1 s (lease 30 s). After a 1.5 s stall B
    beats first: the clock may not jump past A's lease."""
    now = sqliteq.now_ms()
    insert_host(sql, "A", now - 1500, 10_000, 500, 100)
    insert_host(sql, "B", now - 2000, 9_500, 30_000, 1000)
    job_id = running_on(storage, sql, "A")
    assert storage.processes._heartbeat("B", {}, 30.0, 1.0) == 0
    assert sql("SELECT state FROM jobs WHERE id = ?", job_id) == [("running",)]


def test_a_host_stamped_in_the_future_does_not_stop_the_clock(
        storage: sqliteq.Storage, sql: Callable[..., list[Any]]) -> None:
    """The wall clock stepped back an hour after this host's last beat, and it crashed."""
    now = sqliteq.now_ms()
    insert_host(sql, "ahead", now + 3_600_000, now, 300, 100)
    job_id = running_on(storage, sql, "ahead")
    wait_until(lambda: storage.processes._heartbeat("reaper", {}, 1.0, 0.1) == 1, timeout=30,
               what="the rescue of the host stamped in the future")
    assert sql("SELECT state FROM jobs WHERE id = ?", job_id) == [("queued",)]
