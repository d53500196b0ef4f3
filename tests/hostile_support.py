"""Handlers for the hostile-input tests, plugged in with `--handler NAME=module:attr` like users' own."""

from __future__ import annotations

import ctypes
import time
from typing import Any

from worker.handlers.base import JobContext
from worker.jobs import Job


class SlowPrepareHandler:
    """`prepare` sleeps `fetch_seconds` (a slow reference URL); `run` is instant. Records who ran when."""

    concurrent = False
    prepare_fetches = True

    def __init__(self) -> None:
        self.loads = 0
        self.finished: list[str] = []

    def load(self) -> None:
        self.loads += 1

    def prepare(self, job: Job, ctx: JobContext) -> None:
        time.sleep(float(job.payload.get("fetch_seconds", 0)))

    def run(self, job: Job, ctx: JobContext) -> dict[str, Any]:
        self.finished.append(str(job.payload.get("name")))
        return {"name": job.payload.get("name")}


class CountingLoads:
    """Counts load() calls: a job refused by validation must never reach one."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.loads = 0
        self.uses_storage = getattr(inner, "uses_storage", True)

    def load(self) -> None:
        self.loads += 1

    def prepare(self, job: Job, ctx: JobContext) -> None:
        self.inner.prepare(job, ctx)

    def run(self, job: Job, ctx: JobContext) -> dict[str, Any]:
        return {"validated": True}


class StubbornHandler:
    """Ignores every interrupt: sleeps in small steps without ever checking the context."""

    concurrent = True

    def load(self) -> None:
        pass

    def run(self, job: Job, ctx: JobContext) -> dict[str, Any]:
        ctx.progress(0.1, "ignoring you")
        if job.payload.get("stubborn"):
            deadline = time.monotonic() + 3600
            while time.monotonic() < deadline:
                time.sleep(0.05)
        steps = int(job.payload.get("steps", 0))
        for step in range(steps):
            ctx.progress(step / max(steps, 1), f"step {step}")
            time.sleep(float(job.payload.get("step_seconds", 0.05)))
        return {"attempt": job.attempts}


class GilHoggingHandler:
    """Calls libc sleep() through ctypes.PyDLL, which keeps the GIL: every Python thread of the
    process stops, as behind a hung CUDA call in C code that never releases it."""

    def load(self) -> None:
        pass

    def run(self, job: Job, ctx: JobContext) -> dict[str, Any]:
        ctx.progress(0.1, "holding the GIL")
        ctypes.PyDLL(None).sleep(int(job.payload.get("seconds", 3600)))
        return {}
