"""Mutants of assignment 02 (``q_sample``, ``ddim_solver_step``); format in ``tests/mutants/__init__.py``."""

_Q = "def q_sample(x, t, scheduler, noise=None):\n"
_D = "def ddim_solver_step(model_output, x_t, t, s, scheduler):\n"

WRONG = {
    "q_sample": {
        "boundary override applied in q_sample (alpha=1, sigma=0 at t=0)": _Q + """\
    if noise is None:
        noise = torch.randn_like(x)
    alpha_t, sigma_t = alpha_sigma(scheduler, t, x.ndim)
    at_zero = (t == 0).view(-1, 1, 1, 1)
    alpha_t = torch.where(at_zero, torch.ones_like(alpha_t), alpha_t)
    sigma_t = torch.where(at_zero, torch.zeros_like(sigma_t), sigma_t)
    return (alpha_t * x + sigma_t * noise).to(x.dtype)
""",
        "sqrt forgotten (ab instead of sqrt(ab))": _Q + """\
    if noise is None:
        noise = torch.randn_like(x)
    ab = gather(scheduler.alphas_cumprod, t, x.ndim)
    return (ab * x + (1 - ab) * noise).to(x.dtype)
""",
        "alpha and sigma swapped": _Q + """\
    if noise is None:
        noise = torch.randn_like(x)
    alpha_t, sigma_t = alpha_sigma(scheduler, t, x.ndim)
    return (sigma_t * x + alpha_t * noise).to(x.dtype)
""",
        "off by one (ab[t - 1])": _Q + """\
    if noise is None:
        noise = torch.randn_like(x)
    ab = scheduler.alphas_cumprod.to(x.device)[t - 1].view(-1, 1, 1, 1)
    return (ab.sqrt() * x + (1 - ab).sqrt() * noise).to(x.dtype)
""",
        "sigma = 1 - alpha": _Q + """\
    if noise is None:
        noise = torch.randn_like(x)
    alpha_t, _ = alpha_sigma(scheduler, t, x.ndim)
    return (alpha_t * x + (1 - alpha_t) * noise).to(x.dtype)
""",
        "first timestep used for the whole batch": _Q + """\
    if noise is None:
        noise = torch.randn_like(x)
    ab = scheduler.alphas_cumprod[t[0]]
    return (ab.sqrt() * x + (1 - ab).sqrt() * noise).to(x.dtype)
""",
        "seeded inside the function (same noise every call)": _Q + """\
    if noise is None:
        torch.manual_seed(0)
        noise = torch.randn_like(x)
    alpha_t, sigma_t = alpha_sigma(scheduler, t, x.ndim)
    return (alpha_t * x + sigma_t * noise).to(x.dtype)
""",
        "private generator (not repeatable under torch.manual_seed)": _Q + """\
    if noise is None:
        generator = torch.Generator(device=x.device)
        generator.seed()
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    alpha_t, sigma_t = alpha_sigma(scheduler, t, x.ndim)
    return (alpha_t * x + sigma_t * noise).to(x.dtype)
""",
        "uniform noise (rand_like)": _Q + """\
    if noise is None:
        noise = torch.rand_like(x)
    alpha_t, sigma_t = alpha_sigma(scheduler, t, x.ndim)
    return (alpha_t * x + sigma_t * noise).to(x.dtype)
""",
        "one noise shared by the whole batch": _Q + """\
    if noise is None:
        noise = torch.randn_like(x[:1]).expand_as(x)
    alpha_t, sigma_t = alpha_sigma(scheduler, t, x.ndim)
    return (alpha_t * x + sigma_t * noise).to(x.dtype)
""",
        "given noise ignored": _Q + """\
    noise = torch.randn_like(x)
    alpha_t, sigma_t = alpha_sigma(scheduler, t, x.ndim)
    return (alpha_t * x + sigma_t * noise).to(x.dtype)
""",
    },
    "ddim_solver_step": {
        "no boundary convention": _D + """\
    alpha_t, sigma_t = alpha_sigma(scheduler, t, x_t.ndim)
    alpha_s, sigma_s = alpha_sigma(scheduler, s, x_t.ndim)
    x0_hat = (x_t - sigma_t * model_output) / alpha_t
    return (alpha_s * x0_hat + sigma_s * model_output).to(x_t.dtype)
""",
        "boundary convention at s only": _D + """\
    alpha_t, sigma_t = alpha_sigma(scheduler, t, x_t.ndim)
    alpha_s, sigma_s = alpha_sigma(scheduler, s, x_t.ndim)
    at_zero = (s == 0).view(-1, 1, 1, 1)
    alpha_s = torch.where(at_zero, 1.0, alpha_s)
    sigma_s = torch.where(at_zero, 0.0, sigma_s)
    x0_hat = (x_t - sigma_t * model_output) / alpha_t
    return (alpha_s * x0_hat + sigma_s * model_output).to(x_t.dtype)
""",
        "boundary convention at t only": _D + """\
    alpha_t, sigma_t = alpha_sigma(scheduler, t, x_t.ndim)
    alpha_s, sigma_s = alpha_sigma(scheduler, s, x_t.ndim)
    at_zero = (t == 0).view(-1, 1, 1, 1)
    alpha_t = torch.where(at_zero, 1.0, alpha_t)
    sigma_t = torch.where(at_zero, 0.0, sigma_t)
    x0_hat = (x_t - sigma_t * model_output) / alpha_t
    return (alpha_s * x0_hat + sigma_s * model_output).to(x_t.dtype)
""",
        "whole-batch boundary with a Python if": _D + """\
    alpha_t, sigma_t = alpha_sigma(scheduler, t, x_t.ndim)
    alpha_s, sigma_s = alpha_sigma(scheduler, s, x_t.ndim)
    if (t == 0).any():
        alpha_t, sigma_t = torch.ones_like(alpha_t), torch.zeros_like(sigma_t)
    if (s == 0).any():
        alpha_s, sigma_s = torch.ones_like(alpha_s), torch.zeros_like(sigma_s)
    x0_hat = (x_t - sigma_t * model_output) / alpha_t
    return (alpha_s * x0_hat + sigma_s * model_output).to(x_t.dtype)
""",
        "sqrt forgotten": _D + """\
    ab_t = gather(scheduler.alphas_cumprod, t, x_t.ndim)
    ab_s = gather(scheduler.alphas_cumprod, s, x_t.ndim)
    ab_t = torch.where((t == 0).view(-1, 1, 1, 1), 1.0, ab_t)
    ab_s = torch.where((s == 0).view(-1, 1, 1, 1), 1.0, ab_s)
    x0_hat = (x_t - (1 - ab_t) * model_output) / ab_t
    return (ab_s * x0_hat + (1 - ab_s) * model_output).to(x_t.dtype)
""",
        "alpha and sigma swapped": _D + """\
    alpha_t, sigma_t = alpha_sigma(scheduler, t, x_t.ndim)
    alpha_s, sigma_s = alpha_sigma(scheduler, s, x_t.ndim)
    alpha_t = torch.where((t == 0).view(-1, 1, 1, 1), 1.0, alpha_t)
    sigma_t = torch.where((t == 0).view(-1, 1, 1, 1), 0.0, sigma_t)
    alpha_s = torch.where((s == 0).view(-1, 1, 1, 1), 1.0, alpha_s)
    sigma_s = torch.where((s == 0).view(-1, 1, 1, 1), 0.0, sigma_s)
    x0_hat = (x_t - alpha_t * model_output) / sigma_t
    return (sigma_s * x0_hat + alpha_s * model_output).to(x_t.dtype)
""",
        "always returns x0_hat (noise term dropped)": _D + """\
    alpha_t, sigma_t = alpha_sigma(scheduler, t, x_t.ndim)
    alpha_s, _ = alpha_sigma(scheduler, s, x_t.ndim)
    alpha_t = torch.where((t == 0).view(-1, 1, 1, 1), 1.0, alpha_t)
    sigma_t = torch.where((t == 0).view(-1, 1, 1, 1), 0.0, sigma_t)
    alpha_s = torch.where((s == 0).view(-1, 1, 1, 1), 1.0, alpha_s)
    return (alpha_s * (x_t - sigma_t * model_output) / alpha_t).to(x_t.dtype)
""",
        "boundary by editing scheduler.alphas_cumprod in place": _D + """\
    scheduler.alphas_cumprod[0] = 1.0
    alpha_t, sigma_t = alpha_sigma(scheduler, t, x_t.ndim)
    alpha_s, sigma_s = alpha_sigma(scheduler, s, x_t.ndim)
    x0_hat = (x_t - sigma_t * model_output) / alpha_t
    return (alpha_s * x0_hat + sigma_s * model_output).to(x_t.dtype)
""",
        "x_t changed in place": _D + """\
    alpha_t, sigma_t = alpha_sigma(scheduler, t, x_t.ndim)
    alpha_s, sigma_s = alpha_sigma(scheduler, s, x_t.ndim)
    t0, s0 = (t == 0).view(-1, 1, 1, 1), (s == 0).view(-1, 1, 1, 1)
    alpha_t, sigma_t = torch.where(t0, 1.0, alpha_t), torch.where(t0, 0.0, sigma_t)
    alpha_s, sigma_s = torch.where(s0, 1.0, alpha_s), torch.where(s0, 0.0, sigma_s)
    x_t -= sigma_t * model_output
    x_t /= alpha_t
    return alpha_s * x_t + sigma_s * model_output
""",
    },
}

