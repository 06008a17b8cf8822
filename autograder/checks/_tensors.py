"""Shared tools of the hidden batteries: random inputs, schedulers, calls and tensor comparisons.

Every battery draws its own inputs (from a freshly seeded ``torch.Generator``), passes the *same* inputs to
the student's function and to the reference, and compares with tolerances that accept any correct
formulation (fp32: rtol 1e-4, atol 1e-5; fp16 on CUDA: looser). Failures are ``AssertionError`` with a
message that says which case failed, by how much, and the seed that reproduces it.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from helpers.config import KitConfig

__all__ = ["Setting", "settings", "new_generator", "randn", "randint", "step_pairs", "sd15_scheduler",
           "linear_scheduler", "call", "assert_tensor", "assert_close", "assert_unchanged", "snapshot", "close",
           "max_err"]

# SD1.5's noise schedule (scheduler/scheduler_config.json of the model); the shipped small model uses it too.
SD15_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                     clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


@dataclass(frozen=True)
class Setting:
    """Where a case runs and how close the student's result must be to the reference."""

    device: torch.device
    dtype: torch.dtype
    rtol: float
    atol: float

    def __str__(self) -> str:
        return f"{self.device.type}/{str(self.dtype).removeprefix('torch.')}"


def settings() -> list[Setting]:
    """fp32 on the CPU always; fp16 on CUDA as well when a GPU is visible (the course's GPU setting)."""
    out = [Setting(torch.device("cpu"), torch.float32, rtol=1e-4, atol=1e-5)]
    if torch.cuda.is_available():
        out.append(Setting(torch.device("cuda"), torch.float16, rtol=2e-2, atol=5e-2))
    return out


def new_generator() -> tuple[torch.Generator, int]:
    """A CPU generator with a fresh random seed (returned too, so that a failure message can quote it).

    Set ``CD_KIT_CHECK_SEED`` to the seed a failure message quoted to replay exactly that case.
    """
    fixed = KitConfig.from_environ().check_seed  # the batteries' only input is the environment: an edge
    seed = fixed if fixed is not None else int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
    return torch.Generator().manual_seed(seed), seed


def randn(gen: torch.Generator, shape: tuple[int, ...], setting: Setting) -> torch.Tensor:
    """Standard normal values drawn on the CPU from ``gen`` (reproducible), then moved to the setting."""
    return torch.randn(shape, generator=gen).to(setting.device, setting.dtype)


def randint(gen: torch.Generator, low: int, high: int, n: int, setting: Setting) -> torch.Tensor:
    """``n`` timesteps uniform in ``[low, high]`` (inclusive), a 1-D long tensor on the setting's device."""
    return torch.randint(low, high + 1, (n,), generator=gen).to(setting.device)


def step_pairs(gen: torch.Generator, n: int, setting: Setting) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random timestep pairs with ``0 < s < t <= 999`` on the setting's device."""
    t = randint(gen, 2, 999, n, setting)
    s = (torch.rand(n, generator=gen).to(setting.device) * (t - 1).float()).long() + 1
    return t, s


def _scheduler(device: torch.device, **config: Any):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(**{**SD15_SCHEDULE, **config}, timestep_spacing="trailing")
    sched.alphas_cumprod = sched.alphas_cumprod.to(device)  # where the course keeps it (helpers.models)
    return sched


def sd15_scheduler(device: torch.device | str = "cpu"):
    """DDIM with SD1.5's schedule and trailing spacing, ``alphas_cumprod`` on ``device``."""
    return _scheduler(torch.device(device))


def linear_scheduler(device: torch.device | str = "cpu"):
    """DDIM with a *different* (linear, 1e-4 -> 0.02) schedule: catches answers that hard-code SD1.5's numbers."""
    return _scheduler(torch.device(device), beta_schedule="linear", beta_start=1e-4, beta_end=0.02)


def call(fn: Callable, name: str, *args: Any, **kwargs: Any) -> Any:
    """Call the student's ``fn``; any exception becomes an ``AssertionError`` that names the call."""
    try:
        return fn(*args, **kwargs)
    except NotImplementedError:
        raise AssertionError(f"{name} is not implemented yet (it raised NotImplementedError)") from None
    except Exception as err:  # noqa: BLE001 - any error of the student's code is a failed check
        raise AssertionError(f"{name} raised {type(err).__name__}: {err}") from err


def assert_tensor(out: Any, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
    """``out`` must be a plain ``torch.Tensor`` (not a subclass, tuple or numpy array) of this shape/dtype/device."""
    assert type(out) is torch.Tensor, (
        f"{name} must return a torch.Tensor, got {type(out).__module__}.{type(out).__qualname__}")
    assert tuple(out.shape) == tuple(shape), (
        f"{name} returned shape {tuple(out.shape)}, expected {tuple(shape)} (the shape of the input latents)")
    assert out.dtype == dtype, (
        f"{name} returned dtype {out.dtype}, expected {dtype} (the input's dtype; cast back with .to(x.dtype) "
        "if you computed in another precision)")
    assert out.device.type == device.type, (
        f"{name} returned a tensor on {out.device}, expected {device.type} (the input's device)")


def assert_close(out: torch.Tensor, expected: torch.Tensor, what: str, setting: Setting, seed: int,
                 hint: str = "", **timesteps: torch.Tensor) -> None:
    """Elementwise closeness; the message names the case, the worst error, the failing samples and the seed."""
    out32, exp32 = out.detach().float(), expected.detach().float()
    if torch.allclose(out32, exp32, rtol=setting.rtol, atol=setting.atol):
        return
    finite = torch.isfinite(out32)
    bad = ~finite | ((out32 - exp32).abs() > setting.atol + setting.rtol * exp32.abs())
    bad_samples = bad.flatten(1).any(1).nonzero().flatten().tolist()
    worst = (out32 - exp32).abs()[finite].max().item() if finite.any() else float("nan")
    where = ""
    if timesteps:
        where = "; failing samples " + ", ".join(
            f"#{i} (" + ", ".join(f"{k}={int(v[i])}" for k, v in timesteps.items()) + ")" for i in bad_samples[:6])
    nonfinite = "" if finite.all() else f"; {int((~finite).sum())} values are NaN/inf"
    raise AssertionError(
        f"{what}: wrong values on {setting} (max abs error {worst:.3g}, tolerance atol={setting.atol:g} + "
        f"rtol={setting.rtol:g}*|expected|){nonfinite}{where}. {hint} [seed {seed}]".rstrip())


def snapshot(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Copies of the inputs, to check afterwards that the function did not change them in place."""
    return [t.detach().clone() for t in tensors]


def assert_unchanged(name: str, before: list[torch.Tensor], after: list[torch.Tensor], labels: list[str]) -> None:
    """The inputs (and the scheduler's table) must be untouched: no in-place edits."""
    for b, a, label in zip(before, after, labels, strict=True):
        assert torch.equal(b, a.detach().to(b.device)), (
            f"{name} changed its input {label} in place; work on new tensors (no `+=`, `[...] =` or "
            "`.mul_()` on inputs or on scheduler.alphas_cumprod)")


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-4, atol: float = 1e-5) -> bool:
    """Same shape and elementwise close (compared in fp32 on the CPU)."""
    return a.shape == b.shape and torch.allclose(a.detach().float().cpu(), b.detach().float().cpu(),
                                                 rtol=rtol, atol=atol)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest absolute difference (inf when the shapes differ), for failure messages."""
    if a.shape != b.shape:
        return float("inf")
    return (a.detach().float().cpu() - b.detach().float().cpu()).abs().max().item()
