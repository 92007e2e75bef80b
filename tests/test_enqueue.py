"""Enqueueing: request validation, what a row holds, ids, bulk atomicity, routing, concurrency."""

from __future__ import annotations

import copy
import json
import multiprocessing
import os
import pickle
import sys
import threading
import tracemalloc
from datetime import datetime, timedelta, timezone
from pathlib import Path

import apsw
import pytest
import ulid
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import Target, wait_until

import sqliteq
from sqliteq import EnqueueOutcome, EnqueueRequest, InvalidInput

CROCKFORD = set("0123456789ABCDEFGHJKMNPQRSTVWXYZ")


def total(storage: sqliteq.Storage) -> int:
    return sum(storage.jobs.counts().values())


# ------------------------------------------------------------ validation ----

@pytest.mark.parametrize("kind", ["", None, 42, b"kind"])
def test_kind_must_be_a_non_empty_string(kind):
    with pytest.raises(InvalidInput):
        EnqueueRequest(kind)


def circular() -> dict:
    payload: dict = {}
    payload["self"] = payload
    return payload


@pytest.mark.parametrize("payload", [object(), float("nan"), {"x": float("inf")}, {1, 2},
                                     circular()],
                         ids=["object", "nan", "inf", "set", "circular"])
def test_payload_must_be_json(payload):
    with pytest.raises(InvalidInput):
        EnqueueRequest("k", payload)


def test_a_payload_that_contains_itself_is_refused_by_name():
    with pytest.raises(InvalidInput, match=r"^payload of 'k' nests .* or contains itself$"):
        EnqueueRequest("k", {"list": [1, circular()]})


def nested(depth: int) -> list:
    """A list nested `depth` deep: [[...[]...]]."""
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


def test_a_payload_nested_at_most_max_json_depth_is_accepted_and_reads_back(storage):
    deepest = {"a": nested(sqliteq.MAX_JSON_DEPTH - 1)}
    job_id = storage.jobs.enqueue(EnqueueRequest("k", deepest)).job_id
    assert storage.jobs.get(job_id).payload == deepest


@pytest.mark.parametrize("depth", [sqliteq.MAX_JSON_DEPTH + 1, 990, 5000])
def test_a_payload_nested_deeper_is_refused(depth):
    with pytest.raises(InvalidInput, match=r"deep|serialisable") as raised:
        EnqueueRequest("k", {"x": nested(depth)})
    assert "payload of 'k'" in str(raised.value)


def test_a_payload_changed_after_the_request_was_built_is_stored_as_it_was_built(storage):
    payload: dict = {"x": []}
    requests = [EnqueueRequest("k", payload), EnqueueRequest("k", payload)]
    payload["x"] = nested(sqliteq.MAX_JSON_DEPTH + 5)
    payload["y"] = object()
    bulk_id = storage.jobs.enqueue_bulk(requests[:1])[0].job_id
    single_id = storage.jobs.enqueue(requests[1]).job_id
    assert storage.jobs.get(bulk_id).payload == {"x": []}
    assert storage.jobs.get(single_id).payload == {"x": []}


def test_a_wide_payload_with_many_brackets_but_little_depth_is_accepted(storage):
    wide = [[{"a": [i]}] for i in range(5000)]
    job_id = storage.jobs.enqueue(EnqueueRequest("k", wide)).job_id
    assert storage.jobs.get(job_id).payload == wide


@pytest.mark.parametrize("priority", [True, False, 1.0, "1", None, 2**63])
def test_priority_must_be_a_64_bit_int_and_not_a_bool(priority):
    with pytest.raises(InvalidInput):
        EnqueueRequest("k", priority=priority)


@pytest.mark.parametrize("max_attempts", [0, -1, True, 2.0])
def test_max_attempts_must_be_a_positive_int(max_attempts):
    with pytest.raises(InvalidInput):
        EnqueueRequest("k", max_attempts=max_attempts)


