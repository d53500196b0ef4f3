"""Live previews of SDXL and WAN jobs: every few denoising steps, a small picture of what the latents
will decode to is published to the job's folder in its bucket (one object, overwritten) and named in
the row's `preview`, so Realtime carries it to the frontend (docs/previews.md).

The job thread only decides whether a step is due and takes references to the step's tensors
(which the next step replaces rather than overwrites); estimating the clean latents, projecting
them to RGB, encoding the image and uploading it happen in a thread of the job's own. One preview
waits at most: a newer step replaces one not yet published, so a slow upload never queues work and
never holds up denoising.

What a preview shows is the current estimate of the denoised latents (x0), not the noisy sample:
the x0 prediction the scheduler keeps (UniPC with predict_x0, DPM-Solver++), or for Euler, x0
solved from the last two samples; otherwise the sample itself.

Projection to RGB. By default a fixed linear map per latent family (no weights, microseconds):
SDXL's 4 channels and Wan 2.1's 16 channels, each latent pixel becoming one preview pixel (1/8 of
the output's side). The factors are not ours: they are the approximations published with ComfyUI's
latent previews (comfy/latent_formats.py, `SDXL` and `Wan21`), which act on the latents as the
denoiser sees them (SDXL's scaled by the VAE's 0.13025, Wan's normalized by its per-channel mean and
std), as diffusers' pipelines hand them to the step callback. We did not fit them and could not
measure their error here (no real VAE weights are available to this project); they give the
colours and layout, not the detail. Where one is installed, a tiny decoder (diffusers'
AutoencoderTiny, e.g. taesdxl) can be configured instead: full-resolution previews for a few
milliseconds of GPU time.
"""

from __future__ import annotations

import io
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from worker.config import Settings
from worker.handlers.base import MODEL_LOAD_LOCK, JobContext, JobLeaseLost, WorkerStopping

if TYPE_CHECKING:
    import numpy as np
    import torch

log = logging.getLogger(__name__)

Family = Literal["sdxl", "wan"]

# rgb = sum over channels of latent[c] * FACTORS[c], plus BIAS; in [-1, 1]. See the module docstring.
SDXL_RGB_FACTORS = (
    (0.3651, 0.4232, 0.4341),
    (-0.2533, -0.0042, 0.1068),
    (0.1076, 0.1111, -0.0362),
    (-0.3165, -0.2492, -0.2188),
)
SDXL_RGB_BIAS = (0.1084, -0.0175, -0.0011)
WAN21_RGB_FACTORS = (
    (-0.1299, -0.1692, 0.2932),
    (0.0671, 0.0406, 0.0442),
    (0.3568, 0.2548, 0.1747),
    (0.0372, 0.2344, 0.1420),
    (0.0313, 0.0189, -0.0328),
    (0.0296, -0.0956, -0.0665),
    (-0.3477, -0.4059, -0.2925),
    (0.0166, 0.1902, 0.1975),
    (-0.0412, 0.0267, -0.1364),
    (-0.1293, 0.0740, 0.1636),
    (0.0680, 0.3019, 0.1128),
    (0.0032, 0.0581, 0.0639),
    (-0.1251, 0.0927, 0.1699),
    (0.0060, -0.0633, 0.0005),
    (0.3477, 0.2275, 0.2950),
    (0.1984, 0.0913, 0.1861),
)
WAN21_RGB_BIAS = (-0.1835, -0.0868, -0.3360)

FORMATS = {"png": ("png", "image/png"), "webp": ("webp", "image/webp"), "jpeg": ("jpg", "image/jpeg")}
MAX_BATCH = 6  # SDXL's largest batch (num_images) shown in one grid


@dataclass(frozen=True)
class PreviewConfig:
    enabled: bool = True
    every_steps: int = 5
    min_seconds: float = 2.0
    keep: bool = False
    format: str = "png"
    max_side: int = 512
    frames: int = 4
    decoder: str | None = None

    @classmethod
    def of(cls, settings: Settings, family: Family) -> PreviewConfig:
        return cls(enabled=settings.preview_enabled, every_steps=settings.preview_every_steps,
                   min_seconds=settings.preview_min_seconds, keep=settings.preview_keep,
                   format=settings.preview_format, max_side=settings.preview_max_side,
                   frames=settings.preview_frames,
                   decoder=settings.preview_sdxl_decoder if family == "sdxl" else settings.preview_wan_decoder)


