"""What a fan-in costs per child, in CPU instructions (callgrind counts do not drift with
load as wall time does): N children joined by one job that depends on all of them, enqueued
in one bulk call and drained by an unstarted Runtime whose rounds this thread runs (as
bench/metrics_instructions.py does). A flat figure across N shows the readiness
bookkeeping is O(children) in all:

    ../shared/tools/instructions-per-item -n 1000 bench/fanin_instructions.py
    ../shared/tools/instructions-per-item -n 10000 bench/fanin_instructions.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))       # measure the sqliteq.py next to this folder

import sqliteq  # noqa: E402


def main(n: int) -> None:
    with tempfile.TemporaryDirectory() as folder, \
            sqliteq.Storage(Path(folder) / "q.db") as storage:
        children = [sqliteq.new_id() for _ in range(n)]
        storage.jobs.enqueue_bulk(
            [*(sqliteq.EnqueueRequest("leaf", job_id=child) for child in children),
             sqliteq.EnqueueRequest("join", depends_on=children)])
        rt = sqliteq.Runtime(storage, {"default": 4}, metrics=False)
        rt.register("leaf", lambda ctx, payload: None)
        rt.register("join", lambda ctx, payload: None)
        dispatcher, queue = sqliteq._Dispatcher(rt), rt._queue_states["default"]
        done = 0
        while done < n + 1:
            dispatcher.step(rt._clock.now_ms())
            for job in queue.drain_buffer():
                rt._finished.append(rt._execute(job, rt._handlers[job.kind], "default-0"))
                done += 1
        rt._stopping = True
        dispatcher.step(rt._clock.now_ms())
        assert storage.jobs.counts()["done"] == n + 1


if __name__ == "__main__":
    main(int(sys.argv[1]))
