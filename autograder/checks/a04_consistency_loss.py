"""Hidden battery of assignment 04: the pseudo-Huber loss, the distillation target, the consistency loss,
the training loop and multistep consistency sampling.

The functions that draw random numbers inside (``cm_loss_template``, ``consistency_sampling``) cannot be
compared value by value with the reference. They run instead on instrumented fakes (:mod:`helpers.fakes`):
a toy UNet that records every call (inputs, per-sample timesteps, grad mode, open ``torch.autocast``
contexts, output), recording ``loss_fn``/``get_xs_from_xt``/``get_boundary_timesteps`` stand-ins, and a
tiny pipeline. The records are then checked against the course's math, with the reference
``ddim_solver_step`` of assignment 02: which timesteps were drawn (999 must be reachable), where the UNet
was evaluated, what went into the loss, where gradients flow. ``train_loop`` runs on a toy regression
model and is compared with full-batch gradient steps. Everything runs in a few seconds on a CPU; the
caller's random state is left as it was.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from contextlib import contextmanager

import torch

from autograder.checks._tensors import call, close, max_err, new_generator, sd15_scheduler, settings
from helpers.fakes import (Recorder, ToyUNet, UNetCall, active_autocast, tiny_pipeline, track_autocast,
                           track_grad_scaler)
from helpers.schedule import alpha_sigma

__all__ = ["CHECKS", "DEPENDS", "FORBIDDEN_NAMES", "check_pseudo_huber_loss", "check_get_xs_from_xt_with_teacher",
           "check_cm_loss_template", "check_train_loop", "check_consistency_sampling", "grid_boundaries",
           "analyse_sampler_calls", "assert_decoded", "quiet_rng", "trailing_timesteps",
           "assert_no_deprecated_amp"]


@contextmanager
def quiet_rng(seed: int):
    """Seed torch's global generator for the block and restore the caller's random state afterwards; the
    warnings raised inside are caught (not shown) and yielded as a list, for :func:`assert_no_deprecated_amp`."""
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.manual_seed(seed)
        yield caught


def assert_no_deprecated_amp(caught: list, name: str) -> None:
    """Fail when the student used the deprecated ``torch.cuda.amp`` API (its FutureWarning was caught)."""
    used = [str(w.message) for w in caught if "torch.cuda.amp" in str(w.message)]
    assert not used, (f"{name} uses the deprecated torch.cuda.amp API ({used[0][:120]}); use "
                      "torch.autocast('cuda', ...) / torch.amp.GradScaler('cuda', ...)")


# ------------------------------------------------------------------------------------------ pseudo-Huber
def check_pseudo_huber_loss(student: Callable, ref: dict) -> None:
    """Values against the reference for large and tiny differences, several c, the default c; a scalar;
    finite gradients where x == y."""
    name = "pseudo_huber_loss"
    expected_fn = ref[name]
    for st in settings():
        gen, seed = new_generator()
        x = torch.randn(4, 4, 8, 8, generator=gen).to(st.device, st.dtype)
        y = torch.randn(4, 4, 8, 8, generator=gen).to(st.device, st.dtype)
        near = x + (1e-4 * torch.randn(4, 4, 8, 8, generator=gen)).to(st.device, st.dtype)
        cases = [("x, y with differences of order 1, default c", (x, y), {}),
                 ("differences of order 1e-4 (below c = 0.001), default c", (x, near), {}),
                 ("c = 0.1 given by keyword", (x, y), {"c": 0.1}),
                 ("c = 0.5 given as the third argument", (x, 0.5 * y), 0.5)]
        for what, (a, b), c in cases:
            if isinstance(c, dict):
                out = call(student, f"{name}(x, y{', c=' + str(c['c']) if c else ''})", a, b, **c)
                exp = expected_fn(a, b, **c)
            else:
                out = call(student, f"{name}(x, y, {c})", a, b, c)
                exp = expected_fn(a, b, c)
            assert isinstance(out, torch.Tensor) and out.ndim == 0, (
                f"{name} must return a scalar tensor (0-d, the mean over all elements), got "
                f"{type(out).__name__} of shape {tuple(getattr(out, 'shape', ()))} [{what}]")
            tol = (1e-3, 1e-9) if st.dtype == torch.float32 else (2e-2, 1e-5)
            assert close(out, exp, *tol), (
                f"{name}, {what}: got {out.item():.6g}, expected {exp.item():.6g}. The loss is the mean over all "
                f"elements of sqrt((x - y)^2 + c^2) - c (c squared inside the root, minus c, mean not sum) [seed {seed}]")
        a = x.detach().clone().float().requires_grad_(True)
        out = call(student, f"{name}(x, x)", a, a.detach().clone())
        assert abs(out.item()) < 1e-6, f"{name}(x, x) must be 0, got {out.item():.3g} (subtract c after the root)"
        out.backward()
        assert a.grad is not None and torch.isfinite(a.grad).all(), (
            f"{name}: the gradient at x == y must be finite; keep c^2 inside the square root")


# ------------------------------------------------------------------------------------------ CD target
def _teacher_case(student: Callable, ref: dict, w: float, uncond: bool, sched, seed: int, what: str) -> None:
    gen = torch.Generator().manual_seed(seed)
    n = 6
    x_0, x_t = torch.randn(n, 4, 8, 8, generator=gen), torch.randn(n, 4, 8, 8, generator=gen)
    t = torch.tensor([999, 779, 500, 259, 40, 19])
    s = torch.tensor([979, 759, 0, 259, 20, 0])
    cond, empty = torch.randn(n, 7, 16, generator=gen), torch.randn(n, 7, 16, generator=gen)
    teacher = ToyUNet(sample_size=8, seed=seed % 1000)
    kwargs = dict(prompt_embeds=cond, teacher_unet=teacher, guidance_scale=w,
                  uncond_prompt_embeds=empty if uncond else None, noise=torch.randn(n, 4, 8, 8, generator=gen))
    before = [x_0.clone(), x_t.clone(), cond.clone()]
    name = (f"get_xs_from_xt_with_teacher(x_0, x_t, t, s, scheduler, prompt_embeds=..., teacher_unet=..., "
            f"guidance_scale={w}, uncond_prompt_embeds={'...' if uncond else 'None'})")
    with quiet_rng(seed), track_autocast():
        try:
            out = call(student, name, x_0, x_t, t, s, sched, **kwargs)
        except AssertionError as err:
            if uncond or w > 1:
                raise
            raise AssertionError(f"{err}. With guidance_scale <= 1 there is no guidance: uncond_prompt_embeds may be "
                                 "None and must not be used") from None
    calls = list(teacher.calls)
    teacher.calls.clear()
    expected = ref["get_xs_from_xt_with_teacher"](x_0, x_t, t, s, sched, **kwargs)
    assert type(out) is torch.Tensor and out.shape == x_t.shape and out.dtype == x_t.dtype, (
        f"{name} must return a tensor like x_t {tuple(x_t.shape)} {x_t.dtype}, got {type(out).__name__} "
        f"{tuple(getattr(out, 'shape', ()))} {getattr(out, 'dtype', '')}")
    assert all(torch.equal(a, b) for a, b in zip(before, [x_0, x_t, cond])), f"{name} changed its inputs in place"
    assert calls, f"{name} never called teacher_unet"
    assert not any(c.grad_enabled for c in calls), (
        f"{name}: the teacher ran with gradients enabled; wrap the function in torch.no_grad() (the teacher only "
        "provides targets)")
    assert not out.requires_grad, f"{name} returned a tensor that requires grad: compute it under torch.no_grad()"
    used_uncond = any(c.encoder_hidden_states is not None and c.encoder_hidden_states.shape[0] >= n
                      and any(close(chunk, empty) for chunk in c.encoder_hidden_states.split(n))
                      for c in calls) if uncond else False
    if w <= 1:
        assert not used_uncond, (
            f"{name}: with guidance_scale = {w} (<= 1) there is no classifier-free guidance (diffusers' convention: "
            "CFG only when w > 1); call the teacher on the prompt embeddings only")
    assert close(out, expected, 1e-4, 1e-5), (
        f"{name}, {what}: wrong x_s (max abs error {max_err(out, expected):.3g}). Expected eps = eps_u + w*(eps_c - "
        "eps_u) when w > 1 (eps_c with prompt_embeds, eps_u with uncond_prompt_embeds, the teacher at (x_t, t)), "
        f"eps = eps_c otherwise, then x_s = ddim_solver_step(eps, x_t, t, s, scheduler) [seed {seed}]")


def check_get_xs_from_xt_with_teacher(student: Callable, ref: dict) -> None:
    """One guided (and unguided) teacher DDIM step from t to s, without gradients; extra keywords accepted."""
    sched = sd15_scheduler()
    _, seed = new_generator()
    _teacher_case(student, ref, 1.0, False, sched, seed, "w = 1 (no guidance), uncond_prompt_embeds=None")
    _teacher_case(student, ref, 1.0, True, sched, seed + 1, "w = 1 (no guidance)")
    _teacher_case(student, ref, 0.5, True, sched, seed + 2, "w = 0.5 (no guidance: CFG only when w > 1)")
    _teacher_case(student, ref, 3.0, True, sched, seed + 3, "w = 3 (classifier-free guidance)")
    _teacher_case(student, ref, 7.5, True, sched, seed + 4, "w = 7.5 (classifier-free guidance)")


# ------------------------------------------------------------------------------------------ the loss
def grid_boundaries(s: torch.Tensor, num_timesteps: int = 1000, **kwargs) -> torch.Tensor:
    """The checks' boundary function: four segments with boundaries [0, 259, 519, 779] (largest <= s)."""
    edges = torch.tensor([0, 259, 519, 779], device=s.device)
    return edges[torch.bucketize(s, edges, right=True) - 1]


