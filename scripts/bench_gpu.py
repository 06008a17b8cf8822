#!/usr/bin/env python
"""GPU benchmark of the kit's SD1.5 path, offline: random weights, SD1.5's published architecture.

A UNet built from SD1.5's config with random weights costs exactly the time and memory of the real one, so
nothing is downloaded. The script measures, on one GPU:

* the kit's consistency-distillation (CD) training step -- built from the kit's own reference functions
  (``autograder.reference``: ``cm_loss_template``, ``get_xs_from_xt_with_teacher``, ``pseudo_huber_loss``,
  driven by the kit's ``train_loop``: autocast + GradScaler + AdamW on the LoRA weights) -- in the variants
  the kit offers (fp16 / bf16 autocast, shared frozen base / separate teacher, gradient checkpointing,
  torch.compile), at each batch size: steps/s (median) and peak memory;
* beside it, a step written the way diffusers' LCM-LoRA training script does it (fp32 student, separate fp16
  teacher), as the baseline;
* 4-step consistency sampling at 512x512 with the VAE decode (the kit's ``consistency_sampling``), images/s;
* the dense fp16/bf16 matmul rate and the FLOPs of each step, for the physical floor (FLOPs / matmul rate).

It prints a table and writes JSON (``--out``). ``--tiny`` swaps in a tiny configuration that runs in seconds
on a CPU (the tests use it); on a CPU, the CUDA-only parts (fp16/bf16, peak memory, torch.compile) are
skipped and the JSON says so. See docs/benchmarks.md for how to run it on the GPU host and what each figure
means.

    python scripts/bench_gpu.py --out out/bench_gpu.json                 # the full run, about 8 minutes
    python scripts/bench_gpu.py --tiny --device cpu --out /tmp/b.json    # seconds, for tests
    python scripts/bench_gpu.py --list-variants
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

# The kit's train_loop shows a tqdm bar; tqdm reads TQDM_* when it is imported (torch imports it).
os.environ.setdefault("TQDM_DISABLE", "1")

import diffusers  # noqa: E402
import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from peft import get_peft_model  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the kit, also where it is not pip-installed

from autograder.reference import reference  # noqa: E402
from helpers.device import pick_device  # noqa: E402
from helpers.sd15_shaped import (SD15_TEXT, SD15_UNET, SD15_VAE, TINY_UNET, build_pipeline,  # noqa: E402,F401
                                 build_scheduler, build_unet, image_size, model_configs)
from helpers.training import (PROFILES, TrainSettings, add_phase_adapter, lora_config, make_teacher,  # noqa: E402
                              settings_for, start_phase)

SCHEMA = "cd-kit-bench-gpu/1"
GIB = 1024**3

# --- Model configurations -----------------------------------------------------------------------------------
# SD1.5's published configs and the tiny ones live in helpers.sd15_shaped (imported above).
TINY_LORA_RANK = 4

# Targets of the issue, checked in the JSON's "targets" section (SD1.5 shape on CUDA only).
TARGET_TRAIN_STEPS_PER_S = 3.0  # at batch 16 on an H100
TARGET_T4_MEMORY_GIB = 12.0  # a T4-friendly default at batch 8
TARGET_SAMPLER_IMAGES_PER_S = 40.0

# Rough costs (seconds, SD1.5 shape on an H100) used to decide, within --time-budget-s, whether a
# measurement still fits; once one compiled measurement has run, its wall time replaces the estimate.
ESTIMATE_S = {"train": 20.0, "sampling": 20.0, "train-compile": 150.0, "sampling-compile": 90.0}


# --- Variants -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainVariant:
    """One way of running the CD training step."""

    name: str
    description: str
    step: str = "kit"  # "kit": the kit's reference functions; "lcm_lora": diffusers' LCM-LoRA script
    amp: str = "fp16"  # autocast dtype on CUDA (a CPU runs fp32, like the kit)
    teacher: str = "shared"  # "shared": the student's frozen base with LoRA disabled; "separate": 2nd UNet
    student_base: str = "half"  # frozen base weights in the autocast dtype ("half") or in "fp32"
    checkpointing: bool = False
    channels_last: bool = False  # UNet weights (and so its convolutions) in channels_last memory format
    compile: bool = False


@dataclass(frozen=True)
class SampleVariant:
    """One way of running 4-step consistency sampling."""

    name: str
    description: str
    lora: bool = False  # an unfused rank-r adapter on the UNet (else: base only, = a fused adapter)
    channels_last: bool = False  # UNet and VAE in channels_last memory format
    compile: bool = False  # torch.compile of the UNet and the VAE decoder


TRAIN_VARIANTS: tuple[TrainVariant, ...] = (
    TrainVariant("lcm-lora-baseline", "diffusers' train_lcm_distill_lora_sd_wds.py step: fp32 student + LoRA "
                 "(peft), separate fp16 teacher, fp16 autocast, GradScaler, grad-norm clipping",
                 step="lcm_lora", teacher="separate", student_base="fp32"),
    TrainVariant("kit-original", "the original course's recipe: fp32 student + LoRA, separate fp16 teacher, "
                 "fp16 autocast (the plain eager step)", teacher="separate", student_base="fp32"),
    TrainVariant("kit-original-ckpt", "kit-original + gradient checkpointing (helpers.training.settings_for"
                 "('sd15') as of this script)", teacher="separate", student_base="fp32", checkpointing=True),
    TrainVariant("kit-fp16-separate", "fp16 frozen student base + fp32 LoRA, separate fp16 teacher",
                 teacher="separate"),
    TrainVariant("kit-fp16-shared", "fp16 frozen base shared by student (LoRA on) and teacher (LoRA off)"),
    TrainVariant("kit-bf16-shared", "bf16 frozen base shared, train_loop(amp_dtype=bf16)", amp="bf16"),
    TrainVariant("kit-fp16-shared-cl", "kit-fp16-shared with the UNet in channels_last", channels_last=True),
    TrainVariant("kit-fp16-shared-ckpt", "kit-fp16-shared + gradient checkpointing (the T4 candidate)",
                 checkpointing=True),
    TrainVariant("kit-fp16-shared-compile", "kit-fp16-shared + torch.compile of the UNet", compile=True),
    TrainVariant("kit-bf16-shared-compile", "kit-bf16-shared + torch.compile of the UNet", amp="bf16",
                 compile=True),
)
SAMPLE_VARIANTS: tuple[SampleVariant, ...] = (
    SampleVariant("sample-fp16", "fp16 pipeline, UNet without adapter (= a fused LoRA)"),
    SampleVariant("sample-fp16-lora", "fp16 pipeline, unfused LoRA adapter on the UNet", lora=True),
    SampleVariant("sample-fp16-cl", "sample-fp16 with UNet and VAE in channels_last", channels_last=True),
    SampleVariant("sample-fp16-compile", "sample-fp16-cl + torch.compile (UNet, VAE decoder)",
                  channels_last=True, compile=True),
)
ALL_VARIANTS: dict[str, TrainVariant | SampleVariant] = {v.name: v for v in (*TRAIN_VARIANTS, *SAMPLE_VARIANTS)}


def current_kit_default(profile: str | None = None) -> str:
    """The variant that matches the kit's SD1.5 settings in a training profile
    (``helpers.training.settings_for('sd15', profile)``; default: the profile this machine would get)."""
    s = settings_for("sd15", profile)
    name = "kit-original" if (s.student_base, s.teacher) == ("fp32", "separate") else (
        "kit-fp16-shared" if (s.student_base, s.teacher) == ("half", "shared") else "kit-fp16-separate")
    return name + ("-ckpt" if s.gradient_checkpointing else "")


def kit_defaults() -> dict[str, str]:
    """The variant of each training profile."""
    return {profile: current_kit_default(profile) for profile in PROFILES}


# --- Small utilities ----------------------------------------------------------------------------------------
class Budget:
    """The wall-clock budget of the whole run (``--time-budget-s``)."""

    def __init__(self, seconds: float) -> None:
        self.start = time.perf_counter()
        self.seconds = seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)

    def allows(self, estimate_s: float) -> bool:
        return self.left() >= estimate_s


def sync(device: torch.device) -> None:
    """Wait for the device (CUDA kernels are asynchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    """Release what the last measurement left, and reset the peak-memory counter."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, float | None]:
    """Peak allocated and reserved memory (GiB) since the last reset; ``None`` off CUDA."""
    if device.type != "cuda":
        return {"peak_mem_gib": None, "peak_reserved_gib": None}
    return {"peak_mem_gib": round(torch.cuda.max_memory_allocated(device) / GIB, 3),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved(device) / GIB, 3)}


def compute_dtype(amp: str, device: torch.device) -> torch.dtype:
    """The autocast dtype of a variant: fp16/bf16 on CUDA; fp32 on a CPU (half precision is slow there)."""
    if device.type != "cuda":
        return torch.float32
    return {"fp16": torch.float16, "bf16": torch.bfloat16}[amp]


def autocast(dtype: torch.dtype, device: torch.device) -> contextlib.AbstractContextManager:
    """``torch.autocast`` in ``dtype``, or nothing when running fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def count_flops(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run ``fn`` once under ``FlopCounterMode``; return its result and the FLOPs it took (matmuls, convs,
    attention; forward and backward)."""
    with FlopCounterMode(display=False) as counter:
        out = fn()
    return out, int(counter.get_total_flops())


def timing_summary(times: list[float]) -> dict[str, float | int]:
    """Median, min and max of per-iteration seconds."""
    return {"median_s": round(statistics.median(times), 5), "min_s": round(min(times), 5),
            "max_s": round(max(times), 5), "iters": len(times)}


def time_calls(fn: Callable[[], Any], device: torch.device, iters: int, budget: Budget,
               min_iters: int = 3) -> tuple[dict[str, float | int], Any]:
    """Median wall time of ``fn`` over ``iters`` synchronised calls (fewer, but at least ``min_iters``,
    when the budget runs out); also returns the last call's result."""
    times: list[float] = []
    out = None
    for _ in range(iters):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
        if len(times) >= min_iters and budget.left() <= 0:
            break
    return timing_summary(times), out


def error_text(err: BaseException) -> str:
    """A short one-line description of an exception for the JSON."""
    return f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"[:400]


PHASE = "cd"  # the adapter's name: the course's consistency-distillation phase


def lora_settings(tiny: bool) -> TrainSettings:
    """The kit's SD1.5 training settings (rank 64 on the 14 module kinds); rank 4 for the tiny model."""
    settings = settings_for("sd15", "course")
    return replace(settings, lora_rank=TINY_LORA_RANK) if tiny else settings


def variant_settings(variant: TrainVariant, settings: TrainSettings) -> TrainSettings:
    """``settings`` with the variant's student base (fp32 / half), teacher (separate / shared) and gradient
    checkpointing: the kit's own knobs for what the variant measures."""
    return replace(settings, student_base=variant.student_base, teacher=variant.teacher,
                   gradient_checkpointing=variant.checkpointing)


class RecordingTeacher(torch.nn.Module):
    """The kit's teacher (:func:`helpers.training.make_teacher`) as handed to ``get_xs_from_xt_with_teacher``;
    while ``calls`` is a list, the batch size of every call is appended to it. ``dtype``, ``device``,
    ``config`` are the teacher's."""

    def __init__(self, teacher: torch.nn.Module) -> None:
        super().__init__()
        self.teacher = teacher
        self.calls: list[int] | None = None

    def forward(self, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.calls is not None:
            self.calls.append(int(sample.shape[0]))
        return self.teacher(sample, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("teacher"), name)


# --- The training steps -------------------------------------------------------------------------------------
@dataclass
class StepSetup:
    """Everything one training-step measurement holds on to (so that it is freed in one go).

    ``run(n)`` trains ``n`` optimizer steps and returns the synchronised wall time of each; ``losses``
    collects the loss of every step.
    """

    run: Callable[[int], list[float]]
    student: torch.nn.Module
    teacher: RecordingTeacher
    optimizer: torch.optim.Optimizer
    trainable: int
    losses: list[float]


def kit_reference() -> dict[str, Callable]:
    """The kit's reference functions (one source of truth: the solution notebooks, via autograder.reference)."""
    names = ("cm_loss_template", "get_xs_from_xt_with_teacher", "pseudo_huber_loss", "train_loop")
    try:
        return {name: reference(name) for name in names}
    except (FileNotFoundError, KeyError, LookupError) as err:
        raise RuntimeError(
            f"The kit's reference functions {names} could not be read from the solution notebooks ({err}). "
            "Run the benchmark from a checkout that has solutions/02_ddim_step and solutions/04_consistency_loss "
            "(or point CD_KIT_SOLUTIONS at them).") from err


def make_students(variant: TrainVariant, unet_config: dict, device: torch.device, settings: TrainSettings
                  ) -> tuple[torch.nn.Module, RecordingTeacher, list[torch.nn.Parameter], torch.optim.Optimizer | None]:
    """The student and its teacher, built as the course notebooks build them with the kit's training functions.

    The base UNet comes in the pipeline's dtype (the autocast dtype on CUDA, fp32 on a CPU); the teacher is
    :func:`helpers.training.make_teacher` of it (a separate frozen copy, taken before any adapter, or the shared
    base with the adapters off), and the student's phase is :func:`helpers.training.start_phase` (the base in
    fp32 or left in half precision, train mode, gradient checkpointing, a new fp32 LoRA adapter, AdamW), all
    with :func:`variant_settings`. The ``lcm_lora`` baseline wraps its student with peft's ``get_peft_model``
    instead, as diffusers' script does (and makes its own optimizer: the returned one is None).
    """
    amp = compute_dtype(variant.amp, device)
    settings = variant_settings(variant, settings)
    base = build_unet(unet_config, device, amp)
    teacher = make_teacher(base, settings)
    optimizer = None
    if variant.step == "lcm_lora":
        student = get_peft_model(base.to(torch.float32) if variant.student_base == "fp32" else base,
                                 lora_config(settings))  # as diffusers' script does
        params = [p for p in student.parameters() if p.requires_grad]
        if variant.checkpointing:
            student.enable_gradient_checkpointing()
        student.train()
    else:
        student = base
        optimizer = start_phase(student, PHASE, settings)
        params = [p for group in optimizer.param_groups for p in group["params"]]
    unets = [student] + ([teacher] if variant.teacher == "separate" else [])  # a shared teacher is the student
    if variant.channels_last:
        for unet in unets:
            unet.to(memory_format=torch.channels_last)
    if variant.compile:
        for unet in unets:
            unet.compile()
    return student, RecordingTeacher(teacher), params, optimizer


def random_batch(batch: int, unet_config: dict, text_config: dict, device: torch.device
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Latents, prompt embeddings and empty-prompt embeddings of the right shapes (values do not matter)."""
    size = unet_config["sample_size"]
    latents = torch.randn(batch, unet_config["in_channels"], size, size, device=device)
    embeds = torch.randn(batch, text_config["max_position_embeddings"], unet_config["cross_attention_dim"],
                         device=device)
    uncond = torch.randn(1, *embeds.shape[1:], device=device).expand(batch, -1, -1).contiguous()
    return latents, embeds, uncond


def kit_runner(variant: TrainVariant, student, teacher: RecordingTeacher, optimizer: torch.optim.Optimizer,
               scheduler, batch_tensors, settings, device: torch.device, losses: list[float]
               ) -> tuple[Callable[[int], list[float]], torch.optim.Optimizer]:
    """The kit's CD training: its ``train_loop`` (autocast, GradScaler, one optimizer step per batch here)
    over ``cm_loss_template`` with the teacher's ``get_xs_from_xt_with_teacher``, the pseudo-Huber loss and
    one boundary at 0, with ``start_phase``'s AdamW on the LoRA weights. A step's time runs from the start of
    one loss to the next."""
    ref = kit_reference()
    latents, embeds, uncond = batch_tensors
    get_xs = functools.partial(ref["get_xs_from_xt_with_teacher"], teacher_unet=teacher,
                               guidance_scale=settings.guidance_scale, uncond_prompt_embeds=uncond)
    loss_fn = functools.partial(ref["pseudo_huber_loss"], c=settings.huber_c)

    def run(steps: int) -> list[float]:
        stamps: list[float] = []

        def compute_loss(x0: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
            sync(device)
            stamps.append(time.perf_counter())
            return ref["cm_loss_template"](x0, emb, student, scheduler, loss_fn, torch.zeros_like, get_xs,
                                           num_timesteps=scheduler.config.num_train_timesteps,
                                           step_size=settings.step_size)

        losses.extend(ref["train_loop"](student, optimizer, [(latents, embeds)], compute_loss, steps,
                                        gradient_accumulation_steps=1, device=device,
                                        amp_dtype=compute_dtype(variant.amp, device)))
        sync(device)
        stamps.append(time.perf_counter())
        return [b - a for a, b in zip(stamps, stamps[1:])]

    return run, optimizer


def lcm_lora_runner(variant: TrainVariant, student, teacher: RecordingTeacher, params, scheduler, batch_tensors,
                    settings, device: torch.device, losses: list[float]
                    ) -> tuple[Callable[[int], list[float]], torch.optim.Optimizer]:
    """Steps as diffusers' ``train_lcm_distill_lora_sd_wds.py`` writes them (latents given): 50-step DDIM
    solver, c_skip/c_out boundary scalings, w ~ U[3, 15] in the LCM CFG form, teacher cond + uncond, target
    from the student without gradients, pseudo-Huber loss, GradScaler, grad-norm clipping at 1."""
    latents, embeds, uncond = batch_tensors
    dtype = compute_dtype(variant.amp, device)
    ab = scheduler.alphas_cumprod.to(device, torch.float32)
    alpha, sigma = ab.sqrt(), (1 - ab).sqrt()
    num_ddim, topk = 50, scheduler.config.num_train_timesteps // 50
    ddim_ts = torch.arange(1, num_ddim + 1, device=device) * topk - 1
    ab_prev = torch.cat([ab[:1], ab[ddim_ts[:-1]]])
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def col(v: torch.Tensor) -> torch.Tensor:
        return v.reshape(-1, 1, 1, 1)

    def boundary(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scaled = t.float() * 10.0  # timestep_scaling_factor 10, sigma_data 0.5
        return col(0.25 / (scaled**2 + 0.25)), col(scaled / (scaled**2 + 0.25).sqrt())

    def x0_of(eps: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (x - col(sigma[t]) * eps) / col(alpha[t])

    def step() -> torch.Tensor:
        bsz = latents.shape[0]
        index = torch.randint(0, num_ddim, (bsz,), device=device)
        start = ddim_ts[index]
        t = (start - topk).clamp(min=0)
        noise = torch.randn_like(latents)
        x = col(alpha[start]) * latents + col(sigma[start]) * noise
        w = col(torch.rand(bsz, device=device) * 12 + 3)
        with autocast(dtype, device):
            eps = student(x, start, encoder_hidden_states=embeds).sample.float()
        skip, out = boundary(start)
        model_pred = skip * x + out * x0_of(eps, x, start)
        with torch.no_grad(), autocast(dtype, device):
            tdt = teacher.dtype
            eps_c = teacher(x.to(tdt), start, encoder_hidden_states=embeds.to(tdt)).sample.float()
            eps_u = teacher(x.to(tdt), start, encoder_hidden_states=uncond.to(tdt)).sample.float()
            x0_c, x0_u = x0_of(eps_c, x, start), x0_of(eps_u, x, start)
            pred_x0, pred_eps = x0_c + w * (x0_c - x0_u), eps_c + w * (eps_c - eps_u)
            x_prev = col(ab_prev[index].sqrt()) * pred_x0 + col((1 - ab_prev[index]).sqrt()) * pred_eps
            eps_t = student(x_prev.float(), t, encoder_hidden_states=embeds).sample.float()
            skip_t, out_t = boundary(t)
            target = skip_t * x_prev + out_t * x0_of(eps_t, x_prev, t)
        loss = torch.mean(torch.sqrt((model_pred - target) ** 2 + settings.huber_c**2) - settings.huber_c)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def run(steps: int) -> list[float]:
        times = []
        for _ in range(steps):
            sync(device)
            t0 = time.perf_counter()
            losses.append(float(step()))
            sync(device)
            times.append(time.perf_counter() - t0)
        return times

    return run, optimizer


def setup_train(variant: TrainVariant, batch: int, configs: dict, device: torch.device, tiny: bool) -> StepSetup:
    """Build the models, data and step runner of one training measurement."""
    settings = lora_settings(tiny)
    student, teacher, params, optimizer = make_students(variant, configs["unet"], device, settings)
    scheduler = build_scheduler(configs["scheduler"], device)
    tensors = random_batch(batch, configs["unet"], configs["text"], device)
    losses: list[float] = []
    if variant.step == "lcm_lora":
        run, optimizer = lcm_lora_runner(variant, student, teacher, params, scheduler, tensors, settings, device,
                                         losses)
    else:
        run, optimizer = kit_runner(variant, student, teacher, optimizer, scheduler, tensors, settings, device,
                                    losses)
    return StepSetup(run, student, teacher, optimizer, sum(p.numel() for p in params), losses)


def first_step_probe(setup: StepSetup, compiled: bool) -> dict[str, Any]:
    """Run the first (warm-up) step while recording its FLOPs, the dtype the UNet computed in, and the
    teacher's calls. Under torch.compile only the teacher calls are recorded (the rest needs eager mode)."""
    dtypes: set[str] = set()
    unet = setup.student.get_base_model() if hasattr(setup.student, "get_base_model") else setup.student
    hook = None if compiled else unet.conv_in.register_forward_hook(lambda m, i, o: dtypes.add(str(o.dtype)))
    setup.teacher.calls = []
    try:
        if compiled:
            setup.run(1)
            flops = None
        else:
            _, flops = count_flops(lambda: setup.run(1))
    finally:
        if hook is not None:
            hook.remove()
    calls, setup.teacher.calls = setup.teacher.calls, None
    return {"flops_per_step": flops, "compute_dtypes": sorted(dtypes) or None, "teacher_calls": calls}


def dtype_warning(variant: TrainVariant, device: torch.device, dtypes: list[str] | None) -> str | None:
    """A note when the UNet did not compute in the dtype the variant asked for."""
    want = str(compute_dtype(variant.amp, device))
    if dtypes and dtypes != [want]:
        return (f"asked for {want} but the UNet computed in {dtypes}: an autocast inside the kit's functions "
                "overrides the caller's dtype")
    return None


def measure_train(variant: TrainVariant, batch: int, configs: dict, device: torch.device,
                  args: argparse.Namespace, budget: Budget) -> dict[str, Any]:
    """One training measurement: build, warm up (the first step probed), time (3 steps at most once the
    budget is spent, e.g. by a long compilation); peak memory since the build."""
    setup = setup_train(variant, batch, configs, device, args.tiny)
    free_memory(device)  # the build's temporaries go; the peak counts the models from here on
    probe = first_step_probe(setup, variant.compile)
    if args.warmup > 1:
        setup.run(args.warmup - 1)
    timing = timing_summary(setup.run(args.iters if budget.left() > 0 else min(args.iters, 3)))
    out = {**timing, "steps_per_s": round(1.0 / timing["median_s"], 4), **peak_memory(device), **probe,
           "trainable_params": setup.trainable, "loss_finite": math.isfinite(setup.losses[-1]),
           "optimizer_stepped": len(setup.optimizer.state) > 0}
    warning = dtype_warning(variant, device, probe["compute_dtypes"])
    return {**out, "warning": warning} if warning else out


# --- Sampling -----------------------------------------------------------------------------------------------
def kit_sampler() -> Callable:
    """The kit's reference ``consistency_sampling``."""
    try:
        return reference("consistency_sampling")
    except (FileNotFoundError, KeyError, LookupError) as err:
        raise RuntimeError(f"The kit's consistency_sampling could not be read from solutions/ ({err}).") from err


def setup_pipeline(variant: SampleVariant, configs: dict, device: torch.device, tiny: bool):
    """The fp16 (CUDA) / fp32 (CPU) random-weight pipeline of a sampling variant."""
    dtype = compute_dtype("fp16", device)
    pipe = build_pipeline(configs, device, dtype)
    if variant.lora:
        add_phase_adapter(pipe.unet, PHASE, lora_settings(tiny))  # the kit's adapter, unfused
        pipe.unet.to(dtype)  # inference in the pipeline's dtype
    if variant.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if variant.compile:
        pipe.unet.compile()
        pipe.vae.decoder.compile()
    return pipe


def measure_sampling(variant: SampleVariant, configs: dict, device: torch.device, args: argparse.Namespace,
                     budget: Budget) -> dict[str, Any]:
    """Images/s of the kit's 4-step consistency sampling, text encoding and VAE decode included."""
    sample = kit_sampler()
    pipe = setup_pipeline(variant, configs, device, args.tiny)
    free_memory(device)
    generator = torch.Generator(device=device).manual_seed(0)

    def run() -> Any:
        with torch.inference_mode():
            return sample(pipe, "A sad puppy with large eyes", num_inference_steps=4, generator=generator,
                          num_images_per_prompt=args.sample_batch, guidance_scale=1)

    for _ in range(args.warmup):
        run()
    timing, _ = time_calls(run, device, args.iters, budget)
    return {**timing, "images_per_s": round(args.sample_batch / timing["median_s"], 3),
            "batch_size": args.sample_batch, **peak_memory(device)}


def component_flops(configs: dict, device: torch.device) -> dict[str, int]:
    """FLOPs of one UNet forward, one VAE decode and one text encoding, per image at the model's size."""
    dtype = compute_dtype("fp16", device)
    pipe = build_pipeline(configs, device, dtype)
    unet, size = pipe.unet, configs["unet"]["sample_size"]
    lat = torch.randn(1, unet.config.in_channels, size, size, device=device, dtype=dtype)
    emb = torch.randn(1, configs["text"]["max_position_embeddings"], configs["unet"]["cross_attention_dim"],
                      device=device, dtype=dtype)
    ids = torch.zeros(1, configs["text"]["max_position_embeddings"], dtype=torch.long, device=device)
    t = torch.tensor([999], device=device)
    with torch.no_grad():
        _, unet_f = count_flops(lambda: unet(lat, t, encoder_hidden_states=emb))
        _, vae_f = count_flops(lambda: pipe.vae.decode(lat))
        _, text_f = count_flops(lambda: pipe.text_encoder(ids))
    return {"unet_forward": unet_f, "vae_decode": vae_f, "text_encoder": text_f}


# --- Matmul rate --------------------------------------------------------------------------------------------
def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int, iters: int = 20) -> float:
    """Dense ``n x n @ n x n`` matmul rate in TFLOP/s (the practical peak that the floor divides by)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync(device)
    return round(2 * n**3 * iters / (time.perf_counter() - t0) / 1e12, 2)


def measure_matmul(device: torch.device, n: int) -> dict[str, Any]:
    """fp16 and bf16 rates on CUDA; on a CPU the fp32 rate (the dtype the kit runs there)."""
    if device.type != "cuda":
        return {"float32": {"n": n, "tflops": matmul_tflops(device, torch.float32, n)},
                "float16": {"skipped": "CUDA only"}, "bfloat16": {"skipped": "CUDA only"}}
    return {str(d).removeprefix("torch."): {"n": n, "tflops": matmul_tflops(device, d, n, iters=50)}
            for d in (torch.float16, torch.bfloat16)}


# --- The run ------------------------------------------------------------------------------------------------
def environment(device: torch.device) -> dict[str, Any]:
    """Device, software versions and date for the JSON."""
    info: dict[str, Any] = {"type": device.type, "name": platform.processor() or platform.machine()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, capability=f"{props.major}.{props.minor}",
                    total_memory_gib=round(props.total_memory / GIB, 2), count=torch.cuda.device_count())
    return {
        "device": info,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                     "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
                     "diffusers": diffusers.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
    }


def skip_reason(variant: TrainVariant | SampleVariant, device: torch.device) -> str | None:
    """Why a variant cannot run here, or None."""
    if device.type == "cuda":
        return None
    if variant.compile:
        return "torch.compile variants are measured on CUDA only"
    if isinstance(variant, TrainVariant) and variant.amp == "bf16":
        return "bf16 autocast is measured on CUDA only (a CPU runs fp32, like the kit)"
    return None


def record(kind: str, variant: TrainVariant | SampleVariant, batch: int | None) -> dict[str, Any]:
    """The JSON record of one measurement, before it runs."""
    base = {"variant": variant.name, "kind": kind, "status": "pending", **asdict(variant)}
    base.pop("name")
    if batch is not None:
        base["batch_size"] = batch
    return base


def run_measurement(rec: dict[str, Any], fn: Callable[[], dict[str, Any]], device: torch.device,
                    estimate_s: float, budget: Budget, skip: str | None) -> dict[str, Any]:
    """Run one measurement into ``rec``: skipped, ok, OOM, or error (the run goes on in every case)."""
    if skip:
        return {**rec, "status": "skipped", "reason": skip}
    if not budget.allows(estimate_s):
        left = budget.left()
        return {**rec, "status": "skipped", "reason": f"time budget ({left:.0f} s left, ~{estimate_s:.0f} s needed)"}
    free_memory(device)
    t0 = time.perf_counter()
    try:
        rec = {**rec, **fn(), "status": "ok"}
    except torch.OutOfMemoryError as err:
        rec = {**rec, "status": "OOM", "reason": error_text(err), **peak_memory(device)}
    except Exception as err:  # one failing variant must not lose the rest of the run
        rec = {**rec, "status": "error", "reason": error_text(err)}
    rec["wall_s"] = round(time.perf_counter() - t0, 2)
    if rec.get("compile"):
        torch.compiler.reset()  # drop the compiled graphs (and the models they hold)
    free_memory(device)
    return rec


def plan(args: argparse.Namespace) -> list[tuple[str, TrainVariant | SampleVariant, int | None]]:
    """The measurements in run order, so that the time budget drops the least important ones: eager
    sampling, eager training, then the first compiled training variant at the largest batch, compiled
    sampling, and the other compiled training variants. Compiled variants run at the largest batch only
    (each compilation costs minutes)."""
    chosen = [ALL_VARIANTS[n] for n in args.variants]
    sizes = sorted(set(args.batch_sizes))
    eager_s = [("sampling", v, None) for v in chosen if isinstance(v, SampleVariant) and not v.compile]
    eager_t = [("train", v, b) for v in chosen if isinstance(v, TrainVariant) and not v.compile for b in sizes]
    comp_t = [("train", v, sizes[-1]) for v in chosen if isinstance(v, TrainVariant) and v.compile]
    comp_s = [("sampling", v, None) for v in chosen if isinstance(v, SampleVariant) and v.compile]
    return eager_s + eager_t + comp_t[:1] + comp_s + comp_t[1:]


def estimate_key(kind: str, variant: TrainVariant | SampleVariant) -> str:
    """The ``ESTIMATE_S`` entry of a measurement."""
    return f"{kind}-compile" if variant.compile else kind


def floors(result: dict[str, Any]) -> None:
    """Add each ok record's floor: FLOPs per step (or per image) over the matmul rate of its dtype."""
    rates = {k: v.get("tflops") for k, v in result["matmul"].items()}
    flops_of: dict[tuple, int] = {}
    for rec in result["train"]:
        if rec.get("flops_per_step"):
            key = (rec["step"], rec["checkpointing"], rec["batch_size"])
            flops_of[key] = min(flops_of.get(key, rec["flops_per_step"]), rec["flops_per_step"])
    for rec in result["train"]:
        rate = rates.get(str(compute_dtype(rec["amp"], torch.device(result["device"]["type"]))).removeprefix("torch."))
        flops = rec.get("flops_per_step") or flops_of.get((rec["step"], rec["checkpointing"], rec.get("batch_size")))
        if rec["status"] == "ok" and rate and flops:
            rec["floor_steps_per_s"] = round(rate * 1e12 / flops, 3)
            rec["fraction_of_floor"] = round(rec["steps_per_s"] / rec["floor_steps_per_s"], 3)
    per_image = result.get("component_flops") or {}
    rate = rates.get("float16") or rates.get("float32")
    if per_image and rate:
        sample_flops = 4 * per_image["unet_forward"] + per_image["vae_decode"] + per_image["text_encoder"]
        for rec in result["sampling"]:
            if rec["status"] == "ok":
                rec["floor_images_per_s"] = round(rate * 1e12 / sample_flops, 2)
                rec["fraction_of_floor"] = round(rec["images_per_s"] / rec["floor_images_per_s"], 3)


def best(records: list[dict], key: str, where: Callable[[dict], bool]) -> dict | None:
    """The ok record with the largest ``key`` among those ``where`` accepts."""
    ok = [r for r in records if r["status"] == "ok" and where(r)]
    return max(ok, key=lambda r: r[key]) if ok else None


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets against the measured records (meaningful for the SD1.5 shape on CUDA only)."""
    applicable = result["device"]["type"] == "cuda" and not result["settings"]["tiny"]
    sizes = result["settings"]["batch_sizes"]
    big, small = max(sizes), min(sizes)
    kit = [r for r in result["train"] if r["step"] == "kit"]
    fast = best(kit, "steps_per_s", lambda r: r["batch_size"] == big)
    t4 = best(kit, "steps_per_s", lambda r: r["batch_size"] == small and r["amp"] == "fp16"
              and r.get("peak_mem_gib") is not None and r["peak_mem_gib"] <= TARGET_T4_MEMORY_GIB)
    sampler = best(result["sampling"], "images_per_s", lambda r: True)

    def entry(name: str, goal: str, rec: dict | None, value_key: str, met: Callable[[dict], bool]) -> dict:
        return {"target": name, "goal": goal, "applicable": applicable, "best_variant": rec and rec["variant"],
                "value": rec and rec[value_key], "met": bool(rec and met(rec))}

    return [
        entry(f"train_steps_per_s_at_batch_{big}", f">= {TARGET_TRAIN_STEPS_PER_S}", fast, "steps_per_s",
              lambda r: r["steps_per_s"] >= TARGET_TRAIN_STEPS_PER_S),
        entry(f"t4_friendly_fp16_at_batch_{small}", f"peak <= {TARGET_T4_MEMORY_GIB} GiB (fastest that fits)", t4,
              "steps_per_s", lambda r: True),
        entry("sampler_images_per_s", f">= {TARGET_SAMPLER_IMAGES_PER_S}", sampler, "images_per_s",
              lambda r: r["images_per_s"] >= TARGET_SAMPLER_IMAGES_PER_S),
    ]


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write atomically (a run cut short still leaves a valid file with what it measured)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def status_text(rec: dict[str, Any]) -> str:
    """Status, reason and the diagnostics that make a figure suspect."""
    notes = [rec["reason"]] if rec.get("reason") else []
    if rec.get("warning"):
        notes.append("dtype overridden, see JSON")
    if rec.get("optimizer_stepped") is False:
        notes.append("GradScaler skipped every optimizer step")
    if rec.get("loss_finite") is False:
        notes.append("loss not finite")
    return rec["status"] + (f" ({'; '.join(notes)})" if notes else "")


def scaled(rec: dict[str, Any], key: str, factor: float) -> float | None:
    """``rec[key] * factor``, or None when the record has no such figure."""
    return None if rec.get(key) is None else rec[key] * factor


# (header, width, format, value) of the columns of the two tables
TRAIN_COLUMNS: tuple = (
    ("batch", 5, "d", lambda r: r.get("batch_size")), ("steps/s", 8, ".2f", lambda r: r.get("steps_per_s")),
    ("ms", 8, ".0f", lambda r: scaled(r, "median_s", 1e3)), ("peak GiB", 9, ".1f", lambda r: r.get("peak_mem_gib")),
    ("TFLOP", 7, ".2f", lambda r: scaled(r, "flops_per_step", 1e-12)),
    ("floor/s", 8, ".2f", lambda r: r.get("floor_steps_per_s")),
    ("%floor", 7, ".0f", lambda r: scaled(r, "fraction_of_floor", 100)),
)
SAMPLE_COLUMNS: tuple = (
    ("batch", 5, "d", lambda r: r.get("batch_size")), ("img/s", 8, ".1f", lambda r: r.get("images_per_s")),
    ("ms", 8, ".0f", lambda r: scaled(r, "median_s", 1e3)), ("peak GiB", 9, ".1f", lambda r: r.get("peak_mem_gib")),
    ("floor/s", 8, ".1f", lambda r: r.get("floor_images_per_s")),
    ("%floor", 7, ".0f", lambda r: scaled(r, "fraction_of_floor", 100)),
)


def table_lines(title: str, records: list[dict[str, Any]], columns: tuple) -> list[str]:
    """One table: a title, a header and a row per record."""
    head = f"{'variant':26}" + "".join(f" {name:>{width}}" for name, width, _, _ in columns) + "  status"
    rows = [f"{r['variant']:26}" + "".join(f" {fmt(get(r), spec):>{width}}" for _, width, spec, get in columns)
            + "  " + status_text(r) for r in records]
    return ["", title, head, "-" * len(head), *rows]


def table(result: dict[str, Any]) -> str:
    """The human-readable summary printed at the end."""
    v = result["versions"]
    lines = [f"{result['device']['name']} | torch {v['torch']} | diffusers {v['diffusers']} | peft {v['peft']} "
             f"| {result['date']}",
             "matmul TFLOP/s: " + ", ".join(f"{k} {m.get('tflops', m.get('skipped'))}"
                                           for k, m in result["matmul"].items())]
    lines += table_lines("training step (student fwd+bwd, teacher cond+uncond, target fwd)", result["train"],
                         TRAIN_COLUMNS)
    lines += table_lines("4-step consistency sampling, VAE decode included", result["sampling"], SAMPLE_COLUMNS)
    lines += ["", "targets:"]
    for t in result["targets"]:
        verdict = ("met" if t["met"] else "NOT met") + ("" if t["applicable"] else " (not applicable here)")
        lines.append(f"  {t['target']} {t['goal']}: {t['best_variant']} = {t['value']} -> {verdict}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole benchmark; writes ``args.out`` after every measurement."""
    budget = Budget(args.time_budget_s)
    device = pick_device(args.device)
    torch.backends.cudnn.benchmark = bool(args.cudnn_benchmark)  # autotune convolution kernels per shape
    configs = model_configs(args.tiny)
    torch.manual_seed(0)
    result: dict[str, Any] = {
        "schema": SCHEMA, **environment(device), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "settings": {"tiny": args.tiny, "batch_sizes": sorted(set(args.batch_sizes)), "iters": args.iters,
                     "warmup": args.warmup, "time_budget_s": args.time_budget_s, "sample_batch": args.sample_batch,
                     "cudnn_benchmark": bool(args.cudnn_benchmark),
                     "lora_rank": lora_settings(args.tiny).lora_rank, "variants": args.variants,
                     "current_kit_default": current_kit_default(), "kit_defaults": kit_defaults(),
                     "image_size": image_size(configs)},
        "cuda_only_skipped": None if device.type == "cuda" else {
            "peak_memory": "torch.cuda.max_memory_allocated needs CUDA",
            "fp16_bf16": "a CPU runs fp32, like the kit (helpers.device.pick_dtype)",
            "torch_compile": "compiled variants are measured on CUDA only"},
        "matmul": measure_matmul(device, args.matmul_n if device.type == "cuda" else min(args.matmul_n, 512)),
        "component_flops": None, "train": [], "sampling": [], "targets": [],
    }
    try:
        result["component_flops"] = component_flops(configs, device)
    except Exception as err:  # the floor of the sampler is then missing, the rest still runs
        result["component_flops_error"] = error_text(err)
    free_memory(device)
    estimates = dict(ESTIMATE_S)
    for kind, variant, batch in plan(args):
        rec = record(kind, variant, batch)
        fn = (functools.partial(measure_train, variant, batch, configs, device, args, budget) if kind == "train"
              else functools.partial(measure_sampling, variant, configs, device, args, budget))
        key = estimate_key(kind, variant)
        rec = run_measurement(rec, fn, device, 0.0 if args.tiny else estimates[key], budget,
                              skip_reason(variant, device))
        if variant.compile and rec["status"] == "ok":
            estimates[key] = rec["wall_s"]
        result[kind].append(rec)
        print(f"[{time.perf_counter() - budget.start:6.0f} s] {kind} {variant.name} "
              f"{'' if batch is None else f'batch {batch} '}-> {rec['status']} "
              f"{rec.get('steps_per_s', rec.get('images_per_s', rec.get('reason', '')))}", flush=True)
        if args.out:
            write_json(args.out, result)
    floors(result)
    result["targets"] = targets(result)
    result["elapsed_s"] = round(time.perf_counter() - budget.start, 1)
    if args.out:
        write_json(args.out, result)
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny model instead of SD1.5's shape (CPU tests)")
    parser.add_argument("--device", default=None, help="cuda | cpu (default: CUDA when available)")
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write (written after each measurement)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16], help="training batch sizes")
    parser.add_argument("--variants", nargs="+", default=list(ALL_VARIANTS), metavar="NAME",
                        help="variants to run (default: all; see --list-variants)")
    parser.add_argument("--iters", type=int, default=20, help="timed iterations per measurement (median, >= 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations first (compile happens here)")
    parser.add_argument("--time-budget-s", type=float, default=420.0,
                        help="skip measurements that would not fit in this many seconds (default 420)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (CPU runs; default: torch's)")
    parser.add_argument("--sample-batch", type=int, default=16, help="images per sampling call")
    parser.add_argument("--matmul-n", type=int, default=8192, help="matrix size of the matmul-rate test")
    parser.add_argument("--cudnn-benchmark", action="store_true",
                        help="torch.backends.cudnn.benchmark = True (cuDNN tries its convolution kernels per shape)")
    parser.add_argument("--list-variants", action="store_true", help="print the variants and exit")
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants if v not in ALL_VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {list(ALL_VARIANTS)}")
    if min(args.batch_sizes) < 1 or args.iters < 1 or args.warmup < 1 or args.sample_batch < 1:
        parser.error("--batch-sizes, --iters, --warmup and --sample-batch must be at least 1")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    return args


def quiet_libraries() -> None:
    """Only errors from diffusers and transformers (random-weight models make them chatty)."""
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list_variants:
        for v in ALL_VARIANTS.values():
            print(f"{v.name:26} {v.description}")
        return 0
    os.environ.setdefault("MPLBACKEND", "Agg")
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet_libraries()
    result = run(args)
    print(table(result))
    if args.out:
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
