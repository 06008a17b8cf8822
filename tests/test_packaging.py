"""Packaging (issue 14): dependencies as a library declares them, one lock, and a wheel that works.

* ``pyproject.toml`` gives ranges (no exact pins), ``constraints.txt`` the exact tested set; the two agree and the
  lock co-installs;
* a plain (student) install pulls no nbgrader, JupyterLab or pytest (checked on a real install in a fresh venv);
* the sdist and the wheel carry the shipped small model and the digit classifier;
* the wheel, installed into a fresh venv outside the checkout, runs notebook 01 there, writing under the working
  directory (never into site-packages).

The resolver check and the fresh venv need a package index (CI has one; pip's cache makes them fast); both
are ``slow`` (the fresh venv takes about 2-3 minutes: it installs torch and the runtime from pip's cache). The
packages are built once per session (module-scoped fixtures), so nothing here runs twice.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import nbformat
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from helpers.config import KIT_ROOT

ROOT = KIT_ROOT
LOCK = ROOT / "constraints.txt"
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
SELF = canonicalize_name(PROJECT["name"])
#: What a plain (student) install must not pull: the grading, lab and test tools.
NOT_FOR_STUDENTS = ("nbgrader", "jupyterlab", "notebook", "jupyter-server", "nbconvert", "pytest", "playwright")
#: The files a wheel must carry for the notebooks to run (the shipped model and the classifier).
SHIPPED = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "helpers" / "assets").rglob("*") if p.is_file())
NOTEBOOK_01 = "01_model_loading/model_loading.ipynb"


def _lock() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, pinned = line.partition("==")
            assert pinned and not re.search(r"[<>=!~;@ ]", pinned), f"constraints.txt: {line!r} is not `name==version`"
            pins[canonicalize_name(name)] = pinned
    return pins


def _requirements(extra: str | None = None) -> list[Requirement]:
    reqs = PROJECT["dependencies"] if extra is None else PROJECT["optional-dependencies"][extra]
    return [Requirement(r) for r in reqs]


def _all_requirements() -> list[Requirement]:
    reqs = _requirements()
    for extra in PROJECT["optional-dependencies"]:
        reqs += [r for r in _requirements(extra) if canonicalize_name(r.name) != SELF]
    return reqs


# ---------------------------------------------------------------------------------------------- declaration
def test_pyproject_gives_ranges_with_lower_bounds_not_exact_pins():
    for req in _all_requirements():
        ops = {s.operator for s in req.specifier}
        assert "==" not in ops and "===" not in ops, f"pyproject.toml pins {req} exactly: give a range, pin in constraints.txt"
        assert ">=" in ops, f"pyproject.toml: {req} has no lower bound (the oldest version the kit is tested with)"
    torch = [r for r in _requirements() if r.name == "torch"]
    assert [str(r.specifier) for r in torch] == [">=2.11"], "torch: the GPU host runs 2.11"


def test_extras_split_the_roles():
    names = {extra: {canonicalize_name(r.name) for r in _requirements(extra)} for extra in PROJECT["optional-dependencies"]}
    runtime = {canonicalize_name(r.name) for r in _requirements()}
    assert {"torch", "diffusers", "transformers", "peft", "safetensors", "matplotlib", "tqdm"} <= runtime
    assert not runtime & set(NOT_FOR_STUDENTS), "the student runtime must not need grading, lab or test tools"
    assert {"nbgrader", "jupyter-server", "nbclient", "ipykernel"} <= names["grading"]
    assert {"jupyterlab", SELF} <= names["lab"] and "pytest" in names["test"] and "playwright" in names["browser"]
    assert [str(r) for r in _requirements("all")] == [f"{PROJECT['name']}[grading,lab,test]"]
    assert [str(r) for r in _requirements("dev")] == [f"{PROJECT['name']}[all,browser]"]


def test_lock_pins_every_declared_dependency_inside_its_range():
    pins = _lock()
    assert SELF not in pins, "constraints.txt must not pin the kit itself"
    for req in _all_requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"constraints.txt does not pin {req.name} (pyproject.toml: {req})"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {req.name}=={pins[name]}, outside pyproject.toml's {req}")
    assert pins["torch"] == "2.13.0", "the lock pins the CPU-tested torch exactly (no +cpu label)"


def test_this_environment_is_the_lock():
    """The venv the suite runs in was installed with the lock (`make venv`): every pinned package that is installed
    has the pinned version (torch's local label, e.g. +cpu, aside), and every declared one is installed."""
    wrong, missing = [], []
    declared = {canonicalize_name(r.name) for r in _all_requirements()} - {"playwright"}  # [browser]: CI's setup only
    for name, pinned in _lock().items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            if name in declared:
                missing.append(name)
            continue
        if Version(installed).public != Version(pinned).public:
            wrong.append(f"{name} {installed} (lock: {pinned})")
    assert not missing and not wrong, (
        f"missing {missing}, other versions {wrong}: run `make venv` (pip install -e \".[all]\" -c constraints.txt)")


# ---------------------------------------------------------------------------------------------- resolution
def _resolve(tmp_path: Path, *targets: str) -> dict[str, str]:
    """What pip would install, from scratch, for ``targets`` under the lock: {name: version}."""
    report = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
           "--report", str(report), "-c", str(LOCK), *targets]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}"
    return {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"]
            for i in json.loads(report.read_text())["install"]}


