"""Out-of-memory errors known by their type (torch.OutOfMemoryError) or by the CUDA library's allocation
status (cuBLAS / cuDNN raise a plain RuntimeError): every one of them ends OOM_ERROR, never
GENERATION_FAILED, and is never taken for a broken device."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.diffusion_support import context, expect_error, make_job
from worker.faults import device_error, is_oom_error
from worker.handlers import diffusion
from worker.handlers.sdxl import SdxlHandler
from worker.handlers.wan import WanHandler
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


def test_chat_retries_a_batch_in_halves_only_after_the_failed_batch_is_freed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import weakref

    from worker.handlers.chat import ChatModel, Request, Sampling
    from worker.tiny_models import build_tiny_qwen

    model = ChatModel.load(str(build_tiny_qwen(tmp_path / "qwen")), device="cpu", context_tokens=512)
    original = model.model.generate
    cache: list[weakref.ref[torch.Tensor]] = []
    alive_at_retry: list[bool] = []

    def generate(*args: Any, **kwargs: Any) -> Any:
        batch = kwargs["input_ids"].shape[0]
        if batch > 1:
            kv = torch.zeros(batch, 1024)  # stands in for the failed batch's KV cache
            cache.append(weakref.ref(kv))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")
        alive_at_retry.append(any(ref() is not None for ref in cache))
        return original(*args, **kwargs)

    monkeypatch.setattr(model.model, "generate", generate)
    greedy = Sampling(do_sample=False, temperature=1.0, top_p=1.0, min_new_tokens=3)
    prompt = model.encode([{"role": "user", "content": "hello"}])
    outputs = model.generate([Request(prompt, 3, greedy), Request(prompt, 3, greedy)], stream_interval=3600)
    assert [len(o.token_ids) for o in outputs if not isinstance(o, BaseException)] == [3, 3]
    assert len(cache) == 1 and alive_at_retry == [False, False]


def decode_oom_once(vae: Any, monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """The VAE's decode runs out of memory unless tiled (once); returns use_tiling at every call."""
    seen: list[bool] = []
    original = vae.decode

    def decode(*args: Any, **kwargs: Any) -> Any:
        seen.append(bool(vae.use_tiling))
        if not vae.use_tiling and seen.count(False) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return original(*args, **kwargs)

    monkeypatch.setattr(vae, "decode", decode)
    return seen


def count_calls(module: Any, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    original = module.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "forward", forward)
    return calls


def test_an_sdxl_decode_oom_retries_the_decode_alone_with_tiling(
        sdxl: SdxlHandler, job_types: dict[str, JobType], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    vae = sdxl.pipe.vae
    seen = decode_oom_once(vae, monkeypatch)
    spy = vae.decode
    steps = count_calls(sdxl.pipe.unet, monkeypatch)
    job = make_job(job_types, "sdxl_image_fast", {"prompt": "a fox", "config": {"width": 64, "height": 64,
                                                                              "steps": 2}})
    result = sdxl.run(job, context(job, LocalStorage(tmp_path)))
    assert len(result["assets"]) == 1
    assert len(steps) == 2  # the denoising steps ran once: only the decode was retried
    assert seen == [False, True]
    assert vae.decode is spy and not vae.use_tiling  # put back as it was


def test_a_wan_decode_oom_retries_the_decode_alone_and_an_in_process_retry_starts_tiled(
        wan: WanHandler, job_types: dict[str, JobType], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pipe = wan.pipes["t2v"]
    seen = decode_oom_once(pipe.vae, monkeypatch)
    steps = count_calls(pipe.transformer, monkeypatch)
    payload = {"prompt": "waves", "config": {"width": 64, "height": 64, "steps": 2, "frame_num": 10}}
    job = make_job(job_types, "video_fast", payload)
    assert wan.run(job, context(job, LocalStorage(tmp_path)))["frames"] == 9
    assert seen == [False, True] and len(steps) == 2 * 2  # each step once (conditional + unconditional)

    # out of memory while denoising: the loop retries the same Job in-process, and that run is tiled
    failing = make_job(job_types, "video_fast", payload)
    monkeypatch.setattr(pipe.transformer, "forward", lambda *a, **k: (_ for _ in ()).throw(
        torch.OutOfMemoryError("CUDA out of memory")))
    expect_error(ErrorCode.OOM_ERROR, "out of GPU memory",
                 lambda: wan.run(failing, context(failing, LocalStorage(tmp_path))))
    monkeypatch.undo()
    seen = decode_oom_once(pipe.vae, monkeypatch)
    assert wan.run(failing, context(failing, LocalStorage(tmp_path)))["frames"] == 9
    assert seen == [True] and not pipe.vae.use_tiling