CORRECT = {
    "q_sample": {
        "diffusers' scheduler.add_noise": _Q + """\
    if noise is None:
        noise = torch.randn_like(x)
    return scheduler.add_noise(x, noise, t)
""",
        "manual gather with sqrt on the table": _Q + """\
    noise = torch.randn(x.shape, device=x.device, dtype=x.dtype) if noise is None else noise
    ab = scheduler.alphas_cumprod.to(device=x.device, dtype=torch.float32)[t].view(-1, *([1] * (x.ndim - 1)))
    return (torch.sqrt(ab) * x.float() + torch.sqrt(1.0 - ab) * noise.float()).to(x.dtype)
""",
        "helpers.schedule.gather, computed in float64": _Q + """\
    if noise is None:
        noise = torch.randn_like(x)
    ab = gather(scheduler.alphas_cumprod, t, x.ndim).double()
    return (ab ** 0.5 * x.double() + (1 - ab) ** 0.5 * noise.double()).to(x.dtype)
""",
    },
    "ddim_solver_step": {
        "boolean masks on the gathered tables": _D + """\
    alpha_t, sigma_t = alpha_sigma(scheduler, t, x_t.ndim)
    alpha_s, sigma_s = alpha_sigma(scheduler, s, x_t.ndim)
    alpha_t[t == 0] = 1.0
    sigma_t[t == 0] = 0.0
    alpha_s[s == 0] = 1.0
    sigma_s[s == 0] = 0.0
    x0_hat = (x_t.float() - sigma_t * model_output.float()) / alpha_t
    x_s = alpha_s * x0_hat + sigma_s * model_output.float()
    return x_s.to(x_t.dtype)
""",
        "a copy of alphas_cumprod with ab[0] = 1": _D + """\
    ab = scheduler.alphas_cumprod.to(device=x_t.device, dtype=torch.float32).clone()
    ab[0] = 1.0
    shape = (-1,) + (1,) * (x_t.ndim - 1)
    ab_t, ab_s = ab[t].view(shape), ab[s].view(shape)
    eps = model_output.float()
    x0_hat = (x_t.float() - (1 - ab_t).sqrt() * eps) / ab_t.sqrt()
    return (ab_s.sqrt() * x0_hat + (1 - ab_s).sqrt() * eps).to(x_t.dtype)
""",
        "float64 with torch.where on the timesteps": _D + """\
    shape = (-1,) + (1,) * (x_t.ndim - 1)
    ab = scheduler.alphas_cumprod.to(x_t.device).double()
    ab_t = torch.where(t == 0, torch.ones_like(ab[t]), ab[t]).view(shape)
    ab_s = torch.where(s == 0, torch.ones_like(ab[s]), ab[s]).view(shape)
    eps = model_output.double()
    x0_hat = (x_t.double() - torch.sqrt(1 - ab_t) * eps) / torch.sqrt(ab_t)
    return (torch.sqrt(ab_s) * x0_hat + torch.sqrt(1 - ab_s) * eps).to(x_t.dtype)
""",
    },
}
