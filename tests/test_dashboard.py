"""The dashboard as a WSGI app, called the way a WSGI server calls it, on a real store:
what its pages show, the actions it takes, and what it refuses (CSRF, tokens, read-only).
The browser tests (test_dashboard_browser.py) drive the served app in Chromium."""

from __future__ import annotations

import io
import re
import time
import urllib.parse
from typing import Any
from wsgiref.util import setup_testing_defaults

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import (
    assert_error,
    failed_job,
    minute_of,
    raw,
    recorded,
    rounds,
    run,
    run_buffered,
)

import sqliteq
from sqliteq import EnqueueRequest

XSS = ['<script>window.pwned=1</script>', '"><img src=x onerror="window.pwned=1">']


class Reply:
    def __init__(self, status: str, headers: list[tuple[str, str]], body: bytes) -> None:
        self.status, self.code = status, int(status.split()[0])
        self.headers = dict(headers)
        self.text = body.decode()

    def csrf(self) -> str:
        return re.search(r'name="csrf" value="([^"]+)"', self.text).group(1)


def call(app: Any, method: str, target: str, form: dict[str, str] | None = None,
         mounted_at: str = "", **headers: str) -> Reply:
    """One request through the WSGI interface (`mounted_at`: its SCRIPT_NAME)."""
    path, _, query = target.partition("?")
    body = urllib.parse.urlencode(form or {}).encode()
    environ: dict[str, Any] = {"REQUEST_METHOD": method, "SCRIPT_NAME": mounted_at,
                               "PATH_INFO": path,
                               "QUERY_STRING": query, "CONTENT_LENGTH": str(len(body)),
                               "wsgi.input": io.BytesIO(body),
                               **{f"HTTP_{k.upper()}": v for k, v in headers.items()}}
    setup_testing_defaults(environ)
    got: list[Any] = []
    chunks = app(environ, lambda status, headers: got.extend((status, headers)))
    return Reply(got[0], got[1], b"".join(chunks))


def get(app: Any, target: str, **headers: str) -> Reply:
    reply = call(app, "GET", target, **headers)
    assert reply.code == 200, reply.text
    return reply


def act(app: Any, page: Reply, **form: str) -> Reply:
    """POST an action with the CSRF token of `page`, as its button would."""
    reply = call(app, "POST", "/action", {"csrf": page.csrf(), "back": "/", **form})
    assert reply.code == 303, reply.text
    return reply


def counts(page: str, queue: str) -> dict[str, int]:
    row = re.search(f'<tr data-queue="{re.escape(queue)}">(.*?)</tr>', page).group(1)
    return {state: int(re.search(f'class="n {state}">(?:<a [^>]*>)?(\\d+)<', row).group(1))
            for state in ("ready", "scheduled", "running", "failed")}


@pytest.fixture
def app(storage):
    return sqliteq.dashboard_app(storage)


# --------------------------------------------------------------- overview ----

def test_the_overview_shows_each_queues_ready_scheduled_running_and_failed(storage, app):
    failed_job(storage)
    storage.jobs.enqueue_bulk([EnqueueRequest("k", n) for n in range(3)])
    storage.jobs.enqueue(EnqueueRequest("k", run_at=time.time() + 3600))
    storage.jobs.enqueue(EnqueueRequest("k", queue_name="other"))
    _, dispatcher, clock = rounds(storage)
    storage.queues.set_limit("default", 1)          # claims one: running
    dispatcher.step(clock.now)
    page = get(app, "/").text
    assert counts(page, "default") == {"ready": 2, "scheduled": 1, "running": 1, "failed": 1}
    assert counts(page, "other") == {"ready": 1, "scheduled": 0, "running": 0, "failed": 0}
    assert 'data-src="/live?range=hour"' in page and "<svg" in page


def test_the_live_part_refreshes_with_new_counts_and_ranges(storage, app):
    storage.jobs.enqueue(EnqueueRequest("k"))
    assert counts(get(app, "/live").text, "default")["ready"] == 1
    storage.jobs.enqueue(EnqueueRequest("k"))
    live = get(app, "/live?range=week").text
    assert counts(live, "default")["ready"] == 2 and "<b>week</b>" in live
    assert "<html" not in live
    assert call(app, "GET", "/live?range=year").code == 400


def test_the_charts_plot_the_metrics_history(storage, app):
    rt, dispatcher, clock = rounds(storage)
    storage.jobs.enqueue_bulk([EnqueueRequest("k", n) for n in range(3)])
    dispatcher.step(clock.now)
    while run_buffered(rt):
        dispatcher.step(clock.now)
    rt._stopping = True
    dispatcher.step(clock.now)                      # flushes the metrics
    page = get(app, "/").text
    assert re.search(r"Attempts ended per minute: <b>3/min</b>", page), page
    assert page.count("<polyline") >= 3
    assert re.search(r"Run time p95: <b>[\d.]+ (µs|ms)</b>", page), page   # not 2.8e-05 s


