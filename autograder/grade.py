"""``python -m autograder grade``: grade a folder of submissions in parallel, safely, into a course folder.

``OUT_DIR`` becomes an nbgrader course folder: ``source/`` (a copy of the solutions), ``gradebook.db``,
``autograded/``, ``feedback/``, plus ``grades.csv`` (``nbgrader export``'s columns), ``cells.csv`` (one row
per graded cell, with a status and a reason), ``submissions.csv`` and ``logs/``. Workers grade submissions in
private course folders (``autograder/worker.py``); only this process writes the gradebook, after all
workers are done, with nbgrader's own ``SaveAutoGrades`` and ``AssignLatePenalties`` on the autograded
notebooks, so scores are exactly nbgrader's.
"""
from __future__ import annotations

import csv
import html
import json
import os
import shutil
import stat
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from autograder.config import CELL_TIMEOUT_S, COURSE_ID, MAX_OUTPUT_BYTES, course_config
from autograder.batteries import load_batteries
from autograder.tape import DEFAULT_CHECK_SEED, TapeStore
from autograder.types import CellRow, CourseStructure, Status
from helpers.config import KitConfig
from helpers.course import KIT_ROOT, SOLUTIONS_DIR
from autograder.worker import Result, Settings, Task, run_pool

__all__ = ["Summary", "grade", "default_workers", "visible_gpus", "scan_submissions", "CELL_COLUMNS"]

CELL_COLUMNS = list(CellRow.COLUMNS)
SUBMISSION_COLUMNS = ["student_id", "assignment", "status", "message", "score", "max_score", "seconds", "worker"]
_IGNORE = shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__", ".*")


@dataclass
class Summary:
    """What a grading run did."""

    submissions: int
    problems: int  # submissions with at least one notebook that could not be graded
    unknown: int  # folders that are not an assignment of the course
    seconds: float
    workers: int
    out_dir: Path
    phases: dict[str, float] | None = None  # seconds spent preparing, grading, merging, writing feedback
    #: answer cells the similarity check flagged (``autograder.similarity.CellSimilarity``); scores unchanged
    flagged: list = field(default_factory=list)

    @property
    def per_minute(self) -> float:
        return 60.0 * self.submissions / self.seconds if self.seconds > 0 else float("inf")


# --- machine ----------------------------------------------------------------------------------------------

def kit_private_paths() -> list[Path]:
    """The kit's folders that hold solution code in some form (the solutions, their executed copies under
    ``out/``, the tests' correct mutants, the git history, the benchmark scripts): never readable by a re-check."""
    return [SOLUTIONS_DIR, *(KIT_ROOT / name for name in (".git", "out", "tests", "scripts"))]


