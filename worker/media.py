"""Bytes in and out of handlers: reference images fetched and checked; PNG (with text metadata),
thumbnail and MP4 (H.264, yuv420p) encoding.

A reference image (seed 002: `config.image` / `metadata.reference_image_url`, `config.first_frame` /
`metadata.start_reference_url`, `config.last_frame` / `metadata.end_reference_url`) is either

- a storage path in the job owner's own folder: `<bucket>/<user_id>/...`, or `<user_id>/...` in
  the reference bucket — read through the worker's Storage backend; another user's folder is
  refused (a job without a user is a service job and may read any path), or
- an `https://` URL, fetched with a timeout and a byte limit enforced while streaming; http:// and
  loopback/private addresses are refused unless explicitly allowed (tests, local development).

It must be a PNG, JPEG or WebP within the pixel limits; the size is checked from the header
before any pixel is decoded, so a decompression bomb costs nothing. Any problem fails the job
with INVALID_INPUT and a message a frontend can show, except transient network trouble
(timeouts, connection errors, HTTP 5xx/429), which is NETWORK_ERROR and retried, and a storage key
that is refused (`WorkerFault`: Supabase answers a refused key's download with 404, so a missing
object is confirmed with `Storage.check()` before the user is blamed).
"""

from __future__ import annotations

import io
import ipaddress
import os
import socket
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Any, Literal
from uuid import UUID

import httpx
from PIL import Image, ImageOps, UnidentifiedImageError

from worker.faults import disk_fault, disk_full
from worker.jobs import ErrorCode, Job, JobError
from worker.storage import ObjectNotFound, ObjectTooLarge, Storage, StorageError

if TYPE_CHECKING:
    from worker.config import Settings

FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
# What a server may call an image it serves; generic types are settled by decoding.
ACCEPTED_CONTENT_TYPES = frozenset(
    {"image/png", "image/jpeg", "image/jpg", "image/pjpeg", "image/webp",
     "application/octet-stream", "binary/octet-stream"}
)
USER_AGENT = "ourvidz-worker (reference image fetch)"

ReferenceMode = Literal["none", "single", "start", "end", "both"]


@dataclass(frozen=True)
class ReferenceLimits:
    max_bytes: int = 10 * 1024 * 1024
    max_side: int = 4096
    min_side: int = 64
    timeout: float = 15.0
    max_redirects: int = 3
    bucket: str = "reference_images"
    allow_http: bool = False
    allow_private_hosts: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> ReferenceLimits:
        return cls(
            max_bytes=settings.reference_max_bytes,
            max_side=settings.reference_max_side,
            min_side=settings.reference_min_side,
            timeout=settings.reference_timeout,
            bucket=settings.reference_bucket,
            allow_http=settings.reference_allow_http,
            allow_private_hosts=settings.reference_allow_private_hosts,
        )


def _invalid(message: str) -> JobError:
    return JobError(ErrorCode.INVALID_INPUT, message)


def _network(message: str) -> JobError:
    return JobError(ErrorCode.NETWORK_ERROR, message)


# --- fetching ---------------------------------------------------------------------------


def fetch_reference(
    source: str,
    *,
    user_id: UUID | str | None,
    storage: Storage | None,
    limits: ReferenceLimits | None = None,
    label: str = "reference image",
    mode: str | None = "RGB",
    transport: httpx.BaseTransport | None = None,
) -> Image.Image:
    """Fetch, check and decode one reference image; JobError(INVALID_INPUT | NETWORK_ERROR) on failure."""
    limits = limits or ReferenceLimits()
    data = fetch_reference_bytes(source, user_id=user_id, storage=storage, limits=limits, label=label,
                                 transport=transport)
    return decode_image(data, limits, label=label, mode=mode)


