"""Storage backends: LocalStorage, SupabaseStorage, the buckets migration and its policies.

SupabaseStorage is exercised through the real supabase-py / storage3 client against
`FakeStorageAPI` (tests/storage_standin.py): a small HTTP server on 127.0.0.1 that fakes the
network edge of the Supabase Storage API. It speaks the subset the worker uses — multipart upload
with `x-upsert`, signed and public URLs, bucket info, download, remove — records every request, and
can be told to fail. `test_real_supabase_storage` runs the same flow against a real project when
SUPABASE_URL and SUPABASE_SERVICE_ROLE_KEY are set, and is skipped otherwise.
Database tests run on a real Postgres (see conftest.py).
"""

from __future__ import annotations

import io
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from PIL import Image

from tests.conftest import wait_status
from tests.storage_standin import (  # noqa: F401 - fake_api_fixture is the fake_api fixture
    KEY,
    FakeStorageAPI,
    fake_api_fixture,
    kind_of,
    png_bytes,
    supabase_storage,
)
from worker.cli import make_storage
from worker.config import Settings
from worker.handlers.base import JobContext, builtin_handlers
from worker.jobs import ErrorCode, Job, JobType, classify
from worker.loop import Worker
from worker.queue import JobQueue
from worker.storage import (
    LocalStorage,
    ObjectNotFound,
    ObjectTooLarge,
    OutagePolicy,
    StorageError,
    StoredObject,
    SupabaseStorage,
)

ASSET_BUCKETS = {
    "sdxl_image_fast", "sdxl_image_high", "image_fast", "image_high", "image7b_fast_enhanced",
    "image7b_high_enhanced", "video_fast", "video_high", "video7b_fast_enhanced", "video7b_high_enhanced",
}


# --- SupabaseStorage against the fake ---------------------------------------------------


def test_upload_upserts_with_content_type_and_returns_signed_url(fake_api: FakeStorageAPI) -> None:
    storage = supabase_storage(fake_api, signed_url_seconds=600, public_buckets=[])
    first, second = png_bytes(color=(1, 2, 3)), png_bytes(80, 80, color=(4, 5, 6))
    storage.upload("image_fast", "u1/j1/0.png", first, "image/png")
    stored = storage.upload("image_fast", "u1/j1/0.png", second, "image/png")

    uploads = [s for s in fake_api.seen if kind_of(s.method, s.path) == "upload"]
    assert len(uploads) == 2
    assert all(s.headers.get("x-upsert") == "true" and s.file_content_type == "image/png" for s in uploads)
    assert list(fake_api.objects) == [("image_fast", "u1/j1/0.png")], "one object: the retry overwrote it"
    assert fake_api.objects[("image_fast", "u1/j1/0.png")][0] == second

    assert (stored.bucket, stored.path, stored.content_type, stored.size) == (
        "image_fast", "u1/j1/0.png", "image/png", len(second))
    assert stored.url.startswith(f"{fake_api.url}/storage/v1/object/sign/image_fast/u1/j1/0.png?token=")
    sign = [s for s in fake_api.seen if kind_of(s.method, s.path) == "sign"][-1]
    assert sign.json["expiresIn"] == "600"
    assert stored.url_expires_at is not None
    expires = datetime.fromisoformat(stored.url_expires_at)
    assert abs(expires - (datetime.now(UTC) + timedelta(seconds=600))) < timedelta(seconds=60)
    assert httpx.get(stored.url).content == second, "the signed URL serves the asset"
    assert set(stored.to_json()) == {"bucket", "path", "url", "content_type", "size", "url_expires_at"}


