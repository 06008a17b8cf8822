"""Image metrics for any sampler: prompt accuracy with a digit classifier, PSNR, and sharpness.

* :func:`prompt_accuracy` — the fraction of generated images that a small CNN, trained on the real
  digits, classifies as the prompted digit. Meaningful for the kit's digits model (and any model asked
  for digits); images are grey-averaged and resized to 32×32 inside, so colour and size do not matter.
* :func:`psnr_db` — mean per-image PSNR between two batches (for example a 4-step sampler against the
  50-step teacher from the same initial noise); works for SD1.5 images too.
* :func:`sharpness` — mean gradient magnitude of the grey image, to quantify blur.

Train and ship the classifier with ``python -m helpers.metrics --train`` (seeded, about a minute on a
2-core CPU); it is saved as ``helpers/assets/digit_classifier.safetensors`` with a JSON file holding its
held-out accuracy.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "CLASSIFIER_PATH", "CLASSIFIER_INFO_PATH", "DigitClassifier", "images_to_tensor", "to_gray32",
    "digit_split", "train_classifier", "load_digit_classifier", "classify_digits", "prompt_accuracy",
    "psnr_db", "sharpness",
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
def digit_split(seed: int = 0, test_fraction: float = 0.2
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The real digits split for the classifier: ``(x_train, y_train, x_test, y_test)``.

    Images are grey ``(N, 1, 32, 32)`` in [0, 1] (the kit's 32×32 upscaling), stratified split with
    scikit-learn, ``random_state=seed``. The shipped classifier used ``seed=0, test_fraction=0.2``.
    """
    from sklearn.model_selection import train_test_split

    from helpers.small_model import load_digits_dataset

    x, y = load_digits_dataset()
    x = (x[:, :1] + 1.0) / 2.0
    idx = np.arange(len(y))
    tr, te = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=y.numpy())
    tr, te = torch.from_numpy(np.sort(tr)), torch.from_numpy(np.sort(te))
    return x[tr], y[tr], x[te], y[te]


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random shifts (±3 px), contrast/brightness jitter, occasional blur and noise: makes the classifier
    robust to the small artefacts of generated digits."""
    b = x.shape[0]
    theta = torch.zeros(b, 2, 3)
    scale = 1.0 + (torch.rand(b, generator=g) - 0.5) * 0.2
    theta[:, 0, 0] = scale
    theta[:, 1, 1] = scale
    theta[:, :, 2] = (torch.rand(b, 2, generator=g) - 0.5) * 2 * (3 / 16)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return _photometric(F.grid_sample(x, grid, align_corners=False, padding_mode="zeros"), g)


def _photometric(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """The non-geometric part of :func:`_augment`: occasional 3×3 blur, contrast/brightness jitter, noise."""
    b = x.shape[0]
    blur = torch.rand(b, 1, 1, 1, generator=g) < 0.3
    x = torch.where(blur, F.avg_pool2d(x, 3, 1, 1), x)
    x = x * (0.7 + 0.5 * torch.rand(b, 1, 1, 1, generator=g)) + 0.1 * (torch.rand(b, 1, 1, 1, generator=g) - 0.5)
    x = x + 0.05 * torch.rand(b, 1, 1, 1, generator=g) * torch.randn(x.shape, generator=g)
    return x.clamp(0.0, 1.0)


def train_classifier(out: str | Path = CLASSIFIER_PATH, seed: int = 0, epochs: int = 30,
                     batch_size: int = 64, lr: float = 2e-3, verbose: bool = True) -> dict:
    """Train :class:`DigitClassifier` on the train split of :func:`digit_split`, save the weights
    (safetensors) to ``out`` and a JSON file with the held-out accuracy beside it; returns that info."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x_tr, y_tr, x_te, y_te = digit_split(seed=0)
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * math.ceil(len(y_tr) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    t0 = time.time()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(y_tr), generator=g)
        for i in range(0, len(perm), batch_size):
            j = perm[i:i + batch_size]
            loss = F.cross_entropy(model(_stretch(_augment(x_tr[j], g))), y_tr[j], label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if verbose and (epoch + 1) % 5 == 0:
            model.eval()
            acc = prompt_accuracy(x_te, y_te, classifier=model)
            print(f"epoch {epoch + 1}/{epochs} loss {loss.item():.4f} held-out acc {acc:.4f}", flush=True)
    model.eval()
    acc = prompt_accuracy(x_te, y_te, classifier=model)  # the same input path as every user of the metric
    train_acc = prompt_accuracy(x_tr, y_tr, classifier=model)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out))
    info = {
        "held_out_accuracy": round(acc, 4), "train_accuracy": round(train_acc, 4),
        "n_train": len(y_tr), "n_held_out": len(y_te),
        "split": "sklearn train_test_split(test_size=0.2, random_state=0, stratified) of load_digits",
        "input": "grey (channel mean) 32x32 in [0, 1], per-image contrast stretch (helpers.metrics.to_gray32)", "architecture": "3 conv(3x3)+ReLU+maxpool (16, 32, 64) -> linear 10",
        "seed": seed, "epochs": epochs, "batch_size": batch_size, "lr": lr, "augmentation": "shift/scale/blur/contrast/noise",
        "train_seconds": round(time.time() - t0, 1), "torch": torch.__version__,
        "command": "python -m helpers.metrics --train",
    }
    out.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    _cached_classifier.cache_clear()
    return info


@lru_cache(maxsize=4)
def _cached_classifier(path: str) -> DigitClassifier:
    from safetensors.torch import load_file

    if not Path(path).exists():
        raise FileNotFoundError(f"No digit classifier at {path}: train it with `python -m helpers.metrics --train`.")
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


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m helpers.metrics --train [--out PATH] [--seed 0] [--epochs 30]``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train", action="store_true", help="train and save the digit classifier")
    p.add_argument("--out", default=str(CLASSIFIER_PATH))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=30)
    args = p.parse_args(argv)
    if not args.train:
        p.print_help()
        return
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    info = train_classifier(args.out, seed=args.seed, epochs=args.epochs)
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
