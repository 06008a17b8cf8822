"""The grader's data, typed: statuses, the course structure, re-check verdicts, ``cells.csv`` rows, and the
grading session of a worker process.

Every status the grader writes is a :class:`Status` (a ``StrEnum``: it compares equal to, and serialises as,
its plain string, so ``cells.csv`` and the JSON of the re-check protocol read as before). The course structure
read from the source notebooks is a :class:`CourseStructure`; a re-check result is a :class:`Verdict`; one graded
cell of one submission is a :class:`CellRow`. :class:`GradingSession` replaces the module globals through which
the grading worker and nbgrader's preprocessors used to talk.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar

__all__ = ["Status", "WITHDRAWN_IN_RECHECK", "GradedCell", "NotebookSpec", "CourseStructure", "Verdict", "CellRow",
           "GradingSession"]


class Status(StrEnum):
    """What happened to a graded cell (``cells.csv``'s ``status``; meanings in ``autograder/README.md``)."""

    PASSED = "passed"
    PARTIAL = "partial"
    FAILED = "failed"
    ERROR = "error"
    UNANSWERED = "unanswered"
    TIMEOUT = "timeout"
    OUT_OF_MEMORY = "out_of_memory"
    KERNEL_DIED = "kernel_died"
    MISSING = "missing"
    RECHECK_FAILED = "recheck_failed"
    POLICY_VIOLATION = "policy_violation"
    INVALID_NOTEBOOK = "invalid_notebook"
    WRONG_ASSIGNMENT = "wrong_assignment"
    UNKNOWN_ASSIGNMENT = "unknown_assignment"
    MANUAL = "manual"
    GRADER_ERROR = "grader_error"
    RECHECK_ERROR = "recheck_error"
    #: a submission (not a cell) that nbgrader graded (``submissions.csv``)
    GRADED = "graded"


#: Re-check outcomes of a function that the student's kernel passed which mean "the answer alone is wrong".
WITHDRAWN_IN_RECHECK = frozenset({Status.FAILED, Status.ERROR, Status.UNANSWERED, Status.MISSING})


@dataclass(frozen=True)
class GradedCell:
    """A graded cell of a source notebook: its grade id, points, and whether it is graded by hand."""

    grade_id: str
    max_score: float
    manual: bool = False


@dataclass(frozen=True)
class NotebookSpec:
    """One source notebook: its graded cells and the grade ids of all its nbgrader cells."""

    name: str
    cells: tuple[GradedCell, ...]
    ids: frozenset[str]


@dataclass(frozen=True)
class CourseStructure:
    """``assignment -> notebook -> NotebookSpec``, read from the source notebooks (``<source>/<a>/<nb>.ipynb``)."""

    assignments: dict[str, dict[str, NotebookSpec]]

    @classmethod
    def from_source(cls, source: Path) -> CourseStructure:
        found: dict[str, dict[str, NotebookSpec]] = {}
        for folder in sorted(p for p in Path(source).iterdir() if p.is_dir() and not p.name.startswith(".")):
            for path in sorted(folder.glob("*.ipynb")):
                nb = json.loads(path.read_text(encoding="utf-8"))
                cells, ids = [], set()
                for cell in nb.get("cells", []):
                    meta = cell.get("metadata", {}).get("nbgrader", {})
                    if meta.get("grade_id"):
                        ids.add(meta["grade_id"])
                    if meta.get("grade"):
                        cells.append(GradedCell(meta["grade_id"], float(meta.get("points", 0)),
                                                bool(meta.get("solution"))))
                found.setdefault(folder.name, {})[path.stem] = NotebookSpec(path.stem, tuple(cells), frozenset(ids))
        if not found:
            raise FileNotFoundError(f"No assignments in {source}: it must hold <assignment>/<notebook>.ipynb "
                                    "source notebooks (the kit's solutions/).")
        return cls(found)

    def __contains__(self, assignment: object) -> bool:
        return assignment in self.assignments

    def __iter__(self) -> Iterator[str]:
        return iter(self.assignments)

    def notebooks(self, assignment: str) -> dict[str, NotebookSpec]:
        """The notebooks of ``assignment`` (empty for an unknown one)."""
        return self.assignments.get(assignment, {})

    def owner_of(self, ids: set[str]) -> tuple[str, str] | None:
        """The (assignment, notebook) whose cells share grade ids with ``ids``, if any."""
        for a, notebooks in self.assignments.items():
            for name, spec in notebooks.items():
                if ids & spec.ids:
                    return a, name
        return None


@dataclass(frozen=True)
class Verdict:
    """The result of an isolated re-check (and of the kernel's view of a tests cell)."""

    status: Status
    message: str = ""
    seconds: float | None = None
    #: the re-check's comparison with the reference's recorded values failed (the student's kernel never made
    #: that comparison): a plain wrong answer, not a sign of tampering
    against_reference: bool = False

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": str(self.status), "message": self.message}
        if self.seconds is not None:
            out["seconds"] = self.seconds
        if self.against_reference:
            out["against_reference"] = True
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Verdict:
        """Parse a result of the re-check protocol; an unknown status becomes ``recheck_error``."""
        try:
            status = Status(data.get("status"))
        except ValueError:
            return cls(Status.RECHECK_ERROR, f"unknown re-check status {data.get('status')!r}: "
                                             f"{str(data.get('message', ''))[:500]}")
        seconds = data.get("seconds")
        return cls(status, str(data.get("message", "")), float(seconds) if seconds is not None else None,
                   bool(data.get("against_reference")))


@dataclass
class CellRow:
    """One graded cell of one notebook of one submission (the score is filled from the gradebook)."""

    #: ``cells.csv``'s columns; ``similarity`` (last, so readers by position keep working) is the copy check's
    #: highest score of the answer cell behind a tests cell (``autograder/similarity.py``), never part of a score
    COLUMNS: ClassVar[tuple[str, ...]] = ("student_id", "assignment", "notebook", "grade_id", "score", "max_score",
                                          "status", "message", "similarity")

    notebook: str
    grade_id: str
    max_score: float
    status: Status
    message: str = ""


@dataclass
class GradingSession:
    """What one grading worker process shares with nbgrader's preprocessors while it grades.

    nbgrader builds its preprocessors from configuration, so they cannot be handed objects; the worker therefore
    *installs* one session per process (:meth:`install`, in ``autograder.worker.init_worker``) and the
    preprocessors find it with :meth:`current`. Who writes and who reads:

    * ``rechecker`` — written by the worker (a ``RecheckClient``, or None to keep kernel scores); read by
      ``IsolatedRecheck``.
    * ``restored`` — written by ``RestoreMissingCells`` (grade ids it put back per notebook); read (and
      cleared) by ``IsolatedRecheck``, which treats a restored answer cell as missing.
    * ``results`` — written by ``IsolatedRecheck`` (a :class:`Verdict` per graded cell per notebook); read (and
      cleared) by the worker after nbgrader returns, to build the :class:`CellRow` rows.

    Keys are ``(student, assignment, notebook)``.
    """

    rechecker: Any = None
    results: dict[tuple[str, str, str], dict[str, Verdict]] = field(default_factory=dict)
    restored: dict[tuple[str, str, str], set[str]] = field(default_factory=dict)

    _installed: ClassVar[GradingSession | None] = None

    def install(self) -> GradingSession:
        """Make this the session of the current process (replacing any earlier one)."""
        GradingSession._installed = self
        return self

    @classmethod
    def current(cls) -> GradingSession:
        """The installed session; a fresh, empty one (no re-check) if none was installed."""
        if cls._installed is None:
            cls._installed = GradingSession()
        return cls._installed
