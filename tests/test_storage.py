"""Storage: the file, its schema and pragmas, refusing unusable files, transient retries."""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import apsw
import pytest
from support import HOLD_WRITER_LOCK, file_at_schema, wait_until

import sqliteq
from sqliteq import EnqueueRequest, SchemaError

TABLES = {"jobs", "queues", "processes", "cron", "rate_limits"}


def raw(path: Path | str) -> apsw.Connection:
    conn = apsw.Connection(str(path))
    conn.setbusytimeout(10_000)
    return conn


def scalar(path: Path | str, statement: str, *params):
    conn = raw(path)
    try:
        return conn.execute(statement, params).fetchall()[0][0]
    finally:
        conn.close()


def schema(path: Path | str) -> list[tuple]:
    conn = raw(path)
    try:
        return conn.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name").fetchall()
    finally:
        conn.close()


# ------------------------------------------------------------ the file ----

def test_opening_creates_the_file_and_schema(db_path):
    with sqliteq.Storage(db_path) as storage:
        assert storage.path == str(db_path)
    assert db_path.is_file()
    assert TABLES <= {name for kind, name, _ in schema(db_path) if kind == "table"}


def test_file_is_in_wal_mode(storage, db_path):
    assert scalar(db_path, "PRAGMA journal_mode") == "wal"


def test_user_version_is_the_schema_version(storage, db_path):
    assert scalar(db_path, "PRAGMA user_version") == sqliteq.SCHEMA_VERSION >= 1


def test_reopening_keeps_jobs_and_schema(db_path):
    with sqliteq.Storage(db_path) as storage:
        job_id = storage.jobs.enqueue(EnqueueRequest("k", {"a": 1})).job_id
    before = schema(db_path)
    for _ in range(2):
        with sqliteq.Storage(db_path) as storage:
            assert storage.jobs.get(job_id).payload == {"a": 1}
    assert schema(db_path) == before
    assert scalar(db_path, "PRAGMA user_version") == sqliteq.SCHEMA_VERSION


def test_two_storages_on_one_file_see_each_other(db_path):
    with sqliteq.Storage(db_path) as one, sqliteq.Storage(db_path) as two:
        job_id = one.jobs.enqueue(EnqueueRequest("k")).job_id
        assert two.jobs.get(job_id).id == job_id


def test_context_manager_closes_every_threads_connection(db_path):
    with sqliteq.Storage(db_path) as storage:
        storage.jobs.enqueue(EnqueueRequest("k"))
        thread = threading.Thread(target=storage.jobs.enqueue, args=(EnqueueRequest("k"),))
        thread.start()
        thread.join()
        assert Path(f"{db_path}-wal").exists()
    # SQLite removes the WAL file when the last connection to the database closes.
    assert not Path(f"{db_path}-wal").exists()
    with pytest.raises(sqliteq.SqliteqError):
        storage.jobs.counts()
    storage.close()     # closing twice is harmless


def test_closing_while_another_thread_uses_a_connection_is_a_clear_error(db_path):
    storage = sqliteq.Storage(db_path)
    inside, release = threading.Event(), threading.Event()

    def hold_a_statement() -> None:
        conn = storage.db.connection()
        conn.create_scalar_function("hold", lambda: (inside.set(), release.wait(30))[1])
        conn.execute("SELECT hold()").fetchall()

    holder = threading.Thread(target=hold_a_statement)
    holder.start()
    try:
        assert inside.wait(30)
        with pytest.raises(sqliteq.SqliteqError, match="1 other thread"):
            storage.close()
    finally:
        release.set()
        holder.join(30)
    with pytest.raises(sqliteq.SqliteqError, match="storage is closed"):
        storage.jobs.counts()           # closed for every thread all the same
    with sqliteq.Storage(db_path) as again:     # the file is fine
        assert again.jobs.counts()["queued"] == 0


@pytest.mark.sqlite_only
def test_default_synchronous_is_normal(storage):
    assert storage.db.connection().execute("PRAGMA synchronous").fetchall() == [(1,)]


def test_durable_sets_synchronous_full_on_every_connection(db_path):
    with sqliteq.Storage(db_path, durable=True) as storage:
        assert storage.db.connection().execute("PRAGMA synchronous").fetchall() == [(2,)]
        seen = []
        thread = threading.Thread(target=lambda: seen.extend(
            storage.db.connection().execute("PRAGMA synchronous").fetchall()))
        thread.start()
        thread.join()
        assert seen == [(2,)]


@pytest.mark.parametrize("busy_timeout", [-1, "5", True])
def test_busy_timeout_must_be_a_non_negative_number(db_path, busy_timeout):
    with pytest.raises(sqliteq.InvalidInput):
        sqliteq.Storage(db_path, busy_timeout=busy_timeout)


