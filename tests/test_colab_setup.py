"""The Colab / Kaggle setup cell (``helpers/platform_setup.py``, ``docs/colab.md``), tested by simulation.

There is no Colab or Kaggle here, so the slow tests build a stand-in for each: a fresh virtual environment whose
"platform" packages (torch and its dependencies, numpy, pillow, tqdm, pyyaml) come from a folder outside the
environment, as a hosted image's system packages do, with torch's metadata saying **2.12.0** while the kit pins
2.13.0 (the real torch code is linked in, so the kit can import and run it; a CPU wheel of another torch is not on
this package index, and the CUDA one is gigabytes). The course is the student bundle's zip
(``python -m autograder bundle --zip``) through a ``file://`` URL, and the course folder is a temporary one
(``CD_KIT_COURSE_DIR``). Kaggle is recognised by its
environment marker, Colab by an importable ``google.colab`` (a fake whose ``drive.mount`` records the call). The cell
is taken from the released student notebook of 03 and run by the environment's own Python; then, in the same
process, torch must be the platform's, ``import helpers`` must work without a restart, and
``load_course_functions`` must find the student's 02 functions from the assignment folder the cell changed into.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from helpers import platform_setup
from helpers.course import KIT_ROOT
from helpers.platform_setup import cell_source, constraints, to_install

SITE = Path(next(p for p in sys.path if p.endswith("site-packages") and Path(p, "torch").is_dir()))
#: What the stand-in platform has preinstalled (linked from this environment, outside the new one).
PLATFORM = ("torch", "torchgen", "sympy", "mpmath", "networkx", "filelock", "jinja2", "markupsafe", "fsspec",
            "typing_extensions", "numpy", "pillow", "PIL", "tqdm", "yaml", "pyyaml")
FAKE_TORCH = "2.12.0"
MARKERS = ("COLAB_RELEASE_TAG", "COLAB_GPU", "KAGGLE_KERNEL_RUN_TYPE", "KAGGLE_URL_BASE")

DRIVER = r'''
import json, os, sys, importlib.metadata as md
cell = open(sys.argv[1], encoding="utf-8").read()
exec(compile(cell, "<setup cell>", "exec"))
import torch
import helpers
from helpers.config import KitConfig
from helpers.notebook_functions import answer_cells, load_course_functions
# the student solved 02: put the reference answers into *their* notebook in the course folder
course = COURSE.resolve()
student_nb = course / "notebooks" / "02_ddim_step" / "ddim_step.ipynb"
solved = answer_cells(sys.argv[2])  # the kit's solution: the bundle has none
nb = json.loads(student_nb.read_text())
for c in nb["cells"]:
    gid = c.get("metadata", {}).get("nbgrader", {}).get("grade_id")
    if c["cell_type"] == "code" and gid in solved:
        c["source"] = solved[gid]
student_nb.write_text(json.dumps(nb))
fns = load_course_functions("03_ct_derivation", ["q_sample", "ddim_solver_step"], KitConfig.from_environ())
from types import SimpleNamespace
sched = SimpleNamespace(alphas_cumprod=torch.linspace(0.99, 0.01, 1000))
x = torch.ones(2, 1, 2, 2)
xt = fns.q_sample(x, torch.tensor([0, 999]), sched, noise=torch.zeros_like(x))
print("RESULT " + json.dumps({
    "torch_version": md.version("torch"), "torch_file": torch.__file__, "helpers_file": helpers.__file__,
    "cwd": os.getcwd(), "q_sample_ok": bool(torch.allclose(xt[:, 0, 0, 0], sched.alphas_cumprod[[0, 999]].sqrt())),
    "kit": md.version("cd-course-student"), "diffusers": md.version("diffusers"),
    "solutions_in_course": (course / "solutions").exists()}))
'''


# --- fast: the pieces, in this environment ------------------------------------------------------------------

def test_to_install_takes_only_what_is_missing_or_too_old():
    have = {"torch": "2.5.1", "numpy": "2.5.0", "diffusers": "0.30.0", "tqdm": "4.67.0", "ipykernel": "6.17.1",
            "pillow": "11.0.0"}
    reqs = ["torch==2.13.0", "numpy==2.4.6", "diffusers==0.42.1", "transformers>=5,<6", "tqdm", "ipykernel==7.4.0",
            "nbgrader==0.9.6", "pytest==9.2.0", "pillow>=10,<12", "pywin32; sys_platform == 'win32'"]
    install, notes = to_install(reqs, have.get)
    assert install == ["diffusers==0.42.1", "transformers>=5,<6"]  # torch, kernel, grading tools never
    assert notes == ["kept the platform's numpy 2.5.0 (the course asks for ==2.4.6)"]
    assert constraints(have.get) == ["torch==2.5.1", "ipykernel==6.17.1"]


def test_requirements_follow_the_pyproject(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\ndependencies = ["torch>=2.4", "peft>=0.17"]\n'
                                             '[project.optional-dependencies]\ngrading = ["nbgrader"]\n')
    assert platform_setup.requirements(tmp_path) == ["torch>=2.4", "peft>=0.17"]
    assert platform_setup.requirements(KIT_ROOT)  # the kit's own file parses


def test_main_on_a_small_gpu_selects_sd15_and_the_low_memory_profile(monkeypatch, tmp_path, capsys):
    for name in ("CD_KIT_MODEL", "CD_KIT_TRAIN_PROFILE"):
        # set, then delete: monkeypatch records the variable and removes what main() sets at teardown (a bare
        # delenv of an absent variable records nothing, and sd15 leaked into every later test's kernels)
        monkeypatch.setenv(name, "unset")
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    calls = []
    done = platform_setup.main(KIT_ROOT, "02_ddim_step", pip=lambda *a: calls.append(a),
                               small_gpu=lambda: "Tesla T4")
    assert os.environ["CD_KIT_MODEL"] == "sd15" and os.environ["CD_KIT_TRAIN_PROFILE"] == "low-memory"
    assert Path.cwd() == KIT_ROOT / "notebooks" / "02_ddim_step" and sys.path[0] == str(KIT_ROOT)
    assert not done["restart"] and all("torch" not in " ".join(c) for c in calls)
    assert "Tesla T4" in capsys.readouterr().out
    monkeypatch.setenv("CD_KIT_MODEL", "small")  # a choice made already wins
    platform_setup.main(KIT_ROOT, "02_ddim_step", pip=lambda *a: None, small_gpu=lambda: "Tesla T4")
    assert os.environ["CD_KIT_MODEL"] == "small"


def test_elsewhere_the_cell_does_nothing(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in MARKERS and not k.startswith("CD_KIT_COURSE")}
    env["PYTHONPATH"] = ""
    (tmp_path / "cell.py").write_text(cell_source("02_ddim_step") + "\nimport os; print(os.getcwd())\n")
    out = subprocess.run([sys.executable, "cell.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out == ["Not on Colab or Kaggle: nothing to set up here.", str(tmp_path)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cell.py"]


def test_the_released_notebooks_start_with_the_cell():
    from helpers.course import ASSIGNMENTS

    for a in ASSIGNMENTS:
        cells = json.loads((KIT_ROOT / "notebooks" / a.id / a.notebook).read_text())["cells"]
        code = next(c for c in cells if c["cell_type"] == "code")
        assert "".join(code["source"]) == cell_source(a.id).rstrip("\n") and not code["metadata"].get("nbgrader")


# --- slow: the simulated platforms ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def course_repo(tmp_path_factory) -> str:
    """The student bundle's zip, as the course's URL (``file://``)."""
    from autograder.bundle import build_bundle

    folder = build_bundle(tmp_path_factory.mktemp("remote") / "cd-course", zip_it=True)
    return Path(f"{folder}.zip").as_uri()


def _platform_env(root: Path) -> Path:
    """A fresh venv plus a 'system packages' folder (on its path through a .pth file) holding links to this
    environment's torch & co. and a torch metadata saying 2.12.0. Returns the venv's python."""
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True)
    python = root / "venv" / "bin" / "python"
    system = root / "system-packages"
    system.mkdir()
    for entry in SITE.iterdir():
        stem = entry.name.split("-")[0].removesuffix(".py")
        if stem not in PLATFORM or entry.name.startswith("torch-"):
            continue
        # links: read-only use; pip never removes a distribution outside its environment
        (system / entry.name).symlink_to(entry)
    real = next(SITE.glob("torch-*.dist-info"))
    fake = system / f"torch-{FAKE_TORCH}.dist-info"
    fake.mkdir()
    meta = (real / "METADATA").read_text(encoding="utf-8")
    version_line = next(line for line in meta.splitlines() if line.startswith("Version:"))
    (fake / "METADATA").write_text(meta.replace(version_line, f"Version: {FAKE_TORCH}", 1), encoding="utf-8")
    (fake / "RECORD").write_text(f"{fake.name}/METADATA,,\n{fake.name}/RECORD,,\n")
    (fake / "INSTALLER").write_text("platform\n")
    site = next((root / "venv" / "lib").glob("python3*/site-packages"))
    (site / "platform-system.pth").write_text(f"{system}\n")
    return python


