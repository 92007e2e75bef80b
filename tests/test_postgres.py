"""What the PostgreSQL store adds to the shared behaviour: many hosts on one server, the
server's clock, NOTIFY wake-ups, a bounded pool, lost connections, and its CLI targets.

The rest of the suite, crash tests (SIGKILL, SIGSTOP) included, runs on both stores (see
conftest.py); the tests here are about PostgreSQL only, on the local server, each in a schema
of its own.
"""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from support import (
    PG_URL,
    REPO,
    Target,
    assert_error,
    fresh_schema,
    pg_execute,
    run,
    wait_until,
)

import sqliteq
from sqliteq import EnqueueRequest, InvalidInput

pytestmark = pytest.mark.timeout(240)

# A worker process: `python -c WORKER URL SCHEMA SLOTS`. Handlers: "work" sleeps
# payload["s"] seconds and returns the payload.
WORKER = """
import logging, os, sys, threading, time, sqliteq
logging.basicConfig(level=logging.WARNING)
if os.environ.get("FAKETIME"):  # libfaketime 0.9.10's clock_nanosleep fails (EINVAL) when
    time.sleep = lambda s: threading.Event().wait(s)    # the monotonic clock is left real
url, schema, slots = sys.argv[1], sys.argv[2], int(sys.argv[3])
storage = sqliteq.Storage(url, schema=schema)
rt = sqliteq.Runtime(storage, {"default": slots}, heartbeat_interval=0.25, lease_timeout=1.5,
                     poll_interval=float(sys.argv[4]) if len(sys.argv) > 4 else 0.05)

@rt.handler("work")
def work(ctx, payload):
    time.sleep(payload["s"])
    return payload

rt.run()
storage.close()
"""

# `python -c ENQUEUE_ONE URL SCHEMA` enqueues one "work" job and prints its id.
ENQUEUE_ONE = """
import sys, sqliteq
storage = sqliteq.Storage(sys.argv[1], schema=sys.argv[2])
print(storage.jobs.enqueue(sqliteq.EnqueueRequest("work", {"s": 0})).job_id)
"""


@pytest.fixture
def pg() -> Iterator[Target]:
    with fresh_schema() as schema:
        yield Target(PG_URL, schema)


