"""Device and dtype choice: CUDA runs the course in fp16, the CPU in fp32.

fp16 on a CPU works but is 5-9x slower than fp32 (no fast half kernels), so the kit never uses it there.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

__all__ = ["pick_device", "pick_dtype", "cpu_name", "gpu_memory_gib", "SMALL_GPU_GIB", "BIG_GPU_GIB",
           "use_expandable_segments", "busy_cores", "cpu_threads_env"]

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


# What the kit sizes for: under 20 GiB a T4-class card (the ``low-memory`` profile, VAE slicing, small batches);
# from 40 GiB an A100/H100/H200-class card (the ``fast`` profile, larger evaluation batches).
SMALL_GPU_GIB = 20.0
BIG_GPU_GIB = 40.0


def gpu_memory_gib(device: str | torch.device | None = None) -> float | None:
    """The GPU memory this process may use, in GiB: the card's total memory, or less where PyTorch was capped with
    ``torch.cuda.set_per_process_memory_fraction`` (a shared card; a T4 rehearsed on a big GPU). ``None`` without
    CUDA or for a non-CUDA ``device``. Profiles and batch sizes are chosen from this, not from the card's size."""
    if not torch.cuda.is_available():
        return None
    cuda = torch.device("cuda" if device is None else device)
    if cuda.type != "cuda":
        return None
    index = cuda.index if cuda.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)  # torch >= 2.7
    fraction = float(get_fraction(index)) if get_fraction is not None else 1.0
    return total * min(1.0, fraction) / 2**30


def use_expandable_segments() -> bool:
    """Let the CUDA caching allocator grow its segments instead of keeping fixed blocks (PyTorch's
    ``expandable_segments``): on a small GPU the fragments left between differently sized tensors (encoding, the
    phases, the evaluation) otherwise push the *reserved* memory, which decides an out-of-memory error, towards
    the card's limit. Takes effect for allocations from now on; ``False`` where the allocator lacks the option."""
    if not torch.cuda.is_available():
        return False
    try:
        torch.cuda.memory._set_allocator_settings("expandable_segments:True")
    except (AttributeError, RuntimeError):
        return False
    return True


THREAD_VARIABLES = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
BUSY_CORES_FOR_ONE_THREAD = 0.5


def busy_cores(interval_s: float = 0.5) -> float | None:
    """How many cores other processes keep busy right now: the non-idle share of ``/proc/stat``'s CPU time over
    ``interval_s``, times the number of cores. ``None`` where ``/proc/stat`` does not exist (not Linux)."""
    import time

    def sample() -> tuple[int, int] | None:
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        except (OSError, ValueError, IndexError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields), idle

    first = sample()
    if first is None:
        return None
    time.sleep(interval_s)
    second = sample()
    total, idle = second[0] - first[0], second[1] - first[1]
    return (os.cpu_count() or 1) * (total - idle) / total if total > 0 else 0.0


def cpu_threads_env(env: dict[str, str], busy: float | None = None) -> dict[str, str]:
    """``env`` for a process that runs the course's PyTorch work on a CPU (a kernel of the reference run or of
    JupyterLab), chosen for the load the cores carry when it starts (``busy``: :func:`busy_cores`):

    * on a quiet machine nothing changes: PyTorch's OpenMP threads, one per core, spinning while they wait;
    * when other processes keep at least half a core busy, ``OMP_NUM_THREADS=1``: spinning threads then fight the
      other load. Measured on the 2-core machine (``scripts/bench_omp.py``, docs/bench/omp_wait_policy.json),
      30 LoRA training steps of the small model: quiet 6.7 s (default), 8.6 s (one thread), 14.5 s
      (``OMP_WAIT_POLICY=PASSIVE``); beside two busy processes 26.5 s, 15.7 s, 18.6 s.

    A variable the user set (``OMP_NUM_THREADS``, ``OMP_WAIT_POLICY``, ``GOMP_SPINCOUNT``) is kept as it is."""
    if any(name in env for name in THREAD_VARIABLES):
        return dict(env)
    busy = busy_cores() if busy is None else busy
    if busy is not None and busy >= BUSY_CORES_FOR_ONE_THREAD:
        return {**env, "OMP_NUM_THREADS": "1"}
    return dict(env)


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux, else what ``platform`` knows), for benchmark records."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
