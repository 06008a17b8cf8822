"""The reference run: execute the solution notebooks 01-05 end to end and write a report.

    python -m helpers.commands.reference_run [--model small|sd15|<hub id or folder>] [--out out/reference]
                                    [--reduced] [--only 01,02] [--cell-timeout SECONDS]
                                    [--solutions solutions]

Copies ``solutions/`` into ``<out>/notebooks/`` and executes each assignment's notebook there, in course
order, with nbclient (kernel ``python3``, working directory = the notebook's folder, so that
:mod:`helpers.notebook_functions` finds the earlier executed copies beside it). The kernels get
``CD_KIT_OUT=<out>``, ``CD_KIT_MODEL``, ``MPLBACKEND=Agg`` and, with ``--reduced`` (CI), ``CD_KIT_REDUCED=1``.
Executed copies are kept. The run stops at the first failing notebook and names the failing cell, but
still writes the report of what ran.

Output (``<out>/``): ``notebooks/`` (executed copies), ``metrics.json`` (what the notebooks recorded through
:mod:`helpers.report`, plus this run's notebook timings, settings and environment), ``figures/`` and
``report.md``. Each run starts afresh: these four are deleted first (nothing else in ``<out>`` is touched).
The metrics are then checked for consistency; the exit status is 0 only when every notebook that exists
ran and the checks pass. Missing notebooks are listed in the report but are not an error.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from helpers.course import ASSIGNMENTS, KIT_ROOT, Assignment

__all__ = ["EXPECTED_SAMPLERS", "NotebookResult", "RunOutcome", "select_assignments", "execute_notebook",
           "environment_info", "psnr_cap_db", "gap_closed", "check_metrics", "render_report", "run", "main"]

#: The samplers a complete run must record (helpers.report.record_sampler), teachers first.
EXPECTED_SAMPLERS: tuple[str, ...] = ("teacher_ddim50", "teacher_ddim4", "ct_4", "cd_4", "multi_cd_4_pipe",
                                      "multi_cd_4_matched")
REFERENCE, FEW_STEP = "teacher_ddim50", "teacher_ddim4"
DEFAULT_OUT = KIT_ROOT / "out" / "reference"
PRODUCED = ("notebooks", "figures", "metrics.json", "report.md")  # what a run owns inside <out>
FIGURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".svg", ".gif")
PACKAGES = ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "numpy", "nbgrader",
            "nbclient", "ipykernel")


@dataclass
class NotebookResult:
    """What happened to one assignment's notebook."""

    assignment: str
    notebook: str  # path relative to <out>
    status: str  # "ok", "failed", "missing" (no solution notebook) or "not run" (after a failure)
    wall_s: float | None = None
    error: str | None = None


@dataclass
class RunOutcome:
    results: list[NotebookResult]
    problems: list[str]
    report: Path
    metrics: Path

    @property
    def ok(self) -> bool:
        return not self.problems


# ------------------------------------------------------------------------------------------ executing
def select_assignments(only: str | Sequence[str] | None) -> list[Assignment]:
    """The assignments to run, in course order: all, or those whose id starts with one of ``only``
    (``"01,02"``, ``["03_ct_derivation"]``)."""
    if not only:
        return list(ASSIGNMENTS)
    keys = [k.strip() for k in (only.split(",") if isinstance(only, str) else only) if k.strip()]
    unknown = [k for k in keys if not any(a.id.startswith(k) for a in ASSIGNMENTS)]
    if unknown:
        raise ValueError(f"--only {','.join(unknown)}: no such assignment; use prefixes of "
                         f"{[a.id for a in ASSIGNMENTS]} (e.g. --only 01,02)")
    return [a for a in ASSIGNMENTS if any(a.id.startswith(k) for k in keys)]


def _describe_cell(cell: dict, index: int) -> str:
    """``cell 7 (grade_id 'q_sample'): def q_sample(...`` -- enough to find the cell in Jupyter."""
    grade_id = cell.get("metadata", {}).get("nbgrader", {}).get("grade_id")
    first = next((line for line in cell.get("source", "").splitlines() if line.strip()), "").strip()
    tag = f" (grade_id {grade_id!r})" if grade_id else ""
    return f"cell {index}{tag}: {first[:80]}"


def _error_summary(cell: dict) -> str:
    for output in cell.get("outputs", []):
        if output.get("output_type") == "error":
            return f"{output.get('ename')}: {output.get('evalue')}"
    return ""


