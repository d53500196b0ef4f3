"""Where asset bytes go: `LocalStorage` (the embedded default) or `SupabaseStorage`.

Objects live at `{bucket}/{user_id}/{job_id}/{index}.{ext}` (the path is chosen by
`JobContext.publish`); an upload replaces what is there, so a retried job overwrites its earlier
assets instead of adding copies. The row never holds a half-published result because it is
written only after the handler returns.

Who is at fault when storage fails:
- an outage (network errors, timeouts, HTTP 5xx/429/408): `StorageError(retryable=True)`. A job whose
  outputs exist rides it out: `ride_out` retries only the upload, with backoff, for the backend's
  `outage.window` seconds (OURVIDZ_STORAGE_RETRY_WINDOW) while the job keeps its lease; past it the
  job is retried and what its attempt uploaded is removed (`JobContext.discard_assets`);
- credentials refused (HTTP 401/403, a JWT or signature error), or local storage that cannot be
  written (permissions, a full disk): `WorkerFault`, the worker's own fault, never the job's;
- anything else (a path, MIME type or size the bucket refuses): `StorageError(retryable=False)`.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from tenacity import (
    RetryCallState,
    RetryError,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
    wait_random,
    wait_random_exponential,
)

from worker.faults import DISK_FULL, disk_fault
from worker.jobs import ErrorCode, WorkerFault

if TYPE_CHECKING:
    import httpx

    from worker.config import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")


class StorageError(Exception):
    """Publishing or reading failed. `retryable` says whether trying again later may help."""

    def __init__(self, message: str, *, retryable: bool = True, status: int | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.status = status


class ObjectNotFound(StorageError):
    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=False, status=404)


class ObjectTooLarge(StorageError):
    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=False, status=413)


@dataclass(frozen=True)
class StoredObject:
    bucket: str
    path: str
    url: str
    content_type: str
    size: int
    url_expires_at: str | None = None  # set for signed URLs: re-sign `path` after this

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class OutagePolicy:
    """How long a job with finished outputs keeps retrying their upload, and how it paces the tries."""

    window: float = 300.0
    first_delay: float = 1.0
    max_delay: float = 10.0


class Storage(Protocol):
    def upload(self, bucket: str, path: str, data: bytes, content_type: str) -> StoredObject:
        """Store `data` at bucket/path, replacing what is there (a retried job overwrites)."""
        ...

    def download(self, bucket: str, path: str, max_bytes: int | None = None) -> bytes:
        """The object's bytes; ObjectNotFound if absent, ObjectTooLarge beyond max_bytes."""
        ...

    def remove(self, bucket: str, paths: list[str]) -> None:
        """Delete these objects of one bucket; absent ones are no error."""
        ...

    def check(self) -> None:
        """Return if the credentials are accepted and storage answers; WorkerFault when they are
        refused (or it cannot be written), StorageError when it cannot be reached."""
        ...


def outage_policy(storage: Any) -> OutagePolicy:
    """The backend's policy; a Storage without one (a test double) gets the defaults."""
    policy = getattr(storage, "outage", None)
    return policy if isinstance(policy, OutagePolicy) else OutagePolicy()


