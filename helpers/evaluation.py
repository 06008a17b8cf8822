"""Measure any sampler the same way: fixed prompts, fixed initial noise, the metrics the model can be judged with.

The evaluation set comes from the model (:func:`make_eval_set`), one code path for every kind:

* **digits** (the small model, and a custom model trained on the digits): ``N/10`` prompts per digit (the small
  model's templates, cycled); the real images are the kit's 1,797 training digits.
* **captions** (SD1.5 and a custom model with a data folder, ``config.data``): ``N`` prompts drawn with a fixed
  seed from the folder's captions plus the course's own prompts (:data:`COURSE_PROMPTS`); the real images are
  those of the drawn captions.

``N`` is ``config.eval_images`` (default 500 on the digits, 100 on captions; ``paper`` = 5000), smaller in the
reduced run and under nbgrader.
The initial latents are drawn once from a seeded generator; every sampler starts from exactly these.

Metrics (:func:`measure`; every number is a :class:`Metric` that says how many images it used, which network
judged them and against what):

* ``psnr_teacher``: PSNR against the teacher's 50-step DDIM images from the same latents (``teacher_ddim50``;
  against itself it gives the cap). Meaningful for deterministic samplers.
* digits: ``prompt_accuracy`` (the digit classifier reads the prompted digit), ``fd_real`` / ``fd_teacher``
  (Fréchet distance in the digit classifier's feature space, :mod:`helpers.fid`) and ``kid_real`` /
  ``kid_teacher`` (kernel distance, with its spread over subsets);
* every kind: ``fd_teacher_split``, the Fréchet distance against the teacher's 50-step images of *independent*
  noise inside one set (:meth:`EvalSet.split_halves`: the first half of each digit's noises against the teacher's
  images of the other half, and the reverse, averaged). The teacher's own value is the floor any sampler of its
  distribution reaches with this many images; it is fair to samplers that draw fresh noise
  (``consistency_sampling``), which the same-noise ``fd_teacher`` and PSNR are not. Its spread over evaluation
  seeds is quoted from the measurement of ``docs/small_model.md`` (:data:`SEED_SPREAD`), not re-measured;
* captions: ``clip_score`` (torchmetrics' CLIPScore, ``config.clip_model``), ``fd_real`` / ``fd_teacher`` = FID
  and FID-SD, ``kid_real`` / ``kid_teacher``, on the Inception features of :func:`helpers.quality.inception_net`.
  A judge that is not available (no CLIP in the cache, no Inception network) gives a metric with
  ``value=None`` and ``skipped`` saying why.

A *sampler* is any function ``sampler(prompts, latents) -> images`` returning a float tensor ``(N, 3, H, W)`` in
[0, 1]; :func:`pipeline_sampler` wraps the diffusers pipeline (the teacher, or a student sampled the plain DDIM
way) and :func:`function_sampler` wraps a student sampler of the course (``consistency_sampling``,
``multi_boundary_sampling``). :func:`evaluate` records a :class:`SamplerRecord` with
:func:`helpers.report.record_sampler` and the time with :func:`helpers.report.record_timing` (as
``sample_<name>``). Sampling shows one progress bar in images (``img/s``); the pipeline's own bar is off during a
sampler's call. The teacher's 50-step images are cached on disk (not under nbgrader), keyed by model, prompts,
latents and guidance, so that notebook 05 reuses those of notebook 04; their features are computed once per
feature network and process (:meth:`EvalSet.reference_features`), not once per sampler.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from helpers.config import KitConfig
from helpers.device import BIG_GPU_GIB, SMALL_GPU_GIB, gpu_memory_gib

__all__ = ["EvalSet", "RealImages", "Metric", "SamplerRecord", "EvalResult", "Sampler", "COURSE_PROMPTS",
           "DEFAULT_EVAL_IMAGES", "DIGITS_EVAL_IMAGES", "SEED_SPREAD", "SEED_SPREAD_IMAGES", "SEED_SPREAD_SOURCE",
           "split_half_fd", "sample_picks", "save_samples", "SAMPLES_DIR", "eval_kind", "eval_size", "make_eval_set", "default_batch_size", "pipeline_sampler",
           "function_sampler", "pipeline_bar_off", "vae_decode_outside_autocast", "sampling_session", "compile_choice",
           "compiled_modules", "compiled_for_sampling", "even_batches", "AUTO_COMPILE", "COMPILE_FROM_IMAGES", "generate", "measure", "evaluate",
           "teacher_reference",
           "results_table", "show_results"]

Sampler = Callable[[list[str], torch.Tensor], torch.Tensor]
REFERENCE_NAME = "teacher_ddim50"
DEFAULT_EVAL_IMAGES = 100  # captions (SD1.5, custom models): about 10 minutes of 50-step teacher images on a T4
#: The digits (the small model): 50 per digit, where DDIM-4's gap to DDIM-50 on ``fd_teacher_split`` is 12 times
#: its spread over evaluation seeds (3-6 times at 100-200 images; docs/small_model.md).
DIGITS_EVAL_IMAGES = 500

#: The spread (standard deviation over evaluation seeds 0, 1, 2) of the shipped teacher's DDIM numbers at guidance
#: 7.5 with :data:`DIGITS_EVAL_IMAGES` images: ``{metric key: {DDIM steps: sd}}``. Quoted, not re-measured in a
#: run (that would triple the cost of the teacher's images); it applies to digit sets of exactly that size.
SEED_SPREAD_SOURCE = ("docs/small_model.md, 'A distribution metric, the spread over seeds, and the guidance' "
                      "(docs/small_model_exploration/gap.json, scripts/explore_gap.py, seeds 0-2, 500 images, w = 7.5)")
SEED_SPREAD_IMAGES = 500
SEED_SPREAD: dict[str, dict[int, float]] = {
    "fd_teacher_split": {1: 0.0236, 2: 0.0215, 4: 0.0096, 8: 0.0030, 50: 0.0028},
    "fd_teacher": {1: 0.0265, 2: 0.0252, 4: 0.0137, 8: 0.0024, 50: 0.0},
    "fd_real": {1: 0.0441, 2: 0.0403, 4: 0.0381, 8: 0.0371, 50: 0.0101},
    "psnr_teacher": {1: 0.0969, 2: 0.1529, 4: 0.3570, 8: 0.4559, 50: 0.0},
    "prompt_accuracy": {1: 0.0140, 2: 0.0012, 4: 0.0020, 8: 0.0020, 50: 0.0020},
}
#: The course's own prompts, in every captions evaluation set (the first is task 1's).
COURSE_PROMPTS: tuple[str, ...] = (
    "A sad puppy with large eyes", "An astronaut riding a horse on the moon",
    "A bowl of ramen on a wooden table, warm light", "A watercolour painting of a lighthouse at dawn",
    "A red sports car on a mountain road")


@dataclass(frozen=True)
class RealImages:
    """Real images to compare with: ``load(start, stop)`` returns images ``start:stop`` as ``(B, 3, H, W)`` in
    [0, 1]; their features are computed once per feature network and kept."""

    description: str
    count: int
    load: Callable[[int, int], torch.Tensor]
    _features: dict = field(default_factory=dict, compare=False, repr=False)

    def features(self, net, batch_size: int = 64) -> torch.Tensor:
        if net.name not in self._features:
            self._features[net.name] = torch.cat([net.features(self.load(i, min(i + batch_size, self.count)))
                                                  for i in range(0, self.count, batch_size)])
        return self._features[net.name]


@dataclass(frozen=True)
class EvalSet:
    """The fixed evaluation inputs: prompts, initial latents (CPU, fp32), the kind (``digits`` / ``captions``),
    the digit each prompt asks for (digits only) and the real images to compare with (or None)."""

    prompts: list[str]
    digits: torch.Tensor | None
    latents: torch.Tensor
    seed: int
    kind: str = "digits"
    real: RealImages | None = field(default=None, compare=False)
    _reference: dict = field(default_factory=dict, compare=False, repr=False)

    def __len__(self) -> int:
        return len(self.prompts)

    def split_halves(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Two disjoint index sets with the same prompts in the same order: the first and the second half of each
        digit's images (digits), or of the whole set (captions); None when a half would hold fewer than 2."""
        if self.digits is not None:
            groups = [torch.nonzero(self.digits == d).flatten() for d in torch.unique(self.digits)]
            half = min(len(g) for g in groups) // 2
            a = torch.cat([g[:half] for g in groups])
            b = torch.cat([g[half:2 * half] for g in groups])
        else:
            half = len(self) // 2
            a, b = torch.arange(half), torch.arange(half, 2 * half)
        return (a, b) if len(a) >= 2 else None

    def reference_features(self, net, reference: torch.Tensor) -> torch.Tensor:
        """``net``'s features of the teacher's images ``reference`` of this set, computed once per network while
        the same tensor is passed (every sampler of a notebook measures against the same ``teacher50.images``)."""
        cached = self._reference.get(net.name)
        if cached is None or cached[0] is not reference:
            cached = (reference, net.features(reference))
            self._reference[net.name] = cached
        return cached[1]

    def remember_reference(self, net, reference: torch.Tensor, features: torch.Tensor) -> None:
        """Keep ``features`` as ``net``'s features of ``reference`` (the teacher's images, measured first)."""
        self._reference[net.name] = (reference, features)

    def key(self) -> str:
        """A short hash of the inputs (prompts, latents' seed and shape)."""
        text = json.dumps([self.prompts, self.seed, list(self.latents.shape)])
        return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Metric:
    """One number: ``key`` (e.g. ``fd_teacher``), its ``value`` (None when ``skipped`` says why), the ``images`` it
    used, the ``network`` that judged them (None for PSNR), what it compares ``against`` and with how many
    ``reference_images``, and its ``std`` where one is computed (KID: over random subsets)."""

    key: str
    value: float | None
    images: int
    network: str | None = None
    against: str | None = None
    reference_images: int | None = None
    std: float | None = None
    skipped: str | None = None


