"""Which failures are the worker's own, not the job's: a full disk, a missing or broken device, a
model that cannot load here, storage credentials refused (worker.storage raises those itself).

`worker_fault_of(exc)` is what the loop asks about anything a handler raised: a WorkerFault sends
the job back to the queue without spending an attempt and stops claims of the fault's scope.
"""

from __future__ import annotations

import errno
import re
import sys
from collections.abc import Iterator

from worker.jobs import ErrorCode, JobError, WorkerFault

DISK_FULL = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})

# What torch and the CUDA runtime say when the device itself is missing or broken. Out-of-memory
# messages are excluded by the caller: those are the job's (retried after relief).
_DEVICE_MESSAGES = re.compile(
    r"no CUDA GPUs are available|CUDA error|CUDA driver|Found no NVIDIA driver|NVIDIA driver on your system is too old"
    r"|cuDNN error|CUBLAS_STATUS_(?!ALLOC_FAILED)|CUDNN_STATUS_(?!ALLOC_FAILED)|NCCL error|device-side assert"
    r"|Torch not compiled with CUDA enabled|CUDA-capable device|ECC error|GPU is lost|unspecified launch failure",
    re.IGNORECASE,
)


def causes(exc: BaseException | None, limit: int = 8) -> Iterator[BaseException]:
    """The exception, then what caused it (explicitly or while handling it), at most `limit` deep."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen and len(seen) < limit:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ if exc.__cause__ is not None else (None if exc.__suppress_context__ else exc.__context__)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:500]


def disk_full(exc: BaseException | None) -> OSError | None:
    """The OSError that says the disk (or the quota) is full, if that is what went wrong."""
    return next((e for e in causes(exc) if isinstance(e, OSError) and e.errno in DISK_FULL), None)


def disk_fault(err: OSError, where: str) -> WorkerFault:
    location = f" ({err.filename})" if err.filename else ""
    return WorkerFault(ErrorCode.STORAGE_ERROR, f"the disk is full while {where}{location}: {err.strerror or err}",
                       scope="disk")


# Allocation failures that CUDA libraries report as a status code in a plain RuntimeError (or
# torch.AcceleratorError), not as torch.OutOfMemoryError: the code is the only type they carry.
_ALLOC_STATUS = re.compile(
    r"out of memory|CUBLAS_STATUS_ALLOC_FAILED|CUDNN_STATUS_ALLOC_FAILED|CUDNN_STATUS_NOT_ENOUGH_MEMORY"
    r"|CUFFT_ALLOC_FAILED|CUSOLVER_STATUS_ALLOC_FAILED|CUSPARSE_STATUS_ALLOC_FAILED|cudaErrorMemoryAllocation",
    re.IGNORECASE)


def is_oom_error(exc: BaseException) -> bool:
    """This one exception (not its causes) is an out-of-memory: torch.OutOfMemoryError (= torch.cuda's),
    MemoryError, or a cuBLAS / cuDNN / CUDA allocation failure."""
    if isinstance(exc, MemoryError):
        return True
    torch = sys.modules.get("torch")  # only if a handler already imported it
    oom = (getattr(torch, "OutOfMemoryError", None) or getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)
           if torch else None)
    if oom is not None and isinstance(exc, oom):
        return True
    return isinstance(exc, RuntimeError) and bool(_ALLOC_STATUS.search(str(exc)))


_is_oom_message = is_oom_error


def device_error(exc: BaseException | None) -> BaseException | None:
    """The error that says the accelerator is missing or broken (never an out-of-memory one)."""
    for err in causes(exc):
        if _is_oom_message(err):
            return None
        if isinstance(err, JobError):
            continue  # a handler's wrapper: its message repeats the cause's
        accelerator_error = getattr(sys.modules.get("torch"), "AcceleratorError", None)
        if (accelerator_error is not None and isinstance(err, accelerator_error)) or (
            isinstance(err, RuntimeError | AssertionError) and _DEVICE_MESSAGES.search(str(err))
        ):
            return err
    return None


def worker_fault_of(exc: BaseException | None, handler: str | None = None) -> WorkerFault | None:
    """The worker's own fault behind `exc`, or None when the failure is the job's.

    - a WorkerFault anywhere in the chain: itself;
    - a full disk (ENOSPC/EDQUOT): scope "disk";
    - a missing or broken device (CUDA errors other than out of memory): scope "device";
    - with `handler` given, a model that could not be loaded (JobError MODEL_LOAD_ERROR, e.g. WAN's
      reference pipeline loaded by its first job): scope "handler:<handler>".
    """
    for err in causes(exc):
        if isinstance(err, WorkerFault):
            return err
    if (full := disk_full(exc)) is not None:
        return disk_fault(full, "writing files")
    if (broken := device_error(exc)) is not None:
        return WorkerFault(ErrorCode.GENERATION_FAILED,
                           f"the GPU is missing or broken: {type(broken).__name__}: {_first_line(broken)}",
                           scope="device")
    if handler is not None and isinstance(exc, JobError) and exc.code == ErrorCode.MODEL_LOAD_ERROR:
        return WorkerFault(ErrorCode.MODEL_LOAD_ERROR, exc.message, scope=f"handler:{handler}")
    return None


def load_fault(name: str, model: str, exc: BaseException) -> WorkerFault:
    """What a failed `load()` of handler `name` means: its model cannot be loaded on this worker
    (scope "handler:<name>"), or the disk is full (scope "disk")."""
    if (full := disk_full(exc)) is not None:
        return disk_fault(full, f"loading {name} ({model})")
    root = next((e for e in causes(exc) if not isinstance(e, JobError)), None)
    detail = f"{type(root).__name__}: {_first_line(root)}" if root is not None else _first_line(exc)
    return WorkerFault(ErrorCode.MODEL_LOAD_ERROR, f"{name} model {model} could not be loaded: {detail}"[:2000],
                       scope=f"handler:{name}")
