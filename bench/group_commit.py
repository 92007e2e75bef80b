"""How group commit behaves as producer threads are added: the single-enqueue rate with 1, 2,
4 and 8 threads sharing one Storage, and how many writes each commit carried.

    python bench/group_commit.py [N]

For each thread count: a fresh file, N jobs split over the threads (released together), each
`storage.jobs.enqueue(EnqueueRequest("noop", {"i": i}))`. Prints jobs/s, the number of
commits, the mean batch and the batch-size histogram. A diagnostic beside bench/run.py's
enqueue-8t scenario (it counts commits by wrapping Database._commit_batch), not a baseline.
"""

from __future__ import annotations

import collections
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))       # measure the sqliteq.py next to this folder

import sqliteq  # noqa: E402


def measure(path: str, threads: int, n: int) -> tuple[float, collections.Counter[int]]:
    sizes: collections.Counter[int] = collections.Counter()
    with sqliteq.Storage(path) as storage:
        commit_batch = storage.db._commit_batch

        def counted(batch: list[Any]) -> BaseException | None:
            sizes[len(batch)] += 1
            return commit_batch(batch)

        storage.db._commit_batch = counted  # type: ignore[method-assign]
        barrier = threading.Barrier(threads + 1)

        def produce(first: int) -> None:
            storage.jobs.counts()           # open this thread's connection, untimed
            barrier.wait()
            for i in range(first, n, threads):
                storage.jobs.enqueue(sqliteq.EnqueueRequest("noop", {"i": i}))

        workers = [threading.Thread(target=produce, args=(k,)) for k in range(threads)]
        for worker in workers:
            worker.start()
        barrier.wait()
        started = time.perf_counter()
        for worker in workers:
            worker.join()
        elapsed = time.perf_counter() - started
        if sum(storage.jobs.counts().values()) != n:
            raise RuntimeError("jobs are missing")
    return n / elapsed, sizes


def main(n: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        for threads in (1, 2, 4, 8):
            rate, sizes = measure(str(Path(folder) / f"t{threads}.db"), threads, n)
            commits = sum(sizes.values())
            histogram = " ".join(f"{size}:{count}" for size, count in sorted(sizes.items()))
            print(f"{threads} thread(s): {rate:8,.0f} jobs/s, {commits:,} commits, "
                  f"mean batch {n / commits:.2f} ({histogram})")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 8000)
