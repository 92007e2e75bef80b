"""Shared fixtures: a fresh store per test (a SQLite file, or a schema on PostgreSQL), raw SQL
on it, and child Pythons."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support import FAST, PG_URL, Target, fresh_schema
from workers import Cluster, create_test_tables

import sqliteq

REPO = Path(sqliteq.__file__).resolve().parent
FINISHED = ("done", "failed", "cancelled")


@pytest.fixture
def child_env() -> dict[str, str]:
    """The environment for a child Python that must import this checkout's sqliteq."""
    paths = [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "q.db"


@pytest.fixture
def cluster_db(target: Target) -> Target:
    """The test's store, with the tables the worker children's handlers write."""
    create_test_tables(target)
    return target


@pytest.fixture
def cluster(cluster_db: Target, tmp_path: Path) -> Iterator[Cluster]:
    """Worker children on `cluster_db` (tests/workers.py); none outlives the test."""
    cluster = Cluster(cluster_db, tmp_path / "logs")
    try:
        yield cluster
    finally:
        cluster.close()                 # SIGKILL every child, even when the test failed


# Fixtures that name a SQLite file: a test that asks for one (or is marked sqlite_only: it
# is about SQLite itself) runs on SQLite only. Every other test that uses a store (through
# `target`, `storage`, `sql`) runs on both.
SQLITE_ONLY_FIXTURES = {"db_path"}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "target" in metafunc.fixturenames:
        sqlite_only = (SQLITE_ONLY_FIXTURES & set(metafunc.fixturenames)
                       or metafunc.definition.get_closest_marker("sqlite_only"))
        stores = ["sqlite"] if sqlite_only else ["sqlite", "postgres"]
        metafunc.parametrize("target", stores, indirect=True)


@pytest.fixture
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Target]:
    """The store a test runs on: a fresh SQLite file, or a fresh schema on the local
    PostgreSQL server (dropped afterwards)."""
    if request.param == "sqlite":
        yield Target(str(tmp_path / "q.db"), None)
        return
    with fresh_schema() as schema:
        yield Target(PG_URL, schema)


@pytest.fixture
def storage(target: Target) -> Iterator[sqliteq.Storage]:
    with target.open() as storage:
        yield storage


@pytest.fixture
def sql(target: Target) -> Callable[..., list[Any]]:
    """Run one statement on the test's store through a connection of its own (SQLite's
    `?` parameters work on both)."""
    return target.sql


@pytest.fixture
def set_state(sql: Callable[..., list[Any]]) -> Callable[..., None]:
    """Move a job to a state behind sqliteq's back, as a worker would (test setup only).

    Finished states get `finished_at` (default: now), as a real finalize sets it.
    """

    def move(job_id: str, state: str, finished_at_ms: int | None = None) -> None:
        if state in FINISHED and finished_at_ms is None:
            finished_at_ms = sqliteq.now_ms()
        sql("UPDATE jobs SET state = ?, finished_at = ? WHERE id = ?",
            state, finished_at_ms, job_id)

    return move


@pytest.fixture
def run_python(child_env: dict[str, str]) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run `python -c code args...` in a child process that can import sqliteq."""

    def run(code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", code, *args], capture_output=True,
                              text=True, timeout=timeout, env=child_env, check=False)

    return run


@pytest.fixture
def make_runtime(storage: sqliteq.Storage) -> Iterator[Callable[..., sqliteq.Runtime]]:
    """Build runtimes on the test's storage (fast intervals unless overridden); every one is
    stopped at teardown even when the test fails half-way."""
    made: list[sqliteq.Runtime] = []

    def make(queues: dict[str, int] | None = None, router: sqliteq.Router | None = None,
             **options: Any) -> sqliteq.Runtime:
        rt = sqliteq.Runtime(storage, queues or {"default": 1}, router, **{**FAST, **options})
        made.append(rt)
        return rt

    yield make
    for rt in made:
        rt.stop(timeout=5)
