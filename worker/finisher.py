"""The finisher: a thread that writes the outcomes of finished jobs, batched, one durable statement
each batch, so a claim never waits on another job's commit (a WAL flush, milliseconds on a slow
disk); at shutdown the main thread writes what is left.

A mixin of worker.loop.Worker: the state it reads is the Worker's (see the annotations below).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from uuid import UUID

import psycopg

from worker import db
from worker.jobs import ErrorCode, JobError
from worker.queue import JobQueue, Outcome
from worker.running import Outcomes, Running, WorkerStats

log = logging.getLogger("worker.loop")  # one logger for the job's story, whichever module tells it


class OutcomeWriting:
    queue: JobQueue
    stats: WorkerStats
    on_finish: Callable[[Running, str], None] | None
    _finished: Outcomes
    _running: dict[UUID, Running]
    _running_lock: threading.Lock
    _wake: threading.Event

    def _start_finisher(self) -> None:
        """Outcomes commit durably (a WAL flush, milliseconds on a slow disk): on a thread of their own,
        so the main loop claims the next job while the last one's outcome is still being written."""
        self._flushing = 0
        self._finisher_stop = threading.Event()
        self._finisher = threading.Thread(target=self._run_finisher, name="finisher", daemon=True)
        self._finisher.start()

    def _run_finisher(self) -> None:
        while not self._finisher_stop.is_set():
            # woken by each outcome added (worker.running.Outcomes): no polling that an idle worker's
            # next pickup could meet; the timeout only bounds a wake-up that went missing
            self._finished.added.wait(5.0)
            self._finished.added.clear()
            try:
                self._flush_finished()
            except Exception:  # a bug, not the database (its errors are handled there): stop, as the loop did
                log.exception("writing job outcomes failed; stopping")
                self._flushing = 0
                self.stop()
                return

    def _stop_finisher(self) -> None:
        finisher: threading.Thread | None = getattr(self, "_finisher", None)
        if finisher is not None:
            self._finisher_stop.set()
            self._finished.added.set()
            finisher.join()  # at most one flush: its statement's own retries are bounded

    def _outcomes_pending(self) -> int:
        """Jobs whose outcome is not written yet: their handler is done, so their slot is free."""
        return len(self._finished) + self._flushing

    def _flush_finished(self) -> None:
        """Write the outcomes waiting in _finished (the finisher thread, or _shutdown once it is stopped).

        `_flushing` counts the batch in flight: taken off the deque first and off `_running` last, an
        outcome is never counted twice as a free slot by _loop, only briefly not at all."""
        if not self._finished:
            return
        batch = []
        while self._finished:
            batch.append(self._finished.popleft())
        self._flushing = len(batch)
        try:
            applied = self.queue.finish(batch)
        except db.TRANSIENT_DB_ERRORS as err:
            log.warning("finishing %d jobs failed (%s); will retry", len(batch), err)
            self._flushing = 0
            self._finished.extendleft(reversed(batch))
            time.sleep(0.5)
            return
        except psycopg.Error:
            applied = self._finish_one_by_one(batch)
        for outcome in batch:
            status = applied.get(outcome.job_id)
            if status == "pending":
                continue
            self._flushing -= 1
            if status is None:
                self.stats.lost += 1
                log.warning("job %s: lease lost before finish; result dropped", outcome.job_id)
            elif status == "queued":
                self.stats.retried += 1
            else:
                setattr(self.stats, status, getattr(self.stats, status) + 1)
            with self._running_lock:
                entry = self._running.pop(outcome.job_id, None)
            if entry is not None and self.on_finish is not None:
                self.on_finish(entry, "lost" if status is None else "retried" if status == "queued" else status)
        self._flushing = 0
        self._wake.set()  # slots are free and stats moved: max_jobs and the shutdown drain look again

    def _finish_one_by_one(self, batch: list[Outcome]) -> dict[UUID, str]:
        """A batch the database refused: finish each alone, failing the ones it cannot store."""
        applied: dict[UUID, str] = {}
        for outcome in batch:
            try:
                applied |= self.queue.finish([outcome])
            except db.TRANSIENT_DB_ERRORS:
                self._flushing -= 1
                self._finished.append(outcome)  # written on a later pass
                applied[outcome.job_id] = "pending"
            except psycopg.Error as err:
                log.error("job %s: outcome refused by the database: %s", outcome.job_id, err)
                error = JobError(ErrorCode.GENERATION_FAILED, f"result could not be stored: {err}", retryable=False)
                applied |= self.queue.finish([Outcome(outcome.job_id, "failed", error=error.to_json())])
        return applied
