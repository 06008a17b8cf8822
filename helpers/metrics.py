"""Image metrics for any sampler: prompt accuracy with a digit classifier, PSNR, and sharpness.

* :func:`prompt_accuracy` — the fraction of generated images that a small CNN, trained on the real
  digits, classifies as the prompted digit. Meaningful for the kit's digits model (and any model asked
  for digits); images are grey-averaged and resized to 32×32 inside, so colour and size do not matter.
* :func:`psnr_db` — mean per-image PSNR between two batches (for example a 4-step sampler against the
  50-step teacher from the same initial noise); works for SD1.5 images too.
* :func:`sharpness` — mean gradient magnitude of the grey image, to quantify blur.

The classifier ships as ``helpers/assets/digit_classifier.safetensors`` with a JSON file holding its
held-out accuracy; ``python -m helpers.commands.train_classifier`` trains it again (seeded, about a minute on
a 2-core CPU).
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from helpers.config import restore_hint

__all__ = [
    "CLASSIFIER_PATH", "CLASSIFIER_INFO_PATH", "DigitClassifier", "images_to_tensor", "to_gray32",
    "load_digit_classifier", "classify_digits", "prompt_accuracy", "psnr_db", "sharpness",
]

ASSETS = Path(__file__).resolve().parent / "assets"
#: The shipped classifier weights and their metadata (held-out accuracy, split, training settings).
CLASSIFIER_PATH: Path = ASSETS / "digit_classifier.safetensors"
CLASSIFIER_INFO_PATH: Path = ASSETS / "digit_classifier.json"


class DigitClassifier(nn.Module):
    """A small CNN: grey 32×32 image in [0, 1] (shape ``(B, 1, 32, 32)``) -> 10 digit logits."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 16×16
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 8×8
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 4×4
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(64 * 16, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features((x - 0.5) / 0.5))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The features the Fréchet distance uses: the last convolution block averaged over its 4×4
        positions, ``(B, 64)``."""
        return self.features((x - 0.5) / 0.5).mean(dim=(2, 3))


# ------------------------------------------------------------------------------------------ conversion
def images_to_tensor(images) -> torch.Tensor:
    """PIL images, a list of HxWxC uint8/float arrays, or a tensor -> float tensor ``(B, C, H, W)`` in [0, 1].

    A tensor is returned as float on the CPU, unchanged otherwise (it must already be in [0, 1]).
    """
    if isinstance(images, torch.Tensor):
        t = images.detach().float().cpu()
        return t.unsqueeze(0) if t.ndim == 3 else t
    arrs = []
    for im in images:
        a = np.asarray(im)
        a = a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a.astype(np.float32)
        if a.ndim == 2:
            a = a[:, :, None]
        arrs.append(torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1))
    if not arrs:
        raise ValueError("images_to_tensor got no images")
    return torch.stack(arrs)


def to_gray32(images, stretch: bool = True) -> torch.Tensor:
    """Images (see :func:`images_to_tensor`) -> grey ``(B, 1, 32, 32)`` in [0, 1]: channel mean, an
    antialiased bilinear resize when the size is not 32×32, then (``stretch``) a per-image contrast
    stretch ``(g - min) / max(max - min, 0.25)``, so that ink and background colours do not matter."""
    x = images_to_tensor(images)
    x = x.mean(dim=1, keepdim=True) if x.shape[1] != 1 else x
    if x.shape[-2:] != (32, 32):
        x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
    x = x.clamp(0.0, 1.0)
    return _stretch(x) if stretch else x


def _stretch(x: torch.Tensor) -> torch.Tensor:
    """Per-image contrast stretch of grey images ``(B, 1, H, W)`` in [0, 1] (see :func:`to_gray32`)."""
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    return ((x - lo) / (hi - lo).clamp_min(0.25)).clamp(0.0, 1.0)


# ------------------------------------------------------------------------------------------ classifier
@lru_cache(maxsize=4)
def _cached_classifier(path: str) -> DigitClassifier:
    if not Path(path).exists():
        hint = restore_hint(path) + ", or t" if Path(path) == CLASSIFIER_PATH else "T"
        raise FileNotFoundError(f"No digit classifier at {path}. {hint}rain it with "
                                "`python -m helpers.commands.train_classifier`.")
    model = DigitClassifier()
    model.load_state_dict(load_file(path))
    return model.eval()


def load_digit_classifier(path: str | Path | None = None) -> DigitClassifier:
    """The shipped digit classifier (cached, eval mode, on the CPU)."""
    return _cached_classifier(str(path or CLASSIFIER_PATH))


@torch.no_grad()
def classify_digits(images, classifier: DigitClassifier | None = None, batch_size: int = 512) -> torch.Tensor:
    """Predicted digit (int64 tensor ``(B,)``) for each image (tensor ``(B, C, H, W)`` in [0, 1] or PIL list)."""
    model = classifier or load_digit_classifier()
    x = to_gray32(images)
    return torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


def prompt_accuracy(images, digits: Sequence[int] | torch.Tensor,
                    classifier: DigitClassifier | None = None) -> float:
    """Fraction of ``images`` the digit classifier assigns to the prompted digit.

    ``images``: float tensor ``(B, 3, H, W)`` in [0, 1] (any H, W; resized to 32×32 inside; colour is
    averaged away) or a list of PIL images. ``digits``: the prompted digit of each image (list or tensor).
    """
    pred = classify_digits(images, classifier)
    target = torch.as_tensor(digits, dtype=torch.long).reshape(-1).cpu()
    if target.shape[0] != pred.shape[0]:
        raise ValueError(f"{pred.shape[0]} images but {target.shape[0]} digits")
    return float((pred == target).float().mean().item())


# ----------------------------------------------------------------------------------------- PSNR & blur
def psnr_db(images, reference, max_value: float = 1.0, cap_db: float = 100.0) -> float:
    """Mean over images of the per-image PSNR in dB, ``10·log10(max_value² / MSE)``.

    ``images`` and ``reference``: tensors ``(B, C, H, W)`` (or PIL lists) of the same shape, in
    [0, max_value]. Each image's PSNR is capped at ``cap_db``, so identical images give exactly
    ``cap_db`` instead of infinity and the mean stays finite.
    """
    a, b = images_to_tensor(images).double(), images_to_tensor(reference).double()
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")
    mse = (a - b).pow(2).flatten(1).mean(1)
    psnr = torch.where(mse > 0, 10.0 * torch.log10(max_value ** 2 / mse.clamp_min(1e-300)),
                       torch.full_like(mse, cap_db))
    return float(psnr.clamp(max=cap_db).mean().item())


def sharpness(images) -> float:
    """Mean gradient magnitude (finite differences) of the grey 32×32 images in [0, 1]: lower = blurrier.
    The real digits score about 0.10."""
    x = to_gray32(images).double()
    gx = x[..., :, 1:] - x[..., :, :-1]
    gy = x[..., 1:, :] - x[..., :-1, :]
    return float(((gx[..., :-1, :] ** 2 + gy[..., :, :-1] ** 2).sqrt()).mean().item())