@pytest.mark.parametrize("run_at", [datetime(2030, 1, 1), float("nan"), float("inf"),
                                    "2030-01-01", True],
                         ids=["naive-datetime", "nan", "inf", "str", "bool"])
def test_run_at_must_be_an_aware_datetime_or_epoch_seconds(run_at):
    with pytest.raises(InvalidInput):
        EnqueueRequest("k", run_at=run_at)


@pytest.mark.parametrize("run_at", [
    datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone.utc),
    datetime(2030, 1, 2, 5, 4, 5, tzinfo=timezone(timedelta(hours=2))),
    1893553445, 1893553445.0,
])
def test_aware_datetime_and_epoch_seconds_run_at_are_accepted(run_at):
    assert EnqueueRequest("k", run_at=run_at).run_at == 1893553445.0


@pytest.mark.parametrize("unique_key", ["", 7])
def test_unique_key_must_be_a_non_empty_string(unique_key):
    with pytest.raises(InvalidInput):
        EnqueueRequest("k", unique_key=unique_key)


@pytest.mark.parametrize("queue_name", ["", " padded", 3])
def test_queue_name_must_be_a_clean_non_empty_string(queue_name):
    with pytest.raises(InvalidInput):
        EnqueueRequest("k", queue_name=queue_name)


def test_invalid_input_is_a_value_error():
    with pytest.raises(ValueError):
        EnqueueRequest("")
    assert issubclass(InvalidInput, sqliteq.SqliteqError)


def test_requests_are_immutable():
    req = EnqueueRequest("k", {"a": 1}, priority=3)
    for field, value in [("kind", "other"), ("priority", 0), ("payload", None)]:
        with pytest.raises(AttributeError):
            setattr(req, field, value)
    assert req == EnqueueRequest("k", {"a": 1}, priority=3)


def test_requests_can_be_copied_and_pickled():
    req = EnqueueRequest("k", {"a": 1}, queue_name="q", priority=2, unique_key="u")
    assert copy.copy(req) == req
    assert pickle.loads(pickle.dumps(req)) == req


def test_a_request_shows_and_replaces_its_fields(storage):
    req = EnqueueRequest("k", {"a": 1}, priority=2)
    assert repr(req) == ("EnqueueRequest(kind='k', payload={'a': 1}, queue_name=None, "
                         "priority=2, run_at=None, max_attempts=5, unique_key=None, "
                         "timeout=None, job_id=None, depends_on=(), allow_parent_failure=False)")
    assert req._asdict()["payload"] == {"a": 1} and len(req._asdict()) == 11
    assert EnqueueRequest._make(req) == req
    assert EnqueueRequest._make(list(req)[:len(req._fields)]) == req
    other = req._replace(payload={"b": 2})
    assert other.payload == {"b": 2} and other != req
    assert storage.jobs.get(storage.jobs.enqueue(other).job_id).payload == {"b": 2}


def test_requests_cannot_skip_validation(storage):
    with pytest.raises(InvalidInput):
        bad = EnqueueRequest._make(["", None, None, "high", None, 0, None, None, None, (),
                                    False])
        storage.jobs.enqueue(bad)
    assert total(storage) == 0


@pytest.mark.parametrize("run_at", [1e15, 1e17])
def test_run_at_out_of_range_is_rejected_when_built(run_at):
    with pytest.raises(InvalidInput):
        EnqueueRequest("k", run_at=run_at)


# ---------------------------------------------------------------- enqueue ----

def test_enqueue_returns_the_new_job_id(storage):
    out = storage.jobs.enqueue(EnqueueRequest("k"))
    assert isinstance(out, EnqueueOutcome)
    assert out.created is True
    assert storage.jobs.get(out.job_id).id == out.job_id


