"""Training data of the consistency students: image-caption pairs encoded once to VAE latents and text
embeddings, cached, and served as a ``TensorDataset`` of ``(latents, prompt_embeds)``.

Training never touches pixels or the text encoder: every step reuses the latents and embeddings computed
here, as the original course did. The pairs come from

* the kit's small model: scikit-learn's digits (:func:`helpers.small_model.load_digits_dataset`), each
  image captioned with a prompt template drawn with a fixed seed (:func:`helpers.small_model.digit_prompt`);
* SD1.5 (or another Hub / folder model): an image folder with a captions CSV
  (:func:`helpers.captions_data.load_image_caption_folder`, folder from ``config.data``, i.e. ``$CD_KIT_DATA``).

The same :func:`encode_pairs` serves both. Encoded sets are cached in memory and, except under nbgrader,
on disk under ``<output folder>/cache/`` (keyed by the model's files, the image count, size and seed), so
that notebooks 04 and 05 encode them once.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from helpers.config import KitConfig

__all__ = ["digit_pairs", "caption_pairs", "encode_pairs", "training_dataset", "training_dataloader",
           "model_fingerprint", "data_source"]

_MEMORY: dict[str, TensorDataset] = {}


def digit_pairs(num_images: int | None = None, seed: int = 0, size: int | None = None
                ) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """The digits as ``(images (N, 3, S, S) in [-1, 1], captions, digits)``; ``num_images`` picks a random
    subset (seeded), each image gets a prompt template drawn with ``seed``; ``size`` defaults to 32."""
    from helpers import small_model as sm

    images, labels = sm.load_digits_dataset(size or sm.IMAGE_SIZE)
    if num_images is not None:
        if num_images <= 0:
            raise ValueError(f"num_images must be positive, got {num_images}")
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:num_images]
        images, labels = images[order], labels[order]
    rng = np.random.default_rng(seed)
    captions = [sm.digit_prompt(int(d), rng=rng) for d in labels]
    return images, captions, labels


def caption_pairs(num_images: int | None, size: int, folder: str | Path | None = None):
    """The image-caption folder of SD1.5 training (``folder``, e.g. ``config.data``) as a dataset of
    ``{"pixel_values", "caption"}`` items, first ``num_images`` rows."""
    from helpers.captions_data import load_image_caption_folder

    return load_image_caption_folder(folder, size=size, limit=num_images)


def _batches(pixels_and_captions, batch_size: int, num_workers: int = 0) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """``(pixels, captions)`` batches from a tuple of (tensor, list) or from a dataset of dict items."""
    if isinstance(pixels_and_captions, tuple):
        images, captions = pixels_and_captions
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        for i in range(0, len(captions), batch_size):
            yield images[i:i + batch_size], list(captions[i:i + batch_size])
        return
    loader = DataLoader(pixels_and_captions, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=lambda items: (torch.stack([it["pixel_values"] for it in items]),
                                                  [it["caption"] for it in items]))
    yield from loader


@torch.no_grad()
def encode_pairs(pipe, pairs, batch_size: int = 64, seed: int = 0, store_dtype: torch.dtype | None = None,
                 progress: bool = True, num_workers: int = 0) -> TensorDataset:
    """Encode image-caption pairs with the pipeline's VAE and text encoder.

    ``pairs``: a tuple ``(images (N, 3, H, W) in [-1, 1], captions)`` or a dataset of
    ``{"pixel_values", "caption"}`` items. Latents are samples of the VAE posterior (seeded) times the VAE's
    ``scaling_factor``, the space the UNet works in. Returns a ``TensorDataset(latents, prompt_embeds)`` on
    the CPU in ``store_dtype`` (default: the pipeline's dtype; fp16 halves the memory of SD1.5's
    ``(N, 77, 768)`` embeddings). ``num_workers`` processes read a dataset's images in parallel.
    """
    from tqdm.auto import tqdm

    from helpers.prompts import encode_prompts

    vae, device = pipe.vae, pipe.vae.device
    store_dtype = store_dtype or vae.dtype
    gen = torch.Generator(device=device).manual_seed(seed)
    latents, embeds = [], []
    for pixels, captions in tqdm(_batches(pairs, batch_size, num_workers), desc="encoding the training set",
                                 disable=not progress):
        dist = vae.encode(pixels.to(device, vae.dtype)).latent_dist
        latents.append((dist.sample(generator=gen) * vae.config.scaling_factor).to("cpu", store_dtype))
        embeds.append(encode_prompts(pipe, captions).to("cpu", store_dtype))
    if not latents:
        raise ValueError("encode_pairs got no image-caption pairs")
    return TensorDataset(torch.cat(latents), torch.cat(embeds))


def model_fingerprint(source: str) -> str:
    """A short hash that changes when the model changes: of the files (names, sizes, times) of a local
    folder, else of the Hub id."""
    folder = Path(source)
    if folder.is_dir():
        items = sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
                       for p in folder.rglob("*") if p.is_file())
        text = json.dumps(items)
    else:
        text = source
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def data_source(kind: str, data: str | None = None) -> str:
    """``"digits"`` for the small model (and for other models when no data folder ``data``, i.e.
    ``config.data``, is set and the model is not SD1.5), ``"captions"`` otherwise."""
    if kind == "small" or (kind == "custom" and not data):
        return "digits"
    return "captions"


def training_dataset(pipe, spec, settings, config: KitConfig, seed: int = 0, cache: bool = True) -> TensorDataset:
    """The encoded training set ``(latents, prompt_embeds)`` of the model ``spec`` (a
    :class:`helpers.models.ModelSpec`) with ``settings.num_images`` pairs, from the cache when possible.
    ``config`` gives the data folder (``config.data``), the cache's folder and whether nbgrader runs."""
    from helpers.report import out_dir

    source = data_source(spec.kind, config.data)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    key_text = json.dumps([model_fingerprint(spec.source), source, settings.num_images, size, seed,
                           config.data or ""])
    key = hashlib.sha256(key_text.encode()).hexdigest()[:16]
    if cache and key in _MEMORY:
        return _MEMORY[key]
    path = out_dir(config) / "cache" / f"train-{key}.pt" if cache and not config.grading else None
    if path is not None and path.exists():
        latents, embeds = torch.load(path, map_location="cpu", weights_only=True)
        dataset = TensorDataset(latents, embeds)
    else:
        if source == "digits":
            images, captions, _ = digit_pairs(settings.num_images, seed=seed, size=size)
            pairs: tuple | Iterable = (images, captions)
        else:
            pairs = caption_pairs(settings.num_images, size, config.data)
        store = torch.float16 if pipe.vae.dtype == torch.float16 else torch.float32
        large = size > 128  # SD1.5's 512x512: smaller VAE batches, images read by worker processes
        dataset = encode_pairs(pipe, pairs, batch_size=8 if large else 64, seed=seed, store_dtype=store,
                               num_workers=min(8, os.cpu_count() or 1) if large and source == "captions" else 0)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".partial")
            torch.save(list(dataset.tensors), tmp)
            tmp.replace(path)
    if cache:
        _MEMORY[key] = dataset
    return dataset


def _float32_batch(items: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    return tuple(torch.stack(column).float() for column in zip(*items))


def training_dataloader(dataset: TensorDataset, batch_size: int, seed: int = 0) -> DataLoader:
    """Shuffled (seeded) batches of whole size (``drop_last``) as fp32 tensors ``(latents, prompt_embeds)``:
    the training loop moves them to the device, the loss runs under autocast."""
    if len(dataset) < batch_size:
        raise ValueError(f"The training set has {len(dataset)} examples, fewer than one batch of {batch_size}: "
                         "use more images or a smaller batch_size")
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                      generator=torch.Generator().manual_seed(seed), collate_fn=_float32_batch)
