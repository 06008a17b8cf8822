"""Make the student notebooks: ``notebooks/`` from ``solutions/`` with nbgrader's generate_assignment."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from helpers.course import ASSIGNMENTS, KIT_ROOT

__all__ = ["release", "normalized", "source_assignments"]


def source_assignments(solutions_dir: str | Path) -> list[str]:
    """Assignment ids of a source folder: its sub-folders holding notebooks, the course's table order first."""
    root = Path(solutions_dir)
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
                   and any(p.glob("*.ipynb"))) if root.is_dir() else []
    known = [a.id for a in ASSIGNMENTS if a.id in found]
    return known + [a for a in found if a not in known]


def release(out_dir: str | Path = KIT_ROOT / "notebooks", solutions_dir: str | Path = KIT_ROOT / "solutions",
            db_path: str | Path | None = None, quiet: bool = True) -> list[Path]:
    """Generate every assignment's student notebook from the solutions into ``out_dir``; return the files.

    Runs in a temporary course folder (so a half-finished run never leaves a half-written ``out_dir``), then
    replaces each ``out_dir/<assignment>`` folder. With ``db_path``, the assignments are also recorded in
    that gradebook (what ``autograde`` needs); otherwise only a throw-away database in the temporary course is.
    """
    from nbgrader.apps import NbGraderAPI

    from autograder.config import course_config, ensure_tools_on_path

    ensure_tools_on_path()
    out_dir, solutions_dir = Path(out_dir), Path(solutions_dir)
    written: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="cd-release-") as tmp:
        root = Path(tmp)
        shutil.copytree(solutions_dir, root / "source", ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
        cfg = course_config(root, db_path=db_path or root / "gradebook.db", source_dir="source", release_dir="release")
        # nbgrader's SaveCells needs a gradebook even with GenerateAssignment.no_database: without db_path
        # the assignments go into a throw-away one in the temporary course
        if quiet:
            cfg.Application.log_level = "WARN"
        api = NbGraderAPI(config=cfg)
        assignments = source_assignments(root / "source")
        for a in assignments:
            result = api.generate_assignment(a, force=True, create=True)
            if not result["success"]:
                raise RuntimeError(f"generate_assignment failed for {a}:\n{result['log']}\n{result.get('error')}")
        for a in assignments:
            src = root / "release" / a
            if not src.exists():
                continue
            dst = out_dir / a
            if dst.exists():
                shutil.rmtree(dst)
            shutil.copytree(src, dst)
            written += sorted(dst.glob("*.ipynb"))
    return written


def normalized(path: str | Path) -> dict:
    """A notebook's JSON without volatile fields, for comparing a committed release with a fresh one."""
    nb = json.loads(Path(path).read_text(encoding="utf-8"))
    for cell in nb.get("cells", []):
        cell.pop("id", None)
        cell.get("metadata", {}).pop("execution", None)
    return {"cells": nb["cells"], "nbformat": nb.get("nbformat")}
