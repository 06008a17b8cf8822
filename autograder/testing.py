"""Submissions for tests and benchmarks: reference and blank notebooks, every kind of broken or dishonest
submission, and a toy course (two tiny assignments with their own batteries) to test the grader quickly.

Each bad case is a function ``(course: CourseFiles, assignment) -> {filename: text}`` returning the files of a
submission folder, built from the reference and blank notebooks of the assignment, so that the same cases run
against the toy course in CI and against the kit's real assignments.
"""
from __future__ import annotations

import copy
import json
import re
import shutil
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nbformat

__all__ = ["CourseFiles", "strip_solution", "reference_notebook", "substitute", "dump", "BAD_CASES",
           "write_toy_course", "TOY_CHECKS_MODULE", "answer_grade_ids", "tests_grade_ids"]

_MARKERS = re.compile(r"^\s*### (BEGIN|END) (SOLUTION|HIDDEN TESTS)\s*$")


def strip_solution(source: str) -> str:
    """A solution cell's source without nbgrader's ``### BEGIN/END SOLUTION`` marker lines."""
    return "\n".join(line for line in source.splitlines() if not _MARKERS.match(line)) + "\n"


def _meta(cell: dict) -> dict:
    return cell.get("metadata", {}).get("nbgrader", {})


def answer_grade_ids(nb: dict) -> list[str]:
    """grade_ids of the answer cells (code, solution, not graded) in notebook order."""
    return [_meta(c)["grade_id"] for c in nb["cells"]
            if c["cell_type"] == "code" and _meta(c).get("solution") and not _meta(c).get("grade")]


def tests_grade_ids(nb: dict) -> list[str]:
    """grade_ids of the autograded tests cells in notebook order."""
    return [_meta(c)["grade_id"] for c in nb["cells"]
            if c["cell_type"] == "code" and _meta(c).get("grade") and not _meta(c).get("solution")]


def _cell(nb: dict, grade_id: str) -> dict:
    for c in nb["cells"]:
        if _meta(c).get("grade_id") == grade_id:
            return c
    raise KeyError(f"no cell with grade_id {grade_id!r}")


def _index(nb: dict, grade_id: str) -> int:
    return nb["cells"].index(_cell(nb, grade_id))


def reference_notebook(release_nb: dict, source_nb: dict) -> dict:
    """The student notebook (``release_nb``) with every answer cell filled with the solution's code."""
    nb = copy.deepcopy(release_nb)
    for c in nb["cells"]:
        meta = _meta(c)
        if meta.get("solution") and not meta.get("grade") and c["cell_type"] == "code":
            c["source"] = strip_solution("".join(_cell(source_nb, meta["grade_id"])["source"]))
    return nb


def substitute(nb: dict, function: str, source: str) -> dict:
    """A copy of ``nb`` whose answer cell ``function`` holds ``source``."""
    out = copy.deepcopy(nb)
    _cell(out, function)["source"] = source
    return out


def dump(nb: dict) -> str:
    """Notebook JSON text as Jupyter writes it."""
    return nbformat.writes(nbformat.from_dict(nb))


def _code(source: str) -> dict:
    return dict(nbformat.v4.new_code_cell(textwrap.dedent(source).strip() + "\n"))


@dataclass
class CourseFiles:
    """Reference and blank notebooks of every assignment: ``{assignment: {notebook: nb}}``."""

    reference: dict[str, dict[str, dict]]
    blank: dict[str, dict[str, dict]]

    @classmethod
    def build(cls, source_dir: str | Path, work_dir: str | Path) -> "CourseFiles":
        """Release the student notebooks of ``source_dir`` into ``work_dir`` with nbgrader and fill in the
        solutions to get the reference submissions."""
        from autograder.release import release

        release_dir = Path(work_dir) / "release"
        release(release_dir, solutions_dir=source_dir)
        reference, blank = {}, {}
        for path in sorted(release_dir.glob("*/*.ipynb")):
            a, name = path.parent.name, path.stem
            released = json.loads(path.read_text(encoding="utf-8"))
            source = json.loads((Path(source_dir) / a / path.name).read_text(encoding="utf-8"))
            blank.setdefault(a, {})[name] = released
            reference.setdefault(a, {})[name] = reference_notebook(released, source)
        return cls(reference, blank)

    def notebook(self, assignment: str, kind: str = "reference") -> tuple[str, dict]:
        """(name, nb) of the (first) notebook of ``assignment``: a copy of the reference or blank one."""
        name, nb = next(iter(getattr(self, kind)[assignment].items()))
        return name, copy.deepcopy(nb)

    def write(self, folder: str | Path, files: dict[str, str]) -> Path:
        """Write a submission folder."""
        folder = Path(folder)
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        for filename, text in files.items():
            (folder / filename).write_text(text, encoding="utf-8")
        return folder


