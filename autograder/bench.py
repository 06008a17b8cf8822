"""``python -m autograder bench``: grading throughput, serial vs parallel, on copies of the reference.

K students each submit the reference solutions of every assignment (or of ``--assignment``); the folder is
graded once with one worker and once with ``--workers N``, and the command prints submissions per minute
for each and whether both runs gave the same scores.
"""
from __future__ import annotations

import csv
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

__all__ = ["bench", "make_reference_folder"]


def make_reference_folder(dest: str | Path, copies: int, source_dir: str | Path,
                          assignments: Iterable[str] | None = None) -> int:
    """Write ``dest/student-XX/<assignment>/`` reference submissions; return how many."""
    from autograder.testing import CourseFiles, reference_case

    dest = Path(dest)
    course = CourseFiles.build(source_dir, dest.parent / f"{dest.name}-release")
    chosen = list(assignments) if assignments else list(course.reference)
    unknown = [a for a in chosen if a not in course.reference]
    if unknown:
        raise KeyError(f"No assignment {unknown} in {source_dir}; it has {list(course.reference)}")
    for k in range(copies):
        for a in chosen:
            course.write(dest / f"student-{k:02d}" / a, reference_case(course, a))
    return copies * len(chosen)


def _cells(out: Path) -> list[dict]:
    with open(out / "cells.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def bench(copies: int = 4, workers: int | None = None, assignments: Iterable[str] | None = None,
          timeout: int = 120, source_dir: str | Path | None = None,
          check_modules: tuple[str, ...] = ("autograder.checks",), memory_gb: float | None = None,
          keep: str | Path | None = None) -> dict[str, float]:
    """Grade ``copies`` reference students serially and with ``workers`` workers; print and return the
    submissions per minute of each run."""
    from autograder.grade import default_workers, grade
    from helpers.course import SOLUTIONS_DIR

    source = Path(source_dir or SOLUTIONS_DIR)
    workers = workers or default_workers()
    with tempfile.TemporaryDirectory(prefix="cd-bench-") as tmp_name:
        root = Path(keep) if keep else Path(tmp_name)
        root.mkdir(parents=True, exist_ok=True)
        n = make_reference_folder(root / "submitted", copies, source, assignments)
        rates: dict[str, float] = {}
        outs = {}
        for label, w in (("serial", 1), ("parallel", workers)):
            out = root / f"out-{label}"
            started = time.monotonic()
            grade(root / "submitted", out, workers=w, timeout=timeout, source_dir=source,
                  check_modules=check_modules, memory_gb=memory_gb, progress=True)
            seconds = time.monotonic() - started
            rates[label] = 60.0 * n / seconds
            outs[label] = out
            print(f"{label:8s} workers={w:<3d} submissions={n:<4d} seconds={seconds:7.1f} "
                  f"submissions/min={rates[label]:6.2f}", flush=True)
        same = _cells(outs["serial"]) == _cells(outs["parallel"])
        print(f"speed-up x{rates['parallel'] / rates['serial']:.2f}; scores identical: {'yes' if same else 'NO'}")
        rates["identical"] = float(same)
    return rates
