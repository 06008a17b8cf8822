"""Rendering a reference run's ``report.md``: notebooks, metrics table, what distillation bought (one sentence per
student, :func:`helpers.report.lesson_sentences`), figures, timings, settings, environment and the consistency
checks."""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from helpers.commands.reference_run.check import EXPECTED_SAMPLERS, FEW_STEP, REFERENCE, _number, gap_closed
from helpers.commands.reference_run.execute import NotebookResult
from helpers.evaluation import SEED_SPREAD_SOURCE
from helpers.report import lesson_sentences, quoted_spread

__all__ = ["render_report"]


def _fmt(value: Any, digits: int = 3) -> str:
    number = _number(value)
    return "—" if number is None else f"{number:.{digits}f}"


def _cell(value: Any) -> str:
    """An extra column's value: integers as they are, other numbers with 3 decimals, anything else as text."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return _fmt(value) if _number(value) is not None else str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _versus_few_step(samplers: dict[str, dict], name: str) -> str:
    """A student against the 4-step teacher: the differences in accuracy and PSNR, and whether it beats it on
    both (higher accuracy and higher PSNR) — the distillation's aim."""
    if name in (REFERENCE, FEW_STEP) or FEW_STEP not in samplers:
        return "—"
    acc, psnr = (_number(samplers[name].get(k)) for k in ("prompt_accuracy", "fidelity_psnr_db"))
    acc4, psnr4 = (_number(samplers[FEW_STEP].get(k)) for k in ("prompt_accuracy", "fidelity_psnr_db"))
    if None in (acc, psnr, acc4, psnr4):
        return "—"
    verdict = "beats it on both" if acc > acc4 and psnr > psnr4 else (
        "beats it on PSNR" if psnr > psnr4 else ("beats it on accuracy" if acc > acc4 else "does not beat it"))
    return f"{acc - acc4:+.3f}, {psnr - psnr4:+.2f} dB: {verdict}"


#: Headers of the distribution and text-image metrics (helpers.evaluation.measure), in table order.
METRIC_HEADERS: dict[str, str] = {
    "clip_score": "CLIP score", "fd_teacher": f"FD vs `{REFERENCE}`", "kid_teacher": f"KID vs `{REFERENCE}`",
    "fd_teacher_split": f"FD vs `{REFERENCE}` of other noise",
    "fd_real": "FD vs real", "kid_real": "KID vs real"}


def _metric_cell(entry: dict | None) -> str:
    if not entry:
        return "—"
    if entry.get("value") is None:
        return "skipped"
    value = _fmt(entry["value"], 4 if entry["key"].startswith("kid") else 2)
    return value + (f" ± {_fmt(entry['std'], 4)}" if _number(entry.get("std")) is not None else "")


def _distribution_section(samplers: dict[str, dict], names: list[str]) -> list[str]:
    """The table of :data:`METRIC_HEADERS` metrics, then what each used: network, images, reference set."""
    keys = [k for k in METRIC_HEADERS if any(k in (samplers[n].get("metrics") or {}) for n in names)]
    if not keys:
        return []
    rows = [[f"`{n}`"] + [_metric_cell((samplers[n].get("metrics") or {}).get(k)) for k in keys] for n in names]
    lines = ["", "### Distribution and text–image metrics", ""]
    lines += _table(["sampler", *(METRIC_HEADERS[k] for k in keys)], rows)
    lines += [""]
    for k in keys:
        entry = next(samplers[n]["metrics"][k] for n in names if k in (samplers[n].get("metrics") or {}))
        if entry.get("value") is None:
            lines.append(f"- {METRIC_HEADERS[k]}: skipped: {entry.get('skipped')}")
        else:
            against = f" against {entry['reference_images']} images of {entry['against']}" if entry.get(
                "reference_images") else f" against the {entry.get('against')}"
            lines.append(f"- {METRIC_HEADERS[k]}: {entry.get('network')}, {entry.get('images')} images per "
                         f"sampler{against}.")
    return lines + ["", "FD: Fréchet distance of Gaussians fitted to the features (FID when the features are "
                        "Inception's; biased upwards at small N: compare numbers of the same N only). KID: unbiased "
                        "kernel distance, mean ± std over random subsets. CLIP score: torchmetrics' 100·cos(image, "
                        "prompt). Definitions: `docs/reference_run.md`."]


