"""Hidden battery of assignment 01: ``load_pipeline(model_id, device)``.

The student's loader and the reference load the same local model folder (the kit's small model, or the
local folder ``CD_KIT_MODEL`` names when the small model is absent) on the CPU, and on CUDA when a GPU is
visible; the pipelines must agree: class, dtype and device of every component (fp32 on the CPU, fp16 on
CUDA), weights, no safety checker, a DDIM scheduler built from the model's own scheduler config with
"trailing" spacing (4 steps: 999, 749, 499, 249) whose ``alphas_cumprod`` is on the device, and no
deprecated ``torch_dtype`` keyword (diffusers 0.42 takes ``dtype=``).
"""
from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import torch

from autograder.checks._tensors import call

__all__ = ["CHECKS", "DEPENDS", "FORBIDDEN_NAMES", "check_load_pipeline", "model_folder"]

NAME = "load_pipeline"
TRAILING_4 = [999, 749, 499, 249]
COMPONENTS = ("unet", "vae", "text_encoder")


def model_folder() -> str:
    """A local model folder to load offline: the kit's small model, else a local ``CD_KIT_MODEL`` folder."""
    from helpers.config import KitConfig
    from helpers.models import resolve_model

    for setting in ("small", KitConfig.from_environ().model):  # edge: the battery runs in a kernel or a re-check
        try:
            source = resolve_model(setting).source
        except FileNotFoundError:
            continue
        if Path(source).is_dir():
            return source
    raise RuntimeError(
        "The load_pipeline check needs a model folder on disk: restore the kit's small model "
        "(helpers/assets/digits-sd) or set CD_KIT_MODEL to a local diffusers StableDiffusionPipeline folder.")


@contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Loading progress bars write to stderr where ipywidgets is missing, and nbgrader scores a tests cell
    that writes to stderr 0: switch diffusers' and transformers' bars off while the check loads models."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    was = diffusers_logging.is_progress_bar_enabled(), transformers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was[0]:
            diffusers_logging.enable_progress_bar()
        if was[1]:
            transformers_logging.enable_progress_bar()


@lru_cache(maxsize=4)
def _expected_pipe(folder: str, device: str):
    """What the task asks for, built by the battery itself with diffusers (not with the reference solution, which
    the re-check never holds): the pipeline in fp16 on CUDA / fp32 elsewhere, with DDIM "trailing"."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
    with _no_progress_bars():
        pipe = StableDiffusionPipeline.from_pretrained(folder, dtype=dtype, safety_checker=None,
                                                       requires_safety_checker=False).to(device)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    return pipe


def _load(student: Callable, folder: str, device) -> object:
    """Call the student's loader, recording warnings (the deprecated ``torch_dtype`` keyword warns)."""
    with warnings.catch_warnings(record=True) as caught, _no_progress_bars():
        warnings.simplefilter("always")
        pipe = call(student, f"load_pipeline({folder!r}, {device!r})", folder, device)
    deprecated = [str(w.message) for w in caught if "torch_dtype" in str(w.message)]
    assert not deprecated, (
        "load_pipeline passes the deprecated `torch_dtype=` keyword: diffusers 0.42 takes `dtype=` "
        f"(warning: {deprecated[0][:160]})")
    return pipe


def _check_components(pipe, device: torch.device, dtype: torch.dtype) -> None:
    for name in COMPONENTS:
        module = getattr(pipe, name, None)
        assert isinstance(module, torch.nn.Module), f"load_pipeline: the pipeline has no {name}"
        dtypes = {p.dtype for p in module.parameters()}
        devices = {p.device.type for p in module.parameters()}
        assert dtypes == {dtype}, (
            f"load_pipeline({device.type!r}): pipe.{name} has dtype {sorted(map(str, dtypes))}, expected {dtype} "
            "(fp16 on CUDA, fp32 on the CPU: choose it from the `device` argument and pass it as `dtype=`)")
        assert devices == {device.type}, (
            f"load_pipeline({device.type!r}): pipe.{name} is on {sorted(devices)}, expected {device.type} "
            "(move the pipeline with pipe.to(device))")
    assert getattr(pipe, "safety_checker", None) is None, (
        "load_pipeline: the safety checker is on; load with safety_checker=None (and requires_safety_checker=False)")


