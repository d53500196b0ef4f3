"""Where asset bytes go. `LocalStorage` is the embedded default; Supabase Storage plugs in here."""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol


class StorageError(Exception):
    """Publishing failed; the job is retried (no half-published result is kept)."""


@dataclass(frozen=True)
class StoredObject:
    bucket: str
    path: str
    url: str
    content_type: str
    size: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Storage(Protocol):
    def upload(self, bucket: str, path: str, data: bytes, content_type: str) -> StoredObject:
        """Store `data` at bucket/path, replacing what is there (a retried job overwrites)."""
        ...


class LocalStorage:
    """Files under a folder: {root}/{bucket}/{path}, written atomically."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def upload(self, bucket: str, path: str, data: bytes, content_type: str) -> StoredObject:
        target = (self.root / bucket / path).resolve()
        if self.root.resolve() not in target.parents:
            raise StorageError(f"refusing to write outside {self.root}: {bucket}/{path}")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".upload-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, target)
        except OSError as err:
            raise StorageError(f"local storage write failed: {err}") from err
        return StoredObject(bucket, path, target.as_uri(), content_type, len(data))
