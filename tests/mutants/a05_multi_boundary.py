"""Mutants of assignment 05 (``get_multi_boundary_timesteps``, ``multi_boundary_sampling``); format in
``tests/mutants/__init__.py``. The wrong ones include the original course's boundaries [0, 250, 500, 750]
with ties sent to the lower segment."""

_B = "def get_multi_boundary_timesteps(timesteps, num_boundaries=4, num_timesteps=1000):\n"
_S = """@torch.no_grad()
def multi_boundary_sampling(pipe, prompt, num_boundaries=4, generator=None, num_images_per_prompt=4,
                            guidance_scale=1, latents=None, output_type="pil"):
    unet, scheduler, device = pipe.unet, pipe.scheduler, pipe.unet.device
"""


def _sampler(cfg_condition: str = "guidance_scale > 1", plan: str = "", step: str = "x = ddim_solver_step(eps, x, t, b, scheduler)") -> str:
    """A multi_boundary_sampling with one piece swapped out; ``plan`` must define ``pairs`` = [(t, b), ...]
    (the default plan is the matched one)."""
    plan = plan or """\
    edges = get_multi_boundary_timesteps(torch.arange(1000, device=device), num_boundaries)
    inner = sorted(set(edges.tolist()) - {0}, reverse=True)
    starts = [999] + [b for b in inner if b != 999]
    pairs = list(zip(starts, starts[1:] + [0]))
"""
    return _S + f"""    do_cfg = {cfg_condition}
    cond, uncond = pipe.encode_prompt(prompt, device, num_images_per_prompt, do_cfg)
    batch = cond.shape[0]
    size = unet.config.sample_size * pipe.vae_scale_factor
    x = pipe.prepare_latents(batch, unet.config.in_channels, size, size, torch.float32, device, generator, latents)
{plan}    for t_value, b_value in pairs:
        t = torch.full((batch,), t_value, device=device, dtype=torch.long)
        b = torch.full((batch,), b_value, device=device, dtype=torch.long)
        eps = unet(x, t, encoder_hidden_states=cond).sample
        if do_cfg:
            eps_u = unet(x, t, encoder_hidden_states=uncond).sample
            eps = eps_u + guidance_scale * (eps - eps_u)
        {step}
    if output_type == "latent":
        return x
    image = pipe.vae.decode(x / pipe.vae.config.scaling_factor, return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type=output_type)
"""


WRONG = {
    "get_multi_boundary_timesteps": {
        "original: [0, 250, 500, 750], ties to the lower segment": _B + """\
    step = num_timesteps // num_boundaries
    boundaries = torch.arange(0, num_timesteps, step, device=timesteps.device)
    index = torch.bucketize(timesteps, boundaries, right=False) - 1
    return boundaries[index.clamp(min=0)]
""",
        "ties sent to the lower segment": _B + """\
    length = math.ceil(50 / num_boundaries)
    boundaries = torch.tensor([0] + [20 * j * length - 1 for j in range(1, num_boundaries)], device=timesteps.device)
    index = torch.bucketize(timesteps, boundaries, right=False) - 1
    return boundaries[index.clamp(min=0)]
""",
        "floor instead of ceil for the segment length": _B + """\
    length = 50 // num_boundaries
    boundaries = torch.tensor([0] + [20 * j * length - 1 for j in range(1, num_boundaries)], device=timesteps.device)
    return boundaries[torch.bucketize(timesteps, boundaries, right=True) - 1]
""",
        "boundaries off the s grid (20 j L, no - 1)": _B + """\
    length = math.ceil(50 / num_boundaries)
    boundaries = torch.tensor([0] + [20 * j * length for j in range(1, num_boundaries)], device=timesteps.device)
    return boundaries[torch.bucketize(timesteps, boundaries, right=True) - 1]
""",
        "smallest boundary >= t": _B + """\
    length = math.ceil(50 / num_boundaries)
    boundaries = torch.tensor([0] + [20 * j * length - 1 for j in range(1, num_boundaries)] + [num_timesteps - 1],
                              device=timesteps.device)
    return boundaries[torch.bucketize(timesteps, boundaries, right=False)]
""",
    },
    "multi_boundary_sampling": {
        "the pipeline's timesteps 999/749/499/249 with DDIM steps": _sampler(plan="""\
    scheduler.set_timesteps(num_boundaries, device=device)
    ts = [int(v) for v in scheduler.timesteps]
    pairs = list(zip(ts, ts[1:] + [0]))
"""),
        "boundary of t instead of t - 20 (stalls at each boundary)": _sampler(plan="""\
    pairs, t_value = [], 999
    for _ in range(num_boundaries):
        b_value = int(get_multi_boundary_timesteps(torch.tensor([t_value], device=device), num_boundaries)[0])
        pairs.append((t_value, b_value))
        t_value = b_value
"""),
        "no last step to 0": _sampler(plan="""\
    edges = get_multi_boundary_timesteps(torch.arange(1000, device=device), num_boundaries)
    inner = sorted(set(edges.tolist()) - {0}, reverse=True)
    starts = [999] + [b for b in inner if b != 999]
    pairs = list(zip(starts, starts[1:] + [0]))[:-1]
"""),
        "fresh noise between steps (consistency sampling)": _sampler(
            step="x0 = ddim_solver_step(eps, x, t, torch.zeros_like(t), scheduler)\n"
                 "        x = q_sample(x0, b, scheduler, noise=torch.randn(x.shape, generator=generator)) if b_value else x0"),
        "CFG for guidance > 0": _sampler(cfg_condition="guidance_scale > 0"),
    },
}

CORRECT = {
    "get_multi_boundary_timesteps": {
        "count of boundaries <= t": _B + """\
    grid_step = num_timesteps // 50
    length = -(-50 // num_boundaries)
    boundaries = torch.tensor([0] + [grid_step * j * length - 1 for j in range(1, num_boundaries)],
                              device=timesteps.device)
    index = (timesteps[:, None] >= boundaries[None, :]).sum(dim=1) - 1
    return boundaries[index]
""",
        "loop with torch.where": _B + """\
    length = math.ceil(50 / num_boundaries)
    out = torch.zeros_like(timesteps)
    for j in range(1, num_boundaries):
        edge = 20 * j * length - 1
        out = torch.where(timesteps >= edge, torch.full_like(timesteps, edge), out)
    return out
""",
    },
    "multi_boundary_sampling": {
        "while loop on the boundary of t - 20": _S + """\
    w = guidance_scale
    cond, uncond = pipe.encode_prompt(prompt, device, num_images_per_prompt, w > 1)
    n = cond.shape[0]
    if latents is None:
        shape = (n, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
        latents = torch.randn(shape, generator=generator)
    x = latents.to(device).float() * scheduler.init_noise_sigma
    t = torch.full((n,), 999, device=device)
    while True:
        b = get_multi_boundary_timesteps((t - 20).clamp(min=0), num_boundaries=num_boundaries)
        if w > 1:
            both = unet(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=torch.cat([uncond, cond])).sample
            eps_u, eps_c = both.float().chunk(2)
            eps = eps_u + w * (eps_c - eps_u)
        else:
            eps = unet(x, t, encoder_hidden_states=cond).sample.float()
        x = ddim_solver_step(eps, x, t, b, scheduler)
        if int(b.max()) == 0:
            break
        t = b
    if output_type == "latent":
        return x
    image = pipe.vae.decode(x / pipe.vae.config.scaling_factor).sample
    return pipe.image_processor.postprocess(image, output_type=output_type)
""",
        "explicit plan of (t, b) pairs": _sampler(),
    },
}