def _environment_is_exactly_the_lock(pins: dict[str, str]) -> bool:
    """Every installed distribution but the kit and pip is pinned, at its pinned version, and every pin is installed."""
    from importlib.metadata import distributions

    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in distributions()}
    installed.pop(SELF, None)
    installed.pop("pip", None)
    return installed.keys() == pins.keys() and all(
        Version(v).public == Version(pins[n]).public for n, v in installed.items())


@pytest.mark.slow
def test_the_lock_co_installs_and_is_complete(tmp_path):
    """Everything (`.[dev]`, the browser extra included) resolves under the lock, and to nothing but the lock
    (about a minute: pip reads every package's metadata). That the plain install pulls no grading, lab or test tool
    is checked on a real install, in the fresh venv below."""
    pins = _lock()
    if _environment_is_exactly_the_lock(pins):
        pytest.skip("this venv was installed from the lock and holds nothing else: the lock co-installs "
                    "(test_environment.py's pip check runs on it); the from-scratch resolve runs where it is not")
    resolved = _resolve(tmp_path, ".[dev]")
    resolved.pop(SELF)
    unpinned = sorted(set(resolved) - set(pins))
    assert not unpinned, f"constraints.txt lacks {unpinned}: add their pins (pip freeze of a fresh `make venv`)"
    differ = {n: v for n, v in resolved.items() if Version(v).public != Version(pins[n]).public}
    assert not differ, differ


# ---------------------------------------------------------------------------------------------- the packages
def _copy_tree(dst: Path) -> Path:
    """The kit's sources as a fresh clone has them (no venv, outputs or build leftovers)."""
    shutil.copytree(ROOT, dst, ignore=shutil.ignore_patterns(
        ".git", ".venv", "out", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".whl", "grades"))
    return dst


@pytest.fixture(scope="module")
def packages(tmp_path_factory) -> dict[str, Path]:
    """An sdist, a wheel built from it (what `pip install` of an sdist does) and a wheel built from the source tree
    (what `pip install git+URL` and `pip wheel .` do). Built once for the module."""
    base = tmp_path_factory.mktemp("packages")
    src = _copy_tree(base / "src")
    dist = base / "dist"
    subprocess.run([sys.executable, "-c", f"from setuptools import build_meta as b; b.build_sdist({str(dist)!r})"],
                   cwd=src, check=True, capture_output=True, timeout=300)
    sdist = next(dist.glob("*.tar.gz"))
    wheel = {}
    for name, target in (("from_sdist", sdist), ("from_tree", src)):
        out = base / name
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(target)],
                       check=True, capture_output=True, timeout=300)
        wheel[name] = next(out.glob("*.whl"))
    return {"sdist": sdist, **wheel}