def execute_notebook(path: Path, env: dict[str, str], cell_timeout: int | None = None,
                     kernel_name: str = "python3") -> tuple[str | None, float]:
    """Execute the notebook at ``path`` in place (its folder as working directory) and save it, also when
    a cell fails. Returns ``(error, wall seconds)``; ``error`` is None on success, else names the cell."""
    import nbformat
    import zmq
    from nbclient import NotebookClient
    from traitlets.config import Config

    nb = nbformat.read(path, as_version=4)
    running: dict[str, Any] = {}
    # CurveZMQ between this process and the kernel where pyzmq has it (else the kernel warns about plain TCP)
    config = Config(KernelManager={"transport_encryption": "auto" if zmq.has("curve") else "disabled"})
    client = NotebookClient(nb, timeout=cell_timeout, kernel_name=kernel_name, config=config,
                            resources={"metadata": {"path": str(path.parent)}},
                            on_cell_start=lambda cell, cell_index: running.update(cell=cell, index=cell_index))
    start = time.perf_counter()
    error = None
    try:
        client.execute(env=env)
    except Exception as err:  # CellExecutionError, CellTimeoutError, DeadKernelError, kernel start failures
        where = _describe_cell(running["cell"], running["index"]) if running else "before the first cell"
        detail = _error_summary(running["cell"]) if running else ""
        last_line = (str(err).strip().splitlines() or [""])[-1][:300]
        error = f"{where} -> {detail or f'{type(err).__name__}: {last_line}'}"
    finally:
        nbformat.write(nb, path)
    return error, time.perf_counter() - start


def _kernel_env(out: Path, model: str, reduced: bool) -> dict[str, str]:
    env = dict(os.environ, CD_KIT_OUT=str(out), CD_KIT_MODEL=model, MPLBACKEND="Agg")
    env.pop("NBGRADER_EXECUTION", None)  # would make helpers.report write nothing
    env.pop("CD_KIT_REDUCED", None)
    if reduced:
        env["CD_KIT_REDUCED"] = "1"
    return env


def _model_setting(model: str | None) -> str:
    """The model setting for the kernels; a relative folder is made absolute (kernels run elsewhere)."""
    from helpers.models import resolve_model

    spec = resolve_model(model)  # fails early, saying what to do, when the small model is missing
    return str(Path(spec.setting).resolve()) if spec.kind == "custom" and Path(spec.setting).exists() else spec.setting