def test_durations_are_written_in_the_unit_that_suits_them():
    assert [sqliteq._duration(s) for s in (0.000028, 0.00605, 0.5, 6.0, 1234.5)] == [
        "28 µs", "6.05 ms", "500 ms", "6 s", "20.6m"]


def test_a_chart_reads_the_steps_that_ended_once_and_its_open_step_every_time(storage, sql):
    step, now = 1800_000, sqliteq.now_ms()
    since = now - 86400_000 - (now - 86400_000) % step
    charts = sqliteq._ClosedSteps(storage.metrics)
    recorded(storage, minute_of(now - 2 * 3600_000), "default", "k", done=3)
    first = charts.points(since, now, step)
    assert [p.done for p in first.values()] == [3]
    recorded(storage, minute_of(now), "default", "k", done=2)
    sql("DELETE FROM metrics WHERE minute < ?", now - 3600_000)    # behind its back
    again = charts.points(since, now, step)
    assert [p.done for p in again.values()] == [3, 2]               # the old step: kept
    fresh = sqliteq._ClosedSteps(storage.metrics).points(since, now, step)
    assert [p.done for p in fresh.values()] == [2]


def test_processes_and_their_running_jobs_and_cron_schedules_are_listed(storage, app):
    rt, dispatcher, clock = rounds(storage)
    rt.host_id = "HOST1"
    storage.processes._heartbeat("HOST1", {"default": 1}, 30.0, 1.0)
    rt.cron("nightly", "30 2 * * *", EnqueueRequest("report"))
    storage.cron.declare("nightly", sqliteq.CronExpression("30 2 * * *"),
                         EnqueueRequest("report"))
    job_id = storage.jobs.enqueue(EnqueueRequest("k")).job_id
    dispatcher.step(clock.now)
    page = get(app, "/").text
    assert "HOST1" in page and f'href="/jobs/{job_id}"' in page
    assert "nightly" in page and "30 2 * * *" in page


# ------------------------------------------------------------------- jobs ----

def test_the_job_list_pages_by_id_newest_first(storage, app):
    ids = [out.job_id for out in storage.jobs.enqueue_bulk(
        [EnqueueRequest("k", n) for n in range(120)])]
    seen, target = [], "/jobs"
    while True:
        page = get(app, target).text
        seen += re.findall(r'<a href="/jobs/(\w+)"><code>', page)
        older = re.search(r'<a id="older" href="([^"]+)"', page)
        if older is None:
            break
        target = older.group(1).replace("&amp;", "&")
        assert "before=" in target
    assert seen == sorted(ids, reverse=True)


def test_the_job_list_filters_by_state_queue_kind_and_id_prefix(storage, app):
    a = storage.jobs.enqueue(EnqueueRequest("ka", queue_name="qa")).job_id
    b = storage.jobs.enqueue(EnqueueRequest("kb", queue_name="qb")).job_id
    c = failed_job(storage, kind="kc")

    def listed(query: str) -> set[str]:
        return set(re.findall(r'<a href="/jobs/(\w+)"><code>', get(app, f"/jobs?{query}").text))

    assert listed("") == {a, b, c}
    assert listed("state=failed") == {c}
    assert listed("queue=qb") == {b}
    assert listed("kind=ka") == {a}
    assert listed(f"id={b.lower()}") == {b}
    shared = next((a[:i] for i in range(len(a)) if len({a[i], b[i], c[i]}) > 1), a)
    assert listed(f"id={shared}") == {a, b, c}
    assert listed("state=queued&kind=kc") == set()
    assert call(app, "GET", "/jobs?state=lost").code == 400
    assert call(app, "GET", "/jobs?before=%3Cscript%3E").code == 400


def test_a_job_page_shows_payload_result_errors_and_tracebacks(storage, app):
    job_id = failed_job(storage, {"to": "a@example.com"})
    page = get(app, f"/jobs/{job_id}").text
    assert "a@example.com" in page
    assert "RuntimeError: boom &lt;b&gt;bold&lt;/b&gt;" in page
    assert "Traceback (most recent call last)" in page
    assert call(app, "GET", "/jobs/NOPE").code == 404


