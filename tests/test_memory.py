"""The memory manager (worker/memory.py): residency under a byte budget, footprints, eviction, OOM
recovery, pressure, the workers row, and how affinity follows eviction.

Where the policy is the point, fake handlers hold real torch buffers of a chosen size (1 MiB);
where the handlers' own unload() and footprints matter, the tiny real chat, SDXL and WAN models.
Everything runs on CPU: the footprint is the bytes of the modules a handler exposes (the GPU path,
memory_allocated deltas, needs a GPU and is not exercised here).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import wait_for, wait_status
from worker.config import Settings
from worker.handlers.base import JobContext, connect_handlers
from worker.jobs import Job
from worker.memory import MemoryManager, is_oom, tensor_bytes, weight_file_bytes
from worker.queue import JobQueue

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download in a test

MIB = 1024 * 1024


class FakeModel:
    """A handler whose model is one real buffer of `size` bytes. Payload `oom_runs: N`: the first N
    runs of the job raise CUDA's out-of-memory error; `sleep` holds the job."""

    concurrent = True

    def __init__(self, name: str, events: list[str], size: int = MIB) -> None:
        self.name, self.events, self.size = name, events, size
        self.module: torch.nn.Module | None = None
        self.runs: list[tuple[str, int]] = []

    @property
    def model_key(self) -> str:
        return f"fake/{self.name}"

    def load(self) -> None:
        if self.module is None:
            self.events.append(f"load {self.name}")
            module = torch.nn.Module()
            module.register_buffer("weights", torch.ones(self.size // 4, dtype=torch.float32))
            self.module = module

    def modules(self) -> list[torch.nn.Module]:
        return [self.module] if self.module is not None else []

    def unload(self) -> None:
        self.events.append(f"unload {self.name}")
        self.module = None

    def run(self, job: Job, ctx: JobContext) -> dict[str, Any]:
        assert self.module is not None, "run without a loaded model"
        earlier = sum(1 for j, _ in self.runs if j == str(job.id))
        self.runs.append((str(job.id), job.attempts))
        if earlier < job.payload.get("oom_runs", 0):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        deadline = time.monotonic() + float(job.payload.get("sleep", 0))
        while time.monotonic() < deadline:
            ctx.check()
            time.sleep(0.01)
        return {"handler": self.name, "runs": sum(1 for j, _ in self.runs if j == str(job.id))}


def fakes(*names: str) -> tuple[dict[str, Any], list[str]]:
    events: list[str] = []
    return {name: FakeModel(name, events) for name in names}, events


def manager(handlers: dict[str, Any], budget: float, **settings: Any) -> MemoryManager:
    return MemoryManager(Settings(memory_budget=int(budget), **settings), handlers)


def touch(memory: MemoryManager, *names: str) -> None:
    for name in names:
        with memory.use(name):
            pass


def register_types(sql: Any, queue: JobQueue, *pairs: tuple[str, str]) -> None:
    """Job types `type_<handler>` served by each handler, with a model named, so affinity applies."""
    for handler, model in pairs:
        queue.upsert_job_type(f"type_{handler}", "test", handler, max_attempts=3)
        sql.execute("update job_types set model = %s where name = %s", (model, f"type_{handler}"))


# --- policy, with fake handlers ---------------------------------------------------------------


def test_lru_eviction_order_under_a_byte_budget() -> None:
    handlers, events = fakes("a", "b", "c")
    memory = manager(handlers, 2.5 * MIB)
    touch(memory, "a", "b", "a")  # b is now the least recently used
    touch(memory, "c")
    assert memory.loaded_names() == ["a", "c"]
    touch(memory, "b")  # a (used before c) goes next
    assert memory.loaded_names() == ["b", "c"]
    assert [e.name for e in memory.stats.history] == ["b", "a"]
    assert all(e.verified and e.freed == MIB for e in memory.stats.history)
    assert events.count("load a") == 1 and events.count("load b") == 2
    assert memory.used_bytes() == 2 * MIB <= memory.budget_bytes()  # type: ignore[operator]
    assert handlers["a"].module is None and handlers["c"].module is not None


def test_a_model_with_a_running_job_is_not_evicted() -> None:
    handlers, events = fakes("a", "b", "c")
    memory = manager(handlers, 1.5 * MIB)
    running, finish = threading.Event(), threading.Event()

    def job_on_a() -> None:
        with memory.use("a"):
            running.set()
            finish.wait(10)

    thread = threading.Thread(target=job_on_a)
    thread.start()
    assert running.wait(10)
    touch(memory, "b")  # over budget, but a is in use: loaded beside it, a stays
    assert memory.loaded_names() == ["a", "b"] and handlers["a"].module is not None
    assert memory.evict("a") is None and "unload a" not in events
    assert memory.stats.over_budget_loads == 1
    assert memory.status()["pressure"] == "critical"  # 2 MiB of 1.5
    finish.set()
    thread.join(10)
    touch(memory, "c")  # now both are idle: b (released first) and a go, oldest first
    assert memory.loaded_names() == ["c"]
    assert [e.name for e in memory.stats.history] == ["b", "a"]


def test_known_footprint_is_reused_to_make_room_before_the_load() -> None:
    handlers, events = fakes("a", "b")
    memory = manager(handlers, 1.5 * MIB)
    assert memory.estimate("a") == 0  # never loaded, no weight files: unknown
    touch(memory, "a", "b")  # b's size unknown: room is made only after its load
    assert events == ["load a", "load b", "unload a"]
    assert memory.known_footprint("a") == MIB and memory.estimate("a") == MIB
    touch(memory, "a")  # a's measured footprint says it will not fit: b goes first
    assert events[3:] == ["unload b", "load a"]
    assert memory.status()["models"][0]["bytes"] == MIB


def test_pressure_levels() -> None:
    handlers = {"a": FakeModel("a", [], size=3 * MIB), "b": FakeModel("b", [], size=MIB // 2)}
    memory = manager(handlers, 4 * MIB)
    assert memory.status()["pressure"] == "low" and memory.used_bytes() == 0
    touch(memory, "a")
    assert memory.status()["pressure"] == "medium"  # 0.75
    touch(memory, "b")
    assert memory.status()["pressure"] == "high"  # 0.875
    assert [memory.pressure(used, 100) for used in (0, 69, 70, 84, 85, 94, 95, 120)] == [
        "low", "low", "medium", "medium", "high", "high", "critical", "critical"]
    custom = manager(handlers, 100, memory_pressure_levels="0.5,0.6,0.9")
    assert [custom.pressure(used, 100) for used in (49, 50, 60, 90)] == ["low", "medium", "high", "critical"]
    unlimited = manager(handlers, 0)
    assert unlimited.budget_bytes() is None and unlimited.pressure(4 * MIB) == "low"
    with pytest.raises(ValueError):
        Settings(memory_pressure_levels="0.9,0.5,0.95")


def test_is_oom_recognises_torch_python_and_handler_errors() -> None:
    from worker.jobs import ErrorCode, JobError

    assert is_oom(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert is_oom(MemoryError())
    assert is_oom(JobError(ErrorCode.OOM_ERROR, "out of GPU memory at 1024x1024"))
    wrapped = JobError(ErrorCode.MODEL_LOAD_ERROR, "could not be loaded")
    wrapped.__cause__ = RuntimeError("CUDA error: out of memory")
    assert is_oom(wrapped)
    assert not is_oom(RuntimeError("boom")) and not is_oom(JobError(ErrorCode.INVALID_INPUT, "out of memory?"))


# --- the real handlers' footprints and unload(), on the tiny models ---------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from worker.tiny_diffusion import build_tiny_sdxl, build_tiny_wan
    from worker.tiny_models import build_tiny_qwen

    root = tmp_path_factory.getbasetemp() / "tiny-memory"
    return {"chat": build_tiny_qwen(root / "tiny-qwen2"), "sdxl": build_tiny_sdxl(root / "tiny-sdxl"),
            "wan": build_tiny_wan(root / "tiny-wan-t2v")}


def tiny_handlers(tiny: dict[str, Path], home: Path) -> dict[str, Any]:
    from worker.handlers.chat import ChatHandler
    from worker.handlers.sdxl import SdxlHandler
    from worker.handlers.wan import WanHandler

    settings = Settings(home=home, chat_device="cpu", diffusion_device="cpu")
    handlers: dict[str, Any] = {
        "chat": ChatHandler(settings, model=str(tiny["chat"])),
        "sdxl": SdxlHandler(settings, model=str(tiny["sdxl"])),
        "wan": WanHandler(settings, model=str(tiny["wan"]), vace_model="", i2v_model=""),
    }
    connect_handlers(handlers)
    return handlers


@pytest.mark.parametrize("name", ["chat", "sdxl", "wan"])
def test_real_models_footprint_is_measured_and_unload_frees_it(name: str, tiny: dict[str, Path],
                                                               tmp_path: Path) -> None:
    handlers = tiny_handlers(tiny, tmp_path)
    memory = manager(handlers, 0)
    on_disk = weight_file_bytes(str(tiny[name]))
    assert on_disk > 0 and memory.estimate(name) == on_disk  # first load: estimated from the weight files
    with memory.use(name) as handler:
        modules = handler.modules()
        expected = sum(t.numel() * t.element_size() for m in modules for t in [*m.parameters(), *m.buffers()])
        del modules
    resident = memory.status()["models"][0]
    assert resident["handler"] == name and resident["model"] == str(tiny[name])
    assert resident["measured_by"] == "tensor_bytes" and resident["bytes"] == expected > 0
    assert memory.estimate(name) == expected  # measured: now the estimate for the next load
    eviction = memory.evict(name)
    assert eviction is not None and eviction.verified and eviction.freed == expected  # nothing else held the weights
    assert handlers[name].modules() == [] and memory.loaded_names() == []
    with memory.use(name) as handler:  # loads again through load()
        assert tensor_bytes(handler.modules()) == expected
    assert memory.stats.loads == 2


def test_sdxl_img2img_shares_the_txt2img_weights(tiny: dict[str, Path], tmp_path: Path) -> None:
    sdxl = tiny_handlers(tiny, tmp_path)["sdxl"]
    sdxl.load()
    assert sdxl.img2img.unet is sdxl.pipe.unet and sdxl.img2img.vae is sdxl.pipe.vae
    img2img = [c for c in sdxl.img2img.components.values() if isinstance(c, torch.nn.Module)]
    assert tensor_bytes([*sdxl.modules(), *img2img]) == tensor_bytes(sdxl.modules())


# --- through the real worker ---------------------------------------------------------------


def test_oom_evicts_idle_models_and_retries_once_in_process(queue: JobQueue, sql: Any,
                                                             start_worker: Callable[..., Any]) -> None:
    handlers, events = fakes("big", "idle")
    register_types(sql, queue, ("big", "model-big"), ("idle", "model-idle"))
    worker = start_worker(handlers, memory_budget=64 * MIB)
    wait_status(queue, queue.enqueue("type_idle", {}), "completed")
    assert worker.worker.memory.loaded_names() == ["idle"]

    job_id = queue.enqueue("type_big", {"oom_runs": 1})
    row = wait_status(queue, job_id, "completed")
    assert row["attempts"] == 1 and row["errors"] == [] and row["result"]["runs"] == 2  # retried in-process
    assert "unload idle" in events and worker.worker.memory.loaded_names() == ["big"]
    assert worker.worker.memory.stats.oom_relieved == 1


def test_second_oom_requeues_with_oom_error_and_the_worker_carries_on(queue: JobQueue, sql: Any,
                                                                       start_worker: Callable[..., Any]) -> None:
    handlers, _ = fakes("big")
    register_types(sql, queue, ("big", "model-big"))
    worker = start_worker(handlers, memory_budget=64 * MIB)
    job_id = queue.enqueue("type_big", {"oom_runs": 2})
    requeued = wait_for(lambda: (r := queue.get_job(job_id)) and r["errors"] and r)
    first = requeued["errors"][0]
    assert first["code"] == "OOM_ERROR" and first["retryable"] is True and first["attempt"] == 1
    assert "again after evicting" in first["message"]
    row = wait_status(queue, job_id, "completed")
    assert row["attempts"] == 2 and [r[1] for r in handlers["big"].runs if r[0] == str(job_id)] == [1, 1, 2]
    assert wait_status(queue, queue.enqueue("type_big", {}), "completed")["attempts"] == 1  # still healthy
    assert worker.thread.is_alive()


def test_workers_row_shows_loaded_models_and_pressure_after_a_heartbeat(queue: JobQueue, sql: Any,
                                                                         start_worker: Callable[..., Any]) -> None:
    handlers, _ = fakes("a")
    register_types(sql, queue, ("a", "model-a"))
    worker = start_worker(handlers, memory_budget=int(1.25 * MIB))
    wait_status(queue, queue.enqueue("type_a", {}), "completed")

    def row() -> dict[str, Any] | None:
        found = sql.execute("select * from workers where id = %s", (worker.worker.id,)).fetchone()
        return found if found and found["loaded_models"] else None

    beat = wait_for(row, timeout=10)
    [model] = beat["loaded_models"]
    assert model["handler"] == "a" and model["model"] == "fake/a" and model["bytes"] == MIB
    assert model["in_use"] == 0 and model["last_used_at"]
    assert beat["memory_pressure"] == "medium"  # 1 MiB of 1.25: 0.8
    assert beat["memory_used_mb"] == 1 and beat["memory_budget_mb"] == 2  # rounded up
    assert beat["vram_used_mb"] is None  # a CPU worker has no VRAM to report
    view = sql.execute("select * from worker_memory where worker_id = %s", (worker.worker.id,)).fetchone()
    assert view["models"] == ["fake/a"] and view["model_count"] == 1 and view["memory_pressure"] == "medium"


def test_affinity_follows_eviction(queue: JobQueue, sql: Any, start_worker: Callable[..., Any]) -> None:
    handlers, events = fakes("a", "b")
    register_types(sql, queue, ("a", "model-a"), ("b", "model-b"))
    worker = start_worker(handlers, memory_budget=int(1.5 * MIB))  # room for one
    loop = worker.worker
    wait_status(queue, queue.enqueue("type_a", {}), "completed")
    assert loop._affine_types() == ["type_a"]
    wait_status(queue, queue.enqueue("type_b", {}), "completed")
    assert events[-1] == "unload a" and loop._affine_types() == ["type_b"]  # a evicted: no longer affine

    # an older a job and a newer b job arrive together: b's model is resident, so b goes first
    ids = {r["job_type"]: r["id"] for r in sql.execute(
        "insert into jobs (job_type, payload, run_at) values ('type_a', '{}', now() - interval '2 seconds'), "
        "('type_b', '{}', now()) returning id, job_type").fetchall()}
    a_row, b_row = (wait_status(queue, ids[t], "completed") for t in ("type_a", "type_b"))
    assert b_row["started_at"] < a_row["started_at"]
    assert loop._affine_types() == ["type_a"] and loop.memory.loaded_names() == ["a"]
    assert wait_for(lambda: [m["model"] for m in sql.execute(
        "select loaded_models from workers where id = %s", (loop.id,)).fetchone()["loaded_models"]] == ["fake/a"],
        timeout=10)


def test_wan_enhancement_reloads_an_evicted_chat_model_through_the_manager(
        queue: JobQueue, start_worker: Callable[..., Any], tiny: dict[str, Path], tmp_path: Path) -> None:
    handlers = tiny_handlers(tiny, tmp_path)
    del handlers["sdxl"]
    sizes = {name: weight_file_bytes(str(tiny[name])) for name in ("chat", "wan")}
    worker = start_worker(handlers, memory_budget=int(1.2 * max(sizes.values())))  # one of the two fits
    memory = worker.worker.memory
    chat_job = {"message": "hi", "max_tokens": 4}
    wait_status(queue, queue.enqueue("chat_conversation", chat_job), "completed", timeout=60)
    first_chat_model = handlers["chat"].model
    assert memory.loaded_names() == ["chat"] and first_chat_model is not None

    tiny_image = {"prompt": "a cat", "config": {"width": 64, "height": 64, "steps": 2, "seed": 3}}
    wait_status(queue, queue.enqueue("image_fast", tiny_image), "completed", timeout=60)
    assert memory.loaded_names() == ["wan"] and handlers["chat"].model is None  # chat evicted for WAN
    del first_chat_model

    row = wait_status(queue, queue.enqueue("image7b_fast_enhanced", tiny_image), "completed", timeout=60)
    assert row["result"]["enhanced_prompt"] and row["attempts"] == 1
    assert memory.loaded_names() == ["chat", "wan"]  # loaded beside the running WAN job, which kept its model
    assert memory.stats.over_budget_loads == 1 and handlers["chat"].model is not None
    assert [e.name for e in memory.stats.history] == ["chat"]
    assert memory.stats.loads == 3  # chat, wan, chat again: the same handler instance reloaded its model


# --- a model that cannot be loaded here is the worker's fault (worker.faults) ------------------


class Unloadable:
    """load() raises what it is given."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def load(self) -> None:
        raise self.error

    def run(self, job: Job, ctx: JobContext) -> dict[str, Any]:
        raise AssertionError("never run without a model")


def test_a_failed_load_is_a_worker_fault_scoped_to_its_handler(tmp_path: Path) -> None:
    from worker.handlers.diffusion import load_error
    from worker.jobs import ErrorCode, JobError, WorkerFault

    missing = OSError(f"Error no file named model_index.json found in directory {tmp_path}/sdxl.")
    cuda = AssertionError("Torch not compiled with CUDA enabled")
    cases = {"missing": load_error("SDXL model", str(tmp_path / "sdxl"), missing), "cuda": cuda,
             "unreadable": PermissionError(13, "Permission denied", str(tmp_path / "weights.safetensors"))}
    for name, error in cases.items():
        memory = manager({name: Unloadable(error)}, 0)
        with pytest.raises(WorkerFault) as caught, memory.use(name):
            pass
        assert caught.value.scope == f"handler:{name}" and caught.value.code == ErrorCode.MODEL_LOAD_ERROR
        assert caught.value.message.startswith(f"{name} model {name} could not be loaded: ")
        assert "\n" not in caught.value.message and not memory.is_resident(name)
        if name == "missing":  # the cause under the handler's own wrapper
            assert "could not be loaded: OSError: Error no file named model_index.json" in caught.value.message

    # the job's own reason, an out-of-memory load and a full disk are not the handler's fault
    own = JobError(ErrorCode.INVALID_INPUT, "this LoRA is not allowed")
    with pytest.raises(JobError) as kept:
        touch(manager({"h": Unloadable(own)}, 0), "h")
    assert kept.value is own
    with pytest.raises(JobError) as oom:
        touch(manager({"h": Unloadable(torch.cuda.OutOfMemoryError("CUDA out of memory"))}, 0), "h")
    assert oom.value.code == ErrorCode.OOM_ERROR
    with pytest.raises(WorkerFault) as disk:
        touch(manager({"h": Unloadable(OSError(28, "No space left on device"))}, 0), "h")
    assert disk.value.scope == "disk"


def test_a_real_handler_whose_model_path_does_not_exist(tmp_path: Path) -> None:
    from worker.handlers.chat import ChatHandler
    from worker.jobs import WorkerFault

    chat = ChatHandler(Settings(home=tmp_path, chat_device="cpu"), model=str(tmp_path / "no-model"))
    with pytest.raises(WorkerFault) as caught:
        touch(manager({"chat": chat}, 0), "chat")
    assert caught.value.scope == "handler:chat"
    assert caught.value.message.startswith(f"chat model {tmp_path / 'no-model'} could not be loaded: ")


def test_worker_fault_of_tells_the_workers_faults_from_the_jobs() -> None:
    from worker.faults import worker_fault_of
    from worker.jobs import ErrorCode, JobError, WorkerFault

    def scope(exc: BaseException, handler: str | None = None) -> str | None:
        fault = worker_fault_of(exc, handler)
        return fault.scope if fault else None

    wrapped = RuntimeError("the step failed")
    wrapped.__cause__ = OSError(28, "No space left on device", "/scratch/job/video.mp4")
    assert scope(wrapped) == "disk"
    assert scope(RuntimeError("CUDA error: an illegal memory access was encountered")) == "device"
    assert scope(RuntimeError("No CUDA GPUs are available")) == "device"
    assert scope(RuntimeError("CUDA error: out of memory")) is None, "out of memory is retried, not a fault"
    assert scope(torch.cuda.OutOfMemoryError("CUDA out of memory")) is None
    load = JobError(ErrorCode.MODEL_LOAD_ERROR, "WAN VACE model 'x' could not be loaded: OSError: missing")
    assert scope(load, "wan") == "handler:wan" and scope(load) is None
    fault = WorkerFault(ErrorCode.STORAGE_ERROR, "refused", scope="storage")
    assert worker_fault_of(fault) is fault
    for own in (JobError(ErrorCode.INVALID_INPUT, "CUDA error in the prompt?"), ValueError("bad"),
                RuntimeError("boom"), OSError(2, "No such file")):
        assert worker_fault_of(own, "sdxl") is None, own
