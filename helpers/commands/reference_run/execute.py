"""Executing the reference run's notebooks: copy ``solutions/`` to ``<out>/notebooks/`` and run each
assignment's notebook there with nbclient, in course order, stopping at the first failure."""
from __future__ import annotations

import asyncio
import os
import platform
import queue
import re
import shutil
import time
import traceback as _traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import nbformat
import torch
import zmq
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from traitlets.config import Config

from helpers.config import KitConfig, setting_fields
from helpers.course import ASSIGNMENTS, Assignment
from helpers.device import cpu_threads_env, pick_device
from helpers.models import resolve_model

__all__ = ["NotebookResult", "Execution", "PRODUCED", "PACKAGES", "select_assignments", "execute_notebook",
           "plain_traceback", "kernel_env",
           "model_setting", "prepare", "run_notebooks", "environment_info"]

PRODUCED = ("notebooks", "figures", "samples", "metrics.json", "report.md")  # what a run owns inside <out>
PACKAGES = ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "numpy", "nbgrader",
            "nbclient", "ipykernel")


@dataclass
class NotebookResult:
    """What happened to one assignment's notebook."""

    assignment: str
    notebook: str  # path relative to <out>
    status: str  # "ok", "failed", "missing" (no solution notebook) or "not run" (after a failure)
    wall_s: float | None = None
    error: str | None = None  # where it failed and the exception, one line
    traceback: str | None = None  # the failing cell's traceback, plain text (also in the executed copy)


@dataclass(frozen=True)
class Execution:
    """The outcome of :func:`execute_notebook`: ``error`` (None on success) names the failing cell and the
    exception in one line; ``traceback`` is the plain-text traceback that the executed copy also carries."""

    error: str | None
    traceback: str | None
    wall_s: float


def select_assignments(only: str | Sequence[str] | None) -> list[Assignment]:
    """The assignments to run, in course order: all, or those whose id starts with one of ``only``
    (``"01,02"``, ``["03_ct_derivation"]``)."""
    if not only:
        return list(ASSIGNMENTS)
    keys = [k.strip() for k in (only.split(",") if isinstance(only, str) else only) if k.strip()]
    unknown = [k for k in keys if not any(a.id.startswith(k) for a in ASSIGNMENTS)]
    if unknown:
        raise ValueError(f"--only {','.join(unknown)}: no such assignment; use prefixes of "
                         f"{[a.id for a in ASSIGNMENTS]} (e.g. --only 01,02)")
    return [a for a in ASSIGNMENTS if any(a.id.startswith(k) for k in keys)]


def _describe_cell(cell: dict, index: int) -> str:
    """``cell 7 (grade_id 'q_sample'): def q_sample(...`` -- enough to find the cell in Jupyter."""
    grade_id = cell.get("metadata", {}).get("nbgrader", {}).get("grade_id")
    first = next((line for line in cell.get("source", "").splitlines() if line.strip()), "").strip()
    tag = f" (grade_id {grade_id!r})" if grade_id else ""
    return f"cell {index}{tag}: {first[:80]}"


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_FRAME = re.compile(r"^\s*(File |Cell In\[)")  # a frame line of IPython's or of Python's tracebacks
RUNNER_NOTE = ("Raised in the reference run's own process (nbclient, which executes the notebook) while this cell "
               "ran, not by the cell's code: a cell timeout, a dead kernel or an error inside nbclient. "
               "Traceback of the runner:")


def plain_traceback(lines: list[str] | str) -> str:
    """A traceback (a list of lines as in a notebook's error output, or one string) without ANSI colours."""
    text = "\n".join(lines) if isinstance(lines, list) else lines
    return _ANSI.sub("", text).strip("\n")


