"""Job dependencies: `EnqueueRequest(depends_on=[...])` waits for its parents.

A job with parents is `waiting` until every parent is done; a parent that ends failed or
cancelled cancels its waiting children (naming it), and theirs in turn, unless a child
allows parent failure. Readiness is settled in the commit that ends the parent. A graph is
enqueued in one bulk call, its ids minted up front with `new_id()`; unknown parents and
cycles are refused with nothing written. Every test runs on both stores.
"""

from __future__ import annotations

import json
import random
import time
from collections import defaultdict
from pathlib import Path

import pytest
from support import Target, buffered, file_at_schema, ok, raw, rounds, run_buffered
from workers import Cluster, query

import sqliteq
from sqliteq import EnqueueRequest, InvalidInput, JobState, new_id


def state(storage: sqliteq.Storage, job_id: str) -> str:
    return storage.jobs.get(job_id).state.value


def everything_empty(storage: sqliteq.Storage) -> bool:
    return sum(storage.jobs.counts().values()) == 0


def mark_done(storage: sqliteq.Storage, job_id: str, result: str | None = None) -> None:
    """End a job `done` behind the runtime's back, as a worker's finish would."""
    storage.db.write(lambda conn: conn.execute(
        "UPDATE jobs SET state = 'done', result = ?, finished_at = 1 WHERE id = ?",
        (result, job_id)))


# ------------------------------------------------------------------ waiting ----

def test_a_job_waits_until_every_parent_is_done_then_reads_their_results(storage,
                                                                          make_runtime):
    a, b = new_id(), new_id()
    outcomes = storage.jobs.enqueue_bulk([
        EnqueueRequest("join", depends_on=[a, b]),          # parents later in the same call
        EnqueueRequest("square", 3, job_id=a),
        EnqueueRequest("square", 4, job_id=b, queue_name="other")])
    join = outcomes[0].job_id
    waiting = storage.jobs.get(join)
    assert (waiting.state, waiting.depends_on, waiting.waiting_on) == (JobState.WAITING,
                                                                       (a, b), 2)
    assert storage.jobs.counts()["waiting"] == 1
    assert storage.jobs.children(a) == [join]

    seen: list[dict] = []

    def on_join(ctx: sqliteq.JobCtx, payload: object) -> int:
        seen.append(ctx.parent_results())
        return sum(ctx.parent_results().values())

    rt = make_runtime({"default": 2, "other": 1})
    rt.register("square", lambda ctx, n: n * n)
    rt.register("join", on_join)
    rt.start()
    assert storage.jobs.wait(join, timeout=20).result == 25
    assert seen == [{a: 9, b: 16}]                  # in depends_on order
    assert storage.jobs.get(join).waiting_on == 0


def test_readiness_is_settled_in_the_commit_that_finishes_the_parent(storage):
    """One slot: the round that commits the parent's end already claims its child."""
    parent = storage.jobs.enqueue(EnqueueRequest("k", "p")).job_id
    child = storage.jobs.enqueue(EnqueueRequest("k", "c", depends_on=[parent])).job_id
    rt, dispatcher, clock = rounds(storage, handler=lambda ctx, payload: payload)
    clock.now = max(clock.now, int(storage.jobs.get(child).run_at.timestamp() * 1000))
    dispatcher.step(clock.now_ms())
    assert run_buffered(rt) == 1                    # the parent (the child waits)
    assert (state(storage, parent), state(storage, child)) == ("running", "waiting")
    dispatcher.step(clock.now_ms())
    assert (state(storage, parent), state(storage, child)) == ("done", "running")
    assert [job.id for job in buffered(rt)] == [child]


def test_a_child_of_parents_already_done_is_ready_at_once(storage):
    parent = storage.jobs.enqueue(EnqueueRequest("k")).job_id
    mark_done(storage, parent, "7")
    child = storage.jobs.enqueue(EnqueueRequest("k", depends_on=[parent])).job_id
    assert (state(storage, child), storage.jobs.get(child).waiting_on) == ("queued", 0)
    later = storage.jobs.enqueue(EnqueueRequest("k", depends_on=[parent],
                                                run_at=time.time() + 3600)).job_id
    assert state(storage, later) == "queued"        # (queued means: waiting for run_at)
    assert storage.jobs.parent_results(child) == {parent: 7}


