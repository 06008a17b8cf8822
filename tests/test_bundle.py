"""The student bundle (``python -m autograder bundle``, issue 17): what students get holds nothing of the
instructor's, and it works alone.

Leak rule (``_secret_lines``): a *reference line* is a line inside a ``### BEGIN SOLUTION`` / ``### END SOLUTION``
region of any cell of ``solutions/*/*.ipynb``, stripped of surrounding whitespace, that is at least
``MIN_SNIPPET`` (20) characters long and occurs nowhere in the released notebooks' cell sources (not even inside
a longer line). Shorter lines
(``return x_s``, ``else:``) are no evidence of a leak, and a line the released notebooks show anyway (a signature,
a shared import) is public already. No file of the bundle may contain a reference line anywhere in its text, nor
any line of a hidden-test region (``### BEGIN HIDDEN TESTS`` ... ``### END HIDDEN TESTS``), whatever its length.
The detector itself is checked on the solutions folder, where it must find leaks.

Then the bundle runs alone: copied outside the checkout, notebook 02 (it needs no function of 01) filled with the
reference answers (the test reads solutions/ for them; the bundle never does) is executed with ``PYTHONPATH`` holding only the bundle,
under ``NBGRADER_EXECUTION=validate`` (the reduced sizes the Validator of ``tests/test_notebooks.py`` uses). A last
cell records where ``helpers`` came from, that no module was loaded from the kit (the venv's editable install
points at a checkout) and that ``load_course_functions`` finds the student's 02 functions.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tomllib
import zipfile
from pathlib import Path

import pytest

from autograder.bundle import COMMANDS_KEPT, STUDENT_PACKAGE, build_bundle
from helpers.course import ASSIGNMENTS, KIT_ROOT
from helpers.notebook_functions import answer_cells
from helpers.platform_setup import BUNDLE_MANIFEST

SOLUTIONS, NOTEBOOKS = KIT_ROOT / "solutions", KIT_ROOT / "notebooks"
MIN_SNIPPET = 20
PRIVATE = ("solutions", "autograder", "tests", "scripts", ".git", "nbgrader_config.py", "Makefile")


def _sources(path: Path) -> list[str]:
    nb = json.loads(path.read_text(encoding="utf-8"))
    return ["".join(c["source"]) if isinstance(c["source"], list) else c["source"] for c in nb["cells"]]


def _region_lines(source: str, begin: str, end: str) -> list[str]:
    lines, inside = [], False
    for line in source.splitlines():
        if begin in line:
            inside = True
        elif end in line:
            inside = False
        elif inside and line.strip():
            lines.append(line.strip())
    return lines


def _secret_lines() -> set[str]:
    """The reference lines of the module docstring's rule."""
    public = "\n".join(s for nb in NOTEBOOKS.glob("*/*.ipynb") for s in _sources(nb))
    inside = {line for nb in SOLUTIONS.glob("*/*.ipynb") for s in _sources(nb)
              for line in _region_lines(s, "### BEGIN SOLUTION", "### END SOLUTION")}
    return {line for line in inside if len(line) >= MIN_SNIPPET and line not in public}


def _hidden_lines() -> set[str]:
    return {line for nb in SOLUTIONS.glob("*/*.ipynb") for s in _sources(nb)
            for line in _region_lines(s, "### BEGIN HIDDEN TESTS", "### END HIDDEN TESTS")}


def _leaks(root: Path, needles: set[str]) -> list[str]:
    found = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        text = path.read_bytes().decode("utf-8", errors="ignore")
        found += [f"{path.relative_to(root)}: {n!r}" for n in needles if n in text]
    return found


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return build_bundle(tmp_path_factory.mktemp("bundle") / "cd-course", zip_it=True)


def test_the_leak_detector_finds_the_solutions():
    secrets, hidden = _secret_lines(), _hidden_lines()
    assert len(secrets) > 20 and hidden, "the rule selects (almost) nothing: is it still looking at the solutions?"
    assert _leaks(SOLUTIONS, secrets) and _leaks(SOLUTIONS, hidden)


#: The one known overlap, kept on purpose: notebooks 02-05 load the teacher with ``helpers.models.load_course_pipeline``
#: (so that a wrong 01 never blocks the later assignments), which is assignment 01's ``load_pipeline`` in substance;
#: these lines of 01's answer may appear in these helpers files and nowhere else. Remove an entry when the code goes.
LOADER_OVERLAP = {
    ("helpers/models.py", 'pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")'),
    ("helpers/models.py", "pipe = StableDiffusionPipeline.from_pretrained("),
    ("helpers/models.py", "pipe = pipe.to(device)"),
    ("helpers/training.py", "pipe = StableDiffusionPipeline.from_pretrained("),  # the model card's usage example
}


def test_no_reference_line_and_no_hidden_test_in_any_file(bundle: Path):
    loader = set(answer_cells(SOLUTIONS / "01_model_loading" / "model_loading.ipynb")["load_pipeline"].splitlines())
    assert {line for _, line in LOADER_OVERLAP} <= {line.strip() for line in loader}, "LOADER_OVERLAP is stale"
    allowed = {f"{f}: {line!r}" for f, line in LOADER_OVERLAP}
    leaked = [hit for hit in _leaks(bundle, _secret_lines() | _hidden_lines()) if hit not in allowed]
    assert not leaked, "the bundle shows reference answers or hidden tests:\n" + "\n".join(leaked[:10])


