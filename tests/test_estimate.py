"""The estimated completion of a running job (worker.estimate): from the progress rate for any
handler, from the measured step time and the stages left for SDXL/WAN; on the row as
`estimated_completion_at`, moved only by real changes, and gone once the run ends."""

from __future__ import annotations

import itertools
import time
from typing import Any

import psycopg
import pytest

from tests.diffusion_support import make_job, tiny_models
from worker import db
from worker.config import Settings
from worker.estimate import (
    SDXL_PRIORS,
    DiffusionEstimate,
    LiveUpdate,
    ProgressRate,
    StageHistory,
    work_units,
)
from worker.handlers.base import JobContext
from worker.handlers.sdxl import SdxlHandler
from worker.jobs import JobType
from worker.queue import JobQueue, Outcome
from worker.storage import LocalStorage

Row = dict[str, Any]


# --- the estimators ---------------------------------------------------------------------------


def test_progress_rate_of_a_steady_job_is_exact_and_unknown_before_it_moves() -> None:
    rate = ProgressRate()
    rate.observe(0.0, now=100.0)
    assert rate.remaining(100.0) is None  # one point: no rate yet
    rate.observe(0.0, now=101.0)
    assert rate.remaining(101.0) is None  # no advance: still nothing known
    rate.observe(0.1, now=102.0)  # 10 % in 2 s: 18 s to go
    assert rate.remaining(102.0) == pytest.approx(18.0)
    assert rate.remaining(105.0) == pytest.approx(15.0)  # counted down between updates
    rate.observe(0.5, now=110.0)
    assert rate.remaining(110.0) == pytest.approx(10.0)
    assert rate.remaining(1000.0) == 0.0
    rate.observe(0.2, now=111.0)  # went back (a stage restarted): start over
    assert rate.remaining(111.0) is None


def test_progress_rate_follows_the_recent_pace() -> None:
    rate = ProgressRate(window=10.0)
    rate.observe(0.0, now=0.0)
    rate.observe(0.1, now=100.0)  # slow start: 1 % in 10 s
    for i in range(1, 6):
        rate.observe(0.1 + 0.1 * i, now=100.0 + i)  # then 10 % a second
    assert rate.remaining(105.0) == pytest.approx(4.0)  # the window forgot the slow start


def test_stage_history_learns_and_replaces_the_priors() -> None:
    history = StageHistory(weight=0.5)
    estimate = DiffusionEstimate(history, SDXL_PRIORS, work_units(1024, 1024), calls=2)
    assert estimate.before_start(10) is None  # nothing measured yet
    # 5 steps left at 0.1 s, 2 decodes and the upload at the priors (3 and 2 steps)
    assert estimate.remaining(5, 0.1, 2) == pytest.approx(0.5 + 2 * 0.3 + 0.2)
    history.record("step", 0.2, estimate.work_per_call)
    history.record("decode", 0.05, estimate.work_per_call)
    history.record("upload", 0.1, estimate.work_per_call * 2)
    assert estimate.remaining(5, 0.1, 2) == pytest.approx(0.5 + 2 * 0.05 + 0.1)
    assert estimate.before_start(10) == pytest.approx(20 * 0.2 + 2 * 0.05 + 0.1)
    history.record("decode", 0.15, estimate.work_per_call)
    assert history.per_unit("decode") == pytest.approx(0.1 / estimate.work_per_call)  # halfway: EWMA 0.5


# --- a steady simulated job in a worker ---------------------------------------------------------


def test_the_row_estimate_falls_and_is_within_a_factor_of_2_of_the_real_remaining_time(
        start_worker: Any, queue: JobQueue, sql: psycopg.Connection[Row]) -> None:
    steps, step_seconds = 12, 0.25
    job_id = queue.enqueue("simulate", {"prompt": "steady", "config": {"steps": steps, "step_seconds": step_seconds}})
    start_worker()
    samples: list[Row] = []
    while True:
        row = sql.execute("select status, now() as now, estimated_completion_at as eta, finished_at"
                          " from public.jobs where id = %s", (job_id,)).fetchone()
        if row["status"] == "processing":
            samples.append(row)
        elif row["status"] != "queued":
            break
        time.sleep(0.05)
    assert row["status"] == "completed" and row["eta"] is None  # gone once the run ended
    end = row["finished_at"]
    known = [s for s in samples if s["eta"] is not None]
    assert samples[0]["eta"] is None  # claimed, nothing measured yet
    assert len(known) >= 10
    left = [(s["eta"] - s["now"]).total_seconds() for s in known]
    real = [(end - s["now"]).total_seconds() for s in known]
    assert all(b <= a + 0.05 for a, b in itertools.pairwise(left))  # it falls as the job advances
    assert left[0] > 1.5 and left[-1] < 1.0
    judged = [(est, truth) for est, truth in zip(left, real, strict=True) if truth >= 2 * step_seconds]
    assert len(judged) >= 5
    assert all(truth / 2 <= est <= truth * 2 for est, truth in judged), judged


