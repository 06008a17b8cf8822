"""The JupyterLab start commands without a browser: kernel resolution, trust, formgrader configuration,
and the released notebooks opening cleanly (no outputs, kernel ``python3``, answer cells editable, test
cells read-only). The end-to-end browser test is ``test_browser.py``."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from helpers.course import ASSIGNMENTS, KIT_ROOT
from helpers.commands.lab import (HOST, KERNEL_NAME, LabSetup, lab_argv, lab_environment, lab_url,
                                  trust_notebooks, write_kernelspec, write_student_config)


@pytest.fixture()
def jupyter_home(tmp_path, monkeypatch) -> Path:
    """Private Jupyter folders, so that the user's own configuration and kernels play no part."""
    for var in ("JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    for var in ("JUPYTER_PATH", "JUPYTER_CONFIG_PATH", "JUPYTER_TOKEN", "CD_KIT_MODEL"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def _setup(tmp_path: Path, model: str | None = None) -> LabSetup:
    runtime = tmp_path / "runtime"
    write_kernelspec(runtime / "data")
    write_student_config(runtime / "config")
    return LabSetup(tmp_path, 8999, "tok123", runtime, model)


def _run_in(env: dict[str, str], code: str, cwd: Path) -> str:
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_python3_kernel_resolves_to_this_environment_even_with_another_one_first(jupyter_home, monkeypatch):
    """Another `python3` kernelspec that comes first (here on JUPYTER_PATH, as conda setups do) must not
    win in the lab."""
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter_home / "other"))
    user_kernel = jupyter_home / "other" / "kernels" / KERNEL_NAME
    user_kernel.mkdir(parents=True)
    (user_kernel / "kernel.json").write_text(json.dumps(
        {"argv": ["/usr/bin/python3", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
         "display_name": "someone else's python", "language": "python"}))
    code = ("from jupyter_client.kernelspec import KernelSpecManager as K; "
            "print(K().get_kernel_spec('python3').argv[0])")
    assert _run_in(dict(os.environ), code, jupyter_home) == "/usr/bin/python3"  # the trap is real
    env = lab_environment(_setup(jupyter_home), base=dict(os.environ))
    assert _run_in(env, code, jupyter_home) == sys.executable


def test_kernel_started_by_the_lab_imports_helpers_and_sees_the_model_setting(jupyter_home):
    """Start the kernel the way JupyterLab does (by name) and ask it what it sees."""
    elsewhere = jupyter_home / "elsewhere"
    elsewhere.mkdir()
    env = lab_environment(_setup(jupyter_home, model="my-model-folder"), base=dict(os.environ))
    code = (
        "from jupyter_client.manager import start_new_kernel\n"
        "km, kc = start_new_kernel(kernel_name='python3')\n"
        "out = []\n"
        "kc.execute_interactive('import sys, os, helpers; print(sys.executable, os.environ[\"CD_KIT_MODEL\"], "
        "helpers.__file__)', output_hook=lambda m: out.append(m['content'].get('text', '')), timeout=60)\n"
        "kc.stop_channels(); km.shutdown_kernel(now=True)\n"
        "print(''.join(out))\n"
    )
    python, model, helpers_file = _run_in(env, code, elsewhere).split()
    assert Path(python) == Path(sys.executable)
    assert model == "my-model-folder"
    assert Path(helpers_file).parent == KIT_ROOT / "helpers"


def test_server_options_bind_localhost_on_the_printed_port_only(tmp_path):
    setup = _setup(tmp_path)
    argv = lab_argv(setup, open_browser=False)
    assert f"--ServerApp.ip={HOST}" in argv and HOST == "127.0.0.1"
    assert "--ServerApp.port=8999" in argv and "--ServerApp.port_retries=0" in argv
    assert f"--ServerApp.root_dir={tmp_path}" in argv
    assert lab_url(setup) == "http://127.0.0.1:8999/lab?token=tok123"
    env = lab_environment(setup, base={"PATH": "/usr/bin", "MPLBACKEND": "Agg"})
    assert "MPLBACKEND" not in env  # figures show inline in the notebooks
    assert env["JUPYTER_TOKEN"] == "tok123" and "tok123" not in " ".join(argv)  # token not visible in `ps`
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)  # nbgrader runs `alembic`


def test_student_lab_hides_the_instructor_tools(tmp_path):
    write_student_config(tmp_path)
    page = json.loads((tmp_path / "labconfig" / "page_config.json").read_text())["disabledExtensions"]
    assert page["@jupyter/nbgrader:formgrader"] and "@jupyter/nbgrader:validate-assignment" not in page
    server = json.loads((tmp_path / "jupyter_server_config.json").read_text())["ServerApp"]["jpserver_extensions"]
    assert server["nbgrader.server_extensions.formgrader"] is False
    assert "nbgrader.server_extensions.validate_assignment" not in server