@dataclass(frozen=True)
class SamplerRecord:
    """What ``metrics.json`` holds for a sampler (``samplers[name]``): enough to draw any plot of the run."""

    name: str
    steps: int | None
    seconds: float
    images: int
    metrics: dict[str, Metric]

    def value(self, key: str) -> float | None:
        metric = self.metrics.get(key)
        return None if metric is None else metric.value

    def to_json(self) -> dict[str, Any]:
        """The sampler's entry; ``prompt_accuracy`` and ``fidelity_psnr_db`` also flat, as the checks read them."""
        flat = {"fidelity_psnr_db": self.value("psnr_teacher")}
        if "prompt_accuracy" in self.metrics:
            flat["prompt_accuracy"] = self.value("prompt_accuracy")
        return {**flat, "steps": self.steps, "seconds": round(self.seconds, 3), "images": self.images,
                "metrics": {k: {f: v for f, v in asdict(m).items() if v is not None} for k, m in self.metrics.items()}}

    @classmethod
    def from_json(cls, name: str, data: dict[str, Any]) -> SamplerRecord:
        # to_json leaves out the None fields: a skipped metric has no "value"
        metrics = {k: Metric(**{"key": k, "value": None, **m}) for k, m in (data.get("metrics") or {}).items()}
        return cls(name, data.get("steps"), float(data.get("seconds") or 0.0), int(data.get("images") or 0), metrics)


