"""The worker loop under its own faults and database outages (issue 10): jobs keep their place,
their attempts and their work; a worker id is held by one live worker. Real Postgres throughout;
the outage goes through tests/test_connections.py's black-hole proxy (every worker loses the database).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.conftest import WorkerThread, wait_for, wait_status
from tests.test_connections import FAST, BlackHoleProxy, fast_settings, proxy  # noqa: F401  (fixtures)
from tests.test_processes import Cli, cli_env
from worker.config import Settings
from worker.handlers.base import JobContext
from worker.handlers.simulate import SimulateHandler
from worker.jobs import ErrorCode, Job, WorkerFault
from worker.loop import Worker
from worker.queue import JobQueue, WorkerIdInUse
from worker.storage import LocalStorage


class FlakyModelHandler:
    """Its model "cannot load" until `fixed` is set: a fault of the worker's own, never the job's."""

    def __init__(self) -> None:
        self.fixed = threading.Event()
        self.runs = 0

    def load(self) -> None:
        pass

    def run(self, job: Job, ctx: JobContext) -> dict[str, Any]:
        self.runs += 1
        if not self.fixed.is_set():
            raise WorkerFault(ErrorCode.MODEL_LOAD_ERROR, "model folder /models/x does not exist",
                              scope="handler:flaky")
        return {"ok": True}


def test_a_worker_fault_gives_the_job_back_unspent_and_stops_claiming_only_that_work(
        start_worker: Callable[..., WorkerThread], queue: JobQueue, sql: psycopg.Connection[dict[str, Any]]) -> None:
    sql.execute("insert into public.job_types (name, queue, handler) values ('flaky', 'test', 'flaky')")
    flaky = FlakyModelHandler()
    first = queue.enqueue("flaky", {})
    worker = start_worker({"flaky": flaky, "simulate": SimulateHandler()}, fault_retry_seconds=1.0)
    wait_for(lambda: queue.get_job(first)["errors"])
    row = queue.get_job(first)
    assert (row["status"], row["attempts"]) == ("queued", 0)
    assert row["errors"][0]["code"] == "MODEL_LOAD_ERROR" and row["errors"][0]["worker_fault"] is True
    assert worker.worker.faults == {"handler:flaky": "model folder /models/x does not exist"}
    worker.worker.beat_now()
    faults = sql.execute("select faults from public.workers where id = %s", (worker.worker.id,)).fetchone()["faults"]
    assert faults == {"handler:flaky": "model folder /models/x does not exist"}
    other = queue.enqueue("simulate", {"config": {"steps": 1, "step_seconds": 0}})
    assert wait_status(queue, other, "completed")["status"] == "completed"  # the rest is still served
    runs_while_faulted = flaky.runs
    flaky.fixed.set()
    done = wait_status(queue, first, "completed", timeout=20)
    assert done["attempts"] == 1 and runs_while_faulted <= 2
    wait_for(lambda: worker.worker.faults == {}, timeout=5)
    worker.stop()


def test_rescued_and_released_jobs_keep_their_place(queue: JobQueue) -> None:
    worker = JobQueue(queue.pool, worker_id="w-place", lease_seconds=0.2)
    first = queue.enqueue("simulate", {})
    assert [j.id for j in worker.claim(["simulate"], 1)] == [first]
    younger = [queue.enqueue("simulate", {}) for _ in range(3)]
    assert worker.release([first]) == {first}
    assert [j.id for j in worker.claim(["simulate"], 1)] == [first]  # released: before the younger ones
    time.sleep(0.3)
    assert first in JobQueue(queue.pool).rescue_expired()
    assert [j.id for j in worker.claim(["simulate"], 1)] == [first]  # rescued: before the younger ones too
    assert queue.get_job(younger[0])["status"] == "queued"


def test_a_live_worker_id_is_refused_and_a_stopped_one_reused(settings: Settings,
                                                              start_worker: Callable[..., WorkerThread]) -> None:
    live = start_worker(worker_id="twin")
    wait_for(lambda: live.worker.last_beat_at is not None)
    twin = Worker(settings.model_copy(update={"worker_id": "twin"}), {"simulate": SimulateHandler()},
                  LocalStorage(settings.storage_dir))
    started = time.monotonic()
    with pytest.raises(WorkerIdInUse, match="worker id 'twin' is already in use by a live worker"):
        twin.run(install_signals=False)
    assert time.monotonic() - started < settings.lease_seconds + 2
    live.stop()
    again = start_worker(worker_id="twin")
    wait_for(lambda: again.worker.last_beat_at is not None)
    again.stop()


def test_a_database_outage_longer_than_the_lease_rescues_no_live_workers_job(
        proxy: BlackHoleProxy, fast_settings: Settings, queue: JobQueue) -> None:  # noqa: F811
    lease = 2.0
    workers = [WorkerThread(fast_settings.model_copy(update={
        "database_url": proxy.url, "lease_seconds": lease, "worker_id": f"outage-{i}-{uuid.uuid4().hex[:4]}",
        "concurrency": 2, "poll_interval": 0.5,
    }), {"simulate": SimulateHandler()}).start() for i in range(2)]
    ids = [queue.enqueue("simulate", {"config": {"steps": 40, "step_seconds": 0.25}}) for _ in range(4)]
    try:
        wait_for(lambda: all(queue.get_job(i)["status"] == "processing" for i in ids), timeout=15)
        holders = {queue.get_job(i)["worker_id"] for i in ids}
        assert len(holders) == 2  # both workers hold jobs
        proxy.blackhole()
        time.sleep(3 * lease)  # every lease runs out while the workers cannot reach the database
        expired = queue.pool.connection().__enter__().execute(
            "select count(*) as n from public.jobs where status = 'processing' and lease_expires_at < now()"
        ).fetchone()["n"]
        assert expired == 4
        proxy.restore()
        rows = [wait_status(queue, i, "completed", "failed", timeout=60) for i in ids]
        assert [(r["status"], r["attempts"]) for r in rows] == [("completed", 1)] * 4
        assert all(r["errors"] == [] for r in rows), [r["errors"] for r in rows]
        assert {r["worker_id"] for r in rows} == holders
    finally:
        for worker in workers:
            worker.stop(abort=True)
    assert FAST  # the proxy's fast timeouts make the outage noticed within seconds


def test_worker_processes_ride_out_a_database_stopped_longer_than_the_lease(
        database_url: str, queue: JobQueue, tmp_path: Path) -> None:
    server = BlackHoleProxy(database_url)
    env = cli_env(server.url, tmp_path / "home", tmp_path / "runs.txt")
    cli = Cli(env, tmp_path, tmp_path / "runs.txt")
    try:
        ids = [queue.enqueue("simulate", {"config": {"steps": 40, "step_seconds": 0.25}}) for _ in range(4)]
        for i in range(2):
            cli.start("run", "--concurrency", "2", "--lease-seconds", "2",
                      "--worker-id", f"stop-{i}-{uuid.uuid4().hex[:4]}", name=f"stop-{i}")
        wait_for(lambda: all(queue.get_job(i)["status"] == "processing" for i in ids), timeout=30)
        server.stop_server()
        time.sleep(6)  # three leases
        server.restore()
        rows = [wait_status(queue, i, "completed", "failed", timeout=60) for i in ids]
        assert [(r["status"], r["attempts"], r["errors"]) for r in rows] == [("completed", 1, [])] * 4
        assert all(p.alive() for p in cli.procs), [p.output()[-2000:] for p in cli.procs]
        assert any("database reachable again after" in p.output() for p in cli.procs)
    finally:
        cli.kill_all()
        server.close()
