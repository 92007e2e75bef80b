"""End-to-end tests of the `sqliteq` command line.

Every test drives the REAL installed console script (or `python sqliteq.py`) in a subprocess,
against a real store, and checks what a user sees: exit codes, stdout (JSON parsed with
`json.loads`), one-line errors on stderr, and what ended up in the store (read back on a
connection of its own, or byte for byte). Tests that take `db` run on both stores (a file
under `tmp_path`, a PostgreSQL schema); those about files run on SQLite.

The worker tests run `sqliteq worker tests.cli_app:make_runtime` with cwd = the repository
root, so the app module in tests/cli_app.py is importable.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from zoneinfo import ZoneInfo

import apsw
import pytest
from support import (
    PG_URL,
    REPO,
    Target,
    assert_error,
    clean_env,
    describe,
    fresh_schema,
    ok,
    pg_execute,
    run,
    script,
)

import sqliteq

APP = "tests.cli_app:make_runtime"

COMMANDS = ("enqueue", "enqueue-bulk", "worker", "status", "jobs", "job", "retry", "cancel",
            "pause", "resume", "limit", "purge", "cron", "demo", "bench")
JOB_KEYS = {"id", "kind", "queue", "state", "priority", "attempt", "max_attempts", "unique_key",
            "run_at", "created_at", "started_at", "finished_at", "worker", "host",
            "cancel_requested", "timeout", "progress", "last_error"}
JOB_FULL_KEYS = JOB_KEYS | {"payload", "result", "errors", "parents", "waiting_on", "children"}
QUEUE_KEYS = {"name", "ready", "scheduled", "running", "done", "failed", "cancelled", "paused",
              "limit", "jobs_per_minute", "oldest_ready_age_seconds"}
PROCESS_KEYS = {"host_id", "hostname", "pid", "queues", "started_at", "heartbeat_at"}
CRON_KEYS = {"name", "expression", "timezone", "kind", "next_fire_at", "enabled", "last_error"}
STATUS_HEADERS = ("QUEUE", "READY", "SCHEDULED", "RUNNING", "DONE", "FAILED", "CANCELLED",
                  "PAUSED", "LIMIT", "JOBS/MIN", "OLDEST READY")


# ------------------------------------------------------------------ helpers ----

def ok_json(*args: str, **kwargs: Any) -> Any:
    return json.loads(ok(*args, "--json", **kwargs))


def enqueue(db: Path | Target, *args: str) -> str:
    """`sqliteq enqueue ARGS` and the job id it printed (its only stdout line)."""
    lines = ok("enqueue", *args, db=db).splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def snapshot(db: Path | Target) -> dict[str, Any]:
    """Every table's rows (and in a file, the schema and the user_version)."""
    if isinstance(db, Target) and db.postgres:
        tables = db.sql("SELECT table_name FROM information_schema.tables WHERE "
                        "table_schema = ? ORDER BY 1", db.schema)
        return {name: db.sql(f"SELECT * FROM {name} ORDER BY 1") for (name,) in tables}
    conn = apsw.Connection(str(db.url if isinstance(db, Target) else db))
    try:
        conn.setbusytimeout(10_000)
        schema = conn.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name"
                              ).fetchall()
        data: dict[str, Any] = {"schema": schema,
                                "user_version": conn.execute("PRAGMA user_version").fetchall()}
        for kind, name, _sql in schema:
            if kind == "table":
                data[name] = conn.execute(f'SELECT * FROM "{name}" ORDER BY 1').fetchall()
        return data
    finally:
        conn.close()


def parse_iso(text: str) -> datetime:
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    assert moment.tzinfo is not None, text
    return moment


def queue_stats(status: dict[str, Any], name: str) -> dict[str, Any]:
    found = [q for q in status["queues"] if q["name"] == name]
    assert len(found) == 1, status
    return found[0]


def wait_for(condition: Callable[[], Any], timeout: float, what: str,
             proc: subprocess.Popen[str] | None = None) -> Any:
    """Poll until `condition()` is truthy; fail with the worker's output otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"worker exited ({proc.returncode}) before {what}:\n{out}\n{err}")
        if time.monotonic() > deadline:
            detail = ""
            if proc is not None:
                proc.kill()
                out, err = proc.communicate()
                detail = f"\nworker output:\n{out}\n{err}"
            pytest.fail(f"timed out after {timeout} s waiting for {what}{detail}")
        time.sleep(0.1)


def start_worker(db: Target | None, *args: str, env: dict[str, str] | None = None,
                 command: list[str] | None = None, cwd: Path = REPO) -> subprocess.Popen[str]:
    if command is None:
        command = [script(), *(db.options() if db is not None else []), "worker", *args]
    return subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=clean_env() if env is None else env)


def stop_worker(proc: subprocess.Popen[str], sig: int = signal.SIGTERM
                ) -> tuple[int, str, str, float]:
    """Signal the worker; (exit code, stdout, stderr, seconds it took to exit)."""
    started = time.monotonic()
    proc.send_signal(sig)
    try:
        out, err = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"worker did not exit within 15 s of signal {sig}:\n{out}\n{err}")
    return proc.returncode, out, err, time.monotonic() - started


def kill_if_running(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def stderr_once(proc: subprocess.Popen[str], db: Target, job_id: str, state: str = "done"
                ) -> str:
    """Wait for the worker to bring the job to `state`, stop it (it must exit 0); its
    stderr."""
    try:
        wait_for(lambda: db.sql("SELECT state FROM jobs WHERE id = ?", job_id)[0][0]
                 == state, 15, f"the job to be {state}", proc)
        code, _, err, _ = stop_worker(proc)
    finally:
        kill_if_running(proc)
    assert code == 0, err
    return err


def result_once_done(proc: subprocess.Popen[str], db: Target, job_id: str) -> Any:
    """Wait for the worker to finish the job and stop it; the job's result."""
    stderr_once(proc, db, job_id)
    return ok_json("job", job_id, db=db)["result"]


def copy_store(source: Target, tmp_path: Path, schema: str) -> Target:
    """A copy of the store: the file beside `tmp_path`, or the PostgreSQL schema `schema`."""
    if not source.postgres:
        target = tmp_path / "copy.db"
        for suffix in ("", "-wal"):
            if Path(f"{source.url}{suffix}").exists():
                shutil.copyfile(f"{source.url}{suffix}", f"{target}{suffix}")
        return Target(str(target), None)
    pg_execute(f"CREATE SCHEMA {schema}")
    for (table,) in source.sql("SELECT table_name FROM information_schema.tables WHERE "
                               "table_schema = ?", source.schema):
        pg_execute(f"CREATE TABLE {schema}.{table} (LIKE {source.schema}.{table} INCLUDING ALL)")
        pg_execute(f"INSERT INTO {schema}.{table} SELECT * FROM {source.schema}.{table}")
    return Target(PG_URL, schema)


# ----------------------------------------------------------------- fixtures ----

@pytest.fixture
def db(target: Target) -> Target:
    return target


