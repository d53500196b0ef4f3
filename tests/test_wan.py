"""The WAN handler on tiny random-weight WAN 2.1 pipelines (T2V, VACE, I2V, FLF2V) built offline by
worker.tiny_diffusion and loaded through the production `from_pretrained` path, on CPU, at 64x64
with 9 frames and a few steps.

Most tests call the handler with a real JobContext whose progress writer records every write (and
can answer "cancel requested" as the row would); the last ones run it inside a real worker against
the test Postgres. Job types and presets are the `job_types` rows of the migrations.
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
from worker.handlers.base import JobCanceled, builtin_handlers, connect_handlers
from worker.handlers.wan import WanHandler, normalize_frames, normalize_size, route
from worker.jobs import ErrorCode, JobType, VideoPayload
from worker.media import fit_image, png_text, probe_mp4
from worker.queue import JobQueue
from worker.storage import LocalStorage

TINY = {"width": 64, "height": 64, "steps": 2}


def make_handler(models: dict[str, Path], home: Path, *, vace: bool = True, i2v: str = "") -> WanHandler:
    return WanHandler(Settings(home=home, diffusion_device="cpu"), model=str(models["wan"]),
                      vace_model=str(models["wan_vace"]) if vace else "",
                      i2v_model=str(models[i2v]) if i2v else "")


@pytest.fixture(scope="module")
def wan(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> WanHandler:
    handler = make_handler(models, tmp_path_factory.mktemp("wan"))
    handler.load()
    return handler


def run(handler: WanHandler, job_types: dict[str, JobType], storage: LocalStorage, payload: dict[str, Any],
        job_type: str = "video_fast", recorder: Recorder | None = None, **job: Any) -> tuple[dict[str, Any], Recorder]:
    recorder = recorder or Recorder()
    claimed = make_job(job_types, job_type, payload, **job)
    return handler.run(claimed, context(claimed, storage, recorder)), recorder


def download(storage: LocalStorage, asset: dict[str, Any]) -> bytes:
    return storage.download(asset["bucket"], asset["path"])


def png_pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


# --- sizes, frames, presets -----------------------------------------------------------------


def test_sizes_and_frames_are_normalised_to_what_the_model_takes_and_recorded(
        wan: WanHandler, job_types: dict[str, JobType]) -> None:
    assert [normalize_frames(n) for n in (83, 81, 16, 17, 18, 19, 20, 1, 121, 9, 10)] == \
        [81, 81, 17, 17, 17, 17, 21, 1, 121, 9, 9]
    assert [normalize_size(n) for n in (480, 832, 500, 1000, 1280, 64)] == [480, 832, 496, 992, 1280, 64]

    preset = wan.parse(make_job(job_types, "video_fast", {"prompt": "waves"}))
    assert (preset.width, preset.height, preset.frames) == (480, 832, 81)  # seed 002's 83 frames -> 81
    assert preset.requested == {"width": 480, "height": 832, "frame_num": 83}
    assert (preset.steps, preset.guidance_scale, preset.solver, preset.shift, preset.fps) == (25, 6.5, "unipc", 5.0, 16)
    high = wan.parse(make_job(job_types, "video_high", {"prompt": "waves", "config": {"size": "832*480"}}))
    assert (high.width, high.height, high.steps, high.guidance_scale) == (832, 480, 50, 7.5)
    image = wan.parse(make_job(job_types, "image_high", {"prompt": "a cat"}))
    assert image.frames == 1 and image.is_image
    odd = wan.parse(make_job(job_types, "video_fast", {"prompt": "waves", "config": {
        "width": 1000, "height": 504, "frame_num": 50}}))
    assert (odd.width, odd.height, odd.frames) == (992, 496, 49)
    expect_error(ErrorCode.INVALID_INPUT, "frame_num: must be one of 1 (got 17)",
                 lambda: wan.parse(make_job(job_types, "image_fast", {"prompt": "a cat",
                                                                      "config": {"frame_num": 17}})))


def test_a_video_job_makes_a_browser_playable_mp4_and_a_thumbnail(wan: WanHandler, job_types: dict[str, JobType],
                                                                  storage: LocalStorage) -> None:
    result, recorder = run(wan, job_types, storage, {"prompt": "waves on a beach",
                                                     "config": {**TINY, "steps": 3, "frame_num": 10, "fps": 8,
                                                                "seed": 3}})
    assert (result["frames"], result["fps"], result["width"], result["height"]) == (9, 8, 64, 64)
    assert result["duration"] == 1.125 and result["requested"]["frame_num"] == 10
    assert result["video_info"] == {"frames": 9, "fps": 8, "duration_seconds": 1.125, "width": 64, "height": 64}
    assert result["pipeline"] == "t2v" and result["reference_mode"] == "none" and result["seed"] == 3
    video, thumb = result["assets"]
    assert video["content_type"] == "video/mp4" and video["path"].endswith("/0.mp4")
    data = download(storage, video)
    info = probe_mp4(data)  # decoded back, frame by frame
    assert (info.frames, info.width, info.height, info.fps) == (9, 64, 64, 8.0)
    assert (info.codec, info.pix_fmt) == ("h264", "yuv420p")
    assert data.find(b"moov") < data.find(b"mdat")  # faststart: playable while it downloads
    assert thumb["content_type"] == "image/png" and result["thumbnail_url"] == thumb["url"]
    assert png_pixels(download(storage, thumb)).shape == (64, 64, 3)
    assert recorder.count("denoising") == 3
    assert recorder.stages() == ["encoding", "denoising", "decoding", "uploading"]
    assert recorder.percents() == sorted(recorder.percents())


def test_an_image_job_saves_one_png_that_its_seed_reproduces(wan: WanHandler, job_types: dict[str, JobType],
                                                             storage: LocalStorage) -> None:
    first, _ = run(wan, job_types, storage, {"prompt": "a cat", "config": {**TINY, "seed": 11}}, job_type="image_fast")
    assert first["content_type"] == "image" and first["frames"] == 1 and len(first["assets"]) == 1
    data = download(storage, first["assets"][0])
    assert png_text(data)["seed"] == "11" and png_text(data)["prompt"] == "a cat"
    again, _ = run(wan, job_types, storage, {"prompt": "a cat", "config": {**TINY, "seed": 11}}, job_type="image_fast")
    other, _ = run(wan, job_types, storage, {"prompt": "a cat", "config": {**TINY, "seed": 12}}, job_type="image_fast")
    assert np.array_equal(png_pixels(data), png_pixels(download(storage, again["assets"][0])))
    assert np.abs(png_pixels(data) - png_pixels(download(storage, other["assets"][0]))).mean() > 1


# --- reference modes ------------------------------------------------------------------------


def test_reference_modes_become_vace_conditioning_frames_masks_or_reference_images(
        wan: WanHandler, job_types: dict[str, JobType], storage: LocalStorage,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers import WanVACEPipeline

    start_image, end_image = stripes(96, 64, (220, 20, 20)), stripes(64, 96, (20, 20, 220))
    start = put_reference(storage, "start.png", start_image)
    end = put_reference(storage, "end.png", end_image)
    spy = Spy(WanVACEPipeline, "__call__", monkeypatch)
    base = {"prompt": "a transition", "config": {**TINY, "frame_num": 9, "seed": 1}}
    cases = {
        "single": {"metadata": {"reference_image_url": start}},
        "start": {"config": {**base["config"], "first_frame": start}},
        "end": {"metadata": {"end_reference_url": end}},
        "both": {"config": {**base["config"], "first_frame": start}, "metadata": {"end_reference_url": end}},
    }
    black, white = 0, 255
    for mode, extra in cases.items():
        result, _ = run(wan, job_types, storage, {**base, **extra}, user_id=USER)
        assert (result["reference_mode"], result["pipeline"], result["frames"]) == (mode, "vace", 9)
        call = spy.calls[-1]
        if mode == "single":
            assert "video" not in call and len(call["reference_images"]) == 1
            continue
        video, mask = call["video"], call["mask"]
        assert len(video) == len(mask) == 9
        kept = {0} if mode == "start" else {8} if mode == "end" else {0, 8}
        assert [m.getpixel((5, 5)) for m in mask] == [black if i in kept else white for i in range(9)]
        if 0 in kept:  # scaled and center-cropped to the video's size
            assert np.array_equal(np.asarray(video[0]), np.asarray(fit_image(start_image, 64, 64)))
        if 8 in kept:
            assert np.array_equal(np.asarray(video[8]), np.asarray(fit_image(end_image, 64, 64)))
        assert video[4].getpixel((5, 5)) == (128, 128, 128)  # frames to generate are mid-gray
    # One text encoder and VAE in memory for T2V and VACE.
    assert wan.pipes["vace"].text_encoder is wan.pipes["t2v"].text_encoder
    assert wan.pipes["vace"].vae is wan.pipes["t2v"].vae and wan.pipes["vace"].vae.dtype == torch.float32


def test_route_serves_each_mode_by_a_configured_model_or_fails_clearly() -> None:
    assert route("none", 81, vace=False, i2v_kind=None) == "t2v"
    assert {m: route(m, 81, vace=True, i2v_kind=None) for m in ("single", "start", "end", "both")} == dict.fromkeys(
        ("single", "start", "end", "both"), "vace")
    assert route("single", 81, vace=False, i2v_kind="i2v") == route("start", 81, False, "i2v") == "i2v"
    assert route("both", 81, vace=False, i2v_kind="flf2v") == "flf2v"
    for mode, kind in [("end", "i2v"), ("both", "i2v"), ("start", "flf2v"), ("single", None), ("both", None)]:
        expect_error(ErrorCode.MODEL_UNAVAILABLE, f"reference mode {mode!r} is not served",
                     lambda m=mode, k=kind: route(m, 81, vace=False, i2v_kind=k))
    for mode in ("start", "end", "both"):
        expect_error(ErrorCode.INVALID_INPUT, "needs a video", lambda m=mode: route(m, 1, vace=True, i2v_kind=None))
    assert route("single", 1, vace=True, i2v_kind=None) == "vace"


def test_i2v_and_flf2v_checkpoints_serve_their_modes_with_512_token_prompts(
        models: dict[str, Path], job_types: dict[str, JobType], storage: LocalStorage, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers import WanImageToVideoPipeline

    spy = Spy(WanImageToVideoPipeline, "__call__", monkeypatch)
    start = put_reference(storage, "start.png", stripes(64, 64, (220, 20, 20)))
    end = put_reference(storage, "end.png", stripes(64, 64, (20, 220, 20)))
    payload = {"prompt": "a dancer", "config": {**TINY, "frame_num": 9, "seed": 2}}

    i2v = make_handler(models, tmp_path / "i2v", vace=False, i2v="wan_i2v")
    result, _ = run(i2v, job_types, storage, {**payload, "metadata": {"reference_image_url": start}}, user_id=USER)
    assert (result["pipeline"], result["reference_mode"]) == ("i2v", "single")
    call = spy.calls[-1]
    assert call["image"].size == (64, 64) and call.get("last_image") is None
    assert call["max_sequence_length"] == 512 and call["prompt_embeds"].shape[1] == 512
    assert i2v.pipes["i2v"].text_encoder is i2v.pipes["t2v"].text_encoder
    expect_error(ErrorCode.MODEL_UNAVAILABLE, "'end' is not served",
                 lambda: run(i2v, job_types, storage, {**payload, "metadata": {"end_reference_url": end}},
                             user_id=USER))

    flf2v = make_handler(models, tmp_path / "flf2v", vace=False, i2v="wan_flf2v")
    both = {**payload, "metadata": {"start_reference_url": start, "end_reference_url": end}}
    result, _ = run(flf2v, job_types, storage, both, user_id=USER)
    assert (result["pipeline"], result["reference_mode"], result["frames"]) == ("flf2v", "both", 9)
    assert spy.calls[-1]["last_image"].size == (64, 64)
    recorder = Recorder()
    expect_error(ErrorCode.MODEL_UNAVAILABLE, "'start' is not served",
                 lambda: run(flf2v, job_types, storage, {**payload, "config": {**payload["config"],
                                                                               "first_frame": start}},
                             recorder=recorder, user_id=USER))
    assert recorder.writes == []  # refused before any model work

    plain = make_handler(models, tmp_path / "plain", vace=False)
    expect_error(ErrorCode.MODEL_UNAVAILABLE, "no WAN VACE model",
                 lambda: run(plain, job_types, storage, {**payload, "metadata": {"reference_image_url": start}},
                             user_id=USER))
    expect_error(ErrorCode.INVALID_INPUT, "needs a video",
                 lambda: run(plain, job_types, storage, {"prompt": "a cat", "config": {**TINY, "last_frame": end}},
                             job_type="image_fast", user_id=USER))


# --- prompt enhancement ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from worker.handlers.chat import ChatHandler
    from worker.tiny_models import build_tiny_qwen

    path = build_tiny_qwen(tmp_path_factory.getbasetemp() / "tiny-diffusion" / "tiny-qwen2")
    return ChatHandler(Settings(home=tmp_path_factory.mktemp("chat"), chat_model=str(path), chat_device="cpu"))


def test_enhanced_types_rewrite_the_prompt_with_the_workers_chat_model_first(
        wan: WanHandler, chat: Any, job_types: dict[str, JobType], storage: LocalStorage,
        monkeypatch: pytest.MonkeyPatch) -> None:
    payload = {"prompt": "a cat", "config": {**TINY, "seed": 9}}
    recorder = Recorder()
    expect_error(ErrorCode.MODEL_UNAVAILABLE, "needs the chat model",
                 lambda: run(wan, job_types, storage, payload, job_type="image7b_fast_enhanced", recorder=recorder))
    assert recorder.writes == [] or recorder.count("denoising") == 0

    builtin = builtin_handlers()  # the worker's own wiring: WAN finds the chat handler it runs beside
    assert isinstance(builtin["wan"], WanHandler) and builtin["wan"]._peers is builtin and "chat" in builtin
    handlers: dict[str, Any] = {"wan": wan, "chat": chat}
    monkeypatch.setattr(wan, "_peers", {})
    connect_handlers(handlers)  # what builtin_handlers() does for the worker
    assert chat.model is None  # registered but idle: the WAN job loads it
    result, recorder = run(wan, job_types, storage, payload, job_type="image7b_fast_enhanced")
    enhanced = result["enhanced_prompt"]
    assert enhanced and enhanced != "a cat" and result["prompt"] == "a cat"
    assert result["enhancement"]["system_prompt_used"].startswith("You rewrite short video prompts")
    assert recorder.stages().index("enhancing") < recorder.stages().index("denoising")
    assert any(p and p.get("enhanced_prompt") == enhanced for _, s, p in recorder.writes if s == "denoising")
    assert png_text(download(storage, result["assets"][0]))["prompt"] == enhanced
    again, _ = run(wan, job_types, storage, payload, job_type="image7b_fast_enhanced")
    assert again["enhanced_prompt"] == enhanced  # seeded with the job's seed: reproducible
    plain, _ = run(wan, job_types, storage, payload, job_type="image_fast")
    assert plain["enhanced_prompt"] is None


# --- bad input, cancellation, memory, loading -----------------------------------------------


@pytest.mark.parametrize(("config", "match"), [
    ({"frame_num": 3}, "frame_num"),  # below even the tiny model's 5
    ({"fps": 40}, "fps"),
    ({"sample_solver": "euler"}, "sample_solver"),
    ({"width": 16}, "width"),
    ({"steps": 0}, "steps"),
    ({"guidance_scale": 0.5}, "guidance_scale"),
])
def test_invalid_input_fails_before_any_model_work(wan: WanHandler, job_types: dict[str, JobType],
                                                   storage: LocalStorage, config: dict[str, Any], match: str) -> None:
    recorder = Recorder()
    expect_error(ErrorCode.INVALID_INPUT, match, lambda: run(wan, job_types, storage, {
        "prompt": "waves", "config": {**TINY, "frame_num": 9, **config}}, recorder=recorder))
    assert recorder.writes == []
    expect_error(ErrorCode.INVALID_INPUT, "prompt", lambda: run(wan, job_types, storage, {"config": TINY}))


def test_real_checkpoints_keep_the_user_facing_ranges() -> None:
    with pytest.raises(ValueError, match="16-121 frames"):
        VideoPayload.model_validate({"prompt": "x", "config": {"width": 480, "height": 832, "steps": 25,
                                                               "guidance_scale": 6.5, "frame_num": 9}})
    with pytest.raises(ValueError, match="greater than or equal to 256"):
        VideoPayload.model_validate({"prompt": "x", "config": {"width": 64, "height": 832, "steps": 25,
                                                               "guidance_scale": 6.5, "frame_num": 81}})


def test_cancel_mid_denoise_skips_the_vae_decode(wan: WanHandler, job_types: dict[str, JobType],
                                                 storage: LocalStorage, monkeypatch: pytest.MonkeyPatch) -> None:
    decoded = Spy(wan.pipes["t2v"].vae, "decode", monkeypatch)
    recorder = Recorder(cancel_at=lambda write: bool(write[2] and write[2].get("step") == 2))
    with pytest.raises(JobCanceled):
        run(wan, job_types, storage, {"prompt": "waves", "config": {**TINY, "steps": 5, "frame_num": 9}},
            recorder=recorder)
    assert recorder.count("denoising") == 2
    assert decoded.calls == []
    assert not (storage.root / "video_fast").exists()


def test_out_of_memory_fails_retryable_and_the_next_attempt_tiles_the_vae(
        wan: WanHandler, job_types: dict[str, JobType], storage: LocalStorage,
        monkeypatch: pytest.MonkeyPatch) -> None:
    transformer = wan.pipes["t2v"].transformer
    original = transformer.forward
    left = {"n": 1}

    def forward(*args: Any, **kwargs: Any) -> Any:
        if left["n"]:
            left["n"] -= 1
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 30.00 GiB")
        return original(*args, **kwargs)

    monkeypatch.setattr(transformer, "forward", forward)
    payload = {"prompt": "waves", "config": {**TINY, "frame_num": 9}}
    error = expect_error(ErrorCode.OOM_ERROR, "out of GPU memory at 64x64, 9 frames",
                         lambda: run(wan, job_types, storage, payload))
    assert error.retryable
    tiled = Spy(wan.pipes["t2v"].vae, "enable_tiling", monkeypatch)
    result, _ = run(wan, job_types, storage, payload, attempts=2,
                    errors=[{"code": "OOM_ERROR", "message": "out of memory", "retryable": True}])
    assert result["frames"] == 9 and len(tiled.calls) == 1
    assert not wan.pipes["t2v"].vae.use_tiling


def test_models_that_cannot_load_fail_with_model_load_error(models: dict[str, Path], job_types: dict[str, JobType],
                                                            storage: LocalStorage, tmp_path: Path) -> None:
    broken = WanHandler(Settings(home=tmp_path, diffusion_device="cpu"), model=str(tmp_path / "missing"))
    assert expect_error(ErrorCode.MODEL_LOAD_ERROR, "could not be loaded", broken.load).retryable

    no_vace = WanHandler(Settings(home=tmp_path, diffusion_device="cpu"), model=str(models["wan"]),
                         vace_model=str(tmp_path / "no-vace"), i2v_model="")
    start = put_reference(storage, "start.png", stripes(64, 64, (1, 2, 3)))
    payload = {"prompt": "waves", "config": {**TINY, "frame_num": 9}}
    expect_error(ErrorCode.MODEL_LOAD_ERROR, "no-vace",
                 lambda: run(no_vace, job_types, storage, {**payload, "metadata": {"start_reference_url": start}},
                             user_id=USER))
    result, _ = run(no_vace, job_types, storage, payload)  # text-to-video still served
    assert result["pipeline"] == "t2v"


# --- in a real worker -----------------------------------------------------------------------


def test_a_worker_runs_a_wan_video_job_end_to_end(wan: WanHandler, start_worker: Any, queue: JobQueue,
                                                  settings: Settings) -> None:
    job_id = queue.enqueue("video_high", {"prompt": "a paper boat on a river",
                                          "config": {**TINY, "frame_num": 9, "seed": 21}})
    start_worker(handlers={"wan": wan})
    row = wait_status(queue, job_id, "completed", "failed", timeout=120)
    assert row["status"] == "completed", row["error"]
    result = row["result"]
    assert result["video_info"]["frames"] == 9 and result["seed"] == 21 and result["guidance_scale"] == 7.5
    assert row["progress"] == 100
    storage = LocalStorage(settings.storage_dir)
    video = result["assets"][0]
    assert video["path"].endswith(f"/{job_id}/0.mp4")
    assert probe_mp4(download(storage, video)).frames == 9


def test_a_user_cancel_mid_denoise_ends_the_row_canceled_without_decoding(
        wan: WanHandler, start_worker: Any, queue: JobQueue, settings: Settings,
        monkeypatch: pytest.MonkeyPatch) -> None:
    decoded = Spy(wan.pipes["t2v"].vae, "decode", monkeypatch)
    transformer = wan.pipes["t2v"].transformer
    original = transformer.forward
    target: dict[str, Any] = {}
    calls = {"n": 0}

    def forward(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:
            queue.request_cancel(target["id"])  # what a frontend's update of cancel_requested does
        return original(*args, **kwargs)

    monkeypatch.setattr(transformer, "forward", forward)
    target["id"] = queue.enqueue("video_fast", {"prompt": "waves", "config": {**TINY, "steps": 20, "frame_num": 9}})
    start_worker(handlers={"wan": wan})
    row = wait_status(queue, target["id"], "canceled", "completed", "failed", timeout=120)
    assert row["status"] == "canceled"
    assert calls["n"] < 40 and decoded.calls == []  # 20 steps x 2 (guidance) would be 40 calls
    assert not (settings.storage_dir / "video_fast").exists()
