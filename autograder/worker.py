"""Grading one submission in a private course folder, and the worker processes that do it in parallel.

nbgrader's SQLite gradebook is not safe for concurrent ``autograde`` runs (nbgrader issue #174), so a worker
grades each submission in its own temporary course folder with a copy of a *template* gradebook (the
assignments, no students), and returns the autograded notebooks and the per-cell statuses to the main
process, which alone writes the real gradebook (``autograder/grade.py``).
"""
from __future__ import annotations

import json
import os
import re
import resource
import shutil
import tempfile
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing import get_context
from multiprocessing.connection import wait
from pathlib import Path

import nbformat
from nbgrader.apps import NbGraderAPI
from nbgrader.utils import parse_utc

from autograder.config import grading_config
from autograder.forkserver import RecheckClient
from autograder.kernels import KernelForkClient, set_fork_client
from autograder.procs import become_subreaper, children, kill_new_children, kill_tree
from autograder.types import CellRow, CourseStructure, GradingSession, Status
from helpers.config import KitConfig

__all__ = ["Settings", "Task", "Result", "screen_notebook", "grade_submission", "run_pool"]

_EXCEPTION_LINE = re.compile(r"^\s*((?:[\w.]+)(?:Error|Exception|Exit)\b.*)$", re.MULTILINE)
_LOG_ERROR_HINTS = (("metadata may be corrupted", Status.INVALID_NOTEBOOK,
                     "the nbgrader metadata of the notebook is corrupted; restore the cells' metadata"),
                    ("Notebook JSON is invalid", Status.INVALID_NOTEBOOK, "the notebook does not follow the notebook format"),
                    ("NotJSONError", Status.INVALID_NOTEBOOK, "the notebook is not valid JSON"))


@dataclass(frozen=True)
class Settings:
    """Everything a worker needs (picklable; one per worker process)."""

    source_dir: str  # <course>/source: assignment folders with the source (solution) notebooks
    template_db: str  # gradebook with the assignments and no students
    expected: CourseStructure  # assignment -> notebook -> graded cells and grade ids (autograder.types)
    check_modules: tuple[str, ...] = ("autograder.checks",)
    cell_timeout: int = 120
    memory_bytes: int | None = None
    threads: int = 1
    gpu: str | None = None
    tmp_root: str = ""
    protected: tuple[str, ...] = ()
    max_notebook_bytes: int = 100 * 2**20
    max_output_bytes: int = 1_000_000
    recheck: bool = True
    worker_id: int = 0
    seed: int = 20241125  # CD_KIT_CHECK_SEED of the batteries (unless set): every run sees the same inputs
    log_path: str | None = None  # the worker's stderr (and its kernels')
    fork_kernels: bool = True  # start kernels from a pre-warmed fork server (autograder/kernels.py)


@dataclass(frozen=True)
class Task:
    """One submission: ``<submitted>/<student>/<assignment>/``."""

    student: str
    assignment: str
    path: str


@dataclass
class Result:
    """What a worker returns for a submission."""

    student: str
    assignment: str
    status: Status  # graded, or the reason no notebook could be graded
    message: str = ""
    notebooks: dict[str, str] = field(default_factory=dict)  # notebook -> autograded JSON text
    cells: list[CellRow] = field(default_factory=list)
    log: str = ""
    seconds: float = 0.0
    worker: int = 0


# --- one submission -----------------------------------------------------------------------------------

def _grade_ids(nb: dict) -> set[str]:
    return {c.get("metadata", {}).get("nbgrader", {}).get("grade_id") for c in nb.get("cells", [])
            if isinstance(c, dict) and isinstance(c.get("metadata"), dict)
            and isinstance(c["metadata"].get("nbgrader"), dict)} - {None}