class Workers:
    """Worker processes on one schema; every one is killed at the end of the test."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.children: list[subprocess.Popen[str]] = []
        # Under faketime, only the wall clock is off, as on a host whose clock is wrong:
        # a faked monotonic clock breaks timed waits inside libc.
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            "FAKETIME_DONT_FAKE_MONOTONIC": "1", "DONT_FAKE_MONOTONIC": "1"}

    def start(self, slots: int = 2, *, prefix: tuple[str, ...] = (), poll: float = 0.05
              ) -> subprocess.Popen[str]:
        child = subprocess.Popen(
            [*prefix, sys.executable, "-c", WORKER, self.target.url, str(self.target.schema),
             str(slots), str(poll)],
            env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            start_new_session=True)     # a group of its own: faketime's child dies with it
        self.children.append(child)
        return child

    def close(self) -> None:
        for child in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            child.wait(timeout=30)


@pytest.fixture
def workers(pg: Target) -> Iterator[Workers]:
    group = Workers(pg)
    try:
        yield group
    finally:
        group.close()


def registered(pg: Target) -> int:
    return pg.sql("SELECT count(*) FROM processes")[0][0]


# ------------------------------------------------------------- the URL ----

def test_a_postgres_url_opens_the_schema_and_creates_its_tables(pg):
    with pg.open() as storage:
        assert storage.path.startswith(PG_URL) and pg.schema in storage.path
        tables = {name for (name,) in pg.sql(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = ?",
            pg.schema)}
        assert {"jobs", "queues", "processes", "cron", "rate_limits", "chores"} <= tables


def test_postgres_and_postgresql_urls_both_work_and_hide_the_password(pg):
    url = PG_URL.replace("postgresql://", "postgres://").replace("postgres@", "postgres:pw@")
    with sqliteq.Storage(url, schema=pg.schema) as storage:   # trust auth ignores the password
        assert "pw" not in storage.path and "***" in storage.path
        assert storage.jobs.enqueue(EnqueueRequest("k")).created


@pytest.mark.parametrize("schema", ["", "Upper", "has space", "x;drop", "1st", 7])
def test_a_schema_that_is_not_a_plain_identifier_is_refused(schema):
    with pytest.raises(InvalidInput, match="schema"):
        sqliteq.Storage(PG_URL, schema=schema)


def test_a_schema_is_refused_for_a_sqlite_file(tmp_path):
    with pytest.raises(InvalidInput, match="schema"):
        sqliteq.Storage(tmp_path / "q.db", schema="x")
    assert not (tmp_path / "q.db").exists()


def test_an_unreachable_server_is_one_clear_error(pg):
    with pytest.raises(sqliteq.StorageError, match="cannot connect to PostgreSQL"):
        sqliteq.Storage("postgresql://postgres@127.0.0.1:1/test", schema=pg.schema,
                        busy_timeout=0.5)


def test_a_password_given_as_a_url_parameter_is_hidden_too(pg):
    with pytest.raises(sqliteq.StorageError) as caught:
        sqliteq.Storage("postgresql://postgres@127.0.0.1:1/test?password=s3cret",
                        schema=pg.schema, busy_timeout=0.5)
    assert "s3cret" not in str(caught.value) and "***" in str(caught.value)
    with sqliteq.Storage(f"{PG_URL}?password=s3cret", schema=pg.schema) as storage:
        assert "s3cret" not in storage.path and "***" in storage.path


def test_busy_timeout_may_be_a_timedelta(pg):
    with pg.open(busy_timeout=timedelta(seconds=2)) as storage:
        assert storage.db.busy_timeout_ms == 2000


def test_a_zero_busy_timeout_gives_up_on_a_held_lock_instead_of_waiting_for_ever(pg):
    import psycopg

    with pg.open(busy_timeout=0) as storage, psycopg.connect(PG_URL) as holder:
        holder.execute(f"LOCK TABLE {pg.schema}.jobs IN ACCESS EXCLUSIVE MODE")
        errors: list[Exception] = []

        def enqueue() -> None:
            try:
                storage.jobs.enqueue(EnqueueRequest("k"))
            except sqliteq.TransientError as exc:
                errors.append(exc)

        thread = threading.Thread(target=enqueue)
        thread.start()
        thread.join(30)
        hung = thread.is_alive()
        holder.rollback()               # (lets a hung enqueue go)
        thread.join(30)
        assert not hung and len(errors) == 1


def test_a_libpq_without_pipeline_mode_still_works(pg, monkeypatch):
    import psycopg

    def no_pipeline(self: Any) -> None:
        raise psycopg.NotSupportedError("libpq 13 has no pipeline mode")

    monkeypatch.setattr(psycopg.Pipeline, "is_supported", classmethod(lambda cls: False))
    monkeypatch.setattr(psycopg.Connection, "pipeline", no_pipeline)
    with pg.open() as storage:
        job_id = storage.jobs.enqueue(EnqueueRequest("k")).job_id
        assert storage.jobs.get(job_id).state == "queued"


@pytest.fixture
def plain_role(pg: Target) -> Iterator[str]:
    """A login role of its own, with no privilege at all to begin with."""
    role = f"r_{uuid.uuid4().hex[:12]}"
    pg_execute(f"CREATE ROLE {role} LOGIN")
    try:
        yield role
    finally:
        pg_execute(f"DROP OWNED BY {role}")     # (its grants)
        pg_execute(f"DROP ROLE {role}")


def test_a_role_that_may_use_the_queue_but_not_create_schemas_opens_it(pg, plain_role):
    pg.open().close()                   # created by its owner
    for grant in (f"GRANT USAGE ON SCHEMA {pg.schema}",
                  f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {pg.schema}",
                  f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA {pg.schema}"):
        pg_execute(f"{grant} TO {plain_role}")
    assert not pg_execute("SELECT has_database_privilege(?, current_database(), 'CREATE')",
                          plain_role)[0][0]
    url = PG_URL.replace("postgres@", f"{plain_role}@")
    with sqliteq.Storage(url, schema=pg.schema) as storage:
        job_id = storage.jobs.enqueue(EnqueueRequest("k")).job_id
        assert storage.jobs.get(job_id).state == "queued"


def test_a_storage_dropped_unclosed_stops_listening_and_lets_its_connections_go(pg):
    storage = pg.open()
    storage.db.data_version()           # starts the listener
    app, listener = storage.db.application_name, f"sqliteq-listen-{pg.schema}"

    def listening() -> bool:
        return any(thread.name == listener for thread in threading.enumerate())

    wait_until(listening, 10, "the listener to start")
    del storage
    gc.collect()
    wait_until(lambda: not listening(), 10, "the listener to end")
    wait_until(lambda: not pg_execute("SELECT 1 FROM pg_stat_activity WHERE "
                                      "application_name = ?", app), 10,
               "its connections to close")


def test_many_hosts_opening_a_new_schema_at_once_migrate_it_once(pg, run_python):
    code = ("import sys, sqliteq\n"
            "sqliteq.Storage(sys.argv[1], schema=sys.argv[2]).close()\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, pg.url, str(pg.schema)],
                              env={**os.environ, "PYTHONPATH": str(REPO)},
                              stderr=subprocess.PIPE, text=True) for _ in range(8)]
    errors = [proc.communicate(timeout=60)[1] for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * 8, errors
    assert pg.sql("SELECT version FROM sqliteq_version") == [(len(sqliteq._PG_MIGRATIONS),)]
    assert pg.sql("SELECT indexname FROM pg_indexes WHERE indexname = 'jobs_failed'"
                  " AND schemaname = current_schema()")


def test_a_schema_of_an_older_step_moves_forward_keeping_its_jobs(pg):
    """A schema as the first PostgreSQL release wrote it (step 1: no time limit or progress
    columns, no metrics tables, no dependencies) gains them when opened, its jobs intact."""
    with pg.open() as storage:
        job_id = storage.jobs.enqueue(EnqueueRequest("k", {"n": 1})).job_id
    pg.sql("DROP TABLE job_deps")                                              # step 5
    pg.sql("ALTER TABLE jobs DROP COLUMN waiting_on, DROP COLUMN allow_parent_failure,"
           " DROP COLUMN has_parents")
    pg.sql("ALTER TABLE jobs DROP COLUMN timeout_ms, DROP COLUMN progress")    # step 2
    pg.sql("DROP TABLE metrics, metrics_totals")                               # step 3
    pg.sql("DROP INDEX jobs_failed")                                           # step 4
    pg.sql("UPDATE sqliteq_version SET version = 1")
    with pg.open() as storage:
        job = storage.jobs.get(job_id)
        assert (job.payload, job.timeout, job.progress) == ({"n": 1}, None, None)
        assert storage.jobs.get(storage.jobs.enqueue(
            EnqueueRequest("k", timeout=5)).job_id).timeout == 5.0
        child = storage.jobs.enqueue(EnqueueRequest("k", depends_on=[job_id])).job_id
        assert storage.jobs.get(child).state == "waiting"
    assert pg.sql("SELECT version FROM sqliteq_version") == [(len(sqliteq._PG_MIGRATIONS),)]


# --------------------------------------------------------- connections ----

def test_connections_are_pooled_per_storage_not_opened_per_thread(pg):
    with pg.open(pool_size=3) as storage:
        # Every clock reading re-measures the server's clock, most inside an enqueue's
        # transaction: none may need a second connection while holding one.
        storage.db.CLOCK_RESYNC = 0.0
        app = f"sqliteq-{pg.schema}"
        threads = [threading.Thread(target=lambda: [storage.jobs.enqueue(EnqueueRequest("k"))
                                                    for _ in range(50)]) for _ in range(12)]
        for thread in threads:
            thread.start()
        peak = 0
        while any(thread.is_alive() for thread in threads):
            peak = max(peak, pg_execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = ?", app)[0][0])
        for thread in threads:
            thread.join()
        assert storage.jobs.counts()["queued"] == 600
        assert 1 <= peak <= 3


def test_every_change_to_a_rate_limit_waits_for_the_bucket_lock(pg):
    """On PostgreSQL writes run side by side: a drain or a reconfigure that did not wait for
    a take holding the bucket lock would be overwritten by that take's commit."""
    import psycopg

    with pg.open() as storage:
        storage.rate_limits.configure("api", 10, 0.001)
        for change in (lambda: storage.rate_limits.drain("api"),
                       lambda: storage.rate_limits.configure("api", 5, 0.001)):
            with psycopg.connect(PG_URL) as holder:     # a transaction that holds the lock
                holder.execute("SELECT pg_advisory_xact_lock(hashtext(%s))",
                               (f"sqliteq:{pg.schema}:rate_limits",))
                done = threading.Event()

                def run(change: Any = change, done: threading.Event = done) -> None:
                    change()
                    done.set()

                thread = threading.Thread(target=run)
                thread.start()
                assert not done.wait(1.0), "the change did not wait for the bucket lock"
            thread.join(30)                             # the holder committed: it goes on
            assert done.is_set()
        assert pg.sql("SELECT capacity, tokens < 1 FROM rate_limits") == [(5.0, True)]


