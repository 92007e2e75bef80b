"""Metrics history: per-minute rollups of what the runtimes did, per queue and kind, merged
over processes, read back with `storage.metrics.series`."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from support import ManualClock, minute_of, raw, recorded, rounds, run_buffered, wait_until

import sqliteq
from sqliteq import EnqueueRequest, MetricsPoint, MetricsTotal, Timings

MINUTE = 60_000


def series_at(storage: sqliteq.Storage, clock: ManualClock, **filters: Any
              ) -> list[MetricsPoint]:
    """The series of the hour around the injected clock's now."""
    return storage.metrics.series(since=clock.now / 1000 - 1800,
                                  until=clock.now / 1000 + 1800, **filters)


def drain_rounds(rt: sqliteq.Runtime, dispatcher: Any, clock: ManualClock) -> None:
    """Rounds until no job is handed out (each job run by the test, as a worker would)."""
    dispatcher.step(clock.now)
    while run_buffered(rt):
        dispatcher.step(clock.now)
    dispatcher.step(clock.now)          # commits the last end


# -------------------------------------------------------- what is recorded ----

def test_each_way_an_attempt_ends_is_counted_in_the_minute_it_ended(storage):
    def handler(ctx, payload):
        if payload == "fail":
            raise sqliteq.Dead("no")
        if payload == "retry":
            raise RuntimeError("again")
        if payload == "cancel":
            raise sqliteq.Cancelled("stop")
        if payload == "snooze":
            raise sqliteq.Snooze(3600)
        return payload

    rt, dispatcher, clock = rounds(storage, handler)
    storage.jobs.enqueue_bulk([EnqueueRequest("k", p) for p in
                               ("ok", "ok", "fail", "retry", "cancel", "snooze")])
    drain_rounds(rt, dispatcher, clock)
    assert series_at(storage, clock) == []      # not yet: it rides in a commit once a second
    clock.ahead += sqliteq.METRICS_FLUSH_INTERVAL
    dispatcher.step(clock.now)
    (point,) = series_at(storage, clock)
    assert point.start == datetime.fromtimestamp(minute_of(clock.now) / 1000, timezone.utc)
    assert (point.done, point.failed, point.retried, point.cancelled) == (2, 1, 1, 1)
    assert point.run.jobs == point.wait.jobs == 5   # the snooze ran, but it is no end
    assert 0 <= point.run.p50 <= point.run.p99 <= point.run.max < 5
    (total,) = storage.metrics.totals()
    assert total == MetricsTotal("default", "k", 2, 1, 1, 1, 5, pytest.approx(point.run.total),
                                 5, pytest.approx(point.wait.total))


def test_wait_time_is_from_a_jobs_run_at_to_its_claim(storage):
    rt, dispatcher, clock = rounds(storage)
    clock.now = minute_of(clock.now) + 30_000   # mid-minute: the claims share one
    for seconds in (2, 4, 8):
        storage.jobs.enqueue(EnqueueRequest("k", run_at=(clock.now - seconds * 1000) / 1000))
    drain_rounds(rt, dispatcher, clock)
    clock.ahead += sqliteq.METRICS_FLUSH_INTERVAL
    dispatcher.step(clock.now)
    (point,) = series_at(storage, clock)
    assert point.wait.jobs == 3 and point.wait.total == pytest.approx(14)
    assert point.wait.max == pytest.approx(8)
    assert point.wait.p50 == pytest.approx(4, rel=0.045)


def test_rollups_ride_in_the_round_that_commits_anyway(storage):
    rt, dispatcher, clock = rounds(storage)
    storage.jobs.enqueue_bulk([EnqueueRequest("k", n) for n in range(2)])
    dispatcher.step(clock.now)                  # claims the first
    run_buffered(rt)
    commits = storage.db._writes_committed
    dispatcher.step(clock.now)                  # ends it, claims the second
    assert storage.db._writes_committed == commits + 1 and series_at(storage, clock) == []
    run_buffered(rt)
    clock.ahead += sqliteq.METRICS_FLUSH_INTERVAL
    dispatcher.step(clock.now)                  # ends the second, and flushes both
    assert storage.db._writes_committed == commits + 2
    (point,) = series_at(storage, clock)
    assert (point.done, point.wait.jobs) == (2, 2)