def test_public_url_per_bucket_flag_or_config(fake_api: FakeStorageAPI) -> None:
    fake_api.public.update({"pub": True, "priv": False})
    storage = supabase_storage(fake_api)  # reads each bucket's `public` from the Storage API
    pub = storage.upload("pub", "u/j/0.png", b"a", "image/png")
    storage.upload("pub", "u/j/1.png", b"b", "image/png")
    priv = storage.upload("priv", "u/j/0.png", b"c", "image/png")
    assert pub.url == f"{fake_api.url}/storage/v1/object/public/pub/u/j/0.png" and pub.url_expires_at is None
    assert httpx.get(pub.url).content == b"a"
    assert "/object/sign/priv/u/j/0.png?token=" in priv.url and priv.url_expires_at
    assert fake_api.count("bucket") == 2, "each bucket's flag is read once and cached"

    configured = supabase_storage(fake_api, public_buckets=["priv"])  # config overrides the flag
    assert configured.upload("priv", "u/j/2.png", b"d", "image/png").url.endswith("/object/public/priv/u/j/2.png")
    assert fake_api.count("bucket") == 2


def test_transient_failures_are_retried_in_process(fake_api: FakeStorageAPI) -> None:
    storage = supabase_storage(fake_api, public_buckets=[], attempts=4)
    fake_api.fail["upload"] = [503, 500]
    fake_api.fail["sign"] = [502]
    stored = storage.upload("video_fast", "u/j/0.mp4", b"mp4", "video/mp4")
    assert fake_api.count("upload") == 3, "two 5xx, then success"
    assert fake_api.count("sign") == 2, "signing is retried on its own, without uploading again"
    assert fake_api.objects[("video_fast", "u/j/0.mp4")] == (b"mp4", "video/mp4")
    assert "token=" in stored.url


def test_persistent_failure_raises_retryable_storage_error(fake_api: FakeStorageAPI) -> None:
    storage = supabase_storage(fake_api, public_buckets=[], attempts=3)
    fake_api.fail_always["upload"] = 503
    with pytest.raises(StorageError) as caught:
        storage.upload("image_fast", "u/j/0.png", b"x", "image/png")
    assert fake_api.count("upload") == 3
    assert caught.value.retryable and caught.value.status == 503
    error = classify(caught.value)
    assert error.code == ErrorCode.STORAGE_ERROR and error.retryable, "the job goes back to the queue"


def test_permanent_failure_is_not_retried_in_process(fake_api: FakeStorageAPI) -> None:
    storage = supabase_storage(fake_api, public_buckets=[], attempts=4)
    fake_api.fail_always["upload"] = 415
    with pytest.raises(StorageError) as caught:
        storage.upload("image_fast", "u/j/0.png", b"x", "text/html")
    assert fake_api.count("upload") == 1
    assert not caught.value.retryable and caught.value.status == 415


def test_unreachable_storage_api_raises_storage_error() -> None:
    storage = SupabaseStorage("http://127.0.0.1:9", KEY, attempts=2, backoff_initial=0.01, backoff_max=0.02,
                              timeout=2.0, public_buckets=[])
    started = time.monotonic()
    with pytest.raises(StorageError) as caught:
        storage.upload("image_fast", "u/j/0.png", b"x", "image/png")
    assert caught.value.retryable and "ConnectError" in str(caught.value)
    assert time.monotonic() - started < 30


def test_download_through_the_client(fake_api: FakeStorageAPI) -> None:
    storage = supabase_storage(fake_api, public_buckets=[])
    fake_api.objects[("reference_images", "u/ref.png")] = (b"0123456789", "image/png")
    assert storage.download("reference_images", "u/ref.png") == b"0123456789"
    with pytest.raises(ObjectTooLarge):
        storage.download("reference_images", "u/ref.png", max_bytes=5)
    with pytest.raises(ObjectNotFound) as caught:
        storage.download("reference_images", "u/missing.png")
    assert not caught.value.retryable
    fake_api.fail["download"] = [500]
    assert storage.download("reference_images", "u/ref.png") == b"0123456789", "a 5xx is retried"


@pytest.mark.parametrize("path", ["../x.png", "u/../../x.png", "/abs.png", "u//x.png", "u\\x.png"])
def test_paths_that_leave_the_folder_are_refused(fake_api: FakeStorageAPI, tmp_path: Path, path: str) -> None:
    for storage in (supabase_storage(fake_api, public_buckets=[]), LocalStorage(tmp_path)):
        with pytest.raises(StorageError):
            storage.upload("image_fast", path, b"x", "image/png")
    assert fake_api.count("upload") == 0 and not any(tmp_path.iterdir())


