"""The handler interface: `load()` once, `run(job, ctx)` per job (cog-like).

The context is all a handler gets from the runtime: progress, a cancellation check, a scratch
directory and asset publishing. It never sees SQL or connections.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import shutil
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from queue import SimpleQueue
from types import CodeType
from typing import Any, Protocol, runtime_checkable

from worker.estimate import LiveUpdate, ProgressRate
from worker.faults import disk_full
from worker.jobs import Job
from worker.storage import Storage, StorageError, outage_policy, ride_out

log = logging.getLogger(__name__)

# Hold while building models (from_pretrained): accelerate/transformers/diffusers patch process-wide
# state while they do (init_empty_weights swaps nn.Module.register_parameter), so two loads in two
# threads hand each other meta tensors ("Cannot copy out of meta tensor"). Reentrant.
MODEL_LOAD_LOCK = threading.RLock()


class JobInterrupted(BaseException):
    """Stops a handler. BaseException, so `except Exception` in handler code cannot swallow it."""


class JobCanceled(JobInterrupted):
    """The user asked to cancel; the row ends `canceled` and no result is published."""


class JobLeaseLost(JobInterrupted):
    """Another worker owns the job now; this one must stop touching it."""


class WorkerStopping(JobInterrupted):
    """The worker is shutting down past its grace period; the job goes back to the queue."""


@runtime_checkable
class Handler(Protocol):
    """Optional attributes the worker honours:

    - `concurrent = True`: run() may be called from several threads at once (else serialized).
    - `max_batch_size = N` with `run_batch(jobs, ctxs) -> list[result | exception]`: claimed jobs
      of this handler are run together, up to N at a time; each job still gets its own context,
      result, error and cancellation.
    - `prepare(job, ctx)`: validate the payload (raise JobError INVALID_INPUT) and fetch what the job
      needs from outside (reference images), storing it on `ctx.prepared`. The worker calls it before
      the model is loaded and without holding a job slot, so an invalid job never loads a model and a
      slow download delays only its own job (with `prepare_fetches = True` it runs on a thread of its
      own, holding no job slot; else on the job's thread); run() then finds `ctx.prepared` set.
    - `uses_storage = False`: the handler publishes nothing, so a storage fault does not stop it.
    - `warm_up()`: after load(), one tiny generation at the served shapes (kernels chosen, allocator
      grown), for `run --preload` (worker.preload); without it the preload runs one tiny job of the
      handler's first served type through prepare() and run(), publishing nowhere.

    And those the memory manager (worker.memory) uses; it calls load() under MODEL_LOAD_LOCK, and
    unload() only while no job of the handler runs:

    - `unload()`: drop every reference to the loaded weights; the next job calls load() again.
      Without it the handler's model is never evicted.
    - `modules()`: the torch modules holding the weights, to measure the footprint on CPU and to
      check after unload() that they were freed.
    - `model_key`: the model's name for the workers row and the footprint memory (else `source`,
      else the handler's name); `source`: a local model folder or file whose weight files estimate
      the first load.
    - `attach_memory(manager)`: called once with the manager, for a handler that uses another
      handler's model (WAN enhancement uses the chat handler's, through `manager.use("chat")`).
    """

    def load(self) -> None:
        """Load models once, before the first job. May be slow."""
        ...

    def run(self, job: Job, ctx: JobContext) -> dict[str, Any]:
        """Do the job and return its result (JSON-serializable). Raise JobError to fail or retry."""
        ...


# write(progress, stage, partial) -> cancel requested; a writer with a `live` keyword parameter also
# gets the estimate and the preview (worker.estimate.LiveUpdate), as the worker's does.
ProgressWriter = Callable[..., bool]


@dataclass
class _Write:
    pending: tuple[int, str | None, dict[str, Any] | None]
    live: LiveUpdate | None  # for a writer that takes it
    kept: bool  # the first, the last or a forced one: never replaced by a later update
    done: threading.Event | None = None  # set once written, for a forced flush that waits for it


def _takes_live(writer: Callable[..., Any]) -> bool:
    code = getattr(writer, "__code__", None)  # the worker's writer: a new closure per job, of one code
    if isinstance(code, CodeType):
        return _code_takes_live(code)
    try:
        parameters = inspect.signature(writer).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "live" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


@functools.lru_cache(maxsize=64)
def _code_takes_live(code: CodeType) -> bool:
    named = code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]
    return "live" in named or bool(code.co_flags & inspect.CO_VARKEYWORDS)


class JobContext:
    """Per-job services. Thread-safe: the worker's lease keeper flushes and interrupts it."""

    def __init__(self, job: Job, storage: Storage, write_progress: ProgressWriter,
                 progress_interval: float, scratch_root: Path | None = None, *, background: bool = False) -> None:
        self.job = job
        # background: progress() hands a due write to the progress-writer thread instead of making the
        # round trip on the job thread (the worker's contexts; a test's recorder sees writes in order)
        self._background = background
        self._outbox: deque[_Write] = deque()  # handed to the progress-writer thread, oldest first
        self._storage = storage
        self._write_progress = write_progress
        self._interval = progress_interval
        self._scratch_root = scratch_root
        self._scratch: Path | None = None
        self._lock = threading.Lock()
        self._last_write = 0.0
        self._written = False
        self._pending: tuple[int, str | None, dict[str, Any] | None] | None = None
        self._interrupt: type[JobInterrupted] | None = None
        self._latest: tuple[int, str | None] = (0, None)
        self.assets: list[dict[str, Any]] = []
        self.prepared: Any = None  # what the handler's prepare() made of the job before its model loaded
        self._uploads: dict[tuple[str, str], None] = {}  # every object this attempt wrote or tried to, in order
        # What a watcher sees besides progress (worker.estimate, worker.preview): seconds left as
        # (seconds or None, when measured), from the progress rate unless the handler estimates.
        self._eta: tuple[float | None, float] | None = None
        self._eta_own = False
        self._rate = ProgressRate()
        self._preview: dict[str, Any] | None = None
        self._preview_changed = False
        self._writer_takes_live = _takes_live(write_progress)

    # -- progress and cancellation ------------------------------------------------------

    def progress(self, fraction: float, stage: str | None = None, partial: dict[str, Any] | None = None) -> None:
        """Report progress (0..1) and a stage; also the point where cancellation takes effect.

        Writes are throttled to one per `progress_interval` per job, the first and the last
        (fraction >= 1) always go out; `partial` (e.g. streamed text) rides along in `result`.
        """
        self.check()
        percent = max(0, min(100, round(fraction * 100)))
        with self._lock:
            self._pending = (percent, stage, partial)
            self._latest = (percent, stage)
            if not self._eta_own:
                now = time.monotonic()
                self._rate.observe(fraction, now)
                self._eta = (self._rate.remaining(now), now)
        self.flush()
        self.check()

    def _due(self, force: bool, pending: tuple[int, str | None, dict[str, Any] | None] | None) -> bool:
        """Whether `pending` is to be written now (caller holds the lock)."""
        due = force or not self._written or (pending is not None and pending[0] >= 100)
        return pending is not None and (due or time.monotonic() - self._last_write >= self._interval)

    def _hand_off(self, write: _Write) -> bool:
        """Queue `write` for the progress-writer thread (caller holds the lock). An ordinary update
        replaces one still waiting behind the writer; a first or last one is never replaced.
        Returns whether the thread has one more write to make."""
        last = self._outbox[-1] if self._outbox else None
        if last is not None and not last.kept and not write.kept:
            changed = last.live is not None and last.live["preview_changed"]
            if changed and write.live is not None and not write.live["preview_changed"]:
                write.live["preview_changed"] = True  # the preview it replaces still has to go out
            self._outbox[-1] = write
            return False
        self._outbox.append(write)
        return True

    def _write_next(self) -> None:
        """The progress-writer thread's turn: the oldest queued write."""
        with self._lock:
            write = self._outbox.popleft() if self._outbox else None
        if write is not None:
            try:
                self._write(write)
            finally:
                if write.done is not None:
                    write.done.set()

    def flush(self, force: bool = False) -> None:
        """Write the pending update once the interval allows (the lease keeper calls this so a
        throttled update still goes out while the handler is busy); `force` writes it now, with a
        changed preview even when progress did not move."""
        with self._lock:
            pending = self._pending
            if pending is None and self._preview_changed and self._writer_takes_live:
                pending = (*self._latest, None)
            if pending is None or not self._due(force, pending):
                return
            kept = force or not self._written or pending[0] >= 100
            self._pending = None
            self._written = True
            self._last_write = time.monotonic()
            live = self._take_live()
            # forced: written by the time flush returns (a preview's row before its object goes), after
            # the writes queued before it
            write = _Write(pending, live if self._writer_takes_live else None, kept,
                           threading.Event() if force and self._background else None)
            queued = self._background and self._hand_off(write)
        if queued:
            _background_writer().submit(self)
        elif not self._background:
            self._write(write)
        if write.done is not None:
            write.done.wait(60)

    def _write(self, write: _Write) -> None:
        from worker.queue import LeaseLost

        try:
            if write.live is not None:
                written = self._write_progress(*write.pending, live=write.live)
            else:
                written = self._write_progress(*write.pending)
            if written:
                self.interrupt(JobCanceled)
        except LeaseLost:
            self.interrupt(JobLeaseLost)

    # -- the estimate and the preview (worker.estimate, worker.preview) ------------------

    def estimate(self, seconds: float | None) -> None:
        """The handler's own estimate of the seconds left (None: not known yet). Once given, it
        replaces the estimate from the progress rate for the rest of the job; it goes out, counted
        down to the moment of writing, with the next progress write."""
        with self._lock:
            self._eta = (None if seconds is None else max(0.0, seconds), time.monotonic())
            self._eta_own = True

    @property
    def seconds_left(self) -> float | None:
        """The current estimate of the seconds left, or None."""
        with self._lock:
            return self._seconds_left(time.monotonic())

    def set_preview(self, preview: dict[str, Any] | None) -> None:
        """The job's preview object for the row's `preview` (None clears it); written with the next
        progress write, or by the lease keeper's flush."""
        with self._lock:
            self._preview = preview
            self._preview_changed = True

    @property
    def preview(self) -> dict[str, Any] | None:
        return self._preview

    def _seconds_left(self, now: float) -> float | None:
        if self._eta is None or self._eta[0] is None:
            return None
        return max(0.0, self._eta[0] - (now - self._eta[1]))

    def _take_live(self) -> LiveUpdate:
        live = LiveUpdate(eta_seconds=self._seconds_left(time.monotonic()), preview=self._preview,
                          preview_changed=self._preview_changed)
        self._preview_changed = False
        return live

    def check(self) -> None:
        """Raise if the job was canceled, its lease lost, or the worker is stopping."""
        if self._interrupt is not None:
            raise self._interrupt(f"job {self.job.id}: {self._interrupt.__name__}")

    @property
    def last_progress(self) -> tuple[int, str | None]:
        """The latest (percent, stage) the handler reported, written or still throttled."""
        return self._latest

    @property
    def cancelled(self) -> bool:
        return self._interrupt is not None

    def interrupt(self, kind: type[JobInterrupted]) -> None:
        if self._interrupt is None or kind is WorkerStopping:
            self._interrupt = kind

    # -- files --------------------------------------------------------------------------

    @property
    def storage(self) -> Storage:
        """The storage backend, for reading inputs such as reference images (worker.media)."""
        return self._storage

    @property
    def scratch_dir(self) -> Path:
        """A private directory for this job, removed when the job ends."""
        if self._scratch is None:
            try:
                self._scratch = Path(tempfile.mkdtemp(prefix=f"job-{self.job.id}-", dir=self._scratch_root))
            except OSError as err:
                if (full := disk_full(err)) is not None:
                    from worker.faults import disk_fault

                    raise disk_fault(full, "making the job's scratch folder") from err
                raise
        return self._scratch

    def cleanup(self) -> None:
        """Remove the scratch folder (published assets stay: see discard_assets)."""
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)

    def discard_assets(self) -> int:
        """Remove from storage what this attempt uploaded, or tried to (an upload whose answer was
        lost may have landed), so that a failed, canceled or retried job leaves nothing readable.

        Call it while the job's lease is still held: never after JobLeaseLost, since the paths are
        the job's own and the worker that owns it now writes the same ones. Best effort (a failure
        is logged, never raised; what could not be removed is tried again by the next call);
        `assets` is emptied. Returns how many objects it removed.
        """
        with self._lock:
            targets, self._uploads = list(self._uploads), {}
            self.assets = []
        by_bucket: dict[str, list[str]] = {}
        for bucket, path in targets:
            by_bucket.setdefault(bucket, []).append(path)
        removed = 0
        for bucket, paths in by_bucket.items():
            try:
                self._storage.remove(bucket, paths)
                removed += len(paths)
            except Exception as err:  # cleanup must not hide the job's own outcome
                log.warning("job %s: could not remove %d uploaded object(s) from %s: %s", self.job.id, len(paths),
                            bucket, err)
                with self._lock:
                    self._uploads.update(dict.fromkeys((bucket, path) for path in paths))
        return removed

    def publish(self, data: bytes, *, ext: str, content_type: str, index: int | None = None,
                **metadata: Any) -> dict[str, Any]:
        """Upload one asset to the job type's bucket at {user_id}/{job_id}/{index}.{ext}.

        The path depends only on the job and the index, so a retried job overwrites its
        earlier upload instead of adding a second copy. While Storage is down or failing, only
        the upload is retried, with backoff, for the storage retry window (the job keeps its
        lease, and a cancel still stops it); past the window, or on a failure retrying cannot
        fix, StorageError is raised and this attempt's uploads are removed. A refused key raises
        WorkerFault (the worker's fault: the job goes back to the queue).
        """
        self.check()
        index = len(self.assets) if index is None else index
        info = self.job.type_info
        bucket = (info.bucket if info and info.bucket else None) or self.job.job_type
        owner = str(self.job.user_id) if self.job.user_id else "service"
        path = f"{owner}/{self.job.id}/{index}.{ext}"
        with self._lock:
            self._uploads[(bucket, path)] = None
        before = self._latest
        waited = False

        def waiting(error: BaseException) -> None:
            nonlocal waited
            waited = True
            self.progress(before[0] / 100, "waiting for storage")

        try:
            stored = ride_out(lambda: self._storage.upload(bucket, path, data, content_type),
                              outage_policy(self._storage), check=self.check, on_wait=waiting,
                              what=f"job {self.job.id}: upload of {bucket}/{path}")
        except (StorageError, JobCanceled):
            self.discard_assets()
            raise
        if waited:
            self.progress(before[0] / 100, before[1])
        asset = {**stored.to_json(), "index": index, **metadata}
        self.assets.append(asset)
        return asset


