"""Tiny random-weight diffusion pipelines built offline by the project itself: SDXL, WAN 2.1 T2V,
WAN VACE and WAN I2V / FLF2V, each with its tokenizers, saved with `save_pretrained` so tests and
the demo load them through the same `from_pretrained` path as the real checkpoints.

The architectures are the real ones (UNet2DConditionModel with SDXL's text-time conditioning and
two CLIP text encoders; WanTransformer3DModel / WanVACETransformer3DModel, the Wan VAE with its
8x spatial and 4x temporal compression, a UMT5 encoder) at a few thousand parameters each; only
the weights and the vocabularies are meaningless. Tokenizers are trained in memory with the
`tokenizers` library: byte-level BPE for CLIP (model_max_length 77), Unigram for UMT5.

The WAN family folders share their text encoder and VAE weights (same seed), as the real 1.3B T2V,
VACE and 14B I2V checkpoints share UMT5-XXL and the Wan 2.1 VAE, so the handler may load them once.

Each folder carries `ourvidz_tiny_model.json` with the recipe (a changed recipe rebuilds) and the
`limits` the handlers accept for this model only: sizes, steps and frame counts far below the
user-facing ranges, which a real checkpoint never relaxes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from worker.tiny_models import build_model_folder, read_marker

TINY_DIFFUSION_VERSION = "tiny-diffusion-v1"  # bump when a recipe changes; older folders are rebuilt
WanKind = Literal["t2v", "vace", "i2v", "flf2v"]

# What the handlers accept for a tiny model (they read it from the marker; see worker.handlers.limits).
TINY_LIMITS = {"min_side": 32, "min_steps": 1, "min_frames": 5}

_CORPUS = """
a cat walks through a quiet garden at sunset, golden light on the leaves, cinematic, detailed
portrait of a woman in a red dress, soft studio lighting, shallow depth of field, photorealistic
the camera slowly pans across a city street in the rain, neon signs reflect in the puddles
a red sports car on a mountain road, waves crashing on the beach, a dragon over snowy peaks
blurry, low quality, worst quality, jpeg artifacts, deformed, watermark, text, static, overexposed
best quality, masterpiece, highly detailed, sharp focus, 8k, film grain, dramatic lighting
the quick brown fox jumps over the lazy dog 0 1 2 3 4 5 6 7 8 9 10 100 1000 2025
"""


def build_tiny_sdxl(path: str | os.PathLike[str], *, seed: int = 0) -> Path:
    """Write a tiny StableDiffusionXLPipeline into `path` (idempotent) and return the path."""
    recipe = {"version": TINY_DIFFUSION_VERSION, "kind": "sdxl", "seed": seed, "limits": TINY_LIMITS}
    return _build(path, recipe, lambda staging: _sdxl(seed).save_pretrained(staging))


def build_tiny_wan(path: str | os.PathLike[str], kind: WanKind = "t2v", *, seed: int = 0) -> Path:
    """Write a tiny WAN 2.1 pipeline of `kind` into `path` (idempotent) and return the path:
    t2v (WanPipeline), vace (WanVACEPipeline), i2v or flf2v (WanImageToVideoPipeline; the FLF2V
    transformer takes the CLIP embeddings of a first and a last frame)."""
    recipe = {"version": TINY_DIFFUSION_VERSION, "kind": f"wan_{kind}", "seed": seed, "limits": TINY_LIMITS}
    return _build(path, recipe, lambda staging: _wan(kind, seed).save_pretrained(staging))


def build_tiny_taesd(path: str | os.PathLike[str], *, latent_channels: int = 4, seed: int = 0) -> Path:
    """Write a tiny random-weight AutoencoderTiny (the architecture of taesd/taesdxl, 8 channels wide)
    into `path` (idempotent): what the preview decoder settings load in tests and the demo."""
    recipe = {"version": TINY_DIFFUSION_VERSION, "kind": f"taesd_{latent_channels}", "seed": seed}
    return _build(path, recipe, lambda staging: _taesd(latent_channels, seed).save_pretrained(staging))


def build_tiny_models(root: str | os.PathLike[str], *, i2v: bool = True) -> dict[str, Path]:
    """Every tiny diffusion model under `root`: {"sdxl", "wan", "wan_vace", "wan_i2v", "wan_flf2v"}."""
    base = Path(root).expanduser().resolve()
    models = {
        "sdxl": build_tiny_sdxl(base / "tiny-sdxl"),
        "wan": build_tiny_wan(base / "tiny-wan-t2v", "t2v"),
        "wan_vace": build_tiny_wan(base / "tiny-wan-vace", "vace"),
    }
    if i2v:
        models["wan_i2v"] = build_tiny_wan(base / "tiny-wan-i2v", "i2v")
        models["wan_flf2v"] = build_tiny_wan(base / "tiny-wan-flf2v", "flf2v")
    return models


def _build(path: str | os.PathLike[str], recipe: dict[str, Any], write: Callable[[Path], None]) -> Path:
    """Build in a sibling temp folder and rename into place, so a concurrent builder (a test run and
    a demo) never sees a half-written model."""
    if read_marker(path) == recipe:
        return Path(path).expanduser().resolve()
    from worker.handlers.diffusion import quiet_libraries

    quiet_libraries()
    return build_model_folder(path, recipe, write)


# --- tokenizers -------------------------------------------------------------------------


def _lines() -> list[str]:
    return [line.strip() for line in _CORPUS.splitlines() if line.strip()]


def clip_tokenizer(vocab_size: int = 400) -> Any:
    """CLIP's byte-level BPE (lower-cased, `</w>` word ends) with merges trained on a small corpus."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    bos, eos = "<|startoftext|>", "<|endoftext|>"
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[bos, eos], show_progress=False,
                                  initial_alphabet=alphabet, end_of_word_suffix="</w>")
    bpe.train_from_iterator([line.lower() for line in _lines()], trainer)
    trained = json.loads(bpe.to_str())["model"]
    vocab: dict[str, int] = dict(trained["vocab"])
    for char in alphabet:  # a lone character at a word's end must exist too, or it becomes unknown
        vocab.setdefault(char + "</w>", len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    return CLIPTokenizer(vocab=vocab, merges=merges, bos_token=bos, eos_token=eos, pad_token=eos, unk_token=eos,
                         model_max_length=77)


def umt5_tokenizer(vocab_size: int = 300) -> Any:
    """A T5/UMT5-style Unigram tokenizer (<pad>=0, </s>=1, <unk>=2), 512 tokens as WAN uses."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import T5Tokenizer

    unigram = Tokenizer(models.Unigram())
    unigram.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"],
                                      unk_token="<unk>", show_progress=False)
    unigram.train_from_iterator(_lines(), trainer)
    pieces = [(piece, float(score)) for piece, score in json.loads(unigram.to_str())["model"]["vocab"]]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


# --- SDXL -------------------------------------------------------------------------------


def _sdxl(seed: int) -> Any:
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = clip_tokenizer()
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=32, hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(text_config)
    text_encoder_2 = CLIPTextModelWithProjection(text_config)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), transformer_layers_per_block=(1, 1), use_linear_projection=True,
        cross_attention_dim=64,  # text_encoder + text_encoder_2 hidden sizes, as SDXL concatenates them
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32, norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=8, sample_size=64, scaling_factor=0.13025,
    )
    # stabilityai/stable-diffusion-xl-base-1.0's scheduler_config.json
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        prediction_type="epsilon", steps_offset=1, timestep_spacing="leading", interpolation_type="linear",
        use_karras_sigmas=False,
    )
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=clip_tokenizer(), unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
    )


def _taesd(latent_channels: int, seed: int) -> Any:
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    return AutoencoderTiny(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                           num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1),
                           latent_channels=latent_channels)


# --- WAN 2.1 ------------------------------------------------------------------------------


def _wan(kind: WanKind, seed: int) -> Any:
    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = umt5_tokenizer()
    torch.manual_seed(seed)  # the same text encoder and VAE in every WAN folder: they may be shared
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=0,
    ))
    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    # Wan-AI/Wan2.1-T2V-1.3B-Diffusers' scheduler (UniPC with flow sigmas; the shift is set per job)
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=3.0,
        solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True, final_sigmas_type="zero",
    )
    shared = {"num_attention_heads": 2, "attention_head_dim": 12, "out_channels": 16, "text_dim": 32,
              "freq_dim": 256, "ffn_dim": 32, "num_layers": 2, "cross_attn_norm": True,
              "qk_norm": "rms_norm_across_heads", "patch_size": (1, 2, 2),
              "rope_max_seq_len": 1024}  # the real value: a smaller table breaks longer clips
    torch.manual_seed(seed + 1)
    if kind == "t2v":
        from diffusers import WanPipeline

        transformer = WanTransformer3DModel(in_channels=16, **shared)
        return WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                           transformer=transformer)
    if kind == "vace":
        from diffusers import WanVACEPipeline, WanVACETransformer3DModel

        # VACE's control input: inactive + reactive latents (2 x 16) and the 8x8 mask (64).
        transformer = WanVACETransformer3DModel(in_channels=16, vace_layers=[0, 1], vace_in_channels=96, **shared)
        return WanVACEPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                               transformer=transformer)
    from diffusers import WanImageToVideoPipeline
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    image_encoder = CLIPVisionModel(CLIPVisionConfig(
        hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, image_size=32,
        patch_size=8, projection_dim=8,
    ))
    image_tokens = (32 // 8) ** 2 + 1
    # I2V: 16 noise + 4 mask + 16 image-condition channels; FLF2V: positions for two images' tokens.
    transformer = WanTransformer3DModel(
        in_channels=36, image_dim=8, added_kv_proj_dim=24,
        pos_embed_seq_len=2 * image_tokens if kind == "flf2v" else None, **shared,
    )
    return WanImageToVideoPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer,
        image_encoder=image_encoder,
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
    )
