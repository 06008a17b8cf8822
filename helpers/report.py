"""Where notebooks put their numbers and pictures so the reference run can build its report.

Output folder: ``config.out_path`` of the :class:`helpers.config.KitConfig` passed in (``$CD_KIT_OUT`` if set;
the reference run sets it to ``out/reference``), else ``out/interactive`` under the kit root in a checkout or
under the working directory for an installed kit (:func:`helpers.config.default_out_path`). Under nbgrader
(``config.grading``) nothing is written.
``metrics.json`` is one JSON object merged across notebooks: ``{"samplers": {name: {...}},
"timings_s": {phase: seconds}, "settings": {...}}``.

The lesson of a run, drawn from ``metrics.json`` (and the rows of images under ``samples/``) alone:
:func:`lesson_sentences` says for each student by how much it beats or trails the teacher's DDIM at the same number
of steps, with the spread over evaluation seeds (:data:`helpers.evaluation.SEED_SPREAD`, quoted), and
:func:`lesson_figures` draws the steps–quality plot and the DDIM-4 / best student / DDIM-50 grid.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from helpers.config import KitConfig

__all__ = ["out_dir", "record_sampler", "record_timing", "record_settings", "record", "save_figure",
           "load_metrics", "STOCHASTIC_SAMPLERS", "LESSON_METRIC", "teacher_curve", "students", "best_student",
           "quoted_spread", "lesson_sentences", "lesson_figures"]


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


# ------------------------------------------------------------------------------------------ the lesson
#: The kit's students sampled with ``consistency_sampling`` (fresh noise at every step): PSNR against the teacher's
#: same-noise images does not judge them, the distribution distance does.
STOCHASTIC_SAMPLERS: tuple[str, ...] = ("ct_4", "cd_4")
#: The quality metric of the lesson: FD against the teacher's 50-step images of independent noise.
LESSON_METRIC = "fd_teacher_split"
_DDIM = re.compile(r"teacher_ddim(\d+)$")


def _values(entry: dict) -> dict[str, float]:
    return {k: m["value"] for k, m in (entry.get("metrics") or {}).items() if m.get("value") is not None}


def teacher_curve(samplers: dict[str, dict]) -> dict[int, dict[str, float]]:
    """The teacher's DDIM samplers (``teacher_ddim<k>``) of ``metrics.json``: ``{steps: {metric: value}}``."""
    return {int(m.group(1)): _values(e) for n, e in samplers.items() if (m := _DDIM.match(n))}


def students(samplers: dict[str, dict]) -> dict[str, tuple[int, dict[str, float]]]:
    """Every other sampler with a step count: ``{name: (steps, {metric: value})}``."""
    return {n: (int(e["steps"]), _values(e)) for n, e in samplers.items()
            if not _DDIM.match(n) and isinstance(e.get("steps"), int)}


def best_student(samplers: dict[str, dict], steps: int = 4) -> str | None:
    """The ``steps``-step student with the lowest :data:`LESSON_METRIC` (then the highest PSNR), or None."""
    ranked = [(m.get(LESSON_METRIC, float("inf")), -m.get("psnr_teacher", float("-inf")), n)
              for n, (st, m) in students(samplers).items() if st == steps]
    return min(ranked)[2] if ranked else None


def quoted_spread(samplers: dict[str, dict]) -> dict[str, dict[int, float]] | None:
    """:data:`helpers.evaluation.SEED_SPREAD` when this run measured what it was measured on (digit-classifier
    features, :data:`~helpers.evaluation.SEED_SPREAD_IMAGES` images per sampler), else None."""
    from helpers.evaluation import SEED_SPREAD, SEED_SPREAD_IMAGES

    entry = ((samplers.get("teacher_ddim4") or {}).get("metrics") or {}).get(LESSON_METRIC) or {}
    fits = entry.get("images") == SEED_SPREAD_IMAGES and str(entry.get("network", "")).startswith("digit classifier")
    return SEED_SPREAD if fits else None


def _versus(key: str, ours: float, theirs: float, sd: float | None, lower_better: bool, unit: str, digits: int) -> str:
    diff = ours - theirs
    better = diff < 0 if lower_better else diff > 0
    verdict = "beats" if better else "trails"
    sd_text = (f"; spread over evaluation seeds {sd:.{digits}f}{unit}, the difference is {abs(diff) / sd:.1f} × it"
               if sd else "; spread not measured for this evaluation set")
    return (f"{verdict} it on {key} by {abs(diff):.{digits}f}{unit} ({ours:.{digits}f} against {theirs:.{digits}f}"
            f"{sd_text})")


