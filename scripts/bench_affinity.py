#!/usr/bin/env python
"""Model-affinity benchmark: model swaps, total time and the oldest job's queue wait for a mixed queue
of SDXL / WAN / chat jobs on one worker whose memory budget holds only one model, with the claim in
plain FIFO order (--no-affinity: `affinity = false`) against the affinity claim. It prints figures; it
is not a test.

    python scripts/bench_affinity.py                          # both scenarios, 3 runs per mode
    python scripts/bench_affinity.py --scenario burst --jobs 36 --runs 3
    python scripts/bench_affinity.py --scenario stream --jobs 60 --rate 1.2 --max-wait 10

Models: the project's tiny random-weight models (worker.tiny_models / worker.tiny_diffusion) loaded
through the real handlers (from_pretrained, real pipelines, PNG/MP4 encoding, local storage) by a real
Worker on the embedded Postgres, concurrency 1. The tiny chat model is built wider (hidden 128) so the
three footprints are alike (about 1.6-1.7 MiB each; WAN about 0.6 MiB); the budget is set between the
largest model and the smallest pair, so any one model fits and no two do: every change of model
type is an eviction plus a load. Tiny loads take 0.03-0.1 s, far from the 10-60 s of real checkpoints,
so each load (not a no-op re-load) also sleeps --load-delay seconds (default 1.0) to stand for it;
with tiny jobs of 0.1-0.5 s that keeps the real ratio of load time to job time (SDXL: ~10 s load,
~3-5 s per job; a 7B chat model: ~15 s load, ~2 s per reply).

Scenarios: `burst`: all jobs are queued at once (a backlog); `stream`: Poisson arrivals at --rate jobs
per second. Job types are drawn uniformly from sdxl_image_fast / video_fast / chat_conversation with
a fixed seed, so both modes see the same sequence. The aging bound (--max-wait, affinity_max_wait)
caps how long affinity lets a job of another type wait.

Figures per run, medians over --runs runs (the modes take turns, so a change in the machine's load
hits both): loads (model loads, the first included), swaps (evictions), total (first insert to last
finish, seconds), max wait (longest insert-to-claim of any job: the oldest job's wait), p50 wait.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import statistics
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TYPES = ("sdxl_image_fast", "video_fast", "chat_conversation")
PAYLOADS: dict[str, dict[str, Any]] = {
    "sdxl_image_fast": {"prompt": "a lighthouse at dusk", "config": {"width": 64, "height": 64, "steps": 4,
                                                                       "num_images": 1, "seed": 1}},
    "video_fast": {"prompt": "waves rolling onto a beach", "config": {"width": 64, "height": 64, "steps": 3,
                                                                        "frame_num": 9, "seed": 1}},
    "chat_conversation": {"message": "Describe a rainy street at night.", "max_tokens": 24, "min_tokens": 24},
}


@dataclass
class Run:
    mode: str
    loads: int
    swaps: int
    total: float
    max_wait: float
    p50_wait: float
    failed: int


def slow_loading(cls: type, delay: float) -> type:
    """The handler class, with `delay` seconds added to every real load (not to a no-op re-load)."""

    class SlowLoading(cls):  # type: ignore[misc, valid-type]
        def load(self) -> None:
            if not self.modules():
                time.sleep(delay)
            super().load()

    SlowLoading.__name__ = f"SlowLoading{cls.__name__}"
    return SlowLoading


def build_models(root: Path) -> dict[str, Path]:
    from worker.tiny_diffusion import build_tiny_sdxl, build_tiny_wan
    from worker.tiny_models import build_tiny_qwen

    return {"chat": build_tiny_qwen(root / "tiny-qwen2-h128", hidden_size=128),
            "sdxl": build_tiny_sdxl(root / "tiny-sdxl"), "wan": build_tiny_wan(root / "tiny-wan-t2v")}


def make_handlers(models: dict[str, Path], home: Path, delay: float) -> dict[str, Any]:
    from worker.config import Settings
    from worker.handlers.base import connect_handlers
    from worker.handlers.chat import ChatHandler
    from worker.handlers.sdxl import SdxlHandler
    from worker.handlers.wan import WanHandler

    settings = Settings(home=home, chat_device="cpu", diffusion_device="cpu")
    handlers: dict[str, Any] = {
        "chat": slow_loading(ChatHandler, delay)(settings, model=str(models["chat"])),
        "sdxl": slow_loading(SdxlHandler, delay)(settings, model=str(models["sdxl"])),
        "wan": slow_loading(WanHandler, delay)(settings, model=str(models["wan"]), vace_model="", i2v_model=""),
    }
    connect_handlers(handlers)
    return handlers


def footprints(models: dict[str, Path], home: Path) -> dict[str, int]:
    """Each model's measured footprint, loaded alone through a memory manager."""
    from worker.config import Settings
    from worker.memory import MemoryManager

    handlers = make_handlers(models, home, 0.0)
    memory = MemoryManager(Settings(memory_budget=0), handlers)
    sizes = {}
    for name in handlers:
        with memory.use(name):
            pass
        sizes[name] = memory.status()["models"][0]["bytes"]
        memory.evict(name)
    return sizes


def schedule(args: argparse.Namespace, seed: int) -> list[tuple[float, str]]:
    """(seconds after the start, job type) for every job; the same for both modes of a run."""
    rng = random.Random(seed)
    at, jobs = 0.0, []
    for _ in range(args.jobs):
        jobs.append((at, rng.choice(TYPES)))
        if args.scenario == "stream":
            at += rng.expovariate(args.rate)
    return jobs