# -------------------------------------------------------------- WAL size ----

def fill_wal(storage: sqliteq.Storage, db_path: Path, megabytes: float) -> None:
    while os.path.getsize(f"{db_path}-wal") < megabytes * 2**20:
        storage.jobs.enqueue_bulk(EnqueueRequest("k", {"pad": "x" * 500}) for _ in range(200))


@pytest.fixture
def small_wal_limit(monkeypatch: pytest.MonkeyPatch) -> int:
    """A 1 MiB WAL limit (64 MiB would take too long to exceed); set before opening."""
    monkeypatch.setattr(sqliteq, "WAL_SIZE_LIMIT", 2**20)
    return 2**20


def test_the_wal_shrinks_back_to_its_limit_once_a_pinning_reader_lets_go(
        db_path: Path, small_wal_limit: int) -> None:
    with sqliteq.Storage(db_path) as storage:
        reader = raw(db_path)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM jobs").fetchall()     # an old snapshot, held
        fill_wal(storage, db_path, 4)
        reader.execute("COMMIT")
        reader.close()
        wait_until(lambda: storage.jobs.enqueue(EnqueueRequest("k")) and
                   os.path.getsize(f"{db_path}-wal") <= small_wal_limit, timeout=30,
                   what="the WAL cut back to its limit")


def test_a_runtime_warns_once_while_the_wal_is_pinned_and_once_when_it_is_back(
        db_path: Path, small_wal_limit: int, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="sqliteq")
    with sqliteq.Storage(db_path) as storage, sqliteq.Runtime(
            storage, {"idle": 1}, heartbeat_interval=0.05, lease_timeout=5):
        reader = raw(db_path)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM jobs").fetchall()
        fill_wal(storage, db_path, 4 * 1.5)
        pinned = wait_until(lambda: [r for r in caplog.records if "has grown to" in
                                     r.getMessage()], timeout=30, what="the warning")
        assert "old read snapshot" in pinned[0].getMessage()
        reader.execute("COMMIT")
        reader.close()
        wait_until(lambda: storage.jobs.enqueue(EnqueueRequest("k")) and
                   [r for r in caplog.records if "is back to" in r.getMessage()], timeout=30,
                   what="the all-clear")
    assert len([r for r in caplog.records if "has grown to" in r.getMessage()]) == 1


# -------------------------------------------------------- refusing files ----

def test_newer_schema_is_refused_and_the_file_left_unchanged(db_path):
    sqliteq.Storage(db_path).close()
    conn = raw(db_path)
    conn.execute(f"PRAGMA user_version = {sqliteq.SCHEMA_VERSION + 1}")
    conn.close()
    before = db_path.read_bytes()
    with pytest.raises(SchemaError, match="newer"):
        sqliteq.Storage(db_path)
    assert db_path.read_bytes() == before
    assert scalar(db_path, "PRAGMA user_version") == sqliteq.SCHEMA_VERSION + 1


def test_newer_schema_in_rollback_mode_is_refused_unchanged(db_path):
    conn = raw(db_path)
    conn.execute(f"CREATE TABLE t (x); PRAGMA user_version = {sqliteq.SCHEMA_VERSION + 1}")
    conn.close()
    before = db_path.read_bytes()
    with pytest.raises(SchemaError):
        sqliteq.Storage(db_path)
    assert db_path.read_bytes() == before


