"""Measure any sampler the same way: fixed prompts, fixed initial noise, two numbers.

* **Prompts**: ``per_digit`` prompts for each digit 0-9 (the small model's templates, cycled), so that the
  digit classifier of :mod:`helpers.metrics` can tell whether an image shows the prompted digit.
* **Initial latents**: drawn once from a seeded generator; every sampler starts from exactly these.
* **prompt_accuracy**: the fraction of images classified as their prompt's digit.
* **fidelity_psnr_db**: PSNR against the teacher's 50-step DDIM images from the same latents
  (``teacher_ddim50``; against itself it gives the PSNR cap).

A *sampler* here is any function ``sampler(prompts, latents) -> images`` returning a float tensor
``(N, 3, H, W)`` in [0, 1]; :func:`pipeline_sampler` wraps the diffusers pipeline (the teacher, or a
student sampled the plain DDIM way) and :func:`function_sampler` wraps a student sampler of the course
(``consistency_sampling``, ``multi_boundary_sampling``). :func:`evaluate` records the numbers with
:func:`helpers.report.record_sampler` and the time with :func:`helpers.report.record_timing` (as
``sample_<name>``). Sampling shows one progress bar in images (``img/s``); the pipeline's own bar is off
during a sampler's call. The teacher's 50-step images are cached on disk (not under nbgrader) so that
notebook 05 reuses those of notebook 04.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from helpers.config import KitConfig

__all__ = ["EvalSet", "EvalResult", "Sampler", "make_eval_set", "default_batch_size", "pipeline_sampler", "function_sampler",
           "pipeline_bar_off", "vae_decode_outside_autocast",
           "generate", "evaluate", "teacher_reference", "results_table", "show_results"]

Sampler = Callable[[list[str], torch.Tensor], torch.Tensor]
REFERENCE_NAME = "teacher_ddim50"


@dataclass(frozen=True)
class EvalSet:
    """The fixed evaluation inputs: prompts, the digit each asks for, and initial latents (CPU, fp32)."""

    prompts: list[str]
    digits: torch.Tensor
    latents: torch.Tensor
    seed: int

    def __len__(self) -> int:
        return len(self.prompts)

    def key(self) -> str:
        """A short hash of the inputs (prompts, latents' seed and shape)."""
        text = json.dumps([self.prompts, self.seed, list(self.latents.shape)])
        return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass
class EvalResult:
    """One sampler's images and numbers."""

    name: str
    images: torch.Tensor
    prompt_accuracy: float
    fidelity_psnr_db: float | None
    seconds: float
    extra: dict = field(default_factory=dict)


def make_eval_set(pipe, per_digit: int = 10, seed: int = 1234) -> EvalSet:
    """``per_digit`` prompts per digit (digit-major; templates cycled) and seeded initial latents shaped for
    ``pipe``'s UNet."""
    from helpers import small_model as sm

    if per_digit < 1:
        raise ValueError(f"per_digit must be at least 1, got {per_digit}")
    digits = [d for d in range(10) for _ in range(per_digit)]
    prompts = [sm.digit_prompt(d, i) for d in range(10) for i in range(per_digit)]
    cfg = pipe.unet.config
    latents = torch.randn((len(prompts), cfg.in_channels, cfg.sample_size, cfg.sample_size),
                          generator=torch.Generator().manual_seed(seed))
    return EvalSet(prompts, torch.tensor(digits), latents, seed)


def default_batch_size(pipe) -> int:
    """Images per sampler call: the whole evaluation set for small latents (the kit's model on a CPU); for
    SD1.5-sized ones 16 on a GPU of 40 GiB or more (the ``fast`` profile's cards: fewer, larger calls, less Python
    overhead per image) and 8 otherwise."""
    if pipe.unet.config.sample_size <= 32:
        return 100
    device = pipe.unet.device
    if device.type == "cuda" and torch.cuda.get_device_properties(device).total_memory >= BIG_GPU_GIB * 2**30:
        return 16
    return 8


BIG_GPU_GIB = 40.0  # as helpers.training.FAST_FROM_GIB
SMALL_GPU_GIB = 20.0  # as helpers.training.LOW_MEMORY_BELOW_GIB


@contextmanager
def vae_decode_outside_autocast(pipe) -> Iterator[None]:
    """Inside the context ``pipe.vae.decode`` runs with autocast off, on latents cast to the VAE's dtype: the
    fp16 VAE in its own precision, as diffusers' pipelines run it (under fp16 autocast its GroupNorms would run
    in fp32, on the largest tensors of the evaluation: slower, and twice the memory). Restored afterwards."""
    vae = pipe.vae
    had_own = "decode" in vae.__dict__
    decode = vae.decode

    def plain_decode(z: torch.Tensor, *args, **kwargs):
        with torch.autocast(vae.device.type, enabled=False):
            return decode(z.to(vae.dtype), *args, **kwargs)

    vae.decode = plain_decode
    try:
        yield
    finally:
        if had_own:
            vae.decode = decode
        else:
            del vae.decode


@contextmanager
def _inference_context(pipe) -> Iterator[None]:
    """fp16 autocast on CUDA for the UNet (the student is fp32 after training in the course profile, the rest of
    the pipeline fp16), the VAE's decode outside it (:func:`vae_decode_outside_autocast`), sliced (one image at a
    time) on GPUs under 20 GiB; nothing on the CPU."""
    device = pipe.unet.device
    if device.type != "cuda":
        yield
        return
    small = torch.cuda.get_device_properties(device).total_memory < SMALL_GPU_GIB * 2**30
    slicing = getattr(pipe.vae, "use_slicing", False)
    pipe.vae.use_slicing = slicing or small  # a small GPU (T4) decodes one image at a time: 1/8 of the memory
    try:
        with vae_decode_outside_autocast(pipe), torch.autocast("cuda", dtype=torch.float16):
            yield
    finally:
        pipe.vae.use_slicing = slicing


@contextmanager
def pipeline_bar_off(pipe) -> Iterator[None]:
    """The pipeline's own (per-step) progress bar off inside the context, its settings restored afterwards."""
    had = hasattr(pipe, "_progress_bar_config")
    before = dict(getattr(pipe, "_progress_bar_config", None) or {})
    pipe.set_progress_bar_config(**{**before, "disable": True})
    try:
        yield
    finally:
        if had:
            pipe.set_progress_bar_config(**before)
        else:
            del pipe._progress_bar_config


def pipeline_sampler(pipe, num_inference_steps: int, guidance_scale: float) -> Sampler:
    """The diffusers pipeline's own DDIM sampling (trailing timesteps) from the given latents."""
    def sample(prompts: list[str], latents: torch.Tensor) -> torch.Tensor:
        device = pipe.unet.device
        with torch.inference_mode(), _inference_context(pipe), pipeline_bar_off(pipe):
            out = pipe(prompt=list(prompts), latents=latents.to(device), num_inference_steps=num_inference_steps,
                       guidance_scale=guidance_scale, output_type="pt")
        return out.images.float().cpu()
    return sample


def function_sampler(fn: Callable, pipe, seed: int = 0, **kwargs) -> Sampler:
    """A course sampler ``fn(pipe, prompts, num_images_per_prompt=1, latents=..., generator=...,
    output_type="pt", **kwargs)`` from the given latents (fresh noise, if it draws any, from ``seed``)."""
    def sample(prompts: list[str], latents: torch.Tensor) -> torch.Tensor:
        device = pipe.unet.device
        gen = torch.Generator(device=device).manual_seed(seed)
        with torch.inference_mode(), _inference_context(pipe), pipeline_bar_off(pipe):
            images = fn(pipe, list(prompts), num_images_per_prompt=1, latents=latents.to(device), generator=gen,
                        output_type="pt", **kwargs)
        if not isinstance(images, torch.Tensor) or images.shape[0] != len(prompts):
            raise ValueError(f"{getattr(fn, '__name__', fn)} with output_type='pt' must return a tensor of "
                             f"{len(prompts)} images, got {type(images).__name__}")
        return images.float().cpu()
    return sample


def generate(sampler: Sampler, eval_set: EvalSet, batch_size: int | None = None, desc: str | None = None,
             config: KitConfig | None = None, progress: bool = True) -> tuple[torch.Tensor, float]:
    """Run ``sampler`` over the evaluation set in batches; returns ``(images, seconds)``. One progress bar
    counts the images (``desc``, img/s); it writes to stdout while nbgrader runs (``config.grading``: a test
    cell fails on stderr output), as :class:`helpers.answer_env.tqdm` does."""
    from tqdm.auto import tqdm

    batch_size = batch_size or len(eval_set)
    grading = config is not None and config.grading
    bar = tqdm(total=len(eval_set), desc=desc, unit="img", disable=not progress,
               file=sys.stdout if grading else None)
    start = time.perf_counter()
    chunks = []
    with bar:
        for i in range(0, len(eval_set), batch_size):
            chunks.append(sampler(eval_set.prompts[i:i + batch_size], eval_set.latents[i:i + batch_size]))
            bar.update(len(eval_set.prompts[i:i + batch_size]))
    seconds = time.perf_counter() - start
    images = torch.cat(chunks)
    if images.shape[0] != len(eval_set) or images.ndim != 4:
        raise ValueError(f"the sampler returned images of shape {tuple(images.shape)} for {len(eval_set)} prompts")
    return images, seconds


def evaluate(name: str, sampler: Sampler, eval_set: EvalSet, reference: torch.Tensor | None, config: KitConfig,
             batch_size: int | None = None, record: bool = True, **extra) -> EvalResult:
    """Generate the evaluation set with ``sampler`` and measure it; ``reference``: the teacher's 50-step
    images (None: fidelity is measured against the images themselves, i.e. this *is* the reference).
    Records the numbers (and ``extra`` fields, e.g. ``steps=4``) under ``name`` in the output folder of
    ``config`` (:mod:`helpers.report`) unless ``record=False``."""
    from helpers.metrics import prompt_accuracy, psnr_db
    from helpers.report import record_sampler, record_timing

    images, seconds = generate(sampler, eval_set, batch_size, desc=name, config=config)
    accuracy = prompt_accuracy(images, eval_set.digits)
    fidelity = psnr_db(images, images if reference is None else reference)
    result = EvalResult(name, images, accuracy, fidelity, seconds, dict(extra))
    if record:
        record_sampler(name, accuracy, fidelity, config, seconds=round(seconds, 3), images=len(eval_set), **extra)
        record_timing(f"sample_{name}", seconds, config)
    return result


def teacher_reference(pipe, eval_set: EvalSet, guidance_scale: float, model_key: str, config: KitConfig,
                      num_inference_steps: int = 50, batch_size: int | None = None) -> EvalResult:
    """The teacher's ``num_inference_steps``-step DDIM images of the evaluation set, measured and recorded as
    ``teacher_ddim50``; read from the on-disk cache when an earlier notebook made them for the same model
    (``model_key``, e.g. :func:`helpers.data.model_fingerprint`), evaluation set and guidance. The cache and
    the records live in the output folder of ``config`` (no cache under nbgrader).

    ``pipe.unet`` must be the teacher: call it before the first adapter is added, or inside
    :func:`helpers.training.adapters_disabled`.
    """
    from helpers.report import out_dir, record_sampler

    key = hashlib.sha256(json.dumps([model_key, eval_set.key(), guidance_scale, num_inference_steps])
                         .encode()).hexdigest()[:16]
    path = None if config.grading else out_dir(config) / "cache" / f"teacher-{key}.pt"
    if path is not None and path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        result = EvalResult(REFERENCE_NAME, saved["images"], float(saved["prompt_accuracy"]),
                            float(saved["fidelity_psnr_db"]), float(saved["seconds"]), {"cached": True})
        record_sampler(REFERENCE_NAME, result.prompt_accuracy, result.fidelity_psnr_db, config,
                       seconds=round(result.seconds, 3), images=len(eval_set), steps=num_inference_steps)
        return result
    result = evaluate(REFERENCE_NAME, pipeline_sampler(pipe, num_inference_steps, guidance_scale), eval_set, None,
                      config, batch_size, steps=num_inference_steps)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial")
        torch.save({"images": result.images, "prompt_accuracy": result.prompt_accuracy,
                    "fidelity_psnr_db": result.fidelity_psnr_db, "seconds": result.seconds}, tmp)
        tmp.replace(path)
    return result


def results_table(results: Sequence[EvalResult]) -> str:
    """A plain-text table of the results (name, prompt accuracy, fidelity, seconds)."""
    lines = [f"{'sampler':<22}{'prompt acc.':>12}{'PSNR vs 50-step (dB)':>23}{'seconds':>10}"]
    for r in results:
        psnr = "—" if r.fidelity_psnr_db is None else f"{r.fidelity_psnr_db:.2f}"
        lines.append(f"{r.name:<22}{r.prompt_accuracy:>12.3f}{psnr:>23}{r.seconds:>10.1f}")
    return "\n".join(lines)


def show_results(results: Sequence[EvalResult], eval_set: EvalSet, config: KitConfig, per_row: int = 10,
                 filename: str | None = None):
    """One row of images per sampler (the first image of each digit, same noise in every row); saved under
    ``figures/filename`` of ``config``'s output folder when given. Returns the figure."""
    from helpers.plotting import show_images
    from helpers.report import save_figure

    per_digit = max(1, len(eval_set) // 10)
    picks = list(range(0, len(eval_set), per_digit))[:per_row]
    images = torch.cat([r.images[picks] for r in results])
    titles = [f"{r.name}\ndigit {int(eval_set.digits[i])}" if j == 0 else f"\ndigit {int(eval_set.digits[i])}"
              for r in results for j, i in enumerate(picks)]
    fig = show_images(images, titles=titles, ncols=len(picks), size=1.6)
    if filename:
        save_figure(fig, filename, config)
    return fig
