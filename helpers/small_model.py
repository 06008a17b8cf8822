"""The kit's small teacher: a tiny Stable-Diffusion-architecture text-to-image model on scikit-learn's digits.

It uses exactly SD1.5's classes (``UNet2DConditionModel``, ``AutoencoderKL``, ``CLIPTextModel`` +
``CLIPTokenizer``, ``DDIMScheduler`` with SD1.5's noise schedule) so that the course's notebook cells run
unchanged on SD1.5 and on this model. Only the sizes differ:

* images 32×32 RGB (the 8×8 digits of ``sklearn.datasets.load_digits`` upscaled, white on black);
* VAE with 2 blocks: 32×32×3 images <-> 16×16×4 latents (``vae_scale_factor`` 2);
* UNet on 16×16×4 latents, cross-attention to 64-d text embeddings;
* a 2-layer CLIP text encoder (hidden size 64, 77 tokens like SD1.5) and a CLIP BPE tokenizer built
  offline from byte-level characters plus merges learned on the prompt templates.

This module holds the architecture (functions that build the *untrained* parts), the offline tokenizer,
the data set and the prompt templates. ``helpers.commands.train_small_model`` trains it; the trained pipeline ships
in :data:`SMALL_MODEL_DIR` and loads with
``StableDiffusionPipeline.from_pretrained(SMALL_MODEL_DIR, safety_checker=None, requires_safety_checker=False)``.
"""
from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

__all__ = [
    "SMALL_MODEL_DIR", "IMAGE_SIZE", "LATENT_SIZE", "LATENT_CHANNELS", "TEXT_DIM", "MAX_TOKENS",
    "DIGIT_WORDS", "PROMPT_TEMPLATES", "EMPTY_PROMPT", "SD15_SCHEDULER_CONFIG", "DATA_DESCRIPTION",
    "digit_prompt", "all_digit_prompts", "load_digits_dataset",
    "unet_config", "vae_config", "text_encoder_config",
    "build_unet", "build_vae", "build_text_encoder", "build_scheduler", "shipped_scheduler", "mark_scheduler_like_sd15", "build_tokenizer",
    "tokenizer_corpus", "assemble_pipeline",
]

#: Where the trained pipeline ships (a diffusers ``StableDiffusionPipeline`` folder).
SMALL_MODEL_DIR: Path = Path(__file__).resolve().parent / "assets" / "digits-sd"

IMAGE_SIZE: int = 32  #: image side in pixels
LATENT_SIZE: int = 16  #: latent side (the VAE halves the resolution)
LATENT_CHANNELS: int = 4  #: latent channels, as SD1.5
TEXT_DIM: int = 64  #: text-encoder hidden size = the UNet's ``cross_attention_dim``
MAX_TOKENS: int = 77  #: tokenizer / text-encoder length, as SD1.5
EMPTY_PROMPT: str = ""  #: the unconditional prompt of classifier-free guidance

DIGIT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

#: Prompt phrasings. ``{n}`` is the numeral ("7"), ``{w}`` the word ("seven").
PROMPT_TEMPLATES: tuple[str, ...] = (
    "a handwritten digit {n}",
    "the number {w}, handwritten",
    "a photo of a {n}",
    "the digit {w}",
    "a picture of the number {n}",
    "handwritten {w}",
    "{n}",
    "a drawing of a {w}",
)

DATA_DESCRIPTION: str = (
    "scikit-learn's load_digits (1,797 handwritten digits 0-9, 8x8 grey levels 0-16, from the UCI "
    "optical recognition data set), upscaled bicubically to 32x32, white digit on black, copied to 3 RGB "
    "channels, scaled to [-1, 1]; each image captioned by one of the prompt templates."
)

#: SD1.5's noise schedule in a DDIMScheduler with trailing timestep spacing (what the course samples with).
SD15_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "trailing",
}


