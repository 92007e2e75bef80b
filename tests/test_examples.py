"""The recipes under examples/ run as their docstrings say."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from support import REPO, clean_env, script, wait_until

EXAMPLES = REPO / "examples"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http(method: str, url: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_the_flask_app_enqueues_in_a_request_and_the_worker_beside_it_runs_the_job(
        tmp_path: Path, child_env: dict[str, str]) -> None:
    pytest.importorskip("flask", reason="the recipe needs flask (the test extra has it)")
    env = {**clean_env(PYTHONPATH=child_env["PYTHONPATH"]), "SQLITEQ_DB": str(tmp_path / "shop.db")}
    port = free_port()
    web = subprocess.Popen([sys.executable, "-m", "flask", "--app", "flask_app", "run",
                            "--port", str(port)], cwd=EXAMPLES, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    worker = subprocess.Popen([script(), "worker", "flask_app:runtime"], cwd=EXAMPLES, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"

        def serving() -> bool:
            try:
                return http("GET", f"{base}/jobs/none")[0] == 404
            except OSError:
                assert web.poll() is None, web.communicate()[1]
                return False

        wait_until(serving, 30, "the web app to serve")
        status, body = http("POST", f"{base}/orders", {"email": "ann@example.com", "total": 42})
        assert status == 202, body
        job = wait_until(lambda: (found := http("GET", f"{base}/jobs/{body['receipt_job']}")[1])
                         ["state"] == "done" and found, 30, "the receipt job to be done",
                         interval=0.05)
        assert job["result"] == {"sent_to": "ann@example.com", "order": body["order"]}
        assert http("POST", f"{base}/orders", {"total": 1})[0] == 400
    finally:
        worker.send_signal(signal.SIGINT)
        web.send_signal(signal.SIGINT)
        worker_err = worker.communicate(timeout=30)[1]
        web.communicate(timeout=30)
    assert worker.returncode == 0, worker_err
    assert "Traceback" not in worker_err, worker_err


def test_the_asyncio_program_runs_its_async_jobs_and_awaits_their_results(
        tmp_path: Path, child_env: dict[str, str]) -> None:
    result = subprocess.run([sys.executable, str(EXAMPLES / "asyncio_app.py"),
                             str(tmp_path / "crawl.db")], cwd=tmp_path, env=child_env,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "fetched 20 pages, 43000 bytes", result.stdout
