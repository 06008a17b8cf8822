"""Mutants of assignment 04 (the consistency loss, training loop, sampler, pseudo-Huber loss and distillation
target); format in ``tests/mutants/__init__.py``. The wrong ones include the defects of the original
course material (see the kit's course notes)."""

# ------------------------------------------------------------------------------------------ pseudo-Huber
_H = "def pseudo_huber_loss(x, y, c=0.001):\n"

# ------------------------------------------------------------------------------------------ teacher target
_T = """@torch.no_grad()
def get_xs_from_xt_with_teacher(x_0, x_t, t, s, scheduler, prompt_embeds, teacher_unet, guidance_scale,
                                uncond_prompt_embeds=None, **kwargs):
"""
_T_NOGRAD = """def get_xs_from_xt_with_teacher(x_0, x_t, t, s, scheduler, prompt_embeds, teacher_unet, guidance_scale,
                                uncond_prompt_embeds=None, **kwargs):
"""

# ------------------------------------------------------------------------------------------ loss
_L = """def cm_loss_template(latents, prompt_embeds, unet, scheduler, loss_fn, get_boundary_timesteps, get_xs_from_xt,
                     num_timesteps=1000, step_size=20):
"""
_L_DRAW = """    index = torch.randint(1, num_timesteps // step_size + 1, (latents.shape[0],), device=latents.device)
    t = step_size * index - 1
    s = torch.clamp(t - step_size, min=0)
    b = get_boundary_timesteps(s)
    noise = torch.randn_like(latents)
    x_t = q_sample(latents, t, scheduler, noise=noise)
"""
_AMP = "torch.autocast('cuda', dtype=torch.float16, enabled=latents.is_cuda)"

# ------------------------------------------------------------------------------------------ train loop
_TL = """def train_loop(unet, optimizer, dataloader, compute_loss, num_steps, gradient_accumulation_steps=2, device=None,
               amp_dtype=torch.float16):
    device = torch.device(device) if device is not None else next(unet.parameters()).device
    use_amp = device.type == "cuda"
"""


def _train_body(scaler: str = 'scaler = torch.amp.GradScaler("cuda", enabled=use_amp)',
                autocast: str = 'torch.autocast("cuda", dtype=amp_dtype, enabled=use_amp)',
                divide: str = " / gradient_accumulation_steps", backward: str = "scaler.scale(loss).backward()",
                step: str = "scaler.step(optimizer)\n                scaler.update()",
                zero: str = "optimizer.zero_grad()", record: str = "losses.append(total)",
                restart: bool = True) -> str:
    """A train_loop body with one piece swapped out (the defaults make the correct one)."""
    add = "loss.item()" if divide else "loss.item() / gradient_accumulation_steps"
    source = f"""    {scaler}
    unet.train()
    losses, total, micro = [], 0.0, 0
    while len(losses) < num_steps:
        for batch in dataloader:
            batch = [b.to(device) for b in batch]
            with {autocast}:
                loss = compute_loss(*batch){divide}
            {backward}
            total += {add}
            micro += 1
            if micro % gradient_accumulation_steps == 0:
                {step}
                {zero}
                {record}
                total = 0.0
                if len(losses) == num_steps:
                    break
"""
    if not restart:
        source += "        break\n"
    return _TL + source + "    return losses\n"


# ------------------------------------------------------------------------------------------ sampler
_S = """from diffusers.utils.torch_utils import randn_tensor


@torch.no_grad()
def consistency_sampling(pipe, prompt, num_inference_steps=4, generator=None, num_images_per_prompt=4,
                         guidance_scale=1, latents=None, output_type="pil"):
"""