def visible_gpus() -> list[str]:
    """CUDA device ids this process may use (``CUDA_VISIBLE_DEVICES`` entries, else 0..n-1), without
    initialising CUDA here."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip() and d.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 - no torch or no driver
        return []


def _memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_workers(gpus: int | None = None) -> int:
    """A sensible number of workers: one per 2 CPU cores and 4 GiB of memory; with GPUs, at least one and
    at most two per GPU."""
    cores = len(os.sched_getaffinity(0))
    gpus = len(visible_gpus()) if gpus is None else gpus
    n = max(1, min(cores // 2, _memory_bytes() // 4 // 2**30))
    return max(gpus, min(n, 2 * gpus)) if gpus else n


# --- course folder ---------------------------------------------------------------------------------------

def _rmtree(path: Path) -> None:
    """Remove a folder even if nbgrader made its files read-only."""
    def onerror(func, p, _exc):
        os.chmod(p, stat.S_IWUSR | stat.S_IRUSR | stat.S_IXUSR)
        func(p)

    if path.exists():
        shutil.rmtree(path, onerror=onerror)


def _generate(root: Path, db: Path, assignments: Iterable[str]) -> None:
    """Record the assignments of ``root/source`` in the gradebook ``db`` (nbgrader generate_assignment)."""
    from nbgrader.apps import NbGraderAPI

    cfg = course_config(root, db_path=db, source_dir="source", release_dir="release")
    cfg.Application.log_level = "WARN"
    api = NbGraderAPI(config=cfg)
    for a in assignments:
        out = api.generate_assignment(a, force=True, create=True)
        if not out["success"]:
            raise RuntimeError(f"nbgrader generate_assignment failed for {a}:\n{out.get('log')}\n{out.get('error')}")


def prepare_course(out: Path, source_dir: Path, tmp: Path) -> tuple[CourseStructure, Path]:
    """Copy the sources into ``out/source``, build a template gradebook (assignments only) in ``tmp`` and
    create or update ``out/gradebook.db``; return the expected structure and the template's path."""
    if source_dir.resolve() != (out / "source").resolve():
        _rmtree(out / "source")
        shutil.copytree(source_dir, out / "source", ignore=_IGNORE)
    expected = CourseStructure.from_source(out / "source")
    template_root = tmp / "template"
    shutil.copytree(out / "source", template_root / "source")
    _generate(template_root, template_root / "gradebook.db", expected)
    main_db = out / "gradebook.db"
    if main_db.exists():
        _generate(out, main_db, expected)
    else:
        shutil.copy(template_root / "gradebook.db", main_db)
    (out / "nbgrader_config.py").write_text(
        "# Written by `python -m autograder grade`: run `nbgrader formgrader` (or `jupyter lab`) in this folder.\n"
        "from autograder.config import course_config\n\n"
        "c = get_config()  # noqa: F821\n"
        f"c.merge(course_config({str(out)!r}, source_dir='source', release_dir='release'))\n")
    return expected, template_root / "gradebook.db"