def test_file_refused_as_newer_is_released_at_once(db_path):
    sqliteq.Storage(db_path).close()
    conn = raw(db_path)
    conn.execute(f"PRAGMA user_version = {sqliteq.SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(SchemaError) as refused:
        sqliteq.Storage(db_path)
    assert refused.value is not None           # the error (and its traceback) is still held
    assert not Path(f"{db_path}-wal").exists()  # yet no connection keeps the file open


@pytest.mark.parametrize("junk", [b"not a database, just text\n" * 100, bytes(range(256)) * 16],
                         ids=["text", "binary"])
def test_file_that_is_not_sqlite_is_refused_unchanged(db_path, junk):
    db_path.write_bytes(junk)
    with pytest.raises(SchemaError):
        sqliteq.Storage(db_path)
    assert db_path.read_bytes() == junk


def test_missing_folder_is_refused(tmp_path):
    with pytest.raises(SchemaError, match="does not exist"):
        sqliteq.Storage(tmp_path / "missing" / "q.db")
    assert not (tmp_path / "missing").exists()


def test_directory_as_path_is_refused(tmp_path):
    with pytest.raises(SchemaError):
        sqliteq.Storage(tmp_path)


def test_schema_error_is_a_sqliteq_error():
    assert issubclass(SchemaError, sqliteq.SqliteqError)


def test_create_false_refuses_a_missing_store_and_creates_nothing(target):
    with pytest.raises(SchemaError, match="no sqliteq queue at"):
        target.open(create=False)
    if target.postgres:
        assert not target.sql("SELECT 1 FROM pg_namespace WHERE nspname = ?", target.schema)
    else:
        assert not os.path.exists(target.url)


def test_create_false_opens_an_existing_store(target):
    with target.open() as storage:
        job_id = storage.jobs.enqueue(EnqueueRequest("k")).job_id
    with target.open(create=False) as storage:
        assert storage.jobs.get(job_id).state == "queued"


# ---------------------------------------------------- read-only (as a non-root user) ----

AS_ROOT = os.geteuid() == 0
NOBODY = 65534

OPEN_UNPRIVILEGED = """
import os, sys
import sqliteq
if os.geteuid() == 0:          # root ignores file modes, so become 'nobody' (after imports)
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
try:
    with sqliteq.Storage(sys.argv[1]) as storage:
        print("opened", flush=True)
        if sys.argv[2] == "enqueue":
            storage.jobs.enqueue(sqliteq.EnqueueRequest("k"))
            print("enqueued")
except Exception as exc:
    print(type(exc).__name__)
"""


@pytest.fixture
def reachable_dir():
    """A fresh folder an unprivileged child can reach (pytest's tmp_path is private to root)."""
    folder = Path(tempfile.mkdtemp(prefix="sqliteq-test-", dir="/tmp"))
    folder.chmod(0o755)
    yield folder
    for path in [folder, *folder.iterdir()]:
        path.chmod(0o700)
    shutil.rmtree(folder)


def writable(path: Path) -> None:
    if AS_ROOT:
        os.chown(path, NOBODY, NOBODY)
    path.chmod(0o755 if path.is_dir() else 0o644)


def read_only(path: Path) -> None:
    if AS_ROOT:
        os.chown(path, 0, 0)
        path.chmod(0o755 if path.is_dir() else 0o644)
    else:
        path.chmod(0o555 if path.is_dir() else 0o444)


@pytest.fixture
def open_unprivileged(run_python):
    """Open the file with sqliteq in a child process that cannot override file modes.

    Returns what the child printed: "opened" and/or the name of the exception it got.
    """

    def run(path: Path, then: str = "open") -> list[str]:
        proc = run_python(OPEN_UNPRIVILEGED, str(path), then)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.split()

    return run


def existing_database(folder: Path) -> Path:
    path = folder / "q.db"
    sqliteq.Storage(path).close()
    return path


def test_new_file_in_read_only_folder_is_refused(reachable_dir, open_unprivileged):
    read_only(reachable_dir)
    assert open_unprivileged(reachable_dir / "q.db") == ["SchemaError"]
    assert list(reachable_dir.iterdir()) == []


def test_writable_file_in_read_only_folder_is_refused(reachable_dir, open_unprivileged):
    path = existing_database(reachable_dir)
    writable(path)
    read_only(reachable_dir)
    assert open_unprivileged(path) == ["SchemaError"]


def test_read_only_file_in_read_only_folder_is_refused(reachable_dir, open_unprivileged):
    path = existing_database(reachable_dir)
    read_only(path)
    read_only(reachable_dir)
    assert open_unprivileged(path) == ["SchemaError"]


def test_read_only_file_in_writable_folder_is_refused_and_nothing_is_left_beside_it(
        reachable_dir, open_unprivileged):
    path = existing_database(reachable_dir)
    read_only(path)
    writable(reachable_dir)
    before = path.read_bytes()
    assert open_unprivileged(path) == ["SchemaError"]
    assert [p.name for p in reachable_dir.iterdir()] == ["q.db"]      # no -wal, no -shm
    assert path.read_bytes() == before


def test_a_symlink_in_a_read_only_folder_to_a_database_in_a_writable_one_opens(
        reachable_dir, open_unprivileged):
    """SQLite keeps -wal and -shm beside the file the link points to: that folder counts."""
    data, links = reachable_dir / "data", reachable_dir / "links"
    data.mkdir()
    links.mkdir()
    path = existing_database(data)
    writable(path)
    writable(data)
    (links / "q.db").symlink_to(path)
    read_only(links)
    assert open_unprivileged(links / "q.db") == ["opened"]


def test_writing_to_a_read_only_file_raises_schema_error(reachable_dir, open_unprivileged):
    path = existing_database(reachable_dir)
    read_only(path)
    writable(reachable_dir)
    assert open_unprivileged(path, "enqueue")[-1] == "SchemaError"
    assert scalar(path, "SELECT count(*) FROM jobs") == 0


# ---------------------------------------------------------------- indexes ----

Store = sqliteq._JobStore


def plan(path: Path, statement: str, *params) -> str:
    conn = raw(path)
    try:
        return " ".join(row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + statement, params))
    finally:
        conn.close()


