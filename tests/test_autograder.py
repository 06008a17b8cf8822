"""End-to-end tests of ``python -m autograder grade`` on a toy course (two tiny assignments with their own
batteries, ``autograder.testing``): one folder mixes reference solutions, blank notebooks and every broken
or dishonest submission; it is graded serially and with two workers, and both must give the same, right
score and status for every cell."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from autograder.testing import (BAD_CASES, TOY_CHECKS_MODULE, CourseFiles, blank_case, reference_case,
                                write_toy_course)

TIMEOUT = 8  # per cell: toy cells take milliseconds; short, because the loop cases wait it out

# Every toy submission of 01_toy: {case: {grade_id: (status, score)}} (double: 1 point, norm2: 2 points).
PASS_BOTH = {"test_double": ("passed", 1), "test_norm2": ("passed", 2)}
EXPECTED_01 = {
    "ref": PASS_BOTH,
    "blank": {"test_double": ("unanswered", 0), "test_norm2": ("unanswered", 0)},
    "infinite_loop": {"test_double": ("timeout", 0), "test_norm2": ("passed", 2)},
    "uninterruptible_loop": {"test_double": ("timeout", 0), "test_norm2": ("timeout", 0)},
    "cuda_oom": {"test_double": ("out_of_memory", 0), "test_norm2": ("passed", 2)},
    "host_oom": {"test_double": ("out_of_memory", 0), "test_norm2": ("passed", 2)},
    "kernel_dies": {"test_double": ("passed", 1), "test_norm2": ("kernel_died", 0)},
    "kills_grader": {"test_double": ("grader_error", 0), "test_norm2": ("grader_error", 0)},
    "truncated_json": {"test_double": ("invalid_notebook", 0), "test_norm2": ("invalid_notebook", 0)},
    "wrong_assignment": {"test_double": ("wrong_assignment", 0), "test_norm2": ("wrong_assignment", 0)},
    "huge_output": PASS_BOTH,
    "missing_cells": {"test_double": ("passed", 1), "test_norm2": ("missing", 0)},
    "deleted_pair": {"test_double": ("passed", 1), "test_norm2": ("missing", 0)},
    "type_changed": PASS_BOTH,
    "edited_tests": {"test_double": ("unanswered", 0), "test_norm2": ("unanswered", 0)},
    "swallow_errors": {"test_double": ("unanswered", 0), "test_norm2": ("unanswered", 0)},
    "monkeypatch": {"test_double": ("recheck_failed", 0), "test_norm2": ("recheck_failed", 0)},
    "patch_in_answer": {"test_double": ("policy_violation", 0), "test_norm2": ("failed", 0)},
    "reads_solutions": {"test_double": ("policy_violation", 0), "test_norm2": ("policy_violation", 0)},
    "hidden_reads": {"test_double": ("recheck_failed", 0), "test_norm2": ("recheck_failed", 0)},
}
EXPECTED_02 = {"ref": {"test_quad": ("passed", 1)}, "blank": {"test_quad": ("unanswered", 0)}}


def test_every_bad_case_has_an_expectation():
    assert set(BAD_CASES) | {"ref", "blank"} == set(EXPECTED_01)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The toy course, its reference/blank notebooks and a PYTHONPATH that finds its batteries."""
    root = tmp_path_factory.mktemp("toy")
    source, module_dir = write_toy_course(root)
    course = CourseFiles.build(source, root / "work")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(module_dir), os.environ.get("PYTHONPATH", "")]),
               MPLBACKEND="Agg")
    return source, course, env


@pytest.fixture(scope="module")
def mixed(toy, tmp_path_factory):
    """submitted/<student>/<assignment>/: every case of 01_toy, reference and blank of 02_toy_next, a
    timestamped submission and a folder that is not an assignment."""
    source, course, env = toy
    sub = tmp_path_factory.mktemp("submitted")
    cases = {"ref": reference_case, "blank": blank_case, **BAD_CASES}
    for name, build in cases.items():
        course.write(sub / name / "01_toy", build(course, "01_toy"))
    for name, build in (("ref", reference_case), ("blank", blank_case)):
        course.write(sub / name / "02_toy_next", build(course, "02_toy_next"))
    late = course.write(sub / "late" / "02_toy_next", reference_case(course, "02_toy_next"))
    (late / "timestamp.txt").write_text("2024-11-20 12:00:00.000000 UTC")
    course.write(sub / "ref" / "99_not_an_assignment", reference_case(course, "01_toy"))
    return sub