def test_enqueued_job_reads_back_with_its_fields(storage):
    run_at = datetime(2031, 5, 6, 7, 8, 9, 123000, tzinfo=timezone.utc)
    before = datetime.now(timezone.utc) - timedelta(seconds=1)
    out = storage.jobs.enqueue(EnqueueRequest(
        "email_send", {"to": "ada@example.com", "n": [1, 2.5, None]}, priority=-3,
        run_at=run_at))
    job = storage.jobs.get(out.job_id)
    assert (job.kind, job.queue, job.state) == ("email_send", "default", "queued")
    assert job.payload == {"to": "ada@example.com", "n": [1, 2.5, None]}
    assert job.priority == -3
    assert job.run_at == run_at
    assert (job.attempt, job.max_attempts) == (0, 5)
    assert job.unique_key is None and job.result is None and job.errors == []
    assert before <= job.created_at <= datetime.now(timezone.utc) + timedelta(seconds=1)
    assert job.started_at is None and job.finished_at is None
    assert job.worker is None and job.host is None and job.cancel_requested is False


def test_enqueue_without_run_at_is_ready_now(storage):
    before = storage.db.clock_ms()                      # the store's clock, as run_at is
    job = storage.jobs.get(storage.jobs.enqueue(EnqueueRequest("k")).job_id)
    assert before <= job.run_at.timestamp() * 1000 <= storage.db.clock_ms()
    assert job.run_at == job.created_at


def test_explicit_fields_are_stored(storage):
    out = storage.jobs.enqueue(EnqueueRequest("k", None, queue_name="mail", max_attempts=1,
                                              unique_key="once", run_at=1893553445.5))
    job = storage.jobs.get(out.job_id)
    assert (job.queue, job.max_attempts, job.unique_key, job.payload) == (
        "mail", 1, "once", None)
    assert job.run_at == datetime(2030, 1, 2, 3, 4, 5, 500000, tzinfo=timezone.utc)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text()
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payloads=st.lists(JSON, min_size=1, max_size=5))
def test_any_json_payload_reads_back_equal(storage, payloads):
    outs = storage.jobs.enqueue_bulk([EnqueueRequest("k", p) for p in payloads])
    assert [storage.jobs.get(o.job_id).payload for o in outs] == payloads


def test_payload_with_a_surrogate_escaped_file_name_reads_back_equal(storage):
    name = os.fsdecode(b"caf\xe9.txt")          # what os.listdir returns for a Latin-1 name
    out = storage.jobs.enqueue(EnqueueRequest("k", {"file": name}))
    assert storage.jobs.get(out.job_id).payload == {"file": name}


@pytest.mark.parametrize("field", ["kind", "queue_name", "unique_key"])
def test_text_sqlite_cannot_store_is_rejected_when_built(field):
    fields = {"kind": "k", field: "bad\ud800"}
    with pytest.raises(InvalidInput):
        EnqueueRequest(fields.pop("kind"), **fields)


def test_millisecond_exact_run_at_reads_back_exactly(storage):
    run_at = datetime(2004, 4, 4, 18, 54, 11, 965000, tzinfo=timezone.utc)
    job = storage.jobs.get(storage.jobs.enqueue(EnqueueRequest("k", run_at=run_at)).job_id)
    assert job.run_at == run_at


UTC = timezone.utc


@pytest.mark.parametrize("run_at", [
    datetime.min.replace(tzinfo=UTC),
    -62_135_596_800,
    253_402_300_799,
    datetime.max.replace(tzinfo=UTC),
], ids=["datetime.min", "year-1-seconds", "year-9999-seconds", "datetime.max"])
def test_every_run_at_accepted_when_built_reads_back(storage, run_at):
    try:
        req = EnqueueRequest("k", run_at=run_at)
    except InvalidInput:
        return                      # refusing it is fine; accepting it and breaking reads is not
    job = storage.jobs.get(storage.jobs.enqueue(req).job_id)
    assert abs(job.run_at.timestamp() - req.run_at) < 0.001
    assert [j.id for j in storage.jobs.list()] == [job.id]


def test_job_records_are_read_only(storage):
    job = storage.jobs.get(storage.jobs.enqueue(EnqueueRequest("k")).job_id)
    with pytest.raises(AttributeError):
        job.state = "done"


# -------------------------------------------------------------------- ids ----

