"""Chat with a Qwen Instruct model via transformers: conversation, roleplay, prompt enhancement and
generic generation (seeds 000, 001, 003).

The worker is a pure inference engine (seed 001): a system prompt in the payload is used exactly;
without one, the job type's default from `job_types` applies. Nothing here imports torch or
transformers until `load()`, so building the handler at worker start-up is free.

Flow of a batch: each job's payload becomes a `Request` (token ids of its chat, its length limits,
its sampling); requests with identical sampling are generated together as one left-padded batch by
`ChatModel.generate_many`; a stopping criterion watches every row for its end of turn, its own
`max_tokens`, and its job's cancel flag, and streams each row's partial reply to its row.

On a GPU the criterion decides on the device and the host reads the tokens back only at the first
token and once per stream interval, not at every token (each read waits for the GPU); generation runs
on a high-priority CUDA stream of the model's own, so its kernels and reads never queue behind a
video's work on the default stream of another job thread.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worker.config import Settings
from worker.faults import is_oom_error
from worker.handlers.base import JobCanceled, JobContext, JobInterrupted
from worker.jobs import ChatConfig, ChatPayload, ErrorCode, HistoryMessage, Job, JobError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

ENHANCE_TARGETS = ("sdxl", "wan")

# Seed 003's roleplay prompt, used only when the job type's defaults carry no `system_prompt`.
# A job type default may use the same {character} / {scenario} placeholders.
ROLEPLAY_FALLBACK_PROMPT = (
    "You are roleplaying as {character} in the scenario: {scenario}.\n"
    "Stay in character at all times. Respond naturally and engagingly.\n"
    "Be descriptive and immersive in your responses.\n"
    "Keep responses concise but engaging."
)

MODES = {
    "chat_conversation": "conversation",
    "chat_unrestricted": "conversation",  # retired by seed 001; an alias
    "chat_roleplay": "roleplay",
    "chat_enhance": "enhance",
    "chat_generate": "generate",
}

HISTORY_ROLES = {"user": "user", "assistant": "assistant", "character": "assistant", "system": "system"}

Message = dict[str, str]


# --- requests and results --------------------------------------------------------------


@dataclass(frozen=True)
class Sampling:
    """What must be identical for requests to share a batch without changing their results."""

    do_sample: bool
    temperature: float
    top_p: float
    min_new_tokens: int = 0
    seed: int | None = None

    @classmethod
    def from_config(cls, config: ChatConfig) -> Sampling:
        if config.temperature == 0:  # greedy: temperature and top_p play no part
            return cls(False, 1.0, 1.0, config.min_tokens, config.seed)
        return cls(True, config.temperature, config.top_p, config.min_tokens, config.seed)

    def generate_kwargs(self) -> dict[str, Any]:
        """Every sampling knob, explicitly: a checkpoint's generation_config (Qwen: top_k 20,
        repetition penalty 1.05) must not change what a job asked for."""
        kwargs: dict[str, Any] = {
            "do_sample": self.do_sample, "temperature": self.temperature, "top_p": self.top_p,
            "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "num_beams": 1, "num_return_sequences": 1,
            "min_new_tokens": self.min_new_tokens,
        }
        if self.do_sample:  # greedy ignores them (and transformers warns when they are set)
            kwargs |= {"top_k": 0, "typical_p": 1.0}
        return kwargs


@dataclass
class Request:
    """One sequence to generate."""

    prompt_ids: list[int]
    max_new_tokens: int
    sampling: Sampling
    ctx: JobContext | None = None


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    finish_reason: str  # stop (end of turn) | length (max_tokens)
    prompt_tokens: int
    generate_seconds: float
    first_token_seconds: float | None
    batch_size: int

    @property
    def usage(self) -> dict[str, int]:
        completion = len(self.token_ids)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}


# --- the model -------------------------------------------------------------------------


def resolve_device(device: str) -> torch.device:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class ChatModel:
    """A loaded chat model and tokenizer; the bundle other handlers (WAN enhancement) reuse."""

    def __init__(self, model: Any, tokenizer: Any, *, source: str, context_tokens: int,
                 load_seconds: float = 0.0, static_cache: bool = False, compile: bool = True) -> None:
        from transformers import GenerationConfig

        self.model = model
        self.tokenizer = tokenizer
        self.source = source
        self.name = Path(source).name if Path(source).exists() else source.rsplit("/", 1)[-1]
        self.load_seconds = load_seconds
        self.static_cache = static_cache
        self.compile = compile
        self.lock = threading.Lock()  # one generate at a time on this model
        self._stream: Any = None  # its CUDA stream, made on the first generate on a GPU

        checkpoint = model.generation_config
        eos = checkpoint.eos_token_id if checkpoint.eos_token_id is not None else []
        eos_ids = [eos] if isinstance(eos, int) else list(eos)
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos_ids:
            eos_ids.append(tokenizer.eos_token_id)
        if not eos_ids:
            raise ValueError(f"{source}: neither the generation config nor the tokenizer names an end token")
        self.eos_ids: list[int] = eos_ids
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else checkpoint.pad_token_id
        self.pad_id: int = pad if pad is not None else eos_ids[0]
        # Only token ids survive from the checkpoint's generation defaults; sampling comes from jobs.
        model.generation_config = GenerationConfig(
            bos_token_id=checkpoint.bos_token_id, eos_token_id=self.eos_ids, pad_token_id=self.pad_id
        )
        max_positions = getattr(model.config, "max_position_embeddings", None) or context_tokens
        self.context_tokens = min(context_tokens, max_positions)
        self._sanitize = "sanitize_control_tokens" in inspect.signature(tokenizer.apply_chat_template).parameters
        self._control_tokens = [t for t in tokenizer.all_special_tokens if t]

    @classmethod
    def load(cls, source: str, *, device: str = "auto", context_tokens: int = 8192,
             static_cache: bool = False, compile: bool = True) -> ChatModel:
        """`from_pretrained` a hub id or a local folder: bf16 on GPU, fp32 on CPU."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        started = time.perf_counter()
        target = resolve_device(device)
        dtype = torch.bfloat16 if target.type == "cuda" else torch.float32
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, device_map=str(target) if target.type == "cuda" else None
        )
        if target.type != "cuda":  # on CUDA, device_map already put the weights there
            model.to(target)
        model.eval()
        return cls(model, tokenizer, source=source, context_tokens=context_tokens,
                   load_seconds=time.perf_counter() - started, static_cache=static_cache, compile=compile)

    @property
    def info(self) -> dict[str, Any]:
        return {"model_name": self.name, "model_source": self.source, "model_loaded": True,
                "architecture": "pure_inference_engine", "device": str(self.model.device),
                "dtype": str(self.model.dtype).removeprefix("torch.")}

    # -- prompts ------------------------------------------------------------------------

    def encode(self, messages: Sequence[Message]) -> list[int]:
        """Token ids of the chat, ready for the assistant's turn. Chat-control tokens inside the
        messages are encoded as plain text, so message content cannot open or close a role."""
        if self._sanitize:
            ids = self.tokenizer.apply_chat_template(
                list(messages), add_generation_prompt=True, tokenize=True, return_dict=False,
                sanitize_control_tokens=True,
            )
        else:  # transformers < 5: break the control tokens up instead
            safe = [{**m, "content": neutralize_control_tokens(m["content"], self._control_tokens)} for m in messages]
            ids = self.tokenizer.apply_chat_template(safe, add_generation_prompt=True, tokenize=True)
            ids = ids["input_ids"] if isinstance(ids, Mapping) else ids
        return list(ids)

    def fit(self, system: str | None, history: Sequence[Message], current: Sequence[Message],
            max_new_tokens: int) -> tuple[list[int], list[Message], int]:
        """The most recent history that fits the context with the reply; never drops the system
        prompt or the current message. Returns (ids, messages used, history messages dropped)."""
        head = [{"role": "system", "content": system}] if system is not None else []
        budget = self.context_tokens - max_new_tokens

        def build(keep: int) -> tuple[list[int], list[Message]]:
            messages = [*head, *(history[len(history) - keep:] if keep else []), *current]
            return self.encode(messages), messages

        ids, messages = build(len(history))
        if len(ids) <= budget:
            return ids, messages, 0
        low, high = 0, len(history) - 1  # binary search on how many recent messages to keep
        best: tuple[list[int], list[Message]] | None = None
        best_keep = -1
        while low <= high:
            keep = (low + high) // 2
            ids, messages = build(keep)
            if len(ids) <= budget:
                best, best_keep, low = (ids, messages), keep, keep + 1
            else:
                high = keep - 1
        if best is None:
            ids, _ = build(0)
            raise JobError(ErrorCode.INVALID_INPUT,
                           f"the prompt is {len(ids)} tokens without history; with max_tokens {max_new_tokens} "
                           f"the context allows {budget}")
        return best[0], best[1], len(history) - best_keep

    def decode(self, token_ids: Sequence[int]) -> str:
        """Reply text as a row can hold it: Postgres text and jsonb refuse NUL, which byte-level
        tokenizers can produce."""
        return str(self.tokenizer.decode(list(token_ids), skip_special_tokens=True)).replace("\x00", "\ufffd")

    # -- generation ---------------------------------------------------------------------

    def generate_many(self, requests: Sequence[Request], *, max_batch_size: int = 8,
                      stream_interval: float = 0.5) -> list[Generation | BaseException]:
        """Generate every request: those with identical sampling together, in batches of up to
        `max_batch_size`. One Generation or exception per request, in order; a failed batch fails
        only its own requests."""
        results: list[Generation | BaseException | None] = [None] * len(requests)
        groups: dict[Any, list[int]] = {}
        for index, request in enumerate(requests):
            # A seeded request reproduces only alone: its random stream must not be shared.
            key = (request.sampling, index) if request.sampling.seed is not None else request.sampling
            groups.setdefault(key, []).append(index)
        for indexes in groups.values():
            for start in range(0, len(indexes), max_batch_size):
                chunk = indexes[start:start + max_batch_size]
                try:
                    outputs = self.generate([requests[i] for i in chunk], stream_interval=stream_interval)
                except Exception as err:
                    outputs = [err] * len(chunk)
                for i, output in zip(chunk, outputs, strict=True):
                    results[i] = output
        return [r if r is not None else JobError(ErrorCode.GENERATION_FAILED, "not generated") for r in results]

    def generate(self, requests: Sequence[Request], *,
                 stream_interval: float = 0.5) -> list[Generation | BaseException]:
        """One left-padded batch of requests that share their sampling."""
        if len({r.sampling for r in requests}) > 1:
            raise ValueError("a batch must share its sampling parameters")
        results: list[Generation | BaseException | None] = [None] * len(requests)
        live = []
        for index, request in enumerate(requests):
            if request.ctx is not None and request.ctx.cancelled:
                results[index] = _interruption(request.ctx)
            else:
                live.append(index)
        if live:
            outputs = self._generate_splitting([requests[i] for i in live], stream_interval)
            for index, output in zip(live, outputs, strict=True):
                results[index] = output
        return [r for r in results if r is not None]

    def _generate_splitting(self, requests: Sequence[Request],
                            stream_interval: float) -> list[Generation | BaseException]:
        """Out of GPU memory with a batch: try each half on its own, once the failed batch is freed."""
        try:
            return self._generate(requests, stream_interval)
        except Exception as err:
            if len(requests) < 2 or not _is_oom(err):
                raise
            log.warning("out of memory with a batch of %d; splitting", len(requests))
        # Retried only here, after the except block: its exception's traceback holds the failed generate's
        # frames and so its KV cache, which would otherwise stay allocated under both halves.
        _release_memory()
        half = len(requests) // 2
        return [*self._generate_splitting(requests[:half], stream_interval),
                *self._generate_splitting(requests[half:], stream_interval)]

    def _generate(self, requests: Sequence[Request], stream_interval: float) -> list[Generation | BaseException]:
        import torch
        from transformers import StoppingCriteriaList

        width = max(len(r.prompt_ids) for r in requests)
        input_ids = torch.full((len(requests), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(requests), width), dtype=torch.long)
        for row, request in enumerate(requests):  # left padding: every row's next token is at the end
            input_ids[row, width - len(request.prompt_ids):] = torch.tensor(request.prompt_ids)
            attention_mask[row, width - len(request.prompt_ids):] = 1
        device = self.model.device
        rows = _Rows(self, requests)
        sampling = requests[0].sampling
        extra: dict[str, Any] = {}
        if self.static_cache:
            extra = {"cache_implementation": "static", "disable_compile": not self.compile}
        rows.sync_every = stream_interval
        with self.lock, torch.inference_mode(), self.on_stream(), _Streamer(rows, stream_interval):
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            rows.started = time.perf_counter()
            sequences = self.model.generate(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                max_new_tokens=max(r.max_new_tokens for r in requests),
                eos_token_id=self.eos_ids, pad_token_id=self.pad_id,
                stopping_criteria=StoppingCriteriaList([rows]),
                **sampling.generate_kwargs(), **extra,
            )
            rows.read(sequences)  # the last read: every row's whole reply
            elapsed = time.perf_counter() - rows.started
        return [rows.outcome(row, elapsed) for row in range(len(requests))]

    @contextlib.contextmanager
    def on_stream(self) -> Iterator[None]:
        """Run the block on the model's own high-priority CUDA stream; on CPU, nothing."""
        import torch

        device = self.model.device
        if device.type != "cuda":
            yield
            return
        if self._stream is None:
            self._stream = torch.cuda.Stream(device, priority=-1)
        caller = torch.cuda.current_stream(device)
        self._stream.wait_stream(caller)  # the weights and inputs the caller's stream wrote come first
        with torch.cuda.stream(self._stream):
            yield
        caller.wait_stream(self._stream)