def ride_out(fn: Callable[[], T], policy: OutagePolicy, *, check: Callable[[], None],
             on_wait: Callable[[BaseException], None] | None = None, what: str = "storage") -> T:
    """`fn()` again while it fails with a transient StorageError, until `policy.window` seconds have
    passed (the last pause may end up to `max_delay` later).

    Between tries `check()` runs every quarter second, so a cancel or a lost lease still stops the
    job; `on_wait(error)` runs before each pause. Past the window the last StorageError is raised,
    retryable, saying how long storage was unavailable.
    """
    started = time.monotonic()

    def pause(seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            check()
            time.sleep(min(left, 0.25))
        check()

    def before_sleep(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        log.warning("%s: %s (try %d); trying again for up to %.0fs more", what, error, state.attempt_number,
                    max(0.0, policy.window - (time.monotonic() - started)))
        if on_wait is not None and error is not None:
            on_wait(error)

    retrying = Retrying(
        stop=stop_after_delay(policy.window),
        wait=wait_exponential(multiplier=policy.first_delay, max=policy.max_delay) + wait_random(0, policy.first_delay),
        retry=retry_if_exception(lambda err: isinstance(err, StorageError) and err.retryable),
        sleep=pause,
        before_sleep=before_sleep,
    )
    try:
        return retrying(fn)
    except RetryError as gave_up:
        last = gave_up.last_attempt.exception()
        assert isinstance(last, StorageError)
        raise StorageError(f"{last} (still failing after {time.monotonic() - started:.0f}s of retries, the "
                           f"storage retry window is {policy.window:g}s)", retryable=True, status=last.status) from last


def check_object_path(bucket: str, path: str) -> None:
    """Refuse names that could leave the bucket or the owner's folder."""
    if not bucket or "/" in bucket or bucket in (".", ".."):
        raise StorageError(f"invalid bucket name {bucket!r}", retryable=False)
    parts = path.split("/")
    if "\\" in path or "\x00" in path or any(p in ("", ".", "..") for p in parts):
        raise StorageError(f"invalid object path {path!r}", retryable=False)


class LocalStorage:
    """Files under a folder: {root}/{bucket}/{path}, written atomically."""

    def __init__(self, root: Path, *, outage: OutagePolicy | None = None) -> None:
        self.root = root
        self.outage = outage or OutagePolicy()

    def _target(self, bucket: str, path: str) -> Path:
        check_object_path(bucket, path)
        target = (self.root / bucket / path).resolve()
        if self.root.resolve() not in target.parents:
            raise StorageError(f"refusing to use a path outside {self.root}: {bucket}/{path}", retryable=False)
        return target

    def upload(self, bucket: str, path: str, data: bytes, content_type: str) -> StoredObject:
        target = self._target(bucket, path)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".upload-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, target)
        except OSError as err:
            raise _local_failure(err, f"writing {bucket}/{path} to local storage") from err
        return StoredObject(bucket, path, target.as_uri(), content_type, len(data))

    def download(self, bucket: str, path: str, max_bytes: int | None = None) -> bytes:
        target = self._target(bucket, path)
        try:
            with target.open("rb") as f:
                data = f.read() if max_bytes is None else f.read(max_bytes + 1)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(f"{bucket}/{path} does not exist") from None
        except OSError as err:
            raise StorageError(f"local storage read failed: {err}") from err
        if max_bytes is not None and len(data) > max_bytes:
            raise ObjectTooLarge(f"{bucket}/{path} is larger than {max_bytes} bytes")
        return data

    def remove(self, bucket: str, paths: list[str]) -> None:
        bucket_dir = (self.root / bucket).resolve()
        for path in paths:
            target = self._target(bucket, path)
            try:
                target.unlink(missing_ok=True)
                folder = target.parent
                while folder != bucket_dir and bucket_dir in folder.parents and not any(folder.iterdir()):
                    folder.rmdir()  # the job's folder goes with its last asset
                    folder = folder.parent
            except OSError as err:
                raise _local_failure(err, f"removing {bucket}/{path} from local storage") from err

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.root, prefix=".check-") as probe:
                probe.write(b"ok")
                probe.flush()
                os.fsync(probe.fileno())
        except OSError as err:
            raise _local_failure(err, f"writing to local storage in {self.root}") from err


_NOT_WRITABLE = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})


def _local_failure(err: OSError, what: str) -> WorkerFault | StorageError:
    if err.errno in DISK_FULL:
        return disk_fault(err, what)
    if err.errno in _NOT_WRITABLE:
        return WorkerFault(ErrorCode.STORAGE_ERROR, f"local storage cannot be written ({what}): {err.strerror}",
                           scope="storage")
    return StorageError(f"local storage: {what} failed: {err}")


