#!/usr/bin/env python
"""Where the SD1.5 course's notebooks spend their GPU time: the real phases, the evaluation path, the notebooks.

Offline, on an SD1.5-shaped random-weight pipeline (SD1.5's configs, saved with ``save_pretrained``; random
weights cost the time and memory of the real ones) and a generated image-caption folder. Parts, run in order
within ``--budget-s`` (a part that would not fit is skipped and says so):

* ``phase``: one training phase as notebooks 04/05 run it -- ``load_course_pipeline``, ``run_settings``,
  ``make_teacher``, ``training_dataset`` / ``training_dataloader``, ``start_phase`` and the kit's reference
  ``train_loop`` over ``cm_loss_template`` (from the solution notebooks) -- in a training profile with optional
  overrides. Per optimizer step wall times (median and spread), the same loss on one fixed batch on the GPU
  without accumulation (the benchmark's step, ``scripts/bench_gpu.py``), the data loader alone, peak memory,
  and a ``torch.profiler`` summary of two steps (GPU-busy fraction, kernel launches, top operators).
* ``sample``: the evaluation path of the notebooks (``evaluation.generate`` over ``function_sampler
  (consistency_sampling)``, 4 steps at 512x512 with the trained adapter), images/s per batch size.
* ``notebooks``: notebooks 04 and 05 executed by the reference run in a profile, optionally under a memory cap
  (``torch.cuda.set_per_process_memory_fraction`` in the kernel), with the peak allocated / reserved memory of
  every cell (an IPython startup hook in the kernel) and the notebooks' own phase timings.

    python scripts/profile_course.py --work /tmp/pc --out /tmp/pc/profile.json --plan diagnose
    python scripts/profile_course.py --tiny --device cpu --work /tmp/pc --out /tmp/pc.json --plan tiny  # CPU test

See docs/benchmarks.md ("Notebook-level figures") for the commands behind the recorded figures.
"""
from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")  # the kit's train_loop shows a bar; tqdm reads this at import

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from autograder.reference import reference  # noqa: E402
from helpers import data, evaluation, training  # noqa: E402
from helpers.config import KitConfig  # noqa: E402
from helpers.models import load_course_pipeline, resolve_model  # noqa: E402
from helpers.prompts import empty_prompt_embeds  # noqa: E402

GIB = 2**30


# --- The inputs ---------------------------------------------------------------------------------------------
def build_inputs(work: Path, tiny: bool, images: int, device: torch.device) -> tuple[Path, Path]:
    """An SD1.5-shaped (or tiny) random-weight pipeline folder and a caption folder of ``images`` generated
    pictures under ``work`` (:mod:`helpers.sd15_shaped`, as ``python -m helpers.commands.sd15_shaped`` writes
    them); reused when present."""
    from helpers.sd15_shaped import image_size, model_configs, write_caption_folder, write_pipeline

    model_dir, data_dir = work / ("tiny-sd" if tiny else "sd15-shaped"), work / f"captions-{images}"
    if not (model_dir / "model_index.json").exists():
        write_pipeline(model_dir, "small" if tiny else "full", seed=0, dtype=torch.float16, device=device)
    if not (data_dir / "metadata.csv").exists():
        write_caption_folder(data_dir, images, image_size(model_configs(tiny)), seed=0)
    return model_dir, data_dir


# --- Small utilities ----------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def spread(times: list[float]) -> dict[str, float | int]:
    """Median, quartiles, min and max of per-step seconds."""
    if not times:
        return {"n": 0}
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return {"n": len(times), "median_s": round(statistics.median(times), 4), "q1_s": round(q[0], 4),
            "q3_s": round(q[2], 4), "min_s": round(min(times), 4), "max_s": round(max(times), 4)}


def memory(device: torch.device) -> dict[str, float | None]:
    if device.type != "cuda":
        return {"peak_allocated_gib": None, "peak_reserved_gib": None}
    return {"peak_allocated_gib": round(torch.cuda.max_memory_allocated(device) / GIB, 2),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved(device) / GIB, 2)}


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        torch.compiler.reset()
    except Exception:  # noqa: BLE001 - nothing compiled
        pass