@dataclass
class EvalResult:
    """One sampler's images and numbers."""

    name: str
    images: torch.Tensor
    prompt_accuracy: float | None
    fidelity_psnr_db: float | None
    seconds: float
    extra: dict = field(default_factory=dict)
    metrics: dict[str, Metric] = field(default_factory=dict)

    def record(self) -> SamplerRecord:
        return SamplerRecord(self.name, self.extra.get("steps"), self.seconds, len(self.images), self.metrics)

    def card_metrics(self) -> dict[str, float | int | None]:
        """The numbers a model card shows for this sampler: its steps and every metric that was measured (rounded
        to 4 digits; skipped ones, e.g. prompt accuracy on a caption model, left out)."""
        out: dict[str, float | int | None] = {"steps": self.extra.get("steps")}
        out.update({key: round(float(m.value), 4) for key, m in self.metrics.items() if m.value is not None})
        return out


def eval_kind(model, data: str | None) -> str:
    """``digits`` or ``captions``: what the model ``model`` (a :class:`helpers.models.ModelSpec`) is evaluated on,
    which is what it is trained on (:func:`helpers.data.data_source`; ``data`` is ``config.data``)."""
    from helpers.data import data_source

    return "digits" if data_source(model.kind, data) == "digits" else "captions"


def eval_size(kind: str, config: KitConfig) -> int:
    """Images per sampler: ``config.eval_images`` (default :data:`DIGITS_EVAL_IMAGES` on the digits,
    :data:`DEFAULT_EVAL_IMAGES` on captions), at most 50 (digits) / 20 (captions) in the reduced run and 10 / 4
    under nbgrader."""
    n = config.eval_images or (DIGITS_EVAL_IMAGES if kind == "digits" else DEFAULT_EVAL_IMAGES)
    small, tiny = (50, 10) if kind == "digits" else (20, 4)
    return config.pick(n, reduced_value=min(n, small), grading_value=min(n, tiny))


def _latents(pipe, n: int, seed: int) -> torch.Tensor:
    cfg = pipe.unet.config
    return torch.randn((n, cfg.in_channels, cfg.sample_size, cfg.sample_size),
                       generator=torch.Generator().manual_seed(seed))


def _real_digits() -> RealImages:
    from helpers import small_model as sm

    images = (sm.load_digits_dataset(sm.IMAGE_SIZE)[0] + 1) / 2
    return RealImages(f"the {len(images)} training digits (scikit-learn)", len(images), lambda a, b: images[a:b])


