"""Storage outages and refused keys never fail a user's job (issue 10, items 1 and 2).

Storage is reached through the real supabase-py / storage3 client; the server is the stand-in of
tests/storage_standin.py, which fakes the network edge of Supabase Storage: it stops listening
(an outage: connections refused), answers 5xx, or refuses the key as the real server does (JWT error
on upload, 404 on download). Jobs run in a real Worker on a real Postgres (tests/conftest.py).
"""

from __future__ import annotations

import errno
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.conftest import wait_for, wait_status
from tests.storage_standin import (  # noqa: F401 - fake_api_fixture is the fake_api fixture
    FakeStorageAPI,
    PublishingHandler,
    fake_api_fixture,
    png_bytes,
    supabase_storage,
)
from worker.config import Settings
from worker.handlers.base import JobCanceled, JobContext
from worker.jobs import ErrorCode, Job, JobError, JobType, WorkerFault
from worker.loop import Worker
from worker.media import ReferenceLimits, fetch_reference_bytes
from worker.queue import JobQueue
from worker.storage import LocalStorage, OutagePolicy, StorageError, SupabaseStorage

TYPE = "publish_test"
BUCKET = "image_fast"


class OutageHandler(PublishingHandler):
    """Generates, then (once the outputs exist) runs `before_publish`: the outage starts there."""

    def __init__(self, before_publish: Callable[[], None] = lambda: None) -> None:
        super().__init__()
        self.before_publish = before_publish

    def run(self, job: Job, ctx: JobContext) -> dict[str, Any]:
        self.generations.append((str(job.id), job.attempts))
        ctx.progress(0.5, "generated")
        self.before_publish()
        assets = [ctx.publish(png_bytes(color=(i, job.attempts, 0)), ext="png", content_type="image/png")
                  for i in range(int(job.payload.get("assets", 1)))]
        return {"assets": assets}


@pytest.fixture
def run_worker(settings: Settings, queue: JobQueue) -> Iterator[Callable[..., Worker]]:
    queue.upsert_job_type(TYPE, "faults", "publish", bucket=BUCKET, max_attempts=2)
    started: list[tuple[Worker, threading.Thread]] = []

    def start(handler: Any, storage: Any) -> Worker:
        worker = Worker(settings.model_copy(update={"queues": ["faults"]}), {"publish": handler}, storage)
        thread = threading.Thread(target=worker.run, kwargs={"install_signals": False}, daemon=True)
        thread.start()
        started.append((worker, thread))
        return worker

    yield start
    for worker, thread in started:
        worker.stop(abort=True)
        thread.join(30)
        assert not thread.is_alive()


def _user(sql: psycopg.Connection[Any]) -> uuid.UUID:
    row = sql.execute("insert into auth.users (email) values (%s) returning id",
                      (f"{uuid.uuid4().hex[:8]}@example.com",)).fetchone()
    assert row is not None
    return row["id"]


def _outage(api: FakeStorageAPI, kind: str, seconds: float) -> None:
    if kind == "down":
        api.outage(seconds)
        return
    api.fail_always["upload"] = 503

    def end() -> None:
        time.sleep(seconds)
        api.fail_always.pop("upload", None)

    threading.Thread(target=end, daemon=True).start()


# --- inside the window ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["down", "503"])
def test_an_outage_inside_the_window_only_delays_the_job(kind: str, fake_api: FakeStorageAPI, run_worker: Any,
                                                         queue: JobQueue, sql: psycopg.Connection[Any]) -> None:
    outage_seconds = 2.0
    storage = supabase_storage(fake_api, public_buckets=[], attempts=2,
                               outage=OutagePolicy(window=30, first_delay=0.1, max_delay=0.5))
    handler = OutageHandler(lambda: _outage(fake_api, kind, outage_seconds))
    run_worker(handler, storage)
    user = _user(sql)
    started = time.monotonic()
    job_id = queue.enqueue(TYPE, {"assets": 2}, user_id=user)
    stages: set[str] = set()
    row = wait_for(lambda: (r := queue.get_job(job_id)) and (stages.add(r["stage"] or "") or
                                                           (r["status"] in ("completed", "failed") and r)), 20)
    assert row["status"] == "completed", row["error"]
    assert row["attempts"] == 1 and row["errors"] == [], "the outage spent no attempt"
    assert handler.generations == [(str(job_id), 1)], "generated once: only the upload was retried"
    assert time.monotonic() - started >= outage_seconds
    assert "waiting for storage" in stages, "the row said why it was waiting"
    assert row["stage"] != "waiting for storage"
    assert sorted(a["path"] for a in row["result"]["assets"]) == [f"{user}/{job_id}/0.png", f"{user}/{job_id}/1.png"]
    assert sorted(fake_api.objects) == [(BUCKET, f"{user}/{job_id}/0.png"), (BUCKET, f"{user}/{job_id}/1.png")]


