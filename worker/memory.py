"""Model residency: which models are loaded, what each one costs, and room for the next one.

The worker runs every job inside `MemoryManager.use(handler_name)`: the handler's model is loaded
on demand through its own `load()` (under the process-wide MODEL_LOAD_LOCK) and pinned while the
job runs, so it is never evicted under a running job. When a load would exceed the budget, idle
models are evicted least recently used first through their handlers' optional `unload()`; a
handler without `unload()` stays resident.

Accounting, by where the weights live (CUDA counts once a handler has put a tensor on the GPU):

    GPU  budget     memory_budget, else memory_fraction x the device's total memory
         used       device memory in use (total - free from cudaMemGetInfo): what a load competes for
         footprint  torch.cuda.memory_allocated after the load minus before it (a handler that was
                    already loaded when first seen is counted by its tensor bytes instead)
         freed      memory_allocated before the unload minus after it; under half the footprint: warning
    CPU  budget     memory_budget, else 8 GiB (0: unlimited)
         used       the sum of the resident models' footprints
         footprint  bytes of the parameters and buffers of the torch modules the handler exposes
                    (optional `modules()`; each storage counted once, so shared weights count once).
                    Not the process RSS: allocator caching and libraries make its deltas noise.
         freed      the exposed modules are weakly referenced before the unload; one still alive
                    after it (something else holds it): warning, and its bytes count as not freed

A footprint is remembered per model key (the handler's optional `model_key`, else its `source`, else
its name) and used as the estimate for the next load of that model; the first load of a model is
estimated from the size of its weight files when `source` is a local folder or file (fp32 files of a
model loaded in bf16 overestimate; the measurement replaces it). A model whose exposed tensors grow
while it runs (WAN loads its VACE/I2V pipelines on the first job that needs them) has its footprint
raised when the job releases it.

Headroom: a job needs memory beyond its model's weights (its activations; worker.headroom holds the
measured figures per model family). Evictions keep free, inside the budget, the headroom of the model
being loaded and of every model a running job holds: `weights_limit()`.

Out of memory during a job: the worker calls `relieve()` (gc, empty_cache, evict every idle model)
and retries the job once; see worker.loop. A load that fails for another reason raises WorkerFault
(scope "handler:<name>", or "disk" for a full disk; worker.faults): the job is not to blame.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from worker.config import Settings
from worker.faults import is_oom_error, load_fault
from worker.handlers.base import MODEL_LOAD_LOCK, Handler
from worker.headroom import headroom_bytes
from worker.jobs import ErrorCode, JobError, WorkerFault
from worker.queue import WorkerMemory

log = logging.getLogger(__name__)

PRESSURE_LEVELS = ("low", "medium", "high", "critical")
CPU_DEFAULT_BUDGET = 8 * 1024**3
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")
MIB = 1024 * 1024


@dataclass
class Resident:
    """One loaded model (one handler's)."""

    name: str
    key: str
    footprint: int
    measured_by: str  # cuda_allocated | tensor_bytes | unknown
    load_seconds: float
    loaded_at: datetime
    last_used: float  # monotonic, for LRU
    last_used_at: datetime
    pins: int = 0  # running jobs using it

    def to_json(self) -> dict[str, Any]:
        return {"handler": self.name, "model": self.key, "bytes": self.footprint, "measured_by": self.measured_by,
                "load_seconds": round(self.load_seconds, 3), "loaded_at": self.loaded_at.isoformat(),
                "last_used_at": self.last_used_at.isoformat(), "in_use": self.pins}


@dataclass(frozen=True)
class Eviction:
    name: str
    key: str
    footprint: int
    freed: int
    verified: bool
    reason: str


@dataclass
class MemoryStats:
    loads: int = 0
    evictions: int = 0
    over_budget_loads: int = 0
    oom_relieved: int = 0
    history: list[Eviction] = field(default_factory=list)


def is_oom(err: BaseException | None) -> bool:
    """Out of memory, as torch, Python or a handler (JobError OOM_ERROR) reports it, or caused by it."""
    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, MemoryError) or (isinstance(err, JobError) and err.code == ErrorCode.OOM_ERROR):
            return True
        if is_oom_error(err):
            return True
        err = err.__cause__
        seen += 1
    return False


def _torch() -> Any:
    return sys.modules.get("torch")


def _cuda_index() -> int | None:
    """The CUDA device in use, once something initialized CUDA; never imports torch or initializes CUDA."""
    torch = _torch()
    if torch is None:
        return None
    try:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            return int(torch.cuda.current_device())
    except Exception:  # a broken driver must not break accounting
        return None
    return None