def test_a_job_page_links_its_parents_and_children_and_says_what_it_waits_on(storage, app):
    first, second = sqliteq.new_id(), sqliteq.new_id()
    outcomes = storage.jobs.enqueue_bulk([
        EnqueueRequest("k", job_id=first), EnqueueRequest("k", job_id=second),
        EnqueueRequest("join", depends_on=[first, second])])
    join = outcomes[-1].job_id
    page = get(app, f"/jobs/{join}").text
    assert "waiting on</th><td>2 of 2 parents" in page
    assert re.findall(r'<a href="/jobs/(\w+)"><code>', page) == [first, second]
    assert 'value="cancel"' in page                 # a waiting job can be cancelled
    assert re.findall(r'<a href="/jobs/(\w+)"><code>', get(app, f"/jobs/{first}").text) == [
        join]


def test_long_payloads_are_truncated_in_lists_but_whole_on_the_job_page(storage, app):
    job_id = storage.jobs.enqueue(EnqueueRequest("k", {"blob": "x" * 5000})).job_id
    listing = get(app, "/jobs").text
    assert "x" * 200 not in listing and "…" in listing
    assert "x" * 5000 in get(app, f"/jobs/{job_id}").text


def test_kinds_payloads_queues_and_errors_are_text_never_markup(storage, app):
    job_id = storage.jobs.enqueue(EnqueueRequest(XSS[0], {"v": XSS[1]}, queue_name=XSS[1])).job_id
    failed = failed_job(storage, XSS, kind=XSS[0])
    for target in ("/", "/live", "/jobs", f"/jobs/{job_id}", f"/jobs/{failed}"):
        page = get(app, target)
        assert "<script>window" not in page.text and "<img" not in page.text, target
        assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    assert "&lt;script&gt;window.pwned=1&lt;/script&gt;" in get(app, "/jobs").text


# ---------------------------------------------------------------- actions ----

def test_retry_cancel_run_now_and_delete_act_on_the_job(storage, app):
    failed = failed_job(storage)
    later = storage.jobs.enqueue(EnqueueRequest("k", run_at=time.time() + 3600)).job_id
    waiting = storage.jobs.enqueue(EnqueueRequest("k")).job_id
    page = get(app, f"/jobs/{failed}")
    reply = act(app, page, do="retry", job=failed, back=f"/jobs/{failed}")
    assert reply.headers["Location"] == f"/jobs/{failed}"
    assert storage.jobs.get(failed).state == "queued"
    act(app, page, do="run-now", job=later)
    assert storage.jobs.get(later).run_at.timestamp() <= time.time()
    act(app, page, do="cancel", job=waiting)
    assert storage.jobs.get(waiting).state == "cancelled"
    act(app, page, do="delete", job=waiting)
    assert storage.jobs.get(waiting) is None


def test_pause_resume_and_retry_failed_act_on_the_queue(storage, app):
    failed_job(storage, kind="a")
    other = failed_job(storage, kind="b")
    page = get(app, "/")
    act(app, page, do="pause", queue="default")
    assert storage.queues.list()[0].paused
    assert "Resume" in get(app, "/").text
    act(app, page, do="resume", queue="default")
    assert not storage.queues.list()[0].paused
    act(app, page, do="retry-failed", queue="default", kind="a")
    assert storage.jobs.counts()["failed"] == 1 and storage.jobs.get(other).state == "failed"
    act(app, page, do="retry-failed", queue="default")
    assert storage.jobs.counts()["failed"] == 0


def test_an_action_without_the_csrf_token_or_by_get_changes_nothing(storage, app):
    job_id = failed_job(storage)
    for form in ({"do": "retry", "job": job_id},
                 {"do": "retry", "job": job_id, "csrf": "forged"}):
        assert call(app, "POST", "/action", form).code == 403
    assert call(app, "GET", f"/action?do=retry&job={job_id}").code == 404
    assert call(app, "DELETE", f"/jobs/{job_id}").code == 405
    assert storage.jobs.get(job_id).state == "failed"


def test_an_action_never_redirects_off_the_site(storage, app):
    storage.jobs.enqueue(EnqueueRequest("k"))
    page = get(app, "/")
    reply = act(app, page, do="pause", queue="default", back="//evil.example/")
    assert reply.headers["Location"] == "/"


def test_mounted_under_a_prefix_every_link_and_redirect_stays_under_it(storage):
    app = sqliteq.dashboard_app(storage, token="mounted-token")
    job_id = failed_job(storage)
    login = call(app, "GET", "/jobs?token=mounted-token", mounted_at="/ops/queue")
    assert login.headers["Location"] == "/ops/queue/jobs"
    auth = {"authorization": "Bearer mounted-token"}
    for where in ("/", "/jobs", f"/jobs/{job_id}"):
        page = call(app, "GET", where, mounted_at="/ops/queue", **auth)
        links = re.findall(r'(?:href|src|action|data-src)="([^"]*)"', page.text)
        assert links and all(link.startswith("/ops/queue/") for link in links), links
    form = {"csrf": page.csrf(), "do": "retry", "job": job_id, "back": f"/jobs/{job_id}"}
    done = call(app, "POST", "/action", form, "/ops/queue", **auth)
    assert done.headers["Location"] == f"/ops/queue/jobs/{job_id}"
    assert storage.jobs.get(job_id).state == "queued"