# --- the SDXL handler: its stages, learned ------------------------------------------------------


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory: pytest.TempPathFactory) -> SdxlHandler:
    models = tiny_models(tmp_path_factory)
    handler = SdxlHandler(Settings(home=tmp_path_factory.mktemp("sdxl"), diffusion_device="cpu",
                                   preview_enabled=False), model=str(models["sdxl"]))
    handler.load()
    return handler


def timed_run(handler: SdxlHandler, job_types: dict[str, JobType], storage: LocalStorage,
              steps: int) -> list[tuple[float, str | None, float | None]]:
    """(seconds before the end, stage, estimated seconds left) at each progress write."""
    writes: list[tuple[float, str | None, float | None]] = []

    def write(progress: int, stage: str | None, partial: Any, live: LiveUpdate | None = None) -> bool:
        writes.append((time.monotonic(), stage, live["eta_seconds"] if live else None))
        return False

    job = make_job(job_types, "sdxl_image_fast", {"prompt": "a cat", "config": {"width": 64, "height": 64,
                                                                                "steps": steps, "seed": 1}})
    handler.run(job, JobContext(job, storage, write, 0.0))
    end = time.monotonic()
    return [(end - at, stage, eta) for at, stage, eta in writes]


def test_sdxl_estimates_from_its_step_time_and_learns_its_other_stages(
        sdxl: SdxlHandler, job_types: dict[str, JobType], storage: LocalStorage,
        monkeypatch: pytest.MonkeyPatch) -> None:
    original = sdxl.pipe.unet.forward

    def slow(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.05)
        return original(*args, **kwargs)

    monkeypatch.setattr(sdxl.pipe.unet, "forward", slow)
    monkeypatch.setattr(sdxl, "stage_history", StageHistory())
    first = timed_run(sdxl, job_types, storage, steps=10)
    assert first[0][1] == "encoding" and first[0][2] is None  # a first job: nothing known before it denoises
    denoising = [eta for _, stage, eta in first if stage == "denoising"]
    assert len(denoising) == 10 and all(eta is not None for eta in denoising)
    assert {"step", "decode", "upload"} <= set(sdxl.stage_history._per_unit)  # measured for the next jobs

    # With what earlier jobs measured (set here to round figures, since the shared CPU makes a tiny
    # model's real times vary too much to compare; the steady simulated job's test compares with
    # the real time): an estimate before the first step, and past the last step exactly the learned
    # decode and upload.
    work = work_units(64, 64)
    learned = StageHistory(weight=1.0)
    learned.record("step", 0.5, work)
    learned.record("decode", 2.0, work)
    learned.record("upload", 3.0, work)
    monkeypatch.setattr(sdxl, "stage_history", learned)
    second = timed_run(sdxl, job_types, storage, steps=10)
    assert second[0][1] == "encoding" and second[0][2] == pytest.approx(10 * 0.5 + 2.0 + 3.0, abs=0.2)
    at_decode = next(eta for _, stage, eta in second if stage == "decoding")
    assert at_decode == pytest.approx(2.0 + 3.0, abs=0.3)


# --- on the row -------------------------------------------------------------------------------


def live(eta: float | None) -> LiveUpdate:
    return LiveUpdate(eta_seconds=eta, preview=None, preview_changed=False)


def test_the_row_moves_its_estimate_only_for_a_real_change_and_clears_it_when_the_run_ends(
        database_url: str, sql: psycopg.Connection[Row]) -> None:
    user = sql.execute("insert into auth.users (email) values ('eta@example.com') returning id").fetchone()["id"]
    job_id = sql.execute("insert into public.jobs (user_id, job_type, payload) values (%s, 'simulate', '{}')"
                         " returning id", (user,)).fetchone()["id"]
    pool = db.make_pool(database_url, 1, name="test-eta")
    worker = JobQueue(pool, "w-eta", 30)

    def eta() -> Any:
        return sql.execute("select estimated_completion_at as at from public.jobs where id = %s",
                           (job_id,)).fetchone()["at"]

    def sent() -> int:
        return sql.execute("select count(*) as n from realtime.messages where event = 'job_live' and topic = %s",
                           (f"job:{job_id}",)).fetchone()["n"]

    try:
        assert [j.id for j in worker.claim(["simulate"], 1)] == [job_id]
        worker.report_progress(job_id, 10, "step 1", None, live(None))
        assert eta() is None and sent() == 0
        worker.report_progress(job_id, 20, "step 2", None, live(100.0))
        first = eta()
        assert first is not None and sent() == 1
        worker.report_progress(job_id, 30, "step 3", None, live(100.5))  # jitter: within max(1 s, 5 %)
        assert eta() == first and sent() == 1
        worker.report_progress(job_id, 40, "step 4", None)  # a writer without live fields leaves it
        assert eta() == first
        worker.report_progress(job_id, 50, "step 5", None, live(150.0))
        assert (eta() - first).total_seconds() == pytest.approx(50.0, abs=1.0) and sent() == 2
        # A retry ends the run: the estimate goes with it.
        worker.finish([Outcome(job_id, "queued", error={"code": "NETWORK_ERROR", "message": "x", "retryable": True},
                               retry_delay=0.0)])
        assert eta() is None and sent() == 2
    finally:
        pool.close()

