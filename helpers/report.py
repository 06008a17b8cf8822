"""Where notebooks put their numbers and pictures so the reference run can build its report.

Output folder: ``$CD_KIT_OUT`` if set (the reference run sets it to ``out/reference``), else
``out/interactive`` under the kit root. Under nbgrader (grading) nothing is written.
``metrics.json`` is one JSON object merged across notebooks: ``{"samplers": {name: {...}},
"timings_s": {phase: seconds}, "settings": {...}}``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from helpers import runmode
from helpers.course import KIT_ROOT

__all__ = ["out_dir", "record_sampler", "record_timing", "record_settings", "record", "save_figure",
           "load_metrics"]


def out_dir() -> Path:
    """The folder this run writes to (created on demand)."""
    d = Path(os.environ.get("CD_KIT_OUT") or KIT_ROOT / "out" / "interactive")
    d.mkdir(parents=True, exist_ok=True)
    return d


def load_metrics() -> dict[str, Any]:
    """The current ``metrics.json`` (empty structure when none yet)."""
    path = out_dir() / "metrics.json"
    if path.exists():
        return json.loads(path.read_text())
    return {"samplers": {}, "timings_s": {}, "settings": {}}


def _update(section: str, key: str, value: Any) -> None:
    if runmode.grading():
        return
    data = load_metrics()
    data.setdefault(section, {})[key] = value
    path = out_dir() / "metrics.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    tmp.replace(path)  # atomic: a crash never leaves half a file


def record_sampler(name: str, prompt_accuracy: float, fidelity_psnr_db: float | None, **extra: Any) -> None:
    """Record a sampler's metrics (e.g. ``teacher_ddim50``, ``cd_4``)."""
    _update("samplers", name, {"prompt_accuracy": float(prompt_accuracy),
                               "fidelity_psnr_db": None if fidelity_psnr_db is None else float(fidelity_psnr_db),
                               **extra})


def record_timing(phase: str, seconds: float) -> None:
    """Record the wall time of a phase (e.g. ``train_ct``)."""
    _update("timings_s", phase, round(float(seconds), 3))


def record_settings(name: str, settings: dict[str, Any]) -> None:
    """Record the settings used by a phase."""
    _update("settings", name, settings)


def record(section: str, key: str, value: Any) -> None:
    """Record any JSON-serialisable value under ``section/key``."""
    _update(section, key, value)


def save_figure(fig, filename: str) -> Path | None:
    """Save a matplotlib figure under ``figures/`` of the output folder (skipped under grading)."""
    if runmode.grading():
        return None
    path = out_dir() / "figures" / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path
