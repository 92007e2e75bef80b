"""Where the time goes on sqliteq's hot paths, for the targets this machine cannot meet.

    python bench/profile_paths.py

1. bulk enqueue: per-job cost of building requests, preparing rows and inserting them, and
   what each index adds to the insert (measured by dropping indexes on a scratch file);
2. enqueue from 8 threads: jobs per commit and jobs/s against 1 thread, and a cProfile of
   the 8-thread run (the GIL, not SQLite, is the limit);
3. drain: a cProfile of every runtime thread while 20,000 no-op jobs drain with 4 slots.
"""

from __future__ import annotations

import cProfile
import functools
import io
import os
import pstats
import statistics
import tempfile
import threading
import time

import sqliteq

FOLDER = tempfile.mkdtemp(prefix="sqliteq-profile-")
BULK = 100_000


def fresh(name: str) -> sqliteq.Storage:
    path = os.path.join(FOLDER, name)
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.remove(path + suffix)
    return sqliteq.Storage(path)


def top(profiles: list[cProfile.Profile], lines: int = 12) -> str:
    out = io.StringIO()
    stats = pstats.Stats(profiles[0], stream=out)
    for profile in profiles[1:]:
        stats.add(profile)
    stats.sort_stats("tottime").print_stats(lines)
    return "\n".join(line for line in out.getvalue().splitlines()[4:] if line.strip())


class ThreadProfiles:
    """Profile every thread started inside the block, one cProfile.Profile per thread."""

    def __enter__(self) -> list[cProfile.Profile]:
        self.profiles: list[cProfile.Profile] = []
        self.original = threading.Thread.run
        profiles, original = self.profiles, self.original

        def profiled_run(thread: threading.Thread) -> None:
            profile = cProfile.Profile()
            profiles.append(profile)
            profile.enable()
            try:
                original(thread)
            finally:
                profile.disable()

        threading.Thread.run = profiled_run  # type: ignore[method-assign]
        return profiles

    def __exit__(self, *exc_info: object) -> None:
        threading.Thread.run = self.original  # type: ignore[method-assign]


class CommitCounter:
    """Counts the transactions a Database commits (each group commit counts once)."""

    def __init__(self, db: sqliteq.Database) -> None:
        self.count = 0
        self._commit_batch = db._commit_batch
        db._commit_batch = self  # type: ignore[method-assign, assignment]

    def __call__(self, batch: list[object]) -> None:
        self.count += 1
        self._commit_batch(batch)  # type: ignore[arg-type]


def bulk_breakdown(runs: int = 5) -> None:
    print(f"## 1. bulk enqueue of {BULK:,} jobs: microseconds per job (median of {runs})\n")
    parts: dict[str, list[float]] = {"build requests": [], "prepare rows": [], "insert": []}
    for _ in range(runs):
        with fresh("bulk.db") as storage:
            t0 = time.perf_counter()
            requests = [sqliteq.EnqueueRequest("noop", {"i": i}) for i in range(BULK)]
            t1 = time.perf_counter()
            rows = storage.jobs._new_jobs(requests, 0, None, {})
            t2 = time.perf_counter()
            storage.db.write(functools.partial(storage._store.insert, jobs=rows))
            t3 = time.perf_counter()
        parts["build requests"].append(t1 - t0)
        parts["prepare rows"].append(t2 - t1)
        parts["insert"].append(t3 - t2)
    for name, seconds in parts.items():
        print(f"- {name}: {statistics.median(seconds) / BULK * 1e6:.2f} us")
    print("\nthe insert alone, with indexes dropped one group at a time:\n")
    groups = [(), ("jobs_due",), ("jobs_due", "jobs_claim"),
              ("jobs_due", "jobs_claim", "jobs_running", "jobs_ended", "jobs_unique_active")]
    for dropped in groups:
        samples = []
        for _ in range(runs):
            with fresh("indexes.db") as storage:
                for index in dropped:
                    storage.db.write(lambda conn, index=index: conn.execute(
                        f"DROP INDEX {index}"))
                rows = storage.jobs._new_jobs(
                    [sqliteq.EnqueueRequest("noop", {"i": i}) for i in range(BULK)], 0, None, {})
                started = time.perf_counter()
                storage.db.write(functools.partial(storage._store.insert, jobs=rows))
                samples.append(time.perf_counter() - started)
        label = "all indexes" if not dropped else "without " + ", ".join(dropped)
        print(f"- {label}: {statistics.median(samples) / BULK * 1e6:.2f} us")


def threads_breakdown() -> None:
    print("\n## 2. single enqueues, 1 thread against 8 threads (16,000 jobs)\n")
    for threads in (1, 8):
        with fresh(f"threads{threads}.db") as storage:
            commits = CommitCounter(storage.db)
            per_thread = 16_000 // threads

            def produce(storage: sqliteq.Storage = storage, n: int = per_thread) -> None:
                for i in range(n):
                    storage.jobs.enqueue(sqliteq.EnqueueRequest("noop", {"i": i}))

            with ThreadProfiles() as profiles:
                workers = [threading.Thread(target=produce) for _ in range(threads)]
                started = time.perf_counter()
                for worker in workers:
                    worker.start()
                for worker in workers:
                    worker.join()
                elapsed = time.perf_counter() - started
            print(f"- {threads} thread(s): {16_000 / elapsed:,.0f} jobs/s under the profiler, "
                  f"{16_000 / commits.count:.2f} jobs per commit")
    print("\ncProfile of the 8 producer threads (8 threads, summed):\n")
    print(top(profiles, 12))


def drain_profile() -> None:
    print("\n## 3. drain of 20,000 no-op jobs with 4 slots: every runtime thread profiled\n")
    with fresh("drain.db") as storage:
        outs = storage.jobs.enqueue_bulk(sqliteq.EnqueueRequest("noop") for _ in range(20_000))
        rt = sqliteq.Runtime(storage, queues={"default": 4})
        rt.register("noop", lambda ctx, payload: None)
        with ThreadProfiles() as profiles:
            started = time.perf_counter()
            rt.start()
            storage.jobs.wait(outs[-1].job_id, timeout=600)
            elapsed = time.perf_counter() - started
            rt.stop()
        print(f"- {20_000 / elapsed:,.0f} jobs/s under the profiler\n")
        print(top(profiles, 16))


if __name__ == "__main__":
    bulk_breakdown()
    threads_breakdown()
    drain_profile()