def fetch_reference_bytes(
    source: str,
    *,
    user_id: UUID | str | None,
    storage: Storage | None,
    limits: ReferenceLimits,
    label: str = "reference image",
    transport: httpx.BaseTransport | None = None,
) -> bytes:
    if not isinstance(source, str) or not source.strip():
        raise _invalid(f"{label}: empty reference")
    source = source.strip()
    scheme, sep, _ = source.partition("://")
    if sep:
        scheme = scheme.lower()
        if scheme == "https" or (scheme == "http" and limits.allow_http):
            return _fetch_url(source, limits, label, transport)
        raise _invalid(f"{label}: only https:// URLs or storage paths are accepted, not {scheme}://")
    if ":" in source.split("/", 1)[0]:  # data:, file:, javascript: and the like
        raise _invalid(f"{label}: unsupported reference {source[:40]!r}")
    bucket, path = storage_location(source, user_id, limits.bucket, label)
    if storage is None:
        raise _invalid(f"{label}: storage paths cannot be read by this worker")
    try:
        return storage.download(bucket, path, max_bytes=limits.max_bytes)
    except ObjectNotFound:
        _confirm_storage_key(storage, label)
        raise _invalid(f"{label}: {bucket}/{path} was not found") from None
    except ObjectTooLarge:
        raise _invalid(f"{label}: {bucket}/{path} is larger than {limits.max_bytes} bytes") from None
    except StorageError as err:
        if err.retryable:
            raise _network(f"{label}: reading {bucket}/{path} failed: {err}") from err
        raise JobError(ErrorCode.STORAGE_ERROR, f"{label}: reading {bucket}/{path} failed: {err}",
                       retryable=False) from err


def _confirm_storage_key(storage: Storage, label: str) -> None:
    """Supabase Storage answers a refused key's download with 404, as for a missing object: before
    the user is blamed, one authenticated call tells them apart. WorkerFault when the key is refused."""
    check = getattr(storage, "check", None)
    if not callable(check):
        return
    try:
        check()
    except StorageError as err:
        raise _network(f"{label}: storage could not confirm the reference is missing: {err}") from err


def storage_location(source: str, user_id: UUID | str | None, default_bucket: str,
                     label: str = "reference image") -> tuple[str, str]:
    """(bucket, path) of a storage reference, refusing anything outside the owner's folder."""
    ref = source.lstrip("/")
    parts = ref.split("/")
    if "\\" in ref or "\x00" in ref or len(parts) < 2 or any(p in ("", ".", "..") for p in parts):
        raise _invalid(f"{label}: {source[:200]!r} is not a valid storage path")
    if _is_uuid(parts[0]):
        bucket, key = default_bucket, parts
    else:
        bucket, key = parts[0], parts[1:]
    if len(key) < 2:
        raise _invalid(f"{label}: {source[:200]!r} is not in a user folder (<bucket>/<user_id>/<file>)")
    if user_id is not None and key[0] != str(user_id):
        raise _invalid(f"{label}: {source[:200]!r} is not in your own storage folder")
    return bucket, "/".join(key)


def _is_uuid(text: str) -> bool:
    try:
        return str(UUID(text)) == text
    except ValueError:
        return False