@pytest.fixture
def seeded(target: Target) -> SimpleNamespace:
    """A store with queue "default" holding one queued job, made through the library."""
    with target.open() as storage:
        queued = storage.jobs.enqueue(sqliteq.EnqueueRequest("k", {"n": 1})).job_id
    return SimpleNamespace(db=target, queued=queued)


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def worked_store(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[Target]:
    if request.param == "sqlite":
        yield Target(str(tmp_path_factory.mktemp("worked") / "w.db"), None)
        return
    with fresh_schema() as schema:
        yield Target(PG_URL, schema)


@pytest.fixture
def scratch_schema() -> Iterator[str]:
    """A PostgreSQL schema name for the test's copy (dropped afterwards)."""
    with fresh_schema() as schema:
        yield schema


@pytest.fixture(scope="module")
def worked(worked_store: Target) -> Iterator[SimpleNamespace]:
    """One real worker run, shared by the read-only checks below (tests that change the
    store work on a copy).

    Jobs: three `add` (default), one `boom` with --max-attempts 1 in default and one in
    "other" (both fail with a traceback), one `hold` that keeps running until `sqliteq cancel`
    stops it. The worker serves default=2,other=1 with -v; `status --json` is captured while
    it runs, then it gets SIGTERM.
    """
    db = worked_store
    adds = [enqueue(db, "add", json.dumps({"a": n, "b": 10})) for n in range(3)]
    boom = enqueue(db, "boom", '{"n": 1}', "--max-attempts", "1")
    boom_other = enqueue(db, "boom", '{"n": 2}', "--queue", "other", "--max-attempts", "1")
    hold = enqueue(db, "hold")
    proc = start_worker(db, APP, "--queues", "default=2,other=1", "-v")
    try:
        def settled() -> dict[str, Any] | None:
            status = ok_json("status", db=db)
            default, other = queue_stats(status, "default"), queue_stats(status, "other")
            if (len(status["processes"]) == 1 and default["done"] == 3
                    and default["failed"] == 1 and default["running"] == 1
                    and other["failed"] == 1):
                return status
            return None

        during = wait_for(settled, 20, "the worker to run the jobs", proc)
        cancel_out = ok("cancel", hold, db=db)
        wait_for(lambda: db.sql("SELECT state FROM jobs WHERE id = ?", hold)[0][0]
                 == "cancelled", 10, "the running job to be cancelled", proc)
        code, out, err, stop_seconds = stop_worker(proc)
    finally:
        kill_if_running(proc)
    yield SimpleNamespace(db=db, adds=adds, boom=boom, boom_other=boom_other, hold=hold,
                          pid=proc.pid, during=during, cancel_out=cancel_out, code=code,
                          stdout=out, stderr=err, stop_seconds=stop_seconds,
                          after=ok_json("status", db=db))


# ------------------------------------------------------------------- --help ----

def test_top_level_help_lists_every_command() -> None:
    out = ok("--help")
    assert "Example" in out
    for command in COMMANDS:
        assert command in out


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example(command: str) -> None:
    out = ok(command, "--help")
    assert out.startswith(f"Usage: sqliteq {command}")
    assert "Example" in out
    example = out.split("Example", 1)[1]
    assert "sqliteq" in example and command in example


# ------------------------------------------------------------------ enqueue ----

def test_enqueue_prints_the_id_and_every_option_reaches_the_job(db: Target) -> None:
    job_id = enqueue(db, "email_send", '{"to": "ada@example.com"}', "--queue", "email",
                     "--priority", "7", "--delay", "30s", "--unique-key", "welcome-ada",
                     "--max-attempts", "3")
    job = ok_json("job", job_id, db=db)
    assert set(job) == JOB_FULL_KEYS
    assert job["id"] == job_id
    assert (job["kind"], job["queue"], job["state"]) == ("email_send", "email", "queued")
    assert (job["priority"], job["attempt"], job["max_attempts"]) == (7, 0, 3)
    assert job["unique_key"] == "welcome-ada"
    assert job["payload"] == {"to": "ada@example.com"}
    assert (job["result"], job["errors"], job["last_error"]) == (None, [], None)
    assert job["started_at"] is job["finished_at"] is job["worker"] is job["host"] is None
    assert job["cancel_requested"] is False
    delay = (parse_iso(job["run_at"]) - parse_iso(job["created_at"])).total_seconds()
    assert 29 <= delay <= 31

    # --at with an offset is stored in UTC; no payload means null; negative priority is fine.
    at_id = enqueue(db, "report", "--at", "2030-01-01T10:30:00+01:00", "--priority", "-5")
    at_job = ok_json("job", at_id, db=db)
    assert at_job["run_at"] == "2030-01-01T09:30:00.000Z"
    assert (at_job["payload"], at_job["priority"], at_job["queue"]) == (None, -5, "default")
    assert at_job["max_attempts"] == 5 and at_job["unique_key"] is None
    z_job = ok_json("job", enqueue(db, "report", "--at", "2031-06-01T00:00:00Z"), db=db)
    assert z_job["run_at"] == "2031-06-01T00:00:00.000Z"


def test_enqueue_with_a_held_unique_key_says_deduplicated(db: Target) -> None:
    first = enqueue(db, "sync", "--unique-key", "sync-42")
    again = run("enqueue", "sync", '{"other": true}', "--unique-key", "sync-42", db=db)
    assert again.returncode == 0, describe(again)
    assert again.stdout.strip() == first
    assert "deduplicated" in again.stderr and "sync-42" in again.stderr
    as_json = ok_json("enqueue", "sync", "--unique-key", "sync-42", db=db)
    assert as_json == {"job_id": first, "created": False}
    fresh = ok_json("enqueue", "sync", "--unique-key", "sync-43", db=db)
    assert set(fresh) == {"job_id", "created"} and fresh["created"] is True
    assert fresh["job_id"] != first
    assert db.sql("SELECT count(*) FROM jobs")[0][0] == 2
    # The first job kept its own payload.
    assert ok_json("job", first, db=db)["payload"] is None


# ------------------------------------------------------------- enqueue-bulk ----

def test_enqueue_bulk_from_a_file(db: Target, tmp_path: Path) -> None:
    rows = [
        {"kind": "resize", "payload": {"n": 1}},
        {"kind": "resize", "payload": {"n": 2}, "queue": "images", "priority": 3},
        {"kind": "mail", "delay": "1h", "unique_key": "mail-1", "max_attempts": 2},
        {"kind": "mail", "unique_key": "mail-1"},                      # deduplicated
        {"kind": "report", "run_at": "2030-01-01T00:00:00Z", "payload": [1, "two"]},
    ]
    source = tmp_path / "jobs.jsonl"
    lines = [json.dumps(row) for row in rows]
    source.write_text("\n".join([*lines[:2], "", *lines[2:]]) + "\n")   # a blank line too
    out = ok_json("enqueue-bulk", str(source), db=db)
    assert set(out) == {"created", "deduplicated", "job_ids"}
    assert (out["created"], out["deduplicated"]) == (4, 1)
    ids = out["job_ids"]
    assert len(ids) == 5 and len(set(ids)) == 4 and ids[2] == ids[3]

    listed = {job["id"]: job for job in ok_json("jobs", "--limit", "100", db=db)}
    assert set(listed) == set(ids)
    jobs = [listed[job_id] for job_id in ids]
    assert [job["kind"] for job in jobs] == ["resize", "resize", "mail", "mail", "report"]
    assert jobs[0]["queue"] == "default" and jobs[0]["unique_key"] is None
    assert ok_json("job", ids[0], db=db)["payload"] == {"n": 1}
    assert (jobs[1]["queue"], jobs[1]["priority"]) == ("images", 3)
    assert (jobs[2]["unique_key"], jobs[2]["max_attempts"]) == ("mail-1", 2)
    delay = (parse_iso(jobs[2]["run_at"]) - parse_iso(jobs[2]["created_at"])).total_seconds()
    assert 3590 <= delay <= 3610
    assert jobs[4]["run_at"] == "2030-01-01T00:00:00.000Z"
    assert ok_json("job", ids[4], db=db)["payload"] == [1, "two"]


def test_enqueue_bulk_from_stdin(db: Target) -> None:
    text = "".join(json.dumps({"kind": "ping", "payload": {"n": n}}) + "\n" for n in range(25))
    out = ok("enqueue-bulk", "-", db=db, stdin=text)
    assert out.strip() == "enqueued 25 job(s), 0 deduplicated"
    jobs = ok_json("jobs", "--limit", "100", db=db)
    assert len(jobs) == 25 and {job["kind"] for job in jobs} == {"ping"}
    payloads = {json.loads(payload)["n"] for (payload,) in db.sql("SELECT payload FROM jobs")}
    assert payloads == set(range(25))
    assert ok_json("job", jobs[0]["id"], db=db)["payload"] in [{"n": n} for n in range(25)]


GOOD_LINE = json.dumps({"kind": "ok", "payload": {"n": 1}})
BAD_THIRD_LINES = {
    "invalid-json": ('{"kind": "broken", ', ()),
    "unknown-field": (json.dumps({"kind": "x", "colour": "red"}), ("colour",)),
    "bad-kind": (json.dumps({"kind": ""}), ("kind",)),
    "kind-not-a-string": (json.dumps({"kind": 5}), ("kind",)),
    "bad-delay": (json.dumps({"kind": "x", "delay": "5x"}), ("5x",)),
    "not-an-object": ("[1, 2]", ()),
    "payload-too-deep": (json.dumps({"kind": "x", "payload": [[[[]]]]}).replace(
        "[[[[]]]]", "[" * 500 + "]" * 500), ("deep", "at most 100")),
    "line-too-deep": ("[" * 9000 + "]" * 9000, ("deep", "at most 100")),
}


@pytest.mark.parametrize("case, from_stdin", [
    *((case, False) for case in sorted(BAD_THIRD_LINES)),
    ("invalid-json", True), ("unknown-field", True)])
def test_enqueue_bulk_with_a_bad_line_writes_nothing(case: str, from_stdin: bool,
                                                     db: Target, tmp_path: Path) -> None:
    db.open().close()                         # an existing, empty database
    before = snapshot(db)
    bad, names = BAD_THIRD_LINES[case]
    text = "\n".join([GOOD_LINE, GOOD_LINE, bad, GOOD_LINE]) + "\n"
    source = tmp_path / "bad.jsonl"
    source.write_text(text)
    result = (run("enqueue-bulk", "-", db=db, stdin=text) if from_stdin
              else run("enqueue-bulk", str(source), db=db))
    assert result.returncode == 2, describe(result)
    assert "Traceback" not in result.stdout + result.stderr, describe(result)
    assert result.stdout == ""
    error = result.stderr.splitlines()[-1]
    assert error.startswith("sqliteq: error: line 3"), describe(result)
    for name in names:
        assert name in error, describe(result)
    assert db.sql("SELECT count(*) FROM jobs")[0][0] == 0
    assert snapshot(db) == before


def test_enqueue_bulk_with_a_bad_line_into_a_new_path_creates_no_file(tmp_path: Path) -> None:
    db = tmp_path / "new.db"
    result = run("enqueue-bulk", "-", db=db, stdin=f"{GOOD_LINE}\n{{oops\n")
    assert result.returncode == 2, describe(result)
    assert "line 2" in result.stderr
    assert sorted(os.listdir(tmp_path)) == []


def test_enqueue_bulk_error_is_a_single_stderr_line(db: Target) -> None:
    result = run("enqueue-bulk", "-", db=db,
                 stdin=f"{GOOD_LINE}\n{GOOD_LINE}\n{{bad\n")
    assert_error(result, "line 3")


def test_enqueue_bulk_with_undecodable_bytes_is_a_clean_error(db: Target,
                                                              tmp_path: Path) -> None:
    source = tmp_path / "latin1.jsonl"
    source.write_bytes(GOOD_LINE.encode() + b'\n{"kind": "caf\xe9"}\n')
    db.open().close()
    before = snapshot(db)
    line = assert_error(run("enqueue-bulk", str(source), db=db))
    assert "utf-8" in line.lower()
    assert snapshot(db) == before


# ------------------------------------------------------------------- worker ----

def test_worker_runs_jobs_and_exits_0_soon_after_sigterm(worked: SimpleNamespace) -> None:
    assert worked.code == 0, worked.stderr
    assert worked.stop_seconds < 5, worked.stop_seconds
    assert "Traceback" not in worked.stdout, worked.stdout
    assert worked.cancel_out.strip() == f"asked the running job {worked.hold} to stop"
    states = dict(worked.db.sql("SELECT id, state FROM jobs"))
    assert states == {**dict.fromkeys(worked.adds, "done"), worked.boom: "failed",
                      worked.boom_other: "failed", worked.hold: "cancelled"}
    # While it ran, status showed it as the one live process; after SIGTERM it is gone.
    (process,) = worked.during["processes"]
    assert set(process) == PROCESS_KEYS
    assert process["pid"] == worked.pid
    assert process["hostname"] == socket.gethostname()
    assert process["queues"] == {"default": 2, "other": 1}
    assert parse_iso(process["started_at"]) <= parse_iso(process["heartbeat_at"])
    assert worked.after["processes"] == []


def test_worker_verbose_logs_one_info_line_per_job(worked: SimpleNamespace) -> None:
    lines = [line for line in worked.stderr.splitlines() if " sqliteq.jobs " in line]
    expected = {**{job_id: "done" for job_id in worked.adds}, worked.boom: "failed",
                worked.boom_other: "failed", worked.hold: "cancelled"}
    assert len(lines) == len(expected), worked.stderr
    for job_id, verdict in expected.items():
        (line,) = [line for line in lines if job_id in line]
        assert " INFO " in line
        assert f"{job_id} " in line and f" {verdict} " in line, line


def test_worker_logs_name_its_slots_and_why_a_job_failed_for_good(
        worked: SimpleNamespace) -> None:
    assert re.search(r" INFO runtime \S+ starting on .*: slots default=2, other=1\n",
                     worked.stderr), worked.stderr
    (failed,) = [line for line in worked.stderr.splitlines()
                 if worked.boom in line and "failed for good" in line]
    assert " WARNING " in failed
    assert "on attempt 1: ValueError: boom goes the handler ({'n': 1})" in failed


def test_worker_vv_logs_each_job_start(tmp_path: Path) -> None:
    db = Target(str(tmp_path / "q.db"), None)
    job_id = enqueue(db, "add", '{"a": 1, "b": 2}')
    proc = start_worker(db, APP, "-vv", cwd=REPO)
    try:
        wait_for(lambda: db.sql("SELECT state FROM jobs WHERE id = ?", job_id)[0][0]
                 == "done", 15, "the job to be done", proc)
        code, _, err, _ = stop_worker(proc)
    finally:
        kill_if_running(proc)
    assert code == 0, err
    (start,) = [line for line in err.splitlines() if "starting on default-" in line]
    assert " DEBUG " in start and f"{job_id} add attempt 1 starting on" in start


def test_worker_without_verbose_logs_no_job_lines_and_stops_on_sigint(db: Target,
                                                                     tmp_path: Path) -> None:
    # The store comes from $SQLITEQ_DB (and $SQLITEQ_SCHEMA) here, for both the enqueue and
    # the worker.
    env = clean_env(SQLITEQ_DB=db.url, **({"SQLITEQ_SCHEMA": db.schema} if db.schema else {}))
    job_id = ok("enqueue", "add", '{"a": 2, "b": 3}', env=env, cwd=tmp_path).strip()
    proc = start_worker(None, APP, env=env)
    try:
        wait_for(lambda: db.sql("SELECT state FROM jobs WHERE id = ?", job_id)[0][0]
                 == "done", 15, "the job to be done", proc)
        code, _, err, seconds = stop_worker(proc, signal.SIGINT)
    finally:
        kill_if_running(proc)
    assert code == 0, err
    assert seconds < 5
    assert "sqliteq.jobs" not in err and job_id not in err, err
    assert ok_json("job", job_id, env=env, cwd=tmp_path)["result"] == {"sum": 5}
    assert not (tmp_path / "sqliteq.db").exists()


SHADOWING_APP = """
import colorsys
import sqliteq

def make_runtime(storage):
    rt = sqliteq.Runtime(storage, {"default": 1})
    rt.register("where", lambda ctx, payload: colorsys.__file__)
    return rt
"""


def test_worker_finds_the_app_in_the_current_folder_without_shadowing_the_stdlib(
        tmp_path: Path) -> None:
    """The current folder goes last on sys.path: a local colorsys.py (or fractions.py, or
    json.py) must not replace the standard library's for the app and for sqliteq."""
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "shadowing_app.py").write_text(SHADOWING_APP)
    (folder / "colorsys.py").write_text("raise ImportError('the local colorsys.py shadowed "
                                        "the standard library')\n")
    db = Target(str(tmp_path / "q.db"), None)
    job_id = enqueue(db, "where")
    result = result_once_done(start_worker(db, "shadowing_app:make_runtime", cwd=folder),
                              db, job_id)
    assert Path(result).parent != folder and result.endswith("colorsys.py")


