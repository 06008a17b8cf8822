"""Hidden battery of assignment 02: ``q_sample`` and ``ddim_solver_step``.

Both are compared with the reference on fresh random latents, on SD1.5's schedule and on a different
(linear) one, for t = 0, s = 0, t = s, large t and batches that mix them; fp32 on the CPU and fp16 on CUDA
when a GPU is visible. ``q_sample`` without ``noise`` is checked statistically (fresh standard normal noise
per call and per sample, reproducible under ``torch.manual_seed``).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from autograder.checks._tensors import (Setting, assert_close, assert_tensor, assert_unchanged, call,
                                        linear_scheduler, new_generator, randint, randn, sd15_scheduler, settings,
                                        snapshot, step_pairs)
from helpers.schedule import alpha_sigma

__all__ = ["CHECKS", "DEPENDS", "FORBIDDEN_NAMES", "check_q_sample", "check_ddim_solver_step"]

SHAPE = (6, 4, 8, 8)

Q_HINT = ("Expected x_t = sqrt(ab[t])*x + sqrt(1 - ab[t])*noise per sample, with ab = "
          "scheduler.alphas_cumprod and no special case at t = 0 (this is the forward process).")
DDIM_HINT = ("Expected x0_hat = (x_t - sigma_t*eps)/alpha_t and x_s = alpha_s*x0_hat + sigma_s*eps with "
             "alpha = sqrt(ab), sigma = sqrt(1 - ab) gathered per sample.")


# ----------------------------------------------------------------------------------------------- q_sample
def _q_case(student: Callable, ref: dict, st: Setting, sched, t: torch.Tensor, what: str, hint: str,
            gen: torch.Generator, seed: int) -> None:
    x, noise = randn(gen, (t.shape[0], *SHAPE[1:]), st), randn(gen, (t.shape[0], *SHAPE[1:]), st)
    before = snapshot(x, noise, t, sched.alphas_cumprod)
    out = call(student, "q_sample(x, t, scheduler, noise=noise)", x, t, sched, noise=noise)
    assert_tensor(out, "q_sample", x.shape, x.dtype, st.device)
    assert_unchanged("q_sample", before, [x, noise, t, sched.alphas_cumprod],
                     ["x", "noise", "t", "scheduler.alphas_cumprod"])
    expected = ref["q_sample"](x, t, sched, noise=noise)
    assert_close(out, expected, f"q_sample with the given noise, {what}", st, seed, hint, t=t)


def _q_fresh_noise(student: Callable, st: Setting, gen: torch.Generator, seed: int) -> None:
    """Without ``noise``: fresh N(0, I) noise per call and per sample, from torch's global generator."""
    sched = sd15_scheduler(st.device)
    shape = (8, 4, 16, 16)
    x = randn(gen, shape, st)
    t = randint(gen, 100, 999, shape[0], st)  # sigma_t >= 0.3: the implied noise is well conditioned
    name = "q_sample(x, t, scheduler) without noise"
    devices = [st.device] if st.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # leave the notebook's random state as it was
        torch.manual_seed(seed)
        first = call(student, name, x, t, sched)
        second = call(student, name, x, t, sched)
        torch.manual_seed(seed)
        again = call(student, name, x, t, sched)
    assert_tensor(first, "q_sample", x.shape, x.dtype, st.device)
    assert not torch.equal(first, second), (
        f"{name} returned the same x_t twice: draw fresh noise on every call (torch.randn_like(x)); "
        "do not seed inside the function")
    assert torch.equal(first, again), (
        f"{name} is not repeatable under torch.manual_seed: draw the noise from torch's global generator "
        "(torch.randn_like(x)), not from a generator of your own")
    alpha, sigma = alpha_sigma(sched, t, x.ndim)
    eps = (first.float() - alpha * x.float()) / sigma
    mean, std = eps.mean().item(), eps.std().item()
    assert abs(mean) < 0.1 and abs(std - 1) < 0.1, (
        f"{name}: the noise it added has mean {mean:.3f} and std {std:.3f}; it must be standard normal "
        f"(torch.randn_like, not torch.rand_like), scaled by sigma_t = sqrt(1 - ab[t]) [seed {seed}]")
    flat = eps.flatten(1)
    corr = torch.corrcoef(flat[:2])[0, 1].item()
    assert abs(corr) < 0.5, (
        f"{name}: samples 0 and 1 got the same noise (correlation {corr:.2f}); draw noise of x's full shape "
        f"[seed {seed}]")