def _sampler(cfg_condition: str = "guidance_scale > 1", timesteps: str = "scheduler.timesteps",
             between: str = "x = q_sample(x0, t_next, scheduler, noise=randn_tensor(x.shape, generator=generator, "
                            "device=device, dtype=x.dtype))",
             last: str = "x = x0", decode: str = "x.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor",
             before_loop: str = "") -> str:
    """A consistency_sampling with one piece swapped out (the defaults make the correct one)."""
    return _S + f"""    unet, scheduler, device = pipe.unet, pipe.scheduler, pipe.unet.device
    do_cfg = {cfg_condition}
    cond, uncond = pipe.encode_prompt(prompt, device, num_images_per_prompt, do_cfg)
    batch = cond.shape[0]
    size = unet.config.sample_size * pipe.vae_scale_factor
    x = pipe.prepare_latents(batch, unet.config.in_channels, size, size, torch.float32, device, generator, latents)
    scheduler.set_timesteps(num_inference_steps, device=device)
    timesteps = [int(v) for v in {timesteps}]
{before_loop}    for i, step in enumerate(timesteps):
        t = torch.full((batch,), step, device=device, dtype=torch.long)
        eps = unet(x, t, encoder_hidden_states=cond).sample
        if do_cfg:
            eps_u = unet(x, t, encoder_hidden_states=uncond).sample
            eps = eps_u + guidance_scale * (eps - eps_u)
        x0 = ddim_solver_step(eps, x, t, torch.zeros_like(t), scheduler)
        if i + 1 < len(timesteps):
            t_next = torch.full_like(t, timesteps[i + 1])
            {between}
        else:
            {last}
    if output_type == "latent":
        return x
    image = pipe.vae.decode({decode}, return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type=output_type)
"""


