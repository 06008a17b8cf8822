"""The kit's nbgrader preprocessors: robust execution, metadata restoration and the isolated re-check.

* :class:`GuardedExecute` (replaces nbgrader's ``Execute``): caps each cell's output, and turns a kernel that
  dies or stops answering into error outputs on the affected cells instead of a failed submission.
* :class:`RestoreCellMetadata` (sanitising stage, after ``OverwriteCells``): resets every graded or answer
  cell's nbgrader metadata to the source's and strips nbgrader metadata the source does not know.
* :class:`IsolatedRecheck` (after ``Execute``, before ``SaveAutoGrades``): a tests cell ``test_<fn>`` that
  passed in the kernel keeps its points only if the answer cell ``<fn>`` passes the same hidden battery when
  re-run alone (``autograder/forkserver.py``); otherwise it gets an error output saying why, so nbgrader's own
  scoring gives 0 and the feedback shows the reason. It also records a status for every graded cell.
"""
from __future__ import annotations

import re
import nbformat
from nbclient.exceptions import CellTimeoutError, DeadKernelError
from nbformat.notebooknode import NotebookNode
from nbgrader import utils
from nbgrader.api import Gradebook
from nbgrader.preprocessors import Execute, NbGraderPreprocessor
from traitlets import Integer

from autograder.kernels import ForkingKernelManager
from autograder.types import WITHDRAWN_IN_RECHECK, GradingSession, Status, Verdict

__all__ = ["GuardedExecute", "RestoreMissingCells", "RestoreCellMetadata", "IsolatedRecheck", "kernel_verdict",
           "RECHECK_ENAME"]

#: ename of the error output added to a tests cell whose points are withdrawn.
RECHECK_ENAME = "AutograderRecheckFailed"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_OOM = ("out of memory", "can't allocate memory", "cannot allocate memory", "outofmemoryerror", "memoryerror",
        "std::bad_alloc")

def _error_output(ename: str, evalue: str) -> NotebookNode:
    return NotebookNode(output_type="error", ename=ename, evalue=evalue,
                        traceback=[f"\x1b[0;31m{ename}\x1b[0m: {evalue}"])


# --- execution -----------------------------------------------------------------------------------------

