"""Training settings per model and LoRA plumbing (peft) for the consistency students.

The settings of every phase live here, in one place: the original course's recipe for SD1.5 and a recipe
tuned for the kit's small model. A training phase (``ct``, ``cd``, ``multi_cd``) goes:

1. :func:`prepare_unet_for_phase` — the UNet back in fp32 and train mode, base weights frozen, gradient
   checkpointing as the settings say (the original template forgot the fp32 cast and train mode);
2. :func:`add_phase_adapter` — a *new* LoRA adapter for this phase, made the only active one (earlier
   adapters stay in the UNet, switched off, and are never overwritten by accident);
3. :func:`make_optimizer` — a new AdamW over that adapter's weights only; given the phase's number of steps,
   :func:`start_phase` attaches the phase's learning-rate schedule to it (:func:`lr_schedule`: constant, or
   cosine-decayed to 0 over the phase, stepped by an optimizer hook so that any training loop gets it).

:func:`start_phase` does all three. :func:`save_adapter` writes one adapter as a diffusers LoRA folder
(``StableDiffusionPipeline.save_lora_weights`` of the raw peft state dict, rank/alpha/targets in its
metadata, and a model card), which ``pipe.load_lora_weights(folder_or_repo)`` loads exactly;
:func:`load_adapter` reads such folders, diffusers' own LoRA folders, and the kit's earlier single-file
format (:func:`convert_adapter` rewrites those). Not ``convert_state_dict_to_diffusers``: with conv, ff and
time-embedding targets diffusers then drops every attention LoRA on reload (see the kit's stack notes).
"""
from __future__ import annotations

import copy
import json
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from helpers.config import KitConfig
from helpers.device import BIG_GPU_GIB, SMALL_GPU_GIB, gpu_memory_gib, use_expandable_segments

__all__ = ["SD15_LORA_TARGETS", "PROFILES", "PROFILE_ENV_VAR", "TrainSettings", "settings_for", "pick_profile",
           "SharedBaseTeacher", "make_teacher", "load_trained_unet", "lora_config", "run_settings", "num_phase_steps",
           "frozen_copy", "prepare_unet_for_phase", "adapter_names", "add_phase_adapter", "use_adapter",
           "adapters_disabled", "fused_adapters", "trainable_parameters", "make_optimizer", "LR_SCHEDULES",
           "lr_schedule", "start_phase", "save_adapter",
           "load_adapter", "convert_adapter", "model_card", "ADAPTER_FORMAT", "ADAPTER_WEIGHTS", "CARD_TAGS"]

# The 14 module kinds the original course put LoRA on (rank 64).
SD15_LORA_TARGETS: tuple[str, ...] = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
)


@dataclass(frozen=True)
class TrainSettings:
    """Everything a training phase (ct, cd, multi_cd) needs to know."""

    batch_size: int
    gradient_accumulation_steps: int
    learning_rate: float
    lora_rank: int
    lora_targets: tuple[str, ...] = SD15_LORA_TARGETS
    num_images: int | None = None  # images of the training set used (None = all)
    epochs: int = 1
    max_steps: int | None = None  # optimizer steps per phase (None = one pass over the data)
    phase_steps: dict = field(default_factory=dict)  # per-phase overrides of max_steps, e.g. {"multi_cd": 400}
    gradient_checkpointing: bool = False
    # "constant" (the course's recipe) or "cosine": decayed from learning_rate to 0 over the phase's steps
    # (:func:`lr_schedule`, attached by :func:`start_phase` when it is told the number of steps);
    # phase_lr_schedule overrides it per phase, e.g. {"multi_cd": "cosine"}.
    lr_schedule: str = "constant"
    phase_lr_schedule: dict = field(default_factory=dict)
    step_size: int = 20  # DDIM grid step of the loss (50-step teacher grid)
    guidance_scale: float = 7.5  # teacher guidance for CD
    huber_c: float = 0.001
    # "fp32": the frozen base weights in fp32 under fp16 autocast (the course's recipe); "half": the base
    # stays in the pipeline's dtype (fp16 on CUDA). The LoRA weights are trained in fp32 either way.
    student_base: str = "fp32"
    # "separate": a frozen copy of the UNet (fp16 on CUDA) is the teacher; "shared": the student's own base
    # with its adapters switched off (no second UNet in memory).
    teacher: str = "separate"
    profile: str = "course"
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