def test_a_read_only_dashboard_shows_no_action_and_refuses_them(storage):
    app = sqliteq.dashboard_app(storage, read_only=True)
    job_id = failed_job(storage)
    csrf = get(sqliteq.dashboard_app(storage), "/").csrf()     # (another app's: any)
    for target in ("/", f"/jobs/{job_id}"):
        assert 'method="post"' not in get(app, target).text
    assert call(app, "POST", "/action", {"do": "retry", "job": job_id, "csrf": csrf}).code == 403
    assert storage.jobs.get(job_id).state == "failed"


# ----------------------------------------------------------------- tokens ----

def test_with_a_token_every_request_must_carry_it(storage):
    app = sqliteq.dashboard_app(storage, token="s3cret-token")
    for target in ("/", "/jobs", "/metrics", "/static/app.js"):
        assert call(app, "GET", target).code == 401
    assert call(app, "GET", "/", authorization="Bearer wrong-token").code == 401
    assert call(app, "GET", "/metrics", authorization="Bearer s3cret-token").code == 200
    login = call(app, "GET", "/jobs?token=s3cret-token")
    assert login.code == 303 and login.headers["Location"] == "/jobs"
    cookie = login.headers["Set-Cookie"].split(";")[0]
    assert "HttpOnly" in login.headers["Set-Cookie"] and "SameSite=Strict" in login.headers[
        "Set-Cookie"]
    assert call(app, "GET", "/jobs", cookie=cookie).code == 200
    assert call(app, "GET", "/jobs", cookie="sqliteq_token=guess").code == 401


def test_a_token_too_short_to_be_one_is_refused(storage):
    with pytest.raises(sqliteq.InvalidInput, match="token"):
        sqliteq.dashboard_app(storage, token="abc")


# ---------------------------------------------------------------- metrics ----

def test_metrics_are_prometheus_text_that_its_parser_reads(storage, app):
    failed_job(storage)
    storage.jobs.enqueue_bulk([EnqueueRequest("k", n) for n in range(2)])
    rt, dispatcher, clock = rounds(storage)
    dispatcher.step(clock.now)
    while run_buffered(rt):
        dispatcher.step(clock.now)
    rt._stopping = True
    dispatcher.step(clock.now)
    storage.jobs.enqueue(EnqueueRequest("k", queue_name='we"ird\\q'))
    reply = get(app, "/metrics")
    assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(reply.text)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in families.values() for s in family.samples}
    assert samples["sqliteq_jobs", (("queue", 'we"ird\\q'), ("state", "ready"))] == 1
    assert samples["sqliteq_jobs", (("queue", "default"), ("state", "failed"))] == 1
    assert samples["sqliteq_attempts_total", (("kind", "k"), ("outcome", "done"),
                                              ("queue", "default"))] == 2
    assert samples["sqliteq_attempts_total", (("kind", "k"), ("outcome", "failed"),
                                              ("queue", "default"))] == 1
    assert samples["sqliteq_run_seconds_count", (("kind", "k"), ("queue", "default"))] == 3
    assert samples["sqliteq_wait_seconds", (("kind", "k"), ("quantile", "0.5"),
                                            ("queue", "default"))] >= 0
    assert families["sqliteq_run_seconds"].type == "summary"
    assert families["sqliteq_attempts"].type == "counter"


# -------------------------------------------------------------------- CLI ----

def test_the_cli_refuses_a_non_loopback_host_without_a_token(target):
    line = assert_error(run("dashboard", "--host", "0.0.0.0", db=target), "0.0.0.0", "--token")
    assert "loopback" in line


# ----------------------------------------------------------------- scale ----

def test_the_overviews_counts_read_indexes_of_unfinished_and_failed_jobs_only(db_path):
    """With a million finished jobs the overview stays fast (bench/dashboard_overview.py):
    no statement it runs may scan the table."""
    sqliteq.Storage(db_path).close()
    for name in ("READINESS", "RUNNING_BY_QUEUE", "FAILED_BY_QUEUE", "RUNNING_JOBS"):
        statement = getattr(sqliteq._JobStore, name)
        plan = [row[3] for row in raw(db_path, f"EXPLAIN QUERY PLAN {statement}",
                                      *([0] if "?" in statement else []))]
        reads = [step for step in plan if step.startswith(("SCAN jobs", "SEARCH jobs"))]
        assert reads and all("INDEX" in step for step in reads), (name, plan)
