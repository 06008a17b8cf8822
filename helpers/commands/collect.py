"""Pack a student's notebooks for handing in: a zip laid out as nbgrader's ``submitted/`` folder.

    python -m helpers.commands.collect --student jdoe            # -> jdoe_submission.zip
    python -m helpers.commands.collect --student jdoe --only 02_ddim_step --out /content/drive/MyDrive/hand-in.zip

The zip holds ``<student>/<assignment>/<notebook>.ipynb`` for every assignment notebook found in the course folder's
``notebooks/`` (default: the ``notebooks/`` above the current directory when that is an assignment folder, as in
a notebook, else ``./notebooks``). The instructor unzips the students' files into one ``submitted/`` folder and runs
``python -m autograder grade submitted/ --out grades/`` (``docs/colab.md``). Outputs stay in the notebooks; no other
file is packed.
"""
from __future__ import annotations

import argparse
import json
import re
import zipfile
from pathlib import Path

from helpers.course import ASSIGNMENTS

__all__ = ["collect", "default_notebooks_dir", "main"]

_STUDENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def default_notebooks_dir(cwd: Path | None = None) -> Path:
    """The folder holding the assignment folders, seen from ``cwd``: its parent when ``cwd`` is an assignment
    folder (a notebook's working directory), else ``cwd/notebooks``."""
    cwd = Path.cwd() if cwd is None else cwd
    return cwd.parent if cwd.name in {a.id for a in ASSIGNMENTS} else cwd / "notebooks"


def collect(student: str, notebooks_dir: str | Path, out: str | Path, only: list[str] | None = None) -> list[str]:
    """Write the zip ``out``; return its members. Raises ``ValueError`` for a bad student id or when no notebook
    is found, and for a notebook that is not valid JSON (a broken file would reach the grader as a zero)."""
    if not _STUDENT_ID.fullmatch(student):
        raise ValueError(f"student id {student!r}: use letters, digits, '.', '_' or '-' (nbgrader's folder name)")
    root = Path(notebooks_dir)
    members = []
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for a in ASSIGNMENTS:
            path = root / a.id / a.notebook
            if (only and a.id not in only) or not path.is_file():
                continue
            try:
                json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} is not a valid notebook ({err}): save it again before collecting") from None
            member = f"{student}/{a.id}/{a.notebook}"
            zf.write(path, member)
            members.append(member)
    if not members:
        Path(out).unlink(missing_ok=True)
        raise ValueError(f"no assignment notebook under {root} (expected {root}/<assignment>/<notebook>.ipynb)")
    return members


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m helpers.commands.collect", description=__doc__.split("\n")[0])
    parser.add_argument("--student", required=True, help="your student id (the folder name in submitted/)")
    parser.add_argument("--notebooks", type=Path, default=None, help="the folder holding the assignment folders")
    parser.add_argument("--only", default="", help="comma-separated assignment ids (default: all found)")
    parser.add_argument("--out", type=Path, default=None, help="the zip to write (default: <student>_submission.zip)")
    args = parser.parse_args(argv)
    out = args.out or Path(f"{args.student}_submission.zip")
    try:
        members = collect(args.student, args.notebooks or default_notebooks_dir(), out,
                          [s.strip() for s in args.only.split(",") if s.strip()] or None)
    except ValueError as err:
        parser.exit(2, f"collect: {err}\n")
    print(f"wrote {out.resolve()} with {len(members)} notebooks:\n  " + "\n  ".join(members))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
