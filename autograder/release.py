"""Make the student notebooks: ``notebooks/`` from ``solutions/`` with nbgrader's generate_assignment."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from helpers.course import ASSIGNMENTS, KIT_ROOT

__all__ = ["release", "normalized"]


def release(out_dir: str | Path = KIT_ROOT / "notebooks", solutions_dir: str | Path = KIT_ROOT / "solutions",
            db_path: str | Path | None = None, quiet: bool = True) -> list[Path]:
    """Generate every assignment's student notebook from the solutions into ``out_dir``; return the files.

    Runs in a temporary course folder (so a half-finished run never leaves a half-written ``out_dir``), then
    replaces each ``out_dir/<assignment>`` folder. With ``db_path``, the assignments are also recorded in
    that gradebook (what ``autograde`` needs); otherwise no database is touched.
    """
    from nbgrader.apps import NbGraderAPI

    from autograder.config import course_config

    out_dir, solutions_dir = Path(out_dir), Path(solutions_dir)
    written: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="cd-release-") as tmp:
        root = Path(tmp)
        shutil.copytree(solutions_dir, root / "source", ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
        cfg = course_config(root, db_path=db_path or root / "gradebook.db", source_dir="source", release_dir="release")
        if db_path is None:
            cfg.GenerateAssignment.no_database = True
        if quiet:
            cfg.Application.log_level = "WARN"
        api = NbGraderAPI(config=cfg)
        for a in ASSIGNMENTS:
            if not (root / "source" / a.id).exists():
                continue
            result = api.generate_assignment(a.id, force=True, create=True)
            if not result["success"]:
                raise RuntimeError(f"generate_assignment failed for {a.id}:\n{result['log']}\n{result.get('error')}")
        for a in ASSIGNMENTS:
            src = root / "release" / a.id
            if not src.exists():
                continue
            dst = out_dir / a.id
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
