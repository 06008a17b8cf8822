"""The reference's answers on a battery's inputs, recorded by the trusted grader, so that the isolated re-check
can compare a student's function with them without ever holding the reference.

A hidden battery compares the student's function with ``ref[name]`` on inputs drawn from a seeded generator
(``CD_KIT_CHECK_SEED`` is fixed while grading). The grader's worker runs the battery once with the reference
in both places and records, for every call of ``ref[name]``, a *digest* of the inputs and the value returned: the
**tape** (:func:`record_tape`). The re-check child, forked from a server that never loaded the reference, runs
the same battery on the student's function; its ``ref[name]`` is a :class:`Replay` that asks the fork server for
the next recorded value, which the server hands out one at a time and only after the student's function has
returned (``autograder/forkserver.py``). Inputs that differ from the recorded ones end the check.

Values cross process boundaries as ``torch.save`` bytes, from the trusted side to the untrusted side only.
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from helpers.config import KitConfig
from helpers.notebook_functions import source_functions

__all__ = ["Entry", "digest", "Recorder", "record_tape", "TapeStore", "encode", "decode", "close_enough", "Replay",
           "TapeDiverged", "TapeRefused", "seed_like_recheck"]


@dataclass(frozen=True)
class Entry:
    """One call of the reference during the recorded run: the digest of its inputs and its value (encoded)."""

    digest: str
    value: str  # base64 of torch.save bytes


class TapeDiverged(BaseException):
    """The battery called the reference with other inputs than in the recorded run (a BaseException, so that a
    battery's ``except Exception`` cannot swallow it)."""


class TapeRefused(BaseException):
    """The fork server refused a value: asked for before the student's function returned, out of order, or none
    was recorded (``args``: message, kind ``"order"`` or ``"unavailable"``)."""


def _describe(value: Any, out: list[str], depth: int = 0) -> None:
    if depth > 4:
        out.append("...")
        return
    if isinstance(value, torch.Tensor):
        out.append(f"T{tuple(value.shape)}{value.dtype}{value.device.type}")
        if not value.is_floating_point() and not value.is_complex() and value.numel() <= 4096:
            out.append(hashlib.sha1(value.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:12])
    elif isinstance(value, (bool, int, str, type(None))):
        out.append(repr(value))
    elif isinstance(value, float):
        out.append(f"{value:.6g}")
    elif isinstance(value, (list, tuple)):
        out.append(f"{type(value).__name__}[")
        for item in value:
            _describe(item, out, depth + 1)
        out.append("]")
    elif isinstance(value, dict):
        out.append("{")
        for key in sorted(value, key=str):
            out.append(f"{key}:")
            _describe(value[key], out, depth + 1)
        out.append("}")
    else:  # schedulers, toy UNets, pipelines: their type (their state comes from the same seeded battery)
        out.append(type(value).__qualname__)


def digest(args: tuple, kwargs: dict) -> str:
    """A short fingerprint of a call's inputs: types, shapes, dtypes, devices and the exact values of integer
    tensors and Python scalars (float tensors by shape only: their values come from the seeded generator)."""
    parts: list[str] = []
    _describe(list(args), parts)
    _describe(dict(kwargs), parts)
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:16]


def encode(value: Any) -> str:
    buf = io.BytesIO()
    torch.save(value, buf)
    return base64.b64encode(buf.getvalue()).decode()


def decode(text: str) -> Any:
    """Tensors, numbers and containers of them only (``weights_only``): safe on data a student's code wrote."""
    return torch.load(io.BytesIO(base64.b64decode(text)), weights_only=True)


def close_enough(out: Any, expected: Any) -> bool:
    """The grader's own comparison of a committed answer with a recorded value: as loose as the loosest battery
    (fp32: rtol 1e-3, atol 1e-4; half precision: rtol 2e-2, atol 5e-2; integers and other values exactly), so it
    never fails an answer the battery accepts, and a made-up answer fails it."""
    if isinstance(expected, torch.Tensor):
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(expected.shape):
            return False
        if expected.is_floating_point():
            rtol, atol = (1e-3, 1e-4) if expected.dtype in (torch.float32, torch.float64) else (2e-2, 5e-2)
            return bool(torch.allclose(out.detach().double().cpu(), expected.double().cpu(), rtol=rtol, atol=atol))
        return bool(torch.equal(out.detach().cpu().long(), expected.cpu().long()))
    numbers = (int, float)
    if (isinstance(expected, numbers) and isinstance(out, numbers) and not isinstance(expected, bool)
            and not isinstance(out, bool)):
        return math.isclose(out, expected, rel_tol=1e-3, abs_tol=1e-4)
    if isinstance(expected, (list, tuple)):
        return (isinstance(out, (list, tuple)) and len(out) == len(expected)
                and all(close_enough(a, b) for a, b in zip(out, expected)))
    return type(out) is type(expected) and out == expected


