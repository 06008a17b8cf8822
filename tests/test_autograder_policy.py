"""Unit tests of the grader's defences without notebooks: the static answer-cell policy, the isolated
re-check (fork server + sandbox), the audit hook, orphan reaping, notebook screening and cell verdicts."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import nbformat
import pytest

from autograder.policy import check_cell
from autograder.preprocessors import kernel_verdict
from autograder.testing import TOY_CHECKS_MODULE, strip_solution, write_toy_course
from autograder.types import CourseStructure, GradedCell, NotebookSpec
from mutant_cases import mutant_cases

ROOT = Path(__file__).resolve().parents[1]
SOLUTIONS = ROOT / "solutions"


# --- static policy ----------------------------------------------------------------------------------------

def _course_cells() -> list[tuple[str, str]]:
    from autograder.reference import source_functions

    if not any(SOLUTIONS.glob("*/*.ipynb")):
        return []
    return [(fn, strip_solution(src)) for fn, (_, src) in source_functions(SOLUTIONS).items()]


def _correct_mutants() -> list[tuple[str, str, str]]:
    return [(fn, label, src) for _, _, fn, label, src in mutant_cases(["CORRECT"])]


@pytest.mark.parametrize("function,source", _course_cells(), ids=[f for f, _ in _course_cells()])
def test_policy_accepts_every_reference_answer_cell(function, source):
    from autograder.checks import FORBIDDEN_NAMES

    assert check_cell(source, function, FORBIDDEN_NAMES.get(function, ())) == []


@pytest.mark.parametrize("function,label,source", _correct_mutants(), ids=[f"{f}:{l}" for f, l, _ in _correct_mutants()])
def test_policy_accepts_every_correct_mutant(function, label, source):
    from autograder.checks import FORBIDDEN_NAMES

    assert check_cell(source, function, FORBIDDEN_NAMES.get(function, ())) == []


GOOD = '''
def f(x, scheduler, input=None, open=None):
    """Uses only allowed things: its own variables, torch, helpers, getattr on its own objects."""
    import torch.nn.functional as G
    from diffusers import DDIMScheduler
    from helpers.schedule import alpha_sigma
    pipe = DDIMScheduler.from_config(scheduler.config, timestep_spacing="trailing")
    pipe.extra = 1
    cache = {}
    cache["k"] = G.mse_loss(x, x)
    dtype = getattr(pipe, "config")
    return open, input, torch.float32, math.pi, cache, dtype
'''

BAD = [
    ("import os\ndef f(): pass", "imports 'os'"),
    ("def f():\n    import subprocess", "imports 'subprocess'"),
    ("from autograder.checks import hidden_check\ndef f(): pass", "imports 'autograder.checks'"),
    ("from . import x\ndef f(): pass", "relative import"),
    ("from torch import *\ndef f(): pass", "import *"),
    ("import torch.hub\ndef f(): pass", "`.hub`"),
    ("def f():\n    return open('x').read()", "built-in 'open'"),
    ("def f():\n    return eval('1')", "built-in 'eval'"),
    ("def f():\n    exec('x = 1')", "built-in 'exec'"),
    ("def f():\n    return compile('1', 'f', 'eval')", "built-in 'compile'"),
    ("def f():\n    return __import__('os')", "'__import__'"),
    ("def f():\n    return globals()", "built-in 'globals'"),
    ("def f():\n    setattr(x, 'a', 1)", "built-in 'setattr'"),
    ("def f(x):\n    return getattr(torch, 'allclose')", "getattr on a module"),
    ("def f(x, name):\n    return getattr(x, name)", "computed or private attribute"),
    ("def f(x):\n    return x.__class__", "special attribute '__class__'"),
    ("def f(x):\n    return x.__globals__", "special attribute '__globals__'"),
    ("def f(x):\n    return '__subclasses__'", "name of a special attribute"),
    ("torch.allclose = lambda *a, **k: True\ndef f(): pass", "monkeypatching"),
    ("def f():\n    F.mse_loss = None", "monkeypatching"),
    ("def f():\n    torch.Tensor.allclose = None", "monkeypatching"),
    ("def f():\n    del torch.equal", "monkeypatching"),
    ("m = torch.nn\nm.functional.mse_loss = None\ndef f(): pass", "monkeypatching"),
    ("from diffusers import DDIMScheduler\nDDIMScheduler.step = None\ndef f(): pass", "monkeypatching"),
    ("def f():\n    box = [torch]\n    return box", "module 'torch' itself"),
    ("def f():\n    return torch._C", "private attribute '_C'"),
    ("def f():\n    return torch.load('x.pt')", "`.load`"),
    ("import numpy as np\ndef f():\n    return np.fromfile('x')", "`.fromfile`"),
    ("def f():\n    return torch.library.Library('aten', 'IMPL')", "`.library`"),
    ("def f():\n    return torch.os.system('ls')", "`.os`"),
    ("def f():\n    return functools.update_wrapper(F, f)", "`.update_wrapper`"),
    ("def f(g):\n    return g.gi_frame.f_back.f_locals", "`.f_back`"),
    ("global x\ndef f(): pass", "`global`"),
    ("class A:\n    pass\ndef f(): pass", "defines a class"),
    ("def f():\n    return type('A', (), {})", "type(name, bases, dict)"),
    ("def g(): pass", "does not define `def f"),
    ("def f(:\n", "syntax error"),
]


def test_policy_accepts_ordinary_code():
    assert check_cell(GOOD, "f") == []


@pytest.mark.parametrize("source,fragment", BAD, ids=[b[1] for b in BAD])
def test_policy_rejects(source, fragment):
    violations = check_cell(source, "f")
    assert any(fragment in v for v in violations), violations


def test_policy_applies_forbidden_names_of_the_battery():
    src = "def q(x, t, scheduler, noise):\n    return scheduler.add_noise(x, noise, t)\n"
    assert check_cell(src, "q") == []
    assert any("add_noise" in v for v in check_cell(src, "q", ["add_noise"]))


# --- isolated re-check ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    source, module_dir = write_toy_course(root)
    return source, module_dir


@pytest.fixture(scope="module")
def rechecker(toy, monkeypatch_module):
    from autograder.forkserver import RecheckClient

    source, module_dir = toy
    monkeypatch_module.setenv("PYTHONPATH", os.pathsep.join([str(module_dir), os.environ.get("PYTHONPATH", "")]))
    monkeypatch_module.syspath_prepend(str(module_dir))  # the grader side records the reference's values too
    client = RecheckClient(source, [TOY_CHECKS_MODULE], [str(source)], timeout_s=6, memory_bytes=3 * 2**30,
                           threads=1)
    yield client
    client.close()


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


RECHECK_CASES = [
    ("reference", "double", "def double(x):\n    return 2 * x\n", "passed", ""),
    ("written differently", "norm2", "def norm2(v):\n    return math.fsum(x ** 2 for x in v)\n", "passed", ""),
    ("wrong", "double", "def double(x):\n    return x + 2\n", "failed", "double(0) returned 2"),
    ("stub", "double", "def double(x):\n    raise NotImplementedError()\n", "unanswered", ""),
    ("helper from another cell", "double", "def double(x):\n    return _helper(x)\n", "error", "_helper"),
    ("infinite loop", "double", "def double(x):\n    while True:\n        pass\n", "timeout", ""),
    ("memory hog", "double",
     "def double(x):\n    hog = []\n    while True:\n        hog.append(torch.empty(2**30, dtype=torch.uint8))\n",
     "out_of_memory", ""),
    ("policy", "norm2", "import os\ndef norm2(v):\n    return (v * v).sum()\n", "policy_violation", "imports 'os'"),
    ("forbidden name", "norm2", "def norm2(v):\n    return math.hypot(*v) ** 2\n", "policy_violation", "hypot"),
    ("patch that evades the static check", "norm2",
     "mods = [torch.nn]\nmods[0].parameter.torch.math.isclose = lambda *a, **k: True\ndef norm2(v):\n    return 0.0\n",
     "policy_violation", "math.isclose"),
    ("patch during the call", "norm2",
     "def norm2(v):\n    mods = [torch.nn]\n    mods[0].parameter.torch.allclose = lambda *a, **k: True\n    return 0.0\n",
     "policy_violation", "torch.allclose"),
    ("builtins hidden", "double", "def double(x):\n    return print.__self__\n", "policy_violation", "__self__"),
]


@pytest.mark.parametrize("label,function,source,status,fragment", RECHECK_CASES, ids=[c[0] for c in RECHECK_CASES])
def test_recheck(rechecker, label, function, source, status, fragment):
    result = rechecker.check(function, source)
    assert result.status == status, result
    assert fragment in result.message, result


def test_recheck_server_recovers_after_killing_a_child(rechecker):
    assert rechecker.check("double", "def double(x):\n    while True:\n        x += 1\n").status == "timeout"
    assert rechecker.check("double", "def double(x):\n    return x * 2\n").status == "passed"


def test_audit_hook_blocks_protected_files_processes_and_writes(tmp_path):
    secret = tmp_path / "solutions" / "answer.txt"
    secret.parent.mkdir()
    secret.write_text("42")
    work = tmp_path / "work"
    work.mkdir()
    script = textwrap.dedent(f"""
        import os, subprocess
        from autograder.sandbox import install_audit_hook
        install_audit_hook([{str(secret.parent)!r}], [{str(work)!r}])
        results = []
        for attempt in (lambda: open({str(secret)!r}).read(),
                        lambda: os.open({str(secret)!r}, os.O_RDONLY),
                        lambda: subprocess.run(["true"]),
                        lambda: os.system("true"),
                        lambda: open({str(tmp_path / 'elsewhere.txt')!r}, "w"),
                        lambda: open({str(work / 'ok.txt')!r}, "w").write("fine")):
            try:
                attempt()
                results.append("allowed")
            except PermissionError:
                results.append("blocked")
        print(results)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == str(["blocked"] * 5 + ["allowed"]), out.stderr