@pytest.mark.parametrize("app, names", [
    ("no_such_module_xyz:make_runtime", ("no_such_module_xyz",)),
    ("tests.cli_app:no_such_attribute", ("no_such_attribute",)),
    ("tests.cli_app:NOT_AN_APP", ("tests.cli_app:NOT_AN_APP", "Runtime")),
])
def test_worker_with_an_unloadable_app_is_a_clean_error(app: str, names: tuple[str, ...],
                                                        seeded: SimpleNamespace) -> None:
    before = snapshot(seeded.db)
    assert_error(run("worker", app, db=seeded.db, cwd=REPO), *names)
    assert snapshot(seeded.db) == before


def test_worker_v_shows_the_traceback_of_an_app_that_fails_to_import(tmp_path: Path) -> None:
    (tmp_path / "broken_app.py").write_text("import sqliteq\n1 / 0\n")
    db = tmp_path / "q.db"
    quiet = run("worker", "broken_app:runtime", db=db, cwd=tmp_path)
    assert_error(quiet, "broken_app", "ZeroDivisionError")
    loud = run("worker", "broken_app:runtime", "-v", db=db, cwd=tmp_path)
    assert loud.returncode == 2
    assert "Traceback" in loud.stderr and 'broken_app.py", line 2' in loud.stderr
    assert loud.stderr.splitlines()[-1].startswith("sqliteq: error: cannot load")


