"""The kit's nbgrader course configuration, in one place.

``nbgrader_config.py`` at the kit root (read by nbgrader's own CLI and the formgrader) and the
``python -m autograder`` commands both build their configuration here.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from traitlets.config import Config

from helpers.course import KIT_ROOT

__all__ = ["COURSE_ID", "CELL_TIMEOUT_S", "MAX_OUTPUT_BYTES", "course_config", "grading_config",
           "ensure_tools_on_path", "fast_gradebook_creation"]

COURSE_ID = "cd-course"
CELL_TIMEOUT_S = 120  # nbgrader's default (30 s) is too short for loading SD1.5 on a cold disk
CODE_STUB = "# YOUR CODE HERE\nraise NotImplementedError()"
MAX_OUTPUT_BYTES = 1_000_000  # per cell; a student printing in a loop cannot fill the grader's memory


def ensure_tools_on_path() -> None:
    """Put this interpreter's ``bin/`` on PATH: nbgrader runs the ``alembic`` command when it creates a
    gradebook, which fails when the virtual environment is used without being activated."""
    bindir = str(Path(sys.executable).parent)
    if shutil.which("alembic") is None and bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")


def fast_gradebook_creation() -> None:
    """Let nbgrader create gradebooks without running the ``alembic heads`` command in a subprocess (several
    seconds per new database): read the same head revision from nbgrader's migration scripts in-process."""
    import nbgrader
    import nbgrader.api

    if getattr(nbgrader.api.get_alembic_version, "_in_process", False):
        return
    try:
        from alembic.config import Config as AlembicConfig
        from alembic.script import ScriptDirectory

        cfg = AlembicConfig()
        cfg.set_main_option("script_location", str(Path(nbgrader.__file__).parent / "alembic"))
        head = ScriptDirectory.from_config(cfg).get_current_head()
    except Exception:  # noqa: BLE001 - keep nbgrader's own way
        return

    def get_alembic_version() -> str:
        return head

    get_alembic_version._in_process = True  # type: ignore[attr-defined]
    nbgrader.api.get_alembic_version = get_alembic_version


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


def grading_config(root: str | Path, db_path: str | Path | None = None, cell_timeout: int = CELL_TIMEOUT_S,
                   max_output_bytes: int = MAX_OUTPUT_BYTES) -> Config:
    """Configuration of ``nbgrader autograde`` as the kit runs it: the course folder ``root`` (``source/``,
    ``submitted/``, ``autograded/``, ``feedback/``) with the kit's hardened preprocessors:

    * sanitising: nbgrader's, plus :class:`~autograder.preprocessors.RestoreMissingCells` before
      ``OverwriteCells`` (every lost nbgrader cell comes back, in source order) and
      :class:`~autograder.preprocessors.RestoreCellMetadata` after it (graded cells get the source's metadata
      back, unknown nbgrader metadata is dropped);
    * grading: :class:`~autograder.preprocessors.GuardedExecute` instead of ``Execute`` (dead or unresponsive
      kernels, huge outputs) and :class:`~autograder.preprocessors.IsolatedRecheck` after it, before
      ``SaveAutoGrades``.
    """
    from nbconvert.preprocessors import ClearMetadataPreprocessor
    from nbgrader.preprocessors import (AssignLatePenalties, CheckCellMetadata, ClearOutput, DeduplicateIds,
                                        IgnorePattern, LimitOutput, OverwriteCells, OverwriteKernelspec,
                                        SaveAutoGrades)

    from autograder.preprocessors import GuardedExecute, IsolatedRecheck, RestoreCellMetadata, RestoreMissingCells

    c = course_config(root, db_path=db_path, source_dir="source", release_dir="release", cell_timeout=cell_timeout)
    c.Autograde.sanitize_preprocessors = [ClearOutput, DeduplicateIds, OverwriteKernelspec, RestoreMissingCells,
                                          OverwriteCells, RestoreCellMetadata, CheckCellMetadata]
    c.Autograde.autograde_preprocessors = [GuardedExecute, IgnorePattern, ClearMetadataPreprocessor, LimitOutput,
                                           IsolatedRecheck, SaveAutoGrades, AssignLatePenalties, CheckCellMetadata]
    c.GuardedExecute.max_output_bytes = max_output_bytes
    c.Application.log_level = "INFO"
    return c
