"""Distribution distances between two image sets, on features from any network.

One code path for every model kind: a *feature extractor* turns images into vectors (the digit
classifier's pooled features on the small model; an Inception network on SD1.5), and the same two
distances compare the two sets of vectors:

* :func:`frechet_distance` — the Fréchet distance between Gaussians fitted to the two feature sets,
  ``|mu_a - mu_b|² + Tr(S_a + S_b - 2 (S_a S_b)^½)`` (Heusel et al. 2017, "FID" when the features are
  Inception's pool3). Biased upwards for small sets: compare numbers computed with the same N only.
* :func:`kernel_distance` — the kernel (MMD²) distance with the cubic polynomial kernel
  ``k(x, y) = (x·y / d + 1)³`` (Bińkowski et al. 2018, "KID"), unbiased, averaged over random subsets,
  with its standard deviation: the better number for a few hundred images.

Both take float tensors ``(N, D)`` and ``(M, D)`` and compute in float64 on the CPU.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
from scipy import linalg

from helpers.metrics import DigitClassifier, load_digit_classifier, to_gray32

__all__ = ["frechet_distance", "kernel_distance", "digit_features"]


def _as_features(x: torch.Tensor, name: str) -> np.ndarray:
    a = torch.as_tensor(x).detach().to("cpu", torch.float64).numpy()
    if a.ndim != 2 or a.shape[0] < 2:
        raise ValueError(f"{name}: expected features of shape (N >= 2, D), got {tuple(a.shape)}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name}: features contain NaN or inf (are the images in [0, 1]?)")
    return a


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to ``features_a`` ``(N, D)`` and ``features_b`` ``(M, D)``."""
    a, b = _as_features(features_a, "features_a"), _as_features(features_b, "features_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: {a.shape[1]} vs {b.shape[1]}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    with warnings.catch_warnings():  # a singular product (e.g. a set against itself) is expected
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s_a @ s_b)
        if not np.isfinite(covmean).all():  # regularise as pytorch-fid does
            eps = 1e-6 * np.eye(s_a.shape[0])
            covmean = linalg.sqrtm((s_a + eps) @ (s_b + eps))
    covmean = covmean.real
    value = float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2.0 * np.trace(covmean))
    return max(value, 0.0)


def kernel_distance(features_a: torch.Tensor, features_b: torch.Tensor, subsets: int = 50,
                    subset_size: int = 100, seed: int = 0) -> tuple[float, float]:
    """Unbiased MMD² with the kernel ``(x·y / d + 1)³`` over ``subsets`` random subsets of
    ``min(subset_size, N, M)`` rows each: ``(mean, std)``."""
    a, b = _as_features(features_a, "features_a"), _as_features(features_b, "features_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: {a.shape[1]} vs {b.shape[1]}")
    d, m = a.shape[1], min(subset_size, len(a), len(b))
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        kxx, kyy, kxy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
        off = m * (m - 1)
        values.append((kxx.sum() - np.trace(kxx)) / off + (kyy.sum() - np.trace(kyy)) / off
                      - 2.0 * kxy.mean())
    return float(np.mean(values)), float(np.std(values))


@torch.no_grad()
def digit_features(images, classifier: DigitClassifier | None = None, batch_size: int = 512) -> torch.Tensor:
    """The digit classifier's features of each image (:meth:`DigitClassifier.embed`) -> ``(B, 64)``.
    Images as for :func:`helpers.metrics.to_gray32`."""
    model = classifier or load_digit_classifier()
    x = to_gray32(images)
    return torch.cat([model.embed(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
