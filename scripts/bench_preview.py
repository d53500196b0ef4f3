#!/usr/bin/env python
"""Preview benchmark: what a live preview costs a job, at production latent sizes, against the step
time of the full-size models. It prints figures; it is not a test.

    python scripts/bench_preview.py                    # CPU: SDXL 1024x1024 and WAN 480x832x81
    python scripts/bench_preview.py --device cuda      # on a GPU
    python scripts/bench_preview.py --format webp --repeat 15

Latents: SDXL 1024x1024 -> (1, 4, 128, 128), also a batch of 6 (one grid); WAN 2.1 480x832, 81 frames
-> (1, 16, 21, 60, 104). Random values, which cost the same as real ones.

What is timed (medians of --repeat runs after a warm-up):
  job thread, due step   LivePreview.step() on a step that publishes: the pacing decision and the
                         hand-over of the step's tensors. This is all the denoising loop waits for.
  job thread, other step the same call on a step that does not publish.
  background             in the preview thread: the x0 estimate (Euler: from the last two samples;
                         UniPC: the scheduler's own), the frames or images shown, projection to RGB,
                         to 8 bits, layout, encoding, the upload (LocalStorage in a temp folder) and
                         the row's preview. It runs while
                         the loop denoises; on a CPU worker it takes cores from it, on a GPU one it
                         takes none from the GPU.
  step (lower bound)     the model's FLOPs per denoising step (both guidance passes), counted by
                         torch's FlopCounterMode on the meta device from configs/ (no weights), divided
                         by this device's measured dense matmul throughput. Real steps are slower, so
                         the share below is an upper bound.
  share                  (job thread due + background) / max(5 x step, 2 s): the slowdown if all of a
                         preview's work came out of the denoising, at the default pacing (at most
                         every OURVIDZ_PREVIEW_EVERY_STEPS=5 steps and OURVIDZ_PREVIEW_MIN_SECONDS=2).
                         Whatever the step time, it cannot exceed (job thread + background) / 2 s.
  2 % at                 the step time below which 5 steps' previews would cost 2 % if the 2 s floor
                         did not hold them back.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"


def median_ms(fn: Callable[[], Any], repeat: int, sync: Callable[[], None]) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def step_tflops(family: str) -> float:
    """FLOPs of one denoising step with guidance (two passes), on the meta device."""
    import torch
    from accelerate import init_empty_weights
    from torch.utils.flop_counter import FlopCounterMode

    config = json.loads((CONFIGS / ("sdxl-base-1.0/unet.json" if family == "sdxl" else
                                    "wan2.1-t2v-1.3b/transformer.json")).read_text())
    meta = torch.device("meta")
    with init_empty_weights(include_buffers=True):
        if family == "sdxl":
            from diffusers import UNet2DConditionModel

            model = UNet2DConditionModel.from_config(config)
            inputs: tuple[Any, ...] = (torch.empty(2, 4, 128, 128, device=meta),
                                       torch.tensor([500.0, 500.0], device=meta))
            kwargs: dict[str, Any] = {"encoder_hidden_states": torch.empty(2, 77, 2048, device=meta),
                                      "added_cond_kwargs": {"text_embeds": torch.empty(2, 1280, device=meta),
                                                            "time_ids": torch.empty(2, 6, device=meta)}}
        else:
            from diffusers import WanTransformer3DModel

            model = WanTransformer3DModel.from_config(config)
            inputs = (torch.empty(2, 16, 21, 60, 104, device=meta), torch.tensor([500, 500], device=meta))
            kwargs = {"encoder_hidden_states": torch.empty(2, 512, 4096, device=meta)}
    with FlopCounterMode(display=False) as counter:
        model(*inputs, **kwargs)
    return counter.get_total_flops() / 1e12


def matmul_tflops(device: str, dtype: Any) -> float:
    import torch

    a = torch.randn(4096, 4096, device=device, dtype=dtype)
    b = torch.randn(4096, 4096, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    seconds = median_ms(lambda: a @ b, 5, sync) / 1000
    return 2 * 4096**3 / seconds / 1e12


def context(storage_root: Path, job_type: str) -> Any:
    from worker.handlers.base import JobContext
    from worker.jobs import Job, JobType
    from worker.storage import LocalStorage

    now = datetime.now(UTC)
    info = JobType(name=job_type, queue="bench", handler="bench", bucket=job_type, defaults={})
    job = Job(id=uuid.uuid4(), user_id=None, job_type=job_type, queue="bench", payload={}, priority=0, attempts=1,
              max_attempts=1, created_at=now, started_at=now, run_at=now, errors=[], type_info=info)
    return JobContext(job, LocalStorage(storage_root), lambda *a, live=None: False, 0.5)


def scheduler_state(family: str, latents: Any) -> tuple[Any, Any]:
    """A scheduler a few steps in, as the step callback sees it, and the previous sample."""
    import torch
    from diffusers import EulerDiscreteScheduler, UniPCMultistepScheduler

    config = json.loads((CONFIGS / ("sdxl-base-1.0/scheduler.json" if family == "sdxl" else
                                    "wan2.1-t2v-1.3b/scheduler.json")).read_text())
    cls = EulerDiscreteScheduler if family == "sdxl" else UniPCMultistepScheduler
    scheduler = cls.from_config(config)
    scheduler.set_timesteps(30, device=latents.device)
    sample = previous = latents
    for t in scheduler.timesteps[:3]:
        scheduler.scale_model_input(sample, t)  # as the pipelines do (Euler warns otherwise)
        previous, sample = sample, scheduler.step(torch.randn_like(sample), t, sample).prev_sample
    return scheduler, previous


def bench_family(name: str, family: str, shape: tuple[int, ...], args: argparse.Namespace, root: Path,
                 sync: Callable[[], None]) -> dict[str, float]:
    import torch

    from worker.preview import LivePreview, PreviewConfig, _Due

    latents = torch.randn(*shape, device=args.device, dtype=torch.float32)
    scheduler, previous = scheduler_state(family, latents)
    config = PreviewConfig(every_steps=1, min_seconds=0.0, format=args.format)
    ctx = context(root, f"bench_{family}")
    preview = LivePreview(ctx, config, family)  # type: ignore[arg-type]
    preview._thread = threading.Thread(target=lambda: None)  # no preview thread: only the job thread's part
    preview._thread.start()

    def due_step() -> None:
        preview._previous = previous
        preview._last_due = float("-inf")
        preview.step(scheduler, latents, 3, 30)
        preview._due = None

    quiet = LivePreview(ctx, PreviewConfig(every_steps=5, min_seconds=0.0, format=args.format), family)  # type: ignore[arg-type]
    job_due = median_ms(due_step, args.repeat, sync)
    job_other = median_ms(lambda: quiet.step(scheduler, latents, 3, 30), args.repeat, sync)

    from worker.preview import x0_source

    item = _Due(x0_source(scheduler, latents, previous), 3, 30)
    publisher = LivePreview(ctx, config, family)  # type: ignore[arg-type]
    background = median_ms(lambda: publisher._publish(item), args.repeat, sync)
    published = ctx.preview

    tflops = step_tflops(family)
    step = tflops / args.peak_tflops
    cost = (job_due + background) / 1000
    share = cost / max(5 * step, 2.0) * 100
    print(f"{name:<34} job thread {job_due * 1000:6.1f} us due, {job_other * 1000:5.1f} us other | background "
          f"{background:7.2f} ms | preview {published['width']}x{published['height']} "
          f"{published['size'] / 1024:.0f} KiB"
          f" | step >= {step:8.2f} s ({tflops:.1f} TFLOP) | share <= {share:.2g} % | 2 % at a "
          f"{cost / 0.02 / 5 * 1000:.1f} ms step")
    return {"job_due_ms": job_due, "background_ms": background, "step_s": step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--format", choices=["png", "webp", "jpeg"], default="png")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from worker.handlers.diffusion import quiet_libraries

    quiet_libraries()
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    args.peak_tflops = matmul_tflops(args.device, torch.bfloat16 if cuda else torch.float32)
    device = torch.cuda.get_device_name() if cuda else f"{platform.processor() or platform.machine()}"
    print(f"device {args.device} ({device}), {torch.get_num_threads()} torch threads, torch {torch.__version__}; "
          f"dense matmul {args.peak_tflops * 1000:.0f} GFLOP/s ({'bf16' if cuda else 'fp32'}); "
          f"{args.format}, median of {args.repeat}")
    with tempfile.TemporaryDirectory(prefix="bench-preview-") as tmp:
        root = Path(tmp)
        bench_family("SDXL 1024x1024 (1, 4, 128, 128)", "sdxl", (1, 4, 128, 128), args, root, sync)
        bench_family("SDXL 1024x1024, batch of 6", "sdxl", (6, 4, 128, 128), args, root, sync)
        bench_family("WAN 480x832x81 (1, 16, 21, 60, 104)", "wan", (1, 16, 21, 60, 104), args, root, sync)


if __name__ == "__main__":
    main()