def test_the_claim_reads_the_claim_index_in_claim_order(storage, db_path):
    steps = plan(db_path, Store.CLAIM, 1, "host", sqliteq.now_ms(), "default", 10)
    assert "jobs_claim" in steps
    assert "TEMP B-TREE" not in steps      # the index order is the claim order: no sort


def test_promotion_next_due_and_readiness_read_the_due_index(storage, db_path):
    now = sqliteq.now_ms()
    assert "jobs_due" in plan(db_path, Store.PROMOTE_DUE, "default", now)
    assert "jobs_due" in plan(db_path, Store.NEXT_DUE, "default")
    ready = plan(db_path, Store.READY_EXISTS, "default", now)
    assert "jobs_claim" in ready and "jobs_due" in ready


@pytest.mark.parametrize("state", ["done", "failed", "cancelled"])
def test_retention_and_throughput_search_the_ended_index(storage, db_path, state):
    """Not a scan of the table per chunk: each statement's WHERE implies jobs_ended's."""
    now = sqliteq.now_ms()
    statements = [plan(db_path, Store.NEXT_QUEUE_ENDED[state], ""),
                  plan(db_path, Store.DELETE_ENDED_CHUNK[state], "default", now, 2000),
                  plan(db_path, Store.FINISHED_SINCE, now)]
    for steps in statements:
        assert "jobs_ended" in steps and "SCAN jobs" not in steps, steps


def test_no_index_on_ended_jobs_tests_an_in_list(storage, db_path):
    """SQLite tests a partial index's WHERE on every update of its columns; an IN list
    costs a lookup table each time, and the claim and the finish both change `state`."""
    sql = scalar(db_path, "SELECT sql FROM sqlite_master WHERE name = 'jobs_ended'")
    assert sql.endswith("WHERE state = 'done' OR state = 'failed' OR state = 'cancelled'")
    assert not scalar(db_path, "SELECT count(*) FROM sqlite_master WHERE name = 'jobs_finished'")


def test_jobs_are_keyed_by_their_ulid_with_no_rowid(storage, db_path):
    """No automatic index maps the id to a rowid: one b-tree fewer to write per job."""
    sql = scalar(db_path, "SELECT sql FROM sqlite_master WHERE name = 'jobs'")
    assert sql.rstrip().endswith("WITHOUT ROWID")
    assert not scalar(db_path, "SELECT count(*) FROM sqlite_master"
                               " WHERE tbl_name = 'jobs' AND name LIKE 'sqlite_autoindex%'")


def test_claim_and_due_indexes_are_partial_on_their_state(storage, db_path):
    claim = scalar(db_path, "SELECT sql FROM sqlite_master WHERE name = 'jobs_claim'")
    due = scalar(db_path, "SELECT sql FROM sqlite_master WHERE name = 'jobs_due'")
    assert "(queue, priority, run_at)" in claim and "WHERE state = 'queued'" in claim
    assert "(queue, run_at)" in due and "WHERE state = 'scheduled'" in due


def test_unique_key_index_is_partial_on_active_jobs(storage, db_path):
    sql = scalar(db_path, "SELECT sql FROM sqlite_master WHERE name = 'jobs_unique_active'")
    assert sql.startswith("CREATE UNIQUE INDEX")
    assert "state IN ('waiting', 'queued', 'scheduled', 'running')" in sql


def test_a_job_due_later_waits_as_scheduled_and_is_queued_to_the_api(storage, db_path):
    later = storage.jobs.enqueue(EnqueueRequest("k", run_at=time.time() + 3600)).job_id
    now = storage.jobs.enqueue(EnqueueRequest("k")).job_id
    assert scalar(db_path, "SELECT state FROM jobs WHERE id = ?", later) == "scheduled"
    assert scalar(db_path, "SELECT state FROM jobs WHERE id = ?", now) == "queued"
    assert storage.jobs.get(later).state == sqliteq.JobState.QUEUED
    assert storage.jobs.counts()["queued"] == 2
    assert {job.id for job in storage.jobs.list(state="queued")} == {later, now}
    assert storage.jobs.run_now(later)
    assert scalar(db_path, "SELECT state FROM jobs WHERE id = ?", later) == "queued"