def screen_notebook(path: Path, assignment: str, notebook: str, expected: CourseStructure, max_bytes: int
                    ) -> tuple[Status, str] | None:
    """Why the submitted ``path`` cannot be graded as ``assignment/notebook`` (status, message), or None."""
    size = path.stat().st_size
    if size > max_bytes:
        return Status.INVALID_NOTEBOOK, (f"{path.name} is {size / 2**20:.0f} MB (limit {max_bytes / 2**20:.0f} MB): clear "
                                    "the outputs (Edit > Clear Outputs of All Cells) and submit again")
    try:
        text = path.read_text(encoding="utf-8")
        raw = json.loads(text)
        nb = nbformat.reads(text, as_version=4)
        if not isinstance(raw, dict) or not isinstance(nb.get("cells"), list):
            raise ValueError("no list of cells")
    except Exception as err:  # noqa: BLE001 - JSON, encoding, schema and conversion errors alike
        return Status.INVALID_NOTEBOOK, (f"{path.name} is not a readable notebook ({type(err).__name__}: "
                                    f"{str(err)[:200]}); it may be truncated: restore it from a checkpoint or "
                                    "re-download it, and submit again")
    ids = _grade_ids(raw)
    own = expected.notebooks(assignment)[notebook].ids
    owner = expected.owner_of(ids) if ids and not ids & own else None
    if owner is not None:
        other_a, other_nb = owner
        return Status.WRONG_ASSIGNMENT, (f"{path.name} holds the cells of {other_a}/{other_nb}.ipynb, not of "
                                         f"{assignment}/{notebook}.ipynb: submit the right notebook")
    return None


def _valid_timestamp(path: Path) -> bool:
    try:
        parse_utc(path.read_text().strip())
        return True
    except (ValueError, OverflowError, UnicodeDecodeError):
        return False


def _stage(task: Task, settings: Settings, root: Path) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """Lay out the temporary course; return ``{notebook: (status, message)}`` of notebooks that cannot be
    graded and the notebooks that can."""
    expected = settings.expected.notebooks(task.assignment)
    shutil.copytree(Path(settings.source_dir) / task.assignment, root / "source" / task.assignment)
    dest = root / "submitted" / task.student / task.assignment
    dest.mkdir(parents=True)
    submitted = Path(task.path)
    rejected: dict[str, tuple[str, str]] = {}
    for item in sorted(submitted.iterdir()):
        if item.is_file() and item.stat().st_size <= settings.max_notebook_bytes and item.suffix != ".ipynb":
            if item.name == "timestamp.txt" and not _valid_timestamp(item):
                continue  # nbgrader would stop on it; the submission is graded as undated
            shutil.copy(item, dest / item.name)
    found = sorted(p.stem for p in submitted.glob("*.ipynb"))
    to_grade = []
    for notebook in expected:
        path = submitted / f"{notebook}.ipynb"
        if not path.is_file():
            others = [f"{n}.ipynb" for n in found if n not in expected]
            rejected[notebook] = (Status.MISSING, f"{notebook}.ipynb was not submitted"
                                  + (f" (found {', '.join(others)}: rename it?)" if others else ""))
            continue
        problem = screen_notebook(path, task.assignment, notebook, settings.expected, settings.max_notebook_bytes)
        if problem:
            rejected[notebook] = problem
            continue
        shutil.copy(path, dest / path.name)
        to_grade.append(notebook)
    shutil.copy(settings.template_db, root / "gradebook.db")
    return rejected, to_grade


def _log_problem(log: str) -> tuple[str, str]:
    for hint, status, message in _LOG_ERROR_HINTS:
        if hint in log:
            return status, message
    errors = [m.group(1) for m in _EXCEPTION_LINE.finditer(log) if "NbGraderException" not in m.group(1)]
    return Status.GRADER_ERROR, "nbgrader failed: " + (errors[-1][:300] if errors else "see logs/<student>/<assignment>.log")