# --- the submissions ----------------------------------------------------------------------------------

def _files(name: str, nb: dict) -> dict[str, str]:
    return {f"{name}.ipynb": dump(nb)}


def reference_case(course: CourseFiles, a: str) -> dict[str, str]:
    """Every function as in the solutions."""
    return _files(*course.notebook(a))


def blank_case(course: CourseFiles, a: str) -> dict[str, str]:
    """The notebook as released (nothing written)."""
    return _files(*course.notebook(a, "blank"))


def _first(nb: dict) -> str:
    return answer_grade_ids(nb)[0]


def _stub(function: str, body: str) -> str:
    return f"def {function}(*args, **kwargs):\n" + textwrap.indent(textwrap.dedent(body).strip(), "    ") + "\n"


def infinite_loop_case(course: CourseFiles, a: str) -> dict[str, str]:
    """The first function never returns (per-cell timeout); the others are right."""
    name, nb = course.notebook(a)
    return _files(name, substitute(nb, _first(nb), _stub(_first(nb), "while True:\n    pass")))


def uninterruptible_loop_case(course: CourseFiles, a: str) -> dict[str, str]:
    """The first function loops and swallows the interrupt: the kernel must be stopped."""
    name, nb = course.notebook(a)
    body = "while True:\n    try:\n        while True:\n            pass\n    except BaseException:\n        pass"
    return _files(name, substitute(nb, _first(nb), _stub(_first(nb), body)))


def cuda_oom_case(course: CourseFiles, a: str) -> dict[str, str]:
    """The first function runs out of GPU memory (raises torch's CUDA out-of-memory error)."""
    name, nb = course.notebook(a)
    body = ("import torch\nraise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 20.00 GiB "
            "(GPU 0; 14.75 GiB total capacity)')")
    return _files(name, substitute(nb, _first(nb), _stub(_first(nb), body)))


def host_oom_case(course: CourseFiles, a: str) -> dict[str, str]:
    """The first function reserves host memory in 1 GiB blocks until the per-process limit stops it (without
    a limit it would loop until the time limit: the blocks are never touched, so nothing else suffers)."""
    name, nb = course.notebook(a)
    body = "import torch\nhog = []\nwhile True:\n    hog.append(torch.empty(2**30, dtype=torch.uint8))"
    return _files(name, substitute(nb, _first(nb), _stub(_first(nb), body)))


def kernel_dies_case(course: CourseFiles, a: str) -> dict[str, str]:
    """A cell after the first tests cell kills the kernel; the cells after it cannot run."""
    name, nb = course.notebook(a)
    at = _index(nb, tests_grade_ids(nb)[0]) + 1
    nb["cells"].insert(at, _code("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)"))
    return _files(name, nb)


def kills_grader_case(course: CourseFiles, a: str) -> dict[str, str]:
    """A cell finds the grading worker among the kernel's ancestors and kills it: the batch goes on, this
    submission is recorded with the reason."""
    name, nb = course.notebook(a)
    nb["cells"].insert(_index(nb, _first(nb)), _code("""
        import os, signal
        pid = os.getppid()
        while pid > 1:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if b"multiprocessing" in fh.read():
                    os.kill(pid, signal.SIGKILL)
                    break
            with open(f"/proc/{pid}/stat") as fh:
                pid = int(fh.read().rsplit(")", 1)[1].split()[1])
    """))
    return _files(name, nb)


