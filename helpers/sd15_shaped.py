"""SD1.5's architecture with random weights, and a generated image-caption folder: the SD1.5 code path anywhere.

A pipeline built from SD1.5's published configs (UNet, VAE, CLIP ViT-L/14 text tower, DDIM scheduler) costs
exactly the time and memory of the real one, so the kit's SD1.5 path can be run and timed on any machine
without downloading weights. This module holds those configs (written out, nothing is downloaded), small
variants of them with the same block types for tests, an offline byte-level tokenizer, and builders:

* :func:`build_pipeline` -- a ``StableDiffusionPipeline`` of random-weight parts, in memory;
* :func:`write_pipeline` -- the same, saved with ``save_pretrained`` so that
  ``StableDiffusionPipeline.from_pretrained(folder)`` (and ``CD_KIT_MODEL=folder``) loads it;
* :func:`write_caption_folder` -- a folder of generated images (coloured shapes on a background) with a
  ``metadata.csv`` whose captions describe them, in the layout of ``docs/data.md`` (``CD_KIT_DATA=folder``).

``python -m helpers.commands.sd15_shaped`` writes both. ``scripts/bench_gpu.py`` builds its models here.
"""
from __future__ import annotations

import csv
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

__all__ = ["SD15_UNET", "SD15_VAE", "SD15_TEXT", "SD15_SCHEDULER", "TINY_UNET", "TINY_VAE", "TINY_TEXT", "SIZES",
           "model_configs", "image_size", "build_unet", "build_scheduler", "byte_level_tokenizer", "build_pipeline",
           "write_pipeline", "SHAPES", "COLOURS", "caption_image", "write_caption_folder"]

# --- Model configurations -----------------------------------------------------------------------------------
# SD1.5 as published (stable-diffusion-v1-5/stable-diffusion-v1-5: unet/, vae/, text_encoder/ and
# scheduler/ config.json), written out so that nothing is downloaded.
SD15_UNET: dict[str, Any] = {
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-5, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD15_VAE: dict[str, Any] = {
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
    "sample_size": 512, "up_block_types": ["UpDecoderBlock2D"] * 4, "scaling_factor": 0.18215,
}
SD15_TEXT: dict[str, Any] = {  # CLIP ViT-L/14's text tower
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 768,
    "layer_norm_eps": 1e-5, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2,
}
SD15_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
}
# The tiny SD-architecture model of docs/stack.md: runs in milliseconds on a CPU (32x32 images).
TINY_UNET: dict[str, Any] = {
    **SD15_UNET, "block_out_channels": [32, 64], "layers_per_block": 1, "cross_attention_dim": 32,
    "sample_size": 16, "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
}
TINY_VAE: dict[str, Any] = {
    **SD15_VAE, "block_out_channels": [32, 64], "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2, "layers_per_block": 1, "sample_size": 32,
}
TINY_TEXT: dict[str, Any] = {**SD15_TEXT, "vocab_size": 1000, "hidden_size": 32, "intermediate_size": 37,
                             "num_hidden_layers": 2, "num_attention_heads": 4, "projection_dim": 32}
#: ``--size`` of the command: ``full`` is SD1.5's shape, ``small`` the tiny one.
SIZES = ("full", "small")


def model_configs(tiny: bool) -> dict[str, dict[str, Any]]:
    """The UNet, VAE, text-encoder and scheduler configs: SD1.5's, or the tiny ones."""
    if tiny:
        return {"unet": TINY_UNET, "vae": TINY_VAE, "text": TINY_TEXT, "scheduler": SD15_SCHEDULER}
    return {"unet": SD15_UNET, "vae": SD15_VAE, "text": SD15_TEXT, "scheduler": SD15_SCHEDULER}


def image_size(configs: dict[str, dict[str, Any]]) -> int:
    """Pixels per side of the images: latent size times the VAE's downsampling (2 per extra block)."""
    return configs["unet"]["sample_size"] * 2 ** (len(configs["vae"]["block_out_channels"]) - 1)


# --- Building the models ------------------------------------------------------------------------------------
def build_unet(config: dict[str, Any], device: torch.device, dtype: torch.dtype):
    """A frozen ``UNet2DConditionModel`` with random weights, created directly on ``device``."""
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        unet = UNet2DConditionModel.from_config(config)
    return unet.to(device=device, dtype=dtype).requires_grad_(False)


def build_scheduler(config: dict[str, Any], device: torch.device):
    """SD1.5's DDIM scheduler with trailing spacing, ``alphas_cumprod`` on ``device`` (as the kit sets it up)."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(config, timestep_spacing="trailing")
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(device)
    return scheduler


def byte_level_tokenizer(max_length: int):
    """A ``CLIPTokenizer`` built offline: the 256 byte-level characters (also with ``</w>``), no merges, plus
    CLIP's start/end tokens. Its ids fit any CLIP vocabulary; tokenizing costs the same as with CLIP's."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    chars = sorted(ByteLevel.alphabet())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory(prefix="bench-tok-") as tmp:
        vocab, merges = Path(tmp, "vocab.json"), Path(tmp, "merges.txt")
        vocab.write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
        merges.write_text("#version: 0.2\n")
        return CLIPTokenizer(str(vocab), str(merges), model_max_length=max_length)


