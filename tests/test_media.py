"""Reference images: storage paths in the owner's folder or https URLs, checked and decoded.

URL fetching runs against small HTTP(S) servers on 127.0.0.1 (http.server in a thread): the
https one uses a throw-away self-signed certificate that only the test's httpx transport trusts,
so the real TLS fetch path runs; loopback addresses are allowed only through the limits the
tests pass (`allow_private_hosts=True`), which is itself checked to be refused by default.
Storage paths go through LocalStorage, or a stand-in Storage that fails transiently.
"""

from __future__ import annotations

import datetime as dt
import io
import ipaddress
import ssl
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image, features

from worker.config import Settings
from worker.jobs import ErrorCode, Job, JobError, JobType
from worker.media import (
    ReferenceLimits,
    ReferenceSources,
    decode_image,
    encode_png,
    fetch_reference,
    load_references,
)
from worker.storage import LocalStorage, StorageError, StoredObject

USER = uuid.UUID("11111111-1111-4111-8111-111111111111")
OTHER = uuid.UUID("22222222-2222-4222-8222-222222222222")
LOCAL = ReferenceLimits(allow_private_hosts=True, timeout=5.0)  # what the tests' loopback servers need


def image_bytes(width: int = 128, height: int = 96, fmt: str = "PNG", color: tuple[int, int, int] = (10, 200, 30),
                **save: Any) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format=fmt, **save)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with almost no pixel data: a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def expect(code: ErrorCode, match: str, fn: Callable[[], Any]) -> JobError:
    with pytest.raises(JobError) as caught:
        fn()
    assert caught.value.code == code, caught.value.message
    assert match in caught.value.message, caught.value.message
    return caught.value


# --- storage paths ----------------------------------------------------------------------


def test_png_from_own_storage_folder(storage: LocalStorage) -> None:
    storage.upload("reference_images", f"{USER}/ref.png", image_bytes(color=(1, 2, 3)), "image/png")
    for source in (f"reference_images/{USER}/ref.png", f"{USER}/ref.png", f"/reference_images/{USER}/ref.png"):
        image = fetch_reference(source, user_id=USER, storage=storage)
        assert image.size == (128, 96) and image.mode == "RGB" and image.getpixel((5, 5)) == (1, 2, 3)
    # an earlier generated asset of the same user is a valid reference too
    storage.upload("sdxl_image_fast", f"{USER}/{uuid.uuid4()}/0.png", image_bytes(), "image/png")
    [path] = [p for p in (storage.root / "sdxl_image_fast").rglob("*.png")]
    source = str(path.relative_to(storage.root))
    assert fetch_reference(source, user_id=USER, storage=storage).size == (128, 96)


def test_other_users_folder_is_refused(storage: LocalStorage) -> None:
    storage.upload("reference_images", f"{OTHER}/secret.png", image_bytes(), "image/png")
    for source in (f"reference_images/{OTHER}/secret.png", f"{OTHER}/secret.png",
                   f"reference_images/{USER}/../{OTHER}/secret.png", "reference_images/secret.png",
                   f"reference_images/{str(USER).upper()}/x.png"):
        expect(ErrorCode.INVALID_INPUT, "reference image", lambda s=source: fetch_reference(  # type: ignore[misc]
            s, user_id=USER, storage=storage))
    expect(ErrorCode.INVALID_INPUT, "not in your own storage folder",
           lambda: fetch_reference(f"{OTHER}/secret.png", user_id=USER, storage=storage))
    # a service job (no user) is trusted with any folder
    assert fetch_reference(f"{OTHER}/secret.png", user_id=None, storage=storage).size == (128, 96)


def test_missing_and_oversized_storage_objects(storage: LocalStorage) -> None:
    expect(ErrorCode.INVALID_INPUT, "was not found",
           lambda: fetch_reference(f"{USER}/nope.png", user_id=USER, storage=storage))
    big = image_bytes(512, 512, fmt="PNG", compress_level=0)
    storage.upload("reference_images", f"{USER}/big.png", big, "image/png")
    expect(ErrorCode.INVALID_INPUT, "larger than",
           lambda: fetch_reference(f"{USER}/big.png", user_id=USER, storage=storage,
                                   limits=ReferenceLimits(max_bytes=len(big) - 1)))


def test_transient_storage_failure_is_a_network_error() -> None:
    class Flaky:
        def upload(self, bucket: str, path: str, data: bytes, content_type: str) -> StoredObject:
            raise NotImplementedError

        def download(self, bucket: str, path: str, max_bytes: int | None = None) -> bytes:
            raise StorageError("storage: download failed: HTTP 503", retryable=True, status=503)

    error = expect(ErrorCode.NETWORK_ERROR, "503",
                   lambda: fetch_reference(f"{USER}/x.png", user_id=USER, storage=Flaky()))
    assert error.retryable


