"""Every assignment of the course (``helpers.course.ASSIGNMENTS``): its solution notebook follows the kit's
conventions and passes all its tests under nbgrader's ``Validator``, and its untouched student notebook in
``notebooks/`` fails every graded cell (it would score 0).

A missing notebook is a failure that says what to create, never a skip. Notebooks run with nbgrader's Python
API (``nbgrader validate`` exits 0 even when tests fail); the ``Validator`` sets ``NBGRADER_EXECUTION=validate``
for the kernel itself, so heavy cells shrink exactly as they do for students who press Validate.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from autograder.config import CELL_TIMEOUT_S
from helpers.course import ASSIGNMENTS, KIT_ROOT, Assignment
from helpers.platform_setup import badges, cell_source

SOLUTIONS, NOTEBOOKS = KIT_ROOT / "solutions", KIT_ROOT / "notebooks"
ANSI = re.compile(r"\x1b\[[0-9;]*m")
HIDDEN_BLOCK = ("### BEGIN HIDDEN TESTS\nfrom autograder.checks import hidden_check\n"
                "hidden_check(\"{fn}\", {fn})\n### END HIDDEN TESTS")
IDS = [a.id for a in ASSIGNMENTS]


def _existing(path: Path, what: str) -> Path:
    assert path.exists(), f"{what} {path.relative_to(KIT_ROOT)} is missing: create it (see docs/design.md)"
    return path


def _cells(path: Path) -> list[dict]:
    nb = json.loads(path.read_text(encoding="utf-8"))
    for cell in nb["cells"]:
        src = cell.get("source", "")
        cell["source"] = "".join(src) if isinstance(src, list) else src
    return nb["cells"]


def _meta(cell: dict) -> dict:
    return cell.get("metadata", {}).get("nbgrader", {})


def _validate(path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """nbgrader's Validator on ``path`` with the course's per-cell timeout, headless."""
    from nbgrader.validator import Validator
    from traitlets.config import Config

    monkeypatch.delenv("NBGRADER_EXECUTION", raising=False)  # the Validator sets it for the kernel
    monkeypatch.setenv("MPLBACKEND", "Agg")
    cfg = Config()
    cfg.Execute.timeout = CELL_TIMEOUT_S
    cfg.Execute.interrupt_on_timeout = True
    start = time.perf_counter()
    results = Validator(config=cfg).validate(str(path))
    print(f"validated {path.relative_to(KIT_ROOT)} in {time.perf_counter() - start:.1f} s")
    return results


def _report(results: dict) -> str:
    lines = []
    for kind, cells in results.items():
        for cell in cells:
            error = ANSI.sub("", cell.get("raw_error", ""))[-1500:]
            lines.append(f"[{kind}] {cell['source'][:200]}\n{error}")
    return "\n\n".join(lines)


@pytest.mark.parametrize("a", ASSIGNMENTS, ids=IDS)
def test_solution_notebook_follows_the_conventions(a: Assignment):
    """docs/design.md: the Colab/Kaggle cell and the setup cell first, each function in its answer cell followed by its tests cell with the
    hidden block, manual answers as markdown solution+grade cells, kernel python3, no outputs."""
    path = _existing(SOLUTIONS / a.id / a.notebook, "The solution notebook")
    nb = json.loads(path.read_text(encoding="utf-8"))
    assert nb["metadata"]["kernelspec"]["name"] == "python3", "kernel must be python3 (autograde looks it up by name)"
    cells = _cells(path)
    code = [c for c in cells if c["cell_type"] == "code"]
    assert code[0]["source"] == cell_source(a.id).rstrip("\n"), (
        "the first code cell must be the Colab/Kaggle setup cell: run `python -m helpers.platform_setup`")
    assert "from helpers.answer_env import *" in code[1]["source"], "the second code cell must be the kit setup cell"
    assert not _meta(code[0]) and not _meta(code[1]), "the setup cells must not be graded"
    first_markdown = next(c for c in cells if c["cell_type"] == "markdown")
    assert first_markdown["source"].startswith(badges(a.id, a.notebook)), (
        "the first markdown cell must start with the Colab/Kaggle badges: run `python -m helpers.platform_setup`")
    for cell in cells:
        if cell["cell_type"] == "code":
            assert not cell.get("outputs") and cell.get("execution_count") is None, (
                f"{path.name}: clear the outputs before saving (cell {cell['source'][:60]!r})")
    by_id = {_meta(c)["grade_id"]: (i, c) for i, c in enumerate(cells) if _meta(c).get("grade_id")}
    for fn in a.functions:
        assert fn in by_id, f"{path.name}: no answer cell with grade_id {fn!r}"
        i, cell = by_id[fn]
        assert cell["cell_type"] == "code" and _meta(cell) == {
            "solution": True, "grade": False, "locked": False, "grade_id": fn, "schema_version": 3}
        assert f"def {fn}(" in cell["source"] and "### BEGIN SOLUTION" in cell["source"]
        test = cells[i + 1]
        meta = _meta(test)
        assert meta.get("grade_id") == f"test_{fn}", f"{path.name}: the cell after {fn}'s answer must be test_{fn}"
        assert meta["grade"] and meta["locked"] and not meta["solution"] and meta["points"] > 0
        assert test["source"].rstrip().endswith(HIDDEN_BLOCK.format(fn=fn)), (
            f"{path.name}: test_{fn} must end with the hidden-test block calling hidden_check({fn!r}, {fn})")
    for name in a.manual:
        assert name in by_id, f"{path.name}: no manually graded cell {name!r}"
        cell = by_id[name][1]
        assert cell["cell_type"] == "markdown" and _meta(cell)["solution"] and _meta(cell)["grade"]
        assert "### BEGIN SOLUTION" in cell["source"] and "### END SOLUTION" in cell["source"]


@pytest.mark.slow
@pytest.mark.parametrize("a", ASSIGNMENTS, ids=IDS)
def test_solution_notebook_passes_validation(a: Assignment, monkeypatch):
    path = _existing(SOLUTIONS / a.id / a.notebook, "The solution notebook")
    graded = [c for c in _cells(path) if _meta(c).get("grade") and c["cell_type"] == "code"]
    assert graded, f"{path.name} has no graded tests cell"
    results = _validate(path, monkeypatch)
    assert results == {}, f"{path.name} does not pass its own tests:\n{_report(results)}"


@pytest.mark.slow
@pytest.mark.parametrize("a", ASSIGNMENTS, ids=IDS)
def test_untouched_student_notebook_fails_every_graded_cell(a: Assignment, monkeypatch):
    path = _existing(NOTEBOOKS / a.id / a.notebook,
                     "The student notebook (generate it with `python -m autograder release`)")
    graded = [c["source"].strip() for c in _cells(path) if _meta(c).get("grade")]
    assert graded, f"{path.name} has no graded cell"
    results = _validate(path, monkeypatch)
    assert not {"changed", "type_changed"} & results.keys(), (
        f"{path.name}: locked cells differ from their checksums; regenerate with `python -m autograder release`:\n"
        f"{_report(results)}")
    failed = {c["source"] for c in results.get("failed", [])}
    passing = [src[:120] for src in graded if src not in failed]
    assert not passing, f"{path.name}: graded cells that pass without any answer (they would earn points):\n{passing}"