def _check_host(url: httpx.URL, limits: ReferenceLimits, label: str) -> None:
    if url.scheme not in ("https", "http") or (url.scheme == "http" and not limits.allow_http):
        raise _invalid(f"{label}: only https:// URLs are accepted")
    host = url.host
    if not host:
        raise _invalid(f"{label}: the URL has no host")
    if limits.allow_private_hosts:
        return
    try:
        infos = socket.getaddrinfo(host, url.port or (443 if url.scheme == "https" else 80),
                                   type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        if err.errno in (socket.EAI_AGAIN, getattr(socket, "EAI_SYSTEM", None)):
            raise _network(f"{label}: could not resolve {host}: {err}") from err
        raise _invalid(f"{label}: unknown host {host}") from err
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        if not address.is_global or address.is_multicast:
            # Only public addresses: a URL must not make the worker reach its own network.
            raise _invalid(f"{label}: {host} is not a public address")


def _fetch_url(url: str, limits: ReferenceLimits, label: str, transport: httpx.BaseTransport | None) -> bytes:
    deadline = time.monotonic() + limits.timeout
    try:
        target = httpx.URL(url)
    except (httpx.InvalidURL, ValueError) as err:
        raise _invalid(f"{label}: invalid URL: {err}") from None
    headers = {"User-Agent": USER_AGENT, "Accept": ", ".join(FORMATS.values())}
    try:
        with httpx.Client(timeout=httpx.Timeout(limits.timeout), follow_redirects=False, transport=transport,
                          headers=headers, trust_env=False) as client:
            for _ in range(limits.max_redirects + 1):
                # Every hop is checked: a public URL must not redirect into the worker's network.
                _check_host(target, limits, label)
                with client.stream("GET", target) as response:
                    if response.is_redirect and "location" in response.headers:
                        target = target.join(response.headers["location"])
                        continue
                    return _read_body(response, limits, label, deadline)
            raise _invalid(f"{label}: more than {limits.max_redirects} redirects")
    except httpx.TimeoutException as err:
        raise _network(f"{label}: timed out after {limits.timeout:g}s ({type(err).__name__})") from err
    except httpx.TransportError as err:
        raise _network(f"{label}: fetching failed: {type(err).__name__}: {err}") from err
    except httpx.InvalidURL as err:
        raise _invalid(f"{label}: invalid URL: {err}") from err


def _read_body(response: httpx.Response, limits: ReferenceLimits, label: str, deadline: float) -> bytes:
    status = response.status_code
    if status >= 500 or status in (408, 429):
        raise _network(f"{label}: the server answered HTTP {status}")
    if status != 200:
        raise _invalid(f"{label}: the server answered HTTP {status}")
    content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type and content_type not in ACCEPTED_CONTENT_TYPES:
        raise _invalid(f"{label}: content type {content_type!r} is not a PNG, JPEG or WebP image")
    length = response.headers.get("content-length")
    if length and length.isdigit() and int(length) > limits.max_bytes:
        raise _invalid(f"{label}: {int(length)} bytes is more than the {limits.max_bytes} allowed")
    body = bytearray()
    for chunk in response.iter_bytes():
        body += chunk
        if len(body) > limits.max_bytes:
            raise _invalid(f"{label}: larger than the {limits.max_bytes} bytes allowed")
        if time.monotonic() > deadline:
            raise _network(f"{label}: timed out after {limits.timeout:g}s while downloading")
    return bytes(body)


# --- decoding ---------------------------------------------------------------------------


def decode_image(data: bytes, limits: ReferenceLimits | None = None, *, label: str = "reference image",
                 mode: str | None = "RGB") -> Image.Image:
    """Decode PNG/JPEG/WebP bytes within the size limits, upright (EXIF), converted to `mode`."""
    limits = limits or ReferenceLimits()
    if len(data) > limits.max_bytes:
        raise _invalid(f"{label}: larger than the {limits.max_bytes} bytes allowed")
    try:
        image = Image.open(io.BytesIO(data), formats=list(FORMATS))
    except Image.DecompressionBombError:
        raise _invalid(f"{label}: too many pixels") from None
    except UnidentifiedImageError:
        raise _invalid(f"{label}: not a PNG, JPEG or WebP image") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise _invalid(f"{label}: unreadable image ({err})") from None
    width, height = image.size
    if width > limits.max_side or height > limits.max_side:
        raise _invalid(f"{label}: {width}x{height} is too many pixels (at most "
                       f"{limits.max_side}x{limits.max_side})")
    if width < limits.min_side or height < limits.min_side:
        raise _invalid(f"{label}: {width}x{height} is too small (at least {limits.min_side}x{limits.min_side})")
    try:
        image.load()
        image = ImageOps.exif_transpose(image) or image
        if mode and image.mode != mode:
            image = image.convert(mode)
    except Image.DecompressionBombError:
        raise _invalid(f"{label}: too many pixels") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as err:
        raise _invalid(f"{label}: corrupt or truncated image ({err})") from None
    return image


# --- the references of a job ------------------------------------------------------------


@dataclass(frozen=True)
class ReferenceSources:
    """Where a job's reference frames come from, with the seed's fallbacks applied."""

    single: str | None = None
    start: str | None = None
    end: str | None = None

    @property
    def mode(self) -> ReferenceMode:
        if self.start and self.end:
            return "both"
        if self.start:
            return "start"
        if self.end:
            return "end"
        return "single" if self.single else "none"

    @classmethod
    def of(cls, job: Job) -> ReferenceSources:
        config: Mapping[str, Any] = job.config
        metadata = job.payload.get("metadata")
        meta: Mapping[str, Any] = metadata if isinstance(metadata, dict) else {}

        def pick(*values: Any) -> str | None:
            return next((v.strip() for v in values if isinstance(v, str) and v.strip()), None)

        return cls(
            single=pick(config.get("image"), meta.get("reference_image_url"), job.payload.get("reference_image_url")),
            start=pick(config.get("first_frame"), meta.get("start_reference_url")),
            end=pick(config.get("last_frame"), meta.get("end_reference_url")),
        )


@dataclass(frozen=True)
class References:
    mode: ReferenceMode
    single: Image.Image | None = None
    start: Image.Image | None = None
    end: Image.Image | None = None


def load_references(job: Job, storage: Storage | None, limits: ReferenceLimits | None = None,
                    transport: httpx.BaseTransport | None = None) -> References:
    """Fetch the images the job's mode uses (a single reference is ignored when start/end are set)."""
    sources = ReferenceSources.of(job)
    mode = sources.mode

    def get(source: str | None, label: str) -> Image.Image | None:
        if source is None:
            return None
        return fetch_reference(source, user_id=job.user_id, storage=storage, limits=limits, label=label,
                               transport=transport)

    if mode == "single":
        return References(mode, single=get(sources.single, "reference image"))
    return References(mode, start=get(sources.start, "first frame"), end=get(sources.end, "last frame"))


# --- encoding ---------------------------------------------------------------------------


def encode_png(image: Image.Image, *, compress_level: int = 6, text: Mapping[str, Any] | None = None) -> bytes:
    """PNG bytes; `text` becomes tEXt/iTXt chunks (prompt, seed, steps...) that image tools show."""
    from PIL.PngImagePlugin import PngInfo

    info = None
    if text:
        info = PngInfo()
        for key, value in text.items():
            if value is not None:
                info.add_itxt(str(key), str(value))  # iTXt: UTF-8, so any prompt survives
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=compress_level, pnginfo=info)
    return buffer.getvalue()


