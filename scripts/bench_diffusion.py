#!/usr/bin/env python
"""Diffusion benchmark: seconds per SDXL / WAN job and per denoising step, and what the worker adds
on top of the raw diffusers pipeline call. It prints figures; it is not a test.

    python scripts/bench_diffusion.py                         # CPU, tiny models: overhead per job
    python scripts/bench_diffusion.py --repeat 9 --steps 4
    python scripts/bench_diffusion.py --full --device cuda    # GPU: full-size SDXL and WAN 1.3B, bf16, SDPA
    python scripts/bench_diffusion.py --full --device cuda --compile --only sdxl
    python scripts/bench_diffusion.py --full --dry-run        # build the full-size models on the meta device

Models. Tiny (default): the project's random-weight pipelines of worker.tiny_diffusion, loaded with
from_pretrained as in production. Full (--full): SDXL base 1.0's UNet, VAE and both CLIP text
encoders and WAN 2.1 T2V 1.3B's transformer, VAE and UMT5-XXL encoder, built from the public configs
in configs/ with random weights (nothing is downloaded): bf16 except the WAN VAE (float32, as the
handler loads it), attention through PyTorch SDPA (diffusers' default processors). Tokenizers are the
tiny in-memory ones; prompts are padded to the real lengths (77 and 512 tokens) either way.

Protocol (every figure is the median of --repeat runs after one warm-up run; the ways of running a job
take turns, so a change in the machine's load hits them alike, each run in a fresh thread as in the
worker):
  raw      the pipeline's own __call__ with the job's settings (prompt, size, steps, guidance, seed
           generator, PIL/np output), nothing else
  handler  SdxlHandler/WanHandler.run(job, ctx) on the same pipeline: separate prompt encoding, the
           per-step progress callback (production throttle 0.5 s, writes to a no-op), PNG/MP4 + thumbnail
           encoding and the upload to LocalStorage in a temp folder
  worker   (tiny models only) the same jobs through a real Worker on the embedded Postgres, one at a
           time: claim to finish from the row (finished_at - started_at); claim, progress rows and
           the finish are included, queue wait is not
  step     denoising seconds per step, from the step callback's timestamps in the handler runs
Overhead = handler (or worker) median - raw median, also as a percentage of raw. With tiny models the
raw call takes milliseconds, so the absolute overhead is the figure that carries over to real models.
`media` times PNG and MP4 encoding at production sizes (1024x1024; 81 frames of 480x832).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
PROMPT = "a lighthouse on a cliff at dusk, waves, cinematic light"


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def timed(fn: Callable[[], Any], repeat: int) -> list[float]:
    fn()  # warm-up (first-call kernels, allocator, torch.compile)
    out = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        out.append(time.perf_counter() - started)
    return out


def in_thread(fn: Callable[[], float]) -> float:
    out: list[float] = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    thread.join()
    if not out:
        raise RuntimeError("the timed run failed (see the traceback above)")
    return out[0]


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


# --- full-size models from configs -------------------------------------------------------------


def _config(name: str) -> dict[str, Any]:
    return json.loads((CONFIGS / name).read_text())


@contextlib.contextmanager
def building(device: str, dtype: Any, meta: bool) -> Iterator[None]:
    """Parameters created directly on the device in the target dtype (no float32 CPU copy first)."""
    import torch

    if meta:
        from accelerate import init_empty_weights

        with init_empty_weights():
            yield
        return
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def full_sdxl(device: str, meta: bool = False) -> Any:
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from worker.tiny_diffusion import clip_tokenizer

    with building(device, torch.bfloat16, meta):
        unet = UNet2DConditionModel.from_config(_config("sdxl-base-1.0/unet.json"))
        vae = AutoencoderKL.from_config(_config("sdxl-base-1.0/vae.json"))
        text_encoder = CLIPTextModel(CLIPTextConfig(**_config("sdxl-base-1.0/text_encoder.json")))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**_config("sdxl-base-1.0/text_encoder_2.json")))
    scheduler = EulerDiscreteScheduler.from_config(_config("sdxl-base-1.0/scheduler.json"))
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(), unet=unet,
                                     scheduler=scheduler)


def full_wan(device: str, meta: bool = False) -> Any:
    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from worker.tiny_diffusion import umt5_tokenizer

    with building(device, torch.bfloat16, meta):
        transformer = WanTransformer3DModel.from_config(_config("wan2.1-t2v-1.3b/transformer.json"))
        text_encoder = UMT5EncoderModel(UMT5Config(**_config("wan2.1-t2v-1.3b/text_encoder.json")))
        text_encoder.encoder.embed_tokens = text_encoder.shared  # one embedding table, as in the checkpoint
    with building(device, torch.float32, meta):
        vae = AutoencoderKLWan.from_config(_config("wan2.1-t2v-1.3b/vae.json"))
    scheduler = UniPCMultistepScheduler.from_config(_config("wan2.1-t2v-1.3b/scheduler.json"))
    return WanPipeline(tokenizer=umt5_tokenizer(), text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                       transformer=transformer)


def dry_run() -> None:
    """Build both full-size pipelines without memory: checks configs/ and prints parameter counts."""
    for name, build in (("SDXL base 1.0", full_sdxl), ("WAN 2.1 T2V 1.3B", full_wan)):
        pipe = build("cpu", meta=True)
        parts = {k: sum(p.numel() for p in v.parameters()) / 1e6 for k, v in pipe.components.items()
                 if hasattr(v, "parameters")}
        print(f"{name}: " + ", ".join(f"{k} {v:,.1f}M" for k, v in parts.items()))


# --- jobs ---------------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, home: Path) -> None:
        from worker.config import Settings
        from worker.storage import LocalStorage

        self.args = args
        self.home = home
        self.storage = LocalStorage(home / "storage")
        self.settings = Settings(home=home, diffusion_device=args.device, progress_interval=0.5)
        self.rows: list[dict[str, Any]] = []

    def job(self, job_type: str, config: dict[str, Any], content: str) -> Any:
        from worker.jobs import Job, JobType

        now = datetime.now(UTC)
        info = JobType(name=job_type, queue="bench", handler="bench", content_type=content, bucket=job_type)
        return Job(id=uuid.uuid4(), user_id=None, job_type=job_type, queue="bench",
                   payload={"prompt": PROMPT, "config": config},
                   priority=0, attempts=1, max_attempts=3, created_at=now, run_at=now, type_info=info)

    def handler_run(self, handler: Any, job_type: str, config: dict[str, Any], content: str,
                    per_step: list[float]) -> float:
        from worker.handlers.base import JobContext

        job = self.job(job_type, config, content)
        ctx = JobContext(job, self.storage, lambda *_: False, self.settings.progress_interval)
        started = time.perf_counter()
        result = handler.run(job, ctx)
        sync()
        seconds = time.perf_counter() - started
        per_step.append(result["timings"]["denoise"] / max(1, result["steps"]))
        return seconds

    def compare(self, name: str, runs: dict[str, Callable[[], float]], per_step: list[float]) -> None:
        """Every way of running the job once to warm up, then round-robin `repeat` times, so that a
        change in the machine's load hits all of them alike. Raw and handler runs happen in a new
        thread each, as the worker runs every job: on CPU each thread gets its own OpenMP team, and
        the team of a thread that just finished keeps spinning for a while."""
        samples: dict[str, list[float]] = {way: [] for way in runs}
        for way, fn in runs.items():
            in_thread(fn) if way != "worker" else fn()
        per_step.clear()
        for _ in range(self.args.repeat):
            for way, fn in runs.items():
                samples[way].append(in_thread(fn) if way != "worker" else fn())
        raw = median(samples["raw"])
        row: dict[str, Any] = {"job": name, "step_s": median(per_step),
                               **{f"{way}_s": median(v) for way, v in samples.items()},
                               **{f"{way}_min_s": min(v) for way, v in samples.items()}}
        parts = [f"raw {raw:.3f}s"]
        for way in runs:
            if way == "raw":
                continue
            value = median(samples[way])
            row[f"{way}_overhead_ms"] = (value - raw) * 1000
            row[f"{way}_overhead_pct"] = 100 * (value - raw) / raw if raw else float("nan")
            parts.append(f"{way} {value:.3f}s ({row[f'{way}_overhead_ms']:+.1f} ms, "
                         f"{row[f'{way}_overhead_pct']:+.1f}%)")
        self.rows.append(row)
        print(f"  {name}: " + ", ".join(parts) + f"; {row['step_s'] * 1000:.1f} ms/step", flush=True)

    def sdxl(self, handler: Any, cases: list[tuple[str, int, int, int, float]],
             worker: Callable[..., float] | None) -> None:
        import torch

        pipe = handler.pipe
        for name, size, steps, images, guidance in cases:
            config = {"width": size, "height": size, "steps": steps, "guidance_scale": guidance,
                      "num_images": images, "seed": 1}

            def raw(size: int = size, steps: int = steps, images: int = images, guidance: float = guidance) -> float:
                started = time.perf_counter()
                pipe(prompt=PROMPT, num_images_per_prompt=images, width=size, height=size,
                     num_inference_steps=steps, guidance_scale=guidance, output_type="pil",
                     generator=[torch.Generator("cpu").manual_seed(1 + i) for i in range(images)])
                sync()
                return time.perf_counter() - started

            per_step: list[float] = []
            runs = {"raw": raw,
                    "handler": lambda c=config, p=per_step: self.handler_run(handler, "sdxl_image_fast", c, "image",
                                                                              p)}
            if worker:
                runs["worker"] = lambda c=config: worker("sdxl_image_fast", c)
            self.compare(name, runs, per_step)

    def wan(self, handler: Any, cases: list[tuple[str, int, int, int, int]],
            worker: Callable[..., float] | None) -> None:
        import torch

        pipe = handler.pipes["t2v"]
        for name, width, height, frames, steps in cases:
            config = {"width": width, "height": height, "frame_num": frames, "steps": steps, "guidance_scale": 6.5,
                      "fps": 16, "seed": 1, "sample_shift": 5.0}
            job_type, content = ("image_fast", "image") if frames == 1 else ("video_fast", "video")
            scheduler = handler._scheduler(pipe, "unipc", 5.0)  # the one the handler uses for this job

            def raw(width: int = width, height: int = height, frames: int = frames, steps: int = steps,
                    scheduler: Any = scheduler) -> float:
                started = time.perf_counter()
                pipe.scheduler = scheduler
                pipe(prompt=PROMPT, width=width, height=height, num_frames=frames, num_inference_steps=steps,
                     guidance_scale=6.5, output_type="np", generator=torch.Generator("cpu").manual_seed(1))
                sync()
                return time.perf_counter() - started

            per_step: list[float] = []
            runs = {"raw": raw,
                    "handler": lambda c=config, j=job_type, k=content, p=per_step: self.handler_run(
                        handler, j, c, k, p)}
            if worker:
                runs["worker"] = lambda c=config, j=job_type: worker(j, c)
            self.compare(name, runs, per_step)


# --- the real worker (tiny models) ---------------------------------------------------------------


@contextlib.contextmanager
def real_worker(bench: Bench, handlers: dict[str, Any]) -> Iterator[Callable[..., float]]:
    from worker import db
    from worker.loop import Worker
    from worker.queue import JobQueue

    settings = bench.settings.model_copy(update={"worker_id": "bench-diffusion", "lease_seconds": 30.0})
    url = db.resolve_database_url(settings)
    db.migrate(url, settings)
    pool = db.make_pool(url, 2, name="bench")
    queue = JobQueue(pool)
    worker = Worker(settings, handlers, bench.storage, database_url=url)
    thread = threading.Thread(target=worker.run, kwargs={"install_signals": False}, daemon=True)
    thread.start()

    def through_worker(job_type: str, config: dict[str, Any]) -> float:
        """One job: claim to finish, from the row's own timestamps."""
        job_id = queue.enqueue(job_type, {"prompt": PROMPT, "config": config})
        deadline = time.monotonic() + 600
        row = None
        while time.monotonic() < deadline:
            row = queue.get_job(job_id)
            if row and row["status"] in ("completed", "failed", "canceled"):
                break
            time.sleep(0.005)
        assert row and row["status"] == "completed", row and row.get("error")
        return (row["finished_at"] - row["started_at"]).total_seconds()

    try:
        yield through_worker
    finally:
        worker.stop()
        thread.join(timeout=30)
        pool.close()