def _job(user_id: uuid.UUID | None, bucket: str | None = "image_fast", job_type: str = "image_fast") -> Job:
    now = datetime.now(UTC)
    return Job(id=uuid.uuid4(), user_id=user_id, job_type=job_type, queue="wan", payload={}, priority=0,
               attempts=1, max_attempts=3, created_at=now, run_at=now,
               type_info=JobType(name=job_type, queue="wan", handler="wan", bucket=bucket))


def test_publish_path_layout_and_retry_overwrites(fake_api: FakeStorageAPI) -> None:
    storage = supabase_storage(fake_api, public_buckets=[])
    user = uuid.uuid4()
    job = _job(user)
    for attempt in (1, 2):  # a retried job publishes again from a fresh context
        ctx = JobContext(job, storage, lambda *a: False, 0.0)
        first = ctx.publish(png_bytes(color=(attempt, 0, 0)), ext="png", content_type="image/png",
                            width=64, height=64)
        second = ctx.publish(png_bytes(), ext="png", content_type="image/png")
        assert [a["index"] for a in ctx.assets] == [0, 1]
    assert first["path"] == f"{user}/{job.id}/0.png" and second["path"] == f"{user}/{job.id}/1.png"
    assert first["bucket"] == "image_fast" and (first["width"], first["height"]) == (64, 64)
    assert sorted(fake_api.objects) == [("image_fast", f"{user}/{job.id}/0.png"),
                                        ("image_fast", f"{user}/{job.id}/1.png")]
    assert Image.open(io.BytesIO(fake_api.objects[("image_fast", f"{user}/{job.id}/0.png")][0])).getpixel(
        (0, 0)) == (2, 0, 0), "the second attempt's image replaced the first"

    service = _job(None, bucket=None, job_type="simulate")
    asset = JobContext(service, storage, lambda *a: False, 0.0).publish(b"{}", ext="json",
                                                                        content_type="application/json")
    assert (asset["bucket"], asset["path"]) == ("simulate", f"service/{service.id}/0.json")


def test_failed_upload_publishes_nothing(fake_api: FakeStorageAPI) -> None:
    storage = supabase_storage(fake_api, public_buckets=[], attempts=2, outage=OutagePolicy(window=0))
    ctx = JobContext(_job(uuid.uuid4()), storage, lambda *a: False, 0.0)
    fake_api.fail_always["upload"] = 500
    with pytest.raises(StorageError):
        ctx.publish(b"x", ext="png", content_type="image/png")
    assert ctx.assets == [] and fake_api.objects == {}


# --- LocalStorage and the backend choice ------------------------------------------------


def test_local_storage_overwrites_and_downloads(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    storage.upload("image_fast", "u/j/0.png", b"first", "image/png")
    stored = storage.upload("image_fast", "u/j/0.png", b"second", "image/png")
    assert stored == StoredObject("image_fast", "u/j/0.png", (tmp_path / "image_fast/u/j/0.png").resolve().as_uri(),
                                  "image/png", 6)
    assert [p.name for p in (tmp_path / "image_fast/u/j").iterdir()] == ["0.png"]
    assert storage.download("image_fast", "u/j/0.png") == b"second"
    with pytest.raises(ObjectTooLarge):
        storage.download("image_fast", "u/j/0.png", max_bytes=3)
    with pytest.raises(ObjectNotFound):
        storage.download("image_fast", "u/j/1.png")


def test_make_storage_follows_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SUPABASE_URL", "SUPABASE_SERVICE_ROLE_KEY", "OURVIDZ_STORAGE_BACKEND",
                 "OURVIDZ_STORAGE_PUBLIC_BUCKETS", "OURVIDZ_SIGNED_URL_SECONDS"):
        monkeypatch.delenv(name, raising=False)
    assert isinstance(make_storage(Settings(home=tmp_path)), LocalStorage)
    monkeypatch.setenv("OURVIDZ_STORAGE_BACKEND", "supabase")
    with pytest.raises(ValueError, match="SUPABASE_URL"):
        make_storage(Settings(home=tmp_path))
    monkeypatch.setenv("SUPABASE_URL", "https://example.supabase.co")
    monkeypatch.setenv("SUPABASE_SERVICE_ROLE_KEY", "secret")
    monkeypatch.setenv("OURVIDZ_STORAGE_PUBLIC_BUCKETS", "a, b")
    monkeypatch.setenv("OURVIDZ_SIGNED_URL_SECONDS", "120")
    storage = make_storage(Settings(home=tmp_path))
    assert isinstance(storage, SupabaseStorage)
    assert storage.public_buckets == {"a", "b"} and storage.signed_url_seconds == 120
    assert "secret" not in repr(Settings(home=tmp_path)), "the key is a secret in settings"