# ----------------------------------------------------------------- failures ----

def test_a_failed_parent_cancels_its_descendants_naming_it(storage, make_runtime):
    bad, good = new_id(), new_id()
    child, grandchild, tolerant = new_id(), new_id(), new_id()
    storage.jobs.enqueue_bulk([
        EnqueueRequest("boom", job_id=bad),
        EnqueueRequest("ok", job_id=good),
        EnqueueRequest("ok", job_id=child, depends_on=[good, bad]),
        EnqueueRequest("ok", job_id=grandchild, depends_on=[child]),
        EnqueueRequest("report", job_id=tolerant, depends_on=[bad, good],
                       allow_parent_failure=True)])

    def boom(ctx: sqliteq.JobCtx, payload: object) -> None:
        raise sqliteq.Dead("broken input")

    rt = make_runtime({"default": 2})
    rt.register("boom", boom)
    rt.register("ok", lambda ctx, payload: "ok")
    rt.register("report", lambda ctx, payload: ctx.parent_results())
    rt.start()
    assert storage.jobs.wait(tolerant, timeout=20).result == {bad: None, good: "ok"}
    for job_id, parent in ((child, bad), (grandchild, child)):
        job = storage.jobs.wait(job_id, timeout=20)
        assert job.state is JobState.CANCELLED
        assert job.errors[-1]["error"] in (f"parent {parent} failed",
                                           f"parent {parent} cancelled")
        assert job.attempt == 0                     # never ran
    assert storage.jobs.get(grandchild).errors[-1]["error"] == f"parent {child} cancelled"


def test_cancelling_a_waiting_parent_cancels_its_children(storage):
    parent = storage.jobs.enqueue(EnqueueRequest("k", run_at=time.time() + 3600)).job_id
    child = storage.jobs.enqueue(EnqueueRequest("k", depends_on=[parent])).job_id
    assert storage.jobs.cancel(parent) == "cancelled"
    job = storage.jobs.get(child)
    assert job.state is JobState.CANCELLED
    assert job.errors[-1]["error"] == f"parent {parent} cancelled"
    assert job.finished_at is not None


def test_a_child_of_a_parent_that_already_failed_is_cancelled_on_enqueue(storage):
    parent = storage.jobs.enqueue(EnqueueRequest("k")).job_id
    storage.jobs.cancel(parent)
    child = storage.jobs.enqueue(EnqueueRequest("k", depends_on=[parent])).job_id
    assert state(storage, child) == "cancelled"
    assert storage.jobs.get(child).errors[-1]["error"] == f"parent {parent} cancelled"
    tolerant = storage.jobs.enqueue(EnqueueRequest("k", depends_on=[parent],
                                                   allow_parent_failure=True)).job_id
    assert state(storage, tolerant) == "queued"


def test_deleting_a_waiting_parent_cancels_its_children_and_leaves_no_edges(storage, sql):
    parent = storage.jobs.enqueue(EnqueueRequest("k", run_at=time.time() + 3600)).job_id
    child = storage.jobs.enqueue(EnqueueRequest("k", depends_on=[parent])).job_id
    assert storage.jobs.delete(parent)
    assert state(storage, child) == "cancelled"
    assert storage.jobs.get(child).errors[-1]["error"] == f"parent {parent} deleted"
    assert storage.jobs.delete(child)
    assert sql("SELECT count(*) FROM job_deps") == [(0,)]


# ---------------------------------------------------------- refused graphs ----

def test_an_unknown_parent_is_refused_and_nothing_is_written(storage):
    ghost = new_id()
    with pytest.raises(InvalidInput, match=f"request 1: depends_on names {ghost}, which is "
                                           f"not a job"):
        storage.jobs.enqueue_bulk([EnqueueRequest("k"),
                                   EnqueueRequest("k", depends_on=[ghost])])
    with pytest.raises(InvalidInput, match="not a job"):
        storage.jobs.enqueue(EnqueueRequest("k", depends_on=[ghost]))
    assert everything_empty(storage)