class _Rows:
    """Stopping criterion of one batch: per row, its end of turn, its own max_tokens and its job's
    cancellation, decided on the device after every token. The host reads the tokens back (`tokens`,
    `finish`: what the streamer shows) at the first token, then once per `sync_every` seconds."""

    def __init__(self, model: ChatModel, requests: Sequence[Request]) -> None:
        self.model = model
        self.requests = requests
        self.eos = set(model.eos_ids)
        self.width = max((len(r.prompt_ids) for r in requests), default=0)  # generate's left-padded prompt
        self.tokens: list[list[int]] = [[] for _ in requests]
        self.finish: list[str | None] = [None] * len(requests)
        self.first_token: list[float | None] = [None] * len(requests)
        self.started = time.perf_counter()
        self.sync_every = 0.0
        self.reads = 0
        self._last_read: float | None = None
        self._device: Any = None  # eos ids, each row's max_tokens and cancel flags, on the model's device

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        import torch

        device = input_ids.device
        if self._device is None:
            self._device = (torch.tensor(sorted(self.eos), device=device),
                            torch.tensor([r.max_new_tokens for r in self.requests], device=device),
                            torch.zeros(len(self.requests), dtype=torch.bool, device=device))
        eos, limits, canceled = self._device
        for row, request in enumerate(self.requests):
            if self.finish[row] is None and request.ctx is not None and request.ctx.cancelled:
                self.finish[row] = "interrupted"
                canceled[row] = True
        now = time.perf_counter()
        if self._last_read is None or now - self._last_read >= self.sync_every:
            self.read(input_ids)
            self._last_read = now
        generated = input_ids.shape[1] - self.width
        return torch.isin(input_ids[:, -1], eos) | (limits <= generated) | canceled

    def read(self, sequences: torch.Tensor) -> None:
        """Bring the rows' tokens to the host (waits for the device): each row up to its end of turn or
        its max_tokens; after that the batch pads it."""
        generated = sequences[:, self.width:].tolist()
        now = time.perf_counter()
        self.reads += 1
        for row, request in enumerate(self.requests):
            if self.first_token[row] is None and generated[row]:
                self.first_token[row] = now - self.started
            if self.finish[row] == "interrupted":
                continue
            tokens: list[int] = []
            finish: str | None = None
            for token in generated[row]:
                if token in self.eos:
                    finish = "stop"
                    break
                tokens.append(token)
                if len(tokens) >= request.max_new_tokens:
                    finish = "length"
                    break
            self.tokens[row], self.finish[row] = tokens, finish

    def outcome(self, row: int, elapsed: float) -> Generation | BaseException:
        request = self.requests[row]
        finish = self.finish[row] or "length"
        if finish == "interrupted" or (request.ctx is not None and request.ctx.cancelled):
            return _interruption(request.ctx)
        return Generation(
            text=self.model.decode(self.tokens[row]),
            token_ids=self.tokens[row], finish_reason=finish, prompt_tokens=len(request.prompt_ids),
            generate_seconds=elapsed, first_token_seconds=self.first_token[row], batch_size=len(self.requests),
        )


