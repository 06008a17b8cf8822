"""Reuse the functions a student wrote in earlier assignments.

Assignment 04 needs ``q_sample`` and ``ddim_solver_step`` from 02, and 05 needs the loss and sampler of 04.
A notebook gets them with :func:`load_course_functions`, which reads the answer cells (nbgrader
``grade_id`` = function name) of the earlier notebooks *in the same course folder* and runs them in one
namespace. Run by a student, that folder is the student's own ``notebooks/``, so their own functions are
used; under ``nbgrader autograde`` the instructor's solution notebooks are used instead, so that a mistake
in one assignment never costs points in another.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from helpers.answer_env import namespace
from helpers.config import KitConfig
from helpers.course import ASSIGNMENTS, assignment

__all__ = ["answer_cells", "course_namespace", "load_course_functions", "default_course_dir"]


def answer_cells(notebook: str | Path) -> dict[str, str]:
    """``{grade_id: source}`` of the answer (solution) cells of an nbgrader notebook."""
    path = Path(notebook)
    try:
        nb = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"Notebook {path} not found: finish and save that assignment first.") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not a valid notebook ({err}); restore it from your last checkpoint.") from None
    cells: dict[str, str] = {}
    for cell in nb.get("cells", []):
        meta = cell.get("metadata", {}).get("nbgrader", {})
        if cell.get("cell_type") == "code" and meta.get("solution") and meta.get("grade_id"):
            src = cell.get("source", "")
            cells[meta["grade_id"]] = "".join(src) if isinstance(src, list) else src
    return cells


def course_namespace(course_dir: str | Path, upto: str, include_last: bool = True) -> dict:
    """Run the answer cells of every assignment before ``upto`` (and of ``upto`` itself when
    ``include_last``) from ``course_dir/<assignment>/<notebook>`` in one fresh namespace and return it."""
    course_dir = Path(course_dir)
    target = assignment(upto)
    ns = namespace()
    for a in ASSIGNMENTS:
        if a.id == target.id and not include_last:
            break
        path = course_dir / a.id / a.notebook
        if a.id != target.id and not path.exists():
            continue  # an earlier assignment the course folder lacks: only needed if its functions are used
        cells = answer_cells(path)
        for fn in a.functions:
            if fn in cells:
                exec(compile(cells[fn], f"<{a.id}:{fn}>", "exec"), ns)
        if a.id == target.id:
            break
    return ns


def default_course_dir(config: KitConfig) -> Path:
    """The folder holding the assignment folders: the solutions (``config.solutions_path``) under autograde,
    else the parent of the notebook's working directory (``notebooks/`` for a student, ``solutions/`` for the
    reference run)."""
    if config.autograding:
        return config.solutions_path
    return Path.cwd().parent


def load_course_functions(upto: str, names: list[str] | tuple[str, ...], config: KitConfig | None = None,
                          course_dir: str | Path | None = None) -> SimpleNamespace:
    """The functions ``names`` from the assignments up to ``upto`` (exclusive), e.g.
    ``load_course_functions("04_consistency_loss", ["q_sample", "ddim_solver_step"], CONFIG)``; read from
    ``course_dir``, default :func:`default_course_dir` of ``config`` (``None``: the default settings)."""
    course_dir = course_dir or default_course_dir(config or KitConfig())
    ns = course_namespace(course_dir, upto, include_last=False)
    missing = [n for n in names if n not in ns]
    if missing:
        raise LookupError(
            f"Could not find {missing} in the earlier notebooks under {course_dir}: "
            "complete those assignments (and keep their notebooks next to this one)."
        )
    return SimpleNamespace(**{n: ns[n] for n in names})
