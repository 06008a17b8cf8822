"""Train the digit classifier behind :func:`helpers.metrics.prompt_accuracy` (seeded, about a minute on a
2-core CPU):

    python -m helpers.commands.train_classifier [--out helpers/assets/digit_classifier.safetensors] [--seed 0]
                                                [--epochs 30]

It is saved (safetensors) with a JSON file beside it holding its held-out accuracy. What notebooks and the
evaluation use at run time -- loading and applying the shipped classifier -- is :mod:`helpers.metrics`.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from sklearn.model_selection import train_test_split

from helpers import metrics
from helpers.small_model import load_digits_dataset

__all__ = ["digit_split", "train_classifier", "main"]


def digit_split(seed: int = 0, test_fraction: float = 0.2
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The real digits split for the classifier: ``(x_train, y_train, x_test, y_test)``.

    Images are grey ``(N, 1, 32, 32)`` in [0, 1] (the kit's 32×32 upscaling), stratified split with
    scikit-learn, ``random_state=seed``. The shipped classifier used ``seed=0, test_fraction=0.2``.
    """
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


def train_classifier(out: str | Path = metrics.CLASSIFIER_PATH, seed: int = 0, epochs: int = 30,
                     batch_size: int = 64, lr: float = 2e-3, verbose: bool = True) -> dict:
    """Train :class:`helpers.metrics.DigitClassifier` on the train split of :func:`digit_split`, save the weights
    (safetensors) to ``out`` and a JSON file with the held-out accuracy beside it; returns that info."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x_tr, y_tr, x_te, y_te = digit_split(seed=0)
    model = metrics.DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * math.ceil(len(y_tr) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    t0 = time.time()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(y_tr), generator=g)
        for i in range(0, len(perm), batch_size):
            j = perm[i:i + batch_size]
            loss = F.cross_entropy(model(metrics._stretch(_augment(x_tr[j], g))), y_tr[j], label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if verbose and (epoch + 1) % 5 == 0:
            model.eval()
            acc = metrics.prompt_accuracy(x_te, y_te, classifier=model)
            print(f"epoch {epoch + 1}/{epochs} loss {loss.item():.4f} held-out acc {acc:.4f}", flush=True)
    model.eval()
    acc = metrics.prompt_accuracy(x_te, y_te, classifier=model)  # the same input path as every user of the metric
    train_acc = metrics.prompt_accuracy(x_tr, y_tr, classifier=model)
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
        "command": "python -m helpers.commands.train_classifier",
    }
    out.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    metrics._cached_classifier.cache_clear()
    return info


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m helpers.commands.train_classifier [--out PATH] [--seed 0] [--epochs 30]``."""
    p = argparse.ArgumentParser(prog="python -m helpers.commands.train_classifier",
                                description="Train and save the digit classifier behind prompt_accuracy.")
    p.add_argument("--out", default=str(metrics.CLASSIFIER_PATH))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=30)
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    info = train_classifier(args.out, seed=args.seed, epochs=args.epochs)
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
