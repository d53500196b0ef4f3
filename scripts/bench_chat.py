"""Chat benchmark: single-stream decode tokens/s, batched throughput, and the worker's overhead per
job (job wall time in the row − the handler's generate time). Prints figures; gates nothing.

    # CPU, the tiny model built offline, with the worker overhead (embedded Postgres in a temp dir):
    python scripts/bench_chat.py --tiny --device cpu --worker-jobs 20
    # a real checkpoint (hub id or folder):
    python scripts/bench_chat.py --model Qwen/Qwen2.5-7B-Instruct --device cuda
    # GPU, nothing downloaded: Qwen2.5-7B's architecture with random weights, bf16
    python scripts/bench_chat.py --from-config configs/qwen2.5-7b-instruct/config.json --device cuda
    python scripts/bench_chat.py --from-config configs/qwen2.5-7b-instruct/config.json --device cuda \\
        --static-cache --compile --batch-sizes 1,4,8,16

Every generation is greedy with min_new_tokens = max_new_tokens, so each run decodes exactly
--new-tokens tokens however random the weights. `--from-config` uses the tiny tokenizer (its ids are
valid in any larger vocabulary); only speed is measured there.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # --model may still name a cached hub id

from worker.handlers.chat import ChatModel, Request, Sampling, resolve_device
from worker.tiny_models import build_tiny_qwen

FILLER = "The camera slowly pans across a rainy city street while neon signs reflect in the puddles. "


def load_model(args: argparse.Namespace) -> ChatModel:
    tiny = build_tiny_qwen(args.models_dir / "tiny-qwen2")
    if args.from_config:
        return random_model(args, tiny)
    source = str(tiny) if args.tiny else args.model
    return ChatModel.load(source, device=args.device, context_tokens=args.context_tokens,
                          static_cache=args.static_cache, compile=args.compile)


def random_model(args: argparse.Namespace, tokenizer_dir: Path) -> ChatModel:
    """The architecture of a config JSON with random weights, built directly on the device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    spec = json.loads(Path(args.from_config).read_text())
    for item in args.set or []:
        key, _, value = item.partition("=")
        spec[key] = json.loads(value)
    config = AutoConfig.for_model(**spec)
    device = resolve_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=args.attn).eval()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return ChatModel(model, tokenizer, source=f"random:{Path(args.from_config).stem}",
                     context_tokens=args.context_tokens, load_seconds=time.perf_counter() - started,
                     static_cache=args.static_cache, compile=args.compile)


def prompt_ids(model: ChatModel, tokens: int) -> list[int]:
    text = FILLER
    while len(model.encode([{"role": "user", "content": text}])) < tokens:
        text += FILLER
    return model.encode([{"role": "user", "content": text}])


