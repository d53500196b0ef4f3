"""Tiny random-weight models built offline by the project itself, for tests, the demo and benchmarks.

They load through the same `from_pretrained` path as the real checkpoints, so a test of the handler
is a test of the production code path; only the weights are meaningless.

`build_tiny_qwen(path)` writes a Qwen2 causal LM with a byte-level BPE tokenizer trained in memory,
Qwen's special tokens, Qwen2.5's ChatML chat template and Qwen2.5's `generation_config.json`
(top_k 20, repetition penalty 1.05...) — kept on purpose, so tests prove that those checkpoint
defaults never leak into a job's sampling.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

TINY_QWEN_VERSION = "tiny-qwen2-v1"  # bump when the recipe changes; older folders are rebuilt
MARKER = "ourvidz_tiny_model.json"

IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"

# Qwen2.5-Instruct's chat template without the tool-calling branches (never used by the handler).
QWEN25_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first)"
    " or (message.role == 'assistant') %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

# Enough English for a few hundred BPE merges, so prompts tokenize to realistic lengths.
_CORPUS = """
You are a helpful AI assistant. Hello, how are you today? I am fine, thank you for asking.
A cat walks through a quiet garden at sunset, golden light on the leaves, cinematic, detailed.
Portrait of a woman in a red dress, soft studio lighting, shallow depth of field, photorealistic.
The camera slowly pans across a city street in the rain; neon signs reflect in the puddles.
Tell me a story about a dragon who wanted to learn how to paint with the colours of the sky.
Stay in character at all times. Respond naturally and engagingly, be descriptive and immersive.
You rewrite short image prompts into detailed prompts: subject, composition, lighting, style.
What is the weather like? It is sunny and warm, with a light breeze from the sea this afternoon.
The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9 10 100 1000 2025.
Please describe the scene in more detail, with the mood, the colours and the movement of people.
"""

# Qwen2.5-7B-Instruct's generation_config.json, with the tiny tokenizer's ids.
_QWEN_GENERATION_DEFAULTS = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20,
                             "repetition_penalty": 1.05}


def build_tiny_qwen(path: str | os.PathLike[str], *, hidden_size: int = 64, num_layers: int = 2,
                    vocab_size: int = 512, max_positions: int = 4096, seed: int = 0,
                    init_std: float = 0.2) -> Path:
    """Write a tiny Qwen2 chat model into `path` (idempotent) and return the path.

    Built in a sibling temp folder and renamed into place, so concurrent builders (a test run and
    a demo) never see a half-written model.
    """
    recipe = {"version": TINY_QWEN_VERSION, "hidden_size": hidden_size, "num_layers": num_layers,
              "vocab_size": vocab_size, "max_positions": max_positions, "seed": seed, "init_std": init_std}

    def write(staging: Path) -> None:
        tokenizer = _tiny_tokenizer(vocab_size)
        tokenizer.save_pretrained(staging)
        _tiny_model(tokenizer, hidden_size, num_layers, max_positions, seed, init_std).save_pretrained(staging)

    return build_model_folder(path, recipe, write)


def build_model_folder(path: str | os.PathLike[str], recipe: dict[str, Any],
                       write: Callable[[Path], None]) -> Path:
    """Run `write` into a sibling temp folder and rename it into place with a marker naming the
    recipe; a folder whose marker already matches is kept as it is (idempotent builds)."""
    target = Path(path).expanduser().resolve()
    if read_marker(target) == recipe:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        write(staging)
        (staging / MARKER).write_text(json.dumps(recipe, indent=2))
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except OSError:
        if read_marker(target) != recipe:  # lost a rename race to an identical build: fine
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def read_marker(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    try:
        data = json.loads((Path(path) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _tiny_tokenizer(vocab_size: int) -> Any:
    """Qwen2's byte-level BPE pipeline with merges trained on a small corpus, plus Qwen's specials."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX, Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 3, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([line for line in _CORPUS.splitlines() if line], trainer)
    trained = json.loads(bpe.to_str())["model"]
    vocab: dict[str, int] = dict(trained["vocab"])
    for token in (ENDOFTEXT, IM_START, IM_END):  # Qwen's order: 151643, 151644, 151645
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=[tuple(m) for m in trained["merges"]],
        unk_token=None, eos_token=IM_END, pad_token=ENDOFTEXT,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=32768,
    )
    tokenizer.chat_template = QWEN25_CHAT_TEMPLATE
    return tokenizer


def _tiny_model(tokenizer: Any, hidden_size: int, num_layers: int, max_positions: int, seed: int,
                init_std: float) -> Any:
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    endoftext, im_end = tokenizer.convert_tokens_to_ids([ENDOFTEXT, IM_END])
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=max_positions, tie_word_embeddings=False, initializer_range=init_std,
        bos_token_id=endoftext, eos_token_id=im_end, pad_token_id=endoftext,
    )
    # Untied, wider-than-default init: varied greedy text with clear argmax margins, so batched and
    # single runs agree token for token despite float rounding.
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=endoftext, pad_token_id=endoftext, eos_token_id=[im_end, endoftext],
        **_QWEN_GENERATION_DEFAULTS,
    )
    return model
