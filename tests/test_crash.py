"""Crashes: worker processes killed with SIGKILL or frozen with SIGSTOP lose no job, and a
rescued job is never overwritten by its old worker (fencing).

Real processes (`tests/workers.py`), real signals, a real file in tmp_path or a real schema on
the local PostgreSQL server (every test runs on both). Waits poll the database with generous
deadlines; nothing asserts that something happened "by now".
"""

from __future__ import annotations

import json
import random
import signal
import time
from collections import Counter, defaultdict

import pytest
from support import Target
from workers import (
    Child,
    Cluster,
    WaitTimeout,
    events,
    host_of,
    query,
    release,
)

import sqliteq
from sqliteq import EnqueueRequest


def job_row(cluster_db: Target, job_id: str) -> dict:
    keys = ("state", "attempt", "lease", "host", "worker", "result", "errors", "finished_at")
    rows = query(cluster_db, f"SELECT {', '.join(keys)} FROM jobs WHERE id = ?", job_id)
    return dict(zip(keys, rows[0], strict=True))


# ------------------------------------------------------- SIGKILL storm ----

# Jobs, and seconds over which they become due so that kills hit a busy cluster; on
# PostgreSQL (every commit an fsync on the server, every claim a round trip) half as many.
JOBS = {"sqlite": 3000, "postgres": 1500}
SPREAD = {"sqlite": 20.0, "postgres": 10.0}
MIN_KILLS = 12


def test_sigkilled_workers_lose_no_job(cluster_db: Target, cluster: Cluster):
    """3 workers, JOBS jobs, a random worker SIGKILLed every 0.3-0.8 s for SPREAD seconds
    (>= 12 times) and replaced at once. Every job must end `done`, must have run (a `side`
    row), and must have been finalized exactly once.

    "Exactly once" is checked from the database's own history: a trigger (tests/workers.py)
    copies every UPDATE of `jobs` into `audit` inside the same transaction, so the audit is
    the exact, commit-ordered list of claims, rescues and finalizes. For every job it must
    read: (claim, rescue)* claim, done -- where a claim is queued->running with a fresh lease
    and attempt+1, a rescue is running->queued ending that claim's lease, and done is
    running->done under the lease of the last claim. Any second finalize shows up as a
    second `done` entry (a done->done overwrite included, since the trigger fires on every
    UPDATE), and any finalize by a stale claim shows up as a result whose (host, attempt,
    lease) -- reported by the handler that produced it -- is not the last claim's. The
    counters agree independently: `attempt` (claims) == 1 + number of "worker lost" errors
    (one per rescue), and the job has no other error.
    """
    total, spread = JOBS[repr(cluster_db)], SPREAD[repr(cluster_db)]
    # A burst due at once (claim batches, prefetched buffers, heavy write contention), the
    # rest due evenly over spread seconds so that every kill lands on a busy cluster. Some
    # handlers are instant, the others dawdle so that kills catch them mid-run.
    # max_attempts is high: every job must end done however many kills catch it.
    rng = random.Random()
    now = time.time()
    burst = total // 5
    requests = [EnqueueRequest("record", {"ms": rng.choice((0, rng.randint(5, 100)))},
                               max_attempts=100,
                               run_at=now + spread * max(0, i - burst) / (total - burst))
                for i in range(total)]
    with cluster_db.open() as storage:
        job_ids = [out.job_id for out in storage.jobs.enqueue_bulk(requests)]

    def spawn() -> Child:
        return cluster.start(slots=4, poll=0.02, heartbeat=0.2, lease=1.0)

    live = [spawn() for _ in range(3)]
    kills = 0
    started = time.monotonic()
    while kills < MIN_KILLS or time.monotonic() - started < spread:
        time.sleep(rng.uniform(0.3, 0.8))
        victim = rng.choice(live)
        victim.kill()
        kills += 1
        live[live.index(victim)] = spawn()

    def all_finished() -> bool:
        rows = query(cluster_db, "SELECT count(*) FROM jobs"
                                 " WHERE state IN ('done','failed','cancelled')")
        return rows[0][0] == total

    cluster.wait_for(all_finished, 90, "every job to finish after the kills")

    # The survivors stop cleanly and nothing was logged at ERROR level anywhere. (A
    # replacement may still be starting up: SIGTERM it only once its runtime runs.)
    for child in live:
        cluster.wait_registered(child)
        assert child.terminate() == 0, child.stderr()
    for child in cluster.children:
        assert "Traceback" not in child.stderr(), child.stderr()

    states = Counter(state for (state,) in query(cluster_db, "SELECT state FROM jobs"))
    assert states == {"done": total}

    side = defaultdict(set)
    for job_id, lease, attempt, host in query(cluster_db,
                                              "SELECT job_id, lease, attempt, host FROM side"):
        side[job_id].add((host, attempt, lease))
    assert set(side) == set(job_ids), "some job never ran its handler"

    history = defaultdict(list)
    for row in query(cluster_db, "SELECT job_id, old_state, new_state, old_lease, new_lease,"
                         " old_attempt, new_attempt, host, result FROM audit ORDER BY seq"):
        history[row[0]].append(row[1:])

    rescues = 0
    problems = []
    for job_id in job_ids:
        final = job_row(cluster_db, job_id)
        errors = json.loads(final["errors"] or "[]")
        lost = [e for e in errors if e["error"].startswith("worker lost")]
        # A scheduled job coming due (scheduled -> queued) is no step of a claim's life.
        steps = [s for s in history[job_id] if s[:2] != ("scheduled", "queued")]
        claims = [s for s in steps if s[:2] == ("queued", "running")]
        dones = [s for s in steps if s[1] == "done"]
        job_rescues = [s for s in steps if s[:2] == ("running", "queued")]
        rescues += len(job_rescues)
        expected_shape = [("queued", "running"), ("running", "queued")] * len(claims)
        expected_shape[-1:] = [("running", "done")]
        shape = [s[:2] for s in steps]
        result = json.loads(final["result"]) if final["result"] else None
        checks = {
            "history is (claim, rescue)* claim done": shape == expected_shape,
            "exactly one finalize": len(dones) == 1,
            "each claim: fresh lease, attempt + 1": all(
                c[3] is not None and c[5] == c[4] + 1 for c in claims),
            "each rescue/done ends the preceding claim's lease": all(
                steps[i + 1][2] == steps[i][3] for i in range(0, len(steps) - 1, 2)),
            "done keeps the last claim's lease": bool(dones) and dones[0][3] == claims[-1][3]
            == final["lease"],
            "result is from the last claim": result == {
                "host": final["host"], "attempt": final["attempt"], "lease": final["lease"]},
            "the last claim ran its handler": (final["host"], final["attempt"], final["lease"])
            in side[job_id],
            "attempt == 1 + rescues": final["attempt"] == len(claims) == 1 + len(lost)
            == 1 + len(job_rescues),
            "no error but 'worker lost'": len(errors) == len(lost) < sqliteq.MAX_ERRORS_KEPT,
        }
        failed = [name for name, ok in checks.items() if not ok]
        if failed:
            problems.append((job_id, failed, final, steps))
    runs = sum(len(s) for s in side.values())
    print(f"\nkills={kills} rescues={rescues} handler runs={runs} for {total} jobs")
    assert not problems, (f"{len(problems)} job(s) broke the history invariant; first ones "
                          f"(job, failed checks, final row, audit history): {problems[:2]}")
    # The kills must actually have hit jobs in flight, or this test proves nothing.
    assert kills >= MIN_KILLS and rescues >= 1


