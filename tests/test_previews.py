"""Live previews (worker.preview) of SDXL and WAN jobs on the tiny random-weight pipelines, on CPU.

The first tests check the pieces (the linear maps, the x0 estimate of the schedulers); then the
handlers run with a JobContext whose progress writer takes the live fields as the worker's does and
checks, at every write that names a preview, that its object is really there; the last ones run the
jobs in a real worker against the test Postgres and watch the row. The tiny UNet is slowed to a
fixed step time where the pace of the previews matters.
"""

from __future__ import annotations

import io
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
import torch
from PIL import Image

from tests.diffusion_support import make_job
from worker import db
from worker.config import Settings
from worker.estimate import LiveUpdate
from worker.handlers.base import JobContext
from worker.handlers.sdxl import SdxlHandler
from worker.handlers.wan import WanHandler
from worker.jobs import JobType
from worker.preview import (
    SDXL_RGB_BIAS,
    SDXL_RGB_FACTORS,
    WAN21_RGB_BIAS,
    WAN21_RGB_FACTORS,
    denoised,
    linear_projection,
    spread,
)
from worker.queue import JobQueue
from worker.storage import LocalStorage
from worker.tiny_diffusion import build_tiny_taesd

TINY = {"width": 64, "height": 64}


def previews(handler: SdxlHandler | WanHandler, monkeypatch: pytest.MonkeyPatch, **settings: Any) -> None:
    monkeypatch.setattr(handler, "settings", handler.settings.model_copy(update=settings))


def slow_steps(module: torch.nn.Module, monkeypatch: pytest.MonkeyPatch, seconds: float,
               fail_at: int | None = None) -> dict[str, int]:
    """Every forward of `module` takes at least `seconds`; the `fail_at`-th raises."""
    original = module.forward
    calls = {"n": 0}

    def forward(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if fail_at is not None and calls["n"] >= fail_at:
            raise RuntimeError("the GPU fell off the bus")
        time.sleep(seconds)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "forward", forward)
    return calls


class LiveRecorder:
    """A progress writer taking the live fields, as the worker's does: records each write and whether
    the preview it names exists in storage at that moment."""

    def __init__(self, storage: LocalStorage) -> None:
        self.storage = storage
        self.writes: list[tuple[int, str | None, LiveUpdate | None]] = []
        self.named: list[dict[str, Any]] = []  # each preview change that named an object
        self.missing: list[dict[str, Any]] = []  # named while its object was not there

    def __call__(self, progress: int, stage: str | None, partial: dict[str, Any] | None,
                 live: LiveUpdate | None = None) -> bool:
        self.writes.append((progress, stage, live))
        if live and live["preview_changed"] and live["preview"]:
            preview = live["preview"]
            self.named.append(preview)
            if not (self.storage.root / preview["bucket"] / preview["path"]).is_file():
                self.missing.append(preview)
        return False

    def preview_writes(self) -> list[dict[str, Any] | None]:
        return [live["preview"] for _, _, live in self.writes if live and live["preview_changed"]]


def run_with(handler: SdxlHandler | WanHandler, job_types: dict[str, JobType], storage: LocalStorage,
             payload: dict[str, Any], job_type: str) -> tuple[dict[str, Any], LiveRecorder, JobContext]:
    recorder = LiveRecorder(storage)
    job = make_job(job_types, job_type, payload)
    ctx = JobContext(job, storage, recorder, 0.0)
    return handler.run(job, ctx), recorder, ctx


def files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


def picture(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image


# --- the pieces -----------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "factors", "bias"), [("sdxl", SDXL_RGB_FACTORS, SDXL_RGB_BIAS),
                                                         ("wan", WAN21_RGB_FACTORS, WAN21_RGB_BIAS)])
