"""Copy detection (``autograder/similarity.py``): planted copies are flagged, honest solutions and the stub are not.

The unit tests run in milliseconds; the end-to-end test grades a small toy-course folder (five students, one
assignment) once and checks ``similarity.csv``, the ``cells.csv`` column, the gradebook note and the scores.
"""
from __future__ import annotations

import csv
import os
import subprocess
import sys
import textwrap

import pytest

from autograder.similarity import (FLAG_AT, LIST_AT, MIN_TOKENS, normalise, own_code, release_stub, score,
                                   solution_code)

# The task: "def ddim_step(x, eps, a_t, a_prev): one deterministic DDIM step" (a released stub and a solution).
SOURCE = '''
def ddim_step(x, eps, a_t, a_prev):
    """One DDIM step from alpha-bar a_t to a_prev (tensors or floats)."""
    ### BEGIN SOLUTION
    import torch
    x0 = (x - torch.sqrt(1 - a_t) * eps) / torch.sqrt(a_t)
    x0 = x0.clamp(-1, 1)
    direction = torch.sqrt(1 - a_prev) * eps
    return torch.sqrt(a_prev) * x0 + direction
    ### END SOLUTION
'''
STUB = release_stub(SOURCE)
REFERENCE = solution_code(SOURCE)

ALICE = '''
def ddim_step(x, eps, a_t, a_prev):
    """One DDIM step from alpha-bar a_t to a_prev (tensors or floats)."""
    import math
    sa, sb = math.sqrt(a_t), math.sqrt(1.0 - a_t)
    pred = [(xi - sb * ei) / sa for xi, ei in zip(x, eps)]
    pred = [min(1.0, max(-1.0, p)) for p in pred]
    out = []
    for p, e in zip(pred, eps):
        out.append(math.sqrt(a_prev) * p + math.sqrt(1.0 - a_prev) * e)
    return out
'''

COPIES = {
    "verbatim": ALICE,
    "renamed": '''
def ddim_step(x, eps, a_t, a_prev):
    """One DDIM step from alpha-bar a_t to a_prev (tensors or floats)."""
    import math as m
    root_a, root_b = m.sqrt(a_t), m.sqrt(1.0 - a_t)
    x0s = [(v - root_b * n) / root_a for v, n in zip(x, eps)]
    x0s = [min(1.0, max(-1.0, q)) for q in x0s]
    result = []
    for q, w in zip(x0s, eps):
        result.append(m.sqrt(a_prev) * q + m.sqrt(1.0 - a_prev) * w)
    return result
''',
    "commented": '''
def ddim_step(x, eps, a_t, a_prev):
    """One DDIM step from alpha-bar a_t to a_prev (tensors or floats)."""
    import math

    # the square roots of alpha-bar and of 1 - alpha-bar
    sa, sb = math.sqrt(a_t), math.sqrt(1.0 - a_t)
    """predict x0 from the noise"""
    pred = [(xi - sb * ei) / sa for xi, ei in zip(x, eps)]   # x0 estimate
    pred = [min(1.0, max(-1.0, p)) for p in pred]  # clip

    out = []
    for p, e in zip(pred, eps):
        out.append(math.sqrt(a_prev) * p + math.sqrt(1.0 - a_prev) * e)
    return out
''',
}

# Reordered independent lines of the reference, with renamed variables.
REORDERED = '''
def ddim_step(x, eps, a_t, a_prev):
    """One DDIM step from alpha-bar a_t to a_prev (tensors or floats)."""
    import torch
    d = torch.sqrt(1 - a_prev) * eps
    clean = (x - torch.sqrt(1 - a_t) * eps) / torch.sqrt(a_t)
    clean = clean.clamp(-1, 1)
    return torch.sqrt(a_prev) * clean + d
'''

# Honest, different solutions of the same task (same API, same signature, their own way).
HONEST = {
    "vectorised": '''
def ddim_step(x, eps, a_t, a_prev):
    """One DDIM step from alpha-bar a_t to a_prev (tensors or floats)."""
    import torch
    a_t, a_prev = torch.as_tensor(a_t), torch.as_tensor(a_prev)
    predicted = torch.clamp((x - (1 - a_t).sqrt() * eps) * a_t.rsqrt(), min=-1.0, max=1.0)
    return a_prev.sqrt() * predicted + (1 - a_prev).sqrt() * eps
''',
    "coefficients": '''
def ddim_step(x, eps, a_t, a_prev):
    """One DDIM step from alpha-bar a_t to a_prev (tensors or floats)."""
    import torch
    c_x = 1 / torch.sqrt(torch.tensor(a_t))
    c_eps = torch.sqrt(torch.tensor(1 - a_t)) * c_x
    guess = torch.clip(c_x * x - c_eps * eps, -1, 1)
    noise_part = torch.sqrt(torch.tensor(1 - a_prev))
    signal_part = torch.sqrt(torch.tensor(a_prev))
    return signal_part * guess + noise_part * eps
''',
    "alice": ALICE,
}


def own(source: str):
    return own_code(source, STUB)


