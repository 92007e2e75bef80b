"""Shared fixtures: a fresh database file per test, raw SQL on it, and child Pythons."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import apsw
import pytest
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
def cluster_db(tmp_path: Path) -> Path:
    """A database file with the tables the worker children's handlers write."""
    path = tmp_path / "cluster.db"
    create_test_tables(path)
    return path


@pytest.fixture
def cluster(cluster_db: Path, tmp_path: Path) -> Iterator[Cluster]:
    """Worker children on `cluster_db` (tests/workers.py); none outlives the test."""
    cluster = Cluster(cluster_db, tmp_path / "logs")
    try:
        yield cluster
    finally:
        cluster.close()                 # SIGKILL every child, even when the test failed


@pytest.fixture
def storage(db_path: Path) -> Iterator[sqliteq.Storage]:
    with sqliteq.Storage(db_path) as storage:
        yield storage


@pytest.fixture
def sql(db_path: Path) -> Callable[..., list[Any]]:
    """Run one statement on the test's database through its own raw apsw connection."""

    def run(statement: str, *params: Any) -> list[Any]:
        conn = apsw.Connection(str(db_path))
        try:
            conn.setbusytimeout(10_000)
            return conn.execute(statement, params).fetchall()
        finally:
            conn.close()

    return run


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