def test_linear_projection_is_the_published_map(family: str, factors: Any, bias: Any) -> None:
    channels = len(factors)
    projection = linear_projection(family)  # type: ignore[arg-type]
    zero = projection(torch.zeros(1, channels, 2, 3))
    assert zero.shape == (1, 2, 3, 3)
    assert torch.allclose(zero[0, 0, 0], (torch.tensor(bias) + 1) / 2)
    for channel in range(channels):
        one_hot = torch.zeros(1, channels, 1, 1)
        one_hot[0, channel] = 1.0
        expected = ((torch.tensor(factors[channel]) + torch.tensor(bias) + 1) / 2).clamp(0, 1)
        assert torch.allclose(projection(one_hot)[0, 0, 0], expected)
    assert projection(torch.full((1, channels, 1, 1), 50.0)).max() <= 1.0  # clamped
    with pytest.raises(ValueError, match="channels"):
        projection(torch.zeros(1, channels + 1, 1, 1))


def test_euler_x0_is_solved_from_two_samples(sdxl: SdxlHandler) -> None:
    scheduler = type(sdxl.pipe.scheduler).from_config(sdxl.pipe.scheduler.config)
    scheduler.set_timesteps(10)
    clean = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    sample = clean + scheduler.sigmas[0] * noise
    for t in scheduler.timesteps[:3]:
        sigma = scheduler.sigmas[scheduler.step_index or 0]
        epsilon = (sample - clean) / sigma  # a perfect denoiser
        previous, sample = sample, scheduler.step(epsilon, t, sample).prev_sample
        assert torch.allclose(denoised(scheduler, sample, previous), clean, atol=1e-3)
    # Without the previous sample, the sample itself (still noisy) is all there is.
    assert denoised(scheduler, sample, None) is sample


def test_unipc_x0_is_the_schedulers_own_prediction(wan: WanHandler) -> None:
    scheduler = wan._scheduler(wan.pipes["t2v"], "unipc", 3.0)
    scheduler.set_timesteps(4)
    sample = torch.randn(1, 16, 2, 4, 4)
    scheduler.step(torch.randn_like(sample), scheduler.timesteps[0], sample)
    assert denoised(scheduler, sample, None) is scheduler.model_outputs[-1]


def test_frames_are_spread_over_the_clip() -> None:
    assert spread(21, 4) == [0, 7, 13, 20]
    assert spread(3, 4) == [0, 1, 2]
    assert spread(5, 1) == [2]


# --- in the handlers ------------------------------------------------------------------------


def test_sdxl_previews_come_every_n_steps_while_their_object_exists_and_go_at_the_end(
        sdxl: SdxlHandler, job_types: dict[str, JobType], storage: LocalStorage,
        monkeypatch: pytest.MonkeyPatch) -> None:
    previews(sdxl, monkeypatch, preview_every_steps=3, preview_min_seconds=0.0)
    slow_steps(sdxl.pipe.unet, monkeypatch, 0.05)
    result, recorder, ctx = run_with(sdxl, job_types, storage, {"prompt": "a lighthouse",
                                     "config": {**TINY, "steps": 13, "num_images": 3, "seed": 4}}, "sdxl_image_fast")
    steps = [p["step"] for p in recorder.named]
    assert len(steps) >= 2 and set(steps) <= {3, 6, 9, 12}, steps  # the pace; a stale one may be dropped
    assert steps == sorted(set(steps))
    assert recorder.missing == []  # the row never names an object that is not there
    assert len({p["url"] for p in recorder.named}) == len(steps)  # a new URL each time: no stale cache
    first = recorder.named[0]
    assert first["path"] == f"service/{ctx.job.id}/preview.png" and first["bucket"] == "sdxl_image_fast"
    assert (first["width"], first["height"], first["steps"]) == (16, 16, 13)  # 3 images of 8x8 in a 2x2 grid
    assert first["kept"] is False

    # The end: the row is cleared (before the object goes), the object is gone, the result never names it.
    assert recorder.preview_writes()[-1] is None
    assert files(storage.root) == sorted(f"sdxl_image_fast/{a['path']}" for a in result["assets"])
    assert all("preview" not in a["path"] for a in result["assets"])
    assert ctx.preview is None