def test_a_claim_promotes_due_scheduled_jobs_and_keeps_the_claim_order(storage, db_path):
    """Jobs that came due while nobody claimed are claimed by priority, run_at, id with
    the ones enqueued ready, whichever state they waited in."""
    soon = time.time() + 0.3
    ids = {
        "urgent-late": storage.jobs.enqueue(EnqueueRequest("k", priority=-1, run_at=soon)),
        "plain-now": storage.jobs.enqueue(EnqueueRequest("k")),
        "plain-late": storage.jobs.enqueue(EnqueueRequest("k", run_at=soon)),
        "later": storage.jobs.enqueue(EnqueueRequest("k", run_at=time.time() + 3600)),
    }
    name = {out.job_id: label for label, out in ids.items()}
    wait_until(lambda: sqliteq.now_ms() > soon * 1000, timeout=5, what="the jobs to come due")
    claimed = storage.db.write(lambda conn: storage._store.claim(
        conn, "default", 10, 7, "host", sqliteq.now_ms()))
    assert [name[row.id] for row in claimed] == ["urgent-late", "plain-now", "plain-late"]
    assert scalar(db_path, "SELECT state FROM jobs WHERE id = ?",
                  ids["later"].job_id) == "scheduled"


# ------------------------------------------------------------- migrations ----

def test_database_of_another_application_is_refused_unchanged(db_path):
    conn = raw(db_path)
    conn.execute("CREATE TABLE queues (theirs); INSERT INTO queues VALUES ('keep me')")
    conn.close()
    before = db_path.read_bytes()
    with pytest.raises(SchemaError):
        sqliteq.Storage(db_path)
    assert db_path.read_bytes() == before


def with_step(monkeypatch, *statements: str) -> None:
    """Pretend this sqliteq has one more migration step (a later release would)."""
    steps = (*sqliteq.MIGRATIONS, statements)
    monkeypatch.setattr(sqliteq, "MIGRATIONS", steps)
    monkeypatch.setattr(sqliteq, "SCHEMA_VERSION", len(steps))


def test_a_new_migration_step_is_applied_on_open_and_keeps_the_data(db_path, monkeypatch):
    with sqliteq.Storage(db_path) as storage:
        job_id = storage.jobs.enqueue(EnqueueRequest("k", "kept")).job_id
    version = sqliteq.SCHEMA_VERSION
    with_step(monkeypatch, "CREATE TABLE extra (x)", "CREATE INDEX extra_x ON extra (x)")
    with sqliteq.Storage(db_path) as storage:
        assert storage.jobs.get(job_id).payload == "kept"
    assert scalar(db_path, "PRAGMA user_version") == version + 1
    assert {"extra", "extra_x"} <= {name for _, name, _ in schema(db_path)}


def test_a_failed_migration_step_leaves_the_file_as_it_was(db_path, monkeypatch):
    """A step runs in one transaction with its user_version change: all of it or nothing."""
    with sqliteq.Storage(db_path) as storage:
        job_id = storage.jobs.enqueue(EnqueueRequest("k", "kept")).job_id
    before = schema(db_path)
    version = sqliteq.SCHEMA_VERSION
    with_step(monkeypatch, "CREATE TABLE extra (x)", "CREATE TABLE jobs (duplicate)")
    with pytest.raises(apsw.SQLError, match="already exists"):
        sqliteq.Storage(db_path)
    assert schema(db_path) == before
    assert scalar(db_path, "PRAGMA user_version") == version
    monkeypatch.undo()
    with sqliteq.Storage(db_path) as storage:
        assert storage.jobs.get(job_id).payload == "kept"


def test_file_whose_migration_failed_is_released_at_once(db_path, monkeypatch):
    sqliteq.Storage(db_path).close()
    with_step(monkeypatch, "CREATE TABLE jobs (duplicate)")
    with pytest.raises(apsw.SQLError) as failed:
        sqliteq.Storage(db_path)
    assert failed.value is not None
    assert not Path(f"{db_path}-wal").exists()


def v4_file(path: Path) -> None:
    """A file as sqliteq 0.1 (schema 4) wrote it: a rowid jobs table, one 'queued' state."""
    conn = file_at_schema(path, 4)
    with conn:
        now = sqliteq.now_ms()
        rows = [("A-ready", "queued", now - 1000, None, None), ("B-later", "queued",
                 now + 3_600_000, "key-b", None), ("C-running", "running", now, "key-c", 77),
                ("D-done", "done", now, None, None), ("E-failed", "failed", now, "key-e", None)]
        for job_id, state, run_at, key, lease in rows:
            conn.execute("INSERT INTO jobs (id, kind, queue, payload, state, run_at, unique_key,"
                         " lease, created_at, errors, result) VALUES (?, 'k', 'default',"
                         " '{\"n\":1}', ?, ?, ?, ?, ?, '[]', ?)",
                         (job_id, state, run_at, key, lease, now,
                          '"r"' if state == "done" else None))
    conn.close()


