"""The reference functions, read from the solution notebooks (their one source of truth)."""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from helpers.course import KIT_ROOT, assignment_of
from helpers.notebook_functions import course_namespace

__all__ = ["SOLUTIONS_DIR", "reference_namespace", "reference"]

SOLUTIONS_DIR = Path(os.environ.get("CD_KIT_SOLUTIONS", KIT_ROOT / "solutions"))


@lru_cache(maxsize=None)
def _namespace(upto: str) -> dict:
    return course_namespace(SOLUTIONS_DIR, upto, include_last=True)


def reference_namespace(upto: str = "05_multi_boundary") -> dict:
    """A namespace with every reference function of the assignments up to and including ``upto``
    (a copy: callers may change it)."""
    return dict(_namespace(upto))


def reference(name: str):
    """The reference implementation of the graded function ``name``."""
    return _namespace(assignment_of(name).id)[name]