def test_previews_are_throttled_to_one_per_min_seconds(sdxl: SdxlHandler, job_types: dict[str, JobType],
                                                       storage: LocalStorage, monkeypatch: pytest.MonkeyPatch) -> None:
    previews(sdxl, monkeypatch, preview_every_steps=1, preview_min_seconds=0.3)
    slow_steps(sdxl.pipe.unet, monkeypatch, 0.05)  # one UNet call a step (guidance is batched): >= 0.05 s
    started = time.monotonic()
    _, recorder, _ = run_with(sdxl, job_types, storage, {"prompt": "a lighthouse",
                              "config": {**TINY, "steps": 20, "seed": 4}}, "sdxl_image_fast")
    elapsed = time.monotonic() - started
    steps = [p["step"] for p in recorder.named]
    # Every step is due by the step count; time holds them back to one per 0.3 s (at 0.05 s a step,
    # unless the machine is slower than that, about one in six).
    assert 2 <= len(steps) <= 1 + elapsed / 0.3, (steps, elapsed)
    assert len(steps) < 19


def test_previews_can_be_turned_off(sdxl: SdxlHandler, job_types: dict[str, JobType], storage: LocalStorage,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    previews(sdxl, monkeypatch, preview_enabled=False, preview_every_steps=1, preview_min_seconds=0.0)
    _, recorder, _ = run_with(sdxl, job_types, storage, {"prompt": "a lighthouse",
                              "config": {**TINY, "steps": 4, "seed": 4}}, "sdxl_image_fast")
    assert recorder.named == [] and recorder.preview_writes() == []


def test_a_wan_preview_shows_frames_side_by_side_and_can_be_kept(
        wan: WanHandler, job_types: dict[str, JobType], storage: LocalStorage, monkeypatch: pytest.MonkeyPatch) -> None:
    previews(wan, monkeypatch, preview_every_steps=1, preview_min_seconds=0.0, preview_keep=True, preview_frames=4)
    slow_steps(wan.pipes["t2v"].transformer, monkeypatch, 0.05)
    result, recorder, _ = run_with(wan, job_types, storage, {"prompt": "waves", "config": {
        **TINY, "steps": 4, "frame_num": 9, "seed": 2}}, "video_fast")
    assert recorder.named and recorder.missing == []
    kept = recorder.named[-1]
    assert kept["frames"] == 3  # 9 frames are 3 latent frames (4x in time after the first)
    assert (kept["width"], kept["height"]) == (3 * 8, 8)  # 64x64 frames are 8x8 latents
    assert kept["kept"] is True and recorder.preview_writes()[-1] == kept  # kept: not cleared
    image = picture(storage.download(kept["bucket"], kept["path"]))
    assert image.size == (24, 8) and image.format == "PNG"
    assert np.asarray(image).std() > 0  # the latents' colours, not a blank
    assert kept["path"] not in {a["path"] for a in result["assets"]}


def test_a_tiny_decoder_gives_full_size_previews(sdxl: SdxlHandler, job_types: dict[str, JobType],
                                                 storage: LocalStorage, tmp_path_factory: pytest.TempPathFactory,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    decoder = build_tiny_taesd(tmp_path_factory.getbasetemp() / "tiny-taesd")
    previews(sdxl, monkeypatch, preview_every_steps=2, preview_min_seconds=0.0, preview_keep=True,
             preview_sdxl_decoder=str(decoder))
    _, recorder, _ = run_with(sdxl, job_types, storage, {"prompt": "a lighthouse",
                              "config": {**TINY, "steps": 4, "seed": 4}}, "sdxl_image_fast")
    kept = recorder.named[-1]
    assert (kept["width"], kept["height"]) == (64, 64)  # the decoder's 8x, not one pixel per latent
    assert picture(storage.download(kept["bucket"], kept["path"])).size == (64, 64)


def test_a_broken_decoder_setting_falls_back_to_the_linear_map(
        sdxl: SdxlHandler, job_types: dict[str, JobType], storage: LocalStorage, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    previews(sdxl, monkeypatch, preview_every_steps=2, preview_min_seconds=0.0,
             preview_sdxl_decoder=str(tmp_path / "no-such-decoder"))
    result, recorder, _ = run_with(sdxl, job_types, storage, {"prompt": "a lighthouse",
                                   "config": {**TINY, "steps": 4, "seed": 4}}, "sdxl_image_fast")
    assert result["image_count"] == 1
    assert [(p["width"], p["height"]) for p in recorder.named] == [(8, 8)]


# --- in a worker, on the row -----------------------------------------------------------------


@pytest.fixture
def watch(queue: JobQueue) -> Callable[[uuid.UUID, Callable[[dict[str, Any]], Any]], list[dict[str, Any]]]:
    """Poll a job's row until it is terminal; each processing row goes to `seen` (which may act on it)."""

    def follow(job_id: uuid.UUID, seen: Callable[[dict[str, Any]], Any] = lambda row: None) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            row = queue.get_job(job_id)
            assert row is not None
            rows.append(row)
            if row["status"] in ("completed", "failed", "canceled"):
                return rows
            if row["status"] == "processing":
                seen(row)
            time.sleep(0.01)
        raise AssertionError("the job did not end")

    return follow


@pytest.fixture
def worker_storage(settings: Settings) -> LocalStorage:
    return LocalStorage(settings.storage_dir)


def test_the_row_names_the_preview_while_the_job_runs_and_not_after(
        sdxl: SdxlHandler, start_worker: Any, queue: JobQueue, watch: Any, worker_storage: LocalStorage,
        monkeypatch: pytest.MonkeyPatch) -> None:
    previews(sdxl, monkeypatch, preview_every_steps=2, preview_min_seconds=0.0)
    slow_steps(sdxl.pipe.unet, monkeypatch, 0.05)
    job_id = queue.enqueue("sdxl_image_fast", {"prompt": "a lighthouse", "config": {**TINY, "steps": 12, "seed": 5}})
    start_worker(handlers={"sdxl": sdxl})
    present: list[bool] = []

    def seen(row: dict[str, Any]) -> None:
        if row["preview"]:
            exists = worker_storage.root.joinpath(row["preview"]["bucket"], row["preview"]["path"]).is_file()
            again = queue.get_job(job_id)
            if again and again["preview"] == row["preview"]:  # still named after the look: it must be there
                present.append(exists)

    rows = watch(job_id, seen)
    final = rows[-1]
    assert final["status"] == "completed", final["error"]
    urls = [r["preview"]["url"] for r in rows if r["preview"]]
    assert len(set(urls)) >= 2  # it changes as the job advances, every 2 steps
    assert {r["preview"]["step"] for r in rows if r["preview"]} <= {2, 4, 6, 8, 10}
    assert present and all(present)
    assert final["preview"] is None and final["estimated_completion_at"] is None
    assert not any("preview" in name for name in files(worker_storage.root))
    assert all(not a["path"].endswith("preview.png") for a in final["result"]["assets"])


def test_a_canceled_job_leaves_no_preview_behind(sdxl: SdxlHandler, start_worker: Any, queue: JobQueue, watch: Any,
                                                 worker_storage: LocalStorage,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    previews(sdxl, monkeypatch, preview_every_steps=1, preview_min_seconds=0.0)
    slow_steps(sdxl.pipe.unet, monkeypatch, 0.05)
    job_id = queue.enqueue("sdxl_image_fast", {"prompt": "a lighthouse", "config": {**TINY, "steps": 40, "seed": 5}})
    start_worker(handlers={"sdxl": sdxl})
    shown: list[dict[str, Any]] = []

    def cancel_once_shown(row: dict[str, Any]) -> None:
        if row["preview"] and not shown:
            shown.append(row["preview"])
            queue.request_cancel(job_id)

    final = watch(job_id, cancel_once_shown)[-1]
    assert shown and final["status"] == "canceled"
    assert final["preview"] is None and final["estimated_completion_at"] is None
    assert files(worker_storage.root) == []


def test_a_failed_job_leaves_no_preview_behind(sdxl: SdxlHandler, start_worker: Any, queue: JobQueue, watch: Any,
                                               worker_storage: LocalStorage, monkeypatch: pytest.MonkeyPatch) -> None:
    previews(sdxl, monkeypatch, preview_every_steps=1, preview_min_seconds=0.0)
    slow_steps(sdxl.pipe.unet, monkeypatch, 0.05, fail_at=16)  # two calls a step: fails in step 8
    job_id = queue.enqueue("sdxl_image_fast", {"prompt": "a lighthouse", "config": {**TINY, "steps": 20, "seed": 5}},
                           max_attempts=1)
    start_worker(handlers={"sdxl": sdxl})
    rows = watch(job_id)
    assert any(r["preview"] for r in rows)  # there was one
    final = rows[-1]
    assert final["status"] == "failed" and "fell off the bus" in final["error"]["message"]
    assert final["preview"] is None and files(worker_storage.root) == []


def test_a_kept_preview_stays_on_the_completed_row_only(sdxl: SdxlHandler, start_worker: Any, queue: JobQueue,
                                                        watch: Any, worker_storage: LocalStorage,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    previews(sdxl, monkeypatch, preview_every_steps=2, preview_min_seconds=0.0, preview_keep=True)
    slow_steps(sdxl.pipe.unet, monkeypatch, 0.02)
    job_id = queue.enqueue("sdxl_image_fast", {"prompt": "a lighthouse", "config": {**TINY, "steps": 6, "seed": 5}})
    start_worker(handlers={"sdxl": sdxl})
    final = watch(job_id)[-1]
    assert final["status"] == "completed"
    kept = final["preview"]
    assert kept["kept"] is True and kept["step"] in (2, 4)
    assert worker_storage.download(kept["bucket"], kept["path"])
    assert kept["path"] not in {a["path"] for a in final["result"]["assets"]}


# --- the columns: who reads and writes them, and what Realtime sends ---------------------------


@pytest.fixture
def owner(sql: psycopg.Connection[dict[str, Any]]) -> Iterator[uuid.UUID]:
    yield sql.execute("insert into auth.users (email) values ('watcher@example.com') returning id").fetchone()["id"]


def as_user(database_url: str, user: uuid.UUID, query: str, params: Any = None) -> list[dict[str, Any]]:
    """One request as PostgREST makes it for a signed-in user (see tests/test_security.py)."""
    import json

    from psycopg.rows import dict_row

    with psycopg.connect(database_url, autocommit=True, row_factory=dict_row) as conn, conn.transaction():
        conn.execute("select set_config('role', 'authenticated', true), set_config('request.jwt.claims', %s, true)",
                     (json.dumps({"role": "authenticated", "sub": str(user)}),))
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


def test_owners_read_the_live_columns_but_only_the_worker_writes_them(
        database_url: str, sql: psycopg.Connection[dict[str, Any]], owner: uuid.UUID, settings: Settings) -> None:
    job_id = sql.execute("insert into public.jobs (user_id, job_type, payload) values (%s, 'simulate', '{}')"
                         " returning id", (owner,)).fetchone()["id"]
    worker = JobQueue(db.make_pool(database_url, 1, name="test-live"), "w-1", 30)
    try:
        claimed = worker.claim(["simulate"], 1)
        assert [j.id for j in claimed] == [job_id]
        preview = {"bucket": "simulate", "path": f"{owner}/{job_id}/preview.png", "url": "https://x/p.png?v=1-2",
                   "step": 2, "kept": False}
        worker.report_progress(job_id, 40, "step 4", None,
                               LiveUpdate(eta_seconds=30.0, preview=preview, preview_changed=True))
    finally:
        worker.pool.close()
    row = as_user(database_url, owner, "select preview, estimated_completion_at,"
                                       " extract(epoch from estimated_completion_at - now()) as left"
                                       " from public.jobs where id = %s", (job_id,))[0]
    assert row["preview"] == preview and 28 < row["left"] <= 30
    for attempt in ("update public.jobs set preview = '{}' where id = %s",
                    "update public.jobs set estimated_completion_at = now() where id = %s"):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            as_user(database_url, owner, attempt, (job_id,))
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        as_user(database_url, owner, "insert into public.jobs (job_type, payload, preview)"
                                     " values ('sdxl_image_fast', '{\"prompt\": \"x\"}', '{}')")

    sent = sql.execute("select topic, payload from realtime.messages where event = 'job_live' order by inserted_at"
                       ).fetchall()
    assert {m["topic"] for m in sent} == {f"job:{job_id}", f"jobs:{owner}"}
    assert all(m["payload"]["preview"] == preview and m["payload"]["estimated_completion_at"] for m in sent)


# --- the frontend helper --------------------------------------------------------------------

WATCH_SCRIPT = """
import { watchJob, secondsLeft } from './jobs.js'

async function watch(kept) {
  const handlers = {}
  let subscribed
  const channel = {
    topic: 'job:J',
    on(type, filter, cb) { handlers[filter.event] = cb; return channel },
    subscribe(cb) { subscribed = cb; return channel },
  }
  const first = { id: 'J', status: 'processing', progress: 10, updated_at: '2026-12-01T00:00:00.000001Z',
                  preview: null, estimated_completion_at: null }
  const supabase = {
    channel: () => channel,
    removeChannel: async () => {},
    realtime: { setAuth: async () => {} },
    from: () => ({ select: () => ({ eq: () => ({ maybeSingle: async () => ({ data: first, error: null }) }) }) }),
  }
  const previews = [], estimates = []
  const w = watchJob(supabase, 'J', (row) => estimates.push(row.estimated_completion_at),
                     { onPreview: (url, step) => previews.push([url, step]) })
  while (!subscribed) await new Promise((r) => setTimeout(r, 1))
  subscribed('SUBSCRIBED')
  await new Promise((r) => setTimeout(r, 5))
  const live = (url, step, at, eta) => handlers.job_live({ payload: {
    id: 'J', preview: { bucket: 'b', path: 'p', url, content_type: 'image/png', step, kept },
    estimated_completion_at: eta, updated_at: at } })
  const later = new Date(Date.now() + 60000).toISOString()
  live('u?v=1-2', 2, '2026-12-01T00:00:00.000002Z', later)
  live('u?v=1-2', 2, '2026-12-01T00:00:00.000002Z', later)   // a repeat: no second preview
  live('u?v=1-4', 4, '2026-12-01T00:00:00.000003Z', later)
  live('u?v=1-0', 0, '2026-12-01T00:00:00.000000Z', later)   // older than the row: dropped
  const left = secondsLeft(w.current())
  handlers.job({ payload: { id: 'J', status: 'completed', progress: 100, updated_at: '2026-12-01T00:00:01Z' } })
  const final = await w.done
  return { previews, estimates, left, preview: final.preview, eta: final.estimated_completion_at }
}

console.log(JSON.stringify({ removed: await watch(false), kept: await watch(true) }))
"""


def test_watch_job_reports_each_new_preview_and_settles_the_live_columns_at_the_end(tmp_path: Path) -> None:
    """realtime/src/jobs.ts compiled with the project's TypeScript and run by node against a stand-in
    of supabase-js's channel API: broadcasts as the migration's triggers send them."""
    import json
    import shutil
    import subprocess

    realtime = Path(__file__).resolve().parent.parent / "realtime"
    tsc = realtime / "node_modules" / ".bin" / "tsc"
    if not shutil.which("node") or not tsc.exists():
        pytest.skip("node and realtime/node_modules (npm install --prefix realtime) are needed")
    subprocess.run([str(tsc), str(realtime / "src" / "jobs.ts"), "--outDir", str(tmp_path), "--target", "ES2022",
                    "--module", "ESNext", "--moduleResolution", "bundler", "--skipLibCheck"],
                   check=True, capture_output=True, timeout=120)
    (tmp_path / "package.json").write_text('{"type": "module"}')
    (tmp_path / "watch.mjs").write_text(WATCH_SCRIPT)
    out = subprocess.run(["node", "watch.mjs"], cwd=tmp_path, check=True, capture_output=True, text=True,
                         timeout=60)
    seen = json.loads(out.stdout)
    removed, kept = seen["removed"], seen["kept"]
    assert removed["previews"] == [["u?v=1-2", 2], ["u?v=1-4", 4]]  # each new one once, old ones dropped
    assert removed["estimates"][0] is None and removed["estimates"][-1] is None  # before, and after the end
    assert any(e is not None for e in removed["estimates"])  # the estimate came with onChange
    assert 55 < removed["left"] <= 60
    assert removed["preview"] is None and removed["eta"] is None  # as jobs_live_reset leaves the row
    assert kept["preview"]["url"] == "u?v=1-4" and kept["eta"] is None
