"""A small app for the CLI tests: `sqliteq worker tests.cli_app:make_runtime`.

`make_runtime(storage)` is the "function taking the Storage and returning a Runtime" form the
worker command accepts. Handlers:

* ``add``   -- returns {"sum": a + b}.
* ``boom``  -- always raises ValueError (a job with max_attempts 1 fails with a traceback).
* ``hold``  -- runs until cancelled (pause, cancel, shutdown) or `seconds` pass (default 30),
  so a test can see a job in the ``running`` state.
"""

from __future__ import annotations

from typing import Any

import sqliteq


def make_runtime(storage: sqliteq.Storage) -> sqliteq.Runtime:
    rt = sqliteq.Runtime(storage, queues={"default": 2}, poll_interval=0.02,
                         heartbeat_interval=0.2, shutdown_timeout=5.0)

    @rt.handler("add")
    def add(ctx: sqliteq.JobCtx, payload: dict[str, Any]) -> dict[str, Any]:
        return {"sum": payload["a"] + payload["b"]}

    @rt.handler("boom")
    def boom(ctx: sqliteq.JobCtx, payload: Any) -> None:
        raise ValueError(f"boom goes the handler ({payload!r})")

    @rt.handler("hold")
    def hold(ctx: sqliteq.JobCtx, payload: Any) -> str:
        seconds = (payload or {}).get("seconds", 30)
        if ctx.cancel.wait(seconds):
            ctx.cancel.raise_if_cancelled()
        return "held"

    return rt


NOT_AN_APP = "neither a Runtime nor a function"