def test_an_idle_runtime_flushes_once_then_writes_nothing(storage):
    rt, dispatcher, clock = rounds(storage)
    storage.jobs.enqueue(EnqueueRequest("k"))
    drain_rounds(rt, dispatcher, clock)
    commits = storage.db._writes_committed
    dispatcher.step(clock.now)
    assert storage.db._writes_committed == commits      # not due yet
    assert not dispatcher._busy() and dispatcher._idle_timeout() <= 1.0
    clock.ahead += sqliteq.METRICS_FLUSH_INTERVAL
    assert dispatcher._busy()                           # the sleep ends for the flush
    dispatcher.step(clock.now)
    assert storage.db._writes_committed == commits + 1
    for _ in range(3):
        clock.ahead += 10
        dispatcher.step(clock.now)
    assert storage.db._writes_committed == commits + 1
    assert series_at(storage, clock)[0].done == 1


def test_a_runtime_with_metrics_off_records_nothing(storage):
    rt, dispatcher, clock = rounds(storage, metrics=False)
    storage.jobs.enqueue_bulk([EnqueueRequest("k", n) for n in range(3)])
    drain_rounds(rt, dispatcher, clock)
    clock.ahead += sqliteq.METRICS_FLUSH_INTERVAL
    dispatcher.step(clock.now)
    assert storage.jobs.counts()["done"] == 3
    assert series_at(storage, clock) == []


def test_a_failed_commit_loses_no_rollup_and_counts_none_twice(storage):
    rt, dispatcher, clock = rounds(storage)
    storage.jobs.enqueue_bulk([EnqueueRequest("k", n) for n in range(2)])
    dispatcher.step(clock.now)
    run_buffered(rt)
    dispatcher.step(clock.now)                  # the first ended; the second claimed
    run_buffered(rt)
    clock.ahead += sqliteq.METRICS_FLUSH_INTERVAL
    real_add = storage.metrics._add

    def add_then_fail(conn, rollups):
        real_add(conn, rollups)
        raise sqliteq.TransientError("the commit failed")

    storage.metrics._add = add_then_fail        # (rolled back with the whole round)
    with pytest.raises(sqliteq.TransientError):
        dispatcher.step(clock.now)
    assert series_at(storage, clock) == []
    storage.metrics._add = real_add
    dispatcher.step(clock.now)                  # commits the held end, and the flush
    (point,) = series_at(storage, clock)
    assert (point.done, point.wait.jobs, point.run.jobs) == (2, 2, 2)


def test_the_round_that_commits_the_last_ends_of_a_stop_flushes_them(storage):
    rt, dispatcher, clock = rounds(storage)
    storage.jobs.enqueue(EnqueueRequest("k"))
    dispatcher.step(clock.now)
    run_buffered(rt)
    rt._stopping = True
    assert dispatcher.step(clock.now)           # the runtime may stop after this round
    assert [p.done for p in series_at(storage, clock)] == [1]


def test_a_graceful_stop_flushes_what_the_runtime_recorded(storage, make_runtime):
    rt = make_runtime({"default": 2})
    rt.register("k", lambda ctx, payload: payload)
    storage.jobs.enqueue_bulk([EnqueueRequest("k", n) for n in range(20)])
    rt.start()
    wait_until(lambda: storage.jobs.counts()["done"] == 20, what="20 jobs done")
    rt.stop()
    (point,) = storage.metrics.series()
    assert (point.done, point.run.jobs, point.wait.jobs) == (20, 20, 20)