def test_a_file_of_schema_4_moves_to_storage_v2_keeping_every_job(db_path):
    v4_file(db_path)
    with sqliteq.Storage(db_path) as storage:
        assert scalar(db_path, "PRAGMA user_version") == sqliteq.SCHEMA_VERSION
        stored = dict(raw(db_path).execute("SELECT id, state FROM jobs").fetchall())
        assert stored == {"A-ready": "queued", "B-later": "scheduled", "C-running": "running",
                          "D-done": "done", "E-failed": "failed"}
        jobs = {job.id: job for job in storage.jobs.list()}
        assert {job_id: job.state.value for job_id, job in jobs.items()} == {
            "A-ready": "queued", "B-later": "queued", "C-running": "running",
            "D-done": "done", "E-failed": "failed"}
        assert jobs["D-done"].result == "r" and jobs["A-ready"].payload == {"n": 1}
        assert (jobs["A-ready"].timeout, jobs["C-running"].progress) == (None, None)   # step 6
        # Unique keys still bind active jobs, scheduled ones included; finished ones do not.
        assert storage.jobs.enqueue(EnqueueRequest("k", unique_key="key-b")) == (
            sqliteq.EnqueueOutcome("B-later", False))
        assert storage.jobs.enqueue(EnqueueRequest("k", unique_key="key-c")).job_id == "C-running"
        assert storage.jobs.enqueue(EnqueueRequest("k", unique_key="key-e")).created
        # The ready job is claimable; the one due in an hour is not.
        claimed = storage.db.write(lambda conn: storage._store.claim(
            conn, "default", 10, 1, "host", sqliteq.now_ms()))
        assert [row.id for row in claimed][:1] == ["A-ready"]
        assert "B-later" not in {row.id for row in claimed}
    assert "WITHOUT ROWID" in scalar(db_path, "SELECT sql FROM sqlite_master WHERE name = 'jobs'")
    assert not scalar(db_path, "SELECT count(*) FROM sqlite_master WHERE name = 'jobs_v2'")


def test_a_file_of_schema_9_trades_jobs_finished_for_jobs_ended(db_path):
    conn = file_at_schema(db_path, 9)
    now = sqliteq.now_ms()
    with conn:
        for job_id, queue, state, finished_at in [
                ("A", "mail", "done", now - 3 * 86_400_000), ("B", "mail", "done", now),
                ("C", "pdf", "done", now - 3 * 86_400_000), ("D", "pdf", "queued", None)]:
            conn.execute("INSERT INTO queues (name) VALUES (?) ON CONFLICT DO NOTHING", (queue,))
            conn.execute("INSERT INTO jobs (id, queue, state, run_at, created_at, finished_at,"
                         " kind, payload) VALUES (?, ?, ?, ?, ?, ?, 'k', 'null')",
                         (job_id, queue, state, now, now, finished_at))
    conn.close()
    with sqliteq.Storage(db_path) as storage:
        assert scalar(db_path, "PRAGMA user_version") == sqliteq.SCHEMA_VERSION
        indexes = {name for kind, name, _ in schema(db_path) if kind == "index"}
        assert "jobs_ended" in indexes and "jobs_finished" not in indexes
        assert storage.jobs.purge("done", older_than=86_400) == 2
        assert sorted(job.id for job in storage.jobs.list()) == ["B", "D"]