# --------------------------------------------------------------------------------------------- prompts
def digit_prompt(d: int, template_index: int | None = None,
                 rng: random.Random | np.random.Generator | None = None) -> str:
    """A caption for digit ``d`` (0-9).

    ``template_index`` picks one of :data:`PROMPT_TEMPLATES` (taken modulo their number). When it is None,
    a template is drawn with ``rng`` (a ``random.Random`` or a NumPy ``Generator``); with neither given,
    the first template is used, so ``digit_prompt(7) == "a handwritten digit 7"``.
    """
    d = int(d)
    if not 0 <= d <= 9:
        raise ValueError(f"digit must be in 0..9, got {d}")
    if template_index is None:
        if rng is None:
            template_index = 0
        elif isinstance(rng, np.random.Generator):
            template_index = int(rng.integers(len(PROMPT_TEMPLATES)))
        else:
            template_index = rng.randrange(len(PROMPT_TEMPLATES))
    template = PROMPT_TEMPLATES[template_index % len(PROMPT_TEMPLATES)]
    return template.format(n=d, w=DIGIT_WORDS[d])


def all_digit_prompts() -> list[tuple[int, str]]:
    """Every (digit, prompt) pair: 10 digits × all templates, digit-major."""
    return [(d, digit_prompt(d, i)) for d in range(10) for i in range(len(PROMPT_TEMPLATES))]


# ------------------------------------------------------------------------------------------------ data
def load_digits_dataset(size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as ``(images, labels)``.

    ``images``: float32 tensor ``(1797, 3, size, size)`` in [-1, 1] (bicubic upscaling of the 8×8 grey
    levels, clamped, the same grey in all three channels; background -1, ink +1). ``labels``: int64
    tensor ``(1797,)`` of digits 0-9. Ships with scikit-learn: no download.
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.from_numpy(data.images.astype(np.float32) / 16.0).unsqueeze(1)  # (N, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp(0.0, 1.0)
    x = x.expand(-1, 3, -1, -1).contiguous() * 2.0 - 1.0
    y = torch.from_numpy(data.target.astype(np.int64))
    return x, y


# ---------------------------------------------------------------------------------------- architecture
def unet_config() -> dict[str, Any]:
    """Config of the UNet2DConditionModel (16×16×4 latents, ~1 M parameters).

    Two resolution levels (32, 64 channels); the 16×16 level has no attention (attention over 256
    positions dominates CPU time), the 8×8 level and the mid block cross-attend to the text.
    """
    return {
        "sample_size": LATENT_SIZE,
        "in_channels": LATENT_CHANNELS,
        "out_channels": LATENT_CHANNELS,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "cross_attention_dim": TEXT_DIM,
        "attention_head_dim": 4,
        "norm_num_groups": 32,
    }


def vae_config(scaling_factor: float = 1.0) -> dict[str, Any]:
    """Config of the AutoencoderKL: 2 blocks, 32×32×3 <-> 16×16×4. ``scaling_factor`` is set after
    training to 1/std of the latents, so that ``latents * scaling_factor`` has about unit variance."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
        "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "latent_channels": LATENT_CHANNELS,
        "norm_num_groups": 32,
        "sample_size": IMAGE_SIZE,
        "scaling_factor": float(scaling_factor),
    }


def text_encoder_config(tokenizer: CLIPTokenizer) -> dict[str, Any]:
    """Config (keyword arguments of ``CLIPTextConfig``) of the 2-layer CLIP text encoder for ``tokenizer``."""
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": TEXT_DIM,
        "intermediate_size": 4 * TEXT_DIM,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": MAX_TOKENS,
        "projection_dim": TEXT_DIM,
        "hidden_act": "quick_gelu",
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def build_unet() -> UNet2DConditionModel:
    """An untrained ``UNet2DConditionModel`` with :func:`unet_config` (seed torch first for repeatability)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**unet_config())


def build_vae(scaling_factor: float = 1.0) -> AutoencoderKL:
    """An untrained ``AutoencoderKL`` with :func:`vae_config`."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(**vae_config(scaling_factor))


def build_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    """An untrained 2-layer ``CLIPTextModel`` sized for ``tokenizer``."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**text_encoder_config(tokenizer)))


