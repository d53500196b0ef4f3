"""What a job is: the row as the worker sees it, payloads per job type, results and errors.

Error codes and ranges come from the seed documents of the system this replaces.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal, Self, TypeVar
from uuid import UUID

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

PayloadT = TypeVar("PayloadT", bound=BaseModel)


class ErrorCode(StrEnum):
    INVALID_INPUT = "INVALID_INPUT"  # payload failed validation; never retried
    UNKNOWN_JOB_TYPE = "UNKNOWN_JOB_TYPE"  # no such (enabled) job type, or no handler for it
    GENERATION_FAILED = "GENERATION_FAILED"  # the handler raised something unexpected
    OOM_ERROR = "OOM_ERROR"  # out of (GPU) memory; retried after cleanup
    MODEL_LOAD_ERROR = "MODEL_LOAD_ERROR"  # weights missing or unreadable
    MODEL_UNAVAILABLE = "MODEL_UNAVAILABLE"  # no model on this worker serves the request (e.g. a reference mode)
    NETWORK_ERROR = "NETWORK_ERROR"  # fetching a reference, talking to an API
    STORAGE_ERROR = "STORAGE_ERROR"  # publishing assets failed
    TIMEOUT_ERROR = "TIMEOUT_ERROR"
    DATABASE_ERROR = "DATABASE_ERROR"
    WORKER_LOST = "WORKER_LOST"  # the lease expired: the worker died or lost the database


RETRYABLE_CODES = frozenset(
    {
        ErrorCode.OOM_ERROR,
        ErrorCode.NETWORK_ERROR,
        ErrorCode.STORAGE_ERROR,
        ErrorCode.TIMEOUT_ERROR,
        ErrorCode.DATABASE_ERROR,
        ErrorCode.WORKER_LOST,
    }
)


class JobError(Exception):
    """Raised by handlers (or mapped from other exceptions) to fail or retry the current job."""

    def __init__(self, code: ErrorCode | str, message: str, *, retryable: bool | None = None) -> None:
        super().__init__(message)
        self.code = str(code)
        self.message = message
        self.retryable = retryable if retryable is not None else code in RETRYABLE_CODES

    def to_json(self) -> dict[str, Any]:
        return {"code": str(self.code), "message": self.message, "retryable": self.retryable}


class WorkerFault(Exception):
    """The worker's own fault, not the job's: storage credentials refused, a model that cannot load
    here, a missing or broken device, a full disk.

    The job goes back to the queue without spending an attempt (the entry still goes into its
    `errors`), and the worker stops claiming what `scope` covers until a recovery check passes:
    `scope` is "storage" (every job that publishes), "handler:<name>" (that handler's job types),
    "device" or "disk" (everything).
    """

    def __init__(self, code: ErrorCode | str, message: str, *, scope: str) -> None:
        super().__init__(message)
        self.code = str(code)
        self.message = message
        self.scope = scope

    def to_json(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "retryable": True, "worker_fault": True,
                "scope": self.scope}


def invalid_input(err: ValidationError) -> JobError:
    problems = "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'payload'}: {e['msg']}" for e in err.errors()[:5]
    )
    return JobError(ErrorCode.INVALID_INPUT, f"invalid payload: {problems}")


def _int_text(text: str) -> int | str:
    text = text.strip()
    return int(text) if text.isdigit() and len(text) <= 6 else text


CONFIG_ALIASES = {"sample_steps": "steps", "sample_guide_scale": "guidance_scale"}


def resolve_config_aliases(config: Mapping[str, Any]) -> dict[str, Any]:
    """Seed 002's `size: "W*H"`, `sample_steps`, `sample_guide_scale` as width/height/steps/guidance."""
    out = dict(config)
    size = out.pop("size", None)
    if isinstance(size, str) and "*" in size:
        width, _, height = size.partition("*")
        out.setdefault("width", _int_text(width))
        out.setdefault("height", _int_text(height))
    elif size is not None:
        out["size"] = size
    for alias, name in CONFIG_ALIASES.items():
        if alias in out:
            value = out.pop(alias)
            out.setdefault(name, value)
    return out


class JobType(BaseModel):
    name: str
    queue: str
    handler: str
    model: str | None = None
    content_type: str | None = None
    file_extension: str | None = None
    bucket: str | None = None
    defaults: dict[str, Any] = Field(default_factory=dict)
    expected_seconds: int | None = None
    max_run_seconds: int | None = None
    limits: dict[str, Any] = Field(default_factory=dict)
    max_attempts: int = 3
    enabled: bool = True


class Job(BaseModel):
    """A claimed row. Handlers read it; only the worker writes the row."""

    id: UUID
    user_id: UUID | None
    job_type: str
    queue: str
    payload: Any  # whatever the row holds: a payload that is not an object fails the job alone, in parse()
    priority: int
    attempts: int
    max_attempts: int
    created_at: datetime
    started_at: datetime | None = None
    run_at: datetime
    errors: list[dict[str, Any]] = Field(default_factory=list)
    type_info: JobType | None = None

    @property
    def config(self) -> dict[str, Any]:
        """The job type's defaults overridden by the payload's `config` (seed 002 shape)."""
        defaults = self.type_info.defaults if self.type_info else {}
        # each layer's aliases resolved on its own, so a payload's `size` beats a preset's width
        return {**resolve_config_aliases(defaults), **resolve_config_aliases(self.section("config"))}

    @property
    def limits(self) -> dict[str, Any]:
        """The accepted range of each user-set field, from the job type's row (operator data)."""
        return self.type_info.limits if self.type_info else {}

    def payload_object(self) -> dict[str, Any]:
        """The payload, or INVALID_INPUT naming what it is instead of a JSON object."""
        payload = self.payload
        if isinstance(payload, UnreadableJson):
            raise JobError(ErrorCode.INVALID_INPUT, f"payload could not be read: {payload.reason}")
        if not isinstance(payload, dict):
            raise JobError(ErrorCode.INVALID_INPUT, f"payload must be a JSON object, not {json_kind(payload)}")
        return payload

    def section(self, name: str) -> dict[str, Any]:
        """An object-valued payload field (`config`, `metadata`): absent is empty, anything else is refused."""
        value = self.payload_object().get(name)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise JobError(ErrorCode.INVALID_INPUT,
                           f"invalid payload: {name}: must be a JSON object, not {json_kind(value)}")
        return value

    def parse(self, model: type[PayloadT], config: dict[str, Any] | None = None,
              floors: dict[str, int] | None = None) -> PayloadT:
        """Validate the payload (with the type's defaults, or the given layered `config`) into `model`
        within the type's limits, or raise INVALID_INPUT. `floors` lowers the limits' minimums: a tiny
        test model's folder declares them (never a payload)."""
        data = {**self.payload_object(), "config": self.config if config is None else config}
        limits = self.limits
        if floors:
            limits = {name: ({**spec, "min": min(spec["min"], floors[name])}
                             if name in floors and isinstance(spec, dict) and "min" in spec else spec)
                      for name, spec in limits.items()}
        try:
            return model.model_validate(data, context={"limits": limits})
        except ValidationError as err:
            raise invalid_input(err) from None


# --- rows that cannot be read -------------------------------------------------------------


class UnreadableJson:
    """A JSON value Python cannot load (a number of 4,401 digits, nesting past the recursion limit):
    the row still loads, and its job fails alone with INVALID_INPUT naming the problem."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __repr__(self) -> str:
        return f"UnreadableJson({self.reason!r})"


def load_json_leniently(data: str | bytes) -> Any:
    """json.loads for rows users wrote: never raises, so one poison row cannot fail a whole claim."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as err:
        return UnreadableJson(f"{type(err).__name__}: {str(err)[:200]}")


def json_kind(value: Any) -> str:
    kinds = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    if isinstance(value, UnreadableJson):
        return "unreadable JSON"
    return next((name for t, name in kinds.items() if isinstance(value, t)),
                "a number" if isinstance(value, int | float) else type(value).__name__)


# --- limits: data on job_types, enforced while parsing ---------------------------------------
#
# job_types.limits maps a field name (top-level payload field or config field) to its accepted
# range: {"min": a, "max": b} for numbers, {"in": [...]} for a fixed set, {"max_length": n} for
# texts and lists. The payload models below keep the absolute bounds of the code; the row narrows
# them, so an operator changes a range with an UPDATE, and frontends read it from job_types.


def check_limits(values: dict[str, Any], limits: dict[str, Any]) -> list[str]:
    """The problems of `values` (field -> value) against `limits`; empty when every field is within."""
    problems = []
    for name, spec in limits.items():
        value = values.get(name)
        if value is None or not isinstance(spec, dict):
            continue
        if "in" in spec and value not in spec["in"]:
            problems.append(f"{name}: must be one of {', '.join(map(str, spec['in']))} (got {value!r})")
        if isinstance(value, int | float) and not isinstance(value, bool):
            low, high = spec.get("min"), spec.get("max")
            if (low is not None and value < low) or (high is not None and value > high):
                problems.append(f"{name}: must be between {low} and {high} (got {value})")
        length = spec.get("max_length")
        if length is not None and isinstance(value, str | list | dict) and len(value) > length:
            problems.append(f"{name}: at most {length} {'characters' if isinstance(value, str) else 'items'} "
                            f"(got {len(value)})")
    return problems


Int = Annotated[int, Strict()]  # a JSON number without a fraction: never a bool or a string
Float = Annotated[float, Strict()]  # any JSON number: never a bool or a string


# --- payloads (seeds 000-004) --------------------------------------------------------------

PROMPT_MAX_CHARS = 1000  # seed 001: "Prompt too long" above 1000 characters
CHAT_MAX_CHARS = 32_000
REFERENCE_METADATA_KEYS = ("reference_image_url", "start_reference_url", "end_reference_url")


class Payload(BaseModel):
    model_config = ConfigDict(extra="allow")
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("metadata")
    @classmethod
    def reference_urls_are_text(cls, metadata: dict[str, Any]) -> dict[str, Any]:
        for key in REFERENCE_METADATA_KEYS:
            if metadata.get(key) is not None and not isinstance(metadata[key], str):
                raise ValueError(f"{key} must be a string (a URL or a storage path)")
        return metadata

    @model_validator(mode="after")
    def within_limits(self, info: ValidationInfo) -> Self:
        limits = (info.context or {}).get("limits") or {}
        if not limits:
            return self
        config = getattr(self, "config", None)
        values = {**(config.model_dump() if isinstance(config, BaseModel) else {}),
                  **{k: v for k, v in self.model_dump(exclude={"config"}).items() if v is not None}}
        if problems := check_limits(values, limits):
            raise ValueError("; ".join(problems))
        return self


class _Generation(BaseModel):
    model_config = ConfigDict(extra="allow")
    width: Int = Field(ge=256, le=1024)
    height: Int = Field(ge=256, le=1024)
    steps: Int = Field(ge=10, le=50)
    guidance_scale: Float = Field(ge=1.0, le=20.0)
    seed: Int | None = Field(default=None, ge=0, le=2**32 - 1)

    @model_validator(mode="before")
    @classmethod
    def seed_aliases(cls, data: Any) -> Any:
        return resolve_config_aliases(data) if isinstance(data, dict) else data

    @field_validator("width", "height")
    @classmethod
    def multiple_of_8(cls, v: int) -> int:
        if v % 8:
            raise ValueError("must be a multiple of 8")
        return v


class ImageConfig(_Generation):
    num_images: Literal[1, 3, 6] = 1
    negative_prompt: str | None = Field(default=None, max_length=PROMPT_MAX_CHARS)
    # Seed 002 sends these in `metadata`; the SDXL handler reads them from there too.
    reference_type: Literal["style", "composition", "character"] = "style"
    reference_strength: Float = Field(default=0.5, ge=0.1, le=1.0)


class ImagePayload(Payload):
    prompt: str = Field(min_length=1, max_length=PROMPT_MAX_CHARS)
    negative_prompt: str | None = Field(default=None, max_length=PROMPT_MAX_CHARS)
    config: ImageConfig


class VideoConfig(_Generation):
    height: Int = Field(ge=256, le=1280)
    width: Int = Field(ge=256, le=1280)
    frame_num: Int = Field(ge=1, le=121)
    fps: Int = Field(default=16, ge=6, le=30)
    enhance_prompt: Annotated[bool, Strict()] = False
    enhance_system_prompt: str | None = Field(default=None, max_length=CHAT_MAX_CHARS)
    negative_prompt: str | None = Field(default=None, max_length=PROMPT_MAX_CHARS)
    sample_solver: Literal["unipc", "dpm++"] = "unipc"
    sample_shift: Float = Field(default=5.0, ge=1.0, le=20.0)
    image: str | None = None
    first_frame: str | None = None
    last_frame: str | None = None

    @field_validator("frame_num")
    @classmethod
    def image_or_clip(cls, v: int) -> int:
        if 1 < v < 16:
            raise ValueError("is 1 for an image or 16-121 frames for a video")
        return v


class VideoPayload(Payload):
    prompt: str = Field(min_length=1, max_length=PROMPT_MAX_CHARS)
    config: VideoConfig


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=CHAT_MAX_CHARS)


class HistoryMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    sender: Literal["user", "assistant", "system", "character"]
    content: str = Field(max_length=CHAT_MAX_CHARS)


class ChatConfig(BaseModel):
    """Sampling and context of one chat job: the job type's defaults, then the payload's `config`,
    then top-level `max_tokens`/`temperature`/... (seed 003 ranges).

    `temperature` 0 means greedy decoding: deterministic, `top_p` ignored. A `seed` makes sampling
    reproducible (such a job is never batched with others). `history_limit` counts earlier messages
    kept besides the system prompt and the current message; None keeps all that fit the context.
    """

    model_config = ConfigDict(extra="allow")
    max_tokens: Int = Field(ge=1, le=2048)
    min_tokens: Int = Field(default=0, ge=0, le=2048, description="end-of-turn is suppressed before this many")
    temperature: Float = Field(ge=0.0, le=1.0)
    top_p: Float = Field(ge=0.1, le=1.0)
    seed: Int | None = Field(default=None, ge=0, le=2**32 - 1)
    history_limit: Int | None = Field(default=None, ge=0, le=500)
    system_prompt: str | None = Field(default=None, max_length=CHAT_MAX_CHARS)
    target: Literal["sdxl", "wan"] | None = None  # chat_enhance: the model the prompt is for
    system_prompts: dict[str, str] = Field(default_factory=dict)  # chat_enhance: default per target

    @model_validator(mode="after")
    def min_within_max(self) -> Self:
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) exceeds max_tokens ({self.max_tokens})")
        return self


