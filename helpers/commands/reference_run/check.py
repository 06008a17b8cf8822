"""Checking a reference run: is what the notebooks recorded in ``metrics.json`` consistent?"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from helpers.metrics import psnr_db

__all__ = ["EXPECTED_SAMPLERS", "REFERENCE", "FEW_STEP", "psnr_cap_db", "gap_closed", "check_metrics"]

#: The samplers a complete run must record (helpers.report.record_sampler), teachers first.
EXPECTED_SAMPLERS: tuple[str, ...] = ("teacher_ddim50", "teacher_ddim4", "ct_4", "cd_4", "multi_cd_4_pipe",
                                      "multi_cd_4_matched")
REFERENCE, FEW_STEP = "teacher_ddim50", "teacher_ddim4"


def _number(value: Any) -> float | None:
    """``value`` as a finite float, or None when it is not one (None, NaN, inf, a string...)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def psnr_cap_db() -> float:
    """The PSNR that :func:`helpers.metrics.psnr_db` gives for identical images (its cap)."""
    x = torch.zeros(1, 3, 2, 2)
    return psnr_db(x, x)


def gap_closed(samplers: dict[str, dict]) -> dict[str, float | None]:
    """For each sampler, the share of the teacher's 4-step -> 50-step prompt-accuracy gap it closes:
    ``(acc - acc[teacher_ddim4]) / (acc[teacher_ddim50] - acc[teacher_ddim4])`` (None when undefined:
    a teacher missing, or the 4-step teacher at least as accurate as the 50-step one: no gap to close)."""
    acc = {name: _number(m.get("prompt_accuracy")) for name, m in samplers.items()}
    lo, hi = acc.get(FEW_STEP), acc.get(REFERENCE)
    if lo is None or hi is None or hi - lo < 1e-9:
        return {name: None for name in samplers}
    return {name: None if a is None else (a - lo) / (hi - lo) for name, a in acc.items()}


#: The distances every sampler of a digits run has (the digit classifier's feature space); the reference has
#: no against-teacher ones.
DIGIT_DISTANCES: tuple[str, ...] = ("fd_real", "kid_real", "fd_teacher", "kid_teacher")


def _metric_problems(name: str, m: dict[str, Any]) -> list[str]:
    """Problems with a sampler's ``metrics`` (helpers.evaluation.SamplerRecord): each a finite number (or skipped,
    saying why) that says how many images it used; distances >= 0 (FD) or finite (KID, unbiased: may dip below 0);
    CLIP score in [0, 100]; on a digits run (prompt accuracy recorded) the digit-feature distances present."""
    problems: list[str] = []
    metrics: dict[str, dict] = m.get("metrics") or {}
    for key, entry in metrics.items():
        value = _number(entry.get("value"))
        if entry.get("value") is None:
            if not entry.get("skipped"):
                problems.append(f"{name}: metric {key} has no value and no reason it was skipped")
            continue
        if value is None or (key.startswith("fd_") and value < 0) or (key == "clip_score" and not 0 <= value <= 100):
            problems.append(f"{name}: metric {key} = {entry.get('value')!r} is out of range")
        if not isinstance(entry.get("images"), int) or entry["images"] < 2:
            problems.append(f"{name}: metric {key} does not say how many images it used (>= 2)")
        if key.startswith(("fd_", "kid_", "clip")) and not entry.get("network"):
            problems.append(f"{name}: metric {key} does not name the network that judged the images")
    if name == REFERENCE and any(k.endswith("_teacher") and not k.startswith("psnr") for k in metrics):
        problems.append(f"{REFERENCE}: has distances against itself ({sorted(metrics)})")
    if "prompt_accuracy" in m and "metrics" in m:
        wanted = [k for k in DIGIT_DISTANCES if name != REFERENCE or not k.endswith("_teacher")]
        missing = [k for k in wanted if _number((metrics.get(k) or {}).get("value")) is None]
        if missing:
            problems.append(f"{name}: the digit-feature distances {missing} are missing")
    return problems


def check_metrics(data: dict[str, Any], complete: bool, cap_db: float | None = None,
                  figures: Sequence[Path] = ()) -> list[str]:
    """Problems with a run's ``metrics.json`` content (empty list = consistent).

    Every recorded sampler: prompt accuracy (when recorded: digits runs) in [0, 1], its ``metrics`` consistent
    (:func:`_metric_problems`), fidelity (PSNR in dB against ``teacher_ddim50``)
    finite, in [0, ``cap_db``]; ``teacher_ddim50`` against itself exactly ``cap_db`` and nobody else at the
    cap; timings finite and >= 0. When ``complete`` (every notebook of the course ran): every expected
    sampler present and at least one figure saved.
    """
    problems: list[str] = []
    samplers: dict[str, dict] = data.get("samplers") or {}
    if complete:
        missing = [s for s in EXPECTED_SAMPLERS if s not in samplers]
        if missing:
            problems.append(f"samplers missing from metrics.json: {missing} (every notebook ran, so one of them "
                            "should have called record_sampler for each)")
        if not figures:
            problems.append("no figures were saved (notebooks save grids and loss curves with save_figure)")
    for name, m in samplers.items():
        acc = _number(m.get("prompt_accuracy"))
        if "prompt_accuracy" in m and (acc is None or not 0.0 <= acc <= 1.0):
            problems.append(f"{name}: prompt_accuracy {m.get('prompt_accuracy')!r} is not a number in [0, 1]")
        problems += _metric_problems(name, m)
        psnr = _number(m.get("fidelity_psnr_db"))
        if psnr is None or psnr < 0 or (cap_db is not None and psnr > cap_db + 1e-6):
            problems.append(f"{name}: fidelity_psnr_db {m.get('fidelity_psnr_db')!r} is not a finite PSNR in "
                            f"[0, {cap_db if cap_db is not None else 'inf'}] dB")
        elif cap_db is not None and name == REFERENCE and abs(psnr - cap_db) > 1e-6:
            problems.append(f"{REFERENCE}: fidelity against itself is {psnr} dB, expected the cap {cap_db} dB "
                            "(was it compared with images from other noise?)")
        elif cap_db is not None and name != REFERENCE and abs(psnr - cap_db) <= 1e-6:
            problems.append(f"{name}: fidelity equals the cap {cap_db} dB, i.e. identical to {REFERENCE} "
                            "(was it compared with itself?)")
    for phase, seconds in (data.get("timings_s") or {}).items():
        if _number(seconds) is None or seconds < 0:
            problems.append(f"timing {phase!r} = {seconds!r} is not a duration in seconds")
    return problems