def profiler_summary(fn, device: torch.device, steps: int, folder: Path, name: str) -> dict[str, Any]:
    """Run ``fn()`` (``steps`` optimizer steps) under torch.profiler: wall, summed kernel time, kernel launches,
    and the top operators by GPU and by CPU time (written to ``folder/name-*.txt``)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        fn()
        sync(device)
    wall = time.perf_counter() - t0
    events = prof.key_averages()
    kernel_us = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA)
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel"))
    syncs = {e.key: {"count": e.count, "cpu_ms": round(e.cpu_time_total / 1e3, 1)} for e in events
             if e.key in ("aten::_local_scalar_dense", "aten::item", "cudaStreamSynchronize", "cudaDeviceSynchronize",
                          "cudaMemcpyAsync", "aten::copy_", "aten::to", "aten::_to_copy")}
    folder.mkdir(parents=True, exist_ok=True)
    for sort in ("self_device_time_total", "self_cpu_time_total"):
        try:
            (folder / f"{name}-{sort}.txt").write_text(events.table(sort_by=sort, row_limit=30, max_name_column_width=60))
        except Exception as err:  # noqa: BLE001 - a sort key this torch lacks
            (folder / f"{name}-{sort}.txt").write_text(f"{type(err).__name__}: {err}")
    return {"steps": steps, "wall_s_per_step": round(wall / steps, 4),
            "kernel_s_per_step": round(kernel_us / 1e6 / steps, 4),
            "gpu_busy_fraction": round(kernel_us / 1e6 / wall, 3) if wall else None,
            "kernel_launches_per_step": round(launches / steps), "host_syncs_and_copies": syncs}


# --- One training phase as the notebooks run it -------------------------------------------------------------
@dataclass(frozen=True)
class PhaseCase:
    """One measurement: a phase of the course in a training profile, with optional changes."""

    name: str
    profile: str
    phase: str = "cd"  # ct | cd | multi_cd
    overrides: dict = field(default_factory=dict)  # TrainSettings fields
    steps: int = 20
    warmup: int = 3
    profiled_steps: int = 2
    fixed_batch_steps: int = 10  # the benchmark's step: one batch on the GPU, no accumulation
    cudnn_benchmark: bool = False
    regional_compile: bool = False
    data_on_gpu: bool = False
    foreach_optimizer: bool = False  # AdamW's default (foreach) kernels instead of the kit's fused one on CUDA
    memory_cap_gib: float | None = None
    sample_batches: tuple = ()  # evaluation-path sampling after training: batch sizes
    sample_images: int = 64


def kit_config(model_dir: Path, data_dir: Path, work: Path, profile: str, device: torch.device) -> KitConfig:
    return KitConfig(model=str(model_dir), data=str(data_dir), out=str(work / "kit-out"), train_profile=profile,
                     device=str(device))


def phase_loss(phase: str, pipe, teacher, settings, ref: dict):
    """The notebooks' loss of a phase (cells 'Phase 1/2' of 04 and 'Phase 3' of 05)."""
    scheduler = pipe.scheduler
    if phase == "ct":
        return functools.partial(ref["cm_loss_template"], unet=pipe.unet, scheduler=scheduler, loss_fn=F.mse_loss,
                                 get_boundary_timesteps=torch.zeros_like, get_xs_from_xt=ref["get_xs_from_xt_naive"],
                                 step_size=settings.step_size)
    uncond = empty_prompt_embeds(pipe, settings.batch_size)
    teacher_xs = functools.partial(ref["get_xs_from_xt_with_teacher"], teacher_unet=teacher,
                                   guidance_scale=settings.guidance_scale, uncond_prompt_embeds=uncond)
    boundary = (functools.partial(ref["get_multi_boundary_timesteps"], num_boundaries=4) if phase == "multi_cd"
                else torch.zeros_like)
    return functools.partial(ref["cm_loss_template"], unet=pipe.unet, scheduler=scheduler,
                             loss_fn=functools.partial(ref["pseudo_huber_loss"], c=settings.huber_c),
                             get_boundary_timesteps=boundary, get_xs_from_xt=teacher_xs, step_size=settings.step_size)


def gpu_loader(dataset, batch_size: int, device: torch.device):
    """The training set on the GPU, batches gathered by index (same shuffling as training_dataloader)."""
    tensors = [t.to(device) for t in dataset.tensors]
    gen = torch.Generator().manual_seed(0)

    class Loader:
        def __iter__(self):
            order = torch.randperm(len(tensors[0]), generator=gen)
            for i in range(0, len(order) - batch_size + 1, batch_size):
                idx = order[i:i + batch_size].to(device)
                yield tuple(t[idx].float() for t in tensors)

    return Loader()