CHAT_TOP_LEVEL_CONFIG = ("max_tokens", "min_tokens", "temperature", "top_p", "seed", "target", "history_limit")


class ChatPayload(Payload):
    """Seed 001's `messages`, or `message` + `system_prompt` + `conversation_history`, or
    roleplay `character` + `scenario` (+ history); `prompt` for chat_enhance. Top-level sampling
    fields (seed 001 sends `max_tokens` etc. next to `messages`) override the config."""

    messages: list[ChatMessage] | None = Field(default=None, max_length=200)
    message: str | None = Field(default=None, max_length=CHAT_MAX_CHARS)
    prompt: str | None = Field(default=None, max_length=CHAT_MAX_CHARS)
    system_prompt: str | None = Field(default=None, max_length=CHAT_MAX_CHARS)
    conversation_history: list[HistoryMessage] = Field(default_factory=list, max_length=500)
    character: str | dict[str, Any] | None = None
    scenario: str | None = Field(default=None, max_length=CHAT_MAX_CHARS)
    config: ChatConfig

    @model_validator(mode="before")
    @classmethod
    def sampling_overrides(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = dict(data)
            config = dict(data.get("config") or {})
            for key in CHAT_TOP_LEVEL_CONFIG:
                if data.get(key) is not None:
                    config[key] = data.pop(key)
            data["config"] = config
        return data

    @model_validator(mode="after")
    def has_input(self) -> Self:
        if not (self.messages or self.message or self.prompt):
            raise ValueError("one of messages, message or prompt is required")
        if self.messages and all(m.role == "system" for m in self.messages):
            raise ValueError("messages has no user or assistant message")
        return self


class SimulateConfig(BaseModel):
    model_config = ConfigDict(extra="allow")
    steps: Int = Field(ge=1, le=10_000)
    step_seconds: Float = Field(ge=0, le=60)
    fail_code: ErrorCode | None = None
    fail_attempts: Int = Field(default=0, ge=0, description="fail this many attempts, then succeed")


class SimulatePayload(Payload):
    prompt: str = Field(default="", max_length=PROMPT_MAX_CHARS)
    config: SimulateConfig



def classify(exc: BaseException) -> JobError:
    """Map what a handler raised to a job error with a code a frontend can show."""
    if isinstance(exc, JobError):
        return exc
    if isinstance(exc, ValidationError):
        return invalid_input(exc)
    detail = f"{type(exc).__name__}: {exc}"[:2000]
    if isinstance(exc, MemoryError) or _is_torch_oom(exc):
        return JobError(ErrorCode.OOM_ERROR, detail)
    from worker.storage import StorageError

    if isinstance(exc, StorageError):
        return JobError(ErrorCode.STORAGE_ERROR, detail, retryable=exc.retryable)
    if isinstance(exc, TimeoutError):
        return JobError(ErrorCode.TIMEOUT_ERROR, detail)
    if isinstance(exc, ConnectionError):
        return JobError(ErrorCode.NETWORK_ERROR, detail)
    return JobError(ErrorCode.GENERATION_FAILED, detail)


def _is_torch_oom(exc: BaseException) -> bool:
    import sys

    torch = sys.modules.get("torch")  # only if a handler already imported it
    oom = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None) if torch else None
    return bool(oom and isinstance(exc, oom))