def lesson_sentences(samplers: dict[str, dict]) -> list[str]:
    """One sentence per student: by how much it beats or trails the teacher's DDIM at the same number of steps on
    the FD against DDIM-50 of independent noise (and the share of DDIM's gap to DDIM-50 it closes) and, for the
    deterministic samplers, on PSNR against DDIM-50 from the same noise; with the quoted spread over seeds."""
    curve, spread = teacher_curve(samplers), quoted_spread(samplers) or {}
    floor = curve.get(50, {}).get(LESSON_METRIC)
    lines = []
    for name, (steps, m) in students(samplers).items():
        ddim = curve.get(steps)
        if ddim is None:
            lines.append(f"`{name}` ({steps} steps): the teacher's DDIM at {steps} steps was not measured.")
            continue
        parts = []
        if LESSON_METRIC in m and LESSON_METRIC in ddim:
            text = _versus("FD vs DDIM-50 of other noise", m[LESSON_METRIC], ddim[LESSON_METRIC],
                           spread.get(LESSON_METRIC, {}).get(steps), True, "", 3)
            gap = None if floor is None else ddim[LESSON_METRIC] - floor
            if gap and gap > 0 and m[LESSON_METRIC] < ddim[LESSON_METRIC]:
                text += f", closing {100 * (ddim[LESSON_METRIC] - m[LESSON_METRIC]) / gap:.0f} % of its gap to DDIM-50"
            parts.append(text)
        if name not in STOCHASTIC_SAMPLERS and "psnr_teacher" in m and "psnr_teacher" in ddim:
            parts.append(_versus("PSNR vs DDIM-50", m["psnr_teacher"], ddim["psnr_teacher"],
                                 spread.get("psnr_teacher", {}).get(steps), False, " dB", 2))
        elif name in STOCHASTIC_SAMPLERS:
            parts.append("PSNR does not judge it (it draws fresh noise at every step)")
        if "prompt_accuracy" in m and "prompt_accuracy" in ddim:
            parts.append(f"prompt accuracy {m['prompt_accuracy']:.3f} against {ddim['prompt_accuracy']:.3f}")
        lines.append(f"`{name}` against `teacher_ddim{steps}`: " + "; ".join(parts) + ".")
    return lines


def lesson_figures(data: dict[str, Any], folder: Path) -> list[Path]:
    """Draw the lesson into ``folder/figures``: ``lesson_steps_quality.png`` (needs the teacher's DDIM samplers)
    and ``lesson_grid.png`` (DDIM-4, the best 4-step student and DDIM-50 from the same noise, from the rows under
    ``folder/samples``). Returns the files written (none when the run lacks what they need)."""
    import matplotlib.pyplot as plt
    import torch

    from helpers.evaluation import SAMPLES_DIR
    from helpers.plotting import STEPS_PANELS, plot_steps_quality, show_images

    samplers = data.get("samplers") or {}
    folder = Path(folder)
    written: list[Path] = []
    curve = teacher_curve(samplers)
    keys = {key for key, _, _ in STEPS_PANELS}
    if any(keys & set(m) for m in curve.values()):  # a run that recorded the teacher's DDIM with these metrics
        path = folder / "figures" / "lesson_steps_quality.png"
        fig = plot_steps_quality(curve, students(samplers), quoted_spread(samplers), STOCHASTIC_SAMPLERS, save_to=path)
        plt.close(fig)
        written.append(path)
    best = best_student(samplers)
    names = ["teacher_ddim4", best, "teacher_ddim50"]
    files = [folder / SAMPLES_DIR / f"{n}.pt" for n in names if n]
    if best and all(f.exists() for f in files):
        rows = [torch.load(f, weights_only=True) for f in files]
        if len({r["eval_key"] for r in rows}) == 1:  # the same prompts and noise in every row
            images = torch.cat([r["images"] for r in rows]).float() / 255
            labels = rows[0]["labels"]
            titles = [f"{n}\n{label}" if j == 0 else f"\n{label}" for n in names for j, label in enumerate(labels)]
            fig = show_images(images, titles=titles, ncols=len(labels), size=1.6,
                              suptitle="the same noise: DDIM-4, the best 4-step student, DDIM-50")
            path = folder / "figures" / "lesson_grid.png"
            fig.savefig(path, dpi=100, bbox_inches="tight")
            plt.close(fig)
            written.append(path)
    return written