def run_phase(case: PhaseCase, model_dir: Path, data_dir: Path, work: Path, device: torch.device) -> dict[str, Any]:
    release(device)
    if case.memory_cap_gib and device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        index = torch.cuda.current_device() if device.index is None else device.index  # torch wants an index
        torch.cuda.set_per_process_memory_fraction(min(1.0, case.memory_cap_gib * GIB / total), index)
    torch.backends.cudnn.benchmark = case.cudnn_benchmark
    ref = {n: reference(n) for n in ("cm_loss_template", "train_loop", "get_xs_from_xt_naive", "pseudo_huber_loss",
                                     "get_xs_from_xt_with_teacher", "get_multi_boundary_timesteps",
                                     "consistency_sampling")}
    config = kit_config(model_dir, data_dir, work, case.profile, device)
    spec = resolve_model(config.model)
    t0 = time.perf_counter()
    pipe = load_course_pipeline(config)
    settings = replace(training.run_settings(spec.kind, config), **case.overrides)
    teacher = training.make_teacher(pipe.unet, settings)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    dataset = data.training_dataset(pipe, spec, settings, config)
    encode_s = time.perf_counter() - t0
    loader = (gpu_loader(dataset, settings.batch_size, device) if case.data_on_gpu
              else data.training_dataloader(dataset, settings.batch_size))
    out: dict[str, Any] = {"case": {k: v for k, v in asdict(case).items()}, "settings": settings.as_dict(),
                           "pipeline_load_s": round(load_s, 2), "dataset_s": round(encode_s, 2),
                           "num_pairs": len(dataset)}
    # the data loader alone: next batch + the loop's .to(device), synchronised
    it, times = iter(loader), []
    for _ in range(min(20, len(dataset) // settings.batch_size)):
        sync(device)
        t = time.perf_counter()
        _ = [x.to(device) for x in next(it)]
        sync(device)
        times.append(time.perf_counter() - t)
    out["loader_batch"] = spread(times)
    optimizer = training.start_phase(pipe.unet, case.phase, settings)
    if case.foreach_optimizer:
        optimizer = torch.optim.AdamW(training.trainable_parameters(pipe.unet), lr=settings.learning_rate,
                                      weight_decay=1e-2)
    out["optimizer"] = {"type": type(optimizer).__name__, "fused": bool(optimizer.defaults.get("fused"))}
    if case.regional_compile:
        torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
        pipe.unet.compile_repeated_blocks()
    loss = phase_loss(case.phase, pipe, teacher, settings, ref)
    stamps: list[float] = []

    def timed_loss(*batch):
        stamps.append(time.perf_counter())
        return loss(*batch)

    accum = settings.gradient_accumulation_steps

    def train(n: int) -> list[float]:
        stamps.clear()
        losses = ref["train_loop"](pipe.unet, optimizer, loader, timed_loss, num_steps=n,
                                   gradient_accumulation_steps=accum)
        sync(device)
        ends = stamps[::accum] + [time.perf_counter()]
        out.setdefault("losses", []).extend(round(v, 5) for v in losses[-3:])
        return [b - a for a, b in zip(ends, ends[1:])]

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    warm = train(case.warmup)
    out["warmup_steps_s"] = [round(t, 3) for t in warm]
    out["warmup_wall_s"] = round(time.perf_counter() - t0, 2)
    steady = train(case.steps)
    out["step"] = spread(steady)
    out["images_per_s"] = round(settings.batch_size * accum / statistics.median(steady), 2)
    out["memory_training"] = memory(device)
    if case.profiled_steps:
        try:
            out["profiler"] = profiler_summary(lambda: train(case.profiled_steps), device, case.profiled_steps,
                                               work / "profiles", f"{case.name}")
        except Exception as err:  # noqa: BLE001 - no CUPTI, say: the timings above still count
            out["profiler"] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
    if case.fixed_batch_steps:  # the benchmark's step: the same batch every micro-step, already on the GPU
        batch = [x.to(device) for x in next(iter(loader))]
        fixed: list[float] = []

        def fixed_loss(*b):
            fixed.append(time.perf_counter())
            return loss(*b)

        ref["train_loop"](pipe.unet, optimizer, [batch], fixed_loss, num_steps=2, gradient_accumulation_steps=1)
        fixed.clear()
        ref["train_loop"](pipe.unet, optimizer, [batch], fixed_loss, num_steps=case.fixed_batch_steps,
                          gradient_accumulation_steps=1)
        sync(device)
        fixed.append(time.perf_counter())
        out["fixed_batch_micro_step"] = spread([b - a for a, b in zip(fixed, fixed[1:])])
    pipe.unet.eval()
    if case.sample_batches:
        try:
            out["sampling"] = sample_eval_path(pipe, ref["consistency_sampling"], case, device)
        except Exception as err:  # noqa: BLE001 - e.g. out of memory at a large batch
            out["sampling_error"] = f"{type(err).__name__}: {str(err)[:300]}"
    out["memory_all"] = memory(device)
    del pipe, teacher, optimizer, loader, dataset
    if case.memory_cap_gib and device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(1.0, index)
    return out


def sample_eval_path(pipe, consistency_sampling, case: PhaseCase, device: torch.device) -> list[dict[str, Any]]:
    """Images/s of the notebooks' evaluation path (evaluation.generate of the student's 4-step sampler)."""
    results = []
    eval_set = evaluation.make_eval_set(pipe, per_digit=max(1, case.sample_images // 10))
    sampler = evaluation.function_sampler(consistency_sampling, pipe, num_inference_steps=4)
    for batch in case.sample_batches:  # the kit's sampler decodes outside autocast (vae_decode_outside_autocast)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        evaluation.generate(sampler, replace(eval_set, prompts=eval_set.prompts[:batch],
                                             latents=eval_set.latents[:batch], digits=eval_set.digits[:batch]),
                            batch, progress=False)  # warm-up (kernel choice, caches)
        _, seconds = evaluation.generate(sampler, eval_set, batch, progress=False)
        results.append({"batch": batch, "images": len(eval_set), "images_per_s": round(len(eval_set) / seconds, 2),
                        **memory(device)})
    return results


# --- The evaluation path, variant by variant ----------------------------------------------------------------
EVAL_VARIANTS: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("kit", (16, 32, 64)),
    ("cudnn", (32,)),
    ("vae-cl", (32,)),
    ("cudnn+vae-cl", (32,)),
    ("cudnn+lora-fp16", (32,)),
    ("cudnn+fused", (32, 64, 128)),
    ("cudnn+fused+compile-vae", (64,)),
    ("cudnn+compile-vae", (32,)),
    ("cudnn+compile-vae+regional-unet", (32,)),
    ("cudnn+compile-vae+compile-unet", (32,)),
)


@contextmanager
def eval_variant(pipe, name: str):
    """The evaluation path with changes, each undone afterwards: ``cudnn`` autotuning, the VAE in channels_last
    (``vae-cl``), the LoRA weights in fp16 while sampling (``lora-fp16``, fp32 values restored), the adapter merged
    into the base (``fused``, peft's merge / unmerge), ``torch.compile`` of the VAE decoder (``compile-vae``), of the
    UNet's repeated transformer blocks (``regional-unet``, diffusers' ``compile_repeated_blocks``) or of the whole
    UNet (``compile-unet``)."""

    parts = set(name.split("+")) - {"kit"}
    unet, vae = pipe.unet, pipe.vae
    undo = []
    torch.backends.cudnn.benchmark = "cudnn" in parts
    if "vae-cl" in parts:
        vae.to(memory_format=torch.channels_last)
        undo.append(lambda: vae.to(memory_format=torch.contiguous_format))
    if "lora-fp16" in parts:
        saved = {n: q.data for n, q in unet.named_parameters() if "lora_" in n}
        for n, q in unet.named_parameters():
            if n in saved:
                q.data = q.data.half()
        def restore():
            for n, q in unet.named_parameters():
                if n in saved:
                    q.data = saved[n]
        undo.append(restore)
    if "fused" in parts:  # the kit's own merge, base restored exactly (the session then finds nothing left to merge)
        fused = training.fused_adapters(unet)
        fused.__enter__()
        undo.append(lambda: fused.__exit__(None, None, None))
    compiled = []
    if "compile-vae" in parts:
        compiled.append(vae.decoder)
    if "regional-unet" in parts:
        compiled += [m for m in unet.modules() if m.__class__.__name__ in unet._repeated_blocks]
    if "compile-unet" in parts:
        compiled.append(unet)
    if compiled:
        torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
    for m in compiled:
        m.compile()
    undo.append(lambda: [setattr(m, "_compiled_call_impl", None) for m in compiled])
    try:
        yield
    finally:
        for fn in reversed(undo):
            fn()
        torch.backends.cudnn.benchmark = False
        try:
            torch.compiler.reset()
        except Exception:  # noqa: BLE001
            pass


def eval_variants(model_dir: Path, data_dir: Path, work: Path, device: torch.device, tiny: bool,
                  only: list[str] | None = None, images: int = 128) -> dict[str, Any]:
    """4-step ``consistency_sampling`` through ``evaluation.generate`` (the notebooks' evaluation path) with a
    rank-64 adapter, in the ``fast`` profile, for each of :data:`EVAL_VARIANTS`: the first call apart (cuDNN
    autotuning, compilation), then ``images`` images timed; images/s and peak memory."""
    release(device)
    config = kit_config(model_dir, data_dir, work, "fast", device)
    spec = resolve_model(config.model)
    pipe = load_course_pipeline(config)
    settings = training.run_settings(spec.kind, config)
    training.start_phase(pipe.unet, "cd", settings)
    pipe.unet.eval()
    sampler = evaluation.function_sampler(reference("consistency_sampling"), pipe, num_inference_steps=4)
    full = evaluation.make_eval_set(pipe, per_digit=max(1, -(-images // 10)))  # at least ``images`` images
    out: dict[str, Any] = {"images": images, "variants": []}
    for name, batches in EVAL_VARIANTS:
        if only and name not in only:
            continue
        for batch in batches if not tiny else (2,):
            n = min(len(full), max(batch, images // batch * batch)) if not tiny else 4
            eval_set = replace(full, prompts=full.prompts[:n], latents=full.latents[:n],
                               digits=full.digits[:n] if full.digits is not None else None)
            first = replace(eval_set, prompts=eval_set.prompts[:batch], latents=eval_set.latents[:batch],
                            digits=eval_set.digits[:batch] if eval_set.digits is not None else None)
            rec: dict[str, Any] = {"variant": name, "batch": batch, "images": len(eval_set.prompts)}
            try:
                with eval_variant(pipe, name):
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    t = time.perf_counter()
                    evaluation.generate(sampler, first, batch, progress=False)
                    sync(device)
                    rec["first_call_s"] = round(time.perf_counter() - t, 2)
                    _, seconds = evaluation.generate(sampler, eval_set, batch, progress=False)
                    rec.update(seconds=round(seconds, 3), images_per_s=round(len(eval_set.prompts) / seconds, 2),
                               **memory(device))
            except Exception as err:  # noqa: BLE001 - one failing variant must not lose the others
                rec["error"] = f"{type(err).__name__}: {str(err)[:300]}"
            out["variants"].append(rec)
            print(f"    eval {name} b{batch}: {rec.get('images_per_s')} img/s, first call {rec.get('first_call_s')} s "
                  f"{rec.get('error', '')}", flush=True)
    del pipe
    return out


# --- Compiling the evaluation: what it costs once and what it saves per image -------------------------------
#: Runs of ``eval_compile``: a mode of ``CD_KIT_EVAL_COMPILE``, ``cold`` (an empty inductor cache) or ``warm`` (the
#: cache the cold run of that mode left, as a second notebook or a re-run finds it), the student's batch size. Each
#: runs in its own process (a cold dynamo).
EVAL_COMPILE_RUNS: tuple[tuple[str, str, int], ...] = (
    ("off", "cold", 64), ("vae", "cold", 64), ("vae", "warm", 64), ("all", "cold", 64), ("all", "warm", 64),
    ("all", "warm", 128))


def eval_compile_sizes(tiny: bool) -> tuple[int, int]:
    """Prompts of the student's and of the teacher's run in :func:`eval_compile_child`."""
    return (4, 2) if tiny else (384, 128)


def eval_compile_child(mode: str, model_dir: Path, data_dir: Path, work: Path, device: torch.device,
                       student_images: int, teacher_images: int, batch: int) -> dict[str, Any]:
    """In this process: the kit's evaluation (``evaluation.generate`` in a ``sampling_session``) compiled as
    ``mode`` says -- the student's 4-step ``consistency_sampling`` with a rank-64 adapter (``fast`` profile) over
    ``student_images`` caption prompts, the same again (a second sampler of the same shapes), then the teacher's
    guided 4-step DDIM (adapters disabled) over ``teacher_images``; per run the first batch (autotuning and
    compilation), the later batches' images/s and the wall time."""
    t_start = time.perf_counter()
    config = kit_config(model_dir, data_dir, work, "fast", device).replace(eval_compile=mode)
    spec = resolve_model(config.model)
    pipe = load_course_pipeline(config)
    settings = training.run_settings(spec.kind, config)
    training.start_phase(pipe.unet, "cd", settings)
    pipe.unet.eval()
    ready_s = time.perf_counter() - t_start
    student = evaluation.function_sampler(reference("consistency_sampling"), pipe, num_inference_steps=4)
    teacher = evaluation.pipeline_sampler(pipe, 4, settings.guidance_scale)
    runs = []
    for name, sampler, n in (("student", student, student_images), ("student-again", student, student_images),
                             ("teacher-ddim4-cfg", teacher, teacher_images)):
        eval_set = evaluation.make_eval_set(pipe, spec, config.replace(eval_images=n))
        timing: dict[str, Any] = {}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with training.adapters_disabled(pipe.unet) if name.startswith("teacher") else nullcontext():
            _, seconds = evaluation.generate(sampler, eval_set, batch, config=config, progress=False, timing=timing)
        runs.append({"sampler": name, "images": len(eval_set), "seconds": round(seconds, 2),
                     "images_per_s": round(len(eval_set) / seconds, 2), **timing, **memory(device)})
        print(f"      {mode} {name}: {runs[-1]['images_per_s']} img/s overall, steady "
              f"{timing.get('steady_images_per_s')}, first batch {timing.get('first_batch_s')} s", flush=True)
    return {"mode": mode, "ready_s": round(ready_s, 1), "runs": runs,
            "process_wall_s": round(time.perf_counter() - t_start, 1)}


def eval_compile(model_dir: Path, data_dir: Path, work: Path, device: torch.device, tiny: bool,
                 runs: tuple[tuple[str, str, int], ...] = EVAL_COMPILE_RUNS, budget_s: float = 400.0) -> dict[str, Any]:
    """:data:`EVAL_COMPILE_RUNS`, each in a child process (a cold dynamo; ``TORCHINDUCTOR_CACHE_DIR`` per mode,
    emptied for ``cold``); a run that would start with under 60 s of ``budget_s`` left is skipped."""
    import shutil

    student, teacher = eval_compile_sizes(tiny)
    out: dict[str, Any] = {"student_images": student, "teacher_images": teacher, "runs": []}
    start = time.perf_counter()
    for mode, cache, batch in runs:
        batch = 2 if tiny else batch
        left = budget_s - (time.perf_counter() - start)
        if left < 60 and not tiny:
            out["runs"].append({"mode": mode, "cache": cache, "batch": batch, "status": f"skipped: {left:.0f} s left"})
            continue
        cache_dir = work / f"inductor-{mode}"
        if cache == "cold":
            shutil.rmtree(cache_dir, ignore_errors=True)
        child_out = work / f"eval-compile-{mode}-{cache}-{batch}.json"
        child_out.unlink(missing_ok=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--work", str(work), "--out", str(child_out),
               "--child-eval-compile", mode, "--child-batch", str(batch), "--device", str(device)] + (
                   ["--tiny"] if tiny else [])
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache_dir)}
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=max(30.0, left - 5))
            rec = json.loads(child_out.read_text()) if child_out.exists() else {
                "status": f"error: rc {proc.returncode}", "stderr_tail": proc.stderr[-2000:]}
            print(proc.stdout[-1500:], end="", flush=True)
        except subprocess.TimeoutExpired:
            rec = {"status": f"timeout after {left - 5:.0f} s"}
        rec.update(cache=cache, mode=mode, batch=batch, child_wall_s=round(time.perf_counter() - t0, 1))
        out["runs"].append(rec)
    return out


def vae_decode(model_dir: Path, device: torch.device, tiny: bool) -> dict[str, Any]:
    """The VAE decode of the evaluation alone: seconds per call and peak memory at batch 8 and 16, in its own
    fp16 and under fp16 autocast (what the evaluation did before ``vae_decode_outside_autocast``), with and
    without cuDNN autotuning."""
    from diffusers import AutoencoderKL

    release(device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae", dtype=dtype).to(device)
    size = 8 if tiny else 64
    out: dict[str, Any] = {}
    for batch in (8, 16):
        z = torch.randn(batch, 4, size, size, device=device, dtype=dtype)
        for cudnn in (False, True):
            torch.backends.cudnn.benchmark = cudnn
            for autocast in (False, True):
                def decode():
                    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16,
                                                                enabled=autocast and device.type == "cuda"):
                        vae.decode(z)
                decode()
                decode()
                release(device)
                times = []
                for _ in range(10):
                    sync(device)
                    t = time.perf_counter()
                    decode()
                    sync(device)
                    times.append(time.perf_counter() - t)
                key = f"batch{batch}-{'autocast' if autocast else 'fp16'}-{'cudnn_benchmark' if cudnn else 'default'}"
                out[key] = {**spread(times), "images_per_s": round(batch / statistics.median(times), 1),
                            **memory(device)}
    torch.backends.cudnn.benchmark = False
    return out


# --- The notebooks ------------------------------------------------------------------------------------------
KERNEL_HOOK = '''\
import json, os, time
import torch
_cap = os.environ.get("PROFILE_COURSE_CAP_GIB")
if _cap and torch.cuda.is_available():
    _total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, float(_cap) * 2**30 / _total), 0)
_log, _count, _t = os.environ["PROFILE_COURSE_MEMLOG"], [0], [time.perf_counter()]
def _pre(info):
    _t[0] = time.perf_counter()
def _post(result):
    _count[0] += 1
    rec = {"notebook": os.path.basename(os.getcwd()), "cell": _count[0], "s": round(time.perf_counter() - _t[0], 2),
           "first_line": (result.info.raw_cell.strip().splitlines() or [""])[0][:70]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rec.update(allocated_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                   reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2))
        torch.cuda.reset_peak_memory_stats()
    with open(_log, "a") as f:
        f.write(json.dumps(rec) + "\\n")
get_ipython().events.register("pre_run_cell", _pre)
get_ipython().events.register("post_run_cell", _post)
'''


def run_notebooks(profile: str, model_dir: Path, data_dir: Path, work: Path, reduced: bool, cap_gib: float | None,
                  timeout_s: float, only: str = "04,05", extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    """Notebooks 04 and 05 through the reference run, with the per-cell memory hook in the kernels (and
    ``extra_env``, e.g. a kit setting, in their environment)."""
    tag = f"nb-{profile}-{'reduced' if reduced else 'full'}" + (f"-cap{cap_gib:g}" if cap_gib else "")
    ipython = work / tag / "ipython"
    (ipython / "profile_default" / "startup").mkdir(parents=True, exist_ok=True)
    (ipython / "profile_default" / "startup" / "00-memory.py").write_text(KERNEL_HOOK)
    memlog = work / tag / "cells.jsonl"
    memlog.unlink(missing_ok=True)
    env = {**os.environ, "IPYTHONDIR": str(ipython), "PROFILE_COURSE_MEMLOG": str(memlog),
           "CD_KIT_DATA": str(data_dir), "CD_KIT_TRAIN_PROFILE": profile, "TQDM_DISABLE": "1", **(extra_env or {})}
    env.pop("CD_KIT_REDUCED", None)
    if cap_gib:
        env["PROFILE_COURSE_CAP_GIB"] = str(cap_gib)
    out_dir = work / tag / "run"
    cmd = [sys.executable, "-m", "helpers.commands.reference_run", "--model", str(model_dir), "--out", str(out_dir),
           "--only", only] + (["--reduced"] if reduced else [])
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as err:  # keep what the cells logged: where the time went
        def text(b):
            return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")
        proc = subprocess.CompletedProcess(cmd, returncode=f"timeout after {timeout_s:.0f} s",
                                           stdout=text(err.stdout), stderr=text(err.stderr))
    wall = time.perf_counter() - t0
    metrics = json.loads((out_dir / "metrics.json").read_text()) if (out_dir / "metrics.json").exists() else {}
    cells = [json.loads(line) for line in memlog.read_text().splitlines()] if memlog.exists() else []
    per_notebook: dict[str, dict[str, Any]] = {}
    for c in cells:
        nb = per_notebook.setdefault(c["notebook"], {"peak_allocated_gib": 0.0, "peak_reserved_gib": 0.0})
        if c.get("reserved_gib", 0) >= nb["peak_reserved_gib"]:
            nb["peak_reserved_cell"] = c["first_line"]
        nb["peak_allocated_gib"] = max(nb["peak_allocated_gib"], c.get("allocated_gib", 0))
        nb["peak_reserved_gib"] = max(nb["peak_reserved_gib"], c.get("reserved_gib", 0))
    timings = metrics.get("timings_s", {})
    settings = metrics.get("settings", {}).get("training", {})
    steps = settings.get("num_steps")
    train = {k: v for k, v in timings.items() if k.startswith("train_")}
    return {"profile": profile, "reduced": reduced, "cap_gib": cap_gib, "returncode": proc.returncode, "wall_s": round(wall, 1),
            "notebooks": metrics.get("notebooks"), "timings_s": timings, "num_steps_per_phase": steps,
            "seconds_per_step": {k: round(v / steps, 4) for k, v in train.items()} if steps else None,
            "per_notebook_memory": per_notebook, "cells": cells,
            "samplers": {k: {kk: v.get(kk) for kk in ("seconds", "images", "steps", "timing")}
                         for k, v in metrics.get("samplers", {}).items()},
            "stdout_tail": proc.stdout[-1500:], "stderr_tail": proc.stderr[-1500:]}


# --- Plans --------------------------------------------------------------------------------------------------
def plan(name: str) -> list[tuple[str, Any, float]]:
    """``(kind, case or notebook arguments, estimated seconds on an H200)`` in run order."""
    if name == "tiny":
        return [("phase", PhaseCase("course", "course", steps=3, warmup=1, profiled_steps=1, fixed_batch_steps=2,
                                    sample_batches=(4,), sample_images=10), 5),
                ("phase", PhaseCase("fast-ct", "fast", phase="ct", steps=3, warmup=1, profiled_steps=0,
                                    fixed_batch_steps=0, data_on_gpu=True), 5),
                ("phase", PhaseCase("fast-multi", "fast", phase="multi_cd", steps=2, warmup=1, profiled_steps=0,
                                    fixed_batch_steps=0, foreach_optimizer=True), 5),
                ("vae", None, 5),
                ("eval", None, 10),
                ("notebooks", {"profile": "low-memory", "reduced": True, "cap_gib": None}, 60)]
    if name == "diagnose":
        return [
            ("phase", PhaseCase("course", "course", steps=12, sample_batches=(8,)), 45),
            ("phase", PhaseCase("fast", "fast", steps=20, sample_batches=(8, 16, 32)), 40),
            ("phase", PhaseCase("low-memory", "low-memory", steps=12, memory_cap_gib=14.5), 40),
            ("vae", None, 25),
            ("phase", PhaseCase("fast-foreach", "fast", steps=12, profiled_steps=0, fixed_batch_steps=0,
                                foreach_optimizer=True), 15),
            ("phase", PhaseCase("fast-8x2", "fast", steps=12, profiled_steps=0, fixed_batch_steps=0,
                                overrides={"batch_size": 8, "gradient_accumulation_steps": 2}), 20),
            ("phase", PhaseCase("fast-cudnn-gpudata", "fast", steps=12, profiled_steps=0, fixed_batch_steps=0,
                                cudnn_benchmark=True, data_on_gpu=True, sample_batches=(32,)), 30),
            ("phase", PhaseCase("fast-ct", "fast", phase="ct", steps=12, profiled_steps=0, fixed_batch_steps=0), 15),
            ("notebooks", {"profile": "low-memory", "reduced": True, "cap_gib": 14.5}, 170),
            ("phase", PhaseCase("fast-regional-compile", "fast", steps=12, warmup=4, profiled_steps=1,
                                fixed_batch_steps=0, regional_compile=True), 150),
        ]
    if name == "eval":  # a T4 rehearsal of 04 and 05, then the evaluation path's variants
        return [("notebooks", {"profile": "low-memory", "reduced": True, "cap_gib": 14.5}, 170),
                ("eval", None, 200)]
    if name == "course":  # the course profile's notebook-level memory, then the evaluation at larger batches
        return [("notebooks", {"profile": "course", "reduced": True, "cap_gib": None}, 200),
                ("eval", None, 120)]
    if name == "compile":  # the evaluation compiled: cost and gain (docs/benchmarks.md, "Compiling the evaluation")
        return [("compile", None, 360),
                ("phase", PhaseCase("fast", "fast", steps=30, profiled_steps=0, fixed_batch_steps=0), 45),
                ("phase", PhaseCase("fast-regional-compile", "fast", steps=30, warmup=4, profiled_steps=0,
                                    fixed_batch_steps=0, regional_compile=True), 110)]
    if name == "compile-all":  # the VAE and the whole UNet compiled; training's regional compile cold, then warm
        regional = PhaseCase("fast-regional-compile", "fast", steps=30, warmup=4, profiled_steps=0,
                             fixed_batch_steps=0, regional_compile=True)
        return [("compile", (("all", "cold", 64), ("all", "warm", 64), ("all", "warm", 128)), 330),
                ("phase", regional, 110), ("phase", replace(regional, name="fast-regional-compile-warm"), 80)]
    if name == "final-compile":  # notebook 05 with the evaluation compiled (CD_KIT_EVAL_COMPILE=all)
        return [("notebooks", {"profile": "fast", "reduced": False, "cap_gib": None, "only": "05",
                               "env": {"CD_KIT_EVAL_COMPILE": "all"}}, 300)]
    if name == "final":
        return [("notebooks", {"profile": "fast", "reduced": False, "cap_gib": None}, 260),
                ("notebooks", {"profile": "low-memory", "reduced": True, "cap_gib": 14.5, "only": "05"}, 80)]
    raise ValueError(f"unknown plan {name!r}: tiny, diagnose, eval, course, compile, compile-all, final or final-compile")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True, help="folder for the pipeline, captions, runs, profiles")
    p.add_argument("--out", type=Path, required=True, help="JSON written after every part")
    p.add_argument("--plan", default="diagnose", help="tiny | diagnose | eval | course | compile | compile-all | final | final-compile")
    p.add_argument("--eval-variants", nargs="*", default=None, help="names of EVAL_VARIANTS to run (default: all)")
    p.add_argument("--only", nargs="*", default=None, help="names of the plan's parts to run (default: all)")
    p.add_argument("--tiny", action="store_true", help="the tiny pipeline (CPU tests)")
    p.add_argument("--images", type=int, default=1600, help="generated training images (1600 = 100 steps of 16)")
    p.add_argument("--device", default=None, help="cuda | cpu (default: CUDA when available)")
    p.add_argument("--budget-s", type=float, default=420.0, help="skip parts that would not fit in this many seconds")
    p.add_argument("--child-eval-compile", default=None, help=argparse.SUPPRESS)  # one run of eval_compile
    p.add_argument("--child-batch", type=int, default=64, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_eval_compile:
        device = torch.device(args.device)
        model_dir, data_dir = build_inputs(args.work, args.tiny, args.images, device)
        student, teacher = eval_compile_sizes(args.tiny)
        rec = eval_compile_child(args.child_eval_compile, model_dir, data_dir, args.work, device, student, teacher,
                                 args.child_batch)
        args.out.write_text(json.dumps({"status": "ok", **rec}, indent=1, default=str))
        return 0
    start = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    args.work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"command": " ".join(sys.argv), "device": str(device), "torch": torch.__version__,
                              "diffusers": diffusers.__version__,
                              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "parts": []}
    t0 = time.perf_counter()
    model_dir, data_dir = build_inputs(args.work, args.tiny, args.images, device)
    result["build_s"] = round(time.perf_counter() - t0, 1)
    print(f"[{time.perf_counter() - start:5.0f} s] inputs ready: {model_dir}, {data_dir}", flush=True)
    for kind, what, estimate in plan(args.plan):
        name = (what.name if kind == "phase" else "vae-decode" if kind == "vae" else "eval-variants" if kind == "eval"
                else "eval-compile" if kind == "compile" else f"notebooks-{what['profile']}")
        if args.only and name not in args.only:
            continue
        left = args.budget_s - (time.perf_counter() - start)
        if left < estimate:
            result["parts"].append({"part": name, "status": f"skipped: {left:.0f} s left, about {estimate} s needed"})
            print(f"[{time.perf_counter() - start:5.0f} s] {name}: skipped", flush=True)
            continue
        t0 = time.perf_counter()
        try:
            if kind == "phase":
                rec = run_phase(what, model_dir, data_dir, args.work, device)
            elif kind == "vae":
                rec = {"decode": vae_decode(model_dir, device, args.tiny)}
            elif kind == "eval":
                rec = eval_variants(model_dir, data_dir, args.work, device, args.tiny, args.eval_variants)
            elif kind == "compile":
                rec = eval_compile(model_dir, data_dir, args.work, device, args.tiny, runs=what or EVAL_COMPILE_RUNS,
                                   budget_s=min(estimate, left - 10))
            else:
                rec = run_notebooks(what["profile"], model_dir, data_dir, args.work, what["reduced"], what["cap_gib"],
                                    timeout_s=max(30.0, left - 10), only=what.get("only", "04,05"),
                                    extra_env=what.get("env"))
            rec = {"part": name, "status": "ok", **rec}
        except Exception as err:  # one failing part must not lose the others
            import traceback

            rec = {"part": name, "status": f"error: {type(err).__name__}: {str(err)[:300]}",
                   "traceback": traceback.format_exc()[-3000:]}
            if device.type == "cuda":
                rec.update(memory(device))
        rec["part_wall_s"] = round(time.perf_counter() - t0, 1)
        result["parts"].append(rec)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1, default=str))
        print(f"[{time.perf_counter() - start:5.0f} s] {name}: {summary_line(rec)}", flush=True)
    result["elapsed_s"] = round(time.perf_counter() - start, 1)
    args.out.write_text(json.dumps(result, indent=1, default=str))
    return 0


def summary_line(rec: dict[str, Any]) -> str:
    """One line per part for the log."""
    if rec["status"] != "ok":
        return rec["status"]
    if "runs" in rec and "student_images" in rec:
        return " ".join(f"{r['mode']}/{r['cache']}:" + ",".join(
            f"{x['sampler']}={x.get('steady_images_per_s')}(first {x.get('first_batch_s')}s)" for x in r.get("runs", []))
            + f" b{r.get('batch')} wall {r.get('child_wall_s')}s" for r in rec["runs"])
    if "variants" in rec:
        return " ".join(f"{v['variant']}@{v['batch']}={v.get('images_per_s', v.get('error'))}" for v in rec["variants"])
    if "decode" in rec:
        return " ".join(f"{k}={v['images_per_s']}img/s,{v['peak_allocated_gib']}GiB" for k, v in rec["decode"].items())
    if "step" in rec:
        prof = rec.get("profiler") or {}
        fixed = rec.get("fixed_batch_micro_step", {}).get("median_s")
        samp = " ".join(f"b{s['batch']}={s['images_per_s']}"
                        for s in rec.get("sampling", []))
        return (f"step median {rec['step'].get('median_s')} s [{rec['step'].get('q1_s')}-{rec['step'].get('q3_s')}] "
                f"({rec['images_per_s']} img/s), warmup {rec['warmup_steps_s']}, fixed-batch micro {fixed}, "
                f"loader {rec['loader_batch'].get('median_s')} s, gpu busy {prof.get('gpu_busy_fraction')}, "
                f"launches/step {prof.get('kernel_launches_per_step')}, mem {rec['memory_training']} "
                f"| sampling img/s {samp}")
    return (f"rc {rec['returncode']} wall {rec['wall_s']} s, notebooks {rec['notebooks']}, "
            f"s/step {rec['seconds_per_step']}, memory {rec['per_notebook_memory']}")


if __name__ == "__main__":
    sys.exit(main())
