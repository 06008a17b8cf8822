"""The reference functions, read from the solution notebooks (their one source of truth)."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from helpers.config import KitConfig
from helpers.course import assignment_of
from helpers.notebook_functions import course_namespace

__all__ = ["SOLUTIONS_DIR", "reference_namespace", "reference"]


def _solutions_dir() -> Path:
    """The solution notebooks' folder (``CD_KIT_SOLUTIONS``), read when used: the grading worker sets it
    after this module may have been imported."""
    return KitConfig.from_environ().solutions_path


def __getattr__(name: str):
    if name == "SOLUTIONS_DIR":  # ``from autograder.reference import SOLUTIONS_DIR`` reads it at that moment
        return _solutions_dir()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@lru_cache(maxsize=None)
def _namespace(upto: str, solutions_dir: str) -> dict:
    return course_namespace(solutions_dir, upto, include_last=True)


def reference_namespace(upto: str = "05_multi_boundary") -> dict:
    """A namespace with every reference function of the assignments up to and including ``upto``
    (a copy: callers may change it)."""
    return dict(_namespace(upto, str(_solutions_dir())))


def reference(name: str):
    """The reference implementation of the graded function ``name``."""
    return _namespace(assignment_of(name).id, str(_solutions_dir()))[name]


# --- any source folder (the kit's solutions or a course variant), used by the isolated re-check ---------

def _answer_sources(notebook: Path) -> dict[str, str]:
    from helpers.notebook_functions import answer_cells

    return answer_cells(notebook)


def source_functions(source_dir: str | Path | None = None) -> dict[str, tuple[str, str]]:
    """``{function: (assignment id, answer-cell source)}`` for every answer cell of every notebook under
    ``source_dir/<assignment>/`` (default: the solutions), in course order (assignment folders sorted by name,
    then notebooks, then cells)."""
    return _source_functions(source_dir if source_dir is not None else _solutions_dir())


@lru_cache(maxsize=None)
def _source_functions(source_dir: str | Path) -> dict[str, tuple[str, str]]:
    root = Path(source_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"No source folder {root}: pass the folder holding <assignment>/<notebook>.ipynb.")
    found: dict[str, tuple[str, str]] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for notebook in sorted(folder.glob("*.ipynb")):
            for name, source in _answer_sources(notebook).items():
                found.setdefault(name, (folder.name, source))
    return found


@lru_cache(maxsize=None)
def _graded_namespace(name: str, depends: tuple[str, ...], source_dir: str) -> dict:
    from helpers.answer_env import namespace

    functions = source_functions(source_dir)
    if name not in functions:
        raise KeyError(f"{name!r} has no answer cell in the notebooks under {source_dir}")
    target = functions[name][0]
    ns = namespace()
    assignments = sorted({a for a, _ in functions.values()})
    for fn, (a, source) in functions.items():
        if assignments.index(a) <= assignments.index(target):
            exec(compile(source, f"<reference {a}:{fn}>", "exec"), ns)
    for fn, (a, _) in functions.items():  # as checks.reference_globals: the cells' imports stay, not the answers
        if a == target and fn not in depends:
            ns.pop(fn, None)
    return ns


def graded_namespace(name: str, depends: tuple[str, ...] | list[str] = (), source_dir: str | Path | None = None
                     ) -> dict:
    """The namespace a student's ``name`` is graded against, built from ``source_dir``: the answer-cell names,
    every reference function of the earlier assignments, and the same-assignment functions in ``depends``.
    Never the reference of ``name`` itself. Same contents as :func:`autograder.checks.reference_globals` for the
    kit's course (a copy: callers may change it)."""
    source_dir = source_dir if source_dir is not None else _solutions_dir()
    return dict(_graded_namespace(name, tuple(depends), str(Path(source_dir).resolve())))


def reference_in(name: str, source_dir: str | Path | None = None):
    """The reference implementation of ``name`` as defined in ``source_dir``'s notebooks (default: the solutions)."""
    return _reference_in(name, source_dir if source_dir is not None else _solutions_dir())


@lru_cache(maxsize=None)
def _reference_in(name: str, source_dir: str | Path):
    functions = source_functions(str(Path(source_dir).resolve()))
    a, source = functions[name]
    ns = graded_namespace(name, tuple(f for f, (b, _) in functions.items() if b == a and f != name), source_dir)
    exec(compile(source, f"<reference {a}:{name}>", "exec"), ns)
    return ns[name]
