#!/usr/bin/env python
"""One command that measures a GPU: full-size random-weight SDXL, WAN 2.1 1.3B and Qwen2.5-7B built from
configs/ directly on the device (nothing downloaded), measured in this order, each figure printed as it
lands and the JSON file (--out) rewritten after every stage:

  sdxl        SDXL 1024x1024, 30 steps, 1 image: the raw pipeline call vs the handler's job
  wan         WAN 2.1 1.3B 480x832x81: one full denoising step, the VAE decode, a 50-step estimate,
              and the full 50-step job when the stage's budget still allows it
  qwen        Qwen2.5-7B single-stream tokens/s and a batch of 8
  sdxl_x6     SDXL 1024x1024, 30 steps, 6 images (the raw call)
  chat_wan    chat single-stream tokens/s while a WAN job runs in another thread
  overhead    worker overhead: SDXL jobs through a real worker on Postgres (claim to finish, from the row)
              and the handler's job, each minus the raw pipeline wall of the sdxl stage

    python scripts/bench_gpu.py                               # an H100/H200: fits in 9 minutes
    python scripts/bench_gpu.py --tiny --device cpu --out /tmp/smoke.json   # the tiny models (a smoke test)

Each stage has a time budget (--budget-scale stretches them all); a stage whose remaining budget cannot
hold its next part records what it skipped and why. A stage that fails records its error and the run
goes on. The model builders are those of scripts/bench_diffusion.py and scripts/bench_chat.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_chat
import bench_diffusion
from bench_diffusion import PROMPT, sync

# seconds per stage on an H100/H200; the sum (plus model builds, ~60 s) stays under 9 minutes
BUDGETS = {"sdxl": 60.0, "wan": 200.0, "qwen": 60.0, "sdxl_x6": 40.0, "chat_wan": 60.0, "overhead": 30.0}
FULL = {"size": 1024, "steps": 30, "width": 480, "height": 832, "frames": 81, "wan_steps": 50,
        "prompt_tokens": 128, "new_tokens": 128, "batch": 8}
TINY = {"size": 64, "steps": 2, "width": 64, "height": 64, "frames": 9, "wan_steps": 3,
        "prompt_tokens": 16, "new_tokens": 8, "batch": 8}


class Run:
    """The figures so far; every stage's result is written to disk as soon as it lands."""

    def __init__(self, out: Path, meta: dict[str, Any]) -> None:
        self.out = out
        self.data: dict[str, Any] = {"meta": meta, "stages": {}}
        self.write()

    def write(self) -> None:
        tmp = self.out.with_suffix(self.out.suffix + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        tmp.replace(self.out)

    def stage(self, name: str, budget: float, fn: Callable[[float], dict[str, Any]]) -> dict[str, Any]:
        started = time.perf_counter()
        deadline = started + budget
        try:
            figures = fn(deadline)
            figures["status"] = "ok"
        except Exception as err:  # a stage's failure is a figure too; the next stage still runs
            figures = {"status": "failed", "error": f"{type(err).__name__}: {err}"[:500]}
        figures["seconds"] = round(time.perf_counter() - started, 3)
        figures["budget_s"] = budget
        self.data["stages"][name] = figures
        self.write()
        print(f"[{name}] " + json.dumps(figures, default=str), flush=True)
        return figures


def left(deadline: float) -> float:
    return deadline - time.perf_counter()


def clock(fn: Callable[[], Any]) -> float:
    started = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - started


class Models:
    def __init__(self, args: argparse.Namespace, home: Path) -> None:
        from worker.handlers.sdxl import SdxlHandler
        from worker.handlers.wan import WanHandler

        self.args = args
        self.bench = bench_diffusion.Bench(argparse.Namespace(device=args.device), home)
        if args.database_url:
            self.bench.settings = self.bench.settings.model_copy(update={"database_url": args.database_url})
        settings = self.bench.settings
        started = time.perf_counter()
        if args.tiny:
            from worker.tiny_diffusion import build_tiny_models

            paths = build_tiny_models(home / "models", i2v=False)
            self.sdxl = SdxlHandler(settings, model=str(paths["sdxl"]))
            self.wan = WanHandler(settings, model=str(paths["wan"]), vace_model="", i2v_model="")
            self.sdxl.load()
            self.wan.load()
        else:
            self.sdxl = SdxlHandler(settings)
            self.sdxl.adopt(bench_diffusion.full_sdxl(args.device), "sdxl-base-1.0 (random weights)")
            self.wan = WanHandler(settings, vace_model="", i2v_model="")
            self.wan.adopt(bench_diffusion.full_wan(args.device), "wan2.1-t2v-1.3b (random weights)")
        self.diffusion_build_s = time.perf_counter() - started
        started = time.perf_counter()
        chat_args = argparse.Namespace(
            models_dir=home / "models", tiny=args.tiny, model=None, device=args.device, context_tokens=8192,
            static_cache=False, compile=False, attn="sdpa", set=None,
            from_config=None if args.tiny else str(bench_diffusion.CONFIGS / "qwen2.5-7b-instruct/config.json"))
        self.chat = bench_chat.load_model(chat_args)
        self.chat_build_s = time.perf_counter() - started


def sdxl_raw(models: Models, size: int, steps: int, images: int) -> float:
    import torch

    pipe = models.sdxl.pipe
    return clock(lambda: pipe(prompt=PROMPT, num_images_per_prompt=images, width=size, height=size,
                              num_inference_steps=steps, guidance_scale=7.5, output_type="pil",
                              generator=[torch.Generator("cpu").manual_seed(1 + i) for i in range(images)]))


def sdxl_job(models: Models, size: int, steps: int, images: int) -> tuple[float, float]:
    per_step: list[float] = []
    config = {"width": size, "height": size, "steps": steps, "guidance_scale": 7.5, "num_images": images, "seed": 1}
    wall = models.bench.handler_run(models.sdxl, "sdxl_image_fast", config, "image", per_step)
    return wall, per_step[0]


def stage_sdxl(models: Models, p: dict[str, Any], deadline: float) -> dict[str, Any]:
    size, steps = p["size"], p["steps"]
    warm = sdxl_raw(models, size, steps, 1)  # first call: kernels, allocator
    raw, job, step = [], [], []
    while not raw or (left(deadline) > 2.5 * warm and len(raw) < 5):
        raw.append(sdxl_raw(models, size, steps, 1))
        wall, per = sdxl_job(models, size, steps, 1)
        job.append(wall)
        step.append(per)
    return {"size": size, "steps": steps, "images": 1, "runs": len(raw), "warmup_s": warm,
            "raw_s": statistics.median(raw), "job_s": statistics.median(job), "step_ms": 1000 * statistics.median(step)}


def wan_latents(models: Models, p: dict[str, Any], steps: int,
                stop: threading.Event | None = None) -> tuple[Any, list[float]]:
    import torch

    pipe = models.wan.pipes["t2v"]
    pipe.scheduler = models.wan._scheduler(pipe, "unipc", 5.0)
    marks: list[float] = []

    def mark(_pipe: Any, _i: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        sync()
        marks.append(time.perf_counter())
        if stop is not None and stop.is_set():
            _pipe._interrupt = True  # diffusers skips the remaining steps
        return kwargs

    started = time.perf_counter()
    latents = pipe(prompt=PROMPT, width=p["width"], height=p["height"], num_frames=p["frames"],
                   num_inference_steps=steps, guidance_scale=6.5, output_type="latent",
                   generator=torch.Generator("cpu").manual_seed(1), callback_on_step_end=mark).frames
    return latents, [started, *marks]


def stage_wan(models: Models, p: dict[str, Any], deadline: float) -> dict[str, Any]:
    import torch

    latents, marks = wan_latents(models, p, 2)  # the first step warms up; the second is the figure
    encode_and_first = marks[1] - marks[0]
    step = marks[2] - marks[1]
    vae = models.wan.pipes["t2v"].vae
    with torch.inference_mode():
        decode = clock(lambda: vae.decode(latents.to(vae.dtype)))
    steps = p["wan_steps"]
    estimate = encode_and_first - step + steps * step + decode
    figures: dict[str, Any] = {"width": p["width"], "height": p["height"], "frames": p["frames"], "step_s": step,
                               "decode_s": decode, "first_step_with_encode_s": encode_and_first,
                               f"estimate_{steps}_steps_s": estimate}
    print(f"  wan: step {step:.3f}s, decode {decode:.3f}s, {steps}-step estimate {estimate:.1f}s", flush=True)
    if left(deadline) > 1.2 * estimate + 5:
        config = {"width": p["width"], "height": p["height"], "frame_num": p["frames"], "steps": steps,
                  "guidance_scale": 6.5, "fps": 16, "seed": 1, "sample_shift": 5.0}
        per_step: list[float] = []
        figures[f"job_{steps}_steps_s"] = models.bench.handler_run(models.wan, "video_fast", config, "video",
                                                                   per_step)
        figures["job_step_s"] = per_step[0]
    else:
        figures["job_skipped"] = f"the estimate {estimate:.0f}s does not fit the {left(deadline):.0f}s left"
    return figures


def chat_rate(models: Models, p: dict[str, Any], batch: int) -> float:
    ids = bench_chat.prompt_ids(models.chat, p["prompt_tokens"])
    seconds, _ = bench_chat.timed(models.chat, [ids] * batch, p["new_tokens"])
    return batch * p["new_tokens"] / seconds


def stage_qwen(models: Models, p: dict[str, Any], deadline: float) -> dict[str, Any]:
    chat_rate(models, p, 1)  # warm-up
    single = [chat_rate(models, p, 1)]
    batch = [chat_rate(models, p, p["batch"])]
    while left(deadline) > 3 * p["new_tokens"] / single[0] + 3 * p["batch"] * p["new_tokens"] / batch[0] and len(
            single) < 3:
        single.append(chat_rate(models, p, 1))
        batch.append(chat_rate(models, p, p["batch"]))
    return {"prompt_tokens": p["prompt_tokens"], "new_tokens": p["new_tokens"], "runs": len(single),
            "single_stream_tok_s": statistics.median(single), f"batch_{p['batch']}_tok_s": statistics.median(batch)}


def stage_sdxl_x6(models: Models, p: dict[str, Any], deadline: float) -> dict[str, Any]:
    import torch

    sdxl_raw(models, p["size"], 1, 6)  # the batch of 6's own first call (shapes, decode workspace)
    figures: dict[str, Any] = {"size": p["size"], "steps": p["steps"], "images": 6,
                               "raw_s": sdxl_raw(models, p["size"], p["steps"], 6)}
    if torch.cuda.is_available():
        figures["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return figures


def stage_chat_wan(models: Models, p: dict[str, Any], alone: float | None, deadline: float) -> dict[str, Any]:
    """Chat tokens/s measured while a WAN job denoises in another thread (as with --concurrency 2)."""
    alone = alone or chat_rate(models, p, 1)
    chat_seconds = p["new_tokens"] / alone
    figures: dict[str, Any] = {"alone_tok_s": alone}
    wan_p = dict(p)
    # enough WAN steps to outlast three chat generations, within the budget
    wan_p_steps = max(3, min(p["wan_steps"], int(left(deadline) / 4)))
    done, stop = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def video() -> None:
        try:
            wan_latents(models, wan_p, wan_p_steps, stop)
        except BaseException as err:  # reported below; the chat figure is meaningless without the video
            errors.append(err)
        finally:
            done.set()

    thread = threading.Thread(target=video, daemon=True)
    thread.start()
    time.sleep(min(2.0, chat_seconds))  # let the video reach its denoising loop
    rates = []
    while not done.is_set() and len(rates) < 3 and left(deadline) > 2 * chat_seconds:
        rates.append(chat_rate(models, p, 1))
    overlapped = not done.is_set()
    stop.set()  # the video's remaining steps would slow the next stage down
    thread.join(timeout=max(1.0, left(deadline)))
    if errors:
        raise errors[0]
    figures.update({"during_wan_tok_s": statistics.median(rates) if rates else None, "runs": len(rates),
                    "wan_steps": wan_p_steps, "wan_still_running_after_chat": overlapped})
    if rates:
        figures["slowdown"] = alone / figures["during_wan_tok_s"]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the project's tiny models (a smoke test on CPU)")
    parser.add_argument("--device", default="cuda", help="cuda | cpu | auto")
    parser.add_argument("--out", type=Path, default=Path("bench_gpu.json"))
    parser.add_argument("--budget-scale", type=float, default=1.0, help="multiply every stage's time budget")
    parser.add_argument("--only", default=None, help="comma-separated stages (default: all, in order)")
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL"),
                        help="Postgres for the overhead stage's real worker (default: an embedded one)")
    args = parser.parse_args()

    import torch

    from worker.handlers.diffusion import resolve_device

    device = resolve_device(args.device)
    if device.type != "cuda" and not args.tiny:
        print("the full-size models need a GPU: run with --device cuda, or --tiny --device cpu for a smoke test",
              file=sys.stderr)
        raise SystemExit(2)
    args.device = str(device)
    p = TINY if args.tiny else FULL
    wanted = set(args.only.split(",")) if args.only else set(BUDGETS)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    started = time.perf_counter()
    run = Run(args.out, {"device": gpu or platform.processor() or "cpu", "torch": torch.__version__,
                         "tiny": args.tiny, "params": p, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    print(f"torch {torch.__version__} on {run.data['meta']['device']}; writing {args.out}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as folder:
        models = Models(args, Path(folder))
        run.data["meta"].update(diffusion_build_s=models.diffusion_build_s, chat_build_s=models.chat_build_s)
        print(f"models built: diffusion {models.diffusion_build_s:.1f}s, chat {models.chat_build_s:.1f}s", flush=True)

        def budget(name: str) -> float:
            return BUDGETS[name] * args.budget_scale

        stages: dict[str, Callable[[float], dict[str, Any]]] = {
            "sdxl": lambda d: stage_sdxl(models, p, d),
            "wan": lambda d: stage_wan(models, p, d),
            "qwen": lambda d: stage_qwen(models, p, d),
            "sdxl_x6": lambda d: stage_sdxl_x6(models, p, d),
            "chat_wan": lambda d: stage_chat_wan(
                models, p, run.data["stages"].get("qwen", {}).get("single_stream_tok_s"), d),
            "overhead": lambda d: overhead(models, p, run.data["stages"].get("sdxl", {}), d),
        }
        for name, fn in stages.items():
            if name in wanted:
                run.stage(name, budget(name), fn)
    run.data["meta"]["total_s"] = time.perf_counter() - started
    run.write()
    print(f"done in {run.data['meta']['total_s']:.1f}s: {args.out}", flush=True)


def overhead(models: Models, p: dict[str, Any], sdxl: dict[str, Any], deadline: float) -> dict[str, Any]:
    if "raw_s" not in sdxl:
        raise RuntimeError("the sdxl stage has no figures to compare")
    raw = sdxl["raw_s"]
    extra = sdxl["job_s"] - raw
    figures: dict[str, Any] = {"job": "sdxl", "pipeline_s": raw, "handler_job_s": sdxl["job_s"],
                               "handler_overhead_ms": 1000 * extra, "handler_overhead_pct": 100 * extra / raw}
    config = {"width": p["size"], "height": p["size"], "steps": p["steps"], "guidance_scale": 7.5,
              "num_images": 1, "seed": 1}
    try:
        with bench_diffusion.real_worker(models.bench, {"sdxl": models.sdxl}) as through_worker:
            walls = [through_worker("sdxl_image_fast", config)]  # the first claims and warms the pool
            while left(deadline) > 3 * walls[-1] and len(walls) < 4:
                walls.append(through_worker("sdxl_image_fast", config))
    except Exception as err:  # no Postgres here: the handler's figure stands alone
        figures["worker_skipped"] = f"{type(err).__name__}: {err}"[:300]
        return figures
    wall = statistics.median(walls[1:] or walls)
    figures.update({"worker_jobs": len(walls), "worker_job_s": wall, "worker_overhead_ms": 1000 * (wall - raw),
                    "worker_overhead_pct": 100 * (wall - raw) / raw})
    return figures


if __name__ == "__main__":
    main()