def test_ids_are_ulid_strings_of_the_enqueue_time(storage):
    before = datetime.now(timezone.utc) - timedelta(seconds=1)
    job_id = storage.jobs.enqueue(EnqueueRequest("k")).job_id
    assert len(job_id) == 26 and set(job_id) <= CROCKFORD
    minted = ulid.ULID.from_str(job_id).datetime
    assert before <= minted <= datetime.now(timezone.utc) + timedelta(seconds=1)


def test_ids_increase_strictly_across_enqueue_and_bulk_calls(storage):
    ids = []
    for round_ in range(20):
        ids.append(storage.jobs.enqueue(EnqueueRequest("k", round_)).job_id)
        ids += [o.job_id for o in storage.jobs.enqueue_bulk(
            [EnqueueRequest("k", n) for n in range(50)])]
    assert len(ids) == len(set(ids)) == 20 * 51
    assert ids == sorted(ids)
    assert [o.id for o in storage.jobs.list(limit=len(ids))] == ids[::-1]


def test_two_storages_in_one_process_never_mint_the_same_id(db_path):
    with sqliteq.Storage(db_path) as one, sqliteq.Storage(db_path) as two:
        ids = []
        for n in range(50):
            ids.append(one.jobs.enqueue(EnqueueRequest("k", n)).job_id)
            ids += [o.job_id for o in two.jobs.enqueue_bulk([EnqueueRequest("k", n)] * 2)]
        assert len(set(ids)) == 150
        assert ids == sorted(ids)           # one process, one order
        assert sum(one.jobs.counts().values()) == 150


def test_minted_ids_match_python_ulid_encoding_across_a_carry():
    """Consecutive ids are consecutive 128-bit integers, also where the low 40 bits wrap."""
    minter = sqliteq._IdMinter()
    future_ms = sqliteq.now_ms() + 3_600_000   # later than now: the minter must increment
    minter._last = (future_ms << 80) | (0x12345 << 40) | (2**40 - 3)
    start = minter._last + 1
    ids = minter.mint(6)
    assert ids == [str(ulid.ULID.from_int(start + n)) for n in range(6)]


def test_minted_ids_match_python_ulid_encoding_across_runs_of_1024():
    """A bulk mint writes ids in runs sharing all but their last two characters: the runs
    join without a gap or a repeat, starting anywhere in a run."""
    minter = sqliteq._IdMinter()
    future_ms = sqliteq.now_ms() + 3_600_000
    for low in (0, 1021, 1023, 2**40 - 2000):
        minter._last = (future_ms << 80) | (0x12345 << 40) | low
        start = minter._last + 1
        ids = minter.mint(3000)
        assert ids == [str(ulid.ULID.from_int(start + n)) for n in range(3000)]


# ------------------------------------------------------------------- bulk ----

def test_bulk_enqueue_creates_every_job_in_order(storage):
    reqs = [EnqueueRequest("k", {"n": n}, priority=n % 3) for n in range(500)]
    outs = storage.jobs.enqueue_bulk(iter(reqs))
    assert [o.created for o in outs] == [True] * 500
    assert [storage.jobs.get(o.job_id).payload["n"] for o in outs] == list(range(500))
    assert storage.jobs.counts()["queued"] == 500


def test_bulk_enqueue_of_nothing_is_a_no_op(storage):
    assert storage.jobs.enqueue_bulk([]) == []
    assert total(storage) == 0


@pytest.mark.parametrize("spoil", ["not-a-request", "job-id-given-twice"])
def test_bulk_with_one_bad_request_writes_nothing(storage, spoil):
    reqs = [EnqueueRequest("k", {"n": n}, job_id=sqliteq.new_id()) for n in range(10_000)]
    if spoil == "not-a-request":
        reqs[9_999] = ("k", {"n": 9_999})
    else:
        reqs[9_999] = EnqueueRequest("k", job_id=reqs[0].job_id)
    with pytest.raises(InvalidInput, match=r"\b9999\b"):
        storage.jobs.enqueue_bulk(reqs)
    assert storage.jobs.counts() == dict.fromkeys(
        ("waiting", "queued", "running", "done", "failed", "cancelled"), 0)


