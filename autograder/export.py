"""``python -m autograder export``: the gradebook's totals as the grade-import CSV of an LMS (issue 17, item 3).

The scores are read from ``OUT_DIR/gradebook.db`` with nbgrader's Gradebook API, by the rule of nbgrader's own
CSV export (``grades.csv``): per student and assignment ``max(0, score - late penalty)``, 0 when nothing was
submitted. One row per student of the gradebook, one column per assignment.

Formats (the header rules are the ones each LMS documents for its gradebook import):

* ``canvas`` — Canvas "Import scores in the Gradebook" CSV: the first columns are ``Student``, ``ID``,
  ``SIS User ID``, ``SIS Login ID``, ``Section`` (Canvas identifies the student of a row by its id columns, ``ID``
  being the Canvas user id: at least one of them must be filled; ``Student`` is the display name, "Last, First"),
  then one column per assignment. An assignment column is titled ``Name (canvas_id)`` to update an
  existing Canvas assignment (``--assignment-ids``); a bare ``Name`` makes Canvas create a new assignment on
  import. The second row is ``Points Possible`` with the maximum of each assignment, as Canvas's own export writes
  it (Canvas reads it back on import).
* ``moodle`` — Moodle "Import grades from CSV file": one identifier column that the import form maps to a user
  field (``Email address``, ``ID number`` or ``Username``: ``--moodle-id``), then one column per grade item (the
  form maps each to an existing item or a new one).
* ``csv`` — a plain table: ``student_id, lms_id, name, section, email``, one column per assignment, ``total``.

The mapping file (``--mapping``, CSV with a header) maps nbgrader student ids to the LMS: columns ``student_id``
(required), ``lms_id``, ``sis_user_id``, ``name``, ``section``, ``email`` and optionally ``sis_login_id``. Canvas
and Moodle need it; a student of the gradebook without a row is an error that lists every such id, and nothing is
written (``--allow-unmapped`` leaves them out instead, or in ``csv`` keeps them with empty LMS fields). The file
is written to a temporary file next to the target and renamed over it: an interrupted export never leaves a
partial file.
"""
from __future__ import annotations

import csv
import os
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["FORMATS", "MAPPING_COLUMNS", "MOODLE_IDS", "ExportError", "LmsStudent", "Gradebook", "read_mapping",
           "read_gradebook", "export"]

FORMATS = ("canvas", "moodle", "csv")
MAPPING_COLUMNS = ("student_id", "lms_id", "sis_user_id", "name", "section", "email")
#: ``--moodle-id``: the identifier column's header and the mapping field it is filled from.
MOODLE_IDS = {"email": ("Email address", "email"), "idnumber": ("ID number", "lms_id"),
              "username": ("Username", "lms_id")}
CANVAS_COLUMNS = ("Student", "ID", "SIS User ID", "SIS Login ID", "Section")


class ExportError(ValueError):
    """A problem with the inputs (printed as ``error: ...`` by the command, exit code 2)."""


@dataclass(frozen=True)
class LmsStudent:
    student_id: str
    lms_id: str = ""
    sis_user_id: str = ""
    name: str = ""
    section: str = ""
    email: str = ""
    sis_login_id: str = ""


@dataclass(frozen=True)
class Gradebook:
    """What an export needs from the gradebook."""

    assignments: list[tuple[str, float]]  # (name, max score), in the gradebook's order
    students: list[LmsStudent]  # the gradebook's own fields (name "Last, First", email), by id
    scores: dict[tuple[str, str], float]  # (student, assignment) -> score after the late penalty


def read_gradebook(course: str | Path) -> Gradebook:
    """Assignments, students and total scores of ``course/gradebook.db`` (nbgrader's export rule)."""
    from nbgrader.api import Gradebook as NbGradebook, MissingEntry

    from autograder.config import COURSE_ID

    db = Path(course) / "gradebook.db"
    if not db.is_file():
        raise ExportError(f"No gradebook {db}: pass --course, the OUT_DIR of `python -m autograder grade`.")
    with NbGradebook(f"sqlite:///{db.resolve()}", COURSE_ID) as gb:
        assignments = [(a.name, float(a.max_score or 0.0)) for a in gb.assignments]
        students, scores = [], {}
        for s in sorted(gb.students, key=lambda s: s.id):
            name = ", ".join(p for p in (s.last_name, s.first_name) if p) or s.id
            students.append(LmsStudent(s.id, name=name, email=s.email or ""))
            for a, _ in assignments:
                try:
                    sub = gb.find_submission(a, s.id)
                except MissingEntry:
                    scores[(s.id, a)] = 0.0
                else:
                    scores[(s.id, a)] = max(0.0, float(sub.score) - float(sub.late_submission_penalty or 0.0))
    return Gradebook(assignments, students, scores)