def test_a_cycle_is_refused_and_nothing_is_written(storage):
    a, b, c = new_id(), new_id(), new_id()
    with pytest.raises(InvalidInput, match="depends_on makes a cycle"):
        storage.jobs.enqueue_bulk([EnqueueRequest("k", job_id=a, depends_on=[c]),
                                   EnqueueRequest("k", job_id=b, depends_on=[a]),
                                   EnqueueRequest("k", job_id=c, depends_on=[b])])
    with pytest.raises(InvalidInput, match="depends_on makes a cycle"):
        storage.jobs.enqueue(EnqueueRequest("k", job_id=a, depends_on=[a]))
    assert everything_empty(storage)


def test_job_ids_given_twice_or_taken_are_refused(storage):
    taken = storage.jobs.enqueue(EnqueueRequest("k")).job_id
    fresh = new_id()
    with pytest.raises(InvalidInput, match=f"request 1: job_id {fresh} is given twice"):
        storage.jobs.enqueue_bulk([EnqueueRequest("k", job_id=fresh),
                                   EnqueueRequest("k", job_id=fresh)])
    with pytest.raises(InvalidInput, match=f"job_id {taken} is taken by an existing job"):
        storage.jobs.enqueue(EnqueueRequest("k", job_id=taken))
    assert storage.jobs.counts()["queued"] == 1


@pytest.mark.parametrize("bad", ["", "not-an-id", 42, "0" * 27])
def test_malformed_ids_are_refused_on_construction(bad):
    with pytest.raises(InvalidInput, match="must be a job id"):
        EnqueueRequest("k", depends_on=[bad])
    with pytest.raises(InvalidInput, match="must be a job id"):
        EnqueueRequest("k", job_id=bad)


def test_depends_on_must_be_a_list_and_the_flag_a_bool():
    with pytest.raises(InvalidInput, match="depends_on must be a list"):
        EnqueueRequest("k", depends_on=new_id())
    with pytest.raises(InvalidInput, match="allow_parent_failure must be True or False"):
        EnqueueRequest("k", depends_on=[new_id()], allow_parent_failure="yes")


def test_a_parent_whose_request_a_unique_key_merged_is_the_job_holding_the_key(storage):
    holder = storage.jobs.enqueue(EnqueueRequest("k", unique_key="nightly")).job_id
    minted = new_id()
    outcomes = storage.jobs.enqueue_bulk([
        EnqueueRequest("k", job_id=minted, unique_key="nightly"),
        EnqueueRequest("k", depends_on=[minted])])
    assert outcomes[0] == sqliteq.EnqueueOutcome(holder, False)
    child = storage.jobs.get(outcomes[1].job_id)
    assert (child.depends_on, child.waiting_on) == ((holder,), 1)
    assert storage.jobs.children(holder) == [child.id]


def test_retrying_a_failed_parent_and_its_cancelled_child_runs_them_in_order(storage,
                                                                             make_runtime):
    parent, child = new_id(), new_id()
    storage.jobs.enqueue_bulk([EnqueueRequest("flaky", job_id=parent, max_attempts=1),
                               EnqueueRequest("after", job_id=child, depends_on=[parent])])
    broken = [True]

    def flaky(ctx: sqliteq.JobCtx, payload: object) -> str:
        if broken[0]:
            raise RuntimeError("not yet")
        return "fixed"

    rt = make_runtime({"default": 2})
    rt.register("flaky", flaky)
    rt.register("after", lambda ctx, payload: ctx.parent_results()[parent])
    rt.start()
    assert storage.jobs.wait(child, timeout=20).state is JobState.CANCELLED
    assert storage.jobs.retry(child)                # first the child: it waits again
    assert (state(storage, child), storage.jobs.get(child).waiting_on) == ("waiting", 1)
    broken[0] = False
    assert storage.jobs.retry_failed() == 1         # the parent
    assert storage.jobs.wait(child, timeout=20).result == "fixed"


def test_a_retried_child_whose_parents_are_done_is_ready_at_once(storage):
    parent = storage.jobs.enqueue(EnqueueRequest("k")).job_id
    child = storage.jobs.enqueue(EnqueueRequest("k", depends_on=[parent])).job_id
    mark_done(storage, parent)
    storage.db.write(lambda conn: conn.execute(
        "UPDATE jobs SET state = 'failed', finished_at = 1 WHERE id = ?", (child,)))
    assert storage.jobs.retry_failed() == 1
    assert (state(storage, child), storage.jobs.get(child).waiting_on) == ("queued", 0)


