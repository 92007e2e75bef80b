"""`sqliteq.map`: a durable map for batch scripts, and `sqliteq map` on the command line.

Each item is a job of the run's own queue; results come back in item order; a run started
again under the same name (by default: the same function and items) runs only what did not
finish. Worker threads by default, worker processes with `processes=True`.
"""

from __future__ import annotations

import json
import os
import pty
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from support import REPO, Target, clean_env, run

import sqliteq
from sqliteq import InvalidInput, MapError, MapItemFailed

# Functions a worker process can import (by module and name): this module's own.
sys.path.insert(0, str(Path(__file__).resolve().parent))


def square(n: int) -> int:
    return n * n


def pid_of(n: int) -> int:
    return os.getpid()


def fails_on_three(n: int) -> int:
    if n == 3:
        raise ValueError(f"three is not allowed (got {n})")
    return n


def options(target: Target) -> dict[str, Any]:
    """map's keyword arguments that name the test's store."""
    return {"db": target.url, "schema": target.schema}


# ------------------------------------------------------------------ results ----

def test_results_come_in_item_order(target):
    assert list(sqliteq.map(square, range(300), **options(target))) == [
        n * n for n in range(300)]


def test_a_finished_run_started_again_runs_nothing_and_returns_every_result(target):
    calls: list[int] = []

    def counted(n: int) -> int:
        calls.append(n)
        return -n

    first = list(sqliteq.map(counted, range(50), name="counted", **options(target)))
    second = list(sqliteq.map(counted, range(50), name="counted", **options(target)))
    assert first == second == [-n for n in range(50)]
    assert sorted(calls) == list(range(50))             # each item ran once, in all


def test_a_failed_item_raises_with_its_traceback_and_runs_again_next_time(target):
    with pytest.raises(MapItemFailed, match="item 3 failed: ValueError: three is not "
                                            "allowed") as failed:
        list(sqliteq.map(fails_on_three, range(6), name="sweep", **options(target)))
    failure = failed.value.failure
    assert (failure.index, failure.item) == (3, 3)
    assert "fails_on_three" in failure.traceback
    # Fixed and run again under the same name: only item 3 runs.
    calls: list[int] = []

    def fixed(n: int) -> int:
        calls.append(n)
        return n

    assert list(sqliteq.map(fixed, range(6), name="sweep", **options(target))) == list(range(6))
    assert calls == [3]


def test_errors_return_yields_a_map_error_in_place_of_the_result(target):
    results = list(sqliteq.map(fails_on_three, range(5), errors="return", **options(target)))
    assert results[:3] == [0, 1, 2] and results[4] == 4
    assert isinstance(results[3], MapError)
    assert (results[3].index, results[3].item) == (3, 3)
    assert results[3].error.startswith("ValueError: three is not allowed")


def test_other_items_under_a_used_name_are_refused(target):
    list(sqliteq.map(square, [1, 2, 3], name="fixed", **options(target)))
    with pytest.raises(InvalidInput, match="was started with other items"):
        list(sqliteq.map(square, [1, 2, 4], name="fixed", **options(target)))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"errors": "ignore"}, "errors must be 'raise' or 'return'"),
    ({"workers": 0}, "workers must be an integer >= 1"),
    ({"max_attempts": 0}, "max_attempts must be an integer >= 1"),
    ({"name": " padded "}, "name must be a non-empty string"),
])
def test_bad_arguments_are_refused_before_anything_is_written(db_path, kwargs, message):
    with pytest.raises(InvalidInput, match=message):
        sqliteq.map(square, [1], db=str(db_path), **kwargs)
    assert not db_path.exists()


def test_items_must_be_json(db_path):
    with pytest.raises(InvalidInput, match="item 1"):
        sqliteq.map(square, [1, object()], db=str(db_path))
    assert not db_path.exists()


# -------------------------------------------------------------- processes ----

def test_processes_run_items_in_worker_processes(target):
    pids = list(sqliteq.map(pid_of, range(40), processes=True, workers=2, **options(target)))
    assert len(pids) == 40 and os.getpid() not in pids


# ------------------------------------------------------------------ crashes ----

MAP_SCRIPT = """
import json, os, sys, time
sys.path.insert(0, sys.argv[2])
import sqliteq

def work(n):
    with open(sys.argv[3], "a") as log:         # one line per run started: run, item
        log.write(f"{os.environ['RUN']} {n}\\n")
    time.sleep(0.002)
    return {"n": n, "twice": 2 * n}

if __name__ == "__main__":
    for result in sqliteq.map(work, range(1000), db=sys.argv[1], workers=4):
        print(json.dumps(result), flush=True)
"""


