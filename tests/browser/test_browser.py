"""End to end in a real browser (headless Debian Chromium driven by Playwright):

1. a student starts JupyterLab with ``python -m helpers.commands.lab``, opens ``02_ddim_step``, types the two
   answers (the reference solutions), runs all cells, sees the tests pass, presses *Validate* and sees
   success;
2. the instructor grades that notebook with ``python -m autograder grade``, starts JupyterLab with
   ``python -m autograder.lab``, opens the formgrader and sees the student's score.

Screenshots of each step go to ``out/browser/`` (with the servers' logs). Setup on a fresh machine:
``scripts/setup_browser_test.sh``. Run: ``pytest -m browser`` (a few minutes on a laptop CPU).
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import nbformat
import pytest

from helpers.course import KIT_ROOT, assignment
from helpers.commands.lab import KERNEL_DISPLAY_NAME
from helpers.notebook_functions import answer_cells

import lab_session as ui

pytestmark = pytest.mark.browser

ASSIGNMENT = assignment("02_ddim_step")
STUDENT = "student_e2e"
SHOTS = KIT_ROOT / "out" / "browser"


@pytest.fixture(scope="module", autouse=True)
def browser_tools() -> None:
    """Skip where Chromium/Playwright are missing, except in CI (``CI`` set), where that is a failure."""
    missing = ui.missing_browser_tools()
    if missing:
        message = f"browser test needs {', '.join(missing)}: {ui.SETUP_HINT}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def shots() -> Path:
    shutil.rmtree(SHOTS, ignore_errors=True)
    SHOTS.mkdir(parents=True)
    return SHOTS


def reference_answers() -> dict[str, str]:
    """The reference code of each graded function of the assignment, from its solution notebook."""
    cells = answer_cells(KIT_ROOT / "solutions" / ASSIGNMENT.id / ASSIGNMENT.notebook)
    markers = ("### BEGIN SOLUTION", "### END SOLUTION")
    return {fn: "\n".join(line for line in cells[fn].splitlines() if line.strip() not in markers)
            for fn in ASSIGNMENT.functions}


def max_points() -> float:
    """Points of the assignment, from the nbgrader metadata of its solution notebook's test cells."""
    nb = nbformat.read(KIT_ROOT / "solutions" / ASSIGNMENT.id / ASSIGNMENT.notebook, as_version=4)
    return sum(float(c.metadata.get("nbgrader", {}).get("points", 0)) for c in nb.cells
               if c.metadata.get("nbgrader", {}).get("grade"))


def cell_index(nb, grade_id: str) -> int:
    """Position of the cell whose nbgrader grade_id is ``grade_id``."""
    for i, c in enumerate(nb.cells):
        if c.metadata.get("nbgrader", {}).get("grade_id") == grade_id:
            return i
    raise AssertionError(f"{ASSIGNMENT.notebook} has no cell with grade_id {grade_id!r}")


def student_copy(tmp: Path) -> Path:
    """A student's working copy of the released notebooks (the kit's ``notebooks/`` stays untouched)."""
    source = Path(os.environ.get("CD_KIT_BROWSER_NOTEBOOKS", KIT_ROOT / "notebooks"))
    assert (source / ASSIGNMENT.id / ASSIGNMENT.notebook).exists(), (
        f"no {ASSIGNMENT.id}/{ASSIGNMENT.notebook} under {source}: run `python -m autograder release`")
    return Path(shutil.copytree(source, tmp / "notebooks", ignore=shutil.ignore_patterns(".ipynb_checkpoints")))


def assert_local_only(lab: ui.RunningLab) -> None:
    """The URL is on 127.0.0.1 with a token; the API refuses requests without it and other addresses."""
    assert lab.base.startswith("http://127.0.0.1:") and lab.token
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{lab.base}/api/contents", timeout=10)
    assert refused.value.code == 403
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))  # no packet is sent; finds this host's outward address
            outward = probe.getsockname()[0]
        except OSError:
            return  # no network interface besides loopback: nothing else to check
    if not outward.startswith("127."):
        with pytest.raises(OSError):
            socket.create_connection((outward, int(lab.base.rsplit(":", 1)[1])), timeout=5).close()


