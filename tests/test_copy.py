"""Moving a queue between stores: `Storage.copy_to` and `sqliteq copy`, from a SQLite file
to a PostgreSQL schema and back, and the switch-over of a running deployment that the
README describes."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import (
    PG_URL,
    Target,
    assert_error,
    fresh_schema,
    ok,
    pg_execute,
    run,
    wait_until,
)

import sqliteq
from sqliteq import CronExpression, EnqueueRequest, InvalidInput

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(params=["sqlite-to-postgres", "postgres-to-sqlite"])
def ends(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Target, Target]]:
    """(source, destination): a fresh SQLite file and a fresh PostgreSQL schema."""
    with fresh_schema() as schema:
        file, pg = Target(str(tmp_path / "q.db"), None), Target(PG_URL, schema)
        yield (file, pg) if request.param == "sqlite-to-postgres" else (pg, file)


@pytest.fixture
def scratch_schema() -> Iterator[str]:
    with fresh_schema() as schema:
        yield schema


def fill(storage: sqliteq.Storage, target: Target) -> dict[str, list[str]]:
    """Queues with settings, a cron schedule, a rate limit, and jobs in every state."""
    storage.queues.pause("mail")
    storage.queues.set_limit("mail", 3)
    storage.queues.set_backoff("reports", 2.5, 60)
    storage.queues.set_retention("reports", done=3600, failed=7200)
    storage.cron.declare("nightly", CronExpression("0 3 * * *"),
                         EnqueueRequest("report", {"when": "night"}, queue_name="reports"))
    storage.rate_limits.configure("smtp", 10, 0.5)
    jobs = storage.jobs
    ready = [jobs.enqueue(EnqueueRequest("send", {"to": i, "é": "ü"}, queue_name="mail",
                                         priority=i % 3)).job_id for i in range(5)]
    later = [jobs.enqueue(EnqueueRequest("report", [1, 2], queue_name="reports",
                                         run_at=time.time() + 3600)).job_id]
    unique = [jobs.enqueue(EnqueueRequest("send", None, queue_name="mail",
                                          unique_key="welcome:7")).job_id]
    # One job that failed an attempt already (what a retry leaves behind).
    retried = jobs.enqueue(EnqueueRequest("send", {"to": "x"}, max_attempts=4,
                                          timeout=90)).job_id
    target.sql("UPDATE jobs SET attempt = 1, errors = ? WHERE id = ?",
               json.dumps([{"at": "2026-01-01T00:00:00.000Z", "attempt": 1,
                            "error": "boom", "traceback": None}]), retried)
    finished = [jobs.enqueue(EnqueueRequest("old", i)).job_id for i in range(3)]
    target.sql("UPDATE jobs SET state = 'done', finished_at = created_at WHERE id = ?",
               finished[0])
    target.sql("UPDATE jobs SET state = 'failed', finished_at = created_at WHERE id = ?",
               finished[1])
    jobs.cancel(finished[2])
    return {"unfinished": ready + later + unique + [retried], "finished": finished}


def settings(storage: sqliteq.Storage, target: Target) -> tuple[object, ...]:
    cron = [(c.name, c.expression, c.request, c.next_fire_at, c.enabled)
            for c in storage.cron.list()]
    limits = target.sql("SELECT scope, capacity, refill_per_sec, tokens FROM rate_limits")
    return storage.queues.list(), cron, [tuple(row) for row in limits]


# --------------------------------------------------------------- the API ----

def test_a_copy_carries_settings_schedules_limits_and_unfinished_jobs_unchanged(ends):
    source, destination = ends
    with source.open() as src, destination.open() as dst:
        ids = fill(src, source)
        report = src.copy_to(dst)
        assert report == sqliteq.CopyReport(queues=3, cron_schedules=1, rate_limits=1,
                                            jobs=8, kept=0, dry_run=False)
        assert settings(dst, destination) == settings(src, source)
        for job_id in ids["unfinished"]:
            assert dst.jobs.get(job_id) == src.jobs.get(job_id)
        for job_id in ids["finished"]:
            assert dst.jobs.get(job_id) is None
        # Unique keys hold across the move: the copied job still owns its key.
        again = dst.jobs.enqueue(EnqueueRequest("send", None, queue_name="mail",
                                                unique_key="welcome:7"))
        assert again == sqliteq.EnqueueOutcome(ids["unfinished"][6], False)


def test_the_copied_jobs_run_on_the_destination(ends):
    source, destination = ends
    with source.open() as src, destination.open() as dst:
        ids = fill(src, source)
        src.copy_to(dst)
        dst.queues.resume("mail")
        ran: list[str] = []
        rt = sqliteq.Runtime(dst, {"default": 2, "mail": 2, "reports": 1}, poll_interval=0.05)
        for kind in ("send", "report"):
            rt.register(kind, lambda ctx, payload: ran.append(ctx.job_id))
        with rt:
            dst.jobs.run_now(ids["unfinished"][5])          # the one scheduled in an hour
            for job_id in ids["unfinished"]:
                assert dst.jobs.wait(job_id, timeout=60).state == "done"
        assert sorted(ran) == sorted(ids["unfinished"])
        assert dst.jobs.get(ids["unfinished"][7]).attempt == 2     # its second attempt


def test_a_dry_run_reports_the_same_copy_and_writes_nothing(ends):
    source, destination = ends
    with source.open() as src, destination.open() as dst:
        fill(src, source)
        dry = src.copy_to(dst, dry_run=True)
        assert dst.queues.list() == [] and dst.cron.list() == []
        assert sum(dst.jobs.counts().values()) == 0
        assert destination.sql("SELECT count(*) FROM rate_limits")[0][0] == 0
        real = src.copy_to(dst)
        assert (dry.queues, dry.cron_schedules, dry.rate_limits, dry.jobs, dry.kept) == (
            real.queues, real.cron_schedules, real.rate_limits, real.jobs, real.kept)
        assert dry.dry_run and not real.dry_run


def test_a_destination_that_holds_jobs_is_refused_unless_forced_and_keeps_its_rows(ends):
    source, destination = ends
    with source.open() as src, destination.open() as dst:
        ids = fill(src, source)
        mine = dst.jobs.enqueue(EnqueueRequest("send", None, queue_name="mail",
                                               unique_key="welcome:7")).job_id
        dst.queues.set_limit("mail", 9)
        with pytest.raises(InvalidInput, match="already holds 1 job"):
            src.copy_to(dst)
        assert dst.cron.list() == [] and sum(dst.jobs.counts().values()) == 1
        report = src.copy_to(dst, force=True)
        # Kept: its own "mail" queue, and the job whose unique key its job holds.
        assert (report.queues, report.jobs, report.kept) == (2, 7, 2)
        assert [q.limit for q in dst.queues.list() if q.name == "mail"] == [9]
        assert dst.jobs.get(ids["unfinished"][6]) is None
        assert dst.jobs.get(mine).state == "queued"
        # Run again, it copies nothing twice.
        assert src.copy_to(dst, force=True).jobs == 0
        assert sum(dst.jobs.counts().values()) == 8


def test_a_source_with_running_jobs_is_refused(ends):
    source, destination = ends
    with source.open() as src, destination.open() as dst:
        job_id = src.jobs.enqueue(EnqueueRequest("hold")).job_id
        release = threading.Event()
        rt = sqliteq.Runtime(src, {"default": 1}, poll_interval=0.05)
        rt.register("hold", lambda ctx, payload: release.wait(30))
        with rt:
            wait_until(lambda: src.jobs.get(job_id).state == "running", 30, "the job to run")
            with pytest.raises(InvalidInput, match=r"1 job.* running.*stop its workers"):
                src.copy_to(dst)
            release.set()
        assert sum(dst.jobs.counts().values()) == 0 and dst.queues.list() == []


def test_a_store_is_not_copied_onto_itself(tmp_path):
    with sqliteq.Storage(tmp_path / "q.db") as a, sqliteq.Storage(str(tmp_path / "q.db")) as b:
        with pytest.raises(InvalidInput, match="onto itself"):
            a.copy_to(b, force=True)


# ---------------------------------------------------------------- the CLI ----

def test_sqliteq_copy_dry_run_copy_refusal_and_json(ends, tmp_path):
    source, destination = ends

    def where(target: Target, option: str) -> list[str]:
        return [target.url, *([option, target.schema] if target.schema else [])]

    with source.open() as src:
        fill(src, source)
    args = ["copy", *where(source, "--from-schema"), *where(destination, "--to-schema")]
    dry = ok(*args, "--dry-run")
    assert dry.startswith("would copy 3 queue(s), 1 cron schedule(s), 1 rate limit(s), "
                          "8 job(s) into "), dry
    with destination.open() as dst:
        assert sum(dst.jobs.counts().values()) == 0
    assert ok(*args).startswith("copied 3 queue(s), 1 cron schedule(s), 1 rate limit(s), "
                                "8 job(s) into ")
    assert_error(run(*args), "already holds 8 job(s)", "--force")
    assert json.loads(ok(*args, "--force", "--json")) == {
        "queues": 0, "cron_schedules": 0, "rate_limits": 0, "jobs": 0, "kept": 13,
        "dry_run": False, "dependencies": 0}


def test_sqliteq_copy_names_a_bad_source_or_destination_in_one_line(tmp_path):
    assert_error(run("copy", str(tmp_path / "none.db"), str(tmp_path / "b.db")),
                 "no database at", "none.db")
    assert not (tmp_path / "b.db").exists()
    sqliteq.Storage(tmp_path / "a.db").close()
    assert_error(run("copy", str(tmp_path / "a.db"), str(tmp_path / "b.db"),
                     "--to-schema", "x"), "--to-schema", "DESTINATION")
    assert_error(run("copy", str(tmp_path / "a.db"), str(tmp_path / "a.db")), "onto itself")
    assert_error(run("copy", str(tmp_path / "a.db"), PG_URL, "--to-schema", "Bad Name"),
                 "schema")


def test_a_dry_run_into_a_missing_file_creates_no_file(tmp_path):
    with sqliteq.Storage(tmp_path / "a.db") as src:
        src.jobs.enqueue(EnqueueRequest("k"))
    out = ok("copy", str(tmp_path / "a.db"), str(tmp_path / "b.db"), "--dry-run")
    assert "would copy 1 queue(s), 0 cron schedule(s), 0 rate limit(s), 1 job(s)" in out
    assert not (tmp_path / "b.db").exists()


def test_a_dry_run_into_a_missing_postgres_schema_creates_nothing(tmp_path, scratch_schema):
    schema = scratch_schema
    with sqliteq.Storage(tmp_path / "a.db") as src:
        src.jobs.enqueue(EnqueueRequest("k"))
    url = PG_URL.replace("postgres@", "postgres:s3cret@")   # (trust auth ignores it)
    out = ok("copy", str(tmp_path / "a.db"), url, "--to-schema", schema, "--dry-run")
    assert "would copy 1 queue(s), 0 cron schedule(s), 0 rate limit(s), 1 job(s)" in out
    assert f"(schema {schema})" in out and "s3cret" not in out
    assert not pg_execute("SELECT 1 FROM pg_namespace WHERE nspname = ?", schema)


def test_a_missing_postgres_source_is_refused_and_not_created(tmp_path, scratch_schema):
    schema = scratch_schema
    assert_error(run("copy", PG_URL, str(tmp_path / "b.db"), "--from-schema", schema),
                 "no sqliteq queue at", schema)
    assert not pg_execute("SELECT 1 FROM pg_namespace WHERE nspname = ?", schema)
    assert not (tmp_path / "b.db").exists()


# --------------------------------------------------- switching over live ----

def test_the_documented_switch_over_loses_no_job_and_runs_none_twice(ends):
    """README "Moving a queue": stop the old workers, copy, start the new ones, move the
    producers, copy again. A producer enqueues all along."""
    source, destination = ends
    with source.open() as src, destination.open() as dst:
        runs: dict[str, int] = {}
        lock = threading.Lock()

        def work(ctx: sqliteq.JobCtx, payload: object) -> None:
            with lock:
                runs[ctx.job_id] = runs.get(ctx.job_id, 0) + 1

        produced: list[str] = []
        into = [src]
        stop = threading.Event()

        def produce() -> None:
            while not stop.is_set():
                produced.append(into[0].jobs.enqueue(EnqueueRequest("work", len(produced))).job_id)
                time.sleep(0.002)

        def runtime(storage: sqliteq.Storage) -> sqliteq.Runtime:
            rt = sqliteq.Runtime(storage, {"default": 2}, poll_interval=0.05)
            rt.register("work", work)
            return rt

        old = runtime(src)
        producer = threading.Thread(target=produce)
        old.start()
        producer.start()
        wait_until(lambda: len(runs) >= 50, 30, "the old workers to run jobs")
        old.stop()                                  # 1. stop the old workers
        first = src.copy_to(dst)                    # 2. copy
        new = runtime(dst)
        new.start()                                 # 3. start the new workers
        copied_at = len(produced)
        wait_until(lambda: len(produced) >= copied_at + 20, 30,
                   "jobs enqueued into the old store after the copy")
        into[0] = dst                               # 4. move the producers
        time.sleep(0.1)
        stop.set()
        producer.join()
        second = src.copy_to(dst, force=True)       # 5. copy again: what came meanwhile
        assert second.jobs > 0 and second.kept >= first.jobs
        try:
            wait_until(lambda: len(runs) >= len(produced), 60, "every job to run")
        finally:
            new.stop()
        assert set(runs) == set(produced)
        assert [job_id for job_id, count in runs.items() if count != 1] == []