class GuardedExecute(Execute):
    """nbgrader's Execute that survives dying or unresponsive kernels and caps output size."""

    max_output_bytes = Integer(1_000_000, help="largest output kept per cell; the rest is dropped").tag(config=True)

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("kernel_manager_class", ForkingKernelManager)  # pre-warmed kernels when available
        super().__init__(*args, **kwargs)

    def preprocess(self, nb: NotebookNode, resources: dict, km=None):
        self._abort: dict | None = None
        self._sizes: dict[int, int] = {}
        state = resources.setdefault("cd_kit", {})
        state["abort"] = None
        try:
            nb, resources = super().preprocess(nb, resources, km=km)
        except Exception as err:  # noqa: BLE001 - the kernel failed to start or to shut down
            if self._abort is None:
                self._stop(None, "kernel_died", f"the kernel failed: {type(err).__name__}: {err}")
            for index, cell in enumerate(nb.cells):
                if cell.cell_type == "code" and not cell.get("outputs") and cell.source.strip():
                    self._mark_not_run(cell, index)
        state = resources.setdefault("cd_kit", {})
        state["abort"] = self._abort
        return nb, resources

    def _stop(self, index: int | None, status: str, message: str) -> None:
        self._abort = {"index": index, "status": status, "message": message}
        self.log.error("Stopping execution: %s", message)

    def _mark_not_run(self, cell: NotebookNode, index: int) -> None:
        assert self._abort is not None
        cell.outputs = [_error_output("NotRun", f"not run: {self._abort['message']}")]

    def _kill_kernel(self) -> None:
        """Stop an unresponsive kernel now (the worker also ends anything it left behind)."""
        from nbclient.util import run_sync

        try:
            if self.km is not None:
                run_sync(self.km.shutdown_kernel)(now=True)
        except Exception as err:  # noqa: BLE001
            self.log.warning("Could not stop the kernel: %s", err)

    def preprocess_cell(self, cell, resources, index):
        if self._abort is not None:
            if cell.cell_type == "code" and cell.source.strip():
                self._mark_not_run(cell, index)
            return cell, resources
        try:
            return super().preprocess_cell(cell, resources, index)
        except DeadKernelError:
            self._stop(index, "kernel_died", f"the kernel died while running cell {index} (out of memory, a crash "
                                             "in native code, or the process was killed)")
            cell.outputs = list(cell.get("outputs", [])) + [_error_output("DeadKernelError", self._abort["message"])]
        except CellTimeoutError:
            self._stop(index, "timeout", f"cell {index} ran past the {self.timeout} s limit and the kernel did not "
                                         "respond to an interrupt; it was stopped")
            cell.outputs = list(cell.get("outputs", [])) + [_error_output("CellTimeoutError", self._abort["message"])]
            self._kill_kernel()
        except Exception as err:  # noqa: BLE001 - e.g. a broken message stream
            self._stop(index, "kernel_died", f"running cell {index} failed: {type(err).__name__}: {err}")
            cell.outputs = list(cell.get("outputs", [])) + [_error_output(type(err).__name__, str(err))]
            self._kill_kernel()
        return cell, resources

    def output(self, outs, msg, display_id, cell_index):
        content = msg.get("content", {})
        size = len(str(content.get("text", ""))) + sum(len(str(v)) for v in content.get("data", {}).values())
        used = self._sizes.get(cell_index, 0)
        if used >= self.max_output_bytes:
            return None
        self._sizes[cell_index] = used + size
        if used + size > self.max_output_bytes:
            outs.append(NotebookNode(output_type="stream", name="stdout",
                                     text=f"\n[autograder] output truncated: more than {self.max_output_bytes} "
                                          "bytes\n"))
            return None
        return super().output(outs, msg, display_id, cell_index)


# --- metadata ----------------------------------------------------------------------------------------------

class RestoreMissingCells(NbGraderPreprocessor):
    """Put back every nbgrader cell of the source that the submission lost (answer, tests, read-only cells), in
    source order, before nbgrader's ``OverwriteCells``: nbgrader re-adds missing *grade* cells only, and
    fails when the cell before a missing one is missing too. Tests cells get nbgrader's own "was missing"
    form; answer and read-only cells their released version. The ids go to :data:`RESTORED`."""

    def preprocess(self, nb: NotebookNode, resources: dict):
        from nbgrader.preprocessors import OverwriteCells

        info = resources["nbgrader"]
        present = {c.metadata.get("nbgrader", {}).get("grade_id") for c in nb.cells} - {None}
        restored: set[str] = set()
        with Gradebook(info["db_url"]) as gb:
            source = gb.find_notebook(info["notebook"], info["assignment"])
            grades = {c.name: float(c.max_score) for c in source.grade_cells}
            solutions = {c.name for c in source.solution_cells}
            tasks = {c.name: float(c.max_score) for c in source.task_cells}
            position = 0
            for cell in source.source_cells:
                if cell.name in present:
                    position = 1 + next(i for i, c in enumerate(nb.cells)
                                        if c.metadata.get("nbgrader", {}).get("grade_id") == cell.name)
                    continue
                if cell.name in grades or cell.name in tasks:
                    new = OverwriteCells(parent=self.parent).missing_cell_transform(
                        cell, grades.get(cell.name, tasks.get(cell.name)), is_solution=cell.name in solutions,
                        is_task=cell.name in tasks)
                else:
                    new = self._plain(cell, cell.name in solutions)
                nb.cells.insert(position, nbformat.from_dict(new))  # NotebookNodes all the way down
                position += 1
                restored.add(cell.name)
        GradingSession.current().restored[(info["student"], info["assignment"], info["notebook"])] = restored
        if restored:
            self.log.warning("Restored missing cells: %s", ", ".join(sorted(restored)))
        return nb, resources

    @staticmethod
    def _plain(cell, solution: bool) -> NotebookNode:
        meta = {"grade": False, "solution": solution, "locked": bool(cell.locked), "grade_id": cell.name,
                "schema_version": 3, "checksum": cell.checksum}
        if cell.cell_type == "code":
            new = NotebookNode(cell_type="code", source=cell.source, outputs=[], execution_count=None,
                               metadata=NotebookNode(nbgrader=NotebookNode(meta)))
        else:
            new = NotebookNode(cell_type=cell.cell_type, source=cell.source,
                               metadata=NotebookNode(nbgrader=NotebookNode(meta)))
        return new


