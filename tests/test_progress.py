"""Progress: `ctx.progress(done, total, note)` from a running handler, stored by the runtime's
own commits, shown by `jobs.get` and `sqliteq job`, and cheap enough to call per item.
"""

from __future__ import annotations

import threading

import pytest
from support import ok, wait_until

import sqliteq
from sqliteq import JobProgress


def test_progress_of_a_running_job_is_stored_and_shown_and_kept_when_it_ends(
        target, storage, make_runtime):
    rt = make_runtime()
    release = threading.Event()

    @rt.task
    def resize(ctx: sqliteq.JobCtx, files: list[str]) -> int:
        for done, name in enumerate(files, 1):
            ctx.progress(done, len(files), f"resized {name}")
        release.wait(30)
        ctx.progress(len(files), len(files), "all done")
        return len(files)

    with rt:
        job_id = resize.enqueue([f"{n}.png" for n in range(1, 401)]).job_id
        # Within a heartbeat interval the latest report is stored, while the job runs.
        wait_until(lambda: storage.jobs.get(job_id).progress
                   == JobProgress(400, 400, "resized 400.png"), 30, "the progress to be stored")
        assert storage.jobs.get(job_id).state is sqliteq.JobState.RUNNING
        shown = ok("job", job_id, db=target)
        assert "progress:         400/400 (100 %) resized 400.png" in shown
        release.set()
        job = storage.jobs.wait(job_id, timeout=30)
    # The last report rides in the commit that finishes the job.
    assert (job.state, job.progress) == (sqliteq.JobState.DONE, JobProgress(400, 400, "all done"))


def test_a_new_attempt_starts_without_the_progress_of_the_last(storage, make_runtime):
    storage.queues.set_backoff("default", 0.01, 0.05)
    rt = make_runtime()
    seen: list[JobProgress | None] = []

    @rt.task
    def flaky(ctx: sqliteq.JobCtx, payload: None) -> None:
        seen.append(ctx.storage.jobs.get(ctx.job_id).progress)
        if ctx.attempt == 1:
            ctx.progress(3, note="got far")
            raise RuntimeError("then failed")

    with rt:
        job = storage.jobs.wait(flaky.enqueue().job_id, timeout=30)
    assert job.state is sqliteq.JobState.DONE
    assert seen == [None, None]
    assert job.progress is None


@pytest.mark.sqlite_only
def test_reports_per_item_are_coalesced_into_the_runtimes_commits(storage, make_runtime, sql):
    sql("CREATE TABLE progress_writes (n INTEGER)")
    sql("INSERT INTO progress_writes VALUES (0)")
    sql("CREATE TRIGGER count_progress AFTER UPDATE OF progress ON jobs"
        " WHEN new.progress IS NOT NULL"
        " BEGIN UPDATE progress_writes SET n = n + 1; END")
    rt = make_runtime()

    @rt.task
    def count(ctx: sqliteq.JobCtx, n: int) -> None:
        for done in range(1, n + 1):
            ctx.progress(done, n)

    with rt:
        job = storage.jobs.wait(count.enqueue(20_000).job_id, timeout=60)
    assert job.progress == JobProgress(20_000, 20_000)
    [(writes,)] = sql("SELECT n FROM progress_writes")
    assert 1 <= writes < 100        # 20,000 reports, a handful of writes


@pytest.mark.parametrize("args, problem", [
    ((-1,), "done"), (("half",), "done"), ((float("nan"),), "done"), ((True,), "done"),
    ((1, -5), "total"), ((1, "10"), "total"), ((1, None, 7), "note"),
    ((1, None, "x" * 1001), "note"),
])
def test_bad_progress_is_refused_in_the_handler(storage, make_runtime, args, problem):
    rt = make_runtime()
    refused: list[str] = []

    @rt.task
    def report(ctx: sqliteq.JobCtx, payload: None) -> None:
        try:
            ctx.progress(*args)
        except sqliteq.InvalidInput as exc:
            refused.append(str(exc))

    with rt:
        job = storage.jobs.wait(report.enqueue().job_id, timeout=30)
    assert job.progress is None
    assert len(refused) == 1 and problem in refused[0]