def test_worker_with_bad_queues_writes_nothing(tmp_path: Path) -> None:
    db = tmp_path / "new.db"
    assert_error(run("worker", APP, "--queues", "default=x", db=db, cwd=REPO), "default=x")
    assert sorted(os.listdir(tmp_path)) == []


# ------------------------------------------------------------------- status ----

def test_status_json_counts_while_a_worker_runs(worked: SimpleNamespace) -> None:
    status = worked.during
    assert set(status) == {"queues", "processes"}
    assert [q["name"] for q in status["queues"]] == ["default", "other"]
    default, other = queue_stats(status, "default"), queue_stats(status, "other")
    assert set(default) == QUEUE_KEYS
    assert {k: default[k] for k in ("ready", "scheduled", "running", "done", "failed",
                                    "cancelled", "paused", "limit")} \
        == {"ready": 0, "scheduled": 0, "running": 1, "done": 3, "failed": 1, "cancelled": 0,
            "paused": False, "limit": None}
    assert default["jobs_per_minute"] == 0.8          # 4 finished over the 5-minute window
    assert default["oldest_ready_age_seconds"] is None
    assert (other["failed"], other["done"], other["jobs_per_minute"]) == (1, 0, 0.2)
    after = queue_stats(worked.after, "default")
    assert (after["running"], after["cancelled"], after["done"]) == (0, 1, 3)


def test_status_ready_versus_scheduled_and_the_table(db: Target) -> None:
    enqueue(db, "a")
    enqueue(db, "a")
    enqueue(db, "a", "--delay", "1h")
    enqueue(db, "b", "--queue", "later", "--at", "2030-01-01T00:00:00Z")
    status = ok_json("status", db=db)
    assert status["processes"] == []
    default, later = queue_stats(status, "default"), queue_stats(status, "later")
    assert (default["ready"], default["scheduled"], default["running"]) == (2, 1, 0)
    assert (later["ready"], later["scheduled"]) == (0, 1)
    assert 0 <= default["oldest_ready_age_seconds"] < 60
    assert later["oldest_ready_age_seconds"] is None
    assert default["jobs_per_minute"] == 0.0

    table = ok("status", db=db)
    lines = table.splitlines()
    assert lines[0].split("  ")[0] == "QUEUE"
    for header in STATUS_HEADERS:
        assert header in lines[0]
    default_row = next(line for line in lines if line.startswith("default "))
    assert default_row.split()[1:3] == ["2", "1"]
    assert any(line.startswith("later ") for line in lines)
    assert "no live processes" in table and "HOST" not in table


