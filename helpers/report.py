"""Where notebooks put their numbers and pictures so the reference run can build its report.

Output folder: ``config.out_path`` of the :class:`helpers.config.KitConfig` passed in (``$CD_KIT_OUT`` if set;
the reference run sets it to ``out/reference``), else ``out/interactive`` under the kit root in a checkout or
under the working directory for an installed kit (:func:`helpers.config.default_out_path`). Under nbgrader
(``config.grading``) nothing is written.
``metrics.json`` is one JSON object merged across notebooks: ``{"samplers": {name: {...}},
"timings_s": {phase: seconds}, "settings": {...}}``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from helpers.config import KitConfig

__all__ = ["out_dir", "record_sampler", "record_timing", "record_settings", "record", "save_figure",
           "load_metrics"]


def out_dir(config: KitConfig) -> Path:
    """The folder this run writes to, ``config.out_path`` (created on demand)."""
    d = config.out_path
    d.mkdir(parents=True, exist_ok=True)
    return d


def load_metrics(config: KitConfig) -> dict[str, Any]:
    """The current ``metrics.json`` (empty structure when none yet)."""
    path = out_dir(config) / "metrics.json"
    if path.exists():
        return json.loads(path.read_text())
    return {"samplers": {}, "timings_s": {}, "settings": {}}


def _update(config: KitConfig, section: str, key: str, value: Any) -> None:
    if config.grading:
        return
    data = load_metrics(config)
    data.setdefault(section, {})[key] = value
    path = out_dir(config) / "metrics.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    tmp.replace(path)  # atomic: a crash never leaves half a file


def record_sampler(name: str, prompt_accuracy: float | None, fidelity_psnr_db: float | None, config: KitConfig,
                   **extra: Any) -> None:
    """Record a sampler's metrics (e.g. ``teacher_ddim50``, ``cd_4``); ``prompt_accuracy`` None (a model not
    asked for digits) leaves it out. :func:`helpers.evaluation.evaluate` passes its whole
    :class:`helpers.evaluation.SamplerRecord` (``steps``, ``seconds``, ``images``, ``metrics``) in ``extra``."""
    accuracy = {} if prompt_accuracy is None else {"prompt_accuracy": float(prompt_accuracy)}
    _update(config, "samplers", name, {**accuracy,
                                       "fidelity_psnr_db": None if fidelity_psnr_db is None else float(fidelity_psnr_db),
                                       **extra})


def record_timing(phase: str, seconds: float, config: KitConfig) -> None:
    """Record the wall time of a phase (e.g. ``train_ct``)."""
    _update(config, "timings_s", phase, round(float(seconds), 3))


def record_settings(name: str, settings: dict[str, Any], config: KitConfig) -> None:
    """Record the settings used by a phase."""
    _update(config, "settings", name, settings)


def record(section: str, key: str, value: Any, config: KitConfig) -> None:
    """Record any JSON-serialisable value under ``section/key``."""
    _update(config, section, key, value)


def save_figure(fig, filename: str, config: KitConfig) -> Path | None:
    """Save a matplotlib figure under ``figures/`` of the output folder (skipped under grading)."""
    if config.grading:
        return None
    path = out_dir(config) / "figures" / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path