@pytest.mark.parametrize("source", ["file:///etc/passwd", "data:image/png;base64,AAAA", "ftp://example.com/x.png",
                                    "javascript:alert(1)", "", "   "])
def test_unsupported_references(storage: LocalStorage, source: str) -> None:
    expect(ErrorCode.INVALID_INPUT, "reference", lambda: fetch_reference(source, user_id=USER, storage=storage))


# --- decoding ---------------------------------------------------------------------------


def test_formats_and_pixel_limits() -> None:
    assert decode_image(image_bytes(fmt="JPEG")).size == (128, 96)
    if features.check("webp"):
        assert decode_image(image_bytes(fmt="WEBP")).size == (128, 96)
    rgba = io.BytesIO()
    Image.new("RGBA", (64, 64), (1, 2, 3, 4)).save(rgba, format="PNG")
    assert decode_image(rgba.getvalue()).mode == "RGB"
    assert decode_image(rgba.getvalue(), mode=None).mode == "RGBA"

    expect(ErrorCode.INVALID_INPUT, "not a PNG, JPEG or WebP", lambda: decode_image(image_bytes(fmt="GIF")))
    expect(ErrorCode.INVALID_INPUT, "not a PNG, JPEG or WebP", lambda: decode_image(b"<html>hello</html>"))
    expect(ErrorCode.INVALID_INPUT, "too many pixels", lambda: decode_image(image_bytes(4100, 64)))
    expect(ErrorCode.INVALID_INPUT, "too small", lambda: decode_image(image_bytes(32, 32)))
    limits = ReferenceLimits(max_side=256)
    expect(ErrorCode.INVALID_INPUT, "too many pixels", lambda: decode_image(image_bytes(300, 100), limits))


def test_decompression_bomb_is_refused_before_decoding() -> None:
    for width, height in [(100_000, 100_000), (5000, 5000), (4097, 64)]:
        started = time.monotonic()
        expect(ErrorCode.INVALID_INPUT, "too many pixels", lambda w=width, h=height: decode_image(  # type: ignore[misc]
            png_header_only(w, h)))
        assert time.monotonic() - started < 5


