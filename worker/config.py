"""Every setting, read from the environment once. Names are the env variables, upper-cased."""

from __future__ import annotations

import os
import socket
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, ByteSize, Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent
# The wheel carries the repository's top-level sql/ as worker/sql (pyproject.toml package-dir);
# a checkout, editable install included, reads sql/ where the Supabase CLI and the team keep it.
_PACKAGED_SQL = Path(__file__).resolve().parent / "sql"
SQL_DIR = _PACKAGED_SQL if _PACKAGED_SQL.is_dir() else REPO_ROOT / "sql"


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
    async_commit: bool = Field(
        default=True,
        description="Claims, heartbeats and progress commit without waiting for the WAL flush (outcomes "
                    "always wait); set false behind a transaction-mode pooler.",
    )
    prepare_statements: bool = Field(
        default=True, description="Server-side prepared statements; set false behind a transaction-mode pooler."
    )
    health_port: int | None = Field(
        default=None, ge=0, le=65535,
        description="Serve GET /health, /status and /metrics on this port (0: any free port). Unset: no server.",
    )
    health_host: str = Field(default="0.0.0.0", description="Address the health server binds.")
    affinity: bool = Field(default=True, description="Prefer jobs whose model is already loaded on this worker.")
    affinity_window: int = Field(
        default=256, ge=1, description="How many queued jobs past the head of the queue affinity may reach."
    )
    affinity_max_wait: float = Field(
        default=300.0, ge=0, description="Seconds after which a queued job is taken regardless of the loaded model."
    )
    memory_budget: ByteSize | None = Field(
        default=None,
        description="Bytes the loaded models may take before idle ones are evicted (e.g. 20GiB; 0: unlimited). "
                    "Unset: memory_fraction of the GPU's memory, or 8GiB on CPU.",
    )
    memory_fraction: float = Field(
        default=0.9, gt=0, le=1,
        description="Share of the GPU's memory the models may take when memory_budget is unset.",
    )
    memory_pressure_levels: Annotated[tuple[float, float, float], NoDecode] = Field(
        default=(0.7, 0.85, 0.95),
        description="used/budget at which memory pressure turns medium, high and critical (comma-separated).",
    )
    chat_model: str = Field(
        default="Qwen/Qwen2.5-7B-Instruct", description="Chat model: a hub id or a local folder (from_pretrained)."
    )
    chat_device: str = Field(default="auto", description="auto (cuda when available) | cpu | cuda | cuda:N.")
    chat_max_batch_size: int = Field(
        default=8, ge=1, le=256,
        description="Chat jobs generated together as one batch (the worker's concurrency bounds it too).",
    )
    chat_context_tokens: int = Field(
        default=8192, ge=256, description="Prompt + reply budget in tokens; older history is dropped to fit."
    )
    chat_static_cache: bool = Field(
        default=False, description="Static KV cache for chat decoding (compiled with torch.compile on CUDA)."
    )
    sdxl_model: str = Field(
        default="stabilityai/stable-diffusion-xl-base-1.0",
        description="SDXL checkpoint: a hub id, a diffusers folder, or a single-file .safetensors/.ckpt "
                    "(loaded with from_single_file; its configs come from the base model's hub repo or cache).",
    )
    sdxl_variant: str | None = Field(
        default="fp16", description="Weights variant to load (fp16: half the download and read of fp32); a repo or "
                                    "folder without that variant's files loads its default weights. Empty: none."
    )
    wan_model: str = Field(
        default="Wan-AI/Wan2.1-T2V-1.3B-Diffusers", description="WAN 2.1 text-to-video checkpoint (WanPipeline)."
    )
    wan_vace_model: str | None = Field(
        default="Wan-AI/Wan2.1-VACE-1.3B-diffusers",
        description="WAN VACE checkpoint serving reference jobs (first/last frame, reference image); loaded on the "
                    "first such job, sharing the T2V text encoder and VAE. Empty: none.",
    )
    wan_i2v_model: str | None = Field(
        default=None,
        description="WAN 14B I2V (single/start frame) or FLF2V (first+last frame) checkpoint "
                    "(WanImageToVideoPipeline), used for reference jobs when no VACE model is set. Empty: none.",
    )
    diffusion_device: str = Field(
        default="auto", description="SDXL/WAN device: auto (cuda when available) | cpu | cuda | cuda:N."
    )
    diffusion_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto", description="SDXL/WAN weights dtype; auto: bfloat16 on GPU, float32 on CPU."
    )
    diffusion_cpu_offload: bool = Field(
        default=False, description="Model CPU offload for SDXL/WAN (less VRAM, slower); ignored without a GPU."
    )
    diffusion_vae_tiling: bool = Field(
        default=False, description="Tiled VAE decoding (less VRAM for big images/videos); always on after an OOM."
    )
    storage_backend: Literal["local", "supabase"] = Field(
        default="local",
        description="local: files under HOME/storage. supabase: Supabase Storage at SUPABASE_URL.",
    )
    supabase_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("SUPABASE_URL", "OURVIDZ_SUPABASE_URL"),
        description="Project URL (https://<ref>.supabase.co) for Storage.",
    )
    supabase_service_role_key: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("SUPABASE_SERVICE_ROLE_KEY", "OURVIDZ_SUPABASE_SERVICE_ROLE_KEY"),
        description="Service role (or secret) key: the worker writes every user's folder.",
    )
    signed_url_seconds: int = Field(
        default=7 * 24 * 3600, ge=1,
        description="Expiry of the signed URLs put in results for private buckets; the path stays valid "
                    "for re-signing.",
    )
    storage_public_buckets: Annotated[list[str] | None, NoDecode] = Field(
        default=None,
        description="Comma-separated buckets whose assets get public URLs. Unset: each bucket's own "
                    "`public` flag, read from the Storage API on first use.",
    )
    storage_timeout: float = Field(default=30.0, gt=0, description="Seconds per Storage API request.")
    storage_attempts: int = Field(
        default=4, ge=1, le=20, description="Tries per upload in-process (with backoff) before the job retries."
    )
    reference_max_bytes: int = Field(
        default=10 * 1024 * 1024, ge=1024, description="Largest reference image accepted, in bytes."
    )
    reference_max_side: int = Field(default=4096, ge=64, description="Largest reference width/height in pixels.")
    reference_min_side: int = Field(default=64, ge=1, description="Smallest reference width/height in pixels.")
    reference_timeout: float = Field(default=15.0, gt=0, description="Seconds to fetch one reference image.")
    reference_bucket: str = Field(
        default="reference_images", description="Bucket of a reference given as '<user_id>/<file>'."
    )
    reference_allow_http: bool = Field(
        default=False, description="Accept http:// reference URLs (tests and local development only)."
    )
    reference_allow_private_hosts: bool = Field(
        default=False,
        description="Accept reference URLs on loopback/private addresses (tests and local development only).",
    )
    storage_retry_window: float = Field(
        default=300.0, ge=0,
        description="Seconds a job whose outputs exist keeps retrying their upload (with backoff, keeping its "
                    "lease) while Storage is down or failing, before the job is retried and the attempt's uploads "
                    "removed.",
    )
    storage_retry_max_delay: float = Field(
        default=10.0, gt=0, description="Longest pause between two upload tries within the storage retry window."
    )

    # -- what a job may hold, and the worker's own faults --
    prepare_slots: int = Field(
        default=2, ge=0, le=64,
        description="Jobs claimed on top of --concurrency while they validate and fetch their references "
                    "(holding no model): a slow reference URL delays only its own job.",
    )
    timeout_grace: float = Field(
        default=30.0, ge=0,
        description="Seconds a job past its type's run-time limit (job_types.max_run_seconds) gets to stop; "
                    "past it the job is given back and the worker exits to be restarted.",
    )
    hang_watchdog: bool = Field(
        default=False,
        description="Exit the process when the lease keeper stops beating for hang_exit_seconds (C code holding "
                    "the GIL). `ourvidz-worker run` turns it on.",
    )
    hang_exit_seconds: float = Field(
        default=300.0, gt=0, description="How long the lease keeper may go without a beat before the watchdog exits."
    )
    fault_retry_seconds: float = Field(
        default=5.0, gt=0,
        description="After a fault of the worker's own (storage key refused, model that cannot load), seconds "
                    "before it tries that work again; doubles per repeat.",
    )
    fault_retry_max_seconds: float = Field(default=300.0, gt=0, description="Cap of fault_retry_seconds' backoff.")
    rescue_grace_seconds: float | None = Field(
        default=None, gt=0,
        description="Seconds of working database connections a worker waits before rescuing others' expired "
                    "leases (after an outage, live workers need that long to reconnect and renew). Unset: two leases.",
    )

    # Every connection (pool, LISTEN, CLI): a dead peer is noticed in bounded time, not never.
    db_connect_timeout: int = Field(
        default=10, ge=2, le=600, description="Seconds to wait for a database connection (libpq's minimum is 2)."
    )
    db_statement_timeout: float = Field(
        default=30.0, ge=0,
        description="Server-side limit on each statement of the worker's and the CLI's pools, in seconds (0: none). "
                    "Not set behind a transaction pooler (OURVIDZ_PREPARE_STATEMENTS=false), where a session "
                    "setting would leak to other clients; migrations run without it.",
    )
    db_reply_timeout: float = Field(
        default=45.0, gt=0,
        description="Seconds a pool connection waits for any reply before it is dropped as dead: a partition behind "
                    "a proxy or pooler that keeps the TCP connection open. Longer than db_statement_timeout.",
    )
    db_keepalives_idle: int = Field(default=30, ge=1, description="Seconds of silence before TCP keepalive probes.")
    db_keepalives_interval: int = Field(default=10, ge=1, description="Seconds between TCP keepalive probes.")
    db_keepalives_count: int = Field(
        default=3, ge=1,
        description="Unanswered keepalive probes after which a connection is dead (30 + 3 x 10 = 60 s by default).",
    )

    # -- watching a job form: live previews of SDXL/WAN latents (docs/previews.md) --
    preview_enabled: bool = Field(
        default=True, description="Publish a small preview image of an SDXL/WAN job's latents while it denoises."
    )
    preview_every_steps: int = Field(default=5, ge=1, description="A preview at most every this many steps.")
    preview_min_seconds: float = Field(
        default=2.0, ge=0, description="And at most one preview per this many seconds of a job."
    )
    preview_keep: bool = Field(
        default=False,
        description="Keep the last preview object (and the row's `preview`) of a completed job; canceled and "
                    "failed jobs never keep theirs.",
    )
    preview_format: Literal["png", "webp", "jpeg"] = Field(
        default="png",
        description="Preview image format. webp/jpeg are smaller, but the job types' buckets must allow "
                    "image/webp or image/jpeg (the migrations' buckets allow image/png).",
    )
    preview_max_side: int = Field(
        default=512, ge=16, le=4096, description="Largest side of a preview image in pixels (it is scaled down)."
    )
    preview_frames: int = Field(
        default=4, ge=1, le=16, description="Frames of a video shown side by side in its preview."
    )
    preview_sdxl_decoder: str | None = Field(
        default=None,
        description="Local folder of a tiny SDXL decoder (diffusers AutoencoderTiny, e.g. taesdxl) for sharper "
                    "previews. Unset: a fixed linear latent-to-RGB map (no weights).",
    )
    preview_wan_decoder: str | None = Field(
        default=None,
        description="Local folder of an AutoencoderTiny with 16 latent channels trained on Wan 2.1 latents, applied "
                    "per latent frame. Unset: a fixed linear latent-to-RGB map (no weights).",
    )

    @field_validator("queues", "storage_public_buckets", mode="before")
    @classmethod
    def comma_separated(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [q.strip() for q in value.split(",") if q.strip()]
        return value

    @field_validator("memory_pressure_levels", mode="before")
    @classmethod
    def three_levels(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [float(v) for v in value.split(",") if v.strip()]
        if isinstance(value, list | tuple) and (len(value) != 3 or not 0 < value[0] <= value[1] <= value[2]):
            raise ValueError("three ascending positive ratios: medium, high, critical")
        return value

    @field_validator("db_reply_timeout")
    @classmethod
    def reply_after_statement(cls, value: float, info: ValidationInfo) -> float:
        statement = info.data.get("db_statement_timeout") or 0
        if value <= statement:
            raise ValueError(f"must be longer than db_statement_timeout ({statement:g} s), or every slow statement "
                             "would drop its connection")
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
        return SQL_DIR / "migrations"

    @property
    def bootstrap_file(self) -> Path:
        return SQL_DIR / "bootstrap" / "supabase_shim.sql"