class SupabaseStorage:
    """Supabase Storage through the official client (supabase-py → storage3).

    Uploads are upserts (`x-upsert: true`) with the asset's content type. The URL put in the
    result is a signed URL valid `signed_url_seconds` for a private bucket, or the public URL for
    a public one. Which buckets are public: `public_buckets` when given (OURVIDZ_STORAGE_PUBLIC_BUCKETS),
    otherwise each bucket's own `public` flag, read once from the Storage API on first use.

    Transient failures (network errors, timeouts, HTTP 5xx/429/408) are retried in-process with
    exponential backoff and jitter, `attempts` tries in all; then, or at once for a permanent
    failure (unknown bucket, MIME type or size refused), StorageError is raised. A key Storage
    refuses (HTTP 401/403, a JWT/signature error) raises WorkerFault(scope="storage") at once.
    `outage` is how long a job's finished outputs wait out an outage (`ride_out`).
    """

    def __init__(
        self,
        url: str,
        key: str,
        *,
        signed_url_seconds: int = 7 * 24 * 3600,
        public_buckets: Iterable[str] | None = None,
        timeout: float = 30.0,
        attempts: int = 4,
        backoff_initial: float = 0.5,
        backoff_max: float = 8.0,
        cache_control_seconds: int = 3600,
        http_client: httpx.Client | None = None,
        outage: OutagePolicy | None = None,
    ) -> None:
        import httpx
        from supabase import ClientOptions, create_client

        self._http = http_client or httpx.Client(timeout=httpx.Timeout(timeout), follow_redirects=True)
        client = create_client(
            url, key,
            options=ClientOptions(httpx_client=self._http, auto_refresh_token=False, persist_session=False),
        )
        self._storage = client.storage
        self.signed_url_seconds = signed_url_seconds
        self.public_buckets = frozenset(public_buckets) if public_buckets is not None else None
        self._public: dict[str, bool] = {}
        self._public_lock = threading.Lock()
        self._attempts = attempts
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._cache_control = str(cache_control_seconds)
        self.url = url.rstrip("/")
        self.outage = outage or OutagePolicy()

    @classmethod
    def from_settings(cls, settings: Settings) -> SupabaseStorage:
        if not settings.supabase_url or settings.supabase_service_role_key is None:
            raise ValueError("storage_backend=supabase needs SUPABASE_URL and SUPABASE_SERVICE_ROLE_KEY")
        return cls(
            settings.supabase_url,
            settings.supabase_service_role_key.get_secret_value(),
            signed_url_seconds=settings.signed_url_seconds,
            public_buckets=settings.storage_public_buckets,
            timeout=settings.storage_timeout,
            attempts=settings.storage_attempts,
            outage=outage_policy_of(settings),
        )

    def close(self) -> None:
        self._http.close()

    # -- Storage --------------------------------------------------------------------------

    def upload(self, bucket: str, path: str, data: bytes, content_type: str) -> StoredObject:
        check_object_path(bucket, path)
        options: Any = {"content-type": content_type, "upsert": "true", "cache-control": self._cache_control}
        self._retrying(f"upload {bucket}/{path}",
                       lambda: self._storage.from_(bucket).upload(path, data, options))
        # Upload and URL are retried separately so a failed signing does not upload again; the
        # object is overwritten by the job's retry anyway if signing never succeeds.
        url, expires = self._retrying(f"URL for {bucket}/{path}", lambda: self._url(bucket, path))
        return StoredObject(bucket, path, url, content_type, len(data), expires)

    def download(self, bucket: str, path: str, max_bytes: int | None = None) -> bytes:
        check_object_path(bucket, path)
        # Whole-body download: the bucket's file_size_limit bounds what can be there.
        data = self._retrying(f"download {bucket}/{path}", lambda: self._storage.from_(bucket).download(path))
        if max_bytes is not None and len(data) > max_bytes:
            raise ObjectTooLarge(f"{bucket}/{path} is larger than {max_bytes} bytes")
        return data

    def remove(self, bucket: str, paths: list[str]) -> None:
        for path in paths:
            check_object_path(bucket, path)
        if paths:
            # Storage answers the objects it deleted; absent ones are simply not listed
            self._retrying(f"remove {len(paths)} object(s) from {bucket}",
                           lambda: self._storage.from_(bucket).remove(paths))

    def check(self) -> None:
        """Lists the buckets: the cheapest call that needs the key. The service role sees every
        bucket; none at all means a key Storage treats as anonymous (the anon key, or a key of
        another project on a self-hosted server) or a project without our buckets migration."""
        buckets = self._retrying("list buckets", self._storage.list_buckets)
        if not buckets:
            raise WorkerFault(ErrorCode.STORAGE_ERROR,
                              f"Supabase Storage at {self.url} shows this key no bucket: it is not the project's "
                              "service role key, or the buckets migration was not applied", scope="storage")

    def is_public(self, bucket: str) -> bool:
        if self.public_buckets is not None:
            return bucket in self.public_buckets
        with self._public_lock:
            if bucket not in self._public:
                self._public[bucket] = bool(self._storage.get_bucket(bucket).public)
            return self._public[bucket]

    # -- internals ------------------------------------------------------------------------

    def _url(self, bucket: str, path: str) -> tuple[str, str | None]:
        api = self._storage.from_(bucket)
        if self.is_public(bucket):
            return api.get_public_url(path), None
        expires = datetime.now(UTC) + timedelta(seconds=self.signed_url_seconds)
        signed = api.create_signed_url(path, self.signed_url_seconds)["signedURL"]
        if not signed:
            raise StorageError(f"Storage returned no signed URL for {bucket}/{path}")
        return signed, expires.isoformat(timespec="seconds")

    def _retrying(self, what: str, fn: Callable[[], T]) -> T:
        """`fn` with in-process retries of transient failures; failures as StorageError or WorkerFault."""
        retrying = Retrying(
            stop=stop_after_attempt(self._attempts),
            wait=wait_random_exponential(multiplier=self._backoff_initial, max=self._backoff_max),
            retry=retry_if_exception(_transient),
            before_sleep=lambda state: log.warning(
                "storage: %s failed (attempt %d): %s; retrying", what, state.attempt_number,
                state.outcome.exception() if state.outcome else "?"),
            reraise=True,
        )
        try:
            return retrying(fn)
        except (StorageError, WorkerFault):
            raise
        except Exception as err:
            raise _storage_error(what, err, self.url) from err