def _allocated(index: int | None) -> int:
    if index is None:
        return 0
    torch = _torch()
    torch.cuda.synchronize(index)
    return int(torch.cuda.memory_allocated(index))


def _modules(handler: Handler) -> list[Any]:
    get = getattr(handler, "modules", None)
    return [m for m in (get() if callable(get) else []) if m is not None]


def tensor_bytes(modules: Iterable[Any]) -> int:
    """Bytes of the parameters and buffers of torch modules, each storage counted once."""
    seen: set[tuple[str, int]] = set()
    total = 0
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.device.type == "meta":
                continue
            storage = tensor.untyped_storage()
            ident = (str(tensor.device), storage.data_ptr())
            if ident not in seen:
                seen.add(ident)
                total += storage.nbytes()
    return total


def weight_file_bytes(source: str | None) -> int:
    """Size of the weight files of a local model folder or file; 0 for a hub id or nothing."""
    if not source:
        return 0
    path = Path(source).expanduser()
    try:
        if path.is_file():
            return path.stat().st_size
        if path.is_dir():
            return sum(p.stat().st_size for p in path.rglob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    except OSError:
        return 0
    return 0


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError):
        return None


def free_caches() -> None:
    gc.collect()
    index = _cuda_index()
    if index is not None:
        _torch().cuda.empty_cache()