# ------------------------------------------------------------ fencing ----

def test_stale_worker_cannot_overwrite_rescued_job(cluster_db: Target, cluster: Cluster):
    """A claims the job and is frozen (SIGSTOP) mid-handler; B's reaper rescues the job and
    B runs it to done with result "B". A is then thawed and its handler returns "A": the
    job stays exactly as B left it, and A's token said "lost"."""
    with cluster_db.open() as storage:
        job_id = storage.jobs.enqueue(EnqueueRequest("stubborn")).job_id
        a = cluster.start("A", role="A", slots=1, heartbeat=0.2, lease=1.0)
        host_a = cluster.wait_registered(a)
        cluster.wait_for(lambda: events(cluster_db, job_id, "started"), 20, "A to start the job")
        assert job_row(cluster_db, job_id)["host"] == host_a
        cluster.freeze(a)
        a.expected_dead = True          # stopped on purpose; thawed later

        b = cluster.start("B", role="B", slots=1, heartbeat=0.2, lease=1.0)
        done = storage.jobs.wait(job_id, timeout=30)
        host_b = host_of(cluster_db, b.pid)
        assert done.state == "done" and done.result == "B"
        assert done.host == host_b and done.worker == f"default-0-{host_b}"
        assert done.attempt == 2
        assert len(done.errors) == 1 and done.errors[0]["error"].startswith("worker lost")
        assert host_a in done.errors[0]["error"]
        before = job_row(cluster_db, job_id)

        release(cluster_db, job_id)
        a.signal(signal.SIGCONT)
        a.expected_dead = False
        seen = cluster.wait_for(lambda: [e for e in events(cluster_db, job_id, "released")
                                         if e["host"] == host_a], 30, "A's handler to return")
        assert seen[0]["reason"] == "lost"
        # A's stop commits its pending finish before the process exits: after this,
        # A's late finalize has certainly been attempted.
        assert a.terminate() == 0, a.stderr()

        assert job_row(cluster_db, job_id) == before
        after = storage.jobs.get(job_id)
        assert after.state == "done" and after.result == "B"
        assert after.worker == f"default-0-{host_b}" and after.host == host_b
        assert query(cluster_db, "SELECT count(*) FROM audit"
                                 " WHERE job_id = ? AND new_state = 'done'", job_id) == [(1,)]
        assert b.terminate() == 0, b.stderr()