def _caption_set(pipe, config: KitConfig, n: int, seed: int) -> tuple[list[str], RealImages | None]:
    """``n`` prompts: up to ``n - len(COURSE_PROMPTS)`` captions of ``config.data`` drawn with ``seed``, then the
    course's prompts (cycled when there is no data folder); the real images of the drawn captions."""
    from helpers.captions_data import load_image_caption_folder

    course = list(COURSE_PROMPTS[:n])
    if not config.data:
        return [COURSE_PROMPTS[i % len(COURSE_PROMPTS)] for i in range(n)], None
    folder = load_image_caption_folder(config.data, size=pipe.unet.config.sample_size * pipe.vae_scale_factor)
    rows = np.random.default_rng(seed).permutation(len(folder))[:max(n - len(course), 0)].tolist()
    prompts = [folder.captions[i] for i in rows] + course
    if len(prompts) < n:  # a small folder: its captions again, with other noise
        prompts += [prompts[i % len(prompts)] for i in range(n - len(prompts))]

    def load(a: int, b: int) -> torch.Tensor:
        return torch.stack([(folder[rows[i]]["pixel_values"] + 1) / 2 for i in range(a, b)])

    real = RealImages(f"{len(rows)} images of {Path(config.data).name} (their captions are prompts)", len(rows),
                      load) if len(rows) >= 2 else None
    return prompts[:n], real


