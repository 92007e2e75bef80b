"""What a bulk enqueue costs, in CPU instructions per job (callgrind counts instructions,
which do not drift with machine load as wall time does):

    ../shared/tools/instructions-per-item -n 5000 bench/bulk_instructions.py sql-minimal
    ../shared/tools/instructions-per-item -n 5000 bench/bulk_instructions.py sql-sqliteq
    ../shared/tools/instructions-per-item -n 5000 bench/bulk_instructions.py requests
    ../shared/tools/instructions-per-item -n 5000 bench/bulk_instructions.py public

Each run creates a fresh file (the fixed part), then enqueues N jobs in one transaction as
the bench's bulk scenario does:
- `sql-minimal`, `sql-sqliteq`: raw-minimal's and raw-apsw's bulk (the rows built, one
  `executemany`): what the SQL costs on the minimal schema and on sqliteq's;
- `requests`: only building the N `EnqueueRequest("noop", {"i": i})`;
- `public`: `storage.jobs.enqueue_bulk` of those requests, built in the same loop.
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


def main(mode: str, n: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = str(Path(folder) / "q.db")
        if mode == "sql-minimal":
            run.RawMinimal().bulk(path, n)
        elif mode == "sql-sqliteq":
            run.RawApsw().bulk(path, n)
        elif mode == "requests":
            request = sqliteq.EnqueueRequest
            [request("noop", {"i": i}) for i in range(n)]
        elif mode == "public":
            with sqliteq.Storage(path) as storage:
                request = sqliteq.EnqueueRequest
                storage.jobs.enqueue_bulk([request("noop", {"i": i}) for i in range(n)])
        else:
            raise SystemExit(f"unknown mode {mode!r}: sql-minimal, sql-sqliteq, requests or "
                             f"public")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
