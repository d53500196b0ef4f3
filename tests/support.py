"""Handlers for the tests, plugged in through the same `--handler NAME=module:attr` path as users'."""

from __future__ import annotations

import os
import time
from typing import Any

from worker.handlers.base import JobContext
from worker.jobs import ErrorCode, Job, JobError

RECORD_ENV = "OURVIDZ_TEST_RECORD"


def record(job: Job) -> None:
    """Append 'job_id attempt pid' to the file named by $OURVIDZ_TEST_RECORD (O_APPEND is atomic)."""
    path = os.environ.get(RECORD_ENV)
    if path:
        with open(path, "a") as f:
            f.write(f"{job.id} {job.attempts} {os.getpid()}\n")


class NoopHandler:
    concurrent = True

    def load(self) -> None:
        pass

    def run(self, job: Job, ctx: JobContext) -> dict[str, Any]:
        return {"ok": True}


class ProbeHandler:
    """Behaviour chosen by the payload: steps with sleeps, a hang on some attempt, or an error."""

    concurrent = True

    def __init__(self) -> None:
        self.loads = 0

    def load(self) -> None:
        self.loads += 1

    def run(self, job: Job, ctx: JobContext) -> dict[str, Any]:
        p = job.payload
        record(job)
        if p.get("hang_on_attempt") == job.attempts:
            ctx.progress(0.1, "hanging")
            time.sleep(3600)
        if p.get("raise") == "retryable" and job.attempts <= p.get("fail_attempts", 99):
            raise JobError(ErrorCode.NETWORK_ERROR, f"flaky on attempt {job.attempts}")
        if p.get("raise") == "fatal":
            raise JobError(ErrorCode.INVALID_INPUT, "the prompt is not acceptable")
        if p.get("raise") == "exception":
            raise RuntimeError("boom")
        if p.get("raise") == "swallow":
            try:
                ctx.progress(0.5, "trying to swallow")
                time.sleep(p.get("sleep", 5))
                ctx.progress(0.6, "still here")
            except Exception:
                pass
        if p.get("return") == "not-a-dict":
            return "text"  # type: ignore[return-value]
        steps = int(p.get("steps", 0))
        for step in range(steps):
            ctx.progress(step / steps, f"step {step}")
            time.sleep(float(p.get("step_seconds", 0.01)))
        if p.get("sleep"):
            deadline = time.monotonic() + float(p["sleep"])
            while time.monotonic() < deadline:
                ctx.check()
                time.sleep(0.01)
        return {"attempt": job.attempts, "echo": p.get("prompt")}


class BatchProbeHandler:
    """Batches up to 4 jobs; job payload {"fail": true} fails that job alone."""

    max_batch_size = 4

    def __init__(self) -> None:
        self.batches: list[int] = []

    def load(self) -> None:
        pass

    def run(self, job: Job, ctx: JobContext) -> dict[str, Any]:
        return self.run_batch([job], [ctx])[0]

    def run_batch(self, jobs: list[Job], ctxs: list[JobContext]) -> list[Any]:
        self.batches.append(len(jobs))
        for ctx in ctxs:
            ctx.progress(0.5, f"batch of {len(jobs)}")
        time.sleep(0.2)
        return [JobError(ErrorCode.INVALID_INPUT, "bad row") if job.payload.get("fail")
                else {"batch": len(jobs), "n": job.payload.get("n")} for job in jobs]


class NulResultHandler:
    """Returns what Postgres refuses when asked to: a NUL character (byte-level tokenizers can
    produce one), or NaN (valid for json.dumps, invalid JSON for Postgres)."""

    def load(self) -> None:
        pass

    def run(self, job: Job, ctx: JobContext) -> dict[str, Any]:
        if job.payload.get("nan"):
            return {"score": float("nan")}
        return {"text": "bad\x00text" if job.payload.get("nul") else "fine"}


class EnvProbeHandler:
    """Reports the process that ran the job and the GPU pinning it was started with (`run --gpus`).
    Payload: {"sleep": s} takes s seconds; {"hang_attempt": n} hangs attempt n until stopped."""

    concurrent = True

    def load(self) -> None:
        pass

    def run(self, job: Job, ctx: JobContext) -> dict[str, Any]:
        if job.payload.get("hang_attempt") == job.attempts:
            ctx.progress(0.1, "hanging")
            while True:
                ctx.check()
                time.sleep(0.02)
        time.sleep(float(job.payload.get("sleep", 0)))
        return {"pid": os.getpid(), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "attempt": job.attempts}
