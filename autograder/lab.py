"""Start JupyterLab for an instructor, with nbgrader's formgrader on the kit's course configuration and
on the gradebook that ``python -m autograder grade SUBMITTED --out OUT`` wrote:

    python -m autograder.lab --grades OUT [--port N] [--no-browser]     (or: python -m autograder lab ...)

``OUT`` is the nbgrader course folder the grade command made (``source/``, ``autograded/``,
``gradebook.db``, ``feedback/``). The formgrader reads ``nbgrader_config.py`` from the server's working
folder first and then from the course root, so this command writes one built from
:func:`autograder.config.course_config` (course root ``OUT``, gradebook ``OUT/gradebook.db``) into a folder
of its own and starts the server there: the kit root's ``nbgrader_config.py`` (course root = the kit, its
own gradebook) is not read. Localhost only, with a token; the URLs are printed. The kernel setup is the
student command's (:mod:`helpers.commands.lab`).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from helpers.course import KIT_ROOT
from helpers.commands.lab import DEFAULT_PORT, QUIET_LAB_PLUGINS, LabSetup, lab_url, make_setup, start_lab

__all__ = ["GRADEBOOK_NAME", "write_formgrader_config", "server_root", "add_arguments", "run", "main"]

GRADEBOOK_NAME = "gradebook.db"


def write_formgrader_config(folder: Path, course_root: Path, gradebook: Path) -> Path:
    """Write ``folder/nbgrader_config.py``: the kit's course configuration on the grade command's course
    folder ``course_root`` (``source/``, ``release/``) and its ``gradebook``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "nbgrader_config.py"
    path.write_text(
        "# Written by `python -m autograder.lab`; regenerated at every start.\n"
        "from autograder.config import course_config\n\n"
        "c = get_config()  # noqa: F821 (provided by nbgrader)\n"
        f"c.merge(course_config({str(course_root)!r}, db_path={str(gradebook)!r},\n"
        "                      source_dir='source', release_dir='release'))\n",
        encoding="utf-8",
    )
    return path


def write_lab_page_config(config_dir: Path) -> None:
    """Jupyter config that switches off JupyterLab's news pop-up (it fetches from the web)."""
    (config_dir / "labconfig").mkdir(parents=True, exist_ok=True)
    page = {"disabledExtensions": {name: True for name in QUIET_LAB_PLUGINS}}
    (config_dir / "labconfig" / "page_config.json").write_text(json.dumps(page, indent=1))


def server_root(course_root: Path) -> Path:
    """The folder JupyterLab serves: the kit root when the course root lies inside it (the formgrader
    needs the course root inside the server's root), else the course root itself."""
    course_root = course_root.resolve()
    return KIT_ROOT if course_root.is_relative_to(KIT_ROOT) else course_root


def resolve_gradebook(grades: Path | None) -> tuple[Path, Path]:
    """``(course_root, gradebook)`` of ``--grades OUT``; a clear error when there is no gradebook."""
    if grades is None:
        raise SystemExit("Say which grades to open: --grades OUT, the folder that "
                         "`python -m autograder grade SUBMITTED --out OUT` wrote.")
    gradebook = (grades / GRADEBOOK_NAME).resolve()
    if not gradebook.is_file():
        raise SystemExit(f"No gradebook at {gradebook}. Grade the submissions first: "
                         "`python -m autograder grade SUBMITTED --out OUT`, then `python -m autograder.lab --grades OUT`.")
    return grades.resolve(), gradebook


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The instructor command's options (also used by ``python -m autograder lab``)."""
    p.add_argument("--grades", type=Path, default=None,
                   help="the folder `python -m autograder grade ... --out OUT` wrote (holds gradebook.db)")
    p.add_argument("--port", type=int, default=None, help=f"port (default: first free from {DEFAULT_PORT})")
    p.add_argument("--token", default=None, help="access token (default: $JUPYTER_TOKEN or a random one)")
    p.add_argument("--no-browser", action="store_true", help="do not open a web browser")
    return p


def _banner(setup: LabSetup, course_root: Path, gradebook: Path) -> list[str]:
    return [
        "Course kit: instructor JupyterLab with the formgrader",
        f"  course root : {course_root}",
        f"  gradebook   : {gradebook}",
        f"  serving     : {setup.root_dir}",
        f"  open        : {lab_url(setup)}",
        f"  formgrader  : {lab_url(setup, 'lab', 'formgrader=true')}",
        "  stop        : Ctrl+C",
    ]


def run(args: argparse.Namespace) -> int:
    """Start the instructor's JupyterLab for parsed ``args`` (see :func:`add_arguments`)."""
    course_root, gradebook = resolve_gradebook(args.grades)
    with tempfile.TemporaryDirectory(prefix="cd-kit-formgrader-") as tmp:
        runtime = Path(tmp)
        cwd = runtime / "course-config"
        write_formgrader_config(cwd, course_root, gradebook)
        setup = make_setup(server_root(course_root), runtime, args.port, args.token, None, cwd=cwd)
        write_lab_page_config(runtime / "config")
        return start_lab(setup, not args.no_browser, _banner(setup, course_root, gradebook))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m autograder.lab", description=__doc__.split("\n\n")[0])
    return run(add_arguments(parser).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