def _metrics_section(samplers: dict[str, dict]) -> list[str]:
    if not samplers:
        return ["No sampler metrics were recorded."]
    names = [s for s in EXPECTED_SAMPLERS if s in samplers] + sorted(set(samplers) - set(EXPECTED_SAMPLERS))
    if not any("prompt_accuracy" in m for m in samplers.values()):  # not a digits run: nothing digit-specific
        rows = [[f"`{n}`", _fmt(samplers[n].get("fidelity_psnr_db"), 2), _cell(samplers[n].get("steps", "—")),
                 _cell(samplers[n].get("seconds", "—"))] for n in names]
        return _table(["sampler", f"PSNR vs `{REFERENCE}` (dB)", "steps", "seconds"], rows) + \
            _distribution_section(samplers, names)
    gaps = gap_closed(samplers)
    extra = sorted({k for m in samplers.values() for k in m} - {"prompt_accuracy", "fidelity_psnr_db", "metrics"})
    rows = [[f"`{n}`", _fmt(samplers[n].get("prompt_accuracy")), _fmt(samplers[n].get("fidelity_psnr_db"), 2),
             "—" if n in (REFERENCE, FEW_STEP) or gaps[n] is None else f"{100 * gaps[n]:.0f} %",
             _versus_few_step(samplers, n)]
            + [_cell(samplers[n].get(k, "—")) for k in extra] for n in names]
    lines = _table(["sampler", "prompt accuracy", f"fidelity PSNR vs `{REFERENCE}` (dB)", "gap closed",
                    f"vs `{FEW_STEP}`: accuracy, PSNR", *extra], rows)
    absent = [s for s in EXPECTED_SAMPLERS if s not in samplers]
    if absent:
        lines += ["", f"Not recorded: {', '.join(f'`{s}`' for s in absent)}."]
    if REFERENCE in samplers and FEW_STEP in samplers and all(g is None for g in gaps.values()):
        lines += ["", f"Gap closed is undefined: `{FEW_STEP}` is at least as accurate as `{REFERENCE}` "
                      f"({_fmt(samplers[FEW_STEP].get('prompt_accuracy'))} vs "
                      f"{_fmt(samplers[REFERENCE].get('prompt_accuracy'))}), so there is no accuracy gap to close; "
                      "fidelity (PSNR) still shows how far each sampler is from the 50-step teacher."]
    return lines + ["", f"*Gap closed*: share of the prompt-accuracy gap between `{FEW_STEP}` and `{REFERENCE}` "
                        "that a student closes (100 % = as accurate as the 50-step teacher). Fidelity: PSNR against "
                        f"`{REFERENCE}` images from the same initial noise (identical images = the cap)."] + \
        _distribution_section(samplers, names)


def _lesson_section(data: dict[str, Any]) -> list[str]:
    """What distillation bought: one sentence per student against the teacher's DDIM at the same steps."""
    samplers = data.get("samplers") or {}
    sentences = lesson_sentences(samplers)
    if not sentences:
        return []
    spread = ("The spread is the standard deviation over evaluation seeds of the teacher's DDIM at that number of "
              f"steps, quoted from {SEED_SPREAD_SOURCE}, not re-measured in this run."
              if quoted_spread(samplers) else
              "No spread is quoted: it was measured for the small model's 500-image digit evaluation only.")
    return ["", "### What distillation bought", "", *(f"- {s}" for s in sentences), "", spread]


def _failures_section(results: Sequence[NotebookResult]) -> list[str]:
    """Each failed notebook's traceback (the executed copy carries it too); nothing when none failed."""
    failed = [r for r in results if r.status == "failed"]
    lines = ["", "## Failures"] if failed else []
    for r in failed:  # a four-backtick fence: a traceback may quote Markdown's three
        lines += ["", f"### {r.assignment}", "", f"{r.error} (executed copy: [{Path(r.notebook).name}]({r.notebook}))",
                  "", "````text", r.traceback or "no traceback was recorded", "````"]
    return lines


def render_report(data: dict[str, Any], results: Sequence[NotebookResult], problems: Sequence[str],
                  figures: Sequence[str]) -> str:
    """The Markdown report of a run: notebooks, metrics table, figures, timings, settings, environment,
    consistency checks. ``figures``: paths relative to the report's folder."""
    run_info = data.get("run", {})
    lines = [f"# Reference run — {run_info.get('model', '?')}" + (" (reduced)" if run_info.get("reduced") else ""),
             "", f"Started {run_info.get('started', '?')}; {sum(r.wall_s or 0 for r in results):.0f} s in notebooks. "
             + ("All checks passed." if not problems else f"**{len(problems)} problem(s)**, see the end."),
             "", "## Notebooks", ""]
    lines += _table(["assignment", "status", "wall time (s)", "executed copy"],
                    [[r.assignment, r.status + (f": {r.error}" if r.error else ""), _fmt(r.wall_s, 1),
                      f"[{Path(r.notebook).name}]({r.notebook})" if r.status in ("ok", "failed") else "—"]
                     for r in results])
    missing = [r.assignment for r in results if r.status == "missing"]
    if missing:
        lines += ["", f"Missing from `solutions/` (not run): {', '.join(missing)}."]
    lines += _failures_section(results)
    lines += ["", "## Metrics", "", *_metrics_section(data.get("samplers") or {}), *_lesson_section(data)]
    lines += ["", "## Figures", ""]
    lines += [f"### {Path(f).stem}\n\n![{Path(f).stem}]({f})\n" for f in figures] or ["No figures were saved."]
    timings = data.get("timings_s") or {}
    lines += ["", "## Timings", ""]
    lines += _table(["phase", "seconds"], [[p, _fmt(s, 1)] for p, s in timings.items()]) if timings else \
        ["No phase timings were recorded."]
    lines += ["", "## Settings", "", "```json", json.dumps({"run": run_info, **(data.get("settings") or {})},
                                                           indent=2, sort_keys=True), "```",
              "", "## Environment", ""]
    lines += _table(["", ""], list((data.get("environment") or {}).items()))
    lines += ["", "## Consistency checks", ""]
    lines += [f"- {p}" for p in problems] or ["All checks passed."]
    return "\n".join(lines) + "\n"