def test_a_shutdown_that_times_out_still_flushes_what_ended(storage, make_runtime):
    release = threading.Event()
    rt = make_runtime({"default": 2})
    rt.register("k", lambda ctx, payload: payload)
    rt.register("stuck", lambda ctx, payload: release.wait(30))
    storage.jobs.enqueue_bulk([EnqueueRequest("k", n) for n in range(5)])
    rt.start()
    wait_until(lambda: storage.jobs.counts()["done"] == 5, what="5 jobs done")
    storage.jobs.enqueue(EnqueueRequest("stuck"))
    wait_until(lambda: storage.jobs.counts()["running"] == 1, what="the stuck job to run")
    rt.stop(timeout=0.2)
    release.set()
    (point,) = storage.metrics.series()
    assert (point.done, point.wait.jobs) == (5, 5)   # the stuck job went back


# ---------------------------------------------------- merging and reading ----

def test_runtimes_in_separate_processes_add_up(cluster, cluster_db):
    with cluster_db.open() as storage:
        children = [cluster.start(slots=4), cluster.start(slots=4)]
        for child in children:
            cluster.wait_registered(child)
        storage.jobs.enqueue_bulk([EnqueueRequest("quick", n) for n in range(300)])
        cluster.wait_for(lambda: storage.jobs.counts()["done"] == 300, 60, "300 jobs done")
        for child in children:
            assert child.terminate() == 0, child.stderr()
        points = storage.metrics.series(kind="quick")
        assert sum(point.done for point in points) == 300
        assert sum(point.run.jobs for point in points) == 300
        assert sum(point.wait.jobs for point in points) == 300