def test_a_file_of_schema_10_keeps_every_job_and_index_with_the_state_check_as_ors(db_path):
    conn = file_at_schema(db_path, 10)
    columns = [row[1] for row in conn.execute("PRAGMA table_info(jobs)")]
    now = sqliteq.now_ms()
    with conn:
        conn.execute("INSERT INTO queues (name) VALUES ('default')")
        for n, state in enumerate(sqliteq.JobState):
            conn.execute("INSERT INTO jobs (id, queue, state, priority, run_at, attempt,"
                         " created_at, unique_key, kind, payload, result, errors, progress)"
                         " VALUES (?, 'default', ?, ?, ?, 1, ?, ?, 'k', ?, ?, '[]', '{}')",
                         (f"J{n}", state.value, n, now - n, now, f"key-{n}", f'{{"n":{n}}}',
                          f'"r{n}"'))
        before = conn.execute("SELECT * FROM jobs ORDER BY id").fetchall()
        indexes = conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index'"
                               " AND tbl_name = 'jobs' AND sql IS NOT NULL").fetchall()
    conn.close()

    with sqliteq.Storage(db_path) as storage:
        assert scalar(db_path, "PRAGMA user_version") == sqliteq.SCHEMA_VERSION
        after = raw(db_path).execute("SELECT * FROM jobs ORDER BY id").fetchall()
        assert [row[1] for row in raw(db_path).execute("PRAGMA table_info(jobs)")] == columns
        assert after == before
        assert sorted(indexes) == sorted(raw(db_path).execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'jobs'"
            " AND sql IS NOT NULL").fetchall())
        table = scalar(db_path, "SELECT sql FROM sqlite_master WHERE name = 'jobs'")
        assert "state IN" not in table and "state = 'cancelled'" in table
        with pytest.raises(apsw.ConstraintError, match="CHECK"):
            raw(db_path).execute("UPDATE jobs SET state = 'lost' WHERE id = 'J0'")
        # A unique key still binds the active job that holds it.
        active = list(sqliteq.JobState).index(sqliteq.JobState.QUEUED)
        assert storage.jobs.enqueue(EnqueueRequest("k", unique_key=f"key-{active}")) == (
            sqliteq.EnqueueOutcome(f"J{active}", False))
    assert "WITHOUT ROWID" in table
    assert not scalar(db_path, "SELECT count(*) FROM sqlite_master WHERE name = 'jobs_v4'")


def test_migration_sets_schema_and_version_together(db_path):
    conn = raw(db_path)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.close()
    assert scalar(db_path, "PRAGMA user_version") == 0
    sqliteq.Storage(db_path).close()
    assert scalar(db_path, "PRAGMA user_version") == sqliteq.SCHEMA_VERSION
    assert TABLES <= {name for kind, name, _ in schema(db_path) if kind == "table"}


def test_opening_waits_while_another_process_writes_the_new_file(db_path, hold_writer_lock):
    """Another process switching a new file to WAL holds its rollback-mode write lock so.

    Several processes that open a new file at once hit this (seen as apsw.BusyError in about
    one round in a hundred of four processes each opening a new file together).
    """
    hold_writer_lock("0.5")
    with sqliteq.Storage(db_path) as storage:
        assert storage.jobs.counts()["queued"] == 0


OPENERS, ROUNDS = 4, 100


def open_new_files(folder: str, start, done, failed, errors) -> None:
    """Child process: each round, open a new file at the same moment as the other children.

    Stops at the first failure in any child (the flag is read between two barriers, so every
    child stops after the same round).
    """
    failures = []
    for n in range(ROUNDS):
        start.wait(timeout=60)
        try:
            sqliteq.Storage(os.path.join(folder, f"{n}.db")).close()
        except Exception as exc:
            failures.append(f"round {n}: {type(exc).__module__}.{type(exc).__name__}: {exc}")
            failed.set()
        done.wait(timeout=60)
        if failed.is_set():
            break
    errors.put(failures)


def test_processes_opening_new_files_together_all_succeed(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    start, done = ctx.Barrier(OPENERS), ctx.Barrier(OPENERS)
    failed, errors = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=open_new_files, args=(str(tmp_path), start, done, failed, errors))
             for _ in range(OPENERS)]
    for proc in procs:
        proc.start()
    failures = [f for _ in procs for f in errors.get(timeout=120)]
    for proc in procs:
        proc.join(timeout=60)
    assert failures == []
    assert [proc.exitcode for proc in procs] == [0] * OPENERS


# ------------------------------------------------------ transient retries ----

@pytest.fixture
def hold_writer_lock(db_path, child_env):
    """Start a process that holds the file's writer lock; returns once it holds it."""
    procs: list[subprocess.Popen] = []

    def start(release: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLD_WRITER_LOCK, str(db_path), release],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                env=child_env)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "locked"
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def test_lock_held_through_every_retry_raises_transient_error(db_path, hold_writer_lock):
    with sqliteq.Storage(db_path, busy_timeout=0.05) as storage:
        holder = hold_writer_lock("until-told")
        started = time.monotonic()
        with pytest.raises(sqliteq.TransientError):
            storage.jobs.enqueue(EnqueueRequest("k"))
        # Four attempts each waited out the busy timeout, and every jittered back-off (at
        # least half its nominal delay) was slept between them.
        assert time.monotonic() - started >= 4 * 0.05 + sum(sqliteq.TRANSIENT_RETRY_DELAYS) / 2
        holder.communicate("release\n", timeout=30)
        assert sum(storage.jobs.counts().values()) == 0


def test_lock_released_during_the_retries_lets_enqueue_succeed(db_path, hold_writer_lock):
    with sqliteq.Storage(db_path, busy_timeout=0.05) as storage:
        hold_writer_lock("0.3")
        out = storage.jobs.enqueue(EnqueueRequest("k", {"after": "retry"}))
        assert storage.jobs.get(out.job_id).payload == {"after": "retry"}