class Recorder:
    """Stands for ``ref[name]`` in the recorded run: calls the reference and keeps every (digest, value)."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self.entries: list[Entry] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        value = self.fn(*args, **kwargs)
        self.entries.append(Entry(digest(args, kwargs), encode(value)))
        return value


def seed_like_recheck() -> None:
    """The random state a re-check child starts from (``autograder.sandbox.recheck_in_child``)."""
    random.seed(0)
    torch.manual_seed(0)
    try:
        import numpy  # lazy: numpy is optional for a course variant's batteries

        numpy.random.seed(0)
    except ImportError:
        pass


def record_tape(function: str, check: Callable, depends: tuple[str, ...], source_dir: str | Path) -> list[Entry]:
    """Run ``check`` with the reference of ``function`` as the student and record every call of ``ref[function]``.
    Raises ``AssertionError`` when the reference fails its own battery (a broken course, not a student's fault)."""
    # lazy: the re-check child imports this module for Replay and must never load the references' module
    from autograder.reference import graded_namespace, reference_in

    reference = reference_in(function, source_dir)
    ref = graded_namespace(function, depends, source_dir)
    recorder = Recorder(reference)
    ref[function] = recorder
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    state = random.getstate()
    with torch.random.fork_rng(devices=devices):
        seed_like_recheck()
        try:  # the reference's own progress bars and prints are not the grader's output
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                check(reference, ref)
        finally:
            random.setstate(state)
    return recorder.entries


#: The batteries' seed while grading (``CD_KIT_CHECK_SEED`` unless it is set): the recorded run and the re-check
#: must draw the same inputs.
DEFAULT_CHECK_SEED = 20241125


@contextlib.contextmanager
def fixed_check_seed(seed: int):
    """Set ``CD_KIT_CHECK_SEED`` (the batteries read it through ``KitConfig``) for the recorded run only."""
    variable = KitConfig.env_var("check_seed")
    before = os.environ.get(variable)
    os.environ[variable] = str(seed)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(variable, None)
        else:
            os.environ[variable] = before


class TapeStore:
    """Tapes of one course, recorded on first use and kept in memory (and in ``cache_dir`` when given, so that
    the workers of one grading run share them). Lives in the trusted grader process only."""

    def __init__(self, source_dir: str | Path, checks: dict[str, Callable], depends: dict[str, tuple[str, ...]],
                 cache_dir: str | Path | None = None, seed: int = DEFAULT_CHECK_SEED):
        self.source_dir = str(Path(source_dir).resolve())
        self.seed = seed
        self.checks, self.depends = checks, depends
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self._tapes: dict[str, list[Entry]] = {}

    def graded_functions(self) -> list[str]:
        """The functions with both a hidden battery and a reference answer cell in the source notebooks."""
        answers = source_functions(self.source_dir)
        return [f for f in sorted(self.checks) if f in answers]

    def record_all(self, functions: list[str] | None = None) -> dict[str, float]:
        """Record (or load) the tape of each of ``functions`` (default :meth:`graded_functions`) now, before any
        submission runs (a kernel runs with the grader's user id and could change the solution files later);
        return the seconds each took."""
        seconds = {}
        for function in functions if functions is not None else self.graded_functions():
            started = time.monotonic()
            self.get(function)
            seconds[function] = round(time.monotonic() - started, 3)
        return seconds

    def get(self, function: str) -> list[Entry]:
        if function not in self._tapes:
            self._tapes[function] = self._load(function)
        return self._tapes[function]

    def _load(self, function: str) -> list[Entry]:
        import json  # lazy: only the disk cache needs it

        path = self.cache_dir / f"{function}.json" if self.cache_dir else None
        if path is not None and path.is_file():
            return [Entry(d, v) for d, v in json.loads(path.read_text())]
        with fixed_check_seed(self.seed):
            entries = record_tape(function, self.checks[function], self.depends.get(function, ()), self.source_dir)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{id(self)}.tmp")
            tmp.write_text(json.dumps([[e.digest, e.value] for e in entries]))
            tmp.replace(path)
        return entries


class Replay:
    """Stands for ``ref[name]`` in the re-check child: each call asks ``fetch(index, digest)`` for the recorded
    value (the fork server answers, or refuses), checks the inputs match, and returns the value."""

    def __init__(self, fetch: Callable[[int, str], str]):
        self._fetch = fetch
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        index = self.calls
        self.calls += 1
        return decode(self._fetch(index, digest(args, kwargs)))
