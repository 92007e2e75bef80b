"""Bad files: truncated, corrupt and empty database files get one clear error, from the
library and from the CLI, and are left exactly as they were (no -wal or -shm beside them).
A runtime whose file is corrupted behind its back stops with SchemaError instead of
retrying for ever.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from support import assert_error, raw, run, wait_until

import sqliteq
from sqliteq import EnqueueRequest, SchemaError

PAGE = 4096
READ_COMMANDS = [["status"], ["jobs", "--json"], ["job", "NOPE"], ["cron"],
                 ["retry", "--failed"], ["pause", "default"], ["purge", "--older-than", "1d"]]


def a_database_with_jobs(path: Path, jobs: int = 2000) -> bytes:
    """A checkpointed sqliteq file of a few hundred pages; returns its bytes."""
    with sqliteq.Storage(path) as storage:
        storage.jobs.enqueue_bulk(EnqueueRequest("k", {"i": i, "pad": "x" * 200})
                                  for i in range(jobs))
    assert sorted(os.listdir(path.parent)) == [path.name]     # the last close checkpointed
    return path.read_bytes()


def overwrite_pages(data: bytes, first: int, last: int | None = None) -> bytes:
    """`data` with pages first..last (1-based; default: to the end) filled with noise."""
    spoiled = bytearray(data)
    end = len(data) if last is None else last * PAGE
    noise = bytes((i * 151 + 7) % 256 for i in range(end - (first - 1) * PAGE))
    spoiled[(first - 1) * PAGE:end] = noise
    return bytes(spoiled)


BAD_FILES: dict[str, Callable[[bytes], bytes]] = {
    "truncated-to-half": lambda good: good[:len(good) // 2],
    "truncated-to-3-pages": lambda good: good[:3 * PAGE],
    "truncated-inside-the-header": lambda good: good[:60],
    "page-1-overwritten": lambda good: good[:100] + overwrite_pages(good, 1, 1)[100:],
    "header-overwritten": lambda good: overwrite_pages(good, 1, 1)[:100] + good[100:],
}


@pytest.fixture(params=sorted(BAD_FILES))
def bad_file(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    folder = tmp_path / "files"
    folder.mkdir()
    path = folder / "q.db"
    path.write_bytes(BAD_FILES[request.param](a_database_with_jobs(path)))
    return path


def test_opening_a_truncated_or_corrupt_file_raises_schema_error_and_changes_nothing(
        bad_file: Path) -> None:
    before = bad_file.read_bytes()
    with pytest.raises(SchemaError, match=r"q\.db"):
        sqliteq.Storage(bad_file)
    assert bad_file.read_bytes() == before
    assert os.listdir(bad_file.parent) == ["q.db"]


# Every command on one kind of bad file, a reading and a writing one on the others.
CLI_CASES = [pytest.param(spoil, args, id=f"{spoil}-{' '.join(args)}")
             for spoil in sorted(BAD_FILES)
             for args in ([*READ_COMMANDS, ["enqueue", "k"]] if spoil == "truncated-to-half"
                          else [["status"], ["enqueue", "k"]])]


@pytest.mark.parametrize(("bad_file", "args"), CLI_CASES, indirect=["bad_file"])
def test_the_cli_on_a_truncated_or_corrupt_file_prints_one_line_and_changes_nothing(
        bad_file: Path, args: list[str]) -> None:
    before = bad_file.read_bytes()
    line = assert_error(run(*args, db=bad_file), "q.db")
    assert "corrupt" in line or "not a SQLite database" in line
    assert bad_file.read_bytes() == before
    assert os.listdir(bad_file.parent) == ["q.db"]


# Pages of the jobs table spoiled, the schema intact: the file opens, and reading the jobs
# finds the damage. (The schema and the small tables come first, the jobs fill the rest:
# the last third of the file is the jobs table and its claim index.)
def spoil_the_table(path: Path) -> None:
    good = path.read_bytes()
    path.write_bytes(overwrite_pages(good, len(good) // PAGE * 2 // 3))


def test_reading_a_file_with_spoiled_table_pages_raises_schema_error(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    a_database_with_jobs(path)
    spoil_the_table(path)
    with sqliteq.Storage(path) as storage, pytest.raises(SchemaError, match="corrupt"):
        storage.jobs.list(limit=10_000)


@pytest.mark.parametrize("args", [["jobs", "--limit", "10000"], ["status"]], ids=" ".join)
def test_the_cli_on_spoiled_table_pages_prints_one_line(tmp_path: Path, args: list[str]) -> None:
    path = tmp_path / "q.db"
    a_database_with_jobs(path)
    spoil_the_table(path)
    assert_error(run(*args, db=path), "q.db", "corrupt")


def test_a_runtime_whose_file_is_corrupted_behind_its_back_stops_with_one_error(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "q.db"
    a_database_with_jobs(path, jobs=0)
    storage = sqliteq.Storage(path)
    runtime = sqliteq.Runtime(storage, {"default": 2}, poll_interval=0.02,
                              heartbeat_interval=0.1, lease_timeout=5)
    runtime.register("k", lambda ctx, payload: payload)
    caplog.set_level(logging.WARNING, logger="sqliteq")
    try:
        runtime.start()
        storage.jobs.enqueue_bulk(EnqueueRequest("k", {"i": i, "pad": "x" * 200},
                                                 run_at=time.time() + 3600)
                                  for i in range(2000))
        raw(path, "PRAGMA wal_checkpoint(TRUNCATE)")
        with open(path, "r+b") as file:     # what a failing disk or a stray writer does
            size = os.path.getsize(path)
            file.seek(PAGE)
            file.write(bytes((i * 151 + 7) % 256 for i in range(size - PAGE)))
        wait_until(lambda: runtime.error is not None, timeout=30,
                   what="the runtime to stop itself")
        assert isinstance(runtime.error, SchemaError) and "corrupt" in str(runtime.error)
    finally:
        runtime.stop(timeout=10)
        storage.close()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert 1 <= len(errors) <= 3, [r.getMessage() for r in errors]
    assert all(r.exc_info is None for r in errors), "a clear message, not a traceback"


def test_a_job_whose_payload_someone_else_spoiled_is_one_clear_error_to_read(
        tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    with sqliteq.Storage(path) as storage:
        job_id = storage.jobs.enqueue(EnqueueRequest("k", "x")).job_id
        raw(path, "UPDATE jobs SET payload = ? WHERE id = ?", "[" * 5000 + "]" * 5000, job_id)
        with pytest.raises(sqliteq.SqliteqError, match=f"payload of job {job_id}"):
            storage.jobs.get(job_id)
    for args in (["job", job_id], ["jobs"]):
        assert_error(run(*args, db=path), job_id, "not JSON", code=1)


def test_a_payload_that_is_not_utf_8_fails_its_job_and_the_queue_goes_on(
        tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    with sqliteq.Storage(path) as storage:
        poison = storage.jobs.enqueue(EnqueueRequest("k", "x")).job_id
        raw(path, "UPDATE jobs SET payload = CAST(x'22ff22' AS TEXT) WHERE id = ?", poison)
        with pytest.raises(sqliteq.SqliteqError, match=f"payload of job {poison}"):
            storage.jobs.get(poison)
        runtime = sqliteq.Runtime(storage, {"default": 1}, poll_interval=0.02,
                                  heartbeat_interval=0.1, lease_timeout=5)
        runtime.register("k", lambda ctx, payload: payload)
        with runtime:
            fine = storage.jobs.enqueue(EnqueueRequest("k", "fine")).job_id
            assert storage.jobs.wait(fine, timeout=30).result == "fine"
            wait_until(lambda: raw(path, "SELECT state, attempt FROM jobs WHERE id = ?",
                                   poison) == [("failed", 1)], timeout=30,
                       what="the job with the spoiled payload failed for good")
    assert_error(run("job", poison, db=path), poison, "not JSON", code=1)


def test_a_kind_that_is_not_utf_8_is_one_clear_error_to_list(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    with sqliteq.Storage(path) as storage:
        job_id = storage.jobs.enqueue(EnqueueRequest("k")).job_id
        raw(path, "UPDATE jobs SET kind = CAST(x'6bff' AS TEXT) WHERE id = ?", job_id)
        with pytest.raises(sqliteq.SqliteqError, match="not UTF-8"):
            storage.jobs.list()
    assert_error(run("jobs", db=path), "not UTF-8", code=1)


# ---------------------------------------------------------------- empty files ----

@pytest.mark.parametrize("args", READ_COMMANDS, ids=" ".join)
def test_a_cli_read_command_refuses_an_empty_file_and_writes_nothing(
        tmp_path: Path, args: list[str]) -> None:
    path = tmp_path / "q.db"
    path.write_bytes(b"")
    assert_error(run(*args, db=path), "q.db", "empty")
    assert path.read_bytes() == b""
    assert os.listdir(tmp_path) == ["q.db"]


def test_enqueue_into_an_empty_file_makes_it_a_database(tmp_path: Path) -> None:
    """An empty file is a new database to SQLite (mkstemp makes them): a write creates the
    schema, as for a missing file."""
    path = tmp_path / "q.db"
    path.write_bytes(b"")
    assert run("enqueue", "k", db=path).returncode == 0
    with sqliteq.Storage(path) as storage:
        assert [job.kind for job in storage.jobs.list()] == ["k"]
