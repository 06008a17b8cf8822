"""Small stand-ins that record how they are used, for testing the students' functions of assignments 04-05.

The notebooks' visible tests and the hidden checks run the loss, the training loop and the samplers on
these instead of a real model: they are fast and deterministic on a CPU, and what they record (the inputs of
every UNet call, whether gradients were on, which ``torch.autocast`` contexts were active, how the
``GradScaler`` was used) shows *how* a function computed its result, not only what it returned.

* :class:`ToyUNet` — an eps-prediction "UNet" with two small parameter vectors, called like diffusers'
  ``UNet2DConditionModel``; its output depends on the sample, the timestep and the text embedding.
* :func:`record_calls` — records the calls of any module (a real UNet too) through forward hooks.
* :func:`track_autocast` / :func:`active_autocast` — which ``torch.autocast`` contexts are open, as
  *requested* (on a machine without CUDA, ``torch.autocast("cuda")`` switches itself off; the request is
  still visible here).
* :func:`track_grad_scaler` — how ``torch.amp.GradScaler`` was created and used.
* :class:`Recorder` — wraps a function and records each call's arguments (bound to a signature) and result.
* :func:`tiny_pipeline` — a ``StableDiffusionPipeline`` with the small model's architecture and random
  weights, optionally with a given UNet.
"""
from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch
import torch.nn as nn

__all__ = ["AutocastState", "UNetCall", "ToyUNet", "record_calls", "track_autocast", "active_autocast",
           "ScalerLog", "track_grad_scaler", "Recorder", "tiny_pipeline"]


# ------------------------------------------------------------------------------------------------ autocast
@dataclass(frozen=True)
class AutocastState:
    """One ``torch.autocast`` context as requested: device type, dtype and the ``enabled`` argument."""

    device_type: str
    dtype: torch.dtype | None
    enabled: bool


_LOCAL = threading.local()


def active_autocast() -> tuple[AutocastState, ...]:
    """The ``torch.autocast`` contexts open right now (outermost first), while :func:`track_autocast` runs;
    an empty tuple otherwise."""
    return tuple(getattr(_LOCAL, "stack", ()))


@contextmanager
def track_autocast() -> Iterator[None]:
    """While active, every ``torch.autocast`` context (also ``torch.amp.autocast`` and the deprecated
    ``torch.cuda.amp.autocast``) is recorded on entry, so that :func:`active_autocast` lists the open ones."""
    cls = torch.amp.autocast_mode.autocast
    orig_init, orig_enter, orig_exit = cls.__init__, cls.__enter__, cls.__exit__

    def __init__(self, device_type, dtype=None, enabled=True, cache_enabled=None):  # noqa: N807
        orig_init(self, device_type, dtype=dtype, enabled=enabled, cache_enabled=cache_enabled)
        self._kit_state = AutocastState(str(device_type), self.fast_dtype, bool(enabled))

    def __enter__(self):  # noqa: N807
        result = orig_enter(self)
        _LOCAL.stack = [*getattr(_LOCAL, "stack", []), getattr(self, "_kit_state", None)]
        return result

    def __exit__(self, *exc):  # noqa: N807
        _LOCAL.stack = getattr(_LOCAL, "stack", [])[:-1]
        return orig_exit(self, *exc)

    cls.__init__, cls.__enter__, cls.__exit__ = __init__, __enter__, __exit__
    _LOCAL.stack = []
    try:
        yield
    finally:
        cls.__init__, cls.__enter__, cls.__exit__ = orig_init, orig_enter, orig_exit
        _LOCAL.stack = []


# ------------------------------------------------------------------------------------------------ UNet calls
@dataclass
class UNetCall:
    """One call of a UNet: its inputs (detached copies), per-sample timesteps, the grad mode, the open
    autocast contexts (see :func:`track_autocast`) and the output."""

    sample: torch.Tensor
    timesteps: torch.Tensor
    encoder_hidden_states: torch.Tensor | None
    grad_enabled: bool
    autocast: tuple[AutocastState, ...]
    output: torch.Tensor


