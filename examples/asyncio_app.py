"""An asyncio program: async handlers, and enqueueing and awaiting jobs from a coroutine.

    pip install sqliteq
    python asyncio_app.py [DB]

`async def` handlers run on the runtime's own event loop, as many at once as their queue has
slots; a time limit or a cancel request cancels the handler's task. The `a`-methods
(`aenqueue`, `aenqueue_bulk`, `await_job`) do the blocking database work in a thread, so the
caller's loop stays free.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import sqliteq

storage = sqliteq.Storage(sys.argv[1] if len(sys.argv) > 1 else "crawl.db")
runtime = sqliteq.Runtime(storage, queues={"fetch": 8})


@runtime.task(queue="fetch", timeout=10)
async def fetch(ctx: sqliteq.JobCtx, url: str) -> dict[str, Any]:
    await asyncio.sleep(0.1)            # stands in for an HTTP request (aiohttp, httpx)
    return {"url": url, "bytes": 100 * len(url)}


async def main() -> None:
    with runtime:
        outcomes = await fetch.aenqueue_bulk(f"https://example.com/{n}" for n in range(20))
        jobs = await asyncio.gather(*(storage.jobs.await_job(outcome.job_id, timeout=60)
                                      for outcome in outcomes))
    fetched = [job.result for job in jobs if job.state is sqliteq.JobState.DONE]
    print(f"fetched {len(fetched)} pages, {sum(page['bytes'] for page in fetched)} bytes")


if __name__ == "__main__":
    asyncio.run(main())