class RestoreCellMetadata(NbGraderPreprocessor):
    """Reset nbgrader metadata of known cells to the source's; drop nbgrader metadata of unknown cells."""

    def preprocess(self, nb: NotebookNode, resources: dict):
        info = resources["nbgrader"]
        with Gradebook(info["db_url"]) as gb:
            source = gb.find_notebook(info["notebook"], info["assignment"])
            cells = {c.name: c for c in source.source_cells}
            grades = {c.name: float(c.max_score) for c in source.grade_cells}
            solutions = {c.name for c in source.solution_cells}
            tasks = {c.name: float(c.max_score) for c in source.task_cells}
        for cell in nb.cells:
            meta = cell.metadata.get("nbgrader")
            if meta is None:
                continue
            grade_id = meta.get("grade_id")
            if grade_id not in cells:
                del cell.metadata["nbgrader"]
                continue
            restored = {"grade": grade_id in grades, "solution": grade_id in solutions,
                        "locked": bool(cells[grade_id].locked), "grade_id": grade_id,
                        "schema_version": meta.get("schema_version", 3), "checksum": cells[grade_id].checksum,
                        "cell_type": cells[grade_id].cell_type}
            if grade_id in grades:
                restored["points"] = grades[grade_id]
            if grade_id in tasks:
                restored.update(task=True, points=tasks[grade_id])
            cell.metadata["nbgrader"] = restored
        return nb, resources


# --- verdicts ----------------------------------------------------------------------------------------------

def _clean(text: str, limit: int = 300) -> str:
    text = _ANSI.sub("", text).strip().replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def kernel_verdict(cell: NotebookNode) -> Verdict:
    """Status and message of a code cell from its outputs, as nbgrader scores it (first error or stderr)."""
    outputs = cell.get("outputs", [])
    enames = [o.get("ename") for o in outputs if o.output_type == "error"]
    if "CellTimeoutError" in enames or "KeyboardInterrupt" in enames:
        return Verdict(Status.TIMEOUT, "the cell ran past the per-cell time limit and was interrupted")
    for out in outputs:
        if out.output_type == "error":
            ename, evalue = out.get("ename", ""), _clean(str(out.get("evalue", "")))
            text = f"{ename}: {evalue}".lower()
            if ename in ("DeadKernelError", "NotRun"):
                return Verdict(Status.KERNEL_DIED, evalue)
            if any(m in text for m in _OOM):
                return Verdict(Status.OUT_OF_MEMORY, f"{ename}: {evalue}")
            if ename == "AssertionError":
                return Verdict(Status.FAILED, f"{ename}: {evalue}" if evalue else "AssertionError")
            if ename == "NotImplementedError":
                return Verdict(Status.UNANSWERED, "NotImplementedError: the function is not written yet")
            return Verdict(Status.ERROR, f"{ename}: {evalue}")
        if out.output_type == "stream" and out.get("name") == "stderr":
            return Verdict(Status.FAILED,
                           f"the cell wrote to stderr (nbgrader scores that as a failure): {_clean(out.text, 200)}")
    return Verdict(Status.PASSED)