def _read_csv(path: Path, what: str) -> list[dict[str, str]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            return [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in csv.DictReader(fh)]
    except OSError as err:
        raise ExportError(f"Cannot read the {what} {path}: {err}") from err


def read_mapping(path: str | Path) -> dict[str, LmsStudent]:
    """``student_id -> LmsStudent`` from a mapping CSV (columns :data:`MAPPING_COLUMNS`, ``sis_login_id``)."""
    path = Path(path)
    rows = _read_csv(path, "mapping file")
    if rows and "student_id" not in rows[0]:
        raise ExportError(f"{path} has no student_id column (columns: {', '.join(MAPPING_COLUMNS)}, sis_login_id).")
    found: dict[str, LmsStudent] = {}
    for i, row in enumerate(rows, start=2):
        sid = row.get("student_id", "")
        if not sid:
            raise ExportError(f"{path} line {i}: empty student_id.")
        if sid in found:
            raise ExportError(f"{path} line {i}: student_id {sid!r} appears twice.")
        found[sid] = LmsStudent(sid, *(row.get(c, "") for c in MAPPING_COLUMNS[1:]), row.get("sis_login_id", ""))
    return found


def _assignment_ids(path: str | Path | None) -> dict[str, str]:
    if path is None:
        return {}
    rows = _read_csv(Path(path), "assignment ids file")
    if rows and not {"assignment", "lms_id"} <= set(rows[0]):
        raise ExportError(f"{path} needs the columns assignment, lms_id.")
    return {r["assignment"]: r["lms_id"] for r in rows if r.get("assignment") and r.get("lms_id")}


def _fmt(x: float) -> str:
    return f"{round(float(x), 2):g}"


def _write_atomic(dest: Path, rows: Iterable[list[str]]) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as fh:
            csv.writer(fh).writerows(rows)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _merge(own: LmsStudent, mapped: LmsStudent | None) -> LmsStudent:
    """The mapping's fields, the gradebook's name and email where the mapping leaves them empty."""
    if mapped is None:
        return LmsStudent(own.student_id, name=own.name, email=own.email)
    return LmsStudent(own.student_id, mapped.lms_id, mapped.sis_user_id, mapped.name or own.name, mapped.section,
                      mapped.email or own.email, mapped.sis_login_id)


def export(course: str | Path, fmt: str, dest: str | Path, mapping: str | Path | None = None,
           allow_unmapped: bool = False, assignment_ids: str | Path | None = None, moodle_id: str = "email"
           ) -> tuple[Path, list[str]]:
    """Write the ``fmt`` export of ``course/gradebook.db`` to ``dest``; return (the file, the students left out)."""
    if fmt not in FORMATS:
        raise ExportError(f"Unknown format {fmt!r}: one of {', '.join(FORMATS)}.")
    if moodle_id not in MOODLE_IDS:
        raise ExportError(f"Unknown --moodle-id {moodle_id!r}: one of {', '.join(MOODLE_IDS)}.")
    if fmt != "csv" and mapping is None:
        raise ExportError(f"--format {fmt} needs --mapping (nbgrader student ids -> {fmt} ids).")
    book = read_gradebook(course)
    mapped = read_mapping(mapping) if mapping is not None else {}
    unmapped = [s.student_id for s in book.students if s.student_id not in mapped] if mapping is not None else []
    if unmapped and not allow_unmapped:
        raise ExportError(f"{len(unmapped)} student(s) of the gradebook have no row in {mapping}: "
                          f"{', '.join(unmapped)} (add them, or pass --allow-unmapped to leave them out); "
                          "nothing was written.")
    students = [_merge(s, mapped.get(s.student_id)) for s in book.students
                if fmt == "csv" or s.student_id in mapped]
    left_out = [] if fmt == "csv" else unmapped
    names = [a for a, _ in book.assignments]

    def scores(s: LmsStudent) -> list[str]:
        return [_fmt(book.scores[(s.student_id, a)]) for a in names]

    if fmt == "canvas":
        ids = _assignment_ids(assignment_ids)
        # Canvas's header rule: an assignment column "Name (id)" updates the Canvas assignment with that id
        no_id = [s.student_id for s in students if not (s.lms_id or s.sis_user_id or s.sis_login_id)]
        if no_id:
            raise ExportError(f"Canvas needs an ID, SIS User ID or SIS Login ID per student; none in {mapping} "
                              f"for: {', '.join(no_id)}; nothing was written.")
        rows = [[*CANVAS_COLUMNS, *(f"{a} ({ids[a]})" if a in ids else a for a in names)],
                ["Points Possible", "", "", "", "", *(_fmt(m) for _, m in book.assignments)]]
        rows += [[s.name, s.lms_id, s.sis_user_id, s.sis_login_id, s.section, *scores(s)] for s in students]
    elif fmt == "moodle":
        header, field = MOODLE_IDS[moodle_id]
        no_id = [s.student_id for s in students if not getattr(s, field)]
        if no_id:
            raise ExportError(f"--moodle-id {moodle_id} reads the mapping's {field}, empty for: "
                              f"{', '.join(no_id)}; nothing was written.")
        rows = [[header, *names]] + [[getattr(s, field), *scores(s)] for s in students]
    else:
        rows = [["student_id", "lms_id", "name", "section", "email", *names, "total"]]
        rows += [[s.student_id, s.lms_id, s.name, s.section, s.email, *scores(s),
                  _fmt(sum(book.scores[(s.student_id, a)] for a in names))] for s in students]
    dest = Path(dest)
    _write_atomic(dest, rows)
    if left_out:
        print(f"warning: left out {len(left_out)} unmapped student(s): {', '.join(left_out)}", file=sys.stderr)
    return dest, left_out