class _Streamer:
    """Writes each row's partial reply to its job from a thread of its own, so the database round
    trip never stalls decoding: a row's first tokens at once, then at most one write per interval;
    in a batch, a row that is done shows its whole reply while the others go on."""

    def __init__(self, rows: _Rows, interval: float) -> None:
        self.rows = rows
        self.interval = interval
        self.tick = min(interval, 0.05) if interval > 0 else 0.01
        count = len(rows.requests)
        self.sent = [0] * count
        self.last: list[float | None] = [None] * count
        self.closed = [r.ctx is None for r in rows.requests]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chat-stream", daemon=True)

    def __enter__(self) -> _Streamer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.tick):
            for row in range(len(self.closed)):
                if self.closed[row]:
                    continue
                try:
                    self._push(row)
                except Exception:  # a lost partial is not worth a failed job
                    log.exception("streaming the partial reply of row %d failed", row)

    def _push(self, row: int) -> None:
        rows, request = self.rows, self.rows.requests[row]
        assert request.ctx is not None
        finish = rows.finish[row]
        tokens = rows.tokens[row][:]  # the decoding thread appends; a copy is a consistent prefix
        now = time.monotonic()
        if finish is not None:
            self.closed[row] = True
            if finish == "interrupted" or len(rows.requests) == 1:
                return  # the result (or the cancellation) follows at once
            fraction, stage = 1.0, "generated"
        elif len(tokens) == self.sent[row] or (self.last[row] is not None and now - self.last[row] < self.interval):
            return
        else:
            fraction, stage = min(len(tokens) / request.max_new_tokens, 0.99), "generating"
        self.sent[row], self.last[row] = len(tokens), now
        text = rows.model.decode(tokens)
        # Interrupted: ctx.cancelled is set, and the stopping criterion ends the row at its next token.
        with contextlib.suppress(JobInterrupted):
            request.ctx.progress(fraction, stage, partial={"partial_response": text, "tokens": len(tokens)})


