"""Check before claiming: what `ourvidz-worker run` verifies before its first claim.

- the database answers and has every migration in sql/migrations (else: run `ourvidz-worker migrate`);
- storage accepts the worker's credentials (`Storage.check()`);
- each served handler's model source resolves: a local path that exists, or a Hugging Face repo id
  (when HF_HUB_OFFLINE is set, one already in the local cache) — nothing is downloaded;
- a CUDA device setting names a device this machine has; `--gpus` names GPUs it has (`check_gpus`).

A problem that only some work suffers from starts the worker with that scope faulted instead of
refusing it: `preflight` returns the faults (scope -> one sentence) for `Worker.add_faults`, so a
worker whose SDXL path is wrong still serves chat, and one whose storage key is refused still serves
what publishes nothing. Storage that cannot be reached is always such a fault (it may come back;
the worker probes it). When nothing at all could be served, or the database is not there or not
migrated, PreflightError says why in one sentence.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import psycopg

from worker import db
from worker.config import Settings
from worker.handlers.base import Handler
from worker.jobs import WorkerFault
from worker.queue import QUEUE_HANDLERS
from worker.storage import Storage, StorageError, make_storage

log = logging.getLogger(__name__)

USAGE, FAILED = 2, 1  # a setting that cannot work here; something that may work on a later start
MODEL_SETTINGS = {"chat": "OURVIDZ_CHAT_MODEL", "sdxl": "OURVIDZ_SDXL_MODEL", "wan": "OURVIDZ_WAN_MODEL"}
SINGLE_FILES = (".safetensors", ".ckpt", ".bin", ".pt", ".pth", ".gguf")
MODEL_MARKERS = ("model_index.json", "config.json")


class PreflightError(Exception):
    """What stops the worker from starting, in one sentence, and the exit code."""

    def __init__(self, message: str, code: int = USAGE) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def preflight(settings: Settings, handlers: Mapping[str, Handler], database_url: str,
              storage: Storage | None = None) -> tuple[Storage, dict[str, str]]:
    """Run every check; the storage backend to use and the faults to start with (scope -> reason)."""
    served = check_database(settings, database_url)
    if storage is None:
        try:
            storage = make_storage(settings)
        except ValueError as err:
            raise PreflightError(str(err)) from None
    faults: dict[str, str] = {}
    retried: set[str] = set()  # faults that may clear by themselves
    storage_problem = check_storage(storage)
    if storage_problem is not None:
        scope, reason, transient = storage_problem
        faults[scope] = reason
        if transient:
            retried.add(scope)
    for name in sorted(served & set(handlers)):
        if (problem := handler_problem(name, handlers[name], settings)) is not None:
            faults[f"handler:{name}"] = problem
    for scope, reason in faults.items():
        log.log(logging.WARNING if scope in retried else logging.ERROR, "preflight: %s", reason)
    servable = [name for name in served & set(handlers)
                if not _blocked(name, handlers[name], set(faults) - retried)]
    if served & set(handlers) and not servable:
        blocking = [reason for scope, reason in faults.items() if scope not in retried]
        more = f" (and {len(blocking) - 1} more problem(s), logged above)" if len(blocking) > 1 else ""
        raise PreflightError(f"nothing this worker serves can run: {blocking[0]}{more}",
                             FAILED if set(faults) & {"disk"} else USAGE)
    return storage, faults


def _blocked(name: str, handler: Handler, faults: set[str]) -> bool:
    if faults & {"device", "disk"} or f"handler:{name}" in faults:
        return True
    return "storage" in faults and getattr(handler, "uses_storage", True)


# --- the database ----------------------------------------------------------------------


def check_database(settings: Settings, database_url: str) -> set[str]:
    """Reachable and migrated; the handler names of the enabled job types in the worker's queues."""
    try:
        with db.connect(database_url, settings) as conn:
            pending = pending_migrations(conn, settings)
            if pending:
                first = pending[0]
                raise PreflightError(
                    f"the database lacks {len(pending)} of the worker's migrations (the first is "
                    f"{first.version}_{first.name}): run `ourvidz-worker migrate` (or `ourvidz-worker supabase "
                    "export` and `supabase db push`)", FAILED)
            rows = conn.execute(QUEUE_HANDLERS, {"queues": settings.queues}).fetchall()
    except psycopg.ProgrammingError:
        raise PreflightError("DATABASE_URL is not a valid Postgres URL "
                             "(postgresql://USER:PASSWORD@HOST:5432/DBNAME)") from None
    except psycopg.Error as err:
        line = (str(err).strip().splitlines() or [type(err).__name__])[0].removeprefix("connection failed: ")
        raise PreflightError(f"cannot use the database: {line}", FAILED) from None
    return {row["handler"] for row in rows}


def pending_migrations(conn: db.Connection, settings: Settings) -> list[db.Migration]:
    """Our migrations that neither history (ours, or the Supabase CLI's) records as applied."""
    applied: set[str] = set()
    for table in (db.CLI_HISTORY, db.OWN_HISTORY):
        applied |= db._recorded(conn, table) or set()
    return [m for m in db.discover_migrations(settings.migrations_dir) if m.version not in applied]


