"""Child-process entry points for bench/run.py, and the peer settings both sides share.

    python bench/_child.py xproc-worker DB          sqliteq Runtime; handler returns time.time()
    python bench/_child.py idle SYSTEM DB [FSYNC]   idle worker; answers "cpu" lines on stdin
    python bench/_child.py rss SYSTEM DB N [FSYNC]  enqueue N jobs, drain them, print peak RSS
                                                    (VmHWM; ru_maxrss too, see ru_maxrss_mb)
    python bench/_child.py bulk-rss DB N            sqliteq: one enqueue_bulk of a generator
                                                    of N jobs; print peak RSS

SYSTEM is "sqliteq" or "huey-sqlite"; FSYNC is huey's fsync setting ("none" or "off").
Workers print "ready" once started and stop when stdin reaches end of file. Results are
printed as one JSON line on stdout.
"""

from __future__ import annotations

import contextlib
import json
import resource
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:       # benchmark the sqliteq.py next to this folder
    sys.path.insert(0, str(ROOT))

import sqliteq  # noqa: E402

SLOTS = 4
# huey's consumer polls SQLite when idle: it sleeps initial_delay after an empty poll, growing
# by `backoff` up to max_delay. These favour huey's latency and throughput (10 ms worst-case
# pickup) at some idle CPU cost. huey-redis blocks in BRPOP instead (read_timeout seconds).
HUEY_CONSUMER: dict[str, Any] = {
    "workers": SLOTS, "worker_type": "thread", "initial_delay": 0.001, "backoff": 1.15,
    "max_delay": 0.01, "periodic": False,
}
HUEY_REDIS_READ_TIMEOUT = 0.1
# huey's SqliteStorage: fsync=None leaves SQLite's default synchronous (FULL here: one fsync per
# commit); fsync=False sets synchronous=OFF. No setting gives NORMAL, which sqliteq uses.
HUEY_FSYNC = {"none": None, "off": False}


def make_huey(system: str, target: str, fsync: str = "off") -> Any:
    """A fresh huey instance without result storage: a SQLite file, or a Redis key prefix."""
    if system == "huey-sqlite":
        from huey import SqliteHuey
        return SqliteHuey(name="bench", filename=target, results=False, fsync=HUEY_FSYNC[fsync])
    if system == "huey-redis":
        from huey import RedisHuey
        return RedisHuey(name=target, results=False, read_timeout=HUEY_REDIS_READ_TIMEOUT)
    raise ValueError(f"not a huey system: {system}")


@contextlib.contextmanager
def huey_consumer(huey: Any) -> Iterator[Any]:
    """Run huey's consumer in this process (thread workers) and stop it gracefully.

    `consumer.start()` installs signal handlers; they are put back afterwards.
    """
    signals = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]
    saved = {sig: signal.getsignal(sig) for sig in signals}
    consumer = huey.create_consumer(**HUEY_CONSUMER)
    consumer.start()
    try:
        yield consumer
    finally:
        consumer.stop(graceful=True)
        for sig, handler in saved.items():
            signal.signal(sig, handler)


class Countdown:
    """Counts finished jobs across threads; `done` is set when `total` have finished."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.count = 0
        self.done = threading.Event()
        self._lock = threading.Lock()

    def tick(self) -> None:
        with self._lock:
            self.count += 1
            if self.count >= self.total:
                self.done.set()


def enqueue_noops(storage: sqliteq.Storage, n: int, chunk: int = 10_000) -> str:
    """n no-op jobs through enqueue_bulk, `chunk` per call; returns the last job id."""
    last = ""
    for low in range(0, n, chunk):
        high = min(n, low + chunk)
        requests = [sqliteq.EnqueueRequest("noop", {"i": i}) for i in range(low, high)]
        last = storage.jobs.enqueue_bulk(requests)[-1].job_id
    return last


def emit(data: dict[str, Any]) -> None:
    print(json.dumps(data), flush=True)


def ru_maxrss_mb() -> float:
    """Not this program's own peak when it was started by a bigger process: Linux keeps the
    larger of the parent's peak (at fork) and ours (signal->maxrss survives exec)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KiB on Linux