def test_status_of_a_finished_run_as_a_table(worked: SimpleNamespace) -> None:
    table = ok("status", db=worked.db)
    assert any(line.startswith("default ") for line in table.splitlines())
    assert any(line.startswith("other ") for line in table.splitlines())
    assert "no live processes" in table and "HOST" not in table


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_status_watch_refreshes_in_place_until_ctrl_c(seeded: SimpleNamespace) -> None:
    master, slave = os.openpty()
    proc = subprocess.Popen([script(), *seeded.db.options(), "status", "--watch"],
                            stdout=slave, stderr=subprocess.PIPE, text=True, env=clean_env(),
                            cwd=REPO)
    os.close(slave)
    output = b""
    try:
        deadline = time.monotonic() + 10
        while output.count(b"live process") < 2 and time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                output += os.read(master, 65536)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
    finally:
        kill_if_running(proc)
        os.close(master)
    text = output.decode()
    assert output.count(b"live process") >= 2, text
    assert text.count("\x1b[2J") >= 2, text            # the screen is cleared each refresh
    assert proc.returncode == 0, err
    assert "Traceback" not in text + err


# --------------------------------------------------------------- jobs / job ----

def test_jobs_filters_and_limit(db: Target) -> None:
    a1 = enqueue(db, "a")
    a2 = enqueue(db, "a", "--queue", "email")
    b1 = enqueue(db, "b")
    b2 = enqueue(db, "b", "--queue", "email")
    ok("cancel", b2, db=db)

    def ids(*args: str) -> list[str]:
        listed = ok_json("jobs", *args, db=db)
        assert all(set(job) == JOB_KEYS for job in listed)
        return [job["id"] for job in listed]

    assert ids() == [b2, b1, a2, a1]                       # newest first
    assert ids("--kind", "a") == [a2, a1]
    assert ids("--queue", "email") == [b2, a2]
    assert ids("--state", "cancelled") == [b2]
    assert ids("--state", "queued", "--queue", "email", "--kind", "a") == [a2]
    assert ids("--limit", "2") == [b2, b1]
    assert ids("--limit", "0") == []
    assert ids("--queue", "nope") == []
    table = ok("jobs", db=db).splitlines()
    assert table[0].split() == ["ID", "KIND", "QUEUE", "STATE", "ATTEMPT", "RUN", "AT",
                                "LAST", "ERROR"]
    assert [line.split()[0] for line in table[1:]] == [b2, b1, a2, a1]
    assert table[1].split()[1:5] == ["b", "email", "cancelled", "0/5"]


def test_job_shows_every_error_with_its_traceback(worked: SimpleNamespace) -> None:
    job = ok_json("job", worked.boom, db=worked.db)
    assert set(job) == JOB_FULL_KEYS
    assert (job["state"], job["attempt"], job["max_attempts"]) == ("failed", 1, 1)
    assert job["payload"] == {"n": 1} and job["result"] is None
    (error,) = job["errors"]
    assert set(error) == {"at", "attempt", "error", "traceback"}
    assert error["attempt"] == 1
    assert error["error"] == "ValueError: boom goes the handler ({'n': 1})"
    assert error["traceback"].startswith("Traceback (most recent call last)")
    assert "cli_app.py" in error["traceback"]
    assert job["last_error"] == error["error"]
    assert job["started_at"] and job["finished_at"] and job["worker"] and job["host"]

    text = ok("job", worked.boom, db=worked.db)
    assert f"{'id:':18}{worked.boom}" in text
    assert f"{'state:':18}failed" in text
    assert f"{'payload:':18}" + '{"n": 1}' in text
    assert f"attempt 1 at {error['at']}: {error['error']}" in text
    assert "Traceback (most recent call last)" in text
    assert 'raise ValueError(f"boom goes the handler ({payload!r})")' in text


def test_job_of_a_done_job_has_its_result(worked: SimpleNamespace) -> None:
    job = ok_json("job", worked.adds[2], db=worked.db)
    assert (job["state"], job["result"], job["errors"]) == ("done", {"sum": 12}, [])
    assert job["worker"].startswith("default-")
    assert parse_iso(job["created_at"]) <= parse_iso(job["started_at"]) \
        <= parse_iso(job["finished_at"])
    assert f"{'result:':18}" + '{"sum": 12}' in ok("job", worked.adds[2], db=worked.db)


def test_jobs_after_a_worker_run(worked: SimpleNamespace) -> None:
    failed = ok_json("jobs", "--state", "failed", db=worked.db)
    assert {job["id"] for job in failed} == {worked.boom, worked.boom_other}
    assert all(job["last_error"].startswith("ValueError: boom") for job in failed)
    only_other = ok_json("jobs", "--state", "failed", "--queue", "other", db=worked.db)
    assert [job["id"] for job in only_other] == [worked.boom_other]
    done = ok_json("jobs", "--state", "done", "--kind", "add", db=worked.db)
    assert sorted(job["id"] for job in done) == sorted(worked.adds)
    table = ok("jobs", "--state", "failed", db=worked.db)
    assert "ValueError: boom goes the handler" in table and "1/1" in table


# ESC, BEL, CSI, a bidi override, a lone surrogate (which would not even encode as UTF-8).
TERMINAL_CONTROLS = ("\x1b", "\x07", "\x9b", "\u202e", "\udc80")


def test_control_characters_in_jobs_are_printed_as_escapes(db: Target) -> None:
    kind = "evil\x1b]0;pwned\x07"
    payload = {"s": "\x1b[2J\x9b31m", "bidi": "\u202eevil", "lone": "\udc80"}
    error = "ValueError: \x1b[31mred\x1b[0m"
    with db.open() as storage:
        job_id = storage.jobs.enqueue(sqliteq.EnqueueRequest(kind, payload)).job_id
    db.sql("UPDATE jobs SET state = 'failed', errors = ? WHERE id = ?",
          json.dumps([{"at": "2026-12-03T00:00:00Z", "attempt": 1, "error": error,
                       "traceback": f"Traceback\n  {error}\n"}]), job_id)
    for args in (["jobs"], ["job", job_id], ["status"], ["jobs", "--json"], ["job", job_id,
                                                                             "--json"]):
        out = ok(*args, db=db, env=clean_env(PYTHONIOENCODING="utf-8"))
        assert not any(c in out for c in TERMINAL_CONTROLS), (args, out)
    assert "evil\\x1b]0;pwned\\x07" in ok("jobs", db=db)
    job = ok_json("job", job_id, db=db)
    assert (job["kind"], job["payload"], job["errors"][0]["error"]) == (kind, payload, error)
    assert_error(run("job", "NOPE\x1b[2J", db=db), "NOPE\\x1b[2J")


