"""Running claimed jobs: validate (and fetch) before any model work, call the handler with its
model resident, and turn what it returned or raised into the outcome the worker writes.

A mixin of worker.loop.Worker: the state it reads is the Worker's (see the annotations below).
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from contextlib import AbstractContextManager, nullcontext
from typing import Any
from uuid import UUID

from worker import db
from worker.config import Settings
from worker.estimate import LiveUpdate
from worker.faults import worker_fault_of
from worker.handlers.base import Handler, JobCanceled, JobContext, JobInterrupted
from worker.jobs import ErrorCode, Job, JobError, JobType, WorkerFault, classify
from worker.logs import job_extra
from worker.memory import MemoryManager, is_oom
from worker.queue import JobQueue, Outcome
from worker.running import Faults, JobRunners, JobTimedOut, Running, WorkerStats
from worker.storage import Storage

log = logging.getLogger("worker.loop")  # one logger for the job's story, whichever module tells it


class JobExecution:
    id: str
    settings: Settings
    handlers: dict[str, Handler]
    storage: Storage
    queue: JobQueue
    memory: MemoryManager
    stats: WorkerStats
    _served: dict[str, JobType]
    _running: dict[UUID, Running]
    _running_lock: threading.Lock
    _runners: JobRunners
    _preparers: JobRunners
    _run_locks: dict[str, threading.Lock]
    _faults: Faults
    _finished: Any
    _wake: threading.Event

    def _dispatch(self, jobs: list[Job]) -> None:
        """One thread per job, except that jobs of a batching handler share a thread and a batch."""
        batches: dict[str, list[Job]] = {}
        for job in jobs:
            job.type_info = self._served.get(job.job_type)
            name = job.type_info.handler if job.type_info else ""
            size = getattr(self.handlers.get(name), "max_batch_size", 1)
            if size > 1 and hasattr(self.handlers[name], "run_batch"):
                batch = batches.setdefault(name, [])
                batch.append(job)
                if len(batch) == size:
                    self._start(batches.pop(name))
            else:
                self._start([job])
        for batch in batches.values():
            self._start(batch)

    def _start(self, jobs: list[Job]) -> None:
        ctxs = [JobContext(job, self.storage, self._progress_writer(job.id), self.settings.progress_interval,
                           background=True)  # progress round trips off the job thread (worker.handlers.base)
                for job in jobs]
        info = jobs[0].type_info
        # Only a handler whose prepare() downloads (references) gets the extra thread hop: for the rest
        # validation is quick and runs on the job's own runner thread.
        fetches = len(jobs) == 1 and getattr(self.handlers.get(info.handler if info else ""), "prepare_fetches", False)
        with self._running_lock:
            for job, ctx in zip(jobs, ctxs, strict=True):
                self._running[job.id] = Running(job, ctx, preparing=fetches)
        self.stats.claimed += len(jobs)
        for job in jobs:
            log.info("job %s claimed: %s, attempt %d of %d", job.id, job.job_type, job.attempts, job.max_attempts,
                     extra=job_extra(job, self.id))
        if fetches:
            self._preparers.submit(lambda: self._prepare_then_run(jobs, ctxs))
        else:
            self._runners.submit(lambda: self._run_jobs(jobs, ctxs))

    def _prepare_then_run(self, jobs: list[Job], ctxs: list[JobContext]) -> None:
        ready = self._prepare(jobs, ctxs)
        with self._running_lock:
            for job in jobs:
                if job.id in self._running:
                    self._running[job.id].preparing = False
        self._wake.set()  # the slot it held while preparing counts again
        if ready:
            self._runners.submit(lambda: self._run_jobs(*ready, prepared=True))

    def _prepare(self, jobs: list[Job], ctxs: list[JobContext]) -> tuple[list[Job], list[JobContext]] | None:
        """Validate each job (and fetch its references, for handlers that have a `prepare`) before any
        model work; a job that fails here finishes alone, the others go on together."""
        info = jobs[0].type_info
        handler = self.handlers.get(info.handler) if info else None
        prepare = getattr(handler, "prepare", None)
        ready: tuple[list[Job], list[JobContext]] = ([], [])
        for job, ctx in zip(jobs, ctxs, strict=True):
            try:
                job.payload_object()
                if callable(prepare):
                    prepare(job, ctx)
            except BaseException as exc:
                self._settle(job, ctx, exc)
                continue
            ready[0].append(job)
            ready[1].append(ctx)
        return ready if ready[0] else None

    def _progress_writer(self, job_id: UUID) -> Any:
        def write(progress: int, stage: str | None, partial: dict[str, Any] | None,
                  live: LiveUpdate | None = None) -> bool:
            try:
                return self.queue.report_progress(job_id, progress, stage, partial, live)
            except db.TRANSIENT_DB_ERRORS as err:
                log.warning("progress write for %s skipped: %s", job_id, err)
                return False

        return write

    def _run_jobs(self, jobs: list[Job], ctxs: list[JobContext], prepared: bool = False) -> None:
        if not prepared:  # validated here, by the job's runner thread, still before its model loads
            batch = self._prepare(jobs, ctxs)
            if batch is None:
                return
            jobs, ctxs = batch
        try:
            values = self._call_handler(jobs, ctxs)
        except BaseException as exc:
            values = [exc] * len(jobs)
        for job, ctx, value in zip(jobs, ctxs, values, strict=True):
            self._settle(job, ctx, value)

    def _settle(self, job: Job, ctx: JobContext, value: Any) -> None:
        """Turn one job's result or exception into the outcome the main loop writes."""
        outcome = self._outcome(job, ctx, value)
        ctx.cleanup()
        if outcome is not None and outcome.status != "completed":
            ctx.discard_assets()  # a failed, retried, canceled or given-back attempt leaves nothing readable
        if outcome is not None:
            self._log_outcome(job, outcome)
            self._finished.append(outcome)
        else:
            with self._running_lock:
                self._running.pop(job.id, None)
        self._wake.set()

    def _call_handler(self, jobs: list[Job], ctxs: list[JobContext]) -> list[Any]:
        """Run the handler on one job (run) or a batch (run_batch): one result or exception per job.

        A job that runs out of memory is retried once in-process after the memory manager freed
        caches and evicted every idle model; out of memory again, it goes back with OOM_ERROR."""
        info = jobs[0].type_info
        handler = self.handlers.get(info.handler) if info else None
        if info is None or handler is None:
            raise JobError(ErrorCode.UNKNOWN_JOB_TYPE, f"worker {self.id} has no handler for {jobs[0].job_type!r}")
        values = self._invoke(info.handler, handler, jobs, ctxs)
        order = [i for i, v in enumerate(values) if isinstance(v, Exception) and is_oom(v)]
        if not order:
            return values
        for i in order:
            values[i] = None  # the exception's traceback holds the failed attempt's tensors
        log.warning("jobs %s ran out of memory; evicting idle models and retrying once",
                    ", ".join(str(jobs[i].id) for i in order))
        evicted = self.memory.relieve(keep=[info.handler])
        retried = self._invoke(info.handler, handler, [jobs[i] for i in order], [ctxs[i] for i in order])
        for i, value in zip(order, retried, strict=True):
            if isinstance(value, Exception) and is_oom(value):
                value = JobError(ErrorCode.OOM_ERROR, f"out of memory, again after evicting {len(evicted)} idle "
                                                      f"models and retrying: {value}"[:2000], retryable=True)
            values[i] = value
        return values

    def _invoke(self, name: str, handler: Handler, jobs: list[Job], ctxs: list[JobContext]) -> list[Any]:
        """One call of the handler with its model resident and pinned; an Exception becomes every job's value."""
        lock: AbstractContextManager[Any] = (
            nullcontext() if getattr(handler, "concurrent", False)
            else self._run_locks.setdefault(name, threading.Lock())
        )
        try:
            with self.memory.use(name, on_load=lambda: ctxs[0].progress(0.0, "loading model")), lock:
                self._mark_run_started(jobs)
                if len(jobs) == 1:
                    return [handler.run(jobs[0], ctxs[0])]
                values = list(handler.run_batch(jobs, ctxs))  # type: ignore[attr-defined]
        except Exception as exc:
            return [exc] * len(jobs)
        if len(values) != len(jobs):
            error = JobError(ErrorCode.GENERATION_FAILED, f"{name} returned {len(values)} results for {len(jobs)} jobs")
            return [error] * len(jobs)
        return values

    def _mark_run_started(self, jobs: list[Job]) -> None:
        now = time.monotonic()
        with self._running_lock:
            for job in jobs:
                if job.id in self._running:
                    self._running[job.id].run_started = now

    def _outcome(self, job: Job, ctx: JobContext, value: Any) -> Outcome | None:
        """What to write for one job, from its handler's result or exception (None: not ours to write)."""
        try:
            if isinstance(value, BaseException):
                raise value
            ctx.check()
            if not isinstance(value, dict):
                raise JobError(ErrorCode.GENERATION_FAILED, f"handler returned {type(value).__name__}, not a dict")
            json.dumps(value)  # a result the row cannot hold fails here, not in the finish
            if _has_nul(value):
                raise JobError(ErrorCode.GENERATION_FAILED, "result holds NUL characters, which Postgres cannot store")
            return Outcome(job.id, "completed", result=value)
        except JobCanceled:
            return Outcome(job.id, "canceled")
        except JobTimedOut:
            limit = self._time_limit(job)
            return self._failure(job, JobError(ErrorCode.TIMEOUT_ERROR, f"{job.job_type} jobs may run for "
                                               f"{limit:.0f}s; this one was stopped at its limit"))
        except JobInterrupted:
            return None  # lease lost (another worker holds it) or shutdown (we release it)
        except WorkerFault as fault:
            return self._give_back(job, fault)
        except BaseException as exc:
            if (fault := worker_fault_of(exc, job.type_info.handler if job.type_info else None)) is not None:
                return self._give_back(job, fault)  # a full disk, a broken device, a model that cannot load
            error = classify(exc)
            if error is not exc and error.code == ErrorCode.GENERATION_FAILED:  # a bug, not a known failure
                log.error("job %s: %s raised", job.id, job.job_type, exc_info=exc, extra=job_extra(job, self.id))
            return self._failure(job, error)

    def _log_outcome(self, job: Job, outcome: Outcome) -> None:
        with self._running_lock:
            entry = self._running.get(job.id)
        seconds = time.monotonic() - entry.started if entry else 0.0
        fields = job_extra(job, self.id, outcome=outcome.status, seconds=round(seconds, 3))
        if outcome.status == "completed" or outcome.status == "canceled":
            log.info("job %s %s in %.2fs", job.id, outcome.status, seconds, extra=fields)
            return
        error = outcome.error or {}
        fields["code"] = error.get("code")
        if outcome.refund:
            return  # _give_back said why
        if outcome.status == "queued":
            log.warning("job %s failed attempt %d after %.2fs, retrying in %.1fs: %s %s", job.id, job.attempts,
                        seconds, outcome.retry_delay, error.get("code"), error.get("message"), extra=fields)
        else:
            log.warning("job %s failed after %.2fs: %s %s", job.id, seconds, error.get("code"), error.get("message"),
                        extra=fields)

    def _give_back(self, job: Job, fault: WorkerFault) -> Outcome:
        """The worker's own fault: the job goes back to its place in the queue with its attempt refunded,
        and this worker stops claiming what the fault covers until a retry finds it fixed."""
        entry = self._faults.record(fault)
        log.error("job %s: not this job's fault (%s: %s); giving it back and not claiming %s work for %.0fs",
                  job.id, fault.code, fault.message, fault.scope, entry.delay, extra=job_extra(job, self.id))
        return Outcome(job.id, "queued", error=fault.to_json(), refund=True)

    def _time_limit(self, job: Job) -> float | None:
        info = job.type_info
        return float(info.max_run_seconds) if info and info.max_run_seconds else None

    def _failure(self, job: Job, error: JobError) -> Outcome:
        if error.retryable and job.attempts < job.max_attempts:
            return Outcome(job.id, "queued", error=error.to_json(), retry_delay=self._backoff(job.attempts))
        if error.retryable:
            error = JobError(error.code, f"{error.message} (gave up after {job.attempts} attempts)",
                             retryable=False)
        return Outcome(job.id, "failed", error=error.to_json())

    def _backoff(self, attempt: int) -> float:
        """Exponential with jitter: half fixed, half random, so retries of a burst spread out."""
        ceiling = min(self.settings.retry_max_seconds, self.settings.retry_base_seconds * 2 ** (attempt - 1))
        return ceiling / 2 + random.uniform(0, ceiling / 2)


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(_has_nul(v) for v in value)
    return False
