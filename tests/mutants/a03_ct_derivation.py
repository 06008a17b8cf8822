"""Mutants of assignment 03 (``get_xs_from_xt_naive``); format in ``tests/mutants/__init__.py``."""

_G = "def get_xs_from_xt_naive(x_0, x_t, t, s, scheduler, noise=None, **kwargs):\n"

WRONG = {
    "get_xs_from_xt_naive": {
        "no boundary convention at s = 0": _G + """\
    alpha_t, sigma_t = alpha_sigma(scheduler, t, x_t.ndim)
    if noise is None:
        noise = (x_t - alpha_t * x_0) / sigma_t
    alpha_s, sigma_s = alpha_sigma(scheduler, s, x_t.ndim)
    return (alpha_s * x_0 + sigma_s * noise).to(x_t.dtype)
""",
        "x_t in place of x_0": _G + """\
    alpha_t, sigma_t = alpha_sigma(scheduler, t, x_t.ndim)
    if noise is None:
        noise = (x_t - alpha_t * x_0) / sigma_t
    alpha_s, sigma_s = alpha_sigma(scheduler, s, x_t.ndim)
    s0 = (s == 0).view(-1, 1, 1, 1)
    alpha_s, sigma_s = torch.where(s0, 1.0, alpha_s), torch.where(s0, 0.0, sigma_s)
    return (alpha_s * x_t + sigma_s * noise).to(x_t.dtype)
""",
        "given noise ignored (always recovered)": _G + """\
    alpha_t, sigma_t = alpha_sigma(scheduler, t, x_t.ndim)
    noise = (x_t - alpha_t * x_0) / sigma_t
    alpha_s, sigma_s = alpha_sigma(scheduler, s, x_t.ndim)
    s0 = (s == 0).view(-1, 1, 1, 1)
    alpha_s, sigma_s = torch.where(s0, 1.0, alpha_s), torch.where(s0, 0.0, sigma_s)
    return (alpha_s * x_0 + sigma_s * noise).to(x_t.dtype)
""",
        "fresh noise when noise is None": _G + """\
    if noise is None:
        noise = torch.randn_like(x_0)
    alpha_s, sigma_s = alpha_sigma(scheduler, s, x_t.ndim)
    s0 = (s == 0).view(-1, 1, 1, 1)
    alpha_s, sigma_s = torch.where(s0, 1.0, alpha_s), torch.where(s0, 0.0, sigma_s)
    return (alpha_s * x_0 + sigma_s * noise).to(x_t.dtype)
""",
        "noise recovered without alpha_t": _G + """\
    _, sigma_t = alpha_sigma(scheduler, t, x_t.ndim)
    if noise is None:
        noise = (x_t - x_0) / sigma_t
    alpha_s, sigma_s = alpha_sigma(scheduler, s, x_t.ndim)
    s0 = (s == 0).view(-1, 1, 1, 1)
    alpha_s, sigma_s = torch.where(s0, 1.0, alpha_s), torch.where(s0, 0.0, sigma_s)
    return (alpha_s * x_0 + sigma_s * noise).to(x_t.dtype)
""",
        "boundary convention also in the noise recovery (divides by 0 at t = 0)": _G + """\
    alpha_t, sigma_t = alpha_sigma(scheduler, t, x_t.ndim)
    alpha_s, sigma_s = alpha_sigma(scheduler, s, x_t.ndim)
    t0, s0 = (t == 0).view(-1, 1, 1, 1), (s == 0).view(-1, 1, 1, 1)
    alpha_t, sigma_t = torch.where(t0, 1.0, alpha_t), torch.where(t0, 0.0, sigma_t)
    alpha_s, sigma_s = torch.where(s0, 1.0, alpha_s), torch.where(s0, 0.0, sigma_s)
    if noise is None:
        noise = (x_t - alpha_t * x_0) / sigma_t
    return (alpha_s * x_0 + sigma_s * noise).to(x_t.dtype)
""",
        "no **kwargs (breaks when the loss passes prompt_embeds)": """\
def get_xs_from_xt_naive(x_0, x_t, t, s, scheduler, noise=None):
    alpha_t, sigma_t = alpha_sigma(scheduler, t, x_t.ndim)
    if noise is None:
        noise = (x_t - alpha_t * x_0) / sigma_t
    alpha_s, sigma_s = alpha_sigma(scheduler, s, x_t.ndim)
    s0 = (s == 0).view(-1, 1, 1, 1)
    alpha_s, sigma_s = torch.where(s0, 1.0, alpha_s), torch.where(s0, 0.0, sigma_s)
    return (alpha_s * x_0 + sigma_s * noise).to(x_t.dtype)
""",
        "sqrt forgotten": _G + """\
    ab_t = gather(scheduler.alphas_cumprod, t, x_t.ndim)
    ab_s = gather(scheduler.alphas_cumprod, s, x_t.ndim)
    if noise is None:
        noise = (x_t - ab_t * x_0) / (1 - ab_t)
    ab_s = torch.where((s == 0).view(-1, 1, 1, 1), 1.0, ab_s)
    return (ab_s * x_0 + (1 - ab_s) * noise).to(x_t.dtype)
""",
        "alpha and sigma taken at t instead of s": _G + """\
    alpha_t, sigma_t = alpha_sigma(scheduler, t, x_t.ndim)
    if noise is None:
        noise = (x_t - alpha_t * x_0) / sigma_t
    s0 = (s == 0).view(-1, 1, 1, 1)
    alpha, sigma = torch.where(s0, 1.0, alpha_t), torch.where(s0, 0.0, sigma_t)
    return (alpha * x_0 + sigma * noise).to(x_t.dtype)
""",
        "a DDIM step with the noise (gives x_t, not x_0, at t = s = 0)": _G + """\
    alpha_t, sigma_t = alpha_sigma(scheduler, t, x_t.ndim)
    if noise is None:
        noise = (x_t - alpha_t * x_0) / sigma_t
    return ddim_solver_step(noise, x_t, t, s, scheduler)
""",
    },
}