# Training profiles (docs/benchmarks.md has the measurements behind them):
#   course      the course's recipe: fp32 student base under fp16 autocast, separate fp16 teacher, gradient
#               checkpointing, batch 8 x 2 accumulation.
#   fast        for GPUs with 40 GiB or more (A100, H100, H200): one fp16 frozen base shared by student and teacher,
#               no gradient checkpointing, the recipe's 16 examples per optimizer step as one batch of 16 (no
#               accumulation: half the kernel launches and Python calls per example), fused AdamW.
#   low-memory  for GPUs under 20 GiB (a 16 GB T4): fp16 frozen base shared by student and teacher, gradient
#               checkpointing; SD1.5 at batch 8 peaks at 10.5 GiB (H100, 2026-11-26) instead of 14.5 GiB.
PROFILES = ("course", "fast", "low-memory")
PROFILE_ENV_VAR = KitConfig.env_var("train_profile")


def pick_profile(profile: str | None = None) -> str:
    """The training profile: ``profile`` if given (e.g. ``config.train_profile``, the setting of
    ``$CD_KIT_TRAIN_PROFILE``), else, on a CUDA GPU, ``low-memory`` under 20 GiB and ``fast`` from 40 GiB, and
    ``course`` otherwise (between the two, and on the CPU)."""
    profile = profile or None
    if profile is None:
        gib = gpu_memory_gib()
        profile = ("course" if gib is None else "low-memory" if gib < SMALL_GPU_GIB
                   else "fast" if gib >= BIG_GPU_GIB else "course")
    if profile not in PROFILES:
        raise ValueError(f"Unknown training profile {profile!r}: choose one of {PROFILES} "
                         f"(argument or ${PROFILE_ENV_VAR})")
    return profile


def settings_for(kind: str, profile: str | None = None) -> TrainSettings:
    """Training settings for a model kind: ``"sd15"``/``"custom"`` (the original recipe) or ``"small"``,
    in the training ``profile`` (:func:`pick_profile`)."""
    if kind in ("sd15", "custom"):
        # COCO 5k pairs at 512^2, batch 8 x 2 accumulation, AdamW 1e-4, rank 64, one pass (~312 steps), at a
        # constant learning rate: the original recipe, unchanged (issue 16; the cosine decay was measured on the
        # small model only).
        s = TrainSettings(batch_size=8, gradient_accumulation_steps=2, learning_rate=1e-4, lora_rank=64,
                          num_images=5000, gradient_checkpointing=True, guidance_scale=7.5)
    elif kind == "small":
        # Tuned for the shipped digits model on 2 CPU cores (docs/small_model.md, "The students at guidance
        # 7.5"): guidance 7.5 as the model recommends (its teacher_ddim50 reference uses the same), multi_cd
        # 600 steps with the learning rate cosine-decayed to 0 (+1.8 dB over DDIM-4, 57 % of the FD gap closed).
        # ct/cd keep 150 steps at a constant rate: over 150 CD steps the cosine raised the FD against DDIM-50
        # (0.210 against 0.177; scripts/explore_cd_schedule.py, docs/small_model.md).
        s = TrainSettings(batch_size=32, gradient_accumulation_steps=1, learning_rate=1e-3, lora_rank=16,
                          max_steps=150, phase_steps={"multi_cd": 600}, guidance_scale=7.5,
                          phase_lr_schedule={"multi_cd": "cosine"})
    else:
        raise ValueError(f"unknown model kind {kind!r}: use 'sd15', 'small' or 'custom'")
    chosen = pick_profile(profile)
    if chosen == "low-memory":
        s = replace(s, student_base="half", teacher="shared", gradient_checkpointing=True, profile="low-memory")
    elif chosen == "fast":
        per_step = s.batch_size * s.gradient_accumulation_steps  # the same examples per optimizer step
        s = replace(s, student_base="half", teacher="shared", gradient_checkpointing=False, batch_size=per_step,
                    gradient_accumulation_steps=1, profile="fast")
    return s


def lora_config(settings: TrainSettings):
    """A peft ``LoraConfig`` for the UNet with the settings' rank and target modules (alpha = rank)."""
    from peft import LoraConfig

    return LoraConfig(r=settings.lora_rank, lora_alpha=settings.lora_rank, init_lora_weights="gaussian",
                      target_modules=list(settings.lora_targets))


