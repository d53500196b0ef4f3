"""Activation headroom: GPU memory a model's job needs on top of its weights, kept free by the memory
manager (worker.memory) when it decides what to evict.

The budget (memory_budget, else memory_fraction x the GPU) used to count weights only, so a load could
fill it and the job's VAE decode then ran out of memory after every denoising step. The figures are the
measured lower bounds of the review (issue 13, finding 4) at the largest job each model family takes:

    sdxl  6 images at 1024x1024, VAE decode unsliced and untiled   9.0 GiB  (1.5 GiB with slicing)
    wan   81 frames at 480x832, float32 VAE decode untiled          7.6 GiB

The handlers decode unsliced first and fall back to tiling after an OOM (worker.handlers.diffusion), so
the unsliced figure is the one to keep free. Chat has no measured figure yet; its KV cache (Qwen2.5-7B,
8 x 8192 tokens: about 3.5 GiB in bf16) is left to the fraction the budget keeps back.

The table applies on a GPU only: on CPU the budget counts the models' bytes in RAM, and activations are
not what it guards. A handler's own `activation_bytes` attribute (bytes) replaces its family's figure,
on any device.
"""

from __future__ import annotations

from typing import Any

GIB = 1024**3

ACTIVATION_HEADROOM: dict[str, int] = {
    "sdxl": int(9.0 * GIB),
    "wan": int(7.6 * GIB),
}


def headroom_bytes(name: str, handler: Any, *, on_gpu: bool) -> int:
    """Bytes a job of handler `name` needs beyond its weights: its `activation_bytes`, else its family's
    (its `family` attribute, else its name) figure on a GPU, else 0."""
    own = getattr(handler, "activation_bytes", None)
    if own is not None:
        return max(0, int(own))
    if not on_gpu:
        return 0
    family = getattr(handler, "family", None) or name
    return ACTIVATION_HEADROOM.get(str(family), 0)