def _xs_signature(x_0, x_t, t, s, scheduler, prompt_embeds=None, noise=None, **kwargs):  # pragma: no cover
    """How cm_loss_template calls get_xs_from_xt."""


def _loss_signature(boundary_pred, boundary_target):  # pragma: no cover
    """How cm_loss_template calls loss_fn."""


def _boundary_signature(timesteps, **kwargs):  # pragma: no cover
    """How cm_loss_template calls get_boundary_timesteps."""


def _loss_run(student: Callable, ref: dict, seed: int, batch: int, step_size: int | None) -> dict:
    """Run the student's loss once on fakes; return everything recorded."""
    gen = torch.Generator().manual_seed(seed)
    latents, embeds = torch.randn(batch, 4, 8, 8, generator=gen), torch.randn(batch, 7, 16, generator=gen)
    sched = sd15_scheduler()
    unet = ToyUNet(sample_size=8, seed=seed % 997)
    naive = ref["get_xs_from_xt_naive"]
    get_xs = Recorder(lambda x_0, x_t, t, s, scheduler, prompt_embeds=None, noise=None, **kw:
                      naive(x_0, x_t, t, s, scheduler, noise=noise), _xs_signature)
    loss_fn = Recorder(lambda p, q: ((p.float() - q.float()) ** 2).mean(), _loss_signature)
    boundary = Recorder(grid_boundaries, _boundary_signature)
    kwargs = {} if step_size is None else {"num_timesteps": 1000, "step_size": step_size}
    name = ("cm_loss_template(latents, prompt_embeds, unet, scheduler, loss_fn, get_boundary_timesteps, "
            f"get_xs_from_xt{', step_size=' + str(step_size) if step_size else ''})")
    with quiet_rng(seed) as caught, track_autocast():
        loss = call(student, name, latents, embeds, unet, sched, loss_fn, boundary, get_xs, **kwargs)
    assert_no_deprecated_amp(caught, name)
    return dict(name=name, loss=loss, latents=latents, embeds=embeds, sched=sched, unet=unet, get_xs=get_xs,
                loss_fn=loss_fn, boundary=boundary, step=step_size or 20, seed=seed)


