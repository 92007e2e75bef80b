"""What recording metrics costs a draining runtime, in CPU instructions per job (callgrind
counts instructions, which do not drift with machine load as wall time does):

    ../shared/tools/instructions-per-item -n 2000 bench/metrics_instructions.py on
    ../shared/tools/instructions-per-item -n 2000 bench/metrics_instructions.py off

Each run enqueues N no-op jobs into a fresh file and drains them with an unstarted
Runtime(queues={"default": 4}, metrics=on|off) whose dispatcher rounds and workers' runs
this thread does itself, one after the other (as the tests do): with no thread scheduling
in play, the count repeats. The difference of the two figures is the cost of metrics
(under callgrind a second holds fewer jobs, so flushes come more often than at full speed:
the figure errs high).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))       # measure the sqliteq.py next to this folder
sys.path.insert(0, str(ROOT / "bench"))

from drain_instructions import drain_runtime  # noqa: E402

import sqliteq  # noqa: E402


def main(metrics: str, n: int) -> None:
    if metrics == "on-once":    # one flush, at the end: the recording's cost alone
        sqliteq.METRICS_FLUSH_INTERVAL = float("inf")
    with tempfile.TemporaryDirectory() as folder, \
            sqliteq.Storage(Path(folder) / "q.db") as storage:
        storage.jobs.enqueue_bulk([sqliteq.EnqueueRequest("noop", i) for i in range(n)])
        drain_runtime(storage, n, metrics=metrics != "off")
        assert storage.jobs.counts()["done"] == n


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