def timed(model: ChatModel, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
    """(seconds, seconds to the first token) for one batch decoding exactly new_tokens per row."""
    greedy = Sampling(do_sample=False, temperature=1.0, top_p=1.0, min_new_tokens=new_tokens)
    outputs = model.generate([Request(ids, new_tokens, greedy) for ids in prompts], stream_interval=3600)
    for output in outputs:
        if isinstance(output, BaseException):
            raise output
        assert len(output.token_ids) == new_tokens, len(output.token_ids)
    first = outputs[0]
    assert not isinstance(first, BaseException)
    return first.generate_seconds, first.first_token_seconds or 0.0


def bench_generate(model: ChatModel, args: argparse.Namespace) -> dict[str, Any]:
    ids = prompt_ids(model, args.prompt_tokens)
    for _ in range(args.warmup):
        for size in args.batch_sizes:
            timed(model, [ids] * size, args.new_tokens)
    n = args.new_tokens
    single = [timed(model, [ids], n) for _ in range(args.runs)]
    figures: dict[str, Any] = {
        "prompt_tokens": len(ids),
        "new_tokens": n,
        "single_stream_tok_s": statistics.median(n / s for s, _ in single),
        "single_stream_decode_tok_s": statistics.median((n - 1) / (s - f) for s, f in single if s > f),
        "first_token_ms": statistics.median(f for _, f in single) * 1000,
        "batched_tok_s": {},
    }
    for size in args.batch_sizes:
        runs = [timed(model, [ids] * size, n)[0] for _ in range(args.runs)]
        figures["batched_tok_s"][size] = statistics.median(size * n / s for s in runs)
    return figures


def bench_worker(model: ChatModel, args: argparse.Namespace) -> dict[str, Any]:
    """Jobs one after another through a real worker on a real Postgres; overhead = wall − generate."""
    from worker import db
    from worker.config import Settings
    from worker.handlers.chat import ChatHandler
    from worker.loop import Worker
    from worker.queue import JobQueue
    from worker.storage import LocalStorage

    home = Path(tempfile.mkdtemp(prefix="bench-chat-"))
    settings = Settings(home=home, database_url=args.database_url, concurrency=1,
                        worker_id=f"bench-chat-{uuid.uuid4().hex[:6]}")
    url = db.resolve_database_url(settings)
    db.migrate(url, settings)
    handler = ChatHandler(settings, model=model.source)
    handler.model = model  # already loaded
    worker = Worker(settings, {"chat": handler}, LocalStorage(settings.storage_dir), database_url=url)
    thread = threading.Thread(target=worker.run, kwargs={"install_signals": False}, daemon=True)
    thread.start()
    queue = JobQueue(db.make_pool(url, 2, name="bench-chat"))
    payload = {"messages": [{"role": "system", "content": "You are a helpful assistant."},
                            {"role": "user", "content": "Describe a rainy street at night."}],
               "max_tokens": args.worker_tokens, "min_tokens": args.worker_tokens, "temperature": 0}
    overheads, generates, claims = [], [], []
    try:
        for index in range(args.worker_jobs + 1):  # the first one warms up: not counted
            job_id = queue.enqueue("chat_generate", payload)
            deadline = time.monotonic() + 120
            while (row := queue.get_job(job_id)) and row["status"] not in ("completed", "failed", "canceled"):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"job {job_id} did not finish")
                time.sleep(0.005)
            assert row and row["status"] == "completed", row
            if index == 0:
                continue
            wall = (row["finished_at"] - row["started_at"]).total_seconds()
            generate = row["result"]["timings"]["generate"]
            overheads.append(wall - generate)
            generates.append(generate)
            claims.append((row["started_at"] - row["created_at"]).total_seconds())
    finally:
        worker.stop()
        thread.join(timeout=30)
    overheads.sort()
    return {
        "jobs": len(overheads),
        "tokens_per_job": args.worker_tokens,
        "generate_ms_median": statistics.median(generates) * 1000,
        "overhead_ms_median": statistics.median(overheads) * 1000,
        "overhead_ms_p90": overheads[int(0.9 * (len(overheads) - 1))] * 1000,
        "overhead_ms_max": overheads[-1] * 1000,
        "insert_to_claim_ms_median": statistics.median(claims) * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--tiny", action="store_true", help="the tiny random-weight Qwen2 (built offline)")
    source.add_argument("--model", help="hub id or local folder, loaded as the worker loads it")
    source.add_argument("--from-config", help="config JSON: that architecture with random weights (no download)")
    parser.add_argument("--set", action="append", metavar="KEY=JSON", help="override a --from-config field")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--attn", default="sdpa", help="attention implementation for --from-config")
    parser.add_argument("--static-cache", action="store_true", help="static KV cache")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                        help="torch.compile the decode step (with --static-cache, on CUDA)")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch-sizes", default="1,4,8", help="comma-separated")
    parser.add_argument("--runs", type=int, default=5, help="measured runs per figure (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--context-tokens", type=int, default=8192)
    parser.add_argument("--worker-jobs", type=int, default=0, help="jobs run through a real worker (0: skip)")
    parser.add_argument("--worker-tokens", type=int, default=32, help="tokens per worker job")
    parser.add_argument("--database-url", default=None, help="default: an embedded Postgres in a temp dir")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--models-dir", type=Path, default=Path(tempfile.gettempdir()) / "ourvidz-bench-models")
    args = parser.parse_args()
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model = load_model(args)
    info = model.info
    print(f"model {info['model_name']} on {info['device']} ({info['dtype']}), loaded in {model.load_seconds:.1f}s; "
          f"static cache {args.static_cache}, compile {args.compile}")
    figures = bench_generate(model, args)
    print(f"prompt {figures['prompt_tokens']} tokens, {figures['new_tokens']} new tokens, "
          f"median of {args.runs} runs")
    print(f"  single stream: {figures['single_stream_tok_s']:.1f} tok/s overall, "
          f"{figures['single_stream_decode_tok_s']:.1f} tok/s decode, first token {figures['first_token_ms']:.1f} ms")
    for size, rate in figures["batched_tok_s"].items():
        print(f"  batch {size:>3}: {rate:.1f} tok/s total ({rate / size:.1f} per stream)")
    if args.worker_jobs:
        overhead = bench_worker(model, args)
        figures["worker"] = overhead
        print(f"worker, {overhead['jobs']} jobs of {overhead['tokens_per_job']} tokens one at a time: "
              f"generate {overhead['generate_ms_median']:.1f} ms; overhead (wall − generate) median "
              f"{overhead['overhead_ms_median']:.1f} ms, p90 {overhead['overhead_ms_p90']:.1f} ms, "
              f"max {overhead['overhead_ms_max']:.1f} ms (target < 50 ms); "
              f"insert → claim {overhead['insert_to_claim_ms_median']:.1f} ms")
    print(json.dumps(figures, default=str))


if __name__ == "__main__":
    main()