def build_pipeline(configs: dict[str, dict[str, Any]], device: torch.device, dtype: torch.dtype):
    """A ``StableDiffusionPipeline`` of random-weight components, with the kit's trailing DDIM scheduler."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    from helpers.models import use_trailing_ddim

    with torch.device(device):
        vae = AutoencoderKL.from_config(configs["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text"]))
    pipe = StableDiffusionPipeline(
        vae=vae.to(device=device, dtype=dtype), text_encoder=text_encoder.to(device=device, dtype=dtype),
        tokenizer=byte_level_tokenizer(configs["text"]["max_position_embeddings"]),
        unet=build_unet(configs["unet"], device, dtype), scheduler=build_scheduler(configs["scheduler"], device),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return use_trailing_ddim(pipe)


def write_pipeline(out: str | Path, size: str = "full", seed: int = 0, dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu") -> Path:
    """Save a random-weight pipeline of SD1.5's shape (``size="full"``) or the tiny one (``"small"``) to ``out``
    with ``save_pretrained`` (safetensors; the scheduler saved with SD1.5's own config, i.e. as the Hub's
    ``scheduler/`` folder, since the kit swaps in trailing spacing when it loads). ``device="cuda"`` draws the
    random weights on the GPU (seconds instead of a minute of CPU time for SD1.5's 1.07 billion parameters; the
    same distributions, other numbers). Returns the folder."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    from diffusers import DDIMScheduler

    out = Path(out)
    where = torch.device(device)
    with torch.random.fork_rng(devices=[where] if where.type == "cuda" else []):
        torch.manual_seed(seed)
        pipe = build_pipeline(model_configs(size == "small"), where, dtype)
    pipe.scheduler = DDIMScheduler.from_config(SD15_SCHEDULER)
    pipe.save_pretrained(out, safe_serialization=True)
    # transformers 5 writes only tokenizer.json; vocab.json + merges.txt let older transformers load it too
    (out / "tokenizer" / "vocab.json").write_text(json.dumps(pipe.tokenizer.get_vocab()))
    (out / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
    (out / "sd15_shaped.json").write_text(json.dumps(
        {"what": "random weights in SD1.5's architecture (helpers.sd15_shaped)", "size": size, "seed": seed,
         "dtype": str(dtype).removeprefix("torch.")}, indent=2))
    return out


# --- The generated image-caption folder ---------------------------------------------------------------------
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40),
    "purple": (140, 60, 180), "white": (245, 245, 245), "black": (20, 20, 20), "orange": (240, 140, 30)}


def caption_image(shape: str, colour: str, background: str, size: int, rng: np.random.Generator) -> Image.Image:
    """A ``size`` x ``size`` RGB image: one ``colour`` ``shape`` (random place and scale from ``rng``) on a
    ``background`` with a little noise, so that no two images are alike."""
    if shape not in SHAPES or colour not in COLOURS or background not in COLOURS:
        raise ValueError(f"shape in {SHAPES}, colours in {tuple(COLOURS)}; got {shape!r}, {colour!r}, {background!r}")
    image = Image.new("RGB", (size, size), COLOURS[background])
    draw = ImageDraw.Draw(image)
    r = size * rng.uniform(0.18, 0.32)
    cx, cy = (size * rng.uniform(0.35, 0.65) for _ in range(2))
    box = (cx - r, cy - r, cx + r, cy + r)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:
        w = r / 3
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0.0, 6.0, (size, size, 3))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def _write_image(job: tuple[Path, str, str, str, int, int, int]) -> None:
    path, shape, colour, background, size, seed, index = job
    caption_image(shape, colour, background, size, np.random.default_rng([seed, index])).save(path)


def write_caption_folder(out: str | Path, images: int = 100, size: int = 512, seed: int = 0,
                         workers: int | None = None) -> Path:
    """Write ``images`` generated images (PNG, ``size`` pixels) and a ``metadata.csv`` (``file_name,text``;
    captions like "a red circle on a blue background") to ``out``: an image-caption folder as
    :func:`helpers.captions_data.load_image_caption_folder` reads it. Seeded (each image from its own seed, so the
    folder is the same for any number of ``workers``: processes drawing and writing the images, default one per
    CPU core for more than 64 images); returns the folder."""
    if images < 1 or size < 8:
        raise ValueError(f"need at least 1 image of at least 8 pixels, got images={images}, size={size}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    rows, jobs = [], []
    for i in range(images):
        shape = SHAPES[rng.integers(len(SHAPES))]
        colour, background = (names[j] for j in rng.choice(len(names), 2, replace=False))
        name = f"{i:05d}.png"
        jobs.append((out / name, shape, colour, background, size, seed, i))
        article = "an" if colour[0] in "aeiou" else "a"
        rows.append((name, f"{article} {colour} {shape} on a {background} background"))
    workers = workers if workers is not None else (min(16, os.cpu_count() or 1) if images > 64 else 1)
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_write_image, jobs, chunksize=16))
    else:
        for job in jobs:
            _write_image(job)
    with open(out / "metadata.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "text"])
        writer.writerows(rows)
    return out
