"""The dashboard in a real browser: `sqliteq dashboard` served by its own process, Debian's
Chromium driven by playwright. The counts it shows, the live refresh, the buttons, the
token, and markup in jobs staying text."""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright
from support import (
    REPO,
    Target,
    clean_env,
    failed_job,
    ok,
    rounds,
    run_buffered,
    script,
    wait_until,
)

import sqliteq
from sqliteq import EnqueueRequest

CHROMIUM = os.environ.get("SQLITEQ_CHROMIUM", "/usr/bin/chromium")
XSS = ['<script>window.pwned=1</script>', '"><img src=x onerror="window.pwned=1">']
WAIT_MS = 20_000        # a live count refreshes every DASHBOARD_REFRESH_SECONDS; generous


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: `apt-get install chromium` (.ci/run does),"
                    " or point SQLITEQ_CHROMIUM at one")
    with sync_playwright() as driver:
        launched = driver.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    yield context.new_page()
    context.close()


@contextlib.contextmanager
def serve(target: Target, *options: str) -> Iterator[str]:
    """`sqliteq dashboard --port 0 OPTIONS` in a process of its own; yields its URL, and
    stops it with SIGINT (Ctrl-C), which must end it cleanly."""
    process = subprocess.Popen([script(), *target.options(), "dashboard", "--port", "0",
                                *options], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=clean_env(), cwd=REPO)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout or ()],
                     daemon=True).start()
    try:
        try:
            first = lines.get(timeout=30)
        except queue.Empty:
            first = ""
        found = re.search(r"dashboard on (http://\S+)", first)
        assert found, f"no URL from the dashboard: {first!r} {process.poll()}"
        yield found.group(1).rstrip("/")
    finally:
        process.send_signal(signal.SIGINT)
        try:
            code = process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
        stderr = process.stderr.read() if process.stderr else ""
        assert code == 0 and "Traceback" not in stderr, (code, stderr)


def cell(page: Page, queue_name: str, column: str) -> Any:
    return page.locator(f'tr[data-queue="{queue_name}"] td.{column}')


# ---------------------------------------------------------------- overview ----

def test_the_overview_shows_each_queues_counts_and_they_change_live(target, page):
    with target.open() as storage:
        failed_job(storage)
        storage.jobs.enqueue_bulk([EnqueueRequest("k", n) for n in range(3)])
        storage.jobs.enqueue(EnqueueRequest("k", queue_name="mail", run_at=time.time() + 3600))
    with serve(target) as url:
        page.goto(url)
        expect(cell(page, "default", "ready")).to_have_text("3")
        expect(cell(page, "default", "failed")).to_have_text("1")
        expect(cell(page, "mail", "scheduled")).to_have_text("1")
        expect(cell(page, "mail", "ready")).to_have_text("0")
        page.evaluate("window.loadedOnce = true")
        ok("enqueue", "k", "{}", db=target)                # another process
        ok("enqueue", "k", "{}", "--queue", "fresh", db=target)
        expect(cell(page, "default", "ready")).to_have_text("4", timeout=WAIT_MS)
        expect(cell(page, "fresh", "ready")).to_have_text("1", timeout=WAIT_MS)
        assert page.evaluate("window.loadedOnce") is True, "the page reloaded instead"


# ---------------------------------------------------------------- actions ----

def test_a_failed_jobs_retry_button_requeues_it(target, page):
    with target.open() as storage:
        job_id = failed_job(storage)
        with serve(target) as url:
            page.goto(f"{url}/jobs/{job_id}")
            expect(page.locator("h3.error")).to_contain_text("boom <b>bold</b>")
            page.get_by_role("button", name="Retry").click()
            page.wait_for_url(f"{url}/jobs/{job_id}")
            expect(page.locator("table tr", has_text="state").first).to_contain_text("queued")
            assert storage.jobs.get(job_id).state == "queued"


def test_the_pause_and_resume_buttons_pause_and_resume_the_queue(target, page):
    with target.open() as storage:
        storage.jobs.enqueue(EnqueueRequest("k"))
        with serve(target) as url:
            page.goto(url)
            row = page.locator('tr[data-queue="default"]')
            row.get_by_role("button", name="Pause").click()
            expect(row).to_contain_text("paused")
            assert storage.queues.list()[0].paused
            row.get_by_role("button", name="Resume").click()
            expect(row).to_contain_text("active")
            assert not storage.queues.list()[0].paused


def test_a_read_only_dashboard_has_no_buttons_to_act(target, page):
    with target.open() as storage:
        failed_job(storage)
    with serve(target, "--read-only") as url:
        page.goto(url)
        expect(cell(page, "default", "failed")).to_have_text("1")
        assert page.locator('form[method="post"]').count() == 0


# ---------------------------------------------------------------- safety ----