def test_normal_form_ignores_names_comments_docstrings_formatting_and_imports():
    a = "import numpy as np\ndef f(values):\n    '''Doc.'''\n    total = np.sum(values)  # sum\n    return total\n"
    b = "import numpy\n\n\ndef f(v):\n    t = numpy.sum(v)\n\n    return t\n"
    assert normalise(a) == normalise(b) == "def _0(_1):\n    _2 = numpy.sum(_1)\n    return _2"


def test_normal_form_keeps_attributes_library_names_and_order_of_dependent_lines():
    assert normalise("y = torch.relu(x)") != normalise("y = torch.tanh(x)")
    assert normalise("y = x.mean()") != normalise("y = x.std()")
    dependent = "a = 1\na = a + 1\nb = a * 2\n"
    swapped = "a = 1\nb = a * 2\na = a + 1\n"
    assert normalise(dependent) != normalise(swapped), "dependent lines were reordered"
    appended = "out = []\nout.append(1)\nout.append(2)\n"
    assert normalise(appended) != normalise("out = []\nout.append(2)\nout.append(1)\n"), "x.append() changes x"


def test_a_cell_that_does_not_parse_is_compared_by_its_lines():
    assert normalise("def f(:\n    return 1  # c\n\n") == "def f(:\n    return 1"


def test_a_copy_that_reuses_one_name_in_two_scopes_is_flagged():
    # the comprehension's and the loop's variables both renamed `n`: one namespace per cell tells them apart
    # from ALICE's `ei` / `e` only by numbering, and the token similarity stays high
    merged = COPIES["renamed"].replace("q, w in", "q, n in").replace("* w)", "* n)")
    assert FLAG_AT <= score(own(merged), own(ALICE)) < 1.0


@pytest.mark.parametrize("kind", sorted(COPIES))
def test_planted_copies_are_flagged(kind):
    assert own(ALICE).size >= MIN_TOKENS
    assert score(own(COPIES[kind]), own(ALICE)) >= FLAG_AT, kind
    if kind != "verbatim":
        assert score(own(COPIES[kind]), own(ALICE)) == 1.0, "the normal form should undo this entirely"


def test_reordered_independent_lines_match_the_reference():
    assert normalise(REORDERED) == normalise(REFERENCE)
    assert score(own(REORDERED), own(REFERENCE)) == 1.0


def test_a_copy_with_one_line_edited_is_still_flagged():
    edited = ALICE.replace("min(1.0, max(-1.0, p))", "max(-1.0, min(p, 1.0))")
    assert FLAG_AT <= score(own(edited), own(ALICE)) < 1.0


def test_honest_different_solutions_are_not_flagged():
    names = sorted(HONEST)
    for i, a in enumerate(names):
        assert score(own(HONEST[a]), own(REFERENCE)) < LIST_AT, (a, "reference")
        for b in names[i + 1:]:
            assert score(own(HONEST[a]), own(HONEST[b])) < LIST_AT, (a, b)


def test_the_unchanged_stub_is_never_flagged():
    assert "NotImplementedError" in STUB and "BEGIN SOLUTION" not in STUB
    stub = own(STUB)
    assert stub.size == 0
    assert score(stub, own(STUB)) == 0.0 and score(stub, own(REFERENCE)) == 0.0
    # nor a stub with only comments or a blank line added
    assert own(STUB.replace("# YOUR CODE HERE", "# no idea yet\n\n")).size == 0


def test_the_stub_lines_are_not_evidence():
    # two students who only wrote one short, different line each share the signature and docstring of the stub
    a, b = STUB.replace("raise NotImplementedError()", "return x"), STUB.replace("raise NotImplementedError()",
                                                                                  "return eps")
    assert score(own(a), own(b)) < LIST_AT
    assert own(a).size < MIN_TOKENS, "a one-line answer is too short to flag"


def test_score_is_symmetric_and_in_range():
    for a in [*COPIES.values(), *HONEST.values(), REFERENCE]:
        for b in [*COPIES.values(), *HONEST.values(), REFERENCE]:
            s = score(own(a), own(b))
            assert 0.0 <= s <= 1.0 and s == pytest.approx(score(own(b), own(a)), abs=1e-9)


# --- end to end on the toy course ---------------------------------------------------------------------------

# norm2 of the toy course (2 points), long enough to be judged: an original, a renamed and reordered copy of it,
# an honest different solution, and the unchanged stub.
NORM2_ORIGINAL = textwrap.dedent('''
    def norm2(v):
        """Sum of the squares of a list of numbers."""
        total = 0.0
        count = 0
        for value in v:
            square = value * value
            total = total + square
            count += 1
        assert count == len(v)
        return total
''')
NORM2_COPY = textwrap.dedent('''
    def norm2(v):
        """Sum of the squares of a list of numbers."""
        n = 0          # copied, but who would know
        acc = 0.0
        for item in v:
            sq = item * item
            acc = acc + sq
            n += 1
        assert n == len(v)
        return acc
''')
NORM2_HONEST = textwrap.dedent('''
    def norm2(v):
        """Sum of the squares of a list of numbers."""
        import math
        squares = map(lambda t: math.pow(t, 2), v)
        return float(math.fsum(squares)) if len(v) else 0.0
''')