def test_transient_error_is_a_sqliteq_error():
    assert issubclass(sqliteq.TransientError, sqliteq.SqliteqError)
    assert not issubclass(sqliteq.TransientError, ValueError)


# ------------------------------------------------- writes from many threads ----

def test_a_failing_write_does_not_undo_other_threads_writes(storage):
    """Concurrent writes may share one commit; each still succeeds or fails on its own."""
    class Refused(Exception):
        pass

    def half_then_fail(conn):
        conn.execute("INSERT INTO queues (name) VALUES (?)", (f"half-{threading.get_ident()}",))
        raise Refused

    outcomes: dict[str, list] = {"enqueued": [], "refused": [], "unexpected": []}

    def enqueuer() -> None:
        for n in range(150):
            try:
                outcomes["enqueued"].append(storage.jobs.enqueue(EnqueueRequest("k", n)).job_id)
            except BaseException as exc:
                outcomes["unexpected"].append(exc)

    def failer() -> None:
        for _ in range(150):
            try:
                storage.db.write(half_then_fail)
            except Refused as exc:
                outcomes["refused"].append(exc)
            except BaseException as exc:
                outcomes["unexpected"].append(exc)

    threads = [threading.Thread(target=fn) for fn in (enqueuer, failer) * 4]
    committed_before = storage.db._writes_committed
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes["unexpected"] == []
    # The count of writes that took effect is exact, whoever's commit carried them.
    assert storage.db._writes_committed - committed_before == 600
    assert len(outcomes["refused"]) == 600
    assert len(set(map(id, outcomes["refused"]))) == 600     # each caller got its own error
    assert storage.jobs.counts()["queued"] == len(set(outcomes["enqueued"])) == 600
    assert [q.name for q in storage.queues.list()] == ["default"]


LEADER_CANNOT_CONNECT = r"""
import os, queue, resource, sys, threading, time
import sqliteq

storage = sqliteq.Storage(sys.argv[1])


def serve(inbox, outbox, work):
    storage.jobs.counts()                   # this thread's connection is open from now on
    outbox.put("ready")
    while (item := inbox.get()) is not None:
        try:
            outbox.put(work(item))
        except Exception as exc:
            outbox.put("sqliteq-error" if isinstance(exc, sqliteq.SqliteqError)
                       else f"{type(exc).__name__}: {exc}")


def hold_writer(event):                     # writes queue up behind this one meanwhile
    return storage.db.write(lambda conn: event.wait(10))


def enqueue(_):
    out = storage.jobs.enqueue(sqliteq.EnqueueRequest("k"))
    return "stored" if storage.jobs.get(out.job_id) else "missing"


pipes = {name: (queue.Queue(), queue.Queue()) for name in ("holder", "writer")}
threads = [threading.Thread(target=serve, args=(*pipes["holder"], hold_writer)),
           threading.Thread(target=serve, args=(*pipes["writer"], enqueue))]
for thread in threads:
    thread.start()
assert [pipes[name][1].get(timeout=30) for name in pipes] == ["ready", "ready"]
# From now on a thread's first connection cannot open: no file descriptors are left.
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")), hard))

for trial in range(20):
    release = threading.Event()
    pipes["holder"][0].put(release)
    time.sleep(0.02)
    newcomer = []

    def first_write():
        try:
            storage.jobs.enqueue(sqliteq.EnqueueRequest("k"))
            newcomer.append("stored")
        except sqliteq.SchemaError:
            newcomer.append("cannot-connect")

    fresh = threading.Thread(target=first_write)
    fresh.start()
    time.sleep(0.02)                        # queued first, so it most often leads the batch
    pipes["writer"][0].put(trial)
    time.sleep(0.02)
    release.set()
    fresh.join(30)
    pipes["holder"][1].get(timeout=30)
    print(newcomer[0], pipes["writer"][1].get(timeout=30), flush=True)
for inbox, _ in pipes.values():
    inbox.put(None)
"""


def test_a_thread_that_cannot_connect_does_not_lose_other_threads_writes(db_path, run_python):
    """A write queued behind a thread whose connection fails to open must not vanish."""
    proc = run_python(LEADER_CANNOT_CONNECT, str(db_path))
    assert proc.returncode == 0, proc.stderr
    trials = [line.split(maxsplit=1) for line in proc.stdout.splitlines()]
    assert len(trials) == 20
    assert "cannot-connect" in {newcomer for newcomer, _ in trials}   # the setup bites
    assert {other for _, other in trials} <= {"stored", "sqliteq-error"}