def test_concurrent_flushes_of_the_same_minute_add_up(target):
    minute = minute_of(sqliteq.now_ms())
    stores = [target.open() for _ in range(4)]
    try:
        def flush(storage: sqliteq.Storage, n: int) -> None:
            for i in range(25):
                recorded(storage, minute, "q", "k", waits=[(n * 25 + i) / 1000],
                         runs=[0.001 * (n + 1)], done=1, failed=1)

        threads = [threading.Thread(target=flush, args=(storage, n))
                   for n, storage in enumerate(stores)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        (point,) = stores[0].metrics.series()
        assert (point.done, point.failed, point.run.jobs, point.wait.jobs) == (100, 100, 100, 100)
        assert point.wait.total == pytest.approx(sum(range(100)) / 1000)
        assert point.wait.max == pytest.approx(0.099) and point.run.max == pytest.approx(0.004)
        # The histograms merged too: the quantiles are of all 100.
        assert point.wait.p50 == pytest.approx(0.049, rel=0.045)
        assert point.run.p50 == pytest.approx(0.002, rel=0.045)
        assert point.run.p99 == pytest.approx(0.004, rel=0.045)
        assert stores[0].metrics.totals() == [MetricsTotal(
            "q", "k", 100, 100, 0, 0, 100, pytest.approx(0.25), 100,
            pytest.approx(sum(range(100)) / 1000))]
    finally:
        for storage in stores:
            storage.close()


def test_quantiles_are_within_five_percent_of_the_true_ones(storage):
    minute = minute_of(sqliteq.now_ms())
    waits = [n / 1000 for n in range(1, 1001)]          # 1 ms .. 1 s
    recorded(storage, minute, "q", "k", waits=waits)
    (point,) = storage.metrics.series()
    assert point.wait == Timings(1000, pytest.approx(sum(waits)), pytest.approx(0.5, rel=0.045),
                                 pytest.approx(0.95, rel=0.045),
                                 pytest.approx(0.99, rel=0.045), pytest.approx(1.0))
    assert point.run == Timings(0, 0.0, None, None, None, None)


def test_a_series_filters_by_queue_and_kind_and_merges_steps(storage):
    base = minute_of(sqliteq.now_ms()) - 10 * MINUTE
    base -= base % (2 * MINUTE)
    recorded(storage, base, "a", "x", waits=[1.0], done=1)
    recorded(storage, base + MINUTE, "a", "y", waits=[3.0], done=2)
    recorded(storage, base + MINUTE, "b", "x", waits=[5.0], done=4)
    recorded(storage, base + 2 * MINUTE, "a", "x", done=8)
    since = base / 1000
    assert [p.done for p in storage.metrics.series(since=since)] == [1, 6, 8]
    assert [p.done for p in storage.metrics.series(queue="a", since=since)] == [1, 2, 8]
    assert [p.done for p in storage.metrics.series(kind="x", since=since)] == [1, 4, 8]
    assert [p.done for p in storage.metrics.series(queue="b", kind="y", since=since)] == []
    two = storage.metrics.series(since=since, step=timedelta(minutes=2))
    assert [(p.done, p.wait.jobs, p.wait.max) for p in two] == [(7, 3, 5.0), (8, 0, None)]
    assert two[0].wait.p50 == pytest.approx(3.0, rel=0.045)
    assert storage.metrics.series(since=since, until=(base + MINUTE) / 1000)[0].done == 1


def test_a_series_defaults_to_the_last_hour(storage):
    now = minute_of(sqliteq.now_ms())
    recorded(storage, now - 61 * MINUTE, "q", "k", done=1)
    recorded(storage, now, "q", "k", done=2)
    assert [p.done for p in storage.metrics.series()] == [2]


@pytest.mark.parametrize("arguments, message", [
    ({"step": 90}, "whole number of minutes"),
    ({"step": 0}, "whole number of minutes"),
    ({"since": datetime(2026, 1, 1)}, "naive datetime"),
    ({"queue": ""}, "queue"),
    ({"kind": 3}, "kind"),
])
def test_a_bad_series_argument_is_one_clear_error(storage, arguments, message):
    with pytest.raises(sqliteq.InvalidInput, match=message):
        storage.metrics.series(**arguments)


# -------------------------------------------------------------- retention ----

def test_the_janitor_deletes_minutes_past_the_retention(storage, make_runtime):
    now = minute_of(sqliteq.now_ms())
    recorded(storage, now - 3 * 3_600_000, "q", "k", done=1)
    recorded(storage, now - 3_600_000 + 2 * MINUTE, "q", "k", done=2)
    rt = make_runtime(janitor_interval=0.1, metrics_retention=timedelta(hours=1))
    rt.start()
    wait_until(lambda: [p.done for p in storage.metrics.series(since=now / 1000 - 86400)]
               == [2], what="the janitor to delete the 3-hour-old minute")
    assert [t.done for t in storage.metrics.totals()] == [3]     # sums are never swept


def test_by_default_minutes_are_kept_seven_days(storage, make_runtime):
    now = minute_of(sqliteq.now_ms())
    recorded(storage, now - 8 * 86_400_000, "q", "k", done=1)
    recorded(storage, now - 6 * 86_400_000, "q", "k", done=2)
    rt = make_runtime(janitor_interval=0.1)
    assert rt.metrics_retention == 7 * 86400
    rt.start()
    week = (now - 9 * 86_400_000) / 1000
    wait_until(lambda: [p.done for p in storage.metrics.series(since=week)] == [2],
               what="the janitor to delete the 8-day-old minute")



def test_a_file_from_before_metrics_gains_the_tables_when_opened(db_path):
    with sqliteq.Storage(db_path) as storage:
        job_id = storage.jobs.enqueue(EnqueueRequest("k")).job_id
    raw(db_path, "DROP TABLE metrics")
    raw(db_path, "DROP TABLE metrics_totals")
    raw(db_path, "DROP INDEX jobs_failed")                  # (the steps after metrics)
    raw(db_path, "DROP TABLE job_deps")
    raw(db_path, "PRAGMA user_version = 6")                 # (metrics came in step 7)
    with sqliteq.Storage(db_path) as storage:
        assert storage.jobs.get(job_id).state == "queued"
        recorded(storage, minute_of(sqliteq.now_ms()), "q", "k", done=1)
        assert [p.done for p in storage.metrics.series()] == [1]
    assert raw(db_path, "PRAGMA user_version") == [(sqliteq.SCHEMA_VERSION,)]
    assert raw(db_path, "SELECT name FROM sqlite_master WHERE name = 'jobs_failed'")
