"""Handler `sdxl`: Stable Diffusion XL text-to-image and reference image-to-image via diffusers
(job types `sdxl_image_fast`, `sdxl_image_high`; seeds 000, 002, 004).

A job is one batch: `num_images` (1, 3 or 6) images generated together, image i from its own
generator seeded `seed + i`, so any image can be reproduced alone with its recorded seed. The
prompt is encoded once (stage `encoding`), the batch is denoised with one progress update per step
(`denoising`), decoded (`decoding`) and each image published as a PNG whose text chunks carry
prompt, seed, steps, guidance and size (`uploading`).

Reference image (seed 002: `metadata.reference_image_url` or `config.image`, `reference_type`,
`reference_strength` 0.1-1.0) runs the image-to-image pipeline built with `from_pipe` on the
loaded components: same UNet, VAE and text encoders, no second copy in memory. The reference is
scaled and center-cropped to the requested size, noised and denoised for a fraction of the steps;
the fraction (diffusers' `strength`, 1 = ignore the reference) is

    denoising_strength = 1 - reference_strength * weight[reference_type]

    composition  weight 0.75  keeps layout and large shapes (strength 1.0 -> only 25 % re-drawn)
    character    weight 0.60  keeps the subject's silhouette, pose and colours, re-draws details
    style        weight 0.45  keeps palette, lighting and texture; the prompt may change the layout

so a stronger reference or a more structural type keeps more of the image. Img2img cannot separate
"style" from "content" the way an IP-Adapter can; that would be the next step for style and
character references.

Out of GPU memory: the memory is freed and the batch retried once in halves (same seeds, so the
same images); a single image that does not fit fails with OOM_ERROR (retryable), and the retried
attempt starts with batches of one and a tiled VAE decode.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from worker.config import Settings
from worker.estimate import SDXL_PRIORS, DiffusionEstimate, StageHistory, work_units
from worker.handlers.base import MODEL_LOAD_LOCK, JobContext
from worker.handlers.diffusion import (
    STAGE_ENCODING,
    STAGE_UPLOADING,
    Limits,
    StepProgress,
    Timer,
    decode_retry_tiled,
    free_memory,
    generators,
    had_oom,
    is_oom,
    job_seed,
    layered_config,
    load_error,
    model_info,
    note_oom,
    oom_error,
    place,
    quiet_libraries,
    quiet_logger,
    resolve_device,
    resolve_dtype,
    vae_tiling,
)
from worker.jobs import ErrorCode, ImageConfig, ImagePayload, Job, JobError
from worker.media import ReferenceLimits, ReferenceSources, encode_png, fit_image, load_references
from worker.preview import LivePreview, live_preview

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

REFERENCE_WEIGHTS = {"composition": 0.75, "character": 0.60, "style": 0.45}
# Seed 002 sends these in `metadata`; a payload `config` value wins over them, they over the type's defaults.
METADATA_CONFIG_KEYS = ("seed", "num_images", "negative_prompt", "reference_type", "reference_strength")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")

# zlib level 1: about half the time of PIL's default 6 for files ~10 % larger; at 1024x1024 the
# encoding is a visible share of a ~1.5 s GPU job.
PNG_LEVEL = 1

# Progress bar: encoding up to 5 %, denoising 5-90 %, decoding at 90 %, uploading 92-99 %.
DENOISE_START, DENOISE_END, UPLOAD_START = 0.05, 0.90, 0.92


@cache
def payload_model(limits: Limits) -> type[ImagePayload]:
    """The payload model for a model's limits: jobs.ImagePayload itself for every real checkpoint."""
    if limits == Limits():
        return ImagePayload

    class ModelImageConfig(ImageConfig):
        width: int = Field(ge=limits.min_side, le=1024)
        height: int = Field(ge=limits.min_side, le=1024)
        steps: int = Field(ge=limits.min_steps, le=50)

    class ModelImagePayload(ImagePayload):
        config: ModelImageConfig

    return ModelImagePayload


@dataclass(frozen=True)
class SdxlRequest:
    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    steps: int
    guidance_scale: float
    num_images: int
    seed: int
    reference: str | None
    reference_type: str
    reference_strength: float

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.num_images)]

    @property
    def denoising_strength(self) -> float:
        """img2img strength, at least one step's worth so the pipeline always denoises."""
        strength = 1.0 - self.reference_strength * REFERENCE_WEIGHTS[self.reference_type]
        return round(max(strength, 1.0 / self.steps), 4)