# --- storage ---------------------------------------------------------------------------


def check_storage(storage: Storage) -> tuple[str, str, bool] | None:
    """(scope, reason, transient) when storage refuses or cannot be reached, else None."""
    check = getattr(storage, "check", None)
    if not callable(check):
        return None
    try:
        check()
    except WorkerFault as fault:
        return fault.scope, fault.message, False
    except StorageError as err:
        return "storage", f"storage cannot be reached yet: {err}", True
    return None


# --- models and devices ----------------------------------------------------------------


def handler_problem(name: str, handler: Handler, settings: Settings) -> str | None:
    """Why `handler` cannot load its model on this machine, in one sentence, or None."""
    device, setting = _device_setting(handler)
    if device is not None and (problem := device_problem(device)) is not None:
        return f"{name} cannot run here: {setting}={device}, but {problem}"
    source = getattr(handler, "source", None)
    if isinstance(source, str) and source and (problem := source_problem(source)) is not None:
        return f"{name} model {MODEL_SETTINGS.get(name, 'source')}={source}: {problem}"
    return None


def _device_setting(handler: Handler) -> tuple[str | None, str]:
    from worker.handlers.sdxl import SdxlHandler
    from worker.handlers.wan import WanHandler

    if isinstance(handler, SdxlHandler | WanHandler):
        return handler.settings.diffusion_device, "OURVIDZ_DIFFUSION_DEVICE"
    device = getattr(handler, "device", None)
    setting = "OURVIDZ_CHAT_DEVICE" if type(handler).__name__ == "ChatHandler" else "its device"
    return (device, setting) if isinstance(device, str) else (None, "")


def device_problem(device: str) -> str | None:
    """Why a torch device setting cannot work here; None for cpu/auto and devices that exist."""
    match = re.fullmatch(r"cuda(?::(\d+))?", device.strip().lower())
    if match is None:
        return None
    import torch

    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a build without CUDA"
        return f"this machine has no usable CUDA device (torch {torch.__version__}, {build})"
    count = torch.cuda.device_count()
    if match.group(1) is not None and int(match.group(1)) >= count:
        return f"this machine has {count} CUDA device(s), numbered from 0"
    return None


def _offline() -> bool:
    from huggingface_hub import constants

    return constants.is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def source_problem(source: str) -> str | None:
    """Why `from_pretrained(source)` cannot work, without downloading anything; None when it can."""
    path = Path(source).expanduser()
    if path.exists():
        if not os.access(path, os.R_OK):
            return "this worker may not read it"
        if path.is_dir() and not any((path / marker).is_file() for marker in MODEL_MARKERS):
            return f"the folder has no {' or '.join(MODEL_MARKERS)}, so it is not a model folder"
        return None
    if source.startswith(("/", "./", "../", "~")) or path.suffix in SINGLE_FILES or source.count("/") > 1:
        return "no such file or folder"
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(source)
    except HFValidationError:
        return "neither a local path that exists nor a Hugging Face repo id"
    if _offline():
        try:
            snapshot_download(source, local_files_only=True)
        except LocalEntryNotFoundError:
            return "HF_HUB_OFFLINE is set and the repo is not in the local Hugging Face cache"
    return None


# --- GPUs for `run --gpus` -------------------------------------------------------------

_GPU_UUID = re.compile(r"\(UUID: ((?:GPU|MIG)-[^)\s]+)\)")


def check_gpus(gpus: Sequence[str], spec: str) -> list[str]:
    """The GPUs `parse_gpus` chose, refused when this machine does not have them."""
    from worker.supervisor import GpuError

    listing = _nvidia_smi()
    if listing is not None:
        ordinals = re.findall(r"^GPU (\d+):", listing, flags=re.MULTILINE)
        known = set(ordinals) | set(_GPU_UUID.findall(listing))
    else:
        known = {str(i) for i in range(_torch_device_count())}
        ordinals = sorted(known)
    if not ordinals:
        raise GpuError(f"--gpus {spec}: this machine has no GPU (nvidia-smi -L and torch.cuda.device_count() "
                       "see none)")
    unknown = [gpu for gpu in gpus if gpu not in known and (gpu.isdigit() or listing is not None)]
    if unknown:
        raise GpuError(f"--gpus {spec}: this machine has no GPU {', '.join(unknown)} (it has {len(ordinals)}: "
                       f"{', '.join(ordinals)})")
    return list(gpus)


def _nvidia_smi() -> str | None:
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def _torch_device_count() -> int:
    """In a subprocess: CUDA initialised in the supervisor would hold a context on every GPU."""
    try:
        out = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
                             capture_output=True, text=True, timeout=120, check=True).stdout.strip()
        return int(out or 0)
    except (OSError, subprocess.SubprocessError, ValueError):
        return 0