def run_settings(kind: str, config: KitConfig) -> TrainSettings:
    """:func:`settings_for` in the profile ``config.train_profile``, shrunk for the run mode
    (:meth:`KitConfig.pick <helpers.config.KitConfig.pick>`): a few tiny steps under nbgrader, fewer steps in
    the reduced reference run, the full recipe otherwise."""
    s = settings_for(kind, config.train_profile)
    def shrink(steps):
        return config.pick(steps, reduced_value=max(1, (steps or 200) // 10), grading_value=2)

    return replace(
        s,
        max_steps=shrink(s.max_steps),
        phase_steps={phase: shrink(steps) for phase, steps in s.phase_steps.items()},
        batch_size=config.pick(s.batch_size, grading_value=min(s.batch_size, 8)),
        gradient_accumulation_steps=config.pick(s.gradient_accumulation_steps, grading_value=1),
        num_images=config.pick(s.num_images, reduced_value=min(s.num_images or 512, 512), grading_value=32),
    )


def num_phase_steps(settings: TrainSettings, num_examples: int, phase: str | None = None) -> int:
    """Optimizer steps of one phase: ``phase_steps[phase]`` or ``max_steps`` if set, else ``epochs`` passes
    over ``num_examples`` examples (whole batches only)."""
    if phase is not None and settings.phase_steps.get(phase) is not None:
        return int(settings.phase_steps[phase])
    if settings.max_steps is not None:
        return int(settings.max_steps)
    per_step = settings.batch_size * settings.gradient_accumulation_steps
    steps = settings.epochs * (num_examples // per_step)
    if steps < 1:
        raise ValueError(f"{num_examples} training examples do not fill one optimizer step of {per_step} "
                         "(batch_size x gradient_accumulation_steps): use more images or a smaller batch")
    return steps


# ------------------------------------------------------------------------------------------ the UNets
def frozen_copy(unet: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy of ``unet`` (eval mode, no gradients), e.g. the teacher, taken before any adapter is
    added. It keeps the original's dtype (fp16 on CUDA) and device."""
    if adapter_names(unet):
        raise ValueError(f"This UNet already carries LoRA adapters {adapter_names(unet)}: take the teacher copy "
                         "right after loading the pipeline, before the first training phase.")
    teacher = copy.deepcopy(unet)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


class SharedBaseTeacher(torch.nn.Module):
    """The teacher as the student's own frozen base: calls ``unet`` with all its LoRA adapters switched off,
    so that no second copy of the weights is held (the ``shared`` teacher of :class:`TrainSettings`).
    ``dtype``, ``device``, ``config`` are the UNet's."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.__dict__["_unet"] = unet  # not a submodule: its parameters stay the student's alone

    def forward(self, *args, **kwargs):
        with torch.no_grad(), adapters_disabled(self._unet):
            return self._unet(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.__dict__["_unet"], name)


def make_teacher(unet: torch.nn.Module, settings: TrainSettings) -> torch.nn.Module:
    """The frozen teacher the settings ask for: a separate copy (:func:`frozen_copy`, take it before any
    adapter is added) or the student's own base (:class:`SharedBaseTeacher`)."""
    if settings.teacher == "shared":
        return SharedBaseTeacher(unet)
    if settings.teacher == "separate":
        return frozen_copy(unet)
    raise ValueError(f"settings.teacher must be 'separate' or 'shared', got {settings.teacher!r}")


def prepare_unet_for_phase(unet: torch.nn.Module, settings: TrainSettings) -> torch.nn.Module:
    """Get ``unet`` ready for a training phase: fp32 base weights (the ``course`` profile; mixed precision
    comes from autocast) or the base left in its half precision (``low-memory``), train mode, every base
    weight frozen, gradient checkpointing on or off as ``settings`` say."""
    if settings.student_base == "fp32" and any(p.dtype != torch.float32 for p in unet.parameters()):
        unet.to(dtype=torch.float32)
    unet.train()
    unet.requires_grad_(False)
    if settings.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    elif getattr(unet, "is_gradient_checkpointing", False):
        unet.disable_gradient_checkpointing()
    return unet


def adapter_names(unet: torch.nn.Module) -> list[str]:
    """Names of the LoRA adapters the UNet carries (empty list when none)."""
    return list(getattr(unet, "peft_config", {}) or {})


def add_phase_adapter(unet: torch.nn.Module, name: str, settings: TrainSettings, replace: bool = False) -> None:
    """Add a new LoRA adapter ``name`` (rank and targets from ``settings``) and make it the only active one.

    An adapter of that name that already exists (e.g. a training cell run twice) is a trained adapter: it is
    only replaced, by a fresh one, when ``replace=True``.
    """
    _add_adapter(unet, name, lora_config(settings), replace)


def _add_adapter(unet: torch.nn.Module, name: str, config, replace: bool) -> None:
    if name in adapter_names(unet):
        if not replace:
            raise ValueError(
                f"The UNet already has an adapter {name!r} (trained earlier in this session). Pass replace=True to "
                f"start it afresh, pick another name, or save it first with save_adapter(unet, {name!r}, path).")
        unet.delete_adapters(name)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        unet.add_adapter(config, adapter_name=name)
    use_adapter(unet, name)


def use_adapter(unet: torch.nn.Module, name: str) -> None:
    """Make adapter ``name`` the only active one (its weights trainable, the others frozen and off)."""
    if name not in adapter_names(unet):
        raise ValueError(f"No adapter {name!r} in this UNet; it has {adapter_names(unet)}")
    unet.enable_adapters()
    unet.set_adapter(name)


@contextmanager
def adapters_disabled(unet: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Run the base model (the teacher's weights) inside the context, whatever adapters the UNet carries."""
    if not adapter_names(unet):
        yield unet
        return
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


@contextmanager
def fused_adapters(unet: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Inside the context the UNet's active LoRA adapter is merged into its base weights (peft's ``merge``: one
    matmul per layer instead of three, what ``pipe.fuse_lora()`` does for a user), for sampling only. Afterwards the
    adapter is unmerged and the base weights are restored *exactly* from a copy: unmerging alone would leave
    rounding errors in an fp16 base, which is also the ``shared`` teacher. The copy costs the targeted base
    weights' memory once more (1.7 GiB for SD1.5 in fp16), so the kit fuses on large GPUs only. With the adapters
    switched off (the teacher's calls) or none added, nothing is merged."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in unet.modules()
              if isinstance(m, BaseTunerLayer) and not m.disable_adapters and not m.merged and m.active_adapters]
    saved = [m.get_base_layer().weight.detach().clone() for m in layers]
    try:
        for m in layers:
            m.merge()
        yield unet
    finally:
        with torch.no_grad():
            for m, weight in zip(layers, saved):
                if m.merged:
                    m.unmerge()
                m.get_base_layer().weight.copy_(weight)


def trainable_parameters(unet: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters that require gradients (after :func:`add_phase_adapter`: the active adapter's)."""
    return [p for p in unet.parameters() if p.requires_grad]


def make_optimizer(params, settings: TrainSettings) -> torch.optim.Optimizer:
    """A new AdamW over ``params`` with the settings' learning rate (and ``extra["weight_decay"]``, default
    1e-2 as torch's)."""
    params = list(params)
    if not params:
        raise ValueError("No trainable parameters: add a LoRA adapter first (add_phase_adapter)")
    # On CUDA the fused kernel: one launch for all tensors, and GradScaler hands it the scale and the inf check
    # as tensors (no host sync per step for the unscale).
    fused = all(p.is_cuda and p.is_floating_point() for p in params) or None
    return torch.optim.AdamW(params, lr=settings.learning_rate, fused=fused,
                             weight_decay=float(settings.extra.get("weight_decay", 1e-2)))


def _adapter_in_fp32(unet: torch.nn.Module, name: str) -> None:
    """Adapter ``name``'s LoRA weights in fp32 (peft makes them in the base layer's dtype: fp16 on a half base)."""
    for param_name, param in unet.named_parameters():
        if f".{name}." in param_name:
            param.data = param.data.float()


def _expandable_cuda_segments() -> None:
    """:func:`helpers.device.use_expandable_segments`, with a warning where the allocator lacks the option."""
    if torch.cuda.is_available() and not use_expandable_segments():  # only the peak suffers
        warnings.warn("could not switch on expandable CUDA segments", RuntimeWarning, stacklevel=3)


def _release_cached_memory() -> None:
    """Give the CUDA allocator's cached blocks of the last phase or evaluation back before a new phase, so that
    fragments of one do not add to the peak of the next (what decides an out-of-memory error on a small GPU)."""
    import gc

    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


LR_SCHEDULES = ("constant", "cosine")


def lr_schedule(optimizer: torch.optim.Optimizer, settings: TrainSettings, num_steps: int, phase: str | None = None
                ) -> torch.optim.lr_scheduler.LRScheduler | None:
    """Attach the learning-rate schedule of ``phase`` (``settings.phase_lr_schedule[phase]``, else
    ``settings.lr_schedule``) to ``optimizer``: for ``"cosine"`` a ``LambdaLR`` with factor
    ``(1 + cos(pi k / num_steps)) / 2`` at optimizer step ``k`` (full rate at the first step, close to 0 at the
    last), stepped after every ``optimizer.step()`` by an optimizer hook, so that any training loop gets it
    without a change (``train_loop`` is the student's). A step that GradScaler skips (inf/NaN gradients) does not
    advance it. Returns the scheduler (None for ``"constant"``)."""
    schedule = settings.phase_lr_schedule.get(phase, settings.lr_schedule) if phase else settings.lr_schedule
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
    if schedule == "constant":
        return None
    if num_steps < 1:
        raise ValueError(f"a cosine learning-rate schedule needs the phase's number of steps (>= 1), got {num_steps}")

    def factor(step: int) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * min(step, num_steps) / num_steps))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    optimizer.register_step_post_hook(lambda *_: scheduler.step())
    return scheduler


def start_phase(unet: torch.nn.Module, name: str, settings: TrainSettings, replace: bool = False,
                num_steps: int | None = None) -> torch.optim.Optimizer:
    """Prepare ``unet`` (:func:`prepare_unet_for_phase`), add the phase's new adapter ``name`` and return a
    new optimizer over its weights, with the settings' learning-rate schedule over ``num_steps`` optimizer
    steps (:func:`lr_schedule`; without ``num_steps`` the rate stays constant)."""
    _release_cached_memory()
    if settings.profile == "low-memory":
        _expandable_cuda_segments()
    prepare_unet_for_phase(unet, settings)
    add_phase_adapter(unet, name, settings, replace=replace)
    _adapter_in_fp32(unet, name)
    params = trainable_parameters(unet)
    stray = [n for n, p in unet.named_parameters() if p.requires_grad and f".{name}." not in n]
    if stray:
        raise RuntimeError(f"Parameters outside adapter {name!r} would be trained: {stray[:3]}")
    optimizer = make_optimizer(params, settings)
    if num_steps is not None:
        lr_schedule(optimizer, settings, num_steps, phase=name)
    return optimizer


# ------------------------------------------------------------------------------------------ save / load
# An adapter folder is diffusers' LoRA layout: ``pytorch_lora_weights.safetensors`` (the raw peft keys with
# diffusers' ``unet.`` prefix, the LoRA config as diffusers' adapter metadata) and a model card ``README.md``.
# ``pipe.load_lora_weights(folder_or_repo)`` gives back exactly the trained student. The raw peft keys are
# deliberate: ``convert_state_dict_to_diffusers`` renames only the attention keys, and diffusers then drops
# every attention LoRA on reload when conv, ff and time-embedding modules are targeted too (diffusers issue
# 14548; the kit's stack notes, trap 3).
ADAPTER_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
# The kit's earlier single-file format (raw peft keys, config in the safetensors metadata): still loaded,
# and :func:`convert_adapter` rewrites such a file as an adapter folder.
ADAPTER_FORMAT = "cd-course-kit/peft-lora-v1"
CARD_TAGS = ("lora", "consistency-distillation", "diffusers", "text-to-image", "stable-diffusion")


def _lora_metadata(config) -> dict:
    """A peft ``LoraConfig`` (or its dict) as JSON-ready adapter metadata (sets as sorted lists)."""
    config = config if isinstance(config, dict) else config.to_dict()
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}


def model_card(base_model: str | None, adapter_name: str = "multi_cd", lora: dict | None = None,
               sampler: str | None = None, steps: int | None = None, metrics: dict | None = None,
               repo_id: str | None = None, license_id: str | None = None):
    """The model card (``huggingface_hub.ModelCard``) of an adapter folder: base model, tags (``lora``,
    ``consistency-distillation``, ...), how to load it, the sampler and number of steps to use, the LoRA
    rank/alpha/targets (``lora``: the adapter's config dict) and, when given, the run's ``metrics``
    (``{name: value}`` or ``{sampler: {metric: value}}``). ``repo_id``: where it is published (the loading
    example then names it). A ``base_model`` that is a local folder is named in the text only (the Hub's
    ``base_model`` field takes a Hub id)."""
    from huggingface_hub import ModelCard, ModelCardData

    local_base = base_model is not None and Path(str(base_model)).exists()
    data = ModelCardData(base_model=None if local_base or not base_model else str(base_model),
                         library_name="diffusers", pipeline_tag="text-to-image", tags=list(CARD_TAGS),
                         license=license_id, adapter_name=adapter_name,
                         inference_steps=steps, sampler=sampler)
    shown_base = (f"the local model folder `{Path(str(base_model)).name}`" if local_base
                  else f"[`{base_model}`](https://huggingface.co/{base_model})" if base_model else "its base model")
    where = repo_id or "path/to/this/folder"
    base_id = (f"path/to/{Path(str(base_model)).name}" if local_base else base_model) or "<base model>"
    lines = [f"# Consistency-distilled LoRA of {Path(str(base_model)).name if base_model else 'a Stable Diffusion model'}",
             "",
             f"A LoRA adapter (`{adapter_name}`) for {shown_base}, trained by consistency distillation from the "
             "base model as teacher, so that it makes images in a few steps.",
             "",
             "## How to sample it",
             ""]
    if sampler or steps:
        lines += [f"- Sampler: {sampler or 'see below'}", f"- Steps: {steps if steps is not None else 'see below'}",
                  "- Guidance scale 1 (the teacher's guidance is distilled into the student).", ""]
    lines += ["```python", "from diffusers import StableDiffusionPipeline", "",
              f'pipe = StableDiffusionPipeline.from_pretrained("{base_id}")',
              f'pipe.load_lora_weights("{where}")', "```", ""]
    if lora:
        targets = lora.get("target_modules")
        targets = ", ".join(f"`{t}`" for t in (sorted(targets) if isinstance(targets, (set, list, tuple)) else [targets]))
        lines += ["## LoRA", "", f"rank {lora.get('r')}, alpha {lora.get('lora_alpha')}; target modules: {targets}.",
                  "The rank, alpha and targets are also stored in the weights file's metadata, so "
                  "`load_lora_weights` rebuilds the adapter exactly.", ""]
    if metrics:
        lines += ["## Metrics of the training run", ""]
        nested = all(isinstance(v, dict) for v in metrics.values())
        if nested:
            columns = sorted({k for v in metrics.values() for k in v})
            lines += ["| sampler | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
            lines += [f"| {name} | " + " | ".join(_fmt(v.get(c)) for c in columns) + " |" for name, v in metrics.items()]
        else:
            lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in metrics.items()]
        lines.append("")
    return ModelCard("---\n" + data.to_yaml() + "\n---\n\n" + "\n".join(lines))


def _fmt(value) -> str:
    if value is None:
        return "—"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _write_adapter_folder(folder: Path, overwrite: bool, tensors: dict, metadata: dict, card) -> Path:
    """Write weights and card to a temporary folder next to ``folder``, then move it into place (an existing
    adapter is moved aside first and deleted only once the new one is in place)."""
    import shutil
    import tempfile
    import uuid

    from diffusers import StableDiffusionPipeline

    if folder.suffix == ".safetensors":
        raise ValueError(f"save_adapter writes a folder in diffusers' LoRA layout (weights + README.md): pass a "
                         f"folder such as {folder.with_suffix('')}, not the file name {folder.name!r}")
    if folder.exists() and not overwrite:
        raise FileExistsError(f"{folder} exists already: pass overwrite=True to replace it, or choose another folder")
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder} exists and is not a folder: remove it or choose another folder")
    if not tensors:
        raise RuntimeError("The adapter has no weights to save")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".partial", dir=folder.parent))
    try:
        StableDiffusionPipeline.save_lora_weights(
            tmp, unet_lora_layers={k: v.detach().contiguous().cpu() for k, v in tensors.items()},
            unet_lora_adapter_metadata=metadata, weight_name=ADAPTER_WEIGHTS)
        card.save(tmp / "README.md")
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex[:8]}")
            folder.rename(old)
            try:
                tmp.rename(folder)
            except BaseException:
                old.rename(folder)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def save_adapter(unet: torch.nn.Module, name: str, folder: str | Path, overwrite: bool = False, *,
                 base_model: str | None = None, sampler: str | None = None, steps: int | None = None,
                 metrics: dict | None = None, repo_id: str | None = None) -> Path:
    """Save adapter ``name`` as a diffusers LoRA folder: ``pytorch_lora_weights.safetensors`` written by
    ``StableDiffusionPipeline.save_lora_weights`` (the raw ``get_peft_model_state_dict``, with the rank,
    alpha and target modules as the adapter metadata) and a model card ``README.md`` (:func:`model_card`;
    ``base_model`` defaults to the UNet's ``_name_or_path``). ``pipe.load_lora_weights(folder)`` on the base
    model then gives back exactly this student. Returns the folder.

    An existing folder is kept unless ``overwrite=True``; the new adapter is written to a temporary folder
    first and then moved into place, so an interrupted save never loses or half-writes an adapter.
    """
    from peft import get_peft_model_state_dict

    if name not in adapter_names(unet):
        raise ValueError(f"No adapter {name!r} in this UNet; it has {adapter_names(unet)}")
    metadata = _lora_metadata(unet.peft_config[name])
    base_model = base_model or getattr(unet.config, "_name_or_path", None) or None
    card = model_card(base_model, name, metadata, sampler=sampler, steps=steps, metrics=metrics, repo_id=repo_id)
    return _write_adapter_folder(Path(folder), overwrite, get_peft_model_state_dict(unet, adapter_name=name),
                                 metadata, card)


def _kit_file(path: Path) -> dict | None:
    """The metadata of a file in the kit's earlier single-file format, else None."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    return metadata if metadata.get("format") == ADAPTER_FORMAT else None


def convert_adapter(path: str | Path, folder: str | Path, base_model: str | None = None,
                    overwrite: bool = False) -> Path:
    """Rewrite an adapter file in the kit's earlier format (one ``.safetensors`` file: raw peft keys, the
    LoRA config in its metadata) as an adapter folder of :func:`save_adapter`, which
    ``pipe.load_lora_weights`` loads. Returns the folder."""
    from safetensors.torch import load_file

    path = Path(path)
    metadata = _kit_file(path) if path.is_file() else None
    if metadata is None:
        raise ValueError(f"{path} is not an adapter file of the kit's earlier format ({ADAPTER_FORMAT})")
    config = _lora_metadata(json.loads(metadata["lora_config"]))
    name = metadata.get("adapter_name", "default")
    base_model = base_model or config.get("base_model_name_or_path") or None
    return _write_adapter_folder(Path(folder), overwrite, load_file(str(path)), config,
                                 model_card(base_model, name, config))


def _load_kit_file(unet: torch.nn.Module, path: Path, metadata: dict, name: str | None) -> str:
    """Load a file of the kit's earlier format (see :func:`convert_adapter`)."""
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors.torch import load_file

    name = name or metadata["adapter_name"]
    config = json.loads(metadata["lora_config"])
    known = set(LoraConfig.__dataclass_fields__)
    lora = LoraConfig(**{k: v for k, v in config.items() if k in known and k not in ("peft_type", "task_type")})
    _add_adapter(unet, name, lora, replace=False)
    _adapter_in_fp32(unet, name)  # as it was trained
    device = next(unet.parameters()).device
    result = set_peft_model_state_dict(unet, load_file(str(path), device=str(device)), adapter_name=name)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        unet.delete_adapters(name)
        raise ValueError(f"{path} does not fit this UNet: {len(unexpected)} tensors have no place, e.g. {unexpected[:3]}")
    use_adapter(unet, name)
    return name


