"""The listener claims a notified job itself, on its own connection, when the main loop is idle
(worker.loop Worker._claim_on_notify). Real Postgres; the worker runs in a thread of the test."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from tests.conftest import WorkerThread, wait_for, wait_status
from worker.handlers.base import JobContext
from worker.jobs import Job
from worker.queue import JobQueue


class CountingHandler:
    """Sleeps payload["sleep"] seconds and records how many of its jobs ran at once, at most."""

    concurrent = True
    uses_storage = False

    def __init__(self, load_seconds: float = 0.0) -> None:
        self._lock = threading.Lock()
        self.running = 0
        self.most = 0
        self.started: dict[str, float] = {}
        self.loaded_at: float | None = None
        self.load_seconds = load_seconds

    def load(self) -> None:
        time.sleep(self.load_seconds)
        self.loaded_at = time.monotonic()

    def warm_up(self) -> None:
        pass

    def run(self, job: Job, ctx: JobContext) -> dict[str, Any]:
        with self._lock:
            self.running += 1
            self.most = max(self.most, self.running)
            self.started[str(job.id)] = time.monotonic()
        try:
            time.sleep(float(job.payload.get("sleep", 0)))
        finally:
            with self._lock:
                self.running -= 1
        return {}


def test_a_notified_job_is_claimed_on_the_listener_connection(queue: JobQueue, start_worker: Any, sql: Any) -> None:
    queue.upsert_job_type("counted", "test", "counted")
    handler = CountingHandler()
    worker = start_worker({"counted": handler})
    claims: list[tuple[str, int | None, int]] = []  # (thread, backend pid of the connection, jobs)
    claim = worker.worker.queue.claim

    def recording_claim(*args: Any, **kwargs: Any) -> Any:
        jobs = claim(*args, **kwargs)
        conn = kwargs.get("conn")
        claims.append((threading.current_thread().name, conn.info.backend_pid if conn else None, len(jobs)))
        return jobs

    worker.worker.queue.claim = recording_claim  # type: ignore[method-assign]
    wait_for(lambda: worker.worker._listening.is_set())
    listening = wait_for(lambda: sql.execute(
        "select pid from pg_stat_activity where datname = current_database() and query ilike 'LISTEN%%'").fetchone())
    time.sleep(0.3)  # idle: the start-up claim found nothing
    job_id = queue.enqueue("counted", {})
    row = wait_status(queue, job_id, "completed")
    assert row["worker_id"] == worker.worker.id and row["attempts"] == 1
    assert ("listener", listening["pid"], 1) in claims, claims


def test_claims_on_notifies_and_by_the_loop_never_exceed_the_concurrency(queue: JobQueue, start_worker: Any) -> None:
    queue.upsert_job_type("counted", "test", "counted")
    handler = CountingHandler()
    start_worker({"counted": handler}, concurrency=2)
    time.sleep(0.3)
    ids = []
    for _ in range(40):  # one at a time: each notify races the loop's claims as slots free
        ids.append(queue.enqueue("counted", {"sleep": 0.03}))
        time.sleep(0.005)
    rows = [wait_status(queue, job_id, "completed", timeout=30) for job_id in ids]
    assert all(r["attempts"] == 1 for r in rows)
    assert handler.most == 2  # both slots used, never a third


def test_max_jobs_holds_for_jobs_that_arrive_by_notify(queue: JobQueue, start_worker: Any) -> None:
    queue.upsert_job_type("counted", "test", "counted")
    worker = start_worker({"counted": CountingHandler()}, max_jobs=2)
    wait_for(lambda: worker.worker._listening.is_set())
    time.sleep(0.3)
    ids = [queue.enqueue("counted", {"sleep": 0.2}) for _ in range(3)]
    worker.thread.join(15)
    assert not worker.thread.is_alive() and worker.stats.claimed == 2
    assert sorted(queue.get_job(i)["status"] for i in ids) == ["completed", "completed", "queued"]


def test_a_job_notified_while_models_preload_waits_for_the_preload(queue: JobQueue, settings: Any) -> None:
    queue.upsert_job_type("counted", "test", "counted")
    handler = CountingHandler(load_seconds=1.5)
    preloading = WorkerThread(settings.model_copy(update={"worker_id": "test-listener-preload"}),
                              {"counted": handler})
    preloading.worker.preload = True  # type: ignore[attr-defined]  # what `run --preload` sets
    preloading.start()
    try:
        wait_for(lambda: preloading.worker._listening.is_set())
        assert handler.loaded_at is None  # still loading
        job_id = queue.enqueue("counted", {})
        wait_status(queue, job_id, "completed")
        assert handler.loaded_at is not None and handler.started[str(job_id)] >= handler.loaded_at
    finally:
        preloading.stop()


def test_a_scheduled_job_starts_when_due_after_a_notified_job(queue: JobQueue, start_worker: Any) -> None:
    """A claim on a notify (slots left free) looks up the next due time: the scheduled job runs on
    time, not at the next 60 s poll."""
    queue.upsert_job_type("counted", "test", "counted")
    handler = CountingHandler()
    worker = start_worker({"counted": handler}, concurrency=2, poll_interval=60)
    wait_for(lambda: worker.worker._listening.is_set())
    time.sleep(0.3)
    due_at = datetime.now(UTC) + timedelta(seconds=1)
    later = queue.enqueue("counted", {}, run_at=due_at)
    now = queue.enqueue("counted", {})
    wait_status(queue, now, "completed")
    row = wait_status(queue, later, "completed", timeout=10)
    assert due_at <= row["started_at"] < due_at + timedelta(seconds=3)


def test_a_job_that_came_due_while_every_slot_was_busy_starts_when_one_frees(queue: JobQueue,
                                                                           start_worker: Any) -> None:
    """A claim that took every slot looks up no due time; the loop does once a slot frees, counting
    the jobs that came due since that claim (NEXT_DUE otherwise leaves out those due for over a second)."""
    queue.upsert_job_type("counted", "test", "counted")
    handler = CountingHandler()
    worker = start_worker({"counted": handler}, concurrency=1, poll_interval=60)
    wait_for(lambda: worker.worker._listening.is_set())
    time.sleep(0.3)
    later = queue.enqueue("counted", {}, run_at=datetime.now(UTC) + timedelta(seconds=0.5))
    busy = queue.enqueue("counted", {"sleep": 2.5})
    finished = wait_status(queue, busy, "completed")
    row = wait_status(queue, later, "completed", timeout=10)
    assert row["started_at"] - finished["finished_at"] < timedelta(seconds=2)