def grade(submitted: Path, out: Path, source: Path, env: dict, workers: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "autograder", "grade", str(submitted), "--out", str(out), "--source", str(source),
           "--checks", TOY_CHECKS_MODULE, "--workers", str(workers), "--timeout", str(TIMEOUT), "--memory-gb", "3"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)


@pytest.fixture(scope="module")
def graded(toy, mixed, tmp_path_factory):
    """The mixed folder graded serially and with 2 workers."""
    source, _, env = toy
    outs = {}
    for label, workers in (("serial", 1), ("parallel", 2)):
        out = tmp_path_factory.mktemp(label)
        done = grade(mixed, out, source, env, workers)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "grading" in done.stderr, "no progress bar"
        outs[label] = out
    return outs


def rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def gradebook(out: Path) -> list[tuple]:
    """(student, assignment, notebook, grade_id, auto_score, manual_score, needs_manual_grade) of every grade."""
    from nbgrader.api import Gradebook

    from autograder.config import COURSE_ID

    found = []
    with Gradebook(f"sqlite:///{out / 'gradebook.db'}", COURSE_ID) as gb:
        for a in gb.assignments:
            for sub in a.submissions:
                for nb in sub.notebooks:
                    found += [(sub.student.id, a.name, nb.name, g.name, g.auto_score, g.manual_score,
                               g.needs_manual_grade) for g in nb.grades]
    return sorted(found, key=str)


def test_every_case_gets_its_score_and_status(graded):
    cells = {(r["student_id"], r["assignment"], r["grade_id"]): r for r in rows(graded["parallel"] / "cells.csv")}
    for assignment, expected in (("01_toy", EXPECTED_01), ("02_toy_next", EXPECTED_02)):
        for case, wanted in expected.items():
            for grade_id, (status, score) in wanted.items():
                row = cells[(case, assignment, grade_id)]
                assert (row["status"], float(row["score"])) == (status, score), (case, row)
                assert status == "passed" or row["message"], f"{case}/{grade_id}: a failure must say why"
    for case in EXPECTED_01:  # the manual (markdown) cell: left to the formgrader unless the notebook failed
        row = cells[(case, "01_toy", "explain")]
        assert row["status"] in ("manual", "invalid_notebook", "wrong_assignment", "grader_error"), row
    unknown = cells[("ref", "99_not_an_assignment", "")]
    assert unknown["status"] == "unknown_assignment"


def test_grades_csv_has_nbgrader_columns_and_one_row_per_student_and_assignment(graded):
    grades = rows(graded["parallel"] / "grades.csv")
    assert list(grades[0]) == ["assignment", "duedate", "timestamp", "student_id", "last_name", "first_name",
                               "email", "raw_score", "late_submission_penalty", "score", "max_score"]
    keys = [(r["student_id"], r["assignment"]) for r in grades]
    students = {s for s, _ in keys}
    assert len(keys) == len(set(keys)) == 2 * len(students)
    by_key = {(r["student_id"], r["assignment"]): r for r in grades}
    assert float(by_key[("ref", "01_toy")]["score"]) == 3 and float(by_key[("ref", "01_toy")]["max_score"]) == 4
    assert float(by_key[("late", "02_toy_next")]["score"]) == 1
    assert by_key[("late", "02_toy_next")]["timestamp"].startswith("2024-11-20 12:00:00")
    assert float(by_key[("late", "01_toy")]["score"]) == 0  # not submitted: nbgrader's zero row


def test_parallel_grading_equals_serial(graded):
    serial, parallel = graded["serial"], graded["parallel"]
    assert rows(serial / "cells.csv") == rows(parallel / "cells.csv")
    assert rows(serial / "grades.csv") == rows(parallel / "grades.csv")
    assert gradebook(serial) == gradebook(parallel)


def test_gradebook_has_every_submission_once(graded, mixed):
    book = gradebook(graded["parallel"])
    keys = [row[:4] for row in book]
    assert len(keys) == len(set(keys)), "duplicated grade rows"
    submitted = {(s.name, a.name) for s in mixed.iterdir() for a in s.iterdir() if a.name != "99_not_an_assignment"}
    assert {(s, a) for s, a, *_ in book} == submitted


