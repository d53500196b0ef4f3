"""`run --preload`: every served model is loaded and warmed before the first claim; a handler that
cannot load or warm up is the worker's own fault (its types are not claimed), never a crash."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import WorkerThread, wait_status
from tests.diffusion_support import read_job_types
from worker.config import Settings
from worker.handlers.base import JobContext
from worker.jobs import Job
from worker.memory import MemoryManager
from worker.preload import DiscardStorage, preload, with_variant
from worker.queue import JobQueue


class Log:
    def __init__(self) -> None:
        self.events: list[str] = []
        self.lock = threading.Lock()

    def add(self, event: str) -> None:
        with self.lock:
            self.events.append(event)


class WarmHandler:
    """Has its own warm_up()."""

    def __init__(self, log: Log) -> None:
        self.log = log
        self.loaded = False

    def load(self) -> None:
        self.loaded = True
        self.log.add("warm:load")

    def warm_up(self) -> None:
        assert self.loaded, "warm_up before load"
        self.log.add("warm:warm_up")

    def run(self, job: Job, ctx: JobContext) -> dict[str, Any]:
        self.log.add(f"warm:run:{job.id}")
        return {"ok": True}


class PlainHandler:
    """No warm_up(): the preload runs one tiny job through prepare() and run()."""

    def __init__(self, log: Log) -> None:
        self.log = log
        self.payloads: list[Any] = []
        self.assets: list[dict[str, Any]] = []

    def load(self) -> None:
        self.log.add("plain:load")

    def prepare(self, job: Job, ctx: JobContext) -> None:
        ctx.prepared = "prepared"

    def run(self, job: Job, ctx: JobContext) -> dict[str, Any]:
        assert ctx.prepared == "prepared"
        self.payloads.append(job.payload)
        ctx.progress(0.5, "warming")
        self.assets.append(ctx.publish(b"data", ext="bin", content_type="application/octet-stream"))
        self.log.add("plain:run")
        return {"ok": True}


class BrokenHandler:
    def load(self) -> None:
        raise RuntimeError("weights missing at /nowhere")

    def run(self, job: Job, ctx: JobContext) -> dict[str, Any]:
        raise AssertionError("never runs")


def test_preload_warms_each_served_model_before_the_first_claim_and_a_broken_one_is_a_fault(
        queue: JobQueue, start_worker: Any, settings: Settings) -> None:
    for name in ("warm", "plain", "broken"):
        queue.upsert_job_type(f"{name}_job", "test", name, max_attempts=3)
    log = Log()
    first = queue.enqueue("warm_job", {})
    worker = start_worker({"warm": WarmHandler(log), "plain": PlainHandler(log)})
    wait_status(queue, first, "completed")
    assert "warm:warm_up" not in log.events and "plain:load" not in log.events  # opt-in: loads on the first job
    worker.stop()

    log.events.clear()
    warm_job = queue.enqueue("warm_job", {})
    broken_job = queue.enqueue("broken_job", {})
    plain = PlainHandler(log)
    handlers: dict[str, Any] = {"warm": WarmHandler(log), "plain": plain, "broken": BrokenHandler()}
    preloading = WorkerThread(settings.model_copy(update={"worker_id": "test-preload", "fault_retry_seconds": 600.0}),
                              handlers)
    preloading.worker.preload = True  # type: ignore[attr-defined]  # what `run --preload` sets
    preloading.start()
    try:
        done = wait_status(queue, warm_job, "completed")
        assert done["result"] == {"ok": True}
        events = log.events
        assert events.index("warm:load") < events.index("warm:warm_up") < events.index(f"warm:run:{warm_job}")
        assert events.index("plain:run") < events.index(f"warm:run:{warm_job}")  # every model before the first claim
        assert plain.payloads == [{"prompt": "warm-up"}]
        assert plain.assets[0]["url"].startswith("warm-up://")  # published nowhere
        assert not (Path(settings.storage_dir) / "plain_job").exists()
        faults = preloading.worker.faults
        assert set(faults) == {"handler:broken"} and "weights missing at /nowhere" in faults["handler:broken"]
        assert queue.get_job(broken_job)["status"] == "queued"  # not claimed, not failed
        assert preloading.thread.is_alive()
    finally:
        preloading.stop()


def test_sdxl_is_warmed_by_a_two_step_job_of_its_first_type(models: dict[str, Path], database_url: str,
                                                               tmp_path: Path) -> None:
    from worker.handlers.sdxl import SdxlHandler

    settings = Settings(home=tmp_path, diffusion_device="cpu")
    sdxl = SdxlHandler(settings, model=str(models["sdxl"]))
    requests: list[Any] = []
    parse = sdxl.parse
    sdxl.parse = lambda job: requests.append(parse(job)) or requests[-1]  # type: ignore[method-assign]
    handlers: dict[str, Any] = {"sdxl": sdxl}
    memory = MemoryManager(settings, handlers)
    types = read_job_types(database_url)
    served = [types["sdxl_image_fast"], types["sdxl_image_high"]]
    assert preload(handlers, memory, served) == {}
    assert memory.is_resident("sdxl") and sdxl.pipe is not None
    assert [(r.steps, r.num_images) for r in requests] == [(2, 1)]
    assert requests[0].width == parse(_job(types["sdxl_image_fast"])).width  # the served type's own size
    # the fp16 variant is asked for by default and the tiny folder has none: its default weights load
    assert settings.sdxl_variant == "fp16" and sdxl.variant == "fp16"


def _job(job_type: Any) -> Job:
    from worker.preload import warm_up_job

    return warm_up_job(job_type, {"prompt": "x"})


def test_with_variant_falls_back_only_when_the_variant_is_missing() -> None:
    calls: list[dict[str, Any]] = []

    def load(source: str, **kwargs: Any) -> str:
        calls.append(kwargs)
        if kwargs.get("variant") == "fp16":
            raise ValueError("You are trying to load the model files of the `variant=fp16`, but no such modeling "
                             "files are available.")
        return source

    assert with_variant(load, "repo", "fp16", dtype="bf16") == "repo"
    assert calls == [{"variant": "fp16", "dtype": "bf16"}, {"dtype": "bf16"}]

    def broken(source: str, **kwargs: Any) -> str:
        raise OSError("disk read error")

    with pytest.raises(OSError, match="disk read error"):
        with_variant(broken, "repo", "fp16")
    calls.clear()
    assert with_variant(load, "repo", None) == "repo" and calls == [{}]


def test_discard_storage_keeps_nothing() -> None:
    from worker.storage import ObjectNotFound

    storage = DiscardStorage()
    stored = storage.upload("b", "p/0.png", b"abc", "image/png")
    assert stored.size == 3 and stored.url == "warm-up://b/p/0.png"
    with pytest.raises(ObjectNotFound):
        storage.download("b", "p/0.png")


def test_chat_and_wan_warm_up_payloads_fit_their_first_served_types(models: dict[str, Path], database_url: str,
                                                                     tmp_path: Path) -> None:
    from worker.handlers.chat import ChatHandler
    from worker.handlers.wan import WanHandler
    from worker.tiny_models import build_tiny_qwen

    settings = Settings(home=tmp_path, diffusion_device="cpu")
    chat = ChatHandler(settings, model=str(build_tiny_qwen(tmp_path / "tiny-qwen2")), device="cpu")
    wan = WanHandler(settings, model=str(models["wan"]), vace_model="", chat=chat)
    requests: list[Any] = []
    parse = wan.parse
    wan.parse = lambda job: requests.append(parse(job)) or requests[-1]  # type: ignore[method-assign]
    handlers: dict[str, Any] = {"chat": chat, "wan": wan}
    memory = MemoryManager(settings, handlers)
    types = read_job_types(database_url)
    served = sorted((t for t in types.values() if t.handler in handlers), key=lambda t: t.name)
    assert preload(handlers, memory, served) == {}
    assert memory.loaded_names() == ["chat", "wan"]
    assert [(r.steps, r.enhance) for r in requests] == [(2, False)]
    assert chat.model is not None and chat._unreported_load == 0.0  # a chat job ran: its first job waited for no load