# ------------------------------------------------------------- reaper ----

def test_reaper_fails_exhausted_job(cluster_db: Target, cluster: Cluster):
    """max_attempts=1, its worker is SIGKILLed mid-run: another process's runtime rescues it
    after the lease timeout and, the attempts being used up, fails it with "worker lost"."""
    with cluster_db.open() as storage:
        job_id = storage.jobs.enqueue(EnqueueRequest("coop", max_attempts=1)).job_id
        w1 = cluster.start("W1", slots=1, heartbeat=0.2, lease=1.0)
        host_1 = cluster.wait_registered(w1)
        cluster.wait_for(lambda: events(cluster_db, job_id, "started"), 20, "W1 to start the job")
        w1.kill()
        assert job_row(cluster_db, job_id)["state"] == "running"

        w2 = cluster.start("W2", slots=1, heartbeat=0.2, lease=1.0)
        job = storage.jobs.wait(job_id, timeout=30)
        assert job.state == "failed"
        assert job.attempt == 1 and job.finished_at is not None
        assert len(job.errors) == 1
        assert job.errors[0]["error"].startswith("worker lost")
        assert host_1 in job.errors[0]["error"]
        assert [e["pid"] for e in events(cluster_db, job_id, "started")] == [w1.pid]
        assert w2.terminate() == 0, w2.stderr()



class ForgottenClaim(AssertionError):
    """The runtime lost track of a live claim."""


@pytest.mark.parametrize("then", ["cancel", "shutdown"])
def test_job_reclaimed_by_its_thawed_process_stays_under_control(cluster_db: Target,
                                                                 cluster: Cluster, then: str):
    """A process is frozen mid-handler long enough for its job to be rescued, then thawed;
    it claims the same job again (attempt 2) while its old handler (attempt 1, token "lost")
    still runs. When the old handler returns, its fenced-out finish must not make the runtime
    forget the new claim: a cancel request must still reach the new run, and a graceful
    shutdown must stop it and put the job back (refunded)."""
    with cluster_db.open() as storage:
        job_id = storage.jobs.enqueue(EnqueueRequest("stubborn", {"coop_from": 2})).job_id
        a = cluster.start("A", role="A", slots=2, heartbeat=0.2, lease=1.0)
        host_a = cluster.wait_registered(a)
        cluster.wait_for(lambda: events(cluster_db, job_id, "started"), 20, "A to start the job")
        cluster.freeze(a)
        a.expected_dead = True

        # The test process is the reaper, so that nobody else can claim the job meanwhile.
        reaper = "test-reaper"
        cluster.wait_for(lambda: storage.processes._heartbeat(reaper, {}, 1.0, 0.2) or
                         job_row(cluster_db, job_id)["state"] == "queued", 20, "the rescue")
        storage.processes.remove(reaper)
        a.signal(signal.SIGCONT)
        a.expected_dead = False
        second = cluster.wait_for(lambda: [e for e in events(cluster_db, job_id, "started")
                                           if e["attempt"] == 2], 20, "A to claim it again")
        assert second[0]["host"] == host_a

        release(cluster_db, job_id, attempt=1)  # the old run returns; its finish is fenced out
        assert cluster.wait_for(lambda: events(cluster_db, job_id, "released"), 20,
                                "the old run to return")[0]["reason"] == "lost"
        # A barrier: both slots are taken until the old run returns, so this job can only
        # be done after A's dispatcher has processed the old run's finish.
        barrier = storage.jobs.enqueue(EnqueueRequest("quick")).job_id
        assert storage.jobs.wait(barrier, timeout=20).state == "done"
        row = job_row(cluster_db, job_id)
        assert (row["state"], row["attempt"]) == ("running", 2)

        if then == "cancel":
            assert storage.jobs.cancel(job_id) == "cancel_requested"
            try:
                stopped = cluster.wait_for(lambda: events(cluster_db, job_id, "stopped"), 5,
                                           "the cancel request to reach the second run")
            except WaitTimeout as exc:
                raise ForgottenClaim(str(exc)) from None
            assert [e["reason"] for e in stopped] == ["cancelled"]
            assert storage.jobs.wait(job_id, timeout=10).state == "cancelled"
            assert a.terminate() == 0, a.stderr()
        else:
            assert a.terminate() == 0, a.stderr()
            row = job_row(cluster_db, job_id)
            if (row["state"], row["attempt"]) != ("queued", 1):
                raise ForgottenClaim(f"after a clean shutdown the job is {row['state']}, "
                                     f"attempt {row['attempt']}; expected queued, attempt 1")
            assert [e["reason"] for e in events(cluster_db, job_id, "stopped")] == ["shutdown"]
