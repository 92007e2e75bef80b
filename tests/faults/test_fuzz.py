"""Fuzz: arbitrary requests, through the library and through `sqliteq enqueue-bulk`.

Every input either is refused with one InvalidInput (a CLI exit 2 with one line) and writes
nothing, or is accepted; every accepted job reads back as it was given, is listed, and runs
to `done` with its payload intact. Hypothesis drives the inputs; the CLI runs in-process
(click's runner) so that hundreds of inputs fit in seconds.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sqliteq
from sqliteq import EnqueueRequest, InvalidInput

# SQLITEQ_SOAK=1 (the soak of README "Development") tries ten times as many inputs.
SCALE = 10 if os.environ.get("SQLITEQ_SOAK") else 1
# The default run is the same every time (a CI failure reproduces); the soak explores.
SETTINGS = settings(max_examples=300 * SCALE, deadline=None, database=None,
                    derandomize=not SCALE > 1, suppress_health_check=[HealthCheck.too_slow])

def mostly(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Good values three times in four: each of seven fields may spoil a request, and the
    fuzz must accept enough of them to show that what it accepts runs."""
    return st.integers(min_value=0, max_value=3).flatmap(lambda i: good if i else bad)


# Any name is text without surrounding spaces; refused: empty, padded, lone surrogates, not
# text at all.
names = mostly(st.text(min_size=1, max_size=12).filter(lambda t: t == t.strip()),
               st.one_of(st.just(""), st.just(" padded "), st.just("a\ud800b"), st.integers(),
                         st.binary(max_size=4)))
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
payloads = mostly(
    st.recursive(json_scalars, lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=6), children,
                                                        max_size=4)), max_leaves=20),
    st.one_of(st.integers(min_value=95, max_value=110).map(lambda depth: nested(depth)),
              st.just({1, 2}), st.just(object()), st.just(b"bytes"), st.just(float("nan")),
              st.just({"x": float("inf")}), st.just({1: "int key"})))
instants = mostly(
    st.one_of(st.none(), st.floats(min_value=0, max_value=2e9),
              st.datetimes(min_value=datetime(1970, 1, 2), timezones=st.just(timezone.utc))),
    st.one_of(st.floats(allow_nan=True, allow_infinity=True),
              st.integers(min_value=-2**70, max_value=2**70),
              st.datetimes(timezones=st.none() | st.just(timezone.utc)), st.text(max_size=8)))
numbers = mostly(st.integers(min_value=-9, max_value=9),
                 st.one_of(st.integers(min_value=-2**70, max_value=2**70), st.booleans(),
                           st.floats(), st.text(max_size=4)))
attempts = mostly(st.none() | st.integers(min_value=1, max_value=9), numbers)
unique_keys = mostly(st.none(), names)


def nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth - 1):
        value = [value]
    return value


def stored_form(payload: Any) -> Any:
    """What a payload reads back as: JSON's view of it."""
    return json.loads(json.dumps(payload))


def total(storage: sqliteq.Storage) -> int:
    return sum(storage.jobs.counts().values())


@pytest.fixture
def storage(tmp_path: Path) -> Iterator[sqliteq.Storage]:
    with sqliteq.Storage(tmp_path / "fuzz.db") as storage:
        yield storage


def run_all(storage: sqliteq.Storage, accepted: dict[str, Any]) -> None:
    """Every accepted job runs to done, its handler seeing (and returning) its payload."""
    queues = {job.queue for job in storage.jobs.list(limit=len(accepted))}
    kinds = {job.kind for job in storage.jobs.list(limit=len(accepted))}
    runtime = sqliteq.Runtime(storage, dict.fromkeys(queues, 2), poll_interval=0.02,
                              heartbeat_interval=0.1, lease_timeout=5)
    for kind in kinds:
        runtime.register(kind, lambda ctx, payload: payload)
    # Far-future jobs are made due now: "runnable" is about the row, not the clock.
    storage.db.write(lambda conn: conn.execute("UPDATE jobs SET run_at = 0"))
    with runtime:
        for job_id, payload in accepted.items():
            job = storage.jobs.wait(job_id, timeout=60)
            assert job.state.value == "done", job
            assert job.result == payload