def _status(err: BaseException) -> int | None:
    """The HTTP status of a storage3 error; Storage puts the real one in the body's statusCode."""
    from storage3.exceptions import StorageApiError

    if not isinstance(err, StorageApiError):
        return None
    try:
        return int(str(err.status))
    except ValueError:
        return None


def _transient(err: BaseException) -> bool:
    import httpx

    if isinstance(err, httpx.TransportError):
        return True
    status = _status(err)
    return status is not None and (status >= 500 or status in (408, 429))


# How Storage and the API gateway in front of it say a key is refused: "invalid signature",
# "jwt malformed", "jwt expired", "Invalid Compact JWS", "Invalid API key", "Unauthorized".
_REFUSED = re.compile(r"\bjwt\b|\bjws|signature|api key|unauthori[sz]ed|invalid (?:token|key)", re.IGNORECASE)


def _refused(err: BaseException, status: int | None) -> bool:
    from storage3.exceptions import StorageApiError

    if status in (401, 403):
        return True
    return isinstance(err, StorageApiError) and bool(_REFUSED.search(f"{err.code} {err.message}"))


def _storage_error(what: str, err: Exception, url: str = "") -> StorageError | WorkerFault:
    from storage3.exceptions import StorageApiError

    status = _status(err)
    detail = err.message if isinstance(err, StorageApiError) else f"{type(err).__name__}: {err}"
    code = f" {err.code}" if isinstance(err, StorageApiError) else ""
    if _refused(err, status):
        where = f" at {url}" if url else ""
        return WorkerFault(ErrorCode.STORAGE_ERROR,
                           f"Supabase Storage{where} refused the service key ({detail}, HTTP {status}{code}): "
                           "check SUPABASE_SERVICE_ROLE_KEY", scope="storage")
    message = f"storage: {what} failed: {detail}" + (f" (HTTP {status}{code})" if status else "")
    if status == 404 or (isinstance(err, StorageApiError) and err.code in ("not_found", "NoSuchKey")):
        return ObjectNotFound(message)
    if status == 413:
        return ObjectTooLarge(message)
    if isinstance(err, ValueError) and not isinstance(err, StorageApiError):
        return StorageError(message, retryable=False)
    return StorageError(message, retryable=_transient(err), status=status)


def outage_policy_of(settings: Settings) -> OutagePolicy:
    return OutagePolicy(window=settings.storage_retry_window, max_delay=settings.storage_retry_max_delay)


def make_storage(settings: Settings) -> Storage:
    """The backend chosen by OURVIDZ_STORAGE_BACKEND."""
    if settings.storage_backend == "supabase":
        return SupabaseStorage.from_settings(settings)
    return LocalStorage(settings.storage_dir, outage=outage_policy_of(settings))
