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

__all__ = ["bench", "make_reference_folder", "bench_vs_nbgrader", "make_mixed_folder", "plain_nbgrader"]


def _released(dest: Path, source_dir: str | Path, assignments: Iterable[str] | None):
    """The course released next to ``dest`` and the chosen assignments (default: all); unknown ones refused."""
    from autograder.testing import CourseFiles

    course = CourseFiles.build(source_dir, dest.parent / f"{dest.name}-release")
    chosen = list(assignments) if assignments else list(course.reference)
    unknown = [a for a in chosen if a not in course.reference]
    if unknown:
        raise KeyError(f"No assignment {unknown} in {source_dir}; it has {list(course.reference)}")
    return course, chosen


def make_reference_folder(dest: str | Path, copies: int, source_dir: str | Path,
                          assignments: Iterable[str] | None = None) -> int:
    """Write ``dest/student-XX/<assignment>/`` reference submissions; return how many."""
    from autograder.testing import reference_case

    dest = Path(dest)
    course, chosen = _released(dest, source_dir, assignments)
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


# --- against plain nbgrader (issue 17, item 5) -------------------------------------------------------------

def constant_case(course, a: str) -> dict[str, str]:
    """Every answer cell returns a constant: a wrong submission without any tampering."""
    from autograder.testing import answer_grade_ids, dump, substitute

    name, nb = course.notebook(a)
    for fn in answer_grade_ids(nb):
        nb = substitute(nb, fn, f"def {fn}(*args, **kwargs):\n    return 0\n")
    return {f"{name}.ipynb": dump(nb)}


def _faulty_cases() -> dict:
    from autograder.testing import blank_case, monkeypatch_case, truncated_json_case

    return {"blank": blank_case, "constant": constant_case, "monkeypatch": monkeypatch_case,
            "truncated_json": truncated_json_case}


#: Why the two graders may disagree on a faulty case, or why plain nbgrader gives no grade at all.
WHY = {
    "monkeypatch": "the notebook patches the tests in its own kernel; plain nbgrader scores what the kernel reports, "
                   "the kit re-runs each answer cell alone in a fresh process (recheck_failed)",
    "truncated_json": "not a readable notebook: plain nbgrader's autograde fails on it and records no grade; the kit "
                      "records 0 with the reason (invalid_notebook)",
    "constant": "the kit's own notebooks compare values with the reference only in the kit's re-check (the kernel is "
                "never given the reference): plain nbgrader runs their behaviour checks only",
}


def make_mixed_folder(dest: str | Path, copies: int, source_dir: str | Path,
                      assignments: Iterable[str] | None = None) -> list[tuple[str, str, str]]:
    """``dest/<case>-XX/<assignment>/``: ``copies`` reference students and as many of each faulty case; return
    (student, assignment, case) of every submission."""
    from autograder.testing import reference_case

    dest = Path(dest)
    course, chosen = _released(dest, source_dir, assignments)
    cases = {"reference": reference_case, **_faulty_cases()}
    made = []
    for k in range(copies):
        for case, build in cases.items():
            for a in chosen:
                course.write(dest / f"{case}-{k:02d}" / a, build(course, a))
                made.append((f"{case}-{k:02d}", a, case))
    return made


def _auto_scores(db: Path, course_id: str) -> dict[tuple[str, str, str, str], float | None]:
    from nbgrader.api import Gradebook

    with Gradebook(f"sqlite:///{db.resolve()}", course_id) as gb:
        return {(sub.student.id, a.name, nb.name, g.name): g.auto_score
                for a in gb.assignments for sub in a.submissions for nb in sub.notebooks for g in nb.grades}


