"""What students get: ``python -m autograder bundle --out DIR [--zip]``.

The bundle is a course folder without anything of the instructor's:

* ``notebooks/`` — the released student notebooks (``python -m autograder release``: no solution, no hidden test);
* ``helpers/`` — the package the notebooks import, with the shipped small model and digit classifier
  (``helpers/assets``), and of ``helpers/commands`` only ``collect`` (handing in): the other command-line tools
  stay with the kit (``reference_run`` executes ``solutions/``, ``train_*`` rebuild the shipped assets, ``lab``
  needs nbgrader and the kit's ``nbgrader_config.py``; a new command is left out until it is listed here);
* ``pyproject.toml`` — an installable student package (``cd-course-student``) with the kit's runtime
  dependencies only (no grading, lab or test extras), and ``constraints.txt``, the exact tested versions;
* ``README.md`` — how to start on a laptop, on Colab, on Kaggle, and how to hand in;
* ``docs/colab.md``, ``docs/configuration.md`` — the two documents the notebooks point to;
* ``BUNDLE.json`` — what it is and every file's SHA-256 (the Colab/Kaggle setup cell updates from it).

No ``solutions/``, ``autograder/`` (batteries, recorded references), ``tests/`` (mutants, fixtures) or
``scripts/``. ``helpers`` works there as it does for a student in the kit: earlier assignments' functions load
from the student's own notebooks next to the current one (:func:`helpers.notebook_functions.load_course_functions`).
With ``--zip`` also ``DIR.zip`` (one top folder ``DIR``), what the setup cell downloads.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tempfile
import tomllib
from pathlib import Path
from string import Template

from helpers.course import ASSIGNMENTS, KIT_ROOT
from helpers.platform_setup import BUNDLE_MANIFEST, readme_table

__all__ = ["STUDENT_PACKAGE", "COMMANDS_KEPT", "FORBIDDEN_TEXT", "build_bundle", "student_pyproject", "main"]

STUDENT_PACKAGE = "cd-course-student"
#: The only files of ``helpers/commands`` that students get (the other tools stay with the kit; see above).
COMMANDS_KEPT = ("__init__.py", "collect.py")
#: Text that marks solution or hidden-test material: a bundle holding any of it is not written.
FORBIDDEN_TEXT = ("### BEGIN SOLUTION", "### BEGIN HIDDEN TESTS", "hidden_check(", "from autograder",
                  "import autograder")
DOCS = ("colab.md", "configuration.md")
README_TEMPLATE = Path(__file__).with_name("student_readme.md")


def student_pyproject(kit_pyproject: Path = KIT_ROOT / "pyproject.toml") -> str:
    """The bundle's ``pyproject.toml``: the kit's name-less runtime (``[project] dependencies``), version and
    Python bound, as the package ``cd-course-student`` holding ``helpers`` and its assets."""
    project = tomllib.loads(kit_pyproject.read_text(encoding="utf-8"))["project"]
    deps = "".join(f"    {json.dumps(d)},\n" for d in project["dependencies"])
    return (
        "# The student package of the course (written by `python -m autograder bundle`): `import helpers` and\n"
        "# what the notebooks' code needs. No grading, lab or test tools: install Jupyter as you like.\n"
        "# The exact tested versions: pip install -e . -c constraints.txt\n"
        '[build-system]\nrequires = ["setuptools>=68"]\nbuild-backend = "setuptools.build_meta"\n\n'
        f'[project]\nname = "{STUDENT_PACKAGE}"\nversion = "{project["version"]}"\n'
        'description = "Consistency distillation course: the helpers package for the student notebooks"\n'
        f'readme = "README.md"\nrequires-python = {json.dumps(project["requires-python"])}\n'
        f"dependencies = [\n{deps}]\n\n"
        '[tool.setuptools]\npackages = { find = { include = ["helpers*"] } }\n\n'
        '[tool.setuptools.package-data]\nhelpers = ["py.typed", "assets/*", "assets/**/*"]\n'
    )


def _student_readme() -> str:
    rows = "\n".join(f"| `{a.id}` | `notebooks/{a.id}/{a.notebook}` |" for a in ASSIGNMENTS)
    table = "| assignment | notebook |\n|---|---|\n" + rows
    return Template(README_TEMPLATE.read_text(encoding="utf-8")).substitute(
        assignments=table, colab_table=readme_table([(a.id, a.notebook) for a in ASSIGNMENTS]))


def _ignore_helpers(folder: str, names: list[str]) -> set[str]:
    rel = Path(folder).resolve().relative_to((KIT_ROOT / "helpers").resolve())
    left_out = {n for n in names if rel == Path("commands") and n not in COMMANDS_KEPT}
    return left_out | {n for n in names if n == "__pycache__" or n.endswith(".pyc")}


def _commit() -> str | None:
    proc = subprocess.run(["git", "-C", str(KIT_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    return proc.stdout.strip() or None if proc.returncode == 0 else None


def _manifest(root: Path) -> dict:
    files = {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(root.rglob("*")) if p.is_file()}
    version = tomllib.loads((KIT_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
    return {"bundle": "cd-course student bundle", "package": STUDENT_PACKAGE, "version": version,
            "kit_commit": _commit(), "assignments": [a.id for a in ASSIGNMENTS], "files": files}


def _check_clean(root: Path) -> None:
    """Refuse a bundle that holds solution or hidden-test markers (a notebook not made by the release)."""
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix in (".py", ".ipynb", ".md", ".toml", ".txt", ".json"):
            text = path.read_text(encoding="utf-8", errors="replace")
            found = [m for m in FORBIDDEN_TEXT if m in text]
            if found:
                raise ValueError(f"{path.relative_to(root)} holds {found}: the bundle is for students. Regenerate "
                                 "the notebooks with `python -m autograder release` (never copy solutions/).")


def build_bundle(out: str | Path, *, zip_it: bool = False, notebooks: str | Path = KIT_ROOT / "notebooks") -> Path:
    """Write the student bundle into ``out`` (and ``out.zip`` with ``zip_it``); return ``out``.

    ``out`` must be absent, empty, or an earlier bundle (it has ``BUNDLE.json``), which is replaced; anything else
    stops with an error and is left as it is. The bundle is assembled in a temporary folder first."""
    out, notebooks = Path(out).resolve(), Path(notebooks)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / BUNDLE_MANIFEST).is_file())):
        raise FileExistsError(f"{out} exists and is not a student bundle: pass a new or empty folder to --out")
    missing = [f"{a.id}/{a.notebook}" for a in ASSIGNMENTS if not (notebooks / a.id / a.notebook).is_file()]
    if missing:
        raise FileNotFoundError(f"{notebooks} lacks {missing}: run `python -m autograder release` first")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".bundle-", dir=out.parent) as tmp:
        root = Path(tmp) / out.name
        for a in ASSIGNMENTS:
            (root / "notebooks" / a.id).mkdir(parents=True)
            shutil.copy2(notebooks / a.id / a.notebook, root / "notebooks" / a.id / a.notebook)
        shutil.copytree(KIT_ROOT / "helpers", root / "helpers", ignore=_ignore_helpers)
        (root / "docs").mkdir()
        for name in DOCS:
            shutil.copy2(KIT_ROOT / "docs" / name, root / "docs" / name)
        shutil.copy2(KIT_ROOT / "constraints.txt", root / "constraints.txt")
        (root / "pyproject.toml").write_text(student_pyproject(), encoding="utf-8")
        (root / "README.md").write_text(_student_readme(), encoding="utf-8")
        _check_clean(root)
        (root / BUNDLE_MANIFEST).write_text(json.dumps(_manifest(root), indent=1) + "\n", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        root.rename(out)
    if zip_it:
        Path(f"{out}.zip").unlink(missing_ok=True)
        shutil.make_archive(str(out), "zip", root_dir=out.parent, base_dir=out.name)
    return out


def main(out: str, zip_it: bool) -> int:
    dest = build_bundle(out, zip_it=zip_it)
    count = len(json.loads((dest / BUNDLE_MANIFEST).read_text())["files"])
    print(f"wrote the student bundle {dest} ({count} files)" + (f" and {dest}.zip" if zip_it else ""))
    print("Publish it where the Colab/Kaggle setup cell fetches it (COURSE_URL, docs/colab.md); keep solutions/ private.")
    return 0
