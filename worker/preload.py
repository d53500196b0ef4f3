"""Cold start: `ourvidz-worker run --preload` loads and warms every served model before the first claim.

Without it, the first job of each model pays for the load (tens of seconds for a 7B chat model) and
for the first call's kernel selection and allocator growth. With it, each handler serving one of the
worker's job types is loaded through the memory manager (so the budget still applies) and warmed:
its own `warm_up()` when it has one, else one tiny job of its first served type (2 steps, 1 image,
2 tokens) run through `run()` with a context that writes nothing and publishes nowhere.

A handler that cannot load or warm up becomes the worker's own fault ("handler:<name>"): its types
are not claimed until the fault's backoff lets a later job try again, and the worker still serves
the rest. Nothing here raises for a handler's failure.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

from worker.handlers.base import Handler, JobContext
from worker.jobs import ErrorCode, Job, JobError, JobType
from worker.memory import MemoryManager
from worker.storage import StoredObject

log = logging.getLogger(__name__)

T = TypeVar("T")

# The warm-up job's payload per built-in handler: the type's own size and model, the fewest steps.
WARM_UP_PAYLOADS: dict[str, dict[str, Any]] = {
    "sdxl": {"prompt": "warm-up", "config": {"steps": 2, "num_images": 1}},
    "wan": {"prompt": "warm-up", "config": {"steps": 2, "enhance_prompt": False}},
    "chat": {"message": "Hi", "max_tokens": 2, "temperature": 0},
}
DEFAULT_WARM_UP_PAYLOAD: dict[str, Any] = {"prompt": "warm-up"}


class DiscardStorage:
    """Where a warm-up job publishes: nothing is stored, nothing is readable."""

    def upload(self, bucket: str, path: str, data: bytes, content_type: str) -> StoredObject:
        return StoredObject(bucket, path, f"warm-up://{bucket}/{path}", content_type, len(data))

    def remove(self, bucket: str, paths: list[str]) -> None:
        pass

    def download(self, bucket: str, path: str, max_bytes: int | None = None) -> bytes:
        from worker.storage import ObjectNotFound

        raise ObjectNotFound(f"{bucket}/{path}: a warm-up job reads nothing")

    def check(self) -> None:
        pass


def _no_writes(*args: Any, **kwargs: Any) -> bool:
    return False  # never "cancel requested"


def warm_up_job(job_type: JobType, payload: dict[str, Any]) -> Job:
    now = datetime.now(UTC)
    return Job(id=uuid.uuid4(), user_id=None, job_type=job_type.name, queue=job_type.queue, payload=payload,
               priority=0, attempts=1, max_attempts=1, created_at=now, started_at=now, run_at=now,
               type_info=job_type)


def _run_warm_up_job(name: str, handler: Handler, job_type: JobType) -> None:
    """One tiny job through prepare() and run(); a payload the type's limits refuse falls back to the
    type's defaults with only a prompt (a slower warm-up, but a warm one)."""
    payloads = [WARM_UP_PAYLOADS.get(name, DEFAULT_WARM_UP_PAYLOAD)]
    if payloads[0] is not DEFAULT_WARM_UP_PAYLOAD:
        payloads.append(DEFAULT_WARM_UP_PAYLOAD)
    for index, payload in enumerate(payloads):
        ctx = JobContext(warm_up_job(job_type, payload), DiscardStorage(), _no_writes, progress_interval=3600.0)
        try:
            prepare = getattr(handler, "prepare", None)
            if callable(prepare):
                prepare(ctx.job, ctx)
            handler.run(ctx.job, ctx)
            return
        except JobError as err:
            if err.code != ErrorCode.INVALID_INPUT or index + 1 == len(payloads):
                raise
            log.info("warm-up payload of %s refused by %s (%s); warming up with its defaults", name,
                     job_type.name, err.message)
        finally:
            ctx.cleanup()


def warm_up(name: str, handler: Handler, job_type: JobType | None) -> None:
    """The handler's own `warm_up()`, else one tiny job of `job_type`."""
    own = getattr(handler, "warm_up", None)
    if callable(own):
        own()
    elif job_type is not None:
        _run_warm_up_job(name, handler, job_type)


def preload(handlers: Mapping[str, Handler], memory: MemoryManager, served: Iterable[JobType],
            stopping: Callable[[], bool] = lambda: False) -> dict[str, str]:
    """Load and warm each handler of a served type, in the order of the types; scope -> reason for
    each one that failed (the worker's own faults), empty when every one is ready."""
    first_type: dict[str, JobType] = {}
    for job_type in served:
        if job_type.handler in handlers:
            first_type.setdefault(job_type.handler, job_type)
    faults: dict[str, str] = {}
    for name, job_type in first_type.items():
        if stopping():
            break
        started = time.perf_counter()
        try:
            with memory.use(name):
                warm_up(name, handlers[name], job_type)
        except Exception as err:  # the handler's failure, not the worker's: it serves the rest
            reason = f"{name} could not be preloaded: {type(err).__name__}: {err}"[:500]
            log.error("%s; not claiming its jobs until a retry", reason)
            faults[f"handler:{name}"] = reason
            continue
        log.info("preloaded %s (%s) in %.2fs", name, job_type.name, time.perf_counter() - started)
    evicted = [name for name in first_type if f"handler:{name}" not in faults and not memory.is_resident(name)]
    if evicted:
        log.warning("preloaded models %s were evicted again to fit the memory budget; their first jobs load them",
                    ", ".join(evicted))
    return faults


def with_variant(load: Callable[..., T], source: str, variant: str | None, **kwargs: Any) -> T:
    """`load(source, variant=variant, **kwargs)`, falling back to no variant where the repository or
    folder has no files of that variant (diffusers then raises ValueError or OSError naming it)."""
    if not variant:
        return load(source, **kwargs)
    try:
        return load(source, variant=variant, **kwargs)
    except (ValueError, OSError) as err:
        if variant not in str(err):
            raise
        log.info("%s has no %s weights; loading its default ones", source, variant)
        return load(source, **kwargs)