class MemoryManager:
    """Residency of one worker process's models. Thread-safe: jobs run in their own threads."""

    def __init__(self, settings: Settings, handlers: Mapping[str, Handler]) -> None:
        self.settings = settings
        self.handlers = handlers  # the worker's dict itself: a handler replaced in it is the one used
        self.stats = MemoryStats()
        self._resident: dict[str, Resident] = {}
        self._footprints: dict[str, int] = {}  # model key -> bytes measured at its last load
        self._lock = threading.Lock()  # bookkeeping only; loads and evictions hold MODEL_LOAD_LOCK
        for handler in handlers.values():
            attach = getattr(handler, "attach_memory", None)
            if callable(attach):
                attach(self)

    # -- queries ------------------------------------------------------------------------

    def loaded_names(self) -> list[str]:
        """Names of the handlers whose model is resident."""
        with self._lock:
            return sorted(self._resident)

    def is_resident(self, name: str) -> bool:
        with self._lock:
            return name in self._resident

    def manages(self, name: str, handler: Any) -> bool:
        """Whether `handler` is the one this manager loads as `name` (a peer handler asks before using it)."""
        return self.handlers.get(name) is handler

    def model_key(self, name: str) -> str:
        handler = self.handlers[name]
        key = getattr(handler, "model_key", None) or getattr(handler, "source", None)
        return str(key) if key else name

    def known_footprint(self, name: str) -> int | None:
        """Bytes measured the last time this handler's model was loaded, if ever."""
        return self._footprints.get(self.model_key(name))

    def estimate(self, name: str) -> int:
        """Expected bytes of loading `name`: its measured footprint, else the size of its weight files."""
        known = self.known_footprint(name)
        if known is not None:
            return known
        handler = self.handlers[name]
        guess = getattr(handler, "estimate_bytes", None)
        if callable(guess):
            return int(guess())
        return weight_file_bytes(getattr(handler, "source", None))

    @property
    def device(self) -> str:
        index = _cuda_index()
        return f"cuda:{index}" if index is not None else "cpu"

    def total_bytes(self) -> int | None:
        """The device's memory (GPU) or the machine's (CPU)."""
        index = _cuda_index()
        if index is None:
            return _physical_memory()
        return int(_torch().cuda.mem_get_info(index)[1])

    def used_bytes(self) -> int:
        """What counts against the budget: device memory in use (GPU), the models' bytes (CPU)."""
        index = _cuda_index()
        if index is None:
            with self._lock:
                return sum(r.footprint for r in self._resident.values())
        free, total = _torch().cuda.mem_get_info(index)
        return int(total - free)

    def budget_bytes(self) -> int | None:
        """Bytes the models may fill; None: unlimited."""
        configured = self.settings.memory_budget
        if configured is not None:
            return int(configured) or None
        index = _cuda_index()
        if index is None:
            return CPU_DEFAULT_BUDGET
        return int(self.settings.memory_fraction * _torch().cuda.mem_get_info(index)[1])

    def headroom(self, name: str) -> int:
        """Bytes a job of `name` needs beyond its weights (worker.headroom)."""
        return headroom_bytes(name, self.handlers.get(name), on_gpu=_cuda_index() is not None)

    def weights_limit(self, keep: str | None = None) -> int | None:
        """What the models' weights may fill: the budget less the headroom of `keep` (the model being
        loaded) and of each model a running job holds, since their activations come on top; None: unlimited."""
        budget = self.budget_bytes()
        if budget is None:
            return None
        with self._lock:
            running = {r.name for r in self._resident.values() if r.pins > 0}
        active = running | ({keep} if keep is not None else set())
        return max(0, budget - sum(self.headroom(name) for name in active))

    def pressure(self, used: int | None = None, budget: int | None = None) -> str:
        """low | medium | high | critical, from used / budget against memory_pressure_levels."""
        used = self.used_bytes() if used is None else used
        budget = self.budget_bytes() if budget is None else budget
        if budget is None:
            budget = self.total_bytes() or 0
        if budget <= 0:
            return "low"
        ratio = used / budget
        medium, high, critical = self.settings.memory_pressure_levels
        if ratio >= critical:
            return "critical"
        if ratio >= high:
            return "high"
        if ratio >= medium:
            return "medium"
        return "low"

    def status(self) -> dict[str, Any]:
        """Everything at once, for /status and the workers row. vram_* only on a GPU."""
        index = _cuda_index()
        with self._lock:
            models = sorted((r.to_json() for r in self._resident.values()), key=lambda m: m["handler"])
        used, total, budget = self.used_bytes(), self.total_bytes(), self.budget_bytes()
        on_gpu = index is not None
        return {
            "device": self.device,
            "models": models,
            "used_bytes": used,
            "total_bytes": total,
            "budget_bytes": budget,
            "pressure": self.pressure(used, budget),
            "vram_used_bytes": used if on_gpu else None,
            "vram_total_bytes": total if on_gpu else None,
            "vram_free_bytes": (total - used) if on_gpu and total is not None else None,
            "loads": self.stats.loads,
            "evictions": self.stats.evictions,
            "over_budget_loads": self.stats.over_budget_loads,
            "oom_relieved": self.stats.oom_relieved,
        }

    snapshot = status

    def report(self) -> WorkerMemory:
        """The workers row's memory columns, for the heartbeat."""
        status = self.status()

        def mib(value: int | None) -> int | None:
            return None if value is None else -(-value // MIB)  # rounded up: a loaded tiny model is not 0

        return WorkerMemory(
            loaded_models=[{k: m[k] for k in ("handler", "model", "bytes", "last_used_at", "in_use")}
                           for m in status["models"]],
            vram_used_mb=mib(status["vram_used_bytes"]),
            vram_total_mb=mib(status["vram_total_bytes"]),
            memory_used_mb=mib(status["used_bytes"]),
            memory_budget_mb=mib(status["budget_bytes"]),
            memory_pressure=status["pressure"],
        )

    # -- loading and pinning ------------------------------------------------------------

    @contextmanager
    def use(self, name: str, on_load: Callable[[], None] | None = None) -> Iterator[Handler]:
        """Load `name`'s model if needed (making room first) and keep it resident until the block ends."""
        self._acquire(name, on_load)
        try:
            yield self.handlers[name]
        finally:
            self._release(name)

    def _acquire(self, name: str, on_load: Callable[[], None] | None) -> None:
        if self._pin(name):
            return
        with MODEL_LOAD_LOCK:  # one load at a time in the process: concurrent from_pretrained calls corrupt each other
            if self._pin(name):
                return
            if on_load is not None:
                on_load()
            self._load(name)

    def _pin(self, name: str) -> bool:
        with self._lock:
            resident = self._resident.get(name)
            if resident is None:
                return False
            resident.pins += 1
            resident.last_used, resident.last_used_at = time.monotonic(), datetime.now(UTC)
            return True

    def _release(self, name: str) -> None:
        handler = self.handlers.get(name)
        with self._lock:
            resident = self._resident.get(name)
        if resident is None:
            return
        if resident.measured_by != "unknown" and handler is not None:
            grown = tensor_bytes(_modules(handler))  # pinned still: nobody unloads it meanwhile
            if grown > resident.footprint:
                resident.footprint = grown
                self._footprints[resident.key] = grown
        with self._lock:
            resident.pins -= 1
            resident.last_used, resident.last_used_at = time.monotonic(), datetime.now(UTC)

    def _load(self, name: str) -> None:
        """Make room, load, measure, record pinned once. Caller holds MODEL_LOAD_LOCK."""
        handler = self.handlers[name]
        key = self.model_key(name)
        self.make_room(self.estimate(name), keep=name, reason=f"to load {name}")
        index_before = _cuda_index()
        before = _allocated(index_before)
        started = time.perf_counter()
        try:
            handler.load()
        except Exception as err:
            if is_oom(err):
                free_caches()
                raise JobError(ErrorCode.OOM_ERROR, f"out of memory loading {name} ({key}): {err}"[:2000]) from err
            if isinstance(err, WorkerFault) or (isinstance(err, JobError) and err.code != ErrorCode.MODEL_LOAD_ERROR):
                raise  # already the worker's, or a reason of the job's own
            # the model cannot be loaded here (missing path, CUDA without CUDA, unreadable weights):
            # this worker's fault, not the job's, so the job goes back for another worker
            raise load_fault(name, key, err) from err
        seconds = time.perf_counter() - started
        index = _cuda_index()
        delta = _allocated(index) - before if index is not None else 0
        if delta > 0:
            footprint, how = delta, "cuda_allocated"
        else:
            modules = _modules(handler)
            footprint, how = tensor_bytes(modules), ("tensor_bytes" if modules else "unknown")
        now = datetime.now(UTC)
        with self._lock:
            self._resident[name] = Resident(name, key, footprint, how, seconds, now, time.monotonic(), now, pins=1)
        if how != "unknown":
            self._footprints[key] = footprint
        self.stats.loads += 1
        log.info("loaded %s (%s): %.1f MiB by %s in %.2fs", name, key, footprint / MIB, how, seconds)
        self.make_room(0, keep=name, reason=f"after loading {name}")  # the estimate may have been low
        used, budget = self.used_bytes(), self.budget_bytes()
        if budget is not None and used > budget:
            self.stats.over_budget_loads += 1
            log.warning("memory over budget after loading %s: %.1f MiB used > %.1f MiB budget, and every other "
                        "model is in use by a running job (%s)", name, used / MIB, budget / MIB,
                        ", ".join(self.loaded_names()))

    # -- eviction -----------------------------------------------------------------------

    def make_room(self, need: int, *, keep: str | None = None, reason: str = "") -> list[Eviction]:
        """Evict idle models, least recently used first, until used + need fits the budget less the
        activation headroom of `keep` and of the running models (weights_limit)."""
        limit = self.weights_limit(keep)
        if limit is None or self.used_bytes() + need <= limit:
            return []
        with MODEL_LOAD_LOCK:
            free_caches()
            evicted: list[Eviction] = []
            for victim in self._idle(exclude=keep):
                if self.used_bytes() + need <= limit:
                    break
                eviction = self.evict(victim, reason=reason or "over budget")
                if eviction is not None:
                    evicted.append(eviction)
            return evicted

    def _idle(self, exclude: str | None = None) -> list[str]:
        """Evictable models, least recently used first."""
        with self._lock:
            idle = [r for r in self._resident.values() if r.pins == 0 and r.name != exclude
                    and callable(getattr(self.handlers.get(r.name), "unload", None))]
        return [r.name for r in sorted(idle, key=lambda r: r.last_used)]

    def evict(self, name: str, reason: str = "") -> Eviction | None:
        """Unload an idle model and check its memory came back; None if it is in use or not loaded."""
        with MODEL_LOAD_LOCK:
            handler = self.handlers.get(name)
            unload = getattr(handler, "unload", None)
            with self._lock:
                resident = self._resident.get(name)
                if resident is None or resident.pins or not callable(unload):
                    return None
                del self._resident[name]
            refs = [weakref.ref(m) for m in _modules(handler)]  # type: ignore[arg-type]
            index = _cuda_index()
            before = _allocated(index)
            try:
                unload()
            except Exception:
                log.exception("unloading %s failed; its memory may still be held", name)
            free_caches()
            if index is not None:
                freed = before - _allocated(index)
                verified = freed >= resident.footprint // 2
            else:
                alive = [m for m in (ref() for ref in refs) if m is not None]
                freed = max(0, resident.footprint - tensor_bytes(alive))
                verified = not alive
                del alive
            eviction = Eviction(name, resident.key, resident.footprint, freed, verified, reason)
            self.stats.evictions += 1
            self.stats.history.append(eviction)
            del self.stats.history[:-100]
            if verified:
                log.info("evicted %s (%s) %s: %.1f MiB freed", name, resident.key, reason, freed / MIB)
            else:
                log.warning("evicted %s (%s) %s but only %.1f of %.1f MiB came back: something still references "
                            "its weights", name, resident.key, reason, freed / MIB, resident.footprint / MIB)
            return eviction

    def relieve(self, keep: Iterable[str] = ()) -> list[Eviction]:
        """After an out-of-memory error: free caches and evict every idle model not in `keep`."""
        kept = set(keep)
        with MODEL_LOAD_LOCK:
            evicted = [e for name in self._idle() if name not in kept
                       if (e := self.evict(name, reason="after out of memory")) is not None]
            free_caches()
        self.stats.oom_relieved += 1
        return evicted
