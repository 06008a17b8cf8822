"""The kit's image metrics: the digit classifier behind prompt_accuracy, and psnr_db."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from helpers import metrics
from helpers.commands.train_classifier import digit_split


@pytest.fixture(scope="module")
def held_out():
    _, _, x_te, y_te = digit_split(seed=0)
    return x_te, y_te


def test_shipped_classifier_files_exist_and_record_accuracy():
    assert metrics.CLASSIFIER_PATH.exists(), "run `python -m helpers.commands.train_classifier`"
    info = json.loads(metrics.CLASSIFIER_INFO_PATH.read_text())
    assert info["held_out_accuracy"] >= 0.9


def test_classifier_scores_real_held_out_digits_high(held_out):
    x, y = held_out
    rgb = x.expand(-1, 3, -1, -1)  # the kit's images are RGB in [0, 1]
    assert metrics.prompt_accuracy(rgb, y) >= 0.9
    assert metrics.prompt_accuracy(rgb, y.tolist()) >= 0.9  # a list of ints works too


def test_classifier_ignores_colour_and_resizes(held_out):
    x, y = held_out
    x, y = x[:60], y[:60]
    tinted = torch.cat([x * 0.9, x * 0.6, x * 0.3], dim=1)  # same grey mean as 0.6·x
    big = torch.nn.functional.interpolate(x.expand(-1, 3, -1, -1), size=(64, 64), mode="bilinear")
    assert metrics.prompt_accuracy(tinted, y) >= 0.85
    assert metrics.prompt_accuracy(big, y) >= 0.85


def test_prompt_accuracy_takes_pil_images(held_out):
    x, y = held_out
    pil = [Image.fromarray((im[0].numpy() * 255).round().astype("uint8")).convert("RGB") for im in x[:40]]
    assert metrics.prompt_accuracy(pil, y[:40]) >= 0.85
    assert metrics.images_to_tensor(pil).shape == (40, 3, 32, 32)


def test_classifier_scores_uniform_noise_low():
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(200, 3, 32, 32, generator=g)
    digits = torch.arange(200) % 10
    assert metrics.prompt_accuracy(noise, digits) <= 0.3


def test_prompt_accuracy_checks_lengths(held_out):
    x, y = held_out
    with pytest.raises(ValueError):
        metrics.prompt_accuracy(x[:4], y[:5])


def test_psnr_of_identical_images_is_the_cap():
    x = torch.rand(4, 3, 32, 32)
    assert metrics.psnr_db(x, x.clone()) == 100.0
    assert metrics.psnr_db(x, x.clone(), cap_db=60.0) == 60.0


def test_psnr_of_very_different_images_is_low():
    zeros, ones = torch.zeros(2, 3, 16, 16), torch.ones(2, 3, 16, 16)
    assert metrics.psnr_db(zeros, ones) == pytest.approx(0.0, abs=1e-9)
    g = torch.Generator().manual_seed(1)
    assert metrics.psnr_db(torch.rand(4, 3, 16, 16, generator=g), torch.rand(4, 3, 16, 16, generator=g)) < 10.0


def test_psnr_decreases_as_noise_grows():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(8, 3, 32, 32, generator=g)
    n = torch.randn(x.shape, generator=g)
    values = [metrics.psnr_db((x + s * n).clamp(0, 1), x) for s in (0.01, 0.05, 0.1, 0.3)]
    assert all(a > b for a, b in zip(values, values[1:])), values
    # one known value: MSE 0.01 on [0, 1] images is 20 dB
    assert metrics.psnr_db(torch.full((1, 1, 4, 4), 0.1), torch.zeros(1, 1, 4, 4)) == pytest.approx(20.0)


def test_psnr_is_a_mean_of_per_image_values():
    a = torch.zeros(2, 1, 4, 4)
    b = torch.stack([torch.zeros(1, 4, 4), torch.full((1, 4, 4), 0.1)])
    assert metrics.psnr_db(b, a) == pytest.approx((100.0 + 20.0) / 2)


def test_psnr_rejects_shape_mismatch():
    with pytest.raises(ValueError):
        metrics.psnr_db(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 4, 4))


def test_sharpness_drops_with_blur(held_out):
    x, _ = held_out
    blurred = torch.nn.functional.avg_pool2d(x, 5, 1, 2)
    assert metrics.sharpness(blurred) < metrics.sharpness(x)