WRONG = {
    "pseudo_huber_loss": {
        "sum instead of mean": _H + "    return (torch.sqrt((x - y) ** 2 + c ** 2) - c).sum()\n",
        "c not subtracted": _H + "    return torch.sqrt((x - y) ** 2 + c ** 2).mean()\n",
        "c not squared": _H + "    return (torch.sqrt((x - y) ** 2 + c) - c).mean()\n",
        "plain L1 (no c)": _H + "    return (x - y).abs().mean()\n",
        "default c = 0.01": "def pseudo_huber_loss(x, y, c=0.01):\n    return (torch.sqrt((x - y) ** 2 + c ** 2) - c).mean()\n",
        "per-sample mean (not a scalar)": _H + "    return (torch.sqrt((x - y) ** 2 + c ** 2) - c).flatten(1).mean(1)\n",
    },
    "get_xs_from_xt_with_teacher": {
        "CFG for guidance > 0 (original template)": _T + """\
    eps = teacher_unet(x_t, t, encoder_hidden_states=prompt_embeds).sample
    if guidance_scale > 0:
        eps_u = teacher_unet(x_t, t, encoder_hidden_states=uncond_prompt_embeds).sample
        eps = eps_u + guidance_scale * (eps - eps_u)
    return ddim_solver_step(eps, x_t, t, s, scheduler)
""",
        "teacher run with gradients": _T_NOGRAD + """\
    eps = teacher_unet(x_t, t, encoder_hidden_states=prompt_embeds).sample
    if guidance_scale > 1:
        eps_u = teacher_unet(x_t, t, encoder_hidden_states=uncond_prompt_embeds).sample
        eps = eps_u + guidance_scale * (eps - eps_u)
    return ddim_solver_step(eps, x_t, t, s, scheduler)
""",
        "guidance ignored": _T + """\
    eps = teacher_unet(x_t, t, encoder_hidden_states=prompt_embeds).sample
    return ddim_solver_step(eps, x_t, t, s, scheduler)
""",
        "cond and uncond swapped in CFG": _T + """\
    eps = teacher_unet(x_t, t, encoder_hidden_states=prompt_embeds).sample
    if guidance_scale > 1:
        eps_u = teacher_unet(x_t, t, encoder_hidden_states=uncond_prompt_embeds).sample
        eps = eps + guidance_scale * (eps_u - eps)
    return ddim_solver_step(eps, x_t, t, s, scheduler)
""",
        "teacher evaluated at s": _T + """\
    eps = teacher_unet(x_t, s, encoder_hidden_states=prompt_embeds).sample
    if guidance_scale > 1:
        eps_u = teacher_unet(x_t, s, encoder_hidden_states=uncond_prompt_embeds).sample
        eps = eps_u + guidance_scale * (eps - eps_u)
    return ddim_solver_step(eps, x_t, t, s, scheduler)
""",
        "steps to 0 instead of s": _T + """\
    eps = teacher_unet(x_t, t, encoder_hidden_states=prompt_embeds).sample
    if guidance_scale > 1:
        eps_u = teacher_unet(x_t, t, encoder_hidden_states=uncond_prompt_embeds).sample
        eps = eps_u + guidance_scale * (eps - eps_u)
    return ddim_solver_step(eps, x_t, t, torch.zeros_like(s), scheduler)
""",
    },
    "cm_loss_template": {
        "seed: UNet run at the boundary, target with gradients": _L + _L_DRAW + """\
    with torch.autocast("cuda", dtype=torch.float16, enabled=latents.is_cuda):
        noise_pred = unet(x_t, t, encoder_hidden_states=prompt_embeds).sample
    boundary_pred = unet(x_t, b, encoder_hidden_states=prompt_embeds).sample
    x_s = get_xs_from_xt(latents, x_t, t, s, scheduler, prompt_embeds=prompt_embeds, noise=noise)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16, enabled=latents.is_cuda):
        target_noise_pred = unet(x_s, s, encoder_hidden_states=prompt_embeds).sample
    boundary_target = unet(x_s, b, encoder_hidden_states=prompt_embeds).sample
    return loss_fn(boundary_pred, boundary_target)
""",
        "target computed with gradients": _L + _L_DRAW + f"""\
    with {_AMP}:
        eps = unet(x_t, t, encoder_hidden_states=prompt_embeds).sample
        boundary_pred = ddim_solver_step(eps.float(), x_t, t, b, scheduler)
        x_s = get_xs_from_xt(latents, x_t, t, s, scheduler, prompt_embeds=prompt_embeds, noise=noise)
        eps_s = unet(x_s, s, encoder_hidden_states=prompt_embeds).sample
        boundary_target = ddim_solver_step(eps_s.float(), x_s, s, b, scheduler)
    return loss_fn(boundary_pred, boundary_target)
""",
        "t = 999 never drawn (index 1..49)": _L + """\
    index = torch.randint(1, num_timesteps // step_size, (latents.shape[0],), device=latents.device)
    t = step_size * index - 1
    s = torch.clamp(t - step_size, min=0)
    b = get_boundary_timesteps(s)
    noise = torch.randn_like(latents)
    x_t = q_sample(latents, t, scheduler, noise=noise)
""" + f"""\
    with {_AMP}:
        eps = unet(x_t, t, encoder_hidden_states=prompt_embeds).sample
    boundary_pred = ddim_solver_step(eps.float(), x_t, t, b, scheduler)
    x_s = get_xs_from_xt(latents, x_t, t, s, scheduler, prompt_embeds=prompt_embeds, noise=noise)
    with torch.no_grad(), {_AMP}:
        eps_s = unet(x_s, s, encoder_hidden_states=prompt_embeds).sample
    return loss_fn(boundary_pred, ddim_solver_step(eps_s.float(), x_s, s, b, scheduler))
""",
        "autocast on one UNet call only": _L + _L_DRAW + f"""\
    with {_AMP}:
        eps = unet(x_t, t, encoder_hidden_states=prompt_embeds).sample
    boundary_pred = ddim_solver_step(eps.float(), x_t, t, b, scheduler)
    x_s = get_xs_from_xt(latents, x_t, t, s, scheduler, prompt_embeds=prompt_embeds, noise=noise)
    with torch.no_grad():
        eps_s = unet(x_s, s, encoder_hidden_states=prompt_embeds).sample
    return loss_fn(boundary_pred, ddim_solver_step(eps_s.float(), x_s, s, b, scheduler))
""",
        "no autocast at all": _L + _L_DRAW + """\
    eps = unet(x_t, t, encoder_hidden_states=prompt_embeds).sample
    boundary_pred = ddim_solver_step(eps, x_t, t, b, scheduler)
    x_s = get_xs_from_xt(latents, x_t, t, s, scheduler, prompt_embeds=prompt_embeds, noise=noise)
    with torch.no_grad():
        eps_s = unet(x_s, s, encoder_hidden_states=prompt_embeds).sample
    return loss_fn(boundary_pred, ddim_solver_step(eps_s, x_s, s, b, scheduler))
""",
        "deprecated torch.cuda.amp.autocast": _L + _L_DRAW + """\
    with torch.cuda.amp.autocast(enabled=latents.is_cuda):
        eps = unet(x_t, t, encoder_hidden_states=prompt_embeds).sample
    boundary_pred = ddim_solver_step(eps.float(), x_t, t, b, scheduler)
    x_s = get_xs_from_xt(latents, x_t, t, s, scheduler, prompt_embeds=prompt_embeds, noise=noise)
    with torch.no_grad(), torch.cuda.amp.autocast(enabled=latents.is_cuda):
        eps_s = unet(x_s, s, encoder_hidden_states=prompt_embeds).sample
    return loss_fn(boundary_pred, ddim_solver_step(eps_s.float(), x_s, s, b, scheduler))
""",
        "target from x_t instead of x_s": _L + _L_DRAW + f"""\
    with {_AMP}:
        eps = unet(x_t, t, encoder_hidden_states=prompt_embeds).sample
    boundary_pred = ddim_solver_step(eps.float(), x_t, t, b, scheduler)
    x_s = get_xs_from_xt(latents, x_t, t, s, scheduler, prompt_embeds=prompt_embeds, noise=noise)
    with torch.no_grad(), {_AMP}:
        eps_s = unet(x_t, s, encoder_hidden_states=prompt_embeds).sample
    return loss_fn(boundary_pred, ddim_solver_step(eps_s.float(), x_t, s, b, scheduler))
""",
        "boundary of t instead of s": _L + _L_DRAW.replace("b = get_boundary_timesteps(s)", "b = get_boundary_timesteps(t)")
        + f"""\
    with {_AMP}:
        eps = unet(x_t, t, encoder_hidden_states=prompt_embeds).sample
    boundary_pred = ddim_solver_step(eps.float(), x_t, t, b, scheduler)
    x_s = get_xs_from_xt(latents, x_t, t, s, scheduler, prompt_embeds=prompt_embeds, noise=noise)
    with torch.no_grad(), {_AMP}:
        eps_s = unet(x_s, s, encoder_hidden_states=prompt_embeds).sample
    return loss_fn(boundary_pred, ddim_solver_step(eps_s.float(), x_s, s, b, scheduler))
""",
        "t anywhere in 0..999 (off the DDIM grid)": _L + """\
    t = torch.randint(step_size, num_timesteps, (latents.shape[0],), device=latents.device)
    s = torch.clamp(t - step_size, min=0)
    b = get_boundary_timesteps(s)
    noise = torch.randn_like(latents)
    x_t = q_sample(latents, t, scheduler, noise=noise)
""" + f"""\
    with {_AMP}:
        eps = unet(x_t, t, encoder_hidden_states=prompt_embeds).sample
    boundary_pred = ddim_solver_step(eps.float(), x_t, t, b, scheduler)
    x_s = get_xs_from_xt(latents, x_t, t, s, scheduler, prompt_embeds=prompt_embeds, noise=noise)
    with torch.no_grad(), {_AMP}:
        eps_s = unet(x_s, s, encoder_hidden_states=prompt_embeds).sample
    return loss_fn(boundary_pred, ddim_solver_step(eps_s.float(), x_s, s, b, scheduler))
""",
        "noise not passed to get_xs_from_xt": _L + _L_DRAW + f"""\
    with {_AMP}:
        eps = unet(x_t, t, encoder_hidden_states=prompt_embeds).sample
    boundary_pred = ddim_solver_step(eps.float(), x_t, t, b, scheduler)
    x_s = get_xs_from_xt(latents, x_t, t, s, scheduler, prompt_embeds=prompt_embeds)
    with torch.no_grad(), {_AMP}:
        eps_s = unet(x_s, s, encoder_hidden_states=prompt_embeds).sample
    return loss_fn(boundary_pred, ddim_solver_step(eps_s.float(), x_s, s, b, scheduler))
""",
        "loss_fn(target, pred)": _L + _L_DRAW + f"""\
    with {_AMP}:
        eps = unet(x_t, t, encoder_hidden_states=prompt_embeds).sample
    boundary_pred = ddim_solver_step(eps.float(), x_t, t, b, scheduler)
    x_s = get_xs_from_xt(latents, x_t, t, s, scheduler, prompt_embeds=prompt_embeds, noise=noise)
    with torch.no_grad(), {_AMP}:
        eps_s = unet(x_s, s, encoder_hidden_states=prompt_embeds).sample
    return loss_fn(ddim_solver_step(eps_s.float(), x_s, s, b, scheduler), boundary_pred)
""",
    },
    "train_loop": {
        "loss not divided by the accumulation steps": _train_body(divide=""),
        "optimizer step after every batch": _TL + """\
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    unet.train()
    losses, total, micro = [], 0.0, 0
    while len(losses) < num_steps:
        for batch in dataloader:
            batch = [b.to(device) for b in batch]
            with torch.autocast("cuda", dtype=amp_dtype, enabled=use_amp):
                loss = compute_loss(*batch) / gradient_accumulation_steps
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
            total += loss.item()
            micro += 1
            if micro % gradient_accumulation_steps == 0:
                losses.append(total)
                total = 0.0
                if len(losses) == num_steps:
                    break
    return losses
""",
        "gradients never zeroed": _train_body(zero="pass"),
        "optimizer.step() bypassing the scaler": _train_body(step="optimizer.step()"),
        "one pass over the data only": _train_body(restart=False),
        "loss of the last batch recorded": _train_body(record="losses.append(loss.item())"),
        "deprecated torch.cuda.amp API": _train_body(
            scaler="scaler = torch.cuda.amp.GradScaler(enabled=use_amp)",
            autocast="torch.cuda.amp.autocast(enabled=use_amp, dtype=amp_dtype)"),
        "no autocast": _train_body(autocast="torch.enable_grad()"),
        "autocast dtype fixed to fp16": _train_body(autocast='torch.autocast("cuda", dtype=torch.float16, enabled=use_amp)'),
    },
    "consistency_sampling": {
        "deterministic DDIM steps (no fresh noise)": _sampler(
            between="x = ddim_solver_step(eps, x, t, t_next, scheduler)"),
        "noise from torch's global generator": _sampler(
            between="x = q_sample(x0, t_next, scheduler, noise=torch.randn_like(x))"),
        "same noise at every step": _sampler(
            before_loop="    fixed = randn_tensor(x.shape, generator=generator, device=device, dtype=x.dtype)\n",
            between="x = q_sample(x0, t_next, scheduler, noise=fixed)"),
        "CFG for guidance > 0 (original template)": _sampler(cfg_condition="guidance_scale > 0"),
        "timesteps 999 - 250 i whatever the number of steps": _sampler(
            timesteps="[999 - 250 * i for i in range(num_inference_steps)]"),
        "VAE scaling factor forgotten": _sampler(decode="x.to(pipe.vae.dtype)"),
        "returns the last x_t, not x0_hat": _sampler(last="x = x"),
    },
}

