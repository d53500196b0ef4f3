"""Every setting, read from the environment once. Names are the env variables, upper-cased."""

from __future__ import annotations

import os
import socket
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OURVIDZ_", extra="ignore")

    database_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("DATABASE_URL", "OURVIDZ_DATABASE_URL"),
        description="Postgres URL for the worker (service role / postgres). Unset: the embedded server.",
    )
    listen_database_url: str | None = Field(
        default=None,
        description="Direct or session-mode URL for LISTEN when DATABASE_URL is a transaction pooler.",
    )
    home: Path = Field(
        default=Path(".ourvidz"),
        description="All local state: embedded database, local storage, built demo models.",
    )
    worker_id: str | None = Field(default=None, description="Defaults to host-pid.")
    queues: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated queues to serve; empty means all."
    )
    concurrency: int = Field(default=1, ge=1, le=256, description="Jobs run at once by one worker.")
    lease_seconds: float = Field(default=30.0, gt=0, description="A claimed job's lease; extended while it runs.")
    poll_interval: float = Field(
        default=30.0, gt=0, description="Seconds between safety polls while LISTEN works."
    )
    fallback_poll_interval: float = Field(
        default=1.0, gt=0, description="Seconds between polls while LISTEN is unavailable."
    )
    listen: bool = Field(default=True, description="Use LISTEN/NOTIFY to wake on new jobs.")
    progress_interval: float = Field(
        default=0.5, ge=0, description="Minimum seconds between progress writes of one job."
    )
    shutdown_grace: float = Field(
        default=30.0, ge=0, description="Seconds running jobs get to finish after SIGTERM."
    )
    retry_base_seconds: float = Field(default=2.0, ge=0, description="First retry delay; doubles per attempt.")
    retry_max_seconds: float = Field(default=300.0, ge=0, description="Cap of the retry delay.")
    pool_size: int = Field(default=4, ge=1, description="Connections in the worker's pool.")
    storage_backend: str = Field(default="local", description="local | supabase")

    @field_validator("queues", mode="before")
    @classmethod
    def comma_separated(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [q.strip() for q in value.split(",") if q.strip()]
        return value

    @cached_property
    def resolved_worker_id(self) -> str:
        return self.worker_id or f"{socket.gethostname()}-{os.getpid()}"

    @property
    def home_dir(self) -> Path:
        return self.home.expanduser().resolve()

    @property
    def storage_dir(self) -> Path:
        return self.home_dir / "storage"

    @property
    def embedded_pgdata(self) -> Path:
        return self.home_dir / "pgdata"

    @property
    def migrations_dir(self) -> Path:
        return REPO_ROOT / "sql" / "migrations"

    @property
    def bootstrap_file(self) -> Path:
        return REPO_ROOT / "sql" / "bootstrap" / "supabase_shim.sql"