def plain_nbgrader(root: Path, source: Path, submitted: Path, assignments: list[str], timeout: int,
                   env: dict[str, str]) -> tuple[float, dict[str, int]]:
    """The documented serial flow in a fresh nbgrader course at ``root``: ``nbgrader generate_assignment`` (not
    timed: done once before collecting), the submissions in ``submitted/``, then ``nbgrader autograde A`` per
    assignment (timed). Returns the seconds of autograde and its exit code per assignment."""
    import shutil
    import subprocess
    import sys

    root.mkdir(parents=True)
    shutil.copytree(source, root / "source")
    (root / "nbgrader_config.py").write_text(
        "c = get_config()  # noqa: F821\n"
        f"c.CourseDirectory.course_id = {NBGRADER_COURSE!r}\n"
        f"c.CourseDirectory.root = {str(root)!r}\n"
        f"c.Execute.timeout = {int(timeout)}\n")
    nbgrader = [sys.executable, "-m", "nbgrader"]
    for a in assignments:
        done = subprocess.run([*nbgrader, "generate_assignment", a, "--force"], cwd=root, env=env,
                              capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"nbgrader generate_assignment {a} failed:\n{done.stdout}{done.stderr}")
    shutil.copytree(submitted, root / "submitted")
    codes = {}
    started = time.monotonic()
    for a in assignments:
        with open(root / f"autograde-{a}.log", "w", encoding="utf-8") as log:
            codes[a] = subprocess.run([*nbgrader, "autograde", a, "--force"], cwd=root, env=env, stdout=log,
                                      stderr=subprocess.STDOUT).returncode
    return time.monotonic() - started, codes


NBGRADER_COURSE = "plain-nbgrader"


def _compare(made: list[tuple[str, str, str]], kit_out: Path, nbg_root: Path) -> list[dict]:
    """One row per submission: both graders' totals over the automatically graded cells, and whether they agree."""
    from autograder.config import COURSE_ID

    kit_rows = _cells(kit_out)
    kit_scores = _auto_scores(kit_out / "gradebook.db", COURSE_ID)
    nbg_scores = _auto_scores(nbg_root / "gradebook.db", NBGRADER_COURSE)
    found = []
    for student, a, case in made:
        cells = [r for r in kit_rows if r["student_id"] == student and r["assignment"] == a and r["status"] != "manual"
                 and r["grade_id"]]
        keys = [(student, a, r["notebook"], r["grade_id"]) for r in cells]
        kit_total = sum(kit_scores.get(k) or 0.0 for k in keys)
        graded = all((nbg_root / "autograded" / student / a / f"{k[2]}.ipynb").is_file() for k in keys) and bool(keys)
        nbg = [nbg_scores.get(k) for k in keys] if graded else None
        agree = None if nbg is None else all((x or 0.0) == (kit_scores.get(k) or 0.0) for x, k in zip(nbg, keys))
        found.append({"student": student, "assignment": a, "case": case, "kit_score": kit_total,
                      "kit_statuses": sorted({r["status"] for r in cells}),
                      "nbgrader_score": None if nbg is None else sum(x or 0.0 for x in nbg),
                      "nbgrader_graded": graded, "agree": agree,
                      "why": "" if agree else WHY.get(case, "see the statuses")})
    return found