def _check_loss_run(r: dict, ref: dict) -> torch.Tensor:
    """Check one recorded run against the course's recipe; return the drawn t."""
    name, seed, step = r["name"], r["seed"], r["step"]
    ddim = ref["ddim_solver_step"]
    tag = f"[seed {seed}]"
    assert len(r["get_xs"].calls) == 1, (
        f"{name} must call get_xs_from_xt exactly once (to get x_s), it called it {len(r['get_xs'].calls)} times")
    xs_call = r["get_xs"].calls[0]
    t, s = xs_call["t"], xs_call["s"]
    assert isinstance(t, torch.Tensor) and t.shape == (r["latents"].shape[0],), (
        f"{name}: t passed to get_xs_from_xt must be a (B,) tensor of per-sample timesteps, got "
        f"{type(t).__name__} {tuple(getattr(t, 'shape', ()))}")
    grid = set(range(step - 1, 1000, step))
    off_grid = sorted(set(t.tolist()) - grid)
    assert not off_grid, (
        f"{name}: t must be on the grid step_size*index - 1 with index in 1..num_timesteps//step_size "
        f"({step - 1}, {2 * step - 1}, ..., 999), got {off_grid[:5]} {tag}")
    assert torch.equal(s.long().cpu(), torch.clamp(t - step, min=0).long().cpu()), (
        f"{name}: s must be max(t - step_size, 0) for each sample {tag}")
    assert torch.equal(xs_call["x_0"], r["latents"]), f"{name}: pass the clean latents as get_xs_from_xt's x_0"
    assert xs_call["scheduler"] is r["sched"], f"{name}: pass the scheduler on to get_xs_from_xt"
    assert xs_call["prompt_embeds"] is not None and close(xs_call["prompt_embeds"], r["embeds"]), (
        f"{name}: pass prompt_embeds=prompt_embeds to get_xs_from_xt (the distillation target needs them)")
    noise = xs_call["noise"]
    assert isinstance(noise, torch.Tensor), (
        f"{name}: pass noise=noise (the noise that made x_t) to get_xs_from_xt")
    alpha_t, sigma_t = alpha_sigma(r["sched"], t.cpu(), 4)
    x_t_expected = alpha_t * r["latents"] + sigma_t * noise.float()
    assert close(xs_call["x_t"], x_t_expected, 1e-4, 1e-5), (
        f"{name}: the x_t given to get_xs_from_xt is not q_sample(latents, t, scheduler, noise=noise) "
        f"(max abs error {max_err(xs_call['x_t'], x_t_expected):.3g}) {tag}")
    x_s = xs_call["return"]

    boundary_calls = r["boundary"].calls
    assert boundary_calls, f"{name} never called get_boundary_timesteps"
    b = grid_boundaries(s)

    calls: list[UNetCall] = r["unet"].calls
    at_t = [c for c in calls if torch.equal(c.timesteps.cpu(), t.cpu())]
    at_s = [c for c in calls if torch.equal(c.timesteps.cpu(), s.cpu())]
    where = [sorted(set(c.timesteps.tolist()))[:4] for c in calls]
    assert len(calls) == 2 and len(at_t) == 1 and len(at_s) == 1, (
        f"{name} must call the UNet exactly twice: on (x_t, t) for the prediction and on (x_s, s) for the target. "
        f"It made {len(calls)} call(s), at timesteps {where}. The boundary is reached with ddim_solver_step, "
        f"never by running the UNet at the boundary timestep {tag}")
    pred_call, target_call = at_t[0], at_s[0]
    assert close(pred_call.sample, xs_call["x_t"]), f"{name}: the UNet call at t must get x_t {tag}"
    assert close(target_call.sample, x_s), (
        f"{name}: the UNet call at s must get x_s, the output of get_xs_from_xt (not x_t) {tag}")
    for c, which in ((pred_call, "prediction"), (target_call, "target")):
        assert c.encoder_hidden_states is not None and close(c.encoder_hidden_states, r["embeds"]), (
            f"{name}: the {which} UNet call must get encoder_hidden_states=prompt_embeds")
    assert pred_call.grad_enabled, f"{name}: the prediction UNet(x_t, t) must run with gradients (it is trained)"
    assert pred_call.autocast and target_call.autocast, (
        f"{name}: run both UNet calls under torch.autocast (e.g. torch.autocast('cuda', dtype=torch.float16, "
        "enabled=latents.is_cuda)): mixed precision on a GPU, plain fp32 on the CPU")
    assert pred_call.autocast[-1] == target_call.autocast[-1], (
        f"{name}: the two UNet calls ran under different autocast settings ({pred_call.autocast[-1]} vs "
        f"{target_call.autocast[-1]}); use the same for both")

    assert len(r["loss_fn"].calls) == 1, f"{name} must call loss_fn exactly once"
    lcall = r["loss_fn"].calls[0]
    pred, target = lcall["boundary_pred"], lcall["boundary_target"]
    assert isinstance(pred, torch.Tensor) and isinstance(target, torch.Tensor), f"{name}: loss_fn must get tensors"
    assert pred.requires_grad, (
        f"{name}: the first argument of loss_fn (boundary_pred) carries no gradient; it must come from the UNet "
        "call on (x_t, t) with gradients on, stepped to the boundary with ddim_solver_step")
    assert not target.requires_grad, (
        f"{name}: the second argument of loss_fn (boundary_target) requires grad: compute the target under "
        "torch.no_grad() (stop-gradient), so that only the prediction is trained")
    expected_pred = ddim(pred_call.output, pred_call.sample, t.cpu(), b, r["sched"])
    expected_target = ddim(target_call.output, x_s.detach().float(), s.cpu(), b, r["sched"])
    assert close(pred, expected_pred, 1e-3, 1e-4), (
        f"{name}: boundary_pred must be ddim_solver_step(eps, x_t, t, b, scheduler) with eps = UNet(x_t, t) and "
        f"b = get_boundary_timesteps(s) (max abs error {max_err(pred, expected_pred):.3g}) {tag}")
    assert close(target, expected_target, 1e-3, 1e-4), (
        f"{name}: boundary_target must be ddim_solver_step(eps_s, x_s, s, b, scheduler) with eps_s = UNet(x_s, s) "
        f"and the same b (max abs error {max_err(target, expected_target):.3g}); where b == s it is x_s itself {tag}")
    loss = r["loss"]
    assert isinstance(loss, torch.Tensor) and loss.ndim == 0, (
        f"{name} must return loss_fn's result (a scalar tensor), got {type(loss).__name__}")
    assert close(loss, lcall["return"]), f"{name} must return loss_fn(boundary_pred, boundary_target) as it is"

    # Gradients flow into the prediction only: compare with the same loss built from the records.
    unet = r["unet"]
    loss.backward()
    got = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in unet.parameters()]
    unet.zero_grad(set_to_none=True)
    eps = unet(pred_call.sample, t, encoder_hidden_states=r["embeds"]).sample
    expected_loss = ((ddim(eps, pred_call.sample, t.cpu(), b, r["sched"]).float() - target.detach().float()) ** 2).mean()
    expected_loss.backward()
    want = [p.grad for p in unet.parameters()]
    assert all(close(g, w, 1e-3, 1e-7) for g, w in zip(got, want)), (
        f"{name}: the gradient of the loss with respect to the UNet's weights is wrong: it must flow through "
        f"boundary_pred only {tag}")
    return t


