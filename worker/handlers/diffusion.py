"""What the SDXL and WAN handlers share: device and dtype, the limits a model accepts, per-step
progress and cancellation, out-of-memory recovery, stage timings.

Nothing here imports torch or diffusers at module level: handlers are built at worker start-up
and only `load()` pays for the heavy imports.
"""

from __future__ import annotations

import gc
import logging
import statistics
import time
from collections import deque
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worker.config import Settings
from worker.faults import is_oom_error
from worker.handlers.base import JobContext
from worker.jobs import ErrorCode, Job, JobError, resolve_config_aliases
from worker.tiny_models import read_marker

if TYPE_CHECKING:
    import torch

    from worker.estimate import DiffusionEstimate
    from worker.preview import LivePreview

log = logging.getLogger(__name__)

STAGE_LOADING = "loading_model"
STAGE_ENCODING = "encoding"
STAGE_DENOISING = "denoising"
STAGE_DECODING = "decoding"
STAGE_UPLOADING = "uploading"


@dataclass(frozen=True)
class Limits:
    """Lower bounds a model accepts: the user-facing ranges of seed 004, unless the model folder's
    `ourvidz_tiny_model.json` declares smaller ones for itself (the project's tiny test models do,
    so tests and the demo run at 64x64 with 2 steps while every real checkpoint keeps the ranges).
    It is the operator's model folder that relaxes them, never a job's payload."""

    min_side: int = 256
    min_steps: int = 10
    min_frames: int = 16

    def floors(self) -> dict[str, int]:
        """The lower bounds this model relaxes, for the job type's limits (job_types.limits)."""
        side = self.min_side
        return {"width": side, "height": side, "steps": self.min_steps, "frame_num": self.min_frames}

    @classmethod
    def of_model(cls, source: str | None) -> Limits:
        marker = read_marker(source) if source and Path(source).is_dir() else None
        declared = marker.get("limits") if marker else None
        if not isinstance(declared, Mapping):
            return cls()
        names = {f.name for f in fields(cls)}
        return cls(**{k: int(v) for k, v in declared.items() if k in names})


# --- device, dtype, loading ------------------------------------------------------------------


def resolve_device(setting: str) -> torch.device:
    import torch

    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    import torch

    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, setting)


def quiet_libraries() -> None:
    """No tqdm bars from loading: a worker's stderr is a log, not a terminal."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


@contextmanager
def quiet_logger(name: str, level: int = logging.ERROR) -> Iterator[None]:
    logger = logging.getLogger(name)
    previous = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)


def place(pipe: Any, device: torch.device, settings: Settings) -> None:
    """Move a pipeline to its device, or enable model CPU offload where an accelerator exists
    (diffusers raises on offload without one, so CPU workers ignore the setting)."""
    pipe.set_progress_bar_config(disable=True)
    if settings.diffusion_cpu_offload and device.type == "cuda":
        pipe.enable_model_cpu_offload(device=device)
        return
    if settings.diffusion_cpu_offload:
        log.warning("diffusion_cpu_offload ignored: no accelerator")
    pipe.to(device)


def load_error(what: str, source: str, err: BaseException) -> JobError:
    return JobError(ErrorCode.MODEL_LOAD_ERROR, f"{what} {source!r} could not be loaded: {type(err).__name__}: {err}"[
        :2000], retryable=True)


def model_info(source: str, device: torch.device, dtype: torch.dtype, limits: Limits) -> dict[str, Any]:
    info: dict[str, Any] = {"model": Path(source).name if Path(source).exists() else source,
                            "device": str(device), "dtype": str(dtype).removeprefix("torch.")}
    if limits != Limits():
        info["test_model"] = True
    return info


# --- a job's config ----------------------------------------------------------------------

def layered_config(job: Job, metadata_keys: tuple[str, ...]) -> dict[str, Any]:
    """The job type's defaults, then seed 002's `metadata` values, then the payload's `config`, each
    layer's aliases resolved on its own, so a payload's `size` overrides a preset's width/height."""
    metadata, given = job.section("metadata"), job.section("config")  # INVALID_INPUT unless objects
    defaults = job.type_info.defaults if job.type_info else {}
    from_metadata = {k: metadata[k] for k in metadata_keys if metadata.get(k) is not None}
    return {**resolve_config_aliases(defaults), **from_metadata, **resolve_config_aliases(given)}


# --- seeds -------------------------------------------------------------------------------


def job_seed(job: Job, configured: int | None) -> int:
    """The config's seed, else seed 002's `metadata.seed`, else a random one (recorded in the result)."""
    if configured is not None:
        return configured
    metadata = job.payload.get("metadata")
    seed = metadata.get("seed") if isinstance(metadata, dict) else None
    if isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2**32:
        return seed
    import secrets

    return secrets.randbelow(2**31)


def generators(seeds: list[int]) -> list[torch.Generator]:
    """CPU generators: the initial noise of a seed is the same on every device, GPU or CPU."""
    import torch

    return [torch.Generator(device="cpu").manual_seed(seed) for seed in seeds]


# --- out of memory -------------------------------------------------------------------------


def is_oom(err: BaseException) -> bool:
    return is_oom_error(err)


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def oom_error(detail: str) -> JobError:
    return JobError(ErrorCode.OOM_ERROR, f"out of GPU memory {detail}; retried with less memory", retryable=True)


# Jobs that ran out of memory in this process: the loop's in-process retry passes the same Job,
# whose `errors` only lists earlier attempts.
_OOM_JOBS: deque[Any] = deque(maxlen=256)


def note_oom(job: Job) -> None:
    if job.id not in _OOM_JOBS:
        _OOM_JOBS.append(job.id)


