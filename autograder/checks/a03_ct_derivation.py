"""Hidden battery of assignment 03: ``get_xs_from_xt_naive`` (the consistency-training estimate of x_s).

Compared with the reference on fresh random latents: with the noise that made x_t, without it (recovered
from x_t and x_0), with a given noise that did *not* make x_t (the argument must be used), at s = 0 (returns
x_0), t = s = 0, t = s, mixed batches and a non-SD1.5 schedule; extra keyword arguments (what the loss passes
to every ``get_xs_from_xt``) must be accepted and ignored. fp32 on the CPU, fp16 on CUDA when available.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from autograder.checks._tensors import (Setting, assert_close, assert_tensor, assert_unchanged, call,
                                        linear_scheduler, new_generator, randint, randn, sd15_scheduler, settings,
                                        snapshot, step_pairs)
from helpers.schedule import alpha_sigma

__all__ = ["CHECKS", "DEPENDS", "FORBIDDEN_NAMES", "check_get_xs_from_xt_naive"]

SHAPE = (6, 4, 8, 8)
NAME = "get_xs_from_xt_naive"
HINT = ("Expected x_s = alpha_s*x_0 + sigma_s*noise (alpha = sqrt(ab), sigma = sqrt(1 - ab) per sample), with "
        "alpha_s = 1, sigma_s = 0 at s = 0; when noise is None, noise = (x_t - alpha_t*x_0)/sigma_t.")


def _extra_kwargs(gen: torch.Generator, n: int, st: Setting) -> dict:
    """What cm_loss_template passes to any get_xs_from_xt; the naive CT estimate ignores all of it."""
    return {"prompt_embeds": randn(gen, (n, 7, 32), st), "teacher_unet": None, "guidance_scale": 7.5,
            "uncond_prompt_embeds": randn(gen, (n, 7, 32), st)}


def _case(student: Callable, ref: dict, st: Setting, sched, t: torch.Tensor, s: torch.Tensor, what: str,
          hint: str, gen: torch.Generator, seed: int, pass_noise: bool = True, consistent: bool = True) -> None:
    """One comparison. ``consistent``: x_t was made from x_0 with the very noise that is passed (or recovered)."""
    shape = (t.shape[0], *SHAPE[1:])
    x_0, made_with = randn(gen, shape, st), randn(gen, shape, st)
    alpha_t, sigma_t = alpha_sigma(sched, t, len(shape))
    x_t = (alpha_t * x_0.float() + sigma_t * made_with.float()).to(st.dtype)
    noise = made_with if consistent else randn(gen, shape, st)
    kwargs = {"noise": noise} if pass_noise else {}
    extra = _extra_kwargs(gen, shape[0], st)
    before = snapshot(x_0, x_t, t, s, noise, sched.alphas_cumprod)
    call_name = f"{NAME}(x_0, x_t, t, s, scheduler{', noise=noise' if pass_noise else ''}, prompt_embeds=..., ...)"
    out = call(student, call_name, x_0, x_t, t, s, sched, **kwargs, **extra)
    assert_tensor(out, NAME, shape, st.dtype, st.device)
    assert_unchanged(NAME, before, [x_0, x_t, t, s, noise, sched.alphas_cumprod],
                     ["x_0", "x_t", "t", "s", "noise", "scheduler.alphas_cumprod"])
    expected = ref[NAME](x_0, x_t, t, s, sched, **kwargs)
    assert_close(out, expected, f"{NAME}, {what}", st, seed, hint, t=t, s=s)


def check_get_xs_from_xt_naive(student: Callable, ref: dict) -> None:
    """get_xs_from_xt_naive vs the reference on the cases listed in the module docstring."""
    for st in settings():
        gen, seed = new_generator()
        sched = sd15_scheduler(st.device)
        n = SHAPE[0]
        t, s = step_pairs(gen, n, st)
        t[0], s[0] = 999, 979
        _case(student, ref, st, sched, t, s, "0 < s < t, noise given", HINT, gen, seed)
        _case(student, ref, st, sched, t, s, "0 < s < t, noise=None (recover it from x_t and x_0)",
              "Without noise, recover the noise that made x_t: noise = (x_t - alpha_t*x_0)/sigma_t, with the "
              "real alpha_t, sigma_t of the forward process.", gen, seed, pass_noise=False)
        _case(student, ref, st, sched, t, s, "a given noise that did not make x_t",
              "When noise is given, use it as it is (do not recompute it from x_t).", gen, seed, consistent=False)
        zero = torch.zeros_like(s)
        for pass_noise in (True, False):
            _case(student, ref, st, sched, t, zero, f"s = 0 ({'noise given' if pass_noise else 'noise=None'})",
                  "At s = 0 use the boundary convention alpha_s = 1, sigma_s = 0: the result is x_0 itself.",
                  gen, seed, pass_noise=pass_noise)
        _case(student, ref, st, sched, zero, zero, "t = 0 and s = 0 (noise=None)",
              "At s = 0 return x_0. Recover the noise with the real sigma_0 = sqrt(1 - ab[0]) > 0 (the boundary "
              "convention is for s, not for the forward process), or you divide by zero.", gen, seed,
              pass_noise=False)
        _case(student, ref, st, sched, t, t.clone(), "t = s (noise=None)",
              "With s = t the estimate must give x_t back.", gen, seed, pass_noise=False)
        t_mix, s_mix = step_pairs(gen, n, st)
        t_mix[:4] = torch.tensor([0, 999, 500, 39], device=st.device)
        s_mix[:4] = torch.tensor([0, 0, 500, 19], device=st.device)
        for pass_noise in (True, False):
            _case(student, ref, st, sched, t_mix, s_mix, "a batch mixing s = 0, t = s and 0 < s < t",
                  "Every sample has its own t and s: gather per sample and apply the boundary convention per "
                  "sample (e.g. torch.where(s == 0, 1.0, alpha_s)).", gen, seed, pass_noise=pass_noise)
        _case(student, ref, st, linear_scheduler(st.device), t_mix, s_mix,
              "mixed timesteps on a non-SD1.5 (linear) schedule",
              HINT + " Read ab from the scheduler you are given.", gen, seed, pass_noise=False)


CHECKS = {NAME: check_get_xs_from_xt_naive}
DEPENDS: dict[str, tuple[str, ...]] = {NAME: ()}
FORBIDDEN_NAMES: dict[str, tuple[str, ...]] = {NAME: ()}
