"""Progress written off the job thread (JobContext background=True, as the worker makes them): a
progress call never waits on the database; the throttle, the first and last writes, cancellation at
the next progress call and a lost lease keep working."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from tests.conftest import wait_for
from worker import db
from worker.handlers.base import JobCanceled, JobContext, JobLeaseLost
from worker.jobs import Job
from worker.queue import JobQueue, LeaseLost
from worker.storage import LocalStorage


def _job() -> Job:
    now = datetime.now(UTC)
    return Job(id=uuid.uuid4(), user_id=None, job_type="probe", queue="test", payload={}, priority=0, attempts=1,
               max_attempts=3, created_at=now, run_at=now)


class GatedWriter:
    """Records writes and the thread each ran on; blocks each write until `gate` is set."""

    def __init__(self, answer: Any = False) -> None:
        self.gate = threading.Event()
        self.writes: list[tuple[int, str | None]] = []
        self.threads: set[str] = set()
        self.answer = answer

    def __call__(self, progress: int, stage: str | None, partial: dict[str, Any] | None) -> bool:
        self.threads.add(threading.current_thread().name)
        self.gate.wait(10)
        self.writes.append((progress, stage))
        if isinstance(self.answer, BaseException):
            raise self.answer
        return bool(self.answer)


def test_progress_returns_while_its_write_waits_and_the_latest_update_goes_out(tmp_path: Any) -> None:
    writer = GatedWriter()
    ctx = JobContext(_job(), LocalStorage(tmp_path), writer, 0.0, background=True)
    for step in range(10):
        ctx.progress(step / 10, f"step {step}")  # the first write blocks in the writer thread, not here
    assert writer.writes == []
    ctx.progress(1.0, "done")
    writer.gate.set()
    wait_for(lambda: writer.writes and writer.writes[-1] == (100, "done"))
    assert writer.writes[0] == (0, "step 0")  # the first always goes out
    assert len(writer.writes) < 11  # updates made while a write was in flight were coalesced
    assert writer.threads == {"progress-writer"}


def test_background_writes_keep_the_throttle(tmp_path: Any) -> None:
    writer = GatedWriter()
    writer.gate.set()
    ctx = JobContext(_job(), LocalStorage(tmp_path), writer, 3600.0, background=True)
    for step in range(20):
        ctx.progress(step / 20, "working")
    ctx.progress(1.0, "done")
    wait_for(lambda: (100, "done") in writer.writes)
    assert writer.writes == [(0, "working"), (100, "done")]  # first and last; the rest throttled


@pytest.mark.parametrize(("answer", "raised"), [(True, JobCanceled), (LeaseLost("gone"), JobLeaseLost)])
def test_a_cancel_or_lost_lease_takes_effect_at_the_next_progress_call(tmp_path: Any, answer: Any,
                                                                       raised: type[BaseException]) -> None:
    writer = GatedWriter(answer)
    writer.gate.set()
    ctx = JobContext(_job(), LocalStorage(tmp_path), writer, 0.0, background=True)
    ctx.progress(0.1, "first")
    wait_for(lambda: ctx.cancelled)
    with pytest.raises(raised):
        ctx.progress(0.2, "second")


def test_a_forced_flush_returns_once_written_after_the_writes_before_it(tmp_path: Any) -> None:
    writer = GatedWriter()
    ctx = JobContext(_job(), LocalStorage(tmp_path), writer, 3600.0, background=True)
    ctx.progress(0.1, "first")  # written at once: waits at the gate in the writer thread
    ctx.progress(0.2, "throttled")
    flushed = threading.Event()
    flusher = threading.Thread(target=lambda: (ctx.flush(force=True), flushed.set()))
    flusher.start()
    assert not flushed.wait(0.2)  # a preview's row must be written before its object is removed
    writer.gate.set()
    flusher.join(10)
    assert flushed.is_set() and writer.writes == [(10, "first"), (20, "throttled")]


def test_synchronous_contexts_still_write_on_the_calling_thread(tmp_path: Any) -> None:
    writer = GatedWriter()
    writer.gate.set()
    ctx = JobContext(_job(), LocalStorage(tmp_path), writer, 0.0)
    ctx.progress(0.5, "half")
    assert writer.writes == [(50, "half")] and writer.threads == {threading.current_thread().name}


def test_a_locked_row_does_not_hold_the_job_thread(queue: JobQueue, database_url: str, tmp_path: Any) -> None:
    """Against Postgres: while another transaction holds the job's row, progress() returns and the write
    lands once the row is free."""
    queue.upsert_job_type("probe", "test", "probe", max_attempts=3)
    job_id = queue.enqueue("probe", {})
    pool = db.make_pool(database_url, 2, name="progress-async")
    try:
        owner = JobQueue(pool, "worker-async", lease_seconds=30)
        [job] = owner.claim(["probe"], 1)
        def write(progress: int, stage: str | None, partial: dict[str, Any] | None) -> bool:
            return owner.report_progress(job.id, progress, stage, partial)

        ctx = JobContext(job, LocalStorage(tmp_path), write, 0.0, background=True)
        with db.connect(database_url) as locker, locker.transaction():
            locker.execute("SELECT 1 FROM public.jobs WHERE id = %s FOR UPDATE", (job_id,))
            ctx.progress(0.4, "locked out")  # returns although its UPDATE waits for the lock
            assert queue.get_job(job_id)["progress"] == 0
        assert wait_for(lambda: queue.get_job(job_id)["stage"] == "locked out")
        assert queue.get_job(job_id)["progress"] == 40
    finally:
        pool.close()
