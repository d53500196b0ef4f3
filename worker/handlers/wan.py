"""Handler `wan`: WAN 2.1 text-to-video and reference-conditioned video via diffusers (job types
`image_fast`, `image_high`, `video_fast`, `video_high` and the four `*7b_*_enhanced`; seed 002).

Sizes and lengths are normalised to what the model takes and recorded: width and height to
multiples of 16 (VAE 8x times patch 2), frames to 4k+1 (the VAE compresses time 4x after the
first frame; seed 002's 83 becomes 81). `frame_num` 1 is an image job: the single frame is saved as
a PNG. A clip is an MP4 (H.264, yuv420p, faststart) with a PNG thumbnail of its first frame.

Reference modes (seed 002: `config.image | first_frame | last_frame`, falling back to
`metadata.reference_image_url | start_reference_url | end_reference_url`) and who serves them:

    mode    WanVACEPipeline (1.3B family, wan_vace_model)       WanImageToVideoPipeline (wan_i2v_model)
    none    - (WanPipeline, wan_model)                           -
    single  reference_images=[image]  (subject/style reference)  I2V checkpoint: image= (first frame)
    start   first frame given, mask black there, white elsewhere I2V checkpoint: image=
    end     last frame given, likewise                           -
    both    first and last frames given                          FLF2V checkpoint: image=, last_image=

VACE is preferred when configured. A mode nobody on this worker serves fails with
MODEL_UNAVAILABLE, a first/last frame on a one-frame job with INVALID_INPUT: a reference is never
dropped silently. The VACE and I2V pipelines are loaded on the first job that needs them and share
the T2V pipeline's UMT5 text encoder and VAE (identical across the Wan 2.1 family; checked by
config), so a second model costs only its transformer. The VAE runs in float32, as Wan's authors
recommend; the transformer and text encoder in the configured dtype (bfloat16 on GPU). Prompts are
always encoded to 512 tokens: the I2V attention splits image from text context by that length and
would silently lose the image with anything shorter.

`enhance_prompt` (true in the `*_enhanced` types) first rewrites the prompt with the chat model
of this worker process (the `chat` handler, loaded if it is registered but idle), seeded with the
job's seed so the result is reproducible; `enhanced_prompt` is stored in the row as soon as it
exists and in the result. Without a chat handler in this worker such a job fails with
MODEL_UNAVAILABLE.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

from pydantic import Field, field_validator

from worker.config import Settings
from worker.estimate import WAN_PRIORS, DiffusionEstimate, StageHistory, work_units
from worker.handlers.base import MODEL_LOAD_LOCK, Handler, JobContext
from worker.handlers.diffusion import (
    STAGE_ENCODING,
    STAGE_LOADING,
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
    resolve_device,
    resolve_dtype,
    vae_tiling,
)
from worker.jobs import ErrorCode, Job, JobError, VideoConfig, VideoPayload
from worker.media import (
    ReferenceLimits,
    ReferenceMode,
    References,
    ReferenceSources,
    encode_mp4,
    encode_png,
    fit_image,
    load_references,
    thumbnail_png,
)
from worker.preview import live_preview

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

log = logging.getLogger(__name__)

SIZE_MULTIPLE = 16  # VAE 8x spatial compression times the transformer's 2x2 patches
TEXT_TOKENS = 512  # UMT5 context WAN was trained with; WanAttnProcessor hard-codes it for I2V
STAGE_ENHANCING = "enhancing"
METADATA_CONFIG_KEYS = ("seed", "negative_prompt")

# The chat_enhance type's WAN prompt and sampling (sql/migrations/..._job_queue.sql), used when the
# job type names none: a `*_enhanced` job may set `enhance_system_prompt` in its config.
ENHANCE_SYSTEM_PROMPT = (
    "You rewrite short video prompts into detailed WAN 2.1 video prompts: subject, motion, camera movement, "
    "setting, lighting and style in one paragraph under 120 words. Reply with the prompt only."
)
ENHANCE_SAMPLING = {"max_tokens": 200, "temperature": 0.7, "top_p": 0.9}

# Progress bar: enhancing 1-5 %, encoding 6 %, denoising 8-92 %, decoding at 92 %, uploading 95-99 %.
DENOISE_START, DENOISE_END, UPLOAD_START = 0.08, 0.92, 0.95


def normalize_size(value: int) -> int:
    """Nearest multiple of 16, ties down: 480 -> 480, 500 -> 496, 504 -> 496, 1000 -> 992."""
    return max(SIZE_MULTIPLE, (value + SIZE_MULTIPLE // 2 - 1) // SIZE_MULTIPLE * SIZE_MULTIPLE)


def normalize_frames(value: int) -> int:
    """Nearest 4k+1, ties down: 83 -> 81, 16 -> 17, 1 -> 1."""
    return 4 * (value // 4) + 1


@cache
def payload_model(limits: Limits) -> type[VideoPayload]:
    """The payload model for a model's limits: jobs.VideoPayload itself for every real checkpoint."""
    if limits == Limits():
        return VideoPayload
    min_frames = limits.min_frames

    class ModelVideoConfig(VideoConfig):
        width: int = Field(ge=limits.min_side, le=1280)
        height: int = Field(ge=limits.min_side, le=1280)
        steps: int = Field(ge=limits.min_steps, le=50)

        @field_validator("frame_num")
        @classmethod
        def image_or_clip(cls, v: int) -> int:
            if 1 < v < min_frames:
                raise ValueError(f"is 1 for an image or {min_frames}-121 frames for a video")
            return v

    class ModelVideoPayload(VideoPayload):
        config: ModelVideoConfig

    return ModelVideoPayload