class IsolatedRecheck(NbGraderPreprocessor):
    """Withdraw the points of tests cells whose answer cell fails the battery when re-run alone; record a
    :class:`~autograder.types.Verdict` for every graded cell in the :class:`~autograder.types.GradingSession`."""

    def preprocess(self, nb: NotebookNode, resources: dict):
        info = resources["nbgrader"]
        key = (info["student"], info["assignment"], info["notebook"])
        session = GradingSession.current()
        self._rechecker = session.rechecker
        self._restored = session.restored.pop(key, set())
        abort = resources.get("cd_kit", {}).get("abort")
        answers = {c.metadata.nbgrader["grade_id"]: (i, c) for i, c in enumerate(nb.cells)
                   if utils.is_solution(c) and not utils.is_grade(c) and c.cell_type == "code"}
        results: dict[str, Verdict] = {}
        for index, cell in enumerate(nb.cells):
            if utils.is_grade(cell):
                results[cell.metadata.nbgrader["grade_id"]] = self._grade_cell(cell, index, answers, abort)
        session.results[key] = results
        return nb, resources

    def _grade_cell(self, cell: NotebookNode, index: int, answers: dict, abort: dict | None) -> Verdict:
        grade_id = cell.metadata.nbgrader["grade_id"]
        if utils.is_solution(cell) or cell.cell_type != "code":
            return Verdict(Status.MANUAL, "graded by hand (formgrader)")
        score, _ = utils.determine_grade(cell, self.log)
        function = grade_id[len("test_"):] if grade_id.startswith("test_") else None
        answer = answers.get(function) if function else None
        kernel = kernel_verdict(cell)
        if abort is not None and abort["index"] is not None and index > abort["index"]:
            return Verdict(Status(abort["status"]), f"not run: {abort['message']}")
        if kernel.status == Status.PASSED and score is not None and 0 < score < float(cell.metadata.nbgrader["points"]):
            kernel = Verdict(Status.PARTIAL, kernel.message)
        if function is None or not self._has_battery(function):
            return kernel
        if answer is None or function in self._restored:
            return self._withdraw(cell, Verdict(Status.MISSING, f"the answer cell `{function}` is missing from the "
                                                                "notebook (deleted, or its metadata was changed)"))
        answer_cell = answer[1]
        if utils.compute_checksum(answer_cell) == answer_cell.metadata.nbgrader.get("checksum"):
            return self._withdraw(cell, Verdict(Status.UNANSWERED,
                                                f"`{function}` is not written yet (answer cell unchanged)"))
        if not score:
            answer_verdict = kernel_verdict(answer_cell)
            if (answer_verdict.status in (Status.TIMEOUT, Status.OUT_OF_MEMORY, Status.KERNEL_DIED, Status.ERROR)
                    and kernel.status in (Status.ERROR, Status.FAILED)):
                return Verdict(answer_verdict.status, f"the answer cell failed: {answer_verdict.message}")
            return kernel
        result = self._recheck(cell, function, answer_cell.source)
        if result.status == Status.PASSED:
            return Verdict(kernel.status, "", result.seconds)
        return result

    def _has_battery(self, function: str) -> bool:
        return self._rechecker is not None and self._rechecker.has_battery(function)

    def _recheck(self, cell: NotebookNode, function: str, source: str) -> Verdict:
        result = self._rechecker.check(function, source)
        if result.status == Status.PASSED:
            return result
        message = _clean(result.message, 1000)
        if result.status == Status.FAILED and result.against_reference:
            # the kernel never compares with the reference (it has none): a wrong value shows here first
            verdict = Verdict(Status.FAILED, message)
        elif result.status in WITHDRAWN_IN_RECHECK:
            verdict = Verdict(Status.RECHECK_FAILED, f"passed in the notebook but failed when `{function}`'s answer "
                                                     f"cell was re-run on its own: {message}")
        else:
            verdict = Verdict(result.status, f"isolated re-check of `{function}`: {message}")
        return self._withdraw(cell, verdict)

    @staticmethod
    def _withdraw(cell: NotebookNode, verdict: Verdict) -> Verdict:
        """Put an error output first in the tests cell so that nbgrader scores it 0."""
        cell.outputs = ([_error_output(RECHECK_ENAME, f"[{verdict.status}] {verdict.message}")]
                        + list(cell.get("outputs", [])))
        return verdict
