"""The distribution distances on known cases: same set -> ~0, shifted / blurred sets -> larger."""
import numpy as np
import pytest
import torch

from helpers.fid import digit_features, frechet_distance, kernel_distance


def _gauss(n, d, shift=0.0, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) * scale + shift


def test_frechet_closed_form_for_gaussians():
    # Two isotropic Gaussians: FD = |mu_a - mu_b|^2 + d (s_a - s_b)^2, estimated from samples.
    a, b = _gauss(20000, 4, seed=1), _gauss(20000, 4, shift=0.5, scale=2.0, seed=2)
    assert frechet_distance(a, b) == pytest.approx(4 * 0.25 + 4 * 1.0, rel=0.05)


def test_frechet_same_set_is_zero_and_grows_with_shift():
    a = _gauss(500, 8)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    small, large = frechet_distance(a, a + 0.1), frechet_distance(a, a + 1.0)
    assert 0 < small < large
    assert large == pytest.approx(8 * 1.0, rel=1e-6)


def test_kernel_distance_same_distribution_near_zero():
    a, b, c = _gauss(400, 16, seed=1), _gauss(400, 16, seed=2), _gauss(400, 16, shift=1.0, seed=3)
    same, _ = kernel_distance(a, b)
    diff, std = kernel_distance(a, c)
    assert abs(same) < 3 * max(std, 1e-3) < diff


def test_bad_features_are_refused():
    with pytest.raises(ValueError, match="feature sizes differ"):
        frechet_distance(_gauss(10, 3), _gauss(10, 4))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(torch.full((4, 2), float("nan")), _gauss(4, 2))


def test_digit_features_blur_scores_worse():
    from sklearn.datasets import load_digits

    digits = load_digits().images[:600] / 16.0
    real = torch.from_numpy(np.repeat(digits[:, None], 3, axis=1)).float()
    blurred = torch.nn.functional.avg_pool2d(torch.nn.functional.interpolate(real, size=32), 5, 1, 2)
    fa, fb = digit_features(real[:300]), digit_features(real[300:])
    assert fa.shape == (300, 64)
    assert frechet_distance(fa, fb) < frechet_distance(fa, digit_features(blurred[300:]))