def _interruption(ctx: JobContext | None) -> BaseException:
    try:
        if ctx is not None:
            ctx.check()
    except JobInterrupted as exc:
        return exc
    return JobCanceled("generation stopped")


def _is_oom(err: BaseException) -> bool:
    return is_oom_error(err)


def _release_memory() -> None:
    import gc

    import torch

    gc.collect()  # a failed generate's frames can sit in reference cycles
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def neutralize_control_tokens(text: str, control_tokens: Sequence[str]) -> str:
    """Break control tokens in untrusted text with a zero-width joiner, so they tokenize as text."""
    for token in control_tokens:
        if len(token) > 1 and token in text:
            text = text.replace(token, token[0] + "\u200d" + token[1:])
    return text


# --- building the chat of a job -------------------------------------------------------


@dataclass
class Prepared:
    """A job's chat, ready to generate."""

    request: Request
    messages: list[Message]
    system_prompt: str | None
    system_prompt_source: str  # payload | job_type | model_template
    history_dropped: int
    mode: str
    extra: dict[str, Any] = field(default_factory=dict)


def provided_system_prompt(payload: Mapping[str, Any], parsed: ChatPayload) -> str | None:
    """The system prompt the caller sent (top level or in `config`), if any: used exactly."""
    if parsed.system_prompt is not None:
        return parsed.system_prompt
    config = payload.get("config")
    if isinstance(config, Mapping) and isinstance(config.get("system_prompt"), str):
        return config["system_prompt"]
    return None


def character_text(character: str | Mapping[str, Any] | None) -> str:
    if character is None:
        return ""
    if isinstance(character, str):
        return character
    name = str(character.get("name") or "the character")
    details = "; ".join(f"{k}: {v}" for k, v in character.items() if k != "name" and v not in (None, "", [], {}))
    return f"{name} ({details})" if details else name


def enhance_system_prompt(target: str, system_prompts: Mapping[str, str] | None,
                          system_prompt: str | None = None) -> str:
    """The provided system prompt, else the per-target default (job type data)."""
    if system_prompt is not None:
        return system_prompt
    if target not in ENHANCE_TARGETS:
        raise JobError(ErrorCode.INVALID_INPUT, f"target must be one of {', '.join(ENHANCE_TARGETS)}, not {target!r}")
    chosen = (system_prompts or {}).get(target)
    if not chosen:
        raise JobError(ErrorCode.INVALID_INPUT, f"no system prompt for target {target!r}: send system_prompt")
    return chosen


def clean_enhanced(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text


def prepare(model: ChatModel, job: Job) -> Prepared:
    """Validate a job and build its chat: INVALID_INPUT when the payload cannot be served."""
    parsed = job.parse(ChatPayload)
    config = parsed.config
    defaults = job.type_info.defaults if job.type_info else {}
    mode = str(job.config.get("mode") or MODES.get(str(job.config.get("alias_of") or job.job_type), "conversation"))
    given = provided_system_prompt(job.payload, parsed)
    extra: dict[str, Any] = {}

    if parsed.messages:
        messages = [m.model_dump() for m in parsed.messages]
        if messages[0]["role"] == "system":
            given, messages = messages[0]["content"], messages[1:]
        history, current = messages[:-1], messages[-1:]
    else:
        text = parsed.message if parsed.message else parsed.prompt
        assert text is not None  # the payload model requires one of them
        history = [] if mode == "enhance" else _history(parsed.conversation_history)
        current = [{"role": "user", "content": text}]

    if given is not None:
        system, source = given, "payload"
    elif mode == "enhance":
        target = config.target or "sdxl"
        system, source = enhance_system_prompt(target, config.system_prompts), "job_type"
    elif mode == "roleplay":
        if parsed.character is None:
            raise JobError(ErrorCode.INVALID_INPUT, "roleplay needs a character (or a system_prompt)")
        template = defaults.get("system_prompt") or ROLEPLAY_FALLBACK_PROMPT
        system = (template.replace("{character}", character_text(parsed.character))
                  .replace("{scenario}", parsed.scenario or "an open-ended conversation"))
        source = "job_type"
    elif defaults.get("system_prompt"):
        system, source = str(defaults["system_prompt"]), "job_type"
    else:
        system, source = None, "model_template"

    if mode == "enhance":
        extra = {"original_prompt": current[-1]["content"], "target": config.target or "sdxl"}
    if config.history_limit is not None and len(history) > config.history_limit:
        dropped_by_limit = len(history) - config.history_limit
        history = history[dropped_by_limit:]
    else:
        dropped_by_limit = 0
    ids, used, dropped = model.fit(system, history, current, config.max_tokens)
    request = Request(ids, config.max_tokens, Sampling.from_config(config))
    return Prepared(request, used, system, source, dropped_by_limit + dropped, mode, extra)


def _history(history: Sequence[HistoryMessage]) -> list[Message]:
    return [{"role": HISTORY_ROLES[m.sender], "content": m.content} for m in history]


def enhance_prompt(model: ChatModel, prompt: str, target: str, *, system_prompts: Mapping[str, str] | None = None,
                   system_prompt: str | None = None, max_tokens: int = 200, temperature: float = 0.7,
                   top_p: float = 0.9, seed: int | None = None, ctx: JobContext | None = None,
                   stream_interval: float = 0.5) -> dict[str, Any]:
    """Turn a short image/video prompt into a detailed one for `target` (sdxl | wan).

    `system_prompts` maps targets to their default system prompts (the `system_prompts` of the
    chat_enhance job type); `system_prompt` overrides them. Serves chat_enhance and the WAN
    `*_enhanced` job types. Raises JobError(INVALID_INPUT) for bad input, JobCanceled when `ctx`
    is canceled.
    """
    if not prompt.strip():
        raise JobError(ErrorCode.INVALID_INPUT, "prompt is empty")
    config = ChatConfig(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    system = enhance_system_prompt(target, system_prompts, system_prompt)
    ids, used, _ = model.fit(system, [], [{"role": "user", "content": prompt}], max_tokens)
    output = model.generate_many([Request(ids, max_tokens, Sampling.from_config(config), ctx)],
                                 stream_interval=stream_interval)[0]
    if isinstance(output, BaseException):
        raise output
    return {"enhanced_prompt": clean_enhanced(output.text), "original_prompt": prompt, "target": target,
            "system_prompt_used": system, "finish_reason": output.finish_reason, "usage": output.usage,
            "generate_seconds": round(output.generate_seconds, 4), "messages_used": used}


# --- the handler -----------------------------------------------------------------------


class ChatHandler:
    """Handler `chat`: every chat job type. Batches compatible jobs (see `max_batch_size`)."""

    uses_storage = False  # replies go in the row: a storage fault never stops chat

    def __init__(self, settings: Settings | None = None, *, model: str | None = None, device: str | None = None,
                 max_batch_size: int | None = None, context_tokens: int | None = None) -> None:
        self.settings = settings or Settings()
        self.source = str(model or self.settings.chat_model)
        self.device = device or self.settings.chat_device
        self.max_batch_size = max_batch_size or self.settings.chat_max_batch_size
        self.context_tokens = context_tokens or self.settings.chat_context_tokens
        self.model: ChatModel | None = None
        self._unreported_load = 0.0  # load time, reported in the timings of the first jobs after it
        self._load_lock = threading.Lock()

    def load(self) -> None:
        with self._load_lock:  # the worker and a peer handler (WAN enhancement) may both ask
            if self.model is not None:
                return
            self.model = ChatModel.load(self.source, device=self.device, context_tokens=self.context_tokens,
                                        static_cache=self.settings.chat_static_cache)
        self._unreported_load = self.model.load_seconds
        log.info("chat model %s loaded on %s in %.1fs", self.source, self.model.info["device"],
                 self.model.load_seconds)

    @property
    def model_key(self) -> str:
        """The model this handler serves, as the memory manager and the workers row name it."""
        return self.source

    def modules(self) -> list[Any]:
        """The torch modules holding the weights: the memory manager measures them and checks they are freed."""
        model = self.model
        return [model.model] if model is not None else []

    def unload(self) -> None:
        """Drop the model (the memory manager evicts it); the next job, or a WAN enhancement, loads it again."""
        with self._load_lock:
            self.model = None

    def prepare(self, job: Job, ctx: JobContext) -> None:
        """Validate the payload before the model loads: an invalid chat job never loads (or downloads) it."""
        job.parse(ChatPayload)

    def run(self, job: Job, ctx: JobContext) -> dict[str, Any]:
        value = self.run_batch([job], [ctx])[0]
        if isinstance(value, BaseException):
            raise value
        return value

    def run_batch(self, jobs: Sequence[Job], ctxs: Sequence[JobContext]) -> list[dict[str, Any] | BaseException]:
        self.load()
        model = self.model
        assert model is not None
        started = time.perf_counter()
        load_seconds, self._unreported_load = self._unreported_load, 0.0
        results: list[dict[str, Any] | BaseException | None] = [None] * len(jobs)
        prepared: dict[int, Prepared] = {}
        for index, (job, ctx) in enumerate(zip(jobs, ctxs, strict=True)):
            try:
                prepared[index] = prepare(model, job)
                prepared[index].request.ctx = ctx
            except Exception as err:  # this job's input: the others still run
                results[index] = err
        order = list(prepared)
        outputs = model.generate_many([prepared[i].request for i in order], max_batch_size=self.max_batch_size,
                                      stream_interval=self.settings.progress_interval)
        for index, output in zip(order, outputs, strict=True):
            if isinstance(output, BaseException):
                results[index] = output
            else:
                results[index] = self._result(jobs[index], prepared[index], output, model, load_seconds,
                                              time.perf_counter() - started)
        return [r if r is not None else JobError(ErrorCode.GENERATION_FAILED, "no result") for r in results]

    def _result(self, job: Job, prep: Prepared, out: Generation, model: ChatModel, load_seconds: float,
                processing: float) -> dict[str, Any]:
        queue_wait = (job.started_at - job.run_at).total_seconds() if job.started_at else None
        result: dict[str, Any] = {
            "response": out.text,
            "finish_reason": out.finish_reason,
            "usage": out.usage,
            "timings": {
                "queue_wait": round(max(0.0, queue_wait), 4) if queue_wait is not None else None,
                "load": round(load_seconds, 4),
                "generate": round(out.generate_seconds, 4),
                "first_token": round(out.first_token_seconds, 4) if out.first_token_seconds is not None else None,
            },
            "tokens_per_second": round(len(out.token_ids) / out.generate_seconds, 2) if out.generate_seconds else None,
            "model_info": model.info,
            "system_prompt_used": prep.system_prompt,
            "system_prompt_source": prep.system_prompt_source,
            "messages_used": prep.messages,
            "history_dropped": prep.history_dropped,
            "batch_size": out.batch_size,
            "processing_time": round(processing, 4),
        }
        if prep.mode == "enhance":
            result = {"enhanced_prompt": clean_enhanced(out.text), **prep.extra, **result}
        return result