def terminate_backends(app: str) -> int:
    return len(pg_execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                          " WHERE application_name = ?", app))


def test_a_runtime_survives_its_connections_being_dropped_and_loses_no_job(pg):
    with pg.open() as storage:
        storage.queues.set_backoff("default", 0.01, 0.05)
        rt = sqliteq.Runtime(storage, {"default": 4}, poll_interval=0.02,
                             heartbeat_interval=0.2, lease_timeout=5)
        runs: dict[str, int] = {}
        lock = threading.Lock()

        @rt.handler("work")
        def work(ctx, payload):
            with lock:
                runs[ctx.job_id] = runs.get(ctx.job_id, 0) + 1
            time.sleep(0.002)

        ids = [o.job_id for o in storage.jobs.enqueue_bulk(
            [EnqueueRequest("work", i) for i in range(2000)])]
        dropped = 0
        with rt:
            deadline = time.monotonic() + 120
            while storage.jobs.counts()["done"] < len(ids):
                assert time.monotonic() < deadline, storage.jobs.counts()
                dropped += terminate_backends(f"sqliteq-{pg.schema}")
                time.sleep(0.05)
        assert dropped >= 5, "the test dropped too few connections to prove anything"
        assert rt.error is None
        assert storage.jobs.counts() == {"waiting": 0, "queued": 0, "running": 0, "done": 2000,
                                         "failed": 0, "cancelled": 0}
        assert set(runs) == set(ids)