def truncated_json_case(course: CourseFiles, a: str) -> dict[str, str]:
    """The notebook file is cut in the middle (an interrupted upload)."""
    name, nb = course.notebook(a)
    text = dump(nb)
    return {f"{name}.ipynb": text[: len(text) // 2]}


def wrong_assignment_case(course: CourseFiles, a: str) -> dict[str, str]:
    """Another assignment's (correct) notebook saved under this assignment's notebook name."""
    others = [b for b in course.reference if b != a]
    name, _ = course.notebook(a)
    return {f"{name}.ipynb": dump(course.notebook(others[0])[1])}


def huge_output_case(course: CourseFiles, a: str) -> dict[str, str]:
    """A cell prints about 30 MB; everything else is right (scores must not change)."""
    name, nb = course.notebook(a)
    at = _index(nb, _first(nb))
    nb["cells"].insert(at, _code("for _ in range(3000):\n    print('spam ' * 2000)"))
    return _files(name, nb)


def missing_cells_case(course: CourseFiles, a: str) -> dict[str, str]:
    """The first tests cell is deleted (nbgrader restores it) and the last answer cell is deleted, its code
    pasted into a new plain cell (no credit: the answer cell is what is graded)."""
    name, nb = course.notebook(a)
    first_tests = _index(nb, tests_grade_ids(nb)[0])
    last = answer_grade_ids(nb)[-1]
    moved = _cell(nb, last)
    nb["cells"][nb["cells"].index(moved)] = _code("".join(moved["source"]))
    del nb["cells"][first_tests]
    return _files(name, nb)


def deleted_pair_case(course: CourseFiles, a: str) -> dict[str, str]:
    """The last answer cell and its tests cell are both deleted (nbgrader alone fails on this): both come
    back, the function scores 0 as missing, the others are graded as usual."""
    name, nb = course.notebook(a)
    last = answer_grade_ids(nb)[-1]
    nb["cells"] = [c for c in nb["cells"] if _meta(c).get("grade_id") not in (last, f"test_{last}")]
    return _files(name, nb)


def type_changed_case(course: CourseFiles, a: str) -> dict[str, str]:
    """The first tests cell was turned into markdown and the last answer cell into raw: nbgrader turns both
    back into code cells (the tests cell with its original source), so the scores are the reference's."""
    name, nb = course.notebook(a)
    tests = _cell(nb, tests_grade_ids(nb)[0])
    tests["cell_type"] = "markdown"
    tests.pop("outputs", None), tests.pop("execution_count", None)
    answer = _cell(nb, answer_grade_ids(nb)[-1])
    answer["cell_type"] = "raw"
    answer.pop("outputs", None), answer.pop("execution_count", None)
    return _files(name, nb)


def edited_tests_case(course: CourseFiles, a: str) -> dict[str, str]:
    """Blank answers and every tests cell replaced by ``pass`` (restored: no credit)."""
    name, nb = course.notebook(a, "blank")
    for grade_id in tests_grade_ids(nb):
        _cell(nb, grade_id)["source"] = "pass\n"
        _meta(_cell(nb, grade_id))["points"] = 100
    return _files(name, nb)


def swallow_errors_case(course: CourseFiles, a: str) -> dict[str, str]:
    """Blank answers, and the kernel told to swallow every exception and print fake results."""
    name, nb = course.notebook(a, "blank")
    nb["cells"].insert(_index(nb, _first(nb)), _code(
        "ip = get_ipython()\n"
        "ip.set_custom_exc((BaseException,), lambda *a, **k: print('All tests passed!'))\n"
        "ip.showtraceback = lambda *a, **k: None"))
    return _files(name, nb)


def monkeypatch_case(course: CourseFiles, a: str) -> dict[str, str]:
    """Every answer a constant, and a cell that patches torch's comparisons, ``AssertionError``, the test
    helpers, and IPython itself (every later cell is emptied), so that every test passes in the kernel."""
    name, nb = course.notebook(a)
    for fn in answer_grade_ids(nb):
        _cell(nb, fn)["source"] = _stub(fn, "import torch\nreturn torch.zeros(1)")
    nb["cells"].insert(_index(nb, _first(nb)), _code('''
        import builtins, math, sys
        import torch
        math.isclose = lambda *a, **k: True
        torch.allclose = lambda *a, **k: True
        torch.equal = lambda *a, **k: True
        torch.testing.assert_close = lambda *a, **k: None
        class _Never(Exception):
            pass
        builtins.AssertionError = _Never
        for mod in list(sys.modules.values()):
            for helper in ("hidden_check", "kernel_check"):
                if hasattr(mod, helper):
                    setattr(mod, helper, lambda *a, **k: None)
        get_ipython().input_transformers_post.append(lambda lines: [])
    '''))
    return _files(name, nb)


def patch_in_answer_case(course: CourseFiles, a: str) -> dict[str, str]:
    """The first answer is right but its cell also patches ``torch.allclose`` (policy: no credit); the
    others are constants."""
    name, nb = course.notebook(a)
    first = _first(nb)
    for fn in answer_grade_ids(nb)[1:]:
        _cell(nb, fn)["source"] = _stub(fn, "import torch\nreturn torch.zeros(1)")
    _cell(nb, first)["source"] = ("import torch\ntorch.allclose = lambda *a, **k: True\n"
                                  + "".join(_cell(nb, first)["source"]))
    return _files(name, nb)


def _load_solutions_source(fn: str) -> str:
    return textwrap.dedent(f'''
        import os, json, glob
        for _path in glob.glob(os.path.join(os.environ["CD_KIT_SOLUTIONS"], "*", "*.ipynb")):
            for _c in json.load(open(_path))["cells"]:
                if _c["metadata"].get("nbgrader", {{}}).get("grade_id") == "{fn}":
                    exec("".join(_c["source"]), globals())
    ''').lstrip()


def reads_solutions_case(course: CourseFiles, a: str) -> dict[str, str]:
    """Every answer cell loads the reference from the solution notebooks on disk (policy: no credit)."""
    name, nb = course.notebook(a)
    for fn in answer_grade_ids(nb):
        _cell(nb, fn)["source"] = _load_solutions_source(fn)
    return _files(name, nb)


def hidden_reads_case(course: CourseFiles, a: str) -> dict[str, str]:
    """A plain cell loads the references from disk and the (clean) answer cells only delegate to them: every
    test passes in the kernel, and every function fails when its answer cell is re-run alone."""
    name, nb = course.notebook(a)
    fns = answer_grade_ids(nb)
    nb["cells"].insert(_index(nb, fns[0]), _code("_solutions = dict(globals())\n" + "".join(
        _load_solutions_source(fn).replace("globals()", "_solutions") for fn in fns)))
    for fn in fns:
        _cell(nb, fn)["source"] = (f"def {fn}(*args, **kwargs):\n"
                                   f"    return _solutions[{fn!r}](*args, **kwargs)\n")
    return _files(name, nb)


BAD_CASES: dict[str, Callable[[CourseFiles, str], dict[str, str]]] = {
    "infinite_loop": infinite_loop_case,
    "uninterruptible_loop": uninterruptible_loop_case,
    "cuda_oom": cuda_oom_case,
    "host_oom": host_oom_case,
    "kernel_dies": kernel_dies_case,
    "kills_grader": kills_grader_case,
    "truncated_json": truncated_json_case,
    "wrong_assignment": wrong_assignment_case,
    "huge_output": huge_output_case,
    "missing_cells": missing_cells_case,
    "deleted_pair": deleted_pair_case,
    "type_changed": type_changed_case,
    "edited_tests": edited_tests_case,
    "swallow_errors": swallow_errors_case,
    "monkeypatch": monkeypatch_case,
    "patch_in_answer": patch_in_answer_case,
    "reads_solutions": reads_solutions_case,
    "hidden_reads": hidden_reads_case,
}


# --- the toy course ------------------------------------------------------------------------------------

TOY_CHECKS_MODULE = "toy_checks"

_TOY_CHECKS = '''
"""Hidden batteries of the toy course (test fixture of the autograder); plain Python, so its kernels are quick."""
import json
import math
import os
from pathlib import Path


def check_double(fn, ref):
    for x in (0, 1, -3, 2.5, 10**6):
        got = fn(x)
        expected = ref["double"](x)  # after the student's call, once per case (see autograder.checks)
        assert got == expected, f"double({x}) returned {got!r}, expected {expected!r}"


def check_norm2(fn, ref):
    for v in ([1.0], [1.0, 2.0, 3.0], [-0.5, 0.25, 4.0, 1e-3]):
        got = fn(v)
        assert isinstance(got, (int, float)), f"norm2 must return a number, got {type(got).__name__}"
        assert math.isclose(got, ref["norm2"](v)), f"norm2({v}) returned {got!r}"


def check_quad(fn, ref):
    for x in (0, 1, 3, -2):
        got = fn(x)
        assert got == ref["quad"](x), f"quad({x}) returned {got!r}"


CHECKS = {"double": check_double, "norm2": check_norm2, "quad": check_quad}
DEPENDS = {}
FORBIDDEN_NAMES = {"norm2": ("hypot", "dist")}


def _reference_namespace() -> dict:
    """Every solution cell of the course (in the student's kernel: no autograder, no torch)."""
    ns = {}
    for path in sorted(Path(os.environ["CD_KIT_SOLUTIONS"]).glob("*/*.ipynb")):
        for cell in json.loads(path.read_text())["cells"]:
            meta = cell.get("metadata", {}).get("nbgrader", {})
            if cell["cell_type"] == "code" and meta.get("solution") and not meta.get("grade"):
                exec("".join(cell["source"]), ns)
    return ns


def kernel_check(name, fn):
    """The hidden tests of the toy notebooks (run in the student's kernel)."""
    CHECKS[name](fn, _reference_namespace())
'''


def _nbcell(kind: str, source: str, **meta) -> dict:
    cell = (nbformat.v4.new_code_cell if kind == "code" else nbformat.v4.new_markdown_cell)(
        textwrap.dedent(source).strip() + "\n")
    if meta:
        cell.metadata["nbgrader"] = {"schema_version": 3, "locked": False, "solution": False, "grade": False, **meta}
    return cell


def _answer(grade_id: str, source: str) -> dict:
    return _nbcell("code", source, grade_id=grade_id, solution=True)


def _tests(grade_id: str, points: float, visible: str, function: str) -> dict:
    return _nbcell("code", f"{textwrap.dedent(visible).strip()}\n### BEGIN HIDDEN TESTS\n"
                           f"from toy_checks import kernel_check\nkernel_check({function!r}, {function})\n"
                           "### END HIDDEN TESTS", grade_id=grade_id, grade=True, locked=True, points=points)


def _toy_notebooks() -> dict[str, dict[str, nbformat.NotebookNode]]:
    toy = nbformat.v4.new_notebook()
    toy.cells = [
        _nbcell("markdown", "# Toy assignment 1"),
        _nbcell("code", "import math"),
        _answer("double", "def double(x):\n    ### BEGIN SOLUTION\n    return 2 * x\n    ### END SOLUTION"),
        _tests("test_double", 1, 'assert double(2) == 4, "double(2) should be 4"', "double"),
        _answer("norm2", 'def norm2(v):\n    """Sum of the squares of a list of numbers."""\n    ### BEGIN SOLUTION\n'
                         '    return sum(x * x for x in v)\n    ### END SOLUTION'),
        _tests("test_norm2", 2, 'assert norm2([1.0, 1.0, 1.0]) == 3.0, "norm2([1, 1, 1]) should be 3"', "norm2"),
        _nbcell("markdown", "Explain `double` in one sentence.", grade_id="explain", solution=True, grade=True,
                points=1),
    ]
    nxt = nbformat.v4.new_notebook()
    nxt.cells = [
        _nbcell("markdown", "# Toy assignment 2"),
        _nbcell("code", "def double(x):\n    return 2 * x"),
        _answer("quad", "def quad(x):\n    ### BEGIN SOLUTION\n    return double(double(x))\n    ### END SOLUTION"),
        _tests("test_quad", 1, 'assert quad(1) == 4, "quad(1) should be 4"', "quad"),
    ]
    for nb in (toy, nxt):
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return {"01_toy": {"toy": toy}, "02_toy_next": {"next": nxt}}


def write_toy_course(root: str | Path) -> tuple[Path, Path]:
    """Write the toy course under ``root``: ``source/<assignment>/<notebook>.ipynb`` and the batteries module
    ``toy_checks.py`` (put ``root`` on PYTHONPATH); return (source folder, module folder)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{TOY_CHECKS_MODULE}.py").write_text(_TOY_CHECKS.lstrip(), encoding="utf-8")
    for a, notebooks in _toy_notebooks().items():
        (root / "source" / a).mkdir(parents=True, exist_ok=True)
        for name, nb in notebooks.items():
            nbformat.write(nb, root / "source" / a / f"{name}.ipynb")
    return root / "source", root