class _BackgroundWriter:
    """The thread that writes progress handed off by job threads (JobContext background=True), one
    update at a time in the order handed: a slow or unreachable database delays the row's progress,
    never the denoising. Process-wide and started on first use; daemon, so it never blocks the exit."""

    def __init__(self) -> None:
        self._queue: SimpleQueue[JobContext] = SimpleQueue()
        threading.Thread(target=self._run, name="progress-writer", daemon=True).start()

    def submit(self, ctx: JobContext) -> None:
        self._queue.put(ctx)

    def _run(self) -> None:
        while True:
            ctx = self._queue.get()
            try:
                ctx._write_next()
            except Exception as err:  # a lost progress write is not worth the thread (a pool closed at shutdown)
                log.warning("progress write of job %s failed: %s", ctx.job.id, err)


_writer: _BackgroundWriter | None = None
_writer_lock = threading.Lock()


def _background_writer() -> _BackgroundWriter:
    global _writer
    with _writer_lock:
        if _writer is None:
            _writer = _BackgroundWriter()
        return _writer


# --- registry -------------------------------------------------------------------------

BUILTIN_HANDLERS: dict[str, str] = {
    "simulate": "worker.handlers.simulate:SimulateHandler",
    "chat": "worker.handlers.chat:ChatHandler",
    "sdxl": "worker.handlers.sdxl:SdxlHandler",
    "wan": "worker.handlers.wan:WanHandler",
}


def load_handler(spec: str) -> Handler:
    """`module:attr` where attr is a handler class or a factory, called once with no arguments."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"handler spec {spec!r} is not module:attr")
    target = getattr(importlib.import_module(module_name), attr)
    handler = target()
    if not isinstance(handler, Handler):
        raise TypeError(f"{spec} made {type(handler).__name__}, which has no load()/run(job, ctx)")
    return handler


def builtin_handlers() -> dict[str, Handler]:
    handlers = {name: load_handler(spec) for name, spec in BUILTIN_HANDLERS.items()}
    connect_handlers(handlers)
    return handlers


def connect_handlers(handlers: dict[str, Handler]) -> None:
    """Show handlers that use another one (WAN prompt enhancement uses the chat model) the
    worker's handlers: the dict itself, so a handler replaced in it later is the one they find."""
    for handler in handlers.values():
        connect = getattr(handler, "connect", None)
        if callable(connect):
            connect(handlers)
