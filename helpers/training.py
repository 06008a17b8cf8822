"""Training settings per model and LoRA plumbing (peft) for the consistency students.

The settings of every phase live here, in one place: the original course's recipe for SD1.5 and a recipe
tuned for the kit's small model.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

__all__ = ["SD15_LORA_TARGETS", "TrainSettings", "settings_for", "lora_config"]

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
    gradient_checkpointing: bool = False
    step_size: int = 20  # DDIM grid step of the loss (50-step teacher grid)
    guidance_scale: float = 7.5  # teacher guidance for CD
    huber_c: float = 0.001
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def settings_for(kind: str) -> TrainSettings:
    """Training settings for a model kind: ``"sd15"``/``"custom"`` (the original recipe) or ``"small"``."""
    if kind in ("sd15", "custom"):
        # COCO 5k pairs at 512^2, batch 8 x 2 accumulation, AdamW 1e-4, rank 64, one pass (~312 steps).
        return TrainSettings(batch_size=8, gradient_accumulation_steps=2, learning_rate=1e-4, lora_rank=64,
                             num_images=5000, gradient_checkpointing=True, guidance_scale=7.5)
    if kind == "small":
        # Tuned for the shipped digits model on 2 CPU cores (see docs/reference_run.md).
        return TrainSettings(batch_size=64, gradient_accumulation_steps=1, learning_rate=1e-3, lora_rank=16,
                             max_steps=300, guidance_scale=3.0)
    raise ValueError(f"unknown model kind {kind!r}")


def lora_config(settings: TrainSettings):
    """A peft ``LoraConfig`` for the UNet with the settings' rank and target modules (alpha = rank)."""
    from peft import LoraConfig

    return LoraConfig(r=settings.lora_rank, lora_alpha=settings.lora_rank, init_lora_weights="gaussian",
                      target_modules=list(settings.lora_targets))