# --- past the window -----------------------------------------------------------------------


def test_past_the_window_the_job_is_retried_then_failed_and_its_uploads_removed(
        fake_api: FakeStorageAPI, run_worker: Any, queue: JobQueue, sql: psycopg.Connection[Any]) -> None:
    storage = supabase_storage(fake_api, public_buckets=[], attempts=1,
                               outage=OutagePolicy(window=0.6, first_delay=0.1, max_delay=0.2))
    fake_api.fail_if = lambda kind, name: 503 if kind == "upload" and name.endswith("/1.png") else None
    handler = OutageHandler()
    run_worker(handler, storage)
    user = _user(sql)
    job_id = queue.enqueue(TYPE, {"assets": 2}, user_id=user)
    row = wait_status(queue, job_id, "completed", "failed", timeout=20)
    assert row["status"] == "failed" and row["attempts"] == 2
    assert [e["code"] for e in row["errors"]] == ["STORAGE_ERROR", "STORAGE_ERROR"]
    assert row["error"]["code"] == "STORAGE_ERROR" and "retry window" in row["error"]["message"]
    assert [attempt for _, attempt in handler.generations] == [1, 2], "each attempt generated once"
    assert fake_api.count("upload") >= 2 * 3, "the failing upload was tried within each window"
    assert fake_api.objects == {}, "asset 0 of each attempt was removed again"
    removed = [s.json["prefixes"] for s in fake_api.seen if s.method == "DELETE"]
    assert [f"{user}/{job_id}/0.png", f"{user}/{job_id}/1.png"] in removed


def _job(user_id: uuid.UUID | None = None) -> Job:
    now = datetime.now(UTC)
    return Job(id=uuid.uuid4(), user_id=user_id or uuid.uuid4(), job_type=TYPE, queue="faults", payload={},
               priority=0, attempts=1, max_attempts=3, created_at=now, run_at=now,
               type_info=JobType(name=TYPE, queue="faults", handler="publish", bucket=BUCKET))


def test_a_cancel_stops_the_wait_and_removes_the_uploads(fake_api: FakeStorageAPI) -> None:
    storage = supabase_storage(fake_api, public_buckets=[], attempts=1,
                               outage=OutagePolicy(window=60, first_delay=0.2, max_delay=0.5))
    ctx = JobContext(_job(), storage, lambda *a: False, 0.0)
    ctx.publish(b"first", ext="png", content_type="image/png")
    fake_api.down()
    threading.Timer(0.5, ctx.interrupt, args=(JobCanceled,)).start()
    started = time.monotonic()
    with pytest.raises(JobCanceled):
        ctx.publish(b"second", ext="png", content_type="image/png")
    assert time.monotonic() - started < 5, "the cancel took effect between tries"
    assert ctx.assets == [] and len(fake_api.objects) == 1, "storage is down: nothing could be removed yet"
    fake_api.up()
    assert ctx.discard_assets() == 2, "what could not be removed is removed by the next call (the loop's)"
    assert fake_api.objects == {}


