"""What a single enqueue costs, in CPU instructions per job (callgrind counts instructions,
which do not drift with machine load as wall time does):

    ../shared/tools/instructions-per-item -n 2000 bench/enqueue_instructions.py sql-minimal
    ../shared/tools/instructions-per-item -n 2000 bench/enqueue_instructions.py sql-sqliteq
    ../shared/tools/instructions-per-item -n 2000 bench/enqueue_instructions.py public

Each run creates a fresh file (the fixed part), then enqueues N jobs one transaction each:
- `sql-minimal`, `sql-sqliteq`: the bench's raw enqueue-1t loop (BEGIN IMMEDIATE, INSERT,
  COMMIT; the row built per job) on the minimal queue's schema (raw-minimal) or on sqliteq's
  own schema with its INSERT (raw-apsw): what the SQL costs;
- `public`: `storage.jobs.enqueue(EnqueueRequest("noop", {"i": i}))`, as sqliteq's row does.
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


def enqueue_sql(system: run.RawApsw, path: str, n: int) -> None:
    system.create(path)
    conn = run.raw_connection(path)
    for i in range(n):
        row = system.row(i, run.now_ms())
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(system.INSERT, row)
        conn.execute("COMMIT")
    conn.close()


def main(mode: str, n: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = str(Path(folder) / "q.db")
        if mode == "sql-minimal":
            enqueue_sql(run.RawMinimal(), path, n)
        elif mode == "sql-sqliteq":
            enqueue_sql(run.RawApsw(), path, n)
        elif mode == "public":
            with sqliteq.Storage(path) as storage:
                enqueue, request = storage.jobs.enqueue, sqliteq.EnqueueRequest
                for i in range(n):
                    enqueue(request("noop", {"i": i}))
        else:
            raise SystemExit(f"unknown mode {mode!r}: sql-minimal, sql-sqliteq or public")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