class CuttingProxy:
    """A TCP proxy to the server that can lose a reply: once told `cut_after(marker)`, the
    first client message holding `marker` reaches the server, and its reply is dropped with
    the connection (as a network failure would, after the server committed)."""

    def __init__(self) -> None:
        self.server = urllib.parse.urlsplit(PG_URL)
        self.listener = socket.create_server(("127.0.0.1", 0))
        host = f"{self.server.username}@" if self.server.username else ""
        self.url = urllib.parse.urlunsplit(self.server._replace(
            netloc=f"{host}127.0.0.1:{self.listener.getsockname()[1]}"))
        self.marker: bytes | None = None
        self.cuts = 0
        self.lock = threading.Lock()
        threading.Thread(target=self.accept, daemon=True).start()

    def cut_after(self, marker: bytes) -> None:
        with self.lock:
            self.marker = marker

    def accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self.listener.accept()
                upstream = socket.create_connection((self.server.hostname,
                                                     self.server.port or 5432))
                armed = threading.Event()
                threading.Thread(target=self.pump, args=(client, upstream, armed, True),
                                 daemon=True).start()
                threading.Thread(target=self.pump, args=(upstream, client, armed, False),
                                 daemon=True).start()

    def pump(self, source: socket.socket, sink: socket.socket, armed: threading.Event,
             from_client: bool) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if not from_client and armed.is_set():
                    # The reply to the marked message: it never arrives.
                    with self.lock:
                        self.cuts += 1
                    break
                with self.lock:
                    if from_client and self.marker is not None and self.marker in data:
                        self.marker = None
                        armed.set()
                sink.sendall(data)
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def proxy() -> Iterator[CuttingProxy]:
    cutting = CuttingProxy()
    yield cutting
    cutting.close()


