"""The kit's nbgrader course configuration, in one place.

``nbgrader_config.py`` at the kit root (read by nbgrader's own CLI and the formgrader) and the
``python -m autograder`` commands both build their configuration here.
"""
from __future__ import annotations

from pathlib import Path

from traitlets.config import Config

from helpers.course import KIT_ROOT

__all__ = ["COURSE_ID", "CELL_TIMEOUT_S", "course_config"]

COURSE_ID = "cd-course"
CELL_TIMEOUT_S = 120  # nbgrader's default (30 s) is too short for loading SD1.5 on a cold disk
CODE_STUB = "# YOUR CODE HERE\nraise NotImplementedError()"


def course_config(root: str | Path = KIT_ROOT, db_path: str | Path | None = None,
                  source_dir: str = "solutions", release_dir: str = "notebooks",
                  cell_timeout: int = CELL_TIMEOUT_S) -> Config:
    """nbgrader configuration for a course folder ``root`` whose source notebooks are ``root/source_dir``."""
    root = Path(root).resolve()
    c = Config()
    c.CourseDirectory.root = str(root)
    c.CourseDirectory.course_id = COURSE_ID
    c.CourseDirectory.source_directory = source_dir
    c.CourseDirectory.release_directory = release_dir
    c.CourseDirectory.db_url = f"sqlite:///{Path(db_path or root / 'gradebook.db').resolve()}"
    c.ClearSolutions.code_stub = {"python": CODE_STUB}
    c.ClearSolutions.text_stub = "YOUR ANSWER HERE"
    c.ClearSolutions.enforce_metadata = True
    c.ClearHiddenTests.enforce_metadata = True
    c.Execute.timeout = cell_timeout
    c.Execute.interrupt_on_timeout = True
    c.Execute.kernel_name = "python3"
    c.OverwriteCells.add_missing_cells = True  # a deleted test cell comes back (and scores by the rules)
    c.LimitOutput.max_lines = 500
    c.LimitOutput.max_traceback = 100
    c.ExecutePreprocessor.timeout = cell_timeout
    return c
