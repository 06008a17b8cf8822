"""Student mutants: plausible wrong and differently written correct answer cells for every graded function.

Each module ``aNN_<assignment>.py`` here defines two dicts of complete answer-cell sources (``def ...``, with
the cell's own imports):

* ``WRONG = {function: {label: source}}``: answers the hidden battery must reject (``AssertionError``);
* ``CORRECT = {function: {label: source}}``: answers written differently from the reference that it must accept.

Load them by path (``tests/`` is not a package): :func:`mutant_files` and :func:`load`.
"""
from __future__ import annotations

import runpy
from pathlib import Path

__all__ = ["MUTANTS_DIR", "mutant_files", "load"]

MUTANTS_DIR = Path(__file__).resolve().parent


def mutant_files() -> dict[str, Path]:
    """``{module name: path}`` of every mutant module (``a01_model_loading`` ...), sorted."""
    return {p.stem: p for p in sorted(MUTANTS_DIR.glob("a[0-9][0-9]_*.py"))}


def load(path: str | Path) -> tuple[dict[str, dict[str, str]], dict[str, dict[str, str]]]:
    """``(WRONG, CORRECT)`` of one mutant module."""
    ns = runpy.run_path(str(path))
    return ns["WRONG"], ns["CORRECT"]