def test_a_single_enqueue_whose_reply_is_lost_is_retried_and_stored_once(pg, proxy):
    with sqliteq.Storage(proxy.url, schema=pg.schema) as storage:
        storage.jobs.enqueue(EnqueueRequest("work", 0))     # (its queue is now known)
        proxy.cut_after(b"ON CONFLICT (id) DO NOTHING")
        job_id = storage.jobs.enqueue(EnqueueRequest("work", 1)).job_id
        assert proxy.cuts == 1
        assert pg.sql("SELECT payload FROM jobs WHERE id = ?", job_id) == [("1",)]
        assert storage.jobs.counts()["queued"] == 2


def test_a_transaction_whose_commit_reply_is_lost_says_it_may_have_taken_effect(pg, proxy):
    with sqliteq.Storage(proxy.url, schema=pg.schema) as storage:
        proxy.cut_after(b"COMMIT")
        with pytest.raises(sqliteq.TransientError, match="may or may not have taken effect"):
            storage.jobs.enqueue_bulk([EnqueueRequest("work", 0), EnqueueRequest("work", 1)])
        assert proxy.cuts == 1
        assert storage.jobs.counts()["queued"] == 2     # it did, this time


# ----------------------------------------- races only PostgreSQL has ----
# Writes run side by side here, and each statement sees what committed before it began.

def test_an_enqueue_whose_unique_key_frees_up_meanwhile_inserts_the_job(pg, monkeypatch):
    """The job holding the key finishes between the insert that found it and the read of
    its id: the enqueue then inserts (instead of naming a job that no longer holds it)."""
    with pg.open() as storage:
        holder = storage.jobs.enqueue(EnqueueRequest("k", unique_key="K")).job_id
        real, finished = sqliteq._PgTransaction.execute, []

        def execute(self: Any, statement: str, params: Any = ()) -> Any:
            cursor = real(self, statement, params)
            if statement == sqliteq._JobStore.INSERT_UNIQUE and not finished:
                finished.append(pg.sql("UPDATE jobs SET state = 'done', finished_at = "
                                       "created_at WHERE id = ?", holder))
            return cursor

        monkeypatch.setattr(sqliteq._PgTransaction, "execute", execute)
        outcome = storage.jobs.enqueue(EnqueueRequest("k", unique_key="K"))
        assert finished and outcome.created and outcome.job_id != holder
        assert storage.jobs.get(outcome.job_id).state == "queued"


def test_retry_failed_leaves_failed_a_key_that_an_enqueue_takes_while_it_runs(pg):
    import psycopg

    key = 700_000 + uuid.uuid4().int % 100_000      # an advisory lock of this test's
    with pg.open() as storage:
        failed = storage.jobs.enqueue(EnqueueRequest("k", unique_key="K")).job_id
        pg.sql("UPDATE jobs SET state = 'failed', finished_at = created_at WHERE id = ?",
               failed)
        # The first requeue of a failed job waits for the lock this test holds: its
        # statement has read the table by then, and found the key free.
        pg.sql("CREATE SEQUENCE first_retry")
        pg.sql(f"""CREATE FUNCTION {pg.schema}.hold_first_retry() RETURNS trigger
                   LANGUAGE plpgsql AS $$ BEGIN
                       IF nextval('{pg.schema}.first_retry') = 1 THEN
                           PERFORM pg_advisory_xact_lock({key});
                       END IF;
                       RETURN NEW;
                   END $$""")
        pg.sql(f"CREATE TRIGGER hold_first_retry BEFORE UPDATE ON jobs FOR EACH ROW WHEN "
               f"(OLD.state = 'failed' AND NEW.state = 'queued') "
               f"EXECUTE FUNCTION {pg.schema}.hold_first_retry()")
        outcome: list[Any] = []

        def retry_failed() -> None:
            try:
                outcome.append(storage.jobs.retry_failed())
            except Exception as exc:
                outcome.append(exc)

        with psycopg.connect(PG_URL, autocommit=True) as gate:
            gate.execute("SELECT pg_advisory_lock(%s)", (key,))
            thread = threading.Thread(target=retry_failed)
            thread.start()
            wait_until(lambda: pg_execute("SELECT 1 FROM pg_locks WHERE locktype = 'advisory'"
                                          " AND NOT granted AND objid = ?", key),
                       30, "the retry to wait in its trigger")
            taken = storage.jobs.enqueue(EnqueueRequest("k", unique_key="K"))
            gate.execute("SELECT pg_advisory_unlock(%s)", (key,))
            thread.join(30)
        assert taken.created and outcome == [0]
        assert storage.jobs.get(failed).state == "failed"
        assert storage.jobs.get(taken.job_id).state == "queued"


