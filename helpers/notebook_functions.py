"""Reuse the functions a student wrote in earlier assignments, and the one builder of the namespaces that graded
functions run in.

Assignment 04 needs ``q_sample`` and ``ddim_solver_step`` from 02, and 05 needs the loss and sampler of 04.
A notebook gets them with :func:`load_course_functions`, which reads the answer cells (nbgrader
``grade_id`` = function name) of the earlier notebooks *in the same course folder* and runs them in one
namespace. Run by a student, that folder is the student's own ``notebooks/``, so their own functions are
used; under ``nbgrader autograde`` the instructor's solution notebooks are used instead, so that a mistake
in one assignment never costs points in another.

:func:`build_namespace` is the only place that runs answer-cell sources into a namespace: the notebooks (here),
the autograder's reference functions and graded namespaces (``autograder.reference``) and the hidden batteries'
``reference_globals`` all go through it, with the list of sources chosen by :func:`graded_sources`.
"""
from __future__ import annotations

import ast
import json
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

from helpers.answer_env import namespace
from helpers.config import KitConfig
from helpers.course import ASSIGNMENTS, assignment

__all__ = ["answer_cells", "source_functions", "answer_imports", "graded_sources", "build_namespace", "course_namespace",
           "load_course_functions", "default_course_dir"]


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


@lru_cache(maxsize=None)
def _source_functions(root: str) -> dict[str, tuple[str, str]]:
    found: dict[str, tuple[str, str]] = {}
    for folder in sorted(p for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith(".")):
        for notebook in sorted(folder.glob("*.ipynb")):
            for name, source in answer_cells(notebook).items():
                found.setdefault(name, (folder.name, source))
    return found


def source_functions(source_dir: str | Path) -> dict[str, tuple[str, str]]:
    """``{function: (assignment id, answer-cell source)}`` for every answer cell of every notebook under
    ``source_dir/<assignment>/``, in course order (assignment folders sorted by name, then notebooks, then cells).
    Read once per folder (a copy: callers may change it)."""
    root = Path(source_dir).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"No source folder {root}: pass the folder holding <assignment>/<notebook>.ipynb.")
    return dict(_source_functions(str(root)))


def _imports_only(source: str) -> str:
    """The top-level ``import`` statements of a cell, without anything else (no function is defined)."""
    tree = ast.parse(source)
    return "\n".join(ast.unparse(node) for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom)))


def answer_imports(source_dir: str | Path) -> list[str]:
    """The distinct ``import`` lines of every answer cell under ``source_dir`` (what a process that will run those
    cells can import ahead, without holding any of their code)."""
    lines = {line for _, source in source_functions(source_dir).values() for line in _imports_only(source).splitlines()}
    return sorted(lines)


def graded_sources(name: str, depends: Iterable[str], source_dir: str | Path) -> list[tuple[str, str]]:
    """``[(label, source)]`` of the answer cells the namespace of a graded ``name`` is built from: every cell of
    the earlier assignments, the cells of ``name``'s own assignment that ``depends`` lists, and only the
    ``import`` lines of the other cells of that assignment. **Never** the code of ``name``'s own cell: the
    function under test is not in the namespace it is graded in, nor anything that could make it."""
    functions = source_functions(source_dir)
    if name not in functions:
        raise KeyError(f"{name!r} has no answer cell in the notebooks under {source_dir}")
    order = sorted({a for a, _ in functions.values()})
    target = order.index(functions[name][0])
    depends = set(depends) - {name}
    out = []
    for fn, (a, source) in functions.items():
        position = order.index(a)
        if position < target or (position == target and fn in depends):
            out.append((f"{a}:{fn}", source))
        elif position == target:
            out.append((f"{a}:{fn} (imports)", _imports_only(source)))
    return out


def build_namespace(sources: Iterable[tuple[str, str]]) -> dict:
    """A fresh answer-cell namespace (:func:`helpers.answer_env.namespace`) with ``sources`` run into it in order;
    each ``(label, source)`` is compiled under the file name ``<label>`` so tracebacks name the cell."""
    ns = namespace()
    for label, source in sources:
        exec(compile(source, f"<{label}>", "exec"), ns)
    return ns


def course_namespace(course_dir: str | Path, upto: str, include_last: bool = True) -> dict:
    """Run the answer cells of every assignment before ``upto`` (and of ``upto`` itself when
    ``include_last``) from ``course_dir/<assignment>/<notebook>`` in one fresh namespace and return it."""
    course_dir = Path(course_dir)
    target = assignment(upto)
    sources: list[tuple[str, str]] = []
    for a in ASSIGNMENTS:
        if a.id == target.id and not include_last:
            break
        path = course_dir / a.id / a.notebook
        if a.id != target.id and not path.exists():
            continue  # an earlier assignment the course folder lacks: only needed if its functions are used
        cells = answer_cells(path)
        sources += [(f"{a.id}:{fn}", cells[fn]) for fn in a.functions if fn in cells]
        if a.id == target.id:
            break
    return build_namespace(sources)


def default_course_dir(config: KitConfig) -> Path:
    """The folder holding the assignment folders: the solutions under autograde, else the parent of the
    notebook's working directory (``notebooks/`` for a student, ``solutions/`` for the reference run)."""
    if config.autograding:
        if not config.solutions_path.is_dir():
            raise FileNotFoundError(
                f"Autograding reads the earlier assignments' functions from the solution notebooks, and there are "
                f"none at {config.solutions_path}: grade with the instructor's kit (`python -m autograder grade`), "
                f"or set {KitConfig.env_var('solutions')} to their folder. A student bundle has no solutions.")
        return config.solutions_path
    return Path.cwd().parent


def load_course_functions(upto: str, names: list[str] | tuple[str, ...], config: KitConfig,
                          course_dir: str | Path | None = None) -> SimpleNamespace:
    """The functions ``names`` from the assignments up to ``upto`` (exclusive), e.g.
    ``load_course_functions("04_consistency_loss", ["q_sample", "ddim_solver_step"], CONFIG)``."""
    folder = Path(course_dir) if course_dir is not None else default_course_dir(config)
    ns = course_namespace(folder, upto, include_last=False)
    missing = [n for n in names if n not in ns]
    if missing:
        raise LookupError(
            f"Could not find {missing} in the earlier notebooks under {folder}: "
            "complete those assignments (and keep their notebooks next to this one)."
        )
    return SimpleNamespace(**{n: ns[n] for n in names})