def make_eval_set(pipe, model=None, config: KitConfig | None = None, *, per_digit: int | None = None,
                  seed: int = 1234) -> EvalSet:
    """The evaluation set of ``model`` (a :class:`helpers.models.ModelSpec`; None: the digits) with
    :func:`eval_size` images for ``config`` (or ``per_digit`` prompts per digit, default 10), and seeded initial
    latents shaped for ``pipe``'s UNet. See the module docstring for what each kind holds."""
    from helpers import small_model as sm

    config = config if config is not None else KitConfig()
    kind = "digits" if model is None else eval_kind(model, config.data)
    if kind == "digits":
        per_digit = per_digit if per_digit is not None else max(1, eval_size(kind, config) // 10)
        if per_digit < 1:
            raise ValueError(f"per_digit must be at least 1, got {per_digit}")
        digits = [d for d in range(10) for _ in range(per_digit)]
        prompts = [sm.digit_prompt(d, i) for d in range(10) for i in range(per_digit)]
        return EvalSet(prompts, torch.tensor(digits), _latents(pipe, len(prompts), seed), seed, kind, _real_digits())
    prompts, real = _caption_set(pipe, config, eval_size(kind, config), seed)
    return EvalSet(prompts, None, _latents(pipe, len(prompts), seed), seed, kind, real)


def default_batch_size(pipe) -> int:
    """Images per sampler call: the whole evaluation set for small latents (the kit's model on a CPU); for
    SD1.5-sized ones 64 on a GPU with 80 GiB or more to use, 32 from 40 GiB (the ``fast`` profile's cards: fewer,
    larger calls, less Python overhead per image) and 8 otherwise (:func:`helpers.device.gpu_memory_gib`)."""
    if pipe.unet.config.sample_size <= 32:
        return 100
    usable = gpu_memory_gib(pipe.unet.device) or 0.0
    return 64 if usable >= HUGE_GPU_GIB else 32 if usable >= BIG_GPU_GIB else 8


HUGE_GPU_GIB = 80.0  # an H100/H200: batch 64 (35.8 img/s against 31.0 at 32 on an H200, docs/benchmarks.md)


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
    """One sampler call on CUDA: fp16 autocast for the UNet (the student is fp32 after training in the course
    profile, the rest of the pipeline fp16), the VAE's decode outside it (:func:`vae_decode_outside_autocast`),
    and on GPUs under 20 GiB the VAE decoding one image at a time (sliced: 1/8 of the memory). Nothing on the CPU.
    Undone afterwards."""
    device = pipe.unet.device
    if device.type != "cuda":
        yield
        return
    slicing = getattr(pipe.vae, "use_slicing", False)
    pipe.vae.use_slicing = slicing or (gpu_memory_gib(device) or 0.0) < SMALL_GPU_GIB
    try:
        with vae_decode_outside_autocast(pipe), torch.autocast("cuda", dtype=torch.float16):
            yield
    finally:
        pipe.vae.use_slicing = slicing


#: What ``CD_KIT_EVAL_COMPILE=auto`` compiles, and from how many images of one sampler call of :func:`generate`.
#: Measured on an H200 (docs/benchmarks.md, "Compiling the evaluation"; 4-step student at batch 64, 512x512):
#: compiling the VAE decoder costs 10.9 s more than the eager first batch with an empty inductor cache and saves
#: 5.3 ms an image (35.4 -> 43.5 img/s), so it pays back from about 2,060 images (the decode runs once an image
#: whatever the steps); the VAE and the UNet cost 47.3 s more and save 10.4 ms (55.9 img/s): from about 4,550
#: images, and better than the VAE alone only from about 7,100. With a warm cache both pay back at once, but the
#: kit cannot know the cache is warm, so ``auto`` takes the cold figures.
AUTO_COMPILE = "vae"
COMPILE_FROM_IMAGES = 2100


def compile_choice(pipe, images: int, config: KitConfig | None = None) -> str:
    """What :func:`generate` compiles to sample ``images`` images with ``pipe``: ``off``, ``vae`` (the VAE decoder)
    or ``all`` (the VAE decoder and the UNet). ``config.eval_compile`` decides when set; ``auto``
    (unset) compiles :data:`AUTO_COMPILE` on GPUs from 40 GiB for calls of at least :data:`COMPILE_FROM_IMAGES`
    images, where the compilation pays for itself, and nothing otherwise. Always ``off`` on the CPU and for small
    latents (the kit's digits model)."""
    if pipe is None or pipe.unet.device.type != "cuda" or pipe.unet.config.sample_size <= 32:
        return "off"
    chosen = (config.eval_compile if config is not None else None) or "auto"
    if chosen != "auto":
        return chosen
    big = (gpu_memory_gib(pipe.unet.device) or 0.0) >= BIG_GPU_GIB
    return AUTO_COMPILE if big and images >= COMPILE_FROM_IMAGES else "off"


def compiled_modules(pipe, what: str) -> list[torch.nn.Module]:
    """The modules ``what`` (:func:`compile_choice`) compiles: the VAE decoder, and for ``all`` also the whole UNet
    (one graph per batch shape and adapter state: the merged student, the teacher). Compiling the UNet's blocks one
    by one instead (diffusers' ``compile_repeated_blocks`` plus the residual blocks) took over 159 s on an H200: a
    graph per block shape (docs/benchmarks.md)."""
    if what == "off":
        return []
    if what not in ("vae", "all"):
        raise ValueError(f"compile {what!r}: use 'off', 'vae' or 'all'")
    return [pipe.vae.decoder] + ([pipe.unet] if what == "all" else [])


@contextmanager
def compiled_for_sampling(pipe, what: str, backend: str = "inductor") -> Iterator[None]:
    """Inside the context the modules of :func:`compiled_modules` run compiled (``torch.compile``, static shapes:
    :func:`generate` keeps every batch of a call the same size); afterwards they run eagerly again. Dynamo keeps
    what it compiled for the process, so a later call with the same shapes compiles nothing new."""
    modules = compiled_modules(pipe, what)
    if not modules:
        yield
        return
    import torch._dynamo

    limit = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = max(limit, 64)  # a graph per module, batch shape and adapter state
    for m in modules:
        m.compile(dynamic=False, backend=backend)
    try:
        yield
    finally:
        for m in modules:
            m._compiled_call_impl = None  # nn.Module.compile's own slot: eager again
        torch._dynamo.config.recompile_limit = limit


@contextmanager
def sampling_session(pipe, compile: str = "off") -> Iterator[None]:
    """A whole evaluation run of one sampler (:func:`generate`) on CUDA: cuDNN autotuning (the shapes repeat), on
    GPUs from 40 GiB the student's adapter merged into the base once for all batches
    (:func:`helpers.training.fused_adapters`; the base restored exactly afterwards), and the modules ``compile``
    names compiled (:func:`compiled_for_sampling`). Measured on an H200 (docs/benchmarks.md): 4-step sampling at
    512x512, 16.5 img/s at batch 16 unfused, 34.2 at batch 64 merged with autotuning. Nothing for ``pipe=None`` or
    on the CPU. Undone afterwards."""
    from helpers.training import fused_adapters

    if pipe is None or pipe.unet.device.type != "cuda":
        yield
        return
    benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    fuse = fused_adapters(pipe.unet) if (gpu_memory_gib(pipe.unet.device) or 0.0) >= BIG_GPU_GIB else nullcontext()
    try:
        with fuse, compiled_for_sampling(pipe, compile):
            yield
    finally:
        torch.backends.cudnn.benchmark = benchmark


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
    sample.pipe = pipe  # for generate's sampling_session
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
    sample.pipe = pipe  # for generate's sampling_session
    return sample


def even_batches(images: int, batch_size: int) -> int:
    """The batch size at most ``batch_size`` that splits ``images`` into the fewest calls of equal size (the last
    one padded, by at most one image per call): 100 images at up to 64 a call are 2 calls of 50, not 64 + 36."""
    calls = -(-images // max(1, batch_size))
    return -(-images // calls)


def generate(sampler: Sampler, eval_set: EvalSet, batch_size: int | None = None, desc: str | None = None,
             config: KitConfig | None = None, progress: bool = True,
             timing: dict[str, Any] | None = None) -> tuple[torch.Tensor, float]:
    """Run ``sampler`` over the evaluation set in batches; returns ``(images, seconds)``. One progress bar
    counts the images (``desc``, img/s); it writes to stdout while nbgrader runs (``config.grading``: a test
    cell fails on stderr output), as :class:`helpers.answer_env.tqdm` does. A sampler of :func:`pipeline_sampler`
    or :func:`function_sampler` runs inside :func:`sampling_session` (its pipeline is ``sampler.pipe``), compiled
    as :func:`compile_choice` says; a compiled call samples batches of one size (:func:`even_batches`, the last
    padded with copies of its last prompt and noise, which are dropped).

    ``timing``, if given, receives the batch size, what was compiled, each batch's seconds, the first batch's
    seconds (cuDNN's autotuning and any compilation happen there) and the images/s of the batches after it."""
    from tqdm.auto import tqdm

    n = len(eval_set)
    pipe = getattr(sampler, "pipe", None)
    batch_size = min(batch_size or n, n)
    compiled = compile_choice(pipe, n, config)
    if compiled != "off":
        batch_size = even_batches(n, batch_size)
    grading = config is not None and config.grading
    bar = tqdm(total=n, desc=desc, unit="img", disable=not progress, file=sys.stdout if grading else None)
    start = time.perf_counter()
    chunks, seconds_per_batch = [], []
    with bar, sampling_session(pipe, compiled):
        for i in range(0, n, batch_size):
            prompts, latents = list(eval_set.prompts[i:i + batch_size]), eval_set.latents[i:i + batch_size]
            real = len(prompts)
            short = batch_size - real if compiled != "off" else 0
            if short:
                prompts += [prompts[-1]] * short
                latents = torch.cat([latents, latents[-1:].expand(short, *latents.shape[1:])])
            t = time.perf_counter()
            chunks.append(sampler(prompts, latents)[:real])
            seconds_per_batch.append(time.perf_counter() - t)
            bar.update(real)
    seconds = time.perf_counter() - start
    images = torch.cat(chunks)
    if images.shape[0] != n or images.ndim != 4:
        raise ValueError(f"the sampler returned images of shape {tuple(images.shape)} for {n} prompts")
    if timing is not None:
        later = seconds_per_batch[1:]
        timing.update(batch_size=batch_size, compiled=compiled, batch_seconds=[round(t, 3) for t in seconds_per_batch],
                      first_batch_s=round(seconds_per_batch[0], 3),
                      steady_images_per_s=round(batch_size / float(np.median(later)), 2) if later else None)
    return images, seconds


def _distances(key: str, net, ours: torch.Tensor, other: torch.Tensor, against: str) -> dict[str, Metric]:
    """``fd_<key>`` and ``kid_<key>`` of the sampler's features ``ours`` against ``other`` with :mod:`helpers.fid`."""
    from helpers.fid import frechet_distance, kernel_distance

    fd = frechet_distance(ours, other)
    kid, kid_std = kernel_distance(ours, other)
    common = dict(images=len(ours), network=net.name, against=against, reference_images=len(other))
    return {f"fd_{key}": Metric(f"fd_{key}", fd, **common), f"kid_{key}": Metric(f"kid_{key}", kid, std=kid_std, **common)}


def split_half_fd(features: torch.Tensor, reference_features: torch.Tensor,
                  halves: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Fréchet distance of the sampler's images of one half of the noises against the teacher's images of the other
    half, and the reverse, averaged (``halves`` from :meth:`EvalSet.split_halves`): no image is compared with the
    teacher's image of its own noise."""
    from helpers.fid import frechet_distance

    a, b = halves
    return 0.5 * (frechet_distance(features[a], reference_features[b])
                  + frechet_distance(features[b], reference_features[a]))


def _split_metric(net, ours: torch.Tensor, theirs: torch.Tensor, eval_set: EvalSet) -> Metric:
    halves = eval_set.split_halves()
    if halves is None:
        return Metric("fd_teacher_split", None, len(ours), skipped=f"{len(eval_set)} images are too few to split "
                      "into two halves of at least 2 (raise eval_images)")
    return Metric("fd_teacher_split", split_half_fd(ours, theirs, halves), 2 * len(halves[0]), net.name,
                  f"{REFERENCE_NAME} of the other half of the noises", len(halves[0]))


def _skipped(keys: Sequence[str], n: int, why: str) -> dict[str, Metric]:
    return {k: Metric(k, None, n, skipped=why) for k in keys}


def measure(images: torch.Tensor, eval_set: EvalSet, reference: torch.Tensor | None, config: KitConfig
            ) -> dict[str, Metric]:
    """Every metric of ``images`` (the sampler's output on ``eval_set``) for the set's kind; ``reference``: the
    teacher's 50-step images (None: ``images`` *are* the reference, so the against-teacher distances are left
    out and PSNR gives its cap)."""
    from helpers.device import pick_device
    from helpers.metrics import prompt_accuracy, psnr_db
    from helpers.quality import clip_judge, digit_net, inception_net

    n = len(images)
    out = {"psnr_teacher": Metric("psnr_teacher", psnr_db(images, images if reference is None else reference), n,
                                  against=REFERENCE_NAME, reference_images=n)}
    device = pick_device(config.device)
    if eval_set.kind == "digits":
        out["prompt_accuracy"] = Metric("prompt_accuracy", prompt_accuracy(images, eval_set.digits), n,
                                        "digit classifier", "prompts")
        net, why = digit_net(), ""
    elif config.grading:
        net, why = None, "skipped while nbgrader runs (CLIP and Inception are too heavy for grading)"
        out.update(_skipped(["clip_score"], n, why))
    else:
        judge, clip_why = clip_judge(config.clip_model, device)
        out["clip_score"] = (Metric("clip_score", judge.score(images, eval_set.prompts), n, judge.name, "prompts")
                             if judge else Metric("clip_score", None, n, skipped=clip_why))
        net, why = inception_net(config.inception, device)
    keys = (["fd_teacher", "kid_teacher"] if reference is not None else []) + ["fd_teacher_split"] + (
        ["fd_real", "kid_real"] if eval_set.real is not None else [])
    if net is None:
        return {**out, **_skipped(keys, n, why)}
    ours = net.features(images)  # once, for every comparison
    if reference is not None:
        theirs = eval_set.reference_features(net, reference)
        out.update(_distances("teacher", net, ours, theirs, REFERENCE_NAME))
    else:  # these are the teacher's images: keep their features for the samplers measured after it
        theirs = ours
        eval_set.remember_reference(net, images, ours)
    out["fd_teacher_split"] = _split_metric(net, ours, theirs, eval_set)
    if eval_set.real is not None:
        out.update(_distances("real", net, ours, eval_set.real.features(net), eval_set.real.description))
    return out


def evaluate(name: str, sampler: Sampler, eval_set: EvalSet, reference: torch.Tensor | None, config: KitConfig,
             batch_size: int | None = None, record: bool = True, **extra) -> EvalResult:
    """Generate the evaluation set with ``sampler`` and measure it (:func:`measure`); ``reference``: the teacher's
    50-step images (None: this *is* the reference). Records the :class:`SamplerRecord` (and ``extra`` fields,
    e.g. ``steps=4``) under ``name`` in the output folder of ``config`` (:mod:`helpers.report`) unless
    ``record=False``."""
    timing: dict[str, Any] = {}
    images, seconds = generate(sampler, eval_set, batch_size, desc=name, config=config, timing=timing)
    return _result(name, images, seconds, eval_set, reference, config, record, {**extra, "timing": timing})


def _result(name: str, images: torch.Tensor, seconds: float, eval_set: EvalSet, reference: torch.Tensor | None,
            config: KitConfig, record: bool, extra: dict) -> EvalResult:
    from helpers.report import record_sampler, record_timing

    metrics = measure(images, eval_set, reference, config)
    accuracy = metrics["prompt_accuracy"].value if "prompt_accuracy" in metrics else None
    result = EvalResult(name, images, accuracy, metrics["psnr_teacher"].value, seconds, dict(extra), metrics)
    if record:
        save_samples(name, images, eval_set, config)
        entry = result.record().to_json()
        record_sampler(name, entry.pop("prompt_accuracy", None), entry.pop("fidelity_psnr_db"), config,
                       **{**extra, **entry})
        if not extra.get("cached"):
            record_timing(f"sample_{name}", seconds, config)
    return result


SAMPLES_DIR = "samples"


def sample_picks(eval_set: EvalSet, per_row: int = 10) -> tuple[list[int], list[str]]:
    """Which images of the set a row of examples shows, and their labels: the first image of each digit, or the
    last prompts of a captions set (the course's own prompts)."""
    if eval_set.digits is not None:
        per_digit = max(1, len(eval_set) // 10)
        picks = list(range(0, len(eval_set), per_digit))[:per_row]
        return picks, [f"digit {int(eval_set.digits[i])}" for i in picks]
    picks = (list(range(len(eval_set)))[::-1])[:per_row]
    return picks, [eval_set.prompts[i][:24] for i in picks]


def save_samples(name: str, images: torch.Tensor, eval_set: EvalSet, config: KitConfig) -> Path | None:
    """Keep one row of a sampler's images (:func:`sample_picks`, the same noise for every sampler) as
    ``samples/<name>.pt`` in the output folder, so that the report can draw its comparison grid from the run's
    files alone (nothing under nbgrader)."""
    if config.grading:
        return None
    from helpers.report import out_dir

    picks, labels = sample_picks(eval_set)
    path = out_dir(config) / SAMPLES_DIR / f"{name}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"images": (images[picks].clamp(0, 1) * 255).round().to(torch.uint8), "labels": labels,
                "eval_key": eval_set.key()}, path)
    return path


def teacher_reference(pipe, eval_set: EvalSet, guidance_scale: float, model_key: str, config: KitConfig,
                      num_inference_steps: int = 50, batch_size: int | None = None) -> EvalResult:
    """The teacher's ``num_inference_steps``-step DDIM images of the evaluation set, measured and recorded as
    ``teacher_ddim50``; the images are read from the on-disk cache when an earlier notebook made them for the
    same model (``model_key``, e.g. :func:`helpers.data.model_fingerprint`), evaluation set and guidance (the
    metrics are computed again: cheap next to the images). The cache and the records live in the output folder of
    ``config`` (no cache under nbgrader).

    ``pipe.unet`` must be the teacher: call it before the first adapter is added, or inside
    :func:`helpers.training.adapters_disabled`.
    """
    from helpers.report import out_dir

    key = hashlib.sha256(json.dumps([model_key, eval_set.key(), guidance_scale, num_inference_steps])
                         .encode()).hexdigest()[:16]
    path = None if config.grading else out_dir(config) / "cache" / f"teacher-{key}.pt"
    if path is not None and path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        return _result(REFERENCE_NAME, saved["images"], float(saved["seconds"]), eval_set, None, config, True,
                       {"steps": num_inference_steps, "cached": True})
    timing: dict[str, Any] = {}
    images, seconds = generate(pipeline_sampler(pipe, num_inference_steps, guidance_scale), eval_set, batch_size,
                               desc=REFERENCE_NAME, config=config, timing=timing)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial")
        torch.save({"images": images, "seconds": seconds}, tmp)
        tmp.replace(path)
    return _result(REFERENCE_NAME, images, seconds, eval_set, None, config, True,
                   {"steps": num_inference_steps, "timing": timing})


#: Columns of :func:`results_table`: metric key, header, format.
TABLE_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("prompt_accuracy", "prompt acc.", "{:.3f}"), ("clip_score", "CLIP score", "{:.2f}"),
    ("psnr_teacher", "PSNR vs 50-step (dB)", "{:.2f}"), ("fd_teacher", "FD vs 50-step", "{:.2f}"),
    ("fd_teacher_split", "FD vs 50-step, other noise", "{:.3f}"),
    ("fd_real", "FD vs real", "{:.2f}"), ("kid_real", "KID vs real", "{:.4f}"))


def results_table(results: Sequence[EvalResult]) -> str:
    """A plain-text table of the results: name, every metric any of them has (— where skipped or absent), seconds;
    then which network and how many images each distance used."""
    columns = [c for c in TABLE_COLUMNS if any(c[0] in r.metrics for r in results)]
    widths = [max(len(h), 8) + 2 for _, h, _ in columns]
    lines = [f"{'sampler':<22}" + "".join(f"{h:>{w}}" for (_, h, _), w in zip(columns, widths)) + f"{'seconds':>10}"]
    for r in results:
        cells = []
        for (key, _, fmt), w in zip(columns, widths):
            value = r.metrics[key].value if key in r.metrics else None
            cells.append(f"{'—' if value is None else fmt.format(value):>{w}}")
        lines.append(f"{r.name:<22}" + "".join(cells) + f"{r.seconds:>10.1f}")
    notes = {}
    for r in results:
        for m in r.metrics.values():
            if m.key.startswith(("fd_", "kid_", "clip")):
                notes.setdefault(m.key, m)
    for key, m in notes.items():
        lines.append(f"  {key}: " + (f"skipped: {m.skipped}" if m.skipped else
                                      f"{m.network}, {m.images} images" + (f" vs {m.reference_images} of {m.against}"
                                                                           if m.reference_images else "")))
    return "\n".join(lines)


def show_results(results: Sequence[EvalResult], eval_set: EvalSet, config: KitConfig, per_row: int = 10,
                 filename: str | None = None):
    """One row of images per sampler (the first image of each digit, or the last prompts of a captions set; the same
    noise in every row); saved under
    ``figures/filename`` of ``config``'s output folder when given. Returns the figure."""
    from helpers.plotting import show_images
    from helpers.report import save_figure

    picks, labels = sample_picks(eval_set, per_row)
    images = torch.cat([r.images[picks] for r in results])
    titles = [f"{r.name}\n{label}" if j == 0 else f"\n{label}" for r in results for j, label in enumerate(labels)]
    fig = show_images(images, titles=titles, ncols=len(picks), size=1.6)
    if filename:
        save_figure(fig, filename, config)
    return fig