def test_corrupt_images() -> None:
    good = image_bytes(256, 256, color=(9, 9, 9))
    expect(ErrorCode.INVALID_INPUT, "corrupt or truncated", lambda: decode_image(good[: len(good) // 2]))
    expect(ErrorCode.INVALID_INPUT, "corrupt or truncated", lambda: decode_image(png_header_only(128, 128)))
    jpeg = image_bytes(256, 256, fmt="JPEG")
    expect(ErrorCode.INVALID_INPUT, "image", lambda: decode_image(jpeg[:200]))
    expect(ErrorCode.INVALID_INPUT, "not a PNG", lambda: decode_image(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40))


def test_encode_png_roundtrip() -> None:
    image = Image.new("RGB", (70, 80), (5, 6, 7))
    data = encode_png(image)
    assert data.startswith(b"\x89PNG") and decode_image(data).getpixel((3, 3)) == (5, 6, 7)


# --- URLs -------------------------------------------------------------------------------


@dataclass
class Route:
    status: int = 200
    body: bytes = b""
    content_type: str | None = "image/png"
    headers: dict[str, str] | None = None
    delay: float = 0.0  # before the status line
    drip: float | None = None  # seconds between 1-byte chunks
    stream_forever: bool = False  # no Content-Length; send until the client hangs up


@dataclass
class LocalServer:
    base: str
    routes: dict[str, Route]
    stop: threading.Event
    sent: dict[str, int]
    hung_up: set[str]


def _serve(tls: ssl.SSLContext | None) -> Iterator[LocalServer]:
    routes: dict[str, Route] = {}
    stop = threading.Event()
    sent: dict[str, int] = {}
    hung_up: set[str] = set()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            route = routes.get(self.path)
            if route is None:
                self.send_error(404)
                return
            if route.delay and stop.wait(route.delay):
                return
            try:
                self.send_response(route.status)
                if route.content_type:
                    self.send_header("Content-Type", route.content_type)
                for name, value in (route.headers or {}).items():
                    self.send_header(name, value)
                if not route.stream_forever and route.drip is None:
                    self.send_header("Content-Length", str(len(route.body)))
                self.end_headers()
                if route.stream_forever:
                    chunk = b"\x00" * 65536
                    total = 0
                    while total < 256 * 1024 * 1024 and not stop.is_set():
                        self.wfile.write(chunk)
                        total += len(chunk)
                        sent[self.path] = total
                elif route.drip is not None:
                    for i in range(len(route.body)):
                        if stop.wait(route.drip):
                            return
                        self.wfile.write(route.body[i : i + 1])
                        self.wfile.flush()
                else:
                    self.wfile.write(route.body)
            except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                hung_up.add(self.path)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    if tls:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    scheme = "https" if tls else "http"
    yield LocalServer(f"{scheme}://127.0.0.1:{server.server_address[1]}", routes, stop, sent, hung_up)
    stop.set()
    server.shutdown()
    server.server_close()


@pytest.fixture
def http_server() -> Iterator[LocalServer]:
    yield from _serve(None)


@dataclass
class Tls:
    server: ssl.SSLContext
    client: ssl.SSLContext


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    """A self-signed certificate for 127.0.0.1, trusted only by the client context made here."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ourvidz test")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    client = ssl.create_default_context(cafile=str(folder / "cert.pem"))
    return Tls(server, client)


@pytest.fixture
def https_server(tls: Tls) -> Iterator[LocalServer]:
    yield from _serve(tls.server)


def test_https_url_happy_path(https_server: LocalServer, tls: Tls) -> None:
    https_server.routes["/ref.jpg"] = Route(body=image_bytes(200, 100, fmt="JPEG", color=(250, 0, 0)),
                                            content_type="image/jpeg")
    https_server.routes["/moved"] = Route(status=302, headers={"Location": "/ref.jpg"}, content_type=None)
    transport = httpx.HTTPTransport(verify=tls.client)
    for path in ("/ref.jpg", "/moved"):
        image = fetch_reference(f"{https_server.base}{path}", user_id=USER, storage=None, limits=LOCAL,
                                transport=transport)
        assert image.size == (200, 100) and image.getpixel((50, 50))[0] > 240


def test_loopback_and_plain_http_are_refused_by_default(https_server: LocalServer, http_server: LocalServer,
                                                        tls: Tls) -> None:
    https_server.routes["/ref.png"] = Route(body=image_bytes())
    http_server.routes["/ref.png"] = Route(body=image_bytes())
    transport = httpx.HTTPTransport(verify=tls.client)
    for url in (f"{https_server.base}/ref.png", "https://localhost:1/ref.png", "https://[::1]:1/x.png",
                "https://10.1.2.3/x.png", "https://169.254.169.254/latest/meta-data"):
        expect(ErrorCode.INVALID_INPUT, "is not a public address",
               lambda u=url: fetch_reference(u, user_id=USER, storage=None, transport=transport))  # type: ignore[misc]
    expect(ErrorCode.INVALID_INPUT, "only https",
           lambda: fetch_reference(f"{http_server.base}/ref.png", user_id=USER, storage=None, limits=LOCAL))
    # a redirect is checked hop by hop: https may not lead to plain http
    https_server.routes["/downgrade"] = Route(status=302, headers={"Location": f"{http_server.base}/ref.png"})
    expect(ErrorCode.INVALID_INPUT, "only https",
           lambda: fetch_reference(f"{https_server.base}/downgrade", user_id=USER, storage=None, limits=LOCAL,
                                   transport=transport))
    allowed = ReferenceLimits(allow_private_hosts=True, allow_http=True)
    assert fetch_reference(f"{http_server.base}/ref.png", user_id=USER, storage=None, limits=allowed).size == (
        128, 96)


HTTP_LOCAL = ReferenceLimits(allow_private_hosts=True, allow_http=True, timeout=5.0)


def test_url_wrong_type_status_and_corrupt(http_server: LocalServer) -> None:
    http_server.routes["/page"] = Route(body=b"<html></html>", content_type="text/html; charset=utf-8")
    http_server.routes["/gif"] = Route(body=image_bytes(fmt="GIF"), content_type="application/octet-stream")
    http_server.routes["/broken"] = Route(body=image_bytes(256, 256)[:300])
    http_server.routes["/gone"] = Route(status=404, body=b"no")
    http_server.routes["/busy"] = Route(status=503, body=b"later")

    def fetch(path: str) -> Any:
        return fetch_reference(f"{http_server.base}{path}", user_id=USER, storage=None, limits=HTTP_LOCAL)

    expect(ErrorCode.INVALID_INPUT, "content type 'text/html'", lambda: fetch("/page"))
    expect(ErrorCode.INVALID_INPUT, "not a PNG, JPEG or WebP", lambda: fetch("/gif"))
    expect(ErrorCode.INVALID_INPUT, "corrupt or truncated", lambda: fetch("/broken"))
    expect(ErrorCode.INVALID_INPUT, "HTTP 404", lambda: fetch("/gone"))
    assert expect(ErrorCode.NETWORK_ERROR, "HTTP 503", lambda: fetch("/busy")).retryable


def test_url_oversized_bytes(http_server: LocalServer) -> None:
    limits = ReferenceLimits(allow_private_hosts=True, allow_http=True, max_bytes=100_000, timeout=10.0)
    http_server.routes["/declared"] = Route(body=b"\x00" * 100_001)
    http_server.routes["/endless"] = Route(stream_forever=True)
    expect(ErrorCode.INVALID_INPUT, "more than the 100000 allowed",
           lambda: fetch_reference(f"{http_server.base}/declared", user_id=USER, storage=None, limits=limits))
    expect(ErrorCode.INVALID_INPUT, "larger than the 100000 bytes allowed",
           lambda: fetch_reference(f"{http_server.base}/endless", user_id=USER, storage=None, limits=limits))
    # the limit holds while streaming: the client hung up long before the server's 256 MiB were out
    deadline = time.monotonic() + 10
    while "/endless" not in http_server.hung_up and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "/endless" in http_server.hung_up and http_server.sent["/endless"] < 64 * 1024 * 1024


def test_timeouts_are_network_errors(http_server: LocalServer) -> None:
    limits = ReferenceLimits(allow_private_hosts=True, allow_http=True, timeout=0.5)
    http_server.routes["/slow"] = Route(body=image_bytes(), delay=30)
    http_server.routes["/drip"] = Route(body=image_bytes(), drip=0.2)  # each read is quick, the whole is not

    for path in ("/slow", "/drip"):
        started = time.monotonic()
        error = expect(ErrorCode.NETWORK_ERROR, "timed out",
                       lambda p=path: fetch_reference(f"{http_server.base}{p}", user_id=USER,  # type: ignore[misc]
                                                      storage=None, limits=limits))
        assert error.retryable and time.monotonic() - started < 10
    refused = expect(ErrorCode.NETWORK_ERROR, "fetching failed",
                     lambda: fetch_reference("http://127.0.0.1:9/x.png", user_id=USER, storage=None, limits=limits))
    assert refused.retryable


# --- the references of a job ------------------------------------------------------------


def _job(payload: dict[str, Any], user_id: uuid.UUID | None = USER, defaults: dict[str, Any] | None = None) -> Job:
    now = dt.datetime.now(dt.UTC)
    return Job(id=uuid.uuid4(), user_id=user_id, job_type="video_fast", queue="wan", payload=payload, priority=0,
               attempts=1, max_attempts=3, created_at=now, run_at=now,
               type_info=JobType(name="video_fast", queue="wan", handler="wan", bucket="video_fast",
                                 defaults=defaults or {"frame_num": 83}))


def test_reference_sources_follow_seed_002() -> None:
    assert ReferenceSources.of(_job({})).mode == "none"
    single = ReferenceSources.of(_job({"metadata": {"reference_image_url": "a"}}))
    assert (single.mode, single.single) == ("single", "a")
    assert ReferenceSources.of(_job({"config": {"image": "b"}, "metadata": {"reference_image_url": "a"}})).single == "b"
    assert ReferenceSources.of(_job({"reference_image_url": "top"})).single == "top"
    start = ReferenceSources.of(_job({"metadata": {"start_reference_url": "s"}}))
    assert (start.mode, start.start) == ("start", "s")
    end = ReferenceSources.of(_job({"config": {"last_frame": "e"}}))
    assert (end.mode, end.end) == ("end", "e")
    both = ReferenceSources.of(_job({"config": {"first_frame": "s", "image": "x"},
                                     "metadata": {"end_reference_url": "e"}}))
    assert (both.mode, both.start, both.end) == ("both", "s", "e")
    assert ReferenceSources.of(_job({"config": {"image": "  "}})).mode == "none"


def test_load_references_for_a_job(storage: LocalStorage) -> None:
    storage.upload("reference_images", f"{USER}/start.png", image_bytes(color=(1, 0, 0)), "image/png")
    storage.upload("reference_images", f"{USER}/end.png", image_bytes(color=(0, 0, 255)), "image/png")
    job = _job({"config": {"first_frame": f"reference_images/{USER}/start.png", "last_frame": f"{USER}/end.png"}})
    refs = load_references(job, storage)
    assert refs.mode == "both" and refs.single is None
    assert refs.start is not None and refs.start.getpixel((0, 0)) == (1, 0, 0)
    assert refs.end is not None and refs.end.getpixel((0, 0)) == (0, 0, 255)
    stolen = _job({"metadata": {"reference_image_url": f"{OTHER}/start.png"}})
    expect(ErrorCode.INVALID_INPUT, "not in your own storage folder", lambda: load_references(stolen, storage))
    assert load_references(_job({}), storage).mode == "none"


def test_limits_from_settings(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, reference_max_bytes=2048, reference_max_side=512, reference_min_side=8,
                        reference_timeout=3.0, reference_bucket="refs", reference_allow_http=True)
    limits = ReferenceLimits.from_settings(settings)
    assert (limits.max_bytes, limits.max_side, limits.min_side, limits.timeout, limits.bucket) == (
        2048, 512, 8, 3.0, "refs")
    assert limits.allow_http and not limits.allow_private_hosts
