"""Activation headroom (worker/headroom.py): evictions keep free, inside the budget, what the jobs of the
model being loaded and of the running models need beyond their weights. On CPU with fake sizes: models
of 1 MiB of real buffers under a 5 MiB budget."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from worker import memory as memory_module
from worker.config import Settings
from worker.handlers.base import JobContext
from worker.headroom import ACTIVATION_HEADROOM, GIB, headroom_bytes
from worker.jobs import Job
from worker.memory import MemoryManager

MIB = 1024 * 1024


class Fake:
    def __init__(self, name: str, events: list[str], activation_bytes: int | None = None) -> None:
        self.name, self.events = name, events
        self.module: torch.nn.Module | None = None
        if activation_bytes is not None:
            self.activation_bytes = activation_bytes

    def load(self) -> None:
        module = torch.nn.Module()
        module.register_buffer("weights", torch.ones(MIB // 4, dtype=torch.float32))
        self.module = module
        self.events.append(f"load {self.name}")

    def modules(self) -> list[torch.nn.Module]:
        return [self.module] if self.module is not None else []

    def unload(self) -> None:
        self.module = None
        self.events.append(f"unload {self.name}")

    def run(self, job: Job, ctx: JobContext) -> dict[str, Any]:
        return {}


def manager(tmp_path: Path, headrooms: dict[str, int | None]) -> tuple[MemoryManager, list[str]]:
    events: list[str] = []
    handlers: dict[str, Any] = {name: Fake(name, events, room) for name, room in headrooms.items()}
    return MemoryManager(Settings(home=tmp_path, memory_budget=5 * MIB), handlers), events


def load_all(memory: MemoryManager, *names: str) -> None:
    for name in names:
        with memory.use(name):
            pass


def test_loading_a_model_keeps_its_own_headroom_free(tmp_path: Path) -> None:
    memory, events = manager(tmp_path, {"a": None, "b": None, "c": None, "d": 2 * MIB})
    load_all(memory, "a", "b", "c")
    assert memory.weights_limit() == 5 * MIB
    assert memory.weights_limit("d") == 3 * MIB
    load_all(memory, "d")  # 3 MiB resident + 1 MiB fit 5 MiB, but not 5 MiB less d's 2 MiB of activations
    assert [e for e in events if e.startswith("unload")] == ["unload a"]  # least recently used first
    assert memory.loaded_names() == ["b", "c", "d"]


def test_without_headroom_the_same_load_evicts_nothing(tmp_path: Path) -> None:
    memory, events = manager(tmp_path, {"a": None, "b": None, "c": None, "d": None})
    load_all(memory, "a", "b", "c", "d")
    assert not [e for e in events if e.startswith("unload")]
    assert memory.loaded_names() == ["a", "b", "c", "d"]


def test_a_running_models_headroom_is_kept_free_too(tmp_path: Path) -> None:
    memory, events = manager(tmp_path, {"a": None, "b": None, "video": 2 * MIB, "d": None})
    load_all(memory, "a", "b")
    with memory.use("video"):  # a job of it runs: its decode still comes
        assert memory.weights_limit("d") == 3 * MIB
        load_all(memory, "d")
        assert [e for e in events if e.startswith("unload")] == ["unload a"]
        assert memory.is_resident("video")


def test_the_measured_figures_apply_on_a_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert ACTIVATION_HEADROOM["sdxl"] == int(9.0 * GIB) and ACTIVATION_HEADROOM["wan"] == int(7.6 * GIB)
    assert headroom_bytes("sdxl", object(), on_gpu=True) == int(9.0 * GIB)
    assert headroom_bytes("sdxl", object(), on_gpu=False) == 0  # CPU: the budget counts RAM weights
    assert headroom_bytes("chat", object(), on_gpu=True) == 0

    class Own:
        activation_bytes = 123

    class Renamed:
        family = "wan"

    assert headroom_bytes("sdxl", Own(), on_gpu=False) == 123
    assert headroom_bytes("video", Renamed(), on_gpu=True) == int(7.6 * GIB)

    events: list[str] = []
    handlers: dict[str, Any] = {"sdxl": Fake("sdxl", events), "wan": Fake("wan", events)}
    memory = MemoryManager(Settings(home=tmp_path, memory_budget=40 * GIB), handlers)
    monkeypatch.setattr(memory_module, "_cuda_index", lambda: 0)  # as on a GPU: the family figures apply
    assert memory.weights_limit("sdxl") == 40 * GIB - int(9.0 * GIB)
    memory._resident["wan"] = memory_module.Resident(  # a WAN job running: its decode's 7.6 GiB stays free
        "wan", "wan", GIB, "cuda_allocated", 1.0, memory_module.datetime.now(memory_module.UTC), 0.0,
        memory_module.datetime.now(memory_module.UTC), pins=1)
    assert memory.weights_limit("sdxl") == 40 * GIB - int(9.0 * GIB) - int(7.6 * GIB)