@dataclass(frozen=True)
class WanRequest:
    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    frames: int
    fps: int
    steps: int
    guidance_scale: float
    seed: int
    solver: str
    shift: float
    mode: ReferenceMode
    enhance: bool
    enhance_system_prompt: str | None
    requested: dict[str, int] = field(default_factory=dict)

    @property
    def is_image(self) -> bool:
        return self.frames == 1


def route(mode: ReferenceMode, frames: int, vace: bool, i2v_kind: str | None) -> str:
    """Which pipeline serves a reference mode: t2v | vace | i2v | flf2v, else a JobError."""
    if mode == "none":
        return "t2v"
    if frames == 1 and mode in ("start", "end", "both"):
        raise JobError(ErrorCode.INVALID_INPUT, f"reference mode {mode!r} (first/last frame) needs a video: "
                                                "frame_num 1 takes at most a single reference image")
    if vace:
        return "vace"
    if i2v_kind == "i2v" and mode in ("single", "start"):
        return "i2v"
    if i2v_kind == "flf2v" and mode == "both":
        return "flf2v"
    served = {"i2v": "single and start", "flf2v": "both"}.get(i2v_kind or "", "none")
    raise JobError(ErrorCode.MODEL_UNAVAILABLE,
                   f"reference mode {mode!r} is not served by this worker: no WAN VACE model is configured "
                   f"(wan_vace_model) and its I2V model serves {served}")


class ModelMemory(Protocol):
    """What the WAN handler needs of worker.memory.MemoryManager (not imported: handlers stay light)."""

    def manages(self, name: str, handler: Any) -> bool: ...

    def use(self, name: str, on_load: Callable[[], None] | None = None) -> AbstractContextManager[Any]: ...


class _EnhanceContext:
    """The job's context as the chat model sees it: its progress lands in the enhancing band."""

    def __init__(self, ctx: JobContext, start: float, end: float) -> None:
        self.ctx, self.start, self.end = ctx, start, end

    @property
    def cancelled(self) -> bool:
        return self.ctx.cancelled

    def check(self) -> None:
        self.ctx.check()

    def progress(self, fraction: float, stage: str | None = None, partial: dict[str, Any] | None = None) -> None:
        self.ctx.progress(self.start + (self.end - self.start) * min(1.0, max(0.0, fraction)), STAGE_ENHANCING)


