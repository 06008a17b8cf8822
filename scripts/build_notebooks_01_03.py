"""Write the solution notebooks of assignments 01-03 (``solutions/0{1,2,3}_*/*.ipynb``) deterministically.

The notebooks in ``solutions/`` are the source of truth; this script is how they were written and the easy
way to change them (edit here, run it, then ``python -m autograder release``). Run from anywhere:

    .venv/bin/python scripts/build_notebooks_01_03.py [--check]

``--check`` writes nothing and exits 1 when a notebook on disk differs from what the script would write.
Conventions (docs/design.md): setup cell first; each graded function alone in its answer cell
(grade_id = function name) followed by its tests cell (grade_id = test_<name>) with visible tests and the
hidden-test block; heavy cells sized with ``helpers.runmode.pick``; kernel ``python3``; no outputs.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from textwrap import dedent

import nbformat

ROOT = Path(__file__).resolve().parents[1]
KERNELSPEC = {"display_name": "Python 3", "language": "python", "name": "python3"}


# ------------------------------------------------------------------------------------------- cell makers
def _src(text: str) -> str:
    return dedent(text).strip("\n")


def md(text: str) -> nbformat.NotebookNode:
    """A prose cell."""
    return nbformat.v4.new_markdown_cell(_src(text))


def code(text: str) -> nbformat.NotebookNode:
    """An ordinary (ungraded) code cell."""
    return nbformat.v4.new_code_cell(_src(text))


def answer(grade_id: str, text: str) -> nbformat.NotebookNode:
    """The answer cell of a graded function (autograded through its tests cell)."""
    cell = code(text)
    cell.metadata["nbgrader"] = {"solution": True, "grade": False, "locked": False, "grade_id": grade_id,
                                 "schema_version": 3}
    return cell


def tests(function: str, points: int, visible: str) -> nbformat.NotebookNode:
    """The tests cell of ``function``: visible tests, then the hidden-test block."""
    hidden = (f'### BEGIN HIDDEN TESTS\nfrom autograder.checks import hidden_check\n'
              f'hidden_check("{function}", {function})\n### END HIDDEN TESTS')
    cell = nbformat.v4.new_code_cell(_src(visible) + "\n\n" + hidden)
    cell.metadata["nbgrader"] = {"grade": True, "solution": False, "locked": True, "grade_id": f"test_{function}",
                                 "points": points, "schema_version": 3}
    return cell


def manual_answer(grade_id: str, points: int, text: str) -> nbformat.NotebookNode:
    """A written answer, graded by hand (markdown solution + grade cell)."""
    cell = md(text)
    cell.metadata["nbgrader"] = {"solution": True, "grade": True, "grade_id": grade_id, "points": points,
                                 "locked": False, "schema_version": 3}
    return cell


def notebook(prefix: str, cells: list[nbformat.NotebookNode]) -> nbformat.NotebookNode:
    """A notebook with deterministic cell ids and the python3 kernel."""
    for i, cell in enumerate(cells):
        cell.id = f"{prefix}-{i:02d}"
    nb = nbformat.v4.new_notebook(cells=cells, metadata={
        "kernelspec": KERNELSPEC, "language_info": {"name": "python"}})
    nbformat.validate(nb)
    return nb


# ------------------------------------------------------------------------------------- 01 model loading
def model_loading() -> nbformat.NotebookNode:
    return notebook("ml", [
        md(r"""
        # Assignment 01: load the teacher and sample it in 50 and in 4 steps

        **Goal.** Load a text-to-image diffusion model with 🤗 diffusers, configured the way the whole course
        uses it, and see what happens when it generates in 4 steps instead of 50.

        **Why.** This model is the *teacher*: in the next assignments we distil it into a *consistency
        model* that makes in 4 steps what the teacher makes in 50. Its parts are the ones we work with from
        now on: the UNet predicts the noise $\varepsilon$ in a noisy latent, the VAE maps images to latents and
        back, the text encoder turns the prompt into embeddings, and the scheduler holds the noise schedule
        $\bar\alpha_t$ = `scheduler.alphas_cumprod[t]`.

        **Which model.** By default the kit runs a small model with Stable Diffusion's architecture, trained on
        handwritten digits: it runs on a laptop CPU in seconds. On a GPU, start Jupyter with the environment
        variable `CD_KIT_MODEL=sd15` to use Stable Diffusion 1.5 (`stable-diffusion-v1-5/stable-diffusion-v1-5`):
        the same code, the same tasks. The setup cell below prints which model and device you are on.
        """),
        code("""
        from helpers.answer_env import *
        from diffusers import StableDiffusionPipeline  # import-time messages of the libraries appear here
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging
        from helpers import runmode
        from helpers.device import pick_device
        from helpers.models import describe_setup, resolve_model
        from helpers.plotting import show_images
        from helpers.report import save_figure
        from helpers.seeding import make_generator

        # Loading progress bars go to stderr where ipywidgets is missing; nbgrader fails a tests cell that writes there.
        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
        MODEL = resolve_model()  # the model setting: $CD_KIT_MODEL, default the kit's small model
        DEVICE = pick_device()  # CUDA when available, else the CPU
        print(describe_setup())
        """),
        md(r"""
        ## Task 1 (2 points): `load_pipeline(model_id, device)`

        Write a function that returns a `diffusers.StableDiffusionPipeline` loaded from `model_id` (a Hugging Face
        Hub id or a local folder) and ready for the course:

        1. **Precision from the device.** fp16 (`torch.float16`) when `device` is a CUDA device, fp32 otherwise.
           Pass it with the `dtype=` keyword of `from_pretrained` (diffusers 0.42; the older `torch_dtype=` is
           deprecated). *Why:* fp16 halves the memory and is fast on GPUs, but on a CPU it is 5 to 9 times slower
           than fp32. `device` may be a string (`"cuda"`, `"cpu"`) or a `torch.device`.
        2. **No safety checker** (`safety_checker=None, requires_safety_checker=False`): it is not part of what we
           distil, and it costs memory and time.
        3. **A DDIM scheduler with "trailing" timestep spacing**, built from the model's own scheduler
           configuration (so it keeps the model's noise schedule). *Why:* with 4 steps, trailing spacing visits
           the timesteps 999, 749, 499, 249, so the first step starts where sampling really starts, from pure
           noise at $t = 999$. The default "leading" spacing gives 751, 501, 251, 1: the sampler would treat
           pure noise as a partly noisy image, which makes few-step samples worse.
        4. **Everything on `device`**: the pipeline, and also `pipe.scheduler.alphas_cumprod`, the table our own
           functions will index with timesteps that live on the GPU.

        *Hints.* `torch.device(device).type` is `"cuda"` or `"cpu"`. Every diffusers scheduler class has
        `from_config(config, **overrides)`, and `pipe.scheduler.config` is the configuration of the scheduler the
        model came with. `pipe.to(device)` moves the models, not the scheduler's tensors.

        *A correct result:* the tests print the components in fp32 on the CPU (fp16 on a GPU) and the 4-step
        timesteps `[999, 749, 499, 249]`.
        """),
        answer("load_pipeline", """
        from diffusers import DDIMScheduler, StableDiffusionPipeline


        def load_pipeline(model_id: str, device: str | torch.device) -> StableDiffusionPipeline:
            \"\"\"Load ``model_id`` as a StableDiffusionPipeline on ``device``: fp16 on CUDA and fp32 elsewhere, no
            safety checker, a DDIM scheduler with "trailing" timestep spacing built from the model's scheduler
            config, and the scheduler's ``alphas_cumprod`` on ``device``.\"\"\"
            ### BEGIN SOLUTION
            device = torch.device(device)
            dtype = torch.float16 if device.type == "cuda" else torch.float32
            pipe = StableDiffusionPipeline.from_pretrained(
                model_id, dtype=dtype, safety_checker=None, requires_safety_checker=False
            )
            pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
            pipe = pipe.to(device)
            pipe.scheduler.alphas_cumprod = pipe.scheduler.alphas_cumprod.to(device)
            return pipe
            ### END SOLUTION
        """),
        tests("load_pipeline", 2, """
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        pipe = load_pipeline(MODEL.source, DEVICE)  # the cells below use this pipeline
        want = torch.float16 if DEVICE.type == "cuda" else torch.float32
        assert isinstance(pipe, StableDiffusionPipeline), (
            f"load_pipeline must return a StableDiffusionPipeline, got {type(pipe).__name__}")
        for part in ("unet", "vae", "text_encoder"):
            module = getattr(pipe, part)
            print(f"{part:>12}: {module.dtype} on {module.device}")
            assert module.dtype == want, (
                f"pipe.{part} is {module.dtype}, expected {want} on {DEVICE.type}: choose the dtype from `device`")
            assert module.device.type == DEVICE.type, f"pipe.{part} is on {module.device}: move the pipeline to `device`"
        assert pipe.safety_checker is None, "the safety checker is still loaded: pass safety_checker=None"
        assert isinstance(pipe.scheduler, DDIMScheduler), (
            f"pipe.scheduler is a {type(pipe.scheduler).__name__}, expected a DDIMScheduler")
        assert pipe.scheduler.config.timestep_spacing == "trailing", (
            f"timestep_spacing is {pipe.scheduler.config.timestep_spacing!r}, expected 'trailing'")
        assert pipe.scheduler.alphas_cumprod.device.type == DEVICE.type, (
            f"pipe.scheduler.alphas_cumprod is on {pipe.scheduler.alphas_cumprod.device}: put it on `device` too")
        pipe.scheduler.set_timesteps(4)
        print("4-step timesteps:", pipe.scheduler.timesteps.tolist())
        assert pipe.scheduler.timesteps.tolist() == [999, 749, 499, 249], (
            "4 DDIM steps should visit 999, 749, 499, 249: use timestep_spacing='trailing'")
        print("load_pipeline: visible tests passed")
        """),
        md(r"""
        ## Look: 50 steps against 4 steps

        The same prompt, guidance scale and seed (so the same starting noise), once with 50 DDIM steps and once
        with 4. For Stable Diffusion 1.5 the course uses the prompt *"A sad puppy with large eyes"*, guidance
        scale 7.5, seed 1, 4 images; the small model uses its own demo prompt and guidance (printed below).
        While the notebook is being graded, this cell makes fewer and shorter runs.
        """),
        code("""
        prompt, guidance = MODEL.demo_prompt, MODEL.guidance_scale
        n_images = runmode.pick(4, grading_value=1)
        images, titles = [], []
        for steps in (runmode.pick(50, reduced_value=20, grading_value=8), 4):
            images += pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, num_images_per_prompt=n_images,
                           generator=make_generator(1, DEVICE)).images
            titles += [f"{steps} steps"] * n_images
        print(f"prompt: {prompt!r}, guidance scale {guidance}, seed 1")
        fig = show_images(images, titles=titles, ncols=n_images, suptitle=prompt)
        save_figure(fig, "01_teacher_50_vs_4_steps.png")
        """),
        md(r"""
        **What you should see.** The 50-step images are sharp. The 4-step images show the same layout (the
        same starting noise) but are blurry and washed out. Each DDIM step jumps to the model's estimate of the
        clean image, $\hat x_0$, and from very noisy inputs that estimate is an average of all images that could
        be under the noise, hence blurry. With 4 steps there are too few corrections to recover the details.
        Assignment 02 makes this visible; assignments 04 and 05 train a student whose 4-step images look like the
        teacher's 50-step ones.

        *Try it (not graded):* build the scheduler with `timestep_spacing="leading"` instead and compare the
        4-step images.
        """),
    ])


# ------------------------------------------------------------------------------------------ 02 DDIM step
def ddim_step() -> nbformat.NotebookNode:
    return notebook("ds", [
        md(r"""
        # Assignment 02: the forward process and the DDIM solver step

        **Goal.** Write the two functions every later assignment is built on: `q_sample`, which noises clean
        latents to timestep $t$, and `ddim_solver_step`, which moves a noisy latent from timestep $t$ to an
        earlier timestep $s$ along the teacher's trajectory.

        **Why.** A consistency model learns to map every point of a trajectory to the same clean image. We
        make points on a trajectory with `q_sample` (start) and `ddim_solver_step` (the next point, and the jump
        to the clean end of it). The consistency loss of assignment 04 is three calls of these functions.

        **Notation.** $\bar\alpha$ = `scheduler.alphas_cumprod` (1000 entries), $\alpha_t = \sqrt{\bar\alpha_t}$,
        $\sigma_t = \sqrt{1 - \bar\alpha_t}$. The forward process is
        $x_t = \alpha_t x_0 + \sigma_t \varepsilon$ with $\varepsilon \sim \mathcal N(0, I)$.
        Timesteps are 1-D integer tensors with **one timestep per sample** (shape `(B,)`, on the latents'
        device): a batch may mix different $t$.

        **Given.** `alpha_sigma(scheduler, t, ndim)` returns $(\alpha_t, \sigma_t)$ per sample, shaped
        `(B, 1, 1, 1)` so they broadcast against latents `(B, C, H, W)`, in fp32, with no special case at $t=0$.
        `gather(values, t, ndim)` picks any per-timestep table the same way.
        """),
        code("""
        from helpers.answer_env import *
        from helpers import runmode
        from helpers.models import describe_setup, load_course_pipeline, resolve_model
        from helpers.plotting import show_images
        from helpers.prompts import encode_prompts
        from helpers.report import save_figure
        from helpers.seeding import make_generator

        MODEL = resolve_model()
        pipe = load_course_pipeline()  # the teacher as in assignment 01: fp16 on CUDA, fp32 on the CPU, DDIM trailing
        scheduler, DEVICE, DTYPE = pipe.scheduler, pipe.unet.device, pipe.unet.dtype
        TOL = 1e-4 if DTYPE == torch.float32 else 3e-2  # for the tests below
        print(describe_setup())
        """),
        md(r"""
        ## Task 2a (2 points): `q_sample(x, t, scheduler, noise=None)`

        Return $x_t = \alpha_t x + \sigma_t \varepsilon$ for each sample, where $\varepsilon$ is `noise`, or
        fresh standard normal noise of `x`'s shape when `noise` is `None` (draw it with `torch.randn_like`, from
        torch's global generator, so that `torch.manual_seed` makes runs repeatable).

        * This is the forward process: at $t = 0$ it uses the real $\alpha_0 = \sqrt{\bar\alpha_0}$ (slightly
          below 1), with no special case.
        * Return a tensor with `x`'s shape, dtype and device. On a GPU the latents are fp16 while `alpha_sigma`
          gives fp32: compute in fp32 and cast back with `.to(x.dtype)`.
        * Do not change the inputs in place.

        *A correct result:* with unit-variance `x` and noise, $x_t$ has unit variance at every $t$ (the process is
        *variance preserving*); $x_{999}$ is almost pure noise, and $x_0$ is almost `x`.
        """),
        answer("q_sample", """
        def q_sample(x: torch.Tensor, t: torch.Tensor, scheduler, noise: torch.Tensor | None = None) -> torch.Tensor:
            \"\"\"Forward process: x_t = alpha_t * x + sigma_t * noise per sample (fresh N(0, I) noise if None).

            x: clean latents (B, C, H, W); t: (B,) integer timesteps on x's device; scheduler: has alphas_cumprod.
            Returns x_t with x's shape, dtype and device.
            \"\"\"
            ### BEGIN SOLUTION
            if noise is None:
                noise = torch.randn_like(x)
            alpha_t, sigma_t = alpha_sigma(scheduler, t, x.ndim)
            return (alpha_t * x.float() + sigma_t * noise.float()).to(x.dtype)
            ### END SOLUTION
        """),
        tests("q_sample", 2, """
        x0 = torch.randn(4, 4, 32, 32, device=DEVICE, dtype=DTYPE)
        eps = torch.randn_like(x0)
        t = torch.tensor([0, 249, 749, 999], device=DEVICE)
        xt = q_sample(x0, t, scheduler, noise=eps)
        assert type(xt) is torch.Tensor, f"q_sample must return a torch.Tensor, got {type(xt).__name__}"
        assert xt.shape == x0.shape and xt.dtype == x0.dtype and xt.device == x0.device, (
            f"q_sample returned {tuple(xt.shape)} {xt.dtype} on {xt.device}; expected x's {tuple(x0.shape)} {x0.dtype} "
            f"on {x0.device}")
        stds = xt.float().flatten(1).std(dim=1)
        print("std of x_t at t = 0, 249, 749, 999:", [round(v, 3) for v in stds.tolist()])
        assert ((stds - 1).abs() < 0.1).all(), "x_t should have unit variance at every t: did you forget a square root?"
        near_noise = torch.nn.functional.cosine_similarity(xt[3].flatten().float(), eps[3].flatten().float(), dim=0)
        assert near_noise > 0.99, f"x_999 should be almost pure noise (cosine with the noise {near_noise:.3f})"
        gap = (xt[0] - x0[0]).float().abs()
        assert 0 < gap.max() < 0.2, (
            f"x_0 should be x plus a little noise (max |x_0 - x| = {gap.max():.3g}); no special case at t = 0 here")
        fresh = q_sample(x0, t, scheduler)
        assert fresh.shape == x0.shape and not torch.equal(fresh, q_sample(x0, t, scheduler)), (
            "without `noise`, every call must draw fresh noise")
        print("q_sample: visible tests passed")
        """),
        md(r"""
        ## Task 2b (3 points): `ddim_solver_step(model_output, x_t, t, s, scheduler)`

        `model_output` is the model's noise prediction $\hat\varepsilon$ for `x_t` at timestep `t`. The
        deterministic DDIM step from $t$ to $s$ first estimates the clean latent, then re-noises it to level $s$
        with the *same* predicted noise:

        $$\hat x_0 = \frac{x_t - \sigma_t \hat\varepsilon}{\alpha_t}, \qquad
          x_s = \alpha_s \hat x_0 + \sigma_s \hat\varepsilon .$$

        **Boundary convention.** Timestep 0 means clean data: wherever the *solver step* meets timestep 0, use
        $\alpha = 1, \sigma = 0$ (for $t = 0$ and for $s = 0$, per sample). So the step to $s = 0$ returns
        $\hat x_0$, and a step from $t = 0$ returns $x_t$. (Without it, $\alpha_0 = \sqrt{\bar\alpha_0} < 1$ and
        the "clean" end of a trajectory would still contain noise.) Only the solver step does this, not
        `q_sample`.

        * `t` and `s` are `(B,)` tensors; samples may have different `t` and `s`, and some may be 0 while others
          are not: use `torch.where` (or masks on new tensors), not Python `if`.
        * Return `x_t`'s shape, dtype and device; do not change the inputs or `scheduler.alphas_cumprod` in place.

        *A correct result:* a step from $t$ to $t$ returns $x_t$; with the true noise, the step to $s = 0$
        returns the clean latent exactly; one step of the pipeline's own 4-step DDIM sampler
        (`DDIMScheduler.step`, 999 → 749) gives the same result as yours.
        """),
        answer("ddim_solver_step", """
        def ddim_solver_step(model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor,
                             scheduler) -> torch.Tensor:
            \"\"\"One deterministic DDIM step from timestep t to timestep s (per sample) for an eps-prediction model,
            with alpha = 1, sigma = 0 wherever t or s is 0. Returns x_s with x_t's shape, dtype and device.\"\"\"
            ### BEGIN SOLUTION
            alpha_t, sigma_t = alpha_sigma(scheduler, t, x_t.ndim)
            alpha_s, sigma_s = alpha_sigma(scheduler, s, x_t.ndim)
            t_is_0, s_is_0 = (t == 0).reshape(alpha_t.shape), (s == 0).reshape(alpha_s.shape)
            alpha_t, sigma_t = torch.where(t_is_0, 1.0, alpha_t), torch.where(t_is_0, 0.0, sigma_t)
            alpha_s, sigma_s = torch.where(s_is_0, 1.0, alpha_s), torch.where(s_is_0, 0.0, sigma_s)
            eps = model_output.float()
            x0_hat = (x_t.float() - sigma_t * eps) / alpha_t
            return (alpha_s * x0_hat + sigma_s * eps).to(x_t.dtype)
            ### END SOLUTION
        """),
        tests("ddim_solver_step", 3, """
        from diffusers import DDIMScheduler

        def close(a, b):
            return (a.float() - b.float()).abs().max().item() <= TOL * (1 + b.float().abs().max().item())

        x0 = torch.randn(4, 4, 32, 32, device=DEVICE, dtype=DTYPE)
        eps = torch.randn_like(x0)
        t = torch.tensor([999, 749, 499, 249], device=DEVICE)
        alpha_t, sigma_t = alpha_sigma(scheduler, t, x0.ndim)
        xt = (alpha_t * x0.float() + sigma_t * eps.float()).to(DTYPE)
        out = ddim_solver_step(eps, xt, t, torch.tensor([749, 499, 249, 0], device=DEVICE), scheduler)
        assert type(out) is torch.Tensor and out.shape == xt.shape and out.dtype == xt.dtype, (
            f"ddim_solver_step must return a tensor like x_t, got {type(out).__name__} "
            f"{tuple(getattr(out, 'shape', ()))} {getattr(out, 'dtype', None)}")
        assert close(ddim_solver_step(eps, xt, t, t, scheduler), xt), "a step from t to t must return x_t unchanged"
        zero = torch.zeros_like(t)
        assert close(ddim_solver_step(eps, xt, t, zero, scheduler), x0), (
            "with the true noise, the step to s = 0 must return the clean latent: use alpha_s = 1, sigma_s = 0 at s = 0")
        assert close(ddim_solver_step(eps, xt, zero, zero, scheduler), xt), (
            "a step from t = 0 must return x_t: use alpha_t = 1, sigma_t = 0 at t = 0")
        mixed = ddim_solver_step(eps, xt, t, torch.tensor([0, 749, 0, 0], device=DEVICE), scheduler)
        assert close(mixed[1], xt[1]) and close(mixed[0], x0[0]), "apply the boundary per sample (s differs in a batch)"
        diffusers_ddim = DDIMScheduler.from_config(scheduler.config)
        diffusers_ddim.set_timesteps(4)
        theirs = diffusers_ddim.step(eps[:1], 999, xt[:1]).prev_sample
        assert close(out[:1], theirs), "the step 999 -> 749 differs from diffusers' DDIMScheduler.step"
        print("ddim_solver_step: visible tests passed")
        """),
        md(r"""
        ## Look: noising a clean latent, and the teacher's one-step estimate of it

        We let the teacher make a clean latent $x_0$ (its own sample of the demo prompt), noise it with your
        `q_sample` at several $t$ (top row), and let the teacher jump back in one step with your
        `ddim_solver_step(eps, x_t, t, 0)` (bottom row: $\hat x_0$ from $t$). While grading, the teacher uses
        fewer steps.
        """),
        code("""
        @torch.no_grad()
        def decode(latents: torch.Tensor) -> torch.Tensor:
            \"\"\"Latents -> images in [0, 1] with the pipeline's VAE.\"\"\"
            images = pipe.vae.decode(latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor).sample
            return pipe.image_processor.postprocess(images, output_type="pt")


        prompt = MODEL.demo_prompt
        x0 = pipe(prompt, num_inference_steps=runmode.pick(50, reduced_value=20, grading_value=8),
                  guidance_scale=MODEL.guidance_scale, generator=make_generator(1, DEVICE), output_type="latent").images[:1]
        ts = torch.tensor([0, 249, 499, 749, 999], device=DEVICE)
        clean = x0.expand(len(ts), -1, -1, -1)
        noise = torch.randn(clean.shape, generator=make_generator(0, DEVICE), device=DEVICE, dtype=clean.dtype)
        x_t = q_sample(clean, ts, scheduler, noise=noise)
        with torch.no_grad():
            eps = pipe.unet(x_t, ts, encoder_hidden_states=encode_prompts(pipe, [prompt] * len(ts))).sample
        x0_hat = ddim_solver_step(eps, x_t, ts, torch.zeros_like(ts), scheduler)
        titles = [f"x_t, t={t}" for t in ts.tolist()] + [f"x0_hat from t={t}" for t in ts.tolist()]
        fig = show_images(torch.cat([decode(x_t), decode(x0_hat)]), titles=titles, ncols=len(ts))
        save_figure(fig, "02_noising_and_one_step_x0.png")
        """),
        md(r"""
        **What you should see.** Top row: the image dissolves into noise as $t$ grows; at $t = 999$ almost
        nothing of it is left. Bottom row: from small $t$ the teacher's one-step estimate $\hat x_0$ is the image
        itself; from large $t$ it is a blurry average of everything the noise could hide. That blur is why the
        4-step DDIM images of assignment 01 look bad, and it is what a consistency model removes: it learns to
        give the *same sharp* $\hat x_0$ from every point of a trajectory.
        """),
    ])


# --------------------------------------------------------------------------------------- 03 CT derivation
def ct_derivation() -> nbformat.NotebookNode:
    return notebook("ct", [
        md(r"""
        # Assignment 03: consistency training, x_s from x_t and x_0

        **Goal.** Derive, and then implement, how *consistency training* (CT) gets the second point $x_s$ of a
        training pair without any teacher.

        **Why.** The consistency loss compares the model's outputs at two neighbouring points $x_t$ and $x_s$
        ($s < t$) of the *same* probability-flow ODE trajectory. In consistency *distillation* (assignment 04)
        the teacher makes $x_s$ with one DDIM step from $x_t$; that needs the teacher's noise prediction, i.e. its
        estimate of the score $\nabla_{x_t}\log p_t(x_t)$. Consistency *training* replaces the score by the
        score of $q(x_t \mid x_0)$, which we know in closed form because we made $x_t$ from a training latent
        $x_0$. (Song et al., *Consistency Models*, 2023.)

        **Recall** (assignment 02): $x_t = \alpha_t x_0 + \sigma_t\varepsilon$, $\alpha_t = \sqrt{\bar\alpha_t}$,
        $\sigma_t = \sqrt{1-\bar\alpha_t}$; a noise prediction relates to the score by
        $\hat\varepsilon = -\sigma_t \nabla_{x_t}\log p_t(x_t)$; the DDIM step is
        $\hat x_0 = (x_t - \sigma_t\hat\varepsilon)/\alpha_t$, $x_s = \alpha_s\hat x_0 + \sigma_s\hat\varepsilon$,
        with $\alpha = 1, \sigma = 0$ at timestep 0.
        """),
        code("""
        from helpers.answer_env import *
        from helpers import runmode
        from helpers.models import describe_setup, load_course_pipeline, resolve_model
        from helpers.notebook_functions import load_course_functions
        from helpers.plotting import show_images
        from helpers.prompts import encode_prompts
        from helpers.report import save_figure
        from helpers.seeding import make_generator

        # Your q_sample and ddim_solver_step from assignment 02 (the notebook next to this one's folder).
        course = load_course_functions("03_ct_derivation", ["q_sample", "ddim_solver_step"])
        q_sample, ddim_solver_step = course.q_sample, course.ddim_solver_step

        MODEL = resolve_model()
        pipe = load_course_pipeline()
        scheduler, DEVICE, DTYPE = pipe.scheduler, pipe.unet.device, pipe.unet.dtype
        TOL = 1e-4 if DTYPE == torch.float32 else 3e-2  # for the tests below
        print(describe_setup())
        """),
        md(r"""
        ## Task 3a (3 points, graded by hand): the derivation

        Write your derivation in the cell below (Markdown with LaTeX, e.g. `$\nabla_{x_t}$`). Show:

        1. the conditional score $\nabla_{x_t}\log q(x_t \mid x_0)$ for $q(x_t \mid x_0) = \mathcal N(\alpha_t x_0, \sigma_t^2 I)$;
        2. the noise prediction it implies, $\hat\varepsilon = -\sigma_t\nabla_{x_t}\log q(x_t\mid x_0)$, in terms
           of $x_t$ and $x_0$, and what it equals when $x_t = \alpha_t x_0 + \sigma_t\varepsilon$;
        3. what one DDIM step from $t$ to $s$ with this $\hat\varepsilon$ gives for $\hat x_0$ and for $x_s$,
           including $s = 0$ under the boundary convention;
        4. in one or two sentences: why is this a valid replacement for the teacher's step, and what does CT lose
           compared with distillation?
        """),
        manual_answer("ct_derivation", 3, r"""
        ### BEGIN SOLUTION
        **1. Conditional score.** $\log q(x_t\mid x_0) = -\frac{\lVert x_t - \alpha_t x_0\rVert^2}{2\sigma_t^2} + \text{const}$,
        so $\nabla_{x_t}\log q(x_t\mid x_0) = -\dfrac{x_t - \alpha_t x_0}{\sigma_t^2}$.

        **2. Implied noise.** $\hat\varepsilon = -\sigma_t\nabla_{x_t}\log q(x_t\mid x_0) = \dfrac{x_t - \alpha_t x_0}{\sigma_t}$.
        With $x_t = \alpha_t x_0 + \sigma_t\varepsilon$ this is exactly $\hat\varepsilon = \varepsilon$, the noise that
        made $x_t$ (well defined for every $t$, since $\sigma_t = \sqrt{1-\bar\alpha_t} > 0$ even at $t = 0$).

        **3. The DDIM step.** $\hat x_0 = \dfrac{x_t - \sigma_t\hat\varepsilon}{\alpha_t} = \dfrac{\alpha_t x_0 + \sigma_t\varepsilon - \sigma_t\varepsilon}{\alpha_t} = x_0$,
        and $x_s = \alpha_s\hat x_0 + \sigma_s\hat\varepsilon = \alpha_s x_0 + \sigma_s\varepsilon$: the same clean latent,
        noised to level $s$ with the same noise (no model call needed). At $s = 0$ the convention $\alpha_0 = 1$,
        $\sigma_0 = 0$ gives $x_s = x_0$.

        **4. Why it works, what is lost.** The marginal score is the average of the conditional ones:
        $\nabla\log p_t(x_t) = \mathbb E[\nabla_{x_t}\log q(x_t\mid x_0)\mid x_t]$, so the conditional score is an
        unbiased one-sample estimate of what the teacher approximates; Song et al. (2023) show that the CT loss
        equals the CD loss (with an exact score and an Euler/DDIM step) up to terms that vanish as $t - s \to 0$.
        The price: the estimate is noisy (one $x_0$ instead of the average over all $x_0$ compatible with $x_t$), so
        the pairs $(x_t, x_s)$ lie on the true ODE trajectory only on average, training targets have higher
        variance and CT converges slower and to worse samples than CD, which uses the teacher's score.

        *Grading (3 points):* 1 point for parts 1 and 2 (score and $\hat\varepsilon = \varepsilon$), 1 point for part 3
        ($\hat x_0 = x_0$, $x_s = \alpha_s x_0 + \sigma_s\varepsilon$, $x_0$ at $s = 0$), 1 point for part 4 (unbiased
        estimate of the score / expectation argument, and the higher variance compared with CD).
        ### END SOLUTION
        """),
        md(r"""
        ## Task 3b (2 points): `get_xs_from_xt_naive(x_0, x_t, t, s, scheduler, noise=None, **kwargs)`

        Implement the result of your derivation: $x_s = \alpha_s x_0 + \sigma_s\,\varepsilon$ per sample, with the
        boundary convention $\alpha_s = 1, \sigma_s = 0$ where $s = 0$ (so the result is $x_0$ there).

        * `noise` is the $\varepsilon$ that made `x_t`; when it is `None`, recover it from `x_t` and `x_0` as in
          part 2 (with the real $\alpha_t, \sigma_t$ of the forward process). When it is given, use it as it is.
        * `**kwargs`: the consistency loss of assignment 04 calls every `get_xs_from_xt` function with the same
          keyword arguments (prompt embeddings, a teacher UNet, a guidance scale, ...). This one needs none of
          them: accept and ignore them.
        * Return `x_t`'s shape, dtype and device; compute in fp32 and cast back; no in-place changes of inputs.

        *A correct result:* with $s = 0$ you get $x_0$ back, with $s = t$ you get $x_t$ back, and passing the noise
        or leaving it `None` gives the same $x_s$.
        """),
        answer("get_xs_from_xt_naive", """
        def get_xs_from_xt_naive(x_0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor, scheduler,
                                 noise: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
            \"\"\"Consistency-training estimate of x_s from x_t and the clean x_0 that made it:
            x_s = alpha_s * x_0 + sigma_s * noise (alpha_s = 1, sigma_s = 0 where s == 0), noise recovered from
            x_t and x_0 when None. Extra keyword arguments are ignored.\"\"\"
            ### BEGIN SOLUTION
            alpha_t, sigma_t = alpha_sigma(scheduler, t, x_t.ndim)
            if noise is None:
                noise = (x_t.float() - alpha_t * x_0.float()) / sigma_t
            alpha_s, sigma_s = alpha_sigma(scheduler, s, x_t.ndim)
            s_is_0 = (s == 0).reshape(alpha_s.shape)
            alpha_s, sigma_s = torch.where(s_is_0, 1.0, alpha_s), torch.where(s_is_0, 0.0, sigma_s)
            return (alpha_s * x_0.float() + sigma_s * noise.float()).to(x_t.dtype)
            ### END SOLUTION
        """),
        tests("get_xs_from_xt_naive", 2, """
        def close(a, b):
            return (a.float() - b.float()).abs().max().item() <= TOL * (1 + b.float().abs().max().item())

        x0 = torch.randn(4, 4, 32, 32, device=DEVICE, dtype=DTYPE)
        eps = torch.randn_like(x0)
        t = torch.tensor([999, 499, 259, 19], device=DEVICE)
        s = torch.tensor([979, 479, 0, 0], device=DEVICE)
        alpha_t, sigma_t = alpha_sigma(scheduler, t, x0.ndim)
        xt = (alpha_t * x0.float() + sigma_t * eps.float()).to(DTYPE)
        with_noise = get_xs_from_xt_naive(x0, xt, t, s, scheduler, noise=eps)
        assert type(with_noise) is torch.Tensor and with_noise.shape == xt.shape and with_noise.dtype == xt.dtype, (
            "get_xs_from_xt_naive must return a tensor like x_t")
        recovered = get_xs_from_xt_naive(x0, xt, t, s, scheduler)
        assert close(recovered, with_noise), "noise=None must recover the noise that made x_t: same x_s as with it"
        assert close(with_noise[2:], x0[2:]), "at s = 0 the result must be x_0 (alpha_s = 1, sigma_s = 0)"
        assert close(get_xs_from_xt_naive(x0, xt, t, t, scheduler), xt), "with s = t the result must be x_t"
        extra = get_xs_from_xt_naive(x0, xt, t, s, scheduler, noise=eps, prompt_embeds=None, teacher_unet=None)
        assert close(extra, with_noise), "extra keyword arguments must be accepted and ignored"
        print("get_xs_from_xt_naive: visible tests passed")
        """),
        md(r"""
        ## Look: the CT pairs against the teacher's trajectory

        From one clean latent $x_0$ (a teacher sample) and one noise we make $x_{999}$, then the points at
        $s$ = 749, 499, 249, 0 in two ways: top row, your CT estimate (it knows $x_0$); bottom row, the teacher's
        own DDIM trajectory from the same $x_{999}$ (it only sees $x_{999}$), with your `ddim_solver_step`.
        """),
        code("""
        @torch.no_grad()
        def decode(latents: torch.Tensor) -> torch.Tensor:
            \"\"\"Latents -> images in [0, 1] with the pipeline's VAE.\"\"\"
            images = pipe.vae.decode(latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor).sample
            return pipe.image_processor.postprocess(images, output_type="pt")


        prompt = MODEL.demo_prompt
        x0 = pipe(prompt, num_inference_steps=runmode.pick(50, reduced_value=20, grading_value=8),
                  guidance_scale=MODEL.guidance_scale, generator=make_generator(1, DEVICE), output_type="latent").images[:1]
        grid = [999, 749, 499, 249, 0]
        noise = torch.randn(x0.shape, generator=make_generator(0, DEVICE), device=DEVICE, dtype=x0.dtype)
        t_start = torch.full((1,), grid[0], device=DEVICE)
        x_start = q_sample(x0, t_start, scheduler, noise=noise)
        ct_points = [x_start] + [get_xs_from_xt_naive(x0, x_start, t_start, torch.full_like(t_start, s), scheduler,
                                                      noise=noise) for s in grid[1:]]
        teacher_points, x = [x_start], x_start
        cond = encode_prompts(pipe, [prompt])
        for t_now, t_next in zip(grid[:-1], grid[1:]):
            with torch.no_grad():
                eps = pipe.unet(x, torch.full_like(t_start, t_now), encoder_hidden_states=cond).sample
            x = ddim_solver_step(eps, x, torch.full_like(t_start, t_now), torch.full_like(t_start, t_next), scheduler)
            teacher_points.append(x)
        titles = [f"CT, t={t}" for t in grid] + [f"teacher DDIM, t={t}" for t in grid]
        fig = show_images(decode(torch.cat(ct_points + teacher_points)), titles=titles, ncols=len(grid))
        save_figure(fig, "03_ct_pairs_vs_teacher_trajectory.png")
        """),
        md(r"""
        **What you should see.** The top row is the clean image with the *same* noise pattern fading out, and it
        ends exactly at $x_0$. The bottom row starts from the same $x_{999}$ but ends at the teacher's own 4-step
        guess (blurrier, and not necessarily $x_0$: many clean latents could have produced $x_{999}$). CT trains
        on the top row's pairs, which are consistent with one sampled $x_0$ rather than with the teacher's
        trajectory: unbiased on average, but noisy. Assignment 04 trains both ways and measures the difference.
        """),
    ])


NOTEBOOKS = {
    "01_model_loading/model_loading.ipynb": model_loading,
    "02_ddim_step/ddim_step.ipynb": ddim_step,
    "03_ct_derivation/ct_derivation.ipynb": ct_derivation,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report notebooks that differ from the script")
    parser.add_argument("--out", type=Path, default=ROOT / "solutions", help="folder of the assignment folders")
    args = parser.parse_args(argv)
    stale = []
    for rel, build in NOTEBOOKS.items():
        path = args.out / rel
        text = nbformat.writes(build()) + "\n"
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(rel)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path}")
    if stale:
        print("out of date (run scripts/build_notebooks_01_03.py):", ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
