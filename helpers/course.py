"""The course's structure in one place: assignments, their notebooks and graded functions.

The autograder, the release command, the tests and the reference run all read this table.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from helpers.config import KIT_ROOT

__all__ = ["Assignment", "ASSIGNMENTS", "KIT_ROOT", "SOLUTIONS_DIR", "assignment", "assignment_of"]

#: The kit's own solution notebooks (a course variant passes another folder; see ``KitConfig.solutions``).
SOLUTIONS_DIR = KIT_ROOT / "solutions"


@dataclass(frozen=True)
class Assignment:
    """One nbgrader assignment: its id, its notebook file and the graded functions it asks for."""

    id: str
    notebook: str
    functions: tuple[str, ...]
    manual: tuple[str, ...] = ()

    @property
    def stem(self) -> str:
        return Path(self.notebook).stem


ASSIGNMENTS: tuple[Assignment, ...] = (
    Assignment("01_model_loading", "model_loading.ipynb", ("load_pipeline",)),
    Assignment("02_ddim_step", "ddim_step.ipynb", ("q_sample", "ddim_solver_step")),
    Assignment("03_ct_derivation", "ct_derivation.ipynb", ("get_xs_from_xt_naive",), manual=("ct_derivation",)),
    Assignment(
        "04_consistency_loss",
        "consistency_loss.ipynb",
        ("cm_loss_template", "train_loop", "consistency_sampling", "pseudo_huber_loss",
         "get_xs_from_xt_with_teacher"),
    ),
    Assignment("05_multi_boundary", "multi_boundary.ipynb",
               ("get_multi_boundary_timesteps", "multi_boundary_sampling")),
)


def assignment(assignment_id: str) -> Assignment:
    """The assignment with this id (``'02_ddim_step'``); a clear error for an unknown id."""
    for a in ASSIGNMENTS:
        if a.id == assignment_id:
            return a
    raise KeyError(f"No assignment {assignment_id!r}; the course has {[a.id for a in ASSIGNMENTS]}")


def assignment_of(function: str) -> Assignment:
    """The assignment in which the graded function ``function`` is written."""
    for a in ASSIGNMENTS:
        if function in a.functions:
            return a
    raise KeyError(f"{function!r} is not a graded function of the course")
