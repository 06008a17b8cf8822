"""How the notebook is being run: by a student, by the autograder, or by the reference run.

nbgrader sets ``NBGRADER_EXECUTION`` ('autograde' or 'validate') while it executes a notebook: heavy
cells (training, large generations) shrink or skip then, so that grading stays fast. The reference run
sets ``CD_KIT_REDUCED=1`` for its short CI mode.
"""
from __future__ import annotations

import os

__all__ = ["grading", "autograding", "reduced", "pick"]


def grading() -> bool:
    """True while nbgrader executes the notebook (autograde or validate)."""
    return bool(os.environ.get("NBGRADER_EXECUTION"))


def autograding() -> bool:
    """True while nbgrader autogrades (the instructor's side)."""
    return os.environ.get("NBGRADER_EXECUTION") == "autograde"


def reduced() -> bool:
    """True in the reference run's short mode (``CD_KIT_REDUCED=1``), used by CI."""
    return os.environ.get("CD_KIT_REDUCED", "") not in ("", "0")


def pick(full, *, reduced_value=None, grading_value=None):
    """Choose a size for a heavy cell: ``grading_value`` under nbgrader, ``reduced_value`` in the short
    reference run, else ``full``. A value left ``None`` falls back to the next smaller one that is set."""
    if grading():
        return grading_value if grading_value is not None else (reduced_value if reduced_value is not None else full)
    if reduced():
        return reduced_value if reduced_value is not None else full
    return full