def _summary(ename: str, evalue: str, traceback: str) -> str:
    """``ename: evalue``; for an exception without a message (a bare ``assert``) also the last frame of the
    traceback, so that the one-line summary still says where it was raised."""
    if str(evalue).strip():
        first = next(line for line in str(evalue).splitlines() if line.strip())
        return f"{ename}: {first.strip()[:300]}"
    frames = [line.strip() for line in traceback.splitlines() if _FRAME.match(line)]
    return f"{ename} (no message)" + (f", raised at {frames[-1][:200]}" if frames else "")


def _record_failure(cell: dict | None, err: BaseException) -> tuple[str, str]:
    """``(summary, traceback)`` of a failed execution; the failing cell is made to carry the traceback.

    When the cell's code raised (``CellExecutionError``), the kernel's error output has the traceback (it is
    added from the exception if it did not reach the cell). Any other exception came from this process: a cell
    timeout, a dead kernel, an error inside nbclient. Its own traceback then becomes an error output of the
    cell, after whatever the kernel reported, so the executed copy shows it too."""
    outputs = cell.setdefault("outputs", []) if cell is not None else []
    kernel = [plain_traceback(o.get("traceback") or []) for o in outputs if o.get("output_type") == "error"]
    if isinstance(err, CellExecutionError):
        ename, evalue, tb = err.ename, err.evalue, (kernel[-1] if kernel else plain_traceback(str(err)))
        summary = _summary(ename, evalue, tb)
    else:
        ename, evalue = type(err).__name__, str(err)
        runner = f"{RUNNER_NOTE}\n" + plain_traceback("".join(_traceback.format_exception(err)))
        tb, summary = "\n\n".join([*kernel[-1:], runner]), _summary(ename, evalue, runner)
    if cell is not None and (not kernel or not isinstance(err, CellExecutionError)):
        outputs.append(nbformat.v4.new_output("error", ename=ename, evalue=evalue, traceback=tb.splitlines()))
    return summary, tb