def _check_scheduler(pipe, ref_pipe, device: torch.device) -> None:
    from diffusers import DDIMScheduler

    sched = pipe.scheduler
    assert type(sched) is DDIMScheduler, (
        f"load_pipeline: pipe.scheduler is a {type(sched).__name__}, expected DDIMScheduler "
        "(swap it in with DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing='trailing'))")
    assert sched.config.timestep_spacing == "trailing", (
        f"load_pipeline: the DDIM scheduler uses timestep_spacing={sched.config.timestep_spacing!r}, "
        "expected 'trailing' (so that a 4-step run starts at t = 999)")
    ref_cfg = {k: v for k, v in ref_pipe.scheduler.config.items() if not k.startswith("_")}
    differ = sorted(k for k, v in ref_cfg.items() if sched.config.get(k) != v)
    assert not differ, (
        f"load_pipeline: the scheduler's {differ} differ from the model's own scheduler config: build it "
        "with DDIMScheduler.from_config(pipe.scheduler.config, ...) rather than from defaults")
    probe = copy.deepcopy(sched)
    probe.set_timesteps(4)
    assert probe.timesteps.tolist() == TRAILING_4, (
        f"load_pipeline: 4 DDIM steps give timesteps {probe.timesteps.tolist()}, expected {TRAILING_4}")
    ab = sched.alphas_cumprod
    assert isinstance(ab, torch.Tensor) and ab.device.type == device.type, (
        f"load_pipeline({device.type!r}): scheduler.alphas_cumprod is on "
        f"{getattr(ab, 'device', type(ab).__name__)}, expected {device.type}: move it with "
        "pipe.scheduler.alphas_cumprod = pipe.scheduler.alphas_cumprod.to(device)")
    assert torch.equal(ab.cpu(), ref_pipe.scheduler.alphas_cumprod.cpu()), (
        "load_pipeline: scheduler.alphas_cumprod differs from the model's noise schedule")


def _check_weights(pipe, ref_pipe) -> None:
    for name in COMPONENTS:
        ours, theirs = getattr(pipe, name).state_dict(), getattr(ref_pipe, name).state_dict()
        assert ours.keys() == theirs.keys(), f"load_pipeline: pipe.{name} is not the model's {name}"
        for key, value in theirs.items():
            assert torch.equal(ours[key].cpu(), value.cpu()), (
                f"load_pipeline: pipe.{name} weight {key} differs from the model in model_id "
                "(load the model you are given, unchanged)")


def check_load_pipeline(student: Callable, ref: dict) -> None:
    """The student's pipeline equals the reference's, on the CPU (str and torch.device) and on CUDA if present."""
    folder = model_folder()
    cases = [("cpu", torch.float32), (torch.device("cpu"), torch.float32)]
    if torch.cuda.is_available():
        cases.append((torch.device("cuda"), torch.float16))
    for device, dtype in cases:
        dev = torch.device(device)
        pipe = _load(student, folder, device)
        assert isinstance(pipe, _pipeline_class()), (
            f"load_pipeline must return a diffusers StableDiffusionPipeline, got {type(pipe).__name__}")
        ref_pipe = _expected_pipe(folder, str(dev))
        _check_components(pipe, dev, dtype)
        _check_scheduler(pipe, ref_pipe, dev)
        _check_weights(pipe, ref_pipe)
        del pipe


def _pipeline_class() -> type:
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline


CHECKS = {NAME: check_load_pipeline}
DEPENDS: dict[str, tuple[str, ...]] = {NAME: ()}
FORBIDDEN_NAMES: dict[str, tuple[str, ...]] = {NAME: ("load_course_pipeline", "use_trailing_ddim")}