def test_graded_namespace_matches_reference_globals():
    from autograder.checks import CHECKS, DEPENDS, reference_globals
    from autograder.reference import graded_namespace, source_functions

    if not any(SOLUTIONS.glob("*/*.ipynb")):
        pytest.skip("no solution notebooks yet")
    for fn in source_functions(SOLUTIONS):
        if fn not in CHECKS:
            continue
        ours = {k for k, v in graded_namespace(fn, DEPENDS.get(fn, ()), SOLUTIONS).items() if callable(v)}
        theirs = {k for k, v in reference_globals(fn, SOLUTIONS).items() if callable(v)}
        assert ours == theirs and fn not in ours, (fn, ours ^ theirs)


# --- processes -----------------------------------------------------------------------------------------

def test_orphans_of_a_submission_are_ended():
    script = textwrap.dedent("""
        import os, subprocess, time
        from autograder.procs import become_subreaper, kill_new_children
        assert become_subreaper()
        out = subprocess.run(["sh", "-c", "sleep 300 > /dev/null 2>&1 & echo $!"], capture_output=True, text=True)
        orphan = int(out.stdout)
        time.sleep(0.2)
        assert os.path.exists(f"/proc/{orphan}")
        ended = kill_new_children(set())
        time.sleep(0.2)
        print(orphan in ended, os.path.exists(f"/proc/{orphan}"))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["True", "False"], out.stderr


# --- screening and verdicts ------------------------------------------------------------------------------

EXPECTED = CourseStructure({
    "01_a": {"one": NotebookSpec("one", (GradedCell("test_f", 1.0),), frozenset({"f", "test_f"}))},
    "02_b": {"two": NotebookSpec("two", (GradedCell("test_g", 1.0),), frozenset({"g", "test_g"}))}})


def _nb_with_ids(*ids: str) -> str:
    nb = nbformat.v4.new_notebook()
    for gid in ids:
        cell = nbformat.v4.new_code_cell("pass")
        cell.metadata["nbgrader"] = {"grade_id": gid, "solution": True, "grade": False, "locked": False,
                                     "schema_version": 3}
        nb.cells.append(cell)
    return nbformat.writes(nb)


def test_screen_notebook(tmp_path):
    from autograder.worker import screen_notebook

    path = tmp_path / "one.ipynb"
    path.write_text(_nb_with_ids("f", "test_f"))
    assert screen_notebook(path, "01_a", "one", EXPECTED, 10**6) is None
    path.write_text(_nb_with_ids("g"))
    assert screen_notebook(path, "01_a", "one", EXPECTED, 10**6)[0] == "wrong_assignment"
    path.write_text(_nb_with_ids("f")[:40])
    status, message = screen_notebook(path, "01_a", "one", EXPECTED, 10**6)
    assert status == "invalid_notebook" and "truncated" in message
    path.write_text(json.dumps({"cells": "nope"}))
    assert screen_notebook(path, "01_a", "one", EXPECTED, 10**6)[0] == "invalid_notebook"
    path.write_text(_nb_with_ids("f"))
    assert screen_notebook(path, "01_a", "one", EXPECTED, 10)[0] == "invalid_notebook"


@pytest.mark.parametrize("outputs,status", [
    ([], "passed"),
    ([{"output_type": "stream", "name": "stdout", "text": "fine"}], "passed"),
    ([{"output_type": "stream", "name": "stderr", "text": "warning"}], "failed"),
    ([{"output_type": "error", "ename": "AssertionError", "evalue": "x", "traceback": []}], "failed"),
    ([{"output_type": "error", "ename": "KeyboardInterrupt", "evalue": "", "traceback": []},
      {"output_type": "error", "ename": "CellTimeoutError", "evalue": "", "traceback": []}], "timeout"),
    ([{"output_type": "error", "ename": "OutOfMemoryError", "evalue": "CUDA out of memory", "traceback": []}],
     "out_of_memory"),
    ([{"output_type": "error", "ename": "NotImplementedError", "evalue": "", "traceback": []}], "unanswered"),
    ([{"output_type": "error", "ename": "DeadKernelError", "evalue": "died", "traceback": []}], "kernel_died"),
    ([{"output_type": "error", "ename": "TypeError", "evalue": "bad", "traceback": []}], "error"),
])
def test_kernel_verdict(outputs, status):
    cell = nbformat.from_dict({"cell_type": "code", "source": "", "metadata": {}, "outputs": outputs,
                               "execution_count": 1})
    assert kernel_verdict(cell).status == status


# --- pre-warmed kernels ------------------------------------------------------------------------------------

def test_kernelspec_forms_that_can_be_forked():
    from autograder.kernels import launcher_args

    f = ["-f", "{connection_file}"]
    assert launcher_args(["python", "-m", "ipykernel_launcher", *f]) == f
    # what `python -m ipykernel install` writes on Python >= 3.11 (the GPU host's kernelspec)
    assert launcher_args(["/usr/bin/python3", "-Xfrozen_modules=off", "-m", "ipykernel_launcher", *f]) == f
    assert launcher_args(["python", "-m", "other_kernel", *f]) is None
    assert launcher_args(["python", "-u", "-m", "ipykernel_launcher", *f]) is None  # flags the fork cannot honour
    assert launcher_args(["wrapper.sh", "python"]) is None


def test_kernels_are_forked_from_the_warm_server_and_behave_like_normal_ones(toy, tmp_path):
    from nbclient import NotebookClient

    from autograder.kernels import ForkingKernelManager, KernelForkClient, set_fork_client, setup_imports

    source, _ = toy
    assert "math" in setup_imports(source)
    client = KernelForkClient(source)
    set_fork_client(client)
    try:
        nb = nbformat.v4.new_notebook()
        nb.cells = [nbformat.v4.new_code_cell("import os, sys\nprint(os.getppid(), os.getcwd(), os.environ['MARK'])"),
                    nbformat.v4.new_code_cell("while True:\n    pass"),
                    nbformat.v4.new_code_cell("print('after the interrupt')")]
        os.environ["MARK"] = "seen"
        runner = NotebookClient(nb, kernel_name="python3", timeout=5, interrupt_on_timeout=True, allow_errors=True,
                                kernel_manager_class=ForkingKernelManager, resources={"metadata": {"path": str(tmp_path)}})
        runner.execute()
    finally:
        os.environ.pop("MARK", None)
        set_fork_client(None)
        server = client.pid
        client.close()
    ppid, cwd, mark = nb.cells[0].outputs[0]["text"].split()
    assert int(ppid) == server and cwd == str(tmp_path) and mark == "seen"
    assert any(o.get("ename") == "KeyboardInterrupt" for o in nb.cells[1].outputs)
    assert nb.cells[2].outputs[0]["text"].strip() == "after the interrupt"
