"""Seeding: one call makes a run repeatable; generators for samplers that take one."""
from __future__ import annotations

import random

import numpy as np
import torch

__all__ = ["seed_everything", "make_generator"]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``seed`` (what diffusers pipelines take)."""
    return torch.Generator(device=torch.device(device)).manual_seed(seed)