# --- the worker publishing through SupabaseStorage -------------------------------------


@pytest.fixture
def run_worker(settings: Settings) -> Iterator[Any]:
    started: list[tuple[Worker, threading.Thread]] = []

    def start(storage: SupabaseStorage) -> Worker:
        worker = Worker(settings, builtin_handlers(), storage)
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


def test_worker_puts_asset_urls_in_the_result(fake_api: FakeStorageAPI, run_worker: Any, queue: JobQueue,
                                              sql: psycopg.Connection[Any]) -> None:
    user = _user(sql)
    run_worker(supabase_storage(fake_api, public_buckets=[]))
    job_id = queue.enqueue("simulate", {"prompt": "hello", "config": {"steps": 2, "step_seconds": 0}}, user_id=user)
    row = wait_status(queue, job_id, "completed", "failed")
    assert row["status"] == "completed", row["error"]
    [asset] = row["result"]["assets"]
    assert asset["bucket"] == "simulate" and asset["path"] == f"{user}/{job_id}/0.json"
    assert asset["content_type"] == "application/json" and asset["index"] == 0
    assert asset["url"].startswith(f"{fake_api.url}/storage/v1/object/sign/simulate/{user}/{job_id}/0.json?token=")
    body = httpx.get(asset["url"]).content
    assert asset["size"] == len(body) and json.loads(body)["job_id"] == str(job_id)
    assert fake_api.objects[("simulate", asset["path"])][1] == "application/json"


def test_worker_retries_the_job_when_storage_keeps_failing(fake_api: FakeStorageAPI, run_worker: Any,
                                                           queue: JobQueue, sql: psycopg.Connection[Any]) -> None:
    user = _user(sql)
    # no retry window: the first attempt's in-process tries all fail, and the job itself is retried
    run_worker(supabase_storage(fake_api, public_buckets=[], attempts=2, outage=OutagePolicy(window=0)))
    fake_api.fail["upload"] = [503, 503]
    job_id = queue.enqueue("simulate", {"config": {"steps": 1, "step_seconds": 0}}, user_id=user)
    row = wait_status(queue, job_id, "completed", "failed")
    assert row["status"] == "completed" and row["attempts"] == 2
    assert [e["code"] for e in row["errors"]] == ["STORAGE_ERROR"]
    assert len(row["result"]["assets"]) == 1 and fake_api.count("upload") == 3
    assert list(fake_api.objects) == [("simulate", f"{user}/{job_id}/0.json")]


# --- the buckets migration and storage.objects policies ---------------------------------


def test_buckets_migration(sql: psycopg.Connection[Any]) -> None:
    rows = {r["id"]: r for r in sql.execute(
        "select id, name, public, file_size_limit, allowed_mime_types from storage.buckets")}
    assert ASSET_BUCKETS | {"reference_images"} <= set(rows)
    assert not any(r["public"] for r in rows.values()), "every bucket is private"
    for name in ASSET_BUCKETS:
        expected = ["video/mp4", "image/png"] if name.startswith("video") else ["image/png"]
        assert rows[name]["allowed_mime_types"] == expected and rows[name]["file_size_limit"] > 0
        assert rows[name]["name"] == name
    assert rows["reference_images"]["allowed_mime_types"] == ["image/png", "image/jpeg", "image/webp"]
    types = sql.execute("select name, bucket from public.job_types where bucket is not null").fetchall()
    assert types and all(t["bucket"] in rows for t in types), "every job type's bucket exists"