def test_runtimes_take_limited_queues_locks_in_name_order_so_none_deadlocks(pg):
    """A runtime that claims from limited queues b and a takes a's lock first: one that
    took b's first could wait for a runtime holding a's and waiting for b's."""
    import psycopg

    with pg.open(busy_timeout=60) as storage:
        for queue in ("b", "a"):
            storage.queues.set_limit(queue, 1)
            storage.jobs.enqueue(EnqueueRequest("k", queue_name=queue))
        lock = "sqliteq:{}:limit:{}".format
        with psycopg.connect(PG_URL, autocommit=True) as other:
            other.execute("SELECT pg_advisory_lock(hashtext(%s))", (lock(pg.schema, "b"),))
            rt = sqliteq.Runtime(storage, {"b": 1, "a": 1}, poll_interval=0.02)
            rt.register("k", lambda ctx, payload: None)
            rt.start()
            try:
                wait_until(lambda: pg_execute(
                    "SELECT 1 FROM pg_locks l JOIN pg_stat_activity a USING (pid) WHERE "
                    "l.locktype = 'advisory' AND NOT l.granted AND a.application_name = ?",
                    storage.db.application_name), 30, "the runtime to wait for b's lock")
                assert not other.execute("SELECT pg_try_advisory_lock(hashtext(%s))",
                                         (lock(pg.schema, "a"),)).fetchone()[0]
                other.execute("SELECT pg_advisory_unlock(hashtext(%s))",
                              (lock(pg.schema, "b"),))
                wait_until(lambda: storage.jobs.counts()["done"] == 2, 30, "both jobs done")
            finally:
                rt.stop()


# ------------------------------------------------------ other processes ----

def test_an_enqueue_wakes_a_worker_on_another_host_by_notify_not_by_polling(pg, workers):
    with pg.open() as storage:
        workers.start(1, poll=30.0)             # its poll alone would take 30 s
        wait_until(lambda: registered(pg) == 1, 30, "the worker to register")
        time.sleep(0.5)                         # its dispatcher is asleep by now
        started = time.monotonic()
        job_id = storage.jobs.enqueue(EnqueueRequest("work", {"s": 0})).job_id
        assert storage.jobs.wait(job_id, timeout=20).state == "done"
        assert time.monotonic() - started < 10


def test_heartbeats_of_idle_hosts_send_no_notify_but_a_rescue_does(pg, workers):
    """A NOTIFY wakes every host's dispatcher: an idle cluster's beats must not send one."""
    import psycopg

    pg.open().close()                           # the tables
    with psycopg.connect(PG_URL, autocommit=True) as listener:
        listener.execute(f"LISTEN sqliteq_{pg.schema}")
        workers.start(1)                        # beats every 0.25 s
        wait_until(lambda: registered(pg) == 1, 30, "the worker to register")

        def beats() -> int:
            return pg.sql("SELECT heartbeat_at FROM processes")[0][0]

        first = beats()                         # (its start-up writes notify, and may still)
        wait_until(lambda: beats() > first, 30, "a beat")
        list(listener.notifies(timeout=0.3))
        seen, heard = beats(), 0
        for _ in range(6):
            wait_until(lambda last=seen: beats() > last, 30, "the next beat")
            seen = beats()
            heard += len(list(listener.notifies(timeout=0.05)))
        assert heard == 0
        # A beat that rescues a job does (hosts serving its queue may claim it; this worker
        # serves only "default", so nothing else writes).
        pg.sql("INSERT INTO processes (host_id, hostname, pid, queues, started_at,"
               " heartbeat_at, progress_at) VALUES ('gone', 'h', 1, '{}', 0, 0, 0)")
        pg.sql("INSERT INTO jobs (id, kind, queue, payload, state, run_at, attempt,"
               " created_at, host, lease) VALUES ('0LOST', 'work', 'elsewhere', '{}',"
               " 'running', 0, 1, 0, 'gone', 1)")
        wait_until(lambda: pg.sql("SELECT state FROM jobs")[0][0] == "queued", 30,
                   "the job to be rescued")
        assert list(listener.notifies(timeout=5, stop_after=1))


