"""Every student mutant of ``tests/mutants/`` graded by ``python -m autograder grade`` in one batch, one
submission per mutant (the mutant substituted into the reference notebook of its assignment): a WRONG mutant
loses exactly its function's points and nothing else, a CORRECT one gets full points.

This runs the real notebooks, one kernel per mutant, so it is marked ``slow``. Every mutant is already run
against its battery directly (``tests/test_checks_*.py``); here, by default, the first WRONG and the first
CORRECT mutant of each function go through the whole grader (about 20 submissions, a fifth of the time):
``pytest --all-mutants`` grades all of them (about 110 submissions, 10 minutes on 2 cores).
"""
from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from autograder.testing import CourseFiles, dump, substitute
from mutant_cases import MUTANTS, mutant_cases

ROOT = Path(__file__).resolve().parents[1]
SOLUTIONS = ROOT / "solutions"

pytestmark = pytest.mark.slow


def _model_available() -> bool:
    from helpers.config import KitConfig
    from helpers.models import resolve_model

    try:
        spec = resolve_model(KitConfig.from_environ().model)  # the model this test run is given
    except FileNotFoundError:
        return False
    return spec.kind != "custom" or Path(spec.source).is_dir()


def _mutants(every: bool) -> list[tuple[str, str, str, str, str]]:
    """(kind, assignment, function, label, source) of every mutant, or of the first of each kind and function."""
    cases, seen = [], set()
    for case in mutant_cases():
        kind, _, fn, _, _ = case
        if every or (kind, fn) not in seen:
            cases.append(case)
            seen.add((kind, fn))
    return cases


@pytest.fixture(scope="module")
def batch(tmp_path_factory, request):
    if not all((SOLUTIONS / p.stem[1:]).is_dir() for p in MUTANTS.glob("a[0-9][0-9]_*.py")):
        pytest.skip("the solution notebooks of every assignment with mutants are needed")
    if not _model_available():
        pytest.skip("no model: restore helpers/assets/digits-sd or set CD_KIT_MODEL to a local pipeline folder")
    root = tmp_path_factory.mktemp("mutants")
    course = CourseFiles.build(SOLUTIONS, root / "work")
    sub, out = root / "submitted", root / "out"
    students = {}
    for i, (kind, assignment, fn, label, source) in enumerate(_mutants(request.config.getoption("--all-mutants"))):
        student = f"{kind.lower()}-{i:03d}-{re.sub(r'[^A-Za-z0-9]+', '-', fn)}"
        name, nb = course.notebook(assignment)
        course.write(sub / student / assignment, {f"{name}.ipynb": dump(substitute(nb, fn, source))})
        students[student] = (kind, assignment, fn, label)
    for assignment in course.reference:
        name, nb = course.notebook(assignment)
        course.write(sub / "reference" / assignment, {f"{name}.ipynb": dump(nb)})
    cmd = [sys.executable, "-m", "autograder", "grade", str(sub), "--out", str(out), "--workers", "2", "--timeout", "60"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, MPLBACKEND="Agg"))
    assert done.returncode == 0, done.stdout + done.stderr[-5000:]
    with open(out / "cells.csv", newline="", encoding="utf-8") as fh:
        cells = list(csv.DictReader(fh))
    return students, cells


def test_reference_gets_full_points(batch):
    _, cells = batch
    ref = [c for c in cells if c["student_id"] == "reference" and c["status"] != "manual"]
    assert ref and all(c["status"] == "passed" and c["score"] == c["max_score"] for c in ref), ref


def test_each_mutant_loses_exactly_its_own_points(batch):
    students, cells = batch
    full = {(c["assignment"], c["grade_id"]): c["score"] for c in cells if c["student_id"] == "reference"}
    problems = []
    for c in cells:
        if c["student_id"] not in students:
            continue
        kind, assignment, fn, label = students[c["student_id"]]
        own = c["grade_id"] == f"test_{fn}"
        expected = "0" if (kind == "WRONG" and own) else full[(assignment, c["grade_id"])]
        if c["score"] != expected:
            problems.append(f"{kind} {fn} [{label}]: {c['grade_id']} scored {c['score']} (expected {expected}): "
                            f"{c['status']} {c['message'][:200]}")
    assert not problems, "\n".join(problems)
