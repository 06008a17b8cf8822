"""Executing the reference run's notebooks: copy ``solutions/`` to ``<out>/notebooks/`` and run each
assignment's notebook there with nbclient, in course order, stopping at the first failure."""
from __future__ import annotations

import os
import platform
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import nbformat
import torch
import zmq
from nbclient import NotebookClient
from traitlets.config import Config

from helpers.config import KitConfig, setting_fields
from helpers.course import ASSIGNMENTS, Assignment
from helpers.device import pick_device
from helpers.models import resolve_model

__all__ = ["NotebookResult", "PRODUCED", "PACKAGES", "select_assignments", "execute_notebook", "kernel_env",
           "model_setting", "prepare", "run_notebooks", "environment_info"]

PRODUCED = ("notebooks", "figures", "metrics.json", "report.md")  # what a run owns inside <out>
PACKAGES = ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "numpy", "nbgrader",
            "nbclient", "ipykernel")


@dataclass
class NotebookResult:
    """What happened to one assignment's notebook."""

    assignment: str
    notebook: str  # path relative to <out>
    status: str  # "ok", "failed", "missing" (no solution notebook) or "not run" (after a failure)
    wall_s: float | None = None
    error: str | None = None



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


def _error_summary(cell: dict) -> str:
    for output in cell.get("outputs", []):
        if output.get("output_type") == "error":
            return f"{output.get('ename')}: {output.get('evalue')}"
    return ""


def execute_notebook(path: Path, env: dict[str, str], cell_timeout: int | None = None,
                     kernel_name: str = "python3") -> tuple[str | None, float]:
    """Execute the notebook at ``path`` in place (its folder as working directory) and save it, also when
    a cell fails. Returns ``(error, wall seconds)``; ``error`` is None on success, else names the cell."""
    nb = nbformat.read(path, as_version=4)
    running: dict[str, Any] = {}
    # CurveZMQ between this process and the kernel where pyzmq has it (else the kernel warns about plain TCP)
    config = Config(KernelManager={"transport_encryption": "auto" if zmq.has("curve") else "disabled"})
    client = NotebookClient(nb, timeout=cell_timeout, kernel_name=kernel_name, config=config,
                            resources={"metadata": {"path": str(path.parent)}},
                            on_cell_start=lambda cell, cell_index: running.update(cell=cell, index=cell_index))
    start = time.perf_counter()
    error = None
    try:
        client.execute(env=env)
    except Exception as err:  # CellExecutionError, CellTimeoutError, DeadKernelError, kernel start failures
        where = _describe_cell(running["cell"], running["index"]) if running else "before the first cell"
        detail = _error_summary(running["cell"]) if running else ""
        last_line = (str(err).strip().splitlines() or [""])[-1][:300]
        error = f"{where} -> {detail or f'{type(err).__name__}: {last_line}'}"
    finally:
        nbformat.write(nb, path)
    return error, time.perf_counter() - start


def kernel_env(config: KitConfig, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The kernels' environment: ``base`` (default: this process's, for PATH, HF_HOME...) without any kit
    setting, then exactly the variables of the kernels' settings ``config`` (``CD_KIT_OUT``, ``CD_KIT_MODEL``,
    ``CD_KIT_REDUCED=1`` when reduced...; never ``NBGRADER_EXECUTION``, which would make helpers.report write
    nothing) and ``MPLBACKEND=Agg``."""
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
        error, wall = execute_notebook(nb_dir / a.id / a.notebook, env, cell_timeout)
        failed = error is not None
        results.append(NotebookResult(a.id, rel, "failed" if failed else "ok", round(wall, 1), error))
        print(f"[{a.id}] {'FAILED' if failed else 'ok'} in {wall:.1f} s" + (f": {error}" if error else ""),
              flush=True)
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
