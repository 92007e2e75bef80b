"""What draining costs, in CPU instructions per job (callgrind counts instructions, which do
not drift with machine load as wall time does):

    ../shared/tools/instructions-per-item -n 2000 bench/drain_instructions.py sql-minimal
    ../shared/tools/instructions-per-item -n 2000 bench/drain_instructions.py sql-sqliteq
    ../shared/tools/instructions-per-item -n 2000 bench/drain_instructions.py runtime

Each run fills a fresh file with the same 20,000 no-op jobs (the fixed part), then drains
N of them:
- `sql-minimal`, `sql-sqliteq`: the bench's raw drain loop (claim 100 and finish them, one
  transaction each) on the minimal queue's schema (raw-minimal) or on sqliteq's own schema
  with sqliteq's CLAIM and FINISH_DONE (raw-apsw): what the SQL alone costs;
- `runtime`: an unstarted Runtime whose dispatcher rounds and workers' runs this thread does
  itself, one after the other (as bench/metrics_instructions.py does, metrics off).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))       # measure the sqliteq.py next to this folder
sys.path.insert(0, str(ROOT / "bench"))

import run  # noqa: E402

import sqliteq  # noqa: E402

FILL = 20_000


def drain_sql(system: run.RawApsw, path: str, n: int) -> None:
    conn = run.raw_connection(path)
    done = lease = 0
    while done < n:
        lease += 1
        now = run.now_ms()
        conn.execute("BEGIN IMMEDIATE")
        rows = conn.execute(system.CLAIM, system.claim_params(lease, now, min(100, n - done)))
        claimed = rows.fetchall()
        conn.executemany(system.FINISH, [system.finish_params(row[0], lease, now)
                                         for row in claimed])
        conn.execute("COMMIT")
        done += len(claimed)
    conn.close()


def drain_runtime(storage: sqliteq.Storage, n: int, *, metrics: bool) -> None:
    """Run N no-op jobs of `storage` through an unstarted Runtime, this thread doing its
    dispatcher rounds and its workers' runs one after the other: no thread scheduling in
    play, so the count repeats."""
    rt = sqliteq.Runtime(storage, {"default": 4}, metrics=metrics)
    rt.register("noop", lambda ctx, payload: None)
    dispatcher, queue = sqliteq._Dispatcher(rt), rt._queue_states["default"]
    done = 0
    while done < n:
        dispatcher.step(rt._clock.now_ms())
        for job in queue.drain_buffer():
            rt._finished.append(rt._execute(job, rt._handlers[job.kind], "default-0"))
            done += 1
    rt._stopping = True
    dispatcher.step(rt._clock.now_ms())     # commits the last ends, and flushes metrics


def main(mode: str, n: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = str(Path(folder) / "q.db")
        if mode == "sql-minimal":
            minimal = run.RawMinimal()
            minimal.fill(path, FILL)
            drain_sql(minimal, path, n)
        elif mode == "sql-sqliteq":
            run.fill_sqliteq(path, FILL)
            drain_sql(run.RawApsw(), path, n)
        elif mode == "runtime":
            run.fill_sqliteq(path, FILL)
            with sqliteq.Storage(path) as storage:
                drain_runtime(storage, n, metrics=False)
        else:
            raise SystemExit(f"unknown mode {mode!r}: sql-minimal, sql-sqliteq or runtime")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