def _run_cell(python: Path, root: Path, env_extra: dict[str, str], course_repo: str, pythonpath: str = "") -> dict:
    cell = root / "cell.py"
    cells = json.loads((KIT_ROOT / "notebooks" / "03_ct_derivation" / "ct_derivation.ipynb").read_text())["cells"]
    cell.write_text("".join(next(c for c in cells if c["cell_type"] == "code")["source"]))
    (root / "driver.py").write_text(DRIVER)
    env = {k: v for k, v in os.environ.items() if k not in MARKERS and not k.startswith(("CD_KIT_", "VIRTUAL_ENV"))}
    env.update({"PYTHONPATH": pythonpath, "PYTHONNOUSERSITE": "1", "CD_KIT_COURSE_DIR": str(root / "course"),
                "CD_KIT_COURSE_URL": course_repo, "CD_KIT_DEVICE": "cpu", "MPLBACKEND": "Agg",
                "PATH": f"{python.parent}:{os.environ['PATH']}", **env_extra})
    start = time.perf_counter()
    solution = KIT_ROOT / "solutions" / "02_ddim_step" / "ddim_step.ipynb"
    proc = subprocess.run([str(python), str(root / "driver.py"), str(cell), str(solution)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=240)
    print(f"setup cell + checks: {time.perf_counter() - start:.1f} s\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    return {"stdout": proc.stdout, **json.loads(line.removeprefix("RESULT "))}


def _check(result: dict, root: Path, python: Path) -> None:
    assert result["torch_version"] == FAKE_TORCH, "the platform's torch was replaced"
    assert Path(result["torch_file"]).resolve() == (SITE / "torch" / "__init__.py").resolve()
    site = next((root / "venv" / "lib").glob("python3*/site-packages"))
    assert not [p for p in site.iterdir() if p.name == "torch" or p.name.startswith("torch-")], (
        "a torch was installed into the environment")  # torchmetrics (a kit dependency) may be
    course = (root / "course").resolve()
    assert Path(result["helpers_file"]).resolve() == course / "helpers" / "__init__.py"
    assert Path(result["cwd"]).resolve() == course / "notebooks" / "03_ct_derivation"
    assert result["q_sample_ok"], "load_course_functions did not find the student's 02 functions"
    assert not result["solutions_in_course"], "the course folder holds solutions: it fetched the kit, not the bundle"
    assert "RESTART NEEDED" not in result["stdout"]
    check = subprocess.run([str(python), "-m", "pip", "check"], capture_output=True, text=True)
    print("pip check:", check.stdout[-1500:])


@pytest.mark.slow
def test_kaggle_simulation(tmp_path, course_repo):
    python = _platform_env(tmp_path)
    result = _run_cell(python, tmp_path, {"KAGGLE_KERNEL_RUN_TYPE": "Interactive"}, course_repo)
    assert "Installing" in result["stdout"] and "diffusers" in result["stdout"]
    _check(result, tmp_path, python)


@pytest.mark.slow
def test_colab_simulation_and_a_second_run(tmp_path, course_repo):
    python = _platform_env(tmp_path)
    fake = tmp_path / "fake-colab"
    (fake / "google" / "colab").mkdir(parents=True)
    (fake / "google" / "colab" / "__init__.py").write_text("")
    (fake / "google" / "colab" / "drive.py").write_text(
        "from pathlib import Path\n"
        "def mount(path):\n"
        "    (Path(__file__).parent / 'mounted').write_text(path)\n")
    result = _run_cell(python, tmp_path, {}, course_repo, pythonpath=str(fake))
    assert (fake / "google" / "colab" / "mounted").read_text() == "/content/drive"
    _check(result, tmp_path, python)
    again = _run_cell(python, tmp_path, {}, course_repo, pythonpath=str(fake))  # the next day: update, no install
    assert "Installing" not in again["stdout"] and "Could not update" not in again["stdout"]
    assert "Course updated" not in again["stdout"], "an unchanged bundle rewrote files"
    _check(again, tmp_path, python)


def test_readme_table_is_the_generated_one():
    from helpers.course import ASSIGNMENTS

    text = (KIT_ROOT / "README.md").read_text(encoding="utf-8")
    table = platform_setup.readme_table([(a.id, a.notebook) for a in ASSIGNMENTS])
    assert f"{platform_setup.README_BEGIN}\n{table}\n{platform_setup.README_END}" in text, (
        "README's Colab table is out of date: run `python -m helpers.platform_setup`")
    assert "docs/colab.md" in text


def test_collect_writes_nbgraders_submitted_layout(tmp_path):
    import zipfile

    from helpers.commands.collect import collect, default_notebooks_dir

    for a, nb in (("02_ddim_step", "ddim_step.ipynb"), ("03_ct_derivation", "ct_derivation.ipynb")):
        shutil.copy(KIT_ROOT / "notebooks" / a / nb, (tmp_path / a).mkdir() or tmp_path / a / nb)
    assert default_notebooks_dir(tmp_path / "03_ct_derivation") == tmp_path
    members = collect("jdoe", tmp_path, tmp_path / "out.zip")
    assert members == ["jdoe/02_ddim_step/ddim_step.ipynb", "jdoe/03_ct_derivation/ct_derivation.ipynb"]
    assert zipfile.ZipFile(tmp_path / "out.zip").namelist() == members
    assert collect("jdoe", tmp_path, tmp_path / "one.zip", only=["03_ct_derivation"]) == members[1:]
    with pytest.raises(ValueError, match="student id"):
        collect("../x", tmp_path, tmp_path / "bad.zip")
    (tmp_path / "02_ddim_step" / "ddim_step.ipynb").write_text("{broken")
    with pytest.raises(ValueError, match="not a valid notebook"):
        collect("jdoe", tmp_path, tmp_path / "bad.zip")


# --- the bundle's unpacking (fast) ------------------------------------------------------------------------------

def _zip(path: Path, files: dict[str, bytes], top: str = "cd-course/") -> zipfile.ZipFile:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(top + name, data)
    return zipfile.ZipFile(path)


def _bundle_files(files: dict[str, bytes]) -> dict[str, bytes]:
    manifest = {"bundle": "test", "files": {n: hashlib.sha256(d).hexdigest() for n, d in files.items()}}
    return {**files, platform_setup.BUNDLE_MANIFEST: json.dumps(manifest).encode()}


def test_unpack_updates_the_course_and_keeps_the_students_notebooks(tmp_path):
    nb = "notebooks/02_ddim_step/ddim_step.ipynb"
    first = _bundle_files({"helpers/a.py": b"one", nb: b"released"})
    course = tmp_path / "course"
    done = platform_setup.unpack(_zip(tmp_path / "1.zip", first), course)
    assert sorted(done["written"]) == sorted(first) and not done["kept"]
    (course / nb).write_bytes(b"my answers")
    second = _bundle_files({"helpers/a.py": b"two", nb: b"released again", "notebooks/05/new.ipynb": b"new"})
    done = platform_setup.unpack(_zip(tmp_path / "2.zip", second, top="REPO-main/"), course)
    assert (course / "helpers" / "a.py").read_bytes() == b"two" and (course / nb).read_bytes() == b"my answers"
    assert (course / "notebooks" / "05" / "new.ipynb").read_bytes() == b"new" and done["kept"] == [nb]
    assert platform_setup.unpack(_zip(tmp_path / "3.zip", second), course)["written"] == []  # nothing changed


def test_unpack_refuses_what_is_not_a_student_bundle(tmp_path):
    kit = _zip(tmp_path / "kit.zip", {"helpers/platform_setup.py": b"", "solutions/01/x.ipynb": b"{}"})
    with pytest.raises(ValueError, match="not a student bundle"):
        platform_setup.unpack(kit, tmp_path / "course")
    assert not (tmp_path / "course").exists()
    evil = _bundle_files({"../outside.py": b"x"})
    with pytest.raises(ValueError, match="unsafe paths"):
        platform_setup.unpack(_zip(tmp_path / "evil.zip", evil), tmp_path / "course")
    assert not (tmp_path / "outside.py").exists()