def test_nothing_of_the_instructor_is_in_it(bundle: Path):
    files = _files(bundle)
    assert not [f for f in files if f.split("/")[0] in PRIVATE], files
    assert not [f for f in files if "checks" in f.split("/") or "mutants" in f.split("/")]
    commands = sorted(p.name for p in (bundle / "helpers" / "commands").iterdir())
    assert commands == sorted(COMMANDS_KEPT), f"command-line tools of the kit in the bundle: {commands}"
    assert (KIT_ROOT / "helpers" / "commands" / "reference_run").is_dir()  # what is kept out still exists
    private = {hashlib.sha256(p.read_bytes()).hexdigest(): p.relative_to(KIT_ROOT)
               for folder in ("autograder/checks", "tests") for p in (KIT_ROOT / folder).rglob("*")
               if p.is_file() and p.stat().st_size > 0 and "__pycache__" not in p.parts}
    copies = [f"{f} = {private[h]}" for f in files if (h := hashlib.sha256((bundle / f).read_bytes()).hexdigest())
              in private]
    assert not copies, f"files of the batteries or the tests (mutants, fixtures) under another name: {copies}"


def test_it_holds_what_students_need(bundle: Path):
    files = set(_files(bundle))
    for a in ASSIGNMENTS:
        rel = f"notebooks/{a.id}/{a.notebook}"
        assert (bundle / rel).read_bytes() == (KIT_ROOT / rel).read_bytes(), f"{rel} is not the released notebook"
    shipped = {p.relative_to(KIT_ROOT).as_posix() for p in (KIT_ROOT / "helpers" / "assets").rglob("*") if p.is_file()}
    assert shipped and shipped <= files, "the small model or the digit classifier is missing"
    assert {"README.md", "pyproject.toml", "constraints.txt", "helpers/commands/collect.py", BUNDLE_MANIFEST} <= files
    manifest = json.loads((bundle / BUNDLE_MANIFEST).read_text())
    assert set(manifest["files"]) == files - {BUNDLE_MANIFEST}
    readme = (bundle / "README.md").read_text()
    for words in ("Colab", "Kaggle", "pip install -e .", "python -m helpers.commands.collect --student"):
        assert words in readme, f"the student README does not say {words!r}"


def test_the_student_package_has_the_runtime_dependencies_only(bundle: Path):
    project = tomllib.loads((bundle / "pyproject.toml").read_text())["project"]
    kit = tomllib.loads((KIT_ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] == STUDENT_PACKAGE and project["dependencies"] == kit["dependencies"]
    assert "optional-dependencies" not in project
    text = (bundle / "pyproject.toml").read_text().lower()
    assert not [tool for tool in ("nbgrader", "jupyterlab", "pytest", "nbconvert") if tool in text]


def test_the_zip_holds_the_folder(bundle: Path):
    names = zipfile.ZipFile(f"{bundle}.zip").namelist()
    assert sorted(n for n in names if not n.endswith("/")) == [f"cd-course/{f}" for f in _files(bundle)]


def test_an_existing_folder_is_never_replaced_unless_it_is_a_bundle(tmp_path, bundle: Path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a student bundle"):
        build_bundle(tmp_path / "mine")
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "keep me"
    again = tmp_path / "again"
    shutil.copytree(bundle, again)
    (again / "stale.txt").write_text("from an older bundle")
    build_bundle(again)
    assert not (again / "stale.txt").exists() and (again / BUNDLE_MANIFEST).is_file()


CHECK_CELL = r'''
import json, sys
from helpers.notebook_functions import load_course_functions
fns = load_course_functions("03_ct_derivation", ["q_sample", "ddim_solver_step"], CONFIG)
print("BUNDLE_CHECK " + json.dumps({
    "helpers": helpers_file, "grader_loaded": "autograder" in sys.modules,
    "files": sorted({str(getattr(m, "__file__", None)) for m in list(sys.modules.values())
                     if str(getattr(m, "__file__", None) or "").startswith(KIT)
                     and not str(getattr(m, "__file__", None)).startswith(sys.prefix)})}))
'''


def _fill(notebook: Path, solution: Path) -> None:
    """Put the reference answers into the student's answer cells (what a student who solved it would have)."""
    answers = answer_cells(solution)
    nb = json.loads(notebook.read_text(encoding="utf-8"))
    for cell in nb["cells"]:
        gid = cell.get("metadata", {}).get("nbgrader", {}).get("grade_id")
        if cell["cell_type"] == "code" and gid in answers:
            cell["source"] = answers[gid]
    notebook.write_text(json.dumps(nb), encoding="utf-8")


@pytest.mark.slow
def test_notebook_02_runs_from_the_bundle_alone(tmp_path, bundle: Path):
    import nbformat
    from nbclient import NotebookClient

    course = shutil.copytree(bundle, tmp_path / "course")
    assert not course.resolve().is_relative_to(KIT_ROOT.resolve())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CD_KIT_", "NBGRADER", "VIRTUAL_ENV"))}
    env.update(PYTHONPATH=str(course), NBGRADER_EXECUTION="validate", CD_KIT_DEVICE="cpu", MPLBACKEND="Agg",
               PYTHONNOUSERSITE="1")
    path = course / "notebooks" / "02_ddim_step" / "ddim_step.ipynb"  # 02 needs no function of 01
    _fill(path, SOLUTIONS / "02_ddim_step" / "ddim_step.ipynb")
    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(
        f"import helpers\nhelpers_file = helpers.__file__\nKIT = {str(KIT_ROOT.resolve())!r}\n" + CHECK_CELL))
    NotebookClient(nb, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute(env=env)  # raises on any error
    output = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    line = next(ln for ln in output.splitlines() if ln.startswith("BUNDLE_CHECK "))
    result = json.loads(line.removeprefix("BUNDLE_CHECK "))
    assert Path(result["helpers"]).resolve() == (course / "helpers" / "__init__.py").resolve()
    assert result["files"] == [], f"modules loaded from the kit, not the bundle: {result['files'][:5]}"
    assert not result["grader_loaded"], "a notebook of the bundle imported the autograder"