def scan_submissions(submitted: Path, expected: CourseStructure) -> tuple[list[Task], list[tuple[str, str]]]:
    """Tasks for ``submitted/<student>/<assignment>/`` folders, and (student, folder) pairs that are not an
    assignment of the course."""
    if not submitted.is_dir():
        raise FileNotFoundError(f"No folder {submitted}: pass the folder holding <student>/<assignment>/*.ipynb "
                                "(nbgrader's submitted/ layout).")
    tasks, unknown = [], []
    for student in sorted(p for p in submitted.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for folder in sorted(p for p in student.iterdir() if not p.name.startswith(".")):
            if folder.is_dir() and folder.name in expected:
                tasks.append(Task(student.name, folder.name, str(folder.resolve())))
            else:
                unknown.append((student.name, folder.name))
    return tasks, unknown


# --- merging ------------------------------------------------------------------------------------------

def _timestamp(folder: Path):
    from nbgrader.utils import parse_utc

    path = folder / "timestamp.txt"
    if not path.is_file():
        return None
    try:
        return parse_utc(path.read_text().strip())
    except (ValueError, OverflowError):
        return None


def _keep_submission(folder: Path, copy: Path) -> None:
    """Copy a graded submission folder to ``out/submitted/<student>/<assignment>`` (nbgrader's layout: the
    formgrader counts submissions there). Links are copied as links; a folder that already lies there (the
    instructor graded ``out/submitted`` itself) is left alone."""
    folder = folder.resolve()
    if folder.is_relative_to(copy.parent.parent.resolve()):
        return
    _rmtree(copy)
    shutil.copytree(folder, copy, symlinks=True, ignore=_IGNORE)


def merge(results: list[Result], tasks: dict[tuple[str, str], Task], out: Path, expected: CourseStructure
          ) -> None:
    """Write every result into ``out/gradebook.db`` (nbgrader's SaveAutoGrades/AssignLatePenalties on the
    autograded notebooks; zero for notebooks that could not be graded) and ``out/autograded``."""
    import nbformat
    from nbgrader.api import Gradebook
    from nbgrader.preprocessors import AssignLatePenalties, SaveAutoGrades

    db_url = f"sqlite:///{(out / 'gradebook.db').resolve()}"
    cfg = course_config(out, source_dir="source", release_dir="release")
    for r in results:
        with Gradebook(db_url, COURSE_ID) as gb:
            gb.update_or_create_student(r.student)
            ts = _timestamp(Path(tasks[(r.student, r.assignment)].path))
            if ts is not None:
                gb.update_or_create_submission(r.assignment, r.student, timestamp=ts)
            else:
                gb.update_or_create_submission(r.assignment, r.student)
        _keep_submission(Path(tasks[(r.student, r.assignment)].path), out / "submitted" / r.student / r.assignment)
        dest = out / "autograded" / r.student / r.assignment
        _rmtree(dest)
        dest.mkdir(parents=True)
        if ts is not None:
            (dest / "timestamp.txt").write_text(str(ts))
        for notebook in expected.notebooks(r.assignment):
            resources = {"nbgrader": {"notebook": notebook, "assignment": r.assignment, "student": r.student,
                                      "db_url": db_url}}
            if notebook in r.notebooks:
                node = nbformat.reads(r.notebooks[notebook], as_version=4)
                SaveAutoGrades(config=cfg).preprocess(node, resources)
                AssignLatePenalties(config=cfg).preprocess(node, resources)
                (dest / f"{notebook}.ipynb").write_text(r.notebooks[notebook], encoding="utf-8")
            else:
                with Gradebook(db_url, COURSE_ID) as gb:
                    submission = gb.find_submission_notebook(notebook, r.assignment, r.student)
                    for g in submission.grades:
                        g.auto_score, g.needs_manual_grade = 0, False
                    submission.late_submission_penalty = None
                    gb.db.commit()


def _scores(out: Path) -> dict[tuple[str, str, str, str], float | None]:
    from nbgrader.api import Gradebook

    scores = {}
    with Gradebook(f"sqlite:///{(out / 'gradebook.db').resolve()}", COURSE_ID) as gb:
        for a in gb.assignments:
            for sub in a.submissions:
                for nb in sub.notebooks:
                    for g in nb.grades:
                        scores[(sub.student.id, a.name, nb.name, g.name)] = g.score
    return scores


# --- outputs ------------------------------------------------------------------------------------------

def _write_csv(path: Path, columns: list[str], rows: Iterable[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow(row)


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{float(value):g}"


def write_reports(out: Path, results: list[Result], unknown: list[tuple[str, str]],
                  similar: Iterable = ()) -> None:
    """``grades.csv`` (nbgrader's CSV export), ``cells.csv``, ``submissions.csv`` and the logs. ``similar``: the
    similarity check's rows (``autograder.similarity``); a tests cell ``test_<fn>`` gets the highest similarity of
    its answer cell ``<fn>`` in ``cells.csv``'s ``similarity`` column."""
    from nbgrader.api import Gradebook
    from nbgrader.plugins import CsvExportPlugin

    with Gradebook(f"sqlite:///{(out / 'gradebook.db').resolve()}", COURSE_ID) as gb:
        CsvExportPlugin(to=str(out / "grades.csv")).export(gb)
    scores = _scores(out)
    similarity = {(c.student, c.assignment, c.notebook, c.grade_id): f"{c.max_similarity:.2f}" for c in similar}
    cell_rows, sub_rows = [], []
    for r in results:
        total = maximum = 0.0
        for c in r.cells:
            score = scores.get((r.student, r.assignment, c.notebook, c.grade_id))
            total += score or 0.0
            maximum += c.max_score
            cell_rows.append({"student_id": r.student, "assignment": r.assignment, "notebook": c.notebook,
                              "grade_id": c.grade_id, "score": _fmt(score), "max_score": _fmt(c.max_score),
                              "status": c.status, "message": c.message,
                              "similarity": similarity.get((r.student, r.assignment, c.notebook,
                                                            c.grade_id.removeprefix("test_")), "")})
        sub_rows.append({"student_id": r.student, "assignment": r.assignment, "status": r.status,
                         "message": r.message, "score": _fmt(total), "max_score": _fmt(maximum),
                         "seconds": f"{r.seconds:.1f}", "worker": r.worker})
        log = out / "logs" / r.student / f"{r.assignment}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(r.log, encoding="utf-8")
    for student, folder in unknown:
        message = f"{folder!r} is not an assignment of the course"
        cell_rows.append({"student_id": student, "assignment": folder, "notebook": "", "grade_id": "", "score": "0",
                          "max_score": "0", "status": Status.UNKNOWN_ASSIGNMENT, "message": message,
                          "similarity": ""})
        sub_rows.append({"student_id": student, "assignment": folder, "status": Status.UNKNOWN_ASSIGNMENT,
                         "message": message, "score": "0", "max_score": "0", "seconds": "0", "worker": ""})
    _write_csv(out / "cells.csv", CELL_COLUMNS, cell_rows)
    _write_csv(out / "submissions.csv", SUBMISSION_COLUMNS, sub_rows)


def _failure_page(r: Result, notebook: str, reason: tuple[str, str]) -> str:
    status, message = reason
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(notebook)}</title></head><body>"
            f"<h1>{html.escape(r.assignment)} / {html.escape(notebook)}.ipynb</h1>"
            f"<p>This notebook could not be graded: <b>{html.escape(status)}</b>.</p>"
            f"<p>{html.escape(message)}</p><p>Score: 0.</p></body></html>")


def write_feedback(out: Path, results: list[Result]) -> None:
    """HTML feedback in ``out/feedback/<student>/<assignment>/``: nbgrader's generate_feedback for graded
    notebooks, a page with the reason for notebooks that could not be graded."""
    from nbgrader.apps import NbGraderAPI

    cfg = course_config(out, source_dir="source", release_dir="release")
    cfg.Application.log_level = "ERROR"
    api = NbGraderAPI(config=cfg)
    for r in results:
        dest = out / "feedback" / r.student / r.assignment
        _rmtree(dest)
        if r.notebooks:
            res = api.generate_feedback(r.assignment, r.student, force=True)
            if not res["success"]:
                r.log += f"\n[feedback] generate_feedback failed:\n{res.get('log')}\n{res.get('error')}"
        failed = {c.notebook: (c.status, c.message) for c in r.cells if c.notebook not in r.notebooks}
        for notebook, reason in failed.items():
            dest.mkdir(parents=True, exist_ok=True)
            (dest / f"{notebook}.html").write_text(_failure_page(r, notebook, reason), encoding="utf-8")


# --- the command ------------------------------------------------------------------------------------------

def _settings(n: int, source: Path, template: Path, expected: CourseStructure, tmp: Path, protected: list[Path],
              check_modules: tuple[str, ...], cell_timeout: int, memory_gb: float | None, recheck: bool
              ) -> list[Settings]:
    gpus = visible_gpus()
    threads = max(1, len(os.sched_getaffinity(0)) // n)
    if memory_gb:
        memory: int | None = int(memory_gb * 2**30)
    elif gpus:
        memory = None  # CUDA maps large address ranges; a host limit is only set when asked (--memory-gb)
    else:
        memory = max(2 * 2**30, int(0.8 * _memory_bytes() / n))
    logs = source.parent / "logs"
    logs.mkdir(exist_ok=True)
    return [Settings(source_dir=str(source), template_db=str(template), expected=expected,
                     check_modules=check_modules, cell_timeout=cell_timeout, memory_bytes=memory,
                     threads=threads, gpu=gpus[i % len(gpus)] if gpus else None, tmp_root=str(tmp),
                     protected=tuple(str(p) for p in protected), max_output_bytes=MAX_OUTPUT_BYTES,
                     recheck=recheck, worker_id=i, log_path=str(logs / f"worker-{i}.log")) for i in range(n)]


def _record_tapes(source: Path, check_modules: tuple[str, ...], tape_dir: Path) -> float:
    """Record every battery's tape into ``tape_dir`` (the workers load them); return the seconds it took."""
    started = time.monotonic()
    batteries = load_batteries(check_modules)
    seed = KitConfig.from_environ().check_seed
    TapeStore(source, batteries.checks, batteries.depends, tape_dir,
              DEFAULT_CHECK_SEED if seed is None else seed).record_all()
    return time.monotonic() - started


def grade(submitted_dir: str | Path, out_dir: str | Path, workers: int | None = None,
          timeout: int = CELL_TIMEOUT_S, source_dir: str | Path | None = None,
          check_modules: Iterable[str] = ("autograder.checks",), memory_gb: float | None = None,
          submission_timeout: float | None = None, recheck: bool = True, progress: bool = True) -> Summary:
    """Grade every ``submitted_dir/<student>/<assignment>/`` into the course folder ``out_dir``.

    ``workers``: parallel worker processes (default :func:`default_workers`); ``timeout``: per-cell limit in
    seconds (kernel cells and the isolated re-check); ``source_dir``: the source notebooks (default the kit's
    ``solutions/``); ``check_modules``: modules defining the hidden batteries; ``memory_gb``: memory limit of
    each kernel and re-check process; ``recheck=False`` skips the isolated re-check (not for real grading).
    """
    from tqdm.auto import tqdm

    from autograder.config import ensure_tools_on_path, fast_gradebook_creation
    ensure_tools_on_path()
    fast_gradebook_creation()
    started = time.monotonic()
    submitted, out = Path(submitted_dir).resolve(), Path(out_dir).resolve()
    source = Path(source_dir or SOLUTIONS_DIR).resolve()
    if not source.is_dir():
        raise FileNotFoundError(f"No source notebooks in {source}: pass --source (the solutions folder).")
    if out == submitted or submitted in out.parents:
        raise ValueError(f"--out {out} must not be inside the submitted folder {submitted}.")
    out.mkdir(parents=True, exist_ok=True)
    n = workers or default_workers()
    phases: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="cd-grade-") as tmp_name:
        tmp = Path(tmp_name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SQLAlchemy warnings from inside nbgrader
            expected, template = prepare_course(out, source, tmp)
        phases["prepare"] = time.monotonic() - started
        tasks, unknown = scan_submissions(submitted, expected)
        protected = [source, out, submitted, tmp, *kit_private_paths()]
        if recheck and tasks:  # the reference's values on each battery, recorded once before any kernel runs
            phases["record"] = _record_tapes(out / "source", tuple(check_modules), tmp / "tapes")
        settings = _settings(n, out / "source", template, expected, tmp, protected, tuple(check_modules),
                             timeout, memory_gb, recheck)
        limit = submission_timeout or timeout * (max(_code_cells(out / "source")) + 5)
        results: list[Result] = []
        with tqdm(total=len(tasks), desc="grading", unit="submission", disable=not progress,
                  file=sys.stderr) as bar:
            def done(result: Result) -> None:
                results.append(result)
                bar.update(1)
                bar.set_postfix_str(f"{result.student}/{result.assignment}: {result.status}")

            if tasks:
                run_pool(tasks, settings, done, limit)
        phases["grade"] = time.monotonic() - started - sum(phases.values())
    results.sort(key=lambda r: (r.student, r.assignment))
    by_key = {(t.student, t.assignment): t for t in tasks}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SQLAlchemy and nbformat warnings from inside nbgrader
        merge(results, by_key, out, expected)
        phases["merge"] = time.monotonic() - started - sum(phases.values())
        write_feedback(out, results)
        phases["feedback"] = time.monotonic() - started - sum(phases.values())
        similar = _similarity(out)  # after the feedback: this run's feedback never shows the notes
        phases["similarity"] = time.monotonic() - started - sum(phases.values())
        write_reports(out, results, unknown, similar)
    problems = sum(1 for r in results if any(c.notebook not in r.notebooks for c in r.cells))
    return Summary(len(results), problems, len(unknown), time.monotonic() - started, n, out, phases,
                   [c for c in similar if c.flagged])


def _similarity(out: Path) -> list:
    """The copy-detection report (``similarity.csv``, gradebook notes). It only informs the instructor: a failure
    here is reported and leaves every grading output as it is."""
    from autograder.similarity import report

    try:
        return report(out)
    except Exception as err:  # noqa: BLE001 - a report, never a reason to lose the grades
        print(f"warning: the similarity check failed ({type(err).__name__}: {err}); similarity.csv not written",
              file=sys.stderr)
        return []


def _code_cells(source: Path) -> list[int]:
    counts = [sum(1 for c in json.loads(p.read_text(encoding="utf-8")).get("cells", []) if c.get("cell_type") == "code")
              for p in source.glob("*/*.ipynb")]
    return counts or [0]
