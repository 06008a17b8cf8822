"""Hidden battery of assignment 05: multi-boundary timesteps and the matched multi-boundary sampler.

``get_multi_boundary_timesteps`` is compared with the reference on every timestep 0..999 for K = 1..8, 10,
25 and 50 segments, plus the course's worked examples (K = 2: [0, 499] with 499 -> 499; K = 4:
[0, 259, 519, 779]). ``multi_boundary_sampling`` runs on a tiny pipeline with a recording toy UNet (see
:mod:`autograder.checks.a04_consistency_loss`): the UNet must be evaluated at 999 and then at each interior
boundary from the top down, and every step must be the deterministic DDIM step to the next boundary.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from autograder.checks._tensors import call, close, max_err, new_generator
from autograder.checks.a04_consistency_loss import (_prompt_embeddings, analyse_sampler_calls,
                                                    assert_decoded, quiet_rng)
from helpers.fakes import ToyUNet, tiny_pipeline, track_autocast

__all__ = ["CHECKS", "DEPENDS", "FORBIDDEN_NAMES", "check_get_multi_boundary_timesteps",
           "check_multi_boundary_sampling"]

WORKED = {  # the course's examples: K -> (boundaries, {timestep: boundary})
    1: ([0], {0: 0, 999: 0}),
    2: ([0, 499], {498: 0, 499: 499, 500: 499, 999: 499}),
    4: ([0, 259, 519, 779], {0: 0, 258: 0, 259: 259, 260: 259, 518: 259, 519: 519, 778: 519, 779: 779, 999: 779}),
}


def check_get_multi_boundary_timesteps(student: Callable, ref: dict) -> None:
    """Every timestep for many K against the reference; the worked examples; default K = 4; types."""
    name = "get_multi_boundary_timesteps"
    expected_fn = ref[name]
    all_t = torch.arange(1000)
    for k, (boundaries, examples) in WORKED.items():
        t = torch.tensor(sorted(examples))
        out = call(student, f"{name}(timesteps, num_boundaries={k})", t.clone(), num_boundaries=k)
        assert type(out) is torch.Tensor and out.shape == t.shape, (
            f"{name} must return a tensor shaped like timesteps {tuple(t.shape)}, got {type(out).__name__} "
            f"{tuple(getattr(out, 'shape', ()))}")
        got = dict(zip(t.tolist(), out.tolist()))
        wrong = {ts: (got[ts], b) for ts, b in examples.items() if got[ts] != b}
        assert not wrong, (
            f"{name} with num_boundaries={k}: boundaries must be {boundaries}; a timestep maps to the largest "
            f"boundary <= it (a boundary maps to itself). Wrong: " +
            ", ".join(f"{ts} -> {g} (expected {b})" for ts, (g, b) in list(wrong.items())[:5]))
    for k in (1, 2, 3, 4, 5, 6, 7, 8, 10, 25, 50):
        out = call(student, f"{name}(torch.arange(1000), num_boundaries={k})", all_t.clone(), num_boundaries=k)
        exp = expected_fn(all_t, num_boundaries=k)
        assert type(out) is torch.Tensor and out.shape == exp.shape, (
            f"{name} must return a tensor shaped like timesteps, got {type(out).__name__}")
        assert not out.is_floating_point(), f"{name} must return integer timesteps (long), got {out.dtype}"
        bad = (out.cpu().long() != exp).nonzero().flatten()
        assert bad.numel() == 0, (
            f"{name} with num_boundaries={k}: expected boundaries {sorted(set(exp.tolist()))} (segment length "
            f"L = ceil(50 / K) steps of 20 on the 50-step grid, boundaries 20*j*L - 1); wrong at timesteps "
            f"{bad[:5].tolist()}: got {out[bad[:5]].tolist()}, expected {exp[bad[:5]].tolist()}")
    gen, seed = new_generator()
    t = torch.randint(0, 1000, (64,), generator=gen)
    before = t.clone()
    out = call(student, f"{name}(timesteps)", t)
    assert torch.equal(t, before), f"{name} changed its input in place"
    assert torch.equal(out.cpu().long(), expected_fn(before)), (
        f"{name}(timesteps) without num_boundaries must use the default K = 4 [seed {seed}]")
    if torch.cuda.is_available():
        out = call(student, f"{name}(timesteps on CUDA)", t.cuda(), num_boundaries=4)
        assert out.device.type == "cuda", f"{name} must return its result on the timesteps' device"


def _run(student: Callable, prompts, n: int, k: int, guidance: float, seed: int, output_type: str,
         given_latents: bool) -> dict:
    pipe = tiny_pipeline(ToyUNet(sample_size=16, seed=seed % 991))
    batch = (1 if isinstance(prompts, str) else len(prompts)) * n
    latents = torch.randn(batch, 4, 16, 16, generator=torch.Generator().manual_seed(seed + 10_000)) if given_latents else None
    name = (f"multi_boundary_sampling(pipe, prompt, num_boundaries={k}, generator=..., num_images_per_prompt={n}, "
            f"guidance_scale={guidance}, latents={'...' if given_latents else 'None'}, output_type={output_type!r})")
    with quiet_rng(seed + 7), track_autocast():
        out = call(student, name, pipe, prompts, num_boundaries=k, generator=torch.Generator().manual_seed(seed),
                   num_images_per_prompt=n, guidance_scale=guidance, latents=latents, output_type=output_type)
    cond, uncond = _prompt_embeddings(pipe, prompts, n)
    return dict(name=name, out=out, pipe=pipe, latents=latents, cond=cond, uncond=uncond, calls=list(pipe.unet.calls),
                k=k, guidance=guidance)


def _check_steps(r: dict, ref: dict) -> torch.Tensor:
    """The deterministic chain 999 -> b_1 -> ... -> 0; returns the final latents the records imply."""
    name, pipe, k = r["name"], r["pipe"], r["k"]
    ddim, bounds = ref["ddim_solver_step"], ref["get_multi_boundary_timesteps"]
    steps = analyse_sampler_calls(r["calls"], r["cond"], r["uncond"], r["guidance"], name)
    interior = sorted(set(bounds(torch.arange(1000), num_boundaries=k).tolist()) - {0}, reverse=True)
    want = [999] + [b for b in interior if b != 999]
    targets = want[1:] + [0]
    got = [st["t"] for st in steps]
    assert got == want, (
        f"{name}: the UNet ran at timesteps {got}; with {k} boundaries the matched sampler evaluates it at "
        f"{want} and steps to {targets} (from 999 to the highest boundary below it, then boundary to boundary)")
    if r["latents"] is not None:
        assert close(steps[0]["x"], r["latents"] * pipe.scheduler.init_noise_sigma), (
            f"{name}: the first step must start from the given latents")
    batch = r["cond"].shape[0]
    x = None
    for i, (st, b) in enumerate(zip(steps, targets)):
        tt = torch.full((batch,), st["t"], dtype=torch.long)
        x = ddim(st["eps"], st["x"], tt, torch.full_like(tt, b), pipe.scheduler)
        if i + 1 < len(steps):
            assert close(steps[i + 1]["x"], x, 1e-4, 1e-4), (
                f"{name}: the input at t = {steps[i + 1]['t']} must be ddim_solver_step(eps, x, {st['t']}, {b}) "
                f"of the previous step (a deterministic DDIM step of the student to the boundary, no fresh noise); "
                f"max abs error {max_err(steps[i + 1]['x'], x):.3g}")
    return x


def check_multi_boundary_sampling(student: Callable, ref: dict) -> None:
    """K = 4, 2, 1 on a tiny pipeline: the timesteps 999 -> 779 -> 519 -> 259 -> 0 (K = 4), deterministic DDIM
    steps of the student to each boundary, CFG only when w > 1, the given latents, decoding."""
    _, seed = new_generator()
    prompts = ["a handwritten digit 3", "seven"]
    r = _run(student, prompts, 2, 4, 1.0, seed, "latent", True)
    x = _check_steps(r, ref)
    out = r["out"]
    assert isinstance(out, torch.Tensor) and close(out, x, 1e-4, 1e-4), (
        f"{r['name']}: with output_type='latent' return the latents after the last step (at timestep 0)")
    r = _run(student, prompts, 1, 2, 3.0, seed + 1, "pt", True)
    assert_decoded(r["pipe"], r["out"], _check_steps(r, ref), r["name"])
    r = _run(student, "the digit two", 3, 1, 1.0, seed + 2, "pil", False)
    _check_steps(r, ref)
    out = r["out"]
    assert isinstance(out, list) and len(out) == 3 and all(hasattr(im, "size") for im in out), (
        f"{r['name']} must return a list of 3 PIL images (pipe.image_processor.postprocess(..., output_type='pil'))")
    again = _run(student, "the digit two", 3, 1, 1.0, seed + 2, "latent", False)
    first = analyse_sampler_calls(r["calls"], r["cond"], r["uncond"], 1.0, r["name"])[0]["x"]
    second = analyse_sampler_calls(again["calls"], again["cond"], again["uncond"], 1.0, r["name"])[0]["x"]
    assert close(first, second, 0, 0), (
        f"{r['name']}: without latents, draw the initial noise from `generator` (pipe.prepare_latents or "
        "randn_tensor with generator=generator)")


CHECKS = {"get_multi_boundary_timesteps": check_get_multi_boundary_timesteps,
          "multi_boundary_sampling": check_multi_boundary_sampling}
DEPENDS: dict[str, tuple[str, ...]] = {"get_multi_boundary_timesteps": (),
                                       "multi_boundary_sampling": ("get_multi_boundary_timesteps",)}
FORBIDDEN_NAMES: dict[str, tuple[str, ...]] = {"get_multi_boundary_timesteps": (),
                                               "multi_boundary_sampling": ("LCMScheduler", "TCDScheduler")}
