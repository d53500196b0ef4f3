"""The SDXL handler on a tiny random-weight SDXL pipeline built offline (worker.tiny_diffusion) and
loaded through the production `from_pretrained` path, on CPU.

Most tests call the handler with a real JobContext whose progress writer records every write (and
can answer "cancel requested" as the row would); the last ones run it inside a real worker against
the test Postgres. Job types and their presets are the `job_types` rows of the migrations.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import wait_status
from tests.diffusion_support import (
    USER,
    Recorder,
    Spy,
    context,
    expect_error,
    make_job,
    put_reference,
    stripes,
)
from worker.config import Settings
from worker.handlers.base import JobCanceled
from worker.handlers.diffusion import Limits
from worker.handlers.sdxl import SdxlHandler, payload_model
from worker.jobs import ErrorCode, ImagePayload, JobType
from worker.media import fit_image, png_text
from worker.queue import JobQueue
from worker.storage import LocalStorage

TINY = {"width": 64, "height": 64}


def run(handler: SdxlHandler, job_types: dict[str, JobType], storage: LocalStorage, payload: dict[str, Any],
        job_type: str = "sdxl_image_fast", recorder: Recorder | None = None,
        **job: Any) -> tuple[dict[str, Any], Recorder]:
    recorder = recorder or Recorder()
    claimed = make_job(job_types, job_type, payload, **job)
    return handler.run(claimed, context(claimed, storage, recorder)), recorder


def pixels(storage: LocalStorage, asset: dict[str, Any]) -> np.ndarray:
    data = storage.download(asset["bucket"], asset["path"])
    with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"), dtype=np.int16)


# --- presets, overrides, batches and seeds --------------------------------------------------


def test_presets_come_from_job_types_and_payload_overrides_them(sdxl: SdxlHandler, job_types: dict[str, JobType],
                                                                storage: LocalStorage) -> None:
    fast = sdxl.parse(make_job(job_types, "sdxl_image_fast", {"prompt": "a cat"}))
    high = sdxl.parse(make_job(job_types, "sdxl_image_high", {"prompt": "a cat"}))
    assert (fast.width, fast.height, fast.steps, fast.guidance_scale, fast.num_images) == (1024, 1024, 15, 6.0, 1)
    assert (high.steps, high.guidance_scale) == (25, 7.5)
    # Seed 002's spelling of the same overrides.
    aliased = sdxl.parse(make_job(job_types, "sdxl_image_high", {
        "prompt": "a cat", "config": {"size": "768*512", "sample_steps": 20, "sample_guide_scale": 4.0}}))
    assert (aliased.width, aliased.height, aliased.steps, aliased.guidance_scale) == (768, 512, 20, 4.0)

    result, recorder = run(sdxl, job_types, storage, {"prompt": "a cat", "config": {**TINY, "seed": 1}})
    assert (result["steps"], result["guidance_scale"]) == (15, 6.0)  # the fast preset, denoised for real
    assert recorder.count("denoising") == 15
    overridden = sdxl.parse(make_job(job_types, "sdxl_image_high", {"prompt": "a cat",
                                                                    "config": {"guidance_scale": 3.0}}))
    assert (overridden.steps, overridden.guidance_scale) == (25, 3.0)


def test_batches_of_6_and_3_have_distinct_seeds_and_each_image_reproduces_alone(
        sdxl: SdxlHandler, job_types: dict[str, JobType], storage: LocalStorage) -> None:
    six, _ = run(sdxl, job_types, storage, {"prompt": "a lighthouse", "negative_prompt": "blurry",
                                            "config": {**TINY, "steps": 3, "num_images": 6, "seed": 10}})
    assert six["seeds"] == [10, 11, 12, 13, 14, 15] and six["seed"] == 10
    assert six["image_count"] == 6 and six["batch_sizes"] == [6]
    images = [pixels(storage, a) for a in six["assets"]]
    assert all(img.shape == (64, 64, 3) for img in images)
    assert all(np.abs(images[i] - images[j]).mean() > 1 for i in range(6) for j in range(i + 1, 6))
    assert [a["seed"] for a in six["assets"]] == six["seeds"]
    assert len({a["path"] for a in six["assets"]}) == 6

    text = png_text(storage.download(six["assets"][3]["bucket"], six["assets"][3]["path"]))
    assert text["prompt"] == "a lighthouse" and text["negative_prompt"] == "blurry"
    assert (text["seed"], text["steps"], text["width"]) == ("13", "3", "64")
    assert "Seed: 13" in text["parameters"] and "Negative prompt: blurry" in text["parameters"]

    # Seed 002 sends seed and count in `metadata`: images 12..14 of the batch above, batched by 3.
    three, _ = run(sdxl, job_types, storage, {"prompt": "a lighthouse", "negative_prompt": "blurry",
                                              "config": {**TINY, "steps": 3},
                                              "metadata": {"seed": 12, "num_images": 3}})
    assert three["seeds"] == [12, 13, 14] and three["batch_sizes"] == [3]
    for index, asset in enumerate(three["assets"]):
        assert np.abs(pixels(storage, asset) - images[index + 2]).max() <= 1

    alone, _ = run(sdxl, job_types, storage, {"prompt": "a lighthouse", "negative_prompt": "blurry",
                                              "config": {**TINY, "steps": 3, "seed": 15}})
    assert np.abs(pixels(storage, alone["assets"][0]) - images[5]).max() <= 1

    # No seed: a random one is recorded, and it reproduces the image.
    first, _ = run(sdxl, job_types, storage, {"prompt": "a lighthouse", "config": {**TINY, "steps": 3}})
    again, _ = run(sdxl, job_types, storage, {"prompt": "a lighthouse",
                                              "config": {**TINY, "steps": 3, "seed": first["seed"]}})
    assert np.abs(pixels(storage, first["assets"][0]) - pixels(storage, again["assets"][0])).max() <= 1
    without_negative, _ = run(sdxl, job_types, storage, {"prompt": "a lighthouse",
                                                         "config": {**TINY, "steps": 3, "seed": 15}})
    assert np.abs(pixels(storage, without_negative["assets"][0]) - images[5]).mean() > 1  # the negative counts


def test_progress_is_reported_per_denoising_step_through_the_stages(
        sdxl: SdxlHandler, job_types: dict[str, JobType], storage: LocalStorage) -> None:
    result, recorder = run(sdxl, job_types, storage, {"prompt": "a cat",
                                                      "config": {**TINY, "steps": 5, "num_images": 3}})
    assert recorder.count("denoising") == 5  # one write per step for the whole batch
    assert [p["step"] for _, s, p in recorder.writes if s == "denoising" and p] == [1, 2, 3, 4, 5]
    assert recorder.stages() == ["encoding", "denoising", "decoding", "uploading"]
    percents = recorder.percents()
    assert percents == sorted(percents) and percents[-1] < 100  # the loop writes 100 on completion
    assert set(result["timings"]) >= {"load", "encode", "generate", "denoise", "decode", "upload", "total"}


# --- reference image ------------------------------------------------------------------------


def test_reference_image_runs_img2img_on_the_same_weights(sdxl: SdxlHandler, job_types: dict[str, JobType],
                                                          storage: LocalStorage,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "scheduler"):
        assert getattr(sdxl.img2img, name) is getattr(sdxl.pipe, name)  # from_pipe: no second copy
    assert sdxl.img2img.unet.dtype == torch.float32 == sdxl.pipe.unet.dtype

    reference = stripes(96, 64, (200, 30, 30))
    path = put_reference(storage, "ref.png", reference)
    encoded = Spy(sdxl.pipe.vae, "encode", monkeypatch)
    result, recorder = run(sdxl, job_types, storage, user_id=USER, payload={
        "prompt": "a cat", "config": {**TINY, "steps": 8, "seed": 3},
        "metadata": {"reference_image_url": path, "reference_type": "composition", "reference_strength": 1.0}})
    assert result["reference_mode"] == "single"
    assert result["reference"]["denoising_strength"] == 0.25  # 1 - 1.0 * 0.75
    assert result["reference"]["steps_run"] == 2 == recorder.count("denoising")
    assert len(encoded.calls) == 1  # the reference, scaled and center-cropped to 64x64, is the start
    expected = torch.from_numpy(np.asarray(fit_image(reference, 64, 64), dtype=np.float32) / 127.5 - 1)
    assert torch.allclose(encoded.calls[0]["args"][0][0].permute(1, 2, 0).float(), expected, atol=1e-5)

    style, recorder = run(sdxl, job_types, storage, user_id=USER, payload={
        "prompt": "a cat", "config": {**TINY, "steps": 8, "seed": 3, "image": path,
                                      "reference_type": "style", "reference_strength": 0.1}})
    assert style["reference"]["denoising_strength"] == pytest.approx(0.955)
    assert style["reference"]["steps_run"] == 7 == recorder.count("denoising")
    plain, _ = run(sdxl, job_types, storage, {"prompt": "a cat", "config": {**TINY, "steps": 8, "seed": 3}})
    assert plain["reference_mode"] == "none" and plain["reference"] is None
    assert np.abs(pixels(storage, plain["assets"][0]) - pixels(storage, result["assets"][0])).mean() > 1


@pytest.mark.parametrize(("extra", "match"), [
    ({"config": {"first_frame": "REF"}}, "not first/last frames"),
    ({"metadata": {"reference_image_url": "REF", "reference_type": "pose"}}, "reference_type"),
    ({"metadata": {"reference_image_url": "REF", "reference_strength": 1.5}}, "reference_strength"),
    ({"metadata": {"reference_image_url": "22222222-2222-4222-8222-222222222222/ref.png"}}, "your own storage"),
    ({"metadata": {"reference_image_url": "USER/missing.png"}}, "was not found"),
])
def test_reference_mismatches_fail_before_any_denoising(sdxl: SdxlHandler, job_types: dict[str, JobType],
                                                        storage: LocalStorage, extra: dict[str, Any],
                                                        match: str) -> None:
    path = put_reference(storage, "ref.png", stripes(64, 64, (0, 90, 200)))
    payload = {"prompt": "a cat", **extra}
    payload["config"] = {**TINY, "steps": 2, **{k: (path if v == "REF" else v) for k, v in extra.get(
        "config", {}).items()}}
    if "metadata" in extra:
        payload["metadata"] = {k: path if v == "REF" else str(v).replace("USER", str(USER)) if k.endswith("url")
                               else v for k, v in extra["metadata"].items()}
    recorder = Recorder()
    expect_error(ErrorCode.INVALID_INPUT, match,
                 lambda: run(sdxl, job_types, storage, payload, recorder=recorder, user_id=USER))
    assert recorder.count("denoising") == 0


# --- bad input, cancellation, memory, loading -----------------------------------------------


@pytest.mark.parametrize(("payload", "match"), [
    ({"prompt": "a cat", "config": {**TINY, "num_images": 2}}, "num_images"),
    ({"prompt": "a cat", "config": {"width": 100, "height": 64}}, "multiple of 8"),
    ({"prompt": "a cat", "config": {**TINY, "steps": 60}}, "steps"),
    ({"prompt": "a cat", "config": {**TINY, "guidance_scale": 25}}, "guidance_scale"),
    ({"prompt": "", "config": TINY}, "prompt"),
    ({"config": TINY}, "prompt"),
    ({"prompt": "a cat", "config": {"width": 16, "height": 64}}, "width"),  # below even the tiny model's 32
])
def test_invalid_input_fails_before_any_model_work(sdxl: SdxlHandler, job_types: dict[str, JobType],
                                                   storage: LocalStorage, payload: dict[str, Any],
                                                   match: str) -> None:
    recorder = Recorder()
    error = expect_error(ErrorCode.INVALID_INPUT, match, lambda: run(sdxl, job_types, storage, payload,
                                                                     recorder=recorder))
    assert not error.retryable
    assert recorder.writes == []


def test_only_the_tiny_models_folder_relaxes_the_user_facing_ranges(models: dict[str, Path]) -> None:
    assert Limits.of_model(str(models["sdxl"])) == Limits(min_side=32, min_steps=1, min_frames=5)
    assert Limits.of_model("stabilityai/stable-diffusion-xl-base-1.0") == Limits()
    assert payload_model(Limits()) is ImagePayload
    with pytest.raises(ValueError, match="greater than or equal to 256"):
        ImagePayload.model_validate({"prompt": "a cat", "config": {**TINY, "steps": 15, "guidance_scale": 6}})
    with pytest.raises(ValueError, match="greater than or equal to 10"):
        ImagePayload.model_validate({"prompt": "a cat", "config": {"width": 512, "height": 512, "steps": 2,
                                                                   "guidance_scale": 6}})


def test_cancel_mid_denoise_stops_before_the_vae_decode(sdxl: SdxlHandler, job_types: dict[str, JobType],
                                                        storage: LocalStorage,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    decoded = Spy(sdxl.pipe.vae, "decode", monkeypatch)
    recorder = Recorder(cancel_at=lambda write: bool(write[2] and write[2].get("step") == 2))
    with pytest.raises(JobCanceled):
        run(sdxl, job_types, storage, {"prompt": "a cat", "config": {**TINY, "steps": 6, "num_images": 3}},
            recorder=recorder)
    assert recorder.count("denoising") == 2
    assert decoded.calls == []
    assert not (storage.root / "sdxl_image_fast").exists()


def oom_when(predicate: Any, times: int = 1) -> Any:
    """A UNet forward that raises CUDA OOM (as a GPU would) while predicate(batch) holds, `times` times."""
    state = {"left": times}

    def install(unet: Any, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
        original = unet.forward

        def forward(sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if state["left"] and predicate(sample.shape[0]):
                state["left"] -= 1
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
            return original(sample, *args, **kwargs)

        monkeypatch.setattr(unet, "forward", forward)
        return state

    return install


def test_out_of_memory_retries_once_in_smaller_batches_with_the_same_seeds(
        sdxl: SdxlHandler, job_types: dict[str, JobType], storage: LocalStorage,
        monkeypatch: pytest.MonkeyPatch) -> None:
    payload = {"prompt": "a fox", "config": {**TINY, "steps": 2, "num_images": 6, "seed": 40}}
    normal, _ = run(sdxl, job_types, storage, payload)
    oom_when(lambda batch: batch > 6)(sdxl.pipe.unet, monkeypatch)  # 6 images x 2 (guidance) does not fit
    halved, recorder = run(sdxl, job_types, storage, payload)
    assert halved["batch_sizes"] == [3, 3] and halved["seeds"] == normal["seeds"]
    for before, after in zip(normal["assets"], halved["assets"], strict=True):
        assert np.abs(pixels(storage, before) - pixels(storage, after)).max() <= 1
    assert recorder.count("denoising") == 4  # two batches of two steps after the failed one

    oom_when(lambda batch: True, times=99)(sdxl.pipe.unet, monkeypatch)
    error = expect_error(ErrorCode.OOM_ERROR, "out of GPU memory",
                         lambda: run(sdxl, job_types, storage, {"prompt": "a fox", "config": {**TINY, "steps": 2}}))
    assert error.retryable
    expect_error(ErrorCode.OOM_ERROR, "in batches of 3", lambda: run(sdxl, job_types, storage, payload))


def test_an_attempt_after_an_oom_starts_with_single_images_and_a_tiled_vae(
        sdxl: SdxlHandler, job_types: dict[str, JobType], storage: LocalStorage,
        monkeypatch: pytest.MonkeyPatch) -> None:
    tiled = Spy(sdxl.pipe.vae, "enable_tiling", monkeypatch)
    result, _ = run(sdxl, job_types, storage, {"prompt": "a fox", "config": {**TINY, "steps": 2, "num_images": 3}},
                    attempts=2, errors=[{"code": "OOM_ERROR", "message": "out of memory", "retryable": True}])
    assert result["batch_sizes"] == [1, 1, 1]
    assert len(tiled.calls) == 3
    assert not sdxl.pipe.vae.use_tiling  # switched back off for the next job


def test_a_model_that_cannot_load_fails_with_model_load_error(tmp_path: Path, job_types: dict[str, JobType],
                                                              storage: LocalStorage) -> None:
    handler = SdxlHandler(Settings(home=tmp_path, diffusion_device="cpu"), model=str(tmp_path / "missing"))
    error = expect_error(ErrorCode.MODEL_LOAD_ERROR, "could not be loaded", handler.load)
    assert error.retryable
    # within the real model's ranges: a missing folder relaxes nothing, and validation comes before the load
    job = make_job(job_types, "sdxl_image_fast", {"prompt": "a cat", "config": {"width": 256, "height": 256}})
    expect_error(ErrorCode.MODEL_LOAD_ERROR, "missing", lambda: handler.run(job, context(job, storage)))


def test_a_single_file_checkpoint_loads_with_from_single_file(models: dict[str, Path], tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers import StableDiffusionXLPipeline

    calls: list[tuple[str, Any]] = []

    def from_single_file(path: str, **kwargs: Any) -> Any:
        calls.append((path, kwargs.get("dtype")))
        return StableDiffusionXLPipeline.from_pretrained(str(models["sdxl"]))

    monkeypatch.setattr(StableDiffusionXLPipeline, "from_single_file", from_single_file)
    checkpoint = tmp_path / "lustify.safetensors"
    checkpoint.write_bytes(b"weights")
    handler = SdxlHandler(Settings(home=tmp_path, diffusion_device="cpu"), model=str(checkpoint))
    handler.load()
    assert calls == [(str(checkpoint), torch.float32)]
    assert handler.img2img.unet is handler.pipe.unet


# --- in a real worker -----------------------------------------------------------------------


def test_a_worker_runs_an_sdxl_job_end_to_end(sdxl: SdxlHandler, start_worker: Any, queue: JobQueue,
                                              settings: Settings) -> None:
    job_id = queue.enqueue("sdxl_image_high", {"prompt": "a red kite over the sea", "negative_prompt": "text",
                                               "config": {**TINY, "steps": 3, "num_images": 3, "seed": 5}})
    start_worker(handlers={"sdxl": sdxl})
    row = wait_status(queue, job_id, "completed", "failed", timeout=120)
    assert row["status"] == "completed", row["error"]
    result = row["result"]
    assert result["seeds"] == [5, 6, 7] and result["image_count"] == 3 and result["steps"] == 3
    assert result["guidance_scale"] == 7.5  # the high preset
    assert row["progress"] == 100
    storage = LocalStorage(settings.storage_dir)
    for asset, seed in zip(result["assets"], [5, 6, 7], strict=True):
        assert asset["path"].endswith(f"/{job_id}/{asset['index']}.png") and asset["seed"] == seed
        assert pixels(storage, asset).shape == (64, 64, 3)
        assert png_text(storage.download(asset["bucket"], asset["path"]))["seed"] == str(seed)


def test_a_user_cancel_mid_denoise_ends_the_row_canceled_without_decoding(
        sdxl: SdxlHandler, start_worker: Any, queue: JobQueue, settings: Settings,
        monkeypatch: pytest.MonkeyPatch) -> None:
    decoded = Spy(sdxl.pipe.vae, "decode", monkeypatch)
    target: dict[str, Any] = {}
    original = sdxl.pipe.unet.forward
    calls = {"n": 0}

    def forward(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:
            queue.request_cancel(target["id"])  # what a frontend's update of cancel_requested does
        return original(*args, **kwargs)

    monkeypatch.setattr(sdxl.pipe.unet, "forward", forward)
    target["id"] = queue.enqueue("sdxl_image_fast", {"prompt": "a cat", "config": {**TINY, "steps": 20}})
    start_worker(handlers={"sdxl": sdxl})
    row = wait_status(queue, target["id"], "canceled", "completed", "failed", timeout=120)
    assert row["status"] == "canceled"
    assert calls["n"] < 20 and decoded.calls == []
    assert row["result"] is None
    assert not (settings.storage_dir / "sdxl_image_fast").exists()
