"""The worker loop: wake, claim, dispatch, keep leases, finish, shut down.

Threads: the main loop claims and finishes (batched, one statement each); each job runs in its
own thread; a lease keeper beats every lease/3 seconds; a listener turns NOTIFY into wake-ups
and falls back to polling when LISTEN is unavailable. No transaction is open while a handler runs.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from datetime import UTC, datetime
from types import FrameType
from typing import Any
from uuid import UUID

import psycopg

from worker import db
from worker.config import Settings
from worker.estimate import LiveUpdate
from worker.faults import worker_fault_of
from worker.handlers.base import (
    Handler,
    JobCanceled,
    JobContext,
    JobInterrupted,
    JobLeaseLost,
    WorkerStopping,
)
from worker.jobs import ErrorCode, Job, JobError, JobType, WorkerFault, classify
from worker.memory import MemoryManager, is_oom
from worker.queue import JobQueue, Outcome, WorkerIdInUse, WorkerMemory
from worker.running import Faults, HangWatchdog, JobRunners, JobTimedOut, Running, WorkerStats, job_log_fields
from worker.storage import Storage

log = logging.getLogger(__name__)

VERSION = "0.1.0"
CHANNEL_JOBS = "ourvidz_jobs"
CHANNEL_CANCEL = "ourvidz_cancel"
CHANNEL_TYPES = "ourvidz_types"
SLOW_PREPARE_SECONDS = 0.25  # a job still validating or fetching references after this holds no job slot


class Worker:
    def __init__(
        self,
        settings: Settings,
        handlers: dict[str, Handler],
        storage: Storage,
        *,
        database_url: str | None = None,
        max_jobs: int | None = None,
    ) -> None:
        self.settings = settings
        self.handlers = handlers
        self.storage = storage
        self.url = database_url or db.resolve_database_url(settings)
        self.max_jobs = max_jobs
        self.id = settings.resolved_worker_id
        self.stats = WorkerStats()
        self.pool = db.make_pool(self.url, settings.pool_size + 1, name=f"worker-{self.id}",
                                 prepare=settings.prepare_statements, check=False,
                                 async_commit=settings.async_commit, settings=settings)
        self.queue = JobQueue(self.pool, self.id, settings.lease_seconds, async_commit=settings.async_commit)

        self._wake = threading.Event()  # the main loop has something to do
        self._notified = threading.Event()  # a job may have become claimable
        self._stop = threading.Event()  # stop claiming, drain
        self._abort = threading.Event()  # second signal: release at once
        self._done = threading.Event()  # loop finished; helpers exit
        self._types_changed = threading.Event()
        self._beat_requested = threading.Event()
        self._listening = threading.Event()
        self._finished: deque[Outcome] = deque()
        self._running: dict[UUID, Running] = {}
        self._running_lock = threading.Lock()
        self._runners = JobRunners(settings.concurrency)
        # Validation and reference fetches run here, holding no model and no job slot, so one user's
        # slow URL delays only that user's job; up to prepare_slots such jobs are claimed on top.
        self._preparers = JobRunners(settings.concurrency + settings.prepare_slots, "job-preparer")
        self._faults = Faults(settings.fault_retry_seconds, settings.fault_retry_max_seconds)
        # never shorter than a few beats of the lease keeper, which re-arms it each beat
        hang_seconds = max(settings.hang_exit_seconds, settings.lease_seconds)
        self._watchdog = HangWatchdog(hang_seconds if settings.hang_watchdog else 0)
        self._connected_since: float | None = None  # the lease keeper's view of the database
        self._last_outage = 0.0  # seconds the lease keeper last went without the database
        self.exit_reason: str | None = None  # set when the worker stops itself (a handler that would not stop)
        self._run_locks: dict[str, threading.Lock] = {}
        self.memory = MemoryManager(settings, handlers)  # loads, pins and evicts the handlers' models
        self._served: dict[str, JobType] = {}
        # Read by worker.health: liveness of the main loop and the lease keeper (monotonic seconds).
        self.started_at = time.time()
        self.last_loop_at: float | None = None
        self.last_beat_at: float | None = None
        self.on_finish: Callable[[Running, str], None] | None = None  # outcome: completed|failed|...|lost

    # -- public -------------------------------------------------------------------------

    @property
    def faults(self) -> dict[str, str]:
        """The worker's own faults now, scope -> reason (empty when it can serve everything)."""
        return self._faults.reasons()

    def add_faults(self, reasons: dict[str, str]) -> None:
        """Faults found before the first claim (the preflight): those scopes start closed."""
        self._faults.seed(reasons)

    def run(self, install_signals: bool = True) -> WorkerStats:
        if install_signals:
            signal.signal(signal.SIGTERM, self._on_signal)
            signal.signal(signal.SIGINT, self._on_signal)
        self._refresh_served_types()
        try:
            self.queue.register_worker(socket.gethostname(), os.getpid(), self.settings.queues,
                                       sorted(self._served), VERSION,
                                       live_seconds=max(self.settings.lease_seconds, 1.0))
        except WorkerIdInUse:
            self.pool.close()
            raise
        self.last_beat_at = time.monotonic()  # registering beat the workers row
        self._connected_since = time.monotonic()
        self._watchdog.arm()
        helpers = [threading.Thread(target=self._keep_leases, name="lease-keeper", daemon=True)]
        if self.settings.listen:
            helpers.append(threading.Thread(target=self._listen, name="listener", daemon=True))
        for thread in helpers:
            thread.start()
        if getattr(self, "preload", False):  # run --preload: load and warm every served model before the first claim
            from worker.preload import preload

            self.add_faults(preload(self.handlers, self.memory, self._served.values(), self._stop.is_set))
        log.info("worker %s serving %s", self.id, ", ".join(sorted(self._served)) or "nothing")
        try:
            self._loop()
        finally:
            self._shutdown()
            self._done.set()
            self._beat_requested.set()  # wakes the lease keeper so it sees _done
            for thread in helpers:
                thread.join(timeout=5)
            self._set_state("stopped")  # after the lease keeper is gone, so no late beat overwrites it
            self._watchdog.disarm()
            self.pool.close()
        return self.stats

    def stop(self, abort: bool = False) -> None:
        """What SIGTERM does; a second call (or abort=True) stops waiting for running jobs."""
        if self._stop.is_set() or abort:
            self._abort.set()
        self._stop.set()
        self._wake.set()

    # -- main loop ----------------------------------------------------------------------

    def _loop(self) -> None:
        more_maybe = True  # a claim may find work: start-up, a notify, a poll, or a full claim
        next_poll = 0.0
        self._start_finisher()
        while True:
            self.last_loop_at = time.monotonic()
            if self._finished:
                self._finish_wake.set()  # written by the finisher thread: a claim never waits on that commit
            if self._stop.is_set() or self._max_jobs_reached():
                break
            if self._types_changed.is_set():
                self._types_changed.clear()
                self._refresh_served_types()
            now = time.monotonic()
            if now >= next_poll:
                more_maybe = True
            free = self._free_slots() + self._outcomes_pending()  # in this order: never more than free
            if self.max_jobs is not None:
                free = min(free, self.max_jobs - self.stats.claimed)
            claimable = self._claimable_types()
            if free > 0 and more_maybe and claimable:
                self._notified.clear()  # anything notified from here on may be missed by this claim
                try:
                    jobs = self.queue.claim(claimable, free, affine_types=self._affine_types(),
                                            window=self.settings.affinity_window,
                                            aging_seconds=self.settings.affinity_max_wait)
                except db.TRANSIENT_DB_ERRORS as err:
                    log.warning("claim failed (%s); retrying", err)
                    self._wake.wait(min(self.settings.fallback_poll_interval, 1.0))
                    continue
                self._dispatch(jobs)
                # a full claim that left nothing due: no claim when the slots free, only on a notify
                more_maybe = len(jobs) == free and getattr(jobs, "more_queued", True)
                if not more_maybe:
                    next_poll = time.monotonic() + self._idle_timeout()
                if more_maybe:
                    continue
            timeout = max(0.0, next_poll - time.monotonic()) if free > 0 and claimable else 1.0
            slow = self._slow_preparing()
            if self._preparing():
                timeout = min(timeout, SLOW_PREPARE_SECONDS)  # a job turning slow frees its slot
            self._wake.wait(timeout)
            self._wake.clear()
            if self._notified.is_set() or self._slow_preparing() > slow:
                more_maybe = True

    def _free_slots(self) -> int:
        """Job slots free now: a job slow to fetch its references holds none (up to prepare_slots). Only a
        slow one: counting every job while it validates would claim past the concurrency at each claim."""
        with self._running_lock:
            claimed = len(self._running)
        return self.settings.concurrency - claimed + min(self._slow_preparing(), self.settings.prepare_slots)

    def _preparing(self) -> bool:
        with self._running_lock:
            return any(r.preparing for r in self._running.values())

    def _slow_preparing(self) -> int:
        since = time.monotonic() - SLOW_PREPARE_SECONDS
        with self._running_lock:
            return sum(1 for r in self._running.values() if r.preparing and r.started < since)

    def _claimable_types(self) -> list[str]:
        """The served types no fault of this worker's own (storage, a model, the device) blocks."""
        return [name for name, t in self._served.items() if not self._faults.blocks(t, self._uses_storage(t))]

    def _uses_storage(self, job_type: JobType) -> bool:
        return getattr(self.handlers.get(job_type.handler), "uses_storage", True)

    def _affine_types(self) -> list[str]:
        """Job types whose model is resident here: the claim prefers them (fewer model swaps)."""
        if not self.settings.affinity:
            return []
        resident = set(self.memory.loaded_names())
        return [name for name, t in self._served.items() if t.model and t.handler in resident]

    def _max_jobs_reached(self) -> bool:
        return self.max_jobs is not None and self.stats.claimed >= self.max_jobs and not self._running

    def _idle_timeout(self) -> float:
        """Sleep until a poll is due: long while LISTEN works, short without it, and no later
        than the next scheduled retry becomes due."""
        interval = (
            self.settings.poll_interval if self._listening.is_set() else self.settings.fallback_poll_interval
        )
        try:
            due = self.queue.next_due(self._claimable_types())
        except db.TRANSIENT_DB_ERRORS:
            return min(interval, 1.0)
        if due is not None:
            interval = min(interval, max(0.05, (due - datetime.now(UTC)).total_seconds()))
        return interval

    def _refresh_served_types(self) -> None:
        types = self.queue.served_job_types(self.handlers.keys(), self.settings.queues)
        self._served = {t.name: t for t in types}

    # -- running one job ----------------------------------------------------------------

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
                     extra=job_log_fields(job, self.id))
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
                log.error("job %s: %s raised", job.id, job.job_type, exc_info=exc, extra=job_log_fields(job, self.id))
            return self._failure(job, error)

    def _log_outcome(self, job: Job, outcome: Outcome) -> None:
        with self._running_lock:
            entry = self._running.get(job.id)
        seconds = time.monotonic() - entry.started if entry else 0.0
        fields = {**job_log_fields(job, self.id), "outcome": outcome.status, "seconds": round(seconds, 3)}
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
                  job.id, fault.code, fault.message, fault.scope, entry.delay, extra=job_log_fields(job, self.id))
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

    # -- lease keeper -------------------------------------------------------------------

    def _keep_leases(self) -> None:
        beat_every = max(0.05, self.settings.lease_seconds / 3)
        rescue_every = max(0.1, min(15.0, self.settings.lease_seconds / 2))
        next_rescue = 0.0
        while not self._done.is_set():
            self._beat_requested.wait(beat_every)
            self._beat_requested.clear()
            if self._done.is_set():
                break
            self._watchdog.arm()  # re-armed each beat: only a keeper that stops beating lets it fire
            self._enforce_time_limits()
            self._probe_faults()
            with self._running_lock:
                running = list(self._running.values())
            try:
                for entry in running:
                    entry.ctx.flush()
                state = "draining" if self._stop.is_set() else ("busy" if running else "idle")
                beat = self.queue.heartbeat([r.job.id for r in running], state, self._memory_report(), self.faults)
                self._beat_landed(beat_every)
                for entry in running:
                    if entry.job.id in beat.cancel_requested:
                        entry.ctx.interrupt(JobCanceled)
                    elif entry.job.id not in beat.held:
                        entry.ctx.interrupt(JobLeaseLost)
                if time.monotonic() >= next_rescue and self._may_rescue():
                    next_rescue = time.monotonic() + rescue_every
                    rescued = self.queue.rescue_expired()
                    if rescued:
                        log.info("rescued %d jobs with expired leases: %s", len(rescued), rescued)
            except db.TRANSIENT_DB_ERRORS as err:
                self._connected_since = None
                log.warning("heartbeat failed: %s", err)
            except Exception:
                log.exception("lease keeper error")

    def _beat_landed(self, beat_every: float) -> None:
        """Track the database as the lease keeper sees it. Missed beats are an outage whether the beats
        failed or only waited for a connection until the database came back."""
        now = time.monotonic()
        gap = now - self.last_beat_at if self.last_beat_at is not None else 0.0
        if self._connected_since is None or gap > 2 * beat_every + 1.0:
            if self.last_beat_at is not None:
                self._last_outage = gap
                log.info("database reachable again after %.1fs without a heartbeat; no rescues for %.1fs",
                         gap, self._rescue_grace())
            self._connected_since = now
        self.last_beat_at = now

    def _may_rescue(self) -> bool:
        """Rescue only after `rescue_grace_seconds` (default two leases) of working connections, and at
        least as long as the last outage lasted plus a lease: when the database comes back, every live
        worker gets that long to reconnect (a pool's reconnect attempts back off exponentially, so the
        last one may come about an outage's length late) and renew what it holds before anyone rescues
        it. Jobs of workers that really died wait that much longer."""
        since = self._connected_since
        return since is not None and time.monotonic() - since >= self._rescue_grace()

    def _rescue_grace(self) -> float:
        lease = self.settings.lease_seconds
        return max(self.settings.rescue_grace_seconds or 2 * lease, self._last_outage + lease)

    def _enforce_time_limits(self) -> None:
        """Stop jobs past their type's run-time limit; a job that does not stop within the grace is given
        back (TIMEOUT_ERROR) and this worker stops itself, so its supervisor restarts it and the GPU is freed."""
        now = time.monotonic()
        with self._running_lock:
            running = list(self._running.values())
        for entry in running:
            limit = self._time_limit(entry.job)
            if entry.overdue(now, limit):
                entry.timed_out_at = now
                log.warning("job %s: past its %ss limit; stopping it", entry.job.id, limit,
                            extra=job_log_fields(entry.job, self.id))
                entry.ctx.interrupt(JobTimedOut)
            elif entry.timed_out_at is not None and now - entry.timed_out_at > self.settings.timeout_grace:
                self._abandon(entry)

    def _abandon(self, entry: Running) -> None:
        job = entry.job
        with self._running_lock:
            if self._running.get(job.id) is not entry:
                return
        self.exit_reason = (f"job {job.id} ({job.job_type}) did not stop within {self.settings.timeout_grace:.0f}s "
                            f"of its time limit; exiting so this worker is restarted")
        log.error("%s", self.exit_reason, extra=job_log_fields(job, self.id))
        entry.ctx.interrupt(JobLeaseLost)  # whatever it returns later is not written
        outcome = self._failure(job, JobError(ErrorCode.TIMEOUT_ERROR, f"{job.job_type} job did not stop at its "
                                              f"run-time limit; its worker was restarted"))
        self._finished.append(outcome)
        self.stop(abort=True)

    def _probe_faults(self) -> None:
        """Scopes whose backoff ran out: storage is probed first; a model or device is retried by the next job."""
        for scope in self._faults.due():
            check = getattr(self.storage, "check", None) if scope == "storage" else None
            if callable(check):
                try:
                    check()
                except WorkerFault as fault:
                    self._faults.record(fault)
                    continue
                except Exception as err:
                    self._faults.record(WorkerFault(ErrorCode.STORAGE_ERROR, f"storage check failed: {err}",
                                                    scope=scope))
                    continue
            self._faults.clear(scope)
            log.info("retrying %s work after an earlier fault of this worker's own", scope)
            self._notify_claimable()

    def beat_now(self, timeout: float = 2.0) -> None:
        """Heartbeat at once (the workers row shows the current state) and wait for it."""
        before = self.last_beat_at
        self._beat_requested.set()
        deadline = time.monotonic() + timeout
        while self.last_beat_at == before and time.monotonic() < deadline:
            time.sleep(0.01)

    def _memory_report(self) -> WorkerMemory | None:
        try:
            return self.memory.report()
        except Exception as err:  # a memory probe must never cost the leases their heartbeat
            log.warning("memory report failed: %s", err)
            return None

    # -- listener -----------------------------------------------------------------------

    def _listen(self) -> None:
        url = self.settings.listen_database_url or self.url
        delay = 0.5
        while not self._done.is_set():
            try:
                with db.connect(url, self.settings, reply_timeout=self.settings.db_reply_timeout) as conn:
                    for channel in (CHANNEL_JOBS, CHANNEL_CANCEL, CHANNEL_TYPES):
                        conn.execute(f"LISTEN {channel}")
                    self._listening.set()
                    self._notify_claimable()  # notifies may have been missed while not listening
                    delay = 0.5
                    quiet_since = time.monotonic()
                    while not self._done.is_set():
                        for note in conn.notifies(timeout=0.5):
                            quiet_since = time.monotonic()
                            self._on_notify(note)
                        if time.monotonic() - quiet_since > self.settings.db_keepalives_idle:
                            # a silent proxy or pooler keeps a dead LISTEN "listening": ask, and reconnect if
                            # no answer comes within the reply timeout
                            conn.execute("SELECT 1")
                            quiet_since = time.monotonic()
            except psycopg.Error as err:
                if self._listening.is_set():
                    log.warning("LISTEN connection lost (%s); polling every %.1fs until it is back",
                                err, self.settings.fallback_poll_interval)
                self._listening.clear()
                self._notify_claimable()
                self._done.wait(delay)
                delay = min(delay * 2, 10.0)

    def _notify_claimable(self) -> None:
        self._notified.set()
        self._wake.set()

    def _on_notify(self, note: psycopg.Notify) -> None:
        if note.channel == CHANNEL_JOBS:
            if not self.settings.queues or note.payload in self.settings.queues:
                self._notify_claimable()
        elif note.channel == CHANNEL_CANCEL:
            with self._running_lock:
                entry = next((r for r in self._running.values() if str(r.job.id) == note.payload), None)
            if entry:
                entry.ctx.interrupt(JobCanceled)
        elif note.channel == CHANNEL_TYPES:
            self._types_changed.set()
            self._notify_claimable()

    # -- shutdown -----------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        log.info("signal %s: %s", signal.Signals(signum).name,
                 "releasing running jobs" if self._stop.is_set() else "draining")
        self.stop()

    def _shutdown(self) -> None:
        self._stop_finisher()  # outcomes are written here from now on, by this thread alone
        if self._running:
            self._set_state("draining")
            deadline = time.monotonic() + self.settings.shutdown_grace
            while self._running and not self._abort.is_set() and time.monotonic() < deadline:
                self._wake.wait(min(0.2, max(0.0, deadline - time.monotonic())))
                self._wake.clear()
                self._flush_finished()
            self._flush_finished()
        with self._running_lock:
            leftover = list(self._running.values())
        if leftover:
            for entry in leftover:
                entry.ctx.interrupt(WorkerStopping)
            released = self.queue.release([r.job.id for r in leftover])
            self.stats.released += len(released)
            log.info("released %d running jobs back to the queue", len(released))
            with self._running_lock:
                self._running.clear()

    def _set_state(self, state: str) -> None:
        try:
            self.queue.set_worker_state(state)
        except db.TRANSIENT_DB_ERRORS as err:
            log.warning("could not record worker state %s: %s", state, err)

    # -- finisher -----------------------------------------------------------------------

    def _start_finisher(self) -> None:
        """Outcomes commit durably (a WAL flush, milliseconds on a slow disk): on a thread of their own,
        so the main loop claims the next job while the last one's outcome is still being written."""
        self._flushing = 0
        self._finish_wake = threading.Event()
        self._finisher_stop = threading.Event()
        self._finisher = threading.Thread(target=self._run_finisher, name="finisher", daemon=True)
        self._finisher.start()

    def _run_finisher(self) -> None:
        while not self._finisher_stop.is_set():
            self._finish_wake.wait(0.2)  # the timeout: an outcome whose hand-off was missed waits no longer
            self._finish_wake.clear()
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
            self._finish_wake.set()
            finisher.join()  # at most one flush: its statement's own retries are bounded

    def _outcomes_pending(self) -> int:
        """Jobs whose outcome is not written yet: their handler is done, so their slot is free."""
        return len(self._finished) + self._flushing


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(_has_nul(v) for v in value)
    return False
