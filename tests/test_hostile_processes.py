"""Hostile rows and stuck handlers against real `ourvidz-worker run` processes (issue 9)."""

from __future__ import annotations

import time
import uuid
from typing import Any

import psycopg

from tests.conftest import wait_for
from tests.test_hostile import POISON_PAYLOADS, TERMINAL, insert_raw
from tests.test_processes import Cli, cli, record_file  # noqa: F401  (fixtures)
from worker.queue import JobQueue

GOOD = '{"prompt": "fine", "config": {"steps": 2, "step_seconds": 0.01}}'


def _statuses(queue: JobQueue, ids: list[Any]) -> list[str]:
    return [queue.get_job(i)["status"] for i in ids]


def test_poison_rows_between_good_jobs_stop_no_worker(cli: Cli, queue: JobQueue,  # noqa: F811
                                                      sql: psycopg.Connection[dict[str, Any]]) -> None:
    payloads = [p for poison in POISON_PAYLOADS.values() for p in (GOOD, GOOD, poison)] + [GOOD]
    ids = insert_raw(sql, payloads)
    workers = [cli.start("run", "--concurrency", "3", "--worker-id", f"poison-{i}-{uuid.uuid4().hex[:4]}",
                         name=f"poison-{i}") for i in range(2)]
    wait_for(lambda: all(s in TERMINAL for s in _statuses(queue, ids)), timeout=60, interval=0.2)
    rows = [queue.get_job(i) for i in ids]
    assert all(w.alive() for w in workers), [w.output()[-2000:] for w in workers]
    good = [r for p, r in zip(payloads, rows, strict=True) if p == GOOD]
    poison = [r for p, r in zip(payloads, rows, strict=True) if p != GOOD]
    assert {r["status"] for r in good} == {"completed"}
    assert {(r["status"], r["error"]["code"]) for r in poison} == {("failed", "INVALID_INPUT")}
    assert all(r["attempts"] == 1 for r in rows)  # nothing was rescued: no worker died on a row
    logs = "".join(w.output() for w in workers)
    assert "INVALID_INPUT" in logs and "Traceback" not in logs


def test_a_handler_that_ignores_its_time_limit_makes_its_worker_exit(
        cli: Cli, queue: JobQueue, sql: psycopg.Connection[dict[str, Any]]) -> None:  # noqa: F811
    sql.execute("insert into public.job_types (name, queue, handler, max_run_seconds)"
                " values ('stubborn', 'test', 'stubborn', 1)")
    job_id = queue.enqueue("stubborn", {"stubborn": True})
    cli.env["OURVIDZ_TIMEOUT_GRACE"] = "1"
    worker = cli.start("run", "--handler", "stubborn=tests.hostile_support:StubbornHandler", "--lease-seconds", "3",
                       "--worker-id", f"stubborn-{uuid.uuid4().hex[:4]}", name="stubborn")
    code = worker.wait(30)
    assert code == 3, worker.output()[-3000:]
    assert "did not stop within 1s of its time limit" in worker.output()
    row = queue.get_job(job_id)
    assert (row["status"], row["attempts"], [e["code"] for e in row["errors"]]) == ("queued", 1, ["TIMEOUT_ERROR"])


def test_c_code_holding_the_gil_trips_the_watchdog(cli: Cli, queue: JobQueue,  # noqa: F811
                                                   sql: psycopg.Connection[dict[str, Any]]) -> None:
    sql.execute("insert into public.job_types (name, queue, handler) values ('gil', 'test', 'gil')")
    job_id = queue.enqueue("gil", {"seconds": 3600}, max_attempts=1)
    cli.env["OURVIDZ_HANG_EXIT_SECONDS"] = "3"
    worker = cli.start("run", "--handler", "gil=tests.hostile_support:GilHoggingHandler", "--lease-seconds", "2",
                       "--worker-id", f"gil-{uuid.uuid4().hex[:4]}", name="gil")
    wait_for(lambda: queue.get_job(job_id)["status"] == "processing", timeout=20)
    started = time.monotonic()
    code = worker.wait(30)
    assert code != 0 and time.monotonic() - started < 20, worker.output()[-2000:]
    assert "Timeout" in worker.output()  # faulthandler's dump of every thread, for the operator