def had_oom(job: Job) -> bool:
    """This job ran out of memory before (an earlier attempt, or in this process): run it frugally."""
    return job.id in _OOM_JOBS or any(isinstance(e, dict) and e.get("code") == ErrorCode.OOM_ERROR
                                      for e in job.errors)


@contextmanager
def decode_retry_tiled(pipe: Any) -> Iterator[None]:
    """A VAE decode that runs out of memory is retried alone with tiling, keeping every denoising step."""
    vae = getattr(pipe, "vae", None)
    if vae is None or not hasattr(vae, "enable_tiling"):
        yield
        return
    own = vars(vae).get("decode")  # an instance attribute (a test's spy), restored afterwards
    original = vae.decode

    def decode(*args: Any, **kwargs: Any) -> Any:
        try:
            return original(*args, **kwargs)
        except Exception as err:
            if getattr(vae, "use_tiling", False) or not is_oom(err):
                raise
            log.warning("out of memory in the VAE decode; retrying the decode alone with tiling")
        free_memory()  # after the except block, which held the failed decode's tensors
        with vae_tiling(pipe, True):
            return original(*args, **kwargs)

    vae.decode = decode
    try:
        yield
    finally:
        if own is not None:
            vae.decode = own
        else:
            del vae.decode


@contextmanager
def vae_tiling(pipe: Any, enabled: bool) -> Iterator[None]:
    vae = getattr(pipe, "vae", None)
    if not enabled or vae is None or not hasattr(vae, "enable_tiling"):
        yield
        return
    vae.enable_tiling()
    try:
        yield
    finally:
        vae.disable_tiling()


# --- progress ------------------------------------------------------------------------------


class StepProgress:
    """`callback_on_step_end` of a pipeline: one progress update per denoising step, mapped into
    [start, end] of the job's bar (the loop throttles the row writes). With an `estimate`, each step
    also refreshes the job's estimated time left from this job's step time (worker.estimate), and
    with a `preview`, hands the latents of due steps to the job's live preview (worker.preview).

    It is also where cancellation takes effect: `ctx.progress` raises JobCanceled (a BaseException
    that the pipeline does not catch) once the row asks for it, so the pipeline stops in that step
    and never reaches the VAE decode. diffusers' `_interrupt` flag would only skip the remaining
    steps and still decode.
    """

    def __init__(self, ctx: JobContext, *, start: float, end: float, steps: int, calls: int = 1,
                 partial: Mapping[str, Any] | None = None, estimate: DiffusionEstimate | None = None,
                 preview: LivePreview | None = None) -> None:
        self.ctx = ctx
        self.start, self.end = start, end
        self.per_call = max(1, steps)
        self.calls = max(1, calls)
        self.partial = dict(partial or {})
        self.estimate = estimate
        self.preview = preview
        self.done = 0  # steps finished over every call
        self.in_call = 0
        self.calls_begun = 0
        self.denoise_seconds = 0.0
        self._call_started = 0.0
        self._last_step = 0.0
        self._recent: deque[float] = deque(maxlen=8)  # the last steps' seconds: this job's step time
        self.decode_seconds = 0.0

    def begin_call(self) -> None:
        self.in_call = 0
        self.calls_begun += 1
        if self.preview is not None:
            self.preview.new_call()
        self._call_started = self._last_step = time.perf_counter()

    def end_call(self) -> None:
        now = time.perf_counter()
        denoised = self._last_step - self._call_started
        self.denoise_seconds += denoised
        self.decode_seconds += now - self._last_step
        if self.estimate is not None and self.in_call:
            work = self.estimate.work_per_call
            self.estimate.history.record("step", denoised / self.in_call, work)
            self.estimate.history.record("decode", now - self._last_step, work)

    def record_upload(self, seconds: float) -> None:
        """The measured encoding and upload of the outputs, for the next jobs' estimates."""
        if self.estimate is not None:
            self.estimate.history.record("upload", seconds, self.estimate.work_per_call * self.calls)

    def __call__(self, pipe: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        now = time.perf_counter()
        self._recent.append(now - self._last_step)
        self._last_step = now
        if self.in_call == 0:
            actual = getattr(pipe, "_num_timesteps", None)
            if isinstance(actual, int) and actual > 0:  # img2img strength, solver order: the pipeline knows
                self.per_call = actual
        self.in_call += 1
        self.done += 1
        total = self.per_call * self.calls
        if self.estimate is not None:
            step_seconds = statistics.median(self._recent)  # a first step's warm-up is no step time
            self.ctx.estimate(self.estimate.remaining(total - self.done, step_seconds,
                                                      self.calls - self.calls_begun + 1))
        fraction = self.start + (self.end - self.start) * min(1.0, self.done / total)
        self.ctx.progress(fraction, STAGE_DENOISING, {**self.partial, "step": self.done, "steps": total})
        if self.preview is not None and "latents" in callback_kwargs:
            self.preview.step(pipe.scheduler, callback_kwargs["latents"], self.done, total)
        if self.in_call >= self.per_call:
            self.ctx.progress(fraction, STAGE_DECODING, {**self.partial, "step": self.done, "steps": total})
        return {}


@dataclass
class Timer:
    """Seconds per stage, in the order they happened."""

    started: float = 0.0

    def __post_init__(self) -> None:
        self.started = time.perf_counter()
        self.stages: dict[str, float] = {}
        self._mark = self.started

    def lap(self, stage: str) -> float:
        now = time.perf_counter()
        self.stages[stage] = round(self.stages.get(stage, 0.0) + now - self._mark, 4)
        self._mark = now
        return now

    def add(self, stage: str, seconds: float) -> None:
        self.stages[stage] = round(self.stages.get(stage, 0.0) + seconds, 4)

    def total(self) -> float:
        return round(time.perf_counter() - self.started, 4)
