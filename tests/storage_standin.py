"""A stand-in for the network edge of Supabase Storage, for tests that drive the real supabase-py /
storage3 client.

`FakeStorageAPI` is a small HTTP server on 127.0.0.1 (http.server in a thread). It speaks the subset
the worker uses — multipart upload with `x-upsert`, signed and public URLs, bucket info and list,
download, remove — records every request, and injects what the real service does on a bad day:
5xx answers (`fail`, `fail_always`, `fail_if`), an outage (`down()`: the port refuses connections
until `up()`), and refused keys (`accepted_keys`), answered as the real server answers them: HTTP
400 with a JWT/signature error in the body for an upload or a listing, 404 "Object not found" /
"Bucket not found" for a download or a bucket read.

`PublishingHandler` is a handler for worker processes started by the tests
(`--handler publish=tests.storage_standin:PublishingHandler`): it records each generation in
$OURVIDZ_TEST_RECORD and publishes `assets` small PNGs.
"""

from __future__ import annotations

import email.parser
import email.policy
import io
import json
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
from PIL import Image

from tests.support import record
from worker.handlers.base import JobContext
from worker.jobs import Job
from worker.storage import OutagePolicy, SupabaseStorage

KEY = "test-service-role-key"


def png_bytes(width: int = 64, height: int = 64, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    file_content_type: str | None = None
    json: Any = None


@dataclass
class FakeStorageAPI:
    """State of the fake: objects, buckets, the requests seen, failures to inject."""

    url: str = ""
    objects: dict[tuple[str, str], tuple[bytes, str]] = field(default_factory=dict)
    public: dict[str, bool] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    fail: dict[str, list[int]] = field(default_factory=dict)  # kind -> statuses for the next requests
    fail_always: dict[str, int] = field(default_factory=dict)
    fail_if: Callable[[str, str], int | None] | None = None  # (kind, object or bucket name) -> status
    accepted_keys: set[str] = field(default_factory=lambda: {KEY})
    tokens: dict[str, tuple[str, str]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None
    handler: type[BaseHTTPRequestHandler] | None = None
    port: int = 0

    def count(self, kind: str) -> int:
        with self.lock:
            return sum(1 for s in self.seen if kind_of(s.method, s.path) == kind)

    def next_failure(self, kind: str, name: str) -> int | None:
        with self.lock:
            if kind in self.fail_always:
                return self.fail_always[kind]
            queue = self.fail.get(kind)
            if queue:
                return queue.pop(0)
        return self.fail_if(kind, name) if self.fail_if else None

    # -- the server -------------------------------------------------------------------------

    def up(self) -> None:
        """Listen (again, on the same port after `down()`)."""
        handler = self.handler or type("Handler", (_Handler,), {"api": self})
        self.handler = handler
        server = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        server.daemon_threads = True
        self.port = server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = server
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def down(self) -> None:
        """An outage: the port refuses connections until `up()`."""
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def outage(self, seconds: float) -> threading.Thread:
        """Down now, up again after `seconds`, in the background."""
        self.down()

        def restore() -> None:
            time.sleep(seconds)
            self.up()

        thread = threading.Thread(target=restore, daemon=True)
        thread.start()
        return thread


def kind_of(method: str, path: str) -> str:
    rest = path.removeprefix("/storage/v1/")
    if rest.startswith("object/sign/"):
        return "sign" if method == "POST" else "signed_get"
    if rest.startswith("object/public/"):
        return "public_get"
    if rest == "bucket" or rest == "bucket/":
        return "list_buckets"
    if rest.startswith("bucket/"):
        return "bucket"
    if rest.startswith("object/"):
        return {"POST": "upload", "DELETE": "remove"}.get(method, "download")
    return "other"


def _error(status: int, error: str, message: str) -> tuple[int, bytes]:
    # Storage answers most errors as HTTP 400 with the real status in the body, 5xx as themselves.
    http_status = status if status >= 500 else 400
    return http_status, json.dumps({"statusCode": str(status), "error": error, "message": message}).encode()


JSON = "application/json"


class _Handler(BaseHTTPRequestHandler):
    api: FakeStorageAPI

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    def _handle(self) -> None:
        split = urlsplit(self.path)
        path = unquote(split.path)
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        seen = Seen(self.command, path, {k.lower(): v for k, v in self.headers.items()})
        with self.api.lock:
            self.api.seen.append(seen)
        kind = kind_of(self.command, path)
        status, payload, content_type = self._route(kind, path, parse_qs(split.query), body, seen)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _refused_key(self, kind: str) -> tuple[int, bytes, str]:
        # what the real Storage API answers a key it cannot verify
        if kind == "download":
            return (*_error(404, "not_found", "Object not found"), JSON)
        if kind == "bucket":
            return (*_error(404, "Bucket not found", "Bucket not found"), JSON)
        return (*_error(403, "Unauthorized", "invalid signature"), JSON)

    def _route(self, kind: str, path: str, query: dict[str, list[str]], body: bytes,
               seen: Seen) -> tuple[int, bytes, str]:
        api = self.api
        rest = path.removeprefix("/storage/v1/")
        if kind not in ("signed_get", "public_get"):
            token = seen.headers.get("authorization", "").removeprefix("Bearer ")
            if token not in api.accepted_keys or seen.headers.get("apikey") != token:
                return self._refused_key(kind)
        name = rest.split("/", 2)[-1] if kind in ("upload", "download") else rest
        if (failure := api.next_failure(kind, name)) is not None:
            return (*_error(failure, "InternalError", f"injected {failure}"), JSON)
        if kind == "upload":
            bucket, _, name = rest.removeprefix("object/").partition("/")
            message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                f"Content-Type: {seen.headers['content-type']}\r\n\r\n".encode() + body)
            part = next(p for p in message.iter_parts() if p.get_param("name", header="content-disposition") == "file")
            data = part.get_payload(decode=True)
            seen.file_content_type = part.get_content_type()
            with api.lock:
                if (bucket, name) in api.objects and seen.headers.get("x-upsert") != "true":
                    return (*_error(409, "Duplicate", "The resource already exists"), JSON)
                api.objects[(bucket, name)] = (data, seen.file_content_type)
            return 200, json.dumps({"Key": f"{bucket}/{name}", "Id": str(uuid.uuid4())}).encode(), JSON
        if kind == "remove":
            bucket = rest.removeprefix("object/")
            seen.json = json.loads(body)
            with api.lock:
                gone = [api.objects.pop((bucket, p), None) and p for p in seen.json["prefixes"]]
            return 200, json.dumps([{"name": p, "bucket_id": bucket} for p in gone if p]).encode(), JSON
        if kind == "sign":
            bucket, _, name = rest.removeprefix("object/sign/").partition("/")
            seen.json = json.loads(body)
            if (bucket, name) not in api.objects:
                return (*_error(404, "not_found", "Object not found"), JSON)
            token = secrets.token_hex(8)
            api.tokens[token] = (bucket, name)
            signed = f"/object/sign/{bucket}/{name}?token={token}"
            return 200, json.dumps({"signedURL": signed}).encode(), JSON
        if kind in ("bucket", "list_buckets"):
            names = [rest.removeprefix("bucket/")] if kind == "bucket" else sorted(api.public)
            if kind == "bucket" and names[0] not in api.public:
                return (*_error(404, "Bucket not found", "Bucket not found"), JSON)
            now = datetime.now(UTC).isoformat()
            infos = [{"id": b, "name": b, "owner": "", "public": api.public[b], "created_at": now, "updated_at": now,
                      "file_size_limit": None, "allowed_mime_types": None} for b in names]
            return 200, json.dumps(infos[0] if kind == "bucket" else infos).encode(), JSON
        if kind in ("download", "signed_get", "public_get"):
            prefix = {"download": "object/", "signed_get": "object/sign/", "public_get": "object/public/"}[kind]
            bucket, _, name = rest.removeprefix(prefix).partition("/")
            if kind == "signed_get" and api.tokens.get(query.get("token", [""])[0]) != (bucket, name):
                return (*_error(400, "InvalidSignature", "invalid signature"), JSON)
            if kind == "public_get" and not api.public.get(bucket):
                return (*_error(400, "not_found", "Bucket is not public"), JSON)
            if (bucket, name) not in api.objects:
                return (*_error(404, "not_found", "Object not found"), JSON)
            data, content_type = api.objects[(bucket, name)]
            return 200, data, content_type
        return (*_error(404, "not_found", "no such route"), JSON)


@pytest.fixture(name="fake_api")
def fake_api_fixture() -> Iterator[FakeStorageAPI]:
    """The stand-in, listening; import this name into a test module to use the `fake_api` fixture."""
    api = FakeStorageAPI()
    api.up()
    yield api
    api.down()


def supabase_storage(api: FakeStorageAPI, key: str = KEY, **kwargs: Any) -> SupabaseStorage:
    kwargs.setdefault("backoff_initial", 0.01)
    kwargs.setdefault("backoff_max", 0.05)
    kwargs.setdefault("timeout", 5.0)
    kwargs.setdefault("outage", OutagePolicy(window=10.0, first_delay=0.05, max_delay=0.2))
    return SupabaseStorage(api.url, key, **kwargs)


class PublishingHandler:
    """Payload {"assets": n} (default 1), {"sleep": s}: records the generation, takes s seconds, then
    publishes n small PNGs."""

    concurrent = True

    def __init__(self) -> None:
        self.generations: list[tuple[str, int]] = []

    def load(self) -> None:
        pass

    def run(self, job: Job, ctx: JobContext) -> dict[str, Any]:
        record(job)
        self.generations.append((str(job.id), job.attempts))
        ctx.progress(0.5, "generating")
        deadline = time.monotonic() + float(job.payload.get("sleep", 0))
        while time.monotonic() < deadline:
            ctx.check()
            time.sleep(0.01)
        assets = [ctx.publish(png_bytes(color=(i, job.attempts, 0)), ext="png", content_type="image/png")
                  for i in range(int(job.payload.get("assets", 1)))]
        return {"assets": assets}