# --- latents to pictures --------------------------------------------------------------------

Projection = Callable[["torch.Tensor"], "torch.Tensor"]  # (n, C, h, w) latents -> (n, H, W, 3) in [0, 1]


class LinearProjection:
    """A fixed latent -> RGB map: one preview pixel per latent pixel."""

    def __init__(self, factors: tuple[tuple[float, float, float], ...], bias: tuple[float, float, float]) -> None:
        self.factors, self.bias = factors, bias
        self._weights: dict[Any, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        import torch

        if latents.shape[1] != len(self.factors):
            raise ValueError(f"latents have {latents.shape[1]} channels, the map takes {len(self.factors)}")
        if latents.device not in self._weights:
            self._weights[latents.device] = (torch.tensor(self.factors, device=latents.device),
                                             torch.tensor(self.bias, device=latents.device))
        weight, bias = self._weights[latents.device]
        rgb = torch.einsum("nchw,cr->nhwr", latents.float(), weight) + bias
        return ((rgb + 1.0) / 2.0).clamp(0.0, 1.0)


def linear_projection(family: Family) -> LinearProjection:
    if family == "sdxl":
        return LinearProjection(SDXL_RGB_FACTORS, SDXL_RGB_BIAS)
    return LinearProjection(WAN21_RGB_FACTORS, WAN21_RGB_BIAS)


_decoders: dict[tuple[str, str], Any] = {}
_decoders_lock = threading.Lock()


class DecoderProjection:
    """A tiny decoder (diffusers AutoencoderTiny) from a local folder, loaded once per process and
    device on first use; it takes the latents as the denoiser sees them, as taesd/taesdxl do."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        import torch

        decoder = self.load(latents.device)
        dtype = next(decoder.parameters()).dtype
        with torch.inference_mode():
            pixels = decoder.decode(latents.to(dtype)).sample  # (n, 3, H, W) in [-1, 1]
        return ((pixels.float() + 1.0) / 2.0).clamp(0.0, 1.0).permute(0, 2, 3, 1)

    def load(self, device: torch.device) -> Any:
        key = (self.path, str(device))
        with _decoders_lock:
            if key not in _decoders:
                import torch
                from diffusers import AutoencoderTiny

                dtype = torch.float16 if device.type == "cuda" else torch.float32
                from worker.handlers.diffusion import quiet_logger

                # "block_out_channels ... not expected": taesd's own config, as published, says that
                with MODEL_LOAD_LOCK, quiet_logger("diffusers.configuration_utils"):
                    decoder = AutoencoderTiny.from_pretrained(self.path, dtype=dtype)
                _decoders[key] = decoder.to(device).eval()
            return _decoders[key]


def x0_source(scheduler: Any, latents: torch.Tensor, previous: torch.Tensor | None) -> Callable[[], torch.Tensor]:
    """How to get the scheduler's current estimate of the clean latents after a step (see the module
    docstring), without computing it: the job thread only takes the references (these tensors are
    replaced, never written in place, by the step that follows), the preview thread computes."""
    config = getattr(scheduler, "config", {})
    outputs = getattr(scheduler, "model_outputs", None)
    keeps_x0 = config.get("predict_x0", False) or "++" in str(config.get("algorithm_type", ""))
    if outputs and keeps_x0 and outputs[-1] is not None and outputs[-1].shape == latents.shape:
        prediction = outputs[-1]
        return lambda: prediction
    if previous is not None and type(scheduler).__name__ == "EulerDiscreteScheduler":
        index = getattr(scheduler, "step_index", None)
        sigmas = getattr(scheduler, "sigmas", None)  # kept on the CPU by diffusers: no device sync here
        if isinstance(index, int) and sigmas is not None and 1 <= index < len(sigmas):
            # Euler: x_next = x + d * (sigma_next - sigma) with d = (x - x0) / sigma, so x0 = x - sigma * d.
            sigma, sigma_next = float(sigmas[index - 1]), float(sigmas[index])
            if sigma_next != sigma:
                return lambda: previous - sigma * ((latents - previous) / (sigma_next - sigma))
    return lambda: latents


def denoised(scheduler: Any, latents: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
    return x0_source(scheduler, latents, previous)()


def needs_previous(scheduler: Any) -> bool:
    return type(scheduler).__name__ == "EulerDiscreteScheduler"


def spread(count: int, wanted: int) -> list[int]:
    """`wanted` indices spread evenly over range(count), first and last included."""
    if wanted >= count:
        return list(range(count))
    if wanted == 1:
        return [count // 2]
    return sorted({round(i * (count - 1) / (wanted - 1)) for i in range(wanted)})


def compose(pixels: np.ndarray, layout: Literal["strip", "grid"]) -> np.ndarray:
    """(n, H, W, 3) pictures side by side (a video's frames, in time order) or in a grid (a batch)."""
    import numpy as np

    n, height, width, _ = pixels.shape
    columns = n if layout == "strip" else math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    canvas = np.zeros((rows * height, columns * width, 3), dtype=pixels.dtype)
    for i in range(n):
        r, c = divmod(i, columns)
        canvas[r * height:(r + 1) * height, c * width:(c + 1) * width] = pixels[i]
    return canvas


def encode(picture: np.ndarray, fmt: str, max_side: int) -> tuple[bytes, int, int]:
    from PIL import Image

    image = Image.fromarray(picture)
    image.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    if fmt == "png":
        image.save(buffer, format="PNG", compress_level=1)
    elif fmt == "webp":
        image.save(buffer, format="WEBP", quality=80, method=0)
    else:
        image.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue(), image.width, image.height


# --- one job's previews ---------------------------------------------------------------------


@dataclass
class _Due:
    x0: Callable[[], torch.Tensor]  # the step's estimate of the clean latents, computed when published
    step: int
    steps: int


class LivePreview:
    """The previews of one job. `step()` is the step callback's part (job thread); `close()` ends
    them and removes the object unless told to keep it. Counters are for tests and benchmarks."""

    def __init__(self, ctx: JobContext, config: PreviewConfig, family: Family,
                 projection: Projection | None = None) -> None:
        self.ctx, self.config, self.family = ctx, config, family
        self._projection = projection
        self._previous: Any = None
        self._last_due = -math.inf
        self._due: _Due | None = None
        self._busy = False
        self._closed = False
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._uploaded = False
        self.offered = self.published = self.dropped = self.failed = 0
        self.job_thread_seconds = 0.0  # time step() took on the job thread, over the job
        info = ctx.job.type_info
        self.bucket = (info.bucket if info and info.bucket else None) or ctx.job.job_type
        owner = str(ctx.job.user_id) if ctx.job.user_id else "service"  # as JobContext.publish names assets
        self.ext, self.content_type = FORMATS.get(config.format, FORMATS["png"])
        self.path = f"{owner}/{ctx.job.id}/preview.{self.ext}"

    # -- job thread ---------------------------------------------------------------------

    def new_call(self) -> None:
        """A pipeline call begins (SDXL denoises a batch in several after running out of memory): the
        last call's sample is no previous sample of this one."""
        self._previous = None

    def step(self, scheduler: Any, latents: torch.Tensor, step: int, steps: int) -> None:
        """After denoising step `step` of `steps` (counted over the whole job)."""
        if not self.config.enabled or self._closed:
            return
        started = time.perf_counter()
        previous, self._previous = self._previous, (latents if needs_previous(scheduler) else None)
        now = time.monotonic()
        # The last step is followed by the real decode: a preview of it would only race the result.
        if step % self.config.every_steps or step >= steps or now - self._last_due < self.config.min_seconds:
            self.job_thread_seconds += time.perf_counter() - started
            return
        self._last_due = now
        due = _Due(x0_source(scheduler, latents, previous), step, steps)
        with self._cond:
            if self._due is not None:
                self.dropped += 1
            self._due = due
            self.offered += 1
            self._cond.notify_all()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"preview-{self.ctx.job.id}", daemon=True)
            self._thread.start()
        self.job_thread_seconds += time.perf_counter() - started

    def close(self, *, keep_object: bool, clear_row: bool = True) -> None:
        """No more previews: one waiting is dropped, one uploading finishes. Unless `keep_object`, the
        row's preview is cleared (written at once when `clear_row`) and the object removed."""
        with self._cond:
            self._closed = True
            if self._due is not None:
                self.dropped += 1
            self._due = None
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=60)
        if keep_object or not self._uploaded:
            return
        self.ctx.set_preview(None)
        if clear_row:
            self.ctx.flush(force=True)  # the row stops naming the object before it goes
        try:
            self.ctx.storage.remove(self.bucket, [self.path])
            self._uploaded = False
        except Exception as err:  # a leftover preview must not fail the job
            log.warning("job %s: could not remove its preview %s/%s: %s", self.ctx.job.id, self.bucket, self.path,
                        err)

    # -- preview thread -----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._due is None and not self._closed:
                    self._cond.wait()
                if self._due is None:
                    return
                due, self._due = self._due, None
            try:
                self._publish(due)
            except Exception as err:  # previews are best effort: the job goes on without them
                self.failed += 1
                log.warning("job %s: preview of step %d not published: %s", self.ctx.job.id, due.step, err)

    def _project(self, latents: torch.Tensor) -> torch.Tensor:
        if self._projection is None:
            self._projection = linear_projection(self.family)
            if self.config.decoder:
                decoder = DecoderProjection(self.config.decoder)
                try:
                    decoder.load(latents.device)
                    self._projection = decoder
                except Exception as err:
                    log.warning("preview decoder %s could not be loaded (%s); using the linear projection",
                                self.config.decoder, err)
        return self._projection(latents)

    def _publish(self, due: _Due) -> None:
        import torch

        layout: Literal["strip", "grid"]
        with torch.inference_mode():
            x0 = due.x0()
            if x0.dim() == 5:  # video (batch, C, T, h, w): a few latent frames of the first video
                index = torch.tensor(spread(x0.shape[2], self.config.frames), device=x0.device)
                latents, layout = x0[0].index_select(1, index).movedim(1, 0), "strip"
            else:
                latents, layout = x0[:MAX_BATCH], "grid"
            rgb = self._project(latents)
            pixels = (rgb * 255.0).round().to(torch.uint8).cpu().numpy()
        data, width, height = encode(compose(pixels, layout), self.config.format, self.config.max_side)
        if self._closed or self.ctx.cancelled:
            return
        stored = self.ctx.storage.upload(self.bucket, self.path, data, self.content_type)
        self._uploaded = True
        info: dict[str, Any] = {
            **stored.to_json(), "url": versioned(stored.url, f"{self.ctx.job.attempts}-{due.step}"),
            "width": width, "height": height, "step": due.step, "steps": due.steps,
            "updated_at": datetime.now(UTC).isoformat(timespec="milliseconds"), "kept": self.config.keep,
        }
        if layout == "strip":
            info["frames"] = len(pixels)
        with self._cond:
            if self._closed:
                return
            self.published += 1
        self.ctx.set_preview(info)


def versioned(url: str, version: str) -> str:
    """The same object under a new URL each time, so no browser or CDN cache shows an old preview."""
    return f"{url}{'&' if '?' in url else '?'}v={version}"


@contextmanager
def live_preview(ctx: JobContext, settings: Settings, family: Family) -> Iterator[LivePreview]:
    """A job's previews for the span of its denoising. A job that fails or is canceled removes its
    preview; one whose lease was lost or whose worker stops leaves it, since the job is another
    worker's now (or will be) and it writes the same object."""
    preview = LivePreview(ctx, PreviewConfig.of(settings, family), family)
    try:
        yield preview
    except BaseException as exc:
        handed_on = isinstance(exc, JobLeaseLost | WorkerStopping)
        preview.close(keep_object=handed_on, clear_row=False)
        raise
    preview.close(keep_object=preview.config.keep)