# --- media at production sizes ------------------------------------------------------------------


def media(repeat: int, scratch: Path) -> None:
    import numpy as np
    from PIL import Image

    from worker.media import encode_mp4, encode_png, thumbnail_png

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:832, 0:480]
    frames = np.stack([((np.stack([x + 4 * t, y, x + y], -1) % 256) + rng.integers(0, 24, (832, 480, 3)))
                       .clip(0, 255).astype(np.uint8) for t in range(81)])
    image = Image.fromarray(np.tile(frames[0], (2, 3, 1))[:1024, :1024])
    png = median(timed(lambda: encode_png(image, compress_level=1, text={"prompt": "x", "seed": 1}), repeat))
    mp4 = median(timed(lambda: encode_mp4(frames, 16, scratch_dir=scratch), repeat))
    thumb = median(timed(lambda: thumbnail_png(Image.fromarray(frames[0])), repeat))
    size = len(encode_mp4(frames, 16, scratch_dir=scratch))
    print(f"  media: PNG 1024x1024 (level 1) {png * 1000:.0f} ms, MP4 81x480x832 (H.264 crf 18, veryfast) "
          f"{mp4 * 1000:.0f} ms "
          f"({size / 1e6:.2f} MB), thumbnail {thumb * 1000:.0f} ms", flush=True)