def _prepare(out: Path, solutions_dir: Path) -> Path:
    """Delete what an earlier run produced in ``out`` and copy the solutions to ``out/notebooks``."""
    if not solutions_dir.is_dir():
        raise FileNotFoundError(f"No solutions folder at {solutions_dir}: run from a checkout of the kit.")
    out.mkdir(parents=True, exist_ok=True)
    for name in PRODUCED:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    shutil.copytree(solutions_dir, out / "notebooks", ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    return out / "notebooks"


def _run_notebooks(assignments: list[Assignment], nb_dir: Path, env: dict[str, str],
                   cell_timeout: int | None) -> list[NotebookResult]:
    """Execute the assignments' notebooks in order; after a failure the rest are marked "not run"."""
    results: list[NotebookResult] = []
    failed = False
    for a in assignments:
        rel = f"notebooks/{a.id}/{a.notebook}"
        if not (nb_dir / a.id / a.notebook).exists():
            results.append(NotebookResult(a.id, rel, "missing"))
            print(f"[{a.id}] missing: no solutions/{a.id}/{a.notebook}", flush=True)
            continue
        if failed:
            results.append(NotebookResult(a.id, rel, "not run"))
            continue
        print(f"[{a.id}] running {rel} ...", flush=True)
        error, wall = execute_notebook(nb_dir / a.id / a.notebook, env, cell_timeout)
        failed = error is not None
        results.append(NotebookResult(a.id, rel, "failed" if failed else "ok", round(wall, 1), error))
        print(f"[{a.id}] {'FAILED' if failed else 'ok'} in {wall:.1f} s" + (f": {error}" if error else ""),
              flush=True)
    return results


def environment_info() -> dict[str, Any]:
    """Python, package versions and the device of this run."""
    import torch

    from helpers.device import pick_device

    device = pick_device()
    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                            "device": str(device), "cpu_count": os.cpu_count(),
                            "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    for pkg in PACKAGES:
        try:
            info[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            info[pkg] = "not installed"
    return info


# ------------------------------------------------------------------------------------------ checking
def _number(value: Any) -> float | None:
    """``value`` as a finite float, or None when it is not one (None, NaN, inf, a string...)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def psnr_cap_db() -> float:
    """The PSNR that :func:`helpers.metrics.psnr_db` gives for identical images (its cap)."""
    import torch

    from helpers.metrics import psnr_db

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


def check_metrics(data: dict[str, Any], complete: bool, cap_db: float | None = None,
                  figures: Sequence[Path] = ()) -> list[str]:
    """Problems with a run's ``metrics.json`` content (empty list = consistent).

    Every recorded sampler: prompt accuracy in [0, 1], fidelity (PSNR in dB against ``teacher_ddim50``)
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
        if acc is None or not 0.0 <= acc <= 1.0:
            problems.append(f"{name}: prompt_accuracy {m.get('prompt_accuracy')!r} is not a number in [0, 1]")
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


# ------------------------------------------------------------------------------------------ reporting
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


def _metrics_section(samplers: dict[str, dict]) -> list[str]:
    if not samplers:
        return ["No sampler metrics were recorded."]
    gaps = gap_closed(samplers)
    names = [s for s in EXPECTED_SAMPLERS if s in samplers] + sorted(set(samplers) - set(EXPECTED_SAMPLERS))
    extra = sorted({k for m in samplers.values() for k in m} - {"prompt_accuracy", "fidelity_psnr_db"})
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
                        f"`{REFERENCE}` images from the same initial noise (identical images = the cap)."]


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
    lines += ["", "## Metrics", "", *_metrics_section(data.get("samplers") or {}), "", "## Figures", ""]
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


# ------------------------------------------------------------------------------------------ the run
def run(model: str | None = None, out: str | Path = DEFAULT_OUT, reduced: bool = False,
        only: str | Sequence[str] | None = None, solutions_dir: str | Path = KIT_ROOT / "solutions",
        cell_timeout: int | None = None) -> RunOutcome:
    """Execute the selected notebooks, write ``metrics.json`` and ``report.md`` under ``out``; see the
    module docstring."""
    from helpers.captions_data import DATA_ENV_VAR

    out = Path(out).resolve()
    assignments = select_assignments(only)
    setting = _model_setting(model)
    started = _dt.datetime.now().isoformat(timespec="seconds")
    nb_dir = _prepare(out, Path(solutions_dir))
    results = _run_notebooks(assignments, nb_dir, _kernel_env(out, setting, reduced), cell_timeout)

    metrics_path = out / "metrics.json"
    data = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    data.update(run={"model": setting, "reduced": reduced, "only": [a.id for a in assignments],
                     "solutions": str(Path(solutions_dir).resolve()), "started": started,
                     "cell_timeout_s": cell_timeout, "data": os.environ.get(DATA_ENV_VAR)},
                notebooks={r.assignment: {"status": r.status, "wall_s": r.wall_s, "error": r.error} for r in results},
                environment=environment_info())
    metrics_path.write_text(json.dumps(data, indent=2, sort_keys=True))

    figures = sorted(p for p in (out / "figures").glob("*") if p.suffix.lower() in FIGURE_SUFFIXES)
    complete = len(assignments) == len(ASSIGNMENTS) and all(r.status == "ok" for r in results)
    problems = [f"{r.assignment} failed at {r.error} (traceback in {out / r.notebook})"
                for r in results if r.status == "failed"]
    problems += check_metrics(data, complete, psnr_cap_db(), figures)
    report = out / "report.md"
    report.write_text(render_report(data, results, problems, [f"figures/{p.name}" for p in figures]))
    return RunOutcome(results, problems, report, metrics_path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m helpers.commands.reference_run", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None,
                        help="small (default: the kit's digits model), sd15, or a Hub id / local pipeline folder "
                             "(default: $CD_KIT_MODEL, else small)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default: out/reference)")
    parser.add_argument("--reduced", action="store_true", help="short mode for CI (sets CD_KIT_REDUCED=1)")
    parser.add_argument("--only", default=None, help="comma-separated assignment prefixes, e.g. 01,02")
    parser.add_argument("--cell-timeout", type=int, default=None, help="seconds per cell (default: no limit)")
    parser.add_argument("--solutions", default=str(KIT_ROOT / "solutions"), help="source notebooks (default: solutions/)")
    args = parser.parse_args(argv)
    try:
        outcome = run(args.model, args.out, args.reduced, args.only, args.solutions, args.cell_timeout)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    total = sum(r.wall_s or 0 for r in outcome.results)
    print(f"\n{total:.1f} s in notebooks; report: {outcome.report}; metrics: {outcome.metrics}")
    missing = [r.assignment for r in outcome.results if r.status == "missing"]
    if missing:
        print(f"note: not in solutions/ yet, not run: {', '.join(missing)}")
    if outcome.problems:
        print(f"\n{len(outcome.problems)} problem(s):", *(f"  - {p}" for p in outcome.problems), sep="\n",
              file=sys.stderr)
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