def test_feedback_and_autograded_notebooks(graded):
    out = graded["parallel"]
    assert (out / "feedback" / "ref" / "01_toy" / "toy.html").is_file()
    page = (out / "feedback" / "monkeypatch" / "01_toy" / "toy.html").read_text()
    assert "recheck_failed" in page, "the feedback must say why the points were withdrawn"
    broken = (out / "feedback" / "truncated_json" / "01_toy" / "toy.html").read_text()
    assert "invalid_notebook" in broken and "truncated" in broken
    assert (out / "autograded" / "huge_output" / "01_toy" / "toy.ipynb").stat().st_size < 5 * 2**20
    assert (out / "nbgrader_config.py").is_file() and (out / "logs" / "ref" / "01_toy.log").is_file()
    # a copy of each submission in nbgrader's submitted/ layout: the formgrader counts submissions there
    assert (out / "submitted" / "ref" / "01_toy" / "toy.ipynb").is_file()
    from nbgrader.apps.api import NbGraderAPI
    from nbgrader.coursedir import CourseDirectory

    from autograder.config import course_config

    api = NbGraderAPI(CourseDirectory(config=course_config(out, source_dir="source", release_dir="release")),
                      config=course_config(out, source_dir="source", release_dir="release"))
    assert api.get_assignment("01_toy")["num_submissions"] == len(list((out / "submitted").glob("*/01_toy"))) > 10


def test_regrading_is_idempotent_and_keeps_manual_grades(toy, tmp_path):
    source, course, env = toy
    sub, out = tmp_path / "submitted", tmp_path / "out"
    course.write(sub / "ann" / "01_toy", reference_case(course, "01_toy"))
    course.write(sub / "bob" / "01_toy", blank_case(course, "01_toy"))
    assert grade(sub, out, source, env, 2).returncode == 0
    first = (rows(out / "cells.csv"), rows(out / "grades.csv"), gradebook(out))
    from nbgrader.api import Gradebook

    from autograder.config import COURSE_ID

    with Gradebook(f"sqlite:///{out / 'gradebook.db'}", COURSE_ID) as gb:  # a grader marks ann's explanation
        gb.find_grade("explain", "toy", "01_toy", "ann").manual_score = 1
        gb.db.commit()
    done = grade(sub, out, source, env, 2)
    assert done.returncode == 0, done.stderr
    second = (rows(out / "cells.csv"), rows(out / "grades.csv"), gradebook(out))

    def without_manual(table: list) -> list:
        return [r for r in table if not (r[0] == "ann" and r[3] == "explain")]

    assert without_manual(second[2]) == without_manual(first[2]), "a regrade changed the gradebook"
    assert [(r["student_id"], r["grade_id"], r["status"]) for r in second[0]] == \
           [(r["student_id"], r["grade_id"], r["status"]) for r in first[0]]
    explain = [r for r in second[0] if r["student_id"] == "ann" and r["grade_id"] == "explain"][0]
    assert float(explain["score"]) == 1, "a regrade must keep the grader's manual score"
    assert [r for r in second[2] if r[0] == "ann" and r[3] == "explain"][0][6], "flagged for review"
    assert float([r for r in second[1] if r["student_id"] == "ann"][0]["score"]) == 4


def test_grading_the_course_folders_own_submitted_folder_keeps_the_submissions(toy, tmp_path):
    source, course, env = toy
    out = tmp_path / "course"
    sub = out / "submitted"  # nbgrader's own layout: the submissions already lie in the course folder
    course.write(sub / "ann" / "01_toy", reference_case(course, "01_toy"))
    before = (sub / "ann" / "01_toy" / "toy.ipynb").read_bytes()
    done = grade(sub, out, source, env, 1)
    assert done.returncode == 0, done.stderr
    assert (sub / "ann" / "01_toy" / "toy.ipynb").read_bytes() == before


def test_bad_arguments_give_clear_errors(toy, tmp_path):
    source, _, env = toy
    done = grade(tmp_path / "nowhere", tmp_path / "out", source, env, 1)
    assert done.returncode != 0 and "No folder" in done.stderr