def test_discard_assets_removes_what_the_attempt_uploaded(fake_api: FakeStorageAPI, tmp_path: Path) -> None:
    for storage in (supabase_storage(fake_api, public_buckets=[]), LocalStorage(tmp_path / "storage")):
        job = _job()
        ctx = JobContext(job, storage, lambda *a: False, 0.0)
        for index in range(3):
            ctx.publish(b"x", ext="png", content_type="image/png", index=index)
        assert ctx.discard_assets() == 3 and ctx.assets == []
        assert ctx.discard_assets() == 0, "idempotent"
        for index in range(3):
            with pytest.raises(StorageError):
                storage.download(BUCKET, f"{job.user_id}/{job.id}/{index}.png")
    assert not (tmp_path / "storage" / BUCKET).exists() or not any((tmp_path / "storage" / BUCKET).iterdir())


# --- refused keys --------------------------------------------------------------------------


def test_a_refused_key_on_upload_is_the_workers_fault(fake_api: FakeStorageAPI) -> None:
    storage = supabase_storage(fake_api, key="revoked", public_buckets=[], attempts=3)
    ctx = JobContext(_job(), storage, lambda *a: False, 0.0)
    with pytest.raises(WorkerFault) as caught:
        ctx.publish(b"x", ext="png", content_type="image/png")
    assert caught.value.scope == "storage" and caught.value.code == ErrorCode.STORAGE_ERROR
    assert "refused the service key" in caught.value.message and "revoked" not in caught.value.message
    assert fake_api.count("upload") == 1, "not retried: trying again cannot help"


def test_a_refused_key_on_a_reference_download_is_not_the_users_fault(fake_api: FakeStorageAPI) -> None:
    user = uuid.uuid4()
    fake_api.public["reference_images"] = False
    fake_api.objects[("reference_images", f"{user}/ref.png")] = (png_bytes(), "image/png")
    limits = ReferenceLimits()

    def fetch(storage: SupabaseStorage, name: str) -> bytes:
        return fetch_reference_bytes(f"{user}/{name}", user_id=user, storage=storage, limits=limits)

    bad = supabase_storage(fake_api, key="revoked", public_buckets=[])
    with pytest.raises(WorkerFault) as caught:  # the server answers 404 to a refused key's download
        fetch(bad, "ref.png")
    assert caught.value.scope == "storage" and "refused the service key" in caught.value.message

    good = supabase_storage(fake_api, public_buckets=[])
    assert fetch(good, "ref.png") == fake_api.objects[("reference_images", f"{user}/ref.png")][0]
    with pytest.raises(JobError) as missing:  # the key is fine: the reference really is missing
        fetch(good, "gone.png")
    assert missing.value.code == ErrorCode.INVALID_INPUT and "was not found" in missing.value.message


def test_a_worker_whose_key_is_refused_gives_the_job_back(fake_api: FakeStorageAPI, run_worker: Any,
                                                          queue: JobQueue, sql: psycopg.Connection[Any]) -> None:
    handler = OutageHandler()
    worker = run_worker(handler, supabase_storage(fake_api, key="revoked", public_buckets=[]))
    job_id = queue.enqueue(TYPE, {}, user_id=_user(sql))
    row = wait_for(lambda: (r := queue.get_job(job_id)) and r["errors"] and r, 15)
    assert row["status"] == "queued" and row["attempts"] == 0, "no attempt spent"
    assert row["errors"][-1]["code"] == "STORAGE_ERROR" and row["errors"][-1].get("scope") == "storage"
    assert "refused the service key" in worker.faults["storage"]


# --- full disks ----------------------------------------------------------------------------


def test_a_full_disk_is_the_workers_fault(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tempfile

    storage = LocalStorage(tmp_path / "storage")

    def full(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path))

    monkeypatch.setattr(tempfile, "mkstemp", full)
    with pytest.raises(WorkerFault) as caught:
        storage.upload(BUCKET, "u/j/0.png", b"x", "image/png")
    assert caught.value.scope == "disk" and "the disk is full" in caught.value.message
    monkeypatch.setattr(tempfile, "mkdtemp", full)
    ctx = JobContext(_job(), storage, lambda *a: False, 0.0, scratch_root=tmp_path)
    with pytest.raises(WorkerFault, match="scratch folder"):
        _ = ctx.scratch_dir