def bench_vs_nbgrader(copies: int = 1, workers: int | None = None, assignments: Iterable[str] | None = None,
                      timeout: int = 120, source_dir: str | Path | None = None,
                      check_modules: tuple[str, ...] = ("autograder.checks",), memory_gb: float | None = None,
                      keep: str | Path | None = None, json_path: str | Path | None = None) -> dict:
    """Grade ``copies`` reference students and as many of each faulty case (:func:`make_mixed_folder`) with plain
    ``nbgrader autograde`` (serial) and with the kit (1 and ``workers`` workers); print and return (and write to
    ``json_path``) submissions per minute, the ratios and the per-submission agreement of the scores."""
    import os
    import platform

    from autograder.grade import default_workers, grade
    from autograder.tape import DEFAULT_CHECK_SEED
    from helpers.config import KitConfig
    from helpers.course import SOLUTIONS_DIR

    source = Path(source_dir or SOLUTIONS_DIR).resolve()
    workers = workers or default_workers()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="cd-bench-nbg-") as tmp_name:
        root = Path(keep).resolve() if keep else Path(tmp_name)
        root.mkdir(parents=True, exist_ok=True)
        made = make_mixed_folder(root / "submitted", copies, source, assignments)
        chosen = sorted({a for _, a, _ in made})
        config = KitConfig.from_environ()
        seed = DEFAULT_CHECK_SEED if config.check_seed is None else config.check_seed
        # the kernels of plain nbgrader see what the kit's grading worker gives its kernels: the source, the seed
        env = dict(os.environ, **config.replace(solutions=str(source), check_seed=seed).to_environ())
        n = len(made)
        runs: dict[str, dict] = {}
        partial = {"submissions": n, "assignments": chosen, "runs": runs, "complete": False}
        seconds, codes = plain_nbgrader(root / "nbgrader", source, root / "submitted", chosen, timeout, env)
        runs["nbgrader"] = {"workers": 1, "seconds": seconds, "per_minute": 60.0 * n / seconds,
                            "exit_codes": codes}
        print(f"plain nbgrader autograde   workers=1   submissions={n:<4d} seconds={seconds:7.1f} "
              f"submissions/min={runs['nbgrader']['per_minute']:6.2f}", flush=True)
        _dump(json_path, partial)  # each run as it ends: a run cut short by a time limit keeps what it measured
        for label, w in (("kit_serial", 1), ("kit_parallel", workers)):
            started = time.monotonic()
            grade(root / "submitted", root / label, workers=w, timeout=timeout, source_dir=source,
                  check_modules=check_modules, memory_gb=memory_gb, progress=False)
            seconds = time.monotonic() - started
            runs[label] = {"workers": w, "seconds": seconds, "per_minute": 60.0 * n / seconds}
            print(f"kit {label[4:]:<22s} workers={w:<3d} submissions={n:<4d} seconds={seconds:7.1f} "
                  f"submissions/min={runs[label]['per_minute']:6.2f}", flush=True)
            _dump(json_path, partial)
        rows = _compare(made, root / "kit_serial", root / "nbgrader")
        same = _cells(root / "kit_serial") == _cells(root / "kit_parallel")
    load_after = os.getloadavg()
    base = runs["nbgrader"]["per_minute"]
    result = {"submissions": n, "copies": copies, "assignments": chosen, "cases": sorted({c for *_, c in made}),
              "timeout": timeout, "runs": runs, "complete": True,
              "ratio_kit_serial": runs["kit_serial"]["per_minute"] / base,
              "ratio_kit_parallel": runs["kit_parallel"]["per_minute"] / base,
              "kit_serial_equals_parallel": same, "submissions_compared": rows,
              "machine": {"host": platform.node(), "cpus": len(os.sched_getaffinity(0)), "gpu": _gpu_name(),
                          "load_before": load_before, "load_after": load_after}}
    print(f"ratio vs plain nbgrader: kit 1 worker x{result['ratio_kit_serial']:.2f}, "
          f"kit {workers} workers x{result['ratio_kit_parallel']:.2f}; kit serial == parallel: {'yes' if same else 'NO'}")
    graded = [r for r in rows if r["nbgrader_graded"]]
    print(f"scores agree on {sum(1 for r in graded if r['agree'])} of {len(graded)} submissions plain nbgrader "
          f"graded; {len(rows) - len(graded)} it could not grade")
    for r in rows:
        if not r["agree"]:
            nbg = "no grade" if r["nbgrader_score"] is None else f"{r['nbgrader_score']:g}"
            print(f"  {r['student']}/{r['assignment']}: kit {r['kit_score']:g} ({', '.join(r['kit_statuses'])}), "
                  f"plain nbgrader {nbg}: {r['why']}")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    if json_path:
        _dump(json_path, result)
        print(f"wrote {json_path}")
    return result


def _dump(path: str | Path | None, data: dict) -> None:
    import json

    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _gpu_name() -> str | None:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001 - no torch or no driver: a CPU machine
        return None
