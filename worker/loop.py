"""The worker loop: wake, claim, dispatch, keep leases, finish, shut down.

Threads: the main loop claims (one statement per claim); a finisher (worker.finisher) writes outcomes
(batched, one durable statement), so a claim never waits on another job's commit; each job runs on a reused
runner thread (worker.execution), a job whose handler downloads references first on a preparer
thread; the lease keeper (worker.keeper) beats every lease/3 seconds; a listener claims a notified
job itself, on its own connection, when the main loop is idle, or turns the NOTIFY into a wake-up;
the loop falls back to polling when LISTEN is unavailable. No transaction is open while a handler runs.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from types import FrameType
from uuid import UUID

import psycopg

from worker import db
from worker.config import Settings
from worker.execution import JobExecution
from worker.finisher import OutcomeWriting
from worker.handlers.base import (
    Handler,
    JobCanceled,
    WorkerStopping,
)
from worker.jobs import JobType
from worker.keeper import LeaseKeeping
from worker.memory import MemoryManager
from worker.queue import JobQueue, WorkerIdInUse
from worker.running import Faults, HangWatchdog, JobRunners, Outcomes, Running, WorkerStats
from worker.storage import Storage

log = logging.getLogger(__name__)

VERSION = "0.1.0"
CHANNEL_JOBS = "ourvidz_jobs"
CHANNEL_CANCEL = "ourvidz_cancel"
CHANNEL_TYPES = "ourvidz_types"
SLOW_PREPARE_SECONDS = 0.25  # a job still validating or fetching references after this holds no job slot


class Worker(JobExecution, LeaseKeeping, OutcomeWriting):
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
        # Claims are made by the main loop and, on a notify, by the listener: one at a time, so free
        # slots are counted once. The listener claims only while _claiming (the loop is running).
        self._claim_lock = threading.Lock()
        self._claiming = threading.Event()
        self._next_poll = 0.0  # monotonic: when the loop claims again unless a notify comes first
        self._full_claim_at: float | None = None  # a claim took every slot, due times not looked up since
        self._finished = Outcomes()  # written by the finisher thread: a claim never waits on that commit
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
        self._start_finisher()
        self._claiming.set()
        while True:
            self.last_loop_at = time.monotonic()
            if self._stop.is_set() or self._max_jobs_reached():
                break
            if self._types_changed.is_set():
                self._types_changed.clear()
                self._refresh_served_types()
            if self._full_claim_at is not None and self._free() > 0:  # jobs may have come due since that claim
                with self._claim_lock:  # _next_poll is the listener's to write too
                    since = time.monotonic() - self._full_claim_at + 1.0
                    self._full_claim_at = None
                    self._next_poll = time.monotonic() + self._idle_timeout(since_seconds=since)
            now = time.monotonic()
            if now >= self._next_poll:
                more_maybe = True
            if more_maybe:
                try:
                    with self._claim_lock:
                        more = self._claim_free_slots()
                except db.TRANSIENT_DB_ERRORS as err:
                    log.warning("claim failed (%s); retrying", err)
                    self._wake.wait(min(self.settings.fallback_poll_interval, 1.0))
                    continue
                if more:
                    continue
                if more is not None:  # nothing more due: no claim when the slots free, only on a notify or poll
                    more_maybe = False
            timeout = (max(0.0, self._next_poll - time.monotonic()) if self._free() > 0 and self._claimable_types()
                       else 1.0)
            slow = self._slow_preparing()
            if self._preparing():
                timeout = min(timeout, SLOW_PREPARE_SECONDS)  # a job turning slow frees its slot
            self._wake.wait(timeout)
            self._wake.clear()
            if self._notified.is_set() or self._slow_preparing() > slow:
                more_maybe = True

    def _claim_free_slots(self, conn: db.Connection | None = None) -> bool | None:
        """Claim for the free slots and start what came (the caller holds _claim_lock); None when no
        claim was made (no free slot, nothing this worker may claim), else whether more may be due:
        a full claim whose heads held more jobs. When not, the next poll is set for when the next
        scheduled job comes due: now, or by the loop once a slot frees if this claim took them all."""
        free = self._free()
        claimable = self._claimable_types()
        if free <= 0 or not claimable:
            return None
        self._notified.clear()  # anything notified from here on may be missed by this claim
        jobs = self.queue.claim(claimable, free, affine_types=self._affine_types(),
                                window=self.settings.affinity_window,
                                aging_seconds=self.settings.affinity_max_wait, conn=conn)
        self._dispatch(jobs)
        more = len(jobs) == free and getattr(jobs, "more_queued", True)
        if not more and len(jobs) < free:
            self._next_poll = time.monotonic() + self._idle_timeout(conn)
        elif not more:  # every slot taken: nothing can start before one frees, so look up due times
            self._full_claim_at = time.monotonic()  # then, not now, while the new jobs want the CPU
        return more

    def _free(self) -> int:
        """Jobs one claim may take now."""
        free = self._free_slots() + self._outcomes_pending()  # in this order: never more than free
        if self.max_jobs is not None:
            free = min(free, self.max_jobs - self.stats.claimed)
        return free

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

    def _idle_timeout(self, conn: db.Connection | None = None, since_seconds: float = 1.0) -> float:
        """Sleep until a poll is due: long while LISTEN works, short without it, and no later
        than the next scheduled retry becomes due."""
        interval = (
            self.settings.poll_interval if self._listening.is_set() else self.settings.fallback_poll_interval
        )
        try:
            due = self.queue.next_due(self._claimable_types(), since_seconds, conn=conn)
        except db.TRANSIENT_DB_ERRORS:
            return min(interval, 1.0)
        if due is not None:
            interval = min(interval, max(0.05, (due - datetime.now(UTC)).total_seconds()))
        return interval

    def _refresh_served_types(self) -> None:
        types = self.queue.served_job_types(self.handlers.keys(), self.settings.queues)
        self._served = {t.name: t for t in types}

    # -- listener -----------------------------------------------------------------------

    def _listen(self) -> None:
        url = self.settings.listen_database_url or self.url
        delay = 0.5
        while not self._done.is_set():
            try:
                with db.connect(url, self.settings, reply_timeout=self.settings.db_reply_timeout,
                                **({} if self.settings.prepare_statements else {"prepare_threshold": None})) as conn:
                    db.configure_session(conn, self.settings, async_commit=self.settings.async_commit,
                                         session_settings=self.settings.prepare_statements)
                    for channel in (CHANNEL_JOBS, CHANNEL_CANCEL, CHANNEL_TYPES):
                        conn.execute(f"LISTEN {channel}")
                    self._listening.set()
                    self._notify_claimable()  # notifies may have been missed while not listening
                    delay = 0.5
                    quiet_since = time.monotonic()
                    while not self._done.is_set():
                        # out of the generator before claiming: it holds the connection meanwhile
                        notes = list(conn.notifies(timeout=0.5, stop_after=1))
                        if notes:
                            quiet_since = time.monotonic()
                        if any([self._on_notify(note) for note in notes]):
                            self._claim_on_notify(conn)
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

    def _on_notify(self, note: psycopg.Notify) -> bool:
        """Act on one notify; True when it says a job this worker serves may be claimable."""
        if note.channel == CHANNEL_JOBS:
            return not self.settings.queues or note.payload in self.settings.queues
        if note.channel == CHANNEL_CANCEL:
            with self._running_lock:
                entry = next((r for r in self._running.values() if str(r.job.id) == note.payload), None)
            if entry:
                entry.ctx.interrupt(JobCanceled)
        elif note.channel == CHANNEL_TYPES:
            self._types_changed.set()
            self._notify_claimable()
        return False

    def _claim_on_notify(self, conn: db.Connection) -> None:
        """Claim a notified job here, on the listener's own connection, when the main loop is not
        claiming: no hand-off to the main thread and no idle pool connection to wake, each a few
        hundred microseconds of pickup on an idle machine. Otherwise (no free slot, the loop busy
        claiming, starting or stopping, or more due than was taken) the main loop is told to claim."""
        if not self._claiming.is_set() or not self._claim_lock.acquire(blocking=False):
            self._notify_claimable()
            return
        poll_at = self._next_poll
        try:
            more = None if self._stop.is_set() else self._claim_free_slots(conn)
        except psycopg.Error:
            raise  # the listener reconnects, and tells the main loop to claim
        except Exception:  # a bug, not the database: stop, as the main loop would
            log.exception("claiming on a notify failed; stopping")
            self.stop()
            return
        finally:
            self._claim_lock.release()
        if more is None or more:
            self._notify_claimable()
        elif self._next_poll < poll_at or self._preparing():
            self._wake.set()  # the loop's wait ends sooner: a job comes due, or one fetches its references

    # -- shutdown -----------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        log.info("signal %s: %s", signal.Signals(signum).name,
                 "releasing running jobs" if self._stop.is_set() else "draining")
        self.stop()

    def _shutdown(self) -> None:
        with self._claim_lock:  # a claim the listener is making ends first, its jobs counted below
            self._claiming.clear()
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