def _as(conn: psycopg.Connection[Any], role: str, user: uuid.UUID | None) -> None:
    """What PostgREST / the Storage API do per request."""
    conn.execute(f"set local role {role}")
    claims = {"role": role, **({"sub": str(user)} if user else {})}
    conn.execute("select set_config('request.jwt.claims', %s, true)", (json.dumps(claims),))


def test_storage_policies_keep_users_in_their_folder(sql: psycopg.Connection[Any]) -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    job = uuid.uuid4()
    for user in (a, b):
        sql.execute("insert into storage.objects (bucket_id, name) values ('sdxl_image_fast', %s),"
                    " ('reference_images', %s)", (f"{user}/{job}/0.png", f"{user}/ref.png"))

    def names(role: str, user: uuid.UUID | None) -> set[str]:
        with sql.transaction():
            _as(sql, role, user)
            return {r["name"] for r in sql.execute("select name from storage.objects")}

    assert names("authenticated", a) == {f"{a}/{job}/0.png", f"{a}/ref.png"}
    assert names("authenticated", b) == {f"{b}/{job}/0.png", f"{b}/ref.png"}
    assert names("anon", None) == set()

    def insert(bucket: str, name: str) -> None:
        with sql.transaction():
            _as(sql, "authenticated", a)
            sql.execute("insert into storage.objects (bucket_id, name, owner) values (%s, %s, %s)", (bucket, name, a))

    insert("reference_images", f"{a}/mine.png")
    for bucket, name in [("reference_images", f"{b}/theirs.png"), ("reference_images", "loose.png"),
                         ("sdxl_image_fast", f"{a}/{job}/9.png")]:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            insert(bucket, name)

    with sql.transaction():
        _as(sql, "authenticated", a)
        # Another user's asset cannot be renamed into one's own folder, nor deleted.
        assert sql.execute("update storage.objects set name = %s where name = %s",
                           (f"{a}/stolen.png", f"{b}/ref.png")).rowcount == 0
        assert sql.execute("delete from storage.objects where name like %s", (f"{b}/%",)).rowcount == 0
        assert sql.execute("delete from storage.objects where bucket_id = 'sdxl_image_fast'").rowcount == 0
        assert sql.execute("delete from storage.objects where name = %s", (f"{a}/mine.png",)).rowcount == 1
    count = sql.execute("select count(*) as n from storage.objects").fetchone()
    assert count is not None and count["n"] == 4


# --- a real Storage API -----------------------------------------------------------------


def test_real_supabase_storage() -> None:
    url, key = os.environ.get("SUPABASE_URL"), os.environ.get("SUPABASE_SERVICE_ROLE_KEY")
    if not url or not key:
        reason = "SUPABASE_URL / SUPABASE_SERVICE_ROLE_KEY not set: no real Storage API to test against"
        print(reason)
        pytest.skip(reason)
    bucket = os.environ.get("OURVIDZ_IT_BUCKET", "reference_images")  # created by the buckets migration
    storage = SupabaseStorage(url, key, signed_url_seconds=120)
    path = f"{uuid.uuid4()}/ourvidz-it/0.png"
    try:
        storage.upload(bucket, path, png_bytes(color=(1, 1, 1)), "image/png")
        second = png_bytes(96, 96, color=(2, 2, 2))
        stored = storage.upload(bucket, path, second, "image/png")
        assert stored.size == len(second)
        response = httpx.get(stored.url, follow_redirects=True, timeout=30)
        assert response.status_code == 200 and response.content == second
        assert response.headers["content-type"].startswith("image/png")
        assert storage.download(bucket, path) == second
        with pytest.raises(ObjectNotFound):
            storage.download(bucket, f"{uuid.uuid4()}/missing.png")
    finally:
        storage._storage.from_(bucket).remove([path])
        storage.close()