def test_a_worker_whose_clock_is_ten_minutes_off_neither_loses_nor_steals_jobs(pg, workers):
    if shutil.which("faketime") is None:
        pytest.skip("needs libfaketime (apt-get install faketime; .ci/run installs it)")
    with pg.open() as storage:
        slow = [storage.jobs.enqueue(EnqueueRequest("work", {"s": 4})).job_id
                for _ in range(4)]
        workers.start(2)
        workers.start(2, prefix=("faketime", "-f", "+10m"))
        wait_until(lambda: storage.jobs.counts()["running"] == 4, 30, "both to run two jobs")
        hosts = {row[0] for row in pg.sql("SELECT DISTINCT host FROM jobs")}
        assert len(hosts) == 2, "each worker holds jobs"
        for job_id in slow:
            job = storage.jobs.wait(job_id, timeout=60)
            assert (job.state, job.attempt, job.errors) == ("done", 1, []), repr(job.errors)
        assert all(proc.poll() is None for proc in workers.children)


def test_hosts_ten_minutes_apart_agree_on_when_a_job_is_due(pg, workers):
    if shutil.which("faketime") is None:
        pytest.skip("needs libfaketime (apt-get install faketime; .ci/run installs it)")
    ahead = ("faketime", "-f", "+10m")
    with pg.open() as storage:
        # Enqueued "now" by a host ten minutes ahead: due now, not in ten minutes.
        child = subprocess.run(
            [*ahead, sys.executable, "-c", ENQUEUE_ONE, pg.url, str(pg.schema)],
            env=workers.env, capture_output=True, text=True, timeout=60, check=True)
        right = workers.start(1)
        assert storage.jobs.wait(child.stdout.strip(), timeout=30).state == "done"
        right.kill()
        right.wait()
        # Scheduled two minutes out by this host: not started early by the host ahead.
        later = storage.jobs.enqueue(EnqueueRequest("work", {"s": 0},
                                                    run_at=time.time() + 120)).job_id
        workers.start(1, prefix=ahead)
        due = storage.jobs.enqueue(EnqueueRequest("work", {"s": 0})).job_id
        assert storage.jobs.wait(due, timeout=30).state == "done"
        time.sleep(0.5)                         # a few more of its rounds
        job = storage.jobs.get(later)
        assert (job.state, job.attempt, job.started_at) == ("queued", 0, None)


# ------------------------------------------------------------- the CLI ----

# (Every command on both stores: tests/test_cli.py.)

def test_the_cli_names_a_bad_postgres_target_in_one_line(pg, tmp_path):
    assert_error(run("--db", "postgresql://postgres@127.0.0.1:1/test", "status"),
                 "cannot connect to PostgreSQL", code=1)
    assert_error(run("--db", pg.url, "--schema", "Bad Name", "status"), "schema")
    assert_error(run("--db", pg.url, "--schema", str(pg.schema), "status"),
                 "no sqliteq queue at", str(pg.schema))
    assert not pg.sql("SELECT 1 FROM pg_namespace WHERE nspname = ?", pg.schema)
    secret = "postgresql://postgres@127.0.0.1:1/test?password=s3cret"
    assert "s3cret" not in assert_error(run("--db", secret, "status"), code=1)
    assert_error(run("--db", str(tmp_path / "q.db"), "--schema", "x", "status"), "--schema")
