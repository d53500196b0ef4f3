"""The lease keeper: every lease/3 seconds it renews the leases of the running jobs, beats the
worker's row, reads cancel requests, stops jobs past their time limit, probes the worker's own
faults and rescues jobs whose worker is gone (never right after a database outage).

A mixin of worker.loop.Worker: the state it reads is the Worker's (see the annotations below).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any
from uuid import UUID

from worker import db
from worker.config import Settings
from worker.handlers.base import JobCanceled, JobLeaseLost
from worker.jobs import ErrorCode, Job, JobError, WorkerFault
from worker.logs import job_extra
from worker.memory import MemoryManager
from worker.queue import JobQueue, Outcome, WorkerMemory
from worker.running import Faults, HangWatchdog, JobTimedOut, Running
from worker.storage import Storage

log = logging.getLogger("worker.loop")  # one logger for the job's story, whichever module tells it


class LeaseKeeping:
    id: str
    settings: Settings
    storage: Storage
    queue: JobQueue
    memory: MemoryManager
    last_beat_at: float | None
    exit_reason: str | None
    _running: dict[UUID, Running]
    _running_lock: threading.Lock
    _faults: Faults
    _watchdog: HangWatchdog
    _finished: Any
    _done: threading.Event
    _stop: threading.Event
    _beat_requested: threading.Event
    _connected_since: float | None
    _last_outage: float

    # provided by the Worker and JobExecution
    faults: Any
    def _time_limit(self, job: Job) -> float | None: ...
    def _failure(self, job: Job, error: JobError) -> Outcome: ...
    def _notify_claimable(self) -> None: ...
    def stop(self, abort: bool = False) -> None: ...

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
                            extra=job_extra(entry.job, self.id))
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
        log.error("%s", self.exit_reason, extra=job_extra(job, self.id))
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