class SdxlHandler:
    """Handler `sdxl`. Cheap to construct: `load()` imports torch/diffusers and loads the weights."""

    def __init__(self, settings: Settings | None = None, *, model: str | None = None,
                 variant: str | None = None) -> None:
        self.settings = settings or Settings()
        self.source = str(model or self.settings.sdxl_model)
        self.variant = variant if variant is not None else self.settings.sdxl_variant
        self.pipe: Any = None
        self.img2img: Any = None
        self.limits = Limits.of_model(self.source)  # known before loading: jobs are validated before any load
        self.info: dict[str, Any] = {}
        self.load_seconds = 0.0
        self._unreported_load = 0.0
        self._lock = threading.Lock()
        self.stage_history = StageHistory()  # seconds per unit of work of its stages: the jobs' estimates

    # -- loading ------------------------------------------------------------------------

    def load(self) -> None:
        with self._lock, MODEL_LOAD_LOCK:
            if self.pipe is not None:
                return
            started = time.perf_counter()
            try:
                self._load()
            except Exception as err:
                self.pipe = self.img2img = None
                raise load_error("SDXL model", self.source, err) from err
            self.load_seconds = self._unreported_load = time.perf_counter() - started
            log.info("SDXL %s loaded on %s in %.1fs", self.source, self.info.get("device"), self.load_seconds)

    def _load(self) -> None:
        from diffusers import StableDiffusionXLPipeline

        quiet_libraries()
        device = resolve_device(self.settings.diffusion_device)
        dtype = resolve_dtype(self.settings.diffusion_dtype, device)
        path = Path(self.source).expanduser()
        if path.suffix in SINGLE_FILE_SUFFIXES and path.is_file():
            pipe = StableDiffusionXLPipeline.from_single_file(str(path), dtype=dtype)
        else:
            from worker.preload import with_variant  # fp16 where published, else the default weights

            pipe = with_variant(StableDiffusionXLPipeline.from_pretrained, self.source, self.variant, dtype=dtype)
        place(pipe, device, self.settings)
        self._serve(pipe, device, dtype)

    @property
    def model_key(self) -> str:
        """The model this handler serves, as the memory manager and the workers row name it."""
        return self.source

    def modules(self) -> list[Any]:
        """The torch modules of the loaded pipeline (img2img shares them): what the memory manager measures."""
        import torch

        pipe = self.pipe
        return [c for c in pipe.components.values() if isinstance(c, torch.nn.Module)] if pipe is not None else []

    def unload(self) -> None:
        """Drop both pipelines (the memory manager evicts them); the next job loads them again."""
        with self._lock:
            self.pipe = self.img2img = None

    def adopt(self, pipe: Any, label: str = "in-memory") -> None:
        """Serve with a pipeline built elsewhere (the benchmark builds full-size ones from configs)."""
        with self._lock:
            self.source = label
            pipe.set_progress_bar_config(disable=True)
            self._serve(pipe, pipe.device, pipe.unet.dtype)

    def _serve(self, pipe: Any, device: Any, dtype: Any) -> None:
        import torch
        from diffusers import StableDiffusionXLImg2ImgPipeline

        if dtype == torch.bfloat16 and pipe.vae.config.get("force_upcast"):
            # The upcast guards float16's range; bfloat16 has float32's. Left on, img2img would cast
            # the shared VAE to float32 and back on every reference job.
            pipe.vae.register_to_config(force_upcast=False)

        # from_pipe casts the new pipeline to its `dtype` argument, float32 by default, and the
        # modules are shared: without dtype= it would silently up-cast the loaded pipeline too.
        with quiet_logger("diffusers.models.modeling_utils"):  # "should be kept in float32: []" noise
            img2img = StableDiffusionXLImg2ImgPipeline.from_pipe(pipe, dtype=dtype)
        img2img.set_progress_bar_config(disable=True)
        self.pipe, self.img2img = pipe, img2img
        self.limits = Limits.of_model(self.source)
        self.info = {**model_info(self.source, device, dtype, self.limits),
                     "scheduler": type(pipe.scheduler).__name__}

    # -- a job --------------------------------------------------------------------------

    prepare_fetches = True  # prepare() downloads reference images: the worker runs it on its own thread

    def prepare(self, job: Job, ctx: JobContext) -> None:
        """Validate the job and fetch its reference, holding no model: the worker calls this before the
        load, so an invalid job never loads a model and a slow reference URL holds no GPU."""
        request = self.parse(job)  # INVALID_INPUT here, before any model work
        ctx.prepared = (request, self._reference(job, ctx, request))

    def run(self, job: Job, ctx: JobContext) -> dict[str, Any]:
        if ctx.prepared is None:
            self.prepare(job, ctx)
        request, reference = ctx.prepared
        self.load()
        timer = Timer()
        load_seconds, self._unreported_load = self._unreported_load, 0.0

        ctx.estimate(self._expected_seconds(request))  # from the stages (StepProgress), not the progress rate
        ctx.progress(0.01, STAGE_ENCODING)
        embeds = self._encode(request)
        timer.lap("encode")

        images, batches, progress = self._generate_with_retry(job, ctx, request, embeds, reference)
        timer.add("denoise", progress.denoise_seconds)
        timer.add("decode", progress.decode_seconds)
        timer.lap("generate")

        ctx.progress(UPLOAD_START, STAGE_UPLOADING)
        assets = self._publish(ctx, request, images, reference is not None)
        timer.lap("upload")
        progress.record_upload(timer.stages["upload"])

        return {
            "assets": assets,
            "images": [a["url"] for a in assets],
            "image_url": assets[0]["url"],
            "image_count": len(assets),
            "num_images": request.num_images,
            "seed": request.seed,
            "seeds": request.seeds,
            "prompt": request.prompt,
            "negative_prompt": request.negative_prompt,
            "width": request.width,
            "height": request.height,
            "steps": request.steps,
            "guidance_scale": request.guidance_scale,
            "content_type": "image",
            "job_type": job.job_type,
            "reference_mode": "single" if reference is not None else "none",
            "reference": self._reference_info(request, progress) if reference is not None else None,
            "batch_sizes": batches,
            "timings": {"load": round(load_seconds, 4), **timer.stages, "total": timer.total()},
            "generation_time": round(timer.stages.get("encode", 0) + timer.stages.get("generate", 0), 4),
            "model_info": self.info,
        }

    def parse(self, job: Job) -> SdxlRequest:
        config_in = layered_config(job, METADATA_CONFIG_KEYS)
        parsed = job.parse(payload_model(self.limits), config_in, self.limits.floors())
        config = parsed.config
        sources = ReferenceSources.of(job)
        if sources.mode in ("start", "end", "both"):
            raise JobError(ErrorCode.INVALID_INPUT, "SDXL takes one reference image (config.image or "
                                                    "metadata.reference_image_url), not first/last frames")
        return SdxlRequest(
            prompt=parsed.prompt, negative_prompt=parsed.negative_prompt or config.negative_prompt,
            width=config.width, height=config.height, steps=config.steps, guidance_scale=config.guidance_scale,
            num_images=config.num_images, seed=job_seed(job, config.seed), reference=sources.single,
            reference_type=config.reference_type, reference_strength=config.reference_strength,
        )

    def _reference(self, job: Job, ctx: JobContext, request: SdxlRequest) -> Image.Image | None:
        if request.reference is None:
            return None
        refs = load_references(job, ctx.storage, ReferenceLimits.from_settings(self.settings))
        assert refs.single is not None
        return fit_image(refs.single, request.width, request.height)

    def _reference_info(self, request: SdxlRequest, progress: StepProgress) -> dict[str, Any]:
        return {"type": request.reference_type, "strength": request.reference_strength,
                "denoising_strength": request.denoising_strength, "steps_run": progress.per_call,
                "pipeline": "StableDiffusionXLImg2ImgPipeline"}

    def _encode(self, request: SdxlRequest) -> tuple[Any, ...]:
        import torch

        with torch.inference_mode():
            return tuple(self.pipe.encode_prompt(
                prompt=request.prompt, device=self.pipe._execution_device, num_images_per_prompt=1,
                do_classifier_free_guidance=request.guidance_scale > 1.0, negative_prompt=request.negative_prompt,
            ))

    def _expected_seconds(self, request: SdxlRequest) -> float | None:
        """The whole job from this handler's earlier ones, before anything of it is measured."""
        steps = request.steps if request.reference is None else max(1, int(request.steps * request.denoising_strength))
        work = work_units(request.width, request.height, images=request.num_images)
        return DiffusionEstimate(self.stage_history, SDXL_PRIORS, work).before_start(steps)

    def _generate_with_retry(self, job: Job, ctx: JobContext, request: SdxlRequest, embeds: tuple[Any, ...],
                             reference: Image.Image | None) -> tuple[list[Image.Image], list[int], StepProgress]:
        with live_preview(ctx, self.settings, "sdxl") as preview:  # removed (unless kept) once denoised
            return self._generate_fitting(job, ctx, request, embeds, reference, preview)

    def _generate_fitting(self, job: Job, ctx: JobContext, request: SdxlRequest, embeds: tuple[Any, ...],
                          reference: Image.Image | None,
                          preview: LivePreview) -> tuple[list[Image.Image], list[int], StepProgress]:
        frugal = had_oom(job)
        batch = 1 if frugal else request.num_images
        try:
            return self._generate(ctx, request, embeds, reference, batch, frugal, preview)
        except Exception as err:
            if not is_oom(err):
                raise
            free_memory()
            note_oom(job)  # the loop's in-process retry then starts with single images, tiled
            if batch == 1:
                raise oom_error(f"at {request.width}x{request.height}") from err
        smaller = max(1, batch // 2)
        log.warning("job %s: out of memory with a batch of %d; retrying in batches of %d", job.id, batch, smaller)
        try:
            return self._generate(ctx, request, embeds, reference, smaller, True, preview)
        except Exception as err:
            if not is_oom(err):
                raise
            free_memory()
            raise oom_error(f"at {request.width}x{request.height} in batches of {smaller}") from err

    def _generate(self, ctx: JobContext, request: SdxlRequest, embeds: tuple[Any, ...], reference: Any,
                  batch: int, tiled: bool,
                  preview: LivePreview | None = None) -> tuple[list[Image.Image], list[int], StepProgress]:
        import torch

        seeds = request.seeds
        chunks = [seeds[i:i + batch] for i in range(0, len(seeds), batch)]
        steps = request.steps if reference is None else max(1, int(request.steps * request.denoising_strength))
        estimate = DiffusionEstimate(self.stage_history, SDXL_PRIORS,
                                     work_units(request.width, request.height, images=batch), calls=len(chunks))
        progress = StepProgress(ctx, start=DENOISE_START, end=DENOISE_END, steps=steps, calls=len(chunks),
                                estimate=estimate, preview=preview)
        pipe = self.pipe if reference is None else self.img2img
        prompt_embeds, negative_embeds, pooled, negative_pooled = embeds
        images: list[Image.Image] = []

        def repeat(tensor: Any, n: int) -> Any:
            return None if tensor is None else tensor.repeat(n, *([1] * (tensor.dim() - 1)))

        for chunk in chunks:
            n = len(chunk)
            kwargs: dict[str, Any] = {
                "prompt_embeds": repeat(prompt_embeds, n), "negative_prompt_embeds": repeat(negative_embeds, n),
                "pooled_prompt_embeds": repeat(pooled, n), "negative_pooled_prompt_embeds": repeat(negative_pooled, n),
                "num_inference_steps": request.steps, "guidance_scale": request.guidance_scale,
                "generator": generators(chunk), "callback_on_step_end": progress, "output_type": "pil",
            }
            if reference is None:
                kwargs.update(width=request.width, height=request.height)
            else:
                kwargs.update(image=reference, strength=request.denoising_strength)
            progress.begin_call()
            with (vae_tiling(pipe, tiled or self.settings.diffusion_vae_tiling), decode_retry_tiled(pipe),
                  torch.inference_mode(),
                  quiet_logger("diffusers.models.modeling_utils")):  # img2img's per-call VAE upcast notice
                images.extend(pipe(**kwargs).images)
            progress.end_call()
        return images, [len(c) for c in chunks], progress

    def _publish(self, ctx: JobContext, request: SdxlRequest, images: list[Image.Image],
                 referenced: bool) -> list[dict[str, Any]]:
        def encode(item: tuple[Image.Image, int]) -> bytes:
            return encode_png(item[0], compress_level=PNG_LEVEL, text=self._png_text(request, item[1], referenced))

        # zlib releases the GIL: a batch's PNGs are compressed in parallel.
        with ThreadPoolExecutor(max_workers=max(1, min(len(images), os.cpu_count() or 1))) as pool:
            encoded = list(pool.map(encode, zip(images, request.seeds, strict=True)))
        assets = []
        for index, (image, seed, data) in enumerate(zip(images, request.seeds, encoded, strict=True)):
            asset = ctx.publish(data, ext="png", content_type="image/png", index=index,
                                seed=seed, width=image.width, height=image.height)
            assets.append(asset)
            ctx.progress(UPLOAD_START + (0.99 - UPLOAD_START) * (index + 1) / len(images), STAGE_UPLOADING)
        return assets

    def _png_text(self, request: SdxlRequest, seed: int, referenced: bool) -> dict[str, Any]:
        scheduler = self.info.get("scheduler", "")
        parameters = (f"{request.prompt}\n"
                      + (f"Negative prompt: {request.negative_prompt}\n" if request.negative_prompt else "")
                      + f"Steps: {request.steps}, Sampler: {scheduler}, CFG scale: {request.guidance_scale}, "
                        f"Seed: {seed}, Size: {request.width}x{request.height}, Model: {self.info.get('model')}"
                      + (f", Denoising strength: {request.denoising_strength}" if referenced else ""))
        return {"parameters": parameters, "prompt": request.prompt, "negative_prompt": request.negative_prompt,
                "seed": seed, "steps": request.steps, "guidance_scale": request.guidance_scale,
                "width": request.width, "height": request.height, "model": self.info.get("model"),
                "software": "ourvidz-worker"}