@pytest.mark.sqlite_only
def test_a_map_killed_three_times_returns_every_result_once_and_reruns_nothing_done(
        tmp_path: Path, db_path: Path):
    """SIGKILL at random points, three times, then a run to the end: every result once, in
    order; no item whose job was done before a kill runs again after it."""
    script = tmp_path / "sweep.py"
    script.write_text(MAP_SCRIPT)
    runs_log = tmp_path / "runs.log"
    rng = random.Random()
    done_before: dict[int, set[int]] = {}        # kill number -> items done at that kill

    def start(run: int) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, str(script), str(db_path), str(REPO),
                                 str(runs_log)], stdout=subprocess.PIPE, text=True,
                                env={**clean_env(), "RUN": str(run)})

    for kill in range(3):
        proc = start(kill)
        assert proc.stdout is not None
        for _ in range(rng.randint(20, 250)):     # results printed: the kill lands mid-run
            assert proc.stdout.readline(), "the script ended before it was killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(20)
        with sqliteq.Storage(db_path) as storage:
            done_before[kill] = {
                payload["index"] for _, state, payload
                in storage.jobs._store.jobs_of_queue(next(
                    q.name for q in storage.queues.list() if q.name.startswith("map:")))
                if state == "done"}
        assert done_before[kill]
    last = start(3)
    out, _ = last.communicate(timeout=120)
    assert last.returncode == 0
    assert [json.loads(line) for line in out.splitlines()] == [
        {"n": n, "twice": 2 * n} for n in range(1000)]
    for line in runs_log.read_text().splitlines():
        run_number, item = map(int, line.split())
        for kill, done in done_before.items():
            assert not (run_number > kill and item in done), (
                f"item {item}, done before kill {kill}, ran again in run {run_number}")


# ------------------------------------------------------------------ progress ----

@pytest.mark.sqlite_only
def test_progress_shows_on_a_terminal_and_not_on_a_pipe(tmp_path: Path, db_path: Path):
    code = ("import sys; sys.path.insert(0, sys.argv[2]); import sqliteq;"
            " r = list(sqliteq.map(abs, range(-20, 0), db=sys.argv[1]));"
            " print(r == list(range(20, 0, -1)))")
    piped = subprocess.run([sys.executable, "-c", code, str(db_path), str(REPO)],
                           capture_output=True, text=True, timeout=60, env=clean_env())
    assert (piped.stdout, piped.stderr) == ("True\n", "")
    leader, follower = pty.openpty()
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "tty.db"), str(REPO)],
                          stdout=subprocess.PIPE, stderr=follower, text=True, timeout=60,
                          env=clean_env())
    os.close(follower)
    shown = os.read(leader, 65536).decode()
    os.close(leader)
    assert proc.stdout == "True\n"
    assert "20/20 done, 0 failed" in shown and "ETA" in shown


# ----------------------------------------------------------------------- CLI ----

def test_the_cli_maps_a_module_function_over_json_lines(tmp_path: Path, target: Target):
    (tmp_path / "sweep.py").write_text("def measure(p):\n    return {'x': p['x'] * 10}\n")
    (tmp_path / "items.jsonl").write_text("".join(json.dumps({"x": x}) + "\n"
                                                  for x in range(5)) + "\n")
    result = run("map", "sweep:measure", "items.jsonl", db=target, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert [json.loads(line) for line in result.stdout.splitlines()] == [
        {"x": x * 10} for x in range(5)]


def test_the_cli_stops_at_a_failed_item_with_one_line(tmp_path: Path, target: Target):
    (tmp_path / "sweep.py").write_text("def measure(p):\n    return 1 / p\n")
    (tmp_path / "items.jsonl").write_text("1\n0\n2\n")
    result = run("map", "sweep:measure", "items.jsonl", db=target, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout.splitlines() == ["1.0"]
    assert result.stderr.startswith("sqliteq: error: item 1 failed: ZeroDivisionError")
    assert len(result.stderr.splitlines()) == 1
    going = run("map", "sweep:measure", "items.jsonl", "--keep-going", "--name", "again",
                db=target, cwd=tmp_path)
    lines = [json.loads(line) for line in going.stdout.splitlines()]
    assert going.returncode == 0 and lines[0] == 1.0 and lines[2] == 0.5
    assert lines[1]["index"] == 1 and lines[1]["error"].startswith("ZeroDivisionError")


@pytest.mark.parametrize(("function", "items", "message"), [
    ("sweep", "1\n", "FUNCTION must be module:function"),
    ("nowhere:measure", "1\n", "cannot load 'nowhere:measure'"),
    ("sweep:measure", "1\n{oops\n", "items.jsonl line 2 is not JSON"),
])
def test_the_cli_refuses_bad_input_with_exit_2(tmp_path: Path, db_path: Path, function: str,
                                                items: str, message: str):
    (tmp_path / "sweep.py").write_text("def measure(p):\n    return p\n")
    (tmp_path / "items.jsonl").write_text(items)
    result = run("map", function, "items.jsonl", db=db_path, cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.splitlines()) == 1
    assert not db_path.exists()