def _wait_out_early_wakeups(kernel_client) -> None:
    """Make the kernel client's shell ``get_msg`` raise ``queue.Empty`` only once its timeout has really passed.

    nbclient waits for a cell's reply with ``shell_channel.get_msg(timeout)``; jupyter_client raises ``Empty``
    whenever pyzmq's asyncio ``poll`` resolves to 0, which it does when, woken, it finds nothing to read. nbclient
    takes any ``Empty`` for a timeout: with no cell timeout (the reference run's default) it fails on its bare
    ``assert timeout is not None``, in this process, while the kernel runs on; with one, it reports a false
    timeout. That is the likely cause of issue 15's failure (notebook 04's CD cell on a custom pipeline: a bare
    ``AssertionError:``, nothing in the notebook); the trigger of the early wake-up was not observed here."""
    channel = kernel_client.shell_channel
    get_msg = channel.get_msg

    async def patient_get_msg(timeout: float | None = None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                return await get_msg(timeout=left)
            except queue.Empty:
                if deadline is not None and time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(0.01)  # an early wake-up: wait on

    channel.get_msg = patient_get_msg


def execute_notebook(path: Path, env: dict[str, str], cell_timeout: int | None = None,
                     kernel_name: str = "python3") -> Execution:
    """Execute the notebook at ``path`` in place (its folder as working directory) and save it, also when
    a cell fails; the failing cell then carries the traceback (see :class:`Execution`)."""
    nb = nbformat.read(path, as_version=4)
    running: dict[str, Any] = {}
    # CurveZMQ between this process and the kernel where pyzmq has it (else the kernel warns about plain TCP)
    config = Config(KernelManager={"transport_encryption": "auto" if zmq.has("curve") else "disabled"})
    client = NotebookClient(nb, timeout=cell_timeout, kernel_name=kernel_name, config=config,
                            resources={"metadata": {"path": str(path.parent)}},
                            on_notebook_start=lambda notebook: _wait_out_early_wakeups(client.kc),
                            on_cell_start=lambda cell, cell_index: running.update(cell=cell, index=cell_index))
    start = time.perf_counter()
    error = tb = None
    try:
        client.execute(env=env)
    except Exception as err:  # CellExecutionError, CellTimeoutError, DeadKernelError, kernel start failures
        where = _describe_cell(running["cell"], running["index"]) if running else "before the first cell"
        summary, tb = _record_failure(running.get("cell"), err)
        error = f"{where} -> {summary}"
    finally:
        nbformat.write(nb, path)
    return Execution(error, tb, time.perf_counter() - start)


def kernel_env(config: KitConfig, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The kernels' environment: ``base`` (default: this process's, for PATH, HF_HOME...) without any kit
    setting, then exactly the variables of the kernels' settings ``config`` (``CD_KIT_OUT``, ``CD_KIT_MODEL``,
    ``CD_KIT_REDUCED=1`` when reduced...; never ``NBGRADER_EXECUTION``, which would make helpers.report write
    nothing) and ``MPLBACKEND=Agg``. :func:`run_notebooks` adds the CPU threads' setting per notebook
    (:func:`helpers.device.cpu_threads_env`: one thread when other load is on the cores)."""
    kit = {f.metadata["env"] for f in setting_fields()}
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in kit}
    return {**env, **config.replace(execution="").to_environ(), "MPLBACKEND": "Agg"}


def model_setting(model: str) -> str:
    """The model setting for the kernels; a relative folder is made absolute (kernels run elsewhere)."""
    spec = resolve_model(model)  # fails early, saying what to do, when the small model is missing
    return str(Path(spec.setting).resolve()) if spec.kind == "custom" and Path(spec.setting).exists() else spec.setting


def prepare(out: Path, solutions_dir: Path) -> Path:
    """Delete what an earlier run produced in ``out`` and copy the solutions to ``out/notebooks``."""
    if not solutions_dir.is_dir():
        raise FileNotFoundError(f"No solutions folder at {solutions_dir}: run from a checkout of the kit.")
    out.mkdir(parents=True, exist_ok=True)
    for name in PRODUCED:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    shutil.copytree(solutions_dir, out / "notebooks", ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    return out / "notebooks"


def run_notebooks(assignments: list[Assignment], nb_dir: Path, env: dict[str, str],
                   cell_timeout: int | None) -> list[NotebookResult]:
    """Execute the assignments' notebooks in order; after a failure the rest are marked "not run"."""
    results: list[NotebookResult] = []
    failed = False
    for a in assignments:
        rel = f"notebooks/{a.id}/{a.notebook}"
        if not (nb_dir / a.id / a.notebook).exists():
            results.append(NotebookResult(a.id, rel, "missing"))
            print(f"[{a.id}] missing: no solutions/{a.id}/{a.notebook}", flush=True)
            continue
        if failed:
            results.append(NotebookResult(a.id, rel, "not run"))
            continue
        print(f"[{a.id}] running {rel} ...", flush=True)
        nb_env = cpu_threads_env(env)
        if nb_env.get("OMP_NUM_THREADS") == "1" and "OMP_NUM_THREADS" not in env:
            print(f"[{a.id}] other processes are using the CPU: its kernel runs PyTorch with one thread "
                  "(set OMP_NUM_THREADS to choose)", flush=True)
        done = execute_notebook(nb_dir / a.id / a.notebook, nb_env, cell_timeout)
        failed = done.error is not None
        results.append(NotebookResult(a.id, rel, "failed" if failed else "ok", round(done.wall_s, 1), done.error,
                                      done.traceback))
        print(f"[{a.id}] {'FAILED' if failed else 'ok'} in {done.wall_s:.1f} s"
              + (f": {done.error}" if failed else ""), flush=True)
    return results


def environment_info(device_setting: str | None = None) -> dict[str, Any]:
    """Python, package versions and the device of this run (``device_setting``: :attr:`KitConfig.device`)."""
    device = pick_device(device_setting)
    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                            "device": str(device), "cpu_count": os.cpu_count(),
                            "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    for pkg in PACKAGES:
        try:
            info[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            info[pkg] = "not installed"
    return info