def peak_rss_mb() -> float:
    """This process image's own peak resident set (VmHWM), in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return ru_maxrss_mb()                                   # not Linux: the best we have


# ------------------------------------------------------------------ modes ----

def xproc_worker(db: str) -> None:
    """A Runtime in this process; each job's result is the wall-clock time its handler began."""
    with sqliteq.Storage(db) as storage:
        rt = sqliteq.Runtime(storage, queues={"default": SLOTS})
        rt.register("stamp", lambda ctx, payload: time.time())
        with rt:
            emit({"ready": True})
            sys.stdin.read()                # until the parent closes our stdin


def idle(system: str, db: str, fsync: str) -> None:
    """A started, idle worker; reports this process's CPU time whenever asked."""
    with contextlib.ExitStack() as stack:
        if system == "sqliteq":
            storage = stack.enter_context(sqliteq.Storage(db))
            stack.enter_context(sqliteq.Runtime(storage, queues={"default": SLOTS}))
        else:
            huey = make_huey(system, db, fsync)
            stack.callback(huey.storage.close)
            stack.enter_context(huey_consumer(huey))
        emit({"ready": True})
        for line in sys.stdin:
            if line.strip() == "cpu":
                emit({"cpu": time.process_time(), "wall": time.perf_counter()})


def rss(system: str, db: str, n: int, fsync: str) -> None:
    """Enqueue n jobs (sqliteq: enqueue_bulk in chunks of 10k) and drain them with 4 slots."""
    baseline = peak_rss_mb()
    started = time.perf_counter()
    if system == "sqliteq":
        with sqliteq.Storage(db) as storage:
            last = enqueue_noops(storage, n)
            rt = sqliteq.Runtime(storage, queues={"default": SLOTS})
            rt.register("noop", lambda ctx, payload: None)
            with rt:
                storage.jobs.wait(last, timeout=600)
                while storage.jobs.counts()["done"] < n:
                    time.sleep(0.01)
    else:
        huey = make_huey(system, db, fsync)
        finished = Countdown(n)

        @huey.task()
        def noop(i: int) -> None:
            finished.tick()

        for i in range(n):
            noop(i)
        with huey_consumer(huey):
            if not finished.done.wait(600):
                raise RuntimeError(f"huey ran {finished.count} of {n} jobs in 600 s")
        huey.storage.close()
    emit({"peak_rss_mb": peak_rss_mb(), "baseline_mb": baseline, "ru_maxrss_mb": ru_maxrss_mb(),
          "seconds": time.perf_counter() - started})


def bulk_rss(db: str, n: int) -> None:
    """One enqueue_bulk call fed by a generator of n no-op requests."""
    baseline = peak_rss_mb()
    started = time.perf_counter()
    with sqliteq.Storage(db) as storage:
        outcomes = storage.jobs.enqueue_bulk(sqliteq.EnqueueRequest("noop", {"i": i})
                                             for i in range(n))
        if len(outcomes) != n:
            raise RuntimeError(f"enqueued {len(outcomes)} of {n}")
    emit({"peak_rss_mb": peak_rss_mb(), "baseline_mb": baseline,
          "seconds": time.perf_counter() - started})


def main(argv: list[str]) -> None:
    mode, *args = argv
    if mode == "xproc-worker":
        xproc_worker(args[0])
    elif mode == "idle":
        idle(args[0], args[1], args[2] if len(args) > 2 else "off")
    elif mode == "rss":
        rss(args[0], args[1], int(args[2]), args[3] if len(args) > 3 else "off")
    elif mode == "bulk-rss":
        bulk_rss(args[0], int(args[1]))
    else:
        raise SystemExit(f"unknown mode {mode!r}; see the docstring")


if __name__ == "__main__":
    main(sys.argv[1:])
