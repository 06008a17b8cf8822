"""Which model the course runs, and loading it.

One setting chooses the model everywhere (notebooks, reference run, tests): the ``model`` field of the
:class:`helpers.config.KitConfig` (environment variable ``CD_KIT_MODEL``), passed to :func:`resolve_model`
and :func:`load_course_pipeline`:

* ``small`` (default): the small SD-architecture teacher trained on digits that the kit ships in
  ``helpers/assets/digits-sd``; works offline, on a laptop CPU.
* ``sd15``: Stable Diffusion 1.5 from the maintained mirror ``stable-diffusion-v1-5/stable-diffusion-v1-5``
  (the old ``runwayml/stable-diffusion-v1-5`` id was removed from the Hub in 2024). Needs the weights in
  the local Hugging Face cache or Hub access, and a GPU to be practical.
* anything else: a Hub id or a local folder holding a diffusers ``StableDiffusionPipeline``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from helpers.config import KitConfig, restore_hint
from helpers.device import SMALL_GPU_GIB, gpu_memory_gib, pick_device, pick_dtype, use_expandable_segments

__all__ = ["SD15_MODEL_ID", "ModelSpec", "resolve_model", "load_course_pipeline", "use_trailing_ddim",
           "describe_setup"]

SD15_MODEL_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
ENV_VAR = KitConfig.env_var("model")


def _small_model_dir() -> Path:
    from helpers.small_model import SMALL_MODEL_DIR

    return Path(SMALL_MODEL_DIR)


@dataclass(frozen=True)
class ModelSpec:
    """A resolved model setting."""

    setting: str  # what the user asked for
    source: str  # Hub id or local folder passed to from_pretrained
    kind: str  # "small", "sd15" or "custom"
    guidance_scale: float  # the guidance the course uses for this model's teacher
    demo_prompt: str
    extra: dict = field(default_factory=dict)


def resolve_model(model: str | None = None) -> ModelSpec:
    """Turn a model setting (``config.model``; ``None`` or empty: ``small``) into a :class:`ModelSpec`."""
    setting = (model or "small").strip()
    key = setting.lower()
    if key in ("small", "digits", "digits-sd"):
        folder = _small_model_dir()
        meta_file = folder / "kit_model.json"
        if not meta_file.exists():
            raise FileNotFoundError(
                f"The kit's small model is missing from {folder}. {restore_hint(folder)}, "
                "or rebuild it with `python -m helpers.commands.train_small_model`."
            )
        meta = json.loads(meta_file.read_text())
        return ModelSpec(setting, str(folder), "small", float(meta.get("recommended_guidance_scale", 3.0)),
                         "a handwritten digit 7", meta)
    if key in ("sd15", "sd1.5", "stable-diffusion-v1-5", SD15_MODEL_ID.lower(), "runwayml/stable-diffusion-v1-5"):
        return ModelSpec(setting, SD15_MODEL_ID, "sd15", 7.5, "A sad puppy with large eyes")
    return ModelSpec(setting, setting, "custom", 7.5, "A sad puppy with large eyes")


def use_trailing_ddim(pipe):
    """Swap the pipeline's scheduler for DDIM with "trailing" timestep spacing (4 steps: 999, 749, 499, 249)
    and put its ``alphas_cumprod`` on the UNet's device, where the course's functions index it."""
    from diffusers import DDIMScheduler

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    pipe.scheduler.alphas_cumprod = pipe.scheduler.alphas_cumprod.to(pipe.unet.device)
    return pipe


def load_course_pipeline(config: KitConfig, device: str | torch.device | None = None,
                         dtype: torch.dtype | str | None = None):
    """Load the teacher pipeline of ``config.model`` with DDIM trailing timesteps, fp16 on CUDA and fp32 on CPU,
    on ``device`` (default: ``config.device``, else CUDA when available).

    This is the loader notebooks 02-05 and the reference run use; assignment 01 asks students to write
    their own. Errors that say what to do: no weights offline, unknown folder.
    """
    from diffusers import StableDiffusionPipeline

    spec = resolve_model(config.model)
    device = pick_device(device if device is not None else config.device)
    dtype = pick_dtype(device, dtype)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            spec.source, dtype=dtype, safety_checker=None, requires_safety_checker=False
        )
    except OSError as err:
        hint = (
            f"Could not load {spec.source!r}. Without Hub access the weights must already be in the local "
            "Hugging Face cache (run `hf download stable-diffusion-v1-5/stable-diffusion-v1-5` on a machine "
            "that can reach the Hub, or point CD_KIT_MODEL at a local folder). "
            f"Set {ENV_VAR}=small to use the kit's offline model."
        )
        raise OSError(hint) from err
    if (gpu_memory_gib(device) or float("inf")) < SMALL_GPU_GIB:
        use_expandable_segments()  # a T4: no fragmented reserved memory from the first allocation on
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return use_trailing_ddim(pipe)


def describe_setup(config: KitConfig) -> str:
    """A one-paragraph summary printed at the top of every notebook: model, device, dtype, run mode."""
    spec = resolve_model(config.model)
    dev = pick_device(config.device)
    return (
        f"Model: {spec.setting!r} -> {spec.source} ({spec.kind}); device: {dev}; dtype: {pick_dtype(dev)}; "
        f"guidance scale: {spec.guidance_scale}; mode: {config.mode}.\n"
        f"Change the model with the environment variable {ENV_VAR} (small | sd15 | <hub id or folder>)."
    )