def test_the_sdist_carries_the_shipped_model_the_classifier_and_the_lock(packages):
    with tarfile.open(packages["sdist"]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    missing = [f for f in [*SHIPPED, "helpers/py.typed", "constraints.txt", "pyproject.toml"] if f not in names]
    assert not missing, f"the sdist lacks {missing} (MANIFEST.in)"


@pytest.mark.parametrize("kind", ["from_sdist", "from_tree"])
def test_the_wheel_carries_the_shipped_model_and_the_classifier(packages, kind):
    names = set(zipfile.ZipFile(packages[kind]).namelist())
    assert "helpers/assets/digits-sd/unet/diffusion_pytorch_model.safetensors" in names
    assert {"helpers/assets/digit_classifier.safetensors", "helpers/assets/digit_classifier.json"} <= names
    missing = [f for f in [*SHIPPED, "helpers/py.typed"] if f not in names]
    assert not missing, f"the wheel lacks {missing} ([tool.setuptools.package-data])"
    tops = {n.split("/", 1)[0] for n in names}
    assert tops == {"helpers", "autograder", f"cd_course_kit-{PROJECT['version']}.dist-info"}, tops


# ---------------------------------------------------------------------------------------------- a fresh venv
_CHECK_CELL = '''\
# Added by tests/test_packaging.py: where the code ran and where it wrote.
import json, pathlib, sys
import helpers, helpers.models
from helpers.config import KIT_CHECKOUT
try:
    helpers.models._small_model_dir = lambda: pathlib.Path("no-such-model")
    helpers.models.resolve_model("small")
    missing_message = None
except FileNotFoundError as exc:
    missing_message = str(exc)
print("KIT-WHEEL " + json.dumps({"helpers": helpers.__file__, "python": sys.executable, "checkout": KIT_CHECKOUT,
                                 "out": str(CONFIG.out_path), "missing": missing_message,
                                 "grading_tools": sorted(m for m in sys.modules if m.split(".")[0] in
                                                         ("nbgrader", "jupyterlab", "pytest"))}))
'''


def _student_notebook_answered(notebook: str) -> nbformat.NotebookNode:
    """The student notebook (what a student opens: no hidden tests, which need the instructor's solutions/) with
    each answer cell filled from the solution notebook."""
    student = nbformat.read(ROOT / "notebooks" / notebook, as_version=4)
    answers = {c.metadata["nbgrader"]["grade_id"]: c.source for c in nbformat.read(ROOT / "solutions" / notebook, 4).cells
               if c.metadata.get("nbgrader", {}).get("solution")}
    filled = 0
    for cell in student.cells:
        grade_id = cell.metadata.get("nbgrader", {}).get("grade_id")
        if cell.metadata.get("nbgrader", {}).get("solution") and grade_id in answers:
            cell.source, filled = answers[grade_id], filled + 1
    assert filled == len(answers) > 0, f"{notebook}: {filled} of {len(answers)} answer cells filled"
    assert "HIDDEN TESTS" not in "".join(c.source for c in student.cells)
    return student


def _pip(python: Path, *args: str, timeout: int = 600) -> None:
    result = subprocess.run([str(python), "-m", "pip", "install", "--quiet", *args], capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, f"pip install {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


@pytest.mark.slow
def test_the_wheel_in_a_fresh_venv_runs_notebook_01_and_writes_under_the_working_directory(packages, tmp_path):
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    venv, work = tmp_path / "venv", tmp_path / "work"
    assert not tmp_path.is_relative_to(ROOT)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    # The student install: the wheel and its runtime dependencies, under the lock (torch from pip's cache).
    _pip(python, "-c", str(LOCK), str(packages["from_tree"]))
    installed = subprocess.run([str(python), "-m", "pip", "list", "--format=json"], capture_output=True, text=True,
                               check=True).stdout
    names = {canonicalize_name(p["name"]) for p in json.loads(installed)}
    assert not names & set(NOT_FOR_STUDENTS), sorted(names & set(NOT_FOR_STUDENTS))
    check = subprocess.run([str(python), "-m", "pip", "check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    # A kernel for the notebook (what JupyterLab or VS Code would bring), then notebook 01 in a folder of its own.
    _pip(python, "-c", str(LOCK), "ipykernel")
    spec_dir = tmp_path / "kernels" / "kit-wheel"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "kit wheel", "language": "python"}))
    work.mkdir()
    nb = _student_notebook_answered(NOTEBOOK_01)
    nb.cells.append(nbformat.v4.new_code_cell(_CHECK_CELL))
    env = {"PATH": f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}", "HOME": str(tmp_path),
           "MPLBACKEND": "Agg", "HF_HUB_OFFLINE": "1", "CD_KIT_DEVICE": "cpu", "CD_KIT_REDUCED": "1",
           "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "2"}  # no PYTHONPATH: the kit comes from the wheel alone
    km = KernelManager(kernel_name="kit-wheel", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(spec_dir.parent)]))
    NotebookClient(nb, km=km, timeout=600, resources={"metadata": {"path": str(work)}}).execute(env=env)

    printed = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.get("name") == "stdout")
    facts = json.loads(printed.split("KIT-WHEEL ", 1)[1])
    site = Path(facts["helpers"]).resolve().parents[1]
    assert site.is_relative_to(venv.resolve()) and site.name == "site-packages", facts
    assert Path(facts["python"]).parent == venv / "bin" and facts["checkout"] is False, facts
    assert Path(facts["out"]).resolve() == (work / "out" / "interactive").resolve(), facts
    assert (work / "out" / "interactive" / "figures" / "01_teacher_50_vs_4_steps.png").is_file()
    assert not (site / "out").exists() and not list(venv.rglob("01_teacher_50_vs_4_steps.png")), (
        "the notebook wrote into the venv")
    assert "git checkout" not in facts["missing"] and "Reinstall" in facts["missing"], facts["missing"]
    assert not facts["grading_tools"], facts
