"""What the worker loop keeps about the jobs it runs: the running set, the job threads, the
counters, the faults of its own that stop it claiming, and the hang watchdog.

Nothing here touches the database or a model; worker.loop drives it.
"""

from __future__ import annotations

import faulthandler
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from queue import SimpleQueue
from typing import TYPE_CHECKING

from worker.handlers.base import JobContext, JobInterrupted
from worker.jobs import Job, JobType, WorkerFault

if TYPE_CHECKING:
    from worker.queue import Outcome


class Outcomes(deque["Outcome"]):
    """Outcomes waiting for the finisher thread, oldest first; adding one wakes it (`added`)."""

    def __init__(self) -> None:
        super().__init__()
        self.added = threading.Event()

    def append(self, outcome: Outcome) -> None:
        super().append(outcome)
        self.added.set()

    def extendleft(self, outcomes: Iterable[Outcome]) -> None:
        super().extendleft(outcomes)
        self.added.set()


class JobTimedOut(JobInterrupted):
    """The job ran past its type's run-time limit; it fails (or retries) with TIMEOUT_ERROR."""


@dataclass
class Running:
    job: Job
    ctx: JobContext
    started: float = field(default_factory=time.monotonic)
    run_started: float | None = None  # when the handler got its model and began: the time limit counts from here
    timed_out_at: float | None = None  # when the time limit interrupted it
    preparing: bool = False  # validating its payload and fetching its references, holding no model

    def overdue(self, now: float, limit: float | None) -> bool:
        return (limit is not None and self.run_started is not None and self.timed_out_at is None
                and now - self.run_started > limit)


class JobRunners:
    """Daemon threads that run claimed jobs, started once and reused: starting a thread per job
    costs more than a short job itself. Daemon, so a hung handler never blocks the exit."""

    def __init__(self, size: int, name: str = "job-runner") -> None:
        self._tasks: SimpleQueue[Callable[[], None]] = SimpleQueue()
        for index in range(size):
            threading.Thread(target=self._work, name=f"{name}-{index}", daemon=True).start()

    def submit(self, task: Callable[[], None]) -> None:
        self._tasks.put(task)

    def _work(self) -> None:
        while True:
            self._tasks.get()()


@dataclass
class WorkerStats:
    claimed: int = 0
    completed: int = 0
    failed: int = 0
    retried: int = 0
    canceled: int = 0
    lost: int = 0
    released: int = 0
    returned: int = 0  # given back without spending an attempt: the worker's own fault


@dataclass
class Fault:
    reason: str
    code: str
    retry_at: float  # monotonic: when claiming what it covers is tried again
    delay: float


class Faults:
    """The worker's own faults by scope ("storage", "handler:<name>", "device", "disk"), with backoff.

    A scope stays closed until its retry time; then the worker claims for it again (a probe may be
    run first) and a second failure closes it for twice as long, up to `max_delay`.
    """

    def __init__(self, base_delay: float = 5.0, max_delay: float = 300.0) -> None:
        self._lock = threading.Lock()
        self._faults: dict[str, Fault] = {}
        self.base_delay = base_delay
        self.max_delay = max_delay

    def record(self, fault: WorkerFault) -> Fault:
        with self._lock:
            earlier = self._faults.get(fault.scope)
            delay = min(self.max_delay, earlier.delay * 2) if earlier else self.base_delay
            entry = Fault(fault.message, fault.code, time.monotonic() + delay, delay)
            self._faults[fault.scope] = entry
            return entry

    def seed(self, reasons: dict[str, str], code: str = "WORKER_FAULT") -> None:
        """Faults found before the first claim (the preflight)."""
        for scope, reason in reasons.items():
            self.record(WorkerFault(code, reason, scope=scope))

    def clear(self, scope: str) -> bool:
        with self._lock:
            return self._faults.pop(scope, None) is not None

    def due(self) -> list[str]:
        """Scopes whose retry time has come: the caller probes them, then clears or records again."""
        now = time.monotonic()
        with self._lock:
            return [scope for scope, f in self._faults.items() if f.retry_at <= now]

    def reasons(self) -> dict[str, str]:
        with self._lock:
            return {scope: f.reason for scope, f in self._faults.items()}

    def blocks(self, job_type: JobType, uses_storage: bool) -> bool:
        """Whether an open fault (retry time not yet come) stops this worker claiming `job_type`."""
        now = time.monotonic()
        with self._lock:
            closed = {scope for scope, f in self._faults.items() if f.retry_at > now}
        if closed & {"device", "disk"}:
            return True
        return f"handler:{job_type.handler}" in closed or (uses_storage and "storage" in closed)




class HangWatchdog:
    """Exits the process when the lease keeper stops beating: C code holding the GIL (a hung CUDA
    call) stops every Python thread, so only faulthandler's own C thread can still act. The leases
    of the jobs it ran then expire and another worker runs them; the supervisor restarts this one."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def arm(self) -> None:
        if self.seconds > 0:
            faulthandler.dump_traceback_later(self.seconds, exit=True, file=sys.stderr)

    def disarm(self) -> None:
        if self.seconds > 0:
            faulthandler.cancel_dump_traceback_later()