def png_text(data: bytes) -> dict[str, str]:
    """The text chunks of a PNG (what encode_png wrote in `text`)."""
    with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
        image.load()
        return {str(k): str(v) for k, v in getattr(image, "text", {}).items()}


def fit_image(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scale and center-crop to exactly width x height, keeping the aspect ratio (no stretching)."""
    if image.size == (width, height):
        return image
    return ImageOps.fit(image, (width, height), method=Image.Resampling.LANCZOS)


def thumbnail_png(image: Image.Image, max_side: int = 512) -> bytes:
    """A PNG no larger than max_side on its longer side (video buckets accept video/mp4 and image/png)."""
    thumb = image.copy()
    thumb.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return encode_png(thumb, compress_level=1)


@dataclass(frozen=True)
class VideoInfo:
    frames: int
    width: int
    height: int
    fps: float
    codec: str
    pix_fmt: str

    @property
    def duration(self) -> float:
        return self.frames / self.fps if self.fps else 0.0


def encode_mp4(frames: Sequence[Image.Image] | Any, fps: float, *, crf: int = 18, preset: str = "veryfast",
               scratch_dir: str | os.PathLike[str] | None = None) -> bytes:
    """H.264 (libx264) in MP4, yuv420p, moov atom first: plays in every browser, starts while loading.

    `frames` are RGB PIL images or an array (frames, height, width, 3) of uint8; width and height
    must be even (4:2:0 chroma). PyAV's wheels carry FFmpeg with libx264, so nothing else is needed.
    The file is written in `scratch_dir` (a temp dir by default): moving the moov atom to the front
    is a second pass over a named file, which an in-memory buffer cannot give. x264's `veryfast`
    encodes 81 frames of 480x832 about 3x faster than `medium` at the same quality (crf), for files
    a little larger: the encoding is worker overhead on every video job.
    """
    import av
    import numpy as np

    arrays = [np.asarray(f.convert("RGB") if isinstance(f, Image.Image) else f, dtype=np.uint8) for f in frames]
    if not arrays:
        raise ValueError("no frames to encode")
    height, width = arrays[0].shape[:2]
    if width % 2 or height % 2:
        raise ValueError(f"H.264 4:2:0 needs even sizes, not {width}x{height}")
    rate = Fraction(fps).limit_denominator(1001)
    try:
        with tempfile.TemporaryDirectory(dir=scratch_dir) as folder:
            path = os.path.join(folder, "video.mp4")
            with av.open(path, mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
                stream = container.add_stream("libx264", rate=rate)
                stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
                stream.options = {"crf": str(crf), "preset": preset}
                for array in arrays:
                    container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
                container.mux(stream.encode(None))  # flush the encoder's delayed frames
            with open(path, "rb") as file:
                return file.read()
    except OSError as err:
        if (full := disk_full(err)) is not None:
            raise disk_fault(full, "encoding the video") from err
        raise


def probe_mp4(data: bytes) -> VideoInfo:
    """Decode an MP4 fully and report what a player would see (frames counted by decoding)."""
    import av

    with av.open(io.BytesIO(data), mode="r") as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        ctx = stream.codec_context
        return VideoInfo(frames=frames, width=ctx.width, height=ctx.height, fps=float(stream.average_rate or 0),
                         codec=ctx.name, pix_fmt=str(ctx.pix_fmt))