def check_cm_loss_template(student: Callable, ref: dict) -> None:
    """Recorded runs on a toy UNet: timesteps, noising, the two UNet calls, the DDIM steps to the boundary,
    stop-gradient on the target, autocast on both calls, the gradient; 999 must be drawn."""
    _, seed = new_generator()
    drawn = []
    for i in range(6):
        r = _loss_run(student, ref, seed + i, batch=96, step_size=None)
        drawn.append(_check_loss_run(r, ref))
    all_t = torch.cat(drawn)
    assert 999 in all_t.tolist(), (
        f"cm_loss_template never drew t = 999 in {all_t.numel()} samples: index must run from 1 to "
        "num_timesteps // step_size inclusive (torch.randint's upper bound is exclusive), so that the start of "
        f"every sampler, t = 999, is trained [seed {seed}]")
    assert 19 in all_t.tolist(), f"cm_loss_template never drew t = 19 in {all_t.numel()} samples [seed {seed}]"
    counts = torch.bincount((all_t + 1) // 20, minlength=51)[1:]
    assert (counts > 0).sum() >= 45, (
        f"cm_loss_template drew only {(counts > 0).sum()} of the 50 grid timesteps in {all_t.numel()} samples: "
        f"draw index uniformly [seed {seed}]")
    r = _loss_run(student, ref, seed + 100, batch=64, step_size=50)
    t50 = _check_loss_run(r, ref)
    noise = r["get_xs"].calls[0]["noise"].float()
    assert abs(noise.mean().item()) < 0.1 and abs(noise.std().item() - 1) < 0.1, (
        f"cm_loss_template: the noise must be standard normal (torch.randn_like), got mean {noise.mean():.3f} "
        f"std {noise.std():.3f} [seed {seed + 100}]")
    r2 = _loss_run(student, ref, seed + 100, batch=64, step_size=50)
    assert torch.equal(r2["get_xs"].calls[0]["t"], t50), (
        "cm_loss_template is not repeatable under torch.manual_seed: draw t and the noise from torch's global "
        "generator (torch.randint, torch.randn_like), not from a generator of your own")


# ------------------------------------------------------------------------------------------ train_loop
class _Toy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)
        with torch.no_grad():
            self.lin.weight.copy_(torch.tensor([[0.5, -0.2, 0.1], [0.3, 0.8, -0.5]]))
            self.lin.bias.copy_(torch.tensor([0.1, -0.1]))

    def forward(self, x):
        return self.lin(x)


