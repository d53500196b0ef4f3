"""Out-of-memory errors known by their type (torch.OutOfMemoryError) or by the CUDA library's allocation
status (cuBLAS / cuDNN raise a plain RuntimeError): every one of them ends OOM_ERROR, never
GENERATION_FAILED, and is never taken for a broken device."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import PostgresServer
from tests.diffusion_support import context, expect_error, make_job, read_job_types, tiny_models
from worker.config import Settings
from worker.faults import device_error, is_oom_error
from worker.handlers import diffusion
from worker.handlers.sdxl import SdxlHandler
from worker.jobs import ErrorCode, JobError, JobType
from worker.memory import is_oom
from worker.storage import LocalStorage

ALLOCATION_FAILURES = [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    torch.cuda.OutOfMemoryError("Tried to allocate 20.00 MiB"),
    RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
    RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
    RuntimeError("cuDNN error: CUDNN_STATUS_NOT_ENOUGH_MEMORY"),
    RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported"),
    MemoryError(),
]
NOT_OOM = [
    RuntimeError("CUDA error: an illegal memory access was encountered"),
    RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasGemmEx`"),
    ValueError("out of memory"),  # not an error torch or CUDA raises
]


@pytest.mark.parametrize("err", ALLOCATION_FAILURES, ids=lambda e: type(e).__name__ + ":" + str(e)[:30])
def test_allocation_failures_are_oom_and_never_a_device_fault(err: BaseException) -> None:
    assert is_oom_error(err) and diffusion.is_oom(err) and is_oom(err)
    wrapped = JobError(ErrorCode.GENERATION_FAILED, "generation failed")
    wrapped.__cause__ = err
    assert is_oom(wrapped)  # the loop looks through a handler's wrapper
    assert device_error(err) is None


@pytest.mark.parametrize("err", NOT_OOM, ids=str)
def test_other_errors_are_not_oom(err: BaseException) -> None:
    assert not is_oom_error(err) and not diffusion.is_oom(err) and not is_oom(err)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory: pytest.TempPathFactory) -> SdxlHandler:
    models = tiny_models(tmp_path_factory)
    handler = SdxlHandler(Settings(home=tmp_path_factory.mktemp("sdxl"), diffusion_device="cpu"),
                          model=str(models["sdxl"]))
    handler.load()
    return handler


@pytest.fixture(scope="module")
def job_types(pg_server: PostgresServer, template_db: str) -> dict[str, JobType]:
    return read_job_types(pg_server.database_url(template_db))


def raising(unet: Any, monkeypatch: pytest.MonkeyPatch, err: BaseException) -> list[int]:
    calls: list[int] = []

    def forward(*_args: Any, **_kwargs: Any) -> Any:
        calls.append(1)
        raise err

    monkeypatch.setattr(unet, "forward", forward)
    return calls


@pytest.mark.parametrize("message", ["CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
                                     "cuDNN error: CUDNN_STATUS_NOT_ENOUGH_MEMORY"])
def test_a_cuda_library_allocation_failure_ends_the_job_oom(
        sdxl: SdxlHandler, job_types: dict[str, JobType], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        message: str) -> None:
    calls = raising(sdxl.pipe.unet, monkeypatch, RuntimeError(message))
    job = make_job(job_types, "sdxl_image_fast", {"prompt": "a fox", "config": {"width": 64, "height": 64,
                                                                              "steps": 2, "num_images": 3}})
    error = expect_error(ErrorCode.OOM_ERROR, "out of GPU memory",
                         lambda: sdxl.run(job, context(job, LocalStorage(tmp_path))))
    assert error.retryable and isinstance(error.__cause__, RuntimeError)
    assert len(calls) == 2  # the batch of 3, then the retry in batches of 1