def grade_submission(task: Task, settings: Settings) -> Result:
    """Autograde one submission in a temporary course folder (the worker's process must be set up with
    :func:`init_worker` for the re-check)."""
    session = GradingSession.current()
    started = time.monotonic()
    result = Result(task.student, task.assignment, Status.GRADED, worker=settings.worker_id)
    root = Path(tempfile.mkdtemp(prefix="submission-", dir=settings.tmp_root or None))
    try:
        rejected, to_grade = _stage(task, settings, root)
        failures: dict[str, tuple[str, str]] = dict(rejected)
        if to_grade:
            for notebook in to_grade:
                session.results.pop((task.student, task.assignment, notebook), None)
            cfg = grading_config(root, root / "gradebook.db", settings.cell_timeout, settings.max_output_bytes)
            api = NbGraderAPI(config=cfg)
            out = api.autograde(task.assignment, task.student, force=True, create=True)
            result.log = str(out.get("log", "")) + (f"\n{out['error']}" if out.get("error") else "")
            for notebook in to_grade:
                graded = root / "autograded" / task.student / task.assignment / f"{notebook}.ipynb"
                key = (task.student, task.assignment, notebook)
                if out.get("success") and graded.is_file() and key in session.results:
                    result.notebooks[notebook] = graded.read_text(encoding="utf-8")
                else:
                    failures[notebook] = _log_problem(result.log)
        result.cells = _cell_rows(task, settings, failures, session)
        if failures and not result.notebooks:
            result.status, result.message = next(iter(failures.values()))
    except Exception as err:  # noqa: BLE001 - a broken submission must never stop the batch
        result.status, result.message = Status.GRADER_ERROR, f"{type(err).__name__}: {err}"
        result.log += "\n" + traceback.format_exc()
        result.notebooks = {}
        result.cells = _cell_rows(task, settings, session=session, failures={nb: (result.status, result.message)
                                                   for nb in settings.expected.notebooks(task.assignment)})
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result.seconds = round(time.monotonic() - started, 2)
    return result


def _cell_rows(task: Task, settings: Settings, failures: dict[str, tuple[Status, str]], session: GradingSession
               ) -> list[CellRow]:
    rows = []
    for notebook, spec in settings.expected.notebooks(task.assignment).items():
        recorded = session.results.pop((task.student, task.assignment, notebook), {})
        for cell in spec.cells:
            if notebook in failures:
                status, message = failures[notebook]
            elif cell.grade_id in recorded:
                status, message = recorded[cell.grade_id].status, recorded[cell.grade_id].message
            else:
                status, message = Status.GRADER_ERROR, "the cell was not graded"
            rows.append(CellRow(notebook, cell.grade_id, cell.max_score, status, message))
    return rows


# --- worker processes --------------------------------------------------------------------------------

