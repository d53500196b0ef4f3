"""Simulated work with progress: no model, for demos, smoke tests and the loop's own tests."""

from __future__ import annotations

import json
import time
from typing import Any

from worker.handlers.base import JobContext
from worker.jobs import Job, JobError, SimulatePayload


class SimulateHandler:
    concurrent = True  # no shared state: several jobs may run at once

    def load(self) -> None:
        pass

    def prepare(self, job: Job, ctx: JobContext) -> None:
        """Validate the payload against the type's defaults and limits, before any work."""
        ctx.prepared = job.parse(SimulatePayload)

    def run(self, job: Job, ctx: JobContext) -> dict[str, Any]:
        # 1. The validated payload (the worker called prepare; a direct caller may not have).
        payload: SimulatePayload = ctx.prepared or job.parse(SimulatePayload)
        config = payload.config

        # 2. Fail the first `fail_attempts` attempts when asked to (shows retries).
        if config.fail_code and job.attempts <= config.fail_attempts:
            raise JobError(config.fail_code, f"simulated {config.fail_code} on attempt {job.attempts}")

        # 3. Work in steps, reporting progress; cancellation takes effect at each step.
        started = time.monotonic()
        for step in range(config.steps):
            ctx.progress(step / config.steps, f"step {step + 1}/{config.steps}")
            time.sleep(config.step_seconds)
        ctx.progress(1.0, "publishing")

        # 4. Publish a small report as the job's asset.
        report = {"job_id": str(job.id), "prompt": payload.prompt, "steps": config.steps}
        asset = ctx.publish(json.dumps(report).encode(), ext="json", content_type="application/json")
        return {
            "assets": [asset],
            "steps": config.steps,
            "echo": payload.prompt,
            "generation_time": round(time.monotonic() - started, 3),
        }
