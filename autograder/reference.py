"""The reference functions, read from the solution notebooks (their one source of truth).

Only trusted processes call this module: the grader's worker (to record what the reference returns on a
battery's inputs, ``autograder/tape.py``), the instructor's own runs of the solutions, the tests and the
benchmark. The isolated re-check never imports it, and a student's kernel under autograde never gets the
reference of the function it is graded on (``autograder/README.md``, threat 6).
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from helpers.course import SOLUTIONS_DIR, assignment_of
from helpers.notebook_functions import build_namespace, course_namespace, graded_sources, source_functions

__all__ = ["SOLUTIONS_DIR", "reference_namespace", "reference", "graded_namespace", "reference_in",
           "source_functions"]


@lru_cache(maxsize=None)
def _namespace(upto: str, source_dir: str) -> dict:
    return course_namespace(source_dir, upto, include_last=True)


def reference_namespace(upto: str = "05_multi_boundary", source_dir: str | Path = SOLUTIONS_DIR) -> dict:
    """A namespace with every reference function of the assignments up to and including ``upto``
    (a copy: callers may change it)."""
    return dict(_namespace(upto, str(Path(source_dir).resolve())))


def reference(name: str, source_dir: str | Path = SOLUTIONS_DIR):
    """The reference implementation of the graded function ``name`` (the kit's course)."""
    return _namespace(assignment_of(name).id, str(Path(source_dir).resolve()))[name]


@lru_cache(maxsize=None)
def _graded_namespace(name: str, depends: tuple[str, ...], source_dir: str) -> dict:
    return build_namespace(graded_sources(name, depends, source_dir))


def graded_namespace(name: str, depends: tuple[str, ...] | list[str] = (), source_dir: str | Path = SOLUTIONS_DIR
                     ) -> dict:
    """The namespace a student's ``name`` is graded against, built from ``source_dir``
    (:func:`helpers.notebook_functions.graded_sources`): the answer-cell names, every reference function of the
    earlier assignments, and the same-assignment functions in ``depends``. Never the reference of ``name``
    itself (a copy: callers may change it)."""
    return dict(_graded_namespace(name, tuple(depends), str(Path(source_dir).resolve())))


@lru_cache(maxsize=None)
def _reference_in(name: str, source_dir: str):
    functions = source_functions(source_dir)
    a, source = functions[name]
    same = tuple(f for f, (b, _) in functions.items() if b == a and f != name)
    return build_namespace([*graded_sources(name, same, source_dir), (f"reference {a}:{name}", source)])[name]


def reference_in(name: str, source_dir: str | Path = SOLUTIONS_DIR):
    """The reference implementation of ``name`` as defined in ``source_dir``'s notebooks (any course variant)."""
    return _reference_in(name, str(Path(source_dir).resolve()))