# -------------------------------------------------------------- bookkeeping ----

def test_a_fan_in_settles_each_edge_once(storage, sql, make_runtime):
    """1,000 parents joined by one child: the join waits for the last, and runs once."""
    parents = [new_id() for _ in range(1000)]
    requests = [EnqueueRequest("leaf", job_id=p) for p in parents]
    outcomes = storage.jobs.enqueue_bulk([*requests, EnqueueRequest("join",
                                                                    depends_on=parents)])
    join = outcomes[-1].job_id
    rt = make_runtime({"default": 4})
    rt.register("leaf", lambda ctx, payload: 1)
    rt.register("join", lambda ctx, payload: sum(ctx.parent_results().values()))
    rt.start()
    job = storage.jobs.wait(join, timeout=60)
    assert (job.state, job.result, job.attempt) == (JobState.DONE, 1000, 1)
    assert sql("SELECT count(*), sum(settled) FROM job_deps") == [(1000, 1000)]


def test_a_retried_parent_does_not_count_twice(storage):
    """A child that allows failure counts a failed parent off; the parent's later success
    (after a retry, run by a runtime) must not count it off again."""
    first, second = new_id(), new_id()
    storage.jobs.enqueue_bulk([EnqueueRequest("k", job_id=first),
                               EnqueueRequest("k", job_id=second, queue_name="later")])
    child = storage.jobs.enqueue(EnqueueRequest("k", depends_on=[first, second],
                                                allow_parent_failure=True,
                                                queue_name="later")).job_id
    storage.jobs.cancel(first)
    assert storage.jobs.get(child).waiting_on == 1
    assert storage.jobs.retry(first)
    rt, dispatcher, clock = rounds(storage)             # serves "default" only
    dispatcher.step(clock.now_ms())
    assert run_buffered(rt) == 1
    dispatcher.step(clock.now_ms())
    assert state(storage, first) == "done"
    assert (state(storage, child), storage.jobs.get(child).waiting_on) == ("waiting", 1)


# ---------------------------------------------------------------- migration ----

@pytest.mark.sqlite_only
def test_a_file_of_schema_8_gains_dependencies_keeping_every_job(db_path: Path):
    conn = file_at_schema(db_path, 8)
    ids = {"queued": new_id(), "running": new_id(), "done": new_id()}
    with conn:
        now = sqliteq.now_ms()
        for job_state, job_id in ids.items():
            conn.execute("INSERT INTO jobs (id, kind, queue, payload, state, run_at, created_at,"
                         " timeout_ms, progress, result) VALUES (?, 'k', 'default', '1', ?, ?,"
                         " ?, 1500, '[1,2,null]', '\"r\"')", (job_id, job_state, now, now))
    conn.close()
    with sqliteq.Storage(db_path) as storage:
        jobs = {job.id: job for job in storage.jobs.list()}
        assert {job.state.value: job_id for job_id, job in jobs.items()} == ids
        queued = jobs[ids["queued"]]
        assert (queued.timeout, queued.progress, queued.depends_on) == (
            1.5, sqliteq.JobProgress(1, 2), ())
        child = storage.jobs.enqueue(EnqueueRequest("k", depends_on=list(ids.values())))
        assert storage.jobs.get(child.job_id).waiting_on == 2       # done counts off at once
        assert storage.jobs.parent_results(child.job_id)[ids["done"]] == "r"
    assert raw(db_path, "PRAGMA user_version") == [(sqliteq.SCHEMA_VERSION,)]


# ------------------------------------------------------- across processes ----