def test_trust_signs_clean_notebooks_and_leaves_ones_with_outputs(jupyter_home):
    from nbformat.sign import NotebookNotary
    from nbformat.v4 import new_code_cell, new_notebook, new_output

    folder = jupyter_home / "nbs"
    (folder / "a").mkdir(parents=True)
    clean = new_notebook(cells=[new_code_cell("x = 1")])
    dirty = new_notebook(cells=[new_code_cell("print(1)", outputs=[new_output("stream", text="1\n")])])
    nbformat.write(clean, folder / "a" / "clean.ipynb")
    nbformat.write(dirty, folder / "a" / "outputs.ipynb")
    notary = NotebookNotary()
    assert not notary.check_signature(nbformat.read(folder / "a" / "clean.ipynb", 4))
    assert trust_notebooks(folder) == [folder / "a" / "clean.ipynb"]
    assert notary.check_signature(nbformat.read(folder / "a" / "clean.ipynb", 4))
    assert not notary.check_signature(nbformat.read(folder / "a" / "outputs.ipynb", 4))


def test_formgrader_reads_the_generated_config_not_the_kits(jupyter_home, tmp_path):
    """Load the configuration exactly as nbgrader's formgrader extension does, from its working folder."""
    from autograder.config import COURSE_ID
    from autograder.lab import write_formgrader_config

    course, gradebook = tmp_path / "grades", tmp_path / "grades" / "gradebook.db"
    course.mkdir()
    cfg = write_formgrader_config(tmp_path / "cfg", course, gradebook).parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(KIT_ROOT), os.environ.get("PYTHONPATH", "")]))
    code = ("from nbgrader.server_extensions.formgrader.formgrader import FormgradeExtension as F\n"
            "f = F(); f.initialize([]); d = f.coursedir\n"
            "print(d.root, d.db_url, d.course_id, d.source_directory, sep='\\n')")
    root, db_url, course_id, source = _run_in(env, code, cfg).splitlines()
    assert (root, db_url, course_id) == (str(course), f"sqlite:///{gradebook}", COURSE_ID)
    assert source == "source"  # the grade command's course layout: OUT/source


@pytest.mark.parametrize("argv, message", [
    (["-m", "helpers.commands.lab", "--notebooks", "{tmp}", "--no-browser"], "python -m autograder release"),
    (["-m", "autograder.lab", "--grades", "{tmp}", "--no-browser"], "python -m autograder grade"),
    (["-m", "autograder.lab", "--no-browser"], "--grades OUT"),
])
def test_commands_refuse_missing_inputs_with_what_to_do(tmp_path, argv, message):
    result = subprocess.run([sys.executable] + [a.format(tmp=tmp_path) for a in argv], capture_output=True,
                            text=True, timeout=120, cwd=KIT_ROOT)
    assert result.returncode != 0
    assert message in result.stderr


def _released_notebooks() -> list[Path]:
    return [KIT_ROOT / "notebooks" / a.id / a.notebook for a in ASSIGNMENTS
            if (KIT_ROOT / "notebooks" / a.id / a.notebook).exists()]


def test_the_kit_has_released_notebooks():
    assert _released_notebooks(), "notebooks/ has no assignment notebooks: run `python -m autograder release`"


@pytest.mark.parametrize("path", _released_notebooks(), ids=lambda p: p.parent.name)
def test_released_notebook_opens_cleanly(path):
    """No stale outputs, the kit's kernel name, answer cells editable and test cells read-only."""
    nb = nbformat.read(path, as_version=4)
    assert nb.metadata.get("kernelspec", {}).get("name") == KERNEL_NAME
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert not [c for c in code if c.outputs or c.execution_count is not None], "outputs committed in notebooks/"
    assignment = next(a for a in ASSIGNMENTS if a.id == path.parent.name)
    by_id = {c.metadata.get("nbgrader", {}).get("grade_id"): c for c in code}
    for fn in assignment.functions:
        answer, tests = by_id.get(fn), by_id.get(f"test_{fn}")
        assert answer is not None and tests is not None, f"{path.name}: no answer/test cell for {fn}"
        assert answer.metadata.get("editable", True) is True, f"answer cell {fn} is read-only"
        assert tests.metadata.get("editable") is False and tests.metadata.get("deletable") is False, \
            f"test cell test_{fn} can be edited or deleted"
