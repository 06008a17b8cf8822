"""Image grids and loss curves with matplotlib (headless-safe: set MPLBACKEND=Agg for scripts)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

__all__ = ["to_numpy_images", "show_images", "plot_losses"]


def to_numpy_images(images) -> list[np.ndarray]:
    """PIL images, a list of arrays, or a tensor ``(B, 3, H, W)`` in [0, 1] -> list of HxWx3 float arrays."""
    if isinstance(images, torch.Tensor):
        arr = images.detach().float().clamp(0, 1).cpu().permute(0, 2, 3, 1).numpy()
        return list(arr)
    return [np.asarray(im, dtype=np.float32) / (255.0 if np.asarray(im).dtype == np.uint8 else 1.0) for im in images]


def show_images(images, titles: Sequence[str] | None = None, ncols: int | None = None,
                suptitle: str | None = None, save_to: str | Path | None = None, size: float = 2.0):
    """Show images in a grid (one row by default) and optionally save the figure; returns the figure."""
    arrs = to_numpy_images(images)
    n = len(arrs)
    if n == 0:
        raise ValueError("show_images got no images")
    ncols = ncols or n
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows + (0.4 if suptitle else 0)),
                             squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(arrs[i], interpolation="nearest")
            if titles is not None and i < len(titles):
                ax.set_title(titles[i], fontsize=8)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    if save_to is not None:
        Path(save_to).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(save_to, dpi=100)
    return fig


def plot_losses(curves: Mapping[str, Sequence[float]], save_to: str | Path | None = None, smooth: int = 1,
                title: str = "training loss"):
    """Plot one or more loss curves (optionally smoothed with a running mean of ``smooth`` points)."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, values in curves.items():
        y = np.asarray(values, dtype=np.float64)
        if smooth > 1 and len(y) >= smooth:
            y = np.convolve(y, np.ones(smooth) / smooth, mode="valid")
        ax.plot(y, label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    if save_to is not None:
        Path(save_to).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(save_to, dpi=100)
    return fig