def test_worker_logs_print_control_characters_as_escapes(db: Target) -> None:
    with db.open() as storage:
        job_id = storage.jobs.enqueue(sqliteq.EnqueueRequest("evil\x1b[31m",
                                                             max_attempts=1)).job_id
    err = stderr_once(start_worker(db, APP, "-v"), db, job_id, "failed")   # no handler
    assert "evil\\x1b[31m" in err and "\x1b" not in err, err


# --------------------------------------------------- retry / cancel / purge ----

def test_retry_one_job_and_all_failed_jobs(worked: SimpleNamespace, tmp_path: Path,
                                           scratch_schema: str) -> None:
    db = copy_store(worked.db, tmp_path, scratch_schema)

    def states() -> dict[str, tuple[str, int]]:
        return {job["id"]: (job["state"], job["attempt"])
                for job in ok_json("jobs", "--limit", "100", db=db)}

    assert ok("retry", "--failed", "--queue", "other", db=db).strip() \
        == "requeued 1 failed job(s)"
    now = states()
    assert (now[worked.boom_other], now[worked.boom]) == (("queued", 0), ("failed", 1))
    assert ok("retry", "--failed", db=db).strip() == "requeued 1 failed job(s)"
    assert states()[worked.boom] == ("queued", 0)
    assert ok("retry", "--failed", db=db).strip() == "requeued 0 failed job(s)"
    # A cancelled job can be retried by id too.
    assert ok("retry", worked.hold, db=db).strip() == f"requeued {worked.hold}"
    job = ok_json("job", worked.hold, db=db)
    assert (job["state"], job["attempt"], job["finished_at"]) == ("queued", 0, None)
    status = ok_json("status", db=db)
    assert queue_stats(status, "default")["ready"] == 2
    assert queue_stats(status, "other")["ready"] == 1
    # Retrying a job that is not failed/cancelled is refused, and writes nothing.
    before = snapshot(db)
    assert_error(run("retry", worked.adds[0], db=db), worked.adds[0], "done")
    assert_error(run("retry", db=db), "--failed")
    assert snapshot(db) == before


def test_cancel_a_queued_job(db: Target) -> None:
    job_id = enqueue(db, "k")
    other = enqueue(db, "k")
    assert ok("cancel", job_id, db=db).strip() == f"cancelled {job_id}"
    job = ok_json("job", job_id, db=db)
    assert job["state"] == "cancelled" and job["finished_at"] is not None
    assert ok_json("job", other, db=db)["state"] == "queued"
    default = queue_stats(ok_json("status", db=db), "default")
    assert (default["cancelled"], default["ready"]) == (1, 1)
    assert ok("cancel", job_id, db=db).strip() == f"job {job_id} had already finished"


def test_purge_deletes_old_finished_jobs(worked: SimpleNamespace, tmp_path: Path,
                                         scratch_schema: str) -> None:
    db = copy_store(worked.db, tmp_path, scratch_schema)
    assert ok("purge", "--state", "done", "--older-than", "1h", db=db).strip() \
        == "deleted 0 done job(s)"
    assert ok("purge", "--older-than", "0s", db=db).strip() == "deleted 3 done job(s)"
    assert ok_json("jobs", "--state", "done", db=db) == []
    assert len(ok_json("jobs", "--state", "failed", db=db)) == 2
    assert ok("purge", "--state", "failed", "--older-than", "0s", db=db).strip() \
        == "deleted 2 failed job(s)"
    remaining = {job["id"] for job in ok_json("jobs", db=db)}
    assert remaining == {worked.hold}
    default = queue_stats(ok_json("status", db=db), "default")
    assert (default["done"], default["failed"], default["cancelled"]) == (0, 0, 1)


# -------------------------------------------------- pause / resume / limit ----

def test_pause_resume_and_limit_show_in_status(db: Target) -> None:
    enqueue(db, "send", "--queue", "email")
    enqueue(db, "k")

    def email() -> dict[str, Any]:
        return queue_stats(ok_json("status", db=db), "email")

    assert (email()["paused"], email()["limit"]) == (False, None)
    assert ok("pause", "email", db=db).strip() == "paused email"
    assert email()["paused"] is True
    assert queue_stats(ok_json("status", db=db), "default")["paused"] is False
    email_row = next(line for line in ok("status", db=db).splitlines()
                     if line.startswith("email "))
    assert email_row.split()[7] == "yes"
    assert ok("resume", "email", db=db).strip() == "resumed email"
    assert email()["paused"] is False
    assert ok("limit", "email", "2", db=db).strip() == "limit of email: 2"
    assert email()["limit"] == 2
    assert ok("limit", "email", "none", db=db).strip() == "limit of email: none"
    assert email()["limit"] is None
    assert db.sql("SELECT name, paused, concurrency FROM queues ORDER BY name") \
        == [("default", 0, None), ("email", 0, None)]


# --------------------------------------------------------------------- cron ----

def test_cron_lists_declared_schedules(db: Target) -> None:
    with db.open() as storage:
        rt = sqliteq.Runtime(storage, queues={"default": 1})
        rt.cron("nightly-report", "30 3 * * *",
                sqliteq.EnqueueRequest("report", {"format": "pdf"}, queue_name="reports"),
                tz="Europe/Paris")
        rt.cron("every-5-min", "*/5 * * * *", sqliteq.EnqueueRequest("ping"))
        rt.start()
        rt.stop()
    now = datetime.now(timezone.utc)
    schedules = ok_json("cron", db=db)
    assert [s["name"] for s in schedules] == ["every-5-min", "nightly-report"]
    assert all(set(s) == CRON_KEYS for s in schedules)
    every, nightly = schedules
    assert (every["expression"], every["timezone"], every["kind"]) \
        == ("*/5 * * * *", None, "ping")
    assert (nightly["expression"], nightly["timezone"], nightly["kind"]) \
        == ("30 3 * * *", "Europe/Paris", "report")
    for schedule in schedules:
        assert schedule["enabled"] is True and schedule["last_error"] is None
    next_every = parse_iso(every["next_fire_at"])
    assert now - timedelta(seconds=5) < next_every <= now + timedelta(minutes=5)
    assert next_every.minute % 5 == 0 and next_every.second == 0
    paris = parse_iso(nightly["next_fire_at"]).astimezone(ZoneInfo("Europe/Paris"))
    assert (paris.hour, paris.minute, paris.second) == (3, 30, 0)
    assert now < paris <= now + timedelta(days=1, hours=1)

    table = ok("cron", db=db).splitlines()
    assert table[0].split() == ["NAME", "EXPRESSION", "TIMEZONE", "KIND", "NEXT", "FIRE",
                                "ENABLED", "LAST", "ERROR"]
    assert table[1].startswith("every-5-min ") and " UTC " in table[1] and " ping " in table[1]
    assert table[2].startswith("nightly-report ") and " Europe/Paris " in table[2]
    assert nightly["next_fire_at"] in table[2]