def check_q_sample(student: Callable, ref: dict) -> None:
    """q_sample vs the reference: mixed timesteps, t = 0 (no override), t = 999, two schedules, no noise."""
    for st in settings():
        gen, seed = new_generator()
        sched = sd15_scheduler(st.device)
        t = randint(gen, 1, 999, SHAPE[0], st)
        t[-1] = 999
        _q_case(student, ref, st, sched, t, "timesteps in 1..999", Q_HINT, gen, seed)
        _q_case(student, ref, st, sched, torch.zeros_like(t), "t = 0",
                "At t = 0 the forward process still uses alpha_0 = sqrt(ab[0]) < 1 and sigma_0 = "
                "sqrt(1 - ab[0]) > 0: the boundary convention (alpha = 1, sigma = 0) is for the solver step only.",
                gen, seed)
        t_mixed = randint(gen, 0, 999, SHAPE[0], st)
        t_mixed[:2] = torch.tensor([0, 999], device=st.device)
        _q_case(student, ref, st, linear_scheduler(st.device), t_mixed,
                "a batch of mixed timesteps on a non-SD1.5 (linear) schedule",
                Q_HINT + " Read ab from the scheduler you are given; do not hard-code SD1.5's values.", gen, seed)
        _q_fresh_noise(student, st, gen, seed)


# --------------------------------------------------------------------------------------- ddim_solver_step
def _ddim_case(student: Callable, ref: dict, st: Setting, sched, t: torch.Tensor, s: torch.Tensor, what: str,
               hint: str, gen: torch.Generator, seed: int) -> None:
    eps, x_t = randn(gen, (t.shape[0], *SHAPE[1:]), st), randn(gen, (t.shape[0], *SHAPE[1:]), st)
    before = snapshot(eps, x_t, t, s, sched.alphas_cumprod)
    name = "ddim_solver_step(model_output, x_t, t, s, scheduler)"
    out = call(student, name, eps, x_t, t, s, sched)
    assert_tensor(out, "ddim_solver_step", x_t.shape, x_t.dtype, st.device)
    assert_unchanged("ddim_solver_step", before, [eps, x_t, t, s, sched.alphas_cumprod],
                     ["model_output", "x_t", "t", "s", "scheduler.alphas_cumprod"])
    expected = ref["ddim_solver_step"](eps, x_t, t, s, sched)
    assert_close(out, expected, f"ddim_solver_step, {what}", st, seed, hint, t=t, s=s)


def check_ddim_solver_step(student: Callable, ref: dict) -> None:
    """ddim_solver_step vs the reference: 0 < s < t, s = 0, t = s = 0, t = s, mixed batches, two schedules."""
    for st in settings():
        gen, seed = new_generator()
        sched = sd15_scheduler(st.device)
        n = SHAPE[0]
        t, s = step_pairs(gen, n, st)
        t[0], s[0] = 999, 749  # the first step of the 4-step sampler
        _ddim_case(student, ref, st, sched, t, s, "steps with 0 < s < t", DDIM_HINT, gen, seed)
        _ddim_case(student, ref, st, sched, t, torch.zeros_like(s), "steps to s = 0",
                   "At s = 0 use the boundary convention alpha_s = 1, sigma_s = 0: the step to 0 returns x0_hat.",
                   gen, seed)
        zero = torch.zeros_like(t)
        _ddim_case(student, ref, st, sched, zero, zero, "t = 0 and s = 0",
                   "At t = 0 use alpha_t = 1, sigma_t = 0 too (x_0 is the clean sample): the step returns x_t.",
                   gen, seed)
        _ddim_case(student, ref, st, sched, t, t.clone(), "t = s",
                   "A step from t to the same t must return x_t unchanged.", gen, seed)
        t_mix, s_mix = step_pairs(gen, n, st)
        t_mix[:4] = torch.tensor([0, 999, 500, 37], device=st.device)
        s_mix[:4] = torch.tensor([0, 0, 500, 18], device=st.device)
        _ddim_case(student, ref, st, sched, t_mix, s_mix, "a batch mixing t = s = 0, s = 0, t = s and 0 < s < t",
                   "Every sample has its own t and s: gather alpha and sigma per sample and apply the boundary "
                   "convention per sample (e.g. torch.where(s == 0, 1.0, alpha_s)), not to the whole batch.",
                   gen, seed)
        _ddim_case(student, ref, st, linear_scheduler(st.device), t_mix, s_mix,
                   "mixed timesteps on a non-SD1.5 (linear) schedule",
                   DDIM_HINT + " Read ab from the scheduler you are given.", gen, seed)


CHECKS = {"q_sample": check_q_sample, "ddim_solver_step": check_ddim_solver_step}
DEPENDS: dict[str, tuple[str, ...]] = {"q_sample": (), "ddim_solver_step": ()}
FORBIDDEN_NAMES: dict[str, tuple[str, ...]] = {"q_sample": (), "ddim_solver_step": ()}
