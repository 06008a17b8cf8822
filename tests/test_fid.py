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


# ------------------------------------------------------------------ the split-half FD against the teacher
def _digit_set(per_digit):
    from helpers import evaluation

    digits = torch.tensor([d for d in range(10) for _ in range(per_digit)])
    return evaluation.EvalSet([f"digit {int(d)}" for d in digits], digits, torch.zeros(len(digits), 4, 2, 2), 0)


def test_split_halves_pair_the_same_prompts_and_refuse_too_few():
    halves = _digit_set(5).split_halves()
    a, b = halves
    assert a.tolist()[:2] == [0, 1] and b.tolist()[:2] == [2, 3], "per digit: first 2 of 5 against the next 2"
    assert len(a) == len(b) == 20 and not set(a.tolist()) & set(b.tolist())
    digits = _digit_set(5).digits
    assert torch.equal(digits[a], digits[b]), "both halves ask for the same digits in the same order"
    assert _digit_set(1).split_halves() is None, "one image per digit cannot be split"


def test_split_half_fd_known_cases():
    from helpers.evaluation import split_half_fd

    halves = _digit_set(40).split_halves()
    a, b = halves
    half = _gauss(200, 6, seed=4)
    reference = torch.empty(400, 6, dtype=torch.float64)
    reference[a], reference[b] = half, half.flip(0)  # both halves of the teacher: the same set of features
    # a sampler whose images of each half are the teacher's of the *other* noise half: distance 0
    assert split_half_fd(reference, reference, halves) == pytest.approx(0.0, abs=1e-6)
    # shifted by 0.5 in every one of the 6 dimensions: exactly 6 * 0.25 (the covariances agree)
    assert split_half_fd(reference + 0.5, reference, halves) == pytest.approx(1.5, rel=1e-6)
    # it never compares an image with the teacher's image of its own noise: a sampler that copies the teacher
    # exactly scores the teacher's own floor, not 0, when the halves differ
    other = _gauss(400, 6, seed=5)
    floor = split_half_fd(other, other, halves)
    assert floor > 0.01 and frechet_distance(other, other) == pytest.approx(0.0, abs=1e-6)
    assert floor == pytest.approx(0.5 * (frechet_distance(other[a], other[b]) + frechet_distance(other[b], other[a])))


def test_measure_reports_the_split_fd_and_computes_the_teachers_features_once(kit_config, monkeypatch):
    from helpers import evaluation, quality
    from helpers.fakes import ToyUNet, tiny_pipeline

    calls = []
    net = quality.digit_net()
    counting = quality.FeatureNet(net.name, lambda x: (calls.append(len(x)), net.embed(x))[1], net.batch_size)
    monkeypatch.setattr(quality, "digit_net", lambda: counting)
    eval_set = evaluation.make_eval_set(tiny_pipeline(ToyUNet(sample_size=16)), per_digit=4)
    teacher = torch.rand(40, 3, 32, 32)
    own = evaluation.measure(teacher, eval_set, None, kit_config)
    assert own["fd_teacher_split"].value > 0 and own["fd_teacher_split"].images == 40
    assert own["fd_teacher_split"].reference_images == 20 and "other half" in own["fd_teacher_split"].against
    calls.clear()
    for blur in (1, 3, 5):
        evaluation.measure(torch.nn.functional.avg_pool2d(teacher, blur, 1, blur // 2), eval_set, teacher, kit_config)
    assert calls == [40, 40, 40], f"only the samplers' features are computed, the teacher's are kept: {calls}"
    evaluation.measure(teacher, eval_set, teacher.clone(), kit_config)  # another reference tensor: computed again
    assert calls[-2:] == [40, 40]
    tiny = evaluation.measure(teacher[:10], evaluation.make_eval_set(tiny_pipeline(ToyUNet(sample_size=16)),
                                                                      per_digit=1), None, kit_config)
    assert tiny["fd_teacher_split"].value is None and "too few" in tiny["fd_teacher_split"].skipped