def test_cron_without_schedules(seeded: SimpleNamespace) -> None:
    assert ok_json("cron", db=seeded.db) == []
    assert ok("cron", db=seeded.db).split() == ["NAME", "EXPRESSION", "TIMEZONE", "KIND",
                                                "NEXT", "FIRE", "ENABLED", "LAST", "ERROR"]


def test_cron_remove_disable_and_enable_a_schedule(db: Target) -> None:
    with db.open() as storage:
        storage.cron.declare("nightly", sqliteq.CronExpression("30 3 * * *"),
                             sqliteq.EnqueueRequest("report"))
    assert ok_json("cron", "disable", "nightly", db=db) == {"name": "nightly", "disabled": True}
    assert [s["enabled"] for s in ok_json("cron", db=db)] == [False]
    assert " no " in ok("cron", db=db).splitlines()[1]
    assert ok("cron", "enable", "nightly", db=db).strip() == "enabled nightly"
    assert [s["enabled"] for s in ok_json("cron", db=db)] == [True]
    assert ok("cron", "remove", "nightly", db=db).strip() == "removed nightly"
    assert ok_json("cron", db=db) == []
    before = snapshot(db)
    for verb in ("remove", "disable", "enable"):
        assert_error(run("cron", verb, "nightly", db=db), "unknown cron schedule", "nightly")
    assert snapshot(db) == before


# --------------------------------------------------------------------- demo ----

def test_demo_runs_with_no_arguments_in_an_empty_folder(tmp_path: Path) -> None:
    folder = tmp_path / "fresh"
    folder.mkdir()
    started = time.monotonic()
    result = run("demo", cwd=folder, timeout=90)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, describe(result)
    assert "Traceback" not in result.stdout + result.stderr
    assert elapsed < 60, elapsed
    assert (folder / "sqliteq.db").is_file()
    summary = result.stdout
    assert "10,001 (1 bootstrap + 10,000)" in summary
    assert re.search(r"retried after a failure: +10\n", summary)
    for label in ("database", "jobs run", "cron ticks", "time", "throughput"):
        assert label in summary
    assert result.stderr == ""              # no progress bar on a stderr that is no terminal
    demo = queue_stats(ok_json("status", cwd=folder), "demo")
    assert (demo["done"], demo["failed"], demo["ready"], demo["running"]) == (10_001, 0, 0, 0)
    assert [s["name"] for s in ok_json("cron", cwd=folder)] == ["demo-tick"]


def test_demo_with_fewer_jobs(db: Target) -> None:
    out = ok("demo", "--jobs", "500", db=db, timeout=60)
    assert "501 (1 bootstrap + 500)" in out
    assert re.search(r"retried after a failure: +1\n", out)
    assert (db.schema or db.url) in out           # the store it ran on
    retried = [job for job in ok_json("jobs", "--queue", "demo", "--limit", "1000", db=db)
               if job["last_error"]]
    assert len(retried) == 1 and retried[0]["state"] == "done"
    assert "flaky upstream" in retried[0]["last_error"]


# ------------------------------------------------------------------- errors ----

@pytest.mark.parametrize("args, names", [
    (["enqueue", "resize", "--priority", "abc"], ("--priority", "abc", "enqueue --help")),
    (["limit", "email", "-1"], ("-1",)),
    (["enqueue"], ("KIND",)),
    (["enqueu", "x"], ("enqueu", "sqliteq --help")),
    (["status", "--bogus"], ("--bogus",)),
], ids=["bad-priority", "negative-limit", "missing-kind", "unknown-command", "unknown-option"])
def test_a_usage_error_is_one_line_and_exit_2(args: list[str], names: tuple[str, ...],
                                              tmp_path: Path) -> None:
    line = assert_error(run(*args, db=tmp_path / "q.db"), *names)
    assert line.startswith("sqliteq: error: ")
    assert sorted(os.listdir(tmp_path)) == []


