"""The bench runs: the adapters of the systems the test extras provide, once at toy sizes.

It measures nothing; it proves that a change to sqliteq's schema or API has not broken an
adapter, which would otherwise surface only in the next full run (or as a hang in it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from support import PG_URL, REPO

# The systems whose packages the `test` and `postgres` extras install, and the scenarios
# that run each adapter's own SQL in this process (the child-process ones run sqliteq's
# public API, which the rest of the suite covers).
SYSTEMS = "raw-minimal,raw-apsw,sqliteq,raw-psycopg,sqliteq-pg"
SCENARIOS = "enqueue-1t,enqueue-8t,bulk,drain,claim-latency,wal-per-enqueue"


def test_every_scenario_runs_without_error_on_sqliteq_and_its_limits(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), "--smoke", "--systems", SYSTEMS,
         "--only", SCENARIOS,
         "--out", str(out), "--chart", "", "--db-dir", str(tmp_path / "dbs"),
         "--pg-url", PG_URL],
        capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    failed = {f"{scenario} {system}": cell["errors"] or cell["status"]
              for scenario, by_system in results.items()
              for system, cell in by_system.items()
              if cell["errors"] or cell["status"] not in ("ok", "n/a")}
    assert failed == {}
    ran = {system for by_system in results.values() for system, cell in by_system.items()
           if cell["status"] == "ok"}
    assert ran == set(SYSTEMS.split(","))