def _per_sample_timesteps(timestep: Any, batch: int, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(timestep, device=device)
    if t.ndim == 0:
        t = t.expand(batch)
    return t.detach().reshape(-1).round().long().clone()


def _unpack(args: tuple, kwargs: dict) -> tuple[torch.Tensor, Any, torch.Tensor | None]:
    names = ("sample", "timestep", "encoder_hidden_states")
    values = {n: a for n, a in zip(names, args)}
    values.update({n: kwargs[n] for n in names if n in kwargs})
    return values["sample"], values["timestep"], values.get("encoder_hidden_states")


def _make_call(args: tuple, kwargs: dict, output: Any) -> UNetCall:
    sample, timestep, ehs = _unpack(args, kwargs)
    out = output.sample if hasattr(output, "sample") else output[0]
    return UNetCall(sample=sample.detach().float().clone(),
                    timesteps=_per_sample_timesteps(timestep, sample.shape[0], sample.device),
                    encoder_hidden_states=None if ehs is None else ehs.detach().float().clone(),
                    grad_enabled=torch.is_grad_enabled(), autocast=active_autocast(),
                    output=out.detach().float().clone())


@contextmanager
def record_calls(module: nn.Module) -> Iterator[list[UNetCall]]:
    """Record every call of ``module`` (a UNet called as ``unet(sample, timestep, encoder_hidden_states)``)
    while the context is open; yields the list the calls are appended to."""
    calls: list[UNetCall] = []
    handle = module.register_forward_hook(
        lambda mod, args, kwargs, output: calls.append(_make_call(args, kwargs, output)), with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


class ToyUNet(nn.Module):
    """A deterministic stand-in for ``UNet2DConditionModel`` (eps prediction), called the same way:
    ``unet(sample, timestep, encoder_hidden_states=..., return_dict=True)`` returns an object with
    ``.sample`` (a tuple with ``return_dict=False``).

    eps = tanh(0.5·w_c·x + t/1000 + mean(text) + b_c) per channel c, computed in fp32 and returned in the
    sample's dtype; ``w`` and ``b`` are trainable. Every call is appended to ``self.calls``.
    """

    def __init__(self, channels: int = 4, sample_size: int = 8, seed: int = 0) -> None:
        super().__init__()
        from diffusers.configuration_utils import FrozenDict

        g = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(1.0 + 0.2 * torch.randn(channels, generator=g))
        self.bias = nn.Parameter(0.2 * torch.randn(channels, generator=g))
        self.config = FrozenDict(in_channels=channels, out_channels=channels, sample_size=sample_size,
                                 time_cond_proj_dim=None)
        self.calls: list[UNetCall] = []

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.weight.device

    def forward(self, sample: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor | None = None,
                *args: Any, return_dict: bool = True, **kwargs: Any):
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        if encoder_hidden_states is None:
            raise TypeError("ToyUNet needs encoder_hidden_states (the text embeddings)")
        t = _per_sample_timesteps(timestep, sample.shape[0], sample.device).float()
        x = sample.float()
        text = encoder_hidden_states.float().mean(dim=tuple(range(1, encoder_hidden_states.ndim)))
        channel = (1, -1) + (1,) * (x.ndim - 2)
        per_sample = (-1,) + (1,) * (x.ndim - 1)
        out = torch.tanh(0.5 * x * self.weight.float().view(channel) + (t / 1000 + text).view(per_sample)
                         + self.bias.float().view(channel)).to(sample.dtype)
        self.calls.append(_make_call((sample, timestep, encoder_hidden_states), {}, (out,)))
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)


# ------------------------------------------------------------------------------------------------ GradScaler
@dataclass
class ScalerLog:
    """How ``torch.amp.GradScaler`` was used while :func:`track_grad_scaler` ran."""

    created: list[dict] = field(default_factory=list)  # {"device": ..., "enabled": ...} per scaler created
    scale: int = 0
    step: int = 0
    update: int = 0
    unscale: int = 0


@contextmanager
def track_grad_scaler() -> Iterator[ScalerLog]:
    """Count the creations and ``scale``/``step``/``update``/``unscale_`` calls of every ``GradScaler``
    (``torch.amp.GradScaler`` and its deprecated ``torch.cuda.amp`` subclass) while the context is open."""
    cls = torch.amp.grad_scaler.GradScaler
    log = ScalerLog()
    originals = {name: getattr(cls, name) for name in ("__init__", "scale", "step", "update", "unscale_")}

    def __init__(self, device="cuda", *args, **kwargs):  # noqa: N807
        originals["__init__"](self, device, *args, **kwargs)
        log.created.append({"device": str(device), "enabled": bool(kwargs.get("enabled", args[4] if len(args) > 4 else True))})

    def counting(name: str, attr: str):
        def wrapper(self, *args, **kwargs):
            setattr(log, attr, getattr(log, attr) + 1)
            return originals[name](self, *args, **kwargs)
        return wrapper

    cls.__init__ = __init__
    cls.scale, cls.step = counting("scale", "scale"), counting("step", "step")
    cls.update, cls.unscale_ = counting("update", "update"), counting("unscale_", "unscale")
    try:
        yield log
    finally:
        for name, fn in originals.items():
            setattr(cls, name, fn)


# ------------------------------------------------------------------------------------------------ functions
class Recorder:
    """Wrap ``fn``; each call's arguments, bound to ``signature`` (``fn``'s own by default) with defaults
    applied, are appended to ``self.calls`` as a dict together with the result under ``"return"`` and the
    grad mode under ``"grad_enabled"``."""

    def __init__(self, fn: Callable, signature: Callable | None = None) -> None:
        self.fn = fn
        self.signature = inspect.signature(signature or fn)
        self.calls: list[dict[str, Any]] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as err:
            raise TypeError(f"called with arguments that do not fit {self.signature}: {err}") from None
        bound.apply_defaults()
        record = dict(bound.arguments)
        record["grad_enabled"] = torch.is_grad_enabled()
        result = self.fn(*args, **kwargs)
        record["return"] = result
        self.calls.append(record)
        return result


# ------------------------------------------------------------------------------------------------ pipeline
@lru_cache(maxsize=1)
def _tiny_parts() -> tuple[Any, Any, Any]:
    from helpers import small_model as sm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tokenizer = sm.build_tokenizer(num_merges=50)
        text_encoder = sm.build_text_encoder(tokenizer).eval().requires_grad_(False)
        vae = sm.build_vae(scaling_factor=0.5).eval().requires_grad_(False)  # != 1: a forgotten scaling shows
    return tokenizer, text_encoder, vae


def tiny_pipeline(unet: nn.Module | None = None):
    """A ``StableDiffusionPipeline`` with the small model's architecture and random weights (text encoder,
    VAE, tokenizer shared between calls; a fresh trailing-DDIM scheduler each call). ``unet`` defaults to a
    random UNet of the small model; pass e.g. a :class:`ToyUNet` (sample_size 16, 4 channels) instead."""
    from helpers import small_model as sm

    tokenizer, text_encoder, vae = _tiny_parts()
    if unet is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            unet = sm.build_unet().eval().requires_grad_(False)
    pipe = sm.assemble_pipeline(vae, text_encoder, tokenizer, unet, sm.build_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe
