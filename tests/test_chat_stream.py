"""Chat beside a video (issue 13, finding 3): the model's own CUDA stream is a no-op on CPU, and the host
reads the tokens back at the first token and once per stream interval instead of at every token, while
the partial replies still stream to the row. Tiny Qwen on CPU."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import torch

from worker.handlers.base import JobContext
from worker.handlers.chat import ChatModel, Generation, Request, Sampling
from worker.jobs import Job
from worker.storage import LocalStorage
from worker.tiny_models import build_tiny_qwen


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> ChatModel:
    return ChatModel.load(str(build_tiny_qwen(tmp_path_factory.mktemp("models") / "tiny-qwen2")), device="cpu")


class Writes:
    def __init__(self) -> None:
        self.partials: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def __call__(self, progress: int, stage: str | None, partial: dict[str, Any] | None) -> bool:
        if partial:
            with self.lock:
                self.partials.append(partial)
        return False


def request(model: ChatModel, tmp_path: Path, writes: Writes, tokens: int = 40, least: int | None = None) -> Request:
    """Greedy, with the end of turn suppressed before `least` (default: all `tokens`) tokens."""
    now = datetime.now(UTC)
    job = Job(id=uuid.uuid4(), user_id=None, job_type="chat_conversation", queue="chat", payload={}, priority=0,
              attempts=1, max_attempts=1, created_at=now, run_at=now)
    ids = model.encode([{"role": "user", "content": "Tell me a story"}])
    greedy = Sampling(False, 1.0, 1.0, min_new_tokens=tokens if least is None else least)
    return Request(ids, tokens, greedy, JobContext(job, LocalStorage(tmp_path), writes, 0.0))


def generate(model: ChatModel, requests: list[Request], interval: float) -> tuple[list[Generation], list[int]]:
    reads: list[int] = []
    from worker.handlers import chat

    original = chat._Rows.read

    def counting(rows: Any, sequences: torch.Tensor) -> None:
        original(rows, sequences)
        reads.append(rows.reads)

    chat._Rows.read = counting  # type: ignore[method-assign]
    try:
        outputs = model.generate(requests, stream_interval=interval)
    finally:
        chat._Rows.read = original  # type: ignore[method-assign]
    assert all(isinstance(o, Generation) for o in outputs), outputs
    return outputs, reads  # type: ignore[return-value]


def test_the_stream_context_is_a_no_op_on_cpu(model: ChatModel, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    def no_cuda(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("CUDA touched on CPU")

    monkeypatch.setattr(torch.cuda, "Stream", no_cuda)
    monkeypatch.setattr(torch.cuda, "stream", no_cuda)
    monkeypatch.setattr(torch.cuda, "current_stream", no_cuda)
    with model.on_stream():
        pass
    [out], _ = generate(model, [request(model, tmp_path, Writes(), tokens=5)], 0.0)
    assert len(out.token_ids) == 5 and model._stream is None


def test_tokens_are_read_back_once_per_interval_with_the_same_reply(model: ChatModel, tmp_path: Path) -> None:
    every, reads_every = generate(model, [request(model, tmp_path, Writes())], 0.0)
    rarely, reads_rarely = generate(model, [request(model, tmp_path, Writes())], 3600.0)
    assert rarely[0].token_ids == every[0].token_ids and len(rarely[0].token_ids) == 40
    assert rarely[0].first_token_seconds is not None and rarely[0].finish_reason == "length"
    assert len(reads_every) >= 40  # interval 0: at every token, as before
    assert len(reads_rarely) == 2  # the first token, and the whole reply at the end


def test_partial_replies_still_stream_in_a_batch(model: ChatModel, tmp_path: Path) -> None:
    writes = [Writes(), Writes()]
    batch = [request(model, tmp_path, writes[0], 30), request(model, tmp_path, writes[1], 10, least=30)]
    outputs, _ = generate(model, batch, 0.0)
    assert [len(o.token_ids) for o in outputs] == [30, 10]
    for out, seen in zip(outputs, writes, strict=True):
        counts = [p["tokens"] for p in seen.partials]
        assert counts and counts == sorted(counts) and counts[0] > 0, counts
        assert all(model.decode(out.token_ids).startswith(p["partial_response"].rstrip("\ufffd"))
                   for p in seen.partials)
    assert writes[1].partials[-1]["tokens"] == 10  # the short row done in a batch shows its whole reply