def _saved_name(folder: Path) -> str | None:
    """The adapter name recorded in a folder's model card, if any."""
    readme = folder / "README.md"
    if not readme.is_file():
        return None
    from huggingface_hub import ModelCard

    name = ModelCard.load(readme).data.to_dict().get("adapter_name")
    return str(name) if name else None


def _signature(tensors) -> list:
    return sorted((tuple(t.shape), float(t.detach().double().sum())) for t in tensors)


def load_adapter(unet: torch.nn.Module, path: str | Path, name: str | None = None) -> str:
    """Load an adapter into ``unet`` under ``name``, make it the only active one and return its name.

    ``path``: a LoRA folder (or its ``.safetensors`` file) in diffusers' layout, as :func:`save_adapter` and
    diffusers' training scripts (e.g. the LCM-LoRA script) write it, loaded with diffusers' own loader
    (``StableDiffusionPipeline.load_lora_into_unet``, what ``pipe.load_lora_weights`` does for the UNet); or
    a file of the kit's earlier single-file format (loaded, with a warning that says how to convert it).
    ``name`` defaults to the name in the folder's model card (else diffusers' ``default_N``). The LoRA
    weights are fp32 whatever the base's dtype (as trained), and every saved tensor must find its place
    in the UNet, or the adapter is removed again and a ``ValueError`` says so.
    """
    from diffusers import StableDiffusionPipeline
    from peft import get_peft_model_state_dict

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No adapter folder or file at {path}")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"{path} is not a .safetensors file: pass the adapter folder of save_adapter")
        metadata = _kit_file(path)
        if metadata is not None:
            warnings.warn(f"{path} is in the kit's earlier adapter format, which pipe.load_lora_weights cannot load: "
                          f"rewrite it once with training.convert_adapter({str(path)!r}, <folder>)", UserWarning,
                          stacklevel=2)
            return _load_kit_file(unet, path, metadata, name)
    state, alphas, metadata = StableDiffusionPipeline.lora_state_dict(str(path), return_lora_metadata=True)
    unet_tensors = [v for k, v in state.items() if k.startswith("unet.")]
    if not unet_tensors:
        raise ValueError(f"{path} holds no UNet LoRA weights (no keys starting with 'unet.'): not an adapter of "
                         "save_adapter or a diffusers LoRA folder")
    name = name or (_saved_name(path) if path.is_dir() else None)
    if name is not None and name in adapter_names(unet):
        raise ValueError(f"The UNet already has an adapter {name!r}: pass another name=")
    before = set(adapter_names(unet))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet, adapter_name=name, metadata=metadata)
    added = [n for n in adapter_names(unet) if n not in before]
    if len(added) != 1:
        raise ValueError(f"{path}: diffusers loaded no adapter into this UNet (its keys do not fit it)")
    name = added[0]
    if any(p.dtype != torch.float32 for n, p in unet.named_parameters() if f".{name}." in n):
        # diffusers makes the LoRA layers in the base's dtype: back to fp32 and the saved values again.
        _adapter_in_fp32(unet, name)
        StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet, adapter_name=name, metadata=metadata,
                                                    hotswap=True)
    loaded = get_peft_model_state_dict(unet, adapter_name=name)
    if _signature(loaded.values()) != _signature(unet_tensors):
        unet.delete_adapters(name)
        raise ValueError(
            f"{path} does not load into this UNet exactly: of its {len(unet_tensors)} tensors, not all found their "
            "place (a file written through convert_state_dict_to_diffusers with non-attention targets loses its "
            "attention LoRA, diffusers issue 14548; save with training.save_adapter)")
    use_adapter(unet, name)
    return name


def load_trained_unet(source: str | Path, adapter_path: str | Path, device: str | torch.device,
                      dtype: torch.dtype, load_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Rebuild a trained student from its base model folder (or Hub id) and an adapter of :func:`save_adapter`
    (a folder; a file of the kit's earlier format loads too, see :func:`load_adapter`).

    The base UNet is loaded the way :func:`helpers.models.load_course_pipeline` loads it (``load_dtype``,
    default fp16 on CUDA and fp32 on the CPU), then cast to ``dtype``, the student's dtype in training; then
    the adapter is loaded (fp32) and made active. Returns the UNet in eval mode on ``device``.

    Why the detour: on a GPU the course profile trains an fp32 student whose base weights came through the
    pipeline's fp16 load. A base loaded straight in fp32 from the files keeps digits that the trained
    student never had, and its outputs differ by up to about 1e-3.
    """
    from diffusers import UNet2DConditionModel

    from helpers.device import pick_dtype

    dev = torch.device(device)
    unet = UNet2DConditionModel.from_pretrained(str(source), subfolder="unet", dtype=pick_dtype(dev, load_dtype))
    unet = unet.to(dev, dtype)
    load_adapter(unet, adapter_path)
    return unet.eval()