class _CountingSGD(torch.optim.SGD):
    def __init__(self, params, lr: float) -> None:
        super().__init__(params, lr=lr)
        self.steps = 0
        self.zero_grads = 0

    def step(self, closure=None):
        self.steps += 1
        return super().step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.zero_grads += 1
        super().zero_grad(set_to_none)


def _toy_data(n_batches: int, batch: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, generator=g), torch.randn(batch, 2, generator=g)) for _ in range(n_batches)]


def _expected_training(data, num_steps: int, k: int, lr: float) -> tuple[list[torch.Tensor], list[float]]:
    """Full-batch SGD: each step on the concatenation of the next k batches (cycling the data)."""
    model = _Toy()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses, i = [], 0
    for _ in range(num_steps):
        chunk = [data[(i + j) % len(data)] for j in range(k)]
        i += k
        x, y = torch.cat([c[0] for c in chunk]), torch.cat([c[1] for c in chunk])
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return [p.detach().clone() for p in model.parameters()], losses


def _train_case(student: Callable, num_steps: int, k: int, n_batches: int, amp_dtype, device, seed: int) -> None:
    data = _toy_data(n_batches, 4, seed)
    model = _Toy()
    opt = _CountingSGD(model.parameters(), lr=0.1)
    records: list[dict] = []

    def compute_loss(x, y):
        records.append({"autocast": active_autocast(), "training": model.training, "device": x.device})
        return torch.nn.functional.mse_loss(model(x), y)

    kwargs = {"gradient_accumulation_steps": k}
    if amp_dtype is not None:
        kwargs["amp_dtype"] = amp_dtype
    if device is not None:
        kwargs["device"] = device
    name = (f"train_loop(model, optimizer, dataloader, compute_loss, num_steps={num_steps}, "
            f"gradient_accumulation_steps={k}{', device=' + repr(device) if device else ''}"
            f"{', amp_dtype=' + str(amp_dtype) if amp_dtype else ''})")
    with quiet_rng(seed) as caught, track_autocast(), track_grad_scaler() as scaler:
        losses = call(student, name, model, opt, data, compute_loss, num_steps, **kwargs)
    assert_no_deprecated_amp(caught, name)
    want_params, want_losses = _expected_training(data, num_steps, k, 0.1)
    assert isinstance(losses, (list, tuple)) and len(losses) == num_steps, (
        f"{name} must return a list with the loss of each of the {num_steps} optimizer steps, got "
        f"{type(losses).__name__} of length {len(losses) if hasattr(losses, '__len__') else '?'}")
    assert all(isinstance(v, (float, int)) and not isinstance(v, bool) for v in losses), (
        f"{name} must return Python floats (loss.item()), not tensors (they would keep the graph alive)")
    assert len(records) == num_steps * k, (
        f"{name} called compute_loss {len(records)} times; expected num_steps x gradient_accumulation_steps = "
        f"{num_steps * k} (start the dataloader again when it runs out)")
    assert opt.steps == num_steps, (
        f"{name} made {opt.steps} optimizer steps, expected {num_steps} (one every gradient_accumulation_steps "
        "batches, through scaler.step(optimizer))")
    assert all(rec["training"] for rec in records), f"{name}: put the model in train mode (unet.train())"
    for got, want in zip(model.parameters(), want_params):
        assert close(got, want, 1e-4, 1e-6), (
            f"{name}: after training, the weights differ from {num_steps} full-batch steps on the same data "
            f"(max abs error {max_err(got, want):.3g}). Divide each micro-batch loss by gradient_accumulation_steps, "
            "step once per gradient_accumulation_steps micro-batches, and zero the gradients after each step")
    got_losses = torch.tensor([float(v) for v in losses])
    assert close(got_losses, torch.tensor(want_losses), 1e-4, 1e-6), (
        f"{name}: the returned losses {[round(v, 4) for v in got_losses.tolist()]} should be the mean loss of each "
        f"step's micro-batches {[round(v, 4) for v in want_losses]} (the sum of the divided losses)")
    assert scaler.created and all(c["device"] == "cuda" for c in scaler.created), (
        f"{name}: create torch.amp.GradScaler('cuda', enabled=<device is CUDA>) and go through it "
        "(scaler.scale(loss).backward(), scaler.step(optimizer), scaler.update()); disabled it does nothing on the CPU")
    assert scaler.scale == num_steps * k and scaler.step == num_steps and scaler.update == num_steps, (
        f"{name}: expected scaler.scale once per micro-batch ({num_steps * k}) and scaler.step + scaler.update once "
        f"per optimizer step ({num_steps}); got scale {scaler.scale}, step {scaler.step}, update {scaler.update}")
    want_dtype = amp_dtype or torch.float16
    for rec in records:
        amp = [a for a in rec["autocast"] if a is not None and a.device_type == "cuda"]
        assert amp and amp[-1].dtype == want_dtype, (
            f"{name}: call compute_loss inside torch.autocast('cuda', dtype=amp_dtype, enabled=<device is CUDA>) "
            f"(dtype {want_dtype}); found {rec['autocast'] or 'no autocast'}")
        if rec["device"].type != "cuda":
            assert not amp[-1].enabled and not any(c["enabled"] for c in scaler.created), (
                f"{name}: on the CPU switch autocast and the GradScaler off (enabled=False): fp16 is slow there")


