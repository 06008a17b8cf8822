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
``report.md``, and ``samples/`` (one row of each sampler's images, for the report's grid). Each run starts afresh: these are deleted first (nothing else in ``<out>`` is touched).
The metrics are then checked for consistency; the exit status is 0 only when every notebook that exists
ran and the checks pass. Missing notebooks are listed in the report but are not an error.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from helpers.commands.reference_run.check import check_metrics, psnr_cap_db
from helpers.commands.reference_run.execute import (NotebookResult, environment_info, kernel_env, model_setting,
                                                    prepare, run_notebooks, select_assignments)
from helpers.commands.reference_run.render import render_report
from helpers.config import KitConfig
from helpers.course import ASSIGNMENTS, KIT_ROOT
from helpers.report import lesson_figures

__all__ = ["DEFAULT_OUT", "RunOutcome", "run", "main"]

DEFAULT_OUT = KIT_ROOT / "out" / "reference"
FIGURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".svg", ".gif")


@dataclass
class RunOutcome:
    results: list[NotebookResult]
    problems: list[str]
    report: Path
    metrics: Path

    @property
    def ok(self) -> bool:
        return not self.problems


def run(model: str | None = None, out: str | Path = DEFAULT_OUT, reduced: bool = False,
        only: str | Sequence[str] | None = None, solutions_dir: str | Path = KIT_ROOT / "solutions",
        cell_timeout: int | None = None, config: KitConfig | None = None) -> RunOutcome:
    """Execute the selected notebooks, write ``metrics.json`` and ``report.md`` under ``out``; see the
    module docstring. ``config``: the kit's settings (default: :meth:`KitConfig.from_environ`); ``model``,
    ``out`` and ``reduced`` override its fields for the kernels."""
    config = KitConfig.from_environ() if config is None else config
    out = Path(out).resolve()
    assignments = select_assignments(only)
    setting = model_setting(model or config.model)
    started = _dt.datetime.now().isoformat(timespec="seconds")
    nb_dir = prepare(out, Path(solutions_dir))
    env = kernel_env(config.replace(out=str(out), model=setting, reduced=reduced))
    results = run_notebooks(assignments, nb_dir, env, cell_timeout)

    metrics_path = out / "metrics.json"
    data = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    data.update(run={"model": setting, "reduced": reduced, "only": [a.id for a in assignments],
                     "solutions": str(Path(solutions_dir).resolve()), "started": started,
                     "cell_timeout_s": cell_timeout, "data": config.data},
                notebooks={r.assignment: {"status": r.status, "wall_s": r.wall_s, "error": r.error,
                                          "traceback": r.traceback} for r in results},
                environment=environment_info(config.device))
    metrics_path.write_text(json.dumps(data, indent=2, sort_keys=True))
    lesson_figures(data, out)  # the steps-quality plot and the DDIM-4 / best student / DDIM-50 grid
    figures = sorted(p for p in (out / "figures").glob("*") if p.suffix.lower() in FIGURE_SUFFIXES)
    complete = len(assignments) == len(ASSIGNMENTS) and all(r.status == "ok" for r in results)
    problems = [f"{r.assignment} failed at {r.error} (traceback above, in report.md and in {out / r.notebook})"
                for r in results if r.status == "failed"]
    problems += check_metrics(data, complete, psnr_cap_db(), figures)
    report = out / "report.md"
    report.write_text(render_report(data, results, problems, [f"figures/{p.name}" for p in figures]))
    return RunOutcome(results, problems, report, metrics_path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m helpers.commands.reference_run",
                                     description=__doc__.split("\n")[0])
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
        config = KitConfig.from_environ()  # the kit's settings, read once here
        outcome = run(args.model, args.out, args.reduced, args.only, args.solutions, args.cell_timeout, config)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    total = sum(r.wall_s or 0 for r in outcome.results)
    print(f"\n{total:.1f} s in notebooks; report: {outcome.report}; metrics: {outcome.metrics}")
    missing = [r.assignment for r in outcome.results if r.status == "missing"]
    if missing:
        print(f"note: not in solutions/ yet, not run: {', '.join(missing)}")
    if outcome.problems:
        for r in outcome.results:
            if r.status == "failed":
                print(f"\n[{r.assignment}] traceback of {r.error}:\n{r.traceback or 'none was recorded'}",
                      file=sys.stderr)
        print(f"\n{len(outcome.problems)} problem(s):", *(f"  - {p}" for p in outcome.problems), sep="\n",
              file=sys.stderr)
        return 1
    print("all checks passed")
    return 0
