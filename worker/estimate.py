"""How long a running job has left: the row's `estimated_completion_at`.

Two sources, one per kind of job:

- `ProgressRate`: any handler's progress fraction over time (simulate, chat, custom handlers). The
  JobContext feeds it on every `progress()` unless the handler gives its own estimate.
- `DiffusionEstimate`: the SDXL and WAN handlers know their stages. What is left is the denoising
  steps left at this job's measured step time, plus a VAE decode per pipeline call left and the
  encoding and upload of the outputs. Decode and upload times come from the handler's earlier jobs
  (`StageHistory`, per unit of work: megapixels x frames x images), and until one has been measured,
  from rough multiples of a step (`StagePriors`).

The JobContext turns the seconds left into a timestamp at write time (worker/queue.py
REPORT_PROGRESS), so a throttled write never carries a stale estimate.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Any, TypedDict


class LiveUpdate(TypedDict):
    """What a progress write carries besides progress and stage (JobContext -> JobQueue.report_progress)."""

    eta_seconds: float | None  # seconds left; None: not known
    preview: dict[str, Any] | None  # the job's preview object; None clears it
    preview_changed: bool  # whether `preview` is to be written at all


class ProgressRate:
    """Seconds left from the rate at which a job's progress fraction advanced over the last `window`
    seconds. Nothing is known before the fraction has advanced twice; a fraction that goes back (a
    handler restarting a stage) starts over."""

    def __init__(self, window: float = 60.0) -> None:
        self.window = window
        self._samples: deque[tuple[float, float]] = deque()

    def observe(self, fraction: float, now: float) -> None:
        samples = self._samples
        if samples and fraction < samples[-1][1]:
            samples.clear()
        if not samples or fraction > samples[-1][1]:
            samples.append((now, fraction))
        while len(samples) > 2 and now - samples[0][0] > self.window:
            samples.popleft()

    def remaining(self, now: float) -> float | None:
        if len(self._samples) < 2:
            return None
        (t0, f0), (t1, f1) = self._samples[0], self._samples[-1]
        if t1 <= t0 or f1 <= f0:
            return None
        rate = (f1 - f0) / (t1 - t0)
        return max(0.0, (1.0 - f1) / rate - (now - t1))


@dataclass(frozen=True)
class StagePriors:
    """Decode and upload time in denoising steps, used only until the handler has measured them.
    Rough figures for the full-size models on one GPU: SDXL's VAE decode of a 1024x1024 image costs
    a few UNet steps, its PNG a couple; WAN's decode of 81 frames a few transformer steps, the MP4
    about one."""

    decode_steps: float
    upload_steps: float


SDXL_PRIORS = StagePriors(decode_steps=3.0, upload_steps=2.0)
WAN_PRIORS = StagePriors(decode_steps=4.0, upload_steps=1.0)


class StageHistory:
    """Seconds per unit of work of a handler's stages ("step", "decode", "upload"), from the jobs it
    ran: an exponentially weighted mean, so a changed load or device shows within a few jobs."""

    def __init__(self, weight: float = 0.5) -> None:
        self.weight = weight
        self._per_unit: dict[str, float] = {}
        self._lock = threading.Lock()

    def per_unit(self, stage: str) -> float | None:
        return self._per_unit.get(stage)

    def record(self, stage: str, seconds: float, work: float) -> None:
        if work <= 0 or seconds < 0:
            return
        value = seconds / work
        with self._lock:
            old = self._per_unit.get(stage)
            self._per_unit[stage] = value if old is None else old + self.weight * (value - old)


@dataclass
class DiffusionEstimate:
    """The stages of one SDXL/WAN job. `work_per_call` is the work of one pipeline call (megapixels
    x frames x images in the call); a job makes `calls` of them, each denoising then decoding."""

    history: StageHistory
    priors: StagePriors
    work_per_call: float
    calls: int = 1

    def before_start(self, steps_per_call: int) -> float | None:
        """The whole job, from history alone; None for a handler's first job."""
        step = self.history.per_unit("step")
        if step is None:
            return None
        return self.remaining(steps_per_call * self.calls, step * self.work_per_call, self.calls)

    def remaining(self, steps_left: int, step_seconds: float, decodes_left: int) -> float:
        decode = self._stage("decode", self.work_per_call, self.priors.decode_steps * step_seconds)
        upload = self._stage("upload", self.work_per_call * self.calls, self.priors.upload_steps * step_seconds)
        return max(0, steps_left) * step_seconds + max(0, decodes_left) * decode + upload

    def _stage(self, stage: str, work: float, prior: float) -> float:
        per_unit = self.history.per_unit(stage)
        return prior if per_unit is None else per_unit * work


def work_units(width: int, height: int, frames: int = 1, images: int = 1) -> float:
    """Megapixels x frames x images: what decode and upload time scale with."""
    return width * height * frames * images / 1e6
