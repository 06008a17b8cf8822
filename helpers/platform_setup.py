"""The Colab / Kaggle setup: what each notebook's first code cell runs on those platforms (``docs/colab.md``).

The cell runs *before* the kit is installed, so this module uses the standard library only and is loaded by file
path or from the downloaded zip, never as ``helpers.platform_setup`` through the package. The cell itself
(:func:`cell_source`) detects the platform, mounts Google Drive on Colab, downloads the **student bundle**
(``python -m autograder bundle --zip``: released notebooks, ``helpers``, the student ``pyproject.toml``; never the
kit with its solutions) from ``COURSE_URL`` and then calls :func:`main`, which

* unpacks the bundle into the course folder (:func:`unpack`): new and changed files of ``helpers/``, the
  ``pyproject.toml`` and the docs are written, a notebook only when the course folder has none yet (your work is
  never overwritten); a zip without ``BUNDLE.json`` is refused;
* installs only what the platform lacks or has too old, read from the course folder's ``pyproject.toml`` at run
  time (so it follows whatever that file says), and never replaces the platform's torch/CUDA or its kernel stack
  (they are pinned to the installed versions with a pip constraints file);
* installs the student package itself with ``--no-deps`` (editable, from the course folder) and puts the folder
  first on ``sys.path``, so ``import helpers`` works in the running kernel; only when a module the kernel had
  already imported was upgraded does it say, once, that the session must be restarted;
* on a CUDA GPU of at most 16 GiB (Colab's and Kaggle's T4) selects SD1.5 and the ``low-memory`` training profile
  for this kernel (unless they are set already), and changes into the assignment's folder so that
  :func:`helpers.notebook_functions.load_course_functions` finds the earlier notebooks.

The module also writes the cell and the notebooks' "Open in Colab / Kaggle" badges (:func:`cell_source`,
:func:`badges`) and puts them into the solution notebooks and the README
(set :data:`REPOSITORY`, run ``python -m helpers.platform_setup``, then ``make release``).
"""
from __future__ import annotations

import importlib
import importlib.metadata as metadata
import json
import os
import re
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

__all__ = ["REPOSITORY", "BUNDLE_MANIFEST", "KEEP", "NOT_NEEDED", "requirements", "package_name", "to_install",
           "constraints", "unpack", "main", "cell_source", "badges", "update_sources"]

#: GitHub ``owner/name`` of the class's student repository (the bundle, pushed): the badges open its notebooks and the
#: cell's ``COURSE_URL`` downloads its zip. A placeholder: the instructor sets it here, then runs
#: ``python -m helpers.platform_setup`` and ``make release`` (``docs/colab.md``).
REPOSITORY = "OWNER/REPO"
#: The file that makes a folder (or a zip) a student bundle: what it is and the SHA-256 of each file.
BUNDLE_MANIFEST = "BUNDLE.json"
#: The platform's own stack: never installed, upgraded or replaced (pinned to what is installed).
KEEP = ("torch", "torchvision", "torchaudio", "triton", "ipykernel", "ipython", "jupyter-client", "jupyter-core",
        "jupyter-server", "traitlets", "tornado", "pyzmq")
#: Requirements a hosted notebook does not need: the grading, lab and test tools (an instructor's machine has them).
NOT_NEEDED = ("nbgrader", "jupyterlab", "notebook", "nbconvert", "nbclient", "nbformat", "pytest", "playwright")
SMALL_GPU_BYTES = 16 * 2**30 + 2**29  # "16 GB" cards report a little under or over 16 GiB
FIRST_CELL_MARK = "# Colab / Kaggle setup"


def _packaging():
    """``packaging``'s Requirement and Version: the installed one, else the copy every pip vendors."""
    try:
        from packaging.requirements import Requirement
        from packaging.version import Version
    except ImportError:  # pragma: no cover - depends on the platform
        from pip._vendor.packaging.requirements import Requirement  # type: ignore[no-redef]
        from pip._vendor.packaging.version import Version  # type: ignore[no-redef]
    return Requirement, Version


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(folder: str | Path) -> list[str]:
    """The run-time requirements of the course in ``folder``: ``[project] dependencies`` of its
    ``pyproject.toml`` (no extras: grading, lab and test tools are extras or in :data:`NOT_NEEDED`)."""
    with open(Path(folder) / "pyproject.toml", "rb") as f:
        return list(tomllib.load(f)["project"].get("dependencies", []))


