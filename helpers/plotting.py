"""Image grids and loss curves with matplotlib (headless-safe: set MPLBACKEND=Agg for scripts)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

__all__ = ["to_numpy_images", "show_images", "plot_losses", "STEPS_PANELS", "plot_steps_quality"]


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


#: The panels of :func:`plot_steps_quality`: metric key, axis label, whether stochastic samplers are drawn.
STEPS_PANELS: tuple[tuple[str, str, bool], ...] = (
    ("fd_teacher_split", "FD vs DDIM-50 of other noise\n(lower is better)", True),
    ("prompt_accuracy", "prompt accuracy", True),
    ("psnr_teacher", "PSNR vs DDIM-50, same noise (dB)\n(deterministic samplers)", False),
)


def plot_steps_quality(teacher: Mapping[int, Mapping[str, float]], students: Mapping[str, tuple[int, Mapping[str, float]]],
                       spread: Mapping[str, Mapping[int, float]] | None = None, stochastic: Sequence[str] = (),
                       save_to: str | Path | None = None):
    """Quality against the number of sampling steps: the teacher's DDIM as a line (``teacher``: ``{steps: {metric:
    value}}``, error bars from ``spread``: ``{metric: {steps: sd}}``) and each student as a marker at its step count
    (``students``: ``{name: (steps, {metric: value})}``), one panel per :data:`STEPS_PANELS` metric that has a value.
    PSNR leaves out the ``stochastic`` students (fresh noise at every step: not on the teacher's trajectory) and the
    50-step teacher (the reference itself). Returns the figure."""
    panels = [p for p in STEPS_PANELS if any(m.get(p[0]) is not None for m in teacher.values())
              or any(m.get(p[0]) is not None for _, m in students.values())]
    if not panels:
        raise ValueError("plot_steps_quality: none of the metrics " + ", ".join(k for k, _, _ in STEPS_PANELS)
                         + " has a value")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    markers = "osD^vP*X"
    style = {name: (markers[j % len(markers)], f"C{j % 10}") for j, name in enumerate(students)}  # same in every panel
    offset = {name: 1 + 0.06 * (j - (len(students) - 1) / 2) for j, name in enumerate(students)}
    for ax, (key, label, with_stochastic) in zip(axes[0], panels):
        steps = sorted(k for k, m in teacher.items() if m.get(key) is not None and not (key == "psnr_teacher" and k >= 50))
        if steps:
            err = [(spread or {}).get(key, {}).get(k) for k in steps]
            ax.errorbar(steps, [teacher[k][key] for k in steps], yerr=None if None in err else err, color="0.3",
                        marker="o", capsize=3, label="teacher DDIM")
        shown = [(n, st, m) for n, (st, m) in students.items() if m.get(key) is not None
                 and (with_stochastic or n not in stochastic)]
        for name, st, m in shown:
            ax.plot([st * offset[name]], [m[key]], style[name][0], color=style[name][1], markersize=8, label=name)
        ax.set_xscale("log")
        ticks = sorted(set(steps) | {st for _, st, _ in shown})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("sampling steps")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    if save_to is not None:
        Path(save_to).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(save_to, dpi=100)
    return fig
