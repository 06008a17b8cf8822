"""Schedule utilities that are not student tasks: per-sample alpha_t and sigma_t.

Notation of the course: ``ab = scheduler.alphas_cumprod``, alpha_t = sqrt(ab[t]), sigma_t = sqrt(1 - ab[t]).
These helpers only *gather* the values for a batch of timesteps; what to do at the boundary t = 0 is part
of the students' tasks and is deliberately not handled here.
"""
from __future__ import annotations

import torch

__all__ = ["gather", "alpha_sigma", "timesteps_like"]


def gather(values: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """Pick ``values[t]`` for each sample and shape it ``(B, 1, ..., 1)`` with ``ndim`` dimensions in all.

    ``values`` is a 1-D table over timesteps (for example ``scheduler.alphas_cumprod``); ``t`` is a 1-D long
    tensor of per-sample timesteps. The result is on ``t``'s device, so it broadcasts against a batch of
    latents of shape ``(B, C, H, W)`` when ``ndim == 4``.
    """
    if t.ndim != 1:
        raise ValueError(f"t must be a 1-D tensor of per-sample timesteps, got shape {tuple(t.shape)}")
    out = values.to(t.device)[t.long()]
    return out.reshape(t.shape[0], *([1] * (ndim - 1)))


def alpha_sigma(scheduler, t: torch.Tensor, ndim: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(alpha_t, sigma_t)`` for each sample, shaped ``(B, 1, ..., 1)``, in fp32.

    No boundary override: ``t = 0`` gives SD1.5's ``alpha_0 = sqrt(ab[0])`` which is slightly below 1.
    """
    ab = scheduler.alphas_cumprod.to(torch.float32)
    a = gather(ab, t, ndim)
    return a.sqrt(), (1.0 - a).sqrt()


def timesteps_like(value: int | list[int] | torch.Tensor, batch_size: int, device: str | torch.device) -> torch.Tensor:
    """A 1-D long tensor of ``batch_size`` timesteps from an int, a list or a tensor."""
    t = torch.as_tensor(value, device=device, dtype=torch.long)
    if t.ndim == 0:
        t = t.expand(batch_size).clone()
    if t.shape != (batch_size,):
        raise ValueError(f"expected {batch_size} timesteps, got shape {tuple(t.shape)}")
    return t
