"""Prompt encoding with the pipeline's own text encoder (no gradients)."""
from __future__ import annotations

import torch

__all__ = ["encode_prompts", "empty_prompt_embeds"]


@torch.no_grad()
def encode_prompts(pipe, prompts: str | list[str]) -> torch.Tensor:
    """Text embeddings ``(B, 77, D)`` for a list of prompts, on the UNet's device and dtype."""
    if isinstance(prompts, str):
        prompts = [prompts]
    embeds, _ = pipe.encode_prompt(prompts, device=pipe.unet.device, num_images_per_prompt=1,
                                   do_classifier_free_guidance=False)
    return embeds.to(pipe.unet.dtype)


@torch.no_grad()
def empty_prompt_embeds(pipe, batch_size: int) -> torch.Tensor:
    """Embeddings of the empty prompt "" repeated ``batch_size`` times: the unconditional branch of
    classifier-free guidance."""
    return encode_prompts(pipe, [""]).expand(batch_size, -1, -1).contiguous()