class WanHandler:
    """Handler `wan`. Cheap to construct: `load()` imports torch/diffusers and loads the T2V model."""

    def __init__(self, settings: Settings | None = None, *, model: str | None = None,
                 vace_model: str | None = None, i2v_model: str | None = None, chat: Handler | None = None) -> None:
        self.settings = settings or Settings()
        self.source = str(model or self.settings.wan_model)
        self.vace_source = (vace_model if vace_model is not None else self.settings.wan_vace_model) or None
        self.i2v_source = (i2v_model if i2v_model is not None else self.settings.wan_i2v_model) or None
        self.chat = chat
        self._peers: Mapping[str, Handler] = {}
        self.pipes: dict[str, Any] = {}  # t2v, vace, i2v|flf2v
        self.limits = Limits.of_model(self.source)  # known before loading: jobs are validated before any load
        self.info: dict[str, Any] = {}
        self.device: Any = None
        self.dtype: Any = None
        self._i2v_kind: str | None = None
        self._schedulers: dict[tuple[str, str, float], Any] = {}
        self._unreported_load = 0.0
        self._lock = threading.Lock()
        self.memory: ModelMemory | None = None
        self.stage_history = StageHistory()  # seconds per unit of work of its stages: the jobs' estimates

    def connect(self, handlers: Mapping[str, Handler]) -> None:
        """The worker's handlers: its `chat` handler, if any, serves prompt enhancement (looked up
        when needed, so a chat handler replaced after start-up is the one used)."""
        self._peers = handlers

    def attach_memory(self, memory: ModelMemory) -> None:
        """The worker's memory manager: the chat model for enhancement is loaded (and kept while in
        use) through it, so an evicted chat model comes back within the budget."""
        self.memory = memory

    # -- loading ------------------------------------------------------------------------

    @property
    def model_key(self) -> str:
        """The model this handler serves, as the memory manager and the workers row name it."""
        return self.source

    def modules(self) -> list[Any]:
        """The torch modules of every loaded pipeline (shared encoders and VAE once): what the memory manager
        measures."""
        import torch

        pipes = list(self.pipes.values())
        found = {id(c): c for pipe in pipes for c in pipe.components.values() if isinstance(c, torch.nn.Module)}
        return list(found.values())

    def unload(self) -> None:
        """Drop every pipeline (the memory manager evicts them); the next job loads T2V again, a reference job
        its VACE/I2V pipeline."""
        with self._lock:
            self.pipes = {}
            self._schedulers.clear()

    def load(self) -> None:
        with self._lock, MODEL_LOAD_LOCK:
            if "t2v" in self.pipes:
                return
            started = time.perf_counter()
            try:
                self._load_t2v()
            except Exception as err:
                self.pipes.clear()
                raise load_error("WAN model", self.source, err) from err
            self._unreported_load += time.perf_counter() - started
            log.info("WAN %s loaded on %s in %.1fs", self.source, self.device, time.perf_counter() - started)

    def _load_t2v(self) -> None:
        import torch
        from diffusers import AutoencoderKLWan, WanPipeline

        quiet_libraries()
        self.device = resolve_device(self.settings.diffusion_device)
        self.dtype = resolve_dtype(self.settings.diffusion_dtype, self.device)
        vae = AutoencoderKLWan.from_pretrained(self.source, subfolder="vae", dtype=torch.float32)
        pipe = WanPipeline.from_pretrained(self.source, vae=vae, dtype=self.dtype)
        place(pipe, self.device, self.settings)
        self.pipes["t2v"] = pipe
        self.limits = Limits.of_model(self.source)
        self.info = model_info(self.source, self.device, self.dtype, self.limits)

    def adopt(self, pipe: Any, label: str = "in-memory") -> None:
        """Serve text-to-video with a pipeline built elsewhere (the benchmark builds full-size ones)."""
        with self._lock:
            pipe.set_progress_bar_config(disable=True)
            self.source, self.device, self.dtype = label, pipe.device, pipe.transformer.dtype
            self.pipes = {"t2v": pipe}
            self.limits = Limits.of_model(label)
            self.info = model_info(label, self.device, self.dtype, self.limits)

    def i2v_kind(self) -> str | None:
        """i2v or flf2v, from the configured I2V checkpoint's transformer config (FLF2V has
        positions for two images' CLIP tokens); None without one. Reads a config, no weights."""
        if self.i2v_source is None:
            return None
        if self._i2v_kind is None:
            from diffusers import WanTransformer3DModel

            try:
                config = WanTransformer3DModel.load_config(self.i2v_source, subfolder="transformer")
            except Exception as err:
                raise load_error("WAN I2V model", self.i2v_source, err) from err
            self._i2v_kind = "flf2v" if config.get("pos_embed_seq_len") else "i2v"
        return self._i2v_kind

    def _pipeline(self, kind: str, ctx: JobContext) -> Any:
        if kind in self.pipes:
            return self.pipes[kind]
        with self._lock, MODEL_LOAD_LOCK:
            if kind in self.pipes:
                return self.pipes[kind]
            source = self.vace_source if kind == "vace" else self.i2v_source
            assert source is not None
            ctx.progress(0.02, STAGE_LOADING)
            started = time.perf_counter()
            try:
                pipe = self._load_reference_pipeline(kind, source)
            except Exception as err:
                free_memory()
                raise load_error(f"WAN {kind.upper()} model", source, err) from err
            self.pipes[kind] = pipe
            self._unreported_load += time.perf_counter() - started
            log.info("WAN %s %s loaded in %.1fs", kind, source, time.perf_counter() - started)
            return pipe

    def _load_reference_pipeline(self, kind: str, source: str) -> Any:
        import torch
        from diffusers import AutoencoderKLWan, WanImageToVideoPipeline, WanVACEPipeline

        base = self.pipes["t2v"]
        shared: dict[str, Any] = {}
        for name in ("text_encoder", "vae"):
            if _same_config(self.source, source, name):
                shared[name] = getattr(base, name)
        if "text_encoder" in shared:
            shared["tokenizer"] = base.tokenizer
        if "vae" not in shared:
            shared["vae"] = AutoencoderKLWan.from_pretrained(source, subfolder="vae", dtype=torch.float32)
        if kind == "vace":
            pipe = WanVACEPipeline.from_pretrained(source, dtype=self.dtype, **shared)
        else:
            from transformers import CLIPVisionModel

            encoder = CLIPVisionModel.from_pretrained(source, subfolder="image_encoder", dtype=torch.float32)
            pipe = WanImageToVideoPipeline.from_pretrained(source, image_encoder=encoder, dtype=self.dtype, **shared)
        place(pipe, self.device, self.settings)
        return pipe

    # -- a job --------------------------------------------------------------------------

    prepare_fetches = True  # prepare() downloads reference images: the worker runs it on its own thread

    def prepare(self, job: Job, ctx: JobContext) -> None:
        """Validate the job and fetch its reference frames, holding no model: the worker calls this before
        the load, so an invalid job never loads a model and a slow reference URL holds no GPU."""
        request = self.parse(job)  # INVALID_INPUT here, before any model work
        ctx.prepared = (request, load_references(job, ctx.storage, ReferenceLimits.from_settings(self.settings)))

    def run(self, job: Job, ctx: JobContext) -> dict[str, Any]:
        if ctx.prepared is None:
            self.prepare(job, ctx)
        request, references = ctx.prepared
        self.load()
        kind = route(request.mode, request.frames, self.vace_source is not None, self.i2v_kind())
        timer = Timer()
        load_seconds, self._unreported_load = self._unreported_load, 0.0

        ctx.estimate(self._expected_seconds(request))  # from the stages (StepProgress), not the progress rate
        ctx.progress(0.01, STAGE_ENCODING)
        enhancement = self._enhance(ctx, request) if request.enhance else None
        prompt = enhancement["enhanced_prompt"] if enhancement else request.prompt
        partial = {"enhanced_prompt": prompt} if enhancement else {}
        timer.lap("enhance")

        ctx.progress(0.06, STAGE_ENCODING, partial or None)
        pipe = self._pipeline(kind, ctx)
        load_seconds += self._unreported_load
        self._unreported_load = 0.0
        timer.lap("load_reference_model")
        embeds = self._encode(pipe, prompt, request)
        timer.lap("encode")

        frames, progress = self._generate(job, ctx, pipe, kind, request, embeds, references, partial)
        timer.add("denoise", progress.denoise_seconds)
        timer.add("decode", progress.decode_seconds)
        timer.lap("generate")

        ctx.progress(UPLOAD_START, STAGE_UPLOADING, partial or None)
        assets, media_seconds = self._publish(ctx, request, frames, prompt)
        timer.add("encode_media", media_seconds)
        timer.lap("upload")
        progress.record_upload(timer.stages["upload"])

        duration = round(request.frames / request.fps, 4)
        result: dict[str, Any] = {
            "assets": assets,
            "frames": request.frames,
            "frame_num": request.frames,
            "fps": request.fps,
            "duration": duration,
            "width": request.width,
            "height": request.height,
            "requested": request.requested,
            "seed": request.seed,
            "steps": request.steps,
            "guidance_scale": request.guidance_scale,
            "sample_solver": request.solver,
            "sample_shift": request.shift,
            "prompt": request.prompt,
            "negative_prompt": request.negative_prompt,
            "enhanced_prompt": enhancement["enhanced_prompt"] if enhancement else None,
            "enhancement": {k: v for k, v in enhancement.items() if k != "enhanced_prompt"} if enhancement else None,
            "reference_mode": request.mode,
            "pipeline": kind,
            "content_type": "image" if request.is_image else "video",
            "job_type": job.job_type,
            "timings": {"load": round(load_seconds, 4), **timer.stages, "total": timer.total()},
            "generation_time": round(sum(timer.stages.get(k, 0.0) for k in ("enhance", "encode", "generate")), 4),
            "model_info": {**self.info, "pipeline_model": self._source_of(kind)},
        }
        if request.is_image:
            result.update(images=[assets[0]["url"]], image_url=assets[0]["url"], image_count=1)
        else:
            result.update(videos=[assets[0]["url"]], video_url=assets[0]["url"], thumbnail_url=assets[1]["url"],
                          video_info={"frames": request.frames, "fps": request.fps, "duration_seconds": duration,
                                      "width": request.width, "height": request.height})
        return result

    def _source_of(self, kind: str) -> str:
        source = {"t2v": self.source, "vace": self.vace_source}.get(kind, self.i2v_source) or ""
        return Path(source).name if Path(source).exists() else source

    def parse(self, job: Job) -> WanRequest:
        payload = job.payload_object()
        config_in = layered_config(job, METADATA_CONFIG_KEYS)
        given = job.section("config")
        if payload.get("negative_prompt") is not None and "negative_prompt" not in given:
            config_in["negative_prompt"] = payload["negative_prompt"]
        parsed = job.parse(payload_model(self.limits), config_in, self.limits.floors())
        config = parsed.config
        content = job.type_info.content_type if job.type_info else None
        if content == "image" and config.frame_num != 1:
            raise JobError(ErrorCode.INVALID_INPUT, f"{job.job_type} makes an image: frame_num must be 1, "
                                                    f"not {config.frame_num}")
        width, height, frames = normalize_size(config.width), normalize_size(config.height), normalize_frames(
            config.frame_num)
        return WanRequest(
            prompt=parsed.prompt, negative_prompt=config.negative_prompt, width=width, height=height,
            frames=frames, fps=config.fps, steps=config.steps, guidance_scale=config.guidance_scale,
            seed=job_seed(job, config.seed), solver=config.sample_solver, shift=config.sample_shift,
            mode=ReferenceSources.of(job).mode, enhance=config.enhance_prompt,
            enhance_system_prompt=config.enhance_system_prompt,
            requested={"width": config.width, "height": config.height, "frame_num": config.frame_num},
        )

    # -- enhancement --------------------------------------------------------------------

    def _enhance(self, ctx: JobContext, request: WanRequest) -> dict[str, Any]:
        chat = self.chat if self.chat is not None else self._peers.get("chat")
        if chat is None:
            raise JobError(ErrorCode.MODEL_UNAVAILABLE,
                           "prompt enhancement needs the chat model in this worker process (run it with the chat "
                           "handler), or send enhance_prompt false")
        memory = self.memory
        if memory is not None and memory.manages("chat", chat):
            # the chat handler's own instance, loaded within the budget and not evicted while it enhances
            with memory.use("chat", on_load=lambda: ctx.progress(0.01, STAGE_LOADING)):
                return self._enhance_with(chat, ctx, request)
        if getattr(chat, "model", None) is None:
            ctx.progress(0.01, STAGE_LOADING)
            try:
                with MODEL_LOAD_LOCK:
                    chat.load()
            except Exception as err:
                raise load_error("chat model", str(getattr(chat, "source", "?")), err) from err
        return self._enhance_with(chat, ctx, request)

    def _enhance_with(self, chat: Handler, ctx: JobContext, request: WanRequest) -> dict[str, Any]:
        from worker.handlers.chat import enhance_prompt

        ctx.progress(0.01, STAGE_ENHANCING)
        out = enhance_prompt(
            cast(Any, chat).model, request.prompt, "wan", system_prompts={"wan": ENHANCE_SYSTEM_PROMPT},
            system_prompt=request.enhance_system_prompt, seed=request.seed,
            ctx=cast(JobContext, _EnhanceContext(ctx, 0.01, 0.05)), **ENHANCE_SAMPLING,
        )
        enhanced = printable(out["enhanced_prompt"])[:4000]
        if not enhanced.strip():
            raise JobError(ErrorCode.GENERATION_FAILED, "prompt enhancement returned an empty prompt")
        return {"enhanced_prompt": enhanced, "system_prompt_used": out["system_prompt_used"],
                "finish_reason": out["finish_reason"], "usage": out["usage"],
                "generate_seconds": out["generate_seconds"]}

    # -- generation ---------------------------------------------------------------------

    def _scheduler(self, pipe: Any, solver: str, shift: float) -> Any:
        from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

        key = (type(pipe).__name__, solver, shift)
        if key not in self._schedulers:
            cls = UniPCMultistepScheduler if solver == "unipc" else DPMSolverMultistepScheduler
            base = {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}
            self._schedulers[key] = cls.from_config({**base, "flow_shift": shift, "use_flow_sigmas": True,
                                                     "prediction_type": "flow_prediction"})
        return self._schedulers[key]

    def _encode(self, pipe: Any, prompt: str, request: WanRequest) -> tuple[Any, Any]:
        import torch

        with torch.inference_mode():
            return pipe.encode_prompt(
                prompt=prompt, negative_prompt=request.negative_prompt,
                do_classifier_free_guidance=request.guidance_scale > 1.0, num_videos_per_prompt=1,
                max_sequence_length=TEXT_TOKENS, device=pipe._execution_device,
            )

    def _expected_seconds(self, request: WanRequest) -> float | None:
        """The whole job from this handler's earlier ones, before anything of it is measured (no enhancement)."""
        work = work_units(request.width, request.height, frames=request.frames)
        return DiffusionEstimate(self.stage_history, WAN_PRIORS, work).before_start(request.steps)

    def _generate(self, job: Job, ctx: JobContext, pipe: Any, kind: str, request: WanRequest,
                  embeds: tuple[Any, Any], references: References,
                  partial: dict[str, Any]) -> tuple[np.ndarray, StepProgress]:
        import torch

        estimate = DiffusionEstimate(self.stage_history, WAN_PRIORS,
                                     work_units(request.width, request.height, frames=request.frames))
        kwargs: dict[str, Any] = {
            "prompt_embeds": embeds[0], "negative_prompt_embeds": embeds[1],
            "height": request.height, "width": request.width, "num_frames": request.frames,
            "num_inference_steps": request.steps, "guidance_scale": request.guidance_scale,
            "generator": generators([request.seed])[0],
            "output_type": "np", "max_sequence_length": TEXT_TOKENS,
            **self._conditioning(kind, request, references),
        }
        pipe.scheduler = self._scheduler(pipe, request.solver, request.shift)
        # The preview is removed (unless kept) once denoised; its frames are a few latent frames side by side.
        with live_preview(ctx, self.settings, "wan") as preview:
            progress = StepProgress(ctx, start=DENOISE_START, end=DENOISE_END, steps=request.steps, partial=partial,
                                    estimate=estimate, preview=preview)
            kwargs["callback_on_step_end"] = progress
            progress.begin_call()
            try:
                with (vae_tiling(pipe, self.settings.diffusion_vae_tiling or had_oom(job)), decode_retry_tiled(pipe),
                      torch.inference_mode()):
                    frames = pipe(**kwargs).frames[0]
            except Exception as err:
                if not is_oom(err):
                    raise
                note_oom(job)  # the loop's in-process retry then starts tiled
                free_memory()
                raise oom_error(f"at {request.width}x{request.height}, {request.frames} frames") from err
            progress.end_call()
        return frames, progress

    def _conditioning(self, kind: str, request: WanRequest, refs: References) -> dict[str, Any]:
        from PIL import Image

        size = (request.width, request.height)

        def fit(image: Image.Image | None) -> Image.Image | None:
            return fit_image(image, *size) if image is not None else None

        if kind == "t2v":
            return {}
        if kind == "vace":
            if refs.mode == "single":
                return {"reference_images": [fit(refs.single)]}
            # Frames to keep are given and masked black; the rest is mid-gray and white: generate.
            gray, keep, generate = Image.new("RGB", size, (128, 128, 128)), Image.new("L", size, 0), Image.new(
                "L", size, 255)
            video, mask = [gray] * request.frames, [generate] * request.frames
            if refs.start is not None:
                video[0], mask[0] = fit(refs.start), keep
            if refs.end is not None:
                video[-1], mask[-1] = fit(refs.end), keep
            return {"video": video, "mask": mask}
        first = refs.start if refs.start is not None else refs.single
        out = {"image": fit(first)}
        if kind == "flf2v":
            out["last_image"] = fit(refs.end)
        return out

    # -- output -------------------------------------------------------------------------

    def _publish(self, ctx: JobContext, request: WanRequest, frames: np.ndarray,
                 prompt: str) -> tuple[list[dict[str, Any]], float]:
        import numpy as np
        from PIL import Image

        started = time.perf_counter()
        pixels = (np.clip(frames, 0.0, 1.0) * 255.0).round().astype(np.uint8)
        text = {"prompt": prompt, "original_prompt": request.prompt if prompt != request.prompt else None,
                "negative_prompt": request.negative_prompt, "seed": request.seed, "steps": request.steps,
                "guidance_scale": request.guidance_scale, "width": request.width, "height": request.height,
                "frames": request.frames, "model": self.info.get("model"), "software": "ourvidz-worker"}
        first = Image.fromarray(pixels[0])
        if request.is_image:
            data = encode_png(first, compress_level=1, text=text)
            seconds = time.perf_counter() - started
            return [ctx.publish(data, ext="png", content_type="image/png", index=0, seed=request.seed,
                                width=request.width, height=request.height)], seconds
        video = encode_mp4(pixels, request.fps, scratch_dir=ctx.scratch_dir)
        thumb = thumbnail_png(first)
        seconds = time.perf_counter() - started
        assets = [ctx.publish(video, ext="mp4", content_type="video/mp4", index=0, seed=request.seed,
                              width=request.width, height=request.height, frames=request.frames, fps=request.fps)]
        ctx.progress(0.97, STAGE_UPLOADING)
        assets.append(ctx.publish(thumb, ext="thumb.png", content_type="image/png", index=0, kind="thumbnail"))
        return assets, seconds


def printable(text: str) -> str:
    """Model output without control characters: a NUL cannot be stored in a jsonb row at all."""
    return "".join(ch for ch in text if ch in "\n\t" or ch.isprintable()).strip()


def _same_config(source_a: str, source_b: str, subfolder: str) -> bool:
    """Whether two checkpoints' `subfolder` components are configured alike (the Wan 2.1 family
    shares UMT5-XXL and its VAE), so one loaded copy can serve both."""
    from diffusers import AutoencoderKLWan

    def config(source: str) -> dict[str, Any] | None:
        try:
            raw = AutoencoderKLWan.load_config(source, subfolder=subfolder)
        except Exception:
            return None
        ignored = {"architectures", "transformers_version", "torch_dtype", "dtype"}
        return {k: v for k, v in dict(raw).items() if not k.startswith("_") and k not in ignored}

    a = config(source_a)
    return a is not None and a == config(source_b)
