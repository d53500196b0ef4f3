"""`ourvidz-worker demo`: the whole path on embedded defaults, watched the way a frontend would."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

from worker import db
from worker.config import Settings
from worker.handlers.base import Handler, builtin_handlers
from worker.handlers.chat import ChatHandler
from worker.loop import Worker
from worker.queue import JobQueue
from worker.storage import LocalStorage

TERMINAL = {"completed", "failed", "canceled"}


@dataclass(frozen=True)
class DemoJob:
    job_type: str
    payload: dict[str, Any]
    expect: str  # final status
    story: str
    cancel_at: int | None = None  # percent at which the demo asks to cancel


DEMO_JOBS = [
    DemoJob("simulate", {"prompt": "a quick job", "config": {"steps": 8, "step_seconds": 0.15}},
            "completed", "completes"),
    DemoJob("simulate", {"prompt": "a longer job", "config": {"steps": 20, "step_seconds": 0.15}},
            "completed", "completes"),
    DemoJob("simulate", {"prompt": "flaky network",
                         "config": {"steps": 6, "step_seconds": 0.1, "fail_code": "NETWORK_ERROR",
                                    "fail_attempts": 1}},
            "completed", "NETWORK_ERROR on attempt 1, retried with backoff, completes"),
    DemoJob("simulate", {"prompt": "changed my mind", "config": {"steps": 40, "step_seconds": 0.1}},
            "canceled", "canceled by its user while running", cancel_at=25),
    DemoJob("simulate", {"prompt": "bad input", "config": {"steps": -3}},
            "failed", "fails with INVALID_INPUT, worker carries on"),
    DemoJob("video_ultra", {"prompt": "no such type"},
            "failed", "fails with UNKNOWN_JOB_TYPE at insert"),
    # Chat on a tiny random-weight Qwen2 built offline: the text is noise, the path is the real one.
    DemoJob("chat_conversation", {"message": "Hello! Who are you?", "system_prompt": "You are a friendly guide.",
                                  "conversation_history": [{"sender": "user", "content": "Hi"},
                                                           {"sender": "assistant", "content": "Hello!"}],
                                  "max_tokens": 300, "min_tokens": 300},
            "completed", "chat reply streamed into the row as it is generated"),
    DemoJob("chat_roleplay", {"message": "What do we steal first?",
                              "character": {"name": "Mira", "personality": "witty"},
                              "scenario": "a heist in Monaco", "max_tokens": 60, "temperature": 0.8},
            "completed", "roleplay, batched with the other chat jobs"),
    DemoJob("chat_enhance", {"prompt": "a cat in a garden", "target": "wan", "max_tokens": 60},
            "completed", "prompt enhanced for WAN: result.enhanced_prompt"),
    DemoJob("chat_conversation", {"message": "Please write for ever", "max_tokens": 2000, "min_tokens": 2000},
            "canceled", "chat canceled mid-generation", cancel_at=5),
    DemoJob("chat_conversation", {"message": "hi", "temperature": 2},
            "failed", "temperature out of range: INVALID_INPUT"),
    # SDXL and WAN on tiny random-weight pipelines built offline: noise pictures, the real path.
    DemoJob("sdxl_image_fast", {"prompt": "a lighthouse at dusk, oil painting",
                                "config": {"width": 64, "height": 64, "steps": 30, "num_images": 3, "seed": 42}},
            "completed", "SDXL batch of 3 (seeds 42-44): PNGs with prompt/seed metadata, live previews"),
    DemoJob("video_fast", {"prompt": "waves rolling onto a beach at sunset",
                           "config": {"width": 64, "height": 64, "steps": 30, "frame_num": 9, "seed": 7}},
            "completed", "WAN 2.1 9-frame clip: H.264 MP4 + PNG thumbnail, live previews of its frames"),
]


def run_demo(settings: Settings, console: Console, concurrency: int = 2) -> bool:
    # Progress written up to ten times a second: the tiny models' jobs take a second or less.
    settings = settings.model_copy(update={"concurrency": concurrency, "retry_base_seconds": 0.5,
                                           "lease_seconds": 10.0, "progress_interval": 0.1})
    console.print(f"[bold]ourvidz-worker demo[/] — state in {settings.home_dir}")
    url = db.resolve_database_url(settings)
    console.print(f"database: {'DATABASE_URL' if settings.database_url else 'embedded Postgres'} ({url})")
    applied = db.migrate(url, settings)
    console.print(f"migrations: {len(applied)} applied now")

    queue = JobQueue(db.make_pool(url, 2, name="demo"))
    ids = [queue.enqueue(job.job_type, job.payload) for job in DEMO_JOBS]
    console.print(f"enqueued {len(ids)} jobs; starting a worker (concurrency {concurrency})\n")

    handlers = builtin_handlers()
    handlers["chat"] = demo_chat_handler(settings, console)
    handlers.update(demo_diffusion_handlers(settings, console))
    worker = Worker(settings, handlers, LocalStorage(settings.storage_dir), database_url=url)
    thread = threading.Thread(target=worker.run, kwargs={"install_signals": False}, daemon=True)
    thread.start()

    cancel_points = {job_id: demo.cancel_at for job_id, demo in zip(ids, DEMO_JOBS, strict=True)}

    def cancel_when_due(rows: list[dict[str, Any]]) -> None:
        for row in rows:
            at = cancel_points.get(row["id"])
            if at is not None and row["status"] == "processing" and row["progress"] >= at:
                queue.request_cancel(row["id"])
                cancel_points[row["id"]] = None

    try:
        rows = follow(queue, ids, console, on_tick=cancel_when_due, labels=[d.story for d in DEMO_JOBS])
        worker.beat_now()  # so the dashboards show the models this worker holds right now
        print_dashboards(queue, console)
    finally:
        worker.stop()
        thread.join(timeout=30)

    table = Table("job", "type", "status", "attempts", "expected", "result / error", title="final rows")
    ok = True
    for demo, row in zip(DEMO_JOBS, rows, strict=True):
        good = row["status"] == demo.expect
        ok &= good
        if row["result"]:
            result = row["result"]
            text = result.get("enhanced_prompt", result.get("response"))
            detail = (", ".join(a["url"] for a in result.get("assets", []))
                      or (f"{result['usage']['completion_tokens']} tokens: {text!r}"[:60] if text is not None else "")
                      or str(result)[:60])
        elif row["error"]:
            detail = f"{row['error']['code']}: {row['error']['message']}"
        else:
            detail = ""
        table.add_row(str(row["id"])[:8], row["job_type"], row["status"], f"{row['attempts']}/{row['max_attempts']}",
                      demo.story, detail, style=None if good else "red")
    console.print(table)
    console.print("[green]every job ended as expected[/]" if ok else "[red]some jobs did not end as expected[/]")
    return ok


def print_dashboards(queue: JobQueue, console: Console,
                     views: tuple[str, ...] = ("queue_depth", "job_latency_24h", "job_failure_rates_24h",
                                               "worker_memory")) -> None:
    """The SQL dashboard views, as Studio or Grafana would show them."""
    for view in views:
        rows = queue.read_dashboard(view)
        table = Table(*(rows[0].keys() if rows else ["(no rows)"]), title=f"view {view}", title_justify="left")
        for row in rows:
            table.add_row(*(_cell(v) for v in row.values()))
        console.print(table)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, list | dict):
        return json.dumps(value, default=str)[:40]
    return "" if value is None else str(value)[:40]


def demo_diffusion_handlers(settings: Settings, console: Console) -> dict[str, Handler]:
    """SDXL and WAN handlers on tiny pipelines built offline under HOME/models (once; reused after).
    Their model folders declare the small sizes and step counts the demo jobs use."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from worker.handlers.sdxl import SdxlHandler
    from worker.handlers.wan import WanHandler
    from worker.tiny_diffusion import build_tiny_models

    models = build_tiny_models(settings.home_dir / "models", i2v=False)
    console.print(f"diffusion models: tiny random-weight SDXL and WAN 2.1 under {models['sdxl'].parent}")
    # Tiny models denoise in milliseconds: a preview every other step, at most every 0.1 s, so that they show.
    tiny = settings.model_copy(update={"diffusion_device": "cpu", "diffusion_dtype": "float32",
                                       "preview_every_steps": 2, "preview_min_seconds": 0.1})
    return {"sdxl": SdxlHandler(tiny, model=str(models["sdxl"])),
            "wan": WanHandler(tiny, model=str(models["wan"]), vace_model=str(models["wan_vace"]), i2v_model="")}


