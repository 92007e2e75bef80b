"""Helpers the test modules share: waiting on a condition, and raw SQL behind sqliteq's back."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import apsw


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition",
               interval: float = 0.005, check: Callable[[], None] | None = None) -> Any:
    """Poll `predicate` until it returns something truthy and return that; fail with a
    message after `timeout` s. `check` runs on every round (e.g. children still alive)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if check is not None:
            check()
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def raw(db_path: Path, statement: str, *params: Any) -> list[tuple[Any, ...]]:
    """One statement on its own raw apsw connection (behind sqliteq's back)."""
    conn = apsw.Connection(str(db_path))
    try:
        conn.setbusytimeout(20_000)
        return conn.execute(statement, params).fetchall()
    finally:
        conn.close()
