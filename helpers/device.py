"""Device and dtype choice: CUDA runs the course in fp16, the CPU in fp32.

fp16 on a CPU works but is 5-9x slower than fp32 (no fast half kernels), so the kit never uses it there.
"""
from __future__ import annotations

import platform
from pathlib import Path

import torch

__all__ = ["pick_device", "pick_dtype", "cpu_name"]

_DTYPES = {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16,
           "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}


def pick_device(override: str | torch.device | None = None) -> torch.device:
    """Return the device the course runs on: ``override`` when given (e.g. ``config.device``, the
    ``CD_KIT_DEVICE`` setting), else CUDA when available, else the CPU.
    """
    choice = override or None
    if choice is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(choice)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"Device {choice!r} was asked for, but PyTorch sees no CUDA GPU here. "
            "Unset CD_KIT_DEVICE (or pass device='cpu') to run on the CPU."
        )
    return device


def pick_dtype(device: str | torch.device, override: str | torch.dtype | None = None) -> torch.dtype:
    """fp16 on CUDA, fp32 anywhere else, unless ``override`` (a dtype or 'fp16'/'bf16'/'fp32') says otherwise."""
    if override is not None:
        if isinstance(override, torch.dtype):
            return override
        try:
            return _DTYPES[override.lower()]
        except KeyError:
            raise ValueError(f"Unknown dtype {override!r}: use one of {sorted(_DTYPES)}") from None
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux, else what ``platform`` knows), for benchmark records."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