def test_single_enqueue_rejects_a_non_request(storage):
    with pytest.raises(InvalidInput):
        storage.jobs.enqueue(("k", None))
    assert total(storage) == 0


# --------------------------------------------- streaming and transactions ----

def test_a_bulk_enqueue_streams_its_iterable_in_bounded_memory(storage):
    """A generator of 40,000 requests with 2 KB payloads (160 MB as requests and rows) goes
    in chunk by chunk: what the call holds at its peak is the outcomes, not the jobs."""
    count = 40_000

    def requests():
        for n in range(count):
            yield EnqueueRequest("k", f"{n:06d}" + "x" * 2000)

    tracemalloc.start()
    try:
        outcomes = storage.jobs.enqueue_bulk(requests())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(outcomes) == count and total(storage) == count
    assert peak < 40 * 2**20, f"peak {peak / 2**20:.0f} MB"
    assert storage.jobs.get(outcomes[-1].job_id).payload.startswith(f"{count - 1:06d}")


def test_a_bad_request_deep_in_a_generator_writes_nothing(storage):
    chunk = sqliteq.Jobs.INSERT_CHUNK

    def requests():
        for n in range(3 * chunk):
            yield EnqueueRequest("k", n) if n != 2 * chunk + 5 else ("k", n)

    with pytest.raises(InvalidInput, match=rf"request {2 * chunk + 5}\b"):
        storage.jobs.enqueue_bulk(requests())
    assert total(storage) == 0


@pytest.mark.sqlite_only   # it forces a retry through SQLite group commit's queue
def test_a_one_shot_iterator_is_never_read_twice_into_a_retried_transaction(storage):
    """A write that shares the group commit hits lock contention, so the transaction runs
    again: a generator cannot be read again, so its enqueue fails whole instead of writing
    only the rest of it."""
    db = storage.db
    leading, release = threading.Event(), threading.Event()
    busy_once = []

    def hold_the_lead(conn):
        leading.set()
        release.wait(10)

    def contended(conn):
        if not busy_once:
            busy_once.append(True)
            raise apsw.BusyError("injected contention")

    results: dict[str, object] = {}

    def run(name, call):
        try:
            results[name] = call()
        except Exception as exc:
            results[name] = exc

    threads = [threading.Thread(target=run, args=("lead", lambda: db.write(hold_the_lead)))]
    threads[0].start()
    assert leading.wait(10)
    threads += [threading.Thread(target=run, args=("bulk", lambda: storage.jobs.enqueue_bulk(
                    EnqueueRequest("k", n) for n in range(10))))]
    threads[1].start()
    wait_until(lambda: len(db._pending) == 1, timeout=10, what="the bulk enqueue to queue")
    threads += [threading.Thread(target=run, args=("other", lambda: db.write(contended)))]
    threads[2].start()
    wait_until(lambda: len(db._pending) == 2, timeout=10, what="the other write to queue")
    release.set()
    for thread in threads:
        thread.join(10)
    assert isinstance(results["bulk"], sqliteq.TransientError), results
    assert "nothing was written" in str(results["bulk"])
    assert results["other"] is None and busy_once
    assert total(storage) == 0


def test_enqueue_in_commits_with_the_callers_own_writes(storage, sql):
    storage.db.write(lambda conn: conn.execute("CREATE TABLE orders (id TEXT, state TEXT)"))

    def pay(conn):
        conn.execute("INSERT INTO orders VALUES (1, 'paid')")
        return storage.jobs.enqueue_in(conn, [EnqueueRequest("ship", {"order": 1})])

    (outcome,) = storage.db.write(pay)
    assert storage.jobs.get(outcome.job_id).payload == {"order": 1}
    assert sql("SELECT state FROM orders") == [("paid",)]