def run_once(args: argparse.Namespace, url: str, models: dict[str, Path], home: Path, budget: int,
             affinity: bool, jobs: list[tuple[float, str]]) -> Run:
    from psycopg.types.json import Jsonb

    from worker import db
    from worker.config import Settings
    from worker.loop import Worker
    from worker.storage import LocalStorage

    with db.connect(url) as conn:
        conn.execute("delete from public.jobs")
    settings = Settings(home=home, database_url=url, concurrency=1, affinity=affinity,
                        affinity_max_wait=args.max_wait, memory_budget=budget, lease_seconds=30.0,
                        progress_interval=0.5, worker_id=f"bench-affinity-{uuid.uuid4().hex[:6]}")
    worker = Worker(settings, make_handlers(models, home, args.load_delay), LocalStorage(settings.storage_dir),
                    database_url=url)
    thread = threading.Thread(target=worker.run, kwargs={"install_signals": False}, daemon=True)
    thread.start()
    ids: list[Any] = []
    started = time.monotonic()
    with db.connect(url) as conn:
        for at, job_type in jobs:  # a burst: all at 0, inserted in order, so FIFO order is the arrival order
            time.sleep(max(0.0, started + at - time.monotonic()))
            ids.append(conn.execute("insert into public.jobs (job_type, payload) values (%s, %s) returning id",
                                    (job_type, Jsonb(PAYLOADS[job_type]))).fetchone()["id"])
        deadline = time.monotonic() + args.timeout
        while True:
            rows = conn.execute("select status, created_at, started_at, finished_at from public.jobs "
                                "where id = any(%s)", (ids,)).fetchall()
            if all(r["status"] in ("completed", "failed", "canceled") for r in rows):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"jobs unfinished after {args.timeout}s")
            time.sleep(0.05)
    worker.stop()
    thread.join(timeout=60)
    waits = [(r["started_at"] - r["created_at"]).total_seconds() for r in rows]
    total = (max(r["finished_at"] for r in rows) - min(r["created_at"] for r in rows)).total_seconds()
    stats = worker.memory.stats
    return Run("affinity" if affinity else "fifo", stats.loads, stats.evictions, total, max(waits),
               statistics.median(waits), sum(r["status"] != "completed" for r in rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", choices=("burst", "stream", "both"), default="both")
    parser.add_argument("--jobs", type=int, default=None, help="jobs per run (default: burst 36, stream 60)")
    parser.add_argument("--rate", type=float, default=1.2, help="stream: arrivals per second")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--load-delay", type=float, default=1.0, help="seconds added to each model load")
    parser.add_argument("--max-wait", type=float, default=10.0, help="affinity_max_wait, the aging bound (s)")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--database-url", default=None, help="default: an embedded Postgres in a temp dir")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)

    from worker import db
    from worker.config import Settings

    home = Path(tempfile.mkdtemp(prefix="bench-affinity-"))
    models = build_models(home / "models")
    sizes = footprints(models, home)
    largest = max(sizes.values())
    pair = min(a + b for i, a in enumerate(sizes.values()) for b in list(sizes.values())[i + 1:])
    if pair <= largest:
        raise SystemExit(f"footprints {sizes}: some pair fits where the largest does; no budget holds exactly one")
    budget = (largest + pair) // 2
    url = db.resolve_database_url(Settings(home=home, database_url=args.database_url))
    db.migrate(url, Settings(home=home, database_url=url))
    print(f"footprints (bytes): {sizes}; budget {budget} bytes (one model fits, no two); load delay "
          f"{args.load_delay}s; aging bound {args.max_wait}s; torch threads {__import__('torch').get_num_threads()}")

    scenarios = ("burst", "stream") if args.scenario == "both" else (args.scenario,)
    for scenario in scenarios:
        args.scenario = scenario
        run_args = argparse.Namespace(**vars(args))
        run_args.jobs = args.jobs or (36 if scenario == "burst" else 60)
        results: dict[str, list[Run]] = {"fifo": [], "affinity": []}
        for index in range(args.runs):
            jobs = schedule(run_args, args.seed + index)
            for affinity in (False, True) if index % 2 == 0 else (True, False):
                run = run_once(run_args, url, models, home, budget, affinity, jobs)
                results[run.mode].append(run)
                print(f"  {scenario} run {index + 1} {run.mode:8s} loads {run.loads:3d} swaps {run.swaps:3d} "
                      f"total {run.total:6.1f}s max wait {run.max_wait:6.1f}s p50 wait {run.p50_wait:6.1f}s "
                      f"failed {run.failed}", flush=True)
        what = "at once" if scenario == "burst" else f"Poisson arrivals at {args.rate}/s"
        what = f"{run_args.jobs} jobs {what}"
        print(f"\n{scenario}: {what}; medians of {args.runs} runs")
        print("| mode     | loads | swaps | total (s) | max wait (s) | p50 wait (s) | failed |")
        print("|----------|------:|------:|----------:|-------------:|-------------:|-------:|")
        for mode, runs in results.items():
            def med(field: str) -> float:
                return statistics.median(getattr(r, field) for r in runs)  # noqa: B023
            print(f"| {mode:8s} | {med('loads'):5.0f} | {med('swaps'):5.0f} | {med('total'):9.1f} | "
                  f"{med('max_wait'):12.1f} | {med('p50_wait'):12.1f} | {med('failed'):6.0f} |")
        print()


if __name__ == "__main__":
    main()
