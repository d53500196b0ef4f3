"""One logging set-up for every command: plain text, JSON lines, or Rich on a terminal.

OURVIDZ_LOG_FORMAT=auto (default) writes Rich on a terminal and plain single-line text
elsewhere; `text`, `json` and `rich` force one. Per-job records carry `extra=job_extra(...)`:
JSON lines hold them as fields, text and Rich lines end with them as key=value.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Iterable
from datetime import datetime
from typing import Any, Literal, TextIO, cast, get_args

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

LogFormat = Literal["auto", "rich", "text", "json"]
FORMAT_ENV = "OURVIDZ_LOG_FORMAT"

# Libraries that narrate every request or load at INFO; their warnings still get through.
QUIET_LOGGERS = (
    "httpx", "httpcore", "hpack", "h2", "urllib3", "filelock", "asyncio", "websockets", "realtime",
    "supabase", "storage3", "postgrest", "gotrue", "pgserver", "PIL", "huggingface_hub", "fsspec",
    "matplotlib", "torch", "torchvision", "accelerate",
)
# Libraries whose own warnings are advisories for library users, not for a worker's operator.
NOISY_WARNING_MODULES = r"(torchvision|diffusers|transformers|huggingface_hub|accelerate|torch\.utils)(\.|$)"
# Read by transformers/diffusers/huggingface_hub/tqdm when they are imported; set only where unset.
QUIET_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TQDM_DISABLE": "1",  # the diffusers pipelines' per-step bars
}

_HANDLER_NAME = "ourvidz"
_secrets: set[str] = set()


def job_extra(job: Any, worker_id: str | None = None, **more: Any) -> dict[str, Any]:
    """`extra=` for a record about one job: job_id, job_type, attempt (and worker_id, code, seconds…)."""
    extra: dict[str, Any] = {"job_id": str(job.id), "job_type": job.job_type, "attempt": job.attempts}
    if worker_id is not None:
        extra["worker_id"] = worker_id
    extra.update({k: v for k, v in more.items() if v is not None})
    return extra


def hide(*secrets: str | None) -> None:
    """Never let these strings (passwords, keys) reach a log line; they are replaced by ***."""
    _secrets.update(s for s in secrets if s and len(s) >= 3)


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    for secret in sorted({*_secrets, *secrets}, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in RESERVED_ATTRS and not k.startswith("_")}


class TextFormatter(logging.Formatter):
    """`2026-12-01T09:30:00.123+01:00 INFO    worker.loop: message key=value …`, local time with its offset."""

    def __init__(self, fmt: str = "%(asctime)s %(levelname)-7s %(name)s: %(message)s") -> None:
        super().__init__(fmt)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return datetime.fromtimestamp(record.created).astimezone().isoformat(timespec="milliseconds")

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = " ".join(super().formatMessage(record).splitlines())  # a traceback may follow; the record is one line
        fields = _extras(record)
        if fields:
            line += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        return line


class _Redact(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if _secrets:
            message = record.getMessage()
            clean = redact(message)
            if clean != message:
                record.msg, record.args = clean, None
        return True


def resolve_format(value: str | None, stream: TextIO) -> Literal["rich", "text", "json"]:
    chosen = (value or os.environ.get(FORMAT_ENV) or "auto").strip().lower()
    if chosen not in get_args(LogFormat):
        raise ValueError(f"{FORMAT_ENV} must be one of {', '.join(get_args(LogFormat))}, not {chosen!r}")
    if chosen == "auto":
        return "rich" if stream.isatty() else "text"
    return cast(Literal["rich", "text", "json"], chosen)


def make_handler(fmt: Literal["rich", "text", "json"], stream: TextIO) -> logging.Handler:
    handler: logging.Handler
    if fmt == "rich":
        from rich.console import Console
        from rich.logging import RichHandler

        handler = RichHandler(console=Console(file=stream), show_path=False,
                              log_time_format="%Y-%m-%d %H:%M:%S")
        handler.setFormatter(TextFormatter("%(message)s"))
    else:
        handler = logging.StreamHandler(stream)
        if fmt == "json":
            handler.setFormatter(JsonFormatter(
                "{levelname}{name}{message}", style="{", timestamp="time",
                rename_fields={"levelname": "level", "name": "logger"},
            ))
        else:
            handler.setFormatter(TextFormatter())
    handler.set_name(_HANDLER_NAME)
    handler.addFilter(_Redact())
    return handler


def configure(fmt: str | None = None, *, verbose: bool = False, stream: TextIO | None = None) -> str:
    """Configure the root logger once per process (again: replaces our handler). Returns the format used.

    Raises ValueError for an unknown format, so that a command can say so in one sentence.
    """
    stream = stream or sys.stderr
    chosen = resolve_format(fmt, stream)
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(make_handler(chosen, stream))
    root.setLevel(logging.INFO)
    logging.getLogger("worker").setLevel(logging.DEBUG if verbose else logging.INFO)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    _quiet_libraries(verbose)
    return chosen


def _quiet_libraries(verbose: bool) -> None:
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, "warning" if verbose and value == "error" else value)
    warnings.showwarning = _warning_record
    try:
        from platformdirs import RuntimeDirWarning  # pgserver asks platformdirs for a runtime dir

        warnings.filterwarnings("ignore", category=RuntimeDirWarning)
    except ImportError:
        pass
    if not verbose:
        warnings.filterwarnings("ignore", module=NOISY_WARNING_MODULES)
    for library in ("transformers", "diffusers"):  # already imported: their env settings were read
        module = sys.modules.get(f"{library}.utils.logging")
        if module is not None:
            module.set_verbosity(logging.WARNING if verbose else logging.ERROR)  # type: ignore[attr-defined]


def _warning_record(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                    file: TextIO | None = None, line: str | None = None) -> None:
    """A warning becomes one log record in the chosen format, not two lines of source on stderr."""
    logging.getLogger("py.warnings").warning("%s: %s (%s:%d)", category.__name__, message, filename, lineno)