def test_markup_in_kinds_payloads_queues_and_errors_stays_text(target, page):
    with target.open() as storage:
        failed = failed_job(storage, XSS, kind=XSS[0])
        job_id = storage.jobs.enqueue(EnqueueRequest(XSS[0], {"v": XSS[1]},
                                                     queue_name=XSS[1])).job_id
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("dialog", lambda dialog: (errors.append(dialog.message), dialog.dismiss()))
    with serve(target) as url:
        for where in ("/", "/jobs", f"/jobs/{job_id}", f"/jobs/{failed}"):
            page.goto(url + where)
            page.wait_for_load_state("load")
            assert page.evaluate("window.pwned") is None, where
            assert page.locator('img, script:not([src="/static/app.js"])').count() == 0, where
        expect(page.locator("#payload")).to_contain_text(XSS[0])     # shown, as text
        page.goto(url + "/jobs")
        expect(page.locator("main")).to_contain_text(XSS[0])
        expect(page.locator("main")).to_contain_text(XSS[1])
    assert errors == []


def test_with_a_token_a_request_without_it_is_refused(target, page):
    token = "a-token-for-the-test"
    with target.open() as storage:
        storage.jobs.enqueue(EnqueueRequest("k"))
    with serve(target, "--token", token) as url:
        refused = page.goto(url)
        assert refused is not None and refused.status == 401
        assert page.locator("#queues").count() == 0
        assert page.request.get(f"{url}/metrics").status == 401
        let_in = page.goto(f"{url}/?token={token}")       # sets the cookie, then the page
        assert let_in is not None and let_in.status == 200
        expect(cell(page, "default", "ready")).to_have_text("1")
        ok("enqueue", "k", "{}", db=target)              # the live refresh carries it too
        expect(cell(page, "default", "ready")).to_have_text("2", timeout=WAIT_MS)
        assert page.request.get(f"{url}/metrics").status == 200


# ------------------------------------------------------------ screenshots ----

def forty_minutes_of_work(storage: sqliteq.Storage) -> None:
    """Forty minutes of emails sent, some failing, through a runtime's rounds on a clock the
    test moves, so the charts have a history to draw."""
    def send(ctx: Any, payload: int) -> None:
        if payload % 17 == 0:
            raise RuntimeError("the mail server said 451: try again later")

    rt, dispatcher, clock = rounds(storage, send)
    rt.register("email_send", send)
    clock.now -= 40 * 60_000
    for minute in range(40):
        burst = 6 + (minute * 7) % 13
        storage.jobs.enqueue_bulk([EnqueueRequest(
            "email_send", minute * 100 + n, max_attempts=1,
            run_at=(clock.now - 300 * n * (1 + minute % 4)) / 1000) for n in range(burst)])
        while True:
            dispatcher.step(clock.now)
            if not run_buffered(rt):
                break
            clock.now += 40
        clock.now += 60_000 - 40 * burst
    rt._stopping = True                 # the last round flushes the rollups
    dispatcher.step(clock.now)


def test_the_screenshots_in_the_readme_are_of_this_dashboard(target, page, tmp_path):
    """The README shows docs/dashboard-*.png; SQLITEQ_SCREENSHOTS=docs retakes them."""
    into = Path(os.environ.get("SQLITEQ_SCREENSHOTS") or tmp_path)
    release = threading.Event()

    def build(ctx: Any, payload: dict[str, Any]) -> None:
        if payload.get("month") == "2026-10":
            raise LookupError("no sales ledger for 2026-10")
        release.wait(60)

    with target.open() as storage:
        forty_minutes_of_work(storage)
        storage.jobs.enqueue_bulk([EnqueueRequest("email_send", {"n": n}) for n in range(40)])
        storage.jobs.enqueue_bulk([EnqueueRequest("resize", {"n": n}, queue_name="images",
                                                  run_at=time.time() + 600)
                                   for n in range(12)])
        storage.queues.pause("images")
        failing = storage.jobs.enqueue(EnqueueRequest(
            "report_build", {"month": "2026-10", "format": "pdf"}, queue_name="reports",
            max_attempts=1)).job_id
        storage.jobs.enqueue(EnqueueRequest("report_build", {"month": "2026-11"},
                                            queue_name="reports"))
        rt = sqliteq.Runtime(storage, {"reports": 2}, heartbeat_interval=0.2)
        rt.register("report_build", build)
        rt.start()
        try:
            wait_until(lambda: storage.jobs.counts(queue="reports").get("running") == 1
                       and storage.jobs.get(failing).state == "failed", 30,
                       "one report failed and one running")
            with serve(target) as url:
                page.goto(url)
                expect(cell(page, "default", "ready")).to_have_text("40")
                expect(page.locator("svg polyline").first).to_be_visible()
                page.screenshot(path=into / "dashboard-overview.png", full_page=True)
                page.goto(f"{url}/jobs/{failing}")
                expect(page.locator("h3.error")).to_contain_text("LookupError")
                page.screenshot(path=into / "dashboard-job.png", full_page=True)
        finally:
            release.set()
            rt.stop(timeout=10)
    for name in ("dashboard-overview.png", "dashboard-job.png"):
        assert (into / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (REPO / "docs" / name).exists(), f"the README shows docs/{name}"