CORRECT = {
    "get_xs_from_xt_naive": {
        "boolean masks, manual gather": _G + """\
    shape = (-1,) + (1,) * (x_t.ndim - 1)
    ab = scheduler.alphas_cumprod.to(x_t.device).float()
    alpha_t, sigma_t = ab[t].sqrt().view(shape), (1 - ab[t]).sqrt().view(shape)
    if noise is None:
        noise = (x_t.float() - alpha_t * x_0.float()) / sigma_t
    alpha_s, sigma_s = ab[s].sqrt().view(shape).clone(), (1 - ab[s]).sqrt().view(shape).clone()
    alpha_s[s == 0] = 1.0
    sigma_s[s == 0] = 0.0
    return (alpha_s * x_0.float() + sigma_s * noise.float()).to(x_t.dtype)
""",
        "q_sample from assignment 02, then x_0 where s = 0": _G + """\
    if noise is None:
        alpha_t, sigma_t = alpha_sigma(scheduler, t, x_t.ndim)
        noise = ((x_t.float() - alpha_t * x_0.float()) / sigma_t).to(x_t.dtype)
    x_s = q_sample(x_0, s, scheduler, noise=noise)
    return torch.where((s == 0).view(-1, *([1] * (x_t.ndim - 1))), x_0, x_s).to(x_t.dtype)
""",
        "float64 throughout": _G + """\
    ab_t = gather(scheduler.alphas_cumprod, t, x_t.ndim).double()
    ab_s = gather(scheduler.alphas_cumprod, s, x_t.ndim).double()
    if noise is None:
        noise = (x_t.double() - ab_t.sqrt() * x_0.double()) / (1 - ab_t).sqrt()
    ab_s = torch.where((s == 0).view(-1, 1, 1, 1), torch.ones_like(ab_s), ab_s)
    return (ab_s.sqrt() * x_0.double() + (1 - ab_s).sqrt() * noise.double()).to(x_t.dtype)
""",
    },
}