def test_graphs_run_in_order_across_processes_killed_at_random(cluster_db: Target,
                                                               cluster: Cluster):
    """Diamonds (root -> 4 middles -> join) run by 3 worker processes, one SIGKILLed every
    0.3-0.8 s and replaced: every job ends done, and no job started before all its
    parents had finished."""
    rng = random.Random()
    requests, parents_of = [], {}
    for _group in range(40):
        root, join = new_id(), new_id()
        middles = [new_id() for _ in range(4)]
        requests.append(EnqueueRequest("record", {"ms": rng.randint(0, 40)}, job_id=root,
                                       max_attempts=100))
        for middle in middles:
            requests.append(EnqueueRequest("record", {"ms": rng.randint(0, 40)},
                                           job_id=middle, depends_on=[root], max_attempts=100))
            parents_of[middle] = [root]
        requests.append(EnqueueRequest("record", {"ms": 0}, job_id=join, depends_on=middles,
                                       max_attempts=100))
        parents_of[join] = middles
    with cluster_db.open() as storage:
        storage.jobs.enqueue_bulk(requests)
    live = [cluster.start(slots=4, poll=0.02, heartbeat=0.2, lease=1.0) for _ in range(3)]
    for _kill in range(8):
        time.sleep(rng.uniform(0.3, 0.8))
        victim = rng.choice(live)
        victim.kill()
        live[live.index(victim)] = cluster.start(slots=4, poll=0.02, heartbeat=0.2, lease=1.0)

    def finished() -> bool:
        return query(cluster_db, "SELECT count(*) FROM jobs WHERE state IN"
                                 " ('done', 'failed', 'cancelled')")[0][0] == len(requests)

    cluster.wait_for(finished, 90, "every job of the graphs to finish")
    states = dict(query(cluster_db, "SELECT id, state FROM jobs"))
    assert set(states.values()) == {"done"}
    finished_at = dict(query(cluster_db, "SELECT id, finished_at FROM jobs"))
    first_start: dict[str, int] = defaultdict(lambda: 1 << 62)
    for job_id, at in query(cluster_db, "SELECT job_id, at FROM side"):
        first_start[job_id] = min(first_start[job_id], at)
    assert set(first_start) == set(states)
    early = [child for child, parents in parents_of.items()
             if first_start[child] < max(finished_at[p] for p in parents)]
    assert early == []


def test_a_copy_carries_waiting_jobs_and_their_links(storage, tmp_path: Path):
    done, queued = new_id(), new_id()
    storage.jobs.enqueue_bulk([EnqueueRequest("k", job_id=done),
                               EnqueueRequest("k", job_id=queued)])
    mark_done(storage, done, "1")
    child = storage.jobs.enqueue(EnqueueRequest("k", depends_on=[done, queued])).job_id
    with sqliteq.Storage(tmp_path / "copy.db") as copy:
        report = storage.copy_to(copy)
        assert (report.jobs, report.dependencies) == (2, 2)
        assert (state(copy, child), copy.jobs.get(child).waiting_on) == ("waiting", 1)
        assert copy.jobs.cancel(queued) == "cancelled"      # its end reaches the child
        assert state(copy, child) == "cancelled"


def test_sqliteq_job_shows_parents_what_it_waits_on_and_children(storage, target: Target):
    done, pending = new_id(), new_id()
    storage.jobs.enqueue_bulk([EnqueueRequest("k", job_id=done),
                               EnqueueRequest("k", job_id=pending)])
    mark_done(storage, done)
    child = storage.jobs.enqueue(EnqueueRequest("k", depends_on=[done, pending])).job_id
    shown = json.loads(ok("job", child, "--json", db=target))
    assert shown["parents"] == [{"id": done, "state": "done"},
                                {"id": pending, "state": "queued"}]
    assert (shown["waiting_on"], shown["children"], shown["state"]) == ([pending], [],
                                                                          "waiting")
    text = ok("job", pending, db=target)
    assert f"children:         {child}" in text
    text = ok("job", child, db=target)
    assert f"parents:          {done} (done), {pending} (queued)" in text
    assert f"waiting_on:       {pending}" in text


def test_a_parent_failed_by_the_reaper_cancels_its_children(storage, sql):
    """The reaper ends a lost job that was on its last attempt: its children learn of it
    in the same commit."""
    parent = storage.jobs.enqueue(EnqueueRequest("k", max_attempts=1)).job_id
    child = storage.jobs.enqueue(EnqueueRequest("k", depends_on=[parent])).job_id
    sql("UPDATE jobs SET state = 'running', attempt = 1, lease = 7, host = 'gone'"
        " WHERE id = ?", parent)
    now = sqliteq.now_ms()
    assert storage.db.write(lambda conn: storage._store.rescue(conn, now, now)) == 1
    assert (state(storage, parent), state(storage, child)) == ("failed", "cancelled")
    assert storage.jobs.get(child).errors[-1]["error"] == f"parent {parent} failed"