def _train_on_cuda(student: Callable, seed: int) -> None:
    """On a GPU: autocast really on in compute_loss, the scaler enabled."""
    data = _toy_data(4, 4, seed)
    model = _Toy().cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []

    def compute_loss(x, y):
        seen.append((x.device.type, torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")))
        return torch.nn.functional.mse_loss(model(x).float(), y)

    with quiet_rng(seed), track_grad_scaler() as scaler:
        call(student, "train_loop(...) on CUDA", model, opt, data, compute_loss, 2, gradient_accumulation_steps=2)
    assert all(d == "cuda" for d, _, _ in seen), "train_loop: move each batch to the model's device"
    assert all(on and dt == torch.float16 for _, on, dt in seen), (
        "train_loop: on CUDA, compute_loss must run under fp16 autocast")
    assert scaler.created and all(c["enabled"] for c in scaler.created), "train_loop: enable the GradScaler on CUDA"


def check_train_loop(student: Callable, ref: dict) -> None:
    """Accumulation equals full-batch steps (toy model, SGD), number of steps and loss calls, zero_grad,
    cycling the data, returned losses, GradScaler and autocast usage (switched off on the CPU)."""
    _, seed = new_generator()
    _train_case(student, num_steps=4, k=2, n_batches=6, amp_dtype=None, device=None, seed=seed)
    _train_case(student, num_steps=3, k=1, n_batches=2, amp_dtype=torch.bfloat16, device="cpu", seed=seed + 1)
    _train_case(student, num_steps=2, k=3, n_batches=6, amp_dtype=None, device=torch.device("cpu"), seed=seed + 2)
    if torch.cuda.is_available():
        _train_on_cuda(student, seed + 3)


# ------------------------------------------------------------------------------------------ sampling
def _chunks(call_: UNetCall, batch: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Split one UNet call into batch-sized pieces of (x, text, eps)."""
    n = call_.sample.shape[0]
    if n % batch:
        raise AssertionError(f"the UNet was called on {n} samples, not a multiple of the batch of {batch} images: "
                             "call it on the whole batch (or on [uncond, cond] together)")
    return [(call_.sample[i:i + batch], call_.encoder_hidden_states[i:i + batch], call_.output[i:i + batch])
            for i in range(0, n, batch)]


def analyse_sampler_calls(calls: list[UNetCall], cond: torch.Tensor, uncond: torch.Tensor, guidance: float,
                          name: str) -> list[dict]:
    """Group the UNet calls of a sampler into steps ``{"t", "x", "eps"}`` (eps with CFG applied when
    guidance > 1), checking the text embeddings of every call."""
    batch = cond.shape[0]
    steps: list[dict] = []
    for c in calls:
        t_values = set(c.timesteps.tolist())
        assert len(t_values) == 1, f"{name}: all images of a step share one timestep, got {sorted(t_values)}"
        t = t_values.pop()
        for x, text, eps in _chunks(c, batch):
            if close(text, cond, 1e-4, 1e-5):
                kind = "cond"
            elif close(text, uncond, 1e-4, 1e-5):
                kind = "uncond"
            else:
                raise AssertionError(
                    f"{name}: the UNet got text embeddings that are neither the prompts' (from pipe.encode_prompt, "
                    "each prompt repeated num_images_per_prompt times in a row) nor the empty prompt's")
            if not steps or steps[-1]["t"] != t or kind in steps[-1] or not close(steps[-1]["x"], x):
                steps.append({"t": t, "x": x})
            steps[-1][kind] = eps
    for st in steps:
        assert "cond" in st, f"{name}: at t = {st['t']} the UNet never saw the prompt embeddings"
        if guidance > 1:
            assert "uncond" in st, (
                f"{name}: guidance_scale = {guidance} > 1 needs classifier-free guidance: evaluate the UNet on the "
                f"empty prompt too at each step (t = {st['t']})")
            st["eps"] = st["uncond"] + guidance * (st["cond"] - st["uncond"])
        else:
            assert "uncond" not in st, (
                f"{name}: guidance_scale = {guidance} <= 1 means no classifier-free guidance (diffusers' convention); "
                "do not run the UNet on the empty prompt")
            st["eps"] = st["cond"]
    return steps


_EMBEDDINGS: dict = {}


def _prompt_embeddings(pipe, prompts, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts' and the empty prompt's embeddings as ``pipe.encode_prompt`` makes them (cached: the tiny
    pipeline's text encoder never changes)."""
    key = (id(pipe.text_encoder), prompts if isinstance(prompts, str) else tuple(prompts), n)
    if key not in _EMBEDDINGS:
        with torch.no_grad():
            cond, uncond = pipe.encode_prompt(prompts, torch.device("cpu"), n, True)
        _EMBEDDINGS[key] = (cond.float(), uncond.float())
    return _EMBEDDINGS[key]


def assert_decoded(pipe, out, x0: torch.Tensor, name: str) -> None:
    """``out`` (output_type="pt") must be the VAE decoding of the final latents ``x0``, post-processed to [0, 1]."""
    with torch.no_grad():
        image = pipe.vae.decode(x0 / pipe.vae.config.scaling_factor).sample
        expected = pipe.image_processor.postprocess(image, output_type="pt")
    assert isinstance(out, torch.Tensor) and out.shape == expected.shape, (
        f"{name} with output_type='pt' must return a tensor {tuple(expected.shape)} (images in [0, 1]), got "
        f"{type(out).__name__} {tuple(getattr(out, 'shape', ()))}")
    assert close(out, expected, 1e-3, 1e-3), (
        f"{name}: the images are not the VAE decoding of the final latents (divide by "
        "pipe.vae.config.scaling_factor, then pipe.image_processor.postprocess(image, output_type=...)); "
        f"max abs error {max_err(out, expected):.3g}")


def _cm_sampling_run(student: Callable, ref: dict, prompts, n: int, steps: int, guidance: float, seed: int,
                     output_type: str, given_latents: bool, gen_seed: int | None = None) -> dict:
    pipe = tiny_pipeline(ToyUNet(sample_size=16, seed=seed % 991))
    batch = (1 if isinstance(prompts, str) else len(prompts)) * n
    latents = torch.randn(batch, 4, 16, 16, generator=torch.Generator().manual_seed(seed + 10_000)) if given_latents else None
    name = (f"consistency_sampling(pipe, prompt, num_inference_steps={steps}, generator=..., "
            f"num_images_per_prompt={n}, guidance_scale={guidance}, latents={'...' if given_latents else 'None'}, "
            f"output_type={output_type!r})")
    with quiet_rng(seed + 7), track_autocast():
        out = call(student, name, pipe, prompts, num_inference_steps=steps,
                   generator=torch.Generator().manual_seed(seed if gen_seed is None else gen_seed),
                   num_images_per_prompt=n, guidance_scale=guidance, latents=latents, output_type=output_type)
    cond, uncond = _prompt_embeddings(pipe, prompts, n)
    return dict(name=name, out=out, pipe=pipe, latents=latents, cond=cond, uncond=uncond, calls=list(pipe.unet.calls),
                steps=steps, guidance=guidance)


def trailing_timesteps(scheduler, steps: int) -> list[int]:
    """The timesteps of a fresh copy of ``scheduler`` set to ``steps`` steps (trailing spacing: 999, 749, ...)."""
    from diffusers import DDIMScheduler

    fresh = DDIMScheduler.from_config(scheduler.config)
    fresh.set_timesteps(steps)
    return [int(t) for t in fresh.timesteps]


def _check_cm_steps(r: dict, ref: dict) -> torch.Tensor:
    """Verify the recorded steps of consistency sampling; return the final x0 the records imply."""
    name, pipe = r["name"], r["pipe"]
    ddim, sched = ref["ddim_solver_step"], pipe.scheduler
    steps = analyse_sampler_calls(r["calls"], r["cond"], r["uncond"], r["guidance"], name)
    want = trailing_timesteps(pipe.scheduler, r["steps"])
    got = [st["t"] for st in steps]
    assert got == want, (
        f"{name}: the UNet ran at timesteps {got}; expected the trailing DDIM timesteps {want} "
        "(pipe.scheduler.set_timesteps(num_inference_steps); scheduler.timesteps), one step each")
    if r["latents"] is not None:
        assert close(steps[0]["x"], r["latents"] * sched.init_noise_sigma), (
            f"{name}: the first step must start from the given latents")
    else:
        x = steps[0]["x"]
        assert abs(x.std().item() - 1) < 0.15, f"{name}: without latents, start from standard normal noise"
    batch = r["cond"].shape[0]
    x0 = None
    noises: list[torch.Tensor] = []
    for i, st in enumerate(steps):
        tt = torch.full((batch,), st["t"], dtype=torch.long)
        x0 = ddim(st["eps"], st["x"], tt, torch.zeros_like(tt), sched)
        if i + 1 < len(steps):
            nxt = steps[i + 1]
            alpha, sigma = alpha_sigma(sched, torch.full((batch,), nxt["t"], dtype=torch.long), 4)
            z = (nxt["x"] - alpha * x0) / sigma
            assert abs(z.mean().item()) < 0.15 and abs(z.std().item() - 1) < 0.15, (
                f"{name}: between steps, x must be q_sample(x0_hat, t_next, scheduler, noise) with fresh standard "
                f"normal noise: the implied noise at t = {nxt['t']} has mean {z.mean():.3f}, std {z.std():.3f}")
            corr = torch.corrcoef(torch.stack([z.flatten(), st["eps"].flatten()]))[0, 1].item()
            assert corr < 0.5, (
                f"{name}: the step to t = {nxt['t']} re-used the predicted noise (a deterministic DDIM step); "
                "consistency sampling re-noises x0_hat with *fresh* noise from the generator")
            if noises:
                again = torch.corrcoef(torch.stack([z.flatten(), noises[-1].flatten()]))[0, 1].item()
                assert abs(again) < 0.5, (
                    f"{name}: the noise added at t = {nxt['t']} is the same as at the previous step; draw fresh "
                    "noise at every step")
            noises.append(z)
    return x0


def check_consistency_sampling(student: Callable, ref: dict) -> None:
    """On a tiny pipeline with a recording toy UNet: trailing timesteps, x0_hat = DDIM step to 0 at each
    step, fresh noise from ``generator`` in between, CFG only when w > 1, the given latents, decoding."""
    _, seed = new_generator()
    prompts = ["a handwritten digit 3", "seven"]
    r = _cm_sampling_run(student, ref, prompts, 2, 4, 1.0, seed, "latent", True)
    x0 = _check_cm_steps(r, ref)
    name = r["name"]
    out = r["out"]
    assert isinstance(out, torch.Tensor) and close(out, x0, 1e-4, 1e-4), (
        f"{name}: with output_type='latent' return the final x0_hat latents (the DDIM step to 0 at the last "
        f"timestep), max abs error {max_err(out, x0) if isinstance(out, torch.Tensor) else '?'}")
    again = _cm_sampling_run(student, ref, prompts, 2, 4, 1.0, seed, "latent", True)
    assert close(again["out"], out, 0, 0), (
        f"{name}: two runs with the same generator seed differ: draw every noise from `generator` "
        "(e.g. diffusers.utils.torch_utils.randn_tensor(shape, generator=generator, ...)), not from torch's global one")
    other = _cm_sampling_run(student, ref, prompts, 2, 4, 1.0, seed, "latent", True, gen_seed=seed + 1)
    other_x = [st["x"] for st in analyse_sampler_calls(other["calls"], other["cond"], other["uncond"], 1.0, name)]
    first_x = [st["x"] for st in analyse_sampler_calls(r["calls"], r["cond"], r["uncond"], 1.0, name)]
    assert not close(other_x[1], first_x[1], 1e-3, 1e-3), (
        f"{name}: the noise between steps does not depend on the generator's seed: draw it from `generator`")

    r = _cm_sampling_run(student, ref, prompts, 2, 4, 3.0, seed + 2, "pt", True)
    assert_decoded(r["pipe"], r["out"], _check_cm_steps(r, ref), r["name"])

    r = _cm_sampling_run(student, ref, "the digit two", 3, 2, 1.0, seed + 3, "pil", False)
    _check_cm_steps(r, ref)
    out = r["out"]
    assert isinstance(out, list) and len(out) == 3 and all(hasattr(im, "size") for im in out), (
        f"{r['name']} must return a list of 3 PIL images (pipe.image_processor.postprocess(..., output_type='pil'))")
    assert out[0].size == (32, 32), f"{r['name']}: images of the tiny pipeline are 32x32, got {out[0].size}"
    again = _cm_sampling_run(student, ref, "the digit two", 3, 2, 1.0, seed + 3, "latent", False)
    first_x = analyse_sampler_calls(r["calls"], r["cond"], r["uncond"], 1.0, r["name"])[0]["x"]
    again_x = analyse_sampler_calls(again["calls"], again["cond"], again["uncond"], 1.0, r["name"])[0]["x"]
    assert close(first_x, again_x, 0, 0), (
        f"{r['name']}: without latents, draw the initial noise from `generator` (pipe.prepare_latents or "
        "randn_tensor with generator=generator)")


CHECKS = {
    "pseudo_huber_loss": check_pseudo_huber_loss,
    "get_xs_from_xt_with_teacher": check_get_xs_from_xt_with_teacher,
    "cm_loss_template": check_cm_loss_template,
    "train_loop": check_train_loop,
    "consistency_sampling": check_consistency_sampling,
}
DEPENDS: dict[str, tuple[str, ...]] = {name: () for name in CHECKS}
FORBIDDEN_NAMES: dict[str, tuple[str, ...]] = {
    "pseudo_huber_loss": ("huber_loss", "smooth_l1_loss", "HuberLoss", "SmoothL1Loss"),
    "get_xs_from_xt_with_teacher": (),
    "cm_loss_template": (),
    "train_loop": ("Accelerator",),
    "consistency_sampling": ("LCMScheduler", "TCDScheduler"),
}