def package_name(folder: str | Path) -> str:
    """``[project] name`` of the course folder's ``pyproject.toml`` (``cd-course-student`` in a bundle)."""
    with open(Path(folder) / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["name"]


def _installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def to_install(reqs: Iterable[str], version_of: Callable[[str], str | None] = _installed) -> tuple[list[str], list[str]]:
    """``(install, notes)``: the requirements to install because they are missing or older than asked for, and a
    line for each one left as the platform has it (newer than an exact pin or an upper bound). :data:`KEEP` and
    :data:`NOT_NEEDED` are never installed."""
    Requirement, Version = _packaging()
    install, notes = [], []
    skip = {_canonical(n) for n in (*KEEP, *NOT_NEEDED)}
    for line in reqs:
        req = Requirement(line)
        if _canonical(req.name) in skip or (req.marker is not None and not req.marker.evaluate()):
            continue
        have = version_of(req.name)
        if have is None:
            install.append(line)
            continue
        if req.specifier.contains(have, prereleases=True):
            continue
        lower = [Version(s.version) for s in req.specifier if s.operator in ("==", ">=", "~=", ">", "===")
                 and not s.version.endswith("*")]
        if any(Version(have) < v for v in lower):
            install.append(line)
        else:
            notes.append(f"kept the platform's {req.name} {have} (the course asks for {req.specifier})")
    return install, notes


def constraints(version_of: Callable[[str], str | None] = _installed) -> list[str]:
    """pip constraint lines that hold the installed :data:`KEEP` packages at their versions."""
    return [f"{name}=={v}" for name in KEEP if (v := version_of(name)) is not None]


def _loaded_distributions() -> set[str]:
    """Canonical names of the distributions that provide a module this process has imported."""
    by_module = metadata.packages_distributions()
    tops = {name.partition(".")[0] for name in list(sys.modules)}
    return {_canonical(d) for top in tops for d in by_module.get(top, ())}


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", *args], check=True)


def _small_gpu() -> str | None:
    """The name of a CUDA GPU with at most 16 GB, if there is one (torch is the platform's: importing it is safe)."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return props.name if props.total_memory <= SMALL_GPU_BYTES else None


def _bundle_root(bundle: zipfile.ZipFile) -> str:
    """The folder prefix of the bundle inside the zip (``DIR/`` of ``autograder bundle --zip``, ``REPO-main/`` of
    GitHub's archive of a repository); a clear error for a zip that is not a student bundle."""
    manifests = sorted((n for n in bundle.namelist() if n.rsplit("/", 1)[-1] == BUNDLE_MANIFEST), key=len)
    if not manifests or manifests[0].count("/") > 1:
        raise ValueError(f"the course zip holds no {BUNDLE_MANIFEST}: it is not a student bundle. COURSE_URL must "
                         "point at the zip of `python -m autograder bundle --zip` (or of a repository holding that "
                         "bundle), never at the course kit itself")
    return manifests[0][: -len(BUNDLE_MANIFEST)]


def unpack(bundle: zipfile.ZipFile, folder: str | Path) -> dict[str, list[str]]:
    """Bring the course ``folder`` up to date with ``bundle``: files listed in its manifest that are missing or
    differ are written, except notebooks (``*.ipynb``) the folder already has (the student's work, kept as it
    is). Returns ``{"written": [...], "kept": [...]}`` (paths relative to the folder)."""
    import hashlib

    folder, prefix = Path(folder), _bundle_root(bundle)
    manifest = json.loads(bundle.read(prefix + BUNDLE_MANIFEST))
    entries = sorted(manifest["files"].items()) + [(BUNDLE_MANIFEST, None)]
    unsafe = [rel for rel, _ in entries if Path(rel).is_absolute() or ".." in Path(rel).parts]
    if unsafe:  # checked before anything is written
        raise ValueError(f"the course zip lists the unsafe paths {unsafe}: ask your instructor for a new bundle")
    written, kept = [], []
    for rel, digest in entries:
        dest = folder.joinpath(*Path(rel).parts)
        if dest.is_file():
            if rel.endswith(".ipynb"):
                kept.append(rel)
                continue
            if digest is not None and hashlib.sha256(dest.read_bytes()).hexdigest() == digest:
                continue
        data = bundle.read(prefix + rel)
        if rel == BUNDLE_MANIFEST and dest.is_file() and dest.read_bytes() == data:
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
        written.append(rel)
    return {"written": written, "kept": kept}


def main(folder: str | Path, assignment: str, *, bundle: zipfile.ZipFile | None = None,
         pip: Callable[..., None] = _pip, small_gpu: Callable[[], str | None] = _small_gpu) -> dict:
    """Unpack ``bundle`` (the downloaded course zip, if any) into ``folder``, install what is missing, make
    ``helpers`` importable, pick the T4 settings, change into the assignment. Returns what it did (for tests);
    prints it."""
    folder = Path(folder).resolve()
    unpacked = {"written": [], "kept": []}
    if bundle is not None:
        unpacked = unpack(bundle, folder)
        if unpacked["written"]:
            print(f"Course {'updated' if unpacked['kept'] else 'unpacked'} in {folder}: {len(unpacked['written'])} "
                  f"files written" + (f", your {len(unpacked['kept'])} notebooks kept as they are" if unpacked['kept']
                                      else ""))
    install, notes = to_install(requirements(folder))
    restart = False
    if install:
        loaded = _loaded_distributions()
        restart = any(_canonical(_packaging()[0](line).name) in loaded for line in install)
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
            f.write("\n".join(constraints()) + "\n")
        print(f"Installing {len(install)} packages the platform lacks: "
              + ", ".join(_packaging()[0](line).name for line in install))
        pip("-c", f.name, *install)
    kit_installed = _installed(package_name(folder)) is not None
    if not kit_installed:
        pip("--no-deps", "-e", str(folder))
    for name in [m for m in sys.modules if m == "helpers" or m.startswith("helpers.")]:
        origin = getattr(sys.modules[name], "__file__", None) or ""
        if not origin.startswith(str(folder)):
            del sys.modules[name]  # another package called helpers: the course's must win
    while str(folder) in sys.path:
        sys.path.remove(str(folder))
    sys.path.insert(0, str(folder))  # first: the course's helpers win over anything else on the path
    importlib.invalidate_caches()
    gpu = small_gpu()
    chosen = {}
    if gpu:  # the kernel's environment is the edge KitConfig.from_environ() reads; a setting made already wins
        chosen = {"model": os.environ.setdefault("CD_KIT_MODEL", "sd15"),
                  "profile": os.environ.setdefault("CD_KIT_TRAIN_PROFILE", "low-memory")}
    target = folder / "notebooks" / assignment
    os.chdir(target)
    for line in notes:
        print(line)
    if gpu:
        print(f"GPU {gpu} (16 GB or less): model {chosen['model']}, training profile {chosen['profile']} "
              "(Stable Diffusion 1.5 in the T4's low-memory profile unless you had chosen otherwise).")
    print(f"Course folder {folder}; working in {target}.\nSave your work in the notebooks of that folder "
          "(open them from there, not from the badge's copy): later assignments read your earlier functions from it.")
    if restart:
        print("\nRESTART NEEDED, ONCE: packages this session had already imported were upgraded. Restart the session "
              "(Colab: Runtime > Restart session; Kaggle: Run > Restart & clear cell outputs) and run this cell "
              "again; it will find everything installed and go on without restarting.")
    return {"unpacked": unpacked, "installed": install, "notes": notes, "kit_installed_now": not kit_installed, "gpu": gpu, "chosen": chosen,
            "restart": restart, "cwd": str(target)}


# --- the cell and the badges --------------------------------------------------------------------------------

def cell_source(assignment: str, repository: str = REPOSITORY) -> str:
    """The first code cell of the notebook of ``assignment`` (stdlib only: it runs before the kit is installed)."""
    return f'''{FIRST_CELL_MARK} (not graded; anywhere else it prints one line and does nothing). It keeps the
# course in a folder that lasts (Google Drive on Colab, /kaggle/working on Kaggle), downloads the class's student
# bundle into it (your notebooks there are never overwritten), installs what is missing without touching the
# platform's torch, and opens this assignment's folder. See docs/colab.md.
ASSIGNMENT = "{assignment}"
COURSE_URL = "https://github.com/{repository}/archive/refs/heads/main.zip"  # the zip of the class's student bundle
import io, os, sys, types, urllib.request, zipfile
from pathlib import Path
try:
    import google.colab
    ON_COLAB = True
except ImportError:
    ON_COLAB = bool(os.environ.get("COLAB_RELEASE_TAG") or os.environ.get("COLAB_GPU"))
ON_KAGGLE = bool(os.environ.get("KAGGLE_KERNEL_RUN_TYPE") or os.environ.get("KAGGLE_URL_BASE"))
if not (ON_COLAB or ON_KAGGLE):
    print("Not on Colab or Kaggle: nothing to set up here.")
else:
    if ON_COLAB:
        from google.colab import drive
        drive.mount("/content/drive")
    COURSE = Path(os.environ.get("CD_KIT_COURSE_DIR")
                  or ("/content/drive/MyDrive/cd-course" if ON_COLAB else "/kaggle/working/cd-course"))
    SETUP, BUNDLE = COURSE / "helpers" / "platform_setup.py", None
    try:
        with urllib.request.urlopen(os.environ.get("CD_KIT_COURSE_URL") or COURSE_URL, timeout=120) as response:
            BUNDLE = zipfile.ZipFile(io.BytesIO(response.read()))
        names = sorted((n for n in BUNDLE.namelist() if n.endswith("helpers/platform_setup.py")), key=len)
        if not names:
            raise ValueError("the zip at COURSE_URL holds no helpers/platform_setup.py: it is not a student bundle")
        code = BUNDLE.read(names[0])
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        if not SETUP.is_file():
            raise SystemExit(f"Could not download the course ({{err}}): check COURSE_URL and the internet setting.")
        print(f"Could not update the course ({{err}}; your work is untouched); going on with the copy you have.")
        BUNDLE, code = None, SETUP.read_bytes()
    platform_setup = types.ModuleType("platform_setup")
    exec(compile(code, str(SETUP), "exec"), platform_setup.__dict__)
    platform_setup.main(COURSE, ASSIGNMENT, bundle=BUNDLE)
'''


def _notebook_url(assignment: str, notebook: str, repository: str) -> str:
    return f"github.com/{repository}/blob/main/notebooks/{assignment}/{notebook}"


def badges(assignment: str, notebook: str, repository: str = REPOSITORY) -> str:
    """The "Open in Colab" and "Open in Kaggle" badges of a student notebook (markdown, one line)."""
    path = _notebook_url(assignment, notebook, repository)
    return (f"[![Open in Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
            f"(https://colab.research.google.com/{path.replace('github.com/', 'github/', 1)}) "
            f"[![Open in Kaggle](https://kaggle.com/static/images/open-in-kaggle.svg)]"
            f"(https://kaggle.com/kernels/welcome?src=https://{path})")


_BADGE_LINE = re.compile(r"^\[!\[Open in Colab\].*\n\n?", re.M)
README_BEGIN = "<!-- BEGIN COLAB TABLE: python -m helpers.platform_setup -->"
README_END = "<!-- END COLAB TABLE -->"


def readme_table(assignments: Iterable[tuple[str, str]], repository: str = REPOSITORY) -> str:
    rows = ["| assignment | open it on |", "|---|---|"]
    rows += [f"| `{a}` | {badges(a, nb, repository)} |" for a, nb in assignments]
    return "\n".join(rows)


def update_sources(kit_root: str | Path, assignments: Iterable[tuple[str, str]],
                   repository: str = REPOSITORY) -> list[Path]:
    """Put the badges (first markdown cell) and the setup cell (first code cell) into each solution notebook,
    and the table into the README; return the files changed. Run ``make release`` afterwards."""
    root, changed = Path(kit_root), []
    assignments = list(assignments)
    for a, nb_name in assignments:
        path = root / "solutions" / a / nb_name
        nb = json.loads(path.read_text(encoding="utf-8"))
        cells = nb["cells"]
        md = next(c for c in cells if c["cell_type"] == "markdown")
        text = _BADGE_LINE.sub("", "".join(md["source"]))
        md["source"] = f"{badges(a, nb_name, repository)}\n\n{text}".splitlines(keepends=True)
        first = next(i for i, c in enumerate(cells) if c["cell_type"] == "code")
        cell = {"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [],
                "source": cell_source(a, repository).rstrip("\n").splitlines(keepends=True)}
        if "".join(cells[first]["source"]).startswith(FIRST_CELL_MARK):
            cell["id"] = cells[first].get("id", "platform-setup")
            cells[first] = cell
        else:
            cell["id"] = "platform-setup"
            cells.insert(first, cell)
        new = json.dumps(nb, indent=1, ensure_ascii=False) + "\n"
        if new != path.read_text(encoding="utf-8"):
            path.write_text(new, encoding="utf-8")
            changed.append(path)
    readme = root / "README.md"
    text = readme.read_text(encoding="utf-8")
    if README_BEGIN in text:
        head, _, rest = text.partition(README_BEGIN)
        _, _, tail = rest.partition(README_END)
        new = f"{head}{README_BEGIN}\n{readme_table(assignments, repository)}\n{README_END}{tail}"
        if new != text:
            readme.write_text(new, encoding="utf-8")
            changed.append(readme)
    return changed


def _cli(argv: list[str] | None = None) -> int:
    import argparse

    argparse.ArgumentParser(prog="python -m helpers.platform_setup",
                            description="Write the Colab/Kaggle setup cell and badges (for REPOSITORY, set at the top "
                                        "of helpers/platform_setup.py) into solutions/ and the README; then run "
                                        "`make release`.").parse_args(argv)
    from helpers.course import ASSIGNMENTS, KIT_ROOT

    for path in update_sources(KIT_ROOT, [(a.id, a.notebook) for a in ASSIGNMENTS]):
        print(f"updated {path.relative_to(KIT_ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_cli())