def test_enqueue_in_rolls_back_with_the_callers_transaction(storage, sql):
    storage.db.write(lambda conn: conn.execute("CREATE TABLE orders (id TEXT, state TEXT)"))
    woken = []
    storage.jobs._enqueue_listeners.append(woken.append)

    def pay_then_fail(conn):
        conn.execute("INSERT INTO orders VALUES (1, 'paid')")
        storage.jobs.enqueue_in(conn, [EnqueueRequest("ship")])
        raise RuntimeError("card declined")

    with pytest.raises(RuntimeError, match="declined"):
        storage.db.write(pay_then_fail)
    assert total(storage) == 0 and sql("SELECT count(*) FROM orders") == [(0,)]
    assert woken == []                  # no runtime is woken for jobs that never were


def test_enqueue_in_wakes_a_runtime_of_this_process_once_it_commits(storage):
    """The runtime polls only every 30 s: only the after-commit wake-up runs the job soon."""
    rt = sqliteq.Runtime(storage, {"default": 1}, poll_interval=30)
    rt.register("k", lambda ctx, payload: payload)
    with rt:
        first = rt.enqueue(EnqueueRequest("k", 6)).job_id
        assert storage.jobs.wait(first, timeout=10).result == 6     # now idle for 30 s
        (outcome,) = storage.db.write(
            lambda conn: storage.jobs.enqueue_in(conn, [EnqueueRequest("k", 7)]))
        assert storage.jobs.wait(outcome.job_id, timeout=10).result == 7


def test_after_commit_outside_a_write_is_a_clear_error(storage):
    with pytest.raises(sqliteq.SqliteqError, match=r"Database\.write"):
        storage.db.after_commit(lambda: None)


# ---------------------------------------------------------------- routing ----

class RecordingRouter:
    def __init__(self) -> None:
        self.kinds: list[str] = []

    def route(self, kind: str) -> str:
        self.kinds.append(kind)
        return f"q-{kind}"


def queue_of(storage: sqliteq.Storage, out: EnqueueOutcome) -> str:
    return storage.jobs.get(out.job_id).queue


def test_without_router_or_queue_name_the_queue_is_default(storage):
    assert queue_of(storage, storage.jobs.enqueue(EnqueueRequest("k"))) == "default"


def test_router_chooses_the_queue_when_queue_name_is_none(storage):
    router = RecordingRouter()
    out = storage.jobs.enqueue(EnqueueRequest("resize"), router=router)
    assert queue_of(storage, out) == "q-resize"
    assert router.kinds == ["resize"]


def test_explicit_queue_name_wins_over_the_router(storage):
    router = RecordingRouter()
    out = storage.jobs.enqueue(EnqueueRequest("resize", queue_name="img"), router=router)
    assert queue_of(storage, out) == "img"
    assert router.kinds == []


def test_bulk_enqueue_routes_every_request(storage):
    outs = storage.jobs.enqueue_bulk(
        [EnqueueRequest("a"), EnqueueRequest("b", queue_name="mine"), EnqueueRequest("a")],
        router=RecordingRouter())
    assert [queue_of(storage, o) for o in outs] == ["q-a", "mine", "q-a"]


def test_kind_router_maps_kinds_and_defaults_the_rest(storage):
    router = sqliteq.KindRouter({"email_send": "email"}, default="misc")
    assert queue_of(storage, storage.jobs.enqueue(EnqueueRequest("email_send"), router)) \
        == "email"
    assert queue_of(storage, storage.jobs.enqueue(EnqueueRequest("other"), router)) == "misc"
    assert sqliteq.KindRouter({}).route("x") == "default"


def test_prefix_router_takes_the_longest_matching_prefix():
    router = sqliteq.PrefixRouter({"gh_": "gh", "gh_pr_": "gh-pr", "g": "g"}, default="rest")
    assert router.route("gh_pr_open") == "gh-pr"
    assert router.route("gh_issue") == "gh"
    assert router.route("git") == "g"
    assert router.route("email") == "rest"
    assert sqliteq.PrefixRouter().route("anything") == "default"


def test_default_router_sends_everything_to_default():
    assert sqliteq.DefaultRouter().route("anything") == "default"