@pytest.fixture(scope="module")
def similarity_course(tmp_path_factory):
    """Five students of 01_toy graded once: ann (original), bob (a copy of ann), cat (honest), dan (the reference,
    verbatim), eve (blank)."""
    from autograder.testing import TOY_CHECKS_MODULE, CourseFiles, dump, substitute, write_toy_course

    root = tmp_path_factory.mktemp("simtoy")
    source, module_dir = write_toy_course(root)
    course = CourseFiles.build(source, root / "work")
    sub, out = root / "submitted", root / "out"
    name, ref = course.notebook("01_toy")
    _, blank = course.notebook("01_toy", "blank")
    for student, nb in (("ann", substitute(ref, "norm2", NORM2_ORIGINAL)),
                        ("bob", substitute(ref, "norm2", NORM2_COPY)),
                        ("cat", substitute(ref, "norm2", NORM2_HONEST)), ("dan", ref), ("eve", blank)):
        course.write(sub / student / "01_toy", {f"{name}.ipynb": dump(nb)})
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(module_dir), os.environ.get("PYTHONPATH", "")]),
               MPLBACKEND="Agg")
    cmd = [sys.executable, "-m", "autograder", "grade", str(sub), "--out", str(out), "--source", str(source),
           "--checks", TOY_CHECKS_MODULE, "--workers", "1", "--timeout", "20", "--memory-gb", "3", "--quiet"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    return out, done.stdout


def _rows(path):
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_similarity_csv_flags_the_planted_copy_only(similarity_course):
    out, stdout = similarity_course
    rows = {(r["student_id"], r["grade_id"]): r for r in _rows(out / "similarity.csv")}
    assert list(next(iter(rows.values()))) == ["student_id", "assignment", "notebook", "grade_id",
                                               "matches_reference", "matches_students", "max_similarity",
                                               "flagged", "tokens"]
    assert set(rows) == {(s, g) for s in ("ann", "bob", "cat", "dan", "eve") for g in ("double", "norm2")}
    assert rows[("ann", "norm2")]["matches_students"] == "bob:1.00"
    assert rows[("bob", "norm2")]["matches_students"] == "ann:1.00"
    assert rows[("ann", "norm2")]["flagged"] == rows[("bob", "norm2")]["flagged"] == "yes"
    flagged = {k for k, r in rows.items() if r["flagged"] == "yes"}
    assert flagged == {("ann", "norm2"), ("bob", "norm2")}, "honest, reference one-liners and blanks are not flagged"
    # the reference one-liners are identical (1.00) but too short to be evidence
    assert rows[("dan", "double")]["matches_reference"] == "1.00" and int(rows[("dan", "double")]["tokens"]) < MIN_TOKENS
    assert rows[("eve", "norm2")]["tokens"] == "0" and rows[("eve", "norm2")]["max_similarity"] == "0.00"
    assert float(rows[("cat", "norm2")]["max_similarity"]) < LIST_AT
    assert "2 flagged answer cells" in stdout and "bob 01_toy/toy norm2: matches ann 1.00" in stdout


def test_cells_csv_has_the_similarity_column_and_unchanged_scores(similarity_course):
    out, _ = similarity_course
    cells = {(r["student_id"], r["grade_id"]): r for r in _rows(out / "cells.csv")}
    assert list(next(iter(cells.values())))[-1] == "similarity"
    assert cells[("bob", "test_norm2")]["similarity"] == "1.00" and cells[("bob", "explain")]["similarity"] == ""
    # every honest or copied answer that passes keeps its points: the similarity check never changes a score
    for student in ("ann", "bob", "cat", "dan"):
        assert (cells[(student, "test_norm2")]["status"], cells[(student, "test_norm2")]["score"]) == ("passed", "2")
        assert cells[(student, "test_double")]["score"] == "1"
    assert cells[("eve", "test_norm2")]["score"] == "0"


def test_flagged_cells_carry_a_gradebook_comment_and_a_rerun_changes_no_score(similarity_course):
    from nbgrader.api import Gradebook

    from autograder.config import COURSE_ID
    from autograder.similarity import COMMENT_PREFIX, report

    out, _ = similarity_course

    def book():
        with Gradebook(f"sqlite:///{out / 'gradebook.db'}", COURSE_ID) as gb:
            scores = {(s.student.id, g.name): g.score for a in gb.assignments for s in a.submissions
                      for nb in s.notebooks for g in nb.grades}
            notes = {s: gb.find_comment("norm2", "toy", "01_toy", s).comment for s in ("ann", "bob", "cat", "eve")}
        return scores, notes

    scores, notes = book()
    assert notes["bob"].startswith(COMMENT_PREFIX) and "1 other submission" in notes["bob"]
    assert "ann" not in notes["bob"], "the note must not name another student (it can reach feedback)"
    assert notes["cat"] is None and notes["eve"] == "No response."
    before = (out / "similarity.csv").read_text()
    report(out)  # idempotent, and it never touches a score
    assert book() == (scores, notes) and (out / "similarity.csv").read_text() == before
