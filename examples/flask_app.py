"""A Flask app that enqueues a job inside a request, and the worker that runs it.

    pip install sqliteq flask
    export SQLITEQ_DB=shop.db                   # both processes use this file
    flask --app flask_app run                   # the web app, on http://127.0.0.1:5000
    sqliteq worker flask_app:runtime            # the worker, in a second terminal

    curl -X POST -H 'Content-Type: application/json' \\
         -d '{"email": "ann@example.com", "total": 42}' http://127.0.0.1:5000/orders
    curl http://127.0.0.1:5000/jobs/<the receipt_job it printed>

The request returns as soon as the job is committed; the worker sends the receipt. The order
and its job are written in one transaction, so neither exists without the other.
"""

from __future__ import annotations

import os
from typing import Any

import flask

import sqliteq

storage = sqliteq.Storage(os.environ.get("SQLITEQ_DB", "shop.db"))
runtime = sqliteq.Runtime(storage, queues={"email": 2})
storage.db.write(lambda conn: conn.execute(
    "CREATE TABLE IF NOT EXISTS orders (id INTEGER PRIMARY KEY, email TEXT, total REAL)"))


@runtime.task(queue="email", max_attempts=3)
def send_receipt(ctx: sqliteq.JobCtx, payload: dict[str, Any]) -> dict[str, Any]:
    """Runs in the worker: here it would talk to the mail server."""
    return {"sent_to": payload["email"], "order": payload["order"]}


app = flask.Flask(__name__)


@app.post("/orders")
def create_order() -> tuple[dict[str, Any], int]:
    order = flask.request.get_json(force=True)
    if not isinstance(order, dict) or not isinstance(order.get("email"), str):
        return {"error": "an order needs an email"}, 400

    def place(conn: Any) -> tuple[int, str]:
        conn.execute("INSERT INTO orders (email, total) VALUES (?, ?)",
                     (order["email"], order.get("total", 0)))
        order_id = conn.last_insert_rowid()
        [outcome] = storage.jobs.enqueue_in(conn, [send_receipt.request(
            {"order": order_id, "email": order["email"]})])
        return order_id, outcome.job_id

    order_id, job_id = storage.db.write(place)     # one commit: the order and its job
    return {"order": order_id, "receipt_job": job_id}, 202


@app.get("/jobs/<job_id>")
def job_status(job_id: str) -> tuple[dict[str, Any], int]:
    job = storage.jobs.get(job_id)
    if job is None:
        return {"error": "no such job"}, 404
    return {"id": job.id, "state": str(job.state), "result": job.result}, 200