def init_worker(settings: Settings):
    """Set up a worker process: device, threads, memory limit, orphan reaping, and the re-check server."""
    if settings.gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = settings.gpu
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(settings.threads)
    # idle OpenMP threads sleep instead of spinning: kernels, re-checks and feedback share the cores
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # the kit's settings, read once here and handed to the kernels and re-checks this worker starts: the graded
    # source copy, autograde mode (nbgrader sets it too), and the batteries' fixed seed unless one was set
    config = KitConfig.from_environ()
    config = config.replace(solutions=settings.source_dir, execution="autograde",
                            check_seed=settings.seed if config.check_seed is None else config.check_seed)
    os.environ.update(config.to_environ())
    if settings.log_path:
        fd = os.open(settings.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 2)
        os.close(fd)
    os.environ.setdefault("MPLBACKEND", "Agg")
    os.environ["PYDEVD_DISABLE_FILE_VALIDATION"] = "1"
    if settings.memory_bytes:
        resource.setrlimit(resource.RLIMIT_DATA, (settings.memory_bytes, settings.memory_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    become_subreaper()
    kernels = None
    if settings.fork_kernels:
        kernels = KernelForkClient(settings.source_dir)
        kernels.start()  # preloads while the first submission is staged
        set_fork_client(kernels)
    client = None
    if settings.recheck:
        log = Path(settings.tmp_root) / f"forkserver-{settings.worker_id}.log" if settings.tmp_root else None
        client = RecheckClient(settings.source_dir, list(settings.check_modules), list(settings.protected),
                               settings.cell_timeout, settings.memory_bytes, settings.threads, log,
                               tape_dir=Path(settings.tmp_root) / "tapes" if settings.tmp_root else None)
        client.start()
        client.prepare()  # the tapes the main process recorded, in memory before the first kernel runs
    GradingSession(rechecker=client).install()
    return client, kernels


def worker_main(conn, settings: Settings) -> None:
    """Loop of a worker process: receive a :class:`Task`, send back its :class:`Result`; None stops it."""
    client, kernels = init_worker(settings)
    try:
        while True:
            task = conn.recv()
            if task is None:
                break
            try:
                result = grade_submission(task, settings)
            except BaseException as err:  # noqa: BLE001
                result = Result(task.student, task.assignment, Status.GRADER_ERROR, f"{type(err).__name__}: {err}")
            servers = {s.pid for s in (client, kernels) if s is not None and s.pid}
            for kernel in kernels.kernels() if kernels is not None else []:
                kill_tree(kernel)  # this submission's kernels, if still running
            kill_new_children(servers)  # and whatever they left running
            conn.send(result)
    except (EOFError, KeyboardInterrupt):
        pass
    finally:
        for server in (client, kernels):
            if server is not None:
                server.close()


@dataclass
class _Worker:
    process: object
    conn: object
    settings: Settings
    task: Task | None = None
    started: float = 0.0


def _start(ctx, settings: Settings) -> _Worker:
    parent, child = ctx.Pipe()
    process = ctx.Process(target=worker_main, args=(child, settings), daemon=True,
                          name=f"autograder-worker-{settings.worker_id}")
    process.start()
    child.close()
    return _Worker(process, parent, settings)


def _failed(task: Task, settings: Settings, status: Status, message: str) -> Result:
    cells = [CellRow(nb, cell.grade_id, cell.max_score, status, message)
             for nb, spec in settings.expected.notebooks(task.assignment).items() for cell in spec.cells]
    return Result(task.student, task.assignment, status, message, cells=cells, worker=settings.worker_id)


def run_pool(tasks: list[Task], settings: list[Settings], on_result: Callable[[Result], None],
             submission_timeout: float) -> None:
    """Grade ``tasks`` with one worker process per entry of ``settings``; call ``on_result`` in this process
    for each result, in completion order. A worker that dies or exceeds ``submission_timeout`` on a
    submission is replaced, and that submission gets a result with the reason."""
    become_subreaper()
    ctx = get_context("spawn")
    pending = deque(tasks)
    workers = [_start(ctx, s) for s in settings[: max(1, min(len(settings), len(tasks)))]]
    keep = set(children(os.getpid()))  # the workers and multiprocessing's own helpers
    try:
        while pending or any(w.task for w in workers):
            for w in workers:
                if w.task is None and pending:
                    w.task, w.started = pending.popleft(), time.monotonic()
                    w.conn.send(w.task)
            busy = [w for w in workers if w.task is not None]
            ready = wait([w.conn for w in busy] + [w.process.sentinel for w in busy], timeout=1.0)
            for i, w in enumerate(workers):
                if w.task is None:
                    continue
                if w.conn in ready:
                    try:
                        result = w.conn.recv()
                    except (EOFError, OSError):
                        result = None
                    if result is not None:
                        w.task = None
                        on_result(result)
                        continue
                overdue = time.monotonic() - w.started > submission_timeout
                if w.process.sentinel in ready or not w.process.is_alive() or overdue:
                    w.process.join(timeout=1.0)
                    status, message = (("timeout", f"grading took longer than {submission_timeout:g} s; stopped")
                                       if overdue else
                                       (Status.GRADER_ERROR, f"the grading worker was killed or crashed (exit code "
                                                        f"{w.process.exitcode}) while grading this submission"))
                    task = w.task
                    kill_tree(w.process.pid)
                    keep.discard(w.process.pid)
                    kill_new_children(keep)  # what the dead worker's kernels left behind
                    workers[i] = _start(ctx, w.settings)
                    keep.add(workers[i].process.pid)
                    on_result(_failed(task, w.settings, status, message))
    finally:
        for w in workers:
            try:
                w.conn.send(None)
            except (OSError, BrokenPipeError):
                pass
        for w in workers:
            w.process.join(timeout=30)
            if w.process.is_alive():
                kill_tree(w.process.pid)