@pytest.mark.parametrize("bad", ["", " spaced ", None, 42])
def test_router_returning_a_bad_queue_name_is_invalid_input(storage, bad):
    class BadRouter:
        def route(self, kind: str):
            return bad

    with pytest.raises(InvalidInput):
        storage.jobs.enqueue_bulk([EnqueueRequest("k", queue_name="ok"), EnqueueRequest("k")],
                                  router=BadRouter())
    assert total(storage) == 0


@pytest.mark.parametrize("make", [lambda: sqliteq.KindRouter({"k": ""}),
                                  lambda: sqliteq.PrefixRouter({"k": " q"}),
                                  lambda: sqliteq.PrefixRouter(default="")],
                         ids=["kind-router", "prefix-router", "prefix-default"])
def test_routers_reject_bad_queue_names_when_built(make):
    with pytest.raises(InvalidInput):
        make()


# ------------------------------------------------------------ concurrency ----

# On PostgreSQL every commit waits for the server's fsync: fewer jobs make the same contention.
PROCESSES, THREADS = 4, 2
JOBS_PER_THREAD = {"sqlite": 2_000, "postgres": 500}


def enqueue_from_threads(target: Target, process_no: int, barrier, report: str) -> None:
    """Child process: THREADS threads each enqueue JOBS_PER_THREAD jobs, one per call."""
    errors: list[str] = []
    storage = target.open()

    def work(thread_no: int) -> None:
        try:
            for n in range(JOBS_PER_THREAD[repr(target)]):
                storage.jobs.enqueue(EnqueueRequest("load", [process_no, thread_no, n]))
        except BaseException as exc:   # reported to the parent, whatever it is
            errors.append(f"{type(exc).__module__}.{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
    barrier.wait(timeout=60)
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    storage.close()
    Path(report).write_text(json.dumps(errors))
    sys.exit(1 if errors else 0)


def test_processes_and_threads_enqueue_in_parallel_without_errors(storage, target, tmp_path):
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(PROCESSES)
    reports = [tmp_path / f"report-{n}.json" for n in range(PROCESSES)]
    procs = [ctx.Process(target=enqueue_from_threads,
                         args=(target, n, barrier, str(reports[n])))
             for n in range(PROCESSES)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
    assert [json.loads(r.read_text()) for r in reports] == [[]] * PROCESSES
    assert [proc.exitcode for proc in procs] == [0] * PROCESSES
    per_thread = JOBS_PER_THREAD[repr(target)]
    expected = PROCESSES * THREADS * per_thread
    assert storage.jobs.counts()["queued"] == expected
    payloads = {tuple(j.payload) for j in storage.jobs.list(limit=expected + 1)}
    assert payloads == {(p, t, n) for p in range(PROCESSES) for t in range(THREADS)
                        for n in range(per_thread)}


def test_threads_of_one_process_share_a_storage(storage):
    errors: list[BaseException] = []

    def work(thread_no: int) -> None:
        try:
            storage.jobs.enqueue_bulk([EnqueueRequest("k", [thread_no, n]) for n in range(100)])
            for n in range(100):
                storage.jobs.enqueue(EnqueueRequest("k", [thread_no, 100 + n]))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert storage.jobs.counts()["queued"] == 8 * 200


# ---------------------------------------------------------- vendored file ----

WITHOUT_CLICK = """
import sys
sys.modules["click"] = None          # any `import click` now raises ImportError
try:
    import click
except ImportError:
    pass
else:
    raise SystemExit("the click blocker did not work")
import sqliteq
with sqliteq.Storage(sys.argv[1]) as storage:
    print(storage.jobs.enqueue(sqliteq.EnqueueRequest("k", {"a": 1})).job_id)
"""


def test_imports_and_enqueues_without_click(run_python, db_path):
    proc = run_python(WITHOUT_CLICK, str(db_path))
    assert proc.returncode == 0, proc.stderr
    with sqliteq.Storage(db_path) as storage:
        assert storage.jobs.get(proc.stdout.strip()).payload == {"a": 1}

