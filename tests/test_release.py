"""The student notebooks in ``notebooks/`` are exactly what ``autograder.release.release`` makes from
``solutions/``, and no solution code or hidden test reaches the students (``notebooks/`` or ``helpers/``)."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from autograder.release import normalized, release
from helpers.course import ASSIGNMENTS, KIT_ROOT

SOLUTIONS, NOTEBOOKS, HELPERS = KIT_ROOT / "solutions", KIT_ROOT / "notebooks", KIT_ROOT / "helpers"
MARKERS = ("BEGIN SOLUTION", "END SOLUTION", "BEGIN HIDDEN TESTS", "END HIDDEN TESTS", "BEGIN MARK SCHEME",
           "hidden_check", "import autograder", "from autograder")
GRADED = {fn for a in ASSIGNMENTS for fn in a.functions + a.manual}
MIN_SNIPPET = 20  # shorter lines (``return x``, ``else:``) are not evidence of a leak


def _sources(path: Path) -> list[str]:
    nb = json.loads(path.read_text(encoding="utf-8"))
    return ["".join(c["source"]) if isinstance(c["source"], list) else c["source"] for c in nb["cells"]]


def _split_regions(source: str) -> tuple[list[str], list[str]]:
    """Lines of a cell inside solution / hidden-test regions, and lines outside them."""
    inside, outside, depth = [], [], 0
    for line in source.splitlines():
        if "BEGIN SOLUTION" in line or "BEGIN HIDDEN TESTS" in line:
            depth += 1
        elif "END SOLUTION" in line or "END HIDDEN TESTS" in line:
            depth -= 1
        else:
            (inside if depth else outside).append(line.strip())
    return inside, outside


def _secret_lines(solution: Path) -> set[str]:
    """Distinctive lines of the reference answers and hidden tests that the source shows nowhere else."""
    inside, outside = set(), set()
    for source in _sources(solution):
        i, o = _split_regions(source)
        inside.update(i)
        outside.update(o)
    return {line for line in inside - outside if len(line) >= MIN_SNIPPET and not line.startswith("#")}


def _released() -> list[Path]:
    return sorted(NOTEBOOKS.glob("*/*.ipynb"))


@pytest.mark.slow
def test_release_regenerates_the_committed_notebooks(tmp_path):
    fresh = release(tmp_path / "release")
    fresh_rel = {p.relative_to(tmp_path / "release") for p in fresh}
    committed_rel = {p.relative_to(NOTEBOOKS) for p in _released()}
    assert fresh_rel == committed_rel, (
        f"notebooks/ holds {sorted(map(str, committed_rel))} but the solutions release {sorted(map(str, fresh_rel))}: "
        "run `python -m autograder release`")
    for rel in sorted(fresh_rel):
        assert normalized(tmp_path / "release" / rel) == normalized(NOTEBOOKS / rel), (
            f"notebooks/{rel} is stale (it differs from a fresh release of solutions/): "
            "run `python -m autograder release` and commit the result")


def test_every_solution_is_released():
    for a in ASSIGNMENTS:
        if (SOLUTIONS / a.id / a.notebook).exists():
            assert (NOTEBOOKS / a.id / a.notebook).exists(), (
                f"notebooks/{a.id}/{a.notebook} is missing: run `python -m autograder release`")


@pytest.mark.parametrize("path", _released(), ids=lambda p: p.parent.name)
def test_no_solution_or_hidden_test_in_student_notebook(path: Path):
    text = path.read_text(encoding="utf-8")
    for marker in MARKERS:
        assert marker not in text, f"{path.relative_to(KIT_ROOT)} contains {marker!r}: regenerate it with the release"
    solution = SOLUTIONS / path.parent.name / path.name
    assert solution.exists(), f"{path.relative_to(KIT_ROOT)} has no solution notebook {solution.relative_to(KIT_ROOT)}"
    released = {line.strip() for source in _sources(path) for line in source.splitlines()}
    secrets = _secret_lines(solution)
    assert secrets, f"found no reference lines in {solution.name}: is the leak check still looking at anything?"
    leaked = sorted(secrets & released)
    assert not leaked, f"{path.relative_to(KIT_ROOT)} shows reference solution / hidden test lines: {leaked[:5]}"


def test_no_outputs_in_student_notebooks():
    for path in _released():
        nb = json.loads(path.read_text(encoding="utf-8"))
        for cell in nb["cells"]:
            if cell["cell_type"] == "code":
                assert not cell["outputs"] and cell["execution_count"] is None, (
                    f"{path.relative_to(KIT_ROOT)} has cell outputs: clear them in solutions/ and release again")


def _defined_names(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


@pytest.mark.parametrize("path", sorted(HELPERS.rglob("*.py")), ids=lambda p: str(p.relative_to(HELPERS)))
def test_helpers_define_no_graded_function(path: Path):
    """Students import helpers/: no function (or name) there may be named like a graded function."""
    text = path.read_text(encoding="utf-8")
    clash = sorted(_defined_names(ast.parse(text)) & GRADED)
    assert not clash, f"helpers/{path.relative_to(HELPERS)} defines {clash}: graded functions live only in solutions/"
    for marker in ("BEGIN SOLUTION", "BEGIN HIDDEN TESTS"):
        assert marker not in text, f"helpers/{path.relative_to(HELPERS)} contains {marker!r}"