def student_session(page, lab: ui.RunningLab, notebooks: Path, shots: Path) -> Path:
    """The student's side in the browser; returns the saved notebook."""
    path = notebooks / ASSIGNMENT.id / ASSIGNMENT.notebook
    nb = nbformat.read(path, as_version=4)
    page.goto(lab.url)  # the URL the command printed
    ui.open_from_file_browser(page, ASSIGNMENT.id, ASSIGNMENT.notebook)
    ui.wait_notebook_ready(page, KERNEL_DISPLAY_NAME)  # the name of the kit's kernelspec, not ipykernel's own
    trust = page.locator("#jp-main-statusbar [title^='Notebook trusted']")
    assert trust.count() == 1, "the released notebook should open trusted"
    ui.cell(page, 0)
    page.screenshot(path=shots / "01_student_opened_notebook.png")
    answers = {fn: cell_index(nb, fn) for fn in ASSIGNMENT.functions}
    tests = {fn: cell_index(nb, f"test_{fn}") for fn in ASSIGNMENT.functions}
    for fn in ASSIGNMENT.functions:  # answer cells editable, test cells read-only
        assert ui.cell(page, answers[fn]).locator(".cm-content").get_attribute("aria-readonly") != "true"
        assert ui.cell(page, tests[fn]).locator(".cm-content").get_attribute("aria-readonly") == "true"

    before = ui.cell_source(page, tests[ASSIGNMENT.functions[0]])
    ui.type_into_cell(page, tests[ASSIGNMENT.functions[0]], "# edited\n")
    assert ui.cell_source(page, tests[ASSIGNMENT.functions[0]]) == before, "a test cell accepted typing"
    for fn, code in reference_answers().items():
        ui.type_into_cell(page, answers[fn], code)
        typed = ui.cell_source(page, answers[fn])
        assert [line.rstrip() for line in typed.strip().splitlines()] == [
            line.rstrip() for line in code.strip().splitlines()], f"the {fn} cell does not hold what was typed"
    ui.cell(page, answers[ASSIGNMENT.functions[0]])
    page.screenshot(path=shots / "02_student_filled_answers.png")

    ui.run_all_cells(page)
    ui.save_notebook(page)
    saved = nbformat.read(path, as_version=4)
    errors = [f"cell {i}: {o.ename}: {o.evalue}" for i, c in enumerate(saved.cells) if c.cell_type == "code"
              for o in c.outputs if o.output_type == "error"]
    assert not errors, f"cells failed after Run All: {errors}"
    setup_text = "".join(o.get("text", "") for c in saved.cells if c.cell_type == "code" for o in c.outputs)
    assert f"Model: {os.environ.get('CD_KIT_MODEL') or 'small'!r}" in setup_text, "the model setting is not shown"
    for fn in ASSIGNMENT.functions:
        test_cell = saved.cells[tests[fn]]
        assert test_cell.execution_count is not None, f"test_{fn} did not run"
        ui.cell(page, tests[fn]).screenshot(path=shots / f"03_student_test_{fn}_passed.png")
    ui.cell(page, tests[ASSIGNMENT.functions[-1]])
    page.screenshot(path=shots / "03_student_tests_passed.png")

    page.locator(f"{ui.NOTEBOOK} .jp-Toolbar").get_by_text("Validate", exact=True).click()
    dialog = page.locator(".jp-Dialog")
    dialog.wait_for(timeout=900_000)
    page.wait_for_timeout(500)
    page.screenshot(path=shots / "04_student_validate_success.png")
    assert "Success! Your notebook passes all the tests." in dialog.inner_text(), dialog.inner_text()
    dialog.get_by_role("button", name="Ok").click()
    return path


def grade(notebook: Path, tmp: Path, env: dict[str, str]) -> Path:
    """Submit the student's notebook and grade it with the kit's command; return the grades folder."""
    submitted = tmp / "submitted" / STUDENT / ASSIGNMENT.id
    submitted.mkdir(parents=True)
    shutil.copy(notebook, submitted / ASSIGNMENT.notebook)
    out = tmp / "grades"
    result = subprocess.run([sys.executable, "-m", "autograder", "grade", str(tmp / "submitted"), "--out", str(out)],
                            cwd=KIT_ROOT, env=env, capture_output=True, text=True, timeout=900)
    (SHOTS / "grade.log").write_text(result.stdout + result.stderr)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (out / "gradebook.db").is_file(), f"`autograder grade` wrote no gradebook.db into {out}"
    return out


def instructor_session(page, lab: ui.RunningLab, shots: Path) -> None:
    """The formgrader in the instructor's JupyterLab shows the student's score."""
    page.goto(lab.banner["formgrader"])  # opens JupyterLab with the formgrader tab
    frame = page.frame_locator("iframe").first
    frame.get_by_text(ASSIGNMENT.id, exact=True).first.wait_for(timeout=120_000)
    page.screenshot(path=shots / "05_formgrader_assignments.png")
    frame.get_by_role("link", name="Manage Students").click()
    student = frame.locator("tr", has=frame.get_by_text(STUDENT, exact=True))
    student.locator("a").first.click()  # the student's page: one row per assignment
    row = frame.locator("tr", has=frame.get_by_role("link", name=ASSIGNMENT.id, exact=True))
    row.wait_for(timeout=60_000)
    shown = row.locator("td.score").inner_text()
    page.screenshot(path=shots / "06_formgrader_student_score.png")
    score, total = (float(v) for v in shown.split("/"))
    assert total == max_points() and score == total, f"formgrader shows {shown} for {ASSIGNMENT.id}, expected full marks"


def test_student_validates_and_instructor_sees_the_score(tmp_path, shots):
    env = ui.isolated_jupyter_env(tmp_path / "home")
    env["CD_KIT_REDUCED"] = "1"  # the kit's short mode: fewer sampling steps in the demo cells
    notebooks = student_copy(tmp_path)
    timings = ui.Timings(shots / "timings.json")
    with ui.chromium_page(tmp_path / "chromium-profile") as page:
        student_cmd = ["-m", "helpers.commands.lab", "student", "--notebooks", str(notebooks), "--no-browser"]
        start = time.monotonic()
        with ui.running_lab(student_cmd, env, shots / "student_lab.log") as lab:
            timings.record("student lab start", start)
            assert_local_only(lab)
            with timings("student session: open, fill, run all, validate"):
                saved = student_session(page, lab, notebooks, shots)
        with timings("grade"):
            grades = grade(saved, tmp_path, env)
        instructor_cmd = ["-m", "autograder.lab", "--grades", str(grades), "--no-browser"]
        instructor_env = env | {"JUPYTER_CONFIG_DIR": str(tmp_path / "instructor-config")}  # no student workspace
        start = time.monotonic()
        with ui.running_lab(instructor_cmd, instructor_env, shots / "instructor_lab.log") as lab:
            timings.record("instructor lab start", start)
            assert_local_only(lab)
            with timings("formgrader session"):
                instructor_session(page, lab, shots)