def build_scheduler() -> DDIMScheduler:
    """``DDIMScheduler`` with SD1.5's schedule and trailing spacing (:data:`SD15_SCHEDULER_CONFIG`)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SD15_SCHEDULER_CONFIG)


def shipped_scheduler():
    """The scheduler the model folder ships: SD1.5's own (``PNDMScheduler``, "leading" spacing, same betas).

    Like SD1.5, the folder does not come with DDIM "trailing": swapping it in is the students' first task.
    """
    from diffusers import PNDMScheduler

    return PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         num_train_timesteps=1000, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)


def mark_scheduler_like_sd15(folder: Path) -> None:
    """SD1.5's scheduler_config.json also carries ``"clip_sample": false`` (unused by PNDM, read by
    ``DDIMScheduler.from_config``); write it into a saved pipeline folder the same way."""
    path = Path(folder) / "scheduler" / "scheduler_config.json"
    cfg = json.loads(path.read_text())
    cfg["clip_sample"] = False
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


# ------------------------------------------------------------------------------------------- tokenizer
def tokenizer_corpus() -> list[str]:
    """Text the BPE merges are learned on: every templated prompt, plus a few general words."""
    extra = [
        "a sad puppy with large eyes", "an image of a handwritten number", "a black and white picture",
        "digits numbers written by hand", "a photo of a cat", "a painting of a dog", "an astronaut riding a horse",
    ]
    return [p for _, p in all_digit_prompts()] * 4 + extra


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode character table (256 entries)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def build_tokenizer(out_dir: str | Path | None = None, num_merges: int = 200) -> CLIPTokenizer:
    """Build SD1.5's tokenizer class (``CLIPTokenizer``) offline, with a small learned vocabulary.

    Vocabulary: the 256 byte-level characters, the same 256 with the end-of-word suffix ``</w>``, then
    the results of up to ``num_merges`` BPE merges learned with ``tokenizers``' ``BpeTrainer`` on
    :func:`tokenizer_corpus` (same normaliser and pre-tokeniser as CLIP), then ``<|startoftext|>`` and
    ``<|endoftext|>`` (the latter is also the pad and unknown token). Any text tokenizes, unseen words
    fall back to byte-level pieces. ``model_max_length`` is 77 as in SD1.5.

    When ``out_dir`` is given, the tokenizer is saved there with ``save_pretrained`` and ``vocab.json`` /
    ``merges.txt`` are written too (older transformers load those).
    """
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer
    from transformers import CLIPTokenizer

    byte_chars = list(_bytes_to_unicode().values())
    base = byte_chars + [c + "</w>" for c in byte_chars]

    trainer_tok = Tokenizer(BPE(continuing_subword_prefix="", end_of_word_suffix="</w>"))
    trainer_tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    trainer_tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(
            Regex(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
            behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    trainer = BpeTrainer(vocab_size=len(base) + num_merges, min_frequency=2, show_progress=False,
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), end_of_word_suffix="</w>",
                         continuing_subword_prefix="")
    trainer_tok.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    learned = json.loads(trainer_tok.to_str())["model"]["merges"]
    merges: list[tuple[str, str]] = []
    vocab: dict[str, int] = {tok: i for i, tok in enumerate(base)}
    for m in learned[:num_merges]:
        a, b = m if isinstance(m, list) else m.split(" ")
        if a not in vocab or b not in vocab:
            continue
        merges.append((a, b))
        if a + b not in vocab:
            vocab[a + b] = len(vocab)
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)

    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TOKENS)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(out)
        (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
        (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return tok


# -------------------------------------------------------------------------------------------- pipeline
def assemble_pipeline(vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                      unet: UNet2DConditionModel, scheduler: DDIMScheduler | None = None) -> StableDiffusionPipeline:
    """A ``StableDiffusionPipeline`` from the parts, without safety checker or feature extractor."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=scheduler if scheduler is not None else shipped_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def _describe(parts: Sequence[tuple[str, torch.nn.Module]]) -> dict[str, int]:
    """Parameter counts per named part (used in the training log)."""
    return {name: int(sum(p.numel() for p in m.parameters())) for name, m in parts}