# --- main ---------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="full-size models from configs/ (needs a GPU to run)")
    parser.add_argument("--dry-run", action="store_true", help="with --full: build on the meta device and stop")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet / transformer")
    parser.add_argument("--only", choices=["sdxl", "wan"], default=None)
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per figure (after one warm-up)")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps of the tiny-model jobs")
    parser.add_argument("--no-worker", action="store_true", help="skip the runs through a real worker")
    parser.add_argument("--no-media", action="store_true", help="skip the media encoding figures")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    if args.full and args.dry_run:
        dry_run()
        return

    import torch

    from worker.handlers.diffusion import resolve_device, resolve_dtype
    from worker.handlers.sdxl import SdxlHandler
    from worker.handlers.wan import WanHandler

    device = resolve_device(args.device)
    args.device = str(device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    print(f"torch {torch.__version__} on {gpu or platform.processor() or 'cpu'} "
          f"({torch.get_num_threads()} threads), repeat {args.repeat}", flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-diffusion-") as folder:
        home = Path(folder)
        bench = Bench(args, home)
        if args.full:
            if device.type != "cuda":
                raise SystemExit("--full needs a GPU (--device cuda); use --dry-run to check the configs")
            if args.only != "wan":
                sdxl = SdxlHandler(bench.settings)
                pipe = full_sdxl(str(device))
                if args.compile:
                    pipe.unet.compile(fullgraph=True)
                sdxl.adopt(pipe, "sdxl-base-1.0 (random weights)")
                print("SDXL base 1.0, bf16, SDPA" + (", torch.compile" if args.compile else ""), flush=True)
                bench.sdxl(sdxl, [("sdxl 1024x1024 30 steps (anchor)", 1024, 30, 1, 7.5),
                                  ("sdxl_image_fast 1024x1024 15 steps", 1024, 15, 1, 6.0),
                                  ("sdxl_image_high 1024x1024 25 steps x3", 1024, 25, 3, 7.5)], None)
                print(f"  peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB", flush=True)
                del sdxl, pipe
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            if args.only != "sdxl":
                wan = WanHandler(bench.settings, vace_model="", i2v_model="")
                pipe = full_wan(str(device))
                if args.compile:
                    pipe.transformer.compile(fullgraph=True)
                wan.adopt(pipe, "wan2.1-t2v-1.3b (random weights)")
                print("WAN 2.1 T2V 1.3B, bf16 transformer/UMT5, fp32 VAE, SDPA"
                      + (", torch.compile" if args.compile else ""), flush=True)
                bench.wan(wan, [("video_fast 480x832 81 frames 25 steps", 480, 832, 81, 25),
                                ("image_fast 480x832 1 frame 25 steps", 480, 832, 1, 25)], None)
                print(f"  peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB", flush=True)
        else:
            from worker.tiny_diffusion import build_tiny_models

            models = build_tiny_models(home / "models", i2v=False)
            dtype = resolve_dtype("auto", device)
            print(f"tiny random-weight models, {dtype}", flush=True)
            sdxl = SdxlHandler(bench.settings, model=str(models["sdxl"]))
            wan = WanHandler(bench.settings, model=str(models["wan"]), vace_model="", i2v_model="")
            sdxl.load()
            wan.load()
            runner = contextlib.nullcontext(None) if args.no_worker else real_worker(
                bench, {"sdxl": sdxl, "wan": wan})
            with runner as worker:
                if args.only != "wan":
                    bench.sdxl(sdxl, [(f"sdxl 64x64 {args.steps} steps", 64, args.steps, 1, 6.0),
                                      (f"sdxl 64x64 {args.steps} steps x6", 64, args.steps, 6, 6.0)], worker)
                if args.only != "sdxl":
                    bench.wan(wan, [(f"wan 64x64 9 frames {args.steps} steps", 64, 64, 9, args.steps),
                                    (f"wan 64x64 1 frame {args.steps} steps", 64, 64, 1, args.steps)], worker)
        if not args.no_media:
            media(args.repeat, home)
        if args.json:
            args.json.write_text(json.dumps(bench.rows, indent=2))


if __name__ == "__main__":
    main()