def test_every_admin_command_speaks_json(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    job_id = enqueue(db, "k")
    assert ok_json("cancel", job_id, db=db) == {"job_id": job_id, "outcome": "cancelled"}
    assert ok_json("retry", job_id, db=db) == {"requeued": 1, "job_id": job_id}
    assert ok_json("retry", "--failed", db=db) == {"requeued": 0, "queue": None}
    assert ok_json("pause", "default", db=db) == {"queue": "default", "paused": True}
    assert ok_json("resume", "default", db=db) == {"queue": "default", "paused": False}
    assert ok_json("limit", "default", "3", db=db) == {"queue": "default", "limit": 3}
    assert ok_json("limit", "default", "none", db=db) == {"queue": "default", "limit": None}
    assert ok_json("purge", "--older-than", "1d", db=db) == {"state": "done", "deleted": 0}


def test_status_watch_json_prints_one_object_per_line_at_the_interval(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    enqueue(db, "k")
    proc = subprocess.Popen([script(), "--db", str(db), "status", "--watch", "--json",
                             "--interval", "0.2"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=clean_env())
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(3)]
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
    finally:
        kill_if_running(proc)
    for line in lines:
        data = json.loads(line)
        assert set(data) == {"queues", "processes"}
        assert queue_stats(data, "default")["ready"] == 1
    assert proc.returncode == 0, err


def test_enqueue_into_a_queue_nobody_has_used_warns_in_one_line(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    first = run("enqueue", "k", "--queue", "no such", db=db)
    assert first.returncode == 0 and len(first.stdout.splitlines()) == 1
    assert first.stderr.splitlines() == [
        "sqliteq: warning: queue 'no such' is new: no worker serves it yet"]
    again = run("enqueue", "k", "--queue", "no such", db=db)
    assert again.returncode == 0 and again.stderr == ""


ERROR_CASES = {
    "invalid-json-payload": (["enqueue", "k", "{bad"], ("invalid JSON",)),
    "unknown-job": (["job", "NOPE"], ("unknown job id", "NOPE")),
    "unknown-job-json": (["job", "NOPE", "--json"], ("unknown job id", "NOPE")),
    "cancel-unknown-job": (["cancel", "NOPE"], ("unknown job id", "NOPE")),
    "retry-unknown-job": (["retry", "NOPE"], ("unknown job id", "NOPE")),
    "pause-unknown-queue": (["pause", "nope"], ("unknown queue", "nope")),
    "resume-unknown-queue": (["resume", "nope"], ("unknown queue", "nope")),
    "limit-unknown-queue": (["limit", "nope", "2"], ("unknown queue", "nope")),
    "retry-failed-unknown-queue": (["retry", "--failed", "--queue", "nope"],
                                   ("unknown queue", "nope")),
    "bad-delay": (["enqueue", "k", "--delay", "5x"], ("duration", "5x")),
    "bad-older-than": (["purge", "--state", "done", "--older-than", "abc"],
                       ("duration", "abc")),
    "delay-and-at": (["enqueue", "k", "--delay", "5s", "--at", "2030-01-01T00:00:00Z"],
                     ("--delay", "--at")),
    "naive-at": (["enqueue", "k", "--at", "2030-01-01T09:00:00"],
                 ("2030-01-01T09:00:00", "offset")),
    "bad-at": (["enqueue", "k", "--at", "tomorrow"], ("tomorrow",)),
    "bad-limit": (["limit", "default", "lots"], ("lots",)),
    "bad-max-attempts": (["enqueue", "k", "--max-attempts", "0"], ("max_attempts",)),
    "retry-queued-job": (["retry", "{queued}"], ("{queued}", "queued")),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case: str,
                                                            seeded: SimpleNamespace,
                                                            tmp_path: Path) -> None:
    args, names = ERROR_CASES[case]
    args = [arg.replace("{queued}", seeded.queued) for arg in args]
    names = tuple(name.replace("{queued}", seeded.queued) for name in names)
    files = sorted(os.listdir(tmp_path))
    before = snapshot(seeded.db)
    line = assert_error(run(*args, db=seeded.db), *names)
    assert line.startswith("sqliteq: error: ")
    assert snapshot(seeded.db) == before
    assert sorted(os.listdir(tmp_path)) == files


@pytest.mark.parametrize("args, names", [
    (["enqueue", "k", "{bad"], ("invalid JSON",)),
    (["enqueue", "k", "--delay", "5x"], ("5x",)),
    (["enqueue", "k", "[" * 990 + "]" * 990], ("deep", "at most 100")),
    (["enqueue", "k", "[" * 9000 + "]" * 9000], ("deep", "at most 100")),
    (["status"], ("no database",)),
    (["jobs", "--json"], ("no database",)),
    (["job", "NOPE"], ("no database",)),
    (["cancel", "NOPE"], ("no database",)),
    (["pause", "default"], ("no database",)),
], ids=lambda value: "-".join(value)[:30] if isinstance(value, list) else None)
def test_bad_input_on_a_missing_database_creates_no_file(args: list[str], names: tuple[str, ...],
                                                          tmp_path: Path) -> None:
    db = tmp_path / "missing.db"
    assert_error(run(*args, db=db), *names)
    assert sorted(os.listdir(tmp_path)) == []


NOT_A_DATABASE_COMMANDS = [
    ["status"], ["jobs", "--json"], ["job", "NOPE"], ["enqueue", "k"], ["cancel", "NOPE"],
    ["retry", "--failed"], ["pause", "default"], ["limit", "default", "2"],
    ["purge", "--older-than", "1d"], ["cron", "--json"], ["demo", "--jobs", "1"],
]


@pytest.mark.parametrize("args", NOT_A_DATABASE_COMMANDS, ids=" ".join)
def test_a_file_that_is_not_a_database_is_refused_and_left_alone(args: list[str],
                                                                 tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    content = b"shopping list\n- milk\n- eggs\n" * 100
    path.write_bytes(content)
    assert_error(run(*args, db=path), "notes.txt", "not a SQLite database")
    assert path.read_bytes() == content
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]


def test_a_foreign_sqlite_database_with_a_jobs_table_is_a_clean_error(tmp_path: Path) -> None:
    path = tmp_path / "other-app.db"
    conn = apsw.Connection(str(path))
    conn.execute("CREATE TABLE jobs (title TEXT); INSERT INTO jobs VALUES ('mine')")
    conn.close()
    before = snapshot(path)
    assert_error(run("status", db=path), "other-app.db")
    assert snapshot(path) == before


def test_a_read_command_leaves_a_foreign_sqlite_database_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "other-app.db"
    conn = apsw.Connection(str(path))
    conn.execute("CREATE TABLE notes (body TEXT); INSERT INTO notes VALUES ('keep me')")
    conn.close()
    before = snapshot(path)
    result = run("status", db=path)
    assert snapshot(path) == before
    assert_error(result, "other-app.db")


# ------------------------------------------------ entry points and database ----

def test_python_sqliteq_py_works_like_the_console_script(db: Target) -> None:
    helped = subprocess.run([sys.executable, "sqliteq.py", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=30, env=clean_env())
    assert helped.returncode == 0, describe(helped)
    assert "Usage:" in helped.stdout and "Example" in helped.stdout
    enqueued = subprocess.run([sys.executable, "sqliteq.py", *db.options(), "enqueue", "k",
                               '{"via": "python sqliteq.py"}'], cwd=REPO, capture_output=True,
                              text=True, timeout=30, env=clean_env())
    assert enqueued.returncode == 0, describe(enqueued)
    job_id = enqueued.stdout.strip()
    job = ok_json("job", job_id, db=db)
    assert (job["kind"], job["payload"]) == ("k", {"via": "python sqliteq.py"})
    bad = subprocess.run([sys.executable, "sqliteq.py", *db.options(), "job", "NOPE"],
                         cwd=REPO, capture_output=True, text=True, timeout=30, env=clean_env())
    assert_error(bad, "NOPE")


def test_python_sqliteq_py_without_click_says_so_in_one_line() -> None:
    without_click = ("import runpy, sys; sys.modules['click'] = None; sys.argv[1:] = ['--help'];"
                     " runpy.run_path('sqliteq.py', run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", without_click], cwd=REPO,
                            capture_output=True, text=True, timeout=30, env=clean_env())
    assert_error(result, "needs click", "pip install click", code=1)


def test_python_sqliteq_py_worker_runs_an_app(db: Target) -> None:
    job_id = enqueue(db, "add", '{"a": 20, "b": 22}')
    proc = start_worker(None, command=[sys.executable, "sqliteq.py", *db.options(), "worker",
                                       APP])
    assert result_once_done(proc, db, job_id) == {"sum": 42}


def test_sqliteq_db_environment_variable_picks_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "cwd"
    folder.mkdir()
    chosen = tmp_path / "from-env.db"
    env = clean_env(SQLITEQ_DB=str(chosen))
    job_id = ok("enqueue", "k", env=env, cwd=folder).strip()
    assert chosen.is_file() and os.listdir(folder) == []
    assert [job["id"] for job in ok_json("jobs", env=env, cwd=folder)] == [job_id]
    # --db wins over the variable.
    explicit = tmp_path / "explicit.db"
    other = ok("--db", str(explicit), "enqueue", "k2", env=env, cwd=folder).strip()
    assert [job["id"] for job in ok_json("jobs", db=explicit)] == [other]
    assert [job["id"] for job in ok_json("jobs", env=env, cwd=folder)] == [job_id]


def test_default_database_is_sqliteq_db_in_the_current_folder(tmp_path: Path) -> None:
    job_id = ok("enqueue", "k", cwd=tmp_path).strip()
    assert os.listdir(tmp_path) == ["sqliteq.db"]
    assert [job["id"] for job in ok_json("jobs", db=tmp_path / "sqliteq.db")] == [job_id]
    assert ok_json("job", job_id, cwd=tmp_path)["id"] == job_id