def test_any_enqueue_request_is_refused_cleanly_or_stored_listed_and_runnable(
        storage: sqliteq.Storage) -> None:
    accepted: dict[str, Any] = {}
    refused: list[str] = []

    @SETTINGS
    @given(kind=names, payload=payloads, queue=st.none() | names, priority=numbers,
           run_at=instants, max_attempts=attempts, unique_key=unique_keys)
    def enqueue_one(kind: Any, payload: Any, queue: Any, priority: Any, run_at: Any,
                    max_attempts: Any, unique_key: Any) -> None:
        before = total(storage)
        try:
            request = EnqueueRequest(kind, payload, queue_name=queue, priority=priority,
                                     run_at=run_at, max_attempts=max_attempts,
                                     unique_key=unique_key)
            outcome = storage.jobs.enqueue(request)
        except InvalidInput as exc:
            assert "\n" not in str(exc)
            assert total(storage) == before
            refused.append(str(exc))
            return
        job = storage.jobs.get(outcome.job_id)
        assert job is not None
        if not outcome.created:                 # deduplicated on its unique key
            assert job.unique_key == unique_key and total(storage) == before
            return
        assert (job.kind, job.queue, job.priority, job.unique_key) == (
            kind, queue or sqliteq.DEFAULT_QUEUE, priority, unique_key)
        assert job.payload == stored_form(payload)
        assert job.max_attempts == (max_attempts or sqliteq.DEFAULT_MAX_ATTEMPTS)
        accepted[outcome.job_id] = job.payload

    enqueue_one()
    listed = {job.id for job in storage.jobs.list(limit=10_000 * SCALE)}
    assert listed == set(accepted)
    assert accepted and refused, "the fuzz reached one outcome only: its strategies are off"
    print(f"\nEnqueueRequest fuzz: {len(accepted) + len(refused)} requests, {len(accepted)} "
          f"accepted and run, {len(refused)} refused")
    run_all(storage, accepted)


# ------------------------------------------------------ sqliteq enqueue-bulk ----

line_fields = st.fixed_dictionaries({}, optional={
    "kind": names, "payload": payloads, "queue": names, "priority": numbers,
    "delay": st.one_of(st.text(max_size=5), numbers), "run_at": instants,
    "max_attempts": numbers, "unique_key": names, "colour": st.text(max_size=3)})


def as_line(value: Any) -> str:
    """One JSON Lines record, or garbage where the value is not JSON."""
    if isinstance(value, datetime):
        value = value.isoformat()
    try:
        return json.dumps(value, default=lambda v: v.isoformat() if isinstance(v, datetime)
                          else repr(v))
    except (TypeError, ValueError, RecursionError):
        return repr(value)


good_kinds = st.text(min_size=1, max_size=8).filter(lambda t: t == t.strip() and t.isprintable())
good_lines = st.fixed_dictionaries({"kind": good_kinds}, optional={
    "payload": st.recursive(json_scalars.filter(lambda v: not (isinstance(v, float) and not
                                                               math.isfinite(v))),
                            lambda children: st.lists(children, max_size=3), max_leaves=8),
    "priority": st.integers(min_value=-5, max_value=5), "delay": st.sampled_from(["1s", 2]),
    "max_attempts": st.integers(min_value=1, max_value=9)}).map(as_line)
# Mostly good records, so that whole batches get through; any one bad record refuses all.
record = mostly(good_lines, st.one_of(st.just(""), line_fields.map(as_line),
                                      st.text(max_size=20), json_scalars.map(as_line)))
lines = st.lists(record, min_size=1, max_size=5)


def test_any_json_lines_input_is_refused_with_one_line_or_enqueued_whole(
        tmp_path: Path) -> None:
    path = tmp_path / "bulk.db"
    sqliteq.Storage(path).close()
    cli = sqliteq._cli()
    runner = CliRunner()
    accepted: dict[str, Any] = {}
    refused: list[str] = []

    @settings(SETTINGS, max_examples=150 * SCALE)
    @given(records=lines)
    def enqueue_lines(records: list[str]) -> None:
        text = "".join(f"{record}\n" for record in records)
        with sqliteq.Storage(path) as storage:
            before = total(storage)
        result = runner.invoke(cli, ["--db", str(path), "enqueue-bulk", "--json", "-"],
                               input=text)
        with sqliteq.Storage(path) as storage:
            if result.exit_code != 0:
                assert result.exit_code == 2, (text, result.output, result.exception)
                assert result.stdout == ""
                error = result.stderr.splitlines()
                assert len(error) == 1 and error[0].startswith("sqliteq: error: line "), error
                assert total(storage) == before
                refused.append(error[0])
                return
            outcome = json.loads(result.stdout)
            assert len(outcome["job_ids"]) == sum(1 for r in records if r.strip())
            for job_id, record in zip(outcome["job_ids"], (r for r in records if r.strip()),
                                      strict=True):
                job = storage.jobs.get(job_id)
                assert job is not None
                fields = json.loads(record)
                assert job.kind == fields["kind"]
                if job_id not in accepted and job.state.value == "queued":
                    accepted[job_id] = job.payload

    enqueue_lines()
    assert accepted and refused, "the fuzz reached one outcome only: its strategies are off"
    print(f"\nenqueue-bulk fuzz: {len(refused)} inputs refused, {len(accepted)} jobs accepted "
          f"and run")
    with sqliteq.Storage(path) as storage:
        run_all(storage, accepted)