def demo_chat_handler(settings: Settings, console: Console) -> ChatHandler:
    """The chat handler on a tiny model built offline under HOME/models (once; reused after)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from worker.tiny_models import build_tiny_qwen

    path = build_tiny_qwen(settings.home_dir / "models" / "tiny-qwen2")
    console.print(f"chat model: tiny random-weight Qwen2 at {path}")
    return ChatHandler(settings.model_copy(update={"chat_model": str(path), "chat_device": "cpu"}))


def follow(queue: JobQueue, ids: list[UUID], console: Console,
           on_tick: Callable[[list[dict[str, Any]]], None] | None = None,
           labels: list[str] | None = None, timeout: float = 600.0) -> list[dict[str, Any]]:
    """Show live progress bars for `ids` until every row is terminal; return the final rows."""
    columns = (TextColumn("{task.fields[short]}"), TextColumn("{task.description}", style="dim"), BarColumn(),
               TextColumn("{task.percentage:>3.0f}%"), TextColumn("{task.fields[status]}"),
               TextColumn("{task.fields[stage]}", style="dim"), TextColumn("{task.fields[live]}", style="cyan"))
    deadline = time.monotonic() + timeout
    with Progress(*columns, console=console) as progress:
        tasks = [progress.add_task((labels[i] if labels else ""), total=100, short=str(job_id)[:8],
                                   status="", stage="", live="") for i, job_id in enumerate(ids)]
        while True:
            rows = [_row(queue, job_id) for job_id in ids]
            for task, row in zip(tasks, rows, strict=True):
                progress.update(task, completed=row.get("progress", 0), status=_colored(row.get("status", "?")),
                                stage=row.get("stage") or "", live=_live(row))
            if on_tick:
                on_tick(rows)
            if all(row.get("status") in TERMINAL for row in rows) or time.monotonic() > deadline:
                return rows
            time.sleep(0.1)


def _live(row: dict[str, Any]) -> str:
    """What a watcher sees of a running job besides progress: the estimate and the preview's URL."""
    parts = []
    eta = row.get("estimated_completion_at")
    if eta is not None:
        parts.append(f"~{max(0.0, (eta - datetime.now(UTC)).total_seconds()):.1f}s left")
    preview = row.get("preview")
    if preview:
        parts.append(f"preview {preview.get('step')}/{preview.get('steps')}: {preview['url'].rsplit('/', 1)[-1]}")
    return "  ".join(parts)


def _row(queue: JobQueue, job_id: UUID) -> dict[str, Any]:
    row = queue.get_job(job_id)
    if row is None:
        raise LookupError(f"no job {job_id}")
    return row


def _colored(status: str) -> str:
    color = {"completed": "green", "failed": "red", "canceled": "yellow", "processing": "cyan"}.get(status, "white")
    return f"[{color}]{status}[/]"