CORRECT = {
    "pseudo_huber_loss": {
        "c * (sqrt(1 + (d / c)^2) - 1)": _H + "    d = (x - y).float()\n    return (c * (torch.sqrt(1 + (d / c) ** 2) - 1)).mean()\n",
        "torch.hypot": _H + "    d = (x - y).float()\n    return torch.mean(torch.hypot(d, torch.full_like(d, c)) - c)\n",
        "mse with reduction='none'": _H + "    return torch.mean(torch.sqrt(F.mse_loss(x.float(), y.float(), reduction='none') + c * c) - c)\n",
    },
    "get_xs_from_xt_with_teacher": {
        "one batched call for cond and uncond": _T + """\
    if guidance_scale > 1:
        both = teacher_unet(torch.cat([x_t, x_t]), torch.cat([t, t]),
                            encoder_hidden_states=torch.cat([uncond_prompt_embeds, prompt_embeds])).sample
        eps_u, eps_c = both.chunk(2)
        eps = eps_u + guidance_scale * (eps_c - eps_u)
    else:
        eps = teacher_unet(x_t, t, encoder_hidden_states=prompt_embeds).sample
    return ddim_solver_step(eps.float(), x_t, t, s, scheduler)
""",
        "eps_c + (w - 1)(eps_c - eps_u), with torch.no_grad() inside": _T_NOGRAD + """\
    with torch.no_grad():
        eps_c = teacher_unet(x_t.to(teacher_unet.dtype), t, encoder_hidden_states=prompt_embeds, return_dict=False)[0]
        eps = eps_c.float()
        if guidance_scale > 1:
            eps_u = teacher_unet(x_t.to(teacher_unet.dtype), t, encoder_hidden_states=uncond_prompt_embeds,
                                 return_dict=False)[0].float()
            eps = eps + (guidance_scale - 1) * (eps - eps_u)
        return ddim_solver_step(eps, x_t, t, s, scheduler)
""",
    },
    "cm_loss_template": {
        "target detached instead of no_grad": _L + _L_DRAW + f"""\
    with {_AMP}:
        eps = unet(x_t, t, encoder_hidden_states=prompt_embeds).sample
        x_s = get_xs_from_xt(latents, x_t, t, s, scheduler, prompt_embeds=prompt_embeds, noise=noise)
        eps_s = unet(x_s, s, encoder_hidden_states=prompt_embeds).sample.detach()
    boundary_pred = ddim_solver_step(eps.float(), x_t, t, b, scheduler)
    boundary_target = ddim_solver_step(eps_s.float(), x_s, s, b, scheduler).detach()
    return loss_fn(boundary_pred, boundary_target)
""",
        "grid from arange, inline noising, one autocast block": _L + """\
    grid = torch.arange(step_size - 1, num_timesteps, step_size, device=latents.device)
    t = grid[torch.randint(0, len(grid), (latents.shape[0],), device=latents.device)]
    s = (t - step_size).clamp(min=0)
    noise = torch.randn_like(latents)
    alpha_t, sigma_t = alpha_sigma(scheduler, t, latents.ndim)
    x_t = alpha_t * latents + sigma_t * noise
    with torch.autocast(device_type="cuda", dtype=torch.float16, enabled=torch.cuda.is_available()):
        boundary = get_boundary_timesteps(s, num_timesteps=num_timesteps)
        x_s = get_xs_from_xt(latents, x_t, t, s, scheduler, prompt_embeds=prompt_embeds, noise=noise)
        with torch.no_grad():
            target_eps = unet(x_s, s, prompt_embeds, return_dict=False)[0]
        pred_eps = unet(x_t, t, prompt_embeds, return_dict=False)[0]
    boundary_target = ddim_solver_step(target_eps.float(), x_s.float(), s, boundary, scheduler)
    boundary_pred = ddim_solver_step(pred_eps.float(), x_t.float(), t, boundary, scheduler)
    return loss_fn(boundary_pred, boundary_target)
""",
    },
    "train_loop": {
        "while loop with iter/next, zero_grad(set_to_none=False)": _TL + """\
    scaler = torch.amp.GradScaler(device="cuda", enabled=use_amp)
    unet.train()
    losses = []
    batches = iter(dataloader)
    bar = tqdm(total=num_steps, desc="train")
    while len(losses) < num_steps:
        step_losses = []
        for _ in range(gradient_accumulation_steps):
            try:
                batch = next(batches)
            except StopIteration:
                batches = iter(dataloader)
                batch = next(batches)
            with torch.amp.autocast(device_type="cuda", dtype=amp_dtype, enabled=use_amp):
                loss = compute_loss(*(b.to(device) for b in batch))
            scaler.scale(loss / gradient_accumulation_steps).backward()
            step_losses.append(loss.item())
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=False)
        losses.append(sum(step_losses) / len(step_losses))
        bar.update(1)
        bar.set_postfix(loss=losses[-1])
    bar.close()
    return losses
""",
        "micro-batch counter": _train_body(),
    },
    "consistency_sampling": {
        "batched CFG, torch.randn noise, own latents": """@torch.no_grad()
def consistency_sampling(pipe, prompt, num_inference_steps=4, generator=None, num_images_per_prompt=4,
                         guidance_scale=1, latents=None, output_type="pil"):
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    device = pipe.unet.device
    cfg = guidance_scale > 1
    cond, uncond = pipe.encode_prompt(prompts, device, num_images_per_prompt, cfg)
    n = cond.shape[0]
    cfg_dims = pipe.unet.config
    shape = (n, cfg_dims.in_channels, cfg_dims.sample_size, cfg_dims.sample_size)
    if latents is None:
        latents = torch.randn(shape, generator=generator, device="cpu" if generator is None else generator.device)
    x = latents.to(device, torch.float32) * pipe.scheduler.init_noise_sigma
    pipe.scheduler.set_timesteps(num_inference_steps)
    ts = pipe.scheduler.timesteps.tolist()
    for i, step in enumerate(ts):
        t = torch.full((n,), int(step), device=device)
        if cfg:
            out = pipe.unet(torch.cat([x, x]), torch.cat([t, t]),
                            encoder_hidden_states=torch.cat([uncond, cond])).sample.float()
            eps_u, eps_c = out.chunk(2)
            eps = eps_u + guidance_scale * (eps_c - eps_u)
        else:
            eps = pipe.unet(x, t, encoder_hidden_states=cond).sample.float()
        x = ddim_solver_step(eps, x, t, torch.zeros_like(t), pipe.scheduler)
        if i < len(ts) - 1:
            z = torch.randn(x.shape, generator=generator, device="cpu" if generator is None else generator.device)
            x = q_sample(x, torch.full_like(t, int(ts[i + 1])), pipe.scheduler, noise=z.to(device))
    if output_type == "latent":
        return x
    decoded = pipe.vae.decode(x / pipe.vae.config.scaling_factor).sample
    return pipe.image_processor.postprocess(decoded, output_type=output_type)
""",
        "reference-like with inline re-noising": _sampler(
            between="alpha, sigma = alpha_sigma(scheduler, t_next, x.ndim)\n"
                    "            x = alpha * x0 + sigma * randn_tensor(x.shape, generator=generator, device=device, "
                    "dtype=x.dtype)"),
    },
}
