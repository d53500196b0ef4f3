"""Helpers of the SDXL and WAN handler tests: the tiny models, jobs shaped as the worker claims
them (with the real `job_types` rows of the migrations), and a JobContext whose progress writer
records every write and can answer "cancel requested" the way the row would."""

from __future__ import annotations

import io
import os
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from worker import db
from worker.handlers.base import JobContext
from worker.jobs import ErrorCode, Job, JobError, JobType
from worker.storage import LocalStorage
from worker.tiny_diffusion import build_tiny_models

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download in a test

USER = uuid.UUID("11111111-1111-4111-8111-111111111111")


def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Built once per test run into one folder both test modules share (the builder is idempotent)."""
    return build_tiny_models(tmp_path_factory.getbasetemp() / "tiny-diffusion")


def read_job_types(url: str) -> dict[str, JobType]:
    with db.connect(url) as conn:
        rows = conn.execute("SELECT * FROM public.job_types").fetchall()
    return {row["name"]: JobType(**{k: row[k] for k in JobType.model_fields if k in row}) for row in rows}


class Recorder:
    """Progress writer of a JobContext: records (percent, stage, partial); `cancel_at(write)`
    returning True plays a user's cancel request read back by that write."""

    def __init__(self, cancel_at: Callable[[tuple[int, str | None, dict[str, Any] | None]], bool] | None = None):
        self.writes: list[tuple[int, str | None, dict[str, Any] | None]] = []
        self.cancel_at = cancel_at

    def __call__(self, progress: int, stage: str | None, partial: dict[str, Any] | None) -> bool:
        write = (progress, stage, partial)
        self.writes.append(write)
        return bool(self.cancel_at and self.cancel_at(write))

    def count(self, stage: str) -> int:
        return sum(1 for _, s, _ in self.writes if s == stage)

    def stages(self) -> list[str]:
        """Stages in the order they first appeared."""
        seen: list[str] = []
        for _, stage, _ in self.writes:
            if stage and stage not in seen:
                seen.append(stage)
        return seen

    def percents(self) -> list[int]:
        return [p for p, _, _ in self.writes]


def make_job(types: dict[str, JobType], job_type: str, payload: dict[str, Any], *, user_id: uuid.UUID | None = None,
             attempts: int = 1, errors: list[dict[str, Any]] | None = None) -> Job:
    now = datetime.now(UTC)
    info = types[job_type]
    return Job(id=uuid.uuid4(), user_id=user_id, job_type=job_type, queue=info.queue, payload=payload, priority=0,
               attempts=attempts, max_attempts=3, created_at=now, started_at=now, run_at=now, errors=errors or [],
               type_info=info)


def context(job: Job, storage: LocalStorage, recorder: Recorder | None = None) -> JobContext:
    return JobContext(job, storage, recorder or Recorder(), 0.0)


def expect_error(code: ErrorCode, match: str, fn: Callable[[], Any]) -> JobError:
    with pytest.raises(JobError) as caught:
        fn()
    assert caught.value.code == code, caught.value.message
    assert match in caught.value.message, caught.value.message
    return caught.value


def put_reference(storage: LocalStorage, name: str, image: Image.Image, user: uuid.UUID = USER) -> str:
    """Store a PNG in the user's reference folder; returns the path a payload names it by."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    storage.upload("reference_images", f"{user}/{name}", buffer.getvalue(), "image/png")
    return f"{user}/{name}"


def stripes(width: int, height: int, color: tuple[int, int, int]) -> Image.Image:
    image = Image.new("RGB", (width, height), color)
    for x in range(0, width, 8):
        for y in range(height):
            image.putpixel((x, y), (255 - color[0], 255 - color[1], 255 - color[2]))
    return image


class Spy:
    """Records the calls of an object's method (or a class's __call__), {"args": ..., **kwargs}, and
    lets them through."""

    def __init__(self, target: Any, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[dict[str, Any]] = []
        original = getattr(target, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            self.calls.append({"args": args, **kwargs})
            return original(*args, **kwargs)

        monkeypatch.setattr(target, name, wrapper)
